//! Fleet phases: one release rolled out over depots in phases (the runbooks' canary at one
//! depot, regional at three, then all). Each depot runs its own waves with its own gate and
//! reports where its rollout is and what its vehicles showed; this machine sums those
//! figures over every depot started so far, judges them with the fleet's gate, and decides
//! when the next phase's depots start, when the fleet rollout halts, and when it is done.
//!
//! Like [`crate::machine`], it is pure and serialisable: the cloud feeds it depot reports,
//! operator commands and ticks with the time, stores it after every step, and makes each
//! depot's desired state follow [`FleetRollout::slice_action`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::gate::{Gate, Judgement, Tally, Verdict};
use crate::machine::Millis;
use crate::plan::Target;

/// The runbooks' phase shape: how many depots each phase adds, the last taking the rest.
pub const DEFAULT_PHASES: [(&str, usize); 3] =
    [("canary", 1), ("regional", 3), ("all", usize::MAX)];

/// Depots per phase, in order. A depot appears once.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetPhase {
    pub name: String,
    pub depots: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FleetPlan {
    pub target: Target,
    pub phases: Vec<FleetPhase>,
    /// Judged over the vehicles of every depot started so far, before each next phase.
    pub gate: Gate,
    /// How long a phase's depots stay completed before the next phase starts.
    pub soak_ms: Millis,
}

#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum FleetPlanError {
    #[error("a fleet rollout needs at least one phase with at least one depot")]
    Empty,
    #[error("phase {0} has no depots")]
    EmptyPhase(String),
    #[error("depot {0} is in more than one phase")]
    Repeated(String),
    #[error("two phases are named {0}")]
    RepeatedName(String),
    #[error("soak must not be negative")]
    NegativeSoak,
    #[error(transparent)]
    Gate(#[from] crate::PlanError),
}

/// Splits `depots` into the runbooks' phases: the first depot, the next three, the rest.
/// Phases that would be empty are left out.
pub fn default_phases(depots: &[String]) -> Vec<FleetPhase> {
    let mut rest = depots;
    let mut phases = Vec::new();
    for (name, size) in DEFAULT_PHASES {
        if rest.is_empty() {
            break;
        }
        let (now, later) = rest.split_at(size.min(rest.len()));
        phases.push(FleetPhase {
            name: name.to_owned(),
            depots: now.to_vec(),
        });
        rest = later;
    }
    phases
}

impl FleetPlan {
    pub fn validate(&self) -> Result<(), FleetPlanError> {
        if self.phases.is_empty() {
            return Err(FleetPlanError::Empty);
        }
        self.gate.validate()?;
        if self.soak_ms < 0 {
            return Err(FleetPlanError::NegativeSoak);
        }
        let mut seen = std::collections::BTreeSet::new();
        let mut names = std::collections::BTreeSet::new();
        for phase in &self.phases {
            if phase.depots.is_empty() {
                return Err(FleetPlanError::EmptyPhase(phase.name.clone()));
            }
            if !names.insert(phase.name.as_str()) {
                return Err(FleetPlanError::RepeatedName(phase.name.clone()));
            }
            for depot in &phase.depots {
                if !seen.insert(depot.as_str()) {
                    return Err(FleetPlanError::Repeated(depot.clone()));
                }
            }
        }
        Ok(())
    }
}

/// Where one depot's own rollout of the release is, as it reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DepotState {
    /// Told to run; nothing reported for this slice yet (offline, or the image is on its way).
    Pending,
    /// The depot waits for what it needs before it can start: the image staged, the
    /// director certificate that lets its vehicles trust the depot's assignments.
    Waiting,
    Running,
    Paused,
    Completed,
    Halted,
    RolledBack,
    /// The depot could not start the rollout (its plan refused, another rollout in the way).
    Failed,
}

impl DepotState {
    /// A state after which the depot's rollout will not complete by itself.
    fn is_stopped(self) -> bool {
        matches!(
            self,
            DepotState::Halted | DepotState::RolledBack | DepotState::Failed
        )
    }
}

