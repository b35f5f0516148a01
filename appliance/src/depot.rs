//! Depot mode: wires the store, the HTTP server and the background tasks, and takes them down
//! in order on shutdown (stop accepting, finish requests, close the store).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use prometheus_client::registry::Registry;
use rand::RngCore;
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;

use crate::audit::{self, Outcome};
use crate::auth::{self, Role};
use crate::config::{Config, validate_depot_id};
use crate::datadir::{DataDirLock, write_private};
use crate::http::server::{ServeOptions, serve};
use crate::http::{self, AppState, Clock, Core, Database, Mode, SystemClock};
use crate::metrics::CoreMetrics;
use crate::store::{Store, StoreError, meta_get, meta_set, unix_ms};
use crate::sysstat;

/// The account created on first start.
pub const INITIAL_ADMIN: &str = "admin";
/// Where the first admin's random password is written (mode 0600) until it is changed.
pub const INITIAL_PASSWORD_FILE: &str = "initial-admin-password";

pub fn initial_password_pending(data_dir: &Path) -> bool {
    data_dir.join(INITIAL_PASSWORD_FILE).exists()
}

/// Removes the initial password file once the admin has chosen a password of their own.
pub fn forget_initial_password(data_dir: &Path) {
    let path = data_dir.join(INITIAL_PASSWORD_FILE);
    match std::fs::remove_file(&path) {
        Ok(()) => {
            tracing::info!(path = %path.display(), "initial admin password changed; removed its file")
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "could not remove the initial admin password file")
        }
    }
}

/// An in-process simulated fleet (`depot --simulate-fleet N`).
#[derive(Debug, Clone)]
pub struct Simulation {
    pub vehicles: usize,
    pub fleet: crate::cli::FleetArgs,
    /// The simulated chargers' bays, once they are started.
    pub bays: Option<atlasmesh_vehicle_link::sim::BayChargers>,
}

/// Binds the configured address and runs the depot until `shutdown`.
pub async fn run(
    config: Config,
    simulation: Option<Simulation>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let lock = DataDirLock::acquire(&config.data_dir)?;
    let listener = TcpListener::bind(config.depot.http)
        .await
        .with_context(|| format!("cannot listen on {} (depot.http)", config.depot.http))?;
    run_locked(config, lock, listener, simulation, shutdown).await
}

struct Prepared {
    depot_id: String,
    initial_password_written: bool,
}

