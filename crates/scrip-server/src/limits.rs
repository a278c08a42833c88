//! `[limits]`: how fast one workload identity may ask this replica for
//! tasks and for access tokens, so that one agent (a runaway loop, a stolen
//! identity, any workflow of an issuer trusted too widely) cannot take the
//! token service, its store and its audit trail from the others.
//!
//! Each limit is the generic cell rate algorithm: an identity's requests
//! are spaced at `interval` on average, and may run `burst - 1` intervals
//! ahead of that pace. Only the time its next request is due is kept (the
//! theoretical arrival time), under a hash of its issuer and subject with
//! a key of this process's (two identities would share a budget only when
//! 64-bit hashes collide, which a client cannot steer). An identity whose
//! due time has passed has its whole burst again, as one never seen: such
//! entries are dropped by a walk of the map, when a new identity finds it
//! at half its bound or more and doubled since the last walk (or full),
//! at most every [`WALK_EVERY`]. At [`MAX_IDENTITIES`] owing identities, a
//! new one is refused until some have caught up: the limit fails closed.

use std::collections::HashMap;
use std::hash::BuildHasher;
use std::sync::Mutex;
use std::time::Instant;

/// The most identities one limit keeps behind their pace at once: 16 bytes
/// each.
pub(crate) const MAX_IDENTITIES: usize = 1 << 17;

/// One limit, for all identities.
#[derive(Debug)]
pub(crate) struct Limit {
    /// Nanoseconds between two requests at the rate.
    interval: u64,
    /// How far ahead of now an identity's due time may be: `burst - 1`
    /// intervals.
    tolerance: u64,
    per_minute: u64,
    burst: u64,
    origin: Instant,
    keys: std::hash::RandomState,
    due: Mutex<Due>,
}

#[derive(Debug, Default)]
struct Due {
    /// Identity hash → nanoseconds after `origin` its next request is due.
    at: HashMap<u64, u64>,
    /// The size at which the map is next walked for entries caught up.
    trim_at: usize,
    /// Not walked again before this (nanoseconds after `origin`), so that
    /// a full map costs a walk a [`WALK_EVERY`], not one a request.
    walk_after: u64,
}

/// The least time between two walks of a limit's map, nanoseconds.
const WALK_EVERY: u64 = NANOS / 10;

/// Why a request is refused: when one would next be taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Refused {
    /// Not for the identity's pace: as many identities are behind theirs
    /// as a limit keeps ([`MAX_IDENTITIES`]), and this one is not among
    /// them.
    pub(crate) full: bool,
    /// Whole seconds to wait (at least 1), for `Retry-After`.
    pub(crate) retry_after: u64,
    /// The rate a minute.
    pub(crate) per_minute: u64,
    /// The burst.
    pub(crate) burst: u64,
}

impl Limit {
    /// `per_minute` on average, `burst` at once (both at least 1, as the
    /// configuration checks; less is taken as 1).
    pub(crate) fn new(per_minute: u64, burst: u64) -> Self {
        let per_minute = per_minute.max(1);
        let burst = burst.max(1);
        let interval = (60 * NANOS).div_ceil(per_minute);
        Self {
            interval,
            tolerance: interval.saturating_mul(burst - 1),
            per_minute,
            burst,
            origin: Instant::now(),
            keys: std::hash::RandomState::new(),
            due: Mutex::new(Due::default()),
        }
    }

    /// Takes one request of the identity `issuer` + `subject`, or says
    /// when to ask again.
    pub(crate) fn take(&self, issuer: &str, subject: &str) -> Result<(), Refused> {
        let key = self.keys.hash_one((issuer, subject));
        let now = u64::try_from(self.origin.elapsed().as_nanos()).unwrap_or(u64::MAX);
        self.take_at(key, now)
    }

    /// [`Limit::take`] for the identity hashed to `key`, `now` nanoseconds
    /// after `origin`.
    fn take_at(&self, key: u64, now: u64) -> Result<(), Refused> {
        let refused = |wait: u64, full: bool| Refused {
            full,
            retry_after: wait.div_ceil(NANOS).max(1),
            per_minute: self.per_minute,
            burst: self.burst,
        };
        // A poisoned lock (a panic while it was held: none of this code's)
        // holds a map that is still whole: each change below is one insert.
        let mut due = self
            .due
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let due = &mut *due;
        let kept = due.at.get(&key).copied();
        if kept.is_none() {
            if due.at.len() >= due.trim_at.clamp(MAX_IDENTITIES / 2, MAX_IDENTITIES)
                && now >= due.walk_after
            {
                due.at.retain(|_, at| *at > now);
                due.trim_at = due.at.len().saturating_mul(2);
                due.walk_after = now.saturating_add(WALK_EVERY);
            }
            if due.at.len() >= MAX_IDENTITIES {
                // As many identities behind their pace as are kept: a new
                // one waits until some catch up.
                return Err(refused(self.interval.max(WALK_EVERY), true));
            }
        }
        let at = kept.filter(|&at| at > now).unwrap_or(now);
        let ahead = at - now;
        if ahead > self.tolerance {
            return Err(refused(ahead - self.tolerance, false));
        }
        due.at.insert(key, at.saturating_add(self.interval));
        Ok(())
    }
}

const NANOS: u64 = 1_000_000_000;

/// The limits of `[limits]`, one per kind of request.
#[derive(Debug)]
pub(crate) struct Limits {
    /// Task starts and delegations.
    pub(crate) tasks: Limit,
    /// Access tokens.
    pub(crate) access_tokens: Limit,
}

impl Limits {
    pub(crate) fn new(config: &scrip_config::Limits) -> Self {
        Self {
            tasks: Limit::new(config.tasks_per_minute, config.task_burst),
            access_tokens: Limit::new(config.access_tokens_per_minute, config.access_token_burst),
        }
    }
}

