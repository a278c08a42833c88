//! The verifier and its tower layer against a real scrip: tokens scrip
//! issues are accepted with their claims, everything else is refused with the
//! RFC 6750 answer, and a task ended at scrip is refused through the real
//! revocation feed.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use axum::routing::get;
use common::{Scrip, eventually};
use scrip_jose::JoseError;
use scrip_token::ActionName;
use scrip_verifier::{
    AccessToken, StaticIdentity, Verifier, VerifierConfig, VerifierLayer, VerifyError,
};
use tower::ServiceExt as _;

async fn verifier(scrip: &Scrip, tool: &str) -> Verifier {
    let identity = scrip
        .k8s
        .kubernetes("resource-servers", &format!("{tool}-api"));
    let mut config = VerifierConfig::new(&scrip.url, tool, Arc::new(StaticIdentity::new(identity)));
    if let scrip_verifier::Revocation::Follow(feed) = &mut config.revocation {
        feed.wait = std::time::Duration::from_secs(2);
    }
    Verifier::discover(config).await.unwrap()
}

#[tokio::test]
async fn accepts_scrip_access_tokens_with_their_claims() {
    let scrip = Scrip::start().await;
    let v = verifier(&scrip, "github").await;
    let (task, access) = scrip.github_token("read write").await;
    let t = v.verify(&access).await.unwrap();
    assert_eq!(t.claims().aud, "github");
    assert_eq!(t.claims().iss, scrip.url);
    assert_eq!(t.claims().sub, "system:serviceaccount:agents:coder");
    assert_eq!(t.claims().agent_iss.as_deref(), Some(common::K8S_ISSUER));
    assert_eq!(t.actions().to_string(), "read write");
    assert!(t.allows(&ActionName::parse("write").unwrap()));
    assert_eq!(
        v.verify_for(&access, &ActionName::parse("delete").unwrap())
            .await
            .unwrap_err(),
        VerifyError::InsufficientScope {
            required: "delete".into()
        }
    );
    // The task token is not an access token.
    assert!(matches!(
        v.verify(&task).await.unwrap_err(),
        VerifyError::Token(JoseError::WrongType { .. })
    ));
    // A token for another tool.
    let jira = verifier(&scrip, "jira").await;
    assert_eq!(
        jira.verify(&access).await.unwrap_err(),
        VerifyError::Token(JoseError::WrongAudience)
    );
    scrip.stop().await;
}

#[tokio::test]
async fn ending_a_task_at_scrip_reaches_the_verifier_through_the_feed() {
    let scrip = Scrip::start().await;
    let v = verifier(&scrip, "github").await;
    let (task, access) = scrip.github_token("read").await;
    let (_, other) = scrip.github_token("read").await;
    assert!(v.verify(&access).await.is_ok());
    scrip.revoke(&task).await;
    assert!(
        eventually(10, || async { v.verify(&access).await.is_err() }).await,
        "a token of an ended task stayed accepted"
    );
    assert_eq!(v.verify(&access).await.unwrap_err(), VerifyError::Revoked);
    assert!(
        v.verify(&other).await.is_ok(),
        "another task's token is refused"
    );

    // Revoking one access token refuses it alone.
    let (task2, a) = scrip.github_token("read").await;
    let b = scrip.access_token(&task2, "github", Some("read")).await;
    scrip.revoke(&a).await;
    assert!(eventually(10, || async { v.verify(&a).await.is_err() }).await);
    assert!(v.verify(&b).await.is_ok());

    // A verifier started after the revocation knows it at once.
    let late = verifier(&scrip, "github").await;
    assert_eq!(
        late.verify(&access).await.unwrap_err(),
        VerifyError::Revoked
    );
    scrip.stop().await;
}

#[tokio::test]
async fn the_feed_refuses_a_verifier_without_a_workload_identity() {
    let scrip = Scrip::start().await;
    let config = VerifierConfig::new(
        &scrip.url,
        "github",
        Arc::new(StaticIdentity::new("not-a-jwt")),
    );
    let err = Verifier::discover(config).await.unwrap_err();
    assert!(err.to_string().contains("401"), "{err}");
    scrip.stop().await;
}

