//! Every class of bad input, against the real server over HTTP: each test
//! asserts the exact status and OAuth `error` code (SPEC §7), and a property
//! test shows that no input yields a 5xx.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use base64::Engine as _;
use common::*;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{Value, json};

const FORM: &str = "application/x-www-form-urlencoded";
const PURPOSE: &str = "fix JIRA-1 flaky test";

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Asserts an OAuth error and that its description contains `fragment`.
fn assert_error_says(r: &Reply, status: u16, code: &str, fragment: &str) {
    r.assert_error(status, code);
    let d = r.body["error_description"].as_str().unwrap_or_default();
    assert!(
        d.contains(fragment),
        "description `{d}` does not contain `{fragment}`"
    );
}

/// The claims of a Kubernetes service account in namespace `agents`, which
/// policy lets start a task in `dev`.
fn k8s_claims(s: &TestServer) -> Value {
    let mut c = s.k8s.claims("system:serviceaccount:agents:coder");
    c["kubernetes.io"] = json!({
        "namespace": "agents",
        "serviceaccount": { "name": "coder", "uid": "4f1e6c52-0000-4000-8000-000000000001" }
    });
    c
}

/// Builds a compact JWS from a raw JSON header, signed with the k8s issuer's
/// ES256 key: for headers `jsonwebtoken` would not write as given.
fn sign_raw(s: &TestServer, header: &Value, claims: &Value) -> String {
    let input = format!(
        "{}.{}",
        b64(header.to_string().as_bytes()),
        b64(claims.to_string().as_bytes())
    );
    let key = EncodingKey::from_ec_der(&s.k8s.es_pkcs8);
    let sig = jsonwebtoken::crypto::sign(input.as_bytes(), &key, Algorithm::ES256).unwrap();
    format!("{input}.{sig}")
}

/// Starts a task with `identity` asking for `github:read` in `dev`.
async fn start(s: &TestServer, identity: &str) -> Reply {
    s.try_start_task(identity, "github:read", "dev", PURPOSE, None)
        .await
}

/// Asserts that `identity` is refused as a workload identity.
async fn refuse_identity(s: &TestServer, identity: &str, fragment: &str) {
    let r = start(s, identity).await;
    assert_error_says(&r, 400, "invalid_request", fragment);
    let d = r.body["error_description"].as_str().unwrap_or_default();
    assert!(
        !d.contains(identity),
        "the description repeats the token: {d}"
    );
}

/// A task token holding `github:read` only.
async fn task_token(s: &TestServer) -> String {
    let identity = s.k8s.kubernetes("agents", "coder");
    let body = s.start_task(&identity, "github:read", "dev", PURPOSE).await;
    body["access_token"].as_str().unwrap().to_owned()
}

/// A task token holding `github:read`, and an access token of it for
/// `github` `read`.
async fn task_and_access(s: &TestServer) -> (String, String) {
    let task = task_token(s).await;
    let r = s.access_token(&task, "github", Some("read")).await;
    let access = r.body["access_token"].as_str().unwrap().to_owned();
    (task, access)
}

/// A start-task form with the given scope and raw `request_details`.
fn task_form<'a>(identity: &'a str, scope: &'a str, details: &'a str) -> Vec<(&'a str, &'a str)> {
    vec![
        ("grant_type", TOKEN_EXCHANGE),
        ("subject_token", identity),
        ("subject_token_type", JWT),
        ("requested_token_type", TXN),
        ("scope", scope),
        ("request_details", details),
    ]
}

const DETAILS: &str = r#"{"purpose":"fix JIRA-1 flaky test","environment":"dev"}"#;

// ---------------------------------------------------------------------------
// The token endpoint: the request itself.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn token_wrong_content_type() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let body = json!({ "grant_type": TOKEN_EXCHANGE, "subject_token": identity });
    let r = s
        .post_raw(
            "/token",
            "application/json",
            body.to_string().into_bytes(),
            None,
        )
        .await;
    assert_error_says(&r, 400, "invalid_request", "x-www-form-urlencoded");
    let r = s
        .post_raw("/token", "text/plain", b"grant_type=x".to_vec(), None)
        .await;
    r.assert_error(400, "invalid_request");
    s.stop().await;
}

#[tokio::test]
async fn token_non_utf8_body() {
    let s = TestServer::start().await;
    let mut body = format!("grant_type={}&subject_token=", urlencode(TOKEN_EXCHANGE)).into_bytes();
    body.extend_from_slice(&[0xff, 0xfe, 0x80]);
    let r = s.post_raw("/token", FORM, body, None).await;
    assert_error_says(&r, 400, "invalid_request", "not UTF-8");
    s.stop().await;
}

#[tokio::test]
async fn token_body_over_64_kib() {
    let s = TestServer::start().await;
    let mut body = format!("grant_type={}&pad=", urlencode(TOKEN_EXCHANGE)).into_bytes();
    body.resize(64 * 1024 + 1, b'a');
    let r = s.post_raw("/token", FORM, body, None).await;
    assert_error_says(&r, 400, "invalid_request", "larger than 65536 bytes");
    s.stop().await;
}

#[tokio::test]
async fn token_missing_grant_type() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let mut form = task_form(&identity, "github:read", DETAILS);
    form.retain(|(k, _)| *k != "grant_type");
    let r = s.post_form("/token", &form).await;
    assert_error_says(&r, 400, "invalid_request", "`grant_type` is required");
    // An empty value counts as absent.
    form.push(("grant_type", ""));
    let r = s.post_form("/token", &form).await;
    assert_error_says(&r, 400, "invalid_request", "`grant_type` is required");
    s.stop().await;
}

#[tokio::test]
async fn token_unknown_grant_type() {
    let s = TestServer::start().await;
    for grant in ["password", "client_credentials", "authorization_code"] {
        let r = s
            .post_form("/token", &[("grant_type", grant), ("username", "root")])
            .await;
        assert_error_says(&r, 400, "unsupported_grant_type", grant);
    }
    s.stop().await;
}

#[tokio::test]
async fn token_missing_subject_token() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let mut form = task_form(&identity, "github:read", DETAILS);
    form.retain(|(k, _)| *k != "subject_token");
    let r = s.post_form("/token", &form).await;
    assert_error_says(&r, 400, "invalid_request", "`subject_token` is required");
    s.stop().await;
}

#[tokio::test]
async fn token_missing_subject_token_type() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let mut form = task_form(&identity, "github:read", DETAILS);
    form.retain(|(k, _)| *k != "subject_token_type");
    let r = s.post_form("/token", &form).await;
    assert_error_says(
        &r,
        400,
        "invalid_request",
        "`subject_token_type` is required",
    );
    s.stop().await;
}

#[tokio::test]
async fn token_repeated_parameter() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    for name in ["grant_type", "subject_token", "scope", "request_details"] {
        let mut form = task_form(&identity, "github:read", DETAILS);
        let value = form.iter().find(|(k, _)| *k == name).unwrap().1;
        form.push((name, value));
        let r = s.post_form("/token", &form).await;
        assert_error_says(&r, 400, "invalid_request", &format!("`{name}` is repeated"));
    }
    s.stop().await;
}

#[tokio::test]
async fn token_unknown_subject_token_type() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    for t in [
        "urn:ietf:params:oauth:token-type:id_token",
        "urn:ietf:params:oauth:token-type:saml2",
        "jwt",
    ] {
        let mut form = task_form(&identity, "github:read", DETAILS);
        form.retain(|(k, _)| *k != "subject_token_type");
        form.push(("subject_token_type", t));
        let r = s.post_form("/token", &form).await;
        assert_error_says(&r, 400, "invalid_request", "is not supported");
    }
    s.stop().await;
}

#[tokio::test]
async fn token_requested_type_not_available_for_subject() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    // A workload identity buys a task token, not an access token.
    let mut form = task_form(&identity, "github:read", DETAILS);
    form.retain(|(k, _)| *k != "requested_token_type");
    form.push(("requested_token_type", ACCESS));
    let r = s.post_form("/token", &form).await;
    assert_error_says(&r, 400, "invalid_request", "requested_token_type");
    // A task token buys an access token, not another task token here.
    let task = task_token(&s).await;
    let r = s
        .post_form(
            "/token",
            &[
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", &task),
                ("subject_token_type", TXN),
                ("requested_token_type", JWT),
                ("audience", "github"),
            ],
        )
        .await;
    assert_error_says(&r, 400, "invalid_request", "requested_token_type");
    s.stop().await;
}

