//! Delegation (RFC 8693 with an `actor_token`): a task's holder gives a
//! sub-agent a child task.
//!
//! Attenuation is enforced here, whatever the policy says: the child's grants
//! are a subset of the parent's, its deadline is not later, its depth is at
//! most `max_delegation_depth`, the actor must be one the parent allows
//! (`may_act`, which binds the parent's whole subtree), a task bound to a
//! DPoP key delegates only to a sub-task bound to one (`dpop_jkt`, the
//! sub-agent's), and a refusal is audited (`task.refused`). `sub` stays the original agent; `act` names the sub-agent,
//! nested per RFC 8693 §4.1 with the parent's chain inside, so the chain is
//! never dropped or rewritten. Ending the parent ends the child (the store
//! ends descendants); ending the child leaves the parent.

use std::net::SocketAddr;

use axum::response::Response;
use scrip_policy::{RequestContext, Stage};
use scrip_store::{TaskRecord, Write};
use scrip_token::{
    Actor, GrantSet, MayAct, TaskClaims, TaskContext, TokenKind, WorkloadIdentity, token_type,
};

use crate::error::OAuthError;
use crate::exchange::{Issued, active_task, decide_grants, parse_details};
use crate::form::{Form, short, shown_value};
use crate::state::{Inner, now};

