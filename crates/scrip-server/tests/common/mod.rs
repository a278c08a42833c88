//! Test harness: a test identity provider whose keys the test generates, and
//! a real scrip server on an ephemeral port, spoken to over HTTP.

#![allow(
    dead_code,
    reason = "each test binary uses a different part of the harness"
)]

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use jsonwebtoken::{EncodingKey, Header};
use scrip_config::{Config, Tool, TrustedIssuer};
use scrip_jose::{SigningAlgorithm, SigningKey};
use serde_json::{Value, json};

pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const TXN: &str = "urn:ietf:params:oauth:token-type:txn_token";
pub const ACCESS: &str = "urn:ietf:params:oauth:token-type:access_token";

pub const K8S_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
pub const GITHUB_ISSUER: &str = "https://token.actions.githubusercontent.com";
pub const SPIFFE_ISSUER: &str = "https://spire.acme.example";
pub const AUDIENCE: &str = "scrip";

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A test identity provider: an ES256 key (signed through jsonwebtoken, an
/// implementation independent of scrip's signer) and an EdDSA key.
pub struct Idp {
    pub issuer: String,
    pub es_kid: String,
    pub es_pkcs8: Vec<u8>,
    pub ed_kid: String,
    pub ed_pkcs8: Vec<u8>,
    pub jwks: Value,
}

impl Idp {
    pub fn new(issuer: &str) -> Self {
        let (es, es_pkcs8) = SigningKey::generate(SigningAlgorithm::ES256).unwrap();
        let (ed, ed_pkcs8) = SigningKey::generate(SigningAlgorithm::EdDSA).unwrap();
        let jwks = json!({ "keys": [es.public_jwk(), ed.public_jwk()] });
        Self {
            issuer: issuer.to_owned(),
            es_kid: es.kid().to_owned(),
            es_pkcs8: es_pkcs8.to_vec(),
            ed_kid: ed.kid().to_owned(),
            ed_pkcs8: ed_pkcs8.to_vec(),
            jwks,
        }
    }

    /// Standard claims for `sub`, valid for 10 minutes, audience `scrip`.
    pub fn claims(&self, sub: &str) -> Value {
        let now = now();
        json!({ "iss": self.issuer, "sub": sub, "aud": AUDIENCE, "iat": now, "nbf": now, "exp": now + 600 })
    }

    /// Signs `claims` with ES256 and a `JWT` typ.
    pub fn sign(&self, claims: &Value) -> String {
        let mut header = Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.es_kid.clone());
        header.typ = Some("JWT".into());
        self.sign_with(&header, claims)
    }

    /// Signs with a caller-built header (ES256 or EdDSA key chosen by `alg`).
    pub fn sign_with(&self, header: &Header, claims: &Value) -> String {
        let key = match header.alg {
            jsonwebtoken::Algorithm::EdDSA => EncodingKey::from_ed_der(&self.ed_pkcs8),
            _ => EncodingKey::from_ec_der(&self.es_pkcs8),
        };
        jsonwebtoken::encode(header, claims, &key).unwrap()
    }

    /// A Kubernetes service-account token for `namespace`/`name`, with a
    /// `jti` of its own as Kubernetes 1.29 and later give.
    pub fn kubernetes(&self, namespace: &str, name: &str) -> String {
        static ISSUED: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut c = self.claims(&format!("system:serviceaccount:{namespace}:{name}"));
        let n = ISSUED.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        c["jti"] = json!(format!("k8s-{}-{n}", std::process::id()));
        c["kubernetes.io"] = json!({
            "namespace": namespace,
            "serviceaccount": { "name": name, "uid": "4f1e6c52-0000-4000-8000-000000000001" },
            "pod": { "name": format!("{name}-7d9f8"), "uid": "4f1e6c52-0000-4000-8000-000000000002" }
        });
        let mut header = Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.es_kid.clone());
        self.sign_with(&header, &c)
    }

    /// A GitHub Actions OIDC token for `repository`.
    pub fn github(&self, repository: &str) -> String {
        let owner = repository.split('/').next().unwrap_or_default();
        let mut c = self.claims(&format!("repo:{repository}:ref:refs/heads/main"));
        for (k, v) in [
            ("repository", repository.to_owned()),
            ("repository_owner", owner.to_owned()),
            ("ref", "refs/heads/main".to_owned()),
            ("workflow", "agent".to_owned()),
            ("actor", "octocat".to_owned()),
            ("event_name", "workflow_dispatch".to_owned()),
            (
                "job_workflow_ref",
                format!("{repository}/.github/workflows/agent.yml@refs/heads/main"),
            ),
        ] {
            c[k] = json!(v);
        }
        c["run_id"] = json!("7312345678");
        self.sign(&c)
    }

    /// A SPIFFE JWT-SVID (EdDSA) for `spiffe://<domain><path>`.
    pub fn spiffe(&self, domain: &str, path: &str) -> String {
        let now = now();
        let c = json!({ "iss": self.issuer, "sub": format!("spiffe://{domain}{path}"), "aud": [AUDIENCE, "other"], "exp": now + 300, "iat": now });
        let mut header = Header::new(jsonwebtoken::Algorithm::EdDSA);
        header.kid = Some(self.ed_kid.clone());
        header.typ = Some("JWT".into());
        self.sign_with(&header, &c)
    }
}

