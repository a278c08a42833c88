//! A client for scrip, for agents written in Rust (and what `scrip run` and
//! `scrip token` are built on).
//!
//! ```no_run
//! # async fn demo() -> Result<(), scrip_client::Error> {
//! use scrip_client::{Client, TaskRequest, attest};
//! let identity = attest(std::path::Path::new(".scrip/scrip.sock")).await?;
//! let client = Client::new("http://127.0.0.1:7070")?;
//! let task = client
//!     .start_task(&identity, &TaskRequest::new(["github:read"], "fix JIRA-123", "dev"))
//!     .await?;
//! let token = task.access_token("github", &["read"]).await?;
//! // ... call the tool with `token.token` ...
//! task.end().await?;
//! # Ok(()) }
//! ```
//!
//! A [`Task`] started here is ended when dropped (best effort, on the
//! current tokio runtime); call [`Task::end`] to know that it ended.
//! Access tokens are cached per task, tool and actions, in memory and
//! optionally in a private directory ([`Task::with_file_cache`]), and reused
//! until shortly before they expire.
//!
//! [`Task::delegate`] gives a sub-agent a child task (RFC 8693 with an
//! `actor_token`): never more grants or a later end than its parent.
//!
//! [`Task::with_dpop`] binds the task's access tokens to a [`DpopKey`]
//! held in memory (RFC 9449); [`Task::request_headers`] then gives each
//! call its `Authorization: DPoP` and a fresh proof.
//! [`Client::start_bound_task`] binds the task token itself to the key, so
//! that it is no use to whoever steals it.
//!
//! A step that policy says a person must approve answers
//! [`Error::ApprovalPending`] with its `auth_req_id`;
//! [`Task::wait_for_approval`] (or one [`Task::poll_approval`]) then gets the
//! step's single-use token once a person approves it (OpenID CIBA's poll).

mod attest;
mod cache;
mod dpop;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::Duration;

use serde::Deserialize;

pub use attest::attest;
pub use cache::FileCache;
pub use dpop::{DpopAlgorithm, DpopKey};

/// The address of a scrip started with the defaults.
pub const DEFAULT_URL: &str = "http://127.0.0.1:7070";
/// The attestation socket of a scrip started with the defaults, relative to
/// its working directory.
pub const DEFAULT_SOCKET: &str = ".scrip/scrip.sock";

const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
const TXN_TOKEN: &str = "urn:ietf:params:oauth:token-type:txn_token";
const ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
/// Timeout of one request to scrip.
const TIMEOUT: Duration = Duration::from_secs(15);
/// The grant that polls for an approved step (OpenID CIBA Core §10.1).
const CIBA_GRANT: &str = "urn:openid:params:grant-type:ciba";
/// The most bytes read of one answer from scrip (a token answer is a few
/// KiB); a larger one is not scrip's.
const MAX_ANSWER: usize = 64 * 1024;

/// Why a call failed. Each message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// scrip's HTTP API did not answer.
    #[error(
        "cannot reach scrip at `{url}` ({message}); is `scrip serve` running? set --server or SCRIP_URL to its address"
    )]
    Unreachable {
        /// The URL tried.
        url: String,
        /// What failed.
        message: String,
    },
    /// scrip's URL would carry tokens in the clear across a network.
    #[error(
        "scrip's address `{url}` must use https (http only to a loopback address such as 127.0.0.1): identities and tokens sent to it would cross the network in the clear"
    )]
    Insecure {
        /// The URL refused.
        url: String,
    },
    /// The attestation socket does not exist.
    #[error(
        "no scrip attestation socket at `{path}`; start `scrip serve`, or set --socket or SCRIP_SOCKET to its `socket`"
    )]
    SocketMissing {
        /// The path tried.
        path: PathBuf,
    },
    /// The attestation socket refused the connection for lack of permission.
    #[error(
        "permission denied on the scrip attestation socket `{path}`; run as a user scrip serves (see `socket_mode`), or use a federated identity (--identity-file or SCRIP_IDENTITY)"
    )]
    SocketPermission {
        /// The path tried.
        path: PathBuf,
    },
    /// The attestation socket failed otherwise.
    #[error("scrip attestation socket `{path}`: {message}")]
    Socket {
        /// The path tried.
        path: PathBuf,
        /// What failed.
        message: String,
    },
    /// scrip refused to identify this process.
    #[error("local attestation refused ({error}): {description}")]
    AttestationRefused {
        /// The error code.
        error: String,
        /// scrip's explanation.
        description: String,
    },
    /// The identity token is not a JWT.
    #[error("the identity is not a JWT; pass the workload identity token itself")]
    IdentityMalformed,
    /// The identity token has expired.
    #[error("the identity expired {ago} seconds ago; get a fresh identity token and retry")]
    IdentityExpired {
        /// How long ago.
        ago: u64,
    },
    /// scrip answered with an OAuth error.
    #[error("scrip refused: {description} ({error})")]
    OAuth {
        /// The HTTP status.
        status: u16,
        /// The OAuth error code (`invalid_scope`, `access_denied`, ...).
        error: String,
        /// scrip's explanation.
        description: String,
    },
    /// The step needs a person's approval (SPEC §5): nothing was issued.
    /// Poll with `auth_req_id` ([`Task::wait_for_approval`]).
    #[error("{}", pending_message(auth_req_id, *expires_in, *approved))]
    ApprovalPending {
        /// The id to poll with and to approve.
        auth_req_id: String,
        /// Seconds to wait between polls.
        interval: u64,
        /// Seconds the request waits for a decision.
        expires_in: u64,
        /// A person approved the step already (asked for again before its
        /// token was collected): a poll collects it now.
        approved: bool,
    },
    /// A token given to end a task is not a task token.
    #[error(
        "this is not a task token (its typ is `{typ}`); ending a task takes the task token it was started with"
    )]
    NotATaskToken {
        /// The token's `typ` header, or `none`.
        typ: String,
    },
    /// A task token from another scrip than the one at the URL.
    #[error(
        "the task token was issued by `{token_issuer}`, not by the scrip at this address (`{issuer}`); set --server or SCRIP_URL to its scrip"
    )]
    ForeignToken {
        /// The token's `iss`.
        token_issuer: String,
        /// The issuer of the scrip asked.
        issuer: String,
    },
    /// A task token given to end a task that the scrip at the URL did not
    /// sign: revoking it would change nothing, and say so to no one.
    #[error(
        "the task token does not verify with the keys of the scrip at this address ({reason}): it was damaged (copied in part?), or issued by another scrip with the same issuer; nothing was ended"
    )]
    UnverifiedToken {
        /// Why verification failed.
        reason: String,
    },
    /// scrip answered something unexpected.
    #[error("unexpected answer from scrip: {0}")]
    Protocol(String),
}

