//! The panel's pages. Each renders complete HTML on the server; `data-live` attributes name the
//! values the script keeps current.

use axum::extract::{Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use maud::{DOCTYPE, Markup, PreEscaped, html};

use super::{PanelUser, assets};
use crate::audit;
use crate::auth::Role;
use crate::disks::verdict::Sample;
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
    let staging_held = app.disks.snapshot().store_problem();
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
                        @if let Some(why) = &staging_held {
                            div.banner.crit role="alert" data-disk-banner {
                                strong { "Staging new images is held. " }
                                (why) ". "
                                a href="/disks" { "See the disks" }
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

/// One bay tile; app.js renders the same markup from the live `bays` event.
fn bay_tile(b: &crate::link::db::BayView) -> Markup {
    html! {
        div.bay data-state=(if b.vehicle.is_some() { "occupied" } else { "free" }) {
            div.bay-name { (b.bay) }
            @if let Some(v) = &b.vehicle {
                div.bay-vehicle { a href=(format!("/vehicles#{v}")) { (v) } }
                div.muted {
                    (b.soc_percent.map(|s| format!("{s:.0} %")).unwrap_or_else(|| "—".into()))
                    @if b.plugged_in == Some(true) { " · charging" }
                    @if b.online == Some(false) { " · offline" }
                }
            } @else {
                div.muted { "free" }
            }
        }
    }
}

fn bay_board(bays: &[crate::link::db::BayView]) -> Markup {
    let occupied = bays.iter().filter(|b| b.vehicle.is_some()).count();
    html! {
        section.card.wide {
            h2 { "Bays" }
            p.muted data-live="bay-summary" { (occupied) " of " (bays.len()) " bays occupied" }
            @if bays.is_empty() {
                p.muted data-bay-board-empty { "No vehicle has docked at this depot yet." }
            }
            div.bays data-bay-board {
                @for b in bays { (bay_tile(b)) }
            }
        }
    }
}

pub async fn overview(user: PanelUser, State(app): State<AppState>) -> Markup {
    let bays = app
        .store
        .read(crate::link::db::bays)
        .await
        .unwrap_or_default();
    let snap: SystemSnapshot = app.core.system.borrow().clone();
    let mem_pct = percent(snap.memory_used_bytes, snap.memory_total_bytes);
    let link = app.cloud_link.view();
    let outbox = app.cloud_link.outbox().await.ok();
    let content = html! {
        @if let Some(o) = outbox.as_ref().filter(|o| o.dropped_total > 0) {
            div.banner.warn role="alert" data-outbox-dropped {
                strong { "The cloud outbox dropped " (o.dropped_total) " events. " }
                "While the link was down it reached its bound ("
                (bytes(o.max_bytes)) " or " (duration(o.max_age_seconds)) "), so the oldest went first"
                @if let Some(at) = o.dropped_last_at { "; the last at " (crate::audit::rfc3339(at)) }
                ". The cloud has everything newer."
            }
        }
        section.cards {
            @if link.state != "off" {
                div.card data-cloud-link {
                    h2 { "Cloud link" }
                    p.big { (link.state) }
                    dl {
                        @if let Some(url) = &link.cloud_url { dt { "Cloud" } dd { code { (url) } } }
                        @if let Some(name) = &link.depot_name { dt { "Enrolled as" } dd { (name) } }
                        @if let Some(since) = link.since_ms { dt { "Since" } dd { (crate::audit::rfc3339(since)) } }
                        @if let Some(o) = &outbox { dt { "Events waiting" } dd { (o.pending) } }
                    }
                    @if let Some(e) = &link.error { p.muted { (e) } }
                }
            }
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
        (bay_board(&bays))
        section.card.wide {
            h2 { "Depot components" }
            p.muted { "What this depot runs today. Sections arrive as their work lands; none shows data it does not have." }
            table.plain {
                tbody {
                    tr { td { "Store" } td { span.pill.ok { "running" } } td.muted { "SQLite, WAL, synchronous=FULL" } }
                    tr { td { "Panel and API" } td { span.pill.ok { "running" } } td.muted { "roles, audit, live updates" } }
                    tr { td { "Image cache (OTA)" } td { span.pill.ok { "running" } } td.muted { "TUF image and director repositories, chunk store" } }
                    tr { td { "Vehicle link (MQTT)" } td { span.pill.ok { "running" } } td.muted {
                        @match &app.link.broker {
                            crate::link::BrokerInfo::Embedded { listen } => { "embedded broker on " code { (listen) } }
                            crate::link::BrokerInfo::External { url } => { "external broker " code { (url) } }
                        }
                    } }
                    tr { td { "Canary controller" } td { span.pill.ok { "running" } } td.muted { "rollouts in waves with gates; see Rollouts" } }
                    @let chargers = app.charging.snapshot().chargers;
                    tr { td { "Charging" } td {
                        @if chargers.is_empty() { span.pill.idle { "no chargers" } }
                        @else if chargers.iter().all(|c| c.status == "ok") { span.pill.ok { "running" } }
                        @else { span.pill.warn { "degraded" } }
                    } td.muted { (format!("{} of {} chargers answering; see Charging", chargers.iter().filter(|c| c.status == "ok").count(), chargers.len())) } }
                    tr { td { "Disk health (SMART)" } td { span.pill.ok { "running" } } td.muted { "verdicts and trends; see Disks" } }
                }
            }
        }
    };
    layout(&app, &user, PageKind::Overview, content)
}

fn when(ms: Option<i64>) -> String {
    ms.map(|t| {
        audit::rfc3339(t)
            .replace('T', " ")
            .chars()
            .take(16)
            .collect::<String>()
            + " UTC"
    })
    .unwrap_or_else(|| "—".into())
}

fn system_time_ms(t: Option<std::time::SystemTime>) -> Option<i64> {
    t.map(crate::store::unix_ms)
}

/// "3 vehicles: a, b, c", the first few named and the rest counted; a dash for none.
fn vehicle_list(ids: &[String]) -> Markup {
    const NAMED: usize = 6;
    html! {
        @if ids.is_empty() { span.muted { "—" } }
        @else {
            (ids.len()) @if ids.len() == 1 { " vehicle: " } @else { " vehicles: " }
            (ids.iter().take(NAMED).map(String::as_str).collect::<Vec<_>>().join(", "))
            @if ids.len() > NAMED { span.muted { " and " (ids.len() - NAMED) " more" } }
        }
    }
}

/// The image cache: trust, staging, staged images, assignments and the upload cap.
pub async fn ota(user: PanelUser, State(app): State<AppState>) -> Response {
    use crate::ota::db;
    let loaded = app
        .store
        .read(|c| Ok::<_, crate::store::StoreError>((db::assignments(c)?, db::recent_jobs(c, 8)?)))
        .await;
    let images = crate::http::ota_api::image_views(&app).await;
    let (images, (assignments, jobs)) = match (images, loaded) {
        (Ok(images), Ok(rest)) => (images, rest),
        (Err(e), _) | (_, Err(e)) => {
            tracing::error!(error = %e, "loading the OTA page");
            (Vec::new(), (Vec::new(), Vec::new()))
        }
    };
    let technician = user.role >= Role::Technician;
    let admin = user.role >= Role::Admin;
    let root_pinned = app.ota.mirror.fleet_root().is_some();
    let certificate = app.ota.certificate();
    let rate = app.ota.bandwidth.rate();
    let live = app.ota.live_job();
    let now = crate::store::unix_ms(app.clock.now());
    let content = html! {
        div.banner.crit hidden data-api-error role="alert" {}
        section.cards {
            div.card {
                h2 { "Fleet trust" }
                @if root_pinned {
                    p.big { span.pill.ok { "root pinned" } }
                    dl {
                        dt { "Image metadata valid until" }
                        dd { (when(system_time_ms(app.ota.timestamp_expires()))) }
                    }
                } @else {
                    p.big { span.pill.warn { "no fleet root" } }
                    p.muted { "Staging is refused until the fleet's root is pinned: set " code { "ota.fleet_root" } " or have an admin upload it." }
                }
            }
            div.card {
                h2 { "Director certificate" }
                @if let Some(cert) = &certificate {
                    p.big { span.pill.ok { "certified" } }
                    dl { dt { "Valid until" } dd { (cert.signed.expires.chars().take(16).collect::<String>().replace('T', " ")) " UTC" } }
                } @else {
                    p.big { span.pill.warn { "not certified" } }
                    p.muted { "Vehicles will not trust this depot's assignments until release engineering certifies "
                        a href="/tuf/director/metadata/1.root.json" { "its director root" } " and an admin installs the certificate." }
                }
                @if admin {
                    form data-api="PUT /api/v1/ota/director/certificate" data-file="certificate" {
                        input type="file" name="certificate" accept=".json,application/json" required;
                        button.primary type="submit" { "Install certificate" }
                    }
                }
            }
            div.card {
                h2 { "Upload limit to vehicles" }
                p.big { @match rate { Some(r) => (format!("{:.1} MiB/s", r as f64 / 1048576.0)), None => "unlimited" } }
                @if technician {
                    form.inline data-api="PUT /api/v1/bandwidth" data-json="bandwidth" {
                        input type="number" name="mib_per_second" min="0.0625" step="0.0625" placeholder="MiB/s (empty: none)";
                        button.primary type="submit" { "Set" }
                    }
                }
            }
        }
        section.card.wide {
            h2 { "Staging" }
            div data-staging-live data-job=[live.as_ref().map(|j| j.id)] {
                @if let Some(job) = &live {
                    p { "Job " (job.id) " from " code { (job.source) } }
                    (meter(job.bytes_total.map(|t| percent(job.bytes_done(), t)).unwrap_or(0.0), "staging"))
                    p.muted data-live="staging-bytes" { (bytes(job.bytes_done())) @if let Some(t) = job.bytes_total { " of " (bytes(t)) } }
                } @else {
                    p.muted data-live="staging-bytes" { "Nothing is being staged." }
                }
            }
            @if technician {
                div.stage-forms {
                    form.stack data-upload="/api/v1/images" {
                        label { span { "Release bundle (made by " code { "atlasmesh release bundle" } ")" } input type="file" name="bundle" accept=".tar" required; }
                        button.primary type="submit" { "Upload and stage" }
                    }
                    form.stack data-api="POST /api/v1/images" data-json="stage" {
                        label { "Repository URL or local directory" input type="text" name="source" placeholder="https://releases.example/repo/ or /media/usb/repo" required; }
                        div.row {
                            label { "Hardware" input type="text" name="hardware" required; }
                            label { "Version" input type="text" name="version" required; }
                        }
                        button.primary type="submit" { "Stage" }
                    }
                }
            }
            @if !jobs.is_empty() {
                div.table-scroll {
                    table.data {
                        thead { tr { th { "Job" } th { "Source" } th { "Image" } th { "Result" } th { "Finished" } } }
                        tbody {
                            @for job in &jobs {
                                tr {
                                    td { (job.id) }
                                    td { code { (job.source) } }
                                    td { (job.hardware_id.as_deref().unwrap_or("")) " " (job.version.as_deref().unwrap_or("")) }
                                    td {
                                        @match job.state.as_str() {
                                            "staged" => span.pill.ok { "staged" },
                                            "running" => span.pill.idle { "running" },
                                            _ => { span.pill.crit { (job.error_code.as_deref().unwrap_or(&job.state)) } " " span.muted.small { (job.error.as_deref().unwrap_or("")) } },
                                        }
                                        @if job.resumes > 0 {
                                            " " span.muted.small { "resumed after a restart" @if job.resumes > 1 { " (" (job.resumes) " times)" } }
                                        }
                                    }
                                    td.nowrap { (when(job.finished_at)) }
                                }
                            }
                        }
                    }
                }
            }
        }
        section.card.wide {
            h2 { "Staged images" }
            @if images.is_empty() {
                p.muted { "No image is staged on this depot." }
            } @else {
                div.table-scroll {
                    table.data {
                        thead { tr { th { "Hardware" } th { "Version" } th { "Size" } th { "Chunks" } th { "Signature" } th { "Signed until" } th { "Installed on" } th { "Assigned to" } th {} } }
                        tbody {
                            @for view in &images {
                                @let image = &view.row;
                                @let path = format!("/api/v1/images/{}?hardware={}", image.version, image.hardware_id);
                                tr {
                                    td { (image.hardware_id) }
                                    td { strong { (image.version) } @if let Some(notes) = &image.notes { br; span.muted.small { (notes) } } }
                                    td.nowrap { (bytes(image.length as u64)) }
                                    td { (image.chunk_count) }
                                    td {
                                        @if image.corrupt_at.is_some() { span.pill.crit { "damaged on disk" } }
                                        @else { span.pill.ok { "verified" } }
                                    }
                                    td.nowrap {
                                        @if image.targets_expires <= now { span.pill.warn { "expired" } " " }
                                        (when(Some(image.targets_expires)))
                                    }
                                    td { (vehicle_list(&view.installed_vehicles)) }
                                    td { (vehicle_list(&view.assigned_vehicles)) }
                                    td.nowrap.actions {
                                        button.small data-validate=(format!("/api/v1/images/{}/validate?hardware={}", image.version, image.hardware_id)) { "Validate" }
                                        @if technician {
                                            button.small.danger data-api-button=(format!("DELETE {path}")) data-confirm=(format!("Delete {} {}?", image.hardware_id, image.version)) { "Delete" }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
        section.card.wide {
            h2 { "Assignments" }
            p.muted { "What the director tells each vehicle to install. Canary waves will drive this; until then technicians assign by hand." }
            @if technician {
                form.inline data-api="POST /api/v1/assignments" data-json="assign" {
                    input type="text" name="vehicle_id" placeholder="vehicle id" required;
                    input type="text" name="version" placeholder="version" required;
                    button.primary type="submit" { "Assign" }
                }
            }
            @if !assignments.is_empty() {
                table.data {
                    thead { tr { th { "Vehicle" } th { "Image" } th { "Assigned" } th { "By" } th {} } }
                    tbody {
                        @for a in &assignments {
                            tr {
                                td { code { (a.vehicle_id) } }
                                td { (a.hardware_id) " " (a.version) }
                                td.nowrap { (when(Some(a.assigned_at))) }
                                td { (a.assigned_by) }
                                td { @if technician { button.small.danger data-api-button=(format!("DELETE /api/v1/assignments/{}", a.vehicle_id)) data-confirm=(format!("Remove the assignment of {}?", a.vehicle_id)) { "Remove" } } }
                            }
                        }
                    }
                }
            }
        }
        noscript { p.muted { "Viewing works without JavaScript; staging, validating and assigning need it." } }
    };
    layout(&app, &user, PageKind::Ota, content).into_response()
}

/// Canary rollouts: waves, the gate, the decision log, the vehicles; actions by role.
pub async fn rollouts(user: PanelUser, State(app): State<AppState>) -> Response {
    let list = match app.rollouts.list().await {
        Ok(l) => l,
        Err(e) => return super::super::error::ApiError::internal(e).into_response(),
    };
    let technician = user.role >= Role::Technician;
    let admin = user.role >= Role::Admin;
    // The newest rollout in full; the others as one line each.
    let current = match list.first() {
        Some(r) => match (
            app.rollouts.get(r.id).await,
            app.rollouts.recent_log(r.id, 25).await,
        ) {
            (Ok(view), Ok(log)) => Some((view, log)),
            _ => None,
        },
        None => None,
    };
    let content = html! {
        p.error data-api-error hidden {}
        @if let Some((r, log)) = &current {
            section.card.wide data-rollout=(r.id) {
                h2 { "Rollout " (r.id) ": " (r.hardware_id) " → " (r.version) " " (phase_pill(r.phase)) }
                @match &r.status {
                    atlasmesh_canary::Phase::Halted { reason } => p { strong { "Halted: " } (reason) },
                    atlasmesh_canary::Phase::Paused { reason } => p { strong { "Paused" } " (" (format!("{reason:?}").to_lowercase()) ")." },
                    _ => {}
                }
                p.muted { "Started " (r.created_at) " by " (r.created_by) " · updated " (r.updated_at) ". Updated live." }
                h3 { "Waves" }
                @for w in &r.waves {
                    @let done = w.succeeded + w.failed + w.silent;
                    @let level = if w.failed + w.silent > 0 { "crit" } else { "ok" };
                    div.wave {
                        span { "Wave " (w.number) " · up to " (w.target) " vehicles" @if w.current { " · current" } }
                        span.muted { " — " (w.assigned) " assigned, " (w.succeeded) " succeeded, " (w.failed) " failed, " (w.silent) " silent, " (w.in_flight) " in flight" }
                        div.meter data-level=(level) { div.fill style=(format!("width: {}%", pct_of(done, w.assigned.max(1)))) {} }
                    }
                }
                h3 { "Gate" }
                table.data.compact {
                    tbody {
                        tr { th { "Successes" } td { (r.gate.tally.successes) } }
                        tr { th { "Failures" } td { (r.gate.tally.failures) } }
                        tr { th { "Silent (counted as failures)" } td { (r.gate.tally.silent) } }
                        tr { th { "Pending" } td { (r.gate.tally.pending) } }
                        tr { th { "Lower bound" } td { (r.gate.lower_bound.map(|b| format!("{:.2} %", b * 100.0)).unwrap_or_else(|| "—".into())) " against " (format!("{:.1} %", r.gate.threshold * 100.0)) " at " (format!("{:.0} %", r.gate.confidence * 100.0)) " confidence" } }
                        tr { th { "Best case" } td { (r.gate.best_case.map(|b| format!("{:.2} %", b * 100.0)).unwrap_or_else(|| "—".into())) } }
                        tr { th { "Verdict" } td { (format!("{:?}", r.gate.verdict).to_lowercase()) } }
                    }
                }
                div.actions {
                    @if technician && r.phase == "running" {
                        button.small data-api-button=(format!("POST /api/v1/rollouts/{}/pause", r.id)) data-confirm="Pause this rollout? Vehicles already installing carry on." { "Pause" }
                    }
                    @if technician && (r.phase == "paused" || r.phase == "halted") {
                        button.small data-api-button=(format!("POST /api/v1/rollouts/{}/resume", r.id)) data-confirm="Resume this rollout with its plan?" { "Resume" }
                    }
                    @if admin && r.phase != "completed" && r.phase != "rolled_back" {
                        form.inline data-api=(format!("POST /api/v1/rollouts/{}/halt", r.id)) {
                            input name="reason" placeholder="why" required;
                            button.small.danger type="submit" data-confirm="Halt this rollout and roll back the vehicles in flight?" { "Halt" }
                        }
                    }
                    @if admin && r.phase != "rolled_back" {
                        button.small.danger data-api-button=(format!("POST /api/v1/rollouts/{}/rollback", r.id)) data-confirm="Roll every vehicle this rollout updated back to its previous version?" { "Roll back all" }
                    }
                    a.small href=(format!("/api/v1/rollouts/{}/evidence", r.id)) { "Evidence bundle" }
                }
                h3 { "Decision log" }
                table.data.compact {
                    thead { tr { th { "#" } th { "When" } th { "By" } th { "Input" } th { "Decisions" } } }
                    tbody {
                        @for (seq, at, entry) in log {
                            tr {
                                td { (seq) }
                                td.nowrap { (when(Some(*at))) }
                                td { (entry["actor"].as_str().unwrap_or("")) }
                                td { (describe_event(&entry["event"])) }
                                td { (describe_decisions(&entry["decisions"])) }
                            }
                        }
                    }
                }
                @if let Some(vehicles) = &r.vehicles {
                    h3 { "Vehicles (" (vehicles.len()) ")" }
                    div.table-scroll {
                        table.data.compact {
                            thead { tr { th { "Vehicle" } th { "Stage" } th { "Wave" } th { "Outcome" } th { "Ready" } } }
                            tbody {
                                @for v in vehicles {
                                    tr {
                                        td { code { (v.id) } }
                                        td { (crate::link::db::serde_plain(&v.stage)) }
                                        td { (v.wave.map(|w| w.to_string()).unwrap_or_else(|| "—".into())) }
                                        td { @match &v.outcome {
                                            Some(atlasmesh_canary::Outcome::Succeeded) => span.pill.ok { "succeeded" },
                                            Some(atlasmesh_canary::Outcome::Failed { reason }) => { span.pill.crit { "failed" } " " (reason) },
                                            Some(atlasmesh_canary::Outcome::Silent) => span.pill.warn { "silent" },
                                            None => span.muted { "—" },
                                        } }
                                        td { @if v.eligible { "yes" } @else { span.muted { (v.reasons.join("; ")) } } }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        } @else {
            section.card.wide {
                h2 { "Rollouts" }
                p { "No rollout yet. Stage an image on the OTA page, then start one here: the depot assigns it wave by wave to eligible docked vehicles and halts as soon as the gate can no longer pass." }
            }
        }
        @if technician {
            section.card {
                h2 { "New rollout" }
                form data-api="POST /api/v1/rollouts" data-json="rollout" {
                    label { "Version " input name="version" required placeholder="2.0.0"; }
                    label { "Hardware " input name="hardware" placeholder="if several"; }
                    label { "Canary vehicles " input name="canary" type="number" min="1" placeholder="default: 5 % or what the gate needs"; }
                    label { "Threshold % " input name="threshold" type="number" step="0.1" min="1" max="99.9" placeholder="98"; }
                    label { "Confidence % " input name="confidence" type="number" step="1" min="50" max="99.9" placeholder="95"; }
                    button type="submit" { "Start" }
                }
                p.muted { "Waves: the canary, then 25 %, then 100 %. A small depot needs a lower threshold or confidence: the gate refuses a plan it could never pass, and says what would work." }
            }
        }
        @if list.len() > 1 {
            section.card.wide {
                h2 { "Earlier rollouts" }
                table.data.compact {
                    thead { tr { th { "#" } th { "Image" } th { "State" } th { "Vehicles" } th { "Started" } } }
                    tbody {
                        @for r in list.iter().skip(1) {
                            tr {
                                td { (r.id) }
                                td { (r.hardware_id) " " (r.version) }
                                td { (phase_pill(r.phase)) }
                                td { (r.counts.values().sum::<u64>()) }
                                td { (r.created_at) }
                            }
                        }
                    }
                }
            }
        }
    };
    layout(&app, &user, PageKind::Rollouts, content).into_response()
}

fn pct_of(part: u64, whole: u64) -> u64 {
    (part * 100).checked_div(whole).unwrap_or(0).min(100)
}

fn phase_pill(phase: &str) -> Markup {
    let class = match phase {
        "running" | "completed" => "ok",
        "paused" => "warn",
        "halted" => "crit",
        _ => "idle",
    };
    html! { span class=(format!("pill {class}")) { (phase.replace('_', " ")) } }
}

fn describe_event(event: &serde_json::Value) -> String {
    let kind = event["event"].as_str().unwrap_or("?").replace('_', " ");
    match event["vehicle"].as_str() {
        Some(v) => format!("{v}: {kind}"),
        None => kind,
    }
}

fn describe_decisions(decisions: &serde_json::Value) -> String {
    let Some(list) = decisions.as_array() else {
        return String::new();
    };
    list.iter()
        .map(|d| {
            let kind = d["decision"].as_str().unwrap_or("?").replace('_', " ");
            match (d["vehicle"].as_str(), d["reason"].as_str()) {
                (Some(v), _) => format!("{kind} {v}"),
                (None, Some(r)) => format!("{kind}: {r}"),
                _ => kind,
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

/// Every registered vehicle: where it is, its charge, software and OTA progress.
pub async fn vehicles(user: PanelUser, State(app): State<AppState>) -> Response {
    let vehicles = match app.store.read(crate::link::db::list).await {
        Ok(v) => v,
        Err(e) => return super::super::error::ApiError::internal(e).into_response(),
    };
    let docked = vehicles.iter().filter(|v| v.docked).count();
    let online = vehicles.iter().filter(|v| v.online).count();
    let content = html! {
        section.card.wide {
            h2 { "Vehicles" }
            p.muted { (vehicles.len()) " registered · " (docked) " docked · " (online) " online. Updated live." }
            @if vehicles.is_empty() {
                p { "No vehicles yet. Register one with " code { "POST /api/v1/vehicles" } " (technician), or run a simulated fleet: " code { "atlasmesh depot --simulate-fleet 20" } "." }
            } @else {
                table.data {
                    thead { tr {
                        th { "Vehicle" } th { "Bay" } th { "Link" } th { "Charge" } th { "Departure" }
                        th { "Version" } th { "OTA" } th { "Health" } th { "Last seen" }
                    } }
                    tbody data-vehicles {
                        @for v in &vehicles { (vehicle_row(v)) }
                    }
                }
            }
        }
    };
    layout(&app, &user, PageKind::Vehicles, content).into_response()
}

fn vehicle_row(v: &crate::link::db::VehicleView) -> Markup {
    html! {
        tr id=(v.id) data-vehicle=(v.id) {
            td { code { (v.id) } }
            td { @if v.docked { (v.bay.as_deref().unwrap_or("docked")) } @else { span.muted { "away" } } }
            td { @if v.online { span.pill.ok { "online" } } @else { span.pill.idle { "offline" } } }
            td {
                (v.soc_percent.map(|s| format!("{s:.0} %")).unwrap_or_else(|| "—".into()))
                @if v.plugged_in == Some(true) { " · plugged in" }
            }
            td { (when(v.departure_ms)) }
            td {
                (v.installed_version.as_deref().unwrap_or("—"))
                @if let Some(a) = &v.assigned_version { @if Some(a.as_str()) != v.installed_version.as_deref() { span.muted { " → " (a) } } }
            }
            td { @if let Some(o) = &v.ota { (o.version) " " (o.phase) " " (o.outcome) } @else { span.muted { "—" } } }
            td { (v.health.as_deref().unwrap_or("—")) }
            td { (when(v.last_seen_at)) }
        }
    }
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

fn verdict_pill(v: crate::disks::verdict::Verdict) -> Markup {
    use crate::disks::verdict::Verdict;
    let class = match v {
        Verdict::Passed => "ok",
        Verdict::Unknown => "idle",
        Verdict::Warning => "warn",
        Verdict::Failed => "crit",
    };
    html! { span class=(format!("pill {class}")) data-verdict=(v.as_str()) { (v.as_str()) } }
}

/// The series charted per disk: label, unit, and the value in a history sample.
type Series = (&'static str, &'static str, fn(&Sample) -> Option<f64>);
const TRENDS: &[Series] = &[
    ("Temperature", "°C", |s| s.temperature_c.map(|v| v as f64)),
    ("Reallocated sectors", "", |s| {
        s.reallocated_sectors.map(|v| v as f64)
    }),
    ("Pending sectors", "", |s| {
        s.pending_sectors.map(|v| v as f64)
    }),
    ("Media errors", "", |s| s.media_errors.map(|v| v as f64)),
    ("Wear", "%", |s| s.wear_percent_used.map(f64::from)),
];

/// A small line chart of one series over the history's span; nothing when under two points.
fn trend(label: &str, unit: &str, points: &[(i64, f64)]) -> Markup {
    if points.len() < 2 {
        return html! {};
    }
    let (t0, t1) = (points[0].0, points[points.len() - 1].0.max(points[0].0 + 1));
    let lo = points.iter().map(|p| p.1).fold(f64::INFINITY, f64::min);
    let hi = points.iter().map(|p| p.1).fold(f64::NEG_INFINITY, f64::max);
    let span = (hi - lo).max(1.0);
    let coords: Vec<String> = points
        .iter()
        .map(|(t, v)| {
            let x = (t - t0) as f64 / (t1 - t0) as f64 * 296.0 + 2.0;
            let y = 46.0 - (v - lo) / span * 42.0;
            format!("{x:.1},{y:.1}")
        })
        .collect();
    html! {
        figure.trend data-trend=(label) {
            figcaption { (label) " " span.muted { (format!("{lo:.0}–{hi:.0} {unit}")) } }
            svg viewBox="0 0 300 50" width="300" height="50" role="img" aria-label=(format!("{label} over time")) {
                polyline points=(coords.join(" ")) fill="none" stroke="currentColor" stroke-width="2" {}
            }
        }
    }
}

/// The depot's own disks: verdicts with reasons, key attributes, trends and self-tests.
pub async fn disks(user: PanelUser, State(app): State<AppState>) -> Response {
    let snapshot = app.disks.snapshot();
    let since = crate::store::unix_ms(app.clock.now()) / 1000 - 30 * 86_400;
    let mut details = Vec::new();
    for d in &snapshot.disks {
        let history = app.disks.history(&d.id, since).await.unwrap_or_default();
        details.push((d, history));
    }
    let alerts = app.disks.alerts(20).await.unwrap_or_default();
    let system = app.core.system.borrow().clone();
    let technician = user.role >= Role::Technician;
    let content = html! {
        p.error data-api-error hidden {}
        section.card.wide {
            @if !snapshot.enabled {
                p { "Disk health is switched off on this depot (" code { "disks.enabled = false" } ")." }
            } @else {
                p.muted {
                    "Last checked " (snapshot.checked_at.as_deref().map(|t| t.replace('T', " ").chars().take(16).collect::<String>() + " UTC").unwrap_or_else(|| "not yet".into()))
                    @if let Some(dev) = &snapshot.store_device { " · image store on " code { (dev) } }
                    ". Updated live."
                }
                @if let Some(e) = &snapshot.error { div.banner.warn role="alert" { "No disk list: " (e) } }
                @if technician {
                    div.actions { button.small data-api-button="POST /api/v1/disks/check" { "Check now" } }
                }
            }
        }
        @for (d, history) in &details {
            section.card.wide data-disk=(d.id) {
                h2 { (d.device) " " (verdict_pill(d.verdict)) @if d.holds_store { " " span.pill.idle { "image store" } } }
                p.muted {
                    (d.model.as_deref().unwrap_or("unknown model"))
                    @if let Some(s) = &d.serial { " · serial " (s) }
                    @if let Some(p) = &d.protocol { " · " (p) }
                    @if let Some(c) = d.capacity_bytes { " · " (bytes(c)) }
                    " · read " (d.read_at.replace('T', " ").chars().take(16).collect::<String>()) " UTC"
                }
                ul.reasons {
                    @for r in &d.reasons {
                        li data-severity=(r.severity.as_str()) { (verdict_pill(r.severity)) " " (r.message) }
                    }
                }
                @if !d.key_attributes.is_empty() {
                    table.data.compact {
                        tbody {
                            @for k in &d.key_attributes {
                                tr { th { (k.name) } td { (k.value) @if let Some(u) = &k.unit { " " (u) } @if let Some(n) = &k.note { " " span.muted { (n) } } } }
                            }
                            @if let Some(life) = &d.remaining_life {
                                tr { th { "Remaining life" } td { (format!("{:.0} % used, about {:.0} days left at {:.3} points a day", life.percent_used, life.days_left, life.per_day)) } }
                            }
                        }
                    }
                }
                div.trends {
                    @for (label, unit, value) in TRENDS {
                        (trend(label, unit, &history.iter().filter_map(|p| Some((p.sample.at_unix, value(&p.sample)?))).collect::<Vec<_>>()))
                    }
                }
                h3 { "Self-tests" }
                p.muted {
                    "Short last started " (d.short_test_started.as_deref().unwrap_or("never"))
                    " · long last started " (d.long_test_started.as_deref().unwrap_or("never"))
                    " (in quiet hours " (app.config.disks.quiet_hours) ")."
                }
                @if d.self_tests.is_empty() {
                    p.muted { "The drive's self-test log is empty." }
                } @else {
                    table.data.compact data-self-tests {
                        thead { tr { th { "Test" } th { "Result" } th { "Power-on hours" } } }
                        tbody {
                            @for t in d.self_tests.iter().take(8) {
                                tr {
                                    td { (t.kind) }
                                    td { (t.status) }
                                    td { (t.lifetime_hours.map(|h| h.to_string()).unwrap_or_default()) }
                                }
                            }
                        }
                    }
                }
            }
        }
        section.card.wide {
            h2 { "Alerts" }
            @if alerts.is_empty() {
                p.muted { "No verdict has changed." }
            } @else {
                table.data.compact data-disk-alerts {
                    thead { tr { th { "When" } th { "Disk" } th { "Change" } th { "Why" } th { "Webhook" } } }
                    tbody {
                        @for a in &alerts {
                            tr {
                                td.nowrap { (when(Some(a.at))) }
                                td { (a.device) }
                                td { (a.from.map(crate::disks::verdict::Verdict::as_str).unwrap_or("new")) " → " (a.to.as_str()) }
                                td { (a.reasons.get(0).and_then(|r| r["message"].as_str()).unwrap_or("")) }
                                td { (a.webhook) @if a.attempts > 0 { " (" (a.attempts) " attempts)" } }
                            }
                        }
                    }
                }
            }
        }
        section.card.wide {
            h2 { "This machine" }
            table.data.compact {
                tbody {
                    @if let Some(fs) = &system.data_fs {
                        tr { th { "Data filesystem " code { (fs.mount_point) } } td { (bytes(fs.available_bytes)) " free of " (bytes(fs.total_bytes)) } }
                    }
                    @for t in &system.temperatures {
                        tr { th { (t.label) } td { (format!("{:.0} °C", t.celsius)) @if let Some(c) = t.critical_celsius { span.muted { (format!(" (critical at {c:.0} °C)")) } } } }
                    }
                    @if system.temperatures.is_empty() {
                        tr { th { "Temperature sensors" } td.muted { "none exposed by this machine" } }
                    }
                }
            }
        }
    };
    layout(&app, &user, PageKind::Disks, content).into_response()
}

/// Colours of the vehicles' stacks in the charging chart (repeating).
const STACK_COLOURS: [&str; 8] = [
    "#2b6cb0", "#2f855a", "#b7791f", "#6b46c1", "#c05621", "#2c7a7b", "#b83280", "#4a5568",
];

/// The plan as a chart: planned power per slot stacked by vehicle on the base load, the site
/// limit as a line and the tariff as a step line on its own scale.
fn charging_chart(plan: &crate::charging::PlanView) -> Markup {
    let slots = plan.price.len().max(1);
    let (w, h, left, bottom) = (960.0, 260.0, 40.0, 24.0);
    let bar = (w - left) / slots as f64;
    let peak = (0..slots)
        .map(|t| plan.base_load_kw[t] + plan.vehicles.iter().map(|v| v.power_kw[t]).sum::<f64>())
        .fold(plan.site_limit_kw, f64::max)
        * 1.1;
    let y = |kw: f64| (h - bottom) - kw / peak * (h - bottom - 8.0);
    let price_hi = plan
        .price
        .iter()
        .copied()
        .fold(f64::MIN, f64::max)
        .max(0.01);
    let price_y = |p: f64| (h - bottom) - p / price_hi * (h - bottom - 8.0) * 0.9;
    let tz = jiff::tz::TimeZone::system();
    let slot_ms = i64::from(plan.slot_minutes) * 60_000;
    let mut tariff = String::new();
    for (t, p) in plan.price.iter().enumerate() {
        let x0 = left + t as f64 * bar;
        tariff.push_str(&format!(
            "{x0:.1},{:.1} {:.1},{:.1} ",
            price_y(*p),
            x0 + bar,
            price_y(*p)
        ));
    }
    // Per slot, each charging vehicle's (index, from kW, to kW) on top of the base load.
    let stacks: Vec<Vec<(usize, f64, f64)>> = (0..slots)
        .map(|t| {
            let mut level = plan.base_load_kw[t];
            let mut out = Vec::new();
            for (i, v) in plan.vehicles.iter().enumerate() {
                let kw = v.power_kw[t];
                if kw > 0.0 {
                    out.push((i, level, level + kw));
                    level += kw;
                }
            }
            out
        })
        .collect();
    html! {
        figure.chart data-charging-chart {
            svg viewBox=(format!("0 0 {w} {h}")) width="100%" role="img" aria-label="Planned charging power per slot, stacked by vehicle, against the site limit and the tariff" {
                @for t in 0..slots {
                    @let x = left + t as f64 * bar;
                    @let base = plan.base_load_kw[t];
                    rect.base x=(format!("{x:.1}")) y=(format!("{:.1}", y(base))) width=(format!("{:.1}", bar * 0.9)) height=(format!("{:.1}", (h - bottom) - y(base))) fill="#cbd5e0" {}
                    @for (i, from, to) in &stacks[t] {
                        @let v = &plan.vehicles[*i];
                        rect data-vehicle=(v.session.vehicle.clone().unwrap_or_else(|| v.session.charger.clone())) x=(format!("{x:.1}")) y=(format!("{:.1}", y(*to))) width=(format!("{:.1}", bar * 0.9)) height=(format!("{:.1}", y(*from) - y(*to))) fill=(STACK_COLOURS[i % STACK_COLOURS.len()]) {}
                    }
                    @if t % 16 == 0 {
                        @let q = crate::charging::inputs::quarter_of_day(plan.planned_at_ms + t as i64 * slot_ms, &tz);
                        text x=(format!("{x:.1}")) y=(format!("{:.1}", h - 6.0)) font-size="11" { (format!("{:02}:{:02}", q / 4, q % 4 * 15)) }
                    }
                }
                line.limit data-site-limit=(plan.site_limit_kw) x1=(left) x2=(w) y1=(format!("{:.1}", y(plan.site_limit_kw))) y2=(format!("{:.1}", y(plan.site_limit_kw))) stroke="#c53030" stroke-width="2" stroke-dasharray="6 4" {}
                text x="2" y=(format!("{:.1}", y(plan.site_limit_kw) - 4.0)) font-size="11" fill="#c53030" { (format!("{:.0} kW", plan.site_limit_kw)) }
                polyline.tariff points=(tariff.trim()) fill="none" stroke="#1a202c" stroke-width="1.5" {}
            }
            figcaption {
                "Planned power per quarter-hour, stacked by vehicle on the other load (grey), under the site limit (red); the black line is the tariff (highest "
                (format!("{price_hi:.2}")) " per kWh)."
                ul.legend {
                    @for (i, v) in plan.vehicles.iter().enumerate() {
                        li { span.swatch style=(format!("background:{}", STACK_COLOURS[i % STACK_COLOURS.len()])) {} " " (v.session.vehicle.clone().unwrap_or_else(|| format!("{} (unknown vehicle)", v.session.charger))) }
                    }
                }
            }
        }
    }
}

/// Chargers live, the plan as a chart against the site limit and tariff, and shortfalls.
pub async fn charging(user: PanelUser, State(app): State<AppState>) -> Markup {
    let snapshot = app.charging.snapshot();
    let site = app.charging.site().await.ok();
    let settings = app
        .store
        .read(crate::charging::db::vehicle_settings)
        .await
        .unwrap_or_else(|e| {
            tracing::error!(error = %e, "loading charging settings for the panel");
            Vec::new()
        });
    let technician = user.role >= Role::Technician;
    let admin = user.role >= Role::Admin;
    let content = html! {
        div.banner.crit hidden data-api-error role="alert" {}
        @if app.charging.config().chargers.is_empty() {
            section.card.empty {
                p.big { "No chargers are set up on this depot" }
                p { "Add them under " code { "[[charging.chargers]]" } " in the depot's configuration (profile, address, bay); see docs/charging.md." }
            }
        } @else {
            div data-live-section="plan" {
            @if let Some(plan) = &snapshot.plan {
                @for v in plan.vehicles.iter().filter(|v| !v.ready) {
                    div.banner.warn role="alert" data-shortfall {
                        strong { (v.session.vehicle.clone().unwrap_or_else(|| v.session.charger.clone())) }
                        (format!(" will be {:.1} kWh short at departure ({})", v.shortfall_kwh, when(Some(v.session.departure_ms))))
                    }
                }
                section.card.wide {
                    h2 { "Plan for the next 24 hours" }
                    p.muted {
                        (format!("Site limit {:.0} kW", plan.site_limit_kw))
                        @if let Some(s) = &site { @if let Some(by) = &s.updated_by { " (set by " (by) ")" } }
                        (format!(" · cost {:.2} · {} of {} vehicles ready by departure", plan.cost, plan.vehicles.iter().filter(|v| v.ready).count(), plan.vehicles.len()))
                        " · re-planned every poll"
                    }
                    (charging_chart(plan))
                    ul.reasons { @for line in &plan.explanation { li { (line) } } }
                }
            } @else {
                section.card { p { "No plan yet: the first poll of the chargers is under way." } }
            }
            }
            div data-live-section="vehicles" { (charging_vehicles(snapshot.plan.as_ref(), &settings, app.charging.config().target_soc_percent, technician)) }
            div data-live-section="chargers" {
            section.card.wide {
                h2 { "Chargers" }
                table.data {
                    thead { tr { th { "Charger" } th { "Bay" } th { "Model" } th { "Status" } th { "State" } th { "Power" } th { "Setpoint" } th { "Vehicle" } } }
                    tbody {
                        @for c in &snapshot.chargers {
                            tr data-charger=(c.id) data-status=(c.status) {
                                td { (c.id) }
                                td { (c.bay.as_deref().unwrap_or("—")) }
                                td { (c.model) }
                                td {
                                    span.pill class=(match c.status { "ok" => "ok", "faulted" => "crit", _ => "idle" }) { (c.status) }
                                    @if let Some(e) = &c.error { br; span.muted { (e) } }
                                }
                                td { (c.reading.as_ref().and_then(|r| r.status.clone()).unwrap_or_else(|| "—".into())) }
                                td { (c.reading.as_ref().map(|r| format!("{:.1} kW", r.power_w / 1000.0)).unwrap_or_else(|| "—".into())) }
                                td { (c.setpoint_a.map(|a| format!("{a:.1} A")).unwrap_or_else(|| c.failsafe_a.map(|f| format!("failsafe {f:.0} A")).unwrap_or_else(|| "—".into()))) }
                                td { (c.vehicle.as_deref().unwrap_or("—")) }
                            }
                        }
                    }
                }
                @if let Some(m) = &snapshot.meter {
                    p.muted { "Site meter (" (m.profile) ", " (m.address) "): " (m.status) @if let Some(p) = m.power_kw { (format!(", {p:.1} kW")) } }
                }
            }
            }
            @if let Some(site) = &site { (charging_site(site, admin)) }
        }
    };
    layout(&app, &user, PageKind::Charging, content)
}

/// Vehicles at the chargers (and any with settings saved ahead): what the plan gives each,
/// and for technicians a form per vehicle for departure, target and priority.
fn charging_vehicles(
    plan: Option<&crate::charging::PlanView>,
    settings: &[crate::charging::db::VehicleSettings],
    default_target: f64,
    technician: bool,
) -> Markup {
    let planned: Vec<&crate::charging::PlannedVehicle> = plan
        .map(|p| {
            p.vehicles
                .iter()
                .filter(|v| v.session.vehicle.is_some())
                .collect()
        })
        .unwrap_or_default();
    let ahead: Vec<&crate::charging::db::VehicleSettings> = settings
        .iter()
        .filter(|s| {
            !planned
                .iter()
                .any(|v| v.session.vehicle.as_deref() == Some(s.vehicle_id.as_str()))
        })
        .collect();
    let saved = |id: &str| settings.iter().find(|s| s.vehicle_id == id);
    // One row's settings cells: a form for technicians, the values otherwise.
    let controls = |id: &str, departure: Option<i64>, target: Option<f64>, priority: u8| {
        let form = format!("charging-{id}");
        html! {
            @if technician {
                td { input type="datetime-local" name="departure" form=(form) data-ms=[departure] aria-label=(format!("Departure of {id}")) {} }
                td { input type="number" name="target_soc_percent" form=(form) min="0" max="100" step="1" value=[target.map(|t| format!("{t:.0}"))] placeholder=(format!("{default_target:.0}")) title="Empty: the depot default" aria-label=(format!("Target state of charge of {id}")) {} }
                td { input type="number" name="priority" form=(form) min="0" max="9" step="1" value=(priority) aria-label=(format!("Priority of {id}")) {} }
                td { form.inline id=(form) data-api=(format!("PUT /api/v1/charging/vehicles/{id}")) data-json="charging-vehicle" { button type="submit" { "Save" } } }
            } @else {
                td { (when(departure)) }
                td { (target.map(|t| format!("{t:.0} %")).unwrap_or_else(|| "default".into())) }
                td { (priority) }
            }
        }
    };
    html! {
        @if !planned.is_empty() || !ahead.is_empty() {
            section.card.wide data-charging-vehicles {
                h2 { "Vehicles" }
                p.muted {
                    "Departure, target and priority as set here win over what a vehicle reports; an empty departure or target means the vehicle's own or the depot default (a departure that has passed gives way to them too). Priority 0 is normal, 9 charges first when the site cannot serve everyone."
                }
                table.data {
                    thead { tr {
                        th { "Vehicle" } th { "Charger" } th { "State of charge" } th { "Needs" } th { "Planned" } th { "Ready" } th { "Leaves" }
                        th { "Set departure" } th { "Target %" } th { "Priority" } @if technician { th {} }
                    } }
                    tbody {
                        @for v in &planned {
                            @let id = v.session.vehicle.clone().unwrap_or_default();
                            @let set = saved(&id);
                            tr data-charging-vehicle=(id) {
                                td { code { (id) } }
                                td { (v.session.charger) @if let Some(c) = &v.circuit { span.muted { " (" (c) ")" } } }
                                td { (v.session.soc_percent.map(|s| format!("{s:.0} %")).unwrap_or_else(|| "—".into())) }
                                td { (format!("{:.1} kWh", v.session.need_kwh)) }
                                td { (format!("{:.1} kWh", v.energy_kwh)) }
                                td { @if v.ready { span.pill.ok { "ready" } } @else { span.pill.crit { (format!("{:.1} kWh short", v.shortfall_kwh)) } } }
                                td { (when(Some(v.session.departure_ms))) }
                                (controls(&id, set.and_then(|s| s.departure_ms), set.and_then(|s| s.target_soc_percent), set.map_or(0, |s| s.priority)))
                            }
                        }
                        @for s in &ahead {
                            tr data-charging-vehicle=(s.vehicle_id) {
                                td { code { (s.vehicle_id) } }
                                td.muted colspan="6" { "not at a charger" }
                                (controls(&s.vehicle_id, s.departure_ms, s.target_soc_percent, s.priority))
                            }
                        }
                    }
                }
            }
        }
    }
}

/// The grid limit and tariff; admins change them here.
fn charging_site(site: &crate::charging::db::Site, admin: bool) -> Markup {
    // Hourly when every hour's quarters agree (the usual tariff), else all 96 quarter-hours.
    let hourly = site.tariff.chunks(4).all(|q| q.iter().all(|p| *p == q[0]));
    let prices: Vec<String> = if hourly {
        site.tariff
            .iter()
            .step_by(4)
            .map(|p| format!("{p}"))
            .collect()
    } else {
        site.tariff.iter().map(|p| format!("{p}")).collect()
    };
    html! {
        section.card.wide data-charging-site {
            h2 { "Site" }
            p.muted {
                (format!("Grid connection limit {:.0} kW", site.limit_kw))
                @match (&site.updated_by, site.updated_at) {
                    (Some(by), at) => { " · set by " (by) " " (when(at)) }
                    _ => { " · the configured default" }
                }
            }
            @if admin {
                form.stack data-api="PUT /api/v1/charging/site" data-json="charging-site" {
                    label { "Limit, kW " input type="number" name="limit_kw" min="1" max="100000" step="any" required value=(site.limit_kw) {} }
                    label {
                        (if hourly { "Tariff, price per kWh for each hour from local midnight (24 values)" } else { "Tariff, price per kWh for each quarter-hour from local midnight (96 values)" })
                        textarea name="tariff" rows="3" required { (prices.join(" ")) }
                    }
                    button type="submit" { "Save site" }
                }
            } @else {
                p { (if hourly { "Tariff per hour" } else { "Tariff per quarter-hour" }) " from local midnight: " code { (prices.join(" ")) } }
            }
        }
    }
}
