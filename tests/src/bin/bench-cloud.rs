//! Cloud federation benchmark (issue 8): a fleet of depots syncing into one cloud on
//! PostgreSQL, and one depot draining a day's backlog.
//!
//! The cloud is the release `atlasmesh cloud` binary on a PostgreSQL database (or, for a second
//! drain row, its default SQLite store). The depots are simulated in this process: each is the
//! real sync client of `atlasmesh-cloud-sync` (`client::enroll`, then `client::run`, over gRPC
//! with mutual TLS, with the appliance's client options) over an in-memory `DepotSide` holding
//! its reported objects and its outbox.
//!
//! - **fleet**: 1,000 depots each enrol with their own one-time token (minted through the fleet
//!   API; 32 enrolments at a time), then all open their sessions at once and sync 100 reported
//!   objects and 1,000 events. Timed from the first session start until the cloud has
//!   acknowledged every depot's last event (the client's `outbox_acked` callback) and every
//!   reported row is stored. Then PostgreSQL is asked whether exactly 1,000,000 events and
//!   100,000 reported rows are stored, each once.
//! - **drain**: one depot connects with 100,000 events (24 hours of a busy depot) already in
//!   its outbox; timed from session start to the acknowledgement of the last one.
//!
//! Baseline (the issue names none): the floor of the same work, the same event and reported
//! rows written into the same tables (the cloud's own PostgreSQL migrations) by plain
//! multi-row INSERTs of 500 rows over one sqlx pool of 8 connections (the cloud's pool size),
//! with no gRPC, TLS, session or dedup.
//!
//! PostgreSQL: `ATLASMESH_BENCH_POSTGRES_URL` (an admin URL; the bench creates and drops its
//! own databases) or else a throwaway cluster of Debian's PostgreSQL (`initdb` into a temporary
//! directory, stopped at the end), with the default settings (fsync and synchronous commit on).
//!
//! Run: `cargo build --release --workspace --bins && target/release/bench-cloud [fleet] [drain]`
//! (default both; `ATLASMESH_BENCH_DEPOTS=N` shrinks the fleet for a trial run). Prints
//! Markdown for docs/benchmarks.md; progress goes to stderr.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use atlasmesh_cloud_sync::client::{
    self, ClientOptions, Credentials, DepotSide, LinkState, OutboxEvent, OutboxStatus, Reported,
};
use atlasmesh_cloud_sync::desired::DesiredRevision;
use atlasmesh_cloud_sync::server::system_clock;
use atlasmesh_tests::bench::{build_release, children, cpu_seconds, machine, peak_rss_kib, sh};
use atlasmesh_tests::{Mode, Options, Server, atlasmesh, free_port, http, run, workspace_root};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use sqlx::{AssertSqlSafe, Row};
use tokio::runtime::Runtime;
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

const DEPOTS: usize = 1_000;
const EVENTS: u64 = 1_000;
const REPORTED: usize = 100;
const BACKLOG: u64 = 100_000;
const ENROL_AT_ONCE: usize = 32;
/// The sync client's batch (`client.rs`) and the cloud's PostgreSQL pool, for the baseline.
const BATCH: usize = 500;
const POOL: u32 = 8;
const FLEET_LIMIT: Duration = Duration::from_secs(20 * 60);
const DRAIN_LIMIT: Duration = Duration::from_secs(5 * 60);
const DAY_MS: i64 = 24 * 3600 * 1000;

fn main() -> Result<()> {
    let mut phases: Vec<String> = std::env::args().skip(1).collect();
    if phases.is_empty() {
        phases = vec!["fleet".into(), "drain".into()];
    }
    if let Some(bad) = phases.iter().find(|p| *p != "fleet" && *p != "drain") {
        bail!("unknown phase {bad:?}: use fleet and/or drain");
    }
    let depots: usize = match std::env::var("ATLASMESH_BENCH_DEPOTS") {
        Ok(n) => n.parse().context("ATLASMESH_BENCH_DEPOTS is a number")?,
        Err(_) => DEPOTS,
    };
    build_release()?;
    sqlx::any::install_default_drivers();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let pg = Postgres::start(&runtime)?;

    println!("{}\n", machine());
    println!(
        "PostgreSQL {} ({}; default settings: fsync and synchronous_commit on), on the same machine; \
         cloud, PostgreSQL and the simulated depots share its cores. Client options as the \
         appliance's (`ClientOptions::default()` with a 15 s report interval: events pushed \
         every 1 s, at most 2,000 unacknowledged, batches of 500); cloud defaults (poll interval \
         2 s, 8 PostgreSQL connections).\n",
        pg.version,
        if pg.own.is_some() {
            "a throwaway cluster started by the bench"
        } else {
            "ATLASMESH_BENCH_POSTGRES_URL"
        },
    );
    let result = phases.iter().try_for_each(|phase| match phase.as_str() {
        "fleet" => fleet(&pg, &runtime, depots),
        _ => drain(&pg, &runtime),
    });
    drop(pg);
    result
}

// ---------------------------------------------------------------------------------------------
// What the simulated depots hold

fn depot_name(i: usize) -> String {
    format!("depot-{i:04}")
}

fn hex_of(parts: &[&[u8]], len: usize) -> String {
    let mut hash = Sha256::new();
    for p in parts {
        hash.update(p);
    }
    hex::encode(hash.finalize())[..len].to_owned()
}

/// Event `seq` of depot `depot`: an id of 128 bits unique over the fleet (derived, so a resend
/// carries the same id), and a body like the appliance's outbox triggers write (about 200 bytes).
fn event(depot: &str, seq: u64, at_ms: i64) -> OutboxEvent {
    let id = hex_of(&[depot.as_bytes(), &seq.to_be_bytes()], 32);
    let vehicle = format!("veh-{:04}", seq % 40);
    let (kind, body) = match seq % 10 {
        0..=5 => (
            "audit",
            json!({
                "actor": "technician:j.moreau", "role": "technician", "action": "vehicle.bay",
                "target": vehicle, "result": "ok", "request_id": &id[..16], "via": "panel",
                "client": "10.20.0.15",
                "detail": {"from": format!("B{:02}", seq % 30), "to": format!("B{:02}", (seq + 7) % 30)},
            }),
        ),
        6 | 7 => (
            "ota_report",
            json!({
                "vehicle_id": vehicle, "hardware_id": "ecu-bus-v3", "version": "2.4.1", "phase": "installing",
                "outcome": null, "error": null, "vehicle_ts": at_ms - 850,
                "slot": "b", "progress": {"bytes": seq * 65_536 % 1_000_000_000, "of": 1_073_741_824u64},
            }),
        ),
        8 => (
            "rollout",
            json!({
                "rollout_id": 17 + seq / 1000, "seq": seq, "hash": hex_of(&[id.as_bytes()], 32),
                "entry": {"step": "wave_started", "wave": 2, "vehicles": 12, "gate": "open"},
            }),
        ),
        _ => (
            "disk_alert",
            json!({
                "disk_id": "nvme-Samsung_SSD_980_1TB_S649NF0R512345", "device": "/dev/nvme0n1",
                "from": "passed", "to": "warning", "model": "Samsung SSD 980 1TB",
                "reasons": ["percentage_used 91", format!("media_errors {}", seq % 5)],
            }),
        ),
    };
    OutboxEvent {
        sequence: seq,
        id,
        at_ms,
        kind: kind.into(),
        json: body.to_string(),
    }
}

