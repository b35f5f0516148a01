//! Disk health of the depot's own disks. smartctl's JSON is read into typed structs
//! ([`smartctl`]) and judged with reasons ([`verdict`]); both are pure. Around them:
//! [`collect`] runs smartctl (scan, read, self-test), [`schedule`] decides when self-tests run
//! and how history is downsampled, [`db`] keeps views, history and alerts in the store, and
//! [`Disks`] ties it together: a reading of every device on an interval and on demand, alerts
//! on verdict changes (panel and webhook), metrics, and the hold on staging when the disk
//! holding the image store is failing.

pub mod collect;
pub mod db;
pub mod metrics;
pub mod schedule;
pub mod smartctl;
pub mod verdict;
mod webhook;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{Mutex, Notify, broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::config::DisksConfig;
use crate::http::{Clock, PanelEvent};
use crate::store::{Store, StoreError, unix_ms};
use collect::{DeviceSpec, Smartctl, SmartctlError};
use schedule::{QuietHours, TestKind};
use smartctl::{Report, SelfTest};
use verdict::{KeyAttribute, Reason, RemainingLife, Verdict};

/// How far back history goes into a verdict (rate rules look at a day, the wear trend at all).
const HISTORY_FOR_VERDICT: i64 = 400 * 86_400;

/// What the depot knows about one device after its latest reading.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DiskView {
    /// The serial number, or the device name for a device that reports none.
    pub id: String,
    /// As given to smartctl: `/dev/sda`, or `/dev/bus/0 -d megaraid,3`.
    pub device: String,
    pub protocol: Option<String>,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub firmware: Option<String>,
    pub capacity_bytes: Option<u64>,
    /// RPM; 0 for a solid-state device.
    pub rotation_rate: Option<u64>,
    pub verdict: Verdict,
    /// Most urgent first.
    pub reasons: Vec<Reason>,
    pub key_attributes: Vec<KeyAttribute>,
    pub remaining_life: Option<RemainingLife>,
    pub temperature_c: Option<i64>,
    pub power_on_hours: Option<u64>,
    /// smartctl's exit status and the names of its set bits.
    pub smartctl_exit_status: Option<u8>,
    pub smartctl_exit_bits: Vec<String>,
    pub smartctl_version: Option<String>,
    /// The drive's self-test log, newest first.
    pub self_tests: Vec<SelfTest>,
    /// When the depot last started each kind of self-test (RFC 3339).
    pub short_test_started: Option<String>,
    pub long_test_started: Option<String>,
    /// Holds the data directory, and so the image store.
    pub holds_store: bool,
    /// Why smartctl could not read the device, when it could not.
    pub error: Option<String>,
    pub read_at: String,
}

/// Every device after the latest collection.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Snapshot {
    pub enabled: bool,
    pub checked_at: Option<String>,
    /// Why no device list could be had (smartctl missing, its scan unreadable).
    pub error: Option<String>,
    /// The device found (or configured) to hold the image store.
    pub store_device: Option<String>,
    pub disks: Vec<DiskView>,
}

impl Snapshot {
    /// Why staging must stop, when the disk holding the image store is warning or failed.
    pub fn store_problem(&self) -> Option<String> {
        let disk = self
            .disks
            .iter()
            .find(|d| d.holds_store && d.verdict >= Verdict::Warning)?;
        let why = disk
            .reasons
            .first()
            .map(|r| r.message.as_str())
            .unwrap_or("no reason recorded");
        Some(format!(
            "the disk holding the image store ({}, serial {}) is {}: {why}",
            disk.device,
            disk.serial.as_deref().unwrap_or("unknown"),
            disk.verdict.as_str()
        ))
    }
}

pub struct DisksParts {
    pub config: DisksConfig,
    pub data_dir: PathBuf,
    pub depot_id: String,
    pub store: Store,
    pub clock: Arc<dyn Clock>,
    pub panel: broadcast::Sender<PanelEvent>,
}

