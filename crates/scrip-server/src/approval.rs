//! Human approval (SPEC §5), modelled on OpenID CIBA.
//!
//! When policy would allow a step only with a person's approval (a request
//! that Cedar denies with `context.approved == false` and allows with
//! `true`), the exchange issues nothing and answers `authorization_pending`
//! with an `auth_req_id`. A person authenticated by their own identity (an
//! `[[approvers]]` entry: a trusted issuer's subject, or a local uid
//! attested over the socket) sees exactly what is asked and approves or
//! denies. The agent polls the token endpoint with the CIBA grant; on
//! approval it receives one access token for exactly that step: single use,
//! `approved_token_ttl` seconds, naming the approval and the approver.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::Json;
use axum::body::Body;
use axum::extract::rejection::PathRejection;
use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use scrip_config::Approver;
use scrip_policy::{RequestContext, Stage};
use scrip_store::{
    Approval, ApprovalState, AuditEvent, MAX_PENDING_PER_ACTOR, MAX_PENDING_PER_AGENT,
    MAX_PENDING_PER_TASK, TaskRecord, TaskState, Write,
};
use scrip_token::{
    AccessClaims, ActionName, ActionSet, ApprovalClaim, TaskClaims, TokenKind, WorkloadIdentity,
    derived_expiry,
};
use serde_json::{Value, json};

use crate::error::OAuthError;
use crate::exchange::{Issued, decide, no_store};
use crate::form::Form;
use crate::introspect::caller_identity;
use crate::state::{AppState, Inner, now};

/// The CIBA grant type used to poll.
pub const CIBA_GRANT: &str = "urn:openid:params:grant-type:ciba";

/// Last poll per `auth_req_id`, for `slow_down`.
#[derive(Debug, Default)]
pub struct Polls(Mutex<PollTimes>);

/// The polls of the last interval, and the size at which to drop the older
/// ones.
#[derive(Debug, Default)]
struct PollTimes {
    last: HashMap<String, Instant>,
    trim_at: usize,
}

/// The polls [`Polls`] keeps before dropping those older than the interval;
/// past it even after that (a flood of ids in one interval), it forgets
/// them all: `slow_down` only spares the store a read.
const POLLS_KEPT: usize = 100_000;

impl Polls {
    /// Records a poll; `false` when it came sooner than `interval` after
    /// the previous one.
    fn allow(&self, id: &str, interval: Duration) -> bool {
        self.allow_at(id, interval, Instant::now())
    }

    /// [`Polls::allow`] at `now`. A poll older than `interval` no longer
    /// matters, so those are dropped; the map is walked for that only when
    /// it has doubled since the last walk, so a walk's cost is spread over
    /// the polls that grew it, however many ids there are.
    fn allow_at(&self, id: &str, interval: Duration, now: Instant) -> bool {
        let Ok(mut times) = self.0.lock() else {
            return true;
        };
        if times.last.len() >= times.trim_at.max(POLLS_KEPT) {
            times
                .last
                .retain(|_, at| now.saturating_duration_since(*at) < interval);
            if times.last.len() >= POLLS_KEPT {
                times.last.clear();
            }
            times.trim_at = times.last.len().saturating_mul(2);
        }
        match times.last.insert(id.to_owned(), now) {
            Some(prev) => now.saturating_duration_since(prev) >= interval,
            None => true,
        }
    }
}

/// Opens an approval for `actions` at `tool` in `task`, of which policy
/// allows `approvable` only with a person's approval: commits it with its
/// audit records, calls the webhook, and answers `authorization_pending`.
///
/// Asking again for a step that already waits, or that a person approved
/// and whose token nobody collected yet, answers that approval's
/// `auth_req_id`; a task may have [`MAX_PENDING_PER_TASK`] steps waiting,
/// the tasks one sub-agent acts in, in one tree, together
/// [`MAX_PENDING_PER_ACTOR`], and an agent's tasks together
/// [`MAX_PENDING_PER_AGENT`].
/// The store enforces each inside the commit, so concurrent requests (on
/// any replica) for one step open one approval between them.
pub(crate) async fn request(
    st: &Inner,
    task: &TaskRecord,
    tool: &str,
    (actions, approvable): (&ActionSet, &ActionSet),
    mut writes: Vec<Write>,
    base: &AuditEvent,
) -> Result<Response, OAuthError> {
    let asked = actions.to_string();
    // A conflict means another request of this task opened an approval
    // after the read below: read again, and find it or the cap. Every way
    // out but opening one ends here, with the decisions' records written.
    let answer = 'asked: {
        // Nobody can decide it until a restart names someone: it waits as
        // SPEC §5 says a step needing approval does (and can be decided
        // then), and the operator and the agent are told why nobody does.
        if st.config.approvers.is_empty() {
            static UNDECIDABLE: crate::logs::Budget = crate::logs::Budget::new(1);
            if UNDECIDABLE.allow("steps nobody can decide") {
                tracing::warn!(tool, actions = %asked, "a step waits for a person's approval, and no approvers are configured: nobody can decide it until `[[approvers]]` names someone");
            }
        }
        for _ in 0..3 {
            let now = now();
            // A step a person denied is not put to the approvers again for
            // `approval_ttl`, nor any step at that tool with an action that
            // needs approval and was in it: not a larger step, and not a
            // smaller one (asking again and again, a piece at a time, until
            // someone gives in is a known way to get a yes). Actions that
            // policy allows outright were in it only as company.
            let since = now.saturating_sub(st.config.approval_ttl);
            let denied = st.store.task_denials(&task.id, since).await?;
            let approvable_list = approvable.to_string();
            if let Some(d) = denied
                .iter()
                .find(|d| d.tool == tool && overlap(&d.actions, &approvable_list))
            {
                let at = d.decided_at.unwrap_or(now);
                break 'asked Err(OAuthError::access_denied(format!(
                    "a person denied `{}` at `{tool}` in this task {} s ago ({}); it is not asked again for {} s",
                    d.actions,
                    now.saturating_sub(at),
                    d.reason.as_deref().unwrap_or("no reason given"),
                    at.saturating_add(st.config.approval_ttl)
                        .saturating_sub(now)
                )));
            }
            // Only then a step that waits: one asked before a denial that
            // covers it is not handed back as still pending.
            let waiting = st.store.task_pending_approvals(&task.id, now).await?;
            if let Some(same) = waiting
                .iter()
                .find(|a| a.tool == tool && a.actions == asked)
            {
                // A later denial answers it (its answer, not its id, for a
                // step nobody may approve now).
                if let Some(d) = denied_since(st, same).await? {
                    let about = st.task_audit("approval.expired", task);
                    expire_answered(st, &about, &d, now).await;
                    break 'asked Err(answered_by(&d));
                }
                // The same step already waits for a person: asking again is the
                // same request, not another one for the approvers and the webhook.
                break 'asked Ok(pending(st, &same.id, same.expires_at.saturating_sub(now)));
            }
            // The same step approved and not collected (its asker lost the
            // answer to a poll, or stopped waiting): handed back to be
            // collected, not put to a person a second time. Not one whose
            // approver is no longer among the approvers: its collection is
            // refused, and the step is asked again.
            if let Some(same) = st
                .store
                .task_approved_approvals(&task.id, now)
                .await?
                .iter()
                .find(|a| a.tool == tool && a.actions == asked && approved_by_an_approver(st, a))
            {
                if let Some(d) = denied_since(st, same).await? {
                    break 'asked Err(answered_by(&d));
                }
                break 'asked Ok(collectable(
                    st,
                    &same.id,
                    same.expires_at.saturating_sub(now),
                ));
            }
            if waiting.len() >= MAX_PENDING_PER_TASK {
                break 'asked Err(OAuthError::invalid_request(format!(
                    "{MAX_PENDING_PER_TASK} steps of this task already wait for a person; wait for their decisions first"
                )));
            }
            // A sub-agent's tasks in this tree together (it may delegate
            // to itself, task after task): it cannot take all of the
            // agent's places below.
            if task.actor.is_some()
                && st.store.actor_pending_approvals(&task.id, now).await? >= MAX_PENDING_PER_ACTOR
            {
                break 'asked Err(OAuthError::invalid_request(format!(
                    "{MAX_PENDING_PER_ACTOR} steps of this sub-agent's tasks in this task's tree already wait for a person; wait for their decisions first"
                )));
            }
            // Every task of the agent together, sub-agents' included: one
            // agent cannot crowd the others' steps out of the approvers'
            // queue by starting task after task.
            if st
                .store
                .agent_pending_approvals(&task.agent.issuer, &task.agent.subject, now)
                .await?
                >= MAX_PENDING_PER_AGENT
            {
                break 'asked Err(OAuthError::invalid_request(format!(
                    "{MAX_PENDING_PER_AGENT} steps of this agent's tasks already wait for a person; wait for their decisions first"
                )));
            }
            let id = scrip_jose::random_id().map_err(|_| OAuthError::server_error())?;
            let approval = Approval {
                id: id.clone(),
                task_id: task.id.clone(),
                tool: tool.to_owned(),
                actions: asked.clone(),
                approvable: Some(approvable.to_string()),
                state: ApprovalState::Pending,
                created_at: now,
                expires_at: now.saturating_add(st.config.approval_ttl),
                decided_by: None,
                decided_at: None,
                reason: None,
                token_jti: None,
            };
            let mut a = base.clone();
            a.event = "approval.requested".into();
            a.tool = Some(tool.to_owned());
            a.actions = Some(asked.clone());
            a.reason = Some(format!("auth_req_id {id}"));
            let mut all = writes.clone();
            all.push(Write::InsertApproval(Box::new(approval.clone())));
            all.push(Write::Audit(Box::new(a)));
            // A denial committed since the read above (on any replica)
            // makes this a conflict: read again.
            all.push(Write::NoNewDenial {
                task: task.id.clone(),
                since,
                seen: denied.into_iter().map(|d| d.id).collect(),
            });
            // Nor for a task whose end was committed meanwhile (on any
            // replica, the exchange having read it from a cache a
            // notification behind): no one is asked about a step that
            // could never be taken.
            all.push(Write::TaskOpen {
                id: task.id.clone(),
            });
            // Read before the commit, and only for a webhook: the
            // announcement must not wait on it, and a step is not refused
            // for what only the webhook's receiver would have read.
            let described = match &st.webhook {
                None => Value::Null,
                Some(_) => match described_for_person(st, &approval, Some(task)).await {
                    Ok(v) => v,
                    Err(e) => {
                        tracing::warn!(error = %e.description, auth_req_id = %id, "could not read the agent's recent denials for the webhook; announced without them");
                        let mut v = describe(&approval, Some(task));
                        if let Some(obj) = v.as_object_mut() {
                            obj.insert("recent_denials".into(), Value::Null);
                            obj.insert("delegated_from".into(), Value::Null);
                        }
                        v
                    }
                },
            };
            // The commit and the call that announces it run on their own:
            // a request dropped meanwhile (its client gone, the server's
            // drain over) must not leave a step stored that no approver is
            // told of, since asking again finds it waiting and asks no one.
            let announce = {
                let (store, webhook) = (st.store.clone(), st.webhook.clone());
                // Counted from now: a stop waits for the announcement.
                let counted = webhook.as_ref().map(|w| w.announcing());
                let (id, described) = (id.clone(), described);
                let (task_id, tool, asked) = (task.id.clone(), tool.to_owned(), asked.clone());
                let ttl = Duration::from_secs(st.config.approval_ttl);
                async move {
                    match store.commit(all).await {
                        Ok(()) => {}
                        Err(e @ scrip_store::StoreError::Conflict(_)) => return Err(e),
                        // The store went away after the commit was sent: it
                        // may have taken effect, and then it is announced.
                        Err(e @ scrip_store::StoreError::Unavailable(_)) => {
                            if let Ok(Some(_)) = store.approval(&id).await {
                                tracing::warn!(error = %e, auth_req_id = %id, "the approval's commit failed but it was stored");
                            } else {
                                // Not known yet (the store still away, or
                                // the commit not seen yet): the agent hears
                                // the failure, and the step is announced if
                                // it turns out stored.
                                if let Some(webhook) = webhook {
                                    tokio::spawn(announce_once_seen(
                                        store,
                                        webhook,
                                        (id, described),
                                        ttl,
                                        LOOK_FOR,
                                    ));
                                }
                                return Err(e);
                            }
                        }
                        Err(e) => return Err(e),
                    }
                    tracing::info!(auth_req_id = %id, task = %task_id, tool, actions = %asked, "approval requested");
                    if let Some(webhook) = webhook {
                        webhook.send(described);
                    }
                    drop(counted);
                    Ok(())
                }
            };
            match tokio::spawn(announce).await {
                Ok(Ok(())) => return Ok(pending(st, &id, st.config.approval_ttl)),
                Ok(Err(scrip_store::StoreError::Conflict(_))) => match still_open(st, &task.id)
                    .await
                {
                    Ok(true) => continue,
                    Ok(false) => {
                        // Refused as the exchange refuses a task it knows
                        // has ended, on the record with the decisions.
                        let e = OAuthError::invalid_request("subject_token: the task has ended");
                        let mut a = base.clone();
                        a.event = "token.refused".into();
                        a.decision = Some("deny".into());
                        a.tool = Some(tool.to_owned());
                        a.actions = Some(asked.clone());
                        a.reason = Some(e.description.clone());
                        writes.push(Write::Audit(Box::new(a)));
                        break 'asked Err(e);
                    }
                    Err(e) => break 'asked Err(e),
                },
                Ok(Err(e)) => return Err(e.into()),
                Err(e) => {
                    tracing::error!(error = %e, auth_req_id = %id, "the approval's commit did not finish");
                    return Err(OAuthError::server_error());
                }
            }
        }
        // Three conflicts in a row: approvals of this task are being opened and
        // decided faster than this request can read them.
        Err(OAuthError::temporarily_unavailable())
    };
    if !writes.is_empty() {
        st.store.commit(writes).await?;
    }
    answer
}

