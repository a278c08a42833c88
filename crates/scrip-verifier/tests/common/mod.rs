//! Test harness: a real scrip server on an ephemeral port (adapted from
//! `crates/scrip-server/tests/common`), a test identity provider whose keys
//! the test generates, and a fake scrip whose keys and revocation feed a test
//! controls.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use scrip_config::{Config, Tool, TrustedIssuer};
use scrip_jose::{SigningAlgorithm, SigningKey};
use serde_json::{Value, json};

pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const TXN: &str = "urn:ietf:params:oauth:token-type:txn_token";
pub const ACCESS: &str = "urn:ietf:params:oauth:token-type:access_token";
pub const K8S_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
pub const AUDIENCE: &str = "scrip";

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A test identity provider with one ES256 key.
pub struct Idp {
    pub issuer: String,
    pub key: SigningKey,
    pub jwks: Value,
}

impl Idp {
    pub fn new(issuer: &str) -> Self {
        let (key, _) = SigningKey::generate(SigningAlgorithm::ES256).unwrap();
        let jwks = json!({ "keys": [key.public_jwk()] });
        Self {
            issuer: issuer.to_owned(),
            key,
            jwks,
        }
    }

    /// A Kubernetes service-account token for `namespace`/`name`.
    pub fn kubernetes(&self, namespace: &str, name: &str) -> String {
        let now = now();
        let claims = json!({
            "iss": self.issuer, "aud": AUDIENCE, "iat": now, "nbf": now, "exp": now + 600,
            "sub": format!("system:serviceaccount:{namespace}:{name}"),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": { "name": name, "uid": "4f1e6c52-0000-4000-8000-000000000001" },
            }
        });
        self.key.sign_jwt("JWT", &claims).unwrap()
    }
}

pub fn tools() -> Vec<Tool> {
    let tool = |name: &str, resource: &str, actions: &[&str]| Tool {
        name: scrip_token::ToolName::parse(name).unwrap(),
        resource: resource.to_owned(),
        actions: actions
            .iter()
            .map(|a| scrip_token::ActionName::parse(a).unwrap())
            .collect(),
        labels: Default::default(),
        introspectors: Vec::new(),
    };
    vec![
        tool(
            "github",
            "https://api.github.com",
            &["read", "write", "delete"],
        ),
        tool("jira", "https://acme.atlassian.net", &["read", "write"]),
    ]
}

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// A running scrip.
pub struct Scrip {
    pub url: String,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
    pub k8s: Idp,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

/// Extra configuration: policy files and trusted issuers.
#[derive(Default)]
pub struct Extra {
    pub policies: Vec<(String, String)>,
    pub issuers: Vec<TrustedIssuer>,
}

impl Scrip {
    pub async fn start() -> Self {
        Self::start_with(Extra::default()).await
    }

