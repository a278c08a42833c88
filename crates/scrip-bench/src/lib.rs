//! `scrip-bench`: a load generator for scrip.
//!
//! It starts a real scrip from its binary (a generated configuration in a
//! temporary directory: a test identity provider whose ES256 key it
//! generates, tools, the repository's policies plus fillers up to 20), or
//! targets one already running on loopback (`--url`, with `--identity-key`),
//! and drives it over keep-alive HTTP/1.1, one connection per worker. Each
//! scenario prints one summary line: requests/s, latency p50/p90/p99/max,
//! errors, and the server's peak RSS during that scenario's run (`VmHWM`,
//! reset before it, for a server it started; a `*` after the figure: it
//! could not be reset, and is the peak since the start: `scrip serve` is
//! not dumpable, so only root may reset it).
//!
//! Scenarios:
//! - `task-start`: identities minted before the run, each starting a task
//!   (`github:read github:write`, environment `dev`, purpose `fix JIRA-1`);
//! - `exchange`: one task token exchanged for `github` `read` access tokens;
//! - `introspect`: access tokens introspected, the caller authenticated with
//!   a pre-minted identity in `Authorization: Bearer`;
//! - `revoke`: access tokens issued before the run, each revoked once;
//! - `proxy`: one `legacy` read token, each request a `GET` through scrip's
//!   proxy to a loopback upstream that demands its static key (which scrip
//!   injects); not with `--url`;
//! - `metadata`: `GET /.well-known/oauth-authorization-server`, which
//!   neither signs, verifies, decides nor writes: the floor that HTTP, the
//!   loopback and this generator set under every other scenario;
//! - `propagation`: one task at a time started and revoked through the
//!   first replica while a revocation-feed long-poll waits on the last one;
//!   the latency is from sending the revocation to the feed answering it
//!   (needs `--replicas` of 2 or more to cross replicas).
//!
//! `--sched` adds a line per scenario: for each thread name of the server
//! and of this generator, the cores spent on a CPU and the cores spent
//! runnable but waiting for one ([`sched`]). `--signing-algorithm` sets the
//! started scrip's `signing_algorithm`.
//!
//! `--rate` sends on a fixed schedule instead (open loop): each connection
//! sends every `connections / rate` seconds, and every request counts
//! from when it was due (as wrk2 does), whether it went out late because
//! its connection was still waiting for an earlier answer or because the
//! generator's timer fired late on a busy machine. The line then adds `rtt_p50`,
//! `rtt_p99` and `rtt_max`: the round trip of each request from when it
//! was sent. Where the two disagree, requests waited behind their
//! connection's earlier ones.
//!
//! With `--database-url` it starts `--replicas` scrip processes on that
//! PostgreSQL database (one issuer, one key-encryption key) and spreads the
//! connections evenly over them; peak RSS and server CPU are replica 0's.
//!
//! Every request goes to 127.0.0.1 and the run is bounded in time (and, for
//! `revoke`, in count). Any failed request makes the exit status 1.

pub mod idp;
pub mod load;
pub mod prefill;
pub mod sched;
pub mod server;
pub mod upstream;

use std::os::unix::fs::DirBuilderExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use bytes::Bytes;
use hyper::Method;
use hyper::header::HeaderValue;
use scrip_jose::SigningAlgorithm;
use serde_json::{Value, json};

use crate::idp::{Idp, K8S_ISSUER};
use crate::load::{Outcome, Target, Workload};
use scrip_testkit::dpop::{DpopAlgorithm, DpopKey};

/// Any failure of the benchmark itself (not of a request).
pub type Error = Box<dyn std::error::Error + Send + Sync>;
/// A result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
const TXN: &str = "urn:ietf:params:oauth:token-type:txn_token";
const ACCESS: &str = "urn:ietf:params:oauth:token-type:access_token";
/// What an answer that issued a token holds.
const ISSUED: &str = "\"access_token\"";

/// What `metadata` asks for (RFC 8414).
pub(crate) const METADATA: &str = "/.well-known/oauth-authorization-server";
/// The purpose of every task: writes need a ticket.
const PURPOSE: &str = "fix JIRA-1";
/// The most time spent issuing tokens before a timed run.
const SETUP_LIMIT: Duration = Duration::from_secs(120);

/// A scenario.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// Start tasks with pre-minted federated ES256 identities.
    TaskStart,
    /// Exchange one task token for access tokens.
    Exchange,
    /// Introspect access tokens as an authenticated resource server.
    Introspect,
    /// Revoke pre-issued access tokens, each once.
    Revoke,
    /// Cross-replica revocation latency, through the revocation feed.
    Propagation,
    /// GET requests through the legacy-bridge proxy with one access token.
    Proxy,
    /// GET the authorization-server metadata: no signature, policy or store, the floor under the others.
    Metadata,
    /// As `exchange`, each request with a fresh DPoP proof (RFC 9449): tokens bound to a key.
    ExchangeDpop,
    /// As `proxy`, with a DPoP-bound token and a fresh proof per request.
    ProxyDpop,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Self::TaskStart => "task-start",
            Self::Exchange => "exchange",
            Self::Introspect => "introspect",
            Self::Revoke => "revoke",
            Self::Propagation => "propagation",
            Self::Proxy => "proxy",
            Self::Metadata => "metadata",
            Self::ExchangeDpop => "exchange-dpop",
            Self::ProxyDpop => "proxy-dpop",
        }
    }
}

