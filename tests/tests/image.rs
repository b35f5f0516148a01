//! The appliance image, end to end with the real binary and real tools: the layout as `sgdisk`
//! reads it, both root slots clean under `e2fsck -fn` (read through partition offsets), the
//! ESP's GRUB script and environment block as GRUB's own tools read them; Debian's `bmaptool`
//! writing the same bytes as our flash; refusals of tampered inputs and dangerous targets
//! before anything is written; and A/B boot-count fallback against a real grubenv file, and
//! under U-Boot itself (Debian's build for QEMU's arm64 board running `image/uboot/boot.cmd`)
//! with its environment written by libubootenv.
//!
//! Block-device cases use loop devices and need root (as CI has); elsewhere they are skipped
//! with a note.

use std::io::{Read, Write};
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use atlasmesh_tests::ota::{Fleet, s};
use atlasmesh_tests::{Options, Server, atlasmesh, closed_pipe, http, mint_token, run};
use sha2::{Digest, Sha256};

const MIB: u64 = 1 << 20;

/// A fleet, a small root file system tree and an image built from it.
struct Built {
    fleet: Fleet,
    dir: tempfile::TempDir,
    rootfs: PathBuf,
    image: PathBuf,
}

impl Built {
    fn new() -> Self {
        let fleet = Fleet::new().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let rootfs = dir.path().join("rootfs");
        for sub in ["etc/atlasmesh", "usr/bin", "boot", "var/empty"] {
            std::fs::create_dir_all(rootfs.join(sub)).unwrap();
        }
        std::fs::write(rootfs.join("etc/hostname"), "depot\n").unwrap();
        std::fs::write(
            rootfs.join("etc/atlasmesh/depot.toml"),
            "data_dir = \"/data\"\n",
        )
        .unwrap();
        std::fs::write(
            rootfs.join("usr/bin/atlasmesh"),
            pseudo_random(3 * MIB as usize, 7),
        )
        .unwrap();
        std::os::unix::fs::symlink("../usr/bin/atlasmesh", rootfs.join("boot/link")).unwrap();
        let image = dir.path().join("depot.img");
        let (status, stdout, stderr) = run(atlasmesh()
            .args(["image", "build", "--rootfs", s(&rootfs), "--out", s(&image)])
            .args(["--data-size", "32MiB", "--key"])
            .arg(fleet.keys.join("targets.pem")))
        .unwrap();
        assert!(status.success(), "build failed: {stderr}");
        assert!(
            stdout.contains("root_a") && stdout.contains("image sha256"),
            "{stdout}"
        );
        Self {
            fleet,
            dir,
            rootfs,
            image,
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn bmap(&self) -> PathBuf {
        PathBuf::from(format!("{}.bmap", self.image.display()))
    }

    fn manifest(&self) -> PathBuf {
        PathBuf::from(format!("{}.manifest", self.image.display()))
    }

    /// A copy of the image with its bmap and manifest beside it, at `to`.
    fn copy_to(&self, to: &Path) -> PathBuf {
        std::fs::copy(&self.image, to).unwrap();
        std::fs::copy(self.bmap(), format!("{}.bmap", to.display())).unwrap();
        std::fs::copy(self.manifest(), format!("{}.manifest", to.display())).unwrap();
        to.to_owned()
    }

    fn manifest_json(&self) -> serde_json::Value {
        serde_json::from_slice(&std::fs::read(self.manifest()).unwrap()).unwrap()
    }

    /// (offset, size) of a partition, from the signed manifest.
    fn partition(&self, name: &str) -> (u64, u64) {
        let manifest = self.manifest_json();
        let p = manifest["signed"]["partitions"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["name"] == name)
            .unwrap_or_else(|| panic!("no partition {name}"))
            .clone();
        (p["offset"].as_u64().unwrap(), p["size"].as_u64().unwrap())
    }

    /// `atlasmesh image flash` of `image` onto `device`, trusting this fleet's root.
    fn flash_command(&self, image: &Path, device: &Path) -> std::process::Command {
        let mut cmd = atlasmesh();
        cmd.args([
            "image",
            "flash",
            "--image",
            s(image),
            "--device",
            s(device),
            "--root",
        ])
        .arg(self.fleet.root());
        cmd
    }

    /// Two files standing in for the appliance's root slot partitions, of the image's slot
    /// size, holding old bytes.
    fn slot_files(&self) -> (PathBuf, PathBuf) {
        let (_, root_size) = self.partition("root_a");
        let slots = (
            self.dir.path().join("slot_a"),
            self.dir.path().join("slot_b"),
        );
        for slot in [&slots.0, &slots.1] {
            std::fs::write(slot, pseudo_random(MIB as usize, 5)).unwrap();
            std::fs::OpenOptions::new()
                .write(true)
                .open(slot)
                .unwrap()
                .set_len(root_size)
                .unwrap();
        }
        slots
    }

    fn flash(&self, image: &Path, device: &Path, extra: &[&str]) -> (bool, String, String) {
        let (status, stdout, stderr) = run(self.flash_command(image, device).args(extra)).unwrap();
        (status.success(), stdout, stderr)
    }
}

fn pseudo_random(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn tool(program: &str, args: &[&str]) -> (bool, String) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program}: {e}"));
    let mut text = String::from_utf8_lossy(&out.stdout).into_owned();
    text.push_str(&String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

fn sha256_file(path: &Path) -> String {
    let mut file = std::fs::File::open(path).unwrap();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; MIB as usize];
    loop {
        let n = file.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hex::encode(hasher.finalize())
}

fn extract(image: &Path, offset: u64, size: u64, out: &Path) {
    let mut from = std::fs::File::open(image).unwrap();
    std::io::Seek::seek(&mut from, std::io::SeekFrom::Start(offset)).unwrap();
    let mut to = std::fs::File::create(out).unwrap();
    std::io::copy(&mut from.take(size), &mut to).unwrap();
}

#[test]
fn built_image_has_the_ab_layout_clean_file_systems_and_the_files() {
    let built = Built::new();
    let (ok, table) = tool("sgdisk", &["-p", s(&built.image)]);
    assert!(ok, "{table}");
    // Number, start, end, size, unit, code, name: four partitions, in order, with their types.
    let rows: Vec<Vec<&str>> = table
        .lines()
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|f| f.len() == 7 && f[0].parse::<u32>().is_ok())
        .collect();
    let described: Vec<(&str, &str)> = rows.iter().map(|r| (r[6], r[5])).collect();
    assert_eq!(
        described,
        [
            ("esp", "EF00"),
            ("root_a", "8304"),
            ("root_b", "8304"),
            ("data", "8300")
        ],
        "{table}"
    );
    let sectors = |r: &Vec<&str>| r[2].parse::<u64>().unwrap() - r[1].parse::<u64>().unwrap() + 1;
    assert_eq!(
        sectors(&rows[1]),
        sectors(&rows[2]),
        "root slots differ in size:\n{table}"
    );
    for r in &rows {
        assert_eq!(
            r[1].parse::<u64>().unwrap() % 2048,
            0,
            "unaligned partition:\n{table}"
        );
    }
    let (ok, verify) = tool("sgdisk", &["-v", s(&built.image)]);
    assert!(ok && verify.contains("No problems found"), "{verify}");

    // The manifest's offsets are the table's, and e2fsck reads each slot through them.
    for (row, name) in [
        (&rows[1], "root_a"),
        (&rows[2], "root_b"),
        (&rows[3], "data"),
    ] {
        let (offset, size) = built.partition(name);
        assert_eq!(offset, row[1].parse::<u64>().unwrap() * 512);
        assert_eq!(size, sectors(row) * 512);
        let spec = format!("{}?offset={offset}", built.image.display());
        let (ok, out) = tool("e2fsck", &["-fn", &spec]);
        assert!(ok, "e2fsck on {name}:\n{out}");
        let (_, label) = tool("debugfs", &["-R", "stats", &spec]);
        assert!(
            label.contains(&format!("Filesystem volume name:   {name}")),
            "{label}"
        );
        if name == "data" {
            continue;
        }
        for file in [
            "etc/hostname",
            "etc/atlasmesh/depot.toml",
            "usr/bin/atlasmesh",
        ] {
            let out = built.path(&format!("{name}-{}", file.replace('/', "_")));
            let (ok, msg) = tool(
                "debugfs",
                &["-R", &format!("dump /{file} {}", out.display()), &spec],
            );
            assert!(ok, "{msg}");
            assert_eq!(
                std::fs::read(&out).unwrap(),
                std::fs::read(built.rootfs.join(file)).unwrap(),
                "{file} in {name}"
            );
        }
        let (_, link) = tool("debugfs", &["-R", "stat /boot/link", &spec]);
        assert!(
            link.contains("Fast link dest: \"../usr/bin/atlasmesh\""),
            "{link}"
        );
    }

    // The ESP: a clean FAT with GRUB's A/B script (valid GRUB syntax) and an environment
    // block that grub-editenv reads as the factory state.
    let (offset, size) = built.partition("esp");
    let esp = built.path("esp.vfat");
    extract(&built.image, offset, size, &esp);
    let (ok, out) = tool("fsck.vfat", &["-n", s(&esp)]);
    assert!(ok, "{out}");
    let cfg = built.path("grub.cfg");
    let env = built.path("grubenv");
    for (from, to) in [("::EFI/BOOT/grub.cfg", &cfg), ("::EFI/BOOT/grubenv", &env)] {
        let (ok, out) = tool("mcopy", &["-n", "-i", s(&esp), from, s(to)]);
        assert!(ok, "{out}");
    }
    let (ok, out) = tool("grub-script-check", &[s(&cfg)]);
    assert!(ok, "{out}");
    let (ok, vars) = tool("grub-editenv", &[s(&env), "list"]);
    assert!(ok, "{vars}");
    for var in ["ORDER=A B", "A_OK=1", "A_TRY=0", "B_OK=1", "B_TRY=0"] {
        assert!(
            vars.lines().any(|l| l == var),
            "{var} missing from:\n{vars}"
        );
    }

    // The manifest's hashes are the bytes': the whole image and a partition.
    let manifest = built.manifest_json();
    assert_eq!(
        manifest["signed"]["image_sha256"],
        sha256_file(&built.image)
    );
    let slot = built.path("root_b.ext4");
    let (offset, size) = built.partition("root_b");
    extract(&built.image, offset, size, &slot);
    let root_b = manifest["signed"]["partitions"][2].clone();
    assert_eq!(root_b["name"], "root_b");
    assert_eq!(root_b["sha256"], sha256_file(&slot));
}

#[test]
fn bmaptool_with_our_bmap_writes_what_our_flash_writes() {
    let built = Built::new();
    let ours = built.path("ours.img");
    let theirs = built.path("theirs.img");
    // Our flash into a file that held other data: the result is the image, byte for byte.
    std::fs::write(&ours, pseudo_random(MIB as usize, 3)).unwrap();
    let (ok, stdout, stderr) = built.flash(&built.image, &ours, &[]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("read back and verified"), "{stdout}");
    assert!(!stdout.contains("from the disk"), "{stdout}");
    let manifest = built.manifest_json();
    let hash = manifest["signed"]["image_sha256"].as_str().unwrap();
    assert!(
        stdout.contains(hash),
        "the summary names the image hash:\n{stdout}"
    );

    let (ok, out) = tool(
        "bmaptool",
        &[
            "copy",
            "--bmap",
            s(&built.bmap()),
            s(&built.image),
            s(&theirs),
        ],
    );
    assert!(ok, "bmaptool refused our image or bmap:\n{out}");
    assert_eq!(
        sha256_file(&ours),
        sha256_file(&theirs),
        "ours and bmaptool's differ"
    );
    assert_eq!(sha256_file(&ours), hash);

    // Asked to, a flash into a file also reads it back from the disk, and says so.
    let on_disk = built.path("on-disk.img");
    let (ok, stdout, stderr) = built.flash(&built.image, &on_disk, &["--verify-on-disk"]);
    assert!(ok, "{stderr}");
    assert!(
        stdout.contains("read back from the disk and verified"),
        "{stdout}"
    );
    assert_eq!(sha256_file(&on_disk), hash);

    // A flash whose output nobody reads any more (`... | head -1`) still writes and verifies
    // the whole image, then exits quietly as SIGPIPE would, instead of panicking.
    let unread = built.path("unread.img");
    let (status, _, stderr) = run(built
        .flash_command(&built.image, &unread)
        .stdout(closed_pipe()))
    .unwrap();
    assert_eq!(status.code(), Some(141), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");
    assert_eq!(sha256_file(&unread), hash);

    // bmaptool checks our range checksums: a flipped byte in a mapped block fails its copy.
    let damaged = built.path("damaged.img");
    std::fs::copy(&built.image, &damaged).unwrap();
    let (offset, _) = built.partition("root_a");
    flip_byte(&damaged, offset + 1024 + 56); // ext4 superblock magic
    let (ok, out) = tool(
        "bmaptool",
        &[
            "copy",
            "--bmap",
            s(&built.bmap()),
            s(&damaged),
            s(&built.path("x.img")),
        ],
    );
    assert!(!ok, "bmaptool accepted a damaged image:\n{out}");
    assert!(out.to_lowercase().contains("checksum"), "{out}");

    // Onto a real block device: only mapped blocks are written, the rest keeps what it had.
    let Some(dev) = LoopDevice::new(
        &built.path("disk"),
        manifest["signed"]["image_size"].as_u64().unwrap() + 8 * MIB,
        0x5a,
    ) else {
        return;
    };
    let (ok, stdout, stderr) = built.flash(&built.image, &dev.path, &[]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains(&dev.name()), "{stdout}");
    let bmap = std::fs::read_to_string(built.bmap()).unwrap();
    let mut device = std::fs::File::open(&dev.path).unwrap();
    let mut image = std::fs::File::open(&built.image).unwrap();
    let mut checked = 0;
    for range in bmap
        .lines()
        .filter_map(|l| l.split_once("\"> "))
        .map(|(_, r)| r.trim_end_matches(" </Range>"))
    {
        let (first, last) = match range.split_once('-') {
            Some((a, b)) => (a.parse::<u64>().unwrap(), b.parse::<u64>().unwrap()),
            None => (range.parse().unwrap(), range.parse().unwrap()),
        };
        let (a, b) = (
            read_at(&mut device, first * 4096, (last - first + 1) * 4096),
            read_at(&mut image, first * 4096, (last - first + 1) * 4096),
        );
        assert!(a == b, "blocks {first}-{last} differ on the device");
        checked += 1;
    }
    assert!(checked > 3);
    // A block the bmap leaves out (in the middle of the data partition) was not written.
    let (offset, size) = built.partition("data");
    assert_eq!(
        read_at(&mut device, offset + size / 2, 4096),
        vec![0x5a; 4096]
    );
}

fn read_at(file: &mut std::fs::File, offset: u64, len: u64) -> Vec<u8> {
    std::io::Seek::seek(file, std::io::SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len as usize];
    file.read_exact(&mut buf).unwrap();
    buf
}

/// The staged replacements (`.NAME.atlasmesh-…`) beside a file target, in name order.
fn staged_beside(target: &Path) -> Vec<PathBuf> {
    let prefix = format!(
        ".{}.atlasmesh-",
        target.file_name().unwrap().to_string_lossy()
    );
    let mut staged: Vec<PathBuf> = std::fs::read_dir(target.parent().unwrap())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with(&prefix)
        })
        .collect();
    staged.sort();
    staged
}

fn flip_byte(path: &Path, offset: u64) {
    let mut file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let byte = read_at(&mut file, offset, 1)[0];
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(offset)).unwrap();
    file.write_all(&[byte ^ 0xff]).unwrap();
}

