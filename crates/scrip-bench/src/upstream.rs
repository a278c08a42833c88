//! The legacy API behind the `proxy` scenario: a keep-alive HTTP/1.1 server
//! on loopback that answers `200 ok` only to requests carrying its static
//! key in `X-Api-Key`, and `401` to anything else. It runs on the
//! generator's runtime, so its CPU counts as the client's.

use std::convert::Infallible;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::{Request, Response, StatusCode};
use tokio::net::TcpListener;

use crate::Result;

/// A running upstream; it stops when dropped.
#[derive(Debug)]
pub struct Upstream {
    /// Its loopback port.
    pub port: u16,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Upstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Starts the upstream demanding `key`.
///
/// # Errors
/// When no loopback port can be bound.
pub async fn start(key: String) -> Result<Upstream> {
    let listener = TcpListener::bind(("127.0.0.1", 0)).await?;
    let port = listener.local_addr()?.port();
    let key = Arc::new(key);
    let task = tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let key = key.clone();
            tokio::spawn(async move {
                let service = hyper::service::service_fn(move |req: Request<Incoming>| {
                    let ok = req
                        .headers()
                        .get("x-api-key")
                        .is_some_and(|v| v.as_bytes() == key.as_bytes());
                    let (status, body) = if ok {
                        (StatusCode::OK, "ok\n")
                    } else {
                        (StatusCode::UNAUTHORIZED, "missing or wrong key\n")
                    };
                    async move {
                        let mut r = Response::new(Full::new(Bytes::from_static(body.as_bytes())));
                        *r.status_mut() = status;
                        Ok::<_, Infallible>(r)
                    }
                });
                let io = hyper_util::rt::TokioIo::new(stream);
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(io, service)
                    .await;
            });
        }
    });
    Ok(Upstream { port, task })
}
