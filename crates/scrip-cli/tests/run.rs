//! `scrip run` and `scrip token` as a user runs them, against a real
//! `scrip serve`: the quickstart flow, exit codes, signals, bad input.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const LOCAL_POLICY: &str = r#"
@id("local-dev")
permit (principal, action, resource)
when { principal.kind == "local" && context.environment == "dev" };
"#;

fn scrip_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_scrip"))
}

/// A running `scrip serve` in a temporary directory.
struct Server {
    child: Child,
    dir: tempfile::TempDir,
    addr: SocketAddr,
}

impl Server {
    fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().to_owned();
        let root = root.as_path();
        let policies = root.join("policies");
        fs::create_dir_all(&policies).unwrap();
        let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
        for entry in fs::read_dir(repo).unwrap() {
            let path = entry.unwrap().path();
            if matches!(
                path.extension().and_then(|e| e.to_str()),
                Some("cedar" | "cedarschema")
            ) {
                fs::copy(&path, policies.join(path.file_name().unwrap())).unwrap();
            }
        }
        fs::write(policies.join("local.cedar"), LOCAL_POLICY).unwrap();
        let port = scrip_testkit::free_port();
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        fs::write(
            root.join("scrip.toml"),
            format!(
                "listen = \"{addr}\"\ndata_dir = \"data\"\npolicy_dir = \"policies\"\n\
                 [[tools]]\nname = \"github\"\nresource = \"https://api.github.com\"\nactions = [\"read\", \"write\"]\n"
            ),
        )
        .unwrap();
        let child = Command::new(scrip_bin())
            .args(["serve", "--config"])
            .arg(root.join("scrip.toml"))
            .env("SCRIP_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                fs::File::create(root.join("serve.log")).unwrap(),
            ))
            .spawn()
            .unwrap();
        let server = Self { child, dir, addr };
        let start = Instant::now();
        while !(server.socket().exists() && TcpStream::connect(addr).is_ok()) {
            assert!(
                start.elapsed() < Duration::from_secs(30),
                "scrip serve did not start: {}",
                fs::read_to_string(root.join("serve.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("data/scrip.sock")
    }

    /// `scrip <args>` pointed at this server, with a private token cache.
    fn scrip(&self) -> Command {
        let mut cmd = Command::new(scrip_bin());
        let bin_dir = scrip_bin().parent().unwrap().to_owned();
        let path = format!(
            "{}:{}",
            bin_dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let runtime = self.dir.path().join("runtime");
        fs::create_dir_all(&runtime).unwrap();
        use std::os::unix::fs::PermissionsExt as _;
        fs::set_permissions(&runtime, fs::Permissions::from_mode(0o700)).unwrap();
        cmd.env("SCRIP_URL", self.url())
            .env("SCRIP_SOCKET", self.socket())
            .env("XDG_RUNTIME_DIR", runtime)
            .env("PATH", path)
            .env_remove("SCRIP_IDENTITY")
            .env_remove("SCRIP_TASK_TOKEN")
            .stdin(Stdio::null());
        cmd
    }

    /// `scrip run --env dev --grant github:read --`, the command to run
    /// still to be added.
    fn run_dev(&self) -> Command {
        let mut cmd = self.scrip();
        cmd.args(["run", "--env", "dev", "--grant", "github:read", "--"]);
        cmd
    }

    /// `scrip run -- sh -c <script>` in the background, once the script
    /// has made `marker`.
    fn run_until(&self, script: &str, marker: &Path) -> Child {
        let mut cmd = self.run_dev();
        cmd.args(["sh", "-c", script]);
        spawn_until(cmd, marker)
    }

    /// A local identity for this test process, from the socket.
    fn attest(&self) -> String {
        let mut s = UnixStream::connect(self.socket()).unwrap();
        s.write_all(b"ATTEST\n").unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).unwrap();
        let v: Value = serde_json::from_str(&answer).unwrap();
        v["identity_token"].as_str().unwrap().to_owned()
    }

    /// A form POST: status and JSON body.
    fn post(&self, path: &str, form: &[(&str, &str)], bearer: Option<&str>) -> (u16, Value) {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form.iter())
            .finish();
        let mut s = TcpStream::connect(self.addr).unwrap();
        let auth = bearer.map_or_else(String::new, |b| format!("Authorization: Bearer {b}\r\n"));
        write!(
            s,
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/x-www-form-urlencoded\r\n{auth}Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
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

    fn introspect(&self, token: &str) -> Value {
        let identity = self.attest();
        let (status, body) = self.post("/introspect", &[("token", token)], Some(&identity));
        assert_eq!(status, 200, "{body}");
        body
    }

    /// Whether the task token can still be exchanged.
    fn exchange(&self, task_token: &str) -> (u16, Value) {
        self.post(
            "/token",
            &[
                (
                    "grant_type",
                    "urn:ietf:params:oauth:grant-type:token-exchange",
                ),
                ("subject_token", task_token),
                (
                    "subject_token_type",
                    "urn:ietf:params:oauth:token-type:txn_token",
                ),
                ("audience", "github"),
            ],
            None,
        )
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn wait_exit(child: &mut Child, limit: Duration) -> ExitStatus {
    let start = Instant::now();
    loop {
        if let Some(s) = child.try_wait().unwrap() {
            return s;
        }
        assert!(start.elapsed() < limit, "did not exit in time");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Asserts a failed run: the exit code and a one-line message with `want`.
fn assert_refused(out: &Output, code: i32, want: &[&str]) {
    let err = text(&out.stderr);
    assert_eq!(out.status.code(), Some(code), "stderr: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err:?}");
    for w in want {
        assert!(err.contains(w), "{err:?} lacks {w:?}");
    }
}

#[test]
fn quickstart_run_a_command_get_a_token_and_it_is_dead_afterwards() {
    let server = Server::start();
    let script = "scrip token --tool github --action read && \
                  scrip token --tool github --action read --json && \
                  echo \"$SCRIP_TASK_TOKEN\"";
    let out = server
        .scrip()
        .args([
            "run",
            "--purpose",
            "quickstart",
            "--env",
            "dev",
            "--grant",
            "github:read",
        ])
        .args(["--", "sh", "-c", script])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 3, "{stdout}");
    let token = lines[0];
    let json: Value = serde_json::from_str(lines[1]).unwrap();
    // The second call was served from the cache.
    assert_eq!(json["access_token"], token);
    assert_eq!(json["token_type"], "Bearer");
    assert_eq!(json["scope"], "read");
    assert!(json["expires_in"].as_u64().unwrap() > 200, "{json}");
    let task_token = lines[2];

    // After the command exits the token is refused by introspection and the
    // task can no longer be exchanged.
    assert_eq!(
        server.introspect(token),
        serde_json::json!({"active": false})
    );
    let (status, body) = server.exchange(task_token);
    assert_eq!(
        (status, body["error"].as_str()),
        (400, Some("invalid_request")),
        "{body}"
    );
    // And the cached tokens are gone.
    let cache = server.dir.path().join("runtime/scrip-tokens");
    assert_eq!(fs::read_dir(cache).map(Iterator::count).unwrap_or(0), 0);
}

/// The command gets its task and scrip's address, and none of the
/// credentials of whoever started `scrip run`: not the key-encryption key
/// that opens every stored secret, not the identity.
#[test]
fn the_command_inherits_no_key_of_scrips() {
    let server = Server::start();
    // A real identity in `SCRIP_IDENTITY` (this user's, from the socket),
    // which `scrip run` itself uses: the command must not see it.
    let identity = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(scrip_client::attest(&server.socket()))
        .unwrap();
    let out = server
        .scrip()
        .env("SCRIP_IDENTITY", identity.token())
        .env("SCRIP_KEY_ENCRYPTION_KEY", "the-kek")
        .env("SCRIP_PREVIOUS_KEY_ENCRYPTION_KEY", "the-old-kek")
        .args(["run", "--purpose", "inherit", "--env", "dev", "--grant", "github:read"])
        .args([
            "--",
            "sh",
            "-c",
            "printf '%s|%s|%s|%s' \"${SCRIP_KEY_ENCRYPTION_KEY-absent}\" \"${SCRIP_PREVIOUS_KEY_ENCRYPTION_KEY-absent}\" \"${SCRIP_IDENTITY-absent}\" \"${SCRIP_TASK_TOKEN:+task}\"",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "absent|absent|absent|task");
}

/// Ending the task retries for a while against a scrip that does not
/// answer; a signal then gives up at once, saying the task ends at its
/// deadline, instead of holding the terminal for the retries.
#[test]
fn a_signal_while_the_task_is_ending_gives_up_at_once() {
    let server = Server::start();
    let frozen = server.dir.path().join("frozen");
    // The command freezes scrip serve, then exits: the task cannot be ended.
    let script = format!(
        "kill -STOP {} && touch {}",
        server.child.id(),
        frozen.display()
    );
    let mut child = server.run_until(&script, &frozen);
    // Past the second in which a signal is taken for the command's own,
    // counted from when `scrip run` saw the command exit, which a loaded
    // machine may delay (the retries leave time to spare).
    std::thread::sleep(Duration::from_millis(3000));
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    // The retries alone would take about 46 s.
    let status = wait_exit(&mut child, Duration::from_secs(10));
    Command::new("kill")
        .args(["-CONT", &server.child.id().to_string()])
        .status()
        .unwrap();
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .unwrap()
        .read_to_string(&mut stderr)
        .unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("interrupted while ending the task"),
        "{stderr}"
    );
}

#[test]
fn exit_codes_pass_through() {
    let server = Server::start();
    let run = |script: &str| {
        server
            .run_dev()
            .args(["sh", "-c", script])
            .output()
            .unwrap()
            .status
            .code()
    };
    assert_eq!(run("exit 0"), Some(0));
    assert_eq!(run("exit 7"), Some(7));
    // A command line with a newline and a tab still makes a purpose (the
    // default purpose is the command line, on one line).
    assert_eq!(run("true\n\texit 3"), Some(3));
    // So does one with an emoji's invisible joiners and selectors, which
    // scrip refuses in a purpose.
    assert_eq!(
        run("exit 5 # ship it \u{2714}\u{fe0f} \u{1f468}\u{200d}\u{1f4bb}"),
        Some(5)
    );
    assert_eq!(run("kill -KILL $$"), Some(128 + 9));
    // A command that died of SIGINT, SIGTERM, SIGHUP or SIGPIPE: scrip run
    // dies of it too (a shell stops a loop for a death by SIGINT, not for
    // an exit 130).
    for (name, number) in [("INT", 2), ("TERM", 15), ("HUP", 1), ("PIPE", 13)] {
        use std::os::unix::process::ExitStatusExt as _;
        let status = server
            .run_dev()
            .args(["sh", "-c", &format!("kill -{name} $$")])
            .output()
            .unwrap()
            .status;
        assert_eq!(
            (status.code(), status.signal()),
            (None, Some(number)),
            "{name}"
        );
    }
    // As a PID namespace's first process (a container's entry point) it
    // cannot die of a signal it raises (the kernel drops it): it exits
    // 128+n, not by an abort. Needs CAP_SYS_ADMIN, which CI has.
    let can_unshare = Command::new("unshare")
        .args(["--pid", "--fork", "true"])
        .output()
        .is_ok_and(|o| o.status.success());
    if can_unshare {
        use std::os::unix::process::ExitStatusExt as _;
        let cmd = server.run_dev();
        let mut first = Command::new("unshare");
        first
            .args(["--pid", "--fork", "--"])
            .arg(cmd.get_program())
            .args(cmd.get_args())
            .args(["sh", "-c", "kill -INT $$"]);
        for (key, value) in cmd.get_envs() {
            match value {
                Some(v) => first.env(key, v),
                None => first.env_remove(key),
            };
        }
        let status = first.output().unwrap().status;
        assert_eq!((status.code(), status.signal()), (Some(128 + 2), None));
    }
    // A command that cannot run: 127, as a shell says.
    let out = server
        .run_dev()
        .arg("no-such-command-xyz")
        .output()
        .unwrap();
    assert_refused(&out, 127, &["cannot run `no-such-command-xyz`"]);
}

#[test]
fn sigterm_to_scrip_run_is_forwarded_and_ends_the_task() {
    a_signal_to_scrip_run_is_forwarded_and_ends_the_task("TERM", 3);
}

#[test]
fn sigquit_to_scrip_run_is_forwarded_and_ends_the_task() {
    // Ctrl-\ (or a kill): scrip run must not die of it and leave the task
    // and the command running.
    a_signal_to_scrip_run_is_forwarded_and_ends_the_task("QUIT", 4);
}

/// A signal ignored when `scrip run` starts (`nohup`, or `&` in a script)
/// stays ignored: the command inherits that, as it would without scrip,
/// and a hangup ends neither it nor the task.
#[test]
fn a_signal_ignored_at_start_stays_ignored() {
    let server = Server::start();
    let marker = server.dir.path().join("task-token");
    let done = server.dir.path().join("done");
    let script = format!(
        "echo \"$SCRIP_TASK_TOKEN\" > {m}.tmp; mv {m}.tmp {m}; i=0; while [ $i -lt 40 ]; do sleep 0.05; i=$((i+1)); done; touch {d}",
        m = marker.display(),
        d = done.display()
    );
    let inner = server.run_dev();
    let mut cmd = Command::new("sh");
    cmd.args(["-c", "trap '' HUP INT; exec \"$0\" \"$@\""])
        .arg(inner.get_program())
        .args(inner.get_args())
        .args(["sh", "-c", &script]);
    for (k, v) in inner.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let mut child = spawn_until(cmd, &marker);
    for signal in ["-HUP", "-INT"] {
        let status = Command::new("kill")
            .args([signal, &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(0), "{status:?}");
    assert!(done.exists(), "the command was stopped");
}

/// A command that ignores the forwarded signal has `--grace` seconds to
/// exit by itself; then it is killed, and the task ended.
#[test]
fn a_command_that_ignores_sigterm_is_killed_after_the_grace() {
    let server = Server::start();
    for (grace, finished) in [("1", false), ("30", true)] {
        let marker = server.dir.path().join(format!("task-token-{grace}"));
        let done = server.dir.path().join(format!("done-{grace}"));
        // Works on for 4 s after it starts, whatever SIGTERM says.
        let script = format!(
            "trap '' TERM; echo \"$SCRIP_TASK_TOKEN\" > {m}.tmp; mv {m}.tmp {m}; i=0; while [ $i -lt 80 ]; do sleep 0.05; i=$((i+1)); done; touch {d}",
            m = marker.display(),
            d = done.display()
        );
        let mut cmd = server.scrip();
        cmd.args(["run", "--env", "dev", "--grant", "github:read"])
            .args(["--grace", grace, "--", "sh", "-c", &script]);
        let mut child = spawn_until(cmd, &marker);
        let task_token = fs::read_to_string(&marker).unwrap().trim().to_owned();
        let status = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
        let status = wait_exit(&mut child, Duration::from_secs(40));
        assert_eq!(done.exists(), finished, "--grace {grace}");
        assert_eq!(
            status.code(),
            Some(if finished { 0 } else { 128 + 9 }),
            "--grace {grace}: {status:?}"
        );
        let (status, body) = server.exchange(&task_token);
        assert_eq!(status, 400, "--grace {grace}: the task ended: {body}");
    }
}

fn a_signal_to_scrip_run_is_forwarded_and_ends_the_task(signal: &str, code: i32) {
    let server = Server::start();
    let marker = server.dir.path().join("task-token");
    let script = format!(
        "trap 'exit {code}' {signal}; echo \"$SCRIP_TASK_TOKEN\" > {}.tmp; mv {0}.tmp {0}; while true; do sleep 0.05; done",
        marker.display()
    );
    let mut child = server.run_until(&script, &marker);
    let task_token = fs::read_to_string(&marker).unwrap().trim().to_owned();
    assert_eq!(
        server.exchange(&task_token).0,
        200,
        "the task is live while it runs"
    );

    let status = Command::new("kill")
        .args([&format!("-{signal}"), &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let status = wait_exit(&mut child, Duration::from_secs(20));
    assert_eq!(status.code(), Some(code), "the child's own exit code");
    let (status, body) = server.exchange(&task_token);
    assert_eq!(status, 400, "the task ended: {body}");
}

/// `scrip run ... -- COMMAND...` in a pseudo-terminal made by Python's
/// `pty`, as its foreground process group; a Ctrl-C is typed once the
/// command prints `started`. Everything shown, then `exit=<status>`.
fn run_in_a_terminal(server: &Server, command: &[&str]) -> String {
    run_in_a_terminal_with(server, command, false)
}

/// As [`run_in_a_terminal`]; with `redirected`, scrip's standard input,
/// output and error are not the terminal (`< prompt.txt > log 2>&1`),
/// which stays its controlling terminal.
fn run_in_a_terminal_with(server: &Server, command: &[&str], redirected: bool) -> String {
    let scrip = server.scrip();
    let driver = r#"
import os, pty, sys, time
pid, fd = pty.fork()
if pid == 0:
    os.execv(sys.argv[1], sys.argv[1:])
out = b""
def read_for(seconds):
    global out
    end = time.time() + seconds
    while time.time() < end:
        try:
            data = os.read(fd, 4096)
        except OSError:
            return False
        if not data:
            return False
        out += data
        if b"started" in out and not b"\x03sent" in out:
            return True
    return True
read_for(30)
os.write(fd, b"\x03")
out += b"\x03sent"
while True:
    try:
        data = os.read(fd, 4096)
    except OSError:
        break
    if not data:
        break
    out += data
_, status = os.waitpid(pid, 0)
sys.stdout.write(out.decode(errors="replace"))
sys.stdout.write("\nexit=%d\n" % os.waitstatus_to_exitcode(status))
"#;
    let mut cmd = Command::new("python3");
    cmd.args(["-c", driver]);
    if redirected {
        cmd.args([
            "/bin/sh",
            "-c",
            // Fd 3 keeps the terminal open (a pty with no open end reads
            // as closed) without being scrip's input, output or error.
            "exec \"$@\" </dev/null >/dev/null 2>&1 3</dev/tty",
            "sh",
        ]);
    }
    cmd.arg(scrip.get_program())
        .args([
            "run",
            "--purpose",
            "tty",
            "--env",
            "dev",
            "--grant",
            "github:read",
            "--",
        ])
        .args(command);
    for (k, v) in scrip.get_envs() {
        match v {
            Some(v) => cmd.env(k, v),
            None => cmd.env_remove(k),
        };
    }
    let out = cmd.stdin(Stdio::null()).output().unwrap();
    let shown = text(&out.stdout);
    assert!(out.status.success(), "{shown}{}", text(&out.stderr));
    shown
}

/// A Ctrl-C at the terminal reaches an interactive command directly; a
/// command that takes it as "stop this step" (a shell, a REPL) goes on,
/// and is not killed `GRACE` later.
#[test]
fn ctrl_c_at_the_terminal_is_the_commands_to_handle() {
    let server = Server::start();
    // The command traps SIGINT, then works on for 12 s: past the 5 s a
    // forwarded signal would give it.
    let script = "trap 'echo caught' INT; echo started; i=0; while [ $i -lt 120 ]; do sleep 0.1; i=$((i+1)); done; echo finished";
    let shown = run_in_a_terminal(&server, &["sh", "-c", script]);
    assert!(shown.contains("caught"), "{shown}");
    assert!(
        shown.contains("finished"),
        "the command was killed: {shown}"
    );
    assert!(shown.trim_end().ends_with("exit=0"), "{shown}");
}

/// A command that left the terminal's process group (`setsid`) does not
/// get the terminal's Ctrl-C: scrip, which does, passes it on.
/// The same when scrip's standard input, output and error are files: the
/// terminal is still found (its controlling one), and a Ctrl-C typed there
/// is not sent to the command a second time.
#[test]
fn ctrl_c_at_the_terminal_is_the_commands_to_handle_with_its_input_a_file() {
    let server = Server::start();
    let script = "trap 'echo caught >/dev/tty' INT; echo started >/dev/tty; i=0; while [ $i -lt 120 ]; do sleep 0.1; i=$((i+1)); done; echo finished >/dev/tty";
    let shown = run_in_a_terminal_with(&server, &["sh", "-c", script], true);
    assert_eq!(shown.matches("caught").count(), 1, "{shown}");
    assert!(
        shown.contains("finished"),
        "the command was killed: {shown}"
    );
    assert!(shown.trim_end().ends_with("exit=0"), "{shown}");
}

#[test]
fn ctrl_c_reaches_a_command_that_left_the_terminals_group() {
    let server = Server::start();
    let script = "trap 'echo caught; exit 3' INT; echo started; i=0; while [ $i -lt 120 ]; do sleep 0.1; i=$((i+1)); done; echo finished";
    let shown = run_in_a_terminal(&server, &["setsid", "sh", "-c", script]);
    assert!(shown.contains("caught"), "{shown}");
    assert!(!shown.contains("finished"), "{shown}");
    assert!(shown.trim_end().ends_with("exit=3"), "{shown}");
}

#[test]
fn bad_input_gets_one_line_saying_what_to_do_and_starts_nothing() {
    let server = Server::start();
    let marker = server.dir.path().join("ran");
    let touch = format!("touch {}", marker.display());
    let run = |extra: &[&str], envs: &[(&str, &str)]| {
        let mut cmd = server.scrip();
        cmd.arg("run").args(extra);
        if !extra.contains(&"--env") {
            cmd.args(["--env", "dev"]);
        }
        cmd.args(["--", "sh", "-c", &touch]);
        for (k, v) in envs {
            cmd.env(k, v);
        }
        cmd.output().unwrap()
    };

    let out = run(&["--grant", "gitlab:read"], &[]);
    assert_refused(
        &out,
        1,
        &["unknown tool `gitlab`", "invalid_scope", "--grant"],
    );
    let out = run(&["--grant", "github:admin"], &[]);
    assert_refused(&out, 1, &["no action `admin`", "--grant"]);
    let out = run(&["--grant", "github:read", "--env", "prod"], &[]);
    assert_refused(&out, 1, &["access_denied"]);
    // A grant policy refuses beside one it permits: the task starts with
    // the one, and says what it left out.
    let out = run(&["--grant", "github:write", "--grant", "github:read"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let said = text(&out.stderr);
    assert!(
        said.contains("the task does not hold github:write: policy refused it")
            && said.contains("it holds github:read"),
        "{said}"
    );
    assert!(marker.exists());
    fs::remove_file(&marker).unwrap();

    let free = SocketAddr::from(([127, 0, 0, 1], scrip_testkit::free_port()));
    let out = run(
        &[
            "--grant",
            "github:read",
            "--server",
            &format!("http://{free}"),
        ],
        &[],
    );
    // With the cause, not only that it failed.
    assert_refused(
        &out,
        1,
        &[
            "cannot reach scrip",
            "Connection refused",
            "scrip serve",
            "SCRIP_URL",
        ],
    );

    let out = run(
        &[
            "--grant",
            "github:read",
            "--socket",
            "/nonexistent/scrip.sock",
        ],
        &[],
    );
    assert_refused(&out, 1, &["no scrip attestation socket", "SCRIP_SOCKET"]);

    // An expired identity is reported before anything is asked.
    use base64::Engine as _;
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let expired = format!(
        "{}.{}.c2ln",
        b64("{\"alg\":\"ES256\"}"),
        b64("{\"sub\":\"x\",\"exp\":1000}")
    );
    let out = run(&["--grant", "github:read"], &[("SCRIP_IDENTITY", &expired)]);
    assert_refused(&out, 1, &["expired", "fresh identity"]);
    let file = server.dir.path().join("identity.jwt");
    fs::write(&file, &expired).unwrap();
    let out = run(
        &[
            "--grant",
            "github:read",
            "--identity-file",
            file.to_str().unwrap(),
        ],
        &[],
    );
    assert_refused(&out, 1, &["identity file", "expired"]);

    // The hint to check the identity comes with the identity's refusals
    // only, not with another invalid request.
    let unsigned = format!(
        "{}.{}.c2ln",
        b64("{\"alg\":\"ES256\"}"),
        b64("{\"iss\":\"https://nowhere.example\",\"sub\":\"x\",\"exp\":4000000000}")
    );
    let out = run(
        &["--grant", "github:read"],
        &[("SCRIP_IDENTITY", &unsigned)],
    );
    assert_refused(
        &out,
        1,
        &["invalid_request", "subject_token", "check the identity"],
    );
    let out = run(&["--grant", "github:read", "--env", "production"], &[]);
    assert_refused(&out, 1, &["invalid_request", "environment"]);
    assert!(!text(&out.stderr).contains("identity"), "{out:?}");

    assert!(!marker.exists(), "the command never ran");

    // No grant, no environment, or no command: usage errors.
    let out = server
        .scrip()
        .args(["run", "--env", "dev", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = server
        .scrip()
        .args(["run", "--grant", "github:read", "--", "true"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("--env <ENV>"), "{out:?}");
    let out = server
        .scrip()
        .args(["run", "--env", "dev", "--grant", "github:read"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));

    // `scrip token` outside a task, and with a dead task.
    let out = server
        .scrip()
        .args(["token", "--tool", "github"])
        .output()
        .unwrap();
    assert_refused(&out, 1, &["SCRIP_TASK_TOKEN is not set", "scrip run"]);
    let out = server
        .scrip()
        .args(["token", "--tool", "github"])
        .env("SCRIP_TASK_TOKEN", "not-a-token")
        .output()
        .unwrap();
    assert_refused(&out, 1, &["invalid_request", "start a new one"]);
}

/// The operator ends a compromised agent's tasks without their tokens,
/// beside the running scrip, which stops exchanging them (an exchange is
/// committed only while its task is open, whatever was kept in memory) and
/// says so at introspection; each ending is in the audit trail.
#[test]
fn an_operator_revokes_tasks_while_scrip_runs() {
    let server = Server::start();
    let config = server.dir.path().join("scrip.toml");
    let start = |purpose: &str| {
        let out = server
            .scrip()
            .args(["task", "start", "--env", "dev", "--grant", "github:read"])
            .args(["--purpose", purpose])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout).trim().to_owned()
    };
    let txn = |token: &str| -> String {
        use base64::Engine as _;
        let payload = token.split('.').nth(1).unwrap();
        let claims: Value = serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap();
        claims["txn"].as_str().unwrap().to_owned()
    };
    let (one, two) = (start("triage JIRA-7"), start("triage JIRA-8"));
    assert_eq!(server.introspect(&one)["active"], true);
    // Exchanged once each: their records are now kept in memory.
    let (status, access) = server.exchange(&one);
    assert_eq!(status, 200, "{access}");
    let access = access["access_token"].as_str().unwrap().to_owned();
    assert_eq!(server.exchange(&two).0, 200);
    let revoke = |args: &[&str]| {
        server
            .scrip()
            .args(["task", "revoke", "--config"])
            .arg(&config)
            .args(args)
            .output()
            .unwrap()
    };
    // Ended for the server at once; allowing for a loaded machine.
    let ended_soon = |token: &str| {
        let started = std::time::Instant::now();
        while server.exchange(token).0 == 200 {
            assert!(
                started.elapsed() < std::time::Duration::from_secs(10),
                "still exchanged after its revocation"
            );
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
    };

    let out = revoke(&["--id", &txn(&one), "--reason", "INC-42: leaked runner"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), txn(&one));
    ended_soon(&one);
    assert_eq!(server.introspect(&access)["active"], false);
    // Its task token too, though the server kept its task in memory: the
    // embedded store looks for other processes' revocations every second.
    let started = std::time::Instant::now();
    while server.introspect(&one)["active"] != false {
        assert!(
            started.elapsed() < std::time::Duration::from_secs(10),
            "the task token is still active"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert_eq!(
        server.exchange(&two).0,
        200,
        "another task of the agent goes on"
    );

    // Every open task of the agent, by its subject (as `task list` shows it).
    let list = server
        .scrip()
        .args(["task", "list", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let line: Value = serde_json::from_str(text(&list.stdout).trim()).unwrap();
    let agent = line["agent"]["sub"].as_str().unwrap().to_owned();
    let issuer = line["agent"]["iss"].as_str().unwrap().to_owned();
    // Of another issuer: none.
    let out = revoke(&[
        "--agent",
        &agent,
        "--issuer",
        "https://elsewhere.example",
        "--reason",
        "INC-42",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "");
    assert!(
        text(&out.stderr).contains("no open task"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(server.exchange(&two).0, 200);
    let out = revoke(&["--agent", &agent, "--issuer", &issuer, "--reason", "INC-42"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), txn(&two));
    ended_soon(&two);

    // Recorded, naming the command and the reason, in a chain that verifies.
    let out = server
        .scrip()
        .args(["audit", "query", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let records = text(&out.stdout);
    for id in [txn(&one), txn(&two)] {
        assert!(
            records.lines().any(|l| l.contains(&id)
                && l.contains("\"task.ended\"")
                && l.contains("ended by the operator (scrip task revoke, uid ")
                && l.contains("INC-42")),
            "{records}"
        );
    }
    let out = server
        .scrip()
        .args(["audit", "verify", "--strict", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    // Signed in the commits that wrote them, as `scrip secret`'s are.
    assert!(
        !text(&out.stdout).contains("wait for their writers"),
        "{}",
        text(&out.stdout)
    );

    // Mistakes: an unknown id, no reason, neither --id nor --agent.
    let out = revoke(&["--id", "nope", "--reason", "x"]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("no task `nope`"),
        "{}",
        text(&out.stderr)
    );
    assert_eq!(revoke(&["--id", "nope"]).status.code(), Some(2));
    assert_eq!(revoke(&["--reason", "x"]).status.code(), Some(2));
    let out = revoke(&["--id", &txn(&one), "--reason", "two\nlines"]);
    assert_eq!(out.status.code(), Some(1));
}

/// The agent the bulk tests end, and its issuer.
const BULK: &str = "system:serviceaccount:ci:bulk";
const BULK_ISSUER: &str = "https://k8s.test";

fn now_s() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// An open task of [`BULK`] at `issuer`, written straight to the store.
fn bulk_task(
    id: &str,
    issuer: &str,
    parent: Option<&str>,
    expires_at: u64,
) -> scrip_store::TaskRecord {
    scrip_store::TaskRecord {
        id: id.into(),
        parent: parent.map(Into::into),
        agent: scrip_token::WorkloadIdentity {
            issuer: issuer.into(),
            subject: BULK.into(),
            kind: scrip_token::IdentityKind::Kubernetes,
            attributes: std::collections::BTreeMap::new(),
            claims: std::collections::BTreeMap::new(),
        },
        actor: parent.map(|_| scrip_token::Actor {
            sub: "helper".into(),
            iss: Some(issuer.into()),
            act: None,
        }),
        may_act: Vec::new(),
        grants: "github:read".into(),
        held: String::new(),
        purpose: "bulk".into(),
        environment: "dev".into(),
        depth: u32::from(parent.is_some()),
        token_jti: format!("jti-{id}"),
        created_at: now_s(),
        expires_at,
        ended_at: None,
        end_reason: None,
    }
}

/// A compromised sub-agent holds sub-tasks of other agents' trees: `task
/// revoke --agent` with its subject ends those (and what it delegated in
/// turn), not the tasks of the agents that delegated to it; with --issuer,
/// only where it acts with an identity of that issuer.
#[test]
fn an_operator_ends_what_a_compromised_sub_agent_holds() {
    use scrip_store::{Store as _, Write};
    let server = Server::start();
    let config = server.dir.path().join("scrip.toml");
    let now = now_s();
    let elsewhere = "https://elsewhere.test";
    let mut passed_on = bulk_task("passed-1", BULK_ISSUER, Some("held-1"), now + 500);
    passed_on.actor = Some(scrip_token::Actor {
        sub: "deeper".into(),
        iss: Some(BULK_ISSUER.into()),
        act: Some(Box::new(scrip_token::Actor {
            sub: "helper".into(),
            iss: Some(BULK_ISSUER.into()),
            act: None,
        })),
    });
    passed_on.depth = 2;
    let writes = vec![
        Write::InsertTask(Box::new(bulk_task("r-1", BULK_ISSUER, None, now + 3_600))),
        Write::InsertTask(Box::new(bulk_task(
            "held-1",
            BULK_ISSUER,
            Some("r-1"),
            now + 600,
        ))),
        Write::InsertTask(Box::new(passed_on)),
        Write::InsertTask(Box::new(bulk_task("r-2", elsewhere, None, now + 3_600))),
        Write::InsertTask(Box::new(bulk_task(
            "held-2",
            elsewhere,
            Some("r-2"),
            now + 700,
        ))),
    ];
    let (rt, store) = store_of(&server);
    rt.block_on(store.commit(writes)).unwrap();
    let revoke = |args: &[&str]| {
        server
            .scrip()
            .args(["task", "revoke", "--config"])
            .arg(&config)
            .args(args)
            .args(["--reason", "INC-7"])
            .output()
            .unwrap()
    };
    let state = |id: &str| rt.block_on(store.task(id)).unwrap().unwrap().end_reason;

    // `task list --json` names a sub-task's current actor with its issuer.
    let list = server
        .scrip()
        .args(["task", "list", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(list.status.success(), "{}", text(&list.stderr));
    let listed: Vec<Value> = text(&list.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let held = listed.iter().find(|t| t["id"] == "held-2").unwrap();
    assert_eq!(
        (&held["actor"], &held["actor_iss"]),
        (&json!("helper"), &json!(elsewhere))
    );
    let root = listed.iter().find(|t| t["id"] == "r-2").unwrap();
    assert_eq!(
        (&root["actor"], &root["actor_iss"]),
        (&Value::Null, &Value::Null)
    );

    // It holds sub-tasks as two issuers' workloads: without --issuer,
    // neither is ended.
    let out = revoke(&["--agent", "helper"]);
    assert_refused(
        &out,
        1,
        &["`helper`", BULK_ISSUER, elsewhere, "nothing was ended"],
    );
    assert_eq!((state("held-1"), state("held-2")), (None, None));

    let out = revoke(&["--agent", "helper", "--issuer", elsewhere]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "held-2\n");
    assert_eq!(state("held-2").as_deref(), Some("revoked"));
    assert_eq!(state("held-1"), None);

    let out = revoke(&["--agent", "helper"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "held-1\n");
    assert_eq!(state("held-1").as_deref(), Some("revoked"));
    assert_eq!(state("passed-1").as_deref(), Some("parent ended"));
    // The agents that delegated to it go on.
    assert_eq!(state("r-1"), None);
    assert_eq!(state("r-2"), None);

    let out = revoke(&["--agent", "deeper"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "");
    assert!(
        text(&out.stderr).contains("no open task"),
        "{}",
        text(&out.stderr)
    );
}

/// `server`'s store, opened beside it, and a runtime to use it on.
fn store_of(server: &Server) -> (tokio::runtime::Runtime, scrip_store::SqliteStore) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let store = rt
        .block_on(scrip_store::SqliteStore::open_in(
            &server.dir.path().join("data"),
        ))
        .unwrap();
    (rt, store)
}

/// An operator ends an agent with more open tasks than a page
/// (`revoke_agent` reads 1,000 at a time and ends 250 at once), some with
/// sub-tasks and some already ended, beside the running scrip, which goes
/// on exchanging another agent's task token: each root of the agent's
/// issuer is ended and printed once, soonest deadline first; its sub-tasks
/// end with it; another issuer's task of the same subject stays open; and
/// none of the server's commits fails meanwhile.
#[test]
fn an_operator_ends_an_agent_with_thousands_of_tasks() {
    use scrip_store::{Store as _, Write};
    let server = Server::start();
    let config = server.dir.path().join("scrip.toml");
    let out = server
        .scrip()
        .args(["task", "start", "--env", "dev", "--grant", "github:read"])
        .args(["--purpose", "another agent's work"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let other = text(&out.stdout).trim().to_owned();
    assert_eq!(server.exchange(&other).0, 200);

    let (bulk, issuer) = (BULK, BULK_ISSUER);
    let now = now_s();
    let task = |id: String, iss: &str, parent: Option<&str>, expires_at: u64| {
        bulk_task(&id, iss, parent, expires_at)
    };
    // 1,100 roots, pairs of them sharing a deadline (ordered then by id),
    // written in no particular order; sub-tasks of two; one root already
    // ended; the same subject's task at another issuer.
    let mut roots: Vec<(u64, String)> = (0..1_100u64)
        .map(|i| {
            (
                now + 3_600 + i / 2,
                format!("bulk-{:04}", (i * 7_919) % 10_000),
            )
        })
        .collect();
    let mut writes: Vec<Write> = roots
        .iter()
        .rev()
        .map(|(at, id)| Write::InsertTask(Box::new(task(id.clone(), issuer, None, *at))))
        .collect();
    for (n, parent) in [&roots[0].1, &roots[1_099].1].into_iter().enumerate() {
        let child = task(format!("bulk-child-{n}"), issuer, Some(parent), now + 600);
        writes.push(Write::InsertTask(Box::new(child)));
    }
    writes.push(Write::InsertTask(Box::new(task(
        "bulk-elsewhere".into(),
        "https://elsewhere.test",
        None,
        now + 600,
    ))));
    let ended_before = roots.remove(500).1;
    writes.push(Write::EndOpenTask {
        id: ended_before.clone(),
        at: now,
        reason: "completed".into(),
        grace: 60,
    });
    roots.sort();
    let (rt, store) = store_of(&server);
    rt.block_on(store.commit(writes)).unwrap();

    let end_bulk = || {
        server
            .scrip()
            .args(["task", "revoke", "--config"])
            .arg(&config)
            .args(["--agent", bulk, "--issuer", issuer, "--reason", "INC-9"])
            .output()
            .unwrap()
    };
    // The server's writes go on while the command ends them.
    let stop = std::sync::atomic::AtomicBool::new(false);
    let (out, exchanges) = std::thread::scope(|s| {
        let exchanges = s.spawn(|| {
            let mut statuses = Vec::new();
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                statuses.push(server.exchange(&other).0);
            }
            statuses
        });
        let out = end_bulk();
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        (out, exchanges.join().unwrap())
    });
    assert!(out.status.success(), "{}", text(&out.stderr));
    let printed: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    let expected: Vec<String> = roots.iter().map(|(_, id)| id.clone()).collect();
    assert_eq!(printed.len(), 1_099);
    assert!(printed == expected, "not each root once, soonest first");
    assert!(!exchanges.is_empty());
    assert!(
        exchanges.iter().all(|s| *s == 200),
        "the server failed while the command ran: {:?}",
        exchanges.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );

    let state = |id: &str| {
        let t = rt.block_on(store.task(id)).unwrap().unwrap();
        t.end_reason
    };
    for (_, id) in &roots {
        assert_eq!(state(id).as_deref(), Some("revoked"), "{id}");
    }
    for child in ["bulk-child-0", "bulk-child-1"] {
        assert_eq!(state(child).as_deref(), Some("parent ended"), "{child}");
    }
    assert_eq!(state(&ended_before).as_deref(), Some("completed"));
    assert_eq!(state("bulk-elsewhere"), None);
    let records = rt
        .block_on(store.audit(&scrip_store::AuditFilter {
            agent_sub: Some(bulk.into()),
            limit: Some(100_000),
            ..scrip_store::AuditFilter::default()
        }))
        .unwrap();
    let ended: std::collections::BTreeSet<_> = records
        .iter()
        .filter(|r| r.event == "task.ended")
        .filter_map(|r| r.task_id.clone())
        .collect();
    assert_eq!(ended, expected.into_iter().collect());

    // Again: nothing is left to end.
    let out = end_bulk();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "");
    assert!(text(&out.stderr).contains("no open task"));
}

/// Endings the store cannot take in time (here another process holds the
/// embedded store's write lock past the busy wait) are tried again, fewer
/// at a time, rather than failing the command: once the lock is free, every
/// task is ended and printed once.
#[test]
fn an_operator_ends_an_agent_while_the_store_is_held() {
    use scrip_store::{Store as _, Write};
    let server = Server::start();
    let config = server.dir.path().join("scrip.toml");
    let deadline = now_s() + 3_600;
    let ids: Vec<String> = (0..40).map(|i| format!("held-{i:02}")).collect();
    let (rt, store) = store_of(&server);
    rt.block_on(
        store.commit(
            ids.iter()
                .map(|id| Write::InsertTask(Box::new(bulk_task(id, BULK_ISSUER, None, deadline))))
                .collect(),
        ),
    )
    .unwrap();
    // Held for 7 s from before the command starts: the first endings wait
    // 5 s for it and fail.
    let (held, taken) = std::sync::mpsc::channel();
    let holder = std::thread::spawn({
        let path = server.dir.path().join("data/scrip.db");
        move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async {
                use sqlx::{ConnectOptions as _, Connection as _};
                let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(&path)
                    .connect()
                    .await
                    .unwrap();
                sqlx::raw_sql("BEGIN IMMEDIATE")
                    .execute(&mut conn)
                    .await
                    .unwrap();
                held.send(()).unwrap();
                tokio::time::sleep(std::time::Duration::from_secs(7)).await;
                sqlx::raw_sql("ROLLBACK").execute(&mut conn).await.unwrap();
                conn.close().await.unwrap();
            });
        }
    });
    taken.recv().unwrap();
    let out = server
        .scrip()
        .args(["task", "revoke", "--config"])
        .arg(&config)
        .args(["--agent", BULK, "--reason", "INC-9"])
        .output()
        .unwrap();
    holder.join().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("trying again fewer at a time"),
        "{}",
        text(&out.stderr)
    );
    // Each once; those tried again after the others.
    let mut printed: Vec<String> = text(&out.stdout).lines().map(str::to_owned).collect();
    printed.sort();
    assert_eq!(printed, ids);
    for id in &ids {
        let task = rt.block_on(store.task(id)).unwrap().unwrap();
        assert_eq!(task.end_reason.as_deref(), Some("revoked"), "{id}");
    }
}

/// A task that reached its deadline less than `clock_skew` ago ended with
/// no feed event, while verifiers still take its tokens a leeway past
/// `exp`: `task revoke --id` publishes its end (once, on the record), as
/// revoking its token would. One that ended longer ago, or before its
/// deadline (it has its event), gets none.
#[test]
fn revoking_a_task_just_past_its_deadline_publishes_its_end() {
    use scrip_store::{AuditFilter, RevocationKind, Store as _, Write};
    let server = Server::start();
    let config = server.dir.path().join("scrip.toml");
    let now = now_s();
    // Ended as the sweep ends them (no event), or early (with its event).
    let (rt, store) = store_of(&server);
    for (id, expires_at, ended_at) in [
        ("just-past", now - 5, now - 5),
        ("long-past", now - 100, now - 100),
        ("ended-early", now + 100, now - 5),
    ] {
        rt.block_on(store.commit(vec![
            Write::InsertTask(Box::new(bulk_task(id, BULK_ISSUER, None, expires_at))),
            Write::EndTask {
                id: id.into(),
                at: ended_at,
                reason: "expired".into(),
                grace: 0,
            },
        ]))
        .unwrap();
    }
    for first in [true, false] {
        let out = server
            .scrip()
            .args(["task", "revoke", "--config"])
            .arg(&config)
            .args([
                "--id",
                "just-past",
                "--id",
                "long-past",
                "--id",
                "ended-early",
            ])
            .args(["--reason", "INC-11"])
            .output()
            .unwrap();
        let said = text(&out.stderr);
        assert!(out.status.success(), "{said}");
        // None was open, so none is said to be ended; the publication is
        // said, the first time.
        assert_eq!(text(&out.stdout), "");
        assert_eq!(
            said.contains("task `just-past` was not open: it reached its deadline")
                && said.contains("its end is published to the revocation feed"),
            first,
            "{said}"
        );
        assert!(
            !said.contains("long-past") && !said.contains("ended-early"),
            "{said}"
        );
    }
    let feed = rt.block_on(store.revocations(0, now, 100)).unwrap();
    let tasks: Vec<_> = feed
        .iter()
        .filter(|r| r.kind == RevocationKind::Task)
        .map(|r| (r.txn.as_str(), r.exp))
        .collect();
    // The early end's own event, then the one published.
    assert_eq!(
        tasks,
        [("ended-early", now + 100), ("just-past", now - 5 + 30)],
        "{feed:?}"
    );
    let published = rt
        .block_on(store.audit(&AuditFilter {
            event: Some("task.end_published".into()),
            ..AuditFilter::default()
        }))
        .unwrap();
    assert_eq!(published.len(), 1, "{published:#?}");
    assert_eq!(published[0].task_id.as_deref(), Some("just-past"));
    assert_eq!(published[0].jti.as_deref(), Some("jti-just-past"));
    let reason = published[0].reason.as_deref().unwrap();
    assert!(
        reason.starts_with("published by the operator (scrip task revoke, uid ")
            && reason.contains("INC-11; it had just reached its deadline"),
        "{reason}"
    );
}

/// Two clusters each run a workload of one subject (their issuers differ):
/// to the operator they are two agents. `task list --issuer` lists one
/// cluster's; the tables of `task list` and `audit query` name each row's
/// issuer; and `task revoke --agent` without --issuer ends neither, naming
/// both issuers, until --issuer says which (once only one issuer's tasks
/// are left, it ends those).
#[test]
fn one_subject_at_two_issuers_is_two_agents() {
    use scrip_store::{Store as _, Write};
    let server = Server::start();
    let config = server.dir.path().join("scrip.toml");
    let (a, b) = (
        "https://k8s.cluster-a.example",
        "https://k8s.cluster-b.example",
    );
    let now = now_s();
    // Cluster A's end first, so that B's are found past a page of A's.
    let tasks = [
        ("a-1", a, 100),
        ("a-2", a, 200),
        ("b-1", b, 300),
        ("b-2", b, 400),
    ];
    let (rt, store) = store_of(&server);
    rt.block_on(
        store.commit(
            tasks
                .iter()
                .map(|(id, iss, ttl)| {
                    Write::InsertTask(Box::new(bulk_task(id, iss, None, now + ttl)))
                })
                .collect(),
        ),
    )
    .unwrap();
    let scrip = |args: &[&str]| {
        let mut cmd = server.scrip();
        cmd.args(args).arg("--config").arg(&config);
        cmd.output().unwrap()
    };
    let open = |id: &str| {
        rt.block_on(store.task(id))
            .unwrap()
            .unwrap()
            .end_reason
            .is_none()
    };

    // Listed by subject, then by issuer exactly.
    let listed = |args: &[&str]| -> Vec<String> {
        let mut all = vec!["task", "list", "--json", "--agent", BULK];
        all.extend_from_slice(args);
        let out = scrip(&all);
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
            .lines()
            .map(|l| {
                let t: Value = serde_json::from_str(l).unwrap();
                let iss = tasks.iter().find(|(id, ..)| t["id"] == *id).unwrap().1;
                assert_eq!(t["agent"], json!({"iss": iss, "sub": BULK}), "{l}");
                t["id"].as_str().unwrap().to_owned()
            })
            .collect()
    };
    assert_eq!(listed(&[]), ["a-1", "a-2", "b-1", "b-2"]);
    assert_eq!(listed(&["--issuer", a]), ["a-1", "a-2"]);
    assert_eq!(listed(&["--issuer", b]), ["b-1", "b-2"]);
    assert!(listed(&["--issuer", "https://k8s.cluster-a.example/"]).is_empty());
    // --limit counts the issuer's tasks, read past the other's.
    assert_eq!(listed(&["--issuer", b, "--limit", "1"]), ["b-1"]);
    let out = scrip(&[
        "task", "list", "--agent", BULK, "--issuer", b, "--limit", "1",
    ]);
    assert!(
        text(&out.stderr).contains("more may be open"),
        "{}",
        text(&out.stderr)
    );
    let out = scrip(&[
        "task", "list", "--agent", BULK, "--issuer", b, "--limit", "3",
    ]);
    assert_eq!(text(&out.stderr), "", "no note below the limit");
    // The store finds open tasks by subject: --issuer goes with --agent.
    let out = scrip(&["task", "list", "--issuer", a]);
    assert_eq!(out.status.code(), Some(2), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("--agent"),
        "{}",
        text(&out.stderr)
    );

    // The table names each task's issuer beside its subject.
    let out = scrip(&["task", "list", "--agent", BULK]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let header = table.lines().next().unwrap();
    assert!(
        header.contains("agent") && header.contains("issuer"),
        "{header}"
    );
    assert!(header.find("agent") < header.find("issuer"), "{header}");
    for (id, iss, _) in tasks {
        let other = if iss == a { b } else { a };
        let row = table.lines().find(|l| l.starts_with(id)).expect(&table);
        assert!(row.contains(iss) && !row.contains(other), "{table}");
    }

    // Without --issuer, nothing is ended: both issuers are named.
    let revoke = |args: &[&str]| {
        let mut all = vec!["task", "revoke", "--agent", BULK, "--reason", "INC-5"];
        all.extend_from_slice(args);
        scrip(&all)
    };
    let out = revoke(&[]);
    assert_refused(
        &out,
        1,
        &[BULK, a, b, "(2 tasks)", "nothing was ended", "--issuer"],
    );
    assert_eq!(text(&out.stdout), "");
    assert!(tasks.iter().all(|(id, ..)| open(id)), "nothing ended");

    // With it, that cluster's only.
    let out = revoke(&["--issuer", a]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "a-1\na-2\n");
    assert!(!open("a-1") && !open("a-2") && open("b-1") && open("b-2"));
    // Only one issuer's are left: without --issuer, those are ended.
    let out = revoke(&[]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout), "b-1\nb-2\n");
    assert!(!open("b-1") && !open("b-2"));

    // The audit table names the issuer of each ending's agent too (and
    // its JSON lines carry it).
    let out = scrip(&["audit", "query", "--agent", BULK]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let table = text(&out.stdout);
    let header = table.lines().next().unwrap();
    assert!(header.find("agent") < header.find("issuer"), "{header}");
    for (id, iss, _) in tasks {
        let other = if iss == a { b } else { a };
        let row = table
            .lines()
            .find(|l| l.contains("task.ended") && l.contains(&format!("  {id}  ")))
            .expect(&table);
        assert!(row.contains(iss) && !row.contains(other), "{table}");
    }
    let out = scrip(&["audit", "query", "--json", "--agent", BULK, "--issuer", b]);
    let records: Vec<Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 2, "{records:?}");
    assert!(records.iter().all(|r| r["agent_iss"] == b), "{records:?}");
}

/// The default purpose is the command line with what is plainly a secret
/// masked: the trail, the task token and approvers never see it.
#[test]
fn the_default_purpose_masks_secrets_on_the_command_line() {
    let server = Server::start();
    let config = server.dir.path().join("scrip.toml");
    let out = server
        .run_dev()
        .args([
            "sh",
            "-c",
            "exit 0",
            "sh",
            "--token",
            "hunter2",
            // Secrets long enough not to turn up by chance in the
            // records' random ids and hashes (`v2` once did).
            "https://u:pw-s3cret@h/?k=query-s3cret",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = server
        .scrip()
        .args(["audit", "query", "--json", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let records = text(&out.stdout);
    assert!(
        records.contains("scrip run sh -c exit 0 sh --token *** https://u:***@h/?***"),
        "{records}"
    );
    for secret in ["hunter2", "pw-s3cret", "query-s3cret"] {
        assert!(!records.contains(secret), "{secret} in {records}");
    }
}

#[test]
fn task_start_list_and_end() {
    let server = Server::start();
    let config = server.dir.path().join("scrip.toml");
    let out = server
        .scrip()
        .args([
            "task",
            "start",
            "--env",
            "dev",
            "--grant",
            "github:read",
            "--purpose",
            "triage JIRA-7",
        ])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let task = text(&out.stdout).trim().to_owned();
    assert_eq!(server.introspect(&task)["active"], true);
    assert_eq!(server.exchange(&task).0, 200);

    // Listed from the store while it runs, as a table and as JSON lines.
    let list = |json: bool| {
        let mut cmd = server.scrip();
        cmd.args(["task", "list", "--config"]).arg(&config);
        if json {
            cmd.arg("--json");
        }
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        text(&out.stdout)
    };
    let claims: Value = {
        use base64::Engine as _;
        let payload = task.split('.').nth(1).unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap()
    };
    let id = claims["txn"].as_str().unwrap();
    let table = list(false);
    assert!(
        table.contains(id) && table.contains("triage JIRA-7"),
        "{table}"
    );
    let line: Value = serde_json::from_str(list(true).trim()).unwrap();
    assert_eq!(line["id"], id);
    assert_eq!(line["grants"], "github:read");
    assert_eq!(line["expires_at"], claims["exp"]);
    assert!(!list(true).contains(&task), "the list never shows a token");
    // At its limit, a note says more may be open; below it, none.
    let out = server
        .scrip()
        .args(["task", "list", "--limit", "1", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains("more may be open"),
        "{}",
        text(&out.stderr)
    );
    let out = server
        .scrip()
        .args(["task", "list", "--limit", "2", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert_eq!(text(&out.stderr), "", "no note below the limit");

    // Without a token, `end` says how to give one and ends nothing.
    let out = server.scrip().args(["task", "end"]).output().unwrap();
    assert_refused(&out, 1, &["SCRIP_TASK_TOKEN"]);
    assert_eq!(server.introspect(&task)["active"], true);

    // Revocation answers 200 to any token, so `end` reads it first: what
    // is not a task token of this scrip ends nothing and exits 1.
    let (status, access) = server.exchange(&task);
    assert_eq!(status, 200, "{access}");
    let access = access["access_token"].as_str().unwrap().to_owned();
    let foreign = {
        let mut parts: Vec<String> = task.split('.').map(str::to_owned).collect();
        let mut c = claims.clone();
        c["iss"] = "https://another-scrip.example".into();
        use base64::Engine as _;
        parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&c).unwrap());
        parts.join(".")
    };
    // Revocation of these answers 200 and changes nothing, so `end` checks
    // the signature with the keys this scrip publishes: a damaged copy, and
    // claims someone rewrote (another task's id, the same issuer).
    let damaged = {
        let (head, signature) = task.rsplit_once('.').unwrap();
        let mut signature = signature.as_bytes().to_vec();
        signature[10] = if signature[10] == b'A' { b'B' } else { b'A' };
        format!("{head}.{}", String::from_utf8(signature).unwrap())
    };
    let rewritten = {
        let mut parts: Vec<String> = task.split('.').map(str::to_owned).collect();
        let mut c = claims.clone();
        c["txn"] = "another-task".into();
        use base64::Engine as _;
        parts[1] = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .encode(serde_json::to_vec(&c).unwrap());
        parts.join(".")
    };
    // A key no longer published: a token of it whose deadline passed has no
    // task left to end (keys are published until every token they signed
    // expired); one whose deadline has not is no token of this scrip.
    let of_gone_key = |exp: u64| {
        use base64::Engine as _;
        let b64 = base64::engine::general_purpose::URL_SAFE_NO_PAD;
        let mut parts: Vec<String> = task.split('.').map(str::to_owned).collect();
        let mut header: Value = serde_json::from_slice(&b64.decode(&parts[0]).unwrap()).unwrap();
        header["kid"] = "retired-long-ago".into();
        parts[0] = b64.encode(serde_json::to_vec(&header).unwrap());
        let mut c = claims.clone();
        c["exp"] = exp.into();
        parts[1] = b64.encode(serde_json::to_vec(&c).unwrap());
        parts.join(".")
    };
    let out = server
        .scrip()
        .args(["task", "end"])
        .env("SCRIP_TASK_TOKEN", of_gone_key(1_000_000))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(
        text(&out.stderr).contains(&format!("task {id} had already ended at its deadline")),
        "{}",
        text(&out.stderr)
    );
    let live_of_gone_key = of_gone_key(4_000_000_000);
    for (token, says) in [
        (
            live_of_gone_key.as_str(),
            "does not verify with the keys of the scrip at this address",
        ),
        (
            damaged.as_str(),
            "does not verify with the keys of the scrip at this address (token signature is invalid)",
        ),
        (
            rewritten.as_str(),
            "does not verify with the keys of the scrip at this address",
        ),
        (
            "not-a-token",
            "not a task token (its typ is `none: it is not a JWT`)",
        ),
        (access.as_str(), "not a task token (its typ is `at+jwt`)"),
        (
            foreign.as_str(),
            "issued by `https://another-scrip.example`, not by the scrip at this address",
        ),
    ] {
        let out = server
            .scrip()
            .args(["task", "end"])
            .env("SCRIP_TASK_TOKEN", token)
            .output()
            .unwrap();
        assert_refused(&out, 1, &[says, "token from SCRIP_TASK_TOKEN"]);
    }
    assert_eq!(server.introspect(&task)["active"], true);
    assert_eq!(server.introspect(&access)["active"], true);

    // Ended from SCRIP_TASK_TOKEN: revoked, and no longer listed.
    let out = server
        .scrip()
        .args(["task", "end"])
        .env("SCRIP_TASK_TOKEN", &task)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stderr).trim(),
        format!(
            "task {id} is ended, with every task and token under it, if it was not already (token from SCRIP_TASK_TOKEN)"
        )
    );
    assert_eq!(
        server.introspect(&task),
        serde_json::json!({"active": false})
    );
    assert_eq!(list(true).trim(), "");

    // From standard input, with --json.
    let start_json = || {
        let out = server
            .scrip()
            .args([
                "task",
                "start",
                "--json",
                "--env",
                "dev",
                "--grant",
                "github:read",
                "--purpose",
                "p",
            ])
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", text(&out.stderr));
        serde_json::from_slice::<Value>(&out.stdout).unwrap()
    };
    // `scrip task end` with `token` piped in, and SCRIP_TASK_TOKEN if given.
    let end_piped = |token: &str, variable: Option<&str>| {
        let mut cmd = server.scrip();
        cmd.args(["task", "end"]);
        if let Some(v) = variable {
            cmd.env("SCRIP_TASK_TOKEN", v);
        }
        let mut end = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        end.stdin
            .take()
            .unwrap()
            .write_all(token.as_bytes())
            .unwrap();
        end.wait_with_output().unwrap()
    };
    let started = start_json();
    let task = started["task_token"].as_str().unwrap().to_owned();
    assert_eq!(started["scope"], "github:read");
    // Redirected in while SCRIP_TASK_TOKEN holds another task's token (as
    // it always does under `scrip run`): nothing is ended. The same token
    // in both is no ambiguity.
    let file = server.dir.path().join("sub-task.txt");
    std::fs::write(&file, format!("{task}\n")).unwrap();
    let out = server
        .scrip()
        .args(["task", "end"])
        .env("SCRIP_TASK_TOKEN", &access)
        .stdin(std::fs::File::open(&file).unwrap())
        .output()
        .unwrap();
    assert_refused(&out, 1, &["both SCRIP_TASK_TOKEN and standard input"]);
    assert_eq!(server.introspect(&task)["active"], true);
    let out = end_piped(&task, Some(&task));
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(server.introspect(&task)["active"], false);
    let task = start_json()["task_token"].as_str().unwrap().to_owned();
    let out = end_piped(&task, None);
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(server.introspect(&task)["active"], false);
}

/// Spawns `cmd` (its output discarded, its errors kept) and waits up to
/// 30 s for the command it runs to create `marker`.
fn spawn_until(mut cmd: Command, marker: &Path) -> Child {
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let start = Instant::now();
    while !marker.exists() {
        assert!(
            start.elapsed() < Duration::from_secs(30),
            "the command did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    child
}
