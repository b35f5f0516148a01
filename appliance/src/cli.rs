//! The command line. Every subcommand explains itself with `--help`; the depot and cloud modes
//! take their settings from defaults, an optional TOML file, `ATLASMESH_SECTION__KEY`
//! environment variables and these flags, in that order.

use std::net::SocketAddr;
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

use crate::auth::Role;
use crate::config::Overrides;

#[derive(Debug, Parser)]
#[command(
    name = "atlasmesh",
    version,
    about = "AtlasMesh: the depot appliance for autonomous-vehicle depots, and the fleet core that federates them",
    long_about = "AtlasMesh runs on a depot's garage PC (`atlasmesh depot`): it serves the technicians' panel and \
API, keeps the depot store, and will stage OTA images, run canary waves, watch its disks and schedule \
charging. In the data centre the same binary runs as the fleet core (`atlasmesh cloud`).\n\n\
Start a depot with no configuration at all: `atlasmesh depot`. It listens on http://0.0.0.0:8080, keeps \
its data in ./atlasmesh-data (or $ATLASMESH_DATA_DIR) and writes the first admin's password to \
<data dir>/initial-admin-password.",
    after_help = "Configuration: --config FILE (TOML), then environment variables such as ATLASMESH_DEPOT__HTTP=127.0.0.1:9000, then flags. \
See the effective configuration with `atlasmesh depot --print-config`."
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the depot appliance: panel, API and depot services on the garage PC.
    Depot(DepotArgs),
    /// Run the fleet core that federates depots (data-centre side).
    Cloud(CloudArgs),
    /// API bearer tokens, minted offline on the depot machine.
    #[command(subcommand)]
    Token(TokenCommand),
    /// Take a consistent backup of the depot store, safe while the depot runs.
    Backup(BackupArgs),
    /// Replace the depot store with a backup (stop the depot first; the old store is kept).
    Restore(RestoreArgs),
    /// Release tooling: keys, the fleet's signed image repository, depot certificates, bundles.
    #[command(subcommand)]
    Release(ReleaseCommand),
    /// Stage a release on a running depot (upload a bundle, or point it at a URL or directory).
    Stage(StageArgs),
    /// The reference vehicle client.
    #[command(subcommand)]
    Vehicle(VehicleCommand),
    /// Run a simulated fleet against a depot: vehicles dock, charge, report and pull OTA.
    Sim(SimArgs),
    /// Disk health (SMART) of this machine's disks, through smartctl.
    #[command(subcommand)]
    Smart(SmartCommand),
    /// Chargers and meters on Modbus TCP: commissioning checks against a register-map profile.
    #[command(subcommand)]
    Charger(ChargerCommand),
    /// The appliance disk image: build it, flash it onto a disk, update this appliance's
    /// inactive root slot from a signed image, and confirm a trial boot.
    #[command(subcommand)]
    Image(ImageCommand),
}

#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build an A/B GPT disk image (EFI system partition, root_a, root_b, data) from a root
    /// file system tree, with its bmap (bmaptool format 2.0) and a manifest signed by the
    /// release key. Needs mkfs.ext4 (e2fsprogs), mkfs.vfat (dosfstools) and mcopy (mtools),
    /// but neither root privileges nor loop devices.
    Build(ImageBuildArgs),
    /// Write an image onto a disk (or into a file). Checks the signed manifest, the bmap and
    /// every mapped block before writing; refuses the system disk, mounted disks, the disk
    /// holding the image, read-only and too-small ones; asks for the serial of drives over
    /// 128 GB; writes only mapped blocks and verifies each after writing.
    Flash(ImageFlashArgs),
    /// Update this appliance: write a signed image's root file system into the inactive slot,
    /// verify it, and arm one trial boot of it. Reboot to try it; the depot marks it good
    /// once its self-test passes, and a slot never marked good is not booted again.
    Install(ImageInstallArgs),
    /// Mark the running boot slot good so it keeps booting (the depot does this itself after
    /// its start-up self-test).
    MarkGood(ImageSlotArgs),
    /// Show the boot slots: which one runs, which are good, which is armed for a trial.
    Status(ImageSlotArgs),
}

