//! The shared state of a running server, and the small helpers every
//! endpoint uses: the clock, verifying scrip's own tokens, audit records.

use std::sync::Arc;

use scrip_config::Config;
use scrip_identity::IdentityVerifier;
use scrip_jose::{Expectations, JoseError, TypRule, Verified};
use scrip_policy::PolicyEngine;
use scrip_store::{AuditEvent, Store};
use scrip_token::{AccessClaims, TaskClaims, TokenKind};
use serde::de::DeserializeOwned;

use crate::cache::Kept;
use crate::error::OAuthError;

/// Seconds since the epoch.
#[must_use]
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Milliseconds since the epoch.
#[must_use]
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Everything a request handler needs.
#[derive(Clone, Debug)]
pub struct AppState(pub(crate) Arc<Inner>);

pub(crate) struct Inner {
    pub config: Config,
    pub issuer: String,
    pub self_audience: Vec<String>,
    /// The keys scrip signs with and publishes (rotating on a shared store).
    pub keyring: std::sync::Arc<crate::keyring::Keyring>,
    /// Single-use tokens already presented to introspection (`jti` → exp).
    pub used_once: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Tasks whose end this replica announced, or found announced (task id
    /// → until when a revocation could announce it), so a revocation
    /// repeated does not reach the store as a conflict each time.
    pub announced: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Last poll per approval, for `slow_down`.
    pub polls: crate::approval::Polls,
    /// Refusals recorded this second, and those counted past the budget.
    pub refusals: Arc<crate::refusals::Refusals>,
    /// How fast one identity may ask for tasks and access tokens.
    pub limits: crate::limits::Limits,
    /// DPoP proofs accepted at the token endpoint, each accepted once.
    pub dpop_proofs: scrip_jose::dpop::ReplayCache,
    /// The approval webhook, when one is configured.
    pub webhook: Option<Arc<Webhook>>,
    pub identities: IdentityVerifier,
    pub policy: crate::policies::Policies,
    pub store: Arc<dyn Store>,
    pub replica: String,
    pub task_typ: TypRule,
    pub access_typ: TypRule,
    /// Verified task tokens and task records, for the exchange path.
    pub cache: crate::cache::ExchangeCache,
    /// Set once shutdown begins: requests that wait for something (the
    /// revocation feed's long polls) answer at once rather than hold up
    /// the drain.
    pub stopping: tokio::sync::watch::Sender<bool>,
    /// The newest revocation, for the feed's waiting requests.
    pub feed: Arc<crate::feed::Head>,
}

impl std::fmt::Debug for Inner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AppState")
            .field("issuer", &self.issuer)
            .field("replica", &self.replica)
            .finish_non_exhaustive()
    }
}

/// Where pending approvals are announced (`approval_webhook`), with its
/// client: built only when a webhook is configured, since building one reads
/// the system's trusted certificates (a few milliseconds of every start).
#[derive(Debug)]
pub(crate) struct Webhook {
    pub url: String,
    pub http: reqwest::Client,
    /// How many calls (with their retries) are under way: a stop waits a
    /// little for them.
    pub sending: Arc<tokio::sync::watch::Sender<usize>>,
    /// How many approvals are being committed, to be announced then.
    pub announcing: Arc<tokio::sync::watch::Sender<usize>>,
}

/// The most webhook calls (with their retries, up to about 27 s each)
/// under way at once: past it a call is dropped, and logged, rather than
/// let an agent asking for steps as fast as the store takes them hold
/// sockets and tasks without bound while the webhook hangs.
pub(crate) const MAX_WEBHOOK_CALLS: usize = 256;

