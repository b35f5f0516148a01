//! The reference vehicle OTA client: what a docked vehicle does to learn, verify and fetch the
//! image its depot assigned it, across as many dock sessions as it takes.
//!
//! Verification follows Uptane's full verification over two plain TUF repositories:
//!
//! 1. the fleet's image repository (mirrored by the depot), from the fleet root the vehicle was
//!    provisioned with; from it, the fleet certifier key;
//! 2. the depot's certificate, signed by that key, binding the depot id to the hash of the
//!    depot's director root; then the director repository from that root;
//! 3. the director's target for this vehicle must name an image whose length and hashes equal
//!    the image repository's target of that name, for this vehicle's hardware, not below the
//!    installed version, and allowed to upgrade from it.
//!
//! The image is then assembled in the inactive slot from chunks of the signed chunk index:
//! those the current slot already holds are copied locally, the rest fetched by hash. Progress
//! is kept in the state directory (after the slot is synced), so an interrupted pull resumes
//! without refetching a verified chunk. Every chunk and the final image are hash-checked.

use std::collections::HashMap;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use atlasmesh_ota_staging::certificate::{CertificateError, CertifierKey, DepotCertificate};
use atlasmesh_ota_staging::chunks::{self, ChunkIndex};
use atlasmesh_ota_staging::director::vehicle_target_name;
use atlasmesh_ota_staging::meta::{ImageMeta, parse_version};
use atlasmesh_ota_staging::release::CERTIFIER_TARGET;
use atlasmesh_ota_staging::trust::{self, HttpTransport, TrustError};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tough::{ExpirationEnforcement, Repository, TargetName};
use url::Url;

#[derive(Debug, thiserror::Error)]
pub enum PullError {
    #[error("this vehicle is not provisioned: {0}")]
    Provision(String),
    #[error("{repo} repository refused: {source}")]
    Metadata {
        repo: &'static str,
        source: TrustError,
    },
    #[error("depot certificate refused: {0}")]
    Certificate(#[from] CertificateError),
    #[error("the assignment is for vehicle {named:?}, not this one ({own:?})")]
    WrongVehicle { named: String, own: String },
    #[error("the director's assignment does not match the image repository: {0}")]
    AssignmentMismatch(String),
    #[error("assigned image is for hardware {assigned}, this vehicle is {own}")]
    Hardware { assigned: String, own: String },
    #[error(
        "assigned version {assigned} is lower than the installed {installed} (rollback refused)"
    )]
    Downgrade { assigned: String, installed: String },
    #[error(
        "version {assigned} may only be installed over {minimum} or later; this vehicle runs {installed}"
    )]
    BelowMinimum {
        assigned: String,
        minimum: String,
        installed: String,
    },
    #[error("cannot tell what this vehicle runs: {0}")]
    UnknownInstalled(String),
    #[error("chunk {index} ({sha256}) failed its hash check")]
    ChunkHash { index: usize, sha256: String },
    #[error("the assembled image hashes to {actual}, not the signed {expected}")]
    ImageHash { expected: String, actual: String },
    #[error("fetching {url}: {message}")]
    Http { url: String, message: String },
    /// Endless data: a response longer than what was signed (or than any metadata may be).
    #[error("{url} sent more than the expected {limit} bytes; refused")]
    TooLarge { url: String, limit: u64 },
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

