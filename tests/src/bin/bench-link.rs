//! Vehicle link benchmark (issue 4): sustained ingest of vehicle state reports.
//!
//! 200 vehicles, each a rumqttc client with its own login (the broker's ACL admits nothing
//! else), publish QoS 1 state reports through Debian's Mosquitto at a fixed offered rate. Beside
//! the depot, `mosquitto_sub -q 1` subscribes to the same topics at the same broker; what it
//! receives is the baseline. What the depot applied comes from its `/metrics`, and the latency
//! from publish to applied state from its lag histogram (the vehicle's timestamp, taken just
//! before publishing, to the registry commit). All processes share this machine's cores.
//!
//! Run: `cargo build --release --workspace --bins && target/release/bench-link [RATE...]`
//! (offered messages per second; default 10000 20000). Needs mosquitto and mosquitto-clients
//! (`tests/run` installs both). Prints Markdown for docs/benchmarks.md.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use atlasmesh_tests::bench::{build_release, cpu_seconds, machine, peak_rss_kib};
use atlasmesh_tests::mqtt::Mosquitto;
use atlasmesh_tests::{Options, Server, http, metric_sum};
use atlasmesh_vehicle_link::wire::{Slot, State, Topics, Upward};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use serde_json::{Value, json};

const DEPOT: &str = "bench-depot";
const VEHICLES: usize = 200;
const WARMUP: Duration = Duration::from_secs(5);
const WINDOW: Duration = Duration::from_secs(20);
const DRAIN: Duration = Duration::from_secs(30);
const OBSERVER: &str = "bench-observer";
const LAG: &str = "atlasmesh_vehicle_message_lag_seconds";

fn main() -> Result<()> {
    let rates: Vec<u32> = std::env::args()
        .skip(1)
        .map(|a| a.parse().with_context(|| format!("{a:?} is not a rate")))
        .collect::<Result<_>>()?;
    let rates = if rates.is_empty() {
        vec![10_000, 20_000]
    } else {
        rates
    };
    build_release()?;

    let mosquitto = Mosquitto::start(DEPOT)?;
    let mut env = mosquitto.depot_env();
    env.push(("ATLASMESH_DEPOT__ID".into(), DEPOT.into()));
    let depot = Server::start(Options {
        env,
        ..Options::default()
    })?;
    wait_until("the depot connected to Mosquitto", || {
        Ok(metric_sum(&depot.metrics()?, "atlasmesh_vehicle_link_connected", &[]) == 1.0)
    })?;
    let logins = register(&depot, VEHICLES)?;
    mosquitto.set_passwords(&logins)?;
    let topics = Topics::new(DEPOT)?;
    let filter = format!("atlasmesh/v1/depots/{DEPOT}/vehicles/+/state");
    mosquitto.set_password(OBSERVER, "observer-password")?;
    mosquitto.allow_read(OBSERVER, &filter)?;
    let observer = Observer::start(mosquitto.port, &filter)?;

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let vehicles = runtime.block_on(Vehicles::connect(mosquitto.port, &logins, &topics))?;

    println!("## Vehicle link benchmark\n");
    println!("{}\n", machine());
    println!(
        "{VEHICLES} vehicles publish QoS 1 state reports (about {} bytes each) through Mosquitto {}; \
         {}s warm-up, then a {}s window; all counts are taken in that window.\n",
        sample_payload().len(),
        mosquitto_version(),
        WARMUP.as_secs(),
        WINDOW.as_secs()
    );
    println!(
        "| offered (msg/s) | PUBACKed by Mosquitto (msg/s) | `mosquitto_sub -q 1` received (msg/s) | depot applied (msg/s) \
         | applied / mosquitto_sub | publish to applied p50 / p95 (ms) | depot CPU (cores) | \
         Mosquitto CPU (cores) | after drain: sent / PUBACKed / received / applied |"
    );
    println!("| --- | --- | --- | --- | --- | --- | --- | --- | --- |");
    let broker_pid = mosquitto.pid().context("mosquitto stopped")?;
    for rate in rates {
        let row = measure(
            &runtime,
            &vehicles,
            &observer,
            &depot,
            broker_pid,
            f64::from(rate),
        )?;
        println!("{row}");
    }
    println!(
        "\nDepot peak RSS (VmHWM): {:.1} MiB.",
        peak_rss_kib(depot.pid()) as f64 / 1024.0
    );
    let errors = vehicles.errors.load(Ordering::Relaxed);
    if errors > 0 {
        bail!("{errors} vehicle connection errors during the run");
    }
    Ok(())
}

