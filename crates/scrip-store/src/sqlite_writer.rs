//! The embedded store's one write connection, driven synchronously on the
//! writer's own thread ([`crate::writer::Writer::spawn_on_own_thread`]).
//!
//! Reads go through sqlx's pool ([`crate::sqlite`]); writes do not. sqlx
//! runs every SQLite connection on a worker thread of its own and sends
//! each statement there and each result back, two thread switches per
//! statement, and a group commit is several statements (`BEGIN`, the
//! inserts, `COMMIT`). Profiled, that worker thread spent most of its time
//! in the scheduler, not in SQLite; running the statements on the writer
//! thread itself, through rusqlite (which links the same SQLite library as
//! sqlx), made task starts 23 % faster (BENCHMARKS.md, "Fourth pass").

use std::cell::Cell;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior, params};

use crate::chain::ChainState;
use crate::rows::{self, key_columns, to_i64, unavailable};
use crate::writer::Apply;
use crate::{AuditEvent, ChainLink, StoreError, Write};

/// How often, at most, the writer wakes the checkpointer.
const CHECKPOINT_EVERY: Duration = Duration::from_millis(100);
/// WAL frames (pages) past which the writer finishes a checkpoint itself,
/// so that the WAL starts over (16 MiB with 4 KiB pages).
const CATCH_UP_FRAMES: i64 = 4096;
/// The WAL file is truncated back to this size (bytes) after a checkpoint.
const WAL_SIZE_LIMIT: i64 = 64 << 20;
/// How long a write waits for a lock another process holds.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// How often a write waiting for that lock tries again.
const BUSY_POLL: Duration = Duration::from_millis(1);

thread_local! {
    /// Frames in the WAL after the last commit on this thread, as SQLite
    /// reports them to [`wal_size`]. The write connection is used only on
    /// the writer's thread, which reads this right after its commits.
    static WAL_FRAMES: Cell<i64> = const { Cell::new(0) };
    /// When this thread's write began to wait for the lock it waits for.
    static WAITING_SINCE: Cell<Option<Instant>> = const { Cell::new(None) };
}

/// The write connections' busy handler, called by SQLite on the thread
/// whose write found the lock taken (`tries` is 0 at the first call of
/// each wait): tries again every [`BUSY_POLL`], for [`BUSY_TIMEOUT`] in
/// all. SQLite's own handler (`busy_timeout`) sleeps ever longer between
/// tries, 100 ms once it has waited a quarter of a second: behind another
/// process committing one transaction after another (a `scrip` command
/// beside the server, on the same file), whose lock is free only between
/// its commits, it may miss every such moment until the timeout fails the
/// server's whole batch.
fn wait_for_lock(tries: i32) -> bool {
    let now = Instant::now();
    let since = match WAITING_SINCE.get() {
        Some(since) if tries > 0 => since,
        _ => now,
    };
    WAITING_SINCE.set(Some(since));
    if now.duration_since(since) >= BUSY_TIMEOUT {
        return false;
    }
    std::thread::sleep(BUSY_POLL);
    true
}

/// The write connection's WAL hook: SQLite calls it after each commit with
/// the frames now in the WAL, those just committed included.
fn wal_size(_: &mut rusqlite::hooks::Wal, frames: std::ffi::c_int) -> rusqlite::Result<()> {
    WAL_FRAMES.set(i64::from(frames));
    Ok(())
}

/// A failed statement: a uniqueness violation is a [`StoreError::Conflict`].
fn failed(e: rusqlite::Error) -> StoreError {
    if let rusqlite::Error::SqliteFailure(f, message) = &e
        && matches!(
            f.extended_code,
            rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE | rusqlite::ffi::SQLITE_CONSTRAINT_PRIMARYKEY
        )
    {
        return StoreError::Conflict(message.clone().unwrap_or_else(|| e.to_string()));
    }
    unavailable(e)
}

/// Opens the write connection on a database the migrations already set up.
fn connect(path: &Path) -> rusqlite::Result<Connection> {
    let mut conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_handler(Some(wait_for_lock))?;
    // `synchronous=FULL`: a commit returns once the WAL is fsync'd.
    // `wal_autocheckpoint=0`: see `after_commit`.
    // `temp_store=MEMORY`: a multi-row `INSERT` keeps a statement journal
    // (the pages it changed, to undo just that statement), and past 64 KiB
    // SQLite spills it to a new file in the temporary directory: a file
    // created, written and unlinked for each group commit. In memory it is
    // never spilled. It is not needed to recover after a crash (the WAL is).
    conn.execute_batch(&format!(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA foreign_keys = ON; \
         PRAGMA journal_size_limit = {WAL_SIZE_LIMIT}; PRAGMA wal_autocheckpoint = 0; \
         PRAGMA temp_store = MEMORY;"
    ))?;
    Ok(conn)
}

/// [`connect`], and the hook that tells the writer how long the WAL is
/// (registered after the pragmas: `wal_autocheckpoint` replaces it).
fn connect_writer(path: &Path) -> rusqlite::Result<Connection> {
    let mut conn = connect(path)?;
    conn.wal_hook(Some(wal_size))?;
    Ok(conn)
}

