//! Staging: from a release (a repository directory, a URL, or an uploaded bundle) to a verified
//! image in the store, or a typed refusal that leaves nothing behind.
//!
//! Order matters. The metadata is verified first (against the depot's pinned fleet root, with
//! rollback protection from the mirror's datastore), then the policy (hardware, version floor,
//! free space), then the chunk index, and only then is the image read, once, into a staging
//! file. The pack and the mirrored metadata become visible only when everything has matched.

use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{self, BufWriter, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use futures_util::StreamExt;
use semver::Version;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tough::{
    ExpirationEnforcement, Repository, TargetName, Transport, TransportError, TransportStream,
    async_trait,
};
use url::Url;

use crate::chunks::{self, ChunkIndex, Ingested};
use crate::meta::{self, ImageMeta, parse_version};
use crate::release::CERTIFIER_TARGET;
use crate::store::ImageStore;
use crate::trust::{self, HttpTransport, TrustError};

/// Why staging refused a release. Each is its own variant so callers, the API and the audit
/// log can say exactly which check failed.
#[derive(Debug, thiserror::Error)]
pub enum StagingError {
    #[error("release metadata refused: {0}")]
    Trust(#[from] TrustError),
    #[error(
        "no fleet root is pinned on this depot; set ota.fleet_root or PUT /api/v1/ota/fleet-root"
    )]
    NoFleetRoot,
    #[error("the release has no image {version} for hardware {hardware}")]
    NotInRelease { hardware: String, version: String },
    #[error("hardware mismatch: {0}")]
    Hardware(String),
    #[error(
        "version {version} is below this depot's floor {floor} for {hardware} (rollback refused)"
    )]
    BelowFloor {
        hardware: String,
        version: String,
        floor: String,
    },
    #[error("version {version} for {hardware} is already staged")]
    AlreadyStaged { hardware: String, version: String },
    #[error(
        "not enough disk space: the image needs {needed} bytes, {available} are free beyond the reserve"
    )]
    DiskFull { needed: u64, available: u64 },
    #[error("image hash mismatch: signed {expected}, read {actual}")]
    Hash { expected: String, actual: String },
    #[error("image length mismatch: signed {expected} bytes, read {actual}")]
    Length { expected: u64, actual: u64 },
    #[error("the image does not match its signed chunk index: {0}")]
    Index(String),
    #[error("reading the image failed: {0}")]
    Source(String),
    #[error("{context}: {source}")]
    Io { context: String, source: io::Error },
}

impl StagingError {
    pub fn code(&self) -> &'static str {
        match self {
            StagingError::Trust(t) => t.code(),
            StagingError::NoFleetRoot => "no_fleet_root",
            StagingError::NotInRelease { .. } => "not_in_release",
            StagingError::Hardware(_) => "hardware_mismatch",
            StagingError::BelowFloor { .. } => "version_below_floor",
            StagingError::AlreadyStaged { .. } => "already_staged",
            StagingError::DiskFull { .. } => "disk_full",
            StagingError::Hash { .. } => "hash_mismatch",
            StagingError::Length { .. } => "length_mismatch",
            StagingError::Index(_) => "index_mismatch",
            StagingError::Source(_) => "source_failed",
            StagingError::Io { source, .. } if source.kind() == io::ErrorKind::StorageFull => {
                "disk_full"
            }
            StagingError::Io { .. } => "io_error",
        }
    }

    /// Whether the fault lies with the release (4xx) rather than with the depot (5xx).
    pub fn is_release_fault(&self) -> bool {
        !matches!(self, StagingError::Io { .. } | StagingError::Source(_))
    }

    fn io(context: impl Into<String>) -> impl FnOnce(io::Error) -> StagingError {
        let context = context.into();
        move |source| StagingError::Io { context, source }
    }
}

