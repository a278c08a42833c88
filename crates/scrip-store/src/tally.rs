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
    /// past it, a budget key's further kinds share one count.
    kinds: usize,
    state: Mutex<State>,
}

impl Default for Tally {
    fn default() -> Self {
        Self::with_kinds(usize::MAX)
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
    /// How many count keys each budget key has in `counted`.
    kinds: HashMap<String, usize>,
}

/// Refusals counted under one count key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Count {
    /// The count key.
    pub key: String,
    /// How many.
    pub n: u64,
    /// The first one's record.
    pub first: AuditEvent,
    /// When the last one was refused (milliseconds since the epoch).
    pub last_ms: u64,
    /// Whether the count holds refusals of several kinds, its budget key's
    /// kinds past [`Tally::with_kinds`]' limit.
    pub mixed: bool,
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
    /// A tally that keeps at most `kinds` counts apart for one budget key
    /// between two [`Self::take`]s (a caller that varies what a count key
    /// holds then gets at most `kinds + 1` counts a second, not one per
    /// request).
    #[must_use]
    pub fn with_kinds(kinds: usize) -> Self {
        Self {
            kinds,
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
        // A record of an earlier second (read before another that was
        // admitted first) counts against this one's budget.
        if second > s.second {
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
        let kinds = s.kinds.get(key).copied().unwrap_or(0);
        let (count_as, mixed) = if s.counted.contains_key(count_as) || kinds < self.kinds {
            (count_as.to_owned(), false)
        } else {
            // Past the kinds kept apart: one count of the rest. Its key
            // starts with a character no other count key's does.
            (format!("\u{0}{key}"), true)
        };
        match s.counted.get_mut(&count_as) {
            Some(c) => {
                c.n += 1;
                c.last_ms = c.last_ms.max(record.at_ms);
            }
            None => {
                *s.kinds.entry(key.to_owned()).or_insert(0) += 1;
                s.counted.insert(
                    count_as.clone(),
                    Count {
                        key: count_as,
                        n: 1,
                        first: record.clone(),
                        last_ms: record.at_ms,
                        mixed,
                    },
                );
            }
        }
        Admit::Counted { first }
    }

    /// The counts since they were last taken, in the order of their count
    /// keys; none are left.
    pub fn take(&self) -> Vec<Count> {
        let mut s = self.state();
        s.kinds.clear();
        std::mem::take(&mut s.counted).into_values().collect()
    }

    /// Gives back counts taken but not recorded (their commit failed), to
    /// be taken again with those counted since: a count counted since
    /// under the same key is added to it.
    pub fn restore(&self, counts: Vec<Count>) {
        let mut s = self.state();
        for c in counts {
            match s.counted.get_mut(&c.key) {
                Some(now) => {
                    now.n += c.n;
                    now.first = c.first;
                    now.mixed |= c.mixed;
                }
                None => {
                    s.counted.insert(c.key.clone(), c);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Admit, AuditEvent, Tally};

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
        // An earlier second's record counts against this second's budget.
        assert_eq!(
            t.admit(("a", 3), "a", &at(4_999, "late")),
            Admit::Counted { first: false }
        );
        // A new second has a new budget; the counts stay until taken.
        assert_eq!(t.admit(("a", 3), "a", &at(6_000, "z")), Admit::Record);
        let counts = t.take();
        assert_eq!(counts.len(), 1);
        assert_eq!(counts[0].n, 4);
        assert_eq!(counts[0].first.reason.as_deref(), Some("first counted"));
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
        let t = Tally::with_kinds(2);
        let _ = t.admit(("a", 0), "a/1", &at(1_000, "one"));
        let _ = t.admit(("a", 0), "a/2", &at(1_001, "two"));
        let _ = t.admit(("a", 0), "a/1", &at(1_002, "one again"));
        // Past two kinds, the rest share one count, whatever they are.
        let _ = t.admit(("a", 0), "a/3", &at(1_003, "three"));
        let _ = t.admit(("a", 0), "a/4", &at(1_004, "four"));
        // Another budget key keeps its own kinds.
        let _ = t.admit(("b", 0), "b/1", &at(1_005, "b"));
        let counts = t.take();
        let summary: Vec<_> = counts
            .iter()
            .map(|c| (c.n, c.first.reason.clone().unwrap(), c.mixed))
            .collect();
        assert_eq!(
            summary,
            [
                (2, "three".to_owned(), true),
                (2, "one".to_owned(), false),
                (1, "two".to_owned(), false),
                (1, "b".to_owned(), false),
            ]
        );
        // Taken, the kinds start over.
        assert!(matches!(
            t.admit(("a", 0), "a/5", &at(2_000, "five")),
            Admit::Counted { first: true }
        ));
        // Given back: added to what was counted since under the same key,
        // keeping the earlier first.
        t.restore(counts);
        let again = t.take();
        assert_eq!(again.len(), 5);
        let three = again.iter().find(|c| c.mixed).unwrap();
        assert_eq!((three.n, three.first.reason.as_deref()), (2, Some("three")));
        assert!(t.take().is_empty());
    }
}
