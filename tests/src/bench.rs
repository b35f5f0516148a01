//! What the bench binaries (`src/bin/bench-*.rs`) share: one release build of the binary they
//! drive, a description of the machine for docs/benchmarks.md, and process accounting from
//! `/proc`.

use std::path::PathBuf;
use std::process::Command;

use anyhow::{Result, bail};

use crate::workspace_root;

/// Builds every binary in release mode (a no-op after `cargo build --release --workspace
/// --bins`) and makes the harness start the release `atlasmesh`.
pub fn build_release() -> Result<()> {
    let status = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .current_dir(workspace_root())
        .args(["build", "--release", "--quiet", "--workspace", "--bins"])
        .status()?;
    if !status.success() {
        bail!("building the release binary failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    crate::use_binary(target.join("release/atlasmesh"));
    Ok(())
}

/// Output of a shell command, trimmed; empty if it failed.
pub fn sh(cmd: &str) -> String {
    Command::new("sh")
        .args(["-c", cmd])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// One line naming the machine and the time, for the top of a benchmark's output.
pub fn machine() -> String {
    format!(
        "Machine: {} ({} cores), {} RAM, kernel {}, {} on `{}`; measured {}.",
        sh("lscpu | sed -n 's/^Model name: *//p' | head -1"),
        sh("nproc"),
        sh("free -h | awk '/Mem:/ {print $2}'"),
        sh("uname -r"),
        sh("df -h --output=fstype . | tail -1"),
        sh("df --output=source . | tail -1"),
        sh("date -u +%Y-%m-%dT%H:%MZ"),
    )
}

/// A scratch directory under `target/` (on the disk being measured, not a tmpfs).
pub fn work_dir() -> Result<tempfile::TempDir> {
    let base = workspace_root().join("target/bench-work");
    std::fs::create_dir_all(&base)?;
    Ok(tempfile::tempdir_in(base)?)
}

/// User plus system CPU time of processes, in seconds.
pub fn cpu_seconds(pids: &[u32]) -> f64 {
    let ticks = pids
        .iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .filter_map(|stat| {
            // Fields after the command name (which may hold spaces) start at ") ".
            let rest = &stat[stat.rfind(") ")? + 2..];
            let fields: Vec<&str> = rest.split_whitespace().collect();
            Some(fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?)
        })
        .sum::<u64>();
    ticks as f64 / 100.0
}

/// Direct children of a process.
pub fn children(pid: u32) -> Vec<u32> {
    std::fs::read_to_string(format!("/proc/{pid}/task/{pid}/children"))
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|p| p.parse().ok())
        .collect()
}

/// Peak resident set size (VmHWM) of a process, KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}