/// One depot's report about its slice of the fleet rollout.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DepotReport {
    pub depot: String,
    pub state: DepotState,
    /// The depot's vehicles' outcomes over all its waves so far.
    pub tally: Tally,
    /// Why it halted, failed or paused.
    #[serde(default)]
    pub reason: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum FleetEvent {
    Report(DepotReport),
    /// Time passes (soak).
    Tick,
    Pause,
    /// Go on; `accept_inconclusive` lets the next phase start although the gate could not
    /// judge (too few vehicles), which is the operator's call to make, not the machine's.
    Resume {
        #[serde(default)]
        accept_inconclusive: bool,
    },
    Halt {
        reason: String,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum FleetStatus {
    Running,
    Paused { reason: String },
    Halted { reason: String },
    Completed,
}

impl FleetStatus {
    pub fn name(&self) -> &'static str {
        match self {
            FleetStatus::Running => "running",
            FleetStatus::Paused { .. } => "paused",
            FleetStatus::Halted { .. } => "halted",
            FleetStatus::Completed => "completed",
        }
    }

    pub fn is_finished(&self) -> bool {
        matches!(self, FleetStatus::Halted { .. } | FleetStatus::Completed)
    }
}

/// What the cloud carries out after a step (besides following [`FleetRollout::slice_action`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "decision", rename_all = "snake_case")]
pub enum FleetDecision {
    /// These depots start their own rollouts of the release.
    StartPhase {
        phase: String,
        depots: Vec<String>,
    },
    Pause {
        reason: String,
    },
    /// Every started depot is told to halt.
    Halt {
        reason: String,
    },
    Complete,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FleetRefused {
    #[error("the fleet rollout is {0}; it cannot {1}")]
    NotNow(&'static str, &'static str),
    #[error("depot {0} is not in this fleet rollout")]
    UnknownDepot(String),
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DepotProgress {
    /// Index of the phase the depot belongs to.
    pub phase: usize,
    pub state: DepotState,
    pub tally: Tally,
    pub reason: Option<String>,
}

/// A phase's figures for the API and the panel.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseView {
    pub number: usize,
    pub name: String,
    pub depots: Vec<String>,
    pub started: bool,
    pub current: bool,
    pub tally: Tally,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FleetRollout {
    plan: FleetPlan,
    status: FleetStatus,
    /// Index of the phase whose depots are the newest started.
    phase: usize,
    phase_started: Millis,
    /// When every depot of the current phase was last seen completed; soak counts from here.
    phase_completed: Option<Millis>,
    depots: BTreeMap<String, DepotProgress>,
}

impl FleetRollout {
    /// Starts the first phase.
    pub fn start(
        plan: FleetPlan,
        now: Millis,
    ) -> Result<(FleetRollout, Vec<FleetDecision>), FleetPlanError> {
        plan.validate()?;
        let depots = plan
            .phases
            .iter()
            .enumerate()
            .flat_map(|(i, p)| {
                p.depots.iter().map(move |d| {
                    (
                        d.clone(),
                        DepotProgress {
                            phase: i,
                            state: DepotState::Pending,
                            tally: Tally::default(),
                            reason: None,
                        },
                    )
                })
            })
            .collect();
        let first = &plan.phases[0];
        let decisions = vec![FleetDecision::StartPhase {
            phase: first.name.clone(),
            depots: first.depots.clone(),
        }];
        Ok((
            FleetRollout {
                plan,
                status: FleetStatus::Running,
                phase: 0,
                phase_started: now,
                phase_completed: None,
                depots,
            },
            decisions,
        ))
    }

    pub fn plan(&self) -> &FleetPlan {
        &self.plan
    }

    pub fn status(&self) -> &FleetStatus {
        &self.status
    }

    /// The current phase's name.
    pub fn phase_name(&self) -> &str {
        &self.plan.phases[self.phase].name
    }

    pub fn depots(&self) -> &BTreeMap<String, DepotProgress> {
        &self.depots
    }

    /// Whether the depot's phase has started.
    pub fn started(&self, depot: &str) -> bool {
        self.depots
            .get(depot)
            .is_some_and(|d| d.phase <= self.phase)
    }

    /// What a started depot's desired slice says: `run`, `pause` or `halt`. `None` for
    /// depots whose phase has not started (they get no slice).
    pub fn slice_action(&self, depot: &str) -> Option<&'static str> {
        if !self.started(depot) {
            return None;
        }
        Some(match self.status {
            FleetStatus::Running | FleetStatus::Completed => "run",
            FleetStatus::Paused { .. } => "pause",
            FleetStatus::Halted { .. } => "halt",
        })
    }

    /// The outcomes of every started depot's vehicles, summed.
    pub fn tally(&self) -> Tally {
        self.depots
            .values()
            .filter(|d| d.phase <= self.phase)
            .fold(Tally::default(), |mut t, d| {
                t.successes += d.tally.successes;
                t.failures += d.tally.failures;
                t.silent += d.tally.silent;
                t.pending += d.tally.pending;
                t
            })
    }

    pub fn judgement(&self) -> Judgement {
        self.plan.gate.judge(self.tally())
    }

    pub fn phases(&self) -> Vec<PhaseView> {
        self.plan
            .phases
            .iter()
            .enumerate()
            .map(|(i, p)| PhaseView {
                number: i + 1,
                name: p.name.clone(),
                depots: p.depots.clone(),
                started: i <= self.phase,
                current: i == self.phase,
                tally: p.depots.iter().filter_map(|d| self.depots.get(d)).fold(
                    Tally::default(),
                    |mut t, d| {
                        t.successes += d.tally.successes;
                        t.failures += d.tally.failures;
                        t.silent += d.tally.silent;
                        t.pending += d.tally.pending;
                        t
                    },
                ),
            })
            .collect()
    }

    /// Feeds one event; returns what to carry out. A refused event leaves the machine as it
    /// was.
    pub fn step(
        &mut self,
        event: FleetEvent,
        now: Millis,
    ) -> Result<Vec<FleetDecision>, FleetRefused> {
        match event {
            FleetEvent::Report(report) => {
                let Some(progress) = self.depots.get_mut(&report.depot) else {
                    return Err(FleetRefused::UnknownDepot(report.depot));
                };
                if progress.phase > self.phase {
                    // A slice withdrawn earlier or a stale report: its phase has not started.
                    return Ok(Vec::new());
                }
                progress.state = report.state;
                progress.tally = report.tally;
                progress.reason = report.reason;
                Ok(self.judge(now, false))
            }
            FleetEvent::Tick => Ok(self.judge(now, false)),
            FleetEvent::Pause => match self.status {
                FleetStatus::Running => {
                    let reason = "paused by an operator".to_owned();
                    self.status = FleetStatus::Paused {
                        reason: reason.clone(),
                    };
                    Ok(vec![FleetDecision::Pause { reason }])
                }
                _ => Err(FleetRefused::NotNow(self.status.name(), "pause")),
            },
            FleetEvent::Resume {
                accept_inconclusive,
            } => match self.status {
                FleetStatus::Paused { .. } => {
                    self.status = FleetStatus::Running;
                    Ok(self.judge(now, accept_inconclusive))
                }
                _ => Err(FleetRefused::NotNow(self.status.name(), "resume")),
            },
            FleetEvent::Halt { reason } => {
                if self.status.is_finished() {
                    return Err(FleetRefused::NotNow(self.status.name(), "halt"));
                }
                Ok(self.halt(reason))
            }
        }
    }

    fn halt(&mut self, reason: String) -> Vec<FleetDecision> {
        self.status = FleetStatus::Halted {
            reason: reason.clone(),
        };
        vec![FleetDecision::Halt { reason }]
    }

    fn judge(&mut self, now: Millis, accept_inconclusive: bool) -> Vec<FleetDecision> {
        if self.status != FleetStatus::Running {
            return Vec::new();
        }
        // A started depot that stopped short halts the fleet: its phase cannot complete, and
        // whatever stopped it there would stop it elsewhere.
        if let Some((name, d)) = self
            .depots
            .iter()
            .find(|(_, d)| d.phase <= self.phase && d.state.is_stopped())
        {
            let state = match d.state {
                DepotState::Failed => "could not start",
                DepotState::RolledBack => "rolled back",
                _ => "halted",
            };
            let why = d.reason.as_deref().unwrap_or("no reason given");
            return self.halt(format!(
                "depot {name} {state} in phase {}: {why}",
                self.phase_name()
            ));
        }
        let judgement = self.judgement();
        let t = judgement.tally;
        let decided = t.successes + t.failures + t.silent;
        // Below the gate's minimum sample even all-successes cannot pass, so a "fail" there
        // says only that the sample is small: the depots' own gates guard their vehicles, and
        // the fleet waits for the phase to finish before it asks an operator.
        let can_show = decided + t.pending >= self.plan.gate.min_sample();
        if judgement.verdict == Verdict::Fail && can_show {
            return self.halt(format!(
                "phase {} cannot pass the fleet gate: {} of {decided} vehicles succeeded, best case {:.3} < {}",
                self.phase_name(),
                t.successes,
                judgement.best_case.unwrap_or(0.0),
                judgement.threshold
            ));
        }
        let done = self
            .depots
            .values()
            .filter(|d| d.phase == self.phase)
            .all(|d| d.state == DepotState::Completed);
        if !done {
            self.phase_completed = None;
            return Vec::new();
        }
        let completed = *self.phase_completed.get_or_insert(now);
        if now - completed < self.plan.soak_ms {
            return Vec::new();
        }
        if judgement.verdict != Verdict::Pass && !accept_inconclusive {
            let reason = format!(
                "phase {} completed, but {decided} outcomes ({} failed) are too few for the fleet gate ({} at {} confidence needs {}); resume accepting that to go on",
                self.phase_name(),
                t.failures + t.silent,
                judgement.threshold,
                judgement.confidence,
                self.plan.gate.min_sample()
            );
            self.status = FleetStatus::Paused {
                reason: reason.clone(),
            };
            return vec![FleetDecision::Pause { reason }];
        }
        if self.phase + 1 == self.plan.phases.len() {
            self.status = FleetStatus::Completed;
            return vec![FleetDecision::Complete];
        }
        self.phase += 1;
        self.phase_started = now;
        self.phase_completed = None;
        let next = &self.plan.phases[self.phase];
        vec![FleetDecision::StartPhase {
            phase: next.name.clone(),
            depots: next.depots.clone(),
        }]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("d{i}")).collect()
    }

    fn plan(depots: usize, soak_ms: Millis) -> FleetPlan {
        FleetPlan {
            target: Target {
                hardware_id: "hw".into(),
                version: "2.0.0".into(),
            },
            phases: default_phases(&names(depots)),
            gate: Gate {
                threshold: 0.9,
                confidence: 0.8,
            },
            soak_ms,
        }
    }

    fn report(depot: &str, state: DepotState, ok: u64, failed: u64) -> FleetEvent {
        FleetEvent::Report(DepotReport {
            depot: depot.into(),
            state,
            tally: Tally {
                successes: ok,
                failures: failed,
                silent: 0,
                pending: 0,
            },
            reason: None,
        })
    }

    #[test]
    fn default_phases_follow_the_runbooks() {
        let sizes = |n| {
            default_phases(&names(n))
                .iter()
                .map(|p| (p.name.clone(), p.depots.len()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            sizes(10),
            [
                ("canary".into(), 1),
                ("regional".into(), 3),
                ("all".into(), 6)
            ]
        );
        assert_eq!(sizes(3), [("canary".into(), 1), ("regional".into(), 2)]);
        assert_eq!(sizes(1), [("canary".into(), 1)]);
        assert!(default_phases(&[]).is_empty());
    }

    #[test]
    fn plans_are_checked() {
        let mut p = plan(5, 0);
        p.phases[1].depots.push("d0".into());
        assert_eq!(p.validate(), Err(FleetPlanError::Repeated("d0".into())));
        let mut p = plan(5, 0);
        p.phases[2].depots.clear();
        assert_eq!(p.validate(), Err(FleetPlanError::EmptyPhase("all".into())));
        let mut p = plan(5, 0);
        p.phases.clear();
        assert_eq!(p.validate(), Err(FleetPlanError::Empty));
        assert!(FleetRollout::start(plan(0, 0), 0).is_err());
    }

    #[test]
    fn phases_advance_when_their_depots_complete_the_gate_passes_and_the_soak_is_over() {
        let (mut f, d) = FleetRollout::start(plan(5, 1_000), 0).unwrap();
        assert_eq!(
            d,
            [FleetDecision::StartPhase {
                phase: "canary".into(),
                depots: vec!["d0".into()]
            }]
        );
        assert_eq!(f.slice_action("d0"), Some("run"));
        assert_eq!(f.slice_action("d1"), None, "not started yet");
        // A report from a depot of a later phase changes nothing.
        assert!(
            f.step(report("d1", DepotState::Completed, 50, 0), 10)
                .unwrap()
                .is_empty()
        );
        assert!(
            f.step(report("d0", DepotState::Running, 10, 0), 100)
                .unwrap()
                .is_empty()
        );
        assert!(
            f.step(report("d0", DepotState::Completed, 30, 0), 200)
                .unwrap()
                .is_empty(),
            "soaking"
        );
        assert!(f.step(FleetEvent::Tick, 1_100).unwrap().is_empty());
        let d = f.step(FleetEvent::Tick, 1_200).unwrap();
        assert_eq!(
            d,
            [FleetDecision::StartPhase {
                phase: "regional".into(),
                depots: vec!["d1".into(), "d2".into(), "d3".into()]
            }]
        );
        assert_eq!(f.slice_action("d3"), Some("run"));
        for d in ["d1", "d2", "d3"] {
            f.step(report(d, DepotState::Completed, 20, 0), 2_000)
                .unwrap();
        }
        let d = f.step(FleetEvent::Tick, 3_000).unwrap();
        assert!(matches!(&d[..], [FleetDecision::StartPhase { phase, .. }] if phase == "all"));
        f.step(report("d4", DepotState::Completed, 20, 0), 3_100)
            .unwrap();
        assert_eq!(
            f.step(FleetEvent::Tick, 4_100).unwrap(),
            [FleetDecision::Complete]
        );
        assert_eq!(f.status(), &FleetStatus::Completed);
        assert_eq!(f.tally().successes, 110);
        assert_eq!(f.slice_action("d4"), Some("run"));
    }

    #[test]
    fn a_depot_that_halts_halts_the_fleet_and_later_phases_never_start() {
        let (mut f, _) = FleetRollout::start(plan(5, 0), 0).unwrap();
        let mut halted = DepotReport {
            depot: "d0".into(),
            state: DepotState::Halted,
            tally: Tally {
                successes: 1,
                failures: 3,
                silent: 0,
                pending: 1,
            },
            reason: Some("wave 1 cannot pass the gate".into()),
        };
        let d = f.step(FleetEvent::Report(halted.clone()), 10).unwrap();
        assert!(
            matches!(&d[..], [FleetDecision::Halt { reason }] if reason.contains("depot d0 halted in phase canary: wave 1")),
            "{d:?}"
        );
        assert_eq!(f.slice_action("d0"), Some("halt"));
        assert_eq!(f.slice_action("d1"), None);
        // Nothing moves a halted fleet rollout on.
        halted.state = DepotState::Completed;
        assert!(f.step(FleetEvent::Report(halted), 20).unwrap().is_empty());
        assert!(f.step(FleetEvent::Tick, 1_000_000).unwrap().is_empty());
        assert!(
            f.step(
                FleetEvent::Resume {
                    accept_inconclusive: true
                },
                30
            )
            .is_err()
        );
    }

    #[test]
    fn the_fleet_gate_halts_on_the_sum_even_when_each_depot_passed_its_own() {
        let mut p = plan(5, 0);
        p.gate = Gate {
            threshold: 0.95,
            confidence: 0.9,
        };
        let (mut f, _) = FleetRollout::start(p, 0).unwrap();
        let d = f
            .step(report("d0", DepotState::Completed, 80, 20), 10)
            .unwrap();
        assert!(
            matches!(&d[..], [FleetDecision::Halt { reason }] if reason.contains("cannot pass the fleet gate")),
            "{d:?}"
        );
    }

    #[test]
    fn too_few_vehicles_pause_for_an_operator_who_may_accept() {
        let (mut f, _) = FleetRollout::start(plan(2, 0), 0).unwrap();
        let d = f
            .step(report("d0", DepotState::Completed, 2, 0), 10)
            .unwrap();
        assert!(matches!(&d[..], [FleetDecision::Pause { .. }]), "{d:?}");
        assert_eq!(f.slice_action("d0"), Some("pause"));
        assert!(
            f.step(
                FleetEvent::Resume {
                    accept_inconclusive: false
                },
                20
            )
            .unwrap()
            .iter()
            .all(|d| matches!(d, FleetDecision::Pause { .. }))
        );
        let d = f
            .step(
                FleetEvent::Resume {
                    accept_inconclusive: true,
                },
                30,
            )
            .unwrap();
        assert!(matches!(&d[..], [FleetDecision::StartPhase { phase, .. }] if phase == "regional"));
    }

    #[test]
    fn operators_pause_resume_and_halt() {
        let (mut f, _) = FleetRollout::start(plan(5, 0), 0).unwrap();
        assert!(f.step(FleetEvent::Pause, 1).is_ok());
        assert_eq!(f.slice_action("d0"), Some("pause"));
        assert!(f.step(FleetEvent::Pause, 2).is_err());
        // A paused fleet rollout does not advance on reports.
        assert!(
            f.step(report("d0", DepotState::Completed, 50, 0), 3)
                .unwrap()
                .is_empty()
        );
        let d = f
            .step(
                FleetEvent::Resume {
                    accept_inconclusive: false,
                },
                4,
            )
            .unwrap();
        assert!(matches!(&d[..], [FleetDecision::StartPhase { .. }]));
        f.step(
            FleetEvent::Halt {
                reason: "field reports".into(),
            },
            5,
        )
        .unwrap();
        assert_eq!(f.slice_action("d1"), Some("halt"));
        assert!(f.step(FleetEvent::Halt { reason: "x".into() }, 6).is_err());
        let json = serde_json::to_string(&f).unwrap();
        assert_eq!(serde_json::from_str::<FleetRollout>(&json).unwrap(), f);
    }
}
