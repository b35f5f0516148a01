//! One-time enrolment tokens. A token is `SECRET.PIN`: 128 random bits in hex, which the cloud
//! keeps only as SHA-256, and the SHA-256 of the fleet CA certificate, with which the depot
//! checks the cloud it is talking to before it sends the secret (as kubeadm's discovery hash
//! does). So one string is all a field engineer types, and a man in the middle gets nothing.

use std::fmt;

use sha2::{Digest, Sha256};

#[derive(Clone, PartialEq, Eq)]
pub struct EnrollToken {
    secret: String,
    ca_fingerprint: String,
}

impl fmt::Debug for EnrollToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EnrollToken")
            .field("ca_fingerprint", &self.ca_fingerprint)
            .finish_non_exhaustive()
    }
}

impl fmt::Display for EnrollToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.secret, self.ca_fingerprint)
    }
}

impl EnrollToken {
    pub fn mint(ca_fingerprint: &str) -> Self {
        Self {
            secret: hex::encode(rand::random::<[u8; 16]>()),
            ca_fingerprint: ca_fingerprint.to_owned(),
        }
    }

    pub fn parse(text: &str) -> Result<Self, String> {
        let text = text.trim();
        let (secret, pin) = text.split_once('.').ok_or(
            "an enrolment token is SECRET.CA_SHA256 (as `atlasmesh cloud enroll-token` prints it)",
        )?;
        let hex_of =
            |s: &str, len: usize| s.len() == len && s.bytes().all(|b| b.is_ascii_hexdigit());
        if !hex_of(secret, 32) || !hex_of(pin, 64) {
            return Err("an enrolment token is 32 hex digits, a dot and 64 hex digits".into());
        }
        Ok(Self {
            secret: secret.to_ascii_lowercase(),
            ca_fingerprint: pin.to_ascii_lowercase(),
        })
    }

    /// What the cloud stores and looks up.
    pub fn secret_hash(&self) -> String {
        hash_secret(&self.secret)
    }

    pub fn secret(&self) -> &str {
        &self.secret
    }

    pub fn ca_fingerprint(&self) -> &str {
        &self.ca_fingerprint
    }
}

/// SHA-256 of a secret as the stores keep it, lower-case hex.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_what_it_prints_and_names_the_shape_otherwise() {
        let token = EnrollToken::mint(&"ab".repeat(32));
        let parsed = EnrollToken::parse(&format!(" {token}\n")).unwrap();
        assert_eq!(parsed, token);
        assert_eq!(parsed.secret_hash(), hash_secret(token.secret()));
        assert!(!format!("{token:?}").contains(token.secret()));
        for bad in [
            "",
            "abc",
            "zz.zz",
            &format!("{}.{}", "a".repeat(32), "b".repeat(63)),
        ] {
            assert!(EnrollToken::parse(bad).is_err(), "{bad:?}");
        }
    }
}
