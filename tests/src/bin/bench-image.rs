//! Flashing benchmark (issue 9): a 4 GiB appliance image with about a quarter of it mapped,
//! written by `atlasmesh image flash`, by Debian's `bmaptool copy` (with our bmap) and by `dd`,
//! onto the same targets in the same run.
//!
//! The image is built by the release `atlasmesh image build` from a tree of incompressible
//! files sized so that about 1 GiB of the 4 GiB is mapped. Targets, each written by every tool
//! in turn:
//! - **block**: a loop device over a file on this machine's disk (a disk in a USB/SATA dock is
//!   a block device too), needs root;
//! - **block-direct**: the same over a second file, with the loop device doing direct I/O on
//!   it (`losetup --direct-io=on`): every read-back then comes from the disk, as from a disk in
//!   a dock, where on **block** it comes from the backing file's page cache;
//! - **file**: a regular file on the same disk, recreated before every run.
//!
//! Before every run the page cache is dropped (`sync; echo 3 > /proc/sys/vm/drop_caches`, as
//! root), so each tool reads the image from disk like a first flash does, and the bench waits
//! 15 s first (`BENCH_SETTLE=s` for another pause): on this virtual machine the host's disk
//! goes on with a run's writes after the run has synced, a tool that reads back what it wrote
//! suffers more from that than one that only writes, and a field engineer's flash starts on
//! a quiet disk (docs/benchmarks.md, 2026-11-25). Each tool runs 6 times per target
//! (`BENCH_ROUNDS=n` for more): dd last in each round, the tools before it in every order in
//! turn, so that each comes right after dd equally often. The table shows the median wall
//! time of the whole command (including its final sync) and the image size divided by it.
//! Our flash also checks the signed manifest and every mapped block (on a device before
//! writing; in a file what was written, while it syncs) and reads every written range back
//! (from a device itself; from a file as the file system returns it, and from the disk too in
//! a second row, `--verify-on-disk`); bmaptool checks block checksums while writing; dd
//! checks nothing.
//!
//! `dd if=IMG of=TARGET bs=4M conv=fsync` is how images are commonly flashed without a bmap.
//!
//! Run: `cargo build --release --workspace --bins && target/release/bench-image [block]
//! [block-direct] [file]` (all targets unless named). Prints Markdown for docs/benchmarks.md; progress goes to
//! stderr.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use atlasmesh_tests::bench::{build_release, machine, sh, work_dir};
use atlasmesh_tests::ota::{Fleet, s};
use atlasmesh_tests::{atlasmesh, run};

const MIB: u64 = 1 << 20;
/// Rounds per target unless `BENCH_ROUNDS` says, rounded up to a multiple of the number of
/// orders of the tools before dd (2 on a device, 6 into a file). More rounds steady the
/// medians on a noisy host.
const ROUNDS: usize = 6;
/// Seconds of quiet before each run unless `BENCH_SETTLE` says (see the module docs).
const SETTLE_SECS: u64 = 15;
/// Slot and data sizes that make a 4 GiB image: 1 + 64 + 2 × 1600 + 830 + 1 MiB.
const ROOT_MIB: u64 = 1600;
const DATA_MIB: u64 = 830;
/// Incompressible content per root slot; with the file systems' metadata and journals about
/// a quarter of the image is mapped.
const TREE_MIB: u64 = 520;

