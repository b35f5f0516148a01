//! The depot's director repository: standard TUF metadata, signed with keys the depot holds
//! online, whose targets name per vehicle the image that vehicle must install now.
//!
//! Layout under the director directory:
//!
//! ```text
//! keys/{root,targets,snapshot,timestamp}.pem    generated on first use, mode 0600
//! metadata/1.root.json, root.json                the root the fleet certifies
//! metadata/N.targets.json, N.snapshot.json, timestamp.json
//! certificate.json                               the fleet's certificate, once installed
//! ```
//!
//! Every publication gets new versions and short expiries, so a replayed or frozen assignment
//! is refused by vehicles. A target is `vehicle_<vehicle-id>.img` with the image's exact
//! length and hashes (a vehicle checks they equal the image repository's) and custom fields
//! naming the image target, version, hardware and chunk index.

use std::collections::HashMap;
use std::fs;
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use serde_json::json;
use tough::TargetName;
use tough::editor::RepositoryEditor;
use tough::schema::{Hashes, Signed, Target, Timestamp};

use crate::keys::{KeyError, KeyPair};
use crate::release::{self, ReleaseError};
use crate::time::{Clock, jiff_after};

#[derive(Debug, thiserror::Error)]
pub enum DirectorError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error(transparent)]
    Release(#[from] ReleaseError),
    // Boxed: tough's error carries a backtrace and is large.
    #[error("TUF: {0}")]
    Tuf(Box<tough::error::Error>),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

impl From<tough::error::Error> for DirectorError {
    fn from(e: tough::error::Error) -> Self {
        DirectorError::Tuf(Box::new(e))
    }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> DirectorError {
    let context = context.into();
    move |source| DirectorError::Io { context, source }
}

/// How long the director's metadata lives. Short: a vehicle must see fresh assignments, and a
/// stale one must stop working soon. The depot re-publishes well before they lapse.
#[derive(Debug, Clone, Copy)]
pub struct DirectorExpiries {
    pub root: Duration,
    pub targets: Duration,
    pub snapshot: Duration,
    pub timestamp: Duration,
}

impl Default for DirectorExpiries {
    fn default() -> Self {
        Self {
            root: Duration::from_secs(2 * 365 * 86_400),
            targets: Duration::from_secs(12 * 3600),
            snapshot: Duration::from_secs(12 * 3600),
            timestamp: Duration::from_secs(2 * 3600),
        }
    }
}

/// One vehicle's current assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Assignment {
    pub vehicle_id: String,
    /// The image repository target the vehicle must install.
    pub image_target: String,
    pub version: String,
    pub hardware_id: String,
    pub length: u64,
    pub sha256: String,
    pub chunk_index: String,
    pub assigned_at: String,
}

/// Flat, like the image repository's names (see [`crate::meta::image_target_name`]).
pub fn vehicle_target_name(vehicle_id: &str) -> String {
    format!("vehicle_{vehicle_id}.img")
}

/// Vehicle ids become path segments and MQTT topic levels: a safe, bounded set.
/// The rule for ids that appear in target names, file names and MQTT topics: 1 to 64 letters,
/// digits, `-`, `_` or `.`, not starting with a dot (never a path, wildcard or level separator).
pub fn is_plain_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
        && !id.starts_with('.')
}

pub fn validate_vehicle_id(id: &str) -> Result<(), String> {
    if is_plain_id(id) {
        Ok(())
    } else {
        Err(format!(
            "{id:?} is not a valid vehicle id: use 1 to 64 characters from letters, digits, '-', '_' and '.'"
        ))
    }
}

#[derive(Debug)]
pub struct Director {
    dir: PathBuf,
    keys: [KeyPair; 4],
    root_v1: Vec<u8>,
}

/// An ed25519 signature by one of the director's keys over a non-TUF statement.
#[derive(Debug, Clone, Serialize)]
pub struct StatementSignature {
    /// The director role whose key signed: its key id is listed in the director root.
    pub role: &'static str,
    pub key_id: String,
    pub public_key: String,
    pub signature: String,
}

