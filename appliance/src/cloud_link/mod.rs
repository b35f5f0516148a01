//! The depot's end of the cloud link (docs/cloud.md): enrolment on first start, the sync loop
//! from `atlasmesh-cloud-sync` over this depot's store, the outbox's bounds, and what the panel
//! and `/api/v1/cloud` show of it.
//!
//! The depot never waits for the cloud: everything here runs beside the depot, which keeps
//! working on its last known desired state while the link is down.

pub mod db;
mod releases;
mod slices;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use atlasmesh_cloud_sync::client::{
    self, ClientOptions, Credentials, DepotSide, LinkState, OutboxEvent, OutboxStatus, Reported,
};
use atlasmesh_cloud_sync::desired::{DesiredRevision, Spec};
use atlasmesh_cloud_sync::server::Clock as MsClock;

use crate::audit::{self, Entry, Outcome};
use crate::config::CloudLinkConfig;
use crate::datadir::{ensure_dir, write_private};
use crate::http::Clock;
use crate::store::{Store, StoreError, unix_ms};

/// Where the credentials live, under the data dir; the file holds the key, so it is 0600.
pub const CREDENTIALS_FILE: &str = "cloud/credentials.json";

/// What the panel and API show.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LinkView {
    /// `off` (no cloud configured), `enrolling`, `connecting`, `online`, `offline` or
    /// `not_enrolled` (a cloud is configured but no token was given).
    pub state: &'static str,
    pub since_ms: Option<i64>,
    pub error: Option<String>,
    pub cloud_url: Option<String>,
    pub depot_id: Option<String>,
    pub depot_name: Option<String>,
    pub certificate_not_after_ms: Option<i64>,
}

impl LinkView {
    fn off() -> Self {
        Self {
            state: "off",
            since_ms: None,
            error: None,
            cloud_url: None,
            depot_id: None,
            depot_name: None,
            certificate_not_after_ms: None,
        }
    }
}

/// The outbox's figures, for the panel's warning.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OutboxView {
    pub pending: u64,
    pub dropped_total: u64,
    pub dropped_last_at: Option<i64>,
    pub max_bytes: u64,
    pub max_age_seconds: u64,
}

#[derive(Clone)]
struct Metrics {
    dropped: Counter,
    pending: Gauge,
    online: Gauge,
}

/// The link; cheap to share.
pub struct CloudLink {
    store: Store,
    config: CloudLinkConfig,
    data_dir: PathBuf,
    clock: Arc<dyn Clock>,
    view: watch::Sender<LinkView>,
    reporter: Reporter,
    metrics: Metrics,
    releases: Arc<releases::Releases>,
    slices: Arc<slices::Slices>,
}

/// Builds the reported objects from the depot's own views.
#[derive(Clone)]
pub struct Reporter {
    pub store: Store,
    pub ota: Arc<crate::ota::Ota>,
    pub rollouts: Arc<crate::rollouts::Rollouts>,
    pub charging: Arc<crate::charging::Charging>,
    pub depot_name: String,
    pub local_id: String,
    /// The same alarms that make `/health` degraded (a failing store disk, say).
    pub alarms: Vec<watch::Receiver<Option<String>>>,
}

impl CloudLink {
    /// Registers the metrics and, if a cloud is configured or the depot is already enrolled,
    /// starts the link in the background.
    pub fn start(
        store: Store,
        config: CloudLinkConfig,
        data_dir: PathBuf,
        clock: Arc<dyn Clock>,
        reporter: Reporter,
        registry: &mut Registry,
        shutdown: CancellationToken,
    ) -> Arc<Self> {
        let metrics = Metrics {
            dropped: Counter::default(),
            pending: Gauge::default(),
            online: Gauge::default(),
        };
        registry.register(
            "atlasmesh_cloud_outbox_dropped",
            "Events dropped from the cloud outbox because it reached its bound while the link was down",
            metrics.dropped.clone(),
        );
        registry.register(
            "atlasmesh_cloud_outbox_pending",
            "Events in the cloud outbox not yet acknowledged by the cloud",
            metrics.pending.clone(),
        );
        registry.register(
            "atlasmesh_cloud_link_up",
            "1 while a sync session with the cloud is open",
            metrics.online.clone(),
        );
        let (view, _) = watch::channel(LinkView::off());
        let releases = releases::Releases::new(
            reporter.ota.clone(),
            store.clone(),
            reporter.local_id.clone(),
        );
        let slices = slices::Slices::new(
            reporter.rollouts.clone(),
            reporter.ota.clone(),
            store.clone(),
        );
        let link = Arc::new(Self {
            releases,
            slices,
            store,
            config,
            data_dir,
            clock,
            view,
            reporter,
            metrics,
        });
        tokio::spawn(link.clone().run(shutdown));
        link
    }