/// What the depot will accept.
#[derive(Debug, Clone, Default)]
pub struct Policy {
    /// Per hardware id, the lowest version the depot will stage.
    pub floors: BTreeMap<String, Version>,
    /// Hardware ids this depot serves; empty means any.
    pub hardware: Vec<String>,
    /// Bytes to keep free on the store's filesystem beyond the image itself.
    pub reserve_bytes: u64,
    /// (hardware, version) pairs already staged.
    pub staged: Vec<(String, String)>,
}

/// The depot's trust anchor and its mirror of the fleet's image repository.
#[derive(Debug, Clone)]
pub struct Mirror {
    dir: PathBuf,
}

impl Mirror {
    pub fn new(dir: &Path) -> io::Result<Self> {
        fs::create_dir_all(dir.join("metadata"))?;
        fs::create_dir_all(dir.join("datastore"))?;
        Ok(Self {
            dir: dir.to_owned(),
        })
    }
    pub fn metadata_dir(&self) -> PathBuf {
        self.dir.join("metadata")
    }
    fn datastore(&self) -> PathBuf {
        self.dir.join("datastore")
    }
    pub fn fleet_root_path(&self) -> PathBuf {
        self.dir.join("fleet-root.json")
    }
    pub fn certifier_path(&self) -> PathBuf {
        self.dir.join("certifier.json")
    }
    pub fn fleet_root(&self) -> Option<Vec<u8>> {
        fs::read(self.fleet_root_path()).ok()
    }

    /// Pins the fleet root (admin action). The root must be a valid, self-signed TUF root.
    pub fn pin_root(&self, root: &[u8]) -> Result<(), StagingError> {
        let parsed: tough::schema::Signed<tough::schema::Root> = serde_json::from_slice(root)
            .map_err(|e| {
                StagingError::Trust(TrustError::Other(format!(
                    "fleet root is not TUF root metadata: {e}"
                )))
            })?;
        parsed
            .signed
            .verify_role(&parsed)
            .map_err(|e| StagingError::Trust(TrustError::Signature(format!("fleet root: {e}"))))?;
        write_atomic(&self.fleet_root_path(), root)
            .map_err(StagingError::io("pinning the fleet root"))?;
        // A new anchor starts a new history.
        let _ = fs::remove_dir_all(self.datastore());
        fs::create_dir_all(self.datastore()).map_err(StagingError::io("resetting the datastore"))
    }

    /// Writes verified metadata files into the mirror, the timestamp last.
    fn update(&self, files: &[(String, Bytes)]) -> io::Result<()> {
        let mut ordered: Vec<&(String, Bytes)> = files.iter().collect();
        ordered
            .sort_by_key(|(name, _)| (name == "timestamp.json", name.ends_with(".snapshot.json")));
        for (name, bytes) in ordered {
            write_atomic(&self.metadata_dir().join(name), bytes)?;
        }
        Ok(())
    }

