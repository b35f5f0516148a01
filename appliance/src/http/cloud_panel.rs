//! The fleet panel of `atlasmesh cloud`: every depot with its link, last contact, health,
//! version and sync state; the releases in the image repository; fleet rollouts with their
//! phases, each depot's part and the fleet gate. Server-rendered (maud) with the depot
//! panel's embedded assets.
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
        .route("/releases", get(releases))
        .route("/fleet-rollouts", get(fleet_rollouts))
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
                    nav aria-label="Sections" {
                        a href="/" { "Depots" } " · "
                        a href="/releases" { "Releases" } " · "
                        a href="/fleet-rollouts" { "Fleet rollouts" }
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

/// `Err` is the answer for a caller without a valid token: the sign-in page.
async fn signed_in(app: &CloudApp, headers: &HeaderMap) -> Result<(), Response> {
    let Some(token) = token_of(headers) else {
        return Err(Redirect::to("/login").into_response());
    };
    match app.store.api_token(&hash_secret(&token)).await {
        Ok(Some(_)) => Ok(()),
        Ok(None) => Err(Redirect::to("/login").into_response()),
        Err(e) => Err(super::error::ApiError::internal(e).into_response()),
    }
}

async fn releases(State(app): State<CloudApp>, headers: HeaderMap) -> Response {
    if let Err(r) = signed_in(&app, &headers).await {
        return r;
    }
    let releases = match app.repository.releases() {
        Ok(r) => r,
        Err(e) => return super::error::ApiError::internal(e).into_response(),
    };
    let status = app.repository.status();
    let body = html! {
        p.muted {
            "Snapshot v" (status["snapshot_version"]) ", timestamp v" (status["timestamp_version"])
            @if let Some(t) = status["timestamp_expires"].as_str() { " (expires " (t) ")" }
            @if status["online_keys"] != true { " · " span.pill.warn { "no online keys: run atlasmesh cloud repository" } }
        }
        @if releases.is_empty() {
            p.muted { "No releases yet: upload a release bundle with " code { "POST /api/v1/releases" } "." }
        } @else {
            table.data data-releases {
                thead { tr { th { "Hardware" } th { "Version" } th { "Size" } th { "Chunks" } th { "SHA-256" } th { "Released" } } }
                tbody {
                    @for r in &releases {
                        tr data-release=(format!("{}/{}", r.hardware_id, r.version)) {
                            td { (r.hardware_id) } td { strong { (r.version) } }
                            td { (format!("{:.1} MiB", r.length as f64 / 1048576.0)) }
                            td { (r.chunks) }
                            td { code { (&r.sha256[..16.min(r.sha256.len())]) "…" } }
                            td { (r.released_at.as_deref().unwrap_or("")) }
                        }
                    }
                }
            }
        }
    };
    page("Releases", body).into_response()
}

fn state_pill(state: &str) -> &'static str {
    match state {
        "completed" | "running" => "ok",
        "halted" | "failed" | "rolled_back" => "crit",
        "paused" | "waiting" => "warn",
        _ => "idle",
    }
}

async fn fleet_rollouts(State(app): State<CloudApp>, headers: HeaderMap) -> Response {
    if let Err(r) = signed_in(&app, &headers).await {
        return r;
    }
    let rollouts = match app.fleet.list().await {
        Ok(r) => r,
        Err(e) => return super::error::ApiError::internal(e).into_response(),
    };
    let text = |v: &serde_json::Value| v.as_str().unwrap_or_default().to_owned();
    let body = html! {
        @if rollouts.is_empty() {
            p.muted { "No fleet rollouts yet: start one with " code { "POST /api/v1/fleet-rollouts" } "." }
        }
        @for r in &rollouts {
            @let status = text(&r["status"]);
            section.card data-fleet-rollout=(text(&r["id"])) {
                h2 {
                    (text(&r["hardware_id"])) " " (text(&r["version"])) " "
                    span.pill.(state_pill(&status)) { (status) }
                    " " code.muted { (text(&r["id"])) }
                }
                @if let Some(reason) = r["reason"].as_str() {
                    div.banner.(if status == "halted" { "crit" } else { "warn" }) role="status" { (reason) }
                }
                p.muted {
                    "Fleet gate: " (r["gate"]["verdict"].as_str().unwrap_or("")) " · "
                    (r["gate"]["tally"]["successes"]) " succeeded, "
                    (r["gate"]["tally"]["failures"]) " failed, "
                    (r["gate"]["tally"]["silent"]) " silent, "
                    (r["gate"]["tally"]["pending"]) " pending · threshold "
                    (r["gate"]["threshold"]) " at " (r["gate"]["confidence"]) " confidence · soak "
                    (r["soak_seconds"]) " s between phases"
                }
                table.data {
                    thead { tr { th { "Phase" } th { "Depot" } th { "Told" } th { "State" } th { "Succeeded" } th { "Failed" } th { "Pending" } } }
                    tbody {
                        @for d in r["depots"].as_array().into_iter().flatten() {
                            @let state = text(&d["state"]);
                            tr data-depot=(text(&d["name"])) {
                                td { (text(&d["phase"])) } td { strong { (text(&d["name"])) } }
                                td { (d["action"].as_str().unwrap_or("not yet")) }
                                td {
                                    span.pill.(state_pill(&state)) { (state) }
                                    @if let Some(why) = d["reason"].as_str() { br; span.muted { (why) } }
                                }
                                td { (d["tally"]["successes"]) }
                                td { (d["tally"]["failures"].as_u64().unwrap_or(0) + d["tally"]["silent"].as_u64().unwrap_or(0)) }
                                td { (d["tally"]["pending"]) }
                            }
                        }
                    }
                }
            }
        }
    };
    page("Fleet rollouts", body).into_response()
}

async fn depots(State(app): State<CloudApp>, headers: HeaderMap) -> Response {
    if let Err(r) = signed_in(&app, &headers).await {
        return r;
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