fn main() -> Result<()> {
    let rounds = env_number("BENCH_ROUNDS", ROUNDS, |n| n > 0, "a positive number")?;
    let settle = Duration::from_secs(env_number(
        "BENCH_SETTLE",
        SETTLE_SECS,
        |_| true,
        "a number of seconds",
    )?);
    build_release()?;
    let work = work_dir()?;
    let dir = work.path();
    eprintln!("building the image in {}", dir.display());
    let fleet = Fleet::new()?;
    let rootfs = dir.join("rootfs");
    write_tree(&rootfs)?;
    let image = dir.join("depot.img");
    let (status, stdout, stderr) = run(atlasmesh()
        .args([
            "image",
            "build",
            "--rootfs",
            s(&rootfs),
            "--out",
            s(&image),
            "--key",
        ])
        .arg(fleet.keys.join("targets.pem"))
        .args([
            "--root-size",
            &format!("{ROOT_MIB}MiB"),
            "--data-size",
            &format!("{DATA_MIB}MiB"),
        ]))?;
    if !status.success() {
        bail!("image build failed: {stderr}");
    }
    eprint!("{stdout}");
    std::fs::remove_dir_all(&rootfs)?;
    let manifest: serde_json::Value =
        serde_json::from_slice(&std::fs::read(format!("{}.manifest", image.display()))?)?;
    let size = manifest["signed"]["image_size"]
        .as_u64()
        .context("image size")?;
    let mapped = manifest["signed"]["mapped_bytes"]
        .as_u64()
        .context("mapped bytes")?;
    let bmap = PathBuf::from(format!("{}.bmap", image.display()));
    let root = fleet.root();

    // Arguments, if any, pick targets: `block`, `file`.
    let wanted: Vec<String> = std::env::args().skip(1).collect();
    let wants = |name: &str| wanted.is_empty() || wanted.iter().any(|w| w == name);
    let mut targets: Vec<(&str, Target)> = Vec::new();
    if wants("block") {
        match LoopTarget::new(&dir.join("disk.img"), size, false) {
            Ok(dev) => targets.push(("block (loop)", Target::Block(dev))),
            Err(e) => eprintln!("note: no block-device target: {e:#}"),
        }
    }
    if wants("block-direct") {
        match LoopTarget::new(&dir.join("disk-direct.img"), size, true) {
            Ok(dev) => targets.push(("block (loop, direct I/O)", Target::Block(dev))),
            Err(e) => eprintln!("note: no direct block-device target: {e:#}"),
        }
    }
    if wants("file") {
        targets.push(("file", Target::File(dir.join("target.img"))));
    }

    let flash = |t: &Path, extra: &[&str]| {
        let mut cmd = atlasmesh();
        cmd.args([
            "image",
            "flash",
            "--image",
            s(&image),
            "--device",
            s(t),
            "--root",
            s(&root),
        ]);
        cmd.args(extra);
        cmd
    };
    let ours: Tool<'_> = ("`atlasmesh image flash`", &|t: &Path| flash(t, &[]));
    // Into a file, also with the read-back from the disk that is an option there (on a
    // device it is always done).
    let ours_on_disk: Tool<'_> = ("`atlasmesh image flash --verify-on-disk`", &|t: &Path| {
        flash(t, &["--verify-on-disk"])
    });
    let bmaptool: Tool<'_> = ("`bmaptool copy` (Debian)", &|t: &Path| {
        let mut cmd = Command::new("bmaptool");
        cmd.args(["copy", "--bmap", s(&bmap), s(&image), s(t)]);
        cmd
    });
    // Last in every list: the others' speeds are given relative to it.
    let dd: Tool<'_> = ("`dd bs=4M conv=fsync`", &|t: &Path| {
        let mut cmd = Command::new("dd");
        cmd.args([
            &format!("if={}", image.display()),
            &format!("of={}", t.display()),
            "bs=4M",
            "conv=fsync",
        ]);
        cmd
    });

    println!("### Flashing a 4 GiB image (issue 9)\n");
    println!("{}\n", machine());
    let settle_note = if settle.is_zero() {
        String::new()
    } else {
        format!("{} s of quiet and ", settle.as_secs())
    };
    println!(
        "Image: {} with {} mapped ({:.1} %), built by `atlasmesh image build`. {}. {}. \
         Median of {rounds} runs (or the next multiple of the orders) per tool and target, \
         {settle_note}page cache dropped before each; dd last in each round, the others in every \
         order in turn.\n",
        gib(size),
        gib(mapped),
        mapped as f64 * 100.0 / size as f64,
        sh("dd --version | head -1"),
        sh("bmaptool --version 2>&1 | head -1"),
    );
    println!("| target | tool | median time | speed (image size / time) | vs dd | runs (s) |");
    println!("|---|---|---:|---:|---:|---|");
    for (target_name, target) in &targets {
        let tools = match target {
            Target::Block(_) => vec![ours, bmaptool, dd],
            Target::File(_) => vec![ours, ours_on_disk, bmaptool, dd],
        };
        let mut times: Vec<Vec<Duration>> = vec![Vec::new(); tools.len()];
        // dd runs last in every round, and the tools before it take every order in turn. A
        // run right after dd's 4 GiB write is slower on this host (its disk is still busy with
        // it for several seconds, and a later run can catch the rest), so each tool must come
        // after dd, and after each other, equally often: rotating one order (as this bench did
        // until 2026-11-24T22:30Z) put our flash right after dd in two rounds of three.
        let dd_index = tools.len() - 1;
        let orders = permutations(dd_index);
        for round in 0..rounds.next_multiple_of(orders.len()) {
            let order = orders[round % orders.len()].iter().copied();
            for i in order.chain([dd_index]) {
                let (name, make) = &tools[i];
                let path = target.prepare()?;
                std::thread::sleep(settle);
                drop_caches();
                let started = Instant::now();
                let out = make(&path)
                    .output()
                    .with_context(|| format!("running {name}"))?;
                let elapsed = started.elapsed();
                if !out.status.success() {
                    bail!(
                        "{name} failed on {target_name}: {}",
                        String::from_utf8_lossy(&out.stderr)
                    );
                }
                // Our flash reports its phases on its speed line ("checked in …, then
                // written, synced and verified in …"); kept in the log to show where the time
                // goes.
                let phases = String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .find(|l| l.trim_start().starts_with("speed"))
                    .map(|l| format!(" ({})", l.trim()))
                    .unwrap_or_default();
                eprintln!(
                    "{target_name} round {round}: {name} {:.2} s{phases}",
                    elapsed.as_secs_f64()
                );
                times[i].push(elapsed);
            }
        }
        let medians: Vec<Duration> = times.iter().map(|t| median(t)).collect();
        let dd = medians[tools.len() - 1];
        for (i, (name, _)) in tools.iter().enumerate() {
            let runs: Vec<String> = times[i]
                .iter()
                .map(|t| format!("{:.2}", t.as_secs_f64()))
                .collect();
            println!(
                "| {target_name} | {name} | {:.2} s | {:.0} MB/s | {:.1}× | {} |",
                medians[i].as_secs_f64(),
                size as f64 / medians[i].as_secs_f64() / 1e6,
                dd.as_secs_f64() / medians[i].as_secs_f64(),
                runs.join(", ")
            );
        }
    }
    println!();
    Ok(())
}

