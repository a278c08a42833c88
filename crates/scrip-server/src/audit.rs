//! Reading the audit trail: verification of its hash chains and signed
//! checkpoints, and the queries behind `scrip audit`.

use scrip_store::{Checkpoint, Report, Store, StoreError, Verifier};

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
/// [`Verifier::require_signed`]).
///
/// # Errors
/// [`StoreError`] when the store cannot be read.
pub async fn verify(
    store: &dyn Store,
    checkpoint_jwks: &[serde_json::Value],
    now_ms: u64,
    grace_ms: u64,
) -> Result<Report, StoreError> {
    let checkpoints = store.latest_checkpoints().await?;
    let links = store.chain_links().await?;
    // The trail as it stood just after the signatures were read: records
    // committed while this runs (however long it takes on a large store) are
    // left to the next verification, rather than read unsigned, or past
    // `now_ms` and its grace. (Read after the signatures, so that none names
    // a record past it; those committed in between count as recent.)
    let until = store.latest_audit_seq().await?;
    let mut verifier = Verifier::new(&checkpoints, &links);
    verifier.require_signed(now_ms, grace_ms);
    let mut after = 0;
    while after < until {
        let rows = store.audit_rows(after, PAGE).await?;
        let Some(last) = rows.last() else {
            break;
        };
        after = last.seq;
        for r in rows.iter().filter(|r| r.seq <= until) {
            verifier.push(r);
        }
    }
    Ok(verifier.finish(&checkpoints, |c: &Checkpoint| {
        let message = Checkpoint::message(&c.chain_id, c.chain_seq, &c.hash, c.at_ms);
        checkpoint_jwks
            .iter()
            .any(|jwk| scrip_jose::verify_detached(jwk, &message, &c.signature))
    }))
}
