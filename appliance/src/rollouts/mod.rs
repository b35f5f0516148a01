//! Canary rollouts on the depot: the driver around the pure state machine of
//! `atlasmesh-canary`. It feeds the machine what happens (vehicle reports from the vehicle link,
//! eligibility from the registry, technicians' commands, the time), stores the machine and a
//! hash-chained log entry in one transaction per step, and only then carries out the decisions:
//! director assignments through the image cache, `cmd/ota` notifications and rollback commands
//! through the vehicle link.
//!
//! A depot killed at any point restarts from the last stored step; decisions whose effects may
//! not have happened are reconciled (assignments re-made or withdrawn, rollback commands sent
//! again) at start and every half minute after.

pub mod db;
pub mod eligibility;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::Duration;

use atlasmesh_canary::{
    Candidate, Decision, Event, Gate, Judgement, Outcome, Phase, Plan, PlanError, Refused, Rollout,
    Size, Stage, Target, Wave, WaveReport,
};
use atlasmesh_vehicle_link::wire::{HealthStatus, OtaOutcome, OtaPhase};
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{Mutex, broadcast};
use tokio_util::sync::CancellationToken;

use crate::audit;
use crate::config::CanaryConfig;
use crate::http::{Clock, PanelEvent};
use crate::link::db::VehicleView;
use crate::link::{VehicleEvent, VehicleLink};
use crate::ota::db::ImageRow;
use crate::ota::{Actor, Ota, OtaError};
use crate::store::{Store, StoreError, unix_ms};

/// Names the bundle format and separates its signatures from any other use of the key.
const EVIDENCE_FORMAT: &str = "atlasmesh-rollout-evidence/1";

/// The name automatic steps are logged and audited under.
const CANARY: &str = "canary";

#[derive(Debug, thiserror::Error)]
pub enum RolloutError {
    #[error(transparent)]
    Plan(#[from] PlanError),
    #[error(transparent)]
    Refused(#[from] Refused),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Ota(#[from] OtaError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("stored rollout {0} cannot be read: {1}")]
    Corrupt(i64, String),
}

/// `POST /api/v1/rollouts`: what to install, and any plan fields that differ from the
/// defaults (configuration `[canary]`; waves 5 % (at least what the gate needs), 25 %, 100 %).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateRollout {
    pub version: String,
    #[serde(default)]
    pub hardware: Option<String>,
    #[serde(default)]
    pub waves: Option<Vec<Wave>>,
    #[serde(default)]
    pub gate: Option<Gate>,
    #[serde(default, with = "humantime_serde")]
    pub soak: Option<Duration>,
    #[serde(default, with = "humantime_serde")]
    pub vehicle_deadline: Option<Duration>,
    #[serde(default)]
    pub max_concurrent: Option<u64>,
    #[serde(default, with = "humantime_serde")]
    pub wave_timeout: Option<Duration>,
    #[serde(default)]
    pub roll_back_failed_wave: Option<bool>,
}

/// One vehicle of a rollout, for the API and the panel.
#[derive(Clone, Debug, Serialize)]
pub struct VehicleRow {
    pub id: String,
    pub stage: Stage,
    pub outcome: Option<Outcome>,
    pub eligible: bool,
    pub reasons: Vec<String>,
    /// 1-based.
    pub wave: Option<usize>,
    pub from_version: Option<String>,
}

#[derive(Clone, Debug, Serialize)]
pub struct RolloutView {
    pub id: i64,
    pub hardware_id: String,
    pub version: String,
    pub phase: &'static str,
    /// Why it is paused or halted.
    pub status: Phase,
    /// 1-based.
    pub wave: usize,
    pub waves: Vec<WaveReport>,
    pub gate: Judgement,
    pub counts: BTreeMap<Stage, u64>,
    pub plan: Plan,
    pub created_at: String,
    pub created_by: String,
    pub updated_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub vehicles: Option<Vec<VehicleRow>>,
}

struct Live {
    machine: Rollout,
    image: ImageRow,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    rollout: String,
    stage: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct WaveLabels {
    rollout: String,
    wave: String,
}

#[derive(Clone, Default)]
struct RolloutMetrics {
    vehicles: Family<StageLabels, Gauge>,
    wave_success: Family<WaveLabels, Gauge<f64, std::sync::atomic::AtomicU64>>,
    halts: Counter,
    rollbacks: Counter,
}

impl RolloutMetrics {
    fn register(registry: &mut Registry) -> Self {
        let m = RolloutMetrics::default();
        registry.register(
            "atlasmesh_rollout_vehicles",
            "Vehicles of each rollout by stage",
            m.vehicles.clone(),
        );
        registry.register(
            "atlasmesh_rollout_wave_success_ratio",
            "Successes over decided vehicles, per wave",
            m.wave_success.clone(),
        );
        registry.register(
            "atlasmesh_rollout_halts",
            "Rollouts halted, by the gate or a technician",
            m.halts.clone(),
        );
        registry.register(
            "atlasmesh_rollout_rollbacks",
            "Vehicles told to roll back to their previous version",
            m.rollbacks.clone(),
        );
        m
    }

