//! One proxied request, start to end: refuse early and cheaply, decide,
//! make the decision durable, then forward and stream back.
//!
//! Order (each step fails closed): token valid for this upstream (RFC 6750
//! answers; an upstream that is not here answers as one that is answers a
//! token issued for another) → path unambiguous → method maps to an action
//! → that action in the token's scope → task active → Cedar allows the
//! concrete request → the action's secret exists → the `proxy.request`
//! audit record is durable (else 503, nothing forwarded) → forward. When the
//! response body ends, a `proxy.response` record gives status, bytes and
//! latency.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::response::{IntoResponse, Response};
use http::{Method, Request, StatusCode};
use scrip_policy::{DecisionRequest, RequestContext, Stage};
use scrip_store::{AuditEvent, TaskState, Write};
use scrip_token::{ActionName, MAX_NAME_LEN};
use scrip_verifier::VerifyError;
use serde_json::json;

use crate::body::{CountingBody, ResponseBody, Standing};
use crate::metrics::Outcome;
use crate::redact::Redactor;
use crate::{Proxy, Upstream, headers, now, now_ms, route};

/// A JSON error answer; descriptions are lowercase and name no internals.
fn error(status: StatusCode, code: &str, description: impl Into<String>) -> Response {
    let mut r = (
        status,
        axum::Json(json!({ "error": code, "error_description": description.into() })),
    )
        .into_response();
    r.headers_mut().insert(
        http::header::CACHE_CONTROL,
        http::HeaderValue::from_static("no-store"),
    );
    r
}

/// What the audit records of one request share.
struct Draft {
    record: AuditEvent,
    started: Instant,
    /// The normalised path: what every check saw and what the upstream
    /// gets (`record.path` is its audit copy, cut at 1 KiB).
    path: String,
}

impl Draft {
    fn finish(&self, event: &str) -> AuditEvent {
        let mut r = self.record.clone();
        r.event = event.to_owned();
        r.at_ms = now_ms();
        r.latency_us = Some(u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX));
        r
    }
}

impl Proxy {
    /// Records a refusal and answers it: in the background (a refusal
    /// releases nothing), once there is room among the refusal records
    /// being written (see [`crate::Pending::commit_refusal`]): a client
    /// sending refusals faster than the store takes them is slowed down
    /// rather than left to grow the backlog without bound. Past
    /// [`crate::UNVERIFIED_PER_SECOND`] refusals without a verified token
    /// (the draft names no `jti`), or [`crate::PER_TOKEN_PER_SECOND`] of
    /// one token, in a second, recorded as a count.
    async fn deny(
        &self,
        draft: &Draft,
        upstream: &str,
        response: Response,
        reason: String,
    ) -> Response {
        let mut r = self.refusal(draft, upstream, &response, reason);
        // The access token names no issuer: its task does (usually cached),
        // so that a query by issuer finds the refusals of a revoked agent.
        if r.agent_iss.is_none()
            && let Some(id) = r.task_id.clone()
            && let Ok(Some(task)) = self.task(&id).await
        {
            r.agent_iss = Some(task.agent.issuer.clone());
        }
        self.0
            .pending
            .commit_limited_refusal(self.0.store.clone(), r)
            .await;
        response
    }

    fn refusal(
        &self,
        draft: &Draft,
        upstream: &str,
        response: &Response,
        reason: String,
    ) -> AuditEvent {
        self.refused(draft.finish("proxy.request"), upstream, response, reason)
    }

    /// `r` (a request's record) as the record of its refusal.
    fn refused(
        &self,
        mut r: AuditEvent,
        upstream: &str,
        response: &Response,
        reason: String,
    ) -> AuditEvent {
        r.event = "proxy.request".into();
        r.decision = Some("deny".into());
        r.status = Some(response.status().as_u16());
        r.reason = Some(reason);
        self.0
            .metrics
            .count(upstream, Outcome::of_refusal(response.status()));
        r
    }

    fn commit_later(&self, record: AuditEvent) {
        self.0.pending.commit(self.0.store.clone(), record);
    }
}

/// The `proxy.response` record of a request whose handler is dropped while
/// it waits for the upstream: the agent went away, and the upstream may
/// still act on what it was sent, so the trail says so (the `allow` record
/// alone would not). Disarmed once the upstream answered or failed.
struct Unanswered {
    proxy: Proxy,
    upstream: String,
    record: Option<AuditEvent>,
    started: Instant,
}

impl Unanswered {
    fn disarm(mut self) {
        self.record = None;
    }
}

