//! The embedded store: SQLite in WAL mode with `synchronous=FULL`.
//!
//! The writer ([`crate::writer`]) owns the only write connection and group
//! commits: concurrent requests share a single fsync, and checkpoints the
//! WAL between commits. Reads use a small pool
//! of read-only connections, which WAL lets run beside the writer. After a
//! failed write the writer drops its connection and opens a new one for the
//! next batch, so the store recovers by itself once the disk does.

use std::path::Path;
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteConnection, SqliteJournalMode, SqlitePool, SqlitePoolOptions,
    SqliteSynchronous,
};
use sqlx::{ConnectOptions as _, Connection as _};

use crate::chain::ChainState;
use crate::rows::{self, approval_columns, key_columns, task_columns, to_i64};
use crate::writer::{Apply, Changes, Writer};
use crate::{
    Approval, AuditEvent, AuditFilter, ChainLink, Checkpoint, Revocation, SecretRecord, Store,
    StoreError, StoredKey, StoredRecord, TaskRecord, Write,
};

/// The embedded SQLite store.
#[derive(Debug)]
pub struct SqliteStore {
    reads: SqlitePool,
    writer: Writer,
}

/// How often, at most, the writer checkpoints the WAL into the database.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(250);
/// The WAL file is truncated back to this size after a checkpoint.
const WAL_SIZE_LIMIT: &str = "67108864";

fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// A failed statement: a uniqueness violation is a [`StoreError::Conflict`].
fn failed(e: sqlx::Error) -> StoreError {
    match e.as_database_error() {
        Some(d) if d.is_unique_violation() => StoreError::Conflict(d.message().to_owned()),
        _ => unavailable(e),
    }
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
            .foreign_keys(true)
            .pragma("journal_size_limit", WAL_SIZE_LIMIT);
        let options = options.pragma("wal_autocheckpoint", "0");
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
        let writer = Writer::spawn_on_own_thread(
            SqliteWriter {
                conn: Some(conn),
                options,
                checkpointed: std::time::Instant::now(),
            },
            crate::chain::new_chain_id()?,
        )?;
        Ok(Self { reads, writer })
    }

    /// A store in a fresh file under `dir`, for tests.
    ///
    /// # Errors
    /// As [`SqliteStore::open`].
    pub async fn open_in(dir: &Path) -> Result<Self, StoreError> {
        Self::open(&dir.join("scrip.db")).await
    }
}

struct SqliteWriter {
    conn: Option<SqliteConnection>,
    options: SqliteConnectOptions,
    checkpointed: std::time::Instant,
}

#[async_trait::async_trait]
impl Apply for SqliteWriter {
    async fn apply(&mut self, writes: &[&Write], chain: &mut ChainState) -> Result<(), StoreError> {
        if self.conn.is_none() {
            self.conn = Some(self.options.connect().await.map_err(unavailable)?);
        }
        let Some(c) = self.conn.as_mut() else {
            return Err(StoreError::Unavailable("no connection".into()));
        };
        let result = apply_on(c, writes, chain).await;
        if matches!(result, Err(StoreError::Unavailable(_)))
            && let Some(c) = self.conn.take()
        {
            // Start afresh next time: the connection may be what is broken.
            let _ = c.close().await;
        }
        result
    }

    /// Checkpoints the WAL into the database file, at most every
    /// [`CHECKPOINT_EVERY`], once the batch's callers have their answers.
    /// The writer connection does not checkpoint inside a commit
    /// (`wal_autocheckpoint = 0`): SQLite's automatic checkpoint runs in the
    /// commit that crosses its threshold and adds its writes and fsyncs to
    /// that group commit's wait. Here no commit is in flight, so the
    /// checkpoint copies every frame and the next commit starts the WAL
    /// over (truncated to `journal_size_limit`), keeping it small.
    /// Durability is the WAL's (`synchronous=FULL`); a failed checkpoint
    /// is retried next time.
    async fn after_commit(&mut self) {
        if self.checkpointed.elapsed() < CHECKPOINT_EVERY {
            return;
        }
        self.checkpointed = std::time::Instant::now();
        if let Some(c) = self.conn.as_mut()
            && let Err(e) = sqlx::query("PRAGMA wal_checkpoint(PASSIVE)")
                .execute(&mut *c)
                .await
        {
            tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
        }
    }
}

/// Audit rows per `INSERT` statement at most: a batch is inserted in chunks
/// of 32, 16, 8, 4, 2 and 1 rows, so at most six statements are prepared
/// (14 parameters a row, far below SQLite's limit).
const AUDIT_CHUNK: usize = 32;

