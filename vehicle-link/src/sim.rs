//! The fleet simulator: vehicles that dock and leave on a schedule, charge while plugged in,
//! have departure times, report state and health over MQTT, and pull real OTA through the
//! reference client ([`crate::ota`]) when the depot tells them to, with a configurable failure
//! rate per version for canary demonstrations.
//!
//! Everything a vehicle does follows from the seed, so a run can be repeated. A simulated
//! vehicle trusts the fleet root its depot serves on first use (a real vehicle is provisioned
//! with it at the factory).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Packet, QoS};
use serde::Serialize;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::ota::{self, Outcome, PullConfig};
use crate::wire::{
    Dock, Health, HealthStatus, Link, OtaAction, OtaCommand, OtaOutcome, OtaPhase, OtaReport, Slot,
    State, Topics, Upward,
};

/// A vehicle's login at the broker.
#[derive(Debug, Clone)]
pub struct SimVehicle {
    pub id: String,
    pub password: String,
}

#[derive(Debug, Clone)]
pub struct SimConfig {
    pub topics: Topics,
    pub broker_host: String,
    pub broker_port: u16,
    /// The depot's vehicle-facing base URL (OTA pulls).
    pub depot_url: Url,
    pub vehicles: Vec<SimVehicle>,
    pub seed: u64,
    /// One simulated second lasts this long (smaller runs the day faster).
    pub second: Duration,
    /// Probability that installing a version fails, by version; others never fail.
    pub failure_rates: HashMap<String, f64>,
    /// Per-vehicle OTA state and slots live below.
    pub state_dir: PathBuf,
    pub hardware_id: String,
    pub initial_version: String,
    /// Vehicles keep a duty roster, for charging demonstrations: each leaves at its own time
    /// between 05:00 and 08:00 UTC, stays docked until then, and charges at an AC charger's
    /// 11 kW in simulated time.
    pub roster: bool,
    /// Simulated chargers at the bays: a roster vehicle docked at one charges through it, at
    /// whatever the depot wrote, instead of at a fixed 11 kW.
    pub chargers: Option<BayChargers>,
}

/// The chargers at the bays, as the simulated vehicles see them.
pub trait Bays: Send + Sync {
    /// A vehicle is docked at `bay` with `soc_percent`: plugs it in if the charger there has
    /// nobody, and returns its state of charge as the charger has it; None when the bay has
    /// no charger.
    fn docked(&self, bay: &str, soc_percent: f64, battery_kwh: f64) -> Option<f64>;
    /// The vehicle at `bay` left.
    fn left(&self, bay: &str);
}

/// A shared [`Bays`].
#[derive(Clone)]
pub struct BayChargers(pub Arc<dyn Bays>);

impl std::fmt::Debug for BayChargers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("BayChargers")
    }
}

/// An AC charger's power, for roster vehicles, kW.
const ROSTER_CHARGE_KW: f64 = 11.0;

/// Roster vehicle `index`'s next departure after `now_ms`, Unix ms.
pub fn roster_departure(index: usize, now_ms: i64) -> i64 {
    const DAY: i64 = 86_400_000;
    let at = 5 * 3_600_000 + ((index as i64 * 37) % 180) * 60_000;
    let today = now_ms.div_euclid(DAY) * DAY + at;
    if today > now_ms { today } else { today + DAY }
}

/// What a vehicle last told the depot, for comparing with the registry.
#[derive(Debug, Clone, Serialize)]
pub struct Final {
    pub id: String,
    pub docked: bool,
    pub bay: Option<String>,
    pub soc_percent: Option<f64>,
    pub plugged_in: Option<bool>,
    pub installed_version: Option<String>,
    pub messages: u64,
    pub errors: Vec<String>,
}

/// Runs the fleet until `shutdown`; returns each vehicle's last report.
pub async fn run(config: SimConfig, shutdown: CancellationToken) -> Vec<Final> {
    let config = Arc::new(config);
    let mut tasks = Vec::with_capacity(config.vehicles.len());
    for (index, vehicle) in config.vehicles.iter().enumerate() {
        let config = config.clone();
        let vehicle = vehicle.clone();
        let shutdown = shutdown.clone();
        tasks.push(tokio::spawn(async move {
            run_vehicle(config, index, vehicle, shutdown).await
        }));
    }
    let mut out = Vec::with_capacity(tasks.len());
    for task in tasks {
        match task.await {
            Ok(f) => out.push(f),
            Err(e) => tracing::error!(error = %e, "a simulated vehicle's task failed"),
        }
    }
    out
}