    pub fn view(&self) -> LinkView {
        self.view.borrow().clone()
    }

    pub fn subscribe(&self) -> watch::Receiver<LinkView> {
        self.view.subscribe()
    }

    pub async fn outbox(&self) -> Result<OutboxView, StoreError> {
        let (status, enrolment) = self
            .store
            .read(|c| Ok::<_, StoreError>((db::outbox_status(c)?, db::enrolment(c)?)))
            .await?;
        Ok(OutboxView {
            pending: status.pending,
            dropped_total: status.dropped_total,
            dropped_last_at: enrolment.and_then(|e| e.dropped_last_at),
            max_bytes: self.config.outbox_max_bytes,
            max_age_seconds: self.config.outbox_max_age.as_secs(),
        })
    }

    fn now(&self) -> i64 {
        unix_ms(self.clock.now())
    }

    fn ms_clock(&self) -> MsClock {
        let clock = self.clock.clone();
        Arc::new(move || unix_ms(clock.now()))
    }

    fn set_view(&self, f: impl FnOnce(&mut LinkView)) {
        self.view.send_modify(f);
    }

    async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let creds_path = self.data_dir.join(CREDENTIALS_FILE);
        let stored = match std::fs::read(&creds_path) {
            Ok(bytes) => match serde_json::from_slice::<Credentials>(&bytes) {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::error!(path = %creds_path.display(), error = %e, "cloud credentials are unreadable; the link stays off");
                    self.set_view(|v| {
                        v.state = "offline";
                        v.error = Some(format!("{}: {e}", creds_path.display()));
                    });
                    return;
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => {
                tracing::error!(path = %creds_path.display(), error = %e, "cannot read the cloud credentials");
                return;
            }
        };
        let mut creds = match (stored, &self.config.url) {
            (None, None) => return,
            (Some(creds), _) => creds,
            (None, Some(url)) => match self.enroll(url, &shutdown).await {
                Some(creds) => creds,
                None => return,
            },
        };
        // The cloud may move; the identity stays.
        creds.cloud_url = self.config.url.clone().unwrap_or(creds.cloud_url);
        self.set_view(|v| {
            v.cloud_url = Some(creds.cloud_url.clone());
            v.depot_id = Some(creds.depot_id.clone());
            v.depot_name = Some(creds.depot_name.clone());
            v.certificate_not_after_ms = Some(creds.not_after_ms);
        });
        tokio::spawn(self.clone().prune(shutdown.clone()));
        self.releases.set_credentials(&creds);
        self.releases.spawn(shutdown.clone());
        self.slices.spawn(shutdown.clone());
        let options = ClientOptions {
            software_version: env!("CARGO_PKG_VERSION").to_owned(),
            report_interval: self.config.report_interval,
            ..ClientOptions::default()
        };
        let side = Arc::new(Side(self.clone()));
        client::run(side, creds, options, self.ms_clock(), shutdown).await;
    }