async fn run_locked(
    mut config: Config,
    lock: DataDirLock,
    listener: TcpListener,
    mut simulation: Option<Simulation>,
    shutdown: CancellationToken,
) -> anyhow::Result<()> {
    let clock: Arc<dyn Clock> = Arc::new(SystemClock);
    let demo = match &mut simulation {
        Some(sim) => demo_fleet(&mut config, sim).await?,
        None => None,
    };
    let store_path = config.store_path();
    let prep_config = config.clone();
    let now = unix_ms(clock.now());
    let (store, prepared) =
        tokio::task::spawn_blocking(move || -> anyhow::Result<(Store, Prepared)> {
            let store = Store::open(&store_path)?;
            let prepared = prepare(&store, &prep_config, now)?;
            Ok((store, prepared))
        })
        .await
        .context("store start-up task failed")??;
    let password_file = config.data_dir.join(INITIAL_PASSWORD_FILE);
    if prepared.initial_password_written {
        tracing::warn!(
            user = INITIAL_ADMIN,
            password_file = %password_file.display(),
            "created the first admin; its password is in the file named here (mode 0600): sign in and change it"
        );
    } else if password_file.exists() {
        tracing::warn!(password_file = %password_file.display(), "the initial admin password has not been changed yet");
    }

    let mut registry = Registry::default();
    let metrics = CoreMetrics::register(&mut registry, Mode::Depot.as_str());
    let system = sysstat::spawn(
        &config.data_dir,
        Duration::from_secs(2),
        metrics.process_rss.clone(),
        shutdown.clone(),
    );
    let (events, _) = broadcast::channel(256);
    let tls = crate::tls::acceptor(
        &config.tls,
        &config.data_dir,
        std::slice::from_ref(&prepared.depot_id),
    )?;
    let ota = crate::ota::Ota::open(
        &config.data_dir,
        &config.ota,
        store.clone(),
        clock.clone(),
        events.clone(),
        &mut registry,
        shutdown.clone(),
    )
    .await
    .context("opening the image cache")?;
    let http_addr = listener
        .local_addr()
        .context("listener has no local address")?;
    let mqtt_listener = match &config.vehicle_link.broker_url {
        Some(_) => None,
        None => Some(
            TcpListener::bind(config.vehicle_link.listen)
                .await
                .with_context(|| {
                    format!(
                        "cannot listen for vehicles on {} (vehicle_link.listen)",
                        config.vehicle_link.listen
                    )
                })?,
        ),
    };
    let link = crate::link::VehicleLink::start(
        crate::link::LinkParts {
            config: config.vehicle_link.clone(),
            depot_id: prepared.depot_id.clone(),
            listener: mqtt_listener,
            http_addr,
            store: store.clone(),
            clock: clock.clone(),
            panel: events.clone(),
        },
        &mut registry,
        shutdown.clone(),
    )
    .await
    .context("starting the vehicle link")?;
    let rollouts = crate::rollouts::Rollouts::start(
        crate::rollouts::RolloutParts {
            depot_id: prepared.depot_id.clone(),
            store: store.clone(),
            ota: ota.clone(),
            link: link.clone(),
            clock: clock.clone(),
            config: config.canary.clone(),
            panel: events.clone(),
        },
        &mut registry,
        shutdown.clone(),
    )
    .await
    .context("resuming rollouts")?;
    let disks = crate::disks::Disks::start(
        crate::disks::DisksParts {
            config: config.disks.clone(),
            data_dir: config.data_dir.clone(),
            depot_id: prepared.depot_id.clone(),
            store: store.clone(),
            clock: clock.clone(),
            panel: events.clone(),
        },
        &mut registry,
        shutdown.clone(),
    )
    .await
    .context("starting disk health")?;
    let mut charging_config = config.charging.clone();
    if let Some(sim) = &mut simulation
        && sim.fleet.chargers > 0
        && charging_config.chargers.is_empty()
    {
        let (chargers, bays) = crate::sim_cli::start_chargers(
            sim.fleet.chargers,
            sim.vehicles,
            sim.fleet.seed,
            shutdown.clone(),
        )
        .await?;
        charging_config.chargers = chargers;
        sim.bays = Some(bays);
    }
    let charging = crate::charging::Charging::start(
        crate::charging::ChargingParts {
            config: charging_config,
            store: store.clone(),
            clock: clock.clone(),
            panel: events.clone(),
        },
        shutdown.clone(),
    )
    .context("starting charging")?;
    let cloud_link = crate::cloud_link::CloudLink::start(
        store.clone(),
        config.cloud_link.clone(),
        config.data_dir.clone(),
        clock.clone(),
        crate::cloud_link::Reporter {
            store: store.clone(),
            ota: ota.clone(),
            rollouts: rollouts.clone(),
            charging: charging.clone(),
            depot_name: config.depot.name.clone(),
            local_id: prepared.depot_id.clone(),
            alarms: vec![disks.alarm()],
        },
        &mut registry,
        shutdown.clone(),
    );
    let core = Core {
        alarms: vec![disks.alarm()],
        mode: Mode::Depot,
        started_at: SystemTime::now(),
        started: std::time::Instant::now(),
        metrics: metrics.clone(),
        registry: Arc::new(registry),
        database: Database::Depot(store.clone()),
        system,
        shutdown: shutdown.clone(),
    };
    let config = Arc::new(config);
    let app = AppState {
        core,
        store: store.clone(),
        clock: clock.clone(),
        depot_id: prepared.depot_id.clone(),
        depot_name: config.depot.name.clone(),
        limiter: Arc::new(auth::LoginLimiter::new(
            config.auth.login_max_failures,
            config.auth.login_window,
        )),
        config: config.clone(),
        events,
        ota,
        link: link.clone(),
        rollouts,
        disks,
        charging,
        cloud_link,
    };

    spawn_session_sweeper(store.clone(), clock.clone(), shutdown.clone());
    if let Some(fleet) = &demo {
        let hardware = simulation
            .as_ref()
            .map(|s| s.fleet.sim_hardware.clone())
            .unwrap_or_default();
        crate::sim_cli::stage_demo(&app.ota, fleet, &hardware, &prepared.depot_id).await?;
        tracing::info!(
            good = crate::sim_cli::DEMO_GOOD,
            bad = crate::sim_cli::DEMO_BAD,
            hardware = %hardware,
            "staged the demo releases for the simulated fleet; start rollouts on the panel's Rollouts page"
        );
    }
    if let Some(simulation) = simulation {
        spawn_simulation(
            &app,
            &config,
            http_addr,
            tls.is_some(),
            simulation,
            &shutdown,
        )
        .await?;
    }

    let mqtt = match &link.broker {
        crate::link::BrokerInfo::Embedded { listen } => listen.to_string(),
        crate::link::BrokerInfo::External { url } => url.clone(),
    };
    tracing::info!(
        addr = %http_addr,
        mqtt = %mqtt,
        scheme = if tls.is_some() { "https" } else { "http" },
        depot_id = %prepared.depot_id,
        data_dir = %config.data_dir.display(),
        version = env!("CARGO_PKG_VERSION"),
        "listening"
    );
    let options = ServeOptions {
        header_read_timeout: config.http.header_read_timeout,
        shutdown_grace: config.http.shutdown_grace,
        bulk_prefixes: http::observe::BULK_PREFIXES,
        bulk_direct: Some(Arc::new(http::fastpath::Direct {
            resolve: {
                let ota = app.ota.clone();
                Box::new(move |head| http::vehicle::resolve_bulk(&ota, head))
            },
            observer: http::observe::DirectObserver::new(
                &app.core.metrics,
                http::vehicle::BULK_ROUTE,
            ),
        })),
    };
    crate::boot::spawn(
        store.clone(),
        config.image.clone(),
        http_addr,
        tls.is_some(),
        shutdown.clone(),
    );
    serve(listener, tls, http::depot_router(app), options, shutdown).await;

    tracing::info!("closing the store");
    tokio::task::spawn_blocking(move || store.close())
        .await
        .context("store close task failed")??;
    drop(lock);
    tracing::info!("stopped cleanly");
    Ok(())
}

