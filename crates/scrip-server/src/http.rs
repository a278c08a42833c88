//! Serving HTTP with limits a client cannot talk its way around: a client
//! that sends its request head slowly (or holds a connection idle between
//! requests) is cut off after `header_timeout`, and at most
//! `max_connections` connections are open at once (the rest are closed as
//! they are accepted, so file descriptors stay for the store and the
//! upstreams: half as many where each connection may hold an upstream
//! socket too, [`Limits::proxying`]). `axum::serve` sets no timer, so hyper's header read timeout
//! never fires there. A client that stops reading answers (hyper's header
//! timer runs only while it waits for a request) is cut off once a write
//! has made no progress for [`WRITE_STALL`] ([`WriteDeadline`]).

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::server::conn::http1::Builder;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tower::ServiceExt as _;

/// How long a write may make no progress before its connection is closed
/// (`header_timeout` if longer). Progress shows only when the kernel has
/// room for more, which for a large answer (a proxied download) can wait
/// until a third of a send buffer of megabytes has drained: a client that
/// reads slowly but steadily must not look like one that stopped.
pub const WRITE_STALL: Duration = Duration::from_secs(300);

/// How long open connections get to finish after shutdown begins (a
/// revocation-feed long poll waits at most 30 s).
const DRAIN: Duration = Duration::from_secs(35);

/// The largest request head read, in bytes: a 16 KiB token, an 8 KiB DPoP
/// proof and the rest with room to spare. With `max_connections` (16,384 at
/// most) this bounds what unfinished heads can hold to 1 GiB.
pub const MAX_HEAD_BYTES: usize = 64 * 1024;

/// The limits of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time allowed for a request head, counted from when the connection
    /// is ready for one (so also the idle time between requests).
    pub header_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
    /// How long open connections get to finish once shutdown begins.
    pub drain: Duration,
}

/// Raises this process's soft limit on open files to its hard limit and
/// returns it: the soft limit is often 1,024 (a shell's, systemd's
/// default) where the hard one is far higher, and the connection cap
/// follows it, so one client holding a few hundred idle connections could
/// otherwise take every slot.
fn raise_fd_limit() -> u64 {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let limit = getrlimit(Resource::Nofile);
    // Linux refuses an unlimited number of open files: an unlimited hard
    // limit means its ceiling, `fs.nr_open` (2^20 by default).
    let hard = limit.maximum.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(1 << 20)
    });
    let soft = limit.current.unwrap_or(u64::MAX);
    if soft < hard {
        let raised = Rlimit {
            current: Some(hard),
            maximum: limit.maximum,
        };
        match setrlimit(Resource::Nofile, raised) {
            Ok(()) => return hard,
            Err(e) => tracing::debug!(error = %e, soft, hard, "cannot raise the open-file limit"),
        }
    }
    soft
}

impl Limits {
    /// `header_timeout` seconds for a request head, and as many connections
    /// as three quarters of this process's file descriptor limit allow (at
    /// most 16,384), once that limit is raised to its hard limit.
    #[must_use]
    pub fn new(header_timeout: u64) -> Self {
        let fds = raise_fd_limit();
        let max_connections = usize::try_from((fds / 4).saturating_mul(3))
            .unwrap_or(usize::MAX)
            .clamp(16, 16_384);
        Self {
            header_timeout: Duration::from_secs(header_timeout),
            max_connections,
            drain: DRAIN,
        }
    }

    /// These limits with at most `n` connections open.
    #[must_use]
    pub fn at_most(self, n: usize) -> Self {
        Self {
            max_connections: self.max_connections.min(n),
            ..self
        }
    }

    /// These limits for a server that proxies: each connection may hold
    /// an upstream socket too while its request is forwarded, so half as
    /// many connections (three eighths of the descriptors), at least 16.
    #[must_use]
    pub fn proxying(self) -> Self {
        Self {
            max_connections: (self.max_connections / 2).max(16),
            ..self
        }
    }
}

/// Request handlers that run on tasks of their own (see
/// [`Handlers::run`]), so that a client that goes away does not cut them
/// off; [`serve_until`] gives each request its server's, and waits for
/// them, or stops them, as it does for connections. At most as many run
/// so as connections may be open: a client that hangs up at once, again
/// and again, while the store is slow must not pile them up without bound.
/// Cheap to clone.
#[derive(Clone)]
pub struct Handlers {
    running: Arc<std::sync::Mutex<tokio::task::JoinSet<()>>>,
    room: Arc<tokio::sync::Semaphore>,
}

