//! Fleet rollouts in cloud mode: one release over depots in phases (the runbooks' canary at
//! one depot, regional at three, then all). The phase machine is `atlasmesh_canary::fleet`;
//! this module stores it, feeds it the `rollout_slice` objects the depots report, and keeps
//! every started depot's desired state in step with it: a `release` object so the depot
//! stages the image, and a `rollout_slice` object saying run, pause or halt.
//!
//! Several cloud instances may drive the same rollouts (one PostgreSQL): a step is stored
//! only if the rollout is still at the revision it was computed from, and desired objects are
//! written only where they differ from what the machine says, so doing it twice is harmless.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use atlasmesh_canary::fleet::{
    DepotReport, DepotState, FleetDecision, FleetEvent, FleetPhase, FleetPlan, FleetRefused,
    FleetRollout, default_phases,
};
use atlasmesh_canary::{Gate, Target};
use atlasmesh_cloud_sync::desired::{Spec, release_key};
use atlasmesh_cloud_sync::server::Clock;
use atlasmesh_cloud_sync::{
    CloudStore, CloudStoreError, FleetRolloutRow, FleetStep, NewFleetRollout,
};

use crate::cloud_repo::Repository;

/// The wait after a phase's depots complete before the next phase starts, unless the request
/// says otherwise: long enough for field problems that a depot's own soak misses to show.
pub const DEFAULT_FLEET_SOAK: Duration = Duration::from_secs(60 * 60);
/// How often the cloud reads the depots' reports and steps the running rollouts.
const DRIVE_EVERY: Duration = Duration::from_secs(2);

#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] CloudStoreError),
    #[error("stored fleet rollout {0} cannot be read: {1}")]
    Corrupt(String, String),
    #[error("the image repository cannot be read: {0}")]
    Repository(String),
}

/// `POST /api/v1/fleet-rollouts`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateFleetRollout {
    pub hardware_id: String,
    pub version: String,
    /// Explicit phases; without them, `depots` (or every enrolled depot, by name) split into
    /// the runbooks' canary (1), regional (3) and all (the rest).
    #[serde(default)]
    pub phases: Option<Vec<FleetPhase>>,
    #[serde(default)]
    pub depots: Option<Vec<String>>,
    /// The fleet gate over the summed outcomes; default the runbooks' 98 % at 95 %.
    #[serde(default)]
    pub gate: Option<Gate>,
    #[serde(default, with = "humantime_serde")]
    pub soak: Option<Duration>,
    /// Each depot's own plan for its vehicles (the depot's `POST /api/v1/rollouts` body
    /// without the version); default: the depot's own defaults.
    #[serde(default)]
    pub depot_plan: Option<Value>,
}

pub struct FleetRollouts {
    store: CloudStore,
    repository: Arc<Repository>,
    clock: Clock,
}

fn actor_of(id: &str) -> String {
    format!("fleet-rollout/{id}")
}

fn machine_of(row: &FleetRolloutRow) -> Result<FleetRollout, FleetError> {
    serde_json::from_str(&row.machine)
        .map_err(|e| FleetError::Corrupt(row.id.clone(), e.to_string()))
}

/// A depot's reported slice as the machine takes it.
fn report_of(depot: &str, json: &Value) -> Option<DepotReport> {
    Some(DepotReport {
        depot: depot.to_owned(),
        state: serde_json::from_value::<DepotState>(json.get("state")?.clone()).ok()?,
        tally: serde_json::from_value(json.get("tally")?.clone()).ok()?,
        reason: json
            .get("reason")
            .and_then(Value::as_str)
            .map(str::to_owned),
    })
}

impl FleetRollouts {
    pub fn new(store: CloudStore, repository: Arc<Repository>, clock: Clock) -> Arc<Self> {
        Arc::new(Self {
            store,
            repository,
            clock,
        })
    }

    fn now(&self) -> i64 {
        (self.clock)()
    }

