//! Serving HTTP with limits a client cannot talk its way around: a client
//! that sends its request head slowly (or holds a connection idle between
//! requests) is cut off after `header_timeout`, and at most
//! `max_connections` connections are open at once (the rest are closed as
//! they are accepted, so file descriptors stay for the store and the
//! upstreams). `axum::serve` sets no timer, so hyper's header read timeout
//! never fires there.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::ConnectInfo;
use hyper::server::conn::http1::Builder;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use tower::ServiceExt as _;

/// How long open connections get to finish after shutdown begins (a
/// revocation-feed long poll waits at most 30 s).
const DRAIN: Duration = Duration::from_secs(35);

/// The limits of [`serve`].
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Time allowed for a request head, counted from when the connection
    /// is ready for one (so also the idle time between requests).
    pub header_timeout: Duration,
    /// Connections open at once.
    pub max_connections: usize,
}

impl Limits {
    /// `header_timeout` seconds for a request head, and as many connections
    /// as three quarters of this process's file descriptor limit allow (at
    /// most 16,384).
    #[must_use]
    pub fn new(header_timeout: u64) -> Self {
        let fds = rustix::process::getrlimit(rustix::process::Resource::Nofile)
            .current
            .unwrap_or(u64::MAX);
        let max_connections = usize::try_from((fds / 4).saturating_mul(3))
            .unwrap_or(usize::MAX)
            .clamp(16, 16_384);
        Self {
            header_timeout: Duration::from_secs(header_timeout),
            max_connections,
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then lets open
/// connections finish (for at most 35 s). Each request carries the peer's
/// address as [`ConnectInfo`].
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
    let mut builder = Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_timeout);
    let open = Arc::new(tokio::sync::Semaphore::new(limits.max_connections));
    let graceful = GracefulShutdown::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
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
            tracing::warn!(%peer, max = limits.max_connections, "too many open connections; closing a new one");
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = app
            .clone()
            .map_request(move |mut request: axum::extract::Request| {
                request.extensions_mut().insert(ConnectInfo(peer));
                request
            });
        let service = TowerToHyperService::new(service.map_request(
            |request: hyper::Request<hyper::body::Incoming>| request.map(axum::body::Body::new),
        ));
        let connection = graceful.watch(builder.serve_connection(TokioIo::new(stream), service));
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
            drop(permit);
        });
    }
    drop(listener);
    if tokio::time::timeout(DRAIN, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!(
            "connections still open {} s after shutdown began; closing them",
            DRAIN.as_secs()
        );
    }
    Ok(())
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