#[derive(Debug, Args)]
pub struct ImageBuildArgs {
    /// The root file system tree (both root slots get a copy).
    #[arg(long, value_name = "DIR")]
    pub rootfs: PathBuf,
    /// The image to write; `FILE.bmap` and `FILE.manifest` are written beside it.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// The release key (the image repository's `targets` key, `KEYS/targets.pem`).
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// Files for the EFI system partition, e.g. EFI/BOOT/BOOTX64.EFI from a GRUB build.
    #[arg(long, value_name = "DIR")]
    pub esp_dir: Option<PathBuf>,
    /// Size of the EFI system partition.
    #[arg(long, default_value = "64MiB", value_parser = parse_size)]
    pub esp_size: u64,
    /// Size of each root slot (default: the tree's size plus half, at least 64 MiB).
    #[arg(long, value_parser = parse_size)]
    pub root_size: Option<u64>,
    /// Size of the data partition.
    #[arg(long, default_value = "256MiB", value_parser = parse_size)]
    pub data_size: u64,
    /// The mkfs.ext4 program (e2fsprogs 1.43 or later, for `-d`).
    #[arg(long, value_name = "FILE", default_value = "mkfs.ext4")]
    pub mkfs_ext4: PathBuf,
}

#[derive(Debug, Args)]
pub struct ImageFlashArgs {
    /// The image (`depot.img`, with `depot.img.bmap` and `depot.img.manifest` beside it).
    #[arg(long, value_name = "FILE")]
    pub image: PathBuf,
    /// The disk to write, e.g. /dev/sdb (whole disk, not a partition), or a file.
    #[arg(long, value_name = "DEV")]
    pub device: PathBuf,
    /// The fleet's TUF root (`root.json` of the image repository): whose release keys may
    /// sign images.
    #[arg(long, value_name = "FILE")]
    pub root: PathBuf,
    /// The bmap (default: IMAGE.bmap).
    #[arg(long, value_name = "FILE")]
    pub bmap: Option<PathBuf>,
    /// The signed manifest (default: IMAGE.manifest).
    #[arg(long, value_name = "FILE")]
    pub manifest: Option<PathBuf>,
    /// For drives over 128 GB when not at a terminal: the device's serial (or its kernel
    /// name, e.g. sdb, when it reports none).
    #[arg(long, value_name = "SERIAL")]
    pub confirm: Option<String>,
    /// For a file target: after the sync, also read every written range back from the disk
    /// (not the page cache) and compare it, which makes the disk read it all again. A device
    /// is always read back from the device.
    #[arg(long)]
    pub verify_on_disk: bool,
    /// No progress bar, even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
}

#[derive(Debug, Args)]
pub struct ImageInstallArgs {
    /// The signed image (with IMAGE.bmap and IMAGE.manifest beside it).
    pub bundle: PathBuf,
    /// The fleet's TUF root (default: the root this depot has pinned).
    #[arg(long, value_name = "FILE")]
    pub root: Option<PathBuf>,
    /// No progress bar, even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug, Args)]
pub struct ImageSlotArgs {
    #[command(flatten)]
    pub common: CommonArgs,
}

/// `64MiB`, `2GiB`, `512M`, `1G` or plain bytes; units are binary.
fn parse_size(s: &str) -> Result<u64, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (number, unit) = s.split_at(split);
    let number: u64 = number
        .parse()
        .map_err(|_| format!("{s:?}: expected a size such as 512MiB or 2GiB"))?;
    let shift = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 0,
        "k" | "kib" => 10,
        "m" | "mib" => 20,
        "g" | "gib" => 30,
        "t" | "tib" => 40,
        other => return Err(format!("{other:?} is not a size unit (KiB, MiB, GiB, TiB)")),
    };
    number
        .checked_mul(1 << shift)
        .ok_or_else(|| format!("{s:?} is too large"))
}

#[derive(Debug, Subcommand)]
pub enum ChargerCommand {
    /// Read a charger or meter once through a profile and print what it says as JSON; with
    /// `--set-current`, write a current limit (and the keep-alive) too. Exits 1 with the
    /// reason when the device does not answer or answers wrongly.
    Read(ChargerReadArgs),
    /// List the profiles (shipped and in `--profiles-dir`).
    Profiles(ChargerProfilesArgs),
}