#[tokio::test]
async fn token_subject_type_access_token() {
    let s = TestServer::start().await;
    let task = task_token(&s).await;
    let r = s.access_token(&task, "github", Some("read")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let at = r.body["access_token"].as_str().unwrap();
    let r = s
        .post_form(
            "/token",
            &[
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", at),
                ("subject_token_type", ACCESS),
                ("audience", "github"),
            ],
        )
        .await;
    assert_error_says(
        &r,
        400,
        "invalid_request",
        "access token cannot be exchanged",
    );
    s.stop().await;
}

#[tokio::test]
async fn token_actor_token_not_supported() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let actor = s.k8s.kubernetes("agents", "helper");
    let mut form = task_form(&identity, "github:read", DETAILS);
    form.push(("actor_token", actor.as_str()));
    form.push(("actor_token_type", JWT));
    let r = s.post_form("/token", &form).await;
    r.assert_error(400, "invalid_request");
    s.stop().await;
}

// ---------------------------------------------------------------------------
// Starting a task: scope and request_details.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn task_missing_scope() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let mut form = task_form(&identity, "github:read", DETAILS);
    form.retain(|(k, _)| *k != "scope");
    let r = s.post_form("/token", &form).await;
    assert_error_says(&r, 400, "invalid_scope", "`scope` is required");
    s.stop().await;
}

#[tokio::test]
async fn task_malformed_scope() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    for (scope, fragment) in [
        ("github", "one has no `:`"),
        (
            "GitHub:read",
            "tool name must start with a lowercase letter or digit and hold only a-z, 0-9, `.`, `_` and `-` (character 1 is an uppercase letter)",
        ),
        (
            "github:Read",
            "action name must start with a lowercase letter or digit and hold only a-z, 0-9, `.`, `_` and `-` (character 1 is an uppercase letter)",
        ),
        (
            "github:re\u{200b}ad",
            "(character 3 is an invisible or direction-changing character)",
        ),
        ("git/hub:read", "(character 4 is a punctuation mark)"),
        ("github:read  jira:read", "empty item"),
        (" github:read", "empty item"),
        ("github:read:write", "name"),
    ] {
        let r = s
            .try_start_task(&identity, scope, "dev", PURPOSE, None)
            .await;
        assert_error_says(&r, 400, "invalid_scope", fragment);
    }
    s.stop().await;
}

/// A wrong method gets an RFC 6749 §5.2 answer, not to be cached, with
/// the methods the endpoint takes.
#[tokio::test]
async fn a_wrong_method_gets_a_json_error() {
    let s = TestServer::start().await;
    for (method, path, allow) in [
        (reqwest::Method::GET, "/token", "POST"),
        (reqwest::Method::PUT, "/revoke", "POST"),
        (reqwest::Method::POST, "/jwks", "GET,HEAD"),
        (reqwest::Method::POST, "/readyz", "GET,HEAD"),
        (reqwest::Method::DELETE, "/healthz", "GET,HEAD"),
    ] {
        let r = s
            .http
            .request(method.clone(), format!("{}{path}", s.url))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status().as_u16(), 405, "{method} {path}");
        assert_eq!(r.headers()["cache-control"], "no-store", "{method} {path}");
        assert_eq!(r.headers()["allow"], allow, "{method} {path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], "invalid_request", "{method} {path}");
    }
    // A path that is no endpoint: the same kind of answer.
    for path in [
        "/nope",
        "/.well-known/openid-configuration",
        "/.well-known/oauth-authorization-server/tenant",
    ] {
        let r = s.http.get(format!("{}{path}", s.url)).send().await.unwrap();
        assert_eq!(r.status().as_u16(), 404, "{path}");
        assert_eq!(r.headers()["cache-control"], "no-store", "{path}");
        assert_eq!(r.headers()["pragma"], "no-cache", "{path}");
        let body: serde_json::Value = r.json().await.unwrap();
        assert_eq!(body["error"], "not_found", "{path}");
    }
    s.stop().await;
}

/// A secret given in the wrong parameter (a key pasted as the scope, the
/// audience or the resource) is not repeated back: not in the answer, not
/// in the log, not in the audit record.
#[tokio::test]
async fn a_secret_in_the_wrong_parameter_is_not_repeated() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let key = "ghp_16C7e42F292c6912E7710c838347Ae178B4a";
    let lower = "sk0a1b2c3d4e5f60718293a4b5c6d7e8f9";
    for scope in [
        key.to_owned(),
        format!("github:{key}"),
        format!("{key}:read"),
    ] {
        let r = s
            .try_start_task(&identity, &scope, "dev", PURPOSE, None)
            .await;
        assert_eq!(r.body["error"], "invalid_scope", "{}", r.text);
        assert!(!r.text.contains(&key[8..]), "{}", r.text);
    }
    let task = s
        .try_start_task(&identity, "github:read", "dev", PURPOSE, None)
        .await
        .body["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    for scope in [key, lower] {
        let r = s.access_token(&task, "github", Some(scope)).await;
        assert_eq!(r.body["error"], "invalid_scope", "{}", r.text);
        assert!(!r.text.contains(&scope[8..]), "{}", r.text);
    }
    // An action the tool has but the task does not, beside the secret.
    let mixed = format!("delete zz{lower}");
    let r = s.access_token(&task, "github", Some(&mixed)).await;
    assert_eq!(r.body["error"], "invalid_scope", "{}", r.text);
    // A delegation asking for it, and a key given as a grant or token type.
    let helper = s.k8s.kubernetes("agents", "helper");
    let delegated = format!("github:{lower}");
    for form in [
        vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", task.as_str()),
            (
                "subject_token_type",
                "urn:ietf:params:oauth:token-type:txn_token",
            ),
            ("actor_token", helper.as_str()),
            ("actor_token_type", "urn:ietf:params:oauth:token-type:jwt"),
            ("scope", delegated.as_str()),
        ],
        vec![("grant_type", key), ("subject_token", task.as_str())],
        vec![
            (
                "grant_type",
                "urn:ietf:params:oauth:grant-type:token-exchange",
            ),
            ("subject_token", task.as_str()),
            ("subject_token_type", lower),
        ],
    ] {
        let r = s.post_form("/token", &form).await;
        assert!(r.status >= 400, "{}", r.text);
        assert!(
            !r.text.contains(&lower[8..]) && !r.text.contains(&key[8..]),
            "{}",
            r.text
        );
    }
    for (param, value) in [
        ("audience", key.to_owned()),
        ("audience", lower.to_owned()),
        (
            "resource",
            format!("https://api.example.com/v1?key={lower}"),
        ),
        ("resource", format!("https://api.example.com/{lower}/x")),
        (
            "resource",
            format!("https://bot:{lower}#x@api.example.com/"),
        ),
        (
            "resource",
            format!("https://bot:a/{lower}@api.example.com/"),
        ),
    ] {
        let r = s
            .post_form(
                "/token",
                &[
                    (
                        "grant_type",
                        "urn:ietf:params:oauth:grant-type:token-exchange",
                    ),
                    ("subject_token", &task),
                    (
                        "subject_token_type",
                        "urn:ietf:params:oauth:token-type:txn_token",
                    ),
                    (param, &value),
                ],
            )
            .await;
        assert_eq!(r.body["error"], "invalid_target", "{}", r.text);
        assert!(
            !r.text.contains(&lower[8..]) && !r.text.contains(&key[8..]),
            "{}",
            r.text
        );
    }
    for record in s.audit().await {
        let shown = format!("{record:?}");
        assert!(
            !shown.contains(&key[8..]) && !shown.contains(&lower[8..]),
            "{shown}"
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn task_unknown_tool_in_scope() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let r = s
        .try_start_task(&identity, "github:read slack:read", "dev", PURPOSE, None)
        .await;
    assert_error_says(&r, 400, "invalid_scope", "unknown tool `slack`");
    s.stop().await;
}

/// Without a valid identity, a task start learns nothing of the
/// configuration: not which tools, actions or environments exist.
#[tokio::test]
async fn an_unidentified_caller_learns_no_tool_action_or_environment() {
    let s = TestServer::start().await;
    let other = s.k8s.kubernetes("agents", "coder");
    let forged = format!("{}x", &other[..other.len() - 1]);
    for identity in ["garbage", forged.as_str()] {
        for (scope, details) in [
            ("slack:read", DETAILS),
            ("jira:delete", DETAILS),
            (
                "github:read",
                r#"{"purpose":"fix JIRA-1","environment":"production"}"#,
            ),
        ] {
            let r = s
                .post_form("/token", &task_form(identity, scope, details))
                .await;
            r.assert_error(400, "invalid_request");
            for told in ["slack", "jira", "github", "dev", "prod", "action"] {
                assert!(!r.text.contains(told), "{scope}: {}", r.text);
            }
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn task_unknown_action_at_tool() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let r = s
        .try_start_task(&identity, "github:read jira:delete", "dev", PURPOSE, None)
        .await;
    assert_error_says(
        &r,
        400,
        "invalid_scope",
        "tool `jira` has no action `delete`",
    );
    s.stop().await;
}

#[tokio::test]
async fn task_missing_request_details() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let mut form = task_form(&identity, "github:read", DETAILS);
    form.retain(|(k, _)| *k != "request_details");
    let r = s.post_form("/token", &form).await;
    assert_error_says(&r, 400, "invalid_request", "`request_details` is required");
    s.stop().await;
}

#[tokio::test]
async fn task_request_details_not_json() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    for details in [
        "purpose=x",
        "{",
        "[]",
        "\"dev\"",
        r#"{"purpose": 1, "environment": "dev"}"#,
        r#"{"purpose": "x", "environment": "dev", "ttl": "ghp_SECRETVALUE"}"#,
        r#"{"purpose": "x", "environment": "dev", "may_act": "ghp_SECRETVALUE"}"#,
        r#"{"purpose": "x", "environment": "dev", "ghp_SECRETVALUE!": 1}"#,
        r#"{"purpose": "x", "environment": "dev", "ttl": 1} ghp_SECRETVALUE"#,
        r#"{"purpose": "x", "environment": "SECRETVALUE"}"#,
        // A repeated member is refused, not read as its last value.
        r#"{"purpose": "x", "environment": "dev", "environment": "prod"}"#,
        // A struct could be read from a positional array: only an object is.
        r#"["fix JIRA-1", "dev"]"#,
        r#"  ["fix JIRA-1", "dev", 60, []]"#,
    ] {
        let r = s
            .post_form("/token", &task_form(&identity, "github:read", details))
            .await;
        assert_error_says(&r, 400, "invalid_request", "request_details");
        // What the agent sent is never echoed: it could be a credential in
        // the wrong member, and the message reaches logs and the audit.
        assert!(!r.text.contains("SECRETVALUE"), "{}", r.text);
    }
    s.stop().await;
}

/// A member named as serde_json reserves, which its `Value` would read as
/// the JSON text its string holds, is refused as such in `request_details`,
/// wherever it is.
#[tokio::test]
async fn task_request_details_with_a_reserved_member() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    for details in [
        r#"{"purpose": {"$serde_json::private::RawValue": "\"fix JIRA-1\""}, "environment": "dev"}"#,
        r#"{"purpose": "fix JIRA-1", "environment": "dev", "ttl": {"$serde_json::private::RawValue": "60"}}"#,
        r#"{"purpose": "fix JIRA-1", "environment": "dev", "may_act": [{"sub": "x", "\u0024serde_json::private::RawValue": 1}]}"#,
    ] {
        let r = s
            .post_form("/token", &task_form(&identity, "github:read", details))
            .await;
        assert_error_says(&r, 400, "invalid_request", "a member's name is reserved");
    }
    s.stop().await;
}

