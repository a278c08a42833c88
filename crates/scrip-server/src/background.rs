//! Work beside the requests: policy reload ([`crate::policies`]), ending
//! tasks at their deadline, audit checkpoints and the shared key set.

use std::time::Duration;

use scrip_jose::SigningKey;
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
    let reload = state.0.policy.spawn_reloader(hangup);
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

async fn sweep_loop(state: AppState) {
    let st = &state.0;
    let mut ticks: u64 = 0;
    loop {
        tokio::time::sleep(Duration::from_secs(1)).await;
        ticks += 1;
        let now = now();
        crate::approval::expire(st, now).await;
        match st.store.due_tasks(now, 500).await {
            Ok(mut due) if !due.is_empty() => {
                // Children first: a parent's ending ends its open
                // descendants, so a child after it in the one commit would
                // find itself ended and refuse the commit, every tick (a
                // child's deadline is its parent's at the latest, so both
                // are often due together).
                due.sort_by_key(|t| std::cmp::Reverse(t.depth));
                let mut writes = Vec::with_capacity(due.len() * 2);
                for task in &due {
                    writes.push(Write::EndOpenTask {
                        id: task.id.clone(),
                        at: now,
                        reason: "expired".into(),
                        // A task that reached its deadline needs no event:
                        // its tokens expire with it. An event each would
                        // send every follower one per expiring task.
                        grace: 0,
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
                match st.store.commit(writes).await {
                    Ok(()) => {}
                    // One of them was ended meanwhile (a revocation, another
                    // replica's sweep): read again at the next tick.
                    Err(scrip_store::StoreError::Conflict(e)) => {
                        tracing::debug!(error = %e, "an expiring task ended meanwhile; sweeping again");
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "could not record expired tasks; will retry");
                    }
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
    let key = st.keyring.checkpoint_key();
    sign_checkpoint(st.store.as_ref(), &key, &st.last_checkpoint).await;
}

/// The head of this process's chain in `store` last signed.
pub type LastCheckpoint = std::sync::Mutex<Option<(String, u64)>>;

/// Signs with `key` and stores a checkpoint of this process's chain head in
/// `store`, unless `last` says it is signed already. Every process that
/// writes audit records signs its head this way (`scrip serve` and
/// `scrip proxy` every `audit_checkpoint_interval` and when they stop, the
/// `scrip secret` commands once): `scrip audit verify` requires a record
/// older than a few intervals to be covered by a signature.
pub async fn sign_checkpoint(
    store: &dyn scrip_store::Store,
    key: &SigningKey,
    last: &LastCheckpoint,
) {
    let Some(head) = store.chain_head() else {
        return;
    };
    // The position alone is not the head: after a store failure the writer
    // goes on with a fresh chain, whose records reach the same positions.
    let done = last.lock().ok().and_then(|l| l.clone());
    if done.as_ref() == Some(&(head.chain_id.clone(), head.chain_seq)) {
        return;
    }
    let at_ms = crate::state::now_ms();
    let message =
        scrip_store::Checkpoint::message(&head.chain_id, head.chain_seq, &head.hash, at_ms);
    let signature = match key.sign_detached(&message) {
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
    let signed = (c.chain_id.clone(), c.chain_seq);
    match store.commit(vec![Write::Checkpoint(Box::new(c))]).await {
        Ok(()) => {
            if let Ok(mut l) = last.lock() {
                *l = Some(signed);
            }
        }
        Err(e) => tracing::warn!(error = %e, "could not store an audit checkpoint; will retry"),
    }
}
