//! The client against a real scrip (in-process, over HTTP and the socket).

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

use std::path::{Path, PathBuf};

use scrip_client::{Client, Error, FileCache, TaskRequest, attest};

struct Running {
    url: String,
    socket: PathBuf,
    _dir: tempfile::TempDir,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

async fn start() -> Running {
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../policies");
    for entry in std::fs::read_dir(repo).unwrap() {
        let path = entry.unwrap().path();
        if path
            .extension()
            .is_some_and(|e| e == "cedar" || e == "cedarschema")
        {
            std::fs::copy(&path, policies.join(path.file_name().unwrap())).unwrap();
        }
    }
    std::fs::write(
        policies.join("local.cedar"),
        "@id(\"local-read\")\npermit (principal, action == Action::\"read\", resource)\nwhen { principal.kind == \"local\" };\n",
    )
    .unwrap();
    let config = scrip_config::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: dir.path().join("data"),
        policy_dir: policies,
        tools: vec![scrip_config::Tool {
            name: scrip_token::ToolName::parse("github").unwrap(),
            resource: "https://api.github.com".into(),
            actions: ["read", "write"]
                .iter()
                .map(|a| scrip_token::ActionName::parse(a).unwrap())
                .collect(),
            labels: Default::default(),
            introspectors: Vec::new(),
        }],
        ..scrip_config::Config::default()
    };
    let socket = config.socket_path();
    let server = scrip_server::Server::bind(config).await.unwrap();
    let url = server.issuer().to_owned();
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(async move {
        let _ = server
            .run(async {
                let _ = rx.await;
            })
            .await;
    });
    Running {
        url,
        socket,
        _dir: dir,
        stop: Some(tx),
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
    }
}

#[tokio::test]
async fn attest_start_get_cached_tokens_and_end() {
    let server = start().await;
    let identity = attest(&server.socket).await.unwrap();
    assert!(identity.expires_at().is_some());
    let client = Client::new(&server.url).unwrap();
    let task = client
        .start_task(
            &identity,
            &TaskRequest::new(["github:read", "github:write"], "client test", "dev"),
        )
        .await
        .unwrap();
    // The policy allows only reads.
    assert_eq!(task.scope(), Some("github:read"));

    let cache_dir = tempfile::tempdir().unwrap();
    let task = task.with_file_cache(FileCache::new(cache_dir.path().join("c")).unwrap());
    let first = task.access_token("github", &["read"]).await.unwrap();
    let again = task.access_token("github", &["read"]).await.unwrap();
    assert_eq!(first.token, again.token, "served from the cache");
    assert_eq!(first.scope, "read");
    assert!(first.expires_in() > 200);
    assert!(!format!("{first:?}").contains(&first.token));

    // Another process (here: another Task value) reuses the file cache.
    let other = client
        .task_from_token(task.token())
        .with_file_cache(FileCache::new(cache_dir.path().join("c")).unwrap());
    assert_eq!(
        other.access_token("github", &["read"]).await.unwrap().token,
        first.token
    );

    // Beyond the task's grants.
    let e = task.access_token("github", &["write"]).await.unwrap_err();
    assert_eq!(e.oauth_code(), Some("invalid_scope"), "{e}");

    let token = task.token().to_owned();
    task.end().await.unwrap();
    let e = client
        .task_from_token(&token)
        .access_token("github", &["read"])
        .await
        .unwrap_err();
    assert_eq!(e.oauth_code(), Some("invalid_request"), "ended: {e}");
}

#[tokio::test]
async fn a_dropped_task_is_ended() {
    let server = start().await;
    let identity = attest(&server.socket).await.unwrap();
    let client = Client::new(&server.url).unwrap();
    let task = client
        .start_task(
            &identity,
            &TaskRequest::new(["github:read"], "dropped", "dev"),
        )
        .await
        .unwrap();
    let token = task.token().to_owned();
    drop(task);
    let mut ended = false;
    for _ in 0..100 {
        // A fresh value each time: no in-memory cache.
        let probe = client.task_from_token(&token);
        if probe.access_token("github", &[]).await.is_err() {
            ended = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    assert!(ended, "the dropped task was ended");
}

#[tokio::test]
async fn errors_say_what_happened() {
    let server = start().await;
    let identity = attest(&server.socket).await.unwrap();
    let client = Client::new(&server.url).unwrap();
    let e = client
        .start_task(&identity, &TaskRequest::new(["jira:read"], "p", "dev"))
        .await
        .unwrap_err();
    assert!(
        matches!(&e, Error::OAuth { status: 400, error, .. } if error == "invalid_scope"),
        "{e}"
    );
    assert!(e.to_string().contains("unknown tool `jira`"), "{e}");

    let down = Client::new("http://127.0.0.1:9").unwrap();
    let e = down
        .start_task(&identity, &TaskRequest::new(["github:read"], "p", "dev"))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unreachable { .. }), "{e}");
    assert!(e.to_string().contains("is `scrip serve` running?"), "{e}");
}

