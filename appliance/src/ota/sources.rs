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
