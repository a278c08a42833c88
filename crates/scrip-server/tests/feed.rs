//! The revocation feed: cursor, long-poll, authentication.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::{Value, json};

async fn feed(s: &TestServer, query: &str, bearer: Option<&str>) -> (u16, Value) {
    let mut req = s.http.get(format!("{}/revocations{query}", s.url));
    if let Some(b) = bearer {
        req = req.bearer_auth(b);
    }
    let r = req.send().await.unwrap();
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn feed_lists_revoked_tasks_and_tokens_after_a_cursor() {
    let s = TestServer::start().await;
    let caller = s.k8s.kubernetes("resource-servers", "github-api");
    let (status, body) = feed(&s, "", Some(&caller)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"], json!([]));
    let start = body["cursor"].as_i64().unwrap();

    let identity = s.k8s.kubernetes("agents", "coder");
    let task = s
        .start_task(&identity, "github:read", "dev", "triage")
        .await;
    let task_token = task["access_token"].as_str().unwrap().to_owned();
    let (_, tc) = decode_parts(&task_token);
    let at = s
        .access_token(&task_token, "github", Some("read"))
        .await
        .body["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, ac) = decode_parts(&at);

    assert_eq!(s.revoke(&at).await.status, 200);
    let (_, body) = feed(&s, &format!("?after={start}"), Some(&caller)).await;
    assert_eq!(
        body["events"],
        json!([{"type": "token", "jti": ac["jti"], "txn": tc["txn"], "exp": ac["exp"].as_u64().unwrap() + 30}])
    );
    let cursor = body["cursor"].as_i64().unwrap();
    assert!(cursor > start);

    assert_eq!(s.revoke(&task_token).await.status, 200);
    let (_, body) = feed(&s, &format!("?after={cursor}"), Some(&caller)).await;
    // A task's event, like a token's, outlives its expiry by the clock
    // skew that verifiers allow past `exp`.
    assert_eq!(
        body["events"],
        json!([{"type": "task", "txn": tc["txn"], "exp": tc["exp"].as_u64().unwrap() + 30}])
    );
    // From the start, both; revoking again adds nothing.
    assert_eq!(s.revoke(&task_token).await.status, 200);
    assert_eq!(s.revoke(&at).await.status, 200);
    let (_, body) = feed(&s, "?after=0", Some(&caller)).await;
    assert_eq!(body["events"].as_array().unwrap().len(), 2, "{body}");
    let last = body["cursor"].as_i64().unwrap();
    // A cursor past the newest event (a store restored from a backup
    // numbers events anew) starts over from the first event at once.
    let started = Instant::now();
    let (status, body) = feed(&s, &format!("?after={}&wait=5", last + 1000), Some(&caller)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"].as_array().unwrap().len(), 2, "{body}");
    assert_eq!(body["cursor"].as_i64(), Some(last));
    assert!(started.elapsed() < Duration::from_secs(4));
    // The newest cursor itself is current: it waits, then answers nothing new.
    let (_, body) = feed(&s, &format!("?after={last}&wait=1"), Some(&caller)).await;
    assert_eq!(body, json!({"cursor": last, "events": [], "more": false}));
    s.stop().await;
}

/// A task that reached its deadline ends without an event (its tokens
/// expire with it), but verifiers accept a token up to their leeway past
/// `exp`: a revocation of its token within that still reaches them.
#[tokio::test]
async fn revoking_a_task_token_just_after_its_deadline_still_reaches_verifiers() {
    let s = TestServer::start().await;
    let caller = s.k8s.kubernetes("resource-servers", "github-api");
    let identity = s.k8s.kubernetes("agents", "coder");
    let r = s
        .try_start_task(&identity, "github:read", "dev", "triage", Some(1))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let task_token = r.body["access_token"].as_str().unwrap().to_owned();
    let (_, tc) = decode_parts(&task_token);
    let (_, body) = feed(&s, "", Some(&caller)).await;
    let cursor = body["cursor"].as_i64().unwrap();
    // The sweep ends it at its deadline, and publishes nothing.
    swept(&s, tc["txn"].as_str().unwrap()).await;
    let (_, body) = feed(&s, &format!("?after={cursor}"), Some(&caller)).await;
    assert_eq!(body["events"], json!([]));
    assert_eq!(s.revoke(&task_token).await.status, 200);
    let (_, body) = feed(&s, &format!("?after={cursor}"), Some(&caller)).await;
    assert_eq!(
        body["events"],
        json!([{"type": "task", "txn": tc["txn"], "exp": tc["exp"].as_u64().unwrap() + 30}])
    );
    // Revoking it again publishes nothing more, and records nothing more.
    assert_eq!(s.revoke(&task_token).await.status, 200);
    let published = s
        .audit()
        .await
        .iter()
        .filter(|a| a.event == "task.end_published" && a.task_id.as_deref() == tc["txn"].as_str())
        .count();
    assert_eq!(published, 1);
    let (_, body) = feed(&s, &format!("?after={cursor}"), Some(&caller)).await;
    assert_eq!(body["events"].as_array().unwrap().len(), 1, "{body}");
    // A task ended before its deadline has its event: revoking its token
    // again records nothing.
    let other = s
        .start_task(&identity, "github:read", "dev", "triage")
        .await;
    let other = other["access_token"].as_str().unwrap().to_owned();
    assert_eq!(s.revoke(&other).await.status, 200);
    assert_eq!(s.revoke(&other).await.status, 200);
    assert_eq!(
        s.audit()
            .await
            .iter()
            .filter(|a| a.event == "task.end_published")
            .count(),
        1
    );
    s.stop().await;
}

/// Waits (up to 10 s) for the sweep to end task `txn` at its deadline.
async fn swept(s: &TestServer, txn: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !s
        .audit()
        .await
        .iter()
        .any(|a| a.event == "task.expired" && a.task_id.as_deref() == Some(txn))
    {
        assert!(Instant::now() < deadline, "the task was not swept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The same for an access token: one issued in its task's last minutes
/// expires with the task, and its revocation just after the deadline (the
/// task swept, nothing published) still reaches verifiers, once.
#[tokio::test]
async fn revoking_an_access_token_just_after_its_tasks_deadline_still_reaches_verifiers() {
    let s = TestServer::start().await;
    let caller = s.k8s.kubernetes("resource-servers", "github-api");
    let identity = s.k8s.kubernetes("agents", "coder");
    // Two seconds: a task of one lives only to the end of the second it
    // started in, which its access token's request may not come within.
    let r = s
        .try_start_task(&identity, "github:read", "dev", "triage", Some(2))
        .await;
    assert_eq!(r.status, 200, "{}", r.body);
    let task_token = r.body["access_token"].as_str().unwrap().to_owned();
    let (_, tc) = decode_parts(&task_token);
    let r = s.access_token(&task_token, "github", Some("read")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let access = r.body["access_token"].as_str().unwrap().to_owned();
    let (_, ac) = decode_parts(&access);
    assert_eq!(ac["exp"], tc["exp"]);
    let (_, body) = feed(&s, "", Some(&caller)).await;
    let cursor = body["cursor"].as_i64().unwrap();
    swept(&s, tc["txn"].as_str().unwrap()).await;
    for _ in 0..2 {
        assert_eq!(s.revoke(&access).await.status, 200);
    }
    let (_, body) = feed(&s, &format!("?after={cursor}"), Some(&caller)).await;
    assert_eq!(
        body["events"],
        json!([{"type": "token", "txn": tc["txn"], "jti": ac["jti"], "exp": ac["exp"].as_u64().unwrap() + 30}]),
        "{body}"
    );
    let recorded = s
        .audit()
        .await
        .iter()
        .filter(|a| a.event == "token.revoked" && a.jti.as_deref() == ac["jti"].as_str())
        .count();
    assert_eq!(recorded, 1);
    s.stop().await;
}

/// A revocation stays in the feed a while past its `exp` (a minute at
/// least, as it stays in the store): a resource server that starts reading
/// the feed then, whose clock is behind scrip's, still accepts the token
/// within its leeway, and must learn that it was revoked.
#[tokio::test]
async fn a_revocation_is_served_a_while_past_its_exp() {
    // Two seconds: a token of one second lives only to the end of the
    // second it was issued in, which a loaded machine may pass before the
    // revocation verifies it (it would then be ignored as expired).
    let s = TestServer::start_with(Options {
        access_token_ttl: 2,
        edit: Some(Box::new(|c| c.clock_skew = 0)),
        ..Options::default()
    })
    .await;
    let caller = s.k8s.kubernetes("resource-servers", "github-api");
    let identity = s.k8s.kubernetes("agents", "coder");
    let task = s
        .start_task(&identity, "github:read", "dev", "triage")
        .await;
    let task = task["access_token"].as_str().unwrap().to_owned();
    let r = s.access_token(&task, "github", Some("read")).await;
    let at = r.body["access_token"].as_str().unwrap().to_owned();
    let (_, claims) = decode_parts(&at);
    assert_eq!(s.revoke(&at).await.status, 200);
    let exp = claims["exp"].as_u64().unwrap();
    while now() <= exp + 1 {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (_, body) = feed(&s, "", Some(&caller)).await;
    assert_eq!(
        body["events"],
        json!([{"type": "token", "jti": claims["jti"], "txn": claims["txn"], "exp": exp}]),
        "{body}"
    );
    s.stop().await;
}

/// A long poll after `cursor` waiting up to 20 s, as `caller`: when it
/// was answered, and the answer.
fn waiting_poll(
    s: &TestServer,
    cursor: i64,
    caller: &str,
) -> tokio::task::JoinHandle<(Instant, Value)> {
    let url = format!("{}/revocations?after={cursor}&wait=20", s.url);
    let (http, caller) = (s.http.clone(), caller.to_owned());
    tokio::spawn(async move {
        let r = http.get(url).bearer_auth(caller).send().await.unwrap();
        (Instant::now(), r.json::<Value>().await.unwrap())
    })
}

#[tokio::test]
async fn a_waiting_poll_wakes_on_revocation() {
    let s = TestServer::start().await;
    let caller = s.k8s.kubernetes("resource-servers", "github-api");
    let identity = s.k8s.kubernetes("agents", "coder");
    let task = s
        .start_task(&identity, "github:read", "dev", "triage")
        .await;
    let task_token = task["access_token"].as_str().unwrap().to_owned();
    let (_, body) = feed(&s, "", Some(&caller)).await;
    let cursor = body["cursor"].as_i64().unwrap();

    let started = Instant::now();
    let poll = waiting_poll(&s, cursor, &caller);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(s.revoke(&task_token).await.status, 200);
    let (answered, body) = poll.await.unwrap();
    assert_eq!(body["events"][0]["type"], "task", "{body}");
    // It answered because of the revocation, not because the wait ran out.
    assert!(answered.duration_since(started) < Duration::from_secs(15));

    // With nothing new, a short wait answers empty with the same cursor.
    let next = body["cursor"].as_i64().unwrap();
    let caller = s.k8s.kubernetes("resource-servers", "github-api");
    let (_, empty) = feed(&s, &format!("?after={next}&wait=1"), Some(&caller)).await;
    assert_eq!(empty, json!({"cursor": next, "events": [], "more": false}));
    s.stop().await;
}

/// Requests waiting together, and a revocation another process commits to
/// the store (no signal reaches this one): the newest revocation is read
/// every 200 ms while they wait, and each wakes with it.
#[tokio::test]
async fn waiting_polls_wake_on_a_revocation_written_by_another_process() {
    let s = TestServer::start().await;
    let caller = s.k8s.kubernetes("resource-servers", "github-api");
    let identity = s.k8s.kubernetes("agents", "coder");
    let task = s
        .start_task(&identity, "github:read", "dev", "triage")
        .await;
    let txn = decode_parts(task["access_token"].as_str().unwrap()).1["txn"]
        .as_str()
        .unwrap()
        .to_owned();
    let (_, body) = feed(&s, "", Some(&caller)).await;
    let cursor = body["cursor"].as_i64().unwrap();
    let started = Instant::now();
    let polls: Vec<_> = (0..8).map(|_| waiting_poll(&s, cursor, &caller)).collect();
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.end_elsewhere(&txn).await;
    for poll in polls {
        let (answered, body) = poll.await.unwrap();
        assert_eq!(body["events"][0]["txn"], txn.as_str(), "{body}");
        assert!(answered.duration_since(started) < Duration::from_secs(10));
    }
    s.stop().await;
}

#[tokio::test]
async fn feed_needs_a_workload_identity_and_valid_parameters() {
    let s = TestServer::start().await;
    let (status, body) = feed(&s, "", None).await;
    assert_eq!(
        (status, body["error"].as_str()),
        (401, Some("invalid_token"))
    );
    let identity = s.k8s.kubernetes("agents", "coder");
    let task = s
        .start_task(&identity, "github:read", "dev", "triage")
        .await;
    let (status, _) = feed(&s, "", task["access_token"].as_str()).await;
    assert_eq!(status, 401, "a task token is not a workload identity");
    let caller = s.k8s.kubernetes("resource-servers", "github-api");
    for bad in ["?after=-1", "?wait=31", "?after=x", "?nope=1"] {
        let (status, body) = feed(&s, bad, Some(&caller)).await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("invalid_request")),
            "{bad}"
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn a_page_says_whether_it_left_events_out() {
    use scrip_store::{SqliteStore, Store as _, Write};
    let s = TestServer::start().await;
    let caller = s.k8s.kubernetes("resource-servers", "github-api");
    // 1,001 revoked tokens, one more than a page holds.
    let store = SqliteStore::open(&s.dir.path().join("data/scrip.db"))
        .await
        .unwrap();
    let exp = now() + 600;
    store
        .commit(
            (0..1_001)
                .map(|i| Write::RevokeToken {
                    jti: format!("jti-{i}"),
                    task_id: "t".into(),
                    expires_at: exp,
                    at: now(),
                })
                .collect(),
        )
        .await
        .unwrap();
    let (status, body) = feed(&s, "?after=0", Some(&caller)).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["events"].as_array().unwrap().len(), 1_000);
    assert_eq!(body["more"], true);
    let cursor = body["cursor"].as_i64().unwrap();
    // Exactly a page left: full, and nothing more.
    let (_, body) = feed(&s, &format!("?after={}", cursor - 999), Some(&caller)).await;
    assert_eq!(body["events"].as_array().unwrap().len(), 1_000);
    assert_eq!(
        body["more"], false,
        "a page of exactly 1,000 said there was more"
    );
    let (_, body) = feed(&s, &format!("?after={cursor}"), Some(&caller)).await;
    assert_eq!(body["events"].as_array().unwrap().len(), 1);
    assert_eq!(body["more"], false);
    let cursor = body["cursor"].as_i64().unwrap();
    let (_, body) = feed(&s, &format!("?after={cursor}"), Some(&caller)).await;
    assert_eq!(body["events"], json!([]));
    assert_eq!(body["more"], false);
    s.stop().await;
}

/// A follower's long poll does not hold up shutdown: it is answered, with
/// what there is, as soon as shutdown begins.
#[tokio::test]
async fn a_long_poll_is_answered_when_shutdown_begins() {
    let s = TestServer::start().await;
    let caller = s.k8s.kubernetes("resource-servers", "github-api");
    let (_, body) = feed(&s, "", Some(&caller)).await;
    let cursor = body["cursor"].as_i64().unwrap();
    let url = format!("{}/revocations?after={cursor}&wait=30", s.url);
    let http = s.http.clone();
    let poll = tokio::spawn(async move {
        let r = http.get(url).bearer_auth(caller).send().await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    });
    // Waiting: not answered yet.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(!poll.is_finished());
    let started = Instant::now();
    s.stop().await;
    // Without the early answer, the drain waits the poll's 30 s.
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "{:?}",
        started.elapsed()
    );
    let (status, body) = poll.await.unwrap();
    assert_eq!(status, 200);
    assert_eq!(body, json!({"cursor": cursor, "events": [], "more": false}));
}
