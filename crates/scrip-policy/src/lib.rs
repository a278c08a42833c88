//! Cedar at request time: loading and validating policies against the
//! schema, and deciding one `(agent, action, tool, context)` request.
//!
//! Policies are the `*.cedar` files of `policy_dir`; the schema is its one
//! `*.cedarschema` file, or scrip's built-in schema when there is none. A
//! policy's id is its `@id("...")` annotation, else `<file>:<n>`, and that
//! id is what decisions and the audit trail name.
//!
//! Architecture invariant: deny is the default. [`PolicyEngine::decide`]
//! returns `allowed` only when Cedar answers `Allow` with no evaluation
//! error; any failure to build the request denies.

mod engine;
mod selection;
mod testfile;

pub use engine::{
    Decision, DecisionRequest, PolicyEngine, RequestContext, Stage, find_ticket, is_policy_file,
    nested_files, tickets,
};
pub use testfile::{CaseResult, TestError, run_test_file};

use std::path::PathBuf;

/// The schema used when `policy_dir` has none.
pub const DEFAULT_SCHEMA: &str = include_str!("default.cedarschema");

/// Why a policy set was refused.
#[derive(Debug, thiserror::Error)]
pub enum PolicyError {
    /// A file or the directory could not be read.
    #[error("cannot read `{path}`: {source}")]
    Io {
        /// The path.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// More than one schema file.
    #[error("`{0}` holds more than one *.cedarschema file")]
    SeveralSchemas(PathBuf),
    /// A policy or schema file below a subdirectory of the policy
    /// directory, which scrip does not read: a `forbid` kept there would
    /// never apply.
    #[error(
        "`{0}` is a policy file in a subdirectory, which scrip does not read (only the policy directory's own files are, and directories whose names start with `.` are passed over): move it into the policy directory, or rename it so that it does not end in .cedar or .cedarschema"
    )]
    Nested(PathBuf),
    /// More entries in and below the policy directory than are looked
    /// through for policy files in its subdirectories (the directory listed
    /// when the count ran over).
    #[error(
        "more than 10,000 entries in the policy directory and below it, the last in `{0}`: scrip cannot tell whether a policy file it would not read is among them; keep the policy directory to policies (directories whose names start with `.` are passed over)"
    )]
    Crowded(PathBuf),
    /// A policy file or directory someone other than scrip's user could
    /// change: they would decide every request.
    #[error(transparent)]
    Unsafe(#[from] scrip_config::trust::Untrusted),
    /// The schema does not parse.
    #[error("schema `{name}` is invalid: {message}")]
    Schema {
        /// The schema's file name.
        name: String,
        /// Cedar's message.
        message: String,
    },
    /// A policy file does not parse.
    #[error("policy file `{name}` is invalid: {message}")]
    Parse {
        /// The file name.
        name: String,
        /// Cedar's message.
        message: String,
    },
    /// Two policies share an id.
    #[error("policy id `{0}` is used twice")]
    DuplicateId(String),
    /// The policies do not validate against the schema.
    #[error("policies do not validate against the schema:\n{0}")]
    Validation(String),
    /// A configured tool action is not a Cedar action of the schema.
    #[error(
        "tool `{tool}` action `{action}` is not declared in the Cedar schema as an action of an agent at a tool; add it to an `action` line that appliesTo Agent and Tool"
    )]
    UndeclaredAction {
        /// The tool.
        tool: String,
        /// The action.
        action: String,
    },
    /// A `forbid` is scoped to a tool that is not configured, so it would
    /// never apply.
    #[error(
        "policy `{policy}` forbids only at tool `{tool}`, which is not configured: it would never apply; correct the tool's name, or remove the policy"
    )]
    UnknownTool {
        /// The policy's id.
        policy: String,
        /// The tool it names.
        tool: String,
    },
}
