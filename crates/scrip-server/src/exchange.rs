//! The token endpoint: RFC 8693 token exchange.
//!
//! Two exchanges are served here: a workload identity for a task token
//! (starting a task) and a task token for an access token at one tool. Each
//! is decided by Cedar, one request per grant or action; what policy refuses
//! is left out, and nothing allowed is `access_denied`. A credential leaves
//! only after its audit record is durable.
//!
//! A token request with a `DPoP` proof (RFC 9449 §5) gets an access token
//! bound to the proof's key (`cnf.jkt`, `token_type` `DPoP`); a bad proof is
//! `invalid_dpop_proof`, whatever the grant.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use scrip_config::Tool;
use scrip_jose::dpop::{self, ProofCheck};
use scrip_policy::{Decision, DecisionRequest, RequestContext, Stage};
use scrip_store::{AuditEvent, TaskRecord, TaskState, Write};
use scrip_token::{
    AccessClaims, ActionSet, Confirmation, Grant, GrantSet, TOKEN_EXCHANGE_GRANT, TaskClaims,
    TaskContext, TokenKind, WorkloadIdentity, derived_expiry, token_type,
};
use serde::Deserialize;

use crate::error::OAuthError;
use crate::form::{Form, shown_name, shown_uri, shown_value};
use crate::state::{AppState, Inner, now};

/// Longest task purpose, in characters.
const MAX_PURPOSE: usize = 1024;
/// Longest `request_details`, in bytes.
const MAX_DETAILS: usize = 4096;
/// The most DPoP proofs the token endpoint remembers (each is accepted
/// once); past that, proofs are refused until old ones expire.
pub(crate) const DPOP_PROOFS: usize = 1 << 20;

/// `POST /token`.
pub async fn token_endpoint(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let form = match Form::read(&headers, body).await {
        Ok(f) => f,
        Err(e) => return e.into_response(),
    };
    let result = match dpop_binding(&state.0, &headers) {
        Ok(binding) => exchange(&state.0, &form, peer, binding.as_ref()).await,
        Err(e) => Err(e),
    };
    match result {
        Ok(r) => r,
        Err(e) => {
            // Requests past `[limits]` have a budget of their own: one
            // runaway agent's flood of them does not crowd other refusals
            // out of the log (the audit trail has each, within the
            // refusal budget).
            static REFUSED: crate::logs::Budget = crate::logs::Budget::new(100);
            static OVER_PACE: crate::logs::Budget = crate::logs::Budget::new(10);
            let (budget, what) = if e.status == axum::http::StatusCode::TOO_MANY_REQUESTS {
                (&OVER_PACE, "token request past [limits]")
            } else {
                (&REFUSED, "token request refused")
            };
            if budget.allow(what) {
                tracing::info!(error = e.code, description = %e.description, client = %peer, "{what}");
            }
            e.into_response()
        }
    }
}

/// A token request's verified DPoP proof (RFC 9449 §4.3, §5): the key an
/// access token issued for it is bound to.
///
/// The proof is checked before anything else, but recorded as used
/// ([`Binding::spend`]) only once the request's subject token is verified,
/// so that strangers cannot fill the replay memory with proofs of their own;
/// and recorded in the store ([`Binding::spent`]) in the commit of what it
/// was presented for, so that no other replica takes it again.
pub(crate) struct Binding {
    proof: dpop::Proof,
    url: String,
    now: u64,
    leeway: u64,
}

/// What a proof at the token endpoint must match.
fn token_check(url: &str, now: u64, leeway: u64) -> ProofCheck<'_> {
    ProofCheck {
        method: "POST",
        url,
        access_token: None,
        now,
        max_age: dpop::MAX_PROOF_AGE,
        leeway,
    }
}

impl Binding {
    fn check(&self) -> ProofCheck<'_> {
        token_check(&self.url, self.now, self.leeway)
    }

    /// Refuses a proof this process took before, changing nothing: checked
    /// before a request is charged to an identity's `[limits]`, so that a
    /// captured request replayed spends nobody's pace.
    pub(crate) fn unspent(&self, st: &Inner) -> Result<(), OAuthError> {
        if st.dpop_proofs.seen(&self.proof, &self.check()) {
            return Err(OAuthError::invalid_dpop_proof(format!(
                "the {}",
                dpop::Replay::Used
            )));
        }
        Ok(())
    }

    /// Records the proof as used, refusing one seen before, and gives the
    /// confirmation claim of the token it binds.
    pub(crate) fn spend(&self, st: &Inner) -> Result<Confirmation, OAuthError> {
        st.dpop_proofs
            .first_use(&self.proof, &self.check())
            .map_err(|e| OAuthError::invalid_dpop_proof(format!("the {e}")))?;
        Ok(Confirmation {
            jkt: self.proof.jkt.clone(),
        })
    }

    /// The proof's use, for the commit of what it was presented for:
    /// [`Binding::spend`] took it once in this process's memory; the store
    /// takes it once for every replica (the commit fails with
    /// [`scrip_store::StoreError::ProofUsed`] when another took it first).
    pub(crate) fn spent(&self) -> Write {
        Write::SpendProof {
            id: self.proof.replay_id(),
            iat: self.proof.iat,
        }
    }
}

