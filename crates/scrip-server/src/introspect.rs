//! `POST /introspect`: RFC 7662 token introspection.
//!
//! The caller authenticates with its own workload identity
//! (`Authorization: Bearer <identity JWT>` from a trusted issuer); there is
//! no shared secret. Inactive, unknown, expired, revoked and garbage tokens
//! all answer exactly `{"active":false}`, so the answer tells nothing about
//! why.

use axum::Json;
use axum::body::Body;
use std::net::SocketAddr;

use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Response};
use serde_json::{Value, json};

use crate::error::OAuthError;
use crate::exchange::active_task;
use crate::form::Form;
use crate::state::{AppState, Inner, OwnToken, now};

/// `POST /introspect`.
pub async fn introspect_endpoint(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let st = &state.0;
    let caller = match caller_identity(st, &headers).await {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    let result = async {
        let form = Form::read(&headers, body).await?;
        let token = form.require("token")?;
        let asked = Asked {
            caller: &caller,
            peer,
        };
        let (body, recorded) = introspect(st, token, &asked).await?;
        if !recorded {
            st.store
                .commit(vec![scrip_store::Write::Audit(Box::new(
                    asked.record(st, &body),
                ))])
                .await?;
        }
        Ok::<_, OAuthError>(body)
    }
    .await;
    match result {
        Ok(body) => {
            let mut r = Json(body).into_response();
            r.headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            r
        }
        Err(e) => e.into_response(),
    }
}

/// Marks a single-use token used; `false` when it already was, here or on
/// another replica. The first presentation is answered active, every later
/// one inactive. `also` is committed with the claim (and only with it): the
/// record of the answer that spends the use, so that the use is never spent
/// by a commit whose answer could not be recorded.
pub(crate) async fn claim_once(
    st: &Inner,
    c: &scrip_token::AccessClaims,
    now: u64,
    also: Vec<scrip_store::Write>,
) -> Result<bool, OAuthError> {
    {
        let Ok(mut used) = st.used_once.lock() else {
            return Ok(false);
        };
        if used.len() > 10_000 {
            used.retain(|_, exp| *exp > now);
        }
        if used.insert(c.jti.clone(), c.exp).is_some() {
            return Ok(false);
        }
    }
    // Until the store answers, the mark is only this request's: dropped
    // before then (its caller went away while the commit waited), it is
    // taken back, and the store decides the next presentation.
    let mut mark = Unmark {
        st,
        jti: Some(&c.jti),
    };
    let mut a = st.audit("token.used");
    a.agent_iss.clone_from(&c.agent_iss);
    a.agent_sub = Some(c.sub.clone());
    a.chain = c
        .act
        .as_ref()
        .map(scrip_token::Actor::chain)
        .unwrap_or_default();
    a.task_id = Some(c.txn.clone());
    a.jti = Some(c.jti.clone());
    a.tool = Some(c.aud.clone());
    a.reason = Some("single-use token presented".into());
    // The store decides across replicas: of several concurrent
    // presentations, on any replica, exactly one commit wins.
    let mut writes = vec![
        scrip_store::Write::ClaimToken {
            jti: c.jti.clone(),
            task_id: c.txn.clone(),
            expires_at: c.exp.saturating_add(st.config.clock_skew),
            at: now,
        },
        scrip_store::Write::Audit(Box::new(a)),
    ];
    writes.extend(also);
    match st.store.commit(writes).await {
        Ok(()) => {
            mark.jti = None;
            Ok(true)
        }
        Err(scrip_store::StoreError::Conflict(_)) => {
            mark.jti = None;
            Ok(false)
        }
        // Not claimed: the token may be presented again (`mark` is taken
        // back).
        Err(e) => Err(e.into()),
    }
}

/// Takes a single use's mark out of `used_once` when dropped while armed.
/// Taking it back after a claim the store did commit is harmless: the
/// store refuses the next claim.
struct Unmark<'a> {
    st: &'a Inner,
    jti: Option<&'a str>,
}

impl Drop for Unmark<'_> {
    fn drop(&mut self) {
        if let Some(jti) = self.jti.take()
            && let Ok(mut used) = self.st.used_once.lock()
        {
            used.remove(jti);
        }
    }
}

