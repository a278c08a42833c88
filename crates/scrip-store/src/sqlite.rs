//! The embedded store: SQLite in WAL mode with `synchronous=FULL`.
//!
//! One writer task owns the only write connection and applies every pending
//! commit that has queued up while the previous transaction was flushing as
//! one transaction: concurrent requests share a single fsync. Reads use a
//! small pool of read-only connections, which WAL lets run beside the writer.
//! After a failed write the writer drops its connection and opens a new one
//! for the next batch, so the store recovers by itself once the disk does.

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteRow, SqliteSynchronous,
};
use sqlx::{ConnectOptions as _, Connection as _, Row as _};
use tokio::sync::{mpsc, oneshot};

use std::sync::{Arc, Mutex};

use crate::chain::ChainState;
use crate::{Approval, Revocation, RevocationKind, SecretRecord};
use crate::{
    AuditEvent, AuditFilter, ChainLink, Checkpoint, Store, StoreError, StoredRecord, TaskRecord,
    Write,
};

/// Most commits folded into one transaction.
const MAX_BATCH: usize = 512;
/// Commits that may wait for the writer before callers are slowed down.
const QUEUE: usize = 8192;

struct Pending {
    writes: Vec<Write>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// The embedded SQLite store.
#[derive(Debug)]
pub struct SqliteStore {
    reads: SqlitePool,
    writer: mpsc::Sender<Pending>,
    head: Arc<Mutex<Option<ChainLink>>>,
}

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies the
    /// migrations.
    ///
    /// # Errors
    /// [`StoreError::Open`] when the file cannot be opened or migrated.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let mut conn = options
            .connect()
            .await
            .map_err(|e| StoreError::Open(format!("`{}`: {e}", path.display())))?;
        sqlx::migrate!("./migrations/sqlite")
            .run(&mut conn)
            .await
            .map_err(|e| StoreError::Open(format!("migration failed: {e}")))?;
        let reads = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            .connect_with(options.clone().read_only(true))
            .await
            .map_err(|e| StoreError::Open(e.to_string()))?;
        let (tx, rx) = mpsc::channel(QUEUE);
        let chain = ChainState::new(new_chain_id()?);
        let head = Arc::new(Mutex::new(None));
        tokio::spawn(writer(Some(conn), options, rx, chain, head.clone()));
        Ok(Self {
            reads,
            writer: tx,
            head,
        })
    }

    /// An in-memory-like store in a fresh file under `dir`, for tests.
    ///
    /// # Errors
    /// As [`SqliteStore::open`].
    pub async fn open_in(dir: &Path) -> Result<Self, StoreError> {
        Self::open(&dir.join("scrip.db")).await
    }
}

fn new_chain_id() -> Result<String, StoreError> {
    use base64::Engine as _;
    let mut bytes = [0u8; 12];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| StoreError::Open("random generator failed".into()))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

async fn writer(
    mut conn: Option<SqliteConnection>,
    options: SqliteConnectOptions,
    mut rx: mpsc::Receiver<Pending>,
    mut chain: ChainState,
    head: Arc<Mutex<Option<ChainLink>>>,
) {
    let mut batch: Vec<Pending> = Vec::with_capacity(MAX_BATCH);
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < MAX_BATCH {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        let all: Vec<&Write> = batch.iter().flat_map(|p| p.writes.iter()).collect();
        match apply(&mut conn, &options, &all, &mut chain).await {
            Ok(()) => {
                publish(&head, &chain);
                for p in batch.drain(..) {
                    let _ = p.done.send(Ok(()));
                }
            }
            Err(e) if batch.len() > 1 => {
                // Isolate the failing commit: each gets its own transaction.
                tracing::warn!(error = %e, size = batch.len(), "group commit failed; retrying one by one");
                for p in batch.drain(..) {
                    let writes: Vec<&Write> = p.writes.iter().collect();
                    let result = apply(&mut conn, &options, &writes, &mut chain).await;
                    publish(&head, &chain);
                    let _ = p.done.send(result);
                }
            }
            Err(e) => {
                tracing::error!(error = %e, "store write failed");
                for p in batch.drain(..) {
                    let _ = p.done.send(Err(e.clone()));
                }
            }
        }
    }
}

