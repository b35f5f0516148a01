//! `atlasmesh image build`: a GPT disk image with the A/B layout, from a root file system tree,
//! without root privileges or loop devices: the file systems are made in sparse files
//! (`mkfs.ext4 -d`; `mkfs.vfat` and `mcopy` for the ESP), their data extents copied into
//! the image, and the image described by a bmap and a signed manifest.
//!
//! Nothing appears at `--out` until everything is written: the image, bmap and manifest are
//! built under temporary names beside it and renamed into place, the manifest last.

use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use atlasmesh_ota_staging::keys::KeyPair;
use sha2::{Digest, Sha256};

use crate::bmap::{BLOCK_SIZE, Bmap, Range};
use crate::bootenv::{factory_state, grubenv_block};
use crate::extents::{copy_sparse, data_extents};
use crate::layout::{Layout, LayoutError, MIB, Role, Sizes, round_up};
use crate::manifest::{MANIFEST_TYPE, Manifest, ManifestBody, ManifestError, PartitionEntry};

/// The A/B selection script installed as the ESP's `EFI/BOOT/grub.cfg`.
pub const GRUB_CFG: &str = include_str!("../grub/grub.cfg");

#[derive(Debug)]
pub struct BuildOptions {
    pub rootfs: PathBuf,
    pub out: PathBuf,
    /// Files for the EFI system partition (e.g. `EFI/BOOT/BOOTX64.EFI` from a GRUB build).
    /// `EFI/BOOT/grub.cfg` and `EFI/BOOT/grubenv` are added unless the directory has them.
    pub esp_dir: Option<PathBuf>,
    pub esp_size: u64,
    /// Each root slot; `None` sizes them from the tree (its size plus half, at least 64 MiB).
    pub root_size: Option<u64>,
    pub data_size: u64,
    pub tools: Tools,
    /// The release (TUF `targets`) key that signs the manifest.
    pub key: KeyPair,
    pub now: chrono::DateTime<chrono::Utc>,
}

/// The programs the build runs (e2fsprogs, dosfstools, mtools).
#[derive(Debug, Clone)]
pub struct Tools {
    pub mkfs_ext4: PathBuf,
    pub mkfs_vfat: PathBuf,
    pub mcopy: PathBuf,
}

impl Default for Tools {
    fn default() -> Self {
        Self {
            mkfs_ext4: PathBuf::from("mkfs.ext4"),
            mkfs_vfat: PathBuf::from("mkfs.vfat"),
            mcopy: PathBuf::from("mcopy"),
        }
    }
}

#[derive(Debug)]
pub struct BuildReport {
    pub image: PathBuf,
    pub bmap: PathBuf,
    pub manifest: PathBuf,
    pub body: ManifestBody,
}

#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    #[error("{0} is not a directory")]
    NotADirectory(PathBuf),
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("{what}: {source}")]
    Io { what: String, source: io::Error },
    #[error("{program} failed: {stderr}")]
    Tool { program: String, stderr: String },
    #[error("writing the partition table: {0}")]
    Gpt(String),
    #[error(transparent)]
    Manifest(#[from] ManifestError),
}

fn io_err(what: impl Into<String>) -> impl FnOnce(io::Error) -> BuildError {
    let what = what.into();
    move |source| BuildError::Io { what, source }
}

/// The sidecar files of an image: `depot.img.bmap` and `depot.img.manifest`.
pub fn sidecars(image: &Path) -> (PathBuf, PathBuf) {
    let with = |ext: &str| {
        let mut name = image.as_os_str().to_owned();
        name.push(ext);
        PathBuf::from(name)
    };
    (with(".bmap"), with(".manifest"))
}