fn pending_message(auth_req_id: &str, expires_in: u64, approved: bool) -> String {
    if approved {
        format!(
            "a person approved this step: auth_req_id {auth_req_id}; poll with it to collect its token within {expires_in} s"
        )
    } else {
        format!(
            "a person must approve this step: auth_req_id {auth_req_id}, for an approver's `scrip approve {auth_req_id}`; it waits {expires_in} s"
        )
    }
}

impl Error {
    /// The OAuth error code, when scrip answered one.
    #[must_use]
    pub fn oauth_code(&self) -> Option<&str> {
        match self {
            Self::OAuth { error, .. } | Self::AttestationRefused { error, .. } => Some(error),
            Self::ApprovalPending { .. } => Some("authorization_pending"),
            _ => None,
        }
    }
}

/// The claims of a compact JWS, its signature not checked: for what the
/// client only reads of its own tokens (`exp`, `cnf`), never to trust them.
fn unverified_claims(token: &str) -> Option<serde_json::Value> {
    unverified_parts(token).map(|(_, claims)| claims)
}

/// The header and claims of a compact JWS, its signature not checked.
fn unverified_parts(token: &str) -> Option<(serde_json::Value, serde_json::Value)> {
    use base64::Engine as _;
    let mut parts = token.split('.');
    let (Some(header), Some(payload), Some(_), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return None;
    };
    let decode = |part: &str| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .ok()
            .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            .filter(serde_json::Value::is_object)
    };
    Some((decode(header)?, decode(payload)?))
}

/// A task that [`Client::end_task`] ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndedTask {
    /// The task's id (`txn`).
    pub task: String,
    /// Whether its token had expired already: the task had ended at its
    /// deadline before it was asked to.
    pub had_expired: bool,
}

/// Text read from an unverified token, safe to print: control and
/// bidirectional characters escaped, at most 200 characters.
fn printable(s: &str) -> String {
    printable_up_to(s, 200)
}

/// Text a server said, safe to print (whatever answers at the URL may not
/// be scrip): control and bidirectional characters escaped, at most `n`
/// characters.
fn printable_up_to(s: &str, n: usize) -> String {
    let head = s
        .char_indices()
        .nth(n)
        .and_then(|(i, _)| s.get(..i))
        .unwrap_or(s);
    scrip_token::escape_deceptive(head)
}

/// Seconds since the epoch.
fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A workload identity token (from local attestation or a federated
/// issuer). Its `Debug` does not print the token.
#[derive(Clone)]
pub struct Identity {
    token: String,
    expires_at: Option<u64>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl Identity {
    /// Wraps a workload identity JWT. Its `exp` is read (not verified: scrip
    /// verifies) so that an expired identity is reported before any call.
    ///
    /// # Errors
    /// [`Error::IdentityMalformed`] for something that is not a JWT,
    /// [`Error::IdentityExpired`] for an expired one.
    pub fn from_jwt(token: &str) -> Result<Self, Error> {
        let token = token.trim();
        let claims = unverified_claims(token).ok_or(Error::IdentityMalformed)?;
        let expires_at = claims.get("exp").and_then(serde_json::Value::as_u64);
        if let Some(exp) = expires_at
            && exp <= now()
        {
            return Err(Error::IdentityExpired {
                ago: now().saturating_sub(exp),
            });
        }
        Ok(Self {
            token: token.to_owned(),
            expires_at,
        })
    }

    /// The JWT.
    #[must_use]
    pub fn token(&self) -> &str {
        &self.token
    }

    /// Its `exp`, when it has one.
    #[must_use]
    pub fn expires_at(&self) -> Option<u64> {
        self.expires_at
    }
}

/// What a task asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRequest {
    /// Grants, `tool:action`.
    pub grants: Vec<String>,
    /// Why (free text; policies may look for a ticket id).
    pub purpose: String,
    /// The environment (`dev`, `prod`, ...).
    pub environment: String,
    /// Lifetime in seconds (default: the server's `task_ttl`).
    pub ttl: Option<u64>,
}

impl TaskRequest {
    /// A request for `grants` with a purpose and environment.
    pub fn new<I, S>(grants: I, purpose: &str, environment: &str) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            grants: grants.into_iter().map(Into::into).collect(),
            purpose: purpose.to_owned(),
            environment: environment.to_owned(),
            ttl: None,
        }
    }
}

/// A connection to scrip's HTTP API.
#[derive(Clone, Debug)]
pub struct Client {
    http: reqwest::Client,
    url: String,
    /// What the client uses of scrip's RFC 8414 metadata, read once when
    /// first needed.
    metadata: std::sync::Arc<tokio::sync::OnceCell<Metadata>>,
}

/// The members of scrip's metadata the client uses.
#[derive(Debug)]
struct Metadata {
    /// scrip's `iss` (RFC 8414 requires it; only ending a task needs it).
    issuer: Option<String>,
    /// The token endpoint (a DPoP proof's `htu`).
    token_endpoint: String,
}

#[derive(Deserialize)]
struct TokenResponse {
    access_token: String,
    #[serde(default)]
    token_type: String,
    #[serde(default)]
    issued_token_type: String,
    expires_in: u64,
    #[serde(default)]
    scope: String,
}

impl TokenResponse {
    /// Refuses an answer that is not the kind of token asked for (RFC 8693
    /// §2.2.1 `issued_token_type`, RFC 6749 §5.1 `token_type`): a task
    /// token taken for an access token would be sent to a tool.
    fn expect(&self, issued: &str, token_types: &[&str]) -> Result<(), Error> {
        if self.issued_token_type != issued {
            return Err(Error::Protocol(format!(
                "asked for `{issued}`, got issued_token_type `{}`",
                printable_up_to(&self.issued_token_type, 80)
            )));
        }
        if !token_types
            .iter()
            .any(|t| self.token_type.eq_ignore_ascii_case(t))
        {
            return Err(Error::Protocol(format!(
                "got token_type `{}`, expected {}",
                printable_up_to(&self.token_type, 20),
                token_types.join(" or ")
            )));
        }
        Ok(())
    }
}