    fn observe(&self, id: i64, machine: &Rollout, decisions: &[Decision]) {
        let rollout = id.to_string();
        let counts = machine.counts();
        for stage in [
            Stage::Waiting,
            Stage::Assigned,
            Stage::Downloading,
            Stage::Installed,
            Stage::Soaking,
            Stage::Succeeded,
            Stage::RollingBack,
            Stage::RolledBack,
        ] {
            let labels = StageLabels {
                rollout: rollout.clone(),
                stage: crate::link::db::serde_plain(&stage),
            };
            self.vehicles
                .get_or_create(&labels)
                .set(counts.get(&stage).copied().unwrap_or(0) as i64);
        }
        for w in machine.waves() {
            let decided = w.succeeded + w.failed + w.silent;
            if decided > 0 {
                let labels = WaveLabels {
                    rollout: rollout.clone(),
                    wave: w.number.to_string(),
                };
                self.wave_success
                    .get_or_create(&labels)
                    .set(w.succeeded as f64 / decided as f64);
            }
        }
        for d in decisions {
            match d {
                Decision::Halt { .. } => {
                    self.halts.inc();
                }
                Decision::RollBack { .. } => {
                    self.rollbacks.inc();
                }
                _ => {}
            }
        }
    }
}

pub struct RolloutParts {
    pub depot_id: String,
    pub store: Store,
    pub ota: Arc<Ota>,
    pub link: Arc<VehicleLink>,
    pub clock: Arc<dyn Clock>,
    pub config: CanaryConfig,
    pub panel: broadcast::Sender<PanelEvent>,
}

pub struct Rollouts {
    depot_id: String,
    store: Store,
    ota: Arc<Ota>,
    link: Arc<VehicleLink>,
    clock: Arc<dyn Clock>,
    config: CanaryConfig,
    panel: broadcast::Sender<PanelEvent>,
    metrics: RolloutMetrics,
    /// Every rollout not finished, by id. One lock, so each step is judged, stored and carried
    /// out before the next.
    live: Mutex<BTreeMap<i64, Live>>,
    /// The last stored OTA report judged (`vehicle_ota_reports.id`).
    reports_seen: AtomicI64,
}

impl Rollouts {
    /// Loads the unfinished rollouts, reconciles what their last steps decided, and follows
    /// the vehicle link and the clock until `shutdown`.
    pub async fn start(
        parts: RolloutParts,
        registry: &mut Registry,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, RolloutError> {
        let rows = parts.store.read(db::list).await?;
        let mut live = BTreeMap::new();
        for row in rows {
            if row.phase == "completed" || row.phase == "rolled_back" {
                continue;
            }
            let machine: Rollout = serde_json::from_str(&row.machine)
                .map_err(|e| RolloutError::Corrupt(row.id, e.to_string()))?;
            let image_id = row.image_id;
            let image = parts
                .store
                .read(move |c| crate::ota::db::image_by_id(c, image_id))
                .await?
                .ok_or_else(|| RolloutError::Corrupt(row.id, "its image is gone".into()))?;
            live.insert(row.id, Live { machine, image });
        }
        // Resumed rollouts judge what arrived after their last stored step; with none
        // running, earlier reports concern nobody.
        let (stored, last) = parts
            .store
            .read(|c| {
                Ok::<_, StoreError>((db::reports_seen(c)?, crate::link::db::last_report_id(c)?))
            })
            .await?;
        let reports_seen = match stored {
            Some(seen) if !live.is_empty() => seen,
            _ => last,
        };
        let rollouts = Arc::new(Rollouts {
            depot_id: parts.depot_id,
            store: parts.store,
            ota: parts.ota,
            link: parts.link,
            clock: parts.clock,
            config: parts.config,
            panel: parts.panel,
            metrics: RolloutMetrics::register(registry),
            live: Mutex::new(live),
            reports_seen: AtomicI64::new(reports_seen),
        });
        {
            let live = rollouts.live.lock().await;
            for (id, l) in live.iter() {
                rollouts.metrics.observe(*id, &l.machine, &[]);
            }
            if !live.is_empty() {
                tracing::info!(rollouts = live.len(), "resuming unfinished rollouts");
            }
        }
        rollouts.reconcile().await;
        tokio::spawn(rollouts.clone().follow(shutdown));
        Ok(rollouts)
    }

    async fn follow(self: Arc<Self>, shutdown: CancellationToken) {
        let mut events = self.link.subscribe();
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut ticks = 0u64;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                event = events.recv() => {
                    let mut pending = Pending::default();
                    match event {
                        Ok(event) => pending.take(event),
                        Err(broadcast::error::RecvError::Lagged(_)) => pending.lagged = true,
                        Err(broadcast::error::RecvError::Closed) => break,
                    }
                    // What is already queued joins the batch: a burst costs one store write
                    // per rollout, not one per message.
                    for _ in 0..4096 {
                        match events.try_recv() {
                            Ok(event) => pending.take(event),
                            Err(broadcast::error::TryRecvError::Lagged(_)) => pending.lagged = true,
                            Err(_) => break,
                        }
                    }
                    self.process(pending).await;
                }
                _ = tick.tick() => {
                    ticks += 1;
                    self.tick().await;
                    // Reports are read from the store, so one the live feed did not announce
                    // (a late one, or one dropped while this loop lagged) is still judged.
                    self.read_reports().await;
                    if ticks.is_multiple_of(5) {
                        self.refresh_eligibility(None).await;
                    }
                    if ticks.is_multiple_of(30) {
                        self.reconcile().await;
                    }
                }
            }
        }
    }

