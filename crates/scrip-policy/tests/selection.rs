//! The selection of policies by action and tool changes no decision: for a
//! generated policy set with every kind of scope (actions `==`, `in` a list,
//! `in` an action group, unconstrained; tools `==`, `in`, `is`,
//! unconstrained, named but not configured), permits, forbids, conditions
//! that error, and conditions that test agent attributes with `has` (leading
//! the condition, after something else, in an `unless`, before an error),
//! `decide` agrees with evaluating every policy on every request, for
//! agents with and without those attributes.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

use std::collections::BTreeMap;

use scrip_config::Tool;
use scrip_policy::{DEFAULT_SCHEMA, DecisionRequest, PolicyEngine, RequestContext, Stage};
use scrip_token::{ActionName, ToolName, WorkloadIdentity};

/// The default schema with an action group: `read` and `list` are in `reads`.
fn schema() -> String {
    let actions = "action read, write, delete, execute appliesTo {";
    assert!(DEFAULT_SCHEMA.contains(actions), "default schema changed");
    DEFAULT_SCHEMA.replace(
        actions,
        "action reads;\naction read, list in [reads] appliesTo {\n  principal: [Agent],\n  resource: [Tool],\n  context: Request,\n};\naction write, delete, execute appliesTo {",
    )
}

/// A small deterministic generator (64-bit LCG), so a failure reproduces.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        usize::try_from(self.0 >> 33).unwrap_or(0) % n
    }
}

const ACTIONS: [&str; 5] = ["read", "list", "write", "delete", "execute"];
const AGENTS: usize = 8;
const TOOLS: usize = 6; // tools t0..t5 are configured; policies also name t6, t7

fn policy(i: usize, rng: &mut Rng) -> String {
    let forbid = rng.below(10) == 0;
    let effect = if forbid { "forbid" } else { "permit" };
    let action = match rng.below(5) {
        0 => "action".to_owned(),
        1 => format!("action == Action::\"{}\"", ACTIONS[rng.below(5)]),
        2 => "action in Action::\"reads\"".to_owned(),
        3 => format!(
            "action in [Action::\"{}\", Action::\"{}\"]",
            ACTIONS[rng.below(5)],
            ACTIONS[rng.below(5)]
        ),
        _ => format!(
            "action in [Action::\"reads\", Action::\"{}\"]",
            ACTIONS[rng.below(5)]
        ),
    };
    let resource = match rng.below(6) {
        0 => "resource".to_owned(),
        1 | 2 => format!("resource == Tool::\"t{}\"", rng.below(TOOLS + 2)),
        3 => format!("resource in Tool::\"t{}\"", rng.below(TOOLS + 2)),
        4 => format!("resource is Tool in Tool::\"t{}\"", rng.below(TOOLS + 2)),
        _ => "resource is Tool".to_owned(),
    };
    // A forbid always has a narrow condition, or few requests would be allowed.
    let when = match if forbid {
        [1, 2, 6][rng.below(3)]
    } else {
        rng.below(11)
    } {
        0 => String::new(),
        1 => format!(" when {{ context.environment == \"env{}\" }}", rng.below(3)),
        2 => format!(
            " when {{ principal.subject == \"agent-{}\" }}",
            rng.below(4)
        ),
        3 => format!(
            " when {{ resource.hasTag(\"team\") && resource.getTag(\"team\") == \"team{}\" }}",
            rng.below(3)
        ),
        4 => " when { context.approved }".to_owned(),
        // Overflows, for two of the agents: Cedar skips the policy, scrip denies.
        5 => format!(
            " when {{ (principal.subject == \"agent-1\" || principal.subject == \"agent-{}\") && context.now * 10000000000 > 0 }}",
            1 + 2 * rng.below(2)
        ),
        6 => format!(
            " when {{ principal has namespace && principal.namespace == \"ns{}\" }}",
            rng.below(2)
        ),
        // Errors for the Kubernetes agents with a pod, is false for the others.
        7 => " when { principal has namespace && principal has pod && context.now * 10000000000 > 0 }"
            .to_owned(),
        // The test comes after the error: it must not leave the policy out.
        8 => " when { principal.subject == \"agent-4\" && context.now * 10000000000 > 0 && principal has repository }"
            .to_owned(),
        // True for the agents without the attribute.
        9 => " unless { principal has namespace }".to_owned(),
        _ => format!(
            " when {{ principal has repository }} when {{ principal.repository like \"team{}/*\" }}",
            rng.below(2)
        ),
    };
    format!("@id(\"p{i}\")\n{effect} (principal, {action}, {resource}){when};\n")
}

