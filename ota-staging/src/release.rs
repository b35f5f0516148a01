//! Release tooling: the fleet's image repository in standard TUF 1.0 metadata, written by
//! tough. Release engineering runs this anywhere; the depot only mirrors what it produces.
//!
//! Layout of a repository directory:
//!
//! ```text
//! metadata/1.root.json, 2.root.json, ...   every root version (clients walk the chain)
//! metadata/root.json                       the newest root
//! metadata/N.targets.json, N.snapshot.json consistent snapshots
//! metadata/timestamp.json
//! targets/<sha256>.<hardware>_<version>.img           the image
//! targets/<sha256>.<hardware>_<version>.chunks.json   its chunk index
//! targets/<sha256>.fleet-certifier.json               the key that certifies depot directors
//! ```
//!
//! Keys directory: `root.pem`, `targets.pem`, `snapshot.pem`, `timestamp.pem` and
//! `certifier.pem`, ed25519 PKCS#8 PEM files with mode 0600.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{BufReader, BufWriter, Write};
use std::num::NonZeroU64;
use std::path::{Path, PathBuf};
use std::time::Duration;

use aws_lc_rs::rand::SystemRandom;
use serde_json::json;
use tough::editor::RepositoryEditor;
use tough::editor::signed::SignedRole;
use tough::schema::decoded::{Decoded, Hex};
use tough::schema::{
    Hashes, KeyHolder, RoleKeys, RoleType, Root, Signature, Signed, Target, Timestamp,
};
use tough::{ExpirationEnforcement, RepositoryLoader, TargetName};
use url::Url;

use crate::chunks;
use crate::keys::{KeyError, KeyPair};
use crate::meta::{self, ImageMeta};
use crate::time::{Clock, jiff_after};

pub const SPEC_VERSION: &str = "1.0.0";
pub const ROLE_KEYS: [&str; 4] = ["root", "targets", "snapshot", "timestamp"];
pub const CERTIFIER_KEY: &str = "certifier";
pub const CERTIFIER_TARGET: &str = "fleet-certifier.json";

#[derive(Debug, thiserror::Error)]
pub enum ReleaseError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
    // Boxed: tough's error carries a backtrace and is large.
    #[error("TUF: {0}")]
    Tuf(Box<tough::error::Error>),
    #[error("{0}")]
    Invalid(String),
    #[error("{0} already exists; a release is immutable once published")]
    AlreadyReleased(String),
}

impl From<tough::error::Error> for ReleaseError {
    fn from(e: tough::error::Error) -> Self {
        ReleaseError::Tuf(Box::new(e))
    }
}

fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> ReleaseError {
    let context = context.into();
    move |source| ReleaseError::Io { context, source }
}

/// How long each role's metadata stays valid. Root and targets are signed offline and rarely;
/// snapshot and timestamp are re-signed online (`atlasmesh release refresh`, later the cloud).
#[derive(Debug, Clone, Copy)]
pub struct Expiries {
    pub root: Duration,
    pub targets: Duration,
    pub snapshot: Duration,
    pub timestamp: Duration,
}

impl Default for Expiries {
    fn default() -> Self {
        const DAY: u64 = 86_400;
        Self {
            root: Duration::from_secs(365 * DAY),
            targets: Duration::from_secs(180 * DAY),
            snapshot: Duration::from_secs(30 * DAY),
            timestamp: Duration::from_secs(7 * DAY),
        }
    }
}

/// The signing keys of a repository, loaded from a keys directory.
#[derive(Debug)]
pub struct Keys {
    pub root: KeyPair,
    pub targets: KeyPair,
    pub snapshot: KeyPair,
    pub timestamp: KeyPair,
    pub certifier: KeyPair,
}

impl Keys {
    /// Creates the keys that do not exist yet in `dir`; returns the paths it wrote.
    pub fn generate(dir: &Path) -> Result<Vec<PathBuf>, ReleaseError> {
        fs::create_dir_all(dir).map_err(io(format!("creating {}", dir.display())))?;
        let mut written = Vec::new();
        for name in ROLE_KEYS.iter().chain(std::iter::once(&CERTIFIER_KEY)) {
            let path = dir.join(format!("{name}.pem"));
            if !path.exists() {
                KeyPair::generate().write_new(&path)?;
                written.push(path);
            }
        }
        Ok(written)
    }