#[derive(Deserialize)]
struct ErrorResponse {
    error: String,
    #[serde(default)]
    error_description: String,
    /// With `authorization_pending` for a step that now waits for a person.
    auth_req_id: Option<String>,
    interval: Option<u64>,
    expires_in: Option<u64>,
    /// With `authorization_pending` for a step a person approved already.
    #[serde(default)]
    approved: bool,
}

/// An answer's body, or `None` when it is larger than `max` bytes (what
/// answers may not be scrip, and could send without end).
///
/// # Errors
/// When the body cannot be read.
pub async fn read_at_most(
    mut response: reqwest::Response,
    max: usize,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    if response.content_length().is_some_and(|n| n > max as u64) {
        return Ok(None);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len().saturating_add(chunk.len()) > max {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}

/// An HTTP client for the scrip at `url` that carries tokens safely: it
/// speaks https unless scrip is on this machine, follows no redirect (which
/// could take a token elsewhere), gives up after `timeout`, and never goes
/// through a proxy named in the environment when scrip is on this machine.
///
/// # Errors
/// [`Error::Unreachable`] when `url` is not a URL, [`Error::Insecure`] when
/// it is `http` to a host other than a loopback address, [`Error::Protocol`]
/// when the client cannot be built.
pub fn http_client(url: &str, timeout: Duration) -> Result<reqwest::Client, Error> {
    let parsed = reqwest::Url::parse(url).map_err(|_| Error::Unreachable {
        url: url.to_owned(),
        message: "not a URL".into(),
    })?;
    match parsed.scheme() {
        "https" => {}
        "http" if scrip_verifier::net::is_local(url) => {}
        _ => {
            return Err(Error::Insecure {
                url: url.to_owned(),
            });
        }
    }
    // Through no proxy of the environment when scrip is on this machine,
    // and `localhost` as 127.0.0.1 (see `scrip_verifier::net`): otherwise a
    // proxy, or another local user on `::1`, would see every token sent.
    scrip_verifier::net::http_client(url, timeout)
        .map_err(|e| Error::Protocol(format!("cannot build the HTTP client: {e}")))
}

impl Client {
    /// A client of the scrip at `url` (its issuer URL).
    ///
    /// # Errors
    /// As [`http_client`]: `url` must be `https`, or `http` to a loopback
    /// address.
    pub fn new(url: &str) -> Result<Self, Error> {
        let http = http_client(url, TIMEOUT)?;
        Ok(Self {
            http,
            url: url.trim_end_matches('/').to_owned(),
            metadata: std::sync::Arc::default(),
        })
    }

    /// The server's URL.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> Result<reqwest::Response, Error> {
        self.post_with(path, form, None).await
    }

    async fn post_with(
        &self,
        path: &str,
        form: &[(&str, &str)],
        proof: Option<&str>,
    ) -> Result<reqwest::Response, Error> {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form.iter())
            .finish();
        let mut request = self
            .http
            .post(format!("{}{path}", self.url))
            .header(
                reqwest::header::CONTENT_TYPE,
                "application/x-www-form-urlencoded",
            )
            .body(body);
        if let Some(p) = proof {
            request = request.header("DPoP", p);
        }
        request.send().await.map_err(|e| Error::Unreachable {
            url: self.url.clone(),
            message: why_unsent(&e),
        })
    }

    /// An answer's body, at most [`MAX_ANSWER`] bytes.
    async fn read(&self, response: reqwest::Response) -> Result<Vec<u8>, Error> {
        read_at_most(response, MAX_ANSWER)
            .await
            .map_err(|e| Error::Unreachable {
                url: self.url.clone(),
                message: e.to_string(),
            })?
            .ok_or_else(|| {
                Error::Protocol(format!(
                    "an answer from `{}` larger than {} KiB; is SCRIP_URL a scrip server?",
                    self.url,
                    MAX_ANSWER / 1024
                ))
            })
    }

    /// The token endpoint's URL from scrip's RFC 8414 metadata.
    async fn token_endpoint(&self) -> Result<&str, Error> {
        Ok(&self.metadata().await?.token_endpoint)
    }

    /// scrip's RFC 8414 metadata, read once.
    async fn metadata(&self) -> Result<&Metadata, Error> {
        self.metadata
            .get_or_try_init(|| async {
                let url = format!("{}/.well-known/oauth-authorization-server", self.url);
                let unreachable = |message: String| Error::Unreachable {
                    url: self.url.clone(),
                    message,
                };
                let response = self
                    .http
                    .get(&url)
                    .send()
                    .await
                    .map_err(|e| unreachable(why_unsent(&e)))?;
                let meta: serde_json::Value =
                    serde_json::from_slice(&self.read(response).await?)
                        .map_err(|_| Error::Protocol(format!("`{url}` is not JSON metadata")))?;
                let member = |name: &str| {
                    meta.get(name)
                        .and_then(serde_json::Value::as_str)
                        .map(str::to_owned)
                        .ok_or_else(|| Error::Protocol(format!("`{url}` names no {name}")))
                };
                Ok(Metadata {
                    issuer: member("issuer").ok(),
                    token_endpoint: member("token_endpoint")?,
                })
            })
            .await
    }

    async fn token_with(
        &self,
        form: &[(&str, &str)],
        proof: Option<&str>,
    ) -> Result<TokenResponse, Error> {
        let response = self.post_with("/token", form, proof).await?;
        let status = response.status().as_u16();
        let bytes = self.read(response).await?;
        if status == 200 {
            return serde_json::from_slice(&bytes)
                .map_err(|_| Error::Protocol("a token response that is not JSON".into()));
        }
        match serde_json::from_slice::<ErrorResponse>(&bytes) {
            Ok(ErrorResponse {
                error,
                auth_req_id: Some(auth_req_id),
                interval,
                expires_in,
                approved,
                ..
            }) if error == "authorization_pending"
                && (1..=64).contains(&auth_req_id.len())
                && auth_req_id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_')) =>
            {
                Err(Error::ApprovalPending {
                    auth_req_id,
                    // Bounded, whatever the server says: they become durations.
                    interval: interval.unwrap_or(DEFAULT_POLL_INTERVAL).clamp(1, 300),
                    expires_in: expires_in.unwrap_or(0).min(MAX_APPROVAL_WAIT),
                    approved,
                })
            }
            Ok(e) => Err(Error::OAuth {
                status,
                error: printable_up_to(&e.error, 80),
                description: printable_up_to(&e.error_description, 1000),
            }),
            // A gateway's own answer (a load balancer with no scrip behind
            // it for now, as during a rolling restart).
            Err(_) if matches!(status, 502..=504) => Err(Error::Unreachable {
                url: self.url.clone(),
                message: format!("HTTP {status} from a gateway in front of it"),
            }),
            Err(_) => Err(Error::Protocol(format!(
                "HTTP {status} from `{}/token`; is SCRIP_URL a scrip server?",
                self.url
            ))),
        }
    }

    /// Starts a task with `identity` as the subject (SPEC §1).
    ///
    /// # Errors
    /// [`Error::OAuth`] when scrip refuses (`invalid_scope` for an unknown
    /// tool or action, `access_denied` when policy allows nothing, ...),
    /// [`Error::Unreachable`] when it does not answer.
    pub async fn start_task(
        &self,
        identity: &Identity,
        request: &TaskRequest,
    ) -> Result<Task, Error> {
        self.start(identity, request, None).await
    }

    /// Starts a task bound to `key` (RFC 9449 §5): the start carries a DPoP
    /// proof by the key, and scrip then exchanges the task token only with
    /// proofs by it, so a stolen task token cannot be exchanged for anything
    /// without the key. The task's access tokens are bound to the key too,
    /// as with [`Task::with_dpop`], and its delegations carry a proof by it
    /// and bind each sub-task to its sub-agent's key
    /// ([`Task::delegate_bound_to`]): scrip keeps a bound task's tree bound.
    ///
    /// # Errors
    /// As [`Client::start_task`]; [`Error::OAuth`] `invalid_dpop_proof` when
    /// scrip refuses the proof.
    pub async fn start_bound_task(
        &self,
        identity: &Identity,
        request: &TaskRequest,
        key: std::sync::Arc<DpopKey>,
    ) -> Result<Task, Error> {
        self.start(identity, request, Some(key)).await
    }

    async fn start(
        &self,
        identity: &Identity,
        request: &TaskRequest,
        key: Option<std::sync::Arc<DpopKey>>,
    ) -> Result<Task, Error> {
        if let Some(exp) = identity.expires_at
            && exp <= now()
        {
            return Err(Error::IdentityExpired {
                ago: now().saturating_sub(exp),
            });
        }
        let mut details = serde_json::Map::new();
        details.insert("purpose".into(), request.purpose.clone().into());
        details.insert("environment".into(), request.environment.clone().into());
        if let Some(ttl) = request.ttl {
            details.insert("ttl".into(), ttl.into());
        }
        let details = serde_json::Value::Object(details).to_string();
        let scope = request.grants.join(" ");
        let form = [
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", identity.token()),
            ("subject_token_type", JWT),
            ("requested_token_type", TXN_TOKEN),
            ("scope", &scope),
            ("request_details", &details),
        ];
        let proof = match &key {
            Some(key) => Some(key.proof("POST", self.token_endpoint().await?, None)?),
            None => None,
        };
        let answer = self.token_with(&form, proof.as_deref()).await?;
        answer.expect(TXN_TOKEN, &["N_A"])?;
        // A task token asked for bound must be bound to this key: one that
        // is not (an older scrip, or something in between that dropped the
        // `DPoP` header) would work for whoever stole it. It is revoked, not
        // just dropped.
        if let Some(key) = &key {
            let bound_to = unverified_claims(&answer.access_token)
                .and_then(|c| c.get("cnf")?.get("jkt")?.as_str().map(str::to_owned));
            if bound_to.as_deref() != Some(key.thumbprint()) {
                let _ = self.revoke(&answer.access_token).await;
                return Err(Error::Protocol(
                    "asked for a task bound to a DPoP key, got a task token that is not bound to it; was the `DPoP` header dropped on the way?"
                        .into(),
                ));
            }
        }
        let mut task = Task::new(self.clone(), answer.access_token, true);
        task.expires_at = Some(now().saturating_add(answer.expires_in));
        task.scope = Some(answer.scope);
        Ok(match key {
            Some(key) => task.with_dpop(key),
            None => task,
        })
    }

    /// A task whose token was obtained elsewhere (e.g. `SCRIP_TASK_TOKEN`).
    /// It is not ended on drop: whoever started it ends it.
    #[must_use]
    pub fn task_from_token(&self, task_token: &str) -> Task {
        Task::new(self.clone(), task_token.trim().to_owned(), false)
    }

    /// Ends the task of `task_token`, its sub-tasks and every token issued
    /// under them. Revocation (RFC 7009) answers the same for any token, so
    /// that nothing is ended silently, the token is checked first: it must
    /// be a task token of this scrip, signed with one of the keys it
    /// publishes at this address (an expired one too: its task may still be
    /// running within scrip's clock skew; one past its deadline whose key is
    /// no longer published is reported ended by its deadline).
    ///
    /// # Errors
    /// [`Error::NotATaskToken`] for anything else than a task token (an
    /// access token would be revoked alone, its task left running),
    /// [`Error::ForeignToken`] for one of another scrip,
    /// [`Error::UnverifiedToken`] for one this scrip did not sign (damaged,
    /// or of another scrip with the same issuer), and the errors of
    /// [`Client::revoke`].
    pub async fn end_task(&self, task_token: &str) -> Result<EndedTask, Error> {
        let token = task_token.trim();
        let Some((header, claims)) = unverified_parts(token) else {
            return Err(Error::NotATaskToken {
                typ: "none: it is not a JWT".into(),
            });
        };
        let typ = header.get("typ").and_then(serde_json::Value::as_str);
        if typ != Some(scrip_token::typ::TASK) {
            return Err(Error::NotATaskToken {
                typ: typ.map_or_else(|| "none".into(), printable),
            });
        }
        let text = |name: &str| {
            claims
                .get(name)
                .and_then(serde_json::Value::as_str)
                .unwrap_or("")
                .to_owned()
        };
        let metadata = self.metadata().await?;
        let Some(issuer) = &metadata.issuer else {
            return Err(Error::Protocol(format!(
                "`{}/.well-known/oauth-authorization-server` names no issuer",
                self.url
            )));
        };
        let token_issuer = text("iss");
        if token_issuer != *issuer {
            return Err(Error::ForeignToken {
                token_issuer: printable(&token_issuer),
                issuer: issuer.clone(),
            });
        }
        // From this address, as every other request (the issuer's may not
        // be reachable from here: a port forward, an internal address).
        let keys = self.key_set(&format!("{}/jwks", self.url)).await?;
        let had_expired = claims
            .get("exp")
            .and_then(serde_json::Value::as_u64)
            .is_some_and(|exp| exp <= now());
        let checked = scrip_jose::verify::<serde_json::Value>(
            token,
            &keys,
            &scrip_jose::Expectations {
                issuer,
                audiences: std::slice::from_ref(issuer),
                algorithms: &[
                    scrip_jose::Algorithm::ES256,
                    scrip_jose::Algorithm::EdDSA,
                    scrip_jose::Algorithm::RS256,
                ],
                typ: &scrip_jose::TypRule::exactly(scrip_token::typ::TASK),
                leeway: 0,
            },
        );
        match checked {
            // The signature is checked before the times: these are scrip's
            // (a token past its `exp`, or from a replica whose clock runs
            // ahead of this machine's).
            Ok(_)
            | Err(
                scrip_jose::JoseError::Expired
                | scrip_jose::JoseError::IssuedInFuture
                | scrip_jose::JoseError::NotYetValid,
            ) => {}
            // Keys stop being published once every token they signed has
            // expired: a token past its deadline, signed by one of them, has
            // no task left to end.
            Err(scrip_jose::JoseError::UnknownKey) if had_expired => {
                return Ok(EndedTask {
                    task: printable(&text("txn")),
                    had_expired,
                });
            }
            Err(e) => {
                return Err(Error::UnverifiedToken {
                    reason: e.to_string(),
                });
            }
        }
        self.revoke(token).await?;
        Ok(EndedTask {
            task: printable(&text("txn")),
            had_expired,
        })
    }

    /// The key set at `jwks_uri`.
    async fn key_set(&self, jwks_uri: &str) -> Result<scrip_jose::KeySet, Error> {
        let response = self
            .http
            .get(jwks_uri)
            .send()
            .await
            .map_err(|e| Error::Unreachable {
                url: self.url.clone(),
                message: why_unsent(&e),
            })?;
        let status = response.status();
        let body = self.read(response).await?;
        if !status.is_success() {
            return Err(Error::Protocol(format!(
                "`{jwks_uri}` answered {}",
                status.as_u16()
            )));
        }
        scrip_jose::KeySet::from_jwks_json(&body)
            .map_err(|e| Error::Protocol(format!("`{jwks_uri}` is not a usable key set: {e}")))
    }

    /// Revokes a token (RFC 7009); a task token ends its task.
    ///
    /// # Errors
    /// [`Error::Unreachable`]; [`Error::OAuth`] when scrip refuses (503
    /// `temporarily_unavailable` while it cannot record the revocation);
    /// [`Error::Protocol`] on another answer.
    pub async fn revoke(&self, token: &str) -> Result<(), Error> {
        let response = self.post("/revoke", &[("token", token)]).await?;
        let status = response.status().as_u16();
        if status == 200 {
            return Ok(());
        }
        let bytes = self.read(response).await?;
        match serde_json::from_slice::<ErrorResponse>(&bytes) {
            Ok(e) => Err(Error::OAuth {
                status,
                error: printable_up_to(&e.error, 80),
                description: printable_up_to(&e.error_description, 1000),
            }),
            Err(_) => Err(Error::Protocol(format!(
                "revocation answered HTTP {status}"
            ))),
        }
    }
}

