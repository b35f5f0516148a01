//! `atlasmesh image flash`: write an appliance image onto a disk (or into a file) safely.
//!
//! Before a single byte is written: the manifest must be signed by the fleet's release key, the
//! bmap must be the one the manifest names (and pass its own checksum), the target must pass
//! [`crate::device::inspect`] (not the system disk, not mounted, not holding the image, not
//! read-only, big enough; large drives confirmed by serial), and every mapped range of the
//! image must match its checksum. Then only mapped ranges are written; each is read back from
//! the device after a data sync, with the page cache dropped, and checked against the bmap.
//!
//! Both cores work: the image is checked, and the device read back, by two hashing threads;
//! while writing, a reader thread reads ahead of the writer.

use std::fs::File;
use std::io;
use std::num::NonZeroU64;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

use crate::bmap::{Bmap, BmapError};
use crate::build::read_small;
use crate::device::{DeviceError, SystemView, Target, TargetKind};
use crate::manifest::{ManifestBody, ManifestError, Trust};

/// Pieces the image is read and written in.
const CHUNK: usize = 8 << 20;

/// Where the operator sees how far a long step has come. Implementations must be cheap.
pub trait Progress: Sync {
    fn begin(&self, _phase: &str, _total: u64) {}
    fn advance(&self, _bytes: u64) {}
    fn end(&self) {}
}

/// No progress display.
pub struct Quiet;
impl Progress for Quiet {}

#[derive(Debug, thiserror::Error)]
pub enum FlashError {
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error(transparent)]
    Manifest(#[from] ManifestError),
    #[error("bmap {path}: {source}")]
    Bmap { path: PathBuf, source: BmapError },
    #[error("bmap {0} is not the one the signed manifest names (its SHA-256 differs)")]
    BmapNotSigned(PathBuf),
    #[error("image {path} has {actual} bytes; the signed manifest says {expected}")]
    ImageSize {
        path: PathBuf,
        actual: u64,
        expected: u64,
    },
    #[error(
        "image {path} is damaged or was modified: blocks {first}-{last} do not match their checksum"
    )]
    ImageChecksum {
        path: PathBuf,
        first: u64,
        last: u64,
    },
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("not confirmed: {0}")]
    NotConfirmed(String),
    #[error(
        "verification failed: blocks {first}-{last} read back from {target} differ from the image (bad medium or a disk that drops writes)"
    )]
    Verify {
        target: PathBuf,
        first: u64,
        last: u64,
    },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> FlashError {
    let what = what.into();
    move |source| FlashError::Io { what, source }
}

/// An image whose manifest and bmap passed their checks.
#[derive(Debug, Clone)]
pub struct Checked {
    pub image: PathBuf,
    pub bmap: Bmap,
    pub manifest: ManifestBody,
}

/// Checks the manifest's signature, that the bmap is the signed one and intact, and that the
/// image has the signed size. Reads only the small files.
pub fn check_sidecars(
    image: &Path,
    bmap_path: &Path,
    manifest_path: &Path,
    trust: &Trust,
) -> Result<Checked, FlashError> {
    let manifest_bytes = read_small(manifest_path, 1 << 20).map_err(io_err(format!(
        "reading the manifest {}",
        manifest_path.display()
    )))?;
    let manifest = trust.verify(&manifest_bytes)?;
    let bmap_bytes = read_small(bmap_path, 256 << 20)
        .map_err(io_err(format!("reading the bmap {}", bmap_path.display())))?;
    if hex::encode(Sha256::digest(&bmap_bytes)) != manifest.bmap_sha256 {
        return Err(FlashError::BmapNotSigned(bmap_path.to_owned()));
    }
    let bmap = Bmap::parse(&bmap_bytes).map_err(|source| FlashError::Bmap {
        path: bmap_path.to_owned(),
        source,
    })?;
    let actual = std::fs::metadata(image)
        .map_err(io_err(format!("reading {}", image.display())))?
        .len();
    if actual != manifest.image_size || bmap.image_size != manifest.image_size {
        return Err(FlashError::ImageSize {
            path: image.to_owned(),
            actual,
            expected: manifest.image_size,
        });
    }
    Ok(Checked {
        image: image.to_owned(),
        bmap,
        manifest,
    })
}