    /// Enrols with the configured token, retrying while the cloud is unreachable; `None` when
    /// there is no token, the token is refused, or on shutdown.
    async fn enroll(&self, url: &str, shutdown: &CancellationToken) -> Option<Credentials> {
        let Some(token) = self.config.enroll_token.clone() else {
            tracing::error!(cloud = %url, "a cloud is configured but this depot is not enrolled: start it once with --enroll-token TOKEN (from `atlasmesh cloud enroll-token --depot NAME`)");
            self.set_view(|v| {
                v.state = "not_enrolled";
                v.cloud_url = Some(url.to_owned());
                v.error = Some("not enrolled: start the depot once with --enroll-token".into());
            });
            return None;
        };
        let mut wait = Duration::from_secs(1);
        loop {
            self.set_view(|v| {
                v.state = "enrolling";
                v.cloud_url = Some(url.to_owned());
            });
            match client::enroll(url, &token, env!("CARGO_PKG_VERSION"), &self.ms_clock()).await {
                Ok(creds) => match self.keep_enrolment(&creds).await {
                    Ok(()) => {
                        tracing::info!(cloud = %url, depot = %creds.depot_name, depot_id = %creds.depot_id, "enrolled with the cloud");
                        return Some(creds);
                    }
                    Err(e) => {
                        tracing::error!(error = %e, "enrolled, but cannot keep the credentials; the token is spent: mint a new one");
                        self.set_view(|v| {
                            v.state = "offline";
                            v.error = Some(format!("keeping the credentials: {e}"));
                        });
                        return None;
                    }
                },
                Err(client::ClientError::Rpc {
                    code:
                        tonic::Code::Unauthenticated
                        | tonic::Code::PermissionDenied
                        | tonic::Code::InvalidArgument,
                    message,
                }) => {
                    tracing::error!(cloud = %url, %message, "the cloud refused the enrolment");
                    self.set_view(|v| {
                        v.state = "not_enrolled";
                        v.error = Some(format!("enrolment refused: {message}"));
                    });
                    return None;
                }
                Err(client::ClientError::BadToken(message)) => {
                    tracing::error!(%message, "the enrolment token is malformed");
                    self.set_view(|v| {
                        v.state = "not_enrolled";
                        v.error = Some(format!("enrolment token: {message}"));
                    });
                    return None;
                }
                Err(e) => {
                    tracing::warn!(cloud = %url, error = %e, retry_in_s = wait.as_secs(), "cannot enrol yet");
                    self.set_view(|v| {
                        v.state = "offline";
                        v.since_ms = Some(unix_ms(self.clock.now()));
                        v.error = Some(e.to_string());
                    });
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return None,
                _ = tokio::time::sleep(wait) => {}
            }
            wait = (wait * 2).min(Duration::from_secs(60));
        }
    }

    /// Writes the credentials (0600) and then the enrolment row, which turns the outbox on.
    async fn keep_enrolment(&self, creds: &Credentials) -> anyhow::Result<()> {
        self.save(creds)?;
        let (id, name, url, now) = (
            creds.depot_id.clone(),
            creds.depot_name.clone(),
            creds.cloud_url.clone(),
            self.now(),
        );
        self.store
            .write(move |tx| -> Result<(), StoreError> {
                db::set_enrolment(tx, &id, &name, &url, now)?;
                audit::record(
                    tx,
                    &Entry {
                        actor: "system".into(),
                        role: None,
                        action: "cloud.enroll".into(),
                        target: Some(name.clone()),
                        outcome: Outcome::Ok,
                        request_id: None,
                        detail: serde_json::json!({ "cloud_url": url, "depot_id": id }),
                    },
                    now,
                )?;
                Ok(())
            })
            .await?;
        Ok(())
    }

    fn save(&self, creds: &Credentials) -> anyhow::Result<()> {
        let path = self.data_dir.join(CREDENTIALS_FILE);
        if let Some(dir) = path.parent() {
            ensure_dir(dir)?;
        }
        write_private(&path, &serde_json::to_vec_pretty(creds)?)?;
        Ok(())
    }

    /// Keeps the outbox within its bounds once a minute.
    async fn prune(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(Duration::from_secs(60));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let now = self.now();
            let cutoff = now - self.config.outbox_max_age.as_millis() as i64;
            let max = self.config.outbox_max_bytes;
            match self
                .store
                .write(move |tx| db::prune_outbox(tx, cutoff, max, now))
                .await
            {
                Ok(0) => {}
                Ok(n) => {
                    self.metrics.dropped.inc_by(n);
                    tracing::warn!(
                        dropped = n,
                        "cloud outbox full or too old while the link is down: oldest events dropped"
                    );
                }
                Err(e) => tracing::error!(error = %e, "pruning the cloud outbox failed"),
            }
        }
    }
}

/// The sync client's view of this depot.
struct Side(Arc<CloudLink>);

fn text<E: std::fmt::Display>(e: E) -> String {
    e.to_string()
}

impl DepotSide for Side {
    async fn stored_revision(&self) -> Result<u64, String> {
        let enrolment = self.0.store.read(db::enrolment).await.map_err(text)?;
        Ok(enrolment.map_or(0, |e| e.desired_revision.max(0) as u64))
    }

