//! Refusal records a caller can cause as fast as it can ask (with a revoked
//! or stolen token, or at a socket anyone may reach): recorded one by one
//! up to a budget a second per key, then counted, and each second's counts
//! recorded once it ends. The trail then neither grows without bound nor
//! holds up other agents' commits, and every refusal is still on it.

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;

use crate::AuditEvent;

/// A process's refusals this second, per budget key, and those counted.
#[derive(Debug, Default)]
pub struct Tally {
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    /// The second (since the epoch) whose refusals `recorded` counts.
    second: u64,
    /// Refusals recorded one by one this second, per budget key.
    recorded: HashMap<String, u32>,
    /// Refusals counted since the last [`Tally::take`], per count key: how
    /// many, and the first one's record.
    counted: BTreeMap<String, (u64, AuditEvent)>,
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
    /// Admits `record` (a refusal at its `at_ms`) against the budget
    /// `(key, per_second)`: the first `per_second` refusals of `key` in a
    /// second are recorded one by one, the rest counted under `count_as`
    /// (several budget keys may share one count, or one key be counted
    /// apart by what was asked).
    pub fn admit(&self, budget: (&str, u32), count_as: &str, record: &AuditEvent) -> Admit {
        let (key, per_second) = budget;
        let second = record.at_ms / 1000;
        let mut s = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if s.second != second {
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
        match s.counted.get_mut(count_as) {
            Some((count, _)) => *count += 1,
            None => {
                s.counted.insert(count_as.to_owned(), (1, record.clone()));
            }
        }
        Admit::Counted { first }
    }

    /// The counts since they were last taken, each with the first counted
    /// refusal's record, in the order of their count keys; none are left.
    pub fn take(&self) -> Vec<(u64, AuditEvent)> {
        let mut s = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        std::mem::take(&mut s.counted).into_values().collect()
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
        // A new second has a new budget; the counts stay until taken.
        assert_eq!(t.admit(("a", 3), "a", &at(6_000, "z")), Admit::Record);
        let counts = t.take();
        assert_eq!(counts.len(), 1);
        assert_eq!(counts[0].0, 3);
        assert_eq!(counts[0].1.reason.as_deref(), Some("first counted"));
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
}