impl Drop for Unanswered {
    fn drop(&mut self) {
        let Some(mut r) = self.record.take() else {
            return;
        };
        if tokio::runtime::Handle::try_current().is_err() {
            return;
        }
        r.at_ms = now_ms();
        r.latency_us = Some(u64::try_from(self.started.elapsed().as_micros()).unwrap_or(u64::MAX));
        self.proxy.0.metrics.count(&self.upstream, Outcome::Failed);
        self.proxy.commit_later(r);
    }
}

/// The most bytes of a method or path an audit record keeps: a request
/// head may be 64 KiB, and a refused request (anyone may send one) should
/// not cost the store that much.
const AUDIT_TEXT: usize = 1024;

/// `s` as an audit record keeps it: cut at [`AUDIT_TEXT`] bytes, saying
/// how long it was.
fn for_audit(s: &str) -> String {
    shortened(s, AUDIT_TEXT)
}

/// The most bytes of a method a refusal before any token verified keeps.
const UNVERIFIED_TEXT: usize = 16;

/// `s` cut at `max` bytes, saying how long it was.
fn shortened(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    format!("{}… ({} bytes)", cut(s, max), s.len())
}

/// The first `max` bytes of `s`, or fewer to end on a character.
fn cut(s: &str, max: usize) -> &str {
    let mut end = max.min(s.len());
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    s.get(..end).unwrap_or_default()
}

/// The upstream name and the path below it.
fn split(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix(crate::PREFIX)?;
    match rest.find('/') {
        Some(i) => rest.split_at_checked(i),
        None => Some((rest, "/")),
    }
}