/// One chained audit row, ready to bind.
struct AuditRow {
    event: AuditEvent,
    chain_id: String,
    chain_seq: i64,
    hash: String,
    record: String,
}

/// Chains `event` onto `chain` and returns its row.
fn audit_row(event: &AuditEvent, chain: &mut ChainState) -> Result<AuditRow, StoreError> {
    let (event, record, hash) = chain.append(event).map_err(unavailable)?;
    Ok(AuditRow {
        event,
        chain_id: chain.id.clone(),
        chain_seq: to_i64(chain.seq),
        hash,
        record,
    })
}

/// The audit `INSERT` for 2^k rows, at index k (k = 0..=5).
static AUDIT_INSERTS: std::sync::LazyLock<Vec<String>> = std::sync::LazyLock::new(|| {
    const ROW: &str = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)";
    (0..=AUDIT_CHUNK.ilog2())
        .map(|k| {
            format!(
                "INSERT INTO audit (at_ms, event, decision, agent_iss, agent_sub, task_id, \
                 parent_id, tool, jti, replica, chain_id, chain_seq, hash, record) VALUES {}",
                vec![ROW; 1 << k].join(", ")
            )
        })
        .collect()
});

/// Inserts `rows` in order, several to a statement.
async fn insert_audit(tx: &mut SqliteConnection, rows: &[AuditRow]) -> Result<(), StoreError> {
    let mut rest = rows;
    while !rest.is_empty() {
        // The largest power of two that fits, up to the chunk size.
        let k = rest.len().min(AUDIT_CHUNK).ilog2();
        let (chunk, tail) = rest.split_at(1 << k);
        rest = tail;
        let Some(sql) = usize::try_from(k).ok().and_then(|k| AUDIT_INSERTS.get(k)) else {
            return Err(StoreError::Unavailable("audit statement missing".into()));
        };
        let mut q = sqlx::query(sql.as_str());
        for r in chunk {
            let e = &r.event;
            q = q
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
                .bind(&r.chain_id)
                .bind(r.chain_seq)
                .bind(&r.hash)
                .bind(&r.record);
        }
        q.execute(&mut *tx).await.map_err(unavailable)?;
    }
    Ok(())
}

