//! The cloud's image repository and chunk store (local files).
//!
//! Release engineering signs root and targets offline and uploads a release bundle (the same
//! tar a depot accepts); the cloud verifies it from its pinned fleet root exactly as a depot
//! would, keeps the image as a pack in an [`ImageStore`] (its chunk store), and publishes the
//! root chain and targets with a snapshot and timestamp it signs itself with the two online
//! keys. Depots read `metadata/`, `targets/` (small ones: chunk indexes, the certifier key)
//! and `chunks/<sha256>` over the gRPC port's mutual TLS.
//!
//! ```text
//! <data>/repository/
//!   import/     Mirror: the pinned fleet root and release engineering's verified metadata
//!   metadata/   what depots fetch: root chain, targets, the cloud's snapshots and timestamp
//!   targets/    small targets, consistent-snapshot names
//!   store/      packs and chunk indexes (the chunk store)
//!   keys/       snapshot.pem, timestamp.pem, certifier.pem (0600)
//! ```

use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::Context;
use atlasmesh_ota_staging::certificate::DepotCertificate;
use atlasmesh_ota_staging::keys::KeyPair;
use atlasmesh_ota_staging::online::{self, OnlineExpiries, OnlineKeys, Resigned};
use atlasmesh_ota_staging::release::{self, CERTIFIER_KEY, CERTIFIER_TARGET};
use atlasmesh_ota_staging::staging::{
    self, Mirror, Policy, StagingError, Wanted, is_metadata_name,
};
use atlasmesh_ota_staging::store::ImageStore;
use atlasmesh_ota_staging::time::Clock;
use atlasmesh_ota_staging::trust::HttpTransport;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path as UrlPath, Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Serialize;
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use atlasmesh_cloud_sync::server::{CloudService, FleetTrust};

