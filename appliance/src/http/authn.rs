//! Who is calling, and may they? Bearer tokens for scripts and machines, session cookies for
//! the panel (with a CSRF token for every change), role checks by extractor, and the audit
//! fallback that records any state-changing request a handler did not record itself.

use std::marker::PhantomData;

use axum::extract::{FromRequestParts, Request, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::AppState;
use super::error::{ApiError, AuditedMarker};
use super::observe::{RequestContext, RouteTemplate};
use crate::audit::{self, Outcome};
use crate::auth::{self, Role};
use crate::store::unix_ms;

pub const SESSION_COOKIE: &str = "atlasmesh_session";
pub const CSRF_HEADER: &str = "x-csrf-token";

#[derive(Clone, Debug)]
pub struct Identity {
    /// `user:NAME` or `token:NAME`, as written into the audit log.
    pub actor: String,
    pub role: Role,
    pub via: Via,
}

#[derive(Clone, Debug)]
pub enum Via {
    Token {
        id: i64,
    },
    Session {
        user_id: i64,
        username: String,
        csrf: String,
    },
}

/// Reads one cookie from the `Cookie` headers.
pub fn cookie<'a>(headers: &'a HeaderMap, name: &str) -> Option<&'a str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v)
}

fn is_safe(method: &Method) -> bool {
    matches!(*method, Method::GET | Method::HEAD | Method::OPTIONS)
}

/// Finds the caller from a bearer token or a session cookie. `Ok(None)`: no credentials at all.
pub async fn identify(app: &AppState, headers: &HeaderMap) -> Result<Option<Identity>, ApiError> {
    let now = unix_ms(app.clock.now());
    if let Some(value) = headers.get(header::AUTHORIZATION) {
        let value = value.to_str().unwrap_or("");
        let Some(token) = value.strip_prefix("Bearer ").map(str::trim) else {
            return Err(ApiError::unauthorized(
                "the Authorization header must be `Bearer <token>`",
            ));
        };
        let secret = token.to_owned();
        let found = app
            .store
            .read(move |c| auth::token_lookup(c, &secret))
            .await?;
        let Some(auth::TokenOwner {
            id,
            name,
            role,
            last_used_at: last_used,
        }) = found
        else {
            return Err(ApiError::unauthorized(
                "the bearer token is unknown or revoked",
            ));
        };
        // Remember use for credential hygiene, at most once a minute per token: a write per
        // request would make every read a write.
        if last_used.is_none_or(|t| now - t > 60_000) {
            let store = app.store.clone();
            tokio::spawn(async move {
                if let Err(e) = store.write(move |tx| auth::touch_token(tx, id, now)).await {
                    tracing::warn!(error = %e, "could not record token use");
                }
            });
        }
        return Ok(Some(Identity {
            actor: format!("token:{name}"),
            role,
            via: Via::Token { id },
        }));
    }
    if let Some(cookie) = cookie(headers, SESSION_COOKIE) {
        let cookie = cookie.to_owned();
        let session = app
            .store
            .read(move |c| auth::session_lookup(c, &cookie, now))
            .await?;
        if let Some(s) = session {
            return Ok(Some(Identity {
                actor: format!("user:{}", s.username),
                role: s.role,
                via: Via::Session {
                    user_id: s.user_id,
                    username: s.username,
                    csrf: s.csrf_token,
                },
            }));
        }
    }
    Ok(None)
}

fn unauthenticated(message: &str) -> Response {
    let mut response = ApiError::unauthorized(message).into_response();
    response.headers_mut().insert(
        header::WWW_AUTHENTICATE,
        HeaderValue::from_static("Bearer realm=\"atlasmesh\""),
    );
    response
}

