//! Federated workload identity against a real HTTP identity provider: a
//! JWKS served by axum on an ephemeral loopback port, whose keys the test
//! rotates, whose fetches it counts and which it can make fail.
//!
//! Time-based tests use intervals of one or two seconds and sleep with
//! margins of at least half a second around every boundary.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use scrip_config::TrustedIssuer;
use scrip_identity::{IdentityError, IdentityVerifier};
use scrip_jose::{JoseError, SigningAlgorithm, SigningKey};
use scrip_token::IdentityKind;
use serde_json::{Value, json};

const ISS: &str = "https://idp.test";
const AUD: &str = "scrip";
const OWN: &str = "https://scrip.test";

// ------------------------------------------------------------ the test IdP

#[derive(Default)]
struct IdpState {
    jwks: Mutex<Value>,
    /// Requests for the JWKS, answered or not.
    fetches: AtomicUsize,
    /// Requests for any other path (nothing should ever ask).
    other: AtomicUsize,
    failing: AtomicBool,
    /// How long each JWKS answer is held back, in ms.
    delay_ms: std::sync::atomic::AtomicU64,
}

async fn serve_jwks(State(state): State<Arc<IdpState>>) -> Response {
    state.fetches.fetch_add(1, Ordering::SeqCst);
    let delay = state.delay_ms.load(Ordering::SeqCst);
    if delay > 0 {
        tokio::time::sleep(Duration::from_millis(delay)).await;
    }
    if state.failing.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE.into_response();
    }
    let jwks = state.jwks.lock().unwrap().clone();
    axum::Json(jwks).into_response()
}

async fn serve_other(State(state): State<Arc<IdpState>>) -> StatusCode {
    state.other.fetch_add(1, Ordering::SeqCst);
    StatusCode::NOT_FOUND
}

struct Idp {
    state: Arc<IdpState>,
    jwks_uri: String,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    server: Option<tokio::task::JoinHandle<()>>,
}

