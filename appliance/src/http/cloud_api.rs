//! The fleet core's HTTP API (`atlasmesh cloud`): depots with their link state, reported
//! state and events; desired site limit and tariff per depot; enrolment tokens; revocation;
//! the audit log. Every route needs a fleet API token (`atlasmesh cloud token create`), each
//! states its minimum role, and every change is audited in the transaction that makes it.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::rejection::JsonRejection;
use axum::extract::{FromRef, FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use atlasmesh_cloud_sync::desired::Spec;
use atlasmesh_cloud_sync::pki::Ca;
use atlasmesh_cloud_sync::server::Clock;
use atlasmesh_cloud_sync::token::{EnrollToken, hash_secret};
use atlasmesh_cloud_sync::{CloudStore, CloudStoreError};

use atlasmesh_canary::fleet::FleetEvent;

use super::error::ApiError;
use crate::cloud_fleet::{CreateFleetRollout, FleetError};

/// Fleet roles: viewers read, operators change depots' desired state, admins also enrol and
/// revoke depots and read the audit log.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum FleetRole {
    Viewer,
    Operator,
    Admin,
}

impl FleetRole {
    pub fn as_str(self) -> &'static str {
        match self {
            FleetRole::Viewer => "viewer",
            FleetRole::Operator => "operator",
            FleetRole::Admin => "admin",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "viewer" => Some(FleetRole::Viewer),
            "operator" => Some(FleetRole::Operator),
            "admin" => Some(FleetRole::Admin),
            _ => None,
        }
    }
}

#[derive(Clone)]
pub struct CloudApp {
    pub store: CloudStore,
    pub ca: Arc<Ca>,
    pub clock: Clock,
    pub enroll_token_lifetime: Duration,
    /// A depot whose session has not touched the store for this long shows as offline.
    pub online_within: Duration,
    /// The image repository and chunk store depots stage releases from.
    pub repository: Arc<crate::cloud_repo::Repository>,
    /// Fleet rollouts: a release over depots in phases.
    pub fleet: Arc<crate::cloud_fleet::FleetRollouts>,
}

impl CloudApp {
    fn now(&self) -> i64 {
        (self.clock)()
    }

    /// Whether the depot's session touched the store recently (and it is not revoked).
    pub fn is_online(&self, d: &atlasmesh_cloud_sync::DepotRow) -> bool {
        d.revoked_ms.is_none()
            && d.last_seen_ms
                .is_some_and(|seen| self.now() - seen <= self.online_within.as_millis() as i64)
    }

    /// The depot's own summary (health, version, counts) from its latest report.
    pub async fn summary(&self, depot_id: &str) -> Result<Value, CloudStoreError> {
        Ok(self
            .store
            .reported_of(depot_id)
            .await?
            .into_iter()
            .find(|r| r.kind == "depot")
            .map_or(Value::Null, |r| r.json))
    }
}

/// A caller with at least role `R` (a const generic over the role's rank).
pub struct Fleet<const R: u8> {
    pub name: String,
    pub role: FleetRole,
}

impl<const R: u8> Fleet<R> {
    fn actor(&self) -> String {
        format!("token:{}", self.name)
    }
}

pub type Viewer = Fleet<0>;
pub type Operator = Fleet<1>;
pub type Admin = Fleet<2>;

impl<S, const R: u8> FromRequestParts<S> for Fleet<R>
where
    S: Send + Sync,
    CloudApp: FromRef<S>,
{
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let app = CloudApp::from_ref(state);
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .ok_or_else(|| ApiError::unauthorized("send `Authorization: Bearer <token>`"))?;
        let token = header
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                ApiError::unauthorized("the Authorization header must be `Bearer <token>`")
            })?;
        let (name, role) = app
            .store
            .api_token(&hash_secret(token))
            .await
            .map_err(store_error)?
            .ok_or_else(|| ApiError::unauthorized("unknown or revoked token"))?;
        let role = FleetRole::parse(&role)
            .ok_or_else(|| ApiError::internal(format!("token {name} has an unknown role")))?;
        let needed = [FleetRole::Viewer, FleetRole::Operator, FleetRole::Admin][usize::from(R)];
        if role < needed {
            return Err(ApiError::forbidden(format!(
                "this needs the {} role; the token has {}",
                needed.as_str(),
                role.as_str()
            )));
        }
        Ok(Fleet { name, role })
    }
}

