//! A real scrip, started from its binary with a generated configuration in a
//! temporary directory: a trusted test identity provider (`jwks_file`),
//! three tools and a legacy upstream behind the proxy, the repository's
//! policies plus filler policies up to a total, and an embedded store.

use std::fmt::Write as _;
use std::os::unix::fs::PermissionsExt as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use tokio::process::{Child, Command};

use crate::idp::{AUDIENCE, Idp};
use crate::load::Target;
use crate::{Error, Result};

/// The tool and upstream of the `proxy` scenario.
pub const UPSTREAM: &str = "legacy";

/// The longest a server may take to answer after it is started.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest a server may take to exit after SIGTERM.
const STOP_TIMEOUT: Duration = Duration::from_secs(10);

/// A generated configuration in a temporary directory.
#[derive(Debug)]
pub struct Setup {
    /// Holds the configuration, policies, store and log.
    pub dir: tempfile::TempDir,
    /// The configuration file.
    pub config: PathBuf,
    /// Where the server's output goes.
    pub log: PathBuf,
    /// The address the server listens on.
    pub port: u16,
    /// How many Cedar policies the configuration has.
    pub policies: usize,
    /// With a shared store: the other replicas' configuration files and
    /// ports (replica 0 is `config` and `port`).
    pub replicas: Vec<(PathBuf, u16)>,
}

/// Counts the `permit`/`forbid` statements of a Cedar file.
fn count_policies(text: &str) -> usize {
    text.lines()
        .map(str::trim_start)
        .filter(|l| l.starts_with("permit") || l.starts_with("forbid"))
        .count()
}

/// A policy that never matches the benchmark's agents: team policies that
/// name one of 100 other tools (which the policy selection skips for the
/// benchmark's tools), and freeze forbids that name no tool (which Cedar
/// evaluates on every `write`, `delete` or `execute`).
fn filler(i: usize) -> String {
    let tool = i % 100;
    match i % 3 {
        0 => format!(
            "@id(\"bench-team-{i}-read\")\npermit (principal, action == Action::\"read\", resource == Tool::\"tool-{tool}\")\nwhen {{\n  principal has repository &&\n  principal.repository like \"team-{i}/*\" &&\n  context.environment == \"staging\"\n}};\n"
        ),
        1 => format!(
            "@id(\"bench-freeze-{i}\")\nforbid (principal, action in [Action::\"write\", Action::\"delete\", Action::\"execute\"], resource)\nwhen {{ context.environment == \"freeze-{i}\" }};\n"
        ),
        _ => format!(
            "@id(\"bench-ns-{i}\")\npermit (principal, action == Action::\"read\", resource == Tool::\"tool-{tool}\")\nwhen {{\n  principal has namespace &&\n  principal.namespace == \"team-{i}\" &&\n  context.environment == \"dev\" &&\n  resource.hasTag(\"owner\") && resource.getTag(\"owner\") == \"team-{i}\"\n}};\n"
        ),
    }
}