    async fn store_desired(&self, revision: DesiredRevision) -> Result<(), String> {
        let now = self.0.now();
        let summary = serde_json::json!({
            "revision": revision.revision,
            "full": revision.full,
            "objects": revision.objects.iter().map(|o| serde_json::json!({
                "kind": o.kind, "key": o.key, "generation": o.generation, "spec": o.spec,
            })).collect::<Vec<_>>(),
        });
        self.0
            .store
            .write(move |tx| -> Result<(), StoreError> {
                db::store_desired(tx, &revision, now)?;
                audit::record(
                    tx,
                    &Entry {
                        actor: "cloud".into(),
                        role: None,
                        action: "cloud.desired".into(),
                        target: Some(format!("revision {}", revision.revision)),
                        outcome: Outcome::Ok,
                        request_id: None,
                        detail: summary,
                    },
                    now,
                )?;
                Ok(())
            })
            .await
            .map_err(text)?;
        // Site limit and tariff overrides take effect on the next plan; releases are staged.
        self.0.reporter.charging.replan();
        self.0.releases.nudge();
        self.0.slices.nudge();
        Ok(())
    }

    async fn outbox_after(
        &self,
        after: u64,
        max: usize,
        max_bytes: usize,
    ) -> Result<Vec<OutboxEvent>, String> {
        self.0
            .store
            .read(move |c| db::outbox_after(c, after, max, max_bytes))
            .await
            .map_err(text)
    }

    async fn outbox_acked(&self, sequence: u64) -> Result<(), String> {
        let status = self
            .0
            .store
            .write(move |tx| -> Result<OutboxStatus, StoreError> {
                db::outbox_acked(tx, sequence)?;
                db::outbox_status(tx)
            })
            .await
            .map_err(text)?;
        self.0.metrics.pending.set(status.pending as i64);
        Ok(())
    }

    async fn outbox_status(&self) -> Result<OutboxStatus, String> {
        let status = self.0.store.read(db::outbox_status).await.map_err(text)?;
        self.0.metrics.pending.set(status.pending as i64);
        Ok(status)
    }

    async fn reported(&self) -> Result<Vec<Reported>, String> {
        let mut out = self.0.reporter.reported().await.map_err(text)?;
        for r in self.0.releases.states() {
            out.push(Reported {
                kind: "release".into(),
                key: atlasmesh_cloud_sync::desired::release_key(&r.hardware_id, &r.version),
                observed_generation: r.generation,
                json: serde_json::to_string(&r).unwrap_or_default(),
            });
        }
        out.extend(self.0.slices.reported());
        Ok(out)
    }

    async fn identity(&self) -> (String, Vec<u8>) {
        (
            self.0.reporter.local_id.clone(),
            self.0.reporter.ota.director_root_v1().to_vec(),
        )
    }

    async fn welcomed(&self, fleet_root: Vec<u8>, director_certificate: Vec<u8>) {
        self.0
            .releases
            .welcomed(fleet_root, director_certificate)
            .await;
    }

    async fn save_credentials(&self, creds: &Credentials) -> Result<(), String> {
        self.0.save(creds).map_err(text)?;
        self.0.releases.set_credentials(creds);
        let not_after = creds.not_after_ms;
        self.0
            .set_view(|v| v.certificate_not_after_ms = Some(not_after));
        Ok(())
    }

    fn link_state(&self, state: LinkState) {
        self.0
            .metrics
            .online
            .set(i64::from(matches!(state, LinkState::Online { .. })));
        self.0.set_view(|v| match state {
            // Reconnect attempts do not hide that the link has been down since an earlier time.
            LinkState::Connecting => {
                if v.state != "offline" {
                    v.state = "connecting";
                }
            }
            LinkState::Online { since_ms } => {
                v.state = "online";
                v.since_ms = Some(since_ms);
                v.error = None;
            }
            LinkState::Offline { since_ms, error } => {
                if v.state != "offline" {
                    v.since_ms = Some(since_ms);
                }
                v.state = "offline";
                v.error = Some(error);
            }
        });
    }
}

