//! Ed25519 signing keys: generated with ed25519-dalek, kept as PKCS#8 PEM files with mode 0600,
//! and handed to tough as signers.
//!
//! tough's own key loader reads ed25519 keys only as raw PKCS#8 DER; PEM files are what people
//! and tools expect, so keys are loaded here and adapted to tough's `Sign` trait.

use std::collections::HashMap;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ed25519_dalek::pkcs8::{DecodePrivateKey, EncodePrivateKey};
use ed25519_dalek::{Signer, SigningKey, VerifyingKey};
use rand_core::OsRng;
use tough::async_trait;
use tough::key_source::KeySource;
use tough::schema::decoded::{Decoded, Hex};
use tough::schema::key::{Ed25519Key, Ed25519Scheme, Key};
use tough::sign::Sign;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key file {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("key file {path} is not an ed25519 PKCS#8 PEM private key: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("key file {path} is readable by others (mode {mode:o}); private keys must be 0600")]
    Permissions { path: PathBuf, mode: u32 },
    #[error("key file {0} already exists; refusing to overwrite a key")]
    Exists(PathBuf),
}

/// An ed25519 private key and where it came from.
#[derive(Clone)]
pub struct KeyPair {
    signing: SigningKey,
    source: PathBuf,
}

impl std::fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print private key material.
        f.debug_struct("KeyPair")
            .field("source", &self.source)
            .field("public", &self.public_hex())
            .finish()
    }
}

impl KeyPair {
    /// A new random key (from the OS generator), not yet written anywhere.
    pub fn generate() -> Self {
        Self {
            signing: SigningKey::generate(&mut OsRng),
            source: PathBuf::new(),
        }
    }

    /// Writes the key as PKCS#8 PEM with mode 0600. Refuses to overwrite an existing file:
    /// losing a root or director key is not something to do by accident.
    pub fn write_new(&self, path: &Path) -> Result<(), KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let pem = self
            .signing
            .to_pkcs8_pem(Default::default())
            .map_err(|e| KeyError::Parse {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
        let mut file = match OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(path)
        {
            Ok(file) => file,
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {
                return Err(KeyError::Exists(path.to_owned()));
            }
            Err(e) => return Err(io(e)),
        };
        // The creation mode is filtered by the umask; make sure.
        file.set_permissions(fs::Permissions::from_mode(0o600))
            .map_err(io)?;
        file.write_all(pem.as_bytes()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(())
    }

    /// Loads a PKCS#8 PEM ed25519 key, refusing files that others can read.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let io = |source| KeyError::Io {
            path: path.to_owned(),
            source,
        };
        let mode = fs::metadata(path).map_err(io)?.permissions().mode() & 0o777;
        if mode & 0o077 != 0 {
            return Err(KeyError::Permissions {
                path: path.to_owned(),
                mode,
            });
        }
        let pem = fs::read_to_string(path).map_err(io)?;
        let signing = SigningKey::from_pkcs8_pem(&pem).map_err(|e| KeyError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Ok(Self {
            signing,
            source: path.to_owned(),
        })
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        self.signing.verifying_key()
    }

    pub fn public_hex(&self) -> String {
        hex::encode(self.signing.verifying_key().as_bytes())
    }

    /// The key as TUF describes it (its key id is the SHA-256 of this in canonical JSON).
    pub fn tuf_key(&self) -> Key {
        tuf_ed25519_key(&self.verifying_key())
    }

    /// The TUF key id.
    pub fn key_id(&self) -> Decoded<Hex> {
        self.tuf_key()
            .key_id()
            .expect("an ed25519 key always serialises")
    }

    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        self.signing.sign(message).to_bytes()
    }

    /// This key as a tough signer.
    pub fn source(&self) -> Box<dyn KeySource> {
        Box::new(self.clone())
    }
}

pub fn tuf_ed25519_key(public: &VerifyingKey) -> Key {
    Key::Ed25519 {
        keyval: Ed25519Key {
            public: public.as_bytes().to_vec().into(),
            _extra: HashMap::new(),
        },
        scheme: Ed25519Scheme::Ed25519,
        _extra: HashMap::new(),
    }
}

#[async_trait]
impl Sign for KeyPair {
    fn tuf_key(&self) -> Key {
        KeyPair::tuf_key(self)
    }

    async fn sign(
        &self,
        msg: &[u8],
        _rng: &(dyn aws_lc_rs::rand::SecureRandom + Sync),
    ) -> Result<Vec<u8>, Box<dyn std::error::Error + Send + Sync + 'static>> {
        // Ed25519 signatures are deterministic; no randomness is needed.
        Ok(KeyPair::sign(self, msg).to_vec())
    }
}

#[async_trait]
impl KeySource for KeyPair {
    async fn as_sign(
        &self,
    ) -> Result<Box<dyn Sign>, Box<dyn std::error::Error + Send + Sync + 'static>> {
        Ok(Box::new(self.clone()))
    }

    async fn write(
        &self,
        _value: &str,
        _key_id_hex: &str,
    ) -> Result<(), Box<dyn std::error::Error + Send + Sync + 'static>> {
        Err("atlasmesh keys are written by `atlasmesh release keygen`, not by tough".into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn written_keys_are_private_and_load_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("root.pem");
        let key = KeyPair::generate();
        key.write_new(&path).unwrap();
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        let loaded = KeyPair::load(&path).unwrap();
        assert_eq!(loaded.public_hex(), key.public_hex());
        assert!(matches!(key.write_new(&path), Err(KeyError::Exists(_))));

        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            KeyPair::load(&path),
            Err(KeyError::Permissions { .. })
        ));
    }

    #[test]
    fn debug_output_hides_the_private_key() {
        let key = KeyPair::generate();
        let text = format!("{key:?}");
        assert!(text.contains(&key.public_hex()));
        assert!(!text.contains("signing"));
    }
}
