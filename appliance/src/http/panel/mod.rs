//! The technicians' panel: server-rendered HTML (maud) with every asset compiled into the
//! binary, because depots are often offline. Pages work without JavaScript; the small script
//! only adds live values over server-sent events.
//!
//! Sign-in uses a session cookie (HttpOnly, SameSite=Strict, Secure under TLS). Every form that
//! changes something carries the session's CSRF token; the login form, which has no session
//! yet, uses a double-submit token instead.

pub(crate) mod assets;
mod pages;

use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{ConnectInfo, Form, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use futures_util::stream::{self, Stream};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::authn::{self, SESSION_COOKIE};
use super::observe::RequestId;
use crate::audit::{self, Outcome};
use crate::auth::{self, Role};
use crate::store::unix_ms;

const LOGIN_CSRF_COOKIE: &str = "atlasmesh_login_csrf";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/", get(pages::overview))
        .route("/ota", get(pages::ota))
        .route("/rollouts", get(pages::rollouts))
        .route("/vehicles", get(pages::vehicles))
        .route("/charging", get(pages::charging))
        .route("/disks", get(pages::disks))
        .route("/audit", get(pages::audit))
        .route("/account", get(pages::account))
        .route("/account/password", post(change_password))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/events", get(events))
        .route("/assets/{file}", get(assets::serve))
}

/// A signed-in panel user; pages that take one send everybody else to the sign-in page.
#[derive(Clone, Debug)]
pub struct PanelUser {
    pub username: String,
    pub role: Role,
    pub csrf: String,
    pub identity: authn::Identity,
}

pub struct ToLogin(String);

impl IntoResponse for ToLogin {
    fn into_response(self) -> Response {
        Redirect::to(&format!("/login?next={}", urlencode(&self.0))).into_response()
    }
}

fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

impl FromRequestParts<AppState> for PanelUser {
    type Rejection = ToLogin;

    async fn from_request_parts(
        parts: &mut Parts,
        app: &AppState,
    ) -> Result<Self, Self::Rejection> {
        let back = parts.uri.path().to_owned();
        let Some(cookie) = authn::cookie(&parts.headers, SESSION_COOKIE).map(str::to_owned) else {
            return Err(ToLogin(back));
        };
        let now = unix_ms(app.clock.now());
        match app
            .store
            .read(move |c| auth::session_lookup(c, &cookie, now))
            .await
        {
            Ok(Some(s)) => Ok(PanelUser {
                identity: authn::Identity {
                    actor: format!("user:{}", s.username),
                    role: s.role,
                    via: authn::Via::Session {
                        user_id: s.user_id,
                        username: s.username.clone(),
                        csrf: s.csrf_token.clone(),
                    },
                },
                username: s.username,
                role: s.role,
                csrf: s.csrf_token,
            }),
            Ok(None) => Err(ToLogin(back)),
            Err(e) => {
                tracing::error!(error = %e, "session lookup failed");
                Err(ToLogin(back))
            }
        }
    }
}

/// Only same-site paths, so the sign-in page cannot be used to bounce people elsewhere.
fn safe_next(next: Option<&str>) -> String {
    match next {
        Some(n) if n.starts_with('/') && !n.starts_with("//") && !n.contains('\\') => n.to_owned(),
        _ => "/".to_owned(),
    }
}

fn cookie_header(
    app: &AppState,
    name: &str,
    value: &str,
    max_age: Option<Duration>,
) -> HeaderValue {
    let secure = if app.config.tls.enabled {
        "; Secure"
    } else {
        ""
    };
    let age = match max_age {
        Some(d) => format!("; Max-Age={}", d.as_secs()),
        None => "; Max-Age=0".to_owned(),
    };
    HeaderValue::from_str(&format!(
        "{name}={value}; Path=/; HttpOnly; SameSite=Strict{age}{secure}"
    ))
    .expect("cookie values are base64url")
}

#[derive(Deserialize)]
struct LoginQuery {
    next: Option<String>,
}

async fn login_page(State(app): State<AppState>, Query(q): Query<LoginQuery>) -> Response {
    render_login(&app, &safe_next(q.next.as_deref()), None, StatusCode::OK)
}

fn render_login(app: &AppState, next: &str, error: Option<&str>, status: StatusCode) -> Response {
    let token = auth::new_secret("");
    let mut response = (status, pages::login(app, next, &token, error)).into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        cookie_header(
            app,
            LOGIN_CSRF_COOKIE,
            &token,
            Some(Duration::from_secs(3600)),
        ),
    );
    response
}

#[derive(Deserialize)]
struct LoginForm {
    username: String,
    password: String,
    csrf: String,
    next: Option<String>,
}