/// The writer's connection; [`Apply`] for the SQLite store.
pub(crate) struct SqliteWriter {
    conn: Option<Connection>,
    path: PathBuf,
    checkpointer: Checkpointer,
    woke: Instant,
    /// [`CHECKPOINT_EVERY`] and [`CATCH_UP_FRAMES`] (other values in tests).
    wake_every: Duration,
    catch_up_frames: i64,
    /// WAL frames at which the writer next checkpoints: [`CATCH_UP_FRAMES`],
    /// or more after a checkpoint that readers kept from finishing.
    catch_up_at: i64,
    /// Checkpoints the writer ran itself.
    #[cfg(test)]
    caught_up: usize,
    /// Whether the last batch's `COMMIT` was attempted: after a failure,
    /// only then may it have taken effect.
    commit_sent: bool,
}

impl SqliteWriter {
    /// Opens the write connection to the database at `path`, and starts
    /// the checkpointer beside it.
    pub(crate) fn open(path: &Path) -> Result<Self, StoreError> {
        let open = |e: rusqlite::Error| StoreError::Open(format!("`{}`: {e}", path.display()));
        let conn = connect_writer(path).map_err(open)?;
        let checkpointer = Checkpointer::start(connect(path).map_err(open)?, path)?;
        Ok(Self {
            conn: Some(conn),
            path: path.to_path_buf(),
            checkpointer,
            woke: Instant::now(),
            wake_every: CHECKPOINT_EVERY,
            catch_up_frames: CATCH_UP_FRAMES,
            catch_up_at: CATCH_UP_FRAMES,
            #[cfg(test)]
            caught_up: 0,
            commit_sent: false,
        })
    }

    fn apply_now(&mut self, writes: &[&Write], chain: &mut ChainState) -> Result<(), StoreError> {
        self.commit_sent = false;
        let conn = match &mut self.conn {
            Some(c) => c,
            empty => empty.insert(connect_writer(&self.path).map_err(unavailable)?),
        };
        let result = apply_on(conn, writes, chain, &mut self.commit_sent);
        if matches!(result, Err(StoreError::Unavailable(_))) {
            // Start afresh next time: the connection may be what is broken.
            self.conn = None;
        }
        result
    }
}

#[async_trait::async_trait]
impl Apply for SqliteWriter {
    async fn apply(&mut self, writes: &[&Write], chain: &mut ChainState) -> Result<(), StoreError> {
        self.apply_now(writes, chain)
    }

    fn may_have_committed(&self) -> bool {
        // Before the `COMMIT`, a failure rolled the transaction back; a WAL
        // transaction that never committed is not recovered on reopening.
        self.commit_sent
    }

    /// Keeps the WAL short without holding up commits. The writer
    /// connection never checkpoints inside a commit (`wal_autocheckpoint =
    /// 0`: SQLite's automatic checkpoint would run in the commit that
    /// crosses its threshold, and add its writes and the database file's
    /// sync to that group commit's wait). Instead, at most every
    /// [`CHECKPOINT_EVERY`], the writer wakes the [`Checkpointer`], which
    /// copies the WAL into the database on its own thread while commits go
    /// on. Frames committed during its pass stay in the WAL; once the WAL
    /// holds [`CATCH_UP_FRAMES`], the writer copies what is left itself,
    /// between two commits, so the next commit starts the WAL over
    /// (truncated to `journal_size_limit`). While it catches up it does not
    /// wake the checkpointer: a pass in progress holds the lock the
    /// writer's checkpoint needs, and the WAL starts over only when no
    /// other connection is reading it, so a checkpointer woken again and
    /// again (its passes as long as the time between wakes, on a loaded
    /// host) would keep the WAL from ever starting over. The WAL's length
    /// is SQLite's own count ([`wal_size`]), not the checkpointer's, so a
    /// checkpointer that is starved of CPU or cannot open its connection
    /// leaves the writer more to copy, never a WAL that grows without end.
    /// Durability is the WAL's (`synchronous=FULL`); a checkpoint that
    /// fails is retried later.
    async fn after_commit(&mut self) {
        let frames = WAL_FRAMES.get();
        if frames < self.catch_up_frames {
            // The WAL started over, or is still short.
            self.catch_up_at = self.catch_up_frames;
        }
        if frames < self.catch_up_at {
            if self.woke.elapsed() >= self.wake_every {
                self.woke = Instant::now();
                self.checkpointer.wake();
            }
            return;
        }
        let Some(c) = &self.conn else { return };
        #[cfg(test)]
        {
            self.caught_up += 1;
        }
        match checkpoint(c) {
            // The checkpointer is in a pass, and is not woken again until
            // the writer has caught up: after the next commit.
            Ok(report) if report.busy => {}
            // A reader's snapshot kept some frames in the WAL: try again
            // once as many more have been committed, not after every commit.
            Ok(report) if report.copied < report.frames => {
                self.catch_up_at = frames.saturating_add(self.catch_up_frames);
            }
            Ok(_) => self.catch_up_at = self.catch_up_frames,
            // Tried again once as many more have been committed, as above,
            // not after every commit (the disk full, each try would copy
            // pages until it fails, and say so).
            Err(e) => {
                self.catch_up_at = frames.saturating_add(self.catch_up_frames);
                tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
            }
        }
    }
}

/// What `PRAGMA wal_checkpoint` reports.
struct CheckpointReport {
    /// Another connection held a lock the checkpoint needed (in `PASSIVE`
    /// mode it then did what it could without waiting).
    busy: bool,
    /// Frames in the WAL.
    frames: i64,
    /// Of those, frames now copied into the database file.
    copied: i64,
}

