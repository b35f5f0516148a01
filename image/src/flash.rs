//! `atlasmesh image flash`: write an appliance image onto a disk (or into a file) safely.
//!
//! Before a single byte is written: the manifest must be signed by the fleet's release key, the
//! bmap must be the one the manifest names (and pass its own checksum), and the target must
//! pass [`crate::device::inspect`] (not the system disk, not mounted, not holding the image,
//! not read-only, big enough; large drives confirmed by serial). Only mapped ranges are
//! written, every mapped range of the image must match its checksum, and every range is read
//! back after writing and checked against the bmap: from a device itself (never from the page
//! cache); from a regular file as the file system returns it, and from the disk as well when
//! asked ([`FileVerify`]).
//!
//! - A **block device** is written only after the whole image passed its check
//!   ([`check_image`]), with direct I/O while a second thread reads back and compares what
//!   was just written, so verifying overlaps writing; see `write_and_verify`.
//! - A **regular file** target is written into a new file beside it, which replaces it only
//!   after everything passed (see [`Output`]), so what was written can be checked against the
//!   bmap after writing, while the file syncs, and the image is read once; see `write_file`.
//!   What it checks is what any later reader of the file gets. A file target is an image file:
//!   whatever is flashed from it later is checked in full against its signed bmap before a
//!   byte is written, so reading it back from the disk as well (which makes the disk read
//!   everything a second time) is an option, [`FileVerify::OnDisk`], not the default.
//!
//! Both cores work: before a device is written, the image is hashed by two threads, each
//! taking about half of its bytes; into a file, one thread reads the image while another
//! writes, and the check runs on one core while the kernel writes the file back on the other.

use std::fs::{File, Permissions};
use std::io;
use std::num::NonZeroU64;
use std::os::unix::fs::{FileExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use xxhash_rust::xxh3::xxh3_128;

use crate::bmap::{Bmap, BmapError, human_bytes};
use crate::build::read_small;
use crate::device::{DeviceError, SystemView, Target, TargetKind};
use crate::manifest::{ManifestBody, ManifestError, Trust};

/// Pieces the image is read and written in, onto a device.
const CHUNK: usize = 8 << 20;

/// Pieces the image is copied in into a file target. Smaller than [`CHUNK`]: the copy reads
/// them in disk order on one thread, and while the writer takes one piece the kernel's
/// read-ahead is already fetching the next. With 8 MiB pieces, which is as much as the disk
/// reads ahead (`read_ahead_kb` 8192 on the machine measured), every read waited for the disk
/// (docs/benchmarks.md, issue 9: the copy of 1 GiB took 0.6 to 1.1 s against 1.0 to 1.5 s).
const FILE_PIECE: usize = 1 << 20;

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
        "refusing {path}: its file system has {free} free, and the image's mapped blocks need {need}",
        free = human_bytes(*.free),
        need = human_bytes(*.need)
    )]
    NoSpace { path: PathBuf, free: u64, need: u64 },
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

/// Hashes every range of the bmap in `file` and returns the first that does not match. Two
/// threads hash, one per [`shares`] share.
fn hash_ranges(
    file: &File,
    bmap: &Bmap,
    progress: &dyn Progress,
) -> io::Result<Option<crate::bmap::Range>> {
    let check = |indices: Vec<usize>| -> io::Result<Option<crate::bmap::Range>> {
        let mut buf = Aligned::new(CHUNK);
        for i in indices {
            let range = &bmap.ranges[i];
            let (offset, len) = bmap.span(range);
            if hash_span(file, offset, len, buf.bytes_mut(), progress)? != range.sha256 {
                return Ok(Some(range.clone()));
            }
        }
        Ok(None)
    };
    let [first, second] = shares(bmap);
    let (a, b) = std::thread::scope(|scope| {
        let other = scope.spawn(|| check(second));
        let mine = check(first);
        (mine, other.join().expect("a hashing thread does not panic"))
    });
    Ok(a?.or(b?))
}

/// The bmap's ranges (indices) dealt into two shares of about equal bytes, largest first to
/// the less loaded share, each share in disk order. An image's bytes sit mostly in a few
/// large ranges (one per root slot), so this keeps both cores busy.
fn shares(bmap: &Bmap) -> [Vec<usize>; 2] {
    let mut order: Vec<usize> = (0..bmap.ranges.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(bmap.span(&bmap.ranges[i]).1));
    let mut shares: [(u64, Vec<usize>); 2] = [(0, Vec::new()), (0, Vec::new())];
    for i in order {
        let share = if shares[0].0 <= shares[1].0 { 0 } else { 1 };
        shares[share].0 += bmap.span(&bmap.ranges[i]).1;
        shares[share].1.push(i);
    }
    shares.map(|(_, mut indices)| {
        indices.sort_unstable();
        indices
    })
}