/// Versions of one publication.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Published {
    pub targets_version: u64,
    pub snapshot_version: u64,
    pub timestamp_version: u64,
}

const KEY_NAMES: [&str; 4] = ["root", "targets", "snapshot", "timestamp"];

impl Director {
    /// Opens the director in `dir`, creating keys and root v1 on first use.
    pub async fn open(
        dir: &Path,
        clock: &dyn Clock,
        expiries: DirectorExpiries,
    ) -> Result<Self, DirectorError> {
        let keys_dir = dir.join("keys");
        let metadata = dir.join("metadata");
        fs::create_dir_all(&keys_dir).map_err(io(format!("creating {}", keys_dir.display())))?;
        fs::set_permissions(
            &keys_dir,
            std::os::unix::fs::PermissionsExt::from_mode(0o700),
        )
        .map_err(io(format!("restricting {}", keys_dir.display())))?;
        fs::create_dir_all(&metadata).map_err(io(format!("creating {}", metadata.display())))?;
        for name in KEY_NAMES {
            let path = keys_dir.join(format!("{name}.pem"));
            if !path.exists() {
                KeyPair::generate().write_new(&path)?;
            }
        }
        let load = |name: &str| KeyPair::load(&keys_dir.join(format!("{name}.pem")));
        let keys = [
            load("root")?,
            load("targets")?,
            load("snapshot")?,
            load("timestamp")?,
        ];
        let root_path = metadata.join("1.root.json");
        if !root_path.exists() {
            let root = release::root_for(
                [&keys[0], &keys[1], &keys[2], &keys[3]],
                NonZeroU64::MIN,
                jiff_after(clock.now(), expiries.root),
            );
            let signed = release::sign_root(root, &[&keys[0]]).await?;
            // Written once and never changed: this is what the fleet certifies.
            write_atomic(&root_path, signed.buffer())?;
            write_atomic(&metadata.join("root.json"), signed.buffer())?;
        }
        let root_v1 =
            fs::read(&root_path).map_err(io(format!("reading {}", root_path.display())))?;
        Ok(Self {
            dir: dir.to_owned(),
            keys,
            root_v1,
        })
    }

    /// Signs a statement that is not TUF metadata (rollout evidence) with the director's
    /// targets key, whose trust follows from the fleet-certified root. The message is signed as
    /// `domain`, a newline, then the message, so the signature can never pass for one over TUF
    /// metadata (canonical JSON, which starts with `{`).
    pub fn sign_statement(&self, domain: &str, message: &[u8]) -> StatementSignature {
        let key = &self.keys[1];
        let mut signed = Vec::with_capacity(domain.len() + 1 + message.len());
        signed.extend_from_slice(domain.as_bytes());
        signed.push(b'\n');
        signed.extend_from_slice(message);
        StatementSignature {
            role: "targets",
            key_id: hex::encode(key.key_id().as_ref()),
            public_key: key.public_hex(),
            signature: hex::encode(key.sign(&signed)),
        }
    }

    /// The exact bytes of `1.root.json`, which the fleet certificate binds.
    pub fn root_v1(&self) -> &[u8] {
        &self.root_v1
    }

    pub fn metadata_dir(&self) -> PathBuf {
        self.dir.join("metadata")
    }

    pub fn certificate_path(&self) -> PathBuf {
        self.dir.join("certificate.json")
    }