/// How long a certified director root stays certified; depots are re-certified at every
/// session start, so this only bounds a depot that stops syncing.
const DIRECTOR_CERTIFICATE_LIFETIME: Duration = Duration::from_secs(90 * 24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum RepoError {
    #[error(
        "the cloud has no fleet root yet: run `atlasmesh cloud repository --root ROOT.json --keys DIR` once"
    )]
    NoRoot,
    #[error(
        "the cloud holds no online snapshot and timestamp keys (`atlasmesh cloud repository --keys DIR`)"
    )]
    NoKeys,
    #[error(transparent)]
    Staging(#[from] StagingError),
    #[error(transparent)]
    Release(#[from] release::ReleaseError),
    #[error("{0}")]
    Internal(String),
}

/// One image the repository can serve.
#[derive(Debug, Clone, Serialize)]
pub struct ReleaseView {
    pub hardware_id: String,
    pub version: String,
    pub target: String,
    pub sha256: String,
    pub length: u64,
    pub chunks: usize,
    pub min_version: Option<String>,
    pub notes: Option<String>,
    pub released_at: Option<String>,
}

/// What an import did.
#[derive(Debug, Clone, Serialize)]
pub struct Imported {
    pub release: ReleaseView,
    /// Chunks of the image the store did not hold before (the rest are shared with earlier
    /// releases).
    pub new_chunks: usize,
    pub signed: Resigned,
}

pub struct Repository {
    dir: PathBuf,
    mirror: Mirror,
    store: Arc<ImageStore>,
    keys: Option<OnlineKeys>,
    certifier: Option<KeyPair>,
    expiries: OnlineExpiries,
    clock: Arc<dyn Clock>,
    /// Imports and re-signing write the same files: one at a time.
    lock: tokio::sync::Mutex<()>,
}

fn io_err(context: impl Into<String>) -> impl FnOnce(io::Error) -> RepoError {
    let context = context.into();
    move |e| RepoError::Internal(format!("{context}: {e}"))
}

impl Repository {
    pub fn open(
        data_dir: &Path,
        expiries: OnlineExpiries,
        clock: Arc<dyn Clock>,
    ) -> anyhow::Result<Arc<Self>> {
        let dir = data_dir.join("repository");
        for sub in ["metadata", "targets", "keys"] {
            fs::create_dir_all(dir.join(sub))
                .with_context(|| format!("creating {}", dir.join(sub).display()))?;
        }
        let mirror = Mirror::new(&dir.join("import"))
            .with_context(|| format!("opening {}", dir.join("import").display()))?;
        let (store, _) = ImageStore::open(&dir.join("store"), |_| false)
            .with_context(|| format!("opening {}", dir.join("store").display()))?;
        for entry in fs::read_dir(dir.join("store/index"))? {
            let name = entry?.file_name();
            let Some(sha) = name.to_str().and_then(|n| n.strip_suffix(".chunks.json")) else {
                continue;
            };
            match store.read_index(sha) {
                Ok(index) if store.pack_path(sha).is_file() => store.register(&index),
                _ => tracing::error!(
                    sha256 = sha,
                    "a release's pack or index is unreadable; its chunks are not served"
                ),
            }
        }
        let load = |name: &str| -> anyhow::Result<Option<KeyPair>> {
            let path = dir.join("keys").join(format!("{name}.pem"));
            if !path.exists() {
                return Ok(None);
            }
            Ok(Some(
                KeyPair::load(&path).with_context(|| format!("loading {}", path.display()))?,
            ))
        };
        let keys = match (load("snapshot")?, load("timestamp")?) {
            (Some(snapshot), Some(timestamp)) => Some(OnlineKeys {
                snapshot,
                timestamp,
            }),
            _ => None,
        };
        let certifier = load(CERTIFIER_KEY)?;
        Ok(Arc::new(Self {
            dir,
            mirror,
            store: Arc::new(store),
            keys,
            certifier,
            expiries,
            clock,
            lock: tokio::sync::Mutex::new(()),
        }))
    }

    fn metadata_dir(&self) -> PathBuf {
        self.dir.join("metadata")
    }

    /// `atlasmesh cloud repository`: pins the fleet root and takes the online keys (the ones
    /// in `keys` among snapshot, timestamp and certifier; root and targets stay offline).
    pub fn setup(data_dir: &Path, root: &Path, keys: Option<&Path>) -> anyhow::Result<Vec<String>> {
        let dir = data_dir.join("repository");
        crate::datadir::ensure_dir(data_dir)?;
        fs::create_dir_all(dir.join("metadata"))?;
        fs::create_dir_all(dir.join("keys"))?;
        let bytes = fs::read(root).with_context(|| format!("reading {}", root.display()))?;
        let mirror = Mirror::new(&dir.join("import"))?;
        mirror.pin_root(&bytes)?;
        let parsed: tough::schema::Signed<tough::schema::Root> = serde_json::from_slice(&bytes)?;
        let version = parsed.signed.version.get();
        let published = dir.join("metadata").join(format!("{version}.root.json"));
        if !published.exists() {
            fs::write(&published, &bytes)?;
        }
        let mut taken = vec![format!("fleet root version {version}")];
        if let Some(keys) = keys {
            for name in ["snapshot", "timestamp", CERTIFIER_KEY] {
                let from = keys.join(format!("{name}.pem"));
                if !from.exists() {
                    continue;
                }
                let key =
                    KeyPair::load(&from).with_context(|| format!("loading {}", from.display()))?;
                if name != CERTIFIER_KEY {
                    let role = if name == "snapshot" {
                        tough::schema::RoleType::Snapshot
                    } else {
                        tough::schema::RoleType::Timestamp
                    };
                    let named = parsed
                        .signed
                        .roles
                        .get(&role)
                        .is_some_and(|r| r.keyids.contains(&key.key_id()));
                    anyhow::ensure!(
                        named,
                        "{} is not the fleet root's {name} key",
                        from.display()
                    );
                }
                let to = dir.join("keys").join(format!("{name}.pem"));
                crate::datadir::write_private(&to, &fs::read(&from)?)
                    .with_context(|| format!("writing {}", to.display()))?;
                taken.push(format!("{name} key"));
            }
        }
        Ok(taken)
    }

    /// Verifies a release bundle from the pinned root, stores its image as a pack, publishes
    /// its metadata and re-signs snapshot and timestamp. Nothing is published unless every
    /// check passed.
    pub async fn import(
        self: &Arc<Self>,
        body: impl io::Read + Send + 'static,
    ) -> Result<Imported, RepoError> {
        if self.mirror.fleet_root().is_none() {
            return Err(RepoError::NoRoot);
        }
        if self.keys.is_none() {
            return Err(RepoError::NoKeys);
        }
        let _guard = self.lock.lock().await;
        let policy = Policy {
            staged: self
                .releases()?
                .into_iter()
                .map(|r| (r.hardware_id, r.version))
                .collect(),
            ..Policy::default()
        };
        let tag = hex::encode(rand::random::<[u8; 8]>());
        let work = self.store.staging_dir().join(format!("import-{tag}"));
        let file = self.store.staging_dir().join(format!("import-{tag}.img"));
        let this = self.clone();
        let handle = tokio::runtime::Handle::current();
        let (w, f) = (work.clone(), file.clone());
        let outcome = tokio::task::spawn_blocking(move || {
            let (release, _) = crate::ota::sources::read_bundle(
                body,
                &w,
                &f,
                None,
                |location, hardware, version| {
                    handle.block_on(staging::verify(
                        &this.mirror,
                        location,
                        HttpTransport::new(reqwest::Client::new()),
                        Wanted { hardware, version },
                        &policy,
                        this.store.root(),
                    ))
                },
                |_| {},
            )?;
            let new_chunks = release
                .index
                .chunks
                .iter()
                .filter(|c| {
                    let mut sha = [0u8; 32];
                    hex::decode_to_slice(&c.sha256, &mut sha).is_ok()
                        && this.store.locate(&sha).is_none()
                })
                .count();
            staging::publish(&this.store, &this.mirror, &release, &f)?;
            this.publish_files(&release)?;
            Ok::<_, RepoError>((release, new_chunks))
        })
        .await
        .map_err(|e| RepoError::Internal(format!("import task failed: {e}")));
        let _ = fs::remove_dir_all(&work);
        let _ = fs::remove_file(&file);
        let (release, new_chunks) = outcome??;
        let imported = online::published(&self.mirror.metadata_dir())?;
        let signed = self.resign_locked(imported).await?;
        let view = self
            .releases()?
            .into_iter()
            .find(|r| r.sha256 == release.image.sha256)
            .ok_or_else(|| RepoError::Internal("the imported release is not listed".into()))?;
        Ok(Imported {
            release: view,
            new_chunks,
            signed,
        })
    }

    /// Copies the verified root chain and targets, and the small targets, into what depots
    /// fetch. Blocking.
    fn publish_files(
        &self,
        release: &atlasmesh_ota_staging::staging::VerifiedRelease,
    ) -> Result<(), RepoError> {
        let from = self.mirror.metadata_dir();
        for entry in fs::read_dir(&from).map_err(io_err("listing the import"))? {
            let name = entry
                .map_err(io_err("listing the import"))?
                .file_name()
                .to_string_lossy()
                .into_owned();
            let wanted = is_metadata_name(&name)
                && (name.ends_with(".root.json") || name.ends_with(".targets.json"))
                && name.as_bytes()[0].is_ascii_digit();
            let to = self.metadata_dir().join(&name);
            if wanted && !to.exists() {
                copy_atomic(&from.join(&name), &to)?;
            }
        }
        let mut small = vec![(
            release.image.index_target.clone(),
            release.index_bytes.clone(),
        )];
        if let Some(certifier) = release.certifier() {
            small.push((CERTIFIER_TARGET.to_owned(), certifier.to_vec()));
        }
        for (name, bytes) in small {
            let path = self
                .dir
                .join("targets")
                .join(format!("{}.{name}", hex::encode(Sha256::digest(&bytes))));
            write_atomic(&path, &bytes)?;
        }
        Ok(())
    }

    async fn resign_locked(&self, at_least: online::Published) -> Result<Resigned, RepoError> {
        let keys = self.keys.as_ref().ok_or(RepoError::NoKeys)?;
        let signed = online::resign(
            &self.metadata_dir(),
            keys,
            at_least,
            self.expiries,
            &*self.clock,
        )
        .await?;
        tracing::info!(
            targets = signed.targets_version,
            snapshot = signed.snapshot_version,
            timestamp = signed.timestamp_version,
            "image repository re-signed"
        );
        Ok(signed)
    }

    /// The images the repository lists and holds, newest targets first.
    pub fn releases(&self) -> Result<Vec<ReleaseView>, RepoError> {
        let current = online::published(&self.metadata_dir())?;
        if current.targets == 0 {
            return Ok(Vec::new());
        }
        let path = self
            .metadata_dir()
            .join(format!("{}.targets.json", current.targets));
        let bytes = fs::read(&path).map_err(io_err(format!("reading {}", path.display())))?;
        let targets: tough::schema::Signed<tough::schema::Targets> = serde_json::from_slice(&bytes)
            .map_err(|e| RepoError::Internal(format!("{}: {e}", path.display())))?;
        let mut out = Vec::new();
        for (name, target) in &targets.signed.targets {
            let Some((meta, _)) =
                atlasmesh_ota_staging::meta::ImageMeta::from_custom(&target.custom)
            else {
                continue;
            };
            let sha256 = hex::encode(&*target.hashes.sha256);
            let Ok(index) = self.store.read_index(&sha256) else {
                continue; // listed by release engineering, but never uploaded here
            };
            out.push(ReleaseView {
                hardware_id: meta.hardware_id,
                version: meta.version,
                target: name.raw().to_owned(),
                sha256,
                length: target.length,
                chunks: index.chunks.len(),
                min_version: meta.min_version,
                notes: meta.notes,
                released_at: target
                    .custom
                    .get("released_at")
                    .and_then(|v| v.as_str())
                    .map(str::to_owned),
            });
        }
        out.sort_by(|a, b| (&a.hardware_id, &b.released_at).cmp(&(&b.hardware_id, &a.released_at)));
        Ok(out)
    }

    /// Keeps the timestamp fresh: re-signs when less than half its life is left.
    pub fn spawn_refresh(self: &Arc<Self>, shutdown: CancellationToken) {
        let this = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_secs(60));
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tick.tick() => {}
                }
                if this.keys.is_none() || this.mirror.fleet_root().is_none() {
                    continue;
                }
                let due = match this.timestamp_expires() {
                    Some(expires) => expires <= this.clock.now() + this.expiries.timestamp / 2,
                    None => false, // nothing published yet
                };
                if due {
                    let _guard = this.lock.lock().await;
                    if let Err(e) = this.resign_locked(online::Published::default()).await {
                        tracing::error!(error = %e, "cannot re-sign the image repository's timestamp");
                    }
                }
            }
        });
    }

    pub fn timestamp_expires(&self) -> Option<SystemTime> {
        let bytes = fs::read(self.metadata_dir().join("timestamp.json")).ok()?;
        let ts: tough::schema::Signed<tough::schema::Timestamp> =
            serde_json::from_slice(&bytes).ok()?;
        Some(SystemTime::from(ts.signed.expires))
    }

    /// The published versions and expiry, for the API.
    pub fn status(&self) -> serde_json::Value {
        let published = online::published(&self.metadata_dir()).unwrap_or_default();
        serde_json::json!({
            "fleet_root_pinned": self.mirror.fleet_root().is_some(),
            "online_keys": self.keys.is_some(),
            "certifier": self.certifier.is_some(),
            "root_version": published.root,
            "targets_version": published.targets,
            "snapshot_version": published.snapshot,
            "timestamp_version": published.timestamp,
            "timestamp_expires": self.timestamp_expires().map(|t| crate::audit::rfc3339(crate::store::unix_ms(t))),
        })
    }
}