/// `ANY /proxy/{*rest}`.
pub(crate) async fn handle(State(proxy): State<Proxy>, request: Request<Body>) -> Response {
    let started = Instant::now();
    let (parts, body) = request.into_parts();
    let Some((name, path)) = split(parts.uri.path()) else {
        return error(StatusCode::NOT_FOUND, "not_found", "no such upstream");
    };
    let client = parts
        .extensions
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0.ip().to_string());
    let mut draft = Draft {
        record: AuditEvent {
            event: "proxy.request".into(),
            replica: proxy.0.replica.clone(),
            // What anyone may send is kept short, or not at all, until a
            // token scrip issued stands behind the request: the method's
            // first 16 bytes, no path.
            method: Some(shortened(parts.method.as_str(), UNVERIFIED_TEXT)),
            path: None,
            client,
            ..AuditEvent::default()
        },
        started,
        path: String::new(),
    };
    let Some(upstream) = proxy.0.upstreams.get(name) else {
        // Answered as an upstream that is here answers a token issued for
        // another (or none, or a bad one): a caller without a token for an
        // upstream cannot tell whether it exists.
        let name = cut(name, MAX_NAME_LEN);
        tracing::debug!(upstream = ?name, "proxy: a request for no upstream");
        let response = proxy
            .0
            .no_upstream
            .refuse_as(name, &parts.method, &parts.uri, &parts.headers)
            .await
            .into_response();
        // On the record as other refusals before a token is verified are
        // (limited together), naming no tool (and counted under none: the
        // name is anyone's), so that one probing for upstreams is seen.
        let mut r = draft.finish("proxy.request");
        r.decision = Some("deny".into());
        r.status = Some(response.status().as_u16());
        r.reason = Some(format!(
            "no upstream is named `{}`",
            shortened(name, UNVERIFIED_TEXT)
        ));
        proxy
            .0
            .pending
            .commit_limited_refusal(proxy.0.store.clone(), r)
            .await;
        return response;
    };
    draft.record.tool = Some(upstream.name.clone());
    // The token first, before anything is done with the path: what else is
    // wrong with a request (its path, its method, its scope) is said only
    // to a caller holding a token for this upstream, and takes only such a
    // caller's time, so that others cannot map the routes. (The proxy
    // spends a single-use token itself, once the request is allowed.)
    let token = match upstream
        .verifier
        .authenticate(&parts.method, &parts.uri, &parts.headers)
        .await
    {
        // The proxy claims a single use itself, in the commit of its
        // `allow` record.
        Ok(t) => t.danger_caller_claims_use(),
        Err(rejection) => {
            let why = rejection
                .www_authenticate
                .clone()
                .unwrap_or_else(|| {
                    "scrip could not confirm the token's state (revocations stale, or a single use unconfirmed)".into()
                });
            // Refused after it verified (revoked, used, its DPoP key
            // missing): scrip issued it, and the attempt is recorded naming
            // whose it was, and limited per token. Before that, anyone can
            // send the request: limited together.
            if rejection.token_verified
                && let Some(claims) = &rejection.claims
            {
                draft.record.method = Some(for_audit(parts.method.as_str()));
                draft.record.path = Some(for_audit(path));
                draft.record.task_id = Some(claims.txn.clone());
                draft.record.jti = Some(claims.jti.clone());
                draft.record.agent_sub = Some(claims.sub.clone());
                if let Some(act) = &claims.act {
                    draft.record.chain = act.chain();
                }
            }
            return proxy
                .deny(&draft, name, rejection.into_response::<Body>(), why)
                .await;
        }
    };
    draft.record.method = Some(for_audit(parts.method.as_str()));
    draft.record.path = Some(for_audit(path));
    draft.record.task_id = Some(token.task().to_owned());
    draft.record.jti = Some(token.claims().jti.clone());
    draft.record.agent_sub = Some(token.claims().sub.clone());
    if let Some(act) = &token.claims().act {
        draft.record.chain = act.chain();
    }

    // From here on every check, the audit and the upstream see one path.
    let path = match route::normalize(path) {
        Ok(p) => p,
        Err(e) => {
            let r = error(StatusCode::BAD_REQUEST, "invalid_request", e.to_string());
            return proxy.deny(&draft, name, r, e.to_string()).await;
        }
    };
    draft.record.path = Some(for_audit(&path));
    draft.path.clone_from(&path);
    // WebDAV's `COPY` and `MOVE` name a second path in `Destination`, which
    // routes and Cedar would never see (a write allowed under `/public`
    // landing under `/private`): such a request is not forwarded.
    if parts
        .headers
        .keys()
        .any(|k| k.as_str().replace('_', "-") == "destination")
    {
        let why = "a `Destination` header names a second path that routes and policies do not see; the proxy does not forward it".to_owned();
        let r = error(StatusCode::BAD_REQUEST, "invalid_request", why.clone());
        return proxy.deny(&draft, name, r, why).await;
    }
    // Routes and Cedar see escapes the upstream decodes before routing
    // decoded (`%3A` is the `:` of a `:verb`); the upstream gets `path`.
    let matched = route::match_form(&path);
    let Some(action) = upstream.map.action(&parts.method, &matched).cloned() else {
        let why = format!(
            "method `{}` maps to no action of this upstream",
            for_audit(parts.method.as_str())
        );
        let r = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            why.clone(),
        );
        return proxy.deny(&draft, name, r, why).await;
    };
    draft.record.actions = Some(action.to_string());
    if !token.actions().contains(&action) {
        let rejection = scrip_verifier::Rejection::scope_lacks(name, &token, &action);
        let why = rejection.www_authenticate.clone().unwrap_or_default();
        return proxy
            .deny(&draft, name, rejection.into_response::<Body>(), why)
            .await;
    }

    let task = match proxy.task(token.task()).await {
        Ok(Some(task)) if task.state(now()) == TaskState::Active => task,
        Ok(_) => {
            let r = scrip_verifier::Rejection::for_token(
                name,
                &token,
                &scrip_verifier::VerifyError::Revoked,
            )
            .into_response::<Body>();
            return proxy
                .deny(&draft, name, r, "the token's task is not active".into())
                .await;
        }
        Err(e) => {
            if crate::STORE_LINES.allow("proxy: store failures") {
                tracing::error!(error = %e, "proxy: cannot read the task");
            }
            return unavailable(&proxy, name);
        }
    };
    draft.record.agent_iss = Some(task.agent.issuer.clone());
    draft.record.environment = Some(task.environment.clone());

    let decision = decide(
        &proxy,
        upstream,
        &task,
        &token,
        &action,
        &parts.method,
        &matched,
    );
    draft.record.policies.clone_from(&decision.policies);
    if !decision.allowed {
        let r = error(
            StatusCode::FORBIDDEN,
            "access_denied",
            format!(
                "policy does not allow `{action}` {} {path} at `{name}`",
                parts.method
            ),
        );
        return proxy.deny(&draft, name, r, decision.reason).await;
    }

    if !upstream.secret_actions.contains(&action) {
        let why = format!("upstream `{name}` has no secret for `{action}`");
        let r = error(StatusCode::FORBIDDEN, "access_denied", why.clone());
        return proxy.deny(&draft, name, r, why).await;
    }
    let at = crate::now();
    let (secret, retiring) = match proxy.0.secrets.accepted(name, action.as_str(), at).await {
        Ok(crate::secrets::Accepted {
            current: Some(s),
            retiring,
        }) => (s, retiring),
        Ok(_) => {
            if crate::SECRET_LINES.allow("proxy: secrets not set or unusable") {
                tracing::error!(upstream = %name, %action, "proxy: no secret is set; set one with `scrip secret set`");
            }
            let why = format!("no secret is set for `{name}` `{action}`");
            let r = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                why.clone(),
            );
            return proxy.deny(&draft, name, r, why).await;
        }
        Err(e) => {
            if crate::STORE_LINES.allow("proxy: store failures") {
                tracing::error!(error = %e, "proxy: cannot read the secret");
            }
            return unavailable(&proxy, name);
        }
    };
    // The upstream's keys for its other actions are redacted too: a read
    // answer that shows the write key (a settings page) would undo the
    // split of power between the actions. So are versions replaced less
    // than their grace ago, which the upstream still accepts. A key that
    // cannot be read cannot be looked for, so the request is not forwarded.
    let mut others = retiring;
    for other in upstream.secret_actions.iter().filter(|a| **a != action) {
        match proxy.0.secrets.accepted(name, other.as_str(), at).await {
            Ok(accepted) => {
                others.extend(accepted.current);
                others.extend(accepted.retiring);
            }
            Err(e) => {
                if crate::STORE_LINES.allow("proxy: store failures") {
                    tracing::error!(error = %e, "proxy: cannot read the secret");
                }
                return unavailable(&proxy, name);
            }
        }
    }

    // The decision is durable before anything leaves (fail closed). A
    // single-use token (a step a person approved) is spent here, in the same
    // commit, once every check has passed: the store decides across
    // replicas and resource servers which presentation is the one.
    let mut allow = draft.finish("proxy.request");
    allow.decision = Some("allow".into());
    allow.reason = Some(decision.reason);
    allow.latency_us = None;
    let mut writes = Vec::with_capacity(4);
    let claims = token.claims();
    if claims.approval.as_ref().is_some_and(|a| a.single_use) {
        writes.push(Write::ClaimToken {
            jti: claims.jti.clone(),
            task_id: claims.txn.clone(),
            expires_at: claims.exp.saturating_add(proxy.0.clock_skew),
            at: now(),
        });
        let mut used = draft.finish("token.used");
        used.reason = Some("single-use token presented to the proxy".into());
        used.latency_us = None;
        writes.push(Write::Audit(Box::new(used)));
    }
    writes.push(Write::Audit(Box::new(allow)));
    // A DPoP proof is taken once by every replica and process on the store
    // (each verifier took it once in its own memory already): a request
    // replayed at another replica within the proof's minute is not
    // forwarded again. After the single use, which both stores then find
    // spent first: a replayed single-use request is answered alike.
    if let Some(proof) = token.proof() {
        writes.push(Write::SpendProof {
            id: proof.id,
            iat: proof.iat,
        });
    }
    if let Err(e) = commit_allow(&proxy, name, &draft, writes).await {
        if let Some((why, reason)) = refusal(&e) {
            let r =
                scrip_verifier::Rejection::for_token(name, &token, &why).into_response::<Body>();
            return proxy.deny(&draft, name, r, reason.into()).await;
        }
        if crate::STORE_LINES.allow("proxy: store failures") {
            tracing::error!(error = %e, "proxy: audit record not durable; request not forwarded");
        }
        return unavailable(&proxy, name);
    }

    let standing = Arc::new(Standing::new(upstream.verifier.clone(), token));
    forward(
        &proxy, upstream, &action, parts, body, &secret, &others, draft, standing,
    )
    .await
}