fn app(v: Verifier) -> axum::Router {
    let whoami = |axum::Extension(t): axum::Extension<AccessToken>| async move {
        format!("{} {}", t.claims().sub, t.actions())
    };
    axum::Router::new()
        .route("/read", get(whoami))
        .layer(VerifierLayer::new(v.clone()))
        .merge(
            axum::Router::new()
                .route("/write", get(whoami))
                .layer(VerifierLayer::requiring(
                    v,
                    ActionName::parse("write").unwrap(),
                )),
        )
}

async fn call(
    app: &axum::Router,
    path: &str,
    auth: Option<&str>,
) -> (StatusCode, Option<String>, String) {
    call_with(app, path, auth, None).await
}

async fn call_with(
    app: &axum::Router,
    path: &str,
    auth: Option<&str>,
    proof: Option<&str>,
) -> (StatusCode, Option<String>, String) {
    let mut req = Request::get(path);
    if let Some(a) = auth {
        req = req.header(header::AUTHORIZATION, a);
    }
    if let Some(p) = proof {
        req = req.header("DPoP", p);
    }
    let res = app
        .clone()
        .oneshot(req.body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = res.status();
    let challenge = res
        .headers()
        .get(header::WWW_AUTHENTICATE)
        .map(|v| v.to_str().unwrap().to_owned());
    let body = axum::body::to_bytes(res.into_body(), 1 << 16)
        .await
        .unwrap();
    (
        status,
        challenge,
        String::from_utf8_lossy(&body).into_owned(),
    )
}

#[tokio::test]
async fn the_layer_answers_rfc6750() {
    let scrip = Scrip::start().await;
    let v = verifier(&scrip, "github").await;
    let app = app(v);
    let (task, access) = scrip.github_token("read").await;
    let bearer = format!("Bearer {access}");

    let (status, challenge, body) = call(&app, "/read", Some(&bearer)).await;
    assert_eq!(
        (status, challenge, body.as_str()),
        (
            StatusCode::OK,
            None,
            "system:serviceaccount:agents:coder read"
        )
    );

    let (status, challenge, _) = call(&app, "/read", None).await;
    assert_eq!(
        (status, challenge.as_deref()),
        (StatusCode::UNAUTHORIZED, Some(r#"Bearer realm="github""#))
    );

    let (status, challenge, _) = call(&app, "/read", Some("Basic dXNlcjpwYXNz")).await;
    assert_eq!(
        (status, challenge.as_deref()),
        (StatusCode::UNAUTHORIZED, Some(r#"Bearer realm="github""#))
    );

    let (status, challenge, _) = call(&app, "/read", Some("Bearer a b")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(challenge.unwrap().contains(r#"error="invalid_request""#));

    let (status, challenge, _) = call(&app, "/read", Some(&format!("Bearer {task}"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(challenge.unwrap().starts_with(r#"Bearer realm="github", error="invalid_token", error_description="token type `txntoken+jwt` is not accepted"#));

    let (status, challenge, _) = call(&app, "/write", Some(&bearer)).await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let challenge = challenge.unwrap();
    assert!(
        challenge.contains(r#"error="insufficient_scope""#)
            && challenge.ends_with(r#"scope="write""#),
        "{challenge}"
    );

    scrip.revoke(&task).await;
    assert!(
        eventually(10, || async {
            call(&app, "/read", Some(&bearer)).await.0 == StatusCode::UNAUTHORIZED
        })
        .await
    );
    let (_, challenge, _) = call(&app, "/read", Some(&bearer)).await;
    assert!(challenge.unwrap().contains("token has been revoked"));
    scrip.stop().await;
}

#[tokio::test]
async fn dpop_bound_tokens_need_a_proof_and_a_public_url() {
    use scrip_testkit::dpop::DpopKey;
    let scrip = Scrip::start().await;
    let key = DpopKey::new();
    let bound = scrip.github_dpop_token("read", &key).await;
    let identity = scrip.k8s.kubernetes("resource-servers", "github-api");
    let mut config = VerifierConfig::new(
        &scrip.url,
        "github",
        Arc::new(StaticIdentity::new(identity)),
    );
    config.public_url = Some("https://rs.example/api".into());
    if let scrip_verifier::Revocation::Follow(feed) = &mut config.revocation {
        feed.wait = std::time::Duration::from_secs(2);
    }
    let v = Verifier::discover(config).await.unwrap();

    // `verify` is for bearer tokens: a bound one needs its proof.
    assert_eq!(
        v.verify(&bound).await.unwrap_err(),
        VerifyError::ProofRequired
    );
    let url = "https://rs.example/api/read";
    let token = v
        .verify_dpop(
            &bound,
            &key.proof("GET", url, Some(&bound)),
            "GET",
            url,
            None,
        )
        .await
        .unwrap();
    assert_eq!(token.claims().cnf.as_ref().unwrap().jkt, key.jkt());

    // The layer: the proof names the public URL and the request's path.
    let routes = app(v.clone());
    let auth = format!("DPoP {bound}");
    let (status, challenge, body) = call_with(
        &routes,
        "/read",
        Some(&auth),
        Some(&key.proof("GET", url, Some(&bound))),
    )
    .await;
    assert_eq!((status, challenge), (StatusCode::OK, None), "{body}");
    let (status, challenge, _) = call_with(
        &routes,
        "/write",
        Some(&auth),
        Some(&key.proof("GET", "https://rs.example/api/write", Some(&bound))),
    )
    .await;
    assert_eq!(status, StatusCode::FORBIDDEN);
    let c = challenge.unwrap();
    assert!(
        c.starts_with("DPoP realm=\"github\", algs=\"ES256") && c.contains("insufficient_scope"),
        "{c}"
    );
    let (status, challenge, _) = call_with(
        &routes,
        "/read",
        Some(&auth),
        Some(&key.proof("GET", "https://rs.example/read", Some(&bound))),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(challenge.unwrap().contains("invalid_dpop_proof"));
    // Without a proof of the key, nothing more is said of the token: not
    // that it lacks the scope (RFC 9449 §7.1), nor that it is revoked.
    let thief = DpopKey::new();
    let (status, challenge, _) = call_with(
        &routes,
        "/write",
        Some(&auth),
        Some(&thief.proof("GET", "https://rs.example/api/write", Some(&bound))),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let c = challenge.unwrap();
    assert!(
        c.contains("invalid_dpop_proof") && c.contains("another key"),
        "{c}"
    );

    // A bound token as a bearer token is refused as such, before its scope
    // is looked at.
    let (status, challenge, _) = call(&routes, "/write", Some(&format!("Bearer {bound}"))).await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    let c = challenge.unwrap();
    assert!(c.starts_with("DPoP ") && c.contains("invalid_token"), "{c}");

    // A path that URL parsing would resolve cannot be matched to a proof:
    // the proof names `/api/read`, the server would see `/x/../read`.
    for aliased in [
        "/x/%2e%2e/read",
        "/x/%2E./read",
        "/x/../read",
        "/x\\..\\read",
    ] {
        let mut headers = http::HeaderMap::new();
        headers.insert(header::AUTHORIZATION, auth.parse().unwrap());
        headers.insert("dpop", key.proof("GET", url, Some(&bound)).parse().unwrap());
        let uri: http::Uri = aliased.parse().unwrap();
        let r = v
            .authorize(&http::Method::GET, &uri, &headers, None)
            .await
            .unwrap_err();
        let c = r.www_authenticate.unwrap();
        assert!(c.contains("normal form"), "{aliased}: {c}");
    }

    // A verifier that does not know its public URL cannot check a proof.
    let blind = verifier(&scrip, "github").await;
    let (status, challenge, _) = call_with(
        &app(blind),
        "/read",
        Some(&auth),
        Some(&key.proof("GET", url, Some(&bound))),
    )
    .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert!(challenge.unwrap().contains("public_url"));
    scrip.stop().await;
}