/// The disk-health service of a running depot.
pub struct Disks {
    config: DisksConfig,
    quiet: Option<QuietHours>,
    smartctl: Smartctl,
    data_dir: PathBuf,
    store: Store,
    clock: Arc<dyn Clock>,
    panel: broadcast::Sender<PanelEvent>,
    metrics: metrics::DiskMetrics,
    state: watch::Sender<Snapshot>,
    alarm: watch::Sender<Option<String>>,
    /// One collection at a time: the timer's and on-demand ones queue.
    collecting: Mutex<()>,
    webhook_wake: Arc<Notify>,
}

impl Disks {
    /// Loads the last known views and starts the collector (when enabled) and the webhook.
    pub async fn start(
        parts: DisksParts,
        registry: &mut Registry,
        shutdown: CancellationToken,
    ) -> Result<Arc<Disks>, StoreError> {
        let quiet = QuietHours::parse(&parts.config.quiet_hours).ok().flatten();
        let known = parts.store.read(db::list).await?;
        let disks: Vec<DiskView> = known
            .iter()
            .filter_map(|(_, json)| serde_json::from_str(json).ok())
            .collect();
        let snapshot = Snapshot {
            enabled: parts.config.enabled,
            disks,
            ..Snapshot::default()
        };
        let alarm = snapshot.store_problem();
        let disks = Arc::new(Disks {
            smartctl: Smartctl::new(&parts.config.smartctl, parts.config.timeout),
            quiet,
            data_dir: parts.data_dir,
            store: parts.store,
            clock: parts.clock,
            panel: parts.panel,
            metrics: metrics::DiskMetrics::register(registry),
            state: watch::channel(snapshot).0,
            alarm: watch::channel(alarm).0,
            collecting: Mutex::new(()),
            webhook_wake: Arc::new(Notify::new()),
            config: parts.config,
        });
        if let Some(url) = disks.config.webhook.clone() {
            tokio::spawn(webhook::deliver(
                url,
                parts.depot_id,
                disks.store.clone(),
                disks.clock.clone(),
                disks.webhook_wake.clone(),
                shutdown.clone(),
            ));
        }
        if disks.config.enabled {
            tokio::spawn(disks.clone().run(shutdown));
        }
        Ok(disks)
    }