/// Who asks with a task's token, charged for what it asks: the task's
/// current sub-agent, else its agent.
pub(crate) fn holder(task: &scrip_store::TaskRecord) -> (&str, &str) {
    match &task.actor {
        // A token from before actors carried their issuer: charged apart
        // from every issuer's identity of that name.
        Some(a) => (a.iss.as_deref().unwrap_or_default(), a.sub.as_str()),
        None => (task.agent.issuer.as_str(), task.agent.subject.as_str()),
    }
}

impl Refused {
    /// The answer: 429 `temporarily_unavailable` with `Retry-After`, saying
    /// which limit and how to change it.
    pub(crate) fn error(self, what: &str, key: &str) -> crate::error::OAuthError {
        let description = if self.full {
            format!(
                "this replica already paces as many workload identities for {what} as it keeps ({MAX_IDENTITIES}, `[limits]`), and a new one waits until some catch up; retry after {} s",
                self.retry_after
            )
        } else {
            format!(
                "this workload identity asked for {what} faster than this server allows ({} a minute, {} at once: `[limits] {key}`); retry after {} s",
                self.per_minute, self.burst, self.retry_after
            )
        };
        crate::error::OAuthError::too_many(description, self.retry_after)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: u64 = NANOS;

    #[test]
    fn a_burst_is_taken_then_the_rate() {
        // 60 a minute: one a second, 3 at once.
        let l = Limit::new(60, 3);
        let t0 = 10 * SECOND;
        for _ in 0..3 {
            assert_eq!(l.take_at(1, t0), Ok(()));
        }
        let refused = l.take_at(1, t0).unwrap_err();
        assert_eq!((refused.retry_after, refused.full), (1, false));
        assert_eq!((refused.per_minute, refused.burst), (60, 3));
        // Another identity has its own burst.
        assert_eq!(l.take_at(2, t0), Ok(()));
        // Half a second on: still none; a second on, one; then none.
        assert!(l.take_at(1, t0 + SECOND / 2).is_err());
        assert_eq!(l.take_at(1, t0 + SECOND), Ok(()));
        assert!(l.take_at(1, t0 + SECOND).is_err());
        // A refusal costs nothing: the pace is kept, not pushed back.
        for _ in 0..100 {
            assert!(l.take_at(1, t0 + SECOND + 1).is_err());
        }
        assert_eq!(l.take_at(1, t0 + 2 * SECOND), Ok(()));
        // Idle for the burst's length: the whole burst again.
        let later = t0 + 10 * SECOND;
        for _ in 0..3 {
            assert_eq!(l.take_at(1, later), Ok(()));
        }
        assert!(l.take_at(1, later).is_err());
    }

    #[test]
    fn the_wait_is_said_in_whole_seconds_until_one_is_taken() {
        // Two a minute, one at once: 30 s apart.
        let l = Limit::new(2, 1);
        assert_eq!(l.take_at(7, SECOND), Ok(()));
        assert_eq!(l.take_at(7, SECOND).unwrap_err().retry_after, 30);
        assert_eq!(
            l.take_at(7, SECOND + 29 * SECOND + 1)
                .unwrap_err()
                .retry_after,
            1
        );
        assert_eq!(l.take_at(7, SECOND + 30 * SECOND), Ok(()));
        // The most a minute: a million a second, none refused in a burst.
        let l = Limit::new(scrip_config::MAX_PER_MINUTE, scrip_config::MAX_BURST);
        for _ in 0..1000 {
            assert_eq!(l.take_at(1, SECOND), Ok(()));
        }
    }

    #[test]
    fn identities_caught_up_are_forgotten_and_a_full_map_refuses_new_ones() {
        let l = Limit::new(60, 1);
        let n = u64::try_from(MAX_IDENTITIES).unwrap();
        for key in 0..n {
            assert_eq!(l.take_at(key, SECOND), Ok(()));
        }
        // Every one owes a second: a new identity is refused, and so is
        // the next (the map does not grow past its bound), without another
        // walk within a tenth of a second.
        assert!(l.take_at(n, SECOND).unwrap_err().full);
        assert!(l.take_at(n + 1, SECOND).unwrap_err().full);
        assert_eq!(l.due.lock().unwrap().at.len(), MAX_IDENTITIES);
        assert_eq!(l.due.lock().unwrap().walk_after, SECOND + WALK_EVERY);
        // Those kept are refused for their own pace, then taken.
        assert!(!l.take_at(0, SECOND + 1).unwrap_err().full);
        // A walk that frees nothing (all still owe) leaves the map to be
        // walked again once it is full, not only at twice its bound.
        assert!(l.take_at(n, SECOND + SECOND / 5).unwrap_err().full);
        // A second on, all have caught up: the map is walked and emptied,
        // and the new identity is taken.
        assert_eq!(l.take_at(n, 2 * SECOND), Ok(()));
        assert_eq!(l.due.lock().unwrap().at.len(), 1);
        // Half of them owing: the walk keeps them, and the rest of the map
        // takes new identities until it is full again.
        let l = Limit::new(60, 1);
        for key in 0..n / 2 {
            assert_eq!(l.take_at(key, SECOND), Ok(()));
        }
        for key in n / 2..n {
            assert_eq!(l.take_at(key, SECOND + SECOND / 2), Ok(()));
        }
        assert_eq!(l.take_at(n, 2 * SECOND + 1), Ok(()));
        assert_eq!(l.due.lock().unwrap().at.len(), MAX_IDENTITIES / 2 + 1);
        assert!(l.take_at(0, 2 * SECOND + 1).is_ok());
    }
}
