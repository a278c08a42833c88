//! The embedded store: SQLite in WAL mode with `synchronous=FULL`.
//!
//! The writer ([`crate::writer`]) owns the only connection that changes
//! data ([`crate::sqlite_writer`], run on the writer's own thread) and
//! group commits: concurrent requests share a single fsync. A checkpointer
//! thread beside it copies the WAL into the database file. Reads use a
//! small sqlx pool of read-only connections, which WAL lets run beside the
//! writer; the point reads on request paths, and the revocation feed's
//! pages, go through read-only rusqlite connections on the caller's thread
//! instead ([`crate::sqlite_reads`]).
//! After a failed write the writer drops its connection and opens a new one
//! for the next batch, so the store recovers by itself once the disk does.

use std::path::{Path, PathBuf};
use std::time::Duration;

use sqlx::sqlite::{
    SqliteConnectOptions, SqliteJournalMode, SqlitePool, SqlitePoolOptions, SqliteSynchronous,
};
use sqlx::{ConnectOptions as _, Connection as _};

use crate::rows::{
    self, approval_columns, key_columns, orphaned_where, task_columns, to_i64, unavailable,
};
use crate::schema::Schema;
use crate::sqlite_reads::PointReads;
use crate::sqlite_writer::SqliteWriter;
use crate::writer::{Changes, Writer};
use crate::{
    Approval, AuditEvent, AuditFilter, ChainLink, Checkpoint, Revocation, SecretRecord, Store,
    StoreError, StoredKey, StoredRecord, TaskRecord, Write,
};

/// Most revocations the feed reads in one blocking call.
const FEED_CHUNK: usize = 250;

/// The embedded SQLite store.
#[derive(Debug)]
pub struct SqliteStore {
    reads: SqlitePool,
    points: PointReads,
    writer: Writer,
    /// Looks for revocations another process committed (see [`OTHERS`]).
    others: tokio::task::JoinHandle<()>,
}

impl Drop for SqliteStore {
    fn drop(&mut self) {
        self.others.abort();
    }
}

/// How often the embedded store looks for revocations that another process
/// committed to its file (`scrip task revoke` beside `scrip serve`): its
/// own writer signals its own at once, but nothing signals theirs. One
/// found makes [`Store::changes`] signal a revocation, so that what was
/// kept in memory of the store (a task record) is read again.
pub(crate) const OTHERS: std::time::Duration = std::time::Duration::from_secs(1);

/// The embedded store's migrations.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

impl SqliteStore {
    /// Opens (creating if needed) the database at `path` and applies the
    /// migrations.
    ///
    /// # Errors
    /// [`StoreError::Open`] when the file cannot be opened or migrated.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        Self::open_as(path, Schema::Migrate).await
    }

    /// Opens the database at `path`: as [`SqliteStore::open`] with
    /// [`Schema::Migrate`]; with [`Schema::Require`] it is neither created
    /// nor migrated, and refused unless its schema is this scrip's.
    ///
    /// # Errors
    /// [`StoreError::Open`] when the file cannot be opened, migrated, or
    /// (`Require`) holds another schema.
    pub async fn open_as(path: &Path, schema: Schema) -> Result<Self, StoreError> {
        // Processes started together on a new or upgraded store (`scrip
        // serve` beside `scrip proxy`) would race to create it, switch it to
        // WAL and apply each migration (sqlx's SQLite migrator takes no
        // lock), and the losers fail on a lock or on what the winner
        // created: they take turns instead. A store that is only read is
        // never created or migrated.
        let _turn = match schema {
            Schema::Migrate => Some(MigrationLock::take(path).await?),
            Schema::Require => None,
        };
        Self::open_once(path, schema).await
    }

    async fn open_once(path: &Path, schema: Schema) -> Result<Self, StoreError> {
        if schema == Schema::Migrate {
            keep_private(path)?;
        }
        let options = SqliteConnectOptions::new()
            .filename(path)
            .create_if_missing(schema == Schema::Migrate)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Full)
            .busy_timeout(Duration::from_secs(5))
            .foreign_keys(true);
        let mut conn = options
            .connect()
            .await
            .map_err(|e| StoreError::Open(format!("`{}`: {e}", path.display())))?;
        match schema {
            Schema::Migrate => {
                MIGRATOR
                    .run(&mut conn)
                    .await
                    .map_err(|e| StoreError::Open(crate::schema::migration_failed(&e)))?;
                keep_private(path)?;
            }
            Schema::Require => crate::schema::require(&mut conn, &MIGRATOR).await?,
        }
        let reads = SqlitePoolOptions::new()
            .max_connections(4)
            .min_connections(1)
            // As the writer's: a read's sort (bounded by its LIMIT) stays in
            // memory, not a temporary file a read-only root file system
            // has no room for. Not the migrations': an index build over a
            // large table may spill, into the temporary directory.
            .connect_with(options.read_only(true).pragma("temp_store", "memory"))
            .await
            .map_err(|e| StoreError::Open(e.to_string()))?;
        let writer =
            Writer::spawn_on_own_thread(SqliteWriter::open(path)?, crate::chain::new_chain_id()?)?;
        // Closed only now: the last connection to close checkpoints the
        // whole WAL a previous process left, which would delay start-up.
        conn.close()
            .await
            .map_err(|e| StoreError::Open(e.to_string()))?;
        let others = scrip_vital::spawn(
            "revocations of other processes",
            others(reads.clone(), writer.changes().clone()),
        );
        Ok(Self {
            reads,
            points: PointReads::new(path),
            writer,
            others,
        })
    }

    /// A store in a fresh file under `dir`, for tests.
    ///
    /// # Errors
    /// As [`SqliteStore::open`].
    pub async fn open_in(dir: &Path) -> Result<Self, StoreError> {
        Self::open(&dir.join("scrip.db")).await
    }
}

