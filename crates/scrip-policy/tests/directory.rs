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
    assert!(nested_files(d).is_empty(), "{:?}", nested_files(d));
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
    assert_eq!(nested_files(d), vec![d.join("a/b/c/d/schema.cedarschema")]);
    // Moved up, it is read.
    std::fs::remove_dir_all(d.join("a")).unwrap();
    write(d, "none.cedar", FORBID);
    assert_eq!(PolicyEngine::load(d).unwrap().len(), 2);
}

/// A link in the directory to another directory is followed (its files
/// would not be read either); one back to the directory itself, or links
/// below, are not: the walk ends, and lists nothing twice.
#[test]
fn links_to_directories_are_followed_from_the_directory_only() {
    let dir = tempfile::tempdir().unwrap();
    let elsewhere = tempfile::tempdir().unwrap();
    let d = dir.path();
    write(d, "all.cedar", PERMIT);
    std::os::unix::fs::symlink(d, d.join("back")).unwrap();
    std::fs::create_dir(d.join("loop")).unwrap();
    std::os::unix::fs::symlink(d, d.join("loop/back")).unwrap();
    std::os::unix::fs::symlink(elsewhere.path(), d.join("loop/out")).unwrap();
    write(elsewhere.path(), "none.cedar", FORBID);
    assert!(nested_files(d).is_empty(), "{:?}", nested_files(d));
    assert_eq!(PolicyEngine::load(d).unwrap().len(), 1);
    std::os::unix::fs::symlink(elsewhere.path(), d.join("team")).unwrap();
    assert_eq!(refused_for(d), d.join("team/none.cedar"));
}
