//! Block maps in bmaptool's format 2.0: which blocks of a sparse image hold data, with a
//! SHA-256 per range and a checksum of the bmap file itself, so `bmaptool copy` and
//! `atlasmesh image flash` write only those blocks and can tell a damaged image or bmap.
//!
//! The file checksum follows bmaptool: SHA-256 of the whole file with the checksum's own 64
//! hex digits replaced by ASCII zeros.

use std::fmt::Write as _;

use sha2::{Digest, Sha256};

pub const BLOCK_SIZE: u64 = 4096;
const ZERO_CHECKSUM: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Blocks `first..=last` (block numbers), and the SHA-256 of their bytes in the image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Range {
    pub first: u64,
    pub last: u64,
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bmap {
    pub image_size: u64,
    pub block_size: u64,
    pub ranges: Vec<Range>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BmapError {
    #[error("bmap is not XML: {0}")]
    Xml(String),
    #[error("bmap lacks <{0}>")]
    Missing(&'static str),
    #[error("bmap <{0}> is not a number: {1:?}")]
    Number(&'static str, String),
    #[error("bmap format version {0} is not supported (2.x is)")]
    Version(String),
    #[error("bmap checksum type {0:?} is not supported (sha256 is)")]
    ChecksumType(String),
    #[error("bmap file checksum does not match: the bmap was modified or damaged")]
    FileChecksum,
    #[error("bmap range {0:?} is malformed")]
    Range(String),
    #[error("bmap range {0}-{1} lacks a sha256 checksum")]
    RangeChecksum(u64, u64),
    #[error("bmap ranges overlap, are out of order or lie outside the image ({0}-{1})")]
    Order(u64, u64),
    #[error("bmap counts disagree: {0}")]
    Counts(String),
}

impl Bmap {
    /// Byte offset and length of a range in the image (the last block may be short).
    pub fn span(&self, range: &Range) -> (u64, u64) {
        let start = range.first * self.block_size;
        let end = ((range.last + 1) * self.block_size).min(self.image_size);
        (start, end - start)
    }

    pub fn blocks_count(&self) -> u64 {
        self.image_size.div_ceil(self.block_size)
    }

    pub fn mapped_blocks(&self) -> u64 {
        self.ranges.iter().map(|r| r.last - r.first + 1).sum()
    }

    pub fn mapped_bytes(&self) -> u64 {
        self.ranges.iter().map(|r| self.span(r).1).sum()
    }

    /// The bmap file, checksum included.
    pub fn to_xml(&self) -> Vec<u8> {
        let mapped = self.mapped_blocks();
        let percent = if self.blocks_count() == 0 {
            0.0
        } else {
            mapped as f64 * 100.0 / self.blocks_count() as f64
        };
        let mut xml = String::new();
        // Writing to a String cannot fail.
        let _ = write!(
            xml,
            "<?xml version=\"1.0\" ?>\n\
             <!-- Block map of an AtlasMesh appliance image, written by `atlasmesh image build`\n     \
             in bmaptool's format 2.0. Only the mapped blocks need to be written to a disk;\n     \
             each range carries the SHA-256 of its bytes. -->\n\
             <bmap version=\"2.0\">\n    \
             <!-- Image size in bytes: {human} -->\n    \
             <ImageSize> {size} </ImageSize>\n    \
             <BlockSize> {bs} </BlockSize>\n    \
             <BlocksCount> {count} </BlocksCount>\n    \
             <!-- Mapped: {mapped_human}, {percent:.1}% -->\n    \
             <MappedBlocksCount> {mapped} </MappedBlocksCount>\n    \
             <ChecksumType> sha256 </ChecksumType>\n    \
             <!-- SHA-256 of this file with this value set to zeros -->\n    \
             <BmapFileChecksum> {ZERO_CHECKSUM} </BmapFileChecksum>\n    \
             <BlockMap>\n",
            human = human_bytes(self.image_size),
            size = self.image_size,
            bs = self.block_size,
            count = self.blocks_count(),
            mapped_human = human_bytes(self.mapped_bytes()),
        );
        for r in &self.ranges {
            if r.first == r.last {
                let _ = writeln!(
                    xml,
                    "        <Range chksum=\"{}\"> {} </Range>",
                    r.sha256, r.first
                );
            } else {
                let _ = writeln!(
                    xml,
                    "        <Range chksum=\"{}\"> {}-{} </Range>",
                    r.sha256, r.first, r.last
                );
            }
        }
        xml.push_str("    </BlockMap>\n</bmap>\n");
        let checksum = hex::encode(Sha256::digest(xml.as_bytes()));
        // The zeros appear once: range checksums are real digests, never all zeros in practice,
        // and they come after the file checksum anyway.
        xml.replacen(ZERO_CHECKSUM, &checksum, 1).into_bytes()
    }

    /// Parses and checks a bmap file: its own checksum, version, and that the ranges are
    /// ordered, disjoint, inside the image and each checksummed.
    pub fn parse(bytes: &[u8]) -> Result<Self, BmapError> {
        let text = std::str::from_utf8(bytes).map_err(|e| BmapError::Xml(e.to_string()))?;
        let doc = roxmltree::Document::parse(text).map_err(|e| BmapError::Xml(e.to_string()))?;
        let root = doc.root_element();
        if root.tag_name().name() != "bmap" {
            return Err(BmapError::Missing("bmap"));
        }
        let version = root.attribute("version").unwrap_or("");
        if !version.starts_with("2.") {
            return Err(BmapError::Version(version.to_owned()));
        }
        let child = |name: &'static str| {
            root.children()
                .find(|n| n.has_tag_name(name))
                .and_then(|n| n.text())
                .map(str::trim)
                .ok_or(BmapError::Missing(name))
        };
        let number = |name: &'static str| {
            let text = child(name)?;
            text.parse::<u64>()
                .map_err(|_| BmapError::Number(name, text.to_owned()))
        };
        let checksum_type = child("ChecksumType")?;
        if checksum_type != "sha256" {
            return Err(BmapError::ChecksumType(checksum_type.to_owned()));
        }
        let file_checksum = child("BmapFileChecksum")?;
        if file_checksum.len() != 64 || !file_checksum.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(BmapError::FileChecksum);
        }
        let zeroed = text.replacen(file_checksum, ZERO_CHECKSUM, 1);
        if hex::encode(Sha256::digest(zeroed.as_bytes())) != file_checksum.to_ascii_lowercase() {
            return Err(BmapError::FileChecksum);
        }
        let image_size = number("ImageSize")?;
        let block_size = number("BlockSize")?;
        if block_size == 0 || block_size % 512 != 0 {
            return Err(BmapError::Counts(format!("block size {block_size}")));
        }
        let blocks_count = number("BlocksCount")?;
        let mapped_count = number("MappedBlocksCount")?;
        let map = root
            .children()
            .find(|n| n.has_tag_name("BlockMap"))
            .ok_or(BmapError::Missing("BlockMap"))?;
        let mut ranges = Vec::new();
        for node in map.children().filter(|n| n.has_tag_name("Range")) {
            let text = node.text().unwrap_or("").trim();
            let bad = || BmapError::Range(text.to_owned());
            let (first, last) = match text.split_once('-') {
                Some((a, b)) => (
                    a.trim().parse().map_err(|_| bad())?,
                    b.trim().parse().map_err(|_| bad())?,
                ),
                None => {
                    let n: u64 = text.parse().map_err(|_| bad())?;
                    (n, n)
                }
            };
            let sha256 = node
                .attribute("chksum")
                .filter(|c| c.len() == 64 && c.bytes().all(|b| b.is_ascii_hexdigit()))
                .ok_or(BmapError::RangeChecksum(first, last))?
                .to_ascii_lowercase();
            let previous_end = ranges.last().map(|r: &Range| r.last + 1).unwrap_or(0);
            if last < first || first < previous_end || last >= blocks_count {
                return Err(BmapError::Order(first, last));
            }
            ranges.push(Range {
                first,
                last,
                sha256,
            });
        }
        let bmap = Self {
            image_size,
            block_size,
            ranges,
        };
        if bmap.blocks_count() != blocks_count {
            return Err(BmapError::Counts(format!(
                "{blocks_count} blocks of {block_size} bytes for an image of {image_size} bytes"
            )));
        }
        if bmap.mapped_blocks() != mapped_count {
            return Err(BmapError::Counts(format!(
                "MappedBlocksCount says {mapped_count}, the ranges hold {}",
                bmap.mapped_blocks()
            )));
        }
        Ok(bmap)
    }
}

/// `1.5 GiB`-style sizes for people.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["bytes", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} bytes")
    } else {
        format!("{value:.1} {}", UNITS[unit])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Bmap {
        Bmap {
            image_size: 10 * BLOCK_SIZE + 100,
            block_size: BLOCK_SIZE,
            ranges: vec![
                Range {
                    first: 0,
                    last: 1,
                    sha256: "ab".repeat(32),
                },
                Range {
                    first: 5,
                    last: 5,
                    sha256: "cd".repeat(32),
                },
                Range {
                    first: 9,
                    last: 10,
                    sha256: "ef".repeat(32),
                },
            ],
        }
    }

    #[test]
    fn round_trips_and_checks_its_own_checksum() {
        let bmap = sample();
        let xml = bmap.to_xml();
        assert_eq!(Bmap::parse(&xml).unwrap(), bmap);
        assert!(String::from_utf8_lossy(&xml).contains("<Range chksum=\"cdcd"));
        assert_eq!(
            bmap.span(&bmap.ranges[2]),
            (9 * BLOCK_SIZE, BLOCK_SIZE + 100)
        );
        assert_eq!(bmap.mapped_blocks(), 5);
    }

    #[test]
    fn any_edit_breaks_the_file_checksum() {
        let xml = String::from_utf8(sample().to_xml()).unwrap();
        let edited = xml.replacen("> 5 <", "> 6 <", 1);
        assert_eq!(Bmap::parse(edited.as_bytes()), Err(BmapError::FileChecksum));
        let edited = xml.replacen("cdcd", "cdce", 1);
        assert_eq!(Bmap::parse(edited.as_bytes()), Err(BmapError::FileChecksum));
    }

    #[test]
    fn refuses_overlapping_or_outside_ranges_even_with_a_valid_checksum() {
        let mut bmap = sample();
        bmap.ranges[1].first = 1;
        bmap.ranges[1].last = 1;
        assert_eq!(Bmap::parse(&bmap.to_xml()), Err(BmapError::Order(1, 1)));
        let mut bmap = sample();
        bmap.ranges[2].last = 11;
        assert_eq!(Bmap::parse(&bmap.to_xml()), Err(BmapError::Order(9, 11)));
        assert!(matches!(
            Bmap::parse(b"<bmap version=\"1.4\"/>"),
            Err(BmapError::Version(_))
        ));
        assert!(matches!(Bmap::parse(b"not xml"), Err(BmapError::Xml(_))));
    }
}