/// The tools every test server has: development ones (labelled
/// `environment = "dev"`), where the shipped `delete-needs-approval` lets a
/// task in dev delete without a person's approval.
pub fn tools() -> Vec<Tool> {
    let tool = |name: &str, resource: &str, actions: &[&str]| Tool {
        name: scrip_token::ToolName::parse(name).unwrap(),
        resource: resource.to_owned(),
        actions: actions
            .iter()
            .map(|a| scrip_token::ActionName::parse(a).unwrap())
            .collect(),
        labels: [("environment".to_owned(), "dev".to_owned())].into(),
        introspectors: Vec::new(),
    };
    vec![
        tool(
            "github",
            "https://api.github.com",
            &["read", "write", "delete"],
        ),
        tool("jira", "https://acme.atlassian.net", &["read", "write"]),
        tool(
            "deploy",
            "https://deploy.acme.example",
            &["read", "execute", "delete"],
        ),
    ]
}

/// The repository's `policies/` directory.
pub fn repo_policies() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies")
}

/// A running scrip.
pub struct TestServer {
    pub url: String,
    pub http: reqwest::Client,
    pub dir: tempfile::TempDir,
    pub k8s: Idp,
    pub github: Idp,
    pub spiffe: Idp,
    /// Its configuration, listening where it does.
    config: Config,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

/// A change to the test server's configuration.
pub type ConfigEdit = Box<dyn FnOnce(&mut Config) + Send>;

/// How to build a test server.
pub struct Options {
    pub algorithm: SigningAlgorithm,
    /// Extra policy files `(name, text)` next to the repository's policies.
    pub extra_policies: Vec<(String, String)>,
    pub task_ttl: u64,
    pub access_token_ttl: u64,
    pub edit: Option<ConfigEdit>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            algorithm: SigningAlgorithm::ES256,
            extra_policies: Vec::new(),
            task_ttl: 3600,
            access_token_ttl: 300,
            edit: None,
        }
    }
}

fn trusted(idp: &Idp, dir: &Path, name: &str, algorithms: &[&str]) -> TrustedIssuer {
    let file = dir.join(format!("{name}-jwks.json"));
    std::fs::write(&file, idp.jwks.to_string()).unwrap();
    TrustedIssuer {
        issuer: idp.issuer.clone(),
        jwks_uri: None,
        jwks_file: Some(file),
        audiences: vec![AUDIENCE.to_owned()],
        algorithms: algorithms.iter().map(|s| (*s).to_owned()).collect(),
        token_types: vec!["JWT".into()],
        allow_untyped: true,
        jwks_refresh: 300,
        jwks_max_stale: 3600,
        jwks_min_refetch: 10,
        kind: None,
        trust_domain: None,
        required_claims: Default::default(),
    }
}

impl TestServer {
    pub async fn start() -> Self {
        Self::start_with(Options::default()).await
    }