/// Whether task `id` is still open, as the store has it now.
async fn still_open(st: &Inner, id: &str) -> Result<bool, OAuthError> {
    Ok(st
        .store
        .task(id)
        .await?
        .is_some_and(|t| t.state(now()) == TaskState::Active))
}

/// `authorization_pending` for the approval `id`, which waits `expires_in`
/// more seconds.
fn pending(st: &Inner, id: &str, expires_in: u64) -> Response {
    pending_saying(
        st,
        id,
        expires_in,
        if st.config.approvers.is_empty() {
            "this step needs a person's approval, and no approvers are configured: nobody can decide it until `[[approvers]]` names someone; poll with the auth_req_id"
        } else {
            "this step needs a person's approval; poll with the auth_req_id"
        },
        false,
    )
}

/// [`pending`] for a step a person approved whose token is not collected:
/// polling collects it.
fn collectable(st: &Inner, id: &str, expires_in: u64) -> Response {
    pending_saying(
        st,
        id,
        expires_in,
        "a person approved this step; poll with the auth_req_id to collect its token",
        true,
    )
}

fn pending_saying(
    st: &Inner,
    id: &str,
    expires_in: u64,
    description: &str,
    approved: bool,
) -> Response {
    let mut body = json!({
        "error": "authorization_pending",
        "error_description": description,
        "auth_req_id": id,
        "interval": st.config.approval_poll_interval,
        "expires_in": expires_in,
    });
    if approved && let Some(body) = body.as_object_mut() {
        body.insert("approved".into(), json!(true));
    }
    let mut response = (StatusCode::BAD_REQUEST, Json(body)).into_response();
    let headers = response.headers_mut();
    headers.insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-store"),
    );
    headers.insert(
        axum::http::header::PRAGMA,
        axum::http::HeaderValue::from_static("no-cache"),
    );
    response
}

/// The most of an agent's recent denials at a tool shown beside its step.
const SHOWN_DENIALS: u32 = 5;

/// What a person sees about an approval waiting for them: [`describe`],
/// and beside it `recent_denials`, the latest denials of the same agent at
/// the same tool, in any of its tasks, within `approval_ttl`. A denial
/// binds the task it was asked in; asking again from another task (or a
/// sub-task) until someone gives in is a known way to get a yes, and the
/// person deciding sees that it was asked, and refused, before.
async fn described_for_person(
    st: &Inner,
    a: &Approval,
    task: Option<&TaskRecord>,
) -> Result<Value, OAuthError> {
    let mut v = describe(a, task);
    if let (Some(t), Some(obj)) = (task, v.as_object_mut()) {
        obj.insert(
            "recent_denials".into(),
            recent_denials(st, &t.agent, &a.tool, &a.id).await?,
        );
        obj.insert(
            "delegated_from".into(),
            delegated_from(st, t, &mut HashMap::new()).await?,
        );
    }
    Ok(v)
}

/// What [`delegated_from`] keeps of a task it read: its purpose and its
/// parent (`None` for a task the store does not hold).
type Ancestor = Option<(String, Option<String>)>;

/// The tasks a delegated step's task came from, root first, each with the
/// purpose it was started or delegated with (`[]` for a root task's step).
/// The purpose a step's own task shows is the last delegating agent's
/// words, and may say anything; what the root's agent said the work is
/// for, and each delegation since, is shown beside it. A task the store
/// does not hold is shown with a `null` purpose, and ends the walk, which
/// goes no further up than the task's depth. `known` keeps what was read
/// for the other steps of one listing.
async fn delegated_from(
    st: &Inner,
    task: &TaskRecord,
    known: &mut HashMap<String, Ancestor>,
) -> Result<Value, OAuthError> {
    let mut out = Vec::new();
    let mut next = task.parent.clone();
    for _ in 0..task.depth.min(scrip_config::MAX_DELEGATION_DEPTH) {
        let Some(id) = next.take() else { break };
        let ancestor = match known.get(&id) {
            Some(a) => a.clone(),
            None => {
                let read = st.store.task(&id).await?.map(|t| (t.purpose, t.parent));
                known.insert(id.clone(), read.clone());
                read
            }
        };
        let purpose = ancestor.map(|(purpose, parent)| {
            next = parent;
            purpose
        });
        out.push(json!({"task": id, "purpose": purpose}));
    }
    out.reverse();
    Ok(Value::Array(out))
}

