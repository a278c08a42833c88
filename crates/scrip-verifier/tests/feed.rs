//! The verifier against a fake scrip whose keys and revocation feed the test
//! controls: revocations reach the verifier through the long-poll, it catches
//! up from its cursor after the feed fails, it fails closed past the allowed
//! staleness, and it follows a key rotation at a bounded rate.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{FEED_IDENTITY, Fake, eventually, now};
use scrip_jose::{JoseError, SigningAlgorithm, SigningKey};
use scrip_verifier::{
    FeedConfig, Revocation, SetupError, StaticIdentity, Verifier, VerifierConfig, VerifyError,
};
use serde_json::json;

fn config(fake: &Fake, identity: &str, max_staleness: Duration) -> VerifierConfig {
    let mut feed = FeedConfig::new(Arc::new(StaticIdentity::new(identity)));
    feed.wait = Duration::from_secs(1);
    feed.max_staleness = max_staleness;
    feed.retry_min = Duration::from_millis(50);
    feed.retry_max = Duration::from_millis(200);
    let mut c = VerifierConfig::new(&fake.url, "github", Arc::new(StaticIdentity::new("unused")));
    c.revocation = Revocation::Follow(feed);
    c
}

async fn verifier(fake: &Fake) -> Verifier {
    Verifier::discover(config(fake, FEED_IDENTITY, Duration::from_secs(30)))
        .await
        .unwrap()
}

#[tokio::test]
async fn a_revoked_task_is_refused_through_the_long_poll() {
    let fake = Fake::start().await;
    let v = verifier(&fake).await;
    let t1 = fake.token("task-1", "jti-1");
    let t1b = fake.token("task-1", "jti-1b");
    let t2 = fake.token("task-2", "jti-2");
    assert_eq!(v.verify(&t1).await.unwrap().task(), "task-1");

    fake.push_event(json!({"type": "task", "txn": "task-1", "exp": now() + 300}));
    assert!(
        eventually(5, || async { v.verify(&t1).await.is_err() }).await,
        "the revoked task's token stayed accepted"
    );
    assert_eq!(v.verify(&t1).await.unwrap_err(), VerifyError::Revoked);
    assert_eq!(v.verify(&t1b).await.unwrap_err(), VerifyError::Revoked);
    assert!(
        v.verify(&t2).await.is_ok(),
        "another task's token is refused"
    );
}

#[tokio::test]
async fn a_revoked_token_is_refused_alone() {
    let fake = Fake::start().await;
    let v = verifier(&fake).await;
    let a = fake.token("task-1", "jti-a");
    let b = fake.token("task-1", "jti-b");
    fake.push_event(json!({"type": "token", "jti": "jti-a", "txn": "task-1", "exp": now() + 300}));
    assert!(eventually(5, || async { v.verify(&a).await.is_err() }).await);
    assert_eq!(v.verify(&a).await.unwrap_err(), VerifyError::Revoked);
    assert!(v.verify(&b).await.is_ok());
}

#[tokio::test]
async fn revocations_listed_before_start_are_known_at_once() {
    let fake = Fake::start().await;
    fake.push_event(json!({"type": "task", "txn": "old-task", "exp": now() + 300}));
    let v = verifier(&fake).await;
    let t = fake.token("old-task", "jti-1");
    assert_eq!(v.verify(&t).await.unwrap_err(), VerifyError::Revoked);
}

#[tokio::test]
async fn catches_up_from_its_cursor_after_the_feed_fails() {
    let fake = Fake::start().await;
    fake.push_event(json!({"type": "task", "txn": "t0", "exp": now() + 300}));
    let v = verifier(&fake).await;
    fake.set_feed_down(true);
    // Events arrive while the feed is failing.
    fake.state.lock().unwrap().events.extend([
        json!({"type": "task", "txn": "t1", "exp": now() + 300}),
        json!({"type": "token", "jti": "j2", "txn": "t2", "exp": now() + 300}),
    ]);
    // Down until the follower was refused at least once.
    assert!(eventually(5, || async { fake.state.lock().unwrap().feed_refused > 0 }).await);
    tokio::time::sleep(Duration::from_millis(300)).await;
    fake.set_feed_down(false);
    let t1 = fake.token("t1", "j1");
    let t2 = fake.token("t2", "j2");
    assert!(eventually(5, || async { v.verify(&t1).await.is_err() }).await);
    assert_eq!(v.verify(&t1).await.unwrap_err(), VerifyError::Revoked);
    assert_eq!(v.verify(&t2).await.unwrap_err(), VerifyError::Revoked);
    // It resumed from its cursor (1), not from the start. (Its question
    // after the page it applied may still be on its way.)
    assert!(
        eventually(5, || async {
            fake.state.lock().unwrap().afters.contains(&3)
        })
        .await
    );
    let afters = fake.state.lock().unwrap().afters.clone();
    assert_eq!(afters.first(), Some(&0));
    assert!(afters.iter().skip(1).all(|a| *a >= 1), "afters: {afters:?}");
    assert!(
        afters.contains(&1) && afters.contains(&3),
        "afters: {afters:?}"
    );
}

