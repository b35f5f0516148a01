//! The rollout state machine: typed events in (vehicle reports, eligibility, operator
//! commands, the passing of time), decisions out (assign, advance, pause, halt, roll back,
//! complete). Every call carries the time; nothing here reads a clock.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::gate::{Gate, Judgement, Tally, Verdict};
use crate::plan::{Plan, PlanError, Wave};

/// Unix milliseconds, as the depot's clock reports them.
pub type Millis = i64;

/// Where a vehicle is in the rollout.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Stage {
    /// Not assigned (yet): not in a wave so far, or waiting to become eligible.
    Waiting,
    Assigned,
    Downloading,
    Installed,
    /// Booted good on the new version; counts as a success once the soak time passes with a
    /// passed health probe.
    Soaking,
    Succeeded,
    /// Told to return to its previous version (N-1, on its other slot).
    RollingBack,
    RolledBack,
}

impl Stage {
    /// Downloading or installing: what `max_concurrent` limits.
    pub fn installing(self) -> bool {
        matches!(
            self,
            Stage::Assigned | Stage::Downloading | Stage::Installed
        )
    }

    /// Assigned and not finished.
    pub fn in_flight(self) -> bool {
        self.installing() || self == Stage::Soaking
    }
}

/// What a vehicle's attempt showed the gate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    Failed {
        reason: String,
    },
    /// Nothing conclusive before the deadline: a failure for the gate.
    Silent,
}

/// One vehicle of the rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Vehicle {
    pub stage: Stage,
    pub outcome: Option<Outcome>,
    pub eligible: bool,
    /// Why it is not eligible (empty when it is).
    pub reasons: Vec<String>,
    /// The version it ran when the rollout began: what a rollback returns it to.
    pub from_version: Option<String>,
    /// The wave (0-based) that assigned it, in the current plan.
    pub wave: Option<usize>,
    /// The plan it belongs to: a resume with a new plan starts a new epoch.
    pub epoch: u32,
    pub assigned_at: Option<Millis>,
    pub booted_at: Option<Millis>,
    pub healthy: bool,
    /// When the assignment it was released from was made: its withdrawal may cross the
    /// vehicle starting anyway, and reports of that attempt must still be followed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub released_at: Option<Millis>,
    /// Followed again after such a crossing: its pull may have met the withdrawal (the
    /// depot said there was nothing for it), so a failure before it installed is no evidence
    /// against the release.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refollowed: bool,
}

/// A vehicle as the rollout starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Candidate {
    pub id: String,
    pub from_version: Option<String>,
    pub eligible: bool,
    pub reasons: Vec<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PauseReason {
    /// A technician paused it.
    Operator,
    /// The wave neither passed nor failed within the wave timeout.
    Inconclusive,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "state", rename_all = "snake_case")]
pub enum Phase {
    Running,
    Paused { reason: PauseReason },
    Halted { reason: String },
    Completed,
    RolledBack,
}

impl Phase {
    pub fn name(&self) -> &'static str {
        match self {
            Phase::Running => "running",
            Phase::Paused { .. } => "paused",
            Phase::Halted { .. } => "halted",
            Phase::Completed => "completed",
            Phase::RolledBack => "rolled_back",
        }
    }
}

/// A new plan for the vehicles not yet updated: smaller waves after a fix, or another gate.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Replan {
    pub waves: Vec<Wave>,
    #[serde(default)]
    pub gate: Option<Gate>,
}

/// Everything the machine consumes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// Time passed: soak times end, deadlines expire, waves time out.
    Tick,
    Eligible {
        vehicle: String,
    },
    Ineligible {
        vehicle: String,
        reasons: Vec<String>,
    },
    /// The depot published the vehicle's assignment.
    Assigned {
        vehicle: String,
    },
    Downloading {
        vehicle: String,
    },
    Installed {
        vehicle: String,
    },
    BootedGood {
        vehicle: String,
    },
    HealthPass {
        vehicle: String,
    },
    HealthFail {
        vehicle: String,
        reason: String,
    },
    Failed {
        vehicle: String,
        reason: String,
    },
    RolledBack {
        vehicle: String,
    },
    TimedOut {
        vehicle: String,
    },
    Pause,
    Resume {
        replan: Option<Replan>,
    },
    Halt {
        reason: String,
    },
    /// Return every vehicle this rollout updated (or is updating) to N-1.
    RollBackAll,
}

