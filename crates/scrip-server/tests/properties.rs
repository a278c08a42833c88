//! A property test over real HTTP exchanges: whatever a task holds and
//! whatever an agent asks for, an access token never carries more than its
//! task's grants at its tool, never outlives its task, and dies with it.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::collections::{BTreeMap, BTreeSet};

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{TestCaseError, TestRunner};
use serde_json::json;

/// Every grant the test tools offer.
const GRANTS: &[(&str, &str)] = &[
    ("github", "read"),
    ("github", "write"),
    ("github", "delete"),
    ("jira", "read"),
    ("jira", "write"),
    ("deploy", "read"),
    ("deploy", "execute"),
    ("deploy", "delete"),
];

/// Tools asked for, including one that does not exist.
const TOOLS: &[&str] = &["github", "jira", "deploy", "slack"];

/// Actions asked for, including ones no tool has.
const ACTIONS: &[&str] = &["read", "write", "delete", "execute", "admin"];

/// One access-token request: tool, actions (`None`: omit `scope`).
#[derive(Debug, Clone)]
struct Ask {
    tool: &'static str,
    actions: Option<Vec<&'static str>>,
}

fn ask() -> impl Strategy<Value = Ask> {
    (
        proptest::sample::select(TOOLS),
        proptest::option::weighted(0.8, proptest::sample::subsequence(ACTIONS, 1..=3)),
    )
        .prop_map(|(tool, actions)| Ask { tool, actions })
}

fn case() -> impl Strategy<Value = (Vec<(&'static str, &'static str)>, Vec<Ask>)> {
    (
        proptest::sample::subsequence(GRANTS, 1..=GRANTS.len()),
        proptest::collection::vec(ask(), 1..10),
    )
}

fn set(s: &str) -> BTreeSet<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

/// The actions a space-separated grant list holds, per tool.
fn by_tool(scope: &str) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for g in scope.split_whitespace() {
        let (tool, action) = g.split_once(':').unwrap();
        out.entry(tool.to_owned())
            .or_default()
            .insert(action.to_owned());
    }
    out
}

async fn run_case(
    s: &TestServer,
    grants: &[(&'static str, &'static str)],
    asks: &[Ask],
) -> Result<(), TestCaseError> {
    let identity = s.k8s.kubernetes("agents", "coder");
    let requested: Vec<String> = grants.iter().map(|(t, a)| format!("{t}:{a}")).collect();
    let r = s
        .try_start_task(
            &identity,
            &requested.join(" "),
            "dev",
            "work on JIRA-7 across tools",
            None,
        )
        .await;
    prop_assert_eq!(r.status, 200, "start: {}", r.text);
    let task = r.body["access_token"].as_str().unwrap().to_owned();
    let (_, tc) = decode_parts(&task);
    let task_exp = tc["exp"].as_u64().unwrap();
    let txn = tc["txn"].clone();
    let task_scope = r.body["scope"].as_str().unwrap().to_owned();
    prop_assert!(
        set(&task_scope).is_subset(&requested.iter().cloned().collect()),
        "task scope {} beyond the request {:?}",
        task_scope,
        requested
    );
    let held = by_tool(&task_scope);

    let mut issued = Vec::new();
    for a in asks {
        let scope = a.actions.as_ref().map(|v| v.join(" "));
        let r = s.access_token(&task, a.tool, scope.as_deref()).await;
        let at_tool = held.get(a.tool).cloned().unwrap_or_default();
        if r.status == 200 {
            let token = r.body["access_token"].as_str().unwrap().to_owned();
            let (_, c) = decode_parts(&token);
            prop_assert_eq!(&c["aud"], &json!(a.tool), "{:?}", a);
            let got = set(c["scope"].as_str().unwrap());
            prop_assert!(!got.is_empty(), "empty scope for {:?}", a);
            prop_assert!(
                got.is_subset(&at_tool),
                "{:?}: scope {:?} beyond the task's {:?}",
                a,
                got,
                at_tool
            );
            if let Some(asked) = &a.actions {
                let asked: BTreeSet<String> = asked.iter().map(|s| (*s).to_owned()).collect();
                prop_assert!(got.is_subset(&asked), "{:?}: got {:?}", a, got);
            }
            prop_assert_eq!(&r.body["scope"], &c["scope"]);
            prop_assert!(
                c["exp"].as_u64().unwrap() <= task_exp,
                "exp {} after the task's {}",
                c["exp"],
                task_exp
            );
            prop_assert_eq!(&c["txn"], &txn);
            issued.push(token);
        } else {
            let code = r.body["error"].as_str().unwrap_or_default();
            prop_assert!(
                r.status == 400
                    && ["invalid_scope", "invalid_target", "access_denied"].contains(&code),
                "{:?}: unexpected failure {} {}",
                a,
                r.status,
                r.text
            );
        }
        // What must succeed does: a known tool, and every action asked held
        // (all held when scope is omitted), since policy allows it all in dev.
        let should_succeed = TOOLS[..3].contains(&a.tool)
            && !at_tool.is_empty()
            && a.actions
                .as_ref()
                .is_none_or(|v| v.iter().all(|x| at_tool.contains(*x)));
        prop_assert_eq!(
            r.status == 200,
            should_succeed,
            "{:?} with task scope {}: {}",
            a,
            task_scope,
            r.text
        );
    }

    let r = s.revoke(&task).await;
    prop_assert_eq!(r.status, 200, "revoke: {}", r.text);
    prop_assert_eq!(s.introspect(&task).await.body, json!({"active": false}));
    for token in &issued {
        let r = s.introspect(token).await;
        prop_assert_eq!(&r.body, &json!({"active": false}), "after revocation");
    }
    Ok(())
}

#[test]
fn access_tokens_stay_within_their_task() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let server = rt.block_on(TestServer::start());
    let mut runner = TestRunner::new(ProptestConfig::with_cases(24));
    let result = runner.run(&case(), |(grants, asks)| {
        rt.block_on(run_case(&server, &grants, &asks))
    });
    rt.block_on(server.stop());
    if let Err(e) = result {
        panic!("{e}");
    }
}
