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

use crate::chain::{ChainState, HeadSigner, Signer};
use crate::{ChainLink, StoreError, Write};

/// Most commits folded into one transaction.
const MAX_BATCH: usize = 512;
/// Most commits folded into the transaction after one that failed: a
/// database that could not take a full batch in time (slow, or shared
/// with busy replicas) is given smaller ones, doubled after each that
/// commits, rather than failing every full batch while the queue is long.
const AFTER_FAILURE: usize = 16;
/// Commits that may wait for the writer before callers are slowed down.
const QUEUE: usize = 8192;
/// The longest a commit waits in the queue while the store is failing:
/// past it, after a failed batch, it fails unapplied, so that no caller
/// waits for every batch queued before it to time out in turn. (While
/// batches commit, however slowly, every commit waits its turn: some have
/// no caller waiting, as the proxy's records of responses already sent.)
const MAX_WAIT: std::time::Duration = std::time::Duration::from_secs(10);

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
        let keys = writes.iter().any(|w| {
            matches!(
                w,
                Write::InsertKey { .. } | Write::RetireKey { .. } | Write::WithdrawKey { .. }
            )
        });
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

    /// After [`StoreError::Unavailable`] from [`apply`](Self::apply):
    /// whether that batch may have taken effect anyway, as when the
    /// connection broke after the commit was sent. A backend that cannot
    /// tell says yes.
    fn may_have_committed(&self) -> bool {
        true
    }
}

struct Pending {
    writes: Vec<Write>,
    done: oneshot::Sender<Result<(), StoreError>>,
    queued: tokio::time::Instant,
}

/// The handle callers commit through.
#[derive(Debug)]
pub(crate) struct Writer {
    queue: mpsc::Sender<Pending>,
    head: Arc<Mutex<Option<ChainLink>>>,
    changes: watch::Sender<Changes>,
    signer: Signer,
}

impl Writer {
    /// Starts the writer task over `backend` on the current runtime,
    /// appending to a new chain.
    pub fn spawn(backend: impl Apply, chain_id: String) -> Self {
        let (writer, run) = Self::new(backend, chain_id);
        scrip_vital::spawn("store writer", run);
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
            .spawn(move || scrip_vital::guarded("store writer", move || runtime.block_on(run)))
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
        let signer = Signer::default();
        let run = run(
            backend,
            rx,
            ChainState::new(chain_id, signer.clone()),
            head.clone(),
            changes.clone(),
        );
        (
            Self {
                queue,
                head,
                changes,
                signer,
            },
            run,
        )
    }

    /// Applies `writes` atomically and durably.
    pub async fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let (done, wait) = oneshot::channel();
        self.queue
            .send(Pending {
                writes,
                done,
                queued: tokio::time::Instant::now(),
            })
            .await
            .map_err(|_| StoreError::Unavailable("writer stopped".into()))?;
        wait.await
            .map_err(|_| StoreError::Unavailable("writer stopped".into()))?
    }

    /// Signs the chain head in every commit from the next one on; the
    /// first signer set stays. Returns whether this one was set.
    pub fn sign_heads_with(&self, signer: Arc<dyn HeadSigner>) -> bool {
        self.signer.set(signer).is_ok()
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
    let mut limit = MAX_BATCH;
    // Whether the last batch failed for the store's sake.
    let mut failing = false;
    while let Some(first) = rx.recv().await {
        batch.push(first);
        while batch.len() < limit {
            match rx.try_recv() {
                Ok(p) => batch.push(p),
                Err(_) => break,
            }
        }
        // While the store fails, commits that waited too long fail unapplied.
        let now = tokio::time::Instant::now();
        let is_stale = |p: &Pending| now.saturating_duration_since(p.queued) > MAX_WAIT;
        if failing && batch.iter().any(is_stale) {
            let (stale, fresh): (Vec<Pending>, Vec<Pending>) = batch.drain(..).partition(is_stale);
            batch = fresh;
            tracing::error!(
                commits = stale.len(),
                "store writes are too slow: commits that waited over {} s fail unapplied",
                MAX_WAIT.as_secs()
            );
            for p in stale {
                let _ = p.done.send(Err(StoreError::Unavailable(
                    "the store is too slow: the write waited too long, and nothing was written"
                        .into(),
                )));
            }
        }
        if batch.is_empty() {
            continue;
        }
        let all: Vec<&Write> = batch.iter().flat_map(|p| p.writes.iter()).collect();
        match apply(&mut backend, &all, &mut chain).await {
            Ok(()) => {
                limit = limit.saturating_mul(2).min(MAX_BATCH);
                failing = false;
                publish(&head, &chain, &changes, &all);
                for p in batch.drain(..) {
                    let _ = p.done.send(Ok(()));
                }
                backend.after_commit().await;
            }
            // A conflict is one commit's (a task whose parent ended, a token
            // already used): the transaction rolled back, so find it by
            // halving the batch until each conflicting commit is alone; the
            // others commit in a few transactions, in their order. Replaying
            // every commit on its own would let anyone who can cause a
            // conflict (a single-use token presented twice) turn each batch
            // into as many flushes as it holds commits. Any other failure is
            // the store's: every commit of the batch gets it at once
            // (retrying each one would make them wait a timeout apiece), and
            // none is replayed, since whether the batch took effect may be
            // unknown.
            // A value the database refused (`Refused`), or a DPoP proof
            // used before (`ProofUsed`), is one commit's too.
            Err(e) if e.is_one_commits() && batch.len() > 1 => {
                tracing::warn!(error = %e, size = batch.len(), "group commit failed; isolating the conflict");
                let results = isolate(&mut backend, &batch, &mut chain, &head, &changes).await;
                failing = results
                    .iter()
                    .any(|r| matches!(r, Err(StoreError::Unavailable(_))));
                if failing {
                    limit = AFTER_FAILURE;
                }
                for (p, result) in batch.drain(..).zip(results) {
                    let _ = p.done.send(result);
                }
                backend.after_commit().await;
            }
            Err(e) => {
                if !e.is_one_commits() {
                    tracing::error!(error = %e, size = batch.len(), "store write failed");
                    limit = AFTER_FAILURE;
                    failing = true;
                }
                for p in batch.drain(..) {
                    let _ = p.done.send(Err(e.clone()));
                }
            }
        }
    }
}

