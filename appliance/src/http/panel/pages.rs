//! The panel's pages. Each renders complete HTML on the server; `data-live` attributes name the
//! values the script keeps current.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::{PanelUser, assets};
use crate::audit;
use crate::auth::Role;
use crate::http::AppState;
use crate::sysstat::SystemSnapshot;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum PageKind {
    Overview,
    Ota,
    Rollouts,
    Vehicles,
    Charging,
    Disks,
    Audit,
    Account,
}

impl PageKind {
    fn title(self) -> &'static str {
        match self {
            PageKind::Overview => "Overview",
            PageKind::Ota => "OTA images",
            PageKind::Rollouts => "Rollouts",
            PageKind::Vehicles => "Vehicles",
            PageKind::Charging => "Charging",
            PageKind::Disks => "Disks",
            PageKind::Audit => "Audit log",
            PageKind::Account => "Account",
        }
    }
}

const NAV: &[(PageKind, &str, &str)] = &[
    (PageKind::Overview, "/", "Overview"),
    (PageKind::Ota, "/ota", "OTA"),
    (PageKind::Rollouts, "/rollouts", "Rollouts"),
    (PageKind::Vehicles, "/vehicles", "Vehicles"),
    (PageKind::Charging, "/charging", "Charging"),
    (PageKind::Disks, "/disks", "Disks"),
    (PageKind::Audit, "/audit", "Audit"),
];

fn head(title: &str) -> Markup {
    html! {
        head {
            meta charset="utf-8";
            meta name="viewport" content="width=device-width, initial-scale=1";
            title { (title) " · AtlasMesh" }
            link rel="icon" href=(assets::url("favicon.svg")) type="image/svg+xml";
            link rel="stylesheet" href=(assets::url("app.css"));
            script src=(assets::url("app.js")) defer {}
        }
    }
}

/// The page frame: top bar, navigation, and the page's content.
fn layout(app: &AppState, user: &PanelUser, page: PageKind, content: Markup) -> Markup {
    let initial_password =
        crate::depot::initial_password_pending(&app.config.data_dir) && user.role == Role::Admin;
    html! {
        (DOCTYPE)
        html lang="en" {
            (head(page.title()))
            body {
                header.topbar {
                    a.brand href="/" {
                        img src=(assets::url("favicon.svg")) alt="" width="28" height="28";
                        span { "AtlasMesh" }
                    }
                    div.depot {
                        span.depot-name { (app.depot_name) }
                        span.depot-id { (app.depot_id) }
                    }
                    div.session {
                        span.live-indicator data-live-indicator title="Live updates" { "live" }
                        a.user href="/account" { (user.username) " " span.role { (user.role) } }
                        form method="post" action="/logout" {
                            input type="hidden" name="csrf" value=(user.csrf);
                            button.link type="submit" { "Sign out" }
                        }
                    }
                }
                div.frame {
                    nav.sidebar aria-label="Sections" {
                        @for (kind, href, label) in NAV {
                            a href=(href) class=@if *kind == page { "active" } aria-current=[(*kind == page).then_some("page")] { (label) }
                        }
                    }
                    main {
                        @if initial_password {
                            div.banner.warn role="alert" {
                                strong { "The initial admin password is still in use. " }
                                a href="/account" { "Change it now" }
                                " — it is stored in plain text in the data directory until you do."
                            }
                        }
                        h1 { (page.title()) }
                        (content)
                    }
                }
                meta name="csrf-token" content=(user.csrf);
            }
        }
    }
}