async fn login(
    State(app): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    RequestId(request_id): RequestId,
    headers: HeaderMap,
    Form(form): Form<LoginForm>,
) -> Response {
    let next = safe_next(form.next.as_deref());
    let cookie_token = authn::cookie(&headers, LOGIN_CSRF_COOKIE).unwrap_or("");
    if cookie_token.is_empty() || !auth::secrets_equal(cookie_token, &form.csrf) {
        return render_login(
            &app,
            &next,
            Some("The sign-in form expired. Please try again."),
            StatusCode::FORBIDDEN,
        );
    }
    let username = form.username.trim().to_owned();
    let ip_key = format!("ip:{}", peer.ip());
    let user_key = format!("user:{}", username.to_lowercase());
    let keys = [ip_key.as_str(), user_key.as_str()];
    if let Err(wait) = app.limiter.check(&keys, Instant::now()) {
        let message = format!(
            "Too many failed sign-ins. Try again in {} seconds.",
            wait.as_secs()
        );
        let mut response = render_login(&app, &next, Some(&message), StatusCode::TOO_MANY_REQUESTS);
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from(wait.as_secs()));
        return response;
    }

    let name = username.clone();
    let found = match app.store.read(move |c| auth::login_lookup(c, &name)).await {
        Ok(found) => found,
        Err(e) => {
            tracing::error!(error = %e, "login lookup failed");
            return render_login(
                &app,
                &next,
                Some("The depot could not check your sign-in."),
                StatusCode::INTERNAL_SERVER_ERROR,
            );
        }
    };
    let password = form.password;
    let hash = found
        .as_ref()
        .map(|(_, _, h)| h.clone())
        .unwrap_or_else(|| auth::dummy_hash().to_owned());
    let verified = tokio::task::spawn_blocking(move || auth::verify_password(&hash, &password))
        .await
        .unwrap_or(false);

    let valid_name = auth::validate_username(&username).is_ok();
    let actor = if valid_name {
        format!("user:{username}")
    } else {
        "anonymous".to_owned()
    };
    let (user_id, role) = match (found, verified) {
        (Some((id, role, _)), true) => (id, role),
        _ => {
            app.limiter.record_failure(&keys, Instant::now());
            app.core.metrics.login_failures.inc();
            tracing::warn!(user = %username, peer = %peer.ip(), "failed sign-in");
            app.record_audit(audit::Entry {
                actor,
                role: None,
                action: "session.login".into(),
                target: valid_name.then(|| username.clone()),
                outcome: Outcome::Denied,
                request_id: request_id.clone(),
                detail: json!({"peer": peer.ip().to_string()}),
            })
            .await;
            return render_login(
                &app,
                &next,
                Some("Wrong user name or password."),
                StatusCode::UNAUTHORIZED,
            );
        }
    };
    app.limiter.reset(&keys);

    let ttl = app.config.auth.session_ttl;
    let now = unix_ms(app.clock.now());
    let entry = audit::Entry {
        actor,
        role: Some(role),
        action: "session.login".into(),
        target: Some(username.clone()),
        outcome: Outcome::Ok,
        request_id,
        detail: json!({"peer": peer.ip().to_string()}),
    };
    let created = app
        .store
        .write(move |tx| {
            let session = auth::create_session(tx, user_id, now, ttl)?;
            audit::record(tx, &entry, now)?;
            Ok::<_, auth::AuthError>(session)
        })
        .await;
    match created {
        Ok((cookie, _csrf)) => {
            tracing::info!(user = %username, "signed in");
            let mut response = Redirect::to(&next).into_response();
            let headers = response.headers_mut();
            headers.append(
                header::SET_COOKIE,
                cookie_header(&app, SESSION_COOKIE, &cookie, Some(ttl)),
            );
            headers.append(
                header::SET_COOKIE,
                cookie_header(&app, LOGIN_CSRF_COOKIE, "", None),
            );
            response
        }
        Err(e) => {
            tracing::error!(error = %e, "could not open a session");
            render_login(
                &app,
                &next,
                Some("The depot could not open a session."),
                StatusCode::INTERNAL_SERVER_ERROR,
            )
        }
    }
}

#[derive(Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn logout(
    State(app): State<AppState>,
    user: PanelUser,
    RequestId(request_id): RequestId,
    headers: HeaderMap,
    Form(form): Form<CsrfForm>,
) -> Response {
    if !auth::secrets_equal(&form.csrf, &user.csrf) {
        app.audit_attempt(
            &user.identity,
            request_id.clone(),
            "session.logout".into(),
            Some(user.username.clone()),
            Outcome::Denied,
            json!({"reason": "csrf"}),
        )
        .await;
        return (
            StatusCode::FORBIDDEN,
            "the form's CSRF token is missing or wrong",
        )
            .into_response();
    }
    if let Some(cookie) = authn::cookie(&headers, SESSION_COOKIE).map(str::to_owned) {
        let now = unix_ms(app.clock.now());
        let entry = audit::Entry {
            actor: user.identity.actor.clone(),
            role: Some(user.role),
            action: "session.logout".into(),
            target: Some(user.username.clone()),
            outcome: Outcome::Ok,
            request_id,
            detail: json!({}),
        };
        let result = app
            .store
            .write(move |tx| {
                auth::delete_session(tx, &cookie)?;
                audit::record(tx, &entry, now)?;
                Ok::<_, auth::AuthError>(())
            })
            .await;
        if let Err(e) = result {
            tracing::error!(error = %e, "could not end session");
        }
    }
    let mut response = Redirect::to("/login").into_response();
    response.headers_mut().append(
        header::SET_COOKIE,
        cookie_header(&app, SESSION_COOKIE, "", None),
    );
    response
}