    pub fn load(dir: &Path) -> Result<Self, ReleaseError> {
        let load = |name: &str| KeyPair::load(&dir.join(format!("{name}.pem")));
        Ok(Self {
            root: load("root")?,
            targets: load("targets")?,
            snapshot: load("snapshot")?,
            timestamp: load("timestamp")?,
            certifier: load(CERTIFIER_KEY)?,
        })
    }

    fn sources(&self) -> Vec<Box<dyn tough::key_source::KeySource>> {
        vec![
            self.root.source(),
            self.targets.source(),
            self.snapshot.source(),
            self.timestamp.source(),
        ]
    }
}

/// The public half of the certifier key, published as a TUF target so that a vehicle needs
/// only the fleet root to learn it.
pub fn certifier_document(key: &KeyPair) -> Vec<u8> {
    let mut doc = serde_json::to_vec_pretty(&json!({
        "keytype": "ed25519",
        "scheme": "ed25519",
        "public": key.public_hex(),
    }))
    .expect("JSON");
    doc.push(b'\n');
    doc
}

fn metadata_dir(repo: &Path) -> PathBuf {
    repo.join("metadata")
}

fn targets_dir(repo: &Path) -> PathBuf {
    repo.join("targets")
}

/// Where a target file lives under consistent snapshots: `targets/<sha256>.<name>` (names
/// are flat, see [`crate::meta::image_target_name`]).
pub fn target_file_path(repo: &Path, name: &str, sha256_hex: &str) -> PathBuf {
    targets_dir(repo).join(format!("{sha256_hex}.{name}"))
}

fn sha256_target(bytes: &[u8], custom: HashMap<String, serde_json::Value>) -> Target {
    use sha2::Digest;
    Target {
        length: bytes.len() as u64,
        hashes: Hashes {
            sha256: sha2::Sha256::digest(bytes).to_vec().into(),
            _extra: HashMap::new(),
        },
        custom,
        _extra: HashMap::new(),
    }
}

fn write_target_bytes(repo: &Path, name: &str, bytes: &[u8]) -> Result<(), ReleaseError> {
    use sha2::Digest;
    let path = target_file_path(repo, name, &hex::encode(sha2::Sha256::digest(bytes)));
    if let Some(parent) = path.parent() {
        fs::create_dir_all(parent).map_err(io(format!("creating {}", parent.display())))?;
    }
    write_atomic(&path, bytes)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), ReleaseError> {
    let tmp = path.with_extension("partial");
    let mut file = File::create(&tmp).map_err(io(format!("writing {}", tmp.display())))?;
    file.write_all(bytes)
        .map_err(io(format!("writing {}", tmp.display())))?;
    file.sync_all()
        .map_err(io(format!("syncing {}", tmp.display())))?;
    fs::rename(&tmp, path).map_err(io(format!("renaming to {}", path.display())))
}

fn role_keys(key: &KeyPair) -> RoleKeys {
    RoleKeys {
        keyids: vec![key.key_id()],
        threshold: NonZeroU64::MIN,
        _extra: HashMap::new(),
    }
}

pub(crate) fn root_for(keys: [&KeyPair; 4], version: NonZeroU64, expires: jiff::Timestamp) -> Root {
    let mut root = Root {
        spec_version: SPEC_VERSION.into(),
        consistent_snapshot: true,
        version,
        expires,
        keys: HashMap::new(),
        roles: HashMap::new(),
        _extra: HashMap::new(),
    };
    for (role, key) in [
        RoleType::Root,
        RoleType::Targets,
        RoleType::Snapshot,
        RoleType::Timestamp,
    ]
    .into_iter()
    .zip(keys)
    {
        root.keys.insert(key.key_id(), key.tuf_key());
        root.roles.insert(role, role_keys(key));
    }
    root
}

pub(crate) async fn sign_root(
    root: Root,
    signers: &[&KeyPair],
) -> Result<SignedRole<Root>, ReleaseError> {
    let holder = KeyHolder::Root(root.clone());
    let rng = SystemRandom::new();
    let sources: Vec<Box<dyn tough::key_source::KeySource>> =
        signers.iter().map(|k| k.source()).collect();
    Ok(SignedRole::new(root, &holder, &sources, &rng).await?)
}

