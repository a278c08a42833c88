//! Cedar decision time with the selection of policies by action and tool,
//! against evaluating every policy, at several policy counts.
//!
//! ```sh
//! cargo run --release -p scrip-policy --example bench_decide -- [ITERATIONS] [POLICY_DIR]
//! ```
//!
//! The set is the repository's `policies/` plus generated team policies up
//! to each total, in two shapes: `scoped`, where every generated policy
//! names one tool of 100 (`resource == Tool::"tool-N"`) and one action, and
//! `mixed`, where one in twenty names no tool. Each line gives the median,
//! the 99th percentile and the mean of one decision, measured one at a time
//! on one thread, for an allowed request (`acme/web` reading `github` in
//! `dev`) and a denied one (a Kubernetes agent writing `tool-7` without a
//! ticket).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stdout,
    reason = "a benchmark program"
)]

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Instant;

use scrip_config::Tool;
use scrip_policy::{Decision, DecisionRequest, PolicyEngine, RequestContext, Stage};
use scrip_token::{ActionName, ToolName, WorkloadIdentity};

fn filler(i: usize, mixed: bool) -> String {
    let tool = i % 100;
    match i % 20 {
        19 if mixed => format!(
            "@id(\"fill-{i}\")\npermit (principal, action == Action::\"read\", resource)\nwhen {{ principal has namespace && principal.namespace == \"ns-{i}\" }};\n"
        ),
        n if n % 3 == 0 => format!(
            "@id(\"fill-{i}\")\npermit (principal, action == Action::\"read\", resource == Tool::\"tool-{tool}\")\nwhen {{ principal has repository && principal.repository like \"team-{i}/*\" && context.environment == \"staging\" }};\n"
        ),
        n if n % 3 == 1 => format!(
            "@id(\"fill-{i}\")\nforbid (principal, action in [Action::\"write\", Action::\"delete\"], resource == Tool::\"tool-{tool}\")\nwhen {{ context.environment == \"freeze-{i}\" }};\n"
        ),
        _ => format!(
            "@id(\"fill-{i}\")\npermit (principal, action == Action::\"write\", resource == Tool::\"tool-{tool}\")\nwhen {{ principal has namespace && principal.namespace == \"team-{i}\" && context has ticket }};\n"
        ),
    }
}

fn identity(claims: serde_json::Value) -> WorkloadIdentity {
    let claims = claims.as_object().cloned().unwrap_or_default();
    WorkloadIdentity::from_claims("https://idp.bench", &claims).expect("identity")
}

fn tool(name: &str) -> Tool {
    Tool {
        name: ToolName::parse(name).expect("tool name"),
        resource: format!("https://{name}.example"),
        actions: ["read", "write"]
            .iter()
            .map(|a| ActionName::parse(a).expect("action"))
            .collect(),
        labels: BTreeMap::new(),
        introspectors: Vec::new(),
    }
}

/// Median, 99th percentile and mean of `iterations` decisions, in µs.
fn time(iterations: usize, mut decide: impl FnMut() -> Decision) -> (f64, f64, f64, bool) {
    let mut allowed = false;
    for _ in 0..iterations / 10 {
        allowed = decide().allowed;
    }
    let mut samples = Vec::with_capacity(iterations);
    for _ in 0..iterations {
        let start = Instant::now();
        let d = decide();
        samples.push(start.elapsed().as_secs_f64() * 1e6);
        allowed = d.allowed;
    }
    samples.sort_by(f64::total_cmp);
    let at = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    let mean = samples.iter().sum::<f64>() / samples.len() as f64;
    (at(0.5), at(0.99), mean, allowed)
}

fn main() {
    let mut args = std::env::args().skip(1);
    let iterations: usize = args
        .next()
        .map_or(20_000, |a| a.parse().expect("ITERATIONS"));
    let dir = args
        .next()
        .map_or_else(|| PathBuf::from("policies"), PathBuf::from);
    let mut schema = None;
    let mut repository = Vec::new();
    let mut entries: Vec<_> = std::fs::read_dir(&dir)
        .expect("policy dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .collect();
    entries.sort();
    for path in entries {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        match path.extension().and_then(|e| e.to_str()) {
            Some("cedar") => repository.push((name, std::fs::read_to_string(&path).unwrap())),
            Some("cedarschema") => schema = Some((name, std::fs::read_to_string(&path).unwrap())),
            _ => {}
        }
    }
    let base = PolicyEngine::from_sources(
        schema.as_ref().map(|(n, t)| (n.as_str(), t.as_str())),
        &repository,
    )
    .expect("repository policies")
    .len();

    let coder = identity(serde_json::json!({
        "sub": "repo:acme/web:ref:refs/heads/main",
        "repository": "acme/web", "repository_owner": "acme", "workflow": "ci",
    }));
    let pod = identity(serde_json::json!({
        "sub": "system:serviceaccount:payments:agent",
        "kubernetes.io": {"namespace": "payments", "serviceaccount": {"name": "agent"}},
    }));
    let (github, tool7) = (tool("github"), tool("tool-7"));
    let (read, write) = (
        ActionName::parse("read").unwrap(),
        ActionName::parse("write").unwrap(),
    );
    let context = |environment: &str| RequestContext {
        stage: Stage::Token,
        purpose: "refactor".into(),
        environment: environment.into(),
        delegation_depth: 0,
        delegation_chain: Vec::new(),
        delegation_issuers: Vec::new(),
        now: 1_800_000_000,
        approved: false,
        method: None,
        path: None,
        dpop_jkt: None,
    };
    let (dev, prod) = (context("dev"), context("prod"));
    let allow = DecisionRequest {
        agent: &coder,
        action: &read,
        tool: &github,
        context: &dev,
    };
    let deny = DecisionRequest {
        agent: &pod,
        action: &write,
        tool: &tool7,
        context: &prod,
    };

    println!("policies  shape   request  evaluated  p50_us  p99_us  mean_us  decision");
    for (total, mixed) in [
        (20_usize, false),
        (100, false),
        (1_000, false),
        (1_000, true),
        (5_000, false),
    ] {
        let mut files = repository.clone();
        let fillers: String = (0..total.saturating_sub(base))
            .map(|i| filler(i, mixed))
            .collect();
        files.push(("fillers.cedar".into(), fillers));
        let engine = PolicyEngine::from_sources(
            schema.as_ref().map(|(n, t)| (n.as_str(), t.as_str())),
            &files,
        )
        .expect("generated policies");
        let shape = if mixed { "mixed" } else { "scoped" };
        // Evaluating every policy of a large set is slow: fewer rounds.
        let all_iterations = (iterations * 20 / total.max(20)).max(200);
        for (label, req) in [("allow", &allow), ("deny", &deny)] {
            let selected = time(iterations, || engine.decide(req));
            let all = time(all_iterations, || engine.decide_evaluating_all(req));
            assert_eq!(selected.3, all.3, "selection changed a decision");
            for (how, (p50, p99, mean, allowed)) in [("selected", selected), ("all", all)] {
                println!(
                    "{:>8}  {shape:<6}  {label:<7}  {how:<9}  {p50:>6.1}  {p99:>6.1}  {mean:>7.1}  {}",
                    engine.len(),
                    if allowed { "allow" } else { "deny" }
                );
            }
        }
    }
}
