//! The HTTP server's own limits, which no handler can enforce: a client
//! that sends its request head too slowly is cut off, and connections past
//! the limit are closed as they are accepted.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::ConnectInfo;
use axum::routing::get;
use scrip_server::http::{Limits, serve};
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::TcpStream;

/// Serves a route that answers the peer's address, with `limits`.
async fn server(limits: Limits) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = Router::new().route(
        "/peer",
        get(|ConnectInfo(peer): ConnectInfo<SocketAddr>| async move { peer.to_string() }),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, app, limits, async move {
        let _ = stopped.await;
    }));
    (addr, stop)
}

/// Reads until the server closes the connection (or `limit` passes): what
/// it sent, and whether it closed.
async fn until_closed(s: &mut TcpStream, limit: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let closed = tokio::time::timeout(limit, s.read_to_end(&mut out))
        .await
        .is_ok();
    (String::from_utf8_lossy(&out).into_owned(), closed)
}

#[tokio::test]
async fn a_slow_request_head_is_cut_off_and_requests_know_their_peer() {
    let (addr, _stop) = server(Limits {
        header_timeout: Duration::from_secs(1),
        max_connections: 16,
        drain: Duration::from_secs(35),
    })
    .await;
    // A whole request is answered, with the peer's address.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let local = s.local_addr().unwrap();
    s.write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await
        .unwrap();
    let (answer, closed) = until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(closed && answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with(&local.to_string()), "{answer}");

    // Half a head, then nothing: the server hangs up within the timeout.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let started = Instant::now();
    let (_, closed) = until_closed(&mut s, Duration::from_secs(10)).await;
    assert!(closed, "the slow client was not cut off");
    assert!(started.elapsed() < Duration::from_secs(5));

    // So does a keep-alive connection left idle after its request.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let (answer, closed) = until_closed(&mut s, Duration::from_secs(10)).await;
    assert!(closed && answer.starts_with("HTTP/1.1 200"), "{answer}");
}

/// A request head past the bound is refused, not read whole.
#[tokio::test]
async fn an_oversized_request_head_is_refused() {
    let (addr, _stop) = server(Limits {
        header_timeout: Duration::from_secs(30),
        max_connections: 4,
        drain: Duration::from_secs(35),
    })
    .await;
    // A head of 48 KiB, within the bound, is served.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let big = format!(
        "GET /peer HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\nConnection: close\r\n\r\n",
        "a".repeat(48 * 1024)
    );
    s.write_all(big.as_bytes()).await.unwrap();
    let (answer, _) = until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    // One of 100 KiB that never ends is cut short at once.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let huge = format!(
        "GET /peer HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n",
        "a".repeat(100 * 1024)
    );
    let _ = s.write_all(huge.as_bytes()).await;
    let (answer, closed) = until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(closed, "the oversized head was still being read");
    assert!(
        answer.is_empty() || answer.starts_with("HTTP/1.1 431"),
        "{answer}"
    );
}

#[tokio::test]
async fn connections_past_the_limit_are_closed_at_once() {
    let (addr, _stop) = server(Limits {
        header_timeout: Duration::from_secs(30),
        max_connections: 2,
        drain: Duration::from_secs(35),
    })
    .await;
    let mut held = Vec::new();
    for _ in 0..2 {
        held.push(TcpStream::connect(addr).await.unwrap());
    }
    // Give the server time to take both.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut third = TcpStream::connect(addr).await.unwrap();
    third
        .write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap_or(());
    let (answer, closed) = until_closed(&mut third, Duration::from_secs(5)).await;
    assert!(closed && answer.is_empty(), "{answer:?}");
    // Once one closes (and the server has seen it close, which a loaded
    // machine may take a while to get to), a new connection is served.
    drop(held.pop());
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let mut next = TcpStream::connect(addr).await.unwrap();
        next.write_all(b"GET /peer HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap_or(());
        let (answer, _) = until_closed(&mut next, Duration::from_secs(5)).await;
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        assert!(
            answer.is_empty() && std::time::Instant::now() < deadline,
            "no connection served after one closed: {answer:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A request still at work when the drain time is up is stopped before
/// `serve` returns: nothing it would do (a store commit, say) comes after
/// what the caller does next (the final commit before the process exits).
#[tokio::test]
async fn a_request_still_at_work_after_the_drain_is_stopped_before_serve_returns() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let done = Arc::new(AtomicBool::new(false));
    let flag = done.clone();
    // The handler says when it runs: the stop comes while it is at work,
    // however slow the machine.
    let (began, running) = tokio::sync::mpsc::unbounded_channel::<()>();
    let app = Router::new().route(
        "/slow",
        get(move || {
            let flag = flag.clone();
            let began = began.clone();
            async move {
                let _ = began.send(());
                tokio::time::sleep(Duration::from_millis(1500)).await;
                flag.store(true, Ordering::SeqCst);
                "late"
            }
        }),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let served = tokio::spawn(serve(
        listener,
        app,
        Limits {
            header_timeout: Duration::from_secs(30),
            max_connections: 16,
            drain: Duration::from_millis(200),
        },
        async move {
            let _ = stopped.await;
        },
    ));
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET /slow HTTP/1.1\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut running = running;
    running.recv().await.unwrap();
    stop.send(()).unwrap();
    served.await.unwrap().unwrap();
    // Past when the handler would have finished: it never did.
    tokio::time::sleep(Duration::from_millis(2000)).await;
    assert!(
        !done.load(Ordering::SeqCst),
        "the request ran on after serve returned"
    );
    let (answer, closed) = until_closed(&mut s, Duration::from_secs(5)).await;
    assert!(closed && answer.is_empty(), "{answer}");
}
