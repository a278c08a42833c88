//! The legacy bridge against a real upstream that demands a static key
//! (nginx, started by the test): scope and action mapping, RFC 6750
//! refusals, revocation, Cedar on the concrete request, redaction of echoed
//! secrets, header hygiene, upstream failure, rotation, and that no secret
//! reaches the agent, the log or the audit trail.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;
#[path = "../../scrip-proxy/tests/common/nginx.rs"]
mod nginx;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::*;
use scrip_config::{Inject, Route, SecretSpec, Tool, Upstream};
use scrip_store::{SecretRecord, SqliteStore, Store as _, Write};
use scrip_token::{ActionName, ToolName};
use serde_json::{Value, json};

const READ_KEY: &str = "rk-7Hq2Lw9Zp4Xv1Nc8";
const READ_KEY_2: &str = "rk2-Bd5Tm3Qs6Yf0Ka2";
const WRITE_KEY: &str = "wk-Ue4Gj8Rn1Wo7Ih5";
const AGENT_NS: &str = "agents";

/// Everything written through `tracing` in this process.
fn logs() -> Arc<Mutex<Vec<u8>>> {
    captured_logs()
}

fn action(a: &str) -> ActionName {
    ActionName::parse(a).unwrap()
}

fn tool(name: &str) -> Tool {
    Tool {
        name: ToolName::parse(name).unwrap(),
        resource: format!("https://{name}.legacy.example"),
        actions: vec![action("read"), action("write"), action("delete")],
        labels: Default::default(),
        introspectors: Vec::new(),
    }
}

fn upstream(name: &str, url: &str) -> Upstream {
    let spec = |max_age| SecretSpec {
        max_age,
        grace: 3600,
        mint_command: Vec::new(),
    };
    Upstream {
        name: ToolName::parse(name).unwrap(),
        url: url.to_owned(),
        inject: Inject::default(),
        routes: vec![Route {
            method: "POST".into(),
            path: "/search*".into(),
            action: action("read"),
        }],
        secrets: [(action("read"), spec(86_400)), (action("write"), spec(1))]
            .into_iter()
            .collect(),
        connect_timeout: 1,
        read_timeout: 5,
    }
}

const NO_ADMIN: &str = r#"@id("proxy-no-admin")
forbid (principal, action, resource)
when { context.stage == "proxy" && context has path && context.path like "/admin*" };
"#;

/// Below `/public/bound`, only a DPoP-bound token goes through.
const BOUND_ONLY: &str = r#"@id("proxy-bound-only")
forbid (principal, action, resource)
when { context.stage == "proxy" && context has path && context.path like "/public/bound*" }
unless { context has dpop_jkt };
"#;

/// At the proxy, no sub-agent whose identity GitHub Actions issued (the
/// task's agent, the principal, is a Kubernetes workload's).
fn no_github_sub_agents() -> String {
    format!(
        r#"@id("proxy-no-github-sub-agents")
forbid (principal, action, resource)
when {{ context.stage == "proxy" && context.delegation_issuers.contains("{GITHUB_ISSUER}") }};
"#
    )
}

struct Env {
    server: TestServer,
    nginx: nginx::Nginx,
    http: reqwest::Client,
    /// An upstream that takes connections (the kernel queues them; nothing
    /// accepts them unless a test does) and never answers.
    mute: std::net::TcpListener,
    /// Where `/metrics` is served (`metrics_listen`).
    metrics: std::net::SocketAddr,
}

async fn setup() -> Env {
    setup_with(|_| {}).await
}

/// [`setup`], with `more` changing the configuration after it.
async fn setup_with(more: impl Fn(&mut scrip_config::Config) + Send + Sync + 'static) -> Env {
    logs();
    let nginx = nginx::Nginx::start(
        &[
            ("read", READ_KEY),
            ("read2", READ_KEY_2),
            ("write", WRITE_KEY),
        ],
        READ_KEY,
    );
    let url = nginx.url();
    let closed = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    // The kernel completes connections to it; nobody reads or answers.
    let mute = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mute_addr = mute.local_addr().unwrap();
    let metrics = std::net::SocketAddr::from(([127, 0, 0, 1], scrip_testkit::free_port()));
    let server = TestServer::start_with(Options {
        extra_policies: vec![
            ("proxy-no-admin.cedar".into(), NO_ADMIN.into()),
            ("proxy-bound-only.cedar".into(), BOUND_ONLY.into()),
            (
                "proxy-no-github-sub-agents.cedar".into(),
                no_github_sub_agents(),
            ),
        ],
        edit: Some(Box::new(move |c| {
            c.tools.push(tool("legacy"));
            c.tools.push(tool("down"));
            c.tools.push(tool("slow"));
            c.tools.push(tool("mute"));
            c.upstreams.push(Upstream {
                read_timeout: 1,
                ..upstream("mute", &format!("http://{mute_addr}"))
            });
            c.upstreams.push(upstream("legacy", &url));
            // The same nginx, allowed one second of silence.
            c.upstreams.push(Upstream {
                read_timeout: 1,
                ..upstream("slow", &url)
            });
            c.upstreams
                .push(upstream("down", &format!("http://{closed}")));
            c.metrics_listen = Some(metrics);
            more(c);
        })),
        ..Options::default()
    })
    .await;
    set_secret(&server, "legacy", "read", READ_KEY).await;
    set_secret(&server, "legacy", "write", WRITE_KEY).await;
    set_secret(&server, "down", "read", READ_KEY).await;
    set_secret(&server, "slow", "write", WRITE_KEY).await;
    set_secret(&server, "mute", "read", READ_KEY).await;
    Env {
        server,
        nginx,
        http: reqwest::Client::new(),
        mute,
        metrics,
    }
}

/// Stores a new version of a secret, as `scrip secret set` does.
async fn set_secret(server: &TestServer, name: &str, action: &str, value: &str) {
    let data = server.dir.path().join("data");
    let config = scrip_config::Config {
        data_dir: data.clone(),
        ..scrip_config::Config::default()
    };
    let kek = scrip_proxy::Kek::new(scrip_server::keys::load_kek(&config, false).unwrap());
    let store = SqliteStore::open(&data.join("scrip.db")).await.unwrap();
    let version = store
        .secret_versions(name, action)
        .await
        .unwrap()
        .first()
        .map_or(1, |r| r.version + 1);
    let value = scrip_proxy::SecretValue::from_input(value.as_bytes().to_vec()).unwrap();
    let sealed = kek.seal(name, action, version, &value).unwrap();
    store
        .commit(vec![Write::PutSecret {
            secret: Box::new(SecretRecord {
                name: name.into(),
                action: action.into(),
                version,
                sealed,
                created_at: now(),
                retired_at: None,
            }),
            purge_retired_before: 0,
        }])
        .await
        .unwrap();
}

impl Env {
    async fn task(&self, scope: &str) -> String {
        let identity = self.server.k8s.kubernetes(AGENT_NS, "legacy-agent");
        let t = self
            .server
            .start_task(&identity, scope, "dev", "fix JIRA-7 in the legacy system")
            .await;
        t["access_token"].as_str().unwrap().to_owned()
    }

    /// A sub-task of `parent` for the sub-agent whose identity is `actor`.
    async fn delegate(&self, parent: &str, actor: &str) -> String {
        let r = self.server.try_delegate(parent, actor, None, None).await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.body["access_token"].as_str().unwrap().to_owned()
    }

    async fn token(&self, task: &str, tool: &str, scope: &str) -> String {
        let r = self.server.access_token(task, tool, Some(scope)).await;
        assert_eq!(r.status, 200, "{}", r.text);
        r.body["access_token"].as_str().unwrap().to_owned()
    }

    fn url(&self, rest: &str) -> String {
        format!("{}/proxy/{rest}", self.server.url)
    }

    async fn send(
        &self,
        method: reqwest::Method,
        rest: &str,
        token: Option<&str>,
    ) -> (u16, reqwest::header::HeaderMap, String) {
        let mut req = self.http.request(method, self.url(rest));
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let headers = r.headers().clone();
        (status, headers, r.text().await.unwrap())
    }