/// Authenticates the caller of introspection and the revocation feed by its
/// own workload identity (`Authorization: Bearer <identity JWT>`).
pub(crate) async fn caller_identity(
    st: &Inner,
    headers: &HeaderMap,
) -> Result<scrip_token::WorkloadIdentity, OAuthError> {
    let Some(token) = bearer(headers) else {
        return Err(OAuthError::no_credentials(
            "authenticate with your workload identity: `Authorization: Bearer <identity JWT>`",
        ));
    };
    match st.identities.verify(token).await {
        Ok(identity) => Ok(identity),
        Err(e @ scrip_identity::IdentityError::KeysUnavailable) => {
            Err(crate::exchange::identity_error(e))
        }
        Err(e) => Err(OAuthError::invalid_token(format!("caller identity: {e}"))),
    }
}

/// Who asked for an introspection.
struct Asked<'a> {
    caller: &'a scrip_token::WorkloadIdentity,
    peer: SocketAddr,
}

impl Asked<'_> {
    /// The introspection's audit record: who asked, about which token, and
    /// the answer.
    fn record(&self, st: &Inner, body: &Value) -> scrip_store::AuditEvent {
        let active = body.get("active").and_then(Value::as_bool).unwrap_or(false);
        let text = |k: &str| body.get(k).and_then(Value::as_str).map(str::to_owned);
        let mut a = st.audit("token.introspected");
        a.agent_iss = Some(self.caller.issuer.clone());
        a.agent_sub = Some(self.caller.subject.clone());
        a.task_id = text("txn");
        a.jti = text("jti");
        a.tool = text("aud").filter(|aud| *aud != st.issuer);
        a.actions = text("scope");
        a.decision = Some(if active { "allow" } else { "deny" }.into());
        a.reason = Some(if active { "active" } else { "inactive" }.into());
        a.client = Some(self.peer.to_string());
        a
    }
}

/// Whether `caller` is the task's agent, or a sub-agent in its chain.
fn acts_for(task: &scrip_store::TaskRecord, caller: &scrip_token::WorkloadIdentity) -> bool {
    if task.agent.issuer == caller.issuer && task.agent.subject == caller.subject {
        return true;
    }
    let mut actor = task.actor.as_ref();
    while let Some(a) = actor {
        if a.sub == caller.subject && a.iss.as_deref() == Some(caller.issuer.as_str()) {
            return true;
        }
        actor = a.act.as_deref();
    }
    false
}

fn bearer(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

fn inactive() -> Value {
    json!({ "active": false })
}

/// A token of scrip's own whose signature verified: its inactive answer's
/// record names it, and why (the answer itself says nothing).
struct Known<'a> {
    txn: &'a str,
    jti: &'a str,
    tool: Option<&'a str>,
}

impl Known<'_> {
    /// `{"active":false}`, its record committed.
    async fn inactive(
        &self,
        st: &Inner,
        asked: &Asked<'_>,
        why: &str,
    ) -> Result<(Value, bool), OAuthError> {
        let mut a = asked.record(st, &inactive());
        a.task_id = Some(self.txn.to_owned());
        a.jti = Some(self.jti.to_owned());
        a.tool = self.tool.map(str::to_owned);
        a.reason = Some(why.to_owned());
        st.store
            .commit(vec![scrip_store::Write::Audit(Box::new(a))])
            .await?;
        Ok((inactive(), true))
    }
}