/// Issues a child task token for the sub-agent named by `actor_token`.
pub(crate) async fn delegate(
    st: &Inner,
    form: &Form,
    subject_token: &str,
    peer: SocketAddr,
    binding: Option<&crate::exchange::Binding>,
) -> Result<Response, OAuthError> {
    let actor_token = form.require("actor_token")?;
    match form.require("actor_token_type")? {
        token_type::JWT => {}
        other => {
            return Err(OAuthError::invalid_request(format!(
                "actor_token_type {} is not supported; the actor is a workload identity ({})",
                shown_value(other),
                token_type::JWT
            )));
        }
    }
    if form.get("audience").is_some() || form.get("resource").is_some() {
        // RFC 8693 §2.2.2: no token is issued for a target named here.
        return Err(OAuthError::invalid_target(
            "audience and resource name a tool for an access token; a delegation asks for grants in `scope`",
        ));
    }
    let claims = st
        .verify_own::<TaskClaims>(subject_token, TokenKind::Task)
        .map_err(|e| OAuthError::invalid_request(format!("subject_token: {e}")))?
        .claims;
    let now = now();
    let Some(parent) = active_task(st, &claims, now).await? else {
        let e = OAuthError::invalid_request("subject_token: the task has ended");
        return Err(crate::exchange::refuse_ended(
            st,
            &claims,
            "task.refused",
            crate::exchange::Asked {
                tool: None,
                actions: None,
                what: "a delegation".into(),
            },
            peer,
            e,
        )
        .await);
    };
    // An identified task refused (without its DPoP key, or asking for more
    // than it holds) is audited like an access-token request beyond the
    // task (`token.refused`), naming the actor once it is known.
    let task: &TaskRecord = &parent;
    // Once the actor is verified, the record names it, and its identity
    // (its token's `jti` and run).
    let refuse = |e: OAuthError, to: Option<&WorkloadIdentity>| {
        let mut a = st.task_audit("task.refused", task);
        a.decision = Some("deny".into());
        // Only a scope of configured grants: other text may be a secret.
        a.actions = crate::exchange::configured_grants(st, form);
        let to = to.map_or_else(String::new, |actor| {
            a.identity = actor.provenance();
            format!(" to {} ({})", short(&actor.subject), short(&actor.issuer))
        });
        a.reason = Some(format!("delegation{to}: {}", e.description));
        a.client = Some(peer.to_string());
        async move { Err::<Response, OAuthError>(st.refusal_recorded(a, e).await) }
    };
    // A bound parent delegates only with a proof by its key: its token
    // without the key is most likely stolen, and is refused on the record
    // before anything else the request holds is looked at. The proof is
    // the parent's, and is spent: a proof is accepted once, whatever the
    // grant. The child is bound to the key `dpop_jkt` names, the
    // sub-agent's.
    if let Err(e) = crate::exchange::check_task_binding(claims.cnf.as_ref(), binding)
        .and_then(|()| binding.map_or(Ok(()), |b| b.unspent(st)))
    {
        return refuse(e, None).await;
    }
    // The pace of the parent's holder (who asks), before the actor's
    // identity is verified; not for a replayed request (refused above).
    let holder = crate::limits::holder(task);
    if let Err(r) = st.limits.tasks.take(holder.0, holder.1) {
        let mut a = st.task_audit("task.refused", task);
        a.actions = crate::exchange::configured_grants(st, form);
        a.client = Some(peer.to_string());
        a.reason = Some("delegation: ".into());
        return Err(st
            .refusal_over_pace(holder, a, r, ("tasks", "tasks_per_minute"))
            .await);
    }
    let actor = match st.identities.verify(actor_token).await {
        Ok(a) => a,
        Err(e @ scrip_identity::IdentityError::KeysUnavailable) => {
            return Err(crate::exchange::identity_error(e));
        }
        Err(e) => return Err(OAuthError::invalid_request(format!("actor_token: {e}"))),
    };
    if let Some(b) = binding
        && let Err(e) = b.spend(st)
    {
        // A proof used before: a replayed request, refused on the record.
        return refuse(e, Some(&actor)).await;
    }
    let Asked {
        depth,
        grants,
        purpose,
        ttl,
        may_act,
        dpop_jkt,
    } = match attenuate(st, form, &parent, &actor) {
        Ok(asked) => asked,
        Err(e) if e.status.is_server_error() => return Err(e),
        Err(e) => return refuse(e, Some(&actor)).await,
    };
    // A bound task's tree stays bound: a sub-task that could be used
    // without a key would be the way around the parent's binding.
    if claims.cnf.is_some() && dpop_jkt.is_none() {
        let e = OAuthError::invalid_request(
            "request_details: `dpop_jkt` is required: the tree of a DPoP-bound task stays bound, so name the sub-agent's key by its RFC 7638 thumbprint",
        );
        return refuse(e, Some(&actor)).await;
    }
    // A full tree is refused before anything is decided or signed (a
    // commit the store refuses would cost every request batched with it
    // its group commit); the store checks again, for delegations racing.
    if st
        .store
        .tree_size(&parent.id)
        .await?
        .is_some_and(|n| n >= scrip_store::MAX_SUBTASKS)
    {
        return refuse(OAuthError::invalid_request(full_tree()), Some(&actor)).await;
    }

    let act = Actor {
        sub: actor.subject.clone(),
        iss: Some(actor.issuer.clone()),
        act: parent.actor.clone().map(Box::new),
    };
    let chain = act.chain();
    let task_id = scrip_jose::time_ordered_id().map_err(|_| OAuthError::server_error())?;
    let ctx = RequestContext {
        stage: Stage::Task,
        purpose: purpose.clone(),
        environment: parent.environment.clone(),
        delegation_depth: depth,
        delegation_chain: chain.clone(),
        delegation_issuers: act.issuers(),
        now,
        approved: false,
        method: None,
        path: None,
        dpop_jkt: dpop_jkt.clone(),
    };
    let base = |mut a: scrip_store::AuditEvent| {
        a.agent_iss = Some(parent.agent.issuer.clone());
        a.agent_sub = Some(parent.agent.subject.clone());
        a.task_id = Some(task_id.clone());
        a.parent_id = Some(parent.id.clone());
        a.chain.clone_from(&chain);
        a.environment = Some(parent.environment.clone());
        a.purpose = Some(purpose.clone());
        a.client = Some(peer.to_string());
        a
    };
    let (mut writes, allowed, held) = decide_grants(st, &parent.agent, &grants, &ctx, &base);
    // What the parent holds only with a person's approval, the child does
    // too: delegating does not spare the person.
    let parent_held = crate::exchange::held_grants(&parent)?;
    let held: GrantSet = held
        .iter()
        .chain(parent_held.iter().filter(|g| allowed.contains(g)))
        .cloned()
        .collect();
    if allowed.is_empty() {
        st.store.commit(writes).await?;
        return Err(OAuthError::access_denied(
            "policy allows none of the requested grants to this sub-agent",
        ));
    }
    // Kept for the record should the parent end before the commit.
    let decisions = writes.clone();
    let ttl = ttl.unwrap_or(st.config.task_ttl);
    let exp = scrip_token::derived_expiry(now, ttl, parent.expires_at);
    let jti = scrip_jose::random_id().map_err(|_| OAuthError::server_error())?;
    let child = TaskClaims {
        iss: st.issuer.clone(),
        sub: parent.agent.subject.clone(),
        aud: st.issuer.clone(),
        iat: now,
        exp,
        jti: jti.clone(),
        txn: task_id.clone(),
        scope: allowed.to_string(),
        tctx: TaskContext {
            purpose: purpose.clone(),
            environment: parent.environment.clone(),
            depth,
            agent_iss: parent.agent.issuer.clone(),
            parent: Some(parent.id.clone()),
        },
        act: Some(act.clone()),
        cnf: dpop_jkt.map(|jkt| scrip_token::Confirmation { jkt }),
    };
    let token = st.sign(TokenKind::Task, &child)?;
    // Every token below carries the whole `act` chain: one that verifiers
    // would refuse as too large (with room for what an access token adds)
    // is not issued.
    if token.len().saturating_add(TOKEN_ROOM) > scrip_jose::MAX_TOKEN_BYTES {
        let why = format!(
            "the delegation chain is too long: the sub-task's token would be {} bytes, and tokens stay under {} with room for an access token's claims; delegate from a shallower task, or with identities of shorter subjects",
            token.len(),
            scrip_jose::MAX_TOKEN_BYTES.saturating_sub(TOKEN_ROOM)
        );
        let mut refused = base(st.audit("task.refused"));
        refused.decision = Some("deny".into());
        refused.actions = Some(allowed.to_string());
        refused.identity = actor.provenance();
        refused.reason = Some(why.clone());
        let mut record = decisions;
        record.push(Write::Audit(Box::new(refused)));
        st.store.commit(record).await?;
        return Err(OAuthError::invalid_request(why));
    }
    let mut started = base(st.audit("task.delegated"));
    started.decision = Some("allow".into());
    started.actions = Some(child.scope.clone());
    started.jti = Some(jti.clone());
    started.identity = actor.provenance();
    started.reason = child
        .cnf
        .as_ref()
        .map(|c| format!("bound to DPoP key {}", c.jkt));
    writes.push(Write::InsertTask(Box::new(TaskRecord {
        id: task_id.clone(),
        parent: Some(parent.id.clone()),
        agent: parent.agent.clone(),
        actor: Some(act),
        may_act,
        grants: child.scope.clone(),
        held: held.to_string(),
        purpose: purpose.clone(),
        environment: parent.environment.clone(),
        depth,
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
        // Another replica took the proof first: a replayed delegation,
        // refused on the record with the decisions on it.
        Err(scrip_store::StoreError::ProofUsed) => {
            let mut a = base(st.audit("task.refused"));
            a.actions = Some(allowed.to_string());
            a.identity = actor.provenance();
            let about = format!(
                "delegation to {} ({}): ",
                short(&actor.subject),
                short(&actor.issuer)
            );
            return Err(crate::exchange::refuse_replayed(st, decisions, a, &about).await);
        }
        // The parent ended after it was read, or its tree is full: the
        // store refuses the child (and its records), so ending a task
        // always ends its children, in a transaction of bounded size. The
        // decisions, and the refusal, still go on the record.
        Err(scrip_store::StoreError::Conflict(_)) => {
            let ended = st
                .store
                .task(&parent.id)
                .await?
                .is_none_or(|t| t.ended_at.is_some());
            let (e, why) = if ended {
                (
                    OAuthError::invalid_request("subject_token: the task has ended"),
                    "the parent task ended before the sub-task was stored".to_owned(),
                )
            } else {
                (OAuthError::invalid_request(full_tree()), full_tree())
            };
            let mut refused = base(st.audit("task.refused"));
            refused.decision = Some("deny".into());
            refused.actions = Some(allowed.to_string());
            refused.identity = actor.provenance();
            refused.reason = Some(format!(
                "delegation to {} ({}): {why}",
                short(&actor.subject),
                short(&actor.issuer)
            ));
            let mut record = decisions;
            record.push(Write::Audit(Box::new(refused)));
            st.store.commit(record).await?;
            return Err(e);
        }
        Err(e) => return Err(e.into()),
    }
    tracing::info!(task = %task_id, parent = %parent.id, jti = %jti, actor = %actor.subject, depth, "task delegated");
    Ok(Issued::task_token(
        &token,
        exp.saturating_sub(now),
        &child.scope,
    ))
}

/// Why a delegation into a tree of [`scrip_store::MAX_SUBTASKS`] is refused.
fn full_tree() -> String {
    format!(
        "this task's tree holds {} sub-tasks, the most one tree may",
        scrip_store::MAX_SUBTASKS
    )
}

/// Bytes a sub-task's token leaves below [`scrip_jose::MAX_TOKEN_BYTES`]:
/// its access tokens carry the same `act` chain, plus a `client_id` (a
/// subject, up to 2 KiB), the approval and the key.
const TOKEN_ROOM: usize = 4096;

/// What a delegation asks for, once it is shown to be within the parent.
struct Asked {
    depth: u32,
    grants: GrantSet,
    purpose: String,
    ttl: Option<u64>,
    may_act: Vec<MayAct>,
    /// The sub-agent's DPoP key, which the child is bound to.
    dpop_jkt: Option<String>,
}

/// Attenuation, whatever the policy says: depth, `may_act`, grants and
/// environment within the parent's.
fn attenuate(
    st: &Inner,
    form: &Form,
    parent: &TaskRecord,
    actor: &WorkloadIdentity,
) -> Result<Asked, OAuthError> {
    let depth = parent.depth.saturating_add(1);
    if depth > st.config.max_delegation_depth {
        return Err(OAuthError::invalid_request(format!(
            "delegation deeper than {} is not allowed",
            st.config.max_delegation_depth
        )));
    }
    if !parent.may_act.is_empty()
        && !parent
            .may_act
            .iter()
            .any(|m| m.matches(&actor.issuer, &actor.subject))
    {
        return Err(OAuthError::invalid_request(
            "actor_token: this actor is not one the task allows to act for it (may_act)",
        ));
    }
    // With separation of duties, a person who approves steps is not made a
    // sub-agent: whoever delegates holds the actor's identity token, which
    // signs in to the approvals too. scrip cannot tell who holds a token, so
    // this only keeps any set-up from needing an approver's token in an
    // agent's hands (and puts one that does on the record); the token
    // itself still approves. Not one the tree's agent could sign in as
    // already (a local agent of the uid the person is known by). (Without
    // separation of duties, anyone may approve their own steps already.)
    if st.config.separation_of_duties && crate::approval::approver_outside(st, parent, actor) {
        return Err(OAuthError::invalid_request(
            "actor_token: this identity signs in as one of the approvers; with separation_of_duties, an approver is not made a sub-agent: an approver's identity token must never be in an agent's hands, since whoever holds it can approve steps",
        ));
    }
    let parent_grants = GrantSet::parse(&parent.grants).map_err(|_| OAuthError::server_error())?;
    let grants = match form.get("scope") {
        None => parent_grants.clone(),
        Some(s) => GrantSet::parse(s).map_err(|e| OAuthError::invalid_scope(e.to_string()))?,
    };
    if let Some(beyond) = grants.iter().find(|g| !parent_grants.contains(g)) {
        // Quoted only when it is a configured grant: other text may be a
        // secret in the wrong place.
        let known = st
            .config
            .tool(beyond.tool.as_str())
            .is_some_and(|t| t.actions.contains(&beyond.action));
        return Err(OAuthError::invalid_scope(if known {
            format!("scope exceeds the parent task's grants: the task does not hold `{beyond}`")
        } else {
            "scope exceeds the parent task's grants: it names a tool or action that is not configured".to_owned()
        }));
    }
    let details = parse_details(form)?;
    let (purpose, ttl, may_act, dpop_jkt) = match details {
        Some(d) => {
            if d.environment
                .as_ref()
                .is_some_and(|e| *e != parent.environment)
            {
                return Err(OAuthError::invalid_request(
                    "request_details: a delegated task keeps its parent's environment",
                ));
            }
            (
                d.purpose.unwrap_or_else(|| parent.purpose.clone()),
                d.ttl,
                d.may_act,
                d.dpop_jkt,
            )
        }
        None => (parent.purpose.clone(), None, Vec::new(), None),
    };
    // The tickets a purpose names are what policies trust it for: a
    // sub-agent may drop its parent's, never name one the parent did not.
    if let Some(ticket) = scrip_policy::tickets(&purpose)
        .find(|t| !scrip_policy::tickets(&parent.purpose).any(|p| p == *t))
    {
        return Err(OAuthError::invalid_request(format!(
            "request_details: a delegated task's purpose may not name a ticket its parent's does not (`{}`)",
            short(ticket)
        )));
    }
    // Its first is the task's `context.ticket`: a sub-agent that names
    // tickets keeps its parent's first one first, so that it cannot choose
    // among its parent's the one a policy treats more kindly.
    let first = scrip_policy::find_ticket(&parent.purpose);
    if let Some(ticket) = scrip_policy::find_ticket(&purpose).filter(|t| Some(*t) != first) {
        return Err(OAuthError::invalid_request(format!(
            "request_details: a delegated task's purpose names its parent's first ticket (`{}`) first, or no ticket (it named `{}` first)",
            first.map(short).unwrap_or_default(),
            short(ticket)
        )));
    }
    let may_act = attenuate_may_act(&parent.may_act, may_act)?;
    Ok(Asked {
        depth,
        grants,
        purpose,
        ttl,
        may_act,
        dpop_jkt,
    })
}

/// The `may_act` of a child task: never wider than its parent's. A parent
/// that names who may act for it names them for its whole subtree: a child
/// that names nobody inherits the parent's list, and every entry a child
/// names must be one the parent's list covers (the same `sub`, and the same
/// `iss` unless the parent's entry leaves it open). Otherwise a sub-agent
/// the root allowed could hand the task on to anyone.
fn attenuate_may_act(parent: &[MayAct], asked: Vec<MayAct>) -> Result<Vec<MayAct>, OAuthError> {
    if parent.is_empty() {
        return Ok(asked);
    }
    if asked.is_empty() {
        return Ok(parent.to_vec());
    }
    let covered = |m: &MayAct| {
        parent.iter().any(|p| {
            p.sub == m.sub
                && match (&p.iss, &m.iss) {
                    (None, _) => true,
                    (Some(pi), Some(mi)) => pi == mi,
                    (Some(_), None) => false,
                }
        })
    };
    match asked.iter().find(|m| !covered(m)) {
        None => Ok(asked),
        Some(m) => Err(OAuthError::invalid_request(format!(
            "request_details: `may_act` may only narrow the parent task's; it does not allow `{}`{}",
            short(&m.sub),
            if m.iss.is_none() {
                " from any issuer"
            } else {
                ""
            }
        ))),
    }
}