/// The answer to a request whose DPoP proof another replica took first (a
/// replayed request, found at the commit): `refusal` goes on the record,
/// its reason `about` followed by why, with the policy's decisions on the
/// request (`decided`), as when the task's end is found at the commit.
pub(crate) async fn refuse_replayed(
    st: &Inner,
    decided: Vec<Write>,
    mut refusal: AuditEvent,
    about: &str,
) -> OAuthError {
    let e = OAuthError::from(scrip_store::StoreError::ProofUsed);
    refusal.decision = Some("deny".into());
    refusal.reason = Some(format!("{about}{}", e.description));
    let mut records = decided;
    records.push(Write::Audit(Box::new(refusal)));
    match st.store.commit(records).await {
        Ok(()) => e,
        Err(failed) => failed.into(),
    }
}

/// A task token bound to a DPoP key is exchanged (for an access token, a
/// child task or an approved step) only with a proof signed by that key.
pub(crate) fn check_task_binding(
    bound: Option<&Confirmation>,
    binding: Option<&Binding>,
) -> Result<(), OAuthError> {
    match (bound, binding) {
        (None, _) => Ok(()),
        (Some(_), None) => Err(OAuthError::invalid_dpop_proof(
            "the task token is bound to a DPoP key: send a DPoP proof signed with that key",
        )),
        (Some(c), Some(b)) if b.proof.jkt == c.jkt => Ok(()),
        (Some(_), Some(_)) => Err(OAuthError::invalid_dpop_proof(
            "the DPoP proof is not signed with the key the task token is bound to",
        )),
    }
}

/// The token request's DPoP proof, checked, if it has one.
fn dpop_binding(st: &Inner, headers: &HeaderMap) -> Result<Option<Binding>, OAuthError> {
    let mut values = headers.get_all("dpop").iter();
    let proof = match (values.next(), values.next()) {
        (None, _) => return Ok(None),
        (Some(v), None) => v
            .to_str()
            .map_err(|_| OAuthError::invalid_dpop_proof("the DPoP header is not ascii"))?,
        (Some(_), Some(_)) => {
            return Err(OAuthError::invalid_dpop_proof(
                "a token request carries at most one DPoP header",
            ));
        }
    };
    let url = format!("{}{}", st.issuer, crate::paths::TOKEN);
    let (now, leeway) = (now(), st.config.clock_skew);
    let proof = dpop::verify_proof(proof, &token_check(&url, now, leeway))
        .map_err(|e| OAuthError::invalid_dpop_proof(format!("the {e}")))?;
    Ok(Some(Binding {
        proof,
        url,
        now,
        leeway,
    }))
}

async fn exchange(
    st: &Inner,
    form: &Form,
    peer: SocketAddr,
    binding: Option<&Binding>,
) -> Result<Response, OAuthError> {
    let grant_type = form.require("grant_type")?;
    if grant_type == crate::approval::CIBA_GRANT {
        return crate::approval::poll(st, form, peer, binding).await;
    }
    if grant_type != TOKEN_EXCHANGE_GRANT {
        return Err(OAuthError::unsupported_grant_type(format!(
            "grant_type {} is not supported; use {TOKEN_EXCHANGE_GRANT}",
            shown_value(grant_type)
        )));
    }
    let subject_token = form.require("subject_token")?;
    let subject_type = form.require("subject_token_type")?;
    let requested = form.get("requested_token_type");
    if form.get("actor_token").is_some() || form.get("actor_token_type").is_some() {
        return match (subject_type, requested) {
            (token_type::TXN_TOKEN, None | Some(token_type::TXN_TOKEN)) => {
                crate::delegate::delegate(st, form, subject_token, peer, binding).await
            }
            _ => Err(OAuthError::invalid_request(
                "an actor_token delegates a task: give the parent's task token as subject_token \
                 (subject_token_type txn_token) and ask for a txn_token",
            )),
        };
    }
    match (subject_type, requested) {
        (token_type::JWT, None | Some(token_type::TXN_TOKEN)) => {
            start_task(st, form, subject_token, peer, binding).await
        }
        (token_type::JWT, Some(other)) => Err(OAuthError::invalid_request(format!(
            "a workload identity is exchanged for a task token; requested_token_type {} is not available for it",
            shown_value(other)
        ))),
        (token_type::TXN_TOKEN, None | Some(token_type::ACCESS_TOKEN)) => {
            access_token(st, form, subject_token, peer, binding).await
        }
        (token_type::TXN_TOKEN, Some(other)) => Err(OAuthError::invalid_request(format!(
            "a task token is exchanged for an access token; requested_token_type {} is not available for it",
            shown_value(other)
        ))),
        (token_type::ACCESS_TOKEN, _) => Err(OAuthError::invalid_request(
            "an access token cannot be exchanged; exchange the task token instead",
        )),
        (other, _) => Err(OAuthError::invalid_request(format!(
            "subject_token_type {} is not supported; use {} or {}",
            shown_value(other),
            token_type::JWT,
            token_type::TXN_TOKEN
        ))),
    }
}

/// The most `may_act` entries a task may list.
const MAX_MAY_ACT: usize = 16;

/// The members of `request_details`.
const DETAILS_MEMBERS: [&str; 5] = ["purpose", "environment", "ttl", "may_act", "dpop_jkt"];

/// [`DETAILS_MEMBERS`] as an error message lists them.
const MEMBERS_SAID: &str =
    "the members are `purpose`, `environment`, `ttl`, `may_act` and `dpop_jkt`";

/// `request_details` of a task start or a delegation.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RequestDetails {
    #[serde(default)]
    pub purpose: Option<String>,
    #[serde(default)]
    pub environment: Option<String>,
    #[serde(default)]
    pub ttl: Option<u64>,
    #[serde(default)]
    pub may_act: Vec<scrip_token::MayAct>,
    /// A delegation's: the RFC 7638 thumbprint of the sub-agent's DPoP
    /// key, which its task is bound to.
    #[serde(default)]
    pub dpop_jkt: Option<String>,
}

