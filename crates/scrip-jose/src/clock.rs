//! Time stamps that keep counting while the host sleeps.

use std::time::{Duration, Instant, SystemTime};

/// When something happened, by both clocks: the monotonic clock stops while
/// the host sleeps (a laptop, a paused VM), so keys fetched before a long
/// sleep would look fresh after it by that clock alone.
#[derive(Debug, Clone, Copy)]
pub struct Stamp {
    /// By the monotonic clock.
    pub mono: Instant,
    /// By the wall clock.
    pub wall: SystemTime,
}

impl Stamp {
    /// Now.
    #[must_use]
    pub fn now() -> Self {
        Self {
            mono: Instant::now(),
            wall: SystemTime::now(),
        }
    }

    /// The time since, by whichever clock says more (a wall clock set back
    /// counts for nothing).
    #[must_use]
    pub fn elapsed(&self) -> Duration {
        let wall = self.wall.elapsed().unwrap_or(Duration::ZERO);
        self.mono.elapsed().max(wall)
    }
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant, SystemTime};

    use super::Stamp;

    /// Keys fetched before the host slept are as old as the wall clock says,
    /// though the monotonic clock stood still; a wall clock set back makes
    /// them no younger.
    #[test]
    fn a_stamp_is_as_old_as_either_clock_says() {
        let hour = Duration::from_secs(3600);
        let slept = Stamp {
            mono: Instant::now(),
            wall: SystemTime::now().checked_sub(hour).unwrap(),
        };
        assert!(slept.elapsed() >= hour);
        let set_back = Stamp {
            mono: Instant::now().checked_sub(Duration::from_secs(5)).unwrap(),
            wall: SystemTime::now().checked_add(hour).unwrap(),
        };
        let e = set_back.elapsed();
        assert!(e >= Duration::from_secs(5) && e < hour, "{e:?}");
    }
}