async fn write_root(repo: &Path, root: &SignedRole<Root>) -> Result<(), ReleaseError> {
    let dir = metadata_dir(repo);
    root.write(&dir, true).await?;
    // `root.json` is the newest root, for people and for first-time clients to pin.
    write_atomic(&dir.join("root.json"), root.buffer())
}

/// Creates a new image repository signed by `keys`, with no images yet (only the certifier
/// key target).
pub async fn init(
    repo: &Path,
    keys: &Keys,
    expiries: Expiries,
    clock: &dyn Clock,
) -> Result<(), ReleaseError> {
    if metadata_dir(repo).join("root.json").exists() {
        return Err(ReleaseError::Invalid(format!(
            "{} already holds a repository",
            repo.display()
        )));
    }
    fs::create_dir_all(metadata_dir(repo)).map_err(io(format!("creating {}", repo.display())))?;
    fs::create_dir_all(targets_dir(repo)).map_err(io(format!("creating {}", repo.display())))?;
    let now = clock.now();
    let root = root_for(
        [&keys.root, &keys.targets, &keys.snapshot, &keys.timestamp],
        NonZeroU64::MIN,
        jiff_after(now, expiries.root),
    );
    let signed_root = sign_root(root, &[&keys.root]).await?;
    write_root(repo, &signed_root).await?;

    let certifier = certifier_document(&keys.certifier);
    write_target_bytes(repo, CERTIFIER_TARGET, &certifier)?;
    let mut editor = RepositoryEditor::new(metadata_dir(repo).join("root.json")).await?;
    editor
        .targets_version(NonZeroU64::MIN)?
        .targets_expires(jiff_after(now, expiries.targets))?
        .snapshot_version(NonZeroU64::MIN)
        .snapshot_expires(jiff_after(now, expiries.snapshot))
        .timestamp_version(NonZeroU64::MIN)
        .timestamp_expires(jiff_after(now, expiries.timestamp))
        .add_target(
            TargetName::new(CERTIFIER_TARGET)?,
            sha256_target(&certifier, HashMap::new()),
        )?;
    let signed = editor.sign(&keys.sources()).await?;
    signed.write(metadata_dir(repo)).await?;
    Ok(())
}

/// Loads the repository as a client would, trusting its own newest root. Expiry is not
/// enforced: release engineering may add to a repository whose timestamp has lapsed.
pub async fn load(repo: &Path) -> Result<tough::Repository, ReleaseError> {
    let root_path = metadata_dir(repo).join("root.json");
    let root = fs::read(&root_path).map_err(io(format!("reading {}", root_path.display())))?;
    let metadata_url = dir_url(&metadata_dir(repo))?;
    let targets_url = dir_url(&targets_dir(repo))?;
    Ok(RepositoryLoader::new(&root, metadata_url, targets_url)
        .expiration_enforcement(ExpirationEnforcement::Unsafe)
        .load()
        .await?)
}

pub fn dir_url(dir: &Path) -> Result<Url, ReleaseError> {
    let abs = fs::canonicalize(dir).map_err(io(format!("resolving {}", dir.display())))?;
    Url::from_directory_path(&abs)
        .map_err(|()| ReleaseError::Invalid(format!("{} is not a usable directory", abs.display())))
}

fn bump(v: NonZeroU64) -> NonZeroU64 {
    v.checked_add(1)
        .expect("metadata versions do not reach u64::MAX")
}

/// An editor of `existing` whose targets, snapshot and timestamp get their next versions and
/// fresh expiries: what every change to the repository's contents or keys re-signs.
async fn next_versions(
    repo: &Path,
    existing: tough::Repository,
    now: std::time::SystemTime,
    expiries: Expiries,
) -> Result<RepositoryEditor, ReleaseError> {
    let targets_version = bump(existing.targets().signed.version);
    let snapshot_version = bump(existing.snapshot().signed.version);
    let timestamp_version = bump(existing.timestamp().signed.version);
    let mut editor =
        RepositoryEditor::from_repo(metadata_dir(repo).join("root.json"), existing).await?;
    editor
        .targets_version(targets_version)?
        .targets_expires(jiff_after(now, expiries.targets))?
        .snapshot_version(snapshot_version)
        .snapshot_expires(jiff_after(now, expiries.snapshot))
        .timestamp_version(timestamp_version)
        .timestamp_expires(jiff_after(now, expiries.timestamp));
    Ok(editor)
}