impl PullError {
    pub fn code(&self) -> &'static str {
        match self {
            PullError::Provision(_) => "not_provisioned",
            PullError::Metadata { source, .. } => source.code(),
            PullError::Certificate(_) => "bad_certificate",
            PullError::WrongVehicle { .. } => "wrong_vehicle",
            PullError::AssignmentMismatch(_) => "assignment_mismatch",
            PullError::Hardware { .. } => "hardware_mismatch",
            PullError::Downgrade { .. } => "downgrade",
            PullError::BelowMinimum { .. } => "below_minimum",
            PullError::UnknownInstalled(_) => "unknown_installed",
            PullError::ChunkHash { .. } => "chunk_hash",
            PullError::ImageHash { .. } => "image_hash",
            PullError::Http { .. } => "http",
            PullError::TooLarge { .. } => "too_large",
            PullError::Io { .. } => "io",
        }
    }
    /// The depot could not be reached or a transfer broke off: trying again later resumes the
    /// pull, so a vehicle retries instead of reporting a failed update.
    pub fn is_transient(&self) -> bool {
        matches!(self.code(), "fetch_failed" | "http")
    }

    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> PullError {
        let context = context.into();
        move |source| PullError::Io { context, source }
    }
}

/// What a pull is asked to do.
#[derive(Debug, Clone)]
pub struct PullConfig {
    /// The depot's base URL, e.g. `http://depot.local:8080/`.
    pub depot: Url,
    pub vehicle_id: String,
    /// Holds `fleet-root.json` (provisioned), the TUF datastores and pull progress.
    pub state_dir: PathBuf,
    /// The inactive slot to write.
    pub slot: PathBuf,
    /// The running slot's image: its chunks are reused, and its hash tells what is installed.
    pub current: Option<PathBuf>,
    /// Used when the current image is not a release the fleet knows (e.g. a factory image).
    pub hardware_id: Option<String>,
    pub installed_version: Option<String>,
    /// Refuse a depot whose certificate names another id.
    pub expected_depot: Option<String>,
    /// Parallel chunk requests.
    pub concurrency: usize,
    /// Stop after fetching this many chunks (an undocking, for tests and the simulator).
    pub stop_after_chunks: Option<usize>,
}

#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum Outcome {
    /// The director has nothing for this vehicle.
    NoAssignment,
    /// The assigned version is what the vehicle runs.
    UpToDate { version: String },
    /// The inactive slot now holds the assigned image, verified.
    Written {
        version: String,
        sha256: String,
        image_target: String,
    },
    /// Stopped before the end; the next pull resumes.
    Interrupted {
        chunks_done: usize,
        chunks_total: usize,
    },
}

#[derive(Debug, Clone, Serialize)]
pub struct PullReport {
    pub outcome: Outcome,
    pub depot_id: Option<String>,
    pub installed_version: Option<String>,
    pub chunks_total: usize,
    /// Already present from an earlier, interrupted pull.
    pub chunks_resumed: usize,
    pub chunks_reused: usize,
    pub bytes_reused: u64,
    pub chunks_fetched: usize,
    /// Bytes of chunk bodies fetched from the depot in this pull.
    pub bytes_fetched: u64,
    pub seconds: f64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Progress {
    image_sha256: String,
    chunks: usize,
    /// One bit per chunk, hex.
    done: String,
}

struct Bitmap(Vec<u8>);

impl Bitmap {
    fn new(n: usize) -> Self {
        Bitmap(vec![0; n.div_ceil(8)])
    }
    fn get(&self, i: usize) -> bool {
        self.0[i / 8] & (1 << (i % 8)) != 0
    }
    fn set(&mut self, i: usize) {
        self.0[i / 8] |= 1 << (i % 8);
    }
    fn count(&self) -> usize {
        self.0.iter().map(|b| b.count_ones() as usize).sum()
    }
}

fn client() -> reqwest::Client {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(10))
        // Slow retrieval: a request that cannot finish in this time is abandoned and retried
        // on the next pull, instead of hanging the vehicle.
        .timeout(Duration::from_secs(120))
        .build()
        .expect("HTTP client")
}

