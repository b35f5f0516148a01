//! The HTTP server of both modes: routing, shared state, the middleware stack, health and
//! metrics endpoints, and the connection loop with TLS and graceful shutdown.
//!
//! Layout: [`observe`] (ids, tracing, metrics, JSON errors), [`authn`] (credentials, roles,
//! CSRF, audit fallback), [`api`] (`/api/v1`), [`panel`] (HTML pages, assets, live events),
//! [`server`] (accept loop).

pub mod api;
pub mod authn;
pub mod charging_api;
pub mod cloud_api;
pub mod cloud_panel;
pub mod disks_api;
pub mod error;
pub mod fastpath;
pub mod files;
pub mod observe;
pub mod ota_api;
pub mod panel;
pub mod rollouts_api;
pub mod server;
pub mod vehicle;
pub mod vehicles_api;

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRef, State};
use axum::http::{StatusCode, header};
use axum::middleware::{from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use rusqlite::Transaction;
use serde_json::json;
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;
use tower_http::catch_panic::CatchPanicLayer;

use crate::audit::{self, Outcome};
use crate::auth::LoginLimiter;
use crate::config::Config;
use crate::metrics::CoreMetrics;
use crate::store::{Store, unix_ms};
use crate::sysstat::SystemSnapshot;
use atlasmesh_cloud_sync::CloudStore;
use error::{ApiError, AuditedMarker};

/// Where "now" comes from, so tests and replays can control time (one trait for the whole
/// product; the trust code takes the same one).
pub use atlasmesh_ota_staging::time::{Clock, SystemClock};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Depot,
    Cloud,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Depot => "depot",
            Mode::Cloud => "cloud",
        }
    }
}

/// The database a mode runs on, for health checks.
#[derive(Clone)]
pub enum Database {
    Depot(Store),
    Cloud(CloudStore),
}

impl Database {
    /// A real round trip to the database; returns its schema version.
    async fn ping(&self) -> Result<i64, String> {
        match self {
            Database::Depot(store) => store
                .read(|c| {
                    let _: i64 = c.query_row("SELECT count(*) FROM meta", [], |r| r.get(0))?;
                    Ok::<_, crate::store::StoreError>(c.query_row(
                        "PRAGMA user_version",
                        [],
                        |r| r.get(0),
                    )?)
                })
                .await
                .map_err(|e| e.to_string()),
            Database::Cloud(store) => store.ping().await.map_err(|e| e.to_string()),
        }
    }
}

/// What every mode's server has: identity of the process, metrics, database, vital signs.
#[derive(Clone)]
pub struct Core {
    pub mode: Mode,
    pub started_at: SystemTime,
    pub started: Instant,
    pub metrics: CoreMetrics,
    pub registry: Arc<Registry>,
    pub database: Database,
    pub system: watch::Receiver<SystemSnapshot>,
    /// Conditions that degrade `/health` while they hold (`Some(reason)`), such as a failing
    /// disk under the image store.
    pub alarms: Vec<watch::Receiver<Option<String>>>,
    pub shutdown: CancellationToken,
}

impl Core {
    pub fn uptime_seconds(&self) -> u64 {
        self.started.elapsed().as_secs()
    }
}

/// Events pushed to open panels over server-sent events.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PanelEvent {
    pub kind: &'static str,
    pub data: serde_json::Value,
}

/// The depot server's state.
#[derive(Clone)]
pub struct AppState {
    pub core: Core,
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub depot_id: String,
    pub depot_name: String,
    pub config: Arc<Config>,
    pub limiter: Arc<LoginLimiter>,
    pub events: broadcast::Sender<PanelEvent>,
    pub ota: Arc<crate::ota::Ota>,
    pub link: Arc<crate::link::VehicleLink>,
    pub rollouts: Arc<crate::rollouts::Rollouts>,
    pub disks: Arc<crate::disks::Disks>,
    pub charging: Arc<crate::charging::Charging>,
    pub cloud_link: Arc<crate::cloud_link::CloudLink>,
}

impl FromRef<AppState> for Core {
    fn from_ref(app: &AppState) -> Core {
        app.core.clone()
    }
}

impl FromRef<AppState> for CoreMetrics {
    fn from_ref(app: &AppState) -> CoreMetrics {
        app.core.metrics.clone()
    }
}