/// Writes the configuration: the policies of `policy_src` (`*.cedar`,
/// `*.cedarschema`) plus fillers up to `total_policies`, the identity
/// provider's JWKS, and `scrip.toml` (with `signing_algorithm` when one
/// is given).
///
/// # Errors
/// On any I/O failure.
pub fn prepare(
    policy_src: &Path,
    total_policies: usize,
    idp: &Idp,
    shared: Option<(&str, usize)>,
    upstream_port: u16,
    signing_algorithm: Option<&str>,
) -> Result<Setup> {
    let dir = tempfile::Builder::new().prefix("scrip-bench-").tempdir()?;
    let policy_dir = dir.path().join("policies");
    std::fs::create_dir_all(&policy_dir)?;
    let mut policies = 0;
    for entry in std::fs::read_dir(policy_src)
        .map_err(|e| format!("policies {}: {e}", policy_src.display()))?
    {
        let path = entry?.path();
        let ext = path.extension().and_then(|e| e.to_str()).unwrap_or("");
        let Some(name) = path.file_name() else {
            continue;
        };
        if ext == "cedar" {
            policies += count_policies(&std::fs::read_to_string(&path)?);
        }
        if ext == "cedar" || ext == "cedarschema" {
            // `copy` keeps the source's mode: that of a checkout made under
            // umask 002 lets the group write (which scrip warns about).
            let copy = policy_dir.join(name);
            std::fs::copy(&path, &copy)?;
            std::fs::set_permissions(&copy, std::fs::Permissions::from_mode(0o644))?;
        }
    }
    let mut fillers = String::new();
    for i in policies..total_policies {
        fillers.push_str(&filler(i));
    }
    if !fillers.is_empty() {
        std::fs::write(policy_dir.join("bench-fillers.cedar"), &fillers)?;
    }
    let policies = policies.max(total_policies);
    std::fs::write(dir.path().join("idp-jwks.json"), idp.jwks().to_string())?;
    let port = scrip_testkit::free_port();
    let mut toml = String::new();
    if let Some(alg) = signing_algorithm {
        writeln!(toml, "signing_algorithm = \"{alg}\"")?;
    }
    if let Some((database_url, _)) = shared {
        // Every replica: one issuer, one database, one key-encryption key.
        let (_, kek) = scrip_jose::Kek::generate()?;
        crate::server::write_private(&dir.path().join("kek"), kek.as_bytes())?;
        writeln!(
            toml,
            "issuer = \"http://127.0.0.1:{port}\"\ndatabase_url = \"{database_url}\"\n\
             key_encryption_key_file = \"kek\""
        )?;
    }
    writeln!(
        toml,
        "policy_dir = \"policies\"\n\n\
         [[trusted_issuers]]\nissuer = \"{}\"\njwks_file = \"idp-jwks.json\"\n\
         audiences = [\"{AUDIENCE}\"]\nalgorithms = [\"ES256\"]\n",
        idp.issuer()
    )?;
    for (name, resource, actions, owner) in [
        (
            "github",
            "https://api.github.com",
            "\"read\", \"write\", \"delete\"",
            "platform",
        ),
        (
            "jira",
            "https://acme.atlassian.net",
            "\"read\", \"write\"",
            "team-2",
        ),
        (
            "deploy",
            "https://deploy.acme.example",
            "\"read\", \"execute\", \"delete\"",
            "team-5",
        ),
    ] {
        writeln!(
            toml,
            "[[tools]]\nname = \"{name}\"\nresource = \"{resource}\"\nactions = [{actions}]\nlabels = {{ owner = \"{owner}\" }}\n"
        )?;
    }
    // The `proxy` scenario's upstream: a tool of its own, its key injected
    // as `X-Api-Key` (set with `set_secret` before the server starts).
    writeln!(
        toml,
        "[[tools]]\nname = \"{UPSTREAM}\"\nresource = \"https://legacy.acme.example\"\nactions = [\"read\"]\n\n\
         [[upstreams]]\nname = \"{UPSTREAM}\"\nurl = \"http://127.0.0.1:{upstream_port}\"\n\
         inject = {{ header = \"X-Api-Key\" }}\n\n[upstreams.secrets.read]\nmax_age = 86400\n"
    )?;
    // The generator is one identity asking for every access token of a
    // run (and a thousand starting its tasks): each limit at its most, so
    // that what is measured is the service, the limits' own cost included
    // (scrip_config's MAX_PER_MINUTE and MAX_BURST).
    writeln!(
        toml,
        "[limits]\ntasks_per_minute = 60000000\ntask_burst = 1000000\n\
         access_tokens_per_minute = 60000000\naccess_token_burst = 1000000\n"
    )?;
    let config = dir.path().join("scrip.toml");
    std::fs::write(
        &config,
        format!("listen = \"127.0.0.1:{port}\"\ndata_dir = \"data\"\n{toml}"),
    )?;
    let mut replicas = Vec::new();
    for i in 1..shared.map_or(1, |(_, n)| n.max(1)) {
        let p = scrip_testkit::free_port();
        let file = dir.path().join(format!("scrip-{i}.toml"));
        std::fs::write(
            &file,
            format!("listen = \"127.0.0.1:{p}\"\ndata_dir = \"data-{i}\"\n{toml}"),
        )?;
        replicas.push((file, p));
    }
    let log = dir.path().join("scrip.log");
    // A scrip starting reads policy files changed less than half a second
    // before only once that half second has passed (a start racing a
    // deploy): the files just written are let age first, so that "ready
    // after" measures the start, not that wait.
    std::thread::sleep(std::time::Duration::from_millis(600));
    Ok(Setup {
        dir,
        config,
        log,
        port,
        policies,
        replicas,
    })
}

