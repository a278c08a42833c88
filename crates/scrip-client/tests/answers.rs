//! What the client makes of answers that are not scrip's: the wrong kind of
//! token, an answer too large, a step that waits for a person. A loopback
//! server answers every request with one fixed response.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

use std::io::{Read as _, Write as _};
use std::net::TcpListener;

use base64::Engine as _;
use scrip_client::{Client, Error, Identity, TaskRequest};
use serde_json::json;

/// A server on 127.0.0.1 that answers every request with `response` (the
/// whole HTTP response) and closes the connection.
fn answering(response: Vec<u8>) -> String {
    answering_made(|_| response)
}

/// As [`answering`], with the response made from the server's URL.
fn answering_made(make: impl FnOnce(&str) -> Vec<u8>) -> String {
    answering_recorded(make).0
}

/// [`answering_made`], with the first line of each request it was sent
/// (`POST /revoke HTTP/1.1`), as sent so far.
fn answering_recorded(
    make: impl FnOnce(&str) -> Vec<u8>,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let response = make(&url);
    let seen = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut s) = stream else { continue };
            // The request: its head, then its Content-Length of body.
            let mut got = Vec::new();
            let mut buf = [0u8; 4096];
            let body_at = loop {
                let Ok(n) = s.read(&mut buf) else { break None };
                if n == 0 {
                    break None;
                }
                got.extend_from_slice(&buf[..n]);
                if let Some(i) = got.windows(4).position(|w| w == b"\r\n\r\n") {
                    break Some(i + 4);
                }
            };
            let Some(body_at) = body_at else { continue };
            let first = String::from_utf8_lossy(&got[..body_at])
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned();
            record.lock().unwrap().push(first);
            let head = String::from_utf8_lossy(&got[..body_at]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .map_or(0, |v| v.trim().parse().unwrap());
            while got.len() < body_at + length {
                let Ok(n) = s.read(&mut buf) else { break };
                if n == 0 {
                    break;
                }
                got.extend_from_slice(&buf[..n]);
            }
            let _ = s.write_all(&response);
        }
    });
    (url, seen)
}