#[tokio::test]
async fn delegate_to_a_sub_agent() {
    let server = start().await;
    let identity = attest(&server.socket).await.unwrap();
    let client = Client::new(&server.url).unwrap();
    let parent = client
        .start_task(
            &identity,
            &TaskRequest::new(["github:read"], "client delegation", "dev"),
        )
        .await
        .unwrap();
    let sub_agent = attest(&server.socket).await.unwrap();
    let child = parent.delegate(&sub_agent, &["github:read"]).await.unwrap();
    assert_eq!(child.scope(), Some("github:read"));
    assert!(child.expires_at() <= parent.expires_at());
    // The child's token names the sub-agent as the current actor.
    let payload = child.token().split('.').nth(1).unwrap();
    use base64::Engine as _;
    let claims: serde_json::Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    assert_eq!(claims["act"]["sub"], "local:uid:0", "{claims}");
    assert_eq!(claims["tctx"]["depth"], 1);
    assert_eq!(
        child.access_token("github", &["read"]).await.unwrap().scope,
        "read"
    );

    // Never more than the parent holds.
    let e = parent
        .delegate(&sub_agent, &["github:write"])
        .await
        .unwrap_err();
    assert_eq!(e.oauth_code(), Some("invalid_scope"), "{e}");

    // Ending the parent ends the child.
    let child_token = child.into_token();
    parent.end().await.unwrap();
    let e = client
        .task_from_token(&child_token)
        .access_token("github", &["read"])
        .await
        .unwrap_err();
    assert_eq!(e.oauth_code(), Some("invalid_request"), "{e}");
}

#[tokio::test]
async fn dpop_bound_tokens_and_the_headers_that_present_them() {
    use std::sync::Arc;
    let server = start().await;
    let identity = attest(&server.socket).await.unwrap();
    let client = Client::new(&server.url).unwrap();
    let cache_dir = tempfile::tempdir().unwrap();
    let key = Arc::new(scrip_client::DpopKey::generate().unwrap());
    // Its `Debug` names the key by its thumbprint, and shows nothing else.
    assert_eq!(
        format!("{key:?}"),
        format!("DpopKey {{ jkt: {:?}, .. }}", key.thumbprint())
    );
    let task = client
        .start_task(&identity, &TaskRequest::new(["github:read"], "dpop", "dev"))
        .await
        .unwrap()
        .with_file_cache(FileCache::new(cache_dir.path().join("c")).unwrap())
        .with_dpop(key.clone());
    let token = task.access_token("github", &["read"]).await.unwrap();
    assert_eq!(token.token_type, "DPoP");
    let again = task.access_token("github", &["read"]).await.unwrap();
    assert_eq!(token.token, again.token, "served from the memory cache");
    let claims: serde_json::Value = {
        use base64::Engine as _;
        let payload = token.token.split('.').nth(1).unwrap();
        serde_json::from_slice(
            &base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(payload)
                .unwrap(),
        )
        .unwrap()
    };
    assert_eq!(claims["cnf"]["jkt"], key.thumbprint());
    // A bound token is not written where another process would find it.
    let other = client
        .task_from_token(task.token())
        .with_file_cache(FileCache::new(cache_dir.path().join("c")).unwrap());
    let theirs = other.access_token("github", &["read"]).await.unwrap();
    assert_eq!(theirs.token_type, "Bearer");
    assert_ne!(theirs.token, token.token);
    let _ = other.into_token();

    // The headers: a resource server's verifier accepts them, once.
    let mut config =
        scrip_verifier::VerifierConfig::danger_without_revocation(&server.url, "github");
    config.public_url = Some("https://rs.example".into());
    let verifier = scrip_verifier::Verifier::discover(config).await.unwrap();
    let url = "https://rs.example/repos?page=2";
    let headers = task.request_headers(&token, "GET", url).unwrap();
    assert_eq!(
        headers[0],
        ("Authorization", format!("DPoP {}", token.token))
    );
    let (name, proof) = &headers[1];
    assert_eq!(*name, "DPoP");
    let accepted = verifier
        .verify_dpop(&token.token, proof, "GET", url, None)
        .await
        .unwrap();
    assert_eq!(
        accepted.claims().cnf.as_ref().unwrap().jkt,
        key.thumbprint()
    );
    assert!(
        verifier
            .verify_dpop(&token.token, proof, "GET", url, None)
            .await
            .is_err(),
        "a proof is good once"
    );
    // Each call gets its own proof.
    let next = task.request_headers(&token, "GET", url).unwrap();
    assert_ne!(next[1].1, *proof);
    verifier
        .verify_dpop(&token.token, &next[1].1, "GET", url, None)
        .await
        .unwrap();
    // A bearer token is presented as one; a bound token needs the key.
    assert_eq!(
        task.request_headers(&theirs, "GET", url).unwrap(),
        vec![("Authorization", format!("Bearer {}", theirs.token))]
    );
    let keyless = client.task_from_token(task.token());
    assert!(keyless.request_headers(&token, "GET", url).is_err());
    let _ = keyless.into_token();
    task.end().await.unwrap();
}