/// The answer, and whether its audit record was committed already (with
/// the claim of a single use, which it spends).
async fn introspect(
    st: &Inner,
    token: &str,
    asked: &Asked<'_>,
) -> Result<(Value, bool), OAuthError> {
    let Ok(own) = st.verify_any_own(token) else {
        return Ok((inactive(), false));
    };
    let now = now();
    match own {
        OwnToken::Task(c) => {
            let known = Known {
                txn: &c.txn,
                jti: &c.jti,
                tool: None,
            };
            let Some(task) = active_task(st, &c, now).await? else {
                return known
                    .inactive(st, asked, "inactive: the task has ended")
                    .await;
            };
            // RFC 7662 §4: a token is active only to a resource server it
            // can be used at. A task token is used at none (only at this
            // token endpoint, by whoever acts for the task): it is active
            // to the task's agent and the sub-agents in its chain alone.
            if !acts_for(&task, asked.caller) {
                return known
                    .inactive(
                        st,
                        asked,
                        "inactive: a task token is active only to its agent and the sub-agents acting for it",
                    )
                    .await;
            }
            // The current actor, as in the task's access tokens.
            let client_id = c.act.as_ref().map_or(&c.sub, |a| &a.sub);
            let mut body = json!({
                "active": true,
                "token_type": "N_A",
                "iss": c.iss, "sub": c.sub, "aud": c.aud, "iat": c.iat, "exp": c.exp,
                "jti": c.jti, "txn": c.txn, "scope": c.scope, "client_id": client_id, "tctx": c.tctx,
            });
            if let (Some(act), Some(obj)) = (c.act.as_ref(), body.as_object_mut()) {
                obj.insert(
                    "act".into(),
                    serde_json::to_value(act).unwrap_or(Value::Null),
                );
            }
            // A bound task names its key (RFC 9449 §6.2).
            if let (Some(cnf), Some(obj)) = (c.cnf.as_ref(), body.as_object_mut()) {
                obj.insert("cnf".into(), json!({ "jkt": cnf.jkt }));
            }
            Ok((body, false))
        }
        OwnToken::Access(c) => {
            let known = Known {
                txn: &c.txn,
                jti: &c.jti,
                tool: Some(&c.aud),
            };
            // RFC 7662 §4: a token is active only to a resource server it
            // can be used at, where the tool names its resource servers
            // (and a single use is not spent by anyone else's question).
            if let Some(tool) = st
                .config
                .tool(&c.aud)
                .filter(|t| !t.introspectors.is_empty())
                && !tool
                    .introspectors
                    .iter()
                    .any(|i| i.issuer == asked.caller.issuer && i.subject == asked.caller.subject)
            {
                return known
                    .inactive(
                        st,
                        asked,
                        "inactive: the caller is none of the tool's introspectors",
                    )
                    .await;
            }
            // Revocation and the task's state are read from the store
            // every time (never from the cache), in one read.
            let Some((task, revoked)) = st.store.token_task(&c.jti, &c.txn).await? else {
                return known
                    .inactive(st, asked, "inactive: its task is unknown")
                    .await;
            };
            let single_use = c.approval.as_ref().is_some_and(|a| a.single_use);
            if revoked {
                // A spent single use is kept as a revocation.
                let why = if single_use {
                    "inactive: its single use was spent, or it was revoked"
                } else {
                    "inactive: revoked"
                };
                return known.inactive(st, asked, why).await;
            }
            if task.state(now) != scrip_store::TaskState::Active {
                return known
                    .inactive(st, asked, "inactive: the task has ended")
                    .await;
            }
            let mut body = json!({
                "active": true,
                "token_type": if c.cnf.is_some() { "DPoP" } else { "Bearer" },
                "iss": c.iss, "sub": c.sub, "aud": c.aud, "iat": c.iat, "exp": c.exp,
                "jti": c.jti, "txn": c.txn, "scope": c.scope, "client_id": c.client_id,
            });
            if let (Some(agent_iss), Some(obj)) = (c.agent_iss.as_ref(), body.as_object_mut()) {
                obj.insert("agent_iss".into(), json!(agent_iss));
            }
            // RFC 9449 §6.2: a bound token's key, so the caller can check
            // the proof that came with it.
            if let (Some(cnf), Some(obj)) = (c.cnf.as_ref(), body.as_object_mut()) {
                obj.insert("cnf".into(), json!({ "jkt": cnf.jkt }));
            }
            if let (Some(act), Some(obj)) = (c.act.as_ref(), body.as_object_mut()) {
                obj.insert(
                    "act".into(),
                    serde_json::to_value(act).unwrap_or(Value::Null),
                );
            }
            if single_use {
                // The one use is spent in the commit that records this
                // answer, or not at all.
                let record = scrip_store::Write::Audit(Box::new(asked.record(st, &body)));
                if !claim_once(st, &c, now, vec![record]).await? {
                    return known
                        .inactive(
                            st,
                            asked,
                            "inactive: its single use was spent, or it was revoked",
                        )
                        .await;
                }
                return Ok((body, true));
            }
            Ok((body, false))
        }
    }
}
