//! `/api/v1` routes of canary rollouts: create, list, inspect, pause, resume (optionally with a
//! new plan), halt and roll back; and each vehicle's readiness for an update.

use atlasmesh_canary::{Event, Refused, Replan};
use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::json;

use super::authn::{Admin, Auth, Technician, Viewer};
use super::error::{ApiError, ApiJson, ApiQuery};
use super::ota_api::{actor, ota_error};
use super::{AppState, audited_json};
use crate::rollouts::{CreateRollout, RolloutError};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/rollouts", get(list).post(create))
        .route("/rollouts/{id}", get(one))
        .route("/rollouts/{id}/pause", post(pause))
        .route("/rollouts/{id}/resume", post(resume))
        .route("/rollouts/{id}/halt", post(halt))
        .route("/rollouts/{id}/rollback", post(rollback))
        .route("/rollouts/{id}/evidence", get(evidence))
        .route("/vehicles/{id}/readiness", get(readiness))
}

fn rollout_error(e: RolloutError) -> ApiError {
    match e {
        RolloutError::Plan(p) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_plan",
            p.to_string(),
        ),
        RolloutError::Refused(Refused::Plan(p)) => ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_plan",
            p.to_string(),
        ),
        RolloutError::Refused(r) => ApiError::conflict(r.to_string()),
        RolloutError::NotFound(m) => ApiError::not_found(m),
        RolloutError::Conflict(m) => ApiError::conflict(m),
        RolloutError::Ota(o) => ota_error(o, false),
        RolloutError::Store(s) => ApiError::internal(s),
        e @ RolloutError::Corrupt(..) => ApiError::internal(e),
    }
}

async fn list(_caller: Auth<Viewer>, State(app): State<AppState>) -> Result<Response, ApiError> {
    let rollouts = app.rollouts.list().await.map_err(rollout_error)?;
    Ok(axum::Json(json!({ "rollouts": rollouts })).into_response())
}

async fn one(
    _caller: Auth<Viewer>,
    State(app): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Response, ApiError> {
    let rollout = app.rollouts.get(id).await.map_err(rollout_error)?;
    Ok(axum::Json(rollout).into_response())
}

async fn create(
    caller: Auth<Technician>,
    State(app): State<AppState>,
    ApiJson(body): ApiJson<CreateRollout>,
) -> Result<Response, ApiError> {
    let rollout = app
        .rollouts
        .create(body, &actor(&caller))
        .await
        .map_err(rollout_error)?;
    Ok(audited_json(StatusCode::CREATED, &rollout))
}

async fn command(
    app: &AppState,
    id: i64,
    event: Event,
    actor: crate::ota::Actor,
) -> Result<Response, ApiError> {
    let rollout = app
        .rollouts
        .command(id, event, &actor)
        .await
        .map_err(rollout_error)?;
    Ok(audited_json(StatusCode::OK, &rollout))
}

async fn pause(
    caller: Auth<Technician>,
    State(app): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Response, ApiError> {
    command(&app, id, Event::Pause, actor(&caller)).await
}

/// Resume as planned, or with `{"waves": [...], "gate": {...}}` for the vehicles not updated.
async fn resume(
    caller: Auth<Technician>,
    State(app): State<AppState>,
    Path(id): Path<i64>,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let replan = if body.iter().all(u8::is_ascii_whitespace) {
        None
    } else {
        Some(
            serde_json::from_slice::<Replan>(&body)
                .map_err(|e| ApiError::bad_request(format!("request body: {e}")))?,
        )
    };
    command(&app, id, Event::Resume { replan }, actor(&caller)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct HaltBody {
    reason: String,
}

async fn halt(
    caller: Auth<Admin>,
    State(app): State<AppState>,
    Path(id): Path<i64>,
    ApiJson(body): ApiJson<HaltBody>,
) -> Result<Response, ApiError> {
    if body.reason.trim().is_empty() {
        return Err(ApiError::invalid(
            "say why the rollout is halted (\"reason\")",
        ));
    }
    command(
        &app,
        id,
        Event::Halt {
            reason: body.reason,
        },
        actor(&caller),
    )
    .await
}

async fn rollback(
    caller: Auth<Admin>,
    State(app): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Response, ApiError> {
    command(&app, id, Event::RollBackAll, actor(&caller)).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReadinessQuery {
    version: Option<String>,
}

async fn readiness(
    _caller: Auth<Viewer>,
    State(app): State<AppState>,
    Path(id): Path<String>,
    ApiQuery(q): ApiQuery<ReadinessQuery>,
) -> Result<Response, ApiError> {
    let (ready, reasons, version) = app
        .rollouts
        .readiness(&id, q.version.as_deref())
        .await
        .map_err(rollout_error)?;
    Ok(
        axum::Json(json!({"vehicle": id, "version": version, "ready": ready, "reasons": reasons}))
            .into_response(),
    )
}

async fn evidence(
    _caller: Auth<Viewer>,
    State(app): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Response, ApiError> {
    let bundle = app.rollouts.evidence(id).await.map_err(rollout_error)?;
    let disposition = format!("attachment; filename=\"rollout-{id}-evidence.json\"");
    Ok((
        [(axum::http::header::CONTENT_DISPOSITION, disposition)],
        axum::Json(bundle),
    )
        .into_response())
}
