//! `/api/v1` routes of charging: chargers live, the plan, what technicians set per vehicle
//! (departure, target state of charge, priority) and what admins set for the site (grid limit,
//! tariff). Every change is audited and re-plans at once. Also `/api/v1/cloud`: the cloud link,
//! whose desired state may override the site.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use serde::Deserialize;
use serde_json::json;

use super::authn::{Admin, Auth, Technician, Viewer};
use super::error::{ApiError, ApiJson};
use super::{AppState, audited_json};
use crate::charging::db::{self, TARIFF_SLOTS, VehicleSettings};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/chargers", get(chargers))
        .route("/charging/plan", get(plan))
        .route("/charging/site", get(site).put(set_site))
        .route("/cloud", get(cloud_link))
        .route("/charging/vehicles", get(vehicles))
        .route("/charging/vehicles/{id}", put(set_vehicle))
}

async fn chargers(_caller: Auth<Viewer>, State(app): State<AppState>) -> Response {
    let s = app.charging.snapshot();
    axum::Json(json!({ "chargers": s.chargers, "meter": s.meter })).into_response()
}

async fn plan(_caller: Auth<Viewer>, State(app): State<AppState>) -> Result<Response, ApiError> {
    match app.charging.snapshot().plan {
        Some(plan) => Ok(axum::Json(plan).into_response()),
        None if app.charging.config().chargers.is_empty() => Err(ApiError::not_found(
            "no chargers are configured (charging.chargers), so there is no plan",
        )),
        None => Err(ApiError::not_found(
            "no plan yet: the first poll of the chargers is under way",
        )),
    }
}

/// The cloud link: its state, the outbox (with what the bound dropped) and the desired state
/// the depot holds from the cloud.
async fn cloud_link(
    _caller: Auth<Viewer>,
    State(app): State<AppState>,
) -> Result<Response, ApiError> {
    let outbox = app.cloud_link.outbox().await?;
    let desired = app.store.read(crate::cloud_link::db::desired).await?;
    let revision = app
        .store
        .read(crate::cloud_link::db::enrolment)
        .await?
        .map_or(0, |e| e.desired_revision);
    Ok(axum::Json(json!({
        "link": app.cloud_link.view(),
        "outbox": outbox,
        "desired_revision": revision,
        "desired": desired,
    }))
    .into_response())
}

async fn site(_caller: Auth<Viewer>, State(app): State<AppState>) -> Result<Response, ApiError> {
    let site = app.charging.site().await?;
    Ok(axum::Json(site).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SiteChange {
    limit_kw: f64,
    /// 96 prices per kWh, local quarter-hours from midnight; or 24 hourly prices.
    tariff: Vec<f64>,
}

async fn set_site(
    caller: Auth<Admin>,
    State(app): State<AppState>,
    ApiJson(body): ApiJson<SiteChange>,
) -> Result<Response, ApiError> {
    if !(body.limit_kw.is_finite() && body.limit_kw > 0.0 && body.limit_kw <= 100_000.0) {
        return Err(ApiError::invalid(
            "limit_kw must be above 0 and at most 100000",
        ));
    }
    let tariff: Vec<f64> = match body.tariff.len() {
        TARIFF_SLOTS => body.tariff,
        24 => body.tariff.iter().flat_map(|p| [*p; 4]).collect(),
        n => {
            return Err(ApiError::invalid(format!(
                "tariff has {n} prices; give 96 (quarter-hours) or 24 (hours) from local midnight"
            )));
        }
    };
    if let Some((i, p)) = tariff
        .iter()
        .enumerate()
        .find(|(_, p)| !p.is_finite() || p.abs() > 1000.0)
    {
        return Err(ApiError::invalid(format!(
            "tariff[{i}] = {p} is not a price"
        )));
    }
    let by = caller.identity.actor.clone();
    let (limit, stored) = (body.limit_kw, tariff.clone());
    app.audited(
        &caller.identity,
        caller.request_id(),
        "charging.site",
        "site",
        move |tx, now| {
            db::set_site(tx, limit, &stored, now, &by)?;
            Ok(((), json!({"limit_kw": limit, "tariff": stored})))
        },
    )
    .await?;
    app.charging.replan();
    let site = app.charging.site().await?;
    Ok(audited_json(StatusCode::OK, &site))
}

async fn vehicles(
    _caller: Auth<Viewer>,
    State(app): State<AppState>,
) -> Result<Response, ApiError> {
    let settings = app.store.read(db::vehicle_settings).await?;
    Ok(axum::Json(json!({ "vehicles": settings })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct VehicleChange {
    /// When it must leave, Unix ms; null: its own report or the depot default.
    #[serde(default)]
    departure_ms: Option<i64>,
    #[serde(default)]
    target_soc_percent: Option<f64>,
    #[serde(default)]
    priority: u8,
}

async fn set_vehicle(
    caller: Auth<Technician>,
    State(app): State<AppState>,
    Path(id): Path<String>,
    ApiJson(body): ApiJson<VehicleChange>,
) -> Result<Response, ApiError> {
    atlasmesh_vehicle_link::wire::check_id("vehicle id", &id)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    if let Some(t) = body.target_soc_percent
        && !(t.is_finite() && (0.0..=100.0).contains(&t))
    {
        return Err(ApiError::invalid("target_soc_percent must be 0 to 100"));
    }
    if body.priority > 9 {
        return Err(ApiError::invalid(
            "priority must be 0 (normal) to 9 (first)",
        ));
    }
    if body.departure_ms.is_some_and(|d| d <= 0) {
        return Err(ApiError::invalid(
            "departure_ms must be a Unix time in milliseconds",
        ));
    }
    let by = caller.identity.actor.clone();
    let target = id.clone();
    let saved = app
        .audited(&caller.identity, caller.request_id(), "charging.vehicle", &id, move |tx, now| {
            let s = VehicleSettings {
                vehicle_id: target,
                departure_ms: body.departure_ms,
                target_soc_percent: body.target_soc_percent,
                priority: body.priority,
                updated_at: now,
                updated_by: by,
            };
            db::set_vehicle(tx, &s)?;
            let detail = json!({"departure_ms": s.departure_ms, "target_soc_percent": s.target_soc_percent, "priority": s.priority});
            Ok((s, detail))
        })
        .await?;
    app.charging.replan();
    Ok(audited_json(StatusCode::OK, &saved))
}