fn bytes(n: u64) -> String {
    const UNITS: &[&str] = &["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = n as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit < UNITS.len() - 1 {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{n} B")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

fn duration(secs: u64) -> String {
    let (d, h, m, s) = (secs / 86_400, secs / 3600 % 24, secs / 60 % 60, secs % 60);
    if d > 0 {
        format!("{d}d {h}h {m}m")
    } else if h > 0 {
        format!("{h}h {m}m")
    } else {
        format!("{m}m {s}s")
    }
}

fn percent(part: u64, whole: u64) -> f64 {
    if whole == 0 {
        0.0
    } else {
        part as f64 * 100.0 / whole as f64
    }
}

fn meter(value_pct: f64, live: &str) -> Markup {
    let level = if value_pct >= 90.0 {
        "crit"
    } else if value_pct >= 75.0 {
        "warn"
    } else {
        "ok"
    };
    html! {
        div.meter data-live-meter=(live) data-level=(level) {
            div.fill style=(format!("width:{:.1}%", value_pct.clamp(0.0, 100.0))) {}
        }
    }
}

pub async fn overview(user: PanelUser, State(app): State<AppState>) -> Markup {
    let snap: SystemSnapshot = app.core.system.borrow().clone();
    let mem_pct = percent(snap.memory_used_bytes, snap.memory_total_bytes);
    let content = html! {
        section.cards {
            div.card {
                h2 { "Depot" }
                p.big { (app.depot_name) }
                dl {
                    dt { "Depot id" } dd { code { (app.depot_id) } }
                    dt { "Version" } dd { (env!("CARGO_PKG_VERSION")) }
                    dt { "Uptime" } dd data-live="uptime" { (duration(app.core.uptime_seconds())) }
                }
            }
            div.card {
                h2 { "CPU" }
                p.big { span data-live="cpu" { (format!("{:.0}", snap.cpu_percent)) } " %" }
                (meter(f64::from(snap.cpu_percent), "cpu"))
                p.muted {
                    (snap.cpu_count) " cores · load "
                    span data-live="load" { (format!("{:.2} {:.2} {:.2}", snap.load_average[0], snap.load_average[1], snap.load_average[2])) }
                }
            }
            div.card {
                h2 { "Memory" }
                p.big { span data-live="mem-pct" { (format!("{mem_pct:.0}")) } " %" }
                (meter(mem_pct, "mem"))
                p.muted {
                    span data-live="mem" { (bytes(snap.memory_used_bytes)) " of " (bytes(snap.memory_total_bytes)) }
                    " · depot process "
                    span data-live="rss" { (bytes(snap.process_rss_bytes)) }
                }
            }
            div.card {
                h2 { "Data filesystem" }
                @if let Some(fs) = &snap.data_fs {
                    @let used = fs.total_bytes.saturating_sub(fs.available_bytes);
                    @let pct = percent(used, fs.total_bytes);
                    p.big { span data-live="fs-pct" { (format!("{pct:.0}")) } " %" }
                    (meter(pct, "fs"))
                    p.muted {
                        span data-live="fs" { (bytes(fs.available_bytes)) " free of " (bytes(fs.total_bytes)) }
                        " · " code { (fs.mount_point) }
                    }
                } @else {
                    p.muted { "The filesystem holding " code { (app.config.data_dir.display()) } " could not be identified." }
                }
            }
        }
        section.card.wide {
            h2 { "Depot components" }
            p.muted { "What this depot runs today. Sections arrive as their work lands; none shows data it does not have." }
            table.plain {
                tbody {
                    tr { td { "Store" } td { span.pill.ok { "running" } } td.muted { "SQLite, WAL, synchronous=FULL" } }
                    tr { td { "Panel and API" } td { span.pill.ok { "running" } } td.muted { "roles, audit, live updates" } }
                    tr { td { "Image cache (OTA)" } td { span.pill.idle { "not yet" } } td.muted { "arrives with OTA staging" } }
                    tr { td { "Vehicle link (MQTT)" } td { span.pill.idle { "not yet" } } td.muted { "arrives with the vehicle link" } }
                    tr { td { "Canary controller" } td { span.pill.idle { "not yet" } } td.muted { "arrives with canary waves" } }
                    tr { td { "Charging optimizer" } td { span.pill.idle { "not yet" } } td.muted { "arrives with charging" } }
                    tr { td { "Disk health (SMART)" } td { span.pill.idle { "not yet" } } td.muted { "arrives with disk health" } }
                }
            }
        }
    };
    layout(&app, &user, PageKind::Overview, content)
}

/// Sections whose subsystem has not been built yet say so plainly.
pub async fn pending(user: PanelUser, State(app): State<AppState>, kind: PageKind) -> Markup {
    let (what, when) = match kind {
        PageKind::Ota => (
            "Staged OTA images, their signatures, validation and the depot's upload limit",
            "OTA staging",
        ),
        PageKind::Rollouts => (
            "Canary waves with their gates, decisions and rollbacks",
            "canary waves",
        ),
        PageKind::Vehicles => (
            "Docked vehicles, bays, charge state and OTA progress",
            "the vehicle link",
        ),
        PageKind::Charging => (
            "Chargers, the site limit and tonight's charging plan",
            "charging",
        ),
        PageKind::Disks => (
            "SMART health, history and self-tests of the depot's own disks",
            "disk health",
        ),
        _ => ("This section", "a later release"),
    };
    let content = html! {
        section.card.empty {
            p.big { "Not available on this depot yet" }
            p { (what) " will appear here. This part of the depot arrives with " strong { (when) } "; until then nothing is tracked, so nothing is shown." }
        }
    };
    layout(&app, &user, kind, content)
}

pub async fn audit(
    user: PanelUser,
    State(app): State<AppState>,
    Query(query): Query<audit::Query>,
) -> Response {
    if user.role < Role::Admin {
        let content = html! {
            section.card.empty {
                p.big { "Admins only" }
                p { "The audit log is visible to admins. You are signed in as " (user.role) "." }
            }
        };
        return (
            StatusCode::FORBIDDEN,
            layout(&app, &user, PageKind::Audit, content),
        )
            .into_response();
    }
    let q = audit::Query {
        limit: Some(query.limit.unwrap_or(100).min(500)),
        ..query
    };
    let records = match app.store.read(move |c| audit::list(c, &q)).await {
        Ok(r) => r,
        Err(e) => {
            tracing::error!(error = %e, "reading audit log");
            Vec::new()
        }
    };
    let older = records.last().map(|r| r.id);
    let content = html! {
        section.card.wide {
            p.muted { "Every change made through the panel, the API or the command line, newest first." }
            div.table-scroll {
                table.data {
                    thead { tr { th { "Time (UTC)" } th { "Who" } th { "Role" } th { "Action" } th { "Target" } th { "Result" } th { "Request" } } }
                    tbody {
                        @for r in &records {
                            tr {
                                td.nowrap { (r.at.replace('T', " ").trim_end_matches('Z')) }
                                td { (r.actor) }
                                td { (r.role.as_deref().unwrap_or("")) }
                                td { code { (r.action) } }
                                td { (r.target.as_deref().unwrap_or("")) }
                                td { span class=(format!("pill {}", if r.result == "ok" { "ok" } else if r.result == "denied" { "warn" } else { "crit" })) { (r.result) } }
                                td.muted { code { (r.request_id.as_deref().unwrap_or("")) } }
                            }
                        }
                        @if records.is_empty() {
                            tr { td colspan="7" .muted { "No records." } }
                        }
                    }
                }
            }
            @if let Some(before) = older {
                @if records.len() >= 100 {
                    p { a href=(format!("/audit?before={before}")) { "Older records →" } }
                }
            }
        }
    };
    layout(&app, &user, PageKind::Audit, content).into_response()
}

pub async fn account(user: PanelUser, State(app): State<AppState>) -> Markup {
    account_page(&app, &user, None, None)
}

pub fn account_page(
    app: &AppState,
    user: &PanelUser,
    error: Option<&str>,
    notice: Option<&str>,
) -> Markup {
    let content = html! {
        section.card.narrow {
            h2 { "Signed in as " (user.username) }
            p.muted { "Role: " (user.role) }
            @if let Some(e) = error { div.banner.crit role="alert" { (e) } }
            @if let Some(n) = notice { div.banner.ok role="status" { (n) } }
            form.stack method="post" action="/account/password" {
                input type="hidden" name="csrf" value=(user.csrf);
                label { "Current password" input type="password" name="current_password" autocomplete="current-password" required; }
                label { "New password (at least " (crate::auth::MIN_PASSWORD_LEN) " characters)" input type="password" name="new_password" autocomplete="new-password" minlength=(crate::auth::MIN_PASSWORD_LEN) required; }
                label { "New password again" input type="password" name="confirm_password" autocomplete="new-password" required; }
                button.primary type="submit" { "Change password" }
                p.muted { "Changing your password signs you out everywhere." }
            }
        }
    };
    layout(app, user, PageKind::Account, content)
}

pub fn login(app: &AppState, next: &str, csrf: &str, error: Option<&str>) -> Markup {
    html! {
        (DOCTYPE)
        html lang="en" {
            (head("Sign in"))
            body.login {
                main.login-box {
                    div.login-brand {
                        img src=(assets::url("favicon.svg")) alt="" width="40" height="40";
                        div {
                            div.brand-name { "AtlasMesh" }
                            div.muted { (app.depot_name) " · " code { (app.depot_id) } }
                        }
                    }
                    @if let Some(e) = error { div.banner.crit role="alert" { (e) } }
                    form.stack method="post" action="/login" {
                        input type="hidden" name="csrf" value=(csrf);
                        input type="hidden" name="next" value=(next);
                        label { "User name" input type="text" name="username" autocomplete="username" autofocus required; }
                        label { "Password" input type="password" name="password" autocomplete="current-password" required; }
                        button.primary type="submit" { "Sign in" }
                    }
                    p.muted.small {
                        "First start? The admin password is in "
                        code { "initial-admin-password" }
                        " in the depot's data directory."
                    }
                    (PreEscaped("<noscript><p class=\"muted small\">The panel works without JavaScript; live values need it.</p></noscript>"))
                }
            }
        }
    }
}
