//! Long-lived tasks that cannot die unnoticed.
//!
//! A scrip process runs tasks for its whole life beside the requests: the
//! store's writer, the revocation feed's follower, the expiry sweep, the
//! key ring, the policy reloader. A panic in one of them (a bug: nothing
//! untrusted may cause one) would otherwise end only that task, and leave
//! the process answering as if whole: every write refused, revocations no
//! longer followed, expired tasks never ended, while `/readyz` says 200.
//!
//! Started with [`spawn`] or [`guarded`], such a task that panics is
//! reported here: [`failure`] resolves with its name, on which `scrip serve`
//! and `scrip proxy` stop as on SIGTERM (requests drained, what can still
//! be stored stored) and exit non-zero. A task aborted, or one that ends,
//! is not a failure. A request's own task is not started here: its panic
//! fails that request only.
//!
//! The invariant: a long-lived task that panics is never silently gone.
//!
//! Beside them, [`LogBudget`]: the per-second limit on log lines anyone can
//! cause, which every scrip process applies alike.

mod budget;

pub use budget::LogBudget;

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::OnceLock;

use futures_util::FutureExt as _;
use tokio::sync::Notify;

/// The first long-lived task that panicked.
static FAILED: OnceLock<&'static str> = OnceLock::new();

/// Woken when one does.
static WOKEN: Notify = Notify::const_new();

/// Records that the long-lived task `name` panicked: logged, and
/// [`failure`] resolves. Called by [`spawn`] and [`guarded`].
pub fn fail(name: &'static str) {
    tracing::error!(task = name, "a long-lived task panicked");
    #[cfg(test)]
    tests::FAILURES.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let _ = FAILED.set(name);
    WOKEN.notify_waiters();
}

/// The first long-lived task that panicked, if one has.
#[must_use]
pub fn failed() -> Option<&'static str> {
    FAILED.get().copied()
}

/// Resolves with the name of the first long-lived task that panicked (at
/// once if one already has); never, while none does.
pub async fn failure() -> &'static str {
    loop {
        let woken = WOKEN.notified();
        let mut woken = std::pin::pin!(woken);
        // Registered before the check, so that a failure between the two
        // still wakes it.
        woken.as_mut().enable();
        if let Some(name) = failed() {
            return name;
        }
        woken.await;
    }
}

/// Spawns the long-lived `task` named `name` on the current runtime; if it
/// panics, [`fail`]. Aborting it through the handle is not a failure.
pub fn spawn<F>(name: &'static str, task: F) -> tokio::task::JoinHandle<()>
where
    F: Future<Output = ()> + Send + 'static,
{
    tokio::spawn(watched(name, task))
}

/// `task`, reporting a panic in it as the failure of `name`.
pub async fn watched<F: Future<Output = ()>>(name: &'static str, task: F) {
    if AssertUnwindSafe(task).catch_unwind().await.is_err() {
        fail(name);
    }
}

/// Runs `body`, the whole life of a thread named `name`; if it panics,
/// [`fail`].
pub fn guarded(name: &'static str, body: impl FnOnce()) {
    if std::panic::catch_unwind(AssertUnwindSafe(body)).is_err() {
        fail(name);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::panic, reason = "the panics are what is tested")]

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    use super::*;

    /// Every failure reported, the first or not.
    pub(super) static FAILURES: AtomicUsize = AtomicUsize::new(0);

    /// One process, one first failure: these run in order in one test.
    #[tokio::test]
    async fn a_panicking_task_is_reported_and_one_that_ends_or_is_aborted_is_not() {
        // Ends normally: nothing.
        spawn("ends", async {}).await.unwrap_or_default();
        std::thread::spawn(|| guarded("thread that ends", || {}))
            .join()
            .unwrap_or_default();
        // Aborted: nothing.
        let forever = spawn("aborted", std::future::pending());
        forever.abort();
        assert!(forever.await.is_err_and(|e| e.is_cancelled()));
        assert_eq!(failed(), None);
        let waiting = tokio::spawn(failure());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!waiting.is_finished());

        // A task that panics after an await: reported, and the waiter
        // woken.
        let task = spawn("sweep", async {
            tokio::task::yield_now().await;
            panic!("a bug");
        });
        assert!(task.await.is_ok(), "the panic is caught and reported");
        assert_eq!(failed(), Some("sweep"));
        let woken = tokio::time::timeout(Duration::from_secs(10), waiting).await;
        assert!(matches!(woken, Ok(Ok("sweep"))), "{woken:?}");
        // Asked afterwards: at once.
        assert_eq!(failure().await, "sweep");

        assert_eq!(FAILURES.load(Ordering::SeqCst), 1);

        // A thread that panics is reported too; the first failure stays
        // the one named.
        std::thread::spawn(|| guarded("writer", || panic!("another bug")))
            .join()
            .unwrap_or_default();
        assert_eq!(FAILURES.load(Ordering::SeqCst), 2);
        assert_eq!(failed(), Some("sweep"));
    }
}
