//! End-to-end tests of the audit trail through the real `scrip` binary:
//! `scrip serve` answers requests, `scrip audit verify|query|export` read
//! what it recorded, a tampered database is caught, and a server killed with
//! SIGKILL under load loses no record of a token a client received.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

mod common;

use std::collections::{BTreeSet, HashSet};
use std::fs;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::{
    Client, Idp, JWT, K8S_ISSUER, Received, Server, TOKEN_EXCHANGE, TXN, claims, copy_policies,
    free_port, jti, load, scrip, str_of, text,
};
use scrip_jose::{SigningAlgorithm, SigningKey};
use serde_json::{Value, json};
use sqlx::{ConnectOptions as _, Connection as _};

const CODER: &str = "system:serviceaccount:agents:coder";

/// A scrip installation in a temporary directory: config, policies, the
/// identity provider's JWKS, and `data/`.
struct Site {
    dir: tempfile::TempDir,
    addr: SocketAddr,
    idp: Idp,
}

impl Site {
    fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        copy_policies(&root.join("policies"));
        let idp = Idp::new();
        fs::write(root.join("k8s-jwks.json"), idp.jwks.to_string()).unwrap();
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let config = format!(
            r#"listen = "{addr}"
data_dir = "{data}"
policy_dir = "{policies}"
audit_checkpoint_interval = 1

[[trusted_issuers]]
issuer = "{K8S_ISSUER}"
jwks_file = "{jwks}"
audiences = ["scrip"]
algorithms = ["ES256"]

[[tools]]
name = "github"
resource = "https://api.github.com"
actions = ["read", "write", "delete"]

[[tools]]
name = "jira"
resource = "https://acme.atlassian.net"
actions = ["read", "write"]
"#,
            data = root.join("data").display(),
            policies = root.join("policies").display(),
            jwks = root.join("k8s-jwks.json").display(),
        );
        fs::write(root.join("scrip.toml"), config).unwrap();
        Self { dir, addr, idp }
    }

    fn config(&self) -> String {
        self.dir.path().join("scrip.toml").display().to_string()
    }

    fn db(&self) -> PathBuf {
        self.dir.path().join("data").join("scrip.db")
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Runs `scrip audit <args> --config <config>`.
    fn audit(&self, args: &[&str]) -> Output {
        let config = self.config();
        scrip()
            .arg("audit")
            .args(args)
            .args(["--config", &config])
            .output()
            .expect("run scrip audit")
    }

    /// `scrip audit export`: the JSON lines, parsed.
    fn export(&self, args: &[&str]) -> Vec<Value> {
        let mut all = vec!["export"];
        all.extend_from_slice(args);
        let out = self.audit(&all);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        json_lines(&out.stdout)
    }

    /// `scrip audit query --json`: the JSON lines, parsed.
    fn query(&self, args: &[&str]) -> Vec<Value> {
        let mut all = vec!["query", "--json"];
        all.extend_from_slice(args);
        let out = self.audit(&all);
        assert_eq!(out.status.code(), Some(0), "{out:?}");
        json_lines(&out.stdout)
    }

    /// `scrip audit verify`: asserts success and returns the report line.
    fn assert_verifies(&self, extra: &[&str]) -> String {
        let mut all = vec!["verify"];
        all.extend_from_slice(extra);
        let out = self.audit(&all);
        let stdout = text(&out.stdout);
        assert_eq!(
            out.status.code(),
            Some(0),
            "verify failed:\n{stdout}{}",
            text(&out.stderr)
        );
        assert!(stdout.starts_with("ok: "), "{stdout}");
        stdout
    }

    /// `scrip serve` on this site, a client of it, and a task of
    /// `agents/coder` holding `github:read`, started through it.
    async fn start_with_a_task(&self, log_name: &str) -> (Server, Client, String) {
        let server = self.start(log_name);
        let client = Client::new(self.url());
        let identity = self.idp.kubernetes("agents", "coder");
        let r = client
            .start_task(&identity, "github:read", "fix JIRA-1")
            .await
            .unwrap();
        let task = r.token().unwrap_or_else(|| panic!("{r:?}"));
        (server, client, task)
    }

    fn start(&self, log_name: &str) -> Server {
        Server::spawn(
            &self.dir.path().join("scrip.toml"),
            self.dir.path(),
            self.dir.path().join(log_name),
            &self.url(),
        )
    }
}

