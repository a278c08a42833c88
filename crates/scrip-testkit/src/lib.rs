//! Test support shared by scrip's test suites (a dev-dependency only).
//!
//! [`PgDatabase`] gives each test its own PostgreSQL database on the
//! machine's server (127.0.0.1:5432, trust auth), starting the server first
//! when it is not running, and drops the database afterwards. Tests never
//! skip for want of PostgreSQL: a server that cannot be started fails them.
//! [`Gate`] stands between a client and a real service to cut it off.
//! [`dpop::DpopKey`] makes RFC 9449 proofs (with `scrip-client`'s key).
//! [`free_port`] gives a port for a server started as another process.
#![expect(
    clippy::panic,
    clippy::expect_used,
    reason = "test support: a failed setup fails the test loudly"
)]

pub mod dpop;
mod gate;

pub use gate::Gate;

use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

/// The lowest port the kernel gives to outgoing connections and to binds of
/// port 0 (`net.ipv4.ip_local_port_range`), or Linux's default.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse().ok())
        .unwrap_or(32_768)
}

/// A TCP port on 127.0.0.1 that nothing listens on, for a server a test
/// starts in another process, which must know its port before it starts
/// (it goes into the configuration and the issuer).
///
/// A port from binding port 0 and closing it again is in the kernel's
/// ephemeral range, where any connection the tests open in the meantime
/// may take it. This one is drawn at random from the 10,000 ports below
/// that range, which the kernel never hands out on its own; a port this
/// process gave out before, or where something listens, is not given.
/// Test processes running at once could still draw the same port, about
/// one chance in 10,000 for each pair of servers starting together.
///
/// # Panics
/// When no port is free after 1,000 draws.
#[must_use]
pub fn free_port() -> u16 {
    use std::hash::{BuildHasher as _, Hasher as _};
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    let high = ephemeral_low();
    let low = high.saturating_sub(10_000).max(1_024);
    let span = u64::from(high.saturating_sub(low).max(1));
    let mut given = GIVEN
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    for _ in 0..1_000 {
        // Each `RandomState` has a new key, from a seed the system's
        // randomness gave this thread.
        let draw = std::hash::RandomState::new().build_hasher().finish() % span;
        let port = low.saturating_add(u16::try_from(draw).unwrap_or(0));
        if given.contains(&port) {
            continue;
        }
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            given.insert(port);
            return port;
        }
    }
    panic!("no free TCP port in {low}..{high} after 1,000 draws");
}

/// Where the tests' PostgreSQL server listens; `SCRIP_TEST_PG` overrides.
fn server() -> String {
    std::env::var("SCRIP_TEST_PG").unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".into())
}

fn psql(database: &str, sql: &str) -> Result<String, String> {
    let out = Command::new("psql")
        .arg(format!("{}/{database}", server()))
        .args(["-v", "ON_ERROR_STOP=1", "-qtAc", sql])
        .output()
        .map_err(|e| format!("cannot run psql: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
    }
}

/// Starts the local cluster when it does not answer, and waits for it.
fn ensure_running() {
    if psql("test", "SELECT 1").is_ok() {
        return;
    }
    let versions = std::fs::read_dir("/etc/postgresql")
        .expect("PostgreSQL is not installed: run `apt-get install -y postgresql`");
    for v in versions.flatten() {
        let _ = Command::new("pg_ctlcluster")
            .arg("--skip-systemctl-redirect")
            .arg(v.file_name())
            .args(["main", "start"])
            .status();
    }
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match psql("test", "SELECT 1") {
            Ok(_) => return,
            Err(e) if Instant::now() > deadline => {
                panic!("PostgreSQL did not come up at {}: {e}", server())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

/// A database of this test's own, dropped with the value.
#[derive(Debug)]
pub struct PgDatabase {
    name: String,
    url: String,
}

impl PgDatabase {
    /// Creates a fresh, empty database.
    ///
    /// # Panics
    /// When PostgreSQL cannot be started or the database created.
    #[must_use]
    pub fn new() -> Self {
        Self::with("")
    }

    /// A new database made with `options` after `CREATE DATABASE <name>`
    /// (`ENCODING 'LATIN1' ...`).
    ///
    /// # Panics
    /// When PostgreSQL cannot be started or the database created.
    #[must_use]
    pub fn with(options: &str) -> Self {
        static COUNT: AtomicU32 = AtomicU32::new(0);
        ensure_running();
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let name = format!(
            "scrip_t{}_{}_{nanos}",
            std::process::id(),
            COUNT.fetch_add(1, Ordering::Relaxed)
        );
        psql("test", &format!("CREATE DATABASE {name} {options}"))
            .unwrap_or_else(|e| panic!("cannot create database `{name}`: {e}"));
        let url = format!("{}/{name}", server());
        Self { name, url }
    }

    /// The `database_url` of this database.
    #[must_use]
    pub fn url(&self) -> &str {
        &self.url
    }

    /// Runs `sql` on this database (for tests that tamper with rows).
    ///
    /// # Panics
    /// When the statement fails.
    pub fn execute(&self, sql: &str) -> String {
        psql(&self.name, sql).unwrap_or_else(|e| panic!("`{sql}` failed: {e}"))
    }
}

impl Default for PgDatabase {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for PgDatabase {
    fn drop(&mut self) {
        let _ = psql(
            "test",
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}
