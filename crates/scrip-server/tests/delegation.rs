//! Delegation to sub-agents over HTTP (SPEC §3, issue 5): the `act` chain,
//! attenuation whatever the policy says, `may_act`, bad input, and ending a
//! parent ends its descendants.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::collections::BTreeSet;

use common::*;
use serde_json::{Value, json};

/// The agent that starts the root tasks.
const AGENT: &str = "system:serviceaccount:agents:coder";
/// The first sub-agent (a SPIFFE workload).
const ACTOR1: &str = "spiffe://acme.example/reviewer";
/// The second sub-agent (a GitHub Actions workflow).
const ACTOR2: &str = "repo:acme/helper:ref:refs/heads/main";

fn actor1(s: &TestServer) -> String {
    s.spiffe.spiffe("acme.example", "/reviewer")
}

fn actor2(s: &TestServer) -> String {
    s.github.github("acme/helper")
}

/// Starts a task with arbitrary `request_details`.
async fn start(s: &TestServer, identity: &str, scope: &str, details: &Value) -> Reply {
    let details = details.to_string();
    s.post_form(
        "/token",
        &[
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", identity),
            ("subject_token_type", JWT),
            ("requested_token_type", TXN),
            ("scope", scope),
            ("request_details", &details),
        ],
    )
    .await
}

/// Starts the root task `coder` in `dev`; panics unless it succeeds.
async fn root(s: &TestServer, scope: &str, ttl: Option<u64>) -> String {
    let identity = s.k8s.kubernetes("agents", "coder");
    let r = s
        .try_start_task(&identity, scope, "dev", "fix JIRA-1 flaky build", ttl)
        .await;
    assert_eq!(r.status, 200, "start: {}", r.text);
    token(&r)
}

/// Delegates `parent` to `actor`.
async fn delegate(
    s: &TestServer,
    parent: &str,
    actor: &str,
    scope: Option<&str>,
    details: Option<&Value>,
) -> Reply {
    s.try_delegate(parent, actor, scope, details).await
}

/// Delegates; panics unless it succeeds; returns the child task token.
async fn child_of(s: &TestServer, parent: &str, actor: &str, scope: Option<&str>) -> String {
    let r = delegate(s, parent, actor, scope, None).await;
    assert_eq!(r.status, 200, "delegate: {}", r.text);
    token(&r)
}

fn token(r: &Reply) -> String {
    r.body["access_token"].as_str().unwrap().to_owned()
}

fn claims(token: &str) -> Value {
    decode_parts(token).1
}

fn set(s: &str) -> BTreeSet<&str> {
    s.split_whitespace().collect()
}

/// An access token from `task` at `tool`; panics unless it succeeds.
async fn access(s: &TestServer, task: &str, tool: &str, scope: Option<&str>) -> String {
    let r = s.access_token(task, tool, scope).await;
    assert_eq!(r.status, 200, "access token: {}", r.text);
    token(&r)
}

fn act1() -> Value {
    json!({"sub": ACTOR1, "iss": SPIFFE_ISSUER})
}

fn act21() -> Value {
    json!({"sub": ACTOR2, "iss": GITHUB_ISSUER, "act": act1()})
}