async fn get_limited(
    client: &reqwest::Client,
    url: Url,
    limit: u64,
) -> Result<Option<Vec<u8>>, PullError> {
    let http = |message: String| PullError::Http {
        url: url.to_string(),
        message,
    };
    let response = client
        .get(url.clone())
        .send()
        .await
        .map_err(|e| http(e.to_string()))?;
    if response.status() == reqwest::StatusCode::NOT_FOUND {
        return Ok(None);
    }
    if !response.status().is_success() {
        return Err(http(format!("HTTP {}", response.status())));
    }
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    while let Some(piece) = stream.next().await {
        let piece = piece.map_err(|e| http(e.to_string()))?;
        // Endless data: never accept more than expected.
        if (body.len() + piece.len()) as u64 > limit {
            return Err(PullError::TooLarge {
                url: url.to_string(),
                limit,
            });
        }
        body.extend_from_slice(&piece);
    }
    Ok(Some(body))
}

fn join(base: &Url, path: &str) -> Url {
    trust::dir_url(base.clone())
        .join(path)
        .expect("relative URL joins")
}

fn image_targets(repo: &Repository) -> impl Iterator<Item = (String, &tough::schema::Target)> {
    repo.targets()
        .signed
        .targets
        .iter()
        .map(|(name, t)| (name.raw().to_owned(), t))
}