    /// A GET written byte for byte; the status.
    async fn raw_get(&self, target: &str, token: &str) -> u16 {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        let addr = self.server.url.trim_start_matches("http://");
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!(
            "GET {target} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out);
        text.split(' ').nth(1).unwrap().parse().unwrap()
    }

    /// The audit trail once the refusals `tally` finds (recorded one by
    /// one, and counted) add up to `sent`, which they must exactly, with
    /// some counted; waits up to 10 s (records are written after the
    /// answers, counts a second later).
    async fn refusals_adding_up(
        &self,
        sent: usize,
        tally: impl Fn(&[scrip_store::AuditEvent]) -> (usize, usize),
    ) -> Vec<scrip_store::AuditEvent> {
        let start = Instant::now();
        loop {
            let audit = self.server.audit().await;
            let (one_by_one, counted) = tally(&audit);
            if one_by_one + counted >= sent || start.elapsed() > Duration::from_secs(10) {
                assert_eq!(one_by_one + counted, sent, "{one_by_one} + {counted}");
                assert!(counted > 0, "nothing was counted: {one_by_one} one by one");
                return audit;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// Waits up to 5 s for an audit record that `matches` (refusals are
    /// recorded in the background) and returns it.
    async fn wait_audit(
        &self,
        matches: impl Fn(&scrip_store::AuditEvent) -> bool,
    ) -> scrip_store::AuditEvent {
        let start = Instant::now();
        loop {
            if let Some(r) = self.server.audit().await.into_iter().find(|a| matches(a)) {
                return r;
            }
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "no such audit record"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the upstream has logged `uri` (it logs after answering).
    async fn wait_seen(&self, uri: &str) {
        let start = Instant::now();
        while self.seen(uri).is_empty() {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{:?}",
                self.nginx.log()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Upstream log lines for `uri`.
    fn seen(&self, uri: &str) -> Vec<String> {
        self.nginx
            .log()
            .into_iter()
            .filter(|l| l.split(' ').nth(1) == Some(uri))
            .collect()
    }
}

/// A `PUT` of `len` bytes to `path` (below the server) with `token`: the
/// head is sent and the connection returned for the body to follow.
async fn put_head(server_url: &str, path: &str, token: &str, len: usize) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let addr = server_url.trim_start_matches("http://").to_owned();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "PUT {path} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\nContent-Length: {len}\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s
}

/// Everything the server answers on `s` until it closes.
async fn answer_of(mut s: tokio::net::TcpStream) -> String {
    use tokio::io::AsyncReadExt as _;
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer).await;
    String::from_utf8_lossy(&answer).into_owned()
}

fn challenge(headers: &reqwest::header::HeaderMap) -> String {
    headers
        .get("www-authenticate")
        .map(|v| v.to_str().unwrap().to_owned())
        .unwrap_or_default()
}

#[tokio::test]
async fn read_token_reads_with_the_read_key_and_cannot_write() {
    let env = setup().await;
    let task = env.task("legacy:read legacy:write").await;
    let read = env.token(&task, "legacy", "read").await;

    let (status, _, body) = env
        .send(reqwest::Method::GET, "legacy/items/1?x=1", Some(&read))
        .await;
    assert_eq!((status, body.as_str()), (200, "ok read GET /items/1\n"));
    // A POST mapped to `read` by a route override uses the read key too.
    let (status, _, body) = env
        .send(reqwest::Method::POST, "legacy/search/users", Some(&read))
        .await;
    assert_eq!(
        (status, body.as_str()),
        (200, "ok read POST /search/users\n")
    );

    for (method, path) in [
        (reqwest::Method::POST, "items"),
        (reqwest::Method::PUT, "items/1"),
        (reqwest::Method::DELETE, "items/1"),
    ] {
        let (status, headers, _) = env
            .send(method.clone(), &format!("legacy/{path}"), Some(&read))
            .await;
        assert_eq!(status, 403, "{method} with a read token");
        assert!(
            challenge(&headers).contains("error=\"insufficient_scope\""),
            "{}",
            challenge(&headers)
        );
    }
    // One more allowed request: once it is logged, so is everything before.
    let (status, _, _) = env
        .send(reqwest::Method::GET, "legacy/after", Some(&read))
        .await;
    assert_eq!(status, 200);
    env.wait_seen("/after").await;
    assert!(
        env.seen("/items").is_empty(),
        "the upstream saw a refused write: {:?}",
        env.nginx.log()
    );
    assert_eq!(env.seen("/items/1").len(), 1, "{:?}", env.nginx.log());

    let write = env.token(&task, "legacy", "write").await;
    let (status, _, body) = env
        .send(reqwest::Method::POST, "legacy/items", Some(&write))
        .await;
    assert_eq!((status, body.as_str()), (200, "ok write POST /items\n"));
    // A write token cannot read: the read key is only ever behind `read`.
    let (status, headers, _) = env
        .send(reqwest::Method::GET, "legacy/items", Some(&write))
        .await;
    assert_eq!(status, 403);
    assert!(challenge(&headers).contains("scope=\"read\""));
    let (status, _, _) = env
        .send(reqwest::Method::OPTIONS, "legacy/items", Some(&write))
        .await;
    assert_eq!(status, 405);
    // Which methods map to actions is said only to a caller with a token
    // for the upstream: the routes cannot be mapped without one.
    let other = env.task("github:read").await;
    let github = env.token(&other, "github", "read").await;
    for token in [None, Some("not-a-jwt"), Some(github.as_str())] {
        let (status, headers, _) = env
            .send(reqwest::Method::OPTIONS, "legacy/items", token)
            .await;
        assert_eq!(status, 401, "{token:?}");
        assert!(challenge(&headers).starts_with("Bearer realm=\"legacy\""));
    }
    env.server.stop().await;
}

#[tokio::test]
async fn bad_missing_and_foreign_tokens_get_rfc6750_errors() {
    let env = setup().await;
    let task = env.task("legacy:read github:read").await;
    let good = env.token(&task, "legacy", "read").await;
    let github = env.token(&task, "github", "read").await;

    // Missing: a bare challenge, of both schemes the proxy takes (it
    // checks DPoP proofs, RFC 9449 §7.1), with the proofs' algorithms.
    let (status, headers, _) = env.send(reqwest::Method::GET, "legacy/x", None).await;
    assert_eq!(status, 401);
    let c = challenge(&headers);
    assert!(
        c.starts_with("Bearer realm=\"legacy\", DPoP realm=\"legacy\", algs=\"")
            && c.contains("ES256"),
        "{c}"
    );

    // A token signed by scrip's key but expired.
    let expired = env.server.resign(&good, |c| {
        c["iat"] = json!(now() - 900);
        c["exp"] = json!(now() - 300);
    });
    // The same claims, signed by another key.
    let (other, _) = scrip_jose::SigningKey::generate(scrip_jose::SigningAlgorithm::ES256).unwrap();
    let (_, claims) = decode_parts(&good);
    let forged = other.sign_jwt("at+jwt", &claims).unwrap();
    let mut tampered = good.clone();
    let last = tampered.pop().unwrap();
    tampered.push(if last == 'A' { 'B' } else { 'A' });

    for (what, token) in [
        ("garbage", "not-a-jwt"),
        ("expired", expired.as_str()),
        ("another key", forged.as_str()),
        ("tampered signature", tampered.as_str()),
        ("foreign audience", github.as_str()),
        ("task token", task.as_str()),
    ] {
        let (status, headers, _) = env
            .send(reqwest::Method::GET, "legacy/x", Some(token))
            .await;
        assert_eq!(status, 401, "{what}");
        assert!(
            challenge(&headers).starts_with("Bearer realm=\"legacy\", error=\"invalid_token\""),
            "{what}: {}",
            challenge(&headers)
        );
    }
    // Malformed credentials: 400 invalid_request.
    let r = env
        .http
        .get(env.url("legacy/x"))
        .header("authorization", "Bearer a b")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert!(challenge(r.headers()).contains("invalid_request"));

    // Issued by a replica whose clock runs 5 s ahead (within `clock_skew`):
    // accepted.
    let ahead = env.server.resign(&good, |c| {
        c["iat"] = json!(c["iat"].as_u64().unwrap() + 5);
    });
    assert_eq!(
        env.send(reqwest::Method::GET, "legacy/ahead", Some(&ahead))
            .await
            .0,
        200
    );

    // An upstream that is not here answers every request as one that is
    // answers a token not issued for it: without a token for an upstream,
    // no one can tell whether it exists.
    // Every header but the date, the realm put aside.
    let answer = |(status, headers, body): (u16, reqwest::header::HeaderMap, String),
                  realm: &str| {
        let challenge = challenge(&headers).replace(&format!("realm=\"{realm}\""), "realm=R");
        let mut rest: Vec<String> = headers
            .iter()
            .filter(|(name, _)| *name != "date" && *name != "www-authenticate")
            .map(|(name, value)| format!("{name}: {}", value.to_str().unwrap()))
            .collect();
        rest.sort();
        (status, challenge, rest, body)
    };
    for (what, token) in [
        ("none", None),
        ("garbage", Some("not-a-jwt")),
        ("expired", Some(expired.as_str())),
        ("another key", Some(forged.as_str())),
        ("tampered signature", Some(tampered.as_str())),
        ("foreign audience", Some(github.as_str())),
        ("task token", Some(task.as_str())),
    ] {
        let here = env.send(reqwest::Method::GET, "legacy/x", token).await;
        let not_here = env.send(reqwest::Method::DELETE, "nope/x", token).await;
        let here = answer(here, "legacy");
        assert!(here.1.starts_with("Bearer realm=R"), "{what}: {here:?}");
        assert_eq!(answer(not_here, "nope"), here, "{what}");
    }
    let here = env
        .send(reqwest::Method::GET, "legacy/x", Some(&github))
        .await;
    let not_here = env.send(reqwest::Method::GET, "nope/x", Some(&good)).await;
    assert_eq!(not_here.0, 401);
    assert_eq!(answer(not_here, "nope"), answer(here, "legacy"));
    // Whatever the method or path, even one the upstream would refuse.
    for (method, rest) in [
        (reqwest::Method::HEAD, "/x"),
        (reqwest::Method::GET, ""),
        (reqwest::Method::OPTIONS, "/items"),
    ] {
        let here = env
            .send(method.clone(), &format!("legacy{rest}"), Some(&github))
            .await;
        let not_here = env
            .send(method.clone(), &format!("nope{rest}"), Some(&good))
            .await;
        assert_eq!(here.0, 401, "{method} {rest}");
        assert_eq!(
            answer(not_here, "nope"),
            answer(here, "legacy"),
            "{method} {rest}"
        );
    }
    assert_eq!(env.raw_get("/proxy/legacy/a%2fb", &github).await, 401);
    assert_eq!(env.raw_get("/proxy/nope/a%2fb", &good).await, 401);
    // The realm is the name asked for, cut to a tool name's length.
    let long = "n".repeat(100);
    let (status, headers, _) = env
        .send(reqwest::Method::GET, &format!("{long}/x"), None)
        .await;
    assert_eq!(status, 401);
    let realm = format!("realm=\"{}\"", &long[..64]);
    assert!(
        challenge(&headers).starts_with(&format!("Bearer {realm}, DPoP {realm}, algs=")),
        "{}",
        challenge(&headers)
    );
    // Malformed credentials, and a DPoP token without its proof.
    for authorization in ["Bearer a b", "DPoP abc", "Basic abc"] {
        let mut answers = Vec::new();
        for (rest, realm) in [("legacy/x", "legacy"), ("nope/x", "nope")] {
            let r = env
                .http
                .get(env.url(rest))
                .header("authorization", authorization)
                .send()
                .await
                .unwrap();
            let status = r.status().as_u16();
            let headers = r.headers().clone();
            answers.push(answer((status, headers, r.text().await.unwrap()), realm));
        }
        assert_ne!(answers[0].0, 200, "{authorization}");
        assert_eq!(answers[0], answers[1], "{authorization}");
    }

    // The verification of a good token still works.
    let (status, _, _) = env
        .send(reqwest::Method::GET, "legacy/x", Some(&good))
        .await;
    assert_eq!(status, 200);
    // Only the good token's request reached the upstream.
    env.wait_seen("/x").await;
    assert_eq!(env.seen("/x").len(), 1, "{:?}", env.nginx.log());

    // A request for no upstream is on the record as a refusal naming no
    // tool, with the name asked for cut short. (In a second of its own: the
    // refusals above spent their second's budget of those recorded one by
    // one.)
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let probe = format!("probing-{}", "p".repeat(40));
    let (status, _, _) = env
        .send(reqwest::Method::GET, &format!("{probe}/x"), Some(&good))
        .await;
    assert_eq!(status, 401);
    let refused = env
        .wait_audit(|a| a.reason.as_deref().is_some_and(|r| r.contains("probing-p")))
        .await;
    assert_eq!(
        (
            refused.event.as_str(),
            refused.decision.as_deref(),
            refused.status
        ),
        ("proxy.request", Some("deny"), Some(401))
    );
    assert_eq!((refused.tool, refused.path), (None, None));
    assert_eq!(
        refused.reason.as_deref(),
        Some("no upstream is named `probing-pppppppp… (48 bytes)`")
    );

    // Before a token verified, a refusal's record keeps 16 bytes of the
    // method, and nothing of the path.
    let method = reqwest::Method::from_bytes("M".repeat(100).as_bytes()).unwrap();
    let (status, _, _) = env.send(method, "legacy/secret-ish", None).await;
    assert_eq!(status, 401);
    let refused = env
        .wait_audit(|a| a.method.as_deref().is_some_and(|m| m.starts_with("MMMM")))
        .await;
    assert_eq!(
        refused.method.as_deref(),
        Some(format!("{}… (100 bytes)", "M".repeat(16)).as_str())
    );
    assert_eq!(refused.path, None);

    // A refused request's record keeps 1 KiB of a long path, and says how
    // long it was (a write with a read token).
    let long = format!("legacy/{}", "a".repeat(20_000));
    let (status, _, _) = env.send(reqwest::Method::POST, &long, Some(&good)).await;
    assert_eq!(status, 403);
    let refused = env
        .wait_audit(|a| {
            a.decision.as_deref() == Some("deny")
                && a.path.as_deref().is_some_and(|p| p.starts_with("/aaaa"))
        })
        .await;
    let path = refused.path.unwrap();
    assert!(path.len() < 1_100, "{} bytes kept", path.len());
    assert!(path.ends_with("… (20001 bytes)"), "{path}");
    // The same for a path refused before it is normalised.
    let (status, _, _) = env
        .send(reqwest::Method::GET, &format!("{long}%0A"), Some(&good))
        .await;
    assert_eq!(status, 400);
    let refused = env
        .wait_audit(|a| {
            a.status == Some(400) && a.path.as_deref().is_some_and(|p| p.starts_with("/aaaa"))
        })
        .await;
    let path = refused.path.unwrap();
    assert!(path.ends_with("… (20004 bytes)"), "{path}");
    // An allowed request with a long path reaches the upstream whole: only
    // its record is cut.
    let long = format!("/{}", "b".repeat(2_000));
    let (status, _, body) = env
        .send(reqwest::Method::GET, &format!("legacy{long}"), Some(&good))
        .await;
    assert_eq!((status, body), (200, format!("ok read GET {long}\n")));
    let allowed = env
        .wait_audit(|a| {
            a.decision.as_deref() == Some("allow")
                && a.path.as_deref().is_some_and(|p| p.starts_with("/bbbb"))
        })
        .await;
    assert!(
        allowed.path.unwrap().ends_with("… (2001 bytes)"),
        "the record keeps the path whole"
    );
    env.server.stop().await;
}

/// Anyone can send a request that is refused before a token is verified:
/// past 10 in a second, such refusals are recorded as a count per
/// upstream, not one by one. Every refusal is in the trail, one way or the
/// other; refusals of tokens that verified (a revoked one, one out of its
/// scope, one a policy refuses), sent amid the flood, are recorded one by
/// one still.
#[tokio::test]
async fn a_flood_of_unverified_requests_is_recorded_as_counts() {
    let env = setup().await;
    let task = env.task("legacy:read").await;
    let token = env.token(&task, "legacy", "read").await;
    let revoked = env.token(&task, "legacy", "read").await;
    assert_eq!(env.server.revoke(&revoked).await.status, 200);
    let verified = [
        (reqwest::Method::GET, "legacy/y", revoked.clone(), 401),
        (reqwest::Method::POST, "legacy/y", token.clone(), 403),
        (reqwest::Method::GET, "legacy/admin/z", token.clone(), 403),
    ];
    const SENT: usize = 1000;
    let mut sends = tokio::task::JoinSet::new();
    let (http, url) = (env.http.clone(), env.server.url.clone());
    let mut next = 0;
    while next < SENT || !sends.is_empty() {
        while next < SENT && sends.len() < 16 {
            let (http, url) = (http.clone(), url.clone());
            sends.spawn(async move {
                http.get(format!("{url}/proxy/legacy/x"))
                    .send()
                    .await
                    .unwrap()
                    .status()
                    .as_u16()
            });
            next += 1;
        }
        if let Some(status) = sends.join_next().await {
            assert_eq!(status.unwrap(), 401);
        }
        if next == SENT / 2 {
            for (method, path, token, status) in &verified {
                let (got, _, _) = env.send(method.clone(), path, Some(token)).await;
                assert_eq!(got, *status, "{method} {path}");
            }
        }
    }
    // What anyone may send keeps nothing of the request's path: such
    // records name no token, and no path.
    let flood =
        |a: &&scrip_store::AuditEvent| a.jti.is_none() && a.tool.as_deref() == Some("legacy");
    let tally = |audit: &[scrip_store::AuditEvent]| {
        let one_by_one = audit
            .iter()
            .filter(|a| a.event == "proxy.request" && a.decision.as_deref() == Some("deny"))
            .filter(flood)
            .count();
        let counted: usize = audit
            .iter()
            .filter(|a| a.event == "proxy.refused")
            .map(|a| {
                assert_eq!(a.tool.as_deref(), Some("legacy"), "{a:?}");
                let reason = a.reason.as_deref().unwrap();
                reason.split(' ').next().unwrap().parse::<usize>().unwrap()
            })
            .sum();
        (one_by_one, counted)
    };
    let audit = env.refusals_adding_up(SENT, tally).await;
    for a in audit
        .iter()
        .filter(|a| a.event.starts_with("proxy."))
        .filter(flood)
    {
        assert_eq!(a.path, None, "{a:?}");
    }
    let verified_refusals: Vec<_> = audit
        .iter()
        .filter(|a| {
            a.event == "proxy.request"
                && a.decision.as_deref() == Some("deny")
                && a.path
                    .as_deref()
                    .is_some_and(|p| p.contains("/y") || p.contains("/admin"))
        })
        .collect();
    assert_eq!(verified_refusals.len(), 3, "{verified_refusals:#?}");
    // Each names whose token it was.
    let txn = decode_parts(&task).1["txn"].as_str().unwrap().to_owned();
    for (r, t) in verified_refusals.iter().zip([&revoked, &token, &token]) {
        assert_eq!(r.task_id.as_deref(), Some(txn.as_str()), "{r:?}");
        let jti = decode_parts(t).1["jti"].as_str().unwrap().to_owned();
        assert_eq!(r.jti.as_deref(), Some(jti.as_str()), "{r:?}");
        assert!(r.agent_sub.is_some(), "{r:?}");
    }
    env.server.stop().await;
}

/// The holder of a revoked token cannot grow the trail with attributed
/// records as fast as the store takes them: past 10 a second for one
/// token, its refusals are counted, into records that still name it.
#[tokio::test]
async fn a_revoked_tokens_refusals_are_recorded_as_counts_past_ten_a_second() {
    let env = setup().await;
    let task = env.task("legacy:read").await;
    let revoked = env.token(&task, "legacy", "read").await;
    assert_eq!(env.server.revoke(&revoked).await.status, 200);
    let jti = decode_parts(&revoked).1["jti"].as_str().unwrap().to_owned();
    const SENT: usize = 200;
    let mut sends = tokio::task::JoinSet::new();
    for _ in 0..SENT {
        let (http, url, token) = (env.http.clone(), env.server.url.clone(), revoked.clone());
        sends.spawn(async move {
            http.get(format!("{url}/proxy/legacy/r"))
                .bearer_auth(token)
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        });
    }
    while let Some(status) = sends.join_next().await {
        assert_eq!(status.unwrap(), 401);
    }
    let tally = |audit: &[scrip_store::AuditEvent]| {
        let one_by_one = audit
            .iter()
            .filter(|a| a.event == "proxy.request" && a.decision.as_deref() == Some("deny"))
            .inspect(|a| assert_eq!(a.jti.as_deref(), Some(jti.as_str()), "{a:?}"))
            .count();
        let counted: usize = audit
            .iter()
            .filter(|a| a.event == "proxy.refused")
            .map(|a| {
                assert_eq!(a.jti.as_deref(), Some(jti.as_str()), "{a:?}");
                assert!(a.task_id.is_some(), "{a:?}");
                let reason = a.reason.as_deref().unwrap();
                assert!(reason.contains("for one token"), "{reason}");
                reason.split(' ').next().unwrap().parse::<usize>().unwrap()
            })
            .sum();
        (one_by_one, counted)
    };
    env.refusals_adding_up(SENT, tally).await;
    env.server.stop().await;
}

#[tokio::test]
async fn a_revoked_task_is_refused() {
    let env = setup().await;
    let task = env.task("legacy:read").await;
    let read = env.token(&task, "legacy", "read").await;
    assert_eq!(
        env.send(reqwest::Method::GET, "legacy/a", Some(&read))
            .await
            .0,
        200
    );
    assert_eq!(env.server.revoke(&task).await.status, 200);
    let start = Instant::now();
    loop {
        let (status, headers, _) = env
            .send(reqwest::Method::GET, "legacy/b", Some(&read))
            .await;
        if status == 401 {
            assert!(challenge(&headers).contains("invalid_token"));
            break;
        }
        // Usually at once; the bound only allows for a loaded machine.
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "still accepted after revocation"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The refusal names the agent as the allowed request did, issuer and
    // all (`scrip audit query --agent S --issuer I` finds both).
    let allowed = env
        .wait_audit(|a| a.event == "proxy.request" && a.path.as_deref() == Some("/a"))
        .await;
    let refused = env
        .wait_audit(|a| {
            a.event == "proxy.request" && a.path.as_deref() == Some("/b") && a.status == Some(401)
        })
        .await;
    assert!(allowed.agent_iss.is_some(), "{allowed:?}");
    assert_eq!(
        (&refused.agent_sub, &refused.agent_iss),
        (&allowed.agent_sub, &allowed.agent_iss),
        "{refused:?}"
    );
    env.server.stop().await;
}

#[tokio::test]
async fn cedar_decides_the_concrete_request() {
    let env = setup().await;
    let task = env.task("legacy:read").await;
    let read = env.token(&task, "legacy", "read").await;
    let (status, _, body) = env
        .send(reqwest::Method::GET, "legacy/admin/users", Some(&read))
        .await;
    assert_eq!(status, 403);
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "access_denied");
    // Paths that would reach another path upstream are refused outright
    // (sent raw: an HTTP client library would normalize them).
    for path in [
        "legacy/public/../admin/users",
        "legacy/public/%2e%2e/admin",
        "legacy/a%2fb",
        "legacy//admin/users",
        "legacy/admin%",
        "legacy/%2561dmin/users",
        "legacy/public/%252e%252e/admin",
    ] {
        assert_eq!(
            env.raw_get(&format!("/proxy/{path}"), &read).await,
            400,
            "{path}"
        );
        // Said only to a caller with a token for the upstream.
        assert_eq!(
            env.raw_get(&format!("/proxy/{path}"), "not-a-jwt").await,
            401,
            "{path}"
        );
    }
    // An encoded letter is the letter (RFC 3986 §6.2.2.2): policy sees
    // `/admin/users` as the upstream would.
    assert_eq!(env.raw_get("/proxy/legacy/%61dmin/users", &read).await, 403);
    assert_eq!(
        env.send(reqwest::Method::GET, "legacy/public/x", Some(&read))
            .await
            .0,
        200
    );
    env.wait_seen("/public/x").await;
    assert!(env.seen("/admin/users").is_empty(), "{:?}", env.nginx.log());
    let denied = env
        .wait_audit(|a| a.event == "proxy.request" && a.path.as_deref() == Some("/admin/users"))
        .await;
    assert_eq!(denied.decision.as_deref(), Some("deny"));
    assert_eq!(denied.policies, ["proxy-no-admin"]);
    env.server.stop().await;
}

#[tokio::test]
async fn echoed_secrets_are_redacted_and_never_logged_or_audited() {
    let env = setup().await;
    let task = env.task("legacy:read").await;
    let read = env.token(&task, "legacy", "read").await;

    let (status, headers, body) = env
        .send(reqwest::Method::GET, "legacy/echo-header", Some(&read))
        .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-echo"], "Bearer [redacted]");
    assert_eq!(body, "echo\n");
    let (_, _, body) = env
        .send(reqwest::Method::GET, "legacy/echo-body", Some(&read))
        .await;
    assert_eq!(
        body,
        format!("you sent: Bearer {} and ?\n", "*".repeat(READ_KEY.len()))
    );

    // A large file holding the key at many offsets, so that some copies
    // straddle the chunks the body arrives in.
    let mut file = Vec::new();
    let mut i = 0usize;
    while file.len() < 1 << 20 {
        file.extend(std::iter::repeat_n(b'.', 1000 + i % 4093));
        file.extend_from_slice(READ_KEY.as_bytes());
        // A delimiter ends the masked run (see `redact`).
        file.push(b'\n');
        i += 7919;
    }
    env.nginx.put_file("leaky.txt", &file);
    let (status, _, body) = env
        .send(reqwest::Method::GET, "legacy/files/leaky.txt", Some(&read))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body.len(), file.len());
    assert!(!body.contains(READ_KEY));
    let masked = String::from_utf8(file.clone())
        .unwrap()
        .replace(READ_KEY, &"*".repeat(READ_KEY.len()));
    assert!(body == masked, "the body differs from the masked file");

    let (status, _, _) = env
        .send(reqwest::Method::GET, "legacy/files/leaky.txt", Some("bad"))
        .await;
    assert_eq!(status, 401);
    // Completion records are written when the body ends: wait for them.
    let start = Instant::now();
    while !env
        .server
        .audit()
        .await
        .iter()
        .any(|a| a.event == "proxy.response" && a.path.as_deref() == Some("/files/leaky.txt"))
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "no proxy.response record"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    tokio::time::sleep(Duration::from_millis(200)).await;

    let audit = serde_json::to_string(&env.server.audit().await).unwrap();
    let logs = String::from_utf8(logs().lock().unwrap().clone()).unwrap();
    for secret in [READ_KEY, WRITE_KEY, &read, &task] {
        assert!(
            !audit.contains(secret),
            "a secret or token is in the audit trail"
        );
        assert!(!logs.contains(secret), "a secret or token is in the log");
    }
    assert!(logs.contains("proxy mounted"), "the log was not captured");

    let records = env.server.audit().await;
    let done: Vec<_> = records
        .iter()
        .filter(|a| a.event == "proxy.response" && a.path.as_deref() == Some("/files/leaky.txt"))
        .collect();
    assert_eq!(done.len(), 1, "{done:?}");
    let r = done[0];
    assert_eq!(r.status, Some(200));
    assert_eq!(r.bytes_out, Some(u64::try_from(file.len()).unwrap()));
    assert_eq!(r.method.as_deref(), Some("GET"));
    assert_eq!(r.actions.as_deref(), Some("read"));
    assert_eq!(r.tool.as_deref(), Some("legacy"));
    assert!(r.task_id.is_some() && r.agent_sub.is_some() && r.latency_us.is_some());
    let allow = records
        .iter()
        .find(|a| a.event == "proxy.request" && a.decision.as_deref() == Some("allow"))
        .unwrap();
    assert_eq!(
        allow.agent_sub.as_deref(),
        Some("system:serviceaccount:agents:legacy-agent")
    );
    env.server.stop().await;
}

/// Serves a page showing each `(label, key)`, fetches it with the read
/// token `read`, and checks that every key came back masked.
async fn assert_masked(env: &Env, read: &str, keys: &[(&str, &str)]) {
    let page: String = keys.iter().map(|(l, k)| format!("{l}={k}\n")).collect();
    env.nginx.put_file("settings.txt", page.as_bytes());
    let (status, _, body) = env
        .send(
            reqwest::Method::GET,
            "legacy/files/settings.txt",
            Some(read),
        )
        .await;
    assert_eq!(status, 200);
    let masked: String = keys
        .iter()
        .map(|(l, k)| format!("{l}={}\n", "*".repeat(k.len())))
        .collect();
    assert_eq!(body, masked);
}

/// The upstream's other keys are redacted too: a read answer that shows
/// the write key (a settings page) would undo the split between the
/// actions.
#[tokio::test]
async fn a_read_answer_never_shows_the_write_key() {
    let env = setup().await;
    let task = env.task("legacy:read").await;
    let read = env.token(&task, "legacy", "read").await;
    assert_masked(
        &env,
        &read,
        &[("read_key", READ_KEY), ("write_key", WRITE_KEY)],
    )
    .await;
    env.server.stop().await;
}

/// A rotation keeps the replaced key accepted by the upstream for its
/// grace (an hour here): an answer that shows it must not hand it to the
/// agent, which could use it directly until then.
#[tokio::test]
async fn keys_in_their_grace_period_are_redacted_too() {
    const WRITE_KEY_2: &str = "wk-Zq3Lm9Tp5Vx2Bc8";
    let env = setup().await;
    let task = env.task("legacy:read").await;
    let read = env.token(&task, "legacy", "read").await;
    set_secret(&env.server, "legacy", "read", READ_KEY_2).await;
    set_secret(&env.server, "legacy", "write", WRITE_KEY_2).await;
    tokio::time::sleep(scrip_proxy::secrets::CACHE_TTL + Duration::from_millis(200)).await;
    assert_masked(
        &env,
        &read,
        &[
            ("old_read", READ_KEY),
            ("old_write", WRITE_KEY),
            ("read", READ_KEY_2),
            ("write", WRITE_KEY_2),
        ],
    )
    .await;
    env.server.stop().await;
}

/// A range of a file could cut the key into pieces that redaction, which
/// looks for whole forms, does not know: `Range` never reaches the
/// upstream, the whole body comes back redacted, and a part the upstream
/// sends anyway is refused.
#[tokio::test]
async fn a_range_request_cannot_spell_out_the_key() {
    let env = setup().await;
    let task = env.task("legacy:read").await;
    let read = env.token(&task, "legacy", "read").await;
    let pad = ".".repeat(100);
    // A space after the key ends the masked run (see `redact`).
    let file = format!("{pad}{READ_KEY} {pad}");
    env.nginx.put_file("ranged.txt", file.as_bytes());
    let masked = file.replace(READ_KEY, &"*".repeat(READ_KEY.len()));
    let (k, end) = (pad.len(), pad.len() + READ_KEY.len() - 1);
    // All of the key but its first byte; its first byte alone; the key in
    // two parts of one multipart answer.
    for range in [
        format!("bytes={}-{end}", k + 1),
        format!("bytes={k}-{k}"),
        format!("bytes={k}-{},{}-{end}", k + 2, k + 3),
    ] {
        let r = env
            .http
            .get(env.url("legacy/files/ranged.txt"))
            .bearer_auth(&read)
            .header("range", &range)
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{range}");
        assert_eq!(r.text().await.unwrap(), masked, "{range}");
    }
    let (status, _, body) = env
        .send(reqwest::Method::GET, "legacy/partial", Some(&read))
        .await;
    assert_eq!(status, 502, "{body}");
    assert!(body.contains("part of a representation"), "{body}");

    // A HEAD (no body to send) is a complete answer, not an agent that
    // went away.
    let (status, _, _) = env
        .send(
            reqwest::Method::HEAD,
            "legacy/files/ranged.txt",
            Some(&read),
        )
        .await;
    assert_eq!(status, 200);
    let r = env
        .wait_audit(|a| a.event == "proxy.response" && a.method.as_deref() == Some("HEAD"))
        .await;
    assert_eq!(r.reason, None, "{r:?}");
    assert_eq!(r.status, Some(200));
    env.server.stop().await;
}

#[tokio::test]
async fn hop_by_hop_credentials_and_forged_forwarding_headers_stay_behind() {
    let env = setup().await;
    let task = env.task("legacy:read").await;
    let read = env.token(&task, "legacy", "read").await;
    let r = env
        .http
        .get(env.url("legacy/headers"))
        .bearer_auth(&read)
        .header("connection", "x-private")
        .header("x-private", "secret-hop")
        .header("te", "trailers")
        .header("x-forwarded-for", "6.6.6.6")
        .header("x-forwarded-host", "evil.example")
        .header("forwarded", "for=6.6.6.6")
        .header("cookie", "scrip_session=abc")
        .header("proxy-authorization", "Basic eDp5")
        .header("accept-encoding", "gzip")
        .header("accept-charset", "utf-16")
        .header("client-ip", "6.6.6.6")
        .header("true-client-ip", "6.6.6.6")
        .header("x-envoy-retry-on", "5xx")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let body = r.text().await.unwrap();
    assert_eq!(
        body,
        "connection=[] x-private=[] te=[] upgrade=[] xff=[] xfh=[] forwarded=[] cookie=[] proxy-authorization=[] accept-encoding=[identity] accept-charset=[] client-ip=[] true-client-ip=[] envoy=[]\n"
    );
    env.server.stop().await;
}

/// A policy at the proxy sees the issuers of the sub-agents acting
/// (`context.delegation_issuers`), the principal being the task's agent:
/// one that shuts out an issuer's sub-agents refuses their requests, and
/// only theirs.
#[tokio::test]
async fn a_policy_sees_the_issuers_of_the_sub_agents_at_the_proxy() {
    let env = setup().await;
    let task = env.task("legacy:read").await;
    let github = env.server.github.github("acme/helper");
    let spiffe = env.server.spiffe.spiffe("acme.example", "/reviewer");
    let by_github = env.delegate(&task, &github).await;
    // A chain two deep: a SPIFFE workload acting for the GitHub one.
    let through_github = env.delegate(&by_github, &spiffe).await;
    let by_spiffe = env.delegate(&task, &spiffe).await;
    for (task, allowed) in [
        (&task, true),
        (&by_spiffe, true),
        (&by_github, false),
        (&through_github, false),
    ] {
        let read = env.token(task, "legacy", "read").await;
        let (status, _, body) = env
            .send(reqwest::Method::GET, "legacy/items/1", Some(&read))
            .await;
        assert_eq!(status, if allowed { 200 } else { 403 }, "{body}");
    }
    let denied = env
        .wait_audit(|a| {
            a.event == "proxy.request"
                && a.decision.as_deref() == Some("deny")
                && a.policies == ["proxy-no-github-sub-agents"]
        })
        .await;
    assert_eq!(denied.chain, ["repo:acme/helper:ref:refs/heads/main"]);
    env.server.stop().await;
}

/// What an agent with a read token may not get the upstream, or a cache in
/// front of scrip, to do: run another method through a query parameter
/// (ASP.NET MVC reads `X-HTTP-Method-Override` there; PHP cuts
/// `_method%00` to `_method`), act on a second path (WebDAV's
/// `Destination`), or have a shared cache keep the answer for others.
#[tokio::test]
async fn no_query_override_second_path_or_shared_cache_passes_the_proxy() {
    let env = setup().await;
    let task = env.task("legacy:read").await;
    let read = env.token(&task, "legacy", "read").await;

    let (status, headers, _) = env
        .send(
            reqwest::Method::GET,
            "legacy/echo-header?a=1&X-HTTP-Method-Override=DELETE&_method%00=DELETE&b=2",
            Some(&read),
        )
        .await;
    assert_eq!(status, 200);
    assert_eq!(headers["x-echo-query"], "a=1&b=2");

    let r = env
        .http
        .get(env.url("legacy/files/public.txt"))
        .bearer_auth(&read)
        .header("destination", "http://upstream/files/private.txt")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    let body = r.text().await.unwrap();
    assert!(body.contains("`Destination` header"), "{body}");
    let refused = env
        .wait_audit(|a| {
            a.event == "proxy.request" && a.path.as_deref() == Some("/files/public.txt")
        })
        .await;
    assert_eq!(refused.decision.as_deref(), Some("deny"), "{refused:?}");

    let (status, headers, body) = env
        .send(reqwest::Method::GET, "legacy/cacheable", Some(&read))
        .await;
    assert_eq!(status, 200);
    assert_eq!(body, "for everyone, says the upstream\n");
    assert_eq!(headers["cache-control"], "private, max-age=300");
    for name in ["x-accel-redirect", "cdn-cache-control", "surrogate-control"] {
        assert!(headers.get(name).is_none(), "{name}: {headers:?}");
    }
    env.server.stop().await;
}

#[tokio::test]
async fn an_upload_slower_than_the_read_timeout_is_not_cut_off() {
    use tokio::io::AsyncWriteExt as _;
    let env = setup().await;
    let task = env.task("slow:write").await;
    let write = env.token(&task, "slow", "write").await;
    // 12 KiB in 12 pieces, 250 ms apart: 3 s of upload against a read
    // timeout of 1 s, with the body moving all along.
    let mut s = put_head(
        &env.server.url,
        "/proxy/slow/upload/slow.bin",
        &write,
        12 * 1024,
    )
    .await;
    for _ in 0..12 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        s.write_all(&[b'x'; 1024]).await.unwrap();
    }
    let answer = answer_of(s).await;
    let status = answer.split(' ').nth(1).unwrap_or_default();
    assert_eq!(status, "201", "{answer}");
    assert_eq!(
        std::fs::metadata(env.nginx.uploaded("slow.bin"))
            .unwrap()
            .len(),
        12 * 1024
    );
    env.server.stop().await;
}

/// An agent that sends part of its body and then nothing, to an upstream
/// that answers at once and then waits for the rest as long as it takes,
/// is answered and then cut off once its body has not moved for the read
/// timeout (1 s): it holds neither its connection nor the upstream's.
/// (Nothing else watched the body once the answer was in: both stayed open
/// until the upstream gave up, here never.)
#[tokio::test]
async fn an_upload_that_stops_after_the_answer_is_cut_off() {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let env = setup().await;
    set_secret(&env.server, "mute", "write", WRITE_KEY).await;
    let task = env.task("mute:write").await;
    let write = env.token(&task, "mute", "write").await;
    // The upstream: answers once the head is in, then reads whatever
    // comes, for a minute, and says whether the proxy closed the
    // connection.
    let listener = tokio::net::TcpListener::from_std({
        let l = env.mute.try_clone().unwrap();
        l.set_nonblocking(true).unwrap();
        l
    })
    .unwrap();
    let upstream = tokio::spawn(async move {
        let (mut conn, _) = listener.accept().await.unwrap();
        let mut seen = Vec::new();
        let mut buf = [0u8; 4096];
        while !seen.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = conn.read(&mut buf).await.unwrap();
            assert!(n > 0, "closed before the head");
            seen.extend_from_slice(&buf[..n]);
        }
        conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nok\n")
            .await
            .unwrap();
        let closed = tokio::time::timeout(Duration::from_secs(60), async {
            while conn.read(&mut buf).await.is_ok_and(|n| n > 0) {}
        })
        .await;
        closed.is_ok()
    });
    let mut s = put_head(
        &env.server.url,
        "/proxy/mute/items/stalled",
        &write,
        10 * 1024,
    )
    .await;
    s.write_all(&[b'x'; 1024]).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(20), s.read_to_end(&mut answer)).await;
    let answer = String::from_utf8_lossy(&answer);
    assert!(
        read.is_ok(),
        "the agent's connection still open after 20 s: {answer}"
    );
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.ends_with("\r\n\r\nok\n"), "{answer}");
    assert!(
        upstream.await.unwrap(),
        "the upstream's connection still open after a minute"
    );
    env.server.stop().await;
}

/// Requests are normalised before they are matched, so a route written in
/// another form would never match: scrip refuses to start with it, before
/// it writes anything (a key, the store).
#[tokio::test]
async fn a_route_path_that_could_never_match_is_refused_at_start() {
    // Starts a server whose one upstream route is `path`.
    let bind = |path: &str| {
        let dir = tempfile::tempdir().unwrap();
        let mut legacy = upstream("legacy", "http://127.0.0.1:1");
        legacy.routes[0].path = path.into();
        let config = scrip_config::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().join("data"),
            policy_dir: common::repo_policies(),
            tools: vec![tool("legacy")],
            upstreams: vec![legacy],
            ..scrip_config::Config::default()
        };
        async move {
            let bound = scrip_server::Server::bind(config).await.map(drop);
            if bound.is_err() {
                assert!(!dir.path().join("data").exists(), "written before refusing");
            }
            drop(dir);
            bound
        }
    };
    for (path, says) in [
        ("/%61dmin*", "reads `/admin*` once normalised"),
        (
            "/v1/items%3Apurge",
            "reads `/v1/items:purge` once normalised",
        ),
        ("/a/../admin", "`.` or `..` segments"),
        ("/a;b", "path parameters"),
    ] {
        let err = bind(path).await.unwrap_err().to_string();
        assert!(err.contains(&format!("route path `{path}`")), "{err}");
        assert!(err.contains(says), "{path}: {err}");
    }
    // A prefix ending in an unfinished segment is a prefix: `/.*` catches
    // `/.env`. An escaped `*` is a literal star, kept as it is.
    for path in ["/.*", "/logs-%2A/_search"] {
        bind(path).await.unwrap();
    }
}

