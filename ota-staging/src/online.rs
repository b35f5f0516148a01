//! The fleet core's online signing of the image repository. Release engineering signs root and
//! targets offline; the cloud holds only the snapshot and timestamp keys and re-signs those two
//! roles over whatever targets release engineering published, so a compromised cloud can
//! freeze or replay releases (bounded by expiry) but never name an image of its own.
//!
//! Files are written in TUF's consistent-snapshot layout (`N.snapshot.json`, then
//! `timestamp.json` last, so a client never sees a timestamp naming a missing snapshot).

use std::collections::HashMap;
use std::fs;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use aws_lc_rs::rand::SystemRandom;
use sha2::{Digest, Sha256};
use tough::editor::signed::SignedRole;
use tough::schema::{Hashes, KeyHolder, Metafile, Root, Signed, Snapshot, Timestamp};

use crate::keys::KeyPair;
use crate::release::{ReleaseError, SPEC_VERSION};
use crate::time::{Clock, jiff_after};

/// The two keys the cloud keeps online.
#[derive(Debug)]
pub struct OnlineKeys {
    pub snapshot: KeyPair,
    pub timestamp: KeyPair,
}

/// How long the online roles live.
#[derive(Debug, Clone, Copy)]
pub struct OnlineExpiries {
    pub snapshot: Duration,
    pub timestamp: Duration,
}

/// What one re-signing wrote.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Resigned {
    pub targets_version: u64,
    pub snapshot_version: u64,
    pub timestamp_version: u64,
    #[serde(skip)]
    pub timestamp_expires: SystemTime,
}

/// The versions currently published in a metadata directory (0 where there is none).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Published {
    pub root: u64,
    pub targets: u64,
    pub snapshot: u64,
    pub timestamp: u64,
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ReleaseError {
    let context = context.into();
    move |source| ReleaseError::Io { context, source }
}

/// The highest `N` of the `N.<role>.json` files in `dir`.
fn newest(dir: &Path, role: &str) -> Result<u64, ReleaseError> {
    let suffix = format!(".{role}.json");
    let mut best = 0;
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io(format!("listing {}", dir.display()))(e)),
    };
    for entry in entries {
        let entry = entry.map_err(io(format!("listing {}", dir.display())))?;
        let name = entry.file_name();
        if let Some(n) = name
            .to_str()
            .and_then(|n| n.strip_suffix(&suffix))
            .and_then(|n| n.parse::<u64>().ok())
        {
            best = best.max(n);
        }
    }
    Ok(best)
}

fn versioned(dir: &Path, version: u64, role: &str) -> PathBuf {
    dir.join(format!("{version}.{role}.json"))
}

/// Reads which versions `metadata_dir` publishes.
pub fn published(metadata_dir: &Path) -> Result<Published, ReleaseError> {
    let mut out = Published {
        root: newest(metadata_dir, "root")?,
        targets: newest(metadata_dir, "targets")?,
        ..Published::default()
    };
    match fs::read(metadata_dir.join("timestamp.json")) {
        Ok(bytes) => {
            let ts: Signed<Timestamp> = serde_json::from_slice(&bytes)
                .map_err(|e| ReleaseError::Invalid(format!("timestamp.json: {e}")))?;
            out.timestamp = ts.signed.version.get();
            out.snapshot = ts
                .signed
                .meta
                .get("snapshot.json")
                .map_or(0, |m| m.version.get());
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io("reading timestamp.json")(e)),
    }
    Ok(out)
}

fn metafile(bytes: &[u8], version: NonZeroU64) -> Metafile {
    Metafile {
        length: Some(bytes.len() as u64),
        hashes: Some(Hashes {
            sha256: Sha256::digest(bytes).to_vec().into(),
            _extra: HashMap::new(),
        }),
        version,
        _extra: HashMap::new(),
    }
}