#[derive(Debug, Args)]
pub struct ChargerReadArgs {
    /// Profile name (`alfen-ng9xx`, `keba-p30`, ...).
    #[arg(long)]
    pub profile: String,
    /// `host:port` of the device.
    #[arg(long)]
    pub address: String,
    /// Unit id, when not the profile's.
    #[arg(long)]
    pub unit_id: Option<u8>,
    /// Directory of extra profiles.
    #[arg(long, value_name = "DIR")]
    pub profiles_dir: Option<PathBuf>,
    /// Write this current limit, A (0 stops charging), then read again.
    #[arg(long, value_name = "AMPS")]
    pub set_current: Option<f64>,
    /// Write the failsafe settings and one keep-alive (life bit), as the depot does.
    #[arg(long)]
    pub keep_alive: bool,
    #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
    pub timeout: std::time::Duration,
}

#[derive(Debug, Args)]
pub struct ChargerProfilesArgs {
    #[arg(long, value_name = "DIR")]
    pub profiles_dir: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum SmartCommand {
    /// Read every disk smartctl can see once and print each verdict with its reasons. Exits 0
    /// when all passed, 1 on a warning or an unreadable disk, 2 on a failed disk.
    Report(SmartReportArgs),
}

#[derive(Debug, Args)]
pub struct SmartReportArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
    /// The smartctl program (default: disks.smartctl, "smartctl" on the PATH).
    #[arg(long, value_name = "FILE")]
    pub smartctl: Option<PathBuf>,
    /// A device to read instead of the scan (repeatable): `/dev/sda` or "/dev/bus/0 -d megaraid,3".
    #[arg(long = "device", value_name = "DEVICE")]
    pub devices: Vec<String>,
}

/// How simulated vehicles behave (shared by `atlasmesh sim` and `depot --simulate-fleet`).
#[derive(Debug, Args, Clone)]
pub struct FleetArgs {
    /// Seed of every vehicle's schedule: the same seed repeats the same run.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Probability that installing a version fails, e.g. `--fail 2.0.0=0.3` (repeatable).
    #[arg(long, value_name = "VERSION=RATE", value_parser = parse_rate)]
    pub fail: Vec<(String, f64)>,
    /// Hardware id the simulated vehicles report.
    #[arg(long, default_value = "veh-gen2")]
    pub sim_hardware: String,
    /// Version the simulated vehicles start with.
    #[arg(long, default_value = "1.0.0")]
    pub sim_version: String,
    /// Length of one simulated second (e.g. 100ms runs ten times faster).
    #[arg(long, default_value = "1s", value_parser = humantime::parse_duration)]
    pub sim_second: std::time::Duration,
    /// Simulated Modbus TCP chargers at the first N bays (profiles in turn: Alfen, ABB,
    /// Phoenix, KEBA, Schneider); their vehicles keep a duty roster (morning departures) so
    /// the panel's Charging page shows a night of charging.
    #[arg(long, default_value_t = 0, value_name = "N")]
    pub chargers: usize,
}

fn parse_rate(s: &str) -> Result<(String, f64), String> {
    let (version, rate) = s
        .split_once('=')
        .ok_or_else(|| format!("{s:?}: expected VERSION=RATE"))?;
    let rate: f64 = rate
        .parse()
        .map_err(|_| format!("{rate:?} is not a number"))?;
    if !(0.0..=1.0).contains(&rate) {
        return Err(format!("rate {rate} is not between 0 and 1"));
    }
    Ok((version.to_owned(), rate))
}

#[derive(Debug, Args)]
pub struct SimArgs {
    /// The depot's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub depot: String,
    /// The broker (`mqtt://host:port`); default: the depot's embedded broker.
    #[arg(long)]
    pub mqtt: Option<String>,
    /// An API token that may register vehicles (technician), or re-issue their credentials
    /// when they exist (admin).
    #[arg(long, env = "ATLASMESH_TOKEN", hide_env_values = true)]
    pub token: String,
    /// How many vehicles (`sim-0001` ...).
    #[arg(long, default_value_t = 20)]
    pub vehicles: usize,
    /// Stop after this long (default: until interrupted).
    #[arg(long, value_parser = humantime::parse_duration)]
    pub duration: Option<std::time::Duration>,
    /// Write each vehicle's last report here as JSON when the run ends.
    #[arg(long, value_name = "FILE")]
    pub report: Option<PathBuf>,
    /// Where simulated vehicles keep OTA state (default: a temporary directory).
    #[arg(long, value_name = "DIR")]
    pub state_dir: Option<PathBuf>,
    /// Log filter, as the depot's `log.level` (`debug` shows the commands vehicles ignore).
    #[arg(long, env = "ATLASMESH_LOG__LEVEL", default_value = "info")]
    pub log_level: String,
    #[command(flatten)]
    pub fleet: FleetArgs,
}