/// The size of a download [`trickling`] starts: 1 MiB, which the upstream
/// sends at 64 KiB/s, 16 s in all.
const TRICKLED: usize = 1024 * 1024;

/// Starts a download of a [`TRICKLED`] file `name` through the proxy with
/// `token`, answered 200.
async fn trickling(env: &Env, name: &str, token: &str) -> reqwest::Response {
    env.nginx.put_file(name, &vec![b'x'; TRICKLED]);
    let r = env
        .http
        .get(env.url(&format!("legacy/trickle/{name}")))
        .bearer_auth(token)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    r
}

/// Reads `r` until the proxy cuts it off (`why`, for the panics): the bytes
/// read meanwhile and how long it took. Panics if the whole body comes or
/// nothing comes for 10 s.
async fn read_until_cut(r: &mut reqwest::Response, why: &str) -> (usize, Duration) {
    let started = Instant::now();
    let mut got = 0;
    loop {
        match tokio::time::timeout(Duration::from_secs(10), r.chunk()).await {
            Ok(Ok(Some(c))) => got += c.len(),
            Ok(Ok(None)) => panic!("the whole body came after {why}"),
            Ok(Err(_)) => return (got, started.elapsed()),
            Err(_) => panic!("still streaming, or stalled, 10 s after {why}"),
        }
    }
}