/// An access token for one tool. Its `Debug` does not print the token.
#[derive(Clone, PartialEq, Eq, serde::Serialize, Deserialize)]
pub struct AccessToken {
    /// The JWT.
    pub token: String,
    /// `Bearer`, or `DPoP` for a token bound to the task's DPoP key.
    pub token_type: String,
    /// The actions it carries, space-separated.
    pub scope: String,
    /// When it expires, seconds since the epoch.
    pub expires_at: u64,
    /// After this it is not reused from a cache.
    pub refresh_at: u64,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("scope", &self.scope)
            .field("expires_at", &self.expires_at)
            .finish_non_exhaustive()
    }
}

impl AccessToken {
    /// Seconds left.
    #[must_use]
    pub fn expires_in(&self) -> u64 {
        self.expires_at.saturating_sub(now())
    }

    fn fresh(&self) -> bool {
        now() < self.refresh_at
    }
}

/// Seconds between polls when scrip did not say (its default).
const DEFAULT_POLL_INTERVAL: u64 = 2;

/// The longest wait for a person the client takes from scrip's answer.
const MAX_APPROVAL_WAIT: u64 = 7 * 24 * 3600;

/// How long [`Task::wait_for_approval`] waits out a scrip that does not
/// answer, without a break: a restart or a failover takes less; a scrip
/// gone for good is said rather than waited for all the step's life.
pub const DOWN_WAIT: Duration = Duration::from_secs(300);

