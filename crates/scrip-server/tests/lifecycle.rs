//! The life of tasks and tokens, seen over HTTP: revocation, introspection,
//! expiry, lifetimes, signing algorithms and keys, discovery, identity claims
//! reaching Cedar, the audit trail, failing closed and policy reload.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::os::unix::fs::PermissionsExt as _;
use std::path::Path;
use std::time::{Duration, Instant};

use common::*;
use scrip_jose::SigningAlgorithm;
use serde_json::{Value, json};

fn token_of(r: &Reply) -> String {
    assert_eq!(r.status, 200, "unexpected answer: {}", r.text);
    r.body["access_token"]
        .as_str()
        .unwrap_or_else(|| panic!("no access_token in {}", r.text))
        .to_owned()
}

fn claims_of(token: &str) -> Value {
    decode_parts(token).1
}

fn inactive() -> Value {
    json!({ "active": false })
}

/// Polls `check` every 200 ms until it answers true or `limit` passes.
async fn eventually<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Sleeps until the wall clock (in whole seconds) is past `exp`.
async fn sleep_past(exp: u64) {
    while now() <= exp {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn has_event(s: &TestServer, event: &str, task_id: Option<&str>) -> bool {
    s.audit()
        .await
        .iter()
        .any(|a| a.event == event && task_id.is_none_or(|id| a.task_id.as_deref() == Some(id)))
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[tokio::test]
async fn tokens_from_a_replica_whose_clock_runs_ahead_work_and_can_be_revoked() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let task = token_of(
        &s.try_start_task(&identity, "github:read", "dev", "triage", None)
            .await,
    );
    // Another replica, sharing the key, whose clock is 5 s ahead (within
    // `clock_skew`, 30 s): its tokens are issued in this one's future.
    let ahead = |t: &str, by: u64| {
        s.resign(t, |c| {
            for claim in ["iat", "nbf"] {
                if let Some(v) = c[claim].as_u64() {
                    c[claim] = json!(v + by);
                }
            }
        })
    };
    let task_ahead = ahead(&task, 5);
    let access = token_of(&s.access_token(&task_ahead, "github", Some("read")).await);
    let access_ahead = ahead(&access, 5);
    assert_eq!(s.introspect(&access_ahead).await.body["active"], true);
    // Past the skew it is refused, as before.
    let too_far = ahead(&task, 120);
    let r = s.access_token(&too_far, "github", Some("read")).await;
    r.assert_error(400, "invalid_request");
    assert_eq!(s.introspect(&ahead(&access, 120)).await.body, inactive());
    // Revoking with the token issued ahead ends the task.
    assert_eq!(s.revoke(&task_ahead).await.status, 200);
    assert_eq!(s.introspect(&task).await.body, inactive());
    assert_eq!(s.introspect(&access).await.body, inactive());
    s.access_token(&task, "github", Some("read"))
        .await
        .assert_error(400, "invalid_request");
    s.stop().await;
}

#[tokio::test]
async fn revoking_an_access_token_leaves_the_task_and_revoking_the_task_ends_it() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let task = token_of(
        &s.try_start_task(&identity, "github:read jira:read", "dev", "triage", None)
            .await,
    );
    let first = token_of(&s.access_token(&task, "github", Some("read")).await);
    let second = token_of(&s.access_token(&task, "jira", Some("read")).await);
    assert_eq!(s.introspect(&first).await.body["active"], true);

    let r = s.revoke(&first).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = s.introspect(&first).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body, inactive(), "a revoked access token: {}", r.text);
    // The task and its other tokens are untouched.
    assert_eq!(s.introspect(&second).await.body["active"], true);
    assert_eq!(s.introspect(&task).await.body["active"], true);
    let third = token_of(&s.access_token(&task, "github", Some("read")).await);
    assert_eq!(s.introspect(&third).await.body["active"], true);
    // Revoking twice is fine.
    let r = s.revoke(&first).await;
    assert_eq!(r.status, 200, "second revocation: {}", r.text);

    // Revoking the task token ends the task.
    let r = s.revoke(&task).await;
    assert_eq!(r.status, 200, "{}", r.text);
    for t in [&second, &third] {
        assert_eq!(s.introspect(t).await.body, inactive());
    }
    assert_eq!(s.introspect(&task).await.body, inactive());
    s.access_token(&task, "github", Some("read"))
        .await
        .assert_error(400, "invalid_request");
    s.access_token(&task, "jira", None)
        .await
        .assert_error(400, "invalid_request");
    let r = s.revoke(&task).await;
    assert_eq!(r.status, 200, "revoking an ended task: {}", r.text);
    s.stop().await;
}

/// A token just past its `exp` still passes a resource server with some
/// leeway, so it can still be revoked: up to `clock_skew` past `exp` the
/// revocation is recorded and published.
#[tokio::test]
async fn a_token_just_past_its_expiry_can_still_be_revoked() {
    let s = TestServer::start_with(Options {
        access_token_ttl: 1,
        ..Options::default()
    })
    .await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let task = token_of(
        &s.try_start_task(&identity, "github:read", "dev", "triage the backlog", None)
            .await,
    );
    let r = s.access_token(&task, "github", Some("read")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let token = r.body["access_token"].as_str().unwrap().to_owned();
    let jti = claims_of(&token)["jti"].as_str().unwrap().to_owned();
    let exp = claims_of(&token)["exp"].as_u64().unwrap();
    while now() <= exp {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let r = s.revoke(&token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let audit = s.audit().await;
    assert!(
        audit
            .iter()
            .any(|a| a.event == "token.revoked" && a.jti.as_deref() == Some(jti.as_str())),
        "the revocation of a token past its exp was dropped"
    );
    s.stop().await;
}

#[tokio::test]
async fn introspection_shows_active_tokens_and_nothing_about_others() {
    // Three seconds: a token of one second lives only to the end of the
    // second it was issued in, which a loaded machine may not reach the
    // second introspection within.
    let s = TestServer::start_with(Options {
        access_token_ttl: 3,
        ..Options::default()
    })
    .await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let task = token_of(
        &s.try_start_task(&identity, "github:read", "dev", "triage the backlog", None)
            .await,
    );
    let tc = claims_of(&task);
    let r = s.introspect(&task).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.headers["cache-control"], "no-store");
    assert_eq!(r.body["active"], true);
    assert_eq!(r.body["txn"], tc["txn"]);
    assert_eq!(r.body["scope"], "github:read");
    assert_eq!(r.body["sub"], "system:serviceaccount:agents:coder");
    assert_eq!(r.body["tctx"]["purpose"], "triage the backlog");
    assert_eq!(r.body["tctx"]["environment"], "dev");
    assert_eq!(r.body["tctx"]["depth"], 0);
    // To anyone but its agent (and sub-agents) a task token is inactive: a
    // resource server, another agent. The question is recorded, with why.
    for (namespace, name) in [("resource-servers", "github-proxy"), ("agents", "other")] {
        let r = s
            .introspect_as(&s.k8s.kubernetes(namespace, name), &task)
            .await;
        assert_eq!(
            (r.status, &r.body),
            (200, &inactive()),
            "{namespace}/{name}"
        );
    }
    assert_eq!(
        introspections_of(
            &s.audit().await,
            &task,
            "inactive: a task token is active only to its agent and the sub-agents acting for it"
        ),
        2
    );

    // Garbage of several kinds.
    for garbage in [
        "garbage",
        "a.b.c",
        "eyJhbGciOiJub25lIn0.e30.",
        &"x".repeat(10_000),
    ] {
        let r = s.introspect(garbage).await;
        assert_eq!(
            (r.status, &r.body),
            (200, &inactive()),
            "garbage {:?}: {}",
            garbage.get(..20),
            r.text
        );
    }

    // A well-formed JWT from another issuer, shaped like an access token, and
    // a workload identity.
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(s.github.es_kid.clone());
    header.typ = Some("at+jwt".into());
    let mut c = s.github.claims("repo:acme/web:ref:refs/heads/main");
    c["aud"] = json!("github");
    c["txn"] = tc["txn"].clone();
    c["scope"] = json!("read");
    c["jti"] = json!("forged-1");
    c["client_id"] = json!("x");
    let foreign = s.github.sign_with(&header, &c);
    assert_eq!(s.introspect(&foreign).await.body, inactive());
    header.typ = Some("txntoken+jwt".into());
    let foreign_task = s.github.sign_with(&header, &tc);
    assert_eq!(s.introspect(&foreign_task).await.body, inactive());
    assert_eq!(s.introspect(&identity).await.body, inactive());

    // An expired access token (access_token_ttl is 3 s) under a live task,
    // introspected while it was active: introspection keeps its checked
    // signature, never its answer.
    let at = token_of(&s.access_token(&task, "github", Some("read")).await);
    let exp = claims_of(&at)["exp"].as_u64().unwrap();
    for _ in 0..2 {
        assert_eq!(s.introspect(&at).await.body["active"], true);
    }
    sleep_past(exp).await;
    let r = s.introspect(&at).await;
    assert_eq!(
        r.body,
        inactive(),
        "an access token past its exp ({exp}, now {}) must be inactive: {}",
        now(),
        r.text
    );
    assert_eq!(s.introspect(&task).await.body["active"], true);
    s.stop().await;
}

/// An inactive answer says nothing about why, but for a token of scrip's
/// own that verified, its record names the token, its task and why.
#[tokio::test]
async fn inactive_answers_about_verified_tokens_are_recorded_with_them() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let task = token_of(
        &s.try_start_task(&identity, "github:read", "dev", "triage", None)
            .await,
    );
    let txn = claims_of(&task)["txn"].as_str().unwrap().to_owned();
    let revoked = token_of(&s.access_token(&task, "github", Some("read")).await);
    let live = token_of(&s.access_token(&task, "github", Some("read")).await);
    assert_eq!(s.revoke(&revoked).await.status, 200);
    assert_eq!(s.introspect(&revoked).await.body, inactive());
    assert_eq!(s.revoke(&task).await.status, 200);
    assert_eq!(s.introspect(&live).await.body, inactive());
    assert_eq!(s.introspect(&task).await.body, inactive());
    assert_eq!(s.introspect("garbage").await.body, inactive());
    let recorded: Vec<_> = s
        .audit()
        .await
        .into_iter()
        .filter(|a| a.event == "token.introspected")
        .map(|a| {
            assert_eq!(a.decision.as_deref(), Some("deny"));
            (a.jti, a.task_id, a.tool, a.reason)
        })
        .collect();
    let jti = |t: &str| Some(claims_of(t)["jti"].as_str().unwrap().to_owned());
    let some = |s: &str| Some(s.to_owned());
    assert_eq!(
        recorded,
        [
            (
                jti(&revoked),
                some(&txn),
                some("github"),
                some("inactive: revoked")
            ),
            (
                jti(&live),
                some(&txn),
                some("github"),
                some("inactive: the task has ended")
            ),
            (
                jti(&task),
                some(&txn),
                None,
                some("inactive: the task has ended")
            ),
            (None, None, None, some("inactive")),
        ]
    );
    s.stop().await;
}

#[tokio::test]
async fn introspection_of_an_expired_task_token_is_inactive() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let task = token_of(
        &s.try_start_task(&identity, "github:read", "dev", "short", Some(1))
            .await,
    );
    let exp = claims_of(&task)["exp"].as_u64().unwrap();
    sleep_past(exp).await;
    assert_eq!(s.introspect(&task).await.body, inactive());
    s.stop().await;
}