impl FleetTrust for Repository {
    fn fleet_root(&self) -> Option<Vec<u8>> {
        self.mirror.fleet_root()
    }

    fn certify(&self, depot: &str, local_id: &str, director_root: &[u8]) -> Option<Vec<u8>> {
        let certifier = self.certifier.as_ref()?;
        if crate::config::validate_depot_id(local_id).is_err() {
            tracing::warn!(
                depot,
                local_id,
                "not certifying a director root for a malformed depot id"
            );
            return None;
        }
        let parsed: tough::schema::Signed<tough::schema::Root> =
            serde_json::from_slice(director_root).ok()?;
        // The statement is about the first root; later ones chain from it by TUF's rules.
        if parsed.signed.version.get() != 1 || parsed.signed.verify_role(&parsed).is_err() {
            tracing::warn!(
                depot,
                local_id,
                "not certifying a director root that is not a self-signed version 1"
            );
            return None;
        }
        let now = self.clock.now();
        let cert = DepotCertificate::issue(
            certifier,
            local_id,
            director_root,
            now,
            now + DIRECTOR_CERTIFICATE_LIFETIME,
        );
        Some(cert.to_json())
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), RepoError> {
    let tmp = path.with_extension("partial");
    fs::write(&tmp, bytes).map_err(io_err(format!("writing {}", tmp.display())))?;
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io_err(format!("syncing {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(io_err(format!("renaming to {}", path.display())))
}

fn copy_atomic(from: &Path, to: &Path) -> Result<(), RepoError> {
    let bytes = fs::read(from).map_err(io_err(format!("reading {}", from.display())))?;
    write_atomic(to, &bytes)
}

/// `/repository/...` for depots, on the gRPC port: only a depot with a valid, unrevoked
/// certificate reads anything.
pub fn routes(repo: Arc<Repository>, service: CloudService) -> Router {
    Router::new()
        .route("/repository/metadata/{name}", get(metadata))
        .route("/repository/targets/{name}", get(target))
        .route("/repository/chunks/{sha256}", get(chunk))
        .route_layer(middleware::from_fn_with_state(service, depot_only))
        .with_state(repo)
}

async fn depot_only(State(service): State<CloudService>, request: Request, next: Next) -> Response {
    use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
    let certs = request
        .extensions()
        .get::<TlsConnectInfo<TcpConnectInfo>>()
        .and_then(|i| i.peer_certs());
    match service
        .authorise_peer(certs.as_deref().map(|c| &c[..]))
        .await
    {
        Ok(_) => next.run(request).await,
        Err(status) => {
            let code = match status.code() {
                tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
                tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            (code, status.message().to_owned()).into_response()
        }
    }
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, "not in the repository").into_response()
}

async fn file_response(path: PathBuf, content_type: &'static str) -> Response {
    match tokio::fs::read(&path).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, content_type)], bytes).into_response(),
        Err(e) if e.kind() == io::ErrorKind::NotFound => not_found(),
        Err(e) => {
            tracing::error!(path = %path.display(), error = %e, "cannot read a repository file");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
    }
}

