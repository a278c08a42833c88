//! The shared store: PostgreSQL, for several scrip replicas with no leader.
//!
//! It behaves exactly as the embedded store (one conformance suite runs
//! against both). Each replica has one writer ([`crate::writer`]) doing
//! group commit on its own connection and a small pool for reads. Writers
//! of all replicas serialize on one transaction-scoped advisory lock, so
//! the order of `seq` in the audit and revocation tables is commit order
//! (a reader following a cursor never skips a row that commits late) and a
//! new chain reads the other chains' heads consistently, as SQLite's
//! `BEGIN IMMEDIATE` does. Each batch is still one commit, so the lock is
//! held for one flush per batch, not per request.
//!
//! Replicas learn of each other's revocations and key changes through
//! `LISTEN`/`NOTIFY` on [`CHANNEL`]; when the listening connection drops,
//! every change counter is bumped (notifications may have been missed) and
//! it reconnects by itself. A database that cannot be reached fails every
//! read with [`StoreError::Unavailable`] within [`TIMEOUT`], and every
//! batch of commits within [`TIMEOUT`] of its start, connecting included (a
//! commit waits for the batches queued before it, usually one; after a
//! failed batch the next ones are smaller, and a commit that has waited
//! 10 s fails unapplied); the store recovers by itself when it comes back. A write
//! connection the server closed since the last batch is replaced, and the
//! batch tried again on the new one, when nothing was sent yet.

use std::str::FromStr as _;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgListener, PgPool, PgPoolOptions};
use sqlx::{ConnectOptions as _, Connection as _};
use tokio::sync::watch;

use crate::chain::ChainState;
use crate::rows::{
    self, approval_columns, key_columns, orphaned_where, task_columns, to_i64, unavailable,
};
use crate::schema::Schema;
use crate::writer::{Apply, Changes, Writer};
use crate::{
    Approval, AuditEvent, AuditFilter, ChainLink, Checkpoint, Revocation, SecretRecord, Store,
    StoreError, StoredKey, StoredRecord, TaskRecord, Write,
};

/// The notification channel replicas share.
pub const CHANNEL: &str = "scrip_changes";
/// The advisory lock every writer's transaction takes first.
const WRITE_LOCK: i64 = 7_070_001;
/// The longest a connection attempt, a read or a commit may take before the
/// store counts as unavailable.
const TIMEOUT: Duration = Duration::from_secs(5);
/// The longest an audit query may take ([`Store::audit`]): only an
/// operator's `scrip audit query` makes one, and on a trail of millions of
/// records a filter no index serves (`--issuer` alone, `--until` before the
/// oldest record) reads it all, for longer than a request's read may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(600);
/// The least time left before a batch's deadline for trying it again on a
/// new connection: the `lock_timeout` of [`LIMITS`] and room to connect.
const RETRY_LEFT: Duration = Duration::from_millis(4500);

/// What the database enforces on each of the writer's transactions (set
/// with `SET LOCAL`, so it holds through any connection pooler and leaves
/// the session's own settings alone):
///
/// - A replica that stops in the middle of a commit (frozen, or cut off
///   without a reset) holds the write lock every replica needs; the database
///   ends its session once it has sat in the transaction as long as a commit
///   may take, and the other replicas write again.
/// - A writer waiting for that lock gives up on the server before its client
///   gives up at [`TIMEOUT`], so no wait outlives the commit that asked.
/// - A statement stops after 5 s of its own, and within about a second of
///   its client giving up on the commit (which closes the connection),
///   where the database can check ([`LIMITS_CHECKING`]): without that
///   check a statement begun late in a slow commit runs on, holding the
///   write lock, for up to 5 s past it.
/// - A commit is durable when it returns: `synchronous_commit = off` (a
///   common tuning of the database or role) would let it return before the
///   WAL is flushed, and a crash then loses the audit record of a credential
///   already handed out. Any other setting (`local`, `on`, or one that also
///   waits for standbys) is kept.
macro_rules! limits {
    ($($more:literal)?) => {
        concat!(
            "SELECT set_config('idle_in_transaction_session_timeout', '5s', true), \
             set_config('lock_timeout', '4s', true), set_config('statement_timeout', '5s', true), \
             set_config('synchronous_commit', \
               CASE current_setting('synchronous_commit') WHEN 'off' THEN 'on' ELSE current_setting('synchronous_commit') END, true)"
            $(, $more)?
        )
    };
}
const LIMITS: &str = limits!();

/// The client connection check of [`LIMITS_CHECKING`], alone.
const CHECK_CLIENT: &str = "SELECT set_config('client_connection_check_interval', '1s', true)";

/// [`LIMITS`] with the client connection check, on a server that takes it
/// (PostgreSQL 14 and later on Linux, 15 and later on macOS and the BSDs;
/// one that cannot check refuses the setting, and every commit with it).
const LIMITS_CHECKING: &str =
    limits!(", set_config('client_connection_check_interval', '1s', true)");

/// [`LIMITS_CHECKING`] when the server on `conn` takes the client
/// connection check, else [`LIMITS`]: tried once, in a transaction rolled
/// back.
async fn write_limits(conn: &mut PgConnection) -> &'static str {
    use sqlx::Connection as _;
    let taken = async {
        let mut tx = conn.begin().await.ok()?;
        let set = sqlx::query(CHECK_CLIENT).execute(&mut *tx).await;
        tx.rollback().await.ok()?;
        set.ok()
    }
    .await
    .is_some();
    if !taken {
        tracing::info!(
            "the database cannot check for a client gone mid-statement (client_connection_check_interval): a statement begun late in a slow commit may run up to 5 s past it, and a read given up on while a lock holds it waits in the database as long as the lock"
        );
    }
    if taken { LIMITS_CHECKING } else { LIMITS }
}

/// Begins one of the writer's transactions: READ COMMITTED whatever the
/// database's default, so that every statement after the write lock sees
/// what the previous holder committed (under REPEATABLE READ the snapshot
/// would predate the lock wait, and a child task could be inserted under a
/// parent ended meanwhile), and with [`LIMITS`].
async fn begin_write<'c>(
    conn: &'c mut PgConnection,
    limits: &'static str,
) -> Result<sqlx::Transaction<'c, sqlx::Postgres>, StoreError> {
    let mut tx = conn
        .begin_with("BEGIN ISOLATION LEVEL READ COMMITTED")
        .await
        .map_err(unavailable)?;
    sqlx::query(limits)
        .execute(&mut *tx)
        .await
        .map_err(unavailable)?;
    Ok(tx)
}

/// The PostgreSQL store.
#[derive(Debug)]
pub struct PgStore {
    reads: PgPool,
    writer: Writer,
    listener: tokio::task::JoinHandle<()>,
    /// Gives the reads' pool [`fresh`] options every [`TLS_FILES_READ`].
    refresher: tokio::task::JoinHandle<()>,
}

impl Drop for PgStore {
    fn drop(&mut self) {
        self.listener.abort();
        self.refresher.abort();
    }
}

/// `options` for a connection that reads its TLS files (`sslrootcert`,
/// `sslcert`, `sslkey`) again. The driver reads them once for the options
/// and every copy of them, and keeps what it read: a client certificate a
/// rotation (cert-manager, Vault) rewrote in place would otherwise expire
/// under a running replica, and every connection it opens after that fail,
/// until a restart. Setting the mode, even to itself, drops what was read.
fn fresh(options: &PgConnectOptions) -> PgConnectOptions {
    options.clone().ssl_mode(options.get_ssl_mode())
}

/// How often the reads' pool gets options that read the TLS files again,
/// so its new connections follow a rotated certificate within this.
const TLS_FILES_READ: Duration = Duration::from_secs(10);

/// Gives `reads` [`fresh`] options every [`TLS_FILES_READ`] (a pool cannot
/// have them read the files for each connection it opens).
async fn refresh_tls(reads: PgPool, options: PgConnectOptions) {
    let mut every = tokio::time::interval(TLS_FILES_READ);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        reads.set_connect_options(fresh(&options));
    }
}

/// Refuses a database whose encoding is not UTF8: one in another encoding
/// refuses characters agents send (an emoji or an arrow in a purpose, a
/// workflow's name), and each such commit would fail. `SQL_ASCII` converts
/// nothing, so it stores what it is sent: taken, with a warning.
async fn require_utf8(conn: &mut PgConnection) -> Result<(), String> {
    let encoding: String = sqlx::query_scalar("SELECT current_setting('server_encoding')")
        .fetch_one(conn)
        .await
        .map_err(|e| e.to_string())?;
    if encoding == "UTF8" {
        Ok(())
    } else if encoding == "SQL_ASCII" {
        tracing::warn!(
            "the database's encoding is SQL_ASCII: it checks nothing it stores; UTF8 is recommended"
        );
        Ok(())
    } else {
        Err(format!(
            "the database's encoding is {encoding}; scrip needs UTF8, which can hold \
             whatever an agent sends (create it with `CREATE DATABASE ... ENCODING 'UTF8' \
             TEMPLATE template0`)"
        ))
    }
}

/// A failed statement: a uniqueness violation is a [`StoreError::Conflict`],
/// and a value the database refuses is [`refused`]'s.
fn failed(e: sqlx::Error) -> StoreError {
    match e.as_database_error() {
        Some(d) if d.is_unique_violation() => StoreError::Conflict(d.message().to_owned()),
        _ => refused(e),
    }
}

/// A failed statement of a commit: a data exception (SQLSTATE class 22: a
/// character the database's encoding lacks, a number out of range) is the
/// statement's values', a [`StoreError::Refused`], so that the writer
/// applies the commits batched with it without it; anything else is the
/// store's.
fn refused(e: sqlx::Error) -> StoreError {
    match e.as_database_error() {
        Some(d) if d.code().is_some_and(|c| c.starts_with("22")) => {
            StoreError::Refused(d.message().to_owned())
        }
        _ => unavailable(e),
    }
}

/// The URL without its passwords, for messages: the one in its user info
/// and any query parameter libpq takes one in (`password`, `sslpassword`).
fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("***"));
            }
            if u.query().is_some() {
                let pairs: Vec<(String, String)> = u
                    .query_pairs()
                    .map(|(k, v)| {
                        let secret = k.to_ascii_lowercase().contains("password");
                        (
                            k.into_owned(),
                            if secret { "***".into() } else { v.into_owned() },
                        )
                    })
                    .collect();
                u.query_pairs_mut().clear().extend_pairs(pairs);
            }
            u.to_string()
        }
        Err(_) => "the database_url".into(),
    }
}

/// The URL parameters the PostgreSQL driver takes (sqlx's names and
/// aliases). It logs any other, with its value, and ignores it: a value
/// may be a secret (`sslpassword`), and an ignored one (`connect_timeout`,
/// `target_session_attrs`) a setting the operator counts on, so both are
/// refused before the driver sees them. `application_name` is left out:
/// scrip sets its own.
const KNOWN_PARAMETERS: &[&str] = &[
    "sslmode",
    "ssl-mode",
    "sslrootcert",
    "ssl-root-cert",
    "ssl-ca",
    "sslcert",
    "ssl-cert",
    "sslkey",
    "ssl-key",
    "statement-cache-capacity",
    "host",
    "port",
    "dbname",
    "user",
    "password",
    "options",
];

/// Parameters of which the driver keeps only the last: given twice (several
/// hosts, as libpq takes them), all but one would be ignored.
const SINGLE_PARAMETERS: &[&str] = &["host", "port"];

/// Why `hostaddr` (and `PGHOSTADDR`) are refused: the driver dials that
/// address whatever the host says, while scrip judges the link (on this
/// host or not, so which `sslmode` it needs; `localhost` pinned to
/// 127.0.0.1) by the host.
const HOSTADDR: &str = "the driver would connect to that address while scrip judges the link by the host; name the server's address as the host instead (`postgres://user@10.0.0.5/db`)";

/// Refuses a URL parameter the driver would ignore, naming it (never its
/// value).
fn check_parameters(url: &str) -> Result<(), String> {
    let Ok(u) = url::Url::parse(url) else {
        return Ok(()); // The driver says what is wrong with the URL itself.
    };
    let mut seen = std::collections::HashSet::new();
    for (key, value) in u.query_pairs() {
        if key == "hostaddr" {
            return Err(format!("scrip does not take `hostaddr`: {HOSTADDR}"));
        }
        let known = KNOWN_PARAMETERS.contains(&key.as_ref())
            || (key.starts_with("options[") && key.ends_with(']'));
        if !known {
            return Err(format!(
                "the parameter `{key}` is not one scrip's PostgreSQL driver takes ({}, options[NAME]); it would be ignored",
                KNOWN_PARAMETERS.join(", ")
            ));
        }
        if SINGLE_PARAMETERS.contains(&key.as_ref())
            && (!seen.insert(key.clone()) || value.contains(','))
        {
            return Err(format!(
                "`{key}` names one server: the driver does not try several in turn"
            ));
        }
    }
    // The driver keeps one of two names for the server, the last, so
    // either one would be silently dropped.
    let named_host = u.host_str().is_some_and(|h| !h.is_empty());
    for (given, beside) in [
        (
            seen.contains("host") && named_host,
            "`host` and a host before the path",
        ),
        (
            seen.contains("port") && u.port().is_some(),
            "`port` and a port before the path",
        ),
    ] {
        if given {
            return Err(format!(
                "the URL names {beside}: the driver keeps only the last and ignores the other; give one"
            ));
        }
    }
    Ok(())
}

