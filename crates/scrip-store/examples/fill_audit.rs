//! Fills a store with synthetic audit records through the real write path
//! (chained, group-committed), to measure `scrip audit` on a large trail.
//!
//! `cargo run --release -p scrip-store --example fill_audit -- <data_dir> <records>`

use std::path::PathBuf;
use std::process::ExitCode;

use scrip_store::{AuditEvent, SqliteStore, Store, Write};

#[tokio::main]
async fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let (Some(dir), Some(n)) = (args.next(), args.next().and_then(|n| n.parse::<u64>().ok()))
    else {
        #[expect(clippy::print_stderr, reason = "usage")]
        {
            eprintln!("usage: fill_audit <data_dir> <records>");
        }
        return ExitCode::from(2);
    };
    let dir = PathBuf::from(dir);
    if std::fs::create_dir_all(&dir).is_err() {
        return ExitCode::FAILURE;
    }
    let Ok(store) = SqliteStore::open(&dir.join("scrip.db")).await else {
        return ExitCode::FAILURE;
    };
    let store = std::sync::Arc::new(store);
    let started = std::time::Instant::now();
    let mut done = 0;
    while done < n {
        // 16 concurrent commits of 250 records: the writer groups them.
        let mut handles = Vec::new();
        for c in 0..16u64 {
            let store = store.clone();
            let base = done + c * 250;
            handles.push(tokio::spawn(async move {
                let writes = (base..base + 250)
                    .map(|i| {
                        Write::Audit(Box::new(AuditEvent {
                            at_ms: 1_790_000_000_000 + i,
                            event: "token.issued".into(),
                            decision: Some("allow".into()),
                            agent_iss: Some("https://kubernetes.default.svc".into()),
                            agent_sub: Some(format!(
                                "system:serviceaccount:agents:agent-{}",
                                i % 1000
                            )),
                            task_id: Some(format!("task-{}", i / 10)),
                            tool: Some(match i % 3 {
                                0 => "github".into(),
                                1 => "jira".into(),
                                _ => "deploy".into(),
                            }),
                            actions: Some("read".into()),
                            environment: Some("dev".into()),
                            purpose: Some("fix JIRA-1".into()),
                            jti: Some(format!("jti-{i}")),
                            replica: "fill".into(),
                            ..AuditEvent::default()
                        }))
                    })
                    .collect();
                store.commit(writes).await
            }));
        }
        for h in handles {
            if !matches!(h.await, Ok(Ok(()))) {
                return ExitCode::FAILURE;
            }
        }
        done += 16 * 250;
    }
    #[expect(clippy::print_stdout, reason = "the example's report")]
    {
        println!("{done} records in {:.1} s", started.elapsed().as_secs_f64());
    }
    ExitCode::SUCCESS
}
