//! Tamper evidence of the audit trail, against the SQLite store: records are
//! committed through the `Store` trait, the database file is then edited
//! behind the store's back with plain SQL, and verification (the store's
//! `Verifier`, with no server involved) must name the record concerned.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use scrip_jose::{SigningAlgorithm, SigningKey};
use scrip_store::{
    AuditEvent, Checkpoint, Problem, Report, SqliteStore, Store, StoredRecord, Verifier, Write,
    hash,
};
use sqlx::{ConnectOptions as _, Connection as _};

/// A database file in a fresh temporary directory.
struct Db {
    _dir: tempfile::TempDir,
    path: PathBuf,
    key: SigningKey,
}

impl Db {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scrip.db");
        let (key, _) = SigningKey::generate(SigningAlgorithm::EdDSA).unwrap();
        Self {
            _dir: dir,
            path,
            key,
        }
    }

    async fn open(&self) -> SqliteStore {
        SqliteStore::open(&self.path).await.unwrap()
    }

    /// A raw connection to the file, to tamper with it.
    async fn sql(&self) -> sqlx::SqliteConnection {
        sqlx::sqlite::SqliteConnectOptions::new()
            .filename(&self.path)
            .connect()
            .await
            .unwrap()
    }

    async fn exec(&self, statement: &str) {
        let mut conn = self.sql().await;
        sqlx::query(sqlx::AssertSqlSafe(statement.to_owned()))
            .execute(&mut conn)
            .await
            .unwrap();
        conn.close().await.unwrap();
    }

    /// Every stored row, in global order.
    async fn rows(&self) -> Vec<StoredRecord> {
        let store = self.open().await;
        store.audit_rows(0, u32::MAX).await.unwrap()
    }

    /// Verifies the file as `scrip audit verify` does, with the store's
    /// streaming verifier, in pages of 3 rows so that paging is exercised.
    async fn verify(&self) -> Report {
        self.verify_signed(None).await
    }

    /// As [`Db::verify`], also requiring records written more than `grace`
    /// ms away from `now` to be covered by a signed checkpoint.
    async fn verify_signed(&self, signed: Option<(u64, u64)>) -> Report {
        let store = self.open().await;
        let jwk = self.key.public_jwk();
        scrip_store::verify_store(&store, signed, 3, |c: &Checkpoint| {
            let message = Checkpoint::message(&c.chain_id, c.chain_seq, &c.hash, c.at_ms);
            scrip_jose::verify_detached(&jwk, &message, &c.signature)
        })
        .await
        .unwrap()
    }

    /// Signs and commits a checkpoint of `store`'s chain head.
    async fn checkpoint(&self, store: &SqliteStore) -> Checkpoint {
        let head = store.chain_head().expect("the chain has a head");
        let at_ms = 1_700_000_000_000;
        let message = Checkpoint::message(&head.chain_id, head.chain_seq, &head.hash, at_ms);
        let c = Checkpoint {
            chain_id: head.chain_id,
            chain_seq: head.chain_seq,
            hash: head.hash,
            at_ms,
            signature: self.key.sign_detached(&message).unwrap(),
        };
        store
            .commit(vec![Write::Checkpoint(Box::new(c.clone()))])
            .await
            .unwrap();
        c
    }
}

/// An audit record as the server would write it.
fn event(n: usize, replica: &str) -> AuditEvent {
    AuditEvent {
        at_ms: 1_700_000_000_000 + n as u64,
        event: "token.issued".into(),
        decision: Some("allow".into()),
        agent_iss: Some("https://issuer.example".into()),
        agent_sub: Some("system:serviceaccount:agents:coder".into()),
        task_id: Some(format!("task-{replica}-{n}")),
        tool: Some("github".into()),
        actions: Some("read".into()),
        jti: Some(format!("jti-{replica}-{n}")),
        replica: replica.into(),
        ..AuditEvent::default()
    }
}

/// Commits `count` records, one commit each, numbered from `from`.
async fn commit_events(store: &SqliteStore, replica: &str, from: usize, count: usize) {
    for n in from..from + count {
        store
            .commit(vec![Write::Audit(Box::new(event(n, replica)))])
            .await
            .unwrap();
    }
}

/// A store with one chain: `chain.started` (seq 1) and 10 records (seq 2 to
/// 11, chain positions 2 to 11), the head checkpointed.
async fn one_chain() -> Db {
    let db = Db::new();
    let store = db.open().await;
    commit_events(&store, "r1", 1, 10).await;
    db.checkpoint(&store).await;
    db
}