/// Runs one pull. See the module documentation for what it checks.
pub async fn pull(cfg: &PullConfig) -> Result<PullReport, PullError> {
    let started = Instant::now();
    let fleet_root = fs::read(cfg.state_dir.join("fleet-root.json")).map_err(|e| {
        PullError::Provision(format!(
            "{}: {e} (provision with --fleet-root)",
            cfg.state_dir.join("fleet-root.json").display()
        ))
    })?;
    let http = client();
    let transport = HttpTransport::new(http.clone());
    let metadata_err =
        |repo: &'static str| move |source: TrustError| PullError::Metadata { repo, source };

    // 1. The fleet's image repository, as mirrored by the depot.
    let image_repo = trust::load(
        &fleet_root,
        join(&cfg.depot, "tuf/image/metadata/"),
        join(&cfg.depot, "tuf/image/targets/"),
        &cfg.state_dir.join("image-repository"),
        transport.clone(),
        ExpirationEnforcement::Safe,
    )
    .await
    .map_err(metadata_err("image"))?;
    let certifier_doc = trust::read_small_target(&image_repo, CERTIFIER_TARGET)
        .await
        .map_err(metadata_err("image"))?;
    let certifier = CertifierKey::parse(&certifier_doc)?;

    // 2. The depot's certificate and its director repository.
    let cert_bytes = get_limited(
        &http,
        join(&cfg.depot, "tuf/director/certificate.json"),
        64 * 1024,
    )
    .await?
    .ok_or_else(|| {
        CertificateError::Malformed("the depot has no fleet certificate for its director".into())
    })?;
    let cert = DepotCertificate::parse(&cert_bytes)?;
    let director_root = get_limited(
        &http,
        join(&cfg.depot, "tuf/director/metadata/1.root.json"),
        1024 * 1024,
    )
    .await?
    .ok_or_else(|| CertificateError::Malformed("the depot serves no director root".into()))?;
    cert.verify(
        &certifier,
        cfg.expected_depot.as_deref(),
        &director_root,
        SystemTime::now(),
    )?;
    let depot_id = cert.signed.depot_id.clone();
    let director = trust::load(
        &director_root,
        join(&cfg.depot, "tuf/director/metadata/"),
        join(&cfg.depot, "tuf/director/targets/"),
        &cfg.state_dir.join("director").join(&depot_id),
        transport,
        ExpirationEnforcement::Safe,
    )
    .await
    .map_err(metadata_err("director"))?;

    // What does this vehicle run? The current slot's hash, looked up among signed images.
    let (current_index, current_sha) = match &cfg.current {
        Some(path) => {
            let path = path.clone();
            let got = tokio::task::spawn_blocking(move || -> io::Result<chunks::Ingested> {
                let file = File::open(&path)?;
                chunks::ingest(
                    io::BufReader::with_capacity(1 << 20, file),
                    &mut io::sink(),
                    |_| {},
                )
            })
            .await
            .map_err(|e| PullError::io("indexing the current slot")(io::Error::other(e)))?
            .map_err(PullError::io("reading the current slot"))?;
            (Some(got.index), Some(got.sha256))
        }
        None => (None, None),
    };
    let known = current_sha.as_ref().and_then(|sha| {
        image_targets(&image_repo).find_map(|(_, t)| {
            (hex::encode(&*t.hashes.sha256) == *sha)
                .then(|| ImageMeta::from_custom(&t.custom))
                .flatten()
        })
    });
    let (own_hardware, installed) = match (&known, &cfg.hardware_id) {
        (Some((meta, _)), _) => (meta.hardware_id.clone(), Some(meta.version.clone())),
        (None, Some(hw)) => (hw.clone(), cfg.installed_version.clone()),
        (None, None) => {
            return Err(PullError::UnknownInstalled(
                "the current slot is not a signed release; pass --hardware (and --installed-version)".into(),
            ));
        }
    };

    let mut report = PullReport {
        outcome: Outcome::NoAssignment,
        depot_id: Some(depot_id),
        installed_version: installed.clone(),
        chunks_total: 0,
        chunks_resumed: 0,
        chunks_reused: 0,
        bytes_reused: 0,
        chunks_fetched: 0,
        bytes_fetched: 0,
        seconds: 0.0,
    };

    // 3. This vehicle's assignment, checked against the image repository.
    let name = TargetName::new(vehicle_target_name(&cfg.vehicle_id))
        .map_err(|e| PullError::Provision(e.to_string()))?;
    let Some(assigned) = director.targets().signed.targets.get(&name) else {
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    };
    let named = assigned
        .custom
        .get("vehicle_id")
        .and_then(|v| v.as_str())
        .unwrap_or_default();
    if named != cfg.vehicle_id {
        return Err(PullError::WrongVehicle {
            named: named.into(),
            own: cfg.vehicle_id.clone(),
        });
    }
    let image_target = assigned
        .custom
        .get("image_target")
        .and_then(|v| v.as_str())
        .ok_or_else(|| {
            PullError::AssignmentMismatch("the assignment names no image target".into())
        })?
        .to_owned();
    let image_name = TargetName::new(image_target.as_str())
        .map_err(|e| PullError::AssignmentMismatch(e.to_string()))?;
    let image = image_repo
        .targets()
        .signed
        .targets
        .get(&image_name)
        .ok_or_else(|| {
            PullError::AssignmentMismatch(format!("{image_target} is not in the image repository"))
        })?;
    if image.length != assigned.length || image.hashes.sha256 != assigned.hashes.sha256 {
        return Err(PullError::AssignmentMismatch(format!(
            "the director's {image_target} differs in length or hash from the image repository's"
        )));
    }
    let (meta, index_target) = ImageMeta::from_custom(&image.custom).ok_or_else(|| {
        PullError::AssignmentMismatch(format!("{image_target} lacks image fields"))
    })?;
    if meta.hardware_id != own_hardware {
        return Err(PullError::Hardware {
            assigned: meta.hardware_id,
            own: own_hardware,
        });
    }
    let assigned_v = parse_version(&meta.version).map_err(PullError::AssignmentMismatch)?;
    if let Some(installed) = &installed {
        let installed_v = parse_version(installed).map_err(PullError::UnknownInstalled)?;
        if assigned_v < installed_v {
            return Err(PullError::Downgrade {
                assigned: meta.version,
                installed: installed.clone(),
            });
        }
        if assigned_v == installed_v {
            report.outcome = Outcome::UpToDate {
                version: meta.version,
            };
            report.seconds = started.elapsed().as_secs_f64();
            return Ok(report);
        }
        if let Some(min) = &meta.min_version
            && installed_v < parse_version(min).map_err(PullError::AssignmentMismatch)?
        {
            return Err(PullError::BelowMinimum {
                assigned: meta.version,
                minimum: min.clone(),
                installed: installed.clone(),
            });
        }
    }
    let sha256 = hex::encode(&*image.hashes.sha256);
    let index_bytes = trust::read_small_target(&image_repo, &index_target)
        .await
        .map_err(metadata_err("image"))?;
    let index = ChunkIndex::from_json(&index_bytes)
        .map_err(|e| PullError::AssignmentMismatch(e.to_string()))?;
    if index.sha256 != sha256 || index.length != image.length {
        return Err(PullError::AssignmentMismatch(
            "the chunk index describes another image".into(),
        ));
    }

    assemble(cfg, &http, &index, current_index.as_ref(), &mut report).await?;
    if matches!(report.outcome, Outcome::Interrupted { .. }) {
        report.seconds = started.elapsed().as_secs_f64();
        return Ok(report);
    }
    report.outcome = Outcome::Written {
        version: meta.version,
        sha256,
        image_target,
    };
    report.seconds = started.elapsed().as_secs_f64();
    Ok(report)
}

