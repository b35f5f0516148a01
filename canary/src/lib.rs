//! # atlasmesh-canary
//!
//! Will own rollout plans and the canary wave state machine: typed events in, decisions out,
//! with statistical gates, soak times, halts and N-1 rollback. It arrives with the canary work
//! and has no code yet.
//!
//! Must not: do any I/O or read the clock. It is a pure core; the depot feeds it events and a
//! time, and carries out its decisions.