/// A running scrip process.
#[derive(Debug)]
pub struct Running {
    child: Child,
    /// Its process id.
    pub pid: u32,
    /// From spawning the process to its first answer.
    pub ready_after: Duration,
}

/// The last lines of the server's log, for error messages.
fn log_tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    let from = lines.len().saturating_sub(5);
    lines.get(from..).unwrap_or_default().join("\n")
}

/// Starts `scrip serve --config <setup.config>` and waits until it answers
/// its metadata endpoint.
///
/// # Errors
/// When it cannot be spawned, exits, or does not answer in time.
pub async fn start(scrip: &Path, setup: &Setup, target: &Target) -> Result<Running> {
    start_with(scrip, &setup.config, setup, target).await
}

/// Stores the upstream's `read` key with `scrip secret set`, the value on
/// standard input.
///
/// # Errors
/// When the command cannot run or fails.
pub fn set_secret(scrip: &Path, setup: &Setup, key: &str) -> Result<()> {
    use std::io::Write as _;
    let mut child = std::process::Command::new(scrip)
        .args(["secret", "set", UPSTREAM, "--action", "read", "--config"])
        .arg(&setup.config)
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", scrip.display()))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin.write_all(key.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if !out.status.success() {
        return Err(format!(
            "scrip secret set failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        )
        .into());
    }
    Ok(())
}

/// Writes a private file (mode 0600).
fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    f.write_all(data)?;
    Ok(())
}

/// Starts `scrip serve --config <config>` (one replica of `setup`).
///
/// # Errors
/// As [`start`].
pub async fn start_with(
    scrip: &Path,
    config: &Path,
    setup: &Setup,
    target: &Target,
) -> Result<Running> {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&setup.log)?;
    let started = Instant::now();
    let mut child = Command::new(scrip)
        .arg("serve")
        .arg("--config")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", scrip.display()))?;
    let pid = child.id().ok_or("the server exited at once")?;
    loop {
        if crate::load::probe(target).await {
            return Ok(Running {
                child,
                pid,
                ready_after: started.elapsed(),
            });
        }
        if let Some(status) = child.try_wait()? {
            return Err(Error::from(format!(
                "scrip exited ({status}) before it was ready:\n{}",
                log_tail(&setup.log)
            )));
        }
        if started.elapsed() > START_TIMEOUT {
            return Err(Error::from(format!(
                "scrip did not answer within {START_TIMEOUT:?}:\n{}",
                log_tail(&setup.log)
            )));
        }
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
}

impl Running {
    /// Stops the server with SIGTERM (SIGKILL if it does not exit in time).
    ///
    /// # Errors
    /// When the process cannot be signalled or waited for.
    pub async fn stop(mut self) -> Result<()> {
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.pid.to_string())
            .status()
            .await?;
        if tokio::time::timeout(STOP_TIMEOUT, self.child.wait())
            .await
            .is_err()
        {
            self.child.kill().await?;
        }
        Ok(())
    }
}

/// Memory of a process, from `/proc/<pid>/status`.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// Resident set size now, KiB (`VmRSS`).
    pub rss_kib: u64,
    /// Peak resident set size so far, KiB (`VmHWM`).
    pub peak_kib: u64,
}

/// The type of the filesystem `path` is on (`ext4`, `tmpfs`), from the
/// longest mount point above it in `/proc/self/mountinfo`.
pub fn filesystem(path: &Path) -> Option<String> {
    let path = path.canonicalize().ok()?;
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    info.lines()
        .filter_map(|line| {
            // `id parent major:minor root mount-point options... - type ...`
            let (left, right) = line.split_once(" - ")?;
            let mount = left.split(' ').nth(4)?;
            let fs = right.split(' ').next()?;
            path.starts_with(mount)
                .then(|| (mount.len(), fs.to_owned()))
        })
        .max_by_key(|(len, _)| *len)
        .map(|(_, fs)| fs)
}

/// Resets the peak resident set size (`VmHWM`) of `pid` to its current
/// one (`clear_refs` 5), so that the next [`memory`] reads the peak since
/// (each scenario's own, not the largest of those before it). Best effort:
/// the peak read after a failed reset is the peak since the start.
pub fn reset_peak(pid: u32) -> bool {
    std::fs::write(format!("/proc/{pid}/clear_refs"), "5").is_ok()
}

