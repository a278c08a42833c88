//! Local workload attestation over the real Unix socket: who is identified,
//! who is refused and why, and that the identity starts a task over HTTP
//! with its attributes visible to Cedar.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

mod common;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::PathBuf;
use std::time::Duration;

use common::{Options, TestServer, assert_counted_past_the_budget, decode_parts, release};
use scrip_config::LocalWorkload;
use serde_json::Value;
use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

/// Lets local workloads named `tests` read and write anything in `dev`.
const LOCAL_POLICY: &str = r#"
@id("local-tests-dev")
permit (principal, action in [Action::"read", Action::"write"], resource)
when {
  principal.kind == "local" &&
  principal has workload && principal.workload == "tests" &&
  principal has exe_sha256 &&
  context.environment == "dev"
};
"#;

fn socket(server: &TestServer) -> PathBuf {
    server.dir.path().join("data/scrip.sock")
}

/// Sends `request` on the socket and returns the raw answer.
async fn send(server: &TestServer, request: &[u8]) -> String {
    let mut stream = tokio::net::UnixStream::connect(socket(server))
        .await
        .unwrap();
    stream.write_all(request).await.unwrap();
    stream.shutdown().await.unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.unwrap();
    answer
}

async fn attest(server: &TestServer) -> Value {
    let answer = send(server, b"ATTEST\n").await;
    assert!(answer.ends_with('\n'), "{answer:?}");
    serde_json::from_str(&answer).unwrap()
}

fn own_exe() -> (String, String) {
    let exe = std::env::current_exe().unwrap();
    let bytes = std::fs::read(&exe).unwrap();
    let sha: String = aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, &bytes)
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    (exe.to_str().unwrap().to_owned(), sha)
}

fn workload(name: &str) -> LocalWorkload {
    LocalWorkload {
        name: name.into(),
        uid: None,
        gid: None,
        exe: None,
        exe_sha256: None,
    }
}

async fn with_workloads(workloads: Vec<LocalWorkload>) -> TestServer {
    TestServer::start_with(Options {
        extra_policies: vec![("local.cedar".into(), LOCAL_POLICY.into())],
        edit: Some(Box::new(move |c| c.local_workloads = workloads)),
        ..Options::default()
    })
    .await
}

fn uid() -> u32 {
    std::fs::metadata("/proc/self").unwrap().uid()
}

#[tokio::test]
async fn without_workloads_a_process_of_the_same_user_is_identified_by_uid_and_exe() {
    let server = TestServer::start().await;
    let path = socket(&server);
    let meta = std::fs::symlink_metadata(&path).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o600);

    let answer = attest(&server).await;
    assert_eq!(answer["expires_in"], 300, "{answer}");
    let token = answer["identity_token"].as_str().unwrap();
    let (header, claims) = decode_parts(token);
    assert_eq!(header["typ"], "wit+jwt");
    assert_eq!(claims["iss"], format!("{}/local", server.url));
    assert_eq!(claims["aud"], server.url);
    assert_eq!(claims["sub"], format!("local:uid:{}", uid()));
    assert_eq!(
        claims["exp"].as_u64().unwrap() - claims["iat"].as_u64().unwrap(),
        300
    );
    assert!(claims["jti"].is_string());
    let (exe, sha) = own_exe();
    let att = &claims["scrip_attestation"];
    assert_eq!(att["uid"], uid());
    assert_eq!(att["pid"], std::process::id());
    assert_eq!(att["exe"], exe);
    assert_eq!(att["exe_sha256"], sha);
    assert!(att.get("workload").is_none());

    // The same over HTTP/1.1, as `curl --unix-socket` sends it.
    let http = send(
        &server,
        b"POST /attest HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n",
    )
    .await;
    assert!(http.starts_with("HTTP/1.1 200 OK\r\n"), "{http}");
    let body: Value = serde_json::from_str(http.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert!(body["identity_token"].is_string());

    // The decision is audited, naming the token by jti.
    let audit = server.audit().await;
    let record = audit
        .iter()
        .find(|a| a.event == "identity.attest" && a.jti.as_deref() == claims["jti"].as_str())
        .expect("an audit record of the attestation");
    assert_eq!(record.decision.as_deref(), Some("allow"));
    assert!(!format!("{record:?}").contains(token));

    server.stop().await;
    assert!(!path.exists(), "the socket file is removed at shutdown");
}

