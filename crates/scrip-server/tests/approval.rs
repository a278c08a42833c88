//! Human approval over HTTP (SPEC §5, issue 5): a step policy allows only
//! with a person's approval goes pending; the agent polls with the CIBA
//! grant; an approver decides; the approved step runs on a fresh,
//! single-use, short-lived token naming the approval and the approver.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::*;
use scrip_config::{Approver, Config};
use serde_json::{Value, json};

const CIBA: &str = "urn:openid:params:grant-type:ciba";
/// The agent that starts the tasks.
const AGENT: &str = "system:serviceaccount:agents:coder";
/// A person who approves.
const ALICE: &str = "system:serviceaccount:people:alice";
const PURPOSE: &str = "cleanup JIRA-9";

fn approver(name: &str, issuer: &str, subject: &str) -> Approver {
    Approver {
        name: name.to_owned(),
        issuer: Some(issuer.to_owned()),
        subject: Some(subject.to_owned()),
        uid: None,
    }
}

fn alice() -> Approver {
    approver("alice", K8S_ISSUER, ALICE)
}

/// Options with this configuration change.
fn edit(f: impl FnOnce(&mut Config) + Send + 'static) -> Options {
    Options {
        edit: Some(Box::new(f)),
        ..Options::default()
    }
}

/// A server where alice approves.
async fn server() -> TestServer {
    TestServer::start_with(edit(|c| c.approvers = vec![alice()])).await
}

/// Alice's identity token.
fn alice_id(s: &TestServer) -> String {
    s.k8s.kubernetes("people", "alice")
}

/// A task of `coder` in prod holding `github:delete`.
async fn prod_task(s: &TestServer) -> String {
    prod_task_with(s, "github:delete").await
}

/// A task of `coder` in prod holding `scope`.
async fn prod_task_with(s: &TestServer, scope: &str) -> String {
    let identity = s.k8s.kubernetes("agents", "coder");
    let r = s.start_task(&identity, scope, "prod", PURPOSE).await;
    r["access_token"].as_str().unwrap().to_owned()
}

/// A second person who approves.
fn bob() -> Approver {
    approver("bob", K8S_ISSUER, "system:serviceaccount:people:bob")
}

/// Asks for `delete` at github; asserts it goes pending; the auth_req_id.
async fn pending(s: &TestServer, task: &str) -> String {
    pending_step(s, task, "github", "delete").await
}

/// Asks for `actions` at `tool`; asserts it goes pending; the auth_req_id.
async fn pending_step(s: &TestServer, task: &str, tool: &str, actions: &str) -> String {
    let r = s.access_token(task, tool, Some(actions)).await;
    r.assert_error(400, "authorization_pending");
    // It carries the `auth_req_id`: RFC 6749 §5.1's headers.
    assert_eq!(r.headers["cache-control"], "no-store");
    assert_eq!(r.headers["pragma"], "no-cache");
    r.body["auth_req_id"].as_str().unwrap().to_owned()
}

/// How many approvals were requested, by the audit record.
async fn requested(s: &TestServer) -> usize {
    s.audit()
        .await
        .iter()
        .filter(|a| a.event == "approval.requested")
        .count()
}

async fn poll(s: &TestServer, task: &str, id: &str) -> Reply {
    s.post_form(
        "/token",
        &[
            ("grant_type", CIBA),
            ("auth_req_id", id),
            ("subject_token", task),
        ],
    )
    .await
}

async fn approve(s: &TestServer, id: &str, bearer: Option<&str>) -> Reply {
    s.approve(id, bearer).await
}

async fn deny(s: &TestServer, id: &str, bearer: Option<&str>, reason: &str) -> Reply {
    let body = format!("reason={}", urlencode(reason));
    s.post_raw(
        &format!("/approvals/{id}/deny"),
        "application/x-www-form-urlencoded",
        body.into_bytes(),
        bearer,
    )
    .await
}

async fn list(s: &TestServer, bearer: Option<&str>) -> Reply {
    let mut req = s.http.get(format!("{}/approvals", s.url));
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    let text = r.text().await.unwrap();
    let body = serde_json::from_str(&text).unwrap_or(Value::Null);
    Reply {
        status,
        headers,
        body,
        text,
    }
}

/// Approves `id` as alice and polls the token; panics unless issued.
async fn approved_token(s: &TestServer, task: &str, id: &str) -> Reply {
    let r = approve(s, id, Some(&alice_id(s))).await;
    assert_eq!(r.status, 200, "approve: {}", r.text);
    let r = poll(s, task, id).await;
    assert_eq!(r.status, 200, "poll after approval: {}", r.text);
    r
}

/// The step `id` in a `GET /approvals` answer.
fn listed(r: &Reply, id: &str) -> Value {
    r.body["approvals"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["auth_req_id"] == id)
        .cloned()
        .unwrap_or_else(|| panic!("{id} not listed: {}", r.text))
}

/// `GET /approvals/{id}`, as alice.
async fn shown(s: &TestServer, id: &str) -> Value {
    let req = s.http.get(format!("{}/approvals/{id}", s.url));
    let req = req.bearer_auth(alice_id(s));
    req.send().await.unwrap().json::<Value>().await.unwrap()
}

