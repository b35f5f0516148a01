//! OTA benchmarks, each beside its baseline in the same run, on this machine:
//!
//! - serve: 64 concurrent clients pulling random 4 MiB ranges of a 1 GiB staged image from the
//!   depot, and from nginx (sendfile on) serving the same file; one client, wrk, for both.
//! - stage: staging a 2 GiB image from a directory, against `sha256sum` of the same file.
//! - delta: a vehicle holding v1 pulls v2 (about 5 % changed, with insertions that shift
//!   offsets): bytes fetched against the bytes of chunks that really changed.
//!
//! Run: `cargo build --release --workspace --bins && target/release/bench-ota [serve|stage|delta]...`
//! (one build for the benchmark and the binary it drives, so neither rebuilds the other).
//! Needs wrk and nginx (`apt-get install wrk nginx-light`). Prints Markdown for
//! docs/benchmarks.md.

use std::collections::HashSet;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use atlasmesh_tests::bench::{
    build_release, children, cpu_seconds, machine, peak_rss_kib, work_dir,
};
use atlasmesh_tests::metric_sum;
use atlasmesh_tests::ota::{Fleet, OtaDepot, Vehicle, random_bytes, s};
use rand::{Rng, SeedableRng};
use serde_json::Value;

const MIB: usize = 1024 * 1024;
const HW: &str = "bench-hw";

fn main() -> Result<()> {
    let which: Vec<String> = std::env::args().skip(1).collect();
    let all = which.is_empty();
    build_release()?;
    println!("## OTA benchmarks\n");
    println!("{}\n", machine());
    if all || which.iter().any(|w| w == "serve") {
        serve()?;
    }
    if all || which.iter().any(|w| w == "stage") {
        stage()?;
    }
    if all || which.iter().any(|w| w == "delta") {
        delta()?;
    }
    Ok(())
}

/// Writes `len` pseudo-random bytes to `path` without holding them all in memory.
fn write_random(path: &Path, len: usize, seed: u64) -> Result<()> {
    use std::io::Write;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut file = std::io::BufWriter::new(std::fs::File::create(path)?);
    let mut block = vec![0u8; 4 * MIB];
    let mut left = len;
    while left > 0 {
        let n = left.min(block.len());
        rng.fill(&mut block[..n]);
        file.write_all(&block[..n])?;
        left -= n;
    }
    file.flush()?;
    Ok(())
}

fn add_release(fleet: &Fleet, image: &Path, version: &str) -> Result<Value> {
    atlasmesh_tests::ota::release(&[
        "add",
        "--keys",
        s(&fleet.keys),
        "--repo",
        s(&fleet.repo),
        "--image",
        s(image),
        "--version",
        version,
        "--hardware",
        HW,
    ])
}

const ROUNDS: u32 = 5;
const SECONDS: u32 = 8;

struct Nginx {
    child: std::process::Child,
    port: u16,
}

impl Nginx {
    fn start(root: &Path, dir: &Path) -> Result<Self> {
        let port = atlasmesh_tests::free_port();
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "user root;\nworker_processes 2;\ndaemon off;\npid {dir}/nginx.pid;\nerror_log {dir}/nginx-error.log;\n\
                 events {{ worker_connections 1024; }}\n\
                 http {{ sendfile on; tcp_nopush on; access_log off; keepalive_requests 1000000;\n\
                 client_body_temp_path {dir}; proxy_temp_path {dir}; fastcgi_temp_path {dir}; uwsgi_temp_path {dir}; scgi_temp_path {dir};\n\
                 types {{ application/octet-stream img; }}\n\
                 server {{ listen 127.0.0.1:{port}; root {root}; location / {{ }} }} }}\n",
                dir = dir.display(),
                root = root.display(),
            ),
        )?;
        let child = Command::new("nginx")
            .args(["-c", s(&conf)])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting nginx (apt-get install nginx-light)")?;
        for _ in 0..100 {
            if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
                return Ok(Self { child, port });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!("nginx did not start; see {}/nginx-error.log", dir.display())
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        // SIGTERM, not SIGKILL: the master then stops its workers instead of orphaning them.
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
    }
}

