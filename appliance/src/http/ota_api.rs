//! `/api/v1` routes of the image cache: staging (upload, URL, local directory), staged images,
//! validation, deletion, assignments, the depot's upload cap, and the trust anchors.

use std::collections::BTreeMap;

use atlasmesh_ota_staging::staging::StagingError;
use atlasmesh_ota_staging::trust::TrustError;
use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use futures_util::TryStreamExt;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio_util::io::{StreamReader, SyncIoBridge};
use url::Url;

use super::authn::{Admin, Auth, MinRole, Technician, Viewer};
use super::error::{ApiError, ApiJson, ApiQuery};
use super::{AppState, audited_json};
use crate::audit::rfc3339;
use crate::ota::{Actor, OtaError, Source, db, error_code};

/// Routes with the normal request timeout.
pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/images", get(list_images))
        .route("/images/{version}", get(get_image).delete(delete_image))
        .route("/images/{version}/validate", get(validate_image))
        .route("/staging", get(list_jobs))
        .route("/staging/{id}", get(get_job))
        .route("/assignments", get(list_assignments).post(assign))
        .route("/assignments/{vehicle}", delete(unassign))
        .route("/bandwidth", get(get_bandwidth).put(set_bandwidth))
        .route("/ota/trust", get(trust))
        .route("/ota/fleet-root", put(pin_fleet_root))
        .route("/ota/metadata", post(refresh_metadata))
        .route("/ota/director", get(director))
        .route("/ota/director/certificate", put(install_certificate))
}

/// Routes that may take as long as an upload does.
pub fn long_routes() -> Router<AppState> {
    Router::new().route("/images", post(stage))
}

pub(crate) fn actor<R: MinRole>(caller: &Auth<R>) -> Actor {
    Actor {
        name: caller.identity.actor.clone(),
        role: Some(caller.identity.role),
        request_id: caller.request_id(),
    }
}

