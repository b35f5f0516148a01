//! Safety checks run by `atlasmesh image flash` before anything is written to the target.
//!
//! Field engineers flash the depot image from their own laptop, so the one mistake that must be
//! impossible is picking the wrong disk. Modelled on Etcher, a block device is refused when:
//!
//! 1. it is a partition (the image is a whole-disk image; the parent disk is suggested);
//! 2. it holds the running system's root filesystem (checked first among the "whose disk is
//!    this" checks, because it is the most important message to see);
//! 3. it holds the image being flashed;
//! 4. it, one of its partitions, or anything stacked on them (dm-crypt, LVM, md, found through
//!    sysfs `holders/`) is mounted or used as swap;
//! 5. it is read-only, or smaller than the image.
//!
//! "Holds" follows the filesystem's device down through `slaves/` (dm, md) and from partitions
//! to their disk, so a root on LVM on `sda2` still protects `sda`. Unknown state fails closed: a
//! block device without a sysfs entry or an unreadable mount table is refused, not waved through.
//!
//! A regular file (or a path that does not exist yet, outside `/dev`) is a plain output file:
//! only "is it the image itself" applies. Large disks additionally need the operator to type the
//! serial ([`Target::needs_confirmation`]). All system state is read through [`SystemView`] so
//! the checks can be tested against a fake sysfs tree.

use std::collections::HashSet;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use rustix::fs::{FileType, major, minor, stat};

/// Where to read the system's state from: real paths by default, a fake tree in tests.
#[derive(Debug, Clone)]
pub struct SystemView {
    /// sysfs mount point, normally `/sys`.
    pub sysfs: PathBuf,
    /// Mount table, normally `/proc/self/mountinfo`.
    pub mountinfo: PathBuf,
    /// Active swap areas, normally `/proc/swaps`.
    pub swaps: PathBuf,
    /// The path whose filesystem is "the running system", normally `/`.
    pub root: PathBuf,
    /// udev's device database, normally `/run/udev/data` (serials of USB disks live only here).
    pub udev: PathBuf,
}

impl Default for SystemView {
    fn default() -> Self {
        Self {
            sysfs: "/sys".into(),
            mountinfo: "/proc/self/mountinfo".into(),
            swaps: "/proc/swaps".into(),
            root: "/".into(),
            udev: "/run/udev/data".into(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetKind {
    File,
    /// `name` is the kernel name, e.g. `sdb`, `loop3`, `nvme0n1`.
    BlockDevice {
        name: String,
    },
}

/// A target that passed every check.
#[derive(Debug, Clone)]
pub struct Target {
    pub path: PathBuf,
    pub kind: TargetKind,
    /// Bytes: sysfs `size` * 512 for a block device, the current length for a file.
    pub size: u64,
    pub model: Option<String>,
    pub serial: Option<String>,
}

/// Why a target was refused. The first field is always the target path as the operator gave it.
#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// (partition, its whole disk)
    #[error(
        "refusing {0}: it is a partition of {1}; the image is a whole-disk image, flash {1} instead"
    )]
    Partition(PathBuf, String),
    /// (disk, root path)
    #[error("refusing {0}: it holds the running system's root filesystem ({1})")]
    HoldsRoot(PathBuf, PathBuf),
    /// (disk, image path)
    #[error("refusing {0}: it holds the image being flashed ({1})")]
    HoldsImage(PathBuf, PathBuf),
    /// (disk, mounted node such as `/dev/sdb1`, mount point)
    #[error("refusing {0}: {1} is mounted at {2} (unmount it first)")]
    Mounted(PathBuf, String, String),
    /// (disk, swap node)
    #[error("refusing {0}: {1} is in use as swap")]
    Swap(PathBuf, String),
    #[error("refusing {0}: the device is read-only")]
    ReadOnly(PathBuf),
    /// (disk, its size, the image size), in bytes
    #[error("refusing {0}: it has {have} but the image needs {need}", have = human(*.1), need = human(*.2))]
    TooSmall(PathBuf, u64, u64),
    #[error("refusing {0}: not a block device or a regular file")]
    NotBlockOrFile(PathBuf),
    #[error("refusing {0}: the target is the image file itself")]
    TargetIsImage(PathBuf),
    #[error("refusing {0}: no such device (a new file is not created under /dev)")]
    NoSuchDevice(PathBuf),
    /// (device, major, minor): without its sysfs entry none of the checks can be made.
    #[error("refusing {0}: block device {1}:{2} is unknown to sysfs")]
    UnknownDevice(PathBuf, u32, u32),
    #[error("cannot read {path}: {source}")]
    Io { path: PathBuf, source: io::Error },
}

/// Drives larger than this (128 GB, decimal) need the operator to confirm with the serial: a
/// wrong pick among large disks is usually a laptop's or server's own disk.
pub const CONFIRM_ABOVE: u64 = 128_000_000_000;

type DevNum = (u32, u32);
use DeviceError as E;

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> DeviceError + '_ {
    move |source| E::Io {
        path: path.into(),
        source,
    }
}