/// Registers vehicles through the API, as a technician does; returns their MQTT logins.
fn register(depot: &Server, n: usize) -> Result<Vec<(String, String)>> {
    let token = depot.token("technician");
    (0..n)
        .map(|i| {
            let id = format!("veh-{i:04}");
            let response = http()
                .post(depot.url("/api/v1/vehicles"))
                .bearer_auth(&token)
                .json(&json!({"id": id, "hardware_id": "bench-hw"}))
                .send()?;
            if response.status() != 201 {
                bail!("registering {id}: {}", response.text()?);
            }
            let body: Value = response.json()?;
            let password = body["mqtt"]["password"]
                .as_str()
                .context("no MQTT password in the answer")?;
            Ok((id, password.to_owned()))
        })
        .collect()
}

fn wait_until(what: &str, mut done: impl FnMut() -> Result<bool>) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done()? {
        if Instant::now() > deadline {
            bail!("timed out waiting until {what}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn mosquitto_version() -> String {
    Command::new("mosquitto")
        .arg("-h")
        .output()
        .ok()
        .and_then(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .next()?
                .split_whitespace()
                .last()
                .map(str::to_owned)
        })
        .unwrap_or_default()
}

fn now_ms() -> i64 {
    jiff::Timestamp::now().as_millisecond()
}

fn state(soc: f64, ts_ms: i64) -> State {
    State {
        soc_percent: soc,
        battery_kwh: 82.0,
        plugged_in: true,
        departure_ms: Some(ts_ms + 3_600_000),
        installed_version: "1.4.2".into(),
        slot: Slot::A,
        free_bytes: 12_000_000_000,
        ts_ms,
    }
}

fn sample_payload() -> Vec<u8> {
    serde_json::to_vec(&state(57.25, now_ms())).expect("a state serialises")
}

/// `mosquitto_sub -q 1` on the same topics, counting what it prints (one line per message).
struct Observer {
    child: Child,
    received: Arc<AtomicU64>,
}

impl Observer {
    fn start(port: u16, filter: &str) -> Result<Self> {
        let mut child = Command::new("mosquitto_sub")
            .args(["-h", "127.0.0.1", "-p", &port.to_string()])
            .args(["-u", OBSERVER, "-P", "observer-password"])
            .args(["-q", "1", "-t", filter, "-F", "%t"])
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mosquitto_sub (Debian package mosquitto-clients)")?;
        let stdout = child.stdout.take().context("piped stdout")?;
        let received = Arc::new(AtomicU64::new(0));
        let counter = received.clone();
        std::thread::spawn(move || {
            for _ in BufReader::new(stdout).lines().map_while(|l| l.ok()) {
                counter.fetch_add(1, Ordering::Relaxed);
            }
        });
        Ok(Observer { child, received })
    }

    fn received(&self) -> u64 {
        self.received.load(Ordering::Relaxed)
    }
}

impl Drop for Observer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The publishing vehicles: one connection each, driven on the bench's runtime.
struct Vehicles {
    clients: Vec<(AsyncClient, String)>,
    sent: Arc<AtomicU64>,
    /// PUBACKs from Mosquitto: it has taken responsibility for the message.
    acked: Arc<AtomicU64>,
    errors: Arc<AtomicU64>,
}

impl Vehicles {
    async fn connect(port: u16, logins: &[(String, String)], topics: &Topics) -> Result<Self> {
        let sent = Arc::new(AtomicU64::new(0));
        let errors = Arc::new(AtomicU64::new(0));
        let acked = Arc::new(AtomicU64::new(0));
        let mut clients = Vec::new();
        let mut connected = Vec::new();
        for (id, password) in logins {
            let mut options = MqttOptions::new(id, "127.0.0.1", port);
            options.set_credentials(id, password);
            options.set_keep_alive(Duration::from_secs(30));
            options.set_inflight(100);
            let (client, mut eventloop) = AsyncClient::new(options, 256);
            let (tx, rx) = tokio::sync::oneshot::channel();
            let (errors, acks) = (errors.clone(), acked.clone());
            let who = id.clone();
            tokio::spawn(async move {
                let mut tx = Some(tx);
                loop {
                    match eventloop.poll().await {
                        Ok(Event::Incoming(Packet::ConnAck(_))) => {
                            if let Some(tx) = tx.take() {
                                let _ = tx.send(());
                            }
                        }
                        Ok(Event::Incoming(Packet::PubAck(_))) => {
                            acks.fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            errors.fetch_add(1, Ordering::Relaxed);
                            eprintln!("{who}: {e}");
                            tokio::time::sleep(Duration::from_millis(200)).await;
                        }
                    }
                }
            });
            clients.push((client, topics.upward(id, Upward::State)));
            connected.push(rx);
        }
        for rx in connected {
            tokio::time::timeout(Duration::from_secs(30), rx)
                .await
                .context("a vehicle did not connect within 30 s")??;
        }
        Ok(Vehicles {
            clients,
            sent,
            acked,
            errors,
        })
    }

    /// Every vehicle publishes at `rate / VEHICLES` per second, spread evenly, until `stop`.
    fn offer(&self, runtime: &tokio::runtime::Runtime, rate: f64, stop: Arc<AtomicBool>) {
        let period = Duration::from_secs_f64(self.clients.len() as f64 / rate);
        for (i, (client, topic)) in self.clients.iter().enumerate() {
            let (client, topic) = (client.clone(), topic.clone());
            let (sent, stop) = (self.sent.clone(), stop.clone());
            let offset = period.mul_f64(i as f64 / self.clients.len() as f64);
            runtime.spawn(async move {
                let start = tokio::time::Instant::now() + offset;
                let mut ticks = tokio::time::interval_at(start, period);
                let mut last_ts = 0;
                let mut n = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    ticks.tick().await;
                    // Strictly increasing per vehicle: an equal timestamp would be stale.
                    let ts = now_ms().max(last_ts + 1);
                    last_ts = ts;
                    n += 1;
                    let payload = serde_json::to_vec(&state(20.0 + (n % 800) as f64 / 10.0, ts))
                        .expect("a state serialises");
                    if client
                        .publish(&topic, QoS::AtLeastOnce, false, payload)
                        .await
                        .is_err()
                    {
                        return;
                    }
                    sent.fetch_add(1, Ordering::Relaxed);
                }
            });
        }
    }
}

