//! The token of an approved step (SPEC §5) against a real scrip: the
//! verifier accepts it once and refuses its second presentation.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::sync::Arc;

use common::{AUDIENCE, Idp, JWT, K8S_ISSUER, TOKEN_EXCHANGE, TXN, repo_root, tools};
use scrip_config::{Approver, Config, TrustedIssuer};
use scrip_jose::SigningAlgorithm;
use scrip_token::ActionName;
use scrip_verifier::{StaticIdentity, Verifier, VerifierConfig, VerifyError};
use serde_json::{Value, json};

const CIBA: &str = "urn:openid:params:grant-type:ciba";
const ACCESS: &str = "urn:ietf:params:oauth:token-type:access_token";

struct Server {
    url: String,
    http: reqwest::Client,
    k8s: Idp,
    _dir: tempfile::TempDir,
    shutdown: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<()>,
}

impl Server {
    /// A scrip with the repository's policies where alice approves.
    async fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let policy_dir = dir.path().join("policies");
        std::fs::create_dir_all(&policy_dir).unwrap();
        for entry in std::fs::read_dir(repo_root().join("policies")).unwrap() {
            let path = entry.unwrap().path();
            if path
                .extension()
                .is_some_and(|e| e == "cedar" || e == "cedarschema")
            {
                std::fs::copy(&path, policy_dir.join(path.file_name().unwrap())).unwrap();
            }
        }
        let k8s = Idp::new(K8S_ISSUER);
        let jwks_file = dir.path().join("k8s-jwks.json");
        std::fs::write(&jwks_file, k8s.jwks.to_string()).unwrap();
        let config = Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir: dir.path().join("data"),
            policy_dir,
            signing_algorithm: SigningAlgorithm::ES256,
            policy_poll_interval: 1,
            trusted_issuers: vec![TrustedIssuer {
                issuer: k8s.issuer.clone(),
                jwks_uri: None,
                jwks_file: Some(jwks_file),
                audiences: vec![AUDIENCE.to_owned()],
                algorithms: vec!["ES256".into()],
                token_types: vec!["JWT".into()],
                allow_untyped: true,
                jwks_refresh: 300,
                jwks_max_stale: 3600,
                jwks_min_refetch: 10,
                kind: None,
                trust_domain: None,
                required_claims: Default::default(),
            }],
            tools: tools(),
            approvers: vec![Approver {
                name: "alice".into(),
                issuer: Some(K8S_ISSUER.into()),
                subject: Some("system:serviceaccount:people:alice".into()),
                uid: None,
            }],
            ..Config::default()
        };
        let server = scrip_server::Server::bind(config).await.unwrap();
        let url = server.issuer().to_owned();
        let (shutdown, rx) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(async move {
            server
                .run(async {
                    let _ = rx.await;
                })
                .await
                .unwrap();
        });
        Self {
            url,
            http: reqwest::Client::new(),
            k8s,
            _dir: dir,
            shutdown,
            handle,
        }
    }

    async fn stop(self) {
        let _ = self.shutdown.send(());
        let _ = self.handle.await;
    }

    async fn post(&self, path: &str, form: &[(&str, &str)], bearer: Option<&str>) -> (u16, Value) {
        let body = form_urlencoded::Serializer::new(String::new())
            .extend_pairs(form.iter())
            .finish();
        let mut req = self
            .http
            .post(format!("{}{path}", self.url))
            .header("content-type", "application/x-www-form-urlencoded")
            .body(body);
        if let Some(b) = bearer {
            req = req.bearer_auth(b);
        }
        let r = req.send().await.unwrap();
        let status = r.status().as_u16();
        let text = r.text().await.unwrap();
        (status, serde_json::from_str(&text).unwrap_or(Value::Null))
    }

    /// A task in prod holding `github:delete github:read`.
    async fn prod_task(&self) -> String {
        let identity = self.k8s.kubernetes("agents", "coder");
        let details = json!({ "purpose": "cleanup JIRA-9", "environment": "prod" }).to_string();
        let (status, body) = self
            .post(
                "/token",
                &[
                    ("grant_type", TOKEN_EXCHANGE),
                    ("subject_token", &identity),
                    ("subject_token_type", JWT),
                    ("requested_token_type", TXN),
                    ("scope", "github:delete github:read"),
                    ("request_details", &details),
                ],
                None,
            )
            .await;
        assert_eq!(status, 200, "start task: {body}");
        body["access_token"].as_str().unwrap().to_owned()
    }

    async fn exchange(&self, task: &str, scope: &str) -> (u16, Value) {
        self.post(
            "/token",
            &[
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", task),
                ("subject_token_type", TXN),
                ("requested_token_type", ACCESS),
                ("audience", "github"),
                ("scope", scope),
            ],
            None,
        )
        .await
    }

    /// Asks for `delete`, has alice approve it, polls: the approved token.
    async fn approved_token(&self, task: &str) -> String {
        let (status, body) = self.exchange(task, "delete").await;
        assert_eq!(
            (status, body["error"].as_str()),
            (400, Some("authorization_pending")),
            "{body}"
        );
        let id = body["auth_req_id"].as_str().unwrap();
        let alice = self.k8s.kubernetes("people", "alice");
        let (status, body) = self
            .post(&format!("/approvals/{id}/approve"), &[], Some(&alice))
            .await;
        assert_eq!(status, 200, "approve: {body}");
        let (status, body) = self
            .post(
                "/token",
                &[
                    ("grant_type", CIBA),
                    ("auth_req_id", id),
                    ("subject_token", task),
                ],
                None,
            )
            .await;
        assert_eq!(status, 200, "poll: {body}");
        body["access_token"].as_str().unwrap().to_owned()
    }
}

