//! Where an image's bytes come from while it is staged: an HTTP download that resumes with
//! Range after a dropped connection and respects the download cap, or the image entry of an
//! uploaded release bundle. Both are blocking readers, fed to the single ingest pass.

use std::fs::{self, File};
use std::io::{self, Read};
use std::ops::Range;
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use atlasmesh_ota_staging::bandwidth::Bandwidth;
use atlasmesh_ota_staging::chunks::Ingested;
use atlasmesh_ota_staging::staging::{
    self, Location, StagingError, VerifiedRelease, is_metadata_name,
};
use bytes::Bytes;
use futures_util::StreamExt;
use reqwest::header::{CONTENT_RANGE, ETAG, IF_RANGE, RANGE};
use tokio::runtime::Handle;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use url::Url;

/// An image downloaded over HTTP, read as a plain `Read`. The download runs on the async
/// runtime; a dropped connection is resumed from the last byte received (`Range` with
/// `If-Range` on the first response's ETag, so a file replaced meanwhile is noticed).
pub struct Download {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
    cancel: CancellationToken,
}

const MAX_ATTEMPTS: u32 = 8;

impl Download {
    /// Downloads `bytes` of `url` (the signed length as the end; a start above 0 resumes a
    /// download the depot stopped under).
    pub fn start(
        handle: &Handle,
        client: reqwest::Client,
        url: Url,
        bytes: Range<u64>,
        bandwidth: Bandwidth,
    ) -> Self {
        let (tx, rx) = mpsc::channel(16);
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        handle.spawn(async move {
            let result = tokio::select! {
                r = fetch(&client, &url, bytes, &bandwidth, &tx) => r,
                _ = stop.cancelled() => Ok(()),
            };
            if let Err(e) = result {
                let _ = tx.send(Err(e)).await;
            }
        });
        Self {
            rx,
            current: Bytes::new(),
            cancel,
        }
    }
}

impl Drop for Download {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn fetch(
    client: &reqwest::Client,
    url: &Url,
    bytes: Range<u64>,
    bandwidth: &Bandwidth,
    tx: &mpsc::Sender<io::Result<Bytes>>,
) -> io::Result<()> {
    let (mut received, length) = (bytes.start, bytes.end);
    let mut etag: Option<String> = None;
    let mut attempts = 0u32;
    while received < length {
        let mut request = client.get(url.clone());
        if received > 0 {
            request = request.header(RANGE, format!("bytes={received}-"));
            if let Some(tag) = &etag {
                request = request.header(IF_RANGE, tag.as_str());
            }
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                attempts += 1;
                if attempts >= MAX_ATTEMPTS {
                    return Err(io::Error::other(format!("{url}: {e}")));
                }
                tracing::warn!(url = %url, error = %e, attempts, "download failed; retrying");
                tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempts.min(5)))).await;
                continue;
            }
        };
        let status = response.status();
        // Where this response's body starts in the file.
        let mut skip = 0u64;
        match status.as_u16() {
            200 => {
                // The server sent the whole file (no range support, or it changed): skip what
                // was already read, so the ingest pass still sees each byte once.
                skip = received;
                if received > 0
                    && etag.is_some()
                    && response.headers().get(ETAG).and_then(|v| v.to_str().ok()) != etag.as_deref()
                {
                    return Err(io::Error::other(format!(
                        "{url} changed during the download"
                    )));
                }
            }
            206 => {
                let start = response
                    .headers()
                    .get(CONTENT_RANGE)
                    .and_then(|v| v.to_str().ok())
                    .and_then(|v| v.strip_prefix("bytes "))
                    .and_then(|v| v.split('-').next())
                    .and_then(|v| v.parse::<u64>().ok());
                if start != Some(received) {
                    return Err(io::Error::other(format!(
                        "{url} answered a range from {start:?}, not {received}"
                    )));
                }
            }
            _ => return Err(io::Error::other(format!("{url}: HTTP {status}"))),
        }
        if etag.is_none() {
            etag = response
                .headers()
                .get(ETAG)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned);
        }
        let mut body = response.bytes_stream();
        let mut failed = false;
        while let Some(piece) = body.next().await {
            let mut piece = match piece {
                Ok(p) => p,
                Err(e) => {
                    tracing::warn!(url = %url, error = %e, received, "download interrupted; resuming");
                    failed = true;
                    break;
                }
            };
            if skip > 0 {
                let n = skip.min(piece.len() as u64) as usize;
                let _ = piece.split_to(n);
                skip -= n as u64;
                if piece.is_empty() {
                    continue;
                }
            }
            if received + piece.len() as u64 > length {
                return Err(io::Error::other(format!(
                    "{url} is longer than the signed {length} bytes"
                )));
            }
            bandwidth.acquire(piece.len()).await;
            received += piece.len() as u64;
            if tx.send(Ok(piece)).await.is_err() {
                return Ok(()); // the reader is gone
            }
        }
        if failed {
            attempts += 1;
            if attempts >= MAX_ATTEMPTS {
                return Err(io::Error::other(format!(
                    "{url}: gave up after {attempts} interrupted attempts"
                )));
            }
            tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempts.min(5)))).await;
        } else if received < length {
            // A clean end before the signed length: the ingest pass reports the short image.
            return Ok(());
        }
    }
    Ok(())
}

