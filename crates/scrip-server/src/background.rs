//! Work beside the requests: policy reload (on SIGHUP and when a file in
//! `policy_dir` changes) and ending tasks at their deadline.
//!
//! A reload validates the new set (including that every tool action is
//! declared) before swapping it in; an invalid set is rejected, audited and
//! the last good one stays.

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use scrip_policy::PolicyEngine;
use scrip_store::Write;

use crate::state::{AppState, Inner, now};

/// The handles of the background tasks.
#[derive(Debug)]
pub struct Background(Vec<tokio::task::JoinHandle<()>>);

impl Background {
    /// Stops them.
    pub fn abort(&self) {
        for h in &self.0 {
            h.abort();
        }
    }
}

/// Starts the background tasks.
pub fn spawn(state: AppState, hangup: Option<tokio::signal::unix::Signal>) -> Background {
    let reload = tokio::spawn(reload_loop(state.clone(), hangup));
    let sweep = tokio::spawn(sweep_loop(state.clone()));
    let seal = tokio::spawn(checkpoint_loop(state.clone()));
    let keys = tokio::spawn(keys_loop(state));
    Background(vec![reload, sweep, seal, keys])
}

/// Follows the shared key set: re-reads it when the store signals a key
/// change, when a rotation or a switch is due, and every
/// [`crate::keyring::POLL`] in any case, rotating and retiring keys. Nothing to do for file keys.
async fn keys_loop(state: AppState) {
    let st = &state.0;
    if !st.keyring.is_shared() {
        return;
    }
    let mut changes = st.store.changes();
    let mut seen = changes.borrow_and_update().keys;
    loop {
        let at = now();
        let wait = st
            .keyring
            .next_due(at)
            .map_or(crate::keyring::POLL, |due| {
                Duration::from_secs(due.saturating_sub(at))
            })
            .clamp(Duration::from_millis(200), crate::keyring::POLL);
        tokio::select! {
            r = changes.changed() => {
                if r.is_err() {
                    tokio::time::sleep(crate::keyring::POLL).await;
                }
                let now_seen = changes.borrow_and_update().keys;
                if now_seen == seen {
                    continue;
                }
                seen = now_seen;
            }
            () = tokio::time::sleep(wait) => {}
        }
        match st.keyring.sync(st.store.as_ref(), now()).await {
            Ok(created) if !created.keys.is_empty() => {
                for (kid, what) in &created.keys {
                    tracing::info!(%kid, %what, "shared key set changed");
                }
                if let Err(e) = st
                    .store
                    .commit(crate::key_audit(&st.replica, created))
                    .await
                {
                    tracing::warn!(error = %e, "cannot audit a key change");
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the shared keys; keeping the keys in use")
            }
        }
    }
}

/// A fingerprint of the policy directory: names, sizes and modification
/// times of its files.
fn fingerprint(dir: &Path) -> Vec<(String, u64, Option<std::time::SystemTime>)> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<_> = entries
        .filter_map(Result::ok)
        .filter_map(|e| {
            let meta = e.metadata().ok()?;
            Some((
                e.file_name().to_string_lossy().into_owned(),
                meta.len(),
                meta.modified().ok(),
            ))
        })
        .collect();
    out.sort();
    out
}

async fn reload_loop(state: AppState, mut hup: Option<tokio::signal::unix::Signal>) {
    let st = &state.0;
    let dir = st.config.policy_dir.clone();
    let mut last = fingerprint(&dir);
    let interval = st.config.policy_poll_interval;
    loop {
        let by_signal = tokio::select! {
            () = async {
                match hup.as_mut() {
                    Some(h) => { h.recv().await; }
                    None => std::future::pending::<()>().await,
                }
            } => true,
            () = async {
                if interval == 0 {
                    std::future::pending::<()>().await;
                }
                tokio::time::sleep(Duration::from_secs(interval)).await;
            } => false,
        };
        let current = fingerprint(&dir);
        if !by_signal && current == last {
            continue;
        }
        last = current;
        reload(st, if by_signal { "SIGHUP" } else { "file change" }).await;
    }
}