/// The head of every chain in the store.
async fn chain_heads(tx: &mut SqliteConnection) -> Result<Vec<ChainLink>, StoreError> {
    let rows = sqlx::query(
        // A skip scan over the (chain_id, chain_seq) index: one index probe per
        // chain instead of reading every record (a GROUP BY takes ~0.1 s per
        // million records, and this runs at every start).
        "WITH RECURSIVE chains(id) AS (SELECT MIN(chain_id) FROM audit \
         UNION ALL SELECT (SELECT MIN(chain_id) FROM audit WHERE chain_id > chains.id) \
         FROM chains WHERE chains.id IS NOT NULL) \
         SELECT a.chain_id, a.chain_seq, a.hash FROM chains JOIN audit a ON a.chain_id = chains.id \
         AND a.chain_seq = (SELECT MAX(chain_seq) FROM audit WHERE chain_id = chains.id) \
         ORDER BY a.seq",
    )
    .fetch_all(&mut *tx)
    .await
    .map_err(unavailable)?;
    rows.iter().map(rows::chain_link).collect()
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
    // Audit rows are chained in the order of `writes` and inserted together
    // at the end of the transaction.
    let mut audit = Vec::new();
    if let Some(event) = chain.genesis_for(writes) {
        let mut event = event;
        event.links = chain_heads(&mut tx).await?;
        audit.push(audit_row(&event, chain)?);
    }
    for write in writes {
        match write {
            Write::InsertTask(t) => {
                let (agent, actor, may_act) = rows::task_json(t)?;
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
                .map_err(failed)?;
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
            }
            | Write::ClaimToken {
                jti,
                task_id,
                expires_at,
                at,
            } => {
                let once = matches!(write, Write::ClaimToken { .. });
                let inserted = sqlx::query(if once {
                    "INSERT INTO revoked_tokens (jti, task_id, expires_at, revoked_at) VALUES (?, ?, ?, ?)"
                } else {
                    "INSERT OR IGNORE INTO revoked_tokens (jti, task_id, expires_at, revoked_at) VALUES (?, ?, ?, ?)"
                })
                .bind(jti)
                .bind(task_id)
                .bind(to_i64(*expires_at))
                .bind(to_i64(*at))
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
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
                sqlx::query("DELETE FROM signing_keys WHERE publish_until <= ?")
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
                .map_err(failed)?;
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
            Write::Audit(a) => audit.push(audit_row(a, chain)?),
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
                .map_err(failed)?;
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
            Write::InsertKey(k) => {
                sqlx::query(concat!(
                    "INSERT INTO signing_keys (",
                    key_columns!(),
                    ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                ))
                .bind(&k.kid)
                .bind(k.purpose.as_str())
                .bind(&k.alg)
                .bind(&k.public_jwk)
                .bind(&k.sealed)
                .bind(to_i64(k.created_at))
                .bind(to_i64(k.active_at))
                .bind(k.retired_at.map(to_i64))
                .bind(k.publish_until.map(to_i64))
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
            }
            Write::RetireKey {
                kid,
                at,
                publish_until,
            } => {
                sqlx::query(
                    "UPDATE signing_keys SET retired_at = ?1, publish_until = ?2 \
                     WHERE kid = ?3 AND retired_at IS NULL",
                )
                .bind(to_i64(*at))
                .bind(to_i64(*publish_until))
                .bind(kid)
                .execute(&mut *tx)
                .await
                .map_err(unavailable)?;
            }
        }
    }
    insert_audit(&mut tx, &audit).await?;
    tx.commit().await.map_err(unavailable)
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.writer.commit(writes).await
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
        row.as_ref().map(rows::task).transpose()
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
        rows.iter().map(rows::task).collect()
    }

    async fn open_descendants(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let rows = sqlx::query(
            "WITH RECURSIVE sub(id) AS (SELECT id FROM tasks WHERE parent_id = ?1 \
             UNION SELECT t.id FROM tasks t JOIN sub ON t.parent_id = sub.id) \
             SELECT tasks.id FROM tasks JOIN sub ON tasks.id = sub.id WHERE tasks.ended_at IS NULL \
             ORDER BY tasks.id",
        )
        .bind(id)
        .fetch_all(&self.reads)
        .await
        .map_err(unavailable)?;
        rows.iter().map(|r| rows::Cols::text(r, "id")).collect()
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
        rows.iter().map(rows::audit_event).collect()
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
        rows.iter().map(rows::stored_record).collect()
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
        rows.iter().map(rows::revocation).collect()
    }

    async fn latest_revocation(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS m FROM revocations")
            .fetch_one(&self.reads)
            .await
            .map_err(unavailable)?;
        rows::Cols::int(&row, "m")
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
        row.as_ref().map(rows::approval).transpose()
    }

    async fn pending_approvals(&self, now: u64, limit: u32) -> Result<Vec<Approval>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            approval_columns!(),
            " FROM approvals WHERE state = 'pending' AND expires_at > ? ORDER BY created_at, id LIMIT ?",
        ))
        .bind(to_i64(now))
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await
        .map_err(unavailable)?;
        rows.iter().map(rows::approval).collect()
    }

    async fn expired_approvals(&self, now: u64, limit: u32) -> Result<Vec<Approval>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            approval_columns!(),
            " FROM approvals WHERE state = 'pending' AND expires_at <= ? ORDER BY expires_at, id LIMIT ?",
        ))
        .bind(to_i64(now))
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await
        .map_err(unavailable)?;
        rows.iter().map(rows::approval).collect()
    }

    async fn chain_links(&self) -> Result<Vec<ChainLink>, StoreError> {
        let rows =
            sqlx::query("SELECT record FROM audit WHERE event = 'chain.started' ORDER BY seq")
                .fetch_all(&self.reads)
                .await
                .map_err(unavailable)?;
        let mut links = Vec::new();
        for r in &rows {
            links.extend(rows::genesis_links(r)?);
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
        rows.iter().map(rows::checkpoint).collect()
    }

    async fn keys(&self, now: u64) -> Result<Vec<StoredKey>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            key_columns!(),
            " FROM signing_keys WHERE publish_until IS NULL OR publish_until > ? \
             ORDER BY created_at, kid"
        ))
        .bind(to_i64(now))
        .fetch_all(&self.reads)
        .await
        .map_err(unavailable)?;
        rows.iter().map(rows::key).collect()
    }

    async fn secrets(&self) -> Result<Vec<SecretRecord>, StoreError> {
        let rows = sqlx::query(
            "SELECT name, action, version, sealed, created_at, retired_at FROM secrets \
             ORDER BY name, action, version DESC",
        )
        .fetch_all(&self.reads)
        .await
        .map_err(unavailable)?;
        rows.iter().map(rows::secret).collect()
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
        rows.iter().map(rows::secret).collect()
    }

    fn chain_head(&self) -> Option<ChainLink> {
        self.writer.head()
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<Changes> {
        self.writer.changes().subscribe()
    }
}