/// The simulated vehicle's own state.
struct Car {
    id: String,
    rng: StdRng,
    docked: bool,
    bay: String,
    soc: f64,
    battery_kwh: f64,
    version: String,
    slot: Slot,
    /// What the other slot holds, once an install succeeded: where a rollback returns to.
    previous: Option<String>,
    /// A rollback the depot asked for while an install was running: the version to leave.
    roll_back: Option<String>,
    /// Seconds until it leaves (docked) or returns (away).
    countdown: u32,
    clock: u64,
    busy: bool,
    index: usize,
    roster: bool,
    second: Duration,
    chargers: Option<BayChargers>,
}

impl Car {
    fn new(index: usize, id: &str, config: &SimConfig) -> Car {
        let mut rng =
            StdRng::seed_from_u64(config.seed ^ (index as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        // Most vehicles start in the depot, so a fresh panel has something to show.
        let docked = rng.random_bool(0.8);
        let docked = docked || config.roster;
        let countdown = if config.roster {
            roster_countdown(index, config.second)
        } else if docked {
            rng.random_range(60..240)
        } else {
            rng.random_range(20..90)
        };
        Car {
            id: id.to_owned(),
            soc: rng.random_range(15.0..90.0),
            battery_kwh: [60.0, 75.0, 82.5, 100.0][rng.random_range(0..4)],
            docked,
            bay: format!("bay-{}", index + 1),
            version: config.initial_version.clone(),
            slot: Slot::A,
            previous: None,
            roll_back: None,
            countdown,
            clock: 0,
            busy: false,
            index,
            roster: config.roster,
            second: config.second,
            chargers: config.chargers.clone(),
            rng,
        }
    }

    fn plugged(&self) -> bool {
        self.docked && self.soc < 100.0
    }

    /// One simulated second; true when the vehicle docked or left.
    fn step(&mut self) -> bool {
        self.clock += 1;
        let at_charger = match &self.chargers {
            Some(c) if self.plugged() && self.roster => {
                c.0.docked(&self.bay, self.soc, self.battery_kwh)
            }
            _ => None,
        };
        if let Some(soc) = at_charger {
            self.soc = soc;
        } else if self.plugged() && self.roster {
            let percent = ROSTER_CHARGE_KW / 3600.0 / self.battery_kwh * 100.0;
            self.soc = (self.soc + percent).min(100.0);
        } else if self.plugged() {
            self.soc = (self.soc + 0.4).min(100.0);
        } else if !self.docked {
            self.soc = (self.soc - 0.15).max(5.0);
        }
        self.countdown = self.countdown.saturating_sub(1);
        if self.countdown == 0 && !self.busy {
            if let (true, Some(c)) = (self.docked, &self.chargers) {
                c.0.left(&self.bay);
            }
            self.docked = !self.docked;
            self.countdown = if self.docked && self.roster {
                roster_countdown(self.index, self.second)
            } else if self.docked {
                self.rng.random_range(60..240)
            } else {
                self.rng.random_range(20..90)
            };
            return true;
        }
        false
    }

    /// Leaves `version` for the other slot if it runs it; true when it switched.
    fn roll_back(&mut self, version: &str) -> bool {
        match self.previous.take() {
            Some(previous) if self.version == version => {
                self.previous = Some(std::mem::replace(&mut self.version, previous));
                self.slot = match self.slot {
                    Slot::A => Slot::B,
                    Slot::B => Slot::A,
                };
                true
            }
            other => {
                self.previous = other;
                false
            }
        }
    }

    fn dock(&self) -> Dock {
        Dock {
            docked: self.docked,
            bay: self.docked.then(|| self.bay.clone()),
            ts_ms: now_ms(),
        }
    }

    fn state(&self, second: Duration) -> State {
        let departure = self.docked.then(|| {
            if self.roster {
                roster_departure(self.index, now_ms())
            } else {
                now_ms() + (second.as_millis() as i64) * i64::from(self.countdown)
            }
        });
        State {
            soc_percent: (self.soc * 10.0).round() / 10.0,
            battery_kwh: self.battery_kwh,
            plugged_in: self.plugged(),
            departure_ms: departure,
            installed_version: self.version.clone(),
            slot: self.slot,
            free_bytes: 8 << 30,
            ts_ms: now_ms(),
        }
    }
}

/// "Back on the other slot, off `version`."
fn rollback_report(version: &str) -> Vec<u8> {
    serde_json::to_vec(&OtaReport {
        version: version.to_owned(),
        phase: OtaPhase::Rollback,
        outcome: OtaOutcome::Succeeded,
        bytes_done: None,
        bytes_total: None,
        error: None,
        ts_ms: now_ms(),
    })
    .unwrap_or_default()
}

/// Simulated seconds until a roster vehicle's departure.
fn roster_countdown(index: usize, second: Duration) -> u32 {
    let now = now_ms();
    let ms = (roster_departure(index, now) - now).max(1000);
    u32::try_from(ms / (second.as_millis().max(1) as i64)).unwrap_or(u32::MAX)
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// What an OTA task tells its vehicle when it ends.
struct Installed {
    version: String,
    ok: bool,
    /// The reports that said it went well (install, boot, health), for re-sending.
    succeeded: Vec<Vec<u8>>,
}

async fn run_vehicle(
    config: Arc<SimConfig>,
    index: usize,
    vehicle: SimVehicle,
    shutdown: CancellationToken,
) -> Final {
    let topics = &config.topics;
    let mut car = Car::new(index, &vehicle.id, &config);
    let mut errors = Vec::new();
    let mut messages = 0u64;
    let mut options = MqttOptions::new(&vehicle.id, &config.broker_host, config.broker_port);
    options
        .set_credentials(&vehicle.id, &vehicle.password)
        .set_keep_alive(Duration::from_secs(30))
        .set_last_will(LastWill::new(
            topics.upward(&vehicle.id, Upward::Link),
            serde_json::to_vec(&Link { online: false }).unwrap_or_default(),
            QoS::AtLeastOnce,
            true,
        ));
    let (client, eventloop) = AsyncClient::new(options, 64);
    // The event loop runs in its own task: cancelling `poll` (as a `select!` beside a timer
    // would) in the middle of connecting drops the half-open connection.
    let (events_tx, mut events) = mpsc::channel(64);
    let poller = tokio::spawn(poll_events(eventloop, events_tx));
    let publish = |kind: Upward, payload: Vec<u8>, retain: bool| {
        let client = client.clone();
        let topic = topics.upward(&vehicle.id, kind);
        async move {
            client
                .publish(topic, QoS::AtLeastOnce, retain, payload)
                .await
        }
    };
    let (ota_tx, mut ota_rx) = mpsc::channel::<Installed>(4);
    // Spread the fleet's reports over the reporting period instead of a burst every 5 s.
    let mut tick = tokio::time::interval(config.second);
    let offset = (index % 5) as u64;
    let mut connected_once = false;
    // What the depot was last told, for the final report.
    let mut last_state: Option<State> = None;
    let mut last_dock: Option<Dock> = None;
    // The latest OTA outcome that went well, re-sent on every reconnect: a depot killed
    // between its embedded broker's acknowledgement and its store never saw it. Failures are
    // not re-sent: a later rollout of the same version would count an old one as its own.
    let mut last_success: Vec<Vec<u8>> = Vec::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            event = events.recv() => match event.unwrap_or(Err(rumqttc::ConnectionError::RequestsDone)) {
                Ok(Event::Incoming(Packet::ConnAck(_))) => {
                    let _ = client.subscribe(topics.downward_filter(&vehicle.id), QoS::AtLeastOnce).await;
                    let link = serde_json::to_vec(&Link { online: true }).unwrap_or_default();
                    let _ = publish(Upward::Link, link, true).await;
                    let dock = serde_json::to_vec(last_dock.insert(car.dock())).unwrap_or_default();
                    let _ = publish(Upward::Dock, dock, true).await;
                    let state = car.state(config.second);
                    let state = serde_json::to_vec(last_state.insert(state)).unwrap_or_default();
                    let _ = publish(Upward::State, state, false).await;
                    messages += 3;
                    if connected_once {
                        for report in &last_success {
                            let _ = publish(Upward::Ota, report.clone(), false).await;
                            messages += 1;
                        }
                    }
                    connected_once = true;
                }
                Ok(Event::Incoming(Packet::Publish(p))) => {
                    let Ok(command) = serde_json::from_slice::<OtaCommand>(&p.payload) else {
                        continue;
                    };
                    if !p.topic.ends_with("/cmd/ota") {
                        continue;
                    }
                    if command.action == OtaAction::Rollback {
                        if car.busy {
                            car.roll_back = Some(command.version);
                        } else {
                            car.roll_back(&command.version);
                            let report = rollback_report(&command.version);
                            last_success = vec![report.clone()];
                            let _ = publish(Upward::Ota, report, false).await;
                            let state = serde_json::to_vec(last_state.insert(car.state(config.second))).unwrap_or_default();
                            let _ = publish(Upward::State, state, false).await;
                            messages += 2;
                        }
                        continue;
                    }
                    if !car.docked || car.busy || command.version == car.version {
                        // A vehicle away, busy or already there ignores it; the depot says it again.
                        tracing::debug!(vehicle = %vehicle.id, version = %command.version, docked = car.docked, busy = car.busy, running = %car.version, "ignored an OTA command");
                    } else {
                        car.busy = true;
                        let fails = config.failure_rates.get(&command.version).copied().unwrap_or(0.0);
                        let fail = car.rng.random_bool(fails.clamp(0.0, 1.0));
                        tokio::spawn(install(config.clone(), vehicle.id.clone(), client.clone(), command, car.version.clone(), fail, ota_tx.clone()));
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    if connected_once {
                        errors.push(format!("connection: {e}"));
                    } else if errors.is_empty() {
                        errors.push(format!("cannot connect: {e}"));
                    }
                }
            },
            _ = tick.tick() => {
                if !connected_once {
                    continue;
                }
                if car.step() {
                    let dock = serde_json::to_vec(last_dock.insert(car.dock())).unwrap_or_default();
                    let _ = publish(Upward::Dock, dock, true).await;
                    messages += 1;
                }
                if car.clock % 5 == offset {
                    let state = car.state(config.second);
                    let state = serde_json::to_vec(last_state.insert(state)).unwrap_or_default();
                    let _ = publish(Upward::State, state, false).await;
                    messages += 1;
                }
                if car.clock % 30 == offset {
                    let health = Health { status: HealthStatus::Ok, faults: vec![], ts_ms: now_ms() };
                    let _ = publish(Upward::Health, serde_json::to_vec(&health).unwrap_or_default(), false).await;
                    messages += 1;
                }
            }
            Some(done) = ota_rx.recv() => {
                car.busy = false;
                if done.ok {
                    last_success = done.succeeded;
                    car.previous = Some(std::mem::replace(&mut car.version, done.version));
                    car.slot = match car.slot { Slot::A => Slot::B, Slot::B => Slot::A };
                }
                if let Some(leave) = car.roll_back.take() {
                    car.roll_back(&leave);
                    let report = rollback_report(&leave);
                    last_success = vec![report.clone()];
                    let _ = publish(Upward::Ota, report, false).await;
                    messages += 1;
                }
                let state = car.state(config.second);
                let state = serde_json::to_vec(last_state.insert(state)).unwrap_or_default();
                let _ = publish(Upward::State, state, false).await;
                messages += 1;
            }
        }
    }
    // Say goodbye properly: what was published is flushed before the DISCONNECT.
    let _ = client.disconnect().await;
    drop(events);
    if tokio::time::timeout(Duration::from_secs(5), poller)
        .await
        .is_err()
    {
        errors.push("could not flush and disconnect within 5 s".into());
    }
    Final {
        id: car.id,
        docked: last_dock.as_ref().is_some_and(|d| d.docked),
        bay: last_dock.and_then(|d| d.bay),
        soc_percent: last_state.as_ref().map(|s| s.soc_percent),
        plugged_in: last_state.as_ref().map(|s| s.plugged_in),
        installed_version: last_state.map(|s| s.installed_version),
        messages,
        errors,
    }
}

/// Drives the MQTT connection, handing events to the vehicle; retries a lost connection every
/// second. Ends after the DISCONNECT is sent (everything queued before it went out first).
async fn poll_events(
    mut eventloop: rumqttc::EventLoop,
    events: mpsc::Sender<Result<Event, rumqttc::ConnectionError>>,
) {
    loop {
        let event = eventloop.poll().await;
        let failed = event.is_err();
        if let Ok(Event::Outgoing(rumqttc::Outgoing::Disconnect)) = event {
            return;
        }
        // The vehicle may have stopped listening while flushing; keep driving the connection.
        let _ = events.send(event).await;
        if failed {
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Pulls `command.version` through the reference client and reports each phase.
async fn install(
    config: Arc<SimConfig>,
    vehicle: String,
    client: AsyncClient,
    command: OtaCommand,
    current: String,
    fail: bool,
    done: mpsc::Sender<Installed>,
) {
    let topic = config.topics.upward(&vehicle, Upward::Ota);
    let report = |phase, outcome, error: Option<String>| {
        let client = client.clone();
        let topic = topic.clone();
        let version = command.version.clone();
        async move {
            let r = OtaReport {
                version,
                phase,
                outcome,
                bytes_done: None,
                bytes_total: None,
                error,
                ts_ms: now_ms(),
            };
            let payload = serde_json::to_vec(&r).unwrap_or_default();
            let _ = client
                .publish(topic, QoS::AtLeastOnce, false, payload.clone())
                .await;
            payload
        }
    };
    let mut succeeded = Vec::new();
    report(OtaPhase::Download, OtaOutcome::Started, None).await;
    let started = std::time::Instant::now();
    tracing::debug!(vehicle = %vehicle, version = %command.version, "pulling");
    let dir = config.state_dir.join(&vehicle);
    // A depot that is briefly unreachable (restarting) is waited for: the pull resumes from
    // its saved progress, and only a real refusal or a depot gone for good is a failure.
    let mut attempt = 0u64;
    let pulled = loop {
        let result = match fetch_root(&config.depot_url, &dir).await {
            Ok(()) => ota::pull(&PullConfig {
                depot: config.depot_url.clone(),
                vehicle_id: vehicle.clone(),
                state_dir: dir.clone(),
                slot: dir.join("inactive-slot.img"),
                current: None,
                hardware_id: Some(config.hardware_id.clone()),
                installed_version: Some(current.clone()),
                expected_depot: None,
                concurrency: 4,
                stop_after_chunks: None,
            })
            .await
            .map_err(|e| (e.is_transient(), format!("{}: {e}", e.code()))),
            Err(e) => Err((true, e)),
        };
        match result {
            Err((true, e)) if attempt < PULL_RETRIES => {
                attempt += 1;
                tracing::debug!(vehicle = %vehicle, attempt, error = %e, "depot unreachable; retrying the pull");
                tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
            }
            other => break other.map_err(|(_, e)| e),
        }
    };
    tracing::debug!(vehicle = %vehicle, version = %command.version, seconds = started.elapsed().as_secs_f64(), result = ?pulled.as_ref().map(|r| &r.outcome), "pulled");
    let ok = match pulled {
        Ok(r)
            if matches!(
                r.outcome,
                Outcome::Written { .. } | Outcome::UpToDate { .. }
            ) =>
        {
            report(OtaPhase::Download, OtaOutcome::Succeeded, None).await;
            report(OtaPhase::Install, OtaOutcome::Started, None).await;
            if fail {
                report(
                    OtaPhase::Install,
                    OtaOutcome::Failed,
                    Some("simulated install failure".into()),
                )
                .await;
                false
            } else {
                for phase in [OtaPhase::Install, OtaPhase::Boot, OtaPhase::Health] {
                    succeeded.push(report(phase, OtaOutcome::Succeeded, None).await);
                }
                true
            }
        }
        Ok(r) => {
            report(
                OtaPhase::Download,
                OtaOutcome::Failed,
                Some(format!("nothing to install: {:?}", r.outcome)),
            )
            .await;
            false
        }
        Err(e) => {
            report(OtaPhase::Download, OtaOutcome::Failed, Some(e)).await;
            false
        }
    };
    let _ = done
        .send(Installed {
            version: command.version,
            ok,
            succeeded,
        })
        .await;
}

/// Pull attempts after the first while the depot is unreachable (about 18 s of waiting in all).
const PULL_RETRIES: u64 = 8;

/// Trust on first use: a simulated vehicle takes the fleet root its depot serves.
async fn fetch_root(depot: &Url, dir: &std::path::Path) -> Result<(), String> {
    let path = dir.join("fleet-root.json");
    if path.exists() {
        return Ok(());
    }
    let url = depot
        .join("tuf/image/metadata/1.root.json")
        .map_err(|e| e.to_string())?;
    let body = reqwest::get(url)
        .await
        .and_then(|r| r.error_for_status())
        .map_err(|e| format!("fetching the fleet root: {e}"))?
        .bytes()
        .await
        .map_err(|e| format!("fetching the fleet root: {e}"))?;
    tokio::fs::create_dir_all(dir)
        .await
        .map_err(|e| e.to_string())?;
    tokio::fs::write(&path, &body)
        .await
        .map_err(|e| e.to_string())
}