/// Reloads the policies now. Returns whether the new set was accepted.
pub(crate) async fn reload(st: &Inner, cause: &str) -> bool {
    let result = PolicyEngine::load(&st.config.policy_dir).and_then(|p| {
        p.check_tools(&st.config.tools)?;
        Ok(p)
    });
    let (event, reason, accepted) = match result {
        Ok(engine) => {
            let n = engine.len();
            match st.policy.write() {
                Ok(mut slot) => *slot = Arc::new(engine),
                Err(poisoned) => *poisoned.into_inner() = Arc::new(engine),
            }
            tracing::info!(policies = n, cause, "policies reloaded");
            ("policy.reloaded", format!("{n} policies ({cause})"), true)
        }
        Err(e) => {
            tracing::error!(error = %e, cause, "policy reload rejected; keeping the last good policies");
            ("policy.rejected", format!("{e} ({cause})"), false)
        }
    };
    let mut a = st.audit(event);
    a.reason = Some(reason);
    if let Err(e) = st.store.commit(vec![Write::Audit(Box::new(a))]).await {
        tracing::error!(error = %e, "could not record the policy reload");
    }
    accepted
}

async fn sweep_loop(state: AppState) {
    let st = &state.0;
    let mut ticks: u64 = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        ticks += 1;
        let now = now();
        crate::approval::expire(st, now).await;
        match st.store.due_tasks(now, 500).await {
            Ok(due) if !due.is_empty() => {
                let mut writes = Vec::with_capacity(due.len() * 2);
                for task in &due {
                    writes.push(Write::EndTask {
                        id: task.id.clone(),
                        at: now,
                        reason: "expired".into(),
                    });
                    let mut a = st.audit("task.expired");
                    a.agent_iss = Some(task.agent.issuer.clone());
                    a.agent_sub = Some(task.agent.subject.clone());
                    a.task_id = Some(task.id.clone());
                    a.parent_id.clone_from(&task.parent);
                    a.environment = Some(task.environment.clone());
                    a.purpose = Some(task.purpose.clone());
                    writes.push(Write::Audit(Box::new(a)));
                }
                if let Err(e) = st.store.commit(writes).await {
                    tracing::warn!(error = %e, "could not record expired tasks; will retry");
                }
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "could not read due tasks; will retry"),
        }
        if ticks.is_multiple_of(60)
            && let Err(e) = st.store.commit(vec![Write::PurgeRevocations { now }]).await
        {
            tracing::warn!(error = %e, "could not purge expired revocations");
        }
    }
}

async fn checkpoint_loop(state: AppState) {
    let interval = Duration::from_secs(state.0.config.audit_checkpoint_interval);
    loop {
        tokio::time::sleep(interval).await;
        checkpoint(&state.0).await;
    }
}

/// Signs and stores a checkpoint of this writer's chain head, if it moved
/// since the last one.
pub(crate) async fn checkpoint(st: &Inner) {
    let Some(head) = st.store.chain_head() else {
        return;
    };
    let last = st.last_checkpoint.lock().ok().and_then(|l| *l);
    if last == Some(head.chain_seq) {
        return;
    }
    let at_ms = crate::state::now_ms();
    let message =
        scrip_store::Checkpoint::message(&head.chain_id, head.chain_seq, &head.hash, at_ms);
    let signature = match st.keyring.checkpoint_key().sign_detached(&message) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot sign an audit checkpoint");
            return;
        }
    };
    let c = scrip_store::Checkpoint {
        chain_id: head.chain_id,
        chain_seq: head.chain_seq,
        hash: head.hash,
        at_ms,
        signature,
    };
    let seq = c.chain_seq;
    match st.store.commit(vec![Write::Checkpoint(Box::new(c))]).await {
        Ok(()) => {
            if let Ok(mut l) = st.last_checkpoint.lock() {
                *l = Some(seq);
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not store an audit checkpoint; will retry"),
    }
}
