//! `/api/v1` routes of disk health: every disk's verdict, one disk with its history, alerts,
//! and a reading on demand.

use axum::Router;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::authn::{Auth, Technician, Viewer};
use super::error::{ApiError, ApiQuery};
use crate::store::unix_ms;

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/disks", get(list))
        .route("/disks/check", post(check))
        .route("/disks/alerts", get(alerts))
        .route("/disks/{id}", get(one))
}

async fn list(_caller: Auth<Viewer>, State(app): State<AppState>) -> Result<Response, ApiError> {
    let snapshot = app.disks.snapshot();
    let alerts = app.disks.alerts(20).await.map_err(ApiError::internal)?;
    let hold = snapshot.store_problem();
    Ok(axum::Json(json!({
        "enabled": snapshot.enabled,
        "checked_at": snapshot.checked_at,
        "error": snapshot.error,
        "store_device": snapshot.store_device,
        "staging_held": hold,
        "disks": snapshot.disks,
        "alerts": alerts,
        "system": system(&app),
    }))
    .into_response())
}

/// Filesystems and temperature sensors as sysinfo sees them: what smartctl does not cover.
fn system(app: &AppState) -> serde_json::Value {
    let snapshot = app.core.system.borrow().clone();
    json!({"data_filesystem": snapshot.data_fs, "temperatures": snapshot.temperatures})
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DetailQuery {
    /// History this many days back (default 30).
    days: Option<u32>,
}

async fn one(
    _caller: Auth<Viewer>,
    State(app): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<DetailQuery>,
) -> Result<Response, ApiError> {
    let days = i64::from(query.days.unwrap_or(30).clamp(1, 3650));
    let since = unix_ms(app.clock.now()) / 1000 - days * 86_400;
    let Some((disk, history, alerts)) = app
        .disks
        .detail(&id, since)
        .await
        .map_err(ApiError::internal)?
    else {
        return Err(ApiError::not_found(format!("no disk {id:?}")));
    };
    Ok(axum::Json(json!({"disk": disk, "history": history, "alerts": alerts})).into_response())
}

async fn alerts(_caller: Auth<Viewer>, State(app): State<AppState>) -> Result<Response, ApiError> {
    let alerts = app.disks.alerts(200).await.map_err(ApiError::internal)?;
    Ok(axum::Json(json!({ "alerts": alerts })).into_response())
}

/// Reads every disk now (technician); the audit fallback records who asked.
async fn check(
    _caller: Auth<Technician>,
    State(app): State<AppState>,
) -> Result<Response, ApiError> {
    if !app.config.disks.enabled {
        return Err(ApiError::conflict(
            "disk health is switched off (disks.enabled = false)",
        ));
    }
    let snapshot = app.disks.check_now().await;
    Ok(axum::Json(snapshot).into_response())
}
