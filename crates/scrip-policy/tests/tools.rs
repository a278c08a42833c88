//! The configured tools against the policies: a `forbid` scoped to a tool
//! that is not configured (a misspelt name) is refused, since it would
//! never apply; a `permit` for one is harmless and loads.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use scrip_config::Tool;
use scrip_policy::{PolicyEngine, PolicyError};
use scrip_token::{ActionName, ToolName};

fn github() -> Tool {
    Tool {
        name: ToolName::parse("github").unwrap(),
        resource: "https://api.github.com".into(),
        actions: ["read", "delete"]
            .iter()
            .map(|a| ActionName::parse(a).unwrap())
            .collect(),
        labels: std::collections::BTreeMap::new(),
        introspectors: Vec::new(),
    }
}

fn check(policy: &str) -> Result<(), PolicyError> {
    let engine =
        PolicyEngine::from_sources(None, &[("p.cedar".to_owned(), policy.to_owned())]).unwrap();
    engine.check_tools(&[github()])
}

#[test]
fn a_forbid_at_a_tool_that_is_not_configured_is_refused() {
    for scope in [
        "resource == Tool::\"githib\"",
        "resource in Tool::\"githib\"",
        "resource is Tool in Tool::\"githib\"",
    ] {
        let policy = format!(
            "@id(\"no-delete\")\nforbid (principal, action == Action::\"delete\", {scope});"
        );
        let e = check(&policy).unwrap_err();
        assert!(
            matches!(&e, PolicyError::UnknownTool { policy, tool } if policy == "no-delete" && tool == "githib"),
            "{scope}: {e:?}"
        );
        let message = e.to_string();
        assert!(
            message.contains("`no-delete`") && message.contains("not configured"),
            "{message}"
        );
    }
}

#[test]
fn forbids_at_configured_or_any_tools_and_permits_anywhere_load() {
    for policy in [
        "forbid (principal, action == Action::\"delete\", resource == Tool::\"github\");",
        "forbid (principal, action == Action::\"delete\", resource in Tool::\"github\");",
        "forbid (principal, action == Action::\"delete\", resource);",
        "forbid (principal, action == Action::\"delete\", resource is Tool);",
        "forbid (principal, action == Action::\"delete\", resource is Tool in Tool::\"github\");",
        "permit (principal, action == Action::\"read\", resource == Tool::\"gitlab\");",
    ] {
        check(policy).unwrap_or_else(|e| panic!("{policy}: {e}"));
    }
}

/// A schema of the built-in entity types with `actions` (Cedar text).
fn schema_with(actions: &str) -> String {
    format!(
        "entity Agent {{ issuer: String, subject: String, kind: String }} tags String;\n\
         entity Tool {{ name: String, resource: String }} tags String;\n\
         entity Other;\n\
         type Request = {{ stage: String, purpose: String, ticket?: String, environment: String, delegation_depth: Long, delegation_chain: Set<String>, now: Long, approved: Bool, method?: String, path?: String }};\n\
         {actions}\n"
    )
}

/// Every tool action must be one an agent can be allowed at a tool: not
/// missing from the schema, not a group of actions, not an action of other
/// entity types. Each of those would deny every request for it.
#[test]
fn a_tool_action_that_no_request_can_name_is_refused() {
    let applies = "appliesTo { principal: [Agent], resource: [Tool], context: Request }";
    for (actions, ok) in [
        (format!("action read, delete {applies};"), true),
        (format!("action read {applies};"), false),
        (
            format!("action delete; action read in [delete] {applies};"),
            false,
        ),
        (
            format!(
                "action read {applies}; action delete appliesTo {{ principal: [Other], resource: [Tool], context: Request }};"
            ),
            false,
        ),
        (
            format!(
                "action read {applies}; action delete appliesTo {{ principal: [Agent], resource: [Other], context: Request }};"
            ),
            false,
        ),
    ] {
        let schema = schema_with(&actions);
        let engine = PolicyEngine::from_sources(Some(("s.cedarschema", &schema)), &[]).unwrap();
        match engine.check_tools(&[github()]) {
            Ok(()) => assert!(ok, "{actions}: accepted"),
            Err(e) => {
                assert!(
                    !ok && matches!(&e, PolicyError::UndeclaredAction { tool, action } if tool == "github" && action == "delete"),
                    "{actions}: {e:?}"
                );
                assert!(e.to_string().contains("appliesTo Agent and Tool"), "{e}");
            }
        }
    }
}
