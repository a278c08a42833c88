//! The store: tasks, revoked tokens and the audit record, behind one trait.
//!
//! Writes go through [`Store::commit`], which returns only once the batch is
//! durable (fsync'd). Backends group concurrent commits into one transaction
//! (group commit), so a busy server pays one flush for many requests.
//!
//! Architecture invariant: a commit that returned `Ok` survives a crash; a
//! commit that returned `Err` changed nothing, except an
//! [`StoreError::Unavailable`] when the store went away after the commit was
//! sent (a connection lost during `COMMIT`, a client timeout while it ran),
//! whose outcome is unknown. Callers therefore release a
//! credential only after `commit` of its audit record returned `Ok`
//! (security invariant 4), and a store that cannot write makes them fail
//! closed.

mod chain;
mod model;
mod postgres;
mod rows;
mod schema;
mod sqlite;
mod sqlite_reads;
mod sqlite_writer;
mod tally;
mod writer;

pub use chain::{
    ChainLink, Checkpoint, HeadSigner, IndexedColumns, Lost, MAX_LOST, MAX_PROBLEMS, Problem,
    RecentRun, Report, StoredRecord, Verifier, hash, verify, verify_store,
};
pub use model::{
    Approval, ApprovalState, AuditEvent, AuditFilter, KeyPurpose, MAX_PENDING_PER_ACTOR,
    MAX_PENDING_PER_AGENT, MAX_PENDING_PER_TASK, MAX_SUBTASKS, Revocation, RevocationKind,
    SecretRecord, StoredKey, TaskRecord, TaskState, Write,
};
pub use postgres::PgStore;
pub use schema::Schema;
pub use sqlite::SqliteStore;
pub use tally::{Admit, Count, Holds, Tally};
pub use writer::Changes;

/// Opens the store a configuration names: PostgreSQL when `database_url`
/// is set, else the embedded SQLite database at `sqlite_path`. Migrations
/// are applied either way.
///
/// # Errors
/// [`StoreError::Open`] when the store cannot be opened or migrated.
pub async fn open(
    database_url: Option<&str>,
    sqlite_path: &std::path::Path,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    Ok(match database_url {
        Some(url) => std::sync::Arc::new(PgStore::connect(url).await?),
        None => std::sync::Arc::new(SqliteStore::open(sqlite_path).await?),
    })
}

/// Opens the store a configuration names for a command that only reads it
/// (`scrip audit`, the listings): as [`open`], but nothing is created or
/// migrated, and a store whose schema is not this scrip's is refused.
///
/// # Errors
/// [`StoreError::Open`] when the store cannot be opened or holds another
/// schema.
pub async fn open_existing(
    database_url: Option<&str>,
    sqlite_path: &std::path::Path,
) -> Result<std::sync::Arc<dyn Store>, StoreError> {
    Ok(match database_url {
        Some(url) => std::sync::Arc::new(PgStore::connect_as(url, Schema::Require).await?),
        None => std::sync::Arc::new(SqliteStore::open_as(sqlite_path, Schema::Require).await?),
    })
}

/// A store failure.
#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The store cannot be read or written now (disk full, read-only,
    /// database down). Callers answer 503 and retry later.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A stored row could not be decoded.
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    /// The store could not be opened.
    #[error("cannot open the store: {0}")]
    Open(String),
    /// The commit would have overwritten something that must be written
    /// once (a single-use token already used, a key id taken); nothing
    /// was changed.
    #[error("already exists: {0}")]
    Conflict(String),
    /// The database refused a value of this commit (a data exception, such
    /// as a character its encoding cannot hold); nothing was changed. The
    /// commit's own, not the store's: the commits batched with it are
    /// applied without it.
    #[error("the database refused a value: {0}")]
    Refused(String),
    /// A [`Write::SpendProof`]'s proof was recorded before and is still
    /// kept: the request was presented before (a replay, on this replica or
    /// another); nothing was changed. One commit's, as a
    /// [`StoreError::Conflict`] is.
    #[error("DPoP proof was used before")]
    ProofUsed,
    /// The store no longer holds what this writer last committed: it was
    /// rolled back under the running process (a failover to a standby that
    /// had not received every commit, a backup restored in place). Nothing
    /// was changed; the writer applies the batch again on a new audit
    /// chain, whose first record names what was lost ([`Lost`]): a caller
    /// sees that try's outcome, and this error only when no new chain id
    /// could be drawn. Callers answer 503.
    #[error("the store was rolled back under this process: {0}")]
    RolledBack(String),
}