/// [`described_for_person`]'s `recent_denials`, other than `except`.
async fn recent_denials(
    st: &Inner,
    agent: &WorkloadIdentity,
    tool: &str,
    except: &str,
) -> Result<Value, OAuthError> {
    let since = now().saturating_sub(st.config.approval_ttl);
    let denials = st
        .store
        .agent_denials(
            &agent.issuer,
            &agent.subject,
            tool,
            since,
            SHOWN_DENIALS.saturating_add(1),
        )
        .await?;
    let mut shown = Vec::new();
    for d in denials
        .iter()
        .filter(|d| d.id != except)
        .take(SHOWN_DENIALS as usize)
    {
        // Who was refused: the agent itself, or a sub-agent acting for it
        // (its issuer too, as everywhere a person reads an identity).
        let acting = st
            .store
            .task(&d.task_id)
            .await?
            .and_then(|t| t.actor)
            .map(|a| json!({"issuer": a.iss, "subject": a.sub}));
        shown.push(json!({
            "auth_req_id": d.id,
            "task": d.task_id,
            "actor": acting,
            "actions": d.actions,
            "decided_by": d.decided_by,
            "decided_at": d.decided_at,
            "reason": d.reason,
        }));
    }
    Ok(Value::Array(shown))
}

/// What a person sees about an approval.
fn describe(a: &Approval, task: Option<&TaskRecord>) -> Value {
    let mut v = json!({
        "auth_req_id": a.id,
        "state": a.state.as_str(),
        "tool": a.tool,
        "actions": a.actions,
        "task": a.task_id,
        "created_at": a.created_at,
        "expires_at": a.expires_at,
    });
    if let (Some(t), Some(obj)) = (task, v.as_object_mut()) {
        obj.insert(
            "agent".into(),
            json!({"issuer": t.agent.issuer, "subject": t.agent.subject}),
        );
        obj.insert("purpose".into(), json!(t.purpose));
        obj.insert("environment".into(), json!(t.environment));
        obj.insert("delegation_depth".into(), json!(t.depth));
        obj.insert(
            "delegation_chain".into(),
            json!(
                t.actor
                    .as_ref()
                    .map(scrip_token::Actor::chain)
                    .unwrap_or_default()
            ),
        );
        // With their issuers, as the agent's: two issuers may name
        // different workloads alike, and the person must see which acts.
        let actors: Vec<Value> = t
            .actor
            .iter()
            .flat_map(|a| a.actors())
            .map(|a| json!({"issuer": a.iss, "subject": a.sub}))
            .collect();
        obj.insert("delegation_actors".into(), Value::Array(actors));
    }
    v
}

/// How often [`announce_once_seen`] looks for its approval at first; it
/// looks half as often after each read the store fails, down to once every
/// [`LOOK_AT_MOST`].
const LOOK_AGAIN: Duration = Duration::from_secs(1);

/// The longest wait between two looks of [`announce_once_seen`].
const LOOK_AT_MOST: Duration = Duration::from_secs(30);

/// How long [`announce_once_seen`] goes on looking for an approval the
/// store says it does not hold: longer than a commit sent can take to land
/// (a database's statement and lock timeouts, 5 s each, past the writer's
/// own 5 s).
const LOOK_FOR: Duration = Duration::from_secs(30);

/// The most approvals looked for at once: past it, one is not looked for
/// (and a warning says so).
const LOOKING_AT_MOST: usize = 256;

/// How many approvals [`announce_once_seen`] is looking for.
static LOOKING: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);

/// After a commit of unknown outcome whose approval could not be read back
/// at once: looks for it until it expires (`ttl`), and announces it if it
/// turns out stored and still waits for a person, since an agent asking
/// again would find it waiting and ask no one. The store saying it does not
/// hold it for `look_for` ([`LOOK_FOR`]) ends the wait (the commit did not
/// take effect). Whether it was announced.
async fn announce_once_seen(
    store: std::sync::Arc<dyn scrip_store::Store>,
    webhook: std::sync::Arc<crate::state::Webhook>,
    (id, described): (String, Value),
    ttl: Duration,
    look_for: Duration,
) -> bool {
    use std::sync::atomic::Ordering;
    struct Looking;
    impl Drop for Looking {
        fn drop(&mut self) {
            LOOKING.fetch_sub(1, Ordering::SeqCst);
        }
    }
    if LOOKING.fetch_add(1, Ordering::SeqCst) >= LOOKING_AT_MOST {
        LOOKING.fetch_sub(1, Ordering::SeqCst);
        static BUSY: crate::logs::Budget = crate::logs::Budget::new(1);
        if BUSY.allow("approvals not looked for") {
            tracing::warn!(auth_req_id = %id, "{LOOKING_AT_MOST} approvals whose commits failed are being looked for already: this one is not announced if it was stored (`scrip approvals` lists it)");
        }
        return false;
    }
    let _looking = Looking;
    let start = tokio::time::Instant::now();
    let until = start + ttl;
    let mut wait = LOOK_AGAIN;
    while tokio::time::Instant::now() < until {
        tokio::time::sleep(wait).await;
        match store.approval(&id).await {
            Ok(Some(a)) if a.state == ApprovalState::Pending && a.expires_at > now() => {
                tracing::warn!(auth_req_id = %id, "an approval whose commit failed was stored after all; announcing it");
                webhook.send(described);
                return true;
            }
            // Decided or expired meanwhile: nobody is to be asked.
            Ok(Some(_)) => return false,
            Ok(None) if start.elapsed() >= look_for => return false,
            Ok(None) => wait = LOOK_AGAIN,
            Err(_) => wait = (wait * 2).min(LOOK_AT_MOST),
        }
    }
    tracing::warn!(auth_req_id = %id, "an approval whose commit failed was not seen stored before it expired, and was not announced; `scrip approvals` lists it if it was stored");
    false
}

