//! DPoP (RFC 9449) at the token endpoint: a token request with a proof gets
//! an access token bound to the proof's key, and a bad, replayed or
//! misdirected proof gets `invalid_dpop_proof` and no token.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use common::*;
use scrip_testkit::dpop::DpopKey;
use serde_json::json;

async fn task_token(s: &TestServer) -> String {
    let identity = s.k8s.kubernetes("agents", "coder");
    let t = s.start_task(&identity, "github:read", "dev", "dpop").await;
    t["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn a_proof_binds_the_access_token_to_its_key() {
    let s = TestServer::start().await;
    let task = task_token(&s).await;
    let token_url = format!("{}/token", s.url);
    let key = DpopKey::new();

    let r = s
        .access_token_dpop(
            &task,
            "github",
            Some("read"),
            &[&key.proof("POST", &token_url, None)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["token_type"], "DPoP", "{}", r.text);
    let token = r.body["access_token"].as_str().unwrap().to_owned();
    let (_, claims) = decode_parts(&token);
    assert_eq!(claims["cnf"], json!({ "jkt": key.jkt() }));
    // Its record says it is no use without that key.
    let issued = s.audit().await;
    let issued = issued.iter().find(|a| a.event == "token.issued").unwrap();
    let reason = issued.reason.as_deref().unwrap_or_default();
    assert!(
        reason.ends_with(&format!("; bound to DPoP key {}", key.jkt()))
            && reason.starts_with("permitted by "),
        "{reason}"
    );

    // Introspection names the key (RFC 9449 §6.2).
    let i = s.introspect(&token).await;
    assert_eq!(i.body["active"], true, "{}", i.text);
    assert_eq!(i.body["token_type"], "DPoP");
    assert_eq!(i.body["cnf"]["jkt"], key.jkt());

    // A proof that came with a request whose subject token is no good is
    // not spent: strangers cannot fill the memory of used proofs.
    let proof = key.proof("POST", &token_url, None);
    let r = s
        .access_token_dpop("not-a-task-token", "github", Some("read"), &[&proof])
        .await;
    r.assert_error(400, "invalid_request");
    let r = s
        .access_token_dpop(&task, "github", Some("read"), &[&proof])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    // A client clock a little ahead is within `clock_skew`.
    let ahead = key.sign(&json!({
        "jti": "ahead", "htm": "POST", "htu": token_url, "iat": now() + 20,
    }));
    let r = s
        .access_token_dpop(&task, "github", Some("read"), &[&ahead])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    // Without a proof, the token is a bearer token, as before.
    let plain = s.access_token(&task, "github", Some("read")).await;
    assert_eq!(plain.body["token_type"], "Bearer", "{}", plain.text);
    let (_, claims) = decode_parts(plain.body["access_token"].as_str().unwrap());
    assert!(claims.get("cnf").is_none(), "{claims}");
    let i = s
        .introspect(plain.body["access_token"].as_str().unwrap())
        .await;
    assert_eq!(i.body["token_type"], "Bearer");
    assert!(i.body.get("cnf").is_none(), "{}", i.text);

    // The metadata says which algorithms a proof may use (RFC 9449 §5.1).
    let meta: serde_json::Value = s
        .http
        .get(format!("{}/.well-known/oauth-authorization-server", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let algs = meta["dpop_signing_alg_values_supported"]
        .as_array()
        .unwrap();
    assert!(
        algs.contains(&json!("ES256")) && algs.contains(&json!("EdDSA")),
        "{algs:?}"
    );
    assert!(
        !algs.iter().any(|a| a.as_str().unwrap().starts_with("HS")),
        "{algs:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn a_bad_proof_gets_no_token() {
    let s = TestServer::start().await;
    let task = task_token(&s).await;
    let token_url = format!("{}/token", s.url);
    let key = DpopKey::new();
    let issued_before = s
        .audit()
        .await
        .iter()
        .filter(|a| a.event == "token.issued")
        .count();

    let refused = |r: &Reply, why: &str| {
        r.assert_error(400, "invalid_dpop_proof");
        assert!(r.body.get("access_token").is_none(), "{}", r.text);
        let d = r.body["error_description"].as_str().unwrap();
        assert!(d.contains(why), "{d} (expected: {why})");
    };

    // A proof is accepted once.
    let proof = key.proof("POST", &token_url, None);
    let r = s
        .access_token_dpop(&task, "github", Some("read"), &[&proof])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let again = s
        .access_token_dpop(&task, "github", Some("read"), &[&proof])
        .await;
    refused(&again, "used before");

    // A proof made for another request.
    let other_url = format!("{}/introspect", s.url);
    for (proof, why) in [
        (key.proof("POST", &other_url, None), "`htu`"),
        (key.proof("GET", &token_url, None), "`htm`"),
        (
            key.sign(&json!({"jti": "old", "htm": "POST", "htu": token_url, "iat": 1_000_000_000})),
            "too old",
        ),
        ("not-a-proof".to_owned(), "compact"),
    ] {
        let r = s
            .access_token_dpop(&task, "github", Some("read"), &[&proof])
            .await;
        refused(&r, why);
    }
    // Two proofs: which one would bind?
    let r = s
        .access_token_dpop(
            &task,
            "github",
            Some("read"),
            &[
                &key.proof("POST", &token_url, None),
                &key.proof("POST", &token_url, None),
            ],
        )
        .await;
    refused(&r, "at most one");

    // A bad proof is refused whatever the grant, a task start included.
    let identity = s.k8s.kubernetes("agents", "coder");
    let details = json!({ "purpose": "dpop", "environment": "dev" }).to_string();
    let start = start_form(&identity, "github:read", &details);
    let r = post(&s, &start, &[&key.proof("GET", &token_url, None)]).await;
    refused(&r, "`htm`");
    // A good one is spent by the task start it came with: a second task
    // start with it is refused.
    let proof = key.proof("POST", &token_url, None);
    let r = post(&s, &start, &[&proof]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    refused(&post(&s, &start, &[&proof]).await, "used before");
    // And so is a delegation's (the task is bound to `key`, so it takes
    // `key`'s proofs).
    let parent = r.body["access_token"].as_str().unwrap().to_owned();
    let helper = s.k8s.kubernetes("agents", "helper");
    let helpers = json!({ "dpop_jkt": DpopKey::new().jkt() }).to_string();
    let mut delegate = delegate_form(&parent, &helper);
    delegate.push(("request_details", &helpers));
    let proof = key.proof("POST", &token_url, None);
    let r = post(&s, &delegate, &[&proof]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    refused(&post(&s, &delegate, &[&proof]).await, "used before");

    let issued_after = s
        .audit()
        .await
        .iter()
        .filter(|a| a.event == "token.issued")
        .count();
    assert_eq!(
        issued_after,
        issued_before + 1,
        "only the first exchange issued a token"
    );
    s.stop().await;
}

/// A token request to `/token` with these fields and DPoP proofs.
async fn post(s: &TestServer, form: &[(&str, &str)], proofs: &[&str]) -> Reply {
    let headers: Vec<(&str, &str)> = proofs.iter().map(|p| ("DPoP", *p)).collect();
    s.caller().post_form_with("/token", form, &headers).await
}

/// The one approver, alice, a Kubernetes service account.
fn alice() -> Vec<scrip_config::Approver> {
    vec![scrip_config::Approver {
        name: "alice".into(),
        issuer: Some(K8S_ISSUER.into()),
        subject: Some("system:serviceaccount:people:alice".into()),
        uid: None,
    }]
}

/// The form of a task start with `identity`, asking `scope`.
fn start_form<'a>(identity: &'a str, scope: &'a str, details: &'a str) -> [(&'a str, &'a str); 5] {
    [
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("subject_token", identity),
        ("subject_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("scope", scope),
        ("request_details", details),
    ]
}

/// The form of a delegation of `parent`'s task to `actor`, for `github:read`.
fn delegate_form<'a>(parent: &'a str, actor: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        (
            "grant_type",
            "urn:ietf:params:oauth:grant-type:token-exchange",
        ),
        ("subject_token", parent),
        (
            "subject_token_type",
            "urn:ietf:params:oauth:token-type:txn_token",
        ),
        ("actor_token", actor),
        ("actor_token_type", "urn:ietf:params:oauth:token-type:jwt"),
        ("scope", "github:read"),
    ]
}

/// A task started with a proof is bound to its key (RFC 9449 §5, as a
/// refresh token is): its token, stolen, gets nothing without that key, for
/// an access token, a sub-agent's task, or an approved step.
#[tokio::test]
async fn a_task_started_with_a_proof_is_bound_to_its_key() {
    // Polls a minute apart, so that one sent at once is told to slow down
    // however slow the machine.
    let s = TestServer::start_with(Options {
        edit: Some(Box::new(|c| {
            c.approval_poll_interval = 60;
            c.approvers = alice();
        })),
        ..Options::default()
    })
    .await;
    let token_url = format!("{}/token", s.url);
    let (key, thief) = (DpopKey::new(), DpopKey::new());
    let details = json!({ "purpose": "bound", "environment": "prod" }).to_string();
    let identity = s.k8s.kubernetes("agents", "coder");
    let start = start_form(&identity, "github:read github:delete", &details);
    let r = post(&s, &start, &[&key.proof("POST", &token_url, None)]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["token_type"], "N_A");
    let task = r.body["access_token"].as_str().unwrap().to_owned();
    let (_, claims) = decode_parts(&task);
    assert_eq!(claims["cnf"], json!({ "jkt": key.jkt() }));
    let i = s.introspect(&task).await;
    assert_eq!(i.body["active"], true, "{}", i.text);
    assert_eq!(i.body["cnf"], json!({ "jkt": key.jkt() }));
    let started = s.audit().await;
    let started = started.iter().find(|a| a.event == "task.started").unwrap();
    assert_eq!(
        started.reason.as_deref(),
        Some(format!("bound to DPoP key {}", key.jkt()).as_str())
    );
    let refused = |r: &Reply, why: &str| {
        r.assert_error(400, "invalid_dpop_proof");
        assert!(r.body.get("access_token").is_none(), "{}", r.text);
        assert!(r.text.contains(why), "{} (expected: {why})", r.text);
    };

    // An access token: not without a proof, not with another key's.
    let r = s.access_token(&task, "github", Some("read")).await;
    refused(&r, "bound to a DPoP key");
    let r = s
        .access_token_dpop(
            &task,
            "github",
            Some("read"),
            &[&thief.proof("POST", &token_url, None)],
        )
        .await;
    refused(&r, "not signed with the key");
    let r = s
        .access_token_dpop(
            &task,
            "github",
            Some("read"),
            &[&key.proof("POST", &token_url, None)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["token_type"], "DPoP");
    // Nor with a proof used before: a replayed request.
    let once = key.proof("POST", &token_url, None);
    let r = s
        .access_token_dpop(&task, "github", Some("read"), &[&once])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = s
        .access_token_dpop(&task, "github", Some("read"), &[&once])
        .await;
    refused(&r, "used before");

    // A sub-agent's task: the same.
    let helper = s.k8s.kubernetes("agents", "helper");
    let helpers = json!({ "dpop_jkt": DpopKey::new().jkt() }).to_string();
    let mut delegate = delegate_form(&task, &helper);
    delegate.push(("request_details", &helpers));
    refused(&post(&s, &delegate, &[]).await, "bound to a DPoP key");
    // Whatever else the request holds: the binding is checked first.
    let garbage = delegate_form(&task, "not-an-identity");
    refused(&post(&s, &garbage, &[]).await, "bound to a DPoP key");
    let thiefs = thief.proof("POST", &token_url, None);
    refused(
        &post(&s, &delegate, &[&thiefs]).await,
        "not signed with the key",
    );
    let once = key.proof("POST", &token_url, None);
    let r = post(&s, &delegate, &[&once]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    refused(&post(&s, &delegate, &[&once]).await, "used before");
    // Each use without the key, or with a proof used before, most likely a
    // stolen token, is on the record.
    let audit = s.audit().await;
    for (event, why) in [
        ("token.refused", "bound to a DPoP key"),
        ("token.refused", "not signed with the key"),
        ("token.refused", "used before"),
        ("task.refused", "bound to a DPoP key"),
        ("task.refused", "not signed with the key"),
        ("task.refused", "used before"),
    ] {
        assert!(
            audit.iter().any(|a| a.event == event
                && a.decision.as_deref() == Some("deny")
                && a.task_id.is_some()
                && a.reason.as_deref().is_some_and(|r| r.contains(why))),
            "no {event} record for: {why}"
        );
    }
    let bound_refusals = audit
        .iter()
        .filter(|a| {
            a.event == "task.refused"
                && a.reason
                    .as_deref()
                    .is_some_and(|r| r.contains("bound to a DPoP key"))
        })
        .count();
    assert_eq!(
        bound_refusals, 2,
        "the delegation with a bad actor token too"
    );

    // A step waiting for a person: polled with the key only.
    let r = s
        .access_token_dpop(
            &task,
            "github",
            Some("delete"),
            &[&key.proof("POST", &token_url, None)],
        )
        .await;
    r.assert_error(400, "authorization_pending");
    let id = r.body["auth_req_id"].as_str().unwrap().to_owned();
    let poll = [
        ("grant_type", "urn:openid:params:grant-type:ciba"),
        ("auth_req_id", id.as_str()),
        ("subject_token", task.as_str()),
    ];
    refused(&post(&s, &poll, &[]).await, "bound to a DPoP key");
    let thiefs = thief.proof("POST", &token_url, None);
    refused(
        &post(&s, &poll, &[&thiefs]).await,
        "not signed with the key",
    );
    let once = key.proof("POST", &token_url, None);
    let r = post(&s, &poll, &[&once]).await;
    r.assert_error(400, "authorization_pending");
    refused(&post(&s, &poll, &[&once]).await, "used before");
    // The polls without the key or with a used proof are on the record,
    // naming the step.
    let audit = s.audit().await;
    for why in [
        "bound to a DPoP key",
        "not signed with the key",
        "used before",
    ] {
        assert!(
            audit.iter().any(|a| a.event == "token.refused"
                && a.decision.as_deref() == Some("deny")
                && a.tool.as_deref() == Some("github")
                && a.actions.as_deref() == Some("delete")
                && a.reason
                    .as_deref()
                    .is_some_and(|r| r.contains(&id) && r.contains(why))),
            "no token.refused record of a poll for: {why}"
        );
    }
    // Polled again at once: told to slow down, its proof spent all the
    // same, so that a copy of it cannot collect the step once approved
    // (nor, at another replica, learn that it still waits).
    let soon = key.proof("POST", &token_url, None);
    post(&s, &poll, &[&soon])
        .await
        .assert_error(400, "slow_down");
    let alice = s.k8s.kubernetes("people", "alice");
    let r = s.approve(&id, Some(&alice)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    refused(&post(&s, &poll, &[&soon]).await, "used before");
    let r = post(&s, &poll, &[&key.proof("POST", &token_url, None)]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["token_type"], "DPoP");

    // A task started without a proof stays a bearer task.
    let r = post(&s, &start, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (_, claims) = decode_parts(r.body["access_token"].as_str().unwrap());
    assert!(claims.get("cnf").is_none(), "{claims}");
    s.stop().await;
}

/// A sub-agent's task is bound to the key its delegation names
/// (`dpop_jkt`, the sub-agent's), and a bound task's tree stays bound: a
/// bearer sub-task would be the way around the parent's binding.
#[tokio::test]
async fn a_sub_task_is_bound_to_the_key_its_delegation_names() {
    let s = TestServer::start().await;
    let token_url = format!("{}/token", s.url);
    let (key, helpers, thief) = (DpopKey::new(), DpopKey::new(), DpopKey::new());
    let details = json!({ "purpose": "bound", "environment": "prod" }).to_string();
    let identity = s.k8s.kubernetes("agents", "coder");
    let start = start_form(&identity, "github:read", &details);
    let r = post(&s, &start, &[&key.proof("POST", &token_url, None)]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let task = r.body["access_token"].as_str().unwrap().to_owned();
    let helper = s.k8s.kubernetes("agents", "helper");
    let with = |jkt: &str| json!({ "dpop_jkt": jkt }).to_string();
    let delegation = |details: Option<&str>| {
        let mut form = delegate_form(&task, &helper);
        if let Some(d) = details {
            form.push(("request_details", d));
        }
        form.into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect::<Vec<_>>()
    };
    let send = |form: Vec<(String, String)>, proof: String| {
        let s = &s;
        async move {
            let form: Vec<(&str, &str)> =
                form.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            post(s, &form, &[&proof]).await
        }
    };

    // Without a key for the sub-task: refused, on the record, with the
    // parent's own proof (the binding checked before is the parent's).
    let r = send(delegation(None), key.proof("POST", &token_url, None)).await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("`dpop_jkt` is required"), "{}", r.text);
    assert!(r.body.get("access_token").is_none(), "{}", r.text);
    let refused = s.audit().await;
    assert!(
        refused.iter().any(|a| a.event == "task.refused"
            && a.decision.as_deref() == Some("deny")
            && a.reason
                .as_deref()
                .is_some_and(|r| r.contains("`dpop_jkt` is required") && r.contains("helper"))),
        "no task.refused record of the bearer sub-task"
    );
    // A value that is not a thumbprint: refused, without quoting it.
    let jkt = helpers.jkt();
    for bad in [
        format!("{jkt}="),
        // Standard base64's alphabet.
        format!("+{}", &jkt[1..]),
        jkt[..42].to_owned(),
        "sk-live-a-secret-in-the-wrong-place".to_owned(),
    ] {
        let r = send(
            delegation(Some(&with(&bad))),
            key.proof("POST", &token_url, None),
        )
        .await;
        r.assert_error(400, "invalid_request");
        assert!(r.text.contains("RFC 7638 SHA-256 thumbprint"), "{}", r.text);
        assert!(!r.text.contains("sk-live"), "{}", r.text);
    }
    let r = send(
        delegation(Some(&json!({ "dpop_jkt": 7 }).to_string())),
        key.proof("POST", &token_url, None),
    )
    .await;
    r.assert_error(400, "invalid_request");

    // Naming the sub-agent's key: its task is bound to it.
    let r = send(
        delegation(Some(&with(&jkt))),
        key.proof("POST", &token_url, None),
    )
    .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["token_type"], "N_A");
    let child = r.body["access_token"].as_str().unwrap().to_owned();
    let (_, claims) = decode_parts(&child);
    assert_eq!(claims["cnf"], json!({ "jkt": jkt }));
    assert_eq!(claims["act"]["sub"], "system:serviceaccount:agents:helper");
    let i = s.introspect(&child).await;
    assert_eq!(i.body["cnf"], json!({ "jkt": jkt }), "{}", i.text);
    let audit = s.audit().await;
    let delegated = audit.iter().find(|a| a.event == "task.delegated").unwrap();
    assert_eq!(
        delegated.reason.as_deref(),
        Some(format!("bound to DPoP key {jkt}").as_str())
    );

    // The child's token, stolen: nothing without the sub-agent's key, the
    // parent's included.
    let r = s.access_token(&child, "github", Some("read")).await;
    r.assert_error(400, "invalid_dpop_proof");
    for other in [&key, &thief] {
        let r = s
            .access_token_dpop(
                &child,
                "github",
                Some("read"),
                &[&other.proof("POST", &token_url, None)],
            )
            .await;
        r.assert_error(400, "invalid_dpop_proof");
        assert!(r.text.contains("not signed with the key"), "{}", r.text);
    }
    let r = s
        .access_token_dpop(
            &child,
            "github",
            Some("read"),
            &[&helpers.proof("POST", &token_url, None)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["token_type"], "DPoP");
    let (_, access) = decode_parts(r.body["access_token"].as_str().unwrap());
    assert_eq!(access["cnf"], json!({ "jkt": jkt }));

    // Its own delegations: with its key's proof, and bound again.
    let grandhelper = s.k8s.kubernetes("agents", "reviewer");
    let mut deeper = delegate_form(&child, &grandhelper);
    let r = post(&s, &deeper, &[&helpers.proof("POST", &token_url, None)]).await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("`dpop_jkt` is required"), "{}", r.text);
    let last = with(&thief.jkt());
    deeper.push(("request_details", &last));
    let r = post(&s, &deeper, &[&key.proof("POST", &token_url, None)]).await;
    r.assert_error(400, "invalid_dpop_proof");
    let r = post(&s, &deeper, &[&helpers.proof("POST", &token_url, None)]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (_, claims) = decode_parts(r.body["access_token"].as_str().unwrap());
    assert_eq!(claims["cnf"], json!({ "jkt": thief.jkt() }));

    // A bearer task may delegate to a bound sub-task, never start as one.
    let bearer = task_token(&s).await;
    let mut form = delegate_form(&bearer, &helper);
    let named = with(&jkt);
    form.push(("request_details", &named));
    let r = post(&s, &form, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let (_, claims) = decode_parts(r.body["access_token"].as_str().unwrap());
    assert_eq!(claims["cnf"], json!({ "jkt": jkt }));
    let asked = json!({ "purpose": "p", "environment": "dev", "dpop_jkt": jkt }).to_string();
    let r = post(&s, &start_form(&identity, "github:read", &asked), &[]).await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("in a delegation"), "{}", r.text);
    s.stop().await;
}

/// `context.dpop_jkt` names the key of the token being issued: a policy can
/// keep production to tasks and tokens a thief could not use, and
/// delegated tasks to sub-agents that hold a key.
#[tokio::test]
async fn a_policy_can_require_bound_tokens() {
    let s = TestServer::start_with(Options {
        extra_policies: vec![(
            "bound.cedar".into(),
            r#"@id("prod-is-bound")
forbid (principal, action, resource) when { context.environment == "prod" } unless { context has dpop_jkt };
@id("sub-agents-are-bound")
forbid (principal, action, resource) when { context.delegation_depth > 0 } unless { context has dpop_jkt };
"#
            .into(),
        )],
        edit: Some(Box::new(|c| c.approvers = alice())),
        ..Options::default()
    })
    .await;
    let token_url = format!("{}/token", s.url);
    let key = DpopKey::new();
    let identity = s.k8s.kubernetes("agents", "coder");
    let prod = json!({ "purpose": "bound", "environment": "prod" }).to_string();
    let start = start_form(&identity, "github:read github:delete", &prod);
    // A bearer task in prod: denied, by the policy that says so.
    let r = post(&s, &start, &[]).await;
    r.assert_error(400, "access_denied");
    let audit = s.audit().await;
    assert!(
        audit.iter().any(|a| a.event == "task.grant"
            && a.decision.as_deref() == Some("deny")
            && a.policies == ["prod-is-bound"]),
        "no denial by prod-is-bound"
    );
    // Bound: allowed, and so are its access tokens (each request of a
    // bound task carries a proof, which binds what it gets).
    let r = post(&s, &start, &[&key.proof("POST", &token_url, None)]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let task = r.body["access_token"].as_str().unwrap().to_owned();
    let r = s
        .access_token_dpop(
            &task,
            "github",
            Some("read"),
            &[&key.proof("POST", &token_url, None)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["token_type"], "DPoP");
    // A step a person approves is decided again when its token is
    // collected, with the key of that token.
    let r = s
        .access_token_dpop(
            &task,
            "github",
            Some("delete"),
            &[&key.proof("POST", &token_url, None)],
        )
        .await;
    r.assert_error(400, "authorization_pending");
    let id = r.body["auth_req_id"].as_str().unwrap().to_owned();
    let alice = s.k8s.kubernetes("people", "alice");
    let r = s.approve(&id, Some(&alice)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let poll = [
        ("grant_type", "urn:openid:params:grant-type:ciba"),
        ("auth_req_id", id.as_str()),
        ("subject_token", task.as_str()),
    ];
    let r = post(&s, &poll, &[&key.proof("POST", &token_url, None)]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body["token_type"], "DPoP");

    // In dev, a bearer task may start and get bearer tokens, but its
    // sub-agents only bound tasks.
    let bearer = task_token(&s).await;
    let r = s.access_token(&bearer, "github", Some("read")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let helper = s.k8s.kubernetes("agents", "helper");
    let r = post(&s, &delegate_form(&bearer, &helper), &[]).await;
    r.assert_error(400, "access_denied");
    assert!(
        s.audit().await.iter().any(|a| a.event == "task.grant"
            && a.decision.as_deref() == Some("deny")
            && a.policies == ["sub-agents-are-bound"]),
        "no denial by sub-agents-are-bound"
    );
    let helpers = DpopKey::new();
    let named = json!({ "dpop_jkt": helpers.jkt() }).to_string();
    let mut form = delegate_form(&bearer, &helper);
    form.push(("request_details", &named));
    let r = post(&s, &form, &[]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let child = r.body["access_token"].as_str().unwrap().to_owned();
    let r = s
        .access_token_dpop(
            &child,
            "github",
            Some("read"),
            &[&helpers.proof("POST", &token_url, None)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.stop().await;
}

/// A captured request replayed spends nobody's `[limits]` pace: the proof
/// is refused as used before the request is charged, for an access token
/// and for a task start; a thief without a bound task's key spends none of
/// it either.
#[tokio::test]
async fn a_replayed_request_spends_nobodys_pace() {
    let s = TestServer::start_with(Options {
        edit: Some(Box::new(|c| {
            c.limits = scrip_config::Limits {
                tasks_per_minute: 1,
                task_burst: 2,
                access_tokens_per_minute: 1,
                access_token_burst: 2,
            };
        })),
        ..Options::default()
    })
    .await;
    let token_url = format!("{}/token", s.url);
    let (key, thief) = (DpopKey::new(), DpopKey::new());
    let details = json!({ "purpose": "bound", "environment": "dev" }).to_string();
    let identity = s.k8s.kubernetes("agents", "coder");
    let start = start_form(&identity, "github:read", &details);
    let captured = key.proof("POST", &token_url, None);
    let r = post(&s, &start, &[&captured]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let task = r.body["access_token"].as_str().unwrap().to_owned();
    for _ in 0..5 {
        let r = post(&s, &start, &[&captured]).await;
        r.assert_error(400, "invalid_dpop_proof");
        assert!(r.text.contains("used before"), "{}", r.text);
    }
    // The agent's second task start is still within its burst of two.
    let r = post(&s, &start, &[&key.proof("POST", &token_url, None)]).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let captured = key.proof("POST", &token_url, None);
    let r = s
        .access_token_dpop(&task, "github", Some("read"), &[&captured])
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    for _ in 0..5 {
        let r = s
            .access_token_dpop(&task, "github", Some("read"), &[&captured])
            .await;
        r.assert_error(400, "invalid_dpop_proof");
        let r = s
            .access_token_dpop(
                &task,
                "github",
                Some("read"),
                &[&thief.proof("POST", &token_url, None)],
            )
            .await;
        r.assert_error(400, "invalid_dpop_proof");
    }
    let r = s
        .access_token_dpop(
            &task,
            "github",
            Some("read"),
            &[&key.proof("POST", &token_url, None)],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    // Then the pace, for the agent's own requests.
    let r = s
        .access_token_dpop(
            &task,
            "github",
            Some("read"),
            &[&key.proof("POST", &token_url, None)],
        )
        .await;
    r.assert_error(429, "temporarily_unavailable");
    let r = post(&s, &start, &[&key.proof("POST", &token_url, None)]).await;
    r.assert_error(429, "temporarily_unavailable");
    // The replayed starts are on the record, each naming the identity.
    let audit = s.audit().await;
    let replayed: Vec<_> = audit
        .iter()
        .filter(|a| {
            a.event == "task.refused"
                && a.reason.as_deref() == Some("task start: the DPoP proof was used before")
        })
        .collect();
    assert_eq!(replayed.len(), 5, "{audit:#?}");
    for a in replayed {
        assert_eq!(a.decision.as_deref(), Some("deny"));
        assert_eq!(
            a.agent_sub.as_deref(),
            Some("system:serviceaccount:agents:coder")
        );
        assert_eq!(a.identity["kind"], "kubernetes", "{a:?}");
        assert_eq!(a.actions.as_deref(), Some("github:read"));
        assert!(a.task_id.is_none(), "{a:?}");
    }
    s.stop().await;
}
