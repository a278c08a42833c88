//! `GET /revocations`: the revocation feed resource servers follow so that a
//! revoked task's tokens are refused without a call per request.
//!
//! Cursor-based long-poll: `after=<cursor>` lists revocations newer than the
//! cursor that have not expired yet; with none, the request waits up to
//! `wait` seconds (at most 30) for one. The caller authenticates with its
//! own workload identity. A waiting request wakes when the newest
//! revocation's number changes, which one task per process follows
//! ([`Head`]): at once when the store signals a revocation (this replica's
//! commits and, on a shared store, the other replicas' through its
//! notifications), and by reading it every [`POLL`] in any case. So many
//! waiting requests cost the store no more reads than one while they wait;
//! when a revocation comes, each reads its page.

use std::sync::Arc;
use std::time::Duration;

use axum::Json;
use axum::extract::{Query, State};
use axum::http::HeaderMap;
use axum::response::{IntoResponse, Response};
use scrip_store::RevocationKind;
use serde::Deserialize;
use serde_json::json;

use crate::error::OAuthError;
use crate::introspect::caller_identity;
use crate::state::{AppState, now};

/// The longest a request may wait.
const MAX_WAIT: u64 = 30;
/// How often the newest revocation's number is read while requests wait
/// (another replica, or another process on the embedded store, may have
/// written without a signal reaching this one).
const POLL: Duration = Duration::from_millis(200);

/// The newest revocation's number, for the requests that wait for one:
/// followed by one task, running while any request waits.
#[derive(Debug)]
pub(crate) struct Head {
    newest: tokio::sync::watch::Sender<i64>,
    /// Whether the task runs. Subscribing and the task's check that
    /// nobody waits both hold it, so that neither misses the other.
    following: std::sync::Mutex<bool>,
}

impl Head {
    pub(crate) fn new() -> Arc<Self> {
        Arc::new(Self {
            newest: tokio::sync::watch::Sender::new(0),
            following: std::sync::Mutex::new(false),
        })
    }

    /// A receiver that changes when the newest number does; starts the
    /// task that follows it if none runs.
    fn subscribe(
        self: &Arc<Self>,
        store: &Arc<dyn scrip_store::Store>,
    ) -> tokio::sync::watch::Receiver<i64> {
        let mut following = self.following();
        let receiver = self.newest.subscribe();
        if !*following {
            *following = true;
            scrip_vital::spawn("revocation feed head", self.clone().follow(store.clone()));
        }
        receiver
    }

    fn following(&self) -> std::sync::MutexGuard<'_, bool> {
        match self.following.lock() {
            Ok(f) => f,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Reads the newest number when the store signals a change and every
    /// [`POLL`], while anyone waits; then stops.
    async fn follow(self: Arc<Self>, store: Arc<dyn scrip_store::Store>) {
        let mut changes = store.changes();
        loop {
            // Nobody waits: stop (a request that begins waiting after
            // this starts another).
            {
                let mut following = self.following();
                if self.newest.receiver_count() == 0 {
                    *following = false;
                    return;
                }
            }
            changes.borrow_and_update();
            match store.latest_revocation().await {
                Ok(n) => {
                    self.newest.send_if_modified(|newest| {
                        let changed = *newest != n;
                        *newest = n;
                        changed
                    });
                }
                // The waiting requests read the store themselves when it
                // changes, and answer its error then.
                Err(e) => tracing::debug!(error = %e, "cannot read the newest revocation"),
            }
            tokio::select! {
                _ = changes.changed() => {}
                () = tokio::time::sleep(POLL) => {}
            }
        }
    }
}
/// The most events in one answer.
const PAGE: u32 = 1000;

/// The query of `GET /revocations`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FeedQuery {
    #[serde(default)]
    after: Option<i64>,
    #[serde(default)]
    wait: Option<u64>,
}