fn progress_path(cfg: &PullConfig, sha256: &str) -> PathBuf {
    cfg.state_dir.join(format!("pull-{sha256}.json"))
}

fn save_progress(path: &Path, index: &ChunkIndex, done: &Bitmap) -> io::Result<()> {
    let progress = Progress {
        image_sha256: index.sha256.clone(),
        chunks: index.chunks.len(),
        done: hex::encode(&done.0),
    };
    let tmp = path.with_extension("partial");
    fs::write(&tmp, serde_json::to_vec(&progress).expect("JSON"))?;
    File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, path)
}

fn load_progress(path: &Path, index: &ChunkIndex) -> Bitmap {
    let parsed = fs::read(path)
        .ok()
        .and_then(|b| serde_json::from_slice::<Progress>(&b).ok())
        .filter(|p| p.image_sha256 == index.sha256 && p.chunks == index.chunks.len())
        .and_then(|p| hex::decode(p.done).ok())
        .filter(|bits| bits.len() == index.chunks.len().div_ceil(8));
    match parsed {
        Some(bits) => Bitmap(bits),
        None => Bitmap::new(index.chunks.len()),
    }
}

/// Fills the slot: resumed chunks are trusted (they were synced and verified before being
/// recorded), local chunks copied from the current slot, the rest fetched by hash.
async fn assemble(
    cfg: &PullConfig,
    http: &reqwest::Client,
    index: &ChunkIndex,
    current: Option<&ChunkIndex>,
    report: &mut PullReport,
) -> Result<(), PullError> {
    let slot = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .open(&cfg.slot)
        .map_err(PullError::io(format!(
            "opening slot {}",
            cfg.slot.display()
        )))?;
    slot.set_len(index.length)
        .map_err(PullError::io("sizing the slot"))?;
    let progress_file = progress_path(cfg, &index.sha256);
    let mut done = load_progress(&progress_file, index);
    report.chunks_total = index.chunks.len();
    report.chunks_resumed = done.count();

    // Chunks the running slot already has.
    if let (Some(current_index), Some(current_path)) = (current, &cfg.current) {
        let local: HashMap<&str, &chunks::Chunk> = current_index
            .chunks
            .iter()
            .map(|c| (c.sha256.as_str(), c))
            .collect();
        let current_file =
            File::open(current_path).map_err(PullError::io("opening the current slot"))?;
        let mut buf = vec![0u8; chunks::MAX_CHUNK as usize];
        for (i, chunk) in index.chunks.iter().enumerate() {
            if done.get(i) {
                continue;
            }
            let Some(have) = local.get(chunk.sha256.as_str()) else {
                continue;
            };
            let piece = &mut buf[..have.length as usize];
            current_file
                .read_exact_at(piece, have.offset)
                .map_err(PullError::io("reading the current slot"))?;
            if hex::encode(Sha256::digest(&piece[..])) != chunk.sha256 {
                // The running slot changed under us; fetch this one instead.
                continue;
            }
            slot.write_all_at(piece, chunk.offset)
                .map_err(PullError::io("writing the slot"))?;
            done.set(i);
            report.chunks_reused += 1;
            report.bytes_reused += u64::from(chunk.length);
        }
        slot.sync_data()
            .map_err(PullError::io("syncing the slot"))?;
        save_progress(&progress_file, index, &done).map_err(PullError::io("saving progress"))?;
    }

    // The rest, from the depot, a few at a time.
    let missing: Vec<usize> = (0..index.chunks.len()).filter(|&i| !done.get(i)).collect();
    let limit = cfg.stop_after_chunks.unwrap_or(usize::MAX);
    let mut fetches = futures_util::stream::iter(missing.into_iter().take(limit))
        .map(|i| {
            let chunk = &index.chunks[i];
            let url = join(&cfg.depot, &format!("chunks/{}", chunk.sha256));
            async move { (i, get_limited(http, url, u64::from(chunk.length)).await) }
        })
        .buffer_unordered(cfg.concurrency.max(1));
    let mut since_sync = 0;
    let mut last_sync = Instant::now();
    let mut failure = None;
    while let Some((i, result)) = fetches.next().await {
        let chunk = &index.chunks[i];
        let body = match result {
            Ok(Some(body)) => body,
            Ok(None) => {
                failure = Some(PullError::Http {
                    url: format!("chunks/{}", chunk.sha256),
                    message: "the depot does not have this chunk".into(),
                });
                break;
            }
            Err(e) => {
                failure = Some(e);
                break;
            }
        };
        if body.len() != chunk.length as usize || hex::encode(Sha256::digest(&body)) != chunk.sha256
        {
            failure = Some(PullError::ChunkHash {
                index: i,
                sha256: chunk.sha256.clone(),
            });
            break;
        }
        slot.write_all_at(&body, chunk.offset)
            .map_err(PullError::io("writing the slot"))?;
        done.set(i);
        report.chunks_fetched += 1;
        report.bytes_fetched += body.len() as u64;
        since_sync += 1;
        if since_sync >= 64 || last_sync.elapsed() > Duration::from_secs(1) {
            // Progress is recorded only for bytes that are on disk.
            slot.sync_data()
                .map_err(PullError::io("syncing the slot"))?;
            save_progress(&progress_file, index, &done)
                .map_err(PullError::io("saving progress"))?;
            since_sync = 0;
            last_sync = Instant::now();
        }
    }
    drop(fetches);
    slot.sync_data()
        .map_err(PullError::io("syncing the slot"))?;
    save_progress(&progress_file, index, &done).map_err(PullError::io("saving progress"))?;
    if let Some(e) = failure {
        return Err(e);
    }
    if done.count() < index.chunks.len() {
        report.outcome = Outcome::Interrupted {
            chunks_done: done.count(),
            chunks_total: index.chunks.len(),
        };
        return Ok(());
    }

    // The whole image, read back from the slot.
    let slot_path = cfg.slot.clone();
    let actual = tokio::task::spawn_blocking(move || -> io::Result<String> {
        let mut file = File::open(&slot_path)?;
        let mut hasher = Sha256::new();
        io::copy(&mut file, &mut hasher)?;
        Ok(hex::encode(hasher.finalize()))
    })
    .await
    .map_err(|e| PullError::io("hashing the slot")(io::Error::other(e)))?
    .map_err(PullError::io("hashing the slot"))?;
    if actual != index.sha256 {
        // Whatever is recorded cannot be trusted any more.
        let _ = fs::remove_file(&progress_file);
        return Err(PullError::ImageHash {
            expected: index.sha256.clone(),
            actual,
        });
    }
    let _ = fs::remove_file(&progress_file);
    Ok(())
}