    async fn process(&self, pending: Pending) {
        if pending.lagged {
            tracing::warn!("rollouts fell behind the vehicle link; judging every vehicle again");
            self.refresh_eligibility(None).await;
        } else if !pending.judge.is_empty() {
            self.refresh_eligibility(Some(&pending.judge)).await;
        }
        for vehicle in &pending.back {
            self.resend_rollback(vehicle).await;
        }
        if pending.reports || pending.lagged {
            self.read_reports().await;
        }
        if !pending.health_failures.is_empty() {
            let mut live = self.live.lock().await;
            let mut by_rollout: BTreeMap<i64, Vec<(Event, String)>> = BTreeMap::new();
            for (vehicle, reason) in pending.health_failures {
                for (id, l) in live.iter() {
                    if l.machine.vehicles().contains_key(&vehicle) {
                        by_rollout.entry(*id).or_default().push((
                            Event::HealthFail {
                                vehicle: vehicle.clone(),
                                reason: reason.clone(),
                            },
                            vehicle.clone(),
                        ));
                    }
                }
            }
            for (id, events) in by_rollout {
                if let Err(e) = self.apply_all(&mut live, id, events, None, None).await {
                    tracing::error!(rollout = id, error = %e, "rollout step failed");
                }
            }
        }
    }

    /// Judges the OTA reports stored since the last read, in arrival order, a batch per
    /// rollout. A report counts for a vehicle's current attempt only: one received before it
    /// was (re)assigned belongs to an earlier one. A failed write leaves the cursor where it
    /// was, so the reports are read again (judging one twice changes nothing).
    async fn read_reports(&self) {
        const BATCH: usize = 2000;
        loop {
            let after = self.reports_seen.load(Ordering::SeqCst);
            let rows = match self
                .store
                .read(move |c| crate::link::db::reports_since(c, after, BATCH))
                .await
            {
                Ok(rows) => rows,
                Err(e) => {
                    tracing::warn!(error = %e, "could not read vehicles' OTA reports");
                    return;
                }
            };
            let Some(last) = rows.last().map(|r| r.id) else {
                return;
            };
            let mut live = self.live.lock().await;
            let mut by_rollout: BTreeMap<i64, Vec<(Event, String)>> = BTreeMap::new();
            for r in &rows {
                let Some(event) =
                    report_event(&r.vehicle_id, r.phase, r.outcome, r.error.as_deref())
                else {
                    continue;
                };
                for (id, l) in live.iter() {
                    let current = l.image.version == r.version
                        && l.machine
                            .vehicles()
                            .get(&r.vehicle_id)
                            .and_then(|v| v.assigned_at.or(v.released_at))
                            .is_some_and(|at| r.received_at >= at);
                    if current {
                        by_rollout
                            .entry(*id)
                            .or_default()
                            .push((event.clone(), r.vehicle_id.clone()));
                    }
                }
            }
            let mut stored = true;
            for (id, events) in by_rollout {
                if let Err(e) = self
                    .apply_all(&mut live, id, events, None, Some(last))
                    .await
                {
                    tracing::error!(rollout = id, error = %e, "rollout step failed");
                    stored = false;
                }
            }
            if !stored {
                return;
            }
            self.reports_seen.store(last, Ordering::SeqCst);
            if rows.len() < BATCH {
                return;
            }
        }
    }

    fn actor(&self) -> Actor {
        Actor {
            name: CANARY.into(),
            role: None,
            request_id: None,
        }
    }