#[tokio::test]
async fn past_the_staleness_every_token_is_refused_until_the_feed_answers() {
    let fake = Fake::start().await;
    let v = Verifier::discover(config(&fake, FEED_IDENTITY, Duration::from_secs(3)))
        .await
        .unwrap();
    let t = fake.token("task-1", "jti-1");
    assert!(v.verify(&t).await.is_ok());
    assert!(v.is_ready());
    fake.set_feed_down(true);
    assert!(
        eventually(10, || async {
            matches!(v.verify(&t).await, Err(VerifyError::RevocationStale))
        })
        .await,
        "a verifier without a feed kept accepting tokens"
    );
    // Nor does it say it is ready (a load balancer sends requests elsewhere).
    assert!(!v.is_ready());
    fake.set_feed_down(false);
    assert!(
        eventually(10, || async { v.verify(&t).await.is_ok() }).await,
        "the verifier did not recover when the feed came back"
    );
    assert!(v.is_ready());
}

#[tokio::test]
async fn the_feed_is_read_with_the_workload_identity() {
    let fake = Fake::start().await;
    let err = Verifier::discover(config(&fake, "someone-else", Duration::from_secs(30)))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, SetupError::Feed(m) if m.contains("401")),
        "{err}"
    );
    assert_eq!(fake.state.lock().unwrap().unauthorized, 1);
}

#[tokio::test]
async fn follows_a_key_rotation_at_a_bounded_rate() {
    let fake = Fake::start().await;
    let mut c = config(&fake, FEED_IDENTITY, Duration::from_secs(30));
    c.jwks_min_refetch = Duration::from_secs(3600);
    c.jwks_max_age = Duration::from_secs(7200);
    let v = Verifier::discover(c).await.unwrap();
    assert_eq!(fake.state.lock().unwrap().jwks_fetches, 1);

    // scrip rotates: the new key is published beside the old one.
    let (next, _) = SigningKey::generate(SigningAlgorithm::EdDSA).unwrap();
    fake.state.lock().unwrap().jwks.push(next.public_jwk());
    // The first fetch was "recent" (min_refetch is an hour): no refetch.
    let t = fake.token_with(&next, "github", "task-1", "jti-1");
    assert_eq!(
        v.verify(&t).await.unwrap_err(),
        VerifyError::Token(JoseError::UnknownKey)
    );
    assert_eq!(fake.state.lock().unwrap().jwks_fetches, 1);

    // A refetch is not allowed more often than once a second.
    let mut c0 = config(&fake, FEED_IDENTITY, Duration::from_secs(30));
    c0.jwks_min_refetch = Duration::from_millis(999);
    assert!(matches!(
        Verifier::discover(c0).await.unwrap_err(),
        SetupError::Config(m) if m.contains("jwks_min_refetch")
    ));

    // Past the least interval, the unknown kid triggers one fetch.
    let fake2 = Fake::start().await;
    let mut c2 = config(&fake2, FEED_IDENTITY, Duration::from_secs(30));
    c2.jwks_min_refetch = scrip_verifier::MIN_JWKS_REFETCH;
    let v2 = Verifier::discover(c2).await.unwrap();
    tokio::time::sleep(scrip_verifier::MIN_JWKS_REFETCH + Duration::from_millis(100)).await;
    let (next, _) = SigningKey::generate(SigningAlgorithm::EdDSA).unwrap();
    fake2.state.lock().unwrap().jwks.push(next.public_jwk());
    let t = fake2.token_with(&next, "github", "task-1", "jti-1");
    let verified = v2.verify(&t).await.unwrap();
    assert_eq!(verified.kid(), Some(next.kid()));
    // Known keys do not fetch again.
    let before = fake2.state.lock().unwrap().jwks_fetches;
    v2.verify(&t).await.unwrap();
    v2.verify(&fake2.token("task-2", "jti-2")).await.unwrap();
    assert_eq!(fake2.state.lock().unwrap().jwks_fetches, before);
}

