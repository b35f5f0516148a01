//! This depot's slices of fleet rollouts. Each desired `rollout_slice` object asks the depot to
//! run (or pause, or halt) its own rollout of a release with the plan the cloud sent; the
//! depot's rollout engine does the waves and the gate as for a technician's rollout. What the
//! depot's rollout shows (its phase and its vehicles' outcomes) goes back as a reported
//! `rollout_slice` object, which the cloud's fleet machine judges.
//!
//! The depot's rollout row is the record of which slice it belongs to (it is created by
//! `cloud:fleet/<id>`), so a restart finds it again and never starts a second one.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::Serialize;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use atlasmesh_canary::{Event, Tally};
use atlasmesh_cloud_sync::client::Reported;
use atlasmesh_cloud_sync::desired::Spec;

use crate::ota::{Actor, Ota, OtaError};
use crate::rollouts::{CreateRollout, RolloutError, RolloutView, Rollouts};
use crate::store::Store;

use super::db;

/// How one slice stands at this depot, as reported to the cloud.
#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct SliceState {
    pub fleet_rollout_id: String,
    pub phase: String,
    pub hardware_id: String,
    pub version: String,
    /// What the cloud asked: run, pause, halt.
    pub action: String,
    /// pending, waiting, running, paused, completed, halted, rolled_back, failed
    pub state: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rollout_id: Option<i64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The depot's vehicles' outcomes over every wave so far.
    pub tally: Tally,
    #[serde(skip)]
    pub generation: u64,
}

pub struct Slices {
    rollouts: Arc<Rollouts>,
    ota: Arc<Ota>,
    store: Store,
    /// Refusals, by slice id and the generation they were refused at: not retried until the
    /// cloud changes the slice.
    failed: Mutex<HashMap<String, (u64, String)>>,
    /// Slices this depot paused because the cloud said so (a technician's pause is theirs).
    paused_by_cloud: Mutex<HashMap<String, i64>>,
    states: Mutex<Vec<SliceState>>,
    wake: Notify,
}

fn actor_name(fleet_rollout_id: &str) -> String {
    format!("cloud:fleet/{fleet_rollout_id}")
}

fn actor(fleet_rollout_id: &str) -> Actor {
    Actor {
        name: actor_name(fleet_rollout_id),
        role: None,
        request_id: None,
    }
}

/// The outcomes so far, with the places the plan has not yet assigned counted as pending
/// while the rollout is active (they can still fail).
fn tally(view: &RolloutView) -> Tally {
    let mut t = Tally::default();
    let mut assigned = 0;
    for w in &view.waves {
        t.successes += w.succeeded;
        t.failures += w.failed;
        t.silent += w.silent;
        t.pending += w.in_flight;
        assigned += w.assigned;
    }
    if matches!(view.phase, "running" | "paused") {
        let planned = view.waves.last().map_or(0, |w| w.target);
        t.pending += planned.saturating_sub(assigned);
    }
    t
}

impl Slices {
    pub fn new(rollouts: Arc<Rollouts>, ota: Arc<Ota>, store: Store) -> Arc<Self> {
        Arc::new(Self {
            rollouts,
            ota,
            store,
            failed: Mutex::default(),
            paused_by_cloud: Mutex::default(),
            states: Mutex::default(),
            wake: Notify::new(),
        })
    }

    /// Look again now (a new desired revision was stored).
    pub fn nudge(&self) {
        self.wake.notify_one();
    }

    pub fn reported(&self) -> Vec<Reported> {
        self.states
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .map(|s| Reported {
                kind: "rollout_slice".into(),
                key: s.fleet_rollout_id.clone(),
                observed_generation: s.generation,
                json: serde_json::to_string(s).unwrap_or_default(),
            })
            .collect()
    }

    pub fn spawn(self: &Arc<Self>, shutdown: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            loop {
                if let Err(e) = this.reconcile().await {
                    tracing::error!(error = %e, "cannot read the desired rollout slices");
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = this.wake.notified() => {}
                    // Rollouts move on their own (waves, gate); report them promptly.
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        });
    }