#[tokio::test]
async fn selectors_name_the_workload_and_the_sha256_selector_is_checked() {
    let (exe, sha) = own_exe();
    let server = with_workloads(vec![
        LocalWorkload {
            uid: Some(uid().wrapping_add(1)),
            ..workload("other-user")
        },
        LocalWorkload {
            exe_sha256: Some("0".repeat(64)),
            ..workload("other-binary")
        },
        LocalWorkload {
            uid: Some(uid()),
            exe: Some(PathBuf::from(&exe)),
            exe_sha256: Some(sha.clone()),
            ..workload("tests")
        },
    ])
    .await;
    let answer = attest(&server).await;
    let (_, claims) = decode_parts(answer["identity_token"].as_str().unwrap());
    assert_eq!(claims["sub"], "local:tests");
    assert_eq!(claims["scrip_attestation"]["workload"], "tests");
    assert_eq!(claims["scrip_attestation"]["exe_sha256"], sha);
    server.stop().await;
}

#[tokio::test]
async fn a_process_matching_nothing_is_refused_with_a_clear_message() {
    let (exe, _) = own_exe();
    let server = with_workloads(vec![
        LocalWorkload {
            exe_sha256: Some("0".repeat(64)),
            ..workload("pinned")
        },
        LocalWorkload {
            exe: Some(PathBuf::from("/usr/bin/true")),
            ..workload("true")
        },
    ])
    .await;
    let answer = attest(&server).await;
    assert_eq!(answer["error"], "access_denied", "{answer}");
    let d = answer["error_description"].as_str().unwrap();
    assert!(
        d.starts_with("no [[local_workloads]] entry matches this process"),
        "{d}"
    );
    assert!(d.contains(&exe), "{d}");
    assert!(d.contains("add one to scrip's configuration"), "{d}");
    assert!(answer.get("identity_token").is_none());

    let http = send(&server, b"POST /attest HTTP/1.1\r\n\r\n").await;
    assert!(http.starts_with("HTTP/1.1 403 Forbidden\r\n"), "{http}");

    let audit = server.audit().await;
    assert!(
        audit
            .iter()
            .any(|a| a.event == "identity.attest" && a.decision.as_deref() == Some("deny")),
        "the refusal is audited"
    );

    server.stop().await;
}

/// A process asking over and over: every refusal is on the record, one by
/// one up to the budget a second for its uid, then counted (the count
/// first in the reason), the counts recorded once their second ends, or as
/// the server stops. (Refused before its executable is hashed, here: no
/// entry names its uid, so that the asks come fast.)
#[tokio::test]
async fn a_flood_of_refused_attestations_is_recorded_as_counts() {
    const MORE: u64 = 40;
    let server = with_workloads(vec![LocalWorkload {
        uid: Some(uid().wrapping_add(1)),
        ..workload("another-user")
    }])
    .await;
    // Four at once: as many connections as a uid no entry serves may have
    // open (a fifth is answered 503 at once).
    let asks = (0..MORE).map(|_| async {
        let answer = attest(&server).await;
        assert_eq!(answer["error"], "access_denied", "{answer}");
    });
    futures_util::StreamExt::collect::<Vec<()>>(futures_util::StreamExt::buffer_unordered(
        futures_util::stream::iter(asks),
        4,
    ))
    .await;
    let refused: Vec<_> = server
        .stop_then_audit()
        .await
        .into_iter()
        .filter(|a| a.event == "identity.attest" && a.decision.as_deref() == Some("deny"))
        .collect();
    assert_counted_past_the_budget(&refused, MORE);
    // A uid no entry serves shares its budget with every other such uid:
    // one user with many uids writes no more records.
    let me = format!(",uid={}", uid());
    assert!(
        refused.iter().any(|a| a
            .reason
            .as_deref()
            .is_some_and(|r| r.contains("a second for the uids no entry serves, together"))
            && a.client.as_deref().is_some_and(|c| c.ends_with(&me))),
        "{refused:#?}"
    );
}

