//! Typed model of smartctl's JSON output (`smartctl --json --xall DEV` and
//! `smartctl --scan --json`).
//!
//! The depot reads disks through smartctl, whose JSON has grown field by field
//! since 7.0 and differs between ATA, NVMe and SCSI devices. This module turns
//! that text into a small typed [`Report`] carrying only what the verdict
//! engine (`super::verdict`) and the depot's screens use, so the rest of the
//! appliance never touches raw JSON.
//!
//! Robustness is the main design constraint:
//!
//! * Every field is optional and read leniently: a field that is missing, or
//!   whose type changed in some smartctl version (a number that no longer fits,
//!   an object where a number was expected), becomes `None` instead of failing
//!   the whole report. Unknown fields are ignored.
//! * Parsing never panics, whatever the input.
//! * [`ParseError`] tells apart JSON that is broken ([`ParseError::Malformed`],
//!   [`ParseError::Truncated`], both with serde's line and column) from valid
//!   JSON that simply is not smartctl device output ([`ParseError::NotSmartctl`]),
//!   because the depot reacts differently: the first usually means smartctl
//!   was killed or its output cut off, the second a wiring mistake.
//!
//! The module is pure: it reads a `&str` and does no I/O.

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

/// Why a smartctl JSON text could not be turned into a [`Report`] or a scan list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    /// The text is not valid JSON.
    #[error("malformed JSON at line {line}, column {column}: {message}")]
    Malformed {
        line: usize,
        column: usize,
        message: String,
    },
    /// The text stops in the middle of a JSON value (or is empty).
    #[error("truncated JSON: input ends at line {line}, column {column}")]
    Truncated { line: usize, column: usize },
    /// Valid JSON, but not the kind of smartctl output that was asked for.
    #[error("not smartctl output: {reason}")]
    NotSmartctl { reason: String },
}

impl ParseError {
    fn from_json(err: &serde_json::Error) -> Self {
        let (line, column) = (err.line(), err.column());
        match err.classify() {
            serde_json::error::Category::Eof => ParseError::Truncated { line, column },
            _ => {
                // serde_json appends the position to its message; it is kept in
                // separate fields here, so strip it to avoid saying it twice.
                let full = err.to_string();
                let suffix = format!(" at line {line} column {column}");
                let message = full.strip_suffix(&suffix).unwrap_or(&full).to_string();
                ParseError::Malformed {
                    line,
                    column,
                    message,
                }
            }
        }
    }

    fn not_smartctl(reason: &str) -> Self {
        ParseError::NotSmartctl {
            reason: reason.to_string(),
        }
    }
}

/// smartctl's exit status, a bit mask (see `man smartctl`, "RETURN VALUES").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(transparent)]
pub struct ExitStatus(pub u8);

/// One set bit of an [`ExitStatus`], named for machines and for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ExitBit {
    /// Bit number, 0 to 7.
    pub bit: u8,
    /// Stable machine name, e.g. `prefail_at_threshold`.
    pub code: &'static str,
    /// What smartctl means by the bit.
    pub description: &'static str,
}

const EXIT_BITS: [(&str, &str); 8] = [
    ("command_line", "the command line did not parse"),
    (
        "device_open_failed",
        "the device could not be opened, or it did not answer IDENTIFY",
    ),
    (
        "command_failed",
        "a SMART or other ATA/SCSI/NVMe command to the disk failed, or a SMART data checksum was wrong",
    ),
    ("failing", "SMART status check returned \"DISK FAILING\""),
    (
        "prefail_at_threshold",
        "some pre-failure attributes are at or below their threshold",
    ),
    (
        "past_threshold",
        "some attributes have been at or below their threshold at some time in the past",
    ),
    (
        "error_log_has_errors",
        "the device error log contains records of errors",
    ),
    (
        "self_test_log_has_errors",
        "the device self-test log contains records of errors",
    ),
];

impl ExitStatus {
    const fn bit(self, n: u8) -> bool {
        self.0 & (1 << n) != 0
    }

    /// Bit 0: the command line did not parse.
    pub const fn command_line(self) -> bool {
        self.bit(0)
    }

    /// Bit 1: the device could not be opened.
    pub const fn device_open_failed(self) -> bool {
        self.bit(1)
    }

    /// Bit 2: a command to the disk failed, or a checksum was wrong.
    pub const fn command_failed(self) -> bool {
        self.bit(2)
    }

    /// Bit 3: SMART status says the disk is failing.
    pub const fn failing(self) -> bool {
        self.bit(3)
    }

    /// Bit 4: a pre-failure attribute is at or below its threshold now.
    pub const fn prefail_at_threshold(self) -> bool {
        self.bit(4)
    }

    /// Bit 5: some attribute was at or below its threshold in the past.
    pub const fn past_threshold(self) -> bool {
        self.bit(5)
    }

    /// Bit 6: the device error log has errors.
    pub const fn error_log_has_errors(self) -> bool {
        self.bit(6)
    }