/// Counters at one instant.
struct Sample {
    at: Instant,
    sent: u64,
    acked: u64,
    received: u64,
    applied: f64,
    dropped: f64,
    lag: Vec<(f64, f64)>,
    depot_cpu: f64,
    broker_cpu: f64,
}

fn sample(vehicles: &Vehicles, observer: &Observer, depot: &Server, broker: u32) -> Result<Sample> {
    let text = depot.metrics()?;
    let at = Instant::now();
    Ok(Sample {
        at,
        sent: vehicles.sent.load(Ordering::Relaxed),
        acked: vehicles.acked.load(Ordering::Relaxed),
        received: observer.received(),
        applied: metric_sum(
            &text,
            "atlasmesh_vehicle_messages_total",
            &[r#"kind="state""#, r#"result="applied""#],
        ),
        dropped: metric_sum(&text, "atlasmesh_vehicle_messages_total", &[])
            - metric_sum(
                &text,
                "atlasmesh_vehicle_messages_total",
                &[r#"result="applied""#],
            ),
        lag: buckets(&text, LAG),
        depot_cpu: cpu_seconds(&[depot.pid()]),
        broker_cpu: cpu_seconds(&[broker]),
    })
}

/// A histogram's cumulative buckets, `(upper bound, count)`, +Inf last.
fn buckets(text: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    text.lines()
        .filter_map(|l| {
            let rest = l.strip_prefix(&prefix)?;
            let (le, count) = rest.split_once("\"} ")?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, count.parse().ok()?))
        })
        .collect()
}

