//! Charging at the depot: the control loop over the chargers and the site meter.
//!
//! Every `poll_interval` the loop reads each charger and the meter, re-plans the day ahead
//! (receding horizon: only the first slot is applied), and writes the setpoints that changed,
//! decreases first, so the site limit holds between two writes. A charger that times out,
//! answers with an exception or a malformed reply, or drops the connection is faulted: the
//! depot relies on its failsafe current, counts that current as load it cannot control, plans
//! without it, and retries with a doubling wait. Keep-alives (setpoint re-writes or life bits)
//! go out as each profile asks.

pub mod db;
pub mod inputs;

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, bail};
use atlasmesh_charging::control::{self, Change};
use atlasmesh_charging::driver::{Device, DriverError, Reading};
use atlasmesh_charging::profile::{self, KeepAliveMode, Kind, Profile};
use atlasmesh_charging::schedule::{self, Method};
use jiff::tz::TimeZone;
use serde::Serialize;
use serde_json::json;
use tokio::sync::{Notify, broadcast, watch};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::config::{ChargerConfig, ChargingConfig, MeterConfig, parse_hh_mm};
use crate::http::{Clock, PanelEvent};
use crate::store::{Store, unix_ms};
use inputs::{BaseLoad, Session, SessionView};

/// First retry of a faulted charger.
const RETRY_BASE: Duration = Duration::from_secs(5);

/// Events kept per charger for the panel.
const EVENTS_KEPT: usize = 20;

