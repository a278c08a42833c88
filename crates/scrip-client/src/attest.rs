//! Local attestation: ask scrip's Unix socket who this process is.

use std::path::Path;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};

use crate::{Error, Identity};

/// The largest answer read from the socket.
const MAX_ANSWER: u64 = 64 * 1024;
/// How long the whole exchange may take (scrip hashes the executable).
const TIMEOUT: Duration = Duration::from_secs(30);

/// Obtains a workload identity for this process from scrip's local
/// attestation socket at `socket`.
///
/// # Errors
/// [`Error::SocketMissing`], [`Error::SocketPermission`] or
/// [`Error::Socket`] when the socket cannot be used;
/// [`Error::AttestationRefused`] when scrip does not identify this process.
pub async fn attest(socket: &Path) -> Result<Identity, Error> {
    // Asked again while scrip says it is busy (too many connections open,
    // executables being read), or closed the connection before it read the
    // request, within the one time limit.
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    let mut pause = Duration::from_millis(50);
    loop {
        match tokio::time::timeout_at(deadline, attest_once(socket)).await {
            Ok(Err(Error::AttestationRefused { error, .. }))
                if error == "temporarily_unavailable"
                    && tokio::time::Instant::now() + pause < deadline =>
            {
                tokio::time::sleep(pause).await;
                // At most every 4 s: each try of a store that cannot record
                // the identity has the executable read and hashed again.
                pause = (pause * 2).min(Duration::from_secs(4));
            }
            Ok(answer) => return answer,
            Err(_) => {
                return Err(Error::Socket {
                    path: socket.to_owned(),
                    message: "no answer in time".into(),
                });
            }
        }
    }
}

/// One attestation: connect, ask, read the answer.
async fn attest_once(socket: &Path) -> Result<Identity, Error> {
    let io = |e: std::io::Error| match e.kind() {
        // Closed before it answered, or the listen queue full.
        std::io::ErrorKind::ConnectionReset
        | std::io::ErrorKind::BrokenPipe
        | std::io::ErrorKind::WouldBlock => Error::AttestationRefused {
            error: "temporarily_unavailable".into(),
            description: "scrip did not take or answer the connection (too busy?)".into(),
        },
        _ => socket_error(socket, &e),
    };
    let exchange = async {
        let mut stream = tokio::net::UnixStream::connect(socket).await.map_err(io)?;
        stream.write_all(b"ATTEST\n").await.map_err(io)?;
        stream.shutdown().await.map_err(io)?;
        let mut answer = Vec::new();
        stream
            .take(MAX_ANSWER)
            .read_to_end(&mut answer)
            .await
            .map_err(io)?;
        Ok::<_, Error>(answer)
    };
    let answer = exchange.await?;
    let value: serde_json::Value = serde_json::from_slice(&answer).map_err(|_| Error::Socket {
        path: socket.to_owned(),
        message: "the answer is not JSON; is this a scrip attestation socket?".into(),
    })?;
    let text = |k: &str| value.get(k).and_then(serde_json::Value::as_str);
    if let Some(token) = text("identity_token") {
        return Identity::from_jwt(token);
    }
    Err(Error::AttestationRefused {
        error: crate::printable(text("error").unwrap_or("unknown")),
        description: crate::printable(text("error_description").unwrap_or("no reason given")),
    })
}

fn socket_error(path: &Path, e: &std::io::Error) -> Error {
    match e.kind() {
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused => {
            Error::SocketMissing {
                path: path.to_owned(),
            }
        }
        std::io::ErrorKind::PermissionDenied => Error::SocketPermission {
            path: path.to_owned(),
        },
        _ => Error::Socket {
            path: path.to_owned(),
            message: e.to_string(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::ErrorKind;

    #[test]
    fn socket_errors_say_what_to_do() {
        let p = Path::new("/run/scrip.sock");
        let check = |kind: ErrorKind, want: &str| {
            let msg = socket_error(p, &std::io::Error::from(kind)).to_string();
            assert!(msg.contains(want), "{msg}");
            assert!(msg.contains("/run/scrip.sock"), "{msg}");
        };
        check(ErrorKind::NotFound, "start `scrip serve`");
        check(ErrorKind::ConnectionRefused, "SCRIP_SOCKET");
        check(ErrorKind::PermissionDenied, "permission denied");
        check(ErrorKind::PermissionDenied, "--identity-file");
    }

    #[tokio::test]
    async fn a_missing_socket() {
        let dir = tempfile::tempdir().unwrap();
        let e = attest(&dir.path().join("none.sock")).await.unwrap_err();
        assert!(matches!(e, Error::SocketMissing { .. }), "{e}");
    }
}