/// A local identity is handed out only with its durable record (SPEC:
/// fail closed): while the store cannot take it, 503 and no identity.
#[tokio::test]
async fn an_identity_waits_for_a_store_that_can_record_it() {
    let server = with_workloads(Vec::new()).await;
    let held = server.hold_writes().await;
    let answer = attest(&server).await;
    assert_eq!(answer["error"], "temporarily_unavailable", "{answer}");
    assert!(answer.get("identity_token").is_none(), "{answer}");
    release(held).await;
    let answer = attest(&server).await;
    assert!(answer["identity_token"].is_string(), "{answer}");
    server.stop().await;
}

/// A stop lets an identity under way finish: one whose commit waits for
/// the store when the stop comes is answered once it is recorded, not cut
/// off (the client need not ask again).
#[tokio::test]
async fn a_stop_lets_an_identity_under_way_finish() {
    let server = with_workloads(Vec::new()).await;
    let held = server.hold_writes().await;
    let path = socket(&server);
    let asking = tokio::spawn(async move {
        let mut stream = tokio::net::UnixStream::connect(path).await.unwrap();
        stream.write_all(b"ATTEST\n").await.unwrap();
        stream.shutdown().await.unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer).await;
        answer
    });
    // The request is read and its commit waits for the store.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = tokio::spawn(server.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !stopping.is_finished(),
        "the stop did not wait for the identity"
    );
    release(held).await;
    let answer = asking.await.unwrap();
    let answer: Value = serde_json::from_str(&answer).unwrap_or_else(|_| panic!("{answer:?}"));
    assert!(answer["identity_token"].is_string(), "{answer}");
    stopping.await.unwrap();
}

