//! `atlasmesh`: parse the command line and configuration, then hand over to a mode or a tool.

use std::process::ExitCode;

use anyhow::Context;
use atlasmesh::cli::{Cli, Command, TokenCommand};
use atlasmesh::config::{Config, ConfigError};
use atlasmesh::{cloud, depot, logging, shutdown, tools};
use clap::Parser;

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("atlasmesh: error: {err:#}");
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

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Depot(args) => {
            let config = Config::load(&args.overrides())?;
            if args.print_config {
                print!("{}", config.to_toml());
                return Ok(());
            }
            logging::init(&config.log)?;
            runtime()?.block_on(async { depot::run(config, shutdown::on_signals()?).await })
        }
        Command::Cloud(args) => {
            let config = Config::load(&args.overrides())?;
            if args.print_config {
                print!("{}", config.to_toml());
                return Ok(());
            }
            logging::init(&config.log)?;
            runtime()?.block_on(async { cloud::run(config, shutdown::on_signals()?).await })
        }
        Command::Token(TokenCommand::Create(args)) => {
            let config = Config::load(&args.common.overrides())?;
            let (token, secret) = tools::token_create(&config.data_dir, args.role, &args.name)?;
            eprintln!(
                "created API token {:?} (id {}, role {}); it is shown once, keep it safe:",
                token.name, token.id, token.role
            );
            println!("{secret}");
            Ok(())
        }
        Command::Backup(args) => {
            let config = Config::load(&args.common.overrides())?;
            let report = tools::backup(&config.data_dir, &args.out)?;
            println!(
                "backup written to {} ({} bytes, schema version {}, sha256 {})",
                report.out.display(),
                report.bytes,
                report.schema_version,
                report.sha256
            );
            Ok(())
        }
        Command::Restore(args) => {
            let config = Config::load(&args.common.overrides())?;
            let report = tools::restore(&config.data_dir, &args.from)?;
            println!(
                "restored {} from {}",
                report.restored.display(),
                report.from.display()
            );
            if let Some(kept) = report.previous_kept_as {
                println!("the replaced store is kept as {}", kept.display());
            }
            Ok(())
        }
    }
}