#[tokio::test]
async fn task_request_details_unknown_field() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let details = json!({ "purpose": PURPOSE, "environment": "dev", "approved": true }).to_string();
    let r = s
        .post_form("/token", &task_form(&identity, "github:read", &details))
        .await;
    assert_error_says(&r, 400, "invalid_request", "approved");
    s.stop().await;
}

#[tokio::test]
async fn task_empty_purpose() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    // Bidirectional overrides, line separators and invisible characters
    // could forge what a person approving a step reads.
    for purpose in [
        "",
        "   ",
        "line\nbreak",
        "fix \u{202e}ved\u{202c} JIRA-1",
        "fix\u{2028}environment: dev",
        "fix\u{200b}JIRA-1",
    ] {
        let r = s
            .try_start_task(&identity, "github:read", "dev", purpose, None)
            .await;
        assert_error_says(&r, 400, "invalid_request", "`purpose`");
    }
    let details = json!({ "environment": "dev" }).to_string();
    let r = s
        .post_form("/token", &task_form(&identity, "github:read", &details))
        .await;
    assert_error_says(&r, 400, "invalid_request", "purpose");
    s.stop().await;
}

#[tokio::test]
async fn task_bad_environment() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let long = "d".repeat(65);
    for env in ["", "dev prod", "../etc", "dév", long.as_str()] {
        let r = s
            .try_start_task(&identity, "github:read", env, PURPOSE, None)
            .await;
        assert_error_says(&r, 400, "invalid_request", "`environment`");
    }
    // Well formed, but not one of the configured environments: a policy on
    // `prod` must not be slipped past with another spelling.
    for env in ["production", "Prod", "prod.", "qa"] {
        let r = s
            .try_start_task(&identity, "github:delete", env, PURPOSE, None)
            .await;
        assert_error_says(
            &r,
            400,
            "invalid_request",
            "is not one of dev, staging, prod",
        );
    }
    s.stop().await;
}

#[tokio::test]
async fn task_ttl_zero() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let r = s
        .try_start_task(&identity, "github:read", "dev", PURPOSE, Some(0))
        .await;
    assert_error_says(&r, 400, "invalid_request", "`ttl`");
    let details = json!({ "purpose": PURPOSE, "environment": "dev", "ttl": -5 }).to_string();
    let r = s
        .post_form("/token", &task_form(&identity, "github:read", &details))
        .await;
    assert_error_says(&r, 400, "invalid_request", "request_details");
    s.stop().await;
}

#[tokio::test]
async fn task_audience_or_resource_given() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    for (k, v) in [
        ("audience", "github"),
        ("resource", "https://api.github.com"),
    ] {
        let mut form = task_form(&identity, "github:read", DETAILS);
        form.push((k, v));
        let r = s.post_form("/token", &form).await;
        // RFC 8693 §2.2.2.
        assert_error_says(&r, 400, "invalid_target", "audience and resource");
    }
    s.stop().await;
}

/// Refused token requests, which anyone can send, are logged one by one up
/// to 100 a second; the rest are counted, and the count is logged: a flood
/// neither fills the disk nor buries the lines that matter.
#[tokio::test]
async fn a_flood_of_refused_token_requests_is_logged_as_counts() {
    let logs = captured_logs();
    let s = TestServer::start().await;
    const SENT: usize = 600;
    let mut sends = tokio::task::JoinSet::new();
    for _ in 0..SENT {
        let (http, url) = (s.http.clone(), s.url.clone());
        sends.spawn(async move {
            http.post(format!("{url}/token"))
                .header("content-type", "application/x-www-form-urlencoded")
                .body("grant_type=nope")
                .send()
                .await
                .unwrap()
                .status()
                .as_u16()
        });
    }
    while let Some(status) = sends.join_next().await {
        assert_eq!(status.unwrap(), 400);
    }
    // One more in a later second logs the count of the last.
    tokio::time::sleep(std::time::Duration::from_millis(1100)).await;
    let r = s.post_form("/token", &[("grant_type", "nope")]).await;
    r.assert_error(400, "unsupported_grant_type");
    let text = String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
    let one_by_one = text
        .lines()
        .filter(|l| l.contains("token request refused") && !l.contains("more lines"))
        .count();
    let counted: usize = text
        .lines()
        .filter(|l| l.contains("token request refused: "))
        .map(|l| {
            let n = l.split("token request refused: ").nth(1).unwrap();
            n.split(' ').next().unwrap().parse::<usize>().unwrap()
        })
        .sum();
    assert_eq!(one_by_one + counted, SENT + 1, "{one_by_one} + {counted}");
    assert!(counted > 0, "nothing was counted: {one_by_one} logged");
    s.stop().await;
}

