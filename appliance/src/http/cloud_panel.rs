//! The fleet panel of `atlasmesh cloud`: every depot with its link, last contact, health,
//! version and sync state, server-rendered (maud) with the depot panel's embedded assets.
//!
//! Sign-in is with a fleet API token (viewer or above), kept in an HttpOnly, SameSite=Strict
//! cookie (Secure under TLS). The panel only reads; changes go through the fleet API.

use axum::Router;
use axum::extract::{Form, FromRef, State};
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use maud::{DOCTYPE, Markup, html};
use serde::Deserialize;

use atlasmesh_cloud_sync::token::hash_secret;

use super::cloud_api::CloudApp;
use super::panel::assets;

const COOKIE: &str = "atlasmesh_fleet";

/// Under TLS the cookie is marked Secure.
#[derive(Clone, Copy)]
pub struct PanelTls(pub bool);

pub fn routes<S>() -> Router<S>
where
    S: Clone + Send + Sync + 'static,
    CloudApp: FromRef<S>,
    PanelTls: FromRef<S>,
{
    Router::new()
        .route("/", get(depots))
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
        .route("/assets/{file}", get(assets::serve))
}

fn page(title: &str, body: Markup) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                title { (title) " · AtlasMesh fleet" }
                link rel="icon" href=(assets::url("favicon.svg")) type="image/svg+xml";
                link rel="stylesheet" href=(assets::url("app.css"));
            }
            body {
                header.topbar {
                    a.brand href="/" {
                        img src=(assets::url("favicon.svg")) alt="" width="28" height="28";
                        span { "AtlasMesh fleet" }
                    }
                }
                main { h1 { (title) } (body) }
            }
        }
    }
}

fn token_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value.to_owned())
}

async fn depots(State(app): State<CloudApp>, headers: HeaderMap) -> Response {
    let Some(token) = token_of(&headers) else {
        return Redirect::to("/login").into_response();
    };
    match app.store.api_token(&hash_secret(&token)).await {
        Ok(Some(_)) => {}
        Ok(None) => return Redirect::to("/login").into_response(),
        Err(e) => return super::error::ApiError::internal(e).into_response(),
    }
    let depots = match app.store.depots().await {
        Ok(d) => d,
        Err(e) => return super::error::ApiError::internal(e).into_response(),
    };
    let mut rows = Vec::with_capacity(depots.len());
    for d in depots {
        // A depot that never reported shows its health as unknown rather than failing the page.
        let summary = app.summary(&d.id).await.ok().filter(|s| !s.is_null());
        let online = app.is_online(&d);
        rows.push((d, summary, online));
    }
    let body = html! {
        @if rows.is_empty() {
            p.muted { "No depots yet: mint an enrolment token with "
                code { "atlasmesh cloud enroll-token --depot NAME" } "." }
        } @else {
            table.data data-depots {
                thead { tr {
                    th { "Depot" } th { "Link" } th { "Last seen" } th { "Health" }
                    th { "Version" } th { "Desired state" } th { "Events" }
                } }
                tbody {
                    @for (d, summary, online) in &rows {
                        @let health = summary.as_ref().and_then(|s| s["health"].as_str()).unwrap_or("unknown");
                        tr data-depot=(d.name) {
                            td { strong { (d.name) } br; code.muted { (d.id) } }
                            td {
                                @if d.revoked_ms.is_some() { span.pill.crit { "revoked" } }
                                @else if d.enrolled_ms.is_none() { span.pill.idle { "not enrolled" } }
                                @else if *online { span.pill.ok { "online" } }
                                @else { span.pill.warn { "offline" } }
                            }
                            td { @if let Some(s) = d.last_seen_ms { (crate::audit::rfc3339(s)) } @else { "never" } }
                            td {
                                span.pill.(if health == "healthy" { "ok" } else if health == "unknown" { "idle" } else { "warn" }) { (health) }
                                @if let Some(reasons) = summary.as_ref().and_then(|s| s["reasons"].as_array()) {
                                    @for r in reasons { br; span.muted { (r.as_str().unwrap_or_default()) } }
                                }
                            }
                            td { (d.software_version.as_deref().unwrap_or("")) }
                            td {
                                "revision " (d.acked_revision) " of " (d.desired_revision)
                                @if let Some(reason) = &d.refused_reason {
                                    br; span.pill.crit { "refused " (d.refused_revision.unwrap_or(0)) } " " (reason)
                                }
                            }
                            td {
                                (d.events_stored)
                                @if d.outbox_dropped_total > 0 {
                                    br; span.pill.warn { (d.outbox_dropped_total) " dropped at the depot" }
                                }
                            }
                        }
                    }
                }
            }
        }
        form method="post" action="/logout" { button.link type="submit" { "Sign out" } }
    };
    page("Depots", body).into_response()
}

async fn login_page() -> Markup {
    page(
        "Sign in",
        html! {
            form.stack method="post" action="/login" {
                label { "Fleet API token" input type="password" name="token" autocomplete="off" required; }
                p.muted { "From " code { "atlasmesh cloud token --role viewer" } "." }
                button type="submit" { "Sign in" }
            }
        },
    )
}

#[derive(Deserialize)]
struct LoginForm {
    token: String,
}

fn cookie(value: &str, max_age: u64, tls: bool) -> HeaderValue {
    let secure = if tls { "; Secure" } else { "" };
    HeaderValue::from_str(&format!(
        "{COOKIE}={value}; Path=/; HttpOnly; SameSite=Strict; Max-Age={max_age}{secure}"
    ))
    .unwrap_or_else(|_| HeaderValue::from_static("atlasmesh_fleet=; Max-Age=0"))
}

async fn login(
    State(app): State<CloudApp>,
    State(PanelTls(tls)): State<PanelTls>,
    Form(form): Form<LoginForm>,
) -> Response {
    let token = form.token.trim();
    let valid = !token.is_empty()
        && token.bytes().all(|b| b.is_ascii_hexdigit())
        && matches!(app.store.api_token(&hash_secret(token)).await, Ok(Some(_)));
    if !valid {
        let body = page(
            "Sign in",
            html! {
                div.banner.crit role="alert" { "Unknown or revoked token." }
                p { a href="/login" { "Try again" } }
            },
        );
        return (axum::http::StatusCode::UNAUTHORIZED, body).into_response();
    }
    let mut response = Redirect::to("/").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, cookie(token, 12 * 3600, tls));
    response
}

async fn logout(State(PanelTls(tls)): State<PanelTls>) -> Response {
    let mut response = Redirect::to("/login").into_response();
    response
        .headers_mut()
        .insert(header::SET_COOKIE, cookie("", 0, tls));
    response
}