async fn verifier(s: &Server) -> Verifier {
    let identity = s.k8s.kubernetes("resource-servers", "github-api");
    let mut config = VerifierConfig::new(&s.url, "github", Arc::new(StaticIdentity::new(identity)));
    if let scrip_verifier::Revocation::Follow(feed) = &mut config.revocation {
        feed.wait = std::time::Duration::from_secs(2);
    }
    Verifier::discover(config).await.unwrap()
}

#[tokio::test]
async fn the_verifier_accepts_an_approved_token_once() {
    let s = Server::start().await;
    let v = verifier(&s).await;
    // One that does not follow the feed: its refusals of a spent token are
    // its own memory's, not the feed's revocation of it.
    let alone = {
        let identity = s.k8s.kubernetes("resource-servers", "github-api");
        let mut config =
            VerifierConfig::new(&s.url, "github", Arc::new(StaticIdentity::new(identity)));
        config.revocation = scrip_verifier::Revocation::DangerIgnore;
        Verifier::discover(config).await.unwrap()
    };
    let other = verifier(&s).await;
    let task = s.prod_task().await;
    let token = s.approved_token(&task).await;

    // A request refused for another reason once its caller is known (a
    // method no action maps to) does not spend it, nor does a request for
    // a tool that is not here.
    let mut headers = http::HeaderMap::new();
    headers.insert(
        http::header::AUTHORIZATION,
        format!("Bearer {token}").parse().unwrap(),
    );
    let uri: http::Uri = "/x".parse().unwrap();
    for _ in 0..2 {
        let t = v
            .authenticate(&http::Method::OPTIONS, &uri, &headers)
            .await
            .unwrap();
        assert!(t.claims().approval.as_ref().unwrap().single_use);
        let r = v
            .for_no_tool()
            .refuse_as("nowhere", &http::Method::DELETE, &uri, &headers)
            .await;
        assert_eq!(r.status, 401);
        assert_eq!(
            r.www_authenticate.as_deref(),
            Some(
                r#"Bearer realm="nowhere", error="invalid_token", error_description="token audience is not accepted""#
            )
        );
        assert!(!r.token_verified);
    }

    let t = v
        .verify_for(&token, &ActionName::parse("delete").unwrap())
        .await
        .unwrap();
    assert_eq!(t.actions().to_string(), "delete");
    let approval = t.claims().approval.as_ref().unwrap();
    assert_eq!(approval.approver, "alice");
    assert!(approval.single_use);

    // Presented again it is refused: this verifier remembers its use, and
    // scrip's feed soon lists the used token (so the refusal may say it is
    // revoked).
    let spent = |e: VerifyError| {
        assert!(
            matches!(e, VerifyError::AlreadyUsed | VerifyError::Revoked),
            "{e:?}"
        );
    };
    spent(v.verify(&token).await.unwrap_err());
    // Nor does a request that would not spend it pass once it is spent
    // here (a verifier that does not follow the feed asks scrip nothing:
    // it remembers what it was shown).
    alone
        .verify_for(&token, &ActionName::parse("delete").unwrap())
        .await
        .unwrap();
    match alone.authenticate(&http::Method::GET, &uri, &headers).await {
        Err(r) => {
            assert_eq!(r.status, 401);
            assert!(
                r.www_authenticate
                    .as_deref()
                    .is_some_and(|c| c.contains("already presented")),
                "{r:?}"
            );
        }
        Ok(_) => panic!("a spent single-use token was accepted"),
    }
    spent(
        v.verify_for(&token, &ActionName::parse("delete").unwrap())
            .await
            .unwrap_err(),
    );
    // Another verifier of the same tool (another pod behind the same load
    // balancer) refuses it too: the one use was claimed at scrip.
    spent(other.verify(&token).await.unwrap_err());
    spent(verifier(&s).await.verify(&token).await.unwrap_err());
    // And introspection, which answers a single-use token active once.
    let identity = s.k8s.kubernetes("resource-servers", "github-api");
    let (status, body) = s
        .post("/introspect", &[("token", &token)], Some(&identity))
        .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body, json!({"active": false}));

    // An ordinary token of the same task is not single use.
    let (status, body) = s.exchange(&task, "read").await;
    assert_eq!(status, 200, "{body}");
    let read = body["access_token"].as_str().unwrap();
    assert!(v.verify(read).await.is_ok());
    assert!(v.verify(read).await.is_ok());
    s.stop().await;
}