/// POSTs the pending approval to the webhook, retrying with backoff what
/// may succeed later (no answer, 408, 429, a 5xx): at least once, so each
/// call carries the step's `auth_req_id` as its `Idempotency-Key`, by which
/// a receiver tells a second delivery of a step from a new step.
pub(crate) async fn notify(http: reqwest::Client, url: String, body: Value) {
    // A webhook that fails fails every call: its lines within a budget.
    static FAILED: crate::logs::Budget = crate::logs::Budget::new(10);
    let key = body
        .get("auth_req_id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_owned();
    let mut delay = Duration::from_millis(500);
    for attempt in 1..=4 {
        match http
            .post(&url)
            .header("idempotency-key", &key)
            .json(&body)
            .send()
            .await
        {
            Ok(r) if r.status().is_success() => return,
            Ok(r) if !retried(r.status()) => {
                if FAILED.allow("approval webhook") {
                    tracing::warn!(status = %r.status(), "approval webhook refused the step; not sent again");
                }
                return;
            }
            Ok(r) if FAILED.allow("approval webhook") => {
                tracing::warn!(attempt, status = %r.status(), "approval webhook refused");
            }
            // Without the URL: a webhook's secret is often in its path
            // (Slack, Teams), and reqwest's errors end with the whole URL.
            Err(e) if FAILED.allow("approval webhook") => {
                tracing::warn!(attempt, error = %e.without_url(), "approval webhook failed");
            }
            Ok(_) | Err(_) => {}
        }
        tokio::time::sleep(delay).await;
        delay *= 2;
    }
    if FAILED.allow("approval webhook") {
        tracing::error!("approval webhook gave up after 4 attempts");
    }
}

/// Whether a webhook's answer may be different later: a timeout, too many
/// requests, or the receiver's own failure. Any other refusal (a 404, a
/// 401) would be the same each time.
fn retried(status: reqwest::StatusCode) -> bool {
    status.is_server_error()
        || status == reqwest::StatusCode::REQUEST_TIMEOUT
        || status == reqwest::StatusCode::TOO_MANY_REQUESTS
}

/// Said of a step, pending or approved, whose task has ended.
const TASK_ENDED: &str = "the task that asked has ended; nothing will be issued for this step";

/// `grant_type=urn:openid:params:grant-type:ciba`: the agent polls.
pub(crate) async fn poll(
    st: &Inner,
    form: &Form,
    peer: SocketAddr,
    binding: Option<&crate::exchange::Binding>,
) -> Result<Response, OAuthError> {
    let id = form.require("auth_req_id")?;
    let unknown =
        || OAuthError::invalid_grant("auth_req_id is unknown, already used, or not this task's");
    if !plausible_id(id) {
        return Err(unknown());
    }
    // The poller proves it holds the task: nobody polls someone else's request.
    let subject = form.get("subject_token").ok_or_else(|| {
        OAuthError::invalid_request(
            "parameter `subject_token` is required: the task token that asked",
        )
    })?;
    let claims = st
        .verify_own::<TaskClaims>(subject, TokenKind::Task)
        .map_err(|e| OAuthError::invalid_request(format!("subject_token: {e}")))?
        .claims;
    let approval = st.store.approval(id).await?.ok_or_else(unknown)?;
    if approval.task_id != claims.txn {
        return Err(unknown());
    }
    // The poller is authenticated: its proof may now be recorded (spent).
    // An unbound task's proof matters only to the token an approved step's
    // collection binds to its key: spent only then, so that polls which
    // collect nothing write nothing (a proof by a fresh key at each poll
    // would otherwise cost a commit, and a place in the replay memory,
    // a request). A bound task's is spent at every poll (below).
    let binding =
        binding.filter(|_| claims.cnf.is_some() || approval.state == ApprovalState::Approved);
    let cnf = crate::exchange::check_task_binding(claims.cnf.as_ref(), binding)
        .and_then(|()| binding.map(|b| b.spend(st)).transpose());
    if let Err(e) = cnf {
        // A bound task's token without its key, or with a proof already
        // used, is most likely stolen: refused, and on the record, as at
        // the exchange.
        let mut a = st.claims_audit("token.refused", &claims);
        a.decision = Some("deny".into());
        a.tool = Some(approval.tool.clone());
        a.actions = Some(approval.actions.clone());
        a.client = Some(peer.to_string());
        a.reason = Some(format!("auth_req_id {id}: {}", e.description));
        return Err(st.refusal_recorded(a, e).await);
    }
    let cnf = cnf?;
    if let Some(b) = binding {
        // Recorded for every replica before the step is looked at: a poll
        // replayed elsewhere must not collect the approved step's token, nor
        // learn of the step.
        match st.store.commit(vec![b.spent()]).await {
            Ok(()) => {}
            Err(scrip_store::StoreError::ProofUsed) => {
                let mut a = st.claims_audit("token.refused", &claims);
                a.tool = Some(approval.tool.clone());
                a.actions = Some(approval.actions.clone());
                a.client = Some(peer.to_string());
                let about = format!("auth_req_id {id}: ");
                return Err(crate::exchange::refuse_replayed(st, Vec::new(), a, &about).await);
            }
            Err(e) => return Err(e.into()),
        }
    }
    let now = now();
    match approval.state {
        // CIBA Core §11: past `expires_in` an undecided or approved
        // request is gone: an approval is redeemed within it or not at all.
        // A denial keeps answering `access_denied`, with its reason.
        ApprovalState::Approved if now >= approval.expires_at => {
            Err(OAuthError::expired_token(UNCOLLECTED))
        }
        ApprovalState::Pending if now >= approval.expires_at => {
            Err(OAuthError::expired_token(UNDECIDED))
        }
        // Expired before its time because its task ended: said so, as
        // while it waited.
        ApprovalState::Expired
            if now < approval.expires_at
                && crate::exchange::active_task(st, &claims, now)
                    .await?
                    .is_none() =>
        {
            let asked = crate::exchange::Asked::step(&approval);
            let e = OAuthError::invalid_grant(TASK_ENDED);
            Err(crate::exchange::refuse_ended(st, &claims, "token.refused", asked, peer, e).await)
        }
        // Taken out of the waiting steps early by a denial that answers it
        // (`expire_answered`): until its time it answers as a waiting step
        // that denial answers would.
        ApprovalState::Expired if approval.decided_by.is_none() && now < approval.expires_at => {
            match denied_since(st, &approval).await? {
                Some(d) => Err(answered_by(&d)),
                None => Err(OAuthError::expired_token(UNDECIDED)),
            }
        }
        ApprovalState::Expired if approval.decided_by.is_some() => {
            Err(OAuthError::expired_token(UNCOLLECTED))
        }
        ApprovalState::Expired => Err(OAuthError::expired_token(UNDECIDED)),
        // Nobody can approve a step of an ended task: say so, rather than
        // have the agent wait out the approval.
        ApprovalState::Pending
            if crate::exchange::active_task(st, &claims, now)
                .await?
                .is_none() =>
        {
            let asked = crate::exchange::Asked::step(&approval);
            let e = OAuthError::invalid_grant(TASK_ENDED);
            Err(crate::exchange::refuse_ended(st, &claims, "token.refused", asked, peer, e).await)
        }
        ApprovalState::Pending => {
            if !st
                .polls
                .allow(id, Duration::from_secs(st.config.approval_poll_interval))
            {
                return Err(OAuthError::slow_down());
            }
            match denied_since(st, &approval).await? {
                Some(d) => {
                    // Still waiting though answered: the denial's own
                    // tidying did not reach it (its commit failed, or its
                    // answer was lost and the person asked again).
                    let about = st.claims_audit("approval.expired", &claims);
                    expire_answered(st, &about, &d, now).await;
                    Err(answered_by(&d))
                }
                None => Err(OAuthError::authorization_pending()),
            }
        }
        ApprovalState::Denied => Err(OAuthError::access_denied(format!(
            "a person denied this step: {}",
            approval.reason.as_deref().unwrap_or("no reason given")
        ))),
        ApprovalState::Used => Err(unknown()),
        ApprovalState::Approved => collect(st, &claims, &approval, peer, cnf).await,
    }
}

/// The token of an approved step, unless a denial answers the step first.
/// Two people deciding at once (each passed the check in `decide_endpoint`
/// before the other committed), or a denial after the approval: until its
/// token is collected, a denial that answers the step wins, and the step
/// becomes denied. A denial committed after the denials were read (by a
/// person, on any replica) fails the token's commit, and they are read
/// again.
async fn collect(
    st: &Inner,
    claims: &TaskClaims,
    approval: &Approval,
    peer: SocketAddr,
    cnf: Option<scrip_token::Confirmation>,
) -> Result<Response, OAuthError> {
    for _ in 0..3 {
        let denials = st
            .store
            .task_denials(&approval.task_id, answers_from(st, approval))
            .await?;
        if let Some(d) = answering(approval, &denials) {
            return Err(overruled(st, claims, approval, d, peer).await?);
        }
        let seen = denials.into_iter().map(|d| d.id).collect();
        if let Some(issued) = issue(st, claims, approval, peer, cnf.clone(), seen).await? {
            return Ok(issued);
        }
    }
    // People keep denying other steps of the task: the agent polls again
    // at the interval (not `slow_down`, which would slow it for good).
    Err(OAuthError::authorization_pending_for(
        "other steps of this task were being denied while this one's token was issued; nothing was issued; poll again after the interval",
    ))
}

/// An approved step whose token was not collected, answered by the denial
/// `d`: made denied, on the record; the answer to give its poll.
async fn overruled(
    st: &Inner,
    claims: &TaskClaims,
    approval: &Approval,
    d: &Approval,
    peer: SocketAddr,
) -> Result<OAuthError, OAuthError> {
    let reason = format!(
        "approved by {}, then answered by the denial of `{}` at `{}` ({}) before its token was collected: {}",
        approval.decided_by.as_deref().unwrap_or("someone"),
        d.actions,
        d.tool,
        d.id,
        d.reason.as_deref().unwrap_or("no reason given")
    );
    let mut a = st.claims_audit("approval.denied", claims);
    a.decision = Some("deny".into());
    a.tool = Some(approval.tool.clone());
    a.actions = Some(approval.actions.clone());
    a.client = Some(peer.to_string());
    a.reason = Some(format!("auth_req_id {}: {reason}", approval.id));
    let committed = st
        .store
        .commit(vec![
            Write::UpdateApproval {
                id: approval.id.clone(),
                from: ApprovalState::Approved,
                to: ApprovalState::Denied,
                by: d.decided_by.clone(),
                at: now(),
                reason: Some(reason.clone()),
                token_jti: None,
            },
            Write::Audit(Box::new(a)),
        ])
        .await;
    match committed {
        Ok(()) => {
            // Now a denial itself: the waiting steps it answers stop waiting.
            let denied = Approval {
                state: ApprovalState::Denied,
                decided_by: d.decided_by.clone(),
                decided_at: Some(now()),
                reason: Some(reason.clone()),
                ..approval.clone()
            };
            let about = st.claims_audit("approval.expired", claims);
            expire_answered(st, &about, &denied, now()).await;
            Ok(OAuthError::access_denied(format!(
                "a person denied this step: {reason}"
            )))
        }
        // Collected, or overruled, by another poll meanwhile.
        Err(scrip_store::StoreError::Conflict(_)) => Ok(OAuthError::invalid_grant(
            "auth_req_id is unknown, already used, or not this task's",
        )),
        Err(e) => Err(e.into()),
    }
}

/// Issues the single token of an approved step.
async fn issue(
    st: &Inner,
    claims: &TaskClaims,
    approval: &Approval,
    peer: SocketAddr,
    cnf: Option<scrip_token::Confirmation>,
    seen: Vec<String>,
) -> Result<Option<Response>, OAuthError> {
    let now = now();
    let Some(task) = crate::exchange::active_task(st, claims, now).await? else {
        let asked = crate::exchange::Asked::step(approval);
        let e = OAuthError::invalid_grant(TASK_ENDED);
        return Err(
            crate::exchange::refuse_ended(st, claims, "token.refused", asked, peer, e).await,
        );
    };
    let mut base = st.task_audit("approval.used", &task);
    base.tool = Some(approval.tool.clone());
    base.actions = Some(approval.actions.clone());
    base.client = Some(peer.to_string());
    // An approved step refused at collection is on the record, with why.
    let refuse = |e: OAuthError| {
        let mut a = base.clone();
        a.decision = Some("deny".into());
        a.reason = Some(format!("auth_req_id {}: {}", approval.id, e.description));
        async move { Err::<Option<Response>, OAuthError>(st.refusal_recorded(a, e).await) }
    };
    let Some(tool) = st.config.tool(&approval.tool) else {
        return refuse(OAuthError::invalid_target(
            "the approved tool is no longer configured",
        ))
        .await;
    };
    let actions = ActionSet::parse(&approval.actions).map_err(|_| OAuthError::server_error())?;
    let approver = approval.decided_by.clone().unwrap_or_default();
    // A person no longer among the approvers (removed, perhaps compromised,
    // since they approved) approves nothing more: the step is asked again.
    if !approved_by_an_approver(st, approval) {
        return refuse(OAuthError::access_denied(format!(
            "`{approver}`, who approved this step, is no longer an approver; ask for the step again"
        )))
        .await;
    }
    // The policy is asked again, now with the approval: it may have changed.
    let ctx = RequestContext {
        stage: Stage::Token,
        purpose: task.purpose.clone(),
        environment: task.environment.clone(),
        delegation_depth: task.depth,
        delegation_chain: task
            .actor
            .as_ref()
            .map(scrip_token::Actor::chain)
            .unwrap_or_default(),
        delegation_issuers: task
            .actor
            .as_ref()
            .map(scrip_token::Actor::issuers)
            .unwrap_or_default(),
        now,
        approved: true,
        method: None,
        path: None,
        dpop_jkt: cnf.as_ref().map(|c| c.jkt.clone()),
    };
    let mut policies = Vec::new();
    // One policy set decides every action, even across a reload.
    let policy = st.policy();
    for action in actions.iter() {
        let d = decide(&policy, &task.agent, tool, action, &ctx);
        if !d.allowed {
            let mut a = base.clone();
            a.event = "token.decision".into();
            a.decision = Some("deny".into());
            a.policies = d.policies;
            a.reason = Some(d.reason);
            st.store.commit(vec![Write::Audit(Box::new(a))]).await?;
            return Err(OAuthError::access_denied(
                "policy no longer allows this step, even approved",
            ));
        }
        policies.extend(d.policies);
    }
    let jti = scrip_jose::random_id().map_err(|_| OAuthError::server_error())?;
    let exp = derived_expiry(now, st.config.approved_token_ttl, task.expires_at);
    let access = AccessClaims {
        iss: st.issuer.clone(),
        sub: task.agent.subject.clone(),
        agent_iss: Some(task.agent.issuer.clone()),
        aud: tool.name.to_string(),
        iat: now,
        exp,
        jti: jti.clone(),
        client_id: task
            .actor
            .as_ref()
            .map_or_else(|| task.agent.subject.clone(), |a| a.sub.clone()),
        scope: actions.to_string(),
        txn: task.id.clone(),
        act: task.actor.clone(),
        approval: Some(ApprovalClaim {
            id: approval.id.clone(),
            approver: approver.clone(),
            single_use: true,
        }),
        cnf,
    };
    let token = st.sign(TokenKind::Access, &access)?;
    let mut a = base;
    a.decision = Some("allow".into());
    a.policies = policies;
    a.jti = Some(jti.clone());
    a.reason = Some(format!(
        "auth_req_id {} approved by {approver}{}",
        approval.id,
        access
            .cnf
            .as_ref()
            .map(|c| format!(", bound to DPoP key {}", c.jkt))
            .unwrap_or_default()
    ));
    // Two polls racing for one approval: only the one whose update applies
    // commits (its audit record with it) and hands out the token; nothing
    // once the task's end is committed.
    match st
        .store
        .commit(vec![
            Write::UpdateApproval {
                id: approval.id.clone(),
                from: ApprovalState::Approved,
                to: ApprovalState::Used,
                by: None,
                at: now,
                reason: None,
                token_jti: Some(jti.clone()),
            },
            Write::Audit(Box::new(a)),
            Write::TaskOpen {
                id: task.id.clone(),
            },
            Write::NoNewDenial {
                task: task.id.clone(),
                since: answers_from(st, approval),
                seen,
            },
        ])
        .await
    {
        Ok(()) => {}
        Err(scrip_store::StoreError::Conflict(_)) => {
            // Collected or overruled by another poll meanwhile, the task
            // ended, or a person denied a step since the denials were read.
            if !still_open(st, &task.id).await? {
                return Err(OAuthError::invalid_grant(TASK_ENDED));
            }
            return match st.store.approval(&approval.id).await? {
                Some(a) if a.state == ApprovalState::Approved => Ok(None),
                _ => Err(OAuthError::invalid_grant(
                    "auth_req_id is unknown, already used, or not this task's",
                )),
            };
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(auth_req_id = %approval.id, jti = %jti, approver = %approver, "approved step issued");
    Ok(Some(Issued::access_token(
        &token,
        exp.saturating_sub(now),
        &access.scope,
        access.cnf.is_some(),
    )))
}

/// Whether `actor` signs in as an approver whom the tree's (root) agent
/// does not sign in as already: every approver, but the one the agent's
/// own identity signs in as (by one of their identities, or by the uid
/// scrip's attestation gave it). (Not [`started_by`], which leans to
/// counting someone as a task's starter: the safe side when it refuses an
/// approval, not when it lets a token be handed over.)
pub(crate) fn approver_outside(st: &Inner, parent: &TaskRecord, actor: &WorkloadIdentity) -> bool {
    approver(st, actor)
        .is_some_and(|a| approver(st, &parent.agent).is_none_or(|own| own.name != a.name))
}

/// Which approver, if any, this identity is.
fn approver<'a>(st: &'a Inner, who: &WorkloadIdentity) -> Option<&'a Approver> {
    let local_issuer = crate::attest::local_issuer(st);
    st.config.approvers.iter().find(|a| {
        let by_identity = a.issuer.as_deref() == Some(who.issuer.as_str())
            && a.subject.as_deref() == Some(who.subject.as_str());
        // Only scrip's own attestation makes a `Local` identity: the uid is
        // the kernel's word for who connected to the socket.
        let by_uid = a.uid.is_some_and(|uid| {
            who.kind == scrip_token::IdentityKind::Local
                && who.issuer == local_issuer
                && who.claims.get(LOCAL_UID).map(String::as_str) == Some(uid.to_string().as_str())
        });
        by_identity || by_uid
    })
}

async fn authenticate(
    st: &Inner,
    headers: &HeaderMap,
) -> Result<(WorkloadIdentity, Approver), OAuthError> {
    let who = caller_identity(st, headers).await?;
    let Some(a) = approver(st, &who) else {
        return Err(not_an_approver(&who));
    };
    Ok((who, a.clone()))
}

fn not_an_approver(who: &WorkloadIdentity) -> OAuthError {
    OAuthError::forbidden(format!(
        "`{}` is not an approver; approvers are listed in the configuration's [[approvers]]",
        who.subject
    ))
}

/// Records a decision on a waiting step refused to `who` (not an approver,
/// or the step's own agent under separation of duties): an agent trying to
/// approve its own step is what a security team must see. Returns `err` to
/// answer, or the store's error when the record could not be written.
async fn refuse_decision(
    st: &Inner,
    who: &WorkloadIdentity,
    approval: &Approval,
    approve: bool,
    peer: SocketAddr,
    err: OAuthError,
) -> OAuthError {
    let mut a = st.audit("approval.refused");
    a.decision = Some("deny".into());
    a.agent_iss = Some(who.issuer.clone());
    a.agent_sub = Some(who.subject.clone());
    a.task_id = Some(approval.task_id.clone());
    a.tool = Some(approval.tool.clone());
    a.actions = Some(approval.actions.clone());
    a.client = Some(peer.to_string());
    a.reason = Some(format!(
        "{} auth_req_id {}: {}",
        if approve { "approving" } else { "denying" },
        approval.id,
        err.description
    ));
    st.refusal_recorded(a, err).await
}

/// The most pending approvals `GET /approvals` lists, the oldest first.
const LISTED: u32 = 1000;

/// `GET /approvals`: the pending approvals, with everything asked, and
/// whether more wait than are listed.
pub async fn list_endpoint(State(state): State<AppState>, headers: HeaderMap) -> Response {
    let st = &state.0;
    let result = async {
        authenticate(st, &headers).await?;
        let mut pending = st.store.pending_approvals(now(), LISTED + 1).await?;
        // Said, not left out silently: approvers learn that steps wait
        // beyond the list (the oldest are listed, and expire first).
        let more = pending.len() > LISTED as usize;
        pending.truncate(LISTED as usize);
        let mut out = Vec::with_capacity(pending.len());
        // One read of an agent's denials at a tool for all its steps there,
        // and of each task the steps' tasks were delegated from.
        let mut denials: HashMap<(String, String, String), Value> = HashMap::new();
        let mut ancestors = HashMap::new();
        for a in &pending {
            // A step a later denial answers is no one's to decide.
            if denied_since(st, a).await?.is_some() {
                continue;
            }
            let task = st.store.task(&a.task_id).await?;
            let mut v = describe(a, task.as_ref());
            if let (Some(t), Some(obj)) = (&task, v.as_object_mut()) {
                let key = (
                    t.agent.issuer.clone(),
                    t.agent.subject.clone(),
                    a.tool.clone(),
                );
                let recent = match denials.get(&key) {
                    Some(recent) => recent.clone(),
                    None => {
                        // A waiting step is never a denial: none to leave out.
                        let recent = recent_denials(st, &t.agent, &a.tool, "").await?;
                        denials.insert(key, recent.clone());
                        recent
                    }
                };
                obj.insert("recent_denials".into(), recent);
                obj.insert(
                    "delegated_from".into(),
                    delegated_from(st, t, &mut ancestors).await?,
                );
            }
            out.push(v);
        }
        Ok::<_, OAuthError>(json!({ "approvals": out, "more": more }))
    }
    .await;
    match result {
        Ok(v) => no_store(v),
        Err(e) => e.into_response(),
    }
}

/// `GET /approvals/{id}`: one approval as a person decides it (whatever
/// its state), for an approver to read before deciding.
pub async fn show_endpoint(
    State(state): State<AppState>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
) -> Response {
    let st = &state.0;
    let id = path_id(id);
    let result = async {
        authenticate(st, &headers).await?;
        let not_found = || OAuthError::not_found("no approval has this id");
        if !plausible_id(&id) {
            return Err(not_found());
        }
        let approval = st.store.approval(&id).await?.ok_or_else(not_found)?;
        let task = st.store.task(&approval.task_id).await?;
        described_for_person(st, &approval, task.as_ref()).await
    }
    .await;
    match result {
        Ok(v) => no_store(v),
        Err(e) => e.into_response(),
    }
}

/// The id in an approval's path; one axum cannot decode (not UTF-8) names
/// no approval, and is answered as such, in JSON, after the caller's
/// identity is checked, like any other.
fn path_id(id: Result<Path<String>, PathRejection>) -> String {
    id.map(|Path(id)| id).unwrap_or_default()
}

/// `POST /approvals/{id}/approve`, optionally with the `task`, `tool` and
/// `actions` the person was shown: the approval then applies only if they
/// are this approval's.
pub async fn approve_endpoint(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    decide_endpoint(&state.0, &path_id(id), &headers, body, peer, true).await
}

/// `POST /approvals/{id}/deny` with `reason=...`.
pub async fn deny_endpoint(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    id: Result<Path<String>, PathRejection>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    decide_endpoint(&state.0, &path_id(id), &headers, body, peer, false).await
}

async fn decide_endpoint(
    st: &Inner,
    id: &str,
    headers: &HeaderMap,
    body: Body,
    peer: SocketAddr,
    approve: bool,
) -> Response {
    let result = async {
        let who = caller_identity(st, headers).await?;
        let Some(approver) = approver(st, &who).cloned() else {
            // On the record when it names a step that waits: someone tried
            // to decide it (any other id is answered alike, unrecorded).
            let e = not_an_approver(&who);
            if plausible_id(id)
                && let Some(approval) = st.store.approval(id).await?
                && approval.state == ApprovalState::Pending
            {
                return Err(refuse_decision(st, &who, &approval, approve, peer, e).await);
            }
            return Err(e);
        };
        // What the person was shown, when the client says (`scrip approve`
        // does): approving applies to that step only. Any body is read as
        // that form (a body of another type, or of none, is refused rather
        // than ignored); without one, the approval applies to the step the
        // id names.
        let mut shown = None;
        let reason = if approve {
            use axum::http::header::{CONTENT_LENGTH, CONTENT_TYPE, TRANSFER_ENCODING};
            let has_body = headers.contains_key(CONTENT_TYPE)
                || headers.contains_key(TRANSFER_ENCODING)
                || headers
                    .get(CONTENT_LENGTH)
                    .is_some_and(|n| n.as_bytes() != b"0");
            if has_body {
                shown = Some(Form::read(headers, body).await?);
            }
            None
        } else {
            let form = Form::read(headers, body).await?;
            let reason: String = form
                .require("reason")?
                .chars()
                // Control, bidirectional and invisible characters could
                // forge or reorder what the agent's side shows.
                .filter(|c| !scrip_token::is_deceptive(*c))
                .take(500)
                .collect();
            if reason.trim().is_empty() {
                return Err(OAuthError::invalid_request(
                    "parameter `reason` must be text, not only control or invisible characters",
                ));
            }
            Some(reason)
        };
        let not_found = || OAuthError::not_found("no approval has this id");
        if !plausible_id(id) {
            return Err(not_found());
        }
        let approval = st.store.approval(id).await?.ok_or_else(not_found)?;
        if let Some(form) = &shown {
            for (name, is) in [
                ("task", approval.task_id.as_str()),
                ("tool", approval.tool.as_str()),
                ("actions", approval.actions.as_str()),
            ] {
                if form.get(name).is_some_and(|v| v != is) {
                    return Err(OAuthError::conflict(format!(
                        "this approval's {name} is not the one you were shown; nothing was decided: look again with `scrip approvals`"
                    )));
                }
            }
        }
        let now = now();
        // A step a denial took out of the waiting steps early
        // (`expire_answered`) may still be denied (a wider no), not approved.
        let answered = approval.state == ApprovalState::Expired
            && approval.decided_by.is_none()
            && now < approval.expires_at;
        // Saying by whom: a person whose decision's answer was lost, and
        // who asks again, learns that theirs was taken.
        let already = || {
            OAuthError::conflict(format!(
                "this approval is already {}{}",
                approval.state.as_str(),
                approval
                    .decided_by
                    .as_deref()
                    .map(|by| format!(" (by {by})"))
                    .unwrap_or_default()
            ))
        };
        if approval.state != ApprovalState::Pending && !answered {
            return Err(already());
        }
        if now >= approval.expires_at {
            return Err(OAuthError::conflict("this approval has expired"));
        }
        let task = st
            .store
            .task(&approval.task_id)
            .await?
            .ok_or_else(OAuthError::server_error)?;
        if st.config.separation_of_duties && started_by(st, &task, &Person::of(st, &who, &approver)) {
            let e = OAuthError::forbidden(
                "separation of duties: you may not approve a step of a task you started or act in (known by uid, you count as every agent that may run as your uid, as any process of a uid attests as that uid: every agent but a local one of another uid; only an approver known by issuer and subject alone, with no uid entry, may approve the others)",
            );
            return Err(refuse_decision(st, &who, &approval, approve, peer, e).await);
        }
        if task.state(now) != TaskState::Active {
            return Err(OAuthError::conflict("the task has ended"));
        }
        if approve {
            if let Some(d) = denied_since(st, &approval).await? {
                return Err(OAuthError::conflict(format!(
                    "a person denied `{}` at `{}` in this task after this step was asked; nothing was decided",
                    d.actions, d.tool
                )));
            }
            if answered {
                return Err(already());
            }
        }
        let to = if approve { ApprovalState::Approved } else { ApprovalState::Denied };
        let mut a = st.task_audit(
            if approve { "approval.granted" } else { "approval.denied" },
            &task,
        );
        a.decision = Some(if approve { "allow" } else { "deny" }.into());
        a.tool = Some(approval.tool.clone());
        a.actions = Some(approval.actions.clone());
        a.reason = Some(format!(
            "auth_req_id {} {} by {} ({} {}){}",
            approval.id,
            if approve { "approved" } else { "denied" },
            approver.name,
            who.issuer,
            who.subject,
            reason.as_deref().map(|r| format!(": {r}")).unwrap_or_default()
        ));
        a.client = Some(peer.to_string());
        // Racing decisions: only the first commits, its audit record with it.
        let committed = st
            .store
            .commit(vec![
                Write::UpdateApproval {
                    id: approval.id.clone(),
                    from: approval.state,
                    to,
                    by: Some(approver.name.clone()),
                    at: now,
                    reason: reason.clone(),
                    token_jti: None,
                },
                Write::Audit(Box::new(a)),
                // Not on a task whose end was committed since it was read.
                Write::TaskOpen {
                    id: task.id.clone(),
                },
            ])
            .await;
        if matches!(committed, Err(scrip_store::StoreError::Conflict(_)))
            && !still_open(st, &task.id).await?
        {
            return Err(OAuthError::conflict("the task has ended"));
        }
        let after = match committed {
            Ok(()) | Err(scrip_store::StoreError::Conflict(_)) => {
                st.store.approval(id).await?.ok_or_else(OAuthError::server_error)?
            }
            Err(e) => return Err(e.into()),
        };
        if committed.is_err() {
            return Err(OAuthError::conflict(format!(
                "this approval is already {}",
                after.state.as_str()
            )));
        }
        if !approve {
            let about = st.task_audit("approval.expired", &task);
            expire_answered(st, &about, &after, now).await;
        }
        tracing::info!(auth_req_id = %id, approver = %approver.name, approved = approve, "approval decided");
        Ok(describe(&after, Some(&task)))
    }
    .await;
    match result {
        Ok(v) => no_store(v),
        Err(e) => e.into_response(),
    }
}

/// The waiting steps of `task` that `denial` answers (see [`denied_since`])
/// stop waiting at once, as expired and saying why, rather than hold
/// places among the [`scrip_store::MAX_PENDING_PER_TASK`] until they
/// expire; their polls answer `access_denied` until then, as before. Best
/// effort, after the denial committed: a step decided meanwhile is left as
/// it is, and one left waiting still answers `access_denied`, and is taken
/// out when it is polled or asked for again.
/// `about` is a record of the task (its agent, id and chain), which each
/// step's `approval.expired` record starts from.
async fn expire_answered(st: &Inner, about: &AuditEvent, denial: &Approval, now: u64) {
    let Some(task_id) = about.task_id.as_deref() else {
        return;
    };
    let waiting = match st.store.task_pending_approvals(task_id, now).await {
        Ok(waiting) => waiting,
        Err(e) => {
            tracing::warn!(error = %e, "could not read the steps a denial answers; they wait until they expire, or until they are asked or polled for again");
            return;
        }
    };
    let decided = denial.decided_at.unwrap_or(now);
    for w in waiting.iter().filter(|w| {
        answers_from(st, w) <= decided && answering(w, std::slice::from_ref(denial)).is_some()
    }) {
        let mut a = about.clone();
        a.event = "approval.expired".into();
        a.at_ms = crate::state::now_ms();
        a.tool = Some(w.tool.clone());
        a.actions = Some(w.actions.clone());
        a.reason = Some(format!(
            "auth_req_id {} was answered by the denial of `{}` at `{}` ({}): it no longer waits for a person",
            w.id, denial.actions, denial.tool, denial.id
        ));
        let expired = st
            .store
            .commit(vec![
                Write::UpdateApproval {
                    id: w.id.clone(),
                    from: ApprovalState::Pending,
                    to: ApprovalState::Expired,
                    by: None,
                    at: now,
                    reason: None,
                    token_jti: None,
                },
                Write::Audit(Box::new(a)),
            ])
            .await;
        match expired {
            Ok(()) | Err(scrip_store::StoreError::Conflict(_)) => {}
            Err(e) => {
                tracing::warn!(error = %e, "could not mark the steps a denial answers; they wait until they expire");
                return;
            }
        }
    }
}

/// Whether two steps' action lists name an action in common.
fn overlap(a: &str, b: &str) -> bool {
    match (ActionSet::parse(a), ActionSet::parse(b)) {
        (Ok(a), Ok(b)) => a.iter().any(|x| b.contains(x)),
        // Lists the store holds were parsed when they were asked for; one
        // that no longer parses is taken to overlap (refuse, not grant).
        _ => true,
    }
}

/// Whether the person who approved `approval` is still among the
/// approvers: one removed since approves nothing more.
fn approved_by_an_approver(st: &Inner, approval: &Approval) -> bool {
    approval
        .decided_by
        .as_deref()
        .is_some_and(|name| st.config.approvers.iter().any(|a| a.name == name))
}

/// A denial of a step of `approval`'s task at its tool, decided after it
/// was asked, whose actions hold one that `approval` needs a person's
/// approval for (as `request` refuses a step asked after a denial). A
/// person's no answers the steps asked before it too: another person
/// cannot grant what was just refused, and the agent's polls for them
/// answer `access_denied`. Sharing only an action policy allowed outright
/// answers nothing.
async fn denied_since(st: &Inner, approval: &Approval) -> Result<Option<Approval>, OAuthError> {
    let denials = st
        .store
        .task_denials(&approval.task_id, answers_from(st, approval))
        .await?;
    Ok(answering(approval, &denials).cloned())
}

/// The time from which denials may answer `approval`: its `approval_ttl`
/// before it was asked, not the moment it was. Its `created_at` is the
/// asking replica's clock and a denial's `decided_at` the deciding one's,
/// so with replicas' clocks apart a denial made after the step could read
/// as made before it, and another person could grant what was just
/// refused. Any denial that answers the step and committed in that time
/// before the step did would have refused it ([`request`] reads them, and
/// its commit's `NoNewDenial` fails on one committed meanwhile): what the
/// earlier start adds is only such denials, while the clocks are apart by
/// less than it. The step's own lifetime (`expires_at - created_at`, never
/// changed), not this replica's setting: asked where `approval_ttl` was
/// shorter, an older denial was rightly past for it. But at least
/// `clock_skew`, how far apart the clocks are allowed to be: with an
/// `approval_ttl` shorter than that, a denial up to `clock_skew` older
/// than a step answers it too (which refuses, never grants).
fn answers_from(st: &Inner, approval: &Approval) -> u64 {
    let ttl = approval.expires_at.saturating_sub(approval.created_at);
    approval
        .created_at
        .saturating_sub(ttl.max(st.config.clock_skew))
}

/// The answer to a step the denial `d` answers.
fn answered_by(d: &Approval) -> OAuthError {
    OAuthError::access_denied(format!(
        "a person denied `{}` at `{}` in this task after this step was asked: {}",
        d.actions,
        d.tool,
        d.reason.as_deref().unwrap_or("no reason given")
    ))
}

/// The first of `denials` (of `approval`'s task, decided since it was
/// asked) that answers `approval`, as [`denied_since`] says.
fn answering<'a>(approval: &Approval, denials: &'a [Approval]) -> Option<&'a Approval> {
    let approvable = approval.approvable.as_deref().unwrap_or(&approval.actions);
    denials
        .iter()
        .find(|d| d.id != approval.id && d.tool == approval.tool && overlap(&d.actions, approvable))
}

