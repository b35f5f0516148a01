//! `/api/v1`: JSON in, JSON out. Every route sits behind [`authn::authenticate`] (401 without
//! credentials) and names its minimum role in its signature (403 below it). Changes go through
//! [`AppState::audited`], which writes the audit record in the change's transaction.

use axum::Router;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::middleware::{from_fn, from_fn_with_state};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, put};
use serde::{Deserialize, Serialize};
use serde_json::json;

use super::authn::{self, Admin, Auth, Via, Viewer};
use super::error::{ApiError, ApiJson, ApiQuery};
use super::{AppState, audited_json, observe};
use crate::audit;
use crate::auth::{self, Role};

pub fn router(app: AppState) -> Router<AppState> {
    let timeout = super::timeout(app.config.http.request_timeout);
    Router::new()
        .route("/status", get(status))
        .route("/me", get(me))
        .route("/audit", get(audit_log))
        .route("/users", get(list_users).post(create_user))
        .route("/users/{username}", delete(disable_user))
        .route("/users/{username}/password", put(change_password))
        .route("/tokens", get(list_tokens).post(create_token))
        .route("/tokens/{id}", delete(revoke_token))
        .merge(super::ota_api::routes())
        .merge(super::vehicles_api::routes())
        .merge(super::rollouts_api::routes())
        .merge(super::disks_api::routes())
        .merge(super::charging_api::routes())
        .layer(timeout)
        // Staging reads an upload of gigabytes as it arrives: no request timeout there.
        .merge(super::ota_api::long_routes())
        .fallback(not_found)
        .route_layer(from_fn(observe::remember_route))
        .layer(from_fn_with_state(app, authn::authenticate))
}

async fn not_found(_caller: Auth<Viewer>) -> ApiError {
    ApiError::not_found("no such API endpoint")
}

#[derive(Serialize)]
struct StatusBody {
    depot: DepotInfo,
    mode: &'static str,
    version: &'static str,
    started_at: String,
    uptime_seconds: u64,
    system: crate::sysstat::SystemSnapshot,
    summary: Summary,
}

#[derive(Serialize)]
struct DepotInfo {
    id: String,
    name: String,
}

#[derive(Serialize)]
struct Summary {
    users: i64,
    active_api_tokens: i64,
    audit_records: i64,
}

async fn status(_caller: Auth<Viewer>, State(app): State<AppState>) -> Result<Response, ApiError> {
    let summary = app
        .store
        .read(|c| {
            let count = |sql: &str| c.query_row(sql, [], |r| r.get::<_, i64>(0));
            Ok::<_, crate::store::StoreError>(Summary {
                users: count("SELECT count(*) FROM users WHERE disabled_at IS NULL")?,
                active_api_tokens: count(
                    "SELECT count(*) FROM api_tokens WHERE revoked_at IS NULL",
                )?,
                audit_records: count("SELECT count(*) FROM audit_log")?,
            })
        })
        .await?;
    let body = StatusBody {
        depot: DepotInfo {
            id: app.depot_id.clone(),
            name: app.depot_name.clone(),
        },
        mode: app.core.mode.as_str(),
        version: env!("CARGO_PKG_VERSION"),
        started_at: chrono::DateTime::<chrono::Utc>::from(app.core.started_at)
            .to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        uptime_seconds: app.core.uptime_seconds(),
        system: app.core.system.borrow().clone(),
        summary,
    };
    Ok(axum::Json(body).into_response())
}

async fn me(caller: Auth<Viewer>) -> Response {
    let via = match &caller.identity.via {
        Via::Token { .. } => "token",
        Via::Session { .. } => "session",
    };
    axum::Json(json!({"actor": caller.identity.actor, "role": caller.identity.role, "via": via}))
        .into_response()
}

async fn audit_log(
    _caller: Auth<Admin>,
    State(app): State<AppState>,
    ApiQuery(query): ApiQuery<audit::Query>,
) -> Result<Response, ApiError> {
    let records = app.store.read(move |c| audit::list(c, &query)).await?;
    Ok(axum::Json(json!({"records": records})).into_response())
}