/// Refuses `PGHOSTADDR` in scrip's environment: the driver reads it
/// whatever host the URL names ([`HOSTADDR`]). Refuses a URL that names
/// no user where `PGUSER` names none either: the driver would log in as
/// the operating-system user scrip runs as (`root` in many containers,
/// `postgres` on a database host, which peer or trust authentication lets
/// in as that role), a role nobody chose.
fn check_environment(url: &str) -> Result<(), String> {
    let set = |name: &str| std::env::var_os(name).is_some_and(|v| !v.is_empty());
    if set("PGHOSTADDR") {
        return Err(format!(
            "PGHOSTADDR is set in scrip's environment: {HOSTADDR}, and unset it"
        ));
    }
    let Ok(u) = url::Url::parse(url) else {
        return Ok(()); // The driver says what is wrong with the URL itself.
    };
    let user =
        !u.username().is_empty() || u.query_pairs().any(|(k, v)| k == "user" && !v.is_empty());
    // As the driver reads it: a value that is not UTF-8 is none.
    if !user && !std::env::var("PGUSER").is_ok_and(|v| !v.is_empty()) {
        return Err(
            "the URL names no database user (`postgres://USER@host/db`), nor does PGUSER: the driver would log in as the operating-system user scrip runs as".into(),
        );
    }
    Ok(())
}

/// Refuses the client's private key file when others may read it, by
/// libpq's rule, which the driver does not apply: a key owned by root may
/// be read by its group too (mode 0640 or less, as a Kubernetes Secret
/// volume with `fsGroup` and `defaultMode: 0440` gives it), any other by
/// its owner alone (0600 or less). The key is the last `sslkey` (or
/// `ssl-key`) of the URL, which the driver always reads as a file, or else
/// `PGSSLKEY`, unless that holds the key itself (PEM, as the driver tells
/// it); it is looked at only where the driver would read it: with a client
/// certificate (`sslcert`, `ssl-cert` or `PGSSLCERT`), without which it
/// sends no key.
fn check_client_key(url: &str) -> Result<(), String> {
    use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
    let parsed = url::Url::parse(url).ok();
    let last = |names: [&str; 2]| {
        parsed.as_ref().and_then(|u| {
            u.query_pairs()
                .filter(|(k, _)| names.contains(&k.as_ref()))
                .map(|(_, v)| v.into_owned())
                .last()
        })
    };
    let certificate = last(["sslcert", "ssl-cert"]).or_else(|| std::env::var("PGSSLCERT").ok());
    let sslmode = last(["sslmode", "ssl-mode"]).or_else(|| std::env::var("PGSSLMODE").ok());
    if certificate.is_none() || sslmode.is_some_and(|m| m.eq_ignore_ascii_case("disable")) {
        return Ok(());
    }
    // Named in messages as given in the URL; from the environment, by the
    // variable's name, as its value may be the key itself in a form the
    // driver does not take for one.
    let (key, named) = match last(["sslkey", "ssl-key"]) {
        Some(key) => {
            let named = format!("`{key}`");
            (key, named)
        }
        None => match std::env::var("PGSSLKEY") {
            Ok(key) => {
                let trimmed = key.trim();
                if trimmed.starts_with("-----BEGIN") && trimmed.ends_with("-----") {
                    return Ok(());
                }
                (key, "that `PGSSLKEY` names".to_owned())
            }
            Err(_) => return Ok(()),
        },
    };
    let meta = std::fs::metadata(&key)
        .map_err(|e| format!("the client key {named} cannot be read: {e}"))?;
    let mode = meta.permissions().mode() & 0o777;
    let exposed = if meta.uid() == 0 {
        mode & 0o037
    } else {
        mode & 0o077
    };
    if exposed != 0 {
        return Err(format!(
            "the client key {named} has mode {mode:04o}, which lets others read or change it: it must be 0600 or less, or 0640 or less when root owns it, as libpq requires"
        ));
    }
    Ok(())
}

/// `localhost` dialled at 127.0.0.1 only, where the link is not checked
/// by TLS for that name: the resolver may list `::1` first, where another
/// user of the host may listen while PostgreSQL listens on 127.0.0.1 alone,
/// and take the store's traffic (approvals, revocations, the audit). With
/// `verify-full` the certificate names the server, and the name stays.
fn pin_localhost(options: PgConnectOptions) -> PgConnectOptions {
    let host = options.get_host();
    let localhost = host
        .strip_suffix('.')
        .unwrap_or(host)
        .eq_ignore_ascii_case("localhost");
    if localhost
        && options.get_socket().is_none()
        && !matches!(
            options.get_ssl_mode(),
            sqlx::postgres::PgSslMode::VerifyFull
        )
    {
        options.host("127.0.0.1")
    } else {
        options
    }
}

/// Whether `options` reach the database only over a link nobody else can
/// read or change, or by an explicit choice. The store carries approvals,
/// revocations and the audit: whoever can rewrite the link can approve a
/// step or hide a revocation. A database on this host (loopback, or a Unix
/// socket) may be reached in any mode. Elsewhere, libpq's default
/// (`prefer`) and `allow` would carry on without TLS, or with a server
/// nobody checked, whenever the link says so, so they are refused:
/// `verify-full` checks the server; `verify-ca` checks only that some CA
/// vouches for it (the public ones included), `require` encrypts without
/// checking who answers and `disable` encrypts nothing, so each of those is
/// taken as a deliberate choice (another layer, such as a service mesh,
/// protects the link) and logged as a warning.
fn check_transport(options: &PgConnectOptions) -> Result<(), String> {
    use sqlx::postgres::PgSslMode;
    let host = options.get_host();
    let local = options.get_socket().is_some()
        || host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<std::net::IpAddr>()
            .is_ok_and(|ip| ip.is_loopback());
    if local {
        return Ok(());
    }
    match options.get_ssl_mode() {
        PgSslMode::VerifyFull => Ok(()),
        mode @ (PgSslMode::VerifyCa | PgSslMode::Require | PgSslMode::Disable) => {
            let mode = match mode {
                // The driver adds `sslrootcert` to the public roots rather
                // than putting it in their place: without the name, any
                // certificate a public CA issued, for any name, passes.
                PgSslMode::VerifyCa => {
                    "verify-ca: encrypted, but any certificate from a public CA is accepted, whatever its name"
                }
                PgSslMode::Require => {
                    "require: encrypted, but the server's certificate is not checked"
                }
                _ => "disable: not encrypted",
            };
            tracing::warn!(
                host,
                sslmode = mode,
                "the link to the shared store is not protected by scrip; use sslmode=verify-full unless another layer protects it"
            );
            Ok(())
        }
        PgSslMode::Prefer | PgSslMode::Allow => Err(format!(
            "the database at `{host}` is not on this host, and with sslmode `prefer` (the \
             default) or `allow` the connection may go without TLS, or to a server nobody \
             checked: set sslmode=verify-full (with sslrootcert=FILE for a private CA); \
             sslmode=disable only if another layer (a service mesh) protects the link"
        )),
    }
}

/// The shared store's migrations.
static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// The longest a start waits for a lock while it migrates: the migration
/// lock (sqlx's, held by a replica migrating, or by one frozen while it
/// held it) or a table's. Past it the start fails and says why, rather
/// than wait as long as that session lives.
const MIGRATION_LOCK_WAIT: Duration = Duration::from_secs(60);
/// The longest the migrations may take in all: each lock waited for within
/// [`MIGRATION_LOCK_WAIT`], and room for a migration that rebuilds an index
/// of a large store.
const MIGRATION_TIME: Duration = Duration::from_secs(30 * 60);

/// The longest one try at the migrations waits for a lock: a migration's
/// statement waiting for a table's lock (behind a `pg_dump`, which holds a
/// shared one on every table for as long as it runs) holds up every other
/// session that asks for that table after it, so a try gives up soon,
/// lets them through, and tries again a moment later, up to
/// [`MIGRATION_LOCK_WAIT`] in all. Each migration is a transaction of its
/// own: one given up leaves nothing done.
const MIGRATION_LOCK_TRY: Duration = Duration::from_secs(1);

/// Whether a migration failed for `lock_timeout` (SQLSTATE 55P03: the
/// message is in the server's language).
fn lock_timed_out(e: &sqlx::migrate::MigrateError) -> bool {
    use sqlx::migrate::MigrateError;
    match e {
        MigrateError::Execute(sqlx::Error::Database(d))
        | MigrateError::ExecuteMigration(sqlx::Error::Database(d), _) => {
            d.code().as_deref() == Some("55P03")
        }
        _ => false,
    }
}

/// Applies the migrations on `conn`, waiting at most `wait` in all for the
/// locks they need, [`MIGRATION_LOCK_TRY`] at a time.
async fn migrate(conn: &mut PgConnection, wait: Duration) -> Result<(), StoreError> {
    let deadline = tokio::time::Instant::now() + wait;
    let migrated = loop {
        sqlx::query("SELECT set_config('lock_timeout', $1, false)")
            .bind(format!("{}ms", MIGRATION_LOCK_TRY.min(wait).as_millis()))
            .execute(&mut *conn)
            .await
            .map_err(|e| StoreError::Open(format!("migration failed: {e}")))?;
        let result = MIGRATOR.run(&mut *conn).await;
        // sqlx takes its migration lock for the session and lets it go
        // only when every migration applied: a try given up would leave it
        // held by this connection (which goes on to write), and every later
        // start would wait for it in vain. A connection that broke lets its
        // locks go with it; one that cannot let it go is not tried again
        // (a second try would take the lock twice), and the migration's own
        // error is the one to report either way.
        let mut unlocked = true;
        if result.is_err()
            && let Err(e) = sqlx::query("SELECT pg_advisory_unlock_all()")
                .execute(&mut *conn)
                .await
        {
            tracing::warn!(error = %e, "cannot let the migration lock go");
            unlocked = false;
        }
        match result {
            Err(e)
                if unlocked
                    && lock_timed_out(&e)
                    && tokio::time::Instant::now() + 2 * MIGRATION_LOCK_TRY < deadline =>
            {
                tracing::info!(
                    "a migration waits for a lock another session holds (a replica migrating, a pg_dump); trying again"
                );
                tokio::time::sleep(MIGRATION_LOCK_TRY).await;
            }
            result => break result,
        }
    };
    let migrated = migrated.map_err(|e| {
        let text = e.to_string();
        StoreError::Open(if lock_timed_out(&e) {
            format!(
                "migration failed: waited {} s for a lock another session holds (a replica migrating, or one frozen while it held the migration lock); try again, or find the session in pg_stat_activity: {text}",
                wait.as_secs()
            )
        } else {
            crate::schema::migration_failed(&e)
        })
    });
    // The connection goes on to write: its own lock waits are set per
    // transaction. (After a failed migration it is dropped: its error is
    // the one to report.)
    let reset = sqlx::query("RESET lock_timeout").execute(&mut *conn).await;
    migrated?;
    reset.map_err(|e| StoreError::Open(format!("migration failed: {e}")))?;
    Ok(())
}

