//! What the proxy adds: one run measures the same nginx endpoint called
//! directly (with its static key), through nginx as a reverse proxy (which
//! adds the key), and through scrip's proxy (token verified, Cedar, audit
//! record durable before forwarding, key injected, response redacted), with
//! `wrk` as the load generator: one connection for latency, 16 for
//! throughput. Figures go to BENCHMARKS.md.
//!
//! ```sh
//! cargo run --release -p scrip-server --example bench_proxy            # store on disk (/tmp)
//! BENCH_DATA_DIR=/dev/shm cargo run --release -p scrip-server --example bench_proxy
//! ```

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    clippy::print_stdout,
    reason = "a benchmark program"
)]

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "../../scrip-proxy/tests/common/nginx.rs"]
mod nginx;

use std::process::Command;

use common::*;
use scrip_config::{Inject, SecretSpec, Tool, Upstream};
use scrip_store::{SecretRecord, SqliteStore, Store as _, Write};
use scrip_token::{ActionName, ToolName};

const KEY: &str = "bench-key-5f3c9a7e1b2d4c6e";

struct Run {
    name: &'static str,
    connections: u32,
    p50_us: f64,
    p99_us: f64,
    rps: f64,
}

fn micros(s: &str) -> f64 {
    let s = s.trim();
    let (n, unit) = s.split_at(s.find(|c: char| c.is_ascii_alphabetic()).unwrap());
    let n: f64 = n.parse().unwrap();
    match unit {
        "us" => n,
        "ms" => n * 1000.0,
        "s" => n * 1_000_000.0,
        other => panic!("unit {other}"),
    }
}

fn wrk(name: &'static str, url: &str, header: &str, connections: u32, secs: u32) -> Run {
    let out = Command::new("wrk")
        .args([
            "-t1",
            &format!("-c{connections}"),
            &format!("-d{secs}s"),
            "--latency",
            "-H",
            header,
            url,
        ])
        .output()
        .expect("wrk (apt-get install wrk)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let field = |prefix: &str| {
        text.lines()
            .find_map(|l| l.trim().strip_prefix(prefix).map(str::to_owned))
            .unwrap_or_else(|| panic!("no `{prefix}` in wrk output:\n{text}"))
    };
    assert!(!text.contains("Non-2xx"), "{name}: errors:\n{text}");
    Run {
        name,
        connections,
        p50_us: micros(&field("50%")),
        p99_us: micros(&field("99%")),
        rps: field("Requests/sec:").trim().parse().unwrap(),
    }
}

fn action(a: &str) -> ActionName {
    ActionName::parse(a).unwrap()
}

#[tokio::main]
async fn main() {
    let secs: u32 = std::env::var("BENCH_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let nginx = nginx::Nginx::start(&[("read", KEY)], KEY);
    let url = nginx.url();
    let data_dir = std::env::var("BENCH_DATA_DIR").ok();
    let holder = data_dir.map(|d| tempfile::tempdir_in(d).unwrap());
    let data = holder.as_ref().map(|h| h.path().join("data"));
    let server = TestServer::start_with(Options {
        edit: Some(Box::new(move |c| {
            c.tools.push(Tool {
                name: ToolName::parse("legacy").unwrap(),
                resource: "https://legacy.example".into(),
                actions: vec![action("read")],
                labels: Default::default(),
                introspectors: Vec::new(),
            });
            c.upstreams.push(Upstream {
                name: ToolName::parse("legacy").unwrap(),
                url,
                inject: Inject::default(),
                routes: Vec::new(),
                secrets: [(
                    action("read"),
                    SecretSpec {
                        max_age: 86_400,
                        grace: 60,
                        mint_command: Vec::new(),
                    },
                )]
                .into_iter()
                .collect(),
                connect_timeout: 2,
                read_timeout: 10,
            });
            if let Some(d) = data {
                c.data_dir = d;
            }
        })),
        ..Options::default()
    })
    .await;
    let data = holder
        .as_ref()
        .map_or_else(|| server.dir.path().join("data"), |h| h.path().join("data"));
    let config = scrip_config::Config {
        data_dir: data.clone(),
        ..scrip_config::Config::default()
    };
    let kek = scrip_proxy::Kek::new(scrip_server::keys::load_kek(&config, false).unwrap());
    let value = scrip_proxy::SecretValue::from_input(KEY.as_bytes().to_vec()).unwrap();
    let store = SqliteStore::open(&data.join("scrip.db")).await.unwrap();
    store
        .commit(vec![Write::PutSecret {
            secret: Box::new(SecretRecord {
                name: "legacy".into(),
                action: "read".into(),
                version: 1,
                sealed: kek.seal("legacy", "read", 1, &value).unwrap(),
                created_at: now(),
                retired_at: None,
            }),
            purge_retired_before: 0,
        }])
        .await
        .unwrap();
    let identity = server.k8s.kubernetes("agents", "bench");
    let task = server
        .start_task(&identity, "legacy:read", "dev", "benchmark")
        .await;
    let task = task["access_token"].as_str().unwrap().to_owned();
    let r = server.access_token(&task, "legacy", Some("read")).await;
    let token = r.body["access_token"].as_str().unwrap().to_owned();

    let direct = format!("{}/bench", nginx.url());
    let via_nginx = format!("http://127.0.0.1:{}/bench", nginx.proxy_port);
    let via_scrip = format!("{}/proxy/legacy/bench", server.url);
    let key_header = format!("Authorization: Bearer {KEY}");
    let token_header = format!("Authorization: Bearer {token}");
    // Warm up the connection pools and caches.
    wrk("warm-up", &via_scrip, &token_header, 4, 1);

    let mut runs = Vec::new();
    for c in [1, 16] {
        runs.push(wrk("direct", &direct, &key_header, c, secs));
        runs.push(wrk("nginx proxy", &via_nginx, "X-None: 1", c, secs));
        runs.push(wrk("scrip proxy", &via_scrip, &token_header, c, secs));
    }
    let store_on = holder
        .as_ref()
        .map_or("/tmp (disk)".to_owned(), |h| h.path().display().to_string());
    println!("store: {store_on}; {secs} s per run; wrk -t1");
    println!(
        "{:<12} {:>5} {:>10} {:>10} {:>10} {:>12}",
        "target", "conns", "p50 µs", "p99 µs", "req/s", "added p50 µs"
    );
    for r in &runs {
        let base = runs
            .iter()
            .find(|b| b.name == "direct" && b.connections == r.connections)
            .map_or(0.0, |b| b.p50_us);
        println!(
            "{:<12} {:>5} {:>10.0} {:>10.0} {:>10.0} {:>12.0}",
            r.name,
            r.connections,
            r.p50_us,
            r.p99_us,
            r.rps,
            r.p50_us - base
        );
    }
    let _ = std::fs::remove_file(nginx.root().join("access.log"));
    server.stop().await;
}