fn publish(head: &Mutex<Option<ChainLink>>, chain: &ChainState) {
    if let Ok(mut h) = head.lock() {
        *h = chain.link();
    }
}

/// Applies `writes` in one transaction; `chain` advances only when it
/// commits.
async fn apply(
    conn: &mut Option<SqliteConnection>,
    options: &SqliteConnectOptions,
    writes: &[&Write],
    chain: &mut ChainState,
) -> Result<(), StoreError> {
    if conn.is_none() {
        *conn = Some(options.connect().await.map_err(unavailable)?);
    }
    let Some(c) = conn.as_mut() else {
        return Err(StoreError::Unavailable("no connection".into()));
    };
    let mut working = chain.clone();
    let result = apply_on(c, writes, &mut working).await;
    if result.is_ok() {
        *chain = working;
    } else if let Some(c) = conn.take() {
        // Start afresh next time: the connection may be what is broken.
        let _ = c.close().await;
    }
    result
}

async fn insert_audit(
    tx: &mut SqliteConnection,
    event: &AuditEvent,
    chain: &mut ChainState,
) -> Result<(), StoreError> {
    let (e, record, hash) = chain.append(event).map_err(unavailable)?;
    sqlx::query(
        "INSERT INTO audit (at_ms, event, decision, agent_iss, agent_sub, task_id, parent_id, tool, jti, replica, \
         chain_id, chain_seq, hash, record) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
    )
    .bind(to_i64(e.at_ms))
    .bind(&e.event)
    .bind(&e.decision)
    .bind(&e.agent_iss)
    .bind(&e.agent_sub)
    .bind(&e.task_id)
    .bind(&e.parent_id)
    .bind(&e.tool)
    .bind(&e.jti)
    .bind(&e.replica)
    .bind(&chain.id)
    .bind(to_i64(chain.seq))
    .bind(hash)
    .bind(record)
    .execute(&mut *tx)
    .await
    .map_err(unavailable)?;
    Ok(())
}

