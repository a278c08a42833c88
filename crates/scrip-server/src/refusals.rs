//! Refusals a caller can repeat as fast as it can ask: a task token kept or
//! stolen past its task's end, a bound task's token without its key, a
//! proof replayed, an identity trying to decide a step it may not, an
//! approved step's collection refused, a process the attestation socket
//! does not serve. Each is recorded before
//! it is answered, up to [`PER_SECOND`] a second for one task (or one
//! uid at the attestation socket, one identity past its `[limits]`, or
//! one agent's task starts before it has a task) in
//! this process; the rest of that
//! second's are answered at once, counted, and recorded once the second
//! ends (or the server stops): one record per task, event, tool, actions
//! and kind (the error and the client's address; the executable and gid at
//! the socket), up to [`KINDS`] apart for one task and [`TOTAL`] in all,
//! the rest folded. A thief with a revoked token can then neither grow the
//! trail without bound nor hold up other agents' commits, and every
//! refusal is still on the record (docs/audit.md says when one is not).

use std::sync::Arc;
use std::time::Duration;

use scrip_store::{Admit, AuditEvent, Count, Holds, Store, StoreError, Tally, Write};

use crate::state::{Counted, now_ms};

/// The refusals of one task (or one uid at the attestation socket)
/// recorded one by one in a second, per process.
pub const PER_SECOND: u32 = 10;

/// The counts one task (or uid) keeps apart a second; past it, the rest
/// of its refusals share one count (a caller varying what it asks gets
/// `KINDS + 1` count records a second, not one a request).
pub const KINDS: usize = 8;

/// The most counts kept in all (while the store cannot take them, too);
/// past it, the rest share one count.
pub const TOTAL: usize = 4096;

/// This process's refusals, and the counts waiting to be recorded.
#[derive(Debug)]
pub(crate) struct Refusals {
    tally: Tally,
    /// Counts waiting for their second to end, or being written.
    writing: Arc<tokio::sync::watch::Sender<usize>>,
}

impl Default for Refusals {
    fn default() -> Self {
        Self {
            tally: Tally::with_limits(KINDS, TOTAL),
            writing: Arc::default(),
        }
    }
}

impl Refusals {
    /// Records `record`, a refusal charged to `key`: now, within the
    /// budget, or else counted and recorded once the second ends (`Ok` at
    /// once). Counted apart per event, tool, actions and `kind`.
    ///
    /// # Errors
    /// The store's, when the record is written now and cannot be.
    pub async fn record(
        self: &Arc<Self>,
        store: &Arc<dyn Store>,
        stopping: &tokio::sync::watch::Sender<bool>,
        key: &str,
        kind: &str,
        record: AuditEvent,
    ) -> Result<(), StoreError> {
        let count_as = format!(
            "{key}\n{}\n{}\n{}\n{kind}",
            record.event,
            record.tool.as_deref().unwrap_or_default(),
            record.actions.as_deref().unwrap_or_default()
        );
        match self.tally.admit((key, PER_SECOND), &count_as, &record) {
            Admit::Record => store.commit(vec![Write::Audit(Box::new(record))]).await,
            Admit::Counted { first } => {
                if first {
                    self.record_later(store.clone(), stopping.subscribe());
                }
                Ok(())
            }
        }
    }

    /// Records the counts once this second ends, or at once when the
    /// server stops; while the store cannot take them, again each second
    /// with those counted since (and once more by [`Self::flush`]).
    fn record_later(
        self: &Arc<Self>,
        store: Arc<dyn Store>,
        mut stopping: tokio::sync::watch::Receiver<bool>,
    ) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        self.writing.send_modify(|n| *n += 1);
        let counted = Counted(self.writing.clone());
        let this = self.clone();
        runtime.spawn(async move {
            loop {
                let wait = 1000 - now_ms() % 1000 + 10;
                // Stopping, or no server left to say so: one more try,
                // then `flush`'s.
                let stopped = tokio::select! {
                    () = tokio::time::sleep(Duration::from_millis(wait)) => false,
                    _ = stopping.wait_for(|stopped| *stopped) => true,
                };
                if this.write(store.as_ref()).await || stopped {
                    break;
                }
            }
            drop(counted);
        });
    }

    /// Commits the counts taken now, [`CHUNK`] records a commit: one
    /// record per count, the first counted refusal's, saying how many.
    /// Gives back those the store could not take (a record it refuses
    /// outright is dropped, and logged); `true` once nothing is left.
    async fn write(&self, store: &dyn Store) -> bool {
        let counts = self.tally.take();
        if counts.is_empty() {
            return true;
        }
        tracing::warn!(
            counts = counts.len(),
            "more than {PER_SECOND} refusals of one task (or uid) in a second; recording the rest as counts"
        );
        let mut left = Vec::new();
        let mut chunks = counts.chunks(CHUNK);
        for chunk in chunks.by_ref() {
            let writes = chunk.iter().map(count_record).collect();
            match store.commit(writes).await {
                Ok(()) => {}
                // One of them the store will never take: each alone.
                Err(StoreError::Refused(_) | StoreError::Conflict(_)) => {
                    for c in chunk {
                        match store.commit(vec![count_record(c)]).await {
                            Ok(()) => {}
                            Err(e @ (StoreError::Refused(_) | StoreError::Conflict(_))) => {
                                tracing::error!(error = %e, refusals = c.n, "a count of refusals the store refuses is not recorded");
                            }
                            Err(_) => left.push(c.clone()),
                        }
                    }
                }
                Err(_) => {
                    left.extend_from_slice(chunk);
                    break;
                }
            }
        }
        left.extend(chunks.flatten().cloned());
        if left.is_empty() {
            return true;
        }
        tracing::error!(
            refusals = left.iter().map(|c| c.n).sum::<u64>(),
            "counted refusals could not be recorded; kept to try again"
        );
        self.tally.restore(left);
        false
    }

    /// Logs how many refusals counted, or given back, go unrecorded: a
    /// stop whose store did not take them (in time).
    pub fn abandon(&self) {
        let lost: u64 = self.tally.take().iter().map(|c| c.n).sum();
        if lost > 0 {
            tracing::error!(
                refusals = lost,
                "counted refusals not recorded: the store did not take them as scrip stopped"
            );
        }
    }

    /// Waits for the counts being written (a stop wakes them), then
    /// writes any counted since, or given back; logs how many refusals
    /// go unrecorded when the store cannot take them.
    pub async fn flush(&self, store: &dyn Store) {
        let _ = self.writing.subscribe().wait_for(|n| *n == 0).await;
        if !self.write(store).await {
            self.abandon();
        }
    }
}