    /// The newest timestamp's expiry in the mirror, for the panel.
    pub fn timestamp_expires(&self) -> Option<SystemTime> {
        let bytes = fs::read(self.metadata_dir().join("timestamp.json")).ok()?;
        let ts: tough::schema::Signed<tough::schema::Timestamp> =
            serde_json::from_slice(&bytes).ok()?;
        Some(SystemTime::from(ts.signed.expires))
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> io::Result<()> {
    let tmp = path.with_extension("partial");
    fs::write(&tmp, bytes)?;
    File::open(&tmp)?.sync_all()?;
    fs::rename(&tmp, path)
}

/// Metadata files are the only names mirrored: `[N.]role.json`.
pub fn is_metadata_name(name: &str) -> bool {
    let Some(stem) = name.strip_suffix(".json") else {
        return false;
    };
    let role = match stem.split_once('.') {
        Some((version, role))
            if !version.is_empty() && version.bytes().all(|b| b.is_ascii_digit()) =>
        {
            role
        }
        Some(_) => return false,
        None => stem,
    };
    matches!(role, "root" | "targets" | "snapshot" | "timestamp")
}

/// A transport that keeps the bytes of every metadata file it fetched, so the mirror serves
/// exactly what was verified (re-serialising parsed metadata would change its hashes).
#[derive(Debug, Clone)]
struct Recording {
    inner: HttpTransport,
    metadata_base: String,
    seen: Arc<Mutex<Vec<(String, Bytes)>>>,
}

#[async_trait]
impl Transport for Recording {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        let stream = self.inner.fetch(url.clone()).await?;
        let Some(name) = url
            .as_str()
            .strip_prefix(&self.metadata_base)
            .filter(|name| is_metadata_name(name))
        else {
            return Ok(stream);
        };
        // Recorded only when tough has read it to the end; an error or a limit drops it.
        let sink = Some((name.to_owned(), self.seen.clone()));
        let recorded = futures_util::stream::unfold(
            (stream, Vec::new(), sink),
            |(mut stream, mut body, mut sink)| async move {
                match stream.next().await {
                    Some(Ok(piece)) => {
                        body.extend_from_slice(&piece);
                        Some((Ok(piece), (stream, body, sink)))
                    }
                    Some(Err(e)) => Some((Err(e), (stream, body, None))),
                    None => {
                        if let Some((name, seen)) = sink.take() {
                            seen.lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .push((name, Bytes::from(std::mem::take(&mut body))));
                        }
                        None
                    }
                }
            },
        );
        Ok(Box::pin(recorded))
    }
}

/// A release whose metadata verified and whose image passes the depot's policy.
#[derive(Debug, Clone, Serialize)]
pub struct ReleasedImage {
    pub target: String,
    pub meta: ImageMeta,
    pub index_target: String,
    pub length: u64,
    pub sha256: String,
    pub targets_version: u64,
    #[serde(skip)]
    pub targets_expires: SystemTime,
}

#[derive(Debug)]
pub struct VerifiedRelease {
    pub image: ReleasedImage,
    pub index: ChunkIndex,
    pub index_bytes: Vec<u8>,
    certifier: Option<Vec<u8>>,
    metadata_files: Vec<(String, Bytes)>,
}

impl VerifiedRelease {
    /// The fleet certifier key document the repository carries, if any.
    pub fn certifier(&self) -> Option<&[u8]> {
        self.certifier.as_deref()
    }
}

/// Where a release's repository is: `metadata/` and `targets/` under one base.
#[derive(Debug, Clone)]
pub struct Location {
    pub metadata: Url,
    pub targets: Url,
}

impl Location {
    /// A repository directory on this machine (a USB stick, an unpacked bundle).
    pub fn directory(dir: &Path) -> Result<Self, StagingError> {
        let base = fs::canonicalize(dir)
            .ok()
            .and_then(|abs| Url::from_directory_path(abs).ok())
            .ok_or_else(|| {
                StagingError::Source(format!("{} is not a readable directory", dir.display()))
            })?;
        Self::url(base)
    }

    /// A repository served over HTTP(S) (or `file://`).
    pub fn url(base: Url) -> Result<Self, StagingError> {
        let base = trust::dir_url(base);
        let join = |p: &str| {
            base.join(p)
                .map_err(|e| StagingError::Source(format!("{base}{p}: {e}")))
        };
        Ok(Self {
            metadata: join("metadata/")?,
            targets: join("targets/")?,
        })
    }

    /// Where the image target's file is (consistent snapshots: `<sha256>.<name>`).
    pub fn image_url(&self, image: &ReleasedImage) -> Result<Url, StagingError> {
        self.targets
            .join(&format!("{}.{}", image.sha256, image.target))
            .map_err(|e| StagingError::Source(e.to_string()))
    }
}

/// Which image of a release to stage.
#[derive(Debug, Clone, Copy)]
pub struct Wanted<'a> {
    pub hardware: &'a str,
    pub version: &'a str,
}

