//! # atlasmesh-charging
//!
//! The depot's charging: Modbus TCP charger and meter drivers built from declarative register
//! maps, the failsafe control loop, and the charging scheduler.
//!
//! - [`schedule`]: the scheduler, a pure core: vehicles, the site limit, a base-load forecast
//!   and a tariff in; power per vehicle per slot, a ready-by-departure verdict with any
//!   shortfall, and an explanation out. Cost-optimal by an LP, earliest-deadline-first when
//!   the solver fails.
//! - [`profile`]: register-map profiles (TOML) and the pure register codec; the shipped
//!   profiles live in `charging/profiles/`.
//! - [`driver`]: a Modbus TCP driver for any profile (tokio-modbus).
//! - [`control`]: the control loop's pure decisions: setpoint order, backoff, health.
//! - [`sim`]: simulated chargers and meters (a tokio-modbus server) for demos and tests.
//! - [`flow`]: the max-flow network the scheduler's exact algorithm runs on.
//! - [`instances`]: reproducible depot nights for tests and benchmarks.
//!
//! Must not: let the scheduler do I/O, or write a setpoint that would take the site above its
//! limit, even between two writes.

pub mod control;
pub mod driver;
pub mod flow;
pub mod instances;
pub mod profile;
pub mod schedule;
pub mod sim;