/// How long before expiry a cached token stops being reused: a quarter of
/// its lifetime, at most 30 seconds.
fn refresh_at(issued: u64, expires_in: u64) -> u64 {
    issued.saturating_add(expires_in) - (expires_in / 4).min(30)
}

/// A task: its token, and the access tokens obtained under it.
pub struct Task {
    client: Client,
    token: String,
    scope: Option<String>,
    expires_at: Option<u64>,
    /// Ended on drop unless ended already.
    owned: bool,
    /// Each with when to refresh it by the monotonic clock too: a wall
    /// clock stepped back (NTP, a VM resumed) must not keep an expired
    /// token fresh.
    cache: Mutex<HashMap<(String, String), (AccessToken, std::time::Instant)>>,
    file_cache: Option<FileCache>,
    /// The key the access tokens are bound to, if any (DPoP).
    dpop: Option<std::sync::Arc<DpopKey>>,
}

impl std::fmt::Debug for Task {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Task")
            .field("url", &self.client.url)
            .field("scope", &self.scope)
            .field("expires_at", &self.expires_at)
            .field("owned", &self.owned)
            .finish_non_exhaustive()
    }
}

impl Task {
    fn new(client: Client, token: String, owned: bool) -> Self {
        Self {
            client,
            token,
            scope: None,
            expires_at: None,
            owned,
            cache: Mutex::new(HashMap::new()),
            file_cache: None,
            dpop: None,
        }
    }