/// Verifies a release's metadata and the depot's policy, and fetches its chunk index; nothing
/// is written to the store yet.
pub async fn verify(
    mirror: &Mirror,
    location: &Location,
    transport: HttpTransport,
    wanted: Wanted<'_>,
    policy: &Policy,
    store_root: &Path,
) -> Result<VerifiedRelease, StagingError> {
    let loaded = load_recorded(mirror, location, transport).await?;
    let image = find_image(&loaded.repo, wanted.hardware, wanted.version)?;
    check_policy(&image, policy, store_root)?;

    let index_bytes = trust::read_small_target(&loaded.repo, &image.index_target).await?;
    let index =
        ChunkIndex::from_json(&index_bytes).map_err(|e| StagingError::Index(e.to_string()))?;
    if index.sha256 != image.sha256 || index.length != image.length {
        return Err(StagingError::Index(
            "the signed index describes another image".into(),
        ));
    }
    Ok(VerifiedRelease {
        image,
        index,
        index_bytes,
        certifier: loaded.metadata.certifier,
        metadata_files: loaded.metadata.files,
    })
}

/// A repository's metadata, verified from the pinned fleet root, without any image: what a
/// metadata-only refresh mirrors.
#[derive(Debug)]
pub struct VerifiedMetadata {
    pub timestamp_version: u64,
    pub timestamp_expires: SystemTime,
    pub targets_version: u64,
    certifier: Option<Vec<u8>>,
    /// The exact bytes fetched (and the pinned root), to mirror.
    files: Vec<(String, Bytes)>,
}

struct Loaded {
    repo: Repository,
    metadata: VerifiedMetadata,
}

/// Loads and verifies the repository at `location` from the pinned root (rollback-checked
/// against the mirror's datastore), keeping the bytes of every metadata file fetched.
async fn load_recorded(
    mirror: &Mirror,
    location: &Location,
    transport: HttpTransport,
) -> Result<Loaded, StagingError> {
    let root = mirror.fleet_root().ok_or(StagingError::NoFleetRoot)?;
    let recording = Recording {
        inner: transport,
        metadata_base: location.metadata.as_str().to_owned(),
        seen: Arc::default(),
    };
    let repo = trust::load(
        &root,
        location.metadata.clone(),
        location.targets.clone(),
        &mirror.datastore(),
        recording.clone(),
        ExpirationEnforcement::Safe,
    )
    .await?;
    let certifier = match trust::read_small_target(&repo, CERTIFIER_TARGET).await {
        Ok(bytes) => Some(bytes),
        Err(TrustError::UnknownTarget(_)) => None,
        Err(e) => return Err(e.into()),
    };
    let mut files = recording
        .seen
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    // The pinned root starts the chain and was not fetched; mirror it under its version.
    let pinned: tough::schema::Signed<tough::schema::Root> = serde_json::from_slice(&root)
        .map_err(|e| TrustError::Other(format!("pinned fleet root: {e}")))?;
    files.push((
        format!("{}.root.json", pinned.signed.version),
        Bytes::from(root),
    ));
    let timestamp = &repo.timestamp().signed;
    let metadata = VerifiedMetadata {
        timestamp_version: timestamp.version.get(),
        timestamp_expires: SystemTime::from(timestamp.expires),
        targets_version: repo.targets().signed.version.get(),
        certifier,
        files,
    };
    Ok(Loaded { repo, metadata })
}

/// Verifies the repository's current metadata for a metadata-only refresh: release
/// engineering re-signed the timestamp (and perhaps more) and the depot must mirror it before
/// the copy vehicles check expires, without staging any image.
pub async fn verify_metadata(
    mirror: &Mirror,
    location: &Location,
    transport: HttpTransport,
) -> Result<VerifiedMetadata, StagingError> {
    Ok(load_recorded(mirror, location, transport).await?.metadata)
}

/// Mirrors verified metadata (and the certifier key it names), the timestamp last.
pub fn publish_metadata(mirror: &Mirror, metadata: &VerifiedMetadata) -> Result<(), StagingError> {
    write_mirror(mirror, metadata.certifier.as_deref(), &metadata.files)
}