impl StoreError {
    /// Whether the failure is one commit's own (a conflict, a refused
    /// value, a proof used before), not the store's: the commits batched
    /// with it are applied without it.
    #[must_use]
    pub fn is_one_commits(&self) -> bool {
        matches!(self, Self::Conflict(_) | Self::Refused(_) | Self::ProofUsed)
    }
}

/// The operations scrip needs from persistent state.
#[async_trait::async_trait]
pub trait Store: Send + Sync + std::fmt::Debug + 'static {
    /// Applies `writes` atomically and durably. An `Err` changed nothing,
    /// but an [`StoreError::Unavailable`] whose outcome is unknown (see the
    /// crate's documentation): read the state again before relying on it.
    async fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError>;

    /// The task with this id.
    async fn task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError>;

    /// Whether the token with this `jti` was revoked on its own.
    async fn token_revoked(&self, jti: &str) -> Result<bool, StoreError>;

    /// Task `task_id`, and whether the token with this `jti` was revoked on
    /// its own, in one read (what introspecting an access token asks);
    /// `None` when there is no such task.
    async fn token_task(
        &self,
        jti: &str,
        task_id: &str,
    ) -> Result<Option<(TaskRecord, bool)>, StoreError>;

    /// Open tasks whose deadline is at or before `now`, oldest first; of
    /// those with one deadline, the deepest first, so that a sweep of
    /// `limit` reaches a task's sub-tasks (whose deadline is at most its
    /// own) before it, and each gets its own ending.
    async fn due_tasks(&self, now: u64, limit: u32) -> Result<Vec<TaskRecord>, StoreError>;

    /// Tasks still running at `now` (not ended, deadline after it), of one
    /// agent subject if given, the soonest to end first (by deadline, then
    /// id); with `after` (a deadline and an id), only those after it, to
    /// read the next page.
    async fn open_tasks(
        &self,
        now: u64,
        agent_sub: Option<&str>,
        after: Option<(u64, &str)>,
        limit: u32,
    ) -> Result<Vec<TaskRecord>, StoreError>;

    /// Sub-tasks still running at `now` whose current actor (the outermost
    /// `act`: the sub-agent that holds the task token) has subject
    /// `actor_sub`, ordered and paged as [`Store::open_tasks`]. Every open
    /// task is looked at (no index holds actors): for the operator ending
    /// what a compromised sub-agent holds, not for a request's path.
    async fn open_tasks_acted_by(
        &self,
        now: u64,
        actor_sub: &str,
        after: Option<(u64, &str)>,
        limit: u32,
    ) -> Result<Vec<TaskRecord>, StoreError>;

    /// Ids of the open descendants of a task (children, grandchildren, ...).
    async fn open_descendants(&self, id: &str) -> Result<Vec<String>, StoreError>;

    /// How many sub-tasks the tree of task `id` holds (counted at its root,
    /// ended ones included; see [`MAX_SUBTASKS`]); `None` when there is no
    /// such task.
    async fn tree_size(&self, id: &str) -> Result<Option<u32>, StoreError>;

    /// Audit records matching `filter`, in order.
    async fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEvent>, StoreError>;

    /// Raw audit rows after `after_seq`, in order, for verification.
    async fn audit_rows(&self, after_seq: i64, limit: u32)
    -> Result<Vec<StoredRecord>, StoreError>;

    /// The newest audit record's sequence number (0 when none). Writers
    /// commit in sequence order, so every record at or below it is stored.
    async fn latest_audit_seq(&self) -> Result<i64, StoreError>;

    /// The approval with this `auth_req_id`.
    async fn approval(&self, id: &str) -> Result<Option<Approval>, StoreError>;

    /// Pending approvals that have not expired at `now`, of tasks still open
    /// then (a step of a task that ended is nobody's to decide), oldest
    /// first.
    async fn pending_approvals(&self, now: u64, limit: u32) -> Result<Vec<Approval>, StoreError>;

    /// How many approvals of the tasks of the agent `issuer`/`subject` wait
    /// for a person and have not expired at `now`.
    async fn agent_pending_approvals(
        &self,
        issuer: &str,
        subject: &str,
        now: u64,
    ) -> Result<usize, StoreError>;

    /// How many approvals wait for a person, unexpired at `now`, among the
    /// open tasks of `task_id`'s tree whose current actor is `task_id`'s
    /// (the same sub-agent's, by issuer and subject); 0 for a task no
    /// sub-agent acts in, or one that is not stored.
    async fn actor_pending_approvals(&self, task_id: &str, now: u64) -> Result<usize, StoreError>;

    /// One task's pending approvals that have not expired at `now`, oldest
    /// first.
    async fn task_pending_approvals(
        &self,
        task_id: &str,
        now: u64,
    ) -> Result<Vec<Approval>, StoreError>;

    /// One task's approvals a person approved whose token is not collected
    /// yet and that have not expired at `now`, oldest first.
    async fn task_approved_approvals(
        &self,
        task_id: &str,
        now: u64,
    ) -> Result<Vec<Approval>, StoreError>;

    /// One task's approvals a person denied at or after `since`, the latest
    /// decision first.
    async fn task_denials(&self, task_id: &str, since: u64) -> Result<Vec<Approval>, StoreError>;

    /// The approvals at `tool` a person denied at or after `since` in any
    /// task of the agent `issuer`/`subject`, the latest decision first, at
    /// most `limit`: what an approver is shown beside a step of that agent
    /// at that tool.
    async fn agent_denials(
        &self,
        issuer: &str,
        subject: &str,
        tool: &str,
        since: u64,
        limit: u32,
    ) -> Result<Vec<Approval>, StoreError>;

    /// Approvals that expired at or before `now` still pending, or approved
    /// and never collected.
    async fn expired_approvals(&self, now: u64, limit: u32) -> Result<Vec<Approval>, StoreError>;

    /// Approvals still pending, or approved and never collected, not yet at
    /// their expiry, whose task has ended (or reached its deadline): nobody
    /// may decide or collect them, and left until their own expiry they
    /// would pile up behind an agent that asks and ends task after task,
    /// for every approval's count to read. Reads every such live step (no
    /// index holds its task's end): call it every few seconds, not at
    /// every tick.
    async fn orphaned_approvals(&self, now: u64, limit: u32) -> Result<Vec<Approval>, StoreError>;

    /// Revocations after `after` that have not expired at `now`, in order.
    async fn revocations(
        &self,
        after: i64,
        now: u64,
        limit: u32,
    ) -> Result<Vec<Revocation>, StoreError>;

    /// The newest revocation's sequence number (0 when none).
    async fn latest_revocation(&self) -> Result<i64, StoreError>;

    /// The links of every chain's first record (`chain.started`).
    async fn chain_links(&self) -> Result<Vec<ChainLink>, StoreError>;

    /// The newest signed checkpoint of each chain (every one at its newest
    /// position, should there be several), and each chain's signed head
    /// (see [`Store::sign_heads_with`]). A hash chain makes the newest
    /// signature vouch for every record before it, so verification needs
    /// no other; reading every checkpoint would grow without bound (earlier
    /// versions stored one per interval per writer). Read with a skip scan:
    /// one index probe a chain.
    async fn latest_checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError>;

    /// Every key of the shared key set that is still published at `now`
    /// (retired keys included until their `publish_until`), oldest first.
    async fn keys(&self, now: u64) -> Result<Vec<StoredKey>, StoreError>;
    /// Every stored version of every proxy secret, by name, action and
    /// version (newest first).
    async fn secrets(&self) -> Result<Vec<SecretRecord>, StoreError>;

    /// The stored versions of one secret, newest first.
    async fn secret_versions(
        &self,
        name: &str,
        action: &str,
    ) -> Result<Vec<SecretRecord>, StoreError>;

    /// The head of this writer's chain, once it has written a record.
    fn chain_head(&self) -> Option<ChainLink>;

    /// Signs this writer's chain head with `signer` in every commit that
    /// appends audit records, from the next commit on, in the same
    /// transaction: a committed record is signed by its writer, so a crash
    /// or a kill leaves nothing unsigned, and records cannot be rewritten
    /// after the fact without the key. A signer that fails fails the commit.
    /// The first signer set stays; returns whether this one was set.
    fn sign_heads_with(&self, signer: std::sync::Arc<dyn HeadSigner>) -> bool;

    /// What changed: bumped on this process's commits and, for a shared
    /// store, on other replicas' (within milliseconds while the
    /// notification channel is up, and conservatively whenever it
    /// reconnects, since notifications may have been missed).
    fn changes(&self) -> tokio::sync::watch::Receiver<Changes>;
}