/// `GET /revocations`.
pub async fn feed_endpoint(
    State(state): State<AppState>,
    headers: HeaderMap,
    query: Result<Query<FeedQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let st = &state.0;
    if let Err(e) = caller_identity(st, &headers).await {
        return e.into_response();
    }
    let Ok(Query(q)) = query else {
        return OAuthError::invalid_request(
            "query must be `after=<cursor>` and `wait=<seconds>`, both non-negative integers",
        )
        .into_response();
    };
    let after = q.after.unwrap_or(0);
    let wait = q.wait.unwrap_or(0);
    if after < 0 || wait > MAX_WAIT {
        return OAuthError::invalid_request(format!(
            "`after` must be a cursor from this feed and `wait` at most {MAX_WAIT} seconds"
        ))
        .into_response();
    }
    // A long poll answers what there is once shutdown begins, so that a
    // follower does not hold up the drain (it polls again elsewhere).
    let mut stopping = st.stopping.subscribe();
    let stop = async move {
        // (The guard `wait_for` returns is not `Send`: dropped at once.)
        let _ = stopping.wait_for(|s| *s).await.map(drop);
    };
    let read = tokio::select! {
        r = page(st, after, wait) => r,
        () = stop => page(st, after, 0).await,
    };
    match read {
        Ok(body) => {
            let mut r = Json(body).into_response();
            r.headers_mut().insert(
                axum::http::header::CACHE_CONTROL,
                axum::http::HeaderValue::from_static("no-store"),
            );
            r
        }
        Err(e) => OAuthError::from(e).into_response(),
    }
}

/// One page of the feed after `after`, waiting up to `wait` seconds for an
/// event: `{"cursor": .., "events": [..], "more": ..}`. `more` is false when
/// the page holds every event there was when it was read, so a follower
/// knows it has caught up even while new revocations keep coming.
async fn page(
    st: &crate::state::Inner,
    after: i64,
    wait: u64,
) -> Result<serde_json::Value, scrip_store::StoreError> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait);
    let mut newest = st.feed.subscribe(&st.store);
    // A cursor past the newest event: the store numbers events anew
    // (restored from a backup, a new data directory), or the newest ones
    // were purged. Start the follower over from the first event rather than
    // let it wait for numbers it has already passed. Checked once a page:
    // later events only move the newest number up. Not read again where
    // the number the process follows ([`Head`]) already reaches the
    // cursor: a follower caught up, polling again after each event, costs
    // one read a page, not two.
    let known = *newest.borrow();
    let after = if after > known && st.store.latest_revocation().await? < after {
        0
    } else {
        after
    };
    loop {
        newest.borrow_and_update();
        // One more than a page: whether any was left for the next one.
        // Served a while past their `exp` too (see `kept_past`): a
        // follower starting now, whose clock is behind, still accepts them.
        let shown_from = now().saturating_sub(crate::background::kept_past(st));
        let mut events = st.store.revocations(after, shown_from, PAGE + 1).await?;
        if !events.is_empty() || tokio::time::Instant::now() >= deadline {
            let page = usize::try_from(PAGE).unwrap_or(usize::MAX);
            let more = events.len() > page;
            events.truncate(page);
            let cursor = events.last().map_or(after, |e| e.seq);
            let events: Vec<serde_json::Value> = events
                .iter()
                .map(|e| match e.kind {
                    RevocationKind::Task => json!({"type": "task", "txn": e.txn, "exp": e.exp}),
                    RevocationKind::Token => {
                        json!({"type": "token", "jti": e.jti, "txn": e.txn, "exp": e.exp})
                    }
                })
                .collect();
            return Ok(json!({ "cursor": cursor, "events": events, "more": more }));
        }
        tokio::select! {
            _ = newest.changed() => {}
            () = tokio::time::sleep_until(deadline) => {}
        }
    }
}

/// The feed read straight from the store, for the verifier of the proxy
/// mounted in this server: the same pages `GET /revocations` answers.
#[derive(Debug)]
pub(crate) struct LocalFeed(pub AppState);

impl scrip_verifier::FeedSource for LocalFeed {
    fn page(&self, after: u64, wait: Duration) -> scrip_verifier::PageFuture<'_> {
        Box::pin(async move {
            let after = i64::try_from(after).unwrap_or(i64::MAX);
            let body = page(&self.0.0, after, wait.as_secs().min(MAX_WAIT))
                .await
                .map_err(|e| e.to_string())?;
            serde_json::to_vec(&body).map_err(|e| e.to_string())
        })
    }

    fn claim_once<'a>(&'a self, token: &'a str) -> scrip_verifier::ClaimFuture<'a> {
        Box::pin(async move {
            let st = &self.0.0;
            let claims = st
                .verify_own::<scrip_token::AccessClaims>(token, scrip_token::TokenKind::Access)
                .map_err(|e| e.to_string())?
                .claims;
            crate::introspect::claim_once(st, &claims, crate::state::now(), Vec::new())
                .await
                .map_err(|e| e.description)
        })
    }
}
