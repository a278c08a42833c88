//! The happy path, end to end over HTTP: a workload identity starts a task,
//! the task token buys access tokens, revocation ends it all.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use common::*;
use serde_json::json;

#[tokio::test]
async fn task_then_access_token() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let r = s
        .try_start_task(
            &identity,
            "github:read jira:write github:write",
            "dev",
            "fix JIRA-42 flaky test",
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.headers["cache-control"], "no-store");
    assert_eq!(r.body["issued_token_type"], TXN);
    assert_eq!(r.body["token_type"], "N_A");
    assert_eq!(r.body["scope"], "github:read github:write jira:write");
    let expires_in = r.body["expires_in"].as_u64().unwrap();
    assert!((3590..=3600).contains(&expires_in), "{expires_in}");
    let task_token = r.body["access_token"].as_str().unwrap().to_owned();
    let (h, c) = decode_parts(&task_token);
    assert_eq!(h["typ"], "txntoken+jwt");
    assert_eq!(h["alg"], "ES256");
    assert!(h["kid"].is_string());
    assert_eq!(c["iss"], s.url);
    assert_eq!(c["aud"], s.url);
    assert_eq!(c["sub"], "system:serviceaccount:agents:coder");
    assert_eq!(c["scope"], "github:read github:write jira:write");
    assert_eq!(c["tctx"]["purpose"], "fix JIRA-42 flaky test");
    assert_eq!(c["tctx"]["environment"], "dev");
    assert_eq!(c["tctx"]["depth"], 0);
    assert!(c["txn"].is_string() && c["jti"].is_string());

    let r = s.access_token(&task_token, "github", Some("read")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.headers["cache-control"], "no-store");
    assert_eq!(r.body["token_type"], "Bearer");
    assert_eq!(r.body["issued_token_type"], ACCESS);
    assert_eq!(r.body["scope"], "read");
    let expires_in = r.body["expires_in"].as_u64().unwrap();
    assert!((290..=300).contains(&expires_in), "{expires_in}");
    let at = r.body["access_token"].as_str().unwrap().to_owned();
    let (ah, ac) = decode_parts(&at);
    assert_eq!(ah["typ"], "at+jwt");
    assert_eq!(ah["kid"], h["kid"]);
    assert_eq!(ac["aud"], "github");
    assert_eq!(ac["sub"], c["sub"]);
    // `sub` is unique only with its issuer: the token names it.
    assert_eq!(ac["agent_iss"], c["tctx"]["agent_iss"]);
    assert!(
        ac["agent_iss"]
            .as_str()
            .is_some_and(|i| i.starts_with("https://")),
        "{ac}"
    );
    assert_eq!(ac["txn"], c["txn"]);
    assert_eq!(ac["client_id"], c["sub"]);
    assert_eq!(ac["iss"], s.url);
    assert!(ac["exp"].as_u64().unwrap() <= c["exp"].as_u64().unwrap());
    assert_ne!(ac["jti"], c["jti"]);

    // Without scope: every action the task holds at the tool.
    let r = s.access_token(&task_token, "github", None).await;
    assert_eq!(r.body["scope"], "read write", "{}", r.text);
    // By resource URI (RFC 8707).
    let r = s
        .post_form(
            "/token",
            &[
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", &task_token),
                ("subject_token_type", TXN),
                ("resource", "https://acme.atlassian.net"),
                ("scope", "write"),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (_, jc) = decode_parts(r.body["access_token"].as_str().unwrap());
    assert_eq!(jc["aud"], "jira");

    // Introspection shows the claims.
    let r = s.introspect(&at).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["active"], true);
    assert_eq!(r.body["scope"], "read");
    assert_eq!(r.body["txn"], c["txn"]);
    assert_eq!(r.body["aud"], "github");
    assert_eq!(r.body["agent_iss"], c["tctx"]["agent_iss"]);

    // Ending the task revokes everything under it.
    let r = s.revoke(&task_token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(s.introspect(&at).await.body, json!({"active": false}));
    assert_eq!(
        s.introspect(&task_token).await.body,
        json!({"active": false})
    );
    s.access_token(&task_token, "github", Some("read"))
        .await
        .assert_error(400, "invalid_request");
    // That use of a token kept past its task's end is on the record, naming
    // the token and the agent.
    let audit = s.audit().await;
    let refused = audit
        .iter()
        .rev()
        .find(|a| a.event == "token.refused")
        .expect("no record of the ended task's token");
    assert_eq!(refused.decision.as_deref(), Some("deny"));
    assert_eq!(
        refused.jti.as_ref(),
        c["jti"].as_str().map(str::to_owned).as_ref()
    );
    assert_eq!(
        refused.task_id.as_ref(),
        c["txn"].as_str().map(str::to_owned).as_ref()
    );
    assert_eq!(
        refused.agent_sub.as_ref(),
        c["sub"].as_str().map(str::to_owned).as_ref()
    );
    assert!(refused.agent_iss.is_some(), "{refused:?}");
    assert_eq!(refused.tool.as_deref(), Some("github"));
    assert_eq!(
        refused.reason.as_deref(),
        Some("an access token for `github`: subject_token: the task has ended")
    );
    s.stop().await;
}

/// A task token kept (or stolen) past its task's end and used over and
/// over: every refusal is on the record, one by one up to
/// `REFUSALS_PER_SECOND` a second, then as a count recorded once the
/// second ends, so that its holder can neither grow the trail without
/// bound nor hold up other agents' commits.
#[tokio::test]
async fn refusals_past_a_budget_a_second_are_recorded_as_counts() {
    const TRIES: u64 = 50;
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let r = s.start_task(&identity, "github:read", "dev", "flood").await;
    let task = r["access_token"].as_str().unwrap().to_owned();
    let (_, c) = decode_parts(&task);
    let txn = c["txn"].as_str().unwrap().to_owned();
    assert_eq!(s.revoke(&task).await.status, 200);
    // The last few for another tool: not hidden in the first one's count.
    for i in 0..TRIES {
        let tool = if i + 3 < TRIES { "github" } else { "jira" };
        s.access_token(&task, tool, Some("read"))
            .await
            .assert_error(400, "invalid_request");
    }
    // One by one, or counted (the count first in the reason), until the
    // counts' second ends.
    let refused = refusals_once_counted(&s, &txn, TRIES).await;
    assert_counted_past_the_budget(&refused, TRIES);
    // A count names the token, as each refusal does, and its tool.
    for a in refused.iter().filter(|a| count_of(a).is_some()) {
        assert_eq!(a.jti.as_deref(), c["jti"].as_str(), "{a:?}");
        assert_eq!(a.decision.as_deref(), Some("deny"));
    }
    assert_eq!(
        refused
            .iter()
            .filter(|a| a.tool.as_deref() == Some("jira"))
            .map(|a| count_of(a).unwrap_or(1))
            .sum::<u64>(),
        3,
        "{refused:#?}"
    );
    s.stop().await;
}

/// The `token.refused` records of task `txn`, once they account for
/// `tries` refusals (counted ones are recorded once their second ends), or
/// after 5 s.
async fn refusals_once_counted(
    s: &TestServer,
    txn: &str,
    tries: u64,
) -> Vec<scrip_store::AuditEvent> {
    let mut refused = Vec::new();
    for _ in 0..50 {
        refused = s
            .audit()
            .await
            .into_iter()
            .filter(|a| a.event == "token.refused" && a.task_id.as_deref() == Some(txn))
            .collect();
        if refused
            .iter()
            .map(|a| count_of(a).unwrap_or(1))
            .sum::<u64>()
            >= tries
        {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    refused
}

/// Counts the store cannot take when their second ends are kept, and
/// recorded once it can: a refusal answered at once is never off the
/// record. Those within the budget wait for their record, and while the
/// store cannot take it are answered 503 (and not recorded).
#[tokio::test]
async fn counted_refusals_the_store_cannot_take_are_recorded_once_it_can() {
    const TRIES: usize = 40;
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let r = s.start_task(&identity, "github:read", "dev", "flood").await;
    let task = r["access_token"].as_str().unwrap().to_owned();
    let txn = decode_parts(&task).1["txn"].as_str().unwrap().to_owned();
    assert_eq!(s.revoke(&task).await.status, 200);
    let held = s.hold_writes().await;
    let answers = futures_util::future::join_all(
        (0..TRIES).map(|_| s.access_token(&task, "github", Some("read"))),
    )
    .await;
    let refused = answers.iter().filter(|r| r.status == 400).count();
    let unavailable = answers.iter().filter(|r| r.status == 503).count();
    assert_eq!(refused + unavailable, TRIES);
    // Within the budget (10 a second; the requests may span two seconds).
    assert!((10..=20).contains(&unavailable), "{unavailable}");
    // The counts' first commit, at their second's end, waits out the
    // store's busy time (5 s) and fails; the next one, once the store is
    // free again, records them.
    tokio::time::sleep(std::time::Duration::from_secs(6)).await;
    release(held).await;
    let records = refusals_once_counted(&s, &txn, refused as u64).await;
    assert!(
        records.iter().all(|a| count_of(a).is_some()),
        "{records:#?}"
    );
    assert_eq!(
        records.iter().filter_map(count_of).sum::<u64>(),
        refused as u64,
        "{records:#?}"
    );
    s.stop().await;
}

/// A task the server holds as open (exchanged once), then ended by another
/// writer of the store, as another process would, which no signal tells
/// the server of. Returns its task token and id.
async fn a_task_held_open_then_ended_elsewhere(s: &TestServer) -> (String, String) {
    let identity = s.k8s.kubernetes("agents", "coder");
    let r = s
        .start_task(&identity, "github:read", "dev", "race JIRA-1")
        .await;
    let task = r["access_token"].as_str().unwrap().to_owned();
    let txn = decode_parts(&task).1["txn"].as_str().unwrap().to_owned();
    let r = s.access_token(&task, "github", Some("read")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.end_elsewhere(&txn).await;
    (task, txn)
}

/// [`a_task_held_open_then_ended_elsewhere`]; the store held; and an
/// exchange of its token whose agent hangs up while the exchange's commit
/// waits. Returns the task id and the held store.
async fn exchange_then_hang_up_as_its_task_ends(
    s: &TestServer,
) -> (String, sqlx::SqliteConnection) {
    use tokio::io::AsyncWriteExt as _;
    let (task, txn) = a_task_held_open_then_ended_elsewhere(s).await;
    let held = s.hold_writes().await;
    let body = format!(
        "grant_type={}&subject_token={}&subject_token_type={}&audience=github&scope=read",
        urlencode(TOKEN_EXCHANGE),
        urlencode(&task),
        urlencode(TXN)
    );
    let host = s.url.trim_start_matches("http://").to_owned();
    let mut c = tokio::net::TcpStream::connect(&host).await.unwrap();
    c.write_all(
        format!(
            "POST /token HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    // The exchange's checks take milliseconds; then its commit waits on the
    // store, and the agent hangs up.
    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
    drop(c);
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    (txn, held)
}

/// The `token.refused` records of task `txn`.
fn refusals_of(audit: &[scrip_store::AuditEvent], txn: &str) -> usize {
    audit
        .iter()
        .filter(|a| a.event == "token.refused" && a.task_id.as_deref() == Some(txn))
        .count()
}

/// An exchange whose agent hangs up as it races its task's end: the
/// commit finds the task ended, and the refusal is still recorded (the
/// endpoint's handler runs to its end without anyone to answer).
#[tokio::test]
async fn an_exchange_whose_agent_hangs_up_as_it_races_its_tasks_end_is_recorded() {
    let s = TestServer::start().await;
    let (txn, held) = exchange_then_hang_up_as_its_task_ends(&s).await;
    release(held).await;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while refusals_of(&s.audit().await, &txn) == 0 {
        assert!(
            std::time::Instant::now() < deadline,
            "the refusal was never recorded"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    s.stop().await;
}

/// A stop waits for such a handler too (within its drain time), so its
/// record lands before the server's last commit.
#[tokio::test]
async fn a_stop_waits_for_the_handler_of_an_agent_that_hung_up() {
    let s = TestServer::start().await;
    let (txn, held) = exchange_then_hang_up_as_its_task_ends(&s).await;
    let (audit, ()) = tokio::join!(s.stop_then_audit(), async {
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
        release(held).await;
    });
    assert_eq!(refusals_of(&audit, &txn), 1);
}

/// A task ended by another writer of the store while this server still
/// holds it as open (its cache not told yet, as a replica's in the
/// milliseconds before the notification, or while its commit waited in a
/// queue): the commit that would record the token finds the end, and
/// nothing is issued.
#[tokio::test]
async fn an_exchange_racing_its_tasks_end_issues_nothing() {
    let s = TestServer::start().await;
    let (task, txn) = a_task_held_open_then_ended_elsewhere(&s).await;
    let r = s.access_token(&task, "github", Some("read")).await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("the task has ended"), "{}", r.text);
    let audit = s.audit().await;
    let last = audit
        .iter()
        .rev()
        .find(|a| a.task_id.as_deref() == Some(txn.as_str()))
        .unwrap();
    assert_eq!(last.event, "token.refused", "{last:?}");
    assert_eq!(
        audit
            .iter()
            .filter(|a| a.event == "token.issued" && a.task_id.as_deref() == Some(txn.as_str()))
            .count(),
        1
    );
    s.stop().await;
}