/// Every identity a person is known by: the one they presented, and each
/// that the configuration gives their name (every `[[approvers]]` entry of
/// it: an issuer and subject, a local uid). Signing in with one must not
/// let a person approve for an agent started with another.
struct Person {
    /// `(issuer, subject)` pairs.
    ids: Vec<(String, String)>,
    /// Local uids.
    uids: Vec<String>,
}

impl Person {
    fn of(st: &Inner, who: &WorkloadIdentity, approver: &Approver) -> Self {
        let local_issuer = crate::attest::local_issuer(st);
        let mut person = Self {
            ids: vec![(who.issuer.clone(), who.subject.clone())],
            uids: Vec::new(),
        };
        if who.issuer == local_issuer
            && let Some(uid) = who.claims.get(LOCAL_UID)
        {
            person.uids.push(uid.clone());
        }
        for entry in st
            .config
            .approvers
            .iter()
            .filter(|a| a.name == approver.name)
        {
            if let (Some(issuer), Some(subject)) = (&entry.issuer, &entry.subject) {
                person.ids.push((issuer.clone(), subject.clone()));
            }
            if let Some(uid) = entry.uid {
                person.uids.push(uid.to_string());
            }
        }
        person
    }

    fn is(&self, issuer: &str, subject: &str) -> bool {
        self.ids.iter().any(|(i, s)| i == issuer && s == subject)
    }
}