/// What `add` published.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Added {
    pub image_target: String,
    pub index_target: String,
    pub length: u64,
    pub sha256: String,
    pub chunks: usize,
    pub targets_version: u64,
}

/// Adds an image and its chunk index to the repository: one pass over the image computes its
/// hash and chunks while copying it into the repository, then targets, snapshot and timestamp
/// are re-signed with new versions.
pub async fn add(
    repo: &Path,
    keys: &Keys,
    image: &Path,
    meta: &ImageMeta,
    expiries: Expiries,
    clock: &dyn Clock,
) -> Result<Added, ReleaseError> {
    meta.validate().map_err(ReleaseError::Invalid)?;
    let existing = load(repo).await?;
    let image_target = meta::image_target_name(&meta.hardware_id, &meta.version);
    let index_target = meta::index_target_name(&meta.hardware_id, &meta.version);
    let image_name = TargetName::new(image_target.as_str())?;
    if existing.targets().signed.targets.contains_key(&image_name) {
        return Err(ReleaseError::AlreadyReleased(image_target));
    }

    // Copy while ingesting, under a temporary name; the final name needs the hash.
    let tmp = targets_dir(repo).join(format!(".{image_target}.partial"));
    let source = File::open(image).map_err(io(format!("opening {}", image.display())))?;
    let ingested = {
        let out = File::create(&tmp).map_err(io(format!("writing {}", tmp.display())))?;
        let mut writer = BufWriter::with_capacity(1 << 20, out);
        let got = chunks::ingest(
            BufReader::with_capacity(1 << 20, source),
            &mut writer,
            |_| {},
        )
        .map_err(io(format!("reading {}", image.display())))?;
        let out = writer.into_inner().map_err(|e| ReleaseError::Io {
            context: format!("writing {}", tmp.display()),
            source: e.into_error(),
        })?;
        out.sync_all()
            .map_err(io(format!("syncing {}", tmp.display())))?;
        got
    };
    let image_path = target_file_path(repo, &image_target, &ingested.sha256);
    fs::rename(&tmp, &image_path).map_err(io(format!("renaming to {}", image_path.display())))?;
    let index_bytes = ingested.index.to_json();
    write_target_bytes(repo, &index_target, &index_bytes)?;

    let now = clock.now();
    let mut custom = meta.to_custom(&index_target);
    custom.insert(
        "released_at".into(),
        json!(
            jiff::Timestamp::try_from(now)
                .map(|t| t.to_string())
                .unwrap_or_default()
        ),
    );
    let image_tuf = Target {
        length: ingested.length,
        hashes: Hashes {
            sha256: Decoded::<Hex>::from(hex::decode(&ingested.sha256).expect("hex")),
            _extra: HashMap::new(),
        },
        custom,
        _extra: HashMap::new(),
    };
    let index_tuf = sha256_target(
        &index_bytes,
        HashMap::from([("image".to_owned(), json!(image_target))]),
    );

    let targets_version = bump(existing.targets().signed.version);
    let mut editor = next_versions(repo, existing, now, expiries).await?;
    editor
        .add_target(image_name, image_tuf)?
        .add_target(TargetName::new(index_target.as_str())?, index_tuf)?;
    let signed = editor.sign(&keys.sources()).await?;
    signed.write(metadata_dir(repo)).await?;
    Ok(Added {
        image_target,
        index_target,
        length: ingested.length,
        sha256: ingested.sha256,
        chunks: ingested.index.chunks.len(),
        targets_version: targets_version.get(),
    })
}

