//! Log lines of `scrip serve` and `scrip proxy`, written by a thread of
//! their own.
//!
//! Written where they are made, a line to standard error blocks the thread
//! that logs it while standard error is not read: a log collector that
//! stalls (Docker's default, blocking, log mode behind a slow driver) would
//! stall the request workers and the store's writer with it. Here a line
//! is queued, at most [`QUEUED`] of them, and one thread writes them; past
//! that, lines are dropped and counted, and the count is logged once the
//! writer keeps up again. At exit what is queued is written
//! for up to [`FINISH`], no longer: a stalled reader does not hold up the
//! process's end.
//!
//! (`tracing-appender` does the same but, when its queue is full at exit,
//! prints to standard output, which may be the same stalled pipe.)

use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{Receiver, SyncSender, TryRecvError, TrySendError, sync_channel};
use std::time::Duration;

/// The queue of this process's server, once logging is set up.
static QUEUE: std::sync::OnceLock<Lines> = std::sync::OnceLock::new();

/// Queues `text` (whole lines) after the log lines queued so far, when
/// this process logs through a queue: whether it does. A full queue is
/// waited on for up to [`FINISH`] (the line matters more than a log line).
pub(crate) fn say(text: &str) -> bool {
    let Some(lines) = QUEUE.get() else {
        return false;
    };
    let deadline = std::time::Instant::now() + FINISH;
    let mut msg = Msg::Line(text.as_bytes().to_vec());
    loop {
        match lines.queue.try_send(msg) {
            Ok(()) | Err(TrySendError::Disconnected(_)) => return true,
            Err(TrySendError::Full(back)) => {
                if std::time::Instant::now() >= deadline {
                    lines.dropped.fetch_add(1, Ordering::Relaxed);
                    return true;
                }
                msg = back;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
}

/// Lines queued at most: a few MB at the longest lines scrip logs.
pub(crate) const QUEUED: usize = 8192;

/// How long the lines still queued at exit may take to be written.
pub(crate) const FINISH: Duration = Duration::from_secs(1);

#[derive(Debug)]
enum Msg {
    Line(Vec<u8>),
    /// Answered once every line before it is written.
    Flush(SyncSender<()>),
}

/// The queue's sending side: a `tracing-subscriber` writer (each event is
/// one `write` of one whole line).
#[derive(Debug, Clone)]
pub(crate) struct Lines {
    queue: SyncSender<Msg>,
    dropped: Arc<AtomicU64>,
}

impl Lines {
    /// Starts the thread writing to `out`, with room for `queued` lines.
    ///
    /// # Errors
    /// When the thread cannot be started.
    pub(crate) fn start(out: impl Write + Send + 'static, queued: usize) -> std::io::Result<Self> {
        let (queue, lines) = sync_channel(queued);
        let dropped = Arc::new(AtomicU64::new(0));
        let counted = dropped.clone();
        std::thread::Builder::new()
            .name("scrip-log".into())
            .spawn(move || write_lines(out, &lines, &counted))?;
        Ok(Self { queue, dropped })
    }

    /// Makes this the queue [`say`] writes to.
    pub(crate) fn install(&self) {
        let _ = QUEUE.set(self.clone());
    }

    /// Waits up to `within` for the lines queued so far by this process
    /// to be written, when it logs through a queue.
    pub(crate) fn finish_queued(within: Duration) {
        if let Some(lines) = QUEUE.get() {
            lines.finish(within);
        }
    }

    /// Lines dropped so far, for want of room.
    #[cfg(test)]
    pub(crate) fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Waits up to `within` for the lines queued so far to be written;
    /// whether they were.
    pub(crate) fn finish(&self, within: Duration) -> bool {
        let (done, written) = sync_channel(1);
        let deadline = std::time::Instant::now() + within;
        let mut flush = Msg::Flush(done);
        // The queue may be full: its room is waited for too.
        loop {
            match self.queue.try_send(flush) {
                Ok(()) => break,
                Err(TrySendError::Disconnected(_)) => return false,
                Err(TrySendError::Full(back)) => {
                    if std::time::Instant::now() >= deadline {
                        return false;
                    }
                    flush = back;
                    std::thread::sleep(Duration::from_millis(5));
                }
            }
        }
        written
            .recv_timeout(deadline.saturating_duration_since(std::time::Instant::now()))
            .is_ok()
    }
}

/// Writes each line queued; once the queue is empty again after lines
/// were dropped, logs how many.
fn write_lines(mut out: impl Write, lines: &Receiver<Msg>, dropped: &AtomicU64) {
    let mut told = 0;
    loop {
        let msg = match lines.try_recv() {
            Ok(msg) => msg,
            Err(TryRecvError::Disconnected) => return,
            Err(TryRecvError::Empty) => {
                let now = dropped.load(Ordering::Relaxed);
                if now != told {
                    // Queued like any line (in the log's format), and
                    // there is room: the queue is empty.
                    tracing::warn!(
                        dropped = now - told,
                        "log lines dropped: standard error was not read fast enough"
                    );
                    told = now;
                }
                match lines.recv() {
                    Ok(msg) => msg,
                    Err(_) => return,
                }
            }
        };
        match msg {
            Msg::Line(line) => {
                let _ = out.write_all(&line);
            }
            Msg::Flush(done) => {
                let _ = out.flush();
                let _ = done.try_send(());
            }
        }
    }
}

impl Write for &Lines {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.queue.try_send(Msg::Line(buf.to_vec()))
        {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Lines {
    type Writer = &'a Lines;

    fn make_writer(&'a self) -> Self::Writer {
        self
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Condvar, Mutex};
    use std::time::Instant;

    use super::*;

    /// What was written, and whether writing stalls.
    type Written = Mutex<(Vec<u8>, bool)>;

    /// A writer that keeps what it is given, and stalls while told to.
    #[derive(Debug, Clone, Default)]
    struct Out(Arc<(Written, Condvar)>);

    impl Out {
        fn stall(&self, stalled: bool) {
            let (lock, changed) = &*self.0;
            lock.lock().map(|mut s| s.1 = stalled).unwrap_or_default();
            changed.notify_all();
        }

        fn text(&self) -> String {
            let (lock, _) = &*self.0;
            lock.lock()
                .map(|s| String::from_utf8_lossy(&s.0).into_owned())
                .unwrap_or_default()
        }
    }

    impl Write for Out {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (lock, changed) = &*self.0;
            let mut s = lock.lock().map_err(|_| std::io::ErrorKind::Other)?;
            while s.1 {
                s = changed.wait(s).map_err(|_| std::io::ErrorKind::Other)?;
            }
            s.0.extend_from_slice(buf);
            Ok(buf.len())
        }

        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn log(lines: &Lines, text: &str) {
        let mut w = lines;
        assert!(w.write(text.as_bytes()).is_ok_and(|n| n == text.len()));
    }

    #[test]
    fn lines_are_written_in_order_and_waited_for_at_exit() {
        let out = Out::default();
        let lines = Lines::start(out.clone(), 4).unwrap_or_else(|e| unreachable!("{e}"));
        for i in 0..100 {
            // Room is made as they are written; a few may be dropped.
            log(&lines, &format!("{i}\n"));
            while lines.dropped() == 0 && out.text().lines().count() < i {
                std::thread::yield_now();
            }
        }
        assert!(lines.finish(FINISH));
        let text = out.text();
        let written: Vec<u32> = text.lines().filter_map(|l| l.parse().ok()).collect();
        assert_eq!(written.len() as u64 + lines.dropped(), 100, "{text}");
        assert!(written.windows(2).all(|w| w.first() < w.last()), "{text}");
        assert_eq!(written.last(), Some(&99));
    }

    /// How many were dropped is logged, in the log's format, once the
    /// reader keeps up again.
    #[test]
    fn dropped_lines_are_counted_once_the_reader_keeps_up() {
        let out = Out::default();
        out.stall(true);
        let lines = Lines::start(out.clone(), 4).unwrap_or_else(|e| unreachable!("{e}"));
        let logger = tracing_subscriber::fmt()
            .with_writer(lines.clone())
            .with_ansi(false)
            .finish();
        // The writing thread logs through the process's subscriber.
        assert!(tracing::subscriber::set_global_default(logger).is_ok());
        for i in 0..100 {
            log(&lines, &format!("{i}\n"));
        }
        let dropped = lines.dropped();
        assert!(dropped >= 95, "{dropped}");
        out.stall(false);
        let start = Instant::now();
        while !out.text().contains("log lines dropped") {
            assert!(start.elapsed() < Duration::from_secs(10), "{}", out.text());
            std::thread::sleep(Duration::from_millis(10));
        }
        let text = out.text();
        let told = text.lines().find(|l| l.contains("log lines dropped"));
        assert!(
            told.is_some_and(|l| l.contains(" WARN ") && l.contains(&format!("dropped={dropped}"))),
            "{text}"
        );
        // Told once.
        log(&lines, "later\n");
        assert!(lines.finish(FINISH));
        assert_eq!(out.text().matches("log lines dropped").count(), 1);
    }

    #[test]
    fn a_stalled_reader_holds_up_no_one() {
        let out = Out::default();
        out.stall(true);
        let lines = Lines::start(out.clone(), 4).unwrap_or_else(|e| unreachable!("{e}"));
        // Four queued, one held by the writing thread at most, the rest
        // dropped, and none waited for.
        for i in 0..1000 {
            log(&lines, &format!("{i}\n"));
        }
        assert!(lines.dropped() >= 995, "{}", lines.dropped());
        // The exit waits `within`, no longer.
        let start = Instant::now();
        assert!(!lines.finish(Duration::from_millis(300)));
        assert!(start.elapsed() < Duration::from_secs(5));
        // Read again, the queued lines come out, in order, and then
        // a later one.
        out.stall(false);
        assert!(lines.finish(FINISH));
        log(&lines, "later\n");
        assert!(lines.finish(FINISH));
        let text = out.text();
        assert!(text.starts_with("0\n"), "{text}");
        assert!(text.ends_with("later\n"), "{text}");
    }
}