    async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut ticker = tokio::time::interval(self.config.interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            self.check_now().await;
        }
    }

    pub fn snapshot(&self) -> Snapshot {
        self.state.borrow().clone()
    }

    /// The reason the image store's disk stops staging, as it changes (`None`: all well).
    pub fn alarm(&self) -> watch::Receiver<Option<String>> {
        self.alarm.subscribe()
    }

    /// Reads every device now and records what changed; returns the new snapshot.
    pub async fn check_now(&self) -> Snapshot {
        if !self.config.enabled {
            return self.snapshot();
        }
        let _one = self.collecting.lock().await;
        let now = self.clock.now();
        let (now_ms, now_s) = (unix_ms(now), unix_ms(now).div_euclid(1000));
        let previous = self.snapshot();
        let (devices, error) = match device_list(&self.smartctl, &self.config.devices).await {
            Ok(devices) => (devices, None),
            Err(e) => {
                tracing::warn!(error = %e, "cannot list the disks to check");
                // The devices known so far stay listed, unknown, with the reason.
                let known = previous
                    .disks
                    .iter()
                    .filter_map(|d| DeviceSpec::parse(&d.device).ok())
                    .collect();
                (known, Some(e))
            }
        };
        let store_device = match &self.config.store_device {
            Some(d) => Some(d.clone()),
            None => {
                // sysinfo reads the mount table and calls statvfs: off the async workers.
                let dir = self.data_dir.clone();
                tokio::task::spawn_blocking(move || store_device_of(&dir))
                    .await
                    .ok()
                    .flatten()
            }
        };
        let mut views = Vec::new();
        let mut reports = Vec::new();
        for device in devices {
            let read = match &error {
                Some(e) => Err(e.to_string()),
                None => self.smartctl.read(&device).await.map_err(|e| e.to_string()),
            };
            let holds_store = store_device
                .as_deref()
                .is_some_and(|s| same_device(s, &device.name));
            let known_id = previous
                .disks
                .iter()
                .find(|d| d.device == device.to_string())
                .map(|d| d.id.clone());
            match self
                .record(&device, read, known_id, holds_store, now_ms, now_s)
                .await
            {
                Ok((view, report)) => {
                    reports.push((view.clone(), report));
                    views.push(view);
                }
                Err(e) => {
                    tracing::error!(device = %device, error = %e, "could not record a disk reading")
                }
            }
        }
        self.metrics.publish(&reports);
        let snapshot = Snapshot {
            enabled: true,
            checked_at: Some(crate::audit::rfc3339(now_ms)),
            error: error.map(|e| e.to_string()),
            store_device,
            disks: views,
        };
        let alarm = snapshot.store_problem();
        if alarm != *self.alarm.borrow() {
            match &alarm {
                Some(why) => tracing::error!(reason = %why, "staging new images is held"),
                None => tracing::info!("the image store's disk is healthy again; staging resumes"),
            }
            self.alarm.send_replace(alarm);
        }
        self.state.send_replace(snapshot.clone());
        let _ = self.panel.send(PanelEvent {
            kind: "disks",
            data: json!({"checked_at": snapshot.checked_at, "verdicts": snapshot.disks.iter().map(|d| (d.id.clone(), d.verdict)).collect::<Vec<_>>()}),
        });
        snapshot
    }

    /// Judges one reading against the device's history, stores it (view, sample, alert on a
    /// verdict change) in one transaction, and starts a self-test when one is due.
    async fn record(
        &self,
        device: &DeviceSpec,
        read: Result<Report, String>,
        known_id: Option<String>,
        holds_store: bool,
        now_ms: i64,
        now_s: i64,
    ) -> Result<(DiskView, Option<Report>), StoreError> {
        let id = match &read {
            Ok(r) => r.serial.clone().filter(|s| !s.trim().is_empty()),
            Err(_) => None,
        }
        .or(known_id)
        // Without a serial, the device name, made fit for a URL path segment.
        .unwrap_or_else(|| device.name.trim_start_matches("/dev/").replace('/', "-"));
        let (history, started) = {
            let id = id.clone();
            self.store
                .read(move |c| {
                    let history = db::history(c, &id, now_s - HISTORY_FOR_VERDICT)?;
                    Ok::<_, StoreError>((history, db::tests_started(c, &id)?))
                })
                .await?
        };
        let samples: Vec<_> = history.into_iter().map(|p| p.sample).collect();
        let (assessment, sample) = match &read {
            Ok(report) => (
                verdict::assess(report, &samples, now_s),
                Some(verdict::sample(report, now_s)),
            ),
            Err(e) => (verdict::unknown(e), None),
        };
        let mut view = DiskView {
            id: id.clone(),
            device: device.to_string(),
            protocol: None,
            model: None,
            serial: None,
            firmware: None,
            capacity_bytes: None,
            rotation_rate: None,
            verdict: assessment.verdict,
            reasons: assessment.reasons,
            key_attributes: assessment.key_attributes,
            remaining_life: assessment.remaining_life,
            temperature_c: None,
            power_on_hours: None,
            smartctl_exit_status: None,
            smartctl_exit_bits: Vec::new(),
            smartctl_version: None,
            self_tests: Vec::new(),
            short_test_started: started.0.map(|s| crate::audit::rfc3339(s * 1000)),
            long_test_started: started.1.map(|s| crate::audit::rfc3339(s * 1000)),
            holds_store,
            error: read.as_ref().err().cloned(),
            read_at: crate::audit::rfc3339(now_ms),
        };
        if let Ok(r) = &read {
            view.protocol = r.protocol.as_ref().map(|p| p.name().to_owned());
            view.model.clone_from(&r.model);
            view.serial.clone_from(&r.serial);
            view.firmware.clone_from(&r.firmware);
            view.capacity_bytes = r.capacity_bytes;
            view.rotation_rate = r.rotation_rate;
            view.temperature_c = r.temperature;
            view.power_on_hours = r.power_on_hours;
            view.smartctl_exit_status = r.exit_status.map(|s| s.0);
            view.smartctl_exit_bits = r
                .exit_status
                .map(|s| s.set_bits().iter().map(|b| b.code.to_owned()).collect())
                .unwrap_or_default();
            view.smartctl_version.clone_from(&r.smartctl_version);
            view.self_tests.clone_from(&r.self_tests);
        }
        let due = match &read {
            Ok(r) if r.has_health_data() => self.due_test(started, now_s),
            _ => None,
        };
        let json = serde_json::to_string(&view).expect("a disk view serialises");
        let webhook = self.config.webhook.is_some();
        let (stored_view, device_name, verdict) = (view.clone(), view.device.clone(), view.verdict);
        let alerted = self
            .store
            .write(move |tx| -> Result<Option<Option<Verdict>>, StoreError> {
                let before = db::upsert(tx, &id, &device_name, verdict, &json, now_ms)?;
                if let Some(sample) = &sample {
                    db::add_sample(tx, &id, sample)?;
                }
                // A verdict change is an alert; so is a device first seen in trouble.
                let changed = match before {
                    Some(b) => b != verdict,
                    None => verdict != Verdict::Passed,
                };
                if !changed {
                    return Ok(None);
                }
                let reasons = serde_json::to_value(&stored_view.reasons).unwrap_or_default();
                db::insert_alert(
                    tx,
                    &db::NewAlert {
                        disk: &id,
                        device: &device_name,
                        from: before,
                        to: verdict,
                        reasons: &reasons,
                        webhook,
                    },
                    now_ms,
                )?;
                Ok(Some(before))
            })
            .await?;
        if let Some(before) = alerted {
            let level_from = before.map(Verdict::as_str).unwrap_or("new");
            if view.verdict >= Verdict::Warning {
                tracing::warn!(disk = %view.id, device = %view.device, from = level_from, to = view.verdict.as_str(), reason = ?view.reasons.first().map(|r| &r.message), "disk verdict changed");
            } else {
                tracing::info!(disk = %view.id, device = %view.device, from = level_from, to = view.verdict.as_str(), "disk verdict changed");
            }
            let _ = self.panel.send(PanelEvent {
                kind: "disk_alert",
                data: json!({"disk": view.id, "device": view.device, "from": before, "to": view.verdict,
                             "reasons": view.reasons}),
            });
            self.webhook_wake.notify_one();
        }
        if let Some(kind) = due {
            let started = self.smartctl.start_test(device, kind).await;
            match &started {
                Ok(()) => {
                    tracing::info!(device = %device, kind = kind.as_str(), "started a self-test")
                }
                // Recorded all the same: a drive that refuses is asked again next period, not
                // every interval of tonight's quiet hours.
                Err(e) => {
                    tracing::warn!(device = %device, kind = kind.as_str(), error = %e, "could not start a self-test; trying again next period")
                }
            }
            let id = view.id.clone();
            self.store
                .write(move |tx| db::record_test(tx, &id, kind, now_s))
                .await?;
            if started.is_ok() {
                let at = crate::audit::rfc3339(now_s * 1000);
                match kind {
                    TestKind::Short => view.short_test_started = Some(at),
                    TestKind::Long => view.long_test_started = Some(at),
                }
            }
        }
        Ok((view, read.ok()))
    }

    fn due_test(&self, started: (Option<i64>, Option<i64>), now_s: i64) -> Option<TestKind> {
        let local = jiff::Timestamp::from_second(now_s)
            .ok()?
            .to_zoned(jiff::tz::TimeZone::system());
        let minute = (local.hour() as u16) * 60 + local.minute() as u16;
        schedule::due_test(
            self.quiet,
            minute,
            now_s,
            started.0,
            started.1,
            self.config.short_test_every,
            self.config.long_test_every,
        )
    }

    /// One device with its history (since `since`, unix seconds) and its recent alerts.
    pub async fn detail(
        &self,
        id: &str,
        since: i64,
    ) -> Result<Option<(DiskView, Vec<db::HistoryPoint>, Vec<db::Alert>)>, StoreError> {
        let id = id.to_owned();
        self.store
            .read(move |c| {
                let Some(json) = db::get(c, &id)? else {
                    return Ok(None);
                };
                let Ok(view) = serde_json::from_str::<DiskView>(&json) else {
                    return Ok(None);
                };
                let history = db::history(c, &id, since)?;
                let alerts = db::recent_alerts(c, Some(&id), 200)?;
                Ok(Some((view, history, alerts)))
            })
            .await
    }

    /// One device's history since `since` (unix seconds), oldest first.
    pub async fn history(&self, id: &str, since: i64) -> Result<Vec<db::HistoryPoint>, StoreError> {
        let id = id.to_owned();
        self.store.read(move |c| db::history(c, &id, since)).await
    }

    pub async fn alerts(&self, limit: i64) -> Result<Vec<db::Alert>, StoreError> {
        self.store
            .read(move |c| db::recent_alerts(c, None, limit))
            .await
    }
}