impl Event {
    pub fn vehicle(&self) -> Option<&str> {
        match self {
            Event::Eligible { vehicle }
            | Event::Ineligible { vehicle, .. }
            | Event::Assigned { vehicle }
            | Event::Downloading { vehicle }
            | Event::Installed { vehicle }
            | Event::BootedGood { vehicle }
            | Event::HealthPass { vehicle }
            | Event::HealthFail { vehicle, .. }
            | Event::Failed { vehicle, .. }
            | Event::RolledBack { vehicle }
            | Event::TimedOut { vehicle } => Some(vehicle),
            _ => None,
        }
    }
}

/// What the depot must carry out.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum Decision {
    Assign {
        vehicle: String,
        wave: usize,
    },
    RollBack {
        vehicle: String,
        to_version: Option<String>,
    },
    /// Withdraw an assignment the vehicle never started on; it waits again.
    Release {
        vehicle: String,
    },
    Advance {
        wave: usize,
        judgement: Judgement,
    },
    Pause {
        reason: PauseReason,
    },
    Halt {
        reason: String,
        judgement: Option<Judgement>,
    },
    Complete {
        judgement: Judgement,
    },
}

/// An event the machine will not take, and why.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refused {
    #[error("{0} is not part of this rollout")]
    UnknownVehicle(String),
    #[error("cannot {action}: the rollout is {phase}")]
    NotNow {
        action: &'static str,
        phase: &'static str,
    },
    #[error(transparent)]
    Plan(#[from] PlanError),
}

/// The result of one event.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Step {
    /// Whether the rollout's state changed (a late or repeated report changes nothing).
    pub changed: bool,
    pub decisions: Vec<Decision>,
}

/// Per-wave figures for the API and the panel.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct WaveReport {
    /// 1-based, as people count waves.
    pub number: usize,
    /// Cumulative vehicles by the end of this wave.
    pub target: u64,
    pub assigned: u64,
    pub succeeded: u64,
    pub failed: u64,
    pub silent: u64,
    pub in_flight: u64,
    pub current: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Rollout {
    plan: Plan,
    targets: Vec<u64>,
    vehicles: BTreeMap<String, Vehicle>,
    phase: Phase,
    wave: usize,
    epoch: u32,
    wave_started: Millis,
}

impl Rollout {
    /// Plans the waves over `candidates` and assigns the first vehicles.
    pub fn start(
        plan: Plan,
        candidates: Vec<Candidate>,
        now: Millis,
    ) -> Result<(Rollout, Vec<Decision>), PlanError> {
        let targets = plan.targets(candidates.len() as u64)?;
        let vehicles = candidates
            .into_iter()
            .map(|c| {
                (
                    c.id,
                    Vehicle {
                        stage: Stage::Waiting,
                        outcome: None,
                        eligible: c.eligible,
                        reasons: c.reasons,
                        from_version: c.from_version,
                        wave: None,
                        epoch: 0,
                        assigned_at: None,
                        booted_at: None,
                        healthy: false,
                        released_at: None,
                        refollowed: false,
                    },
                )
            })
            .collect();
        let mut rollout = Rollout {
            plan,
            targets,
            vehicles,
            phase: Phase::Running,
            wave: 0,
            epoch: 0,
            wave_started: now,
        };
        let mut decisions = Vec::new();
        rollout.settle(now, &mut decisions);
        Ok((rollout, decisions))
    }

    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    pub fn phase(&self) -> &Phase {
        &self.phase
    }

    /// The current wave, 0-based.
    pub fn wave(&self) -> usize {
        self.wave
    }

    pub fn epoch(&self) -> u32 {
        self.epoch
    }

    /// Cumulative vehicle counts at the end of each wave of the current plan.
    pub fn targets(&self) -> &[u64] {
        &self.targets
    }

    pub fn vehicles(&self) -> &BTreeMap<String, Vehicle> {
        &self.vehicles
    }

    /// Vehicles by stage.
    pub fn counts(&self) -> BTreeMap<Stage, u64> {
        let mut counts = BTreeMap::new();
        for v in self.vehicles.values() {
            *counts.entry(v.stage).or_default() += 1;
        }
        counts
    }

    /// Whether the rollout still acts (assigns, judges, times out).
    pub fn is_active(&self) -> bool {
        matches!(self.phase, Phase::Running | Phase::Paused { .. })
    }

    /// The gate over the current plan's vehicles, with the current wave's unassigned places
    /// counted as pending.
    pub fn judgement(&self) -> Judgement {
        let mut tally = self.tally(|w| w <= self.wave);
        let assigned = self.assigned_in_epoch();
        tally.pending += self.targets[self.wave].saturating_sub(assigned);
        self.plan.gate.judge(tally)
    }

