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

/// A commit is durable when it returns, whatever the database's default:
/// with `synchronous_commit = off` set on the database (a common tuning),
/// the writer's transactions still wait for the WAL flush.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commits_wait_for_the_wal_flush_whatever_the_default() {
    use sqlx::Connection as _;
    let db = PgDatabase::new();
    let mut admin = sqlx::PgConnection::connect(db.url()).await.unwrap();
    sqlx::query(
        "DO $$ BEGIN EXECUTE format('ALTER DATABASE %I SET synchronous_commit = off', current_database()); END $$",
    )
    .execute(&mut admin)
    .await
    .unwrap();
    let store = PgStore::connect(db.url()).await.unwrap();
    let mut other = sqlx::PgConnection::connect(db.url()).await.unwrap();
    let default: String = sqlx::query_scalar("SHOW synchronous_commit")
        .fetch_one(&mut other)
        .await
        .unwrap();
    assert_eq!(default, "off", "the database's default was not changed");
    sqlx::raw_sql(
        "CREATE TABLE seen_sync (v text); \
         CREATE FUNCTION note_sync() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN INSERT INTO seen_sync VALUES (current_setting('synchronous_commit')); RETURN NULL; END $$; \
         CREATE TRIGGER note_sync AFTER INSERT ON audit FOR EACH STATEMENT EXECUTE FUNCTION note_sync();",
    )
    .execute(&mut other)
    .await
    .unwrap();
    store
        .commit(vec![Write::Audit(Box::new(scrip_store::AuditEvent {
            event: "test.record".into(),
            ..scrip_store::AuditEvent::default()
        }))])
        .await
        .unwrap();
    let seen: Vec<String> = sqlx::query_scalar("SELECT v FROM seen_sync")
        .fetch_all(&mut other)
        .await
        .unwrap();
    assert!(!seen.is_empty());
    assert!(seen.iter().all(|v| v == "on"), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_replicas_revocation_reaches_this_one_by_notification() {
    let db = PgDatabase::new();
    let a = PgStore::connect(db.url()).await.unwrap();
    let b = PgStore::connect(db.url()).await.unwrap();
    let mut changes = b.changes();
    until_listening(&a, &mut changes, "at first").await;
    // Usually milliseconds; 3 s allows for a loaded machine and is still
    // shorter than the listener's heartbeat (5 s quiet, then a 2 s check)
    // would take to notice a lost connection and bump the caches. Each is
    // a notification: the revocation counter alone moves (a refresh, as
    // while not listening, moves every counter).
    for i in 0..5 {
        let before = *changes.borrow_and_update();
        a.commit(vec![revoke(&format!("j{i}"))]).await.unwrap();
        tokio::time::timeout(Duration::from_secs(3), changes.changed())
            .await
            .expect("no notification within 3 s")
            .unwrap();
        let now = *changes.borrow_and_update();
        assert!(
            now.keys == before.keys && now.revocations > before.revocations,
            "not a notification: {before:?} then {now:?}"
        );
        assert!(b.token_revoked(&format!("j{i}")).await.unwrap());
    }
}

/// Returns once `changes` (B's) hears `a`'s revocations by notification:
/// `a` commits until the revocation counter alone moves (while B's listener
/// connects, or when it has lost its connection, every counter moves at
/// once). A notification counted while the listener still waits for its
/// own first check (at most 2 s) is followed by that check's refresh of
/// every counter: once the check is surely over, B is shown listening
/// again.
async fn until_listening(
    a: &PgStore,
    changes: &mut tokio::sync::watch::Receiver<scrip_store::Changes>,
    what: &str,
) {
    for round in ["", " (settled)"] {
        let deadline = Instant::now() + Duration::from_secs(15);
        for i in 0.. {
            assert!(
                Instant::now() < deadline,
                "B is not listening {what}{round}"
            );
            let before = *changes.borrow_and_update();
            a.commit(vec![revoke(&format!("{what}{round}-{i}"))])
                .await
                .unwrap();
            if tokio::time::timeout(Duration::from_secs(1), changes.changed())
                .await
                .is_ok()
            {
                let now = *changes.borrow_and_update();
                if now.keys == before.keys && now.revocations > before.revocations {
                    break;
                }
            }
        }
        if round.is_empty() {
            tokio::time::sleep(Duration::from_secs(3)).await;
        }
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
    until_listening(&a, &mut changes, "at first").await;

    // The connection B listens on goes silent, as behind a NAT that forgot
    // it: no reset, nothing arrives. A's revocations no longer reach B, so
    // B must notice and drop what it cached: every counter moves, the key
    // counter too (which no notification of a revocation moves).
    gate.stall();
    let seen = *changes.borrow_and_update();
    a.commit(vec![revoke("unheard")]).await.unwrap();
    let started = Instant::now();
    let noticed = tokio::time::timeout(Duration::from_secs(15), async {
        while changes.changed().await.is_ok() {
            if changes.borrow_and_update().keys > seen.keys {
                return true;
            }
        }
        false
    })
    .await;
    assert_eq!(
        noticed,
        Ok(true),
        "a silent notification connection went unnoticed"
    );
    assert!(
        started.elapsed() >= Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    // And B listens again, on a new connection.
    until_listening(&a, &mut changes, "again").await;
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

/// Reads held by a lock (a migration, a `VACUUM FULL`) time out and keep
/// their connections for a while (`SETTLE`, 30 s), then close them, and
/// the database ends what each closed one was waiting for (it checks every
/// second for a client gone): reads timing out the whole time a lock lasts
/// do not pile sessions up to the database's connection limit; once the
/// lock is gone reads go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_held_by_a_lock_do_not_pile_up_sessions() {
    use sqlx::Connection as _;
    let db = PgDatabase::new();
    let store = Arc::new(PgStore::connect(db.url()).await.unwrap());
    store.commit(vec![revoke("before")]).await.unwrap();
    let mut holder = sqlx::PgConnection::connect(db.url()).await.unwrap();
    let mut admin = sqlx::PgConnection::connect(db.url()).await.unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE revoked_tokens IN ACCESS EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .unwrap();
    // More reads than the pool's 8 connections.
    let reads = || -> Vec<_> {
        (0..10)
            .map(|_| {
                let store = store.clone();
                tokio::spawn(async move { store.token_revoked("before").await })
            })
            .collect()
    };
    let timed_out = |reads: Vec<tokio::task::JoinHandle<Result<bool, StoreError>>>| async move {
        for read in reads {
            let err = read.await.unwrap().unwrap_err();
            assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        }
    };
    timed_out(reads()).await;
    // Past the time their connections are kept: closed, and new ones
    // opened for the next reads, while the closed ones' waits end.
    tokio::time::sleep(Duration::from_secs(32)).await;
    let more = reads();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let sessions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()",
    )
    .fetch_one(&mut admin)
    .await
    .unwrap();
    timed_out(more).await;
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .unwrap();
    // The pool's 8, the writer, the listener, the holder and this one.
    assert!(sessions <= 12, "{sessions} sessions");
    let deadline = Instant::now() + Duration::from_secs(10);
    while store.token_revoked("before").await.is_err() {
        assert!(Instant::now() < deadline, "reads did not go on");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Reads cut off by a database gone silent (their connections stalled: a
/// host failed over, a link cut without a reset) give their connections
/// up once they have not answered for a while (`SETTLE`, 30 s): the pool
/// opens new ones and reads go on, though more reads timed out than it
/// holds connections. (Handed back, each waited for TCP to give up, many
/// minutes, and every read failed meanwhile.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_cut_off_by_a_silent_database_give_their_connections_up() {
    use sqlx::Connection as _;
    let db = PgDatabase::new();
    let gate = Gate::start("127.0.0.1:5432".parse().unwrap()).await;
    let url = db.url().replace("127.0.0.1:5432", &gate.addr().to_string());
    let store = Arc::new(PgStore::connect(&url).await.unwrap());
    store.commit(vec![revoke("before")]).await.unwrap();
    // Every connection of the pool busy with a read held by a lock, when
    // the link goes silent.
    let mut holder = sqlx::PgConnection::connect(db.url()).await.unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE revoked_tokens IN ACCESS EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .unwrap();
    let reads: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.token_revoked("before").await })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(1)).await;
    gate.stall();
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .unwrap();
    let cut_off = Instant::now();
    for read in reads {
        let err = read.await.unwrap().unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while store.token_revoked("before").await.is_err() {
        assert!(
            Instant::now() < deadline,
            "no read went on in {:?}",
            cut_off.elapsed()
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// A command that only reads the store, started while the database holds
/// its migrations table (here a lock, as a stalled server or pooler holds
/// every query), fails within its time and says why, rather than wait.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_start_the_database_does_not_answer_fails_in_time() {
    use sqlx::Connection as _;
    let db = PgDatabase::new();
    drop(PgStore::connect(db.url()).await.unwrap());
    let mut holder = sqlx::PgConnection::connect(db.url()).await.unwrap();
    sqlx::raw_sql("BEGIN; LOCK TABLE _sqlx_migrations IN ACCESS EXCLUSIVE MODE")
        .execute(&mut holder)
        .await
        .unwrap();
    let started = Instant::now();
    let opened = tokio::time::timeout(
        Duration::from_secs(60),
        PgStore::connect_as(db.url(), scrip_store::Schema::Require),
    )
    .await;
    sqlx::raw_sql("ROLLBACK")
        .execute(&mut holder)
        .await
        .unwrap();
    let Ok(Err(StoreError::Open(e))) = opened else {
        panic!("waited {:?} and did not fail", started.elapsed());
    };
    assert!(
        e.contains("did not answer which migrations it has in time"),
        "{e}"
    );
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

/// The store's own connections to a database on another host must be
/// checked TLS, or an explicit choice: libpq's default (`prefer`) and
/// `allow` are refused before anything is sent, since whoever can rewrite
/// the link could approve a step or hide a revocation.
#[tokio::test]
async fn a_database_elsewhere_needs_a_link_that_is_checked_or_chosen() {
    for query in ["", "?sslmode=prefer", "?sslmode=allow"] {
        let url = format!("postgres://scrip:hunter2@db.invalid:5432/scrip{query}");
        let Err(StoreError::Open(e)) = PgStore::connect(&url).await else {
            panic!("{url}: not refused");
        };
        assert!(e.contains("is not on this host"), "{e}");
        assert!(e.contains("sslmode=verify-full"), "{e}");
        assert!(!e.contains("hunter2"), "{e}");
    }
    // A parameter the driver would ignore is refused, named, its value
    // never shown (the driver itself would log it).
    let url = "postgres://scrip@127.0.0.1:5432/scrip?sslmode=verify-full&sslpassword=hunter2";
    let Err(StoreError::Open(e)) = PgStore::connect(url).await else {
        panic!("{url}: not refused");
    };
    assert!(e.contains("the parameter `sslpassword` is not one"), "{e}");
    assert!(!e.contains("hunter2"), "{e}");
    for url in [
        "postgres://scrip@127.0.0.1:5432/scrip?host=a&host=b",
        "postgres://scrip@127.0.0.1:5432/scrip?host=a,b",
    ] {
        let Err(StoreError::Open(e)) = PgStore::connect(url).await else {
            panic!("{url}: not refused");
        };
        assert!(e.contains("names one server"), "{e}");
    }
    // The address the driver would dial whatever the host says, while
    // scrip judges the link by the host: alone (the host then `localhost`,
    // taken as this host) or beside one.
    for url in [
        "postgres:///scrip?hostaddr=203.0.113.5",
        "postgres://scrip@127.0.0.1/scrip?hostaddr=203.0.113.5",
        "postgres://scrip@db.invalid/scrip?sslmode=verify-full&hostaddr=10.0.0.5",
        "postgres:///scrip?sslmode=verify-full&host=db.invalid&hostaddr=10.0.0.5",
    ] {
        let Err(StoreError::Open(e)) = PgStore::connect(url).await else {
            panic!("{url}: not refused");
        };
        assert!(e.contains("scrip does not take `hostaddr`"), "{url}: {e}");
    }
    // Two names for one server, of which the driver would keep the last.
    for url in [
        "postgres://scrip@db-a.invalid/scrip?sslmode=verify-full&host=db-b.invalid",
        "postgres://scrip@127.0.0.1:5432/scrip?port=5433",
    ] {
        let Err(StoreError::Open(e)) = PgStore::connect(url).await else {
            panic!("{url}: not refused");
        };
        assert!(e.contains("the driver keeps only the last"), "{url}: {e}");
    }
    // Chosen modes go on to connect (and fail here only because nothing
    // listens there: port 1 of this host, by an address that is not
    // loopback).
    for mode in ["verify-full", "verify-ca", "require", "disable"] {
        let url = format!("postgres://scrip@0.0.0.0:1/scrip?sslmode={mode}");
        let Err(StoreError::Open(e)) = PgStore::connect(&url).await else {
            panic!("{url}: connected");
        };
        assert!(!e.contains("is not on this host"), "{mode}: {e}");
        assert!(e.contains("Connection refused"), "{mode}: {e}");
    }
}

/// The client's private key is refused when others may read it, by
/// libpq's rule (the driver reads it without a look at its mode): its owner
/// alone, or for a key root owns its group too.
#[tokio::test]
async fn a_client_key_others_can_read_is_refused() {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("client.key");
    std::fs::write(&key, "not read here").unwrap();
    let url = |name: &str, cert: bool| {
        let cert = if cert {
            "&sslcert=/nonexistent/client.crt"
        } else {
            ""
        };
        format!(
            "postgres://scrip@0.0.0.0:1/scrip?sslmode=verify-full{cert}&{name}={}",
            key.display()
        )
    };
    // Taken, and then fails here only because nothing listens there.
    let taken = |mode: u32| {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let url = url("sslkey", true);
        async move {
            let Err(StoreError::Open(e)) = PgStore::connect(&url).await else {
                panic!("connected");
            };
            assert!(!e.contains("client key"), "{mode:o}: {e}");
        }
    };
    let refused = |mode: u32, name: &'static str| {
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(mode)).unwrap();
        let url = url(name, true);
        async move {
            let Err(StoreError::Open(e)) = PgStore::connect(&url).await else {
                panic!("{mode:o}: connected");
            };
            assert!(
                e.contains("which lets others read or change it"),
                "{mode:o}: {e}"
            );
        }
    };
    // Whoever owns it: not for all to read, nor for its group to change.
    for mode in [0o644, 0o604, 0o660, 0o620] {
        refused(mode, "sslkey").await;
        refused(mode, "ssl-key").await;
    }
    taken(0o600).await;
    taken(0o400).await;
    let owner = std::fs::metadata(&key).unwrap().uid();
    let root_owned = |mode| async move {
        if owner == 0 {
            taken(mode).await
        } else {
            refused(mode, "sslkey").await
        }
    };
    // Read by the group: only a key root owns.
    root_owned(0o640).await;
    root_owned(0o440).await;
    if rustix::process::geteuid().is_root() {
        std::os::unix::fs::chown(&key, Some(65534), None).unwrap();
        refused(0o640, "sslkey").await;
        taken(0o600).await;
        std::os::unix::fs::chown(&key, Some(0), None).unwrap();
    }
    // Without a client certificate, or without TLS, the driver sends no
    // key: not looked at.
    std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
    for url in [
        url("sslkey", false),
        url("sslkey", true).replace("sslmode=verify-full", "sslmode=disable"),
    ] {
        let Err(StoreError::Open(e)) = PgStore::connect(&url).await else {
            panic!("connected");
        };
        assert!(!e.contains("client key"), "{url}: {e}");
    }
    // One that is not there is named, not left to the first connection.
    std::fs::remove_file(&key).unwrap();
    let Err(StoreError::Open(e)) = PgStore::connect(&url("sslkey", true)).await else {
        panic!("connected");
    };
    assert!(e.contains("cannot be read"), "{e}");
}

/// scrip speaks TLS to PostgreSQL and checks the server's certificate:
/// with the server's own certificate as the trusted root, every one of the
/// store's connections is encrypted; without it (the public roots only),
/// the server is refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_shared_store_checks_the_servers_certificate() {
    let db = PgDatabase::new();
    assert_eq!(
        db.execute("SHOW ssl"),
        "on",
        "the tests' PostgreSQL must have ssl on (Debian's package does, with its snakeoil certificate)"
    );
    let cert = db.execute("SHOW ssl_cert_file");
    // `verify-ca` checks the chain, not the name, so the address stays
    // 127.0.0.1: `localhost` may resolve to ::1 first, which Debian's
    // pg_hba.conf asks a password of.
    let tls = |query: &str| format!("{}?{query}", db.url());

    let Err(err) = PgStore::connect(&tls("sslmode=verify-ca")).await else {
        panic!("a server no trusted root vouches for was accepted");
    };
    assert!(matches!(err, StoreError::Open(_)), "{err:?}");

    let store = PgStore::connect(&tls(&format!("sslmode=verify-ca&sslrootcert={cert}")))
        .await
        .unwrap();
    store.commit(vec![revoke("over-tls")]).await.unwrap();
    assert!(store.token_revoked("over-tls").await.unwrap());
    let name = db.url().rsplit('/').next().unwrap().to_owned();
    let links = db.execute(&format!(
        "SELECT count(*), count(*) FILTER (WHERE s.ssl) FROM pg_stat_activity a \
         JOIN pg_stat_ssl s USING (pid) WHERE a.datname = '{name}' AND a.application_name = 'scrip'"
    ));
    let (all, encrypted) = links.split_once('|').unwrap();
    assert!(all.parse::<u32>().unwrap() >= 2, "{links}");
    assert_eq!(all, encrypted, "connections without TLS: {links}");
}

/// A TLS file rewritten in place (a rotated client certificate, a CA) is
/// read again: by the writer's next connection and, within 10 s, by the
/// reads' (the driver alone keeps what it first read until a restart, and
/// a rotated client certificate would expire under a running replica).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tls_file_rewritten_in_place_is_read_again() {
    let db = PgDatabase::new();
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("db-ca.pem");
    let server_cert = std::fs::read(db.execute("SHOW ssl_cert_file")).unwrap();
    std::fs::write(&root, &server_cert).unwrap();
    let store = PgStore::connect(&format!(
        "{}?sslmode=verify-ca&sslrootcert={}",
        db.url(),
        root.display()
    ))
    .await
    .unwrap();
    store.commit(vec![revoke("before")]).await.unwrap();
    let name = db.url().rsplit('/').next().unwrap().to_owned();
    // Every connection of the store's cut, so that the next ones are new.
    let cut = || {
        db.execute(&format!(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity \
             WHERE datname = '{name}' AND application_name = 'scrip'"
        ))
    };
    // Until both a write and a read answer `ok` (or both not), within 30 s.
    let settles_to = |ok: bool| {
        let (store, cut) = (&store, &cut);
        async move {
            let deadline = Instant::now() + Duration::from_secs(30);
            let mut n = 0;
            loop {
                cut();
                n += 1;
                let wrote = store.commit(vec![revoke(&format!("w{ok}{n}"))]).await;
                let read = store.token_revoked("before").await;
                if wrote.is_ok() == ok && read.is_ok() == ok {
                    return;
                }
                assert!(
                    Instant::now() < deadline,
                    "after 30 s: write {wrote:?}, read {read:?} (wanted ok: {ok})"
                );
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    };
    // Rotated to CAs that do not vouch for this server: refused.
    std::fs::write(
        &root,
        std::fs::read("/etc/ssl/certs/ca-certificates.crt").unwrap(),
    )
    .unwrap();
    settles_to(false).await;
    // Back: the store answers again, on new connections.
    std::fs::write(&root, &server_cert).unwrap();
    settles_to(true).await;
    assert!(store.token_revoked("before").await.unwrap());
}

/// The server closes the store's connections (a restart, a failover, an
/// idle timeout): the next commit is not lost to the dead write
/// connection, since nothing of it was sent there; it goes through a new
/// one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_connection_the_server_closed_is_replaced_without_failing_a_commit() {
    use sqlx::Connection as _;
    let db = PgDatabase::new();
    let store = PgStore::connect(db.url()).await.unwrap();
    store.commit(vec![revoke("before")]).await.unwrap();
    let mut admin = sqlx::PgConnection::connect(db.url()).await.unwrap();
    let closed: Vec<(i32, bool)> = sqlx::query_as(
        "SELECT pid, pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = current_database() AND pid <> pg_backend_pid()",
    )
    .fetch_all(&mut admin)
    .await
    .unwrap();
    assert!(
        !closed.is_empty() && closed.iter().all(|(_, c)| *c),
        "{closed:?}"
    );
    // Those backends are gone once they no longer show (the store's
    // listener may already have connected again).
    let pids: Vec<i32> = closed.iter().map(|(p, _)| *p).collect();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (left,): (i64,) =
            sqlx::query_as("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)")
                .bind(&pids)
                .fetch_one(&mut admin)
                .await
                .unwrap();
        if left == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "{left} connections still open");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    store.commit(vec![revoke("after")]).await.unwrap();
    assert!(store.token_revoked("after").await.unwrap());
}