/// Reads every mapped range of the image and checks its SHA-256 against the bmap.
pub fn check_image(checked: &Checked, progress: &dyn Progress) -> Result<(), FlashError> {
    let file = File::open(&checked.image)
        .map_err(io_err(format!("opening {}", checked.image.display())))?;
    progress.begin("checking image", checked.bmap.mapped_bytes());
    let bad = hash_ranges(&file, &checked.bmap, progress)
        .map_err(io_err(format!("reading {}", checked.image.display())))?;
    if let Some(range) = bad {
        return Err(FlashError::ImageChecksum {
            path: checked.image.clone(),
            first: range.first,
            last: range.last,
        });
    }
    progress.end();
    Ok(())
}

/// Hashes every range of the bmap in `file` and returns the first that does not match.
/// Ranges are dealt to two threads, largest first to the less loaded one, so both cores hash
/// (an image's bytes sit mostly in a few large ranges, one per root slot); each thread reads
/// its ranges in disk order.
fn hash_ranges(
    file: &File,
    bmap: &Bmap,
    progress: &dyn Progress,
) -> io::Result<Option<crate::bmap::Range>> {
    let mut order: Vec<usize> = (0..bmap.ranges.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(bmap.span(&bmap.ranges[i]).1));
    let mut shares: [(u64, Vec<usize>); 2] = [(0, Vec::new()), (0, Vec::new())];
    for i in order {
        let share = if shares[0].0 <= shares[1].0 { 0 } else { 1 };
        shares[share].0 += bmap.span(&bmap.ranges[i]).1;
        shares[share].1.push(i);
    }
    let check = |mut indices: Vec<usize>| -> io::Result<Option<crate::bmap::Range>> {
        indices.sort_unstable();
        let mut buf = vec![0u8; CHUNK];
        for i in indices {
            let range = &bmap.ranges[i];
            let (offset, len) = bmap.span(range);
            if hash_span(file, offset, len, &mut buf, progress)? != range.sha256 {
                return Ok(Some(range.clone()));
            }
        }
        Ok(None)
    };
    let [(_, first), (_, second)] = shares;
    let (a, b) = std::thread::scope(|scope| {
        let other = scope.spawn(|| check(second));
        let mine = check(first);
        (mine, other.join().expect("a hashing thread does not panic"))
    });
    Ok(a?.or(b?))
}

fn hash_span(
    file: &File,
    offset: u64,
    len: u64,
    buf: &mut [u8],
    progress: &dyn Progress,
) -> io::Result<String> {
    let mut hasher = Sha256::new();
    let mut pos = offset;
    let end = offset + len;
    while pos < end {
        let n = (end - pos).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], pos)?;
        hasher.update(&buf[..n]);
        progress.advance(n as u64);
        pos += n as u64;
    }
    Ok(hex::encode(hasher.finalize()))
}

#[derive(Debug, Clone)]
pub struct WriteReport {
    pub bytes_written: u64,
    pub elapsed: Duration,
}