fn store_error(e: CloudStoreError) -> ApiError {
    match e {
        CloudStoreError::UnknownDepot(_) => ApiError::not_found(e.to_string()),
        CloudStoreError::RevokedDepot(_) => ApiError::conflict(e.to_string()),
        other => ApiError::internal(other),
    }
}

/// Routes that may take as long as an upload does (no request timeout).
pub fn long_routes<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    CloudApp: FromRef<S>,
{
    Router::new().route("/api/v1/releases", post(import_release))
}

pub fn routes<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    CloudApp: FromRef<S>,
{
    Router::new()
        .route("/api/v1/depots", get(list_depots))
        .route("/api/v1/depots/{name}", get(get_depot))
        .route("/api/v1/depots/{name}/events", get(depot_events))
        .route(
            "/api/v1/depots/{name}/desired/site-limit",
            put(set_site_limit).delete(remove_site_limit),
        )
        .route(
            "/api/v1/depots/{name}/desired/tariff",
            put(set_tariff).delete(remove_tariff),
        )
        .route("/api/v1/depots/{name}/revoke", post(revoke))
        .route(
            "/api/v1/depots/{name}/desired/release/{hardware}/{version}",
            axum::routing::delete(unstage_release),
        )
        .route("/api/v1/releases", get(list_releases))
        .route(
            "/api/v1/releases/{hardware}/{version}/stage",
            post(stage_release),
        )
        .route(
            "/api/v1/fleet-rollouts",
            get(list_fleet_rollouts).post(create_fleet_rollout),
        )
        .route("/api/v1/fleet-rollouts/{id}", get(get_fleet_rollout))
        .route(
            "/api/v1/fleet-rollouts/{id}/{command}",
            post(command_fleet_rollout),
        )
        .route("/api/v1/enroll-tokens", post(mint_token))
        .route("/api/v1/audit", get(audit_log))
        .route("/api/v1/ca", get(ca_certificate))
}

fn fleet_error(e: FleetError) -> ApiError {
    match e {
        FleetError::Invalid(m) => ApiError::invalid(m),
        FleetError::NotFound(m) => ApiError::not_found(m),
        FleetError::Conflict(m) => ApiError::conflict(m),
        FleetError::Store(CloudStoreError::UnknownFleetRollout(id)) => {
            ApiError::not_found(format!("no fleet rollout {id:?}"))
        }
        FleetError::Store(e) => store_error(e),
        other => ApiError::internal(other),
    }
}

async fn list_fleet_rollouts(
    _: Viewer,
    State(app): State<CloudApp>,
) -> Result<Json<Value>, ApiError> {
    let rollouts = app.fleet.list().await.map_err(fleet_error)?;
    Ok(Json(json!({ "fleet_rollouts": rollouts })))
}

/// `POST /api/v1/fleet-rollouts`: a published release over depots in phases.
async fn create_fleet_rollout(
    caller: Operator,
    State(app): State<CloudApp>,
    body: Result<Json<CreateFleetRollout>, JsonRejection>,
) -> Result<(axum::http::StatusCode, Json<Value>), ApiError> {
    let Json(body) = body?;
    let created = app
        .fleet
        .create(body, &caller.actor())
        .await
        .map_err(fleet_error)?;
    Ok((axum::http::StatusCode::CREATED, Json(created)))
}