    /// Delegates part of this task to a sub-agent (SPEC §3): the child task
    /// holds `grants` (a subset of this task's; empty: all of them), ends
    /// no later than this one, and names `actor` in its `act` claim. The
    /// returned task is ended when dropped; ending this one ends it too.
    ///
    /// A task bound to a DPoP key delegates only with
    /// [`Task::delegate_bound_to`]: scrip keeps a bound task's tree bound.
    ///
    /// # Errors
    /// [`Error::OAuth`] when scrip refuses (`invalid_scope` beyond this
    /// task's grants, `invalid_request` for a delegation too deep, an
    /// actor the task's `may_act` excludes, or a bound task,
    /// `access_denied` by policy).
    pub async fn delegate(&self, actor: &Identity, grants: &[&str]) -> Result<Task, Error> {
        self.delegate_with(actor, grants, None).await
    }

    /// As [`Task::delegate`], with the child task bound to the DPoP key
    /// whose RFC 7638 thumbprint is `jkt` (RFC 9449; scrip's `dpop_jkt`):
    /// the sub-agent's, which it made and holds ([`DpopKey::thumbprint`]).
    /// The child's token is then no use without that key, for its own
    /// exchanges and any further delegation. Hand the sub-agent the child's
    /// token ([`Task::token`]); it works with it as
    /// `client.task_from_token(token).with_dpop(its_key)`. The returned task
    /// holds no key: it can end the child (and does, when dropped), not use
    /// it.
    ///
    /// # Errors
    /// As [`Task::delegate`]; [`Error::Protocol`] when the child token
    /// scrip gave is not bound to `jkt` (it is revoked).
    pub async fn delegate_bound_to(
        &self,
        actor: &Identity,
        grants: &[&str],
        jkt: &str,
    ) -> Result<Task, Error> {
        self.delegate_with(actor, grants, Some(jkt)).await
    }

    /// [`Task::delegate_bound_to`] a key this process holds (a sub-agent
    /// running in it): the returned task uses `key`, as with
    /// [`Task::with_dpop`].
    ///
    /// # Errors
    /// As [`Task::delegate_bound_to`].
    pub async fn delegate_bound(
        &self,
        actor: &Identity,
        grants: &[&str],
        key: std::sync::Arc<DpopKey>,
    ) -> Result<Task, Error> {
        let child = self
            .delegate_with(actor, grants, Some(key.thumbprint()))
            .await?;
        Ok(child.with_dpop(key))
    }

    async fn delegate_with(
        &self,
        actor: &Identity,
        grants: &[&str],
        jkt: Option<&str>,
    ) -> Result<Task, Error> {
        if let Some(exp) = actor.expires_at
            && exp <= now()
        {
            return Err(Error::IdentityExpired {
                ago: now().saturating_sub(exp),
            });
        }
        let scope = grants.join(" ");
        let mut form = vec![
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", self.token.as_str()),
            ("subject_token_type", TXN_TOKEN),
            ("actor_token", actor.token()),
            ("actor_token_type", JWT),
            ("requested_token_type", TXN_TOKEN),
        ];
        if !scope.is_empty() {
            form.push(("scope", &scope));
        }
        let details = jkt.map(|jkt| serde_json::json!({ "dpop_jkt": jkt }).to_string());
        if let Some(details) = &details {
            form.push(("request_details", details));
        }
        // A task bound to its key delegates only with a proof by it.
        let proof = match &self.dpop {
            Some(key) => Some(key.proof("POST", self.client.token_endpoint().await?, None)?),
            None => None,
        };
        let answer = self.client.token_with(&form, proof.as_deref()).await?;
        answer.expect(TXN_TOKEN, &["N_A"])?;
        // As a bound start: a child asked for bound that is not would work
        // for whoever stole it. It is revoked, not just dropped.
        if let Some(jkt) = jkt {
            let bound_to = unverified_claims(&answer.access_token)
                .and_then(|c| c.get("cnf")?.get("jkt")?.as_str().map(str::to_owned));
            if bound_to.as_deref() != Some(jkt) {
                let _ = self.client.revoke(&answer.access_token).await;
                return Err(Error::Protocol(
                    "asked for a sub-task bound to a DPoP key, got a task token that is not bound to it"
                        .into(),
                ));
            }
        }
        let mut child = Task::new(self.client.clone(), answer.access_token, true);
        // `expires_in` counts whole seconds from when scrip answered; read
        // against this clock a second later it could place the child's end
        // after this task's, which scrip never allows.
        let ends = now().saturating_add(answer.expires_in);
        child.expires_at = Some(self.expires_at.map_or(ends, |parent| ends.min(parent)));
        child.scope = Some(answer.scope);
        Ok(child)
    }

    /// Also caches access tokens in `cache` (shared between processes of
    /// the same user, such as successive `scrip token` calls).
    #[must_use]
    pub fn with_file_cache(mut self, cache: FileCache) -> Self {
        self.file_cache = Some(cache);
        self
    }

    /// The task token (a credential: hand it only to what runs the task).
    #[must_use]
    pub fn token(&self) -> &str {
        &self.token
    }

    /// The grants scrip allowed, when this client started the task.
    #[must_use]
    pub fn scope(&self) -> Option<&str> {
        self.scope.as_deref()
    }

    /// When the task ends by itself, when this client started it.
    #[must_use]
    pub fn expires_at(&self) -> Option<u64> {
        self.expires_at
    }

