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

/// When scrip's key set starts publishing a private key, the verifier drops
/// the keys it held too: a token signed by that key, accepted a moment
/// before, is refused, until scrip publishes public keys only.
#[tokio::test]
async fn a_key_set_that_publishes_a_private_key_empties_the_cache() {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let issuer = format!("http://{}", listener.local_addr().unwrap());
    let (key, _) = SigningKey::generate(SigningAlgorithm::ES256).unwrap();
    let public = json!({ "keys": [key.public_jwk()] }).to_string();
    let mut leaked = key.public_jwk();
    leaked["d"] = json!("AAAA");
    let exposed = json!({ "keys": [leaked] }).to_string();
    let jwks = Arc::new(Mutex::new(public.clone()));
    let metadata = json!({ "issuer": issuer, "jwks_uri": format!("{issuer}/jwks") }).to_string();
    let served = jwks.clone();
    let app = axum::Router::new().fallback(move |uri: Uri| {
        let (served, metadata) = (served.clone(), metadata.clone());
        async move {
            if uri.path() == "/jwks" {
                (StatusCode::OK, served.lock().unwrap().clone())
            } else {
                (StatusCode::OK, metadata)
            }
        }
    });
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let mut c = config(&issuer);
    c.jwks_min_refetch = scrip_verifier::MIN_JWKS_REFETCH;
    c.jwks_refresh = std::time::Duration::from_secs(1);
    let v = Verifier::discover(c).await.unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let claims = scrip_token::AccessClaims {
        iss: issuer.clone(),
        sub: "system:serviceaccount:agents:coder".into(),
        agent_iss: None,
        aud: "github".into(),
        iat: now,
        exp: now + 300,
        jti: "j1".into(),
        client_id: "system:serviceaccount:agents:coder".into(),
        scope: "read".into(),
        txn: "t1".into(),
        act: None,
        approval: None,
        cnf: None,
    };
    let token = key.sign_jwt("at+jwt", &claims).unwrap();
    v.verify(&token).await.unwrap();

    *jwks.lock().unwrap() = exposed;
    // Past `jwks_refresh`, the next verification refreshes the keys.
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    let second = scrip_token::AccessClaims {
        jti: "j2".into(),
        ..claims.clone()
    };
    let token2 = key.sign_jwt("at+jwt", &second).unwrap();
    assert!(
        v.verify(&token2).await.is_err(),
        "a key from a set that now publishes its private half still verified"
    );

    *jwks.lock().unwrap() = public.clone();
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    v.verify(&token2).await.unwrap();

    // A set that cannot be used but still lists the key (a repeated
    // `kid`) keeps it; one that no longer lists it (withdrawn, perhaps
    // exposed) drops it, as the identity verifier does.
    let token = |jti: &str| {
        let c = scrip_token::AccessClaims {
            jti: jti.into(),
            ..claims.clone()
        };
        key.sign_jwt("at+jwt", &c).unwrap()
    };
    *jwks.lock().unwrap() = json!({ "keys": [key.public_jwk(), key.public_jwk()] }).to_string();
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    v.verify(&token("j3")).await.unwrap();
    *jwks.lock().unwrap() = json!({ "keys": [] }).to_string();
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    assert!(
        v.verify(&token("j4")).await.is_err(),
        "a key the set no longer lists still verified"
    );
    *jwks.lock().unwrap() = public;
    tokio::time::sleep(std::time::Duration::from_millis(1_200)).await;
    v.verify(&token("j5")).await.unwrap();
}