impl Webhook {
    /// Calls it with `body` in the background, retrying, counted in
    /// [`Self::sending`] until done; drops the call when
    /// [`MAX_WEBHOOK_CALLS`] are under way.
    pub fn send(&self, body: serde_json::Value) {
        let mut taken = false;
        self.sending.send_if_modified(|n| {
            taken = *n < MAX_WEBHOOK_CALLS;
            if taken {
                *n += 1;
            }
            taken
        });
        if !taken {
            static BUSY: crate::logs::Budget = crate::logs::Budget::new(10);
            if BUSY.allow("approval webhook busy") {
                tracing::warn!(
                    auth_req_id = body
                        .get("auth_req_id")
                        .and_then(|v| v.as_str())
                        .unwrap_or_default(),
                    "approval webhook busy ({MAX_WEBHOOK_CALLS} calls under way): this step is not announced; approvers still see it in `scrip approvals`"
                );
            }
            return;
        }
        let sent = Counted(self.sending.clone());
        let (http, url) = (self.http.clone(), self.url.clone());
        tokio::spawn(async move {
            crate::approval::notify(http, url, body).await;
            drop(sent);
        });
    }

    /// Counts an approval about to be committed and announced, until the
    /// value returned is dropped: [`Self::finish`] waits for it too, so a
    /// stop does not end before the call it makes.
    pub fn announcing(&self) -> Counted {
        self.announcing.send_modify(|n| *n = n.saturating_add(1));
        Counted(self.announcing.clone())
    }

    /// Waits until no approval is being announced and no call is under
    /// way, or `limit` passed.
    pub async fn finish(&self, limit: std::time::Duration) {
        let mut announcing = self.announcing.subscribe();
        let mut sending = self.sending.subscribe();
        let _ = tokio::time::timeout(limit, async {
            let _ = announcing.wait_for(|n| *n == 0).await;
            let _ = sending.wait_for(|n| *n == 0).await;
        })
        .await;
    }
}

