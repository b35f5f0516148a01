//! Loading a TUF repository as a client and telling apart why it was refused.
//!
//! Both the depot (verifying a release against its pinned fleet root) and vehicles use tough's
//! client workflow: root rotation, signature thresholds, expiry, version monotonicity (kept in a
//! datastore across runs), snapshot consistency and size limits. This module wraps it with an
//! HTTP transport and maps tough's many error variants onto the few that people act on.

use std::path::Path;

use futures_util::StreamExt;
use tough::{
    ExpirationEnforcement, IntoVec, Limits, Repository, RepositoryLoader, TargetName, Transport,
    TransportError, TransportErrorKind, TransportStream, async_trait,
};
use url::Url;

/// Why a repository or a target was not trusted.
#[derive(Debug, thiserror::Error, Clone, PartialEq, Eq)]
pub enum TrustError {
    #[error("bad signature: {0}")]
    Signature(String),
    #[error("{role} metadata has expired (a frozen or stale repository)")]
    Expired { role: String },
    #[error("rollback refused: {0}")]
    Rollback(String),
    #[error("size limit exceeded: {0}")]
    TooLarge(String),
    #[error("hash or length mismatch: {0}")]
    Mismatch(String),
    #[error("could not fetch {0}")]
    Fetch(String),
    #[error("target {0} is not in the signed metadata")]
    UnknownTarget(String),
    #[error("TUF: {0}")]
    Other(String),
}

impl TrustError {
    /// A short machine-readable code for APIs and audit records.
    pub fn code(&self) -> &'static str {
        match self {
            TrustError::Signature(_) => "bad_signature",
            TrustError::Expired { .. } => "expired_metadata",
            TrustError::Rollback(_) => "metadata_rollback",
            TrustError::TooLarge(_) => "too_large",
            TrustError::Mismatch(_) => "hash_mismatch",
            TrustError::Fetch(_) => "fetch_failed",
            TrustError::UnknownTarget(_) => "unknown_target",
            TrustError::Other(_) => "tuf_error",
        }
    }
}

impl From<tough::error::Error> for TrustError {
    fn from(e: tough::error::Error) -> Self {
        use tough::error::Error as E;
        let text = e.to_string();
        match e {
            E::VerifyMetadata { .. }
            | E::VerifyRoleMetadata { .. }
            | E::VerifyTrustedMetadata { .. } => TrustError::Signature(text),
            E::ExpiredMetadata { role, .. } => TrustError::Expired {
                role: role.to_string(),
            },
            E::OlderMetadata { .. }
            | E::OlderSnapshotInTimestamp { .. }
            | E::SnapshotRoleRollback { .. }
            | E::SnapshotRoleMissing { .. }
            | E::VersionMismatch { .. }
            | E::SystemTimeSteppedBackward { .. } => TrustError::Rollback(text),
            E::MaxSizeExceeded { .. } | E::MaxUpdatesExceeded { .. } => TrustError::TooLarge(text),
            E::HashMismatch { .. } => TrustError::Mismatch(text),
            // tough checks hashes and sizes while it streams, inside the transport; the real
            // cause is further down the source chain.
            E::Transport { ref source, .. } => match cause_in(source) {
                Some(E::HashMismatch { .. }) => TrustError::Mismatch(text),
                Some(E::MaxSizeExceeded { .. }) => TrustError::TooLarge(text),
                _ if is_endless(source) => TrustError::TooLarge(text),
                _ => TrustError::Fetch(text),
            },
            _ => TrustError::Other(text),
        }
    }
}

