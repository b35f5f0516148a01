//! Cloud mode: the fleet core. Today it opens its store (sqlx, with migrations) and serves its
//! health and metrics endpoints; enrolment, gRPC sync and the fleet panel arrive with federation.

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::datadir::DataDirLock;
use crate::http::server::{ServeOptions, serve};
use crate::http::{Core, Database, Mode, probe_routes, timeout, with_common_layers};
use crate::metrics::CoreMetrics;
use crate::sysstat;
use atlasmesh_cloud_sync::CloudStore;

pub async fn run(config: Config, shutdown: CancellationToken) -> anyhow::Result<()> {
    let lock = DataDirLock::acquire(&config.data_dir)?;
    let url = match &config.cloud.database_url {
        Some(url) => url.clone(),
        None => format!("sqlite://{}", config.data_dir.join("cloud.db").display()),
    };
    let store = CloudStore::connect(&url)
        .await
        .context("opening the cloud store (cloud.database_url)")?;
    let listener = TcpListener::bind(config.cloud.http)
        .await
        .with_context(|| format!("cannot listen on {} (cloud.http)", config.cloud.http))?;

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
    let router = with_common_layers(
        probe_routes::<Core>()
            .layer(timeout(config.http.request_timeout))
            .with_state(core),
        metrics,
        config.http.max_body_bytes,
    );
    let addr = listener.local_addr()?;
    tracing::info!(addr = %addr, scheme = "http", data_dir = %config.data_dir.display(), version = env!("CARGO_PKG_VERSION"), "listening");
    let options = ServeOptions {
        header_read_timeout: config.http.header_read_timeout,
        shutdown_grace: config.http.shutdown_grace,
        bulk_prefixes: &[],
        bulk_direct: None,
    };
    serve(listener, None, router, options, shutdown).await;
    store.close().await;
    drop(lock);
    tracing::info!("stopped cleanly");
    Ok(())
}
