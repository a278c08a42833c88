//! Log lines that anyone can cause (a refused request, a store failure
//! each request meets), limited per second: a flood of them must neither
//! fill the disk nor bury the lines that matter.

use std::sync::Mutex;

/// One kind of line's budget: at most `per_second` a second; the rest are
/// counted, and the count is logged with the first line of a later second.
pub(crate) struct Budget {
    per_second: u32,
    /// The second counted, lines logged in it, lines left out since the
    /// last count was logged.
    state: Mutex<(u64, u32, u64)>,
}

impl Budget {
    pub(crate) const fn new(per_second: u32) -> Self {
        Self {
            per_second,
            state: Mutex::new((0, 0, 0)),
        }
    }

    /// Whether one more line (of what `what` names) may be logged now.
    pub(crate) fn allow(&self, what: &str) -> bool {
        let second = crate::state::now();
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