/// Waits up to `secs` seconds for `f` to hold.
async fn eventually<F, Fut>(secs: u64, mut f: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    loop {
        if f().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A task's environment is the agent's word: naming `dev` spares a delete
/// the approval only at a tool the operator labelled a development one.
#[tokio::test]
async fn naming_dev_does_not_spare_a_production_tool_the_approval() {
    let s = TestServer::start_with(edit(|c| {
        c.approvers = vec![alice()];
        for t in &mut c.tools {
            if t.name.as_str() == "github" {
                t.labels.clear();
            }
        }
    }))
    .await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let task = s
        .start_task(&identity, "github:delete deploy:delete", "dev", PURPOSE)
        .await;
    let task = task["access_token"].as_str().unwrap();
    let r = s.access_token(task, "github", Some("delete")).await;
    r.assert_error(400, "authorization_pending");
    // The development tool, in a task in dev, is spared.
    let r = s.access_token(task, "deploy", Some("delete")).await;
    assert_eq!(r.status, 200, "{}", r.text);
}

/// With no approvers configured, a step still waits (SPEC §5: it can be
/// decided once a restart names someone), and the answer says that nobody
/// can decide it until then.
#[tokio::test]
async fn a_step_nobody_can_approve_yet_says_so() {
    let mut s = TestServer::start().await;
    let task = prod_task(&s).await;
    let r = s.access_token(&task, "github", Some("delete")).await;
    r.assert_error(400, "authorization_pending");
    assert!(r.text.contains("no approvers are configured"), "{}", r.text);
    let id = r.body["auth_req_id"].as_str().unwrap().to_owned();
    // Named since: the same step is decided.
    s.restart_with(|c| c.approvers = vec![alice()]).await;
    let r = s.access_token(&task, "github", Some("delete")).await;
    r.assert_error(400, "authorization_pending");
    assert_eq!(r.body["auth_req_id"], id.as_str());
    assert!(!r.text.contains("no approvers"), "{}", r.text);
    let r = approved_token(&s, &task, &id).await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.stop().await;
}

#[tokio::test]
async fn a_step_needing_approval_answers_authorization_pending() {
    let s = server().await;
    let task = prod_task(&s).await;
    let r = s.access_token(&task, "github", Some("delete")).await;
    r.assert_error(400, "authorization_pending");
    assert_eq!(r.headers["cache-control"], "no-store");
    let id = r.body["auth_req_id"].as_str().unwrap();
    assert!(id.len() >= 16, "{id}");
    assert_eq!(r.body["interval"], 2, "{}", r.text);
    assert_eq!(r.body["expires_in"], 600, "{}", r.text);
    assert!(r.body.get("access_token").is_none(), "{}", r.text);
    // Nothing was issued for it.
    let audit = s.audit().await;
    assert!(
        !audit.iter().any(|e| e.event == "token.issued"),
        "a pending step issued a token"
    );
    // Asking again for the same step is the same request: one approval,
    // one entry in the approvers' list, its time running on.
    let again = s.access_token(&task, "github", Some("delete")).await;
    again.assert_error(400, "authorization_pending");
    assert_eq!(again.body["auth_req_id"], id);
    assert!(
        again.body["expires_in"].as_u64().unwrap() <= 600,
        "{}",
        again.text
    );
    let requested = s
        .audit()
        .await
        .iter()
        .filter(|e| e.event == "approval.requested")
        .count();
    assert_eq!(requested, 1);
    // Approved and not collected (its asker lost a poll's answer, or
    // stopped waiting), it is handed back, not put to a person again; once
    // collected, the next ask is a new request.
    assert_eq!(again.body.get("approved"), None, "{}", again.text);
    let r = approve(&s, id, Some(&alice_id(&s))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let handed = s.access_token(&task, "github", Some("delete")).await;
    handed.assert_error(400, "authorization_pending");
    assert_eq!(handed.body["auth_req_id"], id);
    assert_eq!(handed.body["approved"], true, "{}", handed.text);
    let r = poll(&s, &task, id).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let other = pending(&s, &task).await;
    assert_ne!(other, id);
    s.stop().await;
}

/// A server where alice approves, with eleven more tools `db0`..`db10`
/// (action `delete`), and a task of `coder` in prod holding `db*:delete`
/// and `extra`.
async fn eleven_dbs(extra: &[&str]) -> (TestServer, String) {
    eleven_dbs_with(extra, Vec::new()).await
}

/// [`eleven_dbs`] with these policy files beside (or over) the
/// repository's.
async fn eleven_dbs_with(extra: &[&str], policies: Vec<(String, String)>) -> (TestServer, String) {
    use scrip_config::Tool;
    use scrip_token::{ActionName, ToolName};
    let mut options = edit(|c| {
        c.approvers = vec![alice()];
        for i in 0..11 {
            c.tools.push(Tool {
                name: ToolName::parse(&format!("db{i}")).unwrap(),
                resource: format!("https://db{i}.example"),
                actions: vec![ActionName::parse("delete").unwrap()],
                labels: Default::default(),
                introspectors: Vec::new(),
            });
        }
    });
    options.extra_policies = policies;
    let s = TestServer::start_with(options).await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let mut grants: Vec<String> = (0..11).map(|i| format!("db{i}:delete")).collect();
    grants.extend(extra.iter().map(|g| (*g).to_owned()));
    let r = s
        .start_task(&identity, &grants.join(" "), "prod", PURPOSE)
        .await;
    let task = r["access_token"].as_str().unwrap().to_owned();
    (s, task)
}

#[tokio::test]
async fn a_task_has_at_most_ten_steps_waiting_for_a_person() {
    let (s, task) = eleven_dbs(&[]).await;
    let mut ids = Vec::new();
    for i in 0..10 {
        let r = s
            .access_token(&task, &format!("db{i}"), Some("delete"))
            .await;
        r.assert_error(400, "authorization_pending");
        ids.push(r.body["auth_req_id"].as_str().unwrap().to_owned());
    }
    let r = s.access_token(&task, "db10", Some("delete")).await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("already wait for a person"), "{}", r.text);
    // A decision makes room.
    let r = deny(&s, &ids[0], Some(&alice_id(&s)), "no").await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = s.access_token(&task, "db10", Some("delete")).await;
    r.assert_error(400, "authorization_pending");
    s.stop().await;
}

/// An agent's tasks together hold at most fifty steps waiting for a person:
/// starting task after task does not crowd other agents' steps out of the
/// approvers' queue. Another agent is not held back; a decision makes room.
#[tokio::test]
async fn an_agent_has_at_most_fifty_steps_waiting_across_its_tasks() {
    let (s, first) = eleven_dbs(&[]).await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let grants: Vec<String> = (0..11).map(|i| format!("db{i}:delete")).collect();
    let new_task = |identity: String| {
        let s = &s;
        let grants = grants.join(" ");
        async move {
            s.start_task(&identity, &grants, "prod", PURPOSE).await["access_token"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let mut tasks = vec![first];
    for _ in 0..5 {
        tasks.push(new_task(identity.clone()).await);
    }
    let mut ids = Vec::new();
    for task in &tasks[..5] {
        for i in 0..10 {
            ids.push(pending_step(&s, task, &format!("db{i}"), "delete").await);
        }
    }
    let r = s.access_token(&tasks[5], "db0", Some("delete")).await;
    r.assert_error(400, "invalid_request");
    assert!(
        r.text
            .contains("50 steps of this agent's tasks already wait"),
        "{}",
        r.text
    );
    let other = new_task(s.k8s.kubernetes("agents", "reviewer")).await;
    pending_step(&s, &other, "db0", "delete").await;
    let r = deny(&s, &ids[0], Some(&alice_id(&s)), "no").await;
    assert_eq!(r.status, 200, "{}", r.text);
    pending_step(&s, &tasks[5], "db0", "delete").await;
    s.stop().await;
}

/// A denial binds the task it was asked in, so the agent may ask again
/// from another: the person deciding then sees the same agent's recent
/// denials at that tool, in any of its tasks (not another agent's, not
/// another tool's, and not a step's own).
#[tokio::test]
async fn an_approver_sees_the_agents_recent_denials_at_the_tool() {
    let (s, first) = eleven_dbs_with(&[], vec![approved_deletes()]).await;
    let denied = pending_step(&s, &first, "db0", "delete").await;
    let r = deny(&s, &denied, Some(&alice_id(&s)), "no deletes today").await;
    assert_eq!(r.status, 200, "{}", r.text);
    // A sub-agent acting for the agent, refused at another tool.
    let helper = delegate_to(&s, first.clone(), "helper").await;
    let helpers = pending_step(&s, &helper, "db1", "delete").await;
    let r = deny(&s, &helpers, Some(&alice_id(&s)), "not the helper").await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Asked again, from a new task.
    let new_task = |agent: &str| {
        let s = &s;
        let identity = s.k8s.kubernetes("agents", agent);
        async move {
            s.start_task(&identity, "db0:delete db1:delete", "prod", PURPOSE)
                .await["access_token"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };
    let second = new_task("coder").await;
    let again = pending_step(&s, &second, "db0", "delete").await;
    let elsewhere = pending_step(&s, &second, "db1", "delete").await;
    let theirs = new_task("reviewer").await;
    let other_agent = pending_step(&s, &theirs, "db0", "delete").await;

    let (_, first_claims) = decode_parts(&first);
    let listed = list(&s, Some(&alice_id(&s))).await;
    assert_eq!(listed.status, 200, "{}", listed.text);
    let step = |id: &str| self::listed(&listed, id);
    let recent = step(&again)["recent_denials"].clone();
    assert_eq!(recent.as_array().map(Vec::len), Some(1), "{recent}");
    let d = &recent[0];
    assert_eq!(d["auth_req_id"], denied.as_str());
    assert_eq!(d["task"], first_claims["txn"]);
    assert_eq!(d["actions"], "delete");
    assert_eq!(d["decided_by"], "alice");
    assert_eq!(d["reason"], "no deletes today");
    assert_eq!(d["actor"], Value::Null, "the agent's own: {d}");
    assert!(d["decided_at"].as_u64().is_some(), "{d}");
    // At the other tool, the sub-agent's denial, naming it.
    let at_db1 = step(&elsewhere)["recent_denials"].clone();
    assert_eq!(at_db1.as_array().map(Vec::len), Some(1), "{at_db1}");
    assert_eq!(at_db1[0]["auth_req_id"], helpers.as_str());
    assert_eq!(
        at_db1[0]["actor"],
        json!({"issuer": K8S_ISSUER, "subject": "system:serviceaccount:agents:helper"})
    );
    assert_eq!(step(&other_agent)["recent_denials"], json!([]));
    // One step alone: the same; the denied step does not list itself.
    assert_eq!(shown(&s, &again).await["recent_denials"], recent);
    let alone = shown(&s, &denied).await;
    assert_eq!(alone["state"], "denied");
    assert_eq!(alone["recent_denials"], json!([]));
    s.stop().await;
}

/// A policy file by which sub-agents may delete, with a person's approval
/// (over the repository's `delegated-read-only`).
fn approved_deletes() -> (String, String) {
    (
        "delegated-read-only.cedar".to_owned(),
        "@id(\"delegated-read-only\")\nforbid (principal, action, resource) when { context.delegation_depth > 0 } unless { action == Action::\"read\" || context.approved };\n"
            .to_owned(),
    )
}

/// Delegates the task of `from` to the sub-agent `actor` (namespace
/// `agents`); the sub-task's token.
async fn delegate_to(s: &TestServer, from: String, actor: &str) -> String {
    let actor = s.k8s.kubernetes("agents", actor);
    let r = s
        .post_form(
            "/token",
            &[
                (
                    "grant_type",
                    "urn:ietf:params:oauth:grant-type:token-exchange",
                ),
                ("subject_token", from.as_str()),
                (
                    "subject_token_type",
                    "urn:ietf:params:oauth:token-type:txn_token",
                ),
                ("actor_token", actor.as_str()),
                ("actor_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    r.body["access_token"].as_str().unwrap().to_owned()
}

/// A sub-agent's tasks in one tree together hold at most ten steps
/// waiting for a person: delegating to itself, task after task, it cannot
/// take the agent's fifty places from the agent's other work. The agent,
/// its other sub-agents and the same sub-agent in another tree are not
/// held back; a decision makes room.
#[tokio::test]
async fn a_sub_agent_has_at_most_ten_steps_waiting_for_an_agent() {
    let (s, root) = eleven_dbs_with(&[], vec![approved_deletes()]).await;
    let delegate = |from: String, actor: &'static str| delegate_to(&s, from, actor);
    let helper = delegate(root.clone(), "helper").await;
    // The helper delegates to itself.
    let again = delegate(helper.clone(), "helper").await;
    let mut ids = Vec::new();
    for i in 0..6 {
        ids.push(pending_step(&s, &helper, &format!("db{i}"), "delete").await);
    }
    for i in 0..4 {
        ids.push(pending_step(&s, &again, &format!("db{i}"), "delete").await);
    }
    // Its own task has room (six of ten), but the helper has no more.
    for task in [&helper, &again] {
        let r = s.access_token(task, "db9", Some("delete")).await;
        r.assert_error(400, "invalid_request");
        assert!(
            r.text
                .contains("10 steps of this sub-agent's tasks in this task's tree already wait"),
            "{}",
            r.text
        );
    }
    // The agent's own task, another sub-agent, and the same sub-agent in
    // another of the agent's trees are not held back.
    pending_step(&s, &root, "db9", "delete").await;
    let reviewer = delegate(root.clone(), "reviewer").await;
    pending_step(&s, &reviewer, "db9", "delete").await;
    let coder = s.k8s.kubernetes("agents", "coder");
    let other_root = s.start_task(&coder, "db9:delete", "prod", PURPOSE).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let elsewhere = delegate(other_root, "helper").await;
    pending_step(&s, &elsewhere, "db9", "delete").await;
    let r = deny(&s, &ids[0], Some(&alice_id(&s)), "no").await;
    assert_eq!(r.status, 200, "{}", r.text);
    pending_step(&s, &again, "db9", "delete").await;
    s.stop().await;
}

/// Steps a denial answers stop waiting at once: they no longer hold places
/// among a task's ten waiting steps (their polls still answer
/// `access_denied`, and nobody may approve them).
#[tokio::test]
async fn steps_a_denial_answers_make_room_at_once() {
    let (s, task) = eleven_dbs(&["github:read", "github:delete"]).await;
    let denied = pending_step(&s, &task, "github", "delete").await;
    let answered = pending_step(&s, &task, "github", "delete read").await;
    for i in 0..8 {
        pending_step(&s, &task, &format!("db{i}"), "delete").await;
    }
    let r = s.access_token(&task, "db8", Some("delete")).await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("already wait for a person"), "{}", r.text);
    assert_eq!(
        deny(&s, &denied, Some(&alice_id(&s)), "no").await.status,
        200
    );
    // Two places free: the denied step's, and the one it answers.
    pending_step(&s, &task, "db8", "delete").await;
    pending_step(&s, &task, "db9", "delete").await;
    s.access_token(&task, "db10", Some("delete"))
        .await
        .assert_error(400, "invalid_request");
    let r = poll(&s, &task, &answered).await;
    r.assert_error(400, "access_denied");
    assert!(
        r.text.contains("a person denied `delete` at `github`"),
        "{}",
        r.text
    );
    let r = approve(&s, &answered, Some(&alice_id(&s))).await;
    r.assert_error(409, "conflict");
    assert!(r.text.contains("a person denied `delete`"), "{}", r.text);
    let (_, tc) = decode_parts(&task);
    let recorded = s.audit().await.into_iter().any(|a| {
        a.event == "approval.expired"
            && a.agent_sub.as_deref() == tc["sub"].as_str()
            && a.agent_sub.is_some()
            && a.reason.as_deref().is_some_and(|r| {
                r.starts_with(&format!(
                    "auth_req_id {answered} was answered by the denial"
                ))
            })
    });
    assert!(recorded, "no record of the step the denial answered");
    // It may still be denied itself: a wider no.
    let r = deny(&s, &answered, Some(&alice_id(&s)), "nor this").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["state"], "denied", "{}", r.text);
    let r = poll(&s, &task, &answered).await;
    r.assert_error(400, "access_denied");
    assert!(r.text.contains("nor this"), "{}", r.text);
    s.stop().await;
}

#[tokio::test]
async fn polling_is_pending_then_slow_down_when_too_fast() {
    // An interval the two polls below fall within even on a loaded machine.
    let s = TestServer::start_with(edit(|c| {
        c.approvers = vec![alice()];
        c.approval_poll_interval = 5;
    }))
    .await;
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    poll(&s, &task, &id)
        .await
        .assert_error(400, "authorization_pending");
    poll(&s, &task, &id).await.assert_error(400, "slow_down");
    // After the interval, pending again.
    tokio::time::sleep(Duration::from_millis(5100)).await;
    poll(&s, &task, &id)
        .await
        .assert_error(400, "authorization_pending");
    s.stop().await;
}

/// An approver removed from the configuration (perhaps compromised) after
/// approving a step: the step's token is not handed out by a scrip
/// restarted without them; with them still listed, it is.
#[tokio::test]
async fn a_step_approved_by_someone_no_longer_an_approver_is_not_collected() {
    let keep = tempfile::tempdir().unwrap();
    let data_dir = keep.path().join("data");
    let db = data_dir.join("scrip.db");
    let with = move |approvers: Vec<Approver>| {
        let data_dir = data_dir.clone();
        edit(move |c| {
            c.data_dir = data_dir;
            // The same issuer across restarts, wherever each listens.
            c.issuer = Some("https://scrip.test".into());
            c.approvers = approvers;
        })
    };
    let s = TestServer::start_with(with(vec![alice(), bob()])).await;
    let (one, two) = (prod_task(&s).await, prod_task(&s).await);
    let (a, b) = (pending(&s, &one).await, pending(&s, &two).await);
    for id in [&a, &b] {
        let r = approve(&s, id, Some(&alice_id(&s))).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    s.stop().await;

    // Alice is removed: her approval hands out nothing.
    let s = TestServer::start_with(with(vec![bob()])).await;
    let r = poll(&s, &one, &a).await;
    r.assert_error(400, "access_denied");
    assert!(
        r.text
            .contains("`alice`, who approved this step, is no longer an approver"),
        "{}",
        r.text
    );
    // The refused collection is on the record, with why.
    let audit = {
        use scrip_store::Store as _;
        let store = scrip_store::SqliteStore::open(&db).await.unwrap();
        store
            .audit(&scrip_store::AuditFilter::default())
            .await
            .unwrap()
    };
    let used = audit
        .iter()
        .find(|a| a.event == "approval.used")
        .expect("the refused collection is not on the record");
    assert_eq!(used.decision.as_deref(), Some("deny"), "{used:?}");
    assert!(
        used.reason
            .as_deref()
            .is_some_and(|r| r.starts_with(&format!("auth_req_id {a}: "))
                && r.contains("is no longer an approver")),
        "{used:?}"
    );
    assert!(used.agent_sub.is_some() && used.tool.is_some(), "{used:?}");
    // Asked again, as the refusal says: a new step for the approvers, not
    // alice's handed back.
    let again = pending(&s, &one).await;
    assert_ne!(again, a);
    s.stop().await;

    // Still listed: the other step's token is handed out.
    let s = TestServer::start_with(with(vec![alice(), bob()])).await;
    let r = poll(&s, &two, &b).await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.stop().await;
}

#[tokio::test]
async fn approval_yields_one_token_for_exactly_the_step() {
    let s = server().await;
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    poll(&s, &task, &id)
        .await
        .assert_error(400, "authorization_pending");
    let r = approve(&s, &id, Some(&alice_id(&s))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["state"], "approved", "{}", r.text);
    let r = poll(&s, &task, &id).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.headers["cache-control"], "no-store");
    assert_eq!(r.body["token_type"], "Bearer");
    assert_eq!(r.body["issued_token_type"], ACCESS);
    assert_eq!(r.body["scope"], "delete");
    let expires_in = r.body["expires_in"].as_u64().unwrap();
    assert!((1..=60).contains(&expires_in), "{expires_in}");
    let token = r.body["access_token"].as_str().unwrap();
    let (h, c) = decode_parts(token);
    let (_, tc) = decode_parts(&task);
    assert_eq!(h["typ"], "at+jwt");
    assert_eq!(c["aud"], "github");
    assert_eq!(c["scope"], "delete");
    assert_eq!(c["sub"], AGENT);
    assert_eq!(c["txn"], tc["txn"]);
    assert_eq!(
        c["approval"],
        json!({"id": id, "approver": "alice", "single_use": true})
    );
    let (iat, exp) = (c["iat"].as_u64().unwrap(), c["exp"].as_u64().unwrap());
    assert!(exp <= iat + 60, "exp {exp} iat {iat}");
    assert!(exp <= now() + 60);
    assert!(exp <= tc["exp"].as_u64().unwrap());
    s.stop().await;
}

#[tokio::test]
async fn the_approved_token_never_outlives_its_task() {
    let s = server().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let r = s
        .try_start_task(&identity, "github:delete", "prod", PURPOSE, Some(20))
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let task = r.body["access_token"].as_str().unwrap().to_owned();
    let id = pending(&s, &task).await;
    let r = approved_token(&s, &task, &id).await;
    let (_, c) = decode_parts(r.body["access_token"].as_str().unwrap());
    let (_, tc) = decode_parts(&task);
    assert!(c["exp"].as_u64().unwrap() <= tc["exp"].as_u64().unwrap());
    assert!(r.body["expires_in"].as_u64().unwrap() <= 20, "{}", r.text);
    s.stop().await;
}

#[tokio::test]
async fn a_second_poll_after_the_token_is_invalid_grant() {
    let s = server().await;
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    approved_token(&s, &task, &id).await;
    poll(&s, &task, &id)
        .await
        .assert_error(400, "invalid_grant");
    // Waiting does not help.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    poll(&s, &task, &id)
        .await
        .assert_error(400, "invalid_grant");
    s.stop().await;
}

/// Introspects `token` as the workload `namespace`/`name`.
async fn introspect_as(s: &TestServer, token: &str, namespace: &str, name: &str) -> Reply {
    s.introspect_as(&s.k8s.kubernetes(namespace, name), token)
        .await
}

/// RFC 7662 §4: where a tool names its resource servers, its tokens are
/// active to them only; another caller (an agent, or the resource server
/// of another tool) gets `{"active":false}`, and spends no single use.
#[tokio::test]
async fn a_tools_tokens_are_active_only_to_its_introspectors() {
    let s = TestServer::start_with(edit(|c| {
        c.approvers = vec![alice()];
        for t in &mut c.tools {
            if t.name.as_str() == "github" {
                t.introspectors = vec![scrip_config::Introspector {
                    issuer: K8S_ISSUER.to_owned(),
                    subject: "system:serviceaccount:resource-servers:github-proxy".to_owned(),
                }];
            }
        }
    }))
    .await;
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    let r = approved_token(&s, &task, &id).await;
    let once = r.body["access_token"].as_str().unwrap();
    // Asked by others: inactive, the use not spent, the question recorded.
    for (namespace, name) in [("agents", "coder"), ("resource-servers", "jira-proxy")] {
        let r = introspect_as(&s, once, namespace, name).await;
        assert_eq!(r.status, 200, "{}", r.text);
        assert_eq!(r.body, json!({"active": false}), "{namespace}/{name}");
    }
    // The introspector's very subject, signed by another trusted issuer,
    // is someone else.
    let elsewhere = s.github.sign(
        &s.github
            .claims("system:serviceaccount:resource-servers:github-proxy"),
    );
    let r = s.introspect_as(&elsewhere, once).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body, json!({"active": false}));
    assert_eq!(
        introspections_of(&s.audit().await, once, "none of the tool's introspectors"),
        3
    );
    // github's resource server: active, once.
    let r = s.introspect(once).await;
    assert_eq!(r.body["active"], true, "{}", r.text);
    assert_eq!(s.introspect(once).await.body, json!({"active": false}));
    // A tool naming none: any trusted caller, as before.
    let identity = s.k8s.kubernetes("agents", "coder");
    let jira = s.start_task(&identity, "jira:read", "prod", PURPOSE).await;
    let jira = s
        .access_token(jira["access_token"].as_str().unwrap(), "jira", Some("read"))
        .await;
    let jira = jira.body["access_token"].as_str().unwrap();
    let r = introspect_as(&s, jira, "agents", "coder").await;
    assert_eq!(r.body["active"], true, "{}", r.text);
}

#[tokio::test]
async fn the_approved_token_introspects_active_once() {
    let s = server().await;
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    let r = approved_token(&s, &task, &id).await;
    let token = r.body["access_token"].as_str().unwrap();
    let r = s.introspect(token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["active"], true, "{}", r.text);
    assert_eq!(r.body["scope"], "delete");
    assert_eq!(r.body["aud"], "github");
    let r = s.introspect(token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body, json!({"active": false}));
    assert_eq!(s.introspect(token).await.body, json!({"active": false}));
    // The use is spent with the record of the answer that spent it, next to
    // it in the trail; the inactive answers after it name the token too.
    let jti = r_jti(token);
    let trail: Vec<(String, Option<String>)> = s
        .audit()
        .await
        .into_iter()
        .filter(|a| a.jti.as_deref() == Some(jti.as_str()) && a.event != "token.issued")
        .map(|a| (a.event, a.decision))
        .collect();
    assert_eq!(
        trail,
        [
            ("approval.used".to_owned(), Some("allow".to_owned())),
            ("token.used".to_owned(), None),
            ("token.introspected".to_owned(), Some("allow".to_owned())),
            ("token.introspected".to_owned(), Some("deny".to_owned())),
            ("token.introspected".to_owned(), Some("deny".to_owned())),
        ]
    );
    // The record of the spent use names the agent, as `scrip audit query
    // --agent` looks for it.
    let (_, claims) = decode_parts(token);
    let audit = s.audit().await;
    let used = audit
        .iter()
        .find(|a| a.event == "token.used" && a.jti.as_deref() == Some(jti.as_str()))
        .unwrap();
    assert_eq!(used.agent_sub.as_deref(), claims["sub"].as_str());
    assert_eq!(used.agent_iss.as_deref(), claims["agent_iss"].as_str());
    assert!(used.agent_iss.is_some());
    assert!(
        s.audit()
            .await
            .iter()
            .any(|a| a.jti.as_deref() == Some(jti.as_str())
                && a.reason.as_deref()
                    == Some("inactive: its single use was spent, or it was revoked"))
    );
    s.stop().await;
}

/// A resource server that gives up on its introspection while the claim
/// of the single use waits on the store, whose commit then fails, spends
/// no use: once the store is back, the token introspects active, once.
/// (The handler runs on without its caller, and takes back the use's
/// mark when the commit fails.)
#[tokio::test]
async fn an_introspection_dropped_before_its_claim_is_written_spends_no_use() {
    let s = server().await;
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    let r = approved_token(&s, &task, &id).await;
    let token = r.body["access_token"].as_str().unwrap();
    let held = s.hold_writes().await;
    let dropped = tokio::time::timeout(Duration::from_millis(500), s.introspect(token)).await;
    assert!(dropped.is_err(), "answered while the store was held");
    // The claim's commit waits out the store's busy time (5 s) and fails.
    // The upkeep's purge of the second (it commits every second) may have
    // reached the writer first, as a batch of its own that waits out its
    // own 5 s: the claim's fails by 10 s.
    tokio::time::sleep(Duration::from_secs(13)).await;
    release(held).await;
    let r = s.introspect(token).await;
    assert_eq!(r.body["active"], true, "{}", r.text);
    assert_eq!(s.introspect(token).await.body, json!({"active": false}));
    s.stop().await;
}

/// The `jti` of a token (its claims read, not verified).
fn r_jti(token: &str) -> String {
    use base64::Engine as _;
    let payload = token.split('.').nth(1).unwrap();
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    claims["jti"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_denial_answers_access_denied_with_the_reason() {
    let s = server().await;
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    let r = deny(&s, &id, Some(&alice_id(&s)), "not during the freeze").await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["state"], "denied", "{}", r.text);
    let r = poll(&s, &task, &id).await;
    r.assert_error(400, "access_denied");
    assert!(
        r.body["error_description"]
            .as_str()
            .unwrap()
            .contains("not during the freeze"),
        "{}",
        r.text
    );
    // It stays denied.
    tokio::time::sleep(Duration::from_millis(2100)).await;
    poll(&s, &task, &id)
        .await
        .assert_error(400, "access_denied");
    // Asking again is refused at once, rather than put to the approvers
    // again until someone gives in.
    let before = list(&s, Some(&alice_id(&s))).await.text;
    for _ in 0..2 {
        let r = s.access_token(&task, "github", Some("delete")).await;
        r.assert_error(400, "access_denied");
        assert!(
            r.text.contains("a person denied `delete` at `github`")
                && r.text.contains("not during the freeze"),
            "{}",
            r.text
        );
    }
    assert_eq!(list(&s, Some(&alice_id(&s))).await.text, before);
    let asked = requested(&s).await;
    assert_eq!(asked, 1, "the denied step was asked once");
    s.stop().await;
}

/// A denied step is not asked again a piece at a time: a step with any
/// action that needed approval in it is refused, while what policy allows
/// outright is still issued.
#[tokio::test]
async fn a_denied_step_is_not_asked_again_in_pieces() {
    let s = server().await;
    let task = prod_task_with(&s, "github:read github:delete").await;
    let id = pending_step(&s, &task, "github", "read delete").await;
    assert_eq!(
        deny(&s, &id, Some(&alice_id(&s)), "no deletes")
            .await
            .status,
        200
    );
    let r = s.access_token(&task, "github", Some("delete")).await;
    r.assert_error(400, "access_denied");
    assert!(r.text.contains("no deletes"), "{}", r.text);
    let r = s.access_token(&task, "github", Some("read")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let asked = requested(&s).await;
    assert_eq!(asked, 1, "the denied step was asked again");
    s.stop().await;
}

/// A denial also answers the steps asked before it that share an action
/// with it: asking again for one answers the denial, not its waiting
/// approval; no person can approve one; polling for one answers
/// `access_denied`. Steps that share nothing with it go on waiting.
#[tokio::test]
async fn a_denial_answers_the_overlapping_steps_asked_before_it() {
    let s = TestServer::start_with(edit(|c| {
        c.approvers = vec![alice(), bob()];
    }))
    .await;
    let task = prod_task_with(&s, "github:read github:delete deploy:delete").await;
    let mut ids = Vec::new();
    for (tool, actions) in [
        ("github", "read delete"),
        ("github", "delete"),
        ("deploy", "delete"),
    ] {
        ids.push(pending_step(&s, &task, tool, actions).await);
    }
    assert_eq!(requested(&s).await, 3);
    assert_eq!(
        deny(&s, &ids[0], Some(&alice_id(&s)), "no deletes")
            .await
            .status,
        200
    );
    let r = s.access_token(&task, "github", Some("delete")).await;
    r.assert_error(400, "access_denied");
    assert!(r.text.contains("no deletes"), "{}", r.text);
    let bob = s.k8s.kubernetes("people", "bob");
    let listed = list(&s, Some(&bob)).await.text;
    assert!(
        !listed.contains(&ids[0]) && !listed.contains(&ids[1]),
        "{listed}"
    );
    assert!(listed.contains(&ids[2]), "{listed}");
    let r = approve(&s, &ids[1], Some(&bob)).await;
    r.assert_error(409, "conflict");
    assert!(
        r.text.contains("a person denied `delete read` at `github`"),
        "{}",
        r.text
    );
    let r = poll(&s, &task, &ids[1]).await;
    r.assert_error(400, "access_denied");
    assert!(r.text.contains("no deletes"), "{}", r.text);
    // Another tool's step is not the denied one's.
    poll(&s, &task, &ids[2])
        .await
        .assert_error(400, "authorization_pending");
    assert_eq!(approve(&s, &ids[2], Some(&bob)).await.status, 200);
    assert_eq!(poll(&s, &task, &ids[2]).await.status, 200);
    assert_eq!(requested(&s).await, 3);
    s.stop().await;
}

/// A step asked through a replica whose clock runs ahead of the one a
/// person denies through is still answered by the denial: its `created_at`
/// reads later than the denial's `decided_at`, but the denial came after
/// it (one before it would have refused it), so another person cannot
/// grant what was just refused. So too where `approval_ttl` is shorter
/// than the replicas' clocks may be apart (`clock_skew`).
#[tokio::test]
async fn a_denial_answers_a_step_stamped_by_a_clock_ahead() {
    for approval_ttl in [600, 10] {
        let s = TestServer::start_with(edit(move |c| {
            c.approvers = vec![alice(), bob()];
            c.approval_ttl = approval_ttl;
        }))
        .await;
        let task = prod_task_with(&s, "github:read github:delete").await;
        let denied = pending_step(&s, &task, "github", "read delete").await;
        let ahead = pending_step(&s, &task, "github", "delete").await;
        // Asked by a replica 20 s ahead (within the default `clock_skew`).
        let db = store_db(&s).await;
        let moved = sqlx::query(
            "UPDATE approvals SET created_at = created_at + 20, expires_at = expires_at + 20 \
             WHERE id = ?",
        )
        .bind(&ahead)
        .execute(&db)
        .await
        .unwrap();
        assert_eq!(moved.rows_affected(), 1);
        db.close().await;
        assert_eq!(
            deny(&s, &denied, Some(&alice_id(&s)), "no deletes")
                .await
                .status,
            200
        );
        let bob = s.k8s.kubernetes("people", "bob");
        assert!(!list(&s, Some(&bob)).await.text.contains(&ahead));
        let r = approve(&s, &ahead, Some(&bob)).await;
        r.assert_error(409, "conflict");
        let r = poll(&s, &task, &ahead).await;
        r.assert_error(400, "access_denied");
        assert!(r.text.contains("no deletes"), "{approval_ttl}: {}", r.text);
        s.stop().await;
    }
}

/// A step is answered only by the denials its own lifetime weighed: one
/// asked where `approval_ttl` was shorter, once an older denial's lock-out
/// had passed there, is not answered by that denial on a replica (or after
/// a restart) with a longer setting.
#[tokio::test]
async fn a_denial_older_than_a_steps_own_lifetime_does_not_answer_it() {
    let s = TestServer::start_with(edit(|c| {
        c.approvers = vec![alice(), bob()];
        c.approval_ttl = 900;
    }))
    .await;
    let task = prod_task_with(&s, "github:read github:delete").await;
    let denied = pending_step(&s, &task, "github", "delete").await;
    assert_eq!(
        deny(&s, &denied, Some(&alice_id(&s)), "not now")
            .await
            .status,
        200
    );
    let db = store_db(&s).await;
    let set = |sql: &'static str, id: String| {
        let db = &db;
        async move {
            let changed = sqlx::query(sql).bind(id).execute(db).await.unwrap();
            assert_eq!(changed.rows_affected(), 1, "{sql}");
        }
    };
    // Past the lock-out (1,000 s ago), the step is asked again.
    set(
        "UPDATE approvals SET decided_at = decided_at - 1000 WHERE id = ?",
        denied.clone(),
    )
    .await;
    let again = pending_step(&s, &task, "github", "delete").await;
    // As if asked where `approval_ttl` was 300, the denial then 400 s old.
    set(
        "UPDATE approvals SET decided_at = decided_at + 600 WHERE id = ?",
        denied,
    )
    .await;
    set(
        "UPDATE approvals SET expires_at = created_at + 300 WHERE id = ?",
        again.clone(),
    )
    .await;
    db.close().await;
    poll(&s, &task, &again)
        .await
        .assert_error(400, "authorization_pending");
    let bob = s.k8s.kubernetes("people", "bob");
    assert_eq!(approve(&s, &again, Some(&bob)).await.status, 200);
    assert_eq!(poll(&s, &task, &again).await.status, 200);
    s.stop().await;
}

/// A denial answers only the waiting steps that need approval for one of
/// its actions: one that shares with it only an action policy allows
/// outright goes on waiting, and can be approved.
#[tokio::test]
async fn a_denial_leaves_a_step_that_shares_only_an_allowed_action() {
    let s = TestServer::start_with(Options {
        extra_policies: vec![(
            "write-needs-approval.cedar".into(),
            "forbid (principal, action == Action::\"write\", resource) unless { context.approved };\n"
                .into(),
        )],
        edit: Some(Box::new(|c: &mut Config| {
            c.approvers = vec![alice(), bob()];
        })),
        ..Options::default()
    })
    .await;
    let task = prod_task_with(&s, "github:read github:write github:delete").await;
    let mut ids = Vec::new();
    for actions in ["read delete", "read write"] {
        ids.push(pending_step(&s, &task, "github", actions).await);
    }
    assert_eq!(
        deny(&s, &ids[1], Some(&alice_id(&s)), "no writes")
            .await
            .status,
        200
    );
    // Asking again for what was denied, or for a step holding `write`.
    for actions in ["read write", "write delete"] {
        let r = s.access_token(&task, "github", Some(actions)).await;
        r.assert_error(400, "access_denied");
        assert!(r.text.contains("no writes"), "{actions}: {}", r.text);
    }
    // `read delete` shares only `read`, which needs nobody's approval.
    let r = s.access_token(&task, "github", Some("read delete")).await;
    r.assert_error(400, "authorization_pending");
    assert_eq!(r.body["auth_req_id"], ids[0].as_str());
    let bob = s.k8s.kubernetes("people", "bob");
    assert!(list(&s, Some(&bob)).await.text.contains(&ids[0]));
    assert_eq!(approve(&s, &ids[0], Some(&bob)).await.status, 200);
    let r = poll(&s, &task, &ids[0]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["scope"], "delete read");
    s.stop().await;
}

/// Two people deciding at once, each check passed before the other
/// committed, or a denial after the approval: until the token is
/// collected, a denial that answers the step wins, and the step becomes
/// denied, on the record. A step the denial does not answer is redeemed.
#[tokio::test]
async fn an_approval_that_raced_a_denial_is_not_redeemed() {
    use scrip_store::{ApprovalState, SqliteStore, Store as _, Write};
    let s = server().await;
    let store = SqliteStore::open(&s.dir.path().join("data/scrip.db"))
        .await
        .unwrap();
    for (denied_after, other_tool) in [(0, false), (1, false), (0, true)] {
        let task = prod_task_with(&s, "github:read github:delete deploy:delete").await;
        let approved = pending(&s, &task).await;
        let (tool, actions) = if other_tool {
            ("deploy", "delete")
        } else {
            ("github", "delete read")
        };
        let denied = pending_step(&s, &task, tool, actions).await;
        // Decided once both were asked: a denial counts against the steps
        // asked before it (read once for the whole loop, a second could
        // pass between it and a step's asking, and the denial would
        // predate the step).
        let t = now();
        let decide = |id: &str, to, at, reason: Option<&str>| Write::UpdateApproval {
            id: id.to_owned(),
            from: ApprovalState::Pending,
            to,
            by: Some("alice".into()),
            at,
            reason: reason.map(str::to_owned),
            token_jti: None,
        };
        store
            .commit(vec![
                decide(&approved, ApprovalState::Approved, t, None),
                decide(
                    &denied,
                    ApprovalState::Denied,
                    t + denied_after,
                    Some("raced"),
                ),
            ])
            .await
            .unwrap();
        let r = poll(&s, &task, &approved).await;
        if other_tool {
            assert_eq!(r.status, 200, "{}", r.text);
            continue;
        }
        r.assert_error(400, "access_denied");
        assert!(r.text.contains("raced"), "{}", r.text);
        let again = poll(&s, &task, &approved).await;
        again.assert_error(400, "access_denied");
        assert!(
            again.text.contains("a person denied this step"),
            "{}",
            again.text
        );
        let shown: Value = s
            .http
            .get(format!("{}/approvals/{approved}", s.url))
            .bearer_auth(alice_id(&s))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(shown["state"], "denied", "{shown}");
        let recorded = s.audit().await.into_iter().any(|a| {
            a.event == "approval.denied"
                && a.reason.as_deref().is_some_and(|r| {
                    r.starts_with(&format!(
                        "auth_req_id {approved}: approved by alice, then answered"
                    ))
                })
        });
        assert!(recorded, "no record of the overruled approval");
    }
    s.stop().await;
}

/// A pool on the server's embedded store, to change it behind its back.
async fn store_db(s: &TestServer) -> sqlx::SqlitePool {
    let path = s.dir.path().join("data/scrip.db");
    sqlx::SqlitePool::connect(&format!("sqlite://{}", path.display()))
        .await
        .unwrap()
}

/// A trigger `deny_meanwhile` that, `when` (its event and condition), denies
/// the waiting step `other` (bob: "raced") in the same transaction: a
/// denial committed just before the check of whatever fired it. The pool
/// it was made on, to drop it with.
async fn deny_meanwhile(s: &TestServer, when: &str, other: &str) -> sqlx::SqlitePool {
    let db = store_db(s).await;
    // The ids are scrip's own random ones: nothing to escape.
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "CREATE TRIGGER deny_meanwhile {when} BEGIN \
         UPDATE approvals SET state = 'denied', decided_by = 'bob', reason = 'raced', \
         decided_at = CAST(strftime('%s', 'now') AS INTEGER) WHERE id = '{other}'; END"
    )))
    .execute(&db)
    .await
    .unwrap();
    db
}

/// A person's denial committed between a poll's read of the task's
/// denials and its token's commit (by another replica, or another request
/// here) stops the token: the commit refuses it and the step is read
/// again. A trigger puts the denial into the token's very commit, ahead
/// of its check, so every attempt sees one.
#[tokio::test]
async fn a_denial_committed_while_a_poll_issues_stops_its_token() {
    use scrip_store::{ApprovalState, SqliteStore, Store as _};
    let s = TestServer::start_with(edit(|c| c.approvers = vec![alice(), bob()])).await;
    let task = prod_task_with(&s, "github:read github:delete").await;
    let approved = pending(&s, &task).await;
    let other = pending_step(&s, &task, "github", "delete read").await;
    assert_eq!(
        approve(&s, &approved, Some(&alice_id(&s))).await.status,
        200
    );
    let path = s.dir.path().join("data/scrip.db");
    let db = deny_meanwhile(
        &s,
        &format!(
            "AFTER UPDATE OF state ON approvals WHEN NEW.id = '{approved}' AND NEW.state = 'used'"
        ),
        &other,
    )
    .await;
    let r = poll(&s, &task, &approved).await;
    r.assert_error(400, "authorization_pending");
    assert!(r.text.contains("being denied"), "{}", r.text);
    let store = SqliteStore::open(&path).await.unwrap();
    let read = |id: String| {
        let store = &store;
        async move { store.approval(&id).await.unwrap().unwrap().state }
    };
    assert_eq!(read(approved.clone()).await, ApprovalState::Approved);
    assert_eq!(read(other.clone()).await, ApprovalState::Pending);
    assert!(
        !s.audit().await.iter().any(|a| a.event == "approval.used"),
        "a token was recorded"
    );
    sqlx::query("DROP TRIGGER deny_meanwhile")
        .execute(&db)
        .await
        .unwrap();
    // The denial, made for real now, answers the step at its next poll.
    let bob = s.k8s.kubernetes("people", "bob");
    assert_eq!(deny(&s, &other, Some(&bob), "no deletes").await.status, 200);
    let r = poll(&s, &task, &approved).await;
    r.assert_error(400, "access_denied");
    assert!(r.text.contains("no deletes"), "{}", r.text);
    assert_eq!(read(approved).await, ApprovalState::Denied);
    s.stop().await;
}

/// Opening a step races a denial alike: one committed after the request
/// read the task's denials fails the step's commit, and the request reads
/// again (three times, then it says so).
#[tokio::test]
async fn a_denial_committed_while_a_step_opens_is_read_again() {
    let s = TestServer::start_with(edit(|c| c.approvers = vec![alice(), bob()])).await;
    let task = prod_task_with(&s, "github:read github:delete").await;
    let other = pending(&s, &task).await;
    let db = deny_meanwhile(
        &s,
        &format!("AFTER INSERT ON approvals WHEN NEW.id <> '{other}'"),
        &other,
    )
    .await;
    let r = s.access_token(&task, "github", Some("delete read")).await;
    r.assert_error(503, "temporarily_unavailable");
    assert_eq!(requested(&s).await, 1);
    sqlx::query("DROP TRIGGER deny_meanwhile")
        .execute(&db)
        .await
        .unwrap();
    let bob = s.k8s.kubernetes("people", "bob");
    assert_eq!(deny(&s, &other, Some(&bob), "no deletes").await.status, 200);
    let r = s.access_token(&task, "github", Some("delete read")).await;
    r.assert_error(400, "access_denied");
    assert!(r.text.contains("no deletes"), "{}", r.text);
    s.stop().await;
}

/// An approved step's single token is handed out only with its durable
/// record (SPEC: fail closed): while the store cannot take it, the poll
/// answers 503 and nothing is issued; once it can, exactly one token.
#[tokio::test]
async fn an_approved_steps_token_waits_for_a_store_that_can_record_it() {
    let s = server().await;
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    assert_eq!(approve(&s, &id, Some(&alice_id(&s))).await.status, 200);
    let held = s.hold_writes().await;
    let r = poll(&s, &task, &id).await;
    r.assert_error(503, "temporarily_unavailable");
    assert!(!r.text.contains("eyJ"), "{}", r.text);
    release(held).await;
    let r = poll(&s, &task, &id).await;
    assert_eq!(r.status, 200, "{}", r.text);
    poll(&s, &task, &id)
        .await
        .assert_error(400, "invalid_grant");
    let used = s
        .audit()
        .await
        .iter()
        .filter(|a| a.event == "approval.used" && a.decision.as_deref() == Some("allow"))
        .count();
    assert_eq!(used, 1);
    s.stop().await;
}

/// SPEC invariant 1 across the flows: no token presented or issued, no DPoP
/// proof, nor a part of one that could be put back together (its claims,
/// its signature), reaches the audit trail, the logs, or the description
/// of a refusal: delegation, a DPoP-bound exchange, an approval and its
/// poll, and refused requests included.
#[tokio::test]
async fn no_token_or_proof_leaks_into_the_trail_the_logs_or_a_refusal() {
    use scrip_testkit::dpop::DpopKey;
    let logs = captured_logs();
    let s = server().await;
    let token_url = format!("{}/token", s.url);
    let mut secrets: Vec<String> = Vec::new();
    let mut refusals: Vec<String> = Vec::new();
    let identity = s.k8s.kubernetes("agents", "coder");
    let dev = s.start_task(&identity, "github:read", "dev", PURPOSE).await;
    let dev = dev["access_token"].as_str().unwrap().to_owned();
    // A delegation, its actor's identity and the child's token.
    let actor = s.spiffe.spiffe("acme.example", "/reviewer");
    let r = s
        .post_form(
            "/token",
            &[
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", &dev),
                ("subject_token_type", TXN),
                ("actor_token", &actor),
                ("actor_token_type", JWT),
                ("requested_token_type", TXN),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    secrets.push(r.body["access_token"].as_str().unwrap().to_owned());
    // A DPoP-bound exchange, and its proof replayed.
    let key = DpopKey::new();
    let proof = key.proof("POST", &token_url, None);
    let r = s
        .access_token_dpop(&dev, "github", Some("read"), &[&proof])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    secrets.push(r.body["access_token"].as_str().unwrap().to_owned());
    let r = s
        .access_token_dpop(&dev, "github", Some("read"), &[&proof])
        .await;
    refusals.push(r.text);
    let wrong = key.proof("POST", "https://elsewhere.example/token", None);
    refusals.push(
        s.access_token_dpop(&dev, "github", Some("read"), &[&wrong])
            .await
            .text,
    );
    secrets.extend([proof, wrong]);
    // An approval, its approver's identity, its poll and the token.
    let prod = prod_task(&s).await;
    let id = pending(&s, &prod).await;
    let alice = alice_id(&s);
    assert_eq!(approve(&s, &id, Some(&alice)).await.status, 200);
    refusals.push(poll(&s, &dev, &id).await.text);
    let r = poll(&s, &prod, &id).await;
    assert_eq!(r.status, 200, "{}", r.text);
    secrets.push(r.body["access_token"].as_str().unwrap().to_owned());
    refusals.push(poll(&s, &prod, &id).await.text);
    // An expired identity, and a task token presented as an identity.
    let mut expired = s.k8s.claims("system:serviceaccount:agents:coder");
    expired["exp"] = json!(now() - 3600);
    let expired = s.k8s.sign(&expired);
    refusals.push(
        s.try_start_task(&expired, "github:read", "dev", PURPOSE, None)
            .await
            .text,
    );
    refusals.push(
        s.try_start_task(&dev, "github:read", "dev", PURPOSE, None)
            .await
            .text,
    );
    secrets.extend([identity, dev, actor, prod, alice, expired]);
    assert!(
        refusals.iter().all(|r| r.contains("\"error\"")),
        "{refusals:#?}"
    );
    let trail: Vec<String> = s
        .audit()
        .await
        .iter()
        .map(|a| serde_json::to_string(a).unwrap())
        .collect();
    let logged = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    for secret in &secrets {
        // A JWT's claims and signature; a part of another form whole.
        let parts: Vec<&str> = secret
            .split('.')
            .skip(1)
            .filter(|p| p.len() >= 16)
            .collect();
        for part in parts {
            for (place, text) in trail
                .iter()
                .map(|t| ("the audit trail", t))
                .chain(refusals.iter().map(|r| ("a refusal", r)))
                .chain(std::iter::once(("the logs", &logged)))
            {
                assert!(
                    !text.contains(part),
                    "{place} holds part of a token: {text}"
                );
            }
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn a_denial_needs_a_reason() {
    let s = server().await;
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    let r = s
        .post_raw(
            &format!("/approvals/{id}/deny"),
            "application/x-www-form-urlencoded",
            Vec::new(),
            Some(&alice_id(&s)),
        )
        .await;
    r.assert_error(400, "invalid_request");
    // Still pending.
    poll(&s, &task, &id)
        .await
        .assert_error(400, "authorization_pending");
    s.stop().await;
}

/// A decided step is not decided again, and the conflict says how it was
/// decided and by whom (a person whose answer was lost, asking again,
/// learns that their decision was taken).
#[tokio::test]
async fn deciding_an_already_decided_approval_is_a_conflict() {
    let s = server().await;
    let alice = alice_id(&s);
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    assert_eq!(approve(&s, &id, Some(&alice)).await.status, 200);
    let again = approve(&s, &id, Some(&alice)).await;
    again.assert_error(409, "conflict");
    assert!(
        again.text.contains("already approved (by alice)"),
        "{}",
        again.text
    );
    deny(&s, &id, Some(&alice), "changed my mind")
        .await
        .assert_error(409, "conflict");
    // Used: still a conflict.
    assert_eq!(poll(&s, &task, &id).await.status, 200);
    approve(&s, &id, Some(&alice))
        .await
        .assert_error(409, "conflict");

    let id = pending(&s, &task).await;
    assert_eq!(deny(&s, &id, Some(&alice), "no").await.status, 200);
    approve(&s, &id, Some(&alice))
        .await
        .assert_error(409, "conflict");
    deny(&s, &id, Some(&alice), "no again")
        .await
        .assert_error(409, "conflict");
    let audit = s.stop_then_audit().await;
    let decided = |event: &str| audit.iter().filter(|a| a.event == event).count();
    assert_eq!(
        (decided("approval.granted"), decided("approval.denied")),
        (1, 1)
    );
}

/// The list holds the oldest 1,000 steps waiting and says when more wait:
/// approvers are not left to think the queue ends there.
#[tokio::test]
async fn the_list_says_when_more_wait_than_it_shows() {
    let s = server().await;
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    // 1,000 more of the same, through another handle on the store (the
    // caps scrip keeps would take a hundred tasks and twenty agents).
    let mut held = s.hold_writes().await;
    sqlx::query("CREATE TEMP TABLE copy AS SELECT * FROM approvals WHERE id = ?1")
        .bind(&id)
        .execute(&mut held)
        .await
        .unwrap();
    for i in 0..1000 {
        sqlx::query("UPDATE copy SET id = ?1, created_at = created_at + 1")
            .bind(format!("{id}-{i:04}"))
            .execute(&mut held)
            .await
            .unwrap();
        sqlx::query("INSERT INTO approvals SELECT * FROM copy")
            .execute(&mut held)
            .await
            .unwrap();
    }
    sqlx::query("COMMIT").execute(&mut held).await.unwrap();
    let alice = alice_id(&s);
    let r = list(&s, Some(&alice)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["approvals"].as_array().unwrap().len(), 1000);
    assert_eq!(r.body["more"], true);
    // The oldest first: the one scrip opened is there.
    assert_eq!(r.body["approvals"][0]["auth_req_id"], id.as_str());
    sqlx::query("DELETE FROM approvals WHERE id = ?1")
        .bind(format!("{id}-0999"))
        .execute(&mut held)
        .await
        .unwrap();
    let r = list(&s, Some(&alice)).await;
    assert_eq!(r.body["approvals"].as_array().unwrap().len(), 1000);
    assert_eq!(r.body["more"], false, "{}", r.text);
    drop(held);
    s.stop().await;
}

#[tokio::test]
async fn an_undecided_approval_expires() {
    let s = TestServer::start_with(edit(|c| {
        c.approvers = vec![alice()];
        // The shortest life an agent polling at the interval can use.
        (c.approval_ttl, c.approval_poll_interval) = (2, 1);
    }))
    .await;
    let task = prod_task(&s).await;
    let r = s.access_token(&task, "github", Some("delete")).await;
    r.assert_error(400, "authorization_pending");
    assert_eq!(r.body["expires_in"], 2, "{}", r.text);
    let id = r.body["auth_req_id"].as_str().unwrap().to_owned();
    tokio::time::sleep(Duration::from_millis(3100)).await;
    poll(&s, &task, &id)
        .await
        .assert_error(400, "expired_token");
    // The sweeper records the expiry.
    let expired = eventually(5, || async {
        s.audit().await.iter().any(|e| {
            e.event == "approval.expired" && e.reason.as_deref().is_some_and(|r| r.contains(&id))
        })
    })
    .await;
    assert!(expired, "no approval.expired audit record");
    let audit = s.audit().await;
    let e = audit
        .iter()
        .find(|e| e.event == "approval.expired")
        .unwrap();
    let (_, tc) = decode_parts(&task);
    assert_eq!(e.task_id.as_deref(), tc["txn"].as_str());
    // With the task's agent, as `scrip audit query --agent` looks for it.
    assert_eq!(e.agent_sub.as_deref(), tc["sub"].as_str());
    assert_eq!(e.agent_iss.as_deref(), tc["tctx"]["agent_iss"].as_str());
    assert!(e.agent_iss.is_some());
    assert_eq!(e.tool.as_deref(), Some("github"));
    assert_eq!(e.actions.as_deref(), Some("delete"));
    // Marked expired: still expired_token, and not listed.
    poll(&s, &task, &id)
        .await
        .assert_error(400, "expired_token");
    let r = list(&s, Some(&alice_id(&s))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["approvals"], json!([]), "{}", r.text);
    s.stop().await;
}

#[tokio::test]
async fn approving_an_expired_approval_is_a_conflict() {
    let s = TestServer::start_with(edit(|c| {
        c.approvers = vec![alice()];
        (c.approval_ttl, c.approval_poll_interval) = (2, 1);
    }))
    .await;
    let alice = alice_id(&s);
    let task = prod_task(&s).await;
    // Expired but maybe not yet swept.
    let id = pending(&s, &task).await;
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let r = approve(&s, &id, Some(&alice)).await;
    r.assert_error(409, "conflict");
    // "has expired" by its time, or "already expired" once swept: which
    // one depends on the sweep's second.
    assert!(r.text.contains("expired"), "{}", r.text);
    // Swept.
    let id2 = pending(&s, &task).await;
    tokio::time::sleep(Duration::from_millis(3000)).await;
    approve(&s, &id2, Some(&alice))
        .await
        .assert_error(409, "conflict");
    deny(&s, &id2, Some(&alice), "too late")
        .await
        .assert_error(409, "conflict");
    poll(&s, &task, &id)
        .await
        .assert_error(400, "expired_token");
    poll(&s, &task, &id2)
        .await
        .assert_error(400, "expired_token");
    s.stop().await;
}

#[tokio::test]
async fn a_poll_with_another_tasks_token_is_invalid_grant() {
    let s = server().await;
    let task = prod_task(&s).await;
    let other = prod_task(&s).await;
    let id = pending(&s, &task).await;
    poll(&s, &other, &id)
        .await
        .assert_error(400, "invalid_grant");
    // Even once approved, the other task gets nothing, and the owner still can.
    assert_eq!(approve(&s, &id, Some(&alice_id(&s))).await.status, 200);
    poll(&s, &other, &id)
        .await
        .assert_error(400, "invalid_grant");
    assert_eq!(poll(&s, &task, &id).await.status, 200);
    s.stop().await;
}

#[tokio::test]
async fn a_poll_for_an_unknown_auth_req_id_is_invalid_grant() {
    let s = server().await;
    let task = prod_task(&s).await;
    poll(&s, &task, "no-such-request")
        .await
        .assert_error(400, "invalid_grant");
    s.stop().await;
}

#[tokio::test]
async fn a_poll_needs_the_task_token() {
    let s = server().await;
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    s.post_form("/token", &[("grant_type", CIBA), ("auth_req_id", &id)])
        .await
        .assert_error(400, "invalid_request");
    s.post_form("/token", &[("grant_type", CIBA), ("subject_token", &task)])
        .await
        .assert_error(400, "invalid_request");
    // An identity token is not a task token.
    let identity = s.k8s.kubernetes("agents", "coder");
    poll(&s, &identity, &id)
        .await
        .assert_error(400, "invalid_request");
    s.stop().await;
}

#[tokio::test]
async fn approving_needs_an_approver_identity() {
    let s = server().await;
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    // No identity, a bad one.
    approve(&s, &id, None)
        .await
        .assert_error(401, "invalid_token");
    approve(&s, &id, Some("not-a-jwt"))
        .await
        .assert_error(401, "invalid_token");
    deny(&s, &id, None, "no")
        .await
        .assert_error(401, "invalid_token");
    // An identity from an untrusted issuer.
    let stranger = Idp::new("https://evil.example").kubernetes("people", "alice");
    approve(&s, &id, Some(&stranger))
        .await
        .assert_error(401, "invalid_token");
    // A trusted identity that is not an approver.
    let bob = s.k8s.kubernetes("people", "bob");
    let r = approve(&s, &id, Some(&bob)).await;
    r.assert_error(403, "access_denied");
    deny(&s, &id, Some(&bob), "no")
        .await
        .assert_error(403, "access_denied");
    // Alice's subject from another issuer is not alice.
    let fake = s.github.sign(&s.github.claims(ALICE));
    approve(&s, &id, Some(&fake))
        .await
        .assert_error(403, "access_denied");
    // Nothing was decided.
    poll(&s, &task, &id)
        .await
        .assert_error(400, "authorization_pending");
    // An unknown id, for an approver.
    approve(&s, "no-such-approval", Some(&alice_id(&s)))
        .await
        .assert_error(404, "not_found");
    deny(&s, "no-such-approval", Some(&alice_id(&s)), "no")
        .await
        .assert_error(404, "not_found");
    // Each attempt by a trusted identity that is not an approver on the
    // waiting step is on the record, naming who tried.
    approve(&s, "no-such-approval", Some(&bob))
        .await
        .assert_error(403, "access_denied");
    let audit = s.audit().await;
    let refused: Vec<_> = audit
        .iter()
        .filter(|a| a.event == "approval.refused")
        .collect();
    assert_eq!(refused.len(), 3, "{refused:?}");
    for (a, verb) in refused.iter().zip(["approving", "denying", "approving"]) {
        assert_eq!(a.decision.as_deref(), Some("deny"));
        assert!(
            a.reason
                .as_deref()
                .is_some_and(|r| r.starts_with(&format!("{verb} auth_req_id {id}: "))
                    && r.contains("is not an approver")),
            "{a:?}"
        );
        assert!(a.task_id.is_some() && a.tool.is_some(), "{a:?}");
    }
    assert_eq!(
        refused[0].agent_sub.as_deref(),
        Some("system:serviceaccount:people:bob")
    );
    // Once decided, the step no longer waits: an attempt on it is answered
    // alike, unrecorded.
    assert_eq!(approve(&s, &id, Some(&alice_id(&s))).await.status, 200);
    approve(&s, &id, Some(&bob))
        .await
        .assert_error(403, "access_denied");
    let after = s.audit().await;
    assert_eq!(
        after
            .iter()
            .filter(|a| a.event == "approval.refused")
            .count(),
        3
    );
    s.stop().await;
}

#[tokio::test]
async fn separation_of_duties_refuses_the_agent_itself() {
    let s = TestServer::start_with(edit(|c| {
        c.approvers = vec![alice(), approver("coder", K8S_ISSUER, AGENT)];
    }))
    .await;
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    let coder = s.k8s.kubernetes("agents", "coder");
    let r = approve(&s, &id, Some(&coder)).await;
    r.assert_error(403, "access_denied");
    assert!(r.text.contains("separation of duties"), "{}", r.text);
    deny(&s, &id, Some(&coder), "no")
        .await
        .assert_error(403, "access_denied");
    poll(&s, &task, &id)
        .await
        .assert_error(400, "authorization_pending");
    // The agent's attempts at its own step are on the record.
    let audit = s.audit().await;
    let refused: Vec<_> = audit
        .iter()
        .filter(|a| a.event == "approval.refused")
        .collect();
    assert_eq!(refused.len(), 2, "{refused:?}");
    for a in refused {
        assert_eq!(a.agent_sub.as_deref(), Some(AGENT), "{a:?}");
        assert!(
            a.reason
                .as_deref()
                .is_some_and(|r| r.contains(&id) && r.contains("separation of duties")),
            "{a:?}"
        );
    }
    // Someone else may.
    assert_eq!(approve(&s, &id, Some(&alice_id(&s))).await.status, 200);
    s.stop().await;
}

/// A person known by several identities (entries of one name) may not
/// approve, signed in with one, a step of a task started with another.
#[tokio::test]
async fn separation_of_duties_covers_every_identity_of_a_person() {
    let s = TestServer::start_with(edit(|c| {
        c.approvers = vec![
            alice(),
            approver("carol", K8S_ISSUER, AGENT),
            approver("carol", K8S_ISSUER, "system:serviceaccount:people:carol"),
        ];
    }))
    .await;
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    let carol = s.k8s.kubernetes("people", "carol");
    let r = approve(&s, &id, Some(&carol)).await;
    r.assert_error(403, "access_denied");
    assert!(r.text.contains("separation of duties"), "{}", r.text);
    assert_eq!(approve(&s, &id, Some(&alice_id(&s))).await.status, 200);
    s.stop().await;
}

#[tokio::test]
async fn without_separation_of_duties_the_agent_may_approve() {
    let s = TestServer::start_with(edit(|c| {
        c.approvers = vec![approver("coder", K8S_ISSUER, AGENT)];
        c.separation_of_duties = false;
    }))
    .await;
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    let coder = s.k8s.kubernetes("agents", "coder");
    let r = approve(&s, &id, Some(&coder)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = poll(&s, &task, &id).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (_, c) = decode_parts(r.body["access_token"].as_str().unwrap());
    assert_eq!(c["approval"]["approver"], "coder");
    s.stop().await;
}

/// Lets sub-agents do more than read, so a child can hold `delete`.
fn delegation_allowed(f: impl FnOnce(&mut Config) + Send + 'static) -> Options {
    Options {
        extra_policies: vec![(
            "delegated-read-only.cedar".into(),
            "// replaced by the approval tests\n".into(),
        )],
        edit: Some(Box::new(f)),
        ..Options::default()
    }
}

const ACTOR: &str = "spiffe://acme.example/reviewer";

/// A child of a prod task, acted by the SPIFFE reviewer, holding github:delete.
async fn child_task(s: &TestServer) -> String {
    let parent = prod_task(s).await;
    delegate_to_reviewer(s, &parent, "github:delete").await
}

/// A child of `parent` holding `scope`, acted by the SPIFFE reviewer.
async fn delegate_to_reviewer(s: &TestServer, parent: &str, scope: &str) -> String {
    let r = s
        .try_delegate(parent, &reviewer_token(s), Some(scope), None)
        .await;
    assert_eq!(r.status, 200, "delegate: {}", r.text);
    r.body["access_token"].as_str().unwrap().to_owned()
}

/// A rule that asks for a person only when a task is started (its
/// `context.stage` is `task`): the task holds the grant, and each use of
/// it waits for a person, though at the token stage policy allows it
/// outright. A sub-task holding the grant holds it so too, though the rule
/// spares delegations.
#[tokio::test]
async fn a_grant_held_at_task_start_needs_a_person_at_each_use() {
    let mut options = delegation_allowed(|c| c.approvers = vec![alice()]);
    options.extra_policies.push((
        "write-at-start-needs-approval.cedar".into(),
        r#"@id("write-at-start-needs-approval")
forbid (principal, action == Action::"write", resource)
when { context.stage == "task" && context.delegation_depth == 0 && context.environment == "prod" }
unless { context.approved };
"#
        .into(),
    ));
    let s = TestServer::start_with(options).await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let r = s
        .start_task(&identity, "github:read github:write", "prod", PURPOSE)
        .await;
    assert_eq!(r["scope"], "github:read github:write", "{r}");
    let task = r["access_token"].as_str().unwrap().to_owned();
    // `read` was allowed outright: issued. `write` waits for a person.
    let r = s.access_token(&task, "github", Some("read")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let id = pending_step(&s, &task, "github", "write").await;
    let r = s.access_token(&task, "github", Some("read write")).await;
    r.assert_error(400, "authorization_pending");
    let record = s
        .audit()
        .await
        .into_iter()
        .find(|a| a.event == "token.decision" && a.actions.as_deref() == Some("write"))
        .unwrap();
    assert_eq!(record.decision.as_deref(), Some("deny"));
    assert!(
        record
            .reason
            .as_deref()
            .unwrap()
            .contains("holds `github:write` only with a person's approval"),
        "{record:?}"
    );
    let r = approved_token(&s, &task, &id).await;
    let (_, c) = decode_parts(r.body["access_token"].as_str().unwrap());
    assert_eq!(c["scope"], "write", "{c}");
    assert_eq!(c["approval"]["approver"], "alice", "{c}");
    // A sub-task: the rule spares the delegation, but the parent holds
    // the grant only so.
    let child = delegate_to_reviewer(&s, &task, "github:read github:write").await;
    let r = s.access_token(&child, "github", Some("read")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    pending_step(&s, &child, "github", "write").await;
    s.stop().await;
}

/// The policy asked again when an approved step is collected sees the
/// issuers of the sub-agents acting (`context.delegation_issuers`): a rule
/// loaded while the step waited, that shuts out an issuer's sub-agents,
/// refuses the collection, and only for them.
#[tokio::test]
async fn an_approved_steps_collection_sees_the_sub_agents_issuers() {
    let s = TestServer::start_with(delegation_allowed(|c| c.approvers = vec![alice()])).await;
    let child = child_task(&s).await;
    let id = pending(&s, &child).await;
    let task = prod_task(&s).await;
    let own = pending(&s, &task).await;
    std::fs::write(
        s.dir.path().join("policies/zz-no-spiffe-sub-agents.cedar"),
        format!(
            r#"@id("no-spiffe-sub-agents")
forbid (principal, action, resource)
when {{ context.delegation_issuers.contains("{SPIFFE_ISSUER}") }};
"#
        ),
    )
    .unwrap();
    let reloaded = eventually(20, || async {
        s.audit().await.iter().any(|a| a.event == "policy.reloaded")
    })
    .await;
    assert!(reloaded, "the policy was not reloaded");
    let r = approve(&s, &id, Some(&alice_id(&s))).await;
    assert_eq!(r.status, 200, "approve: {}", r.text);
    let r = poll(&s, &child, &id).await;
    r.assert_error(400, "access_denied");
    let decision = s
        .audit()
        .await
        .into_iter()
        .find(|a| a.policies == ["no-spiffe-sub-agents"])
        .unwrap();
    assert_eq!(decision.decision.as_deref(), Some("deny"), "{decision:?}");
    // The agent's own step, approved, is collected.
    approved_token(&s, &task, &own).await;
    s.stop().await;
}

fn reviewer_token(s: &TestServer) -> String {
    s.spiffe.spiffe("acme.example", "/reviewer")
}

/// The agent that delegates holds its actor's identity token, which signs
/// in to the approvals too: an approver is not made a sub-agent, so that no
/// set-up needs an approver's token in an agent's hands (scrip cannot tell
/// who holds a token: the token itself still approves).
#[tokio::test]
async fn an_approver_is_never_made_a_sub_agent() {
    let s = TestServer::start_with(delegation_allowed(|c| {
        c.approvers = vec![alice(), approver("reviewer", SPIFFE_ISSUER, ACTOR)];
    }))
    .await;
    let parent = prod_task(&s).await;
    let reviewer = reviewer_token(&s);
    let r = s
        .try_delegate(&parent, &reviewer, Some("github:delete"), None)
        .await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("approvers"), "{}", r.text);
    // On the record, naming the actor refused.
    let refused = s
        .audit()
        .await
        .into_iter()
        .rfind(|a| a.event == "task.refused")
        .expect("no task.refused");
    assert!(
        refused
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("approvers")),
        "{refused:?}"
    );
    // Why: the reviewer's token approves the agent's own step, whoever
    // presents it.
    let own = pending(&s, &parent).await;
    let r = approve(&s, &own, Some(&reviewer)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.stop().await;

    // The tree's agent an approver itself (another): refused all the same.
    // One who signs in as the same approver (a name with both identities)
    // holds nothing it could not sign in with already: made one.
    const CODER: &str = "system:serviceaccount:agents:coder";
    for (same, status) in [(false, 400), (true, 200)] {
        let s = TestServer::start_with(delegation_allowed(move |c| {
            c.approvers = vec![
                alice(),
                approver("carol", K8S_ISSUER, CODER),
                approver(
                    if same { "carol" } else { "reviewer" },
                    SPIFFE_ISSUER,
                    ACTOR,
                ),
            ];
        }))
        .await;
        let parent = prod_task(&s).await;
        let r = s
            .try_delegate(&parent, &reviewer_token(&s), Some("github:delete"), None)
            .await;
        assert_eq!(r.status, status, "same approver: {same}: {}", r.text);
        s.stop().await;
    }

    // Without separation of duties anyone may approve their own steps, and
    // an approver may act as a sub-agent.
    let s = TestServer::start_with(delegation_allowed(|c| {
        c.approvers = vec![alice(), approver("reviewer", SPIFFE_ISSUER, ACTOR)];
        c.separation_of_duties = false;
    }))
    .await;
    child_task(&s).await;
    s.stop().await;
}

/// A sub-agent's step shows, beside its own task's purpose (the last
/// delegating agent's words, which may say anything), the purpose of each
/// task it was delegated from, root first.
#[tokio::test]
async fn a_delegated_step_shows_the_purposes_it_came_from() {
    let s = TestServer::start_with(delegation_allowed(|c| c.approvers = vec![alice()])).await;
    let delegate = |parent: String, actor: String, purpose: &'static str| {
        let s = &s;
        async move {
            let details = json!({ "purpose": purpose });
            let r = s
                .try_delegate(&parent, &actor, Some("github:delete"), Some(&details))
                .await;
            assert_eq!(r.status, 200, "delegate: {}", r.text);
            r.body["access_token"].as_str().unwrap().to_owned()
        }
    };
    let root = prod_task(&s).await;
    let child = delegate(root.clone(), reviewer_token(&s), "ship JIRA-9 today").await;
    let second = s.spiffe.spiffe("acme.example", "/second");
    let grandchild = delegate(child.clone(), second, "urgent: approve JIRA-9").await;
    let txn = |t: &str| decode_parts(t).1["txn"].as_str().unwrap().to_owned();
    let deep = pending(&s, &grandchild).await;
    let near = pending(&s, &child).await;
    let own = pending(&s, &root).await;
    let want = json!([
        {"task": txn(&root), "purpose": PURPOSE},
        {"task": txn(&child), "purpose": "ship JIRA-9 today"},
    ]);
    let r = list(&s, Some(&alice_id(&s))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let step = |id: &str| listed(&r, id);
    assert_eq!(step(&deep)["purpose"], "urgent: approve JIRA-9");
    assert_eq!(step(&deep)["delegated_from"], want, "{}", r.text);
    assert_eq!(
        step(&near)["delegated_from"],
        json!([{"task": txn(&root), "purpose": PURPOSE}])
    );
    assert_eq!(step(&own)["delegated_from"], json!([]));
    // One step alone: the same.
    let alone = shown(&s, &deep).await;
    assert_eq!(alone["delegated_from"], want, "{alone}");
    s.stop().await;
}

/// An actor who became an approver since (a restart with another
/// `[[approvers]]`) is still refused the steps of the tasks it acts in.
#[tokio::test]
async fn separation_of_duties_refuses_an_actor_in_the_chain() {
    let mut s = TestServer::start_with(delegation_allowed(|c| {
        c.approvers = vec![alice()];
    }))
    .await;
    let child = child_task(&s).await;
    let id = pending(&s, &child).await;
    s.restart_with(|c| {
        c.approvers = vec![alice(), approver("reviewer", SPIFFE_ISSUER, ACTOR)];
    })
    .await;
    let reviewer = s.spiffe.spiffe("acme.example", "/reviewer");
    let r = approve(&s, &id, Some(&reviewer)).await;
    r.assert_error(403, "access_denied");
    assert!(r.text.contains("separation of duties"), "{}", r.text);
    // The control: the reviewer is an approver, of a task it does not act in.
    let other = prod_task(&s).await;
    let other_id = pending(&s, &other).await;
    let r = approve(&s, &other_id, Some(&reviewer)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Approvers see the chain.
    let r = list(&s, Some(&alice_id(&s))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(
        r.body["approvals"].as_array().unwrap().len(),
        1,
        "{}",
        r.text
    );
    let a = &r.body["approvals"][0];
    assert_eq!(a["auth_req_id"], id.as_str(), "{}", r.text);
    assert_eq!(a["delegation_depth"], 1, "{}", r.text);
    assert_eq!(a["delegation_chain"], json!([ACTOR]), "{}", r.text);
    // With the issuer of each, as for the agent.
    assert_eq!(
        a["delegation_actors"],
        json!([{"issuer": SPIFFE_ISSUER, "subject": ACTOR}]),
        "{}",
        r.text
    );
    // Alice approves; the token carries the act chain.
    let r = approved_token(&s, &child, &id).await;
    let (_, c) = decode_parts(r.body["access_token"].as_str().unwrap());
    assert_eq!(c["act"]["sub"], ACTOR, "{c}");
    assert_eq!(c["approval"]["approver"], "alice");
    // The decision's record names the sub-task's parent and chain, as the
    // sub-task's own records do.
    let audit = s.audit().await;
    let txn = decode_parts(&child).1["txn"].as_str().unwrap().to_owned();
    let granted = audit
        .iter()
        .find(|a| a.event == "approval.granted" && a.task_id.as_deref() == Some(txn.as_str()))
        .expect("no approval.granted");
    assert_eq!(granted.chain, [ACTOR], "{granted:?}");
    assert!(granted.parent_id.is_some(), "{granted:?}");
    s.stop().await;
}

#[tokio::test]
async fn approvers_list_the_pending_approvals_with_everything_asked() {
    let s = server().await;
    let alice = alice_id(&s);
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    // Only approvers see it.
    list(&s, None).await.assert_error(401, "invalid_token");
    list(&s, Some("not-a-jwt"))
        .await
        .assert_error(401, "invalid_token");
    let bob = s.k8s.kubernetes("people", "bob");
    list(&s, Some(&bob))
        .await
        .assert_error(403, "access_denied");
    let coder = s.k8s.kubernetes("agents", "coder");
    list(&s, Some(&coder))
        .await
        .assert_error(403, "access_denied");

    let r = list(&s, Some(&alice)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.headers["cache-control"], "no-store");
    let all = r.body["approvals"].as_array().unwrap();
    assert_eq!(all.len(), 1, "{}", r.text);
    let a = &all[0];
    let (_, tc) = decode_parts(&task);
    assert_eq!(a["auth_req_id"], id.as_str());
    assert_eq!(a["state"], "pending");
    assert_eq!(a["task"], tc["txn"]);
    assert_eq!(a["agent"], json!({"issuer": K8S_ISSUER, "subject": AGENT}));
    assert_eq!(a["purpose"], PURPOSE);
    assert_eq!(a["environment"], "prod");
    assert_eq!(a["tool"], "github");
    assert_eq!(a["actions"], "delete");
    assert_eq!(a["delegation_depth"], 0);
    assert_eq!(a["delegation_chain"], json!([]));
    let (created, expires) = (
        a["created_at"].as_u64().unwrap(),
        a["expires_at"].as_u64().unwrap(),
    );
    assert_eq!(expires, created + 600);

    // Decided ones leave the list (another task's step waits beside it).
    let id2 = pending(&s, &prod_task(&s).await).await;
    assert_eq!(
        list(&s, Some(&alice)).await.body["approvals"]
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(approve(&s, &id, Some(&alice)).await.status, 200);
    assert_eq!(deny(&s, &id2, Some(&alice), "no").await.status, 200);
    let r = list(&s, Some(&alice)).await;
    assert_eq!(r.body["approvals"], json!([]), "{}", r.text);
    s.stop().await;
}

#[tokio::test]
async fn requests_decisions_and_uses_are_audited_with_the_approver() {
    let s = server().await;
    let alice = alice_id(&s);
    let task = prod_task(&s).await;
    let (_, tc) = decode_parts(&task);
    let txn = tc["txn"].as_str().unwrap();
    let id = pending(&s, &task).await;
    let r = approved_token(&s, &task, &id).await;
    let (_, c) = decode_parts(r.body["access_token"].as_str().unwrap());
    let id2 = pending(&s, &task).await;
    assert_eq!(deny(&s, &id2, Some(&alice), "not today").await.status, 200);

    let audit = s.audit().await;
    let requested: Vec<_> = audit
        .iter()
        .filter(|e| e.event == "approval.requested")
        .collect();
    assert_eq!(requested.len(), 2);
    for (e, id) in requested.iter().zip([&id, &id2]) {
        assert!(e.reason.as_deref().unwrap().contains(id.as_str()), "{e:?}");
        assert_eq!(e.task_id.as_deref(), Some(txn));
        assert_eq!(e.agent_sub.as_deref(), Some(AGENT));
        assert_eq!(e.tool.as_deref(), Some("github"));
        assert_eq!(e.actions.as_deref(), Some("delete"));
        assert_eq!(e.environment.as_deref(), Some("prod"));
        assert_eq!(e.purpose.as_deref(), Some(PURPOSE));
    }
    let granted = audit
        .iter()
        .find(|e| e.event == "approval.granted")
        .expect("approval.granted");
    assert_eq!(granted.decision.as_deref(), Some("allow"));
    assert_eq!(granted.task_id.as_deref(), Some(txn));
    assert_eq!(granted.tool.as_deref(), Some("github"));
    assert_eq!(granted.actions.as_deref(), Some("delete"));
    let reason = granted.reason.as_deref().unwrap();
    assert!(
        reason.contains("alice") && reason.contains(ALICE),
        "{reason}"
    );

    let used = audit
        .iter()
        .find(|e| e.event == "approval.used")
        .expect("approval.used");
    assert_eq!(used.decision.as_deref(), Some("allow"));
    assert_eq!(used.jti.as_deref(), c["jti"].as_str());
    assert_eq!(used.task_id.as_deref(), Some(txn));
    assert!(
        used.reason.as_deref().unwrap().contains("alice"),
        "{used:?}"
    );

    let denied = audit
        .iter()
        .find(|e| e.event == "approval.denied")
        .expect("approval.denied");
    assert_eq!(denied.decision.as_deref(), Some("deny"));
    assert_eq!(denied.task_id.as_deref(), Some(txn));
    let reason = denied.reason.as_deref().unwrap();
    assert!(
        reason.contains("alice") && reason.contains("not today"),
        "{reason}"
    );
    s.stop().await;
}

/// A webhook receiver: what it was sent (bodies and `Idempotency-Key`s),
/// and `first` as its first answer, 200 after.
#[derive(Clone)]
struct Hook {
    bodies: Arc<Mutex<Vec<Value>>>,
    keys: Arc<Mutex<Vec<String>>>,
    first: axum::http::StatusCode,
}

impl Default for Hook {
    fn default() -> Self {
        Self {
            bodies: Arc::default(),
            keys: Arc::default(),
            first: axum::http::StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

async fn hook(
    axum::extract::State(h): axum::extract::State<Hook>,
    headers: axum::http::HeaderMap,
    axum::Json(body): axum::Json<Value>,
) -> axum::http::StatusCode {
    let key = headers
        .get("idempotency-key")
        .map(|v| v.to_str().unwrap().to_owned());
    h.keys.lock().unwrap().push(key.unwrap_or_default());
    let mut bodies = h.bodies.lock().unwrap();
    bodies.push(body);
    if bodies.len() == 1 {
        h.first
    } else {
        axum::http::StatusCode::OK
    }
}

/// A webhook's secret is often in its path (Slack, Teams): a failed call
/// is logged without the URL.
#[tokio::test]
async fn a_failing_webhook_is_logged_without_its_url() {
    let logs = captured_logs();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let url = format!("http://{closed}/services/T0/B0/hook-secret-Zq81");
    let s = TestServer::start_with(edit(move |c| {
        c.approvers = vec![alice()];
        c.approval_webhook = Some(url);
    }))
    .await;
    let task = prod_task(&s).await;
    pending(&s, &task).await;
    let text = || String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    assert!(
        eventually(5, || async { text().contains("approval webhook failed") }).await,
        "{}",
        text()
    );
    assert!(!text().contains("hook-secret-Zq81"), "{}", text());
    s.stop().await;
}

/// A webhook receiver (failing its first call) and a server where alice
/// approves that calls it.
async fn with_hook() -> (Hook, tokio::task::JoinHandle<()>, TestServer) {
    with_hook_answering(Hook::default()).await
}

/// [`with_hook`] with the receiver `h`.
async fn with_hook_answering(h: Hook) -> (Hook, tokio::task::JoinHandle<()>, TestServer) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new()
        .route("/hook", axum::routing::post(hook))
        .with_state(h.clone());
    let server = tokio::spawn(async move {
        axum::serve(listener, app).await.unwrap();
    });
    let url = format!("http://{addr}/hook");
    let s = TestServer::start_with(edit(move |c| {
        c.approvers = vec![alice()];
        c.approval_webhook = Some(url);
    }))
    .await;
    (h, server, s)
}

#[tokio::test]
async fn the_webhook_hears_of_a_pending_approval_with_retries() {
    let (h, server, s) = with_hook().await;
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    let count = || h.bodies.lock().unwrap().len();
    assert!(
        eventually(10, || async { count() >= 2 }).await,
        "the webhook was not retried after a 500: {} calls",
        count()
    );
    // Success ends the retries.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    let bodies = h.bodies.lock().unwrap().clone();
    assert_eq!(bodies.len(), 2, "{bodies:#?}");
    assert_eq!(bodies[0], bodies[1]);
    // Each delivery names the step, so the receiver can tell a second one.
    assert_eq!(*h.keys.lock().unwrap(), [id.clone(), id.clone()]);
    let b = &bodies[1];
    let (_, tc) = decode_parts(&task);
    assert_eq!(b["auth_req_id"], id.as_str(), "{b}");
    assert_eq!(b["state"], "pending");
    assert_eq!(b["task"], tc["txn"]);
    assert_eq!(b["agent"], json!({"issuer": K8S_ISSUER, "subject": AGENT}));
    assert_eq!(b["purpose"], PURPOSE);
    assert_eq!(b["environment"], "prod");
    assert_eq!(b["tool"], "github");
    assert_eq!(b["actions"], "delete");
    assert_eq!(b["delegation_chain"], json!([]));
    assert_eq!(b["recent_denials"], json!([]));
    s.stop().await;
    server.abort();
}

/// A refusal that would be the same each time (a 404: the receiver is
/// gone) is not sent again.
#[tokio::test]
async fn a_webhook_refusing_for_good_is_not_called_again() {
    let (h, server, s) = with_hook_answering(Hook {
        first: axum::http::StatusCode::NOT_FOUND,
        ..Hook::default()
    })
    .await;
    let task = prod_task(&s).await;
    pending(&s, &task).await;
    let count = || h.bodies.lock().unwrap().len();
    assert!(eventually(10, || async { count() >= 1 }).await);
    // Past the first retry's delay (500 ms), twice over.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(count(), 1, "a 404 was retried");
    s.stop().await;
    server.abort();
}

/// A stop right after a step was asked waits for the webhook's retries
/// (a rolling deploy would otherwise cut them short, and nobody would call
/// the approvers again).
#[tokio::test]
async fn a_stop_waits_for_the_webhooks_retries() {
    let (h, server, s) = with_hook().await;
    let task = prod_task(&s).await;
    pending(&s, &task).await;
    // The first call fails; the retry comes 0.5 s later.
    s.stop().await;
    let calls = h.bodies.lock().unwrap().len();
    assert_eq!(calls, 2, "the stop did not wait for the retry");
    server.abort();
}

#[tokio::test]
async fn racing_polls_get_one_token() {
    let s = server().await;
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    assert_eq!(approve(&s, &id, Some(&alice_id(&s))).await.status, 200);
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let (caller, task, id) = (s.caller(), task.clone(), id.clone());
        set.spawn(async move {
            let r = caller
                .post_form(
                    "/token",
                    &[
                        ("grant_type", CIBA),
                        ("auth_req_id", &id),
                        ("subject_token", &task),
                    ],
                )
                .await;
            (r.status, r.body)
        });
    }
    let mut replies = Vec::new();
    while let Some(r) = set.join_next().await {
        replies.push(r.unwrap());
    }
    let ok = replies.iter().filter(|(status, _)| *status == 200).count();
    assert_eq!(ok, 1, "{replies:#?}");
    for (status, body) in replies.iter().filter(|(status, _)| *status != 200) {
        assert_eq!(
            (*status, &body["error"]),
            (400, &json!("invalid_grant")),
            "{body}"
        );
    }
    // The audit records the one token handed out, and no other.
    let (_, issued) = replies
        .iter()
        .find(|(status, _)| *status == 200)
        .map(|(_, b)| decode_parts(b["access_token"].as_str().unwrap()))
        .unwrap();
    let used: Vec<_> = s
        .audit()
        .await
        .into_iter()
        .filter(|e| e.event == "approval.used")
        .collect();
    assert_eq!(used.len(), 1, "{used:#?}");
    assert_eq!(used[0].jti.as_deref(), issued["jti"].as_str());
    s.stop().await;
}

#[tokio::test]
async fn racing_decisions_decide_once() {
    let s = server().await;
    let alice = alice_id(&s);
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    let (a, d) = tokio::join!(
        approve(&s, &id, Some(&alice)),
        deny(&s, &id, Some(&alice), "no")
    );
    let mut statuses = [a.status, d.status];
    statuses.sort_unstable();
    assert_eq!(statuses, [200, 409], "{a:?} {d:?}");
    // Only the decision that applied is audited.
    let decided: Vec<String> = s
        .audit()
        .await
        .into_iter()
        .filter(|e| e.event == "approval.granted" || e.event == "approval.denied")
        .map(|e| e.event)
        .collect();
    let won = if a.status == 200 {
        "approval.granted"
    } else {
        "approval.denied"
    };
    assert_eq!(decided, [won], "{a:?} {d:?}");
    s.stop().await;
}

#[tokio::test]
async fn an_approved_step_not_collected_in_time_expires() {
    let s = TestServer::start_with(edit(|c| {
        c.approvers = vec![alice()];
        // Whole seconds: 3 to 4 s left to approve, on a loaded machine.
        c.approval_ttl = 4;
    }))
    .await;
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    assert_eq!(approve(&s, &id, Some(&alice_id(&s))).await.status, 200);
    tokio::time::sleep(Duration::from_millis(5100)).await;
    // Told so when polled, before the sweeper ends it and after.
    let uncollected = || async {
        let r = poll(&s, &task, &id).await;
        r.assert_error(400, "expired_token");
        assert!(
            r.text
                .contains("was approved, but its token was not collected"),
            "{}",
            r.text
        );
    };
    uncollected().await;
    // The sweeper ends it, on the record.
    let expired = eventually(5, || async {
        s.audit().await.iter().any(|e| {
            e.event == "approval.expired"
                && e.reason
                    .as_deref()
                    .is_some_and(|r| r.contains(&id) && r.contains("not collected"))
        })
    })
    .await;
    assert!(expired, "no approval.expired audit record");
    uncollected().await;
    assert!(
        !s.audit().await.iter().any(|e| e.event == "approval.used"),
        "an expired approval issued a token"
    );
    s.stop().await;
}

/// Ids no approval can have are unknown, never a store error: PostgreSQL
/// refuses a NUL in text, which must not become a 503.
async fn odd_ids_are_unknown(s: &TestServer, task: &str) {
    let alice = alice_id(s);
    for id in ["a\0b", "a b", "../x", &"a".repeat(65)] {
        poll(s, task, id).await.assert_error(400, "invalid_grant");
        let path = form_urlencoded::byte_serialize(id.as_bytes()).collect::<String>();
        let r = s
            .http
            .post(format!("{}/approvals/{path}/approve", s.url))
            .bearer_auth(&alice)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 404, "{id:?}");
    }
    // A path that does not decode to UTF-8 is answered like any unknown id,
    // in JSON, and only after the caller is identified.
    for (method, path) in [
        (reqwest::Method::GET, "/approvals/%FF"),
        (reqwest::Method::POST, "/approvals/%FF/approve"),
        (reqwest::Method::POST, "/approvals/%FF/deny"),
    ] {
        for (bearer, status) in [(Some(alice.as_str()), 404), (None, 401)] {
            let mut req = s.http.request(method.clone(), format!("{}{path}", s.url));
            if let Some(b) = bearer {
                req = req.bearer_auth(b);
            }
            if path.ends_with("/deny") {
                req = req
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body("reason=no");
            }
            let r = req.send().await.unwrap();
            assert_eq!(r.status().as_u16(), status, "{method} {path}");
            assert_eq!(r.headers()["cache-control"], "no-store", "{method} {path}");
            let body: Value = r.json().await.unwrap();
            assert!(body["error"].is_string(), "{method} {path}: {body}");
        }
    }
    let id = pending(s, task).await;
    deny(s, &id, Some(&alice), "\0\u{7}\u{202e}\u{2028}")
        .await
        .assert_error(400, "invalid_request");
    assert_eq!(
        deny(s, &id, Some(&alice), "no\0\u{202e}\u{200b}pe")
            .await
            .status,
        200
    );
    poll(s, task, &id).await.assert_error(400, "access_denied");
}

#[tokio::test]
async fn odd_approval_ids_are_unknown_on_postgres() {
    let db = scrip_testkit::PgDatabase::new();
    let url = db.url().to_owned();
    let s = TestServer::start_with(edit(move |c| {
        c.approvers = vec![alice()];
        c.database_url = Some(url);
    }))
    .await;
    let task = prod_task(&s).await;
    odd_ids_are_unknown(&s, &task).await;
    s.stop().await;
}

#[tokio::test]
async fn odd_approval_ids_are_unknown_not_errors() {
    let s = server().await;
    let task = prod_task(&s).await;
    odd_ids_are_unknown(&s, &task).await;
    // A reason is text: control, bidirectional and invisible characters are
    // dropped, none at all refused.
    let denied = s.audit().await;
    let denied = denied
        .iter()
        .find(|e| e.event == "approval.denied")
        .unwrap();
    assert!(
        denied.reason.as_deref().unwrap().ends_with(": nope"),
        "{denied:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn the_approved_step_is_the_whole_step_asked() {
    let s = server().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let r = s
        .start_task(&identity, "github:read github:delete", "prod", PURPOSE)
        .await;
    let task = r["access_token"].as_str().unwrap().to_owned();
    let id = pending_step(&s, &task, "github", "read delete").await;
    let listed = list(&s, Some(&alice_id(&s))).await;
    assert_eq!(listed.body["approvals"][0]["actions"], "delete read");
    let r = approved_token(&s, &task, &id).await;
    assert_eq!(r.body["scope"], "delete read", "{}", r.text);
    // Reading alone needs no approval.
    let r = s.access_token(&task, "github", Some("read")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (_, c) = decode_parts(r.body["access_token"].as_str().unwrap());
    assert!(c.get("approval").is_none(), "{c}");
    s.stop().await;
}

/// An approver reads one step before deciding, and an approval sent with
/// the step the person was shown applies only if it is this one: an id
/// the agent passed on for another step decides nothing.
#[tokio::test]
async fn an_approval_applies_only_to_the_step_the_person_was_shown() {
    let s = server().await;
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    let alice = alice_id(&s);
    let get = |bearer: Option<String>, id: String| {
        let mut req = s.http.get(format!("{}/approvals/{id}", s.url));
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        async move {
            let r = req.send().await.unwrap();
            (
                r.status().as_u16(),
                r.json::<Value>().await.unwrap_or(Value::Null),
            )
        }
    };
    let (status, step) = get(Some(alice.clone()), id.clone()).await;
    assert_eq!(status, 200, "{step}");
    assert_eq!(step["state"], "pending");
    assert_eq!(step["tool"], "github");
    assert_eq!(step["actions"], "delete");
    assert_eq!(step["environment"], "prod");
    assert_eq!(get(None, id.clone()).await.0, 401);
    assert_eq!(get(Some(alice.clone()), "nosuchid".into()).await.0, 404);

    let task_id = step["task"].as_str().unwrap().to_owned();
    let path = format!("/approvals/{id}/approve");
    let send = |form: Vec<(&'static str, String)>| {
        let body = form
            .iter()
            .map(|(k, v)| format!("{k}={}", urlencode(v)))
            .collect::<Vec<_>>()
            .join("&");
        s.post_raw(
            &path,
            "application/x-www-form-urlencoded",
            body.into_bytes(),
            Some(&alice),
        )
    };
    for wrong in [
        vec![("tool", "jira".to_owned())],
        vec![("actions", "read".to_owned())],
        vec![("task", "another-task".to_owned())],
        vec![
            ("task", task_id.clone()),
            ("tool", "github".to_owned()),
            ("actions", "delete write".to_owned()),
        ],
    ] {
        let r = send(wrong.clone()).await;
        r.assert_error(409, "conflict");
        assert!(r.text.contains("not the one you were shown"), "{}", r.text);
    }
    let (_, still) = get(Some(alice.clone()), id.clone()).await;
    assert_eq!(still["state"], "pending", "{still}");
    let r = send(vec![
        ("task", task_id),
        ("tool", "github".to_owned()),
        ("actions", "delete".to_owned()),
    ])
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (_, decided) = get(Some(alice.clone()), id.clone()).await;
    assert_eq!(decided["state"], "approved", "{decided}");
    let r = poll(&s, &task, &id).await;
    assert_eq!(r.status, 200, "{}", r.text);

    // A body of another type is refused, not ignored: it may hold a step
    // the person was shown, which must not go unchecked.
    let other = pending(&s, &task).await;
    let r = s
        .post_raw(
            &format!("/approvals/{other}/approve"),
            "application/json",
            br#"{"tool":"jira"}"#.to_vec(),
            Some(&alice),
        )
        .await;
    r.assert_error(400, "invalid_request");
    let (_, still) = get(Some(alice.clone()), other.clone()).await;
    assert_eq!(still["state"], "pending", "{still}");
    // So is a body that says no type at all (a bare `requests.post(url,
    // data=b"...")`), in one piece or in chunks.
    let url = format!("{}/approvals/{other}/approve", s.url);
    let form = "tool=jira&actions=delete";
    let r = s
        .http
        .post(&url)
        .bearer_auth(&alice)
        .body(form)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let mut conn = tokio::net::TcpStream::connect(s.url.trim_start_matches("http://"))
        .await
        .unwrap();
    let request = format!(
        "POST /approvals/{other}/approve HTTP/1.1\r\nhost: scrip\r\nauthorization: Bearer {alice}\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n{:x}\r\n{form}\r\n0\r\n\r\n",
        form.len()
    );
    tokio::io::AsyncWriteExt::write_all(&mut conn, request.as_bytes())
        .await
        .unwrap();
    let mut answer = String::new();
    tokio::io::AsyncReadExt::read_to_string(&mut conn, &mut answer)
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 400 "), "{answer}");
    let (_, still) = get(Some(alice.clone()), other.clone()).await;
    assert_eq!(still["state"], "pending", "{still}");
    // With no body at all the approval is of the step the id names.
    let r = s.http.post(&url).bearer_auth(&alice).send().await.unwrap();
    assert_eq!(r.status(), 200);
    s.stop().await;
}

#[tokio::test]
async fn approving_a_step_of_an_ended_task_is_a_conflict() {
    let s = server().await;
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    assert_eq!(s.revoke(&task).await.status, 200);
    approve(&s, &id, Some(&alice_id(&s)))
        .await
        .assert_error(409, "conflict");
    // The agent polling for it hears that its task ended, rather than
    // `authorization_pending` until the approval expires.
    let r = poll(&s, &task, &id).await;
    r.assert_error(400, "invalid_grant");
    assert!(r.text.contains("has ended"), "{}", r.text);
    s.stop().await;
}

/// A step, waiting or approved, expires soon after its task ends (within
/// the upkeep's five seconds), not at its own time: nobody may decide or collect
/// it, and left waiting it would count in every approval's reads. The
/// record says why; the agent polling still hears that its task ended.
#[tokio::test]
async fn a_step_of_an_ended_task_expires_at_once_and_says_why() {
    let s = server().await;
    let task = prod_task_with(&s, "github:read github:delete").await;
    let waiting = pending(&s, &task).await;
    let approved = pending_step(&s, &task, "github", "delete read").await;
    assert_eq!(
        approve(&s, &approved, Some(&alice_id(&s))).await.status,
        200
    );
    assert_eq!(s.revoke(&task).await.status, 200);
    let expired = |audit: &[scrip_store::AuditEvent], id: &str| {
        audit
            .iter()
            .filter(|a| {
                a.event == "approval.expired" && a.reason.as_deref().is_some_and(|r| r.contains(id))
            })
            .filter_map(|a| a.reason.clone())
            .collect::<Vec<_>>()
    };
    let mut audit = Vec::new();
    for _ in 0..300 {
        audit = s.audit().await;
        if !expired(&audit, &waiting).is_empty() && !expired(&audit, &approved).is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert_eq!(
        expired(&audit, &waiting),
        [format!(
            "auth_req_id {waiting} was not decided before its task ended"
        )]
    );
    assert_eq!(
        expired(&audit, &approved),
        [format!(
            "auth_req_id {approved} was approved, but its token was not collected before its task ended"
        )]
    );
    for id in [&waiting, &approved] {
        let r = poll(&s, &task, id).await;
        r.assert_error(400, "invalid_grant");
        assert!(
            r.text.contains("the task that asked has ended"),
            "{}",
            r.text
        );
    }
    s.stop().await;
}

/// A step approved before its task ended is not issued, and the poll says
/// so as for a pending one.
#[tokio::test]
async fn an_approved_step_of_a_task_ended_since_is_not_issued() {
    let s = server().await;
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    assert_eq!(approve(&s, &id, Some(&alice_id(&s))).await.status, 200);
    assert_eq!(s.revoke(&task).await.status, 200);
    let r = poll(&s, &task, &id).await;
    r.assert_error(400, "invalid_grant");
    assert!(
        r.text.contains("the task that asked has ended"),
        "{}",
        r.text
    );
    s.stop().await;
}

#[tokio::test]
async fn the_approved_token_is_bound_to_the_key_of_the_polls_proof() {
    use scrip_testkit::dpop::DpopKey;
    let s = server().await;
    let task = prod_task(&s).await;
    let id = pending(&s, &task).await;
    let r = approve(&s, &id, Some(&alice_id(&s))).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let key = DpopKey::new();
    let form = [
        ("grant_type", CIBA),
        ("auth_req_id", id.as_str()),
        ("subject_token", task.as_str()),
    ];
    // A bad proof gets nothing, and leaves the approval to be collected.
    let r = s
        .caller()
        .post_form_with(
            "/token",
            &form,
            &[("DPoP", &key.proof("GET", &format!("{}/token", s.url), None))],
        )
        .await;
    r.assert_error(400, "invalid_dpop_proof");
    let proof = key.proof("POST", &format!("{}/token", s.url), None);
    let r = s
        .caller()
        .post_form_with("/token", &form, &[("DPoP", &proof)])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["token_type"], "DPoP");
    let (_, c) = decode_parts(r.body["access_token"].as_str().unwrap());
    assert_eq!(c["cnf"]["jkt"], key.jkt());
    assert_eq!(c["approval"]["single_use"], true);
    s.stop().await;
}

/// An unbound task's polls spend their DPoP proofs only when they collect:
/// a proof by a fresh key at each poll of a waiting step writes nothing
/// (no commit, no place in the replay memory), and the collection binds
/// the token to its proof's key, spent once.
#[tokio::test]
async fn an_unbound_tasks_polls_spend_no_proof_until_they_collect() {
    use scrip_testkit::dpop::DpopKey;
    let s = server().await;
    let task = prod_task_with(&s, "github:read github:delete").await;
    let id = pending(&s, &task).await;
    let url = format!("{}/token", s.url);
    // A proof spent on an access token of the task: no collection takes it.
    let used = DpopKey::new().proof("POST", &url, None);
    let r = s
        .access_token_dpop(&task, "github", Some("read"), &[&used])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let form = [
        ("grant_type", CIBA),
        ("auth_req_id", id.as_str()),
        ("subject_token", task.as_str()),
    ];
    let proofs = || async {
        let db = store_db(&s).await;
        let n: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM dpop_proofs")
            .fetch_one(&db)
            .await
            .unwrap();
        n
    };
    for _ in 0..3 {
        let key = DpopKey::new();
        let r = s
            .caller()
            .post_form_with("/token", &form, &[("DPoP", &key.proof("POST", &url, None))])
            .await;
        assert!(
            matches!(
                r.body["error"].as_str(),
                Some("authorization_pending" | "slow_down")
            ),
            "{}",
            r.text
        );
    }
    assert_eq!(proofs().await, 1);
    assert_eq!(approve(&s, &id, Some(&alice_id(&s))).await.status, 200);
    let r = s
        .caller()
        .post_form_with("/token", &form, &[("DPoP", &used)])
        .await;
    r.assert_error(400, "invalid_dpop_proof");
    assert!(r.text.contains("used before"), "{}", r.text);
    let key = DpopKey::new();
    let proof = key.proof("POST", &url, None);
    let r = s
        .caller()
        .post_form_with("/token", &form, &[("DPoP", &proof)])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (_, c) = decode_parts(r.body["access_token"].as_str().unwrap());
    assert_eq!(c["cnf"]["jkt"], key.jkt());
    assert_eq!(proofs().await, 2);
    // The records follow the step by its id to the token's `jti`, bound.
    let audit = s.stop_then_audit().await;
    let of = |event: &str| {
        audit
            .iter()
            .find(|a| a.event == event && a.decision.is_some())
            .unwrap_or_else(|| panic!("no {event}: {audit:#?}"))
    };
    assert_eq!(
        of("approval.granted").reason.as_deref(),
        Some(format!("auth_req_id {id} approved by alice ({K8S_ISSUER} system:serviceaccount:people:alice)").as_str())
    );
    let used = of("approval.used");
    assert_eq!(
        used.reason.as_deref(),
        Some(
            format!(
                "auth_req_id {id} approved by alice, bound to DPoP key {}",
                key.jkt()
            )
            .as_str()
        )
    );
    assert_eq!(used.jti.as_deref(), c["jti"].as_str());
}

/// Configurations that start but let more in than they seem to are warned
/// about: a platform-wide issuer without `required_claims`, an audience
/// that is the issuer itself, separation of duties off with several
/// approvers.
#[tokio::test]
async fn configurations_that_trust_more_than_they_seem_are_warned_about() {
    let logs = captured_logs();
    let s = TestServer::start_with(edit(|c| {
        c.approvers = vec![alice(), bob()];
        c.separation_of_duties = false;
        let mut gitlab = c.trusted_issuers[0].clone();
        gitlab.issuer = "https://gitlab.com".into();
        gitlab.kind = Some(scrip_config::IssuerKind::Jwt);
        c.trusted_issuers.push(gitlab);
        for ti in &mut c.trusted_issuers {
            if ti.issuer == K8S_ISSUER {
                ti.audiences.push(K8S_ISSUER.into());
            }
        }
    }))
    .await;
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    for warning in [
        "can obtain a token from this issuer for any audience",
        "e.g. `namespace_id",
        "an audience is the issuer itself",
        "separation_of_duties is off with several approvers",
    ] {
        assert!(text.contains(warning), "{warning}: {text}");
    }
    s.stop().await;
}

/// A task ended by another process (another replica, `scrip task revoke`)
/// while this one still has it cached as open: a step of it is not put to
/// the approvers, since it could never be taken.
#[tokio::test]
async fn no_one_is_asked_about_a_step_of_a_task_ended_meanwhile() {
    let s = server().await;
    let task = prod_task_with(&s, "github:read github:delete").await;
    // Cached as open by an exchange.
    let r = s.access_token(&task, "github", Some("read")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (_, claims) = decode_parts(&task);
    let txn = claims["txn"].as_str().unwrap().to_owned();
    let store = scrip_store::open(None, &s.dir.path().join("data/scrip.db"))
        .await
        .unwrap();
    store
        .commit(vec![scrip_store::Write::EndOpenTask {
            id: txn,
            at: now(),
            reason: "revoked".into(),
            grace: 0,
        }])
        .await
        .unwrap();
    let r = s.access_token(&task, "github", Some("delete")).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert_ne!(r.body["error"], "authorization_pending", "{}", r.text);
    assert_eq!(requested(&s).await, 0);
    // Refused on the record, whichever read found the task ended.
    let audit = s.stop_then_audit().await;
    assert!(
        audit.iter().any(|a| a.event == "token.refused"
            && a.actions.as_deref() == Some("delete")
            && a.reason
                .as_deref()
                .is_some_and(|r| r.contains("the task has ended"))),
        "{audit:?}"
    );
}
