//! `/api/v1` routes of the vehicle link: the registry (vehicles and their state), bays, vehicle
//! provisioning with MQTT credentials, and which broker vehicles use.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::authn::{Admin, Auth, Technician, Viewer};
use super::error::{ApiError, ApiJson};
use super::{AppState, audited_json};
use crate::link::db::{self, RegistryError};
use crate::link::{BrokerInfo, VehicleLink};

pub fn routes() -> Router<AppState> {
    Router::new()
        .route("/vehicles", get(list).post(create))
        .route("/vehicles/{id}", get(one))
        .route("/vehicles/{id}/credentials", post(reissue))
        .route("/bays", get(bays))
        .route("/vehicle-link", get(link_info))
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Exists(_) => ApiError::conflict(e.to_string()),
            RegistryError::NotFound(_) => ApiError::not_found(e.to_string()),
            RegistryError::Store(s) => ApiError::internal(s),
        }
    }
}

async fn list(_caller: Auth<Viewer>, State(app): State<AppState>) -> Result<Response, ApiError> {
    let vehicles = app.store.read(db::list).await?;
    Ok(axum::Json(json!({ "vehicles": vehicles })).into_response())
}

async fn one(
    _caller: Auth<Viewer>,
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let lookup = id.clone();
    let vehicle = app
        .store
        .read(move |c| db::get(c, &lookup))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no vehicle {id}")))?;
    Ok(axum::Json(vehicle).into_response())
}

async fn bays(_caller: Auth<Viewer>, State(app): State<AppState>) -> Result<Response, ApiError> {
    let bays = app.store.read(db::bays).await?;
    Ok(axum::Json(json!({ "bays": bays })).into_response())
}

async fn link_info(_caller: Auth<Viewer>, State(app): State<AppState>) -> Response {
    axum::Json(json!({
        "broker": app.link.broker,
        "topics": {
            "upward": app.link.topics().upward("{vehicle}", atlasmesh_vehicle_link::wire::Upward::State).replace("/state", "/{dock|state|ota|health|link}"),
            "downward": app.link.topics().downward_filter("{vehicle}"),
        },
    }))
    .into_response()
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewVehicle {
    id: String,
    hardware_id: Option<String>,
}

/// What a vehicle needs to join the link; the password is shown once.
#[derive(Serialize)]
struct Credentials {
    id: String,
    mqtt: MqttLogin,
}

#[derive(Serialize)]
struct MqttLogin {
    /// The broker vehicles connect to, when the depot runs it.
    #[serde(skip_serializing_if = "Option::is_none")]
    listen: Option<String>,
    client_id: String,
    username: String,
    password: String,
}

fn credentials(link: &VehicleLink, id: String, password: String) -> Credentials {
    let listen = match &link.broker {
        BrokerInfo::Embedded { listen } => Some(listen.to_string()),
        BrokerInfo::External { .. } => None,
    };
    Credentials {
        mqtt: MqttLogin {
            listen,
            client_id: id.clone(),
            username: id.clone(),
            password,
        },
        id,
    }
}

/// Registers a vehicle (technicians commission vehicles at the depot).
async fn create(
    caller: Auth<Technician>,
    State(app): State<AppState>,
    ApiJson(body): ApiJson<NewVehicle>,
) -> Result<Response, ApiError> {
    atlasmesh_vehicle_link::wire::check_id("vehicle id", &body.id)
        .map_err(|e| ApiError::invalid(e.to_string()))?;
    if let Some(hw) = &body.hardware_id {
        atlasmesh_vehicle_link::wire::check_id("hardware id", hw)
            .map_err(|e| ApiError::invalid(e.to_string()))?;
    }
    let by = caller.identity.actor.clone();
    let (id, hardware) = (body.id.clone(), body.hardware_id.clone());
    let password = app
        .audited(
            &caller.identity,
            caller.request_id(),
            "vehicle.create",
            &body.id,
            move |tx, now| {
                let secret = db::create(tx, &id, hardware.as_deref(), &by, now)?;
                Ok((secret, json!({"hardware_id": hardware})))
            },
        )
        .await?;
    Ok(audited_json(
        StatusCode::CREATED,
        &credentials(&app.link, body.id, password),
    ))
}

/// New MQTT password for a vehicle (a replaced or leaked one stops working).
async fn reissue(
    caller: Auth<Admin>,
    State(app): State<AppState>,
    Path(id): Path<String>,
) -> Result<Response, ApiError> {
    let target = id.clone();
    let password = app
        .audited(
            &caller.identity,
            caller.request_id(),
            "vehicle.credentials",
            &id,
            move |tx, now| Ok((db::reissue(tx, &target, now)?, json!({}))),
        )
        .await?;
    Ok(audited_json(
        StatusCode::OK,
        &credentials(&app.link, id, password),
    ))
}