/// Why a request whose `allow` found its single use spent, or its task
/// ended, in the commit is refused.
const SPENT: &str = "single-use token was already presented, or its task ended meanwhile";

/// The reason recorded for a request whose DPoP proof another process on
/// the store (another replica) took first.
const REPLAYED: &str = "DPoP proof was used before (a replayed request)";

/// What the agent is answered, and the reason recorded, when the commit of
/// a request's `allow` was refused: its single use spent or its task ended
/// meanwhile (a conflict), or its DPoP proof taken before; `None` for a
/// failure of the store.
fn refusal(e: &scrip_store::StoreError) -> Option<(VerifyError, &'static str)> {
    match e {
        scrip_store::StoreError::Conflict(_) => Some((VerifyError::AlreadyUsed, SPENT)),
        scrip_store::StoreError::ProofUsed => Some((
            VerifyError::Proof(scrip_store::StoreError::ProofUsed.to_string()),
            REPLAYED,
        )),
        _ => None,
    }
}

/// Commits a request's `allow` (with the claim of a single use) on a task
/// of its own, which the request only waits for. Should the agent go away
/// meanwhile (the request dropped), the commit still ends, and when it
/// commits, the trail gets the request's `proxy.response`: nothing was
/// forwarded (a spent single use included). So it does when the commit's
/// outcome is unknown (the store unavailable), agent or not. A commit
/// that found the single use spent or the task ended, whose agent went
/// away, is recorded as the refusal the agent would have been answered.
async fn commit_allow(
    proxy: &Proxy,
    name: &str,
    draft: &Draft,
    writes: Vec<Write>,
) -> Result<(), scrip_store::StoreError> {
    let mut gone = draft.finish("proxy.response");
    gone.reason = Some(
        "the agent went away before the request was forwarded; nothing reached the upstream".into(),
    );
    let started = draft.started;
    let committing = proxy.clone();
    let upstream = name.to_owned();
    let (answer, answered) = tokio::sync::oneshot::channel();
    // Taken by the request once it has the answer: a request dropped after
    // the answer was sent, before it read it, is gone too.
    let (taken, took) = tokio::sync::oneshot::channel::<()>();
    let held = proxy.0.pending.hold();
    tokio::spawn(async move {
        let _held = held;
        let result = committing.0.store.commit(writes).await;
        let committed = result.is_ok();
        let refused = result.as_ref().err().and_then(refusal);
        // An unavailable store may have taken the commit all the same (a
        // connection lost as it committed): its allow, and a spent single
        // use, may be on the record, and nothing is forwarded either way.
        let unknown = matches!(result, Err(scrip_store::StoreError::Unavailable(_)));
        let gone_before_forwarding = match answer.send(result) {
            Ok(()) => took.await.is_err(),
            Err(_) => true,
        };
        if unknown {
            gone.reason = Some(
                "the request's allow could not be confirmed written (it may be on the record); nothing reached the upstream"
                    .into(),
            );
        }
        gone.at_ms = now_ms();
        gone.latency_us = Some(u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX));
        if let Some((why, reason)) = refused.filter(|_| gone_before_forwarding) {
            let rejection =
                scrip_verifier::Rejection::from_error(&upstream, &why).into_response::<Body>();
            let reason = format!("{reason} (the agent went away before the answer)");
            let refused = committing.refused(gone, &upstream, &rejection, reason);
            committing
                .0
                .pending
                .commit_limited_refusal(committing.0.store.clone(), refused)
                .await;
        } else if unknown || (committed && gone_before_forwarding) {
            if gone_before_forwarding {
                // Else the request answers 503, and counts itself.
                committing.0.metrics.count(&upstream, Outcome::Failed);
            }
            committing.commit_later(gone);
        }
    });
    let result = answered.await.unwrap_or_else(|_| {
        Err(scrip_store::StoreError::Unavailable(
            "the commit of the request's decision ended unanswered".into(),
        ))
    });
    let _ = taken.send(());
    result
}