    pub async fn create(
        &self,
        request: CreateFleetRollout,
        actor: &str,
    ) -> Result<Value, FleetError> {
        let CreateFleetRollout {
            hardware_id,
            version,
            phases,
            depots,
            gate,
            soak,
            depot_plan,
        } = request;
        let published = self
            .repository
            .releases()
            .map_err(|e| FleetError::Repository(e.to_string()))?
            .iter()
            .any(|r| r.hardware_id == hardware_id && r.version == version);
        if !published {
            return Err(FleetError::Invalid(format!(
                "no release {hardware_id}/{version} in the repository; publish it first"
            )));
        }
        let depot_plan = depot_plan.unwrap_or_else(|| json!({}));
        // The depots would refuse a plan that is not one; say so now, not a phase later.
        let mut probe = depot_plan.clone();
        match probe.as_object_mut() {
            Some(o) => {
                o.insert("version".into(), version.clone().into());
                o.insert("hardware".into(), hardware_id.clone().into());
            }
            None => return Err(FleetError::Invalid("depot_plan: not a JSON object".into())),
        }
        serde_json::from_value::<crate::rollouts::CreateRollout>(probe)
            .map_err(|e| FleetError::Invalid(format!("depot_plan: {e}")))?;
        let all = self.store.depots().await?;
        let phases = match (phases, depots) {
            (Some(_), Some(_)) => {
                return Err(FleetError::Invalid(
                    "give either `phases` or `depots`, not both".into(),
                ));
            }
            (Some(p), None) => p,
            (None, Some(d)) => default_phases(&d),
            (None, None) => default_phases(
                &all.iter()
                    .filter(|d| d.revoked_ms.is_none() && d.enrolled_ms.is_some())
                    .map(|d| d.name.clone())
                    .collect::<Vec<_>>(),
            ),
        };
        for name in phases.iter().flat_map(|p| &p.depots) {
            match all.iter().find(|d| &d.name == name) {
                None => return Err(FleetError::NotFound(format!("no depot named {name:?}"))),
                Some(d) if d.revoked_ms.is_some() => {
                    return Err(FleetError::Invalid(format!("depot {name:?} is revoked")));
                }
                Some(_) => {}
            }
        }
        for row in self.store.fleet_rollouts().await? {
            if row.hardware_id == hardware_id && matches!(row.status.as_str(), "running" | "paused")
            {
                return Err(FleetError::Conflict(format!(
                    "fleet rollout {} for {hardware_id} is {}; halt it or let it finish first",
                    row.id, row.status
                )));
            }
        }
        let plan = FleetPlan {
            target: Target {
                hardware_id: hardware_id.clone(),
                version: version.clone(),
            },
            phases,
            gate: gate.unwrap_or_default(),
            soak_ms: soak.unwrap_or(DEFAULT_FLEET_SOAK).as_millis() as i64,
        };
        let now = self.now();
        let (machine, decisions) =
            FleetRollout::start(plan, now).map_err(|e| FleetError::Invalid(e.to_string()))?;
        let id = format!("fr-{}", hex::encode(rand::random::<[u8; 5]>()));
        let entry = json!({
            "actor": actor,
            "event": {"event": "created", "plan": machine.plan(), "depot_plan": depot_plan},
            "decisions": decisions,
            "status": machine.status(),
        });
        self.store
            .create_fleet_rollout(
                NewFleetRollout {
                    id: &id,
                    hardware_id: &hardware_id,
                    version: &version,
                    status: machine.status().name(),
                    machine: &serde_json::to_string(&machine).expect("a machine serialises"),
                    depot_plan: &depot_plan,
                    log_entry: &entry,
                },
                actor,
                now,
            )
            .await?;
        tracing::info!(fleet_rollout = %id, hardware = %hardware_id, version = %version, phases = machine.plan().phases.len(), "fleet rollout started");
        let row = self.store.fleet_rollout(&id).await?;
        self.follow(&row, &machine).await;
        self.get(&id).await
    }

    /// An operator's pause, resume or halt.
    pub async fn command(
        &self,
        id: &str,
        event: FleetEvent,
        actor: &str,
    ) -> Result<Value, FleetError> {
        let action = match &event {
            FleetEvent::Pause => "fleet_rollout.pause",
            FleetEvent::Resume { .. } => "fleet_rollout.resume",
            FleetEvent::Halt { .. } => "fleet_rollout.halt",
            _ => return Err(FleetError::Invalid("not a command".into())),
        };
        // Another instance may step it between our read and write: read again and redo.
        for _ in 0..5 {
            let row = self.store.fleet_rollout(id).await?;
            let mut machine = machine_of(&row)?;
            let now = self.now();
            let decisions = machine.step(event.clone(), now).map_err(|e| match e {
                FleetRefused::NotNow(..) => FleetError::Conflict(e.to_string()),
                FleetRefused::UnknownDepot(_) => FleetError::Invalid(e.to_string()),
            })?;
            let entry = json!({
                "actor": actor,
                "event": event,
                "decisions": decisions,
                "status": machine.status(),
                "gate": machine.judgement(),
            });
            if self
                .store
                .step_fleet_rollout(
                    FleetStep {
                        id,
                        revision: row.revision,
                        status: machine.status().name(),
                        machine: &serde_json::to_string(&machine).expect("a machine serialises"),
                        log_entry: &entry,
                        audit: Some((actor, action)),
                    },
                    now,
                )
                .await?
            {
                tracing::info!(fleet_rollout = %id, action, status = machine.status().name(), "fleet rollout command");
                self.follow(&row, &machine).await;
                return self.get(id).await;
            }
        }
        Err(FleetError::Conflict(format!(
            "fleet rollout {id} keeps changing under this command; try again"
        )))
    }

