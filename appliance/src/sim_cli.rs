//! The fleet simulator's two entry points: `atlasmesh sim` against a running depot (vehicles
//! registered through the API) and `atlasmesh depot --simulate-fleet N` (registered in the
//! store directly). The simulation itself is [`atlasmesh_vehicle_link::sim`].

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
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
        roster: fleet.chargers > 0,
        chargers: None,
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

/// The demo releases a simulated depot stages: one good, one that fails on some vehicles, so
/// the panel can show a rollout completing and one halting.
pub const DEMO_GOOD: &str = "1.1.0";
pub const DEMO_BAD: &str = "1.2.0";
/// How often the bad demo release fails to install, unless `--fail` says otherwise.
pub const DEMO_BAD_RATE: f64 = 0.4;
const DEMO_IMAGE_BYTES: usize = 4 << 20;

/// A release repository of the simulated fleet's own, in the data directory: real keys
/// (mode 0600), real TUF metadata, staged through the normal verification path.
pub struct DemoFleet {
    keys: PathBuf,
    repo: PathBuf,
    pub root: PathBuf,
}

/// Creates the demo fleet's keys, repository and two releases for `hardware` (from `from`), or
/// finds them from an earlier start.
pub async fn demo_fleet(
    dir: &std::path::Path,
    hardware: &str,
    from: &str,
) -> anyhow::Result<DemoFleet> {
    use atlasmesh_ota_staging::meta::ImageMeta;
    use atlasmesh_ota_staging::release::{self, Expiries, Keys};
    use atlasmesh_ota_staging::time::SystemClock;
    use rand::{RngCore, SeedableRng};

    let fleet = DemoFleet {
        keys: dir.join("keys"),
        repo: dir.join("repo"),
        root: dir.join("repo/metadata/1.root.json"),
    };
    if fleet.root.exists() {
        return Ok(fleet);
    }
    // Half-made by an interrupted start: begin again.
    let _ = std::fs::remove_dir_all(dir);
    Keys::generate(&fleet.keys).context("generating the demo fleet's keys")?;
    let keys = Keys::load(&fleet.keys)?;
    release::init(&fleet.repo, &keys, Expiries::default(), &SystemClock).await?;
    for (n, version, notes) in [
        (1u64, DEMO_GOOD, "demo: a good release"),
        (2, DEMO_BAD, "demo: fails to install on some vehicles"),
    ] {
        let mut data = vec![0u8; DEMO_IMAGE_BYTES];
        rand::rngs::StdRng::seed_from_u64(n).fill_bytes(&mut data);
        let image = dir.join(format!("{hardware}-{version}.img"));
        std::fs::write(&image, &data).with_context(|| format!("writing {}", image.display()))?;
        let meta = ImageMeta {
            version: version.into(),
            hardware_id: hardware.into(),
            min_version: Some(from.into()),
            notes: Some(notes.into()),
        };
        release::add(
            &fleet.repo,
            &keys,
            &image,
            &meta,
            Expiries::default(),
            &SystemClock,
        )
        .await?;
        std::fs::remove_file(&image)?;
    }
    Ok(fleet)
}