/// Whether `person` started `task` or acts in its delegation chain, by any
/// identity they are known by.
///
/// A person known by local attestation is known only by uid: any process of
/// that uid attests as that uid, and as any `[[local_workloads]]` entry it
/// matches, so it could approve for any agent that runs as that uid. Only
/// a local identity says which uid holds it: for a person known by uid, a
/// local agent or actor of another known uid is someone else; one of their
/// uids, one whose uid is not known (a workload entry that pins no uid), and
/// one with a federated identity (a process of their uid may hold that
/// token, and attest as them) all count as them.
fn started_by(st: &Inner, task: &TaskRecord, person: &Person) -> bool {
    if person.is(&task.agent.issuer, &task.agent.subject) {
        return true;
    }
    let local_issuer = crate::attest::local_issuer(st);
    let same_local_user = |issuer: Option<&str>, subject: &str, uid: Option<&String>| {
        if person.uids.is_empty() {
            return false;
        }
        if issuer != Some(local_issuer.as_str()) {
            return true;
        }
        uid.cloned()
            .or_else(|| local_uid(st, subject))
            .is_none_or(|theirs| person.uids.contains(&theirs))
    };
    if same_local_user(
        Some(&task.agent.issuer),
        &task.agent.subject,
        task.agent.claims.get(LOCAL_UID),
    ) {
        return true;
    }
    let mut actor = task.actor.as_ref();
    while let Some(a) = actor {
        let by_id = match a.iss.as_deref() {
            Some(iss) => person.is(iss, &a.sub),
            None => person.ids.iter().any(|(_, s)| *s == a.sub),
        };
        if by_id {
            return true;
        }
        if same_local_user(a.iss.as_deref(), &a.sub, None) {
            return true;
        }
        actor = a.act.as_deref();
    }
    false
}

