//! The legacy bridge through the real binary: `scrip secret set` reads only
//! standard input, `list` and `rotate` (with a mint command) work, and
//! `scrip serve` streams 100 MB up and 100 MB down through the proxy to a
//! real nginx in bounded memory (the server's peak RSS, read from /proc),
//! with no secret in its debug log.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

#[path = "../../scrip-proxy/tests/common/nginx.rs"]
mod nginx;

use std::fs;
use std::io::Write as _;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use scrip_jose::{SigningAlgorithm, SigningKey};
use serde_json::{Value, json};

const K8S_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
const READ_KEY: &str = "rk-Cq8Vb2Nx5Lm7Hz1P";
const WRITE_KEY: &str = "wk-Ty3Fs9Dk4Jw6Ra0E";
const MINTED_KEY: &str = "wk-minted-Gp2Xe7Uo5Ib3";
const BIG: u64 = 100 * 1024 * 1024;

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

struct Setup {
    dir: tempfile::TempDir,
    config: PathBuf,
    addr: SocketAddr,
    proxy_addr: SocketAddr,
    metrics_addr: SocketAddr,
    idp: SigningKey,
}

fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], scrip_testkit::free_port()))
}

fn setup(nginx: &nginx::Nginx) -> Setup {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let policies = root.join("policies");
    fs::create_dir_all(&policies).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    for entry in fs::read_dir(repo).unwrap() {
        let path = entry.unwrap().path();
        if path
            .extension()
            .is_some_and(|e| e == "cedar" || e == "cedarschema")
        {
            fs::copy(&path, policies.join(path.file_name().unwrap())).unwrap();
        }
    }
    let (idp, _) = SigningKey::generate(SigningAlgorithm::ES256).unwrap();
    fs::write(
        root.join("k8s-jwks.json"),
        json!({ "keys": [idp.public_jwk()] }).to_string(),
    )
    .unwrap();
    let addr = free_addr();
    let proxy_addr = free_addr();
    let metrics_addr = free_addr();
    let now = now();
    let proxy_identity = idp
        .sign_jwt(
            "JWT",
            &json!({
                "iss": K8S_ISSUER, "sub": "system:serviceaccount:proxies:legacy", "aud": "scrip",
                "iat": now, "nbf": now, "exp": now + 600,
            }),
        )
        .unwrap();
    fs::write(root.join("proxy-identity.jwt"), proxy_identity).unwrap();
    let config = format!(
        r#"listen = "{addr}"
data_dir = "{data}"
policy_dir = "{policies}"

[[trusted_issuers]]
issuer = "{K8S_ISSUER}"
jwks_file = "{jwks}"
audiences = ["scrip"]
algorithms = ["ES256"]

[[tools]]
name = "legacy"
resource = "https://legacy.example"
actions = ["read", "write"]

[[tools]]
name = "mintly"
resource = "https://mintly.example"
actions = ["read", "write"]

[[tools]]
name = "mintslow"
resource = "https://mintslow.example"
actions = ["read"]

[[upstreams]]
name = "legacy"
url = "{upstream}"

[upstreams.secrets.read]
max_age = 86400

[upstreams.secrets.write]
grace = 600
# Mints only when it inherited none of scrip's credentials.
mint_command = ["/bin/sh", "-c", "[ -z \"${{SCRIP_TASK_TOKEN+set}}${{SCRIP_IDENTITY+set}}${{SCRIP_KEY_ENCRYPTION_KEY+set}}${{SCRIP_PREVIOUS_KEY_ENCRYPTION_KEY+set}}\" ] && echo {MINTED_KEY}"]

# Mint commands that misbehave: one prints far more than a secret, one
# leaves a process behind (its pid in a file).
[[upstreams]]
name = "mintly"
url = "{upstream}"

[upstreams.secrets.read]
mint_command = ["/bin/sh", "-c", "yes wk-too-long | head -c 100000"]

[upstreams.secrets.write]
mint_command = ["./mint-leftover.sh"]

# A mint command that takes its time (its pid in a file).
[[upstreams]]
name = "mintslow"
url = "{upstream}"

[upstreams.secrets.read]
mint_command = ["/bin/sh", "-c", "echo $$ > {slow}; exec sleep 300"]

[proxy]
listen = "{proxy_addr}"
identity_file = "{identity}"
metrics_listen = "{metrics_addr}"
"#,
        metrics_addr = metrics_addr,
        identity = root.join("proxy-identity.jwt").display(),
        data = root.join("data").display(),
        policies = policies.display(),
        jwks = root.join("k8s-jwks.json").display(),
        upstream = nginx.url(),
        slow = root.join("slow.pid").display(),
    );
    let path = root.join("scrip.toml");
    fs::write(&path, config).unwrap();
    // A program named by a path relative to the configuration's directory.
    let mint = root.join("mint-leftover.sh");
    fs::write(
        &mint,
        format!(
            "#!/bin/sh\nsleep 300 & echo $! > {}\necho wk-minted-with-a-leftover\n",
            root.join("leftover.pid").display()
        ),
    )
    .unwrap();
    {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&mint, fs::Permissions::from_mode(0o755)).unwrap();
    }
    Setup {
        dir,
        config: path,
        addr,
        proxy_addr,
        metrics_addr,
        idp,
    }
}