/// wrk with 64 connections, each request a random 4 MiB range; returns bytes per second.
fn wrk(url: &str, size: u64, seconds: u32, dir: &Path) -> Result<f64> {
    let script = dir.join("ranges.lua");
    std::fs::write(
        &script,
        format!(
            "local counter = 1\n\
             function setup(thread) thread:set(\"id\", counter); counter = counter + 1 end\n\
             function init(args) math.randomseed(id * 7919) end\n\
             local size, len = {size}, {len}\n\
             request = function()\n\
               local start = math.random(0, size - len)\n\
               return wrk.format(\"GET\", nil, {{[\"Range\"] = \"bytes=\" .. start .. \"-\" .. (start + len - 1)}})\n\
             end\n",
            len = 4 * MIB
        ),
    )?;
    let out = Command::new("wrk")
        .args([
            "-t2",
            "-c64",
            &format!("-d{seconds}s"),
            "--timeout",
            "30s",
            "-s",
            s(&script),
            url,
        ])
        .output()
        .context("running wrk (apt-get install wrk)")?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text
        .lines()
        .find(|l| l.starts_with("Transfer/sec:"))
        .with_context(|| format!("no Transfer/sec in wrk output:\n{text}"))?;
    let value = line
        .split_whitespace()
        .nth(1)
        .context("wrk transfer rate")?;
    let (number, unit) = value.split_at(
        value
            .find(|c: char| c.is_ascii_alphabetic())
            .unwrap_or(value.len()),
    );
    let scale = match unit {
        "GB" => 1024.0 * 1024.0 * 1024.0,
        "MB" => 1024.0 * 1024.0,
        "KB" => 1024.0,
        _ => 1.0,
    };
    if text.contains("Non-2xx") {
        bail!("wrk saw errors:\n{text}");
    }
    Ok(number.parse::<f64>()? * scale)
}

fn serve() -> Result<()> {
    let dir = work_dir()?;
    let size = 1024 * MIB;
    let fleet = Fleet::new()?;
    let image = dir.path().join("serve.img");
    write_random(&image, size, 1)?;
    add_release(&fleet, &image, "1.0.0")?;
    let depot = OtaDepot::start(&fleet, &[])?;
    let job = depot.stage_dir(&fleet.repo, HW, "1.0.0")?;
    let sha = depot.get("/api/v1/images/1.0.0")?["sha256"]
        .as_str()
        .context("sha")?
        .to_owned();
    if job["state"] != "staged" {
        bail!("staging for the serve benchmark failed: {job}");
    }
    let images = depot.server.data_dir.join("ota/store/images");
    let nginx = Nginx::start(&images, dir.path())?;
    let depot_url = depot.url(&format!("/images/{sha}.img"));
    let nginx_url = format!("http://127.0.0.1:{}/{sha}.img", nginx.port);
    // Warm the page cache, so both read the file from memory, and each server (connections,
    // worker threads, allocator) before its first measured round.
    wrk(&nginx_url, size as u64, 3, dir.path())?;
    wrk(&depot_url, size as u64, 3, dir.path())?;
    let mut depot_rates = Vec::new();
    let mut nginx_rates = Vec::new();
    // Server CPU seconds, to report CPU per GiB sent: with client and server on two cores the
    // client is the bottleneck, and a server's throughput is what its CPU use leaves the client.
    let (mut depot_cpu, mut nginx_cpu) = (0.0, 0.0);
    let nginx_pids = || {
        let mut pids = vec![nginx.child.id()];
        pids.extend(children(nginx.child.id()));
        pids
    };
    for _ in 0..ROUNDS {
        let before = cpu_seconds(&nginx_pids());
        nginx_rates.push(wrk(&nginx_url, size as u64, SECONDS, dir.path())?);
        nginx_cpu += cpu_seconds(&nginx_pids()) - before;
        let before = cpu_seconds(&[depot.server.pid()]);
        depot_rates.push(wrk(&depot_url, size as u64, SECONDS, dir.path())?);
        depot_cpu += cpu_seconds(&[depot.server.pid()]) - before;
    }
    let rss_mib = peak_rss_kib(depot.server.pid()) as f64 / 1024.0;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    // The median is the headline: one round disturbed by the machine (the two servers share
    // two cores with the client) moves it less than the mean. Both are printed.
    let median = |v: &[f64]| {
        let mut v = v.to_vec();
        v.sort_by(f64::total_cmp);
        let mid = v.len() / 2;
        if v.len().is_multiple_of(2) {
            (v[mid - 1] + v[mid]) / 2.0
        } else {
            v[mid]
        }
    };
    let (d, n) = (median(&depot_rates), median(&nginx_rates));
    let (dm, nm) = (mean(&depot_rates), mean(&nginx_rates));
    println!(
        "### serve: 64 clients, random 4 MiB ranges of a 1 GiB staged image (wrk, {ROUNDS} x {SECONDS} s each, alternating, after a warm-up of each)\n"
    );
    println!(
        "| server | throughput (MiB/s) per run | median (MiB/s) | mean (MiB/s) | server CPU s per GiB |\n| --- | --- | --- | --- | --- |"
    );
    let runs = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{:.0}", r / MIB as f64))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let gib = |rate: f64| rate * f64::from(SECONDS * ROUNDS) / (1024.0 * MIB as f64);
    println!(
        "| nginx 1.22, sendfile on, 2 workers | {} | {:.0} | {:.0} | {:.3} |",
        runs(&nginx_rates),
        n / MIB as f64,
        nm / MIB as f64,
        nginx_cpu / gib(nm)
    );
    println!(
        "| atlasmesh depot | {} | {:.0} | {:.0} | {:.3} |",
        runs(&depot_rates),
        d / MIB as f64,
        dm / MIB as f64,
        depot_cpu / gib(dm)
    );
    println!(
        "\nRatio depot / nginx: **{:.2}** on medians, {:.2} on means (target at least 1.0). Depot peak RSS (VmHWM): **{rss_mib:.1} MiB** (target under 100 MiB).\n",
        d / n,
        dm / nm
    );
    Ok(())
}