    /// Creates and starts a rollout (technician).
    pub async fn create(
        &self,
        request: CreateRollout,
        actor: &Actor,
    ) -> Result<RolloutView, RolloutError> {
        let image = self
            .ota
            .find(&request.version, request.hardware.as_deref())
            .await?;
        let mut live = self.live.lock().await;
        if let Some((id, _)) = live.iter().find(|(_, l)| {
            l.image.hardware_id == image.hardware_id
                && matches!(
                    l.machine.phase(),
                    Phase::Running | Phase::Paused { .. } | Phase::Halted { .. }
                )
        }) {
            return Err(RolloutError::Conflict(format!(
                "rollout {id} for {} is not finished; finish, resume or roll it back first",
                image.hardware_id
            )));
        }
        let gate = request.gate.unwrap_or_default();
        gate.validate()?;
        let plan = Plan {
            target: Target {
                hardware_id: image.hardware_id.clone(),
                version: image.version.clone(),
            },
            waves: request.waves.unwrap_or_else(|| {
                vec![
                    Wave {
                        size: Size::Percent(5.0),
                        min_vehicles: gate.min_sample(),
                    },
                    Wave {
                        size: Size::Percent(25.0),
                        min_vehicles: 0,
                    },
                    Wave {
                        size: Size::Percent(100.0),
                        min_vehicles: 0,
                    },
                ]
            }),
            gate,
            soak_ms: ms(request.soak.unwrap_or(self.config.soak)),
            deadline_ms: ms(request
                .vehicle_deadline
                .unwrap_or(self.config.vehicle_deadline)),
            max_concurrent: request.max_concurrent.unwrap_or(self.config.max_concurrent),
            wave_timeout_ms: ms(request.wave_timeout.unwrap_or(self.config.wave_timeout)),
            roll_back_failed_wave: request.roll_back_failed_wave.unwrap_or(true),
        };
        let now = unix_ms(self.clock.now());
        let vehicles = self.store.read(crate::link::db::list).await?;
        let needs = self.needs(&image, plan.soak_ms);
        let candidates: Vec<Candidate> = vehicles
            .iter()
            .filter(|v| {
                v.hardware_id.as_deref() == Some(&image.hardware_id)
                    && v.installed_version.as_deref() != Some(&image.version)
            })
            .map(|v| {
                let reasons = eligibility::reasons(v, &needs, &self.config, now);
                Candidate {
                    id: v.id.clone(),
                    from_version: v.installed_version.clone(),
                    eligible: reasons.is_empty(),
                    reasons,
                }
            })
            .collect();
        let (machine, decisions) = Rollout::start(plan, candidates, now)?;
        let stored =
            serde_json::to_string(&machine).map_err(|e| RolloutError::Corrupt(0, e.to_string()))?;
        let entry = json!({
            "actor": actor.name,
            "event": {"event": "created", "plan": machine.plan(), "vehicles": machine.vehicles().len()},
            "decisions": decisions,
            "gate": machine.judgement(),
            "phase": machine.phase(),
        })
        .to_string();
        let audit_entry = actor.entry(
            "rollout.create",
            format!("{}/{}", image.hardware_id, image.version),
            audit::Outcome::Ok,
            json!({"vehicles": machine.vehicles().len(), "waves": machine.targets()}),
        );
        let (hw, version, image_id, phase, by) = (
            image.hardware_id.clone(),
            image.version.clone(),
            image.id,
            machine.phase().name(),
            actor.name.clone(),
        );
        let id = self
            .store
            .write(move |tx| {
                let id = db::insert(tx, &hw, &version, image_id, phase, &stored, &by, now)?;
                db::append(tx, id, now, &entry)?;
                audit::record(tx, &audit_entry, now)?;
                Ok::<_, StoreError>(id)
            })
            .await?;
        tracing::info!(rollout = id, version = %image.version, hardware = %image.hardware_id, vehicles = machine.vehicles().len(), waves = ?machine.targets(), "rollout started");
        let l = live.entry(id).or_insert(Live { machine, image });
        self.carry_out(id, l, &decisions).await;
        self.metrics.observe(id, &l.machine, &decisions);
        self.announce(id, &l.machine);
        drop(live);
        self.get(id).await
    }

    /// A technician's pause, resume, halt or roll back.
    pub async fn command(
        &self,
        id: i64,
        event: Event,
        actor: &Actor,
    ) -> Result<RolloutView, RolloutError> {
        let action = match &event {
            Event::Pause => "rollout.pause",
            Event::Resume { .. } => "rollout.resume",
            Event::Halt { .. } => "rollout.halt",
            Event::RollBackAll => "rollout.rollback",
            _ => return Err(RolloutError::Conflict("not a command".into())),
        };
        let mut live = self.live.lock().await;
        if !live.contains_key(&id) {
            drop(live);
            // Finished rollouts are not kept live; say which it is.
            return match self.store.read(move |c| db::get(c, id)).await? {
                Some(row) => Err(RolloutError::Refused(Refused::NotNow {
                    action: action.trim_start_matches("rollout."),
                    phase: if row.phase == "completed" {
                        "completed"
                    } else {
                        "rolled_back"
                    },
                })),
                None => Err(RolloutError::NotFound(format!("no rollout {id}"))),
            };
        }
        let audit_entry = actor.entry(
            action,
            id.to_string(),
            audit::Outcome::Ok,
            serde_json::to_value(&event).unwrap_or_default(),
        );
        self.apply(&mut live, id, event, &actor.name, Some(audit_entry))
            .await?;
        drop(live);
        self.get(id).await
    }

    /// Feeds one event to a live rollout: judge, store (with the log entry and any audit
    /// entry) in one transaction, then carry out. A refused event or a failed write leaves the
    /// rollout as it was.
    async fn apply(
        &self,
        live: &mut BTreeMap<i64, Live>,
        id: i64,
        event: Event,
        actor: &str,
        audit_entry: Option<audit::Entry>,
    ) -> Result<Vec<Decision>, RolloutError> {
        self.apply_all(live, id, vec![(event, actor.to_owned())], audit_entry, None)
            .await
    }