#[tokio::test]
async fn child_and_grandchild_tokens_carry_the_act_chain() {
    let s = TestServer::start().await;
    let parent = root(&s, "github:read github:write jira:read", Some(100)).await;
    let pc = claims(&parent);

    let r = delegate(
        &s,
        &parent,
        &actor1(&s),
        Some("github:read jira:read"),
        Some(&json!({"ttl": 3600})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.headers["cache-control"], "no-store");
    assert_eq!(r.body["issued_token_type"], TXN);
    assert_eq!(r.body["token_type"], "N_A");
    assert_eq!(r.body["scope"], "github:read jira:read");
    assert!(r.body["expires_in"].as_u64().unwrap() <= 100, "{}", r.text);
    let child = token(&r);
    let (ch, cc) = decode_parts(&child);
    assert_eq!(ch["typ"], "txntoken+jwt");
    assert_eq!(cc["sub"], AGENT);
    assert_eq!(cc["iss"], s.url);
    assert_eq!(cc["aud"], s.url);
    assert_eq!(cc["act"], act1());
    assert_eq!(cc["tctx"]["depth"], 1);
    assert_eq!(cc["tctx"]["parent"], pc["txn"]);
    assert_eq!(cc["tctx"]["environment"], "dev");
    assert_eq!(cc["tctx"]["purpose"], pc["tctx"]["purpose"]);
    assert_ne!(cc["txn"], pc["txn"]);
    assert!(set(cc["scope"].as_str().unwrap()).is_subset(&set(pc["scope"].as_str().unwrap())));
    assert!(
        cc["exp"].as_u64().unwrap() <= pc["exp"].as_u64().unwrap(),
        "child exp {} after the parent's {}",
        cc["exp"],
        pc["exp"]
    );

    let grandchild = child_of(&s, &child, &actor2(&s), Some("github:read")).await;
    let gc = claims(&grandchild);
    assert_eq!(gc["sub"], AGENT);
    assert_eq!(gc["act"], act21());
    assert_eq!(gc["tctx"]["depth"], 2);
    assert_eq!(gc["tctx"]["parent"], cc["txn"]);
    assert_eq!(gc["scope"], "github:read");
    assert!(gc["exp"].as_u64().unwrap() <= cc["exp"].as_u64().unwrap());

    // Access tokens minted from the child and the grandchild.
    let at = access(&s, &child, "jira", Some("read")).await;
    let ac = claims(&at);
    assert_eq!(ac["sub"], AGENT);
    assert_eq!(ac["aud"], "jira");
    assert_eq!(ac["act"], act1());
    assert_eq!(ac["client_id"], ACTOR1);
    assert_eq!(ac["txn"], cc["txn"]);
    assert!(ac["exp"].as_u64().unwrap() <= cc["exp"].as_u64().unwrap());
    let gat = access(&s, &grandchild, "github", None).await;
    let gac = claims(&gat);
    assert_eq!(gac["sub"], AGENT);
    assert_eq!(gac["act"], act21());
    assert_eq!(gac["client_id"], ACTOR2);
    assert_eq!(gac["scope"], "read");
    assert_eq!(gac["txn"], gc["txn"]);
    // The root's access tokens have no `act`.
    let rat = access(&s, &parent, "github", Some("read")).await;
    assert!(claims(&rat).get("act").is_none(), "{}", claims(&rat));
    assert_eq!(claims(&rat)["client_id"], AGENT);

    // Introspection shows `act`.
    // A task token's `client_id` is its current actor, as in its access
    // tokens.
    let r = s.introspect(&child).await;
    assert_eq!(r.body["active"], true, "{}", r.text);
    assert_eq!(r.body["act"], act1());
    assert_eq!(r.body["tctx"]["depth"], 1);
    assert_eq!(r.body["client_id"], ACTOR1);
    let r = s.introspect(&grandchild).await;
    assert_eq!(r.body["active"], true, "{}", r.text);
    assert_eq!(r.body["act"], act21());
    assert_eq!(r.body["client_id"], ACTOR2);
    let r = s.introspect(&parent).await;
    assert_eq!(r.body["client_id"], AGENT, "{}", r.text);
    let r = s.introspect(&at).await;
    assert_eq!(r.body["active"], true, "{}", r.text);
    assert_eq!(r.body["act"], act1());
    assert_eq!(r.body["client_id"], ACTOR1);
    let r = s.introspect(&gat).await;
    assert_eq!(r.body["active"], true, "{}", r.text);
    assert_eq!(r.body["act"], act21());
    assert_eq!(r.body["client_id"], ACTOR2);
    let r = s.introspect(&rat).await;
    assert_eq!(r.body["active"], true, "{}", r.text);
    assert!(r.body.get("act").is_none(), "{}", r.text);

    // A task token is active only to its agent and the sub-agents in its
    // chain (RFC 7662 §4: it is used at no resource server), each known by
    // issuer and subject.
    let active = |r: Reply| {
        assert_eq!(r.status, 200, "{}", r.text);
        r.body["active"] == json!(true)
    };
    assert!(active(s.introspect_as(&actor1(&s), &child).await));
    assert!(active(s.introspect_as(&actor1(&s), &grandchild).await));
    assert!(active(s.introspect_as(&actor2(&s), &grandchild).await));
    assert!(!active(s.introspect_as(&actor2(&s), &child).await));
    assert!(!active(s.introspect_as(&actor1(&s), &parent).await));
    let resource_server = s.k8s.kubernetes("resource-servers", "github-proxy");
    assert!(!active(s.introspect_as(&resource_server, &child).await));
    let agent_elsewhere = s.github.sign(&s.github.claims(AGENT));
    assert!(!active(s.introspect_as(&agent_elsewhere, &parent).await));
    let actor_elsewhere = s.k8s.sign(&s.k8s.claims(ACTOR1));
    assert!(!active(s.introspect_as(&actor_elsewhere, &child).await));

    // Each delegation's record names the sub-agent's identity, and a
    // revoked access token its chain.
    assert_eq!(s.revoke(&gat).await.status, 200);
    let audit = s.audit().await;
    let of = |event: &str, txn: &Value| {
        audit
            .iter()
            .find(|a| a.event == event && a.task_id.as_deref() == txn.as_str())
            .unwrap_or_else(|| panic!("no {event} of {txn}"))
    };
    let delegated = of("task.delegated", &cc["txn"]);
    assert_eq!(delegated.identity["kind"], "spiffe", "{delegated:?}");
    assert_eq!(delegated.identity["trust_domain"], "acme.example");
    let delegated = of("task.delegated", &gc["txn"]);
    assert_eq!(
        delegated.identity["kind"], "github_actions",
        "{delegated:?}"
    );
    assert_eq!(delegated.identity["repository"], "acme/helper");
    assert_eq!(delegated.identity["run_id"], "7312345678");
    let revoked = of("token.revoked", &gc["txn"]);
    assert_eq!(revoked.jti.as_deref(), gac["jti"].as_str());
    assert_eq!(revoked.chain, [ACTOR2, ACTOR1], "{revoked:?}");
    s.stop().await;
}

/// A child's deadline is its parent's at the latest, so both often expire
/// in the same sweep: each is recorded expired, and the sweep goes on.
#[tokio::test]
async fn a_parent_and_child_expiring_together_are_both_recorded() {
    let s = TestServer::start().await;
    // Whole seconds: 3 to 4 s left for the two delegations, on a loaded
    // machine.
    let parent = root(&s, "github:read", Some(4)).await;
    let child = child_of(&s, &parent, &actor1(&s), None).await;
    let grandchild = child_of(&s, &child, &actor2(&s), None).await;
    let exp = claims(&parent)["exp"].as_u64().unwrap();
    assert_eq!(claims(&grandchild)["exp"].as_u64().unwrap(), exp);
    let txns: Vec<String> = [&parent, &child, &grandchild]
        .iter()
        .map(|t| claims(t)["txn"].as_str().unwrap().to_owned())
        .collect();
    // A later task, due after them, is swept too.
    let later = root(&s, "github:read", Some(6)).await;
    let later_txn = claims(&later)["txn"].as_str().unwrap().to_owned();
    let start = std::time::Instant::now();
    loop {
        let audit = s.audit().await;
        let expired = |id: &str| {
            audit
                .iter()
                .any(|a| a.event == "task.expired" && a.task_id.as_deref() == Some(id))
        };
        if txns.iter().all(|t| expired(t)) && expired(&later_txn) {
            break;
        }
        assert!(
            start.elapsed() < std::time::Duration::from_secs(15),
            "not every task was recorded expired"
        );
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
    s.stop().await;
}

#[tokio::test]
async fn scope_defaults_to_the_parents_grants() {
    let s = TestServer::start().await;
    let parent = root(&s, "github:read jira:read", None).await;
    let r = delegate(&s, &parent, &actor1(&s), None, None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["scope"], "github:read jira:read");
    assert_eq!(claims(&token(&r))["scope"], "github:read jira:read");
    s.stop().await;
}

#[tokio::test]
async fn re_exchanges_never_drop_or_rewrite_the_act_chain() {
    let s = TestServer::start().await;
    let parent = root(&s, "github:read jira:read", None).await;
    let child = child_of(&s, &parent, &actor1(&s), None).await;
    let grandchild = child_of(&s, &child, &actor2(&s), None).await;
    let mut jtis = BTreeSet::new();
    for (tool, scope) in [
        ("github", Some("read")),
        ("github", None),
        ("jira", Some("read")),
        ("jira", None),
        ("github", Some("read")),
    ] {
        let at = access(&s, &grandchild, tool, scope).await;
        let c = claims(&at);
        assert_eq!(c["act"], act21(), "{tool} {scope:?}");
        assert_eq!(c["client_id"], ACTOR2);
        assert_eq!(c["sub"], AGENT);
        assert_eq!(c["aud"], tool);
        assert!(jtis.insert(c["jti"].as_str().unwrap().to_owned()));
        let r = s.introspect(&at).await;
        assert_eq!(r.body["act"], act21(), "{}", r.text);
    }
    // The grandchild token itself is unchanged by the exchanges.
    let r = s.introspect(&grandchild).await;
    assert_eq!(r.body["act"], act21(), "{}", r.text);
    // The child's tokens still carry only its own actor.
    let c = claims(&access(&s, &child, "github", Some("read")).await);
    assert_eq!(c["act"], act1());
    s.stop().await;
}

const PERMIT_ALL: &str = "@id(\"permit-everything\")\npermit (principal, action, resource);\n";

fn permissive(edit: Option<ConfigEdit>) -> Options {
    Options {
        extra_policies: vec![("permit-everything.cedar".into(), PERMIT_ALL.into())],
        edit,
        ..Options::default()
    }
}

#[tokio::test]
async fn a_child_never_gets_a_grant_its_parent_lacks_whatever_the_policy() {
    let s = TestServer::start_with(permissive(None)).await;
    // An agent that only the permissive policy lets in.
    let identity = s.github.github("other/bot");
    let r = s
        .try_start_task(
            &identity,
            "github:read jira:read",
            "dev",
            "JIRA-5 work",
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let parent = token(&r);
    for scope in [
        "github:read github:write",
        "github:write",
        "deploy:read",
        "jira:read jira:write",
        "github:admin",
    ] {
        let r = delegate(&s, &parent, &actor1(&s), Some(scope), None).await;
        r.assert_error(400, "invalid_scope");
        assert!(
            r.body["error_description"]
                .as_str()
                .unwrap()
                .contains("parent"),
            "{scope}: {}",
            r.text
        );
    }
    // Within the parent's grants: fine.
    let r = delegate(&s, &parent, &actor1(&s), Some("jira:read"), None).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["scope"], "jira:read");
    // A grandchild cannot widen back to what the parent had.
    let child = token(&r);
    delegate(&s, &child, &actor2(&s), Some("github:read"), None)
        .await
        .assert_error(400, "invalid_scope");
    s.stop().await;
}

#[tokio::test]
async fn a_child_never_outlives_its_parent_whatever_the_policy() {
    let s = TestServer::start_with(permissive(None)).await;
    let parent = root(&s, "github:read", Some(100)).await;
    let pexp = claims(&parent)["exp"].as_u64().unwrap();
    let r = delegate(&s, &parent, &actor1(&s), None, Some(&json!({"ttl": 3600}))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert!(r.body["expires_in"].as_u64().unwrap() <= 100, "{}", r.text);
    let child = token(&r);
    let cexp = claims(&child)["exp"].as_u64().unwrap();
    assert!(cexp <= pexp, "child exp {cexp} after the parent's {pexp}");
    // The grandchild, asking the server default, is bounded too.
    let grandchild = child_of(&s, &child, &actor2(&s), None).await;
    assert!(claims(&grandchild)["exp"].as_u64().unwrap() <= cexp);
    // And so are the access tokens (server default 300 s > 100 s).
    let at = access(&s, &grandchild, "github", None).await;
    assert!(claims(&at)["exp"].as_u64().unwrap() <= cexp);
    // A shorter ttl is honoured.
    let r = delegate(&s, &parent, &actor1(&s), None, Some(&json!({"ttl": 10}))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let c = claims(&token(&r));
    assert!(c["exp"].as_u64().unwrap() <= c["iat"].as_u64().unwrap() + 10);
    s.stop().await;
}

#[tokio::test]
async fn delegation_depth_is_bounded_by_default_at_three() {
    let s = TestServer::start_with(permissive(None)).await;
    let mut task = root(&s, "github:read", None).await;
    for depth in 1..=3 {
        let actor = s.k8s.kubernetes("agents", &format!("sub{depth}"));
        task = child_of(&s, &task, &actor, None).await;
        assert_eq!(claims(&task)["tctx"]["depth"], depth);
    }
    let c = claims(&task);
    assert_eq!(
        c["act"]["act"]["act"]["sub"],
        "system:serviceaccount:agents:sub1"
    );
    assert_eq!(c["act"]["sub"], "system:serviceaccount:agents:sub3");
    let r = delegate(&s, &task, &actor1(&s), None, None).await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("deeper than 3"), "{}", r.text);
    // The depth-3 task still works.
    access(&s, &task, "github", None).await;
    s.stop().await;
}

#[tokio::test]
async fn delegation_depth_follows_the_configuration() {
    let s = TestServer::start_with(permissive(Some(Box::new(|c| {
        c.max_delegation_depth = 1;
    }))))
    .await;
    let parent = root(&s, "github:read", None).await;
    let child = child_of(&s, &parent, &actor1(&s), None).await;
    let r = delegate(&s, &child, &actor2(&s), None, None).await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("deeper than 1"), "{}", r.text);
    // Siblings at depth 1 are fine.
    child_of(&s, &parent, &actor2(&s), None).await;
    s.stop().await;
}

/// At the deepest chain the configuration allows, every token still
/// verifies and works: the nested `act` claims stay within what verifiers
/// take.
#[tokio::test]
async fn the_deepest_allowed_chain_still_works() {
    let depth = scrip_config::MAX_DELEGATION_DEPTH;
    let s = TestServer::start_with(permissive(Some(Box::new(move |c| {
        c.max_delegation_depth = depth;
    }))))
    .await;
    let mut task = root(&s, "github:read", None).await;
    for n in 0..depth {
        let actor = if n % 2 == 0 { actor1(&s) } else { actor2(&s) };
        task = child_of(&s, &task, &actor, None).await;
    }
    assert_eq!(claims(&task)["tctx"]["depth"], depth);
    let at = access(&s, &task, "github", None).await;
    assert_eq!(s.introspect(&at).await.body["active"], true);
    assert_eq!(s.introspect(&task).await.body["active"], true);
    delegate(&s, &task, &actor1(&s), None, None)
        .await
        .assert_error(400, "invalid_request");
    s.stop().await;
}

/// Each level nests its actor in every token below: with long subjects a
/// chain grows past what verifiers take well before the depth allowed.
/// The delegation that would make such a token is refused, on the
/// record; every token issued before it still works.
#[tokio::test]
async fn a_delegation_whose_token_would_be_too_large_is_refused() {
    let depth = scrip_config::MAX_DELEGATION_DEPTH;
    let s = TestServer::start_with(permissive(Some(Box::new(move |c| {
        c.max_delegation_depth = depth;
    }))))
    .await;
    let long = "a".repeat(1900);
    let mut task = root(&s, "github:read", None).await;
    let mut levels = 0;
    let refused = loop {
        let actor = s.k8s.kubernetes(&format!("n{levels}"), &long);
        let r = delegate(&s, &task, &actor, None, None).await;
        if r.status != 200 {
            break r;
        }
        task = token(&r);
        levels += 1;
        assert!(levels < depth, "never refused");
    };
    refused.assert_error(400, "invalid_request");
    assert!(refused.text.contains("too long"), "{}", refused.text);
    assert!(levels >= 2, "refused at {levels}");
    let at = access(&s, &task, "github", None).await;
    assert!(at.len() <= scrip_jose::MAX_TOKEN_BYTES);
    assert_eq!(s.introspect(&at).await.body["active"], true);
    assert!(
        s.audit().await.iter().any(|a| a.event == "task.refused"
            && a.reason.as_deref().is_some_and(|r| r.contains("too long"))),
        "the refusal is not on the record"
    );
    s.stop().await;
}

/// The delegations refused on the record because their tree was full.
async fn full_tree_refusals(s: &TestServer) -> usize {
    s.audit()
        .await
        .into_iter()
        .filter(|a| {
            a.event == "task.refused"
                && a.reason
                    .as_deref()
                    .is_some_and(|r| r.contains("tree holds 10000 sub-tasks"))
        })
        .count()
}

/// A task's tree holds at most `MAX_SUBTASKS` sub-tasks: past that a
/// delegation anywhere in it is refused, saying why, and recorded (ending
/// a task ends its tree in one transaction, which must stay bounded).
#[tokio::test]
async fn a_full_task_tree_refuses_more_sub_tasks() {
    let s = TestServer::start().await;
    let parent = root(&s, "github:read", None).await;
    let child = child_of(&s, &parent, &actor1(&s), None).await;
    // Filling a tree takes 10,000 delegations; the count at its root
    // stands for them here.
    let txn = claims(&parent)["txn"].as_str().unwrap().to_owned();
    let db = sqlx::SqlitePool::connect(&format!(
        "sqlite://{}",
        s.dir.path().join("data/scrip.db").display()
    ))
    .await
    .unwrap();
    let filled = sqlx::query("UPDATE tasks SET subtasks = ? WHERE id = ?")
        .bind(i64::from(scrip_store::MAX_SUBTASKS))
        .bind(&txn)
        .execute(&db)
        .await
        .unwrap();
    assert_eq!(filled.rows_affected(), 1);
    for from in [&parent, &child] {
        let r = delegate(&s, from, &actor2(&s), None, None).await;
        r.assert_error(400, "invalid_request");
        assert!(
            r.text.contains("this task's tree holds 10000 sub-tasks"),
            "{}",
            r.text
        );
    }
    let refusals = full_tree_refusals(&s).await;
    assert_eq!(refusals, 2);
    // Refused before anything was decided: no grant was recorded as
    // allowed (the store's own refusal, for a race, records what policy
    // allowed).
    assert!(
        s.audit()
            .await
            .iter()
            .filter(|a| a.event == "task.refused")
            .all(|a| a.actions.is_none()),
        "a full tree was refused only after deciding"
    );
    // One place left and eight delegations racing for it: whether each
    // is refused before it decides or by the store in its commit, one is
    // stored and seven are refused, saying why, on the record.
    sqlx::query("UPDATE tasks SET subtasks = ? WHERE id = ?")
        .bind(i64::from(scrip_store::MAX_SUBTASKS) - 1)
        .bind(&txn)
        .execute(&db)
        .await
        .unwrap();
    db.close().await;
    let mut racing = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (caller, child, actor) = (s.caller(), child.clone(), actor2(&s));
        racing.spawn(async move {
            caller
                .post_form(
                    "/token",
                    &[
                        ("grant_type", TOKEN_EXCHANGE),
                        ("subject_token", &child),
                        ("subject_token_type", TXN),
                        ("actor_token", &actor),
                        ("actor_token_type", JWT),
                        ("requested_token_type", TXN),
                    ],
                )
                .await
        });
    }
    let mut stored = 0;
    while let Some(r) = racing.join_next().await {
        let r = r.unwrap();
        if r.status == 200 {
            stored += 1;
        } else {
            r.assert_error(400, "invalid_request");
            assert!(
                r.text.contains("this task's tree holds 10000 sub-tasks"),
                "{}",
                r.text
            );
        }
    }
    assert_eq!(stored, 1);
    let refusals = full_tree_refusals(&s).await;
    assert_eq!(refusals, 2 + 7);
    // The tree still works, and still ends whole.
    access(&s, &child, "github", None).await;
    assert_eq!(s.revoke(&parent).await.status, 200);
    assert_eq!(s.introspect(&child).await.body["active"], false);
    // A delegation asked with the ended task's token is refused, on the
    // record, naming the token.
    delegate(&s, &parent, &actor1(&s), None, None)
        .await
        .assert_error(400, "invalid_request");
    let jti = decode_parts(&parent).1["jti"].as_str().unwrap().to_owned();
    let audit = s.audit().await;
    assert!(
        audit.iter().any(|a| a.event == "task.refused"
            && a.decision.as_deref() == Some("deny")
            && a.jti.as_deref() == Some(jti.as_str())
            && a.reason.as_deref() == Some("a delegation: subject_token: the task has ended")),
        "no record of the ended task's delegation"
    );
    s.stop().await;
}

/// A sub-task's token is handed out only with its durable record (SPEC:
/// fail closed): while the store cannot take it, 503 and nothing issued.
#[tokio::test]
async fn a_delegation_waits_for_a_store_that_can_record_it() {
    let s = TestServer::start().await;
    let parent = root(&s, "github:read", None).await;
    let held = s.hold_writes().await;
    let r = delegate(&s, &parent, &actor1(&s), None, None).await;
    r.assert_error(503, "temporarily_unavailable");
    assert!(!r.text.contains("eyJ"), "{}", r.text);
    release(held).await;
    let child = child_of(&s, &parent, &actor1(&s), None).await;
    let delegated = s
        .audit()
        .await
        .iter()
        .filter(|a| a.event == "task.delegated")
        .count();
    assert_eq!(delegated, 1);
    assert_eq!(s.introspect(&child).await.body["active"], true);
    s.stop().await;
}

#[tokio::test]
async fn delegated_sub_agents_may_only_read() {
    let s = TestServer::start().await;
    let parent = root(&s, "github:read github:write", None).await;
    // The parent itself may write (the purpose names a ticket).
    access(&s, &parent, "github", Some("write")).await;

    let r = delegate(
        &s,
        &parent,
        &actor1(&s),
        Some("github:read github:write"),
        Some(&json!({"purpose": "review JIRA-1 fix"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["scope"], "github:read");
    let child = token(&r);
    let cc = claims(&child);
    assert_eq!(cc["scope"], "github:read");
    assert_eq!(cc["tctx"]["purpose"], "review JIRA-1 fix");
    // The child cannot get a write token.
    s.access_token(&child, "github", Some("write"))
        .await
        .assert_error(400, "invalid_scope");

    let r = delegate(
        &s,
        &parent,
        &actor1(&s),
        Some("github:write"),
        Some(&json!({"purpose": "push JIRA-1 fix"})),
    )
    .await;
    r.assert_error(400, "access_denied");

    let ptxn = claims(&parent)["txn"].as_str().unwrap().to_owned();
    let audit = s.audit().await;
    let denies: Vec<_> = audit
        .iter()
        .filter(|a| {
            a.event == "task.grant"
                && a.decision.as_deref() == Some("deny")
                && a.parent_id.as_deref() == Some(ptxn.as_str())
        })
        .collect();
    assert_eq!(denies.len(), 2, "{denies:#?}");
    for a in &denies {
        assert_eq!(a.tool.as_deref(), Some("github"));
        assert_eq!(a.actions.as_deref(), Some("write"));
        assert!(
            a.policies.iter().any(|p| p == "delegated-read-only"),
            "{a:#?}"
        );
        assert_eq!(a.chain, vec![ACTOR1.to_owned()]);
    }
    s.stop().await;
}

#[tokio::test]
async fn may_act_restricts_who_acts_for_the_task() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let r = start(
        &s,
        &identity,
        "github:read",
        &json!({"purpose": "triage", "environment": "dev", "may_act": [{"sub": ACTOR1}]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let parent = token(&r);
    let r = delegate(&s, &parent, &actor2(&s), None, None).await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("may_act"), "{}", r.text);
    let child = child_of(&s, &parent, &actor1(&s), None).await;
    assert_eq!(claims(&child)["act"], act1());
    s.stop().await;
}

/// A policy sees the issuers of the sub-agents acting
/// (`context.delegation_issuers`): one that shuts out an issuer's
/// sub-agents at the token stage refuses their access tokens in another
/// issuer's task (the principal is the task's agent), deeper in the chain
/// too, and nobody else's.
#[tokio::test]
async fn a_policy_shuts_out_the_sub_agents_of_one_issuer() {
    let policy = format!(
        r#"@id("no-github-sub-agents")
forbid (principal, action, resource)
when {{ context.stage == "token" && context.delegation_issuers.contains("{GITHUB_ISSUER}") }};
"#
    );
    let s = TestServer::start_with(Options {
        extra_policies: vec![("no-github-sub-agents.cedar".into(), policy)],
        ..Options::default()
    })
    .await;
    let parent = root(&s, "github:read", None).await;
    let by_github = child_of(&s, &parent, &actor2(&s), None).await;
    let through_github = child_of(&s, &by_github, &actor1(&s), None).await;
    let by_spiffe = child_of(&s, &parent, &actor1(&s), None).await;
    for (task, allowed) in [
        (&parent, true),
        (&by_spiffe, true),
        (&by_github, false),
        (&through_github, false),
    ] {
        let r = s.access_token(task, "github", Some("read")).await;
        if allowed {
            assert_eq!(r.status, 200, "{}", r.text);
        } else {
            r.assert_error(400, "access_denied");
        }
    }
    let audit = s.audit().await;
    let refused: Vec<_> = audit
        .iter()
        .filter(|e| e.event == "token.decision" && e.policies == ["no-github-sub-agents"])
        .collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    s.stop().await;
}

/// A delegation's policy request sees the issuers of the sub-agents its
/// chain would hold, the new one's included: a rule that lets no GitHub
/// workload act refuses a delegation to one, from the agent's task or a
/// sub-agent's, and no other.
#[tokio::test]
async fn a_delegation_to_one_issuer_can_be_refused() {
    let policy = format!(
        r#"@id("no-github-acting")
forbid (principal, action, resource)
when {{ context.stage == "task" && context.delegation_issuers.contains("{GITHUB_ISSUER}") }};
"#
    );
    let s = TestServer::start_with(Options {
        extra_policies: vec![("no-github-acting.cedar".into(), policy)],
        ..Options::default()
    })
    .await;
    let parent = root(&s, "github:read", None).await;
    delegate(&s, &parent, &actor2(&s), None, None)
        .await
        .assert_error(400, "access_denied");
    let by_spiffe = child_of(&s, &parent, &actor1(&s), None).await;
    delegate(&s, &by_spiffe, &actor2(&s), None, None)
        .await
        .assert_error(400, "access_denied");
    let refused = s
        .audit()
        .await
        .into_iter()
        .filter(|e| e.policies == ["no-github-acting"])
        .count();
    assert_eq!(refused, 2);
    s.stop().await;
}

#[tokio::test]
async fn may_act_checks_the_actors_issuer() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let details = |iss: &str| json!({"purpose": "triage", "environment": "dev", "may_act": [{"sub": ACTOR1, "iss": iss}]});
    let r = start(&s, &identity, "github:read", &details(GITHUB_ISSUER)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = delegate(&s, &token(&r), &actor1(&s), None, None).await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("may_act"), "{}", r.text);

    let r = start(&s, &identity, "github:read", &details(SPIFFE_ISSUER)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    child_of(&s, &token(&r), &actor1(&s), None).await;
    s.stop().await;
}

#[tokio::test]
async fn a_child_may_restrict_who_acts_for_it() {
    let s = TestServer::start().await;
    let parent = root(&s, "github:read", None).await;
    let r = delegate(
        &s,
        &parent,
        &actor1(&s),
        None,
        Some(&json!({"may_act": [{"sub": ACTOR2, "iss": GITHUB_ISSUER}]})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let child = token(&r);
    let other = s.k8s.kubernetes("agents", "intruder");
    delegate(&s, &child, &other, None, None)
        .await
        .assert_error(400, "invalid_request");
    child_of(&s, &child, &actor2(&s), None).await;
    s.stop().await;
}

#[tokio::test]
async fn a_parents_may_act_binds_its_whole_subtree() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let r = start(
        &s,
        &identity,
        "github:read",
        &json!({"purpose": "triage", "environment": "dev", "may_act": [{"sub": ACTOR1}]}),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let parent = token(&r);

    // The allowed sub-agent names nobody: it inherits the root's list, so
    // it cannot hand the task on to an actor the root did not allow.
    let child = child_of(&s, &parent, &actor1(&s), None).await;
    let r = delegate(&s, &child, &actor2(&s), None, None).await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("may_act"), "{}", r.text);
    // The attempt is audited, against the task that made it.
    let child_id = claims(&child)["txn"].as_str().unwrap().to_owned();
    let audit = s.audit().await;
    let refused: Vec<_> = audit.iter().filter(|e| e.event == "task.refused").collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].decision.as_deref(), Some("deny"));
    assert_eq!(refused[0].task_id.as_deref(), Some(child_id.as_str()));
    assert_eq!(refused[0].chain, vec![ACTOR1.to_owned()]);
    // The actor refused is named by its identity too.
    assert_eq!(refused[0].identity["repository"], "acme/helper");
    let reason = refused[0].reason.as_deref().unwrap();
    assert!(
        reason.contains(ACTOR2) && reason.contains("may_act"),
        "{reason}"
    );
    let grandchild = child_of(&s, &child, &actor1(&s), None).await;
    assert_eq!(claims(&grandchild)["tctx"]["depth"], 2);

    // Nor can it widen the list for its own children.
    for wider in [
        json!([{"sub": ACTOR2}]),
        json!([{"sub": ACTOR1}, {"sub": ACTOR2, "iss": GITHUB_ISSUER}]),
    ] {
        let r = delegate(
            &s,
            &parent,
            &actor1(&s),
            None,
            Some(&json!({ "may_act": wider })),
        )
        .await;
        r.assert_error(400, "invalid_request");
        assert!(r.text.contains("may only narrow"), "{}", r.text);
    }
    // Narrowing is fine: the same actor, from one issuer only.
    let r = delegate(
        &s,
        &parent,
        &actor1(&s),
        None,
        Some(&json!({"may_act": [{"sub": ACTOR1, "iss": SPIFFE_ISSUER}]})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let narrow = token(&r);
    child_of(&s, &narrow, &actor1(&s), None).await;

    // An entry pinned to an issuer cannot be reopened to any issuer.
    let r = delegate(
        &s,
        &narrow,
        &actor1(&s),
        None,
        Some(&json!({"may_act": [{"sub": ACTOR1}]})),
    )
    .await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("from any issuer"), "{}", r.text);
    s.stop().await;
}

#[tokio::test]
async fn an_actor_token_that_is_a_task_token_is_refused() {
    let s = TestServer::start().await;
    let parent = root(&s, "github:read", None).await;
    let other = root(&s, "github:read", None).await;
    let r = delegate(&s, &parent, &other, None, None).await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("not a workload identity"), "{}", r.text);
    // Nor an access token.
    let at = access(&s, &other, "github", None).await;
    let r = delegate(&s, &parent, &at, None, None).await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("not a workload identity"), "{}", r.text);
    s.stop().await;
}

#[tokio::test]
async fn an_expired_actor_identity_is_refused() {
    let s = TestServer::start().await;
    let parent = root(&s, "github:read", None).await;
    let mut c = s.k8s.claims("system:serviceaccount:agents:late");
    let then = now() - 3600;
    c["iat"] = json!(then - 600);
    c["nbf"] = json!(then - 600);
    c["exp"] = json!(then);
    let expired = s.k8s.sign(&c);
    delegate(&s, &parent, &expired, None, None)
        .await
        .assert_error(400, "invalid_request");
    // The same identity, not expired, is fine.
    let fresh = s
        .k8s
        .sign(&s.k8s.claims("system:serviceaccount:agents:late"));
    child_of(&s, &parent, &fresh, None).await;
    s.stop().await;
}

#[tokio::test]
async fn an_actor_token_type_other_than_jwt_is_refused() {
    let s = TestServer::start().await;
    let parent = root(&s, "github:read", None).await;
    let actor = actor1(&s);
    for ty in [
        TXN,
        ACCESS,
        "urn:ietf:params:oauth:token-type:id_token",
        "jwt",
    ] {
        let r = s
            .post_form(
                "/token",
                &[
                    ("grant_type", TOKEN_EXCHANGE),
                    ("subject_token", &parent),
                    ("subject_token_type", TXN),
                    ("actor_token", &actor),
                    ("actor_token_type", ty),
                ],
            )
            .await;
        r.assert_error(400, "invalid_request");
        assert!(r.text.contains("actor_token_type"), "{ty}: {}", r.text);
    }
    s.stop().await;
}

#[tokio::test]
async fn an_actor_token_without_its_type_is_refused() {
    let s = TestServer::start().await;
    let parent = root(&s, "github:read", None).await;
    let actor = actor1(&s);
    let r = s
        .post_form(
            "/token",
            &[
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", &parent),
                ("subject_token_type", TXN),
                ("actor_token", &actor),
            ],
        )
        .await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("actor_token_type"), "{}", r.text);
    // And a type without a token.
    let r = s
        .post_form(
            "/token",
            &[
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", &parent),
                ("subject_token_type", TXN),
                ("actor_token_type", JWT),
            ],
        )
        .await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("actor_token"), "{}", r.text);
    s.stop().await;
}

#[tokio::test]
async fn an_actor_token_needs_a_task_token_subject_and_a_txn_token_request() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let actor = actor1(&s);
    let details = json!({"purpose": "triage", "environment": "dev"}).to_string();
    let r = s
        .post_form(
            "/token",
            &[
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", &identity),
                ("subject_token_type", JWT),
                ("actor_token", &actor),
                ("actor_token_type", JWT),
                ("requested_token_type", TXN),
                ("scope", "github:read"),
                ("request_details", &details),
            ],
        )
        .await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("actor_token"), "{}", r.text);
    // A task token subject asking for an access token with an actor.
    let parent = root(&s, "github:read", None).await;
    let r = s
        .post_form(
            "/token",
            &[
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", &parent),
                ("subject_token_type", TXN),
                ("actor_token", &actor),
                ("actor_token_type", JWT),
                ("requested_token_type", ACCESS),
            ],
        )
        .await;
    r.assert_error(400, "invalid_request");
    s.stop().await;
}

