//! The depot's image cache: staging jobs, the staged images and their garbage collection,
//! assignments and the director repository, the fleet trust anchor, and the bandwidth cap.
//! The trust decisions live in `atlasmesh-ota-staging`; this module runs them against the
//! depot store, the audit log and the panel.
//!
//! Layout under `<data_dir>/ota/`: `store/` (image packs, indexes, staging area), `mirror/`
//! (the fleet root, the mirrored image repository metadata, its datastore, the certifier key),
//! `director/` (keys, metadata, certificate).

pub mod db;
pub mod sources;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use atlasmesh_ota_staging::bandwidth::Bandwidth;
use atlasmesh_ota_staging::certificate::{CertificateError, CertifierKey, DepotCertificate};
use atlasmesh_ota_staging::chunks::ChunkIndex;
use atlasmesh_ota_staging::director::{
    self, Assignment, Director, DirectorError, DirectorExpiries,
};
use atlasmesh_ota_staging::meta::parse_version;
use atlasmesh_ota_staging::staging::{
    self, Location, Mirror, Policy, StagingError, VerifiedRelease, Wanted,
};
use atlasmesh_ota_staging::store::{ImageStore, Validation};
use atlasmesh_ota_staging::time::Clock;
use atlasmesh_ota_staging::trust::HttpTransport;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::registry::Registry;
use serde::Serialize;
use serde_json::json;
use tokio::sync::broadcast;
use tokio_util::sync::CancellationToken;
use url::Url;

use crate::audit::{self, Outcome};
use crate::config::OtaConfig;
use crate::http::PanelEvent;
use crate::store::{Store, StoreError, meta_get, meta_set, unix_ms};
use db::ImageRow;

/// Held while an image is staged (or the mirrored metadata refreshed): one at a time.
type StagingGuard = tokio::sync::OwnedMutexGuard<()>;