/// An identity that can be made to hang, as a slow workload-identity
/// helper would.
#[derive(Debug)]
struct Stalling {
    token: String,
    hang: Arc<std::sync::atomic::AtomicBool>,
}

impl scrip_verifier::IdentitySource for Stalling {
    fn identity(&self) -> scrip_verifier::IdentityFuture<'_> {
        Box::pin(async move {
            while self.hang.load(std::sync::atomic::Ordering::SeqCst) {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            Ok(self.token.clone())
        })
    }
}

/// A server, a verifier whose identity source stalls while `hang` is set,
/// and an approved single-use token.
async fn stalling() -> (Server, Verifier, Arc<std::sync::atomic::AtomicBool>, String) {
    let s = Server::start().await;
    let hang = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let identity = Stalling {
        token: s.k8s.kubernetes("resource-servers", "github-api"),
        hang: hang.clone(),
    };
    let mut config = VerifierConfig::new(&s.url, "github", Arc::new(identity));
    if let scrip_verifier::Revocation::Follow(feed) = &mut config.revocation {
        feed.wait = std::time::Duration::from_secs(2);
    }
    let v = Verifier::discover(config).await.unwrap();
    let task = s.prod_task().await;
    let token = s.approved_token(&task).await;
    (s, v, hang, token)
}

/// An identity source that never answers does not hold a presentation
/// past the claim's time limit (10 s): the use is unconfirmed (503), and the
/// token is accepted once the source answers again.
#[tokio::test]
async fn a_stalled_identity_source_gives_an_unconfirmed_use_in_time() {
    let (s, v, hang, token) = stalling().await;

    hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let answer = tokio::time::timeout(std::time::Duration::from_secs(30), v.verify(&token))
        .await
        .expect("the claim waited for the identity source for ever");
    assert!(
        matches!(answer, Err(VerifyError::UseUnconfirmed)),
        "{answer:?}"
    );
    hang.store(false, std::sync::atomic::Ordering::SeqCst);
    v.verify(&token).await.unwrap();
    s.stop().await;
}

/// A presentation dropped while its use is being claimed at scrip (its
/// client went away) leaves no mark: the use was never confirmed, and the
/// token is accepted when presented again.
#[tokio::test]
async fn a_presentation_dropped_before_its_use_is_confirmed_leaves_no_mark() {
    let (s, v, hang, token) = stalling().await;

    hang.store(true, std::sync::atomic::Ordering::SeqCst);
    let dropped =
        tokio::time::timeout(std::time::Duration::from_millis(300), v.verify(&token)).await;
    assert!(dropped.is_err(), "the claim did not wait: {dropped:?}");
    hang.store(false, std::sync::atomic::Ordering::SeqCst);
    let t = v.verify(&token).await.unwrap();
    assert!(t.claims().approval.as_ref().unwrap().single_use);
    assert!(matches!(
        v.verify(&token).await.unwrap_err(),
        VerifyError::AlreadyUsed | VerifyError::Revoked
    ));
    s.stop().await;
}