#[test]
fn tampered_image_bmap_or_manifest_is_refused_before_writing() {
    let built = Built::new();
    let target = built.path("target.img");
    let original = pseudo_random(2 * MIB as usize, 9);
    let untouched = |what: &str| {
        assert_eq!(
            std::fs::read(&target).unwrap(),
            original,
            "{what}: the target was written"
        );
        // Nor is a staged replacement left beside it.
        let staged = staged_beside(&target);
        assert!(staged.is_empty(), "{what}: left behind {staged:?}");
    };
    std::fs::write(&target, &original).unwrap();

    let copy = |name: &str| built.copy_to(&built.path(name));

    // The image: one byte of a file in root_b.
    let image = copy("image-tampered.img");
    let (offset, _) = built.partition("root_b");
    flip_byte(&image, offset + 1024 + 56);
    let (ok, _, stderr) = built.flash(&image, &target, &[]);
    assert!(!ok);
    assert!(stderr.contains("damaged or was modified"), "{stderr}");
    untouched("tampered image");

    // The bmap: a range dropped, its own checksum left as it was.
    let image = copy("bmap-tampered.img");
    let bmap_path = PathBuf::from(format!("{}.bmap", image.display()));
    let bmap = std::fs::read_to_string(&bmap_path).unwrap();
    let line = bmap
        .lines()
        .find(|l| l.contains("<Range"))
        .unwrap()
        .to_owned();
    std::fs::write(&bmap_path, bmap.replacen(&format!("{line}\n"), "", 1)).unwrap();
    let (ok, _, stderr) = built.flash(&image, &target, &[]);
    assert!(!ok);
    assert!(
        stderr.contains("not the one the signed manifest names"),
        "{stderr}"
    );
    untouched("tampered bmap");

    // The manifest: a partition hash changed; and a manifest from another fleet's key.
    let image = copy("manifest-tampered.img");
    let manifest_path = PathBuf::from(format!("{}.manifest", image.display()));
    let mut manifest = built.manifest_json();
    manifest["signed"]["partitions"][1]["sha256"] = "00".repeat(32).into();
    std::fs::write(&manifest_path, serde_json::to_vec(&manifest).unwrap()).unwrap();
    let (ok, _, stderr) = built.flash(&image, &target, &[]);
    assert!(!ok);
    assert!(
        stderr.contains("not signed by the fleet's release"),
        "{stderr}"
    );
    untouched("tampered manifest");

    let other = Fleet::new().unwrap();
    let image = built.path("other-fleet.img");
    let (status, _, stderr) = run(atlasmesh()
        .args([
            "image",
            "build",
            "--rootfs",
            s(&built.rootfs),
            "--out",
            s(&image),
            "--key",
        ])
        .arg(other.keys.join("targets.pem")))
    .unwrap();
    assert!(status.success(), "{stderr}");
    let (ok, _, stderr) = built.flash(&image, &target, &[]);
    assert!(!ok);
    assert!(
        stderr.contains("not signed by the fleet's release"),
        "{stderr}"
    );
    untouched("another fleet's image");

    // A missing manifest is an error, not an unsigned flash.
    std::fs::remove_file(format!("{}.manifest", image.display())).unwrap();
    let (ok, _, stderr) = built.flash(&image, &target, &[]);
    assert!(!ok);
    assert!(stderr.contains("manifest"), "{stderr}");
    untouched("missing manifest");
}