/// Agent `n`: without optional attributes (n % 3 = 0), a Kubernetes one
/// with a `namespace` and for odd n a `pod` (n % 3 = 1), a GitHub Actions
/// one with a `repository` (n % 3 = 2).
fn agent(n: usize) -> WorkloadIdentity {
    let mut claims = serde_json::Map::new();
    claims.insert("sub".into(), format!("agent-{n}").into());
    match n % 3 {
        1 => {
            let mut k8s = serde_json::json!({"namespace": format!("ns{}", n % 2)});
            if n % 2 == 1 {
                k8s["pod"] = serde_json::json!({"name": format!("pod-{n}")});
            }
            claims.insert("kubernetes.io".into(), k8s);
        }
        2 => {
            claims.insert("repository".into(), format!("team{}/r{n}", n % 2).into());
            claims.insert("workflow".into(), "ci".into());
        }
        _ => {}
    }
    WorkloadIdentity::from_claims("https://idp.test", &claims).expect("identity")
}

fn tool(n: usize) -> Tool {
    let mut labels = BTreeMap::new();
    if n % 3 != 2 {
        labels.insert("team".to_owned(), format!("team{}", n % 3));
    }
    Tool {
        name: ToolName::parse(&format!("t{n}")).expect("tool name"),
        resource: format!("urn:test:t{n}"),
        actions: ACTIONS
            .iter()
            .map(|a| ActionName::parse(a).expect("action"))
            .collect(),
        labels,
        introspectors: Vec::new(),
    }
}

#[test]
fn selection_agrees_with_evaluating_every_policy() {
    let mut rng = Rng(0x5eed);
    let text: String = (0..240).map(|i| policy(i, &mut rng)).collect();
    let schema = schema();
    let engine = PolicyEngine::from_sources(
        Some(("test.cedarschema", &schema)),
        &[("generated.cedar".to_owned(), text)],
    )
    .expect("generated policies validate");
    assert_eq!(engine.len(), 240);

    let agents: Vec<_> = (0..AGENTS).map(agent).collect();
    let tools: Vec<_> = (0..TOOLS).map(tool).collect();
    let actions: Vec<_> = ACTIONS
        .iter()
        .chain(&["reads"])
        .map(|a| ActionName::parse(a).expect("action"))
        .collect();
    let (mut compared, mut allowed, mut forbidden, mut errors) = (0, 0, 0, 0);
    for agent in &agents {
        for tool in &tools {
            for action in &actions {
                for env in 0..3 {
                    for approved in [false, true] {
                        let context = RequestContext {
                            stage: Stage::Token,
                            purpose: "fix JIRA-1".into(),
                            environment: format!("env{env}"),
                            delegation_depth: 0,
                            delegation_chain: Vec::new(),
                            delegation_issuers: Vec::new(),
                            now: 1_800_000_000,
                            approved,
                            method: None,
                            path: None,
                            dpop_jkt: None,
                        };
                        let req = DecisionRequest {
                            agent,
                            action,
                            tool,
                            context: &context,
                        };
                        let selected = engine.decide(&req);
                        let all = engine.decide_evaluating_all(&req);
                        let error = |d: &scrip_policy::Decision| {
                            d.reason.starts_with("policy evaluation error")
                        };
                        assert_eq!(
                            (selected.allowed, error(&selected)),
                            (all.allowed, error(&all)),
                            "{} {action} t{} env{env} approved={approved}: {} / {}",
                            agent.subject,
                            tool.name,
                            selected.reason,
                            all.reason
                        );
                        if !error(&all) {
                            assert_eq!(selected.policies, all.policies);
                        }
                        compared += 1;
                        if error(&all) {
                            errors += 1;
                        } else if all.allowed {
                            allowed += 1;
                        } else if !all.policies.is_empty() {
                            forbidden += 1;
                        }
                    }
                }
            }
        }
    }
    // The generated set exercises every outcome, or the comparison says little.
    assert_eq!(compared, AGENTS * TOOLS * 6 * 3 * 2);
    assert!(
        allowed > 50 && forbidden > 50 && errors > 50,
        "allowed {allowed}, forbidden {forbidden}, errors {errors}"
    );
}