    pub fn waves(&self) -> Vec<WaveReport> {
        self.targets
            .iter()
            .enumerate()
            .map(|(i, &target)| {
                let t = self.tally(|w| w == i);
                WaveReport {
                    number: i + 1,
                    target,
                    assigned: t.successes + t.failures + t.silent + t.pending,
                    succeeded: t.successes,
                    failed: t.failures,
                    silent: t.silent,
                    in_flight: t.pending,
                    current: i == self.wave && self.is_active(),
                }
            })
            .collect()
    }

    fn tally(&self, wave: impl Fn(usize) -> bool) -> Tally {
        let mut t = Tally::default();
        for v in self.vehicles.values() {
            if v.epoch != self.epoch || !v.wave.is_some_and(&wave) {
                continue;
            }
            match &v.outcome {
                Some(Outcome::Succeeded) => t.successes += 1,
                Some(Outcome::Failed { .. }) => t.failures += 1,
                Some(Outcome::Silent) => t.silent += 1,
                None if v.stage.in_flight() => t.pending += 1,
                None => {}
            }
        }
        t
    }

    fn assigned_in_epoch(&self) -> u64 {
        self.vehicles
            .values()
            .filter(|v| v.epoch == self.epoch && v.wave.is_some())
            .count() as u64
    }

    /// Applies one event at time `now`.
    pub fn handle(&mut self, now: Millis, event: &Event) -> Result<Step, Refused> {
        let before = self.clone();
        let mut decisions = Vec::new();
        if let Some(id) = event.vehicle() {
            if !self.vehicles.contains_key(id) {
                return Err(Refused::UnknownVehicle(id.to_owned()));
            }
            self.report(id, event, &mut decisions);
        } else {
            self.command(now, event, &mut decisions)?;
        }
        self.settle(now, &mut decisions);
        Ok(Step {
            changed: *self != before,
            decisions,
        })
    }

    fn report(&mut self, id: &str, event: &Event, decisions: &mut Vec<Decision>) {
        let (epoch, wave) = (self.epoch, self.wave);
        let active = self.is_active();
        let v = self.vehicles.get_mut(id).expect("checked by the caller");
        let open = v.outcome.is_none() && v.stage.in_flight() && active;
        match event {
            Event::Eligible { .. } => {
                v.eligible = true;
                v.reasons.clear();
            }
            Event::Ineligible { reasons, .. } => {
                v.eligible = false;
                v.reasons.clone_from(reasons);
                if open && v.stage == Stage::Assigned {
                    // It left (or dropped off the link) before starting: it never touched the
                    // update, so it is no failure; its place goes to a vehicle that is here.
                    let assigned_at = v.assigned_at;
                    reset(v, epoch);
                    v.released_at = assigned_at;
                    decisions.push(Decision::Release {
                        vehicle: id.to_owned(),
                    });
                }
            }
            Event::Assigned { .. } => {}
            Event::Downloading { .. } | Event::Installed { .. } | Event::BootedGood { .. }
                if v.stage == Stage::Waiting && v.released_at.is_some() && v.epoch == epoch =>
            {
                // Released as it left, it had started after all (the withdrawal crossed its
                // start). Followed again, in the wave now open; otherwise it would end up on
                // this version unseen by the gate, and wait forever as "already there".
                v.wave = Some(wave);
                v.assigned_at = v.released_at.take();
                v.refollowed = true;
                v.stage = match event {
                    Event::Downloading { .. } => Stage::Downloading,
                    Event::Installed { .. } => Stage::Installed,
                    _ => {
                        v.booted_at = None;
                        v.healthy = false;
                        Stage::Soaking
                    }
                };
                if active {
                    decisions.push(Decision::Assign {
                        vehicle: id.to_owned(),
                        wave,
                    });
                } else {
                    // Halted meanwhile: what it installs goes back like the rest.
                    roll_back(id, v, decisions);
                }
            }
            Event::Downloading { .. } if open && v.stage == Stage::Assigned => {
                v.stage = Stage::Downloading;
            }
            Event::Installed { .. } if open && v.stage.installing() => {
                v.stage = Stage::Installed;
            }
            Event::BootedGood { .. } if open && v.stage.installing() => {
                v.stage = Stage::Soaking;
                v.booted_at = None;
                v.healthy = false;
            }
            Event::HealthPass { .. } if open && v.stage == Stage::Soaking => {
                v.healthy = true;
            }
            Event::HealthFail { reason, .. } if open => {
                fail(
                    id,
                    v,
                    Outcome::Failed {
                        reason: format!("health probe failed: {reason}"),
                    },
                    decisions,
                );
            }
            Event::Failed { .. } if open && v.refollowed && v.stage == Stage::Downloading => {
                // Most likely the withdrawal it crossed: released again, as it was.
                let assigned_at = v.assigned_at;
                reset(v, epoch);
                v.released_at = assigned_at;
                decisions.push(Decision::Release {
                    vehicle: id.to_owned(),
                });
            }
            Event::Failed { reason, .. } if open => {
                fail(
                    id,
                    v,
                    Outcome::Failed {
                        reason: reason.clone(),
                    },
                    decisions,
                );
            }
            Event::TimedOut { .. } if open => fail(id, v, Outcome::Silent, decisions),
            Event::RolledBack { .. } if v.stage == Stage::RollingBack => {
                v.stage = Stage::RolledBack;
                if v.epoch < epoch {
                    // Rolled back under an earlier plan: the current one may assign it.
                    reset(v, epoch);
                }
            }
            _ => {}
        }
    }