/// Re-signs snapshot and timestamp with new versions and expiries, keeping targets as they are.
/// This is the online step that keeps a repository fresh (anti-freeze): run it well within the
/// timestamp expiry.
pub async fn refresh(
    repo: &Path,
    keys: &Keys,
    expiries: Expiries,
    clock: &dyn Clock,
) -> Result<u64, ReleaseError> {
    let existing = load(repo).await?;
    let now = clock.now();
    let snapshot_version = bump(existing.snapshot().signed.version);
    let timestamp_version = bump(existing.timestamp().signed.version);
    let targets_version = existing.targets().signed.version;
    let targets_expires = existing.targets().signed.expires;
    let mut editor =
        RepositoryEditor::from_repo(metadata_dir(repo).join("root.json"), existing).await?;
    // Targets keep their version and expiry: re-signed, their canonical form is unchanged.
    editor
        .targets_version(targets_version)?
        .targets_expires(targets_expires)?
        .snapshot_version(snapshot_version)
        .snapshot_expires(jiff_after(now, expiries.snapshot))
        .timestamp_version(timestamp_version)
        .timestamp_expires(jiff_after(now, expiries.timestamp));
    let signed = editor.sign(&keys.sources()).await?;
    signed.write(metadata_dir(repo)).await?;
    Ok(timestamp_version.get())
}

/// Which role a rotation replaces the key of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RotatedRole {
    // The discriminants index the key slots of `root_for`.
    Root = 0,
    Targets = 1,
    Snapshot = 2,
    Timestamp = 3,
}

impl RotatedRole {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "root" => Some(Self::Root),
            "targets" => Some(Self::Targets),
            "snapshot" => Some(Self::Snapshot),
            "timestamp" => Some(Self::Timestamp),
            _ => None,
        }
    }
    fn file(self) -> &'static str {
        match self {
            Self::Root => "root",
            Self::Targets => "targets",
            Self::Snapshot => "snapshot",
            Self::Timestamp => "timestamp",
        }
    }
}