impl std::fmt::Debug for Handlers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Handlers").finish_non_exhaustive()
    }
}

impl Handlers {
    /// Room for `max` handlers at once.
    #[must_use]
    pub fn new(max: usize) -> Self {
        Self {
            running: Arc::default(),
            room: Arc::new(tokio::sync::Semaphore::new(max)),
        }
    }

    /// Runs `work` on a task of its own and waits for it: dropped, this
    /// future leaves `work` running, until the server stops it. Without
    /// room for another, `work` runs here, and is dropped with this future
    /// (as every handler was before). `None` when `work` did not end (a
    /// panic, or the server stopped it).
    pub async fn run<F>(&self, work: F) -> Option<F::Output>
    where
        F: Future + Send + 'static,
        F::Output: Send + 'static,
    {
        let Ok(room) = self.room.clone().try_acquire_owned() else {
            return Some(work.await);
        };
        let (tx, rx) = tokio::sync::oneshot::channel();
        {
            let Ok(mut running) = self.running.lock() else {
                return None;
            };
            // Those that ended leave the set as new ones come.
            while running.try_join_next().is_some() {}
            running.spawn(async move {
                let _ = tx.send(work.await);
                drop(room);
            });
        }
        rx.await.ok()
    }

    /// The handlers running now; those started later are not in it.
    fn take(&self) -> tokio::task::JoinSet<()> {
        self.running
            .lock()
            .map(|mut running| std::mem::take(&mut *running))
            .unwrap_or_default()
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then lets open
/// connections, and the handlers of requests whose clients went away (see
/// [`Handlers`]), finish for at most [`Limits::drain`]; those still at
/// work then are stopped, and have stopped when this returns, so nothing
/// they do reaches the store after the caller's final commit. Each
/// request carries the peer's address as [`ConnectInfo`], and the
/// server's [`Handlers`].
///
/// # Errors
/// Never on a failed accept (logged and retried); the result is for the
/// callers' signature.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_until(listener, app, limits, shutdown, std::future::pending()).await
}

/// [`serve`], with a second future that, once `shutdown` has begun, ends
/// the wait for requests still at work before [`Limits::drain`] is up (a
/// second Ctrl-C): they are stopped as at the end of the drain.
///
/// # Errors
/// As [`serve`].
pub async fn serve_until(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: Limits,
    shutdown: impl Future<Output = ()> + Send + 'static,
    hurry: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let mut builder = Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout)
        // A request head larger than this is refused (431): hyper's own
        // bound is about 400 KiB, which a client holding every allowed
        // connection with an unfinished head would pin in memory.
        .max_buf_size(MAX_HEAD_BYTES);
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    let mut at_cap = Throttle::new(WARN_EVERY);
    let mut connections = tokio::task::JoinSet::new();
    let handlers = Handlers::new(limits.max_connections);
    loop {
        // Finished connections leave the set as new ones come.
        while connections.try_join_next().is_some() {}
        let (stream, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    accept_failed(&e).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let Ok(permit) = open.clone().try_acquire_owned() else {
            // A flood of connections must not become a flood of log lines.
            if let Some(closed) = at_cap.note(std::time::Instant::now()) {
                tracing::warn!(
                    %peer,
                    max = limits.max_connections,
                    closed,
                    "too many open connections; closing new ones ({closed} since the last warning)"
                );
            }
            continue;
        };
        let _ = stream.set_nodelay(true);
        let each = handlers.clone();
        let service = app
            .clone()
            .map_request(move |mut request: axum::extract::Request| {
                request.extensions_mut().insert(ConnectInfo(peer));
                request.extensions_mut().insert(each.clone());
                request
            });
        let service = TowerToHyperService::new(service.map_request(
            |request: hyper::Request<hyper::body::Incoming>| request.map(axum::body::Body::new),
        ));
        let stream = WriteDeadline::new(stream, limits.header_timeout.max(WRITE_STALL));
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        connections.spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    let deadline = tokio::time::Instant::now() + limits.drain;
    let mut hurry = std::pin::pin!(hurry);
    let drained = tokio::select! {
        r = tokio::time::timeout_at(deadline, graceful.shutdown()) => r.is_ok(),
        () = &mut hurry => false,
    };
    if !drained {
        while connections.try_join_next().is_some() {}
        tracing::warn!(
            open = connections.len(),
            "connections still open after shutdown began ({} s at most); closing them",
            limits.drain.as_secs()
        );
    }
    // Stopped, not left to run on: a request still at work could otherwise
    // commit after the final commit, or be cut off mid-answer by the exit.
    connections.shutdown().await;
    // So are the handlers whose clients went away, once what is left of
    // the drain is up (no connection is left to start another).
    let mut running = handlers.take();
    let finished = drained
        && tokio::select! {
            r = tokio::time::timeout_at(deadline, async {
                while running.join_next().await.is_some() {}
            }) => r.is_ok(),
            () = &mut hurry => false,
        };
    while running.try_join_next().is_some() {}
    if !finished && !running.is_empty() {
        tracing::warn!(
            running = running.len(),
            "requests whose clients went away still at work after shutdown began; stopping them"
        );
    }
    running.shutdown().await;
    Ok(())
}

/// A connection whose writes fail once one has made no progress for
/// `limit`: a client that stops reading (a zero TCP window, which the
/// kernel keeps probing for ever) would otherwise hold its connection, and
/// a slot of the cap, for as long as it likes.
struct WriteDeadline<T> {
    inner: T,
    limit: Duration,
    /// Armed when a write could not proceed; dropped when one does.
    stalled: Option<std::pin::Pin<Box<tokio::time::Sleep>>>,
}

impl<T> WriteDeadline<T> {
    fn new(inner: T, limit: Duration) -> Self {
        Self {
            inner,
            limit,
            stalled: None,
        }
    }

    /// What a write that returned `poll` means: progress disarms the timer;
    /// no progress arms it, and past `limit` is an error.
    fn watch<R>(
        &mut self,
        cx: &mut std::task::Context<'_>,
        poll: std::task::Poll<std::io::Result<R>>,
    ) -> std::task::Poll<std::io::Result<R>> {
        use std::future::Future as _;
        if poll.is_ready() {
            self.stalled = None;
            return poll;
        }
        let limit = self.limit;
        let timer = self
            .stalled
            .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)));
        if timer.as_mut().poll(cx).is_ready() {
            return std::task::Poll::Ready(Err(std::io::Error::new(
                std::io::ErrorKind::TimedOut,
                format!("the client read nothing for {} s", limit.as_secs()),
            )));
        }
        std::task::Poll::Pending
    }
}