/// The audit record of the download of `name`: cut off, and why.
async fn cut_record(env: &Env, name: &str, why: &str) -> scrip_store::AuditEvent {
    let path = format!("/trickle/{name}");
    let record = env
        .wait_audit(|a| a.event == "proxy.response" && a.path.as_deref() == Some(path.as_str()))
        .await;
    assert_eq!(
        record.reason.as_deref(),
        Some(format!("response cut off: {why}").as_str()),
        "{record:?}"
    );
    assert!(
        record.bytes_out.is_some_and(|b| b < TRICKLED as u64 / 2),
        "{record:?}"
    );
    record
}

#[tokio::test]
async fn a_download_under_way_stops_when_its_task_is_ended() {
    let env = setup().await;
    let task = env.task("legacy:read").await;
    let read = env.token(&task, "legacy", "read").await;
    let mut r = trickling(&env, "long.bin", &read).await;
    let mut got = 0;
    while got < 64 * 1024 {
        got += r.chunk().await.unwrap().unwrap().len();
    }
    assert_eq!(env.server.revoke(&task).await.status, 200);
    let (more, cut) = read_until_cut(&mut r, "the task ended").await;
    assert!(
        got + more < TRICKLED / 2,
        "{got} + {more} bytes, {cut:?} after the end"
    );
    cut_record(&env, "long.bin", "token has been revoked").await;
    env.server.stop().await;
}

