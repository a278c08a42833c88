//! The two streaming bodies: the agent's request body counted on its way
//! up, and the upstream's response body redacted, counted and bounded by
//! the read timeout on its way down. Neither is ever held whole; when the
//! response ends (or the agent goes away) the completion audit record is
//! written. While either streams, the request's token is checked again
//! ([`Standing`]): a token revoked mid-request, or its task ended, cuts the
//! request off at the next chunk (a single-use token's use is its
//! revocation: for one, only its task's end counts).

use std::future::Future as _;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll, ready};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body::{Body, Frame, SizeHint};

use crate::redact::Redactor;

/// The error type of both bodies.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// How often, at most, a streaming request's token is checked again.
const RECHECK_EVERY: Duration = Duration::from_millis(500);

/// A request's token while its bodies stream: allowed when the request
/// began, it must still stand (not revoked, its task not ended, the
/// revocation set fresh) for each chunk to pass, checked at most every
/// [`RECHECK_EVERY`]. Revocation ends what a token does, a download or
/// upload under way included, and so does the token's `exp` once the
/// leeway past it has run (`Verifier::recheck`).
pub struct Standing {
    verifier: scrip_verifier::Verifier,
    token: scrip_verifier::AccessToken,
    since: Instant,
    /// Milliseconds after `since` of the last check.
    checked_ms: AtomicU64,
    /// Why the request was cut off, once it is.
    cut: OnceLock<scrip_verifier::VerifyError>,
}

impl std::fmt::Debug for Standing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Standing")
            .field("jti", &self.token.claims().jti)
            .field("cut", &self.cut.get())
            .finish_non_exhaustive()
    }
}

impl Standing {
    /// The token `verifier` allowed the request with, just checked.
    #[must_use]
    pub fn new(verifier: scrip_verifier::Verifier, token: scrip_verifier::AccessToken) -> Self {
        Self {
            verifier,
            token,
            since: Instant::now(),
            checked_ms: AtomicU64::new(0),
            cut: OnceLock::new(),
        }
    }

    /// Whether the token still stands; once it does not, never again.
    fn holds(&self) -> bool {
        self.check(false)
    }

    /// Whether the token still stands, checked now whenever it was last.
    #[must_use]
    pub fn holds_now(&self) -> bool {
        self.check(true)
    }

    /// Whether the token is for a single use (a step a person approved):
    /// its request reaches the upstream once at most.
    #[must_use]
    pub fn single_use(&self) -> bool {
        self.token
            .claims()
            .approval
            .as_ref()
            .is_some_and(|a| a.single_use)
    }

    fn check(&self, now_whenever: bool) -> bool {
        if self.cut.get().is_some() {
            return false;
        }
        let now = u64::try_from(self.since.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.checked_ms.load(Ordering::Relaxed);
        if !now_whenever
            && now.saturating_sub(last) < u64::try_from(RECHECK_EVERY.as_millis()).unwrap_or(0)
        {
            return true;
        }
        self.checked_ms.store(now, Ordering::Relaxed);
        match self.verifier.recheck(&self.token) {
            Ok(()) => true,
            Err(e) => {
                tracing::info!(jti = %self.token.claims().jti, task = %self.token.task(), reason = %e, "proxy: request cut off mid-stream");
                let _ = self.cut.set(e);
                false
            }
        }
    }

    /// Why the request was cut off, if it was.
    #[must_use]
    pub fn cut(&self) -> Option<&scrip_verifier::VerifyError> {
        self.cut.get()
    }

    /// Why the token no longer stands (revoked, when no reason was kept).
    pub fn why_cut(&self) -> scrip_verifier::VerifyError {
        self.cut()
            .cloned()
            .unwrap_or(scrip_verifier::VerifyError::Revoked)
    }

    /// The error a body ends with once the request is cut off.
    fn cut_off(&self) -> BoxError {
        Box::new(Cut(self.why_cut()))
    }
}

/// The request was cut off mid-stream: its token no longer stands.
#[derive(Debug, thiserror::Error)]
#[error("the request's token no longer stands: {0}")]
pub struct Cut(scrip_verifier::VerifyError);

/// The agent's request body failed (cut short, or its chunked framing
/// broken): the agent's doing, not the upstream's.
#[derive(Debug, thiserror::Error)]
#[error("the agent's request body failed: {0}")]
pub struct AgentBody(BoxError);

impl AgentBody {
    /// Whether `e`, or an error it wraps, is the agent's body failing.
    #[must_use]
    pub fn caused(e: &(dyn std::error::Error + 'static)) -> bool {
        let mut next = Some(e);
        while let Some(e) = next {
            if e.is::<Self>() {
                return true;
            }
            next = e.source();
        }
        false
    }
}

/// The agent's request body, counting the bytes that pass. A body that
/// stops moving for longer than the upstream's read timeout fails (as the
/// agent's doing): once the upstream has answered nothing else watches it,
/// and an agent that sent part of its body and then nothing would hold its
/// connection and an upstream connection for as long as the upstream waits.
pub struct CountingBody {
    inner: axum::body::Body,
    count: Arc<AtomicU64>,
    standing: Arc<Standing>,
    idle: Duration,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// Whether a body that just had nothing to give has had nothing for
/// `limit`: `timer`, started at the first such poll (and cleared by the
/// caller when the body moves), has run out; otherwise it wakes `cx` then.
fn silent_for(
    timer: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    limit: Duration,
    cx: &mut Context<'_>,
) -> bool {
    timer
        .get_or_insert_with(|| Box::pin(tokio::time::sleep(limit)))
        .as_mut()
        .poll(cx)
        .is_ready()
}

/// The agent's body stopped moving for longer than the read timeout.
#[derive(Debug, thiserror::Error)]
#[error("nothing more came for {0:?}")]
pub struct Stalled(Duration);

impl std::fmt::Debug for CountingBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CountingBody").finish_non_exhaustive()
    }
}

impl CountingBody {
    /// Wraps `inner`, adding to `count`, while `standing` holds and the
    /// body moves at least every `idle`.
    #[must_use]
    pub fn new(
        inner: axum::body::Body,
        count: Arc<AtomicU64>,
        standing: Arc<Standing>,
        idle: Duration,
    ) -> Self {
        Self {
            inner,
            count,
            standing,
            idle,
            timer: None,
        }
    }
}

impl Body for CountingBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if polled.is_pending() {
            let idle = self.idle;
            if silent_for(&mut self.timer, idle, cx) {
                self.timer = None;
                return Poll::Ready(Some(Err(Box::new(AgentBody(Box::new(Stalled(idle)))))));
            }
            return Poll::Pending;
        }
        self.timer = None;
        match ready!(polled) {
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => {
                    if !self.standing.holds() {
                        return Poll::Ready(Some(Err(self.standing.cut_off())));
                    }
                    self.count
                        .fetch_add(u64::try_from(data.len()).unwrap_or(0), Ordering::Relaxed);
                    Poll::Ready(Some(Ok(Frame::data(data))))
                }
                // Trailers are hop-by-hop here: not forwarded.
                Err(_) => Poll::Ready(None),
            },
            Some(Err(e)) => Poll::Ready(Some(Err(Box::new(AgentBody(Box::new(e)))))),
            None => Poll::Ready(None),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Called once when the response body ends, fails or is dropped, with the
/// bytes sent to the agent and whether it completed.
pub type OnDone = Box<dyn FnOnce(u64, bool) + Send>;

/// The upstream's response body, redacted as it streams.
pub struct ResponseBody {
    inner: hyper::body::Incoming,
    redactor: Redactor,
    read_timeout: Duration,
    standing: Arc<Standing>,
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
    sent: u64,
    finished: bool,
    on_done: Option<OnDone>,
}

impl std::fmt::Debug for ResponseBody {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseBody")
            .field("sent", &self.sent)
            .finish_non_exhaustive()
    }
}