/// Stages the demo releases not staged yet and certifies the depot's director with the demo
/// fleet's certifier, so simulated vehicles trust its assignments.
pub async fn stage_demo(
    ota: &std::sync::Arc<crate::ota::Ota>,
    fleet: &DemoFleet,
    hardware: &str,
    depot_id: &str,
) -> anyhow::Result<()> {
    use atlasmesh_ota_staging::certificate::DepotCertificate;
    use atlasmesh_ota_staging::keys::KeyPair;
    use atlasmesh_ota_staging::release::CERTIFIER_KEY;

    let actor = crate::ota::Actor {
        name: "simulator".into(),
        role: None,
        request_id: None,
    };
    for version in [DEMO_GOOD, DEMO_BAD] {
        if ota.find(version, Some(hardware)).await.is_ok() {
            continue;
        }
        ota.stage_now(
            crate::ota::Source::Path(fleet.repo.clone()),
            hardware.into(),
            version.into(),
            actor.clone(),
        )
        .await
        .with_context(|| format!("staging the demo release {version}"))?;
    }
    if ota.certificate().is_none() {
        let certifier = KeyPair::load(&fleet.keys.join(format!("{CERTIFIER_KEY}.pem")))?;
        let now = std::time::SystemTime::now();
        let year = Duration::from_secs(365 * 86_400);
        let cert = DepotCertificate::issue(
            &certifier,
            depot_id,
            ota.director_root_v1(),
            now,
            now + year,
        );
        ota.install_certificate(&cert.to_json(), depot_id, &actor)
            .await
            .context("certifying the depot's director for the demo fleet")?;
    }
    Ok(())
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

    // Without --state-dir the vehicles' slots live in a directory of this run, removed when
    // the simulation ends (a stopped test run must not leave hundreds of MB in /tmp).
    let mut temp = None;
    let state_dir = match &args.state_dir {
        Some(d) => d.clone(),
        None => {
            let dir = tempfile_dir()?;
            temp = Some(RemoveOnDrop(dir.clone()));
            dir
        }
    };
    let endpoints = Endpoints {
        topics: Topics::new(&depot_id)?,
        broker_host,
        broker_port,
        depot_url: depot.clone(),
        state_dir,
    };
    crate::errln!(
        "simulating {} vehicles against depot {depot_id} (broker {}:{})",
        vehicles.len(),
        endpoints.broker_host,
        endpoints.broker_port
    );
    let mut config = config(&args.fleet, endpoints, vehicles);
    if args.fleet.chargers > 0 {
        let (chargers, bays) = start_chargers(
            args.fleet.chargers,
            config.vehicles.len(),
            args.fleet.seed,
            shutdown.clone(),
        )
        .await?;
        config.chargers = Some(bays);
        // The depot reaches them through its configuration; this is the part to paste.
        let snippet = toml::to_string(&serde_json::json!({ "charging": { "chargers": chargers } }))
            .unwrap_or_default();
        crate::outln!("# simulated chargers: add to the depot's configuration\n{snippet}")?;
    }
    if let Some(limit) = args.duration {
        let stop = shutdown.clone();
        tokio::spawn(async move {
            tokio::time::sleep(limit).await;
            stop.cancel();
        });
    }
    let finals = sim::run(config, shutdown).await;
    drop(temp);
    let errors: usize = finals.iter().map(|f| f.errors.len()).sum();
    let messages: u64 = finals.iter().map(|f| f.messages).sum();
    if let Some(path) = &args.report {
        std::fs::write(path, serde_json::to_vec_pretty(&finals)?)
            .with_context(|| format!("writing {}", path.display()))?;
    }
    crate::errln!(
        "simulation ended: {} vehicles, {messages} messages, {errors} errors",
        finals.len()
    );
    for f in finals.iter().filter(|f| !f.errors.is_empty()).take(5) {
        crate::errln!("  {}: {}", f.id, f.errors.join("; "));
    }
    Ok(if errors == 0 { 0 } else { 1 })
}

struct RemoveOnDrop(PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!(dir = %self.0.display(), error = %e, "cannot remove the simulation's state directory");
        }
    }
}