impl PgStore {
    /// Connects to the database at `url` (a `postgres://` URL) and applies
    /// the migrations (concurrent replicas serialize on sqlx's migration
    /// lock).
    ///
    /// # Errors
    /// [`StoreError::Open`] when the database cannot be reached or migrated.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::connect_as(url, Schema::Migrate).await
    }

    /// Connects to the database at `url`: as [`PgStore::connect`] with
    /// [`Schema::Migrate`]; with [`Schema::Require`] nothing is migrated,
    /// and a database whose schema is not this scrip's is refused.
    ///
    /// # Errors
    /// [`StoreError::Open`] when the database cannot be reached, migrated,
    /// or (`Require`) holds another schema.
    pub async fn connect_as(url: &str, schema: Schema) -> Result<Self, StoreError> {
        check_parameters(url)
            .and_then(|()| check_environment(url))
            .and_then(|()| check_client_key(url))
            .map_err(|e| StoreError::Open(format!("`{}`: {e}", redacted(url))))?;
        let options = pin_localhost(
            PgConnectOptions::from_str(url)
                .map_err(|e| StoreError::Open(format!("`{}`: {e}", redacted(url))))?
                .application_name("scrip"),
        );
        check_transport(&options)
            .map_err(|e| StoreError::Open(format!("`{}`: {e}", redacted(url))))?;
        let mut conn = tokio::time::timeout(TIMEOUT, options.connect())
            .await
            .map_err(|_| StoreError::Open(format!("`{}`: connection timed out", redacted(url))))?
            .map_err(|e| StoreError::Open(format!("`{}`: {e}", redacted(url))))?;
        // Each step within its time, as the connection's: a server (or a
        // pooler in front of it) that took the connection and then answers
        // nothing fails the start and says so, rather than hold it.
        let late = |what: &str| {
            StoreError::Open(format!(
                "`{}`: the database took the connection but did not answer {what} in time",
                redacted(url)
            ))
        };
        tokio::time::timeout(TIMEOUT, require_utf8(&mut conn))
            .await
            .map_err(|_| late("its first query"))?
            .map_err(|e| StoreError::Open(format!("`{}`: {e}", redacted(url))))?;
        match schema {
            Schema::Migrate => {
                tokio::time::timeout(MIGRATION_TIME, migrate(&mut conn, MIGRATION_LOCK_WAIT))
                    .await
                    .map_err(|_| late("the migrations"))??
            }
            Schema::Require => {
                tokio::time::timeout(TIMEOUT, crate::schema::require(&mut conn, &MIGRATOR))
                    .await
                    .map_err(|_| late("which migrations it has"))??;
            }
        }
        let limits = tokio::time::timeout(TIMEOUT, write_limits(&mut conn))
            .await
            .map_err(|_| late("a transaction"))?;
        let mut reads = PgPoolOptions::new()
            .max_connections(8)
            .min_connections(1)
            .acquire_timeout(TIMEOUT);
        // Where the server can check for a client gone (the writer's probe
        // said so), for reads too.
        if limits == LIMITS_CHECKING {
            reads = reads.after_connect(|conn, _| Box::pin(check_client(conn)));
        }
        let reads = reads
            .connect_with(options.clone())
            .await
            .map_err(|e| StoreError::Open(e.to_string()))?;
        let writer = Writer::spawn(
            PgWriter {
                conn: Some(conn),
                limits,
                options: options.clone(),
                commit_sent: false,
                began: false,
            },
            crate::chain::new_chain_id()?,
        );
        let refresher = scrip_vital::spawn(
            "PostgreSQL TLS files",
            refresh_tls(reads.clone(), options.clone()),
        );
        let listener = scrip_vital::spawn(
            "PostgreSQL listener",
            listen(options, writer.changes().clone()),
        );
        Ok(Self {
            reads,
            writer,
            listener,
            refresher,
        })
    }
}

/// How long the listener waits for a notification before it checks that
/// its connection still hears them. A connection that died without a word
/// (a NAT's or firewall's idle timeout, a host gone) would otherwise leave
/// it waiting for ever, deaf to other replicas' revocations, while this
/// replica's caches take its silence for "nothing changed".
const LISTEN_QUIET: Duration = Duration::from_secs(5);

/// How long that check may take.
const LISTEN_CHECK: Duration = Duration::from_secs(2);

/// What the payload of the listener's own check notifications starts with;
/// every replica ignores them.
const PING: &str = "ping:";

/// Whether the listener hears notifications: it sends one to itself and
/// waits for it (other replicas' notifications read meanwhile are counted
/// in `changes`). A query that merely answers would not show it: through
/// a pooler that hands each statement to any server connection (PgBouncer
/// in transaction mode), `LISTEN` ran on a connection nobody reads, and
/// every notification is lost while `SELECT 1` still answers.
async fn hears_itself(
    listener: &mut PgListener,
    changes: &watch::Sender<Changes>,
) -> Result<(), String> {
    let mut nonce = [0u8; 12];
    aws_lc_rs::rand::fill(&mut nonce).map_err(|_| "random generator failed".to_owned())?;
    let ping = format!(
        "{PING}{}",
        nonce.iter().map(|b| format!("{b:02x}")).collect::<String>()
    );
    let deadline = tokio::time::Instant::now() + LISTEN_CHECK;
    let sent = sqlx::query("SELECT pg_notify($1, $2)")
        .bind(CHANNEL)
        .bind(&ping)
        .execute(&mut *listener);
    match tokio::time::timeout_at(deadline, sent).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err(format!("no answer within {} s", LISTEN_CHECK.as_secs())),
    }
    loop {
        match tokio::time::timeout_at(deadline, listener.try_recv()).await {
            Ok(Ok(Some(n))) if n.payload() == ping => return Ok(()),
            Ok(Ok(Some(n))) => count(changes, n.payload()),
            Ok(Ok(None)) => return Err("the connection was lost".into()),
            Ok(Err(e)) => return Err(e.to_string()),
            Err(_) => {
                return Err(format!(
                    "its own notification did not come back within {} s (is `database_url` a pooler in transaction mode? it must reach PostgreSQL directly, or through a session-mode pool)",
                    LISTEN_CHECK.as_secs()
                ));
            }
        }
    }
}

/// Counts a notification from another replica (or this one's writer).
fn count(changes: &watch::Sender<Changes>, payload: &str) {
    if payload.starts_with(PING) {
        return;
    }
    changes.send_modify(|c| match payload {
        "keys" => c.keys += 1,
        _ => c.revocations += 1,
    });
}

/// Follows other replicas' changes; bumps every counter whenever the
/// connection was or may have been lost, since notifications may have been
/// missed then, and every second until it listens again.
async fn listen(options: PgConnectOptions, changes: watch::Sender<Changes>) {
    let bump_all = |changes: &watch::Sender<Changes>| {
        changes.send_modify(|c| {
            c.revocations += 1;
            c.keys += 1;
        });
    };
    loop {
        // A pool of its own, never the reads': a connection given up on
        // here may hang until TCP gives up on it, and must not be handed
        // to a read.
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .min_connections(0)
            .acquire_timeout(TIMEOUT)
            .connect_lazy_with(fresh(&options));
        // While no connection listens, the caches are dropped every second.
        let connect = PgListener::connect_with(&pool);
        tokio::pin!(connect);
        let mut every_second = tokio::time::interval(Duration::from_secs(1));
        let connected = loop {
            tokio::select! {
                c = &mut connect => break c,
                _ = every_second.tick() => bump_all(&changes),
            }
        };
        let mut listener = match connected {
            // Reconnecting is this loop's, which bumps the counters once it
            // listens again: sqlx's own reconnect happens inside `try_recv`,
            // where the wait below can cut it short and lose its `Ok(None)`,
            // and the check's query would reconnect without a word.
            Ok(mut l) => {
                l.eager_reconnect(false);
                l
            }
            Err(e) => {
                tracing::warn!(error = %e, "cannot listen for other replicas' changes; retrying");
                bump_all(&changes);
                tokio::time::sleep(Duration::from_secs(1)).await;
                continue;
            }
        };
        // `LISTEN` too, on a connection that may go silent meanwhile.
        let listened = {
            let listen = tokio::time::timeout(TIMEOUT, listener.listen(CHANNEL));
            tokio::pin!(listen);
            loop {
                tokio::select! {
                    l = &mut listen => break l,
                    _ = every_second.tick() => bump_all(&changes),
                }
            }
        };
        if let Err(e) = listened
            .map_err(|_| "no answer in time".to_owned())
            .and_then(|r| r.map_err(|e| e.to_string()))
        {
            tracing::warn!(error = %e, "cannot listen for other replicas' changes; retrying");
            bump_all(&changes);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        // Listening only once it hears itself; until then the caches are
        // dropped every second, as while not connected.
        let heard = {
            let check = hears_itself(&mut listener, &changes);
            tokio::pin!(check);
            loop {
                tokio::select! {
                    h = &mut check => break h,
                    _ = every_second.tick() => bump_all(&changes),
                }
            }
        };
        if let Err(e) = heard {
            tracing::error!(error = %e, "the change notifications do not arrive: other replicas' revocations are seen only as caches are dropped, every second; retrying");
            bump_all(&changes);
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        }
        // Anything may have happened while not listening.
        bump_all(&changes);
        loop {
            // `try_recv` is cancel-safe: a notification half read when the
            // wait ends is read whole by the next call.
            let Ok(next) = tokio::time::timeout(LISTEN_QUIET, listener.try_recv()).await else {
                match hears_itself(&mut listener, &changes).await {
                    Ok(()) => continue,
                    Err(e) => {
                        tracing::warn!(error = %e, "the change notifications' connection failed its check; reconnecting");
                    }
                }
                bump_all(&changes);
                break;
            };
            match next {
                Ok(Some(n)) => count(&changes, n.payload()),
                Ok(None) => {
                    // Lost: notifications may have been missed.
                    tracing::warn!("lost the change notifications' connection; reconnecting");
                    bump_all(&changes);
                    break;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "lost the change notifications; reconnecting");
                    bump_all(&changes);
                    tokio::time::sleep(Duration::from_millis(500)).await;
                    break;
                }
            }
        }
    }
}

struct PgWriter {
    conn: Option<PgConnection>,
    /// The transaction limits this database takes ([`write_limits`]).
    limits: &'static str,
    options: PgConnectOptions,
    /// Whether the last batch's `COMMIT` was sent: after a failure, only
    /// then may it have taken effect.
    commit_sent: bool,
    /// Whether the last attempt's transaction began: a failure before
    /// that, on a connection kept from an earlier batch, is the
    /// connection's (closed by the server since), not the batch's.
    began: bool,
}

#[async_trait::async_trait]
impl Apply for PgWriter {
    async fn apply(&mut self, writes: &[&Write], chain: &mut ChainState) -> Result<(), StoreError> {
        // One deadline for the batch, connecting included.
        let deadline = tokio::time::Instant::now() + TIMEOUT;
        let reused = self.conn.is_some();
        let before = chain.clone();
        let result = self.attempt(writes, chain, deadline).await;
        // A connection kept from an earlier batch may have been closed by
        // the server since (a restart, a failover, an idle timeout): when
        // it failed before its transaction even began, nothing took
        // effect, and the batch is tried once more on a new connection,
        // within the same deadline. (A failure later, such as the wait for
        // the write lock timing out, is the batch's, and is not retried.)
        // Only with the lock's own timeout (4 s) and a little left before
        // the deadline, so that the server never waits for the lock after
        // the batch gave up.
        if reused
            && matches!(result, Err(StoreError::Unavailable(_)))
            && !self.began
            && !self.commit_sent
            && deadline.saturating_duration_since(tokio::time::Instant::now()) >= RETRY_LEFT
        {
            tracing::debug!("the store's write connection failed; trying the batch on a new one");
            *chain = before;
            return self.attempt(writes, chain, deadline).await;
        }
        result
    }

    fn may_have_committed(&self) -> bool {
        // Before the `COMMIT`, a failure rolled the transaction back, or the
        // connection was closed, which rolls it back on the server.
        self.commit_sent
    }
}

impl PgWriter {
    /// Applies `writes` on the connection (made first when there is none)
    /// by `deadline`; a connection that failed is closed.
    async fn attempt(
        &mut self,
        writes: &[&Write],
        chain: &mut ChainState,
        deadline: tokio::time::Instant,
    ) -> Result<(), StoreError> {
        if self.conn.is_none() {
            let conn = tokio::time::timeout_at(deadline, fresh(&self.options).connect())
                .await
                .map_err(|_| unavailable("connecting to the database timed out"))?
                .map_err(unavailable)?;
            self.conn = Some(conn);
        }
        self.commit_sent = false;
        self.began = false;
        let Some(c) = self.conn.as_mut() else {
            return Err(StoreError::Unavailable("no connection".into()));
        };
        let progress = Progress {
            began: &mut self.began,
            commit_sent: &mut self.commit_sent,
        };
        let result = match tokio::time::timeout_at(
            deadline,
            apply_on(c, self.limits, writes, chain, progress),
        )
        .await
        {
            Ok(r) => r,
            Err(_) => Err(unavailable("the database did not answer in time")),
        };
        if matches!(result, Err(StoreError::Unavailable(_))) {
            // Start afresh next time: the connection may be what is broken.
            if let Some(c) = self.conn.take() {
                drop(tokio::time::timeout(Duration::from_millis(200), c.close()).await);
            }
        }
        result
    }
}

/// The audit rows of one batch, column by column, for one `UNNEST` insert.
#[derive(Default)]
struct AuditColumns {
    at_ms: Vec<i64>,
    event: Vec<String>,
    decision: Vec<Option<String>>,
    agent_iss: Vec<Option<String>>,
    agent_sub: Vec<Option<String>>,
    task_id: Vec<Option<String>>,
    parent_id: Vec<Option<String>>,
    tool: Vec<Option<String>>,
    jti: Vec<Option<String>>,
    replica: Vec<String>,
    chain_id: Vec<String>,
    chain_seq: Vec<i64>,
    hash: Vec<String>,
    record: Vec<String>,
}