/// The configured devices (validated with the configuration), or every one the scan finds.
async fn device_list(
    smartctl: &Smartctl,
    configured: &[String],
) -> Result<Vec<DeviceSpec>, SmartctlError> {
    if configured.is_empty() {
        return smartctl.scan().await;
    }
    Ok(configured
        .iter()
        .filter_map(|d| DeviceSpec::parse(d).ok())
        .collect())
}

/// Whether the smartctl device `name` is the block device `store` (both may be symlinks, as
/// `/dev/disk/by-id/...` names are).
fn same_device(store: &str, name: &str) -> bool {
    if store == name {
        return true;
    }
    match (std::fs::canonicalize(store), std::fs::canonicalize(name)) {
        (Ok(a), Ok(b)) => a == b,
        _ => false,
    }
}

/// The whole disk (`/dev/vda`, not `/dev/vda1`) under the filesystem holding `dir`, when it is
/// a plain block device; `None` for LVM, RAID and overlay set-ups, which need
/// `disks.store_device`.
pub fn store_device_of(dir: &Path) -> Option<String> {
    let dir = std::fs::canonicalize(dir).ok()?;
    let disks = sysinfo::Disks::new_with_refreshed_list();
    let partition = disks
        .list()
        .iter()
        .filter(|d| dir.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())?
        .name()
        .to_str()?
        .to_owned();
    let short = partition.strip_prefix("/dev/")?;
    let sys = Path::new("/sys/class/block").join(short);
    if !sys.exists() {
        return None;
    }
    if sys.join("partition").exists() {
        // /sys/class/block/vda1 -> /sys/devices/.../block/vda/vda1: the parent is the disk.
        let real = std::fs::canonicalize(&sys).ok()?;
        let disk = real.parent()?.file_name()?.to_str()?;
        return Some(format!("/dev/{disk}"));
    }
    Some(partition)
}

/// `atlasmesh smart report`: one reading of every device smartctl can see, without a store.
pub async fn report_once(
    config: &DisksConfig,
) -> Result<Vec<(DeviceSpec, Result<(Report, verdict::Assessment), String>)>, SmartctlError> {
    let smartctl = Smartctl::new(&config.smartctl, config.timeout);
    let devices = device_list(&smartctl, &config.devices).await?;
    let now = unix_ms(std::time::SystemTime::now()).div_euclid(1000);
    let mut out = Vec::new();
    for device in devices {
        let read = smartctl
            .read(&device)
            .await
            .map(|r| {
                let a = verdict::assess(&r, &[], now);
                (r, a)
            })
            .map_err(|e| e.to_string());
        out.push((device, read));
    }
    Ok(out)
}