/// Reads the memory of `pid` (zeros when unavailable).
pub fn memory(pid: u32) -> Memory {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Memory {
        rss_kib: field("VmRSS:"),
        peak_kib: field("VmHWM:"),
    }
}

/// CPU time (user + system) of `pid` (or `self`) so far, in clock ticks
/// (`/proc/<pid>/stat` fields 14 and 15); 0 when unavailable.
pub fn cpu_ticks(pid: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses: state is
    // field 3, so utime (14) and stime (15) are the 12th and 13th.
    let after = text.rsplit_once(')').map_or("", |(_, rest)| rest);
    let mut fields = after.split_whitespace().skip(11);
    let mut next = || {
        fields
            .next()
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    next() + next()
}

/// The whole machine's CPU time so far, from the first line of
/// `/proc/stat`, in clock ticks summed over every CPU.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct MachineTicks {
    /// Waiting for nothing (`idle` + `iowait`).
    pub idle: u64,
    /// Taken by the hypervisor while this guest had work (`steal`): a
    /// host shared with other guests.
    pub steal: u64,
    /// Everything: user, nice, system, idle, iowait, irq, softirq, steal.
    pub total: u64,
}

impl MachineTicks {
    /// Reads `/proc/stat` (zeros when unavailable).
    pub fn now() -> Self {
        Self::parse(&std::fs::read_to_string("/proc/stat").unwrap_or_default())
    }

    /// The `cpu` line of a `/proc/stat` text (zeros when absent).
    pub fn parse(stat: &str) -> Self {
        let Some(line) = stat
            .lines()
            .find(|l| l.split_whitespace().next() == Some("cpu"))
        else {
            return Self::default();
        };
        // user nice system idle iowait irq softirq steal (guest time is
        // already in user and nice).
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .take(8)
            .map(|f| f.parse().unwrap_or(0))
            .collect();
        let at = |i: usize| v.get(i).copied().unwrap_or(0);
        Self {
            idle: at(3) + at(4),
            steal: at(7),
            total: v.iter().sum(),
        }
    }

    /// What passed between `self` and `later`.
    #[must_use]
    pub fn until(self, later: Self) -> Self {
        Self {
            idle: later.idle.saturating_sub(self.idle),
            steal: later.steal.saturating_sub(self.steal),
            total: later.total.saturating_sub(self.total),
        }
    }
}

/// Clock ticks per second of `/proc` CPU times (USER_HZ, 100 on Linux).
pub const TICKS_PER_SECOND: f64 = 100.0;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_cpu() {
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_ticks("self") > 0);
    }

    #[test]
    fn reads_the_machine_line() {
        let stat = "cpu  100 5 40 300 20 0 10 25 7 0\ncpu0 50 2 20 150 10 0 5 12 3 0\nintr 1\n";
        let m = MachineTicks::parse(stat);
        assert_eq!(
            m,
            MachineTicks {
                idle: 320,
                steal: 25,
                total: 500
            }
        );
        let later = MachineTicks::parse("cpu  110 5 45 330 25 0 10 35 7 0\n");
        assert_eq!(
            m.until(later),
            MachineTicks {
                idle: 35,
                steal: 10,
                total: 60
            }
        );
        assert_eq!(MachineTicks::parse("cpu0 1 2 3\n"), MachineTicks::default());
        assert!(MachineTicks::now().total > 0);
    }

    #[test]
    fn counts_policies() {
        assert_eq!(
            count_policies("@id(\"a\")\npermit (p, a, r);\n  forbid (p, a, r);\n// permit\n"),
            2
        );
    }

    #[test]
    fn fillers_reach_the_total() {
        let (idp, _) = Idp::generate("https://idp.example").unwrap();
        let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
        let setup = prepare(&src, 20, &idp, None, 1, Some("EdDSA")).unwrap();
        let mut n = 0;
        for e in std::fs::read_dir(setup.dir.path().join("policies")).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "cedar") {
                n += count_policies(&std::fs::read_to_string(p).unwrap());
            }
        }
        assert_eq!(n, 20);
        assert_eq!(setup.policies, 20);
        let toml = std::fs::read_to_string(&setup.config).unwrap();
        assert!(toml.contains("\nsigning_algorithm = \"EdDSA\"\n"), "{toml}");
    }
}
