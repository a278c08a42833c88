//! `POST /revoke`: RFC 7009 token revocation.
//!
//! Whoever holds a token may revoke it, so no client authentication is
//! asked: proving possession of a validly signed scrip token is enough. A
//! task token ends its task, its descendants and everything issued under
//! them; an access token is revoked alone. Unknown, invalid and expired
//! tokens answer 200, as RFC 7009 §2.2 asks.

use std::net::SocketAddr;

use axum::body::Body;
use axum::extract::{ConnectInfo, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use scrip_store::{TaskState, Write};

use crate::error::OAuthError;
use crate::form::Form;
use crate::state::{AppState, Inner, OwnToken, now};

/// `POST /revoke`.
pub async fn revoke_endpoint(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let result = async {
        let form = Form::read(&headers, body).await?;
        let token = form.require("token")?;
        revoke(&state.0, token, peer).await
    }
    .await;
    match result {
        Ok(()) => (StatusCode::OK, [(header::CACHE_CONTROL, "no-store")]).into_response(),
        Err(e) => e.into_response(),
    }
}

/// Revokes `token` if it is a valid scrip token.
pub(crate) async fn revoke(st: &Inner, token: &str, peer: SocketAddr) -> Result<(), OAuthError> {
    let Ok(own) = st.verify_any_own_for_revocation(token) else {
        tracing::debug!(client = %peer, "revocation of an unknown or invalid token ignored");
        return Ok(());
    };
    let now = now();
    match own {
        OwnToken::Task(claims) => {
            let Some(task) = st.store.task(&claims.txn).await? else {
                return Ok(());
            };
            if task.state(now) == TaskState::Ended {
                return announce_ended(st, &task, &claims.jti, peer, now).await;
            }
            // For the record only: the commit below ends every open
            // sub-task whether or not they could be listed, so a tree too
            // large to list in time still ends.
            let descendants = st.store.open_descendants(&task.id).await;
            let mut a = st.task_audit("task.ended", &task);
            a.jti = Some(claims.jti.clone());
            a.client = Some(peer.to_string());
            // The commit ends every sub-task open then, including one
            // delegated after this read; the list names those read, the
            // first few of a large tree.
            a.reason = Some(match &descendants {
                Ok(ids) if ids.is_empty() => {
                    "task token revoked; every open sub-task ended with it".to_owned()
                }
                Ok(ids) => format!(
                    "task token revoked; every open sub-task ended with it (open when asked: {})",
                    listed(ids)
                ),
                Err(e) => {
                    tracing::warn!(task = %task.id, error = %e, "could not list the open sub-tasks of a revoked task for its record");
                    "task token revoked; every open sub-task ended with it (they could not be listed)".to_owned()
                }
            });
            let ended = st
                .store
                .commit(vec![
                    Write::EndOpenTask {
                        id: task.id.clone(),
                        at: now,
                        reason: "revoked".into(),
                        // Verifiers accept a token up to their leeway past
                        // its `exp`: the task's event outlives it as long.
                        grace: st.config.clock_skew,
                    },
                    Write::Audit(Box::new(a)),
                ])
                .await;
            match ended {
                Ok(()) => {}
                // Ended meanwhile (another revocation, its expiry): that
                // ending is the one recorded. One at its deadline, by the
                // sweep, published nothing: this revocation still does.
                Err(scrip_store::StoreError::Conflict(_)) => {
                    return match st.store.task(&task.id).await? {
                        Some(t) if t.state(now) == TaskState::Ended => {
                            announce_ended(st, &t, &claims.jti, peer, now).await
                        }
                        _ => Ok(()),
                    };
                }
                Err(e) => return Err(e.into()),
            }
            tracing::info!(task = %task.id, jti = %claims.jti, "task ended by revocation");
        }
        OwnToken::Access(claims) => {
            if st.store.token_revoked(&claims.jti).await? {
                return Ok(());
            }
            let mut a = st.audit("token.revoked");
            // The agent's issuer, without which two issuers' agents of one
            // subject read alike in the trail: the token's, or (a token of
            // an older scrip) its task's.
            a.agent_iss = match &claims.agent_iss {
                Some(iss) => Some(iss.clone()),
                None => st.store.task(&claims.txn).await?.map(|t| t.agent.issuer),
            };
            a.agent_sub = Some(claims.sub.clone());
            a.task_id = Some(claims.txn.clone());
            a.chain = claims
                .act
                .as_ref()
                .map(scrip_token::Actor::chain)
                .unwrap_or_default();
            a.tool = Some(claims.aud.clone());
            a.actions = Some(claims.scope.clone());
            a.jti = Some(claims.jti.clone());
            a.client = Some(peer.to_string());
            // Once: of concurrent revocations (on any replica) one commits,
            // and the record is its; the others change nothing. Whatever
            // the task's state: one ended at its deadline put nothing in
            // the feed, and verifiers take its tokens a leeway past `exp`.
            let revoked = st
                .store
                .commit(vec![
                    Write::RevokeTokenOnce {
                        jti: claims.jti.clone(),
                        task_id: claims.txn.clone(),
                        expires_at: claims.exp.saturating_add(st.config.clock_skew),
                        at: now,
                    },
                    Write::Audit(Box::new(a)),
                ])
                .await;
            match revoked {
                Ok(()) => {}
                Err(scrip_store::StoreError::Conflict(_)) => return Ok(()),
                Err(e) => return Err(e.into()),
            }
            tracing::info!(jti = %claims.jti, task = %claims.txn, "access token revoked");
        }
    }
    Ok(())
}

/// A task that ended at its deadline (its tokens expiring with it, so the
/// sweep published nothing) whose task token is revoked now: within the
/// leeway verifiers allow past `exp`, its end and its sub-tasks' are put in
/// the revocation feed.
async fn announce_ended(
    st: &Inner,
    task: &scrip_store::TaskRecord,
    jti: &str,
    peer: SocketAddr,
    now: u64,
) -> Result<(), OAuthError> {
    // Verifiers accept a token up to their leeway past its `exp`: within
    // that, whoever revokes the task token still reaches them. Only a task
    // that ended at (or after) its deadline: one ended before it, by a
    // revocation of it or of a parent, has its event. `AnnounceEnded`
    // refuses a task that has one.
    let at_deadline = task.ended_at.is_some_and(|e| e >= task.expires_at);
    let until = task.expires_at.saturating_add(st.config.clock_skew);
    // Once per task on this replica once published: a revocation repeated
    // would otherwise reach the store as a conflict each time, and a
    // conflict costs a batch its group commit. Marked only once the store
    // has it, so that a revocation racing one whose commit fails is not
    // answered 200 with nothing published.
    let published = || {
        st.announced
            .lock()
            .is_ok_and(|seen| seen.contains_key(&task.id))
    };
    if at_deadline && now < until && !published() {
        let mut a = st.task_audit("task.end_published", task);
        a.jti = Some(jti.to_owned());
        a.client = Some(peer.to_string());
        a.reason = Some(
            "task token revoked just after the task ended; its end and its sub-tasks' are published to the revocation feed"
                .into(),
        );
        let announced = st
            .store
            .commit(vec![
                Write::AnnounceEnded {
                    id: task.id.clone(),
                    at: now,
                    grace: st.config.clock_skew,
                },
                Write::Audit(Box::new(a)),
            ])
            .await;
        match announced {
            // Published, now or already (by a revocation before this one,
            // here or on another replica).
            Ok(()) | Err(scrip_store::StoreError::Conflict(_)) => {
                if let Ok(mut seen) = st.announced.lock() {
                    if seen.len() > 10_000 {
                        seen.retain(|_, u| *u > now);
                    }
                    seen.insert(task.id.clone(), until);
                }
            }
            // Not published: a later revocation may.
            Err(e) => return Err(e.into()),
        }
    }
    Ok(())
}

/// The sub-tasks a record names: all of a few, the first [`LISTED`] of
/// many and how many more.
fn listed(ids: &[String]) -> String {
    match ids.get(..LISTED) {
        Some(first) if ids.len() > LISTED => {
            format!("{} and {} more", first.join(", "), ids.len() - LISTED)
        }
        _ => ids.join(", "),
    }
}

/// How many sub-task ids a revocation record names at most.
const LISTED: usize = 20;

#[cfg(test)]
mod tests {
    use super::{LISTED, listed};

    #[test]
    fn a_large_tree_is_named_by_its_first_sub_tasks_and_a_count() {
        let ids: Vec<String> = (0..LISTED + 5).map(|i| format!("t{i}")).collect();
        assert_eq!(listed(&ids[..2]), "t0, t1");
        assert_eq!(listed(&ids[..LISTED]), ids[..LISTED].join(", "));
        let text = listed(&ids);
        assert!(text.ends_with(", t19 and 5 more"), "{text}");
        assert!(!text.contains("t20"), "{text}");
    }
}