impl Setup {
    fn scrip(&self, args: &[&str], stdin: Option<&[u8]>) -> Output {
        self.scrip_with(args, stdin, &[])
    }

    /// As [`Setup::scrip`], with `env` set for scrip.
    fn scrip_with(&self, args: &[&str], stdin: Option<&[u8]>, env: &[(&str, &str)]) -> Output {
        let mut child = Command::new(env!("CARGO_BIN_EXE_scrip"))
            .args(args)
            .arg("--config")
            .arg(&self.config)
            .env_remove("SCRIP_CONFIG")
            .env_remove("SCRIP_KEY_ENCRYPTION_KEY")
            .env_remove("SCRIP_PREVIOUS_KEY_ENCRYPTION_KEY")
            .envs(env.iter().copied())
            .stdin(if stdin.is_some() {
                Stdio::piped()
            } else {
                Stdio::null()
            })
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        if let Some(input) = stdin {
            // A command may refuse before it reads (its exit code and stderr
            // say why, and the caller checks them): a closed pipe is no
            // failure of its own.
            let written = child.stdin.take().unwrap().write_all(input);
            if let Err(e) = written
                && e.kind() != std::io::ErrorKind::BrokenPipe
            {
                let out = child.wait_with_output().unwrap();
                panic!(
                    "scrip {args:?} did not read its input ({e}): {out:?}\n{}",
                    text(&out.stderr)
                );
            }
        }
        child.wait_with_output().unwrap()
    }

    fn identity(&self) -> String {
        let now = now();
        self.idp
            .sign_jwt(
                "JWT",
                &json!({
                    "iss": K8S_ISSUER, "sub": "system:serviceaccount:agents:mover", "aud": "scrip",
                    "iat": now, "nbf": now, "exp": now + 600,
                    "kubernetes.io": { "namespace": "agents", "serviceaccount": { "name": "mover" } },
                }),
            )
            .unwrap()
    }
}

struct Serve(Child);

impl Drop for Serve {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The peak resident set of a process, in bytes.
fn peak_rss(pid: u32) -> u64 {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("VmHWM:")).unwrap();
    let kb: u64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    kb * 1024
}

fn curl(args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-sS", "-o", "/dev/null"])
        .args(args)
        .output()
        .unwrap();
    assert!(out.status.success(), "curl {args:?}: {}", text(&out.stderr));
    text(&out.stdout)
}

