//! `atlasmesh image install`: the appliance updates itself into its inactive root slot.
//!
//! The bundle is a built appliance image with its `.bmap` and `.manifest` beside it, checked
//! exactly as `flash` checks it (signature by the fleet's release key against the fleet root,
//! signed bmap, range checksums). The image's partition for the target slot (`root_b` for
//! slot B) becomes that slot: both hold the same tree, and each carries its own slot's file
//! system label (what GRUB searches for) and its own UUID.
//!
//! Order matters, so that no power cut can leave a slot that boots half written:
//! 0. the running slot must be good (a slot still on its trial could be the only one left
//!    bootable), and the target big enough;
//! 1. the inactive slot is disabled in the boot environment (`OK=0`, `TRY=0`);
//! 2. the partition's mapped ranges are written and its holes zeroed;
//! 3. the whole slot is read back and its SHA-256 compared with the signed partition hash;
//! 4. only then is it armed for one trial boot.

use std::fs::File;
use std::io;
use std::num::NonZeroU64;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::Instant;

use crate::bootenv::{BootEnv, BootEnvError, Slot};
use crate::build::sidecars;
use crate::flash::{Checked, FlashError, Progress, check_image, check_sidecars, hash_span};
use crate::layout::Role;
use crate::manifest::Trust;

#[derive(Debug, thiserror::Error)]
pub enum InstallError {
    #[error(transparent)]
    Bundle(#[from] FlashError),
    #[error(transparent)]
    BootEnv(#[from] BootEnvError),
    #[error("the bundle's manifest has no root_a and root_b partitions")]
    NoRoot,
    #[error(
        "slot {0}, which is running, is not marked good yet: confirm it (the depot does after its self-test, or `atlasmesh image mark-good`) before installing into the other slot, or it could be left with no good slot"
    )]
    RunningNotGood(Slot),
    #[error("the running system did not say which slot it booted (no atlasmesh.slot= in {0})")]
    UnknownSlot(PathBuf),
    #[error("slot {slot} ({path}) holds the running system's root file system")]
    SlotInUse { slot: Slot, path: PathBuf },
    #[error("slot {slot} ({path}) is mounted at {mountpoint}")]
    SlotMounted {
        slot: Slot,
        path: PathBuf,
        mountpoint: String,
    },
    #[error("slot {slot} ({path}) has {actual} bytes; the update needs {needed}")]
    SlotTooSmall {
        slot: Slot,
        path: PathBuf,
        actual: u64,
        needed: u64,
    },
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("slot {slot} ({path}) does not hold the update after writing it: its SHA-256 differs")]
    Verify { slot: Slot, path: PathBuf },
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> InstallError {
    let what = what.into();
    move |source| InstallError::Io { what, source }
}

#[derive(Debug, Clone)]
pub struct Slots {
    pub a: PathBuf,
    pub b: PathBuf,
}

impl Slots {
    pub fn path(&self, slot: Slot) -> &Path {
        match slot {
            Slot::A => &self.a,
            Slot::B => &self.b,
        }
    }
}

#[derive(Debug, Clone)]
pub struct InstallReport {
    pub slot: Slot,
    pub path: PathBuf,
    pub bytes_written: u64,
    pub slot_sha256: String,
    pub seconds: f64,
}

/// Checks a bundle without touching any slot.
pub fn check_bundle(
    bundle: &Path,
    trust: &Trust,
    progress: &dyn Progress,
) -> Result<Checked, InstallError> {
    let (bmap, manifest) = sidecars(bundle);
    let checked = check_sidecars(bundle, &bmap, &manifest, trust)?;
    if checked.manifest.partition(Role::RootA).is_none()
        || checked.manifest.partition(Role::RootB).is_none()
    {
        return Err(InstallError::NoRoot);
    }
    check_image(&checked, progress)?;
    Ok(checked)
}

