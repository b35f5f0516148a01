//! # atlasmesh-canary
//!
//! Rollout plans and the canary wave state machine. A [`plan::Plan`] names the target image,
//! cumulative waves, the statistical [`gate::Gate`] between them, soak time, a per-vehicle
//! deadline and how many vehicles install at once. A [`machine::Rollout`] consumes typed
//! [`machine::Event`]s (eligibility, vehicle reports, operator commands, ticks) and returns
//! [`machine::Decision`]s (assign, advance, pause, halt, roll back, complete) for the depot to
//! carry out. It halts mid-wave as soon as the gate can no longer pass.
//!
//! [`fleet::FleetRollout`] is the same kind of machine one level up: a release over depots in
//! phases, judged on the figures the depots report.
//!
//! Layout: `fleet` (phases over depots), `gate` (Wilson lower bound, three verdicts), `plan` (waves and limits, validated
//! against the population), `machine` (the state machine; serialisable, so the depot can store
//! it after every step and restart exactly where it was).
//!
//! Must not: do any I/O or read the clock. It is a pure core; the depot feeds it events and the
//! time, stores it, and carries out its decisions.

pub mod fleet;
pub mod gate;
pub mod machine;
pub mod plan;

pub use gate::{Gate, Judgement, Tally, Verdict};
pub use machine::{
    Candidate, Decision, Event, Millis, Outcome, PauseReason, Phase, Refused, Replan, Rollout,
    Stage, Step, Vehicle, WaveReport,
};
pub use plan::{Plan, PlanError, Size, Target, Wave};
