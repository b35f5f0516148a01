//! Effective configuration: embedded defaults, then a TOML file, then `ATLASMESH_SECTION__KEY`
//! environment variables, then command-line flags, the later winning.
//!
//! Every struct denies unknown fields so a misspelt key is an error that names it, never a
//! silently ignored setting that leaves the default in force.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};

/// Prefix of environment overrides; `__` separates section and key.
pub const ENV_PREFIX: &str = "ATLASMESH_";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {0} does not exist")]
    MissingFile(PathBuf),
    #[error("invalid configuration: {0}")]
    Invalid(String),
    #[error("invalid configuration: `{key}`: {message}")]
    InvalidValue { key: &'static str, message: String },
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Where the store, keys, certificates and staged files live.
    pub data_dir: PathBuf,
    pub depot: DepotConfig,
    pub cloud: CloudConfig,
    pub http: HttpConfig,
    pub tls: TlsConfig,
    pub auth: AuthConfig,
    pub log: LogConfig,
    pub ota: OtaConfig,
    pub vehicle_link: VehicleLinkConfig,
    pub canary: CanaryConfig,
    pub disks: DisksConfig,
    pub charging: ChargingConfig,
    pub cloud_link: CloudLinkConfig,
    pub image: ImageConfig,
}

/// A/B self-update of the appliance itself (`atlasmesh image install`, `mark-good`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ImageConfig {
    /// Which bootloader's environment holds the boot slots' ORDER/OK/TRY flags: `grub` (the
    /// appliance image for PCs) or `uboot` (boards booting U-Boot with `image/uboot/boot.cmd`).
    pub bootloader: Bootloader,
    /// GRUB's environment block. On the appliance image it is on the EFI system partition,
    /// mounted at /boot. When the file does not exist (a depot not installed from the
    /// appliance image), boot control is off.
    pub grubenv: PathBuf,
    /// The `grub-editenv` program that reads and writes the block.
    pub grub_editenv: PathBuf,
    /// With `bootloader = "uboot"`: libubootenv's configuration, saying where U-Boot's
    /// environment is. When it does not exist, boot control is off.
    pub fw_env_config: PathBuf,
    /// The root slots' block devices.
    pub slot_a: PathBuf,
    pub slot_b: PathBuf,
    /// Where the kernel command line says which slot booted (`atlasmesh.slot=A`).
    pub cmdline: PathBuf,
}

/// The bootloader whose environment holds the A/B boot state.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum Bootloader {
    #[default]
    Grub,
    Uboot,
}

impl ImageConfig {
    /// The boot environment these settings name.
    pub fn boot_env(&self) -> Box<dyn atlasmesh_image::bootenv::BootEnv + Send> {
        use atlasmesh_image::bootenv::{GrubEnv, UBootEnv};
        match self.bootloader {
            Bootloader::Grub => Box::new(GrubEnv {
                file: self.grubenv.clone(),
                editenv: self.grub_editenv.clone(),
            }),
            Bootloader::Uboot => Box::new(UBootEnv::new(&self.fw_env_config)),
        }
    }

    /// The file whose presence says this system boots through the appliance's A/B scheme:
    /// the GRUB environment block, or libubootenv's configuration.
    pub fn boot_env_file(&self) -> &std::path::Path {
        match self.bootloader {
            Bootloader::Grub => &self.grubenv,
            Bootloader::Uboot => &self.fw_env_config,
        }
    }
}