/// A flash onto a file that is killed leaves the old file or the new image, never a mix, and
/// at worst its hidden staged file, which the next flash onto that target removes and names.
/// A staged file some process still holds a lock on (a flash still running; here util-linux's
/// `flock` holds it) is left alone.
#[test]
fn a_killed_flash_leaves_the_old_file_and_the_next_flash_clears_what_it_left() {
    let built = Built::new();
    let dir = built.path("targets");
    std::fs::create_dir(&dir).unwrap();
    let target = dir.join("target.img");
    let original = pseudo_random(2 * MIB as usize, 12);
    let (old, new) = (
        hex::encode(Sha256::digest(&original)),
        sha256_file(&built.image),
    );
    let staged = || staged_beside(&target);

    // Killed at ever later moments, from before it opens the target to after it is done.
    let mut left = 0;
    for delay_ms in [0, 5, 10, 20, 40, 80, 160, 320] {
        std::fs::write(&target, &original).unwrap();
        let mut child = built
            .flash_command(&built.image, &target)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        std::thread::sleep(Duration::from_millis(delay_ms));
        let _ = child.kill();
        child.wait().unwrap();
        let now = sha256_file(&target);
        assert!(
            now == old || now == new,
            "killed after {delay_ms} ms: the target is neither the old file nor the image"
        );
        left += staged().len();
        // Whatever this one left, the next starts from it.
    }
    eprintln!("note: the killed flashes left {left} staged files");

    // What a killed flash leaves for sure, and a staged file a live process holds.
    let dead = dir.join(".target.img.atlasmesh-killed");
    let live = dir.join(".target.img.atlasmesh-running");
    std::fs::write(&dead, b"half an image").unwrap();
    std::fs::write(&live, b"being written").unwrap();
    // One process holding the lock (flock's own way forks the command, which would outlive
    // a kill of flock).
    let mut holder = Command::new("sh")
        .args([
            "-c",
            "exec 9<>\"$0\" && flock --exclusive 9 && exec sleep 60",
        ])
        .arg(&live)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while tool("flock", &["--nonblock", "--exclusive", s(&live), "true"]).0 {
        assert!(Instant::now() < deadline, "flock did not take its lock");
        std::thread::sleep(Duration::from_millis(20));
    }
    let abandoned: Vec<PathBuf> = staged().into_iter().filter(|p| *p != live).collect();

    let (ok, stdout, stderr) = built.flash(&built.image, &target, &[]);
    let _ = holder.kill();
    let _ = holder.wait();
    assert!(ok, "{stderr}");
    assert_eq!(sha256_file(&target), new);
    assert_eq!(staged(), std::slice::from_ref(&live), "{stdout}");
    for path in &abandoned {
        assert!(
            stdout.contains(&format!("removed  {}", path.display())),
            "{} not named: {stdout}",
            path.display()
        );
    }
}