/// Waits up to 5 s for process `pid` to be gone (or a zombie).
fn wait_gone(pid: &str, what: &str) {
    let proc_dir = Path::new("/proc").join(pid);
    let start = std::time::Instant::now();
    while proc_dir.exists()
        && !fs::read_to_string(proc_dir.join("stat"))
            .unwrap_or_default()
            .contains(") Z ")
    {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(5),
            "{what} {pid} still runs"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
}

#[test]
fn secrets_come_from_stdin_and_100_mb_stream_through_in_bounded_memory() {
    let nginx = nginx::Nginx::start(
        &[
            ("read", READ_KEY),
            ("write", WRITE_KEY),
            ("write2", MINTED_KEY),
        ],
        READ_KEY,
    );
    let s = setup(&nginx);

    // Listing before anything was stored says so, rather than create an
    // empty store at a `data_dir` that may be wrong.
    let out = s.scrip(&["secret", "list"], None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stdout));
    assert!(
        text(&out.stderr).contains("no store at"),
        "{}",
        text(&out.stderr)
    );

    // The value never comes from the command line.
    let out = s.scrip(
        &["secret", "set", "legacy", "--action", "read", READ_KEY],
        None,
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = s.scrip(
        &[
            "secret", "set", "legacy", "--action", "read", "--value", READ_KEY,
        ],
        None,
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    let out = s.scrip(&["secret", "set", "legacy", "--action", "read"], Some(b""));
    assert_eq!(out.status.code(), Some(1));
    assert_eq!(
        text(&out.stderr),
        "scrip: secret value is empty (it is read from standard input)\n"
    );
    let out = s.scrip(
        &["secret", "set", "legacy", "--action", "delete"],
        Some(b"x\n"),
    );
    assert_eq!(out.status.code(), Some(1));
    assert!(text(&out.stderr).contains("no secret for action `delete`"));
    let out = s.scrip(
        &["secret", "set", "legacy", "--action", "read"],
        Some(format!("{READ_KEY}\n").as_bytes()),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "set `legacy` `read` version 1\n");
    // The key-encryption key it had to create is a warning on stderr: it
    // must be kept apart from the store's backups.
    assert!(
        text(&out.stderr).contains("created the key-encryption key"),
        "{}",
        text(&out.stderr)
    );
    let out = s.scrip(
        &["secret", "set", "legacy", "--action", "write"],
        Some(WRITE_KEY.as_bytes()),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "", "nothing to warn of");
    // A key-encryption key in the environment that is not text is refused,
    // never taken for an unset variable (which would fall back to the file).
    {
        use std::io::Write as _;
        use std::os::unix::ffi::OsStrExt as _;
        let mut child = Command::new(env!("CARGO_BIN_EXE_scrip"))
            .args(["secret", "set", "legacy", "--action", "write", "--config"])
            .arg(&s.config)
            .env_remove("SCRIP_CONFIG")
            .env(
                "SCRIP_KEY_ENCRYPTION_KEY",
                std::ffi::OsStr::from_bytes(b"\xff\xfe"),
            )
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(WRITE_KEY.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
        assert!(
            text(&out.stderr).contains("SCRIP_KEY_ENCRYPTION_KEY")
                && text(&out.stderr).contains("is not text"),
            "{}",
            text(&out.stderr)
        );
    }
    let key_file = s.dir.path().join("data/keys/key-encryption.key");
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        fs::metadata(&key_file).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Another installation's key-encryption key, left in the environment
    // beside this one's file: refused, and nothing is sealed under it (the
    // rotation below, given the file's own key in the variable, makes
    // version 2, not 3).
    let other_kek = "A".repeat(43);
    for (command, stdin) in [("set", Some(WRITE_KEY.as_bytes())), ("rotate", None)] {
        let out = s.scrip_with(
            &["secret", command, "legacy", "--action", "write"],
            stdin,
            &[("SCRIP_KEY_ENCRYPTION_KEY", &other_kek)],
        );
        assert_eq!(
            out.status.code(),
            Some(1),
            "{command}: {}",
            text(&out.stderr)
        );
        assert!(
            text(&out.stderr).contains("is not the key in"),
            "{command}: {}",
            text(&out.stderr)
        );
    }
    let own_kek = fs::read_to_string(s.dir.path().join("data/keys/key-encryption.key")).unwrap();

    // Rotation with the mint command; the old version stays, retiring. The
    // command inherits none of scrip's credentials (it refuses to mint if
    // it does).
    let out = s.scrip_with(
        &["secret", "rotate", "legacy", "--action", "write"],
        None,
        &[
            ("SCRIP_TASK_TOKEN", "a-task-token"),
            ("SCRIP_IDENTITY", "an-identity"),
            ("SCRIP_KEY_ENCRYPTION_KEY", own_kek.trim()),
            // A previous key that opens nothing here: harmless, and not
            // inherited either.
            ("SCRIP_PREVIOUS_KEY_ENCRYPTION_KEY", &other_kek),
        ],
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert!(text(&out.stdout).starts_with("rotated `legacy` `write` to version 2"));
    // Every action is looked at before any mint command runs: with `write`
    // not set yet, `read`'s command (which would fail for what it prints)
    // does not run.
    let out = s.scrip(
        &["secret", "set", "mintly", "--action", "read"],
        Some(b"first-value\n"),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = s.scrip(&["secret", "rotate", "mintly"], None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("secret `mintly` `write` is not set yet"),
        "{}",
        text(&out.stderr)
    );
    // A mint command's output is read no further than a secret can be,
    // and what it leaves running is killed with it.
    let out = s.scrip(
        &["secret", "set", "mintly", "--action", "write"],
        Some(b"first-value\n"),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let out = s.scrip(&["secret", "rotate", "mintly", "--action", "read"], None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("printed more than a secret")
            && text(&out.stderr).contains("was not stored: revoke it there"),
        "{}",
        text(&out.stderr)
    );
    // A program anyone could change is not run: it would run as scrip's
    // user, who reads the key-encryption key.
    let program = s.dir.path().join("mint-leftover.sh");
    let mode = |m: u32| {
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&program, fs::Permissions::from_mode(m)).unwrap();
    };
    mode(0o757);
    let out = s.scrip(&["secret", "rotate", "mintly", "--action", "write"], None);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("mint_command:")
            && text(&out.stderr).contains("anyone on the host could change what scrip runs"),
        "{}",
        text(&out.stderr)
    );
    assert!(
        !s.dir.path().join("leftover.pid").exists(),
        "the program ran"
    );
    mode(0o755);
    let out = s.scrip(&["secret", "rotate", "mintly", "--action", "write"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let leftover = fs::read_to_string(s.dir.path().join("leftover.pid")).unwrap();
    wait_gone(leftover.trim(), "the mint command's leftover process");
    // Stopping `scrip secret rotate` stops its mint command too, though it
    // runs in a process group of its own (out of the terminal's reach).
    let out = s.scrip(
        &["secret", "set", "mintslow", "--action", "read"],
        Some(b"first-value\n"),
    );
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let rotating = Command::new(env!("CARGO_BIN_EXE_scrip"))
        .args([
            "secret", "rotate", "mintslow", "--action", "read", "--config",
        ])
        .arg(&s.config)
        .env_remove("SCRIP_CONFIG")
        .env_remove("SCRIP_KEY_ENCRYPTION_KEY")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let pid_file = s.dir.path().join("slow.pid");
    let start = std::time::Instant::now();
    while fs::read_to_string(&pid_file).map_or(true, |p| p.trim().is_empty()) {
        assert!(
            start.elapsed() < std::time::Duration::from_secs(10),
            "the mint command did not start"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let minting = fs::read_to_string(&pid_file).unwrap().trim().to_owned();
    Command::new("kill")
        .args(["-INT", &rotating.id().to_string()])
        .status()
        .unwrap();
    let out = rotating.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("interrupted"),
        "{}",
        text(&out.stderr)
    );
    wait_gone(&minting, "the mint command, after scrip was stopped,");

    let out = s.scrip(&["secret", "list", "--json"], None);
    assert_eq!(out.status.code(), Some(0));
    let listed = text(&out.stdout);
    for secret in [READ_KEY, WRITE_KEY, MINTED_KEY] {
        assert!(!listed.contains(secret), "list shows a value");
    }
    let rows: Vec<Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let summary: Vec<(String, u64, String, bool)> = rows
        .iter()
        .filter(|r| r["name"] == "legacy")
        .map(|r| {
            (
                r["action"].as_str().unwrap().to_owned(),
                r["version"].as_u64().unwrap(),
                r["state"].as_str().unwrap().to_owned(),
                r["overdue"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        summary,
        [
            ("read".into(), 1, "current".into(), false),
            ("write".into(), 2, "current".into(), false),
            ("write".into(), 1, "retiring".into(), false),
        ]
    );
    let table = text(&s.scrip(&["secret", "list"], None).stdout);
    assert!(table.starts_with("NAME"), "{table}");
    // Deleted, one action and then the rest; what is gone is said, once.
    let delete = |args: &[&str]| {
        let out = s.scrip(&[&["secret", "delete", "mintly"], args].concat(), None);
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    let (code, out, err) = delete(&["--action", "read"]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with("deleted `mintly` `read` (version 1)\n"),
        "{out}"
    );
    let (code, out, err) = delete(&[]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.starts_with("deleted `mintly` `write` (versions 1, 2)\n"),
        "{out}"
    );
    assert!(out.contains("refuses `mintly` requests"), "{out}");
    let (code, _, err) = delete(&[]);
    assert_eq!(code, Some(1));
    assert!(err.contains("no secret of `mintly` is stored"), "{err}");
    let (code, _, err) = delete(&["--action", "write"]);
    assert_eq!(code, Some(1));
    assert!(
        err.contains("no secret `mintly` `write` is stored"),
        "{err}"
    );
    let listed = text(&s.scrip(&["secret", "list", "--json"], None).stdout);
    assert!(!listed.contains("\"mintly\""), "{listed}");
    assert!(listed.contains("\"legacy\""), "{listed}");
    // A key-encryption key others can read is refused.
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o644)).unwrap();
    let out = s.scrip(&["secret", "set", "legacy", "--action", "read"], Some(b"x"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("group or others can read it"),
        "{}",
        text(&out.stderr)
    );
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).unwrap();
    // A missing key-encryption key is not made afresh while the store holds
    // secrets sealed under the old one: they would no longer open.
    let moved = s.dir.path().join("key-encryption.key.away");
    fs::rename(&key_file, &moved).unwrap();
    let out = s.scrip(&["secret", "set", "legacy", "--action", "read"], Some(b"x"));
    assert_eq!(out.status.code(), Some(1));
    assert!(
        text(&out.stderr).contains("missing: this store's secrets are sealed"),
        "{}",
        text(&out.stderr)
    );
    assert!(!key_file.exists(), "a new key-encryption key was made");
    fs::rename(&moved, &key_file).unwrap();

    // The key-encryption key replaced (`scrip key reseal`), given in the
    // environment, the old one moved away: the server below opens every
    // secret with the new key alone.
    let old_kek = fs::read_to_string(&key_file).unwrap();
    let old_kek = old_kek.trim();
    let (_, new_kek) = scrip_jose::Kek::generate().unwrap();
    let reseal = |env: &[(&str, &str)]| {
        let out = s.scrip_with(
            &["key", "reseal", "--reason", "KEK rotation INC-9"],
            None,
            env,
        );
        (out.status.code(), text(&out.stdout), text(&out.stderr))
    };
    // Beside the old key's file, the new key is refused.
    let (code, _, err) = reseal(&[("SCRIP_KEY_ENCRYPTION_KEY", &new_kek)]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is not the key in"), "{err}");
    fs::rename(&key_file, &moved).unwrap();
    // Without the old key nothing opens; the old key as both is a mistake.
    let (code, _, err) = reseal(&[("SCRIP_KEY_ENCRYPTION_KEY", &new_kek)]);
    assert_eq!(code, Some(1), "{err}");
    assert!(
        err.contains("opens nothing this store holds sealed"),
        "{err}"
    );
    let (code, _, err) = reseal(&[
        ("SCRIP_KEY_ENCRYPTION_KEY", old_kek),
        ("SCRIP_PREVIOUS_KEY_ENCRYPTION_KEY", old_kek),
    ]);
    assert_eq!(code, Some(1), "{err}");
    assert!(err.contains("is the key-encryption key itself"), "{err}");
    let both = [
        ("SCRIP_KEY_ENCRYPTION_KEY", new_kek.as_str()),
        ("SCRIP_PREVIOUS_KEY_ENCRYPTION_KEY", old_kek),
    ];
    let (code, out, err) = reseal(&both);
    assert_eq!(code, Some(0), "{err}");
    let resealed = out
        .lines()
        .filter(|l| l.starts_with("resealed secret "))
        .count();
    for version in ["legacy/read v1", "legacy/write v1", "legacy/write v2"] {
        assert!(
            out.contains(&format!("resealed secret {version}\n")),
            "{out}"
        );
    }
    let print = scrip_jose::Kek::from_text(&new_kek).unwrap();
    let print = print.fingerprint();
    assert!(
        out.contains(&format!(
            "values sealed under the key-encryption key {print} ({resealed} sealed again now)"
        )),
        "{out}"
    );
    assert!(out.contains("opens nothing here any more"), "{out}");
    let (code, out, err) = reseal(&both);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        out.contains(&format!("{print} (0 sealed again now)")),
        "{out}"
    );
    // The old key alone opens nothing now.
    let out = s.scrip_with(
        &["secret", "set", "legacy", "--action", "read"],
        Some(b"x"),
        &[("SCRIP_KEY_ENCRYPTION_KEY", old_kek)],
    );
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(text(&out.stderr).contains("opens nothing this store holds sealed"));
    // The new key in the key file, as the server below reads it.
    fs::write(&key_file, &new_kek).unwrap();
    fs::set_permissions(&key_file, fs::Permissions::from_mode(0o600)).unwrap();
    fs::remove_file(&moved).unwrap();
    let out = s.scrip(&["secret", "list"], None);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let records = text(&s.scrip(&["audit", "query", "--json"], None).stdout);
    let deleted: Vec<&str> = records
        .lines()
        .filter(|l| l.contains("\"event\":\"secret.deleted\""))
        .collect();
    assert_eq!(deleted.len(), 2, "{records}");
    assert!(
        deleted
            .iter()
            .any(|l| l.contains("every version deleted (versions 1, 2)"))
    );
    let resealed: Vec<&str> = records
        .lines()
        .filter(|l| l.contains("\"event\":\"kek.resealed\""))
        .collect();
    assert_eq!(resealed.len(), 1, "{records}");
    assert!(resealed[0].contains("KEK rotation INC-9"), "{records}");

    // Each `scrip secret` command signed its audit records.
    let verified = s.scrip(&["audit", "verify"], None);
    let report = text(&verified.stdout);
    assert_eq!(verified.status.code(), Some(0), "{report}");
    assert!(!report.contains("wait"), "{report}");

    // The server, as a real process.
    let log = s.dir.path().join("serve.log");
    let serve = Serve(
        Command::new(env!("CARGO_BIN_EXE_scrip"))
            .args(["serve", "--config"])
            .arg(&s.config)
            .env_remove("SCRIP_CONFIG")
            .env("SCRIP_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(fs::File::create(&log).unwrap()))
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    while TcpStream::connect(s.addr).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            fs::read_to_string(&log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let rt = tokio::runtime::Runtime::new().unwrap();
    let base = format!("http://{}", s.addr);
    let (read, write, task) = rt.block_on(async {
        let http = reqwest::Client::new();
        let post = |form: Vec<(&'static str, String)>| {
            let http = http.clone();
            let base = base.clone();
            async move {
                let body = form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(form.iter().map(|(k, v)| (*k, v.as_str())))
                    .finish();
                let r = http
                    .post(format!("{base}/token"))
                    .header("content-type", "application/x-www-form-urlencoded")
                    .body(body)
                    .send()
                    .await
                    .unwrap();
                let v: Value = r.json().await.unwrap();
                v["access_token"]
                    .as_str()
                    .unwrap_or_else(|| panic!("{v}"))
                    .to_owned()
            }
        };
        let ex = "urn:ietf:params:oauth:grant-type:token-exchange";
        let task = post(vec![
            ("grant_type", ex.into()),
            ("subject_token", s.identity()),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:jwt".into(),
            ),
            (
                "requested_token_type",
                "urn:ietf:params:oauth:token-type:txn_token".into(),
            ),
            ("scope", "legacy:read legacy:write".into()),
            (
                "request_details",
                json!({"purpose": "move JIRA-9 data", "environment": "dev"}).to_string(),
            ),
        ])
        .await;
        let token = |scope: &'static str| {
            post(vec![
                ("grant_type", ex.into()),
                ("subject_token", task.clone()),
                (
                    "subject_token_type",
                    "urn:ietf:params:oauth:token-type:txn_token".into(),
                ),
                ("audience", "legacy".into()),
                ("scope", scope.into()),
            ])
        };
        (token("read").await, token("write").await, task.clone())
    });
    let url = |p: &str| format!("{base}/proxy/legacy{p}");
    let read_h = format!("Authorization: Bearer {read}");
    let write_h = format!("Authorization: Bearer {write}");
    assert_eq!(
        curl(&["-w", "%{http_code}", "-H", &read_h, &url("/warm")]),
        "200"
    );
    let pid = serve.0.id();
    let before = peak_rss(pid);

    // 100 MB up (PUT, the write key: the minted version 2).
    let body = s.dir.path().join("big.bin");
    fs::File::create(&body).unwrap().set_len(BIG).unwrap();
    let up = curl(&[
        "-w",
        "%{http_code} %{size_upload}",
        "-T",
        body.to_str().unwrap(),
        "-H",
        &write_h,
        &url("/upload/big.bin"),
    ]);
    assert_eq!(up, format!("201 {BIG}"));
    assert_eq!(fs::metadata(nginx.uploaded("big.bin")).unwrap().len(), BIG);
    // nginx writes its log line after the response: wait for it.
    let start = Instant::now();
    while !nginx
        .log()
        .iter()
        .any(|l| l.starts_with("PUT /upload/big.bin write2 201"))
    {
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "{:?}",
            nginx.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    // 100 MB down.
    nginx.put_sparse_file("big.bin", BIG);
    let down = curl(&[
        "-w",
        "%{http_code} %{size_download}",
        "-H",
        &read_h,
        &url("/files/big.bin"),
    ]);
    assert_eq!(down, format!("200 {BIG}"));

    let growth = peak_rss(pid).saturating_sub(before);
    assert!(
        growth < 64 * 1024 * 1024,
        "peak RSS grew by {} MB",
        growth / (1024 * 1024)
    );

    // The completion records name the bytes.
    let start = Instant::now();
    let (out, records) = loop {
        let out = s.scrip(&["audit", "export"], None);
        let records: Vec<Value> = text(&out.stdout)
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let ends = records
            .iter()
            .filter(|r| r["event"] == "proxy.response")
            .count();
        if ends >= 3 {
            break (out, records);
        }
        assert!(
            start.elapsed() < Duration::from_secs(5),
            "completion records missing"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let done = |path: &str| {
        records
            .iter()
            .find(|r| r["event"] == "proxy.response" && r["path"] == path)
            .unwrap_or_else(|| panic!("no proxy.response for {path}"))
            .clone()
    };
    assert_eq!(done("/upload/big.bin")["bytes_in"], BIG);
    assert_eq!(done("/files/big.bin")["bytes_out"], BIG);
    assert_eq!(done("/files/big.bin")["status"], 200);

    // `scrip proxy` on its own: discovers scrip, follows its revocation feed.
    let proxy_log = s.dir.path().join("proxy.log");
    let _proxy = Serve(
        Command::new(env!("CARGO_BIN_EXE_scrip"))
            .args(["proxy", "--config"])
            .arg(&s.config)
            .env_remove("SCRIP_CONFIG")
            .env("SCRIP_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(fs::File::create(&proxy_log).unwrap()))
            .spawn()
            .unwrap(),
    );
    let start = Instant::now();
    while TcpStream::connect(s.proxy_addr).is_err() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "{}",
            fs::read_to_string(&proxy_log).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let standalone = format!("http://{}/proxy/legacy/standalone", s.proxy_addr);
    let get = || curl(&["-w", "%{http_code}", "-H", &read_h, &standalone]);
    assert_eq!(get(), "200");
    let post = curl(&[
        "-w",
        "%{http_code}",
        "-X",
        "POST",
        "-H",
        &read_h,
        &standalone,
    ]);
    assert_eq!(post, "403");
    // Its `/metrics` is at `[proxy] metrics_listen` only.
    let scraped = Command::new("curl")
        .args(["-sS", &format!("http://{}/metrics", s.metrics_addr)])
        .output()
        .unwrap();
    assert!(scraped.status.success(), "{}", text(&scraped.stderr));
    let scraped = text(&scraped.stdout);
    assert!(
        scraped.contains("scrip_proxy_requests_total{upstream=\"legacy\",outcome=\"forwarded\"}"),
        "{scraped}"
    );
    let beside = curl(&[
        "-w",
        "%{http_code}",
        "-o",
        "/dev/null",
        &format!("http://{}/metrics", s.proxy_addr),
    ]);
    assert_eq!(beside, "404");
    // Its other answers are JSON, not to be cached, as `scrip serve`'s.
    for (method, path, code) in [("GET", "/nope", "404"), ("POST", "/readyz", "405")] {
        let url = format!("http://{}{path}", s.proxy_addr);
        let shown =
            curl(&["-D", "-", "-w", "%{http_code}", "-X", method, &url]).to_ascii_lowercase();
        assert!(shown.ends_with(code), "{method} {path}: {shown}");
        for header in ["cache-control: no-store", "content-type: application/json"] {
            assert!(shown.contains(header), "{method} {path}: {shown}");
        }
    }

    // Its policies reload as `scrip serve`'s do: on SIGHUP, audited.
    let forbid = s.dir.path().join("policies/no-standalone.cedar");
    let hangup = |pid: u32| {
        let status = Command::new("kill")
            .args(["-HUP", &pid.to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    };
    let until = |want: &str, what: &str| {
        let start = Instant::now();
        while get() != want {
            assert!(
                start.elapsed() < Duration::from_secs(5),
                "{what}:\n{}",
                fs::read_to_string(&proxy_log).unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    };
    fs::write(
        &forbid,
        r#"@id("no-standalone")
forbid (principal, action, resource)
when { context.stage == "proxy" && context has path && context.path like "/standalone*" };
"#,
    )
    .unwrap();
    hangup(_proxy.0.id());
    until("403", "the standalone proxy did not reload a new forbid");
    fs::remove_file(&forbid).unwrap();
    hangup(_proxy.0.id());
    until("200", "the standalone proxy kept a removed forbid");
    let export = text(&s.scrip(&["audit", "export"], None).stdout);
    let of_proxy = |event: &str| {
        export
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).unwrap())
            .filter(|r| {
                r["event"] == event
                    && r["replica"]
                        .as_str()
                        .is_some_and(|n| n.starts_with("proxy:"))
            })
            .count()
    };
    assert!(
        of_proxy("policy.reloaded") >= 2,
        "the standalone proxy's reloads are not audited"
    );
    // Its first set is on the record too, as `scrip serve`'s is.
    assert_eq!(
        of_proxy("policy.loaded"),
        1,
        "the standalone proxy's start is not audited"
    );

    let revoke = curl(&[
        "-w",
        "%{http_code}",
        "--data-urlencode",
        &format!("token={task}"),
        &format!("{base}/revoke"),
    ]);
    assert_eq!(revoke, "200");
    let start = Instant::now();
    while get() != "401" {
        // Usually within a second; the bound only allows for a loaded
        // machine.
        assert!(
            start.elapsed() < Duration::from_secs(15),
            "the standalone proxy still accepts a revoked task"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // The proxy, killed, and the server, stopped, signed what they wrote
    // in each commit, as the `scrip secret` commands did: the whole trail
    // verifies, with no record left waiting for a signature.
    let mut proxy = _proxy;
    let mut serve = serve;
    for (child, signal) in [(&mut proxy.0, "-KILL"), (&mut serve.0, "-TERM")] {
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let start = Instant::now();
        while child.try_wait().unwrap().is_none() {
            assert!(start.elapsed() < Duration::from_secs(40), "did not stop");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let verified = s.scrip(&["audit", "verify"], None);
    let report = text(&verified.stdout);
    assert_eq!(verified.status.code(), Some(0), "{report}");
    assert!(report.starts_with("ok: "), "{report}");
    assert!(!report.contains("wait"), "{report}");
    drop(proxy);
    drop(serve);
    let proxy_log = fs::read_to_string(&proxy_log).unwrap();
    for secret in [READ_KEY, WRITE_KEY, MINTED_KEY, &read, &write, &task] {
        assert!(
            !proxy_log.contains(secret),
            "a secret or token is in the proxy log"
        );
    }
    let log = fs::read_to_string(&log).unwrap();
    assert!(log.contains("proxy mounted"), "{log}");
    for secret in [READ_KEY, WRITE_KEY, MINTED_KEY, &read, &write, &task] {
        assert!(
            !log.contains(secret),
            "a secret or token is in the server log"
        );
        assert!(
            !text(&out.stdout).contains(secret),
            "a secret or token is in the audit trail"
        );
    }
}