/// SHA-256 of `len` bytes of `file` from `offset`, read through `buf`, as hex. The kernel's
/// own read-ahead keeps the disk busy: asking it for 16 or 64 MiB more with
/// `POSIX_FADV_WILLNEED` made a cold check no faster (docs/benchmarks.md, issue 9).
pub(crate) fn hash_span(
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

/// Where the image is being written; see [`open_target`].
#[derive(Debug)]
pub enum Output {
    /// A block device, opened exclusively (`O_EXCL`), which the kernel refuses while anything
    /// has it mounted or claimed.
    Device(File),
    /// A regular file target is written into a new file beside it, which replaces it (a
    /// rename) only once written, synced and read back. A flash that fails or is killed half
    /// way leaves the old file as it was, never a file that is half one image and half another.
    /// (A killed flash cannot remove its staged file; the next flash onto the same target
    /// does, and names it in `abandoned`.)
    File {
        staged: tempfile::NamedTempFile,
        target: PathBuf,
        abandoned: Vec<PathBuf>,
    },
}

impl Output {
    pub fn file(&self) -> &File {
        match self {
            Output::Device(file) => file,
            Output::File { staged, .. } => staged.as_file(),
        }
    }

    /// Puts a written and verified file in place of the target, durably (the directory is
    /// synced too). Nothing to do for a device.
    pub fn commit(self) -> Result<(), FlashError> {
        let Output::File { staged, target, .. } = self else {
            return Ok(());
        };
        let what = || format!("replacing {}", target.display());
        staged
            .persist(&target)
            .map_err(|e| io_err(what())(e.error))?;
        File::open(directory_of(&target))
            .and_then(|d| d.sync_all())
            .map_err(io_err(what()))
    }
}

/// Removes the files in `dir` named `prefix…` that no process holds a `flock` on: staged
/// files of flashes that were killed. Returns the paths removed.
fn remove_abandoned(dir: &Path, prefix: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(prefix))
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| {
            let path = e.path();
            let file = File::open(&path).ok()?;
            try_hold(&file).ok()?;
            std::fs::remove_file(&path).ok()?;
            Some(path)
        })
        .collect()
}

/// Takes a staged file's lock, which a flash holds until it ends, however it ends; fails at
/// once if another process holds it.
fn try_hold(file: &File) -> io::Result<()> {
    use rustix::fs::{FlockOperation, flock};
    flock(file, FlockOperation::NonBlockingLockExclusive).map_err(io::Error::from)
}

/// The directory holding `path` (`.` for a bare file name).
fn directory_of(path: &Path) -> &Path {
    match path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("."),
    }
}

/// Opens the target for writing: a block device itself, or for a regular file a temporary
/// file in the same directory (hidden, named `.NAME.atlasmesh-…`) with the image's size, so
/// its holes read as zeros, and the old file's permissions (0644 for a new one). A symbolic
/// link is followed: the file it points to is the one replaced.
///
/// A file target is refused when its file system has less room than the image's mapped
/// blocks (the replacement is sparse, and the old file stays until it is replaced): better
/// said at once than found out halfway by a write failing with `ENOSPC`.
///
/// A staged file holds an exclusive `flock` for as long as its flash runs, however that
/// ends; staged files of the same target that nobody holds were left by a flash that was
/// killed, and are removed first (see [`Output::File`]).
pub fn open_target(target: &Target, bmap: &Bmap) -> Result<Output, FlashError> {
    let what = || format!("opening {} for writing", target.path.display());
    match target.kind {
        TargetKind::File => {
            let path = std::fs::canonicalize(&target.path).unwrap_or_else(|_| target.path.clone());
            let dir = directory_of(&path);
            let prefix = format!(
                ".{}.atlasmesh-",
                path.file_name().unwrap_or_default().to_string_lossy()
            );
            let abandoned = remove_abandoned(dir, &prefix);
            let fs = rustix::fs::statvfs(dir).map_err(|e| io_err(what())(e.into()))?;
            let (free, need) = (fs.f_bavail.saturating_mul(fs.f_frsize), bmap.mapped_bytes());
            if free < need {
                return Err(FlashError::NoSpace { path, free, need });
            }
            let permissions = std::fs::metadata(&path)
                .map_or_else(|_| Permissions::from_mode(0o644), |m| m.permissions());
            let staged = tempfile::Builder::new()
                .prefix(&prefix)
                .permissions(permissions)
                .tempfile_in(dir)
                .map_err(io_err(what()))?;
            try_hold(staged.as_file()).map_err(io_err(what()))?;
            staged
                .as_file()
                .set_len(bmap.image_size)
                .map_err(io_err(what()))?;
            Ok(Output::File {
                staged,
                target: path,
                abandoned,
            })
        }
        TargetKind::BlockDevice { .. } => {
            use rustix::fs::{Mode, OFlags};
            let fd = rustix::fs::open(
                &target.path,
                OFlags::RDWR | OFlags::EXCL | OFlags::CLOEXEC,
                Mode::empty(),
            )
            .map_err(|e| io_err(what())(e.into()))?;
            Ok(Output::Device(File::from(fd)))
        }
    }
}

/// One piece of the write: at most [`CHUNK`] (a file: [`FILE_PIECE`]) bytes of one bmap range.
#[derive(Debug, Clone, Copy)]
struct Piece {
    range: usize,
    offset: u64,
    len: usize,
    /// The range's last piece: its checksum can be compared once this is read back.
    last: bool,
}

impl Piece {
    /// Adds `bytes`, this piece's, to its range's running SHA-256; at the range's last piece,
    /// checks the hash against the bmap (and starts `sha` afresh for the next range).
    fn hash(&self, sha: &mut Sha256, bytes: &[u8], checked: &Checked) -> Result<(), FlashError> {
        sha.update(bytes);
        let range = &checked.bmap.ranges[self.range];
        if self.last && hex::encode(sha.finalize_reset()) != range.sha256 {
            return Err(FlashError::ImageChecksum {
                path: checked.image.clone(),
                first: range.first,
                last: range.last,
            });
        }
        Ok(())
    }

