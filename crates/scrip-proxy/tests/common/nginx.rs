//! A real upstream that demands a static key: Debian's nginx, installed if
//! missing, configured in a temporary directory, run in the foreground as a
//! child process on ephemeral ports and killed on drop. Shared by the proxy
//! tests (`crates/scrip-server/tests/proxy.rs`, `crates/scrip-cli/tests/
//! proxy.rs`) and the benchmark, which include it with `#[path]`.
//!
//! The upstream (`port`) accepts `Authorization: Bearer <key>` for the keys
//! it is given and answers 401 otherwise; its access log names which key
//! (`read`, `read2`, `write`, ...) each request carried. A second server
//! (`proxy_port`) is nginx as a plain reverse proxy in front of it, adding
//! the read key, for the benchmark.

#![allow(dead_code, reason = "each user takes a different part")]

use std::fs;
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A running nginx.
pub struct Nginx {
    pub port: u16,
    pub proxy_port: u16,
    pub dir: tempfile::TempDir,
    child: Child,
}

/// Installs Debian's nginx when it is not there (CI machines are fresh).
/// Test processes run in parallel: one installs while the others wait on a
/// file lock, and apt itself waits for its own lock.
pub fn ensure_nginx() -> PathBuf {
    let path = PathBuf::from("/usr/sbin/nginx");
    if path.exists() {
        return path;
    }
    // Never truncated, and never through a symbolic link: another user may
    // have made the name in the shared directory (the tests may run as
    // root).
    let lock = {
        use std::os::unix::fs::OpenOptionsExt as _;
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .custom_flags(i32::try_from(rustix::fs::OFlags::NOFOLLOW.bits()).expect("a flag"))
            .open(std::env::temp_dir().join("scrip-test-nginx-install.lock"))
            .expect("install lock file")
    };
    lock.lock().expect("install lock");
    if path.exists() {
        return path;
    }
    let apt = |args: &[&str]| {
        Command::new("apt-get")
            .args(["-o", "DPkg::Lock::Timeout=300"])
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !apt(&["install", "-y", "-q", "nginx"]) {
        apt(&["update", "-q"]);
        assert!(
            apt(&["install", "-y", "-q", "nginx"]),
            "cannot install nginx with apt-get"
        );
    }
    assert!(path.exists(), "nginx installed but {path:?} is missing");
    path
}

impl Nginx {
    /// Starts nginx accepting `keys` (`(label, key)`); `read_key` is what
    /// the reverse-proxy server adds.
    pub fn start(keys: &[(&str, &str)], read_key: &str) -> Self {
        let nginx = ensure_nginx();
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        for sub in ["www/upload", "tmp"] {
            fs::create_dir_all(root.join(sub)).unwrap();
        }
        let port = scrip_testkit::free_port();
        let proxy_port = scrip_testkit::free_port();
        let map: String = keys
            .iter()
            .map(|(label, key)| format!("        \"Bearer {key}\" {label};\n"))
            .collect();
        let r = root.display();
        let conf = format!(
            r#"daemon off;
master_process off;
worker_processes 1;
pid {r}/nginx.pid;
error_log {r}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    map $http_authorization $key {{
        default none;
{map}    }}
    log_format keys '$request_method $uri $key $status $request_length $bytes_sent';
    access_log {r}/access.log keys;
    client_body_temp_path {r}/tmp/body;
    proxy_temp_path {r}/tmp/proxy;
    fastcgi_temp_path {r}/tmp/fastcgi;
    uwsgi_temp_path {r}/tmp/uwsgi;
    scgi_temp_path {r}/tmp/scgi;
    client_max_body_size 0;
    keepalive_requests 1000000;
    default_type text/plain;
    server {{
        listen 127.0.0.1:{port};
        root {r}/www;
        location = /health {{ access_log off; return 200 "ok\n"; }}
        location / {{
            if ($key = none) {{ return 401 "no valid key\n"; }}
            return 200 "ok $key $request_method $uri\n";
        }}
        location = /echo-header {{
            if ($key = none) {{ return 401; }}
            add_header X-Echo $http_authorization;
            add_header X-Echo-Query $args;
            return 200 "echo\n";
        }}
        location = /two-encodings {{
            add_header Content-Encoding identity;
            add_header Content-Encoding gzip;
            return 200 "labelled gzip on a second line\n";
        }}
        location = /utf16 {{
            if ($key = none) {{ return 401; }}
            default_type "text/plain; charset=UTF-16LE";
            return 200 "labelled UTF-16\n";
        }}
        location = /partial {{
            if ($key = none) {{ return 401; }}
            return 206 "a part nobody asked for\n";
        }}
        location = /echo-body {{
            if ($key = none) {{ return 401; }}
            return 200 "you sent: $http_authorization and ?$args\n";
        }}
        location = /headers {{
            if ($key = none) {{ return 401; }}
            return 200 "connection=[$http_connection] x-private=[$http_x_private] te=[$http_te] upgrade=[$http_upgrade] xff=[$http_x_forwarded_for] xfh=[$http_x_forwarded_host] forwarded=[$http_forwarded] cookie=[$http_cookie] proxy-authorization=[$http_proxy_authorization] accept-encoding=[$http_accept_encoding] accept-charset=[$http_accept_charset] client-ip=[$http_client_ip] true-client-ip=[$http_true_client_ip] envoy=[$http_x_envoy_retry_on]\n";
        }}
        location = /cacheable {{
            if ($key = none) {{ return 401; }}
            add_header Cache-Control "public, max-age=300";
            add_header X-Accel-Redirect /internal/keys;
            add_header CDN-Cache-Control "public, max-age=600";
            add_header Surrogate-Control "max-age=600";
            return 200 "for everyone, says the upstream\n";
        }}
        location /files/ {{
            if ($key = none) {{ return 401; }}
        }}
        location /trickle/ {{
            if ($key = none) {{ return 401; }}
            alias {r}/www/files/;
            limit_rate 64k;
        }}
        location /upload/ {{
            if ($key = none) {{ return 401; }}
            dav_methods PUT;
            create_full_put_path on;
            client_body_buffer_size 1m;
        }}
    }}
    upstream backend {{
        server 127.0.0.1:{port};
        keepalive 64;
    }}
    server {{
        listen 127.0.0.1:{proxy_port};
        access_log off;
        location / {{
            proxy_pass http://backend;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header Authorization "Bearer {read_key}";
        }}
    }}
}}
"#
        );
        fs::write(root.join("nginx.conf"), conf).unwrap();
        let child = Command::new(nginx)
            .arg("-p")
            .arg(root)
            .arg("-c")
            .arg(root.join("nginx.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                fs::File::create(root.join("stderr.log")).unwrap(),
            ))
            .spawn()
            .unwrap();
        let mut n = Self {
            port,
            proxy_port,
            dir,
            child,
        };
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", port)).is_err()
            || TcpStream::connect(("127.0.0.1", proxy_port)).is_err()
        {
            if let Ok(Some(status)) = n.child.try_wait() {
                panic!(
                    "nginx exited with {status}: {}{}",
                    fs::read_to_string(n.dir.path().join("stderr.log")).unwrap_or_default(),
                    fs::read_to_string(n.dir.path().join("error.log")).unwrap_or_default()
                );
            }
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "nginx did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        n
    }

    /// The upstream's base URL.
    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A file served under `/files/<name>`.
    pub fn put_file(&self, name: &str, bytes: &[u8]) {
        let dir = self.dir.path().join("www/files");
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(name), bytes).unwrap();
    }

    /// A sparse file of `len` zero bytes under `/files/<name>`.
    pub fn put_sparse_file(&self, name: &str, len: u64) {
        let dir = self.dir.path().join("www/files");
        fs::create_dir_all(&dir).unwrap();
        fs::File::create(dir.join(name))
            .unwrap()
            .set_len(len)
            .unwrap();
    }

    /// Where PUT `/upload/<name>` stores the body.
    pub fn uploaded(&self, name: &str) -> PathBuf {
        self.dir.path().join("www/upload").join(name)
    }

    /// The access log lines: `METHOD URI KEY STATUS REQUEST_LENGTH BYTES_SENT`.
    pub fn log(&self) -> Vec<String> {
        fs::read_to_string(self.dir.path().join("access.log"))
            .unwrap_or_default()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