/// A `PASSIVE` checkpoint: copies what it can of the WAL into the database
/// without waiting for, or blocking, readers and the writer.
fn checkpoint(conn: &Connection) -> rusqlite::Result<CheckpointReport> {
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| {
        Ok(CheckpointReport {
            busy: row.get::<_, i64>(0)? != 0,
            frames: row.get(1)?,
            copied: row.get(2)?,
        })
    })
}

/// Copies the WAL into the database file on a thread of its own, each time
/// the writer wakes it: a pass writes the pages changed since the last one
/// and syncs the database file, which would otherwise hold up the next
/// group commit (SQLite lets a checkpoint run beside the writer). It stops
/// when the writer is dropped.
struct Checkpointer {
    wake: std::sync::mpsc::SyncSender<()>,
}

impl Checkpointer {
    fn start(conn: Connection, path: &Path) -> Result<Self, StoreError> {
        let (wake, woken) = std::sync::mpsc::sync_channel::<()>(1);
        let path = path.to_path_buf();
        std::thread::Builder::new()
            .name("scrip-checkpoint".into())
            .spawn(move || {
                scrip_vital::guarded("WAL checkpointer", move || checkpoints(conn, &path, &woken));
            })
            .map_err(|e| StoreError::Open(format!("cannot start the WAL checkpointer: {e}")))?;
        Ok(Self { wake })
    }

    /// Asks for a pass, unless one is already asked for.
    fn wake(&self) {
        let _ = self.wake.try_send(());
    }
}