/// The command line.
#[derive(Debug, clap::Parser)]
#[command(
    name = "scrip-bench",
    version,
    about = "Drives a real scrip over keep-alive HTTP/1.1 and reports throughput, latency and memory per scenario"
)]
pub struct Args {
    /// The scrip binary to start (default: target/release/scrip if present, else target/debug/scrip).
    #[arg(long, value_name = "PATH", conflicts_with = "url")]
    pub scrip: Option<PathBuf>,
    /// Target a scrip already running on loopback instead (e.g. http://127.0.0.1:7070).
    #[arg(long, requires = "identity_key")]
    pub url: Option<url::Url>,
    /// With --url: an ES256 PKCS#8 (DER) key whose public JWK the server trusts for --identity-issuer (kid = RFC 7638 thumbprint).
    #[arg(long, value_name = "FILE")]
    pub identity_key: Option<PathBuf>,
    /// The issuer of the identities signed with --identity-key.
    #[arg(long, default_value = K8S_ISSUER)]
    pub identity_issuer: String,
    /// Print the JWKS of --identity-key (for the server's `jwks_file`) and exit.
    #[arg(long, requires = "identity_key")]
    pub print_jwks: bool,
    /// Scenarios to run, in order.
    #[arg(long, value_delimiter = ',', default_values = ["task-start", "exchange", "exchange-dpop", "introspect", "revoke", "proxy", "proxy-dpop", "metadata"])]
    pub scenario: Vec<Scenario>,
    /// Concurrent keep-alive connections.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Length of each timed run.
    #[arg(long, default_value = "10s", value_parser = humantime_secs)]
    pub duration: Duration,
    /// Pre-minted identities cycled through by `task-start`. scrip keeps
    /// the last 10,000 identities it verified, so with fewer only each one's
    /// first start verifies its ES256 signature (as an agent reusing its
    /// identity token); with more than 10,000, every start does.
    #[arg(long, default_value_t = 1000)]
    pub identities: usize,
    /// Access tokens issued before `revoke` (each revoked once; the run ends early if they run out).
    #[arg(long, default_value_t = 30_000)]
    pub revoke_tokens: usize,
    /// Cedar policies in the generated configuration: the repository's plus fillers.
    #[arg(long, default_value_t = 20)]
    pub policies: usize,
    /// Where the repository's policies are.
    #[arg(long, value_name = "DIR")]
    pub policy_dir: Option<PathBuf>,
    /// Client runtime threads (the client shares the machine with the server).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    /// Skip the restart on the existing store (time-to-ready, idle RSS) at the end.
    #[arg(long)]
    pub no_restart: bool,
    /// A short run for CI: every scenario for 2 s on 8 connections, few tokens.
    #[arg(long)]
    pub smoke: bool,
    /// Run the started scrip on this PostgreSQL database (shared store).
    #[arg(long, value_name = "URL", conflicts_with = "url")]
    pub database_url: Option<String>,
    /// With --database-url: how many replicas to start.
    #[arg(long, default_value_t = 1, requires = "database_url")]
    pub replicas: usize,
    /// Revocations timed by `propagation`.
    #[arg(long, default_value_t = 200)]
    pub propagations: usize,
    /// Send at this many requests per second in all, on a fixed schedule (open loop), instead of back to back; latency then counts from when each request was due if it went out late behind an earlier answer, and rtt_p50, rtt_p99 and rtt_max give the same requests' round trips from when each was sent.
    #[arg(long, value_name = "PER_SECOND", value_parser = positive_rate)]
    pub rate: Option<f64>,
    /// Before starting scrip, write this many past (ended) tasks into its new store.
    #[arg(long, default_value_t = 0, conflicts_with = "url")]
    pub prefill_tasks: u64,
    /// With --prefill-tasks: about this many audit records in all (at least two per task).
    #[arg(long, default_value_t = 0, requires = "prefill_tasks")]
    pub prefill_records: u64,
    /// The started scrip's `signing_algorithm`: ES256 (scrip's default), EdDSA or RS256.
    #[arg(long, value_name = "ALG", conflicts_with = "url", value_parser = signing_algorithm)]
    pub signing_algorithm: Option<SigningAlgorithm>,
    /// After each scenario, print where each thread's time went: cores on a CPU and cores runnable but waiting for one, per thread name, for the server (replica 0) and this generator (from /proc/<pid>/task/*/schedstat).
    #[arg(long)]
    pub sched: bool,
    /// For exchange-dpop and proxy-dpop: DPoP proofs made before the run (each is used once; the run stops when they run out, and they are good for 60 s, so these scenarios run at most 50 s).
    #[arg(long, default_value_t = 150_000, value_parser = at_least_one)]
    pub dpop_proofs: usize,
    /// For exchange-dpop and proxy-dpop: the proofs' algorithm, ES256 or EdDSA.
    #[arg(long, value_name = "ALG", default_value = "ES256", value_parser = dpop_algorithm)]
    pub dpop_algorithm: DpopAlgorithm,
}