/// The socket closes as the server's stop begins, not once the HTTP
/// requests under way have drained: a replacement may take the path
/// meanwhile, and nothing is issued for an API that takes no requests.
#[tokio::test]
async fn the_socket_closes_as_a_stop_begins() {
    let server = with_workloads(Vec::new()).await;
    let path = socket(&server);
    let identity = server.k8s.kubernetes("agents", "coder");
    let held = server.hold_writes().await;
    // A task start waits for the store, and the HTTP drain for it.
    let caller = server.caller();
    let starting = tokio::spawn(async move {
        let details = serde_json::json!({ "purpose": "x", "environment": "dev" }).to_string();
        caller
            .post_form(
                "/token",
                &[
                    ("grant_type", common::TOKEN_EXCHANGE),
                    ("subject_token", &identity),
                    ("subject_token_type", common::JWT),
                    ("requested_token_type", common::TXN),
                    ("scope", "github:read"),
                    ("request_details", &details),
                ],
            )
            .await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stopping = tokio::spawn(server.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !stopping.is_finished(),
        "the drain did not wait for the request"
    );
    assert!(!path.exists(), "the socket file outlived the stop's start");
    assert!(tokio::net::UnixStream::connect(&path).await.is_err());
    release(held).await;
    assert_eq!(starting.await.unwrap().status, 200);
    stopping.await.unwrap();
}

#[tokio::test]
async fn garbage_on_the_socket_is_refused() {
    let server = TestServer::start().await;
    // Answered in the dialect spoken: a line, or HTTP that `curl` reads.
    for (request, http) in [
        (&b"HELLO\n"[..], None),
        (
            b"GET /attest HTTP/1.1\r\n\r\n",
            Some("HTTP/1.1 404 Not Found\r\n"),
        ),
        (
            b"POST /other HTTP/1.1\r\nHost: x\r\n\r\n",
            Some("HTTP/1.1 404 Not Found\r\n"),
        ),
        (b"", None),
    ] {
        let answer = send(&server, request).await;
        match http {
            Some(status) => assert!(answer.starts_with(status), "{request:?}: {answer}"),
            None => assert!(answer.starts_with('{'), "{request:?}: {answer}"),
        }
        let answer = answer.split("\r\n\r\n").last().unwrap();
        let body: Value = serde_json::from_str(answer.trim()).unwrap();
        assert_eq!(body["error"], "invalid_request", "{request:?}: {body}");
    }
    server.stop().await;
}

#[tokio::test]
async fn idle_connections_do_not_hold_up_an_attestation() {
    let server = TestServer::start().await;
    // A loaded machine may take the idle connections' 5 s over one
    // attestation by itself: a few tries, of which one answered in time
    // shows the point. Waiting behind them fails every try.
    let mut tries = Vec::new();
    for _ in 0..3 {
        // More silent clients than attestations run at once (8), fewer
        // than one uid may have open (64): each holds only its connection
        // while scrip waits 5 s for its request.
        let mut idle = Vec::new();
        for _ in 0..12 {
            idle.push(
                tokio::net::UnixStream::connect(socket(&server))
                    .await
                    .unwrap(),
            );
        }
        // Answered while they are all still open: scrip has neither
        // answered nor closed any of them, so it did not wait for their
        // 5 s timeout (the 30 s only ends a hang).
        let answer = tokio::time::timeout(std::time::Duration::from_secs(30), attest(&server))
            .await
            .expect("an attestation waited behind idle connections");
        assert!(answer["identity_token"].is_string(), "{answer}");
        let still_open = idle.iter().all(|s| {
            let mut buf = [0u8; 64];
            matches!(s.try_read(&mut buf), Err(e) if e.kind() == std::io::ErrorKind::WouldBlock)
        });
        drop(idle);
        if still_open {
            server.stop().await;
            return;
        }
        tries.push("answered only after an idle connection was closed");
    }
    panic!("an attestation waited behind idle connections: {tries:?}");
}

/// A uid holds at most so many connections (64 where an entry could serve
/// it, 4 where none does): past them a new one is answered 503 at once
/// (so a user who connects and says nothing cannot take every place, which
/// other users' attestations need); once its connections close, it is
/// served again, and scrip's client asks again meanwhile.
#[tokio::test]
async fn a_uid_holds_at_most_so_many_connections() {
    let server = TestServer::start().await;
    let mut idle = Vec::new();
    for _ in 0..64 {
        idle.push(
            tokio::net::UnixStream::connect(socket(&server))
                .await
                .unwrap(),
        );
    }
    // Answered at once, well before the 5 s a request is waited for (a
    // connection that sent nothing: one that did may find it reset).
    let answer = tokio::time::timeout(Duration::from_secs(3), async {
        let mut stream = tokio::net::UnixStream::connect(socket(&server))
            .await
            .unwrap();
        let mut answer = String::new();
        stream.read_to_string(&mut answer).await.unwrap();
        answer
    })
    .await
    .expect("a 65th connection was kept");
    let answer: Value = serde_json::from_str(&answer).unwrap();
    assert_eq!(answer["error"], "temporarily_unavailable", "{answer}");
    // scrip's client asks again until there is a place.
    let asked = tokio::spawn({
        let socket = socket(&server);
        async move { scrip_client::attest(&socket).await }
    });
    tokio::time::sleep(Duration::from_millis(500)).await;
    drop(idle);
    let identity = tokio::time::timeout(Duration::from_secs(20), asked)
        .await
        .expect("the client gave no answer")
        .unwrap();
    assert!(identity.is_ok(), "{identity:?}");
    server.stop().await;
}

#[tokio::test]
async fn a_local_identity_starts_a_task_and_cedar_sees_its_attributes() {
    let (_, sha) = own_exe();
    let server = with_workloads(vec![LocalWorkload {
        exe_sha256: Some(sha),
        ..workload("tests")
    }])
    .await;
    let identity = attest(&server).await["identity_token"]
        .as_str()
        .unwrap()
        .to_owned();

    let task = server
        .start_task(&identity, "github:read github:delete", "dev", "local run")
        .await;
    assert_eq!(task["scope"], "github:read", "{task}");
    let task_token = task["access_token"].as_str().unwrap();
    let (_, claims) = decode_parts(task_token);
    assert_eq!(claims["sub"], "local:tests");
    assert_eq!(claims["tctx"]["agent_iss"], format!("{}/local", server.url));
    let access = server.access_token(task_token, "github", None).await;
    assert_eq!(access.status, 200, "{}", access.text);

    // Outside `dev` the policy does not apply.
    server
        .try_start_task(&identity, "github:read", "prod", "local run", None)
        .await
        .assert_error(400, "access_denied");

    // Attested by another replica, sharing the key, whose clock runs 5 s
    // ahead (within `clock_skew`): accepted. Two minutes ahead: refused.
    let ahead = |by: u64| {
        server.resign(&identity, |c| {
            for claim in ["iat", "nbf"] {
                if let Some(v) = c[claim].as_u64() {
                    c[claim] = serde_json::json!(v + by);
                }
            }
        })
    };
    let r = server
        .try_start_task(&ahead(5), "github:read", "dev", "local run", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    server
        .try_start_task(&ahead(120), "github:read", "dev", "local run", None)
        .await
        .assert_error(400, "invalid_request");

    // Signed by scrip's key but living longer than scrip attests for (what
    // a leaked key would mint), or without `iat`: refused.
    let lifetime = |exp_after_iat: Option<u64>| {
        server.resign(&identity, |c| {
            let iat = c["iat"].as_u64().unwrap();
            match exp_after_iat {
                Some(l) => c["exp"] = serde_json::json!(iat + l),
                None => drop(c.as_object_mut().unwrap().remove("iat")),
            }
        })
    };
    for long in [
        Some(scrip_config::LOCAL_IDENTITY_TTL + 1),
        Some(86_400),
        None,
    ] {
        let r = server
            .try_start_task(&lifetime(long), "github:read", "dev", "local run", None)
            .await;
        r.assert_error(400, "invalid_request");
        assert!(
            r.text.contains("a local identity lives at most 300 s"),
            "{long:?}: {}",
            r.text
        );
    }
    let r = server
        .try_start_task(
            &lifetime(Some(scrip_config::LOCAL_IDENTITY_TTL)),
            "github:read",
            "dev",
            "local run",
            None,
        )
        .await;
    assert_eq!(r.status, 200, "{}", r.text);

    // The local identity authenticates an introspection call too.
    let at = access.body["access_token"].as_str().unwrap();
    let r = server
        .post_raw(
            "/introspect",
            "application/x-www-form-urlencoded",
            format!("token={at}").into_bytes(),
            Some(&identity),
        )
        .await;
    assert_eq!(r.body["active"], true, "{}", r.text);
    server.stop().await;
}

#[tokio::test]
async fn a_federated_token_claiming_an_attestation_is_not_a_local_identity() {
    let server = with_workloads(vec![LocalWorkload {
        uid: Some(uid()),
        ..workload("tests")
    }])
    .await;
    let mut claims = server.k8s.claims("local:tests");
    claims["scrip_attestation"] = serde_json::json!({
        "workload": "tests", "uid": 0, "gid": 0, "pid": 1,
        "exe": "/x", "exe_sha256": "0".repeat(64)
    });
    let forged = server.k8s.sign(&claims);
    server
        .try_start_task(&forged, "github:read", "dev", "forged", None)
        .await
        .assert_error(400, "access_denied");

    // A local identity as scrip issues it, claims and header (scrip's own
    // `kid`) alike, but signed by another key, is refused for its
    // signature; signed by scrip, the same claims start a task.
    let genuine = attest(&server).await["identity_token"]
        .as_str()
        .unwrap()
        .to_owned();
    let (header, claims) = decode_parts(&genuine);
    let mut forged_header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    forged_header.typ = header["typ"].as_str().map(str::to_owned);
    forged_header.kid = header["kid"].as_str().map(str::to_owned);
    let forged = server.k8s.sign_with(&forged_header, &claims);
    let r = server
        .try_start_task(&forged, "github:read", "dev", "forged", None)
        .await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("signature"), "{}", r.text);
    let resigned = server.resign(&genuine, |_| {});
    let r = server
        .try_start_task(&resigned, "github:read", "dev", "local run", None)
        .await;
    assert_eq!(r.status, 200, "{}", r.text);
    server.stop().await;
}

#[tokio::test]
async fn a_live_socket_is_not_taken_over_and_a_stale_one_is_replaced() {
    let server = TestServer::start().await;
    let path = socket(&server);
    let mut config = scrip_config::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir: server.dir.path().join("data"),
        policy_dir: common::repo_policies(),
        ..scrip_config::Config::default()
    };
    let err = scrip_server::Server::bind(config.clone())
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("another scrip is serving it"),
        "{err}"
    );
    assert!(path.exists());
    server.stop().await;

    // A stale socket file (nobody listening) is replaced.
    let dir = tempfile::tempdir().unwrap();
    config.data_dir = dir.path().join("data");
    std::fs::create_dir_all(&config.data_dir).unwrap();
    std::fs::set_permissions(&config.data_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    drop(std::os::unix::net::UnixListener::bind(config.data_dir.join("scrip.sock")).unwrap());
    let second = scrip_server::Server::bind(config).await.unwrap();
    drop(second);
}

/// The socket's directory is one nobody but scrip's user (or root) may
/// write, not even a sticky one (`/tmp`): whoever may rename its entries,
/// or make one while scrip is stopped, could put a socket of their own at
/// its name, and scrip's clients would take their identities from them.
/// The directories on the way may be sticky. A socket of another user in
/// the way is refused too, not removed or connected to.
#[tokio::test]
async fn a_socket_where_others_could_take_its_place_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let data_dir = dir.path().join("data");
    std::fs::create_dir_all(&data_dir).unwrap();
    std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let sockets = dir.path().join("sockets");
    std::fs::create_dir_all(&sockets).unwrap();
    let config = scrip_config::Config {
        listen: "127.0.0.1:0".parse().unwrap(),
        data_dir,
        policy_dir: common::repo_policies(),
        socket: Some(sockets.join("scrip.sock")),
        socket_mode: 0o660,
        ..scrip_config::Config::default()
    };
    for (mode, says) in [
        (
            0o777,
            "has mode 777: anyone on the host could put a socket of their own",
        ),
        (
            0o775,
            "has mode 775: members of its group could put a socket of their own",
        ),
        (
            0o1777,
            "has mode 1777: others may make or rename entries there (sticky or not)",
        ),
    ] {
        std::fs::set_permissions(&sockets, std::fs::Permissions::from_mode(mode)).unwrap();
        let err = scrip_server::Server::bind(config.clone())
            .await
            .unwrap_err()
            .to_string();
        assert!(err.contains(says), "{err}");
        // Nothing left behind: no socket, no staging directory.
        assert_eq!(std::fs::read_dir(&sockets).unwrap().count(), 0);
    }
    // Only scrip's user's, under a sticky directory: served.
    std::fs::set_permissions(&sockets, std::fs::Permissions::from_mode(0o755)).unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    let server = scrip_server::Server::bind(config.clone()).await.unwrap();
    let meta = std::fs::symlink_metadata(config.socket_path()).unwrap();
    assert_eq!(meta.mode() & 0o777, 0o660);
    std::os::unix::net::UnixStream::connect(config.socket_path()).unwrap();
    drop(server);
    // Another user's socket in the way (here by chown, as root; another
    // user could have bound one before the directory was made scrip's).
    if rustix::process::geteuid().is_root() {
        drop(std::os::unix::net::UnixListener::bind(config.socket_path()).unwrap());
        std::os::unix::fs::chown(config.socket_path(), Some(65534), None).unwrap();
        let err = scrip_server::Server::bind(config.clone())
            .await
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("a socket of uid 65534, not scrip's user, is in the way"),
            "{err}"
        );
        assert!(
            config.socket_path().exists(),
            "another's socket was removed"
        );
    }
}