    pub async fn start_with(extra: Extra) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let policy_dir = dir.path().join("policies");
        std::fs::create_dir_all(&policy_dir).unwrap();
        for entry in std::fs::read_dir(repo_root().join("policies")).unwrap() {
            let path = entry.unwrap().path();
            if path
                .extension()
                .is_some_and(|e| e == "cedar" || e == "cedarschema")
            {
                std::fs::copy(&path, policy_dir.join(path.file_name().unwrap())).unwrap();
            }
        }
        for (name, text) in &extra.policies {
            std::fs::write(policy_dir.join(name), text).unwrap();
        }
        let k8s = Idp::new(K8S_ISSUER);
        let jwks_file = dir.path().join("k8s-jwks.json");
        std::fs::write(&jwks_file, k8s.jwks.to_string()).unwrap();
        let mut trusted = vec![TrustedIssuer {
            issuer: k8s.issuer.clone(),
            jwks_uri: None,
            jwks_file: Some(jwks_file),
            audiences: vec![AUDIENCE.to_owned()],
            algorithms: vec!["ES256".into()],
            token_types: vec!["JWT".into()],
            allow_untyped: true,
            jwks_refresh: 300,
            jwks_max_stale: 3600,
            jwks_min_refetch: 10,
            kind: None,
            trust_domain: None,
            required_claims: Default::default(),
        }];
        trusted.extend(extra.issuers);
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().join("data"),
            policy_dir,
            signing_algorithm: SigningAlgorithm::ES256,
            task_ttl: 3600,
            access_token_ttl: 300,
            policy_poll_interval: 1,
            trusted_issuers: trusted,
            tools: tools(),
            ..Config::default()
        };
        let server = scrip_server::Server::bind(config).await.unwrap();
        let url = server.issuer().to_owned();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            server
                .run(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self {
            url,
            http: reqwest::Client::new(),
            dir,
            k8s,
            shutdown: Some(tx),
            handle: Some(handle),
        }
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = h.await;
        }
    }

    pub async fn post_form(&self, path: &str, form: &[(&str, &str)]) -> (u16, Value) {
        self.post_form_with(path, form, &[]).await
    }

    /// As [`Scrip::post_form`], with extra request headers.
    pub async fn post_form_with(
        &self,
        path: &str,
        form: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form.iter())
            .finish();
        let mut req = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// Starts a task for `identity`; returns the task token.
    pub async fn start_task(&self, identity: &str, scope: &str) -> String {
        let details = json!({ "purpose": "fix JIRA-123", "environment": "dev" }).to_string();
        let (status, body) = self
            .post_form(
                "/token",
                &[
                    ("grant_type", TOKEN_EXCHANGE),
                    ("subject_token", identity),
                    ("subject_token_type", JWT),
                    ("requested_token_type", TXN),
                    ("scope", scope),
                    ("request_details", &details),
                ],
            )
            .await;
        assert_eq!(status, 200, "start task failed: {body}");
        body["access_token"].as_str().unwrap().to_owned()
    }

    /// Exchanges a task token for an access token at `tool`.
    pub async fn access_token(&self, task: &str, tool: &str, scope: Option<&str>) -> String {
        let (status, body) = self.exchange_for_access(task, tool, scope, &[]).await;
        assert_eq!(status, 200, "access token failed: {body}");
        body["access_token"].as_str().unwrap().to_owned()
    }

    /// The token endpoint's answer to an exchange of `task` for an access
    /// token at `tool`, sent with `headers`.
    pub async fn exchange_for_access(
        &self,
        task: &str,
        tool: &str,
        scope: Option<&str>,
        headers: &[(&str, &str)],
    ) -> (u16, Value) {
        let mut form = vec![
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", task),
            ("subject_token_type", TXN),
            ("requested_token_type", ACCESS),
            ("audience", tool),
        ];
        if let Some(s) = scope {
            form.push(("scope", s));
        }
        self.post_form_with("/token", &form, headers).await
    }

    /// A task for an agent in namespace `agents` and an access token at
    /// `github` with `scope`: `(task token, access token)`.
    pub async fn github_token(&self, scope: &str) -> (String, String) {
        let identity = self.k8s.kubernetes("agents", "coder");
        let grants: Vec<String> = scope.split(' ').map(|a| format!("github:{a}")).collect();
        let task = self.start_task(&identity, &grants.join(" ")).await;
        let access = self.access_token(&task, "github", Some(scope)).await;
        (task, access)
    }

    /// An access token at `github` with `scope`, bound to `key` (RFC 9449).
    pub async fn github_dpop_token(
        &self,
        scope: &str,
        key: &scrip_testkit::dpop::DpopKey,
    ) -> String {
        let identity = self.k8s.kubernetes("agents", "coder");
        let grants: Vec<String> = scope.split(' ').map(|a| format!("github:{a}")).collect();
        let task = self.start_task(&identity, &grants.join(" ")).await;
        let proof = key.proof("POST", &format!("{}/token", self.url), None);
        let (status, body) = self
            .exchange_for_access(&task, "github", Some(scope), &[("DPoP", &proof)])
            .await;
        assert_eq!(status, 200, "access token failed: {body}");
        assert_eq!(body["token_type"], "DPoP", "{body}");
        body["access_token"].as_str().unwrap().to_owned()
    }

    pub async fn revoke(&self, token: &str) {
        let (status, _) = self.post_form("/revoke", &[("token", token)]).await;
        assert_eq!(status, 200);
    }

    /// Whether the running server serves the revocation feed.
    pub async fn has_feed(&self) -> bool {
        let meta: Value = self
            .http
            .get(format!(
                "{}/.well-known/oauth-authorization-server",
                self.url
            ))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        meta.get("scrip_revocation_feed_endpoint").is_some()
    }
}

