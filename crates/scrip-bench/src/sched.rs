//! Where each thread's time went during a run: on a CPU, or runnable and
//! waiting for one (`/proc/<pid>/task/<tid>/schedstat`: nanoseconds on the
//! CPU, nanoseconds waiting in a run queue, time slices).
//!
//! On a 2-core machine shared by the server and the generator, the wait is
//! what a saturated CPU adds to latency: a request whose thread is runnable
//! but not running waits as surely as one waiting for a disk. `--sched`
//! prints it per thread name after each scenario.

use std::collections::BTreeMap;
use std::fmt::Write as _;

/// One thread's counters, nanoseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Times {
    /// On a CPU.
    pub cpu_ns: u64,
    /// Runnable, waiting in a run queue.
    pub wait_ns: u64,
}

/// The threads of a process: thread id → (name, counters).
pub type Snapshot = BTreeMap<u32, (String, Times)>;

/// Parses a `schedstat` line: `<cpu ns> <wait ns> <slices>`.
#[must_use]
pub fn parse_schedstat(text: &str) -> Option<Times> {
    let mut fields = text.split_whitespace().map(str::parse::<u64>);
    let cpu_ns = fields.next()?.ok()?;
    let wait_ns = fields.next()?.ok()?;
    Some(Times { cpu_ns, wait_ns })
}

/// Every thread of `pid` (or `self`) now; empty when `/proc` does not
/// have them (another OS, a kernel without scheduler statistics).
#[must_use]
pub fn snapshot(pid: &str) -> Snapshot {
    let mut out = Snapshot::new();
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return out;
    };
    for task in tasks.flatten() {
        let Some(tid) = task.file_name().to_str().and_then(|t| t.parse().ok()) else {
            continue;
        };
        let path = task.path();
        let times = std::fs::read_to_string(path.join("schedstat"))
            .ok()
            .and_then(|s| parse_schedstat(&s));
        let name = std::fs::read_to_string(path.join("comm"));
        if let (Some(times), Ok(name)) = (times, name) {
            out.insert(tid, (name.trim().to_owned(), times));
        }
    }
    out
}

/// One thread name's share of a run.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Group {
    /// Threads of that name seen at the end.
    pub threads: usize,
    /// Cores' worth of time on a CPU.
    pub cpu: f64,
    /// Cores' worth of time runnable but waiting for a CPU.
    pub wait: f64,
}

/// Sums, per thread name, what each thread alive at `after` used since
/// `before` (a thread started meanwhile counts from zero; one that ended
/// meanwhile is not counted), as cores over `secs`.
#[must_use]
pub fn groups(before: &Snapshot, after: &Snapshot, secs: f64) -> BTreeMap<String, Group> {
    let mut out: BTreeMap<String, Group> = BTreeMap::new();
    let secs = secs.max(1e-9);
    for (tid, (name, now)) in after {
        let was = before.get(tid).map(|(_, t)| *t).unwrap_or_default();
        #[expect(clippy::cast_precision_loss, reason = "a share for display")]
        let share = |now: u64, was: u64| now.saturating_sub(was) as f64 / 1e9 / secs;
        let g = out.entry(name.clone()).or_default();
        g.threads += 1;
        g.cpu += share(now.cpu_ns, was.cpu_ns);
        g.wait += share(now.wait_ns, was.wait_ns);
    }
    out
}

/// `name×n cpu=… wait=…` for each group that used at least 0.01 cores,
/// busiest first.
#[must_use]
pub fn describe(groups: &BTreeMap<String, Group>) -> String {
    let mut busy: Vec<_> = groups
        .iter()
        .filter(|(_, g)| g.cpu + g.wait >= 0.01)
        .collect();
    busy.sort_by(|a, b| (b.1.cpu + b.1.wait).total_cmp(&(a.1.cpu + a.1.wait)));
    let mut out = String::new();
    for (name, g) in busy {
        if !out.is_empty() {
            out.push_str(" | ");
        }
        let _ = write!(out, "{name}");
        if g.threads > 1 {
            let _ = write!(out, "×{}", g.threads);
        }
        let _ = write!(out, " cpu={:.2} wait={:.2}", g.cpu, g.wait);
    }
    if out.is_empty() {
        out.push_str("n/a");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_a_schedstat_line() {
        assert_eq!(
            parse_schedstat("1500000000 250000000 4812\n"),
            Some(Times {
                cpu_ns: 1_500_000_000,
                wait_ns: 250_000_000
            })
        );
        assert_eq!(parse_schedstat("12"), None);
        assert_eq!(parse_schedstat("x 1 2"), None);
    }

    #[test]
    fn sums_per_name_and_counts_new_threads_from_zero() {
        let t = |cpu_ns, wait_ns| Times { cpu_ns, wait_ns };
        let before: Snapshot = [
            (1, ("worker".to_owned(), t(1_000_000_000, 0))),
            (2, ("worker".to_owned(), t(0, 0))),
            (3, ("gone".to_owned(), t(5, 5))),
        ]
        .into();
        let after: Snapshot = [
            (1, ("worker".to_owned(), t(2_000_000_000, 500_000_000))),
            (2, ("worker".to_owned(), t(1_000_000_000, 500_000_000))),
            (4, ("writer".to_owned(), t(400_000_000, 200_000_000))),
        ]
        .into();
        let g = groups(&before, &after, 2.0);
        assert_eq!(g.len(), 2);
        let w = &g["worker"];
        assert_eq!(w.threads, 2);
        assert!((w.cpu - 1.0).abs() < 1e-9, "{w:?}");
        assert!((w.wait - 0.5).abs() < 1e-9, "{w:?}");
        let s = &g["writer"];
        assert!(
            (s.cpu - 0.2).abs() < 1e-9 && (s.wait - 0.1).abs() < 1e-9,
            "{s:?}"
        );
        assert_eq!(
            describe(&g),
            "worker×2 cpu=1.00 wait=0.50 | writer cpu=0.20 wait=0.10"
        );
    }

    #[test]
    fn sees_this_threads_cpu_time() {
        let before = snapshot("self");
        let mut x = 0u64;
        for i in 0..30_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        let after = snapshot("self");
        let used: u64 = after
            .iter()
            .map(|(tid, (_, t))| {
                t.cpu_ns
                    .saturating_sub(before.get(tid).map_or(0, |(_, b)| b.cpu_ns))
            })
            .sum();
        assert!(used > 1_000_000, "{used} ns");
    }
}