impl AuditColumns {
    fn push(&mut self, event: &AuditEvent, chain: &mut ChainState) -> Result<(), StoreError> {
        let (e, record, hash) = chain.append(event).map_err(unavailable)?;
        self.at_ms.push(to_i64(e.at_ms));
        self.event.push(e.event);
        self.decision.push(e.decision);
        self.agent_iss.push(e.agent_iss);
        self.agent_sub.push(e.agent_sub);
        self.task_id.push(e.task_id);
        self.parent_id.push(e.parent_id);
        self.tool.push(e.tool);
        self.jti.push(e.jti);
        self.replica.push(e.replica);
        self.chain_id.push(chain.id.clone());
        self.chain_seq.push(to_i64(chain.seq));
        self.hash.push(hash);
        self.record.push(record);
        Ok(())
    }

    /// Inserts the rows and, when `head` is given, the chain's signed head
    /// in the same statement (no round trip of its own while the write
    /// lock is held): a new row, or the chain's row replaced only where it
    /// still holds the head this writer stored last
    /// ([`StoreError::RolledBack`] otherwise).
    async fn insert(
        self,
        tx: &mut PgConnection,
        head: Option<&crate::chain::HeadWrite>,
    ) -> Result<(), StoreError> {
        // A head moves only when a record is appended: no rows, no head.
        if self.record.is_empty() {
            return Ok(());
        }
        let query = sqlx::query(match head {
            None => audit_insert!(),
            Some(h) if h.over.is_none() => concat!(
                "WITH rows AS (",
                audit_insert!(),
                ") INSERT INTO audit_heads (chain_id, chain_seq, hash, at_ms, signature) \
                 VALUES ($15, $16, $17, $18, $19) \
                 ON CONFLICT (chain_id) DO UPDATE SET chain_seq = excluded.chain_seq, \
                 hash = excluded.hash, at_ms = excluded.at_ms, signature = excluded.signature"
            ),
            Some(_) => concat!(
                "WITH rows AS (",
                audit_insert!(),
                ") UPDATE audit_heads SET chain_seq = $16, hash = $17, at_ms = $18, \
                 signature = $19 WHERE chain_id = $15 AND chain_seq = $20 AND hash = $21"
            ),
        });
        let query = query
            .bind(self.at_ms)
            .bind(self.event)
            .bind(self.decision)
            .bind(self.agent_iss)
            .bind(self.agent_sub)
            .bind(self.task_id)
            .bind(self.parent_id)
            .bind(self.tool)
            .bind(self.jti)
            .bind(self.replica)
            .bind(self.chain_id)
            .bind(self.chain_seq)
            .bind(self.hash)
            .bind(self.record);
        let query = match head {
            Some(h) => {
                let c = &h.checkpoint;
                let query = query
                    .bind(&c.chain_id)
                    .bind(to_i64(c.chain_seq))
                    .bind(&c.hash)
                    .bind(to_i64(c.at_ms))
                    .bind(&c.signature);
                match &h.over {
                    Some(over) => query.bind(to_i64(over.chain_seq)).bind(&over.hash),
                    None => query,
                }
            }
            None => query,
        };
        let changed = query
            .execute(&mut *tx)
            .await
            .map_err(refused)?
            .rows_affected();
        match head.and_then(|h| h.over.as_ref()) {
            Some(over) => rows::head_replaced(changed, over),
            None => Ok(()),
        }
    }
}

/// The statement inserting a batch's audit rows, column by column, in the
/// order they were chained.
macro_rules! audit_insert {
    () => {
        "INSERT INTO audit (at_ms, event, decision, agent_iss, agent_sub, task_id, parent_id, tool, jti, \
         replica, chain_id, chain_seq, hash, record) \
         SELECT at_ms, event, decision, agent_iss, agent_sub, task_id, parent_id, tool, jti, \
         replica, chain_id, chain_seq, hash, record \
         FROM UNNEST($1::bigint[], $2::text[], $3::text[], $4::text[], $5::text[], $6::text[], $7::text[], \
         $8::text[], $9::text[], $10::text[], $11::text[], $12::bigint[], $13::text[], $14::text[]) \
         WITH ORDINALITY AS u(at_ms, event, decision, agent_iss, agent_sub, task_id, parent_id, tool, jti, \
         replica, chain_id, chain_seq, hash, record, n) ORDER BY n"
    };
}
use audit_insert;

/// The heads a new chain links ([`rows::UNLINKED_HEADS`]), recorded as
/// linked.
async fn link_heads(tx: &mut PgConnection) -> Result<Vec<ChainLink>, StoreError> {
    let rows = sqlx::query(rows::UNLINKED_HEADS)
        .fetch_all(&mut *tx)
        .await
        .map_err(refused)?;
    let links = rows
        .iter()
        .map(rows::chain_link)
        .collect::<Result<Vec<_>, _>>()?;
    if !links.is_empty() {
        // One statement for them all: the first start after an upgrade links
        // every chain the store ever held, under the write lock, and a round
        // trip each would pass the commit's 5 s.
        let ids: Vec<&str> = links.iter().map(|l| l.chain_id.as_str()).collect();
        let seqs: Vec<i64> = links.iter().map(|l| to_i64(l.chain_seq)).collect();
        sqlx::query(
            "INSERT INTO chain_links (chain_id, chain_seq) \
             SELECT * FROM UNNEST($1::text[], $2::bigint[]) \
             ON CONFLICT (chain_id) DO UPDATE SET chain_seq = excluded.chain_seq \
             WHERE chain_links.chain_seq <> excluded.chain_seq",
        )
        .bind(ids)
        .bind(seqs)
        .execute(&mut *tx)
        .await
        .map_err(refused)?;
    }
    Ok(links)
}

/// [`StoreError::Conflict`] saying `what` when task `id` has ended (the
/// write lock orders this commit after any other ending of it).
async fn refuse_if_ended(tx: &mut PgConnection, id: &str, what: &str) -> Result<(), StoreError> {
    let ended: Option<i32> = sqlx::query_scalar(crate::rows::TASK_ENDED)
        .bind(id)
        .fetch_optional(&mut *tx)
        .await
        .map_err(refused)?;
    if ended.is_some() {
        return Err(StoreError::Conflict(format!("task {id} has ended: {what}")));
    }
    Ok(())
}

/// [`StoreError::Conflict`] when one of the tasks `ids` has ended (see
/// [`Write::TaskOpen`]).
async fn refuse_any_ended(tx: &mut PgConnection, ids: &[&str]) -> Result<(), StoreError> {
    if ids.is_empty() {
        return Ok(());
    }
    let ended: Option<String> = sqlx::query_scalar(
        "SELECT id FROM tasks WHERE id = ANY($1) AND ended_at IS NOT NULL LIMIT 1",
    )
    .bind(ids)
    .fetch_optional(&mut *tx)
    .await
    .map_err(refused)?;
    match ended {
        Some(id) => Err(StoreError::Conflict(format!(
            "task {id} has ended: nothing is issued under it"
        ))),
        None => Ok(()),
    }
}

/// Records the DPoP proofs `proofs` (`iat`, id) as used, in one
/// statement; [`StoreError::ProofUsed`] (the transaction then rolls back)
/// when one was recorded already, by any replica (one inserting the same
/// proof at once holds its row until it commits, and is waited for), or
/// appears twice among them (the second conflicts with the first, and
/// fewer rows are inserted than given).
async fn spend_proofs(
    tx: &mut PgConnection,
    mut proofs: Vec<(i64, Vec<u8>)>,
) -> Result<(), StoreError> {
    if proofs.is_empty() {
        return Ok(());
    }
    let given = proofs.len();
    // In the order of the key: rows go in near the index's end together.
    proofs.sort_unstable();
    let (iats, ids): (Vec<i64>, Vec<Vec<u8>>) = proofs.into_iter().unzip();
    let recorded = sqlx::query(
        "INSERT INTO dpop_proofs (iat, id) \
         SELECT * FROM UNNEST($1::int8[], $2::bytea[]) ON CONFLICT DO NOTHING",
    )
    .bind(iats)
    .bind(ids)
    .execute(&mut *tx)
    .await
    .map_err(refused)?;
    if usize::try_from(recorded.rows_affected()).unwrap_or(0) < given {
        return Err(StoreError::ProofUsed);
    }
    Ok(())
}

/// How far a batch's transaction got.
struct Progress<'a> {
    /// Set once it began.
    began: &'a mut bool,
    /// Set just before its `COMMIT` is sent.
    commit_sent: &'a mut bool,
}

/// Applies `writes` in one transaction, committed when every write applied
/// and rolled back at once otherwise; `progress` says whether it began, and
/// whether the `COMMIT` went out (set just before).
async fn apply_on(
    conn: &mut PgConnection,
    limits: &'static str,
    writes: &[&Write],
    chain: &mut ChainState,
    progress: Progress<'_>,
) -> Result<(), StoreError> {
    let mut tx = begin_write(conn, limits).await?;
    *progress.began = true;
    match apply_in(&mut tx, writes, chain).await {
        Ok(()) => {
            *progress.commit_sent = true;
            tx.commit().await.map_err(unavailable)
        }
        Err(e) => {
            // Now, not when the connection is next used (as dropping `tx`
            // would): until then the transaction would hold the write lock
            // every replica needs.
            drop(tx.rollback().await);
            Err(e)
        }
    }
}

