//! The depot's image store: every staged image kept whole as one immutable pack file, with its
//! chunk index, and an in-memory map from chunk SHA-256 to where the chunk sits in a pack.
//!
//! This is a content-addressed chunk store in the manner of git's packs: `/chunks/{sha256}` is
//! served by looking the hash up and reading that range of a pack, `/images/...` serves the
//! pack itself, and staging writes one sequential file instead of tens of thousands of small
//! ones. A pack appears under its final name (`images/<sha256>.img`) only after it has been
//! fsynced and every check has passed, by an atomic rename.
//!
//! ```text
//! images/<sha256>.img            packs, named by the image's SHA-256
//! index/<sha256>.chunks.json     their chunk indexes, as signed
//! staging/                       work in progress; emptied at start
//! ```

use std::collections::HashMap;
use std::fs::{self, File};
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::RwLock;

use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::chunks::ChunkIndex;

/// Where a chunk can be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkLocation {
    pub image: [u8; 32],
    pub offset: u64,
    pub length: u32,
}

#[derive(Debug)]
pub struct ImageStore {
    root: PathBuf,
    chunks: RwLock<HashMap<[u8; 32], ChunkLocation>>,
}

fn hash32(hex_str: &str) -> Option<[u8; 32]> {
    hex::decode(hex_str).ok()?.try_into().ok()
}

/// The result of re-reading an image from disk.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Validation {
    pub ok: bool,
    pub length_ok: bool,
    pub sha256_ok: bool,
    pub chunks_checked: usize,
    /// Indexes of chunks whose bytes no longer hash to their recorded SHA-256.
    pub bad_chunks: Vec<usize>,
    pub bytes_read: u64,
}