/// Validity periods, for metadata the command signs.
#[derive(Debug, Args, Clone)]
pub struct ExpiryArgs {
    /// How long the root metadata is valid.
    #[arg(long, value_name = "DURATION", default_value = "365d", value_parser = humantime::parse_duration)]
    pub root_expires: std::time::Duration,
    /// How long targets metadata is valid.
    #[arg(long, value_name = "DURATION", default_value = "180d", value_parser = humantime::parse_duration)]
    pub targets_expires: std::time::Duration,
    /// How long snapshot metadata is valid.
    #[arg(long, value_name = "DURATION", default_value = "30d", value_parser = humantime::parse_duration)]
    pub snapshot_expires: std::time::Duration,
    /// How long timestamp metadata is valid; refresh well before (`release refresh`).
    #[arg(long, value_name = "DURATION", default_value = "7d", value_parser = humantime::parse_duration)]
    pub timestamp_expires: std::time::Duration,
}

#[derive(Debug, Args, Clone)]
pub struct RepoArgs {
    /// Directory with the signing keys (root, targets, snapshot, timestamp, certifier).
    #[arg(long, value_name = "DIR")]
    pub keys: PathBuf,
    /// The image repository directory (metadata/ and targets/).
    #[arg(long, value_name = "DIR")]
    pub repo: PathBuf,
}

#[derive(Debug, Subcommand)]
pub enum ReleaseCommand {
    /// Create signing keys (ed25519, PKCS#8 PEM, mode 0600): the missing ones of a keys
    /// directory, or one new key with --out (for a rotation).
    Keygen {
        #[arg(
            long,
            value_name = "DIR",
            required_unless_present = "out",
            conflicts_with = "out"
        )]
        keys: Option<PathBuf>,
        #[arg(long, value_name = "FILE")]
        out: Option<PathBuf>,
    },
    /// Create a new image repository (TUF 1.0, consistent snapshots) signed by the keys.
    Init {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        expiry: ExpiryArgs,
    },
    /// Add an image: one pass computes its hash and chunk index; both become signed targets.
    Add {
        #[command(flatten)]
        repo: RepoArgs,
        /// The image file.
        #[arg(long, value_name = "FILE")]
        image: PathBuf,
        /// Semantic version of the image, e.g. 1.4.2.
        #[arg(long)]
        version: String,
        /// Hardware id the image is for.
        #[arg(long)]
        hardware: String,
        /// Lowest installed version this image may upgrade from.
        #[arg(long, value_name = "VERSION")]
        min_version: Option<String>,
        /// Release notes.
        #[arg(long)]
        notes: Option<String>,
        #[command(flatten)]
        expiry: ExpiryArgs,
    },
    /// Re-sign snapshot and timestamp with new expiries (run regularly: anti-freeze).
    Refresh {
        #[command(flatten)]
        repo: RepoArgs,
        #[command(flatten)]
        expiry: ExpiryArgs,
    },
    /// Replace a role's key by TUF's rules (a new root signed by old and new root keys).
    Rotate {
        #[command(flatten)]
        repo: RepoArgs,
        /// Whose key to replace: root, targets, snapshot or timestamp.
        #[arg(long)]
        role: String,
        /// The new key (made with `release keygen --out`).
        #[arg(long, value_name = "FILE")]
        new_key: PathBuf,
        #[command(flatten)]
        expiry: ExpiryArgs,
    },
    /// Certify a depot's director root (its /tuf/director/metadata/1.root.json) for a depot id.
    CertifyDepot {
        #[arg(long, value_name = "DIR")]
        keys: PathBuf,
        #[arg(long)]
        depot_id: String,
        #[arg(long, value_name = "FILE")]
        director_root: PathBuf,
        #[arg(long, value_name = "DURATION", default_value = "365d", value_parser = humantime::parse_duration)]
        expires: std::time::Duration,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
    /// Pack one image of a repository, with the metadata it needs, into a bundle to upload.
    Bundle {
        #[arg(long, value_name = "DIR")]
        repo: PathBuf,
        #[arg(long)]
        hardware: String,
        #[arg(long)]
        version: String,
        #[arg(long, value_name = "FILE")]
        out: PathBuf,
    },
}