fn gib(bytes: u64) -> String {
    format!("{:.2} GiB", bytes as f64 / (1u64 << 30) as f64)
}

fn median(times: &[Duration]) -> Duration {
    let mut sorted = times.to_vec();
    sorted.sort();
    sorted[sorted.len() / 2]
}

fn drop_caches() {
    // Needs root; elsewhere the runs read a warm cache, which the table would not say.
    let _ = Command::new("sync").status();
    if std::fs::write("/proc/sys/vm/drop_caches", "3\n").is_err() {
        eprintln!("note: cannot drop the page cache (not root)");
    }
}

/// Files of pseudo-random bytes (incompressible, so nothing dedups them), 8 MiB each.
fn write_tree(root: &Path) -> Result<()> {
    let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut buf = vec![0u8; 8 * MIB as usize];
    for n in 0..TREE_MIB / 8 {
        let dir = root.join(format!("usr/share/blob{}", n % 8));
        std::fs::create_dir_all(&dir)?;
        for chunk in buf.chunks_exact_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            chunk.copy_from_slice(&x.to_le_bytes());
        }
        std::fs::write(dir.join(format!("file{n}")), &buf)?;
    }
    Ok(())
}

/// Makes the command that writes the image onto a target path.
type CommandFor<'a> = dyn Fn(&Path) -> Command + 'a;
/// A tool's name in the table and how to run it.
type Tool<'a> = (&'static str, &'a CommandFor<'a>);

enum Target {
    File(PathBuf),
    Block(LoopTarget),
}

impl Target {
    /// The path to write, fresh: a new empty file, or the same loop device.
    fn prepare(&self) -> Result<PathBuf> {
        match self {
            Target::File(path) => {
                let _ = std::fs::remove_file(path);
                Ok(path.clone())
            }
            Target::Block(dev) => Ok(dev.path.clone()),
        }
    }
}

struct LoopTarget {
    path: PathBuf,
}

impl LoopTarget {
    /// `direct`: the loop device reads and writes its backing file with direct I/O, as a disk
    /// in a dock would be read and written. Without it the backing file's page cache sits
    /// under the device: what was written and flushed is still cached, so every tool's writes
    /// go to the disk but a read-back of them (ours) comes from memory.
    fn new(backing: &Path, size: u64, direct: bool) -> Result<Self> {
        // Fully allocated, so the device's writes are not file-system allocations.
        let status = Command::new("fallocate")
            .args(["-l", &(size + 64 * MIB).to_string(), s(backing)])
            .status()?;
        if !status.success() {
            bail!("fallocate failed");
        }
        let out = Command::new("losetup")
            .args([
                "-f",
                "--show",
                if direct {
                    "--direct-io=on"
                } else {
                    "--direct-io=off"
                },
                s(backing),
            ])
            .output()?;
        if !out.status.success() {
            bail!("losetup: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(Self {
            path: PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()),
        })
    }
}

impl Drop for LoopTarget {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

/// The number the environment variable `name` holds, `default` when it is unset; an error
/// naming `what` it must be when it does not parse or `valid` refuses it.
fn env_number<T: std::str::FromStr + Copy>(
    name: &str,
    default: T,
    valid: impl Fn(T) -> bool,
    what: &str,
) -> Result<T> {
    match std::env::var(name) {
        Ok(v) => v
            .parse::<T>()
            .ok()
            .filter(|&n| valid(n))
            .with_context(|| format!("{name}={v} is not {what}")),
        Err(_) => Ok(default),
    }
}

/// Every order of `0..n`.
fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![Vec::new()];
    }
    let mut all = Vec::new();
    for shorter in permutations(n - 1) {
        for at in 0..=shorter.len() {
            let mut order = shorter.clone();
            order.insert(at, n - 1);
            all.push(order);
        }
    }
    all
}