fn dpop_algorithm(s: &str) -> std::result::Result<DpopAlgorithm, String> {
    match s {
        "ES256" => Ok(DpopAlgorithm::Es256),
        "EdDSA" => Ok(DpopAlgorithm::EdDsa),
        _ => Err(format!("`{s}` is not ES256 or EdDSA")),
    }
}

fn signing_algorithm(s: &str) -> std::result::Result<SigningAlgorithm, String> {
    s.parse()
        .map_err(|_| format!("`{s}` is not ES256, EdDSA or RS256"))
}

fn at_least_one(s: &str) -> std::result::Result<usize, String> {
    s.parse::<usize>()
        .ok()
        .filter(|n| *n >= 1)
        .ok_or_else(|| format!("`{s}` is not a count of at least 1"))
}

/// The longest run of a scenario whose DPoP proofs are made before it: a
/// proof is good for `MAX_PROOF_AGE` (60 s) after it is made.
const MAX_DPOP_RUN: Duration = Duration::from_secs(50);

fn positive_rate(s: &str) -> std::result::Result<f64, String> {
    s.parse::<f64>()
        .ok()
        .filter(|r| r.is_finite() && *r >= 1.0)
        .ok_or_else(|| format!("`{s}` is not a rate of at least 1 request per second"))
}

fn humantime_secs(s: &str) -> std::result::Result<Duration, String> {
    let (num, scale) = if let Some(ms) = s.strip_suffix("ms") {
        (ms, 0.001)
    } else {
        (s.strip_suffix('s').unwrap_or(s), 1.0)
    };
    num.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0 && *v * scale <= 600.0)
        .map(|v| Duration::from_secs_f64(v * scale))
        .ok_or_else(|| format!("`{s}` is not a duration such as 10s or 500ms (at most 600s)"))
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn default_scrip() -> PathBuf {
    let release = workspace_root().join("target/release/scrip");
    if release.exists() {
        release
    } else {
        workspace_root().join("target/debug/scrip")
    }
}

fn form(pairs: &[(&str, &str)]) -> Bytes {
    Bytes::from(
        form_urlencoded::Serializer::new(String::new())
            .extend_pairs(pairs.iter())
            .finish(),
    )
}

fn start_task_form(identity: &str, scope: &str) -> Bytes {
    let details = json!({ "purpose": PURPOSE, "environment": "dev" }).to_string();
    form(&[
        ("grant_type", TOKEN_EXCHANGE),
        ("subject_token", identity),
        ("subject_token_type", JWT),
        ("requested_token_type", TXN),
        ("scope", scope),
        ("request_details", &details),
    ])
}

/// The token endpoint, as the metadata names it: a DPoP proof's `htu`.
async fn token_endpoint(target: &Target) -> Result<String> {
    let (status, body) = load::get(target, METADATA, None).await?;
    if status != 200 {
        return Err(format!("metadata answered {status}").into());
    }
    let v: Value = serde_json::from_slice(&body)?;
    v.get("token_endpoint")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| "metadata has no token_endpoint".into())
}

/// `n` DPoP proofs by `key` for `method` `url` (with the access token's
/// hash when given), made on every core before the run.
fn mint_proofs(
    key: &DpopKey,
    n: usize,
    method: &str,
    url: &str,
    token: Option<&str>,
) -> Result<Vec<HeaderValue>> {
    let threads = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let per = n.div_ceil(threads);
    let started = std::time::Instant::now();
    let parts: Vec<Vec<String>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads)
            .map(|t| {
                let count = per.min(n.saturating_sub(t * per));
                scope.spawn(move || {
                    (0..count)
                        .map(|_| key.proof(method, url, token))
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_default())
            .collect()
    });
    let proofs = parts
        .into_iter()
        .flatten()
        .map(|p| HeaderValue::from_str(&p))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    if proofs.len() != n {
        return Err("minting DPoP proofs failed".into());
    }
    say(&format!(
        "# {n} DPoP proofs ({}) made in {:.1} s",
        key.algorithm().name(),
        started.elapsed().as_secs_f64()
    ));
    Ok(proofs)
}

fn exchange_form(task_token: &str) -> Bytes {
    exchange_form_for(task_token, "github")
}

fn exchange_form_for(task_token: &str, tool: &str) -> Bytes {
    form(&[
        ("grant_type", TOKEN_EXCHANGE),
        ("subject_token", task_token),
        ("subject_token_type", TXN),
        ("requested_token_type", ACCESS),
        ("audience", tool),
        ("scope", "read"),
    ])
}

fn access_token_of(answer: &[u8]) -> Result<String> {
    let v: Value = serde_json::from_slice(answer)?;
    v.get("access_token")
        .and_then(Value::as_str)
        .map(str::to_owned)
        .ok_or_else(|| Error::from("an answer without access_token"))
}

