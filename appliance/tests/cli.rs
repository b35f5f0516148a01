//! The command line as a newcomer meets it. (Having an integration test here also makes
//! `cargo test` build the `atlasmesh` binary that the end-to-end suite in `tests/` drives.)

use std::process::Command;

fn atlasmesh() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_atlasmesh"));
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ATLASMESH_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

#[test]
fn help_explains_the_modes_and_tools() {
    let out = atlasmesh().arg("--help").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    for word in [
        "depot",
        "cloud",
        "token",
        "backup",
        "restore",
        "--print-config",
    ] {
        assert!(text.contains(word), "--help should mention {word}:\n{text}");
    }
}

#[test]
fn every_subcommand_has_help() {
    for sub in [
        &["depot"][..],
        &["cloud"],
        &["token", "create"],
        &["backup"],
        &["restore"],
    ] {
        let out = atlasmesh().args(sub).arg("--help").output().unwrap();
        assert!(out.status.success(), "{sub:?} --help failed");
        assert!(!out.stdout.is_empty());
    }
}

#[test]
fn unknown_subcommands_and_flags_are_usage_errors() {
    let out = atlasmesh().arg("frobnicate").output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = atlasmesh()
        .args(["depot", "--no-such-flag"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let out = atlasmesh()
        .args(["token", "create", "--role", "wizard"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
