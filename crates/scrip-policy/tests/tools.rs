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
        "permit (principal, action == Action::\"read\", resource == Tool::\"gitlab\");",
    ] {
        check(policy).unwrap_or_else(|e| panic!("{policy}: {e}"));
    }
}