/// A verification dropped while its refetch is under way (a resource
/// server's client went away) does not cancel the fetch: the keys it brings
/// are kept, so a client that kept dropping such requests could not keep a
/// withdrawn key trusted, or a new one refused.
#[tokio::test]
async fn a_key_refetch_outlives_the_verification_that_started_it() {
    let fake = Fake::start().await;
    let mut c = config(&fake, FEED_IDENTITY, Duration::from_secs(30));
    c.jwks_min_refetch = scrip_verifier::MIN_JWKS_REFETCH;
    let v = Verifier::discover(c).await.unwrap();
    tokio::time::sleep(scrip_verifier::MIN_JWKS_REFETCH + Duration::from_millis(100)).await;
    let (next, _) = SigningKey::generate(SigningAlgorithm::EdDSA).unwrap();
    {
        let mut s = fake.state.lock().unwrap();
        s.jwks.push(next.public_jwk());
        s.jwks_delay_ms = 300;
    }
    let t = fake.token_with(&next, "github", "task-1", "jti-1");
    let dropped = tokio::time::timeout(Duration::from_millis(100), v.verify(&t)).await;
    assert!(
        dropped.is_err(),
        "the verification is dropped during its fetch"
    );
    tokio::time::sleep(Duration::from_millis(400)).await;
    fake.state.lock().unwrap().jwks_delay_ms = 0;
    // Within `jwks_min_refetch` of that attempt: only its fetch can have
    // brought the key.
    let verified = v.verify(&t).await.unwrap();
    assert_eq!(verified.kid(), Some(next.kid()));
    assert_eq!(
        fake.state.lock().unwrap().jwks_fetches,
        2,
        "discovery's fetch and the dropped verification's"
    );
}