fn stage() -> Result<()> {
    let dir = work_dir()?;
    let size = 2048 * MIB;
    let fleet = Fleet::new()?;
    let image = dir.path().join("stage.img");
    write_random(&image, size, 2)?;
    add_release(&fleet, &image, "1.0.0")?;
    let target = fleet.target_file(&format!("{HW}_1.0.0.img"));
    let sha256sum = |path: &Path| -> Result<f64> {
        let started = Instant::now();
        let status = Command::new("sha256sum")
            .arg(path)
            .stdout(Stdio::null())
            .status()?;
        if !status.success() {
            bail!("sha256sum failed");
        }
        Ok(started.elapsed().as_secs_f64())
    };
    sha256sum(&target)?; // warm the page cache for both
    let mut baseline = Vec::new();
    let mut staging = Vec::new();
    for _ in 0..2 {
        baseline.push(sha256sum(&target)?);
        let depot = OtaDepot::start(&fleet, &[])?;
        let job = depot.stage_dir(&fleet.repo, HW, "1.0.0")?;
        if job["state"] != "staged" {
            bail!("staging failed: {job}");
        }
        let ms = job["finished_at"].as_i64().context("finished_at")?
            - job["started_at"].as_i64().context("started_at")?;
        staging.push(ms as f64 / 1000.0);
    }
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let (st, base) = (mean(&staging), mean(&baseline));
    println!("### stage: a 2 GiB image from a local directory (2 runs each, page cache warm)\n");
    println!("| | runs (s) | mean (s) | MiB/s |\n| --- | --- | --- | --- |");
    let runs = |v: &[f64]| {
        v.iter()
            .map(|r| format!("{r:.2}"))
            .collect::<Vec<_>>()
            .join(", ")
    };
    println!(
        "| `sha256sum` (coreutils) | {} | {base:.2} | {:.0} |",
        runs(&baseline),
        2048.0 / base
    );
    println!(
        "| atlasmesh staging (TUF verification, SHA-256 + FastCDC + per-chunk SHA-256 in one pass, write, fsync, publish) | {} | {st:.2} | {:.0} |",
        runs(&staging),
        2048.0 / st
    );
    println!(
        "\nRatio staging / sha256sum: **{:.2}** (target at most 1.25).\n",
        st / base
    );
    Ok(())
}

fn served_bytes(depot: &OtaDepot) -> Result<u64> {
    let text = depot.server.metrics()?;
    Ok(metric_sum(&text, "atlasmesh_ota_served_bytes_total", &[]) as u64)
}

fn chunk_set(fleet: &Fleet, version: &str) -> Result<Vec<(String, u64)>> {
    let index: Value = serde_json::from_slice(&std::fs::read(
        fleet.target_file(&format!("{HW}_{version}.chunks.json")),
    )?)?;
    Ok(index["chunks"]
        .as_array()
        .context("chunks")?
        .iter()
        .map(|c| {
            (
                c["sha256"].as_str().unwrap_or_default().to_owned(),
                c["length"].as_u64().unwrap_or(0),
            )
        })
        .collect())
}