/// A socket path that fits in a socket address is served however long its
/// directory's path is (the socket is made under a longer temporary name
/// first); one that does not fit is refused at start, saying why.
#[tokio::test]
async fn a_long_socket_path_is_served_and_one_too_long_refused() {
    let dir = tempfile::tempdir().unwrap();
    let config_at = |len: usize| {
        // `<data_dir>/scrip.sock`, `len` bytes in all.
        let base = dir.path().as_os_str().len() + "/".len() + "/scrip.sock".len();
        let data_dir = dir.path().join("d".repeat(len - base));
        std::fs::create_dir_all(&data_dir).unwrap();
        std::fs::set_permissions(&data_dir, std::fs::Permissions::from_mode(0o700)).unwrap();
        scrip_config::Config {
            listen: "127.0.0.1:0".parse().unwrap(),
            data_dir,
            policy_dir: common::repo_policies(),
            ..scrip_config::Config::default()
        }
    };
    let config = config_at(107);
    assert_eq!(config.socket_path().as_os_str().len(), 107);
    let server = scrip_server::Server::bind(config.clone()).await.unwrap();
    std::os::unix::net::UnixStream::connect(config.socket_path()).unwrap();
    drop(server);

    let err = scrip_server::Server::bind(config_at(108))
        .await
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("the path is 108 bytes, and a socket's may be 107 at most"),
        "{err}"
    );
}

