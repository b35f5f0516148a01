//! The fleet simulator's two entry points: `atlasmesh sim` against a running depot (vehicles
//! registered through the API) and `atlasmesh depot --simulate-fleet N` (registered in the
//! store directly). The simulation itself is [`atlasmesh_vehicle_link::sim`].

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{Context, bail};
use atlasmesh_vehicle_link::sim::{self, SimConfig, SimVehicle};
use atlasmesh_vehicle_link::wire::Topics;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::cli::{FleetArgs, SimArgs};
use crate::link::db::{self, RegistryError};
use crate::store::Store;

/// Ids of simulated vehicles: `sim-0001` ...
pub fn vehicle_ids(n: usize) -> impl Iterator<Item = String> {
    (1..=n).map(|i| format!("sim-{i:04}"))
}

pub struct Endpoints {
    pub topics: Topics,
    pub broker_host: String,
    pub broker_port: u16,
    pub depot_url: Url,
    pub state_dir: PathBuf,
}

pub fn config(fleet: &FleetArgs, at: Endpoints, vehicles: Vec<SimVehicle>) -> SimConfig {
    SimConfig {
        topics: at.topics,
        broker_host: at.broker_host,
        broker_port: at.broker_port,
        depot_url: at.depot_url,
        vehicles,
        seed: fleet.seed,
        second: fleet.sim_second,
        failure_rates: fleet.fail.iter().cloned().collect(),
        state_dir: at.state_dir,
        hardware_id: fleet.sim_hardware.clone(),
        initial_version: fleet.sim_version.clone(),
    }
}

/// Registers the simulated vehicles in the depot's own store (new passwords each start).
pub async fn provision_local(
    store: &Store,
    n: usize,
    hardware: &str,
    now: i64,
) -> anyhow::Result<Vec<SimVehicle>> {
    let hardware = hardware.to_owned();
    let vehicles = store
        .write(move |tx| -> Result<Vec<SimVehicle>, RegistryError> {
            let mut out = Vec::with_capacity(n);
            for id in vehicle_ids(n) {
                let password = match db::create(tx, &id, Some(&hardware), "simulator", now) {
                    Ok(p) => p,
                    Err(RegistryError::Exists(_)) => db::reissue(tx, &id, now)?,
                    Err(e) => return Err(e),
                };
                out.push(SimVehicle { id, password });
            }
            Ok(out)
        })
        .await?;
    Ok(vehicles)
}

/// `atlasmesh sim`.
pub async fn run(args: SimArgs, shutdown: CancellationToken) -> anyhow::Result<u8> {
    let depot = Url::parse(&args.depot).with_context(|| format!("--depot {}", args.depot))?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(30))
        .build()?;
    let get = |path: &str| {
        let url = depot.join(path);
        let http = http.clone();
        let token = args.token.clone();
        async move {
            let response = http.get(url?).bearer_auth(token).send().await?;
            let status = response.status();
            let body: Value = response.json().await?;
            if !status.is_success() {
                bail!("GET {status}: {body}");
            }
            anyhow::Ok(body)
        }
    };
    let status = get("/api/v1/status")
        .await
        .context("asking the depot who it is")?;
    let depot_id = status["depot"]["id"]
        .as_str()
        .context("the depot did not say its id")?
        .to_owned();
    let (broker_host, broker_port) = match &args.mqtt {
        Some(url) => {
            let (_, host, port) = crate::link::broker_address("--mqtt", url)?;
            (host, port)
        }
        None => {
            let link = get("/api/v1/vehicle-link").await?;
            let listen: std::net::SocketAddr = link["broker"]["listen"]
                .as_str()
                .context("the depot uses an external broker: pass --mqtt")?
                .parse()?;
            let host = depot.host_str().unwrap_or("127.0.0.1").to_owned();
            (host, listen.port())
        }
    };

    let mut vehicles = Vec::with_capacity(args.vehicles);
    for id in vehicle_ids(args.vehicles) {
        let created = http
            .post(depot.join("/api/v1/vehicles")?)
            .bearer_auth(&args.token)
            .json(&json!({"id": id, "hardware_id": args.fleet.sim_hardware}))
            .send()
            .await?;
        let response = if created.status() == reqwest::StatusCode::CONFLICT {
            http.post(depot.join(&format!("/api/v1/vehicles/{id}/credentials"))?)
                .bearer_auth(&args.token)
                .send()
                .await?
        } else {
            created
        };
        let status = response.status();
        let body: Value = response.json().await?;
        if !status.is_success() {
            bail!("registering {id}: {status}: {body}");
        }
        let password = body["mqtt"]["password"]
            .as_str()
            .context("no password in the answer")?
            .to_owned();
        vehicles.push(SimVehicle { id, password });
    }

    let temp;
    let state_dir = match &args.state_dir {
        Some(d) => d.clone(),
        None => {
            temp = tempfile_dir()?;
            temp.clone()
        }
    };
    let endpoints = Endpoints {
        topics: Topics::new(&depot_id)?,
        broker_host,
        broker_port,
        depot_url: depot.clone(),
        state_dir,
    };
    eprintln!(
        "simulating {} vehicles against depot {depot_id} (broker {}:{})",
        vehicles.len(),
        endpoints.broker_host,
        endpoints.broker_port
    );
    let config = config(&args.fleet, endpoints, vehicles);
    if let Some(limit) = args.duration {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(limit).await;
            stop.cancel();
        });
    }
    let finals = sim::run(config, shutdown).await;
    let errors: usize = finals.iter().map(|f| f.errors.len()).sum();
    let messages: u64 = finals.iter().map(|f| f.messages).sum();
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_vec_pretty(&finals)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    eprintln!(
        "simulation ended: {} vehicles, {messages} messages, {errors} errors",
        finals.len()
    );
    for f in finals.iter().filter(|f| !f.errors.is_empty()).take(5) {
        eprintln!("  {}: {}", f.id, f.errors.join("; "));
    }
    Ok(if errors == 0 { 0 } else { 1 })
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("atlasmesh-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}
