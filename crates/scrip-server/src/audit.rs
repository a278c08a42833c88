//! Reading the audit trail: verification of its hash chains and signed
//! checkpoints, and the queries behind `scrip audit`.

use scrip_store::{Checkpoint, Problem, Report, Store, StoreError};

/// Records read per page when streaming the trail.
const PAGE: u32 = 10_000;

/// How long after it was written a record may still wait for its writer's
/// signature: two `audit_checkpoint_interval`s and a minute, in
/// milliseconds. scrip signs each commit's records as it writes them; the
/// grace is for records committed while a verification reads, and for
/// writers of earlier scrip versions, which signed every interval.
#[must_use]
pub fn signature_grace_ms(config: &scrip_config::Config) -> u64 {
    config
        .audit_checkpoint_interval
        .saturating_mul(2)
        .saturating_add(60)
        .saturating_mul(1000)
}

/// Verifies every chain and checkpoint in `store`, streaming the records.
/// `checkpoint_jwks` are the public JWKs of the audit checkpoint keys (one
/// on the embedded store; every replica's on a shared one): a checkpoint
/// counts when one of them verifies its signature. Every record written
/// more than `grace_ms` before `now_ms` must be covered by one (see
/// [`scrip_store::Verifier::require_signed`]).
///
/// # Errors
/// [`StoreError`] when the store cannot be read.
pub async fn verify(
    store: &dyn Store,
    checkpoint_jwks: &[serde_json::Value],
    now_ms: u64,
    grace_ms: u64,
) -> Result<Report, StoreError> {
    scrip_store::verify_store(store, Some((now_ms, grace_ms)), PAGE, |c: &Checkpoint| {
        let message = Checkpoint::message(&c.chain_id, c.chain_seq, &c.hash, c.at_ms);
        checkpoint_jwks
            .iter()
            .any(|jwk| scrip_jose::verify_detached(jwk, &message, &c.signature))
    })
    .await
}

/// [`verify`], and where it found recent records no signature covers,
/// [`verify`] again, for `scrip audit verify --strict`. This scrip signs
/// its chain's head in the very commit that writes the records, and both
/// stores commit in the order of the records' sequence numbers, so every
/// record at or below the newest number the first reading read was
/// committed, its signed head with it, before the second reading read the
/// signatures: the second reading finds it covered. One it does not was
/// written by someone who could not sign it (a time claimed within the
/// grace does not make it recent; nor does putting it there, at such a
/// number, between the two readings), by a scrip older than this one, which signed from time
/// to time, or by a command that warned it could not sign: a problem
/// whichever. Records committed since the first reading count as recent,
/// as ever. The report is the second reading's; `now_ms` gives the time
/// of each.
///
/// # Errors
/// [`StoreError`] when the store cannot be read.
pub async fn verify_twice(
    store: &dyn Store,
    checkpoint_jwks: &[serde_json::Value],
    now_ms: impl Fn() -> u64,
    grace_ms: u64,
) -> Result<Report, StoreError> {
    let first = verify(store, checkpoint_jwks, now_ms(), grace_ms).await?;
    if first.recent.is_empty() {
        return Ok(first);
    }
    let mut second = verify(store, checkpoint_jwks, now_ms(), grace_ms).await?;
    for run in second.recent.clone() {
        // The run's records come in sequence order: its first is the
        // earliest committed.
        if run.first_seq.is_none_or(|seq| seq > first.read_to) {
            continue;
        }
        second.add(Problem {
            seq: run.first_seq,
            chain_id: run.chain_id,
            chain_seq: run.from,
            what: format!(
                "records #{} to #{} are covered by no signature at a second reading, though committed before the first ended, and their writer signs as it commits: written by someone else (or by a scrip older than this one, which signed from time to time, or by a command that warned it could not sign)",
                run.from, run.to
            ),
        });
    }
    Ok(second)
}