/// One summary line.
#[derive(Debug)]
pub struct Summary {
    /// The scenario's name.
    pub scenario: &'static str,
    /// Connections used.
    pub connections: usize,
    /// What was measured.
    pub outcome: Outcome,
    /// The server's peak RSS during the run, KiB (0 when unknown).
    pub peak_rss_kib: u64,
    /// Whether the peak was reset before the run (else it is the peak
    /// since the server started).
    pub peak_reset: bool,
    /// CPU the server used during the run, clock ticks (`None`: unknown).
    pub server_ticks: Option<u64>,
    /// CPU this generator used during the run, clock ticks.
    pub client_ticks: u64,
    /// The fixed rate offered, requests/s (`None`: back to back).
    pub rate: Option<f64>,
    /// The whole machine's CPU time during the run (`None`: not measured).
    pub machine: Option<server::MachineTicks>,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let o = &self.outcome;
        let mut lat = o.latencies_us.clone();
        let p = load::percentiles(&mut lat);
        let secs = o.elapsed.as_secs_f64();
        #[expect(clippy::cast_precision_loss, reason = "a rate for display")]
        let rps = if secs > 0.0 {
            o.sent as f64 / secs
        } else {
            0.0
        };
        write!(
            f,
            "{:<10} conns={:<3} secs={:5.2} requests={:<7} rps={:8.0} p50={:6.2}ms p90={:6.2}ms p99={:6.2}ms max={:7.2}ms errors={} peak_rss={}",
            self.scenario,
            self.connections,
            secs,
            o.sent,
            rps,
            p.p50,
            p.p90,
            p.p99,
            p.max,
            o.errors,
            mib(self.peak_rss_kib),
        )?;
        if self.peak_rss_kib > 0 && !self.peak_reset {
            f.write_str("*")?;
        }
        let cores = |ticks: u64| {
            #[expect(clippy::cast_precision_loss, reason = "a ratio for display")]
            let c = ticks as f64 / server::TICKS_PER_SECOND / secs.max(1e-9);
            c
        };
        if let Some(t) = self.server_ticks {
            write!(f, " server_cpu={:.2}", cores(t))?;
        }
        write!(f, " client_cpu={:.2}", cores(self.client_ticks))?;
        if let Some(m) = self.machine.filter(|m| m.total > 0) {
            #[expect(clippy::cast_precision_loss, reason = "a share for display")]
            let share = |t: u64| 100.0 * t as f64 / m.total as f64;
            write!(
                f,
                " idle={:.0}% steal={:.0}%",
                share(m.idle),
                share(m.steal)
            )?;
        }
        if let Some(r) = self.rate {
            write!(f, " offered={r:.0}/s")?;
            let mut rtt = o.round_trips_us.clone();
            let p = load::percentiles(&mut rtt);
            write!(
                f,
                " rtt_p50={:.2}ms rtt_p99={:.2}ms rtt_max={:.2}ms behind={}",
                p.p50, p.p99, p.max, o.behind
            )?;
        }
        if o.exhausted {
            write!(f, " (ran out of single-use tokens or proofs)")?;
        }
        if let Some(e) = &o.first_error {
            write!(f, " first_error={e:?}")?;
        }
        Ok(())
    }
}

fn mib(kib: u64) -> String {
    if kib == 0 {
        "n/a".into()
    } else {
        #[expect(clippy::cast_precision_loss, reason = "a size for display")]
        let m = kib as f64 / 1024.0;
        format!("{m:.1}MiB")
    }
}

#[expect(clippy::print_stdout, reason = "the report is the program's output")]
fn say(line: &str) {
    println!("{line}");
}