/// Polls `cond` every 20 ms for up to `secs` seconds.
pub async fn eventually<F, Fut>(secs: u64, mut cond: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    while tokio::time::Instant::now() < deadline {
        if cond().await {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    false
}

// ---------------------------------------------------------------- fake scrip

pub const FEED_IDENTITY: &str = "resource-server-identity";

/// What the fake scrip serves; tests change it while it runs.
#[derive(Default)]
pub struct FakeState {
    /// Public JWKs served at /jwks.
    pub jwks: Vec<Value>,
    /// Revocation events, in order; event i has cursor i + 1.
    pub events: Vec<Value>,
    /// While set, /revocations answers 500.
    pub feed_down: bool,
    /// How many /revocations calls were answered 500.
    pub feed_refused: usize,
    /// How many times /jwks was fetched.
    pub jwks_fetches: usize,
    /// While set, /jwks answers 500.
    pub jwks_down: bool,
    /// How long /jwks holds back its answer, in ms.
    pub jwks_delay_ms: u64,
    /// Every `after` asked of /revocations.
    pub afters: Vec<u64>,
    /// How many /revocations calls were refused for a bad identity.
    pub unauthorized: usize,
}

/// A fake scrip: metadata, JWKS and a revocation feed, all under test control.
pub struct Fake {
    pub url: String,
    pub state: Arc<Mutex<FakeState>>,
    pub notify: Arc<tokio::sync::Notify>,
    pub key: SigningKey,
    handle: tokio::task::JoinHandle<()>,
}

#[derive(Clone)]
struct FakeCtx {
    issuer: String,
    state: Arc<Mutex<FakeState>>,
    notify: Arc<tokio::sync::Notify>,
}

fn page(state: &FakeState, after: u64) -> Value {
    let from = usize::try_from(after).unwrap().min(state.events.len());
    json!({ "cursor": state.events.len(), "events": state.events[from..].to_vec() })
}

async fn revocations(
    State(ctx): State<FakeCtx>,
    headers: HeaderMap,
    Query(q): Query<HashMap<String, String>>,
) -> axum::response::Response {
    let auth = headers
        .get("authorization")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let after: u64 = q.get("after").and_then(|a| a.parse().ok()).unwrap_or(0);
    let wait: u64 = q.get("wait").and_then(|a| a.parse().ok()).unwrap_or(0);
    {
        let mut s = ctx.state.lock().unwrap();
        if auth != format!("Bearer {FEED_IDENTITY}") {
            s.unauthorized += 1;
            return StatusCode::UNAUTHORIZED.into_response();
        }
        s.afters.push(after);
    }
    let deadline = tokio::time::Instant::now() + Duration::from_secs(wait.min(30));
    loop {
        let notified = ctx.notify.notified();
        {
            let mut s = ctx.state.lock().unwrap();
            if s.feed_down {
                s.feed_refused += 1;
                return StatusCode::INTERNAL_SERVER_ERROR.into_response();
            }
            if s.events.len() as u64 > after || tokio::time::Instant::now() >= deadline {
                return axum::Json(page(&s, after)).into_response();
            }
        }
        let _ = tokio::time::timeout_at(deadline, notified).await;
    }
}

impl Fake {
    pub async fn start() -> Self {
        let (key, _) = SigningKey::generate(SigningAlgorithm::ES256).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = Arc::new(Mutex::new(FakeState {
            jwks: vec![key.public_jwk()],
            ..FakeState::default()
        }));
        let notify = Arc::new(tokio::sync::Notify::new());
        let ctx = FakeCtx {
            issuer: url.clone(),
            state: state.clone(),
            notify: notify.clone(),
        };
        let app = axum::Router::new()
            .route(
                "/.well-known/oauth-authorization-server",
                axum::routing::get(|State(ctx): State<FakeCtx>| async move {
                    axum::Json(json!({
                        "issuer": ctx.issuer,
                        "jwks_uri": format!("{}/jwks", ctx.issuer),
                        "scrip_revocation_feed_endpoint": format!("{}/revocations", ctx.issuer),
                        "introspection_endpoint": format!("{}/introspect", ctx.issuer),
                    }))
                }),
            )
            .route(
                "/jwks",
                axum::routing::get(|State(ctx): State<FakeCtx>| async move {
                    let delay = {
                        let mut s = ctx.state.lock().unwrap();
                        s.jwks_fetches += 1;
                        s.jwks_delay_ms
                    };
                    tokio::time::sleep(Duration::from_millis(delay)).await;
                    let s = ctx.state.lock().unwrap();
                    if s.jwks_down {
                        return Err(axum::http::StatusCode::INTERNAL_SERVER_ERROR);
                    }
                    Ok(axum::Json(json!({ "keys": s.jwks })))
                }),
            )
            .route("/revocations", axum::routing::get(revocations))
            .with_state(ctx);
        let handle = tokio::spawn(async move {
            axum::serve(listener, app).await.unwrap();
        });
        Self {
            url,
            state,
            notify,
            key,
            handle,
        }
    }

    /// An access token at `tool` signed by `key`.
    pub fn token_with(&self, key: &SigningKey, tool: &str, txn: &str, jti: &str) -> String {
        let now = now();
        let claims = json!({
            "iss": self.url, "sub": "system:serviceaccount:agents:coder", "aud": tool,
            "iat": now, "exp": now + 300, "jti": jti, "client_id": "system:serviceaccount:agents:coder",
            "scope": "read", "txn": txn,
        });
        key.sign_jwt("at+jwt", &claims).unwrap()
    }

    pub fn token(&self, txn: &str, jti: &str) -> String {
        self.token_with(&self.key, "github", txn, jti)
    }

    pub fn push_event(&self, event: Value) {
        self.state.lock().unwrap().events.push(event);
        self.notify.notify_waiters();
    }

    pub fn set_feed_down(&self, down: bool) {
        self.state.lock().unwrap().feed_down = down;
        self.notify.notify_waiters();
    }
}

impl Drop for Fake {
    fn drop(&mut self) {
        self.handle.abort();
    }
}