impl Default for ImageConfig {
    fn default() -> Self {
        Self {
            bootloader: Bootloader::Grub,
            grubenv: PathBuf::from("/boot/EFI/BOOT/grubenv"),
            grub_editenv: PathBuf::from("grub-editenv"),
            fw_env_config: PathBuf::from("/etc/fw_env.config"),
            slot_a: PathBuf::from("/dev/disk/by-partlabel/root_a"),
            slot_b: PathBuf::from("/dev/disk/by-partlabel/root_b"),
            cmdline: PathBuf::from("/proc/cmdline"),
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./atlasmesh-data"),
            depot: DepotConfig::default(),
            cloud: CloudConfig::default(),
            http: HttpConfig::default(),
            tls: TlsConfig::default(),
            auth: AuthConfig::default(),
            log: LogConfig::default(),
            ota: OtaConfig::default(),
            vehicle_link: VehicleLinkConfig::default(),
            canary: CanaryConfig::default(),
            disks: DisksConfig::default(),
            charging: ChargingConfig::default(),
            cloud_link: CloudLinkConfig::default(),
            image: ImageConfig::default(),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DepotConfig {
    /// Stable identity of this depot. When unset, one is generated on first start and kept in
    /// the store, so the identity survives restarts without anybody having to choose it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// Name shown to technicians on the panel.
    pub name: String,
    /// Address of the panel, API and vehicle-facing HTTP server.
    pub http: SocketAddr,
}

impl Default for DepotConfig {
    fn default() -> Self {
        Self {
            id: None,
            name: "AtlasMesh depot".into(),
            http: SocketAddr::from(([0, 0, 0, 0], 8080)),
        }
    }
}

/// Chargers, the site meter and the planner's defaults. The site limit and the tariff are set
/// by admins on the panel or API once the depot runs; these are the values until then.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ChargingConfig {
    /// How often chargers and the meter are read and the plan is redone.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// A charger that has not answered within this is faulted.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Longest wait between attempts to reach a faulted charger (the wait doubles up to it).
    #[serde(with = "humantime_serde")]
    pub retry_max: Duration,
    /// Grid connection limit until an admin sets one, kW.
    pub site_limit_kw: f64,
    /// Battery energy gained per kWh drawn.
    pub efficiency: f64,
    /// Charge vehicles to this unless a technician says otherwise, percent.
    pub target_soc_percent: f64,
    /// Local time vehicles leave when neither they nor a technician say, `HH:MM`.
    pub departure: String,
    /// What a plugged vehicle the depot cannot identify is assumed to need, kWh.
    pub unknown_vehicle_kwh: f64,
    /// Energy kept for a vehicle with an OTA install pending (it runs on shore power), kWh.
    pub ota_reserve_kwh: f64,
    /// Extra register-map profiles (`*.toml`); a file named like a shipped one replaces it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub profiles_dir: Option<PathBuf>,
    pub chargers: Vec<ChargerConfig>,
    /// Feeders or phases inside the site with their own limit; chargers name theirs.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub circuits: Vec<CircuitConfig>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub meter: Option<MeterConfig>,
}

impl Default for ChargingConfig {
    fn default() -> Self {
        Self {
            poll_interval: Duration::from_secs(5),
            request_timeout: Duration::from_secs(2),
            retry_max: Duration::from_secs(300),
            site_limit_kw: 150.0,
            efficiency: 0.92,
            target_soc_percent: 80.0,
            departure: "06:30".into(),
            unknown_vehicle_kwh: 30.0,
            ota_reserve_kwh: 2.0,
            profiles_dir: None,
            chargers: Vec::new(),
            circuits: Vec::new(),
            meter: None,
        }
    }
}

/// One charge point on Modbus TCP.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ChargerConfig {
    pub id: String,
    /// A shipped profile (`alfen-ng9xx`, `abb-terra-ac`, ...) or one in `profiles_dir`.
    pub profile: String,
    /// `host:port`.
    pub address: String,
    /// The profile's unit id unless given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_id: Option<u8>,
    /// The bay it serves: the vehicle docked there is the one it charges.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bay: Option<String>,
    /// The circuit (`[[charging.circuits]]`) it is wired to, when that has its own limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub circuit: Option<String>,
}

/// A feeder, breaker or phase inside the site whose limit is below the grid connection's.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CircuitConfig {
    pub name: String,
    /// Most power the chargers on it may draw together, kW.
    pub limit_kw: f64,
}

/// The meter at the grid connection.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MeterConfig {
    pub profile: String,
    pub address: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit_id: Option<u8>,
}