    /// Feeds events to a live rollout in order and stores the result in one transaction: one
    /// snapshot, a log entry for each step that changed something, the audit entry, and how
    /// far the reports were read (`reports_seen`). One write for a burst of reports is what
    /// keeps a thousand vehicles' reports flowing. A refused event is skipped in a batch and
    /// an error when it is the only one; a failed write leaves the rollout as it was.
    async fn apply_all(
        &self,
        live: &mut BTreeMap<i64, Live>,
        id: i64,
        events: Vec<(Event, String)>,
        audit_entry: Option<audit::Entry>,
        reports_seen: Option<i64>,
    ) -> Result<Vec<Decision>, RolloutError> {
        let l = live
            .get_mut(&id)
            .ok_or_else(|| RolloutError::NotFound(format!("no rollout {id}")))?;
        let now = unix_ms(self.clock.now());
        let mut next = l.machine.clone();
        let single = events.len() == 1;
        let mut entries = Vec::new();
        let mut decisions = Vec::new();
        for (event, actor) in events {
            let step = match next.handle(now, &event) {
                Ok(step) => step,
                Err(e) if single => return Err(e.into()),
                Err(e) => {
                    tracing::warn!(rollout = id, error = %e, "skipped an event the rollout refused");
                    continue;
                }
            };
            if !step.changed && step.decisions.is_empty() {
                continue;
            }
            entries.push(
                json!({
                    "actor": actor,
                    "event": event,
                    "decisions": step.decisions,
                    "gate": next.judgement(),
                    "phase": next.phase(),
                })
                .to_string(),
            );
            decisions.extend(step.decisions);
        }
        if entries.is_empty() {
            if let Some(seen) = reports_seen {
                self.store
                    .write(move |tx| db::set_reports_seen(tx, seen))
                    .await?;
            }
            return Ok(vec![]);
        }
        let stored =
            serde_json::to_string(&next).map_err(|e| RolloutError::Corrupt(id, e.to_string()))?;
        let phase = next.phase().name();
        self.store
            .write(move |tx| {
                db::save(tx, id, phase, &stored, now)?;
                for entry in &entries {
                    db::append(tx, id, now, entry)?;
                }
                if let Some(a) = &audit_entry {
                    audit::record(tx, a, now)?;
                }
                if let Some(seen) = reports_seen {
                    db::set_reports_seen(tx, seen)?;
                }
                Ok::<_, StoreError>(())
            })
            .await?;
        l.machine = next;
        for d in &decisions {
            match d {
                Decision::Halt { reason, .. } => {
                    tracing::warn!(rollout = id, reason = %reason, "rollout halted")
                }
                Decision::Advance { wave, .. } => {
                    tracing::info!(rollout = id, wave = wave + 1, "rollout advanced")
                }
                Decision::Complete { .. } => tracing::info!(rollout = id, "rollout completed"),
                Decision::Pause { reason } => {
                    tracing::info!(rollout = id, reason = ?reason, "rollout paused")
                }
                _ => {}
            }
        }
        self.carry_out(id, l, &decisions).await;
        self.metrics.observe(id, &l.machine, &decisions);
        self.announce(id, &l.machine);
        if matches!(l.machine.phase(), Phase::Completed)
            || (matches!(l.machine.phase(), Phase::RolledBack)
                && !l
                    .machine
                    .vehicles()
                    .values()
                    .any(|v| v.stage == Stage::RollingBack))
        {
            live.remove(&id);
        }
        Ok(decisions)
    }

    /// Assignments first (one director publication for the batch), then the notifications
    /// and rollback commands. Failures are logged; `reconcile` makes them good later.
    async fn carry_out(&self, id: i64, l: &Live, decisions: &[Decision]) {
        let assign: Vec<String> = decisions
            .iter()
            .filter_map(|d| match d {
                Decision::Assign { vehicle, .. } => Some(vehicle.clone()),
                _ => None,
            })
            .collect();
        let roll_back: Vec<(String, Option<String>)> = decisions
            .iter()
            .filter_map(|d| match d {
                Decision::RollBack {
                    vehicle,
                    to_version,
                } => Some((vehicle.clone(), to_version.clone())),
                _ => None,
            })
            .collect();
        if !assign.is_empty() {
            match self
                .ota
                .assign_many(assign.clone(), &l.image, &self.actor())
                .await
            {
                Ok(_) => {
                    for vehicle in assign {
                        self.link.notify_ota(Some(vehicle)).await;
                    }
                }
                Err(e) => {
                    tracing::error!(rollout = id, error = %e, "could not assign a wave's vehicles; will retry")
                }
            }
        }
        let release: Vec<String> = decisions
            .iter()
            .filter_map(|d| match d {
                Decision::Release { vehicle } => Some(vehicle.clone()),
                _ => None,
            })
            .collect();
        // Away, so nothing to tell it: when it docks again its pull finds no assignment.
        if !release.is_empty()
            && let Err(e) = self.ota.unassign_many(release, &self.actor()).await
        {
            tracing::error!(rollout = id, error = %e, "could not withdraw assignments; will retry");
        }
        if !roll_back.is_empty() {
            let vehicles = roll_back.iter().map(|(v, _)| v.clone()).collect();
            if let Err(e) = self.ota.unassign_many(vehicles, &self.actor()).await {
                tracing::error!(rollout = id, error = %e, "could not withdraw assignments; will retry");
                return;
            }
            for (vehicle, to_version) in roll_back {
                self.link
                    .command_rollback(
                        &vehicle,
                        &l.image.version,
                        to_version.as_deref(),
                        &l.image.hardware_id,
                    )
                    .await;
            }
        }
    }