/// Maps an OTA error to a response. `audited`: the service already wrote the audit record.
pub(crate) fn ota_error(e: OtaError, audited: bool) -> ApiError {
    let code = error_code(&e);
    let status = match &e {
        OtaError::Staging(StagingError::DiskFull { .. }) => StatusCode::INSUFFICIENT_STORAGE,
        OtaError::Staging(StagingError::NoFleetRoot | StagingError::AlreadyStaged { .. }) => {
            StatusCode::CONFLICT
        }
        OtaError::Staging(StagingError::Trust(TrustError::Fetch(_))) => StatusCode::BAD_GATEWAY,
        OtaError::Staging(StagingError::Io { .. }) => StatusCode::INTERNAL_SERVER_ERROR,
        OtaError::Staging(_) | OtaError::Invalid(_) | OtaError::Certificate(_) => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
        OtaError::NotFound(_) => StatusCode::NOT_FOUND,
        OtaError::Ambiguous(_) | OtaError::Conflict(_) | OtaError::Busy(_) => StatusCode::CONFLICT,
        OtaError::Director(_) | OtaError::Store(_) | OtaError::Internal(_) => {
            return ApiError::internal(e);
        }
    };
    let err = ApiError::new(status, code, e.to_string());
    if audited { err.with_audited() } else { err }
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct HardwareQuery {
    hardware: Option<String>,
}

/// A staged image as the API and the panel show it.
#[derive(Serialize)]
pub struct ImageView {
    #[serde(flatten)]
    pub row: db::ImageRow,
    pub status: &'static str,
    staged_at_rfc3339: String,
    targets_expires_rfc3339: String,
    /// Vehicles the director tells to install it.
    pub assigned_vehicles: Vec<String>,
    /// Vehicles that report running it (vehicle registry).
    pub installed_vehicles: Vec<String>,
}

pub async fn image_views(app: &AppState) -> Result<Vec<ImageView>, crate::store::StoreError> {
    let (images, assignments, mut installed) = app
        .store
        .read(|c| {
            Ok::<_, crate::store::StoreError>((
                db::images(c, false)?,
                db::assignments(c)?,
                crate::link::db::installed(c)?,
            ))
        })
        .await?;
    let mut by_image: BTreeMap<i64, Vec<String>> = BTreeMap::new();
    for a in assignments {
        by_image.entry(a.image_id).or_default().push(a.vehicle_id);
    }
    Ok(images
        .into_iter()
        .map(|row| ImageView {
            status: if row.corrupt_at.is_some() {
                "damaged"
            } else {
                "verified"
            },
            staged_at_rfc3339: rfc3339(row.staged_at),
            targets_expires_rfc3339: rfc3339(row.targets_expires),
            assigned_vehicles: by_image.remove(&row.id).unwrap_or_default(),
            installed_vehicles: installed
                .remove(&(row.hardware_id.clone(), row.version.clone()))
                .unwrap_or_default(),
            row,
        })
        .collect())
}

async fn list_images(
    _caller: Auth<Viewer>,
    State(app): State<AppState>,
) -> Result<Response, ApiError> {
    let images = image_views(&app).await?;
    let staging = app.ota.live_job().map(|j| json!({"job": j.id, "source": j.source, "bytes_done": j.bytes_done(), "bytes_total": j.bytes_total}));
    Ok(axum::Json(json!({"images": images, "staging": staging})).into_response())
}

async fn get_image(
    _caller: Auth<Viewer>,
    State(app): State<AppState>,
    Path(version): Path<String>,
    ApiQuery(q): ApiQuery<HardwareQuery>,
) -> Result<Response, ApiError> {
    let image = app
        .ota
        .find(&version, q.hardware.as_deref())
        .await
        .map_err(|e| ota_error(e, false))?;
    let view = image_views(&app)
        .await?
        .into_iter()
        .find(|v| v.row.id == image.id)
        .ok_or_else(|| ApiError::not_found("gone"))?;
    Ok(axum::Json(view).into_response())
}

async fn validate_image(
    _caller: Auth<Viewer>,
    State(app): State<AppState>,
    Path(version): Path<String>,
    ApiQuery(q): ApiQuery<HardwareQuery>,
) -> Result<Response, ApiError> {
    let image = app
        .ota
        .find(&version, q.hardware.as_deref())
        .await
        .map_err(|e| ota_error(e, false))?;
    let report = app
        .ota
        .validate(&image)
        .await
        .map_err(|e| ota_error(e, false))?;
    Ok(axum::Json(json!({"hardware_id": image.hardware_id, "version": image.version, "sha256": image.sha256, "validation": report})).into_response())
}

async fn delete_image(
    caller: Auth<Technician>,
    State(app): State<AppState>,
    Path(version): Path<String>,
    ApiQuery(q): ApiQuery<HardwareQuery>,
) -> Result<Response, ApiError> {
    let image = app
        .ota
        .find(&version, q.hardware.as_deref())
        .await
        .map_err(|e| ota_error(e, false))?;
    app.ota
        .delete(&image, &actor(&caller))
        .await
        .map_err(|e| ota_error(e, true))?;
    Ok(audited_json(
        StatusCode::OK,
        &json!({"deleted": {"hardware_id": image.hardware_id, "version": image.version}}),
    ))
}

fn source_of(url: Option<String>, path: Option<String>) -> Result<Source, ApiError> {
    match (url, path) {
        (Some(url), None) => Ok(Source::Url(
            Url::parse(&url).map_err(|e| ApiError::invalid(format!("url: {e}")))?,
        )),
        (None, Some(path)) => Ok(Source::Path(path.into())),
        _ => Err(ApiError::invalid("give exactly one of `url` and `path`")),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MetadataRequest {
    url: Option<String>,
    path: Option<String>,
}

/// A metadata-only refresh of the image repository's mirror (see `Ota::refresh_metadata`).
async fn refresh_metadata(
    caller: Auth<Technician>,
    State(app): State<AppState>,
    ApiJson(request): ApiJson<MetadataRequest>,
) -> Result<Response, ApiError> {
    let source = source_of(request.url, request.path)?;
    let refreshed = app
        .ota
        .refresh_metadata(source, &actor(&caller))
        .await
        .map_err(|e| ota_error(e, true))?;
    Ok(audited_json(
        StatusCode::OK,
        &json!({
            "timestamp_version": refreshed.timestamp_version,
            "timestamp_expires": rfc3339(refreshed.timestamp_expires_ms),
            "targets_version": refreshed.targets_version,
        }),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StageRequest {
    url: Option<String>,
    path: Option<String>,
    hardware: String,
    version: String,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct UploadQuery {
    hardware: Option<String>,
    version: Option<String>,
    /// Stage although the image store's disk is failing (admins only; the reason is audited).
    disk_override: Option<String>,
}

/// Staging writes to the image store: refused while its disk is warning or failed, unless an
/// admin overrides with a reason, which is audited.
async fn disk_hold(
    app: &AppState,
    caller: &Auth<Technician>,
    disk_override: Option<&str>,
) -> Result<(), ApiError> {
    let Some(problem) = app.disks.snapshot().store_problem() else {
        return Ok(());
    };
    let Some(reason) = disk_override.map(str::trim).filter(|r| !r.is_empty()) else {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_disk_unhealthy",
            format!(
                "staging is held: {problem}; replace the disk, or an admin may stage anyway with `disk_override=<reason>`"
            ),
        ));
    };
    let allowed = caller.identity.role >= crate::auth::Role::Admin;
    app.record_audit(crate::audit::Entry {
        actor: caller.identity.actor.clone(),
        role: Some(caller.identity.role),
        action: "image.stage.disk_override".into(),
        target: None,
        outcome: if allowed {
            crate::audit::Outcome::Ok
        } else {
            crate::audit::Outcome::Denied
        },
        request_id: caller.request_id(),
        detail: json!({"reason": reason, "disk": problem}),
    })
    .await;
    if !allowed {
        return Err(ApiError::forbidden(
            "only an admin may stage while the image store's disk is failing",
        )
        .with_audited());
    }
    tracing::warn!(actor = %caller.identity.actor, reason, disk = %problem, "staging despite the image store's failing disk (admin override)");
    Ok(())
}

/// `POST /api/v1/images`: a release bundle (`application/x-tar`) staged as it is uploaded
/// (201 when done), or `{"url"|"path", "hardware", "version"}` started as a job (202).
async fn stage(
    caller: Auth<Technician>,
    State(app): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<UploadQuery>,
    body: Body,
) -> Result<Response, ApiError> {
    disk_hold(&app, &caller, query.disk_override.as_deref()).await?;
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if content_type.starts_with("application/json") {
        let bytes = axum::body::to_bytes(body, app.config.http.max_body_bytes)
            .await
            .map_err(|_| {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "payload_too_large",
                    "request body is larger than this endpoint accepts",
                )
            })?;
        let request: StageRequest = serde_json::from_slice(&bytes)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "malformed_json", e.to_string()))?;
        let source = source_of(request.url, request.path)?;
        let job = app
            .ota
            .start_job(source, request.hardware, request.version, actor(&caller))
            .await
            .map_err(|e| ota_error(e, false))?;
        let location = format!("/api/v1/staging/{job}");
        let mut response = (
            StatusCode::ACCEPTED,
            axum::Json(json!({"job": job, "status_url": location})),
        )
            .into_response();
        response.headers_mut().insert(
            header::LOCATION,
            HeaderValue::from_str(&location).expect("ascii"),
        );
        return Ok(response);
    }
    if !(content_type.starts_with("application/x-tar")
        || content_type.starts_with("application/octet-stream"))
    {
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send a release bundle as application/x-tar, or JSON naming a url or path",
        ));
    }
    let wanted = match (query.hardware, query.version) {
        (Some(h), Some(v)) => Some((h, v)),
        (None, None) => None,
        _ => {
            return Err(ApiError::invalid(
                "give both `hardware` and `version`, or neither",
            ));
        }
    };
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let reader = SyncIoBridge::new(StreamReader::new(stream));
    match app.ota.stage_upload(reader, wanted, actor(&caller)).await {
        Ok((job, image)) => Ok(audited_json(
            StatusCode::CREATED,
            &json!({"job": job, "image": image}),
        )),
        Err((job, e)) => {
            let mut err = ota_error(e, job.is_some());
            if let Some(job) = job {
                err.message = format!("{} (staging job {job})", err.message);
            }
            Err(err)
        }
    }
}