pub fn build(opts: &BuildOptions) -> Result<BuildReport, BuildError> {
    if !opts.rootfs.is_dir() {
        return Err(BuildError::NotADirectory(opts.rootfs.clone()));
    }
    let root_size = match opts.root_size {
        Some(size) => size,
        None => {
            let used = tree_size(&opts.rootfs)
                .map_err(io_err(format!("measuring {}", opts.rootfs.display())))?;
            round_up(used + used / 2, MIB)
                .unwrap_or(u64::MAX)
                .max(64 * MIB)
        }
    };
    let layout = Layout::plan(Sizes {
        esp: opts.esp_size,
        root: root_size,
        data: opts.data_size,
    })?;

    let parent = match opts.out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_owned(),
        _ => PathBuf::from("."),
    };
    // Work files live beside the output so the final renames stay on one file system; the
    // directory (and any half-built image) disappears on every error path.
    let work = tempfile::Builder::new()
        .prefix(".atlasmesh-image-build.")
        .tempdir_in(&parent)
        .map_err(io_err(format!(
            "creating a work directory in {}",
            parent.display()
        )))?;

    let esp = work.path().join("esp.vfat");
    make_esp(
        &opts.tools,
        work.path(),
        &esp,
        layout.get(Role::Esp).size,
        opts.esp_dir.as_deref(),
    )?;
    let mut fs_files = vec![(Role::Esp, esp)];
    for role in [Role::RootA, Role::RootB, Role::Data] {
        let file = work.path().join(format!("{}.ext4", role.name()));
        let source = (role != Role::Data).then_some(opts.rootfs.as_path());
        make_ext4(
            &opts.tools.mkfs_ext4,
            &file,
            layout.get(role).size,
            role.name(),
            source,
        )?;
        fs_files.push((role, file));
    }

    let image_tmp = work.path().join("image");
    let image = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(&image_tmp)
        .map_err(io_err("creating the image"))?;
    image
        .set_len(layout.size)
        .map_err(io_err("sizing the image"))?;
    let uuids = write_gpt(&image, &layout)?;
    for (role, file) in &fs_files {
        let from = File::open(file).map_err(io_err(format!("opening {}", file.display())))?;
        copy_sparse(&from, &image, layout.get(*role).offset)
            .map_err(io_err(format!("copying the {} partition", role.name())))?;
    }
    image.sync_all().map_err(io_err("syncing the image"))?;

    let (bmap, digests) = describe(&image, &layout)?;
    let bmap_xml = bmap.to_xml();
    let partitions = layout
        .partitions
        .iter()
        .zip(digests.partitions)
        .zip(uuids)
        .map(|((p, sha256), uuid)| PartitionEntry {
            role: p.role,
            name: p.role.name().to_owned(),
            type_guid: p.role.type_guid().to_owned(),
            uuid,
            offset: p.offset,
            size: p.size,
            filesystem: p.role.filesystem().to_owned(),
            sha256,
        })
        .collect();
    let body = ManifestBody {
        kind: MANIFEST_TYPE.to_owned(),
        image_size: layout.size,
        image_sha256: digests.image,
        bmap_sha256: hex::encode(Sha256::digest(&bmap_xml)),
        mapped_bytes: bmap.mapped_bytes(),
        created: opts.now.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
        partitions,
    };
    let manifest = Manifest::sign(body.clone(), &opts.key)?;

    let (bmap_path, manifest_path) = sidecars(&opts.out);
    let bmap_tmp = work.path().join("bmap");
    let manifest_tmp = work.path().join("manifest");
    write_synced(&bmap_tmp, &bmap_xml)?;
    write_synced(&manifest_tmp, &manifest.to_json())?;
    // A stale manifest must never vouch for a new image: it goes first, and comes back last.
    remove_if_exists(&manifest_path)?;
    for (from, to) in [
        (&image_tmp, &opts.out),
        (&bmap_tmp, &bmap_path),
        (&manifest_tmp, &manifest_path),
    ] {
        fs::rename(from, to).map_err(io_err(format!("renaming into {}", to.display())))?;
    }
    if let Ok(dir) = File::open(&parent) {
        let _ = dir.sync_all();
    }
    Ok(BuildReport {
        image: opts.out.clone(),
        bmap: bmap_path,
        manifest: manifest_path,
        body,
    })
}

fn remove_if_exists(path: &Path) -> Result<(), BuildError> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => {
            Err(io_err(format!("removing {}", path.display()))(e))
        }
        _ => Ok(()),
    }
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), BuildError> {
    let mut file = File::create(path).map_err(io_err(format!("creating {}", path.display())))?;
    file.write_all(bytes)
        .and_then(|()| file.sync_all())
        .map_err(io_err(format!("writing {}", path.display())))
}

/// Bytes the tree takes in 4 KiB blocks, plus an inode's worth per entry.
fn tree_size(dir: &Path) -> io::Result<u64> {
    let mut total = 0;
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let meta = entry.path().symlink_metadata()?;
        total += 4096;
        if meta.is_dir() {
            total += tree_size(&entry.path())?;
        } else if meta.is_file() {
            total += round_up(meta.len(), 4096).unwrap_or(u64::MAX);
        }
    }
    Ok(total)
}