fn write_mirror(
    mirror: &Mirror,
    certifier: Option<&[u8]>,
    files: &[(String, Bytes)],
) -> Result<(), StagingError> {
    if let Some(certifier) = certifier {
        write_atomic(&mirror.certifier_path(), certifier)
            .map_err(StagingError::io("mirroring the certifier key"))?;
    }
    mirror
        .update(files)
        .map_err(StagingError::io("mirroring the release metadata"))
}

fn find_image(
    repo: &Repository,
    hardware: &str,
    version: &str,
) -> Result<ReleasedImage, StagingError> {
    let name = meta::image_target_name(hardware, version);
    let not_found = || StagingError::NotInRelease {
        hardware: hardware.into(),
        version: version.into(),
    };
    let target_name = TargetName::new(name.as_str()).map_err(|_| not_found())?;
    let targets = &repo.targets().signed;
    let target = targets.targets.get(&target_name).ok_or_else(not_found)?;
    let (meta, index_target) = ImageMeta::from_custom(&target.custom).ok_or_else(|| {
        StagingError::Index(format!(
            "{name} lacks the image fields (version, hardware_id, chunk_index)"
        ))
    })?;
    if meta.hardware_id != hardware {
        return Err(StagingError::Hardware(format!(
            "{name} is signed for hardware {}, not {hardware}",
            meta.hardware_id
        )));
    }
    if meta.version != version {
        return Err(StagingError::Index(format!(
            "{name} is signed as version {}",
            meta.version
        )));
    }
    Ok(ReleasedImage {
        target: name,
        meta,
        index_target,
        length: target.length,
        sha256: hex::encode(&*target.hashes.sha256),
        targets_version: targets.version.get(),
        targets_expires: SystemTime::from(targets.expires),
    })
}

fn check_policy(
    image: &ReleasedImage,
    policy: &Policy,
    store_root: &Path,
) -> Result<(), StagingError> {
    let hw = &image.meta.hardware_id;
    if !policy.hardware.is_empty() && !policy.hardware.contains(hw) {
        return Err(StagingError::Hardware(format!(
            "this depot serves {}, not {hw}",
            policy.hardware.join(", ")
        )));
    }
    if policy
        .staged
        .iter()
        .any(|(h, v)| h == hw && *v == image.meta.version)
    {
        return Err(StagingError::AlreadyStaged {
            hardware: hw.clone(),
            version: image.meta.version.clone(),
        });
    }
    let version = parse_version(&image.meta.version).map_err(StagingError::Index)?;
    if let Some(floor) = policy.floors.get(hw)
        && version < *floor
    {
        return Err(StagingError::BelowFloor {
            hardware: hw.clone(),
            version: image.meta.version.clone(),
            floor: floor.to_string(),
        });
    }
    let available = free_bytes(store_root).map_err(StagingError::io("checking free space"))?;
    let needed = image.length.saturating_add(policy.reserve_bytes);
    if available < needed {
        return Err(StagingError::DiskFull {
            needed: image.length,
            available: available.saturating_sub(policy.reserve_bytes),
        });
    }
    Ok(())
}

/// Free bytes for unprivileged writers on the filesystem holding `path`.
pub fn free_bytes(path: &Path) -> io::Result<u64> {
    let st = rustix::fs::statvfs(path).map_err(io::Error::from)?;
    Ok(st.f_bavail.saturating_mul(st.f_frsize))
}