fn tempfile_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("atlasmesh-sim-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// Charger profiles the simulated chargers use, in turn.
const SIM_CHARGER_PROFILES: [&str; 5] = [
    "alfen-ng9xx",
    "abb-terra-ac",
    "phoenix-em-cp-pp-eth",
    "keba-p30",
    "schneider-evlink-pro",
];

/// The simulated chargers by bay, for the simulated fleet: a vehicle docked at a bay plugs
/// into the charger there, and its state of charge is the charger's.
struct SimBays(HashMap<String, atlasmesh_charging::sim::SimDevice>);

impl sim::Bays for SimBays {
    fn docked(&self, bay: &str, soc_percent: f64, battery_kwh: f64) -> Option<f64> {
        let device = self.0.get(bay)?;
        let soc = device.with(|s| s.vehicle.as_ref().map(|v| v.soc_percent));
        Some(soc.unwrap_or_else(|| {
            device.plug(Some(atlasmesh_charging::sim::SimVehicle {
                soc_percent,
                battery_kwh,
                max_kw: 11.0,
            }));
            soc_percent
        }))
    }

    fn left(&self, bay: &str) {
        if let Some(device) = self.0.get(bay) {
            device.plug(None);
        }
    }
}

/// Starts `n` simulated Modbus TCP chargers on loopback, one per bay from `bay-1`; returns how
/// the depot reaches them, and the bays for the simulated fleet. The first `fleet` bays wait
/// for the fleet's vehicles to dock; any beyond have a vehicle of their own plugged in.
pub async fn start_chargers(
    n: usize,
    fleet: usize,
    seed: u64,
    shutdown: CancellationToken,
) -> anyhow::Result<(Vec<crate::config::ChargerConfig>, sim::BayChargers)> {
    use rand::{Rng, SeedableRng};
    let profiles = crate::charging::load_profiles(None)?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0xc4a7);
    let mut out = Vec::with_capacity(n);
    let mut bays = HashMap::new();
    for i in 0..n {
        let name = SIM_CHARGER_PROFILES[i % SIM_CHARGER_PROFILES.len()];
        let profile = profiles[name].clone();
        let vehicle = atlasmesh_charging::sim::SimVehicle {
            soc_percent: rng.random_range(15.0..70.0),
            battery_kwh: [60.0, 75.0, 82.5, 100.0][rng.random_range(0..4)],
            max_kw: 11.0,
        };
        let device =
            atlasmesh_charging::sim::SimDevice::new(profile, (i >= fleet).then_some(vehicle));
        bays.insert(format!("bay-{}", i + 1), device.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding a simulated charger")?;
        let address = listener.local_addr()?.to_string();
        tokio::spawn(device.clone().serve(listener, shutdown.clone()));
        tokio::spawn(device.run_physics(shutdown.clone()));
        out.push(crate::config::ChargerConfig {
            id: format!("sim-cp-{}", i + 1),
            profile: name.to_owned(),
            address,
            unit_id: None,
            bay: Some(format!("bay-{}", i + 1)),
            circuit: None,
        });
    }
    tracing::info!(chargers = n, "simulated Modbus TCP chargers started");
    Ok((out, sim::BayChargers(Arc::new(SimBays(bays)))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use atlasmesh_charging::driver::Device;

    /// A fleet vehicle docking at a simulated charger's bay plugs into it, charges at what the
    /// depot writes (read back over Modbus), and unplugs when it leaves.
    #[tokio::test]
    async fn fleet_vehicles_charge_through_the_charger_at_their_bay() {
        let shutdown = CancellationToken::new();
        let (chargers, bays) = start_chargers(2, 1, 7, shutdown.clone()).await.unwrap();
        let profiles = crate::charging::load_profiles(None).unwrap();
        let connect = |i: usize| {
            let c = &chargers[i];
            let profile = profiles[&c.profile].clone();
            let addr: std::net::SocketAddr = c.address.parse().unwrap();
            Device::connect(
                addr,
                profile.device.unit_id,
                profile,
                Duration::from_secs(2),
            )
        };
        let mut first = connect(0).await.unwrap();
        assert!(
            !first.poll().await.unwrap().plugged,
            "bay-1 waits for the fleet"
        );
        let mut second = connect(1).await.unwrap();
        assert!(
            second.poll().await.unwrap().plugged,
            "bay-2 has its own vehicle"
        );

        assert_eq!(bays.0.docked("bay-1", 40.0, 60.0), Some(40.0));
        assert_eq!(bays.0.docked("bay-9", 40.0, 60.0), None, "no charger there");
        assert!(first.poll().await.unwrap().plugged);
        first.set_current(32.0).await.unwrap();
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let reading = first.poll().await.unwrap();
        assert!(
            reading.power_w > 10_000.0,
            "the vehicle takes its 11 kW: {reading:?}"
        );
        let soc = bays.0.docked("bay-1", 40.0, 60.0).unwrap();
        assert!(
            soc > 40.0,
            "the vehicle's charge comes from the charger: {soc}"
        );

        bays.0.left("bay-1");
        assert!(!first.poll().await.unwrap().plugged);
        shutdown.cancel();
    }
}
