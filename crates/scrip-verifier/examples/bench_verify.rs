//! Verifier throughput against raw ES256 signature verification, one core.
//!
//! ```sh
//! cargo build --release -p scrip-verifier --examples
//! taskset -c 0 target/release/examples/bench_verify [SECONDS_PER_ROUND] [ROUNDS]
//! ```
//!
//! A real scrip (in process, ES256 keys, SQLite in a temporary directory)
//! issues a `github` access token; a [`Verifier`] discovers it and follows its
//! revocation feed. On a current-thread runtime, each stage then runs the same
//! token for `SECONDS_PER_ROUND` (default 3), `ROUNDS` times (default 3),
//! interleaved; the median rate of each stage is reported:
//!
//! - `raw`: aws-lc-rs `UnparsedPublicKey::verify` (ECDSA P-256 SHA-256,
//!   fixed) of the token's signing input, signature decoded once: the floor;
//! - `jsonwebtoken`: `jsonwebtoken::decode` into a JSON map, with the same
//!   `Validation` scrip uses (what any JWT library costs);
//! - `scrip_jose`: `scrip_jose::verify::<AccessClaims>` (header checks, key
//!   lookup, the above, `iat`, claims shape);
//! - `verifier`: `Verifier::verify_for` (the above, scope parsing, the
//!   revocation lookup, the scope check): what a resource server pays.
//!
//! No figure is asserted: this prints, it does not judge.

#![expect(
    clippy::print_stdout,
    reason = "a benchmark's output is its report, printed to stdout"
)]

use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, UnparsedPublicKey};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use scrip_jose::{Expectations, KeySet, TypRule};
use scrip_token::{AccessClaims, ActionName};
use scrip_verifier::{StaticIdentity, Verifier, VerifierConfig};
use serde_json::Value;

mod harness;

use harness::{Error, Scrip};