/// The device holding `/`, if `/` is on a block device.
fn root_device() -> Option<PathBuf> {
    let (ok, source) = tool("findmnt", &["-n", "-o", "SOURCE", "/"]);
    let source = PathBuf::from(source.trim());
    (ok && source.starts_with("/dev/")).then_some(source)
}

#[test]
fn the_system_disk_a_mounted_disk_and_the_image_s_disk_are_refused() {
    let built = Built::new();
    // Every case below uses an image with a damaged block: should a device check ever fail
    // to refuse, the image check still stops the flash before anything is written.
    let image = built.copy_to(&built.path("guard.img"));
    let (offset, _) = built.partition("root_a");
    flip_byte(&image, offset + 1024 + 56);

    match root_device() {
        Some(root) => {
            let (ok, _, stderr) = built.flash(&image, &root, &["--confirm", "anything"]);
            assert!(!ok);
            assert!(
                stderr.contains("holds the running system's root filesystem"),
                "{stderr}"
            );
        }
        None => eprintln!("note: / is not on a block device here; the system-disk case is skipped"),
    }

    let image_size = built.manifest_json()["signed"]["image_size"]
        .as_u64()
        .unwrap();
    let Some(mounted) = LoopDevice::new(&built.path("mounted-disk"), image_size + 64 * MIB, 0)
    else {
        return;
    };
    let (ok, out) = tool("mkfs.ext4", &["-q", "-F", s(&mounted.path)]);
    assert!(ok, "{out}");
    let mountpoint = built.path("mnt");
    std::fs::create_dir(&mountpoint).unwrap();
    let _mount = Mount::new(&mounted.path, &mountpoint);
    let (ok, _, stderr) = built.flash(&image, &mounted.path, &[]);
    assert!(!ok);
    assert!(stderr.contains("is mounted at"), "{stderr}");
    assert!(stderr.contains(s(&mountpoint)), "{stderr}");

    // The image itself lives on that disk: flashing the disk would destroy the source.
    let inside = mountpoint.join("depot.img");
    std::fs::copy(&image, &inside).unwrap();
    std::fs::copy(built.bmap(), format!("{}.bmap", inside.display())).unwrap();
    std::fs::copy(built.manifest(), format!("{}.manifest", inside.display())).unwrap();
    let (ok, _, stderr) = built.flash(&inside, &mounted.path, &[]);
    assert!(!ok);
    assert!(stderr.contains("holds the image being flashed"), "{stderr}");

    // Too small, and read-only.
    let Some(small) = LoopDevice::new(&built.path("small-disk"), image_size / 2, 0) else {
        return;
    };
    let (ok, _, stderr) = built.flash(&built.image, &small.path, &[]);
    assert!(!ok);
    assert!(stderr.contains("but the image needs"), "{stderr}");
    let Some(readonly) =
        LoopDevice::with_flags(&built.path("ro-disk"), image_size + MIB, 0, &["-r"])
    else {
        return;
    };
    let (ok, _, stderr) = built.flash(&built.image, &readonly.path, &[]);
    assert!(!ok);
    assert!(stderr.contains("read-only"), "{stderr}");
}