impl<T: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for WriteDeadline<T> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<T: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for WriteDeadline<T> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write(cx, buf);
        self.watch(cx, poll)
    }

    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs);
        self.watch(cx, poll)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_flush(cx);
        self.watch(cx, poll)
    }

    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        let poll = std::pin::Pin::new(&mut self.inner).poll_shutdown(cx);
        self.watch(cx, poll)
    }
}

/// The least time between two warnings that connections were closed at the
/// cap.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// Counts events and says when one should be logged: the first, then at
/// most one each `every`, with how many happened since the last one logged.
#[derive(Debug)]
struct Throttle {
    every: Duration,
    last: Option<std::time::Instant>,
    count: u64,
}

impl Throttle {
    const fn new(every: Duration) -> Self {
        Self {
            every,
            last: None,
            count: 0,
        }
    }

    /// Notes one event at `now`; `Some(events since the last log line,
    /// this one included)` when this one is to be logged.
    fn note(&mut self, now: std::time::Instant) -> Option<u64> {
        self.count = self.count.saturating_add(1);
        if self
            .last
            .is_some_and(|last| now.saturating_duration_since(last) < self.every)
        {
            return None;
        }
        self.last = Some(now);
        Some(std::mem::take(&mut self.count))
    }
}

/// A failed accept: a connection that went away is nothing; anything else
/// (out of file descriptors) is logged and waited out.
async fn accept_failed(e: &std::io::Error) {
    use std::io::ErrorKind;
    if matches!(
        e.kind(),
        ErrorKind::ConnectionAborted | ErrorKind::ConnectionReset | ErrorKind::ConnectionRefused
    ) {
        return;
    }
    tracing::error!(error = %e, "accepting a connection failed; retrying in 1 s");
    tokio::time::sleep(Duration::from_secs(1)).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A handler whose caller is dropped runs on; past the room for them, a
    /// handler runs in its caller and is dropped with it. On a paused clock.
    #[tokio::test(start_paused = true)]
    async fn handlers_run_on_without_their_callers_up_to_their_room() {
        use std::sync::atomic::{AtomicBool, Ordering};
        let handlers = Handlers::new(1);
        let (go, wait) = tokio::sync::oneshot::channel::<()>();
        let first_done = Arc::new(AtomicBool::new(false));
        let done = first_done.clone();
        let first = handlers.run(async move {
            let _ = wait.await;
            done.store(true, Ordering::SeqCst);
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(10), first)
                .await
                .is_err()
        );
        let second_done = Arc::new(AtomicBool::new(false));
        let done = second_done.clone();
        let second = handlers.run(async move {
            tokio::time::sleep(Duration::from_millis(50)).await;
            done.store(true, Ordering::SeqCst);
        });
        assert!(
            tokio::time::timeout(Duration::from_millis(10), second)
                .await
                .is_err()
        );
        go.send(()).unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(
            first_done.load(Ordering::SeqCst),
            "the first ran on without its caller"
        );
        assert!(
            !second_done.load(Ordering::SeqCst),
            "the second had no room, and was dropped"
        );
        // The first has ended: room again.
        assert_eq!(handlers.room.available_permits(), 1);
        assert_eq!(handlers.run(async { 7 }).await, Some(7));
    }

    /// Writes that make no progress fail once `limit` has passed; a reader
    /// that keeps reading, however slowly, keeps the connection. On a
    /// paused clock, so that a loaded machine's pauses do not count.
    #[tokio::test(start_paused = true)]
    async fn a_client_that_stops_reading_is_cut_off() {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let (server, mut client) = tokio::io::duplex(64);
        let limit = Duration::from_millis(400);
        let mut server = WriteDeadline::new(server, limit);
        let answer = vec![b'x'; 1024];
        // A slow reader: 64 bytes every 100 ms, 1.6 s in all, never the
        // limit without one.
        let slow = tokio::spawn(async move {
            let mut buf = [0u8; 64];
            let mut read = 0;
            while read < 1024 {
                tokio::time::sleep(Duration::from_millis(100)).await;
                read += client.read(&mut buf).await.unwrap();
            }
            client
        });
        server.write_all(&answer).await.unwrap();
        let mut client = slow.await.unwrap();
        // Now one that reads nothing.
        let started = tokio::time::Instant::now();
        let e = server.write_all(&answer).await.unwrap_err();
        assert_eq!(e.kind(), std::io::ErrorKind::TimedOut);
        assert!(started.elapsed() >= limit, "{:?}", started.elapsed());
        let mut buf = [0u8; 64];
        assert_eq!(client.read(&mut buf).await.unwrap(), 64);
    }

    /// Started under a low soft limit (a shell's 1,024), the server takes
    /// the hard limit, and its connection cap follows.
    #[test]
    fn the_open_file_limit_is_raised_to_the_hard_limit() {
        use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
        let before = getrlimit(Resource::Nofile);
        let hard = before.maximum.unwrap_or(1 << 20);
        assert!(hard > 256, "hard limit {hard}");
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(256),
                maximum: before.maximum,
            },
        )
        .unwrap();
        let limits = Limits::new(30);
        assert_eq!(getrlimit(Resource::Nofile).current, Some(hard));
        assert_eq!(
            limits.max_connections,
            usize::try_from(hard / 4 * 3).unwrap().clamp(16, 16_384)
        );
        // A proxy's connections may each hold an upstream socket too.
        assert_eq!(
            limits.proxying().max_connections,
            (usize::try_from(hard / 4 * 3).unwrap().clamp(16, 16_384) / 2).max(16)
        );
    }

    #[test]
    fn a_flood_of_events_logs_one_line_each_period_with_its_count() {
        let mut t = Throttle::new(Duration::from_secs(10));
        let start = std::time::Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        assert_eq!(t.note(at(0)), Some(1));
        for _ in 0..999 {
            assert_eq!(t.note(at(5)), None);
        }
        assert_eq!(t.note(at(10)), Some(1_000));
        assert_eq!(t.note(at(19)), None);
        assert_eq!(t.note(at(25)), Some(2));
        assert_eq!(t.note(at(100)), Some(1));
    }
}