async fn list_users(
    _caller: Auth<Admin>,
    State(app): State<AppState>,
) -> Result<Response, ApiError> {
    let users = app.store.read(auth::list_users).await?;
    Ok(axum::Json(json!({"users": users})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewUser {
    username: String,
    password: String,
    role: Role,
}

/// argon2 is deliberately slow; it runs on the blocking pool, not on an async worker.
async fn hash(password: String) -> Result<String, ApiError> {
    tokio::task::spawn_blocking(move || auth::hash_password(&password))
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::from)
}

async fn create_user(
    caller: Auth<Admin>,
    State(app): State<AppState>,
    ApiJson(body): ApiJson<NewUser>,
) -> Result<Response, ApiError> {
    auth::validate_username(&body.username)?;
    auth::validate_password(&body.password)?;
    let hash = hash(body.password).await?;
    let (username, role) = (body.username.clone(), body.role);
    let user = app
        .audited(
            &caller.identity,
            caller.request_id(),
            "user.create",
            &body.username,
            move |tx, now| {
                let user = auth::create_user(tx, &username, &hash, role, now)?;
                Ok((user, json!({"role": role})))
            },
        )
        .await?;
    Ok(audited_json(StatusCode::CREATED, &user))
}

async fn disable_user(
    caller: Auth<Admin>,
    State(app): State<AppState>,
    Path(username): Path<String>,
) -> Result<Response, ApiError> {
    let name = username.clone();
    app.audited(
        &caller.identity,
        caller.request_id(),
        "user.disable",
        &username,
        move |tx, now| {
            let admins = auth::count_active_admins(tx)?;
            let is_admin = auth::list_users(tx)?
                .iter()
                .any(|u| u.username == name && u.role == Role::Admin && !u.disabled);
            if is_admin && admins <= 1 {
                return Err(ApiError::conflict(
                    "refusing to disable the last admin; create another admin first",
                ));
            }
            auth::disable_user(tx, &name, now)?;
            Ok(((), json!({})))
        },
    )
    .await?;
    Ok(audited_json(
        StatusCode::OK,
        &json!({"username": username, "disabled": true}),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PasswordChange {
    /// Required when changing one's own password.
    current_password: Option<String>,
    new_password: String,
}

async fn change_password(
    caller: Auth<Viewer>,
    State(app): State<AppState>,
    Path(username): Path<String>,
    ApiJson(body): ApiJson<PasswordChange>,
) -> Result<Response, ApiError> {
    let own = matches!(&caller.identity.via, Via::Session { username: u, .. } if *u == username);
    if !own && caller.identity.role < Role::Admin {
        return Err(ApiError::forbidden(
            "only admins may change another user's password",
        ));
    }
    auth::validate_password(&body.new_password)?;
    if own {
        let current = body.current_password.clone().ok_or_else(|| {
            ApiError::invalid("`current_password` is required to change your own password")
        })?;
        let name = username.clone();
        let found = app
            .store
            .read(move |c| auth::login_lookup(c, &name))
            .await?;
        let hash = found.map(|(_, _, h)| h).unwrap_or_default();
        let ok = tokio::task::spawn_blocking(move || auth::verify_password(&hash, &current))
            .await
            .map_err(ApiError::internal)?;
        if !ok {
            return Err(ApiError::forbidden("the current password is wrong"));
        }
    }
    let new_hash = hash(body.new_password).await?;
    let name = username.clone();
    app.audited(
        &caller.identity,
        caller.request_id(),
        "user.password",
        &username,
        move |tx, now| {
            auth::set_password(tx, &name, &new_hash, now)?;
            Ok(((), json!({})))
        },
    )
    .await?;
    if username == crate::depot::INITIAL_ADMIN {
        crate::depot::forget_initial_password(&app.config.data_dir);
    }
    Ok(audited_json(
        StatusCode::OK,
        &json!({"username": username, "password_changed": true}),
    ))
}

async fn list_tokens(
    _caller: Auth<Admin>,
    State(app): State<AppState>,
) -> Result<Response, ApiError> {
    let tokens = app.store.read(auth::list_tokens).await?;
    Ok(axum::Json(json!({"tokens": tokens})).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    role: Role,
}

#[derive(Serialize)]
struct CreatedToken {
    #[serde(flatten)]
    token: auth::ApiToken,
    /// Shown once; only its hash is kept.
    secret: String,
}

async fn create_token(
    caller: Auth<Admin>,
    State(app): State<AppState>,
    ApiJson(body): ApiJson<NewToken>,
) -> Result<Response, ApiError> {
    let created_by = caller.identity.actor.clone();
    let (name, role) = (body.name.clone(), body.role);
    let (token, secret) = app
        .audited(
            &caller.identity,
            caller.request_id(),
            "token.create",
            &body.name,
            move |tx, now| {
                let (token, secret) = auth::create_token(tx, &name, role, &created_by, now)?;
                let detail = json!({"token_id": token.id, "role": role});
                Ok(((token, secret), detail))
            },
        )
        .await?;
    Ok(audited_json(
        StatusCode::CREATED,
        &CreatedToken { token, secret },
    ))
}

async fn revoke_token(
    caller: Auth<Admin>,
    State(app): State<AppState>,
    Path(id): Path<i64>,
) -> Result<Response, ApiError> {
    let token = app
        .audited(
            &caller.identity,
            caller.request_id(),
            "token.revoke",
            &id.to_string(),
            move |tx, now| {
                let token = auth::revoke_token(tx, id, now)?;
                let name = token.name.clone();
                Ok((token, json!({"name": name})))
            },
        )
        .await?;
    Ok(audited_json(StatusCode::OK, &token))
}