/// Runs `f` in batches until `secs` have passed; returns calls per second.
async fn rate<F, Fut>(secs: f64, mut f: F) -> Result<f64, Error>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    const BATCH: u64 = 1000;
    let start = Instant::now();
    let mut n = 0u64;
    loop {
        for _ in 0..BATCH {
            if !f().await {
                return Err("a verification failed during the run".into());
            }
        }
        n += BATCH;
        // Let the feed follower and the server run, as in a real server.
        tokio::task::yield_now().await;
        let elapsed = start.elapsed().as_secs_f64();
        if elapsed >= secs {
            return Ok(n as f64 / elapsed);
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// The ES256 public key of the JWKS as an uncompressed point.
fn p256_point(jwks: &[u8], kid: &str) -> Result<Vec<u8>, Error> {
    let doc: Value = serde_json::from_slice(jwks)?;
    let key = doc
        .get("keys")
        .and_then(Value::as_array)
        .and_then(|keys| {
            keys.iter()
                .find(|k| k.get("kid").and_then(Value::as_str) == Some(kid))
        })
        .ok_or("the token's kid is not in the JWKS")?;
    let coord = |name: &str| -> Result<Vec<u8>, Error> {
        let s = key
            .get(name)
            .and_then(Value::as_str)
            .ok_or("EC key lacks a coordinate")?;
        Ok(URL_SAFE_NO_PAD.decode(s)?)
    };
    let mut point = vec![4u8];
    point.extend(coord("x")?);
    point.extend(coord("y")?);
    Ok(point)
}

async fn run() -> Result<(), Error> {
    let mut args = std::env::args().skip(1);
    let secs: f64 = args.next().map_or(Ok(3.0), |s| s.parse())?;
    let rounds: usize = args.next().map_or(Ok(3), |s| s.parse())?;

    let scrip = Scrip::start().await?;
    let identity = scrip.kubernetes("resource-servers", "github-api")?;
    let verifier = Verifier::discover(VerifierConfig::new(
        &scrip.url,
        "github",
        Arc::new(StaticIdentity::new(identity)),
    ))
    .await?;
    let (_task, token) = scrip.github_token("read write").await?;
    let read = ActionName::parse("read")?;
    verifier.verify_for(&token, &read).await?;

    // The floor: the signature alone over the same signing input.
    let (signing_input, sig_b64) = token.rsplit_once('.').ok_or("not a compact JWS")?;
    let signature = URL_SAFE_NO_PAD.decode(sig_b64)?;
    let header: Value = serde_json::from_slice(
        &URL_SAFE_NO_PAD.decode(signing_input.split('.').next().unwrap_or(""))?,
    )?;
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .ok_or("token has no kid")?;
    if header.get("alg").and_then(Value::as_str) != Some("ES256") {
        return Err("the token is not ES256".into());
    }
    let jwks = scrip.jwks().await?;
    let point = p256_point(&jwks, kid)?;
    let public = UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, &point);
    public
        .verify(signing_input.as_bytes(), &signature)
        .map_err(|_| "raw verification failed")?;

    // jsonwebtoken alone, configured as scrip_jose configures it.
    let keys = KeySet::from_jwks_json(&jwks)?;
    let audiences = vec!["github".to_owned()];
    let algorithms = vec![jsonwebtoken::Algorithm::ES256];
    let typ = TypRule::exactly(scrip_token::typ::ACCESS);
    let expectations = Expectations {
        issuer: &scrip.url,
        audiences: &audiences,
        algorithms: &algorithms,
        typ: &typ,
        leeway: 30,
    };
    let doc: Value = serde_json::from_slice(&jwks)?;
    let jwk_value = doc
        .get("keys")
        .and_then(Value::as_array)
        .and_then(|keys| {
            keys.iter()
                .find(|k| k.get("kid").and_then(Value::as_str) == Some(kid))
        })
        .ok_or("kid not in JWKS")?;
    let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(jwk_value.clone())?;
    let decoding = jsonwebtoken::DecodingKey::from_jwk(&jwk)?;
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::ES256);
    validation.set_issuer(&[&scrip.url]);
    validation.set_audience(&audiences);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    validation.leeway = 30;

    println!(
        "token: {} bytes, ES256, kid {kid}; {rounds} rounds of {secs} s per stage, interleaved",
        token.len()
    );
    let names = ["raw", "jsonwebtoken", "scrip_jose", "verifier"];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); names.len()];
    for round in 0..rounds {
        let mut line = format!("round {}:", round + 1);
        for (i, (name, out)) in names.iter().zip(results.iter_mut()).enumerate() {
            let r = match i {
                0 => {
                    rate(secs, || {
                        let ok = public
                            .verify(black_box(signing_input.as_bytes()), black_box(&signature))
                            .is_ok();
                        async move { ok }
                    })
                    .await?
                }
                1 => {
                    rate(secs, || {
                        let ok = jsonwebtoken::decode::<serde_json::Map<String, Value>>(
                            black_box(&token),
                            &decoding,
                            &validation,
                        )
                        .is_ok();
                        async move { ok }
                    })
                    .await?
                }
                2 => {
                    rate(secs, || {
                        let ok = scrip_jose::verify::<AccessClaims>(
                            black_box(&token),
                            &keys,
                            &expectations,
                        )
                        .is_ok();
                        async move { ok }
                    })
                    .await?
                }
                _ => {
                    rate(secs, || async {
                        verifier
                            .verify_for(black_box(&token), &read)
                            .await
                            .map(black_box)
                            .is_ok()
                    })
                    .await?
                }
            };
            line.push_str(&format!(" {name} {r:.0}/s"));
            out.push(r);
        }
        println!("{line}");
    }
    let medians: Vec<f64> = results.into_iter().map(median).collect();
    let raw = medians.first().copied().unwrap_or(0.0);
    println!("median verifies/s (ratio to raw):");
    for (name, m) in names.iter().zip(&medians) {
        println!(
            "  {name:<13} {m:>8.0}/s  {:>5.1} %  {:>6.1} µs/verify",
            100.0 * m / raw,
            1e6 / m
        );
    }
    let v = medians.last().copied().unwrap_or(0.0);
    println!("verifier/raw = {:.1} % (target >= 90 %)", 100.0 * v / raw);
    drop(verifier);
    scrip.stop().await;
    Ok(())
}

fn main() -> std::process::ExitCode {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln_error(&e.to_string());
            return std::process::ExitCode::FAILURE;
        }
    };
    match rt.block_on(run()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln_error(&e.to_string());
            std::process::ExitCode::FAILURE
        }
    }
}

#[expect(clippy::print_stderr, reason = "the benchmark reports its failure")]
fn eprintln_error(e: &str) {
    eprintln!("bench_verify: {e}");
}