#[expect(
    clippy::too_many_lines,
    reason = "one arm per write, each a statement; splitting them scatters the SQL"
)]
async fn apply_in(
    tx: &mut PgConnection,
    writes: &[&Write],
    chain: &mut ChainState,
) -> Result<(), StoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1)")
        .bind(WRITE_LOCK)
        .execute(&mut *tx)
        .await
        .map_err(refused)?;
    let mut audit = AuditColumns::default();
    let before = chain.seq;
    if let Some(mut event) = chain.genesis_for(writes) {
        event.links = link_heads(tx).await?;
        for p in chain.predecessors() {
            let held: i64 = sqlx::query_scalar(rows::HELD_UP_TO)
                .bind(&p.chain_id)
                .bind(to_i64(p.chain_seq))
                .bind(&p.hash)
                .fetch_one(&mut *tx)
                .await
                .map_err(refused)?;
            chain.note_loss(&mut event, p, u64::try_from(held).unwrap_or(0));
        }
        audit.push(&event, chain)?;
    }
    let mut revoked = false;
    let mut keys = false;
    // The tasks that must still be open where they stand in the batch,
    // checked in one statement for many (not a round trip for each
    // exchange): those since the last ending, just before the next one
    // (only an ending ends a task) and after the last write.
    let mut must_be_open: Vec<&str> = Vec::new();
    // The DPoP proofs of the batch: recorded in one statement (not a round
    // trip for each request, under the lock every replica takes).
    let mut proofs: Vec<(i64, Vec<u8>)> = Vec::new();
    for write in writes {
        if matches!(write, Write::EndTask { .. } | Write::EndOpenTask { .. }) {
            refuse_any_ended(tx, &must_be_open).await?;
            must_be_open.clear();
        }
        match write {
            Write::TaskOpen { id } => must_be_open.push(id),
            Write::NoNewDenial { task, since, seen } => {
                let denied: Vec<String> = sqlx::query_scalar(rows::TASK_DENIED_SINCE)
                    .bind(task)
                    .bind(to_i64(*since))
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(refused)?;
                rows::refuse_new_denial(task, &denied, seen)?;
            }
            Write::InsertTask(t) => {
                // As in SQLite: the write lock above serialises commits across
                // replicas, so a parent ended before this commit is seen here,
                // and one ended after it finds the child.
                // The tree's root counts the sub-task, up to MAX_SUBTASKS.
                let mut root = None;
                if let Some(parent) = &t.parent {
                    let found: Option<String> = sqlx::query_scalar(rows::TASK_OPEN_ROOT)
                        .bind(parent)
                        .fetch_optional(&mut *tx)
                        .await
                        .map_err(refused)?;
                    let Some(found) = found else {
                        return Err(StoreError::Conflict(format!(
                            "parent task {parent} has ended"
                        )));
                    };
                    let counted = sqlx::query(rows::COUNT_SUBTASK)
                        .bind(&found)
                        .bind(i64::from(crate::MAX_SUBTASKS))
                        .execute(&mut *tx)
                        .await
                        .map_err(refused)?;
                    if counted.rows_affected() == 0 {
                        return Err(rows::too_many_subtasks(&found));
                    }
                    root = Some(found);
                }
                let (agent, actor, may_act) = rows::task_json(t)?;
                sqlx::query(
                    "INSERT INTO tasks (id, parent_id, agent, actor, may_act, agent_iss, agent_sub, grants, purpose, \
                     environment, depth, token_jti, created_at, expires_at, held, root_id) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16)",
                )
                .bind(&t.id)
                .bind(&t.parent)
                .bind(agent)
                .bind(actor)
                .bind(may_act)
                .bind(&t.agent.issuer)
                .bind(&t.agent.subject)
                .bind(&t.grants)
                .bind(&t.purpose)
                .bind(&t.environment)
                .bind(i64::from(t.depth))
                .bind(&t.token_jti)
                .bind(to_i64(t.created_at))
                .bind(to_i64(t.expires_at))
                .bind(&t.held)
                .bind(root)
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
            }
            Write::EndTask {
                id,
                at,
                reason,
                grace,
            }
            | Write::EndOpenTask {
                id,
                at,
                reason,
                grace,
            } => {
                if matches!(write, Write::EndOpenTask { .. }) {
                    refuse_if_ended(&mut *tx, id, "it is not ended again").await?;
                }
                sqlx::query(
                    "WITH RECURSIVE sub(id) AS (SELECT $1::text UNION SELECT t.id FROM tasks t JOIN sub ON t.parent_id = sub.id) \
                     INSERT INTO revocations (kind, txn, jti, exp, at) \
                     SELECT 'task', id, NULL, expires_at + $3, $2 FROM tasks \
                     WHERE id IN (SELECT id FROM sub) AND expires_at + $3 > $2 AND (ended_at IS NULL \
                     OR (ended_at >= expires_at AND NOT EXISTS (SELECT 1 FROM revocations r WHERE r.kind = 'task' AND r.txn = tasks.id))) ORDER BY id",
                )
                .bind(id)
                .bind(to_i64(*at))
                .bind(to_i64(*grace))
                .execute(&mut *tx)
                .await
                .map_err(refused)?;
                sqlx::query(
                    "WITH RECURSIVE sub(id) AS (SELECT $1::text UNION SELECT t.id FROM tasks t JOIN sub ON t.parent_id = sub.id) \
                     UPDATE tasks SET ended_at = $2, end_reason = CASE WHEN id = $1 THEN $3 ELSE 'parent ended' END \
                     WHERE id IN (SELECT id FROM sub) AND ended_at IS NULL",
                )
                .bind(id)
                .bind(to_i64(*at))
                .bind(reason)
                .execute(&mut *tx)
                .await
                .map_err(refused)?;
                revoked = true;
            }
            Write::AnnounceEnded { id, at, grace } => {
                let published: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM revocations WHERE kind = 'task' AND txn = $1)",
                )
                .bind(id)
                .fetch_one(&mut *tx)
                .await
                .map_err(refused)?;
                if published {
                    return Err(StoreError::Conflict(format!(
                        "task {id}'s end is published already"
                    )));
                }
                sqlx::query(
                    "WITH RECURSIVE sub(id) AS (SELECT $1::text UNION SELECT t.id FROM tasks t JOIN sub ON t.parent_id = sub.id) \
                     INSERT INTO revocations (kind, txn, jti, exp, at) \
                     SELECT 'task', id, NULL, expires_at + $3, $2 FROM tasks \
                     WHERE id IN (SELECT id FROM sub) AND ended_at IS NOT NULL AND expires_at + $3 > $2 \
                     AND NOT EXISTS (SELECT 1 FROM revocations r WHERE r.kind = 'task' AND r.txn = tasks.id) ORDER BY id",
                )
                .bind(id)
                .bind(to_i64(*at))
                .bind(to_i64(*grace))
                .execute(&mut *tx)
                .await
                .map_err(refused)?;
                revoked = true;
            }
            Write::RevokeToken {
                jti,
                task_id,
                expires_at,
                at,
            }
            | Write::RevokeTokenOnce {
                jti,
                task_id,
                expires_at,
                at,
            }
            | Write::ClaimToken {
                jti,
                task_id,
                expires_at,
                at,
            } => {
                let once = !matches!(write, Write::RevokeToken { .. });
                if matches!(write, Write::ClaimToken { .. }) {
                    // As in SQLite: a use claimed after the task ended is no
                    // use.
                    refuse_if_ended(&mut *tx, task_id, "its token's use is not claimed").await?;
                }
                let inserted = sqlx::query(if once {
                    "INSERT INTO revoked_tokens (jti, task_id, expires_at, revoked_at) VALUES ($1, $2, $3, $4)"
                } else {
                    "INSERT INTO revoked_tokens (jti, task_id, expires_at, revoked_at) VALUES ($1, $2, $3, $4) \
                     ON CONFLICT (jti) DO NOTHING"
                })
                .bind(jti)
                .bind(task_id)
                .bind(to_i64(*expires_at))
                .bind(to_i64(*at))
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
                if inserted.rows_affected() > 0 {
                    sqlx::query("INSERT INTO revocations (kind, txn, jti, exp, at) VALUES ('token', $1, $2, $3, $4)")
                        .bind(task_id)
                        .bind(jti)
                        .bind(to_i64(*expires_at))
                        .bind(to_i64(*at))
                        .execute(&mut *tx)
                        .await
                        .map_err(refused)?;
                    revoked = true;
                }
            }
            // Recorded after the loop, all in one statement.
            Write::SpendProof { id, iat } => {
                proofs.push((to_i64(*iat), id.to_vec()));
            }
            Write::PurgeProofs { made_before, limit } => {
                // By the rows' places, as the revocations (below).
                sqlx::query(
                    "DELETE FROM dpop_proofs WHERE ctid = ANY(ARRAY( \
                     SELECT ctid FROM dpop_proofs WHERE iat <= $1 ORDER BY iat LIMIT $2))",
                )
                .bind(to_i64(*made_before))
                .bind(i64::from(*limit))
                .execute(&mut *tx)
                .await
                .map_err(refused)?;
            }
            Write::PurgeRevocations { now, limit } => {
                // Each by its rows' places (the write lock holds them
                // still), found through the index on their time: a join on
                // the key would read the whole table, a busy one of
                // millions of rows, every second (with 1.5 million revoked
                // tokens, 289 ms a purge that way, 5 ms this way).
                for (sql, limit) in [
                    (
                        "DELETE FROM revoked_tokens WHERE ctid = ANY(ARRAY( \
                         SELECT ctid FROM revoked_tokens WHERE expires_at <= $1 ORDER BY expires_at LIMIT $2))",
                        i64::from(*limit),
                    ),
                    (
                        "DELETE FROM revocations WHERE ctid = ANY(ARRAY( \
                         SELECT ctid FROM revocations WHERE exp <= $1 ORDER BY exp LIMIT $2))",
                        i64::from(*limit),
                    ),
                    // A few rows at most: every key ever published.
                    (
                        "DELETE FROM signing_keys WHERE publish_until <= $1 AND $2 > 0",
                        i64::from(*limit),
                    ),
                ] {
                    sqlx::query(sql)
                        .bind(to_i64(*now))
                        .bind(limit)
                        .execute(&mut *tx)
                        .await
                        .map_err(refused)?;
                }
            }
            Write::InsertApproval(a) => {
                let (waiting, same): (i64, i64) = sqlx::query_as(
                    "SELECT COUNT(*), COUNT(*) FILTER (WHERE tool = $3 AND actions = $4) \
                     FROM approvals WHERE task_id = $1 AND state = 'pending' AND expires_at > $2",
                )
                .bind(&a.task_id)
                .bind(to_i64(a.created_at))
                .bind(&a.tool)
                .bind(&a.actions)
                .fetch_one(&mut *tx)
                .await
                .map_err(refused)?;
                let (agent_waiting, actor_waiting): (i64, i64) =
                    sqlx::query_as(rows::PENDING_NEAR_TASK_POSTGRES)
                        .bind(&a.task_id)
                        .bind(to_i64(a.created_at))
                        .fetch_one(&mut *tx)
                        .await
                        .map_err(refused)?;
                rows::check_pending(a, waiting, same, agent_waiting, actor_waiting)?;
                sqlx::query(
                    "INSERT INTO approvals (id, task_id, tool, actions, state, created_at, expires_at, approvable) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
                )
                .bind(&a.id)
                .bind(&a.task_id)
                .bind(&a.tool)
                .bind(&a.actions)
                .bind(a.state.as_str())
                .bind(to_i64(a.created_at))
                .bind(to_i64(a.expires_at))
                .bind(&a.approvable)
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
            }
            Write::UpdateApproval {
                id,
                from,
                to,
                by,
                at,
                reason,
                token_jti,
            } => {
                let changed = sqlx::query(
                    "UPDATE approvals SET state = $1, \
                     decided_by = COALESCE($2::text, decided_by), \
                     decided_at = CASE WHEN $2::text IS NULL THEN decided_at ELSE $3 END, \
                     reason = COALESCE($4::text, reason), token_jti = COALESCE($5::text, token_jti) \
                     WHERE id = $6 AND state = $7",
                )
                .bind(to.as_str())
                .bind(by)
                .bind(to_i64(*at))
                .bind(reason)
                .bind(token_jti)
                .bind(id)
                .bind(from.as_str())
                .execute(&mut *tx)
                .await
                .map_err(refused)?;
                if changed.rows_affected() == 0 {
                    return Err(StoreError::Conflict(format!(
                        "approval {id} is not {} any more",
                        from.as_str()
                    )));
                }
            }
            Write::Audit(a) => audit.push(a, chain)?,
            Write::PutSecret {
                secret,
                purge_retired_before,
            } => {
                // As in SQLite; a version stored by a transaction still
                // running makes the insert below conflict instead.
                let taken: bool = sqlx::query_scalar(
                    "SELECT EXISTS (SELECT 1 FROM secrets WHERE name = $1 AND action = $2 AND version >= $3)",
                )
                .bind(&secret.name)
                .bind(&secret.action)
                .bind(i64::from(secret.version))
                .fetch_one(&mut *tx)
                .await
                .map_err(refused)?;
                if taken {
                    return Err(crate::rows::secret_version_taken(secret));
                }
                sqlx::query(
                    "UPDATE secrets SET retired_at = $1 \
                     WHERE name = $2 AND action = $3 AND retired_at IS NULL",
                )
                .bind(to_i64(secret.created_at))
                .bind(&secret.name)
                .bind(&secret.action)
                .execute(&mut *tx)
                .await
                .map_err(refused)?;
                sqlx::query(
                    "DELETE FROM secrets WHERE name = $1 AND action = $2 \
                     AND retired_at IS NOT NULL AND retired_at <= $3",
                )
                .bind(&secret.name)
                .bind(&secret.action)
                .bind(to_i64(*purge_retired_before))
                .execute(&mut *tx)
                .await
                .map_err(refused)?;
                sqlx::query(
                    "INSERT INTO secrets (name, action, version, sealed, created_at) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&secret.name)
                .bind(&secret.action)
                .bind(i64::from(secret.version))
                .bind(&secret.sealed)
                .bind(to_i64(secret.created_at))
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
            }
            Write::Checkpoint(c) => {
                sqlx::query(
                    "INSERT INTO audit_checkpoints (chain_id, chain_seq, hash, at_ms, signature) \
                     VALUES ($1, $2, $3, $4, $5)",
                )
                .bind(&c.chain_id)
                .bind(to_i64(c.chain_seq))
                .bind(&c.hash)
                .bind(to_i64(c.at_ms))
                .bind(&c.signature)
                .execute(&mut *tx)
                .await
                .map_err(refused)?;
            }
            Write::InsertKey { key: k, after } => {
                // Keys no longer published (withdrawn, or past their time
                // and not purged yet) are not followed.
                let kept: Vec<(String, i64)> = sqlx::query_as(crate::rows::KEYS_OF_PURPOSE)
                    .bind(k.purpose.as_str())
                    .bind(to_i64(k.created_at))
                    .fetch_all(&mut *tx)
                    .await
                    .map_err(refused)?;
                crate::rows::refuse_unless_newest(&kept, after.as_deref())?;
                sqlx::query(concat!(
                    "INSERT INTO signing_keys (",
                    key_columns!(),
                    ") VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)"
                ))
                .bind(&k.kid)
                .bind(k.purpose.as_str())
                .bind(&k.alg)
                .bind(&k.public_jwk)
                .bind(&k.sealed)
                .bind(to_i64(k.created_at))
                .bind(to_i64(k.active_at))
                .bind(k.retired_at.map(to_i64))
                .bind(k.publish_until.map(to_i64))
                .execute(&mut *tx)
                .await
                .map_err(failed)?;
                keys = true;
            }
            Write::WithdrawKey { kid, at } => {
                let withdrawn = sqlx::query(
                    "UPDATE signing_keys SET retired_at = LEAST(COALESCE(retired_at, $1), $1), \
                     publish_until = 0 WHERE kid = $2",
                )
                .bind(to_i64(*at))
                .bind(kid)
                .execute(&mut *tx)
                .await
                .map_err(refused)?;
                rows::withdrawn(
                    usize::try_from(withdrawn.rows_affected()).unwrap_or(usize::MAX),
                    kid,
                )?;
                keys = true;
            }
            Write::RetireKey {
                kid,
                at,
                publish_until,
            } => {
                let retired = sqlx::query(
                    "UPDATE signing_keys SET retired_at = $1, publish_until = $2 \
                     WHERE kid = $3 AND retired_at IS NULL",
                )
                .bind(to_i64(*at))
                .bind(to_i64(*publish_until))
                .bind(kid)
                .execute(&mut *tx)
                .await
                .map_err(refused)?;
                rows::retired_once(
                    usize::try_from(retired.rows_affected()).unwrap_or(usize::MAX),
                    kid,
                )?;
                keys = true;
            }
            Write::DeleteSecret {
                name,
                action,
                through,
            } => {
                let newer: bool = sqlx::query_scalar(rows::SECRET_NEWER)
                    .bind(name)
                    .bind(action)
                    .bind(i64::from(*through))
                    .fetch_one(&mut *tx)
                    .await
                    .map_err(refused)?;
                let changed = if newer {
                    0
                } else {
                    sqlx::query(rows::DELETE_SECRET)
                        .bind(name)
                        .bind(action)
                        .execute(&mut *tx)
                        .await
                        .map_err(refused)?
                        .rows_affected()
                };
                rows::deleted_secret(
                    newer,
                    usize::try_from(changed).unwrap_or(usize::MAX),
                    name,
                    action,
                )?;
            }
            Write::ResealKey { kid, from, to } => {
                let changed = sqlx::query(rows::RESEAL_KEY)
                    .bind(to)
                    .bind(kid)
                    .bind(from)
                    .execute(&mut *tx)
                    .await
                    .map_err(refused)?;
                rows::resealed(
                    usize::try_from(changed.rows_affected()).unwrap_or(usize::MAX),
                    &format!("key `{kid}`"),
                )?;
            }
            Write::ResealSecret {
                name,
                action,
                version,
                from,
                to,
            } => {
                let changed = sqlx::query(rows::RESEAL_SECRET)
                    .bind(to)
                    .bind(name)
                    .bind(action)
                    .bind(i64::from(*version))
                    .bind(from)
                    .execute(&mut *tx)
                    .await
                    .map_err(refused)?;
                rows::resealed(
                    usize::try_from(changed.rows_affected()).unwrap_or(usize::MAX),
                    &format!("secret {name}/{action} version {version}"),
                )?;
            }
        }
    }
    refuse_any_ended(tx, &must_be_open).await?;
    spend_proofs(tx, proofs).await?;
    let head = chain.signed_head(before)?;
    audit.insert(tx, head.as_ref()).await?;
    // Delivered to the other replicas when (and only if) this commits.
    for (changed, payload) in [(revoked, "revocations"), (keys, "keys")] {
        if changed {
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(CHANNEL)
                .bind(payload)
                .execute(&mut *tx)
                .await
                .map_err(refused)?;
        }
    }
    Ok(())
}