impl Read for Download {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(Ok(bytes)) => self.current = bytes,
                Some(Err(e)) => return Err(e),
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}

const MAX_METADATA_ENTRY: u64 = 32 * 1024 * 1024;
const MAX_SMALL_TARGET: u64 = 64 * 1024 * 1024;

/// What a bundle entry is, by its path.
enum Entry {
    Metadata(String),
    /// `targets/<sha256>.<name>`; the image is the one ending in `.img`.
    Target(String),
}

fn classify(path: &Path) -> Result<Entry, StagingError> {
    let parts: Vec<&str> = path
        .components()
        .map(|c| match c {
            Component::Normal(s) => s.to_str().ok_or(()),
            _ => Err(()),
        })
        .collect::<Result<_, _>>()
        .map_err(|()| StagingError::Source(format!("unsafe path in bundle: {}", path.display())))?;
    match parts.as_slice() {
        ["metadata", name] if is_metadata_name(name) => Ok(Entry::Metadata((*name).to_owned())),
        ["targets", name]
            if name.len() > 65
                && atlasmesh_ota_staging::chunks::is_sha256_hex(&name[..64])
                && name.as_bytes()[64] == b'.' =>
        {
            Ok(Entry::Target((*name).to_owned()))
        }
        _ => Err(StagingError::Source(format!(
            "unexpected entry in bundle: {}",
            path.display()
        ))),
    }
}

/// Hardware id and version from an image target name (`<hardware>_<version>.img`).
pub fn parse_image_target(target: &str) -> Option<(String, String)> {
    let stem = target.strip_suffix(".img")?;
    let (hw, version) = stem.rsplit_once('_')?;
    Some((hw.to_owned(), version.to_owned()))
}

/// Reads a release bundle (a tar of `metadata/` and `targets/`, the image last): metadata and
/// small targets are unpacked into `work_dir`, then `verify` is asked to check them, and the
/// image entry is ingested straight from the upload into `staging_file` without touching the
/// disk first. Blocking.
pub fn read_bundle(
    reader: impl Read,
    work_dir: &Path,
    staging_file: &Path,
    wanted: Option<(&str, &str)>,
    verify: impl FnOnce(&Location, &str, &str) -> Result<VerifiedRelease, StagingError>,
    progress: impl FnMut(u64),
) -> Result<(VerifiedRelease, Ingested), StagingError> {
    let io_err = |what: &str| {
        let what = what.to_owned();
        move |e: io::Error| StagingError::Source(format!("{what}: {e}"))
    };
    fs::create_dir_all(work_dir.join("metadata")).map_err(io_err("preparing the upload"))?;
    fs::create_dir_all(work_dir.join("targets")).map_err(io_err("preparing the upload"))?;
    let mut archive = tar::Archive::new(reader);
    let mut verify = Some(verify);
    let mut progress = Some(progress);
    let mut done = None;
    for entry in archive.entries().map_err(io_err("reading the bundle"))? {
        let mut entry = entry.map_err(io_err("reading the bundle"))?;
        if entry.header().entry_type().is_dir() {
            continue;
        }
        if done.is_some() {
            return Err(StagingError::Source(
                "the image must be the bundle's last entry".into(),
            ));
        }
        let path: PathBuf = entry
            .path()
            .map_err(io_err("reading the bundle"))?
            .into_owned();
        let size = entry.size();
        match classify(&path)? {
            Entry::Metadata(name) => {
                if size > MAX_METADATA_ENTRY {
                    return Err(StagingError::Source(format!(
                        "metadata {name} is {size} bytes"
                    )));
                }
                copy_entry(&mut entry, &work_dir.join("metadata").join(&name))?;
            }
            Entry::Target(name) if name.ends_with(".img") => {
                let target = &name[65..];
                let (hw, version) = parse_image_target(target).ok_or_else(|| {
                    StagingError::Source(format!("cannot read an image target from {name}"))
                })?;
                if let Some((want_hw, want_version)) = wanted
                    && (want_hw != hw || want_version != version)
                {
                    return Err(StagingError::NotInRelease {
                        hardware: want_hw.into(),
                        version: want_version.into(),
                    });
                }
                let location = Location::directory(work_dir)?;
                let verify = verify.take().expect("one image per bundle");
                let release = verify(&location, &hw, &version)?;
                if name != format!("{}.{}", release.image.sha256, release.image.target) {
                    return Err(StagingError::Hash {
                        expected: release.image.sha256.clone(),
                        actual: name[..64].to_owned(),
                    });
                }
                let progress = progress.take().expect("one image per bundle");
                let ingested =
                    staging::ingest_image(&release, &mut entry, staging_file, 0, progress)?;
                done = Some((release, ingested));
            }
            Entry::Target(name) => {
                if size > MAX_SMALL_TARGET {
                    return Err(StagingError::Source(format!(
                        "target {name} is {size} bytes; only the image may be large"
                    )));
                }
                copy_entry(&mut entry, &work_dir.join("targets").join(&name))?;
            }
        }
    }
    done.ok_or_else(|| StagingError::Source("the bundle contains no image".into()))
}