impl WriteReport {
    /// Bytes per second.
    pub fn speed(&self) -> f64 {
        self.bytes_written as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// Opens the target for writing. A file is truncated and sized to the image, so its holes
/// read as zeros and it equals the image; a block device is opened exclusively (`O_EXCL`),
/// which the kernel refuses while anything has it mounted or claimed.
pub fn open_target(target: &Target, image_size: u64) -> Result<File, FlashError> {
    let what = || format!("opening {} for writing", target.path.display());
    match target.kind {
        TargetKind::File => {
            let file = File::options()
                .read(true)
                .write(true)
                .create(true)
                .truncate(true)
                .open(&target.path)
                .map_err(io_err(what()))?;
            file.set_len(image_size).map_err(io_err(what()))?;
            Ok(file)
        }
        TargetKind::BlockDevice { .. } => {
            use rustix::fs::{Mode, OFlags};
            let fd = rustix::fs::open(
                &target.path,
                OFlags::RDWR | OFlags::EXCL | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| io_err(what())(e.into()))?;
            Ok(File::from(fd))
        }
    }
}

/// Writes the mapped ranges of a checked image to `out` (see [`open_target`]) while a reader
/// thread reads ahead, syncs, then verifies every range by reading it back from `target`
/// with the page cache dropped, so the bytes come from the device itself.
pub fn write_and_verify(
    checked: &Checked,
    out: &File,
    target: &Path,
    progress: &dyn Progress,
) -> Result<WriteReport, FlashError> {
    let image = File::open(&checked.image)
        .map_err(io_err(format!("opening {}", checked.image.display())))?;
    let bmap = &checked.bmap;
    let started = Instant::now();
    progress.begin("writing", bmap.mapped_bytes());

    // Buffers circulate: reader → writer (filled) → reader (empty), so memory stays bounded.
    let (full_tx, full_rx) = mpsc::sync_channel::<(u64, Vec<u8>)>(3);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..4 {
        let _ = empty_tx.send(vec![0u8; CHUNK]);
    }
    let written = std::thread::scope(|scope| -> Result<u64, FlashError> {
        let reader = scope.spawn(move || -> Result<(), FlashError> {
            for range in &bmap.ranges {
                let (offset, len) = bmap.span(range);
                let mut pos = offset;
                while pos < offset + len {
                    let Ok(mut buf) = empty_rx.recv() else {
                        return Ok(());
                    };
                    let n = (offset + len - pos).min(CHUNK as u64) as usize;
                    buf.resize(n, 0);
                    image
                        .read_exact_at(&mut buf, pos)
                        .map_err(io_err(format!("reading {}", checked.image.display())))?;
                    if full_tx.send((pos, buf)).is_err() {
                        return Ok(()); // the writer stopped; its error is the one to report
                    }
                    pos += n as u64;
                }
            }
            Ok(())
        });
        let mut written = 0u64;
        let mut result = Ok(());
        for (pos, buf) in full_rx {
            if let Err(e) = out.write_all_at(&buf, pos) {
                result = Err(io_err(format!("writing {}", target.display()))(e));
                break;
            }
            written += buf.len() as u64;
            progress.advance(buf.len() as u64);
            let _ = empty_tx.send(buf);
        }
        drop(empty_tx);
        let read = reader.join().expect("the image reader does not panic");
        result?;
        read?;
        Ok(written)
    })?;
    out.sync_all()
        .map_err(io_err(format!("syncing {}", target.display())))?;
    progress.end();

    let readback =
        File::open(target).map_err(io_err(format!("opening {} to verify", target.display())))?;
    for range in &bmap.ranges {
        let (offset, len) = bmap.span(range);
        // Written back by the sync above, these pages are clean and can be dropped.
        let _ = rustix::fs::fadvise(
            &readback,
            offset,
            NonZeroU64::new(len),
            rustix::fs::Advice::DontNeed,
        );
    }
    progress.begin("verifying", bmap.mapped_bytes());
    let bad = hash_ranges(&readback, bmap, progress)
        .map_err(io_err(format!("reading back {}", target.display())))?;
    if let Some(range) = bad {
        return Err(FlashError::Verify {
            target: target.to_owned(),
            first: range.first,
            last: range.last,
        });
    }
    progress.end();
    Ok(WriteReport {
        bytes_written: written,
        elapsed: started.elapsed(),
    })
}

#[derive(Debug, Clone)]
pub struct FlashReport {
    pub target: Target,
    /// Time spent checking the image's mapped blocks before writing.
    pub checked_in: Duration,
    pub write: WriteReport,
    pub image_sha256: String,
    pub image_size: u64,
}

/// Everything `atlasmesh image flash` does, in order; see the module docs. `confirm` is asked
/// only for drives above [`crate::device::CONFIRM_ABOVE`] and returns what the operator typed.
#[allow(clippy::too_many_arguments)]
pub fn flash(
    image: &Path,
    bmap: &Path,
    manifest: &Path,
    device: &Path,
    trust: &Trust,
    view: &SystemView,
    confirm: &mut dyn FnMut(&Target) -> Result<String, FlashError>,
    progress: &dyn Progress,
) -> Result<FlashReport, FlashError> {
    let checked = check_sidecars(image, bmap, manifest, trust)?;
    let target = crate::device::inspect(device, image, checked.manifest.image_size, view)?;
    if target.needs_confirmation() {
        let typed = confirm(&target)?;
        if !target.confirms(&typed) {
            return Err(FlashError::NotConfirmed(format!(
                "{typed:?} is not {}'s {}",
                target.describe(),
                if target.serial.is_some() {
                    "serial"
                } else {
                    "name"
                }
            )));
        }
    }
    let started = Instant::now();
    check_image(&checked, progress)?;
    let checked_in = started.elapsed();
    let out = open_target(&target, checked.manifest.image_size)?;
    let write = write_and_verify(&checked, &out, &target.path, progress)?;
    Ok(FlashReport {
        target,
        checked_in,
        write,
        image_sha256: checked.manifest.image_sha256.clone(),
        image_size: checked.manifest.image_size,
    })
}