    /// The error for this piece's range when what was read back from `target` differs.
    fn verify_failed(&self, bmap: &Bmap, target: &Path) -> FlashError {
        let range = &bmap.ranges[self.range];
        FlashError::Verify {
            target: target.to_owned(),
            first: range.first,
            last: range.last,
        }
    }
}

/// The bmap's ranges cut into pieces of at most `size` bytes, in disk order.
fn pieces(bmap: &Bmap, size: usize) -> Vec<Piece> {
    let mut pieces = Vec::new();
    for (range, r) in bmap.ranges.iter().enumerate() {
        let (offset, len) = bmap.span(r);
        let mut pos = offset;
        while pos < offset + len {
            let n = (offset + len - pos).min(size as u64);
            pieces.push(Piece {
                range,
                offset: pos,
                len: n as usize,
                last: pos + n == offset + len,
            });
            pos += n;
        }
    }
    pieces
}

/// Direct I/O needs buffers, offsets and lengths aligned to the device's logical block size;
/// 4096 is the largest in use, so it serves every device.
const DIRECT_ALIGN: usize = 4096;

/// A buffer whose bytes start on a [`DIRECT_ALIGN`] boundary. Moving it moves only the
/// `Vec`'s handle, so the alignment holds wherever it travels.
struct Aligned {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl Aligned {
    fn new(capacity: usize) -> Self {
        let raw = vec![0u8; capacity + DIRECT_ALIGN];
        let start = raw.as_ptr().align_offset(DIRECT_ALIGN);
        Self {
            raw,
            start,
            len: capacity,
        }
    }
    fn set_len(&mut self, len: usize) {
        assert!(self.start + len <= self.raw.len());
        self.len = len;
    }
    fn bytes(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}

/// Whether every mapped range starts and ends on a [`DIRECT_ALIGN`] boundary, as direct I/O
/// needs. An image whose size is not a multiple of 4096 ends in a short range and is written
/// through the page cache instead.
fn aligned(bmap: &Bmap) -> bool {
    let align = DIRECT_ALIGN as u64;
    bmap.ranges.iter().all(|r| {
        let (offset, len) = bmap.span(r);
        offset % align == 0 && len % align == 0
    })
}

/// `path` opened for direct reads, which skip the page cache, where the file system or device
/// allows it.
fn open_direct(path: &Path) -> Option<File> {
    use rustix::fs::{Mode, OFlags};
    rustix::fs::open(
        path,
        OFlags::RDONLY | OFlags::DIRECT | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .ok()
    .map(File::from)
}

/// For a block device whose ranges are aligned: turns `out` into a direct-I/O descriptor and
/// opens the device again for direct reads. `None` otherwise, and `out` is left as it was.
///
/// Regular files are not written directly (see [`write_file`]): direct writes into a new
/// sparse file make the file system allocate piece by piece, while one sync at the end lets
/// it allocate whole extents (measured on ext4: the write took half as long again).
fn go_direct(out: &File, target: &Target, bmap: &Bmap) -> Option<File> {
    use rustix::fs::OFlags;
    if !matches!(target.kind, TargetKind::BlockDevice { .. }) || !aligned(bmap) {
        return None;
    }
    let readback = open_direct(&target.path)?;
    let flags = rustix::fs::fcntl_getfl(out).ok()?;
    rustix::fs::fcntl_setfl(out, flags | OFlags::DIRECT).ok()?;
    Some(readback)
}

/// Writes the mapped ranges of an image checked before (by [`check_image`]) onto a block
/// device, `out` (an [`Output::Device`]), and verifies every range by reading it back from
/// the device itself, never from the page cache. (A regular file target is written by
/// [`write_file`] instead.)
///
/// A reader thread keeps the writer fed from the image and hashes every range again as it
/// reads it, so an image changed since its check is caught too. With `readback` (from
/// [`go_direct`]: `out` then writes directly, bypassing the page cache) a verifying thread
/// reads back each piece while the next is written and compares it with the bytes written.
/// Hashing in the reader and comparing in the verifier keeps either thread ahead of the disk:
/// with the verifier hashing the read-back itself, one core's SHA-256 held the whole write
/// back (measured: writing, syncing and verifying 1 GiB took 1.6 to 1.9 s against 1.2 s
/// without verifying). After the final sync the first block of every piece is read again: a
/// drive that wraps writes beyond its real capacity onto earlier blocks (counterfeit media)
/// shows there, which checking each piece right after it was written would miss.
///
/// Measured and not kept (docs/benchmarks.md): writing everything first and reading it all
/// back after the sync, as Etcher validates (on the direct-I/O loop, median 4.81 s against
/// 3.68 s: reading back while writing overlaps the two).
///
/// Without `readback` (an image whose ranges are not aligned for direct I/O) the ranges are
/// written through the page cache, synced, and read back with [`verify_cold`].
fn write_and_verify(
    checked: &Checked,
    out: &File,
    readback: Option<&File>,
    target: &Path,
    progress: &dyn Progress,
) -> Result<WriteReport, FlashError> {
    let image = File::open(&checked.image)
        .map_err(io_err(format!("opening {}", checked.image.display())))?;
    let bmap = &checked.bmap;
    let pieces = pieces(bmap, CHUNK);
    let started = Instant::now();
    progress.begin(
        if readback.is_some() {
            "writing and verifying"
        } else {
            "writing"
        },
        bmap.mapped_bytes(),
    );

    // Buffers circulate: reader → writer (filled) → verifier (written) → reader (empty), so
    // memory stays bounded.
    let (full_tx, full_rx) = mpsc::sync_channel::<(usize, Aligned)>(3);
    let (empty_tx, empty_rx) = mpsc::channel::<Aligned>();
    for _ in 0..6 {
        let _ = empty_tx.send(Aligned::new(CHUNK));
    }
    // Written pieces, in order, with the bytes written, for the verifier.
    let (done_tx, done_rx) = mpsc::channel::<(usize, Aligned)>();
    let (written, samples) = std::thread::scope(|scope| -> Result<_, FlashError> {
        let pieces = &pieces;
        let sample = readback.is_some();
        // The reader hashes each range again as it reads it: the image was checked before,
        // and this catches it being changed since. The bytes written are these bytes, so the
        // verifier need only compare what it reads back with them.
        let reader = scope.spawn(move || -> Result<Vec<Vec<u8>>, FlashError> {
            // The first block of each piece, for the direct path's check after the sync.
            let mut samples = Vec::new();
            let mut hasher = Sha256::new();
            for (i, piece) in pieces.iter().enumerate() {
                let Ok(mut buf) = empty_rx.recv() else {
                    break;
                };
                buf.set_len(piece.len);
                image
                    .read_exact_at(buf.bytes_mut(), piece.offset)
                    .map_err(io_err(format!("reading {}", checked.image.display())))?;
                piece.hash(&mut hasher, buf.bytes(), checked)?;
                if sample {
                    samples.push(buf.bytes()[..piece.len.min(DIRECT_ALIGN)].to_vec());
                }
                if full_tx.send((i, buf)).is_err() {
                    break; // the writer stopped; its error is the one to report
                }
            }
            Ok(samples)
        });
        // No flushing while writing: direct writes leave nothing in the page cache, so the
        // one sync at the end only drains the drive's own cache. Flushing after every piece
        // (as bmaptool does every 6 MiB of its buffered writes) was measured no faster on a
        // buffered loop device and slower on one doing direct I/O, where each flush is an
        // fsync of the backing file (docs/benchmarks.md, issue 9).
        let verifier = readback.map(|readback| {
            let empty_tx = empty_tx.clone();
            scope.spawn(move || -> Result<(), FlashError> {
                let mut back = Aligned::new(CHUNK);
                for (i, buf) in done_rx {
                    let piece = &pieces[i];
                    back.set_len(piece.len);
                    readback
                        .read_exact_at(back.bytes_mut(), piece.offset)
                        .map_err(io_err(format!("reading back {}", target.display())))?;
                    if back.bytes() != buf.bytes() {
                        return Err(piece.verify_failed(bmap, target));
                    }
                    progress.advance(piece.len as u64);
                    let _ = empty_tx.send(buf);
                }
                Ok(())
            })
        });
        let mut written = 0u64;
        let mut result = Ok(());
        for (i, buf) in full_rx {
            if let Err(e) = out.write_all_at(buf.bytes(), pieces[i].offset) {
                result = Err(io_err(format!("writing {}", target.display()))(e));
                break;
            }
            written += buf.len as u64;
            if readback.is_none() {
                progress.advance(buf.len as u64);
                let _ = empty_tx.send(buf);
            } else if done_tx.send((i, buf)).is_err() {
                break; // the verifier failed; its error is the one to report
            }
        }
        drop(empty_tx);
        drop(done_tx);
        let read = reader.join().expect("the image reader does not panic");
        let verified = verifier.map(|v| v.join().expect("the verifier does not panic"));
        if let Some(verified) = verified {
            verified?;
        }
        result?;
        Ok((written, read?))
    })?;
    out.sync_all()
        .map_err(io_err(format!("syncing {}", target.display())))?;
    progress.end();

    if let Some(readback) = readback {
        let mut block = Aligned::new(DIRECT_ALIGN);
        for (piece, sample) in pieces.iter().zip(&samples) {
            readback
                .read_exact_at(block.bytes_mut(), piece.offset)
                .map_err(io_err(format!("reading back {}", target.display())))?;
            if block.bytes()[..sample.len()] != sample[..] {
                return Err(piece.verify_failed(bmap, target));
            }
        }
    } else {
        verify_cold(out, bmap, target, progress)?;
    }
    Ok(WriteReport {
        bytes_written: written,
        elapsed: started.elapsed(),
    })
}

/// How a regular file target is verified after writing. A device is always read back from the
/// device itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum FileVerify {
    /// Every written range is read back from the file (as the file system returns it, while
    /// the file syncs) and its SHA-256 checked against the bmap.
    #[default]
    Written,
    /// That, and after the sync every range is read back again from the disk, not the page
    /// cache, and compared with what was checked: catches a disk that loses or corrupts
    /// writes without reporting an error, at the cost of reading everything again.
    OnDisk,
}

/// Writes a checked image's mapped ranges into a staged regular file (an [`Output::File`]),
/// checks what was written against the bmap and, with [`FileVerify::OnDisk`], verifies it on
/// disk. The target itself is replaced only by [`Output::commit`], after everything passed,
/// so a damaged image still leaves it untouched.
///
/// Three steps (the third only with [`FileVerify::OnDisk`]):
/// 1. **copy** the mapped pieces ([`FILE_PIECE`] bytes each) from the image into the staged
///    file through the page cache, without hashing ([`copy_pieces`]): one thread reads them
///    in disk order and hands them to this one, which writes them, so the disk reads ahead
///    while the pieces are written and the copy takes about as long as reading the image;
/// 2. **check while the file syncs**: one thread syncs the file while another reads what was
///    written back from the page cache (the bytes going to disk), checks each range's SHA-256
///    against the bmap ([`FlashError::ImageChecksum`] otherwise) and notes an XXH3-128 digest
///    of every piece ([`check_written`]). The bytes checked are the bytes written, so an image
///    damaged or changed during the flash cannot slip through;
/// 3. **verify**: the file's cached pages are dropped and every piece is read back from the
///    disk, on two threads, and compared with its digest ([`verify_pieces`]).
///
/// Hashing while the disk syncs takes SHA-256 off the disk's path: with it in the copy, both
/// cores hashed while the disk waited, then the disk wrote while the cores waited, then the
/// read-back hashed SHA-256 again (measured, docs/benchmarks.md). The read-back compares a
/// digest many times cheaper than SHA-256, so it goes as fast as the disk reads.
///
/// Measured and not kept (docs/benchmarks.md, issue 9): copying on two threads, each reading
/// 8 MiB pieces of its half of the ranges (every read waited for the disk); hashing in the
/// copy, or in a thread checking right behind the writer (it took the core the copy needed);
/// reading back with direct I/O while writing (on ext4 a direct read holds the inode's lock,
/// which every buffered write needs) or while the final sync runs (this disk serves reads
/// slowly while it writes); starting writeback of each piece as soon as it is written, by
/// dropping it from the cache (the check then read it back from the disk) or by syncing in a
/// loop (reads slow down while the disk writes).
fn write_file(
    checked: &Checked,
    out: &File,
    target: &Path,
    verify: FileVerify,
    progress: &dyn Progress,
) -> Result<WriteReport, FlashError> {
    let bmap = &checked.bmap;
    let pieces = pieces(bmap, FILE_PIECE);
    let started = Instant::now();

    progress.begin("writing", bmap.mapped_bytes());
    copy_pieces(checked, &pieces, out, target, progress)?;
    progress.end();

    progress.begin("checking while syncing", bmap.mapped_bytes());
    let digests = std::thread::scope(|scope| {
        let sync = scope.spawn(|| out.sync_all());
        let digests = check_written(checked, out, target, &pieces, progress);
        let synced = sync.join().expect("the syncing thread does not panic");
        // A damaged image is the error to report, whatever the sync said.
        let digests = digests?;
        synced.map_err(io_err(format!("syncing {}", target.display())))?;
        Ok::<_, FlashError>(digests)
    })?;
    progress.end();

    if verify == FileVerify::OnDisk {
        verify_pieces(out, bmap, target, &pieces, &digests, progress)?;
    }
    Ok(WriteReport {
        bytes_written: bmap.mapped_bytes(),
        elapsed: started.elapsed(),
    })
}

/// [`write_file`]'s copy: a reader thread reads `pieces` from the image in order and passes
/// them over a short queue to this thread, which writes them into `out`. The buffers go back
/// to the reader once written, so memory stays bounded (a few [`FILE_PIECE`]s). The first
/// error is returned: the image's when it cannot be read, `out`'s when it cannot be written.
fn copy_pieces(
    checked: &Checked,
    pieces: &[Piece],
    out: &File,
    target: &Path,
    progress: &dyn Progress,
) -> Result<(), FlashError> {
    let image = File::open(&checked.image)
        .map_err(io_err(format!("opening {}", checked.image.display())))?;
    let (full_tx, full_rx) = mpsc::sync_channel::<(&Piece, Vec<u8>)>(3);
    let (empty_tx, empty_rx) = mpsc::channel::<Vec<u8>>();
    for _ in 0..5 {
        let _ = empty_tx.send(vec![0u8; FILE_PIECE]);
    }
    std::thread::scope(|scope| {
        let reader = scope.spawn(move || -> Result<(), FlashError> {
            for piece in pieces {
                let Ok(mut buf) = empty_rx.recv() else {
                    break; // the writer stopped; its error is the one to report
                };
                image
                    .read_exact_at(&mut buf[..piece.len], piece.offset)
                    .map_err(io_err(format!("reading {}", checked.image.display())))?;
                if full_tx.send((piece, buf)).is_err() {
                    break;
                }
            }
            Ok(())
        });
        let mut written = Ok(());
        for (piece, buf) in full_rx {
            if let Err(e) = out.write_all_at(&buf[..piece.len], piece.offset) {
                written = Err(io_err(format!("writing {}", target.display()))(e));
                break;
            }
            progress.advance(piece.len as u64);
            let _ = empty_tx.send(buf);
        }
        drop(empty_tx);
        let read = reader.join().expect("the image reader does not panic");
        written.and(read)
    })
}

/// `pieces` cut in two runs of about the same number of bytes, one for each core.
fn halves(pieces: &[Piece]) -> [&[Piece]; 2] {
    let total: u64 = pieces.iter().map(|p| p.len as u64).sum();
    let mut bytes = 0u64;
    let mid = pieces
        .iter()
        .position(|p| {
            bytes += p.len as u64;
            bytes > total / 2
        })
        .unwrap_or(pieces.len());
    let (first, second) = pieces.split_at(mid);
    [first, second]
}

/// Runs `work` for share 0 and share 1 at once, one thread each. `stop` is set as soon as
/// one fails, so the other can give up instead of going on; the first error is returned.
fn on_both_cores<T: Send>(
    work: impl Fn(usize, &AtomicBool) -> Result<T, FlashError> + Sync,
) -> Result<[T; 2], FlashError> {
    let stop = AtomicBool::new(false);
    let run = |share: usize| {
        let result = work(share, &stop);
        if result.is_err() {
            stop.store(true, Ordering::Relaxed);
        }
        result
    };
    let (a, b) = std::thread::scope(|scope| {
        let other = scope.spawn(|| run(1));
        let mine = run(0);
        (
            mine,
            other.join().expect("a flashing thread does not panic"),
        )
    });
    Ok([a?, b?])
}

/// [`write_file`]'s check: reads every piece of the written (staged) file, checks each
/// range's SHA-256 against the bmap, and returns an XXH3-128 digest of every piece, in
/// order, for [`verify_pieces`]. One thread: it runs while the file syncs, and the kernel's
/// writeback needs the other core (with both cores hashing, the sync took 0.1 to 0.2 s
/// longer).
fn check_written(
    checked: &Checked,
    out: &File,
    target: &Path,
    pieces: &[Piece],
    progress: &dyn Progress,
) -> Result<Vec<u128>, FlashError> {
    let mut buf = vec![0u8; FILE_PIECE];
    let mut sha = Sha256::new();
    let mut digests = Vec::with_capacity(pieces.len());
    for piece in pieces {
        let buf = &mut buf[..piece.len];
        out.read_exact_at(buf, piece.offset)
            .map_err(io_err(format!("reading {}", target.display())))?;
        digests.push(xxh3_128(buf));
        progress.advance(piece.len as u64);
        piece.hash(&mut sha, buf, checked)?;
    }
    Ok(digests)
}

/// Reads every piece of a synced `out` back from the disk, not the page cache, and compares
/// it with its digest from [`check_written`]; two threads, each reading one of the
/// [`halves`] in order.
fn verify_pieces(
    out: &File,
    bmap: &Bmap,
    target: &Path,
    pieces: &[Piece],
    digests: &[u128],
    progress: &dyn Progress,
) -> Result<(), FlashError> {
    drop_cached(out, bmap);
    progress.begin("verifying", bmap.mapped_bytes());
    let halves = halves(pieces);
    let (first, second) = digests.split_at(halves[0].len());
    let digest_halves = [first, second];
    on_both_cores(|half, stop| {
        let mut buf = vec![0u8; FILE_PIECE];
        for (piece, digest) in halves[half].iter().zip(digest_halves[half]) {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            let buf = &mut buf[..piece.len];
            out.read_exact_at(buf, piece.offset)
                .map_err(io_err(format!("reading back {}", target.display())))?;
            if xxh3_128(buf) != *digest {
                return Err(piece.verify_failed(bmap, target));
            }
            progress.advance(piece.len as u64);
        }
        Ok(())
    })?;
    progress.end();
    Ok(())
}

/// Drops the cached pages of `out`'s mapped ranges, so they are read again from the disk.
/// Written back by a sync before, they are clean and can be dropped.
fn drop_cached(out: &File, bmap: &Bmap) {
    for range in &bmap.ranges {
        let (offset, len) = bmap.span(range);
        let _ = rustix::fs::fadvise(
            out,
            offset,
            NonZeroU64::new(len),
            rustix::fs::Advice::DontNeed,
        );
    }
}

/// Reads every range of a synced `out` back from the disk, not the page cache, and checks it
/// against the bmap: the verification for a block device whose ranges are not aligned for
/// direct I/O.
fn verify_cold(
    out: &File,
    bmap: &Bmap,
    target: &Path,
    progress: &dyn Progress,
) -> Result<(), FlashError> {
    drop_cached(out, bmap);
    progress.begin("verifying", bmap.mapped_bytes());
    let bad = hash_ranges(out, bmap, progress)
        .map_err(io_err(format!("reading back {}", target.display())))?;
    if let Some(range) = bad {
        return Err(FlashError::Verify {
            target: target.to_owned(),
            first: range.first,
            last: range.last,
        });
    }
    progress.end();
    Ok(())
}

#[derive(Debug, Clone)]
pub struct FlashReport {
    pub target: Target,
    /// Time spent checking the image's mapped blocks before writing; `None` for a file
    /// target, whose written bytes are checked while they sync (see the module docs).
    pub checked_in: Option<Duration>,
    /// Staged files left beside a file target by killed flashes, removed (see [`open_target`]).
    pub abandoned: Vec<PathBuf>,
    /// Whether every range was read back from the disk, not the page cache: always for a
    /// device, for a file with [`FileVerify::OnDisk`].
    pub read_back_from_disk: bool,
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
    file_verify: FileVerify,
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
    // A device is checked before a byte is written to it; a file target's replacement is
    // written beside it and checked before it replaces anything (see [`write_file`]).
    let checked_in = match target.kind {
        TargetKind::BlockDevice { .. } => {
            let started = Instant::now();
            check_image(&checked, progress)?;
            Some(started.elapsed())
        }
        TargetKind::File => None,
    };
    let out = open_target(&target, &checked.bmap)?;
    let (write, abandoned) = match &out {
        Output::Device(device) => {
            let readback = go_direct(device, &target, &checked.bmap);
            let write =
                write_and_verify(&checked, device, readback.as_ref(), &target.path, progress)?;
            (write, Vec::new())
        }
        Output::File {
            staged, abandoned, ..
        } => {
            let write = write_file(
                &checked,
                staged.as_file(),
                &target.path,
                file_verify,
                progress,
            )?;
            (write, abandoned.clone())
        }
    };
    out.commit()?;
    let read_back_from_disk = match target.kind {
        TargetKind::BlockDevice { .. } => true,
        TargetKind::File => file_verify == FileVerify::OnDisk,
    };
    Ok(FlashReport {
        target,
        checked_in,
        abandoned,
        read_back_from_disk,
        write,
        image_sha256: checked.manifest.image_sha256.clone(),
        image_size: checked.manifest.image_size,
    })
}

#[cfg(test)]
mod tests {
    //! `write_file` against a regular file and, as root, `write_and_verify` against a loop
    //! device (direct path with the verifying thread). The image checks are proven by handing
    //! them a bmap whose checksum for one range disagrees with the image; the read-back
    //! checks by a bmap that disagrees with what is on disk (a file) or by reading back from
    //! a copy with one byte changed (the device), as a disk that corrupts or drops writes
    //! would make the read-back disagree.
    use super::*;
    use crate::bmap::Range;
    use std::process::Command;