/// Installs a checked bundle into the slot that is not `booted`, and arms it.
pub fn install(
    checked: &Checked,
    booted: Slot,
    slots: &Slots,
    env: &dyn BootEnv,
    mountinfo: &Path,
    progress: &dyn Progress,
) -> Result<InstallReport, InstallError> {
    let slot = booted.other();
    let path = slots.path(slot).to_owned();
    let role = match slot {
        Slot::A => Role::RootA,
        Slot::B => Role::RootB,
    };
    let part = checked
        .manifest
        .partition(role)
        .ok_or(InstallError::NoRoot)?
        .clone();
    refuse_in_use(slot, &path, mountinfo)?;
    let started = Instant::now();
    let mut state = env.state()?;
    if !state.is_good(booted) {
        return Err(InstallError::RunningNotGood(booted));
    }

    let out = File::options()
        .read(true)
        .write(true)
        .open(&path)
        .map_err(io_err(format!("opening slot {slot} ({})", path.display())))?;
    let actual = rustix::fs::seek(&out, rustix::fs::SeekFrom::End(0))
        .map_err(|e| io_err(format!("sizing {}", path.display()))(e.into()))?;
    if actual < part.size {
        return Err(InstallError::SlotTooSmall {
            slot,
            path,
            actual,
            needed: part.size,
        });
    }
    state.disable(slot);
    env.store(&state)?;
    let image = File::open(&checked.image)
        .map_err(io_err(format!("opening {}", checked.image.display())))?;
    let bmap = &checked.bmap;
    progress.begin(&format!("writing slot {slot}"), part.size);
    let mut buf = vec![0u8; 8 << 20];
    let mut cursor = 0u64; // slot offset up to which everything is written or zeroed
    let mut written = 0u64;
    let write_err = |e| io_err(format!("writing slot {slot} ({})", path.display()))(e);
    for range in &bmap.ranges {
        let (offset, len) = bmap.span(range);
        let start = offset.max(part.offset);
        let end = (offset + len).min(part.offset + part.size);
        if start >= end {
            continue;
        }
        zero(&out, cursor, start - part.offset).map_err(write_err)?;
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            image
                .read_exact_at(&mut buf[..n], pos)
                .map_err(io_err(format!("reading {}", checked.image.display())))?;
            out.write_all_at(&buf[..n], pos - part.offset)
                .map_err(write_err)?;
            written += n as u64;
            pos += n as u64;
        }
        progress.advance(end - part.offset - cursor);
        cursor = end - part.offset;
    }
    zero(&out, cursor, part.size).map_err(write_err)?;
    progress.advance(part.size - cursor);
    out.sync_all().map_err(write_err)?;
    progress.end();

    // Read the whole slot back from the device, not the page cache, and hash it.
    let _ = rustix::fs::fadvise(
        &out,
        0,
        NonZeroU64::new(part.size),
        rustix::fs::Advice::DontNeed,
    );
    progress.begin(&format!("verifying slot {slot}"), part.size);
    let slot_sha256 = hash_span(&out, 0, part.size, &mut buf, progress).map_err(io_err(
        format!("reading back slot {slot} ({})", path.display()),
    ))?;
    progress.end();
    if slot_sha256 != part.sha256 {
        return Err(InstallError::Verify { slot, path });
    }

    let mut state = env.state()?;
    state.arm_try(slot);
    env.store(&state)?;
    Ok(InstallReport {
        slot,
        path,
        bytes_written: written,
        slot_sha256,
        seconds: started.elapsed().as_secs_f64(),
    })
}

/// Zeroes `from..to` of the slot: punched (discarded) where the device or file system can,
/// written as zeros where it cannot, so the slot's bytes equal the partition's.
fn zero(out: &File, from: u64, to: u64) -> io::Result<()> {
    if to <= from {
        return Ok(());
    }
    use rustix::fs::FallocateFlags;
    let punched = rustix::fs::fallocate(
        out,
        FallocateFlags::PUNCH_HOLE | FallocateFlags::KEEP_SIZE,
        from,
        to - from,
    );
    if punched.is_ok() {
        return Ok(());
    }
    let zeros = vec![0u8; 1 << 20];
    let mut pos = from;
    while pos < to {
        let n = (to - pos).min(zeros.len() as u64) as usize;
        out.write_all_at(&zeros[..n], pos)?;
        pos += n as u64;
    }
    Ok(())
}

/// The slot must be neither the running root nor mounted anywhere: writing under a mounted
/// file system corrupts it.
fn refuse_in_use(slot: Slot, path: &Path, mountinfo: &Path) -> Result<(), InstallError> {
    let Ok(stat) = rustix::fs::stat(path) else {
        return Ok(()); // opening it reports the precise error
    };
    let is_block =
        rustix::fs::FileType::from_raw_mode(stat.st_mode) == rustix::fs::FileType::BlockDevice;
    let (dev, ino) = (stat.st_rdev, stat.st_ino);
    if let Ok(root) = rustix::fs::stat("/") {
        if is_block && root.st_dev == dev {
            return Err(InstallError::SlotInUse {
                slot,
                path: path.to_owned(),
            });
        }
        if !is_block && root.st_dev == stat.st_dev && root.st_ino == ino {
            return Err(InstallError::SlotInUse {
                slot,
                path: path.to_owned(),
            });
        }
    }
    if !is_block {
        return Ok(());
    }
    let wanted = format!("{}:{}", rustix::fs::major(dev), rustix::fs::minor(dev));
    let mounts = crate::device::mounts(mountinfo).unwrap_or_default();
    if let Some(mount) = mounts.iter().find(|m| m.dev == wanted) {
        return Err(InstallError::SlotMounted {
            slot,
            path: path.to_owned(),
            mountpoint: mount.mountpoint.clone(),
        });
    }
    Ok(())
}