async fn metadata(State(repo): State<Arc<Repository>>, UrlPath(name): UrlPath<String>) -> Response {
    if !is_metadata_name(&name) {
        return not_found();
    }
    file_response(repo.metadata_dir().join(name), "application/json").await
}

async fn target(State(repo): State<Arc<Repository>>, UrlPath(name): UrlPath<String>) -> Response {
    let plain = name.len() > 65
        && atlasmesh_ota_staging::chunks::is_sha256_hex(&name[..64])
        && name.as_bytes()[64] == b'.'
        && !name.contains('/')
        && !name[65..].starts_with('.');
    if !plain {
        return not_found();
    }
    file_response(
        repo.dir.join("targets").join(name),
        "application/octet-stream",
    )
    .await
}

async fn chunk(State(repo): State<Arc<Repository>>, UrlPath(sha256): UrlPath<String>) -> Response {
    let mut sha = [0u8; 32];
    if !atlasmesh_ota_staging::chunks::is_sha256_hex(&sha256)
        || hex::decode_to_slice(&sha256, &mut sha).is_err()
    {
        return not_found();
    }
    let Some(at) = repo.store.locate(&sha) else {
        return not_found();
    };
    let pack = repo.store.pack_path(&hex::encode(at.image));
    let read = tokio::task::spawn_blocking(move || {
        let file = fs::File::open(&pack)?;
        ImageStore::read_at(&file, at.offset, at.length as usize)
    })
    .await;
    match read {
        Ok(Ok(bytes)) => (
            [(header::CONTENT_TYPE, "application/octet-stream")],
            Body::from(bytes),
        )
            .into_response(),
        Ok(Err(e)) => {
            tracing::error!(chunk = %sha256, error = %e, "cannot read a chunk from its pack");
            StatusCode::INTERNAL_SERVER_ERROR.into_response()
        }
        Err(_) => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
    }
}