    /// Bit 7: the self-test log has errors.
    pub const fn self_test_log_has_errors(self) -> bool {
        self.bit(7)
    }

    /// The set bits, lowest first, with their names.
    pub fn set_bits(self) -> Vec<ExitBit> {
        (0u8..)
            .zip(EXIT_BITS)
            .filter(|(bit, _)| self.bit(*bit))
            .map(|(bit, (code, description))| ExitBit {
                bit,
                code,
                description,
            })
            .collect()
    }
}

/// Transport protocol of a device, from `device.protocol`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Protocol {
    Ata,
    Nvme,
    Scsi,
    Other(String),
}

impl Protocol {
    /// As smartctl writes it.
    pub fn name(&self) -> &str {
        match self {
            Protocol::Ata => "ATA",
            Protocol::Nvme => "NVMe",
            Protocol::Scsi => "SCSI",
            Protocol::Other(s) => s,
        }
    }

    fn from_smartctl(s: &str) -> Self {
        if s.eq_ignore_ascii_case("ATA") {
            Protocol::Ata
        } else if s.eq_ignore_ascii_case("NVMe") {
            Protocol::Nvme
        } else if s.eq_ignore_ascii_case("SCSI") {
            Protocol::Scsi
        } else {
            Protocol::Other(s.to_string())
        }
    }
}

/// Severity smartctl gave one of its messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum MessageSeverity {
    Information,
    Warning,
    Error,
    Other(String),
}

/// One entry of `smartctl.messages[]`: what smartctl itself had to say.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Message {
    pub text: String,
    pub severity: MessageSeverity,
}

/// `when_failed` of an ATA attribute.
///
/// smartctl writes `""` when the normalized value never reached the
/// threshold, `"now"` when it is at or below it, `"past"` when the worst value
/// was. Only `Now` and `Past` mean failure; anything else smartctl might write
/// in future is kept verbatim in `Other` and treated as no failure.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum WhenFailed {
    None,
    Now,
    Past,
    Other(String),
}

impl WhenFailed {
    fn from_smartctl(s: Option<&str>) -> Self {
        match s.map(str::trim) {
            None | Some("") => WhenFailed::None,
            Some(s) if s.eq_ignore_ascii_case("now") => WhenFailed::Now,
            Some(s) if s.eq_ignore_ascii_case("past") => WhenFailed::Past,
            Some(s) => WhenFailed::Other(s.to_string()),
        }
    }
}

/// One row of `ata_smart_attributes.table[]`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct AtaAttribute {
    pub id: u8,
    /// smartctl's name for the attribute, from its drive database; vendors
    /// reuse ids, so the name is what tells e.g. 233 "Media_Wearout_Indicator"
    /// from 233 "Flash_Writes_GiB".
    pub name: String,
    /// Normalized current value (vendor scale, usually 100 or 200 when new).
    pub value: Option<u8>,
    pub worst: Option<u8>,
    pub thresh: Option<u8>,
    pub when_failed: WhenFailed,
    /// Pre-failure (as opposed to old-age) attribute.
    pub prefailure: bool,
    /// The 48-bit raw value as one number; vendors may pack several counters.
    pub raw_value: Option<u64>,
    /// smartctl's rendering of the raw value, which unpacks known formats.
    pub raw_string: Option<String>,
}

/// NVMe SMART / Health Information log (log page 0x02).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct NvmeHealth {
    pub critical_warning: Option<u8>,
    /// Percent of spare capacity left.
    pub available_spare: Option<u32>,
    pub available_spare_threshold: Option<u32>,
    /// Vendor estimate of life used, percent; may exceed 100 (capped at 255).
    pub percentage_used: Option<u32>,
    pub media_errors: Option<u64>,
    pub num_err_log_entries: Option<u64>,
    pub unsafe_shutdowns: Option<u64>,
    /// Composite temperature, °C.
    pub temperature: Option<i64>,
    /// In units of 1000 × 512 bytes.
    pub data_units_written: Option<u64>,
    /// Warning composite temperature threshold (WCTEMP), °C, when smartctl reports it.
    pub warning_temperature: Option<i64>,
    /// Critical composite temperature threshold (CCTEMP), °C, when smartctl reports it.
    pub critical_temperature: Option<i64>,
}

/// SCSI / SAS health counters.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct ScsiHealth {
    /// Entries in the grown defect list (LBAs remapped since manufacture).
    pub grown_defects: Option<u64>,
    pub read_uncorrected: Option<u64>,
    pub write_uncorrected: Option<u64>,
    pub verify_uncorrected: Option<u64>,
    /// Percentage used endurance indicator (SSDs).
    pub percentage_used_endurance: Option<u32>,
}

impl ScsiHealth {
    fn is_empty(&self) -> bool {
        *self == ScsiHealth::default()
    }
}