impl Idp {
    async fn start(keys: &[&SigningKey]) -> Self {
        let state = Arc::new(IdpState::default());
        let idp_keys: Vec<Value> = keys.iter().map(|k| k.public_jwk()).collect();
        *state.jwks.lock().unwrap() = json!({ "keys": idp_keys });
        let app = Router::new()
            .route("/jwks", get(serve_jwks))
            .fallback(serve_other)
            .with_state(state.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self {
            state,
            jwks_uri: format!("http://{addr}/jwks"),
            shutdown: Some(tx),
            server: Some(server),
        }
    }

    fn fetches(&self) -> usize {
        self.state.fetches.load(Ordering::SeqCst)
    }

    fn rotate(&self, keys: &[&SigningKey]) {
        let idp_keys: Vec<Value> = keys.iter().map(|k| k.public_jwk()).collect();
        *self.state.jwks.lock().unwrap() = json!({ "keys": idp_keys });
    }

    fn fail(&self, failing: bool) {
        self.state.failing.store(failing, Ordering::SeqCst);
    }

    /// Stops the server: the port then refuses connections.
    async fn shut_down(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(server) = self.server.take() {
            tokio::time::timeout(Duration::from_secs(5), server)
                .await
                .expect("IdP shuts down within 5 s")
                .unwrap();
        }
    }
}

// --------------------------------------------------------------- fixtures

fn es256() -> SigningKey {
    SigningKey::generate(SigningAlgorithm::ES256).unwrap().0
}

fn trusted(jwks_uri: &str, refresh: u64, max_stale: u64, min_refetch: u64) -> TrustedIssuer {
    TrustedIssuer {
        issuer: ISS.into(),
        jwks_uri: Some(jwks_uri.into()),
        jwks_file: None,
        audiences: vec![AUD.into()],
        algorithms: vec!["ES256".into(), "EdDSA".into()],
        token_types: vec!["JWT".into()],
        allow_untyped: true,
        jwks_refresh: refresh,
        jwks_max_stale: max_stale,
        jwks_min_refetch: min_refetch,
        kind: None,
        trust_domain: None,
        required_claims: Default::default(),
    }
}

fn verifier(issuers: &[TrustedIssuer]) -> IdentityVerifier {
    IdentityVerifier::new(issuers, OWN, 30).unwrap()
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn claims(iss: &str, sub: &str) -> Value {
    let now = now();
    json!({"iss": iss, "sub": sub, "aud": AUD, "iat": now, "nbf": now, "exp": now + 600})
}

fn token(key: &SigningKey) -> String {
    key.sign_jwt("JWT", &claims(ISS, "agent")).unwrap()
}

fn unknown_key() -> IdentityError {
    IdentityError::Token(JoseError::UnknownKey)
}

async fn sleep_ms(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

// ------------------------------------------------------------ caching

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_verify_fetches_once_then_the_cache_serves() {
    let key = es256();
    let idp = Idp::start(&[&key]).await;
    let v = verifier(&[trusted(&idp.jwks_uri, 60, 60, 1)]);
    assert_eq!(
        idp.fetches(),
        0,
        "keys are fetched on first use, not at setup"
    );

    let id = v.verify(&token(&key)).await.unwrap();
    assert_eq!(id.subject, "agent");
    assert_eq!(id.issuer, ISS);
    assert_eq!(idp.fetches(), 1);

    for _ in 0..20 {
        v.verify(&token(&key)).await.unwrap();
    }
    assert_eq!(idp.fetches(), 1, "later verifies use the cache");
    assert_eq!(idp.state.other.load(Ordering::SeqCst), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rotated_key_is_accepted_after_one_refetch() {
    let old = es256();
    let new = es256();
    let idp = Idp::start(&[&old]).await;
    let v = verifier(&[trusted(&idp.jwks_uri, 60, 60, 1)]);

    v.verify(&token(&old)).await.unwrap();
    assert_eq!(idp.fetches(), 1);

    idp.rotate(&[&new]);
    // Within min_refetch of the last fetch an unknown kid causes no fetch.
    assert_eq!(v.verify(&token(&new)).await.unwrap_err(), unknown_key());
    assert_eq!(idp.fetches(), 1);

    sleep_ms(1_200).await;
    let id = v.verify(&token(&new)).await.unwrap();
    assert_eq!(id.subject, "agent");
    assert_eq!(idp.fetches(), 2, "exactly one refetch");
    v.verify(&token(&new)).await.unwrap();
    assert_eq!(idp.fetches(), 2);

    // The IdP no longer publishes the old key.
    assert_eq!(v.verify(&token(&old)).await.unwrap_err(), unknown_key());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn burst_of_unknown_kids_refetches_at_a_bounded_rate() {
    let key = es256();
    let idp = Idp::start(&[&key]).await;
    let v = Arc::new(verifier(&[trusted(&idp.jwks_uri, 60, 60, 1)]));
    v.verify(&token(&key)).await.unwrap();
    assert_eq!(idp.fetches(), 1);
    // Let min_refetch pass so that the burst may cause a refetch.
    sleep_ms(1_200).await;

    // 50 tokens signed by 50 keys the IdP never published: random kids.
    let tokens: Vec<String> = (0..50).map(|_| token(&es256())).collect();
    let started = std::time::Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for t in tokens {
        let v = v.clone();
        tasks.spawn(async move { v.verify(&t).await });
    }
    while let Some(result) = tasks.join_next().await {
        assert_eq!(result.unwrap().unwrap_err(), unknown_key());
    }
    let refetches = idp.fetches() - 1;
    if started.elapsed() < Duration::from_secs(1) {
        assert!(
            (1..=2).contains(&refetches),
            "a burst within min_refetch causes 1 or 2 fetches, got {refetches}"
        );
    } else {
        // A very slow machine: still bounded by one fetch per second.
        let bound = usize::try_from(started.elapsed().as_secs()).unwrap() + 2;
        assert!(
            refetches <= bound,
            "{refetches} fetches in {:?}",
            started.elapsed()
        );
    }

    // The known key still works, from the cache.
    let before = idp.fetches();
    v.verify(&token(&key)).await.unwrap();
    assert_eq!(idp.fetches(), before);
}

// -------------------------------------------------- stale and fail-closed

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_issuer_served_from_cache_then_fails_closed_then_recovers() {
    // refresh 2 s, max_stale 6 s: keys usable up to 8 s after the last
    // successful fetch; min_refetch 2 s. Each step has seconds to spare
    // on a loaded machine.
    let key = es256();
    let idp = Idp::start(&[&key]).await;
    let v = verifier(&[trusted(&idp.jwks_uri, 2, 6, 2)]);

    v.verify(&token(&key)).await.unwrap(); // t = 0: fetched
    assert_eq!(idp.fetches(), 1);
    idp.fail(true);

    sleep_ms(2_500).await; // t = 2.5: refresh due, fetch fails, cache serves
    v.verify(&token(&key)).await.unwrap();
    assert_eq!(idp.fetches(), 2, "a refresh was attempted");
    // Within min_refetch of that attempt: no new fetch, still served.
    v.verify(&token(&key)).await.unwrap();
    assert_eq!(idp.fetches(), 2);
    // A new kid is not accepted from a stale cache.
    assert_eq!(v.verify(&token(&es256())).await.unwrap_err(), unknown_key());

    sleep_ms(6_500).await; // t = 9: past refresh + max_stale
    assert_eq!(
        v.verify(&token(&key)).await.unwrap_err(),
        IdentityError::KeysUnavailable
    );
    assert_eq!(idp.fetches(), 3);

    idp.fail(false);
    sleep_ms(2_200).await; // t = 11.2: min_refetch after the last attempt
    let id = v.verify(&token(&key)).await.unwrap();
    assert_eq!(id.subject, "agent");
    assert_eq!(idp.fetches(), 4);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_shut_down_served_from_cache_then_fails_closed() {
    let key = es256();
    let mut idp = Idp::start(&[&key]).await;
    let v = verifier(&[trusted(&idp.jwks_uri, 2, 6, 2)]);
    v.verify(&token(&key)).await.unwrap(); // t = 0
    idp.shut_down().await;

    sleep_ms(2_500).await; // t = 2.5: refresh fails (connection refused)
    v.verify(&token(&key)).await.unwrap();

    sleep_ms(6_500).await; // t = 9: past refresh + max_stale
    assert_eq!(
        v.verify(&token(&key)).await.unwrap_err(),
        IdentityError::KeysUnavailable
    );
    assert_eq!(idp.fetches(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn issuer_down_from_the_start_fails_closed() {
    let key = es256();
    let idp = Idp::start(&[&key]).await;
    idp.fail(true);
    let v = verifier(&[trusted(&idp.jwks_uri, 60, 60, 1)]);
    assert_eq!(
        v.verify(&token(&key)).await.unwrap_err(),
        IdentityError::KeysUnavailable
    );
    assert_eq!(
        v.verify(&token(&key)).await.unwrap_err(),
        IdentityError::KeysUnavailable
    );
    assert_eq!(idp.fetches(), 1, "retries are bounded by min_refetch");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_jwks_keeps_the_last_good_keys() {
    let key = es256();
    let idp = Idp::start(&[&key]).await;
    let v = verifier(&[trusted(&idp.jwks_uri, 1, 60, 1)]);
    v.verify(&token(&key)).await.unwrap();
    // No JWKS at all (an error page served with 200): the keys stay.
    *idp.state.jwks.lock().unwrap() = json!({"error": "try later"});
    sleep_ms(1_200).await;
    v.verify(&token(&key)).await.unwrap();
    assert_eq!(idp.fetches(), 2);
    // A JWKS that cannot be used (a repeated `kid`) but still lists the
    // key: it stays.
    let listed = key.public_jwk();
    *idp.state.jwks.lock().unwrap() = json!({"keys": [listed, listed]});
    sleep_ms(1_200).await;
    v.verify(&token(&key)).await.unwrap();
    assert_eq!(idp.fetches(), 3);
}

/// A JWKS that cannot be used and no longer lists a key held from before:
/// the issuer withdrew it (perhaps exposed), so it is not trusted on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_the_issuer_no_longer_lists_is_dropped_even_when_its_jwks_is_refused() {
    let key = es256();
    let idp = Idp::start(&[&key]).await;
    let v = verifier(&[trusted(&idp.jwks_uri, 1, 60, 1)]);
    v.verify(&token(&key)).await.unwrap();
    // Its replacement is a key scrip cannot use.
    *idp.state.jwks.lock().unwrap() =
        json!({"keys": [{"kty": "oct", "kid": "new", "k": "c2VjcmV0"}]});
    sleep_ms(1_200).await;
    assert_eq!(
        v.verify(&token(&key)).await.unwrap_err(),
        IdentityError::KeysUnavailable
    );
    assert_eq!(idp.fetches(), 2);
    // Trusted again once the issuer publishes it again.
    idp.rotate(&[&key]);
    sleep_ms(1_200).await;
    v.verify(&token(&key)).await.unwrap();
}

/// Tokens signed by an issuer's new key that arrive while the fetch their
/// first one started is under way wait for it, rather than being refused
/// as signed by an unknown key.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn tokens_arriving_during_a_fetch_wait_for_it() {
    let old = es256();
    let new = es256();
    let idp = Idp::start(&[&old]).await;
    let v = Arc::new(verifier(&[trusted(&idp.jwks_uri, 60, 60, 1)]));
    v.verify(&token(&old)).await.unwrap();
    sleep_ms(1_200).await;
    idp.rotate(&[&old, &new]);
    idp.state.delay_ms.store(800, Ordering::SeqCst);
    let first = {
        let v = v.clone();
        let t = token(&new);
        tokio::spawn(async move { v.verify(&t).await })
    };
    // The fetch has begun: the IdP counted the request.
    while idp.fetches() < 2 {
        sleep_ms(10).await;
    }
    let mut during = tokio::task::JoinSet::new();
    for _ in 0..8 {
        let v = v.clone();
        let t = token(&new);
        during.spawn(async move { v.verify(&t).await });
    }
    first.await.unwrap().unwrap();
    while let Some(result) = during.join_next().await {
        result.unwrap().unwrap();
    }
    assert_eq!(idp.fetches(), 2, "one fetch for all of them");
}

/// A request dropped while its fetch is under way (its client went away)
/// does not cancel the fetch: the keys it brings are kept, so a client
/// that kept dropping such requests could not hold off every refresh.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fetch_outlives_the_request_that_started_it() {
    let old = es256();
    let new = es256();
    let idp = Idp::start(&[&old]).await;
    // min_refetch 60 s: only the dropped request's fetch can bring the key.
    let v = verifier(&[trusted(&idp.jwks_uri, 60, 60, 60)]);
    idp.rotate(&[&old, &new]);
    idp.state.delay_ms.store(500, Ordering::SeqCst);
    let dropped = tokio::time::timeout(Duration::from_millis(100), v.verify(&token(&new))).await;
    assert!(dropped.is_err(), "the request is dropped during its fetch");
    // The fetch it started reaches the IdP, and is answered.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while idp.fetches() < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "the fetch never reached the IdP"
        );
        sleep_ms(10).await;
    }
    sleep_ms(1_000).await;
    idp.state.delay_ms.store(0, Ordering::SeqCst);
    let id = v.verify(&token(&new)).await.unwrap();
    assert_eq!(id.subject, "agent");
    assert_eq!(idp.fetches(), 1, "the keys came from that one fetch");
}

// ------------------------------------------------ what a token may not steer

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn key_location_headers_and_url_kids_are_never_followed() {
    let key = es256();
    let idp = Idp::start(&[&key]).await;
    let v = verifier(&[trusted(&idp.jwks_uri, 60, 60, 1)]);
    v.verify(&token(&key)).await.unwrap();
    sleep_ms(1_200).await;

    let evil = idp.jwks_uri.replace("/jwks", "/evil");
    // A kid that is a URL: refused as unknown, and never requested.
    let (pkcs8_key, pkcs8) = SigningKey::generate(SigningAlgorithm::ES256).unwrap();
    let forged = forge_es256(
        &pkcs8,
        &json!({"alg": "ES256", "typ": "JWT", "kid": evil}),
        &claims(ISS, "agent"),
    );
    assert_eq!(v.verify(&forged).await.unwrap_err(), unknown_key());
    // A jku pointing at a JWKS holding the attacker's key.
    let forged = forge_es256(
        &pkcs8,
        &json!({"alg": "ES256", "typ": "JWT", "kid": pkcs8_key.kid(), "jku": evil}),
        &claims(ISS, "agent"),
    );
    assert_eq!(
        v.verify(&forged).await.unwrap_err(),
        IdentityError::Token(JoseError::ForbiddenHeader("jku"))
    );
    assert_eq!(idp.state.other.load(Ordering::SeqCst), 0);
}

fn forge_es256(pkcs8: &[u8], header: &Value, claims: &Value) -> String {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
    use base64::Engine as _;
    let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
    let input = format!(
        "{}.{}",
        b64(&serde_json::to_vec(header).unwrap()),
        b64(&serde_json::to_vec(claims).unwrap())
    );
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8).unwrap();
    let sig = pair
        .sign(&aws_lc_rs::rand::SystemRandom::new(), input.as_bytes())
        .unwrap();
    format!("{input}.{}", b64(sig.as_ref()))
}

// ------------------------------------------------------------- issuers

#[tokio::test]
async fn jwks_file_issuer_works() {
    let key = es256();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(
        &path,
        serde_json::to_vec(&json!({"keys": [key.public_jwk()]})).unwrap(),
    )
    .unwrap();
    let issuer = TrustedIssuer {
        jwks_uri: None,
        jwks_file: Some(path),
        ..trusted("unused", 60, 60, 1)
    };
    let v = verifier(&[issuer]);
    let id = v.verify(&token(&key)).await.unwrap();
    assert_eq!(id.subject, "agent");
    assert_eq!(v.verify(&token(&es256())).await.unwrap_err(), unknown_key());
}

#[test]
fn unusable_jwks_file_is_a_setup_error() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("jwks.json");
    std::fs::write(&path, b"{\"keys\": []}").unwrap();
    let issuer = TrustedIssuer {
        jwks_uri: None,
        jwks_file: Some(path.clone()),
        ..trusted("unused", 60, 60, 1)
    };
    assert!(IdentityVerifier::new(std::slice::from_ref(&issuer), OWN, 30).is_err());
    let missing = TrustedIssuer {
        jwks_file: Some(dir.path().join("absent.json")),
        ..issuer.clone()
    };
    assert!(IdentityVerifier::new(&[missing], OWN, 30).is_err());

    // A trust anchor others may write is refused, however good its keys.
    use std::os::unix::fs::PermissionsExt as _;
    let key = es256();
    std::fs::write(
        &path,
        serde_json::to_vec(&json!({"keys": [key.public_jwk()]})).unwrap(),
    )
    .unwrap();
    for (mode, ok) in [(0o644, true), (0o600, true), (0o664, false), (0o646, false)] {
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode)).unwrap();
        match IdentityVerifier::new(std::slice::from_ref(&issuer), OWN, 30) {
            Ok(_) => assert!(ok, "mode {mode:o} was accepted"),
            Err(e) => assert!(
                !ok && e
                    .to_string()
                    .contains("could add a key and sign any identity"),
                "mode {mode:o}: {e}"
            ),
        }
    }
    // Nor one in a directory others may write (they could replace it), a
    // link's or its target's, unless the directory is sticky.
    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
    let links = tempfile::tempdir().unwrap();
    let link = links.path().join("jwks.json");
    std::os::unix::fs::symlink(&path, &link).unwrap();
    let linked = TrustedIssuer {
        jwks_file: Some(link),
        ..issuer.clone()
    };
    for (dir, mode, ok) in [
        (dir.path(), 0o755, true),
        (dir.path(), 0o775, false),
        (dir.path(), 0o1777, true),
        (dir.path(), 0o755, true),
        (links.path(), 0o777, false),
        (links.path(), 0o1777, true),
    ] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(mode)).unwrap();
        match IdentityVerifier::new(std::slice::from_ref(&linked), OWN, 30) {
            Ok(_) => assert!(ok, "directory mode {mode:o} was accepted"),
            Err(e) => assert!(
                !ok && e
                    .to_string()
                    .contains("could add a key and sign any identity"),
                "directory mode {mode:o}: {e}"
            ),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn own_tokens_are_not_workload_identities() {
    let key = es256();
    let idp = Idp::start(&[&key]).await;
    // Even if scrip's own issuer were (mis)configured as trusted.
    let own_trusted = TrustedIssuer {
        issuer: OWN.into(),
        ..trusted(&idp.jwks_uri, 60, 60, 1)
    };
    let v = verifier(&[trusted(&idp.jwks_uri, 60, 60, 1), own_trusted]);
    for (typ, kind) in [
        ("at+jwt", "access"),
        ("txntoken+jwt", "task"),
        ("JWT", "issued"),
    ] {
        let t = key.sign_jwt(typ, &claims(OWN, "agent")).unwrap();
        assert_eq!(
            v.verify(&t).await.unwrap_err(),
            IdentityError::ScripToken(kind)
        );
    }
    assert_eq!(idp.fetches(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn untrusted_issuer_is_refused_without_a_fetch() {
    let key = es256();
    let idp = Idp::start(&[&key]).await;
    let v = verifier(&[trusted(&idp.jwks_uri, 60, 60, 1)]);
    for iss in [
        "https://evil.test",
        "https://idp.test/",
        "HTTPS://IDP.TEST",
        "",
    ] {
        let t = key.sign_jwt("JWT", &claims(iss, "agent")).unwrap();
        assert_eq!(
            v.verify(&t).await.unwrap_err(),
            IdentityError::UntrustedIssuer,
            "{iss}"
        );
    }
    assert_eq!(idp.fetches(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_audience_and_missing_subject_are_refused() {
    let key = es256();
    let idp = Idp::start(&[&key]).await;
    let v = verifier(&[trusted(&idp.jwks_uri, 60, 60, 1)]);
    let mut c = claims(ISS, "agent");
    c["aud"] = json!("someone-else");
    assert_eq!(
        v.verify(&key.sign_jwt("JWT", &c).unwrap())
            .await
            .unwrap_err(),
        IdentityError::Token(JoseError::WrongAudience)
    );
    let mut c = claims(ISS, "agent");
    c.as_object_mut().unwrap().remove("sub");
    assert_eq!(
        v.verify(&key.sign_jwt("JWT", &c).unwrap())
            .await
            .unwrap_err(),
        IdentityError::NoSubject
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kubernetes_claims_surface_as_attributes_and_flat_claims() {
    let key = es256();
    let idp = Idp::start(&[&key]).await;
    let v = verifier(&[trusted(&idp.jwks_uri, 60, 60, 1)]);
    let now = now();
    let sa_token = json!({
        "iss": ISS,
        "sub": "system:serviceaccount:agents:coder",
        "aud": [AUD, "https://kubernetes.default.svc"],
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "jti": "3f1c2b4a",
        "kubernetes.io": {
            "namespace": "agents",
            "node": {"name": "node-1", "uid": "n-uid"},
            "pod": {"name": "coder-7d9f8", "uid": "p-uid"},
            "serviceaccount": {"name": "coder", "uid": "sa-uid"},
            "warnafter": now + 3000
        }
    });
    let id = v
        .verify(&key.sign_jwt("JWT", &sa_token).unwrap())
        .await
        .unwrap();
    assert_eq!(id.kind, IdentityKind::Kubernetes);
    assert_eq!(id.issuer, ISS);
    assert_eq!(id.subject, "system:serviceaccount:agents:coder");
    assert_eq!(id.attributes["namespace"], "agents");
    assert_eq!(id.attributes["service_account"], "coder");
    assert_eq!(id.attributes["pod"], "coder-7d9f8");
    assert_eq!(id.claims["kubernetes.io.pod.name"], "coder-7d9f8");
    assert_eq!(id.claims["kubernetes.io.namespace"], "agents");
    assert_eq!(id.claims["kubernetes.io.serviceaccount.uid"], "sa-uid");
    assert_eq!(id.claims["kubernetes.io.node.name"], "node-1");
    assert_eq!(
        id.claims["kubernetes.io.warnafter"],
        (now + 3000).to_string()
    );
    assert_eq!(id.claims["jti"], "3f1c2b4a");
}

// ------------------------------------------------------------ re-presented tokens

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_presented_again_is_refused_once_its_key_is_gone() {
    let old = es256();
    let new = es256();
    let idp = Idp::start(&[&old]).await;
    let v = verifier(&[trusted(&idp.jwks_uri, 60, 60, 1)]);
    let kept = token(&old);
    for _ in 0..3 {
        assert_eq!(v.verify(&kept).await.unwrap().subject, "agent");
    }
    idp.rotate(&[&new]);
    sleep_ms(1_200).await;
    // A new kid makes the verifier fetch the new set, without the old key.
    v.verify(&token(&new)).await.unwrap();
    assert_eq!(idp.fetches(), 2);
    assert_eq!(v.verify(&kept).await.unwrap_err(), unknown_key());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_presented_again_is_refused_once_it_expires() {
    let key = es256();
    let idp = Idp::start(&[&key]).await;
    // No leeway, so the test waits seconds, not minutes.
    let v = IdentityVerifier::new(&[trusted(&idp.jwks_uri, 60, 60, 1)], OWN, 0).unwrap();
    // Three seconds to verify it twice, the first time with a key set
    // fetch, on a machine however loaded.
    let iat = now();
    let exp = iat + 3;
    let short = key
        .sign_jwt(
            "JWT",
            &json!({"iss": ISS, "sub": "agent", "aud": AUD, "iat": iat, "exp": exp}),
        )
        .unwrap();
    assert_eq!(v.verify(&short).await.unwrap().subject, "agent");
    assert_eq!(v.verify(&short).await.unwrap().subject, "agent");
    while now() <= exp {
        sleep_ms(100).await;
    }
    assert!(
        matches!(
            v.verify(&short).await.unwrap_err(),
            IdentityError::Token(JoseError::Expired)
        ),
        "an expired token was accepted again"
    );
}