/// What is wrong with `request_details` that did not parse as
/// [`RequestDetails`], without quoting what was sent.
fn details_error(raw: &str, e: &serde_json::Error) -> OAuthError {
    use serde_json::error::Category;
    let object = match e.classify() {
        // Read as a map only when no member is named as serde_json
        // reserves (see `scrip_jose::plain_json`).
        Category::Data if !scrip_jose::plain_json(raw.as_bytes()) => {
            return OAuthError::invalid_request(format!(
                "request_details: a member's name is reserved; {MEMBERS_SAID}"
            ));
        }
        Category::Data => {
            serde_json::from_str::<serde_json::Map<String, serde_json::Value>>(raw).ok()
        }
        Category::Syntax | Category::Eof | Category::Io => None,
    };
    let Some(object) = object else {
        return OAuthError::invalid_request(format!(
            "request_details must be a JSON object (line {}, column {})",
            e.line(),
            e.column()
        ));
    };
    if let Some(unknown) = object
        .keys()
        .find(|k| !DETAILS_MEMBERS.contains(&k.as_str()))
    {
        // Named only when it cannot be a credential put there by mistake.
        let named =
            unknown.len() <= 24 && unknown.chars().all(|c| c.is_ascii_lowercase() || c == '_');
        return OAuthError::invalid_request(format!(
            "request_details: unknown member{}; {MEMBERS_SAID}",
            if named {
                format!(" `{unknown}`")
            } else {
                String::new()
            }
        ));
    }
    OAuthError::invalid_request(
        "request_details: a member is repeated or has the wrong type (`purpose`, `environment` and `dpop_jkt` are strings, `ttl` a whole number of seconds, `may_act` a list of objects with `sub` and optional `iss`)",
    )
}

/// Parses and checks `request_details`; `None` when absent.
pub(crate) fn parse_details(form: &Form) -> Result<Option<RequestDetails>, OAuthError> {
    let Some(raw) = form.get("request_details") else {
        return Ok(None);
    };
    if raw.len() > MAX_DETAILS {
        return Err(OAuthError::invalid_request(format!(
            "request_details is larger than {MAX_DETAILS} bytes"
        )));
    }
    // The parser's messages quote the offending value, which may be
    // anything the agent put there (a credential in the wrong member): what
    // is wrong is said without echoing it. Parsed into the struct first,
    // which refuses a repeated member as it does an unknown one; an object
    // only (serde would also read a struct from a positional array).
    if !raw.trim_start().starts_with('{') {
        return Err(OAuthError::invalid_request(
            "request_details must be a JSON object",
        ));
    }
    let mut details: RequestDetails =
        serde_json::from_str(raw).map_err(|e| details_error(raw, &e))?;
    if let Some(purpose) = details.purpose.as_mut() {
        *purpose = purpose.trim().to_owned();
        if purpose.is_empty()
            || purpose.chars().count() > MAX_PURPOSE
            || purpose.chars().any(scrip_token::is_deceptive)
        {
            // Bidirectional and invisible characters too: the purpose is
            // what a person approving a step reads.
            return Err(OAuthError::invalid_request(format!(
                "request_details: `purpose` must be 1 to {MAX_PURPOSE} characters of visible text"
            )));
        }
    }
    if let Some(env) = &details.environment
        && !scrip_config::is_environment(env)
    {
        return Err(OAuthError::invalid_request(
            "request_details: `environment` must be 1 to 64 letters, digits, `-`, `_` or `.`",
        ));
    }
    if details.ttl == Some(0) {
        return Err(OAuthError::invalid_request(
            "request_details: `ttl` must be positive",
        ));
    }
    if details.may_act.len() > MAX_MAY_ACT || details.may_act.iter().any(|m| m.sub.is_empty()) {
        return Err(OAuthError::invalid_request(format!(
            "request_details: `may_act` must list at most {MAX_MAY_ACT} actors, each with a non-empty `sub`"
        )));
    }
    if details
        .dpop_jkt
        .as_deref()
        .is_some_and(|jkt| !scrip_jose::dpop::is_thumbprint(jkt))
    {
        return Err(OAuthError::invalid_request(
            "request_details: `dpop_jkt` must be a key's RFC 7638 SHA-256 thumbprint, 43 characters of unpadded base64url",
        ));
    }
    Ok(Some(details))
}

pub(crate) fn no_store(body: impl serde::Serialize) -> Response {
    let mut response = Json(body).into_response();
    let headers = response.headers_mut();
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    response
}

/// The body of a successful token exchange (RFC 8693 §2.2.1).
#[derive(Debug, serde::Serialize)]
pub(crate) struct Issued<'a> {
    access_token: &'a str,
    issued_token_type: &'static str,
    token_type: &'static str,
    expires_in: u64,
    scope: &'a str,
}

impl<'a> Issued<'a> {
    /// A task token (`token_type` `N_A`: it is not a bearer credential for
    /// any resource server).
    pub(crate) fn task_token(token: &'a str, expires_in: u64, scope: &'a str) -> Response {
        no_store(Self {
            access_token: token,
            issued_token_type: token_type::TXN_TOKEN,
            token_type: "N_A",
            expires_in,
            scope,
        })
    }