fn delta() -> Result<()> {
    let dir = work_dir()?;
    let size = 256 * MIB;
    let v1 = random_bytes(size, 3);
    // About 5 % changed: 100 rewritten regions of 128 KiB, and 10 insertions of 8 KiB that
    // shift every offset after them.
    let mut rng = rand::rngs::StdRng::seed_from_u64(4);
    let mut v2 = v1.clone();
    let mut modified = 0usize;
    for _ in 0..100 {
        let at = rng.random_range(0..v2.len() - 128 * 1024);
        rng.fill(&mut v2[at..at + 128 * 1024]);
        modified += 128 * 1024;
    }
    for _ in 0..10 {
        let at = rng.random_range(0..v2.len());
        let inserted = random_bytes(8 * 1024, rng.random());
        v2.splice(at..at, inserted);
        modified += 8 * 1024;
    }
    let fleet = Fleet::new()?;
    let v1_path = dir.path().join("v1.img");
    std::fs::write(&v1_path, &v1)?;
    let v2_path = dir.path().join("v2.img");
    std::fs::write(&v2_path, &v2)?;
    add_release(&fleet, &v1_path, "1.0.0")?;
    add_release(&fleet, &v2_path, "1.1.0")?;
    let depot = OtaDepot::start(&fleet, &[])?;
    for v in ["1.0.0", "1.1.0"] {
        let job = depot.stage_dir(&fleet.repo, HW, v)?;
        if job["state"] != "staged" {
            bail!("staging {v} failed: {job}");
        }
    }
    depot.certify(&fleet)?;
    depot.assign("bench-vehicle", "1.1.0")?;
    let known: HashSet<String> = chunk_set(&fleet, "1.0.0")?
        .into_iter()
        .map(|(h, _)| h)
        .collect();
    let changed: u64 = chunk_set(&fleet, "1.1.0")?
        .into_iter()
        .filter(|(h, _)| !known.contains(h))
        .map(|(_, l)| l)
        .sum();

    let vehicle = Vehicle::new(dir.path(), "bench-vehicle", &fleet, &v1)?;
    let before = served_bytes(&depot)?;
    let (status, report) = vehicle.pull(&depot, &[])?;
    let after = served_bytes(&depot)?;
    if !status.success() {
        bail!("pull failed: {report}");
    }
    if std::fs::read(&vehicle.slot)? != v2 {
        bail!("the pulled slot differs from v2");
    }
    let fetched_all = after - before;
    let fetched_chunks = report["bytes_fetched"].as_u64().unwrap_or(0);
    let full = v2.len() as u64;
    println!(
        "### delta: v1 256 MiB, v2 with about 5 % changed (100 x 128 KiB rewritten, 10 x 8 KiB inserted)\n"
    );
    println!("| measure | bytes | share |\n| --- | --- | --- |");
    println!(
        "| bytes really modified (rewritten + inserted) | {modified} | {:.2} % of v2 |",
        modified as f64 * 100.0 / full as f64
    );
    println!(
        "| v2 chunks not in v1 (FastCDC 16/64/256 KiB) | {changed} | {:.2} % of v2 |",
        changed as f64 * 100.0 / full as f64
    );
    println!(
        "| chunk bytes the vehicle fetched | {fetched_chunks} | {:.2} % of v2 |",
        fetched_chunks as f64 * 100.0 / full as f64
    );
    println!(
        "| everything the depot served it (TUF metadata, certificate, chunk index, chunks) | {fetched_all} | {:.2} % of v2 |",
        fetched_all as f64 * 100.0 / full as f64
    );
    println!(
        "\nFetched / changed chunks: **{:.3}** (target at most 1.15); fetched / full image: **{:.3}**; fetched / bytes really modified: {:.2}. Reused from the running slot: {} chunks, {} bytes. Pull took {:.1} s.\n",
        fetched_all as f64 / changed as f64,
        fetched_all as f64 / full as f64,
        fetched_all as f64 / modified as f64,
        report["chunks_reused"],
        report["bytes_reused"],
        report["seconds"].as_f64().unwrap_or(0.0),
    );
    Ok(())
}