#[tokio::test]
async fn task_policy_allows_no_grant() {
    let s = TestServer::start().await;
    let identity = s.github.github("evil/x");
    let r = s
        .try_start_task(&identity, "github:read jira:read", "dev", PURPOSE, None)
        .await;
    assert_error_says(&r, 400, "access_denied", "none of the requested grants");
    // The refusal is recorded.
    let audit = s.audit().await;
    assert!(
        audit
            .iter()
            .any(|e| e.event == "task.grant" && e.decision.as_deref() == Some("deny")),
        "no denied decision in the audit log"
    );
    s.stop().await;
}

/// Any GitHub workflow can obtain a token for scrip's audience: an
/// issuer's `required_claims` say whose are trusted at all. Another
/// organisation's token, or one missing a claim, is refused as an
/// identity, before any policy; a number is compared as written. A
/// nested claim is named by a JSON Pointer (a Kubernetes namespace).
#[tokio::test]
async fn an_issuers_required_claims_refuse_other_workloads() {
    let s = TestServer::start_with(Options {
        edit: Some(Box::new(|c: &mut scrip_config::Config| {
            for ti in &mut c.trusted_issuers {
                if ti.issuer == GITHUB_ISSUER {
                    ti.required_claims = [
                        ("repository_owner".to_owned(), vec!["acme".to_owned()]),
                        ("run_id".to_owned(), vec!["7312345678".to_owned()]),
                    ]
                    .into();
                }
                if ti.issuer == K8S_ISSUER {
                    ti.required_claims = [(
                        "/kubernetes.io/namespace".to_owned(),
                        vec!["agents".to_owned(), "ci".to_owned()],
                    )]
                    .into();
                }
            }
        })),
        ..Options::default()
    })
    .await;
    let start = |identity: String| {
        let s = &s;
        async move {
            s.try_start_task(&identity, "github:read", "dev", PURPOSE, None)
                .await
        }
    };
    let r = start(s.github.github("acme/web")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let r = start(s.github.github("evil/web")).await;
    assert_error_says(&r, 400, "invalid_request", "claim `repository_owner`");
    // acme's token's claims, read back, without `run_id`.
    let acme = s.github.github("acme/web");
    let payload = acme.split('.').nth(1).unwrap();
    let mut c: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(payload)
            .unwrap(),
    )
    .unwrap();
    c.as_object_mut().unwrap().remove("run_id");
    let r = start(s.github.sign(&c)).await;
    assert_error_says(&r, 400, "invalid_request", "claim `run_id`");
    c["run_id"] = json!(7_312_345_678_u64);
    let r = start(s.github.sign(&c)).await;
    assert_eq!(r.status, 200, "{}", r.text);
    c["run_id"] = json!(["7312345678"]);
    let r = start(s.github.sign(&c)).await;
    assert_error_says(&r, 400, "invalid_request", "claim `run_id`");
    // Each issuer's own: a Kubernetes namespace, nested in its claims.
    let r = start(s.k8s.kubernetes("agents", "coder")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    // `ci` passes as an identity (the second value); policy grants it nothing.
    let r = start(s.k8s.kubernetes("ci", "coder")).await;
    assert!(r.text.contains("policy allows none"), "{}", r.text);
    let r = start(s.k8s.kubernetes("kube-system", "coder")).await;
    assert_error_says(
        &r,
        400,
        "invalid_request",
        "claim `/kubernetes.io/namespace`",
    );
    // A top-level claim of that name (with the dot) is not the nested one.
    let mut c: Value = serde_json::from_slice(
        &base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(
                s.k8s
                    .kubernetes("agents", "coder")
                    .split('.')
                    .nth(1)
                    .unwrap(),
            )
            .unwrap(),
    )
    .unwrap();
    c["kubernetes.io"] = json!({ "namespace": "kube-system" });
    c["kubernetes.io/namespace"] = json!("agents");
    let r = start(s.k8s.sign(&c)).await;
    assert_error_says(
        &r,
        400,
        "invalid_request",
        "claim `/kubernetes.io/namespace`",
    );
    s.stop().await;
}

// ---------------------------------------------------------------------------
// Workload identity attacks (RFC 8725).
// ---------------------------------------------------------------------------

#[tokio::test]
async fn identity_raw_signed_control_is_accepted() {
    // The control for the hand-built tokens below: a well-formed header and
    // claims, signed the same way, start a task.
    let s = TestServer::start().await;
    let header = json!({ "alg": "ES256", "typ": "JWT", "kid": s.k8s.es_kid });
    let token = sign_raw(&s, &header, &k8s_claims(&s));
    let r = start(&s, &token).await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.stop().await;
}

#[tokio::test]
async fn identity_malformed() {
    let s = TestServer::start().await;
    let claims = b64(k8s_claims(&s).to_string().as_bytes());
    let cases = [
        "not-a-jwt".to_owned(),
        "a.b".to_owned(),
        "a.b.c.d".to_owned(),
        format!("e$30.{claims}.c2ln"),
        format!("{}.{claims}.c2ln", b64(b"not json")),
        format!("{}.{claims}.c2ln", b64(b"[1,2]")),
        format!("{}.{}.c2ln", b64(br#"{"alg":"ES256"}"#), b64(b"{]")),
    ];
    for token in &cases {
        refuse_identity(&s, token, "malformed").await;
    }
    s.stop().await;
}

#[tokio::test]
async fn identity_oversized() {
    let s = TestServer::start().await;
    let mut claims = k8s_claims(&s);
    claims["pad"] = json!("x".repeat(17 * 1024));
    let token = s.k8s.sign(&claims);
    assert!(token.len() > 16 * 1024);
    refuse_identity(&s, &token, "larger than 16384 bytes").await;
    s.stop().await;
}

#[tokio::test]
async fn identity_jwe_shaped() {
    let s = TestServer::start().await;
    let header = b64(br#"{"alg":"RSA-OAEP","enc":"A256GCM"}"#);
    let token = format!("{header}.a2V5.aXY.Y2lwaGVy.dGFn");
    refuse_identity(&s, &token, "encrypted tokens are not accepted").await;
    s.stop().await;
}

#[tokio::test]
async fn identity_expired() {
    let s = TestServer::start().await;
    let now = now();
    let mut claims = k8s_claims(&s);
    claims["iat"] = json!(now - 900);
    claims["nbf"] = json!(now - 900);
    claims["exp"] = json!(now - 120);
    refuse_identity(&s, &s.k8s.sign(&claims), "expired").await;
    s.stop().await;
}

#[tokio::test]
async fn identity_not_yet_valid() {
    let s = TestServer::start().await;
    let mut claims = k8s_claims(&s);
    claims["nbf"] = json!(now() + 120);
    refuse_identity(&s, &s.k8s.sign(&claims), "not yet valid").await;
    s.stop().await;
}

#[tokio::test]
async fn identity_issued_in_future() {
    let s = TestServer::start().await;
    let mut claims = k8s_claims(&s);
    claims["iat"] = json!(now() + 120);
    refuse_identity(&s, &s.k8s.sign(&claims), "issued in the future").await;
    s.stop().await;
}

#[tokio::test]
async fn identity_untrusted_issuer() {
    let s = TestServer::start().await;
    // An issuer scrip does not know, signed with a trusted issuer's key.
    let mut claims = k8s_claims(&s);
    claims["iss"] = json!("https://evil.example");
    refuse_identity(&s, &s.k8s.sign(&claims), "not a trusted").await;
    // A trusted issuer's name with another trusted issuer's key.
    let mut claims = k8s_claims(&s);
    claims["iss"] = json!(GITHUB_ISSUER);
    let r = start(&s, &s.k8s.sign(&claims)).await;
    r.assert_error(400, "invalid_request");
    s.stop().await;
}

#[tokio::test]
async fn identity_wrong_audience() {
    let s = TestServer::start().await;
    for aud in [json!("someone-else"), json!(["a", "b"]), json!("SCRIP")] {
        let mut claims = k8s_claims(&s);
        claims["aud"] = aud;
        refuse_identity(&s, &s.k8s.sign(&claims), "audience").await;
    }
    s.stop().await;
}

#[tokio::test]
async fn identity_missing_aud() {
    let s = TestServer::start().await;
    let mut claims = k8s_claims(&s);
    claims.as_object_mut().unwrap().remove("aud");
    refuse_identity(&s, &s.k8s.sign(&claims), "`aud`").await;
    s.stop().await;
}

#[tokio::test]
async fn identity_alg_none() {
    let s = TestServer::start().await;
    let claims = b64(k8s_claims(&s).to_string().as_bytes());
    for header in [
        json!({ "alg": "none" }),
        json!({ "alg": "none", "typ": "JWT" }),
        json!({ "alg": "None", "kid": s.k8s.es_kid }),
    ] {
        let token = format!("{}.{claims}.", b64(header.to_string().as_bytes()));
        refuse_identity(&s, &token, "is not allowed").await;
    }
    s.stop().await;
}

#[tokio::test]
async fn identity_hs256_with_public_key_as_secret() {
    let s = TestServer::start().await;
    let claims = k8s_claims(&s);
    let jwk = s.k8s.jwks["keys"][0].clone();
    assert_eq!(jwk["kid"], s.k8s.es_kid.as_str());
    // The secret an attacker would try: the published JWK, or its raw point.
    let dec = |v: &Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(v.as_str().unwrap())
            .unwrap()
    };
    let mut point = vec![4u8];
    point.extend(dec(&jwk["x"]));
    point.extend(dec(&jwk["y"]));
    for secret in [jwk.to_string().into_bytes(), point] {
        for alg in [Algorithm::HS256, Algorithm::HS384, Algorithm::HS512] {
            let mut header = Header::new(alg);
            header.kid = Some(s.k8s.es_kid.clone());
            header.typ = Some("JWT".into());
            let token =
                jsonwebtoken::encode(&header, &claims, &EncodingKey::from_secret(&secret)).unwrap();
            refuse_identity(&s, &token, &format!("algorithm `{alg:?}` is not allowed")).await;
        }
    }
    s.stop().await;
}

#[tokio::test]
async fn identity_alg_not_on_issuer_allow_list() {
    let s = TestServer::start().await;
    // The k8s issuer allows ES256 and RS256; its JWKS holds an EdDSA key.
    let mut header = Header::new(Algorithm::EdDSA);
    header.kid = Some(s.k8s.ed_kid.clone());
    header.typ = Some("JWT".into());
    let token = s.k8s.sign_with(&header, &k8s_claims(&s));
    refuse_identity(&s, &token, "algorithm `EdDSA` is not allowed").await;
    s.stop().await;
}

#[tokio::test]
async fn identity_crit_header() {
    let s = TestServer::start().await;
    let header = json!({ "alg": "ES256", "kid": s.k8s.es_kid, "crit": ["exp"], "exp": 1 });
    let token = sign_raw(&s, &header, &k8s_claims(&s));
    refuse_identity(&s, &token, "critical header").await;
    s.stop().await;
}

#[tokio::test]
async fn identity_jku_header() {
    let s = TestServer::start().await;
    let header =
        json!({ "alg": "ES256", "kid": s.k8s.es_kid, "jku": "https://evil.example/jwks.json" });
    let token = sign_raw(&s, &header, &k8s_claims(&s));
    refuse_identity(&s, &token, "header `jku` is not accepted").await;
    s.stop().await;
}

#[tokio::test]
async fn identity_jwk_header() {
    let s = TestServer::start().await;
    // The embedded key is even the right one: it is still not trusted.
    let header = json!({ "alg": "ES256", "kid": s.k8s.es_kid, "jwk": s.k8s.jwks["keys"][0] });
    let token = sign_raw(&s, &header, &k8s_claims(&s));
    refuse_identity(&s, &token, "header `jwk` is not accepted").await;
    s.stop().await;
}

#[tokio::test]
async fn identity_x5u_header() {
    let s = TestServer::start().await;
    let header =
        json!({ "alg": "ES256", "kid": s.k8s.es_kid, "x5u": "https://evil.example/cert.pem" });
    let token = sign_raw(&s, &header, &k8s_claims(&s));
    refuse_identity(&s, &token, "header `x5u` is not accepted").await;
    s.stop().await;
}

#[tokio::test]
async fn identity_unknown_kid() {
    let s = TestServer::start().await;
    for kid in ["no-such-key", "../../etc/passwd", "https://evil.example/k"] {
        let header = json!({ "alg": "ES256", "kid": kid });
        let token = sign_raw(&s, &header, &k8s_claims(&s));
        refuse_identity(&s, &token, "unknown key").await;
    }
    s.stop().await;
}

#[tokio::test]
async fn identity_typ_at_jwt() {
    let s = TestServer::start().await;
    for typ in ["at+jwt", "application/at+jwt", "txntoken+jwt"] {
        let mut header = Header::new(Algorithm::ES256);
        header.kid = Some(s.k8s.es_kid.clone());
        header.typ = Some(typ.into());
        let token = s.k8s.sign_with(&header, &k8s_claims(&s));
        refuse_identity(&s, &token, "is not accepted here").await;
    }
    s.stop().await;
}

#[tokio::test]
async fn identity_missing_sub() {
    let s = TestServer::start().await;
    let mut claims = k8s_claims(&s);
    claims.as_object_mut().unwrap().remove("sub");
    refuse_identity(&s, &s.k8s.sign(&claims), "no subject").await;
    let mut claims = k8s_claims(&s);
    claims["sub"] = json!("");
    refuse_identity(&s, &s.k8s.sign(&claims), "no subject").await;
    s.stop().await;
}

#[tokio::test]
async fn identity_scrip_task_token() {
    let s = TestServer::start().await;
    let task = task_token(&s).await;
    refuse_identity(&s, &task, "not a workload identity").await;
    let r = s.access_token(&task, "github", Some("read")).await;
    let at = r.body["access_token"].as_str().unwrap().to_owned();
    refuse_identity(&s, &at, "not a workload identity").await;
    s.stop().await;
}

// ---------------------------------------------------------------------------
// Access token exchange.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn access_task_token_missing_or_garbage() {
    let s = TestServer::start().await;
    let r = s
        .post_form(
            "/token",
            &[
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token_type", TXN),
                ("audience", "github"),
            ],
        )
        .await;
    assert_error_says(&r, 400, "invalid_request", "`subject_token` is required");
    for garbage in ["garbage", "a.b.c", "eyJ.eyJ.sig", "x.y.z.w.v"] {
        let r = s.access_token(garbage, "github", Some("read")).await;
        assert_error_says(&r, 400, "invalid_request", "subject_token");
    }
    s.stop().await;
}

#[tokio::test]
async fn access_token_presented_as_task_token() {
    let s = TestServer::start().await;
    let task = task_token(&s).await;
    let r = s.access_token(&task, "github", Some("read")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let at = r.body["access_token"].as_str().unwrap().to_owned();
    let r = s.access_token(&at, "github", Some("read")).await;
    assert_error_says(&r, 400, "invalid_request", "at+jwt");
    s.stop().await;
}

#[tokio::test]
async fn workload_identity_presented_as_task_token() {
    let s = TestServer::start().await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let r = s.access_token(&identity, "github", Some("read")).await;
    r.assert_error(400, "invalid_request");
    let identity = s.spiffe.spiffe("acme.example", "/agents/coder");
    let r = s.access_token(&identity, "github", Some("read")).await;
    r.assert_error(400, "invalid_request");
    s.stop().await;
}

#[tokio::test]
async fn access_unknown_audience() {
    let s = TestServer::start().await;
    let task = task_token(&s).await;
    for aud in ["slack", "GitHub", "https://api.github.com"] {
        let r = s.access_token(&task, aud, Some("read")).await;
        assert_error_says(&r, 400, "invalid_target", "unknown tool");
    }
    s.stop().await;
}

#[tokio::test]
async fn access_unknown_resource() {
    let s = TestServer::start().await;
    let task = task_token(&s).await;
    for resource in [
        "https://evil.example",
        "github",
        "https://api.github.com/repos",
        "https://api.github.com:8443",
        "http://api.github.com",
    ] {
        let r = s
            .post_form(
                "/token",
                &[
                    ("grant_type", TOKEN_EXCHANGE),
                    ("subject_token", &task),
                    ("subject_token_type", TXN),
                    ("resource", resource),
                    ("scope", "read"),
                ],
            )
            .await;
        assert_error_says(&r, 400, "invalid_target", "no tool has resource");
    }
    s.stop().await;
}

/// RFC 8707 names a tool by its URI, however it is spelt (RFC 3986
/// §6.2.2-6.2.3): scheme and host case, a default port, an empty path.
#[tokio::test]
async fn access_resource_spelt_otherwise() {
    let s = TestServer::start().await;
    let task = task_token(&s).await;
    for resource in ["HTTPS://API.GitHub.com:443/", "https://api.github.com/"] {
        let r = s
            .post_form(
                "/token",
                &[
                    ("grant_type", TOKEN_EXCHANGE),
                    ("subject_token", &task),
                    ("subject_token_type", TXN),
                    ("resource", resource),
                    ("audience", "github"),
                    ("scope", "read"),
                ],
            )
            .await;
        assert_eq!(r.status, 200, "{resource}: {}", r.text);
        let token = r.body["access_token"].as_str().unwrap();
        assert_eq!(decode_parts(token).1["aud"], "github");
    }
    s.stop().await;
}

#[tokio::test]
async fn access_audience_and_resource_disagree() {
    let s = TestServer::start().await;
    let task = task_token(&s).await;
    let r = s
        .post_form(
            "/token",
            &[
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", &task),
                ("subject_token_type", TXN),
                ("audience", "github"),
                ("resource", "https://acme.atlassian.net"),
                ("scope", "read"),
            ],
        )
        .await;
    assert_error_says(&r, 400, "invalid_target", "different tools");
    s.stop().await;
}

#[tokio::test]
async fn access_audience_repeated() {
    let s = TestServer::start().await;
    let task = task_token(&s).await;
    for (k, a, b) in [
        ("audience", "github", "jira"),
        ("audience", "github", "github"),
        (
            "resource",
            "https://api.github.com",
            "https://acme.atlassian.net",
        ),
    ] {
        let r = s
            .post_form(
                "/token",
                &[
                    ("grant_type", TOKEN_EXCHANGE),
                    ("subject_token", &task),
                    ("subject_token_type", TXN),
                    (k, a),
                    (k, b),
                    ("scope", "read"),
                ],
            )
            .await;
        assert_error_says(&r, 400, "invalid_target", &format!("give `{k}` once"));
    }
    s.stop().await;
}

#[tokio::test]
async fn access_no_audience_or_resource() {
    let s = TestServer::start().await;
    let task = task_token(&s).await;
    let r = s
        .post_form(
            "/token",
            &[
                ("grant_type", TOKEN_EXCHANGE),
                ("subject_token", &task),
                ("subject_token_type", TXN),
                ("scope", "read"),
            ],
        )
        .await;
    assert_error_says(&r, 400, "invalid_target", "audience");
    s.stop().await;
}

#[tokio::test]
async fn access_scope_beyond_task() {
    let s = TestServer::start().await;
    let task = task_token(&s).await;
    for scope in ["write", "read write", "delete"] {
        let r = s.access_token(&task, "github", Some(scope)).await;
        assert_error_says(&r, 400, "invalid_scope", "exceeds the task's grants");
    }
    // An action the tool does not even have.
    let r = s.access_token(&task, "github", Some("execute")).await;
    r.assert_error(400, "invalid_scope");
    // Grants at another tool do not carry over.
    let r = s.access_token(&task, "jira", Some("read")).await;
    assert_error_says(&r, 400, "invalid_scope", "`jira:read`");
    s.stop().await;
}

#[tokio::test]
async fn access_malformed_scope() {
    let s = TestServer::start().await;
    let task = task_token(&s).await;
    for scope in ["Read", "read  write", " read", "github:read", "re ad!"] {
        let r = s.access_token(&task, "github", Some(scope)).await;
        r.assert_error(400, "invalid_scope");
    }
    s.stop().await;
}

#[tokio::test]
async fn access_no_grant_at_tool_without_scope() {
    let s = TestServer::start().await;
    let task = task_token(&s).await;
    let r = s.access_token(&task, "jira", None).await;
    assert_error_says(&r, 400, "invalid_scope", "holds no grant at tool `jira`");
    s.stop().await;
}

// ---------------------------------------------------------------------------
// Revocation and introspection.
// ---------------------------------------------------------------------------

#[tokio::test]
async fn revoke_missing_token() {
    let s = TestServer::start().await;
    let r = s
        .post_form("/revoke", &[("token_type_hint", "access_token")])
        .await;
    assert_error_says(&r, 400, "invalid_request", "`token` is required");
    let r = s
        .post_raw("/revoke", "application/json", b"{}".to_vec(), None)
        .await;
    r.assert_error(400, "invalid_request");
    s.stop().await;
}

/// The caches of tokens verified are keyed by the whole token, signature
/// included: the header and claims of a token verified a moment ago, under
/// the signature of another valid token of the same key, are refused at
/// every endpoint, and act on nothing.
#[tokio::test]
async fn a_verified_tokens_claims_under_another_signature_are_refused() {
    let s = TestServer::start().await;
    let swap = |token: &str, other: &str| {
        let (signed, own) = token.rsplit_once('.').unwrap();
        let (_, sig) = other.rsplit_once('.').unwrap();
        assert_ne!(own, sig, "two signatures alike");
        format!("{signed}.{sig}")
    };
    let says = |r: &Reply, what: &str| {
        assert_eq!(r.status, 400, "{what}: {}", r.text);
        let d = r.body["error_description"].as_str().unwrap_or_default();
        assert!(d.contains("signature is invalid"), "{what}: {d}");
    };
    // An identity, verified (and kept) at a task's start.
    let identity = s.k8s.kubernetes("agents", "coder");
    let other = s.k8s.kubernetes("agents", "helper");
    assert_eq!(start(&s, &identity).await.status, 200);
    says(&start(&s, &swap(&identity, &other)).await, "identity");
    // A task token and an access token, each verified once.
    let (task, access) = task_and_access(&s).await;
    let (other_task, other_access) = task_and_access(&s).await;
    assert_eq!(s.introspect(&access).await.body["active"], true);
    let forged_task = swap(&task, &other_task);
    let forged_access = swap(&access, &other_access);
    says(
        &s.access_token(&forged_task, "github", Some("read")).await,
        "exchange",
    );
    for forged in [&forged_task, &forged_access] {
        let r = s.introspect(forged).await;
        assert_eq!(r.body, json!({"active": false}), "{}", r.text);
        assert_eq!(s.revoke(forged).await.status, 200);
    }
    // Nothing was revoked by them: the genuine tokens stand.
    assert_eq!(s.introspect(&access).await.body["active"], true);
    assert_eq!(s.introspect(&task).await.body["active"], true);
    let r = s.access_token(&task, "github", Some("read")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.stop().await;
}

/// A task token signed by scrip names its task, and is that task's only as
/// the very token the task was issued (its `jti`): another naming the same
/// task (a leaked key, another replica's fault) opens nothing.
#[tokio::test]
async fn a_task_token_that_is_not_the_tasks_own_opens_nothing() {
    let s = TestServer::start().await;
    let task = task_token(&s).await;
    let other = s.resign(&task, |c| c["jti"] = json!("bm90LXRoZS10YXNrcy1vd24"));
    let r = s.access_token(&other, "github", Some("read")).await;
    assert_eq!(r.status, 400, "{}", r.text);
    assert!(r.text.contains("ended"), "{}", r.text);
    assert_eq!(s.introspect(&other).await.body, json!({"active": false}));
    // The control: the task's own token, signed again, is taken.
    let same = s.resign(&task, |_| {});
    let r = s.access_token(&same, "github", Some("read")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    assert_eq!(s.introspect(&same).await.body["active"], true);
    s.stop().await;
}

/// `/revoke` takes no client authentication and answers 200 whatever it is
/// given (RFC 7009 §2.2), so only the signature stands between anyone who
/// has seen a token's `txn` and `jti` (every resource server has) and the
/// end of the task. Tokens that name a live task and token but are not
/// scrip's, under scrip's own `kid`, expired within the leeway or not, end
/// nothing; the same token signed by scrip does (so each forgery reached
/// the path it would have opened).
#[tokio::test]
async fn a_forged_token_revokes_nothing() {
    let s = TestServer::start().await;
    let (task, access) = task_and_access(&s).await;
    let b64 = |v: &Value| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string());
    let forgeries = |token: &str| {
        let (header, claims) = decode_parts(token);
        let mut expired = claims.clone();
        expired["exp"] = json!(now() - 5);
        // For a tool no longer configured, which revocation still takes.
        let mut elsewhere = claims.clone();
        elsewhere["aud"] = json!("retired");
        let mut forged = Vec::new();
        for claims in [claims, expired, elsewhere] {
            // Signed by a key that is not scrip's, under scrip's kid.
            let mut h = Header::new(Algorithm::ES256);
            h.kid = header["kid"].as_str().map(str::to_owned);
            h.typ = header["typ"].as_str().map(str::to_owned);
            forged.push(s.k8s.sign_with(&h, &claims));
            // Not signed at all.
            let none = json!({"alg": "none", "typ": header["typ"], "kid": header["kid"]});
            forged.push(format!("{}.{}.", b64(&none), b64(&claims)));
            forged.push(format!("{}.{}", b64(&none), b64(&claims)));
        }
        forged
    };
    for forged in forgeries(&access).iter().chain(&forgeries(&task)) {
        assert_eq!(s.revoke(forged).await.status, 200);
    }
    let active = |r: Reply| r.body["active"] == json!(true);
    assert!(
        active(s.introspect(&access).await),
        "a forgery revoked the access token"
    );
    assert!(
        active(s.introspect(&task).await),
        "a forgery ended the task"
    );
    let events: Vec<String> = s.audit().await.into_iter().map(|a| a.event).collect();
    assert!(!events.iter().any(|e| e == "token.revoked"), "{events:?}");

    // The control: the same expired token, signed by scrip, does.
    let expired = s.resign(&access, |c| c["exp"] = json!(now() - 5));
    assert_eq!(s.revoke(&expired).await.status, 200);
    assert!(
        !active(s.introspect(&access).await),
        "the signed token revoked nothing"
    );
    let expired = s.resign(&task, |c| c["exp"] = json!(now() - 5));
    assert_eq!(s.revoke(&expired).await.status, 200);
    assert!(
        !active(s.introspect(&task).await),
        "the signed token ended nothing"
    );
    s.stop().await;
}

/// An access token for a tool taken out of the configuration since (here
/// one scrip signed for `retired`) is still revoked: a resource server
/// that verifies offline would take it until it expires.
#[tokio::test]
async fn an_access_token_for_a_tool_no_longer_configured_is_revoked() {
    let s = TestServer::start().await;
    let (_, access) = task_and_access(&s).await;
    let retired = s.resign(&access, |c| c["aud"] = json!("retired"));
    let (_, claims) = decode_parts(&retired);
    assert_eq!(s.revoke(&retired).await.status, 200);
    let revoked = s
        .audit()
        .await
        .into_iter()
        .find(|a| a.event == "token.revoked")
        .expect("a token.revoked record");
    assert_eq!(revoked.jti.as_deref(), claims["jti"].as_str());
    assert_eq!(revoked.tool.as_deref(), Some("retired"));
    assert_eq!(
        revoked.agent_iss.as_deref(),
        Some(K8S_ISSUER),
        "{revoked:?}"
    );
    s.stop().await;
}

/// Revocations of one access token at once (a client retrying, two
/// replicas): one revokes it, and only that one is on the record. A token
/// of an ended task is revoked (and recorded) once too.
#[tokio::test]
async fn an_access_token_revoked_at_once_by_many_is_recorded_once() {
    let s = TestServer::start().await;
    let (task, access) = task_and_access(&s).await;
    // All of them read the token unrevoked before any commits: the store
    // is held until they wait on it.
    let held = s.hold_writes().await;
    let (answers, ()) = tokio::join!(
        futures_util::future::join_all((0..16).map(|_| s.revoke(&access))),
        async {
            tokio::time::sleep(std::time::Duration::from_millis(500)).await;
            release(held).await;
        }
    );
    assert!(answers.iter().all(|r| r.status == 200));
    assert_eq!(s.introspect(&access).await.body, json!({"active": false}));
    let jti = decode_parts(&access).1["jti"].as_str().unwrap().to_owned();
    let revoked = |audit: &[scrip_store::AuditEvent]| {
        audit
            .iter()
            .filter(|a| a.event == "token.revoked")
            .map(|a| a.jti.clone().unwrap())
            .collect::<Vec<_>>()
    };
    assert_eq!(revoked(&s.audit().await), std::slice::from_ref(&jti));

    let r = s.access_token(&task, "github", Some("read")).await;
    let other = r.body["access_token"].as_str().unwrap().to_owned();
    let other_jti = decode_parts(&other).1["jti"].as_str().unwrap().to_owned();
    assert_eq!(s.revoke(&task).await.status, 200);
    for _ in 0..2 {
        assert_eq!(s.revoke(&other).await.status, 200);
    }
    assert_eq!(revoked(&s.audit().await), [jti, other_jti]);
    s.stop().await;
}

#[tokio::test]
async fn revoke_garbage_token() {
    let s = TestServer::start().await;
    for garbage in ["garbage", "a.b.c", "x.y.z.w.v", &"A".repeat(20_000)] {
        let r = s.revoke(garbage).await;
        assert_eq!(r.status, 200, "{}", r.text);
    }
    // A workload identity is not a scrip token either.
    let r = s.revoke(&s.k8s.kubernetes("agents", "coder")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.stop().await;
}

fn assert_unauthorized(r: &Reply) {
    r.assert_error(401, "invalid_token");
    let www = r
        .headers
        .get("www-authenticate")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    assert!(
        www.starts_with("Bearer") && www.contains("invalid_token"),
        "WWW-Authenticate: {www:?}"
    );
}

#[tokio::test]
async fn introspect_without_authorization() {
    let s = TestServer::start().await;
    let task = task_token(&s).await;
    let body = format!("token={}", urlencode(&task));
    let r = s
        .post_raw("/introspect", FORM, body.clone().into_bytes(), None)
        .await;
    r.assert_error(401, "invalid_token");
    // No credentials at all: the challenge names no error (RFC 6750 §3.1).
    assert_eq!(r.headers["www-authenticate"], "Bearer realm=\"scrip\"");
    assert!(r.body.get("active").is_none(), "{}", r.text);
    // Another scheme is no credential either.
    let r = s
        .http
        .post(format!("{}/introspect", s.url))
        .header("content-type", FORM)
        .header("authorization", "Basic dXNlcjpwYXNz")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.headers().contains_key("www-authenticate"));
    s.stop().await;
}

#[tokio::test]
async fn introspect_garbage_bearer() {
    let s = TestServer::start().await;
    let task = task_token(&s).await;
    let body = format!("token={}", urlencode(&task)).into_bytes();
    for bearer in ["garbage", "a.b.c"] {
        let r = s
            .post_raw("/introspect", FORM, body.clone(), Some(bearer))
            .await;
        assert_unauthorized(&r);
    }
    // An expired caller identity.
    let mut claims = k8s_claims(&s);
    claims["exp"] = json!(now() - 120);
    claims["nbf"] = json!(now() - 900);
    claims["iat"] = json!(now() - 900);
    let r = s
        .post_raw("/introspect", FORM, body, Some(&s.k8s.sign(&claims)))
        .await;
    assert_unauthorized(&r);
    s.stop().await;
}

#[tokio::test]
async fn introspect_task_token_as_bearer() {
    let s = TestServer::start().await;
    let task = task_token(&s).await;
    let body = format!("token={}", urlencode(&task)).into_bytes();
    let r = s
        .post_raw("/introspect", FORM, body.clone(), Some(&task))
        .await;
    assert_unauthorized(&r);
    assert!(
        r.body["error_description"]
            .as_str()
            .unwrap_or_default()
            .contains("not a workload identity"),
        "{}",
        r.text
    );
    let at = s.access_token(&task, "github", Some("read")).await.body["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let r = s.post_raw("/introspect", FORM, body, Some(&at)).await;
    assert_unauthorized(&r);
    s.stop().await;
}

#[tokio::test]
async fn introspect_missing_token_param() {
    let s = TestServer::start().await;
    let caller = s.k8s.kubernetes("resource-servers", "github-proxy");
    let r = s
        .post_raw(
            "/introspect",
            FORM,
            b"token_type_hint=access_token".to_vec(),
            Some(&caller),
        )
        .await;
    assert_error_says(&r, 400, "invalid_request", "`token` is required");
    // And garbage in `token` is simply inactive.
    let r = s
        .post_raw(
            "/introspect",
            FORM,
            b"token=garbage".to_vec(),
            Some(&caller),
        )
        .await;
    assert_eq!((r.status, r.body.clone()), (200, json!({"active": false})));
    s.stop().await;
}

// ---------------------------------------------------------------------------
// No input yields a 5xx.
// ---------------------------------------------------------------------------

mod no_5xx {
    use super::*;
    use proptest::prelude::*;
    use proptest::test_runner::{Config as ProptestConfig, TestRunner};

    /// Placeholders replaced by real tokens at run time, so that random
    /// requests reach past the first checks.
    const IDENTITY: &str = "$IDENTITY";
    const TASK: &str = "$TASK";
    const ACCESS_TOKEN: &str = "$ACCESS";

    #[derive(Debug, Clone)]
    enum Input {
        Form {
            path: &'static str,
            pairs: Vec<(String, String)>,
            bearer: Option<String>,
        },
        Raw {
            path: &'static str,
            content_type: String,
            body: Vec<u8>,
            bearer: Option<String>,
        },
    }

    fn path() -> impl Strategy<Value = &'static str> {
        prop_oneof![Just("/token"), Just("/revoke"), Just("/introspect")]
    }

    fn name() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::sample::select(vec![
                "grant_type",
                "subject_token",
                "subject_token_type",
                "requested_token_type",
                "actor_token",
                "actor_token_type",
                "scope",
                "request_details",
                "audience",
                "resource",
                "token",
                "token_type_hint",
            ])
            .prop_map(str::to_owned),
            1 => "\\PC{0,12}",
            1 => any::<String>(),
        ]
    }

    fn value() -> impl Strategy<Value = String> {
        prop_oneof![
            4 => prop::sample::select(vec![
                TOKEN_EXCHANGE,
                JWT,
                TXN,
                ACCESS,
                IDENTITY,
                TASK,
                ACCESS_TOKEN,
                "github",
                "jira",
                "https://api.github.com",
                "read",
                "read write",
                "github:read",
                "github:read jira:write",
                r#"{"purpose":"fix JIRA-1","environment":"dev"}"#,
                r#"{"purpose":"fix JIRA-1","environment":"dev","ttl":18446744073709551615}"#,
                r#"{"purpose":"x","environment":"prod","ttl":1}"#,
            ])
            .prop_map(str::to_owned),
            2 => "\\PC{0,40}",
            1 => any::<String>(),
            1 => "[A-Za-z0-9_.-]{0,200}",
        ]
    }

    fn bearer() -> impl Strategy<Value = Option<String>> {
        prop_oneof![
            Just(None),
            Just(Some(IDENTITY.to_owned())),
            Just(Some(TASK.to_owned())),
            "[ -~]{0,60}".prop_map(Some),
        ]
    }

    fn input() -> impl Strategy<Value = Input> {
        let form = (
            path(),
            prop::collection::vec((name(), value()), 0..8),
            bearer(),
        )
            .prop_map(|(path, pairs, bearer)| Input::Form {
                path,
                pairs,
                bearer,
            });
        let raw = (
            path(),
            prop_oneof![
                Just(FORM.to_owned()),
                Just(format!("{FORM}; charset=utf-8")),
                Just("application/json".to_owned()),
                "[ -~]{0,40}",
            ],
            prop::collection::vec(any::<u8>(), 0..512),
            bearer(),
        )
            .prop_map(|(path, content_type, body, bearer)| Input::Raw {
                path,
                content_type,
                body,
                bearer,
            });
        prop_oneof![3 => form, 2 => raw]
    }

    struct Tokens {
        identity: String,
        task: String,
        access: String,
    }

    impl Tokens {
        fn fill(&self, s: &str) -> String {
            s.replace(IDENTITY, &self.identity)
                .replace(TASK, &self.task)
                .replace(ACCESS_TOKEN, &self.access)
        }
    }

    async fn send(s: &TestServer, t: &Tokens, input: &Input) -> (&'static str, Reply) {
        match input {
            Input::Form {
                path,
                pairs,
                bearer,
            } => {
                let body = form_urlencoded::Serializer::new(String::new())
                    .extend_pairs(pairs.iter().map(|(k, v)| (t.fill(k), t.fill(v))))
                    .finish();
                let bearer = bearer.as_deref().map(|b| t.fill(b));
                let r = s
                    .post_raw(path, FORM, body.into_bytes(), bearer.as_deref())
                    .await;
                (*path, r)
            }
            Input::Raw {
                path,
                content_type,
                body,
                bearer,
            } => {
                let bearer = bearer.as_deref().map(|b| t.fill(b));
                let r = s
                    .post_raw(path, content_type, body.clone(), bearer.as_deref())
                    .await;
                (*path, r)
            }
        }
    }

    #[test]
    fn random_requests_never_yield_5xx() {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let s = rt.block_on(TestServer::start());
        let tokens = rt.block_on(async {
            let identity = s.k8s.kubernetes("agents", "coder");
            let task = task_token(&s).await;
            let r = s.access_token(&task, "github", Some("read")).await;
            let access = r.body["access_token"].as_str().unwrap().to_owned();
            Tokens {
                identity,
                task,
                access,
            }
        });
        let config = ProptestConfig {
            cases: 64,
            max_shrink_iters: 64,
            failure_persistence: None,
            ..ProptestConfig::default()
        };
        let mut runner = TestRunner::new(config);
        let result = runner.run(&input(), |input| {
            let (path, r) = rt.block_on(send(&s, &tokens, &input));
            prop_assert!(r.status < 500, "{path} answered {}: {}", r.status, r.text);
            if r.status >= 400 {
                let code = r.body["error"].as_str();
                prop_assert!(
                    code.is_some(),
                    "{path} {}: not an OAuth error: {}",
                    r.status,
                    r.text
                );
                let d = r.body["error_description"].as_str().unwrap_or_default();
                prop_assert!(
                    !d.is_empty() && !d.starts_with(char::is_uppercase),
                    "{path}: bad description {d:?}"
                );
            }
            Ok(())
        });
        if let Err(e) = result {
            panic!("{e}");
        }

        // The server still answers, and still works.
        rt.block_on(async {
            let r = s
                .http
                .get(format!("{}/healthz", s.url))
                .send()
                .await
                .unwrap();
            assert_eq!(r.status(), 200);
            let task = task_token(&s).await;
            let r = s.access_token(&task, "github", Some("read")).await;
            assert_eq!(r.status, 200, "{}", r.text);
        });
        rt.block_on(s.stop());
    }
}

/// Sends a form POST to /token whose head carries `framing` and whose body
/// starts `body`, and reads the answer until the server closes (20 s at
/// most).
async fn raw_token_post(s: &TestServer, framing: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    let host = s.url.trim_start_matches("http://").to_owned();
    let mut c = tokio::net::TcpStream::connect(&host).await.unwrap();
    c.write_all(
        format!(
            "POST /token HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-www-form-urlencoded\r\n{framing}\r\nConnection: close\r\n\r\n{body}"
        )
        .as_bytes(),
    )
    .await
    .unwrap();
    let mut out = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(20), c.read_to_end(&mut out))
        .await
        .expect("the server never answered")
        .unwrap();
    String::from_utf8_lossy(&out).into_owned()
}

#[tokio::test]
async fn a_form_body_that_trickles_is_refused_within_its_timeout() {
    let s = TestServer::start().await;
    let started = std::time::Instant::now();
    let text = raw_token_post(&s, "Content-Length: 1000", "grant_type=").await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("did not arrive within 10 s"), "{text}");
    assert!(started.elapsed() < std::time::Duration::from_secs(15));
    s.stop().await;
}

/// A body whose chunked framing is broken is not "too large": the answer
/// says it could not be read.
#[tokio::test]
async fn a_form_body_with_broken_framing_is_said_to_be_unreadable() {
    let s = TestServer::start().await;
    let text = raw_token_post(&s, "Transfer-Encoding: chunked", "5\r\ngrant\r\nzz\r\n").await;
    assert!(text.starts_with("HTTP/1.1 400"), "{text}");
    assert!(text.contains("could not be read"), "{text}");
    assert!(!text.contains("larger than"), "{text}");
    s.stop().await;
}