/// One of a count of things under way, uncounted when dropped, however
/// its task ends.
#[derive(Debug)]
pub(crate) struct Counted(pub(crate) Arc<tokio::sync::watch::Sender<usize>>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

/// A verified token of scrip's own.
#[derive(Debug, Clone)]
pub enum OwnToken {
    /// A task token.
    Task(Arc<TaskClaims>),
    /// An access token.
    Access(Arc<AccessClaims>),
}

impl Inner {
    /// The current policy set.
    pub fn policy(&self) -> Arc<PolicyEngine> {
        self.policy.current()
    }

    /// Verifies one of scrip's own tokens of the given kind.
    pub fn verify_own<T: DeserializeOwned>(
        &self,
        token: &str,
        kind: TokenKind,
    ) -> Result<Verified<T>, JoseError> {
        // No leeway on `exp`: scrip issued these tokens. But replicas have
        // clocks of their own, and one running ahead issues tokens whose
        // `iat` (or `nbf`) is in this replica's future; those are checked
        // again with `clock_skew`. `exp` came first in the check that
        // failed and passed without leeway, so only `iat` and `nbf` gain it.
        match self.verify_own_with(token, kind, 0) {
            Err(JoseError::IssuedInFuture | JoseError::NotYetValid) => {
                self.verify_own_with(token, kind, self.config.clock_skew)
            }
            other => other,
        }
    }

    /// [`Self::verify_own`], accepting `exp` up to `leeway` seconds past.
    fn verify_own_with<T: DeserializeOwned>(
        &self,
        token: &str,
        kind: TokenKind,
        leeway: u64,
    ) -> Result<Verified<T>, JoseError> {
        let (typ, audiences): (&TypRule, &[String]) = match kind {
            TokenKind::Task => (&self.task_typ, &self.self_audience),
            // An access token's audience is a tool; any configured tool is
            // acceptable here, and the claims say which.
            TokenKind::Access => (&self.access_typ, &[]),
        };
        let tool_audiences: Vec<String>;
        let audiences = if kind == TokenKind::Access {
            tool_audiences = self
                .config
                .tools
                .iter()
                .map(|t| t.name.to_string())
                .collect();
            &tool_audiences
        } else {
            audiences
        };
        scrip_jose::verify(
            token,
            &self.keyring.verify_keys().snapshot(),
            &Expectations {
                issuer: &self.issuer,
                audiences,
                algorithms: self.keyring.algorithms(),
                typ,
                leeway,
            },
        )
    }

    /// Verifies a task token of scrip's own, from the cache when this exact
    /// token was verified before under the current keys.
    pub fn verify_task(&self, token: &str) -> Result<Arc<TaskClaims>, JoseError> {
        self.verify_kept(token, TokenKind::Task)
    }

    /// Verifies an access token of scrip's own, from the cache when this
    /// exact token was verified before under the current keys. Whether it
    /// was revoked is the store's to say.
    pub fn verify_access(&self, token: &str) -> Result<Arc<AccessClaims>, JoseError> {
        self.verify_kept(token, TokenKind::Access)
    }

    fn verify_kept<C: Kept + DeserializeOwned>(
        &self,
        token: &str,
        kind: TokenKind,
    ) -> Result<Arc<C>, JoseError> {
        match self.cache.verified::<C>(token, now()) {
            Ok(claims) => Ok(claims),
            Err(stamp) => {
                let claims = Arc::new(self.verify_own::<C>(token, kind)?.claims);
                self.cache.put_verified(token, stamp, claims.clone());
                Ok(claims)
            }
        }
    }

    /// Verifies a token of scrip's own, of whichever kind its `typ` says
    /// (each from the cache when verified before under the current keys).
    pub fn verify_any_own(&self, token: &str) -> Result<OwnToken, JoseError> {
        match peek_typ(token).as_deref() {
            Some("txntoken+jwt") => self.verify_task(token).map(OwnToken::Task),
            Some("at+jwt") => self.verify_access(token).map(OwnToken::Access),
            _ => Err(JoseError::WrongType {
                expected: "a scrip task or access token".into(),
                found: "other".into(),
            }),
        }
    }

    /// A token of scrip's own, of whichever kind, up to `clock_skew` past its
    /// `exp`: verifiers accept it that long, so it can still be revoked.
    ///
    /// An access token for a tool no longer configured is revocable too:
    /// a resource server that verifies it offline would still take it, and
    /// its holder must not be told it is revoked when it is not. Its
    /// signature, issuer and type are what make it scrip's.
    pub fn verify_any_own_for_revocation(&self, token: &str) -> Result<OwnToken, JoseError> {
        match self.verify_any_own(token) {
            Err(e @ (JoseError::Expired | JoseError::WrongAudience)) => {
                let leeway = self.config.clock_skew;
                match peek_typ(token).as_deref() {
                    Some("txntoken+jwt") if e == JoseError::Expired => self
                        .verify_own_with(token, TokenKind::Task, leeway)
                        .map(|v| OwnToken::Task(Arc::new(v.claims))),
                    Some("at+jwt") => {
                        let audience = [peek_aud(token).ok_or(JoseError::WrongAudience)?];
                        scrip_jose::verify::<AccessClaims>(
                            token,
                            &self.keyring.verify_keys().snapshot(),
                            &Expectations {
                                issuer: &self.issuer,
                                audiences: &audience,
                                algorithms: self.keyring.algorithms(),
                                typ: &self.access_typ,
                                leeway,
                            },
                        )
                        .map(|v| OwnToken::Access(Arc::new(v.claims)))
                    }
                    _ => Err(e),
                }
            }
            other => other,
        }
    }

    /// Signs one of scrip's tokens; a failure is scrip's, never the client's.
    pub fn sign<T: serde::Serialize>(
        &self,
        kind: TokenKind,
        claims: &T,
    ) -> Result<String, crate::OAuthError> {
        self.keyring
            .signer(now())
            .sign_jwt(kind.typ(), claims)
            .map_err(|e| {
                tracing::error!(error = %e, "signing failed");
                crate::OAuthError::server_error()
            })
    }

    /// A fresh audit record written by this replica.
    pub fn audit(&self, event: &str) -> AuditEvent {
        AuditEvent {
            at_ms: now_ms(),
            event: event.to_owned(),
            replica: self.replica.clone(),
            ..AuditEvent::default()
        }
    }

    /// An audit record of `event` about `task`: its agent, id, parent,
    /// delegation chain, environment and purpose.
    pub fn task_audit(&self, event: &str, task: &scrip_store::TaskRecord) -> AuditEvent {
        let mut a = self.audit(event);
        a.agent_iss = Some(task.agent.issuer.clone());
        a.agent_sub = Some(task.agent.subject.clone());
        a.task_id = Some(task.id.clone());
        a.parent_id.clone_from(&task.parent);
        a.chain = task
            .actor
            .as_ref()
            .map(scrip_token::Actor::chain)
            .unwrap_or_default();
        a.environment = Some(task.environment.clone());
        a.purpose = Some(task.purpose.clone());
        a
    }

    /// Records a refusal (see [`crate::refusals`]), then gives `err` to
    /// answer, or the store's error when the record could not be written
    /// (nothing is refused off the record). Charged to the record's task
    /// and agent (the task's, or at an approval whoever tried to decide
    /// its step), or to the agent alone before it has a task (a task
    /// start); counted apart by `err`'s code and the client's address.
    pub async fn refusal_recorded(&self, record: AuditEvent, err: OAuthError) -> OAuthError {
        let (iss, sub) = (
            record.agent_iss.as_deref().unwrap_or_default(),
            record.agent_sub.as_deref().unwrap_or_default(),
        );
        let key = match record.task_id.as_deref() {
            Some(task) => format!("task {task}\n{iss}\n{sub}"),
            None => format!("agent {iss}\n{sub}"),
        };
        self.refusal_charged(&key, record, err).await
    }

    /// Records `record`, a request refused by `[limits]`, charged to the
    /// identity limited (`issuer`, `subject`) rather than to its task: one
    /// identity holding a thousand tasks records no more refusals a second
    /// than one holding one. The reason names that identity (shortened).
    pub(crate) async fn refusal_over_pace(
        &self,
        (issuer, subject): (&str, &str),
        mut record: AuditEvent,
        refused: crate::limits::Refused,
        (what, limit): (&str, &str),
    ) -> OAuthError {
        let err = refused.error(what, limit);
        let key = format!("identity {issuer}\n{subject}");
        record.decision = Some("deny".into());
        record.reason = Some(format!(
            "{}{} {} ({}): {}",
            record.reason.take().unwrap_or_default(),
            // Refused before it was counted: the replica paces as many
            // identities as it keeps.
            if refused.full {
                "not counted for"
            } else {
                "charged to"
            },
            crate::form::short(subject),
            crate::form::short(issuer),
            err.description
        ));
        self.refusal_charged(&key, record, err).await
    }

    /// Records `record`, a refusal charged to `key`, counted apart by the
    /// error and the client's address.
    async fn refusal_charged(&self, key: &str, record: AuditEvent, err: OAuthError) -> OAuthError {
        // The address, not the port: a client's every connection has
        // another.
        let client = record
            .client
            .as_deref()
            .and_then(|c| c.parse::<std::net::SocketAddr>().ok())
            .map(|a| a.ip().to_string())
            .unwrap_or_default();
        let kind = format!("{}\n{client}", err.code);
        match self.record_refusal(key, &kind, record).await {
            Ok(()) => err,
            Err(e) => e.into(),
        }
    }

    /// Records a refusal charged to `key`, counted apart by `kind` (see
    /// [`crate::refusals`]).
    ///
    /// # Errors
    /// The store's, when the record is written now and cannot be.
    pub async fn record_refusal(
        &self,
        key: &str,
        kind: &str,
        record: AuditEvent,
    ) -> Result<(), scrip_store::StoreError> {
        self.refusals
            .record(&self.store, &self.stopping, key, kind, record)
            .await
    }

    /// An audit record of `event` naming the agent and task a verified task
    /// token's claims carry (what its task record would say), for a
    /// refusal that does not read the task.
    pub fn claims_audit(&self, event: &str, claims: &scrip_token::TaskClaims) -> AuditEvent {
        let mut a = self.audit(event);
        a.agent_iss = Some(claims.tctx.agent_iss.clone());
        a.agent_sub = Some(claims.sub.clone());
        a.task_id = Some(claims.txn.clone());
        a.parent_id.clone_from(&claims.tctx.parent);
        a.chain = claims
            .act
            .as_ref()
            .map(scrip_token::Actor::chain)
            .unwrap_or_default();
        a.environment = Some(claims.tctx.environment.clone());
        a.purpose = Some(claims.tctx.purpose.clone());
        a
    }
}

/// The `aud` of a token when it is one string, read without verification
/// (only to say which audience to verify it for).
fn peek_aud(token: &str) -> Option<String> {
    use base64::Engine as _;
    let payload = token.split('.').nth(1)?;
    if payload.len() > 16 * 1024 {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(payload)
        .ok()?;
    if !scrip_jose::plain_json(&bytes) {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    value.get("aud")?.as_str().map(str::to_owned)
}

/// The `typ` header of a token, lowercase without `application/`, read
/// without verification (only to choose how to verify).
fn peek_typ(token: &str) -> Option<String> {
    use base64::Engine as _;
    let header = token.split('.').next()?;
    if header.len() > 4096 {
        return None;
    }
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(header)
        .ok()?;
    if !scrip_jose::plain_json(&bytes) {
        return None;
    }
    let value: serde_json::Value = serde_json::from_slice(&bytes).ok()?;
    let typ = value.get("typ")?.as_str()?.to_ascii_lowercase();
    Some(typ.strip_prefix("application/").unwrap_or(&typ).to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What is looked at in a token before it is verified (its `typ`, its
    /// `aud`, to choose how to verify it) is read as every other parser
    /// reads it: a member named as serde_json reserves is not read as the
    /// text its string holds, and nothing is looked at in such a part.
    #[test]
    fn a_peek_at_a_token_reads_no_reserved_member() {
        use base64::Engine as _;
        let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
        let token = |header: &str, payload: &str| format!("{}.{}.c2ln", b64(header), b64(payload));
        let plain = token(r#"{"typ":"at+jwt"}"#, r#"{"aud":"github"}"#);
        assert_eq!(peek_typ(&plain).as_deref(), Some("at+jwt"));
        assert_eq!(peek_aud(&plain).as_deref(), Some("github"));
        let reserved = token(
            r#"{"typ":{"$serde_json::private::RawValue":"\"at+jwt\""}}"#,
            r#"{"aud":{"$serde_json::private::RawValue":"\"github\""}}"#,
        );
        assert_eq!(peek_typ(&reserved), None);
        assert_eq!(peek_aud(&reserved), None);
        let elsewhere = token(
            r#"{"typ":"at+jwt","x":{"$serde_json::private::RawValue":"[]"}}"#,
            r#"{"aud":"github","x":{"$serde_json::private::RawValue":"[]"}}"#,
        );
        assert_eq!(peek_typ(&elsewhere), None);
        assert_eq!(peek_aud(&elsewhere), None);
    }

    /// At most [`MAX_WEBHOOK_CALLS`] calls are under way at once, against
    /// a webhook that never answers: the rest are dropped, not queued.
    #[tokio::test]
    async fn webhook_calls_under_way_are_bounded() {
        let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", silent.local_addr().unwrap());
        // Accepts every connection and never answers.
        let held = tokio::spawn(async move {
            let mut conns = Vec::new();
            while let Ok((c, _)) = silent.accept().await {
                conns.push(c);
            }
        });
        let hook = Webhook {
            url,
            http: reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(5))
                .build()
                .unwrap(),
            sending: Arc::new(tokio::sync::watch::channel(0).0),
            announcing: Arc::new(tokio::sync::watch::channel(0).0),
        };
        // A stop waits for an approval still being committed, before its
        // call is made.
        let counted = hook.announcing();
        let long = std::time::Duration::from_secs(30);
        let waited =
            tokio::time::timeout(std::time::Duration::from_millis(100), hook.finish(long)).await;
        assert!(waited.is_err(), "finish did not wait for the announcement");
        drop(counted);
        tokio::time::timeout(std::time::Duration::from_secs(5), hook.finish(long))
            .await
            .unwrap();
        for i in 0..MAX_WEBHOOK_CALLS + 50 {
            hook.send(serde_json::json!({ "auth_req_id": i.to_string() }));
        }
        assert_eq!(*hook.sending.borrow(), MAX_WEBHOOK_CALLS);
        held.abort();
    }
}