/// Has the database end what a read connection runs once its client has
/// gone (checked every second), on a server that takes the setting (see
/// [`LIMITS_CHECKING`]; it is set only where the writer's probe found it
/// taken): a read [`Reading`] closes goes on waiting in the database
/// otherwise, for as long as whatever holds it (a lock) lasts. Set for the
/// session.
async fn check_client(conn: &mut PgConnection) -> Result<(), sqlx::Error> {
    if let Err(e) = sqlx::query("SET client_connection_check_interval = '1s'")
        .execute(conn)
        .await
    {
        tracing::warn!(error = %e, "a read connection cannot have the database check for it gone mid-statement");
    }
    Ok(())
}

/// How long a connection whose read was cut short (out of time, or its
/// caller gone) may take to answer before it is closed rather than handed
/// back to the pool ([`Reading`]).
const SETTLE: Duration = Duration::from_secs(30);

/// A pooled connection while a read runs on it. Cut short, the read leaves
/// its answer on the way: the pool, handed the connection back, would check
/// it with a round trip of its own that waits for that answer without a
/// bound, and from a database gone silent (a host failed over, a link cut
/// without a reset) waits for TCP to give up, many minutes, holding its
/// place all the while, so that a few such reads would fail every later one
/// long after the database came back. So a read cut short hands its
/// connection back only once it answers within [`SETTLE`], and closes it
/// otherwise. It is not closed at once: a read held by a lock (a migration,
/// a `VACUUM FULL`) goes on waiting in the database after its connection
/// closes, and a pool that opened another for every read timed out would
/// pile such sessions up to the database's connection limit; held for
/// [`SETTLE`], a pool opens at most its size of them in that time.
struct Reading(Option<sqlx::pool::PoolConnection<sqlx::Postgres>>);

impl Reading {
    /// The connection to read on.
    fn conn(&mut self) -> Result<&mut PgConnection, StoreError> {
        self.0
            .as_deref_mut()
            .ok_or_else(|| unavailable("the read's connection was handed back"))
    }

    /// The read is done: its connection goes back to the pool.
    fn done(mut self) {
        drop(self.0.take());
    }
}

impl Drop for Reading {
    fn drop(&mut self) {
        if let Some(conn) = self.0.take()
            && let Ok(runtime) = tokio::runtime::Handle::try_current()
        {
            runtime.spawn(settle(conn));
        }
    }
}

/// Hands `conn`, whose read was cut short, back to the pool once it
/// answers within [`SETTLE`]; closes it otherwise.
async fn settle(mut conn: sqlx::pool::PoolConnection<sqlx::Postgres>) {
    if !matches!(tokio::time::timeout(SETTLE, conn.ping()).await, Ok(Ok(()))) {
        drop(conn.detach());
    }
}

/// Runs a read, `$query` on a connection of `$pool` named `$conn`, within
/// `$limit` from its start, connection included; a read cut short leaves
/// its connection to [`Reading`].
macro_rules! read {
    ($pool:expr, $limit:expr, |$conn:ident| $query:expr $(,)?) => {
        async {
            let deadline = tokio::time::Instant::now() + $limit;
            let late = || unavailable("the database did not answer in time");
            let mut reading = Reading(Some(
                tokio::time::timeout_at(deadline, $pool.acquire())
                    .await
                    .map_err(|_| late())?
                    .map_err(unavailable)?,
            ));
            let answer = {
                let $conn = reading.conn()?;
                tokio::time::timeout_at(deadline, $query).await
            };
            match answer {
                Ok(result) => {
                    reading.done();
                    result.map_err(unavailable)
                }
                Err(_) => Err(late()),
            }
        }
    };
}

