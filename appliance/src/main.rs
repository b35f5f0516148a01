//! `atlasmesh`: parse the command line and configuration, then hand over to a mode or a tool.

use std::process::ExitCode;

use anyhow::Context;
use atlasmesh::cli::{
    ChargerCommand, Cli, CloudArgs, Command, SmartCommand, TokenCommand, VehicleCommand,
};
use atlasmesh::config::{Config, ConfigError};
use atlasmesh::{
    charger_cli, cloud, depot, image_cli, logging, ota_cli, shutdown, sim_cli, smart_cli, tools,
};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Two TLS back ends are linked (ring for our servers, aws-lc-rs through tough); tonic's
    // TLS asks for the process default, so name it once.
    let _ = rustls::crypto::ring::default_provider().install_default();
    match run(cli) {
        Ok(code) => ExitCode::from(code),
        // The reader of our output has gone (`atlasmesh ... | head -1`): nobody is left to
        // read a message; exit as a shell shows a process stopped by SIGPIPE.
        Err(err) if atlasmesh::stdio::is_broken_pipe(&err) => ExitCode::from(141),
        Err(err) => {
            atlasmesh::errln!(
                "atlasmesh: error: {}",
                atlasmesh::stdio::causes(err.as_ref())
            );
            // Configuration mistakes are usage errors, like clap's own (exit 2).
            if err.downcast_ref::<ConfigError>().is_some() {
                ExitCode::from(2)
            } else {
                ExitCode::FAILURE
            }
        }
    }
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")
}

fn run(cli: Cli) -> anyhow::Result<u8> {
    match cli.command {
        Command::Depot(args) => {
            let config = Config::load(&args.overrides())?;
            if args.print_config {
                atlasmesh::out!("{}", config.to_toml())?;
                return Ok(0);
            }
            logging::init(&config.log)?;
            let simulation = (args.simulate_fleet > 0).then(|| depot::Simulation {
                vehicles: args.simulate_fleet,
                fleet: args.fleet.clone(),
                bays: None,
            });
            runtime()?.block_on(async {
                depot::run(config, simulation, shutdown::on_signals()?).await
            })?;
            Ok(0)
        }
        Command::Cloud(CloudArgs {
            command: Some(command),
            ..
        }) => {
            let rt = runtime()?;
            rt.block_on(cloud::tool(command))
        }
        Command::Cloud(args) => {
            let config = Config::load(&args.overrides())?;
            if args.print_config {
                atlasmesh::out!("{}", config.to_toml())?;
                return Ok(0);
            }
            logging::init(&config.log)?;
            runtime()?.block_on(async { cloud::run(config, shutdown::on_signals()?).await })?;
            Ok(0)
        }
        Command::Token(TokenCommand::Create(args)) => {
            let config = Config::load(&args.common.overrides())?;
            let (token, secret) = tools::token_create(&config.data_dir, args.role, &args.name)?;
            atlasmesh::errln!(
                "created API token {:?} (id {}, role {}); it is shown once, keep it safe:",
                token.name,
                token.id,
                token.role
            );
            if let Err(lost) = atlasmesh::outln!("{secret}") {
                // Nobody saw the secret: a live token nobody holds would only be a risk.
                tools::token_revoke_unseen(&config.data_dir, &token, &lost.to_string())?;
                atlasmesh::errln!(
                    "revoked API token {:?} (id {}) again: its secret could not be shown",
                    token.name,
                    token.id
                );
                return Err(lost.into());
            }
            Ok(0)
        }
        Command::Backup(args) => {
            let config = Config::load(&args.common.overrides())?;
            let report = tools::backup(&config.data_dir, &args.out)?;
            atlasmesh::outln!(
                "backup written to {} ({} bytes, schema version {}, sha256 {})",
                report.out.display(),
                report.bytes,
                report.schema_version,
                report.sha256
            )?;
            Ok(0)
        }
        Command::Restore(args) => {
            let config = Config::load(&args.common.overrides())?;
            let report = tools::restore(&config.data_dir, &args.from)?;
            atlasmesh::outln!(
                "restored {} from {}",
                report.restored.display(),
                report.from.display()
            )?;
            if let Some(kept) = report.previous_kept_as {
                atlasmesh::outln!("the replaced store is kept as {}", kept.display())?;
            }
            Ok(0)
        }
        Command::Release(command) => {
            runtime()?.block_on(ota_cli::release(command))?;
            Ok(0)
        }
        Command::Stage(args) => {
            runtime()?.block_on(ota_cli::stage(args))?;
            Ok(0)
        }
        Command::Vehicle(VehicleCommand::Pull(args)) => {
            runtime()?.block_on(ota_cli::vehicle_pull(args))
        }
        Command::Smart(SmartCommand::Report(args)) => {
            let mut config = Config::load(&args.common.overrides())?.disks;
            if let Some(path) = &args.smartctl {
                config.smartctl.clone_from(path);
            }
            if !args.devices.is_empty() {
                config.devices.clone_from(&args.devices);
            }
            runtime()?.block_on(smart_cli::report(&config, args.json))
        }
        Command::Charger(ChargerCommand::Read(args)) => {
            runtime()?.block_on(charger_cli::read(args))
        }
        Command::Charger(ChargerCommand::Profiles(args)) => charger_cli::profiles(args),
        Command::Image(command) => image_cli::run(command),
        Command::Sim(args) => {
            logging::init(&atlasmesh::config::LogConfig {
                level: args.log_level.clone(),
                ..Default::default()
            })?;
            runtime()?.block_on(async { sim_cli::run(args, shutdown::on_signals()?).await })
        }
    }
}