/// A full file system and a disk that fails partway (a loop device whose backing store runs
/// out: its writes come back as I/O errors, as a dying drive's do). A file target is refused
/// before anything is written and stays as it was; the failing disk stops the flash with the
/// error and the device named, not a panic and not a "flashed".
#[test]
fn a_full_file_system_and_a_failing_disk_stop_the_flash_with_the_reason() {
    let built = Built::new();
    let signed = &built.manifest_json()["signed"];
    let (image_size, mapped) = (
        signed["image_size"].as_u64().unwrap(),
        signed["mapped_bytes"].as_u64().unwrap(),
    );
    // Room for half the mapped blocks, and for the old target.
    let Some(small) = Mount::tmpfs(&built.path("small"), mapped / 2 + MIB) else {
        return;
    };
    let target = small.0.join("target.img");
    let original = pseudo_random(512 * 1024, 11);
    std::fs::write(&target, &original).unwrap();
    let (ok, stdout, stderr) = built.flash(&built.image, &target, &[]);
    assert!(!ok, "{stdout}");
    assert!(
        stderr.contains(&format!("refusing {}", target.display()))
            && stderr.contains("free, and the image's mapped blocks need"),
        "{stderr}"
    );
    assert_eq!(std::fs::read(&target).unwrap(), original);
    let left: Vec<_> = std::fs::read_dir(&small.0)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(
        left,
        ["target.img"],
        "a refused flash leaves nothing behind"
    );

    std::fs::remove_file(&target).unwrap();
    let Some(failing) = LoopDevice::new(&small.0.join("disk"), image_size, 0) else {
        return;
    };
    let (ok, stdout, stderr) = built.flash(&built.image, &failing.path, &[]);
    assert!(
        !ok,
        "a flash onto a failing disk reported success: {stdout}"
    );
    assert!(!stdout.contains("flashed"), "{stdout}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    let device = failing.path.display().to_string();
    assert!(
        stderr.contains(&format!("writing {device}: "))
            || stderr.contains(&format!("syncing {device}: "))
            || stderr.contains(&format!("reading back {device}: ")),
        "the error names what failed on which device: {stderr}"
    );
    assert!(
        stderr.contains("Input/output error") || stderr.contains("No space left"),
        "{stderr}"
    );
}

#[test]
fn a_drive_over_128_gb_needs_its_serial_or_name_typed() {
    let built = Built::new();
    // A sparse 200 GB backing file: a "large drive" that costs nothing.
    let Some(big) = LoopDevice::new(&built.path("big-disk"), 200_000_000_000, 0) else {
        return;
    };
    let (ok, _, stderr) = built.flash(&built.image, &big.path, &[]);
    assert!(!ok, "a large drive was written without confirmation");
    assert!(
        stderr.contains("larger than 128 GB") && stderr.contains("--confirm"),
        "{stderr}"
    );
    let (ok, _, stderr) = built.flash(&built.image, &big.path, &["--confirm", "sda"]);
    assert!(!ok);
    assert!(stderr.contains("not confirmed"), "{stderr}");
    // A loop device reports no serial, so its kernel name confirms it.
    let (ok, stdout, stderr) = built.flash(&built.image, &big.path, &["--confirm", &big.name()]);
    assert!(ok, "{stderr}");
    assert!(stdout.contains("flashed"), "{stdout}");
}

/// The bootloader environment a test powers on with, read with the bootloader's own host
/// tools.
#[derive(Clone, Copy)]
enum Loader<'a> {
    /// GRUB's environment block file, through `grub-editenv`.
    Grub(&'a Path),
    /// libubootenv's configuration naming U-Boot's environment, through
    /// `fw_printenv`/`fw_setenv`.
    UBoot(&'a Path),
}

impl Loader<'_> {
    fn list(self) -> String {
        let (ok, out) = match self {
            Loader::Grub(env) => tool("grub-editenv", &[s(env), "list"]),
            Loader::UBoot(config) => tool("fw_printenv", &["-c", s(config)]),
        };
        assert!(ok, "{out}");
        out
    }

    fn has(self, line: &str) -> bool {
        self.list().lines().any(|l| l == line)
    }
}

/// The bootloader's side of the A/B scheme, as `image/grub/grub.cfg` does it at power-on,
/// played on a real environment block through `grub-editenv` (independently of our code):
/// boot the first slot of ORDER armed for a trial (clearing the trial first), else the first
/// good one.
fn power_on(grubenv: &Path, cmdline: &Path) -> &'static str {
    let loader = Loader::Grub(grubenv);
    let list = loader.list();
    let var = |name: &str, default: &str| -> String {
        list.lines()
            .find_map(|l| l.strip_prefix(&format!("{name}=")))
            .unwrap_or(default)
            .to_owned()
    };
    let order = var("ORDER", "A B");
    let mut booted = "A";
    for slot in order.split_whitespace() {
        let slot = if slot == "A" { "A" } else { "B" };
        if var(&format!("{slot}_TRY"), "0") == "1" {
            let (ok, out) = tool(
                "grub-editenv",
                &[s(grubenv), "set", &format!("{slot}_TRY=0")],
            );
            assert!(ok, "{out}");
            booted = slot;
            break;
        }
        if var(&format!("{slot}_OK"), "0") == "1" {
            booted = slot;
            break;
        }
    }
    std::fs::write(
        cmdline,
        format!(
            "root=PARTLABEL=root_{} rootwait ro atlasmesh.slot={booted}\n",
            booted.to_lowercase()
        ),
    )
    .unwrap();
    booted
}