    const BLOCK: u64 = 4096;

    fn sha(bytes: &[u8]) -> String {
        hex::encode(Sha256::digest(bytes))
    }

    /// A 40 MiB image with three mapped ranges, the middle one longer than a piece.
    fn image(dir: &Path) -> Checked {
        let size = 40 << 20;
        let mut bytes = vec![0u8; size as usize];
        let mut x: u64 = 0x2545_F491_4F6C_DD1D;
        let spans = [(0, 3), (256, 256 + 2600), (8000, 8191)];
        let mut ranges = Vec::new();
        for (first, last) in spans {
            let (start, end) = ((first * BLOCK) as usize, ((last + 1) * BLOCK) as usize);
            for b in bytes[start..end].chunks_exact_mut(8) {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                b.copy_from_slice(&x.to_le_bytes());
            }
            ranges.push(Range {
                first,
                last,
                sha256: sha(&bytes[start..end]),
            });
        }
        let path = dir.join("depot.img");
        std::fs::write(&path, &bytes).unwrap();
        Checked {
            image: path,
            bmap: Bmap {
                image_size: size,
                block_size: BLOCK,
                ranges,
            },
            manifest: ManifestBody {
                kind: "atlasmesh-image".into(),
                image_size: size,
                image_sha256: sha(&bytes),
                bmap_sha256: String::new(),
                mapped_bytes: 0,
                created: String::new(),
                partitions: Vec::new(),
            },
        }
    }