async fn list_jobs(
    _caller: Auth<Viewer>,
    State(app): State<AppState>,
) -> Result<Response, ApiError> {
    let jobs = app.store.read(|c| db::recent_jobs(c, 50)).await?;
    Ok(axum::Json(json!({"jobs": jobs})).into_response())
}

async fn get_job(
    _caller: Auth<Viewer>,
    State(app): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Response, ApiError> {
    let mut job = app
        .store
        .read(move |c| db::job(c, id))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no staging job {id}")))?;
    if let Some(live) = app.ota.live_job().filter(|l| l.id == id) {
        job.bytes_done = live.bytes_done() as i64;
        job.bytes_total = live.bytes_total.map(|t| t as i64);
    }
    Ok(axum::Json(job).into_response())
}

async fn list_assignments(
    _caller: Auth<Viewer>,
    State(app): State<AppState>,
) -> Result<Response, ApiError> {
    let assignments = app.store.read(db::assignments).await?;
    Ok(axum::Json(json!({"assignments": assignments})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AssignRequest {
    vehicle_id: String,
    version: String,
    hardware: Option<String>,
}

async fn assign(
    caller: Auth<Technician>,
    State(app): State<AppState>,
    ApiJson(request): ApiJson<AssignRequest>,
) -> Result<Response, ApiError> {
    let image = app
        .ota
        .find(&request.version, request.hardware.as_deref())
        .await
        .map_err(|e| ota_error(e, false))?;
    let published = app
        .ota
        .assign(&request.vehicle_id, &image, &actor(&caller))
        .await
        .map_err(|e| ota_error(e, false))?;
    // Committed: tell the vehicle now rather than at its next docking.
    let link = app.link.clone();
    let vehicle = request.vehicle_id.clone();
    tokio::spawn(async move { link.notify_ota(Some(vehicle)).await });
    Ok(audited_json(
        StatusCode::OK,
        &json!({"vehicle_id": request.vehicle_id, "hardware_id": image.hardware_id, "version": image.version, "director": published}),
    ))
}

async fn unassign(
    caller: Auth<Technician>,
    State(app): State<AppState>,
    Path(vehicle): Path<String>,
) -> Result<Response, ApiError> {
    let published = app
        .ota
        .unassign(&vehicle, &actor(&caller))
        .await
        .map_err(|e| ota_error(e, false))?;
    Ok(audited_json(
        StatusCode::OK,
        &json!({"vehicle_id": vehicle, "unassigned": true, "director": published}),
    ))
}

async fn get_bandwidth(_caller: Auth<Viewer>, State(app): State<AppState>) -> Response {
    axum::Json(json!({"bytes_per_second": app.ota.bandwidth.rate()})).into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct BandwidthRequest {
    /// `null` or 0 lifts the cap.
    bytes_per_second: Option<u64>,
}

async fn set_bandwidth(
    caller: Auth<Technician>,
    State(app): State<AppState>,
    ApiJson(request): ApiJson<BandwidthRequest>,
) -> Result<Response, ApiError> {
    if request
        .bytes_per_second
        .is_some_and(|r| r > 0 && r < 64 * 1024)
    {
        return Err(ApiError::invalid(
            "a cap below 64 KiB/s would stall vehicles; use at least 65536",
        ));
    }
    app.ota
        .set_bandwidth(request.bytes_per_second, &actor(&caller))
        .await
        .map_err(|e| ota_error(e, false))?;
    Ok(audited_json(
        StatusCode::OK,
        &json!({"bytes_per_second": app.ota.bandwidth.rate()}),
    ))
}

async fn trust(_caller: Auth<Viewer>, State(app): State<AppState>) -> Response {
    use sha2::Digest;
    let root = app.ota.mirror.fleet_root();
    axum::Json(json!({
        "fleet_root_pinned": root.is_some(),
        "fleet_root_sha256": root.map(|r| hex::encode(sha2::Sha256::digest(&r))),
        "image_metadata_expires": app.ota.timestamp_expires().map(|t| rfc3339(crate::store::unix_ms(t))),
        "certifier_key": app.ota.mirror.certifier_path().exists(),
    }))
    .into_response()
}

async fn pin_fleet_root(
    caller: Auth<Admin>,
    State(app): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    app.ota
        .pin_fleet_root(&body, &actor(&caller))
        .await
        .map_err(|e| ota_error(e, true))?;
    Ok(audited_json(
        StatusCode::OK,
        &json!({"fleet_root_pinned": true}),
    ))
}

async fn director(_caller: Auth<Viewer>, State(app): State<AppState>) -> Response {
    use sha2::Digest;
    let cert = app.ota.certificate();
    axum::Json(json!({
        "depot_id": app.depot_id,
        "root_sha256": hex::encode(sha2::Sha256::digest(app.ota.director.root_v1())),
        "root_url": "/tuf/director/metadata/1.root.json",
        "timestamp_expires": app.ota.director.timestamp_expiry().map(|t| rfc3339(crate::store::unix_ms(t))),
        "certificate": cert.map(|c| json!({"depot_id": c.signed.depot_id, "issued": c.signed.issued, "expires": c.signed.expires})),
    }))
    .into_response()
}

async fn install_certificate(
    caller: Auth<Admin>,
    State(app): State<AppState>,
    body: Bytes,
) -> Result<Response, ApiError> {
    let cert = app
        .ota
        .install_certificate(&body, &app.depot_id, &actor(&caller))
        .await
        .map_err(|e| ota_error(e, true))?;
    Ok(audited_json(
        StatusCode::OK,
        &json!({"installed": true, "expires": cert.signed.expires}),
    ))
}