/// Signals a revocation each time the newest one in the file changes, read
/// every [`OTHERS`]: one another process committed (or one of this
/// process's, signalled already: a second signal only has what was kept in
/// memory read again).
async fn others(reads: SqlitePool, changes: tokio::sync::watch::Sender<crate::Changes>) {
    let mut seen = None;
    loop {
        let newest = sqlx::query_scalar::<_, i64>("SELECT COALESCE(MAX(seq), 0) FROM revocations")
            .fetch_one(&reads)
            .await;
        // Unreadable now (a busy disk): looked at again next time.
        if let Ok(newest) = newest {
            if seen.is_some_and(|s| s != newest) {
                changes.send_modify(|c| c.revocations += 1);
            }
            seen = Some(newest);
        }
        tokio::time::sleep(OTHERS).await;
    }
}

#[async_trait::async_trait]
impl Store for SqliteStore {
    async fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.writer.commit(writes).await
    }

    async fn task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        self.points.task(id)
    }

    async fn token_revoked(&self, jti: &str) -> Result<bool, StoreError> {
        self.points.token_revoked(jti)
    }

    async fn token_task(
        &self,
        jti: &str,
        task_id: &str,
    ) -> Result<Option<(TaskRecord, bool)>, StoreError> {
        self.points.token_task(jti, task_id)
    }

    async fn due_tasks(&self, now: u64, limit: u32) -> Result<Vec<TaskRecord>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE ended_at IS NULL AND expires_at <= ? ORDER BY expires_at, depth DESC, id LIMIT ?"
        ))
        .bind(to_i64(now))
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await
        .map_err(unavailable)?;
        rows.iter().map(rows::task).collect()
    }

    async fn open_tasks(
        &self,
        now: u64,
        agent_sub: Option<&str>,
        after: Option<(u64, &str)>,
        limit: u32,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let (sql, args) =
            rows::open_tasks_query(now, agent_sub, None, after, limit, |n| format!("?{n}"));
        let rows = rows::bind_all(sqlx::query(sqlx::AssertSqlSafe(sql)), args)
            .fetch_all(&self.reads)
            .await
            .map_err(unavailable)?;
        rows.iter().map(rows::task).collect()
    }

    async fn open_tasks_acted_by(
        &self,
        now: u64,
        actor_sub: &str,
        after: Option<(u64, &str)>,
        limit: u32,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let actor = Some((actor_sub, "json_extract(actor, '$.sub')"));
        let (sql, args) =
            rows::open_tasks_query(now, None, actor, after, limit, |n| format!("?{n}"));
        let rows = rows::bind_all(sqlx::query(sqlx::AssertSqlSafe(sql)), args)
            .fetch_all(&self.reads)
            .await
            .map_err(unavailable)?;
        rows.iter().map(rows::task).collect()
    }

    async fn tree_size(&self, id: &str) -> Result<Option<u32>, StoreError> {
        let size: Option<i64> = sqlx::query_scalar(rows::TREE_SIZE)
            .bind(id)
            .fetch_optional(&self.reads)
            .await
            .map_err(unavailable)?;
        Ok(size.map(|n| u32::try_from(n).unwrap_or(u32::MAX)))
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
        let floor = match filter.since_ms {
            Some(since) => Some(rows::since_floor(
                sqlx::query_scalar(rows::FIRST_SINCE)
                    .bind(to_i64(since))
                    .fetch_one(&self.reads)
                    .await
                    .map_err(unavailable)?,
            )),
            None => None,
        };
        let (sql, args) =
            rows::audit_query(filter, floor, |n| format!("?{n}"), rows::sqlite_in_chain);
        let rows = rows::bind_all(sqlx::query(sqlx::AssertSqlSafe(sql)), args)
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
            "SELECT seq, at_ms, event, decision, agent_iss, agent_sub, task_id, parent_id, tool, jti, replica, chain_id, chain_seq, hash, record FROM audit WHERE seq > ? ORDER BY seq LIMIT ?",
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
        // In chunks, yielding between them: a full page of the feed read in
        // one call would hold the request thread for about a millisecond.
        let limit = usize::try_from(limit).unwrap_or(usize::MAX);
        let mut page: Vec<Revocation> = Vec::new();
        let mut cursor = after;
        loop {
            let want = (limit - page.len()).min(FEED_CHUNK);
            let chunk = self.points.revocations(
                cursor,
                to_i64(now),
                u32::try_from(want).unwrap_or(u32::MAX),
            )?;
            let more = chunk.len() == want;
            if let Some(last) = chunk.last() {
                cursor = last.seq;
            }
            page.extend(chunk);
            if !more || page.len() >= limit {
                return Ok(page);
            }
            tokio::task::yield_now().await;
        }
    }

    async fn latest_audit_seq(&self) -> Result<i64, StoreError> {
        let row = sqlx::query("SELECT COALESCE(MAX(seq), 0) AS m FROM audit")
            .fetch_one(&self.reads)
            .await
            .map_err(unavailable)?;
        rows::Cols::int(&row, "m")
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
            " FROM approvals WHERE state = 'pending' AND expires_at > ?1 \
             AND EXISTS (SELECT 1 FROM tasks t WHERE t.id = approvals.task_id AND t.ended_at IS NULL AND t.expires_at > ?1) \
             ORDER BY created_at, id LIMIT ?2",
        ))
        .bind(to_i64(now))
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await
        .map_err(unavailable)?;
        rows.iter().map(rows::approval).collect()
    }

    async fn agent_pending_approvals(
        &self,
        issuer: &str,
        subject: &str,
        now: u64,
    ) -> Result<usize, StoreError> {
        let n: i64 = sqlx::query_scalar(rows::AGENT_PENDING)
            .bind(to_i64(now))
            .bind(issuer)
            .bind(subject)
            .fetch_one(&self.reads)
            .await
            .map_err(unavailable)?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    async fn actor_pending_approvals(&self, task_id: &str, now: u64) -> Result<usize, StoreError> {
        let (_, n): (i64, i64) = sqlx::query_as(rows::PENDING_NEAR_TASK_SQLITE)
            .bind(task_id)
            .bind(to_i64(now))
            .fetch_one(&self.reads)
            .await
            .map_err(unavailable)?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    async fn task_pending_approvals(
        &self,
        task_id: &str,
        now: u64,
    ) -> Result<Vec<Approval>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            approval_columns!(),
            " FROM approvals WHERE state = 'pending' AND expires_at > ? AND task_id = ? ORDER BY created_at, id",
        ))
        .bind(to_i64(now))
        .bind(task_id)
        .fetch_all(&self.reads)
        .await
        .map_err(unavailable)?;
        rows.iter().map(rows::approval).collect()
    }

    async fn task_approved_approvals(
        &self,
        task_id: &str,
        now: u64,
    ) -> Result<Vec<Approval>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            approval_columns!(),
            " FROM approvals WHERE state = 'approved' AND expires_at > ? AND task_id = ? ORDER BY created_at, id",
        ))
        .bind(to_i64(now))
        .bind(task_id)
        .fetch_all(&self.reads)
        .await
        .map_err(unavailable)?;
        rows.iter().map(rows::approval).collect()
    }

    async fn task_denials(&self, task_id: &str, since: u64) -> Result<Vec<Approval>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            approval_columns!(),
            " FROM approvals WHERE state = 'denied' AND task_id = ? AND decided_at >= ? ORDER BY decided_at DESC, id",
        ))
        .bind(task_id)
        .bind(to_i64(since))
        .fetch_all(&self.reads)
        .await
        .map_err(unavailable)?;
        rows.iter().map(rows::approval).collect()
    }

    async fn agent_denials(
        &self,
        issuer: &str,
        subject: &str,
        tool: &str,
        since: u64,
        limit: u32,
    ) -> Result<Vec<Approval>, StoreError> {
        let rows = sqlx::query(rows::AGENT_DENIALS)
            .bind(to_i64(since))
            .bind(tool)
            .bind(issuer)
            .bind(subject)
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
            " FROM approvals WHERE state IN ('pending', 'approved') AND expires_at <= ? ORDER BY expires_at, id LIMIT ?",
        ))
        .bind(to_i64(now))
        .bind(i64::from(limit))
        .fetch_all(&self.reads)
        .await
        .map_err(unavailable)?;
        rows.iter().map(rows::approval).collect()
    }

    async fn orphaned_approvals(&self, now: u64, limit: u32) -> Result<Vec<Approval>, StoreError> {
        let rows = sqlx::query(concat!(
            "SELECT ",
            approval_columns!(),
            " FROM approvals WHERE ",
            orphaned_where!("?1"),
            " ORDER BY expires_at, id LIMIT ?2",
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

    async fn latest_checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        let rows = sqlx::query(crate::rows::LATEST_CHECKPOINTS)
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

    fn sign_heads_with(&self, signer: std::sync::Arc<dyn crate::HeadSigner>) -> bool {
        self.writer.sign_heads_with(signer)
    }

    fn changes(&self) -> tokio::sync::watch::Receiver<Changes> {
        self.writer.changes().subscribe()
    }
}

/// An exclusive lock (`flock`) on `<store>-lock` beside the store, held by
/// a process while it creates, migrates and opens the store. It is released
/// when dropped, or when the process dies.
struct MigrationLock {
    _held: std::fs::File,
}

impl MigrationLock {
    /// How long a process waits for another to open the store.
    const WAIT: Duration = Duration::from_secs(60);

    async fn take(store: &Path) -> Result<Self, StoreError> {
        let mut name = store.as_os_str().to_owned();
        name.push("-lock");
        let path = PathBuf::from(name);
        let failed = |e: std::io::Error| StoreError::Open(format!("`{}`: {e}", path.display()));
        // `flock` needs no more than reading, and the file holds nothing:
        // it is made readable by all, so that one made by root (`sudo scrip
        // secret ...`) does not lock out the user scrip runs as.
        let file = match std::fs::File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                use std::os::unix::fs::PermissionsExt as _;
                let file = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&path)
                    .map_err(failed)?;
                file.set_permissions(std::fs::Permissions::from_mode(0o644))
                    .map_err(failed)?;
                file
            }
            Err(e) => return Err(failed(e)),
        };
        let deadline = tokio::time::Instant::now() + Self::WAIT;
        loop {
            match file.try_lock() {
                Ok(()) => return Ok(Self { _held: file }),
                Err(std::fs::TryLockError::WouldBlock)
                    if tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(std::fs::TryLockError::WouldBlock) => {
                    return Err(StoreError::Open(format!(
                        "another process has been opening the store for {} s and still holds `{}`",
                        Self::WAIT.as_secs(),
                        path.display()
                    )));
                }
                Err(std::fs::TryLockError::Error(e)) => return Err(failed(e)),
            }
        }
    }
}