/// Temperature limits the drive reports for itself, in °C.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
pub struct TemperatureLimits {
    /// Recommended maximum operating temperature (ATA SCT `op_limit_max`).
    pub warning: Option<i64>,
    /// Absolute maximum (`critical_limit_max`, ATA SCT `limit_max`, or SCSI `drive_trip`).
    pub critical: Option<i64>,
}

/// One self-test log entry, ATA or NVMe, newest first in [`Report::self_tests`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelfTest {
    /// Test type as smartctl names it, e.g. "Short offline" or "Extended".
    pub kind: String,
    /// An extended (long) test, which reads the whole surface.
    pub extended: bool,
    /// Outcome as smartctl words it, e.g. "Completed: read failure".
    pub status: String,
    /// `Some(true)` completed without error, `Some(false)` failed,
    /// `None` aborted, interrupted or still running.
    pub passed: Option<bool>,
    /// Power-on hours when the test ran (ATA wraps at 65536).
    pub lifetime_hours: Option<u64>,
    pub lba_of_first_error: Option<u64>,
}

/// What one `smartctl --json --xall DEV` run said about one device.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize)]
pub struct Report {
    /// `device.name`, e.g. `/dev/sda`.
    pub device_name: Option<String>,
    /// `device.type`, e.g. `sat`, `nvme`, `scsi`, `sat+megaraid,0`.
    pub device_type: Option<String>,
    pub protocol: Option<Protocol>,
    /// smartctl version, e.g. `7.3`.
    pub smartctl_version: Option<String>,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub firmware: Option<String>,
    pub capacity_bytes: Option<u64>,
    /// RPM; 0 means a solid-state device.
    pub rotation_rate: Option<u64>,
    /// SMART overall-health self-assessment; `None` when not reported.
    pub smart_passed: Option<bool>,
    /// Current temperature, °C.
    pub temperature: Option<i64>,
    pub temperature_limits: TemperatureLimits,
    pub power_on_hours: Option<u64>,
    /// `None` when the JSON has no `smartctl.exit_status` (trimmed outputs).
    pub exit_status: Option<ExitStatus>,
    pub messages: Vec<Message>,
    pub ata_attributes: Vec<AtaAttribute>,
    pub nvme: Option<NvmeHealth>,
    pub scsi: Option<ScsiHealth>,
    pub self_tests: Vec<SelfTest>,
}

impl Report {
    /// Whether the report carries any health data at all, as opposed to only
    /// identity or smartctl's own complaints (device not opened, RAID volume).
    pub fn has_health_data(&self) -> bool {
        self.smart_passed.is_some()
            || !self.ata_attributes.is_empty()
            || self.nvme.is_some()
            || self.scsi.is_some()
    }

    /// The ATA attribute with this id, if the drive reports it.
    pub fn ata_attribute(&self, id: u8) -> Option<&AtaAttribute> {
        self.ata_attributes.iter().find(|a| a.id == id)
    }
}

/// One device from `smartctl --scan --json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ScanDevice {
    /// Device name to pass back to smartctl, e.g. `/dev/sda` or `/dev/bus/0`.
    pub name: String,
    pub info_name: Option<String>,
    /// Device type to pass back with `-d`, e.g. `sat`, `nvme`, `megaraid,0`.
    pub device_type: Option<String>,
    pub protocol: Option<Protocol>,
}

/// Parses the JSON of `smartctl --json --xall DEV` (or any subset such as `-jH`).
pub fn parse(json: &str) -> Result<Report, ParseError> {
    let value: Value = serde_json::from_str(json).map_err(|e| ParseError::from_json(&e))?;
    let Value::Object(map) = &value else {
        return Err(ParseError::not_smartctl(
            "the top-level JSON value is not an object",
        ));
    };
    let is_device_output = map.contains_key("smartctl")
        || map.contains_key("device")
        || map.contains_key("json_format_version");
    if !is_device_output {
        return Err(ParseError::not_smartctl(
            "none of the keys smartctl writes (smartctl, device, json_format_version) is present",
        ));
    }
    if map.contains_key("devices") && !map.contains_key("device") {
        return Err(ParseError::not_smartctl(
            "this is `smartctl --scan` output (a devices list), not a device report",
        ));
    }
    let raw = raw::Output::deserialize(value).map_err(|e| ParseError::NotSmartctl {
        reason: e.to_string(),
    })?;
    Ok(raw.into_report())
}

