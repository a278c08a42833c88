//! The one writer of a store process: group commit, shared by the backends.
//!
//! Every [`Store::commit`](crate::Store::commit) queues its writes here. The
//! writer applies everything that queued up while the previous transaction
//! was flushing as one transaction, so concurrent requests share a single
//! durable flush, and it owns this process's audit chain, so records are
//! chained in commit order. A backend only says how to apply a batch in one
//! transaction ([`Apply`]); failure isolation, the chain head and the change
//! signal live here once.

use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, watch};

use crate::chain::ChainState;
use crate::{ChainLink, StoreError, Write};

/// Most commits folded into one transaction.
const MAX_BATCH: usize = 512;
/// Commits that may wait for the writer before callers are slowed down.
const QUEUE: usize = 8192;

/// What changed in a store, as counters that only grow: waiters compare
/// the value they saw with the current one.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Changes {
    /// Bumped when revocations were committed (here or, for a shared store,
    /// by another replica).
    pub revocations: u64,
    /// Bumped when the signing key set changed.
    pub keys: u64,
}

impl Changes {
    /// Bumps the counters of what `writes` change.
    pub(crate) fn record(&mut self, writes: &[&Write]) -> bool {
        let revokes = writes.iter().any(|w| w.revokes());
        let keys = writes
            .iter()
            .any(|w| matches!(w, Write::InsertKey(_) | Write::RetireKey { .. }));
        self.revocations += u64::from(revokes);
        self.keys += u64::from(keys);
        revokes || keys
    }
}

/// How a backend applies one batch.
#[async_trait::async_trait]
pub(crate) trait Apply: Send + 'static {
    /// Applies `writes` in one durable transaction, chaining audit records
    /// onto `chain`. On `Err` nothing was changed; the caller restores
    /// `chain`. A backend whose connection broke reconnects on the next call.
    async fn apply(&mut self, writes: &[&Write], chain: &mut ChainState) -> Result<(), StoreError>;

    /// Housekeeping after a batch's callers were answered (SQLite
    /// wakes its WAL checkpointer here, and copies what the checkpointer left).
    async fn after_commit(&mut self) {}
}

struct Pending {
    writes: Vec<Write>,
    done: oneshot::Sender<Result<(), StoreError>>,
}

/// The handle callers commit through.
#[derive(Debug)]
pub(crate) struct Writer {
    queue: mpsc::Sender<Pending>,
    head: Arc<Mutex<Option<ChainLink>>>,
    changes: watch::Sender<Changes>,
}

impl Writer {
    /// Starts the writer task over `backend` on the current runtime,
    /// appending to a new chain.
    pub fn spawn(backend: impl Apply, chain_id: String) -> Self {
        let (writer, run) = Self::new(backend, chain_id);
        tokio::spawn(run);
        writer
    }

    /// Starts the writer on a thread of its own, with its own
    /// single-threaded runtime, for a backend that needs no I/O of the
    /// caller's runtime (SQLite): between the statements of a commit the
    /// writer never waits in the request handlers' run queue. The thread
    /// ends when the last handle is dropped.
    ///
    /// # Errors
    /// [`StoreError::Open`] when the thread or its runtime cannot start.
    pub fn spawn_on_own_thread(backend: impl Apply, chain_id: String) -> Result<Self, StoreError> {
        let (writer, run) = Self::new(backend, chain_id);
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| StoreError::Open(format!("cannot start the store writer: {e}")))?;
        std::thread::Builder::new()
            .name("scrip-store-writer".into())
            .spawn(move || runtime.block_on(run))
            .map_err(|e| StoreError::Open(format!("cannot start the store writer: {e}")))?;
        Ok(writer)
    }

    fn new(
        backend: impl Apply,
        chain_id: String,
    ) -> (Self, impl std::future::Future<Output = ()> + Send + 'static) {
        let (queue, rx) = mpsc::channel(QUEUE);
        let head = Arc::new(Mutex::new(None));
        let (changes, _) = watch::channel(Changes::default());
        let run = run(
            backend,
            rx,
            ChainState::new(chain_id),
            head.clone(),
            changes.clone(),
        );
        (
            Self {
                queue,
                head,
                changes,
            },
            run,
        )
    }

    /// Applies `writes` atomically and durably.
    pub async fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.queue
            .send(Pending { writes, done })
            .await
            .map_err(|_| StoreError::Unavailable("writer stopped".into()))?;
        wait.await
            .map_err(|_| StoreError::Unavailable("writer stopped".into()))?
    }

    /// The head of this writer's chain.
    pub fn head(&self) -> Option<ChainLink> {
        self.head.lock().ok().and_then(|h| h.clone())
    }

    /// The change signal (also bumped by a backend that hears of other
    /// writers' changes).
    pub fn changes(&self) -> &watch::Sender<Changes> {
        &self.changes
    }
}

async fn run(
    mut backend: impl Apply,
    mut rx: mpsc::Receiver<Pending>,
    mut chain: ChainState,
    head: Arc<Mutex<Option<ChainLink>>>,
    changes: watch::Sender<Changes>,
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
        match apply(&mut backend, &all, &mut chain).await {
            Ok(()) => {
                publish(&head, &chain, &changes, &all);
                for p in batch.drain(..) {
                    let _ = p.done.send(Ok(()));
                }
                backend.after_commit().await;
            }
            Err(e) if batch.len() > 1 => {
                // Isolate the failing commit: each gets its own transaction.
                tracing::warn!(error = %e, size = batch.len(), "group commit failed; retrying one by one");
                for p in batch.drain(..) {
                    let writes: Vec<&Write> = p.writes.iter().collect();
                    let result = apply(&mut backend, &writes, &mut chain).await;
                    if result.is_ok() {
                        publish(&head, &chain, &changes, &writes);
                    }
                    let _ = p.done.send(result);
                }
            }
            Err(e) => {
                if !matches!(e, StoreError::Conflict(_)) {
                    tracing::error!(error = %e, "store write failed");
                }
                for p in batch.drain(..) {
                    let _ = p.done.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Applies on a copy of the chain state, so the chain advances only when
/// the transaction committed.
///
/// When the store became unavailable mid-commit, whether the commit took
/// effect is unknown (the connection may have broken after the database
/// committed), so this writer goes on with a fresh chain: its first record
/// links to every chain head then stored, whichever way it went.
async fn apply(
    backend: &mut impl Apply,
    writes: &[&Write],
    chain: &mut ChainState,
) -> Result<(), StoreError> {
    let mut working = chain.clone();
    match backend.apply(writes, &mut working).await {
        Ok(()) => {
            *chain = working;
            Ok(())
        }
        Err(e) => {
            if matches!(e, StoreError::Unavailable(_))
                && chain.seq > 0
                && let Ok(id) = crate::chain::new_chain_id()
            {
                *chain = ChainState::new(id);
            }
            Err(e)
        }
    }
}

fn publish(
    head: &Mutex<Option<ChainLink>>,
    chain: &ChainState,
    changes: &watch::Sender<Changes>,
    writes: &[&Write],
) {
    if let Ok(mut h) = head.lock() {
        *h = chain.link();
    }
    changes.send_if_modified(|c| c.record(writes));
}
