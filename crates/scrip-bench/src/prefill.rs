//! A history in the store before the server starts: ended tasks and their
//! audit records, written through `scrip-store` as the server writes them
//! (chained, group-committed), so that a run can compare throughput on a
//! full store with the same run on an empty one.
//!
//! Each task is a past one, ended at its expiry (so the server's sweep has
//! nothing to do and no revocation is live), with `task.started`, pairs of
//! `token.decision` and `token.issued`, and `task.expired` records, spread
//! over 200 agents and 5 tools.

use std::path::Path;
use std::time::Instant;

use scrip_store::{AuditEvent, TaskRecord, Write};
use scrip_token::{IdentityKind, WorkloadIdentity};

use crate::Result;

/// Tasks per commit; commits in flight at once (the writer groups them).
const TASKS_PER_COMMIT: u64 = 50;
const IN_FLIGHT: usize = 8;
const TOOLS: [&str; 5] = ["github", "jira", "slack", "s3", "legacy"];

/// Fills the SQLite store at `path` (or the PostgreSQL database at
/// `database_url`) with `tasks` ended tasks and about `audit` records.
/// Returns the records written.
///
/// # Errors
/// When the store cannot be opened or a commit fails.
pub async fn fill(
    database_url: Option<&str>,
    path: &Path,
    tasks: u64,
    audit: u64,
    mut progress: impl FnMut(u64, u64),
) -> Result<u64> {
    let store = scrip_store::open(database_url, path).await?;
    // Records per task, at least the start and the end.
    let per_task = audit.checked_div(tasks).unwrap_or(0).max(2);
    let now = unix_now();
    let started = Instant::now();
    let mut written = 0;
    let mut reported = 0;
    let mut next = 0;
    let mut running = tokio::task::JoinSet::new();
    while next < tasks || !running.is_empty() {
        while next < tasks && running.len() < IN_FLIGHT {
            let end = (next + TASKS_PER_COMMIT).min(tasks);
            let writes = batch(next..end, per_task, now, tasks)?;
            let store = store.clone();
            running.spawn(async move {
                let n = writes.len();
                store.commit(writes).await.map(|()| n)
            });
            next = end;
        }
        if let Some(done) = running.join_next().await {
            let n = done.map_err(|e| e.to_string())??;
            written += u64::try_from(n).unwrap_or(0);
            if written >= reported + 1_000_000 {
                reported = written;
                progress(written, started.elapsed().as_secs());
            }
        }
    }
    Ok(written)
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The writes of tasks `range`: each task inserted and ended, and its
/// records. Tasks are spread over the last `total` seconds before `now`.
fn batch(range: std::ops::Range<u64>, per_task: u64, now: u64, total: u64) -> Result<Vec<Write>> {
    let mut writes = Vec::new();
    for i in range {
        let agent = format!("system:serviceaccount:agents:agent-{}", i % 200);
        let created = now.saturating_sub(total + 3600).saturating_add(i);
        let expires = created + 600;
        let id = scrip_jose::random_id()?;
        let task = TaskRecord {
            id: id.clone(),
            parent: None,
            agent: WorkloadIdentity {
                issuer: crate::idp::K8S_ISSUER.to_owned(),
                subject: agent.clone(),
                kind: IdentityKind::Kubernetes,
                attributes: [
                    ("namespace".to_owned(), "agents".to_owned()),
                    ("service_account".to_owned(), format!("agent-{}", i % 200)),
                ]
                .into(),
                claims: Default::default(),
            },
            actor: None,
            may_act: Vec::new(),
            grants: "github:read github:write jira:read".to_owned(),
            held: String::new(),
            purpose: crate::PURPOSE.to_owned(),
            environment: "dev".to_owned(),
            depth: 0,
            token_jti: scrip_jose::random_id()?,
            created_at: created,
            expires_at: expires,
            ended_at: None,
            end_reason: None,
        };
        writes.push(Write::InsertTask(Box::new(task)));
        let record = |event: &str, at: u64| AuditEvent {
            at_ms: at * 1000,
            event: event.to_owned(),
            agent_iss: Some(crate::idp::K8S_ISSUER.to_owned()),
            agent_sub: Some(agent.clone()),
            task_id: Some(id.clone()),
            environment: Some("dev".to_owned()),
            purpose: Some(crate::PURPOSE.to_owned()),
            client: Some("127.0.0.1:40000".to_owned()),
            replica: "prefill".to_owned(),
            ..AuditEvent::default()
        };
        let mut start = record("task.started", created);
        start.decision = Some("allow".into());
        start.actions = Some("github:read github:write jira:read".into());
        start.policies = vec!["agents-read-github".into()];
        writes.push(Write::Audit(Box::new(start)));
        // Pairs of decision and issue, then the end.
        for k in 0..per_task.saturating_sub(2) {
            let tool = TOOLS
                .get(usize::try_from((i + k) % 5).unwrap_or(0))
                .copied()
                .unwrap_or("github");
            let mut a = record(
                if k % 2 == 0 {
                    "token.decision"
                } else {
                    "token.issued"
                },
                created + 1 + k,
            );
            a.decision = Some("allow".into());
            a.tool = Some(tool.to_owned());
            a.actions = Some("read".into());
            a.policies = vec!["agents-read-github".into()];
            a.reason = Some("allowed by agents-read-github".into());
            if k % 2 == 1 {
                a.jti = Some(scrip_jose::random_id()?);
            }
            writes.push(Write::Audit(Box::new(a)));
        }
        let end = record("task.expired", expires);
        writes.push(Write::EndTask {
            id,
            at: expires,
            reason: "expired".into(),
            // A history, not a live store: no feed events for old tasks.
            grace: 0,
        });
        writes.push(Write::Audit(Box::new(end)));
    }
    Ok(writes)
}

/// Waits until this process holds no descriptor of the SQLite store at
/// `path` (its database, WAL and shared-memory files): the prefill's
/// connections close on threads of their own once its store is dropped.
/// Until they have, neither may another descriptor of the database be
/// opened and closed here (closing any descriptor of a file drops every
/// POSIX lock the process holds on it, the connections' included), nor
/// may the server open the store (a connection closing unlocked would
/// take the WAL from under it). Returns how long it waited.
///
/// # Errors
/// When descriptors are still open after `patience`.
pub async fn until_closed(
    path: &Path,
    patience: std::time::Duration,
) -> Result<std::time::Duration> {
    let real = std::fs::canonicalize(path)?;
    let started = Instant::now();
    loop {
        let mut open = 0;
        for entry in std::fs::read_dir("/proc/self/fd")? {
            let Ok(target) = std::fs::read_link(entry?.path()) else {
                continue;
            };
            if target
                .as_os_str()
                .as_encoded_bytes()
                .starts_with(real.as_os_str().as_encoded_bytes())
            {
                open += 1;
            }
        }
        if open == 0 {
            return Ok(started.elapsed());
        }
        if started.elapsed() >= patience {
            return Err(format!(
                "the prefill still holds {open} descriptors of `{}` after {} s",
                real.display(),
                patience.as_secs()
            )
            .into());
        }
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
}