#[async_trait::async_trait]
impl Store for PgStore {
    async fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        self.writer.commit(writes).await
    }

    async fn task(&self, id: &str) -> Result<Option<TaskRecord>, StoreError> {
        let row = read!(self.reads, TIMEOUT, |c| sqlx::query(concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE id = $1"
        ))
        .bind(id)
        .fetch_optional(c))
        .await?;
        row.as_ref().map(rows::task).transpose()
    }

    async fn token_task(
        &self,
        jti: &str,
        task_id: &str,
    ) -> Result<Option<(TaskRecord, bool)>, StoreError> {
        let row = read!(self.reads, TIMEOUT, |c|
            sqlx::query(concat!(
                "SELECT ",
                task_columns!(),
                ", (CASE WHEN EXISTS (SELECT 1 FROM revoked_tokens WHERE jti = $1) THEN 1 ELSE 0 END)::int8 \
                 AS revoked FROM tasks WHERE id = $2"
            ))
            .bind(jti)
            .bind(task_id)
            .fetch_optional(c)
        )
        .await?;
        row.as_ref().map(rows::token_task).transpose()
    }

    async fn token_revoked(&self, jti: &str) -> Result<bool, StoreError> {
        let row = read!(self.reads, TIMEOUT, |c| sqlx::query(
            "SELECT 1 FROM revoked_tokens WHERE jti = $1"
        )
        .bind(jti)
        .fetch_optional(c))
        .await?;
        Ok(row.is_some())
    }

    async fn due_tasks(&self, now: u64, limit: u32) -> Result<Vec<TaskRecord>, StoreError> {
        let rows = read!(self.reads, TIMEOUT, |c|
            sqlx::query(concat!(
                "SELECT ",
                task_columns!(),
                " FROM tasks WHERE ended_at IS NULL AND expires_at <= $1 ORDER BY expires_at, depth DESC, id LIMIT $2"
            ))
            .bind(to_i64(now))
            .bind(i64::from(limit))
            .fetch_all(c)
        )
        .await?;
        rows.iter().map(rows::task).collect()
    }

    async fn open_tasks(
        &self,
        now: u64,
        agent_sub: Option<&str>,
        after: Option<(u64, &str)>,
        limit: u32,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let (sql, args) =
            rows::open_tasks_query(now, agent_sub, None, after, limit, |n| format!("${n}"));
        let rows = read!(self.reads, TIMEOUT, |c| rows::bind_all(
            sqlx::query(sqlx::AssertSqlSafe(sql)),
            args
        )
        .fetch_all(c))
        .await?;
        rows.iter().map(rows::task).collect()
    }

    async fn open_tasks_acted_by(
        &self,
        now: u64,
        actor_sub: &str,
        after: Option<(u64, &str)>,
        limit: u32,
    ) -> Result<Vec<TaskRecord>, StoreError> {
        let actor = Some((actor_sub, "(actor::jsonb ->> 'sub')"));
        let (sql, args) =
            rows::open_tasks_query(now, None, actor, after, limit, |n| format!("${n}"));
        // It reads every open task, as the audit's queries may read much
        // of the trail: the same time to answer.
        let rows = read!(self.reads, QUERY_TIMEOUT, |c| rows::bind_all(
            sqlx::query(sqlx::AssertSqlSafe(sql)),
            args
        )
        .fetch_all(c))
        .await?;
        rows.iter().map(rows::task).collect()
    }

    async fn tree_size(&self, id: &str) -> Result<Option<u32>, StoreError> {
        let size: Option<i64> = read!(self.reads, TIMEOUT, |c| sqlx::query_scalar(rows::TREE_SIZE)
            .bind(id)
            .fetch_optional(c))
        .await?;
        Ok(size.map(|n| u32::try_from(n).unwrap_or(u32::MAX)))
    }

    async fn open_descendants(&self, id: &str) -> Result<Vec<String>, StoreError> {
        let rows = read!(self.reads, TIMEOUT, |c|
            sqlx::query(
                "WITH RECURSIVE sub(id) AS (SELECT id FROM tasks WHERE parent_id = $1 \
                 UNION SELECT t.id FROM tasks t JOIN sub ON t.parent_id = sub.id) \
                 SELECT tasks.id FROM tasks JOIN sub ON tasks.id = sub.id WHERE tasks.ended_at IS NULL \
                 ORDER BY tasks.id",
            )
            .bind(id)
            .fetch_all(c)
        )
        .await?;
        rows.iter().map(|r| rows::Cols::text(r, "id")).collect()
    }

    async fn audit(&self, filter: &AuditFilter) -> Result<Vec<AuditEvent>, StoreError> {
        // Both within the audit query's time: the first reads the index
        // entries of every record since `since_ms`.
        let floor = match filter.since_ms {
            Some(since) => Some(rows::since_floor(
                read!(self.reads, QUERY_TIMEOUT, |c| sqlx::query_scalar(
                    rows::FIRST_SINCE
                )
                .bind(to_i64(since))
                .fetch_one(c))
                .await?,
            )),
            None => None,
        };
        let (sql, args) =
            rows::audit_query(filter, floor, |n| format!("${n}"), rows::postgres_in_chain);
        let rows = read!(self.reads, QUERY_TIMEOUT, |c| rows::bind_all(
            sqlx::query(sqlx::AssertSqlSafe(sql)),
            args
        )
        .fetch_all(c))
        .await?;
        rows.iter().map(rows::audit_event).collect()
    }

    async fn audit_rows(
        &self,
        after_seq: i64,
        limit: u32,
    ) -> Result<Vec<StoredRecord>, StoreError> {
        let rows = read!(self.reads, TIMEOUT, |c|
            sqlx::query(
                "SELECT seq, at_ms, event, decision, agent_iss, agent_sub, task_id, parent_id, tool, jti, replica, chain_id, chain_seq, hash, record FROM audit WHERE seq > $1 ORDER BY seq LIMIT $2",
            )
            .bind(after_seq)
            .bind(i64::from(limit))
            .fetch_all(c)
        )
        .await?;
        rows.iter().map(rows::stored_record).collect()
    }

    async fn revocations(
        &self,
        after: i64,
        now: u64,
        limit: u32,
    ) -> Result<Vec<Revocation>, StoreError> {
        let rows = read!(self.reads, TIMEOUT, |c|
            sqlx::query(
                "SELECT seq, kind, txn, jti, exp FROM revocations WHERE seq > $1 AND exp > $2 ORDER BY seq LIMIT $3",
            )
            .bind(after)
            .bind(to_i64(now))
            .bind(i64::from(limit))
            .fetch_all(c)
        )
        .await?;
        rows.iter().map(rows::revocation).collect()
    }

    async fn latest_audit_seq(&self) -> Result<i64, StoreError> {
        let row = read!(self.reads, TIMEOUT, |c| sqlx::query(
            "SELECT COALESCE(MAX(seq), 0)::bigint AS m FROM audit"
        )
        .fetch_one(c))
        .await?;
        rows::Cols::int(&row, "m")
    }

    async fn latest_revocation(&self) -> Result<i64, StoreError> {
        let row = read!(self.reads, TIMEOUT, |c| sqlx::query(
            "SELECT COALESCE(MAX(seq), 0)::bigint AS m FROM revocations"
        )
        .fetch_one(c))
        .await?;
        rows::Cols::int(&row, "m")
    }

    async fn approval(&self, id: &str) -> Result<Option<Approval>, StoreError> {
        let row = read!(self.reads, TIMEOUT, |c| sqlx::query(concat!(
            "SELECT ",
            approval_columns!(),
            " FROM approvals WHERE id = $1",
        ))
        .bind(id)
        .fetch_optional(c))
        .await?;
        row.as_ref().map(rows::approval).transpose()
    }

    async fn pending_approvals(&self, now: u64, limit: u32) -> Result<Vec<Approval>, StoreError> {
        let rows = read!(self.reads, TIMEOUT, |c|
            sqlx::query(concat!(
                "SELECT ",
                approval_columns!(),
                " FROM approvals WHERE state = 'pending' AND expires_at > $1 \
                 AND EXISTS (SELECT 1 FROM tasks t WHERE t.id = approvals.task_id AND t.ended_at IS NULL AND t.expires_at > $1) \
                 ORDER BY created_at, id LIMIT $2",
            ))
            .bind(to_i64(now))
            .bind(i64::from(limit))
            .fetch_all(c)
        )
        .await?;
        rows.iter().map(rows::approval).collect()
    }

    async fn agent_pending_approvals(
        &self,
        issuer: &str,
        subject: &str,
        now: u64,
    ) -> Result<usize, StoreError> {
        let n: i64 = read!(self.reads, TIMEOUT, |c| sqlx::query_scalar(
            rows::AGENT_PENDING
        )
        .bind(to_i64(now))
        .bind(issuer)
        .bind(subject)
        .fetch_one(c))
        .await?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    async fn actor_pending_approvals(&self, task_id: &str, now: u64) -> Result<usize, StoreError> {
        let (_, n): (i64, i64) = read!(self.reads, TIMEOUT, |c| sqlx::query_as(
            rows::PENDING_NEAR_TASK_POSTGRES
        )
        .bind(task_id)
        .bind(to_i64(now))
        .fetch_one(c))
        .await?;
        Ok(usize::try_from(n).unwrap_or(usize::MAX))
    }

    async fn task_pending_approvals(
        &self,
        task_id: &str,
        now: u64,
    ) -> Result<Vec<Approval>, StoreError> {
        let rows = read!(self.reads, TIMEOUT, |c|
            sqlx::query(concat!(
                "SELECT ",
                approval_columns!(),
                " FROM approvals WHERE state = 'pending' AND expires_at > $1 AND task_id = $2 ORDER BY created_at, id",
            ))
            .bind(to_i64(now))
            .bind(task_id)
            .fetch_all(c)
        )
        .await?;
        rows.iter().map(rows::approval).collect()
    }

    async fn task_approved_approvals(
        &self,
        task_id: &str,
        now: u64,
    ) -> Result<Vec<Approval>, StoreError> {
        let rows = read!(self.reads, TIMEOUT, |c|
            sqlx::query(concat!(
                "SELECT ",
                approval_columns!(),
                " FROM approvals WHERE state = 'approved' AND expires_at > $1 AND task_id = $2 ORDER BY created_at, id",
            ))
            .bind(to_i64(now))
            .bind(task_id)
            .fetch_all(c)
        )
        .await?;
        rows.iter().map(rows::approval).collect()
    }

    async fn task_denials(&self, task_id: &str, since: u64) -> Result<Vec<Approval>, StoreError> {
        let rows = read!(self.reads, TIMEOUT, |c|
            sqlx::query(concat!(
                "SELECT ",
                approval_columns!(),
                " FROM approvals WHERE state = 'denied' AND task_id = $1 AND decided_at >= $2 ORDER BY decided_at DESC, id",
            ))
            .bind(task_id)
            .bind(to_i64(since))
            .fetch_all(c)
        )
        .await?;
        rows.iter().map(rows::approval).collect()
    }

    async fn agent_denials(
        &self,
        issuer: &str,
        subject: &str,
        tool: &str,
        since: u64,
        limit: u32,
    ) -> Result<Vec<Approval>, StoreError> {
        let rows = read!(self.reads, TIMEOUT, |c| sqlx::query(rows::AGENT_DENIALS)
            .bind(to_i64(since))
            .bind(tool)
            .bind(issuer)
            .bind(subject)
            .bind(i64::from(limit))
            .fetch_all(c))
        .await?;
        rows.iter().map(rows::approval).collect()
    }

    async fn expired_approvals(&self, now: u64, limit: u32) -> Result<Vec<Approval>, StoreError> {
        let rows = read!(self.reads, TIMEOUT, |c| sqlx::query(concat!(
            "SELECT ",
            approval_columns!(),
            " FROM approvals WHERE state IN ('pending', 'approved') AND expires_at <= $1 ORDER BY expires_at, id LIMIT $2",
        ))
        .bind(to_i64(now))
        .bind(i64::from(limit))
        .fetch_all(c))
        .await?;
        rows.iter().map(rows::approval).collect()
    }

    async fn orphaned_approvals(&self, now: u64, limit: u32) -> Result<Vec<Approval>, StoreError> {
        let rows = read!(self.reads, TIMEOUT, |c| sqlx::query(concat!(
            "SELECT ",
            approval_columns!(),
            " FROM approvals WHERE ",
            orphaned_where!("$1"),
            " ORDER BY expires_at, id LIMIT $2",
        ))
        .bind(to_i64(now))
        .bind(i64::from(limit))
        .fetch_all(c))
        .await?;
        rows.iter().map(rows::approval).collect()
    }

    async fn chain_links(&self) -> Result<Vec<ChainLink>, StoreError> {
        let rows = read!(self.reads, TIMEOUT, |c| sqlx::query(
            "SELECT record FROM audit WHERE event = 'chain.started' ORDER BY seq"
        )
        .fetch_all(c))
        .await?;
        let mut links = Vec::new();
        for r in &rows {
            links.extend(rows::genesis_links(r)?);
        }
        Ok(links)
    }

    async fn latest_checkpoints(&self) -> Result<Vec<Checkpoint>, StoreError> {
        let rows = read!(self.reads, TIMEOUT, |c| sqlx::query(
            rows::LATEST_CHECKPOINTS
        )
        .fetch_all(c))
        .await?;
        rows.iter().map(rows::checkpoint).collect()
    }

    async fn keys(&self, now: u64) -> Result<Vec<StoredKey>, StoreError> {
        let rows = read!(self.reads, TIMEOUT, |c| sqlx::query(concat!(
            "SELECT ",
            key_columns!(),
            " FROM signing_keys WHERE publish_until IS NULL OR publish_until > $1 \
                 ORDER BY created_at, kid"
        ))
        .bind(to_i64(now))
        .fetch_all(c))
        .await?;
        rows.iter().map(rows::key).collect()
    }

    async fn secrets(&self) -> Result<Vec<SecretRecord>, StoreError> {
        let rows = read!(self.reads, TIMEOUT, |c| sqlx::query(
            "SELECT name, action, version, sealed, created_at, retired_at FROM secrets \
                 ORDER BY name, action, version DESC",
        )
        .fetch_all(c))
        .await?;
        rows.iter().map(rows::secret).collect()
    }

    async fn secret_versions(
        &self,
        name: &str,
        action: &str,
    ) -> Result<Vec<SecretRecord>, StoreError> {
        let rows = read!(self.reads, TIMEOUT, |c| sqlx::query(
            "SELECT name, action, version, sealed, created_at, retired_at FROM secrets \
                 WHERE name = $1 AND action = $2 ORDER BY version DESC",
        )
        .bind(name)
        .bind(action)
        .fetch_all(c))
        .await?;
        rows.iter().map(rows::secret).collect()
    }

    fn chain_head(&self) -> Option<ChainLink> {
        self.writer.head()
    }

    fn sign_heads_with(&self, signer: std::sync::Arc<dyn crate::HeadSigner>) -> bool {
        self.writer.sign_heads_with(signer)
    }

    fn changes(&self) -> watch::Receiver<Changes> {
        self.writer.changes().subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::AuditEvent;

    /// `localhost` is dialled at 127.0.0.1 (the resolver might say `::1`,
    /// where another user could listen), unless TLS checks that name.
    #[test]
    fn localhost_is_127_0_0_1_unless_tls_checks_the_name() {
        let host = |url: &str| {
            pin_localhost(PgConnectOptions::from_str(url).unwrap())
                .get_host()
                .to_owned()
        };
        for url in [
            "postgres://scrip@localhost/scrip",
            "postgres://scrip@LocalHost.:5433/scrip?sslmode=require",
            "postgres:///scrip?host=localhost&sslmode=disable",
        ] {
            assert_eq!(host(url), "127.0.0.1", "{url}");
        }
        for (url, kept) in [
            (
                "postgres://scrip@localhost/scrip?sslmode=verify-full",
                "localhost",
            ),
            ("postgres://scrip@[::1]/scrip", "[::1]"),
            ("postgres://scrip@db.example/scrip", "db.example"),
            (
                "postgres://scrip@localhost.example/scrip",
                "localhost.example",
            ),
        ] {
            assert_eq!(host(url), kept, "{url}");
        }
    }

    #[test]
    fn messages_never_show_a_password() {
        let shown = redacted(
            "postgres://scrip:Userinfo9@db/scrip?sslmode=require&password=Query7&SSLPassword=Key5",
        );
        for secret in ["Userinfo9", "Query7", "Key5"] {
            assert!(!shown.contains(secret), "{shown}");
        }
        assert!(shown.contains("sslmode=require"), "{shown}");
        assert_eq!(redacted("not a url"), "the database_url");
    }

    /// An unreachable database with a password in the query: the error
    /// says where, not with what.
    #[tokio::test]
    async fn an_open_error_never_shows_a_password() {
        let Err(e) = PgStore::connect("postgres://scrip@127.0.0.1:1/scrip?password=Query7").await
        else {
            panic!("connected to nothing");
        };
        let text = e.to_string();
        assert!(text.contains("127.0.0.1:1"), "{text}");
        assert!(!text.contains("Query7"), "{text}");
    }

    /// A database in another encoding than UTF8 is refused at start,
    /// saying why; a value a database refuses is the commit's own.
    #[tokio::test]
    async fn only_a_utf8_database_is_taken_and_a_refused_value_is_the_commits() {
        let latin = scrip_testkit::PgDatabase::with(
            "ENCODING 'LATIN1' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
        );
        let Err(e) = PgStore::connect(latin.url()).await else {
            panic!("a LATIN1 database was taken");
        };
        let text = e.to_string();
        assert!(
            text.contains("encoding is LATIN1; scrip needs UTF8"),
            "{text}"
        );
        // What such a database says of an arrow.
        let mut conn = PgConnection::connect(latin.url()).await.unwrap();
        let e = sqlx::query("SELECT $1::text")
            .bind("fix login \u{2192} ship")
            .execute(&mut conn)
            .await
            .unwrap_err();
        assert!(matches!(failed(e), StoreError::Refused(_)));
        let e = sqlx::query("SELECT 'x'::int")
            .execute(&mut conn)
            .await
            .unwrap_err();
        assert!(matches!(failed(e), StoreError::Refused(_)));
        // A uniqueness violation is a conflict; a missing table the store's.
        for sql in [
            "CREATE TABLE t (id int PRIMARY KEY)",
            "INSERT INTO t VALUES (1)",
        ] {
            sqlx::query(sql).execute(&mut conn).await.unwrap();
        }
        let e = sqlx::query("INSERT INTO t VALUES (1)")
            .execute(&mut conn)
            .await
            .unwrap_err();
        assert!(matches!(failed(e), StoreError::Conflict(_)));
        let e = sqlx::query("SELECT * FROM nowhere")
            .execute(&mut conn)
            .await
            .unwrap_err();
        assert!(matches!(failed(e), StoreError::Unavailable(_)));
        drop(conn);
        let utf8 = scrip_testkit::PgDatabase::new();
        PgStore::connect(utf8.url()).await.unwrap();
        // SQL_ASCII converts nothing: it stores what it is sent.
        let ascii = scrip_testkit::PgDatabase::with(
            "ENCODING 'SQL_ASCII' LC_COLLATE 'C' LC_CTYPE 'C' TEMPLATE template0",
        );
        PgStore::connect(ascii.url()).await.unwrap();
    }

    fn record() -> Vec<Write> {
        vec![Write::Audit(Box::new(AuditEvent {
            event: "test.record".into(),
            ..AuditEvent::default()
        }))]
    }

    /// The listener's check is that it hears its own notification: a
    /// session not listening on the channel (as `LISTEN` run through a
    /// transaction-mode pooler leaves one) fails it, though it answers
    /// queries; one that listens passes. Another replica's check counts as
    /// no change; a real notification does.
    #[tokio::test]
    async fn the_listener_checks_that_it_hears_itself() {
        let db = scrip_testkit::PgDatabase::new();
        drop(PgStore::connect(db.url()).await.unwrap());
        let (changes, seen) = watch::channel(Changes::default());
        let options = PgConnectOptions::from_str(db.url()).unwrap();
        let pool = PgPoolOptions::new()
            .max_connections(1)
            .connect_lazy_with(options);
        let mut deaf = PgListener::connect_with(&pool).await.unwrap();
        deaf.listen("another_channel").await.unwrap();
        sqlx::query("SELECT 1").execute(&mut deaf).await.unwrap();
        let e = hears_itself(&mut deaf, &changes).await.unwrap_err();
        assert!(e.contains("did not come back"), "{e}");
        drop(deaf);
        let mut hearing = PgListener::connect_with(&pool).await.unwrap();
        hearing.listen(CHANNEL).await.unwrap();
        hears_itself(&mut hearing, &changes).await.unwrap();
        // Another replica's check, then a revocation, then this one's check.
        db.execute(&format!("SELECT pg_notify('{CHANNEL}', '{PING}0123')"));
        hears_itself(&mut hearing, &changes).await.unwrap();
        assert_eq!(*seen.borrow(), Changes::default());
        db.execute(&format!("SELECT pg_notify('{CHANNEL}', 'revocations')"));
        hears_itself(&mut hearing, &changes).await.unwrap();
        assert_eq!(seen.borrow().revocations, 1);
    }

    /// A start waits for the locks of migrating only so long: a session
    /// holding one (here a table the migrator reads) fails it, saying why,
    /// rather than holding it up for ever.
    #[tokio::test]
    async fn a_start_waits_for_a_held_migration_lock_only_so_long() {
        let db = scrip_testkit::PgDatabase::new();
        drop(PgStore::connect(db.url()).await.unwrap());
        let options = PgConnectOptions::from_str(db.url()).unwrap();
        let mut holder = options.connect().await.unwrap();
        sqlx::query("BEGIN").execute(&mut holder).await.unwrap();
        sqlx::query("LOCK TABLE _sqlx_migrations IN ACCESS EXCLUSIVE MODE")
            .execute(&mut holder)
            .await
            .unwrap();
        let mut conn = options.connect().await.unwrap();
        let e = migrate(&mut conn, Duration::from_millis(500))
            .await
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("waited 0 s for a lock another session holds"),
            "{e}"
        );
        sqlx::query("ROLLBACK").execute(&mut holder).await.unwrap();
        migrate(&mut conn, Duration::from_millis(500))
            .await
            .unwrap();
        let timeout: String = sqlx::query_scalar("SHOW lock_timeout")
            .fetch_one(&mut conn)
            .await
            .unwrap();
        assert_eq!(timeout, "0", "left set on the connection");
    }

    /// Every migration runs in a transaction of its own: a try given up
    /// for a lock (see [`migrate`]) leaves nothing half done to be run
    /// again from its start.
    #[test]
    fn every_migration_is_one_transaction() {
        assert!(MIGRATOR.iter().all(|m| !m.no_tx));
    }

    /// A migration that needs a table's lock while a `pg_dump` holds a
    /// shared one does not hold up the sessions that ask for the table
    /// after it for longer than a try ([`MIGRATION_LOCK_TRY`]); it is
    /// applied once the dump ends.
    #[tokio::test]
    async fn a_migration_behind_a_dump_lets_the_others_through() {
        let db = scrip_testkit::PgDatabase::new();
        drop(PgStore::connect(db.url()).await.unwrap());
        // The store as it was before migration 13 (which drops an index of
        // `tasks`, and so needs the table to itself).
        db.execute(
            "CREATE INDEX tasks_agent ON tasks(agent_sub, created_at); DROP TABLE dpop_proofs; \
             DELETE FROM _sqlx_migrations WHERE version >= 13",
        );
        let options = PgConnectOptions::from_str(db.url()).unwrap();
        let mut dump = options.connect().await.unwrap();
        sqlx::query("BEGIN").execute(&mut dump).await.unwrap();
        sqlx::query("LOCK TABLE tasks IN ACCESS SHARE MODE")
            .execute(&mut dump)
            .await
            .unwrap();
        let mut conn = options.connect().await.unwrap();
        let mut reader = options.connect().await.unwrap();
        let migrating = migrate(&mut conn, Duration::from_secs(60));
        // Once the migration waits for the table, a reader that would wait
        // no more than 5 s for it gets it.
        let others = async {
            for _ in 0..100 {
                let waiting: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM pg_locks WHERE NOT granted AND relation = 'tasks'::regclass",
            )
            .fetch_one(&mut reader)
            .await
            .unwrap();
                if waiting > 0 {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            sqlx::query("SET lock_timeout = '5s'")
                .execute(&mut reader)
                .await
                .unwrap();
            for _ in 0..3 {
                let n: i64 = sqlx::query_scalar("SELECT count(*) FROM tasks")
                    .fetch_one(&mut reader)
                    .await
                    .unwrap();
                assert_eq!(n, 0);
            }
            sqlx::query("ROLLBACK").execute(&mut dump).await.unwrap();
        };
        let (migrated, ()) = tokio::join!(migrating, others);
        migrated.unwrap();
        // Nor does the migration lock stay with the connection that
        // migrated (it goes on to write): another start migrates at once.
        let held: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND granted \
             AND database = (SELECT oid FROM pg_database WHERE datname = current_database())",
        )
        .fetch_one(&mut reader)
        .await
        .unwrap();
        assert_eq!(held, 0, "the migration lock is still held");
        let mut other = options.connect().await.unwrap();
        migrate(&mut other, Duration::from_millis(500))
            .await
            .unwrap();
        let index: Option<String> = sqlx::query_scalar("SELECT to_regclass('tasks_agent')::text")
            .fetch_one(&mut reader)
            .await
            .unwrap();
        assert_eq!(index, None, "migration 13 applied");
    }

    /// A store upgraded with many chains (its `chain_links` empty): the
    /// first chain started after the upgrade links every head, in the one
    /// commit, and the next links only what moved since.
    #[tokio::test]
    async fn the_first_start_after_an_upgrade_links_every_chain_once() {
        let db = scrip_testkit::PgDatabase::new();
        drop(PgStore::connect(db.url()).await.unwrap());
        db.execute(
            "INSERT INTO audit (at_ms, event, replica, chain_id, chain_seq, hash, record) \
             SELECT 0, 'test.record', 'old', 'old-' || g, 1, 'h' || g, '{}' FROM generate_series(1, 3000) g",
        );
        let first = PgStore::connect(db.url()).await.unwrap();
        first.commit(record()).await.unwrap();
        assert_eq!(first.chain_links().await.unwrap().len(), 3000);
        assert_eq!(db.execute("SELECT count(*) FROM chain_links"), "3000");
        let second = PgStore::connect(db.url()).await.unwrap();
        second.commit(record()).await.unwrap();
        let links = second.chain_links().await.unwrap();
        assert_eq!(
            links.len(),
            3001,
            "the second start linked more than the first's head"
        );
        assert_eq!(
            links.last().map(|l| l.chain_id.clone()),
            first.chain_head().map(|h| h.chain_id)
        );
    }

    /// Whatever the database's defaults, a writer's transaction is READ
    /// COMMITTED (it must see what the previous holder of the write lock
    /// committed) and its commit waits for the WAL flush.
    #[tokio::test]
    async fn a_write_is_read_committed_and_durable_whatever_the_defaults() {
        let db = scrip_testkit::PgDatabase::new();
        db.execute(
            "DO $$ BEGIN \
             EXECUTE format('ALTER DATABASE %I SET synchronous_commit = off', current_database()); \
             EXECUTE format('ALTER DATABASE %I SET default_transaction_isolation = %L', current_database(), 'repeatable read'); \
             END $$",
        );
        let mut conn = PgConnectOptions::from_str(db.url())
            .unwrap()
            .connect()
            .await
            .unwrap();
        async fn setting(c: &mut PgConnection, what: &str) -> String {
            sqlx::query_scalar::<_, String>(sqlx::AssertSqlSafe(format!("SHOW {what}")))
                .fetch_one(c)
                .await
                .unwrap()
        }
        // The database's defaults took.
        assert_eq!(setting(&mut conn, "synchronous_commit").await, "off");
        let limits = write_limits(&mut conn).await;
        assert_eq!(
            limits,
            LIMITS_CHECKING,
            "PostgreSQL {} on Linux",
            setting(&mut conn, "server_version").await
        );
        let mut tx = begin_write(&mut conn, limits).await.unwrap();
        assert_eq!(setting(&mut tx, "synchronous_commit").await, "on");
        assert_eq!(
            setting(&mut tx, "transaction_isolation").await,
            "read committed"
        );
        // A statement whose client has gone stops within a second.
        assert_eq!(
            setting(&mut tx, "client_connection_check_interval").await,
            "1s"
        );
        tx.rollback().await.unwrap();
        // And the store writes through them.
        let store = PgStore::connect(db.url()).await.unwrap();
        store.commit(record()).await.unwrap();
    }

    /// A commit that conflicts gives the write lock back at once, not when
    /// its replica next commits: another replica writes straight after it.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_conflict_releases_the_write_lock_at_once() {
        let db = scrip_testkit::PgDatabase::new();
        let a = PgStore::connect(db.url()).await.unwrap();
        let b = PgStore::connect(db.url()).await.unwrap();
        let claim = || {
            vec![Write::ClaimToken {
                jti: "j1".into(),
                task_id: "t1".into(),
                expires_at: u64::MAX / 4,
                at: 1,
            }]
        };
        a.commit(claim()).await.unwrap();
        let err = a.commit(claim()).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
        b.commit(record()).await.unwrap();
        assert_eq!(
            db.execute(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND state LIKE 'idle in transaction%'"
            ),
            "0"
        );
    }

    /// A replica stopped in the middle of a commit, holding the write lock,
    /// holds the others up for seconds, not until its host comes back; and
    /// a writer that gave up waiting for the lock leaves no wait behind on
    /// the server.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_frozen_in_a_commit_does_not_hold_the_others_up() {
        let db = scrip_testkit::PgDatabase::new();
        let store = PgStore::connect(db.url()).await.unwrap();
        store.commit(record()).await.unwrap();
        let url = db.url().to_owned();
        let hold = |limits: bool| {
            let url = url.clone();
            async move {
                let mut conn = PgConnectOptions::from_str(&url)
                    .unwrap()
                    .connect()
                    .await
                    .unwrap();
                sqlx::query("BEGIN").execute(&mut conn).await.unwrap();
                if limits {
                    sqlx::query(LIMITS).execute(&mut conn).await.unwrap();
                }
                sqlx::query("SELECT pg_advisory_xact_lock($1)")
                    .bind(WRITE_LOCK)
                    .execute(&mut conn)
                    .await
                    .unwrap();
                conn
            }
        };
        // Whoever holds the lock, a commit waiting for it gives up on the
        // server too: no wait of scrip's is left behind.
        let holder = hold(false).await;
        let err = store.commit(record()).await.unwrap_err();
        assert!(matches!(err, StoreError::Unavailable(_)), "{err:?}");
        assert_eq!(
            db.execute(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = current_database() AND wait_event_type = 'Lock'"
            ),
            "0",
            "the writer's wait for the lock outlived its commit"
        );
        drop(holder);
        store.commit(record()).await.unwrap();
        // The lock wait failed before the commit was sent, so nothing of it
        // was written: the writer's chain goes on rather than starting anew.
        assert_eq!(
            db.execute("SELECT count(DISTINCT chain_id) || ' ' || max(chain_seq) FROM audit"),
            "1 3",
            "a commit known to have changed nothing started a new chain"
        );
        // The frozen replica: a writer's transaction (with the limits every
        // writer's has), stopped holding the lock. Without the limits, every
        // attempt here fails, for good.
        let mut frozen = hold(true).await;
        let mut attempts = 0;
        while let Err(e) = store.commit(record()).await {
            assert!(matches!(e, StoreError::Unavailable(_)), "{e:?}");
            attempts += 1;
            assert!(
                attempts < 4,
                "the frozen replica still holds the write lock"
            );
        }
        assert!(
            sqlx::query("SELECT 1").execute(&mut frozen).await.is_err(),
            "the frozen replica's session was not ended"
        );
    }
}