fn copy_entry(entry: &mut impl Read, to: &Path) -> Result<(), StagingError> {
    let mut file = File::create(to)
        .map_err(|e| StagingError::Source(format!("unpacking {}: {e}", to.display())))?;
    io::copy(entry, &mut file)
        .map_err(|e| StagingError::Source(format!("unpacking {}: {e}", to.display())))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_target_names_parse() {
        assert_eq!(
            parse_image_target("veh-gen2_1.4.0.img"),
            Some(("veh-gen2".into(), "1.4.0".into()))
        );
        assert_eq!(
            parse_image_target("a_b_1.0.0-rc.1.img"),
            Some(("a_b".into(), "1.0.0-rc.1".into()))
        );
        assert_eq!(parse_image_target("nounderscore.img"), None);
    }

    #[test]
    fn bundle_paths_are_checked() {
        assert!(matches!(
            classify(Path::new("metadata/1.root.json")),
            Ok(Entry::Metadata(_))
        ));
        let sha = "a".repeat(64);
        assert!(matches!(
            classify(Path::new(&format!("targets/{sha}.hw_1.0.0.img"))),
            Ok(Entry::Target(_))
        ));
        for bad in [
            "../metadata/root.json",
            "metadata/../../etc/passwd",
            "/etc/passwd",
            "targets/x.img",
            "metadata/evil.sh",
        ] {
            assert!(classify(Path::new(bad)).is_err(), "{bad}");
        }
    }
}

/// How many chunk requests are in flight at once: enough to hide a round trip, few enough
/// that the bandwidth cap and a slow link are not swamped.
const CHUNKS_IN_FLIGHT: usize = 4;

/// Where each chunk of an image came from, for the job's record; `reused` and `fetched` are
/// the depot's metric counters, moved as each chunk arrives so a long fetch shows progress
/// (and an interrupted one what it cost).
#[derive(Debug, Default)]
pub struct ChunkStats {
    pub reused_chunks: std::sync::atomic::AtomicU64,
    pub reused_bytes: std::sync::atomic::AtomicU64,
    pub fetched_chunks: std::sync::atomic::AtomicU64,
    pub fetched_bytes: std::sync::atomic::AtomicU64,
    pub reused: prometheus_client::metrics::counter::Counter,
    pub fetched: prometheus_client::metrics::counter::Counter,
}

/// An image assembled from its signed chunk index: chunks the depot's store already holds
/// (from any staged image) are read from their packs; only the others are fetched from the
/// cloud's chunk store (`<base>chunks/<sha256>`), a few at a time, in order, within the
/// download cap, each retried with backoff. Read as a plain `Read` by the ingest pass, which
/// checks the whole image against the signed length, hash and index as for any source.
pub struct CloudChunks {
    /// Each chunk with where the store held it when the job started (`None`: fetched).
    chunks: std::vec::IntoIter<(
        atlasmesh_ota_staging::chunks::Chunk,
        Option<atlasmesh_ota_staging::store::ChunkLocation>,
    )>,
    store: std::sync::Arc<atlasmesh_ota_staging::store::ImageStore>,
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
    stats: std::sync::Arc<ChunkStats>,
    cancel: CancellationToken,
}

impl CloudChunks {
    /// Starts fetching the missing chunks of `chunks` (those from the resume point on).
    pub fn start(
        handle: &Handle,
        client: reqwest::Client,
        base: Url,
        chunks: Vec<atlasmesh_ota_staging::chunks::Chunk>,
        store: std::sync::Arc<atlasmesh_ota_staging::store::ImageStore>,
        bandwidth: Bandwidth,
        stats: std::sync::Arc<ChunkStats>,
    ) -> Self {
        let chunks: Vec<_> = chunks
            .into_iter()
            .map(|c| {
                let at = locate(&store, &c.sha256);
                (c, at)
            })
            .collect();
        let missing: Vec<_> = chunks
            .iter()
            .filter(|(_, at)| at.is_none())
            .map(|(c, _)| c.clone())
            .collect();
        let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT * 2);
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        handle.spawn(async move {
            use futures_util::stream;
            let mut fetched = stream::iter(missing)
                .map(|chunk| {
                    let (client, base, bandwidth) =
                        (client.clone(), base.clone(), bandwidth.clone());
                    async move { fetch_chunk(&client, &base, &chunk, &bandwidth).await }
                })
                .buffered(CHUNKS_IN_FLIGHT);
            loop {
                let next = tokio::select! {
                    n = fetched.next() => n,
                    _ = stop.cancelled() => return,
                };
                let Some(result) = next else { return };
                let failed = result.is_err();
                if tx.send(result).await.is_err() || failed {
                    return;
                }
            }
        });
        Self {
            chunks: chunks.into_iter(),
            store,
            rx,
            current: Bytes::new(),
            stats,
            cancel,
        }
    }
}

