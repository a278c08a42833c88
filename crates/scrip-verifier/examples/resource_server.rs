//! A small resource server for the `github` tool, protected by scrip.
//!
//! ```sh
//! SCRIP_ISSUER=http://127.0.0.1:7070 TOOL=github \
//! SCRIP_IDENTITY_FILE=/var/run/secrets/tokens/scrip \
//!   cargo run -p scrip-verifier --example resource_server
//! ```
//!
//! `GET /repos` needs `read`, `POST /repos` needs `write`; the handler reads
//! the verified token from the request extensions. The server's own workload
//! identity (read from `SCRIP_IDENTITY_FILE` before every feed poll)
//! authenticates it to scrip's revocation feed.

use std::sync::Arc;

use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use scrip_token::ActionName;
use scrip_verifier::{AccessToken, FileIdentity, Verifier, VerifierConfig, VerifierLayer};

/// The application, separate from `main` so that tests can drive it.
fn app(verifier: Verifier) -> Result<Router, scrip_token::NameError> {
    let read = ActionName::parse("read")?;
    let write = ActionName::parse("write")?;
    let reads = Router::new()
        .route("/repos", get(list))
        .layer(VerifierLayer::requiring(verifier.clone(), read));
    let writes = Router::new()
        .route("/repos", post(create))
        .layer(VerifierLayer::requiring(verifier, write));
    Ok(reads.merge(writes))
}

async fn list(Extension(token): Extension<AccessToken>) -> Json<serde_json::Value> {
    Json(serde_json::json!({
        "repos": ["acme/web", "acme/api"],
        "caller": token.claims().sub,
        "task": token.task(),
    }))
}

async fn create(Extension(token): Extension<AccessToken>) -> Json<serde_json::Value> {
    tracing::info!(task = %token.task(), jti = %token.claims().jti, "repository created");
    Json(serde_json::json!({ "created": true }))
}

fn env(name: &str) -> Result<String, String> {
    std::env::var(name).map_err(|_| format!("set {name}"))
}

async fn run() -> Result<(), String> {
    let issuer = env("SCRIP_ISSUER")?;
    let tool = std::env::var("TOOL").unwrap_or_else(|_| "github".into());
    let identity = Arc::new(FileIdentity::new(env("SCRIP_IDENTITY_FILE")?));
    let listen = std::env::var("LISTEN").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let verifier = Verifier::discover(VerifierConfig::new(issuer, tool, identity))
        .await
        .map_err(|e| e.to_string())?;
    let app = app(verifier).map_err(|e| e.to_string())?;
    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .map_err(|e| format!("cannot listen on `{listen}`: {e}"))?;
    tracing::info!(%listen, "resource server ready");
    axum::serve(listener, app)
        .await
        .map_err(|e| format!("server error: {e}"))
}

#[tokio::main]
async fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt().init();
    match run().await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("{e}");
            std::process::ExitCode::FAILURE
        }
    }
}