    pub async fn start_with(opts: Options) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let policy_dir = dir.path().join("policies");
        std::fs::create_dir_all(&policy_dir).unwrap();
        for entry in std::fs::read_dir(repo_policies()).unwrap() {
            let path = entry.unwrap().path();
            if path
                .extension()
                .is_some_and(|e| e == "cedar" || e == "cedarschema")
            {
                std::fs::copy(&path, policy_dir.join(path.file_name().unwrap())).unwrap();
            }
        }
        for (name, text) in &opts.extra_policies {
            std::fs::write(policy_dir.join(name), text).unwrap();
        }
        let k8s = Idp::new(K8S_ISSUER);
        let github = Idp::new(GITHUB_ISSUER);
        let spiffe = Idp::new(SPIFFE_ISSUER);
        let mut config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().join("data"),
            policy_dir,
            signing_algorithm: opts.algorithm,
            task_ttl: opts.task_ttl,
            access_token_ttl: opts.access_token_ttl,
            policy_poll_interval: 1,
            trusted_issuers: vec![
                trusted(&k8s, dir.path(), "k8s", &["ES256", "RS256"]),
                trusted(&github, dir.path(), "github", &["ES256", "RS256"]),
                trusted(&spiffe, dir.path(), "spiffe", &["EdDSA", "ES256"]),
            ],
            tools: tools(),
            ..Config::default()
        };
        if let Some(edit) = opts.edit {
            edit(&mut config);
        }
        let (url, shutdown, handle) = launch(&mut config).await;
        Self {
            url,
            http: reqwest::Client::new(),
            dir,
            k8s,
            github,
            spiffe,
            config,
            shutdown: Some(shutdown),
            handle: Some(handle),
        }
    }

    /// Stops the server and starts it again on the same store, address and
    /// issuer, with `edit` made to its configuration.
    pub async fn restart_with(&mut self, edit: impl FnOnce(&mut Config)) {
        self.halt().await;
        edit(&mut self.config);
        let (url, shutdown, handle) = launch(&mut self.config).await;
        assert_eq!(url, self.url, "restarted elsewhere");
        self.shutdown = Some(shutdown);
        self.handle = Some(handle);
    }
}

/// Starts a server on `config` and waits until it is ready; `config` then
/// listens where it does.
async fn launch(
    config: &mut Config,
) -> (
    String,
    tokio::sync::oneshot::Sender<()>,
    tokio::task::JoinHandle<()>,
) {
    let server = scrip_server::Server::bind(config.clone()).await.unwrap();
    config.listen = server.local_addr().unwrap();
    // Where it listens: the issuer too, unless a test configured
    // another one.
    let url = format!("http://{}", server.local_addr().unwrap());
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    let handle = tokio::spawn(async move {
        server
            .run(async {
                let _ = rx.await;
            })
            .await
            .unwrap();
    });
    let http = reqwest::Client::new();
    // A mounted proxy refuses requests until its revocation set is read.
    let ready = format!("{url}/readyz");
    for _ in 0..500 {
        match http.get(&ready).send().await {
            Ok(r) if r.status() == 200 => break,
            _ => tokio::time::sleep(Duration::from_millis(20)).await,
        }
    }
    (url, tx, handle)
}

impl TestServer {
    pub async fn stop(mut self) {
        self.halt().await;
    }

    /// Stops the server, then reads the audit trail it left.
    pub async fn stop_then_audit(mut self) -> Vec<scrip_store::AuditEvent> {
        self.halt().await;
        self.audit().await
    }