/// The checkpointer's thread: a pass each time it is woken, until the
/// writer is dropped.
fn checkpoints(conn: Connection, path: &Path, woken: &std::sync::mpsc::Receiver<()>) {
    let mut conn = Some(conn);
    while woken.recv().is_ok() {
        let c = match conn.take().map_or_else(|| connect(path), Ok) {
            Ok(c) => conn.insert(c),
            Err(e) => {
                tracing::warn!(error = %e, "cannot open the checkpoint connection; will retry");
                continue;
            }
        };
        if let Err(e) = checkpoint(c) {
            tracing::warn!(error = %e, "WAL checkpoint failed; will retry");
            conn = None;
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
    at_ms: i64,
    chain_id: String,
    chain_seq: i64,
    hash: String,
    record: String,
}

/// Chains `event` onto `chain` and returns its row.
fn audit_row(event: &AuditEvent, chain: &mut ChainState) -> Result<AuditRow, StoreError> {
    let (event, record, hash) = chain.append(event).map_err(unavailable)?;
    Ok(AuditRow {
        at_ms: to_i64(event.at_ms),
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
fn insert_audit(tx: &Transaction<'_>, rows: &[AuditRow]) -> Result<(), StoreError> {
    let mut rest = rows;
    while !rest.is_empty() {
        // The largest power of two that fits, up to the chunk size.
        let k = rest.len().min(AUDIT_CHUNK).ilog2();
        let (chunk, tail) = rest.split_at(1 << k);
        rest = tail;
        let Some(sql) = usize::try_from(k).ok().and_then(|k| AUDIT_INSERTS.get(k)) else {
            return Err(StoreError::Unavailable("audit statement missing".into()));
        };
        let values = chunk.iter().flat_map(|r| {
            let e = &r.event;
            [
                &r.at_ms as &dyn rusqlite::ToSql,
                &e.event,
                &e.decision,
                &e.agent_iss,
                &e.agent_sub,
                &e.task_id,
                &e.parent_id,
                &e.tool,
                &e.jti,
                &e.replica,
                &r.chain_id,
                &r.chain_seq,
                &r.hash,
                &r.record,
            ]
        });
        tx.prepare_cached(sql)
            .and_then(|mut s| s.execute(rusqlite::params_from_iter(values)))
            .map_err(unavailable)?;
    }
    Ok(())
}

/// The heads a new chain links ([`rows::UNLINKED_HEADS`]), recorded as
/// linked.
fn link_heads(tx: &Transaction<'_>) -> Result<Vec<ChainLink>, StoreError> {
    let links: Vec<ChainLink> = {
        let mut stmt = tx
            .prepare_cached(rows::UNLINKED_HEADS)
            .map_err(unavailable)?;
        let rows = stmt
            .query_map([], |row| Ok(rows::chain_link(row)))
            .map_err(unavailable)?;
        rows.map(|l| l.map_err(unavailable).and_then(|r| r))
            .collect::<Result<_, _>>()?
    };
    for l in &links {
        run(tx, rows::LINKED, params![l.chain_id, to_i64(l.chain_seq)]).map_err(unavailable)?;
    }
    Ok(links)
}

/// How many approvals of a task wait at a time, and how many of them are for
/// one tool and actions.
const PENDING_OF_TASK: &str = "SELECT COUNT(*), COALESCE(SUM(tool = ?3 AND actions = ?4), 0) \
     FROM approvals WHERE task_id = ?1 AND state = 'pending' AND expires_at > ?2";

/// [`StoreError::Conflict`] saying `what` when task `id` has ended.
fn refuse_if_ended(tx: &Transaction<'_>, id: &str, what: &str) -> Result<(), StoreError> {
    let ended = tx
        .prepare_cached(rows::TASK_ENDED)
        .and_then(|mut s| s.exists([id]))
        .map_err(unavailable)?;
    if ended {
        return Err(StoreError::Conflict(format!("task {id} has ended: {what}")));
    }
    Ok(())
}

/// Runs one statement of the transaction.
fn run(tx: &Transaction<'_>, sql: &str, params: impl rusqlite::Params) -> rusqlite::Result<usize> {
    tx.prepare_cached(sql)?.execute(params)
}

fn apply_on(
    conn: &mut Connection,
    writes: &[&Write],
    chain: &mut ChainState,
    commit_sent: &mut bool,
) -> Result<(), StoreError> {
    // IMMEDIATE takes the write lock up front: a deferred transaction that
    // reads (the chain heads) and then writes fails at once with "busy" when
    // another connection wrote in between, instead of waiting for it.
    let tx = conn
        .transaction_with_behavior(TransactionBehavior::Immediate)
        .map_err(unavailable)?;
    // Audit rows are chained in the order of `writes` and inserted together
    // at the end of the transaction.
    let mut audit = Vec::new();
    let before = chain.seq;
    if let Some(event) = chain.genesis_for(writes) {
        let mut event = event;
        event.links = link_heads(&tx)?;
        for p in chain.predecessors() {
            let held: i64 = tx
                .prepare_cached(rows::HELD_UP_TO)
                .and_then(|mut s| {
                    s.query_row(params![p.chain_id, to_i64(p.chain_seq), p.hash], |r| {
                        r.get(0)
                    })
                })
                .map_err(unavailable)?;
            chain.note_loss(&mut event, p, u64::try_from(held).unwrap_or(0));
        }
        audit.push(audit_row(&event, chain)?);
    }
    for write in writes {
        apply_one(&tx, write)?;
        if let Write::Audit(a) = write {
            audit.push(audit_row(a, chain)?);
        }
    }
    insert_audit(&tx, &audit)?;
    if let Some(head) = chain.signed_head(before)? {
        let c = &head.checkpoint;
        match &head.over {
            None => put_checkpoint(&tx, rows::SIGNED_HEAD, c)?,
            Some(over) => {
                let changed = run(
                    &tx,
                    rows::SIGNED_HEAD_OVER,
                    params![
                        c.chain_id,
                        to_i64(c.chain_seq),
                        c.hash,
                        to_i64(c.at_ms),
                        c.signature,
                        to_i64(over.chain_seq),
                        over.hash
                    ],
                )
                .map_err(unavailable)?;
                rows::head_replaced(u64::try_from(changed).unwrap_or(0), over)?;
            }
        }
    }
    *commit_sent = true;
    tx.commit().map_err(unavailable)
}

/// Runs `sql` with a signed checkpoint's five columns (chain, position,
/// hash, time, signature), in that order.
fn put_checkpoint(
    tx: &Transaction<'_>,
    sql: &str,
    c: &crate::Checkpoint,
) -> Result<(), StoreError> {
    run(
        tx,
        sql,
        params![
            c.chain_id,
            to_i64(c.chain_seq),
            c.hash,
            to_i64(c.at_ms),
            c.signature
        ],
    )
    .map_err(unavailable)?;
    Ok(())
}

/// Applies one write other than an audit record (those are chained and
/// inserted together by [`apply_on`]).
fn apply_one(tx: &Transaction<'_>, write: &Write) -> Result<(), StoreError> {
    match write {
        Write::Audit(_) => {}
        Write::TaskOpen { id } => refuse_if_ended(tx, id, "nothing is issued under it")?,
        Write::NoNewDenial { task, since, seen } => {
            let denied = tx
                .prepare_cached(rows::TASK_DENIED_SINCE)
                .and_then(|mut s| {
                    s.query_map(params![task, to_i64(*since)], |r| r.get::<_, String>(0))?
                        .collect::<rusqlite::Result<Vec<_>>>()
                })
                .map_err(unavailable)?;
            crate::rows::refuse_new_denial(task, &denied, seen)?;
        }
        Write::InsertTask(t) => {
            // A child only of a parent that has not ended: checked inside the
            // transaction, so a revocation committed after the server read the
            // parent cannot leave the child behind (the writer serialises
            // commits, and an `EndTask` later in this one sees the child).
            // The tree's root counts the sub-task, up to MAX_SUBTASKS.
            let mut root = None;
            if let Some(parent) = &t.parent {
                use rusqlite::OptionalExtension as _;
                let found: Option<String> = tx
                    .prepare_cached(rows::TASK_OPEN_ROOT)
                    .and_then(|mut s| s.query_row([parent], |r| r.get(0)).optional())
                    .map_err(unavailable)?;
                let Some(found) = found else {
                    return Err(StoreError::Conflict(format!(
                        "parent task {parent} has ended"
                    )));
                };
                let counted = tx
                    .prepare_cached(rows::COUNT_SUBTASK)
                    .and_then(|mut s| s.execute(params![found, i64::from(crate::MAX_SUBTASKS)]))
                    .map_err(unavailable)?;
                if counted == 0 {
                    return Err(rows::too_many_subtasks(&found));
                }
                root = Some(found);
            }
            let (agent, actor, may_act) = rows::task_json(t)?;
            run(
                tx,
                "INSERT INTO tasks (id, parent_id, agent, actor, may_act, agent_iss, agent_sub, grants, purpose, \
                 environment, depth, token_jti, created_at, expires_at, held, root_id) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                params![
                    t.id,
                    t.parent,
                    agent,
                    actor,
                    may_act,
                    t.agent.issuer,
                    t.agent.subject,
                    t.grants,
                    t.purpose,
                    t.environment,
                    i64::from(t.depth),
                    t.token_jti,
                    to_i64(t.created_at),
                    to_i64(t.expires_at),
                    t.held,
                    root,
                ],
            )
            .map_err(failed)?;
        }
        Write::EndTask {
            id,
            at,
            reason,
            grace,
        }
        | Write::EndOpenTask {
            id,
            at,
            reason,
            grace,
        } => {
            if matches!(write, Write::EndOpenTask { .. }) {
                refuse_if_ended(tx, id, "it is not ended again")?;
            }
            let at = to_i64(*at);
            run(
                tx,
                "WITH RECURSIVE sub(id) AS (SELECT ?1 UNION SELECT t.id FROM tasks t JOIN sub ON t.parent_id = sub.id) \
                 INSERT INTO revocations (kind, txn, jti, exp, at) \
                 SELECT 'task', id, NULL, expires_at + ?3, ?2 FROM tasks \
                 WHERE id IN sub AND expires_at + ?3 > ?2 AND (ended_at IS NULL \
                 OR (ended_at >= expires_at AND NOT EXISTS (SELECT 1 FROM revocations r WHERE r.kind = 'task' AND r.txn = tasks.id)))",
                params![id, at, to_i64(*grace)],
            )
            .map_err(unavailable)?;
            run(
                tx,
                "WITH RECURSIVE sub(id) AS (SELECT ?1 UNION SELECT t.id FROM tasks t JOIN sub ON t.parent_id = sub.id) \
                 UPDATE tasks SET ended_at = ?2, end_reason = CASE WHEN id = ?1 THEN ?3 ELSE 'parent ended' END \
                 WHERE id IN sub AND ended_at IS NULL",
                params![id, at, reason],
            )
            .map_err(unavailable)?;
        }
        Write::AnnounceEnded { id, at, grace } => {
            let published = tx
                .prepare_cached("SELECT 1 FROM revocations WHERE kind = 'task' AND txn = ?1")
                .and_then(|mut s| s.exists([id]))
                .map_err(unavailable)?;
            if published {
                return Err(StoreError::Conflict(format!(
                    "task {id}'s end is published already"
                )));
            }
            run(
                tx,
                "WITH RECURSIVE sub(id) AS (SELECT ?1 UNION SELECT t.id FROM tasks t JOIN sub ON t.parent_id = sub.id) \
                 INSERT INTO revocations (kind, txn, jti, exp, at) \
                 SELECT 'task', id, NULL, expires_at + ?3, ?2 FROM tasks \
                 WHERE id IN sub AND ended_at IS NOT NULL AND expires_at + ?3 > ?2 \
                 AND NOT EXISTS (SELECT 1 FROM revocations r WHERE r.kind = 'task' AND r.txn = tasks.id)",
                params![id, to_i64(*at), to_i64(*grace)],
            )
            .map_err(unavailable)?;
        }
        Write::RevokeToken {
            jti,
            task_id,
            expires_at,
            at,
        }
        | Write::RevokeTokenOnce {
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
            let once = !matches!(write, Write::RevokeToken { .. });
            if matches!(write, Write::ClaimToken { .. }) {
                // A use claimed after the task ended (a revocation committed
                // between the caller's read and this commit) is no use.
                refuse_if_ended(tx, task_id, "its token's use is not claimed")?;
            }
            let (expires_at, at) = (to_i64(*expires_at), to_i64(*at));
            let inserted = run(
                tx,
                if once {
                    "INSERT INTO revoked_tokens (jti, task_id, expires_at, revoked_at) VALUES (?, ?, ?, ?)"
                } else {
                    "INSERT OR IGNORE INTO revoked_tokens (jti, task_id, expires_at, revoked_at) VALUES (?, ?, ?, ?)"
                },
                params![jti, task_id, expires_at, at],
            )
            .map_err(failed)?;
            if inserted > 0 {
                run(
                    tx,
                    "INSERT INTO revocations (kind, txn, jti, exp, at) VALUES ('token', ?, ?, ?, ?)",
                    params![task_id, jti, expires_at, at],
                )
                .map_err(unavailable)?;
            }
        }
        Write::SpendProof { id, iat } => {
            // Recorded; one recorded already changes nothing, and the
            // commit fails.
            let recorded = run(
                tx,
                "INSERT INTO dpop_proofs (iat, id) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
                params![to_i64(*iat), id.as_slice()],
            )
            .map_err(unavailable)?;
            if recorded == 0 {
                return Err(StoreError::ProofUsed);
            }
        }
        Write::PurgeRevocations { now, limit } => {
            let (now, limit) = (to_i64(*now), i64::from(*limit));
            for sql in [
                "DELETE FROM revoked_tokens WHERE jti IN \
                 (SELECT jti FROM revoked_tokens WHERE expires_at <= ?1 ORDER BY expires_at LIMIT ?2)",
                "DELETE FROM revocations WHERE seq IN \
                 (SELECT seq FROM revocations WHERE exp <= ?1 ORDER BY exp LIMIT ?2)",
                // A few rows at most: every key ever published.
                "DELETE FROM signing_keys WHERE publish_until <= ?1 AND ?2 > 0",
            ] {
                run(tx, sql, params![now, limit]).map_err(unavailable)?;
            }
        }
        Write::PurgeProofs { made_before, limit } => {
            run(
                tx,
                "DELETE FROM dpop_proofs WHERE (iat, id) IN \
                 (SELECT iat, id FROM dpop_proofs WHERE iat <= ?1 ORDER BY iat LIMIT ?2)",
                params![to_i64(*made_before), i64::from(*limit)],
            )
            .map_err(unavailable)?;
        }
        Write::InsertApproval(a) => {
            let (waiting, same): (i64, i64) = tx
                .prepare_cached(PENDING_OF_TASK)
                .and_then(|mut q| {
                    q.query_row(
                        params![a.task_id, to_i64(a.created_at), a.tool, a.actions],
                        |r| Ok((r.get(0)?, r.get(1)?)),
                    )
                })
                .map_err(unavailable)?;
            let (agent_waiting, actor_waiting): (i64, i64) = tx
                .prepare_cached(rows::PENDING_NEAR_TASK_SQLITE)
                .and_then(|mut q| {
                    q.query_row(params![a.task_id, to_i64(a.created_at)], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })
                })
                .map_err(unavailable)?;
            rows::check_pending(a, waiting, same, agent_waiting, actor_waiting)?;
            run(
                tx,
                "INSERT INTO approvals (id, task_id, tool, actions, state, created_at, expires_at, approvable) \
                 VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                params![
                    a.id,
                    a.task_id,
                    a.tool,
                    a.actions,
                    a.state.as_str(),
                    to_i64(a.created_at),
                    to_i64(a.expires_at),
                    a.approvable,
                ],
            )
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
            let changed = run(
                tx,
                "UPDATE approvals SET state = ?1, \
                 decided_by = COALESCE(?2, decided_by), decided_at = CASE WHEN ?2 IS NULL THEN decided_at ELSE ?3 END, \
                 reason = COALESCE(?4, reason), token_jti = COALESCE(?5, token_jti) \
                 WHERE id = ?6 AND state = ?7",
                params![
                    to.as_str(),
                    by,
                    to_i64(*at),
                    reason,
                    token_jti,
                    id,
                    from.as_str(),
                ],
            )
            .map_err(unavailable)?;
            if changed == 0 {
                return Err(StoreError::Conflict(format!(
                    "approval {id} is not {} any more",
                    from.as_str()
                )));
            }
        }
        Write::PutSecret {
            secret,
            purge_retired_before,
        } => {
            // Two processes that read the same newest version would both
            // store the next: the second would retire (and, with no grace,
            // delete) the first's, and say it stored it.
            let taken: bool = tx
                .query_row(
                    "SELECT EXISTS (SELECT 1 FROM secrets WHERE name = ? AND action = ? AND version >= ?)",
                    params![secret.name, secret.action, i64::from(secret.version)],
                    |r| r.get(0),
                )
                .map_err(unavailable)?;
            if taken {
                return Err(crate::rows::secret_version_taken(secret));
            }
            run(
                tx,
                "UPDATE secrets SET retired_at = ? \
                 WHERE name = ? AND action = ? AND retired_at IS NULL",
                params![to_i64(secret.created_at), secret.name, secret.action],
            )
            .map_err(unavailable)?;
            run(
                tx,
                "DELETE FROM secrets WHERE name = ? AND action = ? \
                 AND retired_at IS NOT NULL AND retired_at <= ?",
                params![secret.name, secret.action, to_i64(*purge_retired_before)],
            )
            .map_err(unavailable)?;
            run(
                tx,
                "INSERT INTO secrets (name, action, version, sealed, created_at) \
                 VALUES (?, ?, ?, ?, ?)",
                params![
                    secret.name,
                    secret.action,
                    i64::from(secret.version),
                    secret.sealed,
                    to_i64(secret.created_at),
                ],
            )
            .map_err(failed)?;
        }
        Write::Checkpoint(c) => put_checkpoint(
            tx,
            "INSERT INTO audit_checkpoints (chain_id, chain_seq, hash, at_ms, signature) VALUES (?, ?, ?, ?, ?)",
            c,
        )?,
        Write::InsertKey { key: k, after } => {
            let keys = tx
                .prepare_cached(rows::KEYS_OF_PURPOSE)
                .and_then(|mut st| {
                    // Keys no longer published (withdrawn, or past their
                    // time and not purged yet) are not followed.
                    st.query_map(params![k.purpose.as_str(), to_i64(k.created_at)], |r| {
                        Ok((r.get(0)?, r.get(1)?))
                    })?
                    .collect::<rusqlite::Result<Vec<(String, i64)>>>()
                })
                .map_err(unavailable)?;
            rows::refuse_unless_newest(&keys, after.as_deref())?;
            run(
                tx,
                concat!(
                    "INSERT INTO signing_keys (",
                    key_columns!(),
                    ") VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
                ),
                params![
                    k.kid,
                    k.purpose.as_str(),
                    k.alg,
                    k.public_jwk,
                    k.sealed,
                    to_i64(k.created_at),
                    to_i64(k.active_at),
                    k.retired_at.map(to_i64),
                    k.publish_until.map(to_i64),
                ],
            )
            .map_err(failed)?;
        }
        Write::WithdrawKey { kid, at } => {
            let withdrawn = run(
                tx,
                "UPDATE signing_keys SET retired_at = MIN(COALESCE(retired_at, ?1), ?1), \
                 publish_until = 0 WHERE kid = ?2",
                params![to_i64(*at), kid],
            )
            .map_err(unavailable)?;
            rows::withdrawn(withdrawn, kid)?;
        }
        Write::RetireKey {
            kid,
            at,
            publish_until,
        } => {
            let retired = run(
                tx,
                "UPDATE signing_keys SET retired_at = ?1, publish_until = ?2 \
                 WHERE kid = ?3 AND retired_at IS NULL",
                params![to_i64(*at), to_i64(*publish_until), kid],
            )
            .map_err(unavailable)?;
            rows::retired_once(retired, kid)?;
        }
        Write::DeleteSecret {
            name,
            action,
            through,
        } => {
            let newer: bool = tx
                .query_row(
                    rows::SECRET_NEWER,
                    params![name, action, i64::from(*through)],
                    |r| r.get(0),
                )
                .map_err(unavailable)?;
            let changed = if newer {
                0
            } else {
                run(tx, rows::DELETE_SECRET, params![name, action]).map_err(unavailable)?
            };
            rows::deleted_secret(newer, changed, name, action)?;
        }
        Write::ResealKey { kid, from, to } => {
            let changed = run(tx, rows::RESEAL_KEY, params![to, kid, from]).map_err(unavailable)?;
            rows::resealed(changed, &format!("key `{kid}`"))?;
        }
        Write::ResealSecret {
            name,
            action,
            version,
            from,
            to,
        } => {
            let changed = run(
                tx,
                rows::RESEAL_SECRET,
                params![to, name, action, i64::from(*version), from],
            )
            .map_err(unavailable)?;
            rows::resealed(
                changed,
                &format!("secret {name}/{action} version {version}"),
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SqliteStore;

    /// A commit returns once the WAL is fsync'd (`synchronous=FULL`, 2):
    /// under `NORMAL` a power cut loses the record of a credential already
    /// handed out, which no test that kills only the process would see.
    #[tokio::test]
    async fn the_writer_syncs_each_commit() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scrip.db");
        drop(SqliteStore::open(&path).await.unwrap()); // migrations
        let backend = SqliteWriter::open(&path).unwrap();
        let conn = backend.conn.as_ref().unwrap();
        let synchronous: i64 = conn
            .query_row("PRAGMA synchronous", [], |r| r.get(0))
            .unwrap();
        assert_eq!(synchronous, 2);
        let mode: String = conn
            .query_row("PRAGMA journal_mode", [], |r| r.get(0))
            .unwrap();
        assert_eq!(mode, "wal");
    }

    /// A commit that failed before its `COMMIT` (another connection held
    /// the write lock past the busy timeout) changed nothing, so the
    /// writer's chain goes on instead of starting anew.
    #[tokio::test]
    async fn a_commit_that_changed_nothing_keeps_the_chain() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scrip.db");
        drop(SqliteStore::open(&path).await.unwrap()); // migrations
        let backend = SqliteWriter::open(&path).unwrap();
        if let Some(c) = &backend.conn {
            c.busy_timeout(Duration::from_millis(50)).unwrap();
        }
        let writer = crate::writer::Writer::spawn(backend, "first".into());
        let record = || {
            vec![Write::Audit(Box::new(AuditEvent {
                event: "test.record".into(),
                ..AuditEvent::default()
            }))]
        };
        writer.commit(record()).await.unwrap();
        let holder = Connection::open(&path).unwrap();
        holder.execute_batch("BEGIN IMMEDIATE").unwrap();
        let err = writer.commit(record()).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        holder.execute_batch("ROLLBACK").unwrap();
        writer.commit(record()).await.unwrap();
        let chains: (i64, i64) = Connection::open(&path)
            .unwrap()
            .query_row(
                "SELECT count(DISTINCT chain_id), max(chain_seq) FROM audit",
                [],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .unwrap();
        assert_eq!(
            chains,
            (1, 3),
            "a commit known to have changed nothing started a new chain"
        );
    }

    /// Another process committing one transaction after another (a
    /// `scrip` command beside the server) frees the write lock only for
    /// moments between them: the writer still gets it, well within its
    /// busy timeout, rather than failing its batch. (Behind SQLite's own
    /// busy handler, which by then tries every 100 ms, it missed moments
    /// this short in most runs.)
    #[tokio::test]
    async fn a_write_gets_the_lock_between_another_processs_commits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scrip.db");
        drop(SqliteStore::open(&path).await.unwrap()); // migrations
        let writer = crate::writer::Writer::spawn(SqliteWriter::open(&path).unwrap(), "w".into());
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let holder = std::thread::spawn({
            let (path, stop) = (path.clone(), stop.clone());
            move || {
                let conn = Connection::open(&path).unwrap();
                let mut free = 0;
                // Held 100 ms at a time, free for about 0.2 ms between, for
                // up to twice the writer's busy timeout.
                let until = Instant::now() + 2 * BUSY_TIMEOUT;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < until {
                    conn.execute_batch("BEGIN IMMEDIATE").unwrap();
                    std::thread::sleep(Duration::from_millis(100));
                    conn.execute_batch("COMMIT").unwrap();
                    free += 1;
                    std::thread::sleep(Duration::from_micros(200));
                }
                free
            }
        });
        // Once the holder has the lock.
        std::thread::sleep(Duration::from_millis(20));
        let result = writer
            .commit(vec![Write::Audit(Box::new(AuditEvent {
                event: "test.record".into(),
                ..AuditEvent::default()
            }))])
            .await;
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let freed = holder.join().unwrap();
        assert!(
            result.is_ok(),
            "the writer never got the lock in {freed} moments it was free: {result:?}"
        );
    }

    /// Under a steady stream of commits the WAL is copied into the database
    /// beside the writer and still starts over, so it stays short.
    #[tokio::test]
    async fn the_wal_stays_short_while_commits_go_on() {
        wal_stays_short(Duration::ZERO).await;
    }

    /// The writer counts the WAL itself: a checkpointer that never gets to
    /// run (starved of CPU, or unable to open its connection) leaves it
    /// more to copy, not a WAL that grows without end.
    #[tokio::test]
    async fn the_wal_stays_short_when_the_checkpointer_never_runs() {
        wal_stays_short(Duration::from_secs(3600)).await;
    }

    /// Commits 300 batches of 8 records of about a page each, waking the
    /// checkpointer at most every `wake_every`, and checks that the WAL
    /// started over and its frames reached the database file.
    async fn wal_stays_short(wake_every: Duration) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scrip.db");
        drop(SqliteStore::open(&path).await.unwrap()); // migrations
        let mut writer = SqliteWriter::open(&path).unwrap();
        writer.wake_every = wake_every;
        writer.catch_up_frames = 128;
        writer.catch_up_at = 128;
        let mut chain = ChainState::new(
            crate::chain::new_chain_id().unwrap(),
            crate::chain::Signer::default(),
        );
        // Each record is about a page, so 300 commits of 8 write more than
        // 2,400 frames.
        let (commits, rows) = (300, 8);
        for i in 0..commits {
            commit_pages(&mut writer, &mut chain, i, rows).await;
        }
        let written = u64::from(commits * rows) * 4096;
        let wal = std::fs::metadata(dir.path().join("scrip.db-wal"))
            .unwrap()
            .len();
        let db = std::fs::metadata(&path).unwrap().len();
        assert!(
            wal < written / 2,
            "the WAL grew to {wal} bytes for {written} bytes of records: it never started over"
        );
        assert!(
            db > written / 2,
            "the database file is {db} bytes for {written} bytes of records: the WAL was not copied into it"
        );
        let read = Connection::open(&path).unwrap();
        let n: i64 = read
            .query_row(
                "SELECT count(*) FROM audit WHERE event = 'test.record'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(n, i64::from(commits * rows));
    }

    /// Commits `rows` audit records of about a page each, then lets the
    /// writer keep its WAL short.
    async fn commit_pages(writer: &mut SqliteWriter, chain: &mut ChainState, i: u32, rows: u32) {
        let batch: Vec<Write> = (0..rows)
            .map(|j| {
                Write::Audit(Box::new(AuditEvent {
                    event: "test.record".into(),
                    reason: Some(format!("{i}.{j} {}", "x".repeat(3000))),
                    ..AuditEvent::default()
                }))
            })
            .collect();
        let refs: Vec<&Write> = batch.iter().collect();
        writer.apply(&refs, chain).await.unwrap();
        writer.after_commit().await;
    }

    /// A reader's snapshot keeps frames in the WAL, so the writer's
    /// checkpoint cannot finish: it tries again once as many more frames
    /// are in, not after every commit, and the WAL starts over once the
    /// reader is done.
    #[tokio::test]
    async fn a_reader_holding_the_wal_does_not_make_every_commit_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("scrip.db");
        drop(SqliteStore::open(&path).await.unwrap()); // migrations
        let mut writer = SqliteWriter::open(&path).unwrap();
        writer.wake_every = Duration::from_secs(3600);
        writer.catch_up_frames = 128;
        writer.catch_up_at = 128;
        let mut chain = ChainState::new(
            crate::chain::new_chain_id().unwrap(),
            crate::chain::Signer::default(),
        );
        commit_pages(&mut writer, &mut chain, 0, 8).await;
        let reader = Connection::open(&path).unwrap();
        reader.execute_batch("BEGIN").unwrap();
        let _: i64 = reader
            .query_row("SELECT count(*) FROM audit", [], |r| r.get(0))
            .unwrap();
        // Well over a thousand frames past the reader's snapshot.
        for i in 1..=120 {
            commit_pages(&mut writer, &mut chain, i, 8).await;
        }
        let held = WAL_FRAMES.get();
        assert!(held > 900, "the WAL holds {held} frames");
        // One attempt each time another threshold's worth is in, where
        // every commit would be more than a hundred.
        let thresholds = usize::try_from(held / 128).unwrap();
        assert!(
            (1..=thresholds + 1).contains(&writer.caught_up),
            "{} checkpoints while a reader held {held} frames",
            writer.caught_up
        );
        reader.execute_batch("COMMIT").unwrap();
        for i in 121..=150 {
            commit_pages(&mut writer, &mut chain, i, 8).await;
        }
        let frames = WAL_FRAMES.get();
        assert!(
            frames < 128 + 64,
            "the WAL holds {frames} frames after the reader is done"
        );
    }
}