/// Keys whose JWKS cannot be fetched again are trusted for `jwks_max_age`
/// only: past it every token is refused, as the verifier's fault (503),
/// until a fetch succeeds. A key scrip withdrew does not verify for as long
/// as its JWKS is unreachable.
#[tokio::test]
async fn keys_that_cannot_be_refreshed_are_trusted_for_their_max_age_only() {
    let fake = Fake::start().await;
    let mut c = config(&fake, FEED_IDENTITY, Duration::from_secs(30));
    c.jwks_refresh = Duration::from_secs(1);
    c.jwks_min_refetch = Duration::from_secs(1);
    // Long enough that the checks before it land inside it on a loaded
    // machine.
    c.jwks_max_age = Duration::from_secs(6);
    let v = Verifier::discover(c.clone()).await.unwrap();
    // The keys were last fetched before this.
    let fetched = tokio::time::Instant::now();
    let t = fake.token("task-1", "jti-1");
    v.verify(&t).await.unwrap();
    fake.state.lock().unwrap().jwks_down = true;
    tokio::time::sleep(Duration::from_millis(1200)).await;
    v.verify(&t).await.unwrap();
    let fetches = fake.state.lock().unwrap().jwks_fetches;
    assert!(fetches >= 2, "no refresh was tried: {fetches}");
    tokio::time::sleep_until(fetched + Duration::from_millis(6_200)).await;
    let err = v.verify(&t).await.unwrap_err();
    assert_eq!(err, VerifyError::KeysStale);
    assert_eq!(
        err.rfc6750_code(),
        None,
        "the verifier's fault, not the token's"
    );
    fake.state.lock().unwrap().jwks_down = false;
    // Trusted again after the next refresh (every second).
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    while let Err(e) = v.verify(&t).await {
        assert!(tokio::time::Instant::now() < deadline, "{e:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A max age that one failed refresh would pass is refused.
    c.jwks_max_age = Duration::from_millis(1999);
    assert!(matches!(
        Verifier::discover(c).await.unwrap_err(),
        SetupError::Config(m) if m.contains("jwks_max_age")
    ));
}

#[tokio::test]
async fn the_verifier_checks_rfc9068_and_rfc8725() {
    let fake = Fake::start().await;
    let v = verifier(&fake).await;
    let now = now();
    let good = json!({
        "iss": fake.url, "sub": "agent", "aud": "github", "iat": now, "exp": now + 300,
        "jti": "j", "client_id": "agent", "scope": "read write", "txn": "t",
    });
    let check = |typ: &str, claims: serde_json::Value, key: &SigningKey| {
        let token = key.sign_jwt(typ, &claims).unwrap();
        let v = v.clone();
        async move { v.verify(&token).await.map(|t| t.actions().to_string()) }
    };
    assert_eq!(
        check("at+jwt", good.clone(), &fake.key).await,
        Ok("read write".into())
    );
    assert_eq!(
        check("application/at+jwt", good.clone(), &fake.key).await,
        Ok("read write".into())
    );
    let with = |k: &str, val: serde_json::Value| {
        let mut c = good.clone();
        c[k] = val;
        c
    };
    let without = |k: &str| {
        let mut c = good.clone();
        c.as_object_mut().unwrap().remove(k);
        c
    };
    let cases: Vec<(&str, serde_json::Value, VerifyError)> = vec![
        (
            "JWT",
            good.clone(),
            JoseError::WrongType {
                expected: "`at+jwt`".into(),
                found: "JWT".into(),
            }
            .into(),
        ),
        (
            "txntoken+jwt",
            good.clone(),
            JoseError::WrongType {
                expected: "`at+jwt`".into(),
                found: "txntoken+jwt".into(),
            }
            .into(),
        ),
        (
            "at+jwt",
            with("aud", json!("jira")),
            JoseError::WrongAudience.into(),
        ),
        (
            "at+jwt",
            with("iss", json!(format!("{}/", fake.url))),
            JoseError::WrongIssuer.into(),
        ),
        (
            "at+jwt",
            with("exp", json!(now - 120)),
            JoseError::Expired.into(),
        ),
        ("at+jwt", without("jti"), JoseError::BadClaims.into()),
        ("at+jwt", without("txn"), JoseError::BadClaims.into()),
        (
            "at+jwt",
            with("scope", json!("read  write")),
            VerifyError::BadScope,
        ),
    ];
    for (typ, claims, expected) in cases {
        assert_eq!(
            check(typ, claims.clone(), &fake.key).await,
            Err(expected),
            "{typ} {claims}"
        );
    }
    // A key scrip does not publish.
    let (other, _) = SigningKey::generate(SigningAlgorithm::ES256).unwrap();
    assert!(check("at+jwt", good.clone(), &other).await.is_err());
    // alg none.
    let none = format!(
        "{}.{}.",
        scrip_jose::b64(br#"{"alg":"none","typ":"at+jwt"}"#),
        scrip_jose::b64(good.to_string().as_bytes())
    );
    assert_eq!(
        v.verify(&none).await.unwrap_err(),
        VerifyError::Token(JoseError::AlgorithmNotAllowed("none".into()))
    );
    // A token verified (and kept) a moment ago: its header and claims under
    // another valid token's signature, of scrip's own key, are not it.
    let token = fake.key.sign_jwt("at+jwt", &good).unwrap();
    let other = fake
        .key
        .sign_jwt("at+jwt", &with("jti", json!("k")))
        .unwrap();
    assert!(v.verify(&token).await.is_ok());
    let (signed, own) = token.rsplit_once('.').unwrap();
    let (_, sig) = other.rsplit_once('.').unwrap();
    assert_ne!(own, sig);
    assert_eq!(
        v.verify(&format!("{signed}.{sig}")).await.unwrap_err(),
        VerifyError::Token(JoseError::BadSignature)
    );
    assert!(v.verify(&token).await.is_ok());
}

/// A feed whose pages are released one at a time by the test.
#[derive(Debug)]
struct GatedFeed {
    pages: Vec<serde_json::Value>,
    gate: tokio::sync::Semaphore,
    served: std::sync::atomic::AtomicUsize,
}

impl scrip_verifier::FeedSource for GatedFeed {
    fn page(&self, after: u64, _wait: Duration) -> scrip_verifier::PageFuture<'_> {
        Box::pin(async move {
            self.gate
                .acquire()
                .await
                .map_err(|e| e.to_string())?
                .forget();
            self.served
                .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            // Page i has cursor i + 1; past the last, an empty page.
            let i = usize::try_from(after).unwrap();
            let page = self
                .pages
                .get(i)
                .cloned()
                .unwrap_or_else(|| json!({"cursor": after, "events": []}));
            Ok(serde_json::to_vec(&page).unwrap())
        })
    }

    fn claim_once<'a>(&'a self, _token: &'a str) -> scrip_verifier::ClaimFuture<'a> {
        Box::pin(async { Err("this feed claims nothing".to_owned()) })
    }
}

#[tokio::test]
async fn a_local_verifier_returns_at_once_and_refuses_until_every_page_is_read() {
    let fake = Fake::start().await;
    let far = now() + 300;
    let feed = Arc::new(GatedFeed {
        pages: vec![
            json!({"cursor": 1, "events": [{"type": "task", "txn": "task-1", "exp": far}]}),
            json!({"cursor": 2, "events": [{"type": "task", "txn": "task-2", "exp": far}]}),
        ],
        gate: tokio::sync::Semaphore::new(0),
        served: std::sync::atomic::AtomicUsize::new(0),
    });
    let keys = scrip_jose::SharedKeySet::new(
        scrip_jose::KeySet::from_public_jwks(&[fake.key.public_jwk()]).unwrap(),
    );
    let mut config = config(&fake, FEED_IDENTITY, Duration::from_secs(30));
    config.leeway = 0;
    // Returns with no page read: a big revocation set does not hold up start.
    let v = Verifier::local(config, keys, feed.clone()).await.unwrap();
    assert!(!v.is_ready());
    let t2 = fake.token("task-2", "jti-2");
    let t3 = fake.token("task-3", "jti-3");
    assert_eq!(
        v.verify(&t3).await.unwrap_err(),
        VerifyError::RevocationStale
    );

    // The first page is fresh, but task-2 is revoked on the next one: still
    // nothing is accepted.
    feed.gate.add_permits(1);
    assert!(
        eventually(5, || async {
            feed.served.load(std::sync::atomic::Ordering::SeqCst) >= 1
        })
        .await
    );
    tokio::time::sleep(Duration::from_millis(50)).await;
    assert!(!v.is_ready());
    assert_eq!(
        v.verify(&t2).await.unwrap_err(),
        VerifyError::RevocationStale
    );
    assert_eq!(
        v.verify(&t3).await.unwrap_err(),
        VerifyError::RevocationStale
    );

    // The second page, then the empty one that ends the first read.
    feed.gate.add_permits(2);
    assert!(
        eventually(5, || async { v.is_ready() }).await,
        "never caught up"
    );
    assert_eq!(v.verify(&t2).await.unwrap_err(), VerifyError::Revoked);
    assert_eq!(v.verify(&t3).await.unwrap().task(), "task-3");
    feed.gate.close();
}

/// A leeway past scrip's largest `clock_skew` would accept a revoked token
/// scrip no longer lists: refused.
#[tokio::test]
async fn a_leeway_past_the_largest_clock_skew_is_refused() {
    let fake = Fake::start().await;
    for (leeway, dpop_leeway, ok) in [(300, 300, true), (301, 30, false), (30, 301, false)] {
        let mut c = config(&fake, FEED_IDENTITY, Duration::from_secs(30));
        c.leeway = leeway;
        c.dpop_leeway = dpop_leeway;
        match Verifier::discover(c).await {
            Ok(_) => assert!(ok, "{leeway}/{dpop_leeway} accepted"),
            Err(e) => assert!(
                !ok && matches!(&e, SetupError::Config(m) if m.contains("at most 300 s")),
                "{leeway}/{dpop_leeway}: {e:?}"
            ),
        }
    }
}

/// A long-poll under a second would be answered at once (the feed takes
/// whole seconds), and a follower that had caught up would poll without
/// pause: such a wait is refused.
/// A page shows the revocations as of when it was asked for, so an idle
/// long poll leaves them `wait` old and the next answer up to twice that:
/// a `max_staleness` that would not hold twice the wait is refused.
#[tokio::test]
async fn a_staleness_bound_under_twice_the_wait_is_refused() {
    let fake = Fake::start().await;
    for (secs, ok) in [(1, false), (2, false), (3, true)] {
        let c = config(&fake, FEED_IDENTITY, Duration::from_secs(secs));
        match Verifier::discover(c).await {
            Ok(_) => assert!(ok, "max_staleness {secs} s with a 1 s wait was accepted"),
            Err(e) => assert!(
                !ok && matches!(&e, SetupError::Config(m) if m.contains("exceed twice the feed wait")),
                "{secs} s: {e:?}"
            ),
        }
    }
}

#[tokio::test]
async fn a_feed_wait_under_a_second_is_refused() {
    let fake = Fake::start().await;
    for (wait, ok) in [(0, false), (999, false), (1000, true)] {
        let mut c = config(&fake, FEED_IDENTITY, Duration::from_secs(30));
        if let Revocation::Follow(feed) = &mut c.revocation {
            feed.wait = Duration::from_millis(wait);
        }
        match Verifier::discover(c).await {
            Ok(_) => assert!(ok, "a wait of {wait} ms was accepted"),
            Err(e) => assert!(
                !ok && matches!(&e, SetupError::Config(m) if m.contains("1 to 30 s")),
                "{wait} ms: {e:?}"
            ),
        }
    }
}
