//! Work beside the requests: policy reload ([`crate::policies`]), ending
//! tasks at their deadline and the shared key set. (Audit records need no
//! work here: the store signs the chain head in every commit.)

use std::time::Duration;

use scrip_store::Write;

use crate::state::{AppState, now};

/// The handles of the background tasks.
#[derive(Debug)]
pub struct Background(Vec<tokio::task::JoinHandle<()>>);

impl Background {
    /// Stops them.
    pub fn abort(&self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// Starts the background tasks.
pub fn spawn(state: AppState, hangup: Option<tokio::signal::unix::Signal>) -> Background {
    let reload = state.0.policy.spawn_reloader(hangup);
    let upkeep = scrip_vital::spawn("upkeep", upkeep_loop(state.clone()));
    let sweep = scrip_vital::spawn("expiry sweep", expiry_loop(state.clone()));
    let keys = scrip_vital::spawn("key ring", keys_loop(state));
    Background(vec![reload, upkeep, sweep, keys])
}

/// Follows the shared key set: re-reads it when the store signals a key
/// change, when a rotation or a switch is due, and every
/// [`crate::keyring::POLL`] in any case, rotating and retiring keys. Nothing to do for file keys.
async fn keys_loop(state: AppState) {
    let st = &state.0;
    if !st.keyring.is_shared() {
        // A file key set changes only as keys of a former algorithm leave.
        while let Some(at) = st.keyring.next_retired_expiry() {
            let wait = at.saturating_sub(now());
            tokio::time::sleep(Duration::from_secs(wait)).await;
            st.keyring.expire_retired(now());
        }
        return;
    }
    let mut changes = st.store.changes();
    let mut seen = changes.borrow_and_update().keys;
    // When the key set could last not be read, and when that was last
    // said: while it cannot, it is read every `POLL` (not at each signal,
    // nor at each 200 ms of a rotation that is due), and said once a minute.
    let mut failing: Option<(std::time::Instant, std::time::Instant)> = None;
    loop {
        let at = now();
        let soonest = if failing.is_some() {
            crate::keyring::POLL
        } else {
            Duration::from_millis(200)
        };
        let wait = st
            .keyring
            .next_due(at)
            .map_or(crate::keyring::POLL, |due| {
                Duration::from_secs(due.saturating_sub(at))
            })
            .clamp(soonest, crate::keyring::POLL);
        // One deadline for this wait: the store signals every revocation
        // too, and restarting the timer at each would, under steady load,
        // put off the re-read and any rotation for as long as it lasts.
        let deadline = tokio::time::Instant::now() + wait;
        if failing.is_some() {
            tokio::time::sleep_until(deadline).await;
        }
        while failing.is_none() {
            tokio::select! {
                r = changes.changed() => {
                    if r.is_err() {
                        tokio::time::sleep_until(deadline).await;
                        break;
                    }
                    let now_seen = changes.borrow_and_update().keys;
                    if now_seen != seen {
                        seen = now_seen;
                        break;
                    }
                }
                () = tokio::time::sleep_until(deadline) => break,
            }
        }
        // Audited in the commit that changes the keys, and logged by it.
        match st.keyring.sync(st.store.as_ref(), now(), &st.replica).await {
            Ok(_) => {
                if let Some((since, _)) = failing.take() {
                    tracing::info!(
                        after_s = since.elapsed().as_secs(),
                        "the shared keys are read again"
                    );
                }
            }
            Err(e) => {
                let t = std::time::Instant::now();
                if failing.is_none_or(|(_, said)| said.elapsed() >= Duration::from_secs(60)) {
                    let since = failing.map_or(t, |(since, _)| since);
                    tracing::warn!(
                        error = %e,
                        failing_s = since.elapsed().as_secs(),
                        "cannot read or use the shared keys; keeping the keys in use"
                    );
                    failing = Some((since, t));
                }
            }
        }
    }
}

/// Every second: approval steps past their time expired, and revocations
/// (and used DPoP proofs) past theirs purged; every five, the steps of
/// tasks that ended expired (each second while a round finds its most).
async fn upkeep_loop(state: AppState) {
    let st = &state.0;
    let mut ticks: u64 = 0;
    let mut purge_failing = false;
    // A round of ended tasks' steps found as many as it takes: the next
    // tick looks again.
    let mut orphans_left = false;
    let mut purge_clock = PurgeClock::new(now(), std::time::Instant::now());
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        ticks += 1;
        let (now, mono) = (now(), std::time::Instant::now());
        crate::approval::expire(st, now).await;
        if orphans_left || ticks.is_multiple_of(crate::approval::ORPHANS_EVERY) {
            orphans_left = crate::approval::expire_orphans(st, now).await;
        }
        // Kept a while past their time (`clock_skew`, at least a minute):
        // another replica, or `scrip proxy`, whose clock is behind this
        // one's still accepts the tokens, and a single use claimed must
        // not be forgotten before it stops doing so.
        // A chunk a tick: a backlog (after an outage, or at thousands of
        // ends a second) goes a chunk at a time, each a short commit, rather
        // than in one that would hold the write lock, and the requests
        // batched beside it, for seconds. With nothing to drop, a commit that
        // changes nothing.
        // What the purge deletes is what stops a revoked token, a spent
        // single use or a used proof from passing again, for every replica:
        // a wall clock stepped ahead is believed only once it has stayed
        // so for as long as rows are kept past their time.
        let purge_now = purge_clock.at(now, mono, Duration::from_secs(kept_past(st)));
        let purged_before = purge_now.saturating_sub(kept_past(st));
        // A DPoP proof is refused past its age plus the leeway, by every
        // verifier whose clock is within the leeway of this one: its use
        // need not be kept after that (and `kept_past` more).
        let proofs_before =
            scrip_jose::dpop::forgettable_before(purged_before, st.config.clock_skew);
        let purged = st
            .store
            .commit(vec![
                Write::PurgeRevocations {
                    now: purged_before,
                    limit: PURGE_CHUNK,
                },
                Write::PurgeProofs {
                    made_before: proofs_before,
                    limit: PROOF_PURGE_CHUNK,
                },
            ])
            .await;
        match purged {
            Ok(()) => purge_failing = false,
            // Said when purges start failing, then once a minute.
            Err(e) => {
                if !purge_failing || ticks.is_multiple_of(60) {
                    tracing::warn!(error = %e, "could not purge expired revocations and DPoP proofs");
                }
                purge_failing = true;
            }
        }
    }
}

/// The time the purges go by: the wall clock, but not ahead of where the
/// monotonic clock puts it (by more than a second) until it has stayed
/// ahead for a while. A wall clock stepped ahead (a bad NTP answer, `date
/// -s`) and back would otherwise have one tick delete, for every replica,
/// revocations, single-use claims and DPoP proofs still needed, which
/// nothing brings back; one that stays ahead (a correction, a resumed
/// machine) is followed once it has lasted. Stepped back, it is followed
/// at once: the purges wait the longer.
struct PurgeClock {
    /// A wall-clock reading (seconds) believed, and when it was read.
    wall: u64,
    read: std::time::Instant,
    /// Since when the wall clock has been ahead of the monotonic one.
    ahead_since: Option<std::time::Instant>,
}

impl PurgeClock {
    fn new(wall: u64, read: std::time::Instant) -> Self {
        Self {
            wall,
            read,
            ahead_since: None,
        }
    }