/// Parses the JSON of `smartctl --scan --json` (or `--scan-open --json`).
pub fn parse_scan(json: &str) -> Result<Vec<ScanDevice>, ParseError> {
    let value: Value = serde_json::from_str(json).map_err(|e| ParseError::from_json(&e))?;
    let Value::Object(map) = &value else {
        return Err(ParseError::not_smartctl(
            "the top-level JSON value is not an object",
        ));
    };
    if !map.contains_key("devices") {
        if map.contains_key("device") {
            return Err(ParseError::not_smartctl(
                "this is a device report, not `smartctl --scan` output",
            ));
        }
        if map.contains_key("smartctl") {
            // smartctl leaves the list out when the scan found nothing.
            return Ok(Vec::new());
        }
        return Err(ParseError::not_smartctl(
            "neither a devices list nor a smartctl section is present",
        ));
    }
    let raw = raw::Scan::deserialize(value).map_err(|e| ParseError::NotSmartctl {
        reason: e.to_string(),
    })?;
    Ok(raw
        .devices
        .0
        .into_iter()
        .filter_map(|d| {
            Some(ScanDevice {
                name: d.name.0.filter(|n| !n.is_empty())?,
                info_name: d.info_name.0,
                device_type: d.r#type.0,
                protocol: d.protocol.0.as_deref().map(Protocol::from_smartctl),
            })
        })
        .collect())
}

/// A field read leniently: missing, `null` or of an unexpected type gives `None`.
///
/// smartctl's schema is informal and versions differ, so one odd field must
/// not cost the whole report.
#[derive(Debug, Clone, PartialEq)]
struct Lenient<T>(Option<T>);

impl<T> Default for Lenient<T> {
    fn default() -> Self {
        Lenient(None)
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for Lenient<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = Value::deserialize(d)?;
        Ok(Lenient(T::deserialize(v).ok()))
    }
}

/// A table read leniently: rows that do not fit are dropped, not the table.
#[derive(Debug, Clone, PartialEq)]
struct LenientVec<T>(Vec<T>);

impl<T> Default for LenientVec<T> {
    fn default() -> Self {
        LenientVec(Vec::new())
    }
}

impl<'de, T: DeserializeOwned> Deserialize<'de> for LenientVec<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let rows = match Value::deserialize(d)? {
            Value::Array(rows) => rows
                .into_iter()
                .filter_map(|row| T::deserialize(row).ok())
                .collect(),
            _ => Vec::new(),
        };
        Ok(LenientVec(rows))
    }
}