async fn get_fleet_rollout(
    _: Viewer,
    State(app): State<CloudApp>,
    Path(id): Path<String>,
) -> Result<Json<Value>, ApiError> {
    Ok(Json(app.fleet.get(&id).await.map_err(fleet_error)?))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct FleetCommandBody {
    /// `resume`: start the next phase although the fleet gate could not judge.
    #[serde(default)]
    accept_inconclusive: bool,
    /// `halt`: why, for the log and the depots.
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /api/v1/fleet-rollouts/{id}/pause|resume|halt`.
async fn command_fleet_rollout(
    caller: Operator,
    State(app): State<CloudApp>,
    Path((id, command)): Path<(String, String)>,
    body: Option<Json<FleetCommandBody>>,
) -> Result<Json<Value>, ApiError> {
    let body = body.map(|Json(b)| b).unwrap_or_default();
    let event = match command.as_str() {
        "pause" => FleetEvent::Pause,
        "resume" => FleetEvent::Resume {
            accept_inconclusive: body.accept_inconclusive,
        },
        "halt" => FleetEvent::Halt {
            reason: body
                .reason
                .unwrap_or_else(|| format!("halted by {}", caller.actor())),
        },
        other => {
            return Err(ApiError::not_found(format!(
                "no command {other:?}: pause, resume or halt"
            )));
        }
    };
    Ok(Json(
        app.fleet
            .command(&id, event, &caller.actor())
            .await
            .map_err(fleet_error)?,
    ))
}

fn depot_json(app: &CloudApp, d: &atlasmesh_cloud_sync::DepotRow) -> Value {
    let mut v = serde_json::to_value(d).unwrap_or_default();
    v["online"] = json!(app.is_online(d));
    v["in_sync"] = json!(d.acked_revision >= d.desired_revision);
    v
}

async fn list_depots(_: Viewer, State(app): State<CloudApp>) -> Result<Json<Value>, ApiError> {
    let depots = app.store.depots().await.map_err(store_error)?;
    let mut out = Vec::with_capacity(depots.len());
    for d in &depots {
        let mut v = depot_json(&app, d);
        v["summary"] = app.summary(&d.id).await.map_err(store_error)?;
        out.push(v);
    }
    Ok(Json(json!({ "depots": out })))
}

async fn get_depot(
    _: Viewer,
    State(app): State<CloudApp>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let depot = app.store.depot(&name).await.map_err(store_error)?;
    let desired = app.store.desired_of(&depot.id).await.map_err(store_error)?;
    let reported = app
        .store
        .reported_of(&depot.id)
        .await
        .map_err(store_error)?;
    let mut v = depot_json(&app, &depot);
    v["desired"] = serde_json::to_value(desired).unwrap_or_default();
    v["reported"] = serde_json::to_value(reported).unwrap_or_default();
    Ok(Json(v))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    #[serde(default)]
    after: i64,
    #[serde(default = "default_limit")]
    limit: i64,
}

fn default_limit() -> i64 {
    100
}

async fn depot_events(
    _: Viewer,
    State(app): State<CloudApp>,
    Path(name): Path<String>,
    query: Result<Query<EventsQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query?;
    if !(1..=1000).contains(&q.limit) {
        return Err(ApiError::invalid("limit: between 1 and 1000"));
    }
    let depot = app.store.depot(&name).await.map_err(store_error)?;
    let events = app
        .store
        .events_of(&depot.id, q.after, q.limit)
        .await
        .map_err(store_error)?;
    Ok(Json(json!({ "events": events })))
}

async fn set_desired(
    app: &CloudApp,
    actor: &str,
    name: &str,
    kind: &str,
    spec: Option<Spec>,
) -> Result<Json<Value>, ApiError> {
    set_desired_key(app, actor, name, kind, "site", spec).await
}

async fn set_desired_key(
    app: &CloudApp,
    actor: &str,
    name: &str,
    kind: &str,
    key: &str,
    spec: Option<Spec>,
) -> Result<Json<Value>, ApiError> {
    if let Some(spec) = &spec {
        spec.validate().map_err(ApiError::invalid)?;
    }
    let (revision, generation) = app
        .store
        .set_desired(name, kind, key, spec.as_ref(), actor, app.now())
        .await
        .map_err(store_error)?;
    Ok(Json(json!({
        "depot": name, "kind": kind, "key": key, "revision": revision,
        "generation": generation, "spec": spec,
    })))
}

/// `GET /api/v1/releases`: the images depots can stage, and the repository's signing state.
async fn list_releases(_: Viewer, State(app): State<CloudApp>) -> Result<Json<Value>, ApiError> {
    let releases = app.repository.releases().map_err(ApiError::internal)?;
    Ok(Json(
        json!({ "releases": releases, "repository": app.repository.status() }),
    ))
}

/// `POST /api/v1/releases`: a release bundle (`atlasmesh ota release bundle`), verified from
/// the pinned fleet root as a depot would, stored, and published with a fresh snapshot and
/// timestamp. Admin: it changes what every depot may be told to stage.
async fn import_release(
    caller: Admin,
    State(app): State<CloudApp>,
    body: axum::body::Body,
) -> Result<(axum::http::StatusCode, Json<Value>), ApiError> {
    use crate::cloud_repo::RepoError;
    use futures_util::TryStreamExt;
    use tokio_util::io::{StreamReader, SyncIoBridge};
    let stream = body.into_data_stream().map_err(std::io::Error::other);
    let reader = SyncIoBridge::new(StreamReader::new(stream));
    let result = app.repository.import(reader).await;
    let (outcome, detail) = match &result {
        Ok(i) => (
            "ok",
            json!({"release": i.release, "new_chunks": i.new_chunks, "signed": i.signed}),
        ),
        Err(e) => ("failed", json!({"error": e.to_string()})),
    };
    let target = result
        .as_ref()
        .ok()
        .map(|i| format!("{}/{}", i.release.hardware_id, i.release.version));
    app.store
        .audit(
            app.now(),
            &caller.actor(),
            "release.import",
            target.as_deref(),
            outcome,
            &detail,
        )
        .await
        .map_err(ApiError::internal)?;
    match result {
        Ok(imported) => Ok((axum::http::StatusCode::CREATED, Json(json!(imported)))),
        Err(e @ (RepoError::NoRoot | RepoError::NoKeys)) => Err(ApiError::conflict(e.to_string())),
        Err(RepoError::Staging(e)) => {
            use atlasmesh_ota_staging::staging::StagingError as E;
            Err(match &e {
                E::AlreadyStaged { .. } => ApiError::conflict(e.to_string()),
                E::Io { .. } => ApiError::internal(e),
                _ => ApiError::new(
                    axum::http::StatusCode::UNPROCESSABLE_ENTITY,
                    e.code(),
                    e.to_string(),
                ),
            })
        }
        Err(e) => Err(ApiError::internal(e)),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StageBody {
    depots: Vec<String>,
}

/// `POST /api/v1/releases/{hardware}/{version}/stage`: tells each named depot to stage the
/// release (a desired `release` object per depot).
async fn stage_release(
    caller: Operator,
    State(app): State<CloudApp>,
    Path((hardware, version)): Path<(String, String)>,
    body: Result<Json<StageBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(body) = body?;
    if body.depots.is_empty() {
        return Err(ApiError::invalid("name at least one depot in `depots`"));
    }
    let release = app
        .repository
        .releases()
        .map_err(ApiError::internal)?
        .into_iter()
        .find(|r| r.hardware_id == hardware && r.version == version)
        .ok_or_else(|| {
            ApiError::not_found(format!("no release {hardware}/{version} in the repository"))
        })?;
    // Every name first, so a typo changes nothing.
    for name in &body.depots {
        app.store.depot(name).await.map_err(store_error)?;
    }
    let key = atlasmesh_cloud_sync::desired::release_key(&hardware, &version);
    let mut staged = Vec::new();
    for name in &body.depots {
        let spec = Spec::Release {
            hardware_id: hardware.clone(),
            version: version.clone(),
            sha256: release.sha256.clone(),
        };
        let Json(v) =
            set_desired_key(&app, &caller.actor(), name, "release", &key, Some(spec)).await?;
        staged.push(v);
    }
    Ok(Json(json!({ "staged": staged })))
}

/// `DELETE /api/v1/depots/{name}/desired/release/{hardware}/{version}`: the depot no longer
/// needs to hold the release (what it staged stays until its own clean-up).
async fn unstage_release(
    caller: Operator,
    State(app): State<CloudApp>,
    Path((name, hardware, version)): Path<(String, String, String)>,
) -> Result<Json<Value>, ApiError> {
    let key = atlasmesh_cloud_sync::desired::release_key(&hardware, &version);
    set_desired_key(&app, &caller.actor(), &name, "release", &key, None).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct SiteLimitBody {
    limit_kw: f64,
}

async fn set_site_limit(
    caller: Operator,
    State(app): State<CloudApp>,
    Path(name): Path<String>,
    body: Result<Json<SiteLimitBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(body) = body?;
    let spec = Spec::SiteLimit {
        limit_kw: body.limit_kw,
    };
    set_desired(&app, &caller.actor(), &name, "site_limit", Some(spec)).await
}

async fn remove_site_limit(
    caller: Operator,
    State(app): State<CloudApp>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_desired(&app, &caller.actor(), &name, "site_limit", None).await
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TariffBody {
    prices_per_kwh: Vec<f64>,
}

async fn set_tariff(
    caller: Operator,
    State(app): State<CloudApp>,
    Path(name): Path<String>,
    body: Result<Json<TariffBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(body) = body?;
    let spec = Spec::Tariff {
        prices_per_kwh: body.prices_per_kwh,
    };
    set_desired(&app, &caller.actor(), &name, "tariff", Some(spec)).await
}

async fn remove_tariff(
    caller: Operator,
    State(app): State<CloudApp>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    set_desired(&app, &caller.actor(), &name, "tariff", None).await
}

async fn revoke(
    caller: Admin,
    State(app): State<CloudApp>,
    Path(name): Path<String>,
) -> Result<Json<Value>, ApiError> {
    let depot = app
        .store
        .revoke_depot(&name, app.now(), &caller.actor())
        .await
        .map_err(store_error)?;
    Ok(Json(depot_json(&app, &depot)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MintBody {
    depot: String,
}

/// Depot names are what people type and see: short, no spaces.
pub fn validate_depot_name(name: &str) -> Result<(), String> {
    if name.is_empty()
        || name.len() > 63
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
    {
        return Err(format!(
            "depot name {name:?}: 1 to 63 letters, digits, '-' or '_'"
        ));
    }
    Ok(())
}

/// Mints a one-time enrolment token for a depot (registering the depot if new).
pub async fn mint(
    store: &CloudStore,
    ca: &Ca,
    depot: &str,
    now: i64,
    lifetime: Duration,
    actor: &str,
) -> Result<(EnrollToken, i64), ApiError> {
    validate_depot_name(depot).map_err(ApiError::invalid)?;
    let token = EnrollToken::mint(ca.fingerprint());
    let expires = now + lifetime.as_millis() as i64;
    store
        .mint_enroll_token(depot, &token.secret_hash(), now, expires, actor)
        .await
        .map_err(store_error)?;
    Ok((token, expires))
}

async fn mint_token(
    caller: Admin,
    State(app): State<CloudApp>,
    body: Result<Json<MintBody>, JsonRejection>,
) -> Result<Json<Value>, ApiError> {
    let Json(body) = body?;
    let (token, expires) = mint(
        &app.store,
        &app.ca,
        &body.depot,
        app.now(),
        app.enroll_token_lifetime,
        &caller.actor(),
    )
    .await?;
    Ok(Json(json!({
        "depot": body.depot, "token": token.to_string(), "expires_ms": expires,
    })))
}

/// The fleet CA certificate (PEM) and its SHA-256, which enrolment tokens pin: for standard
/// gRPC tools that need to trust the cloud's port.
async fn ca_certificate(_: Viewer, State(app): State<CloudApp>) -> Json<Value> {
    Json(json!({ "certificate_pem": app.ca.cert_pem(), "sha256": app.ca.fingerprint() }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AuditQuery {
    #[serde(default = "default_limit")]
    limit: i64,
}

async fn audit_log(
    _: Admin,
    State(app): State<CloudApp>,
    query: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Value>, ApiError> {
    let Query(q) = query?;
    let records = app
        .store
        .audit_log(q.limit.clamp(1, 1000))
        .await
        .map_err(store_error)?;
    Ok(Json(json!({ "records": records })))
}