fn unavailable(proxy: &Proxy, name: &str) -> Response {
    proxy.0.metrics.count(name, Outcome::Failed);
    let mut r = error(
        StatusCode::SERVICE_UNAVAILABLE,
        "temporarily_unavailable",
        "scrip cannot record or authorize this request now; try again later",
    );
    r.headers_mut().insert(
        http::header::RETRY_AFTER,
        http::HeaderValue::from_static("5"),
    );
    r
}

fn decide(
    proxy: &Proxy,
    upstream: &Upstream,
    task: &scrip_store::TaskRecord,
    token: &scrip_verifier::AccessToken,
    action: &ActionName,
    method: &Method,
    path: &str,
) -> scrip_policy::Decision {
    let act = token.claims().act.as_ref();
    let chain = act.map(scrip_token::Actor::chain).unwrap_or_default();
    let issuers = act.map(scrip_token::Actor::issuers).unwrap_or_default();
    let context = RequestContext {
        stage: Stage::Proxy,
        purpose: task.purpose.clone(),
        environment: task.environment.clone(),
        delegation_depth: task.depth,
        delegation_chain: chain,
        delegation_issuers: issuers,
        now: now(),
        approved: token.claims().approval.is_some(),
        method: Some(method.as_str().to_owned()),
        path: Some(path.to_owned()),
        dpop_jkt: token.claims().cnf.as_ref().map(|c| c.jkt.clone()),
    };
    (proxy.0.policy)().decide(&DecisionRequest {
        agent: &task.agent,
        action,
        tool: &upstream.tool,
        context: &context,
    })
}