    async fn halt(&mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = h.await;
        }
    }

    /// POSTs a form to `path`; returns status, headers and JSON body
    /// (`Null` when the body is empty or not JSON).
    pub async fn post_form(&self, path: &str, form: &[(&str, &str)]) -> Reply {
        self.caller().post_form(path, form).await
    }

    /// A handle that spawned tasks can own, for concurrent requests.
    pub fn caller(&self) -> Caller {
        Caller {
            http: self.http.clone(),
            url: self.url.clone(),
        }
    }

    pub async fn post_raw(
        &self,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
        bearer: Option<&str>,
    ) -> Reply {
        let mut req = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", content_type)
            .body(body);
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        Reply::from(req.send().await.unwrap()).await
    }

    /// Starts a task; panics unless it succeeds.
    pub async fn start_task(&self, identity: &str, scope: &str, env: &str, purpose: &str) -> Value {
        let r = self
            .try_start_task(identity, scope, env, purpose, None)
            .await;
        assert_eq!(r.status, 200, "start task failed: {}", r.body);
        r.body
    }

    pub async fn try_start_task(
        &self,
        identity: &str,
        scope: &str,
        env: &str,
        purpose: &str,
        ttl: Option<u64>,
    ) -> Reply {
        let mut details = json!({ "purpose": purpose, "environment": env });
        if let Some(ttl) = ttl {
            details["ttl"] = json!(ttl);
        }
        let details = details.to_string();
        self.post_form(
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
        .await
    }

    /// Asks to delegate the task of `parent` (its task token) to the
    /// sub-agent whose identity token is `actor`, with `scope` and
    /// `request_details` when given.
    pub async fn try_delegate(
        &self,
        parent: &str,
        actor: &str,
        scope: Option<&str>,
        details: Option<&Value>,
    ) -> Reply {
        let details = details.map(Value::to_string);
        let mut form = vec![
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", parent),
            ("subject_token_type", TXN),
            ("actor_token", actor),
            ("actor_token_type", JWT),
            ("requested_token_type", TXN),
        ];
        if let Some(scope) = scope {
            form.push(("scope", scope));
        }
        if let Some(d) = details.as_deref() {
            form.push(("request_details", d));
        }
        self.post_form("/token", &form).await
    }

    /// Approves the waiting step `id`, signed in with `bearer` (an
    /// identity token).
    pub async fn approve(&self, id: &str, bearer: Option<&str>) -> Reply {
        self.post_raw(
            &format!("/approvals/{id}/approve"),
            "application/x-www-form-urlencoded",
            Vec::new(),
            bearer,
        )
        .await
    }

    /// Exchanges a task token for an access token at `tool`.
    pub async fn access_token(&self, task_token: &str, tool: &str, scope: Option<&str>) -> Reply {
        self.access_token_dpop(task_token, tool, scope, &[]).await
    }

    /// As [`TestServer::access_token`], with these `DPoP` headers.
    pub async fn access_token_dpop(
        &self,
        task_token: &str,
        tool: &str,
        scope: Option<&str>,
        proofs: &[&str],
    ) -> Reply {
        let mut form = vec![
            ("grant_type", TOKEN_EXCHANGE),
            ("subject_token", task_token),
            ("subject_token_type", TXN),
            ("requested_token_type", ACCESS),
            ("audience", tool),
        ];
        if let Some(s) = scope {
            form.push(("scope", s));
        }
        let headers: Vec<(&str, &str)> = proofs.iter().map(|p| ("DPoP", *p)).collect();
        self.caller()
            .post_form_with("/token", &form, &headers)
            .await
    }

    /// Introspects `token`, authenticated as a Kubernetes workload.
    /// Introspects `token`: a task token as its agent (with the sub-agents
    /// in its chain, the one caller it is active to), any other token as
    /// github's resource server.
    pub async fn introspect(&self, token: &str) -> Reply {
        let caller = match task_agent(token) {
            Some(sub) => {
                let (namespace, name) = sub
                    .strip_prefix("system:serviceaccount:")
                    .and_then(|rest| rest.split_once(':'))
                    .unwrap_or_else(|| {
                        panic!("a task token of agent {sub}: introspect it with introspect_as")
                    });
                self.k8s.kubernetes(namespace, name)
            }
            None => self.k8s.kubernetes("resource-servers", "github-proxy"),
        };
        self.introspect_as(&caller, token).await
    }

    /// Introspects `token` as the workload whose identity is `caller`.
    pub async fn introspect_as(&self, caller: &str, token: &str) -> Reply {
        let body = format!("token={}", urlencode(token));
        self.post_raw(
            "/introspect",
            "application/x-www-form-urlencoded",
            body.into_bytes(),
            Some(caller),
        )
        .await
    }

    pub async fn revoke(&self, token: &str) -> Reply {
        self.post_form("/revoke", &[("token", token)]).await
    }

    /// `token` with its claims changed by `edit`, signed again with the
    /// server's own ES256 key (as another replica sharing it would sign).
    #[allow(dead_code, reason = "not every test binary resigns tokens")]
    pub fn resign(&self, token: &str, edit: impl FnOnce(&mut Value)) -> String {
        use base64::Engine as _;
        let key_file: Value = serde_json::from_str(
            &std::fs::read_to_string(self.dir.path().join("data/keys/signing-es256.json")).unwrap(),
        )
        .unwrap();
        let der = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(key_file["pkcs8"].as_str().unwrap())
            .unwrap();
        let key = SigningKey::from_pkcs8(SigningAlgorithm::ES256, &der).unwrap();
        let (header, mut claims) = decode_parts(token);
        edit(&mut claims);
        key.sign_jwt(header["typ"].as_str().unwrap(), &claims)
            .unwrap()
    }

    /// Takes the store's write lock, as another writer would, until
    /// [`release`]: meanwhile every commit waits, then fails.
    #[allow(dead_code, reason = "not every test binary holds the store")]
    pub async fn hold_writes(&self) -> sqlx::SqliteConnection {
        hold_store(&self.dir.path().join("data/scrip.db")).await
    }

    /// Ends task `txn` through another handle on the store, as another
    /// process would: no signal reaches this server.
    #[allow(dead_code, reason = "not every test binary ends tasks so")]
    pub async fn end_elsewhere(&self, txn: &str) {
        let other = scrip_store::open(None, &self.dir.path().join("data/scrip.db"))
            .await
            .unwrap();
        other
            .commit(vec![scrip_store::Write::EndTask {
                id: txn.to_owned(),
                at: now(),
                reason: "revoked".into(),
                grace: 0,
            }])
            .await
            .unwrap();
    }

    /// The audit records, read straight from the store file.
    pub async fn audit(&self) -> Vec<scrip_store::AuditEvent> {
        use scrip_store::Store as _;
        let store = scrip_store::SqliteStore::open(&self.dir.path().join("data/scrip.db"))
            .await
            .unwrap();
        store
            .audit(&scrip_store::AuditFilter::default())
            .await
            .unwrap()
    }
}

