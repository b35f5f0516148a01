//! What a release says about an image, carried in the TUF target's `custom` fields, and the
//! naming of targets.

use std::collections::HashMap;

use semver::Version;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The custom fields of an image target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageMeta {
    /// Semantic version of the image.
    pub version: String,
    /// Hardware the image is built for; a vehicle of other hardware refuses it.
    pub hardware_id: String,
    /// Lowest installed version this image may upgrade from.
    pub min_version: Option<String>,
    pub notes: Option<String>,
}

impl ImageMeta {
    pub fn validate(&self) -> Result<(), String> {
        parse_version(&self.version)?;
        if let Some(min) = &self.min_version {
            let min_v = parse_version(min)?;
            if min_v > parse_version(&self.version)? {
                return Err(format!(
                    "minimum version {min} is above the image's version {}",
                    self.version
                ));
            }
        }
        validate_hardware_id(&self.hardware_id)?;
        if self.notes.as_ref().is_some_and(|n| n.len() > 4096) {
            return Err("release notes are limited to 4096 bytes".into());
        }
        Ok(())
    }

    pub fn to_custom(&self, chunk_index: &str) -> HashMap<String, Value> {
        HashMap::from([
            ("version".to_owned(), json!(self.version)),
            ("hardware_id".to_owned(), json!(self.hardware_id)),
            ("min_version".to_owned(), json!(self.min_version)),
            ("notes".to_owned(), json!(self.notes)),
            ("chunk_index".to_owned(), json!(chunk_index)),
        ])
    }

    /// Reads the fields back from a target's `custom`; `None` if this target is not an image.
    pub fn from_custom(custom: &HashMap<String, Value>) -> Option<(ImageMeta, String)> {
        let s = |k: &str| custom.get(k).and_then(Value::as_str).map(str::to_owned);
        let meta = ImageMeta {
            version: s("version")?,
            hardware_id: s("hardware_id")?,
            min_version: s("min_version"),
            notes: s("notes"),
        };
        Some((meta, s("chunk_index")?))
    }
}

pub fn parse_version(v: &str) -> Result<Version, String> {
    Version::parse(v).map_err(|e| format!("{v:?} is not a semantic version (like 1.4.2): {e}"))
}

/// Hardware ids become path segments of target names, so they are kept to a safe set.
pub fn validate_hardware_id(id: &str) -> Result<(), String> {
    let ok = (1..=64).contains(&id.len())
        && id.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'-' | b'_' | b'.')
        })
        && !id.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{id:?} is not a valid hardware id: use 1 to 64 characters from a-z, 0-9, '-', '_' and '.'"
        ))
    }
}

// Target names are flat. TUF's consistent snapshots prefix the file's hash to the target's
// basename, and tough prefixes it to the whole name instead; the two agree only when the
// name has no directory part, and both python-tuf and tough must be able to fetch.
// Versions cannot contain '_', so the last '_' separates hardware id and version.

pub fn image_target_name(hardware_id: &str, version: &str) -> String {
    format!("{hardware_id}_{version}.img")
}

pub fn index_target_name(hardware_id: &str, version: &str) -> String {
    format!("{hardware_id}_{version}.chunks.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_catches_bad_fields() {
        let good = ImageMeta {
            version: "1.2.0".into(),
            hardware_id: "depot-x86".into(),
            min_version: Some("1.0.0".into()),
            notes: None,
        };
        good.validate().unwrap();
        let (back, index) = ImageMeta::from_custom(&good.to_custom("i")).unwrap();
        assert_eq!((back, index.as_str()), (good.clone(), "i"));
        for bad in [
            ImageMeta {
                version: "1.2".into(),
                ..good.clone()
            },
            ImageMeta {
                hardware_id: "../etc".into(),
                ..good.clone()
            },
            ImageMeta {
                min_version: Some("2.0.0".into()),
                ..good.clone()
            },
        ] {
            assert!(bad.validate().is_err(), "{bad:?}");
        }
    }
}
