//! Cloud mode: the fleet core. It opens its store (sqlx: SQLite by default, PostgreSQL by
//! URL), loads or creates the fleet CA (kept in the store, so instances sharing a database
//! share it), serves the depots' gRPC port (enrolment, sync, health, reflection) with mutual
//! TLS, and the fleet API with its probes and metrics on the HTTP port.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use axum::extract::FromRef;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::cli::CloudCommand;
use crate::config::Config;
use crate::datadir::DataDirLock;
use crate::http::cloud_api::{self, CloudApp};
use crate::http::cloud_panel::{self, PanelTls};
use crate::http::server::{ServeOptions, serve};
use crate::http::{Core, Database, Mode, probe_routes, timeout, with_common_layers};
use crate::metrics::CoreMetrics;
use crate::sysstat;
use atlasmesh_cloud_sync::CloudStore;
use atlasmesh_cloud_sync::pki::Ca;
use atlasmesh_cloud_sync::server::{self, CloudService, ServerTls, ServiceOptions};
use atlasmesh_cloud_sync::token::hash_secret;
use atlasmesh_ota_staging::online::OnlineExpiries;

#[derive(Clone)]
struct CloudState {
    core: Core,
    app: CloudApp,
    tls: PanelTls,
}

impl FromRef<CloudState> for PanelTls {
    fn from_ref(s: &CloudState) -> PanelTls {
        s.tls
    }
}

impl FromRef<CloudState> for Core {
    fn from_ref(s: &CloudState) -> Core {
        s.core.clone()
    }
}

impl FromRef<CloudState> for CloudApp {
    fn from_ref(s: &CloudState) -> CloudApp {
        s.app.clone()
    }
}

impl FromRef<CloudState> for CoreMetrics {
    fn from_ref(s: &CloudState) -> CoreMetrics {
        s.core.metrics.clone()
    }
}

fn database_url(config: &Config) -> String {
    match &config.cloud.database_url {
        Some(url) => url.clone(),
        None => format!("sqlite://{}", config.data_dir.join("cloud.db").display()),
    }
}

async fn open(config: &Config) -> anyhow::Result<(CloudStore, Arc<Ca>)> {
    if config.cloud.database_url.is_none() {
        crate::datadir::ensure_dir(&config.data_dir)?;
    }
    let store = CloudStore::connect(&database_url(config))
        .await
        .context("opening the cloud store (cloud.database_url)")?;
    let now = atlasmesh_cloud_sync::pki::unix_ms_now();
    let (cert, key) = store
        .ca_or_create(now, || {
            let ca = Ca::generate("AtlasMesh fleet CA")?;
            Ok::<_, atlasmesh_cloud_sync::pki::PkiError>((
                ca.cert_pem().to_owned(),
                ca.key_pem().to_owned(),
            ))
        })
        .await?
        .context("creating the fleet CA")?;
    let ca = Ca::load(&cert, &key).context("loading the fleet CA from the store")?;
    Ok((store, Arc::new(ca)))
}

/// The names the gRPC certificate carries when none are configured.
fn default_grpc_names() -> Vec<String> {
    let mut names = vec!["localhost".to_owned(), "127.0.0.1".to_owned()];
    if let Some(host) = sysinfo::System::host_name()
        && !names.contains(&host)
    {
        names.push(host);
    }
    names
}

pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let lock = DataDirLock::acquire(&config.data_dir)?;
    let (store, ca) = open(&config).await?;
    let listener = TcpListener::bind(config.cloud.http)
        .await
        .with_context(|| format!("cannot listen on {} (cloud.http)", config.cloud.http))?;
    let grpc_listener = TcpListener::bind(config.cloud.grpc)
        .await
        .with_context(|| format!("cannot listen on {} (cloud.grpc)", config.cloud.grpc))?;
    let names = if config.cloud.grpc_names.is_empty() {
        default_grpc_names()
    } else {
        config.cloud.grpc_names.clone()
    };
    let tls = ServerTls::from_ca(&ca, &names)
        .context("issuing the gRPC server certificate (cloud.grpc_names)")?;
    let clock = server::system_clock();
    let service = CloudService::new(
        store.clone(),
        ca.clone(),
        ServiceOptions {
            depot_cert_lifetime: config.cloud.depot_cert_lifetime,
            poll_interval: config.cloud.poll_interval,
            ..ServiceOptions::default()
        },
        clock.clone(),
    );
    let repository = crate::cloud_repo::Repository::open(
        &config.data_dir,
        OnlineExpiries {
            snapshot: config.cloud.snapshot_lifetime,
            timestamp: config.cloud.timestamp_lifetime,
        },
        Arc::new(atlasmesh_ota_staging::time::SystemClock),
    )?;
    repository.spawn_refresh(shutdown.clone());
    let service = service.with_trust(repository.clone());
    let repository_routes = crate::cloud_repo::routes(repository.clone(), service.clone());
    let grpc_addr = grpc_listener.local_addr()?;
    let grpc_shutdown = shutdown.clone();
    let grpc = tokio::spawn(async move {
        if let Err(e) = server::serve(
            grpc_listener,
            tls,
            service,
            repository_routes,
            grpc_shutdown.clone(),
        )
        .await
        {
            tracing::error!(error = %e, "the gRPC server failed; stopping");
            grpc_shutdown.cancel();
        }
    });

    let mut registry = Registry::default();
    let metrics = CoreMetrics::register(&mut registry, Mode::Cloud.as_str());
    let system = sysstat::spawn(
        &config.data_dir,
        Duration::from_secs(5),
        metrics.process_rss.clone(),
        shutdown.clone(),
    );
    let core = Core {
        alarms: Vec::new(),
        mode: Mode::Cloud,
        started_at: SystemTime::now(),
        started: std::time::Instant::now(),
        metrics: metrics.clone(),
        registry: Arc::new(registry),
        database: Database::Cloud(store.clone()),
        system,
        shutdown: shutdown.clone(),
    };
    let fleet =
        crate::cloud_fleet::FleetRollouts::new(store.clone(), repository.clone(), clock.clone());
    fleet.spawn(shutdown.clone());
    let app = CloudApp {
        store: store.clone(),
        ca: ca.clone(),
        clock,
        fleet,
        enroll_token_lifetime: config.cloud.enroll_token_lifetime,
        repository,
        // A live session touches the store every poll; three missed polls and it is gone.
        online_within: (config.cloud.poll_interval * 3).max(Duration::from_secs(10)),
    };
    // The fleet API carries bearer tokens: HTTPS as on the depot when `[tls]` is enabled
    // (otherwise behind the data centre's TLS-terminating proxy).
    let http_tls = crate::tls::acceptor(&config.tls, &config.data_dir, &names)?;
    let tls = PanelTls(http_tls.is_some());
    let router = with_common_layers(
        probe_routes::<CloudState>()
            .merge(cloud_api::routes::<CloudState>())
            .merge(cloud_panel::routes::<CloudState>())
            .layer(timeout(config.http.request_timeout))
            .merge(cloud_api::long_routes::<CloudState>())
            .with_state(CloudState { core, app, tls }),
        metrics,
        config.http.max_body_bytes,
    );
    let addr = listener.local_addr()?;
    tracing::info!(addr = %addr, grpc = %grpc_addr, scheme = if http_tls.is_some() { "https" } else { "http" }, database = store.backend(), ca_sha256 = %ca.fingerprint(), data_dir = %config.data_dir.display(), version = env!("CARGO_PKG_VERSION"), "listening");
    let options = ServeOptions {
        header_read_timeout: config.http.header_read_timeout,
        shutdown_grace: config.http.shutdown_grace,
        bulk_prefixes: &[],
        bulk_direct: None,
    };
    serve(listener, http_tls, router, options, shutdown).await;
    let _ = grpc.await;
    store.close().await;
    drop(lock);
    tracing::info!("stopped cleanly");
    Ok(())
}

/// The offline tools: enrolment tokens, revocation, fleet API tokens.
pub async fn tool(command: CloudCommand) -> anyhow::Result<u8> {
    let now = atlasmesh_cloud_sync::pki::unix_ms_now();
    match command {
        CloudCommand::EnrollToken(args) => {
            let config = Config::load(&args.store.overrides())?;
            let (store, ca) = open(&config).await?;
            let (token, expires) = cloud_api::mint(
                &store,
                &ca,
                &args.depot,
                now,
                config.cloud.enroll_token_lifetime,
                "cli:enroll-token",
            )
            .await
            .map_err(|e| anyhow::anyhow!(e.message))?;
            store.close().await;
            crate::errln!(
                "enrolment token for depot {:?}, usable once until {}; on the depot: atlasmesh depot --cloud https://HOST:PORT --enroll-token TOKEN",
                args.depot,
                crate::audit::rfc3339(expires)
            );
            crate::outln!("{token}")?;
            Ok(0)
        }
        CloudCommand::Revoke(args) => {
            let config = Config::load(&args.store.overrides())?;
            let (store, _) = open(&config).await?;
            let depot = store.revoke_depot(&args.depot, now, "cli:revoke").await?;
            store.close().await;
            crate::errln!("revoked depot {:?} (id {})", depot.name, depot.id);
            Ok(0)
        }
        CloudCommand::Repository(args) => {
            let config = Config::load(&args.common.overrides())?;
            let taken = crate::cloud_repo::Repository::setup(
                &config.data_dir,
                &args.root,
                args.keys.as_deref(),
            )?;
            crate::errln!(
                "image repository in {}: {}; restart the cloud to use new keys",
                config.data_dir.join("repository").display(),
                taken.join(", ")
            );
            Ok(0)
        }
        CloudCommand::Token(args) => {
            let config = Config::load(&args.store.overrides())?;
            let (store, _) = open(&config).await?;
            let secret = hex::encode(rand::random::<[u8; 32]>());
            store
                .create_api_token(
                    &hash_secret(&secret),
                    &args.name,
                    args.role.as_str(),
                    now,
                    "cli:token",
                )
                .await?;
            store.close().await;
            crate::errln!(
                "created fleet API token {:?} (role {}); it is shown once, keep it safe:",
                args.name,
                args.role.as_str()
            );
            crate::outln!("{secret}")?;
            Ok(0)
        }
    }
}
