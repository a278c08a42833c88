//! The load: one keep-alive HTTP/1.1 connection per worker, each sending
//! pre-built requests until the deadline (or, for a feed used once, until
//! the bodies run out): back to back (closed loop), or at a fixed total
//! rate (open loop, see [`drive`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::{BodyExt as _, Full};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{AUTHORIZATION, CONTENT_TYPE, HOST, HeaderValue};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;

use crate::Result;

/// Where requests go: a loopback address.
#[derive(Debug, Clone)]
pub struct Target {
    /// The server's address (always 127.0.0.1).
    pub addr: SocketAddr,
    host: HeaderValue,
}

impl Target {
    /// `127.0.0.1:<port>`.
    ///
    /// # Errors
    /// Never in practice (the host header is ASCII).
    pub fn loopback(port: u16) -> Result<Self> {
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        Ok(Self {
            addr,
            host: HeaderValue::from_str(&addr.to_string())?,
        })
    }
}

/// What one scenario sends.
#[derive(Debug)]
pub struct Workload {
    /// `POST` (a form body) or `GET` (the body is ignored).
    pub method: Method,
    /// The endpoint, e.g. `/token`.
    pub path: &'static str,
    /// An `Authorization` header value for every request.
    pub authorization: Option<HeaderValue>,
    /// Form-encoded bodies.
    pub bodies: Vec<Bytes>,
    /// Send each body once and stop when they run out (else cycle).
    pub once: bool,
    /// A `DPoP` proof header per request, each used once (a proof is
    /// single-use); when there are any, the run stops when they run out.
    pub proofs: Vec<HeaderValue>,
    /// What a 200 answer's body must contain to count as a success:
    /// introspection and revocation answer 200 whatever happened, and an
    /// exchange that ignored a DPoP proof still answers 200.
    pub expect: Option<&'static str>,
}

/// What a run measured.
#[derive(Debug, Default)]
pub struct Outcome {
    /// Requests sent (answered or not).
    pub sent: u64,
    /// Latency of every answered request, microseconds: from when it was
    /// sent, or at a fixed rate from when it was due if it went out late
    /// because the connection's previous answer came after that.
    pub latencies_us: Vec<u32>,
    /// At a fixed rate only: the same requests' round trips, from when each
    /// was sent to its answer, microseconds. Where these are short and
    /// `latencies_us` long, requests waited behind their connection's
    /// earlier ones (one request at a time per HTTP/1.1 connection).
    pub round_trips_us: Vec<u32>,
    /// Requests that failed (transport error or a status other than 200).
    pub errors: u64,
    /// The first failure, for the report.
    pub first_error: Option<String>,
    /// Wall time of the run.
    pub elapsed: Duration,
    /// Bodies of the successful answers, when asked for.
    pub answers: Vec<Bytes>,
    /// A feed used once ran out before the deadline.
    pub exhausted: bool,
    /// With a fixed rate: requests that were due before the deadline but
    /// not sent, because their connection was still waiting for earlier
    /// answers when the run ended.
    pub behind: u64,
}

impl Outcome {
    fn merge(&mut self, other: Self) {
        self.sent += other.sent;
        self.latencies_us.extend(other.latencies_us);
        self.round_trips_us.extend(other.round_trips_us);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
        self.answers.extend(other.answers);
        self.exhausted |= other.exhausted;
        self.behind += other.behind;
    }

    pub(crate) fn fail(&mut self, what: String) {
        self.errors += 1;
        if self.first_error.is_none() {
            self.first_error = Some(what);
        }
    }
}

type Sender = SendRequest<Full<Bytes>>;

async fn connect(target: &Target) -> Result<Sender> {
    let stream = TcpStream::connect(target.addr).await?;
    stream.set_nodelay(true)?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(sender)
}

/// How long a request may go unanswered before it counts as failed (and
/// its connection is dropped): the run stays bounded in time whatever the
/// server does. (The unit tests wait less.)
const REQUEST_TIMEOUT: Duration = if cfg!(test) {
    Duration::from_secs(1)
} else {
    Duration::from_secs(30)
};

async fn send(sender: &mut Sender, req: Request<Full<Bytes>>) -> Result<(u16, Bytes)> {
    let answer = async {
        sender.ready().await?;
        let response = sender.send_request(req).await?;
        let status = response.status().as_u16();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    };
    tokio::time::timeout(REQUEST_TIMEOUT, answer)
        .await
        .unwrap_or_else(|_| Err(format!("no answer within {} s", REQUEST_TIMEOUT.as_secs()).into()))
}