/// Nor does a request outlive its token: past `exp` and the leeway (scrip
/// publishes no revocation of a task that ran out), the next chunk is not
/// passed.
#[tokio::test]
async fn a_download_under_way_stops_once_its_token_has_run_out() {
    let env = setup_with(|c| {
        c.access_token_ttl = 2;
        c.clock_skew = 1;
    })
    .await;
    let task = env.task("legacy:read").await;
    let read = env.token(&task, "legacy", "read").await;
    let mut r = trickling(&env, "outlive.bin", &read).await;
    let (got, cut) = read_until_cut(&mut r, "the token ran out").await;
    // Some of it passed while the token stood, and the rest did not.
    assert!(
        got > 0 && got < TRICKLED / 2,
        "{got} bytes, cut after {cut:?}"
    );
    cut_record(&env, "outlive.bin", "token has expired").await;
    env.server.stop().await;
}

#[tokio::test]
async fn an_upload_under_way_stops_when_its_token_is_revoked() {
    use tokio::io::AsyncWriteExt as _;
    let env = setup().await;
    let task = env.task("slow:write").await;
    let write = env.token(&task, "slow", "write").await;
    let mut s = put_head(
        &env.server.url,
        "/proxy/slow/upload/cut.bin",
        &write,
        40 * 1024,
    )
    .await;
    // 40 pieces 100 ms apart; the access token alone is revoked after 10.
    for i in 0..40 {
        if i == 10 {
            assert_eq!(env.server.revoke(&write).await.status, 200);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        if s.write_all(&[b'x'; 1024]).await.is_err() {
            break;
        }
    }
    let answer = answer_of(s).await;
    assert_eq!(answer.split(' ').nth(1), Some("401"), "{answer}");
    assert!(answer.contains("invalid_token"), "{answer}");
    assert!(!env.nginx.uploaded("cut.bin").exists());
    let record = env
        .wait_audit(|a| a.event == "proxy.response" && a.path.as_deref() == Some("/upload/cut.bin"))
        .await;
    assert_eq!(record.status, Some(401), "{record:?}");
    assert!(
        record.reason.as_deref().is_some_and(|r| r
            .starts_with("cut off while the request body was going up: token has been revoked")),
        "{record:?}"
    );
    assert!(record.bytes_in.is_some_and(|b| b < 40 * 1024), "{record:?}");
    env.server.stop().await;
}

/// A request body whose chunked framing breaks midway is the agent's
/// mistake: a 400, audited as such, not a 502 blamed on the upstream.
#[tokio::test]
async fn a_malformed_request_body_is_the_agents_mistake_not_a_502() {
    use tokio::io::AsyncWriteExt as _;
    let env = setup().await;
    let task = env.task("slow:write").await;
    let write = env.token(&task, "slow", "write").await;
    let addr = env.server.url.trim_start_matches("http://").to_owned();
    let mut s = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let head = format!(
        "PUT /proxy/slow/upload/broken.bin HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {write}\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(b"400\r\n").await.unwrap();
    s.write_all(&[b'x'; 1024]).await.unwrap();
    s.write_all(b"\r\n").await.unwrap();
    // Let the request go up, then break the framing.
    tokio::time::sleep(Duration::from_millis(300)).await;
    s.write_all(b"zz\r\n").await.unwrap();
    let answer = answer_of(s).await;
    assert_eq!(answer.split(' ').nth(1), Some("400"), "{answer}");
    assert!(answer.contains("cut short or malformed"), "{answer}");
    let record = env
        .wait_audit(|a| a.event == "proxy.response" && a.status == Some(400))
        .await;
    assert!(
        record
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("cut short or malformed")),
        "{record:?}"
    );
    env.server.stop().await;
}

#[tokio::test]
async fn an_upstream_silent_past_the_read_timeout_is_a_504() {
    let env = setup().await;
    let task = env.task("mute:read").await;
    let read = env.token(&task, "mute", "read").await;
    let (status, _, body) = env.send(reqwest::Method::GET, "mute/x", Some(&read)).await;
    assert_eq!(status, 504, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "gateway_timeout");
    assert_eq!(
        body["error_description"],
        "upstream `mute` did not answer within 1 s"
    );
    env.server.stop().await;
}

/// Sends `<method> /proxy/<path>` (without a body) with `token` to
/// `server` on a socket of its own, which the caller may drop (the agent
/// hangs up).
async fn on_a_socket(
    server: &TestServer,
    method: &str,
    path: &str,
    token: &str,
) -> tokio::net::TcpStream {
    use tokio::io::AsyncWriteExt as _;
    let host = server.url.trim_start_matches("http://").to_owned();
    let mut s = tokio::net::TcpStream::connect(&host).await.unwrap();
    s.write_all(
        format!("{method} /proxy/{path} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    s
}

#[tokio::test]
async fn an_agent_that_hangs_up_while_the_upstream_works_is_audited() {
    let env = setup().await;
    let task = env.task("mute:read").await;
    let read = env.token(&task, "mute", "read").await;
    // The request reaches the upstream (which never answers); the agent
    // hangs up long before the proxy's 1 s read timeout.
    let s = on_a_socket(&env.server, "GET", "mute/gone", &read).await;
    // Hang up once the proxy has connected to the upstream, and so is
    // waiting for its answer, however long checking the request took.
    let mute = env.mute.try_clone().unwrap();
    let upstream = tokio::time::timeout(
        Duration::from_secs(30),
        tokio::task::spawn_blocking(move || mute.accept().unwrap().0),
    )
    .await
    .expect("the proxy never connected to the upstream")
    .unwrap();
    drop(s);
    let r = env
        .wait_audit(|a| a.event == "proxy.response" && a.path.as_deref() == Some("/gone"))
        .await;
    assert!(
        r.reason
            .as_deref()
            .is_some_and(|x| x.contains("the agent went away before the upstream answered")),
        "{r:?}"
    );
    assert_eq!(r.status, None, "{r:?}");
    drop(upstream);
    env.server.stop().await;
}

/// An agent that hangs up while its request's `allow` waits on the store:
/// the allow is still written, and so is the request's `proxy.response`,
/// saying that nothing was forwarded; the upstream sees nothing.
#[tokio::test]
async fn an_agent_that_hangs_up_before_its_request_is_forwarded_is_audited() {
    let env = setup().await;
    let task = env.task("legacy:read").await;
    let read = env.token(&task, "legacy", "read").await;
    let held = env.server.hold_writes().await;
    let s = on_a_socket(&env.server, "GET", "legacy/early", &read).await;
    // The request's checks take milliseconds; then its allow waits on the
    // store, and the agent hangs up.
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    release(held).await;
    let r = env
        .wait_audit(|a| a.event == "proxy.response" && a.path.as_deref() == Some("/early"))
        .await;
    assert!(
        r.reason
            .as_deref()
            .is_some_and(|x| x.contains("nothing reached the upstream")),
        "{r:?}"
    );
    let (status, _, body) = env
        .send(reqwest::Method::GET, "legacy/after", Some(&read))
        .await;
    assert_eq!(status, 200, "{body}");
    env.wait_seen("/after").await;
    assert!(env.seen("/early").is_empty(), "{:?}", env.nginx.log());
    let audit = env.server.audit().await;
    assert!(audit.iter().any(|a| a.event == "proxy.request"
        && a.decision.as_deref() == Some("allow")
        && a.path.as_deref() == Some("/early")));
    env.server.stop().await;
}

/// The key is injected and the request forwarded only once its `allow`
/// record is durable (SPEC: fail closed): while the store cannot take it,
/// 503 and the upstream sees nothing; once it can, the request goes
/// through, on the record.
#[tokio::test]
async fn nothing_is_forwarded_while_the_store_cannot_record_it() {
    let env = setup().await;
    let task = env.task("legacy:read").await;
    let read = env.token(&task, "legacy", "read").await;
    let held = env.server.hold_writes().await;
    let (status, _, body) = env
        .send(reqwest::Method::GET, "legacy/held", Some(&read))
        .await;
    assert_eq!(status, 503, "{body}");
    release(held).await;
    let (status, _, body) = env
        .send(reqwest::Method::GET, "legacy/after", Some(&read))
        .await;
    assert_eq!(status, 200, "{body}");
    // The upstream logs after answering, in order: once it logged the
    // second, it would have logged the first, had that been forwarded.
    env.wait_seen("/after").await;
    assert!(env.seen("/held").is_empty(), "{:?}", env.nginx.log());
    let audit = env.server.audit().await;
    let allowed = audit
        .iter()
        .filter(|a| {
            a.event == "proxy.request"
                && a.decision.as_deref() == Some("allow")
                && matches!(a.path.as_deref(), Some("/held" | "/after"))
        })
        .collect::<Vec<_>>();
    assert_eq!(allowed.len(), 1);
    assert_eq!(allowed[0].path.as_deref(), Some("/after"));
    // The refused request's answer is on the record: its allow could not be
    // confirmed written, and nothing was forwarded.
    let r = env
        .wait_audit(|a| a.event == "proxy.response" && a.path.as_deref() == Some("/held"))
        .await;
    assert!(
        r.reason
            .as_deref()
            .is_some_and(|x| x.contains("could not be confirmed written")),
        "{r:?}"
    );
    env.server.stop().await;
}

#[tokio::test]
async fn a_request_whose_secret_is_not_set_is_refused_and_audited() {
    let env = setup().await;
    // `down` has a `write` secret configured but none stored.
    let task = env.task("down:write").await;
    let write = env.token(&task, "down", "write").await;
    let (status, _, body) = env
        .send(reqwest::Method::POST, "down/x", Some(&write))
        .await;
    assert_eq!(status, 503, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "temporarily_unavailable");
    let r = env
        .wait_audit(|a| {
            a.event == "proxy.request"
                && a.tool.as_deref() == Some("down")
                && a.path.as_deref() == Some("/x")
        })
        .await;
    assert_eq!(r.decision.as_deref(), Some("deny"), "{r:?}");
    assert_eq!(r.status, Some(503), "{r:?}");
    assert!(
        r.reason
            .as_deref()
            .is_some_and(|x| x.contains("no secret is set")),
        "{r:?}"
    );
    // Counted as scrip failing to forward (a 5xx), not as a refusal.
    let metrics = env
        .http
        .get(format!("http://{}/metrics", env.metrics))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("scrip_proxy_requests_total{upstream=\"down\",outcome=\"failed\"} 1"),
        "{metrics}"
    );
    assert!(
        !metrics.contains("upstream=\"down\",outcome=\"denied\""),
        "{metrics}"
    );
    env.server.stop().await;
}

/// A secret deleted from the store (`scrip secret delete`) is no longer
/// injected once the proxy reads the store again: its requests are refused
/// as those of a secret never set.
#[tokio::test]
async fn a_deleted_secret_is_no_longer_injected() {
    let env = setup().await;
    let task = env.task("legacy:read").await;
    let read = env.token(&task, "legacy", "read").await;
    let get = |path: &'static str| env.send(reqwest::Method::GET, path, Some(&read));
    assert_eq!(get("legacy/before").await.2, "ok read GET /before\n");
    let store = SqliteStore::open(&env.server.dir.path().join("data/scrip.db"))
        .await
        .unwrap();
    store
        .commit(vec![Write::DeleteSecret {
            name: "legacy".into(),
            action: "read".into(),
            through: u32::MAX,
        }])
        .await
        .unwrap();
    tokio::time::sleep(scrip_proxy::secrets::CACHE_TTL + Duration::from_millis(200)).await;
    let (status, _, body) = get("legacy/after").await;
    assert_eq!(status, 503, "{body}");
    let r = env
        .wait_audit(|a| a.event == "proxy.request" && a.path.as_deref() == Some("/after"))
        .await;
    assert!(
        r.reason
            .as_deref()
            .is_some_and(|x| x.contains("no secret is set")),
        "{r:?}"
    );
    env.server.stop().await;
}

#[tokio::test]
async fn a_second_content_encoding_line_is_an_encoded_body() {
    let env = setup().await;
    let task = env.task("legacy:read").await;
    let read = env.token(&task, "legacy", "read").await;
    let (status, _, body) = env
        .send(reqwest::Method::GET, "legacy/two-encodings", Some(&read))
        .await;
    assert_eq!(status, 502, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "bad_gateway");
    env.server.stop().await;
}

/// A body in a character set where ASCII is not itself (UTF-16 here)
/// would spell the key in bytes redaction does not look for: refused.
#[tokio::test]
async fn an_answer_in_utf16_is_refused() {
    let env = setup().await;
    let task = env.task("legacy:read").await;
    let read = env.token(&task, "legacy", "read").await;
    let (status, _, body) = env
        .send(reqwest::Method::GET, "legacy/utf16", Some(&read))
        .await;
    assert_eq!(status, 502, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "bad_gateway");
    assert!(
        body["error_description"]
            .as_str()
            .unwrap()
            .contains("character set"),
        "{body}"
    );
    env.server.stop().await;
}

#[tokio::test]
async fn an_upstream_that_is_down_is_a_502_with_a_clear_body() {
    let env = setup().await;
    let task = env.task("down:read").await;
    let read = env.token(&task, "down", "read").await;
    let (status, _, body) = env.send(reqwest::Method::GET, "down/x", Some(&read)).await;
    assert_eq!(status, 502, "{body}");
    let body: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(body["error"], "bad_gateway");
    assert_eq!(
        body["error_description"],
        "upstream `down` failed: cannot connect to it"
    );
    env.server.stop().await;
}

#[tokio::test]
async fn rotation_swaps_the_key_and_overdue_secrets_show() {
    let env = setup().await;
    let task = env.task("legacy:read").await;
    let read = env.token(&task, "legacy", "read").await;
    assert_eq!(
        env.send(reqwest::Method::GET, "legacy/r1", Some(&read))
            .await
            .2,
        "ok read GET /r1\n"
    );
    set_secret(&env.server, "legacy", "read", READ_KEY_2).await;
    tokio::time::sleep(scrip_proxy::secrets::CACHE_TTL + Duration::from_millis(200)).await;
    assert_eq!(
        env.send(reqwest::Method::GET, "legacy/r2", Some(&read))
            .await
            .2,
        "ok read2 GET /r2\n"
    );
    // `/metrics` names the upstreams and their keys' ages: served at
    // `metrics_listen` only, not beside the API.
    let r = env
        .http
        .get(format!("{}/metrics", env.server.url))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    let scrape = || async {
        let r = env
            .http
            .get(format!("http://{}/metrics", env.metrics))
            .send()
            .await
            .unwrap();
        r.text().await.unwrap()
    };
    // The server stamps what it read between these two instants.
    let scraped = Instant::now();
    let metrics = scrape().await;
    let answered = Instant::now();
    assert!(
        metrics.contains("scrip_secret_overdue{name=\"legacy\",action=\"write\"} 1"),
        "{metrics}"
    );
    assert!(
        metrics.contains("scrip_secret_overdue{name=\"legacy\",action=\"read\"} 0"),
        "{metrics}"
    );
    assert!(
        metrics.contains("scrip_proxy_requests_total{upstream=\"legacy\",outcome=\"forwarded\"} 2"),
        "{metrics}"
    );
    for secret in [READ_KEY, READ_KEY_2, WRITE_KEY] {
        assert!(!metrics.contains(secret));
    }
    let store = SqliteStore::open(&env.server.dir.path().join("data/scrip.db"))
        .await
        .unwrap();
    let versions = store.secret_versions("legacy", "read").await.unwrap();
    let s = scrip_proxy::secrets::statuses(&versions, now(), |_, _| Some((86_400, 3600)));
    assert_eq!(
        s.iter().map(|s| (s.version, s.state)).collect::<Vec<_>>(),
        [(2, "current"), (1, "retiring")]
    );

    // `/metrics` needs no credentials, so it rereads the store at most every
    // 5 s however often it is asked; then it shows a secret set since.
    set_secret(&env.server, "slow", "read", "rk-slow").await;
    let slow_read = "scrip_secret_overdue{name=\"slow\",action=\"read\"}";
    let again = scrape().await;
    if scraped.elapsed() < Duration::from_secs(5) {
        assert!(!again.contains(slow_read), "reread at once: {again}");
    }
    tokio::time::sleep_until((answered + Duration::from_millis(5_100)).into()).await;
    let later = scrape().await;
    assert!(later.contains(slow_read), "never reread: {later}");
    env.server.stop().await;
}

#[tokio::test]
async fn a_dpop_bound_token_needs_a_fresh_proof_for_the_very_request() {
    use scrip_testkit::dpop::DpopKey;
    let env = setup().await;
    let task = env.task("legacy:read").await;
    let key = DpopKey::new();
    let token_url = format!("{}/token", env.server.url);
    let r = env
        .server
        .access_token_dpop(
            &task,
            "legacy",
            Some("read"),
            &[&key.proof("POST", &token_url, None)],
        )
        .await;
    assert_eq!(r.body["token_type"], "DPoP", "{}", r.text);
    let bound = r.body["access_token"].as_str().unwrap().to_owned();
    let plain = env.token(&task, "legacy", "read").await;

    let get = |auth: String, proofs: Vec<String>, rest: &'static str| {
        let req = env.http.get(env.url(rest)).header("authorization", auth);
        let req = proofs.into_iter().fold(req, |r, p| r.header("DPoP", p));
        async move {
            let r = req.send().await.unwrap();
            (r.status().as_u16(), challenge(r.headers()))
        }
    };
    let url = env.url("legacy/public/dpop");
    let proof = key.proof("GET", &url, Some(&bound));

    // As a bearer token, a bound token is refused: it would be a stolen one.
    let (status, c) = get(format!("Bearer {bound}"), vec![], "legacy/public/dpop").await;
    assert_eq!(status, 401);
    assert!(c.starts_with("DPoP ") && c.contains("invalid_token"), "{c}");
    // With its proof it goes through, once.
    let (status, c) = get(
        format!("DPoP {bound}"),
        vec![proof.clone()],
        "legacy/public/dpop",
    )
    .await;
    assert_eq!(status, 200, "{c}");
    let (status, c) = get(format!("DPoP {bound}"), vec![proof], "legacy/public/dpop").await;
    assert_eq!(status, 401);
    assert!(
        c.contains("invalid_dpop_proof") && c.contains("used before"),
        "{c}"
    );
    // The proxy checks its own tokens with no leeway, but a proof comes from
    // the agent's clock: 20 s ahead is within `clock_skew`.
    let ahead = key.sign(&json!({
        "jti": "ahead", "htm": "GET", "htu": env.url("legacy/public/ahead"), "iat": now() + 20,
        "ath": scrip_jose::dpop::access_token_hash(&bound),
    }));
    let (status, c) = get(format!("DPoP {bound}"), vec![ahead], "legacy/public/ahead").await;
    assert_eq!(status, 200, "{c}");
    // A policy sees the presented token's key (`context.dpop_jkt`): where
    // it requires one, a bearer token is refused and a bound one is not.
    let (status, c) = get(format!("Bearer {plain}"), vec![], "legacy/public/bound").await;
    assert_eq!(status, 403, "{c}");
    let proof = key.proof("GET", &env.url("legacy/public/bound"), Some(&bound));
    let (status, c) = get(format!("DPoP {bound}"), vec![proof], "legacy/public/bound").await;
    assert_eq!(status, 200, "{c}");
    let denied = env
        .wait_audit(|a| {
            a.event == "proxy.request"
                && a.decision.as_deref() == Some("deny")
                && a.path.as_deref() == Some("/public/bound")
        })
        .await;
    assert_eq!(denied.policies, ["proxy-bound-only"]);

    let other = DpopKey::new();
    for (proofs, why) in [
        // Made for another path, or another method.
        (
            vec![key.proof("GET", &env.url("legacy/public/other"), Some(&bound))],
            "`htu`",
        ),
        (vec![key.proof("POST", &url, Some(&bound))], "`htm`"),
        // Without the token's hash, or with another token's.
        (vec![key.proof("GET", &url, None)], "`ath`"),
        (vec![key.proof("GET", &url, Some(&plain))], "`ath`"),
        // By another key than the token's.
        (vec![other.proof("GET", &url, Some(&bound))], "another key"),
        (vec![], "missing"),
        (
            vec![
                key.proof("GET", &url, Some(&bound)),
                key.proof("GET", &url, Some(&bound)),
            ],
            "more than one",
        ),
    ] {
        let (status, c) = get(format!("DPoP {bound}"), proofs, "legacy/public/dpop").await;
        assert_eq!(status, 401, "{why}: {c}");
        assert!(
            c.contains("invalid_dpop_proof") && c.contains(why),
            "{why}: {c}"
        );
    }
    // Out of scope (a write with a read token), with its proof: refused
    // with a DPoP challenge naming the action.
    let items = env.url("legacy/items");
    let r = env
        .http
        .post(&items)
        .header("authorization", format!("DPoP {bound}"))
        .header("DPoP", key.proof("POST", &items, Some(&bound)))
        .send()
        .await
        .unwrap();
    let c = challenge(r.headers());
    assert_eq!(r.status(), 403, "{c}");
    assert!(
        c.starts_with("DPoP realm=\"legacy\", algs=\"")
            && c.contains("error=\"insufficient_scope\"")
            && c.ends_with("scope=\"write\""),
        "{c}"
    );
    // At an upstream that is not here, with a good proof: as at one the
    // token was not issued for.
    let (status, c) = get(
        format!("DPoP {bound}"),
        vec![key.proof("GET", &env.url("nope/public/dpop"), Some(&bound))],
        "nope/public/dpop",
    )
    .await;
    assert_eq!(status, 401, "{c}");
    assert!(
        c.starts_with("DPoP realm=\"nope\", algs=\"")
            && c.ends_with(
                "error=\"invalid_token\", error_description=\"token audience is not accepted\""
            ),
        "{c}"
    );
    // An unbound token cannot be dressed up as a bound one.
    let (status, c) = get(
        format!("DPoP {plain}"),
        vec![key.proof("GET", &url, Some(&plain))],
        "legacy/public/dpop",
    )
    .await;
    assert_eq!(status, 401);
    assert!(c.contains("not bound"), "{c}");

    // The upstream saw the one good request.
    env.wait_seen("/public/dpop").await;
    assert_eq!(env.seen("/public/dpop").len(), 1, "{:?}", env.nginx.log());
    env.wait_seen("/public/ahead").await;
    assert!(env.seen("/public/other").is_empty());
    env.server.stop().await;
}

/// A server whose `legacy` upstream (nginx) takes a `write` only with a
/// person's approval, and a task of `legacy:write` whose step alice
/// approved: the task token and the step's single-use token.
async fn an_approved_legacy_write() -> (nginx::Nginx, TestServer, String, String) {
    logs();
    let nginx = nginx::Nginx::start(&[("write", WRITE_KEY)], READ_KEY);
    let url = nginx.url();
    let alice = scrip_config::Approver {
        name: "alice".into(),
        issuer: Some(K8S_ISSUER.into()),
        subject: Some("system:serviceaccount:people:alice".into()),
        uid: None,
    };
    let server = TestServer::start_with(Options {
        extra_policies: vec![
            (
                "legacy-write-needs-approval.cedar".into(),
                "forbid (principal, action == Action::\"write\", resource) when { resource.name == \"legacy\" } unless { context.approved };\n".into(),
            ),
            ("proxy-no-admin.cedar".into(), NO_ADMIN.into()),
        ],
        edit: Some(Box::new(move |c| {
            c.approvers = vec![alice];
            c.tools.push(tool("legacy"));
            c.upstreams.push(upstream("legacy", &url));
        })),
        ..Options::default()
    })
    .await;
    set_secret(&server, "legacy", "write", WRITE_KEY).await;
    let identity = server.k8s.kubernetes(AGENT_NS, "legacy-agent");
    let task = server
        .start_task(&identity, "legacy:write", "dev", "fix JIRA-7")
        .await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = server.access_token(&task, "legacy", Some("write")).await;
    r.assert_error(400, "authorization_pending");
    let id = r.body["auth_req_id"].as_str().unwrap().to_owned();
    let alice_id = server.k8s.kubernetes("people", "alice");
    let r = server.approve(&id, Some(&alice_id)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = server
        .post_form(
            "/token",
            &[
                ("grant_type", "urn:openid:params:grant-type:ciba"),
                ("auth_req_id", &id),
                ("subject_token", &task),
            ],
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    let token = r.body["access_token"].as_str().unwrap().to_owned();
    (nginx, server, task, token)
}

#[tokio::test]
async fn an_approved_single_use_token_is_used_once_across_every_verifier() {
    let (nginx, server, _task, token) = an_approved_legacy_write().await;
    let http = reqwest::Client::new();
    let send = || {
        http.post(format!("{}/proxy/legacy/items", server.url))
            .bearer_auth(&token)
            .send()
    };
    // A request the proxy's policy refuses does not spend the approval.
    let refused = http
        .post(format!("{}/proxy/legacy/admin/purge", server.url))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 403);
    // The one use is an upload that goes on for 2 s: spending the token
    // (published as a revocation of its jti) does not cut it off.
    {
        use tokio::io::AsyncWriteExt as _;
        let mut s = put_head(
            &server.url,
            "/proxy/legacy/upload/approved.bin",
            &token,
            20 * 1024,
        )
        .await;
        for _ in 0..20 {
            tokio::time::sleep(Duration::from_millis(100)).await;
            s.write_all(&[b'x'; 1024]).await.unwrap();
        }
        let answer = answer_of(s).await;
        assert_eq!(answer.split(' ').nth(1), Some("201"), "{answer}");
        assert_eq!(
            std::fs::metadata(nginx.uploaded("approved.bin"))
                .unwrap()
                .len(),
            20 * 1024
        );
    }
    // The proxy claimed the one use at the store, where every replica and
    // every resource server's verifier (through introspection) sees it.
    let r = server.introspect(&token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(r.body, json!({"active": false}));
    assert!(
        server
            .audit()
            .await
            .iter()
            .any(|a| a.event == "token.used" && a.jti.is_some()),
        "the use is audited"
    );
    assert_eq!(send().await.unwrap().status(), 401);
    server.stop().await;
}

/// An agent that hangs up while its approved step's `allow` is being
/// written, whose commit then finds the single use spent (by another
/// writer of the store, as another replica would) and spends nothing: the
/// refusal it would have been answered is on the record.
#[tokio::test]
async fn an_agent_that_hangs_up_as_its_step_is_spent_elsewhere_is_refused_on_the_record() {
    use sqlx::Connection as _;
    let (_nginx, server, _task, token) = an_approved_legacy_write().await;
    let claims = decode_parts(&token).1;
    let mut held = server.hold_writes().await;
    let s = on_a_socket(&server, "POST", "legacy/items", &token).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    drop(s);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // Spent elsewhere first: the claim as the store writes it, in the
    // transaction that held the store, and which commits first.
    sqlx::query(
        "INSERT INTO revoked_tokens (jti, task_id, expires_at, revoked_at) VALUES (?, ?, ?, ?)",
    )
    .bind(claims["jti"].as_str().unwrap())
    .bind(claims["txn"].as_str().unwrap())
    .bind(claims["exp"].as_i64().unwrap())
    .bind(claims["iat"].as_i64().unwrap())
    .execute(&mut held)
    .await
    .unwrap();
    sqlx::query("COMMIT").execute(&mut held).await.unwrap();
    held.close().await.unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    let refused = loop {
        let found = server.audit().await.into_iter().find(|a| {
            a.event == "proxy.request"
                && a.decision.as_deref() == Some("deny")
                && a.path.as_deref() == Some("/items")
        });
        if let Some(r) = found {
            break r;
        }
        assert!(std::time::Instant::now() < deadline, "no refusal recorded");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        refused.reason.as_deref(),
        Some(
            "single-use token was already presented, or its task ended meanwhile (the agent went away before the answer)"
        )
    );
    assert_eq!(refused.status, Some(401));
    server.stop().await;
}

#[tokio::test]
async fn the_key_in_an_upstream_reason_phrase_never_reaches_the_agent() {
    logs();
    // An upstream that answers every request with its key in the status
    // line (`401 invalid key <key>`), as some legacy error paths do.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                let mut got = Vec::new();
                while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => got.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = format!(
                    "HTTP/1.1 401 invalid key {READ_KEY}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
                let _ = s.write_all(answer.as_bytes()).await;
            });
        }
    });
    let server = TestServer::start_with(Options {
        edit: Some(Box::new(move |c| {
            c.tools.push(tool("echo"));
            c.upstreams
                .push(upstream("echo", &format!("http://{addr}")));
        })),
        ..Options::default()
    })
    .await;
    set_secret(&server, "echo", "read", READ_KEY).await;
    let identity = server.k8s.kubernetes(AGENT_NS, "legacy-agent");
    let task = server
        .start_task(&identity, "echo:read", "dev", "fix JIRA-7")
        .await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = server.access_token(&task, "echo", Some("read")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let token = r.body["access_token"].as_str().unwrap().to_owned();

    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let host = server.url.trim_start_matches("http://");
    let mut s = tokio::net::TcpStream::connect(host).await.unwrap();
    s.write_all(
        format!(
            "GET /proxy/echo/items HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.unwrap();
    let text = String::from_utf8_lossy(&out);
    let status_line = text.lines().next().unwrap();
    assert!(status_line.starts_with("HTTP/1.1 401"), "{text}");
    assert!(
        !text.contains(READ_KEY),
        "the key reached the agent: {text}"
    );
    server.stop().await;
}

/// An upstream whose keep-alive runs out just as a pooled connection is
/// reused: on each connection it answers the first request (with the
/// connection's number) and closes on reading the second, unanswered (a
/// second request for `/hold` once `hold` is notified). A request for
/// `/never` it never answers. Returns its address, the connections it
/// took, and the requests it read and left unanswered.
async fn blinking_upstream(
    hold: Arc<tokio::sync::Notify>,
) -> (
    std::net::SocketAddr,
    Arc<std::sync::atomic::AtomicUsize>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (connections, unanswered) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let (taken, dropped) = (connections.clone(), unanswered.clone());
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let n = taken.fetch_add(1, SeqCst) + 1;
            let (dropped, hold) = (dropped.clone(), hold.clone());
            tokio::spawn(async move {
                let mut buf = [0u8; 8192];
                for request in 1.. {
                    let mut got = Vec::new();
                    while !got.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(k) => got.extend_from_slice(&buf[..k]),
                        }
                    }
                    let head = String::from_utf8_lossy(&got);
                    if request > 1 || head.contains("/never ") {
                        if head.contains("/hold ") {
                            hold.notified().await;
                        }
                        dropped.fetch_add(1, SeqCst);
                        return;
                    }
                    let body = format!("{{\"connection\":{n}}}");
                    let answer = format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                        body.len()
                    );
                    if s.write_all(answer.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, connections, unanswered)
}

/// A server whose upstream `blink` is a [`blinking_upstream`] (holding
/// `/hold` until `hold` is notified), with its `read` secret set; the
/// upstream's connections and requests left unanswered.
async fn with_blinking_upstream(
    hold: Arc<tokio::sync::Notify>,
) -> (
    Env,
    Arc<std::sync::atomic::AtomicUsize>,
    Arc<std::sync::atomic::AtomicUsize>,
) {
    let (addr, connections, unanswered) = blinking_upstream(hold).await;
    let env = setup_with(move |c| {
        c.tools.push(tool("blink"));
        c.upstreams
            .push(upstream("blink", &format!("http://{addr}")));
    })
    .await;
    set_secret(&env.server, "blink", "read", READ_KEY).await;
    (env, connections, unanswered)
}

#[tokio::test]
async fn a_connection_closed_unanswered_as_it_is_reused_is_tried_again_only_for_an_idempotent_request()
 {
    use std::sync::atomic::Ordering::SeqCst;
    let (env, connections, unanswered) = with_blinking_upstream(Arc::default()).await;
    set_secret(&env.server, "blink", "write", WRITE_KEY).await;
    let task = env.task("blink:read blink:write").await;
    let read = env.token(&task, "blink", "read").await;
    let write = env.token(&task, "blink", "write").await;
    // The pool takes a connection back once its answer has been read.
    let settle = || tokio::time::sleep(Duration::from_millis(300));

    let (status, _, body) = env.send(reqwest::Method::GET, "blink/a", Some(&read)).await;
    assert_eq!((status, body.as_str()), (200, r#"{"connection":1}"#));
    settle().await;
    // Reuses the first connection, which closes unanswered: a GET goes again
    // on a second one.
    let (status, _, body) = env.send(reqwest::Method::GET, "blink/b", Some(&read)).await;
    assert_eq!((status, body.as_str()), (200, r#"{"connection":2}"#));
    assert_eq!((connections.load(SeqCst), unanswered.load(SeqCst)), (2, 1));
    let record = env
        .wait_audit(|a| a.event == "proxy.response" && a.path.as_deref() == Some("/b"))
        .await;
    assert_eq!(record.status, Some(200), "{record:?}");
    assert_eq!(
        record.reason.as_deref(),
        Some(
            "sent a second time on a new connection: the first closed before the upstream answered"
        ),
        "{record:?}"
    );
    // A new connection for the pool (the second was not kept), which a
    // GET takes first.
    let prime = |path: &'static str, n: usize| {
        let (env, read) = (&env, &read);
        async move {
            let (status, _, body) = env.send(reqwest::Method::GET, path, Some(read)).await;
            assert_eq!((status, body), (200, format!("{{\"connection\":{n}}}")));
            settle().await;
        }
    };
    prime("blink/c", 3).await;
    // A POST, even without a body, is not sent twice: the agent gets the
    // 502.
    let r = env
        .http
        .post(env.url("blink/search"))
        .bearer_auth(&read)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!((connections.load(SeqCst), unanswered.load(SeqCst)), (3, 2));
    let record = env
        .wait_audit(|a| a.event == "proxy.response" && a.path.as_deref() == Some("/search"))
        .await;
    assert_eq!(record.status, Some(502), "{record:?}");
    // Nor is a PUT with a body (idempotent, but its body was the agent's
    // stream).
    prime("blink/d", 4).await;
    let r = env
        .http
        .put(env.url("blink/e"))
        .bearer_auth(&write)
        .body("x")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 502);
    assert_eq!((connections.load(SeqCst), unanswered.load(SeqCst)), (4, 3));
    // Sent again and failed again: the record says it went twice.
    prime("blink/f", 5).await;
    let (status, _, _) = env
        .send(reqwest::Method::GET, "blink/never", Some(&read))
        .await;
    assert_eq!(status, 502);
    assert_eq!((connections.load(SeqCst), unanswered.load(SeqCst)), (6, 5));
    let record = env
        .wait_audit(|a| a.event == "proxy.response" && a.path.as_deref() == Some("/never"))
        .await;
    assert_eq!(
        record.reason.as_deref(),
        Some(
            "upstream `blink` failed: the connection failed before it answered (sent a second time on a new connection: the first closed before the upstream answered)"
        ),
        "{record:?}"
    );
    env.server.stop().await;
}

/// A request whose token no longer stands when its connection closes
/// unanswered is not sent again.
#[tokio::test]
async fn a_request_is_not_sent_again_once_its_token_no_longer_stands() {
    use std::sync::atomic::Ordering::SeqCst;
    let hold = Arc::new(tokio::sync::Notify::new());
    let (env, connections, unanswered) = with_blinking_upstream(hold.clone()).await;
    let task = env.task("blink:read").await;
    let read = env.token(&task, "blink", "read").await;
    let (status, _, _) = env.send(reqwest::Method::GET, "blink/a", Some(&read)).await;
    assert_eq!(status, 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    // The upstream holds the second request while the task is revoked.
    let held = {
        let (http, url, read) = (env.http.clone(), env.url("blink/hold"), read.clone());
        tokio::spawn(async move { http.get(url).bearer_auth(read).send().await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(env.server.revoke(&task).await.status, 200);
    let start = Instant::now();
    while env
        .send(reqwest::Method::GET, "blink/probe", Some(&read))
        .await
        .0
        != 401
    {
        assert!(start.elapsed() < Duration::from_secs(10), "not revoked");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let before = connections.load(SeqCst);
    hold.notify_one();
    let r = held.await.unwrap();
    assert_eq!(r.status(), 502);
    // Not sent again: no other connection was made, and the record says
    // why.
    assert_eq!(unanswered.load(SeqCst), 1);
    assert_eq!(connections.load(SeqCst), before);
    let record = env
        .wait_audit(|a| a.event == "proxy.response" && a.path.as_deref() == Some("/hold"))
        .await;
    assert_eq!(record.status, Some(502), "{record:?}");
    assert!(
        record.reason.as_deref().is_some_and(|r| r.starts_with(
            "upstream `blink` failed: the connection failed before it answered; not sent again: "
        )),
        "{record:?}"
    );
    env.server.stop().await;
}
