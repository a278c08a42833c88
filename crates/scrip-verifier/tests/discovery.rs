//! Discovery of an issuer with a path (RFC 8414 §3.1): the metadata is read
//! where the RFC puts it, the well-known suffix between the host and the
//! path, and then where a front proxy that strips the path serves it; and
//! whichever answers must name the issuer exactly (§3.3).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::sync::{Arc, Mutex};

use axum::http::{StatusCode, Uri};
use scrip_jose::{SigningAlgorithm, SigningKey};
use scrip_verifier::{Verifier, VerifierConfig};
use serde_json::json;

/// A stub authorization server for the issuer `http://<addr>/tenant`: it
/// answers metadata at the paths in `serves` only (naming `names` as its
/// issuer), the JWKS at `/tenant/jwks`, and records every path asked.
struct Stub {
    issuer: String,
    asked: Arc<Mutex<Vec<String>>>,
}

async fn stub(serves: &'static [&'static str], names: Option<&'static str>) -> Stub {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}/tenant", listener.local_addr().unwrap());
    let (key, _) = SigningKey::generate(SigningAlgorithm::ES256).unwrap();
    let jwks = json!({ "keys": [key.public_jwk()] }).to_string();
    let metadata = json!({
        "issuer": names.map_or_else(|| issuer.clone(), str::to_owned),
        "jwks_uri": format!("{issuer}/jwks"),
    })
    .to_string();
    let asked = Arc::new(Mutex::new(Vec::new()));
    let seen = asked.clone();
    let app = axum::Router::new().fallback(move |uri: Uri| {
        let (jwks, metadata, seen) = (jwks.clone(), metadata.clone(), seen.clone());
        async move {
            let path = uri.path().to_owned();
            seen.lock().unwrap().push(path.clone());
            if path == "/tenant/jwks" {
                (StatusCode::OK, jwks)
            } else if serves.contains(&path.as_str()) {
                (StatusCode::OK, metadata)
            } else {
                (StatusCode::NOT_FOUND, String::new())
            }
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    Stub { issuer, asked }
}

const RFC_8414: &str = "/.well-known/oauth-authorization-server/tenant";
const APPENDED: &str = "/tenant/.well-known/oauth-authorization-server";

fn config(issuer: &str) -> VerifierConfig {
    VerifierConfig::danger_without_revocation(issuer, "github")
}

#[tokio::test]
async fn the_metadata_is_read_first_where_rfc_8414_puts_it() {
    let s = stub(&[RFC_8414, APPENDED], None).await;
    Verifier::discover(config(&s.issuer)).await.unwrap();
    assert_eq!(
        *s.asked.lock().unwrap(),
        [RFC_8414, "/tenant/jwks"],
        "the appended path is not needed once the RFC's answers"
    );
}

#[tokio::test]
async fn behind_a_proxy_that_strips_the_path_the_appended_path_serves() {
    let s = stub(&[APPENDED], None).await;
    Verifier::discover(config(&s.issuer)).await.unwrap();
    assert_eq!(
        *s.asked.lock().unwrap(),
        [RFC_8414, APPENDED, "/tenant/jwks"]
    );
}

#[tokio::test]
async fn metadata_naming_another_issuer_is_refused_at_either_path() {
    let s = stub(&[RFC_8414, APPENDED], Some("http://127.0.0.1:1")).await;
    let err = Verifier::discover(config(&s.issuer))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains(RFC_8414) && err.contains(APPENDED) && err.contains("names issuer"),
        "{err}"
    );
    assert!(
        !s.asked.lock().unwrap().iter().any(|p| p.ends_with("/jwks")),
        "no key set is read for an issuer that is not the one asked for"
    );

    let none = stub(&[], None).await;
    let err = Verifier::discover(config(&none.issuer))
        .await
        .unwrap_err()
        .to_string();
    assert!(err.contains("answered 404"), "{err}");
    assert_eq!(*none.asked.lock().unwrap(), [RFC_8414, APPENDED]);
}

#[tokio::test]
async fn an_issuer_without_a_path_is_asked_once() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}", listener.local_addr().unwrap());
    let asked = Arc::new(Mutex::new(Vec::new()));
    let seen = asked.clone();
    let app = axum::Router::new().fallback(move |uri: Uri| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push(uri.path().to_owned());
            StatusCode::NOT_FOUND
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    assert!(Verifier::discover(config(&issuer)).await.is_err());
    assert_eq!(
        *asked.lock().unwrap(),
        ["/.well-known/oauth-authorization-server"]
    );
}