/// smartctl's JSON as it is written, before it is shaped into a [`Report`].
mod raw {
    use super::{Lenient, LenientVec};
    use serde::Deserialize;

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct Output {
        pub smartctl: Lenient<Smartctl>,
        pub device: Lenient<Device>,
        pub model_name: Lenient<String>,
        pub scsi_model_name: Lenient<String>,
        pub scsi_vendor: Lenient<String>,
        pub scsi_product: Lenient<String>,
        pub vendor: Lenient<String>,
        pub product: Lenient<String>,
        pub serial_number: Lenient<String>,
        pub firmware_version: Lenient<String>,
        pub scsi_revision: Lenient<String>,
        pub revision: Lenient<String>,
        pub user_capacity: Lenient<Capacity>,
        pub nvme_total_capacity: Lenient<u64>,
        pub rotation_rate: Lenient<u64>,
        pub smart_status: Lenient<SmartStatus>,
        pub temperature: Lenient<Temperature>,
        pub power_on_time: Lenient<PowerOnTime>,
        pub ata_smart_attributes: Lenient<AtaAttributes>,
        pub ata_smart_self_test_log: Lenient<AtaSelfTestLog>,
        pub nvme_smart_health_information_log: Lenient<NvmeLog>,
        pub nvme_composite_temperature_threshold: Lenient<NvmeTemperatureThreshold>,
        pub nvme_self_test_log: Lenient<NvmeSelfTestLog>,
        pub scsi_grown_defect_list: Lenient<u64>,
        pub scsi_error_counter_log: Lenient<ScsiErrorCounterLog>,
        pub scsi_percentage_used_endurance_indicator: Lenient<u32>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct Smartctl {
        pub version: LenientVec<u32>,
        pub exit_status: Lenient<u8>,
        pub messages: LenientVec<Message>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct Message {
        pub string: Lenient<String>,
        pub severity: Lenient<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct Device {
        pub name: Lenient<String>,
        pub info_name: Lenient<String>,
        pub r#type: Lenient<String>,
        pub protocol: Lenient<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct Scan {
        pub devices: LenientVec<Device>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct Capacity {
        pub bytes: Lenient<u64>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct SmartStatus {
        pub passed: Lenient<bool>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct Temperature {
        pub current: Lenient<i64>,
        pub op_limit_max: Lenient<i64>,
        pub critical_limit_max: Lenient<i64>,
        pub limit_max: Lenient<i64>,
        pub drive_trip: Lenient<i64>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct PowerOnTime {
        pub hours: Lenient<u64>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct AtaAttributes {
        pub table: LenientVec<AtaAttribute>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct AtaAttribute {
        pub id: Lenient<u8>,
        pub name: Lenient<String>,
        pub value: Lenient<u8>,
        pub worst: Lenient<u8>,
        pub thresh: Lenient<u8>,
        pub when_failed: Lenient<String>,
        pub flags: Lenient<AtaFlags>,
        pub raw: Lenient<AtaRaw>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct AtaFlags {
        pub prefailure: Lenient<bool>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct AtaRaw {
        pub value: Lenient<u64>,
        pub string: Lenient<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct AtaSelfTestLog {
        pub standard: Lenient<AtaSelfTestTable>,
        pub extended: Lenient<AtaSelfTestTable>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct AtaSelfTestTable {
        pub table: LenientVec<AtaSelfTest>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct AtaSelfTest {
        pub r#type: Lenient<CodeString>,
        pub status: Lenient<AtaSelfTestStatus>,
        pub lifetime_hours: Lenient<u64>,
        pub lba: Lenient<u64>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct AtaSelfTestStatus {
        pub value: Lenient<u64>,
        pub string: Lenient<String>,
        pub passed: Lenient<bool>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct CodeString {
        pub value: Lenient<u64>,
        pub string: Lenient<String>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct NvmeLog {
        pub critical_warning: Lenient<u8>,
        pub temperature: Lenient<i64>,
        pub available_spare: Lenient<u32>,
        pub available_spare_threshold: Lenient<u32>,
        pub percentage_used: Lenient<u32>,
        pub data_units_written: Lenient<u64>,
        pub unsafe_shutdowns: Lenient<u64>,
        pub media_errors: Lenient<u64>,
        pub num_err_log_entries: Lenient<u64>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct NvmeTemperatureThreshold {
        pub warning: Lenient<i64>,
        pub critical: Lenient<i64>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct NvmeSelfTestLog {
        pub table: LenientVec<NvmeSelfTest>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct NvmeSelfTest {
        pub self_test_code: Lenient<CodeString>,
        pub self_test_result: Lenient<CodeString>,
        pub power_on_hours: Lenient<u64>,
        pub lba: Lenient<u64>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct ScsiErrorCounterLog {
        pub read: Lenient<ScsiErrorCounter>,
        pub write: Lenient<ScsiErrorCounter>,
        pub verify: Lenient<ScsiErrorCounter>,
    }

    #[derive(Deserialize, Default)]
    #[serde(default)]
    pub(super) struct ScsiErrorCounter {
        pub total_uncorrected_errors: Lenient<u64>,
    }
}

/// Treats empty and blank strings as absent: smartctl pads some identity fields.
fn non_blank(s: Option<String>) -> Option<String> {
    s.map(|s| s.trim().to_string()).filter(|s| !s.is_empty())
}

/// smartctl writes 0 for temperature limits a device does not report.
fn positive(t: Option<i64>) -> Option<i64> {
    t.filter(|t| *t > 0)
}

impl raw::Output {
    fn into_report(self) -> Report {
        let smartctl = self.smartctl.0.unwrap_or_default();
        let device = self.device.0.unwrap_or_default();
        let temperature = self.temperature.0.unwrap_or_default();
        let nvme_thresholds = self.nvme_composite_temperature_threshold.0;

        let model = non_blank(self.model_name.0)
            .or_else(|| non_blank(self.scsi_model_name.0))
            .or_else(|| {
                let vendor = non_blank(self.scsi_vendor.0).or_else(|| non_blank(self.vendor.0));
                let product = non_blank(self.scsi_product.0).or_else(|| non_blank(self.product.0));
                match (vendor, product) {
                    (Some(v), Some(p)) => Some(format!("{v} {p}")),
                    (v, p) => v.or(p),
                }
            });

        let smartctl_version = match smartctl.version.0.as_slice() {
            [] => None,
            parts => Some(
                parts
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join("."),
            ),
        };

        let messages = smartctl
            .messages
            .0
            .into_iter()
            .filter_map(|m| {
                let text = non_blank(m.string.0)?;
                let severity = match m.severity.0.as_deref().map(str::trim) {
                    Some(s) if s.eq_ignore_ascii_case("information") => {
                        MessageSeverity::Information
                    }
                    Some(s) if s.eq_ignore_ascii_case("warning") => MessageSeverity::Warning,
                    Some(s) if s.eq_ignore_ascii_case("error") => MessageSeverity::Error,
                    Some(s) => MessageSeverity::Other(s.to_string()),
                    None => MessageSeverity::Other(String::new()),
                };
                Some(Message { text, severity })
            })
            .collect();

        let ata_attributes = self
            .ata_smart_attributes
            .0
            .map(|a| a.table.0)
            .unwrap_or_default()
            .into_iter()
            .filter_map(|a| {
                let raw = a.raw.0.unwrap_or_default();
                Some(AtaAttribute {
                    // A row without an id cannot be interpreted at all.
                    id: a.id.0?,
                    name: non_blank(a.name.0).unwrap_or_default(),
                    value: a.value.0,
                    worst: a.worst.0,
                    thresh: a.thresh.0,
                    when_failed: WhenFailed::from_smartctl(a.when_failed.0.as_deref()),
                    prefailure: a.flags.0.and_then(|f| f.prefailure.0).unwrap_or(false),
                    raw_value: raw.value.0,
                    raw_string: raw.string.0,
                })
            })
            .collect();

        let nvme = self
            .nvme_smart_health_information_log
            .0
            .map(|n| NvmeHealth {
                critical_warning: n.critical_warning.0,
                available_spare: n.available_spare.0,
                available_spare_threshold: n.available_spare_threshold.0,
                percentage_used: n.percentage_used.0,
                media_errors: n.media_errors.0,
                num_err_log_entries: n.num_err_log_entries.0,
                unsafe_shutdowns: n.unsafe_shutdowns.0,
                temperature: n.temperature.0,
                data_units_written: n.data_units_written.0,
                warning_temperature: positive(nvme_thresholds.as_ref().and_then(|t| t.warning.0)),
                critical_temperature: positive(nvme_thresholds.as_ref().and_then(|t| t.critical.0)),
            });

        let counters = self.scsi_error_counter_log.0.unwrap_or_default();
        let uncorrected =
            |c: Lenient<raw::ScsiErrorCounter>| c.0.and_then(|c| c.total_uncorrected_errors.0);
        let scsi = ScsiHealth {
            grown_defects: self.scsi_grown_defect_list.0,
            read_uncorrected: uncorrected(counters.read),
            write_uncorrected: uncorrected(counters.write),
            verify_uncorrected: uncorrected(counters.verify),
            percentage_used_endurance: self.scsi_percentage_used_endurance_indicator.0,
        };
        let scsi = (!scsi.is_empty()).then_some(scsi);

        let self_tests = match (self.ata_smart_self_test_log.0, self.nvme_self_test_log.0) {
            (Some(ata), _) => {
                // The extended log is the standard one's superset on drives that
                // have it, so reading both would list the same tests twice.
                let table = ata
                    .extended
                    .0
                    .filter(|t| !t.table.0.is_empty())
                    .or(ata.standard.0)
                    .map(|t| t.table.0)
                    .unwrap_or_default();
                table.into_iter().map(ata_self_test).collect()
            }
            (None, Some(nvme)) => nvme.table.0.into_iter().map(nvme_self_test).collect(),
            (None, None) => Vec::new(),
        };

        Report {
            device_name: non_blank(device.name.0),
            device_type: non_blank(device.r#type.0),
            protocol: device.protocol.0.as_deref().map(Protocol::from_smartctl),
            smartctl_version,
            model,
            serial: non_blank(self.serial_number.0),
            firmware: non_blank(self.firmware_version.0)
                .or_else(|| non_blank(self.scsi_revision.0))
                .or_else(|| non_blank(self.revision.0)),
            capacity_bytes: self
                .user_capacity
                .0
                .and_then(|c| c.bytes.0)
                .or(self.nvme_total_capacity.0),
            rotation_rate: self.rotation_rate.0,
            smart_passed: self.smart_status.0.and_then(|s| s.passed.0),
            temperature: temperature.current.0,
            temperature_limits: TemperatureLimits {
                warning: positive(temperature.op_limit_max.0),
                critical: positive(temperature.critical_limit_max.0)
                    .or(positive(temperature.limit_max.0))
                    .or(positive(temperature.drive_trip.0)),
            },
            power_on_hours: self.power_on_time.0.and_then(|p| p.hours.0),
            exit_status: smartctl.exit_status.0.map(ExitStatus),
            messages,
            ata_attributes,
            nvme,
            scsi,
            self_tests,
        }
    }
}

fn ata_self_test(t: raw::AtaSelfTest) -> SelfTest {
    let kind = t.r#type.0.unwrap_or_default();
    let status = t.status.0.unwrap_or_default();
    let passed = status.passed.0.or_else(|| {
        // Older smartctl leaves `passed` out; the high nibble of the status
        // byte is the outcome (0 done, 1-2 aborted, 3-8 failures, 15 running).
        match status.value.0.map(|v| (v >> 4) & 0xf) {
            Some(0) => Some(true),
            Some(3..=8) => Some(false),
            _ => None,
        }
    });
    let kind_name = kind.string.0.unwrap_or_default();
    SelfTest {
        // ATA types 2 and 130 are the offline and captive extended tests.
        extended: matches!(kind.value.0, Some(2 | 130))
            || kind_name.to_ascii_lowercase().contains("extended"),
        kind: kind_name,
        status: status.string.0.unwrap_or_default(),
        passed,
        lifetime_hours: t.lifetime_hours.0,
        lba_of_first_error: t.lba.0,
    }
}

fn nvme_self_test(t: raw::NvmeSelfTest) -> SelfTest {
    let code = t.self_test_code.0.unwrap_or_default();
    let result = t.self_test_result.0.unwrap_or_default();
    // NVMe result codes: 0 completed, 5 fatal, 6 unknown segment failed,
    // 7 segments failed; the others are aborts.
    let passed = match result.value.0 {
        Some(0) => Some(true),
        Some(5..=7) => Some(false),
        _ => None,
    };
    let kind_name = code.string.0.unwrap_or_default();
    SelfTest {
        extended: code.value.0 == Some(2) || kind_name.to_ascii_lowercase().contains("extended"),
        kind: kind_name,
        status: result.string.0.unwrap_or_default(),
        passed,
        lifetime_hours: t.power_on_hours.0,
        lba_of_first_error: t.lba.0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_accessors_read_their_own_bit() {
        type Accessor = fn(ExitStatus) -> bool;
        let accessors: [(u8, Accessor); 8] = [
            (0, ExitStatus::command_line),
            (1, ExitStatus::device_open_failed),
            (2, ExitStatus::command_failed),
            (3, ExitStatus::failing),
            (4, ExitStatus::prefail_at_threshold),
            (5, ExitStatus::past_threshold),
            (6, ExitStatus::error_log_has_errors),
            (7, ExitStatus::self_test_log_has_errors),
        ];
        for (bit, accessor) in accessors {
            for (other, _) in accessors {
                let status = ExitStatus(1 << other);
                assert_eq!(
                    accessor(status),
                    bit == other,
                    "bit {bit} read from {status:?}"
                );
            }
            assert!(!accessor(ExitStatus(0)));
            assert!(accessor(ExitStatus(0xff)));
        }
    }

    #[test]
    fn exit_status_lists_set_bits_with_names() {
        // smart-fail2.json: failing, prefail at threshold, error log, self-test log.
        let bits = ExitStatus(216).set_bits();
        let listed: Vec<(u8, &str)> = bits.iter().map(|b| (b.bit, b.code)).collect();
        assert_eq!(
            listed,
            [
                (3, "failing"),
                (4, "prefail_at_threshold"),
                (6, "error_log_has_errors"),
                (7, "self_test_log_has_errors"),
            ]
        );
        assert!(bits.iter().all(|b| !b.description.is_empty()));
        assert!(ExitStatus(0).set_bits().is_empty());
        let all: Vec<&str> = ExitStatus(0xff).set_bits().iter().map(|b| b.code).collect();
        assert_eq!(
            all,
            [
                "command_line",
                "device_open_failed",
                "command_failed",
                "failing",
                "prefail_at_threshold",
                "past_threshold",
                "error_log_has_errors",
                "self_test_log_has_errors",
            ]
        );
    }

    #[test]
    fn when_failed_only_now_and_past_are_failures() {
        assert_eq!(WhenFailed::from_smartctl(None), WhenFailed::None);
        assert_eq!(WhenFailed::from_smartctl(Some("")), WhenFailed::None);
        assert_eq!(WhenFailed::from_smartctl(Some("now")), WhenFailed::Now);
        assert_eq!(WhenFailed::from_smartctl(Some("past")), WhenFailed::Past);
        assert_eq!(
            WhenFailed::from_smartctl(Some("-")),
            WhenFailed::Other("-".to_string())
        );
        assert_eq!(
            WhenFailed::from_smartctl(Some("In_the_past")),
            WhenFailed::Other("In_the_past".to_string())
        );
    }

    #[test]
    fn protocols_are_recognised() {
        assert_eq!(Protocol::from_smartctl("ATA"), Protocol::Ata);
        assert_eq!(Protocol::from_smartctl("NVMe"), Protocol::Nvme);
        assert_eq!(Protocol::from_smartctl("SCSI"), Protocol::Scsi);
        assert_eq!(
            Protocol::from_smartctl("USB"),
            Protocol::Other("USB".to_string())
        );
    }

    #[test]
    fn fields_of_unexpected_type_are_dropped_not_fatal() {
        let report = parse(
            r#"{
              "smartctl": {"exit_status": "four", "version": [7, "x"],
                           "messages": [{"string": "hi", "severity": "warning"}, 5]},
              "device": {"name": "/dev/sda", "protocol": 7},
              "model_name": ["not", "a", "string"],
              "serial_number": "  ",
              "user_capacity": {"bytes": 1.5e300},
              "temperature": 40,
              "power_on_time": {"hours": -3},
              "ata_smart_attributes": {"table": [
                {"id": 5, "name": "Reallocated_Sector_Ct", "value": 100, "worst": 100,
                 "thresh": 10, "when_failed": "", "flags": {"prefailure": true},
                 "raw": {"value": 3, "string": "3"}},
                {"id": 700, "name": "Bogus"},
                {"name": "No id"},
                "garbage",
                {"id": 197, "value": "x", "raw": {"value": 18446744073709551615}}
              ]},
              "nvme_smart_health_information_log": {"critical_warning": 300, "media_errors": 2}
            }"#,
        )
        .expect("lenient parse");
        assert_eq!(report.exit_status, None);
        assert_eq!(report.smartctl_version.as_deref(), Some("7"));
        assert_eq!(report.messages.len(), 1);
        assert_eq!(report.device_name.as_deref(), Some("/dev/sda"));
        assert_eq!(report.protocol, None);
        assert_eq!(report.model, None);
        assert_eq!(report.serial, None);
        assert_eq!(report.capacity_bytes, None);
        assert_eq!(report.temperature, None);
        assert_eq!(report.power_on_hours, None);
        let ids: Vec<u8> = report.ata_attributes.iter().map(|a| a.id).collect();
        assert_eq!(ids, [5, 197]);
        let pending = report.ata_attribute(197).expect("197 kept");
        assert_eq!(pending.value, None);
        assert_eq!(pending.raw_value, Some(u64::MAX));
        let nvme = report.nvme.expect("nvme log");
        assert_eq!(nvme.critical_warning, None);
        assert_eq!(nvme.media_errors, Some(2));
    }

    #[test]
    fn scsi_model_falls_back_to_vendor_and_product() {
        let report = parse(
            r#"{"device": {"protocol": "SCSI"}, "scsi_vendor": "SEAGATE",
                "scsi_product": "ST373453LC", "scsi_revision": "DX10",
                "scsi_grown_defect_list": 0}"#,
        )
        .expect("parses");
        assert_eq!(report.model.as_deref(), Some("SEAGATE ST373453LC"));
        assert_eq!(report.firmware.as_deref(), Some("DX10"));
        assert_eq!(report.scsi.and_then(|s| s.grown_defects), Some(0));
    }

    #[test]
    fn malformed_json_reports_line_and_column() {
        let err = parse("{\n  \"smartctl\": {\"exit_status\": 0,}\n}").unwrap_err();
        assert_eq!(
            err,
            ParseError::Malformed {
                line: 2,
                column: 33,
                message: "trailing comma".to_string(),
            }
        );
        assert_eq!(
            err.to_string(),
            "malformed JSON at line 2, column 33: trailing comma"
        );
    }

    #[test]
    fn truncated_json_is_told_apart() {
        let err = parse("{\n  \"smartctl\": {\"exit_status\": 0").unwrap_err();
        assert_eq!(
            err,
            ParseError::Truncated {
                line: 2,
                column: 31
            }
        );
        assert_eq!(parse(""), Err(ParseError::Truncated { line: 1, column: 0 }));
    }

    #[test]
    fn json_that_is_not_smartctl_output_is_rejected() {
        assert_eq!(
            parse("[1, 2]"),
            Err(ParseError::NotSmartctl {
                reason: "the top-level JSON value is not an object".to_string()
            })
        );
        assert_eq!(
            parse(r#"{"name": "not smartctl"}"#),
            Err(ParseError::NotSmartctl {
                reason: "none of the keys smartctl writes (smartctl, device, json_format_version) is present".to_string()
            })
        );
        assert!(matches!(
            parse(r#"{"smartctl": {"exit_status": 0}, "devices": []}"#),
            Err(ParseError::NotSmartctl { .. })
        ));
    }

    #[test]
    fn scan_output_lists_devices() {
        let devices = parse_scan(
            r#"{
              "json_format_version": [1, 0],
              "smartctl": {"version": [7, 3], "exit_status": 0},
              "devices": [
                {"name": "/dev/sda", "info_name": "/dev/sda [SAT]", "type": "sat", "protocol": "ATA"},
                {"name": "/dev/nvme0", "info_name": "/dev/nvme0", "type": "nvme", "protocol": "NVMe"},
                {"name": "/dev/bus/0", "info_name": "/dev/bus/0 [megaraid_disk_00]", "type": "megaraid,0", "protocol": "SCSI"},
                {"info_name": "nameless"},
                42
              ]
            }"#,
        )
        .expect("scan parses");
        assert_eq!(
            devices,
            [
                ScanDevice {
                    name: "/dev/sda".to_string(),
                    info_name: Some("/dev/sda [SAT]".to_string()),
                    device_type: Some("sat".to_string()),
                    protocol: Some(Protocol::Ata),
                },
                ScanDevice {
                    name: "/dev/nvme0".to_string(),
                    info_name: Some("/dev/nvme0".to_string()),
                    device_type: Some("nvme".to_string()),
                    protocol: Some(Protocol::Nvme),
                },
                ScanDevice {
                    name: "/dev/bus/0".to_string(),
                    info_name: Some("/dev/bus/0 [megaraid_disk_00]".to_string()),
                    device_type: Some("megaraid,0".to_string()),
                    protocol: Some(Protocol::Scsi),
                },
            ]
        );
        assert_eq!(
            parse_scan(r#"{"smartctl": {"exit_status": 0}}"#),
            Ok(Vec::new())
        );
        assert_eq!(
            parse_scan(r#"{"smartctl": {}, "device": {"name": "/dev/sda"}}"#),
            Err(ParseError::NotSmartctl {
                reason: "this is a device report, not `smartctl --scan` output".to_string()
            })
        );
        assert!(matches!(
            parse_scan(r#"{"devices": [{"name": "/dev/sda""#),
            Err(ParseError::Truncated { .. })
        ));
        assert!(matches!(
            parse_scan("\"devices\""),
            Err(ParseError::NotSmartctl { .. })
        ));
    }
}