#[derive(Debug, thiserror::Error)]
pub enum OtaError {
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Ambiguous(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("staging job {0} is running; one image is staged at a time")]
    Busy(i64),
    #[error(transparent)]
    Certificate(#[from] CertificateError),
    #[error(transparent)]
    Director(#[from] DirectorError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

/// What a metadata-only refresh mirrored.
#[derive(Debug, Clone, serde::Serialize)]
pub struct MetadataRefreshed {
    pub timestamp_version: u64,
    pub timestamp_expires_ms: i64,
    pub targets_version: u64,
}

/// Who asked, for jobs and audit records.
#[derive(Debug, Clone)]
pub struct Actor {
    pub name: String,
    pub role: Option<crate::auth::Role>,
    pub request_id: Option<String>,
}

impl Actor {
    /// The audit record of `action` on `target`, done by this actor.
    pub fn entry(
        &self,
        action: &str,
        target: impl Into<String>,
        outcome: Outcome,
        detail: serde_json::Value,
    ) -> audit::Entry {
        audit::Entry {
            actor: self.name.clone(),
            role: self.role,
            action: action.into(),
            target: Some(target.into()),
            outcome,
            request_id: self.request_id.clone(),
            detail,
        }
    }
}

/// A staging job in progress, for the panel and `GET /api/v1/staging/{id}`.
#[derive(Debug, Clone, Serialize)]
pub struct LiveJob {
    pub id: i64,
    pub source: String,
    pub bytes_total: Option<u64>,
    #[serde(skip)]
    done: Arc<AtomicU64>,
}

impl LiveJob {
    pub fn bytes_done(&self) -> u64 {
        self.done.load(Ordering::Relaxed)
    }
}

/// The fleet root pinned in `data_dir`, if any, read before the image cache opens (where
/// [`Mirror`] keeps it).
pub fn pinned_fleet_root(data_dir: &std::path::Path) -> Option<Vec<u8>> {
    std::fs::read(data_dir.join("ota/mirror/fleet-root.json")).ok()
}

/// Where a staging job reads from.
#[derive(Debug, Clone)]
pub enum Source {
    Path(PathBuf),
    Url(Url),
    /// The cloud's image repository (`https://<cloud>/repository/`), reached with the depot's
    /// certificate; the image is assembled from chunks, fetching only those the store lacks.
    Cloud {
        base: Url,
        client: reqwest::Client,
    },
}

impl Source {
    fn location(&self) -> Result<Location, StagingError> {
        match self {
            Source::Path(dir) => Location::directory(dir),
            Source::Url(url) | Source::Cloud { base: url, .. } => Location::url(url.clone()),
        }
    }

    fn kind(&self) -> &'static str {
        match self {
            Source::Path(_) => "path",
            Source::Url(_) => "url",
            Source::Cloud { .. } => "cloud",
        }
    }
    fn describe(&self) -> String {
        match self {
            Source::Path(p) => p.display().to_string(),
            Source::Url(u) | Source::Cloud { base: u, .. } => u.to_string(),
        }
    }
}

/// OTA metrics, registered with the depot's registry.
#[derive(Clone)]
pub struct OtaMetrics {
    served_bytes: Family<KindLabels, Counter>,
    staging: Family<ResultLabels, Counter>,
    cloud_chunk_bytes: Family<SourceLabels, Counter>,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SourceLabels {
    source: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabels {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ResultLabels {
    result: &'static str,
}

impl OtaMetrics {
    pub fn register(registry: &mut Registry) -> Self {
        let served_bytes = Family::<KindLabels, Counter>::default();
        registry.register(
            "atlasmesh_ota_served_bytes",
            "Bytes served to vehicles, by kind (metadata, chunk, image)",
            served_bytes.clone(),
        );
        let staging = Family::<ResultLabels, Counter>::default();
        registry.register(
            "atlasmesh_ota_staging",
            "Staging attempts by result code",
            staging.clone(),
        );
        let cloud_chunk_bytes = Family::<SourceLabels, Counter>::default();
        registry.register(
            "atlasmesh_ota_cloud_chunk_bytes",
            "Bytes of images staged from the cloud, by where each chunk came from (reused from the store, fetched)",
            cloud_chunk_bytes.clone(),
        );
        Self {
            served_bytes,
            staging,
            cloud_chunk_bytes,
        }
    }

    /// The counter for one kind of served bytes.
    pub fn served(&self, kind: &'static str) -> Counter {
        self.served_bytes
            .get_or_create(&KindLabels { kind })
            .clone()
    }
}

pub struct Ota {
    pub store: Arc<ImageStore>,
    pub metrics: OtaMetrics,
    pub mirror: Mirror,
    pub director: Director,
    /// Cap on what vehicles pull from this depot.
    pub bandwidth: Bandwidth,
    download: Bandwidth,
    config: OtaConfig,
    http: reqwest::Client,
    db: Store,
    clock: Arc<dyn Clock>,
    events: broadcast::Sender<PanelEvent>,
    /// One staging at a time: the mirror and its datastore move forward one release at a time.
    staging_lock: Arc<tokio::sync::Mutex<()>>,
    publish_lock: tokio::sync::Mutex<()>,
    live: Mutex<Option<LiveJob>>,
    /// Staged images' indexes, by image SHA-256 (for serving and garbage collection).
    indexes: Mutex<BTreeMap<String, Arc<ChunkIndex>>>,
    /// Open image packs and their lengths: vehicles make thousands of range requests per image,
    /// and an open, stat and close each would be a tenth of the serving cost.
    packs: Mutex<HashMap<String, (Arc<std::fs::File>, u64)>>,
}

const BANDWIDTH_KEY: &str = "ota.bandwidth_bytes_per_second";

/// Times a URL download is resumed after the depot stopped under it before it is given up.
const MAX_RESUMES: i64 = 3;

fn staging_file(staging_dir: &Path, job: i64) -> PathBuf {
    staging_dir.join(format!("job-{job}.img"))
}

/// A cloud staging file is named by the image's hash, so a later job resumes it.
fn cloud_staging_file(staging_dir: &Path, sha256: &str) -> PathBuf {
    staging_dir.join(format!("cloud-{sha256}.img"))
}

fn is_cloud_partial(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("cloud-"))
        .and_then(|n| n.strip_suffix(".img"))
        .is_some_and(atlasmesh_ota_staging::chunks::is_sha256_hex)
}

impl Ota {
    /// Opens the cache: marks interrupted jobs and clears the staging they left, but for URL
    /// downloads it resumes; registers the staged images, opens (or creates) the director and
    /// publishes it if it needs to.
    pub async fn open(
        data_dir: &Path,
        config: &OtaConfig,
        db: Store,
        clock: Arc<dyn Clock>,
        events: broadcast::Sender<PanelEvent>,
        registry: &mut Registry,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, OtaError> {
        let root = data_dir.join("ota");
        let now = unix_ms(clock.now());
        let (interrupted, resumable, images, stored_rate) = db
            .write(move |tx| {
                let (n, resumable) = db::recover_running_jobs(tx, now, MAX_RESUMES)?;
                let images = db::images(tx, false)?;
                let rate = meta_get(tx, BANDWIDTH_KEY)?;
                Ok::<_, StoreError>((n, resumable, images, rate))
            })
            .await?;
        if interrupted > 0 {
            tracing::warn!(
                jobs = interrupted,
                "staging jobs were interrupted by a restart; nothing of them was kept"
            );
        }
        let keep: Vec<PathBuf> = resumable
            .iter()
            .map(|job| staging_file(&root.join("store").join("staging"), job.id))
            .collect();
        // Images from the cloud are staged under their hash: what of them verifies is kept
        // for the cloud link's next attempt.
        let (store, leftovers) = ImageStore::open(&root.join("store"), |p| {
            keep.iter().any(|k| k == p) || is_cloud_partial(p)
        })
        .map_err(|e| OtaError::Internal(format!("opening the image store: {e}")))?;
        if leftovers > 0 {
            tracing::warn!(
                files = leftovers,
                "removed partial staging files left by an interrupted depot"
            );
        }
        let mirror = Mirror::new(&root.join("mirror"))
            .map_err(|e| OtaError::Internal(format!("opening the mirror: {e}")))?;
        if let Some(path) = &config.fleet_root {
            let bytes = std::fs::read(path).map_err(|e| {
                OtaError::Invalid(format!("ota.fleet_root {}: {e}", path.display()))
            })?;
            if mirror.fleet_root().as_deref() != Some(&bytes[..]) {
                mirror.pin_root(&bytes)?;
                tracing::info!(path = %path.display(), "pinned the fleet root from ota.fleet_root");
            }
        }
        let director =
            Director::open(&root.join("director"), &*clock, DirectorExpiries::default()).await?;
        let rate = match stored_rate.and_then(|r| r.parse::<u64>().ok()) {
            Some(r) => Some(r),
            None => Some(config.bandwidth_bytes_per_second),
        }
        .filter(|r| *r > 0);
        let bandwidth = Bandwidth::new(rate);
        bandwidth.spawn_refill(shutdown.clone());
        let download = Bandwidth::new(Some(config.download_bytes_per_second).filter(|r| *r > 0));
        download.spawn_refill(shutdown.clone());

        let ota = Arc::new(Self {
            store: Arc::new(store),
            metrics: OtaMetrics::register(registry),
            mirror,
            director,
            bandwidth,
            download,
            config: config.clone(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(15))
                .read_timeout(Duration::from_secs(60))
                .build()
                .map_err(|e| OtaError::Internal(e.to_string()))?,
            db,
            clock,
            events,
            staging_lock: Arc::new(tokio::sync::Mutex::new(())),
            publish_lock: tokio::sync::Mutex::new(()),
            packs: Mutex::default(),
            live: Mutex::new(None),
            indexes: Mutex::new(BTreeMap::new()),
        });
        for image in images.iter().filter(|i| i.corrupt_at.is_none()) {
            match ota.store.read_index(&image.sha256) {
                Ok(index) if ota.store.pack_path(&image.sha256).is_file() => ota.register(index),
                Ok(_) | Err(_) => {
                    tracing::error!(version = %image.version, hardware = %image.hardware_id, "a staged image is missing from disk; it will not be served");
                    let (id, now) = (image.id, unix_ms(ota.clock.now()));
                    ota.db
                        .write(move |tx| db::set_corrupt(tx, id, Some(now)))
                        .await?;
                }
            }
        }
        let expiry = ota.director.timestamp_expiry();
        if expiry.is_none_or(|e| e <= ota.clock.now() + DirectorExpiries::default().timestamp / 2) {
            ota.publish_director().await?;
        }
        ota.clone().spawn_director_refresh(shutdown);
        ota.clone().spawn_resumes(resumable);
        Ok(ota)
    }

    /// Resumes the URL downloads a stopped depot left running, one after the other, each from
    /// the verified part of its staging file.
    fn spawn_resumes(self: Arc<Self>, jobs: Vec<db::JobRow>) {
        if jobs.is_empty() {
            return;
        }
        tokio::spawn(async move {
            for job in jobs {
                let (Some(hardware), Some(version)) = (job.hardware_id, job.version) else {
                    continue;
                };
                let url = match Url::parse(&job.source) {
                    Ok(url) => url,
                    Err(e) => {
                        tracing::error!(job = job.id, error = %e, "cannot resume staging: bad URL");
                        continue;
                    }
                };
                let guard = self.staging_lock.clone().lock_owned().await;
                let actor = Actor {
                    name: job.started_by,
                    role: None,
                    request_id: None,
                };
                tracing::info!(job = job.id, source = %url, resume = job.resumes, "resuming a staging job the depot stopped under");
                self.record(
                    &actor,
                    "image.stage.resume",
                    &format!("{hardware}/{version}"),
                    Outcome::Ok,
                    json!({"job": job.id, "source": url.as_str(), "resumes": job.resumes}),
                )
                .await;
                let _ = self
                    .run_job(job.id, Source::Url(url), hardware, version, actor, guard)
                    .await;
            }
        });
    }

    fn register(&self, index: ChunkIndex) {
        self.store.register(&index);
        self.indexes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(index.sha256.clone(), Arc::new(index));
    }

    fn unregister(&self, sha256: &str) {
        // Close the pack before anything else: a pack staged again later is a new file.
        self.packs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(sha256);
        let mut indexes = self.indexes.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(index) = indexes.remove(sha256) {
            let remaining: Vec<ChunkIndex> = indexes.values().map(|i| (**i).clone()).collect();
            self.store.unregister(&index, &remaining);
        }
    }

    /// Whether an image's pack may be served (staged, not deleted, not found damaged).
    pub fn is_served(&self, sha256: &str) -> bool {
        self.indexes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .contains_key(sha256)
    }

    /// The open pack of a served image and its length; `None` once the image is no longer
    /// served (deleted or found damaged), which also closes it.
    pub fn open_pack(&self, sha256: &str) -> Option<(Arc<std::fs::File>, u64)> {
        let mut packs = self.packs.lock().unwrap_or_else(|p| p.into_inner());
        if !self.is_served(sha256) {
            packs.remove(sha256);
            return None;
        }
        if let Some(open) = packs.get(sha256) {
            return Some(open.clone());
        }
        let file = std::fs::File::open(self.store.pack_path(sha256)).ok()?;
        let length = file.metadata().ok()?.len();
        let open = (Arc::new(file), length);
        packs.insert(sha256.to_owned(), open.clone());
        Some(open)
    }

    pub fn index(&self, sha256: &str) -> Option<Arc<ChunkIndex>> {
        self.indexes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(sha256)
            .cloned()
    }

    /// The staging lock, owned so a background job keeps it beyond the request that started it.
    fn try_staging_lock(&self) -> Result<StagingGuard, OtaError> {
        self.staging_lock
            .clone()
            .try_lock_owned()
            .map_err(|_| OtaError::Busy(self.live_job().map(|j| j.id).unwrap_or(0)))
    }

    pub fn live_job(&self) -> Option<LiveJob> {
        self.live.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    async fn record(
        &self,
        actor: &Actor,
        action: &str,
        target: &str,
        outcome: Outcome,
        detail: serde_json::Value,
    ) {
        let entry = actor.entry(action, target, outcome, detail);
        let now = unix_ms(self.clock.now());
        if let Err(e) = self
            .db
            .write(move |tx| audit::record(tx, &entry, now))
            .await
        {
            tracing::error!(error = %e, "could not write audit record");
        }
    }

    fn event(&self, kind: &'static str, data: serde_json::Value) {
        let _ = self.events.send(PanelEvent { kind, data });
    }

    /// The depot's staging policy, from configuration and what it has staged before.
    async fn policy(&self) -> Result<Policy, OtaError> {
        let all = self.db.read(|c| db::images(c, true)).await?;
        let mut by_hw: BTreeMap<String, Vec<semver::Version>> = BTreeMap::new();
        for image in &all {
            if let Ok(v) = parse_version(&image.version) {
                by_hw.entry(image.hardware_id.clone()).or_default().push(v);
            }
        }
        // The floor is the N-1 version: the depot keeps the newest two images, and staging
        // anything older than the older of them would be a rollback.
        let floors = by_hw
            .into_iter()
            .filter_map(|(hw, mut versions)| {
                versions.sort();
                versions.dedup();
                (versions.len() >= 2).then(|| (hw, versions[versions.len() - 2].clone()))
            })
            .collect();
        Ok(Policy {
            floors,
            hardware: self.config.hardware.clone(),
            reserve_bytes: self.config.reserve_bytes,
            staged: all
                .iter()
                .filter(|i| i.deleted_at.is_none())
                .map(|i| (i.hardware_id.clone(), i.version.clone()))
                .collect(),
        })
    }

    async fn verify(
        &self,
        location: &Location,
        hardware: &str,
        version: &str,
    ) -> Result<VerifiedRelease, StagingError> {
        self.verify_with(location, hardware, version, self.http.clone())
            .await
    }

    /// Verifies through `client` (the cloud's repository needs the depot's certificate).
    async fn verify_with(
        &self,
        location: &Location,
        hardware: &str,
        version: &str,
        client: reqwest::Client,
    ) -> Result<VerifiedRelease, StagingError> {
        let policy = self
            .policy()
            .await
            .map_err(|e| StagingError::Source(e.to_string()))?;
        staging::verify(
            &self.mirror,
            location,
            HttpTransport::new(client),
            Wanted { hardware, version },
            &policy,
            self.store.root(),
        )
        .await
    }

    fn begin_job(
        &self,
        id: i64,
        source: String,
        total: Option<u64>,
    ) -> (Arc<AtomicU64>, CancellationToken) {
        let done = Arc::new(AtomicU64::new(0));
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = Some(LiveJob {
            id,
            source,
            bytes_total: total,
            done: done.clone(),
        });
        // The panel hears of progress a few times a second, not once per block.
        let stop = CancellationToken::new();
        let (events, counter, ticker_stop) = (self.events.clone(), done.clone(), stop.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tokio::select! {
                    _ = ticker_stop.cancelled() => break,
                    _ = tick.tick() => {
                        let _ = events.send(PanelEvent { kind: "staging", data: json!({"job": id, "state": "running", "bytes_done": counter.load(Ordering::Relaxed), "bytes_total": total}) });
                    }
                }
            }
        });
        (done, stop)
    }

    fn set_total(&self, total: u64) {
        if let Some(live) = self.live.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            live.bytes_total = Some(total);
        }
    }

    /// Starts staging from a directory or URL in the background; returns the job id.
    pub async fn start_job(
        self: &Arc<Self>,
        source: Source,
        hardware: String,
        version: String,
        actor: Actor,
    ) -> Result<i64, OtaError> {
        let guard = self.try_staging_lock()?;
        let job = self
            .record_job(&source, &hardware, &version, &actor)
            .await?;
        let this = self.clone();
        tokio::spawn(async move {
            let _ = this
                .run_job(job, source, hardware, version, actor, guard)
                .await;
        });
        Ok(job)
    }

    /// Stages from a directory or URL and waits for the outcome (the demo fleet's releases).
    pub async fn stage_now(
        self: &Arc<Self>,
        source: Source,
        hardware: String,
        version: String,
        actor: Actor,
    ) -> Result<ImageRow, OtaError> {
        let guard = self.try_staging_lock()?;
        let job = self
            .record_job(&source, &hardware, &version, &actor)
            .await?;
        self.run_job(job, source, hardware, version, actor, guard)
            .await
    }

    async fn record_job(
        &self,
        source: &Source,
        hardware: &str,
        version: &str,
        actor: &Actor,
    ) -> Result<i64, OtaError> {
        let now = unix_ms(self.clock.now());
        let (kind, described, by) = (source.kind(), source.describe(), actor.name.clone());
        let (hw, ver) = (hardware.to_owned(), version.to_owned());
        Ok(self
            .db
            .write(move |tx| db::insert_job(tx, kind, &described, Some(&hw), Some(&ver), &by, now))
            .await?)
    }

    /// The director's first root: what the fleet certifier certifies.
    pub fn director_root_v1(&self) -> &[u8] {
        self.director.root_v1()
    }

    async fn run_job(
        self: &Arc<Self>,
        job: i64,
        source: Source,
        hardware: String,
        version: String,
        actor: Actor,
        staging_lock: StagingGuard,
    ) -> Result<ImageRow, OtaError> {
        let described = source.describe();
        let (done, stop) = self.begin_job(job, described.clone(), None);
        let mut staging_file = staging_file(&self.store.staging_dir(), job);
        let mut keep_partial = false;
        let result = async {
            let location = source.location()?;
            let via = match &source {
                Source::Cloud { client, .. } => client.clone(),
                _ => self.http.clone(),
            };
            let release = self
                .verify_with(&location, &hardware, &version, via)
                .await?;
            self.set_total(release.image.length);
            let image_url = location.image_url(&release.image)?;
            let handle = tokio::runtime::Handle::current();
            let (client, download) = (self.http.clone(), self.download.clone());
            let cloud = match &source {
                Source::Cloud { base, client } => {
                    staging_file =
                        cloud_staging_file(&self.store.staging_dir(), &release.image.sha256);
                    keep_partial = true;
                    Some((base.clone(), client.clone()))
                }
                _ => None,
            };
            let file = staging_file.clone();
            let counter = done.clone();
            let store = self.store.clone();
            // One statement each: the family's guard must be gone before the next lookup,
            // which may need its write lock.
            let reused = self
                .metrics
                .cloud_chunk_bytes
                .get_or_create(&SourceLabels { source: "reused" })
                .clone();
            let fetched = self
                .metrics
                .cloud_chunk_bytes
                .get_or_create(&SourceLabels { source: "fetched" })
                .clone();
            let stats = Arc::new(sources::ChunkStats {
                reused,
                fetched,
                ..Default::default()
            });
            let job_stats = stats.clone();
            let (release, ingested) =
                tokio::task::spawn_blocking(move || -> Result<_, StagingError> {
                    let mut resume = 0;
                    let reader: Box<dyn std::io::Read> = match (cloud, image_url.scheme()) {
                        (Some((base, client)), _) => {
                            resume = staging::resumable_prefix(&release, &file).map_err(|e| {
                                StagingError::Source(format!("reading {}: {e}", file.display()))
                            })?;
                            if resume > 0 {
                                tracing::info!(job, from_byte = resume, of = release.image.length, "resuming from the verified part of the staging file");
                            }
                            let rest: Vec<_> = release
                                .index
                                .chunks
                                .iter()
                                .filter(|c| c.offset >= resume)
                                .cloned()
                                .collect();
                            Box::new(sources::CloudChunks::start(
                                &handle, client, base, rest, store, download, job_stats,
                            ))
                        }
                        (None, "file") => {
                            let path = image_url.to_file_path().map_err(|()| {
                                StagingError::Source(format!("bad path {image_url}"))
                            })?;
                            Box::new(std::fs::File::open(&path).map_err(|e| {
                                StagingError::Source(format!("{}: {e}", path.display()))
                            })?)
                        }
                        (None, _) => {
                            // A download the depot stopped under goes on from what of it
                            // still verifies against the signed chunk index.
                            resume = staging::resumable_prefix(&release, &file).map_err(|e| {
                                StagingError::Source(format!("reading {}: {e}", file.display()))
                            })?;
                            if resume > 0 {
                                tracing::info!(job, from_byte = resume, of = release.image.length, "resuming the download from the verified part of the staging file");
                            }
                            Box::new(sources::Download::start(
                                &handle,
                                client,
                                image_url,
                                resume..release.image.length,
                                download,
                            ))
                        }
                    };
                    let ingested =
                        staging::ingest_image(&release, reader, &file, resume, |n| {
                            counter.store(n, Ordering::Relaxed)
                        })?;
                    Ok((release, ingested))
                })
                .await
                .map_err(|e| StagingError::Source(format!("staging task failed: {e}")))??;
            if keep_partial {
                let (reused, fetched) = (
                    stats.reused_bytes.load(Ordering::Relaxed),
                    stats.fetched_bytes.load(Ordering::Relaxed),
                );
                tracing::info!(
                    job,
                    reused_chunks = stats.reused_chunks.load(Ordering::Relaxed),
                    reused_bytes = reused,
                    fetched_chunks = stats.fetched_chunks.load(Ordering::Relaxed),
                    fetched_bytes = fetched,
                    "image assembled from the store's chunks and the cloud's"
                );
            }
            self.finish_staging(
                job,
                &described,
                release,
                ingested.length,
                &staging_file,
                &actor,
            )
            .await
        }
        .await;
        if result.is_err() && !keep_partial {
            let _ = std::fs::remove_file(&staging_file);
        }
        stop.cancel();
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.conclude(
            job,
            &described,
            &hardware,
            &version,
            done.load(Ordering::Relaxed),
            result,
            &actor,
            staging_lock,
        )
        .await
    }

    /// Removes cloud staging files for images no longer wanted (`keep` holds the hashes the
    /// cloud still asks for). Skipped while a job runs.
    pub fn discard_cloud_partials(&self, keep: &[String]) {
        let Ok(_guard) = self.staging_lock.clone().try_lock_owned() else {
            return;
        };
        let Ok(entries) = std::fs::read_dir(self.store.staging_dir()) else {
            return;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            let wanted = keep
                .iter()
                .any(|sha| cloud_staging_file(&self.store.staging_dir(), sha) == path);
            if is_cloud_partial(&path) && !wanted {
                tracing::info!(path = %path.display(), "removing a partial cloud download no longer wanted");
                let _ = std::fs::remove_file(&path);
            }
        }
    }

    /// Stages an uploaded release bundle, reading the upload as it arrives.
    pub async fn stage_upload(
        self: &Arc<Self>,
        body: impl std::io::Read + Send + 'static,
        wanted: Option<(String, String)>,
        actor: Actor,
    ) -> Result<(i64, ImageRow), (Option<i64>, OtaError)> {
        let guard = self.try_staging_lock().map_err(|e| (None, e))?;
        let now = unix_ms(self.clock.now());
        let by = actor.name.clone();
        let job = self
            .db
            .write(move |tx| db::insert_job(tx, "upload", "upload", None, None, &by, now))
            .await
            .map_err(|e| (None, e.into()))?;
        let (done, stop) = self.begin_job(job, "upload".into(), None);
        let staging_file = staging_file(&self.store.staging_dir(), job);
        let work_dir = self.store.staging_dir().join(format!("job-{job}"));
        let this = self.clone();
        let handle = tokio::runtime::Handle::current();
        let (file, work) = (staging_file.clone(), work_dir.clone());
        let counter = done.clone();
        let limit = self.config.max_upload_bytes;
        let outcome = tokio::task::spawn_blocking(move || {
            let wanted_ref = wanted.as_ref().map(|(h, v)| (h.as_str(), v.as_str()));
            let limited = std::io::Read::take(body, limit);
            sources::read_bundle(
                limited,
                &work,
                &file,
                wanted_ref,
                |location, hw, version| {
                    let release = handle.block_on(this.verify(location, hw, version))?;
                    this.set_total(release.image.length);
                    Ok(release)
                },
                |n| counter.store(n, Ordering::Relaxed),
            )
        })
        .await;
        let _ = std::fs::remove_dir_all(&work_dir);
        let (hw, ver) = match &outcome {
            Ok(Ok((release, _))) => (
                release.image.meta.hardware_id.clone(),
                release.image.meta.version.clone(),
            ),
            _ => (String::new(), String::new()),
        };
        let result = match outcome {
            Ok(Ok((release, ingested))) => {
                self.finish_staging(
                    job,
                    "upload",
                    release,
                    ingested.length,
                    &staging_file,
                    &actor,
                )
                .await
            }
            Ok(Err(e)) => {
                let _ = std::fs::remove_file(&staging_file);
                Err(e.into())
            }
            Err(e) => Err(OtaError::Internal(format!("staging task failed: {e}"))),
        };
        stop.cancel();
        *self.live.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.conclude(
            job,
            "upload",
            &hw,
            &ver,
            done.load(Ordering::Relaxed),
            result,
            &actor,
            guard,
        )
        .await
        .map(|image| (job, image))
        .map_err(|e| (Some(job), e))
    }

    /// Publishes a verified, ingested image and records it with its audit record.
    async fn finish_staging(
        self: &Arc<Self>,
        job: i64,
        source: &str,
        release: VerifiedRelease,
        length: u64,
        staging_file: &Path,
        actor: &Actor,
    ) -> Result<ImageRow, OtaError> {
        let (store, mirror, file) = (
            self.store.clone(),
            self.mirror.clone(),
            staging_file.to_owned(),
        );
        let release = tokio::task::spawn_blocking(move || {
            staging::publish(&store, &mirror, &release, &file)?;
            Ok::<_, StagingError>(release)
        })
        .await
        .map_err(|e| OtaError::Internal(e.to_string()))??;
        self.indexes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(
                release.index.sha256.clone(),
                Arc::new(release.index.clone()),
            );
        let now = unix_ms(self.clock.now());
        let image = release.image.clone();
        let entry = actor.entry(
            "image.stage",
            format!("{}/{}", image.meta.hardware_id, image.meta.version),
            Outcome::Ok,
            json!({"job": job, "source": source, "sha256": image.sha256, "length": length,
                   "chunks": release.index.chunks.len()}),
        );
        let (by, source) = (actor.name.clone(), source.to_owned());
        let chunk_count = release.index.chunks.len();
        let row = self
            .db
            .write(move |tx| {
                let id = db::insert_image(
                    tx,
                    &db::NewImage {
                        hardware_id: &image.meta.hardware_id,
                        version: &image.meta.version,
                        target: &image.target,
                        index_target: &image.index_target,
                        sha256: &image.sha256,
                        length: image.length,
                        chunk_count,
                        min_version: image.meta.min_version.as_deref(),
                        notes: image.meta.notes.as_deref(),
                        targets_version: image.targets_version,
                        targets_expires: unix_ms(image.targets_expires),
                        source: &source,
                        staged_by: &by,
                    },
                    now,
                )?;
                audit::record(tx, &entry, now)?;
                db::image_by_id(tx, id)?
                    .ok_or(StoreError::Integrity("staged image vanished".into()))
            })
            .await?;
        tracing::info!(hardware = %row.hardware_id, version = %row.version, sha256 = %row.sha256, "image staged");
        self.collect_garbage(&row.hardware_id).await?;
        Ok(row)
    }

    /// Records the end of a job (and a failed attempt's audit record) and tells the panel.
    ///
    /// The staging lock is let go before the end is recorded: a client that sees the job
    /// finished may start the next one at once, and must not be told the depot is busy.
    #[allow(clippy::too_many_arguments)]
    async fn conclude(
        &self,
        job: i64,
        source: &str,
        hardware: &str,
        version: &str,
        bytes_done: u64,
        result: Result<ImageRow, OtaError>,
        actor: &Actor,
        staging_lock: StagingGuard,
    ) -> Result<ImageRow, OtaError> {
        drop(staging_lock);
        let now = unix_ms(self.clock.now());
        let label = match &result {
            Ok(_) => "staged",
            Err(e) => error_code(e),
        };
        self.metrics
            .staging
            .get_or_create(&ResultLabels { result: label })
            .inc();
        let (state, code, message, image_id) = match &result {
            Ok(row) => ("staged", None, None, Some(row.id)),
            Err(e) => ("failed", Some(error_code(e)), Some(e.to_string()), None),
        };
        let (hw, ver) = match &result {
            Ok(row) => (Some(row.hardware_id.clone()), Some(row.version.clone())),
            Err(_) => (
                (!hardware.is_empty()).then(|| hardware.to_owned()),
                (!version.is_empty()).then(|| version.to_owned()),
            ),
        };
        let total = result.as_ref().ok().map(|r| r.length as u64);
        // A refusal's audit record goes in with the job's end: whoever sees the job failed
        // finds it audited too.
        let refusal = result.as_ref().err().map(|e| {
            tracing::warn!(job, source, code = code.unwrap_or(""), error = %e, "staging refused");
            let target = if hardware.is_empty() {
                source.to_owned()
            } else {
                format!("{hardware}/{version}")
            };
            actor.entry(
                "image.stage",
                target,
                Outcome::Failed,
                json!({"job": job, "source": source, "code": code, "message": message}),
            )
        });
        let (code_c, message_c) = (code.map(str::to_owned), message.clone());
        let write = self
            .db
            .write(move |tx| {
                db::finish_job(
                    tx,
                    job,
                    &db::JobEnd {
                        state,
                        bytes_done,
                        bytes_total: total,
                        hardware_id: hw.as_deref(),
                        version: ver.as_deref(),
                        error_code: code_c.as_deref(),
                        error: message_c.as_deref(),
                        image_id,
                    },
                    now,
                )?;
                if let Some(entry) = &refusal {
                    audit::record(tx, entry, now)?;
                }
                Ok::<_, StoreError>(())
            })
            .await;
        if let Err(e) = write {
            tracing::error!(error = %e, job, "could not record the end of a staging job");
        }
        self.event(
            "staging",
            json!({"job": job, "state": state, "code": code, "message": message}),
        );
        result
    }

    /// Keeps, per hardware, the newest image and the one before (N-1), and any image a vehicle
    /// is assigned; deletes the rest from disk.
    async fn collect_garbage(&self, hardware: &str) -> Result<(), OtaError> {
        let hw = hardware.to_owned();
        let candidates = self
            .db
            .read(move |c| {
                let mut images: Vec<ImageRow> = db::images(c, false)?
                    .into_iter()
                    .filter(|i| i.hardware_id == hw)
                    .collect();
                images.sort_by(|a, b| {
                    parse_version(&b.version)
                        .ok()
                        .cmp(&parse_version(&a.version).ok())
                });
                let mut out = Vec::new();
                for image in images.into_iter().skip(2) {
                    if db::assigned_count(c, image.id)? == 0 {
                        out.push(image);
                    }
                }
                Ok::<_, StoreError>(out)
            })
            .await?;
        for image in candidates {
            self.remove_image(&image).await?;
            self.record(
                &Actor {
                    name: "system".into(),
                    role: None,
                    request_id: None,
                },
                "image.gc",
                &format!("{}/{}", image.hardware_id, image.version),
                Outcome::Ok,
                json!({"reason": "older than N-1", "sha256": image.sha256}),
            )
            .await;
        }
        Ok(())
    }

    async fn remove_image(&self, image: &ImageRow) -> Result<(), OtaError> {
        self.unregister(&image.sha256);
        let (id, now) = (image.id, unix_ms(self.clock.now()));
        self.db
            .write(move |tx| db::mark_deleted(tx, id, now))
            .await?;
        // Another staged image may share the pack (same bytes, other version): keep it then.
        let sha = image.sha256.clone();
        let shared = self
            .db
            .read(move |c| {
                Ok::<_, StoreError>(db::images(c, false)?.iter().any(|i| i.sha256 == sha))
            })
            .await?;
        if !shared {
            self.store
                .remove(&image.sha256)
                .map_err(|e| OtaError::Internal(format!("removing {}: {e}", image.sha256)))?;
        }
        tracing::info!(hardware = %image.hardware_id, version = %image.version, "image removed");
        Ok(())
    }

    /// Finds a staged image by version, and hardware when the version alone is ambiguous.
    pub async fn find(&self, version: &str, hardware: Option<&str>) -> Result<ImageRow, OtaError> {
        let images = self.db.read(|c| db::images(c, false)).await?;
        let mut matches: Vec<ImageRow> = images
            .into_iter()
            .filter(|i| i.version == version && hardware.is_none_or(|h| h == i.hardware_id))
            .collect();
        match matches.len() {
            0 => Err(OtaError::NotFound(format!(
                "no staged image {version}{}",
                hardware.map(|h| format!(" for {h}")).unwrap_or_default()
            ))),
            1 => Ok(matches.remove(0)),
            _ => Err(OtaError::Ambiguous(format!(
                "version {version} is staged for several hardware ids; add ?hardware="
            ))),
        }
    }

    /// Deletes a staged image (technician), unless it is current or N-1 for its hardware, or
    /// assigned to a vehicle.
    pub async fn delete(&self, image: &ImageRow, actor: &Actor) -> Result<(), OtaError> {
        let (id, hw) = (image.id, image.hardware_id.clone());
        let (rank, assigned) = self
            .db
            .read(move |c| {
                let mut same: Vec<ImageRow> = db::images(c, false)?
                    .into_iter()
                    .filter(|i| i.hardware_id == hw)
                    .collect();
                same.sort_by(|a, b| {
                    parse_version(&b.version)
                        .ok()
                        .cmp(&parse_version(&a.version).ok())
                });
                let rank = same.iter().position(|i| i.id == id);
                Ok::<_, StoreError>((rank, db::assigned_count(c, id)?))
            })
            .await?;
        let target = format!("{}/{}", image.hardware_id, image.version);
        let refusal = match (rank, assigned) {
            (_, n) if n > 0 => Some(format!(
                "{target} is assigned to {n} vehicle(s); unassign it first"
            )),
            (Some(0), _) => Some(format!(
                "{target} is the current image for {}; stage a newer one first",
                image.hardware_id
            )),
            (Some(1), _) => Some(format!(
                "{target} is the N-1 image for {}, kept for rollback",
                image.hardware_id
            )),
            _ => None,
        };
        if let Some(message) = refusal {
            self.record(
                actor,
                "image.delete",
                &target,
                Outcome::Failed,
                json!({"message": message}),
            )
            .await;
            return Err(OtaError::Conflict(message));
        }
        self.remove_image(image).await?;
        self.record(
            actor,
            "image.delete",
            &target,
            Outcome::Ok,
            json!({"sha256": image.sha256}),
        )
        .await;
        Ok(())
    }

    /// Re-reads and re-hashes an image. A damaged image stops being served at once.
    pub async fn validate(&self, image: &ImageRow) -> Result<Validation, OtaError> {
        let index = match self.index(&image.sha256) {
            Some(index) => (*index).clone(),
            None => self.store.read_index(&image.sha256).map_err(|e| {
                OtaError::NotFound(format!(
                    "the chunk index of {} is unreadable: {e}",
                    image.version
                ))
            })?,
        };
        let store = self.store.clone();
        let report =
            tokio::task::spawn_blocking(move || store.validate(&index).map(|r| (r, index)))
                .await
                .map_err(|e| OtaError::Internal(e.to_string()))?;
        let (report, index) = match report {
            Ok(r) => r,
            Err(e) => {
                let missing = Validation {
                    ok: false,
                    length_ok: false,
                    sha256_ok: false,
                    chunks_checked: 0,
                    bad_chunks: Vec::new(),
                    bytes_read: 0,
                };
                tracing::error!(version = %image.version, error = %e, "image unreadable");
                self.quarantine(image).await?;
                return Ok(missing);
            }
        };
        if report.ok {
            if image.corrupt_at.is_some() {
                let id = image.id;
                self.db
                    .write(move |tx| db::set_corrupt(tx, id, None))
                    .await?;
                self.register(index);
            }
        } else {
            tracing::error!(version = %image.version, hardware = %image.hardware_id, bad_chunks = report.bad_chunks.len(), "image damaged on disk; no longer served");
            self.quarantine(image).await?;
        }
        Ok(report)
    }

    async fn quarantine(&self, image: &ImageRow) -> Result<(), OtaError> {
        self.unregister(&image.sha256);
        let (id, now) = (image.id, unix_ms(self.clock.now()));
        self.db
            .write(move |tx| db::set_corrupt(tx, id, Some(now)))
            .await?;
        self.event(
            "image",
            json!({"version": image.version, "hardware": image.hardware_id, "state": "damaged"}),
        );
        Ok(())
    }

    /// Assigns an image to a vehicle and publishes the director (technician).
    pub async fn assign(
        &self,
        vehicle: &str,
        image: &ImageRow,
        actor: &Actor,
    ) -> Result<director::Published, OtaError> {
        self.assign_many(vec![vehicle.to_owned()], image, actor)
            .await
    }

    /// Assigns an image to several vehicles (a canary wave): one transaction, one audit entry
    /// per vehicle, one director publication.
    pub async fn assign_many(
        &self,
        vehicles: Vec<String>,
        image: &ImageRow,
        actor: &Actor,
    ) -> Result<director::Published, OtaError> {
        for vehicle in &vehicles {
            director::validate_vehicle_id(vehicle).map_err(OtaError::Invalid)?;
        }
        if image.corrupt_at.is_some() {
            return Err(OtaError::Conflict(format!(
                "{}/{} is damaged on disk and cannot be assigned",
                image.hardware_id, image.version
            )));
        }
        let now = unix_ms(self.clock.now());
        let (id, by) = (image.id, actor.name.clone());
        let detail = json!({"hardware": image.hardware_id, "version": image.version, "sha256": image.sha256});
        let actor = actor.clone();
        self.db
            .write(move |tx| {
                for vehicle in vehicles {
                    db::assign(tx, &vehicle, id, &by, now)?;
                    let entry = actor.entry("assignment.set", vehicle, Outcome::Ok, detail.clone());
                    audit::record(tx, &entry, now)?;
                }
                Ok::<_, OtaError>(())
            })
            .await?;
        self.publish_director().await
    }

    pub async fn unassign(
        &self,
        vehicle: &str,
        actor: &Actor,
    ) -> Result<director::Published, OtaError> {
        match self.unassign_many(vec![vehicle.to_owned()], actor).await? {
            Some(published) => Ok(published),
            None => Err(OtaError::NotFound(format!(
                "vehicle {vehicle} has no assignment"
            ))),
        }
    }

    /// Withdraws the assignments these vehicles have (audited each); publishes the director
    /// once if any was removed.
    pub async fn unassign_many(
        &self,
        vehicles: Vec<String>,
        actor: &Actor,
    ) -> Result<Option<director::Published>, OtaError> {
        let now = unix_ms(self.clock.now());
        let actor = actor.clone();
        let removed = self
            .db
            .write(move |tx| {
                let mut removed = 0;
                for vehicle in vehicles {
                    if db::unassign(tx, &vehicle)? {
                        removed += 1;
                        let entry =
                            actor.entry("assignment.remove", vehicle, Outcome::Ok, json!({}));
                        audit::record(tx, &entry, now)?;
                    }
                }
                Ok::<_, StoreError>(removed)
            })
            .await?;
        if removed == 0 {
            return Ok(None);
        }
        Ok(Some(self.publish_director().await?))
    }

    /// Signs and publishes every current assignment with new versions.
    pub async fn publish_director(&self) -> Result<director::Published, OtaError> {
        let _guard = self.publish_lock.lock().await;
        let rows = self
            .db
            .read(|c| {
                let mut out = Vec::new();
                for a in db::assignments(c)? {
                    if let Some(image) = db::image_by_id(c, a.image_id)? {
                        out.push((a, image));
                    }
                }
                Ok::<_, StoreError>(out)
            })
            .await?;
        let assignments: Vec<Assignment> = rows
            .into_iter()
            .map(|(a, image)| Assignment {
                vehicle_id: a.vehicle_id,
                image_target: image.target,
                version: image.version,
                hardware_id: image.hardware_id,
                length: image.length as u64,
                sha256: image.sha256,
                chunk_index: image.index_target,
                assigned_at: crate::audit::rfc3339(a.assigned_at),
            })
            .collect();
        let published = self
            .director
            .publish(&assignments, &*self.clock, DirectorExpiries::default())
            .await?;
        tracing::info!(
            assignments = assignments.len(),
            timestamp_version = published.timestamp_version,
            "director published"
        );
        self.event(
            "director",
            json!({"published": published, "assignments": assignments.len()}),
        );
        Ok(published)
    }

    fn spawn_director_refresh(self: Arc<Self>, shutdown: CancellationToken) {
        let every = self.config.director_refresh;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => break,
                    _ = tick.tick() => {}
                }
                if let Err(e) = self.publish_director().await {
                    tracing::error!(error = %e, "could not refresh the director metadata");
                }
            }
        });
    }

    /// Mirrors the fleet's current image-repository metadata without staging an image: the
    /// way a depot whose vehicles stay docked for long keeps the timestamp they check fresh
    /// after release engineering re-signs it (`atlasmesh release refresh`). Verified from the
    /// pinned root like any staging, so an older or forged copy is refused; audited.
    pub async fn refresh_metadata(
        &self,
        source: Source,
        actor: &Actor,
    ) -> Result<MetadataRefreshed, OtaError> {
        let _guard = self.try_staging_lock()?;
        let described = source.describe();
        let result = async {
            let location = source.location()?;
            let transport = HttpTransport::new(self.http.clone());
            let verified = staging::verify_metadata(&self.mirror, &location, transport).await?;
            let mirror = self.mirror.clone();
            tokio::task::spawn_blocking(move || {
                staging::publish_metadata(&mirror, &verified).map(|()| verified)
            })
            .await
            .map_err(|e| OtaError::Internal(format!("mirroring task failed: {e}")))?
            .map_err(OtaError::from)
        }
        .await;
        let (outcome, detail) = match &result {
            Ok(m) => (
                Outcome::Ok,
                json!({"source": described, "timestamp_version": m.timestamp_version, "timestamp_expires": unix_ms(m.timestamp_expires), "targets_version": m.targets_version}),
            ),
            Err(e) => (
                Outcome::Failed,
                json!({"source": described, "code": error_code(e), "error": e.to_string()}),
            ),
        };
        self.record(
            actor,
            "image.metadata_refresh",
            "image-repository",
            outcome,
            detail,
        )
        .await;
        let verified = result?;
        Ok(MetadataRefreshed {
            timestamp_version: verified.timestamp_version,
            timestamp_expires_ms: unix_ms(verified.timestamp_expires),
            targets_version: verified.targets_version,
        })
    }

    pub async fn set_bandwidth(&self, rate: Option<u64>, actor: &Actor) -> Result<(), OtaError> {
        let rate = rate.filter(|r| *r > 0);
        self.bandwidth.set_rate(rate);
        let now = unix_ms(self.clock.now());
        let entry = actor.entry(
            "bandwidth.set",
            "depot",
            Outcome::Ok,
            json!({"bytes_per_second": rate}),
        );
        self.db
            .write(move |tx| {
                meta_set(tx, BANDWIDTH_KEY, &rate.unwrap_or(0).to_string())?;
                audit::record(tx, &entry, now)
            })
            .await?;
        Ok(())
    }

    pub async fn pin_fleet_root(&self, root: &[u8], actor: &Actor) -> Result<(), OtaError> {
        let result = self.mirror.pin_root(root);
        let outcome = if result.is_ok() {
            Outcome::Ok
        } else {
            Outcome::Failed
        };
        use sha2::Digest;
        let detail = json!({"sha256": hex::encode(sha2::Sha256::digest(root)), "error": result.as_ref().err().map(|e| e.to_string())});
        self.record(actor, "ota.fleet_root", "fleet-root", outcome, detail)
            .await;
        Ok(result?)
    }

    /// Installs the fleet's certificate for this depot's director, after checking it.
    pub async fn install_certificate(
        &self,
        bytes: &[u8],
        depot_id: &str,
        actor: &Actor,
    ) -> Result<DepotCertificate, OtaError> {
        let checked = (|| {
            let certifier_doc = std::fs::read(self.mirror.certifier_path())
                .map_err(|_| OtaError::Conflict("the fleet certifier key arrives with the first staged release; stage one first".into()))?;
            let certifier = CertifierKey::parse(&certifier_doc)?;
            let cert = DepotCertificate::parse(bytes)?;
            cert.verify(
                &certifier,
                Some(depot_id),
                self.director.root_v1(),
                self.clock.now(),
            )?;
            Ok::<_, OtaError>(cert)
        })();
        match checked {
            Ok(cert) => {
                let path = self.director.certificate_path();
                crate::datadir::write_private(&path, &cert.to_json())
                    .map_err(|e| OtaError::Internal(format!("writing {}: {e}", path.display())))?;
                // Vehicles read it without credentials; it holds nothing secret.
                let _ = std::fs::set_permissions(
                    &path,
                    std::os::unix::fs::PermissionsExt::from_mode(0o644),
                );
                self.record(
                    actor,
                    "director.certificate",
                    depot_id,
                    Outcome::Ok,
                    json!({"expires": cert.signed.expires}),
                )
                .await;
                Ok(cert)
            }
            Err(e) => {
                self.record(
                    actor,
                    "director.certificate",
                    depot_id,
                    Outcome::Failed,
                    json!({"message": e.to_string()}),
                )
                .await;
                Err(e)
            }
        }
    }

    pub fn has_fleet_root(&self) -> bool {
        self.mirror.fleet_root().is_some()
    }

    pub fn certificate(&self) -> Option<DepotCertificate> {
        std::fs::read(self.director.certificate_path())
            .ok()
            .and_then(|b| DepotCertificate::parse(&b).ok())
    }

    pub fn timestamp_expires(&self) -> Option<SystemTime> {
        self.mirror.timestamp_expires()
    }
}

/// A machine-readable code for any OTA error.
pub fn error_code(e: &OtaError) -> &'static str {
    match e {
        OtaError::Staging(s) => s.code(),
        OtaError::NotFound(_) => "not_found",
        OtaError::Ambiguous(_) => "ambiguous",
        OtaError::Conflict(_) => "conflict",
        OtaError::Invalid(_) => "invalid_request",
        OtaError::Busy(_) => "busy",
        OtaError::Certificate(_) => "bad_certificate",
        OtaError::Director(_) => "director_error",
        OtaError::Store(_) => "internal",
        OtaError::Internal(_) => "internal",
    }
}