/// The attested uid of a local identity, among its flattened claims.
const LOCAL_UID: &str = "scrip_attestation.uid";

/// The uid a local subject stands for, when it is known: `local:uid:<n>`,
/// or `local:<name>` for a `[[local_workloads]]` entry that pins a uid.
fn local_uid(st: &Inner, subject: &str) -> Option<String> {
    if let Some(uid) = subject.strip_prefix("local:uid:") {
        return Some(uid.to_owned());
    }
    let name = subject.strip_prefix("local:")?;
    st.config
        .local_workloads
        .iter()
        .find(|w| w.name == name)
        .and_then(|w| w.uid)
        .map(|u| u.to_string())
}

/// What an agent polling an approval that expired undecided is told.
const UNDECIDED: &str = "the approval request expired before anyone decided; ask again";
/// What an agent polling an approved step it did not collect in time is
/// told.
const UNCOLLECTED: &str = "the step was approved, but its token was not collected before the approval request expired; ask again";

/// How long a round of [`expire`] reads the tasks of the approvals it
/// expires, so that their records name the agent.
const ABOUT_READS: Duration = Duration::from_secs(5);

/// Marks expired approvals, pending or approved and never collected, and
/// audits them (run by the sweeper).
pub(crate) async fn expire(st: &Inner, now: u64) {
    if let Ok(due) = st.store.expired_approvals(now, 500).await {
        expire_these(st, now, due, false).await;
    }
}

/// Marks expired, before their time, the approvals whose task has ended:
/// nobody may decide or collect them (run by the sweeper every
/// [`ORPHANS_EVERY`] seconds, the read walking every live step, and each
/// second after a round that found [`ORPHANS_A_ROUND`]). Whether it found
/// that many: more may be left.
pub(crate) async fn expire_orphans(st: &Inner, now: u64) -> bool {
    match st.store.orphaned_approvals(now, ORPHANS_A_ROUND).await {
        Ok(due) => {
            let full = due.len() >= ORPHANS_A_ROUND as usize;
            expire_these(st, now, due, true).await;
            full
        }
        Err(_) => false,
    }
}

/// The most steps of ended tasks one round expires.
const ORPHANS_A_ROUND: u32 = 500;

/// How often, in seconds, the steps of ended tasks are expired.
pub(crate) const ORPHANS_EVERY: u64 = 5;