    /// The newest versions on disk, so a new publication always goes up, even after the depot
    /// store was restored from an older backup.
    fn current_versions(&self) -> Result<Published, DirectorError> {
        let path = self.metadata_dir().join("timestamp.json");
        if !path.exists() {
            return Ok(Published {
                targets_version: 0,
                snapshot_version: 0,
                timestamp_version: 0,
            });
        }
        let bytes = fs::read(&path).map_err(io(format!("reading {}", path.display())))?;
        let ts: Signed<Timestamp> = serde_json::from_slice(&bytes)
            .map_err(|e| DirectorError::Invalid(format!("{}: {e}", path.display())))?;
        let snapshot_version = ts
            .signed
            .meta
            .get("snapshot.json")
            .map(|m| m.version.get())
            .unwrap_or(0);
        let targets_version = fs::read_dir(self.metadata_dir())
            .map_err(io("listing director metadata"))?
            .filter_map(|e| e.ok())
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                name.strip_suffix(".targets.json")?.parse::<u64>().ok()
            })
            .max()
            .unwrap_or(0);
        Ok(Published {
            targets_version,
            snapshot_version,
            timestamp_version: ts.signed.version.get(),
        })
    }

    /// Signs and publishes the complete set of current assignments with new versions.
    /// Files appear by atomic renames, the timestamp last, so a vehicle reading at any moment
    /// sees either the previous publication or this one.
    pub async fn publish(
        &self,
        assignments: &[Assignment],
        clock: &dyn Clock,
        expiries: DirectorExpiries,
    ) -> Result<Published, DirectorError> {
        let now = clock.now();
        let current = self.current_versions()?;
        let next = |v: u64| NonZeroU64::new(v + 1).expect("v + 1 is not zero");
        let versions = Published {
            targets_version: current.targets_version + 1,
            snapshot_version: current.snapshot_version + 1,
            timestamp_version: current.timestamp_version + 1,
        };
        let mut editor = RepositoryEditor::new(self.metadata_dir().join("root.json")).await?;
        editor
            .targets_version(next(current.targets_version))?
            .targets_expires(jiff_after(now, expiries.targets))?
            .snapshot_version(next(current.snapshot_version))
            .snapshot_expires(jiff_after(now, expiries.snapshot))
            .timestamp_version(next(current.timestamp_version))
            .timestamp_expires(jiff_after(now, expiries.timestamp));
        for a in assignments {
            validate_vehicle_id(&a.vehicle_id).map_err(DirectorError::Invalid)?;
            let sha = hex::decode(&a.sha256)
                .map_err(|_| DirectorError::Invalid(format!("bad hash for {}", a.vehicle_id)))?;
            let custom = HashMap::from([
                ("vehicle_id".to_owned(), json!(a.vehicle_id)),
                ("image_target".to_owned(), json!(a.image_target)),
                ("version".to_owned(), json!(a.version)),
                ("hardware_id".to_owned(), json!(a.hardware_id)),
                ("chunk_index".to_owned(), json!(a.chunk_index)),
                ("assigned_at".to_owned(), json!(a.assigned_at)),
            ]);
            editor.add_target(
                TargetName::new(vehicle_target_name(&a.vehicle_id))?,
                Target {
                    length: a.length,
                    hashes: Hashes {
                        sha256: sha.into(),
                        _extra: HashMap::new(),
                    },
                    custom,
                    _extra: HashMap::new(),
                },
            )?;
        }
        let sources: Vec<Box<dyn tough::key_source::KeySource>> =
            self.keys.iter().map(KeyPair::source).collect();
        let signed = editor.sign(&sources).await?;

        let staging = self
            .dir
            .join(format!("metadata.new-{}", std::process::id()));
        let _ = fs::remove_dir_all(&staging);
        signed.write(&staging).await?;
        let result = (|| {
            let ordered = [
                format!("{}.targets.json", versions.targets_version),
                format!("{}.snapshot.json", versions.snapshot_version),
                "timestamp.json".to_owned(),
            ];
            for name in ordered {
                let from = staging.join(&name);
                let file =
                    fs::File::open(&from).map_err(io(format!("opening {}", from.display())))?;
                file.sync_all()
                    .map_err(io(format!("syncing {}", from.display())))?;
                fs::rename(&from, self.metadata_dir().join(&name))
                    .map_err(io(format!("publishing {name}")))?;
            }
            fs::File::open(self.metadata_dir())
                .and_then(|d| d.sync_all())
                .map_err(io("syncing director metadata"))
        })();
        let _ = fs::remove_dir_all(&staging);
        result?;
        self.prune(versions)?;
        Ok(versions)
    }

    /// Keeps the last few versioned files: a vehicle mid-refresh may still ask for the
    /// previous ones; anything older is of no use to anybody.
    fn prune(&self, newest: Published) -> Result<(), DirectorError> {
        const KEEP: u64 = 8;
        for entry in fs::read_dir(self.metadata_dir())
            .map_err(io("listing director metadata"))?
            .flatten()
        {
            let Ok(name) = entry.file_name().into_string() else {
                continue;
            };
            let old = |suffix: &str, newest: u64| {
                name.strip_suffix(suffix)
                    .and_then(|v| v.parse::<u64>().ok())
                    .is_some_and(|v| v + KEEP <= newest)
            };
            if old(".targets.json", newest.targets_version)
                || old(".snapshot.json", newest.snapshot_version)
            {
                let _ = fs::remove_file(entry.path());
            }
        }
        Ok(())
    }

    /// When the current timestamp expires, if anything is published.
    pub fn timestamp_expiry(&self) -> Option<SystemTime> {
        let bytes = fs::read(self.metadata_dir().join("timestamp.json")).ok()?;
        let ts: Signed<Timestamp> = serde_json::from_slice(&bytes).ok()?;
        Some(SystemTime::from(ts.signed.expires))
    }
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), DirectorError> {
    let tmp = path.with_extension("partial");
    fs::write(&tmp, bytes).map_err(io(format!("writing {}", tmp.display())))?;
    fs::File::open(&tmp)
        .and_then(|f| f.sync_all())
        .map_err(io(format!("syncing {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(io(format!("renaming to {}", path.display())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::time::FixedClock;

    fn assignment(vehicle: &str) -> Assignment {
        Assignment {
            vehicle_id: vehicle.into(),
            image_target: "hw_1.0.0.img".into(),
            version: "1.0.0".into(),
            hardware_id: "hw".into(),
            length: 3,
            sha256: hex::encode(<sha2::Sha256 as sha2::Digest>::digest(b"abc")),
            chunk_index: "hw_1.0.0.chunks.json".into(),
            assigned_at: "2026-11-22T00:00:00Z".into(),
        }
    }

    #[tokio::test]
    async fn publications_verify_and_always_go_up() {
        let dir = tempfile::tempdir().unwrap();
        let clock = FixedClock::now();
        let director = Director::open(dir.path(), &clock, DirectorExpiries::default())
            .await
            .unwrap();
        let first = director
            .publish(&[assignment("veh-1")], &clock, DirectorExpiries::default())
            .await
            .unwrap();
        assert_eq!(first.targets_version, 1);
        let second = director
            .publish(
                &[assignment("veh-1"), assignment("veh-2")],
                &clock,
                DirectorExpiries::default(),
            )
            .await
            .unwrap();
        assert_eq!(second.timestamp_version, 2);

        // Reopening keeps the keys and the certified root, and versions keep rising.
        let again = Director::open(dir.path(), &clock, DirectorExpiries::default())
            .await
            .unwrap();
        assert_eq!(again.root_v1(), director.root_v1());
        assert_eq!(
            again
                .publish(&[], &clock, DirectorExpiries::default())
                .await
                .unwrap()
                .snapshot_version,
            3
        );

        // A standard TUF client loads it from the certified root.
        let meta = dir.path().join("metadata");
        let repo = tough::RepositoryLoader::new(
            &director.root_v1(),
            url::Url::from_directory_path(&meta).unwrap(),
            url::Url::from_directory_path(&meta).unwrap(),
        )
        .load()
        .await
        .unwrap();
        assert_eq!(repo.targets().signed.version.get(), 3);
        assert!(repo.targets().signed.targets.is_empty());
        assert!(validate_vehicle_id("../x").is_err());
    }
}