/// Inspects `device` as a flash target for an image of `image_size` bytes stored at `image`,
/// and refuses it for any of the reasons in the module docs. A path that does not exist is a
/// new regular file target (size 0), except under `/dev` where it is almost surely a typo.
pub fn inspect(
    device: &Path,
    image: &Path,
    image_size: u64,
    view: &SystemView,
) -> Result<Target, DeviceError> {
    let d = || device.to_path_buf();
    let st = match stat(device) {
        Err(e) if e == rustix::io::Errno::NOENT && device.starts_with("/dev") => {
            return Err(E::NoSuchDevice(d()));
        }
        Err(e) if e == rustix::io::Errno::NOENT => return Ok(Target::file(device, 0)),
        st => st.map_err(|e| io_err(device)(e.into()))?,
    };
    let img = stat(image).map_err(|e| io_err(image)(e.into()))?;
    let img_is_block = FileType::from_raw_mode(img.st_mode) == FileType::BlockDevice;
    match FileType::from_raw_mode(st.st_mode) {
        FileType::RegularFile if (st.st_dev, st.st_ino) == (img.st_dev, img.st_ino) => {
            Err(E::TargetIsImage(d()))
        }
        FileType::RegularFile => Ok(Target::file(device, st.st_size as u64)),
        FileType::BlockDevice if img_is_block && img.st_rdev == st.st_rdev => {
            Err(E::TargetIsImage(d()))
        }
        FileType::BlockDevice => {
            let root = stat(&view.root).map_err(|e| io_err(&view.root)(e.into()))?;
            // An image that is itself a block device (disk-to-disk copy) lives on that device.
            let img_dev = if img_is_block {
                img.st_rdev
            } else {
                img.st_dev
            };
            let num = |d: u64| (major(d), minor(d));
            let devs = [num(st.st_rdev), num(root.st_dev), num(img_dev)];
            check_block(device, devs, image, image_size, view)
        }
        _ => Err(E::NotBlockOrFile(d())),
    }
}

/// The block-device checks, given the device numbers of the target, of the root filesystem and
/// of the filesystem holding the image. Everything else is read through `view`, which is what
/// makes this testable against a fake sysfs.
fn check_block(
    device: &Path,
    [target, root, img]: [DevNum; 3],
    image: &Path,
    image_size: u64,
    view: &SystemView,
) -> Result<Target, DeviceError> {
    let d = || device.to_path_buf();
    let dir = sysfs_dir(target, view).ok_or_else(|| E::UnknownDevice(d(), target.0, target.1))?;
    if dir.join("partition").exists() {
        let disk = dir.parent().map_or_else(|| "its disk".into(), dev_name);
        return Err(E::Partition(d(), disk));
    }
    let mounts = read_mountinfo(view)?;
    if disks_under(root, &mounts, view).contains(&dir) {
        return Err(E::HoldsRoot(d(), view.root.clone()));
    }
    if disks_under(img, &mounts, view).contains(&dir) {
        return Err(E::HoldsImage(d(), image.into()));
    }
    let swaps = match fs::read_to_string(&view.swaps) {
        Ok(s) => s,
        // Kernels built without swap support have no /proc/swaps: then nothing is swap.
        Err(e) if e.kind() == io::ErrorKind::NotFound => String::new(),
        Err(e) => return Err(io_err(&view.swaps)(e)),
    };
    let swaps: Vec<String> = swaps
        .lines()
        .skip(1)
        .filter_map(|l| l.split_whitespace().next())
        .map(unescape)
        .collect();
    for node in stacked_nodes(&dir) {
        let (names, num) = (node_names(&node), attr(&node, "dev"));
        // Match the source too: btrfs reports an anonymous 0:NN device number in mountinfo.
        let mounted = |m: &&Mount| Some(&m.dev) == num.as_ref() || names.contains(&m.source);
        if let Some(m) = mounts.iter().find(mounted) {
            return Err(E::Mounted(d(), names[0].clone(), m.mountpoint.clone()));
        }
        if swaps.iter().any(|s| names.contains(s)) {
            return Err(E::Swap(d(), names[0].clone()));
        }
    }
    if attr(&dir, "ro").as_deref() == Some("1") {
        return Err(E::ReadOnly(d()));
    }
    let size_path = dir.join("size");
    let sectors = attr(&dir, "size").and_then(|s| s.parse::<u64>().ok());
    let bad = || io::Error::new(io::ErrorKind::InvalidData, "missing or not a number");
    let size = sectors.ok_or_else(|| io_err(&size_path)(bad()))? * 512;
    if size < image_size {
        return Err(E::TooSmall(d(), size, image_size));
    }
    let kind = TargetKind::BlockDevice {
        name: file_name(&dir),
    };
    let (model, serial) = (model(&dir), serial(&dir, target, view));
    Ok(Target {
        path: d(),
        kind,
        size,
        model,
        serial,
    })
}