#[derive(Deserialize)]
struct PasswordForm {
    csrf: String,
    current_password: String,
    new_password: String,
    confirm_password: String,
}

async fn change_password(
    State(app): State<AppState>,
    user: PanelUser,
    RequestId(request_id): RequestId,
    Form(form): Form<PasswordForm>,
) -> Response {
    if !auth::secrets_equal(&form.csrf, &user.csrf) {
        app.audit_attempt(
            &user.identity,
            request_id.clone(),
            "user.password".into(),
            Some(user.username.clone()),
            Outcome::Denied,
            json!({"reason": "csrf"}),
        )
        .await;
        return (
            StatusCode::FORBIDDEN,
            "the form's CSRF token is missing or wrong",
        )
            .into_response();
    }
    let fail = |msg: &str, status| {
        (status, pages::account_page(&app, &user, Some(msg), None)).into_response()
    };
    if form.new_password != form.confirm_password {
        return fail(
            "The new passwords do not match.",
            StatusCode::UNPROCESSABLE_ENTITY,
        );
    }
    if let Err(e) = auth::validate_password(&form.new_password) {
        return fail(&e.to_string(), StatusCode::UNPROCESSABLE_ENTITY);
    }
    let name = user.username.clone();
    let current_hash = match app.store.read(move |c| auth::login_lookup(c, &name)).await {
        Ok(found) => found.map(|(_, _, h)| h).unwrap_or_default(),
        Err(e) => {
            return fail(
                &format!("The depot could not check your password: {e}"),
                StatusCode::INTERNAL_SERVER_ERROR,
            );
        }
    };
    let (current, new) = (form.current_password, form.new_password);
    let hashed = tokio::task::spawn_blocking(move || {
        if auth::verify_password(&current_hash, &current) {
            auth::hash_password(&new).map(Some)
        } else {
            Ok(None)
        }
    })
    .await;
    let new_hash = match hashed {
        Ok(Ok(Some(h))) => h,
        Ok(Ok(None)) => {
            app.audit_attempt(
                &user.identity,
                request_id.clone(),
                "user.password".into(),
                Some(user.username.clone()),
                Outcome::Denied,
                json!({"reason": "wrong current password"}),
            )
            .await;
            return fail("The current password is wrong.", StatusCode::FORBIDDEN);
        }
        _ => {
            return fail(
                "The depot could not hash the new password.",
                StatusCode::INTERNAL_SERVER_ERROR,
            );
        }
    };
    let name = user.username.clone();
    let result = app
        .audited(
            &user.identity,
            request_id,
            "user.password",
            &user.username,
            move |tx, now| {
                auth::set_password(tx, &name, &new_hash, now)?;
                Ok(((), json!({"via": "panel"})))
            },
        )
        .await;
    match result {
        Ok(()) => {
            if user.username == crate::depot::INITIAL_ADMIN {
                crate::depot::forget_initial_password(&app.config.data_dir);
            }
            // Changing the password ended every session, this one included.
            let mut response = Redirect::to("/login").into_response();
            response.headers_mut().append(
                header::SET_COOKIE,
                cookie_header(&app, SESSION_COOKIE, "", None),
            );
            response
        }
        Err(e) => fail(&e.message, e.status),
    }
}

/// Live values for open panels. Ends when the depot shuts down, so open panels never hold up
/// a graceful shutdown.
async fn events(
    State(app): State<AppState>,
    _user: PanelUser,
) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    struct Feed {
        app: AppState,
        system: tokio::sync::watch::Receiver<crate::sysstat::SystemSnapshot>,
        events: tokio::sync::broadcast::Receiver<super::PanelEvent>,
        first: bool,
    }
    let feed = Feed {
        system: app.core.system.clone(),
        events: app.events.subscribe(),
        app,
        first: true,
    };
    let stream = stream::unfold(feed, |mut feed| async move {
        let system_event = |feed: &Feed| {
            let snapshot = feed.system.borrow().clone();
            let data =
                json!({"system": snapshot, "uptime_seconds": feed.app.core.uptime_seconds()});
            Event::default().event("system").data(data.to_string())
        };
        if feed.first {
            feed.first = false;
            let event = system_event(&feed);
            return Some((Ok(event), feed));
        }
        loop {
            tokio::select! {
                _ = feed.app.core.shutdown.cancelled() => return None,
                changed = feed.system.changed() => {
                    if changed.is_err() { return None; }
                    let event = system_event(&feed);
                    return Some((Ok(event), feed));
                }
                received = feed.events.recv() => match received {
                    Ok(ev) => {
                        let event = Event::default().event(ev.kind).data(ev.data.to_string());
                        return Some((Ok(event), feed));
                    }
                    // A slow panel missed some events; it will catch up from the next ones.
                    Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                    Err(tokio::sync::broadcast::error::RecvError::Closed) => return None,
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