    fn command(
        &mut self,
        now: Millis,
        event: &Event,
        decisions: &mut Vec<Decision>,
    ) -> Result<(), Refused> {
        let not_now = |action| Refused::NotNow {
            action,
            phase: self.phase.name(),
        };
        match event {
            Event::Tick => {}
            Event::Pause => {
                if self.phase != Phase::Running {
                    return Err(not_now("pause"));
                }
                self.phase = Phase::Paused {
                    reason: PauseReason::Operator,
                };
                decisions.push(Decision::Pause {
                    reason: PauseReason::Operator,
                });
            }
            Event::Resume { replan } => match (&self.phase, replan) {
                (Phase::Paused { .. }, None) => {
                    self.phase = Phase::Running;
                    self.wave_started = now;
                }
                (Phase::Paused { .. } | Phase::Halted { .. }, replan) => {
                    let replan = replan.clone().unwrap_or_else(|| Replan {
                        waves: self.plan.waves.clone(),
                        gate: None,
                    });
                    self.replan(now, replan)?;
                }
                _ => return Err(not_now("resume")),
            },
            Event::Halt { reason } => {
                if !self.is_active() {
                    return Err(not_now("halt"));
                }
                self.halt(format!("halted by a technician: {reason}"), None, decisions);
            }
            Event::RollBackAll => {
                if self.phase == Phase::RolledBack {
                    return Err(not_now("roll back"));
                }
                for (id, v) in &mut self.vehicles {
                    if v.stage.in_flight() || v.stage == Stage::Succeeded {
                        roll_back(id, v, decisions);
                    }
                }
                self.phase = Phase::RolledBack;
            }
            _ => unreachable!("vehicle events are handled by report()"),
        }
        Ok(())
    }

    /// A new epoch: the vehicles not updated, planned again.
    fn replan(&mut self, now: Millis, replan: Replan) -> Result<(), Refused> {
        let mut plan = self.plan.clone();
        plan.waves = replan.waves;
        if let Some(gate) = replan.gate {
            plan.gate = gate;
        }
        let remaining = self
            .vehicles
            .values()
            .filter(|v| v.stage != Stage::Succeeded)
            .count() as u64;
        let targets = plan.targets(remaining)?;
        self.plan = plan;
        self.targets = targets;
        self.epoch += 1;
        self.wave = 0;
        self.wave_started = now;
        self.phase = Phase::Running;
        let epoch = self.epoch;
        for v in self.vehicles.values_mut() {
            if matches!(v.stage, Stage::Waiting | Stage::RolledBack) {
                reset(v, epoch);
            }
        }
        Ok(())
    }

    fn halt(
        &mut self,
        reason: String,
        judgement: Option<Judgement>,
        decisions: &mut Vec<Decision>,
    ) {
        decisions.push(Decision::Halt {
            reason: reason.clone(),
            judgement,
        });
        let (wave, epoch, failed_wave_too) =
            (self.wave, self.epoch, self.plan.roll_back_failed_wave);
        for (id, v) in &mut self.vehicles {
            let in_failed_wave = v.epoch == epoch && v.wave == Some(wave);
            if (v.outcome.is_none() && v.stage.in_flight())
                || (failed_wave_too && in_failed_wave && v.stage == Stage::Succeeded)
            {
                roll_back(id, v, decisions);
            }
        }
        self.phase = Phase::Halted { reason };
    }

