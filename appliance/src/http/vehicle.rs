//! What vehicles read from the depot on its LAN, without credentials: the mirrored image
//! repository and the depot's director repository under `/tuf/`, chunks by SHA-256 under
//! `/chunks/`, whole images under `/images/`. Everything here is read-only and either signed
//! metadata or content named by its hash; TUF and the hashes, not the channel, make it safe.
//! Only images that are staged, verified and not found damaged are served.

use atlasmesh_ota_staging::chunks::is_sha256_hex;
use atlasmesh_ota_staging::release::CERTIFIER_TARGET;
use atlasmesh_ota_staging::staging::is_metadata_name;
use atlasmesh_ota_staging::store::ImageStore;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::Response;
use axum::routing::get;
use bytes::Bytes;
use sha2::{Digest, Sha256};

use super::AppState;
use super::error::ApiError;
use super::fastpath::BulkHead;
use super::files::{FileAnswer, Servable, serve, serve_bytes};
use crate::ota::{Ota, db};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/tuf/image/metadata/{file}", get(image_metadata))
        .route("/tuf/image/targets/{file}", get(image_target))
        .route("/tuf/director/metadata/{file}", get(director_metadata))
        .route("/tuf/director/targets/{file}", get(director_target))
        .route("/tuf/director/certificate.json", get(certificate))
        .route("/chunks/{sha256}", get(chunk))
        .route("/images/{name}", get(image))
}

fn not_found() -> ApiError {
    ApiError::not_found("not on this depot")
}

fn metadata_file(
    dir: std::path::PathBuf,
    file: &str,
    headers: &HeaderMap,
    app: &AppState,
) -> Result<Response, ApiError> {
    if !is_metadata_name(file) {
        return Err(not_found());
    }
    let path = dir.join(file);
    let bytes = std::fs::read(&path).map_err(|_| not_found())?;
    let etag = hex::encode(Sha256::digest(&bytes));
    // Versioned files never change; timestamp.json and root.json do.
    let immutable = file.as_bytes()[0].is_ascii_digit();
    let mut response = serve_bytes(
        Bytes::from(bytes),
        &etag,
        headers,
        app.ota.metrics.served("metadata"),
    );
    if !immutable {
        response.headers_mut().insert(
            axum::http::header::CACHE_CONTROL,
            axum::http::HeaderValue::from_static("no-cache"),
        );
    }
    response.headers_mut().insert(
        axum::http::header::CONTENT_TYPE,
        axum::http::HeaderValue::from_static("application/json"),
    );
    Ok(response)
}

async fn image_metadata(
    State(app): State<AppState>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    metadata_file(app.ota.mirror.metadata_dir(), &file, &headers, &app)
}

async fn director_metadata(
    State(app): State<AppState>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    metadata_file(app.ota.director.metadata_dir(), &file, &headers, &app)
}

async fn certificate(
    State(app): State<AppState>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let bytes = std::fs::read(app.ota.director.certificate_path())
        .map_err(|_| ApiError::not_found("this depot's director has no fleet certificate yet"))?;
    let etag = hex::encode(Sha256::digest(&bytes));
    let mut response = serve_bytes(
        Bytes::from(bytes),
        &etag,
        &headers,
        app.ota.metrics.served("metadata"),
    );
    response.headers_mut().insert(
        axum::http::header::CACHE_CONTROL,
        axum::http::HeaderValue::from_static("no-cache"),
    );
    Ok(response)
}

/// `<sha256>.<target name>`, the consistent-snapshot file name of a target.
fn split_target_file(file: &str) -> Option<(&str, &str)> {
    let (sha, name) = file.split_at_checked(64)?;
    let name = name.strip_prefix('.')?;
    (is_sha256_hex(sha) && !name.is_empty()).then_some((sha, name))
}

fn pack(app: &AppState, sha256: &str, headers: &HeaderMap) -> Result<Response, ApiError> {
    pack_response(&app.ota, sha256, headers).ok_or_else(not_found)
}

fn pack_servable(ota: &Ota, sha256: &str) -> Option<Servable> {
    let (file, length) = ota.open_pack(sha256)?;
    Some(Servable {
        file,
        base: 0,
        length,
        etag: sha256.to_owned(),
        content_type: "application/octet-stream",
        immutable: true,
    })
}

fn pack_response(ota: &Ota, sha256: &str, headers: &HeaderMap) -> Option<Response> {
    Some(serve(
        pack_servable(ota, sha256)?,
        headers,
        ota.bandwidth.clone(),
        ota.metrics.served("image"),
    ))
}

/// The route template of [`resolve_bulk`]'s responses, as the router would name it.
pub const BULK_ROUTE: &str = "/images/{name}";