fn make_ext4(
    mkfs: &Path,
    file: &Path,
    size: u64,
    label: &str,
    source: Option<&Path>,
) -> Result<(), BuildError> {
    File::create(file)
        .and_then(|f| f.set_len(size))
        .map_err(io_err(format!("creating {}", file.display())))?;
    let mut cmd = Command::new(mkfs);
    // 4 KiB blocks match the bmap's; each slot gets its own UUID (two file systems with one
    // UUID on a disk confuse blkid and `UUID=` mounts).
    cmd.args(["-q", "-F", "-t", "ext4", "-b", "4096", "-L", label]);
    if let Some(source) = source {
        cmd.arg("-d").arg(source);
    }
    cmd.arg(file);
    run_tool(&mut cmd, mkfs, &format!("for {label}"))
}

/// The ESP: `mkfs.vfat`, then the caller's files plus GRUB's A/B script and a factory
/// environment block, copied in with `mcopy` (mtools), as Yocto's wic does.
fn make_esp(
    tools: &Tools,
    work: &Path,
    file: &Path,
    size: u64,
    esp_dir: Option<&Path>,
) -> Result<(), BuildError> {
    File::create(file)
        .and_then(|f| f.set_len(size))
        .map_err(io_err(format!("creating {}", file.display())))?;
    let mut mkfs = Command::new(&tools.mkfs_vfat);
    mkfs.args(["-n", "ESP"]).arg(file);
    run_tool(&mut mkfs, &tools.mkfs_vfat, "for the ESP")?;

    let staging = work.join("esp");
    let boot = staging.join("EFI/BOOT");
    fs::create_dir_all(&boot).map_err(io_err("staging the ESP"))?;
    if let Some(dir) = esp_dir {
        copy_tree(dir, &staging).map_err(io_err(format!("copying {}", dir.display())))?;
    }
    // The caller's own files win.
    for (name, bytes) in [
        ("grub.cfg", GRUB_CFG.as_bytes().to_vec()),
        ("grubenv", grubenv_block(&factory_state().to_vars())),
    ] {
        if !boot.join(name).exists() {
            fs::write(boot.join(name), bytes).map_err(io_err("staging the ESP"))?;
        }
    }
    let mut mcopy = Command::new(&tools.mcopy);
    // -s: recursive; -p: keep attributes; -Q: stop at the first error. MTOOLS_SKIP_CHECK:
    // the image has no partition table of its own to check.
    mcopy
        .env("MTOOLS_SKIP_CHECK", "1")
        .args(["-s", "-p", "-Q", "-i"])
        .arg(file);
    for entry in fs::read_dir(&staging).map_err(io_err("staging the ESP"))? {
        mcopy.arg(entry.map_err(io_err("staging the ESP"))?.path());
    }
    mcopy.arg("::/");
    run_tool(&mut mcopy, &tools.mcopy, "into the ESP")
}

fn copy_tree(from: &Path, to: &Path) -> io::Result<()> {
    for entry in fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if fs::metadata(entry.path())?.is_dir() {
            fs::create_dir_all(&target)?;
            copy_tree(&entry.path(), &target)?;
        } else {
            fs::copy(entry.path(), &target)?;
        }
    }
    Ok(())
}

fn run_tool(cmd: &mut Command, program: &Path, what: &str) -> Result<(), BuildError> {
    let output = cmd.output().map_err(|e| BuildError::Tool {
        program: program.display().to_string(),
        stderr: format!("cannot run it: {e}"),
    })?;
    if !output.status.success() {
        return Err(BuildError::Tool {
            program: format!("{} {what}", program.display()),
            stderr: String::from_utf8_lossy(&output.stderr).trim().to_owned(),
        });
    }
    Ok(())
}