pub fn urlencode(s: &str) -> String {
    form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// The server's address and an HTTP client: cheap to clone into tasks.
#[derive(Clone)]
pub struct Caller {
    http: reqwest::Client,
    url: String,
}

impl Caller {
    /// As [`TestServer::post_form`].
    pub async fn post_form(&self, path: &str, form: &[(&str, &str)]) -> Reply {
        self.post_form_with(path, form, &[]).await
    }

    /// As [`Caller::post_form`], with extra request headers.
    pub async fn post_form_with(
        &self,
        path: &str,
        form: &[(&str, &str)],
        headers: &[(&str, &str)],
    ) -> Reply {
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
        Reply::from(req.send().await.unwrap()).await
    }
}

/// An HTTP answer.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: reqwest::header::HeaderMap,
    pub body: Value,
    pub text: String,
}

impl Reply {
    async fn from(r: reqwest::Response) -> Self {
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        let text = r.text().await.unwrap();
        let body = serde_json::from_str(&text).unwrap_or(Value::Null);
        Self {
            status,
            headers,
            body,
            text,
        }
    }

    /// Asserts an OAuth error with this status and code.
    pub fn assert_error(&self, status: u16, code: &str) {
        assert_eq!(
            (self.status, self.body["error"].as_str()),
            (status, Some(code)),
            "unexpected answer: {}",
            self.text
        );
        let d = self.body["error_description"].as_str().unwrap_or_default();
        assert!(!d.is_empty(), "no error_description");
        assert!(
            !d.starts_with(char::is_uppercase),
            "description not lowercase: {d}"
        );
    }
}

/// Decodes a JWT's header and claims without verifying (for assertions).
/// The `sub` of what looks like a task token (its `typ`; nothing is
/// verified), or `None`.
fn task_agent(token: &str) -> Option<String> {
    use base64::Engine as _;
    let mut parts = token.split('.');
    let mut part = || -> Option<Value> {
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(parts.next()?)
            .ok()?;
        serde_json::from_slice(&bytes).ok()
    };
    let (header, claims) = (part()?, part()?);
    (header["typ"] == "txntoken+jwt")
        .then(|| claims["sub"].as_str().map(str::to_owned))
        .flatten()
}

