//! Human approval end to end through the real `scrip` binary: an agent's
//! delete in prod waits for a person; `scrip approvals`, `scrip approve` and
//! `scrip deny` decide it; the agent's CIBA poll sees the decision.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use scrip_jose::{SigningAlgorithm, SigningKey};
use serde_json::{Value, json};

const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const CIBA: &str = "urn:openid:params:grant-type:ciba";
const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
const TXN: &str = "urn:ietf:params:oauth:token-type:txn_token";
const K8S_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const AGENT: &str = "system:serviceaccount:agents:cleaner";

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// This test process's uid: the approver's, as `scrip approve` (run by
/// it) attests.
fn uid() -> u32 {
    use std::os::unix::fs::MetadataExt as _;
    fs::metadata("/proc/self").unwrap().uid()
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// A JWT's payload, decoded.
fn payload(jwt: &str) -> Value {
    let part = jwt.split('.').nth(1).unwrap();
    let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(part)
        .unwrap();
    serde_json::from_slice(&bytes).unwrap()
}

fn copy_policies(to: &Path) {
    fs::create_dir_all(to).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    for entry in fs::read_dir(repo).unwrap() {
        let path = entry.unwrap().path();
        if matches!(
            path.extension().and_then(|e| e.to_str()),
            Some("cedar" | "cedarschema")
        ) {
            fs::copy(&path, to.join(path.file_name().unwrap())).unwrap();
        }
    }
}

/// A running `scrip serve` with a test Kubernetes identity provider and one
/// approver (this test's uid, by local attestation); killed when dropped.
struct Server {
    child: Child,
    dir: tempfile::TempDir,
    addr: SocketAddr,
    idp: SigningKey,
}

impl Server {
    /// Without separation of duties: the agent of these tests, this test
    /// process, runs as the approver's uid, so with it no step of theirs
    /// could be approved by uid (they could attest as the approver).
    fn start() -> Self {
        Self::configured("separation_of_duties = false\n", "", "")
    }

    /// With `extra` appended to the configuration and `extra_policy` beside
    /// the repository's policies.
    fn start_with(extra: &str, extra_policy: &str) -> Self {
        Self::configured("", extra, extra_policy)
    }

    /// With `top` among the configuration's top-level keys.
    fn configured(top: &str, extra: &str, extra_policy: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        copy_policies(&root.join("policies"));
        if !extra_policy.is_empty() {
            fs::write(root.join("policies/extra.cedar"), extra_policy).unwrap();
        }
        let (idp, _pkcs8) = SigningKey::generate(SigningAlgorithm::ES256).unwrap();
        fs::write(
            root.join("k8s-jwks.json"),
            json!({ "keys": [idp.public_jwk()] }).to_string(),
        )
        .unwrap();
        let port = scrip_testkit::free_port();
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let config = format!(
            r#"listen = "{addr}"
data_dir = "{data}"
policy_dir = "{policies}"
{top}

[[trusted_issuers]]
issuer = "{K8S_ISSUER}"
jwks_file = "{jwks}"
audiences = ["scrip"]
algorithms = ["ES256"]

[[tools]]
name = "github"
resource = "https://api.github.com"
actions = ["read", "write", "delete"]

[[approvers]]
name = "root-operator"
uid = {uid}
{extra}"#,
            uid = uid(),
            data = root.join("data").display(),
            policies = root.join("policies").display(),
            jwks = root.join("k8s-jwks.json").display(),
        );
        fs::write(root.join("scrip.toml"), config).unwrap();
        let child = Self::spawn(root);
        let server = Self {
            child,
            dir,
            addr,
            idp,
        };
        server.ready()
    }

    /// `scrip serve` on the configuration in `root`, its log appended to
    /// `serve.log`.
    fn spawn(root: &Path) -> Child {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(root.join("serve.log"))
            .unwrap();
        Command::new(env!("CARGO_BIN_EXE_scrip"))
            .args(["serve", "--config"])
            .arg(root.join("scrip.toml"))
            .env_remove("SCRIP_CONFIG")
            .env("SCRIP_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(log))
            .spawn()
            .unwrap()
    }

    /// Stops the server (SIGTERM, its stop completed) and leaves it
    /// stopped for `down`, then starts it again on its store.
    fn restart(mut self, down: Duration) -> Self {
        let status = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let stopped = self.child.wait().unwrap();
        assert!(stopped.success(), "{stopped}: {}", self.log());
        std::thread::sleep(down);
        self.child = Self::spawn(self.dir.path());
        self.ready()
    }

    /// Once it answers on its port and its socket.
    fn ready(self) -> Self {
        let (addr, mut server) = (self.addr, self);
        let start = Instant::now();
        while !(server.socket().exists() && TcpStream::connect(addr).is_ok()) {
            if let Some(status) = server.child.try_wait().unwrap() {
                panic!("scrip serve exited with {status}: {}", server.log());
            }
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "scrip serve did not start: {}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn log(&self) -> String {
        fs::read_to_string(self.dir.path().join("serve.log")).unwrap_or_default()
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("data/scrip.sock")
    }

    /// The agent's Kubernetes service-account token.
    fn agent_identity(&self) -> String {
        let now = now();
        let claims = json!({
            "iss": K8S_ISSUER,
            "sub": AGENT,
            "aud": "scrip",
            "iat": now,
            "nbf": now,
            "exp": now + 600,
            "kubernetes.io": { "namespace": "agents", "serviceaccount": { "name": "cleaner" } },
        });
        self.idp.sign_jwt("JWT", &claims).unwrap()
    }

    /// `scrip <args>` as the person on this host: SCRIP_URL and SCRIP_SOCKET
    /// point at this server; no identity in the environment.
    fn scrip(&self, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_scrip"))
            .args(args)
            .env("SCRIP_URL", format!("http://{}", self.addr))
            .env("SCRIP_SOCKET", self.socket())
            .env_remove("SCRIP_IDENTITY")
            .env_remove("SCRIP_TASK_TOKEN")
            .env_remove("SCRIP_CONFIG")
            // Nothing reaches a local scrip through an environment proxy
            // (this one answers nothing).
            .env("HTTP_PROXY", "http://127.0.0.1:9")
            .env("ALL_PROXY", "http://127.0.0.1:9")
            .env_remove("NO_PROXY")
            .env("NO_COLOR", "1")
            .stdin(Stdio::null())
            .output()
            .unwrap()
    }

    /// `scrip <args>` as the agent inside its task: SCRIP_TASK_TOKEN is
    /// `task`, and no token cache is shared with other tests.
    fn agent(&self, task: &str, args: &[&str]) -> Command {
        let mut c = Command::new(env!("CARGO_BIN_EXE_scrip"));
        c.args(args)
            .env("SCRIP_URL", format!("http://{}", self.addr))
            .env("SCRIP_TASK_TOKEN", task)
            .env("XDG_RUNTIME_DIR", self.dir.path())
            // A proxy in the environment is not used for a scrip on this
            // machine: it would see every token (this one answers nothing).
            .env("HTTP_PROXY", "http://127.0.0.1:9")
            .env("http_proxy", "http://127.0.0.1:9")
            .env("ALL_PROXY", "http://127.0.0.1:9")
            .env_remove("NO_PROXY")
            .env_remove("no_proxy")
            .env_remove("SCRIP_CONFIG")
            .stdin(Stdio::null());
        c
    }

    /// The auth_req_ids waiting for a person.
    fn pending_ids(&self) -> Vec<String> {
        let out = self.scrip(&["approvals", "--json"]);
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
        text(&out.stdout)
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap()["auth_req_id"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect()
    }

    /// A form POST: status and JSON body.
    fn post(&self, path: &str, form: &[(&str, &str)]) -> (u16, Value) {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form.iter())
            .finish();
        let mut s = TcpStream::connect(self.addr).unwrap();
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-www-form-urlencoded\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        )
        .unwrap();
        let mut response = String::new();
        s.read_to_string(&mut response).unwrap();
        let status = response[9..12].parse().unwrap();
        let json = response
            .split("\r\n\r\n")
            .nth(1)
            .and_then(|b| serde_json::from_str(b.trim()).ok())
            .unwrap_or(Value::Null);
        (status, json)
    }

    /// The Kubernetes agent starts a task in prod that may delete at github.
    fn start_task(&self) -> String {
        self.start_task_as(&self.agent_identity())
    }

    /// The agent starts a task in prod that may delete at github, with
    /// `identity`.
    fn start_task_as(&self, identity: &str) -> String {
        let details = json!({"purpose": "cleanup JIRA-9", "environment": "prod"}).to_string();
        let (status, body) = self.post(
            "/token",
            &[
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", identity),
                ("subject_token_type", JWT),
                ("requested_token_type", TXN),
                ("scope", "github:delete"),
                ("request_details", &details),
            ],
        );
        assert_eq!(status, 200, "task start: {body}\n{}", self.log());
        body["access_token"].as_str().unwrap().to_owned()
    }

    /// The agent asks for a delete token: it must wait for a person.
    fn ask_delete(&self, task: &str) -> String {
        let (status, body) = self.post(
            "/token",
            &[
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", task),
                ("subject_token_type", TXN),
                ("audience", "github"),
                ("scope", "delete"),
            ],
        );
        assert_eq!(status, 400, "{body}");
        assert_eq!(body["error"], "authorization_pending", "{body}");
        body["auth_req_id"].as_str().unwrap().to_owned()
    }

    /// The agent's CIBA poll.
    fn poll(&self, task: &str, id: &str) -> (u16, Value) {
        self.post(
            "/token",
            &[
                ("grant_type", CIBA),
                ("auth_req_id", id),
                ("subject_token", task),
            ],
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Asserts a failed command: its exit code and a one-line message on stderr
/// that contains every one of `needles`.
fn assert_fails(out: &Output, code: i32, needles: &[&str]) {
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(code),
        "stdout: {}\nstderr: {stderr}",
        text(&out.stdout)
    );
    for n in needles {
        assert!(stderr.contains(n), "{n:?} not in {stderr:?}");
    }
}

#[test]
fn a_person_approves_and_denies_an_agents_delete_in_prod() {
    let server = Server::start();
    let task = server.start_task();

    // The delete waits; nobody has decided yet.
    let id = server.ask_delete(&task);
    let (status, body) = server.poll(&task, &id);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "authorization_pending", "{body}");

    // The person sees everything asked.
    let out = server.scrip(&["approvals"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    let agent = format!("\n  agent:       {AGENT}\n  issuer:      {K8S_ISSUER}\n");
    for needle in [
        id.as_str(),
        agent.as_str(),
        "cleanup JIRA-9",
        "environment: prod",
        "delete at github",
    ] {
        assert!(stdout.contains(needle), "{needle:?} not in:\n{stdout}");
    }
    let out = server.scrip(&["approvals", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let lines: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 1, "{lines:?}");
    assert_eq!(lines[0]["auth_req_id"], id.as_str());
    assert_eq!(lines[0]["environment"], "prod");
    assert_eq!(lines[0]["agent"]["subject"], AGENT);

    // Refusals: an unknown id, someone who is not an approver, a deny
    // without a reason.
    let out = server.scrip(&["approve", "nosuchid"]);
    assert_fails(&out, 1, &["no approval has this id"]);
    assert_eq!(text(&out.stderr).trim().lines().count(), 1, "{out:?}");
    let agent_file = server.dir.path().join("agent.jwt");
    fs::write(&agent_file, server.agent_identity()).unwrap();
    let out = server.scrip(&[
        "approve",
        &id,
        "--identity-file",
        agent_file.to_str().unwrap(),
    ]);
    assert_fails(&out, 1, &["not an approver"]);
    let out = server.scrip(&["deny", &id]);
    assert_fails(&out, 2, &["--reason"]);

    // Approve shows the step and asks: with no terminal to ask in and no
    // --yes, nothing is decided.
    let out = server.scrip(&["approve", &id]);
    assert_fails(&out, 1, &["confirm in a terminal", "--yes"]);
    assert!(
        text(&out.stdout).contains("asks:        delete at github"),
        "{}",
        text(&out.stdout)
    );
    let out = server.scrip(&["approvals", "--json"]);
    assert!(text(&out.stdout).contains(&id), "still pending: {out:?}");

    // Approve: the agent's next poll gets one token for exactly that step.
    let out = server.scrip(&["approve", &id, "--yes"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.starts_with(&id), "the step is shown first: {stdout}");
    assert!(stdout.contains("  environment: prod"), "{stdout}");
    assert!(
        stdout.lines().last().unwrap().starts_with("approved"),
        "{stdout}"
    );
    let (status, body) = server.poll(&task, &id);
    assert_eq!(status, 200, "{body}");
    let claims = payload(body["access_token"].as_str().unwrap());
    assert_eq!(claims["approval"]["approver"], "root-operator", "{claims}");
    assert_eq!(claims["approval"]["id"], id.as_str(), "{claims}");
    assert_eq!(claims["scope"], "delete", "{claims}");
    assert_eq!(claims["aud"], "github", "{claims}");

    // Deciding twice is refused.
    let out = server.scrip(&["approve", &id]);
    assert_fails(&out, 1, &["409", "already"]);
    assert_eq!(text(&out.stderr).trim().lines().count(), 1, "{out:?}");
    let out = server.scrip(&["approvals"]);
    assert_eq!(out.status.code(), Some(0));
    assert!(
        text(&out.stdout).contains("no pending approvals"),
        "{}",
        text(&out.stdout)
    );

    // Deny: the agent's poll says so, with the person's reason.
    let second = server.ask_delete(&task);
    assert_ne!(second, id);
    let out = server.scrip(&["deny", &second, "--reason", "not today"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.starts_with("denied"), "{stdout}");
    let (status, body) = server.poll(&task, &second);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "access_denied", "{body}");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("not today"),
        "{body}"
    );
    let out = server.scrip(&["approve", &second]);
    assert_fails(&out, 1, &["409", "already denied"]);

    // Asked again from another task: the person sees the no beside it.
    let other = server.start_task();
    let third = server.ask_delete(&other);
    let out = server.scrip(&["approvals"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}{}", text(&out.stderr));
    assert!(stdout.contains(&third), "{stdout}");
    let denied = "  denied:      delete at github by root-operator at ";
    assert!(stdout.contains(denied), "{stdout}");
    assert!(stdout.contains("not today"), "{stdout}");
}

/// `scrip token --tool github --action delete` as the agent of `task`,
/// waiting for a person: the process, its standard error (kept open: it
/// says more), and the first line it said.
fn waiting_for_delete(
    server: &Server,
    task: &str,
) -> (Child, std::io::BufReader<std::process::ChildStderr>, String) {
    let mut waiting = server
        .agent(task, &["token", "--tool", "github", "--action", "delete"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = std::io::BufReader::new(waiting.stderr.take().unwrap());
    let mut said = String::new();
    std::io::BufRead::read_line(&mut stderr, &mut said).unwrap();
    (waiting, stderr, said)
}

/// A wait for a person outlives a restart of scrip (a rolling update): the
/// polls it sends while scrip is down are asked again, and the step
/// approved after the restart is collected, not asked for anew.
#[test]
fn a_wait_for_a_person_outlives_a_restart_of_scrip() {
    let server = Server::configured(
        "separation_of_duties = false\napproval_poll_interval = 1\n",
        "",
        "",
    );
    let task = server.start_task();
    let (mut waiting, _stderr, said) = waiting_for_delete(&server, &task);
    assert!(said.contains("waiting"), "{said}");
    // Down for three poll intervals.
    let server = server.restart(Duration::from_secs(3));
    assert!(
        waiting.try_wait().unwrap().is_none(),
        "the wait ended while scrip was down"
    );
    let ids = server.pending_ids();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let out = server.scrip(&["approve", &ids[0], "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = waiting.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let claims = payload(text(&out.stdout).trim());
    assert_eq!(claims["approval"]["id"], ids[0].as_str(), "{claims}");
}

/// A wait that ends with scrip still down names the step to collect: a
/// person may have approved it, and asking anew would ask them again.
#[test]
fn a_wait_ended_by_a_scrip_down_names_the_step_to_collect() {
    let server = Server::configured(
        "separation_of_duties = false\napproval_poll_interval = 1\napproval_ttl = 3\n",
        "",
        "",
    );
    let task = server.start_task();
    let (mut waiting, mut stderr, said) = waiting_for_delete(&server, &task);
    let id = server.pending_ids().pop().unwrap();
    assert!(said.contains(&id), "{said}");
    // Down past the step's 3 s.
    let _server = server.restart(Duration::from_secs(5));
    let status = waiting.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert_eq!(status.code(), Some(1), "{rest}");
    assert!(
        rest.contains("cannot reach scrip")
            && rest.contains(&format!(
                "collect its token with `scrip token --approval {id}`"
            )),
        "{rest}"
    );
}

#[test]
fn scrip_token_waits_for_a_person_and_prints_the_approved_token() {
    let server = Server::start();
    let task = server.start_task();
    let delete = ["token", "--tool", "github", "--action", "delete"];

    // --no-wait: the id on stderr, exit 75, nothing on stdout.
    let out = server
        .agent(&task, &[&delete[..], &["--no-wait"]].concat())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", text(&out.stderr));
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    let first = server.pending_ids();
    assert_eq!(first.len(), 1, "{first:?}");
    let first = first[0].clone();
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&first)
            && stderr.contains("scrip approve")
            && stderr.contains(&format!("`scrip token --approval {first}`")),
        "{stderr}"
    );

    // Waiting: asking for the same step again waits on the same request;
    // a person approves it meanwhile, and the token is printed.
    let mut waiting = server
        .agent(&task, &[&delete[..], &["--json"]].concat())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut said = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(waiting.stderr.as_mut().unwrap()),
        &mut said,
    )
    .unwrap();
    assert!(said.contains("waiting") && said.contains(&first), "{said}");
    let out = server.scrip(&["approve", &first, "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = waiting.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let answer: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(answer["token_type"], "Bearer", "{answer}");
    let claims = payload(answer["access_token"].as_str().unwrap());
    assert_eq!(claims["approval"]["id"], first.as_str(), "{claims}");
    assert_eq!(claims["approval"]["approver"], "root-operator", "{claims}");
    assert_eq!(claims["scope"], "delete", "{claims}");
    // Its token is single use: --approval finds nothing left to collect.
    let out = server
        .agent(&task, &["token", "--approval", &first])
        .output()
        .unwrap();
    assert_fails(&out, 1, &["invalid_grant"]);

    // --approval collects a step approved after its asker stopped waiting.
    let out = server
        .agent(&task, &[&delete[..], &["--no-wait"]].concat())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", text(&out.stderr));
    let second = server.pending_ids().pop().unwrap();
    assert_ne!(second, first);
    let out = server.scrip(&["approve", &second, "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = server
        .agent(&task, &["token", "--approval", &second])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let claims = payload(text(&out.stdout).trim());
    assert_eq!(claims["approval"]["id"], second.as_str(), "{claims}");

    // Asking again for a step approved meanwhile collects it at once,
    // --no-wait or not: nobody is asked twice.
    let out = server
        .agent(&task, &[&delete[..], &["--no-wait"]].concat())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", text(&out.stderr));
    let approved = server.pending_ids().pop().unwrap();
    let out = server.scrip(&["approve", &approved, "--yes"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = server
        .agent(&task, &[&delete[..], &["--no-wait"]].concat())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("a person approved this step already"),
        "{}",
        text(&out.stderr)
    );
    let claims = payload(text(&out.stdout).trim());
    assert_eq!(claims["approval"]["id"], approved.as_str(), "{claims}");

    // Denied: the person's reason reaches the agent.
    let out = server
        .agent(&task, &[&delete[..], &["--no-wait"]].concat())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(75), "{}", text(&out.stderr));
    let third = server.pending_ids().pop().unwrap();
    let out = server.scrip(&["deny", &third, "--reason", "not on a friday"]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = server
        .agent(&task, &["token", "--approval", &third])
        .output()
        .unwrap();
    assert_fails(&out, 1, &["access_denied", "not on a friday"]);

    // An id may start with `-` (base64url): it is taken as the id, not as
    // an option, and scrip answers for it.
    let out = server
        .agent(&task, &["token", "--approval", "-Xnosuchid00000000000"])
        .output()
        .unwrap();
    assert_fails(&out, 1, &["invalid_grant"]);
    // An approved step's token is for that step's tool and actions: asking
    // for others beside it is a usage error, not silently ignored.
    for extra in [
        &["--tool", "github"][..],
        &["--action", "read"],
        &["--no-cache"],
    ] {
        let mut args = vec!["token", "--approval", "someid"];
        args.extend_from_slice(extra);
        let out = server.agent(&task, &args).output().unwrap();
        assert_eq!(
            out.status.code(),
            Some(2),
            "{extra:?}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains("cannot be used with"),
            "{}",
            text(&out.stderr)
        );
    }
}

#[test]
fn a_person_known_by_uid_may_not_approve_an_agent_that_may_run_as_that_uid() {
    // This test's process is the agent, `local:agent` by its executable;
    // `scrip approve`, another executable of the same uid, attests as
    // `local:person` and is the approver `root-operator` (this uid). Any
    // process of that uid could attest so, the agent included.
    let me = std::env::current_exe().unwrap();
    let server = Server::start_with(
        &format!(
            "\n[[local_workloads]]\nname = \"agent\"\nexe = \"{}\"\n\n[[local_workloads]]\nname = \"person\"\nuid = {}\n",
            me.display(),
            uid()
        ),
        "permit (principal, action == Action::\"delete\", resource)\nwhen { principal.kind == \"local\" && context.environment == \"prod\" };\n",
    );
    let identity = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(scrip_client::attest(&server.socket()))
        .unwrap();
    assert_eq!(payload(identity.token())["sub"], "local:agent");
    let task = server.start_task_as(identity.token());
    let id = server.ask_delete(&task);
    let out = server.scrip(&["approve", &id, "--yes"]);
    assert_fails(&out, 1, &["separation of duties", "uid"]);
    // Still pending: the agent's poll says so.
    let (status, body) = server.poll(&task, &id);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "authorization_pending", "{body}");

    // So does the Kubernetes agent, this process too: any process holding
    // that token may run as the person's uid, and attest as them.
    let other = server.start_task();
    let id = server.ask_delete(&other);
    let out = server.scrip(&["approve", &id, "--yes"]);
    assert_fails(
        &out,
        1,
        &["separation of duties", "issuer and subject alone"],
    );
    let (status, body) = server.poll(&other, &id);
    assert_eq!(status, 400, "{body}");
    assert_eq!(body["error"], "authorization_pending", "{body}");
}

/// A server that answers every request with `reply` and, once the
/// returned closure is called, stops and gives the requests' paths.
fn answering(reply: &'static [u8]) -> (std::net::SocketAddr, impl FnOnce() -> Vec<String>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let addr = listener.local_addr().unwrap();
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let server = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let mut paths = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let Ok((mut s, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(10));
                    continue;
                };
                s.set_nonblocking(false).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") && s.read(&mut byte).unwrap_or(0) == 1 {
                    head.push(byte[0]);
                }
                let head = text(&head);
                paths.push(head.split(' ').nth(1).unwrap_or("").to_owned());
                let _ = s.write_all(reply);
            }
            paths
        })
    };
    (addr, move || {
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        server.join().unwrap()
    })
}

/// `scrip ARGS` as an approver (an identity scrip never checks: the
/// servers here are not scrip), its standard input `input`.
fn as_approver(addr: std::net::SocketAddr, args: &[&str], input: &str) -> Output {
    let claims = json!({"iss": K8S_ISSUER, "sub": "people:alice", "exp": now() + 600});
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let identity = format!("{}.{}.c2ln", b64(&json!({"alg": "ES256"})), b64(&claims));
    let mut child = Command::new(env!("CARGO_BIN_EXE_scrip"))
        .args(args)
        .env("SCRIP_URL", format!("http://{addr}"))
        .env("SCRIP_IDENTITY", &identity)
        .env_remove("SCRIP_CONFIG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

#[test]
fn the_approver_follows_no_redirect_with_its_identity() {
    // Every request is answered with a redirect: the approver's identity
    // token must not be sent on.
    let (addr, stop) = answering(
        b"HTTP/1.1 307 Temporary Redirect\r\nLocation: /elsewhere\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
    );
    let out = as_approver(addr, &["approvals"], "");
    let paths = stop();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert_eq!(paths, ["/approvals"], "followed a redirect");
}

/// `--server` pointing at another web service (one whose every path
/// answers 200 with a page, as a single-page app's fallback does): no
/// command takes the page for scrip's answer. The list is not read as
/// empty, a step is not decided unseen, a token is not called anything.
#[test]
fn an_approver_command_takes_no_web_page_for_scrips_answer() {
    let (addr, stop) = answering(
        b"HTTP/1.1 200 OK\r\ncontent-type: text/html\r\ncontent-length: 15\r\nconnection: close\r\n\r\n<html>hi</html>",
    );
    let approvals = as_approver(addr, &["approvals"], "");
    let approve = as_approver(addr, &["approve", "abc-123", "--yes"], "");
    let deny = as_approver(addr, &["deny", "abc-123", "--reason", "no"], "");
    let introspect = as_approver(addr, &["introspect"], "a.b.c\n");
    let paths = stop();
    for (out, path, member) in [
        (&approvals, "/approvals", "approvals"),
        (&approve, "/approvals/abc-123", "state"),
        (&deny, "/approvals/abc-123/deny", "state"),
        (&introspect, "/introspect", "active"),
    ] {
        assert_fails(
            out,
            1,
            &[
                &format!("{path} answered 200 OK without `{member}`"),
                "is http://127.0.0.1:",
                "a scrip server?",
            ],
        );
        assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
    }
    // The step was not decided: its page was asked for, and nothing more.
    assert_eq!(
        paths,
        [
            "/approvals",
            "/approvals/abc-123",
            "/approvals/abc-123/deny",
            "/introspect"
        ]
    );
}

/// A stop waits (5 s) for approval webhook calls under way; a third signal
/// ends that wait and the process at once, as a kill would (exit 1), and
/// says so.
#[test]
fn a_third_signal_ends_a_stop_at_once() {
    // The webhook: connections are taken by the kernel, never answered.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let hook = silent.local_addr().unwrap();
    let mut server = Server::configured(
        &format!("separation_of_duties = false\napproval_webhook = \"http://{hook}/hook\"\n"),
        "",
        "",
    );
    let task = server.start_task();
    server.ask_delete(&task);
    let pid = server.child.id().to_string();
    let signal = || {
        let status = Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        assert!(status.success());
    };
    // Each signal is sent once the last one was taken (signals sent before
    // the process reads them would count as one): the first stops the
    // server taking connections, the second is said in the log.
    let taken = |server: &Server, done: &dyn Fn(&Server) -> bool, what: &str| {
        let since = Instant::now();
        while !done(server) {
            assert!(
                since.elapsed() < Duration::from_secs(10),
                "{what} was not taken:\n{}",
                server.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    signal();
    taken(
        &server,
        &|s| TcpStream::connect(s.addr).is_err(),
        "the first signal",
    );
    std::thread::sleep(Duration::from_millis(500));
    assert!(
        server.child.try_wait().unwrap().is_none(),
        "the stop did not wait for the webhook call:\n{}",
        server.log()
    );
    signal();
    taken(
        &server,
        &|s| s.log().contains("stopping at once"),
        "the second signal",
    );
    signal();
    let asked = Instant::now();
    let status = loop {
        if let Some(status) = server.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            asked.elapsed() < Duration::from_secs(3),
            "a third signal did not end the stop:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(status.code(), Some(1), "{}", server.log());
    assert!(server.log().contains("a third signal"), "{}", server.log());
    drop(silent);
}