    /// Makes the director and the vehicles agree with the stored rollouts: in-flight vehicles
    /// hold their assignment, and those that have not started on it hear it again (a vehicle
    /// busy or away when told ignores the command); rolling-back ones have none and hear the
    /// command again.
    async fn reconcile(&self) {
        let live = self.live.lock().await;
        let assignments = match self.store.read(crate::ota::db::assignments).await {
            Ok(a) => a,
            Err(e) => {
                tracing::warn!(error = %e, "could not read assignments to reconcile rollouts");
                return;
            }
        };
        let held: BTreeMap<&str, i64> = assignments
            .iter()
            .map(|a| (a.vehicle_id.as_str(), a.image_id))
            .collect();
        for (id, l) in live.iter() {
            let mut decisions = Vec::new();
            let mut remind = Vec::new();
            for (vehicle, v) in l.machine.vehicles() {
                let has = held.get(vehicle.as_str()) == Some(&l.image.id);
                if v.stage.in_flight() && v.outcome.is_none() && !has && l.machine.is_active() {
                    decisions.push(Decision::Assign {
                        vehicle: vehicle.clone(),
                        wave: v.wave.unwrap_or_default(),
                    });
                } else if v.stage == Stage::Assigned && has {
                    remind.push(vehicle.clone());
                } else if v.stage == Stage::Waiting && has {
                    // Released, but withdrawing the assignment failed then.
                    decisions.push(Decision::Release {
                        vehicle: vehicle.clone(),
                    });
                } else if v.stage == Stage::RollingBack {
                    decisions.push(Decision::RollBack {
                        vehicle: vehicle.clone(),
                        to_version: v.from_version.clone(),
                    });
                }
            }
            if !decisions.is_empty() {
                self.carry_out(*id, l, &decisions).await;
            }
            for vehicle in remind {
                self.link.notify_ota(Some(vehicle)).await;
            }
        }
    }

    async fn tick(&self) {
        let mut live = self.live.lock().await;
        let ids: Vec<i64> = live
            .iter()
            .filter(|(_, l)| l.machine.is_active())
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Err(e) = self.apply(&mut live, id, Event::Tick, CANARY, None).await {
                tracing::error!(rollout = id, error = %e, "rollout step failed");
            }
        }
    }