/// Makes the database at `path` and its WAL and shared-memory files
/// readable by scrip's user only: they hold the audit trail, the tasks'
/// purposes and the agents' identities. A missing database is created
/// mode 0600 (SQLite gives its WAL and shared-memory files the database's
/// mode); existing files that group or others may read are narrowed, as
/// a data directory made by hand (`mkdir`, a mounted volume) under a 022
/// umask would leave them, where the database really is (a symbolic link
/// followed, as SQLite follows it). Called before the store is opened
/// for writing and again once it is (its WAL and shared-memory files
/// made).
///
/// # Errors
/// [`StoreError::Open`] when the database cannot be created, when one of
/// its files belongs to another user than scrip's or root (its owner
/// could rewrite tasks, approvals and revocations), or when group or
/// others may read one and it cannot be narrowed.
fn keep_private(path: &Path) -> Result<(), StoreError> {
    use std::os::unix::fs::{MetadataExt as _, OpenOptionsExt as _, PermissionsExt as _};
    match std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
        Err(e) => return Err(StoreError::Open(format!("`{}`: {e}", path.display()))),
    }
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned());
    for suffix in ["", "-wal", "-shm"] {
        let mut file = real.as_os_str().to_owned();
        file.push(suffix);
        let file = PathBuf::from(file);
        let Ok(meta) = std::fs::metadata(&file) else {
            continue;
        };
        let euid = rustix::process::geteuid().as_raw();
        if meta.uid() != euid && meta.uid() != 0 {
            return Err(StoreError::Open(format!(
                "`{}` is owned by uid {}, not by the user scrip runs as (uid {euid}) or root: its owner could rewrite the store; run scrip as that user, or `chown` the store to the user scrip runs as",
                file.display(),
                meta.uid()
            )));
        }
        let mode = meta.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            std::fs::set_permissions(&file, std::fs::Permissions::from_mode(mode & 0o700))
                .map_err(|e| {
                    StoreError::Open(format!(
                        "`{}` is readable by group or others (mode {mode:o}) and cannot be narrowed: {e}",
                        file.display()
                    ))
                })?;
            tracing::warn!(
                path = %file.display(),
                "the store was readable by group or others (mode {mode:o}); it is now readable by scrip's user only"
            );
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The store's files are scrip's user's alone, in a directory anyone
    /// may read: made so, or narrowed when an older start left them open.
    #[tokio::test]
    async fn the_store_files_are_private() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.path().join("scrip.db");
        let mode = |suffix: &str| {
            let mut f = path.as_os_str().to_owned();
            f.push(suffix);
            std::fs::metadata(f).unwrap().permissions().mode() & 0o777
        };
        let store = SqliteStore::open(&path).await.unwrap();
        store
            .commit(vec![crate::Write::PurgeRevocations { now: 1, limit: 1 }])
            .await
            .unwrap();
        for suffix in ["", "-wal", "-shm"] {
            assert_eq!(mode(suffix), 0o600, "scrip.db{suffix}");
        }
        drop(store);
        for suffix in ["", "-wal", "-shm"] {
            let mut f = path.as_os_str().to_owned();
            f.push(suffix);
            if std::fs::metadata(&f).is_ok() {
                std::fs::set_permissions(&f, std::fs::Permissions::from_mode(0o644)).unwrap();
            }
        }
        drop(SqliteStore::open(&path).await.unwrap());
        assert_eq!(mode(""), 0o600);
        // Through a symbolic link, the files where they are.
        let elsewhere = tempfile::tempdir().unwrap();
        let real = elsewhere.path().join("real.db");
        // With its WAL and the WAL's index, where they are: a dropped
        // store's connections close in the background, and one that closes
        // last read-only leaves the WAL unfolded, holding commits.
        for suffix in ["", "-wal", "-shm"] {
            let (mut from, mut to) = (path.as_os_str().to_owned(), real.as_os_str().to_owned());
            from.push(suffix);
            to.push(suffix);
            if std::fs::metadata(&from).is_ok() {
                std::fs::rename(&from, &to).unwrap();
            }
        }
        std::os::unix::fs::symlink(&real, &path).unwrap();
        std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o644)).unwrap();
        drop(SqliteStore::open(&path).await.unwrap());
        let real_mode = std::fs::metadata(&real).unwrap().permissions().mode() & 0o777;
        assert_eq!(real_mode, 0o600);
        // A store file of another user (not root) is refused for writing:
        // its owner could rewrite tasks, approvals and revocations. Giving
        // a file away takes root, which is how these tests and CI run.
        if rustix::process::geteuid().is_root() {
            std::os::unix::fs::chown(&real, Some(12_345), None).unwrap();
            let Err(StoreError::Open(message)) = SqliteStore::open(&path).await else {
                panic!("a store file of uid 12345 was opened for writing")
            };
            assert!(
                message.contains("is owned by uid 12345, not by the user scrip runs as"),
                "{message}"
            );
            // Root's own store stays usable.
            std::os::unix::fs::chown(&real, Some(0), None).unwrap();
            drop(SqliteStore::open(&path).await.unwrap());
        }
    }

    /// Processes started together on one new or upgraded store (`scrip
    /// serve` beside `scrip proxy`, or `scrip secret`) all open it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
    async fn stores_opened_together_all_migrate() {
        for _ in 0..10 {
            let dir = tempfile::tempdir().unwrap();
            let path = dir.path().join("scrip.db");
            let (a, b, c, d) = tokio::join!(
                SqliteStore::open(&path),
                SqliteStore::open(&path),
                SqliteStore::open(&path),
                SqliteStore::open(&path),
            );
            for open in [a, b, c, d] {
                open.unwrap();
            }
        }
    }

    /// A process waits for the one creating or migrating the store.
    #[tokio::test]
    async fn an_open_waits_for_the_store_to_be_migrated() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scrip.db");
        let turn = MigrationLock::take(&path).await.unwrap();
        // Readable by all, whatever the umask: one root made must not lock
        // out the user scrip runs as (the lock needs only reading).
        use std::os::unix::fs::PermissionsExt as _;
        let lock = dir.path().join("scrip.db-lock");
        assert_eq!(
            std::fs::metadata(&lock).unwrap().permissions().mode() & 0o777,
            0o644
        );
        let open = SqliteStore::open(&path);
        tokio::pin!(open);
        assert!(
            tokio::time::timeout(Duration::from_millis(300), &mut open)
                .await
                .is_err(),
            "opened while another held the lock"
        );
        assert!(!path.exists(), "created while another held the lock");
        drop(turn);
        open.await.unwrap();
    }

    /// How SQLite plans `sql`, its steps joined.
    async fn explain(reads: &SqlitePool, sql: String, args: Vec<rows::Arg>) -> String {
        let query = sqlx::query(sqlx::AssertSqlSafe(format!("EXPLAIN QUERY PLAN {sql}")));
        let rows = rows::bind_all(query, args).fetch_all(reads).await.unwrap();
        rows.iter()
            .map(|r| rows::Cols::text(r, "detail").unwrap())
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// An agent's open tasks are read a page at a time through the index of
    /// open tasks by agent, sought to the page, in order: not every open
    /// task, nor every task the agent ever started. Without an agent,
    /// through the index of open tasks by deadline. A query with `since_ms`
    /// finds where to start through `audit_time`.
    #[tokio::test]
    async fn open_tasks_and_the_start_of_a_time_range_are_sought_by_index() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("scrip.db"))
            .await
            .unwrap();
        for (agent, after, index) in [
            (
                Some("a"),
                None,
                "tasks_agent_open (agent_sub=? AND expires_at>?)",
            ),
            (
                Some("a"),
                Some((5, "t")),
                "tasks_agent_open (agent_sub=? AND expires_at>?)",
            ),
            (None, Some((5, "t")), "tasks_open_expiry (expires_at>?)"),
        ] {
            let (sql, args) =
                rows::open_tasks_query(1, agent, None, after, 10, |n| format!("?{n}"));
            let plan = explain(&store.reads, sql, args).await;
            assert!(plan.contains(index), "{plan}");
            assert!(agent.is_none() || !plan.contains("TEMP B-TREE"), "{plan}");
        }
        let plan = explain(
            &store.reads,
            rows::FIRST_SINCE.into(),
            vec![rows::Arg::Int(1)],
        )
        .await;
        assert!(plan.contains("audit_time (at_ms>?)"), "{plan}");
    }

    /// Each filter of `scrip audit query` reads through its own index, not
    /// the whole table in `seq` order.
    #[tokio::test]
    async fn an_audit_query_uses_the_index_of_its_filter() {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open(&dir.path().join("scrip.db"))
            .await
            .unwrap();
        let plan = |filter: AuditFilter| {
            let reads = store.reads.clone();
            async move {
                let (sql, args) =
                    rows::audit_query(&filter, None, |n| format!("?{n}"), rows::sqlite_in_chain);
                explain(&reads, sql, args).await
            }
        };
        for (filter, index) in [
            (
                AuditFilter {
                    task_id: Some("t1".into()),
                    ..AuditFilter::default()
                },
                "audit_task",
            ),
            (
                AuditFilter {
                    agent_sub: Some("a".into()),
                    ..AuditFilter::default()
                },
                "audit_agent",
            ),
            (
                AuditFilter {
                    tool: Some("github".into()),
                    ..AuditFilter::default()
                },
                "audit_tool",
            ),
            (
                AuditFilter {
                    decision: Some("deny".into()),
                    ..AuditFilter::default()
                },
                "audit_denied",
            ),
        ] {
            let plan = plan(filter).await;
            assert!(plan.contains(index), "{plan}");
        }
    }
}
