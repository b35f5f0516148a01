//! The fleet's certificate for a depot's director repository: a small statement, signed by the
//! fleet certifier key, binding a depot id to the SHA-256 of the depot's first director root,
//! until an expiry. A vehicle that trusts the fleet can thereby trust any depot it docks at.
//!
//! The certifier's public key reaches vehicles as a target of the image repository
//! ([`crate::release::CERTIFIER_TARGET`]), so the fleet root is the only thing a vehicle needs
//! to be provisioned with.

use std::time::SystemTime;

use ed25519_dalek::{Signature, Verifier, VerifyingKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::keys::{KeyPair, tuf_ed25519_key};
use crate::release::canonical_json;

pub const CERTIFICATE_TYPE: &str = "atlasmesh-depot-certificate";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateBody {
    #[serde(rename = "_type")]
    pub kind: String,
    pub depot_id: String,
    /// SHA-256 of the exact bytes of the director's `1.root.json`.
    pub director_root_sha256: String,
    /// RFC 3339.
    pub issued: String,
    pub expires: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CertificateSignature {
    pub keyid: String,
    pub sig: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DepotCertificate {
    pub signed: CertificateBody,
    pub signatures: Vec<CertificateSignature>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CertificateError {
    #[error("depot certificate is malformed: {0}")]
    Malformed(String),
    #[error("depot certificate is not signed by the fleet certifier key")]
    Signature,
    #[error("depot certificate expired at {0}")]
    Expired(String),
    #[error("depot certificate is for depot {certified:?}, not {expected:?}")]
    WrongDepot { certified: String, expected: String },
    #[error("the director root served by the depot is not the one the fleet certified")]
    RootMismatch,
}

/// The certifier's public key document (the [`crate::release::CERTIFIER_TARGET`] target).
#[derive(Debug, Clone, Deserialize)]
pub struct CertifierKey {
    pub keytype: String,
    pub public: String,
}

impl CertifierKey {
    pub fn parse(bytes: &[u8]) -> Result<VerifyingKey, CertificateError> {
        let doc: CertifierKey = serde_json::from_slice(bytes)
            .map_err(|e| CertificateError::Malformed(e.to_string()))?;
        if doc.keytype != "ed25519" {
            return Err(CertificateError::Malformed(format!(
                "certifier key type {}",
                doc.keytype
            )));
        }
        let raw: [u8; 32] = hex::decode(&doc.public)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| {
                CertificateError::Malformed("certifier public key is not 32 hex bytes".into())
            })?;
        VerifyingKey::from_bytes(&raw).map_err(|e| CertificateError::Malformed(e.to_string()))
    }
}

fn key_id(key: &VerifyingKey) -> String {
    tuf_ed25519_key(key)
        .key_id()
        .map(|id| hex::encode(&*id))
        .unwrap_or_default()
}

fn rfc3339(t: SystemTime) -> String {
    jiff::Timestamp::try_from(t)
        .map(|t| t.to_string())
        .unwrap_or_default()
}

impl DepotCertificate {
    /// Certifies `director_root` (the bytes of `1.root.json`) for `depot_id` until `expires`.
    pub fn issue(
        certifier: &KeyPair,
        depot_id: &str,
        director_root: &[u8],
        issued: SystemTime,
        expires: SystemTime,
    ) -> Self {
        let signed = CertificateBody {
            kind: CERTIFICATE_TYPE.into(),
            depot_id: depot_id.into(),
            director_root_sha256: hex::encode(Sha256::digest(director_root)),
            issued: rfc3339(issued),
            expires: rfc3339(expires),
        };
        let canonical = canonical_json(&signed).expect("certificate bodies serialise");
        DepotCertificate {
            signatures: vec![CertificateSignature {
                keyid: key_id(&certifier.verifying_key()),
                sig: hex::encode(certifier.sign(&canonical)),
            }],
            signed,
        }
    }

    pub fn parse(bytes: &[u8]) -> Result<Self, CertificateError> {
        let cert: DepotCertificate = serde_json::from_slice(bytes)
            .map_err(|e| CertificateError::Malformed(e.to_string()))?;
        if cert.signed.kind != CERTIFICATE_TYPE {
            return Err(CertificateError::Malformed(format!(
                "type {:?}",
                cert.signed.kind
            )));
        }
        Ok(cert)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec_pretty(self).expect("certificates serialise");
        out.push(b'\n');
        out
    }

    /// Checks signature, expiry, depot id (when the caller knows which depot it expects) and
    /// that `director_root` is the certified root.
    pub fn verify(
        &self,
        certifier: &VerifyingKey,
        expected_depot: Option<&str>,
        director_root: &[u8],
        now: SystemTime,
    ) -> Result<(), CertificateError> {
        let canonical =
            canonical_json(&self.signed).map_err(|e| CertificateError::Malformed(e.to_string()))?;
        let id = key_id(certifier);
        let signed_ok = self.signatures.iter().filter(|s| s.keyid == id).any(|s| {
            hex::decode(&s.sig)
                .ok()
                .and_then(|b| Signature::from_slice(&b).ok())
                .is_some_and(|sig| certifier.verify(&canonical, &sig).is_ok())
        });
        if !signed_ok {
            return Err(CertificateError::Signature);
        }
        let expires: jiff::Timestamp = self
            .signed
            .expires
            .parse()
            .map_err(|e| CertificateError::Malformed(format!("expires: {e}")))?;
        let now = jiff::Timestamp::try_from(now)
            .map_err(|e| CertificateError::Malformed(e.to_string()))?;
        if expires <= now {
            return Err(CertificateError::Expired(self.signed.expires.clone()));
        }
        if let Some(expected) = expected_depot
            && expected != self.signed.depot_id
        {
            return Err(CertificateError::WrongDepot {
                certified: self.signed.depot_id.clone(),
                expected: expected.into(),
            });
        }
        if hex::encode(Sha256::digest(director_root)) != self.signed.director_root_sha256 {
            return Err(CertificateError::RootMismatch);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_certificate_verifies_only_as_issued() {
        let certifier = KeyPair::generate();
        let root = br#"{"signed":{"_type":"root"}}"#;
        let now = SystemTime::now();
        let cert = DepotCertificate::issue(
            &certifier,
            "north-1",
            root,
            now,
            now + Duration::from_secs(3600),
        );
        let cert = DepotCertificate::parse(&cert.to_json()).unwrap();
        let key = certifier.verifying_key();
        cert.verify(&key, Some("north-1"), root, now).unwrap();
        cert.verify(&key, None, root, now).unwrap();

        assert_eq!(
            cert.verify(&key, Some("south-2"), root, now),
            Err(CertificateError::WrongDepot {
                certified: "north-1".into(),
                expected: "south-2".into()
            })
        );
        assert_eq!(
            cert.verify(&key, None, b"another root", now),
            Err(CertificateError::RootMismatch)
        );
        assert!(matches!(
            cert.verify(&key, None, root, now + Duration::from_secs(7200)),
            Err(CertificateError::Expired(_))
        ));
        assert_eq!(
            cert.verify(&KeyPair::generate().verifying_key(), None, root, now),
            Err(CertificateError::Signature)
        );

        let mut forged = cert.clone();
        forged.signed.depot_id = "evil".into();
        assert_eq!(
            forged.verify(&key, None, root, now),
            Err(CertificateError::Signature)
        );
    }

    #[test]
    fn certifier_documents_round_trip() {
        let key = KeyPair::generate();
        let doc = crate::release::certifier_document(&key);
        assert_eq!(CertifierKey::parse(&doc).unwrap(), key.verifying_key());
        assert!(CertifierKey::parse(b"{}").is_err());
    }
}