    fn needs<'a>(&self, image: &'a ImageRow, soak_ms: i64) -> eligibility::Needs<'a> {
        eligibility::Needs {
            hardware_id: &image.hardware_id,
            version: &image.version,
            image_bytes: image.length.max(0) as u64,
            soak: Duration::from_millis(soak_ms.max(0) as u64),
        }
    }

    /// Re-judges readiness, of every vehicle or of `only`: waiting vehicles on every reason,
    /// assigned ones that have not started on presence alone (one that left is released). A
    /// change of verdict becomes an event.
    async fn refresh_eligibility(&self, only: Option<&BTreeSet<String>>) {
        if !self
            .live
            .lock()
            .await
            .values()
            .any(|l| l.machine.is_active())
        {
            return;
        }
        let read = match only {
            None => self.store.read(crate::link::db::list).await,
            Some(ids) => {
                let ids = ids.clone();
                self.store
                    .read(move |c| {
                        let mut out = Vec::new();
                        for id in &ids {
                            out.extend(crate::link::db::get(c, id)?);
                        }
                        Ok::<_, StoreError>(out)
                    })
                    .await
            }
        };
        let vehicles: Vec<VehicleView> = match read {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "could not read the registry for eligibility");
                return;
            }
        };
        let now = unix_ms(self.clock.now());
        let mut live = self.live.lock().await;
        let mut events: BTreeMap<i64, Vec<(Event, String)>> = BTreeMap::new();
        for (id, l) in live.iter() {
            if !l.machine.is_active() {
                continue;
            }
            let needs = self.needs(&l.image, l.machine.plan().soak_ms);
            for v in &vehicles {
                let Some(mine) = l.machine.vehicles().get(&v.id) else {
                    continue;
                };
                let reasons = match mine.stage {
                    Stage::Waiting => eligibility::reasons(v, &needs, &self.config, now),
                    Stage::Assigned => eligibility::presence(v),
                    _ => continue,
                };
                // Only a change of verdict is an event: the wording ("leaves in 41 min") moves
                // with the clock.
                if reasons.is_empty() != mine.eligible {
                    let event = if reasons.is_empty() {
                        Event::Eligible {
                            vehicle: v.id.clone(),
                        }
                    } else {
                        Event::Ineligible {
                            vehicle: v.id.clone(),
                            reasons,
                        }
                    };
                    events
                        .entry(*id)
                        .or_default()
                        .push((event, CANARY.to_owned()));
                }
            }
        }
        for (id, events) in events {
            if let Err(e) = self.apply_all(&mut live, id, events, None, None).await {
                tracing::error!(rollout = id, error = %e, "rollout step failed");
            }
        }
    }

    async fn resend_rollback(&self, vehicle: &str) {
        let live = self.live.lock().await;
        for l in live.values() {
            if let Some(v) = l.machine.vehicles().get(vehicle)
                && v.stage == Stage::RollingBack
            {
                self.link
                    .command_rollback(
                        vehicle,
                        &l.image.version,
                        v.from_version.as_deref(),
                        &l.image.hardware_id,
                    )
                    .await;
            }
        }
    }

    fn announce(&self, id: i64, machine: &Rollout) {
        let _ = self.panel.send(PanelEvent {
            kind: "rollout",
            data: json!({"id": id, "phase": machine.phase().name(), "wave": machine.wave() + 1,
                         "counts": machine.counts(), "gate": machine.judgement()}),
        });
    }

    pub async fn list(&self) -> Result<Vec<RolloutView>, RolloutError> {
        let rows = self.store.read(db::list).await?;
        rows.into_iter().map(|r| view(r, false)).collect()
    }

    pub async fn get(&self, id: i64) -> Result<RolloutView, RolloutError> {
        let row = self
            .store
            .read(move |c| db::get(c, id))
            .await?
            .ok_or_else(|| RolloutError::NotFound(format!("no rollout {id}")))?;
        view(row, true)
    }

    /// The last `n` log entries, newest first, parsed.
    pub async fn recent_log(
        &self,
        id: i64,
        n: usize,
    ) -> Result<Vec<(i64, i64, serde_json::Value)>, RolloutError> {
        let log = self.store.read(move |c| db::log_tail(c, id, n)).await?;
        Ok(log
            .into_iter()
            .map(|r| {
                let entry = serde_json::from_str(&r.entry).unwrap_or(serde_json::Value::Null);
                (r.seq, r.at, entry)
            })
            .collect())
    }

    /// The evidence bundle: the rollout, every log entry exactly as stored with its hash
    /// links, and a manifest naming the chain's head, signed by the depot's director targets
    /// key. A broken chain is reported, and then nothing is signed.
    pub async fn evidence(&self, id: i64) -> Result<serde_json::Value, RolloutError> {
        let (row, log) = self
            .store
            .read(move |c| Ok::<_, StoreError>((db::get(c, id)?, db::log(c, id)?)))
            .await?;
        let row = row.ok_or_else(|| RolloutError::NotFound(format!("no rollout {id}")))?;
        let chain = db::verify(&log);
        let head = log
            .last()
            .map(|r| hex::encode(&r.hash))
            .unwrap_or_else(|| hex::encode([0u8; 32]));
        let manifest = json!({
            "format": EVIDENCE_FORMAT,
            "depot": self.depot_id,
            "rollout": row.id,
            "hardware_id": row.hardware_id,
            "version": row.version,
            "entries": log.len(),
            "head_sha256": head,
            "generated_at": crate::audit::rfc3339(unix_ms(self.clock.now())),
        })
        .to_string();
        let signature = chain.is_ok().then(|| {
            self.ota
                .director
                .sign_statement(EVIDENCE_FORMAT, manifest.as_bytes())
        });
        let entries: Vec<serde_json::Value> = log
            .iter()
            .map(|r| {
                json!({"seq": r.seq, "at": crate::audit::rfc3339(r.at), "entry": r.entry,
                       "prev_sha256": hex::encode(&r.prev_hash), "sha256": hex::encode(&r.hash)})
            })
            .collect();
        Ok(json!({
            "manifest": manifest,
            "signature": signature,
            "chain": {"verified": chain.is_ok(), "broken_at": chain.err()},
            "hashing": "sha256(prev_sha256 bytes || seq as 8 bytes big-endian || entry bytes); the first prev is 32 zero bytes",
            "signing": format!("ed25519 over \"{EVIDENCE_FORMAT}\\n\" followed by the manifest bytes; the key is the targets key of /tuf/director/metadata/1.root.json"),
            "rollout": view(row, true)?,
            "log": entries,
        }))
    }

    /// The runbooks' readiness check: whether `vehicle` could take `version` (default: the
    /// newest staged image for its hardware) now, and why not.
    pub async fn readiness(
        &self,
        vehicle: &str,
        version: Option<&str>,
    ) -> Result<(bool, Vec<String>, String), RolloutError> {
        let id = vehicle.to_owned();
        let view = self
            .store
            .read(move |c| crate::link::db::get(c, &id))
            .await?
            .ok_or_else(|| RolloutError::NotFound(format!("no vehicle {vehicle}")))?;
        let image = match version {
            Some(v) => self.ota.find(v, view.hardware_id.as_deref()).await?,
            None => {
                let hw = view.hardware_id.clone();
                self.store
                    .read(move |c| crate::ota::db::images(c, false))
                    .await?
                    .into_iter()
                    .filter(|i| Some(&i.hardware_id) == hw.as_ref() && i.corrupt_at.is_none())
                    .max_by(|a, b| {
                        match (
                            semver::Version::parse(&a.version),
                            semver::Version::parse(&b.version),
                        ) {
                            (Ok(x), Ok(y)) => x.cmp(&y),
                            _ => a.staged_at.cmp(&b.staged_at),
                        }
                    })
                    .ok_or_else(|| {
                        RolloutError::NotFound(format!("no image staged for {vehicle}'s hardware"))
                    })?
            }
        };
        let now = unix_ms(self.clock.now());
        let needs = self.needs(&image, ms(self.config.soak));
        let mut reasons = eligibility::reasons(&view, &needs, &self.config, now);
        let live = self.live.lock().await;
        for (id, l) in live.iter() {
            if l.machine.is_active()
                && l.machine
                    .vehicles()
                    .get(vehicle)
                    .is_some_and(|v| v.stage != Stage::Waiting && v.stage != Stage::Succeeded)
            {
                reasons.push(format!("taking part in rollout {id}"));
            }
        }
        Ok((reasons.is_empty(), reasons, image.version))
    }
}