/// How many `token.introspected` records name `token` with a reason that
/// holds `why`.
#[allow(dead_code, reason = "not every test binary introspects")]
pub fn introspections_of(audit: &[scrip_store::AuditEvent], token: &str, why: &str) -> usize {
    let jti = decode_parts(token).1["jti"].as_str().map(str::to_owned);
    audit
        .iter()
        .filter(|a| {
            a.event == "token.introspected"
                && a.jti == jti
                && a.reason.as_deref().is_some_and(|r| r.contains(why))
        })
        .count()
}

pub fn decode_parts(token: &str) -> (Value, Value) {
    use base64::Engine as _;
    let mut parts = token.split('.');
    let dec = |p: &str| -> Value {
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(p)
                .unwrap(),
        )
        .unwrap()
    };
    (dec(parts.next().unwrap()), dec(parts.next().unwrap()))
}

/// Takes the write lock of the SQLite store at `db`, as another writer
/// would, until released.
#[allow(dead_code, reason = "not every test binary holds the store")]
pub async fn hold_store(db: &Path) -> sqlx::SqliteConnection {
    use sqlx::Connection as _;
    let mut held = sqlx::SqliteConnection::connect(&format!("sqlite://{}", db.display()))
        .await
        .unwrap();
    sqlx::query("BEGIN IMMEDIATE")
        .execute(&mut held)
        .await
        .unwrap();
    held
}

/// Gives back the write lock [`TestServer::hold_writes`] took.
#[allow(dead_code, reason = "not every test binary holds the store")]
pub async fn release(mut held: sqlx::SqliteConnection) {
    use sqlx::Connection as _;
    sqlx::query("ROLLBACK").execute(&mut held).await.unwrap();
    held.close().await.unwrap();
}

/// Everything written through `tracing` in this process.
#[allow(dead_code, reason = "not every test binary reads its logs")]
pub fn captured_logs() -> std::sync::Arc<std::sync::Mutex<Vec<u8>>> {
    use std::sync::{Arc, Mutex, OnceLock};
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buf = Arc::new(Mutex::new(Vec::new()));
        let writer = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_writer(move || Capture(writer.clone()))
            .finish();
        let _ = tracing::subscriber::set_global_default(subscriber);
        buf
    })
    .clone()
}

struct Capture(std::sync::Arc<std::sync::Mutex<Vec<u8>>>);

impl std::io::Write for Capture {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(b);
        Ok(b.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// How many refusals a count record holds (its reason starts with how
/// many, and ends with the first one's reason); `None` for a record of one.
pub fn count_of(a: &scrip_store::AuditEvent) -> Option<u64> {
    let r = a.reason.as_deref()?;
    let (n, rest) = r.split_once(" more refused, from ")?;
    assert!(
        rest.contains(" (ms since the epoch), recorded as a count: over 10 a second for one ")
            || rest.contains(
                " (ms since the epoch), recorded as a count: over 10 a second for the uids no entry serves, together;"
            ),
        "{r}"
    );
    Some(n.parse().unwrap())
}

/// Asserts that `refused`, records of one by one and counts, account for
/// `tries` refusals, at most the budget a second of them one by one, and
/// some counted.
pub fn assert_counted_past_the_budget(refused: &[scrip_store::AuditEvent], tries: u64) {
    assert_eq!(
        refused
            .iter()
            .map(|a| count_of(a).unwrap_or(1))
            .sum::<u64>(),
        tries,
        "{refused:#?}"
    );
    let mut per_second = std::collections::BTreeMap::<u64, u32>::new();
    for a in refused.iter().filter(|a| count_of(a).is_none()) {
        *per_second.entry(a.at_ms / 1000).or_default() += 1;
    }
    assert!(
        per_second
            .values()
            .all(|n| *n <= scrip_server::REFUSALS_PER_SECOND),
        "{per_second:?}"
    );
    assert!(
        refused.iter().any(|a| count_of(a).is_some()),
        "{refused:#?}"
    );
}