/// Conflicting commits found in one batch after which its rest is applied
/// one commit at a time.
const DENSE: usize = 2;

/// Applies a batch that conflicted as a whole in halves, and halves of
/// those that conflict, in order, until each conflicting commit is alone:
/// with one conflict among `n` commits, about `2 log2 n` transactions. The
/// result of each commit of `batch`, in order. A failure other than a
/// conflict fails that part and every part not yet applied.
async fn isolate(
    backend: &mut impl Apply,
    batch: &[Pending],
    chain: &mut ChainState,
    head: &Mutex<Option<ChainLink>>,
    changes: &watch::Sender<Changes>,
) -> Vec<Result<(), StoreError>> {
    let mut results: Vec<Option<Result<(), StoreError>>> = vec![None; batch.len()];
    // Parts still to apply, the next one last.
    let mut parts = vec![(batch.len() / 2, batch.len()), (0, batch.len() / 2)];
    // Conflicting commits found. Halving pays when conflicts are few; once
    // several are found they may be many (every other commit, say), where
    // halving would cost twice as many transactions as commits: the rest is
    // applied one commit at a time, at most one transaction a commit.
    let mut conflicts = 0;
    while let Some((lo, hi)) = parts.pop() {
        if conflicts >= DENSE && hi - lo > 1 {
            parts.extend((lo..hi).rev().map(|i| (i, i + 1)));
            continue;
        }
        let Some(part) = batch.get(lo..hi).filter(|p| !p.is_empty()) else {
            continue;
        };
        let writes: Vec<&Write> = part.iter().flat_map(|p| p.writes.iter()).collect();
        match apply(backend, &writes, chain).await {
            Ok(()) => {
                publish(head, chain, changes, &writes);
                if let Some(done) = results.get_mut(lo..hi) {
                    done.fill(Some(Ok(())));
                }
            }
            Err(e) if e.is_one_commits() && hi - lo > 1 => {
                let mid = lo + (hi - lo) / 2;
                parts.push((mid, hi));
                parts.push((lo, mid));
            }
            Err(e) if e.is_one_commits() => {
                conflicts += 1;
                if let Some(r) = results.get_mut(lo) {
                    *r = Some(Err(e));
                }
            }
            Err(e) => {
                for r in results.iter_mut().filter(|r| r.is_none()) {
                    *r = Some(Err(e.clone()));
                }
                break;
            }
        }
    }
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| Err(StoreError::Unavailable("not applied".into()))))
        .collect()
}