fn assert_clean(report: &Report) {
    assert!(report.problems.is_empty(), "{:#?}", report.problems);
}

/// The problems naming the record with global sequence number `seq`.
fn naming(report: &Report, seq: i64) -> Vec<&Problem> {
    report
        .problems
        .iter()
        .filter(|p| p.seq == Some(seq))
        .collect()
}

fn assert_names(report: &Report, seq: i64, words: &str) {
    let found = naming(report, seq);
    assert!(
        found.iter().any(|p| p.what.contains(words)),
        "no problem naming record {seq} with {words:?}: {:#?}",
        report.problems
    );
}

/// Sets `seq` of the rows at or after `from` to `seq + by` (and their
/// `chain_seq` too when `chain` is set) without colliding with the unique
/// constraints on the way.
async fn shift(db: &Db, from: i64, by: i64, chain: bool) {
    let cs = if chain {
        ", chain_seq = -chain_seq"
    } else {
        ""
    };
    db.exec(&format!(
        "UPDATE audit SET seq = -seq{cs} WHERE seq >= {from}"
    ))
    .await;
    let cs = if chain {
        format!(", chain_seq = {by} - chain_seq")
    } else {
        String::new()
    };
    db.exec(&format!(
        "UPDATE audit SET seq = {by} - seq{cs} WHERE seq < 0"
    ))
    .await;
}

#[tokio::test]
async fn an_untampered_trail_verifies() {
    let db = one_chain().await;
    let store = db.open().await;
    commit_events(&store, "r1b", 1, 3).await;
    db.checkpoint(&store).await;
    drop(store);
    let report = db.verify().await;
    assert_clean(&report);
    // Two chains: the second handle started its own, linked to the first.
    assert_eq!(report.records, 11 + 4);
    assert_eq!(report.chains, 2);
    assert_eq!(report.checkpoints, 2);

    let rows = db.rows().await;
    let first: AuditEvent = serde_json::from_str(&rows[0].record).unwrap();
    assert_eq!(first.event, "chain.started");
    assert!(first.links.is_empty(), "{first:?}");
    let second: AuditEvent = serde_json::from_str(&rows[11].record).unwrap();
    assert_eq!(second.event, "chain.started");
    assert_eq!(second.links.len(), 1, "{second:?}");
    assert_eq!(second.links[0].chain_id, rows[10].chain_id);
    assert_eq!(second.links[0].chain_seq, 11);
    assert_eq!(second.links[0].hash, rows[10].hash);
    for r in &rows {
        assert_eq!(hash(r.record.as_bytes()), r.hash);
    }
}

#[tokio::test]
async fn an_edited_record_is_named() {
    let db = one_chain().await;
    db.exec("UPDATE audit SET record = replace(record, '\"read\"', '\"write\"') WHERE seq = 6")
        .await;
    let report = db.verify().await;
    assert_names(&report, 6, "edited");
    assert!(
        report.problems.iter().all(|p| p.seq == Some(6)),
        "only the edited record is reported: {:#?}",
        report.problems
    );
}

#[tokio::test]
async fn an_edited_query_column_is_named() {
    // The columns `audit query` filters on are not hashed: moving a record
    // to another task, or turning a decision, must still be reported.
    for (column, value) in [
        ("task_id", "'other-task'"),
        ("decision", "'deny'"),
        ("agent_sub", "NULL"),
        ("tool", "'jira'"),
        ("at_ms", "0"),
    ] {
        let db = one_chain().await;
        db.exec(&format!(
            "UPDATE audit SET {column} = {value} WHERE seq = 6"
        ))
        .await;
        let report = db.verify().await;
        assert_names(&report, 6, "edited");
        assert!(
            report.problems.iter().any(|p| p.what.contains(column)),
            "{column}: {:#?}",
            report.problems
        );
        assert!(
            report.problems.iter().all(|p| p.seq == Some(6)),
            "{column}: {:#?}",
            report.problems
        );
    }
}

#[tokio::test]
async fn an_edited_record_with_a_recomputed_hash_is_detected() {
    let db = one_chain().await;
    let rows = db.rows().await;
    let forged = rows[5].record.replace("\"read\"", "\"write\"");
    assert_ne!(forged, rows[5].record);
    let mut conn = db.sql().await;
    sqlx::query("UPDATE audit SET record = ?, hash = ? WHERE seq = 6")
        .bind(&forged)
        .bind(hash(forged.as_bytes()))
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let report = db.verify().await;
    // The edited record itself is consistent; the one after it no longer
    // links to it.
    assert_names(&report, 7, "does not link");
}

