//! What the end-to-end tests of the `scrip` binary share: the binary with a
//! clean environment, a test identity provider, a `scrip serve` child that
//! is killed when dropped, an HTTP client for the token endpoint, and a load
//! loop that records every token it received.

#![allow(
    dead_code,
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code; each test binary uses part of it"
)]

use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use jsonwebtoken::{EncodingKey, Header};
use scrip_jose::{SigningAlgorithm, SigningKey};
use serde_json::{Value, json};

pub const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
pub const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
pub const TXN: &str = "urn:ietf:params:oauth:token-type:txn_token";
pub const K8S_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";

// --- the binary ------------------------------------------------------------

/// A `scrip` command with a clean environment for scrip's own variables.
pub fn scrip() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_scrip"));
    cmd.env_remove("SCRIP_CONFIG")
        .env_remove("SCRIP_LOG_FORMAT")
        .env("SCRIP_LOG", "info")
        .env("NO_COLOR", "1")
        .stdin(Stdio::null());
    cmd
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A port for a `scrip serve` child (see [`scrip_testkit::free_port`]).
pub fn free_port() -> u16 {
    scrip_testkit::free_port()
}

pub fn repo_policies() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../../policies"))
}

pub fn copy_policies(to: &Path) {
    fs::create_dir_all(to).unwrap();
    for entry in fs::read_dir(repo_policies()).unwrap() {
        let path = entry.unwrap().path();
        let ext = path.extension().and_then(|e| e.to_str());
        if matches!(ext, Some("cedar" | "cedarschema")) {
            fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A test identity provider for Kubernetes service-account tokens, signed
/// with jsonwebtoken (independent of scrip's signer).
pub struct Idp {
    pub kid: String,
    pub pkcs8: Vec<u8>,
    pub jwks: Value,
}

impl Idp {
    pub fn new() -> Self {
        let (key, pkcs8) = SigningKey::generate(SigningAlgorithm::ES256).unwrap();
        Self {
            kid: key.kid().to_owned(),
            pkcs8: pkcs8.to_vec(),
            jwks: json!({ "keys": [key.public_jwk()] }),
        }
    }

    pub fn kubernetes(&self, namespace: &str, name: &str) -> String {
        let now = now();
        let claims = json!({
            "iss": K8S_ISSUER,
            "sub": format!("system:serviceaccount:{namespace}:{name}"),
            "aud": "scrip",
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            "kubernetes.io": { "namespace": namespace, "serviceaccount": { "name": name } },
        });
        let mut header = Header::new(jsonwebtoken::Algorithm::ES256);
        header.kid = Some(self.kid.clone());
        jsonwebtoken::encode(&header, &claims, &EncodingKey::from_ec_der(&self.pkcs8)).unwrap()
    }
}

/// A `scrip serve` child, killed when dropped.
pub struct Server {
    pub child: Child,
    pub log: PathBuf,
}

impl Server {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn wait_ready(&mut self, url: &str) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(30) {
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("scrip serve exited with {status}:\n{}", self.log());
            }
            // `/readyz`: the token endpoints and any mounted proxy serve.
            if http_ok(&format!("{url}/readyz")) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("scrip serve did not answer in time:\n{}", self.log());
    }

    pub fn wait_exit(&mut self, limit: Duration) -> Option<ExitStatus> {
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn signal(&mut self, sig: &str) -> ExitStatus {
        let status = Command::new("kill")
            .args([format!("-{sig}"), self.pid().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{sig} failed");
        self.wait_exit(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("scrip serve survived SIG{sig}:\n{}", self.log()))
    }

    /// SIGTERM: a graceful stop, which must succeed.
    pub fn stop(mut self) {
        let status = self.signal("TERM");
        assert_eq!(status.code(), Some(0), "{}", self.log());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Whether a plain HTTP/1.1 GET of `url` answers 200 (std only: no runtime).
pub fn http_ok(url: &str) -> bool {
    use std::io::{Read as _, Write as _};
    let Some(rest) = url.strip_prefix("http://") else {
        return false;
    };
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let Ok(addr) = host.parse::<SocketAddr>() else {
        return false;
    };
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    if write!(
        s,
        "GET /{path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .is_err()
    {
        return false;
    }
    let mut response = String::new();
    s.read_to_string(&mut response).is_ok() && response.starts_with("HTTP/1.1 200")
}
// --- HTTP client -------------------------------------------------------------

#[derive(Clone)]
pub struct Client {
    pub http: reqwest::Client,
    pub url: String,
}

/// An HTTP answer: the status and the JSON body (`Null` if none).
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub body: Value,
}

impl Reply {
    pub fn token(&self) -> Option<String> {
        (self.status == 200)
            .then(|| self.body["access_token"].as_str().map(str::to_owned))
            .flatten()
    }
}

pub fn form(pairs: &[(&str, &str)]) -> String {
    form_urlencoded::Serializer::new(String::new())
        .extend_pairs(pairs.iter())
        .finish()
}

impl Client {
    pub fn new(url: String) -> Self {
        let http = reqwest::Client::builder()
            .no_proxy()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        Self { http, url }
    }

    pub async fn post(
        &self,
        path: &str,
        pairs: &[(&str, &str)],
        bearer: Option<&str>,
    ) -> reqwest::Result<Reply> {
        let mut req = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form(pairs));
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        let r = req.send().await?;
        let status = r.status().as_u16();
        let text = r.text().await?;
        Ok(Reply {
            status,
            body: serde_json::from_str(&text).unwrap_or(Value::Null),
        })
    }

    pub async fn start_task(
        &self,
        identity: &str,
        scope: &str,
        purpose: &str,
    ) -> reqwest::Result<Reply> {
        let details = json!({ "purpose": purpose, "environment": "dev" }).to_string();
        self.post(
            "/token",
            &[
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", identity),
                ("subject_token_type", JWT),
                ("requested_token_type", TXN),
                ("scope", scope),
                ("request_details", &details),
            ],
            None,
        )
        .await
    }

    pub async fn access_token(
        &self,
        task_token: &str,
        tool: &str,
        scope: &str,
    ) -> reqwest::Result<Reply> {
        self.post(
            "/token",
            &[
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", task_token),
                ("subject_token_type", TXN),
                ("audience", tool),
                ("scope", scope),
            ],
            None,
        )
        .await
    }
}

/// A JWT's claims, decoded without verification.
pub fn claims(token: &str) -> Value {
    let payload = token.split('.').nth(1).expect("a compact JWT");
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap()
}

pub fn jti(token: &str) -> String {
    claims(token)["jti"].as_str().expect("a jti").to_owned()
}

pub fn str_of<'a>(v: &'a Value, key: &str) -> Option<&'a str> {
    v.get(key).and_then(Value::as_str)
}
/// What the load clients received: the jti of every token.
#[derive(Default)]
pub struct Received {
    pub jtis: Mutex<Vec<(String, &'static str)>>,
}

/// One load client: task start and access token, in a loop, until `stop` or
/// a bounded number of rounds; returns how many tokens it received.
pub async fn load(
    client: Client,
    identity: String,
    stop: Arc<AtomicBool>,
    got: Arc<Received>,
) -> usize {
    let mut count = 0;
    for round in 0..5_000 {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let purpose = format!("fix JIRA-{round}");
        let Ok(r) = client.start_task(&identity, "github:read", &purpose).await else {
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        };
        let Some(task) = r.token() else {
            continue;
        };
        got.jtis.lock().unwrap().push((jti(&task), "task.started"));
        count += 1;
        if let Ok(r) = client.access_token(&task, "github", "read").await
            && let Some(access) = r.token()
        {
            got.jtis
                .lock()
                .unwrap()
                .push((jti(&access), "token.issued"));
            count += 1;
        }
    }
    count
}

impl Server {
    /// Starts `scrip serve --config <config>` in `dir`, logging to `log`,
    /// and waits until `url` answers.
    pub fn spawn(config: &Path, dir: &Path, log: PathBuf, url: &str) -> Self {
        let child = scrip()
            .arg("serve")
            .arg("--config")
            .arg(config)
            .current_dir(dir)
            .stdout(Stdio::null())
            .stderr(Stdio::from(fs::File::create(&log).unwrap()))
            .spawn()
            .expect("start scrip serve");
        let mut server = Self { child, log };
        server.wait_ready(url);
        server
    }
}