impl ChargingConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let invalid =
            |key: &'static str, message: String| ConfigError::InvalidValue { key, message };
        if self.poll_interval < Duration::from_secs(1) || self.request_timeout.is_zero() {
            return Err(invalid(
                "charging.poll_interval",
                "`charging.poll_interval` must be at least 1s and `charging.request_timeout` above zero".into(),
            ));
        }
        if !(self.site_limit_kw > 0.0 && self.site_limit_kw.is_finite()) {
            return Err(invalid(
                "charging.site_limit_kw",
                "must be above zero".into(),
            ));
        }
        if !(self.efficiency > 0.0 && self.efficiency <= 1.0) {
            return Err(invalid("charging.efficiency", "must be in (0, 1]".into()));
        }
        if !(0.0..=100.0).contains(&self.target_soc_percent) {
            return Err(invalid(
                "charging.target_soc_percent",
                "must be 0 to 100".into(),
            ));
        }
        if parse_hh_mm(&self.departure).is_none() {
            return Err(invalid(
                "charging.departure",
                format!("{:?} is not HH:MM", self.departure),
            ));
        }
        for (key, v) in [
            ("charging.unknown_vehicle_kwh", self.unknown_vehicle_kwh),
            ("charging.ota_reserve_kwh", self.ota_reserve_kwh),
        ] {
            if !(v >= 0.0 && v.is_finite()) {
                return Err(invalid(key, "must be 0 or more".into()));
            }
        }
        let mut circuits = std::collections::HashSet::new();
        for c in &self.circuits {
            if c.name.is_empty() || !circuits.insert(c.name.as_str()) {
                return Err(invalid(
                    "charging.circuits",
                    format!("circuit name {:?} is empty or used twice", c.name),
                ));
            }
            if !(c.limit_kw > 0.0 && c.limit_kw.is_finite()) {
                return Err(invalid(
                    "charging.circuits",
                    format!("circuit {:?}: limit_kw must be above zero", c.name),
                ));
            }
        }
        let mut seen = std::collections::HashSet::new();
        let mut bays = std::collections::HashSet::new();
        for c in &self.chargers {
            if let Some(bay) = &c.bay
                && !bays.insert(bay.as_str())
            {
                return Err(invalid(
                    "charging.chargers",
                    format!("charger {:?}: bay {bay:?} already has a charger", c.id),
                ));
            }
            if c.id.is_empty() || !seen.insert(c.id.as_str()) {
                return Err(invalid(
                    "charging.chargers",
                    format!("charger id {:?} is empty or used twice", c.id),
                ));
            }
            if let Some(name) = &c.circuit
                && !circuits.contains(name.as_str())
            {
                return Err(invalid(
                    "charging.chargers",
                    format!(
                        "charger {:?}: no circuit {name:?} in charging.circuits",
                        c.id
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// Minutes after midnight of `HH:MM`.
pub fn parse_hh_mm(s: &str) -> Option<u32> {
    let (h, m) = s.split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    (h < 24 && m < 60 && s.len() == 5).then_some(h * 60 + m)
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CloudConfig {
    /// Address of the fleet panel and health endpoints in cloud mode.
    pub http: SocketAddr,
    /// sqlx database URL; unset means a SQLite file `cloud.db` in the data dir.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub database_url: Option<String>,
    /// Address of the gRPC port depots enrol and sync on (mutual TLS from the fleet CA).
    pub grpc: SocketAddr,
    /// Host names and addresses the gRPC server certificate names, as depots reach it; empty
    /// means this machine's host name, localhost and 127.0.0.1.
    pub grpc_names: Vec<String>,
    /// How long a depot certificate lives; depots renew after two thirds of it.
    #[serde(with = "humantime_serde")]
    pub depot_cert_lifetime: Duration,
    /// How long an enrolment token stays usable.
    #[serde(with = "humantime_serde")]
    pub enroll_token_lifetime: Duration,
    /// How often a sync session looks for desired changes and revocation.
    #[serde(with = "humantime_serde")]
    pub poll_interval: Duration,
    /// How long the image repository's snapshot and timestamp, signed online by the cloud,
    /// stay valid; the timestamp is re-signed when half its life is left.
    #[serde(with = "humantime_serde")]
    pub snapshot_lifetime: Duration,
    #[serde(with = "humantime_serde")]
    pub timestamp_lifetime: Duration,
}

impl Default for CloudConfig {
    fn default() -> Self {
        Self {
            http: SocketAddr::from(([0, 0, 0, 0], 9080)),
            database_url: None,
            grpc: SocketAddr::from(([0, 0, 0, 0], 9443)),
            grpc_names: Vec::new(),
            depot_cert_lifetime: Duration::from_secs(30 * 24 * 3600),
            enroll_token_lifetime: Duration::from_secs(24 * 3600),
            poll_interval: Duration::from_secs(2),
            snapshot_lifetime: Duration::from_secs(7 * 24 * 3600),
            timestamp_lifetime: Duration::from_secs(24 * 3600),
        }
    }
}

/// The depot's link to the cloud fleet core. Off unless `url` is set.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CloudLinkConfig {
    /// The cloud's gRPC address, `https://HOST:PORT`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// One-time token from `atlasmesh cloud enroll-token`, used once on first start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enroll_token: Option<String>,
    /// The outbox keeps at most this many bytes of events while the link is down; the oldest
    /// go first.
    pub outbox_max_bytes: u64,
    /// ... and events at most this old.
    #[serde(with = "humantime_serde")]
    pub outbox_max_age: Duration,
    /// How often reported state is compared and changes sent.
    #[serde(with = "humantime_serde")]
    pub report_interval: Duration,
}

impl Default for CloudLinkConfig {
    fn default() -> Self {
        Self {
            url: None,
            enroll_token: None,
            outbox_max_bytes: 64 << 20,
            outbox_max_age: Duration::from_secs(30 * 24 * 3600),
            report_interval: Duration::from_secs(15),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Longest time a request may take to produce its response headers.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Largest JSON or form body accepted by the API and panel.
    pub max_body_bytes: usize,
    /// A client that has not sent its request headers by then is disconnected (slow loris).
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// On shutdown, how long in-flight requests may run before connections are cut.
    #[serde(with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            request_timeout: Duration::from_secs(30),
            max_body_bytes: 1024 * 1024,
            header_read_timeout: Duration::from_secs(30),
            shutdown_grace: Duration::from_secs(30),
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// Serve HTTPS. Without `cert` and `key`, a self-signed certificate is generated on first
    /// start and kept in `<data_dir>/tls/`.
    pub enabled: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cert: Option<PathBuf>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub key: Option<PathBuf>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Lifetime of a panel session.
    #[serde(with = "humantime_serde")]
    pub session_ttl: Duration,
    /// Failed logins allowed per client address and per user name within `login_window`.
    pub login_max_failures: u32,
    #[serde(with = "humantime_serde")]
    pub login_window: Duration,
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            session_ttl: Duration::from_secs(12 * 3600),
            login_max_failures: 5,
            login_window: Duration::from_secs(300),
        }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, Default)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// JSON when stderr is not a terminal (services, pipes, log shippers), pretty when it is.
    #[default]
    Auto,
    /// One JSON object per line (the runbooks' golden rule), for journald and log shippers.
    Json,
    /// Human-readable lines for a developer's terminal.
    Pretty,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A tracing filter, for example `info` or `info,atlasmesh=debug`.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            format: LogFormat::Auto,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OtaConfig {
    /// The fleet's TUF root (`1.root.json` of the image repository) to pin at start. It can
    /// also be pinned at run time by an admin (`PUT /api/v1/ota/fleet-root`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub fleet_root: Option<PathBuf>,
    /// Hardware ids this depot stages images for; empty means any.
    pub hardware: Vec<String>,
    /// Free space to keep on the data filesystem beyond an image being staged.
    pub reserve_bytes: u64,
    /// Largest release bundle accepted by upload.
    pub max_upload_bytes: u64,
    /// Cap on downloads when staging from a URL, bytes per second (0: none).
    pub download_bytes_per_second: u64,
    /// Initial cap on what vehicles pull, bytes per second (0: none); changed at run time by
    /// `PUT /api/v1/bandwidth`, which is kept across restarts.
    pub bandwidth_bytes_per_second: u64,
    /// How often the director repository is re-signed to keep its short expiries fresh.
    #[serde(with = "humantime_serde")]
    pub director_refresh: Duration,
}

impl Default for OtaConfig {
    fn default() -> Self {
        Self {
            fleet_root: None,
            hardware: Vec::new(),
            reserve_bytes: 1024 * 1024 * 1024,
            max_upload_bytes: 64 * 1024 * 1024 * 1024,
            download_bytes_per_second: 0,
            bandwidth_bytes_per_second: 0,
            director_refresh: Duration::from_secs(30 * 60),
        }
    }
}

/// What makes a vehicle ready for an update, and the defaults of a rollout plan.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CanaryConfig {
    /// A vehicle not plugged in needs at least this state of charge, percent.
    pub soc_floor_percent: f64,
    /// Download rate assumed when estimating whether an update fits before departure.
    pub assumed_download_bytes_per_second: u64,
    /// Install and reboot time assumed in the same estimate.
    #[serde(with = "humantime_serde")]
    pub install_estimate: Duration,
    /// Room left between the estimated end of an update (with its soak) and departure.
    #[serde(with = "humantime_serde")]
    pub departure_margin: Duration,
    /// Plan defaults when a rollout request leaves them out.
    #[serde(with = "humantime_serde")]
    pub soak: Duration,
    #[serde(with = "humantime_serde")]
    pub vehicle_deadline: Duration,
    pub max_concurrent: u64,
    #[serde(with = "humantime_serde")]
    pub wave_timeout: Duration,
}

impl Default for CanaryConfig {
    fn default() -> Self {
        Self {
            soc_floor_percent: 30.0,
            assumed_download_bytes_per_second: 20_000_000,
            install_estimate: Duration::from_secs(10 * 60),
            departure_margin: Duration::from_secs(15 * 60),
            soak: Duration::from_secs(10 * 60),
            vehicle_deadline: Duration::from_secs(2 * 3600),
            max_concurrent: 20,
            wave_timeout: Duration::from_secs(24 * 3600),
        }
    }
}

/// SMART health of the depot's own disks (see `disks`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DisksConfig {
    /// Off: no smartctl runs, no disk verdicts, nothing blocked.
    pub enabled: bool,
    /// The smartctl program (smartmontools 7.0 or later, for `--json`).
    pub smartctl: PathBuf,
    /// Devices to check, as smartd names them: `/dev/sda` or `/dev/sda -d sat`. Empty: every
    /// device `smartctl --scan` finds.
    pub devices: Vec<String>,
    /// How often every device is read.
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// One smartctl run longer than this is killed and the device reported unknown.
    #[serde(with = "humantime_serde")]
    pub timeout: Duration,
    /// The device holding the data directory (the chunk store). Unset: found from the
    /// filesystem the data directory is on.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store_device: Option<String>,
    /// Local time window for self-tests, `HH:MM-HH:MM` (may cross midnight); empty for never.
    pub quiet_hours: String,
    /// A short self-test per device this often, in quiet hours (0 for never).
    #[serde(with = "humantime_serde")]
    pub short_test_every: Duration,
    /// A long (extended) self-test per device this often, in quiet hours (0 for never).
    #[serde(with = "humantime_serde")]
    pub long_test_every: Duration,
    /// Verdict changes are POSTed here as JSON, retried with backoff until delivered.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub webhook: Option<String>,
}

impl Default for DisksConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            smartctl: PathBuf::from("smartctl"),
            devices: Vec::new(),
            interval: Duration::from_secs(30 * 60),
            timeout: Duration::from_secs(60),
            store_device: None,
            quiet_hours: "02:00-05:00".into(),
            short_test_every: Duration::from_secs(24 * 3600),
            long_test_every: Duration::from_secs(7 * 24 * 3600),
            webhook: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct VehicleLinkConfig {
    /// An external MQTT broker (`mqtt://host:1883`), for larger depots. Unset runs the embedded
    /// broker, whose vehicle-facing front listens on `listen`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub broker_url: Option<String>,
    /// The depot's user name at the external broker.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    /// File holding the depot's password at the external broker (first line).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password_file: Option<PathBuf>,
    /// Where the embedded broker takes vehicle connections (MQTT 3.1.1).
    pub listen: SocketAddr,
    /// The base URL vehicles are told to fetch OTA from; unset means `http://<host name>:<port
    /// of depot.http>/`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub public_url: Option<String>,
    /// A vehicle silent this long is shown offline even without its Last Will.
    #[serde(with = "humantime_serde")]
    pub offline_after: Duration,
}

impl Default for VehicleLinkConfig {
    fn default() -> Self {
        Self {
            broker_url: None,
            username: None,
            password_file: None,
            listen: SocketAddr::from(([0, 0, 0, 0], 1883)),
            public_url: None,
            offline_after: Duration::from_secs(300),
        }
    }
}

/// Command-line values that override file and environment.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub config_file: Option<PathBuf>,
    pub data_dir: Option<PathBuf>,
    pub depot_http: Option<SocketAddr>,
    pub cloud_http: Option<SocketAddr>,
    pub database_url: Option<String>,
    pub cloud_url: Option<String>,
    pub enroll_token: Option<String>,
    pub cloud_grpc: Option<SocketAddr>,
}

impl Config {
    /// Loads the effective configuration from the process environment.
    pub fn load(overrides: &Overrides) -> Result<Self, ConfigError> {
        // ATLASMESH_TOKEN is the API token of the command-line client, not a setting.
        Self::load_from(
            overrides,
            Env::prefixed(ENV_PREFIX).ignore(&["token"]).split("__"),
        )
    }

    /// Loads with an explicit environment provider, so tests need not touch the process's.
    pub fn load_from(overrides: &Overrides, env: Env) -> Result<Self, ConfigError> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(path) = &overrides.config_file {
            // figment skips missing files silently; a file someone named must exist.
            if !path.is_file() {
                return Err(ConfigError::MissingFile(path.clone()));
            }
            figment = figment.merge(Toml::file_exact(path));
        }
        figment = figment.merge(env);
        if let Some(dir) = &overrides.data_dir {
            figment = figment.merge(Serialized::default("data_dir", dir));
        }
        if let Some(addr) = overrides.depot_http {
            figment = figment.merge(Serialized::default("depot.http", addr));
        }
        if let Some(addr) = overrides.cloud_http {
            figment = figment.merge(Serialized::default("cloud.http", addr));
        }
        if let Some(url) = &overrides.database_url {
            figment = figment.merge(Serialized::default("cloud.database_url", url));
        }
        if let Some(addr) = overrides.cloud_grpc {
            figment = figment.merge(Serialized::default("cloud.grpc", addr));
        }
        if let Some(url) = &overrides.cloud_url {
            figment = figment.merge(Serialized::default("cloud_link.url", url));
        }
        if let Some(token) = &overrides.enroll_token {
            figment = figment.merge(Serialized::default("cloud_link.enroll_token", token));
        }
        let config: Config = figment.extract().map_err(|err| {
            // figment reports every problem; each message names the key and where it came from.
            ConfigError::Invalid(
                err.into_iter()
                    .map(|e| e.to_string())
                    .collect::<Vec<_>>()
                    .join("; "),
            )
        })?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if let Some(id) = &self.depot.id {
            validate_depot_id(id).map_err(|message| ConfigError::InvalidValue {
                key: "depot.id",
                message,
            })?;
        }
        if self.data_dir.as_os_str().is_empty() {
            return Err(ConfigError::InvalidValue {
                key: "data_dir",
                message: "must not be empty".into(),
            });
        }
        if self.tls.cert.is_some() != self.tls.key.is_some() {
            return Err(ConfigError::InvalidValue {
                key: "tls.cert",
                message: "`tls.cert` and `tls.key` must be given together".into(),
            });
        }
        if self.http.max_body_bytes < 1024 {
            return Err(ConfigError::InvalidValue {
                key: "http.max_body_bytes",
                message: "must be at least 1024".into(),
            });
        }
        for (key, value) in [
            ("http.request_timeout", self.http.request_timeout),
            ("http.header_read_timeout", self.http.header_read_timeout),
            ("auth.session_ttl", self.auth.session_ttl),
            ("auth.login_window", self.auth.login_window),
        ] {
            if value.is_zero() {
                return Err(ConfigError::InvalidValue {
                    key,
                    message: "must be longer than zero".into(),
                });
            }
        }
        for hw in &self.ota.hardware {
            atlasmesh_ota_staging::meta::validate_hardware_id(hw).map_err(|message| {
                ConfigError::InvalidValue {
                    key: "ota.hardware",
                    message,
                }
            })?;
        }
        if self.ota.director_refresh < Duration::from_secs(10) {
            return Err(ConfigError::InvalidValue {
                key: "ota.director_refresh",
                message: "must be at least 10s".into(),
            });
        }
        self.charging.validate()?;
        if self.disks.interval < Duration::from_secs(1) || self.disks.timeout.is_zero() {
            return Err(ConfigError::InvalidValue {
                key: "disks.interval",
                message: "`disks.interval` must be at least 1s and `disks.timeout` above zero"
                    .into(),
            });
        }
        crate::disks::schedule::QuietHours::parse(&self.disks.quiet_hours).map_err(|message| {
            ConfigError::InvalidValue {
                key: "disks.quiet_hours",
                message,
            }
        })?;
        for device in &self.disks.devices {
            crate::disks::collect::DeviceSpec::parse(device).map_err(|message| {
                ConfigError::InvalidValue {
                    key: "disks.devices",
                    message,
                }
            })?;
        }
        if let Some(hook) = &self.disks.webhook {
            match url::Url::parse(hook) {
                Ok(u) if matches!(u.scheme(), "http" | "https") => {}
                _ => {
                    return Err(ConfigError::InvalidValue {
                        key: "disks.webhook",
                        message: format!("{hook:?} is not an http(s) URL"),
                    });
                }
            }
        }
        if self.auth.login_max_failures == 0 {
            return Err(ConfigError::InvalidValue {
                key: "auth.login_max_failures",
                message: "must be at least 1".into(),
            });
        }
        tracing_subscriber::EnvFilter::try_new(&self.log.level).map_err(|e| {
            ConfigError::InvalidValue {
                key: "log.level",
                message: e.to_string(),
            }
        })?;
        Ok(())
    }

    /// The configuration as TOML, as `--print-config` shows it.
    pub fn to_toml(&self) -> String {
        toml::to_string_pretty(self).expect("configuration always serialises to TOML")
    }

    pub fn store_path(&self) -> PathBuf {
        store_path(&self.data_dir)
    }
}

/// The depot store's file inside a data dir.
pub fn store_path(data_dir: &Path) -> PathBuf {
    data_dir.join("depot.db")
}

/// Depot ids appear in MQTT topics, certificate names and URLs, so they are kept to a safe set.
pub fn validate_depot_id(id: &str) -> Result<(), String> {
    let ok_len = (1..=64).contains(&id.len());
    let ok_chars = id
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if ok_len && ok_chars {
        Ok(())
    } else {
        Err(format!(
            "{id:?} is not a valid depot id: use 1 to 64 characters from a-z, 0-9, '-' and '_'"
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // figment's Jail closure returns figment's own (large) error type; not ours to shrink.
    #[allow(clippy::result_large_err)]
    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("atlasmesh.toml");
        std::fs::write(&path, toml).unwrap();
        let overrides = Overrides {
            config_file: Some(path),
            ..Default::default()
        };
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        // Jail serialises tests that touch the process environment and restores it afterwards.
        let mut result = None;
        figment::Jail::expect_with(|jail| {
            jail.clear_env();
            for (k, v) in &env {
                jail.set_env(k, v);
            }
            result = Some(Config::load_from(
                &overrides,
                Env::prefixed(ENV_PREFIX).split("__"),
            ));
            Ok(())
        });
        result.unwrap()
    }

    #[test]
    fn defaults_need_no_file() {
        let config =
            Config::load_from(&Overrides::default(), Env::prefixed("ATLASMESH_TEST_NONE_"))
                .unwrap();
        assert_eq!(config.data_dir, PathBuf::from("./atlasmesh-data"));
        assert_eq!(config.depot.http.to_string(), "0.0.0.0:8080");
        assert_eq!(config.log.format, LogFormat::Auto);
    }

    #[test]
    fn unknown_key_is_named() {
        let err = load("[depot]\nhtpp = \"127.0.0.1:1\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("htpp"), "{err}");
    }

    #[test]
    fn wrong_value_names_the_key() {
        let err = load("[depot]\nhttp = \"not an address\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("depot.http"), "{err}");
        let err = load("[http]\nrequest_timeout = \"soon\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("http.request_timeout"), "{err}");
    }

    #[test]
    fn env_overrides_file_and_flags_override_env() {
        let config = load(
            "data_dir = \"/from/file\"\n[depot]\nname = \"file\"\n",
            &[
                ("ATLASMESH_DEPOT__NAME", "env"),
                ("ATLASMESH_DATA_DIR", "/from/env"),
            ],
        )
        .unwrap();
        assert_eq!(config.depot.name, "env");
        assert_eq!(config.data_dir, PathBuf::from("/from/env"));
    }

    #[test]
    fn invalid_depot_id_is_rejected() {
        let err = load("[depot]\nid = \"Depot 1\"\n", &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("depot.id"), "{err}");
    }

    #[test]
    fn printed_config_loads_back_identically() {
        let config = load("[depot]\nid = \"north-7\"\n", &[]).unwrap();
        let printed = config.to_toml();
        let again = load(&printed, &[]).unwrap();
        assert_eq!(config, again);
    }

    #[test]
    fn chargers_name_circuits_that_exist() {
        let base = "[[charging.circuits]]\nname = \"feeder-a\"\nlimit_kw = 44\n\
                    [[charging.chargers]]\nid = \"cp-1\"\nprofile = \"alfen-ng9xx\"\n\
                    address = \"10.0.0.5:502\"\n";
        let config = load(&format!("{base}circuit = \"feeder-a\"\n"), &[]).unwrap();
        assert_eq!(config.charging.circuits[0].limit_kw, 44.0);
        assert_eq!(
            config.charging.chargers[0].circuit.as_deref(),
            Some("feeder-a")
        );
        let again = load(&config.to_toml(), &[]).unwrap();
        assert_eq!(config, again);
        let err = load(&format!("{base}circuit = \"feeder-b\"\n"), &[])
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("charging.chargers") && err.contains("feeder-b"),
            "{err}"
        );
        let err = load(
            "[[charging.circuits]]\nname = \"feeder-a\"\nlimit_kw = 0\n",
            &[],
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("charging.circuits") && err.contains("limit_kw"),
            "{err}"
        );
        // Two chargers on one bay would both charge whichever vehicle docks there.
        let twice = "[[charging.chargers]]\nid = \"cp-1\"\nprofile = \"alfen-ng9xx\"\n\
                     address = \"10.0.0.5:502\"\nbay = \"bay-1\"\n\
                     [[charging.chargers]]\nid = \"cp-2\"\nprofile = \"alfen-ng9xx\"\n\
                     address = \"10.0.0.6:502\"\nbay = \"bay-1\"\n";
        let err = load(twice, &[]).unwrap_err().to_string();
        assert!(err.contains("bay \"bay-1\" already has a charger"), "{err}");
    }
}