#[tokio::test]
async fn a_task_ends_at_its_deadline() {
    let s = TestServer::start_with(Options {
        access_token_ttl: 300,
        ..Options::default()
    })
    .await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let r = s
        .try_start_task(&identity, "github:read", "dev", "quick look", Some(4))
        .await;
    let task = token_of(&r);
    // `exp` is in whole seconds: 3 to 4 s left for the exchange below.
    let expires_in = r.body["expires_in"].as_u64().unwrap();
    assert!((3..=4).contains(&expires_in), "{expires_in}");
    let tc = claims_of(&task);
    let task_exp = tc["exp"].as_u64().unwrap();
    let txn = tc["txn"].as_str().unwrap().to_owned();

    let r = s.access_token(&task, "github", Some("read")).await;
    let at = token_of(&r);
    let ac = claims_of(&at);
    assert!(
        ac["exp"].as_u64().unwrap() <= task_exp,
        "access token exp {} after task exp {task_exp}",
        ac["exp"]
    );
    assert!(r.body["expires_in"].as_u64().unwrap() <= 4, "{}", r.text);

    sleep_past(task_exp).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    s.access_token(&task, "github", Some("read"))
        .await
        .assert_error(400, "invalid_request");
    assert_eq!(s.introspect(&at).await.body, inactive());
    assert_eq!(s.introspect(&task).await.body, inactive());

    let recorded = eventually(Duration::from_secs(5), || {
        has_event(&s, "task.expired", Some(&txn))
    })
    .await;
    assert!(recorded, "no task.expired audit record for task {txn}");
    s.stop().await;
}

#[tokio::test]
async fn lifetimes_default_and_are_capped() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let r = s
        .try_start_task(&identity, "github:read", "dev", "default lifetimes", None)
        .await;
    let task = token_of(&r);
    let expires_in = r.body["expires_in"].as_u64().unwrap();
    assert!((3590..=3600).contains(&expires_in), "{expires_in}");
    let tc = claims_of(&task);
    assert_eq!(
        tc["exp"].as_u64().unwrap() - tc["iat"].as_u64().unwrap(),
        3600
    );
    let r = s.access_token(&task, "github", None).await;
    let expires_in = r.body["expires_in"].as_u64().unwrap();
    assert!((290..=300).contains(&expires_in), "{}", r.text);
    let ac = claims_of(&token_of(&r));
    assert_eq!(
        ac["exp"].as_u64().unwrap() - ac["iat"].as_u64().unwrap(),
        300
    );
    s.stop().await;

    let s = TestServer::start_with(Options {
        task_ttl: 300,
        edit: Some(Box::new(|c| c.max_task_ttl = 600)),
        ..Options::default()
    })
    .await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let r = s
        .try_start_task(&identity, "github:read", "dev", "too long", Some(100_000))
        .await;
    let task = token_of(&r);
    let expires_in = r.body["expires_in"].as_u64().unwrap();
    assert!(
        (590..=600).contains(&expires_in),
        "ttl above max_task_ttl must be capped: {expires_in}"
    );
    let tc = claims_of(&task);
    assert!(tc["exp"].as_u64().unwrap() - tc["iat"].as_u64().unwrap() <= 600);
    s.stop().await;
}

const PRIVATE_MEMBERS: &[&str] = &["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

#[tokio::test]
async fn eddsa_and_rs256_tokens_verify_against_the_jwks() {
    for (algorithm, alg, kty) in [
        (
            SigningAlgorithm::EdDSA,
            jsonwebtoken::Algorithm::EdDSA,
            "OKP",
        ),
        (
            SigningAlgorithm::RS256,
            jsonwebtoken::Algorithm::RS256,
            "RSA",
        ),
        (
            SigningAlgorithm::ES256,
            jsonwebtoken::Algorithm::ES256,
            "EC",
        ),
    ] {
        let s = TestServer::start_with(Options {
            algorithm,
            ..Options::default()
        })
        .await;
        let identity = s.k8s.kubernetes("agents", "coder");
        let task = token_of(
            &s.try_start_task(&identity, "github:read", "dev", "verify", None)
                .await,
        );
        let at = token_of(&s.access_token(&task, "github", Some("read")).await);

        let jwks: Value = s
            .http
            .get(format!("{}/jwks", s.url))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let keys = jwks["keys"].as_array().unwrap();
        assert!(!keys.is_empty());
        for k in keys {
            assert_eq!(k["kty"], kty, "{algorithm:?}: {k}");
            for m in PRIVATE_MEMBERS {
                assert!(k.get(m).is_none(), "{algorithm:?}: JWKS has `{m}`: {k}");
            }
        }
        for token in [&task, &at] {
            let (h, _) = decode_parts(token);
            assert_eq!(h["alg"], algorithm.as_str(), "{h}");
            assert!(
                keys.iter().any(|k| k["kid"] == h["kid"]),
                "{algorithm:?}: kid {} not in the JWKS",
                h["kid"]
            );
        }
        let kid = decode_parts(&at).0["kid"].clone();
        let jwk = keys.iter().find(|k| k["kid"] == kid).unwrap();
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk.clone()).unwrap();
        let key = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
        let mut validation = jsonwebtoken::Validation::new(alg);
        validation.set_issuer(&[&s.url]);
        validation.set_audience(&["github"]);
        validation.set_required_spec_claims(&["exp", "iss", "aud", "sub"]);
        let data = jsonwebtoken::decode::<Value>(&at, &key, &validation)
            .unwrap_or_else(|e| panic!("{algorithm:?}: access token does not verify: {e}"));
        assert_eq!(data.claims["scope"], "read");
        // The same key does not accept it for another audience: `aud` is
        // the one tool, not a list that also names another.
        let mut wrong_aud = validation.clone();
        wrong_aud.set_audience(&["jira"]);
        assert!(jsonwebtoken::decode::<Value>(&at, &key, &wrong_aud).is_err());
        s.stop().await;
    }
}

#[tokio::test]
async fn an_issuer_with_a_path_has_its_metadata_where_rfc_8414_puts_it() {
    let s = TestServer::start_with(Options {
        edit: Some(Box::new(|c| {
            c.issuer = Some("http://127.0.0.1:7070/tenant".into());
        })),
        ..Options::default()
    })
    .await;
    let (base, http) = (&s.url, &s.http);
    // Where RFC 8414 §3.1 puts it, and where a front proxy that strips the
    // issuer's path sends the appended form.
    for path in [
        "/.well-known/oauth-authorization-server/tenant",
        "/.well-known/oauth-authorization-server",
    ] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        assert_eq!(
            r.headers()["cache-control"],
            "max-age=300",
            "{path} is not the metadata"
        );
        let m: Value = r.json().await.unwrap();
        assert_eq!(m["issuer"], "http://127.0.0.1:7070/tenant", "{path}");
        assert_eq!(m["token_endpoint"], "http://127.0.0.1:7070/tenant/token");
    }
    // Another issuer's path is no endpoint.
    for path in [
        "/.well-known/oauth-authorization-server/other",
        "/.well-known/oauth-authorization-server/tenant/x",
        "/.well-known/oauth-authorization-server/",
    ] {
        let r = http.get(format!("{base}{path}")).send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        let body: Value = r.json().await.unwrap();
        assert_eq!(body["error"], "not_found", "{path}");
    }
    s.stop().await;
}

