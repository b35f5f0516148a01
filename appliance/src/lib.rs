//! # atlasmesh (the appliance crate)
//!
//! Owns the `atlasmesh` binary and everything that wires the product together: the command
//! line and configuration, both modes (`depot`, `cloud`), the HTTP server (API, panel, probes),
//! the depot store (SQLite through rusqlite), people, roles and the audit trail, and the
//! appliance's own vital signs.
//!
//! Must not: hold decision logic that belongs to a core crate (canary waves, charging plans,
//! release trust), or run blocking work (SQLite, argon2, /proc) on the async workers.
//!
//! ## Layout
//! - [`cli`]: clap definitions. [`config`]: defaults, TOML file, environment, flags.
//! - [`depot`], [`cloud`]: each mode's `run(config, shutdown)`.
//! - [`http`]: routing, middleware, API, panel, accept loop. [`tls`]: HTTPS.
//! - [`link`]: the vehicle link (MQTT client, embedded broker, registry, vehicle events).
//! - [`charging`]: the charging control loop over Modbus chargers and the site meter, driving
//!   the pure `atlasmesh-charging` scheduler.
//! - [`rollouts`]: canary rollouts on the depot, driving the pure `atlasmesh-canary` core.
//! - [`store`]: the depot store, migrations, backup and restore. [`datadir`]: lock and secrets.
//! - [`auth`]: roles, passwords, tokens, sessions, login limiter. [`audit`]: the audit trail.
//! - [`metrics`], [`logging`], [`sysstat`], [`shutdown`]: observability and lifecycle.
//! - [`tools`]: offline commands (token minting, backup, restore). [`stdio`]: the tools'
//!   output, without panics when a pipe's reader has gone.

pub mod audit;
pub mod auth;
pub mod boot;
pub mod charger_cli;
pub mod charging;
pub mod cli;
pub mod cloud;
pub mod cloud_fleet;
pub mod cloud_link;
pub mod cloud_repo;
pub mod config;
pub mod datadir;
pub mod depot;
pub mod disks;
pub mod http;
pub mod image_cli;
pub mod link;
pub mod logging;
pub mod metrics;
pub mod ota;
pub mod ota_cli;
pub mod rollouts;
pub mod shutdown;
pub mod sim_cli;
pub mod smart_cli;
pub mod stdio;
pub mod store;
pub mod sysstat;
pub mod tls;
pub mod tools;