#[tokio::test]
async fn an_eddsa_dpop_key_binds_tokens_too() {
    use std::sync::Arc;
    let server = start().await;
    let identity = attest(&server.socket).await.unwrap();
    let client = Client::new(&server.url).unwrap();
    let key =
        Arc::new(scrip_client::DpopKey::generate_with(scrip_client::DpopAlgorithm::EdDsa).unwrap());
    let task = client
        .start_task(&identity, &TaskRequest::new(["github:read"], "dpop", "dev"))
        .await
        .unwrap()
        .with_dpop(key.clone());
    let token = task.access_token("github", &["read"]).await.unwrap();
    assert_eq!(token.token_type, "DPoP");
    let mut config =
        scrip_verifier::VerifierConfig::danger_without_revocation(&server.url, "github");
    config.public_url = Some("https://rs.example".into());
    let verifier = scrip_verifier::Verifier::discover(config).await.unwrap();
    let url = "https://rs.example/repos";
    let headers = task.request_headers(&token, "GET", url).unwrap();
    let accepted = verifier
        .verify_dpop(&token.token, &headers[1].1, "GET", url, None)
        .await
        .unwrap();
    assert_eq!(
        accepted.claims().cnf.as_ref().unwrap().jkt,
        key.thumbprint()
    );
    task.end().await.unwrap();
}

#[tokio::test]
async fn a_bound_task_is_no_use_without_its_key() {
    use std::sync::Arc;
    let server = start().await;
    let identity = attest(&server.socket).await.unwrap();
    let client = Client::new(&server.url).unwrap();
    let key = Arc::new(scrip_client::DpopKey::generate().unwrap());
    let task = client
        .start_bound_task(
            &identity,
            &TaskRequest::new(["github:read"], "bound", "dev"),
            key.clone(),
        )
        .await
        .unwrap();
    let token = task.access_token("github", &["read"]).await.unwrap();
    assert_eq!(token.token_type, "DPoP");
    // Its sub-agents are delegated with a proof by the key, to a task
    // bound to the sub-agent's key: a bound task's tree stays bound.
    let sub_agent = attest(&server.socket).await.unwrap();
    let err = task
        .delegate(&sub_agent, &["github:read"])
        .await
        .unwrap_err();
    assert_eq!(err.oauth_code(), Some("invalid_request"), "{err}");
    assert!(err.to_string().contains("dpop_jkt"), "{err}");
    let sub_key = Arc::new(scrip_client::DpopKey::generate().unwrap());
    let child = task
        .delegate_bound(&sub_agent, &["github:read"], sub_key.clone())
        .await
        .unwrap();
    assert_eq!(child.scope(), Some("github:read"));
    let token = child.access_token("github", &["read"]).await.unwrap();
    assert_eq!(token.token_type, "DPoP");
    let err = client
        .task_from_token(child.token())
        .with_dpop(key.clone())
        .access_token("github", &["read"])
        .await
        .unwrap_err();
    assert_eq!(err.oauth_code(), Some("invalid_dpop_proof"), "{err}");
    // A sub-agent in another process names its key by its thumbprint; the
    // parent's handle of the child holds no key, the sub-agent's does.
    let theirs = Arc::new(scrip_client::DpopKey::generate().unwrap());
    let handed = task
        .delegate_bound_to(&sub_agent, &["github:read"], theirs.thumbprint())
        .await
        .unwrap();
    let err = handed.access_token("github", &["read"]).await.unwrap_err();
    assert_eq!(err.oauth_code(), Some("invalid_dpop_proof"), "{err}");
    let received = client.task_from_token(handed.token()).with_dpop(theirs);
    let token = received.access_token("github", &["read"]).await.unwrap();
    assert_eq!(token.token_type, "DPoP");
    let _ = received.into_token();
    handed.end().await.unwrap();
    // The task token alone, as a thief would hold it, gets nothing.
    let stolen = client.task_from_token(task.token());
    let err = stolen.access_token("github", &["read"]).await.unwrap_err();
    assert_eq!(err.oauth_code(), Some("invalid_dpop_proof"), "{err}");
    let other = Arc::new(scrip_client::DpopKey::generate().unwrap());
    let err = client
        .task_from_token(task.token())
        .with_dpop(other)
        .access_token("github", &["read"])
        .await
        .unwrap_err();
    assert_eq!(err.oauth_code(), Some("invalid_dpop_proof"), "{err}");
    let _ = stolen.into_token();
    task.end().await.unwrap();
}