    async fn reconcile(&self) -> Result<(), RolloutError> {
        let desired: Vec<_> = self
            .store
            .read(db::desired)
            .await?
            .into_iter()
            .filter(|d| matches!(d.spec, Spec::RolloutSlice { .. }))
            .collect();
        if desired.is_empty() {
            self.states
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .clear();
            return Ok(());
        }
        let local = self.rollouts.list().await?;
        let mut states = Vec::new();
        for d in desired {
            let Spec::RolloutSlice {
                fleet_rollout_id: id,
                phase,
                hardware_id,
                version,
                action,
                plan,
            } = d.spec
            else {
                continue;
            };
            let generation = d.generation.max(0) as u64;
            let mine = local
                .iter()
                .filter(|r| r.created_by == actor_name(&id))
                .max_by_key(|r| r.id);
            let view = match (action.as_str(), mine) {
                ("run", None) => {
                    self.start(&id, generation, &hardware_id, &version, plan)
                        .await
                }
                ("run", Some(r)) if r.phase == "paused" && self.paused_by_cloud(&id, r.id) => {
                    self.command(&id, r.id, Event::Resume { replan: None })
                        .await
                }
                ("pause", Some(r)) if r.phase == "running" => {
                    let view = self.command(&id, r.id, Event::Pause).await;
                    if matches!(&view, Ok(Some(v)) if v.phase == "paused") {
                        self.paused_by_cloud
                            .lock()
                            .unwrap_or_else(|p| p.into_inner())
                            .insert(id.clone(), r.id);
                    }
                    view
                }
                ("halt", Some(r)) if matches!(r.phase, "running" | "paused") => {
                    let reason = format!("the fleet rollout {id} was halted in the cloud");
                    self.command(&id, r.id, Event::Halt { reason }).await
                }
                (_, Some(r)) => Ok(Some(r.clone())),
                (_, None) => Ok(None),
            };
            let mut state = SliceState {
                fleet_rollout_id: id.clone(),
                phase,
                hardware_id,
                version,
                action,
                state: "pending",
                rollout_id: None,
                reason: None,
                tally: Tally::default(),
                generation,
            };
            match view {
                Ok(Some(v)) => {
                    state.rollout_id = Some(v.id);
                    state.tally = tally(&v);
                    state.state = match v.phase {
                        "running" => "running",
                        "paused" => "paused",
                        "completed" => "completed",
                        "halted" => "halted",
                        _ => "rolled_back",
                    };
                    state.reason = match &v.status {
                        atlasmesh_canary::Phase::Halted { reason } => Some(reason.clone()),
                        atlasmesh_canary::Phase::Paused { reason } => {
                            Some(format!("{reason:?}").to_lowercase())
                        }
                        _ => None,
                    };
                }
                Ok(None) => {
                    let refused = self
                        .failed
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .get(&id)
                        .filter(|(at, _)| *at == generation)
                        .map(|(_, why)| why.clone());
                    if let Some(why) = refused {
                        state.state = "failed";
                        state.reason = Some(why);
                    } else if state.action == "run" {
                        state.state = "waiting";
                        state.reason =
                            Some(self.waiting_for(&state.hardware_id, &state.version).await);
                    }
                }
                Err(e) => {
                    state.state = "failed";
                    state.reason = Some(e);
                }
            }
            states.push(state);
        }
        *self.states.lock().unwrap_or_else(|p| p.into_inner()) = states;
        Ok(())
    }

    fn paused_by_cloud(&self, id: &str, rollout: i64) -> bool {
        self.paused_by_cloud
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            == Some(&rollout)
    }

    /// What a slice told to run waits for.
    async fn waiting_for(&self, hardware_id: &str, version: &str) -> String {
        if self.ota.find(version, Some(hardware_id)).await.is_err() {
            format!("{hardware_id} {version} is not staged yet")
        } else {
            "the depot's director certificate is not installed yet".into()
        }
    }

    /// Starts the depot's rollout for a slice once its image is staged and vehicles can
    /// trust the depot's assignments (its director root is certified). `Ok(None)`: waiting
    /// for the image, or refused before (the refusal stays until the slice changes).
    async fn start(
        &self,
        id: &str,
        generation: u64,
        hardware_id: &str,
        version: &str,
        plan: serde_json::Value,
    ) -> Result<Option<RolloutView>, String> {
        if self
            .failed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(id)
            .is_some_and(|(at, _)| *at == generation)
        {
            return Ok(None);
        }
        match self.ota.find(version, Some(hardware_id)).await {
            Ok(_) => {}
            // The release is on its way (a `release` object stages it).
            Err(OtaError::NotFound(_)) => return Ok(None),
            Err(e) => return Err(e.to_string()),
        }
        // Without it every vehicle would refuse its assignment and the rollout would halt on
        // failures that say nothing about the release. It comes with the cloud's welcome and
        // is installed once the first release brings the certifier key.
        if self.ota.certificate().is_none() {
            return Ok(None);
        }
        let mut body = plan;
        if let Some(o) = body.as_object_mut() {
            o.insert("version".into(), version.into());
            o.insert("hardware".into(), hardware_id.into());
        }
        let refused = |why: String| {
            tracing::warn!(fleet_rollout = %id, error = %why, "the cloud's rollout slice cannot start here");
            self.failed
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .insert(id.to_owned(), (generation, why.clone()));
            why
        };
        let request: CreateRollout = serde_json::from_value(body)
            .map_err(|e| refused(format!("the slice's plan is not a rollout plan: {e}")))?;
        match self.rollouts.create(request, &actor(id)).await {
            Ok(view) => {
                tracing::info!(fleet_rollout = %id, rollout = view.id, "started the depot's rollout for a fleet rollout slice");
                Ok(Some(view))
            }
            Err(e) => Err(refused(e.to_string())),
        }
    }

    async fn command(
        &self,
        id: &str,
        rollout: i64,
        event: Event,
    ) -> Result<Option<RolloutView>, String> {
        match self.rollouts.command(rollout, event, &actor(id)).await {
            Ok(view) => Ok(Some(view)),
            Err(e) => {
                tracing::warn!(fleet_rollout = %id, rollout, error = %e, "the cloud's command for a rollout slice was refused");
                // Report the rollout as it is; the refusal is in the log.
                self.rollouts
                    .get(rollout)
                    .await
                    .map(Some)
                    .map_err(|e| e.to_string())
            }
        }
    }
}