    /// An access token for one tool: `DPoP` when bound to a key (RFC 9449
    /// §5), else `Bearer`.
    pub(crate) fn access_token(
        token: &'a str,
        expires_in: u64,
        scope: &'a str,
        bound: bool,
    ) -> Response {
        no_store(Self {
            access_token: token,
            issued_token_type: token_type::ACCESS_TOKEN,
            token_type: if bound { "DPoP" } else { "Bearer" },
            expires_in,
            scope,
        })
    }
}

pub(crate) fn decide(
    policy: &scrip_policy::PolicyEngine,
    agent: &WorkloadIdentity,
    tool: &Tool,
    action: &scrip_token::ActionName,
    ctx: &RequestContext,
) -> Decision {
    policy.decide(&DecisionRequest {
        agent,
        action,
        tool,
        context: ctx,
    })
}

/// Decides each grant of a task start or delegation: returns the audit
/// records of the decisions, the grants the task may hold, and those of
/// them it holds only with a person's approval (policy allows them only
/// so): each use of one of those then waits for that approval, whatever
/// policy says at the time of the use (a rule may ask for a person at the
/// task stage only, `context.stage == "task"`).
pub(crate) fn decide_grants(
    st: &Inner,
    agent: &WorkloadIdentity,
    grants: &GrantSet,
    ctx: &RequestContext,
    base: &dyn Fn(AuditEvent) -> AuditEvent,
) -> (Vec<Write>, GrantSet, GrantSet) {
    let mut writes = Vec::new();
    let mut allowed = Vec::new();
    let mut held = Vec::new();
    // One policy set decides every grant of the request, even across a
    // reload.
    let policy = st.policy();
    for g in grants.iter() {
        let Some(tool) = st.config.tool(g.tool.as_str()) else {
            continue;
        };
        let (d, approvable) = crate::approval::classify(&policy, agent, tool, &g.action, ctx);
        let mut a = base(decision_event(st, "task.grant", &d));
        if approvable {
            a.reason = Some(format!("{}; each use needs a person's approval", d.reason));
        }
        a.tool = Some(g.tool.to_string());
        a.actions = Some(g.action.to_string());
        writes.push(Write::Audit(Box::new(a)));
        if d.allowed || approvable {
            allowed.push(g.clone());
        }
        if approvable {
            held.push(g.clone());
        }
    }
    (
        writes,
        allowed.into_iter().collect(),
        held.into_iter().collect(),
    )
}

/// The grants of `task` that each use of waits for a person's approval
/// (see [`decide_grants`]).
pub(crate) fn held_grants(task: &TaskRecord) -> Result<GrantSet, OAuthError> {
    if task.held.is_empty() {
        return Ok(GrantSet::default());
    }
    GrantSet::parse(&task.held).map_err(|_| OAuthError::server_error())
}

pub(crate) fn decision_event(st: &Inner, event: &str, d: &Decision) -> AuditEvent {
    let mut a = st.audit(event);
    a.decision = Some(if d.allowed { "allow" } else { "deny" }.into());
    a.policies.clone_from(&d.policies);
    a.reason = Some(d.reason.clone());
    a
}

pub(crate) fn identity_error(e: scrip_identity::IdentityError) -> OAuthError {
    match e {
        scrip_identity::IdentityError::KeysUnavailable => {
            static UNAVAILABLE: crate::logs::Budget = crate::logs::Budget::new(10);
            if UNAVAILABLE.allow("workload identity refused: issuer keys unavailable") {
                tracing::warn!("workload identity refused: issuer keys unavailable");
            }
            let mut err = OAuthError::temporarily_unavailable();
            err.description =
                "the keys of the workload identity's issuer are unavailable; try again shortly"
                    .into();
            err
        }
        other => OAuthError::invalid_request(format!("subject_token: {other}")),
    }
}