fn json_response(status: &str, body: &serde_json::Value) -> Vec<u8> {
    let body = body.to_string();
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

/// An unsigned JWT-shaped identity, good for an hour.
fn identity() -> Identity {
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let exp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + 3600;
    let jwt = format!(
        "{}.{}.sig",
        b64(&json!({"alg": "ES256"})),
        b64(&json!({"sub": "agent", "exp": exp}))
    );
    Identity::from_jwt(&jwt).unwrap()
}

fn protocol(e: &Error) -> &str {
    match e {
        Error::Protocol(m) => m,
        other => panic!("not a protocol error: {other:?}"),
    }
}

/// The `cnf` a task token may come back with, and whether a client that
/// asked for it bound to `jkt` takes it.
fn bindings(jkt: &str) -> [(Option<serde_json::Value>, bool); 3] {
    [
        (None, false),
        (Some(json!({"jkt": "some-other-key"})), false),
        (Some(json!({"jkt": jkt})), true),
    ]
}

/// A server that answers every request (the metadata, the exchange, a
/// revocation) with a task token carrying `cnf`, and what it was sent.
fn answering_task_token(
    cnf: Option<serde_json::Value>,
) -> (String, std::sync::Arc<std::sync::Mutex<Vec<String>>>) {
    let b64 = |v: &serde_json::Value| {
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(v.to_string())
    };
    let mut claims = json!({"sub": "agent", "txn": "t1"});
    if let Some(cnf) = cnf {
        claims["cnf"] = cnf;
    }
    let token = format!("{}.{}.sig", b64(&json!({"alg": "ES256"})), b64(&claims));
    answering_recorded(|url| {
        json_response(
            "200 OK",
            &json!({
                "token_endpoint": format!("{url}/token"),
                "access_token": token,
                "issued_token_type": "urn:ietf:params:oauth:token-type:txn_token",
                "token_type": "N_A",
                "expires_in": 300,
                "scope": "github:read",
            }),
        )
    })
}

/// A task asked for bound to a DPoP key whose token is not bound to it
/// (something on the way dropped the `DPoP` header) is refused; one bound
/// to the key is taken.
#[tokio::test]
async fn a_bound_task_must_come_back_bound_to_its_key() {
    let key = std::sync::Arc::new(scrip_client::DpopKey::generate().unwrap());
    for (cnf, ok) in bindings(key.thumbprint()) {
        let (url, seen) = answering_task_token(cnf);
        let client = Client::new(&url).unwrap();
        let started = client
            .start_bound_task(
                &identity(),
                &TaskRequest::new(["github:read"], "p", "dev"),
                key.clone(),
            )
            .await;
        match started {
            Ok(task) => {
                assert!(ok, "an unbound task token was taken");
                let _ = task.into_token();
            }
            Err(e) => {
                assert!(!ok, "{e}");
                assert!(protocol(&e).contains("not bound"), "{e}");
            }
        }
        assert_eq!(revoked(&seen), usize::from(!ok));
    }
}

/// How many revocations a server [`answering_recorded`] was sent.
fn revoked(seen: &std::sync::Mutex<Vec<String>>) -> usize {
    seen.lock()
        .unwrap()
        .iter()
        .filter(|l| l.starts_with("POST /revoke "))
        .count()
}

/// The same for a sub-task asked for bound to a sub-agent's key.
#[tokio::test]
async fn a_bound_sub_task_must_come_back_bound_to_its_key() {
    let key = scrip_client::DpopKey::generate().unwrap();
    for (cnf, ok) in bindings(key.thumbprint()) {
        let (url, seen) = answering_task_token(cnf);
        let parent = Client::new(&url).unwrap().task_from_token("a.parent.token");
        let child = parent
            .delegate_bound_to(&identity(), &["github:read"], key.thumbprint())
            .await;
        match child {
            Ok(task) => {
                assert!(ok, "an unbound sub-task token was taken");
                let _ = task.into_token();
            }
            Err(e) => {
                assert!(!ok, "{e}");
                assert!(protocol(&e).contains("not bound"), "{e}");
            }
        }
        // A sub-task token that is not bound as asked is revoked, not
        // just dropped: it would work for whoever stole it.
        assert_eq!(revoked(&seen), usize::from(!ok));
        let _ = parent.into_token();
    }
}

#[tokio::test]
async fn a_task_token_is_never_taken_for_an_access_token() {
    let url = answering(json_response(
        "200 OK",
        &json!({
            "access_token": "a.task.token",
            "issued_token_type": "urn:ietf:params:oauth:token-type:txn_token",
            "token_type": "N_A",
            "expires_in": 600,
        }),
    ));
    let client = Client::new(&url).unwrap();
    let task = client.task_from_token("t");
    let e = task.access_token("github", &["read"]).await.unwrap_err();
    assert!(protocol(&e).contains("issued_token_type"), "{e}");
    let _ = task.into_token();
    // It is a task token, so a task start takes it.
    let started = client
        .start_task(&identity(), &TaskRequest::new(["github:read"], "p", "dev"))
        .await
        .unwrap();
    assert_eq!(started.token(), "a.task.token");
    let _ = started.into_token();
}

#[tokio::test]
async fn an_access_token_is_never_taken_for_a_task_token() {
    for (issued, token_type) in [
        ("urn:ietf:params:oauth:token-type:access_token", "Bearer"),
        ("", "N_A"),
        ("urn:ietf:params:oauth:token-type:txn_token", "Bearer"),
    ] {
        let url = answering(json_response(
            "200 OK",
            &json!({
                "access_token": "x.y.z",
                "issued_token_type": issued,
                "token_type": token_type,
                "expires_in": 600,
            }),
        ));
        let client = Client::new(&url).unwrap();
        let e = client
            .start_task(&identity(), &TaskRequest::new(["github:read"], "p", "dev"))
            .await
            .unwrap_err();
        assert!(protocol(&e).contains("got"), "{issued} {token_type}: {e}");
    }
}

#[tokio::test]
async fn an_answer_larger_than_64_kib_is_refused() {
    let big = "x".repeat(70 * 1024);
    let body = json!({"error": "invalid_request", "error_description": big});
    // With a Content-Length, and without one (read until the server closes).
    let framed = json_response("400 Bad Request", &body);
    let unframed = format!(
        "HTTP/1.1 400 Bad Request\r\nContent-Type: application/json\r\nConnection: close\r\n\r\n{body}"
    )
    .into_bytes();
    for response in [framed, unframed] {
        let client = Client::new(&answering(response)).unwrap();
        let task = client.task_from_token("t");
        let e = task.access_token("github", &["read"]).await.unwrap_err();
        assert!(protocol(&e).contains("larger than 64 KiB"), "{e}");
        let _ = task.into_token();
    }
}

#[tokio::test]
async fn a_step_that_waits_for_a_person_says_how_to_poll() {
    let url = answering(json_response(
        "400 Bad Request",
        &json!({
            "error": "authorization_pending",
            "error_description": "this step needs a person's approval",
            "auth_req_id": "req-1",
            "interval": 3,
            "expires_in": 600,
        }),
    ));
    let client = Client::new(&url).unwrap();
    let task = client.task_from_token("t");
    let e = task.access_token("github", &["delete"]).await.unwrap_err();
    match &e {
        Error::ApprovalPending {
            auth_req_id,
            interval,
            expires_in,
            approved,
        } => {
            assert_eq!(
                (auth_req_id.as_str(), *interval, *expires_in, *approved),
                ("req-1", 3, 600, false)
            );
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(e.oauth_code(), Some("authorization_pending"));
    assert!(e.to_string().contains("scrip approve req-1"), "{e}");
    let _ = task.into_token();
}

#[test]
fn a_url_that_is_not_one_is_refused_at_once() {
    let e = Client::new("127.0.0.1:7070").unwrap_err();
    assert!(matches!(e, Error::Unreachable { .. }), "{e:?}");
}

/// A step asked for again after a person approved it says so: a poll
/// collects it now, nobody is to approve it.
#[tokio::test]
async fn a_step_approved_already_says_so() {
    let url = answering(json_response(
        "400 Bad Request",
        &json!({
            "error": "authorization_pending",
            "auth_req_id": "req-1",
            "interval": 2,
            "expires_in": 300,
            "approved": true,
        }),
    ));
    let client = Client::new(&url).unwrap();
    let task = client.task_from_token("t");
    let e = task.access_token("github", &["delete"]).await.unwrap_err();
    assert!(
        matches!(e, Error::ApprovalPending { approved: true, .. }),
        "{e:?}"
    );
    assert!(e.to_string().contains("a person approved this step"), "{e}");
    assert!(!e.to_string().contains("scrip approve"), "{e}");
    let _ = task.into_token();
}

/// A wait for a person outlives a scrip that does not answer for a while,
/// but not for all the step's life: after [`DOWN_WAIT`] of it in a row,
/// the wait ends with it.
#[tokio::test(start_paused = true)]
async fn a_wait_gives_up_on_a_scrip_down_for_minutes() {
    // A port nothing listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = Client::new(&format!("http://127.0.0.1:{port}")).unwrap();
    let task = client.task_from_token("t");
    let started = tokio::time::Instant::now();
    let e = task
        .wait_for_approval("req-1", 2, std::time::Duration::from_secs(3600))
        .await
        .unwrap_err();
    assert!(matches!(e, Error::Unreachable { .. }), "{e:?}");
    let waited = started.elapsed();
    assert!(
        waited >= scrip_client::DOWN_WAIT && waited < std::time::Duration::from_secs(3600),
        "{waited:?}"
    );
    let _ = task.into_token();
}

#[tokio::test]
async fn huge_numbers_in_a_pending_answer_are_bounded() {
    let url = answering(json_response(
        "400 Bad Request",
        &json!({
            "error": "authorization_pending",
            "auth_req_id": "req-2",
            "interval": u64::MAX,
            "expires_in": u64::MAX,
        }),
    ));
    let client = Client::new(&url).unwrap();
    let task = client.task_from_token("t");
    match task.access_token("github", &["delete"]).await.unwrap_err() {
        Error::ApprovalPending {
            interval,
            expires_in,
            ..
        } => {
            assert_eq!(interval, 300);
            assert_eq!(expires_in, 7 * 24 * 3600);
        }
        other => panic!("{other:?}"),
    }
    // A wait with an unbounded timeout does not overflow either; this
    // server answers every poll `authorization_pending` with an id.
    let waited = tokio::time::timeout(
        std::time::Duration::from_millis(200),
        task.wait_for_approval("req-2", u64::MAX, std::time::Duration::MAX),
    )
    .await;
    assert!(waited.is_err(), "it waits");
    let _ = task.into_token();
}

/// What a server says in an error (whatever answers at the URL may not be
/// scrip) reaches a terminal with no control or bidirectional character
/// left to act on it, and an `auth_req_id` that could be one is not taken
/// as a step to approve.
#[tokio::test]
async fn what_a_server_says_cannot_drive_the_terminal() {
    for (error, auth_req_id) in [
        ("invalid_scope\u{1b}]52;c;ZWNobyBoaQ==\u{7}", None),
        ("authorization_pending", Some("req\u{1b}[2J")),
        ("authorization_pending", Some("req-1 ; rm -rf ~")),
    ] {
        let url = answering(json_response(
            "400 Bad Request",
            &json!({
                "error": error,
                "error_description": "bad\u{1b}[2J\u{1b}[Hok: approved\u{202e}",
                "auth_req_id": auth_req_id,
            }),
        ));
        let client = Client::new(&url).unwrap();
        let task = client.task_from_token("t");
        let e = task.access_token("github", &["delete"]).await.unwrap_err();
        assert!(matches!(e, Error::OAuth { .. }), "{e:?}");
        let shown = e.to_string();
        assert!(
            !shown.chars().any(|c| c.is_control() || c == '\u{202e}'),
            "{shown:?}"
        );
        assert!(shown.contains("bad\\u{1b}[2J"), "{shown:?}");
        let _ = task.into_token();
    }
}