impl Drop for CloudChunks {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

fn locate(
    store: &atlasmesh_ota_staging::store::ImageStore,
    sha256: &str,
) -> Option<atlasmesh_ota_staging::store::ChunkLocation> {
    let mut sha = [0u8; 32];
    hex::decode_to_slice(sha256, &mut sha).ok()?;
    store.locate(&sha)
}

async fn fetch_chunk(
    client: &reqwest::Client,
    base: &Url,
    chunk: &atlasmesh_ota_staging::chunks::Chunk,
    bandwidth: &Bandwidth,
) -> io::Result<Bytes> {
    use sha2::{Digest, Sha256};
    let url = base
        .join(&format!("chunks/{}", chunk.sha256))
        .map_err(|e| io::Error::other(format!("{base}: {e}")))?;
    let mut attempts = 0u32;
    loop {
        let outcome = async {
            let response = client
                .get(url.clone())
                .send()
                .await
                .map_err(|e| e.to_string())?;
            let status = response.status();
            if !status.is_success() {
                return Err(format!("HTTP {status}"));
            }
            if response
                .content_length()
                .is_some_and(|n| n != u64::from(chunk.length))
            {
                return Err(format!(
                    "the cloud sent a chunk of the wrong length (want {})",
                    chunk.length
                ));
            }
            let mut body = response.bytes_stream();
            let mut bytes = Vec::with_capacity(chunk.length as usize);
            while let Some(piece) = body.next().await {
                let piece = piece.map_err(|e| e.to_string())?;
                if bytes.len() + piece.len() > chunk.length as usize {
                    return Err("the cloud sent more than the chunk's signed length".into());
                }
                bandwidth.acquire(piece.len()).await;
                bytes.extend_from_slice(&piece);
            }
            if hex::encode(Sha256::digest(&bytes)) != chunk.sha256 {
                return Err("the chunk does not hash to the signed index".into());
            }
            Ok(Bytes::from(bytes))
        }
        .await;
        match outcome {
            Ok(bytes) => return Ok(bytes),
            Err(e) => {
                attempts += 1;
                if attempts >= MAX_ATTEMPTS {
                    return Err(io::Error::other(format!(
                        "chunk {} from {url}: {e} (gave up after {attempts} attempts)",
                        chunk.sha256
                    )));
                }
                tracing::warn!(chunk = %chunk.sha256, error = %e, attempts, "chunk fetch failed; retrying");
                tokio::time::sleep(Duration::from_millis(200 * 2u64.pow(attempts.min(5)))).await;
            }
        }
    }
}

impl Read for CloudChunks {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::sync::atomic::Ordering::Relaxed;
        while self.current.is_empty() {
            let Some((_, at)) = self.chunks.next() else {
                return Ok(0);
            };
            self.current = match at {
                Some(at) => {
                    let pack = File::open(self.store.pack_path(&hex::encode(at.image)))?;
                    let bytes = atlasmesh_ota_staging::store::ImageStore::read_at(
                        &pack,
                        at.offset,
                        at.length as usize,
                    )?;
                    self.stats.reused_chunks.fetch_add(1, Relaxed);
                    self.stats
                        .reused_bytes
                        .fetch_add(bytes.len() as u64, Relaxed);
                    self.stats.reused.inc_by(bytes.len() as u64);
                    Bytes::from(bytes)
                }
                None => match self.rx.blocking_recv() {
                    Some(Ok(bytes)) => {
                        self.stats.fetched_chunks.fetch_add(1, Relaxed);
                        self.stats
                            .fetched_bytes
                            .fetch_add(bytes.len() as u64, Relaxed);
                        self.stats.fetched.inc_by(bytes.len() as u64);
                        bytes
                    }
                    Some(Err(e)) => return Err(e),
                    None => {
                        return Err(io::Error::other("the chunk download stopped"));
                    }
                },
            };
        }
        let n = buf.len().min(self.current.len());
        buf[..n].copy_from_slice(&self.current.split_to(n));
        Ok(n)
    }
}