async fn start_task(
    st: &Inner,
    form: &Form,
    subject_token: &str,
    peer: SocketAddr,
    binding: Option<&Binding>,
) -> Result<Response, OAuthError> {
    if form.get("audience").is_some()
        || form.get("resource").is_some()
        || form.repeated_target().is_some()
    {
        // RFC 8693 §2.2.2: no token is issued for a target named here.
        return Err(OAuthError::invalid_target(
            "audience and resource name a tool for an access token; a task asks for grants in `scope`",
        ));
    }
    // Who asks comes first: the answers below name the configured tools,
    // actions and environments, which only a trusted workload may learn.
    let agent = st
        .identities
        .verify(subject_token)
        .await
        .map_err(identity_error)?;
    // An identified agent's start refused is on the record, naming the
    // identity (its token's `jti` and run), within the refusal budget of
    // the agent: it can ask again as fast as it likes.
    let refused = || {
        let mut a = st.audit("task.refused");
        a.agent_iss = Some(agent.issuer.clone());
        a.agent_sub = Some(agent.subject.clone());
        a.identity = agent.provenance();
        a.client = Some(peer.to_string());
        a.actions = configured_grants(st, form);
        a
    };
    let refuse = |e: OAuthError| async {
        let mut a = refused();
        a.decision = Some("deny".into());
        a.reason = Some(format!("task start: {}", e.description));
        st.refusal_recorded(a, e).await
    };
    // One identity's pace, before anything of the request is weighed (but
    // a replayed request, which is nobody's).
    if let Some(b) = binding
        && let Err(e) = b.unspent(st)
    {
        return Err(refuse(e).await);
    }
    if let Err(r) = st.limits.tasks.take(&agent.issuer, &agent.subject) {
        let mut a = refused();
        a.reason = Some("task start: ".into());
        let who = (agent.issuer.as_str(), agent.subject.as_str());
        return Err(st
            .refusal_over_pace(who, a, r, ("tasks", "tasks_per_minute"))
            .await);
    }
    let asked = match task_request(st, form) {
        Ok(asked) => asked,
        Err(e) => return Err(refuse(e).await),
    };
    // A task started with a proof is bound to its key (RFC 9449 §5, as a
    // refresh token is): a stolen task token is no use without the key.
    let cnf = match binding.map(|b| b.spend(st)).transpose() {
        Ok(cnf) => cnf,
        Err(e) => return Err(refuse(e).await),
    };
    let TaskRequest {
        grants,
        purpose,
        environment,
        ttl,
        may_act,
    } = asked;

    let now = now();
    let ctx = RequestContext {
        stage: Stage::Task,
        purpose,
        environment,
        delegation_depth: 0,
        delegation_chain: Vec::new(),
        delegation_issuers: Vec::new(),
        now,
        approved: false,
        method: None,
        path: None,
        dpop_jkt: cnf.as_ref().map(|c| c.jkt.clone()),
    };
    let task_id = scrip_jose::time_ordered_id().map_err(|_| OAuthError::server_error())?;
    let client = peer.to_string();
    let base = |mut a: AuditEvent| {
        a.agent_iss = Some(agent.issuer.clone());
        a.agent_sub = Some(agent.subject.clone());
        a.task_id = Some(task_id.clone());
        a.environment = Some(ctx.environment.clone());
        a.purpose = Some(ctx.purpose.clone());
        a.client = Some(client.clone());
        a
    };
    let (mut writes, allowed, held) = decide_grants(st, &agent, &grants, &ctx, &base);
    // Kept for the record should another replica have taken the proof.
    let decided = if binding.is_some() {
        writes.clone()
    } else {
        Vec::new()
    };
    if allowed.is_empty() {
        st.store.commit(writes).await?;
        return Err(OAuthError::access_denied(
            "policy allows none of the requested grants",
        ));
    }
    let ttl = ttl
        .unwrap_or(st.config.task_ttl)
        .min(st.config.max_task_ttl);
    let exp = now.saturating_add(ttl);
    let jti = scrip_jose::random_id().map_err(|_| OAuthError::server_error())?;
    let claims = TaskClaims {
        iss: st.issuer.clone(),
        sub: agent.subject.clone(),
        aud: st.issuer.clone(),
        iat: now,
        exp,
        jti: jti.clone(),
        txn: task_id.clone(),
        scope: allowed.to_string(),
        tctx: TaskContext {
            purpose: ctx.purpose.clone(),
            environment: ctx.environment.clone(),
            depth: 0,
            agent_iss: agent.issuer.clone(),
            parent: None,
        },
        act: None,
        cnf,
    };
    let token = st.sign(TokenKind::Task, &claims)?;
    let mut started = base(st.audit("task.started"));
    started.decision = Some("allow".into());
    started.actions = Some(claims.scope.clone());
    started.jti = Some(jti.clone());
    started.identity = agent.provenance();
    started.reason = claims
        .cnf
        .as_ref()
        .map(|c| format!("bound to DPoP key {}", c.jkt));
    writes.push(Write::InsertTask(Box::new(TaskRecord {
        id: task_id.clone(),
        parent: None,
        agent: agent.clone(),
        actor: None,
        may_act,
        grants: claims.scope.clone(),
        held: held.to_string(),
        purpose: ctx.purpose.clone(),
        environment: ctx.environment.clone(),
        depth: 0,
        token_jti: jti.clone(),
        created_at: now,
        expires_at: exp,
        ended_at: None,
        end_reason: None,
    })));
    writes.push(Write::Audit(Box::new(started)));
    if let Some(b) = binding {
        writes.push(b.spent());
    }
    match st.store.commit(writes).await {
        Ok(()) => {}
        // Another replica took the proof first: a replayed start, refused
        // on the record with the decisions on it.
        Err(scrip_store::StoreError::ProofUsed) => {
            let mut a = base(st.audit("task.refused"));
            a.actions = Some(claims.scope.clone());
            a.identity = agent.provenance();
            return Err(refuse_replayed(st, decided, a, "task start: ").await);
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(task = %task_id, jti = %jti, agent = %agent.subject, scope = %claims.scope, "task started");
    Ok(Issued::task_token(
        &token,
        exp.saturating_sub(now),
        &claims.scope,
    ))
}

/// What a task start asks for, read and checked against the configuration.
struct TaskRequest {
    grants: GrantSet,
    purpose: String,
    environment: String,
    ttl: Option<u64>,
    may_act: Vec<scrip_token::MayAct>,
}

/// Reads a task start's `scope` and `request_details`: every grant a
/// configured tool's action, and the environment a configured one.
fn task_request(st: &Inner, form: &Form) -> Result<TaskRequest, OAuthError> {
    let scope = form.get("scope").ok_or_else(|| {
        OAuthError::invalid_scope(
            "parameter `scope` is required: the grants the task asks for, as `tool:action`",
        )
    })?;
    let grants = GrantSet::parse(scope).map_err(|e| OAuthError::invalid_scope(e.to_string()))?;
    for g in grants.iter() {
        let tool = st.config.tool(g.tool.as_str()).ok_or_else(|| {
            OAuthError::invalid_scope(format!("unknown tool {}", shown_name(g.tool.as_str())))
        })?;
        if !tool.actions.contains(&g.action) {
            return Err(OAuthError::invalid_scope(format!(
                "tool `{}` has no action {}",
                g.tool,
                shown_name(g.action.as_str())
            )));
        }
    }
    let details = parse_details(form)?.ok_or_else(|| {
        OAuthError::invalid_request(
            "parameter `request_details` is required: a JSON object with `purpose` and `environment`",
        )
    })?;
    if details.dpop_jkt.is_some() {
        return Err(OAuthError::invalid_request(
            "request_details: `dpop_jkt` names a sub-agent's key in a delegation; a task is bound to its agent's key by starting it with a DPoP proof",
        ));
    }
    let (Some(purpose), Some(environment)) = (details.purpose.clone(), details.environment.clone())
    else {
        return Err(OAuthError::invalid_request(
            "request_details: `purpose` and `environment` are required",
        ));
    };
    // The agent names its environment: only the configured names are
    // accepted, so `production` cannot slip past a policy on `prod`.
    if !st.config.environments.contains(&environment) {
        return Err(OAuthError::invalid_request(format!(
            "request_details: `environment` is not one of {} (the configured `environments`)",
            st.config.environments.join(", ")
        )));
    }
    Ok(TaskRequest {
        grants,
        purpose,
        environment,
        ttl: details.ttl,
        may_act: details.may_act,
    })
}

/// The request's `scope`, shortened, when it names only configured grants
/// (`tool:action`), for a record: any other text may be a secret in the
/// wrong place.
pub(crate) fn configured_grants(st: &Inner, form: &Form) -> Option<String> {
    form.get("scope")
        .filter(|s| {
            GrantSet::parse(s).is_ok_and(|grants| {
                grants.iter().all(|g| {
                    st.config
                        .tool(g.tool.as_str())
                        .is_some_and(|t| t.actions.contains(&g.action))
                })
            })
        })
        .map(crate::form::short)
}

fn target_tool<'a>(st: &'a Inner, form: &Form) -> Result<&'a Tool, OAuthError> {
    if let Some(which) = form.repeated_target() {
        return Err(OAuthError::invalid_target(format!(
            "an access token is for exactly one tool; give `{which}` once"
        )));
    }
    let by_audience = form
        .get("audience")
        .map(|a| {
            st.config.tool(a).ok_or_else(|| {
                OAuthError::invalid_target(format!("unknown tool {}", shown_name(a)))
            })
        })
        .transpose()?;
    let by_resource = form
        .get("resource")
        .map(|r| {
            st.config.tool_by_resource(r).ok_or_else(|| {
                OAuthError::invalid_target(format!("no tool has resource {}", shown_uri(r)))
            })
        })
        .transpose()?;
    match (by_audience, by_resource) {
        (Some(a), Some(r)) if a.name != r.name => Err(OAuthError::invalid_target(
            "audience and resource name different tools",
        )),
        (Some(t), _) | (None, Some(t)) => Ok(t),
        (None, None) => Err(OAuthError::invalid_target(
            "name the tool with `audience` (its name) or `resource` (its URI)",
        )),
    }
}