    /// Every mapped byte of `target` equals the image's.
    fn assert_written(checked: &Checked, target: &Path) {
        let image = std::fs::read(&checked.image).unwrap();
        let written = File::open(target).unwrap();
        for range in &checked.bmap.ranges {
            let (offset, len) = checked.bmap.span(range);
            let mut got = vec![0u8; len as usize];
            written.read_exact_at(&mut got, offset).unwrap();
            assert!(got == image[offset as usize..(offset + len) as usize]);
        }
    }

    /// `checked` with the middle range's checksum changed (blocks 256-2856).
    fn wrong(checked: &Checked) -> Checked {
        let mut wrong = checked.clone();
        wrong.bmap.ranges[1].sha256 = sha(b"not these bytes");
        wrong
    }

    #[test]
    fn a_file_target_is_checked_and_verified_and_replaced_only_when_all_passed() {
        let dir = tempfile::tempdir().unwrap();
        let checked = image(dir.path());
        let target = Target {
            path: dir.path().join("target.img"),
            kind: TargetKind::File,
            size: 0,
            model: None,
            serial: None,
        };
        let before = vec![0x77; 1 << 20];
        std::fs::write(&target.path, &before).unwrap();

        // An image whose middle range does not match the bmap: named, and the file it would
        // have replaced is as it was, with no staged file left behind.
        let out = open_target(&target, &checked.bmap).unwrap();
        match write_file(
            &wrong(&checked),
            out.file(),
            &target.path,
            FileVerify::Written,
            &Quiet,
        ) {
            Err(FlashError::ImageChecksum { first, last, .. }) => {
                assert_eq!((first, last), (256, 2856))
            }
            other => panic!("expected a damaged image, got {other:?}"),
        }
        drop(out);
        assert!(std::fs::read(&target.path).unwrap() == before);
        let mut names: Vec<String> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        assert_eq!(names, ["depot.img", "target.img"]);

        // Intact: written, verified (either way), and equal to the image on every mapped byte.
        for verify in [FileVerify::Written, FileVerify::OnDisk] {
            std::fs::write(&target.path, &before).unwrap();
            let out = open_target(&target, &checked.bmap).unwrap();
            let report = write_file(&checked, out.file(), &target.path, verify, &Quiet).unwrap();
            assert_eq!(report.bytes_written, checked.bmap.mapped_bytes());
            out.commit().unwrap();
            assert_written(&checked, &target.path);
        }

        // The read-back names a range whose bytes on disk differ from those checked, as a disk
        // that corrupts or drops writes would make them: one byte of the middle range is
        // changed between the check and the read-back. The SHA-256 read-back (for a device
        // not written directly) names it too.
        let file = File::options()
            .write(true)
            .read(true)
            .open(&target.path)
            .unwrap();
        let pieces = pieces(&checked.bmap, FILE_PIECE);
        let digests = check_written(&checked, &file, &target.path, &pieces, &Quiet).unwrap();
        let verify = || {
            verify_pieces(
                &file,
                &checked.bmap,
                &target.path,
                &pieces,
                &digests,
                &Quiet,
            )
        };
        verify().unwrap();
        let mut byte = [0u8];
        file.read_exact_at(&mut byte, 300 * BLOCK).unwrap();
        file.write_all_at(&[byte[0] ^ 0xff], 300 * BLOCK).unwrap();
        file.sync_all().unwrap();
        match verify() {
            Err(FlashError::Verify { first, last, .. }) => assert_eq!((first, last), (256, 2856)),
            other => panic!("expected a verification failure, got {other:?}"),
        }
        match verify_cold(&file, &checked.bmap, &target.path, &Quiet) {
            Err(FlashError::Verify { first, last, .. }) => assert_eq!((first, last), (256, 2856)),
            other => panic!("expected a verification failure, got {other:?}"),
        }
    }