#[tokio::test]
async fn an_edited_checkpointed_head_with_a_recomputed_hash_is_detected() {
    let db = one_chain().await;
    let rows = db.rows().await;
    let head = rows.last().unwrap().clone();
    let forged = head.record.replace("\"read\"", "\"write\"");
    let mut conn = db.sql().await;
    sqlx::query("UPDATE audit SET record = ?, hash = ? WHERE seq = ?")
        .bind(&forged)
        .bind(hash(forged.as_bytes()))
        .bind(head.seq)
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let report = db.verify().await;
    // Only the signed checkpoint can tell: it names the chain position.
    assert!(
        report.problems.iter().any(|p| p.chain_id == head.chain_id
            && p.chain_seq == head.chain_seq
            && p.what.contains("checkpoint")),
        "{:#?}",
        report.problems
    );
    assert_eq!(report.checkpoints, 0);
}

#[tokio::test]
async fn a_deleted_middle_record_is_named() {
    let db = one_chain().await;
    db.exec("DELETE FROM audit WHERE seq = 6").await;
    let report = db.verify().await;
    // The record after the gap is the one that shows it.
    assert_names(&report, 7, "deleted");
    assert_eq!(report.problems.len(), 1, "{:#?}", report.problems);
}

#[tokio::test]
async fn a_forged_record_that_does_not_link_is_named() {
    let db = one_chain().await;
    let rows = db.rows().await;
    // A forger copies an earlier record, gives it the next chain position and
    // a correct hash of its own.
    let mut e: AuditEvent = serde_json::from_str(&rows[3].record).unwrap();
    e.jti = Some("forged-jti".into());
    e.chain_seq = 12;
    let record = serde_json::to_string(&e).unwrap();
    let mut conn = db.sql().await;
    sqlx::query(
        "INSERT INTO audit (seq, at_ms, event, replica, jti, chain_id, chain_seq, hash, record) \
         VALUES (100, 1, 'token.issued', 'r1', 'forged-jti', ?, 12, ?, ?)",
    )
    .bind(&rows[3].chain_id)
    .bind(hash(record.as_bytes()))
    .bind(&record)
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    let report = db.verify().await;
    assert_names(&report, 100, "does not link");
}

#[tokio::test]
async fn a_forged_record_inserted_in_the_middle_is_detected() {
    let db = one_chain().await;
    let rows = db.rows().await;
    // Make room at seq 6 / chain position 6, then insert a forged record that
    // links correctly to the record before it.
    shift(&db, 6, 1, true).await;
    let mut e: AuditEvent = serde_json::from_str(&rows[5].record).unwrap();
    e.jti = Some("forged-jti".into());
    e.prev_hash = Some(rows[4].hash.clone());
    let record = serde_json::to_string(&e).unwrap();
    assert_eq!(e.chain_seq, 6);
    let mut conn = db.sql().await;
    sqlx::query(
        "INSERT INTO audit (seq, at_ms, event, replica, jti, chain_id, chain_seq, hash, record) \
         VALUES (6, 1, 'token.issued', 'r1', 'forged-jti', ?, 6, ?, ?)",
    )
    .bind(&rows[5].chain_id)
    .bind(hash(record.as_bytes()))
    .bind(&record)
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    assert_eq!(db.rows().await.len(), rows.len() + 1);
    let report = db.verify().await;
    let first = report.problems.first().expect("the insertion is detected");
    // The forged record or the genuine one it displaced.
    assert!(matches!(first.seq, Some(6 | 7)), "{:#?}", report.problems);
}

#[tokio::test]
async fn a_forged_chain_without_a_start_is_named() {
    let db = one_chain().await;
    // A record on a chain of its own, perfectly hashed, but no
    // `chain.started`: no writer produces that.
    let mut e = event(99, "ghost");
    e.chain_id = Some("ghostchain".into());
    e.chain_seq = 1;
    e.prev_hash = Some(String::new());
    let record = serde_json::to_string(&e).unwrap();
    let mut conn = db.sql().await;
    sqlx::query(
        "INSERT INTO audit (seq, at_ms, event, replica, jti, chain_id, chain_seq, hash, record) \
         VALUES (100, 1, 'token.issued', 'ghost', 'jti-ghost-99', 'ghostchain', 1, ?, ?)",
    )
    .bind(hash(record.as_bytes()))
    .bind(&record)
    .execute(&mut conn)
    .await
    .unwrap();
    conn.close().await.unwrap();
    let report = db.verify().await;
    assert!(
        !naming(&report, 100).is_empty(),
        "a chain that does not begin with chain.started must be reported: {report:#?}"
    );
}