#[tokio::test]
async fn metadata_names_every_endpoint_under_the_issuer() {
    let s = TestServer::start().await;
    let r = s
        .http
        .get(format!("{}/.well-known/oauth-authorization-server", s.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let m: Value = r.json().await.unwrap();
    let issuer = m["issuer"].as_str().unwrap();
    assert_eq!(issuer, s.url);
    for field in [
        "token_endpoint",
        "jwks_uri",
        "introspection_endpoint",
        "revocation_endpoint",
    ] {
        let url = m[field]
            .as_str()
            .unwrap_or_else(|| panic!("no {field}: {m}"));
        assert!(
            url.starts_with(issuer),
            "{field} {url} is not under {issuer}"
        );
    }
    let grants = m["grant_types_supported"].as_array().unwrap();
    assert!(grants.iter().any(|g| g == TOKEN_EXCHANGE), "{m}");
    // Unauthenticated: it names none of the tools, which only a trusted
    // workload may learn.
    let text = m.to_string();
    for tool in ["github", "jira", "deploy"] {
        assert!(!text.contains(tool), "{tool}: {m}");
    }
    assert_eq!(
        m["access_token_signing_alg_values_supported"],
        json!(["ES256"])
    );
    // Only CIBA's poll is borrowed, not its backchannel authentication
    // endpoint, which a CIBA provider's metadata must name: none of CIBA's
    // own members is advertised.
    for member in [
        "backchannel_token_delivery_modes_supported",
        "backchannel_authentication_endpoint",
    ] {
        assert!(m.get(member).is_none(), "{member}: {m}");
    }
    // The advertised JWKS is reachable, and caches may keep it no longer
    // than a new key is published before it signs (`signing_key_lead`).
    let jwks = s
        .http
        .get(m["jwks_uri"].as_str().unwrap())
        .send()
        .await
        .unwrap();
    assert_eq!(jwks.status(), 200);
    assert_eq!(jwks.headers()["cache-control"], "max-age=60");
    s.stop().await;
}

/// An issuer declared of a kind gives identities of that kind only: another
/// trusted issuer's token shaped like a Kubernetes one gets no `namespace`,
/// and a SPIFFE issuer speaks for its own trust domain only.
#[tokio::test]
async fn a_declared_issuer_kind_decides_the_attributes() {
    let s = TestServer::start_with(Options {
        edit: Some(Box::new(|c: &mut scrip_config::Config| {
            use scrip_config::IssuerKind;
            for (ti, kind) in c.trusted_issuers.iter_mut().zip([
                IssuerKind::Kubernetes,
                IssuerKind::GithubActions,
                IssuerKind::Spiffe,
            ]) {
                ti.kind = Some(kind);
            }
            c.trusted_issuers[2].trust_domain = Some("acme.example".into());
        })),
        ..Options::default()
    })
    .await;
    let start = |identity: String| {
        let s = &s;
        async move {
            s.try_start_task(&identity, "github:read", "dev", "kinds", None)
                .await
        }
    };
    // The cluster's own token: `agents-namespace` permits it.
    let r = start(s.k8s.kubernetes("agents", "coder")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // The same claims signed by the GitHub issuer: no namespace, no grant.
    let r = start(s.github.kubernetes("agents", "coder")).await;
    r.assert_error(400, "access_denied");
    // A SPIFFE ID of another trust domain is no identity of this issuer.
    let r = start(s.spiffe.spiffe("acme.example.evil", "/agents/coder")).await;
    r.assert_error(400, "invalid_request");
    assert!(
        r.text
            .contains("not a SPIFFE ID in trust domain `acme.example`"),
        "{}",
        r.text
    );
    s.stop().await;

    // Undeclared, the shape decides: the GitHub issuer's Kubernetes-shaped
    // token passes for the cluster's (what declaring a kind prevents).
    let s = TestServer::start().await;
    let r = s
        .try_start_task(
            &s.github.kubernetes("agents", "coder"),
            "github:read",
            "dev",
            "kinds",
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.stop().await;
}

#[tokio::test]
async fn identity_claims_reach_cedar() {
    let extra = vec![
        (
            "spiffe-prod-read.cedar".to_owned(),
            r#"@id("spiffe-prod-read")
permit (principal, action == Action::"read", resource)
when { principal has trust_domain && principal.trust_domain == "prod.acme.com" };
"#
            .to_owned(),
        ),
        (
            "deployer-pods.cedar".to_owned(),
            r#"@id("deployer-pods-execute")
permit (principal, action == Action::"execute", resource)
when {
  principal.hasTag("kubernetes.io.pod.name") &&
  principal.getTag("kubernetes.io.pod.name") like "deployer-*"
};
"#
            .to_owned(),
        ),
    ];
    let s = TestServer::start_with(Options {
        extra_policies: extra,
        ..Options::default()
    })
    .await;
    let cases: Vec<(&str, String, &str, &str, Option<&str>)> = vec![
        // SPIFFE: trust domain.
        (
            "spiffe prod",
            s.spiffe.spiffe("prod.acme.com", "/ns/agents/sa/coder"),
            "github:read",
            "dev",
            Some("spiffe-prod-read"),
        ),
        (
            "spiffe staging",
            s.spiffe.spiffe("staging.acme.com", "/ns/agents/sa/coder"),
            "github:read",
            "dev",
            None,
        ),
        // GitHub Actions: repository, environment.
        (
            "github acme dev",
            s.github.github("acme/web"),
            "github:read",
            "dev",
            Some("acme-dev-read"),
        ),
        (
            "github acme prod",
            s.github.github("acme/web"),
            "github:read",
            "prod",
            None,
        ),
        (
            "github other org dev",
            s.github.github("evil/web"),
            "github:read",
            "dev",
            None,
        ),
        // Kubernetes: namespace.
        (
            "k8s agents",
            s.k8s.kubernetes("agents", "coder"),
            "github:read",
            "dev",
            Some("agents-namespace"),
        ),
        (
            "k8s other",
            s.k8s.kubernetes("other", "coder"),
            "github:read",
            "dev",
            None,
        ),
        // Kubernetes: a tag from a nested claim.
        (
            "k8s deployer pod",
            s.k8s.kubernetes("other", "deployer"),
            "deploy:execute",
            "prod",
            Some("deployer-pods-execute"),
        ),
        (
            "k8s coder pod",
            s.k8s.kubernetes("other", "coder"),
            "deploy:execute",
            "prod",
            None,
        ),
    ];
    for (name, identity, scope, env, allowed_by) in cases {
        let r = s
            .try_start_task(&identity, scope, env, "claims reach cedar", None)
            .await;
        match allowed_by {
            Some(policy) => {
                if r.status != 200 {
                    let audit = s.audit().await;
                    let last = audit.iter().rev().find(|a| a.event == "task.grant");
                    panic!("{name}: {} (decision: {last:?})", r.text);
                }
                assert_eq!(r.body["scope"], scope, "{name}");
                let txn = claims_of(&token_of(&r))["txn"].as_str().unwrap().to_owned();
                let audit = s.audit().await;
                let grant = audit
                    .iter()
                    .find(|a| a.event == "task.grant" && a.task_id.as_deref() == Some(&txn))
                    .unwrap_or_else(|| panic!("{name}: no task.grant record"));
                assert_eq!(grant.decision.as_deref(), Some("allow"), "{name}");
                assert!(
                    grant.policies.iter().any(|p| p == policy),
                    "{name}: expected {policy} among {:?}",
                    grant.policies
                );
            }
            None => r.assert_error(400, "access_denied"),
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn refused_grants_are_left_out() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let r = s
        .try_start_task(
            &identity,
            "github:read github:write",
            "dev",
            "tidy the readme",
            None,
        )
        .await;
    let task = token_of(&r);
    assert_eq!(r.body["scope"], "github:read", "{}", r.text);
    assert_eq!(claims_of(&task)["scope"], "github:read");
    s.access_token(&task, "github", Some("write"))
        .await
        .assert_error(400, "invalid_scope");
    let r = s.access_token(&task, "github", None).await;
    assert_eq!(r.body["scope"], "read", "{}", r.text);
    s.stop().await;
}

#[tokio::test]
async fn the_signing_key_is_private_and_kept() {
    let keep = tempfile::tempdir().unwrap();
    let data_dir = keep.path().join("data");
    let kid_of = |s: &TestServer| {
        let http = s.http.clone();
        let url = format!("{}/jwks", s.url);
        async move {
            let jwks: Value = http.get(url).send().await.unwrap().json().await.unwrap();
            jwks["keys"][0]["kid"].as_str().unwrap().to_owned()
        }
    };
    let with_data_dir = |dir: std::path::PathBuf| Options {
        edit: Some(Box::new(move |c: &mut scrip_config::Config| {
            c.data_dir = dir
        })),
        ..Options::default()
    };

    let s = TestServer::start_with(with_data_dir(data_dir.clone())).await;
    let kid = kid_of(&s).await;
    let key_file = data_dir.join("keys/signing-es256.json");
    assert!(key_file.is_file(), "no key file at {}", key_file.display());
    assert_eq!(mode(&key_file), 0o600, "key file mode");
    assert_eq!(mode(&data_dir), 0o700, "data dir mode");
    assert_eq!(mode(&data_dir.join("keys")), 0o700, "keys dir mode");
    s.stop().await;

    let s = TestServer::start_with(with_data_dir(data_dir.clone())).await;
    assert_eq!(kid_of(&s).await, kid, "the key changed across a restart");
    let identity = s.k8s.kubernetes("agents", "coder");
    let task = token_of(
        &s.try_start_task(&identity, "github:read", "dev", "after restart", None)
            .await,
    );
    assert_eq!(decode_parts(&task).0["kid"], kid);
    s.stop().await;

    std::fs::set_permissions(&key_file, std::fs::Permissions::from_mode(0o644)).unwrap();
    let config = scrip_config::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: data_dir.clone(),
        policy_dir: repo_policies(),
        tools: tools(),
        ..scrip_config::Config::default()
    };
    let message = match scrip_server::Server::bind(config).await {
        Ok(_) => panic!("a server started with a key file others can read"),
        Err(e) => e.to_string(),
    };
    assert!(
        message.contains(&key_file.display().to_string()),
        "the error does not name the file: {message}"
    );
    assert!(
        message.contains("chmod 600"),
        "the error does not say how to fix it: {message}"
    );
}

/// A task start refused once its agent is identified is on the record,
/// naming the identity and why; one refused before (an identity that does
/// not verify) is answered only.
#[tokio::test]
async fn an_identified_agents_refused_task_starts_are_recorded() {
    let s = TestServer::start().await;
    let mut claims = s.github.claims("repo:acme/web:ref:refs/heads/main");
    for (k, v) in [
        ("repository", "acme/web"),
        ("workflow", "agent"),
        ("run_id", "991"),
        ("run_attempt", "3"),
        ("jti", "gh-jti-1"),
    ] {
        claims[k] = json!(v);
    }
    let identity = s.github.sign(&claims);
    let refusals = [
        ("nope:read", "dev", "task start: unknown tool `nope`"),
        (
            "github:fly",
            "dev",
            "task start: tool `github` has no action `fly`",
        ),
        (
            "github:read",
            "production",
            "task start: request_details: `environment` is not one of dev, staging, prod (the configured `environments`)",
        ),
    ];
    for (scope, env, _) in refusals {
        let r = s.try_start_task(&identity, scope, env, "p", None).await;
        assert_eq!(r.status, 400, "{}", r.text);
    }
    // An identity that does not verify (signed by a key the issuer does
    // not publish) is nobody's to record.
    let forged = Idp::new(GITHUB_ISSUER).sign(&claims);
    let r = s
        .try_start_task(&forged, "nope:read", "dev", "p", None)
        .await;
    assert_eq!(r.status, 400, "{}", r.text);

    let audit = s.audit().await;
    let refused: Vec<_> = audit.iter().filter(|a| a.event == "task.refused").collect();
    assert_eq!(refused.len(), refusals.len(), "{refused:#?}");
    for (a, (scope, _, reason)) in refused.iter().zip(refusals) {
        assert_eq!(a.reason.as_deref(), Some(reason));
        assert_eq!(a.decision.as_deref(), Some("deny"));
        assert_eq!(a.agent_iss.as_deref(), Some(GITHUB_ISSUER));
        assert_eq!(
            a.agent_sub.as_deref(),
            Some("repo:acme/web:ref:refs/heads/main")
        );
        assert!(a.client.is_some(), "{a:?}");
        // The scope asked, where it names configured grants only.
        let configured = scope == "github:read";
        assert_eq!(a.actions.as_deref(), configured.then_some(scope), "{a:?}");
        assert_eq!(a.identity["jti"], "gh-jti-1");
        assert_eq!(a.identity["run_id"], "991");
        assert_eq!(a.identity["run_attempt"], "3");
        assert_eq!(a.identity["repository"], "acme/web");
    }
    // Asked again and again: within the agent's budget of records, the
    // rest counted for it.
    let tries = 60;
    for _ in 0..tries {
        let r = s
            .try_start_task(&identity, "nope:read", "dev", "p", None)
            .await;
        assert_eq!(r.status, 400, "{}", r.text);
    }
    let audit = s.stop_then_audit().await;
    let unknown: Vec<_> = audit
        .into_iter()
        .filter(|a| {
            a.event == "task.refused"
                && a.reason
                    .as_deref()
                    .is_some_and(|r| r.contains("unknown tool"))
        })
        .collect();
    assert_counted_past_the_budget(&unknown, tries + 1);
    for a in unknown.iter().filter(|a| count_of(a).is_some()) {
        let reason = a.reason.as_deref().unwrap();
        assert!(reason.contains("for one agent;"), "{reason}");
    }
}

#[tokio::test]
async fn the_audit_trail_records_decisions_and_no_tokens() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let task = token_of(
        &s.try_start_task(&identity, "github:read jira:read", "dev", "audit me", None)
            .await,
    );
    let txn = claims_of(&task)["txn"].as_str().unwrap().to_owned();
    let at = token_of(&s.access_token(&task, "github", Some("read")).await);
    let at_jti = claims_of(&at)["jti"].as_str().unwrap().to_owned();
    let at2 = token_of(&s.access_token(&task, "jira", Some("read")).await);
    assert_eq!(s.revoke(&at2).await.status, 200);
    assert_eq!(s.revoke(&task).await.status, 200);
    // A refused exchange too, whose request carried the task token.
    s.access_token(&task, "github", Some("read"))
        .await
        .assert_error(400, "invalid_request");

    let audit = s.audit().await;
    let of_task: Vec<_> = audit
        .iter()
        .filter(|a| a.task_id.as_deref() == Some(txn.as_str()))
        .collect();
    let find = |event: &str| {
        of_task
            .iter()
            .find(|a| a.event == event)
            .unwrap_or_else(|| panic!("no {event} record for the task in {of_task:#?}"))
    };
    let agent = "system:serviceaccount:agents:coder";

    let started = find("task.started");
    assert_eq!(started.agent_sub.as_deref(), Some(agent));
    assert_eq!(started.decision.as_deref(), Some("allow"));
    // Which run of the workload: its token's `jti`, its pod.
    let (_, identity_claims) = decode_parts(&identity);
    assert_eq!(
        Some(started.identity["jti"].as_str()),
        identity_claims["jti"].as_str()
    );
    assert_eq!(started.identity["kind"], "kubernetes");
    assert_eq!(started.identity["namespace"], "agents");
    assert_eq!(started.identity["pod"], "coder-7d9f8");
    assert_eq!(
        started.identity["pod_uid"],
        "4f1e6c52-0000-4000-8000-000000000002"
    );
    // Nowhere else: a grant's decision does not repeat it.
    assert!(
        of_task
            .iter()
            .filter(|a| a.event != "task.started")
            .all(|a| a.identity.is_empty()),
        "{of_task:#?}"
    );

    let grants: Vec<_> = of_task.iter().filter(|a| a.event == "task.grant").collect();
    assert_eq!(grants.len(), 2, "one task.grant per grant: {grants:#?}");
    for g in &grants {
        assert_eq!(g.agent_sub.as_deref(), Some(agent));
        assert_eq!(g.decision.as_deref(), Some("allow"));
        assert!(
            g.policies.iter().any(|p| p == "agents-namespace"),
            "{:?}",
            g.policies
        );
        assert!(
            matches!(g.tool.as_deref(), Some("github" | "jira")),
            "{g:?}"
        );
    }

    let issued = find("token.issued");
    assert_eq!(issued.agent_sub.as_deref(), Some(agent));
    assert_eq!(issued.tool.as_deref(), Some("github"));
    assert_eq!(issued.decision.as_deref(), Some("allow"));
    assert_eq!(issued.jti.as_deref(), Some(at_jti.as_str()));
    assert!(
        of_task.iter().any(|a| a.tool.as_deref() == Some("github")
            && a.decision.as_deref() == Some("allow")
            && a.policies.iter().any(|p| p == "agents-namespace")
            && a.event != "task.grant"),
        "no token decision naming its policies: {of_task:#?}"
    );

    let ended = find("task.ended");
    assert_eq!(ended.agent_sub.as_deref(), Some(agent));

    // Invariant 1: no token in any record.
    let secrets = [task.as_str(), at.as_str(), at2.as_str(), identity.as_str()];
    for record in &audit {
        let text = serde_json::to_string(record).unwrap();
        for secret in secrets {
            let signature = secret.rsplit('.').next().unwrap();
            assert!(
                !text.contains(secret) && !text.contains(signature),
                "an audit record holds a token: {text}"
            );
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn a_locked_store_fails_closed_and_recovers() {
    use sqlx::ConnectOptions as _;
    use sqlx::Connection as _;

    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let started_before = s
        .audit()
        .await
        .iter()
        .filter(|a| a.event == "task.started")
        .count();

    let db = s.dir.path().join("data/scrip.db");
    let mut lock = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(&db)
        .busy_timeout(Duration::from_secs(5))
        .connect()
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut lock)
        .await
        .unwrap();

    let r = s
        .try_start_task(&identity, "github:read", "dev", "while locked", None)
        .await;
    r.assert_error(503, "temporarily_unavailable");
    assert!(
        r.body.get("access_token").is_none() && !r.text.contains("eyJ"),
        "something was issued: {}",
        r.text
    );

    sqlx::query("ROLLBACK").execute(&mut lock).await.unwrap();
    lock.close().await.unwrap();

    let r = s
        .try_start_task(&identity, "github:read", "dev", "after the lock", None)
        .await;
    let task = token_of(&r);
    assert_eq!(s.introspect(&task).await.body["active"], true);
    token_of(&s.access_token(&task, "github", Some("read")).await);
    let started_after = s
        .audit()
        .await
        .iter()
        .filter(|a| a.event == "task.started")
        .count();
    assert_eq!(
        started_after,
        started_before + 1,
        "only the task started after the lock may be recorded"
    );
    s.stop().await;
}

/// A reload whose `policy.reloaded` record the store cannot take (its
/// write lock held past a commit's wait) is not put in force: it is read
/// again, and decides only once its record is committed, before any
/// decision it makes.
#[tokio::test]
async fn a_reload_the_store_cannot_record_waits_for_its_record() {
    let logs = captured_logs();
    let s = TestServer::start().await;
    let other = s.k8s.kubernetes("other", "coder");
    let try_other = || s.try_start_task(&other, "github:read", "dev", "reload", None);
    try_other().await.assert_error(400, "access_denied");
    let db = s.dir.path().join("data/scrip.db");
    let mut holder = hold_store(&db).await;
    std::fs::write(
        s.dir.path().join("policies/zz-other.cedar"),
        r#"@id("other-read")
permit (principal, action == Action::"read", resource)
when { principal has namespace && principal.namespace == "other" };
"#,
    )
    .unwrap();
    let refused = eventually(Duration::from_secs(20), || async {
        String::from_utf8_lossy(&logs.lock().unwrap())
            .contains("could not record the policy reload")
    })
    .await;
    assert!(refused, "the reload's commit did not fail");
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    drop(holder);
    let allowed = eventually(Duration::from_secs(10), || async {
        try_other().await.status == 200
    })
    .await;
    assert!(
        allowed,
        "the new policy was not put in force once it could be recorded"
    );
    let audit = s.audit().await;
    let seq = |event: &str| {
        audit
            .iter()
            .find(|a| {
                a.event == event && a.agent_sub.as_deref().is_none_or(|s| s.contains("other"))
            })
            .map(|a| a.seq)
    };
    let reloaded = seq("policy.reloaded").expect("no policy.reloaded record");
    let started = seq("task.started").expect("no task.started record");
    assert!(reloaded < started, "{reloaded} {started}");
    s.stop().await;
}

#[tokio::test]
async fn policies_reload_on_file_change_and_keep_the_last_good_set() {
    const FORBID_OTHER: &str = "@id(\"no-other\")\nforbid (principal, action, resource)\nwhen { principal has namespace && principal.namespace == \"other\" };\n";
    let s = TestServer::start().await;
    let other = s.k8s.kubernetes("other", "coder");
    let agents = s.k8s.kubernetes("agents", "coder");
    let try_other = || s.try_start_task(&other, "github:read", "dev", "reload", None);
    try_other().await.assert_error(400, "access_denied");
    // The set the start loaded is named as `scrip policy check` names it.
    let set = scrip_policy::PolicyEngine::load(&s.dir.path().join("policies")).unwrap();
    let loaded = s
        .audit()
        .await
        .into_iter()
        .find(|a| a.event == "policy.loaded")
        .and_then(|a| a.reason)
        .unwrap();
    assert!(
        loaded.ends_with(&format!(", set {}", set.digest())),
        "{loaded}"
    );

    let file = s.dir.path().join("policies/zz-other.cedar");
    std::fs::write(
        &file,
        "@id(\"broken\")\npermit (principal, action == Action::\"read\", resource)\nwhen { this is not cedar ;\n",
    )
    .unwrap();
    let rejected = eventually(Duration::from_secs(5), || {
        has_event(&s, "policy.rejected", None)
    })
    .await;
    assert!(rejected, "no policy.rejected audit record");
    // The last good set still decides.
    try_other().await.assert_error(400, "access_denied");
    let r = s
        .try_start_task(&agents, "github:read", "dev", "reload", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    std::fs::write(
        &file,
        r#"@id("other-read")
permit (principal, action == Action::"read", resource)
when { principal has namespace && principal.namespace == "other" };
"#,
    )
    .unwrap();
    let allowed = eventually(Duration::from_secs(5), || async {
        try_other().await.status == 200
    })
    .await;
    assert!(allowed, "the new policy was not picked up");
    let audit = s.audit().await;
    let rejected_seq = audit
        .iter()
        .filter(|a| a.event == "policy.rejected")
        .map(|a| a.seq)
        .min()
        .unwrap();
    assert!(
        audit
            .iter()
            .any(|a| a.event == "policy.reloaded" && a.seq > rejected_seq),
        "no policy.reloaded audit record after the rejection"
    );
    // It names the set as `scrip policy check` does.
    let set = scrip_policy::PolicyEngine::load(&s.dir.path().join("policies")).unwrap();
    let reloaded = audit
        .iter()
        .rfind(|a| a.event == "policy.reloaded")
        .and_then(|a| a.reason.clone())
        .unwrap();
    assert!(
        reloaded.contains(&format!(", set {} (", set.digest())),
        "{reloaded}"
    );
    let r = try_other().await;
    assert_eq!(r.body["scope"], "github:read", "{}", r.text);

    // The directory gone (moved, a volume unmounted): refused, the last
    // good set still decides.
    let before = s
        .audit()
        .await
        .iter()
        .filter(|a| a.event == "policy.rejected")
        .count();
    std::fs::rename(
        s.dir.path().join("policies"),
        s.dir.path().join("policies-moved"),
    )
    .unwrap();
    let rejected = eventually(Duration::from_secs(5), || async {
        s.audit()
            .await
            .iter()
            .filter(|a| a.event == "policy.rejected")
            .count()
            > before
    })
    .await;
    assert!(
        rejected,
        "no policy.rejected audit record for the directory gone"
    );
    let r = try_other().await;
    assert_eq!(r.status, 200, "{}", r.text);

    // Back, with a `forbid` added, in a directory others can write:
    // refused for where the files are. Fixing that changes none of them,
    // and is read at the next poll; the refusal, repeated at each poll
    // meanwhile, is recorded once.
    let rejections = || async {
        s.audit()
            .await
            .iter()
            .filter(|a| a.event == "policy.rejected")
            .count()
    };
    let dir = s.dir.path().join("policies");
    std::fs::rename(s.dir.path().join("policies-moved"), &dir).unwrap();
    let mode = |m: u32| {
        use std::os::unix::fs::PermissionsExt as _;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(m)).unwrap();
    };
    mode(0o777);
    let before = rejections().await;
    std::fs::write(dir.join("zz-forbid.cedar"), FORBID_OTHER).unwrap();
    let refused = eventually(Duration::from_secs(5), || async {
        rejections().await > before
    })
    .await;
    assert!(refused, "a directory others can write was read");
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(rejections().await, before + 1, "recorded again");
    assert_eq!(try_other().await.status, 200, "the last good set decides");
    mode(0o755);
    let denied = eventually(Duration::from_secs(5), || async {
        try_other().await.status == 400
    })
    .await;
    assert!(denied, "the directory fixed was not read again");

    // A link to nothing: refused; removing it is a change, read.
    let link = dir.join("zz-gone.cedar");
    std::os::unix::fs::symlink(dir.join("nowhere.cedar"), &link).unwrap();
    let before = rejections().await;
    let refused = eventually(Duration::from_secs(5), || async {
        rejections().await > before
    })
    .await;
    assert!(refused, "a link to nothing was not refused");
    std::fs::remove_file(dir.join("zz-forbid.cedar")).unwrap();
    std::fs::remove_file(&link).unwrap();
    let allowed = eventually(Duration::from_secs(5), || async {
        try_other().await.status == 200
    })
    .await;
    assert!(allowed, "the link's removal was not read");

    // A `forbid` put in a subdirectory, which scrip does not read: the set
    // is refused rather than run without it; moved up, it is read.
    let before = rejections().await;
    std::fs::create_dir(dir.join("team")).unwrap();
    std::fs::write(dir.join("team/zz-forbid.cedar"), FORBID_OTHER).unwrap();
    let refused = eventually(Duration::from_secs(5), || async {
        rejections().await > before
    })
    .await;
    assert!(refused, "a policy file in a subdirectory was not refused");
    let reason = s
        .audit()
        .await
        .into_iter()
        .rfind(|a| a.event == "policy.rejected")
        .and_then(|a| a.reason)
        .unwrap();
    assert!(
        reason.contains("team/zz-forbid.cedar") && reason.contains("subdirectory"),
        "{reason}"
    );
    assert_eq!(try_other().await.status, 200, "the last good set decides");
    std::fs::rename(
        dir.join("team/zz-forbid.cedar"),
        dir.join("zz-forbid.cedar"),
    )
    .unwrap();
    let denied = eventually(Duration::from_secs(5), || async {
        try_other().await.status == 400
    })
    .await;
    assert!(denied, "the policy moved up was not read");
    s.stop().await;
}

/// A server on `db`'s shared store, and the configuration and store
/// another process on the same host would use beside it (`scrip proxy`,
/// `scrip secret`, `scrip key`).
async fn beside_a_shared_server(
    db: &scrip_testkit::PgDatabase,
) -> (
    TestServer,
    scrip_config::Config,
    std::sync::Arc<dyn scrip_store::Store>,
) {
    let url = db.url().to_owned();
    let database_url = url.clone();
    let s = TestServer::start_with(Options {
        edit: Some(Box::new(move |c: &mut scrip_config::Config| {
            c.database_url = Some(database_url);
        })),
        ..Options::default()
    })
    .await;
    let config = scrip_config::Config {
        data_dir: s.dir.path().join("data"),
        database_url: Some(url.clone()),
        ..scrip_config::Config::default()
    };
    let store = scrip_store::open(Some(&url), &config.data_dir.join("scrip.db"))
        .await
        .unwrap();
    (s, config, store)
}

/// A process writing beside `scrip serve` on a shared store (`scrip proxy`,
/// `scrip secret`) signs its audit chain with the store's checkpoint key,
/// the one `scrip audit verify` and `/audit/keys` trust.
#[tokio::test]
async fn other_writers_sign_with_the_shared_checkpoint_key() {
    let db = scrip_testkit::PgDatabase::new();
    let (s, config, store) = beside_a_shared_server(&db).await;
    let key = scrip_server::keyring::checkpoint_signer(&config, store.as_ref(), now(), "test")
        .await
        .unwrap();
    let trusted = scrip_server::keyring::shared_checkpoint_jwks(&config, store.as_ref(), now())
        .await
        .unwrap();
    assert!(trusted.contains(&key.public_jwk()), "{trusted:?}");
    let served: Value = s
        .http
        .get(format!("{}/audit/keys", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(
        served["keys"]
            .as_array()
            .unwrap()
            .contains(&key.public_jwk()),
        "{served}"
    );
    s.stop().await;
}

/// The `kid`s of the server's published signing keys, sorted.
async fn published_kids(s: &TestServer) -> Vec<String> {
    let jwks: Value = s
        .http
        .get(format!("{}/jwks", s.url))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let mut kids: Vec<String> = jwks["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap().to_owned())
        .collect();
    kids.sort();
    kids
}

/// A leaked shared signing key is withdrawn at once (`scrip key withdraw`):
/// the running server stops accepting what it signed and publishing it,
/// signs with the new key, and the trail says why; on the embedded store
/// the command says which file to move away.
#[tokio::test]
async fn a_withdrawn_signing_key_is_refused_and_unpublished_at_once() {
    let db = scrip_testkit::PgDatabase::new();
    let (s, config, store) = beside_a_shared_server(&db).await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let old_task = token_of(
        &s.try_start_task(&identity, "github:read", "dev", "before", None)
            .await,
    );
    let old_kid = decode_parts(&old_task).0["kid"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(s.access_token(&old_task, "github", None).await.status, 200);
    assert_eq!(published_kids(&s).await, [old_kid.as_str()]);

    // As `scrip key withdraw` does it, from another process's store.
    let key = scrip_server::keyring::checkpoint_signer(&config, store.as_ref(), now(), "operator")
        .await
        .unwrap();
    store.sign_heads_with(std::sync::Arc::new(scrip_server::keyring::HeadKey(key)));
    let done = scrip_server::keyring::withdraw_signing_keys(
        &config,
        store.as_ref(),
        now(),
        "operator",
        "INC-7: key leaked",
    )
    .await
    .unwrap();
    assert_eq!(done.withdrawn, [old_kid.as_str()]);
    assert_ne!(done.signing, old_kid);

    // The server follows (told by PostgreSQL; at worst within 5 s).
    let started = Instant::now();
    while published_kids(&s).await != [done.signing.clone()] {
        assert!(
            started.elapsed() < Duration::from_secs(15),
            "{:?}",
            published_kids(&s).await
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let r = s.access_token(&old_task, "github", None).await;
    assert_eq!(r.status, 400, "a token of the withdrawn key: {}", r.text);
    let new_task = token_of(
        &s.try_start_task(&identity, "github:read", "dev", "after", None)
            .await,
    );
    assert_eq!(decode_parts(&new_task).0["kid"], done.signing.as_str());
    assert_eq!(s.access_token(&new_task, "github", None).await.status, 200);
    let audit = store
        .audit(&scrip_store::AuditFilter::default())
        .await
        .unwrap();
    let withdrawn = audit
        .iter()
        .find(|a| a.event == "key.withdrawn")
        .expect("no key.withdrawn record");
    assert_eq!(withdrawn.jti.as_deref(), Some(old_kid.as_str()));
    assert!(
        withdrawn
            .reason
            .as_deref()
            .unwrap()
            .contains("INC-7: key leaked")
    );
    s.stop().await;

    // The embedded store: nothing withdrawn; the file to move is named.
    let embedded = scrip_config::Config {
        data_dir: "elsewhere".into(),
        ..scrip_config::Config::default()
    };
    let e = scrip_server::keyring::withdraw_signing_keys(
        &embedded,
        store.as_ref(),
        now(),
        "operator",
        "x",
    )
    .await
    .unwrap_err();
    assert!(e.to_string().contains("keys/signing-es256.json"), "{e}");
}

/// A database of its own, a directory, and a replica's configuration on
/// them, with its key-encryption key made.
fn shared_keys_config() -> (
    scrip_testkit::PgDatabase,
    tempfile::TempDir,
    scrip_config::Config,
) {
    let db = scrip_testkit::PgDatabase::new();
    let dir = tempfile::tempdir().unwrap();
    let config = scrip_config::Config {
        data_dir: dir.path().join("a"),
        database_url: Some(db.url().to_owned()),
        key_encryption_key_file: Some(dir.path().join("kek")),
        ..scrip_config::Config::default()
    };
    scrip_server::keys::load_kek(&config, true).unwrap();
    (db, dir, config)
}

/// A shared key set a replica has not read for a minute is one it cannot
/// vouch for (a key may have been withdrawn since): it says so until the
/// next read. A file key set only this process changes never is.
#[tokio::test]
async fn a_shared_key_set_not_read_for_a_minute_is_stale() {
    use scrip_server::keyring::{Keyring, STALE_AFTER};
    let (db, dir, config) = shared_keys_config();
    let store = scrip_store::open(db.url().into(), &config.data_dir.join("scrip.db"))
        .await
        .unwrap();
    let (keyring, _) = Keyring::shared(&config, store.as_ref(), now(), "a")
        .await
        .unwrap();
    assert_eq!(keyring.stale_for(), None, "read just now");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let t = std::time::Instant::now();
    let later = t + STALE_AFTER - Duration::from_secs(1);
    assert!(
        keyring.stale_at(later).is_some(),
        "not read for over a minute then"
    );
    keyring.sync(store.as_ref(), now(), "a").await.unwrap();
    assert_eq!(keyring.stale_at(later), None, "the read was not counted");
    // Files: never stale.
    let files = scrip_config::Config {
        data_dir: dir.path().join("b"),
        ..scrip_config::Config::default()
    };
    std::fs::create_dir_all(&files.data_dir).unwrap();
    let (file_ring, _) = Keyring::from_files(&files, now()).unwrap();
    assert_eq!(file_ring.stale_at(later + STALE_AFTER), None);
}

/// A replica that reads a withdrawal puts the new key set in use, signs
/// with the new key, and counts a new generation of keys (what it verified
/// before is verified again), whatever its clock within `clock_skew`.
#[tokio::test]
async fn a_replica_follows_a_withdrawal_whatever_its_clock() {
    use scrip_server::keyring::Keyring;
    let (db, _dir, config) = shared_keys_config();
    let at = now();
    let store = scrip_store::open(db.url().into(), &config.data_dir.join("scrip.db"))
        .await
        .unwrap();
    let (keyring, _) = Keyring::shared(&config, store.as_ref(), at, "a")
        .await
        .unwrap();
    let old = keyring.signer(at).kid().to_owned();
    let before = keyring
        .generation()
        .load(std::sync::atomic::Ordering::SeqCst);
    // Re-reading the same keys counts nothing: what was verified stays.
    keyring.sync(store.as_ref(), at, "a").await.unwrap();
    assert_eq!(
        keyring
            .generation()
            .load(std::sync::atomic::Ordering::SeqCst),
        before
    );
    // Withdrawn from a host whose clock is 20 s ahead of this replica's.
    let done = scrip_server::keyring::withdraw_signing_keys(
        &config,
        store.as_ref(),
        at + 20,
        "operator",
        "INC-8",
    )
    .await
    .unwrap();
    assert_eq!(done.withdrawn, [old.as_str()]);
    keyring.sync(store.as_ref(), at, "a").await.unwrap();
    assert_eq!(keyring.signer(at).kid(), done.signing);
    assert!(
        keyring
            .generation()
            .load(std::sync::atomic::Ordering::SeqCst)
            > before
    );
    let published: Value = serde_json::from_str(&keyring.jwks_body()).unwrap();
    let kids: Vec<&str> = published["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| k["kid"].as_str().unwrap())
        .collect();
    assert_eq!(kids, [done.signing.as_str()]);
}

/// The first keys of a shared store are stored with their records, and
/// that commit signs its chain head with the checkpoint key it stores: a
/// replica stopped right after leaves nothing unsigned. So does a start
/// that rotates.
#[tokio::test]
async fn the_commit_of_shared_keys_is_signed() {
    use scrip_server::keyring::Keyring;
    let db = scrip_testkit::PgDatabase::new();
    let dir = tempfile::tempdir().unwrap();
    let config = scrip_config::Config {
        data_dir: dir.path().join("a"),
        database_url: Some(db.url().to_owned()),
        key_encryption_key_file: Some(dir.path().join("kek")),
        signing_key_rotation: 100,
        ..scrip_config::Config::default()
    };
    scrip_server::keys::load_kek(&config, true).unwrap();
    let at = now();
    for (start, at) in [(1, at), (2, at + 200)] {
        let store = scrip_store::open(db.url().into(), &config.data_dir.join("scrip.db"))
            .await
            .unwrap();
        let (_, made) = Keyring::shared(&config, store.as_ref(), at, "a")
            .await
            .unwrap();
        assert!(!made.keys.is_empty(), "start {start}: nothing made");
        // Stopped here: nothing more is committed.
        drop(store);
        let store = scrip_store::open(db.url().into(), &config.data_dir.join("scrip.db"))
            .await
            .unwrap();
        let jwks = scrip_server::keyring::shared_checkpoint_jwks(&config, store.as_ref(), at)
            .await
            .unwrap();
        let report = strictly_verified(store.as_ref(), &jwks).await;
        assert_eq!(report.chains, start, "start {start}: {report:?}");
    }
}

/// `store`'s trail verified as `scrip audit verify --strict` does it: no
/// problem, and every record covered by a checkpoint that one of `jwks`
/// signed.
async fn strictly_verified(store: &dyn scrip_store::Store, jwks: &[Value]) -> scrip_store::Report {
    let now_ms = now() * 1000 + 1000;
    let report = scrip_server::audit::verify(store, jwks, now_ms, 0)
        .await
        .unwrap();
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.unsigned, 0, "{report:?}");
    assert!(report.vouched.is_empty(), "{report:?}");
    assert!(report.lost.is_empty(), "{report:?}");
    assert!(report.checkpoints > 0, "{report:?}");
    report
}

/// Replicas that start at the same moment on an empty shared store agree
/// on one key set: the store takes one replica's first keys and refuses
/// the others'. One whose key-encryption key does not open that set (it
/// made its own, having none) refuses to start and says why, rather than
/// signing with keys the others cannot verify.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_starting_together_on_an_empty_store_share_one_key_set() {
    use scrip_server::keyring::Keyring;
    use scrip_store::KeyPurpose;
    for _ in 0..3 {
        let db = scrip_testkit::PgDatabase::new();
        let dir = tempfile::tempdir().unwrap();
        let config = |name: &str, kek: &str| scrip_config::Config {
            data_dir: dir.path().join(name),
            database_url: Some(db.url().to_owned()),
            key_encryption_key_file: Some(dir.path().join(kek)),
            ..scrip_config::Config::default()
        };
        // `a` and `b` are given one key-encryption key; `c` has none and
        // makes its own.
        let configs = [config("a", "kek"), config("b", "kek"), config("c", "kek-c")];
        scrip_server::keys::load_kek(&configs[0], true).unwrap();
        let mut stores = Vec::new();
        for c in &configs {
            stores.push(
                scrip_store::open(c.database_url.as_deref(), &c.data_dir.join("scrip.db"))
                    .await
                    .unwrap(),
            );
        }
        let at = now();
        let (a, b, c) = tokio::join!(
            Keyring::shared(&configs[0], stores[0].as_ref(), at, "a"),
            Keyring::shared(&configs[1], stores[1].as_ref(), at, "b"),
            Keyring::shared(&configs[2], stores[2].as_ref(), at, "c"),
        );
        let kept = stores[0].keys(at).await.unwrap();
        for purpose in [KeyPurpose::Signing, KeyPurpose::Checkpoint] {
            assert_eq!(
                kept.iter().filter(|k| k.purpose == purpose).count(),
                1,
                "{purpose:?} keys: {kept:?}"
            );
        }
        let published = serde_json::json!({ "keys": kept.iter().filter(|k| k.purpose == KeyPurpose::Signing).map(|k| serde_json::from_str::<Value>(&k.public_jwk).unwrap()).collect::<Vec<_>>() });
        let started = [a.is_ok(), b.is_ok(), c.is_ok()];
        // Whichever key-encryption key won, exactly the replicas holding it
        // start.
        assert!(
            started == [true, true, false] || started == [false, false, true],
            "{started:?}"
        );
        for (name, outcome) in [("a", a), ("b", b), ("c", c)] {
            match outcome {
                Ok((ring, _)) => {
                    let served: Value = serde_json::from_str(&ring.jwks_body()).unwrap();
                    assert_eq!(served, published, "{name} publishes the store's key");
                }
                Err(e) => {
                    // `c` says the keys do not open with the key it made;
                    // or, when it looked only once they were stored, that
                    // it lacks the key they were sealed under.
                    let message = e.to_string();
                    assert!(
                        message.contains("sealed under another key-encryption key")
                            || message.contains("opens nothing this store holds sealed")
                            || (name == "c"
                                && message.contains("missing: this store's secrets are sealed")),
                        "{name}: {message}"
                    );
                }
            }
        }
    }
}

/// The store a replica with configuration `c` opens.
async fn store_of(c: &scrip_config::Config) -> std::sync::Arc<dyn scrip_store::Store> {
    scrip_store::open(c.database_url.as_deref(), &c.data_dir.join("scrip.db"))
        .await
        .unwrap()
}

/// A replica restarted with another `signing_algorithm` rotates the shared
/// key set to it; the replicas still running the old setting sign with the
/// new key once it is active, and must accept what it signs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_accepts_keys_of_another_algorithm_in_the_shared_set() {
    use scrip_server::keyring::Keyring;
    let db = scrip_testkit::PgDatabase::new();
    let dir = tempfile::tempdir().unwrap();
    let config = |name: &str, alg: scrip_jose::SigningAlgorithm| scrip_config::Config {
        data_dir: dir.path().join(name),
        database_url: Some(db.url().to_owned()),
        key_encryption_key_file: Some(dir.path().join("kek")),
        signing_algorithm: alg,
        signing_key_rotation: 10,
        signing_key_lead: 1,
        ..scrip_config::Config::default()
    };
    let ca = config("a", scrip_jose::SigningAlgorithm::ES256);
    let cb = config("b", scrip_jose::SigningAlgorithm::EdDSA);
    let (sa, sb) = (store_of(&ca).await, store_of(&cb).await);
    let at = now();
    let (a, _) = Keyring::shared(&ca, sa.as_ref(), at, "a").await.unwrap();
    assert_eq!(
        a.signer(at).algorithm(),
        scrip_jose::SigningAlgorithm::ES256
    );
    let (b, _) = Keyring::shared(&cb, sb.as_ref(), at, "b").await.unwrap();
    // B's rotation adds its successor in its own algorithm; A reads it.
    b.sync(sb.as_ref(), at + 10, "b").await.unwrap();
    a.sync(sa.as_ref(), at + 12, "a").await.unwrap();
    let signer = a.signer(at + 12);
    assert_eq!(signer.algorithm(), scrip_jose::SigningAlgorithm::EdDSA);
    for keyring in [&a, &b] {
        assert!(
            keyring.algorithms().contains(&signer.algorithm().to_jwt()),
            "{:?} lacks the algorithm of a key it signs with",
            keyring.algorithms()
        );
    }
}

/// Replicas whose rotation falls due together add one key between them,
/// and each then publishes it; the one that lost the race reports nothing
/// created (nothing for it to audit).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replicas_rotating_together_add_one_key() {
    use scrip_server::keyring::Keyring;
    use scrip_store::KeyPurpose;
    let db = scrip_testkit::PgDatabase::new();
    let dir = tempfile::tempdir().unwrap();
    let config = |name: &str| scrip_config::Config {
        data_dir: dir.path().join(name),
        database_url: Some(db.url().to_owned()),
        key_encryption_key_file: Some(dir.path().join("kek")),
        signing_key_rotation: 10,
        signing_key_lead: 1,
        ..scrip_config::Config::default()
    };
    let (ca, cb) = (config("a"), config("b"));
    let (sa, sb) = (store_of(&ca).await, store_of(&cb).await);
    let at = now();
    let (a, _) = Keyring::shared(&ca, sa.as_ref(), at, "a").await.unwrap();
    let (b, _) = Keyring::shared(&cb, sb.as_ref(), at, "b").await.unwrap();
    // The first key signs from `at`; each successor from 2 s (the lead,
    // plus one) after it was made.
    let mut due = at + 10;
    for round in 1..=3 {
        let (made_a, made_b) =
            tokio::join!(a.sync(sa.as_ref(), due, "a"), b.sync(sb.as_ref(), due, "b"));
        let (made_a, made_b) = (made_a.unwrap(), made_b.unwrap());
        let signing = sa
            .keys(due)
            .await
            .unwrap()
            .into_iter()
            .filter(|k| k.purpose == KeyPurpose::Signing && k.retired_at.is_none())
            .count();
        assert_eq!(
            signing, 2,
            "round {round}: the current key and one successor"
        );
        let created = |c: &scrip_server::keyring::Created| {
            c.keys
                .iter()
                .filter(|(_, what)| what.contains("created"))
                .count()
        };
        assert_eq!(created(&made_a) + created(&made_b), 1, "round {round}");
        assert_eq!(a.jwks_body(), b.jwks_body(), "round {round}");
        // The successor signs from its `active_at`, and the next rotation
        // retires the key it replaced.
        let (_, _) = tokio::join!(
            a.sync(sa.as_ref(), due + 2, "a"),
            b.sync(sb.as_ref(), due + 2, "b")
        );
        due += 12;
    }
    // Each key on the record once, by the replica that made it, in the
    // commit that stored it.
    let keys = sa.keys(0).await.unwrap();
    let made = key_records(sa.as_ref(), "key.created").await;
    assert_eq!(made.len(), keys.len(), "{made:?}");
    let retired = key_records(sa.as_ref(), "key.retired").await;
    for k in &keys {
        assert_eq!(
            made.iter().filter(|r| r.contains(&k.kid)).count(),
            1,
            "{}: {made:?}",
            k.kid
        );
        // Both replicas retire the key a successor replaces, at the same
        // moment: it is on the record once.
        let times = retired.iter().filter(|r| r.contains(&k.kid)).count();
        assert_eq!(
            times,
            usize::from(k.retired_at.is_some()),
            "{}: {retired:?}",
            k.kid
        );
    }
    assert!(!retired.is_empty(), "no key was retired");
}

/// An embedded store put back without its checkpoint key is refused rather
/// than signed on with a new key, which would have every earlier chain
/// read as tampered with; put back with it, it starts.
#[tokio::test]
async fn a_store_without_its_checkpoint_key_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let config = scrip_config::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("data"),
        policy_dir: policies,
        ..scrip_config::Config::default()
    };
    drop(scrip_server::Server::bind(config.clone()).await.unwrap());
    let key = scrip_server::keys::checkpoint_key_file(&config.data_dir);
    let kept = dir.path().join("kept.json");
    std::fs::rename(&key, &kept).unwrap();
    let refused_making_none = |refused: String| {
        assert!(
            refused.contains("put back `keys/audit-checkpoint.json`"),
            "{refused}"
        );
        assert!(!key.exists(), "a new checkpoint key was made");
    };
    let refused = scrip_server::Server::bind(config.clone()).await.err();
    refused_making_none(refused.unwrap().to_string());
    // The commands that sign their records refuse as well.
    let store = scrip_store::open(None, &config.data_dir.join("scrip.db"))
        .await
        .unwrap();
    let refused =
        scrip_server::keyring::checkpoint_signer(&config, store.as_ref(), now(), "test").await;
    refused_making_none(refused.err().unwrap().to_string());
    drop(store);
    // Another store's key in its place (the store put back beside newer
    // keys): refused as much, the key file left as it is.
    let other = scrip_config::Config {
        data_dir: dir.path().join("other"),
        ..config.clone()
    };
    drop(scrip_server::Server::bind(other.clone()).await.unwrap());
    let others = scrip_server::keys::checkpoint_key_file(&other.data_dir);
    std::fs::copy(&others, &key).unwrap();
    let before = std::fs::read(&key).unwrap();
    let store = scrip_store::open(None, &config.data_dir.join("scrip.db"))
        .await
        .unwrap();
    let records = store.latest_audit_seq().await.unwrap();
    let another = |refused: String| {
        assert!(
            refused
                .contains("signed none of the chain heads of the store beside it (1 signatures)")
                && refused.contains("put back `keys/audit-checkpoint.json`"),
            "{refused}"
        );
    };
    another(
        scrip_server::Server::bind(config.clone())
            .await
            .err()
            .unwrap()
            .to_string(),
    );
    let refused =
        scrip_server::keyring::checkpoint_signer(&config, store.as_ref(), now(), "test").await;
    another(refused.err().unwrap().to_string());
    // Nothing written, the key file as it was.
    assert_eq!(store.latest_audit_seq().await.unwrap(), records);
    drop(store);
    assert_eq!(std::fs::read(&key).unwrap(), before);
    std::fs::rename(&kept, &key).unwrap();
    drop(scrip_server::Server::bind(config).await.unwrap());
}

/// A start refused for its metrics address (taken) makes no signing keys:
/// the proxy's key-encryption key and metrics listener come before them.
#[tokio::test]
async fn a_start_refused_for_its_metrics_address_makes_no_signing_keys() {
    let dir = tempfile::tempdir().unwrap();
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let tool = scrip_token::ToolName::parse("github").unwrap();
    let read = scrip_token::ActionName::parse("read").unwrap();
    let mut config = scrip_config::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("data"),
        policy_dir: repo_policies(),
        tools: tools(),
        metrics_listen: Some(taken.local_addr().unwrap()),
        ..scrip_config::Config::default()
    };
    config.upstreams.push(scrip_config::Upstream {
        name: tool,
        url: "http://127.0.0.1:9".into(),
        inject: scrip_config::Inject::default(),
        routes: vec![scrip_config::Route {
            method: "GET".into(),
            path: "/*".into(),
            action: read.clone(),
        }],
        secrets: [(
            read,
            scrip_config::SecretSpec {
                max_age: 3600,
                grace: 3600,
                mint_command: Vec::new(),
            },
        )]
        .into_iter()
        .collect(),
        connect_timeout: 1,
        read_timeout: 5,
    });
    let refused = scrip_server::Server::bind(config.clone()).await.err();
    assert!(
        matches!(refused, Some(scrip_server::StartError::Bind { addr, .. }) if Some(addr) == config.metrics_listen),
        "{refused:?}"
    );
    let keys = config.data_dir.join("keys");
    let made: Vec<String> = std::fs::read_dir(&keys)
        .map(|d| {
            d.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .filter(|name| name != "key-encryption.key")
                .collect()
        })
        .unwrap_or_default();
    assert!(made.is_empty(), "a refused start made keys: {made:?}");
    drop(taken);
    drop(scrip_server::Server::bind(config.clone()).await.unwrap());
    let made = std::fs::read_dir(&keys).unwrap().count();
    assert!(made > 1, "the start that did made no keys");
}

/// A start refused for its configuration (a policy that does not parse)
/// makes no keys: a key made by a start that then failed would stay, and
/// the next start, finding it made, would not record it. The start that
/// makes them records them, signed in their own commit.
#[tokio::test]
async fn a_refused_start_makes_no_keys_and_the_start_that_does_records_them() {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    std::fs::write(policies.join("broken.cedar"), "permit (").unwrap();
    let config = scrip_config::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("data"),
        policy_dir: policies.clone(),
        ..scrip_config::Config::default()
    };
    assert!(scrip_server::Server::bind(config.clone()).await.is_err());
    let keys = config.data_dir.join("keys");
    let made = std::fs::read_dir(&keys).map_or(0, |d| d.count());
    assert_eq!(made, 0, "a refused start made keys in {}", keys.display());
    // Nor did it open the store, which would have migrated it: the version
    // it was to replace can still start.
    let db = config.data_dir.join("scrip.db");
    assert!(!db.exists(), "a refused start opened {}", db.display());
    std::fs::remove_file(policies.join("broken.cedar")).unwrap();
    drop(scrip_server::Server::bind(config.clone()).await.unwrap());
    let store = scrip_store::open(None, &config.data_dir.join("scrip.db"))
        .await
        .unwrap();
    let made = key_records(store.as_ref(), "key.created").await;
    assert_eq!(made.len(), 2, "the signing and checkpoint keys: {made:?}");
    assert!(
        made.iter().any(|r| r.contains("signing key created")),
        "{made:?}"
    );
    assert!(
        made.iter()
            .any(|r| r.contains("audit checkpoint key created")),
        "{made:?}"
    );
    // Signed: every record is covered by a checkpoint of its own chain.
    let key = scrip_server::keys::read_checkpoint_key(&config.data_dir).unwrap();
    let report = strictly_verified(store.as_ref(), &[key.public_jwk()]).await;
    assert_eq!(report.chains, 1);
}

/// The `event` audit records of `store`, as the JSON hashed.
async fn key_records(store: &dyn scrip_store::Store, event: &str) -> Vec<String> {
    let rows = store.audit_rows(0, u32::MAX).await.unwrap();
    rows.into_iter()
        .filter(|r| r.columns.event == event)
        .map(|r| r.record)
        .collect()
}

/// Key files whose record cannot be committed (the store busy or full at
/// that moment, or a crash) stay, saying so, and the next start records
/// them: no key signs off the record, and none that a commit which seemed
/// to fail may have signed is removed. Once recorded, a key is not
/// recorded again.
#[tokio::test]
async fn keys_whose_record_cannot_be_committed_are_recorded_by_the_next_start() {
    let dir = tempfile::tempdir().unwrap();
    let config = scrip_config::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("data"),
        policy_dir: repo_policies(),
        ..scrip_config::Config::default()
    };
    let db = config.data_dir.join("scrip.db");
    std::fs::create_dir_all(&config.data_dir).unwrap();
    std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    drop(scrip_store::open(None, &db).await.unwrap()); // made and migrated
    // Another writer holds the store past the 5 s a commit waits.
    let mut holder = hold_store(&db).await;
    let err = scrip_server::Server::bind(config.clone())
        .await
        .unwrap_err()
        .to_string();
    // Refused by the commit of the keys' record, after they were made.
    assert!(err.contains("store unavailable"), "{err}");
    let keys = config.data_dir.join("keys");
    let kid = |name: &str| {
        let file: serde_json::Value =
            serde_json::from_slice(&std::fs::read(keys.join(name)).unwrap()).unwrap();
        assert_eq!(file["recorded"], false, "{name}: {file}");
        file["kid"].as_str().unwrap().to_owned()
    };
    let kids = [kid("signing-es256.json"), kid("audit-checkpoint.json")];
    sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
    drop(holder);
    drop(scrip_server::Server::bind(config.clone()).await.unwrap());
    let store = scrip_store::open(None, &db).await.unwrap();
    let made = key_records(store.as_ref(), "key.created").await;
    assert_eq!(made.len(), 2, "{made:?}");
    for kid in &kids {
        let record = made.iter().find(|r| r.contains(kid.as_str()));
        assert!(
            record.is_some_and(|r| r.contains("created by an earlier start")),
            "{kid}: {made:?}"
        );
    }
    // Marked recorded (in the form older files have): not recorded again.
    for name in ["signing-es256.json", "audit-checkpoint.json"] {
        let file = std::fs::read_to_string(keys.join(name)).unwrap();
        assert!(!file.contains("recorded"), "{name}: still unrecorded");
        let mode = std::fs::metadata(keys.join(name))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{name}");
    }
    drop(store);
    drop(scrip_server::Server::bind(config.clone()).await.unwrap());
    let store = scrip_store::open(None, &db).await.unwrap();
    let made = key_records(store.as_ref(), "key.created").await;
    assert_eq!(made.len(), 2, "{made:?}");
}

/// The key-encryption key of a shared store is replaced without a stop: a
/// replica given the new key and the old one (as the previous) opens what
/// the old one sealed, `scrip key reseal` seals it all again under the new
/// key (the same signing key, so no task is lost), and then a replica with
/// the new key alone starts and accepts the tasks signed before; the old
/// key alone opens nothing any more. The trail records it, signed.
#[tokio::test]
async fn the_key_encryption_key_is_replaced_while_replicas_serve() {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let db = scrip_testkit::PgDatabase::new();
    // Replicas: one issuer, wherever each listens.
    let start = |edit: Box<dyn FnOnce(&mut scrip_config::Config) + Send>| {
        let url = db.url().to_owned();
        TestServer::start_with(Options {
            edit: Some(Box::new(move |c: &mut scrip_config::Config| {
                c.database_url = Some(url);
                c.issuer = Some("https://scrip.test".into());
                edit(c);
            })),
            ..Options::default()
        })
    };
    let old = start(Box::new(|_| {})).await;
    let old_config = scrip_config::Config {
        data_dir: old.dir.path().join("data"),
        database_url: Some(db.url().to_owned()),
        ..scrip_config::Config::default()
    };
    let store = scrip_store::open(Some(db.url()), &old_config.data_dir.join("scrip.db"))
        .await
        .unwrap();
    let identity = old.k8s.kubernetes("agents", "coder");
    let task = token_of(
        &old.try_start_task(&identity, "github:read", "dev", "before", None)
            .await,
    );
    let kid = decode_parts(&task).0["kid"].as_str().unwrap().to_owned();

    let keys = tempfile::tempdir().unwrap();
    let private = |name: &str, text: &[u8]| {
        let path = keys.path().join(name);
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&path)
            .unwrap()
            .write_all(text)
            .unwrap();
        path
    };
    let (_, new_text) = scrip_jose::Kek::generate().unwrap();
    let new_file = private("new.key", new_text.as_bytes());
    // A copy of the old key, which outlives the first server's directory.
    let old_file = private(
        "old.key",
        &std::fs::read(old_config.key_encryption_key_path()).unwrap(),
    );
    let old_alone = scrip_config::Config {
        key_encryption_key_file: Some(old_file.clone()),
        ..old_config.clone()
    };
    let with = |previous: Option<std::path::PathBuf>| {
        let new_file = new_file.clone();
        move |c: &mut scrip_config::Config| {
            c.key_encryption_key_file = Some(new_file.clone());
            c.previous_key_encryption_key_file = previous.clone();
        }
    };
    // Without the old key the new one opens nothing, and is refused.
    let mut alone = old_config.clone();
    with(None)(&mut alone);
    let e = scrip_server::keys::store_kek(&alone, store.as_ref())
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("opens nothing this store holds sealed"),
        "{e}"
    );

    scrip_server::keys::store_kek(&old_alone, store.as_ref())
        .await
        .expect("the old key opens what it sealed");
    // A replica with both serves the tasks signed before.
    let both = start(Box::new(with(Some(old_file.clone())))).await;
    assert_eq!(both.access_token(&task, "github", None).await.status, 200);

    // `scrip key reseal`, from another process's store.
    let mut both_config = old_config.clone();
    with(Some(old_file.clone()))(&mut both_config);
    let key =
        scrip_server::keyring::checkpoint_signer(&both_config, store.as_ref(), now(), "operator")
            .await
            .unwrap();
    store.sign_heads_with(std::sync::Arc::new(scrip_server::keyring::HeadKey(key)));
    let done = scrip_server::keyring::reseal(&both_config, store.as_ref(), "operator", "INC-9")
        .await
        .unwrap();
    assert_eq!(
        done.keys.len(),
        2,
        "the signing and checkpoint keys: {done:?}"
    );
    assert!(done.keys.contains(&kid), "{done:?}");
    assert!(done.secrets.is_empty(), "{done:?}");
    assert_eq!(done.current, 2);
    let fingerprint = scrip_jose::Kek::from_text(&new_text).unwrap();
    assert_eq!(done.key, fingerprint.fingerprint());
    let again = scrip_server::keyring::reseal(&both_config, store.as_ref(), "operator", "INC-9")
        .await
        .unwrap();
    assert!(again.keys.is_empty() && again.current == 2, "{again:?}");
    // The replica with both keys serves on, past its next read of the key
    // set; a host given some other new key is refused, before it seals
    // anything the replicas could not open.
    tokio::time::sleep(scrip_server::keyring::POLL + Duration::from_millis(500)).await;
    assert_eq!(both.access_token(&task, "github", None).await.status, 200);
    let (_, third_text) = scrip_jose::Kek::generate().unwrap();
    let third = scrip_config::Config {
        key_encryption_key_file: Some(private("third.key", third_text.as_bytes())),
        previous_key_encryption_key_file: Some(old_file.clone()),
        ..old_config.clone()
    };
    let e = scrip_server::keyring::reseal(&third, store.as_ref(), "operator", "INC-9")
        .await
        .unwrap_err()
        .to_string();
    assert!(e.contains("2 stored values open under neither"), "{e}");
    old.stop().await;
    both.stop().await;

    // The new key alone now: a replica starts, accepts the task, and signs
    // with the same key; the old key alone opens nothing.
    let new = start(Box::new(with(None))).await;
    assert_eq!(new.access_token(&task, "github", None).await.status, 200);
    // (Each test server trusts an identity provider of its own.)
    let identity = new.k8s.kubernetes("agents", "coder");
    let after = token_of(
        &new.try_start_task(&identity, "github:read", "dev", "after", None)
            .await,
    );
    assert_eq!(decode_parts(&after).0["kid"], kid.as_str());
    let e = scrip_server::keys::store_kek(&old_alone, store.as_ref())
        .await
        .unwrap_err();
    assert!(
        e.to_string()
            .contains("opens nothing this store holds sealed"),
        "{e}"
    );
    new.stop().await;

    let audit = store
        .audit(&scrip_store::AuditFilter::default())
        .await
        .unwrap();
    let resealed: Vec<_> = audit.iter().filter(|a| a.event == "kek.resealed").collect();
    assert_eq!(resealed.len(), 1, "one record; nothing the second time");
    assert!(
        resealed[0]
            .reason
            .as_deref()
            .unwrap()
            .starts_with("2 keys and 0 secret versions sealed again")
    );
    let trusted = scrip_server::keyring::shared_checkpoint_jwks(&alone, store.as_ref(), now())
        .await
        .unwrap();
    strictly_verified(store.as_ref(), &trusted).await;
}

/// On the embedded store, changing `signing_algorithm` does not cut off
/// what the old key signed: a restart signs with a new key of the new
/// algorithm, and still publishes and accepts the old one (retired,
/// recorded once) while its tokens can live.
#[tokio::test]
async fn changing_the_embedded_algorithm_keeps_the_old_keys_tokens_valid() {
    let keep = tempfile::tempdir().unwrap();
    let data_dir = keep.path().join("data");
    let start = |algorithm: SigningAlgorithm| {
        let data_dir = data_dir.clone();
        TestServer::start_with(Options {
            algorithm,
            edit: Some(Box::new(move |c: &mut scrip_config::Config| {
                c.data_dir = data_dir;
                // The same issuer across restarts, wherever each listens.
                c.issuer = Some("https://scrip.test".into());
            })),
            ..Options::default()
        })
    };
    let s = start(SigningAlgorithm::ES256).await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let task = token_of(
        &s.try_start_task(&identity, "github:read", "dev", "before", None)
            .await,
    );
    let old_kid = decode_parts(&task).0["kid"].as_str().unwrap().to_owned();
    s.stop().await;

    for restart in 0..2 {
        let s = start(SigningAlgorithm::EdDSA).await;
        assert_eq!(
            s.access_token(&task, "github", None).await.status,
            200,
            "restart {restart}: the old key's task"
        );
        let identity = s.k8s.kubernetes("agents", "coder");
        let new_task = token_of(
            &s.try_start_task(&identity, "github:read", "dev", "after", None)
                .await,
        );
        let (header, _) = decode_parts(&new_task);
        assert_eq!(header["alg"], "EdDSA");
        let new_kid = header["kid"].as_str().unwrap().to_owned();
        let mut both = vec![old_kid.clone(), new_kid];
        both.sort();
        assert_eq!(published_kids(&s).await, both, "restart {restart}");
        s.stop().await;
    }
    let store = scrip_store::SqliteStore::open(&data_dir.join("scrip.db"))
        .await
        .unwrap();
    use scrip_store::Store as _;
    let retired: Vec<_> = store
        .audit(&scrip_store::AuditFilter::default())
        .await
        .unwrap()
        .into_iter()
        .filter(|a| a.event == "key.retired")
        .collect();
    assert_eq!(retired.len(), 1, "recorded once: {retired:?}");
    assert_eq!(retired[0].jti.as_deref(), Some(old_kid.as_str()));
    assert!(
        retired[0]
            .reason
            .as_deref()
            .unwrap()
            .contains("signing_algorithm is now EdDSA"),
        "{retired:?}"
    );
}

/// A backlog of tasks past their deadline, more than the sweep once ended
/// in a second, is ended in one pass: each of them at the pass's time, as
/// `expired`, with its record.
#[tokio::test]
async fn a_backlog_of_due_tasks_ends_in_one_pass() {
    let s = TestServer::start().await;
    let store = scrip_store::open(None, &s.dir.path().join("data/scrip.db"))
        .await
        .unwrap();
    let due = now() - 10;
    let ids: Vec<String> = (0..1_500).map(|i| format!("backlog-{i:04}")).collect();
    let writes = ids
        .iter()
        .map(|id| {
            scrip_store::Write::InsertTask(Box::new(scrip_store::TaskRecord {
                id: id.clone(),
                parent: None,
                agent: scrip_token::WorkloadIdentity {
                    issuer: K8S_ISSUER.into(),
                    subject: "system:serviceaccount:agents:backlog".into(),
                    kind: scrip_token::IdentityKind::Kubernetes,
                    attributes: std::collections::BTreeMap::new(),
                    claims: std::collections::BTreeMap::new(),
                },
                actor: None,
                may_act: Vec::new(),
                grants: "github:read".into(),
                held: String::new(),
                purpose: "backlog".into(),
                environment: "dev".into(),
                depth: 0,
                token_jti: format!("jti-{id}"),
                created_at: due - 60,
                expires_at: due,
                ended_at: None,
                end_reason: None,
            }))
        })
        .collect();
    store.commit(writes).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let ended = loop {
        let mut ended = Vec::new();
        for id in &ids {
            let task = store.task(id).await.unwrap().unwrap();
            if let Some(at) = task.ended_at {
                assert_eq!(task.end_reason.as_deref(), Some("expired"), "{id}");
                ended.push(at);
            }
        }
        if ended.len() == ids.len() {
            break ended;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} ended",
            ended.len(),
            ids.len()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let passes: std::collections::BTreeSet<u64> = ended.into_iter().collect();
    assert_eq!(passes.len(), 1, "ended at {passes:?}");
    let audit = s.stop_then_audit().await;
    let recorded = audit
        .iter()
        .filter(|a| {
            a.event == "task.expired"
                && a.task_id
                    .as_deref()
                    .is_some_and(|t| t.starts_with("backlog-"))
        })
        .count();
    assert_eq!(recorded, ids.len());
}