/// The task behind a verified task token, if it is still active; the
/// record comes from the exchange cache while no revocation has been
/// committed since it was read.
pub(crate) async fn active_task(
    st: &Inner,
    claims: &TaskClaims,
    now: u64,
) -> Result<Option<Arc<TaskRecord>>, OAuthError> {
    let task = match st.cache.task(&claims.txn) {
        Ok(task) => task,
        Err(stamp) => {
            let Some(task) = st.store.task(&claims.txn).await? else {
                return Ok(None);
            };
            let task = Arc::new(task);
            st.cache.put_task(stamp, task.clone());
            task
        }
    };
    if task.token_jti != claims.jti || task.state(now) != TaskState::Active {
        return Ok(None);
    }
    Ok(Some(task))
}

/// What a request refused by [`refuse_ended`] asked: its tool and actions
/// when they are known (a configured tool's name, an approved step's), and
/// in words.
pub(crate) struct Asked {
    pub(crate) tool: Option<String>,
    pub(crate) actions: Option<String>,
    pub(crate) what: String,
}

impl Asked {
    /// The token of an approved step.
    pub(crate) fn step(approval: &scrip_store::Approval) -> Self {
        Self {
            tool: Some(approval.tool.clone()),
            actions: Some(approval.actions.clone()),
            what: format!("the token of auth_req_id {}", approval.id),
        }
    }
}

/// Refuses a verified task token whose task has ended (revoked, expired,
/// or its token replaced): most likely one kept, or stolen, past the task's
/// end. Recorded as `event` (`token.refused`, `task.refused`) naming the
/// token and what was `asked`, with `err`'s description in `reason`;
/// returns `err` to answer, or the store's error when the record could not
/// be written.
pub(crate) async fn refuse_ended(
    st: &Inner,
    claims: &TaskClaims,
    event: &str,
    asked: Asked,
    peer: SocketAddr,
    err: OAuthError,
) -> OAuthError {
    let mut a = st.claims_audit(event, claims);
    a.decision = Some("deny".into());
    a.jti = Some(claims.jti.clone());
    a.tool = asked.tool;
    a.actions = asked.actions;
    a.client = Some(peer.to_string());
    a.reason = Some(format!("{}: {}", asked.what, err.description));
    st.refusal_recorded(a, err).await
}