    #[test]
    fn the_read_back_halves_cover_every_piece_once_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let checked = image(dir.path());
        let all = pieces(&checked.bmap, FILE_PIECE);
        let [first, second] = halves(&all);
        assert!(!first.is_empty() && !second.is_empty());
        let offsets: Vec<u64> = first.iter().chain(second).map(|p| p.offset).collect();
        assert_eq!(offsets, all.iter().map(|p| p.offset).collect::<Vec<_>>());
        let bytes = |half: &[Piece]| half.iter().map(|p| p.len as u64).sum::<u64>();
        assert!(bytes(first).abs_diff(bytes(second)) <= FILE_PIECE as u64);
        assert!(halves(&[]).iter().all(|half| half.is_empty()));
    }

    #[test]
    fn a_block_device_is_written_directly_and_a_bad_read_back_is_caught() {
        let dir = tempfile::tempdir().unwrap();
        let checked = image(dir.path());
        let backing = dir.path().join("disk.img");
        std::fs::write(&backing, vec![0x5a; 48 << 20]).unwrap();
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(&backing)
            .output()
            .unwrap();
        if !out.status.success() {
            // Loop devices need root (as CI has).
            eprintln!("skipped: losetup: {}", String::from_utf8_lossy(&out.stderr));
            return;
        }
        let path = PathBuf::from(String::from_utf8(out.stdout).unwrap().trim());
        struct Detach<'a>(&'a Path);
        impl Drop for Detach<'_> {
            fn drop(&mut self) {
                let _ = Command::new("losetup").arg("-d").arg(self.0).status();
            }
        }
        let _detach = Detach(&path);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let target = Target {
            path: path.clone(),
            kind: TargetKind::BlockDevice { name },
            size: 48 << 20,
            model: None,
            serial: None,
        };
        // The direct path is the one under test.
        let out = open_target(&target, &checked.bmap).unwrap();
        let readback = go_direct(out.file(), &target, &checked.bmap).expect("direct I/O");

