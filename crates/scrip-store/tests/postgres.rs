//! What only a shared store has to do: tell replicas of each other's
//! changes, keep a feed cursor exact with several writers, and fail closed
//! while the database is unreachable, recovering by itself.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use scrip_store::{PgStore, Store, StoreError, Write};
use scrip_testkit::{Gate, PgDatabase};

fn revoke(jti: &str) -> Write {
    Write::RevokeToken {
        jti: jti.into(),
        task_id: "t".into(),
        expires_at: u64::MAX / 2,
        at: 1_000,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replicas_revocation_reaches_this_one_by_notification() {
    let db = PgDatabase::new();
    let a = PgStore::connect(db.url()).await.unwrap();
    let b = PgStore::connect(db.url()).await.unwrap();
    let mut changes = b.changes();
    // Let the listener settle (its first connection bumps the counters).
    tokio::time::sleep(Duration::from_millis(300)).await;
    changes.borrow_and_update();
    // Usually milliseconds; 3 s allows for a loaded machine and is still
    // shorter than the listener's heartbeat (5 s quiet, then a 2 s check)
    // would take to notice a lost connection and bump the caches.
    for i in 0..5 {
        a.commit(vec![revoke(&format!("j{i}"))]).await.unwrap();
        tokio::time::timeout(Duration::from_secs(3), changes.changed())
            .await
            .expect("no notification within 3 s")
            .unwrap();
        changes.borrow_and_update();
        assert!(b.token_revoked(&format!("j{i}")).await.unwrap());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_notification_connection_gone_silent_is_noticed_and_replaced() {
    let db = PgDatabase::new();
    let gate = Gate::start("127.0.0.1:5432".parse().unwrap()).await;
    let a = PgStore::connect(db.url()).await.unwrap();
    let b = PgStore::connect(&db.url().replace("127.0.0.1:5432", &gate.addr().to_string()))
        .await
        .unwrap();
    let mut changes = b.changes();
    let heard = |changes: &mut tokio::sync::watch::Receiver<scrip_store::Changes>, within| {
        let mut changes = changes.clone();
        async move {
            tokio::time::timeout(within, changes.changed())
                .await
                .is_ok()
        }
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    changes.borrow_and_update();
    a.commit(vec![revoke("before")]).await.unwrap();
    assert!(
        heard(&mut changes, Duration::from_secs(1)).await,
        "not listening"
    );
    tokio::time::sleep(Duration::from_millis(200)).await;
    changes.borrow_and_update();

    // The connection B listens on goes silent, as behind a NAT that forgot
    // it: no reset, nothing arrives. A's revocations no longer reach B, so
    // B must notice and drop what it cached: every counter moves.
    gate.stall();
    a.commit(vec![revoke("unheard")]).await.unwrap();
    let started = Instant::now();
    assert!(
        heard(&mut changes, Duration::from_secs(15)).await,
        "a silent notification connection went unnoticed"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    // And B listens again, on a new connection.
    tokio::time::sleep(Duration::from_secs(1)).await;
    changes.borrow_and_update();
    a.commit(vec![revoke("after")]).await.unwrap();
    assert!(
        heard(&mut changes, Duration::from_secs(2)).await,
        "not listening again"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_cursor_skips_nothing_with_several_writers() {
    let db = PgDatabase::new();
    let writers: Vec<Arc<PgStore>> = vec![
        Arc::new(PgStore::connect(db.url()).await.unwrap()),
        Arc::new(PgStore::connect(db.url()).await.unwrap()),
        Arc::new(PgStore::connect(db.url()).await.unwrap()),
    ];
    let reader = PgStore::connect(db.url()).await.unwrap();
    let total = 300;
    let mut handles = Vec::new();
    for i in 0..total {
        let w = writers[i % 3].clone();
        handles.push(tokio::spawn(async move {
            w.commit(vec![revoke(&format!("j{i}"))]).await
        }));
    }
    // Follow the feed while the writers race.
    let mut cursor = 0;
    let mut seen = std::collections::HashSet::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    while seen.len() < total && Instant::now() < deadline {
        for r in reader.revocations(cursor, 0, 7).await.unwrap() {
            assert!(r.seq > cursor);
            cursor = r.seq;
            assert!(seen.insert(r.jti.unwrap()), "seen twice");
        }
    }
    for h in handles {
        h.await.unwrap().unwrap();
    }
    assert_eq!(seen.len(), total, "the cursor skipped revocations");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_database_fails_closed_and_recovers_by_itself() {
    let db = PgDatabase::new();
    let gate = Gate::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = db.url().replace("127.0.0.1:5432", &gate.addr().to_string());
    let store = PgStore::connect(&url).await.unwrap();
    store.commit(vec![revoke("before")]).await.unwrap();

    gate.shut();
    let started = Instant::now();
    let err = store.commit(vec![revoke("during")]).await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    let err = store.token_revoked("before").await.unwrap_err();
    assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    assert!(started.elapsed() < Duration::from_secs(12), "fails fast");

    gate.open();
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match store.commit(vec![revoke("after")]).await {
            Ok(()) => break,
            Err(e) if Instant::now() < deadline => {
                assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("did not recover: {e}"),
        }
    }
    assert!(store.token_revoked("before").await.unwrap());
    assert!(
        !store.token_revoked("during").await.unwrap(),
        "nothing half-written"
    );
    assert!(store.token_revoked("after").await.unwrap());
    let rows = store.audit_rows(0, u32::MAX).await.unwrap();
    let checkpoints = store.latest_checkpoints().await.unwrap();
    let report = scrip_store::verify(&rows, &checkpoints, |_| true);
    assert!(report.problems.is_empty(), "{:?}", report.problems);
}