/// How much of an interrupted staging file can be kept: the longest run of whole chunks from
/// its start that hash to the signed chunk index. The file is cut to that length (and removed
/// when nothing is kept), so a torn tail, or an image that changed upstream, costs only the
/// chunks that differ. Blocking.
pub fn resumable_prefix(release: &VerifiedRelease, staging_file: &Path) -> io::Result<u64> {
    let mut file = match fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(staging_file)
    {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let on_disk = file.metadata()?.len();
    let mut reader = io::BufReader::with_capacity(1 << 20, &mut file);
    let mut kept = 0u64;
    let mut buf = Vec::new();
    for chunk in &release.index.chunks {
        if chunk.offset != kept || kept + u64::from(chunk.length) > on_disk {
            break;
        }
        buf.resize(chunk.length as usize, 0);
        reader.read_exact(&mut buf)?;
        if hex::encode(Sha256::digest(&buf)) != chunk.sha256 {
            break;
        }
        kept += u64::from(chunk.length);
    }
    drop(reader);
    if kept == 0 {
        drop(file);
        fs::remove_file(staging_file)?;
    } else {
        file.set_len(kept)?;
    }
    Ok(kept)
}

/// Reads the image once from `source` into a staging file, then checks length, hash and chunk
/// index against the signed metadata. Blocking: run it off the async workers. On a failure of
/// the image the staging file is removed; when only the source broke off
/// ([`StagingError::Source`]) it is kept, for [`resumable_prefix`] to re-verify and go on from
/// (the caller removes it if it will not resume).
///
/// `resume_from` is the length of a verified prefix already in the staging file (see
/// [`resumable_prefix`]); `source` then starts at that byte. The prefix is read back from disk
/// so the hashes and chunk boundaries cover the whole image, and is not written again.
pub fn ingest_image(
    release: &VerifiedRelease,
    source: impl Read,
    staging_file: &Path,
    resume_from: u64,
    progress: impl FnMut(u64),
) -> Result<Ingested, StagingError> {
    let result = (|| {
        let opening = || StagingError::io(format!("opening {}", staging_file.display()));
        let (prefix, file) = if resume_from > 0 {
            let prefix = File::open(staging_file).map_err(opening())?;
            let mut file = fs::OpenOptions::new()
                .write(true)
                .open(staging_file)
                .map_err(opening())?;
            file.seek(SeekFrom::Start(resume_from)).map_err(opening())?;
            (Some(prefix.take(resume_from)), file)
        } else {
            (None, File::create(staging_file).map_err(opening())?)
        };
        let mut writer = SkipWriter {
            skip: resume_from,
            inner: BufWriter::with_capacity(1 << 20, file),
        };
        let source: Box<dyn Read> = match prefix {
            Some(prefix) => Box::new(prefix.chain(source)),
            None => Box::new(source),
        };
        // Never read more than the signed length (+1 to notice a longer source): endless data
        // stops here.
        let limited = source.take(release.image.length + 1);
        let got = chunks::ingest(
            io::BufReader::with_capacity(1 << 20, limited),
            &mut writer,
            progress,
        )
        .map_err(|e| {
            if e.kind() == io::ErrorKind::StorageFull {
                StagingError::Io {
                    context: "writing the image".into(),
                    source: e,
                }
            } else {
                StagingError::Source(e.to_string())
            }
        })?;
        writer
            .inner
            .into_inner()
            .map_err(|e| StagingError::io("writing the image")(e.into_error()))?;
        if got.length != release.image.length {
            return Err(StagingError::Length {
                expected: release.image.length,
                actual: got.length,
            });
        }
        if got.sha256 != release.image.sha256 {
            return Err(StagingError::Hash {
                expected: release.image.sha256.clone(),
                actual: got.sha256,
            });
        }
        if got.index.chunks != release.index.chunks {
            return Err(StagingError::Index(
                "the chunk boundaries or hashes differ from the signed index".into(),
            ));
        }
        Ok(got)
    })();
    if matches!(result, Err(ref e) if !matches!(e, StagingError::Source(_))) {
        let _ = fs::remove_file(staging_file);
    }
    result
}

/// Writes what it is given but for the first `skip` bytes, which are already on disk.
struct SkipWriter<W> {
    skip: u64,
    inner: W,
}

impl<W: Write> Write for SkipWriter<W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.skip == 0 {
            return self.inner.write(buf);
        }
        let n = self.skip.min(buf.len() as u64) as usize;
        self.skip -= n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}

