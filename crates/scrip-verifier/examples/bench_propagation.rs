//! Revocation propagation: from ending a task at scrip to a [`Verifier`]
//! that follows scrip's revocation feed refusing the task's access token.
//!
//! ```sh
//! cargo build --release -p scrip-verifier --examples
//! target/release/examples/bench_propagation [TASKS] [POLL_MICROS]
//! ```
//!
//! A real scrip (in process, ES256, SQLite with durable commits in a
//! temporary directory) and a verifier with the default feed settings
//! (long-poll `wait` 20 s) share one multi-thread Tokio runtime on this host.
//! For each of `TASKS` tasks (default 1,000): start a task, get a `github`
//! access token, check that the verifier accepts it, then send `POST /revoke`
//! with the task token and, from the moment the request is sent, call
//! `Verifier::verify` on the main thread every `POLL_MICROS` (default 200 µs,
//! `std::thread::sleep`) until it answers `Revoked` or 5 s pass. The interval
//! from sending the revocation to the first refusal is the propagation time;
//! the revocation's own round trip (it commits durably) is reported beside
//! it. Percentiles are nearest-rank.
//!
//! No figure is asserted: this prints, it does not judge.

#![expect(
    clippy::print_stdout,
    reason = "a benchmark's output is its report, printed to stdout"
)]

use std::sync::Arc;
use std::time::{Duration, Instant};

use scrip_verifier::{StaticIdentity, Verifier, VerifierConfig, VerifyError};

mod harness;

use harness::{Error, Scrip};

const TIMEOUT: Duration = Duration::from_secs(5);

/// The nearest-rank percentile `p` (0..=100) of sorted `v`.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted
        .get(rank.saturating_sub(1).min(sorted.len().saturating_sub(1)))
        .copied()
        .unwrap_or_default()
}

fn ms(d: Duration) -> String {
    format!("{:.2} ms", d.as_secs_f64() * 1e3)
}

fn summary(name: &str, mut v: Vec<Duration>) {
    v.sort();
    let mean = v.iter().sum::<Duration>() / u32::try_from(v.len().max(1)).unwrap_or(u32::MAX);
    println!(
        "{name}: n={} min {} p50 {} p90 {} p99 {} max {} mean {}",
        v.len(),
        ms(v.first().copied().unwrap_or_default()),
        ms(percentile(&v, 50.0)),
        ms(percentile(&v, 90.0)),
        ms(percentile(&v, 99.0)),
        ms(v.last().copied().unwrap_or_default()),
        ms(mean),
    );
}

fn run() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let tasks: usize = args.next().map_or(Ok(1000), |s| s.parse())?;
    let poll = Duration::from_micros(args.next().map_or(Ok(200), |s| s.parse())?);

    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (scrip, verifier) = rt.block_on(async {
        let scrip = Scrip::start().await?;
        let identity = scrip.kubernetes("resource-servers", "github-api")?;
        let verifier = Verifier::discover(VerifierConfig::new(
            &scrip.url,
            "github",
            Arc::new(StaticIdentity::new(identity)),
        ))
        .await?;
        Ok::<_, Error>((scrip, verifier))
    })?;
    let scrip = Arc::new(scrip);

    let mut propagation = Vec::with_capacity(tasks);
    let mut revoke_rtt = Vec::with_capacity(tasks);
    let mut timeouts = 0usize;
    let mut other_refusals = 0usize;
    let started = Instant::now();
    for _ in 0..tasks {
        let (task, access) = rt.block_on(scrip.github_token("read"))?;
        rt.block_on(verifier.verify(&access))?;

        let s = scrip.clone();
        let t0 = Instant::now();
        let revoke = rt.spawn(async move {
            s.revoke(&task).await?;
            Ok::<_, Error>(t0.elapsed())
        });
        loop {
            match rt.block_on(verifier.verify(&access)) {
                Ok(_) => {}
                Err(VerifyError::Revoked) => {
                    propagation.push(t0.elapsed());
                    break;
                }
                Err(_) => {
                    other_refusals += 1;
                    propagation.push(t0.elapsed());
                    break;
                }
            }
            if t0.elapsed() > TIMEOUT {
                timeouts += 1;
                break;
            }
            std::thread::sleep(poll);
        }
        revoke_rtt.push(rt.block_on(revoke)??);
    }
    let wall = started.elapsed();
    println!(
        "{tasks} tasks in {:.1} s; verify polled every {} µs; timeout {} s",
        wall.as_secs_f64(),
        poll.as_micros(),
        TIMEOUT.as_secs()
    );
    summary("task revoked -> verifier refuses", propagation);
    summary("POST /revoke round trip        ", revoke_rtt);
    println!("timeouts: {timeouts}; refusals other than `revoked`: {other_refusals}");

    drop(verifier);
    if let Ok(scrip) = Arc::try_unwrap(scrip) {
        rt.block_on(scrip.stop());
    }
    Ok(())
}

fn main() -> std::process::ExitCode {
    match run() {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln_error(&e.to_string());
            std::process::ExitCode::FAILURE
        }
    }
}

#[expect(clippy::print_stderr, reason = "the benchmark reports its failure")]
fn eprintln_error(e: &str) {
    eprintln!("bench_propagation: {e}");
}