#[derive(Debug, Args)]
pub struct StageArgs {
    /// The depot's base URL.
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub depot: String,
    /// An API token with the technician role.
    #[arg(long, env = "ATLASMESH_TOKEN", hide_env_values = true)]
    pub token: String,
    /// Upload this release bundle (made by `release bundle`).
    #[arg(long, value_name = "FILE", conflicts_with_all = ["url", "dir"])]
    pub bundle: Option<PathBuf>,
    /// Have the depot fetch the release from this repository URL.
    #[arg(long, conflicts_with = "dir")]
    pub url: Option<String>,
    /// Have the depot read the release from this repository directory (e.g. a USB stick).
    #[arg(long, value_name = "DIR")]
    pub dir: Option<PathBuf>,
    /// Hardware id of the image to stage (required with --url and --dir).
    #[arg(long)]
    pub hardware: Option<String>,
    /// Version of the image to stage (required with --url and --dir).
    #[arg(long)]
    pub version: Option<String>,
    /// Only mirror the repository's current metadata (with --url or --dir): keeps the
    /// timestamp vehicles check fresh after `release refresh`, staging no image.
    #[arg(long, conflicts_with_all = ["bundle", "hardware", "version"])]
    pub metadata_only: bool,
}

#[derive(Debug, Subcommand)]
pub enum VehicleCommand {
    /// Fetch and verify the image the depot assigned this vehicle into its inactive slot.
    Pull(VehiclePullArgs),
}

#[derive(Debug, Args)]
pub struct VehiclePullArgs {
    /// The depot's base URL.
    #[arg(long)]
    pub depot: String,
    /// This vehicle's id.
    #[arg(long)]
    pub vehicle: String,
    /// The inactive slot to write (a file or block device).
    #[arg(long, value_name = "FILE")]
    pub slot: PathBuf,
    /// The running slot's image (its chunks are reused).
    #[arg(long, value_name = "FILE")]
    pub current: Option<PathBuf>,
    /// Vehicle state: trust anchor, TUF datastores, progress (default ./atlasmesh-vehicle-<ID>).
    #[arg(long, value_name = "DIR")]
    pub state: Option<PathBuf>,
    /// Provision the fleet root (the image repository's 1.root.json) into the state directory.
    #[arg(long, value_name = "FILE")]
    pub fleet_root: Option<PathBuf>,
    /// Hardware id, when the current slot is not a signed release.
    #[arg(long)]
    pub hardware: Option<String>,
    /// Installed version, when the current slot is not a signed release.
    #[arg(long)]
    pub installed_version: Option<String>,
    /// Refuse a depot whose certificate names another depot id.
    #[arg(long)]
    pub depot_id: Option<String>,
    /// Parallel chunk requests.
    #[arg(long, default_value_t = 8)]
    pub concurrency: usize,
    /// Stop after fetching this many chunks (an undocking; the next pull resumes).
    #[arg(long)]
    pub stop_after_chunks: Option<usize>,
}

#[derive(Debug, Args, Clone)]
pub struct CommonArgs {
    /// TOML configuration file (optional; embedded defaults apply without one).
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Data directory (default ./atlasmesh-data, or $ATLASMESH_DATA_DIR).
    #[arg(long, value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
}

impl CommonArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            config_file: self.config.clone(),
            data_dir: self.data_dir.clone(),
            ..Default::default()
        }
    }
}

#[derive(Debug, Args)]
pub struct DepotArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Address of the panel, API and vehicle-facing HTTP server (default 0.0.0.0:8080).
    #[arg(long, value_name = "ADDR")]
    pub http: Option<SocketAddr>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
    /// Run this many simulated vehicles in process (`sim-0001` ...), for demonstrations.
    #[arg(long, value_name = "N", default_value_t = 0)]
    pub simulate_fleet: usize,
    #[command(flatten)]
    pub fleet: FleetArgs,
    /// The cloud fleet core to sync with, `https://HOST:PORT` (its gRPC port).
    #[arg(long, value_name = "URL")]
    pub cloud: Option<String>,
    /// One-time token from `atlasmesh cloud enroll-token`; needed only for the first start
    /// (or set ATLASMESH_CLOUD_LINK__ENROLL_TOKEN, which stays out of the process list).
    #[arg(long, value_name = "TOKEN")]
    pub enroll_token: Option<String>,
}