/// With separation of duties, an approver is not made a sub-agent, except
/// in a tree whose agent could sign in as them already: a local agent of
/// the uid a person is known by. Not in a federated agent's tree, though
/// separation of duties counts a person known by uid as every federated
/// agent (a process of the uid may hold its token): that leans to refusing
/// approvals, and must not let a token be handed over.
#[tokio::test]
async fn a_sub_agent_of_an_approvers_uid_is_made_one_only_in_that_uids_trees() {
    let server = TestServer::start_with(Options {
        extra_policies: vec![("local.cedar".into(), LOCAL_POLICY.into())],
        edit: Some(Box::new(move |c| {
            c.local_workloads = vec![LocalWorkload {
                uid: Some(uid()),
                ..workload("tests")
            }];
            c.approvers = vec![
                scrip_config::Approver {
                    name: "bob".into(),
                    issuer: None,
                    subject: None,
                    uid: Some(uid()),
                },
                scrip_config::Approver {
                    name: "alice".into(),
                    issuer: Some(common::K8S_ISSUER.into()),
                    subject: Some("alice".into()),
                    uid: None,
                },
            ];
        })),
        ..Options::default()
    })
    .await;
    let local = || async {
        attest(&server).await["identity_token"]
            .as_str()
            .unwrap()
            .to_owned()
    };
    let delegate = |parent: String, actor: String| {
        let server = &server;
        async move {
            server
                .try_delegate(&parent, &actor, Some("github:read"), None)
                .await
        }
    };
    let own = server
        .start_task(&local().await, "github:read", "dev", "local run")
        .await;
    let own = own["access_token"].as_str().unwrap().to_owned();
    let r = delegate(own, local().await).await;
    assert_eq!(r.status, 200, "{}", r.text);

    let coder = server.k8s.kubernetes("agents", "coder");
    let other = server
        .start_task(&coder, "github:read", "dev", "another tree")
        .await;
    let other = other["access_token"].as_str().unwrap().to_owned();
    let r = delegate(other, local().await).await;
    r.assert_error(400, "invalid_request");
    assert!(r.text.contains("approvers"), "{}", r.text);
    // Below a federated sub-agent of a local tree of that uid: made one
    // (the tree's agent signs in as them), whatever the chain holds.
    let spiffe = server.spiffe.spiffe("acme.example", "/reviewer");
    let own = server
        .start_task(&local().await, "github:read", "dev", "local run")
        .await;
    let own = own["access_token"].as_str().unwrap().to_owned();
    let r = delegate(own, spiffe).await;
    assert_eq!(r.status, 200, "{}", r.text);
    let child = r.body["access_token"].as_str().unwrap().to_owned();
    let r = delegate(child, local().await).await;
    assert_eq!(r.status, 200, "{}", r.text);
    server.stop().await;
}