/// Marks `due` expired and audits each, `orphaned` when their tasks ended
/// before their time.
async fn expire_these(st: &Inner, now: u64, due: Vec<Approval>, orphaned: bool) {
    if due.is_empty() {
        return;
    }
    let mut pairs = Vec::with_capacity(due.len());
    // Each record names the task's agent and chain, as those of the task's
    // own requests do, for `scrip audit query --agent`: each task read
    // once (one that cannot be read leaves its records without them). The
    // reads stop at a store that does not answer, and after
    // [`ABOUT_READS`] in all: the upkeep waits for this round.
    let mut about: std::collections::HashMap<&str, Option<AuditEvent>> =
        std::collections::HashMap::new();
    let reads_until = tokio::time::Instant::now() + ABOUT_READS;
    let mut readable = true;
    for ap in &due {
        if readable && !about.contains_key(ap.task_id.as_str()) {
            let task = match st.store.task(&ap.task_id).await {
                Ok(task) => task,
                Err(e) => {
                    tracing::warn!(error = %e, task = %ap.task_id, "could not read the task of an expired approval; its record names the task only");
                    readable = !matches!(e, scrip_store::StoreError::Unavailable(_));
                    None
                }
            };
            readable = readable && tokio::time::Instant::now() < reads_until;
            let record = task.map(|t| st.task_audit("approval.expired", &t));
            about.insert(&ap.task_id, record);
        }
        let mut writes = Vec::with_capacity(2);
        writes.push(Write::UpdateApproval {
            id: ap.id.clone(),
            from: ap.state,
            to: ApprovalState::Expired,
            by: None,
            at: now,
            reason: None,
            token_jti: None,
        });
        let mut a = about
            .get(ap.task_id.as_str())
            .cloned()
            .flatten()
            .unwrap_or_else(|| st.audit("approval.expired"));
        a.at_ms = crate::state::now_ms();
        a.task_id = Some(ap.task_id.clone());
        a.tool = Some(ap.tool.clone());
        a.actions = Some(ap.actions.clone());
        let why = if orphaned {
            "before its task ended"
        } else {
            "in time"
        };
        a.reason = Some(if ap.state == ApprovalState::Approved {
            format!(
                "auth_req_id {} was approved, but its token was not collected {why}",
                ap.id
            )
        } else {
            format!("auth_req_id {} was not decided {why}", ap.id)
        });
        writes.push(Write::Audit(Box::new(a)));
        pairs.push(writes);
    }
    let all: Vec<Write> = pairs.iter().flatten().cloned().collect();
    match st.store.commit(all).await {
        Ok(()) => {}
        // One was decided since it was read: expire the others one by one,
        // so that the one decided gets no `approval.expired` record.
        Err(scrip_store::StoreError::Conflict(_)) => {
            for writes in pairs {
                match st.store.commit(writes).await {
                    Ok(()) | Err(scrip_store::StoreError::Conflict(_)) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "could not record expired approvals; will retry");
                        return;
                    }
                }
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not record expired approvals; will retry"),
    }
}

/// Whether `id` could be an approval id ([`scrip_jose::random_id`]'s
/// base64url): anything else is unknown without asking the store, which
/// may refuse bytes such as NUL with an error that is not the caller's.
fn plausible_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_'))
}

/// Which of `actions` need approval: policy denies them as they are and
/// allows them approved. Returns the decision as asked and whether an
/// approval would allow it.
pub(crate) fn classify(
    policy: &scrip_policy::PolicyEngine,
    agent: &WorkloadIdentity,
    tool: &scrip_config::Tool,
    action: &ActionName,
    ctx: &RequestContext,
) -> (scrip_policy::Decision, bool) {
    let d = decide(policy, agent, tool, action, ctx);
    if d.allowed || ctx.approved {
        return (d, false);
    }
    let approved = RequestContext {
        approved: true,
        ..ctx.clone()
    };
    let with = decide(policy, agent, tool, action, &approved);
    (d, with.allowed)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A step whose commit failed with its outcome unknown, and that could
    /// not be read back at once, is announced when it turns out stored; one
    /// the store does not hold for the whole window is not, nor one decided
    /// meanwhile.
    #[tokio::test]
    async fn an_approval_whose_commit_failed_is_announced_once_it_is_seen() {
        let dir = tempfile::tempdir().unwrap();
        let store = scrip_store::open(None, &dir.path().join("scrip.db"))
            .await
            .unwrap();
        let (tx, mut heard) = tokio::sync::mpsc::unbounded_channel::<Value>();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |Json(v): Json<Value>| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(v);
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        let webhook = std::sync::Arc::new(crate::state::Webhook {
            url,
            http: reqwest::Client::new(),
            sending: std::sync::Arc::new(tokio::sync::watch::channel(0).0),
            announcing: std::sync::Arc::new(tokio::sync::watch::channel(0).0),
        });
        let ttl = Duration::from_secs(30);
        let look_for = Duration::from_secs(3);
        let started = Instant::now();
        assert!(
            !announce_once_seen(
                store.clone(),
                webhook.clone(),
                ("never".into(), json!({"auth_req_id": "never"})),
                ttl,
                look_for,
            )
            .await
        );
        let took = started.elapsed();
        assert!(
            took >= look_for && took < Duration::from_secs(10),
            "{took:?}"
        );

        let looking = tokio::spawn(announce_once_seen(
            store.clone(),
            webhook.clone(),
            ("step".into(), json!({"auth_req_id": "step"})),
            ttl,
            look_for,
        ));
        // Not there at the first look: stored only after it.
        tokio::time::sleep(LOOK_AGAIN + LOOK_AGAIN / 2).await;
        let agent = WorkloadIdentity {
            issuer: "https://idp.test".into(),
            subject: "agent".into(),
            kind: scrip_token::IdentityKind::Generic,
            attributes: std::collections::BTreeMap::new(),
            claims: std::collections::BTreeMap::new(),
        };
        let task = TaskRecord {
            id: "task".into(),
            parent: None,
            agent,
            actor: None,
            may_act: Vec::new(),
            grants: "github:delete".into(),
            held: String::new(),
            purpose: "p".into(),
            environment: "prod".into(),
            depth: 0,
            token_jti: "jti".into(),
            created_at: now(),
            expires_at: now() + 3600,
            ended_at: None,
            end_reason: None,
        };
        let approval_of = |id: &str| Approval {
            id: id.into(),
            task_id: "task".into(),
            tool: "github".into(),
            actions: "delete".into(),
            approvable: None,
            state: ApprovalState::Pending,
            created_at: now(),
            expires_at: now() + 30,
            decided_by: None,
            decided_at: None,
            reason: None,
            token_jti: None,
        };
        store
            .commit(vec![
                Write::InsertTask(Box::new(task)),
                Write::InsertApproval(Box::new(approval_of("step"))),
            ])
            .await
            .unwrap();
        assert!(looking.await.unwrap(), "not announced");
        let body = tokio::time::timeout(Duration::from_secs(10), heard.recv())
            .await
            .unwrap()
            .unwrap();
        assert_eq!(body["auth_req_id"], "step");
        assert!(
            heard.try_recv().is_err(),
            "the step never stored was announced"
        );
        assert_eq!(LOOKING.load(std::sync::atomic::Ordering::SeqCst), 0);

        // One decided before it is seen is not put to anyone.
        let mut denied = approval_of("denied");
        denied.state = ApprovalState::Denied;
        store
            .commit(vec![Write::InsertApproval(Box::new(denied))])
            .await
            .unwrap();
        assert!(
            !announce_once_seen(
                store.clone(),
                webhook.clone(),
                ("denied".into(), json!({"auth_req_id": "denied"})),
                ttl,
                look_for,
            )
            .await
        );
        // Any call it made has been answered once the webhook is done.
        webhook.finish(Duration::from_secs(5)).await;
        assert!(heard.try_recv().is_err(), "a decided step was announced");
    }

    /// Polls older than the interval are dropped once the map is large,
    /// and the map is not walked again until it has grown past what the
    /// walk left (doubled, or [`POLLS_KEPT`]): a poll costs no walk of
    /// the ids of the last hour, nor of a full map of recent ones.
    #[test]
    fn old_polls_are_dropped_and_the_map_walked_rarely() {
        let polls = Polls::default();
        let interval = Duration::from_secs(5);
        let t0 = Instant::now();
        let later = t0 + interval + Duration::from_secs(1);
        let recent = later - Duration::from_secs(1);
        let len = |p: &Polls| p.0.lock().unwrap().last.len();
        for i in 0..40_000 {
            assert!(polls.allow_at(&format!("old-{i}"), interval, t0));
        }
        for i in 0..60_000 {
            assert!(polls.allow_at(&format!("recent-{i}"), interval, recent));
        }
        assert_eq!(len(&polls), POLLS_KEPT);
        // The next poll walks the map: the ones older than the interval
        // go, the recent ones stay (still too soon to poll again).
        assert!(polls.allow_at("new", interval, later));
        assert_eq!(len(&polls), 60_001);
        assert!(!polls.allow_at("recent-7", interval, later));
        // The next walk waits until the map has doubled: past POLLS_KEPT
        // recent polls, none is walked over or forgotten.
        for i in 0..40_000 {
            assert!(polls.allow_at(&format!("more-{i}"), interval, later));
        }
        assert_eq!(len(&polls), 100_001);
        assert!(!polls.allow_at("recent-8", interval, later));
        // Doubled, and all still recent: a flood of ids in one interval
        // is forgotten whole.
        let mut i = 40_000;
        while len(&polls) > 1 {
            assert!(polls.allow_at(&format!("more-{i}"), interval, later));
            i += 1;
            assert!(i < 100_000, "never walked");
        }
        // The walk came when the map held twice what the last one left.
        assert_eq!(100_001 + (i - 40_000) - 1, 120_000);
    }
}