    /// An access token for `tool` carrying `actions` (none: every action
    /// the task holds at the tool), from the cache while it is fresh.
    ///
    /// # Errors
    /// [`Error::OAuth`] when scrip refuses (`invalid_target` for an unknown
    /// tool, `invalid_scope` for actions beyond the task, `invalid_request`
    /// for a task that ended), [`Error::Unreachable`].
    pub async fn access_token(&self, tool: &str, actions: &[&str]) -> Result<AccessToken, Error> {
        let mut sorted: Vec<&str> = actions.to_vec();
        sorted.sort_unstable();
        sorted.dedup();
        let scope = sorted.join(" ");
        let key = (tool.to_owned(), scope.clone());
        if let Some(t) = self.cached(&key) {
            return Ok(t);
        }
        let file_cache = self.file_cache.as_ref().filter(|_| self.dpop.is_none());
        if let Some(t) = file_cache
            .and_then(|c| c.get(&self.token, tool, &scope))
            .filter(AccessToken::fresh)
        {
            self.remember(key, &t);
            return Ok(t);
        }
        let mut form = vec![
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", self.token.as_str()),
            ("subject_token_type", TXN_TOKEN),
            ("requested_token_type", ACCESS_TOKEN),
            ("audience", tool),
        ];
        if !scope.is_empty() {
            form.push(("scope", &scope));
        }
        let proof = match &self.dpop {
            Some(key) => Some(key.proof("POST", self.client.token_endpoint().await?, None)?),
            None => None,
        };
        let issued = now();
        let answer = self.client.token_with(&form, proof.as_deref()).await?;
        let token = self.accept_access(answer, issued).await?;
        if let Some(c) = file_cache {
            c.put(&self.token, tool, &scope, &token);
        }
        self.remember(key, &token);
        Ok(token)
    }

    /// Checks an answer that should be an access token: the kind asked for,
    /// and bound when this task has a DPoP key. A bearer token that came
    /// back for a bound one is revoked, not just dropped.
    async fn accept_access(
        &self,
        answer: TokenResponse,
        issued: u64,
    ) -> Result<AccessToken, Error> {
        answer.expect(ACCESS_TOKEN, &["Bearer", "DPoP"])?;
        let bound = answer.token_type.eq_ignore_ascii_case("dpop");
        if self.dpop.is_some() && !bound {
            let _ = self.client.revoke(&answer.access_token).await;
            return Err(Error::Protocol(format!(
                "asked for a DPoP-bound token, got token_type `{}`",
                printable_up_to(&answer.token_type, 20)
            )));
        }
        Ok(AccessToken {
            token: answer.access_token,
            token_type: answer.token_type,
            scope: answer.scope,
            expires_at: issued.saturating_add(answer.expires_in),
            refresh_at: refresh_at(issued, answer.expires_in),
        })
    }

    /// One poll for the token of a step that waits for a person's approval
    /// ([`Error::ApprovalPending`]), with this task's token (OpenID CIBA
    /// Core §10.1). The token is single use and seconds long, so it is not
    /// cached; with a DPoP key it is bound to it.
    ///
    /// # Errors
    /// [`Error::OAuth`] with `authorization_pending` while nobody has
    /// decided, `slow_down` when polled too often, `access_denied` when a
    /// person denied the step, `expired_token` when nobody decided in time,
    /// `invalid_grant` for an id that is unknown, used, or another task's.
    pub async fn poll_approval(&self, auth_req_id: &str) -> Result<AccessToken, Error> {
        let form = [
            ("grant_type", CIBA_GRANT),
            ("auth_req_id", auth_req_id),
            ("subject_token", self.token.as_str()),
        ];
        let proof = match &self.dpop {
            Some(key) => Some(key.proof("POST", self.client.token_endpoint().await?, None)?),
            None => None,
        };
        let issued = now();
        let answer = self.client.token_with(&form, proof.as_deref()).await?;
        self.accept_access(answer, issued).await
    }

    /// Waits for a person's decision on the step `auth_req_id` names:
    /// polls every `interval` seconds (five more after each `slow_down`),
    /// and answers the step's token once it is approved.
    ///
    /// # Errors
    /// As [`Task::poll_approval`], except that `authorization_pending` and
    /// `slow_down` are waited out until `timeout` has passed, and so is a
    /// scrip that does not answer for a while ([`Error::Unreachable`], or
    /// `temporarily_unavailable`: a restart, a store that went away), whose
    /// step a person may approve meanwhile, for up to [`DOWN_WAIT`] in a
    /// row; after either, the last of them is the answer.
    pub async fn wait_for_approval(
        &self,
        auth_req_id: &str,
        interval: u64,
        timeout: Duration,
    ) -> Result<AccessToken, Error> {
        let start = tokio::time::Instant::now();
        let deadline = start
            .checked_add(timeout)
            .unwrap_or_else(|| start + Duration::from_secs(MAX_APPROVAL_WAIT));
        let mut interval = interval.clamp(1, 300);
        // Since when scrip has not answered, without a break.
        let mut down_since = None;
        loop {
            tokio::time::sleep_until(
                (tokio::time::Instant::now() + Duration::from_secs(interval)).min(deadline),
            )
            .await;
            let answer = self.poll_approval(auth_req_id).await;
            let now = tokio::time::Instant::now();
            let down = matches!(&answer, Err(Error::Unreachable { .. }))
                || matches!(&answer, Err(e) if e.oauth_code() == Some("temporarily_unavailable"));
            down_since = if down {
                Some(down_since.unwrap_or(now))
            } else {
                None
            };
            match answer {
                Err(e)
                    if (down
                        || matches!(
                            e.oauth_code(),
                            Some("authorization_pending" | "slow_down")
                        ))
                        && now < deadline
                        && down_since.is_none_or(|since| now.duration_since(since) < DOWN_WAIT) =>
                {
                    if e.oauth_code() == Some("slow_down") {
                        interval = (interval + 5).min(300);
                    }
                }
                other => return other,
            }
        }
    }

    /// Binds the access tokens this task gets from now on to `key` (DPoP,
    /// RFC 9449): scrip issues them as `DPoP` tokens that a resource server
    /// accepts only with a fresh proof by the key for each call
    /// ([`Task::request_headers`]). They are cached in memory only: another
    /// process would not hold the key. Bearer tokens cached in memory
    /// before are forgotten.
    #[must_use]
    pub fn with_dpop(mut self, key: std::sync::Arc<DpopKey>) -> Self {
        if let Ok(mut cache) = self.cache.lock() {
            cache.clear();
        }
        self.dpop = Some(key);
        self
    }

