//! The image manifest: what an appliance image holds (size, SHA-256 of the whole image, of
//! its bmap and of each partition), signed with the fleet's release key, the TUF `targets`
//! key that signs every OTA image. It is verified against the fleet's TUF root, the same trust
//! anchor vehicles and depots use, so an image is trusted exactly when an OTA image would be.

use std::collections::{HashMap, HashSet};

use atlasmesh_ota_staging::keys::KeyPair;
use atlasmesh_ota_staging::release::canonical_json;
use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::layout::Role;

pub const MANIFEST_TYPE: &str = "atlasmesh-image-manifest";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PartitionEntry {
    pub role: Role,
    /// GPT partition name.
    pub name: String,
    pub type_guid: String,
    /// GPT unique partition GUID (what `PARTUUID=` names).
    pub uuid: String,
    /// Byte offset in the image.
    pub offset: u64,
    pub size: u64,
    pub filesystem: String,
    /// SHA-256 of the partition's `size` bytes.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestBody {
    #[serde(rename = "_type")]
    pub kind: String,
    pub image_size: u64,
    /// SHA-256 of the whole image, holes read as zeros.
    pub image_sha256: String,
    /// SHA-256 of the exact bytes of the image's `.bmap` file.
    pub bmap_sha256: String,
    pub mapped_bytes: u64,
    /// RFC 3339.
    pub created: String,
    pub partitions: Vec<PartitionEntry>,
}

impl ManifestBody {
    pub fn partition(&self, role: Role) -> Option<&PartitionEntry> {
        self.partitions.iter().find(|p| p.role == role)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestSignature {
    pub keyid: String,
    pub sig: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub signed: ManifestBody,
    pub signatures: Vec<ManifestSignature>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ManifestError {
    #[error("image manifest is malformed: {0}")]
    Malformed(String),
    #[error("image manifest is not signed by the fleet's release (targets) key{0}")]
    Signature(String),
    #[error("fleet root: {0}")]
    Root(String),
}

impl Manifest {
    pub fn sign(body: ManifestBody, key: &KeyPair) -> Result<Self, ManifestError> {
        let bytes = canonical_json(&body).map_err(|e| ManifestError::Malformed(e.to_string()))?;
        Ok(Self {
            signatures: vec![ManifestSignature {
                keyid: hex::encode(key.key_id()),
                sig: hex::encode(key.sign(&bytes)),
            }],
            signed: body,
        })
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("a manifest always serialises");
        out.push(b'\n');
        out
    }
}

/// The keys allowed to sign images, and how many must: the `targets` role of a fleet root.
#[derive(Debug, Clone)]
pub struct Trust {
    keys: HashMap<String, VerifyingKey>,
    threshold: usize,
}

impl Trust {
    /// Reads a fleet root (`root.json` of the image repository). The root must be validly
    /// self-signed; its `targets` role names the release keys.
    pub fn from_fleet_root(bytes: &[u8]) -> Result<Self, ManifestError> {
        use tough::schema::key::Key;
        use tough::schema::{RoleType, Root, Signed};
        let root: Signed<Root> = serde_json::from_slice(bytes)
            .map_err(|e| ManifestError::Root(format!("not TUF root metadata: {e}")))?;
        root.signed
            .verify_role(&root)
            .map_err(|e| ManifestError::Root(format!("not validly signed: {e}")))?;
        let role = root
            .signed
            .roles
            .get(&RoleType::Targets)
            .ok_or_else(|| ManifestError::Root("no targets role".into()))?;
        let mut keys = HashMap::new();
        for id in &role.keyids {
            if let Some(Key::Ed25519 { keyval, .. }) = root.signed.keys.get(id) {
                let bytes: [u8; 32] =
                    keyval.public.as_ref().try_into().map_err(|_| {
                        ManifestError::Root("an ed25519 key is not 32 bytes".into())
                    })?;
                let key = VerifyingKey::from_bytes(&bytes)
                    .map_err(|e| ManifestError::Root(format!("bad ed25519 key: {e}")))?;
                keys.insert(hex::encode(id), key);
            }
        }
        let threshold = usize::try_from(role.threshold.get()).unwrap_or(usize::MAX);
        if keys.len() < threshold {
            return Err(ManifestError::Root(format!(
                "the targets role needs {threshold} signatures but lists {} ed25519 keys",
                keys.len()
            )));
        }
        Ok(Self { keys, threshold })
    }

    /// Parses a manifest and returns its body only if enough release keys signed it.
    pub fn verify(&self, bytes: &[u8]) -> Result<ManifestBody, ManifestError> {
        let manifest: Manifest =
            serde_json::from_slice(bytes).map_err(|e| ManifestError::Malformed(e.to_string()))?;
        if manifest.signed.kind != MANIFEST_TYPE {
            return Err(ManifestError::Malformed(format!(
                "type {:?} is not {MANIFEST_TYPE:?}",
                manifest.signed.kind
            )));
        }
        let message = canonical_json(&manifest.signed)
            .map_err(|e| ManifestError::Malformed(e.to_string()))?;
        let mut valid = HashSet::new();
        for signature in &manifest.signatures {
            let Some(key) = self.keys.get(&signature.keyid) else {
                continue;
            };
            let Ok(sig) = hex::decode(&signature.sig) else {
                continue;
            };
            let Ok(sig) = Signature::from_slice(&sig) else {
                continue;
            };
            if key.verify(&message, &sig).is_ok() {
                valid.insert(signature.keyid.as_str());
            }
        }
        if valid.len() < self.threshold {
            return Err(ManifestError::Signature(format!(
                " ({} of {} required valid signatures)",
                valid.len(),
                self.threshold
            )));
        }
        Ok(manifest.signed)
    }
}