#[expect(
    clippy::too_many_arguments,
    reason = "the request's parts, as the handler took them apart"
)]
async fn forward(
    proxy: &Proxy,
    upstream: &Upstream,
    action: &ActionName,
    parts: http::request::Parts,
    body: Body,
    secret: &Arc<crate::SecretValue>,
    others: &[Arc<crate::SecretValue>],
    draft: Draft,
    standing: Arc<Standing>,
) -> Response {
    let name = upstream.name.as_str();
    let path = draft.path.clone();
    // With query injection both hold the secret: zeroed when dropped.
    let query = zeroize::Zeroizing::new(headers::upstream_query(
        parts.uri.query(),
        &upstream.injection,
        secret,
    ));
    let uri = zeroize::Zeroizing::new(format!(
        "{}{}{path}{}",
        upstream.origin,
        upstream.base_path,
        query.as_str()
    ));
    // Set once the request went to the upstream a second time: every record
    // of its outcome says so.
    let sent_again = AtomicBool::new(false);
    let failed = |status: StatusCode, code: &str, description: String, draft: &Draft| {
        proxy.0.metrics.count(name, Outcome::of_refusal(status));
        let mut r = draft.finish("proxy.response");
        r.status = Some(status.as_u16());
        r.reason = noting(
            Some(description.clone()),
            sent_again.load(Ordering::Relaxed),
        );
        proxy.commit_later(r);
        error(status, code, description)
    };
    let Ok(uri) = uri.parse::<http::Uri>() else {
        return failed(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the path or query is not a valid URI".into(),
            &draft,
        );
    };
    let headers = match headers::to_upstream(parts.headers, &upstream.injection, secret) {
        Ok(h) => h,
        Err(e) => {
            if crate::SECRET_LINES.allow("proxy: secrets not set or unusable") {
                tracing::error!(upstream = %name, error = %e, "proxy: secret unusable");
            }
            return failed(
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                format!("upstream `{name}`: its secret cannot be injected"),
                &draft,
            );
        }
    };
    let bytes_in = Arc::new(AtomicU64::new(0));
    // A request that may be sent again if its connection closes unanswered
    // (RFC 9110 §9.2.2): idempotent and without a body, so nothing of the
    // agent's is lost and the upstream may see it twice with the same effect.
    // Not a single-use token's: a step a person approved goes up once.
    let again = (idempotent(&parts.method)
        && http_body::Body::is_end_stream(&body)
        && !standing.single_use())
    .then(|| (parts.method.clone(), uri.clone(), headers.clone()));
    let mut out = Request::new(CountingBody::new(
        body,
        bytes_in.clone(),
        standing.clone(),
        upstream.read_timeout,
    ));
    *out.method_mut() = parts.method;
    *out.uri_mut() = uri;
    *out.headers_mut() = headers;

    let mut unanswered = Unanswered {
        proxy: proxy.clone(),
        upstream: name.to_owned(),
        record: Some({
            let mut r = draft.finish("proxy.response");
            r.reason = Some(
                "the agent went away before the upstream answered; the upstream may have acted on the request"
                    .into(),
            );
            r
        }),
        started: draft.started,
    };
    let mut answer = answer_to(&upstream.client, upstream, out, &bytes_in).await;
    if let (Ok(Err(e)), Some((method, uri, headers))) = (&answer, again)
        && closed_unanswered(e)
    {
        if standing.holds_now() {
            // An idle connection the upstream closed as it was reused (its
            // keep-alive ran out while the request went out): once more, on
            // a new connection, while the token still stands (checked now:
            // the upstream may have held the first attempt for a while).
            tracing::debug!(upstream = %name, error = %e, "proxy: connection closed unanswered; sending again");
            let mut out = Request::new(CountingBody::new(
                Body::empty(),
                bytes_in.clone(),
                standing.clone(),
                upstream.read_timeout,
            ));
            *out.method_mut() = method;
            *out.uri_mut() = uri;
            *out.headers_mut() = headers;
            sent_again.store(true, Ordering::Relaxed);
            // Should the agent go away while the second waits, its record
            // says the request went twice.
            if let Some(r) = unanswered.record.as_mut() {
                r.reason = noting(r.reason.take(), true);
            }
            answer = answer_to(&upstream.fresh, upstream, out, &bytes_in).await;
        } else {
            // Not sent again: its token no longer stands.
            unanswered.disarm();
            let why = standing.why_cut();
            return failed(
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                format!(
                    "upstream `{name}` failed: the connection failed before it answered; not sent again: {why}"
                ),
                &draft,
            );
        }
    }
    unanswered.disarm();
    let response = match answer {
        Ok(Ok(r)) => r,
        Ok(Err(_)) if standing.cut().is_some() => {
            // The agent's body stopped going up when its token no longer
            // stood (revoked, its task ended, or past its `exp` and the
            // leeway); the upstream may have acted on part of it.
            let why = standing.why_cut();
            proxy.0.metrics.count(name, Outcome::Denied);
            let mut r = draft.finish("proxy.response");
            r.status = Some(StatusCode::UNAUTHORIZED.as_u16());
            r.bytes_in = Some(bytes_in.load(Ordering::Relaxed));
            r.reason = Some(format!(
                "cut off while the request body was going up: {why}; the upstream may have acted on part of it"
            ));
            proxy.commit_later(r);
            return scrip_verifier::Rejection::from_error(name, &why).into_response::<Body>();
        }
        Ok(Err(e)) if crate::body::AgentBody::caused(&e) => {
            // A client's mistake is not a 5xx, nor the upstream's failure.
            return failed(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "the request body was cut short or malformed; the upstream may have acted on part of it".into(),
                &draft,
            );
        }
        Ok(Err(e)) => {
            let what = if e.is_connect() {
                "cannot connect to it"
            } else {
                "the connection failed before it answered"
            };
            if crate::UPSTREAM_LINES.allow("proxy: upstream failures") {
                tracing::warn!(upstream = %name, error = %e, "proxy: upstream failed");
            }
            return failed(
                StatusCode::BAD_GATEWAY,
                "bad_gateway",
                format!("upstream `{name}` failed: {what}"),
                &draft,
            );
        }
        Err(_) => {
            return failed(
                StatusCode::GATEWAY_TIMEOUT,
                "gateway_timeout",
                format!(
                    "upstream `{name}` did not answer within {} s",
                    upstream.read_timeout.as_secs()
                ),
                &draft,
            );
        }
    };
    let (mut head, incoming) = response.into_parts();
    // `Range` never goes up, so a part is the upstream's own doing; it could
    // cut the secret into pieces redaction does not know.
    if head.status == StatusCode::PARTIAL_CONTENT {
        return failed(
            StatusCode::BAD_GATEWAY,
            "bad_gateway",
            format!(
                "upstream `{name}` sent part of a representation, which cannot be checked for its secret"
            ),
            &draft,
        );
    }
    if encoded(&head.headers) {
        return failed(
            StatusCode::BAD_GATEWAY,
            "bad_gateway",
            format!(
                "upstream `{name}` sent an encoded body, which cannot be checked for its secret"
            ),
            &draft,
        );
    }
    if !headers::readable_charset(&head.headers) {
        return failed(
            StatusCode::BAD_GATEWAY,
            "bad_gateway",
            format!(
                "upstream `{name}` answered in a character set in which its secret cannot be looked for"
            ),
            &draft,
        );
    }
    let patterns = proxy
        .0
        .patterns
        .get(name, action.as_str(), &upstream.injection, secret, others);
    head.headers = headers::to_agent(std::mem::take(&mut head.headers), &patterns);
    // Nothing of the upstream's response head but its status and the
    // headers above: hyper keeps a non-standard reason phrase (`401 bad key
    // <the key>`) in the extensions and would write it to the agent.
    head.extensions.clear();
    let status = head.status;
    proxy.0.metrics.count(name, Outcome::Forwarded);

    let (store, pending) = (proxy.0.store.clone(), proxy.0.pending.clone());
    let cut = standing.clone();
    let sent_again = sent_again.load(Ordering::Relaxed);
    let on_done = Box::new(move |sent: u64, complete: bool| {
        let mut r = draft.finish("proxy.response");
        r.status = Some(status.as_u16());
        r.bytes_in = Some(bytes_in.load(Ordering::Relaxed));
        r.bytes_out = Some(sent);
        let incomplete = (!complete).then(|| match cut.cut() {
            Some(why) => format!("response cut off: {why}"),
            None => "response incomplete: the agent or the upstream went away".into(),
        });
        r.reason = noting(incomplete, sent_again);
        pending.commit(store, r);
    });
    let body = ResponseBody::new(
        incoming,
        Redactor::new(patterns),
        upstream.read_timeout,
        standing,
        on_done,
    );
    Response::from_parts(head, Body::new(body))
}

