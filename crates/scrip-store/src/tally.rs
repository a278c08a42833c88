//! Refusal records a caller can cause as fast as it can ask (with a revoked
//! or stolen token, or at a socket anyone may reach): recorded one by one
//! up to a budget a second per key, then counted, and the counts recorded
//! once the second ends. The trail then neither grows without bound nor
//! holds up other agents' commits, and every refusal is still on it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::AuditEvent;

/// A process's refusals this second, per budget key, and those counted.
#[derive(Debug)]
pub struct Tally {
    /// The most counts kept apart for one budget key until they are taken;
    /// past it, a budget key's further kinds share one count per event.
    kinds: usize,
    /// The most counts kept in all; past it, the rest share one count.
    total: usize,
    state: Mutex<State>,
}

impl Default for Tally {
    fn default() -> Self {
        Self::with_limits(usize::MAX, usize::MAX)
    }
}

#[derive(Debug, Default)]
struct State {
    /// The newest second (since the epoch) `recorded` counts.
    second: u64,
    /// Refusals recorded one by one this second, per budget key.
    recorded: HashMap<String, u32>,
    /// Refusals counted since the last [`Tally::take`], per count key.
    counted: BTreeMap<String, Count>,
    /// How many count keys of their own each budget key has in `counted`.
    kinds: HashMap<String, usize>,
}

/// Refusals counted under one count key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Count {
    /// The budget key charged.
    pub budget: String,
    /// The count key.
    pub key: String,
    /// How many.
    pub n: u64,
    /// The first one's record.
    pub first: AuditEvent,
    /// When the last one was refused (milliseconds since the epoch).
    pub last_ms: u64,
    /// What the count holds.
    pub holds: Holds,
}

/// What a [`Count`] holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Holds {
    /// Refusals of one count key.
    One,
    /// One event's refusals of one budget key past its kinds kept apart.
    Kinds,
    /// One event's refusals of several budget keys, past the counts kept in
    /// all.
    Keys,
}

/// What to do with one refusal's record.
#[derive(Debug, PartialEq, Eq)]
pub enum Admit {
    /// Record it, now.
    Record,
    /// It is counted. `first` when nothing else was counted since the
    /// last [`Tally::take`]: whoever gets it records the counts (takes
    /// them) once this second ends.
    Counted {
        /// The first counted since the counts were last taken.
        first: bool,
    },
}