/// Loads the shipped profiles and any in `dir` (which replace shipped ones of the same name).
pub fn load_profiles(dir: Option<&Path>) -> anyhow::Result<BTreeMap<String, Arc<Profile>>> {
    let mut out = BTreeMap::new();
    for (name, text) in profile::BUILTIN {
        let p = Profile::parse(text).with_context(|| format!("shipped profile {name}"))?;
        out.insert(name.to_owned(), Arc::new(p));
    }
    if let Some(dir) = dir {
        let entries = std::fs::read_dir(dir)
            .with_context(|| format!("cannot read charging.profiles_dir {}", dir.display()))?;
        for entry in entries {
            let path = entry?.path();
            if path.extension().and_then(|e| e.to_str()) != Some("toml") {
                continue;
            }
            let Some(name) = path.file_stem().and_then(|s| s.to_str()) else {
                continue;
            };
            let text = std::fs::read_to_string(&path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let p = Profile::parse(&text)
                .map_err(|e| anyhow::anyhow!("profile {}: {e}", path.display()))?;
            out.insert(name.to_owned(), Arc::new(p));
        }
    }
    Ok(out)
}

/// A charger as the API and panel show it.
#[derive(Debug, Clone, Serialize)]
pub struct ChargerView {
    pub id: String,
    pub bay: Option<String>,
    pub profile: String,
    pub model: String,
    pub address: String,
    /// `ok`, `connecting` or `faulted`.
    pub status: &'static str,
    pub error: Option<String>,
    pub error_code: Option<&'static str>,
    pub failures: u32,
    /// When the next attempt to reach a faulted charger is due, Unix ms.
    pub retry_at_ms: Option<i64>,
    pub reading: Option<Reading>,
    pub read_at_ms: Option<i64>,
    /// The current last written, A.
    pub setpoint_a: Option<f64>,
    /// The current it falls back to without the depot, A.
    pub failsafe_a: Option<f64>,
    pub vehicle: Option<String>,
    pub events: Vec<EventView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EventView {
    pub at_ms: i64,
    pub event: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct MeterView {
    pub profile: String,
    pub address: String,
    pub status: &'static str,
    pub error: Option<String>,
    pub power_kw: Option<f64>,
    pub energy_kwh: Option<f64>,
}

/// The plan as the API and panel show it.
#[derive(Debug, Clone, Serialize)]
pub struct PlanView {
    pub planned_at_ms: i64,
    pub slot_minutes: u32,
    pub site_limit_kw: f64,
    /// Forecast load other than controlled charging, kW per slot (with the failsafe current of
    /// faulted chargers).
    pub base_load_kw: Vec<f64>,
    /// Price per kWh per slot.
    pub price: Vec<f64>,
    pub method: Method,
    pub cost: f64,
    /// Circuits with their own limit, less what faulted chargers on them draw, kW.
    pub circuits: Vec<schedule::Circuit>,
    pub vehicles: Vec<PlannedVehicle>,
    pub explanation: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct PlannedVehicle {
    #[serde(flatten)]
    pub session: SessionView,
    pub circuit: Option<String>,
    pub power_kw: Vec<f64>,
    pub energy_kwh: f64,
    pub ready: bool,
    pub shortfall_kwh: f64,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    pub chargers: Vec<ChargerView>,
    pub meter: Option<MeterView>,
    pub plan: Option<PlanView>,
}

pub struct ChargingParts {
    pub config: ChargingConfig,
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub panel: broadcast::Sender<PanelEvent>,
}

/// The charging service of a running depot.
pub struct Charging {
    config: ChargingConfig,
    store: Store,
    clock: Arc<dyn Clock>,
    panel: broadcast::Sender<PanelEvent>,
    state: watch::Sender<Snapshot>,
    wake: Notify,
    tz: TimeZone,
}

/// One Modbus device the loop talks to.
struct Point {
    id: String,
    bay: Option<String>,
    circuit: Option<String>,
    profile_name: String,
    profile: Arc<Profile>,
    address: String,
    unit_id: u8,
    device: Option<Device>,
    failures: u32,
    retry_at: Instant,
    retry_at_ms: Option<i64>,
    error: Option<DriverError>,
    reading: Option<Reading>,
    read_at_ms: Option<i64>,
    setpoint_a: Option<f64>,
    written_at: Instant,
    life_at: Instant,
    events: VecDeque<EventView>,
    /// The energy register when the vehicle on it plugged in (or when first seen plugged), Wh.
    session_start_wh: Option<f64>,
}

impl Point {
    fn new(
        id: &str,
        bay: Option<String>,
        name: &str,
        profile: Arc<Profile>,
        address: &str,
        unit: Option<u8>,
    ) -> Point {
        let now = Instant::now();
        Point {
            id: id.to_owned(),
            bay,
            circuit: None,
            profile_name: name.to_owned(),
            unit_id: unit.unwrap_or(profile.device.unit_id),
            profile,
            address: address.to_owned(),
            device: None,
            failures: 0,
            retry_at: now,
            retry_at_ms: None,
            error: None,
            reading: None,
            read_at_ms: None,
            setpoint_a: None,
            written_at: now,
            life_at: now,
            events: VecDeque::new(),
            session_start_wh: None,
        }
    }

    fn event(&mut self, at_ms: i64, event: String) {
        tracing::info!(charger = %self.id, event = %event, "charger");
        if self.events.len() == EVENTS_KEPT {
            self.events.pop_front();
        }
        self.events.push_back(EventView { at_ms, event });
    }

    fn fail(&mut self, e: DriverError, now_ms: i64, retry_max: Duration) {
        self.device = None;
        self.failures = self.failures.saturating_add(1);
        let wait = control::backoff(self.failures, RETRY_BASE, retry_max);
        self.retry_at = Instant::now() + wait;
        self.retry_at_ms = Some(now_ms + wait.as_millis() as i64);
        if self.failures == 1 {
            tracing::warn!(charger = %self.id, address = %self.address, error = %e, code = e.code(),
                "charger faulted; it falls back to its failsafe current and the plan goes on without it");
            self.event(now_ms, format!("faulted: {e}"));
        } else {
            tracing::debug!(charger = %self.id, error = %e, failures = self.failures, "charger still unreachable");
        }
        // The setpoint it runs at is no longer ours to know: it is at its failsafe.
        self.setpoint_a = None;
        // Nor is who is plugged in once it answers again: count energy from then.
        self.session_start_wh = None;
        self.error = Some(e);
    }

    /// Connects when due and reads; on any failure the point is faulted.
    async fn refresh(&mut self, timeout: Duration, retry_max: Duration, now_ms: i64) {
        if self.device.is_none() {
            if Instant::now() < self.retry_at {
                return;
            }
            match self.connect(timeout).await {
                Ok(d) => self.device = Some(d),
                Err(e) => return self.fail(e, now_ms, retry_max),
            }
        }
        let Some(device) = self.device.as_mut() else {
            return;
        };
        match device.poll().await {
            Ok(r) => {
                if self.failures > 0 {
                    self.event(now_ms, "answering again".into());
                }
                self.failures = 0;
                self.error = None;
                self.retry_at_ms = None;
                for e in control::events(self.reading.as_ref(), &r) {
                    self.event(now_ms, e.as_str().to_owned());
                }
                let was_plugged = self.reading.as_ref().is_some_and(|p| p.plugged);
                self.session_start_wh =
                    inputs::session_start(self.session_start_wh, was_plugged, &r);
                self.reading = Some(r);
                self.read_at_ms = Some(now_ms);
            }
            Err(e) => self.fail(e, now_ms, retry_max),
        }
    }

    async fn connect(&mut self, timeout: Duration) -> Result<Device, DriverError> {
        let addr = resolve(&self.address)
            .await
            .map_err(|reason| DriverError::Connect {
                addr: SocketAddr::from(([0, 0, 0, 0], 0)),
                reason,
            })?;
        let mut device = Device::connect(addr, self.unit_id, self.profile.clone(), timeout).await?;
        device.configure_failsafe().await?;
        Ok(device)
    }

    /// kW the charger may draw without the depot's say: its failsafe (or, with none, whatever
    /// it was last allowed, up to its maximum) while a vehicle was last seen on it.
    fn uncontrolled_kw(&self) -> f64 {
        if self.device.is_some() || !self.reading.as_ref().is_some_and(|r| r.plugged) {
            return 0.0;
        }
        let amps = match &self.profile.failsafe {
            Some(f) => f.current_a,
            None => self.profile.device.max_current_a,
        };
        self.profile.watts(amps) / 1000.0
    }

    /// What the charger may draw now, kW. Unknown (never written, or after a fault) counts as
    /// more than any setpoint, so writing a known one is a decrease: first, and never dropped
    /// as unchanged.
    fn allowed_kw(&self) -> f64 {
        self.setpoint_a
            .map_or(f64::INFINITY, |a| self.profile.watts(a) / 1000.0)
    }

    fn status(&self) -> &'static str {
        match (&self.device, &self.error) {
            (Some(_), _) => "ok",
            (None, Some(_)) => "faulted",
            (None, None) => "connecting",
        }
    }
}

/// What planning needs of a point (the point itself holds a connection that is not `Sync`).
struct Plug {
    id: String,
    /// Energy delivered since the vehicle plugged in, kWh at the charger.
    delivered_kwh: f64,
    bay: Option<String>,
    circuit: Option<String>,
    profile: Arc<Profile>,
    /// Answering, with a vehicle connected.
    plugged: bool,
    uncontrolled_kw: f64,
}

impl Plug {
    fn of(p: &Point) -> Plug {
        Plug {
            id: p.id.clone(),
            delivered_kwh: match (
                p.session_start_wh,
                p.reading.as_ref().and_then(|r| r.energy_wh),
            ) {
                (Some(start), Some(now)) if now.is_finite() => (now - start).max(0.0) / 1000.0,
                _ => 0.0,
            },
            bay: p.bay.clone(),
            circuit: p.circuit.clone(),
            profile: p.profile.clone(),
            plugged: p.device.is_some() && p.reading.as_ref().is_some_and(|r| r.plugged),
            uncontrolled_kw: p.uncontrolled_kw(),
        }
    }
}

/// `host:port` to the first address it resolves to.
pub async fn resolve(address: &str) -> Result<SocketAddr, String> {
    tokio::net::lookup_host(address)
        .await
        .map_err(|e| format!("cannot resolve {address}: {e}"))?
        .next()
        .ok_or_else(|| format!("{address} resolves to nothing"))
}

impl Charging {
    /// Checks the chargers' profiles and starts the loop (when any charger or meter is set up).
    pub fn start(
        parts: ChargingParts,
        shutdown: CancellationToken,
    ) -> anyhow::Result<Arc<Charging>> {
        let profiles = load_profiles(parts.config.profiles_dir.as_deref())?;
        let mut points = Vec::new();
        for c in &parts.config.chargers {
            points.push(point_for(&profiles, c)?);
        }
        let meter = match &parts.config.meter {
            Some(m) => Some(meter_point(&profiles, m)?),
            None => None,
        };
        let charging = Arc::new(Charging {
            tz: TimeZone::system(),
            config: parts.config,
            store: parts.store,
            clock: parts.clock,
            panel: parts.panel,
            state: watch::channel(Snapshot::default()).0,
            wake: Notify::new(),
        });
        if !points.is_empty() || meter.is_some() {
            tokio::spawn(charging.clone().run(points, meter, shutdown));
        }
        Ok(charging)
    }

    pub fn snapshot(&self) -> Snapshot {
        self.state.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.state.subscribe()
    }

    /// Re-plan now (settings changed).
    pub fn replan(&self) {
        self.wake.notify_one();
    }

    pub fn config(&self) -> &ChargingConfig {
        &self.config
    }

    /// The site as in force: the cloud's overrides over an admin's settings over the
    /// configured defaults.
    pub async fn site(&self) -> Result<db::Site, crate::store::StoreError> {
        let (set, (cloud_limit, cloud_tariff)) = self
            .store
            .read(|c| {
                Ok::<_, crate::store::StoreError>((
                    db::site(c)?,
                    crate::cloud_link::site_overrides(c)?,
                ))
            })
            .await?;
        let mut site = set.unwrap_or_else(|| db::Site {
            limit_kw: self.config.site_limit_kw,
            tariff: db::default_tariff(),
            updated_by: None,
            updated_at: None,
            limit_source: "config".into(),
            tariff_source: "config".into(),
        });
        if let Some(limit) = cloud_limit {
            site.limit_kw = limit;
            site.limit_source = "cloud".into();
        }
        if let Some(tariff) = cloud_tariff {
            site.tariff = tariff;
            site.tariff_source = "cloud".into();
        }
        Ok(site)
    }

    async fn run(
        self: Arc<Self>,
        mut points: Vec<Point>,
        mut meter: Option<Point>,
        shutdown: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(self.config.poll_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut base = BaseLoad::default();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
                _ = self.wake.notified() => {}
            }
            self.tick(&mut points, &mut meter, &mut base).await;
        }
        // Leave every charger at a known, safe state: its failsafe current. Without a write
        // it falls back there by itself once the keep-alive stops.
        for p in &mut points {
            if let (Some(d), Some(f)) = (p.device.as_mut(), p.profile.failsafe.as_ref()) {
                let _ = d.set_current(f.current_a).await;
            }
        }
    }

    async fn tick(&self, points: &mut [Point], meter: &mut Option<Point>, base: &mut BaseLoad) {
        let now_ms = unix_ms(self.clock.now());
        let (timeout, retry_max) = (self.config.request_timeout, self.config.retry_max);
        futures_util::future::join_all(
            points
                .iter_mut()
                .map(|p| p.refresh(timeout, retry_max, now_ms)),
        )
        .await;
        if let Some(m) = meter.as_mut() {
            m.refresh(timeout, retry_max, now_ms).await;
            if let Some(r) = m.reading.as_ref().filter(|_| m.device.is_some()) {
                let charging_kw: f64 = points
                    .iter()
                    .filter(|p| p.device.is_some())
                    .filter_map(|p| p.reading.as_ref())
                    .map(|r| r.power_w / 1000.0)
                    .sum();
                base.observe(
                    now_ms,
                    &self.tz,
                    (r.power_w / 1000.0 - charging_kw).max(0.0),
                );
            }
        }
        let plugs: Vec<Plug> = points.iter().map(Plug::of).collect();
        let plan = match self.plan(&plugs, base, now_ms).await {
            Ok(p) => Some(p),
            Err(e) => {
                tracing::error!(error = %e, "charging plan failed; chargers keep their setpoints");
                None
            }
        };
        if let Some((plan, _)) = &plan {
            self.apply(points, plan, now_ms).await;
        }
        self.keep_alive(points, now_ms).await;
        let snapshot = Snapshot {
            chargers: points
                .iter()
                .map(|p| self.view(p, plan.as_ref().map(|x| &x.1)))
                .collect(),
            meter: meter.as_ref().map(|m| MeterView {
                profile: m.profile_name.clone(),
                address: m.address.clone(),
                status: m.status(),
                error: m.error.as_ref().map(ToString::to_string),
                power_kw: m.reading.as_ref().map(|r| r.power_w / 1000.0),
                energy_kwh: m
                    .reading
                    .as_ref()
                    .and_then(|r| r.energy_wh)
                    .map(|e| e / 1000.0),
            }),
            plan: plan.map(|p| p.0),
        };
        let summary = json!({
            "chargers": snapshot.chargers.iter().map(|c| json!({"id": c.id, "status": c.status})).collect::<Vec<_>>(),
            "missed": snapshot.plan.as_ref().map(|p| p.vehicles.iter().filter(|v| !v.ready).count()),
        });
        self.state.send_replace(snapshot);
        let _ = self.panel.send(PanelEvent {
            kind: "charging",
            data: summary,
        });
    }

    /// Plans the day ahead; returns the plan and the vehicle on each charger.
    async fn plan(
        &self,
        points: &[Plug],
        base: &BaseLoad,
        now_ms: i64,
    ) -> anyhow::Result<(PlanView, HashMap<String, String>)> {
        let site = self.site().await?;
        let vehicles = self.store.read(crate::link::db::list).await?;
        let settings: HashMap<String, db::VehicleSettings> = self
            .store
            .read(db::vehicle_settings)
            .await?
            .into_iter()
            .map(|s| (s.vehicle_id.clone(), s))
            .collect();
        let default_departure = parse_hh_mm(&self.config.departure).unwrap_or(390);
        let circuit_of = |p: &Plug| {
            let name = p.circuit.as_deref()?;
            self.config.circuits.iter().position(|c| c.name == name)
        };
        let mut sessions = Vec::new();
        let mut on_charger = HashMap::new();
        for p in points.iter().filter(|p| p.plugged) {
            let vehicle = p.bay.as_ref().and_then(|bay| {
                vehicles
                    .iter()
                    .find(|v| v.docked && v.bay.as_deref() == Some(bay.as_str()))
            });
            let set = vehicle.and_then(|v| settings.get(&v.id));
            // A technician's departure that has passed gives way to the vehicle's own, and
            // that to the default.
            let departure_ms = set
                .and_then(|s| s.departure_ms)
                .filter(|d| *d > now_ms)
                .or(vehicle.and_then(|v| v.departure_ms).filter(|d| *d > now_ms))
                .unwrap_or_else(|| inputs::next_local_time(now_ms, default_departure, &self.tz));
            let pending_ota = vehicle.is_some_and(|v| {
                v.assigned_version.is_some() && v.assigned_version != v.installed_version
            });
            let device = &p.profile.device;
            let session = Session {
                charger: p.id.clone(),
                circuit: circuit_of(p),
                vehicle: vehicle.map(|v| v.id.clone()),
                soc_percent: vehicle.and_then(|v| v.soc_percent),
                battery_kwh: vehicle.and_then(|v| v.battery_kwh),
                target_soc_percent: set
                    .and_then(|s| s.target_soc_percent)
                    .unwrap_or(self.config.target_soc_percent),
                departure_ms,
                priority: set.map_or(0, |s| s.priority),
                max_kw: p.profile.watts(device.max_current_a) / 1000.0,
                min_kw: p.profile.watts(device.min_current_a) / 1000.0,
                reserve_kwh: if pending_ota {
                    self.config.ota_reserve_kwh
                } else {
                    0.0
                },
                unknown_need_kwh: self.config.unknown_vehicle_kwh,
                delivered_kwh: p.delivered_kwh * self.config.efficiency,
            };
            on_charger.insert(p.id.clone(), session.name());
            sessions.push(session);
        }
        let uncontrolled: f64 = points.iter().map(|p| p.uncontrolled_kw).sum();
        let base_kw: Vec<f64> = base
            .forecast(now_ms, &self.tz)
            .into_iter()
            .map(|b| b + uncontrolled)
            .collect();
        let mut problem = inputs::problem(
            now_ms,
            &self.tz,
            site.limit_kw,
            &site.tariff,
            &base_kw,
            self.config.efficiency,
            &sessions,
        );
        // A faulted charger draws its failsafe current from its circuit too.
        problem.circuits = self
            .config
            .circuits
            .iter()
            .map(|c| {
                let held: f64 = points
                    .iter()
                    .filter(|p| p.circuit.as_deref() == Some(c.name.as_str()))
                    .map(|p| p.uncontrolled_kw)
                    .sum();
                schedule::Circuit {
                    name: c.name.clone(),
                    limit_kw: (c.limit_kw - held).max(0.0),
                }
            })
            .collect();
        let plan = schedule::plan(&problem)?;
        let mut explanation = plan.explanation.clone();
        for (c, effective) in self.config.circuits.iter().zip(&problem.circuits) {
            if effective.limit_kw < c.limit_kw {
                explanation.push(format!(
                    "circuit {}: {:.1} kW of its {:.1} kW is held for faulted chargers at their failsafe current; {:.1} kW is left to plan",
                    c.name,
                    c.limit_kw - effective.limit_kw,
                    c.limit_kw,
                    effective.limit_kw
                ));
            }
        }
        if uncontrolled > 0.0 {
            explanation.push(format!(
                "{uncontrolled:.1} kW is held for faulted chargers running at their failsafe current"
            ));
        }
        for s in sessions.iter().filter(|s| s.reserve_kwh > 0.0) {
            explanation.push(format!(
                "{} keeps {:.1} kWh for its pending OTA install and stays plugged",
                s.name(),
                s.reserve_kwh
            ));
        }
        let vehicles = sessions
            .iter()
            .zip(plan.vehicles.iter().zip(&plan.power_kw))
            .map(|(s, (o, power))| PlannedVehicle {
                session: SessionView {
                    charger: s.charger.clone(),
                    vehicle: s.vehicle.clone(),
                    soc_percent: s.soc_percent,
                    target_soc_percent: s.target_soc_percent,
                    departure_ms: s.departure_ms,
                    priority: s.priority,
                    reserve_kwh: s.reserve_kwh,
                    need_kwh: s.need_kwh(),
                },
                circuit: s.circuit.map(|c| problem.circuits[c].name.clone()),
                power_kw: power
                    .iter()
                    .map(|p| (p * 1000.0).round() / 1000.0)
                    .collect(),
                energy_kwh: o.energy_kwh,
                ready: o.ready,
                shortfall_kwh: o.shortfall_kwh,
            })
            .collect();
        Ok((
            PlanView {
                planned_at_ms: now_ms,
                slot_minutes: 15,
                site_limit_kw: site.limit_kw,
                base_load_kw: problem.base_load_kw.clone(),
                price: problem.price.clone(),
                method: plan.method,
                cost: plan.cost,
                circuits: problem.circuits.clone(),
                vehicles,
                explanation,
            },
            on_charger,
        ))
    }

    /// Writes the first slot of the plan, decreases first.
    async fn apply(&self, points: &mut [Point], plan: &PlanView, now_ms: i64) {
        let target: HashMap<&str, f64> = plan
            .vehicles
            .iter()
            .map(|v| {
                (
                    v.session.charger.as_str(),
                    v.power_kw.first().copied().unwrap_or(0.0),
                )
            })
            .collect();
        let mut changes = Vec::new();
        for (i, p) in points.iter().enumerate() {
            if p.device.is_none() {
                continue;
            }
            let kw = target.get(p.id.as_str()).copied().unwrap_or(0.0);
            // Rounded down to 0.1 A: the charger never gets more than planned.
            let mut amps = (p.profile.amps(kw * 1000.0) * 10.0).floor() / 10.0;
            if amps < p.profile.device.min_current_a {
                amps = 0.0;
            }
            if p.setpoint_a == Some(amps) {
                continue;
            }
            changes.push(Change {
                key: (i, amps),
                from_kw: p.allowed_kw(),
                to_kw: p.profile.watts(amps) / 1000.0,
            });
        }
        let retry_max = self.config.retry_max;
        for Change { key: (i, amps), .. } in control::order(changes) {
            let p = &mut points[i];
            let Some(device) = p.device.as_mut() else {
                continue;
            };
            match device.set_current(amps).await {
                Ok(()) => {
                    tracing::debug!(charger = %p.id, amps, "setpoint written");
                    p.setpoint_a = Some(amps);
                    p.written_at = Instant::now();
                }
                Err(e) => p.fail(e, now_ms, retry_max),
            }
        }
    }

    async fn keep_alive(&self, points: &mut [Point], now_ms: i64) {
        let retry_max = self.config.retry_max;
        for p in points.iter_mut() {
            let Some(k) = p.profile.keep_alive.clone() else {
                continue;
            };
            let Some(device) = p.device.as_mut() else {
                continue;
            };
            let result = match k.mode {
                KeepAliveMode::Rewrite => match p.setpoint_a {
                    Some(a) if p.written_at.elapsed() >= k.interval => {
                        let r = device.set_current(a).await;
                        if r.is_ok() {
                            p.written_at = Instant::now();
                        }
                        r
                    }
                    _ => Ok(()),
                },
                KeepAliveMode::LifeBit if p.life_at.elapsed() >= k.interval => {
                    let r = device.life_bit().await;
                    if r.is_ok() {
                        p.life_at = Instant::now();
                    }
                    r
                }
                KeepAliveMode::LifeBit => Ok(()),
            };
            if let Err(e) = result {
                p.fail(e, now_ms, retry_max);
            }
        }
    }

    fn view(&self, p: &Point, on_charger: Option<&HashMap<String, String>>) -> ChargerView {
        ChargerView {
            id: p.id.clone(),
            bay: p.bay.clone(),
            profile: p.profile_name.clone(),
            model: format!(
                "{} {}",
                p.profile.device.manufacturer, p.profile.device.model
            ),
            address: p.address.clone(),
            status: p.status(),
            error: p.error.as_ref().map(ToString::to_string),
            error_code: p.error.as_ref().map(DriverError::code),
            failures: p.failures,
            retry_at_ms: p.retry_at_ms,
            reading: p.reading.clone(),
            read_at_ms: p.read_at_ms,
            setpoint_a: p.setpoint_a,
            failsafe_a: p.profile.failsafe.as_ref().map(|f| f.current_a),
            vehicle: on_charger.and_then(|m| m.get(&p.id).cloned()),
            events: p.events.iter().rev().cloned().collect(),
        }
    }
}

fn point_for(
    profiles: &BTreeMap<String, Arc<Profile>>,
    c: &ChargerConfig,
) -> anyhow::Result<Point> {
    let Some(profile) = profiles.get(&c.profile) else {
        bail!(
            "charger {}: no profile {:?} (shipped: {}; add a file to charging.profiles_dir)",
            c.id,
            c.profile,
            profiles.keys().cloned().collect::<Vec<_>>().join(", ")
        );
    };
    if profile.device.kind != Kind::Charger {
        bail!("charger {}: profile {} is a meter's", c.id, c.profile);
    }
    let mut point = Point::new(
        &c.id,
        c.bay.clone(),
        &c.profile,
        profile.clone(),
        &c.address,
        c.unit_id,
    );
    point.circuit = c.circuit.clone();
    Ok(point)
}

fn meter_point(
    profiles: &BTreeMap<String, Arc<Profile>>,
    m: &MeterConfig,
) -> anyhow::Result<Point> {
    let Some(profile) = profiles.get(&m.profile) else {
        bail!("charging.meter: no profile {:?}", m.profile);
    };
    if profile.device.kind != Kind::Meter {
        bail!("charging.meter: profile {} is a charger's", m.profile);
    }
    Ok(Point::new(
        "meter",
        None,
        &m.profile,
        profile.clone(),
        &m.address,
        m.unit_id,
    ))
}
