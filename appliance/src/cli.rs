//! The command line. Every subcommand explains itself with `--help`; the depot and cloud modes
//! take their settings from defaults, an optional TOML file, `ATLASMESH_SECTION__KEY`
//! environment variables and these flags, in that order.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::auth::Role;
use crate::config::Overrides;

#[derive(Debug, Parser)]
#[command(
    name = "atlasmesh",
    version,
    about = "AtlasMesh: the depot appliance for autonomous-vehicle depots, and the fleet core that federates them",
    long_about = "AtlasMesh runs on a depot's garage PC (`atlasmesh depot`): it serves the technicians' panel and \
API, keeps the depot store, and will stage OTA images, run canary waves, watch its disks and schedule \
charging. In the data centre the same binary runs as the fleet core (`atlasmesh cloud`).\n\n\
Start a depot with no configuration at all: `atlasmesh depot`. It listens on http://0.0.0.0:8080, keeps \
its data in ./atlasmesh-data (or $ATLASMESH_DATA_DIR) and writes the first admin's password to \
<data dir>/initial-admin-password.",
    after_help = "Configuration: --config FILE (TOML), then environment variables such as ATLASMESH_DEPOT__HTTP=127.0.0.1:9000, then flags. \
See the effective configuration with `atlasmesh depot --print-config`."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the depot appliance: panel, API and depot services on the garage PC.
    Depot(DepotArgs),
    /// Run the fleet core that federates depots (data-centre side).
    Cloud(CloudArgs),
    /// API bearer tokens, minted offline on the depot machine.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Take a consistent backup of the depot store, safe while the depot runs.
    Backup(BackupArgs),
    /// Replace the depot store with a backup (stop the depot first; the old store is kept).
    Restore(RestoreArgs),
}

#[derive(Debug, Args, Clone)]
pub struct CommonArgs {
    /// TOML configuration file (optional; embedded defaults apply without one).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory (default ./atlasmesh-data, or $ATLASMESH_DATA_DIR).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

impl CommonArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            config_file: self.config.clone(),
            data_dir: self.data_dir.clone(),
            ..Default::default()
        }
    }
}

#[derive(Debug, Args)]
pub struct DepotArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Address of the panel, API and vehicle-facing HTTP server (default 0.0.0.0:8080).
    #[arg(long, value_name = "ADDR")]
    pub http: Option<SocketAddr>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl DepotArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            depot_http: self.http,
            ..self.common.overrides()
        }
    }
}

#[derive(Debug, Args)]
pub struct CloudArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Database URL (default: a SQLite file cloud.db in the data dir).
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// Address of the fleet core's HTTP server (default 0.0.0.0:9080).
    #[arg(long, value_name = "ADDR")]
    pub http: Option<SocketAddr>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl CloudArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            cloud_http: self.http,
            database_url: self.database_url.clone(),
            ..self.common.overrides()
        }
    }
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an API token and print it once (only its hash is stored).
    Create(TokenCreateArgs),
}

#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// What the token may do: viewer (read), technician (operate) or admin (everything).
    #[arg(long, value_enum)]
    pub role: Role,
    /// A name that says who or what uses the token; it appears in the audit log.
    #[arg(long, default_value = "cli")]
    pub name: String,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// File to write the backup to (written whole or not at all).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Backup file made by `atlasmesh backup`.
    #[arg(long, value_name = "FILE")]
    pub from: PathBuf,
}