/// What one wake-up of the follow loop found on the vehicle link.
#[derive(Default)]
struct Pending {
    /// Fell behind the live feed: judge every vehicle again, read every report.
    lagged: bool,
    /// OTA reports arrived: read them from the store.
    reports: bool,
    /// Vehicles that arrived, left, or came on or off the link: judged now, not at the next
    /// sweep, so one that just left is not picked and one assigned but not started is
    /// released.
    judge: BTreeSet<String>,
    /// Vehicles back in reach: a rollback they may have missed is said again.
    back: BTreeSet<String>,
    /// (vehicle, faults) from failed health reports.
    health_failures: Vec<(String, String)>,
}

impl Pending {
    fn take(&mut self, event: VehicleEvent) {
        match event {
            VehicleEvent::Ota { .. } => self.reports = true,
            VehicleEvent::Health { vehicle, health } if health.status == HealthStatus::Failed => {
                self.health_failures
                    .push((vehicle, health.faults.join("; ")));
            }
            VehicleEvent::Link {
                vehicle,
                online: true,
            }
            | VehicleEvent::Docked { vehicle, .. } => {
                self.judge.insert(vehicle.clone());
                self.back.insert(vehicle);
            }
            VehicleEvent::Link {
                vehicle,
                online: false,
            }
            | VehicleEvent::Undocked { vehicle } => {
                self.judge.insert(vehicle);
            }
            VehicleEvent::Health { .. } | VehicleEvent::State { .. } => {}
        }
    }
}

/// The canary event a vehicle's OTA report stands for, if any.
fn report_event(
    vehicle: &str,
    phase: OtaPhase,
    outcome: OtaOutcome,
    error: Option<&str>,
) -> Option<Event> {
    let v = vehicle.to_owned();
    let why = |what: &str| format!("{what}: {}", error.unwrap_or("no reason given"));
    Some(match (phase, outcome) {
        (OtaPhase::Download, OtaOutcome::Started | OtaOutcome::Progress) => {
            Event::Downloading { vehicle: v }
        }
        (OtaPhase::Download, OtaOutcome::Failed) => Event::Failed {
            vehicle: v,
            reason: why("download"),
        },
        (OtaPhase::Install, OtaOutcome::Succeeded) => Event::Installed { vehicle: v },
        (OtaPhase::Install, OtaOutcome::Failed) => Event::Failed {
            vehicle: v,
            reason: why("install"),
        },
        (OtaPhase::Boot, OtaOutcome::Succeeded) => Event::BootedGood { vehicle: v },
        (OtaPhase::Boot, OtaOutcome::Failed) => Event::Failed {
            vehicle: v,
            reason: why("boot"),
        },
        (OtaPhase::Health, OtaOutcome::Succeeded) => Event::HealthPass { vehicle: v },
        (OtaPhase::Health, OtaOutcome::Failed) => Event::HealthFail {
            vehicle: v,
            reason: error.unwrap_or_default().to_owned(),
        },
        (OtaPhase::Rollback, OtaOutcome::Succeeded) => Event::RolledBack { vehicle: v },
        _ => return None,
    })
}

fn ms(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

fn view(row: db::RolloutRow, with_vehicles: bool) -> Result<RolloutView, RolloutError> {
    let machine: Rollout = serde_json::from_str(&row.machine)
        .map_err(|e| RolloutError::Corrupt(row.id, e.to_string()))?;
    let vehicles = with_vehicles.then(|| {
        machine
            .vehicles()
            .iter()
            .map(|(id, v)| VehicleRow {
                id: id.clone(),
                stage: v.stage,
                outcome: v.outcome.clone(),
                eligible: v.eligible,
                reasons: v.reasons.clone(),
                wave: v.wave.map(|w| w + 1),
                from_version: v.from_version.clone(),
            })
            .collect()
    });
    Ok(RolloutView {
        id: row.id,
        hardware_id: row.hardware_id,
        version: row.version,
        phase: machine.phase().name(),
        status: machine.phase().clone(),
        wave: machine.wave() + 1,
        waves: machine.waves(),
        gate: machine.judgement(),
        counts: machine.counts(),
        plan: machine.plan().clone(),
        created_at: crate::audit::rfc3339(row.created_at),
        created_by: row.created_by,
        updated_at: crate::audit::rfc3339(row.updated_at),
        vehicles,
    })
}