    pub async fn list(&self) -> Result<Vec<Value>, FleetError> {
        let mut out = Vec::new();
        for row in self.store.fleet_rollouts().await? {
            out.push(view(&row, &machine_of(&row)?));
        }
        Ok(out)
    }

    pub async fn get(&self, id: &str) -> Result<Value, FleetError> {
        let row = self.store.fleet_rollout(id).await?;
        let mut v = view(&row, &machine_of(&row)?);
        v["log"] = serde_json::to_value(self.store.fleet_log(id, 100).await?).unwrap_or_default();
        Ok(v)
    }

    /// Steps every running or paused rollout on its depots' reports, every few seconds; at
    /// start-up it also makes halted rollouts' depots follow (a halt stored just before a
    /// crash may not have reached them).
    pub fn spawn(self: &Arc<Self>, shutdown: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            match this.store.fleet_rollouts().await {
                Ok(rows) => {
                    for row in rows.iter().filter(|r| r.status == "halted") {
                        if let Ok(machine) = machine_of(row) {
                            this.follow(row, &machine).await;
                        }
                    }
                }
                Err(e) => tracing::error!(error = %e, "cannot read the fleet rollouts"),
            }
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(DRIVE_EVERY) => {}
                }
                let rows = match this.store.fleet_rollouts().await {
                    Ok(rows) => rows,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot read the fleet rollouts");
                        continue;
                    }
                };
                for row in rows
                    .iter()
                    .filter(|r| matches!(r.status.as_str(), "running" | "paused"))
                {
                    if let Err(e) = this.drive(row.clone()).await {
                        tracing::error!(fleet_rollout = %row.id, error = %e, "cannot step the fleet rollout");
                    }
                }
            }
        });
    }

    /// One step: the started depots' reports that changed, then the time.
    async fn drive(&self, row: FleetRolloutRow) -> Result<(), FleetError> {
        let mut machine = machine_of(&row)?;
        let mut reports = Vec::new();
        for (depot, progress) in machine.depots().clone() {
            if !machine.started(&depot) {
                continue;
            }
            let Some(reported) = self
                .store
                .reported_object(&depot, "rollout_slice", &row.id)
                .await?
            else {
                continue;
            };
            match report_of(&depot, &reported.json) {
                Some(r)
                    if r.state != progress.state
                        || r.tally != progress.tally
                        || r.reason != progress.reason =>
                {
                    reports.push(r)
                }
                Some(_) => {}
                None => {
                    tracing::warn!(fleet_rollout = %row.id, depot = %depot, json = %reported.json, "a depot's rollout slice report is not one; ignored")
                }
            }
        }
        let now = self.now();
        let before = machine.clone();
        let mut decisions = Vec::new();
        for r in &reports {
            decisions.extend(
                machine
                    .step(FleetEvent::Report(r.clone()), now)
                    .unwrap_or_default(),
            );
        }
        decisions.extend(machine.step(FleetEvent::Tick, now).unwrap_or_default());
        if machine != before {
            let entry = json!({
                "actor": "cloud",
                "event": {"event": "reports", "reports": reports},
                "decisions": decisions,
                "status": machine.status(),
                "gate": machine.judgement(),
            });
            let stored = self
                .store
                .step_fleet_rollout(
                    FleetStep {
                        id: &row.id,
                        revision: row.revision,
                        status: machine.status().name(),
                        machine: &serde_json::to_string(&machine).expect("a machine serialises"),
                        log_entry: &entry,
                        audit: None,
                    },
                    now,
                )
                .await?;
            if !stored {
                // Another instance stepped it; the next round reads its step.
                return Ok(());
            }
            for d in &decisions {
                match d {
                    FleetDecision::StartPhase { phase, depots } => {
                        tracing::info!(fleet_rollout = %row.id, phase = %phase, depots = ?depots, "fleet rollout phase started")
                    }
                    FleetDecision::Halt { reason } => {
                        tracing::warn!(fleet_rollout = %row.id, reason = %reason, "fleet rollout halted")
                    }
                    FleetDecision::Pause { reason } => {
                        tracing::warn!(fleet_rollout = %row.id, reason = %reason, "fleet rollout paused")
                    }
                    FleetDecision::Complete => {
                        tracing::info!(fleet_rollout = %row.id, "fleet rollout completed")
                    }
                }
            }
        }
        self.follow(&row, &machine).await;
        Ok(())
    }

    /// Makes every started depot's desired `release` and `rollout_slice` objects say what the
    /// machine says, writing only those that differ.
    async fn follow(&self, row: &FleetRolloutRow, machine: &FleetRollout) {
        let sha256 = match self.repository.releases() {
            Ok(releases) => releases
                .into_iter()
                .find(|r| r.hardware_id == row.hardware_id && r.version == row.version)
                .map(|r| r.sha256),
            Err(e) => {
                tracing::error!(error = %e, "the image repository cannot be read");
                None
            }
        };
        let phase_of: Vec<(String, String)> = machine
            .plan()
            .phases
            .iter()
            .flat_map(|p| p.depots.iter().map(|d| (d.clone(), p.name.clone())))
            .collect();
        let started: BTreeSet<&str> = machine
            .depots()
            .keys()
            .filter(|d| machine.started(d))
            .map(String::as_str)
            .collect();
        let actor = actor_of(&row.id);
        let now = self.now();
        for (depot, phase) in phase_of
            .iter()
            .filter(|(d, _)| started.contains(d.as_str()))
        {
            let Some(action) = machine.slice_action(depot) else {
                continue;
            };
            let mut wanted = vec![(
                "rollout_slice",
                row.id.clone(),
                Spec::RolloutSlice {
                    fleet_rollout_id: row.id.clone(),
                    phase: phase.clone(),
                    hardware_id: row.hardware_id.clone(),
                    version: row.version.clone(),
                    action: action.to_owned(),
                    plan: row.depot_plan.clone(),
                },
            )];
            if let Some(sha256) = &sha256
                && action != "halt"
            {
                wanted.push((
                    "release",
                    release_key(&row.hardware_id, &row.version),
                    Spec::Release {
                        hardware_id: row.hardware_id.clone(),
                        version: row.version.clone(),
                        sha256: sha256.clone(),
                    },
                ));
            }
            for (kind, key, spec) in wanted {
                let current = match self.store.desired_object(depot, kind, &key).await {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::warn!(fleet_rollout = %row.id, depot = %depot, error = %e, "cannot read the depot's desired state");
                        continue;
                    }
                };
                if current.and_then(|c| c.spec).as_ref() == Some(&spec) {
                    continue;
                }
                if let Err(e) = self
                    .store
                    .set_desired(depot, kind, &key, Some(&spec), &actor, now)
                    .await
                {
                    tracing::warn!(fleet_rollout = %row.id, depot = %depot, error = %e, "cannot set the depot's desired {kind}");
                }
            }
        }
    }
}