/// Records claiming positions near the end of the integers, on chains of
/// their own, recent and covered by no checkpoint: the report names each,
/// and none of its position arithmetic overflows (release builds check it,
/// as the tests do).
#[tokio::test]
async fn records_at_the_last_positions_are_reported_not_overflowed() {
    let db = one_chain().await;
    let now_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let now_ms = u64::try_from(now_ms).unwrap();
    let mut conn = db.sql().await;
    for i in 0..3_i64 {
        let chain = format!("far-{i}");
        let mut e = event(90, "far");
        e.at_ms = now_ms;
        e.chain_id = Some(chain.clone());
        e.chain_seq = u64::try_from(i64::MAX).unwrap();
        e.prev_hash = Some(String::new());
        let record = serde_json::to_string(&e).unwrap();
        sqlx::query(
            "INSERT INTO audit (seq, at_ms, event, replica, jti, chain_id, chain_seq, hash, record) \
             VALUES (?, ?, 'token.issued', 'far', 'jti-far-90', ?, ?, ?, ?)",
        )
        .bind(200 + i)
        .bind(i64::try_from(now_ms).unwrap())
        .bind(&chain)
        .bind(i64::MAX)
        .bind(hash(record.as_bytes()))
        .bind(&record)
        .execute(&mut conn)
        .await
        .unwrap();
    }
    conn.close().await.unwrap();
    let report = db.verify().await;
    for seq in 200..203 {
        assert!(!naming(&report, seq).is_empty(), "{seq}: {report:#?}");
    }
}

#[tokio::test]
async fn swapped_records_are_named() {
    let db = one_chain().await;
    // Swap the content (and hashes) of seq 5 and 6, leaving the positions.
    db.exec(
        "UPDATE audit SET record = CASE seq WHEN 5 THEN (SELECT record FROM audit WHERE seq = 6) \
         ELSE (SELECT record FROM audit WHERE seq = 5) END, \
         hash = CASE seq WHEN 5 THEN (SELECT hash FROM audit WHERE seq = 6) \
         ELSE (SELECT hash FROM audit WHERE seq = 5) END WHERE seq IN (5, 6)",
    )
    .await;
    let report = db.verify().await;
    assert!(!naming(&report, 5).is_empty(), "{:#?}", report.problems);
    assert!(!naming(&report, 6).is_empty(), "{:#?}", report.problems);
}

#[tokio::test]
async fn reordered_rows_are_named() {
    let db = one_chain().await;
    // Swap the global order of seq 5 and 6: rows keep their content.
    db.exec("UPDATE audit SET seq = -seq WHERE seq IN (5, 6)")
        .await;
    db.exec("UPDATE audit SET seq = CASE seq WHEN -5 THEN 6 ELSE 5 END WHERE seq < 0")
        .await;
    let report = db.verify().await;
    assert!(!naming(&report, 5).is_empty(), "{:#?}", report.problems);
    assert_names(&report, 6, "reordered");
}

#[tokio::test]
async fn a_truncated_tail_after_a_checkpoint_is_detected() {
    let db = Db::new();
    let store = db.open().await;
    commit_events(&store, "r1", 1, 6).await;
    let c = db.checkpoint(&store).await;
    assert_eq!(c.chain_seq, 7);
    commit_events(&store, "r1", 7, 2).await;
    drop(store);
    assert_clean(&db.verify().await);
    // Delete from position 5 on: the checkpointed record (position 7) goes.
    db.exec("DELETE FROM audit WHERE chain_seq >= 5").await;
    let report = db.verify().await;
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.chain_id == c.chain_id && p.chain_seq == 7 && p.what.contains("truncated")),
        "{:#?}",
        report.problems
    );
}