    /// What follows from the time and the state: soak ends, deadlines, the gate, assignments.
    fn settle(&mut self, now: Millis, decisions: &mut Vec<Decision>) {
        if !self.is_active() {
            return;
        }
        let (soak, deadline) = (self.plan.soak_ms, self.plan.deadline_ms);
        for (id, v) in &mut self.vehicles {
            if v.outcome.is_some() || !v.stage.in_flight() {
                continue;
            }
            if v.stage == Stage::Soaking {
                let booted = *v.booted_at.get_or_insert(now);
                if v.healthy && now - booted >= soak {
                    v.stage = Stage::Succeeded;
                    v.outcome = Some(Outcome::Succeeded);
                    continue;
                }
            }
            if v.assigned_at.is_some_and(|at| now - at >= deadline) {
                fail(id, v, Outcome::Silent, decisions);
            }
        }
        let judgement = self.judgement();
        match judgement.verdict {
            Verdict::Fail => {
                let reason = format!(
                    "wave {} cannot pass the gate: {} succeeded, {} failed, {} silent, {} pending; even if every pending vehicle succeeds the lower bound is {:.4}, below {}",
                    self.wave + 1,
                    judgement.tally.successes,
                    judgement.tally.failures,
                    judgement.tally.silent,
                    judgement.tally.pending,
                    judgement.best_case.unwrap_or(0.0),
                    judgement.threshold
                );
                self.halt(reason, Some(judgement), decisions);
                return;
            }
            Verdict::Pass if self.phase == Phase::Running => {
                if self.wave + 1 == self.targets.len() {
                    self.phase = Phase::Completed;
                    decisions.push(Decision::Complete { judgement });
                    return;
                }
                self.wave += 1;
                self.wave_started = now;
                decisions.push(Decision::Advance {
                    wave: self.wave,
                    judgement,
                });
            }
            Verdict::Inconclusive
                if self.phase == Phase::Running
                    && now - self.wave_started >= self.plan.wave_timeout_ms =>
            {
                self.phase = Phase::Paused {
                    reason: PauseReason::Inconclusive,
                };
                decisions.push(Decision::Pause {
                    reason: PauseReason::Inconclusive,
                });
                return;
            }
            _ => {}
        }
        self.fill(now, decisions);
    }

    /// Assigns eligible waiting vehicles while the wave has places and installs may start.
    fn fill(&mut self, now: Millis, decisions: &mut Vec<Decision>) {
        if self.phase != Phase::Running {
            return;
        }
        let places = self.targets[self.wave].saturating_sub(self.assigned_in_epoch());
        let installing = self
            .vehicles
            .values()
            .filter(|v| v.stage.installing())
            .count() as u64;
        let slots = self.plan.max_concurrent.saturating_sub(installing);
        let (wave, epoch) = (self.wave, self.epoch);
        let picked: Vec<String> = self
            .vehicles
            .iter()
            .filter(|(_, v)| v.stage == Stage::Waiting && v.eligible && v.epoch == epoch)
            .take(places.min(slots) as usize)
            .map(|(id, _)| id.clone())
            .collect();
        for id in picked {
            let v = self.vehicles.get_mut(&id).expect("picked from the map");
            v.stage = Stage::Assigned;
            v.wave = Some(wave);
            v.assigned_at = Some(now);
            decisions.push(Decision::Assign { vehicle: id, wave });
        }
    }
}

fn fail(id: &str, v: &mut Vehicle, outcome: Outcome, decisions: &mut Vec<Decision>) {
    v.outcome = Some(outcome);
    // Withdraws the assignment and returns the vehicle to N-1 (a no-op for one whose
    // install never switched slots).
    roll_back(id, v, decisions);
}

fn roll_back(id: &str, v: &mut Vehicle, decisions: &mut Vec<Decision>) {
    v.stage = Stage::RollingBack;
    decisions.push(Decision::RollBack {
        vehicle: id.to_owned(),
        to_version: v.from_version.clone(),
    });
}

fn reset(v: &mut Vehicle, epoch: u32) {
    v.stage = Stage::Waiting;
    v.outcome = None;
    v.wave = None;
    v.epoch = epoch;
    v.assigned_at = None;
    v.booted_at = None;
    v.healthy = false;
    v.released_at = None;
    v.refollowed = false;
}