#[tokio::test]
async fn a_child_never_names_a_ticket_its_parent_does_not() {
    let s = TestServer::start().await;
    // The root's purpose names JIRA-1.
    let parent = root(&s, "github:read", None).await;
    let purposes = [
        ("review JIRA-1 again", true),
        ("review the build", true),
        ("hotfix OPS-7", false),
        ("JIRA-2 then JIRA-1", false),
        ("JIRA-1, then OPS-7", false),
    ];
    check_purposes(&s, &parent, &purposes, "ticket").await;
    // A root without a ticket: its children name none either.
    let identity = s.k8s.kubernetes("agents", "coder");
    let r = s
        .try_start_task(&identity, "github:read", "dev", "tidy the docs", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    check_purposes(
        &s,
        &token(&r),
        &[("tidy the docs for JIRA-9", false)],
        "ticket",
    )
    .await;

    // A root that names two: its children name its first first, or none.
    // The first is the task's `context.ticket`, which a policy may trust.
    let r = s
        .try_start_task(
            &identity,
            "github:read",
            "dev",
            "OPS-7 cleanup, see JIRA-12",
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let purposes = [
        ("OPS-7 cleanup", true),
        ("OPS-7, JIRA-12", true),
        ("the cleanup", true),
        ("JIRA-12", false),
        ("JIRA-12 and OPS-7", false),
    ];
    check_purposes(&s, &token(&r), &purposes, "first ticket (`OPS-7`) first").await;
    s.stop().await;
}

/// Delegates `parent` with each purpose: taken (and carried) when `true`,
/// refused as `invalid_request` saying `refusal` when `false`.
async fn check_purposes(s: &TestServer, parent: &str, purposes: &[(&str, bool)], refusal: &str) {
    for &(purpose, ok) in purposes {
        let r = delegate(
            s,
            parent,
            &actor1(s),
            None,
            Some(&json!({ "purpose": purpose })),
        )
        .await;
        if ok {
            assert_eq!(r.status, 200, "{purpose}: {}", r.text);
            assert_eq!(claims(&token(&r))["tctx"]["purpose"], purpose);
        } else {
            r.assert_error(400, "invalid_request");
            assert!(r.text.contains(refusal), "{purpose}: {}", r.text);
        }
    }
}

#[tokio::test]
async fn a_child_keeps_its_parents_environment() {
    let s = TestServer::start().await;
    let parent = root(&s, "github:read", None).await;
    let r = delegate(
        &s,
        &parent,
        &actor1(&s),
        None,
        Some(&json!({"environment": "prod"})),
    )
    .await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("environment"), "{}", r.text);
    let r = delegate(
        &s,
        &parent,
        &actor1(&s),
        None,
        Some(&json!({"environment": "dev"})),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(claims(&token(&r))["tctx"]["environment"], "dev");
    s.stop().await;
}

#[tokio::test]
async fn an_ended_parent_cannot_delegate() {
    let s = TestServer::start().await;
    let parent = root(&s, "github:read", None).await;
    assert_eq!(s.revoke(&parent).await.status, 200);
    let r = delegate(&s, &parent, &actor1(&s), None, None).await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("ended"), "{}", r.text);
    s.stop().await;
}

#[tokio::test]
async fn a_delegation_names_no_audience_or_resource() {
    let s = TestServer::start().await;
    let parent = root(&s, "github:read", None).await;
    let actor = actor1(&s);
    for (k, v) in [
        ("audience", "github"),
        ("resource", "https://api.github.com"),
    ] {
        let r = s
            .post_form(
                "/token",
                &[
                    ("grant_type", TOKEN_EXCHANGE),
                    ("subject_token", &parent),
                    ("subject_token_type", TXN),
                    ("actor_token", &actor),
                    ("actor_token_type", JWT),
                    (k, v),
                ],
            )
            .await;
        // RFC 8693 §2.2.2.
        r.assert_error(400, "invalid_target");
        assert!(r.text.contains("audience and resource"), "{}", r.text);
    }
    s.stop().await;
}

async fn feed(s: &TestServer, after: i64) -> Value {
    let caller = s.k8s.kubernetes("resource-servers", "github-api");
    let r = s
        .http
        .get(format!("{}/revocations?after={after}", s.url))
        .bearer_auth(caller)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r.json().await.unwrap()
}

#[tokio::test]
async fn ending_the_parent_ends_the_child_and_the_grandchild() {
    let s = TestServer::start().await;
    let cursor = feed(&s, 0).await["cursor"].as_i64().unwrap();
    let parent = root(&s, "github:read jira:read", None).await;
    let child = child_of(&s, &parent, &actor1(&s), None).await;
    let grandchild = child_of(&s, &child, &actor2(&s), None).await;
    let pat = access(&s, &parent, "github", None).await;
    let cat = access(&s, &child, "jira", None).await;
    let gat = access(&s, &grandchild, "github", None).await;
    for t in [&parent, &child, &grandchild, &pat, &cat, &gat] {
        assert_eq!(s.introspect(t).await.body["active"], true);
    }

    assert_eq!(s.revoke(&parent).await.status, 200);
    for t in [&parent, &child, &grandchild, &pat, &cat, &gat] {
        assert_eq!(s.introspect(t).await.body, json!({"active": false}));
    }
    for t in [&parent, &child, &grandchild] {
        s.access_token(t, "github", Some("read"))
            .await
            .assert_error(400, "invalid_request");
        delegate(&s, t, &actor1(&s), None, None)
            .await
            .assert_error(400, "invalid_request");
    }

    let body = feed(&s, cursor).await;
    let tasks: BTreeSet<String> = body["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] == "task")
        .map(|e| e["txn"].as_str().unwrap().to_owned())
        .collect();
    let want: BTreeSet<String> = [&parent, &child, &grandchild]
        .iter()
        .map(|t| claims(t)["txn"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(tasks, want, "{body}");
    s.stop().await;
}

#[tokio::test]
async fn ending_a_child_leaves_the_parent() {
    let s = TestServer::start().await;
    let parent = root(&s, "github:read jira:read", None).await;
    let child = child_of(&s, &parent, &actor1(&s), None).await;
    let sibling = child_of(&s, &parent, &actor2(&s), None).await;
    let grandchild = child_of(&s, &child, &actor2(&s), None).await;
    let pat = access(&s, &parent, "github", None).await;
    let sat = access(&s, &sibling, "github", None).await;
    let cat = access(&s, &child, "jira", None).await;
    let gat = access(&s, &grandchild, "jira", None).await;

    assert_eq!(s.revoke(&child).await.status, 200);
    for t in [&child, &grandchild, &cat, &gat] {
        assert_eq!(s.introspect(t).await.body, json!({"active": false}));
    }
    for t in [&parent, &pat, &sibling, &sat] {
        assert_eq!(s.introspect(t).await.body["active"], true);
    }
    // The parent goes on: new access tokens and new children.
    access(&s, &parent, "jira", None).await;
    child_of(&s, &parent, &actor1(&s), None).await;
    access(&s, &sibling, "jira", None).await;
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_delegation_racing_the_parents_end_leaves_no_live_child() {
    // 248 tasks from one agent at once: past the default burst of
    // `[limits]`, which is not what this tests.
    let s = TestServer::start_with(Options {
        edit: Some(Box::new(|c| c.limits.task_burst = 1_000)),
        ..Options::default()
    })
    .await;
    for round in 0..8 {
        let parent = root(&s, "github:read", None).await;
        let actor = actor1(&s);
        let mut set = tokio::task::JoinSet::new();
        for i in 0..30 {
            let (caller, parent, actor) = (s.caller(), parent.clone(), actor.clone());
            set.spawn(async move {
                let r = caller
                    .post_form(
                        "/token",
                        &[
                            ("grant_type", TOKEN_EXCHANGE),
                            ("subject_token", parent.as_str()),
                            ("subject_token_type", TXN),
                            ("actor_token", actor.as_str()),
                            ("actor_token_type", JWT),
                            ("requested_token_type", TXN),
                            ("scope", "github:read"),
                        ],
                    )
                    .await;
                (i, r.status, r.body)
            });
        }
        // End the parent while the delegations are in flight: once the
        // first has been answered, or at once in even rounds.
        let mut answers = Vec::new();
        if round % 2 == 1 {
            answers.push(set.join_next().await.unwrap());
        }
        assert_eq!(s.revoke(&parent).await.status, 200);
        while let Some(r) = set.join_next().await {
            answers.push(r);
        }
        let mut children = Vec::new();
        for r in answers {
            let (i, status, body) = r.unwrap();
            match status {
                200 => children.push(body["access_token"].as_str().unwrap().to_owned()),
                400 => assert_eq!(
                    body["error_description"], "subject_token: the task has ended",
                    "delegation {i}: {body}"
                ),
                _ => panic!("delegation {i}: {status} {body}"),
            }
        }
        // Whatever was delegated before the end, ended with it.
        for child in &children {
            let r = s.introspect(child).await;
            assert_eq!(
                r.body,
                json!({"active": false}),
                "round {round}: {}",
                r.text
            );
            let r = s.access_token(child, "github", Some("read")).await;
            assert_ne!(r.status, 200, "round {round}: {}", r.text);
        }
    }
    s.stop().await;
}

/// `[limits]`: each workload identity asks for tasks and for access tokens
/// at its own pace, charged to whoever asks (a task start to its agent, a
/// delegation or an access token to the task's current sub-agent, else its
/// agent), per issuer and subject. Past it: 429 `temporarily_unavailable`
/// with `Retry-After`, nothing issued, and the refusal on the record.
#[tokio::test]
async fn each_identity_asks_for_tasks_and_tokens_at_its_own_pace() {
    let edit: ConfigEdit = Box::new(|c| {
        c.limits = scrip_config::Limits {
            tasks_per_minute: 1,
            task_burst: 3,
            access_tokens_per_minute: 1,
            access_token_burst: 2,
        };
    });
    let s = TestServer::start_with(permissive(Some(edit))).await;
    let throttled = |r: &Reply, key: &str| {
        r.assert_error(429, "temporarily_unavailable");
        let d = r.body["error_description"].as_str().unwrap();
        assert!(d.contains(&format!("`[limits] {key}`")), "{d}");
        let after: u64 = r.headers["retry-after"].to_str().unwrap().parse().unwrap();
        assert!((50..=60).contains(&after), "{after}");
        assert!(r.body.get("access_token").is_none(), "{}", r.text);
    };
    // The agent's three: two tasks and a delegation.
    let root1 = root(&s, "github:read", None).await;
    root(&s, "github:read", None).await;
    let child = child_of(&s, &root1, &actor1(&s), None).await;
    let coder = s.k8s.kubernetes("agents", "coder");
    let r = s
        .try_start_task(&coder, "github:read", "dev", "one too many", None)
        .await;
    throttled(&r, "tasks_per_minute");
    throttled(
        &delegate(&s, &root1, &actor2(&s), None, None).await,
        "tasks_per_minute",
    );
    // Another agent, and the agent's subject at another issuer, are
    // other identities.
    s.start_task(
        &s.k8s.kubernetes("agents", "other"),
        "github:read",
        "dev",
        "its own pace",
    )
    .await;
    let twin = s.github.sign(&s.github.claims(AGENT));
    s.start_task(&twin, "github:read", "dev", "same name, other issuer")
        .await;
    // The sub-agent delegates on its own pace, though its agent's is spent.
    child_of(&s, &child, &actor2(&s), None).await;
    // Access tokens: the sub-agent's two, then its agent's own two.
    for _ in 0..2 {
        access(&s, &child, "github", None).await;
    }
    throttled(
        &s.access_token(&child, "github", None).await,
        "access_tokens_per_minute",
    );
    for _ in 0..2 {
        access(&s, &root1, "github", None).await;
    }
    throttled(
        &s.access_token(&root1, "github", None).await,
        "access_tokens_per_minute",
    );
    let audit = s.stop_then_audit().await;
    let refused = |event: &str, key: &str| {
        audit
            .iter()
            .filter(|a| {
                a.event == event
                    && a.decision.as_deref() == Some("deny")
                    && a.reason.as_deref().is_some_and(|r| r.contains(key))
            })
            .map(|a| a.agent_sub.clone().unwrap_or_default())
            .collect::<Vec<_>>()
    };
    assert_eq!(
        refused("task.refused", "tasks_per_minute"),
        [AGENT, AGENT],
        "{audit:#?}"
    );
    // The task start's names the agent's identity; the delegation's,
    // refused before its actor is read, none.
    let mut identities: Vec<_> = audit
        .iter()
        .filter(|a| {
            a.event == "task.refused"
                && a.reason
                    .as_deref()
                    .is_some_and(|r| r.contains("tasks_per_minute"))
        })
        .map(|a| (a.task_id.is_some(), a.identity.get("kind").cloned()))
        .collect();
    identities.sort();
    assert_eq!(
        identities,
        [(false, Some("kubernetes".to_owned())), (true, None)]
    );
    assert_eq!(
        refused("token.refused", "access_tokens_per_minute").len(),
        2,
        "{audit:#?}"
    );
    assert_eq!(
        audit.iter().filter(|a| a.event == "token.issued").count(),
        4
    );
}

/// Refusals past `[limits]` are recorded within one budget for the
/// identity, however many tasks it holds: up to ten a second one by one,
/// the rest counted (a budget per task would record ten a second for each).
#[tokio::test]
async fn an_identitys_refusals_past_its_pace_share_one_budget() {
    let edit: ConfigEdit = Box::new(|c| {
        c.limits.access_tokens_per_minute = 1;
        c.limits.access_token_burst = 3;
    });
    let s = TestServer::start_with(permissive(Some(edit))).await;
    let mut tasks = Vec::new();
    for _ in 0..3 {
        tasks.push(root(&s, "github:read", None).await);
    }
    for t in &tasks {
        access(&s, t, "github", None).await;
    }
    let mut tries = 0;
    for _ in 0..20 {
        for t in &tasks {
            s.access_token(t, "github", None)
                .await
                .assert_error(429, "temporarily_unavailable");
            tries += 1;
        }
    }
    let audit = s.stop_then_audit().await;
    let refused: Vec<_> = audit
        .into_iter()
        .filter(|a| a.event == "token.refused")
        .collect();
    assert!(
        refused.iter().all(|a| a
            .reason
            .as_deref()
            .is_some_and(|r| r.contains(&format!("charged to {AGENT} ({K8S_ISSUER}): ")))),
        "{refused:#?}"
    );
    assert!(
        refused.iter().filter_map(count_of).count() > 0
            && refused
                .iter()
                .filter_map(|a| a.reason.as_deref())
                .any(|r| r.contains("a second for one identity")),
        "{refused:#?}"
    );
    assert_counted_past_the_budget(&refused, tries);
}