/// Whether the server answers its metadata endpoint with 200.
pub async fn probe(target: &Target) -> bool {
    let Ok(mut sender) = connect(target).await else {
        return false;
    };
    let Ok(req) = Request::get(crate::METADATA)
        .header(HOST, target.host.clone())
        .body(Full::new(Bytes::new()))
    else {
        return false;
    };
    matches!(send(&mut sender, req).await, Ok((200, _)))
}

/// Sends one request on a fresh connection; returns the status and body.
///
/// # Errors
/// On a transport failure.
pub async fn once(
    target: &Target,
    path: &str,
    authorization: Option<&HeaderValue>,
    body: Bytes,
) -> Result<(u16, Bytes)> {
    let mut sender = connect(target).await?;
    send(
        &mut sender,
        request(target, &Method::POST, path, authorization, None, body)?,
    )
    .await
}

/// As [`once`], with a `DPoP` proof header.
///
/// # Errors
/// On a transport failure.
pub async fn once_with_proof(
    target: &Target,
    path: &str,
    body: Bytes,
    proof: &HeaderValue,
) -> Result<(u16, Bytes)> {
    let mut sender = connect(target).await?;
    send(
        &mut sender,
        request(target, &Method::POST, path, None, Some(proof), body)?,
    )
    .await
}

/// A GET on a fresh connection; returns the status and body.
///
/// # Errors
/// On a transport failure.
pub async fn get(
    target: &Target,
    path_and_query: &str,
    authorization: Option<&HeaderValue>,
) -> Result<(u16, Bytes)> {
    let mut sender = connect(target).await?;
    let mut b = Request::get(path_and_query).header(HOST, target.host.clone());
    if let Some(a) = authorization {
        b = b.header(AUTHORIZATION, a.clone());
    }
    send(&mut sender, b.body(Full::new(Bytes::new()))?).await
}

fn request(
    target: &Target,
    method: &Method,
    path: &str,
    authorization: Option<&HeaderValue>,
    proof: Option<&HeaderValue>,
    body: Bytes,
) -> Result<Request<Full<Bytes>>> {
    let mut b = Request::builder()
        .method(method.clone())
        .uri(path)
        .header(HOST, target.host.clone());
    if let Some(a) = authorization {
        b = b.header(AUTHORIZATION, a.clone());
    }
    if let Some(p) = proof {
        b = b.header("dpop", p.clone());
    }
    if *method == Method::GET {
        return Ok(b.body(Full::new(Bytes::new()))?);
    }
    b = b.header(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-www-form-urlencoded"),
    );
    Ok(b.body(Full::new(body))?)
}

struct Shared {
    targets: Vec<Target>,
    workload: Workload,
    next: AtomicUsize,
    start: Instant,
    deadline: Instant,
    keep_answers: bool,
    /// With a fixed rate: the time between one connection's sends.
    interval: Option<Duration>,
    connections: usize,
}