/// Middleware over `/api/v1`: 401 without valid credentials, 403 for a session change without
/// its CSRF token, and an audit record for every state-changing request that reached a handler
/// which did not write one with its change.
pub async fn authenticate(
    State(app): State<AppState>,
    mut request: Request,
    next: Next,
) -> Response {
    let identity = match identify(&app, request.headers()).await {
        Ok(Some(identity)) => identity,
        Ok(None) => return unauthenticated("sign in or send `Authorization: Bearer <token>`"),
        Err(e) if e.status == StatusCode::UNAUTHORIZED => return unauthenticated(&e.message),
        Err(e) => return e.into_response(),
    };
    let request_id = request
        .extensions()
        .get::<RequestContext>()
        .map(|c| c.request_id.clone());
    let method = request.method().clone();
    // Inside the nested `/api/v1` router the URI has lost its prefix; audit the full path.
    let path = request
        .extensions()
        .get::<axum::extract::OriginalUri>()
        .map(|u| u.path().to_owned())
        .unwrap_or_else(|| request.uri().path().to_owned());

    if !is_safe(&method)
        && let Via::Session { csrf, .. } = &identity.via
    {
        let sent = request
            .headers()
            .get(CSRF_HEADER)
            .and_then(|v| v.to_str().ok());
        if !sent.is_some_and(|s| auth::secrets_equal(s, csrf)) {
            let err =
                ApiError::forbidden("missing or wrong X-CSRF-Token header for a signed-in change");
            app.audit_attempt(
                &identity,
                request_id.clone(),
                format!("{method} {path}"),
                Some(path),
                Outcome::Denied,
                json!({"reason": "csrf"}),
            )
            .await;
            return err.with_audited().into_response();
        }
    }

    request.extensions_mut().insert(identity.clone());
    let response = next.run(request).await;

    if !is_safe(&method) && response.extensions().get::<AuditedMarker>().is_none() {
        let status = response.status();
        // Requests whose body was never understood changed nothing and name no action.
        let unparsed = matches!(status.as_u16(), 400 | 408 | 413 | 415 | 422);
        if !unparsed {
            let route = response
                .extensions()
                .get::<RouteTemplate>()
                .map(|r| r.0.clone())
                .unwrap_or_else(|| path.clone());
            let outcome = if status.is_success() {
                Outcome::Ok
            } else if status == StatusCode::FORBIDDEN {
                Outcome::Denied
            } else {
                Outcome::Failed
            };
            app.audit_attempt(
                &identity,
                request_id,
                format!("{method} {route}"),
                Some(path),
                outcome,
                json!({"status": status.as_u16()}),
            )
            .await;
        }
    }
    response
}

/// A role requirement, declared by a handler's parameter type.
pub trait MinRole: Send + Sync + 'static {
    const ROLE: Role;
}
pub struct Viewer;
pub struct Technician;
pub struct Admin;
impl MinRole for Viewer {
    const ROLE: Role = Role::Viewer;
}
impl MinRole for Technician {
    const ROLE: Role = Role::Technician;
}
impl MinRole for Admin {
    const ROLE: Role = Role::Admin;
}

/// The authenticated caller, admitted only with at least role `R` (else 403).
pub struct Auth<R: MinRole> {
    pub identity: Identity,
    pub ctx: Option<RequestContext>,
    _role: PhantomData<R>,
}

impl<R: MinRole> Auth<R> {
    pub fn request_id(&self) -> Option<String> {
        self.ctx.as_ref().map(|c| c.request_id.clone())
    }
}

impl<S: Send + Sync, R: MinRole> FromRequestParts<S> for Auth<R> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let identity = parts.extensions.get::<Identity>().cloned().ok_or_else(|| {
            ApiError::unauthorized("sign in or send `Authorization: Bearer <token>`")
        })?;
        if identity.role < R::ROLE {
            return Err(ApiError::forbidden(format!(
                "this needs the {} role; {} has the {} role",
                R::ROLE,
                identity.actor,
                identity.role
            )));
        }
        Ok(Auth {
            identity,
            ctx: parts.extensions.get::<RequestContext>().cloned(),
            _role: PhantomData,
        })
    }
}

impl AppState {
    /// Writes a record for an attempt that changed nothing (denied or failed), or for a change
    /// the handler did not record. Failure to write is logged, not raised: the response stands.
    pub async fn audit_attempt(
        &self,
        identity: &Identity,
        request_id: Option<String>,
        action: String,
        target: Option<String>,
        outcome: Outcome,
        detail: serde_json::Value,
    ) {
        let entry = audit::Entry {
            actor: identity.actor.clone(),
            role: Some(identity.role),
            action,
            target,
            outcome,
            request_id,
            detail,
        };
        self.record_audit(entry).await;
    }

    pub async fn record_audit(&self, entry: audit::Entry) {
        let now = unix_ms(self.clock.now());
        let outcome = entry.outcome;
        match self
            .store
            .write(move |tx| audit::record(tx, &entry, now))
            .await
        {
            Ok(_) => {
                self.core
                    .metrics
                    .audit_records
                    .get_or_create(&outcome_label(outcome))
                    .inc();
            }
            Err(e) => tracing::error!(error = %e, "could not write audit record"),
        }
    }
}

pub fn outcome_label(outcome: Outcome) -> crate::metrics::OutcomeLabels {
    crate::metrics::OutcomeLabels {
        result: outcome.as_str().to_owned(),
    }
}