/// The reason a `proxy.response` record gives when its request went twice.
const SENT_AGAIN: &str =
    "sent a second time on a new connection: the first closed before the upstream answered";

/// A `proxy.response` record's `reason`, saying the request went twice when
/// it did.
fn noting(reason: Option<String>, sent_again: bool) -> Option<String> {
    match (reason, sent_again) {
        (Some(why), true) => Some(format!("{why} ({SENT_AGAIN})")),
        (None, true) => Some(SENT_AGAIN.into()),
        (reason, false) => reason,
    }
}

/// Sends `out` and waits for the upstream's answer. `read_timeout` is
/// silence: while the agent's body is still going up, the wait goes on;
/// once it stops moving, the upstream has that long to answer (a stall is
/// found within one to two `read_timeout`s).
async fn answer_to(
    client: &hyper_util::client::legacy::Client<crate::Https, CountingBody>,
    upstream: &Upstream,
    out: Request<CountingBody>,
    bytes_in: &AtomicU64,
) -> Result<
    Result<http::Response<hyper::body::Incoming>, hyper_util::client::legacy::Error>,
    tokio::time::error::Elapsed,
> {
    let request = client.request(out);
    tokio::pin!(request);
    let mut sent = bytes_in.load(Ordering::Relaxed);
    loop {
        match tokio::time::timeout(upstream.read_timeout, &mut request).await {
            Ok(r) => return Ok(r),
            Err(elapsed) => {
                let now_sent = bytes_in.load(Ordering::Relaxed);
                if now_sent == sent {
                    return Err(elapsed);
                }
                sent = now_sent;
            }
        }
    }
}