/// Replaces one role's key by TUF's rules: a new root version listing the new key, signed by
/// the old root key and (when the root key itself changes) by the new one, so that clients
/// holding the old root can walk to the new one. The rest of the repository is then re-signed
/// with new versions under the new root. The new key takes the old one's place in the keys
/// directory; the old key is kept beside it as `<role>.pem.retired-<root version>`.
pub async fn rotate(
    repo: &Path,
    keys_dir: &Path,
    role: RotatedRole,
    new_key_path: &Path,
    expiries: Expiries,
    clock: &dyn Clock,
) -> Result<u64, ReleaseError> {
    let old_keys = Keys::load(keys_dir)?;
    let new_key = KeyPair::load(new_key_path)?;
    let existing = load(repo).await?;
    let old_root = existing.root().signed.clone();
    let version = bump(old_root.version);
    let now = clock.now();

    let mut slots = [
        &old_keys.root,
        &old_keys.targets,
        &old_keys.snapshot,
        &old_keys.timestamp,
    ];
    slots[role as usize] = &new_key;
    let root = root_for(slots, version, jiff_after(now, expiries.root));
    // Signed by the keys the new root names for its root role ...
    let new_root_key = slots[0];
    let mut signed = sign_root(root.clone(), &[new_root_key]).await?;
    // ... and by the old root key, which the clients trust today.
    if new_root_key.key_id() != old_keys.root.key_id() {
        let canonical = canonical_json(&root)?;
        signed = signed.add_old_signatures(vec![Signature {
            keyid: old_keys.root.key_id(),
            sig: old_keys.root.sign(&canonical).to_vec().into(),
        }])?;
    }
    write_root(repo, &signed).await?;

    let current = keys_dir.join(format!("{}.pem", role.file()));
    let retired = keys_dir.join(format!("{}.pem.retired-{}", role.file(), old_root.version));
    fs::rename(&current, &retired).map_err(io(format!("retiring {}", current.display())))?;
    fs::copy(new_key_path, &current).map_err(io(format!("installing {}", current.display())))?;
    fs::set_permissions(
        &current,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .map_err(io(format!("restricting {}", current.display())))?;

    // Targets, snapshot and timestamp are re-signed under the new root with new versions, so
    // a replaced online key takes effect at once.
    let keys = Keys::load(keys_dir)?;
    let reloaded = load(repo).await?;
    let editor = next_versions(repo, reloaded, now, expiries).await?;
    editor
        .sign(&keys.sources())
        .await?
        .write(metadata_dir(repo))
        .await?;
    Ok(version.get())
}

/// TUF's canonical JSON of a role, the bytes signatures cover.
pub fn canonical_json<T: serde::Serialize>(value: &T) -> Result<Vec<u8>, ReleaseError> {
    let mut out = Vec::new();
    let mut ser =
        serde_json::Serializer::with_formatter(&mut out, olpc_cjson::CanonicalFormatter::new());
    value
        .serialize(&mut ser)
        .map_err(|e| ReleaseError::Invalid(format!("canonical JSON: {e}")))?;
    Ok(out)
}

/// Signs a standalone timestamp for tests and tools that need one with chosen fields.
pub async fn sign_timestamp(
    root: &Root,
    timestamp: Timestamp,
    key: &KeyPair,
) -> Result<Signed<Timestamp>, ReleaseError> {
    let rng = SystemRandom::new();
    let role = SignedRole::new(
        timestamp,
        &KeyHolder::Root(root.clone()),
        &[key.source()],
        &rng,
    )
    .await?;
    Ok(role.signed().clone())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunks::ChunkIndex;
    use crate::time::FixedClock;

    fn meta(version: &str) -> ImageMeta {
        ImageMeta {
            version: version.into(),
            hardware_id: "depot-x86".into(),
            min_version: Some("1.0.0".into()),
            notes: Some("test".into()),
        }
    }

    #[tokio::test]
    async fn init_add_refresh_rotate() {
        let dir = tempfile::tempdir().unwrap();
        let keys_dir = dir.path().join("keys");
        let repo = dir.path().join("repo");
        assert_eq!(Keys::generate(&keys_dir).unwrap().len(), 5);
        let keys = Keys::load(&keys_dir).unwrap();
        let clock = FixedClock::now();
        init(&repo, &keys, Expiries::default(), &clock)
            .await
            .unwrap();
        assert!(repo.join("metadata/1.root.json").is_file());
        assert!(repo.join("metadata/timestamp.json").is_file());

        let image = dir.path().join("image.bin");
        fs::write(&image, vec![7u8; 300_000]).unwrap();
        let added = add(
            &repo,
            &keys,
            &image,
            &meta("1.2.0"),
            Expiries::default(),
            &clock,
        )
        .await
        .unwrap();
        assert_eq!(added.length, 300_000);
        assert!(target_file_path(&repo, &added.image_target, &added.sha256).is_file());
        assert!(matches!(
            add(
                &repo,
                &keys,
                &image,
                &meta("1.2.0"),
                Expiries::default(),
                &clock
            )
            .await,
            Err(ReleaseError::AlreadyReleased(_))
        ));

        let loaded = load(&repo).await.unwrap();
        let target = &loaded.targets().signed.targets
            [&TargetName::new(added.image_target.as_str()).unwrap()];
        assert_eq!(target.custom["version"], "1.2.0");
        assert_eq!(target.custom["chunk_index"], json!(added.index_target));
        let index_name = TargetName::new(added.index_target.as_str()).unwrap();
        let index_bytes = {
            use futures_util::StreamExt;
            let mut stream = loaded.read_target(&index_name).await.unwrap().unwrap();
            let mut out = Vec::new();
            while let Some(b) = stream.next().await {
                out.extend_from_slice(&b.unwrap());
            }
            out
        };
        assert_eq!(
            ChunkIndex::from_json(&index_bytes).unwrap().sha256,
            added.sha256
        );

        let ts = refresh(&repo, &keys, Expiries::default(), &clock)
            .await
            .unwrap();
        assert_eq!(ts, 3);

        let new_root = dir.path().join("new-root.pem");
        KeyPair::generate().write_new(&new_root).unwrap();
        let v = rotate(
            &repo,
            &keys_dir,
            RotatedRole::Root,
            &new_root,
            Expiries::default(),
            &clock,
        )
        .await
        .unwrap();
        assert_eq!(v, 2);
        assert!(repo.join("metadata/2.root.json").is_file());
        // A client that trusts only root v1 walks to v2.
        let root1 = fs::read(repo.join("metadata/1.root.json")).unwrap();
        let walked = RepositoryLoader::new(
            &root1,
            dir_url(&repo.join("metadata")).unwrap(),
            dir_url(&repo.join("targets")).unwrap(),
        )
        .load()
        .await
        .unwrap();
        assert_eq!(walked.root().signed.version.get(), 2);
        assert!(keys_dir.join("root.pem.retired-1").is_file());
    }
}