impl ImageStore {
    /// Opens the store under `root`, creating its directories, and empties `staging/` but for
    /// the files `keep` names: whatever is there was left by a process that died mid-staging
    /// and was never visible; only a download its owner will resume is worth keeping.
    pub fn open(root: &Path, keep: impl Fn(&Path) -> bool) -> io::Result<(Self, usize)> {
        for dir in ["images", "index", "staging"] {
            fs::create_dir_all(root.join(dir))?;
        }
        let mut leftovers = 0;
        for entry in fs::read_dir(root.join("staging"))? {
            let path = entry?.path();
            if keep(&path) {
                continue;
            }
            if path.is_dir() {
                fs::remove_dir_all(&path)?;
            } else {
                fs::remove_file(&path)?;
            }
            leftovers += 1;
        }
        Ok((
            Self {
                root: root.to_owned(),
                chunks: RwLock::new(HashMap::new()),
            },
            leftovers,
        ))
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn pack_path(&self, sha256: &str) -> PathBuf {
        self.root.join("images").join(format!("{sha256}.img"))
    }

    pub fn index_path(&self, sha256: &str) -> PathBuf {
        self.root
            .join("index")
            .join(format!("{sha256}.chunks.json"))
    }

    pub fn staging_dir(&self) -> PathBuf {
        self.root.join("staging")
    }

    /// Reads a stored index back.
    pub fn read_index(&self, sha256: &str) -> io::Result<ChunkIndex> {
        let bytes = fs::read(self.index_path(sha256))?;
        ChunkIndex::from_json(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }

    /// Makes an image's chunks findable by hash.
    pub fn register(&self, index: &ChunkIndex) {
        let Some(image) = hash32(&index.sha256) else {
            return;
        };
        let mut map = self.chunks.write().unwrap_or_else(|p| p.into_inner());
        for c in &index.chunks {
            if let Some(h) = hash32(&c.sha256) {
                map.entry(h).or_insert(ChunkLocation {
                    image,
                    offset: c.offset,
                    length: c.length,
                });
            }
        }
    }

    /// Forgets an image's chunks; chunks it shares with other registered images stay findable.
    pub fn unregister(&self, index: &ChunkIndex, remaining: &[ChunkIndex]) {
        let Some(image) = hash32(&index.sha256) else {
            return;
        };
        let mut map = self.chunks.write().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, loc| loc.image != image);
        drop(map);
        for other in remaining {
            self.register(other);
        }
    }

    pub fn locate(&self, chunk_sha256: &[u8; 32]) -> Option<ChunkLocation> {
        self.chunks
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(chunk_sha256)
            .copied()
    }

    pub fn chunk_count(&self) -> usize {
        self.chunks.read().unwrap_or_else(|p| p.into_inner()).len()
    }

    /// Moves a verified pack into place (fsync, atomic rename, directory fsync) and writes its
    /// index the same way. Until this returns, nothing of the image is visible.
    pub fn publish(&self, staged: &Path, index: &ChunkIndex, index_bytes: &[u8]) -> io::Result<()> {
        File::open(staged)?.sync_all()?;
        let index_tmp = self
            .staging_dir()
            .join(format!("{}.chunks.json", index.sha256));
        fs::write(&index_tmp, index_bytes)?;
        File::open(&index_tmp)?.sync_all()?;
        fs::rename(&index_tmp, self.index_path(&index.sha256))?;
        fs::rename(staged, self.pack_path(&index.sha256))?;
        File::open(self.root.join("index"))?.sync_all()?;
        File::open(self.root.join("images"))?.sync_all()?;
        Ok(())
    }

    /// Deletes a pack and its index from disk (the caller has unregistered it).
    pub fn remove(&self, sha256: &str) -> io::Result<()> {
        for path in [self.pack_path(sha256), self.index_path(sha256)] {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Re-reads the whole pack and re-hashes every chunk and the image.
    pub fn validate(&self, index: &ChunkIndex) -> io::Result<Validation> {
        let path = self.pack_path(&index.sha256);
        let file = File::open(&path)?;
        let length = file.metadata()?.len();
        let mut reader = io::BufReader::with_capacity(1 << 20, file);
        let mut whole = Sha256::new();
        let mut bad = Vec::new();
        let mut buf = vec![0u8; crate::chunks::MAX_CHUNK as usize];
        let mut read = 0u64;
        for (i, chunk) in index.chunks.iter().enumerate() {
            let piece = &mut buf[..chunk.length as usize];
            if let Err(e) = reader.read_exact(piece) {
                if e.kind() == io::ErrorKind::UnexpectedEof {
                    bad.extend(i..index.chunks.len());
                    break;
                }
                return Err(e);
            }
            read += u64::from(chunk.length);
            whole.update(&piece[..]);
            if hex::encode(Sha256::digest(&piece[..])) != chunk.sha256 {
                bad.push(i);
            }
        }
        let sha256_ok = read == index.length && hex::encode(whole.finalize()) == index.sha256;
        let length_ok = length == index.length;
        Ok(Validation {
            ok: bad.is_empty() && sha256_ok && length_ok,
            length_ok,
            sha256_ok,
            chunks_checked: index.chunks.len(),
            bad_chunks: bad,
            bytes_read: read,
        })
    }

    /// Reads `len` bytes of a pack at `offset` (positional, no shared cursor).
    pub fn read_at(file: &File, offset: u64, len: usize) -> io::Result<Vec<u8>> {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset)?;
        Ok(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunks::ingest;

    #[test]
    fn publish_locate_validate_remove() {
        let dir = tempfile::tempdir().unwrap();
        let (store, _) = ImageStore::open(dir.path(), |_| false).unwrap();
        let data: Vec<u8> = (0..600_000u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let staged = store.staging_dir().join("job-1.img");
        let mut out = File::create(&staged).unwrap();
        let got = ingest(&data[..], &mut out, |_| {}).unwrap();
        store
            .publish(&staged, &got.index, &got.index.to_json())
            .unwrap();
        store.register(&got.index);

        let chunk = &got.index.chunks[2];
        let loc = store.locate(&hash32(&chunk.sha256).unwrap()).unwrap();
        let pack = File::open(store.pack_path(&got.sha256)).unwrap();
        let bytes = ImageStore::read_at(&pack, loc.offset, loc.length as usize).unwrap();
        assert_eq!(hex::encode(Sha256::digest(&bytes)), chunk.sha256);
        assert!(store.validate(&got.index).unwrap().ok);

        // A flipped byte on disk is found, and which chunk holds it.
        let mut damaged = fs::read(store.pack_path(&got.sha256)).unwrap();
        damaged[(chunk.offset + 5) as usize] ^= 1;
        fs::write(store.pack_path(&got.sha256), &damaged).unwrap();
        let report = store.validate(&got.index).unwrap();
        assert!(!report.ok && !report.sha256_ok);
        assert_eq!(report.bad_chunks, vec![2]);

        store.unregister(&got.index, &[]);
        assert!(store.locate(&hash32(&chunk.sha256).unwrap()).is_none());
        store.remove(&got.sha256).unwrap();
        assert!(!store.pack_path(&got.sha256).exists());

        // Leftovers of a crash are cleared on the next open, but for those asked to be kept.
        fs::write(store.staging_dir().join("job-2.img"), b"half").unwrap();
        fs::write(store.staging_dir().join("job-3.img"), b"resumable").unwrap();
        let keep = store.staging_dir().join("job-3.img");
        let (_, leftovers) = ImageStore::open(dir.path(), |p| p == keep).unwrap();
        assert_eq!(leftovers, 1);
        assert!(!store.staging_dir().join("job-2.img").exists());
        assert!(keep.exists());
    }
}