/// The `q` quantile of the observations between two snapshots of a histogram, interpolated
/// linearly inside its bucket (as Prometheus' `histogram_quantile` does).
fn quantile(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> Option<f64> {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .zip(before)
        .map(|(&(le, a), &(_, b))| (le, a - b))
        .collect();
    let total = delta.last()?.1;
    if total <= 0.0 {
        return None;
    }
    let rank = q * total;
    let mut lower = (0.0, 0.0);
    for &(le, count) in &delta {
        if count >= rank {
            if le.is_infinite() {
                return Some(lower.0);
            }
            let within = (rank - lower.1) / (count - lower.1).max(f64::MIN_POSITIVE);
            return Some(lower.0 + (le - lower.0) * within);
        }
        lower = (le, count);
    }
    None
}

fn measure(
    runtime: &tokio::runtime::Runtime,
    vehicles: &Vehicles,
    observer: &Observer,
    depot: &Server,
    broker: u32,
    rate: f64,
) -> Result<String> {
    let start = sample(vehicles, observer, depot, broker)?;
    let stop = Arc::new(AtomicBool::new(false));
    vehicles.offer(runtime, rate, stop.clone());
    std::thread::sleep(WARMUP);
    let s0 = sample(vehicles, observer, depot, broker)?;
    std::thread::sleep(WINDOW);
    let s1 = sample(vehicles, observer, depot, broker)?;
    stop.store(true, Ordering::Relaxed);

    // Drain: everything sent reaches both subscribers, or the table says what did not.
    let deadline = Instant::now() + DRAIN;
    let mut last = sample(vehicles, observer, depot, broker)?;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(500));
        let now = sample(vehicles, observer, depot, broker)?;
        let settled = now.sent == last.sent
            && now.acked == last.acked
            && now.received == last.received
            && now.applied == last.applied
            && now.received - start.received == now.sent - start.sent
            && now.applied - start.applied == (now.sent - start.sent) as f64;
        last = now;
        if settled {
            break;
        }
    }

    let secs = (s1.at - s0.at).as_secs_f64();
    let acked = (s1.acked - s0.acked) as f64 / secs;
    let received = (s1.received - s0.received) as f64 / secs;
    let applied = (s1.applied - s0.applied) / secs;
    let ms = |q| quantile(&s0.lag, &s1.lag, q).map_or("-".into(), |s| format!("{:.1}", s * 1e3));
    if last.dropped > start.dropped {
        eprintln!(
            "the depot dropped {} messages; see its log",
            last.dropped - start.dropped
        );
    }
    Ok(format!(
        "| {rate:.0} | {acked:.0} | {received:.0} | {applied:.0} | **{:.3}** | {} / {} | {:.2} | {:.2} | {} / {} / {} / {} |",
        applied / received,
        ms(0.5),
        ms(0.95),
        (s1.depot_cpu - s0.depot_cpu) / secs,
        (s1.broker_cpu - s0.broker_cpu) / secs,
        last.sent - start.sent,
        last.acked - start.acked,
        last.received - start.received,
        last.applied - start.applied,
    ))
}