/// A depot's 100 reported objects: itself, 40 vehicles, 30 bays, 4 disks, 25 chargers
/// (about 200 to 400 bytes each, as the appliance's views).
fn reported_objects(depot: &str, now_ms: i64) -> Vec<Reported> {
    let mut out = Vec::with_capacity(REPORTED);
    let object = |kind: &str, key: String, body: Value| Reported {
        kind: kind.into(),
        key,
        observed_generation: 0,
        json: body.to_string(),
    };
    out.push(object(
        "depot",
        "self".into(),
        json!({
            "health": "healthy", "reasons": [], "name": depot, "local_id": depot,
            "version": "0.1.0", "vehicles": 40, "bays": 30, "images": 3,
            "disks": {"data": "passed", "boot": "passed"}, "uptime_s": 1_209_600,
        }),
    ));
    for v in 0..40 {
        out.push(object(
            "vehicle",
            format!("veh-{v:04}"),
            json!({
                "id": format!("veh-{v:04}"), "hardware_id": if v % 3 == 0 { "ecu-bus-v3" } else { "ecu-van-v2" },
                "online": v % 7 != 0, "last_seen": now_ms - v * 9_000,
                "state": {"soc": 0.35 + (v % 13) as f64 * 0.05, "odometer_km": 120_000 + v * 3_517,
                          "slot": if v % 2 == 0 { "a" } else { "b" }, "version": "2.4.1",
                          "dock": {"bay": format!("B{:02}", v % 30), "plugged": v % 4 != 0}},
                "ota": {"assigned": "2.4.1", "phase": "idle", "attempts": 0, "last_report": now_ms - v * 61_000},
                "credentials": {"mqtt_user": format!("veh-{v:04}"), "created": now_ms - 86_400_000 * 90},
            }),
        ));
    }
    for b in 0..30 {
        out.push(object(
            "bay",
            format!("B{b:02}"),
            json!({
                "bay": format!("B{b:02}"), "charger": format!("chg-{b:02}"),
                "vehicle": format!("veh-{b:04}"), "plugged": b % 4 != 0, "since": now_ms - b * 60_000,
                "max_a": if b < 10 { 200 } else { 32 }, "phases": 3, "row": b / 10, "position": b % 10,
                "note": "north hall, lane 2", "reserved_until": null,
                "last_change": {"by": "scheduler", "at": now_ms - b * 45_000, "reason": "plan"},
            }),
        ));
    }
    for d in 0..4 {
        out.push(object(
            "disk",
            format!("nvme-Samsung_SSD_980_1TB_S649NF0R5{d:05}"),
            json!({
                "id": format!("nvme-Samsung_SSD_980_1TB_S649NF0R5{d:05}"), "device": format!("/dev/nvme{d}n1"),
                "model": "Samsung SSD 980 1TB", "verdict": "passed", "reasons": [],
                "temperature_c": 38 + d, "power_on_hours": 8_123 + d * 11, "percentage_used": 3,
                "media_errors": 0, "last_checked": now_ms - 3_600_000, "self_test": "completed",
                "serial": format!("S649NF0R5{d:05}"), "firmware": "3B4QFXO7", "capacity_bytes": 1_000_204_886_016u64,
            }),
        ));
    }
    for c in 0..25 {
        out.push(object(
            "charger",
            format!("chg-{c:02}"),
            json!({
                "id": format!("chg-{c:02}"), "bay": format!("B{c:02}"),
                "model": if c < 10 { "ABB Terra 184" } else { "Alfen Eve Double" },
                "status": if c % 3 == 0 { "idle" } else { "charging" }, "error": null,
                "setpoint_a": if c % 3 == 0 { 0.0 } else { 16.0 + c as f64 }, "vehicle": format!("veh-{c:04}"),
                "power_w": if c % 3 == 0 { 0.0 } else { 11_040.0 + c as f64 * 230.0 },
                "energy_kwh": 18_234.5 + c as f64, "profile": "alfen-eve", "modbus": format!("10.20.1.{c}:502"),
            }),
        ));
    }
    out
}

/// What all simulated depots of a run share: the clock's zero and the progress counters.
#[derive(Default)]
struct Shared {
    t0: OnceLock<Instant>,
    done: AtomicUsize,
    events_acked: AtomicU64,
    sessions: AtomicU64,
    link_errors: AtomicU64,
    last_error: Mutex<Option<String>>,
    /// Each depot's time from `t0` to the acknowledgement of its last event, seconds.
    finished: Mutex<Vec<f64>>,
}

/// One depot's side of the sync client, in memory.
struct SimDepot {
    name: String,
    events: u64,
    first_at_ms: i64,
    step_ms: i64,
    reported: Vec<Reported>,
    acked: AtomicU64,
    done: AtomicBool,
    shared: Arc<Shared>,
}

impl SimDepot {
    /// A depot whose outbox holds `events` events recorded over the last `span_ms`.
    fn new(name: String, events: u64, span_ms: i64, shared: Arc<Shared>) -> Self {
        let now = jiff::Timestamp::now().as_millisecond();
        Self {
            reported: reported_objects(&name, now),
            name,
            events,
            first_at_ms: now - span_ms,
            step_ms: span_ms / events.max(1) as i64,
            acked: AtomicU64::new(0),
            done: AtomicBool::new(false),
            shared,
        }
    }

    fn event(&self, seq: u64) -> OutboxEvent {
        event(
            &self.name,
            seq,
            self.first_at_ms + seq as i64 * self.step_ms,
        )
    }
}

