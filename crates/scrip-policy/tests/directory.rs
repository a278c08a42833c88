//! What of a policy directory is read: its own `*.cedar` files and its one
//! `*.cedarschema`. A policy file put below a subdirectory is not read, so
//! a set with one is refused rather than run without it (a `forbid` kept in
//! `policies/team/` would never apply); hidden directories (a ConfigMap's
//! `..data`, a checkout's `.git`) are passed over.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use std::path::Path;

use scrip_policy::{PolicyEngine, PolicyError, nested_files};

const PERMIT: &str = "@id(\"all\") permit (principal, action, resource);";
const FORBID: &str = "@id(\"none\") forbid (principal, action, resource);";

fn write(dir: &Path, name: &str, text: &str) {
    let path = dir.join(name);
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

fn refused_for(dir: &Path) -> std::path::PathBuf {
    match PolicyEngine::load(dir) {
        Err(PolicyError::Nested(path)) => path,
        Err(e) => panic!("refused for another reason: {e}"),
        Ok(_) => panic!("a set with a policy file in a subdirectory was loaded"),
    }
}

#[test]
fn a_policy_file_below_a_subdirectory_refuses_the_set() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "all.cedar", PERMIT);
    // Other files in subdirectories, and hidden directories, change nothing.
    write(d, "team/README.md", "notes");
    write(d, "team/all.test.toml", "");
    write(d, "..data/all.cedar", FORBID);
    write(d, ".git/objects/x.cedar", FORBID);
    assert!(
        nested_files(d).unwrap().is_empty(),
        "{:?}",
        nested_files(d).unwrap()
    );
    assert_eq!(PolicyEngine::load(d).unwrap().len(), 1);

    write(d, "team/none.cedar", FORBID);
    let path = refused_for(d);
    assert_eq!(path, d.join("team/none.cedar"));
    let message = PolicyError::Nested(path).to_string();
    assert!(message.contains("team/none.cedar"), "{message}");
    assert!(message.contains("does not read"), "{message}");
    // A schema there too; four levels down still counts.
    std::fs::remove_file(d.join("team/none.cedar")).unwrap();
    write(d, "a/b/c/d/schema.cedarschema", "");
    assert_eq!(refused_for(d), d.join("a/b/c/d/schema.cedarschema"));
    assert_eq!(
        nested_files(d).unwrap(),
        vec![d.join("a/b/c/d/schema.cedarschema")]
    );
    // Moved up, it is read.
    std::fs::remove_dir_all(d.join("a")).unwrap();
    write(d, "none.cedar", FORBID);
    assert_eq!(PolicyEngine::load(d).unwrap().len(), 2);
}

/// Links to directories are followed (their files would not be read
/// either), a directory listed once: a link back to the directory itself
/// finds nothing, and a loop ends.
#[test]
fn links_to_directories_are_followed_and_each_listed_once() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "all.cedar", PERMIT);
    std::os::unix::fs::symlink(d, d.join("back")).unwrap();
    std::fs::create_dir(d.join("loop")).unwrap();
    std::os::unix::fs::symlink(d, d.join("loop/back")).unwrap();
    std::os::unix::fs::symlink(d.join("loop"), d.join("loop/again")).unwrap();
    assert!(
        nested_files(d).unwrap().is_empty(),
        "{:?}",
        nested_files(d).unwrap()
    );
    assert_eq!(PolicyEngine::load(d).unwrap().len(), 1);
    // A link below the top, to a directory of its own.
    std::os::unix::fs::symlink(elsewhere.path(), d.join("loop/sub")).unwrap();
    write(elsewhere.path(), "none.cedar", FORBID);
    assert_eq!(refused_for(d), d.join("loop/sub/none.cedar"));
}

/// Past 10,000 entries below the subdirectories, what was not looked
/// through could hide a policy file: the set is refused.
#[test]
fn a_crowded_directory_refuses_the_set() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "all.cedar", PERMIT);
    std::fs::create_dir(d.join("vendor")).unwrap();
    for i in 0..9_998 {
        std::fs::write(d.join(format!("vendor/{i}")), "").unwrap();
    }
    // With the directory's own two entries, 10,000: still looked through.
    assert_eq!(PolicyEngine::load(d).unwrap().len(), 1);
    std::fs::write(d.join("vendor/one-more"), "").unwrap();
    match PolicyEngine::load(d) {
        Err(e @ PolicyError::Crowded(_)) => {
            assert!(e.to_string().contains("more than 10,000 entries"), "{e}");
        }
        other => panic!("{other:?}"),
    }
}

/// A directory reached both as a subdirectory and, deeper, through a link
/// is walked from where it is nearest: what lies below it within four
/// levels of the directory is found, whichever is listed first.
#[test]
fn a_directory_linked_from_deeper_down_is_walked_from_where_it_is_nearest() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "all.cedar", PERMIT);
    write(d, "team/sub/none.cedar", FORBID);
    for top in ["aa", "zz"] {
        std::fs::create_dir_all(d.join(format!("{top}/a/b"))).unwrap();
        std::os::unix::fs::symlink(d.join("team"), d.join(format!("{top}/a/b/cur"))).unwrap();
    }
    assert_eq!(
        nested_files(d).unwrap(),
        vec![d.join("team/sub/none.cedar")]
    );
}