impl Target {
    fn file(path: &Path, size: u64) -> Self {
        let (path, kind) = (path.into(), TargetKind::File);
        Target {
            path,
            kind,
            size,
            model: None,
            serial: None,
        }
    }

    /// A block device larger than [`CONFIRM_ABOVE`]; files never need it.
    pub fn needs_confirmation(&self) -> bool {
        matches!(self.kind, TargetKind::BlockDevice { .. }) && self.size > CONFIRM_ABOVE
    }

    /// What the operator must type: the serial, or when the device has none, its kernel name.
    pub fn confirmation_word(&self) -> String {
        match (&self.serial, &self.kind) {
            (Some(serial), _) => serial.clone(),
            (None, TargetKind::BlockDevice { name }) => name.clone(),
            (None, TargetKind::File) => self.path.display().to_string(),
        }
    }

    /// Trimmed, exact (case-sensitive) match: a near miss means the operator is not reading the
    /// label of the disk they think they are.
    pub fn confirms(&self, typed: &str) -> bool {
        typed.trim() == self.confirmation_word()
    }

    /// E.g. `/dev/sdb (SanDisk Ultra, serial 4C53..., 32.0 GB)`.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if self.kind == TargetKind::File {
            // A file's size before flashing says nothing about the result.
            parts.push("regular file".to_string());
        } else {
            parts.extend(self.model.clone());
            parts.extend(self.serial.as_ref().map(|s| format!("serial {s}")));
            parts.push(human(self.size));
        }
        format!("{} ({})", self.path.display(), parts.join(", "))
    }
}

/// Decimal units, as printed on drive labels.
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["kB", "MB", "GB", "TB", "PB"];
    if bytes < 1000 {
        return format!("{bytes} B");
    }
    let (mut value, mut unit) = (bytes as f64 / 1000.0, 0);
    while value >= 1000.0 && unit + 1 < UNITS.len() {
        (value, unit) = (value / 1000.0, unit + 1);
    }
    format!("{value:.1} {}", UNITS[unit])
}

/// One mountinfo line: device number ("MAJ:MIN"), mount point and mount source.
pub(crate) struct Mount {
    /// `MAJ:MIN` of the mounted file system's device.
    pub(crate) dev: String,
    pub(crate) mountpoint: String,
    pub(crate) source: String,
}

fn read_mountinfo(view: &SystemView) -> Result<Vec<Mount>, DeviceError> {
    mounts(&view.mountinfo)
}

/// The mount table in `mountinfo`'s format (`/proc/self/mountinfo`).
pub(crate) fn mounts(mountinfo: &Path) -> Result<Vec<Mount>, DeviceError> {
    let text = fs::read_to_string(mountinfo).map_err(io_err(mountinfo))?;
    Ok(text.lines().filter_map(parse_mount).collect())
}

/// `36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw`: the optional fields before
/// " - " vary in number, so the source is found after that separator.
fn parse_mount(line: &str) -> Option<Mount> {
    let (head, tail) = line.split_once(" - ")?;
    let head: Vec<&str> = head.split_whitespace().collect();
    let source = tail.split_whitespace().nth(1)?;
    Some(Mount {
        dev: head.get(2)?.to_string(),
        mountpoint: unescape(head.get(4)?),
        source: unescape(source),
    })
}