#[tokio::test]
async fn a_truncated_older_chain_is_named_by_the_newer_chain_start() {
    let db = Db::new();
    let first = db.open().await;
    commit_events(&first, "r1", 1, 5).await;
    drop(first);
    let second = db.open().await;
    commit_events(&second, "r2", 1, 3).await;
    drop(second);
    assert_clean(&db.verify().await);
    let rows = db.rows().await;
    let older = rows[0].chain_id.clone();
    let start = rows
        .iter()
        .find(|r| r.chain_id != older)
        .expect("the second chain");
    assert!(start.record.contains("chain.started"));
    // No checkpoint on the older chain: only the link can tell.
    db.exec(&format!(
        "DELETE FROM audit WHERE chain_id = '{older}' AND chain_seq >= 5"
    ))
    .await;
    let report = db.verify().await;
    assert_names(&report, start.seq, "truncated");
}

#[tokio::test]
async fn a_tampered_checkpoint_is_detected() {
    let db = one_chain().await;
    db.exec("UPDATE audit_checkpoints SET chain_seq = chain_seq - 1")
        .await;
    let report = db.verify().await;
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.what.contains("signature is invalid")),
        "{:#?}",
        report.problems
    );
    // And a checkpoint signed by another key.
    let db = one_chain().await;
    let (other, _) = SigningKey::generate(SigningAlgorithm::EdDSA).unwrap();
    let store = db.open().await;
    let checkpoints = store.latest_checkpoints().await.unwrap();
    let links = store.chain_links().await.unwrap();
    let rows = store.audit_rows(0, u32::MAX).await.unwrap();
    let mut v = Verifier::new(&checkpoints, &links);
    for r in &rows {
        v.push(r);
    }
    let jwk = other.public_jwk();
    let report = v.finish(&checkpoints, |c| {
        scrip_jose::verify_detached(
            &jwk,
            &Checkpoint::message(&c.chain_id, c.chain_seq, &c.hash, c.at_ms),
            &c.signature,
        )
    });
    assert_eq!(report.checkpoints, 0);
    assert_eq!(report.problems.len(), 1, "{:#?}", report.problems);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_handles_on_one_file_write_two_chains_that_verify_together() {
    let db = Db::new();
    let a = Arc::new(db.open().await);
    let b = Arc::new(db.open().await);
    // Both write at once.
    let mut tasks = Vec::new();
    for (store, name) in [(a.clone(), "a"), (b.clone(), "b")] {
        tasks.push(tokio::spawn(async move {
            for n in 0..40 {
                store
                    .commit(vec![Write::Audit(Box::new(event(n, name)))])
                    .await
                    .unwrap_or_else(|e| panic!("commit {n} of handle {name}: {e}"));
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    db.checkpoint(&a).await;
    db.checkpoint(&b).await;
    let (ha, hb) = (a.chain_head().unwrap(), b.chain_head().unwrap());
    assert_ne!(ha.chain_id, hb.chain_id);
    assert_eq!((ha.chain_seq, hb.chain_seq), (41, 41));
    drop((a, b));
    let report = db.verify().await;
    assert_clean(&report);
    assert_eq!(report.chains, 2);
    assert_eq!(report.records, 82);
    assert_eq!(report.checkpoints, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_commits_all_land_once() {
    let db = Db::new();
    let store = Arc::new(db.open().await);
    let tasks: Vec<_> = (0..200)
        .map(|n| {
            let store = store.clone();
            tokio::spawn(async move {
                store
                    .commit(vec![Write::Audit(Box::new(event(n, "g")))])
                    .await
            })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    assert_eq!(store.chain_head().unwrap().chain_seq, 201);
    drop(store);
    let rows = db.rows().await;
    assert_eq!(rows.len(), 201);
    let mut seen: HashMap<String, usize> = HashMap::new();
    for r in &rows {
        let e: AuditEvent = serde_json::from_str(&r.record).unwrap();
        if let Some(jti) = e.jti {
            *seen.entry(jti).or_default() += 1;
        }
    }
    assert_eq!(seen.len(), 200);
    for n in 0..200 {
        assert_eq!(seen.get(&format!("jti-g-{n}")), Some(&1), "record {n}");
    }
    let report = db.verify().await;
    assert_clean(&report);
    assert_eq!(report.records, 201);
}

#[tokio::test]
async fn a_chain_started_while_verification_runs_is_no_false_alarm() {
    let db = Db::new();
    let a = db.open().await;
    for n in 0..5 {
        a.commit(vec![Write::Audit(Box::new(event(n, "a")))])
            .await
            .unwrap();
    }
    // Verification reads the checkpoints and links first ...
    let checkpoints = a.latest_checkpoints().await.unwrap();
    let links = a.chain_links().await.unwrap();
    let mut verifier = Verifier::new(&checkpoints, &links);
    // ... and meanwhile another writer starts a chain linking to a's head.
    let b = db.open().await;
    b.commit(vec![Write::Audit(Box::new(event(0, "b")))])
        .await
        .unwrap();
    a.commit(vec![Write::Audit(Box::new(event(5, "a")))])
        .await
        .unwrap();
    for r in &a.audit_rows(0, u32::MAX).await.unwrap() {
        verifier.push(r);
    }
    let report = verifier.finish(&checkpoints, |_| true);
    assert_clean(&report);
    assert_eq!(report.chains, 2);

    // A link to an edited head is still found, in the same situation.
    let rows = a.audit_rows(0, u32::MAX).await.unwrap();
    let started = rows
        .iter()
        .find(|r| r.chain_id != rows[0].chain_id)
        .unwrap()
        .clone();
    let mut verifier = Verifier::new(&checkpoints, &links);
    for r in &rows {
        let mut r = r.clone();
        if r.seq < started.seq && r.chain_seq == 6 {
            // a's head when b started, rewritten with a consistent hash.
            r.record = r.record.replace("jti-a-4", "jti-a-X");
            r.hash = hash(r.record.as_bytes());
        }
        verifier.push(&r);
    }
    let report = verifier.finish(&checkpoints, |_| true);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.what.contains("which is different")),
        "{:#?}",
        report.problems
    );
}

/// Verification at a time after every record, which makes them all old.
const ALL_OLD: Option<(u64, u64)> = Some((u64::MAX, 0));
/// Verification now, with a grace that makes every record recent.
const ALL_RECENT: Option<(u64, u64)> = Some((1_800_000_000_000, 1_000_000_000_000));

/// Whoever can write the store can delete the checkpoints, rewrite records
/// and recompute every hash (no key needed): what is left covered by no
/// signature is reported once it is older than the writers' signing period.
#[tokio::test]
async fn records_left_without_a_signature_are_reported() {
    let db = one_chain().await;
    assert_clean(&db.verify_signed(ALL_OLD).await);
    // An edit, every hash recomputed, the checkpoint deleted: every link
    // holds, and only the missing signature tells.
    let rows = db.rows().await;
    let mut conn = db.sql().await;
    let mut prev: Option<String> = None;
    for r in &rows {
        let mut e: AuditEvent = serde_json::from_str(&r.record).unwrap();
        if r.chain_seq == 5 {
            e.decision = Some("deny".into());
        }
        if prev.is_some() {
            e.prev_hash.clone_from(&prev);
        }
        let text = serde_json::to_string(&e).unwrap();
        let h = hash(text.as_bytes());
        sqlx::query("UPDATE audit SET record = ?, hash = ?, decision = ? WHERE seq = ?")
            .bind(&text)
            .bind(&h)
            .bind(&e.decision)
            .bind(r.seq)
            .execute(&mut conn)
            .await
            .unwrap();
        prev = Some(h);
    }
    sqlx::query("DELETE FROM audit_checkpoints")
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    assert_clean(&db.verify().await);
    let report = db.verify_signed(ALL_OLD).await;
    assert_eq!(report.problems.len(), 1, "{:#?}", report.problems);
    assert!(
        report.problems[0]
            .what
            .contains("records #1 to #11 are covered by no signed checkpoint"),
        "{:#?}",
        report.problems
    );
    // Records newer than the limit are counted, not reported.
    let report = db.verify_signed(ALL_RECENT).await;
    assert_clean(&report);
    assert_eq!(report.unsigned, 11);
}

/// A chain's records after its last checkpoint are covered by a later
/// chain's start that links to them, once that start is signed.
#[tokio::test]
async fn a_signed_chain_start_covers_the_heads_it_links_to() {
    let db = Db::new();
    let first = db.open().await;
    commit_events(&first, "r1", 1, 3).await;
    db.checkpoint(&first).await;
    commit_events(&first, "r1", 4, 3).await;
    // The first writer stops before signing #5 to #7.
    let report = db.verify_signed(ALL_OLD).await;
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.what.contains("records #5 to #7")),
        "{:#?}",
        report.problems
    );
    let second = db.open().await;
    commit_events(&second, "r2", 1, 2).await;
    db.checkpoint(&second).await;
    let report = db.verify_signed(ALL_OLD).await;
    assert_clean(&report);
    // Said apart from what their own writer signed: the link proves they
    // existed when the second chain started, not who wrote them.
    let first_chain = db.rows().await[0].chain_id.clone();
    assert_eq!(report.vouched, [(first_chain, 5, 7)]);
    // Within the grace their writer may still be running, to sign them:
    // counted as waiting for it, not listed.
    let report = db.verify_signed(ALL_RECENT).await;
    assert_clean(&report);
    assert!(report.vouched.is_empty(), "{:?}", report.vouched);
    assert_eq!(report.unsigned, 3);
    // What the first writer adds after the second chain started is not.
    commit_events(&first, "r1", 7, 2).await;
    let report = db.verify_signed(ALL_OLD).await;
    assert_eq!(report.problems.len(), 1, "{:#?}", report.problems);
    assert!(report.problems[0].what.contains("records #8 to #9"));
}

/// Vouching carries through chain starts, whatever order they come in: a
/// signed start covers the head it links to, whose chain's start covers
/// the head it links to in turn.
#[tokio::test]
async fn vouching_carries_through_chain_starts() {
    let db = Db::new();
    let first = db.open().await;
    commit_events(&first, "r1", 1, 3).await;
    db.checkpoint(&first).await;
    commit_events(&first, "r1", 4, 2).await;
    let second = db.open().await;
    commit_events(&second, "r2", 1, 2).await;
    let third = db.open().await;
    commit_events(&third, "r3", 1, 1).await;
    db.checkpoint(&third).await;
    let rows = db.rows().await;
    let mut chains: Vec<String> = Vec::new();
    for r in &rows {
        if !chains.contains(&r.chain_id) {
            chains.push(r.chain_id.clone());
        }
    }
    // The third start links only the second chain's head: the first's was
    // linked by the second, and has not moved since.
    let third_start = rows
        .iter()
        .find(|r| r.chain_id == chains[2] && r.chain_seq == 1)
        .unwrap();
    assert!(
        !third_start.record.contains(&chains[0]),
        "{}",
        third_start.record
    );
    assert!(
        third_start.record.contains(&chains[1]),
        "{}",
        third_start.record
    );
    let report = db.verify_signed(ALL_OLD).await;
    assert_clean(&report);
    assert_eq!(
        report.vouched,
        [(chains[0].clone(), 5, 6), (chains[1].clone(), 1, 3)]
    );
}

/// Records a later chain's start covers, but their own writer never signed,
/// cannot pass as recent (waiting for a writer still running) by claiming a
/// time to come, or by having one of them claim a recent time.
#[tokio::test]
async fn records_only_a_link_covers_cannot_pass_as_recent() {
    let db = Db::new();
    let first = db.open().await;
    commit_events(&first, "r1", 1, 3).await;
    db.checkpoint(&first).await;
    // Added after the checkpoint by someone without the key: two records of
    // the past, and one claiming the year 2096.
    commit_events(&first, "r1", 4, 2).await;
    let mut future = event(6, "r1");
    future.at_ms = 4_000_000_000_000;
    first
        .commit(vec![Write::Audit(Box::new(future))])
        .await
        .unwrap();
    let second = db.open().await;
    commit_events(&second, "r2", 1, 2).await;
    db.checkpoint(&second).await;
    let first_chain = db.rows().await[0].chain_id.clone();
    // Verified now (1.8e12), with a grace of ten minutes.
    let report = db.verify_signed(Some((1_800_000_000_000, 600_000))).await;
    assert_eq!(report.problems.len(), 1, "{:#?}", report.problems);
    assert!(
        report.problems[0]
            .what
            .contains("records #5 to #7 were never signed by the process that wrote them and claim a time to come"),
        "{:#?}",
        report.problems
    );
    assert_eq!(report.problems[0].chain_id, first_chain);
    assert_eq!(report.unsigned, 0, "{report:?}");
    // Verified when the record of 2096 is recent but the others are old:
    // listed as never signed, not counted as waiting for their writer.
    let report = db.verify_signed(Some((4_000_000_000_000, 600_000))).await;
    assert_clean(&report);
    assert_eq!(report.vouched, [(first_chain, 5, 7)]);
    assert_eq!(report.unsigned, 0, "{report:?}");
}

/// `chain_links` is bookkeeping verification does not read: a value set
/// past a chain's head must not stop the next chain start from linking it,
/// or the chain's unsigned tail could be cut long after.
#[tokio::test]
async fn a_link_marked_past_a_head_is_linked_again() {
    let db = Db::new();
    let first = db.open().await;
    commit_events(&first, "r1", 1, 3).await;
    db.checkpoint(&first).await;
    commit_events(&first, "r1", 4, 3).await;
    drop(first);
    let older = db.rows().await[0].chain_id.clone();
    db.exec(&format!(
        "INSERT OR REPLACE INTO chain_links (chain_id, chain_seq) VALUES ('{older}', {})",
        1_i64 << 62
    ))
    .await;
    let second = db.open().await;
    commit_events(&second, "r2", 1, 2).await;
    db.checkpoint(&second).await;
    assert_clean(&db.verify_signed(ALL_OLD).await);
    // The first chain's records past its checkpoint, cut: the second
    // chain's start linked them.
    db.exec(&format!(
        "DELETE FROM audit WHERE chain_id = '{older}' AND chain_seq >= 5"
    ))
    .await;
    let report = db.verify_signed(ALL_OLD).await;
    assert!(
        report.problems.iter().any(|p| p.what.contains("truncated")),
        "{:#?}",
        report.problems
    );
}

/// Rewritten records cannot escape the rule by claiming a time to come.
#[tokio::test]
async fn unsigned_records_from_the_future_are_reported() {
    let db = one_chain().await;
    db.exec("DELETE FROM audit_checkpoints").await;
    let rows = db.rows().await;
    let mut conn = db.sql().await;
    let mut prev: Option<String> = None;
    for r in &rows {
        let mut e: AuditEvent = serde_json::from_str(&r.record).unwrap();
        e.at_ms = 4_000_000_000_000;
        if prev.is_some() {
            e.prev_hash.clone_from(&prev);
        }
        let text = serde_json::to_string(&e).unwrap();
        let h = hash(text.as_bytes());
        sqlx::query("UPDATE audit SET record = ?, hash = ?, at_ms = ? WHERE seq = ?")
            .bind(&text)
            .bind(&h)
            .bind(4_000_000_000_000_i64)
            .bind(r.seq)
            .execute(&mut conn)
            .await
            .unwrap();
        prev = Some(h);
    }
    conn.close().await.unwrap();
    assert_clean(&db.verify().await);
    let now = 1_800_000_000_000;
    let report = db.verify_signed(Some((now, 600_000))).await;
    assert_eq!(report.problems.len(), 1, "{:#?}", report.problems);
    assert!(
        report.problems[0].what.contains("claim a time to come"),
        "{:#?}",
        report.problems
    );
}

/// A trail tampered with on every row is not held in memory a problem a
/// row: the first `MAX_PROBLEMS` are listed, the rest counted.
#[test]
fn a_report_lists_so_many_problems_and_counts_the_rest() {
    let rows = scrip_store::MAX_PROBLEMS + 50;
    let records: Vec<StoredRecord> = (1..=rows)
        .map(|n| StoredRecord {
            seq: i64::try_from(n).unwrap(),
            chain_id: "c1".into(),
            chain_seq: u64::try_from(n).unwrap(),
            hash: "0".repeat(64),
            // Neither its hash nor a record: two problems a row.
            record: format!("garbage {n}"),
            columns: scrip_store::IndexedColumns::default(),
        })
        .collect();
    let report = scrip_store::verify(&records, &[], |_| true);
    assert_eq!(report.records, rows);
    assert_eq!(report.problems.len(), scrip_store::MAX_PROBLEMS);
    assert_eq!(
        report.problems_found(),
        u64::try_from(2 * rows).unwrap(),
        "{} more counted",
        report.more_problems
    );
    // The first ones found are those listed.
    assert_eq!(report.problems[0].seq, Some(1));
    assert_eq!(report.problems[1].seq, Some(1));
}

/// A chain moved to sequence numbers of 0 or below (which no writer gives)
/// with its signature deleted is out of reach of a read that starts at 1:
/// every row is read, and each such row is named.
#[tokio::test]
async fn records_moved_below_the_first_sequence_number_are_named() {
    let db = one_chain().await;
    let second = db.open().await;
    commit_events(&second, "r2", 11, 4).await;
    db.checkpoint(&second).await;
    drop(second);
    assert_clean(&db.verify_signed(ALL_OLD).await);
    db.exec("UPDATE audit SET seq = -seq WHERE seq > 11").await;
    db.exec("DELETE FROM audit_checkpoints WHERE chain_id <> (SELECT chain_id FROM audit WHERE seq = 1)")
        .await;
    let report = db.verify_signed(ALL_OLD).await;
    for seq in -16..=-12 {
        assert_names(&report, seq, "which no writer gives");
    }
    assert_eq!(report.records, 16);
}
