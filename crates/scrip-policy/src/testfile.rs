//! `scrip policy test`: a TOML file of requests and the decision each must
//! get. The format is documented in `docs/policy-tests.md`.

use std::collections::BTreeMap;

use scrip_config::Tool;
use scrip_token::{ActionName, ToolName, WorkloadIdentity};
use serde::Deserialize;

use crate::{DecisionRequest, PolicyEngine, RequestContext, Stage};

/// Why a test file could not be run.
#[derive(Debug, thiserror::Error)]
pub enum TestError {
    /// Not valid TOML for a test file.
    #[error("test file is invalid: {0}")]
    Parse(String),
    /// A case is inconsistent.
    #[error("case `{case}`: {message}")]
    Case {
        /// The case name.
        case: String,
        /// What is wrong.
        message: String,
    },
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    tools: Vec<Tool>,
    #[serde(default, rename = "case")]
    cases: Vec<Case>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Agent {
    issuer: String,
    subject: String,
    #[serde(default)]
    claims: toml::Table,
    /// An identity from scrip's local attestation (its claims must hold a
    /// `scrip_attestation` table).
    #[serde(default)]
    local: bool,
    /// The `kind` its issuer is declared with in scrip's configuration;
    /// unset, the claims' shape decides, as for an issuer without one.
    #[serde(default)]
    kind: Option<scrip_config::IssuerKind>,
    /// The `trust_domain` of a SPIFFE issuer.
    #[serde(default)]
    trust_domain: Option<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
enum Expect {
    Allow,
    Deny,
}

#[derive(Debug, Deserialize, Clone, Copy, Default)]
#[serde(rename_all = "lowercase")]
enum CaseStage {
    Task,
    #[default]
    Token,
    Proxy,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Case {
    name: String,
    agent: Agent,
    tool: ToolName,
    action: ActionName,
    environment: String,
    #[serde(default)]
    purpose: String,
    #[serde(default)]
    stage: CaseStage,
    #[serde(default)]
    depth: u32,
    #[serde(default)]
    chain: Vec<String>,
    #[serde(default)]
    chain_issuers: Vec<String>,
    #[serde(default)]
    approved: bool,
    #[serde(default)]
    now: Option<u64>,
    #[serde(default)]
    method: Option<String>,
    #[serde(default)]
    path: Option<String>,
    #[serde(default)]
    dpop_jkt: Option<String>,
    expect: Expect,
}

/// The outcome of one case.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CaseResult {
    /// The case name.
    pub name: String,
    /// Whether the decision was the expected one.
    pub passed: bool,
    /// Whether the request was allowed.
    pub allowed: bool,
    /// The deciding policies and reason.
    pub reason: String,
}

/// Runs every case of a test file. `tools` are the configured tools; the
/// file's own `[[tools]]` add to them, and a tool named by a case but
/// defined nowhere gets the resource `urn:scrip:tool:<name>`.
///
/// # Errors
/// [`TestError`] when the file does not parse or a case is inconsistent.
pub fn run_test_file(
    engine: &PolicyEngine,
    text: &str,
    tools: &[Tool],
) -> Result<Vec<CaseResult>, TestError> {
    let file: File = toml::from_str(text).map_err(|e| TestError::Parse(e.message().to_owned()))?;
    if file.cases.is_empty() {
        return Err(TestError::Parse("the file has no [[case]]".into()));
    }
    let mut all_tools: BTreeMap<String, Tool> = tools
        .iter()
        .map(|t| (t.name.to_string(), t.clone()))
        .collect();
    for t in file.tools {
        all_tools.insert(t.name.to_string(), t);
    }
    let mut results = Vec::new();
    for case in file.cases {
        let err = |message: String| TestError::Case {
            case: case.name.clone(),
            message,
        };
        let mut claims: serde_json::Map<String, serde_json::Value> =
            serde_json::to_value(&case.agent.claims)
                .ok()
                .and_then(|v| v.as_object().cloned())
                .unwrap_or_default();
        claims.insert("sub".into(), case.agent.subject.clone().into());
        claims.insert("iss".into(), case.agent.issuer.clone().into());
        if case.agent.local && (case.agent.kind.is_some() || case.agent.trust_domain.is_some()) {
            return Err(err(
                "a local agent has no issuer `kind` or `trust_domain`: those are for federated issuers"
                    .into(),
            ));
        }
        let agent = if case.agent.local {
            WorkloadIdentity::from_local_claims(&case.agent.issuer, &claims).ok_or_else(|| {
                err(
                    "a local agent needs a subject and a `scrip_attestation` table in its claims"
                        .into(),
                )
            })?
        } else {
            WorkloadIdentity::from_claims_of(
                &case.agent.issuer,
                &claims,
                case.agent.kind.map(scrip_config::IssuerKind::identity_kind),
                case.agent.trust_domain.as_deref(),
            )
            .map_err(|e| err(format!("agent: {e}")))?
        };
        let tool = all_tools
            .get(case.tool.as_str())
            .cloned()
            .unwrap_or_else(|| Tool {
                name: case.tool.clone(),
                resource: format!("urn:scrip:tool:{}", case.tool),
                actions: vec![case.action.clone()],
                labels: BTreeMap::new(),
                introspectors: Vec::new(),
            });
        if !tool.actions.contains(&case.action) {
            return Err(err(format!(
                "tool `{}` has no action `{}`",
                tool.name, case.action
            )));
        }
        let context = RequestContext {
            stage: match case.stage {
                CaseStage::Task => Stage::Task,
                CaseStage::Token => Stage::Token,
                CaseStage::Proxy => Stage::Proxy,
            },
            purpose: case.purpose,
            environment: case.environment,
            delegation_depth: case.depth,
            delegation_chain: case.chain,
            delegation_issuers: case.chain_issuers,
            now: case.now.unwrap_or_else(now),
            approved: case.approved,
            method: case.method,
            path: case.path,
            dpop_jkt: case.dpop_jkt,
        };
        let decision = engine.decide(&DecisionRequest {
            agent: &agent,
            action: &case.action,
            tool: &tool,
            context: &context,
        });
        results.push(CaseResult {
            name: case.name,
            passed: decision.allowed == (case.expect == Expect::Allow),
            allowed: decision.allowed,
            reason: decision.reason,
        });
    }
    Ok(results)
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::run_test_file;
    use crate::PolicyEngine;

    /// A case's `dpop_jkt` is `context.dpop_jkt`, as a bound token's.
    #[test]
    fn a_case_may_stand_for_a_bound_token() {
        let policies = r#"
@id("all")
permit (principal, action, resource);
@id("bound-only")
forbid (principal, action, resource) unless { context has dpop_jkt };
"#;
        let engine = PolicyEngine::from_sources(None, &[("p.cedar".into(), policies.into())])
            .expect("the policies load");
        let file = r#"
[[tools]]
name = "github"
resource = "https://api.github.com"
actions = ["read"]

[[case]]
name = "bound"
agent = { issuer = "https://k8s.example", subject = "a" }
tool = "github"
action = "read"
environment = "dev"
dpop_jkt = "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
expect = "allow"

[[case]]
name = "bearer"
agent = { issuer = "https://k8s.example", subject = "a" }
tool = "github"
action = "read"
environment = "dev"
expect = "deny"
"#;
        let results = run_test_file(&engine, file, &[]).expect("the file runs");
        let seen: Vec<(&str, bool, bool)> = results
            .iter()
            .map(|r| (r.name.as_str(), r.allowed, r.passed))
            .collect();
        assert_eq!(seen, [("bound", true, true), ("bearer", false, true)]);
    }

    /// A case's `chain_issuers` is `context.delegation_issuers`, the
    /// issuers of the sub-agents in `chain`.
    #[test]
    fn a_case_may_name_its_sub_agents_issuers() {
        let policies = r#"
@id("all")
permit (principal, action, resource);
@id("issuer-compromised")
forbid (principal, action, resource)
  when { context.delegation_issuers.contains("https://bad.example") };
"#;
        let engine = PolicyEngine::from_sources(None, &[("p.cedar".into(), policies.into())])
            .expect("the policies load");
        let file = r#"
[[tools]]
name = "github"
resource = "https://api.github.com"
actions = ["read"]

[[case]]
name = "sub-agent of the compromised issuer"
agent = { issuer = "https://k8s.example", subject = "a" }
tool = "github"
action = "read"
environment = "dev"
depth = 1
chain = ["b"]
chain_issuers = ["https://bad.example"]
expect = "deny"

[[case]]
name = "the same subject elsewhere"
agent = { issuer = "https://k8s.example", subject = "a" }
tool = "github"
action = "read"
environment = "dev"
depth = 1
chain = ["b"]
chain_issuers = ["https://k8s.example"]
expect = "allow"
"#;
        let results = run_test_file(&engine, file, &[]).expect("the file runs");
        let seen: Vec<(bool, bool)> = results.iter().map(|r| (r.allowed, r.passed)).collect();
        assert_eq!(seen, [(false, true), (true, true)]);
    }
}