/// Clients putting load on a site's server (task starts and exchanges of
/// one identity) until stopped.
struct Load {
    stop: Arc<AtomicBool>,
    clients: Vec<tokio::task::JoinHandle<usize>>,
}

impl Load {
    fn start(site: &Site, identity: &str, clients: usize, got: &Arc<Received>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let clients = (0..clients)
            .map(|_| {
                tokio::spawn(load(
                    Client::new(site.url()),
                    identity.to_owned(),
                    stop.clone(),
                    got.clone(),
                ))
            })
            .collect();
        Self { stop, clients }
    }

    /// Stops the clients: the tokens each received.
    async fn stop(self) -> Vec<usize> {
        self.stop.store(true, Ordering::Relaxed);
        let mut received = Vec::new();
        for c in self.clients {
            received.push(
                tokio::time::timeout(Duration::from_secs(30), c)
                    .await
                    .expect("clients stop")
                    .unwrap(),
            );
        }
        received
    }
}

fn json_lines(stdout: &[u8]) -> Vec<Value> {
    text(stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn seqs(records: &[Value]) -> Vec<i64> {
    records
        .iter()
        .map(|r| r["seq"].as_i64().expect("a seq"))
        .collect()
}

/// Edits one record's JSON in the database file, as an attacker with file
/// access would.
async fn tamper(db: &Path, seq: i64, from: &str, to: &str) {
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(db)
        .connect()
        .await
        .unwrap();
    let done = sqlx::query("UPDATE audit SET record = replace(record, ?, ?) WHERE seq = ?")
        .bind(from)
        .bind(to)
        .bind(seq)
        .execute(&mut conn)
        .await
        .unwrap();
    assert_eq!(done.rows_affected(), 1);
    conn.close().await.unwrap();
}

// --- the tests -------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_commands_read_what_the_server_recorded() {
    let site = Site::new();
    let server = site.start("serve.log");
    let client = Client::new(site.url());
    let identity = site.idp.kubernetes("agents", "coder");
    let mut received: Vec<String> = vec![identity.clone()];

    // Two tasks, each with an access token.
    let mut tasks = Vec::new();
    for purpose in ["fix JIRA-1", "fix JIRA-2"] {
        let r = client
            .start_task(&identity, "github:read jira:read", purpose)
            .await
            .unwrap();
        let task = r.token().unwrap_or_else(|| panic!("{r:?}"));
        let r = client.access_token(&task, "github", "read").await.unwrap();
        let access = r.token().unwrap_or_else(|| panic!("{r:?}"));
        received.push(task.clone());
        received.push(access.clone());
        tasks.push((task, access));
    }
    let (task_a, access_a) = tasks[0].clone();
    let access_b = tasks[1].1.clone();
    let id_a = claims(&task_a)["txn"].as_str().unwrap().to_owned();

    // Denials: a write without a ticket, and a scope beyond the task's.
    let r = client
        .start_task(&identity, "github:write", "no ticket here")
        .await
        .unwrap();
    assert_eq!(
        (r.status, &r.body["error"]),
        (400, &json!("access_denied")),
        "{r:?}"
    );
    let r = client
        .access_token(&task_a, "github", "write")
        .await
        .unwrap();
    assert_eq!(r.status, 400, "{r:?}");

    // A sub-agent: the coder's second task delegated to it, and an access
    // token taken from its sub-task.
    let helper = site.idp.kubernetes("agents", "helper");
    received.push(helper.clone());
    let r = client
        .post(
            "/token",
            &[
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", &tasks[1].0),
                ("subject_token_type", TXN),
                ("actor_token", &helper),
                ("actor_token_type", JWT),
                ("scope", "github:read"),
            ],
            None,
        )
        .await
        .unwrap();
    let child = r.token().unwrap_or_else(|| panic!("{r:?}"));
    received.push(child.clone());
    let r = client.access_token(&child, "github", "read").await.unwrap();
    received.push(r.token().unwrap_or_else(|| panic!("{r:?}")));

    // A revocation and an introspection by a resource server.
    let r = client
        .post("/revoke", &[("token", &access_a)], None)
        .await
        .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let proxy = site.idp.kubernetes("resource-servers", "github-proxy");
    received.push(proxy.clone());
    let r = client
        .post("/introspect", &[("token", &access_b)], Some(&proxy))
        .await
        .unwrap();
    assert_eq!((r.status, &r.body["active"]), (200, &json!(true)), "{r:?}");

    // While the server runs: verify, query and export work.
    site.assert_verifies(&[]);
    let all = site.export(&[]);
    assert!(all.len() >= 12, "{all:#?}");
    let all_seqs = seqs(&all);
    assert!(all_seqs.windows(2).all(|w| w[0] < w[1]), "{all_seqs:?}");

    // Every token received has its record, by jti.
    let has = |event: &str, jti: &str| {
        all.iter()
            .any(|r| str_of(r, "event") == Some(event) && str_of(r, "jti") == Some(jti))
    };
    for (task, access) in &tasks {
        assert!(has("task.started", &self::jti(task)), "{all:#?}");
        assert!(has("token.issued", &self::jti(access)), "{all:#?}");
    }
    assert!(has("token.revoked", &jti(&access_a)), "{all:#?}");
    assert!(has("token.introspected", &jti(&access_b)), "{all:#?}");

    // Security invariant 1: no token in any record, not even a signature.
    for line in all.iter().map(Value::to_string) {
        for token in &received {
            let signature = token.rsplit('.').next().unwrap();
            assert!(
                !line.contains(token.as_str()) && !line.contains(signature),
                "an audit record holds a token: {line}"
            );
        }
    }

    // --task: exactly that task's records.
    let by_task = site.query(&["--task", &id_a]);
    let expected: Vec<i64> = seqs(
        &all.iter()
            .filter(|r| str_of(r, "task_id") == Some(id_a.as_str()))
            .cloned()
            .collect::<Vec<_>>(),
    );
    assert_eq!(seqs(&by_task), expected);
    let events: BTreeSet<&str> = by_task.iter().filter_map(|r| str_of(r, "event")).collect();
    for e in [
        "task.started",
        "token.issued",
        "token.refused",
        "token.revoked",
    ] {
        assert!(events.contains(e), "{e} missing from {events:?}");
    }

    // --decision deny: only denials, both of them.
    let denied = site.query(&["--decision", "deny"]);
    assert!(denied.len() >= 2, "{denied:#?}");
    assert!(
        denied.iter().all(|r| str_of(r, "decision") == Some("deny")),
        "{denied:#?}"
    );
    assert!(
        denied
            .iter()
            .any(|r| str_of(r, "purpose") == Some("no ticket here")),
        "{denied:#?}"
    );
    assert!(
        denied
            .iter()
            .any(|r| str_of(r, "task_id") == Some(id_a.as_str())),
        "{denied:#?}"
    );
    let allowed = site.query(&["--decision", "allow"]);
    assert!(!allowed.is_empty());
    assert!(
        allowed
            .iter()
            .all(|r| str_of(r, "decision") == Some("allow"))
    );

    // --agent: the coder's records, not the resource server's.
    let coder = site.query(&["--agent", CODER]);
    assert!(coder.len() >= 8, "{coder:#?}");
    assert!(coder.iter().all(|r| str_of(r, "agent_sub") == Some(CODER)));
    // --issuer: the same agent by its issuer, and none by another.
    let iss = str_of(&coder[0], "agent_iss").unwrap().to_owned();
    assert_eq!(site.query(&["--agent", CODER, "--issuer", &iss]), coder);
    assert!(
        site.query(&["--agent", CODER, "--issuer", "https://other.example"])
            .is_empty()
    );
    // --actor: what the sub-agent did, recorded under the coder's name.
    let helper_sub = "system:serviceaccount:agents:helper";
    let acted = site.query(&["--actor", helper_sub]);
    let events: BTreeSet<&str> = acted.iter().filter_map(|r| str_of(r, "event")).collect();
    assert_eq!(
        events,
        BTreeSet::from(["task.delegated", "task.grant", "token.issued"]),
        "{acted:#?}"
    );
    assert!(acted.iter().all(|r| {
        str_of(r, "agent_sub") == Some(CODER)
            && r["chain"]
                .as_array()
                .is_some_and(|c| c.contains(&json!(helper_sub)))
    }));
    assert!(site.query(&["--agent", helper_sub]).is_empty());
    assert!(site.query(&["--actor", CODER]).is_empty());
    // The chain names no issuers: --issuer, the tree's agent's, is refused
    // beside it rather than read as the sub-agent's.
    let out = site.audit(&["query", "--actor", helper_sub, "--issuer", &iss]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let proxy_sub = "system:serviceaccount:resource-servers:github-proxy";
    let by_proxy = site.query(&["--agent", proxy_sub]);
    assert_eq!(by_proxy.len(), 1, "{by_proxy:#?}");
    assert_eq!(str_of(&by_proxy[0], "event"), Some("token.introspected"));

    // --event and --jti: one kind of record; what names one token (its
    // issue and its introspection by the resource server).
    let issued = site.query(&["--event", "token.issued"]);
    assert!(issued.len() >= 2, "{issued:#?}");
    assert!(
        issued
            .iter()
            .all(|r| str_of(r, "event") == Some("token.issued"))
    );
    let introspected = str_of(&by_proxy[0], "jti").unwrap().to_owned();
    let named = site.query(&["--jti", &introspected]);
    let events: BTreeSet<&str> = named.iter().filter_map(|r| str_of(r, "event")).collect();
    assert_eq!(
        events,
        BTreeSet::from(["token.introspected", "token.issued"]),
        "{named:#?}"
    );
    assert!(
        named
            .iter()
            .all(|r| str_of(r, "jti") == Some(introspected.as_str()))
    );
    assert!(site.query(&["--jti", "no-such-jti"]).is_empty());

    // --tool.
    let github = site.query(&["--tool", "github"]);
    assert!(github.len() >= 4, "{github:#?}");
    assert!(github.iter().all(|r| str_of(r, "tool") == Some("github")));
    let jira = site.query(&["--tool", "jira"]);
    assert!(!jira.is_empty());
    assert!(jira.iter().all(|r| str_of(r, "tool") == Some("jira")));
    assert!(site.query(&["--tool", "nosuchtool"]).is_empty());

    // Time ranges: everything happened within the last hour.
    let recent = site.query(&["--since", "1h"]);
    let before_all = site.query(&["--until", "1h"]);
    assert!(before_all.is_empty(), "{before_all:#?}");
    // Export is a snapshot taken earlier; query may see later records too.
    assert!(recent.len() >= all.len());
    assert_eq!(seqs(&recent)[..all.len()], all_seqs[..]);
    let combined = site.query(&["--since", "1h", "--task", &id_a, "--decision", "deny"]);
    assert!(!combined.is_empty());
    assert!(combined.iter().all(|r| {
        str_of(r, "task_id") == Some(id_a.as_str()) && str_of(r, "decision") == Some("deny")
    }));
    assert_eq!(site.query(&["--limit", "3"]).len(), 3);
    // The oldest come first: a full page says later ones may exist.
    let out = site.audit(&["query", "--json", "--limit", "3"]);
    assert!(
        text(&out.stderr).contains("later ones may exist"),
        "{out:?}"
    );
    let out = site.audit(&["query", "--json", "--task", &id_a]);
    assert!(text(&out.stderr).is_empty(), "{out:?}");

    // The table form: a header, then one line per record.
    let out = site.audit(&["query", "--task", &id_a]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let table = text(&out.stdout);
    let mut lines = table.lines();
    let header = lines.next().unwrap_or_default();
    for column in ["seq", "time", "event", "agent", "task", "tool"] {
        assert!(header.contains(column), "{header}");
    }
    assert_eq!(lines.count(), by_task.len(), "{table}");

    // A reader that went away (`| head`): no panic, the rest dropped, and
    // the status a closed pipe gives, for the query, the table and export.
    for args in [
        &["query", "--json"][..],
        &["query"][..],
        &["export"][..],
        &["verify"][..],
    ] {
        let mut child = scrip()
            .arg("audit")
            .args(args)
            .args(["--config", &site.config()])
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        drop(child.stdout.take());
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(141), "{args:?}: {out:?}");
        assert!(text(&out.stderr).is_empty(), "{args:?}: {out:?}");
    }
    // A write that fails otherwise (a full disk) fails the command, saying
    // so: an export cut short must not pass for a reader's choice.
    let out = scrip()
        .args(["audit", "export", "--config", &site.config()])
        .stdout(std::fs::File::create("/dev/full").unwrap())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(
        text(&out.stderr).contains("cannot write to standard output"),
        "{out:?}"
    );

    // Export resumes after a cursor.
    let cursor = all_seqs[4];
    let rest = site.export(&["--after", &cursor.to_string()]);
    assert_eq!(seqs(&rest)[..all.len() - 5], all_seqs[5..]);
    assert!(seqs(&rest).iter().all(|s| *s > cursor));
    // At the newest record, nothing more; past it (a store restored from a
    // backup), refused, naming where to start again.
    let newest = *all_seqs.iter().max().unwrap();
    let export = site.audit(&["export", "--after", &newest.to_string()]);
    assert_eq!(export.status.code(), Some(0), "{export:?}");
    let past = (newest + 1_000).to_string();
    let out = site.audit(&["export", "--after", &past]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(out.stdout.is_empty(), "{out:?}");
    let said = text(&out.stderr);
    assert!(said.contains("past this store's newest record"), "{said}");
    assert!(said.contains("--after "), "{said}");

    // Usage errors.
    let out = site.audit(&["query", "--decision", "maybe"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    let out = site.audit(&["query", "--since", "yesterday-ish"]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");

    // The published checkpoint key verifies the trail; another key does not.
    let keys = client
        .http
        .get(format!("{}/audit/keys", site.url()))
        .send()
        .await
        .unwrap();
    assert_eq!(keys.status().as_u16(), 200);
    let keys = keys.text().await.unwrap();
    server.stop();

    let jwks_file = site.dir.path().join("audit-keys.json");
    fs::write(&jwks_file, &keys).unwrap();
    let report = site.assert_verifies(&["--public-key", jwks_file.to_str().unwrap()]);
    let matched: usize = report
        .split("; ")
        .nth(1)
        .and_then(|s| s.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("{report}"));
    assert!(matched >= 1, "the chain's head is signed: {report}");
    assert!(report.contains(" in 1 chains "), "{report}");
    site.assert_verifies(&[]);

    let (other, _) = SigningKey::generate(SigningAlgorithm::EdDSA).unwrap();
    let other_file = site.dir.path().join("other-keys.json");
    fs::write(
        &other_file,
        json!({ "keys": [other.public_jwk()] }).to_string(),
    )
    .unwrap();
    let out = site.audit(&["verify", "--public-key", other_file.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    assert!(text(&out.stdout).contains("TAMPERED"), "{out:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_tampered_record_fails_verification_naming_it() {
    let site = Site::new();
    let (server, client, task) = site.start_with_a_task("serve.log").await;
    let r = client.access_token(&task, "github", "read").await.unwrap();
    let access = r.token().unwrap_or_else(|| panic!("{r:?}"));
    server.stop();
    site.assert_verifies(&[]);
    // The chain's one signed head, and no list of older signed positions
    // that a chain could be cut back to.
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(site.db())
        .connect()
        .await
        .unwrap();
    for (count, rows) in [
        ("SELECT COUNT(*) FROM audit_heads", 1),
        ("SELECT COUNT(*) FROM audit_checkpoints", 0),
    ] {
        let n: i64 = sqlx::query_scalar(count)
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(n, rows, "{count}");
    }
    drop(conn);

    let all = site.export(&[]);
    let issued = all
        .iter()
        .find(|r| str_of(r, "jti") == Some(jti(&access).as_str()))
        .expect("the token.issued record");
    let seq = issued["seq"].as_i64().unwrap();
    // Not the last record: the signed head is not what catches it.
    tamper(&site.db(), seq, "\"read\"", "\"write\"").await;

    let out = site.audit(&["verify"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    let tampered: Vec<&str> = stdout
        .lines()
        .filter(|l| l.starts_with("TAMPERED"))
        .collect();
    assert!(
        tampered
            .iter()
            .any(|l| l.starts_with(&format!("TAMPERED record {seq} (chain "))),
        "{stdout}"
    );
    // Reading still works on a tampered trail, and the export carries the
    // stored bytes: a copy checked outside the store shows the edit.
    let out = site.audit(&["export"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let stdout = text(&out.stdout);
    assert_eq!(stdout.lines().count(), all.len());
    for line in stdout.lines() {
        let v: Value = serde_json::from_str(line).unwrap();
        let head = format!("{{\"seq\":{},\"hash\":{},", v["seq"], v["hash"]);
        let record = format!("{{{}", line.strip_prefix(&head).expect(line));
        let matches = scrip_store::hash(record.as_bytes()) == v["hash"].as_str().unwrap();
        assert_eq!(matches, v["seq"] != seq, "{line}");
        assert_eq!(record.contains("\"write\""), v["seq"] == seq, "{line}");
    }

    // A record that is no JSON at all is exported as a string; the records
    // after it still are, and the export then says so and fails.
    let seq = all[0]["seq"].as_i64().unwrap();
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(site.db())
        .connect()
        .await
        .unwrap();
    sqlx::query("UPDATE audit SET record = 'not json' WHERE seq = ?")
        .bind(seq)
        .execute(&mut conn)
        .await
        .unwrap();
    conn.close().await.unwrap();
    let out = site.audit(&["export"]);
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let lines = json_lines(&out.stdout);
    assert_eq!(lines.len(), all.len());
    let bad: Vec<&Value> = lines
        .iter()
        .filter(|l| l.get("unreadable_record").is_some())
        .collect();
    assert_eq!(bad.len(), 1, "{lines:?}");
    assert_eq!(bad[0]["seq"], seq);
    assert_eq!(bad[0]["unreadable_record"], "not json");
    assert!(lines.last().unwrap()["seq"].as_i64().unwrap() > seq);
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains(&format!("record {seq} is not one JSON object"))
            && stderr.contains("run `scrip audit verify`"),
        "{stderr}"
    );
}

/// A chain someone added whose records claim to be written now passes a
/// plain verification as recent, but not `--strict`: scrip signs as it
/// writes, so what the first reading saw unsigned must be signed at a
/// second.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn strict_verification_fails_on_records_added_with_a_recent_time() {
    let site = Site::new();
    let (server, _, _) = site.start_with_a_task("serve.log").await;
    // Under load, a strict verification passes: each record it reads was
    // signed in the commit that wrote it, however many land meanwhile.
    let identity = site.idp.kubernetes("agents", "coder");
    let load = Load::start(&site, &identity, 4, &Arc::new(Received::default()));
    tokio::time::sleep(Duration::from_millis(500)).await;
    for _ in 0..3 {
        let config = site.config();
        let out = tokio::task::spawn_blocking(move || {
            scrip()
                .args(["audit", "verify", "--strict", "--config", &config])
                .output()
                .unwrap()
        })
        .await
        .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out.stdout));
    }
    for received in load.stop().await {
        assert!(received > 0, "the load received nothing");
    }
    server.stop();
    site.assert_verifies(&["--strict"]);
    // A chain of two records, every hash right, claiming this moment.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis();
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(site.db())
        .connect()
        .await
        .unwrap();
    let mut prev = String::new();
    for (n, event) in ["chain.started", "approval.granted"]
        .into_iter()
        .enumerate()
    {
        let e = scrip_store::AuditEvent {
            event: event.into(),
            at_ms: u64::try_from(now).unwrap(),
            chain_id: Some("forged".into()),
            chain_seq: u64::try_from(n).unwrap() + 1,
            prev_hash: Some(prev.clone()),
            replica: "r9".into(),
            ..scrip_store::AuditEvent::default()
        };
        let record = serde_json::to_string(&e).unwrap();
        let hash = scrip_store::hash(record.as_bytes());
        sqlx::query(
            "INSERT INTO audit (at_ms, event, replica, chain_id, chain_seq, hash, record) \
             VALUES (?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(i64::try_from(e.at_ms).unwrap())
        .bind(&e.event)
        .bind(&e.replica)
        .bind("forged")
        .bind(i64::try_from(e.chain_seq).unwrap())
        .bind(&hash)
        .bind(&record)
        .execute(&mut conn)
        .await
        .unwrap();
        prev = hash;
    }
    conn.close().await.unwrap();
    let plain = site.assert_verifies(&[]);
    assert!(plain.contains("2 recent records wait"), "{plain}");
    let out = site.audit(&["verify", "--strict"]);
    let stdout = text(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(
            "(chain forged #1): records #1 to #2 are covered by no signature at a second reading"
        ),
        "{stdout}"
    );
}

/// The audit commands only read: a store an older scrip left is refused,
/// not migrated under the replicas still running that scrip, until
/// `scrip migrate` is run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_commands_never_migrate_the_store() {
    let site = Site::new();
    let config = site.config();
    let migrate = || {
        scrip()
            .args(["migrate", "--config", &config])
            .output()
            .expect("run scrip migrate")
    };
    site.start("serve.log").stop();
    site.assert_verifies(&[]);
    // As an older scrip left it: its newest migration not applied.
    let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
        .filename(site.db())
        .connect()
        .await
        .unwrap();
    let older = "DROP INDEX revocations_task; \
                 DELETE FROM _sqlx_migrations WHERE version = 9";
    sqlx::raw_sql(older).execute(&mut conn).await.unwrap();
    for args in [&["verify"][..], &["query"], &["export"]] {
        let out = site.audit(args);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {out:?}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("migration 9 `revocations task` is not applied")
                && stderr.contains("run `scrip migrate` first"),
            "{args:?}: {stderr}"
        );
    }
    let applied: i64 =
        sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE version = 9")
            .fetch_one(&mut conn)
            .await
            .unwrap();
    assert_eq!(applied, 0, "an audit command migrated the store");
    conn.close().await.unwrap();
    let out = migrate();
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    site.assert_verifies(&[]);
}

/// A SIGTERM that reaches `scrip serve` while it starts (its store already
/// open, its listener not yet served) stops it gracefully once started;
/// it never kills it.
#[test]
fn a_sigterm_during_start_up_stops_the_server_gracefully() {
    let site = Site::new();
    let log = site.dir.path().join("serve.log");
    let child = scrip()
        .args(["serve", "--config", &site.config()])
        .stdout(std::process::Stdio::null())
        .stderr(fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    let mut server = Server { child, log };
    // The store is created early in start-up.
    let start = std::time::Instant::now();
    while !site.db().exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(1));
    }
    let status = server.signal("TERM");
    assert_eq!(status.code(), Some(0), "{status}: {}", server.log());
    assert!(server.log().contains("shutting down"), "{}", server.log());
    site.assert_verifies(&[]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_server_killed_under_load_loses_no_issued_token() {
    let site = Site::new();
    let identity = site.idp.kubernetes("agents", "coder");
    let got = Arc::new(Received::default());
    for round in 0..3 {
        let mut server = site.start(&format!("serve{round}.log"));
        let load = Load::start(&site, &identity, 8, &got);
        tokio::time::sleep(Duration::from_millis(1_000 + 300 * round)).await;
        let status = server.signal("KILL");
        assert_eq!(status.code(), None, "killed by a signal");
        let received: usize = load.stop().await.into_iter().sum();
        // Enough that the kill lands among requests in flight.
        assert!(
            received >= 16,
            "round {round}: only {received} tokens received"
        );
        drop(server);
    }

    // A last, graceful run on the same data: it starts a new chain.
    let server = site.start("serve-final.log");
    let client = Client::new(site.url());
    let r = client
        .start_task(&identity, "github:read", "fix JIRA-9")
        .await
        .unwrap();
    let task = r.token().unwrap_or_else(|| panic!("{r:?}"));
    got.jtis.lock().unwrap().push((jti(&task), "task.started"));
    server.stop();

    let report = site.assert_verifies(&[]);
    assert!(report.contains(" in 4 chains "), "{report}");
    // Each commit signed its chain's head in its transaction, so a kill
    // left nothing unsigned: no record waits for a signature, none is
    // vouched for only by a later start, and --strict passes.
    assert!(!report.contains("recent records wait"), "{report}");
    assert!(!report.contains("carry no signature"), "{report}");
    let strict = site.audit(&["verify", "--strict"]);
    assert_eq!(strict.status.code(), Some(0), "{strict:?}");
    let records = site.export(&[]);
    let recorded: HashSet<(String, String)> = records
        .iter()
        .filter_map(|r| Some((str_of(r, "jti")?.to_owned(), str_of(r, "event")?.to_owned())))
        .collect();
    let jtis = got.jtis.lock().unwrap();
    let missing: Vec<_> = jtis
        .iter()
        .filter(|(j, e)| !recorded.contains(&(j.clone(), (*e).to_owned())))
        .collect();
    assert!(
        missing.is_empty(),
        "{} of {} tokens received have no record: {missing:?}",
        missing.len(),
        jtis.len()
    );
}
