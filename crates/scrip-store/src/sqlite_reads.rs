//! The embedded store's point reads on request paths (a task by id, whether
//! a token was revoked), and the revocation feed's pages, run on the
//! caller's own thread.
//!
//! sqlx runs each SQLite connection on a worker thread of its own, so every
//! query is a round trip between threads: sent, woken, answered, woken
//! again. For a lookup by primary key, which SQLite answers from its page
//! cache in microseconds, the round trip is most of the cost: profiled
//! under introspection, sqlx's threads and the futex calls between them took
//! about a third of the server's samples (BENCHMARKS.md, "Seventh pass").
//! These reads go through read-only rusqlite connections kept here instead,
//! and run where they are called. A read never waits for the writer (WAL
//! readers see the last commit without taking its lock), so a call blocks
//! only for SQLite's own work, or for the disk on a cold page cache.
//!
//! The revocation feed's pages are read here too, in chunks of 250 rows
//! with a yield between them (a full page of 1,000 took 0.5–1 ms in one
//! call, measured with a `bpftrace` uprobe). Through sqlx, each row
//! was built on sqlx's connection thread and freed on the caller's. The
//! allocator gives memory freed that way back to the thread that allocated
//! it only when that thread allocates again, and sqlx's threads sit idle
//! once a verifier has read the feed at start. With 100,000 revocations
//! outstanding that left about 16 MiB of garbage in an idle server
//! (BENCHMARKS.md, "Ninth pass"). The other reads (audit queries,
//! approvals, keys) are rarer, and stay on sqlx's pool.

use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, OptionalExtension as _};

use crate::rows::{self, task_columns, unavailable};
use crate::{Revocation, StoreError, TaskRecord};

/// Idle connections kept at most (one per thread that reads at once).
const IDLE: usize = 8;
/// How long a read waits when SQLite answers busy (a reader waits only
/// while another connection recovers or resets the WAL index).
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Read-only connections, opened on first use and kept while idle.
#[derive(Debug)]
pub(crate) struct PointReads {
    path: PathBuf,
    idle: Mutex<Vec<Connection>>,
}

impl PointReads {
    pub(crate) fn new(path: &Path) -> Self {
        Self {
            path: path.to_path_buf(),
            idle: Mutex::new(Vec::new()),
        }
    }

    /// Runs `read` on an idle connection (or a new one). A connection
    /// whose read failed is dropped, not kept: it may be what is broken.
    fn with<T>(
        &self,
        read: impl FnOnce(&Connection) -> rusqlite::Result<T>,
    ) -> Result<T, StoreError> {
        let kept = self.idle.lock().ok().and_then(|mut idle| idle.pop());
        let conn = match kept {
            Some(conn) => conn,
            None => self.open().map_err(unavailable)?,
        };
        let result = read(&conn).map_err(unavailable)?;
        if let Ok(mut idle) = self.idle.lock()
            && idle.len() < IDLE
        {
            idle.push(conn);
        }
        Ok(result)
    }

    fn open(&self) -> rusqlite::Result<Connection> {
        let conn = Connection::open_with_flags(
            &self.path,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.busy_timeout(BUSY_TIMEOUT)?;
        Ok(conn)
    }

    /// [`crate::Store::task`].
    pub(crate) fn task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        self.with(|c| {
            c.prepare_cached(concat!(
                "SELECT ",
                task_columns!(),
                " FROM tasks WHERE id = ?"
            ))?
            .query_row([id], |row| Ok(rows::task(row)))
            .optional()
        })?
        .transpose()
    }

    /// [`crate::Store::token_task`].
    pub(crate) fn token_task(
        &self,
        jti: &str,
        task_id: &str,
    ) -> Result<Option<(TaskRecord, bool)>, StoreError> {
        self.with(|c| {
            c.prepare_cached(concat!(
                "SELECT ",
                task_columns!(),
                ", EXISTS (SELECT 1 FROM revoked_tokens WHERE jti = ?1) AS revoked \
                 FROM tasks WHERE id = ?2"
            ))?
            .query_row([jti, task_id], |row| Ok(rows::token_task(row)))
            .optional()
        })?
        .transpose()
    }

    /// [`crate::Store::token_revoked`].
    pub(crate) fn token_revoked(&self, jti: &str) -> Result<bool, StoreError> {
        self.with(|c| {
            c.prepare_cached("SELECT 1 FROM revoked_tokens WHERE jti = ?")?
                .exists([jti])
        })
    }

    /// At most `limit` revocations after `after` that have not expired at
    /// `now`, in feed order: one chunk of [`crate::Store::revocations`].
    pub(crate) fn revocations(
        &self,
        after: i64,
        now: i64,
        limit: u32,
    ) -> Result<Vec<Revocation>, StoreError> {
        self.with(|c| {
            c.prepare_cached(
                "SELECT seq, kind, txn, jti, exp FROM revocations \
                 WHERE seq > ? AND exp > ? ORDER BY seq LIMIT ?",
            )?
            .query_map(rusqlite::params![after, now, limit], |row| {
                Ok(rows::revocation(row))
            })?
            .collect::<rusqlite::Result<Vec<_>>>()
        })?
        .into_iter()
        .collect()
    }
}