    /// The time to purge by at `wall`, read at `mono`: `wall`, unless it
    /// is ahead of the last reading believed plus the monotonic time since
    /// (and a second, for rounding) and has not been so for `believe_after`.
    fn at(&mut self, wall: u64, mono: std::time::Instant, believe_after: Duration) -> u64 {
        let kept = self
            .wall
            .saturating_add(mono.saturating_duration_since(self.read).as_secs());
        if wall <= kept.saturating_add(1) {
            self.ahead_since = None;
            // Stepped back: follow it from here.
            if wall < kept {
                *self = Self::new(wall, mono);
            }
            return wall;
        }
        let since = *self.ahead_since.get_or_insert(mono);
        if mono.saturating_duration_since(since) >= believe_after {
            *self = Self::new(wall, mono);
            wall
        } else {
            kept
        }
    }
}

/// Expired revocations (and feed events) dropped a tick at most, of each:
/// more than thousands of task ends a second leave.
const PURGE_CHUNK: u32 = 10_000;

/// DPoP proofs used dropped a tick at most: one is kept for each DPoP
/// request, and a purge that drops fewer a second than come would let the
/// table grow for as long as the load lasts (the fastest run measured
/// 15,000 DPoP exchanges a second).
const PROOF_PURGE_CHUNK: u32 = 40_000;

/// Tasks ended per sweep commit.
const SWEEP: u32 = 50;
/// The longest pass of the sweep: the tasks due at its start are ended
/// with that time, so a longer backlog is left to the next pass.
const SWEEP_PASS: Duration = Duration::from_secs(30);

/// Ends the tasks past their deadline, every second, each pass as many as
/// were due when it began, in small commits: on PostgreSQL each task ended
/// is three round trips under the lock every replica's writes take, and a
/// sweep shares its commit's fate with the requests batched beside it, so
/// one sweep of hundreds of tasks would hold every replica up and could
/// outrun the commit's time limit. After each commit the pass waits as long
/// as the commit took: a backlog (after an outage, or with thousands of
/// tasks a second reaching their deadline) takes at most about half of the
/// writer's time, however large it is, rather than a fixed number a second
/// that tasks could outrun. Its own task: a long pass holds up neither
/// approvals' expiry nor the purge.
async fn expiry_loop(state: AppState) {
    let st = &state.0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        let now = now();
        let pass = tokio::time::Instant::now();
        loop {
            let began = tokio::time::Instant::now();
            if !sweep_due(st, now).await {
                break;
            }
            let took = began.elapsed();
            if pass.elapsed() + took >= SWEEP_PASS {
                break;
            }
            tokio::time::sleep(took).await;
        }
    }
}

