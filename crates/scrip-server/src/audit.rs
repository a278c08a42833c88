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
    unsigned_at_second_reading(first.read_to, &mut second);
    Ok(second)
}

/// Adds to `second` a problem for each of its recent runs that begins at
/// or below `read_to`, the newest sequence number a first reading read:
/// committed before that reading ended, each record of it had its signed
/// head stored with it ([`verify_twice`]).
fn unsigned_at_second_reading(read_to: i64, second: &mut Report) {
    for run in second.recent.clone() {
        // The run's records come in sequence order: its first is the
        // earliest committed.
        if run.first_seq.is_none_or(|seq| seq > read_to) {
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
}

#[cfg(test)]
mod tests {
    use scrip_store::RecentRun;

    use super::*;

    /// A run whose first record the first reading could have read is a
    /// problem at the second; one appended since is recent, as ever.
    #[test]
    fn only_runs_begun_before_the_first_reading_ended_are_problems() {
        let run = |chain: &str, from: u64, first_seq: Option<i64>| RecentRun {
            chain_id: chain.into(),
            from,
            to: from + 1,
            first_seq,
        };
        let mut second = Report {
            recent: vec![
                run("old", 3, Some(9)),
                run("edge", 1, Some(10)),
                run("new", 7, Some(11)),
                run("unknown", 1, None),
            ],
            ..Report::default()
        };
        unsigned_at_second_reading(10, &mut second);
        let named: Vec<(&str, u64, Option<i64>)> = second
            .problems
            .iter()
            .map(|p| (p.chain_id.as_str(), p.chain_seq, p.seq))
            .collect();
        assert_eq!(named, [("old", 3, Some(9)), ("edge", 1, Some(10))]);
        assert!(
            second.problems[0]
                .what
                .starts_with("records #3 to #4 are covered by no signature at a second reading"),
            "{}",
            second.problems[0].what
        );
    }
}