async fn worker(shared: Arc<Shared>, n: usize) -> Outcome {
    let mut out = Outcome::default();
    let Some(target) = shared.targets.get(n % shared.targets.len().max(1)) else {
        return out;
    };
    let mut sender: Option<Sender> = None;
    let wl = &shared.workload;
    let len = wl.bodies.len().max(1);
    // With a fixed rate, this connection's k-th request is due at
    // start + (n / connections + k) * interval.
    let mut due = shared.interval.map(|i| {
        #[expect(clippy::cast_precision_loss, reason = "a fraction of the interval")]
        let stagger = i.mul_f64(n as f64 / shared.connections as f64);
        shared.start + stagger
    });
    while Instant::now() < shared.deadline {
        if let Some(at) = due {
            if at >= shared.deadline {
                break;
            }
            tokio::time::sleep_until(at.into()).await;
        }
        let n = shared.next.fetch_add(1, Ordering::Relaxed);
        let i = if wl.once { n } else { n % len };
        let Some(body) = wl.bodies.get(i).cloned() else {
            out.exhausted = true;
            break;
        };
        let proof = if wl.proofs.is_empty() {
            None
        } else if let Some(p) = wl.proofs.get(n) {
            Some(p)
        } else {
            out.exhausted = true;
            break;
        };
        let conn = match sender.as_mut() {
            Some(s) => s,
            None => match connect(target).await {
                Ok(s) => sender.insert(s),
                Err(e) => {
                    out.fail(format!("connect: {e}"));
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
        };
        let req = match request(
            target,
            &wl.method,
            wl.path,
            wl.authorization.as_ref(),
            proof,
            body,
        ) {
            Ok(r) => r,
            Err(e) => {
                out.fail(format!("request: {e}"));
                continue;
            }
        };
        out.sent += 1;
        let sent_at = Instant::now();
        // Latency counts from when the request was due (as wrk2 does): a
        // send held up behind the previous answer, or by a timer that
        // fired late because the machine (which scrip shares) was busy,
        // is time an agent would have waited. No coordinated omission.
        let t0 = due.unwrap_or(sent_at);
        if let (Some(at), Some(interval)) = (due.as_mut(), shared.interval) {
            *at += interval;
        }
        let result = send(conn, req).await;
        let last_answer = Instant::now();
        match result {
            Ok((status, answer)) => {
                out.latencies_us
                    .push(micros(last_answer.duration_since(t0)));
                if due.is_some() {
                    out.round_trips_us
                        .push(micros(last_answer.duration_since(sent_at)));
                }
                let unexpected = wl.expect.filter(|x| !contains(&answer, x.as_bytes()));
                if let (200, Some(x)) = (status, unexpected) {
                    out.fail(format!(
                        "{} answered 200 without `{x}`: {}",
                        wl.path,
                        String::from_utf8_lossy(answer.get(..200).unwrap_or(&answer))
                    ));
                } else if status == 200 {
                    if shared.keep_answers {
                        out.answers.push(answer);
                    }
                } else {
                    out.fail(format!(
                        "{} answered {status}: {}",
                        wl.path,
                        String::from_utf8_lossy(&answer)
                    ));
                }
            }
            Err(e) => {
                out.fail(format!("{}: {e}", wl.path));
                sender = None;
            }
        }
    }
    // At a fixed rate, what was due before the deadline and not sent: the
    // connection was still waiting for earlier answers.
    if let (Some(at), Some(interval)) = (due, shared.interval)
        && at < shared.deadline
        && !out.exhausted
    {
        let left = (shared.deadline - at).as_nanos();
        out.behind = u64::try_from(left.div_ceil(interval.as_nanos().max(1))).unwrap_or(u64::MAX);
    }
    out
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    needle.is_empty() || haystack.windows(needle.len()).any(|w| w == needle)
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// Runs `workload` on `connections` connections for `duration`, the
/// connections spread evenly over `targets` (several replicas).
///
/// Without `rate`, each connection sends its next request as soon as the
/// last is answered, so latency is measured at saturation. With `rate`
/// (requests per second in all), each connection sends on a fixed
/// schedule, staggered across connections, and a request held up by a slow
/// answer before it counts from when it was due.
///
/// # Errors
/// When a worker task panics.
pub async fn drive(
    targets: &[Target],
    workload: Workload,
    connections: usize,
    duration: Duration,
    keep_answers: bool,
    rate: Option<f64>,
) -> Result<Outcome> {
    let start = Instant::now();
    let connections = connections.max(1);
    #[expect(clippy::cast_precision_loss, reason = "a connection count")]
    let interval = rate
        .filter(|r| r.is_finite() && *r > 0.0)
        .map(|r| Duration::from_secs_f64(connections as f64 / r));
    let shared = Arc::new(Shared {
        targets: targets.to_vec(),
        workload,
        next: AtomicUsize::new(0),
        start,
        deadline: start + duration,
        keep_answers,
        interval,
        connections,
    });
    let workers: Vec<_> = (0..connections)
        .map(|n| tokio::spawn(worker(Arc::clone(&shared), n)))
        .collect();
    let mut total = Outcome::default();
    for w in workers {
        total.merge(w.await?);
    }
    total.elapsed = start.elapsed();
    Ok(total)
}

/// Latency percentiles, milliseconds.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    /// Median.
    pub p50: f64,
    /// 90th percentile.
    pub p90: f64,
    /// 99th percentile.
    pub p99: f64,
    /// Slowest.
    pub max: f64,
}

/// Nearest-rank percentiles of `latencies_us` (sorted in place).
pub fn percentiles(latencies_us: &mut [u32]) -> Percentiles {
    latencies_us.sort_unstable();
    let n = latencies_us.len();
    let at = |p: f64| {
        #[expect(
            clippy::cast_possible_truncation,
            clippy::cast_sign_loss,
            clippy::cast_precision_loss,
            reason = "a rank within the slice length"
        )]
        let rank = ((p * n as f64).ceil() as usize).clamp(1, n.max(1)) - 1;
        latencies_us
            .get(rank)
            .map_or(0.0, |&us| f64::from(us) / 1000.0)
    };
    Percentiles {
        p50: at(0.50),
        p90: at(0.90),
        p99: at(0.99),
        max: at(1.0),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_rank() {
        let mut v: Vec<u32> = (1..=100).map(|i| i * 1000).collect();
        v.reverse();
        let p = percentiles(&mut v);
        assert_eq!(
            p,
            Percentiles {
                p50: 50.0,
                p90: 90.0,
                p99: 99.0,
                max: 100.0
            }
        );
        assert_eq!(percentiles(&mut []), Percentiles::default());
    }

    /// A loopback HTTP/1.1 server that answers every request after `delay`.
    async fn slow_server(delay: Duration) -> (Target, tokio::task::JoinHandle<()>) {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .unwrap();
        let target = Target::loopback(listener.local_addr().unwrap().port()).unwrap();
        let task = tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(
                        move |_: Request<hyper::body::Incoming>| async move {
                            tokio::time::sleep(delay).await;
                            Ok::<_, std::convert::Infallible>(hyper::Response::new(Full::new(
                                Bytes::from_static(b"ok"),
                            )))
                        },
                    );
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                });
            }
        });
        (target, task)
    }

    fn get_root() -> Workload {
        Workload {
            method: Method::GET,
            path: "/",
            authorization: None,
            bodies: vec![Bytes::new()],
            once: false,
            proofs: Vec::new(),
            expect: None,
        }
    }

    /// A 200 without what the workload expects is an error (introspection
    /// and revocation answer 200 whatever they did), and so is an answer
    /// that does not come: the run ends anyway.
    #[tokio::test]
    async fn unexpected_and_missing_answers_are_errors() {
        let (target, server) = slow_server(Duration::ZERO).await;
        let targets = [target];
        let expecting = |x| {
            let workload = Workload {
                expect: Some(x),
                ..get_root()
            };
            drive(
                &targets,
                workload,
                2,
                Duration::from_millis(100),
                false,
                None,
            )
        };
        let ok = expecting("ok").await.unwrap();
        assert!(ok.sent > 0);
        assert_eq!(ok.errors, 0, "{:?}", ok.first_error);
        let wrong = expecting("\"active\":true").await.unwrap();
        assert_eq!(wrong.errors, wrong.sent);
        assert!(
            wrong
                .first_error
                .as_deref()
                .is_some_and(|e| e.contains("answered 200 without")),
            "{:?}",
            wrong.first_error
        );
        server.abort();

        let (target, server) = slow_server(Duration::from_secs(600)).await;
        let started = Instant::now();
        let stuck = drive(
            &[target],
            get_root(),
            1,
            Duration::from_millis(100),
            false,
            None,
        )
        .await
        .unwrap();
        server.abort();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{:?}",
            started.elapsed()
        );
        assert_eq!((stuck.sent, stuck.errors), (1, 1));
        assert!(
            stuck
                .first_error
                .as_deref()
                .is_some_and(|e| e.contains("no answer within")),
            "{:?}",
            stuck.first_error
        );
    }

    /// One connection due every 5 ms, answered 20 ms after each request at
    /// the earliest: the k-th request (from 0) was due 5k ms after the start
    /// but could go out only after the k answers before it, 20k ms at the
    /// earliest. Its latency counts that wait and its round trip does not.
    /// Closed loop has no schedule, so no round trips of its own.
    #[tokio::test]
    async fn open_loop_latency_counts_the_wait_behind_earlier_requests() {
        let (target, server) = slow_server(Duration::from_millis(20)).await;
        let targets = [target];
        let open = drive(
            &targets,
            get_root(),
            1,
            Duration::from_millis(400),
            false,
            Some(200.0),
        )
        .await
        .unwrap();
        let closed = drive(
            &targets,
            get_root(),
            1,
            Duration::from_millis(100),
            false,
            None,
        )
        .await
        .unwrap();
        server.abort();

        assert_eq!(open.errors, 0, "{:?}", open.first_error);
        assert!(
            open.latencies_us.len() >= 3,
            "{} answers",
            open.latencies_us.len()
        );
        assert_eq!(open.round_trips_us.len(), open.latencies_us.len());
        for (k, (&latency, &rtt)) in open
            .latencies_us
            .iter()
            .zip(&open.round_trips_us)
            .enumerate()
        {
            let k = u32::try_from(k).unwrap();
            assert!(rtt >= 20_000, "request {k}: round trip {rtt} µs");
            assert!(
                latency >= rtt + 15_000 * k,
                "request {k}: latency {latency} µs, round trip {rtt} µs"
            );
        }

        // 80 requests were due in 400 ms: what was not sent by the end is
        // reported, not dropped.
        let due = open.sent + open.behind;
        assert!(
            (79..=81).contains(&due),
            "sent {} behind {}",
            open.sent,
            open.behind
        );
        assert!(open.behind > 0);

        assert_eq!(closed.errors, 0, "{:?}", closed.first_error);
        assert_eq!(closed.behind, 0);
        assert!(!closed.latencies_us.is_empty());
        assert!(closed.round_trips_us.is_empty());
        assert!(closed.latencies_us.iter().all(|&us| us >= 20_000));
    }
}
