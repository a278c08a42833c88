//! What both verifier benchmarks share: a real scrip on an ephemeral port
//! with a test Kubernetes issuer (adapted from `tests/common`), and the
//! requests that drive it.

#![allow(dead_code, reason = "each benchmark uses part of the harness")]

use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use scrip_config::{Config, Tool, TrustedIssuer};
use scrip_jose::{SigningAlgorithm, SigningKey};
use serde_json::{Value, json};

pub type Error = Box<dyn std::error::Error + Send + Sync>;

const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
const TXN: &str = "urn:ietf:params:oauth:token-type:txn_token";
const ACCESS: &str = "urn:ietf:params:oauth:token-type:access_token";
const K8S_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AUDIENCE: &str = "scrip";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

pub struct Scrip {
    pub url: String,
    http: reqwest::Client,
    key: SigningKey,
    _dir: tempfile::TempDir,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    handle: Option<tokio::task::JoinHandle<()>>,
}

impl Scrip {
    pub async fn start() -> Result<Self, Error> {
        let dir = tempfile::tempdir()?;
        let policy_dir = dir.path().join("policies");
        std::fs::create_dir_all(&policy_dir)?;
        let repo_policies = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
        for entry in std::fs::read_dir(repo_policies)? {
            let path = entry?.path();
            let keep = path
                .extension()
                .is_some_and(|e| e == "cedar" || e == "cedarschema");
            if let (true, Some(name)) = (keep, path.file_name()) {
                std::fs::copy(&path, policy_dir.join(name))?;
            }
        }
        let (key, _) = SigningKey::generate(SigningAlgorithm::ES256)?;
        let jwks_file = dir.path().join("k8s-jwks.json");
        std::fs::write(
            &jwks_file,
            json!({ "keys": [key.public_jwk()] }).to_string(),
        )?;
        let tool = Tool {
            name: scrip_token::ToolName::parse("github")?,
            resource: "https://api.github.com".to_owned(),
            actions: ["read", "write", "delete"]
                .iter()
                .map(|a| scrip_token::ActionName::parse(a))
                .collect::<Result<_, _>>()?,
            labels: Default::default(),
            introspectors: Vec::new(),
        };
        let config = Config {
            listen: "127.0.0.1:0".parse()?,
            data_dir: dir.path().join("data"),
            policy_dir,
            signing_algorithm: SigningAlgorithm::ES256,
            task_ttl: 3600,
            access_token_ttl: 300,
            policy_poll_interval: 1,
            trusted_issuers: vec![TrustedIssuer {
                issuer: K8S_ISSUER.to_owned(),
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
            }],
            tools: vec![tool],
            ..Config::default()
        };
        let server = scrip_server::Server::bind(config).await?;
        let url = server.issuer().to_owned();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            let stopped = server
                .run(async {
                    let _ = rx.await;
                })
                .await;
            if let Err(e) = stopped {
                tracing::error!(error = %e, "scrip stopped with an error");
            }
        });
        Ok(Self {
            url,
            http: reqwest::Client::new(),
            key,
            _dir: dir,
            shutdown: Some(tx),
            handle: Some(handle),
        })
    }

    pub async fn stop(mut self) {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(h) = self.handle.take() {
            let _ = h.await;
        }
    }

    /// A Kubernetes service-account token for `namespace`/`name`.
    pub fn kubernetes(&self, namespace: &str, name: &str) -> Result<String, Error> {
        let now = now();
        let claims = json!({
            "iss": K8S_ISSUER, "aud": AUDIENCE, "iat": now, "nbf": now, "exp": now + 600,
            "sub": format!("system:serviceaccount:{namespace}:{name}"),
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": { "name": name, "uid": "4f1e6c52-0000-4000-8000-000000000001" },
            }
        });
        Ok(self.key.sign_jwt("JWT", &claims)?)
    }

    async fn post_form(&self, path: &str, form: &[(&str, &str)]) -> Result<Value, Error> {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form.iter())
            .finish();
        let r = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body)
            .send()
            .await?;
        let status = r.status();
        let text = r.text().await?;
        if !status.is_success() {
            return Err(format!("POST {path}: {status}: {text}").into());
        }
        Ok(serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    fn access_token_of(body: &Value) -> Result<String, Error> {
        body.get("access_token")
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or_else(|| format!("no access_token in {body}").into())
    }

    /// A task for `agents/coder` and an access token at `github`:
    /// `(task token, access token)`.
    pub async fn github_token(&self, scope: &str) -> Result<(String, String), Error> {
        let identity = self.kubernetes("agents", "coder")?;
        let grants: Vec<String> = scope.split(' ').map(|a| format!("github:{a}")).collect();
        let details = json!({ "purpose": "fix JIRA-123", "environment": "dev" }).to_string();
        let task = Self::access_token_of(
            &self
                .post_form(
                    "/token",
                    &[
                        ("grant_type", TOKEN_EXCHANGE),
                        ("subject_token", &identity),
                        ("subject_token_type", JWT),
                        ("requested_token_type", TXN),
                        ("scope", &grants.join(" ")),
                        ("request_details", &details),
                    ],
                )
                .await?,
        )?;
        let access = Self::access_token_of(
            &self
                .post_form(
                    "/token",
                    &[
                        ("grant_type", TOKEN_EXCHANGE),
                        ("subject_token", &task),
                        ("subject_token_type", TXN),
                        ("requested_token_type", ACCESS),
                        ("audience", "github"),
                        ("scope", scope),
                    ],
                )
                .await?,
        )?;
        Ok((task, access))
    }

    pub async fn jwks(&self) -> Result<Vec<u8>, Error> {
        let meta: Value = self
            .http
            .get(format!(
                "{}/.well-known/oauth-authorization-server",
                self.url
            ))
            .send()
            .await?
            .json()
            .await?;
        let uri = meta
            .get("jwks_uri")
            .and_then(Value::as_str)
            .ok_or("metadata has no jwks_uri")?;
        Ok(self.http.get(uri).send().await?.bytes().await?.to_vec())
    }

    pub async fn revoke(&self, token: &str) -> Result<(), Error> {
        self.post_form("/revoke", &[("token", token)]).await?;
        Ok(())
    }
}