        // Intact: written, verified, and equal to the image on every mapped byte.
        let report =
            write_and_verify(&checked, out.file(), Some(&readback), &path, &Quiet).unwrap();
        assert_eq!(report.bytes_written, checked.bmap.mapped_bytes());
        assert_written(&checked, &path);

        // An image that no longer matches the bmap it was checked against (changed since the
        // check): the middle range is named.
        match write_and_verify(&wrong(&checked), out.file(), Some(&readback), &path, &Quiet) {
            Err(FlashError::ImageChecksum { first, last, .. }) => {
                assert_eq!((first, last), (256, 2856))
            }
            other => panic!("expected a changed image, got {other:?}"),
        }

        // A device that returns other bytes than were written to it: read back through a
        // copy of the image with one byte of the middle range changed, which is what a disk
        // that corrupts or drops writes would return. The middle range is named.
        let mut other = std::fs::read(&checked.image).unwrap();
        other[(300 * BLOCK) as usize] ^= 0xff;
        let other_path = dir.path().join("what-the-disk-returns.img");
        std::fs::write(&other_path, &other).unwrap();
        let lying = open_direct(&other_path).unwrap_or_else(|| File::open(&other_path).unwrap());
        match write_and_verify(&checked, out.file(), Some(&lying), &path, &Quiet) {
            Err(FlashError::Verify { first, last, .. }) => assert_eq!((first, last), (256, 2856)),
            other => panic!("expected a verification failure, got {other:?}"),
        }
    }
}