/// Applies on a copy of the chain state, so the chain advances only when
/// the transaction committed.
///
/// When the store became unavailable mid-commit and the backend cannot say
/// the commit did not take effect (the connection may have broken after the
/// database committed), this writer goes on with a fresh chain that starts
/// at its next commit of any kind: its first record links to the chain
/// heads then stored, whichever way it went, and names what the store no
/// longer holds of the old chain's committed records ([`crate::Lost`]: a
/// failover lost them). So does a store found rolled back
/// ([`StoreError::RolledBack`]), and the batch is then applied again on the
/// new chain. A
/// failure known to have changed nothing (a lock wait that timed out before
/// the commit was sent) leaves the chain where it was.
async fn apply(
    backend: &mut impl Apply,
    writes: &[&Write],
    chain: &mut ChainState,
) -> Result<(), StoreError> {
    // A store rolled back under this writer: nothing was applied, and its
    // chain goes on in a new one, whose start names what the store lost;
    // the batch is applied again at once on that chain (its first commit
    // stores a new head row, which nothing guards), so its callers see
    // nothing of it.
    let mut rolled_back = false;
    loop {
        let mut working = chain.clone();
        match backend.apply(writes, &mut working).await {
            Ok(()) => {
                *chain = working;
                return Ok(());
            }
            Err(e) => {
                let replace = match &e {
                    StoreError::Unavailable(_) => backend.may_have_committed(),
                    StoreError::RolledBack(_) => true,
                    _ => false,
                };
                let replaced = replace
                    && crate::chain::new_chain_id()
                        .map(|id| *chain = chain.replaced_by(id))
                        .is_ok();
                if replaced && matches!(e, StoreError::RolledBack(_)) && !rolled_back {
                    // Said whether or not records are gone: a head row put
                    // back with every record still there is an edit.
                    tracing::error!(error = %e, "the store no longer holds the audit chain head this process signed last: it was rolled back under it, or its `audit_heads` row was changed; the chain goes on in a new one, whose start names any record lost");
                    rolled_back = true;
                    continue;
                }
                return Err(e);
            }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// A backend that holds its first batch until `release` is notified (so
    /// later commits queue up into one batch), counts batches, fails a
    /// batch with `Conflict` when it holds a revocation of `poison`, or with
    /// `Unavailable` from the call numbered `down` on (the first is 0), and
    /// records what it committed, in order.
    struct Fake {
        calls: Arc<AtomicUsize>,
        release: Arc<tokio::sync::Notify>,
        down: Option<usize>,
        committed: Arc<Mutex<Vec<String>>>,
    }

    #[async_trait::async_trait]
    impl Apply for Fake {
        async fn apply(&mut self, writes: &[&Write], _: &mut ChainState) -> Result<(), StoreError> {
            let call = self.calls.fetch_add(1, Ordering::SeqCst);
            if call == 0 {
                self.release.notified().await;
            }
            if self.down.is_some_and(|d| call >= d) {
                return Err(StoreError::Unavailable("the disk is gone".into()));
            }
            // A bug, as a backend could have one.
            if writes
                .iter()
                .any(|w| matches!(w, Write::RevokeToken { jti, .. } if jti == "bug"))
            {
                panic!("a bug in the backend");
            }
            let poisoned = writes
                .iter()
                .any(|w| matches!(w, Write::RevokeToken { jti, .. } if jti == "poison"));
            if poisoned {
                return Err(StoreError::Conflict("poison".into()));
            }
            if writes
                .iter()
                .any(|w| matches!(w, Write::RevokeToken { jti, .. } if jti == "refused"))
            {
                return Err(StoreError::Refused("character not in repertoire".into()));
            }
            let mut committed = self.committed.lock().unwrap();
            for w in writes {
                if let Write::RevokeToken { jti, .. } = w {
                    committed.push(jti.clone());
                }
            }
            Ok(())
        }
    }

    fn revoke(jti: &str) -> Write {
        Write::RevokeToken {
            jti: jti.into(),
            task_id: "t".into(),
            expires_at: 1,
            at: 1,
        }
    }

    /// What [`run_with`] saw: each commit's result in order, how many
    /// batches were applied, and the jtis committed, in commit order.
    type Outcome = (Vec<Result<(), StoreError>>, usize, Vec<String>);

    /// Commits `jtis` concurrently behind a first commit the backend
    /// holds.
    async fn run_with(down: Option<usize>, jtis: &[&str]) -> Outcome {
        let calls = Arc::new(AtomicUsize::new(0));
        let release = Arc::new(tokio::sync::Notify::new());
        let committed = Arc::new(Mutex::new(Vec::new()));
        let writer = Arc::new(Writer::spawn(
            Fake {
                calls: calls.clone(),
                release: release.clone(),
                down,
                committed: committed.clone(),
            },
            "c".into(),
        ));
        let first = {
            let w = writer.clone();
            tokio::spawn(async move { w.commit(vec![revoke("first")]).await })
        };
        while calls.load(Ordering::SeqCst) == 0 {
            tokio::task::yield_now().await;
        }
        let rest: Vec<_> = jtis
            .iter()
            .map(|j| {
                let (w, j) = (writer.clone(), (*j).to_owned());
                tokio::spawn(async move { w.commit(vec![revoke(&j)]).await })
            })
            .collect();
        // Let every commit reach the queue before the first batch ends.
        for _ in 0..100 {
            tokio::task::yield_now().await;
        }
        release.notify_one();
        let _ = first.await.unwrap();
        let mut results = Vec::new();
        for r in rest {
            results.push(r.await.unwrap());
        }
        let committed = committed.lock().unwrap().clone();
        (results, calls.load(Ordering::SeqCst), committed)
    }

    /// Commits 64 revocations, those at the positions `poisoned` names
    /// conflicting: asserts that exactly those fail and the others commit in
    /// their order; returns how many transactions were tried.
    async fn run_poisoned(poisoned: impl Fn(usize) -> bool) -> usize {
        let jtis: Vec<String> = (0..64)
            .map(|i| {
                if poisoned(i) {
                    "poison".into()
                } else {
                    format!("j{i}")
                }
            })
            .collect();
        let refs: Vec<&str> = jtis.iter().map(String::as_str).collect();
        let (results, calls, committed) = run_with(None, &refs).await;
        for (jti, r) in jtis.iter().zip(&results) {
            assert_eq!(jti == "poison", r.is_err(), "{jti}: {r:?}");
        }
        let mut expected = vec!["first".to_owned()];
        expected.extend(jtis.iter().filter(|j| *j != "poison").cloned());
        assert_eq!(committed, expected);
        calls
    }

    /// A writer that panics (on its own thread, or as a task) answers the
    /// commit under way and every later one with an error, none waits for
    /// ever, and the failure is reported (`scrip serve` stops on it). One
    /// test each, so that each reports in a process of its own.
    #[tokio::test]
    async fn a_writer_thread_that_panics_fails_every_commit_and_is_reported() {
        writer_that_panics(true).await;
    }

    #[tokio::test]
    async fn a_writer_task_that_panics_fails_every_commit_and_is_reported() {
        writer_that_panics(false).await;
    }

    async fn writer_that_panics(own_thread: bool) {
        {
            let fake = Fake {
                calls: Arc::new(AtomicUsize::new(1)),
                release: Arc::new(tokio::sync::Notify::new()),
                down: None,
                committed: Arc::new(Mutex::new(Vec::new())),
            };
            let writer = if own_thread {
                Writer::spawn_on_own_thread(fake, "c".into()).unwrap()
            } else {
                Writer::spawn(fake, "c".into())
            };
            writer.commit(vec![revoke("ok")]).await.unwrap();
            let answered = tokio::time::timeout(std::time::Duration::from_secs(10), async {
                let bug = writer.commit(vec![revoke("bug")]).await;
                let later = writer.commit(vec![revoke("later")]).await;
                (bug, later)
            })
            .await;
            let Ok((bug, later)) = answered else {
                panic!("a commit waited for a writer that panicked (own thread: {own_thread})");
            };
            assert!(matches!(bug, Err(StoreError::Unavailable(_))), "{bug:?}");
            assert!(
                matches!(later, Err(StoreError::Unavailable(_))),
                "{later:?}"
            );
            // Reported once the panic is caught, which may be just after
            // the commits were answered.
            let failure =
                tokio::time::timeout(std::time::Duration::from_secs(10), scrip_vital::failure())
                    .await;
            assert_eq!(failure, Ok("store writer"));
        }
    }

    #[tokio::test]
    async fn a_conflict_is_isolated_to_its_own_commit() {
        let (results, calls, committed) = run_with(None, &["a", "poison", "b"]).await;
        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        assert!(matches!(results[1], Err(StoreError::Conflict(_))));
        assert_eq!(committed, ["first", "a", "b"]);
        // The first batch, the batch of three, `a`, `poison b`, `poison`, `b`.
        assert_eq!(calls, 6);
    }

    /// A value the database refuses fails its own commit only: the store is
    /// not taken for failing.
    #[tokio::test]
    async fn a_refused_value_is_isolated_to_its_own_commit() {
        let (results, _, committed) = run_with(None, &["a", "refused", "b"]).await;
        assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
        assert!(
            matches!(results[1], Err(StoreError::Refused(_))),
            "{results:?}"
        );
        assert_eq!(committed, ["first", "a", "b"]);
    }

    /// One conflict in a large batch costs a few transactions, not one per
    /// commit, and the others still commit in their order.
    #[tokio::test]
    async fn a_conflict_in_a_large_batch_costs_a_few_transactions() {
        let calls = run_poisoned(|i| i == 41).await;
        // The first batch and the batch of 64, then two halves at each of
        // six levels: 14, where replaying each commit took 66.
        assert_eq!(calls, 14);
    }

    /// After a commit whose outcome is unknown, the replacing chain starts
    /// at the next commit even when it carries no audit record (the empty
    /// commit at shutdown, a checkpoint): its start links the
    /// old chain's true head, so what that commit may have written is
    /// covered once the new chain is signed, though nothing more is written.
    #[tokio::test]
    async fn a_replacing_chain_starts_at_the_next_commit_of_any_kind() {
        struct Flaky {
            calls: usize,
            starts: Arc<Mutex<Vec<(String, String)>>>,
        }
        #[async_trait::async_trait]
        impl Apply for Flaky {
            async fn apply(
                &mut self,
                writes: &[&Write],
                chain: &mut ChainState,
            ) -> Result<(), StoreError> {
                self.calls += 1;
                if let Some(start) = chain.genesis_for(writes) {
                    chain.append(&start).unwrap();
                    self.starts
                        .lock()
                        .unwrap()
                        .push((chain.id.clone(), start.replica));
                }
                for w in writes {
                    if let Write::Audit(a) = w {
                        chain.append(a).unwrap();
                    }
                }
                if self.calls == 2 {
                    return Err(StoreError::Unavailable(
                        "connection lost during COMMIT".into(),
                    ));
                }
                Ok(())
            }
        }
        let starts = Arc::new(Mutex::new(Vec::new()));
        let writer = Writer::spawn(
            Flaky {
                calls: 0,
                starts: starts.clone(),
            },
            "first".into(),
        );
        let record = || {
            vec![Write::Audit(Box::new(crate::AuditEvent {
                event: "test.record".into(),
                replica: "r1".into(),
                ..crate::AuditEvent::default()
            }))]
        };
        writer.commit(record()).await.unwrap();
        writer.commit(record()).await.unwrap_err();
        // Nothing but an empty commit follows (a process shutting down).
        writer.commit(Vec::new()).await.unwrap();
        let starts = starts.lock().unwrap().clone();
        assert_eq!(starts.len(), 2, "{starts:?}");
        assert_eq!(starts[0], ("first".to_owned(), "r1".to_owned()));
        assert_ne!(starts[1].0, "first", "{starts:?}");
        assert_eq!(starts[1].1, "r1", "the replica is carried over");
        assert_eq!(writer.head().map(|h| h.chain_seq), Some(1));
    }

    #[tokio::test]
    async fn a_store_failure_fails_the_whole_batch_at_once() {
        let (results, calls, _) = run_with(Some(0), &["a", "b", "c", "d"]).await;
        assert!(
            results
                .iter()
                .all(|r| matches!(r, Err(StoreError::Unavailable(_)))),
            "{results:?}"
        );
        // The first batch and the batch of four: no retry one by one, each
        // of which would wait out a timeout of its own on a real store.
        assert_eq!(calls, 2);
    }

    /// Many conflicts (every other commit): once a few are found the rest
    /// goes one commit at a time, so the batch costs about one transaction a
    /// commit, not the two a commit halving alone would take.
    #[tokio::test]
    async fn many_conflicts_cost_about_one_transaction_a_commit() {
        let calls = run_poisoned(|i| i % 2 == 1).await;
        // The first batch, the batch of 64, the halvings that found the
        // first two conflicts, then at most one a commit.
        assert!(calls <= 2 + 12 + 64, "{calls} transactions for 64 commits");
    }

    /// The store fails while a conflict is being isolated: the commits not
    /// yet applied get the failure at once, and those applied keep theirs.
    #[tokio::test]
    async fn a_store_failure_while_isolating_fails_the_rest_at_once() {
        let (results, calls, committed) =
            run_with(Some(4), &["a", "b", "c", "poison", "d", "e"]).await;
        assert!(results[..3].iter().all(Result::is_ok), "{results:?}");
        assert!(
            results[3..]
                .iter()
                .all(|r| matches!(r, Err(StoreError::Unavailable(_)))),
            "{results:?}"
        );
        assert_eq!(committed, ["first", "a", "b", "c"]);
        // The first batch, the batch of six, `a b c`, `poison d e` and
        // `poison`, which met the failure: `d e` is not tried after it.
        assert_eq!(calls, 5);
    }

    /// A backend that is slow or small: each batch takes `delay`, and one
    /// of more than `most` writes (or any, when `down`) fails as a
    /// database that did not answer in time.
    struct Slow {
        delay: std::time::Duration,
        most: usize,
        down: bool,
        batches: Arc<Mutex<Vec<usize>>>,
    }

    #[async_trait::async_trait]
    impl Apply for Slow {
        async fn apply(&mut self, writes: &[&Write], _: &mut ChainState) -> Result<(), StoreError> {
            self.batches.lock().unwrap().push(writes.len());
            tokio::time::sleep(self.delay).await;
            if self.down || writes.len() > self.most {
                return Err(StoreError::Unavailable("timed out".into()));
            }
            Ok(())
        }
    }

    /// Queues `n` commits on `backend` at once; each one's result and the
    /// (paused) time it took.
    async fn queue_on(
        backend: Slow,
        n: usize,
    ) -> Vec<(Result<(), StoreError>, std::time::Duration)> {
        let writer = Arc::new(Writer::spawn(backend, "c".into()));
        let started = tokio::time::Instant::now();
        let all: Vec<_> = (0..n)
            .map(|i| {
                let w = writer.clone();
                tokio::spawn(async move {
                    let r = w.commit(vec![revoke(&format!("j{i}"))]).await;
                    (r, started.elapsed())
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in all {
            out.push(t.await.unwrap());
        }
        out
    }

    /// A database that cannot take a full batch in time gets smaller ones
    /// after a failure, so most commits still land; a full batch each time
    /// would fail every one of them while the queue stays long.
    #[tokio::test(start_paused = true)]
    async fn after_a_failed_batch_smaller_ones_still_commit() {
        let batches = Arc::new(Mutex::new(Vec::new()));
        let backend = Slow {
            delay: std::time::Duration::from_millis(5),
            most: 64,
            down: false,
            batches: batches.clone(),
        };
        let results = queue_on(backend, 1000).await;
        let ok = results.iter().filter(|(r, _)| r.is_ok()).count();
        let sizes = batches.lock().unwrap().clone();
        // The first batch (512) fails; of the rest, the batches that fit
        // (16, 32, 64, then 16 again after each of 128) commit: 232. With
        // full batches after a failure, all 1000 would fail.
        assert!(ok >= 200, "{ok} of 1000 committed in batches {sizes:?}");
        assert!(sizes.iter().any(|s| *s > 64), "{sizes:?}");
    }

    /// A store that is slow but works loses nothing: every commit waits its
    /// turn, however long (some have no caller waiting, as the proxy's
    /// records of responses already sent).
    #[tokio::test(start_paused = true)]
    async fn a_slow_store_that_works_fails_no_commit_for_its_wait() {
        let backend = Slow {
            delay: std::time::Duration::from_secs(4),
            most: usize::MAX,
            down: false,
            batches: Arc::new(Mutex::new(Vec::new())),
        };
        let results = queue_on(backend, 2000).await;
        assert!(results.iter().all(|(r, _)| r.is_ok()));
        // Four batches of 512 or fewer, four seconds each: the last waited
        // past MAX_WAIT.
        let longest = results.iter().map(|(_, t)| *t).max().unwrap();
        assert!(longest > MAX_WAIT, "{longest:?}");
    }

    /// With the database down, every batch takes its whole timeout: a
    /// commit fails once it has waited [`MAX_WAIT`], not after every batch
    /// queued before it has timed out in turn.
    #[tokio::test(start_paused = true)]
    async fn with_the_store_down_no_commit_waits_for_every_batch_before_it() {
        let backend = Slow {
            delay: std::time::Duration::from_secs(5),
            most: usize::MAX,
            down: true,
            batches: Arc::new(Mutex::new(Vec::new())),
        };
        let results = queue_on(backend, 3000).await;
        assert!(results.iter().all(|(r, _)| r.is_err()));
        let longest = results.iter().map(|(_, t)| *t).max().unwrap();
        // At most MAX_WAIT in the queue, then one batch's timeout.
        assert!(
            longest <= MAX_WAIT + std::time::Duration::from_secs(5),
            "a commit waited {longest:?}"
        );
    }
}
