//! The engine keeps the schema-checked entities of each agent at each tool:
//! a kept entry is only ever used for exactly the same identity and the
//! same tool entity. Agents that differ in one claim, and a tool whose
//! labels changed under the same name, are decided on their own entities,
//! in any order of requests.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

use std::collections::BTreeMap;

use scrip_config::Tool;
use scrip_policy::{DecisionRequest, PolicyEngine, RequestContext, Stage};
use scrip_token::{ActionName, ToolName, WorkloadIdentity};

const POLICIES: &str = r#"
@id("main-branch")
permit (principal, action == Action::"read", resource == Tool::"github")
when { principal.hasTag("ref") && principal.getTag("ref") == "refs/heads/main" };

@id("prod-tools-write")
permit (principal, action == Action::"write", resource)
when { resource.hasTag("tier") && resource.getTag("tier") == "prod" };
"#;

fn agent(git_ref: &str) -> WorkloadIdentity {
    let mut claims = serde_json::Map::new();
    claims.insert("sub".into(), "repo:acme/app".into());
    claims.insert("ref".into(), git_ref.into());
    WorkloadIdentity::from_claims("https://token.actions.example", &claims).expect("identity")
}

fn tool(tier: &str) -> Tool {
    Tool {
        name: ToolName::parse("github").unwrap(),
        resource: "https://api.github.com".into(),
        actions: vec![
            ActionName::parse("read").unwrap(),
            ActionName::parse("write").unwrap(),
        ],
        labels: BTreeMap::from([("tier".to_owned(), tier.to_owned())]),
        introspectors: Vec::new(),
    }
}

fn allowed(engine: &PolicyEngine, agent: &WorkloadIdentity, tool: &Tool, action: &str) -> bool {
    let context = RequestContext {
        stage: Stage::Token,
        purpose: "fix JIRA-1".into(),
        environment: "dev".into(),
        delegation_depth: 0,
        delegation_chain: Vec::new(),
        delegation_issuers: Vec::new(),
        now: 1_800_000_000,
        approved: false,
        method: None,
        path: None,
        dpop_jkt: None,
    };
    let action = ActionName::parse(action).unwrap();
    let req = DecisionRequest {
        agent,
        action: &action,
        tool,
        context: &context,
    };
    let d = engine.decide(&req);
    assert_eq!(d, engine.decide_evaluating_all(&req), "{req:?}");
    d.allowed
}

#[test]
fn kept_entities_never_decide_for_another_agent_or_tool() {
    let engine = PolicyEngine::from_sources(None, &[("p.cedar".into(), POLICIES.into())]).unwrap();
    let main = agent("refs/heads/main");
    let branch = agent("refs/heads/attacker");
    assert_eq!(
        main.subject, branch.subject,
        "same subject, one claim apart"
    );
    let prod = tool("prod");
    let dev = tool("dev");
    for _ in 0..3 {
        assert!(allowed(&engine, &main, &prod, "read"));
        assert!(!allowed(&engine, &branch, &prod, "read"));
        assert!(allowed(&engine, &main, &prod, "write"));
        // The same tool name with other labels: its own entity.
        assert!(!allowed(&engine, &main, &dev, "write"));
        assert!(!allowed(&engine, &branch, &dev, "write"));
        assert!(allowed(&engine, &branch, &prod, "write"));
    }
}

#[test]
fn a_full_cache_still_decides_right() {
    let engine = PolicyEngine::from_sources(None, &[("p.cedar".into(), POLICIES.into())]).unwrap();
    let prod = tool("prod");
    // More distinct identities than the engine keeps.
    for i in 0..5000 {
        let a = agent(&format!("refs/heads/b{i}"));
        assert!(!allowed(&engine, &a, &prod, "read"));
    }
    assert!(allowed(&engine, &agent("refs/heads/main"), &prod, "read"));
}