impl DepotArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            depot_http: self.http,
            cloud_url: self.cloud.clone(),
            enroll_token: self.enroll_token.clone(),
            ..self.common.overrides()
        }
    }
}

#[derive(Debug, Args)]
#[command(args_conflicts_with_subcommands = true)]
pub struct CloudArgs {
    #[command(subcommand)]
    pub command: Option<CloudCommand>,
    #[command(flatten)]
    pub common: CommonArgs,
    /// Database URL: sqlite://FILE or postgres://USER@HOST/DB (default: a SQLite file cloud.db
    /// in the data dir). Several cloud instances may share one PostgreSQL database.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
    /// Address of the fleet core's HTTP server: panel, API, probes (default 0.0.0.0:9080).
    #[arg(long, value_name = "ADDR")]
    pub http: Option<SocketAddr>,
    /// Address of the gRPC port depots enrol and sync on (default 0.0.0.0:9443).
    #[arg(long, value_name = "ADDR")]
    pub grpc: Option<SocketAddr>,
    /// Print the effective configuration as TOML and exit.
    #[arg(long)]
    pub print_config: bool,
}

impl CloudArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            cloud_http: self.http,
            cloud_grpc: self.grpc,
            database_url: self.database_url.clone(),
            ..self.common.overrides()
        }
    }
}

/// The fleet core's offline tools; they work on its database directly.
#[derive(Debug, Subcommand)]
pub enum CloudCommand {
    /// Mint a one-time enrolment token for a depot (registering the depot if new) and print it.
    EnrollToken(CloudDepotArgs),
    /// Revoke a depot: its certificates stop working at its next call.
    Revoke(CloudDepotArgs),
    /// Create a fleet API token and print it once (only its hash is stored).
    Token(CloudTokenArgs),
    /// Set up the image repository: pin the fleet root and take the online keys (snapshot,
    /// timestamp, certifier) from a keys directory; root and targets keys stay offline.
    Repository(CloudRepositoryArgs),
}

#[derive(Debug, Args)]
pub struct CloudRepositoryArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// The fleet's image repository root (TUF root metadata) to trust.
    #[arg(long, value_name = "FILE")]
    pub root: PathBuf,
    /// Release engineering's keys directory; snapshot.pem, timestamp.pem and certifier.pem
    /// are copied (0600), nothing else.
    #[arg(long, value_name = "DIR")]
    pub keys: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct CloudStoreArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Database URL, as for `atlasmesh cloud`.
    #[arg(long, value_name = "URL")]
    pub database_url: Option<String>,
}

impl CloudStoreArgs {
    pub fn overrides(&self) -> Overrides {
        Overrides {
            database_url: self.database_url.clone(),
            ..self.common.overrides()
        }
    }
}

#[derive(Debug, Args)]
pub struct CloudDepotArgs {
    #[command(flatten)]
    pub store: CloudStoreArgs,
    /// The depot's name (letters, digits, '-' or '_').
    #[arg(long, value_name = "NAME")]
    pub depot: String,
}

#[derive(Debug, Args)]
pub struct CloudTokenArgs {
    #[command(flatten)]
    pub store: CloudStoreArgs,
    /// viewer (read), operator (set depots' desired state) or admin (also enrol and revoke).
    #[arg(long, value_enum)]
    pub role: crate::http::cloud_api::FleetRole,
    /// Who or what uses the token; it appears in the audit log.
    #[arg(long, default_value = "cli")]
    pub name: String,
}

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Create an API token and print it once (only its hash is stored).
    Create(TokenCreateArgs),
}

#[derive(Debug, Args)]
pub struct TokenCreateArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// What the token may do: viewer (read), technician (operate) or admin (everything).
    #[arg(long, value_enum)]
    pub role: Role,
    /// A name that says who or what uses the token; it appears in the audit log.
    #[arg(long, default_value = "cli")]
    pub name: String,
}

#[derive(Debug, Args)]
pub struct BackupArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// File to write the backup to (written whole or not at all).
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
}

#[derive(Debug, Args)]
pub struct RestoreArgs {
    #[command(flatten)]
    pub common: CommonArgs,
    /// Backup file made by `atlasmesh backup`.
    #[arg(long, value_name = "FILE")]
    pub from: PathBuf,
}