/// Ends up to [`SWEEP`] tasks past their deadline in one commit; whether a
/// full sweep was committed, so that more may be due.
async fn sweep_due(st: &crate::state::Inner, now: u64) -> bool {
    let mut due = match st.store.due_tasks(now, SWEEP).await {
        Ok(due) if !due.is_empty() => due,
        Ok(_) => return false,
        Err(e) => {
            tracing::warn!(error = %e, "could not read due tasks; will retry");
            return false;
        }
    };
    // Children first: a parent's ending ends its open descendants, so a
    // child after it in the one commit would find itself ended and refuse
    // the commit, every tick (a child's deadline is its parent's at the
    // latest, so both are often due together).
    due.sort_by_key(|t| std::cmp::Reverse(t.depth));
    let full = due.len() >= usize::try_from(SWEEP).unwrap_or(usize::MAX);
    let mut writes = Vec::with_capacity(due.len() * 2);
    for task in &due {
        writes.push(Write::EndOpenTask {
            id: task.id.clone(),
            at: now,
            reason: "expired".into(),
            // A task that reached its deadline needs no event: its tokens
            // expire with it. An event each would send every follower one
            // per expiring task.
            grace: 0,
        });
        writes.push(Write::Audit(Box::new(st.task_audit("task.expired", task))));
    }
    match st.store.commit(writes).await {
        Ok(()) => full,
        // One of them was ended meanwhile (a revocation, another replica's
        // sweep): read again at the next tick.
        Err(scrip_store::StoreError::Conflict(e)) => {
            tracing::debug!(error = %e, "an expiring task ended meanwhile; sweeping again");
            false
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not record expired tasks; will retry");
            false
        }
    }
}

/// Seconds a revocation is kept, and served in the feed, past its `exp`
/// (`clock_skew`, at least a minute): a replica, `scrip proxy` or a
/// resource server whose clock is behind this one's still accepts the
/// token, and one that starts reading the feed then must still learn of it.
pub(crate) fn kept_past(st: &crate::state::Inner) -> u64 {
    st.config.clock_skew.max(60)
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::PurgeClock;

    /// A wall clock stepped ahead purges nothing early until it has stayed
    /// ahead a minute; stepped back, it is followed at once.
    #[test]
    fn the_purges_follow_a_clock_stepped_ahead_only_once_it_stays() {
        let t0 = Instant::now();
        let secs = Duration::from_secs;
        let minute = secs(60);
        let mut clock = PurgeClock::new(1_000, t0);
        // (wall clock, monotonic seconds since t0, the time purged by)
        let readings = [
            // In step (a second of rounding either way is the wall clock's).
            (1_010, 10, 1_010),
            (1_011, 10, 1_011),
            // Stepped 200 s ahead for a few seconds, then back: the purges
            // went by the monotonic clock all along.
            (1_220, 20, 1_020),
            (1_250, 50, 1_050),
            (1_051, 51, 1_051),
            // Ahead again: the wait starts afresh, and is over after a
            // minute ahead, from which the wall clock is followed.
            (1_400, 60, 1_060),
            (1_459, 119, 1_119),
            (1_460, 120, 1_460),
            (1_461, 121, 1_461),
            // Stepped back: followed at once, and from there.
            (900, 122, 900),
            (905, 127, 905),
            (1_000, 128, 906),
        ];
        for (wall, mono, purged_by) in readings {
            assert_eq!(
                clock.at(wall, t0 + secs(mono), minute),
                purged_by,
                "at {wall}, {mono} s in"
            );
        }
    }
}