/// Makes a verified, ingested image visible: the pack, its index, the certifier key and the
/// mirrored metadata.
pub fn publish(
    store: &ImageStore,
    mirror: &Mirror,
    release: &VerifiedRelease,
    staging_file: &Path,
) -> Result<(), StagingError> {
    store
        .publish(staging_file, &release.index, &release.index_bytes)
        .map_err(StagingError::io("publishing the image"))?;
    write_mirror(
        mirror,
        release.certifier.as_deref(),
        &release.metadata_files,
    )?;
    store.register(&release.index);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A release as verification would return it, for an image made here.
    fn release_of(image: &[u8]) -> VerifiedRelease {
        let got = chunks::ingest(image, &mut io::sink(), |_| {}).unwrap();
        VerifiedRelease {
            image: ReleasedImage {
                target: "hw_1.0.0.img".into(),
                meta: ImageMeta {
                    version: "1.0.0".into(),
                    hardware_id: "hw".into(),
                    min_version: None,
                    notes: None,
                },
                index_target: "hw_1.0.0.img.chunks.json".into(),
                length: got.length,
                sha256: got.sha256,
                targets_version: 1,
                targets_expires: SystemTime::now(),
            },
            index_bytes: got.index.to_json(),
            index: got.index,
            certifier: None,
            metadata_files: Vec::new(),
        }
    }

    #[test]
    fn an_interrupted_staging_file_resumes_from_its_last_verified_chunk() {
        let image: Vec<u8> = (0..3_000_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
            .collect();
        let release = release_of(&image);
        let chunks = &release.index.chunks;
        assert!(chunks.len() > 6, "{} chunks", chunks.len());
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("job-1.img");

        // What a killed depot left: four whole chunks, half of the fifth, and the fifth torn.
        let cut = (chunks[4].offset + u64::from(chunks[4].length) / 2) as usize;
        let mut partial = image[..cut].to_vec();
        partial[cut - 10] ^= 0xff;
        fs::write(&file, &partial).unwrap();
        let kept = resumable_prefix(&release, &file).unwrap();
        assert_eq!(kept, chunks[4].offset, "whole verified chunks are kept");
        assert_eq!(fs::metadata(&file).unwrap().len(), kept);

        // The source goes on from there; the result is the image, byte for byte.
        let rest = &image[kept as usize..];
        let mut seen = 0;
        let got = ingest_image(&release, rest, &file, kept, |n| seen = n).unwrap();
        assert_eq!(got.sha256, release.image.sha256);
        assert_eq!(seen, image.len() as u64, "progress counts the kept prefix");
        assert_eq!(fs::read(&file).unwrap(), image);

        // A first chunk that does not verify keeps nothing, and no file.
        let mut bad = image[..cut].to_vec();
        bad[3] ^= 1;
        fs::write(&file, &bad).unwrap();
        assert_eq!(resumable_prefix(&release, &file).unwrap(), 0);
        assert!(!file.exists());
        assert_eq!(
            resumable_prefix(&release, &file).unwrap(),
            0,
            "no file, no prefix"
        );

        // A source that differs after the prefix fails the image hash and leaves nothing.
        fs::write(&file, &image[..kept as usize]).unwrap();
        let mut other = image[kept as usize..].to_vec();
        other[100] ^= 1;
        let err = ingest_image(&release, &other[..], &file, kept, |_| {}).unwrap_err();
        assert!(matches!(err, StagingError::Hash { .. }), "{err}");
        assert!(!file.exists());
    }

    #[test]
    fn metadata_names() {
        for ok in [
            "root.json",
            "1.root.json",
            "12.targets.json",
            "timestamp.json",
            "3.snapshot.json",
        ] {
            assert!(is_metadata_name(ok), "{ok}");
        }
        for bad in [
            "../root.json",
            "x.root.json",
            "root.json.bak",
            "1.delegated.json",
            ".root.json",
            "a/1.root.json",
        ] {
            assert!(!is_metadata_name(bad), "{bad}");
        }
    }
}