/// First-start and every-start work on the store: the depot's identity and the first admin.
fn prepare(store: &Store, config: &Config, now: i64) -> anyhow::Result<Prepared> {
    let configured_id = config.depot.id.clone();
    let depot_id = store.write_blocking(|tx| -> Result<String, StoreError> {
        let stored = meta_get(tx, "depot_id")?;
        let id = match (configured_id, stored) {
            (Some(configured), stored) => {
                if stored.as_ref().is_some_and(|s| *s != configured) {
                    tracing::warn!(configured = %configured, stored = ?stored, "depot.id differs from the id this store was using; the configured one wins");
                }
                configured
            }
            (None, Some(stored)) => stored,
            (None, None) => {
                let mut bytes = [0u8; 4];
                rand::rng().fill_bytes(&mut bytes);
                format!("depot-{}", hex::encode(bytes))
            }
        };
        meta_set(tx, "depot_id", &id)?;
        Ok(id)
    })?;
    validate_depot_id(&depot_id).map_err(|m| anyhow::anyhow!("stored depot id: {m}"))?;

    let password_path = config.data_dir.join(INITIAL_PASSWORD_FILE);
    let initial_password_written = store.write_blocking(|tx| -> anyhow::Result<bool> {
        if auth::count_users(tx)? > 0 {
            return Ok(false);
        }
        let password = auth::new_password();
        let hash = auth::hash_password(&password)?;
        auth::create_user(tx, INITIAL_ADMIN, &hash, Role::Admin, now)?;
        audit::record(
            tx,
            &audit::Entry {
                actor: "system".into(),
                role: None,
                action: "user.create".into(),
                target: Some(INITIAL_ADMIN.into()),
                outcome: Outcome::Ok,
                request_id: None,
                detail: json!({"role": "admin", "initial": true, "password_file": password_path.display().to_string()}),
            },
            now,
        )?;
        // Written before the commit: if the file cannot be written, the admin is not created
        // either, and the next start tries again. Never an admin whose password nobody knows.
        write_private(&password_path, format!("{password}\n").as_bytes())
            .with_context(|| format!("writing {}", password_path.display()))?;
        Ok(true)
    })?;
    Ok(Prepared {
        depot_id,
        initial_password_written,
    })
}

