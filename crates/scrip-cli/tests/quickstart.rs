//! The README quickstart, exactly: start scrip with examples/quickstart.toml,
//! run a command under `scrip run`, get a token for a tool inside it, and see
//! the token refused by introspection once the command has exited.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::io::{Read as _, Write as _};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const SCRIP: &str = env!("CARGO_BIN_EXE_scrip");

struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn answers(port: u16) -> bool {
    let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", port)) else {
        return false;
    };
    let _ = s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.starts_with("HTTP/1.1 200")
}

#[test]
fn the_readme_quickstart_works() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    std::fs::create_dir_all(root.join("examples")).unwrap();
    std::fs::create_dir_all(root.join("policies")).unwrap();
    for entry in std::fs::read_dir(repo().join("policies")).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, root.join("policies").join(path.file_name().unwrap())).unwrap();
    }
    // The shipped quickstart configuration, on a free port instead of 7070.
    let port = scrip_testkit::free_port();
    let config = std::fs::read_to_string(repo().join("examples/quickstart.toml"))
        .unwrap()
        .replace("127.0.0.1:7070", &format!("127.0.0.1:{port}"));
    assert!(config.contains(&format!("127.0.0.1:{port}")));
    std::fs::write(root.join("examples/quickstart.toml"), config).unwrap();

    let log = std::fs::File::create(root.join("serve.log")).unwrap();
    let _server = Guard(
        Command::new(SCRIP)
            .args(["serve", "--config", "examples/quickstart.toml"])
            .current_dir(root)
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let started = Instant::now();
    while !answers(port) {
        assert!(
            started.elapsed() < Duration::from_secs(30),
            "scrip did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }

    let bin_dir = Path::new(SCRIP).parent().unwrap();
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let scrip = |args: &[&str]| {
        Command::new(SCRIP)
            .args(args)
            .current_dir(root)
            .env("PATH", &path)
            .env("SCRIP_URL", format!("http://127.0.0.1:{port}"))
            .env("SCRIP_SOCKET", ".scrip/scrip.sock")
            .env("XDG_RUNTIME_DIR", root)
            .env_remove("SCRIP_IDENTITY")
            .env_remove("SCRIP_TASK_TOKEN")
            .output()
            .unwrap()
    };
    let out = scrip(&[
        "run",
        "--purpose",
        "try scrip",
        "--env",
        "dev",
        "--grant",
        "github:read",
        "--",
        "sh",
        "-c",
        "umask 077; scrip token --tool github --action read > token.txt && scrip introspect < token.txt > during.json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let token = std::fs::read_to_string(root.join("token.txt")).unwrap();
    // The README writes the token where only its user can read it.
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(root.join("token.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o077, 0, "token.txt mode {mode:o}");
    }
    let during: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(root.join("during.json")).unwrap()).unwrap();
    assert_eq!(during["active"], true, "{during}");
    assert_eq!(during["aud"], "github");
    assert_eq!(during["scope"], "read");

    let mut introspect = Command::new(SCRIP)
        .arg("introspect")
        .current_dir(root)
        .env("SCRIP_URL", format!("http://127.0.0.1:{port}"))
        .env("SCRIP_SOCKET", ".scrip/scrip.sock")
        .env("XDG_RUNTIME_DIR", root)
        .env_remove("SCRIP_IDENTITY")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut introspect.stdin.take().unwrap(), token.as_bytes()).unwrap();
    let out = introspect.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let after: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(after, serde_json::json!({"active": false}));
    // A token on the command line is refused: it would be in the process list.
    let out = scrip(&["introspect", token.trim()]);
    assert_eq!(out.status.code(), Some(2));
}
