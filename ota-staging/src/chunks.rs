//! Content-defined chunking and the chunk index.
//!
//! Images are cut with FastCDC (the 2020 variant of the `fastcdc` crate) into chunks of
//! 16 KiB to 256 KiB, 64 KiB on average. Boundaries depend on content, not offsets, so
//! inserting bytes early in an image moves only the chunks around the insertion: a vehicle
//! holding v1 fetches little more than what really changed to build v2.
//!
//! [`Ingest`] reads an image exactly once and produces, in that one pass, its length, its
//! SHA-256, its chunk boundaries and each chunk's SHA-256, while passing the bytes on to a
//! writer (the depot's image pack, or nothing). The whole-image hash runs on its own thread so
//! it overlaps with chunking.

use std::io::{self, Read, Write};
use std::sync::mpsc;
use std::thread;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// FastCDC parameters. Changing them changes every chunk boundary, so they are part of the
/// index format and checked when an index is read.
pub const MIN_CHUNK: u32 = 16 * 1024;
pub const AVG_CHUNK: u32 = 64 * 1024;
pub const MAX_CHUNK: u32 = 256 * 1024;

pub const INDEX_FORMAT: &str = "atlasmesh-chunk-index/1";
pub const INDEX_ALGORITHM: &str = "fastcdc-2020";

/// One chunk: where it is in the image and what it hashes to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Chunk {
    pub offset: u64,
    pub length: u32,
    /// Lower-case hex SHA-256 of the chunk's bytes.
    pub sha256: String,
}

/// The chunk index of an image, published as a TUF target beside the image so that every
/// chunk is authenticated by the signed metadata.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkIndex {
    pub format: String,
    pub algorithm: String,
    pub min_size: u32,
    pub avg_size: u32,
    pub max_size: u32,
    /// Length and SHA-256 of the whole image.
    pub length: u64,
    pub sha256: String,
    pub chunks: Vec<Chunk>,
}

#[derive(Debug, thiserror::Error)]
pub enum IndexError {
    #[error("chunk index is not valid JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error("chunk index has format {0:?}; this version reads {INDEX_FORMAT:?}")]
    Format(String),
    #[error(
        "chunk index uses {algorithm} with sizes {min}/{avg}/{max}; expected {INDEX_ALGORITHM} with {MIN_CHUNK}/{AVG_CHUNK}/{MAX_CHUNK}"
    )]
    Parameters {
        algorithm: String,
        min: u32,
        avg: u32,
        max: u32,
    },
    #[error("chunk index is inconsistent: {0}")]
    Inconsistent(String),
}

impl ChunkIndex {
    /// Parses and checks an index: known format and parameters, chunks contiguous, covering
    /// exactly `length` bytes, within the size bounds.
    pub fn from_json(bytes: &[u8]) -> Result<Self, IndexError> {
        let index: ChunkIndex = serde_json::from_slice(bytes)?;
        if index.format != INDEX_FORMAT {
            return Err(IndexError::Format(index.format));
        }
        if index.algorithm != INDEX_ALGORITHM
            || (index.min_size, index.avg_size, index.max_size) != (MIN_CHUNK, AVG_CHUNK, MAX_CHUNK)
        {
            return Err(IndexError::Parameters {
                algorithm: index.algorithm,
                min: index.min_size,
                avg: index.avg_size,
                max: index.max_size,
            });
        }
        let mut expected = 0u64;
        for (i, chunk) in index.chunks.iter().enumerate() {
            if chunk.offset != expected {
                return Err(IndexError::Inconsistent(format!(
                    "chunk {i} starts at {} instead of {expected}",
                    chunk.offset
                )));
            }
            if chunk.length == 0 || chunk.length > MAX_CHUNK {
                return Err(IndexError::Inconsistent(format!(
                    "chunk {i} has length {}",
                    chunk.length
                )));
            }
            if !is_sha256_hex(&chunk.sha256) {
                return Err(IndexError::Inconsistent(format!(
                    "chunk {i} has a malformed hash"
                )));
            }
            expected += u64::from(chunk.length);
        }
        if expected != index.length {
            return Err(IndexError::Inconsistent(format!(
                "chunks cover {expected} bytes, the image has {}",
                index.length
            )));
        }
        if !is_sha256_hex(&index.sha256) {
            return Err(IndexError::Inconsistent("malformed image hash".into()));
        }
        Ok(index)
    }

    pub fn to_json(&self) -> Vec<u8> {
        let mut out = serde_json::to_vec(self).expect("a chunk index always serialises");
        out.push(b'\n');
        out
    }

    /// The chunk containing byte `offset`, by binary search.
    pub fn chunk_at(&self, offset: u64) -> Option<usize> {
        if offset >= self.length {
            return None;
        }
        Some(
            self.chunks
                .partition_point(|c| c.offset + u64::from(c.length) <= offset),
        )
    }
}

pub fn is_sha256_hex(s: &str) -> bool {
    s.len() == 64
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// What one pass over an image found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ingested {
    pub length: u64,
    pub sha256: String,
    pub index: ChunkIndex,
}