impl AppState {
    /// Runs a change and writes its audit record in the same transaction. If the change fails,
    /// it is rolled back and the failed attempt is recorded on its own.
    pub async fn audited<T, F>(
        &self,
        caller: &authn::Identity,
        request_id: Option<String>,
        action: &str,
        target: &str,
        change: F,
    ) -> Result<T, ApiError>
    where
        F: FnOnce(&Transaction<'_>, i64) -> Result<(T, serde_json::Value), ApiError>
            + Send
            + 'static,
        T: Send + 'static,
    {
        let now = unix_ms(self.clock.now());
        let entry = audit::Entry {
            actor: caller.actor.clone(),
            role: Some(caller.role),
            action: action.to_owned(),
            target: Some(target.to_owned()),
            outcome: Outcome::Ok,
            request_id,
            detail: json!({}),
        };
        let ok_entry = entry.clone();
        let result = self
            .store
            .write(move |tx| {
                let (value, detail) = change(tx, now)?;
                audit::record(tx, &audit::Entry { detail, ..ok_entry }, now)?;
                Ok::<_, ApiError>(value)
            })
            .await;
        match result {
            Ok(value) => {
                self.core
                    .metrics
                    .audit_records
                    .get_or_create(&authn::outcome_label(Outcome::Ok))
                    .inc();
                Ok(value)
            }
            Err(err) => {
                let outcome = if err.status == StatusCode::FORBIDDEN {
                    Outcome::Denied
                } else {
                    Outcome::Failed
                };
                self.record_audit(audit::Entry {
                    outcome,
                    detail: json!({"status": err.status.as_u16(), "code": err.code, "message": err.message}),
                    ..entry
                })
                .await;
                Err(err.with_audited())
            }
        }
    }
}

/// A JSON response for a change whose audit record is already written.
pub fn audited_json<T: serde::Serialize>(status: StatusCode, body: &T) -> Response {
    let mut response = (status, axum::Json(body)).into_response();
    response.extensions_mut().insert(AuditedMarker);
    response
}

/// `/health`, `/health/database` and `/metrics`: unauthenticated, read-only, for probes and
/// Prometheus.
pub fn probe_routes<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    Core: FromRef<S>,
{
    Router::new()
        .route("/health", get(health))
        .route("/health/database", get(health_database))
        .route("/metrics", get(metrics))
}

/// Below this much free space on the data filesystem the depot reports itself degraded: the
/// store cannot commit and staging cannot write.
const MIN_FREE_BYTES: u64 = 256 * 1024 * 1024;

async fn health(State(core): State<Core>) -> Response {
    let mut reasons = Vec::new();
    if core.shutdown.is_cancelled() {
        reasons.push("shutting down".to_owned());
    }
    if let Err(e) = core.database.ping().await {
        reasons.push(format!("database: {e}"));
    }
    for alarm in &core.alarms {
        if let Some(reason) = alarm.borrow().clone() {
            reasons.push(reason);
        }
    }
    let snapshot = core.system.borrow().clone();
    if let Some(fs) = &snapshot.data_fs
        && fs.available_bytes < MIN_FREE_BYTES.min(fs.total_bytes / 50)
    {
        reasons.push(format!(
            "data filesystem {} nearly full: {} MiB free",
            fs.mount_point,
            fs.available_bytes / (1024 * 1024)
        ));
    }
    let body = json!({
        "status": if reasons.is_empty() { "healthy" } else { "degraded" },
        "mode": core.mode.as_str(),
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_seconds": core.uptime_seconds(),
        "reasons": reasons,
    });
    let status = if reasons.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, axum::Json(body)).into_response()
}

async fn health_database(State(core): State<Core>) -> Response {
    let started = Instant::now();
    match core.database.ping().await {
        Ok(schema_version) => axum::Json(json!({
            "database": "connected",
            "schema_version": schema_version,
            "latency_ms": started.elapsed().as_secs_f64() * 1000.0,
        }))
        .into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            axum::Json(json!({"database": "unavailable", "error": e})),
        )
            .into_response(),
    }
}

async fn metrics(State(core): State<Core>) -> Response {
    (
        [(
            header::CONTENT_TYPE,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )],
        crate::metrics::encode(&core.registry),
    )
        .into_response()
}

/// Wraps a mode's routes in the shared middleware stack, outermost first: observe (ids, trace,
/// metrics, JSON errors), panic catcher, body limit. Request timeouts are applied per router
/// ([`timeout`]), because an image upload legitimately takes longer than any API call.
pub fn with_common_layers<S>(router: Router<S>, metrics: CoreMetrics, max_body: usize) -> Router<S>
where
    S: Clone + Send + Sync + 'static,
{
    router
        .route_layer(from_fn(observe::remember_route))
        .layer(DefaultBodyLimit::max(max_body))
        .layer(axum::Extension(error::BodyLimit(max_body)))
        .layer(CatchPanicLayer::new())
        .layer(from_fn_with_state(metrics, observe::observe))
}

/// 408 when a request takes longer than `limit` to produce its response headers.
pub fn timeout(limit: Duration) -> tower_http::timeout::TimeoutLayer {
    tower_http::timeout::TimeoutLayer::with_status_code(StatusCode::REQUEST_TIMEOUT, limit)
}

/// The depot's whole HTTP surface.
pub fn depot_router(app: AppState) -> Router {
    let config = app.config.clone();
    let api = api::router(app.clone());
    let router = Router::new()
        .merge(probe_routes::<AppState>())
        .merge(panel::router())
        .merge(vehicle::router())
        .layer(timeout(config.http.request_timeout))
        .nest("/api/v1", api)
        .with_state(app.clone());
    with_common_layers(router, app.core.metrics.clone(), config.http.max_body_bytes)
}