/// The kernel escapes space, tab, newline and backslash in mountinfo and swaps as `\ooo`
/// (the backslash last, so that an escaped backslash cannot start a new escape).
fn unescape(s: &str) -> String {
    let s = s
        .replace("\\040", " ")
        .replace("\\011", "\t")
        .replace("\\012", "\n");
    s.replace("\\134", "\\")
}

/// The canonical sysfs directory of a block device number, if the kernel knows it.
fn sysfs_dir((maj, min): DevNum, view: &SystemView) -> Option<PathBuf> {
    fs::canonicalize(view.sysfs.join(format!("dev/block/{maj}:{min}"))).ok()
}

/// The sysfs directory of a `/dev/...` path as it appears in a mount source: `/dev/mapper/X` is
/// the dm device named X, anything else is matched by kernel name (`!` in sysfs is `/` in /dev).
fn sysfs_dir_by_path(path: &str, view: &SystemView) -> Option<PathBuf> {
    let entries = fs::read_dir(view.sysfs.join("dev/block")).ok()?;
    entries
        .filter_map(|e| fs::canonicalize(e.ok()?.path()).ok())
        .find(|dir| node_names(dir).iter().any(|n| n == path))
}

/// The whole disks that the filesystem on `dev` ultimately lives on. Filesystems on anonymous
/// devices (btrfs reports 0:NN) are found through the mount table's source instead; ones with
/// no block device at all (tmpfs, overlay, NFS) live on no disk.
fn disks_under(dev: DevNum, mounts: &[Mount], view: &SystemView) -> HashSet<PathBuf> {
    let key = format!("{}:{}", dev.0, dev.1);
    let start = sysfs_dir(dev, view).or_else(|| {
        let m = mounts
            .iter()
            .find(|m| m.dev == key && m.source.starts_with("/dev/"))?;
        sysfs_dir_by_path(&m.source, view)
    });
    let (mut todo, mut disks) = (Vec::from_iter(start), HashSet::new());
    while let Some(dir) = todo.pop() {
        let slaves = links(&dir.join("slaves"));
        if !slaves.is_empty() {
            todo.extend(slaves); // dm / md: go down to what they are built on
        } else if dir.join("partition").exists() {
            todo.extend(dir.parent().map(Path::to_path_buf));
        } else {
            disks.insert(dir);
        }
    }
    disks
}

/// The disk, its partitions, and everything stacked on either (recursively via `holders/`).
fn stacked_nodes(disk: &Path) -> Vec<PathBuf> {
    let mut todo = vec![disk.to_path_buf()];
    if let Ok(entries) = fs::read_dir(disk) {
        let parts = entries.filter_map(|e| Some(e.ok()?.path()));
        todo.extend(parts.filter(|p| p.join("partition").exists()));
    }
    let (mut seen, mut nodes) = (HashSet::new(), Vec::new());
    while let Some(node) = todo.pop() {
        if seen.insert(node.clone()) {
            todo.extend(links(&node.join("holders")));
            nodes.push(node);
        }
    }
    nodes.sort(); // deterministic: the disk, then its partitions, report in name order
    nodes
}

/// The canonical targets of the symlinks in a sysfs `slaves/` or `holders/` directory.
fn links(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    entries
        .filter_map(|e| fs::canonicalize(e.ok()?.path()).ok())
        .collect()
}

fn file_name(dir: &Path) -> String {
    dir.file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into())
}

/// `/dev/NAME` of a sysfs block directory.
fn dev_name(dir: &Path) -> String {
    format!("/dev/{}", file_name(dir).replace('!', "/"))
}

/// Every `/dev` path a mount table or swap list may use for this node, the kernel name first.
fn node_names(dir: &Path) -> Vec<String> {
    let mut names = vec![dev_name(dir)];
    names.extend(attr(dir, "dm/name").map(|n| format!("/dev/mapper/{n}")));
    names
}

/// A trimmed, non-empty sysfs attribute.
fn attr(dir: &Path, name: &str) -> Option<String> {
    let text = fs::read_to_string(dir.join(name)).ok()?;
    Some(text.trim().to_string()).filter(|s| !s.is_empty())
}