impl DepotSide for SimDepot {
    async fn stored_revision(&self) -> Result<u64, String> {
        Ok(0)
    }

    async fn store_desired(&self, _revision: DesiredRevision) -> Result<(), String> {
        Ok(())
    }

    async fn outbox_after(
        &self,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<OutboxEvent>, String> {
        let mut out = Vec::new();
        let mut bytes = 0;
        let mut seq = after.max(self.acked.load(Ordering::Relaxed)) + 1;
        while seq <= self.events && out.len() < max && bytes < max_bytes {
            let e = self.event(seq);
            bytes += e.json.len() + e.id.len() + e.kind.len() + 16;
            out.push(e);
            seq += 1;
        }
        Ok(out)
    }

    async fn outbox_acked(&self, sequence: u64) -> Result<(), String> {
        let sequence = sequence.min(self.events);
        let before = self.acked.fetch_max(sequence, Ordering::Relaxed);
        if sequence > before {
            self.shared
                .events_acked
                .fetch_add(sequence - before, Ordering::Relaxed);
        }
        if sequence == self.events && !self.done.swap(true, Ordering::Relaxed) {
            let t0 = self.shared.t0.get().copied().unwrap_or_else(Instant::now);
            self.shared
                .finished
                .lock()
                .unwrap()
                .push(t0.elapsed().as_secs_f64());
            self.shared.done.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    async fn outbox_status(&self) -> Result<OutboxStatus, String> {
        let acked = self.acked.load(Ordering::Relaxed);
        let pending = self.events - acked;
        Ok(OutboxStatus {
            oldest: if pending > 0 { acked + 1 } else { 0 },
            pending,
            dropped_total: 0,
        })
    }

    async fn reported(&self) -> Result<Vec<Reported>, String> {
        Ok(self.reported.clone())
    }

    async fn save_credentials(&self, _creds: &Credentials) -> Result<(), String> {
        Ok(())
    }

    fn link_state(&self, state: LinkState) {
        match state {
            LinkState::Online { .. } => {
                self.shared.sessions.fetch_add(1, Ordering::Relaxed);
            }
            LinkState::Offline { error, .. } => {
                self.shared.link_errors.fetch_add(1, Ordering::Relaxed);
                *self.shared.last_error.lock().unwrap() = Some(error);
            }
            LinkState::Connecting => {}
        }
    }

    async fn identity(&self) -> (String, Vec<u8>) {
        (self.name.clone(), Vec::new())
    }

    async fn welcomed(&self, _fleet_root: Vec<u8>, _director_certificate: Vec<u8>) {}
}

/// The options the appliance runs its link with (`appliance/src/cloud_link/mod.rs`).
fn appliance_options() -> ClientOptions {
    ClientOptions {
        software_version: env!("CARGO_PKG_VERSION").to_owned(),
        report_interval: Duration::from_secs(15),
        ..ClientOptions::default()
    }
}

// ---------------------------------------------------------------------------------------------
// PostgreSQL

struct OwnCluster {
    bin: PathBuf,
    dir: tempfile::TempDir,
}

struct Postgres {
    /// An admin URL (to the `postgres` database).
    admin_url: String,
    version: String,
    own: Option<OwnCluster>,
}

fn is_root() -> bool {
    sh("id -u") == "0"
}

/// `program` as the cluster's owner: Debian's `postgres` user when running as root (initdb
/// refuses root), as `tests/run` does.
fn as_pg(program: PathBuf) -> Command {
    if is_root() {
        let mut cmd = Command::new("runuser");
        cmd.args(["-u", "postgres", "--"])
            .arg(program)
            .current_dir("/");
        cmd
    } else {
        Command::new(program)
    }
}

fn checked(cmd: &mut Command, what: &str) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {what}"))?;
    if !out.status.success() {
        bail!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `url` with its database replaced by `name`.
fn with_database(url: &str, name: &str) -> String {
    let (base, query) = url.split_once('?').unwrap_or((url, ""));
    let rest = base.split_once("://").map_or(base, |(_, r)| r);
    let base = match rest.find('/') {
        Some(_) => base.rsplit_once('/').map_or(base, |(b, _)| b),
        None => base,
    };
    if query.is_empty() {
        format!("{base}/{name}")
    } else {
        format!("{base}/{name}?{query}")
    }
}

impl Postgres {
    fn start(runtime: &Runtime) -> Result<Postgres> {
        let (admin_url, own) = match std::env::var("ATLASMESH_BENCH_POSTGRES_URL") {
            Ok(url) => (url, None),
            Err(_) => {
                let bin = std::fs::read_dir("/usr/lib/postgresql")
                    .context("PostgreSQL is not installed (apt-get install postgresql)")?
                    .filter_map(|e| e.ok())
                    .map(|e| e.path().join("bin"))
                    .filter(|p| p.join("initdb").is_file())
                    .max_by_key(|p| {
                        p.parent()
                            .and_then(|v| v.file_name())
                            .and_then(|v| v.to_str())
                            .and_then(|v| v.parse::<u32>().ok())
                            .unwrap_or(0)
                    })
                    .context("no initdb under /usr/lib/postgresql/*/bin")?;
                let dir = tempfile::Builder::new()
                    .prefix("atlasmesh-bench-pg.")
                    .tempdir()?;
                if is_root() {
                    checked(
                        Command::new("chown").arg("postgres").arg(dir.path()),
                        "chown postgres",
                    )?;
                }
                let data = dir.path().join("data");
                checked(
                    as_pg(bin.join("initdb")).arg("-D").arg(&data).args([
                        "-A",
                        "trust",
                        "-U",
                        "atlasmesh",
                    ]),
                    "initdb",
                )?;
                let port = free_port();
                checked(
                    as_pg(bin.join("pg_ctl"))
                        .arg("-D")
                        .arg(&data)
                        .arg("-l")
                        .arg(dir.path().join("log"))
                        .arg("-w")
                        .arg("-o")
                        .arg(format!(
                            "-p {port} -k {} -c listen_addresses=127.0.0.1",
                            dir.path().display()
                        ))
                        .arg("start"),
                    "pg_ctl start",
                )?;
                (
                    format!("postgres://atlasmesh@127.0.0.1:{port}/postgres"),
                    Some(OwnCluster { bin, dir }),
                )
            }
        };
        let mut pg = Postgres {
            admin_url,
            version: String::new(),
            own,
        };
        let version = runtime.block_on(async {
            let pool = sqlx::AnyPool::connect(&pg.admin_url).await?;
            let v: String = sqlx::query_scalar("SHOW server_version")
                .fetch_one(&pool)
                .await?;
            pool.close().await;
            anyhow::Ok(v)
        });
        match version {
            Ok(v) => pg.version = v.split_whitespace().next().unwrap_or("").to_owned(),
            Err(e) => return Err(e.context("connecting to PostgreSQL")),
        }
        Ok(pg)
    }

    async fn admin(&self, sql: String) -> Result<()> {
        let pool = sqlx::AnyPool::connect(&self.admin_url).await?;
        sqlx::raw_sql(AssertSqlSafe(sql)).execute(&pool).await?;
        pool.close().await;
        Ok(())
    }

    /// A new empty database; returns its URL.
    fn fresh(&self, runtime: &Runtime, name: &str) -> Result<String> {
        runtime.block_on(async {
            self.admin(format!("DROP DATABASE IF EXISTS {name}"))
                .await?;
            self.admin(format!("CREATE DATABASE {name}")).await
        })?;
        Ok(with_database(&self.admin_url, name))
    }

    fn drop_database(&self, runtime: &Runtime, name: &str) -> Result<()> {
        runtime.block_on(self.admin(format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")))
    }

    /// Writes dirty buffers now, so one phase's checkpoint does not land in the next.
    fn checkpoint(&self, runtime: &Runtime) -> Result<()> {
        runtime.block_on(self.admin("CHECKPOINT".into()))
    }

    /// The server's processes (our own cluster only).
    fn pids(&self) -> Vec<u32> {
        let Some(own) = &self.own else {
            return Vec::new();
        };
        let Some(postmaster) = std::fs::read_to_string(own.dir.path().join("data/postmaster.pid"))
            .ok()
            .and_then(|s| s.lines().next()?.trim().parse::<u32>().ok())
        else {
            return Vec::new();
        };
        let mut pids = vec![postmaster];
        pids.extend(children(postmaster));
        pids
    }

    fn stop(&self) {
        if let Some(own) = &self.own {
            let _ = as_pg(own.bin.join("pg_ctl"))
                .arg("-D")
                .arg(own.dir.path().join("data"))
                .args(["-m", "fast", "-w", "stop"])
                .output();
        }
    }
}

/// Stops a cluster the bench started (also when the bench fails or panics); its directory
/// goes with it.
impl Drop for Postgres {
    fn drop(&mut self) {
        self.stop();
    }
}

/// CPU seconds of a changing set of processes since a snapshot (processes that ended in
/// between are not counted; the pools keep theirs open).
struct Cpu(HashMap<u32, f64>);

impl Cpu {
    fn snapshot(pids: &[u32]) -> Cpu {
        Cpu(pids.iter().map(|&p| (p, cpu_seconds(&[p]))).collect())
    }

    fn since(&self, pids: &[u32]) -> f64 {
        pids.iter()
            .map(|&p| cpu_seconds(&[p]) - self.0.get(&p).copied().unwrap_or(0.0))
            .sum()
    }
}

// ---------------------------------------------------------------------------------------------
// The cloud

struct Cloud {
    server: Server,
    grpc_port: u16,
    data_dir: PathBuf,
    database_url: Option<String>,
    _temp: tempfile::TempDir,
}

impl Cloud {
    /// `atlasmesh cloud` with its defaults, on `database_url` or its own SQLite store.
    fn start(database_url: Option<&str>) -> Result<Cloud> {
        let temp = atlasmesh_tests::bench::work_dir()?;
        let data_dir = temp.path().join("cloud");
        let (http_port, grpc_port) = (free_port(), free_port());
        let mut args = vec![
            "--http".to_owned(),
            format!("127.0.0.1:{http_port}"),
            "--grpc".to_owned(),
            format!("127.0.0.1:{grpc_port}"),
        ];
        if let Some(url) = database_url {
            args.extend(["--database-url".to_owned(), url.to_owned()]);
        }
        let server = Server::start(Options {
            mode: Mode::Cloud,
            data_dir: Some(data_dir.clone()),
            env: Vec::new(),
            args,
        })?;
        Ok(Cloud {
            server,
            grpc_port,
            data_dir,
            database_url: database_url.map(str::to_owned),
            _temp: temp,
        })
    }

    fn grpc_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.grpc_port)
    }

    /// The URL the bench reads the cloud's store with.
    fn store_url(&self) -> String {
        match &self.database_url {
            Some(url) => url.clone(),
            None => format!(
                "sqlite://{}?mode=ro",
                self.data_dir.join("cloud.db").display()
            ),
        }
    }

    /// `atlasmesh cloud <args> --data-dir ... [--database-url ...]`; returns stdout.
    fn tool(&self, args: &[&str]) -> Result<String> {
        let mut cmd = atlasmesh();
        cmd.arg("cloud")
            .args(args)
            .arg("--data-dir")
            .arg(&self.data_dir);
        if let Some(url) = &self.database_url {
            cmd.args(["--database-url", url]);
        }
        let (status, stdout, stderr) = run(&mut cmd)?;
        if !status.success() {
            bail!("atlasmesh cloud {args:?} failed: {stderr}");
        }
        Ok(stdout.trim().to_owned())
    }

    /// The cloud's warnings and errors: each message (with its error) once, how often, and
    /// the largest value of each of its numeric fields.
    fn complaints(&self) -> Vec<(String, usize)> {
        let mut groups: HashMap<String, (usize, HashMap<String, f64>)> = HashMap::new();
        for line in self.server.logs() {
            let Ok(v) = serde_json::from_str::<Value>(&line) else {
                continue;
            };
            let level = v["level"].as_str().unwrap_or_default().to_ascii_uppercase();
            if level != "WARN" && level != "ERROR" {
                continue;
            }
            let message = v["message"].as_str().unwrap_or_default();
            let error: String = v["error"]
                .as_str()
                .unwrap_or_default()
                .chars()
                .take(120)
                .collect();
            let key = if error.is_empty() {
                format!("{level} {message}")
            } else {
                format!("{level} {message}: {error}")
            };
            let (count, maxima) = groups.entry(key).or_default();
            *count += 1;
            for (field, value) in v.as_object().into_iter().flatten() {
                if let Some(x) = value.as_f64() {
                    let max = maxima.entry(field.clone()).or_insert(x);
                    *max = max.max(x);
                }
            }
        }
        let mut out: Vec<(String, usize)> = groups
            .into_iter()
            .map(|(key, (count, maxima))| {
                let mut fields: Vec<String> = maxima
                    .into_iter()
                    .map(|(field, max)| format!("{field} up to {max:.3}"))
                    .collect();
                fields.sort();
                if fields.is_empty() {
                    (key, count)
                } else {
                    (format!("{key} ({})", fields.join(", ")), count)
                }
            })
            .collect();
        out.sort_by_key(|c| std::cmp::Reverse(c.1));
        out
    }
}

/// Enrols every depot with its token, `ENROL_AT_ONCE` at a time.
async fn enrol_all(url: &str, tokens: Vec<String>) -> Result<Vec<Credentials>> {
    let permits = Arc::new(Semaphore::new(ENROL_AT_ONCE));
    let mut tasks = JoinSet::new();
    for (i, token) in tokens.into_iter().enumerate() {
        let permits = permits.clone();
        let url = url.to_owned();
        tasks.spawn(async move {
            let _permit = permits.acquire_owned().await?;
            let creds = client::enroll(&url, &token, env!("CARGO_PKG_VERSION"), &system_clock())
                .await
                .with_context(|| format!("enrolling depot {i}"))?;
            anyhow::Ok((i, creds))
        });
    }
    let mut out = Vec::new();
    while let Some(done) = tasks.join_next().await {
        out.push(done??);
    }
    out.sort_by_key(|(i, _)| *i);
    Ok(out.into_iter().map(|(_, c)| c).collect())
}

struct SyncOutcome {
    /// From the first session start to the last depot's last acknowledgement.
    acked_s: f64,
    /// ... and to every reported row being stored (at least `acked_s`).
    all_s: f64,
    /// Each depot's time to its last acknowledgement, sorted.
    finished: Vec<f64>,
    timed_out: bool,
    sessions: u64,
    link_errors: u64,
    last_error: Option<String>,
}

/// Runs the sync client of every depot until each has its last event acknowledged and the
/// store holds `reported_rows` reported rows.
async fn sync_all(
    depots: Vec<(Arc<SimDepot>, Credentials)>,
    shared: Arc<Shared>,
    options: ClientOptions,
    store_url: &str,
    reported_rows: i64,
    limit: Duration,
) -> Result<SyncOutcome> {
    let store = sqlx::any::AnyPoolOptions::new()
        .max_connections(1)
        .connect(store_url)
        .await?;
    let n = depots.len();
    let shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let t0 = Instant::now();
    let _ = shared.t0.set(t0);
    for (side, creds) in depots {
        tasks.spawn(client::run(
            side,
            creds,
            options.clone(),
            system_clock(),
            shutdown.clone(),
        ));
    }
    let mut timed_out = false;
    let mut progress = t0;
    while shared.done.load(Ordering::Relaxed) < n {
        tokio::time::sleep(Duration::from_millis(20)).await;
        if t0.elapsed() > limit {
            timed_out = true;
            break;
        }
        if progress.elapsed() >= Duration::from_secs(10) {
            progress = Instant::now();
            eprintln!(
                "  {:>5.0} s: {} of {n} depots done, {} events acknowledged, {} sessions, {} link errors",
                t0.elapsed().as_secs_f64(),
                shared.done.load(Ordering::Relaxed),
                shared.events_acked.load(Ordering::Relaxed),
                shared.sessions.load(Ordering::Relaxed),
                shared.link_errors.load(Ordering::Relaxed),
            );
        }
    }
    let mut finished = shared.finished.lock().unwrap().clone();
    finished.sort_by(f64::total_cmp);
    let acked_s = finished.last().copied().unwrap_or(0.0);
    // Reported rows are not acknowledged; they are sent at session start, before or beside the
    // events, so they are normally all stored by now. Look, and wait if not.
    let mut all_s = acked_s;
    loop {
        let stored: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM reported")
            .fetch_one(&store)
            .await?;
        if stored >= reported_rows || timed_out {
            break;
        }
        all_s = t0.elapsed().as_secs_f64();
        if t0.elapsed() > limit {
            timed_out = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    while tasks.join_next().await.is_some() {}
    store.close().await;
    Ok(SyncOutcome {
        acked_s,
        all_s,
        finished,
        timed_out,
        sessions: shared.sessions.load(Ordering::Relaxed),
        link_errors: shared.link_errors.load(Ordering::Relaxed),
        last_error: shared.last_error.lock().unwrap().clone(),
    })
}

/// What the store holds, by SQL.
struct Check {
    events: i64,
    event_ids: i64,
    reported: i64,
    reported_keys: i64,
    depots_complete: i64,
}

impl Check {
    async fn of(url: &str, events_per_depot: u64) -> Result<Check> {
        let pool = sqlx::any::AnyPoolOptions::new()
            .max_connections(1)
            .connect(url)
            .await?;
        let row = sqlx::query("SELECT COUNT(*) AS n, COUNT(DISTINCT event_id) AS ids FROM events")
            .fetch_one(&pool)
            .await?;
        let (events, event_ids) = (row.try_get("n")?, row.try_get("ids")?);
        let row = sqlx::query(
            "SELECT COUNT(*) AS n, COUNT(DISTINCT depot_id || '/' || kind || '/' || key) AS keys \
             FROM reported",
        )
        .fetch_one(&pool)
        .await?;
        let (reported, reported_keys) = (row.try_get("n")?, row.try_get("keys")?);
        let depots_complete: i64 =
            sqlx::query_scalar("SELECT COUNT(*) FROM depots WHERE events_acked = $1")
                .bind(events_per_depot as i64)
                .fetch_one(&pool)
                .await?;
        pool.close().await;
        Ok(Check {
            events,
            event_ids,
            reported,
            reported_keys,
            depots_complete,
        })
    }

    fn holds(&self, depots: usize, events: u64, reported: usize) -> bool {
        let events = (depots as u64 * events) as i64;
        let reported = (depots * reported) as i64;
        self.events == events
            && self.event_ids == events
            && self.reported == reported
            && self.reported_keys == reported
            && self.depots_complete == depots as i64
    }
}

// ---------------------------------------------------------------------------------------------
// The baseline: the same rows by plain multi-row INSERTs

/// Creates the cloud's tables from its own PostgreSQL migrations.
async fn cloud_schema(pool: &sqlx::PgPool) -> Result<()> {
    let dir = workspace_root().join("cloud-sync/migrations/postgres");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "sql"))
        .collect();
    files.sort();
    for file in files {
        let sql = std::fs::read_to_string(&file)?;
        sqlx::raw_sql(AssertSqlSafe(sql))
            .execute(pool)
            .await
            .with_context(|| format!("{}", file.display()))?;
    }
    Ok(())
}

fn baseline_id(name: &str) -> String {
    hex_of(&[name.as_bytes()], 16)
}

async fn insert_events(
    pool: &sqlx::PgPool,
    depot_id: &str,
    events: &[OutboxEvent],
    now_ms: i64,
) -> Result<()> {
    let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(
        "INSERT INTO events (depot_id, event_id, sequence, at_ms, kind, json, received_ms) ",
    );
    q.push_values(events, |mut row, e| {
        row.push_bind(depot_id.to_owned())
            .push_bind(e.id.clone())
            .push_bind(e.sequence as i64)
            .push_bind(e.at_ms)
            .push_bind(e.kind.clone())
            .push_bind(e.json.clone())
            .push_bind(now_ms);
    });
    q.build().execute(pool).await?;
    Ok(())
}

async fn insert_reported(
    pool: &sqlx::PgPool,
    depot_id: &str,
    objects: &[Reported],
    now_ms: i64,
) -> Result<()> {
    let mut q = sqlx::QueryBuilder::<sqlx::Postgres>::new(
        "INSERT INTO reported (depot_id, kind, key, observed_generation, observed_ms, json, \
         deleted, received_ms) ",
    );
    q.push_values(objects, |mut row, o| {
        row.push_bind(depot_id.to_owned())
            .push_bind(o.kind.clone())
            .push_bind(o.key.clone())
            .push_bind(o.observed_generation as i64)
            .push_bind(now_ms)
            .push_bind(o.json.clone())
            .push_bind(0i64)
            .push_bind(now_ms);
    });
    q.build().execute(pool).await?;
    Ok(())
}

/// Writes `depots` x (`events` events + their reported objects) with `workers` connections,
/// each statement its own transaction (as each batch is in the cloud). Returns seconds.
async fn baseline(
    url: &str,
    depots: usize,
    events: u64,
    span_ms: i64,
    workers: u32,
) -> Result<f64> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(workers)
        .connect(url)
        .await?;
    cloud_schema(&pool).await?;
    let now = jiff::Timestamp::now().as_millisecond();
    let mut q =
        sqlx::QueryBuilder::<sqlx::Postgres>::new("INSERT INTO depots (id, name, created_ms) ");
    q.push_values(0..depots, |mut row, i| {
        let name = depot_name(i);
        row.push_bind(baseline_id(&name))
            .push_bind(name)
            .push_bind(now);
    });
    q.build().execute(&pool).await?;
    // Warm the pool, as the cloud's is after its sessions start.
    let mut warm = JoinSet::new();
    for _ in 0..workers {
        let pool = pool.clone();
        warm.spawn(async move { sqlx::query("SELECT 1").execute(&pool).await });
    }
    while let Some(done) = warm.join_next().await {
        done??;
    }
    let next = Arc::new(AtomicUsize::new(0));
    let start = Instant::now();
    let mut tasks = JoinSet::new();
    for _ in 0..workers {
        let (pool, next) = (pool.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= depots {
                    return anyhow::Ok(());
                }
                let name = depot_name(i);
                let id = baseline_id(&name);
                let now = jiff::Timestamp::now().as_millisecond();
                insert_reported(&pool, &id, &reported_objects(&name, now), now).await?;
                let first_at = now - span_ms;
                let step = span_ms / events.max(1) as i64;
                let mut seq = 1;
                while seq <= events {
                    let last = (seq + BATCH as u64 - 1).min(events);
                    let batch: Vec<OutboxEvent> = (seq..=last)
                        .map(|s| event(&name, s, first_at + s as i64 * step))
                        .collect();
                    insert_events(&pool, &id, &batch, jiff::Timestamp::now().as_millisecond())
                        .await?;
                    seq = last + 1;
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done??;
    }
    let elapsed = start.elapsed().as_secs_f64();
    // The baseline's depots hold what they wrote.
    sqlx::query("UPDATE depots SET events_acked = $1")
        .bind(events as i64)
        .execute(&pool)
        .await?;
    pool.close().await;
    Ok(elapsed)
}

// ---------------------------------------------------------------------------------------------
// Phases

fn check_text(check: &Check, ok: bool) -> String {
    format!(
        "{} events ({} distinct ids), {} reported ({} distinct keys): {}",
        check.events,
        check.event_ids,
        check.reported,
        check.reported_keys,
        if ok { "**exact**" } else { "**MISMATCH**" }
    )
}

/// CPU seconds for a table cell; "n/a" when not measured.
fn seconds(cpu: Option<f64>) -> String {
    cpu.map_or("n/a".to_owned(), |c| format!("{c:.1}"))
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i]
}

fn fleet(pg: &Postgres, rt: &Runtime, n: usize) -> Result<()> {
    let total_events = n as u64 * EVENTS;
    let total_reported = n * REPORTED;
    let me = std::process::id();

    eprintln!(
        "fleet: baseline, {total_events} events and {total_reported} reported rows by multi-row INSERTs"
    );
    let base_db = "atlasmesh_bench_baseline";
    let base_url = pg.fresh(rt, base_db)?;
    pg.checkpoint(rt)?;
    let (pg_cpu, my_cpu) = (Cpu::snapshot(&pg.pids()), cpu_seconds(&[me]));
    let base_s = rt.block_on(baseline(&base_url, n, EVENTS, 3_600_000, POOL))?;
    let base_cpu = (pg.since_cpu(&pg_cpu), cpu_seconds(&[me]) - my_cpu);
    let base_check = rt.block_on(Check::of(&base_url, EVENTS))?;
    let base_ok = base_check.holds(n, EVENTS, REPORTED);
    pg.drop_database(rt, base_db)?;

    eprintln!("fleet: starting the cloud on PostgreSQL");
    let cloud_db = "atlasmesh_bench_cloud";
    let cloud_url = pg.fresh(rt, cloud_db)?;
    let cloud = Cloud::start(Some(&cloud_url))?;
    let result = fleet_sync(pg, rt, &cloud, n, (base_s, base_cpu, &base_check, base_ok));
    drop(cloud);
    pg.drop_database(rt, cloud_db)?;
    result
}

/// The cloud's side of the fleet phase; prints the section with the baseline's row.
fn fleet_sync(
    pg: &Postgres,
    rt: &Runtime,
    cloud: &Cloud,
    n: usize,
    (base_s, base_cpu, base_check, base_ok): (f64, (Option<f64>, f64), &Check, bool),
) -> Result<()> {
    let total_events = n as u64 * EVENTS;
    let total_reported = n * REPORTED;
    let me = std::process::id();
    let names: Vec<String> = (0..n).map(depot_name).collect();
    // Tokens as an operator mints them, `atlasmesh cloud enroll-token`, unless that costs more
    // than 100 ms a token over the first ten: then the rest through the fleet API.
    eprintln!("fleet: minting {n} enrolment tokens");
    let started = Instant::now();
    let mut tokens = Vec::with_capacity(n);
    let mut minted_by = "`atlasmesh cloud enroll-token --depot NAME`";
    for (i, name) in names.iter().enumerate() {
        if i == 10 && started.elapsed() > Duration::from_millis(100 * 10) {
            minted_by = "the first 10 with `atlasmesh cloud enroll-token`, the rest through \
                         `POST /api/v1/enroll-tokens` (the CLI took over 100 ms a token)";
            let api = cloud.tool(&["token", "--role", "admin", "--name", "bench"])?;
            let client = http();
            for name in &names[10..] {
                let response = client
                    .post(cloud.server.url("/api/v1/enroll-tokens"))
                    .bearer_auth(&api)
                    .json(&json!({ "depot": name }))
                    .send()?;
                let body: Value = response.json()?;
                tokens.push(
                    body["token"]
                        .as_str()
                        .with_context(|| format!("minting a token for {name}: {body}"))?
                        .to_owned(),
                );
            }
            break;
        }
        tokens.push(cloud.tool(&["enroll-token", "--depot", name])?);
    }
    let mint_ms = started.elapsed().as_secs_f64() * 1000.0 / n.max(1) as f64;

    eprintln!("fleet: enrolling {n} depots, {ENROL_AT_ONCE} at a time");
    let started = Instant::now();
    let creds = rt.block_on(enrol_all(&cloud.grpc_url(), tokens))?;
    let enrol_s = started.elapsed().as_secs_f64();

    let shared = Arc::new(Shared::default());
    let depots: Vec<(Arc<SimDepot>, Credentials)> = names
        .iter()
        .zip(creds)
        .map(|(name, c)| {
            let side = SimDepot::new(name.clone(), EVENTS, 3_600_000, shared.clone());
            (Arc::new(side), c)
        })
        .collect();
    let event_bytes = {
        let sample: Vec<OutboxEvent> = (1..=EVENTS).map(|s| depots[0].0.event(s)).collect();
        sample.iter().map(|e| e.json.len()).sum::<usize>() / sample.len()
    };
    let reported_bytes = depots[0]
        .0
        .reported
        .iter()
        .map(|r| r.json.len())
        .sum::<usize>()
        / REPORTED;
    pg.checkpoint(rt)?;
    eprintln!("fleet: {n} depots sync {EVENTS} events and {REPORTED} reported objects each");
    let (pg_cpu, my_cpu) = (Cpu::snapshot(&pg.pids()), cpu_seconds(&[me]));
    let cloud_cpu = cpu_seconds(&[cloud.server.pid()]);
    let outcome = rt.block_on(sync_all(
        depots,
        shared,
        appliance_options(),
        &cloud.store_url(),
        total_reported as i64,
        FLEET_LIMIT,
    ))?;
    let cpu = (
        cpu_seconds(&[cloud.server.pid()]) - cloud_cpu,
        pg.since_cpu(&pg_cpu),
        cpu_seconds(&[me]) - my_cpu,
    );
    let check = rt.block_on(Check::of(&cloud.store_url(), EVENTS))?;
    let ok = check.holds(n, EVENTS, REPORTED) && !outcome.timed_out;
    let rss = peak_rss_kib(cloud.server.pid());

    println!(
        "### Fleet: {n} depots x ({EVENTS} events + {REPORTED} reported objects) into one cloud on PostgreSQL\n"
    );
    println!(
        "Events about {event_bytes} bytes of JSON each (audit, OTA report, rollout and disk-alert \
         bodies as the outbox triggers write them, 128-bit ids, sequences 1..={EVENTS}); \
         reported objects about {reported_bytes} bytes (the depot itself, 40 vehicles, 30 bays, \
         4 disks, 25 chargers). One-time tokens, one per depot: {minted_by}, \
         {mint_ms:.0} ms a token. \
         Enrolment: {n} depots, {ENROL_AT_ONCE} at a time, {enrol_s:.1} s ({:.0} per s; \
         each a TLS handshake pinned by the token, a fresh P-256 key and CSR, the cloud \
         signing and recording the certificate). Then all {n} sessions open at once.\n",
        n as f64 / enrol_s,
    );
    println!(
        "| writer | time (s) | events/s | reported objects/s | CPU s: cloud / PostgreSQL / depots or client | stored, checked by SQL |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    println!(
        "| baseline: multi-row INSERTs of {BATCH} rows, sqlx pool of {POOL}, no gRPC/TLS/dedup | {base_s:.1} | {:.0} | {:.0} | - / {} / {:.1} | {} |",
        total_events as f64 / base_s,
        total_reported as f64 / base_s,
        seconds(base_cpu.0),
        base_cpu.1,
        check_text(base_check, base_ok),
    );
    println!(
        "| atlasmesh cloud: {n} gRPC sessions over mutual TLS | **{:.1}**{} | **{:.0}** | {:.0} | {:.1} / {} / {:.1} | {} |",
        outcome.all_s,
        if outcome.timed_out {
            " (timed out)"
        } else {
            ""
        },
        outcome.events_acked_rate(total_events),
        total_reported as f64 / outcome.all_s,
        cpu.0,
        seconds(cpu.1),
        cpu.2,
        check_text(&check, ok),
    );
    println!();
    println!(
        "Cloud / baseline time: **{:.2}**. Every depot's last event acknowledged after \
         {:.1} s; per depot, from the first session start to its last acknowledgement: \
         p50 {:.1} s, p95 {:.1} s, max {:.1} s. {} depots with `events_acked` = {EVENTS}. \
         Sessions opened: {}; link errors: {}{}. Cloud peak RSS (VmHWM): {:.1} MiB.",
        outcome.all_s / base_s,
        outcome.acked_s,
        percentile(&outcome.finished, 0.5),
        percentile(&outcome.finished, 0.95),
        outcome.finished.last().copied().unwrap_or(0.0),
        check.depots_complete,
        outcome.sessions,
        outcome.link_errors,
        outcome
            .last_error
            .as_deref()
            .map(|e| format!(" (last: {e})"))
            .unwrap_or_default(),
        rss as f64 / 1024.0,
    );
    let complaints = cloud.complaints();
    if !complaints.is_empty() {
        println!("\nThe cloud's warnings and errors during the run:\n");
        for (message, count) in complaints.iter().take(8) {
            println!("- {count} x {message}");
        }
    }
    println!();
    Ok(())
}

impl SyncOutcome {
    fn events_acked_rate(&self, events: u64) -> f64 {
        events as f64 / self.all_s.max(f64::EPSILON)
    }
}

impl Postgres {
    /// CPU seconds of the server since `before`; `None` for a server the bench did not start.
    fn since_cpu(&self, before: &Cpu) -> Option<f64> {
        self.own.as_ref().map(|_| before.since(&self.pids()))
    }
}

struct DrainRow {
    store: &'static str,
    client: String,
    seconds: f64,
    timed_out: bool,
    cloud_cpu: f64,
    pg_cpu: String,
    check: Check,
    ok: bool,
    link_errors: u64,
}

fn drain_once(
    pg: &Postgres,
    rt: &Runtime,
    postgres: bool,
    options: ClientOptions,
    client: String,
) -> Result<DrainRow> {
    let db = "atlasmesh_bench_drain";
    let url = if postgres {
        Some(pg.fresh(rt, db)?)
    } else {
        None
    };
    let cloud = Cloud::start(url.as_deref())?;
    let result = drain_on(pg, rt, &cloud, postgres, options, client);
    drop(cloud);
    if postgres {
        pg.drop_database(rt, db)?;
    }
    result
}

fn drain_on(
    pg: &Postgres,
    rt: &Runtime,
    cloud: &Cloud,
    postgres: bool,
    options: ClientOptions,
    client: String,
) -> Result<DrainRow> {
    let token = cloud.tool(&["enroll-token", "--depot", "backlog"])?;
    let creds = rt.block_on(enrol_all(&cloud.grpc_url(), vec![token]))?;
    let shared = Arc::new(Shared::default());
    let side = Arc::new(SimDepot::new(
        "backlog".into(),
        BACKLOG,
        DAY_MS,
        shared.clone(),
    ));
    if postgres {
        pg.checkpoint(rt)?;
    }
    let pg_cpu = Cpu::snapshot(&pg.pids());
    let cloud_cpu = cpu_seconds(&[cloud.server.pid()]);
    let depots = vec![(side, creds.into_iter().next().context("one credential")?)];
    let outcome = rt.block_on(sync_all(
        depots,
        shared,
        options,
        &cloud.store_url(),
        REPORTED as i64,
        DRAIN_LIMIT,
    ))?;
    let cloud_cpu = cpu_seconds(&[cloud.server.pid()]) - cloud_cpu;
    let pg_cpu = if postgres {
        seconds(pg.since_cpu(&pg_cpu))
    } else {
        "-".to_owned()
    };
    let check = rt.block_on(Check::of(&cloud.store_url(), BACKLOG))?;
    let ok = check.holds(1, BACKLOG, REPORTED) && !outcome.timed_out;
    Ok(DrainRow {
        store: if postgres {
            "PostgreSQL"
        } else {
            "SQLite (default)"
        },
        client,
        seconds: outcome.acked_s,
        timed_out: outcome.timed_out,
        cloud_cpu,
        pg_cpu,
        check,
        ok,
        link_errors: outcome.link_errors,
    })
}

fn drain(pg: &Postgres, rt: &Runtime) -> Result<()> {
    eprintln!("drain: baseline, {BACKLOG} events by multi-row INSERTs on one connection");
    let db = "atlasmesh_bench_drain_baseline";
    let url = pg.fresh(rt, db)?;
    pg.checkpoint(rt)?;
    let pg_cpu = Cpu::snapshot(&pg.pids());
    let base_s = rt.block_on(baseline(&url, 1, BACKLOG, DAY_MS, 1))?;
    let base_pg_cpu = seconds(pg.since_cpu(&pg_cpu));
    let base_check = rt.block_on(Check::of(&url, BACKLOG))?;
    let base_ok = base_check.holds(1, BACKLOG, REPORTED);
    pg.drop_database(rt, db)?;

    let appliance = appliance_options();
    let runs = [
        (true, appliance.clone(), "as the appliance"),
        (false, appliance, "as the appliance"),
    ];
    let mut rows = Vec::new();
    for (postgres, options, label) in runs {
        eprintln!(
            "drain: {} events, cloud on {}, client {label}",
            BACKLOG,
            if postgres { "PostgreSQL" } else { "SQLite" }
        );
        rows.push(drain_once(pg, rt, postgres, options, label.to_owned())?);
    }

    println!(
        "### Backlog drain: one depot reconnects with {BACKLOG} events (24 hours) in its outbox\n"
    );
    println!(
        "Timed from the session start (TLS connection, hello, welcome) to the acknowledgement of \
         the last event; the cloud was started fresh for each row. Target: at most 10 s.\n"
    );
    println!(
        "| writer | store | drain time (s) | events/s | CPU s: cloud / PostgreSQL | stored, checked by SQL |"
    );
    println!("| --- | --- | --- | --- | --- | --- |");
    println!(
        "| baseline: multi-row INSERTs of {BATCH} rows, one connection | PostgreSQL | {base_s:.2} | {:.0} | - / {base_pg_cpu} | {} |",
        BACKLOG as f64 / base_s,
        check_text(&base_check, base_ok),
    );
    for row in &rows {
        println!(
            "| atlasmesh cloud, client {} | {} | **{:.2}**{} | {:.0} | {:.1} / {} | {}{} |",
            row.client,
            row.store,
            row.seconds,
            if row.timed_out { " (timed out)" } else { "" },
            BACKLOG as f64 / row.seconds.max(f64::EPSILON),
            row.cloud_cpu,
            row.pg_cpu,
            check_text(&row.check, row.ok),
            if row.link_errors > 0 {
                format!("; {} link errors", row.link_errors)
            } else {
                String::new()
            },
        );
    }
    println!();
    Ok(())
}
