//! Log lines that anyone can cause (a refused request, a store failure
//! each request meets), limited per second: a flood of them must neither
//! fill the disk nor bury the lines that matter.

use std::sync::Mutex;

/// One kind of line's budget: at most `per_second` a second; the rest are
/// counted, and the count is logged with the first line of a later second.
#[derive(Debug)]
pub struct LogBudget {
    per_second: u32,
    /// The second counted, lines logged in it, lines left out since the
    /// last count was logged.
    state: Mutex<(u64, u32, u64)>,
}

impl LogBudget {
    /// A budget of `per_second` lines a second.
    #[must_use]
    pub const fn new(per_second: u32) -> Self {
        Self {
            per_second,
            state: Mutex::new((0, 0, 0)),
        }
    }

    /// Whether one more line (of what `what` names) may be logged now.
    pub fn allow(&self, what: &str) -> bool {
        let second = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        self.allow_at(what, second)
    }

    fn allow_at(&self, what: &str, second: u64) -> bool {
        let mut s = match self.state.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if s.0 != second {
            if s.2 > 0 {
                tracing::warn!(
                    left_out = s.2,
                    "{what}: {} more lines were not logged one by one (over {} a second)",
                    s.2,
                    self.per_second
                );
            }
            *s = (second, 0, 0);
        }
        if s.1 < self.per_second {
            s.1 += 1;
            true
        } else {
            s.2 += 1;
            false
        }
    }
}

#[cfg(test)]
mod tests {
    use super::LogBudget;

    #[test]
    fn a_second_allows_its_budget_and_counts_the_rest() {
        let b = LogBudget::new(3);
        let allowed = |second| (0..5).filter(|_| b.allow_at("x", second)).count();
        assert_eq!(allowed(100), 3);
        assert_eq!(allowed(100), 0, "the same second, spent");
        assert_eq!(allowed(101), 3, "a new second");
        assert_eq!(b.state.lock().unwrap().2, 2, "the left out counted");
    }
}