/// Signs a new snapshot over the newest targets in `metadata_dir` and a new timestamp over it,
/// each one version above both what the directory published and `at_least` (the versions an
/// imported release carried, which depots may already have seen). The root must name the
/// keys; a key it does not name is refused here rather than by every depot later.
pub async fn resign(
    metadata_dir: &Path,
    keys: &OnlineKeys,
    at_least: Published,
    expiries: OnlineExpiries,
    clock: &dyn Clock,
) -> Result<Resigned, ReleaseError> {
    let current = published(metadata_dir)?;
    if current.root == 0 || current.targets == 0 {
        return Err(ReleaseError::Invalid(
            "the repository has no root or targets metadata yet: publish a release first".into(),
        ));
    }
    let root_bytes = fs::read(versioned(metadata_dir, current.root, "root"))
        .map_err(io(format!("reading {}.root.json", current.root)))?;
    let root: Signed<Root> = serde_json::from_slice(&root_bytes)
        .map_err(|e| ReleaseError::Invalid(format!("{}.root.json: {e}", current.root)))?;
    for (role, key) in [
        (tough::schema::RoleType::Snapshot, &keys.snapshot),
        (tough::schema::RoleType::Timestamp, &keys.timestamp),
    ] {
        let named = root
            .signed
            .roles
            .get(&role)
            .is_some_and(|r| r.keyids.contains(&key.key_id()));
        if !named {
            return Err(ReleaseError::Invalid(format!(
                "the fleet root (version {}) does not name this {role:?} key",
                current.root
            )));
        }
    }
    let targets_bytes = fs::read(versioned(metadata_dir, current.targets, "targets"))
        .map_err(io(format!("reading {}.targets.json", current.targets)))?;
    let targets_version = NonZeroU64::new(current.targets).expect("checked above");

    let now = clock.now();
    let next = |a: u64, b: u64| NonZeroU64::new(a.max(b) + 1).expect("above zero");
    let rng = SystemRandom::new();
    let holder = KeyHolder::Root(root.signed.clone());

    let mut snapshot = Snapshot::new(
        SPEC_VERSION.into(),
        next(current.snapshot, at_least.snapshot),
        jiff_after(now, expiries.snapshot),
    );
    snapshot.meta.insert(
        "targets.json".into(),
        metafile(&targets_bytes, targets_version),
    );
    let snapshot = SignedRole::new(snapshot, &holder, &[keys.snapshot.source()], &rng).await?;

    let mut timestamp = Timestamp::new(
        SPEC_VERSION.into(),
        next(current.timestamp, at_least.timestamp),
        jiff_after(now, expiries.timestamp),
    );
    timestamp.meta.insert(
        "snapshot.json".into(),
        metafile(snapshot.buffer(), snapshot.signed().signed.version),
    );
    let timestamp = SignedRole::new(timestamp, &holder, &[keys.timestamp.source()], &rng).await?;

    snapshot.write(metadata_dir, true).await?;
    timestamp.write(metadata_dir, true).await?;
    Ok(Resigned {
        targets_version: current.targets,
        snapshot_version: snapshot.signed().signed.version.get(),
        timestamp_version: timestamp.signed().signed.version.get(),
        timestamp_expires: SystemTime::from(timestamp.signed().signed.expires),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::meta::ImageMeta;
    use crate::release::{self, Expiries, Keys};
    use crate::time::FixedClock;

    #[tokio::test]
    async fn resigned_repository_loads_and_versions_grow() {
        let dir = tempfile::tempdir().unwrap();
        let keys_dir = dir.path().join("keys");
        let repo = dir.path().join("repo");
        Keys::generate(&keys_dir).unwrap();
        let keys = Keys::load(&keys_dir).unwrap();
        let clock = FixedClock::now();
        release::init(&repo, &keys, Expiries::default(), &clock)
            .await
            .unwrap();
        let image = dir.path().join("image.bin");
        fs::write(&image, vec![3u8; 100_000]).unwrap();
        let meta = ImageMeta {
            version: "1.0.0".into(),
            hardware_id: "hw".into(),
            min_version: None,
            notes: None,
        };
        release::add(&repo, &keys, &image, &meta, Expiries::default(), &clock)
            .await
            .unwrap();
        let metadata = repo.join("metadata");
        let before = published(&metadata).unwrap();
        assert_eq!(before.targets, 2);

        let online = OnlineKeys {
            snapshot: KeyPair::load(&keys_dir.join("snapshot.pem")).unwrap(),
            timestamp: KeyPair::load(&keys_dir.join("timestamp.pem")).unwrap(),
        };
        let expiries = OnlineExpiries {
            snapshot: Duration::from_secs(86_400),
            timestamp: Duration::from_secs(3_600),
        };
        let floor = Published {
            snapshot: 7,
            ..Published::default()
        };
        let resigned = resign(&metadata, &online, floor, expiries, &clock)
            .await
            .unwrap();
        assert_eq!(resigned.snapshot_version, 8);
        assert_eq!(resigned.timestamp_version, before.timestamp + 1);
        // A TUF client accepts it: tough loads the repository from its root.
        let loaded = release::load(&repo).await.unwrap();
        assert_eq!(
            loaded.timestamp().signed.version.get(),
            before.timestamp + 1
        );
        assert_eq!(loaded.snapshot().signed.version.get(), 8);

        // A key the root does not name is refused before anything is written.
        let stranger = OnlineKeys {
            snapshot: KeyPair::generate(),
            timestamp: KeyPair::load(&keys_dir.join("timestamp.pem")).unwrap(),
        };
        let err = resign(&metadata, &stranger, floor, expiries, &clock)
            .await
            .unwrap_err();
        assert!(err.to_string().contains("does not name"), "{err}");
        assert_eq!(published(&metadata).unwrap().snapshot, 8);
    }
}