async fn spawn_simulation(
    app: &AppState,
    config: &Config,
    http_addr: std::net::SocketAddr,
    tls: bool,
    simulation: Simulation,
    shutdown: &CancellationToken,
) -> anyhow::Result<()> {
    // In-process vehicles reach the depot on loopback when it listens on every address.
    let local = |addr: std::net::SocketAddr| {
        if addr.ip().is_unspecified() {
            std::net::SocketAddr::from(([127, 0, 0, 1], addr.port()))
        } else {
            addr
        }
    };
    let (host, port) = match &app.link.broker {
        crate::link::BrokerInfo::Embedded { listen } => {
            let listen = local(*listen);
            (listen.ip().to_string(), listen.port())
        }
        crate::link::BrokerInfo::External { url } => {
            tracing::warn!(
                "simulated vehicles need logins at the external broker; register them there as well"
            );
            let (_, host, port) = crate::link::broker_address("vehicle_link.broker_url", url)?;
            (host, port)
        }
    };
    let scheme = if tls { "https" } else { "http" };
    let depot_url = url::Url::parse(&format!("{scheme}://{}/", local(http_addr)))?;
    let now = unix_ms(app.clock.now());
    let vehicles = crate::sim_cli::provision_local(
        &app.store,
        simulation.vehicles,
        &simulation.fleet.sim_hardware,
        now,
    )
    .await
    .context("registering the simulated vehicles")?;
    let mut sim_config = crate::sim_cli::config(
        &simulation.fleet,
        crate::sim_cli::Endpoints {
            topics: app.link.topics().clone(),
            broker_host: host,
            broker_port: port,
            depot_url,
            state_dir: config.data_dir.join("simulator"),
        },
        vehicles,
    );
    sim_config.chargers = simulation.bays;
    tracing::info!(
        vehicles = simulation.vehicles,
        seed = simulation.fleet.seed,
        "running a simulated fleet in process"
    );
    let shutdown = shutdown.clone();
    tokio::spawn(async move {
        atlasmesh_vehicle_link::sim::run(sim_config, shutdown).await;
    });
    Ok(())
}

/// A simulated fleet on a depot with no fleet of its own gets the demo fleet: its root is
/// pinned, and the bad demo release fails on some vehicles unless `--fail` names it. A depot
/// that pins another fleet's root keeps it (and gets no demo releases).
async fn demo_fleet(
    config: &mut Config,
    sim: &mut Simulation,
) -> anyhow::Result<Option<crate::sim_cli::DemoFleet>> {
    if config.ota.fleet_root.is_some() {
        return Ok(None);
    }
    let dir = config.data_dir.join("simulator/fleet");
    let pinned = crate::ota::pinned_fleet_root(&config.data_dir);
    let ours = std::fs::read(dir.join("repo/metadata/1.root.json")).ok();
    if pinned.is_some() && pinned != ours {
        return Ok(None);
    }
    let fleet = crate::sim_cli::demo_fleet(&dir, &sim.fleet.sim_hardware, &sim.fleet.sim_version)
        .await
        .context("creating the demo fleet for the simulated vehicles")?;
    config.ota.fleet_root = Some(fleet.root.clone());
    if config.canary == crate::config::CanaryConfig::default() {
        // Simulated vehicles dock for 1 to 4 simulated minutes, not a night: the canary's
        // estimates shrink to match, or no vehicle would ever be ready for the demo.
        let s = sim.fleet.sim_second;
        config.canary.install_estimate = s * 5;
        config.canary.departure_margin = s * 5;
        config.canary.soak = s * 15;
        config.canary.vehicle_deadline = s * 120;
        tracing::info!(
            install_estimate = ?config.canary.install_estimate,
            soak = ?config.canary.soak,
            "the demo fleet's canary estimates follow the simulated clock"
        );
    }
    if !sim
        .fleet
        .fail
        .iter()
        .any(|(v, _)| v == crate::sim_cli::DEMO_BAD)
    {
        sim.fleet.fail.push((
            crate::sim_cli::DEMO_BAD.into(),
            crate::sim_cli::DEMO_BAD_RATE,
        ));
    }
    Ok(Some(fleet))
}

fn spawn_session_sweeper(store: Store, clock: Arc<dyn Clock>, shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut ticker = tokio::time::interval(Duration::from_secs(600));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let now = unix_ms(clock.now());
            match store
                .write(move |tx| auth::delete_expired_sessions(tx, now))
                .await
            {
                Ok(0) => {}
                Ok(n) => tracing::debug!(sessions = n, "removed expired sessions"),
                Err(e) => tracing::warn!(error = %e, "could not remove expired sessions"),
            }
        }
    });
}