impl ResponseBody {
    /// Wraps the upstream body, passed on while `standing` holds.
    #[must_use]
    pub fn new(
        inner: hyper::body::Incoming,
        redactor: Redactor,
        read_timeout: Duration,
        standing: Arc<Standing>,
        on_done: OnDone,
    ) -> Self {
        Self {
            inner,
            redactor,
            read_timeout,
            standing,
            timer: None,
            sent: 0,
            finished: false,
            on_done: Some(on_done),
        }
    }

    fn done(&mut self, complete: bool) {
        if let Some(f) = self.on_done.take() {
            f(self.sent, complete);
        }
    }

    fn emit(&mut self, data: Bytes) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        self.sent += u64::try_from(data.len()).unwrap_or(0);
        Poll::Ready(Some(Ok(Frame::data(data))))
    }
}

impl Drop for ResponseBody {
    fn drop(&mut self) {
        // The server drops a body it may not send (HEAD, 204, 304) or that
        // is empty without reading it: complete, when nothing was left.
        let complete = self.inner.is_end_stream() && self.redactor.holds_nothing();
        self.done(complete);
    }
}

/// The upstream stopped sending for longer than the read timeout.
#[derive(Debug, thiserror::Error)]
#[error("upstream read timed out")]
pub struct ReadTimeout;

impl Body for ResponseBody {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        loop {
            if this.finished {
                return Poll::Ready(None);
            }
            match Pin::new(&mut this.inner).poll_frame(cx) {
                Poll::Pending => {
                    if silent_for(&mut this.timer, this.read_timeout, cx) {
                        this.finished = true;
                        this.done(false);
                        return Poll::Ready(Some(Err(Box::new(ReadTimeout))));
                    }
                    return Poll::Pending;
                }
                Poll::Ready(next) => {
                    this.timer = None;
                    match next {
                        Some(Ok(frame)) => {
                            let Ok(data) = frame.into_data() else {
                                // Trailers are not forwarded.
                                continue;
                            };
                            if !this.standing.holds() {
                                this.finished = true;
                                this.done(false);
                                return Poll::Ready(Some(Err(this.standing.cut_off())));
                            }
                            let out = this.redactor.push(&data);
                            if !out.is_empty() {
                                return this.emit(out);
                            }
                        }
                        Some(Err(e)) => {
                            this.finished = true;
                            this.done(false);
                            return Poll::Ready(Some(Err(Box::new(e))));
                        }
                        None => {
                            this.finished = true;
                            let tail = this.redactor.finish();
                            let result = if tail.is_empty() {
                                Poll::Ready(None)
                            } else {
                                this.emit(tail)
                            };
                            this.done(true);
                            return result;
                        }
                    }
                }
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.finished
    }

    fn size_hint(&self) -> SizeHint {
        // Redaction keeps lengths.
        self.inner.size_hint()
    }
}