/// Parses the command line's intent and runs the benchmark. Returns whether
/// every request succeeded.
///
/// # Errors
/// When the benchmark itself cannot run (no server, bad key, ...).
pub fn main(mut args: Args) -> Result<bool> {
    if args.smoke {
        args.duration = Duration::from_secs(2);
        args.connections = args.connections.min(8);
        args.identities = args.identities.min(64);
        args.revoke_tokens = args.revoke_tokens.min(400);
        args.propagations = args.propagations.min(20);
        args.dpop_proofs = args.dpop_proofs.min(4_000);
    }
    let dpop = args
        .scenario
        .iter()
        .any(|s| matches!(s, Scenario::ExchangeDpop | Scenario::ProxyDpop));
    if dpop && args.duration > MAX_DPOP_RUN {
        return Err(format!(
            "exchange-dpop and proxy-dpop make their proofs before the run, and a proof is good for 60 s: use --duration {}s or less for them",
            MAX_DPOP_RUN.as_secs()
        )
        .into());
    }
    if args.print_jwks {
        let idp = load_identity_key(&args)?;
        say(&idp.jwks().to_string());
        return Ok(true);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()?;
    runtime.block_on(run(&args))
}

fn load_identity_key(args: &Args) -> Result<Idp> {
    let path = args
        .identity_key
        .as_ref()
        .ok_or("--identity-key is needed")?;
    let der = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    Idp::from_pkcs8(&args.identity_issuer, &der)
}

/// A server this run started.
#[derive(Debug)]
struct Started {
    setup: server::Setup,
    running: server::Running,
    /// Replicas 1.. on a shared store.
    others: Vec<server::Running>,
    scrip: PathBuf,
}

async fn run(args: &Args) -> Result<bool> {
    let mut upstream = None;
    let (idp, targets, server) = if let Some(url) = &args.url {
        let loopback = matches!(url.host_str(), Some("127.0.0.1" | "localhost"));
        if !loopback || url.scheme() != "http" {
            return Err("--url must be http://127.0.0.1:<port>".into());
        }
        let port = url.port_or_known_default().ok_or("--url needs a port")?;
        (
            load_identity_key(args)?,
            vec![Target::loopback(port)?],
            None,
        )
    } else {
        let (idp, _) = Idp::generate(K8S_ISSUER)?;
        let policy_src = args
            .policy_dir
            .clone()
            .unwrap_or_else(|| workspace_root().join("policies"));
        let shared = args.database_url.as_deref().map(|u| (u, args.replicas));
        // The proxy scenario's upstream and the key it demands.
        let key = scrip_jose::random_id()?;
        let legacy = upstream::start(key.clone()).await?;
        let setup = server::prepare(
            &policy_src,
            args.policies,
            &idp,
            shared,
            legacy.port,
            args.signing_algorithm.map(SigningAlgorithm::as_str),
        )?;
        upstream = Some(legacy);
        let target = Target::loopback(setup.port)?;
        let scrip = args.scrip.clone().unwrap_or_else(default_scrip);
        // First: it makes the store and its keys, the audit checkpoint key
        // among them, which scrip refuses to make beside a store that
        // already holds records (a store restored without its key).
        server::set_secret(&scrip, &setup, &key)?;
        if args.prefill_tasks > 0 {
            let data = setup.dir.path().join("data");
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(&data)?;
            let started = std::time::Instant::now();
            let written = prefill::fill(
                args.database_url.as_deref(),
                &data.join("scrip.db"),
                args.prefill_tasks,
                args.prefill_records,
                |n, secs| say(&format!("# prefill: {n} writes after {secs} s")),
            )
            .await?;
            let size = std::fs::metadata(data.join("scrip.db")).map_or(0, |m| m.len());
            say(&format!(
                "# prefilled {} tasks, {written} writes in {:.0} s; store {:.1} MiB",
                args.prefill_tasks,
                started.elapsed().as_secs_f64(),
                size as f64 / (1024.0 * 1024.0)
            ));
            if args.database_url.is_none() {
                let waited =
                    prefill::until_closed(&data.join("scrip.db"), Duration::from_secs(60)).await?;
                say(&format!(
                    "# the prefill's connections closed {:.1} ms after its last commit",
                    waited.as_secs_f64() * 1000.0
                ));
                // The commits are durable, but the kernel may still be writing
                // the checkpointed pages back: flush them now, so the timed
                // runs do not share the disk with that.
                let synced = std::time::Instant::now();
                std::fs::File::open(data.join("scrip.db"))?.sync_all()?;
                say(&format!(
                    "# synced the prefilled store in {:.1} s",
                    synced.elapsed().as_secs_f64()
                ));
            }
        }
        let running = server::start(&scrip, &setup, &target).await?;
        let mut targets = vec![target];
        let mut others = Vec::new();
        for (config, port) in &setup.replicas {
            let t = Target::loopback(*port)?;
            others.push(server::start_with(&scrip, config, &setup, &t).await?);
            targets.push(t);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        if args.database_url.is_none()
            && server::filesystem(setup.dir.path())
                .is_some_and(|fs| matches!(fs.as_str(), "tmpfs" | "ramfs"))
        {
            say(&format!(
                "# warning: the store is in memory ({}): its fsyncs do nothing, so these figures are not those of a durable audit; set TMPDIR to a directory on disk",
                setup.dir.path().display()
            ));
        }
        let mem = server::memory(running.pid);
        say(&format!(
            "# scrip {} pid {} | {} Cedar policies | signs {} | store: {} {} | ready after {:.1} ms | idle rss {}",
            scrip.display(),
            running.pid,
            setup.policies,
            args.signing_algorithm.unwrap_or_default(),
            if args.prefill_tasks > 0 {
                "prefilled"
            } else {
                "new"
            },
            if args.database_url.is_some() {
                format!("PostgreSQL, {} replicas", targets.len())
            } else {
                format!(
                    "SQLite on {}",
                    server::filesystem(setup.dir.path())
                        .unwrap_or_else(|| "an unknown filesystem".into())
                )
            },
            running.ready_after.as_secs_f64() * 1000.0,
            mib(mem.rss_kib)
        ));
        (
            idp,
            targets,
            Some(Started {
                setup,
                running,
                others,
                scrip,
            }),
        )
    };
    let target = targets.first().ok_or("no target")?.clone();
    let pid = server.as_ref().map(|s| s.running.pid);
    let peak = || pid.map_or(0, |p| server::memory(p).peak_kib);
    // The peak from here on: setup (identities, tokens) is not the run's.
    let reset = || pid.is_some_and(server::reset_peak);

    // Setup, before any timed run.
    let mut identities = Vec::with_capacity(args.identities);
    for i in 0..args.identities.max(1) {
        identities.push(idp.kubernetes("agents", &format!("agent-{i}"))?);
    }
    let caller = idp.kubernetes("resource-servers", "github-proxy")?;
    let first = identities.first().ok_or("no identities")?;
    let (status, answer) = load::once(
        &target,
        "/token",
        None,
        start_task_form(
            first,
            if upstream.is_some() {
                "github:read github:write jira:read legacy:read"
            } else {
                "github:read github:write jira:read"
            },
        ),
    )
    .await?;
    if status != 200 {
        return Err(format!(
            "starting the setup task answered {status}: {}",
            String::from_utf8_lossy(&answer)
        )
        .into());
    }
    let task_token = access_token_of(&answer)?;

    let mut ok = true;
    for scenario in &args.scenario {
        if *scenario == Scenario::Propagation {
            let last = targets.last().unwrap_or(&target);
            let machine_before = server::MachineTicks::now();
            let client_before = server::cpu_ticks("self");
            let peak_reset = reset();
            let outcome =
                propagation(&target, last, &identities, &caller, args.propagations).await?;
            ok &= outcome.errors == 0;
            say(&Summary {
                scenario: scenario.name(),
                connections: 1,
                outcome,
                peak_rss_kib: peak(),
                peak_reset,
                server_ticks: None,
                client_ticks: server::cpu_ticks("self").saturating_sub(client_before),
                rate: None,
                machine: Some(machine_before.until(server::MachineTicks::now())),
            }
            .to_string());
            continue;
        }
        // The revoke scenario's tokens, checked after the run.
        let mut revoked = Vec::new();
        let workload = match scenario {
            Scenario::TaskStart => Workload {
                method: Method::POST,
                path: "/token",
                authorization: None,
                bodies: identities
                    .iter()
                    .map(|id| start_task_form(id, "github:read github:write"))
                    .collect(),
                once: false,
                proofs: Vec::new(),
                expect: Some(ISSUED),
            },
            Scenario::Exchange => Workload {
                method: Method::POST,
                path: "/token",
                authorization: None,
                bodies: vec![exchange_form(&task_token)],
                once: false,
                proofs: Vec::new(),
                expect: Some(ISSUED),
            },
            Scenario::Propagation => continue,
            Scenario::Introspect => {
                let tokens = issue(&target, &task_token, 64, args.connections).await?;
                Workload {
                    method: Method::POST,
                    path: "/introspect",
                    authorization: Some(HeaderValue::from_str(&format!("Bearer {caller}"))?),
                    bodies: tokens.iter().map(|t| form(&[("token", t)])).collect(),
                    once: false,
                    proofs: Vec::new(),
                    // Inactive is a 200 too: the tokens are live.
                    expect: Some("\"active\":true"),
                }
            }
            Scenario::Proxy => {
                if upstream.is_none() {
                    say("# proxy: skipped (it needs a scrip that scrip-bench starts, not --url)");
                    continue;
                }
                let (status, answer) = load::once(
                    &target,
                    "/token",
                    None,
                    exchange_form_for(&task_token, server::UPSTREAM),
                )
                .await?;
                if status != 200 {
                    return Err(format!(
                        "a {} token: {status} {}",
                        server::UPSTREAM,
                        String::from_utf8_lossy(&answer)
                    )
                    .into());
                }
                let token = access_token_of(&answer)?;
                Workload {
                    method: Method::GET,
                    path: "/proxy/legacy/bench",
                    authorization: Some(HeaderValue::from_str(&format!("Bearer {token}"))?),
                    bodies: vec![Bytes::new()],
                    once: false,
                    proofs: Vec::new(),
                    // The upstream's own answer, which needs its key.
                    expect: Some("ok"),
                }
            }
            Scenario::ExchangeDpop => {
                let endpoint = token_endpoint(&target).await?;
                let key = DpopKey::with(args.dpop_algorithm);
                Workload {
                    method: Method::POST,
                    path: "/token",
                    authorization: None,
                    bodies: vec![exchange_form(&task_token)],
                    once: false,
                    proofs: mint_proofs(&key, args.dpop_proofs, "POST", &endpoint, None)?,
                    // A server that ignored the proof would answer a bearer token.
                    expect: Some("\"token_type\":\"DPoP\""),
                }
            }
            Scenario::ProxyDpop => {
                if upstream.is_none() {
                    say(
                        "# proxy-dpop: skipped (it needs a scrip that scrip-bench starts, not --url)",
                    );
                    continue;
                }
                let endpoint = token_endpoint(&target).await?;
                let key = DpopKey::with(args.dpop_algorithm);
                let proof = key.proof("POST", &endpoint, None);
                let (status, answer) = load::once_with_proof(
                    &target,
                    "/token",
                    exchange_form_for(&task_token, server::UPSTREAM),
                    &HeaderValue::from_str(&proof)?,
                )
                .await?;
                if status != 200 {
                    return Err(format!(
                        "a DPoP-bound {} token: {status} {}",
                        server::UPSTREAM,
                        String::from_utf8_lossy(&answer)
                    )
                    .into());
                }
                let token = access_token_of(&answer)?;
                let issuer = endpoint.trim_end_matches("/token");
                let url = format!("{issuer}/proxy/legacy/bench");
                Workload {
                    method: Method::GET,
                    path: "/proxy/legacy/bench",
                    authorization: Some(HeaderValue::from_str(&format!("DPoP {token}"))?),
                    bodies: vec![Bytes::new()],
                    once: false,
                    proofs: mint_proofs(&key, args.dpop_proofs, "GET", &url, Some(&token))?,
                    expect: Some("ok"),
                }
            }
            Scenario::Metadata => Workload {
                method: Method::GET,
                path: METADATA,
                authorization: None,
                bodies: vec![Bytes::new()],
                once: false,
                proofs: Vec::new(),
                expect: Some("\"issuer\""),
            },
            Scenario::Revoke => {
                revoked = issue(&target, &task_token, args.revoke_tokens, args.connections).await?;
                Workload {
                    method: Method::POST,
                    path: "/revoke",
                    authorization: None,
                    bodies: revoked.iter().map(|t| form(&[("token", t)])).collect(),
                    once: true,
                    proofs: Vec::new(),
                    // Revocation answers 200 with nothing whatever it did:
                    // checked after the run.
                    expect: None,
                }
            }
        };
        let peak_reset = reset();
        let server_before = pid.map(|p| server::cpu_ticks(&p.to_string()));
        let client_before = server::cpu_ticks("self");
        let machine_before = server::MachineTicks::now();
        let sched_before = args.sched.then(|| sched_snapshots(pid));
        let started = std::time::Instant::now();
        let mut outcome = load::drive(
            &targets,
            workload,
            args.connections,
            args.duration,
            false,
            args.rate,
        )
        .await?;
        if !revoked.is_empty() {
            let sent = usize::try_from(outcome.sent).unwrap_or(usize::MAX);
            check_revoked(
                &target,
                &caller,
                revoked.get(..sent).unwrap_or(&revoked),
                &mut outcome,
            )
            .await?;
        }
        let server_ticks = pid
            .zip(server_before)
            .map(|(p, b)| server::cpu_ticks(&p.to_string()).saturating_sub(b));
        let client_ticks = server::cpu_ticks("self").saturating_sub(client_before);
        let machine = machine_before.until(server::MachineTicks::now());
        let sched_after = args.sched.then(|| sched_snapshots(pid));
        let secs = started.elapsed().as_secs_f64();
        ok &= outcome.errors == 0;
        say(&Summary {
            scenario: scenario.name(),
            connections: args.connections,
            outcome,
            peak_rss_kib: peak(),
            peak_reset,
            server_ticks,
            client_ticks,
            rate: args.rate,
            machine: Some(machine),
        }
        .to_string());
        if let (Some((sb, cb)), Some((sa, ca))) = (sched_before, sched_after) {
            let server = if pid.is_some() {
                sched::describe(&sched::groups(&sb, &sa, secs))
            } else {
                "not started here".to_owned()
            };
            say(&format!(
                "# sched {}: server {server} || generator {} (cores; wait = runnable, not running)",
                scenario.name(),
                sched::describe(&sched::groups(&cb, &ca, secs)),
            ));
        }
    }

    if let Some(Started {
        setup,
        running,
        others,
        scrip,
    }) = server
    {
        for other in others {
            other.stop().await?;
        }
        running.stop().await?;
        if !args.no_restart {
            let size = dir_size(&setup.dir.path().join("data"));
            let again = server::start(&scrip, &setup, &target).await?;
            tokio::time::sleep(Duration::from_secs(1)).await;
            let mem = server::memory(again.pid);
            say(&format!(
                "# restart on the existing store ({:.1} MiB) | ready after {:.1} ms | idle rss {}",
                size as f64 / 1_048_576.0,
                again.ready_after.as_secs_f64() * 1000.0,
                mib(mem.rss_kib)
            ));
            again.stop().await?;
        }
    }
    Ok(ok)
}

/// The server's (when this run started it) and this generator's threads.
fn sched_snapshots(pid: Option<u32>) -> (sched::Snapshot, sched::Snapshot) {
    (
        pid.map(|p| sched::snapshot(&p.to_string()))
            .unwrap_or_default(),
        sched::snapshot("self"),
    )
}

/// Introspects up to 16 of the `revoked` tokens, spread over them, after
/// the run (not timed): each must be inactive, since revocation answers 200
/// whatever it did. A token still active counts as an error of the run.
async fn check_revoked(
    target: &Target,
    caller: &str,
    revoked: &[String],
    outcome: &mut load::Outcome,
) -> Result<()> {
    let auth = HeaderValue::from_str(&format!("Bearer {caller}"))?;
    let step = revoked.len().div_ceil(16).max(1);
    for token in revoked.iter().step_by(step) {
        let (status, answer) = load::once(
            target,
            "/introspect",
            Some(&auth),
            form(&[("token", token)]),
        )
        .await?;
        if status != 200 || answer.as_ref() != br#"{"active":false}"# {
            outcome.fail(format!(
                "a revoked token introspected as {status} {}",
                String::from_utf8_lossy(&answer)
            ));
        }
    }
    Ok(())
}

/// Issues `n` access tokens from `task_token` (not timed).
async fn issue(
    target: &Target,
    task_token: &str,
    n: usize,
    connections: usize,
) -> Result<Vec<String>> {
    let body = exchange_form(task_token);
    let workload = Workload {
        method: Method::POST,
        path: "/token",
        authorization: None,
        bodies: vec![body; n],
        once: true,
        proofs: Vec::new(),
        expect: Some(ISSUED),
    };
    let outcome = load::drive(
        std::slice::from_ref(target),
        workload,
        connections,
        SETUP_LIMIT,
        true,
        None,
    )
    .await?;
    if outcome.errors > 0 {
        return Err(format!(
            "issuing tokens before the run failed: {}",
            outcome.first_error.unwrap_or_default()
        )
        .into());
    }
    outcome.answers.iter().map(|a| access_token_of(a)).collect()
}

/// `rounds` times: start a task on `first`, wait on `last`'s revocation
/// feed, revoke the task through `first`, and time from sending the
/// revocation until the feed on `last` answers with it.
async fn propagation(
    first: &Target,
    last: &Target,
    identities: &[String],
    caller: &str,
    rounds: usize,
) -> Result<load::Outcome> {
    let auth = HeaderValue::from_str(&format!("Bearer {caller}"))?;
    let mut out = load::Outcome::default();
    let mut revoke_us = Vec::with_capacity(rounds);
    let started = std::time::Instant::now();
    // Followed to its end first (it answers a page at a time, oldest
    // first): what comes after the cursor is then news.
    let mut cursor = 0;
    loop {
        let (status, body) =
            load::get(last, &format!("/revocations?after={cursor}"), Some(&auth)).await?;
        let page: Value = serde_json::from_slice(&body)?;
        if status != 200 {
            return Err(format!("the feed answered {status}").into());
        }
        cursor = page
            .get("cursor")
            .and_then(Value::as_i64)
            .ok_or("the feed answered without a cursor")?;
        if page.get("more") != Some(&Value::Bool(true)) {
            break;
        }
    }
    for round in 0..rounds {
        let identity = identities
            .get(round % identities.len().max(1))
            .ok_or("no identities")?;
        let (status, answer) = load::once(
            first,
            "/token",
            None,
            start_task_form(identity, "github:read"),
        )
        .await?;
        if status != 200 {
            out.fail(format!("task start answered {status}"));
            continue;
        }
        let task = access_token_of(&answer)?;
        // scrip issued it just now: its claims are read, not verified.
        let txn = scrip_jose::claims_of_verified::<Value>(&task)
            .and_then(|c| c.get("txn").and_then(Value::as_str).map(str::to_owned))
            .ok_or("a task token without `txn`")?;
        let waiting = {
            let last = last.clone();
            let auth = auth.clone();
            tokio::spawn(async move { revocation_of(&last, &auth, cursor, &txn).await })
        };
        // Let the long-poll reach the server before the revocation.
        tokio::time::sleep(Duration::from_millis(20)).await;
        let sent = std::time::Instant::now();
        out.sent += 1;
        let (status, _) = load::once(first, "/revoke", None, form(&[("token", &task)])).await?;
        revoke_us.push(u32::try_from(sent.elapsed().as_micros()).unwrap_or(u32::MAX));
        if status != 200 {
            out.fail(format!("revoke answered {status}"));
        }
        let (arrived, next) = match waiting.await? {
            Ok(found) => found,
            Err(e) => {
                out.fail(e.to_string());
                continue;
            }
        };
        cursor = next;
        let Some(took) = arrived.checked_duration_since(sent) else {
            out.fail("the feed answered with the revocation before it was sent".into());
            continue;
        };
        out.latencies_us
            .push(u32::try_from(took.as_micros()).unwrap_or(u32::MAX));
    }
    out.elapsed = started.elapsed();
    let p = load::percentiles(&mut revoke_us);
    say(&format!(
        "# propagation: the revocation itself answered in p50={:.2}ms p99={:.2}ms (included in the line below)",
        p.p50, p.p99
    ));
    Ok(out)
}

/// Long-polls `last`'s feed after `cursor` until it answers with the end
/// of task `txn` (within 10 s): when that answer arrived, and the cursor
/// after it.
async fn revocation_of(
    last: &Target,
    auth: &HeaderValue,
    mut cursor: i64,
    txn: &str,
) -> Result<(std::time::Instant, i64)> {
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let path = format!("/revocations?after={cursor}&wait=10");
        let (status, body) = load::get(last, &path, Some(auth)).await?;
        let arrived = std::time::Instant::now();
        if status != 200 {
            return Err(format!("the feed answered {status}").into());
        }
        let feed: Value = serde_json::from_slice(&body)?;
        cursor = feed.get("cursor").and_then(Value::as_i64).unwrap_or(cursor);
        let found = feed
            .get("events")
            .and_then(Value::as_array)
            .is_some_and(|events| {
                events.iter().any(|e| {
                    e.get("type").and_then(Value::as_str) == Some("task")
                        && e.get("txn").and_then(Value::as_str) == Some(txn)
                })
            });
        if found {
            return Ok((arrived, cursor));
        }
        if arrived >= deadline {
            return Err(format!("the end of task {txn} did not reach the feed within 10 s").into());
        }
    }
}

fn dir_size(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok()?.metadata().ok())
                .filter(std::fs::Metadata::is_file)
                .map(|m| m.len())
                .sum()
        })
        .unwrap_or(0)
}