impl Reporter {
    /// Every object the depot reports: itself, vehicles, bays, images, rollouts, disks and
    /// chargers, each as its own API shows it.
    pub async fn reported(&self) -> Result<Vec<Reported>, StoreError> {
        let (vehicles, bays, images, rollouts, disks, desired) = self
            .store
            .read(|c| {
                Ok::<_, StoreError>((
                    crate::link::db::list(c)?,
                    crate::link::db::bays(c)?,
                    crate::ota::db::images(c, false)?,
                    crate::rollouts::db::list(c)?,
                    crate::disks::db::list(c)?,
                    db::desired(c)?,
                ))
            })
            .await?;
        let site = self.charging.site().await?;
        let generation_of = |kind: &str| {
            desired
                .iter()
                .find(|d| d.kind == kind)
                .map_or(0, |d| d.generation.max(0) as u64)
        };
        let json = |v: serde_json::Value| v.to_string();
        let reasons: Vec<String> = self
            .alarms
            .iter()
            .filter_map(|a| a.borrow().clone())
            .collect();
        let mut out = Vec::new();
        out.push(Reported {
            kind: "depot".into(),
            key: "self".into(),
            observed_generation: 0,
            json: json(serde_json::json!({
                "health": if reasons.is_empty() { "healthy" } else { "degraded" },
                "reasons": reasons,
                "name": self.depot_name,
                "local_id": self.local_id,
                "version": env!("CARGO_PKG_VERSION"),
                "vehicles": vehicles.len(),
                "bays": bays.len(),
                "images": images.len(),
            })),
        });
        out.push(Reported {
            kind: "site_limit".into(),
            key: "site".into(),
            observed_generation: generation_of("site_limit"),
            json: json(
                serde_json::json!({ "limit_kw": site.limit_kw, "source": site.limit_source }),
            ),
        });
        out.push(Reported {
            kind: "tariff".into(),
            key: "site".into(),
            observed_generation: generation_of("tariff"),
            json: json(
                serde_json::json!({ "prices_per_kwh": site.tariff, "source": site.tariff_source }),
            ),
        });
        for v in vehicles {
            out.push(Reported {
                kind: "vehicle".into(),
                key: v.id.clone(),
                observed_generation: 0,
                json: serde_json::to_string(&v).unwrap_or_default(),
            });
        }
        for b in bays {
            out.push(Reported {
                kind: "bay".into(),
                key: b.bay.clone(),
                observed_generation: 0,
                json: serde_json::to_string(&b).unwrap_or_default(),
            });
        }
        for i in images {
            out.push(Reported {
                kind: "image".into(),
                key: format!("{}/{}", i.hardware_id, i.version),
                observed_generation: 0,
                json: serde_json::to_string(&i).unwrap_or_default(),
            });
        }
        for r in rollouts {
            out.push(Reported {
                kind: "rollout".into(),
                key: r.id.to_string(),
                observed_generation: 0,
                json: json(serde_json::json!({
                    "id": r.id, "hardware_id": r.hardware_id, "version": r.version,
                    "phase": r.phase, "created_at": r.created_at, "updated_at": r.updated_at,
                    "state": serde_json::from_str::<serde_json::Value>(&r.machine).unwrap_or_default(),
                })),
            });
        }
        for (id, view) in disks {
            out.push(Reported {
                kind: "disk".into(),
                key: id,
                observed_generation: 0,
                json: view,
            });
        }
        for c in self.charging.snapshot().chargers {
            out.push(Reported {
                kind: "charger".into(),
                key: c.id.clone(),
                observed_generation: 0,
                json: json(serde_json::json!({
                    "id": c.id, "bay": c.bay, "model": c.model, "status": c.status,
                    "error": c.error, "setpoint_a": c.setpoint_a, "vehicle": c.vehicle,
                    "power_w": c.reading.as_ref().map(|r| r.power_w),
                })),
            });
        }
        Ok(out)
    }
}

/// The cloud's overrides of the site, if the depot holds any.
pub fn site_overrides(
    conn: &rusqlite::Connection,
) -> Result<(Option<f64>, Option<Vec<f64>>), StoreError> {
    let mut limit = None;
    let mut tariff = None;
    for d in db::desired(conn)? {
        match d.spec {
            Spec::SiteLimit { limit_kw } => limit = Some(limit_kw),
            Spec::Tariff { prices_per_kwh } => tariff = Some(prices_per_kwh),
            Spec::Release { .. } | Spec::RolloutSlice { .. } => {}
        }
    }
    Ok((limit, tariff))
}