/// `vendor model`, skipping the vendor when it adds nothing ("ATA" on every SATA disk).
fn model(dir: &Path) -> Option<String> {
    let model = attr(dir, "device/model");
    match attr(dir, "device/vendor") {
        Some(v) if v != "ATA" && model.as_ref().is_none_or(|m| !m.starts_with(&v)) => {
            Some(model.map_or_else(|| v.clone(), |m| format!("{v} {m}")))
        }
        _ => model,
    }
}

/// The serial printed on the label, as best the system knows it. udev comes before `wwid`
/// because the operator has to type this, and a wwid is a long, space-padded identifier.
fn serial(dir: &Path, (maj, min): DevNum, view: &SystemView) -> Option<String> {
    let udev = || {
        let text = fs::read_to_string(view.udev.join(format!("b{maj}:{min}"))).ok()?;
        let line = text
            .lines()
            .find_map(|l| l.strip_prefix("E:ID_SERIAL_SHORT="))?;
        Some(line.trim().to_string()).filter(|s| !s.is_empty())
    };
    attr(dir, "device/serial")
        .or_else(udev)
        .or_else(|| attr(dir, "wwid"))
        .or_else(|| attr(dir, "device/wwid"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    const GB: u64 = 1_000_000_000;
    type Dev = (&'static str, DevNum);
    const SDB: Dev = ("/dev/sdb", (8, 16));
    const SDB1: Dev = ("/dev/sdb1", (8, 17));
    const SDB2: DevNum = (8, 18);
    const DM0: DevNum = (253, 0);
    /// A device the fake sysfs does not know, e.g. the laptop's own disk.
    const OTHER: DevNum = (254, 0);

    /// A fake sysfs with the 32 GB disk sdb (partitions sdb1, sdb2) and dm-0 =
    /// /dev/mapper/crypt on sdb2, each reachable through `dev/block/MAJ:MIN` as on a real
    /// system; nothing mounted, no swap.
    struct Fake {
        _tmp: tempfile::TempDir,
        view: SystemView,
        sdb: PathBuf,
    }

    impl Fake {
        fn new() -> Self {
            let tmp = tempfile::tempdir().unwrap();
            let at = |p: &str| tmp.path().join(p);
            let (sysfs, mountinfo, swaps, udev) = (at("sys"), at("mi"), at("swaps"), at("udev"));
            let view = SystemView {
                sysfs,
                mountinfo,
                swaps,
                udev,
                root: "/".into(),
            };
            fs::create_dir_all(&view.udev).unwrap();
            fs::write(&view.mountinfo, "22 1 0:21 / /proc rw - proc proc rw\n").unwrap();
            fs::write(&view.swaps, "Filename\tType\tSize\tUsed\tPriority\n").unwrap();
            let sdb = view.sysfs.join("devices/pci0/block/sdb");
            let fake = Fake {
                _tmp: tmp,
                view,
                sdb,
            };
            let (size, ro) = (("size", "62500000\n"), ("ro", "0\n")); // 32 GB
            let (vendor, model) = (
                ("device/vendor", "SanDisk \n"),
                ("device/model", "Ultra  \n"),
            );
            fake.node(&fake.sdb, "8:16", &[size, ro, vendor, model]);
            fake.node(&fake.sdb.join("sdb1"), "8:17", &[("partition", "1")]);
            let sdb2 = fake.node(&fake.sdb.join("sdb2"), "8:18", &[("partition", "2")]);
            let dm = fake.view.sysfs.join("devices/virtual/block/dm-0");
            fake.node(&dm, "253:0", &[("dm/name", "crypt\n")]);
            fake.link(&sdb2, &dm.join("slaves/sdb2"));
            fake.link(&dm, &sdb2.join("holders/dm-0"));
            fake
        }

        fn node(&self, dir: &Path, dev: &str, files: &[(&str, &str)]) -> PathBuf {
            for (name, content) in [("dev", dev)].iter().chain(files) {
                fs::create_dir_all(dir.join(name).parent().unwrap()).unwrap();
                fs::write(dir.join(name), content).unwrap();
            }
            self.link(dir, &self.view.sysfs.join("dev/block").join(dev));
            dir.into()
        }

        fn link(&self, target: &Path, link: &Path) {
            fs::create_dir_all(link.parent().unwrap()).unwrap();
            symlink(target, link).unwrap();
        }

        fn add(&self, file: &Path, line: &str) {
            let text = fs::read_to_string(file).unwrap();
            fs::write(file, text + line + "\n").unwrap();
        }

        /// The image is always /home/x/depot.img; `root` and `img` are the device numbers
        /// that / and the image's filesystem are on.
        fn check(&self, dev: Dev, root: DevNum, img: DevNum, size: u64) -> Result<Target, E> {
            let (image, devs) = (Path::new("/home/x/depot.img"), [dev.1, root, img]);
            check_block(Path::new(dev.0), devs, image, size, &self.view)
        }

        fn refused(&self, dev: Dev, root: DevNum, img: DevNum, size: u64) -> String {
            self.check(dev, root, img, size).unwrap_err().to_string()
        }
    }

    #[test]
    fn acceptable_disk_with_model_and_serial() {
        let fake = Fake::new();
        let udev = "S:disk/by-id/x\nE:ID_SERIAL_SHORT=4C530001\n";
        fs::write(fake.view.udev.join("b8:16"), udev).unwrap();
        let t = fake.check(SDB, OTHER, OTHER, 16 * GB).unwrap();
        let name = "sdb".to_string();
        assert_eq!(
            (t.kind.clone(), t.size),
            (TargetKind::BlockDevice { name }, 32 * GB)
        );
        assert_eq!(t.model.as_deref(), Some("SanDisk Ultra"));
        assert_eq!(
            t.describe(),
            "/dev/sdb (SanDisk Ultra, serial 4C530001, 32.0 GB)"
        );
        // A serial in sysfs (NVMe, some USB bridges) wins over udev's.
        fs::write(fake.sdb.join("device/serial"), "  ABC  \n").unwrap();
        let t = fake.check(SDB, OTHER, OTHER, 1).unwrap();
        assert_eq!(t.serial.as_deref(), Some("ABC"));
    }

    #[test]
    fn refuses_partition_and_names_the_disk() {
        let msg = Fake::new().refused(SDB1, OTHER, OTHER, 1);
        let want = "refusing /dev/sdb1: it is a partition of /dev/sdb; the image is a whole-disk \
                    image, flash /dev/sdb instead";
        assert_eq!(msg, want);
    }

    #[test]
    fn refuses_disk_holding_root() {
        let fake = Fake::new();
        let want = "refusing /dev/sdb: it holds the running system's root filesystem (/)";
        // On a partition, on dm-crypt over a partition, on btrfs (anonymous 0:NN st_dev).
        assert_eq!(fake.refused(SDB, SDB2, OTHER, 1), want);
        assert_eq!(fake.refused(SDB, DM0, OTHER, 1), want);
        fake.add(
            &fake.view.mountinfo,
            "27 1 0:31 /@ / rw - btrfs /dev/mapper/crypt rw",
        );
        assert_eq!(fake.refused(SDB, (0, 31), OTHER, 1), want);
    }

    #[test]
    fn refuses_disk_holding_the_image() {
        let msg = Fake::new().refused(SDB, OTHER, (8, 17), 1);
        assert_eq!(
            msg,
            "refusing /dev/sdb: it holds the image being flashed (/home/x/depot.img)"
        );
    }

    #[test]
    fn refuses_mounted_partition_or_dm_on_it() {
        let fake = Fake::new();
        let mi = &fake.view.mountinfo;
        fake.add(mi, "41 27 0:45 / /mnt/data rw - btrfs /dev/mapper/crypt rw");
        let msg = fake.refused(SDB, OTHER, OTHER, 1);
        assert_eq!(
            msg,
            "refusing /dev/sdb: /dev/dm-0 is mounted at /mnt/data (unmount it first)"
        );
        fake.add(
            mi,
            "40 27 8:17 / /mnt/a\\040b rw shared:9 - vfat /dev/sdb1 rw",
        );
        let msg = fake.refused(SDB, OTHER, OTHER, 1);
        assert_eq!(
            msg,
            "refusing /dev/sdb: /dev/sdb1 is mounted at /mnt/a b (unmount it first)"
        );
    }

    #[test]
    fn refuses_swap() {
        let fake = Fake::new();
        fake.add(
            &fake.view.swaps,
            "/dev/sdb2                               partition\t1024\t0\t-2",
        );
        let msg = fake.refused(SDB, OTHER, OTHER, 1);
        assert_eq!(msg, "refusing /dev/sdb: /dev/sdb2 is in use as swap");
    }

    #[test]
    fn refuses_read_only_and_too_small() {
        let fake = Fake::new();
        let msg = fake.refused(SDB, OTHER, OTHER, 40 * GB);
        assert_eq!(
            msg,
            "refusing /dev/sdb: it has 32.0 GB but the image needs 40.0 GB"
        );
        fs::write(fake.sdb.join("ro"), "1\n").unwrap();
        let msg = fake.refused(SDB, OTHER, OTHER, 1);
        assert_eq!(msg, "refusing /dev/sdb: the device is read-only");
    }

    #[test]
    fn unknown_device_fails_closed() {
        let msg = Fake::new().refused(("/dev/sdc", (8, 32)), OTHER, OTHER, 1);
        assert_eq!(
            msg,
            "refusing /dev/sdc: block device 8:32 is unknown to sysfs"
        );
    }

    #[test]
    fn confirmation_for_large_disks() {
        let mut t = Fake::new().check(SDB, OTHER, OTHER, 1).unwrap();
        t.size = CONFIRM_ABOVE;
        assert!(!t.needs_confirmation());
        t.size += 1;
        assert!(t.needs_confirmation());
        // Without a serial the kernel name is the word to type.
        assert!(t.serial.is_none() && t.confirms(" sdb\n"));
        t.serial = Some("S4EWNX0R".into());
        assert_eq!(t.confirmation_word(), "S4EWNX0R");
        assert!(t.confirms("  S4EWNX0R\n"));
        assert!(!t.confirms("s4ewnx0r") && !t.confirms("sdb") && !t.confirms(""));
        t.kind = TargetKind::File;
        assert!(!t.needs_confirmation());
    }

    #[test]
    fn file_targets() {
        let tmp = tempfile::tempdir().unwrap();
        let [image, out, alias] =
            ["depot.img", "copy.img", "alias.img"].map(|n| tmp.path().join(n));
        fs::write(&image, b"image").unwrap();
        let view = SystemView::default();
        let inspect = |p: &Path| inspect(p, &image, 5, &view);
        // A path that does not exist yet becomes a new file; an existing one is overwritten.
        let t = inspect(&out).unwrap();
        assert_eq!((t.kind, t.size), (TargetKind::File, 0));
        fs::write(&out, b"ab").unwrap();
        assert_eq!(inspect(&out).unwrap().size, 2);
        // Not the image itself, also under another name; not directories or char devices.
        fs::hard_link(&image, &alias).unwrap();
        assert!(matches!(inspect(&alias), Err(E::TargetIsImage(_))));
        assert!(matches!(inspect(tmp.path()), Err(E::NotBlockOrFile(_))));
        assert!(matches!(
            inspect(Path::new("/dev/null")),
            Err(E::NotBlockOrFile(_))
        ));
        assert!(matches!(
            inspect(Path::new("/dev/sdzz9")),
            Err(E::NoSuchDevice(_))
        ));
    }

    /// Against the real machine, read-only: the disk under / must be refused as the root disk.
    #[test]
    fn real_root_disk_is_refused() {
        let mountinfo = fs::read_to_string("/proc/self/mountinfo").unwrap();
        // The last mount on / is the one in effect.
        let mut mounts = mountinfo.lines().filter_map(parse_mount);
        let root = mounts.rfind(|m| m.mountpoint == "/").map(|m| m.source);
        let st = root.as_deref().and_then(|s| stat(s).ok());
        let Some(st) = st.filter(|st| FileType::from_raw_mode(st.st_mode) == FileType::BlockDevice)
        else {
            eprintln!("skipping: / is not on a block device here ({root:?})");
            return;
        };
        // A partition would be refused as such first, so aim at its disk.
        let view = SystemView::default();
        let dir = sysfs_dir((major(st.st_rdev), minor(st.st_rdev)), &view).unwrap();
        let disk = if dir.join("partition").exists() {
            dir.parent().unwrap()
        } else {
            &dir
        };
        let disk = dev_name(disk);
        let image = tempfile::NamedTempFile::new().unwrap();
        let msg = inspect(Path::new(&disk), image.path(), 1, &view)
            .unwrap_err()
            .to_string();
        assert_eq!(
            msg,
            format!("refusing {disk}: it holds the running system's root filesystem (/)")
        );
    }
}