/// The methods RFC 9110 §9.2.2 lets a client send again on its own.
fn idempotent(method: &Method) -> bool {
    matches!(
        *method,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Whether `e` is a connection that closed (or was reset) after the request
/// went out and before any of the answer came back: what an upstream does
/// when its keep-alive ends as a pooled connection is reused. Not a
/// refused connection, a timeout, or an answer that broke off.
fn closed_unanswered(e: &hyper_util::client::legacy::Error) -> bool {
    if e.is_connect() {
        return false;
    }
    let mut source: Option<&(dyn std::error::Error + 'static)> = std::error::Error::source(e);
    while let Some(s) = source {
        if let Some(h) = s.downcast_ref::<hyper::Error>() {
            if h.is_incomplete_message() || h.is_canceled() {
                return true;
            }
        } else if let Some(io) = s.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
            );
        }
        source = s.source();
    }
    false
}

/// Whether a response body would reach the agent encoded, where it cannot
/// be checked for the secret. Every field line counts (RFC 9110 §5.3):
/// `identity` on one line and `gzip` on the next is a gzip body. A transfer
/// coding other than `chunked` (which hyper undoes) would pass still
/// encoded.
fn encoded(headers: &http::HeaderMap) -> bool {
    let codings = |name: http::header::HeaderName, plain: &'static [u8]| {
        headers
            .get_all(name)
            .iter()
            .flat_map(|v| v.as_bytes().split(|b| *b == b','))
            .any(|coding| !coding.trim_ascii().eq_ignore_ascii_case(plain))
    };
    codings(http::header::CONTENT_ENCODING, b"identity")
        || codings(http::header::TRANSFER_ENCODING, b"chunked")
}

#[cfg(test)]
mod tests {
    use super::{AUDIT_TEXT, encoded, for_audit, split};

    #[test]
    fn audit_text_is_cut_on_a_character() {
        assert_eq!(for_audit("/a/b"), "/a/b");
        let exact = "a".repeat(AUDIT_TEXT);
        assert_eq!(for_audit(&exact), exact);
        // A two-byte character straddles the limit: cut before it.
        let straddling = format!("{}é{}", "a".repeat(AUDIT_TEXT - 1), "b".repeat(10));
        let kept = for_audit(&straddling);
        assert_eq!(
            kept,
            format!(
                "{}… ({} bytes)",
                "a".repeat(AUDIT_TEXT - 1),
                straddling.len()
            )
        );
    }

    #[test]
    fn encodings() {
        let headers = |lines: &[(&str, &str)]| {
            let mut h = http::HeaderMap::new();
            for (name, value) in lines {
                h.append(
                    http::header::HeaderName::from_bytes(name.as_bytes()).unwrap(),
                    http::HeaderValue::from_str(value).unwrap(),
                );
            }
            h
        };
        assert!(!encoded(&headers(&[])));
        assert!(!encoded(&headers(&[
            ("content-encoding", "identity"),
            ("transfer-encoding", "chunked"),
        ])));
        assert!(!encoded(&headers(&[(
            "content-encoding",
            "Identity, identity"
        )])));
        assert!(encoded(&headers(&[("content-encoding", "gzip")])));
        assert!(encoded(&headers(&[("content-encoding", "identity, br")])));
        assert!(encoded(&headers(&[
            ("content-encoding", "identity"),
            ("content-encoding", "gzip"),
        ])));
        assert!(encoded(&headers(&[("transfer-encoding", "gzip, chunked")])));
    }

    #[test]
    fn splits() {
        assert_eq!(split("/proxy/legacy/a/b"), Some(("legacy", "/a/b")));
        assert_eq!(split("/proxy/legacy/"), Some(("legacy", "/")));
        assert_eq!(split("/proxy/legacy"), Some(("legacy", "/")));
        assert_eq!(split("/other/legacy"), None);
    }
}