/// Protective MBR and both GPTs; returns each partition's unique GUID, in layout order.
fn write_gpt(image: &File, layout: &Layout) -> Result<Vec<String>, BuildError> {
    use gpt::partition_types;
    let gpt_err = |e: &dyn std::fmt::Display| BuildError::Gpt(e.to_string());
    let sectors = layout.size / crate::layout::SECTOR;
    let mut device = image.try_clone().map_err(io_err("opening the image"))?;
    gpt::mbr::ProtectiveMBR::with_lb_size(u32::try_from(sectors - 1).unwrap_or(u32::MAX))
        .overwrite_lba0(&mut device)
        .map_err(|e| gpt_err(&e))?;
    let mut disk = gpt::GptConfig::new()
        .writable(true)
        .logical_block_size(gpt::disk::LogicalBlockSize::Lb512)
        .create_from_device(device, None)
        .map_err(|e| gpt_err(&e))?;
    let mut ids = Vec::new();
    for (n, p) in layout.partitions.iter().enumerate() {
        let kind = match p.role {
            Role::Esp => partition_types::EFI,
            Role::RootA | Role::RootB => partition_types::LINUX_ROOT_X64,
            Role::Data => partition_types::LINUX_FS,
        };
        let id = u32::try_from(n + 1).expect("four partitions");
        disk.add_partition_at(
            p.role.name(),
            id,
            p.offset / crate::layout::SECTOR,
            p.size / crate::layout::SECTOR,
            kind,
            0,
        )
        .map_err(|e| gpt_err(&e))?;
        ids.push(id);
    }
    let uuids = ids
        .iter()
        .map(|id| {
            disk.partitions()[id]
                .part_guid
                .hyphenated()
                .to_string()
                .to_uppercase()
        })
        .collect();
    disk.write().map_err(|e| gpt_err(&e))?;
    Ok(uuids)
}

struct Digests {
    image: String,
    partitions: Vec<String>,
}

/// One pass over the image: the bmap ranges (data extents rounded out to blocks) with their
/// checksums, the whole image's SHA-256 and each partition's. Holes are hashed as zeros
/// without being read.
fn describe(image: &File, layout: &Layout) -> Result<(Bmap, Digests), BuildError> {
    let size = layout.size;
    let mut blocks: Vec<(u64, u64)> = Vec::new();
    for (offset, len) in data_extents(image, 0, size).map_err(io_err("mapping the image"))? {
        let first = offset / BLOCK_SIZE;
        let last = (offset + len).div_ceil(BLOCK_SIZE) - 1;
        match blocks.last_mut() {
            Some((_, prev_last)) if first <= *prev_last + 1 => *prev_last = (*prev_last).max(last),
            _ => blocks.push((first, last)),
        }
    }
    // Breakpoints: every range and partition boundary, so each step lies in one of each.
    let mut cuts: Vec<u64> = vec![0, size];
    for &(first, last) in &blocks {
        cuts.push(first * BLOCK_SIZE);
        cuts.push(((last + 1) * BLOCK_SIZE).min(size));
    }
    for p in &layout.partitions {
        cuts.extend([p.offset, p.end()]);
    }
    cuts.sort_unstable();
    cuts.dedup();

    let mut image_hash = Sha256::new();
    let mut part_hashes: Vec<Sha256> = layout.partitions.iter().map(|_| Sha256::new()).collect();
    let mut range_hashes: Vec<Sha256> = blocks.iter().map(|_| Sha256::new()).collect();
    let zeros = vec![0u8; 4 * MIB as usize];
    let mut buf = vec![0u8; 4 * MIB as usize];
    let mut range_ix = 0;
    for w in cuts.windows(2) {
        let (start, end) = (w[0], w[1]);
        while range_ix < blocks.len() && ((blocks[range_ix].1 + 1) * BLOCK_SIZE).min(size) <= start
        {
            range_ix += 1;
        }
        let mapped = range_ix < blocks.len() && blocks[range_ix].0 * BLOCK_SIZE <= start;
        let part = layout
            .partitions
            .iter()
            .position(|p| p.offset <= start && start < p.end());
        let mut pos = start;
        while pos < end {
            let n = (end - pos).min(buf.len() as u64) as usize;
            let bytes = if mapped {
                image
                    .read_exact_at(&mut buf[..n], pos)
                    .map_err(io_err("reading the image"))?;
                &buf[..n]
            } else {
                &zeros[..n]
            };
            image_hash.update(bytes);
            if let Some(i) = part {
                part_hashes[i].update(bytes);
            }
            if mapped {
                range_hashes[range_ix].update(bytes);
            }
            pos += n as u64;
        }
    }
    let ranges = blocks
        .iter()
        .zip(range_hashes)
        .map(|(&(first, last), h)| Range {
            first,
            last,
            sha256: hex::encode(h.finalize()),
        })
        .collect();
    Ok((
        Bmap {
            image_size: size,
            block_size: BLOCK_SIZE,
            ranges,
        },
        Digests {
            image: hex::encode(image_hash.finalize()),
            partitions: part_hashes
                .into_iter()
                .map(|h| hex::encode(h.finalize()))
                .collect(),
        },
    ))
}

/// Reads a whole file into memory, for the small sidecars.
pub(crate) fn read_small(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let file = File::open(path)?;
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is larger than {limit} bytes", path.display()),
        ));
    }
    Ok(bytes)
}