/// The head of every chain in the store.
async fn chain_heads(tx: &mut SqliteConnection) -> Result<Vec<ChainLink>, StoreError> {
    let rows = sqlx::query(
        "SELECT a.chain_id, a.chain_seq, a.hash FROM audit a \
         JOIN (SELECT chain_id, MAX(chain_seq) AS m FROM audit GROUP BY chain_id) h \
         ON a.chain_id = h.chain_id AND a.chain_seq = h.m ORDER BY a.seq",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(unavailable)?;
    let corrupt = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    rows.iter()
        .map(|r| {
            Ok(ChainLink {
                chain_id: r.try_get("chain_id").map_err(corrupt)?,
                chain_seq: to_u64(r.try_get("chain_seq").map_err(corrupt)?),
                hash: r.try_get("hash").map_err(corrupt)?,
            })
        })
        .collect()
}

/// The first record of a chain: links to every chain already stored, so a
/// truncated older chain is detected.
async fn genesis(
    tx: &mut SqliteConnection,
    writes: &[&Write],
    chain: &mut ChainState,
) -> Result<(), StoreError> {
    let Some(first) = writes.iter().find_map(|w| match w {
        Write::Audit(a) => Some(a),
        _ => None,
    }) else {
        return Ok(());
    };
    let links = chain_heads(tx).await?;
    let event = AuditEvent {
        event: "chain.started".into(),
        at_ms: first.at_ms,
        replica: first.replica.clone(),
        links,
        ..AuditEvent::default()
    };
    insert_audit(tx, &event, chain).await
}

async fn apply_on(
    conn: &mut SqliteConnection,
    writes: &[&Write],
    chain: &mut ChainState,
) -> Result<(), StoreError> {
    // IMMEDIATE takes the write lock up front: a deferred transaction that
    // reads (the chain heads) and then writes fails at once with "busy" when
    // another connection wrote in between, instead of waiting for it.
    let mut tx = conn
        .begin_with("BEGIN IMMEDIATE")
        .await
        .map_err(unavailable)?;
    if chain.seq == 0 {
        genesis(&mut tx, writes, chain).await?;
    }
    for write in writes {
        match write {
            Write::InsertTask(t) => {
                let agent = serde_json::to_string(&t.agent).map_err(unavailable)?;
                let actor = t
                    .actor
                    .as_ref()
                    .map(serde_json::to_string)
                    .transpose()
                    .map_err(unavailable)?;
                let may_act = (!t.may_act.is_empty())
                    .then(|| serde_json::to_string(&t.may_act))
                    .transpose()
                    .map_err(unavailable)?;
                sqlx::query(
                    "INSERT INTO tasks (id, parent_id, agent, actor, may_act, agent_iss, agent_sub, grants, purpose, \
                     environment, depth, token_jti, created_at, expires_at) \
                     VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(&t.id)
                .bind(&t.parent)
                .bind(agent)
                .bind(actor)
                .bind(may_act)
                .bind(&t.agent.issuer)
                .bind(&t.agent.subject)
                .bind(&t.grants)
                .bind(&t.purpose)
                .bind(&t.environment)
                .bind(i64::from(t.depth))
                .bind(&t.token_jti)
                .bind(to_i64(t.created_at))
                .bind(to_i64(t.expires_at))
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            }
            Write::EndTask { id, at, reason } => {
                sqlx::query(
                    "WITH RECURSIVE sub(id) AS (SELECT ?1 UNION SELECT t.id FROM tasks t JOIN sub ON t.parent_id = sub.id) \
                     INSERT INTO revocations (kind, txn, jti, exp, at) \
                     SELECT 'task', id, NULL, expires_at, ?2 FROM tasks WHERE id IN sub AND ended_at IS NULL AND expires_at > ?2",
                )
                .bind(id)
                .bind(to_i64(*at))
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
                sqlx::query(
                    "WITH RECURSIVE sub(id) AS (SELECT ?1 UNION SELECT t.id FROM tasks t JOIN sub ON t.parent_id = sub.id) \
                     UPDATE tasks SET ended_at = ?2, end_reason = CASE WHEN id = ?1 THEN ?3 ELSE 'parent ended' END \
                     WHERE id IN sub AND ended_at IS NULL",
                )
                .bind(id)
                .bind(to_i64(*at))
                .bind(reason)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            }
            Write::RevokeToken {
                jti,
                task_id,
                expires_at,
                at,
            } => {
                let inserted = sqlx::query(
                    "INSERT OR IGNORE INTO revoked_tokens (jti, task_id, expires_at, revoked_at) VALUES (?, ?, ?, ?)",
                )
                .bind(jti)
                .bind(task_id)
                .bind(to_i64(*expires_at))
                .bind(to_i64(*at))
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
                if inserted.rows_affected() > 0 {
                    sqlx::query("INSERT INTO revocations (kind, txn, jti, exp, at) VALUES ('token', ?, ?, ?, ?)")
                        .bind(task_id)
                        .bind(jti)
                        .bind(to_i64(*expires_at))
                        .bind(to_i64(*at))
                        .execute(&mut *tx)
                        .await
                        .map_err(unavailable)?;
                }
            }
            Write::PurgeRevocations { now } => {
                sqlx::query("DELETE FROM revoked_tokens WHERE expires_at <= ?")
                    .bind(to_i64(*now))
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable)?;
                sqlx::query("DELETE FROM revocations WHERE exp <= ?")
                    .bind(to_i64(*now))
                    .execute(&mut *tx)
                    .await
                    .map_err(unavailable)?;
            }
            Write::InsertApproval(a) => {
                sqlx::query(
                    "INSERT INTO approvals (id, task_id, tool, actions, state, created_at, expires_at) \
                     VALUES (?, ?, ?, ?, ?, ?, ?)",
                )
                .bind(&a.id)
                .bind(&a.task_id)
                .bind(&a.tool)
                .bind(&a.actions)
                .bind(a.state.as_str())
                .bind(to_i64(a.created_at))
                .bind(to_i64(a.expires_at))
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            }
            Write::UpdateApproval {
                id,
                from,
                to,
                by,
                at,
                reason,
                token_jti,
            } => {
                sqlx::query(
                    "UPDATE approvals SET state = ?1, \
                     decided_by = COALESCE(?2, decided_by), decided_at = CASE WHEN ?2 IS NULL THEN decided_at ELSE ?3 END, \
                     reason = COALESCE(?4, reason), token_jti = COALESCE(?5, token_jti) \
                     WHERE id = ?6 AND state = ?7",
                )
                .bind(to.as_str())
                .bind(by)
                .bind(to_i64(*at))
                .bind(reason)
                .bind(token_jti)
                .bind(id)
                .bind(from.as_str())
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            }
            Write::Audit(a) => insert_audit(&mut tx, a, chain).await?,
            Write::PutSecret {
                secret,
                purge_retired_before,
            } => {
                sqlx::query(
                    "UPDATE secrets SET retired_at = ? \
                     WHERE name = ? AND action = ? AND retired_at IS NULL",
                )
                .bind(to_i64(secret.created_at))
                .bind(&secret.name)
                .bind(&secret.action)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
                sqlx::query(
                    "DELETE FROM secrets WHERE name = ? AND action = ? \
                     AND retired_at IS NOT NULL AND retired_at <= ?",
                )
                .bind(&secret.name)
                .bind(&secret.action)
                .bind(to_i64(*purge_retired_before))
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
                sqlx::query(
                    "INSERT INTO secrets (name, action, version, sealed, created_at) \
                     VALUES (?, ?, ?, ?, ?)",
                )
                .bind(&secret.name)
                .bind(&secret.action)
                .bind(i64::from(secret.version))
                .bind(&secret.sealed)
                .bind(to_i64(secret.created_at))
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            }
            Write::Checkpoint(c) => {
                sqlx::query(
                    "INSERT INTO audit_checkpoints (chain_id, chain_seq, hash, at_ms, signature) VALUES (?, ?, ?, ?, ?)",
                )
                .bind(&c.chain_id)
                .bind(to_i64(c.chain_seq))
                .bind(&c.hash)
                .bind(to_i64(c.at_ms))
                .bind(&c.signature)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            }
        }
    }
    tx.commit().await.map_err(unavailable)
}

fn secret_from_row(row: &SqliteRow) -> Result<SecretRecord, StoreError> {
    let corrupt = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    let version: i64 = row.try_get("version").map_err(corrupt)?;
    Ok(SecretRecord {
        name: row.try_get("name").map_err(corrupt)?,
        action: row.try_get("action").map_err(corrupt)?,
        version: u32::try_from(version)
            .map_err(|_| StoreError::Corrupt(format!("secret version {version}")))?,
        sealed: row.try_get("sealed").map_err(corrupt)?,
        created_at: to_u64(row.try_get("created_at").map_err(corrupt)?),
        retired_at: row
            .try_get::<Option<i64>, _>("retired_at")
            .map_err(corrupt)?
            .map(to_u64),
    })
}

fn approval_from_row(row: &SqliteRow) -> Result<Approval, StoreError> {
    let corrupt = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    let state: String = row.try_get("state").map_err(corrupt)?;
    let decided_at: Option<i64> = row.try_get("decided_at").map_err(corrupt)?;
    Ok(Approval {
        id: row.try_get("id").map_err(corrupt)?,
        task_id: row.try_get("task_id").map_err(corrupt)?,
        tool: row.try_get("tool").map_err(corrupt)?,
        actions: row.try_get("actions").map_err(corrupt)?,
        state: Approval::parse_state(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown approval state `{state}`")))?,
        created_at: to_u64(row.try_get("created_at").map_err(corrupt)?),
        expires_at: to_u64(row.try_get("expires_at").map_err(corrupt)?),
        decided_by: row.try_get("decided_by").map_err(corrupt)?,
        decided_at: decided_at.map(to_u64),
        reason: row.try_get("reason").map_err(corrupt)?,
        token_jti: row.try_get("token_jti").map_err(corrupt)?,
    })
}

fn task_from_row(row: &SqliteRow) -> Result<TaskRecord, StoreError> {
    let corrupt = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
    let agent: String = row.try_get("agent").map_err(corrupt)?;
    let actor: Option<String> = row.try_get("actor").map_err(corrupt)?;
    let may_act: Option<String> = row.try_get("may_act").map_err(corrupt)?;
    let ended_at: Option<i64> = row.try_get("ended_at").map_err(corrupt)?;
    let depth: i64 = row.try_get("depth").map_err(corrupt)?;
    Ok(TaskRecord {
        id: row.try_get("id").map_err(corrupt)?,
        parent: row.try_get("parent_id").map_err(corrupt)?,
        agent: serde_json::from_str(&agent).map_err(|e| StoreError::Corrupt(e.to_string()))?,
        actor: actor
            .map(|a| serde_json::from_str(&a))
            .transpose()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?,
        may_act: may_act
            .map(|m| serde_json::from_str(&m))
            .transpose()
            .map_err(|e| StoreError::Corrupt(e.to_string()))?
            .unwrap_or_default(),
        grants: row.try_get("grants").map_err(corrupt)?,
        purpose: row.try_get("purpose").map_err(corrupt)?,
        environment: row.try_get("environment").map_err(corrupt)?,
        depth: u32::try_from(depth).unwrap_or(u32::MAX),
        token_jti: row.try_get("token_jti").map_err(corrupt)?,
        created_at: to_u64(row.try_get("created_at").map_err(corrupt)?),
        expires_at: to_u64(row.try_get("expires_at").map_err(corrupt)?),
        ended_at: ended_at.map(to_u64),
        end_reason: row.try_get("end_reason").map_err(corrupt)?,
    })
}

macro_rules! approval_columns {
    () => {
        "id, task_id, tool, actions, state, created_at, expires_at, decided_by, decided_at, reason, token_jti"
    };
}

macro_rules! task_columns {
    () => {
        "id, parent_id, agent, actor, may_act, grants, purpose, environment, depth, token_jti, \
         created_at, expires_at, ended_at, end_reason"
    };
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.writer
            .send(Pending { writes, done })
            .await
            .map_err(|_| StoreError::Unavailable("writer stopped".into()))?;
        wait.await
            .map_err(|_| StoreError::Unavailable("writer stopped".into()))?
    }

    async fn task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE id = ?"
        ))
        .bind(id)
        .fetch_optional(&self.reads)
        .await
        .map_err(unavailable)?;
        row.as_ref().map(task_from_row).transpose()
    }

    async fn token_revoked(&self, jti: &str) -> Result<bool, StoreError> {
        let row = sqlx::query("SELECT 1 FROM revoked_tokens WHERE jti = ?")
            .bind(jti)
            .fetch_optional(&self.reads)
            .await
            .map_err(unavailable)?;
        Ok(row.is_some())
    }

    async fn due_tasks(&self, now: u64, limit: u32) -> Result<Vec<TaskRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE ended_at IS NULL AND expires_at <= ? ORDER BY expires_at LIMIT ?"
        ))
        .bind(to_i64(now))
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await
        .map_err(unavailable)?;
        rows.iter().map(task_from_row).collect()
    }

    async fn open_descendants(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "WITH RECURSIVE sub(id) AS (SELECT id FROM tasks WHERE parent_id = ?1 \
             UNION SELECT t.id FROM tasks t JOIN sub ON t.parent_id = sub.id) \
             SELECT tasks.id FROM tasks JOIN sub ON tasks.id = sub.id WHERE tasks.ended_at IS NULL",
        )
        .bind(id)
        .fetch_all(&self.reads)
        .await
        .map_err(unavailable)?;
        rows.iter()
            .map(|r| {
                r.try_get::<String, _>("id")
                    .map_err(|e| StoreError::Corrupt(e.to_string()))
            })
            .collect()
    }

    async fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEvent>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, hash, record FROM audit WHERE seq > ?1 \
             AND (?2 IS NULL OR task_id = ?2) AND (?3 IS NULL OR agent_sub = ?3) \
             AND (?4 IS NULL OR tool = ?4) AND (?5 IS NULL OR decision = ?5) \
             AND (?6 IS NULL OR at_ms >= ?6) AND (?7 IS NULL OR at_ms < ?7) \
             ORDER BY seq LIMIT ?8",
        )
        .bind(filter.after_seq.unwrap_or(0))
        .bind(&filter.task_id)
        .bind(&filter.agent_sub)
        .bind(&filter.tool)
        .bind(&filter.decision)
        .bind(filter.since_ms.map(to_i64))
        .bind(filter.until_ms.map(to_i64))
        .bind(i64::from(filter.limit.unwrap_or(10_000)))
        .fetch_all(&self.reads)
        .await
        .map_err(unavailable)?;
        let corrupt = |e: &dyn std::fmt::Display| StoreError::Corrupt(e.to_string());
        rows.iter()
            .map(|r| {
                let seq: i64 = r.try_get("seq").map_err(|e| corrupt(&e))?;
                let hash: String = r.try_get("hash").map_err(|e| corrupt(&e))?;
                let record: String = r.try_get("record").map_err(|e| corrupt(&e))?;
                let mut event: AuditEvent =
                    serde_json::from_str(&record).map_err(|e| corrupt(&e))?;
                event.seq = seq;
                event.hash = Some(hash);
                Ok(event)
            })
            .collect()
    }

    async fn audit_rows(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, chain_id, chain_seq, hash, record FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
        )
        .bind(after_seq)
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await
        .map_err(unavailable)?;
        let corrupt = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
        rows.iter()
            .map(|r| {
                Ok(StoredRecord {
                    seq: r.try_get("seq").map_err(corrupt)?,
                    chain_id: r.try_get("chain_id").map_err(corrupt)?,
                    chain_seq: to_u64(r.try_get("chain_seq").map_err(corrupt)?),
                    hash: r.try_get("hash").map_err(corrupt)?,
                    record: r.try_get("record").map_err(corrupt)?,
                })
            })
            .collect()
    }

    async fn revocations(
        &self,
        after: i64,
        now: u64,
        limit: u32,
    ) -> Result<Vec<Revocation>, StoreError> {
        let rows = sqlx::query(
            "SELECT seq, kind, txn, jti, exp FROM revocations WHERE seq > ? AND exp > ? ORDER BY seq LIMIT ?",
        )
        .bind(after)
        .bind(to_i64(now))
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await
        .map_err(unavailable)?;
        let corrupt = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
        rows.iter()
            .map(|r| {
                let kind: String = r.try_get("kind").map_err(corrupt)?;
                Ok(Revocation {
                    seq: r.try_get("seq").map_err(corrupt)?,
                    kind: if kind == "task" {
                        RevocationKind::Task
                    } else {
                        RevocationKind::Token
                    },
                    txn: r.try_get("txn").map_err(corrupt)?,
                    jti: r.try_get("jti").map_err(corrupt)?,
                    exp: to_u64(r.try_get("exp").map_err(corrupt)?),
                })
            })
            .collect()
    }

    async fn latest_revocation(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS m FROM revocations")
            .fetch_one(&self.reads)
            .await
            .map_err(unavailable)?;
        row.try_get("m")
            .map_err(|e| StoreError::Corrupt(e.to_string()))
    }

    async fn approval(&self, id: &str) -> Result<Option<Approval>, StoreError> {
        let row = sqlx::query(concat!(
            "SELECT ",
            approval_columns!(),
            " FROM approvals WHERE id = ?",
        ))
        .bind(id)
        .fetch_optional(&self.reads)
        .await
        .map_err(unavailable)?;
        row.as_ref().map(approval_from_row).transpose()
    }

    async fn pending_approvals(&self, now: u64, limit: u32) -> Result<Vec<Approval>, StoreError> {
        let rows = sqlx::query(
            concat!(
            "SELECT ",
            approval_columns!(),
            " FROM approvals WHERE state = 'pending' AND expires_at > ? ORDER BY created_at LIMIT ?",
        ))
        .bind(to_i64(now))
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await
        .map_err(unavailable)?;
        rows.iter().map(approval_from_row).collect()
    }

    async fn expired_approvals(&self, now: u64, limit: u32) -> Result<Vec<Approval>, StoreError> {
        let rows = sqlx::query(
            concat!(
            "SELECT ",
            approval_columns!(),
            " FROM approvals WHERE state = 'pending' AND expires_at <= ? ORDER BY expires_at LIMIT ?",
        ))
        .bind(to_i64(now))
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await
        .map_err(unavailable)?;
        rows.iter().map(approval_from_row).collect()
    }

    async fn chain_links(&self) -> Result<Vec<ChainLink>, StoreError> {
        let rows =
            sqlx::query("SELECT record FROM audit WHERE event = 'chain.started' ORDER BY seq")
                .fetch_all(&self.reads)
                .await
                .map_err(unavailable)?;
        let mut links = Vec::new();
        for r in &rows {
            let record: String = r
                .try_get("record")
                .map_err(|e| StoreError::Corrupt(e.to_string()))?;
            // An unreadable record is reported by the verification pass.
            if let Ok(e) = serde_json::from_str::<AuditEvent>(&record) {
                links.extend(e.links);
            }
        }
        Ok(links)
    }

    async fn checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        let rows = sqlx::query(
            "SELECT chain_id, chain_seq, hash, at_ms, signature FROM audit_checkpoints ORDER BY id",
        )
        .fetch_all(&self.reads)
        .await
        .map_err(unavailable)?;
        let corrupt = |e: sqlx::Error| StoreError::Corrupt(e.to_string());
        rows.iter()
            .map(|r| {
                Ok(Checkpoint {
                    chain_id: r.try_get("chain_id").map_err(corrupt)?,
                    chain_seq: to_u64(r.try_get("chain_seq").map_err(corrupt)?),
                    hash: r.try_get("hash").map_err(corrupt)?,
                    at_ms: to_u64(r.try_get("at_ms").map_err(corrupt)?),
                    signature: r.try_get("signature").map_err(corrupt)?,
                })
            })
            .collect()
    }

    async fn secrets(&self) -> Result<Vec<SecretRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, action, version, sealed, created_at, retired_at FROM secrets \
             ORDER BY name, action, version DESC",
        )
        .fetch_all(&self.reads)
        .await
        .map_err(unavailable)?;
        rows.iter().map(secret_from_row).collect()
    }

    async fn secret_versions(
        &self,
        name: &str,
        action: &str,
    ) -> Result<Vec<SecretRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, action, version, sealed, created_at, retired_at FROM secrets \
             WHERE name = ? AND action = ? ORDER BY version DESC",
        )
        .bind(name)
        .bind(action)
        .fetch_all(&self.reads)
        .await
        .map_err(unavailable)?;
        rows.iter().map(secret_from_row).collect()
    }

    fn chain_head(&self) -> Option<ChainLink> {
        self.head.lock().ok().and_then(|h| h.clone())
    }
}