/// Range reads of a whole image by hash (`/images/<sha256>.img`), the bulk of what vehicles
/// pull, answered without the router (see `fastpath`); `None` leaves the request to the router,
/// which also gives every refusal and every answer without bytes (304, 416).
pub fn resolve_bulk(ota: &Ota, head: &BulkHead<'_>) -> Option<FileAnswer> {
    let name = head.target.strip_prefix("/images/")?;
    let sha256 = name.strip_suffix(".img").unwrap_or(name);
    if !is_sha256_hex(sha256) {
        return None;
    }
    pack_servable(ota, sha256)?
        .answer(
            &head.conditions(),
            ota.bandwidth.clone(),
            ota.metrics.served("image"),
        )
        .ok()
}

async fn image_target(
    State(app): State<AppState>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (sha, name) = split_target_file(&file).ok_or_else(not_found)?;
    if name == CERTIFIER_TARGET {
        let bytes = std::fs::read(app.ota.mirror.certifier_path()).map_err(|_| not_found())?;
        if hex::encode(Sha256::digest(&bytes)) != sha {
            return Err(not_found());
        }
        return Ok(serve_bytes(
            Bytes::from(bytes),
            sha,
            &headers,
            app.ota.metrics.served("metadata"),
        ));
    }
    let (name, sha) = (name.to_owned(), sha.to_owned());
    let images = app.store.read(|c| db::images(c, false)).await?;
    if let Some(image) = images.iter().find(|i| i.target == name && i.sha256 == sha) {
        return pack(&app, &image.sha256, &headers);
    }
    if let Some(image) = images
        .iter()
        .find(|i| i.index_target == name && app.ota.is_served(&i.sha256))
    {
        let bytes =
            std::fs::read(app.ota.store.index_path(&image.sha256)).map_err(|_| not_found())?;
        if hex::encode(Sha256::digest(&bytes)) == sha {
            return Ok(serve_bytes(
                Bytes::from(bytes),
                &sha,
                &headers,
                app.ota.metrics.served("metadata"),
            ));
        }
    }
    Err(not_found())
}

async fn director_target(
    State(app): State<AppState>,
    Path(file): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (sha, name) = split_target_file(&file).ok_or_else(not_found)?;
    let vehicle = name
        .strip_prefix("vehicle_")
        .and_then(|v| v.strip_suffix(".img"))
        .ok_or_else(not_found)?
        .to_owned();
    let sha = sha.to_owned();
    let assigned = app
        .store
        .read(move |c| {
            let assignment = db::assignments(c)?
                .into_iter()
                .find(|a| a.vehicle_id == vehicle);
            match assignment {
                Some(a) => db::image_by_id(c, a.image_id),
                None => Ok(None),
            }
        })
        .await?;
    match assigned {
        Some(image) if image.sha256 == sha => pack(&app, &image.sha256, &headers),
        _ => Err(not_found()),
    }
}

/// A chunk, read from its pack and checked against its hash before it leaves: a chunk damaged
/// on disk is never sent, and its image is withdrawn.
async fn chunk(
    State(app): State<AppState>,
    Path(sha256): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let Some(hash) = hex::decode(&sha256)
        .ok()
        .and_then(|b| <[u8; 32]>::try_from(b).ok())
    else {
        return Err(ApiError::not_found(
            "chunks are named by their lower-case hex SHA-256",
        ));
    };
    let location = app.ota.store.locate(&hash).ok_or_else(not_found)?;
    let image_sha = hex::encode(location.image);
    let path = app.ota.store.pack_path(&image_sha);
    app.ota.bandwidth.acquire(location.length as usize).await;
    let read = tokio::task::spawn_blocking(move || {
        let file = std::fs::File::open(&path)?;
        ImageStore::read_at(&file, location.offset, location.length as usize)
    })
    .await
    .map_err(ApiError::internal)?;
    let bytes = read.map_err(ApiError::internal)?;
    if Sha256::digest(&bytes)[..] != hash[..] {
        tracing::error!(chunk = %sha256, image = %image_sha, "a chunk no longer matches its hash; withdrawing its image");
        let ota = app.ota.clone();
        let images = app.store.read(|c| db::images(c, false)).await?;
        if let Some(image) = images.into_iter().find(|i| i.sha256 == image_sha) {
            tokio::spawn(async move {
                if let Err(e) = ota.validate(&image).await {
                    tracing::error!(error = %e, "validating a damaged image failed");
                }
            });
        }
        return Err(ApiError::new(
            axum::http::StatusCode::SERVICE_UNAVAILABLE,
            "damaged",
            "this chunk is damaged on the depot's disk; its image has been withdrawn",
        ));
    }
    Ok(serve_bytes(
        Bytes::from(bytes),
        &sha256,
        &headers,
        app.ota.metrics.served("chunk"),
    ))
}

/// `/images/<sha256>`, `/images/<sha256>.img` or `/images/<hardware>_<version>.img`.
async fn image(
    State(app): State<AppState>,
    Path(name): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let by_hash = name.strip_suffix(".img").unwrap_or(&name);
    if is_sha256_hex(by_hash) {
        return pack(&app, by_hash, &headers);
    }
    let wanted = name.clone();
    let images = app.store.read(|c| db::images(c, false)).await?;
    let image = images
        .iter()
        .find(|i| i.target == wanted)
        .ok_or_else(not_found)?;
    pack(&app, &image.sha256, &headers)
}