/// The first tough error in an error's source chain.
fn cause_in<'a>(error: &'a (dyn std::error::Error + 'static)) -> Option<&'a tough::error::Error> {
    let mut current = error.source();
    while let Some(e) = current {
        if let Some(found) = e.downcast_ref::<tough::error::Error>() {
            return Some(found);
        }
        current = e.source();
    }
    None
}

fn is_endless(error: &(dyn std::error::Error + 'static)) -> bool {
    let mut current = Some(error);
    while let Some(e) = current {
        if e.is::<Endless>() {
            return true;
        }
        current = e.source();
    }
    false
}

/// The largest metadata or small target fetched in one piece (endless-data defence; tough also
/// applies its own per-role limits).
pub const MAX_FETCH_BYTES: u64 = 64 * 1024 * 1024;

/// tough transport over reqwest for `http(s)://` and tough's own for `file://`. A 404 is
/// reported as "file not found", which is how tough learns that no newer root exists.
#[derive(Debug, Clone)]
pub struct HttpTransport {
    client: reqwest::Client,
}

impl HttpTransport {
    pub fn new(client: reqwest::Client) -> Self {
        Self { client }
    }
}

#[async_trait]
impl Transport for HttpTransport {
    async fn fetch(&self, url: Url) -> Result<TransportStream, TransportError> {
        match url.scheme() {
            "file" => return tough::FilesystemTransport.fetch(url).await,
            "http" | "https" => {}
            _ => {
                return Err(TransportError::new(
                    TransportErrorKind::UnsupportedUrlScheme,
                    url,
                ));
            }
        }
        let response = self.client.get(url.clone()).send().await.map_err(|e| {
            TransportError::new_with_cause(TransportErrorKind::Other, url.as_str(), e)
        })?;
        let status = response.status();
        if status == reqwest::StatusCode::NOT_FOUND || status == reqwest::StatusCode::FORBIDDEN {
            return Err(TransportError::new(TransportErrorKind::FileNotFound, url));
        }
        if !status.is_success() {
            return Err(TransportError::new_with_cause(
                TransportErrorKind::Other,
                url.as_str(),
                format!("HTTP {status}"),
            ));
        }
        // Streamed, so tough's per-role limits stop an endless response early; our own cap
        // bounds everything else tough reads in one piece.
        let url = url.to_string();
        let mut total = 0u64;
        let stream = response.bytes_stream().map(move |piece| {
            let piece = piece.map_err(|e| {
                TransportError::new_with_cause(TransportErrorKind::Other, url.as_str(), e)
            })?;
            total += piece.len() as u64;
            if total > MAX_FETCH_BYTES {
                return Err(TransportError::new_with_cause(
                    TransportErrorKind::Other,
                    url.as_str(),
                    Endless,
                ));
            }
            Ok(piece)
        });
        Ok(Box::pin(stream))
    }
}

/// A response longer than [`MAX_FETCH_BYTES`].
#[derive(Debug, thiserror::Error)]
#[error("the response exceeds {MAX_FETCH_BYTES} bytes")]
pub struct Endless;

/// Loads and verifies a repository from `root` (the trusted root bytes) and base URLs.
/// `datastore` keeps the newest versions seen, so a later load refuses older metadata.
pub async fn load<T: Transport + Send + Sync + 'static>(
    root: &[u8],
    metadata: Url,
    targets: Url,
    datastore: &Path,
    transport: T,
    expiration: ExpirationEnforcement,
) -> Result<Repository, TrustError> {
    std::fs::create_dir_all(datastore)
        .map_err(|e| TrustError::Other(format!("datastore {}: {e}", datastore.display())))?;
    Ok(RepositoryLoader::new(&root, metadata, targets)
        .transport(transport)
        .datastore(datastore)
        .expiration_enforcement(expiration)
        .limits(Limits {
            max_root_size: 1024 * 1024,
            max_targets_size: 32 * 1024 * 1024,
            max_timestamp_size: 1024 * 1024,
            max_snapshot_size: 32 * 1024 * 1024,
            max_root_updates: 1024,
        })
        .load()
        .await?)
}

/// Reads a (small) target completely, verified by tough against its signed length and hash.
pub async fn read_small_target(repo: &Repository, name: &str) -> Result<Vec<u8>, TrustError> {
    let target = TargetName::new(name).map_err(|e| TrustError::Other(e.to_string()))?;
    let stream = repo
        .read_target(&target)
        .await?
        .ok_or_else(|| TrustError::UnknownTarget(name.to_owned()))?;
    stream.into_vec().await.map_err(TrustError::from)
}

/// A base URL that ends in `/`, so joining a file name appends instead of replacing.
pub fn dir_url(mut url: Url) -> Url {
    if !url.path().ends_with('/') {
        let path = format!("{}/", url.path());
        url.set_path(&path);
    }
    url
}