/// Reads `source` to the end exactly once, writing every byte to `sink`, and returns the
/// image's length, SHA-256 and chunk index. `progress` is told the byte count as it grows.
pub fn ingest<R: Read, W: Write>(
    source: R,
    sink: &mut W,
    mut progress: impl FnMut(u64),
) -> io::Result<Ingested> {
    // The whole-image hash is sequential by nature; it gets its own thread and sees each
    // block once, while this thread finds boundaries, hashes chunks and writes.
    let (tx, rx) = mpsc::sync_channel::<Vec<u8>>(8);
    let whole = thread::spawn(move || {
        let mut hasher = Sha256::new();
        for block in rx {
            hasher.update(&block);
        }
        hex::encode(hasher.finalize())
    });

    let tee = TeeReader { inner: source, tx };
    let chunker = fastcdc::v2020::StreamCDC::new(tee, MIN_CHUNK, AVG_CHUNK, MAX_CHUNK);
    let mut chunks = Vec::new();
    let mut length = 0u64;
    let mut failure = None;
    for item in chunker {
        let data = match item {
            Ok(data) => data,
            Err(fastcdc::v2020::Error::IoError(e)) => {
                failure = Some(e);
                break;
            }
            Err(e) => {
                failure = Some(io::Error::other(e.to_string()));
                break;
            }
        };
        if let Err(e) = sink.write_all(&data.data) {
            failure = Some(e);
            break;
        }
        chunks.push(Chunk {
            offset: data.offset,
            length: u32::try_from(data.length).expect("chunks are at most MAX_CHUNK bytes"),
            sha256: hex::encode(Sha256::digest(&data.data)),
        });
        length = data.offset + data.length as u64;
        progress(length);
    }
    // Dropping the chunker drops the tee and its sender, which ends the hashing thread.
    let sha256 = whole
        .join()
        .map_err(|_| io::Error::other("the hashing thread panicked"))?;
    if let Some(e) = failure {
        return Err(e);
    }
    Ok(Ingested {
        length,
        sha256: sha256.clone(),
        index: ChunkIndex {
            format: INDEX_FORMAT.into(),
            algorithm: INDEX_ALGORITHM.into(),
            min_size: MIN_CHUNK,
            avg_size: AVG_CHUNK,
            max_size: MAX_CHUNK,
            length,
            sha256,
            chunks,
        },
    })
}

/// Passes every block read on to the whole-image hasher.
struct TeeReader<R> {
    inner: R,
    tx: mpsc::SyncSender<Vec<u8>>,
}

impl<R: Read> Read for TeeReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        if n > 0 {
            self.tx
                .send(buf[..n].to_vec())
                .map_err(|_| io::Error::other("the hashing thread stopped"))?;
        }
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn random(len: usize, seed: u64) -> Vec<u8> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        let mut v = vec![0u8; len];
        rng.fill(&mut v[..]);
        v
    }

    #[test]
    fn one_pass_gives_hash_length_and_contiguous_chunks() {
        let data = random(3 * 1024 * 1024 + 17, 1);
        let mut copy = Vec::new();
        let mut seen = 0;
        let got = ingest(&data[..], &mut copy, |n| seen = n).unwrap();
        assert_eq!(copy, data);
        assert_eq!(seen, data.len() as u64);
        assert_eq!(got.length, data.len() as u64);
        assert_eq!(got.sha256, hex::encode(Sha256::digest(&data)));
        let index = ChunkIndex::from_json(&got.index.to_json()).unwrap();
        for c in &index.chunks {
            let bytes = &data[c.offset as usize..c.offset as usize + c.length as usize];
            assert_eq!(c.sha256, hex::encode(Sha256::digest(bytes)));
        }
        assert!(
            index.chunks.len() > 20,
            "about 48 chunks of 64 KiB expected"
        );
        assert_eq!(index.chunk_at(0), Some(0));
        assert_eq!(
            index.chunk_at(index.length - 1),
            Some(index.chunks.len() - 1)
        );
        assert_eq!(index.chunk_at(index.length), None);
    }

    #[test]
    fn an_insertion_disturbs_only_nearby_chunks() {
        let v1 = random(4 * 1024 * 1024, 2);
        let mut v2 = v1.clone();
        v2.splice(1_000_000..1_000_000, random(1234, 3));
        let a = ingest(&v1[..], &mut io::sink(), |_| {}).unwrap().index;
        let b = ingest(&v2[..], &mut io::sink(), |_| {}).unwrap().index;
        let known: std::collections::HashSet<_> = a.chunks.iter().map(|c| &c.sha256).collect();
        let new: Vec<_> = b
            .chunks
            .iter()
            .filter(|c| !known.contains(&c.sha256))
            .collect();
        assert!(
            new.len() <= 3,
            "{} new chunks after one insertion",
            new.len()
        );
    }

    #[test]
    fn empty_image_has_no_chunks() {
        let got = ingest(&b""[..], &mut io::sink(), |_| {}).unwrap();
        assert_eq!(got.length, 0);
        assert!(got.index.chunks.is_empty());
        ChunkIndex::from_json(&got.index.to_json()).unwrap();
    }

    #[test]
    fn inconsistent_indexes_are_refused() {
        let data = random(300_000, 4);
        let good = ingest(&data[..], &mut io::sink(), |_| {}).unwrap().index;
        let mut gap = good.clone();
        gap.chunks[1].offset += 1;
        assert!(ChunkIndex::from_json(&gap.to_json()).is_err());
        let mut short = good.clone();
        short.length += 1;
        assert!(ChunkIndex::from_json(&short.to_json()).is_err());
        let mut params = good;
        params.avg_size = 8192;
        assert!(matches!(
            ChunkIndex::from_json(&params.to_json()),
            Err(IndexError::Parameters { .. })
        ));
    }
}