async fn access_token(
    st: &Inner,
    form: &Form,
    subject_token: &str,
    peer: SocketAddr,
    binding: Option<&Binding>,
) -> Result<Response, OAuthError> {
    let claims = st
        .verify_task(subject_token)
        .map_err(|e| OAuthError::invalid_request(format!("subject_token: {e}")))?;
    let now = now();
    // The audience asked for is recorded only when it is a tool's name: any
    // other text may be a secret in the wrong place.
    let asked_tool = || {
        form.get("audience")
            .filter(|a| st.config.tool(a).is_some())
            .map(str::to_owned)
    };
    let Some(task) = active_task(st, &claims, now).await? else {
        let tool = asked_tool();
        let what = match &tool {
            Some(tool) => format!("an access token for `{tool}`"),
            None => "an access token".to_owned(),
        };
        let asked = Asked {
            tool,
            actions: None,
            what,
        };
        let e = OAuthError::invalid_request("subject_token: the task has ended");
        return Err(refuse_ended(st, &claims, "token.refused", asked, peer, e).await);
    };
    let task_grants = GrantSet::parse(&task.grants).map_err(|_| OAuthError::server_error())?;
    let task_held = held_grants(&task)?;

    let mut base = st.task_audit("token.decision", &task);
    base.client = Some(peer.to_string());

    let refuse = |tool: Option<String>, actions: Option<String>, err: OAuthError| {
        let mut a = base.clone();
        a.event = "token.refused".into();
        a.decision = Some("deny".into());
        a.tool = tool;
        a.actions = actions;
        a.reason = Some(err.description.clone());
        async move { Err::<Response, OAuthError>(st.refusal_recorded(a, err).await) }
    };

    // A bound task's token without its key is most likely stolen: refused,
    // and on the record. So is one whose proof was used before (a replayed
    // request).
    if let Err(e) = check_task_binding(claims.cnf.as_ref(), binding)
        .and_then(|()| binding.map_or(Ok(()), |b| b.unspent(st)))
    {
        return refuse(asked_tool(), None, e).await;
    }
    // The holder's pace: a thief without a bound task's key, or replaying
    // a request, is refused above, and spends none of it.
    let holder = crate::limits::holder(&task);
    if let Err(r) = st.limits.access_tokens.take(holder.0, holder.1) {
        let mut a = base.clone();
        a.event = "token.refused".into();
        a.tool = asked_tool();
        return Err(st
            .refusal_over_pace(holder, a, r, ("access tokens", "access_tokens_per_minute"))
            .await);
    }
    let cnf = match binding.map(|b| b.spend(st)).transpose() {
        Ok(cnf) => cnf,
        Err(e) => return refuse(asked_tool(), None, e).await,
    };
    let tool = match target_tool(st, form) {
        Ok(t) => t,
        Err(e) => return refuse(asked_tool(), None, e).await,
    };
    let held = task_grants.actions_at(&tool.name);
    let actions = match form.get("scope") {
        None if held.is_empty() => {
            let e = OAuthError::invalid_scope(format!(
                "the task holds no grant at tool `{}`",
                tool.name
            ));
            return refuse(Some(tool.name.to_string()), None, e).await;
        }
        None => held.clone(),
        Some(s) => match ActionSet::parse(s) {
            Ok(a) => a,
            Err(e) => {
                let e = OAuthError::invalid_scope(e.to_string());
                // Not the text refused: it may be a secret in the wrong place.
                return refuse(Some(tool.name.to_string()), None, e).await;
            }
        },
    };
    if let Some(beyond) = actions.iter().find(|a| !held.contains(a)) {
        // The task holds only actions the tool has, so only here can one be
        // unknown; it is not quoted (nor recorded): it may be a secret in
        // the wrong place.
        if actions.iter().any(|a| !tool.actions.contains(a)) {
            let e = OAuthError::invalid_scope(format!(
                "scope names an action tool `{}` does not have",
                tool.name
            ));
            return refuse(Some(tool.name.to_string()), None, e).await;
        }
        let grant = Grant {
            tool: tool.name.clone(),
            action: beyond.clone(),
        };
        let e = OAuthError::invalid_scope(format!(
            "scope exceeds the task's grants: the task does not hold `{grant}`"
        ));
        return refuse(Some(tool.name.to_string()), Some(actions.to_string()), e).await;
    }

    let ctx = RequestContext {
        stage: Stage::Token,
        purpose: task.purpose.clone(),
        environment: task.environment.clone(),
        delegation_depth: task.depth,
        delegation_chain: base.chain.clone(),
        delegation_issuers: task
            .actor
            .as_ref()
            .map(scrip_token::Actor::issuers)
            .unwrap_or_default(),
        now,
        approved: false,
        method: None,
        path: None,
        dpop_jkt: cnf.as_ref().map(|c| c.jkt.clone()),
    };
    // One policy set decides every action of the request, even across a
    // reload.
    let policy = st.policy();
    let decisions: Vec<_> = actions
        .iter()
        .map(|action| {
            let (mut d, approvable) =
                crate::approval::classify(&policy, &task.agent, tool, action, &ctx);
            // A grant the task holds only with a person's approval: policy
            // allowing it now does not spare the person.
            let grant = || Grant {
                tool: tool.name.clone(),
                action: action.clone(),
            };
            if d.allowed && !task_held.is_empty() && task_held.contains(&grant()) {
                let grant = grant();
                d.allowed = false;
                d.reason = format!(
                    "{}; the task holds `{grant}` only with a person's approval at each use",
                    d.reason
                );
                return (action, d, true);
            }
            (action, d, approvable)
        })
        .collect();
    // When policy allows every action outright, the `token.issued` record
    // below carries the decisions (one record per exchange, the hot path);
    // otherwise each action's decision is a record of its own.
    let all_allowed = decisions.iter().all(|(_, d, _)| d.allowed);
    let mut writes = Vec::new();
    let mut allowed = Vec::new();
    let mut needs_approval = Vec::new();
    for (action, d, approvable) in &decisions {
        if !all_allowed {
            let mut a = base.clone();
            a.decision = Some(if d.allowed { "allow" } else { "deny" }.into());
            a.policies.clone_from(&d.policies);
            a.reason = Some(if *approvable {
                format!("{}; allowed with a person's approval", d.reason)
            } else {
                d.reason.clone()
            });
            a.tool = Some(tool.name.to_string());
            a.actions = Some(action.to_string());
            writes.push(Write::Audit(Box::new(a)));
        }
        if d.allowed || *approvable {
            allowed.push((*action).clone());
        }
        if *approvable {
            needs_approval.push((*action).clone());
        }
    }
    if !needs_approval.is_empty() {
        // The whole step waits for a person; what policy refuses outright
        // is left out of it.
        let step: ActionSet = allowed.into_iter().collect();
        let approvable: ActionSet = needs_approval.into_iter().collect();
        if let Some(b) = binding {
            // Asking may commit nothing of its own (the step may wait
            // already): the proof is recorded first, on its own, so that
            // no other replica asks again with it.
            match st.store.commit(vec![b.spent()]).await {
                Ok(()) => {}
                Err(scrip_store::StoreError::ProofUsed) => {
                    let mut a = base.clone();
                    a.event = "token.refused".into();
                    a.tool = Some(tool.name.to_string());
                    a.actions = Some(step.to_string());
                    return Err(refuse_replayed(st, writes, a, "").await);
                }
                Err(e) => return Err(e.into()),
            }
        }
        return crate::approval::request(
            st,
            &task,
            tool.name.as_str(),
            (&step, &approvable),
            writes,
            &base,
        )
        .await;
    }
    if allowed.is_empty() {
        st.store.commit(writes).await?;
        return Err(OAuthError::access_denied(
            "policy allows none of the requested actions",
        ));
    }
    let allowed: ActionSet = allowed.into_iter().collect();
    let exp = derived_expiry(now, st.config.access_token_ttl, task.expires_at);
    let jti = scrip_jose::random_id().map_err(|_| OAuthError::server_error())?;
    let client_id = task
        .actor
        .as_ref()
        .map_or_else(|| task.agent.subject.clone(), |a| a.sub.clone());
    let access = AccessClaims {
        iss: st.issuer.clone(),
        sub: task.agent.subject.clone(),
        agent_iss: Some(task.agent.issuer.clone()),
        aud: tool.name.to_string(),
        iat: now,
        exp,
        jti: jti.clone(),
        client_id,
        scope: allowed.to_string(),
        txn: task.id.clone(),
        act: task.actor.clone(),
        approval: None,
        cnf,
    };
    let token = st.sign(TokenKind::Access, &access)?;
    let mut issued = base.clone();
    issued.event = "token.issued".into();
    issued.decision = Some("allow".into());
    issued.tool = Some(tool.name.to_string());
    issued.actions = Some(access.scope.clone());
    issued.jti = Some(jti.clone());
    if all_allowed {
        let mut policies: Vec<String> = decisions
            .iter()
            .flat_map(|(_, d, _)| d.policies.iter().cloned())
            .collect();
        policies.sort_unstable();
        policies.dedup();
        issued.policies = policies;
        issued.reason = Some(match decisions.as_slice() {
            [(_, d, _)] => d.reason.clone(),
            many => many
                .iter()
                .map(|(action, d, _)| format!("{action}: {}", d.reason))
                .collect::<Vec<_>>()
                .join("; "),
        });
    }
    // Whether the token is any use without its key, for whoever finds it.
    if let Some(c) = access.cnf.as_ref() {
        let decided = issued.reason.take().unwrap_or_default();
        issued.reason = Some(if decided.is_empty() {
            format!("bound to DPoP key {}", c.jkt)
        } else {
            format!("{decided}; bound to DPoP key {}", c.jkt)
        });
    }
    // The decisions' own records, kept should the task have ended.
    let decided = writes.clone();
    writes.push(Write::Audit(Box::new(issued)));
    // A task ended since it was read above (on any replica) gets nothing.
    writes.push(Write::TaskOpen {
        id: task.id.clone(),
    });
    if let Some(b) = binding {
        writes.push(b.spent());
    }
    match st.store.commit(writes).await {
        Ok(()) => {}
        // Another replica took the proof first: a replayed request, refused
        // on the record as this replica refuses one it saw.
        Err(scrip_store::StoreError::ProofUsed) => {
            let mut a = base.clone();
            a.event = "token.refused".into();
            a.tool = Some(tool.name.to_string());
            a.actions = Some(access.scope.clone());
            return Err(refuse_replayed(st, decided, a, "").await);
        }
        Err(scrip_store::StoreError::Conflict(_)) => {
            let e = OAuthError::invalid_request("subject_token: the task has ended");
            let mut a = base.clone();
            a.event = "token.refused".into();
            a.decision = Some("deny".into());
            a.tool = Some(tool.name.to_string());
            a.actions = Some(access.scope.clone());
            a.reason = Some(e.description.clone());
            let mut records = decided;
            records.push(Write::Audit(Box::new(a)));
            st.store.commit(records).await?;
            return Err(e);
        }
        Err(e) => return Err(e.into()),
    }
    // Per request, so at debug: the audit trail has every issuance.
    tracing::debug!(task = %task.id, jti = %jti, tool = %tool.name, scope = %access.scope, "access token issued");
    Ok(Issued::access_token(
        &token,
        exp.saturating_sub(now),
        &access.scope,
        access.cnf.is_some(),
    ))
}
