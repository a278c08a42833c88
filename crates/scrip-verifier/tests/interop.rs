//! Interoperability: software nobody here wrote accepts what scrip issues,
//! and scrip accepts a real identity provider's tokens.
//!
//! The packages (npm `jose`, `openid-client`, `oidc-provider`; PyPI `PyJWT`)
//! are installed into `interop/` by `interop/setup.sh`, which every test runs
//! first (it is idempotent and serialised by a lock). Each third-party check
//! is paired with a negative case, so a script that accepted everything
//! would fail the test.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::path::PathBuf;
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use common::{Extra, Scrip, repo_root};
use scrip_config::TrustedIssuer;
use scrip_verifier::{StaticIdentity, Verifier, VerifierConfig};
use serde_json::Value;
use tokio::io::{AsyncBufReadExt as _, BufReader};

fn interop_dir() -> PathBuf {
    repo_root().join("interop")
}

fn setup() {
    let status = std::process::Command::new("bash")
        .arg(interop_dir().join("setup.sh"))
        .status()
        .expect("run interop/setup.sh");
    assert!(status.success(), "interop/setup.sh failed");
}

/// Runs a node or python script from `interop/`: (success, stdout, stderr).
async fn run(program: &str, script: &str, args: &[&str]) -> (bool, String, String) {
    let program = if program == "python" {
        interop_dir().join(".venv/bin/python")
    } else {
        PathBuf::from(program)
    };
    let out = tokio::process::Command::new(program)
        .current_dir(interop_dir())
        .arg(script)
        .args(args)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn jose_verifies_a_scrip_access_token() {
    setup();
    let scrip = Scrip::start().await;
    let (task, access) = scrip.github_token("read write").await;
    let (ok, out, err) = run("node", "jose-verify.mjs", &[&scrip.url, "github", &access]).await;
    assert!(ok, "jose refused a scrip access token: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["header"]["typ"], "at+jwt");
    assert_eq!(v["payload"]["aud"], "github");
    assert_eq!(v["payload"]["scope"], "read write");

    // The same script refuses the wrong audience and a task token.
    let (ok, _, err) = run("node", "jose-verify.mjs", &[&scrip.url, "jira", &access]).await;
    assert!(
        !ok && err.contains("ERR_JWT_CLAIM_VALIDATION_FAILED"),
        "{err}"
    );
    let (ok, _, err) = run("node", "jose-verify.mjs", &[&scrip.url, &scrip.url, &task]).await;
    assert!(!ok && err.contains("typ"), "{err}");
    scrip.stop().await;
}

#[tokio::test]
async fn pyjwt_verifies_a_scrip_access_token() {
    setup();
    let scrip = Scrip::start().await;
    let (task, access) = scrip.github_token("read").await;
    let (ok, out, err) = run(
        "python",
        "pyjwt_verify.py",
        &[&scrip.url, "github", &access],
    )
    .await;
    assert!(ok, "PyJWT refused a scrip access token: {err}");
    let claims: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(claims["aud"], "github");
    assert_eq!(claims["iss"], scrip.url.as_str());

    let (ok, _, err) = run("python", "pyjwt_verify.py", &[&scrip.url, "jira", &access]).await;
    assert!(!ok && err.contains("InvalidAudienceError"), "{err}");
    let (ok, _, err) = run(
        "python",
        "pyjwt_verify.py",
        &[&scrip.url, &scrip.url, &task],
    )
    .await;
    assert!(!ok && err.contains("typ"), "{err}");
    scrip.stop().await;
}

#[tokio::test]
async fn openid_client_discovers_scrip_and_exchanges_tokens() {
    setup();
    let scrip = Scrip::start().await;
    let identity = scrip.k8s.kubernetes("agents", "coder");
    let (ok, out, err) = run(
        "node",
        "openid-exchange.mjs",
        &[&scrip.url, &identity, "github:read jira:read", "github"],
    )
    .await;
    assert!(ok, "openid-client failed against scrip: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["task"]["scope"], "github:read jira:read");
    assert_eq!(
        v["access"]["token_type"]
            .as_str()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("bearer")
    );
    // What openid-client obtained is a working access token.
    let verifier = Verifier::discover(VerifierConfig::danger_without_revocation(
        &scrip.url, "github",
    ))
    .await
    .unwrap();
    let token = verifier
        .verify(v["access"]["access_token"].as_str().unwrap())
        .await
        .unwrap();
    assert_eq!(token.actions().to_string(), "read");

    // scrip's OAuth error reaches openid-client as such.
    let (ok, _, err) = run(
        "node",
        "openid-exchange.mjs",
        &[&scrip.url, "not-a-jwt", "github:read", "github"],
    )
    .await;
    assert!(!ok && err.contains("invalid_request"), "{err}");
    scrip.stop().await;
}

#[tokio::test]
async fn openid_client_binds_tokens_with_its_own_dpop_and_the_layer_checks_its_proofs() {
    use scrip_verifier::{AccessToken, VerifierLayer};
    setup();
    let scrip = Scrip::start().await;
    // A resource server on a port of its own, behind the verifier layer.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let mut config = VerifierConfig::danger_without_revocation(&scrip.url, "github");
    config.public_url = Some(base.clone());
    let verifier = Verifier::discover(config).await.unwrap();
    let whoami = |axum::Extension(t): axum::Extension<AccessToken>| async move {
        format!(
            "{} {} {}",
            t.claims().sub,
            t.actions(),
            t.claims()
                .cnf
                .as_ref()
                .map_or("unbound", |c| c.jkt.as_str())
        )
    };
    let app = axum::Router::new()
        .route("/repos", axum::routing::get(whoami))
        .layer(VerifierLayer::new(verifier));
    let server = tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });

    let identity = scrip.k8s.kubernetes("agents", "coder");
    let resource = format!("{base}/repos");
    let (ok, out, err) = run(
        "node",
        "openid-dpop.mjs",
        &[&scrip.url, &identity, "github:read", "github", &resource],
    )
    .await;
    assert!(ok, "openid-client's DPoP failed against scrip: {err}");
    let v: Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["access"]["token_type"]
            .as_str()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("dpop"),
        "{out}"
    );
    // openid-client's proofs were accepted; the key the layer saw is the
    // one scrip bound the token to.
    assert_eq!(v["with_proof"], 200, "{out}");
    let jkt = decode_part(v["access"]["access_token"].as_str().unwrap(), 1)["cnf"]["jkt"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(
        v["body"],
        format!("system:serviceaccount:agents:coder read {jkt}"),
        "{out}"
    );
    // Without a proof, or with another key's, the token is refused.
    assert_eq!(v["replayed_as_bearer"], 401, "{out}");
    assert_eq!(v["other_key"], 401, "{out}");
    assert!(
        v["other_key_challenge"]
            .as_str()
            .unwrap()
            .contains("invalid_dpop_proof"),
        "{out}"
    );
    server.abort();
    scrip.stop().await;
}

/// `openid-client` delegates from a task bound to its key to a sub-task
/// bound to a sub-agent's key named by the thumbprint `jose` computes
/// (`dpop_jkt`): scrip binds the sub-task to that key, takes the
/// sub-agent's proofs for it and refuses the parent's, and refuses the
/// delegation that names no key.
#[tokio::test]
async fn openid_client_binds_a_sub_task_to_the_key_jose_names() {
    setup();
    let scrip = Scrip::start().await;
    let identity = scrip.k8s.kubernetes("agents", "coder");
    let actor = scrip.k8s.kubernetes("agents", "helper");
    let (ok, out, err) = run(
        "node",
        "openid-dpop-delegate.mjs",
        &[&scrip.url, &identity, &actor, "github:read", "github"],
    )
    .await;
    assert!(
        ok,
        "openid-client's bound delegation failed against scrip: {err}"
    );
    let v: Value = serde_json::from_str(&out).unwrap();
    let jkt = v["jkt"].as_str().unwrap();
    assert_eq!(jkt.len(), 43, "{out}");
    let child = decode_part(v["child"]["access_token"].as_str().unwrap(), 1);
    assert_eq!(child["cnf"]["jkt"], jkt, "{out}");
    assert_eq!(child["act"]["sub"], "system:serviceaccount:agents:helper");
    let access = decode_part(v["access"]["access_token"].as_str().unwrap(), 1);
    assert_eq!(access["cnf"]["jkt"], jkt, "{out}");
    assert_eq!(
        v["access"]["token_type"]
            .as_str()
            .map(str::to_ascii_lowercase)
            .as_deref(),
        Some("dpop"),
        "{out}"
    );
    let unnamed = v["unnamed"].as_str().unwrap();
    assert!(
        unnamed.starts_with("invalid_request: ") && unnamed.contains("`dpop_jkt` is required"),
        "{out}"
    );
    let parent_key = v["parent_key"].as_str().unwrap();
    assert!(
        parent_key.starts_with("invalid_dpop_proof: ")
            && parent_key.contains("not signed with the key"),
        "{out}"
    );
    scrip.stop().await;
}

/// A running node-oidc-provider.
struct Provider {
    child: tokio::process::Child,
    kid: String,
}

async fn start_provider(port: u16) -> Provider {
    let mut child = tokio::process::Command::new("node")
        .current_dir(interop_dir())
        .arg("oidc-provider.mjs")
        .arg(port.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let mut lines = BufReader::new(stdout).lines();
    let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
        .await
        .expect("oidc-provider did not start")
        .unwrap()
        .expect("oidc-provider exited");
    let kid = line.strip_prefix("ready ").expect("ready line").to_owned();
    Provider { child, kid }
}

#[tokio::test]
async fn oidc_provider_tokens_are_workload_identities_and_key_rotation_is_followed() {
    setup();
    let port = scrip_testkit::free_port();
    let issuer = format!("http://127.0.0.1:{port}");
    let mut provider = start_provider(port).await;
    let policy = format!(
        "@id(\"oidc-provider-agents\")\npermit (principal, action == Action::\"read\", resource)\nwhen {{ principal.issuer == \"{issuer}\" }};\n"
    );
    let scrip = Scrip::start_with(Extra {
        policies: vec![("oidc-provider.cedar".into(), policy)],
        issuers: vec![TrustedIssuer {
            issuer: issuer.clone(),
            jwks_uri: Some(format!("{issuer}/jwks")),
            jwks_file: None,
            audiences: vec!["scrip".into()],
            algorithms: vec!["ES256".into()],
            token_types: vec!["at+jwt".into()],
            allow_untyped: false,
            jwks_refresh: 300,
            jwks_max_stale: 3600,
            jwks_min_refetch: 1,
            kind: None,
            trust_domain: None,
            required_claims: Default::default(),
        }],
    })
    .await;

    let token = |issuer: String| async move {
        let (ok, out, err) = run("node", "client-credentials.mjs", &[&issuer]).await;
        assert!(ok, "{err}");
        out
    };
    let first = token(issuer.clone()).await;
    let task = scrip.start_task(&first, "github:read").await;
    let access = scrip.access_token(&task, "github", None).await;
    let (_, claims) = decode(&access);
    assert_eq!(claims["sub"], "agent-1");

    // Rotate: restart the provider with a new key set on the same port.
    provider.child.kill().await.unwrap();
    let old_kid = provider.kid.clone();
    let rotated = start_provider(port).await;
    assert_ne!(rotated.kid, old_kid);
    // Past scrip's least refetch interval, a token with the new `kid` makes
    // scrip fetch the provider's JWKS again.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    let second = token(issuer.clone()).await;
    assert_eq!(decode_header(&second)["kid"], rotated.kid.as_str());
    scrip.start_task(&second, "github:read").await;

    // The provider's token is not accepted as an access token anywhere.
    let identity = scrip.k8s.kubernetes("resource-servers", "github-api");
    let verifier = Verifier::discover(VerifierConfig::new(
        &scrip.url,
        "github",
        Arc::new(StaticIdentity::new(identity)),
    ))
    .await
    .unwrap();
    assert!(verifier.verify(&second).await.is_err());
    assert!(verifier.verify(&access).await.is_ok());
    drop(rotated);
    scrip.stop().await;
}

fn decode_part(token: &str, i: usize) -> Value {
    use base64::Engine as _;
    let part = token.split('.').nth(i).unwrap();
    serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(part)
            .unwrap(),
    )
    .unwrap()
}

fn decode_header(token: &str) -> Value {
    decode_part(token, 0)
}

fn decode(token: &str) -> (Value, Value) {
    (decode_part(token, 0), decode_part(token, 1))
}