#[test]
fn a_trial_boot_without_mark_good_falls_back_and_with_it_stays() {
    let built = Built::new();
    let dir = built.dir.path();
    let grubenv = dir.join("grubenv");
    let (offset, size) = built.partition("esp");
    let esp = dir.join("esp.vfat");
    extract(&built.image, offset, size, &esp);
    // The factory environment block, exactly as the image carries it.
    let (ok, out) = tool(
        "mcopy",
        &["-n", "-i", s(&esp), "::EFI/BOOT/grubenv", s(&grubenv)],
    );
    assert!(ok, "{out}");
    let (_, root_size) = built.partition("root_a");
    let (slot_a, slot_b) = built.slot_files();
    let cmdline = dir.join("cmdline");
    let data_dir = dir.join("data");
    let env = vec![
        (
            "ATLASMESH_IMAGE__GRUBENV".to_owned(),
            s(&grubenv).to_owned(),
        ),
        ("ATLASMESH_IMAGE__SLOT_A".to_owned(), s(&slot_a).to_owned()),
        ("ATLASMESH_IMAGE__SLOT_B".to_owned(), s(&slot_b).to_owned()),
        (
            "ATLASMESH_IMAGE__CMDLINE".to_owned(),
            s(&cmdline).to_owned(),
        ),
        ("ATLASMESH_DATA_DIR".to_owned(), s(&data_dir).to_owned()),
    ];
    // The appliance's depot has run before (its store exists), so the image tools' changes
    // land in its audit trail.
    drop(
        Server::start(Options {
            data_dir: Some(data_dir.clone()),
            ..Default::default()
        })
        .unwrap(),
    );
    let cli = |args: &[&str]| {
        let mut cmd = atlasmesh();
        cmd.arg("image")
            .args(args)
            .envs(env.iter().map(|(k, v)| (k, v)));
        run(&mut cmd).unwrap()
    };
    let install = || {
        let (status, stdout, stderr) =
            cli(&["install", s(&built.image), "--root", s(&built.fleet.root())]);
        assert!(status.success(), "install failed: {stderr}");
        stdout
    };

    assert_eq!(
        power_on(&grubenv, &cmdline),
        "A",
        "the factory image boots A"
    );

    // Install into B, which is then armed.
    let stdout = install();
    assert!(stdout.contains("into slot B"), "{stdout}");
    // B holds the image's root_b: the same tree, with B's own label and file system UUID.
    let root_b = dir.join("root_b.ext4");
    extract(
        &built.image,
        built.partition("root_b").0,
        root_size,
        &root_b,
    );
    assert_eq!(
        sha256_file(&slot_b),
        sha256_file(&root_b),
        "slot B is not the update"
    );
    let (ok, out) = tool("e2fsck", &["-fn", s(&slot_b)]);
    assert!(ok, "{out}");
    let (_, label) = tool("e2label", &[s(&slot_b)]);
    assert_eq!(label.trim(), "root_b", "GRUB finds slot B by this label");
    let (_, status) = cli(&["status"])
        .1
        .split_once("next boot:")
        .map(|(a, b)| (a.to_owned(), b.to_owned()))
        .unwrap();
    assert!(status.contains("slot B"), "{status}");

    // Trial of B; it never marks good (say it hangs). The next power-on returns to A, and so
    // does every one after it.
    assert_eq!(power_on(&grubenv, &cmdline), "B");
    // While B is on its trial, another install is refused: A is the only good slot left.
    let (status, _, stderr) = cli(&["install", s(&built.image), "--root", s(&built.fleet.root())]);
    assert!(!status.success());
    assert!(stderr.contains("not marked good yet"), "{stderr}");
    assert_eq!(
        power_on(&grubenv, &cmdline),
        "A",
        "no fallback after a failed trial"
    );
    assert_eq!(power_on(&grubenv, &cmdline), "A");

    // Again; a depot restart before the reboot (which confirms A) must not cancel B's trial.
    install();
    let (status, stdout, stderr) = cli(&["mark-good"]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("slot A"), "{stdout}");
    // This time the depot starts on B, passes its self-test and marks B good itself.
    assert_eq!(power_on(&grubenv, &cmdline), "B");
    let notify_path = dir.join("notify.sock");
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_secs(60)))
        .unwrap();
    let mut server_env = env.clone();
    server_env.retain(|(k, _)| k != "ATLASMESH_DATA_DIR");
    server_env.push(("NOTIFY_SOCKET".into(), s(&notify_path).to_owned()));
    server_env.push(("WATCHDOG_USEC".into(), "400000".into()));
    let depot = Server::start(Options {
        data_dir: Some(data_dir.clone()),
        env: server_env,
        ..Default::default()
    })
    .unwrap();
    // systemd's side: READY=1 once serving, then watchdog pings.
    let mut messages = Vec::new();
    let mut buf = [0u8; 512];
    while !messages.iter().any(|m: &String| m.contains("WATCHDOG=1")) {
        let n = notify
            .recv(&mut buf)
            .expect("no notification from the depot within 60 s");
        messages.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    assert!(messages[0].contains("READY=1"), "{messages:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, list) = tool("grub-editenv", &[s(&grubenv), "list"]);
        if list.lines().any(|l| l == "B_OK=1") {
            assert!(list.lines().any(|l| l == "ORDER=B A"), "{list}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the depot did not mark slot B good:\n{list}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    // Every boot-slot change is in the audit trail: who, what, and how it ended. (The
    // mark-good on A above found A already good and changed nothing.)
    let token = mint_token(&data_dir, "admin", "auditor").unwrap();
    let audit: serde_json::Value = http()
        .get(depot.url("/api/v1/audit"))
        .bearer_auth(&token)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let trail: Vec<(String, String, String, String)> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .rev() // oldest first
        .filter(|r| r["action"].as_str().unwrap().starts_with("image."))
        .map(|r| {
            let field = |k: &str| r[k].as_str().unwrap_or_default().to_owned();
            let slot = r["detail"]["slot"].as_str().unwrap_or("-").to_owned();
            (field("actor"), field("action"), field("result"), slot)
        })
        .collect();
    let user = format!("cli:{}", std::env::var("USER").unwrap_or("unknown".into()));
    let entry = |actor: &str, action: &str, result: &str, slot: &str| {
        (actor.to_owned(), action.into(), result.into(), slot.into())
    };
    assert_eq!(
        trail,
        [
            entry(&user, "image.install", "ok", "B"),
            entry(&user, "image.install", "failed", "-"),
            entry(&user, "image.install", "ok", "B"),
            entry("system", "image.mark_good", "ok", "B"),
        ],
        "{audit:#}"
    );
    drop(depot);
    assert_eq!(power_on(&grubenv, &cmdline), "B");
    assert_eq!(
        power_on(&grubenv, &cmdline),
        "B",
        "a good slot keeps booting"
    );

    // From B, the next install goes to A, and refuses a bundle that fails its checks.
    flip_byte(&built.image, built.partition("root_a").0 + 1024 + 56);
    let (status, _, stderr) = cli(&["install", s(&built.image), "--root", s(&built.fleet.root())]);
    assert!(!status.success());
    assert!(stderr.contains("damaged or was modified"), "{stderr}");
    let (_, list) = tool("grub-editenv", &[s(&grubenv), "list"]);
    assert!(
        list.lines().any(|l| l == "A_TRY=0"),
        "a refused bundle armed a slot:\n{list}"
    );
    assert_eq!(power_on(&grubenv, &cmdline), "B");
}

/// An arm64 board booting with U-Boot, played by QEMU with Debian's U-Boot build for it:
/// U-Boot loads its environment from the board's flash, runs `image/uboot/boot.cmd` (our
/// slot choice) and boots what it chose, here the built image as the board's disk.
struct UBootBoard {
    dir: PathBuf,
    /// The environment as the board keeps it: what libubootenv's configuration names.
    env_image: PathBuf,
    /// libubootenv's configuration for the board's environment.
    fw_env_config: PathBuf,
    disk: PathBuf,
}

/// U-Boot's environment size in Debian's `qemu_arm64` build (`CONFIG_ENV_SIZE`).
const UBOOT_ENV_SIZE: &str = "0x40000";

impl UBootBoard {
    /// A board whose environment holds `vars` (one `NAME=VALUE` per line) besides what the
    /// board needs to boot: its boot command runs our script from memory, and prints what
    /// the script left for the kernel and the environment.
    fn new(dir: &Path, disk: &Path, vars: &str) -> Self {
        let text = dir.join("uboot-env.txt");
        std::fs::write(
            &text,
            format!(
                "bootdelay=0\n\
                 kernel_addr_r=0x40400000\n\
                 bootcmd=virtio scan; setenv devtype virtio; setenv devnum 0; \
                 source 0x45000000; echo ==ENV==; printenv bootargs ORDER A_OK A_TRY B_OK \
                 B_TRY; poweroff\n{vars}"
            ),
        )
        .unwrap();
        let env_image = dir.join("uboot-env.bin");
        let (ok, out) = tool(
            "mkenvimage",
            &["-s", UBOOT_ENV_SIZE, "-o", s(&env_image), s(&text)],
        );
        assert!(ok, "{out}");
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../image/uboot/boot.cmd");
        let (ok, out) = tool(
            "mkimage",
            &[
                "-A",
                "arm64",
                "-T",
                "script",
                "-C",
                "none",
                "-d",
                s(&script),
                s(&dir.join("boot.scr")),
            ],
        );
        assert!(ok, "{out}");
        let fw_env_config = dir.join("fw_env.config");
        std::fs::write(
            &fw_env_config,
            format!("{} 0x0 {UBOOT_ENV_SIZE}\n", s(&env_image)),
        )
        .unwrap();
        Self {
            dir: dir.to_owned(),
            env_image,
            fw_env_config,
            disk: disk.to_owned(),
        }
    }

    /// Powers the board on until U-Boot hands over to the kernel; writes the kernel command
    /// line U-Boot built to `cmdline` and returns the slot U-Boot chose.
    ///
    /// QEMU 7.2's flash emulation fails U-Boot's buffered flash writes part-way, so the
    /// board's flash is a copy of its environment and what U-Boot's `saveenv` would have
    /// stored (the script's variables as U-Boot holds them at hand-over) is written back with
    /// `fw_setenv`.
    fn power_on(&self, cmdline: &Path) -> &'static str {
        let flash = self.dir.join("pflash1.img");
        std::fs::copy(&self.env_image, &flash).unwrap();
        // The virt board's flash banks are 64 MiB.
        std::fs::OpenOptions::new()
            .write(true)
            .open(&flash)
            .unwrap()
            .set_len(64 * MIB)
            .unwrap();
        let output = Command::new("timeout")
            .args([
                "120",
                "qemu-system-aarch64",
                "-M",
                "virt",
                "-cpu",
                "cortex-a57",
            ])
            .args([
                "-m",
                "256",
                "-nographic",
                "-nic",
                "none",
                "-monitor",
                "none",
            ])
            .args([
                "-serial",
                "stdio",
                "-bios",
                "/usr/lib/u-boot/qemu_arm64/u-boot.bin",
            ])
            .arg("-drive")
            .arg(format!("if=pflash,unit=1,format=raw,file={}", s(&flash)))
            .arg("-drive")
            .arg(format!(
                "if=none,id=disk,format=raw,readonly=on,file={}",
                s(&self.disk)
            ))
            .args(["-device", "virtio-blk-device,drive=disk", "-device"])
            .arg(format!(
                "loader,file={},addr=0x45000000,force-raw=on",
                s(&self.dir.join("boot.scr"))
            ))
            .output()
            .unwrap();
        let console = String::from_utf8_lossy(&output.stdout).into_owned();
        assert!(output.status.success(), "QEMU failed: {console}");
        let slot = if console.contains("AtlasMesh depot: booting slot A (root_a)") {
            "A"
        } else if console.contains("AtlasMesh depot: booting slot B (root_b)") {
            "B"
        } else {
            panic!("the script chose no slot:\n{console}")
        };
        let (_, after) = console
            .split_once("==ENV==")
            .unwrap_or_else(|| panic!("U-Boot did not finish the script:\n{console}"));
        let mut saved = Command::new("fw_setenv");
        saved.arg("-c").arg(&self.fw_env_config);
        for line in after.lines() {
            match line.trim_end().split_once('=') {
                Some(("bootargs", args)) => std::fs::write(cmdline, format!("{args}\n")).unwrap(),
                Some((name, value)) => {
                    saved.args([name, value]);
                }
                None => {}
            }
        }
        let (status, _, stderr) = run(&mut saved).unwrap();
        assert!(status.success(), "{stderr}");
        slot
    }
}

#[test]
fn a_trial_boot_falls_back_the_same_way_under_u_boot() {
    let built = Built::new();
    let dir = built.dir.path();
    let board = UBootBoard::new(
        dir,
        &built.image,
        "ORDER=A B\nA_OK=1\nA_TRY=0\nB_OK=0\nB_TRY=0\n",
    );
    let config = board.fw_env_config.clone();
    let loader = Loader::UBoot(&config);
    let (slot_a, slot_b) = built.slot_files();
    let cmdline = dir.join("cmdline");
    let data_dir = dir.join("data");
    let cli = |args: &[&str]| {
        let mut cmd = atlasmesh();
        cmd.arg("image")
            .args(args)
            .env("ATLASMESH_IMAGE__BOOTLOADER", "uboot")
            .env("ATLASMESH_IMAGE__FW_ENV_CONFIG", &config)
            .env("ATLASMESH_IMAGE__SLOT_A", &slot_a)
            .env("ATLASMESH_IMAGE__SLOT_B", &slot_b)
            .env("ATLASMESH_IMAGE__CMDLINE", &cmdline)
            .env("ATLASMESH_DATA_DIR", &data_dir);
        run(&mut cmd).unwrap()
    };
    let install = || cli(&["install", s(&built.image), "--root", s(&built.fleet.root())]);

    assert_eq!(board.power_on(&cmdline), "A", "the factory slot boots");
    let kernel_args = std::fs::read_to_string(&cmdline).unwrap();
    assert!(
        kernel_args.starts_with("root=PARTLABEL=root_a ")
            && kernel_args.contains("atlasmesh.slot=A"),
        "{kernel_args}"
    );
    let (status, stdout, stderr) = cli(&["status"]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("U-Boot environment"), "{stdout}");
    assert!(stdout.contains("running slot:     A"), "{stdout}");

    // Installed into B and armed in one write of the environment. B's trial never marks
    // good, so the next power-on is A again.
    let (status, stdout, stderr) = install();
    assert!(status.success(), "install failed: {stderr}");
    assert!(stdout.contains("into slot B"), "{stdout}");
    assert!(
        loader.has("ORDER=B A") && loader.has("B_TRY=1"),
        "{}",
        loader.list()
    );
    assert_eq!(board.power_on(&cmdline), "B");
    assert!(
        loader.has("B_TRY=0"),
        "the trial was not used up:\n{}",
        loader.list()
    );
    assert_eq!(
        board.power_on(&cmdline),
        "A",
        "no fallback after a failed trial"
    );
    assert_eq!(board.power_on(&cmdline), "A");

    // Again, and this time B marks itself good: it stays.
    let (status, _, stderr) = install();
    assert!(status.success(), "{stderr}");
    assert_eq!(board.power_on(&cmdline), "B");
    let (status, stdout, stderr) = cli(&["mark-good"]);
    assert!(status.success(), "{stderr}");
    assert!(stdout.contains("slot B"), "{stdout}");
    assert!(loader.has("B_OK=1"), "{}", loader.list());
    assert_eq!(board.power_on(&cmdline), "B");
    assert_eq!(board.power_on(&cmdline), "B", "a good slot keeps booting");

    // A damaged environment (its CRC no longer matches) is neither guessed at nor
    // overwritten: the install is refused before slot A is touched.
    let slot_a_before = sha256_file(&slot_a);
    let mut bytes = std::fs::read(&board.env_image).unwrap();
    bytes[6] ^= 0x20;
    std::fs::write(&board.env_image, &bytes).unwrap();
    let (status, _, stderr) = install();
    assert!(!status.success(), "installed with a damaged environment");
    assert!(stderr.contains("fw_printenv"), "{stderr}");
    assert_eq!(sha256_file(&slot_a), slot_a_before, "slot A was written");
    assert_eq!(std::fs::read(&board.env_image).unwrap(), bytes);
}

/// A loop device over a sparse file, detached on drop. `None` (with a note) where loop
/// devices cannot be made.
struct LoopDevice {
    path: PathBuf,
}

impl LoopDevice {
    fn new(backing: &Path, size: u64, fill: u8) -> Option<Self> {
        Self::with_flags(backing, size, fill, &[])
    }

    fn with_flags(backing: &Path, size: u64, fill: u8, flags: &[&str]) -> Option<Self> {
        let file = std::fs::File::create(backing).unwrap();
        file.set_len(size).unwrap();
        if fill != 0 {
            let chunk = vec![fill; MIB as usize];
            let mut f = &file;
            for _ in 0..(size / MIB).min(1024) {
                f.write_all(&chunk).unwrap();
            }
        }
        drop(file);
        let mut args = vec!["-f", "--show"];
        args.extend_from_slice(flags);
        args.push(s(backing));
        let (ok, out) = tool("losetup", &args);
        if !ok {
            eprintln!(
                "note: no loop device here ({}); block-device cases skipped",
                out.trim()
            );
            return None;
        }
        Some(Self {
            path: PathBuf::from(out.trim()),
        })
    }

    fn name(&self) -> String {
        self.path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .into_owned()
    }
}

impl Drop for LoopDevice {
    fn drop(&mut self) {
        let _ = Command::new("losetup").arg("-d").arg(&self.path).status();
    }
}

struct Mount(PathBuf);

impl Mount {
    fn new(device: &Path, at: &Path) -> Self {
        let (ok, out) = tool("mount", &[s(device), s(at)]);
        assert!(ok, "{out}");
        Self(at.to_owned())
    }

    /// A tmpfs of `bytes` at `at` (a new directory), or `None` where mounting is not allowed.
    fn tmpfs(at: &Path, bytes: u64) -> Option<Self> {
        std::fs::create_dir(at).unwrap();
        let (ok, out) = tool(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                &format!("size={bytes}"),
                "tmpfs",
                s(at),
            ],
        );
        if !ok {
            eprintln!(
                "note: cannot mount a tmpfs here ({}); case skipped",
                out.trim()
            );
            return None;
        }
        Some(Self(at.to_owned()))
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        // A loop device just detached may still hold its backing file here for a moment.
        let detached = Command::new("umount").arg(&self.0).status();
        if !detached.is_ok_and(|s| s.success()) {
            let _ = Command::new("umount").arg("--lazy").arg(&self.0).status();
        }
    }
}