/// The most count records one commit carries.
const CHUNK: usize = 256;

/// `c` as the record that says how many it counts.
fn count_record(c: &Count) -> Write {
    let mut r = c.first.clone();
    r.at_ms = now_ms();
    let per = if r.event == "identity.attest" {
        "uid"
    } else if c.budget.starts_with("identity ") {
        // Past `[limits]`: charged to the identity (`refusal_over_pace`).
        "identity"
    } else if c.budget.starts_with("agent ") {
        // A task start's, before there is a task.
        "agent"
    } else {
        "task"
    };
    let one = if c.budget == crate::attest::UNSERVED_UIDS {
        "the uids no entry serves, together".to_owned()
    } else {
        format!("one {per}")
    };
    let holds = match c.holds {
        Holds::One => String::new(),
        Holds::Kinds => format!(", of several kinds (past {KINDS} kept apart for {one})"),
        Holds::Keys => format!(
            ", of several {per}s (past {TOTAL} counts kept in all; the first one's {per} is named)"
        ),
    };
    r.reason = Some(format!(
        "{} more refused{holds}, from {} to {} (ms since the epoch), recorded as a count: over {PER_SECOND} a second for {one}; the first of them: {}",
        c.n,
        c.first.at_ms,
        c.last_ms,
        c.first.reason.as_deref().unwrap_or("no reason given")
    ));
    Write::Audit(Box::new(r))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use scrip_store::{AuditEvent, AuditFilter, SqliteStore, Store};

    use super::{PER_SECOND, Refusals};

    /// Past the budget a refusal is counted and answered at once; the
    /// counts are recorded when the server stops (or the second ends),
    /// each saying how many and what the first was.
    #[tokio::test]
    async fn past_the_budget_refusals_are_counted_and_recorded_as_counts() {
        let dir = tempfile::tempdir().unwrap();
        let store: Arc<dyn Store> = Arc::new(SqliteStore::open_in(dir.path()).await.unwrap());
        let refusals = Arc::new(Refusals::default());
        let stopping = tokio::sync::watch::Sender::new(false);
        let at_ms = super::now_ms();
        let record = |event: &str, reason: &str| AuditEvent {
            at_ms,
            event: event.into(),
            task_id: Some("t1".into()),
            reason: Some(reason.into()),
            replica: "test".into(),
            ..AuditEvent::default()
        };
        let extra = 7;
        for i in 0..PER_SECOND + extra {
            refusals
                .record(
                    &store,
                    &stopping,
                    "t1",
                    "k",
                    record("token.refused", &format!("n{i}")),
                )
                .await
                .unwrap();
        }
        // The same task's other refusals share its budget, counted apart.
        refusals
            .record(&store, &stopping, "t1", "k", record("task.refused", "d"))
            .await
            .unwrap();
        // Another task has a budget of its own.
        refusals
            .record(
                &store,
                &stopping,
                "t2",
                "k",
                record("token.refused", "other"),
            )
            .await
            .unwrap();
        let written = |store: Arc<dyn Store>| async move {
            store
                .audit(&AuditFilter::default())
                .await
                .unwrap()
                .into_iter()
                .filter_map(|a| a.reason.map(|r| (a.event, r)))
                .collect::<Vec<_>>()
        };
        // One by one: the budget's, and the other task's. (The counts may
        // be written already, should a second have ended meanwhile.)
        let is_count = |(_, r): &(String, String)| r.contains(" more refused, from ");
        let before = written(store.clone()).await;
        assert_eq!(
            before.iter().filter(|r| !is_count(r)).count(),
            usize::try_from(PER_SECOND).unwrap() + 1,
            "{before:?}"
        );
        stopping.send_replace(true);
        refusals.flush(store.as_ref()).await;
        let after = written(store.clone()).await;
        let counts: Vec<_> = after.into_iter().filter(is_count).collect();
        assert_eq!(counts.len(), 2, "{counts:?}");
        let first = format!("n{PER_SECOND}");
        assert!(
            counts.iter().any(|(e, r)| e == "token.refused"
                && r.starts_with(&format!("{extra} more refused"))
                && r.ends_with(&format!("the first of them: {first}"))),
            "{counts:?}"
        );
        assert!(
            counts
                .iter()
                .any(|(e, r)| e == "task.refused" && r.starts_with("1 more refused")),
            "{counts:?}"
        );
    }
}
