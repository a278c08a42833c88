//! A token verified once is not verified again when presented again, and
//! what that must not change: a token whose key scrip withdrew, a token past
//! its `exp`, and a token for another tool are refused even though the same
//! bytes passed before. (Revocation and single use after a first success are
//! in `feed.rs` and `single_use.rs`.)

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::time::Duration;

use common::{Fake, eventually, now};
use scrip_jose::{JoseError, SigningAlgorithm, SigningKey};
use scrip_verifier::{Verifier, VerifierConfig, VerifyError};
use serde_json::json;

fn config(fake: &Fake) -> VerifierConfig {
    VerifierConfig::danger_without_revocation(&fake.url, "github")
}

#[tokio::test]
async fn a_token_verified_before_is_refused_once_its_key_is_withdrawn() {
    let fake = Fake::start().await;
    let mut c = config(&fake);
    c.jwks_refresh = Duration::from_millis(200);
    c.jwks_min_refetch = scrip_verifier::MIN_JWKS_REFETCH;
    let v = Verifier::discover(c).await.unwrap();
    let t = fake.token("task-1", "jti-1");
    for _ in 0..3 {
        assert_eq!(v.verify(&t).await.unwrap().task(), "task-1");
    }

    // scrip withdraws the key (say it leaked) and signs with a new one.
    let (next, _) = SigningKey::generate(SigningAlgorithm::ES256).unwrap();
    fake.state.lock().unwrap().jwks = vec![next.public_jwk()];
    assert!(
        eventually(5, || async { v.verify(&t).await.is_err() }).await,
        "a token signed with a withdrawn key stayed accepted"
    );
    assert_eq!(
        v.verify(&t).await.unwrap_err(),
        VerifyError::Token(JoseError::UnknownKey)
    );
    let fresh = fake.token_with(&next, "github", "task-1", "jti-2");
    assert!(v.verify(&fresh).await.is_ok());
}

#[tokio::test]
async fn a_token_verified_before_is_refused_once_it_expires() {
    let fake = Fake::start().await;
    let mut c = config(&fake);
    c.leeway = 0;
    let v = Verifier::discover(c).await.unwrap();
    let now = now();
    let claims = json!({
        "iss": fake.url, "sub": "agent", "aud": "github", "iat": now, "exp": now + 2,
        "jti": "j", "client_id": "agent", "scope": "read", "txn": "t",
    });
    let t = fake.key.sign_jwt("at+jwt", &claims).unwrap();
    assert!(v.verify(&t).await.is_ok());
    assert!(v.verify(&t).await.is_ok());
    assert!(
        eventually(6, || async { v.verify(&t).await.is_err() }).await,
        "a token past its exp stayed accepted"
    );
    assert_eq!(
        v.verify(&t).await.unwrap_err(),
        VerifyError::Token(JoseError::Expired)
    );
}

#[tokio::test]
async fn a_token_verified_for_one_tool_is_refused_by_another() {
    let fake = Fake::start().await;
    let github = Verifier::discover(config(&fake)).await.unwrap();
    let jira = github.for_audience("jira");
    let t = fake.token("task-1", "jti-1");
    assert!(github.verify(&t).await.is_ok());
    assert_eq!(
        jira.verify(&t).await.unwrap_err(),
        VerifyError::Token(JoseError::WrongAudience)
    );
    assert!(github.verify(&t).await.is_ok());
    let for_jira = fake.token_with(&fake.key, "jira", "task-1", "jti-2");
    assert!(jira.verify(&for_jira).await.is_ok());
    assert_eq!(
        github.verify(&for_jira).await.unwrap_err(),
        VerifyError::Token(JoseError::WrongAudience)
    );
}
