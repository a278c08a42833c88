//! Fail closed on an unwritable store, and recover by itself: the store is
//! put on a tiny tmpfs that the test fills up, then frees.
//! Needs root (mount), as CI and the development machines run.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::*;

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(dir: &Path, size: &str) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "this test mounts a tmpfs and needs root: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Self(dir.to_owned())
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system holding `dir` with a file; returns its path.
fn fill(dir: &Path) -> PathBuf {
    let path = dir.join("filler");
    let mut f = std::fs::File::create(&path).unwrap();
    let chunk = vec![0u8; 16 * 1024];
    while f.write_all(&chunk).is_ok() {}
    // Also the last partial block.
    while f.write_all(&[0u8; 512]).is_ok() {}
    let _ = f.sync_all();
    path
}

/// Requests sent to a full store before one must have been refused: more
/// than the records the space SQLite already holds can take (a few
/// kilobytes each, in at most the 4 MiB of the file system).
const MOST_REQUESTS: usize = 2_000;

#[tokio::test]
async fn a_full_or_read_only_store_fails_closed_and_recovers() {
    let outer = tempfile::tempdir().unwrap();
    let data = outer.path().join("data");
    let fs = Tmpfs::mount(&data, "4m");
    let data_for_config = data.clone();
    let s = TestServer::start_with(Options {
        edit: Some(Box::new(move |c| c.data_dir = data_for_config)),
        ..Options::default()
    })
    .await;
    let identity = s.k8s.kubernetes("agents", "coder");
    let task = s
        .start_task(&identity, "github:read", "dev", "triage")
        .await;
    let task_token = task["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        s.access_token(&task_token, "github", Some("read"))
            .await
            .status,
        200
    );

    // Disk full: nothing is issued, the answer is 503 temporarily_unavailable.
    // (Records still fit where SQLite already holds space: pages it has,
    // and a write-ahead log that a checkpoint started over, which may be
    // most of the 4 MiB. So the requests go on until one is refused.)
    let filler = fill(&data);
    let mut refused = 0;
    for _ in 0..MOST_REQUESTS {
        if refused > 0 {
            break;
        }
        let r = s.access_token(&task_token, "github", Some("read")).await;
        match r.status {
            503 => {
                r.assert_error(503, "temporarily_unavailable");
                assert!(r.body.get("access_token").is_none());
                refused += 1;
            }
            // A few records may still fit in pages SQLite already holds.
            200 => {}
            other => panic!("unexpected {other}: {}", r.text),
        }
    }
    assert!(refused > 0, "a full disk never refused");
    // A task start as well (asked again while space a checkpoint freed
    // lasts).
    let mut refused = false;
    for _ in 0..MOST_REQUESTS {
        let r = s
            .try_start_task(&identity, "github:read", "dev", "triage", None)
            .await;
        if r.status != 200 {
            r.assert_error(503, "temporarily_unavailable");
            refused = true;
            break;
        }
    }
    assert!(refused, "a full disk never refused a task start");

    // Space again: the same server recovers by itself.
    std::fs::remove_file(&filler).unwrap();
    let r = s.access_token(&task_token, "github", Some("read")).await;
    assert_eq!(r.status, 200, "{}", r.text);

    // And again, to show the recovery is not a one-off.
    let filler = fill(&data);
    let mut refused = false;
    for _ in 0..MOST_REQUESTS {
        let r = s.access_token(&task_token, "github", Some("read")).await;
        if r.status == 503 {
            refused = true;
            break;
        }
    }
    assert!(refused, "a full disk never refused the second time");
    std::fs::remove_file(&filler).unwrap();
    let r = s.access_token(&task_token, "github", Some("read")).await;
    assert_eq!(r.status, 200, "{}", r.text);
    s.stop().await;
    drop(fs);
}