    /// The headers that present `token` on a call of `method` to `url`:
    /// `Authorization: Bearer <token>`, or for a DPoP-bound token
    /// `Authorization: DPoP <token>` and a `DPoP` proof by this task's key,
    /// made now for this one call.
    ///
    /// # Errors
    /// [`Error::Protocol`] for a bound token when this task has no DPoP key,
    /// or when the proof cannot be signed.
    pub fn request_headers(
        &self,
        token: &AccessToken,
        method: &str,
        url: &str,
    ) -> Result<Vec<(&'static str, String)>, Error> {
        if !token.token_type.eq_ignore_ascii_case("dpop") {
            return Ok(vec![("Authorization", format!("Bearer {}", token.token))]);
        }
        let key = self.dpop.as_ref().ok_or_else(|| {
            Error::Protocol("the token is DPoP-bound, and this task has no DPoP key".into())
        })?;
        Ok(vec![
            ("Authorization", format!("DPoP {}", token.token)),
            ("DPoP", key.proof(method, url, Some(&token.token))?),
        ])
    }

    fn cached(&self, key: &(String, String)) -> Option<AccessToken> {
        let cache = self.cache.lock().ok()?;
        cache
            .get(key)
            .filter(|(t, by)| t.fresh() && std::time::Instant::now() < *by)
            .map(|(t, _)| t.clone())
    }

    fn remember(&self, key: (String, String), token: &AccessToken) {
        let left = Duration::from_secs(token.refresh_at.saturating_sub(now()));
        let Some(by) = std::time::Instant::now().checked_add(left) else {
            return;
        };
        if let Ok(mut cache) = self.cache.lock() {
            cache.insert(key, (token.clone(), by));
        }
    }

    /// Ends the task: scrip revokes it and everything issued under it, and
    /// the cached tokens are forgotten.
    ///
    /// # Errors
    /// [`Error::Unreachable`] when scrip does not answer (the task then
    /// ends by itself at its deadline).
    pub async fn end(mut self) -> Result<(), Error> {
        self.owned = false;
        // Revoked first: a token fetched meanwhile and cached would
        // otherwise outlive the task in the cache.
        let revoked = self.client.revoke(&self.token).await;
        self.forget();
        revoked
    }

    /// Keeps the task running past this value's life (not ended on drop).
    #[must_use]
    pub fn into_token(mut self) -> String {
        self.owned = false;
        std::mem::take(&mut self.token)
    }

    fn forget(&self) {
        if let Ok(mut cache) = self.cache.lock() {
            cache.clear();
        }
        if let Some(c) = &self.file_cache {
            c.remove_task(&self.token);
        }
    }
}

impl Drop for Task {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if let Ok(mut cache) = self.cache.lock() {
            cache.clear();
        }
        // Best effort: without a runtime the task ends at its deadline.
        // The file cache is cleared after the revocation, as in `end`.
        let file_cache = self.file_cache.clone();
        let token = std::mem::take(&mut self.token);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            let client = self.client.clone();
            handle.spawn(async move {
                if let Err(e) = client.revoke(&token).await {
                    tracing::warn!(error = %e, "could not end a dropped task");
                }
                if let Some(c) = file_cache {
                    c.remove_task(&token);
                }
            });
        } else if let Some(c) = file_cache {
            c.remove_task(&token);
        }
    }
}

/// Why a request could not be sent: "timed out", or its first cause
/// (connection refused, a name that does not resolve, a certificate not
/// trusted), where reqwest's own message only says that sending failed.
#[must_use]
pub fn why_unsent(e: &reqwest::Error) -> String {
    if e.is_timeout() {
        "timed out".to_owned()
    } else {
        format!("connection failed: {}", innermost(e))
    }
}

/// The innermost of an error's causes.
fn innermost(e: &(dyn std::error::Error + 'static)) -> String {
    let mut cause = e;
    while let Some(next) = cause.source() {
        cause = next;
    }
    cause.to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn jwt(claims: &serde_json::Value) -> String {
        use base64::Engine as _;
        let b = |v: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v);
        format!("{}.{}.sig", b(b"{}"), b(claims.to_string().as_bytes()))
    }

    #[test]
    fn identities() {
        let future = jwt(&serde_json::json!({"exp": now() + 60}));
        assert_eq!(
            Identity::from_jwt(&format!(" {future}\n")).unwrap().token(),
            future
        );
        let past = jwt(&serde_json::json!({"exp": now() - 60}));
        let e = Identity::from_jwt(&past).unwrap_err();
        assert!(
            matches!(e, Error::IdentityExpired { ago } if ago >= 60),
            "{e}"
        );
        assert!(e.to_string().contains("get a fresh identity token"));
        for bad in ["", "abc", "a.b", "a.!!.c", "a.b.c.d.e"] {
            assert!(
                matches!(Identity::from_jwt(bad), Err(Error::IdentityMalformed)),
                "{bad}"
            );
        }
        assert!(!format!("{:?}", Identity::from_jwt(&future).unwrap()).contains(&future));
    }

    /// Identities and tokens never go to scrip in the clear across a
    /// network: plain http only to this machine.
    #[test]
    fn scrip_is_reached_over_https_unless_on_this_machine() {
        for ok in [
            "https://scrip.example",
            "https://10.0.0.5:7070",
            "http://127.0.0.1:7070",
            "http://[::1]:7070",
            "http://localhost:7070",
            "http://LOCALHOST",
        ] {
            assert!(Client::new(ok).is_ok(), "{ok}");
        }
        for bad in [
            "http://scrip.example",
            "http://10.0.0.5:7070",
            "http://localhost.evil.example",
            "http://127.0.0.1.nip.io",
            "ftp://127.0.0.1",
        ] {
            let e = Client::new(bad).err();
            assert!(matches!(e, Some(Error::Insecure { .. })), "{bad}: {e:?}");
        }
    }

    #[test]
    fn refresh_margin() {
        assert_eq!(refresh_at(1000, 300), 1270);
        assert_eq!(refresh_at(1000, 40), 1030);
        assert_eq!(refresh_at(1000, 3), 1003);
        assert_eq!(refresh_at(1000, 0), 1000);
        // A hostile `expires_in` does not overflow.
        assert_eq!(refresh_at(1000, u64::MAX), u64::MAX - 30);
    }
}