/// The API's and the panel's view of a fleet rollout.
fn view(row: &FleetRolloutRow, machine: &FleetRollout) -> Value {
    let depots: Vec<Value> = machine
        .plan()
        .phases
        .iter()
        .flat_map(|p| {
            p.depots.iter().map(move |d| {
                let progress = &machine.depots()[d];
                json!({
                    "name": d,
                    "phase": p.name,
                    "state": progress.state,
                    "tally": progress.tally,
                    "reason": progress.reason,
                    "action": machine.slice_action(d),
                })
            })
        })
        .collect();
    let reason = match machine.status() {
        atlasmesh_canary::fleet::FleetStatus::Paused { reason }
        | atlasmesh_canary::fleet::FleetStatus::Halted { reason } => Some(reason.clone()),
        _ => None,
    };
    json!({
        "id": row.id,
        "hardware_id": row.hardware_id,
        "version": row.version,
        "status": machine.status().name(),
        "reason": reason,
        "phase": machine.phase_name(),
        "phases": machine.phases(),
        "depots": depots,
        "gate": machine.judgement(),
        "soak_seconds": machine.plan().soak_ms / 1000,
        "depot_plan": row.depot_plan,
        "created_at": crate::audit::rfc3339(row.created_ms),
        "created_by": row.created_by,
        "updated_at": crate::audit::rfc3339(row.updated_ms),
    })
}