impl Tally {
    /// A tally that keeps at most `kinds` counts apart for one budget key,
    /// and `total` in all (given back ones included): a caller that
    /// varies what a count key holds gets a bounded number of counts, not
    /// one per request, and a store down for long holds bounded memory.
    #[must_use]
    pub fn with_limits(kinds: usize, total: usize) -> Self {
        Self {
            kinds,
            total,
            state: Mutex::new(State::default()),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Admits `record` (a refusal at its `at_ms`) against the budget
    /// `(key, per_second)`: the first `per_second` refusals of `key` in a
    /// second are recorded one by one, the rest counted under `count_as`
    /// (several budget keys may share one count, or one key's refusals be
    /// counted apart by what was asked).
    pub fn admit(&self, budget: (&str, u32), count_as: &str, record: &AuditEvent) -> Admit {
        let (key, per_second) = budget;
        let second = record.at_ms / 1000;
        let mut s = self.state();
        // A record of the second before (read before another that was
        // admitted first) counts against this one's budget; a clock set
        // back further starts over.
        if second > s.second || second.saturating_add(1) < s.second {
            s.second = second;
            s.recorded.clear();
        }
        let n = match s.recorded.get_mut(key) {
            Some(n) => n,
            None => s.recorded.entry(key.to_owned()).or_insert(0),
        };
        if *n < per_second {
            *n += 1;
            return Admit::Record;
        }
        let first = s.counted.is_empty();
        self.place(
            &mut s,
            Count {
                budget: key.to_owned(),
                key: count_as.to_owned(),
                n: 1,
                first: record.clone(),
                last_ms: record.at_ms,
                holds: Holds::One,
            },
        );
        Admit::Counted { first }
    }

    /// Adds `c` to the count of its key, or to the one it falls in past
    /// the limits.
    fn place(&self, s: &mut State, mut c: Count) {
        if !s.counted.contains_key(&c.key) {
            let kinds = s.kinds.get(&c.budget).copied().unwrap_or(0);
            let room = s.counted.len() < self.total;
            if c.holds == Holds::One && kinds < self.kinds && room {
                *s.kinds.entry(c.budget.clone()).or_insert(0) += 1;
            } else {
                // Keys no caller's count key is: they start with NUL.
                let mixed = format!("\u{0}{}\n{}", c.budget, c.first.event);
                if c.holds <= Holds::Kinds && (room || s.counted.contains_key(&mixed)) {
                    c.key = mixed;
                    c.holds = Holds::Kinds;
                } else {
                    // One per event, past the counts kept in all.
                    c.key = format!("\u{0}\u{0}{}", c.first.event);
                    c.holds = Holds::Keys;
                }
            }
        }
        match s.counted.get_mut(&c.key) {
            Some(now) => {
                now.n += c.n;
                if c.first.at_ms < now.first.at_ms {
                    now.first = c.first;
                }
                now.last_ms = now.last_ms.max(c.last_ms);
                now.holds = now.holds.max(c.holds);
            }
            None => {
                s.counted.insert(c.key.clone(), c);
            }
        }
    }

    /// The counts since they were last taken, in the order of their count
    /// keys; none are left.
    pub fn take(&self) -> Vec<Count> {
        let mut s = self.state();
        s.kinds.clear();
        std::mem::take(&mut s.counted).into_values().collect()
    }

    /// Gives back counts taken but not recorded (their commit failed), to
    /// be taken again with those counted since, within the same limits: a
    /// count counted since under the same key is added to it.
    pub fn restore(&self, counts: Vec<Count>) {
        let mut s = self.state();
        for c in counts {
            self.place(&mut s, c);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Admit, AuditEvent, Holds, Tally};

    fn at(ms: u64, reason: &str) -> AuditEvent {
        AuditEvent {
            at_ms: ms,
            event: "token.refused".into(),
            reason: Some(reason.into()),
            ..AuditEvent::default()
        }
    }

    #[test]
    fn a_key_past_its_budget_is_counted_until_the_next_second() {
        let t = Tally::default();
        for i in 0..3 {
            assert_eq!(t.admit(("a", 3), "a", &at(5_000 + i, "x")), Admit::Record);
        }
        // Another key has its own budget.
        assert_eq!(t.admit(("b", 3), "b", &at(5_100, "y")), Admit::Record);
        assert_eq!(
            t.admit(("a", 3), "a", &at(5_200, "first counted")),
            Admit::Counted { first: true }
        );
        assert_eq!(
            t.admit(("a", 3), "a", &at(5_300, "second counted")),
            Admit::Counted { first: false }
        );
        // Two budget keys may share a count.
        for _ in 0..4 {
            let _ = t.admit(("c", 3), "a", &at(5_400, "c"));
        }
        // An earlier second's record counts against this second's budget
        // (and, the earliest, is the count's first).
        assert_eq!(
            t.admit(("a", 3), "a", &at(4_999, "late")),
            Admit::Counted { first: false }
        );
        // A clock set back has a new budget too.
        assert_eq!(t.admit(("b", 3), "b", &at(3_000, "back")), Admit::Record);
        // A new second has a new budget; the counts stay until taken.
        assert_eq!(t.admit(("a", 3), "a", &at(6_000, "z")), Admit::Record);
        let counts = t.take();
        assert_eq!(counts.len(), 1);
        assert_eq!(counts[0].n, 4);
        assert_eq!(counts[0].holds, Holds::One);
        assert_eq!(counts[0].first.reason.as_deref(), Some("late"));
        assert_eq!(counts[0].last_ms, 5_400);
        assert!(t.take().is_empty());
        // Once taken, the next one counted is a first again.
        for _ in 0..2 {
            let _ = t.admit(("a", 3), "a", &at(6_500, "z"));
        }
        assert_eq!(
            t.admit(("a", 3), "a", &at(6_600, "z")),
            Admit::Counted { first: true }
        );
    }

    #[test]
    fn kinds_past_the_limit_share_a_count_and_counts_given_back_are_added() {
        let t = Tally::with_limits(2, usize::MAX);
        let _ = t.admit(("a", 0), "a/1", &at(1_000, "one"));
        let _ = t.admit(("a", 0), "a/2", &at(1_001, "two"));
        let _ = t.admit(("a", 0), "a/1", &at(1_002, "one again"));
        // Past two kinds, the rest of an event share one count, whatever
        // they are.
        let _ = t.admit(("a", 0), "a/3", &at(1_003, "three"));
        let _ = t.admit(("a", 0), "a/4", &at(1_004, "four"));
        let mut other = at(1_004, "other event");
        other.event = "task.refused".into();
        let _ = t.admit(("a", 0), "a/5", &other);
        // Another budget key keeps its own kinds.
        let _ = t.admit(("b", 0), "b/1", &at(1_005, "b"));
        let counts = t.take();
        let summary: Vec<_> = counts
            .iter()
            .map(|c| (c.n, c.first.reason.clone().unwrap(), c.holds))
            .collect();
        assert_eq!(
            summary,
            [
                (1, "other event".to_owned(), Holds::Kinds),
                (2, "three".to_owned(), Holds::Kinds),
                (2, "one".to_owned(), Holds::One),
                (1, "two".to_owned(), Holds::One),
                (1, "b".to_owned(), Holds::One),
            ]
        );
        // Taken, the kinds start over.
        assert!(matches!(
            t.admit(("a", 0), "a/6", &at(2_000, "six")),
            Admit::Counted { first: true }
        ));
        let _ = t.admit(("a", 0), "a/1", &at(2_001, "one, later"));
        // Given back, within the same limits: "a/1" is added to what was
        // counted since, keeping the earlier first; "a/2" finds the
        // kinds taken, and joins the rest.
        t.restore(counts);
        let again: Vec<_> = t
            .take()
            .into_iter()
            .map(|c| (c.key.clone(), c.n, c.first.reason.clone().unwrap(), c.holds))
            .collect();
        assert_eq!(
            again,
            [
                (
                    "\u{0}a\ntask.refused".to_owned(),
                    1,
                    "other event".to_owned(),
                    Holds::Kinds
                ),
                (
                    "\u{0}a\ntoken.refused".to_owned(),
                    3,
                    "two".to_owned(),
                    Holds::Kinds
                ),
                ("a/1".to_owned(), 3, "one".to_owned(), Holds::One),
                ("a/6".to_owned(), 1, "six".to_owned(), Holds::One),
                ("b/1".to_owned(), 1, "b".to_owned(), Holds::One),
            ]
        );
        assert!(t.take().is_empty());
    }

    #[test]
    fn past_the_counts_kept_in_all_the_rest_share_one() {
        let t = Tally::with_limits(usize::MAX, 2);
        for (i, key) in ["a", "b", "c", "d"].into_iter().enumerate() {
            let _ = t.admit((key, 0), key, &at(1_000 + i as u64, key));
        }
        // Another event's have a count of their own.
        let mut other = at(1_010, "x");
        other.event = "identity.attest".into();
        let _ = t.admit(("x", 0), "x", &other);
        let counts = t.take();
        let summary: Vec<_> = counts
            .iter()
            .map(|c| (c.n, c.first.reason.clone().unwrap(), c.holds))
            .collect();
        assert_eq!(
            summary,
            [
                (1, "x".to_owned(), Holds::Keys),
                (2, "c".to_owned(), Holds::Keys),
                (1, "a".to_owned(), Holds::One),
                (1, "b".to_owned(), Holds::One),
            ]
        );
        // Given back while others were counted: still within the limit.
        let _ = t.admit(("e", 0), "e", &at(2_000, "e"));
        let _ = t.admit(("f", 0), "f", &at(2_001, "f"));
        t.restore(counts);
        let again: Vec<_> = t.take().into_iter().map(|c| (c.n, c.holds)).collect();
        assert_eq!(
            again,
            [
                (1, Holds::Keys),
                (4, Holds::Keys),
                (1, Holds::One),
                (1, Holds::One)
            ]
        );
    }
}
