//! Disk-health verdicts from a parsed smartctl [`Report`], each with the
//! reasons a technician can check.
//!
//! The depot has to decide, per disk, whether it is fit for use. smartctl's
//! own "PASSED" is not enough for that: drives routinely pass their
//! self-assessment while carrying reallocated or pending sectors that
//! Backblaze's fleet data ties to sharply higher failure rates. So
//! [`assess`] combines smartctl's verdict with rules of its own and returns an
//! [`Assessment`]: a [`Verdict`], the [`Reason`]s behind it (stable machine
//! codes plus a sentence naming the attribute, the value and the limit), the
//! few [`KeyAttribute`]s worth showing, and a [`RemainingLife`] estimate.
//!
//! # Rules
//!
//! * **SMART overall status** failed → failed (`smart_status.failed`).
//! * **smartctl exit bits**, each its own reason: failing and pre-fail
//!   attribute at threshold → failed; attribute past threshold, error log and
//!   self-test log errors → warning; command line, device open and command
//!   failures → unknown when the report holds no health data, otherwise
//!   informational (RAID controllers often fail one command yet return data).
//! * **ATA thresholds**: `when_failed` `"now"` → failed for a pre-failure
//!   attribute, warning for an old-age one; `"past"` → warning. Nothing else
//!   `when_failed` may contain counts.
//! * **Critical ATA attributes** 5, 10, 184, 187, 188, 196, 197, 198 and 201
//!   are placed in the observed annual-failure-rate (AFR) buckets that
//!   Backblaze's drive statistics give and Scrutiny tabulates. A value in the
//!   baseline bucket (the one holding 0) raises nothing. Otherwise the
//!   bucket's AFR decides: 10 %/year or more → failed (Scrutiny's line for
//!   critical attributes, about four times the ~2.5 %/year of drives reading
//!   0); 5 %/year or more → warning (twice that baseline); below 5 %/year →
//!   an informational reason only, because the data says such drives fail
//!   about as often as drives reading 0 (1-4 reallocated sectors: 2.7 %/year;
//!   the rate rule still warns if the count starts rising). The buckets are
//!   noisy (196's 18-27 bucket is lower than its 12-17 one), so a value is
//!   rated by the worst bucket at or below it: a higher count never gets a
//!   milder verdict than a lower one. Values above the highest bucket are
//!   rated like the worst bucket. 184's rates are by normalized value (100:
//!   9.3 %/year, 99: 83.7 %/year, 98: 180.7 %/year), applied once the drive
//!   has counted an error or lowered the value. 188's baseline runs to 100
//!   timeouts, which Scrutiny chose so that cable and power glitches do not
//!   alarm. 201 has no observed rates, so any non-zero count warns. Vendors
//!   reuse ids, so an attribute smartctl names `Not_In_Use` or `Unknown_*`
//!   is skipped, and 201 counts only under its standard name (Intel's S3520
//!   reports a capacitor test there).
//! * **Packed raw values**: vendors pack several counters into the 48-bit raw
//!   value. Attributes 1, 7 and 195 (Seagate error rates) are never judged by
//!   their raw value at all. Seagate packs three 16-bit command-timeout
//!   counters into 188, so 188 always uses its low 16 bits (the total, which
//!   smartctl's `raw16` rendering prints last). For the other counters a raw
//!   value above 32 bits cannot be a plain count and is read as its low 16
//!   bits, which is the counter smartctl's default `raw16(raw16)` rendering
//!   shows first; since that packing is vendor-specific the result is held at
//!   warning.
//! * **Rates**: reallocated (5), pending (197), offline-uncorrectable (198) and
//!   reported-uncorrectable (187) sectors, NVMe media errors and SCSI grown
//!   defects rising within the last 24 h, compared with the lowest value in
//!   the history samples of that window → warning. A counter that moves within
//!   a day means the drive is losing sectors now; it is not failed on that
//!   alone because one remap is routine and pending sectors can clear when
//!   rewritten.
//! * **NVMe**: each `critical_warning` bit is its own reason (temperature bit
//!   → warning, unknown bits → warning, the other five → failed). Because
//!   smartctl derives NVMe `smart_status` and exit bit 3 from that same byte,
//!   those two are not repeated when the byte is non-zero. Media errors > 0 →
//!   warning; available spare below its threshold → failed. Error-log entries
//!   are shown but not judged: hosts provoke them with harmless commands.
//! * **SCSI**: there are no published failure-rate buckets, so grown defects
//!   use attribute 5's buckets (both count remapped sectors) and each
//!   direction's uncorrected errors use 187's (both count errors the drive
//!   could not recover).
//! * **Wear** (NVMe `percentage_used`, SCSI endurance indicator, ATA wear
//!   attributes, see [`Sample::wear_percent_used`]): ≥ 95 % → warning (as smartd
//!   7.5 does for NVMe), ≥ 100 % → failed.
//! * **Temperature**: at or above the drive's own warning / critical limit when
//!   it reports one (NVMe WCTEMP/CCTEMP, ATA SCT limits, SCSI trip point),
//!   otherwise at or above 60 / 70 °C for ATA and SCSI and 70 / 80 °C for NVMe,
//!   which runs hotter by design. Warning vs failed. A drive that reports only
//!   a critical limit gets its warning limit 10 °C below it. Limits outside
//!   30-150 °C are ignored as garbage.
//! * **Self-tests**: the newest failed self-test that no later passing
//!   extended test outdates (smartctl's own rule) → warning.
//!
//! # Verdict order
//!
//! [`Verdict`] orders by urgency: `Passed < Unknown < Warning < Failed`, and
//! the verdict is the most urgent reason's severity. Unknown ranks above
//! Passed because a disk that could not be read must not look healthy, and
//! below Warning because a concrete warning says more and asks for more than
//! no information does. In practice Unknown only arises when there is no
//! health data at all, so it rarely competes with the others.
//!
//! # Passed verdicts
//!
//! Reasons with severity `passed` are informational. A passed verdict always
//! carries one `summary.passed` reason listing what was checked, and the key
//! attributes carry the values, so "passed" is never an empty answer.

use serde::{Deserialize, Serialize};

use super::smartctl::{AtaAttribute, Protocol, Report, WhenFailed};

/// Overall health verdict, ordered by urgency (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Verdict {
    Passed,
    Unknown,
    Warning,
    Failed,
}

impl Verdict {
    pub const ALL: [Verdict; 4] = [
        Verdict::Passed,
        Verdict::Unknown,
        Verdict::Warning,
        Verdict::Failed,
    ];

    /// As serialised: `passed`, `unknown`, `warning`, `failed`.
    pub fn as_str(self) -> &'static str {
        match self {
            Verdict::Passed => "passed",
            Verdict::Unknown => "unknown",
            Verdict::Warning => "warning",
            Verdict::Failed => "failed",
        }
    }

    pub fn parse(s: &str) -> Option<Verdict> {
        Verdict::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// One finding behind a verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reason {
    /// Stable machine code, e.g. `ata.attr.5.reallocated`.
    pub code: String,
    /// `passed` marks an informational reason.
    pub severity: Verdict,
    /// For a technician: the attribute, the value and the limit.
    pub message: String,
}

/// A value worth showing next to the verdict.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct KeyAttribute {
    pub name: String,
    pub value: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unit: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// Wear trend: how fast the drive uses up its rated endurance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RemainingLife {
    /// Wear now, percent of rated endurance.
    pub percent_used: f64,
    /// Least-squares slope of wear over time, percentage points per day.
    pub per_day: f64,
    /// Days until 100 % at that rate; 0 when already there.
    pub days_left: f64,
}

/// Everything [`assess`] concluded about one device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Assessment {
    pub verdict: Verdict,
    /// Most urgent first.
    pub reasons: Vec<Reason>,
    pub key_attributes: Vec<KeyAttribute>,
    pub remaining_life: Option<RemainingLife>,
}

/// The counters the depot stores per reading, for rate rules and wear trend.
///
/// Counts are already decoded (packed raw values unpacked as described in the
/// module docs), so samples from different readings compare directly. Every
/// field but `at_unix` is optional: a device reports only some of them, and
/// stored samples from older versions of this code must still load.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct Sample {
    pub at_unix: i64,
    /// ATA 5.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reallocated_sectors: Option<u64>,
    /// ATA 197.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pending_sectors: Option<u64>,
    /// ATA 198.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub offline_uncorrectable: Option<u64>,
    /// ATA 187.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reported_uncorrectable: Option<u64>,
    /// NVMe media and data integrity errors.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub media_errors: Option<u64>,
    /// SCSI grown defect list length.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub grown_defects: Option<u64>,
    /// Percent of rated endurance used, 0 when new, may exceed 100 on NVMe.
    ///
    /// NVMe `percentage_used` and the SCSI percentage-used endurance indicator
    /// are taken as they are. ATA has no standard wear attribute, so only
    /// attributes whose smartctl name says they count down remaining life from
    /// a normalized 100 are used, as `100 - normalized value`, first found of:
    /// 233 `Media_Wearout_Indicator` (Intel), 231 `SSD_Life_Left`
    /// (SandForce/Kingston), 202 `Percent_Lifetime_Remain` (Micron/Crucial),
    /// 177 `Wear_Leveling_Count` (Samsung). The id alone is not enough: 233 is
    /// also "Flash_Writes_GiB" and 202 "Data_Address_Mark_Errs" on other
    /// drives. Raw values are not used because vendors disagree on them
    /// (SandForce leaves 231's raw at 0, Phison puts the percentage there).
    /// Normalized values above 100 are not on a percent scale and are ignored.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub wear_percent_used: Option<u32>,
    /// °C.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature_c: Option<i64>,
}

/// Counters as this module decodes them from a report (see [`Sample`]).
pub fn sample(report: &Report, at_unix: i64) -> Sample {
    let count = |id: u8| {
        critical_spec(id)
            .and_then(|spec| usable_attribute(report, spec))
            .and_then(|attr| decode_count(attr).map(|d| d.count))
    };
    Sample {
        at_unix,
        reallocated_sectors: count(5),
        pending_sectors: count(197),
        offline_uncorrectable: count(198),
        reported_uncorrectable: count(187),
        media_errors: report.nvme.as_ref().and_then(|n| n.media_errors),
        grown_defects: report.scsi.as_ref().and_then(|s| s.grown_defects),
        wear_percent_used: wear(report).map(|w| w.percent_used),
        temperature_c: current_temperature(report),
    }
}

/// An assessment for a device whose smartctl output could not be read at all.
pub fn unknown(error: &str) -> Assessment {
    Assessment {
        verdict: Verdict::Unknown,
        reasons: vec![Reason {
            code: "input.unreadable".to_string(),
            severity: Verdict::Unknown,
            message: format!(
                "smartctl output could not be read, so the disk cannot be assessed: {error}"
            ),
        }],
        key_attributes: Vec::new(),
        remaining_life: None,
    }
}

/// Assesses one report. `history` holds earlier samples of the same drive
/// (any order; samples later than `now_unix` are ignored); `now_unix` is when
/// `report` was read.
pub fn assess(report: &Report, history: &[Sample], now_unix: i64) -> Assessment {
    let mut out = Findings::default();
    let has_data = report.has_health_data();

    rule_smart_status(report, &mut out);
    rule_exit_status(report, has_data, &mut out);
    rule_ata_thresholds(report, &mut out);
    rule_ata_critical(report, &mut out);
    rule_nvme(report, &mut out);
    rule_scsi(report, &mut out);
    rule_wear(report, &mut out);
    rule_temperature(report, &mut out);
    rule_rates(report, history, now_unix, &mut out);
    rule_self_tests(report, &mut out);
    rule_messages(report, has_data, &mut out);
    if !has_data {
        out.reason(
            "data.none",
            Verdict::Unknown,
            "smartctl returned no health data for this device (no SMART status, ATA attributes, \
             NVMe health log or SCSI counters), so it cannot be assessed; check the device type \
             (-d) and whether this is a RAID volume rather than a disk"
                .to_string(),
        );
    }

    let base = if has_data {
        Verdict::Passed
    } else {
        Verdict::Unknown
    };
    let verdict = out
        .reasons
        .iter()
        .map(|r| r.severity)
        .fold(base, Verdict::max);
    if verdict == Verdict::Passed {
        let summary = format!("No warning signs. Checked: {}", out.checked.join(", "));
        out.reason("summary.passed", Verdict::Passed, summary);
    }
    // Most urgent first; the sort is stable so rules keep their order within
    // a severity.
    out.reasons.sort_by_key(|r| std::cmp::Reverse(r.severity));

    Assessment {
        verdict,
        reasons: out.reasons,
        key_attributes: key_attributes(report),
        remaining_life: remaining_life(report, history, now_unix),
    }
}

#[derive(Default)]
struct Findings {
    reasons: Vec<Reason>,
    /// What was looked at, for the passed summary.
    checked: Vec<String>,
}

impl Findings {
    fn reason(&mut self, code: impl Into<String>, severity: Verdict, message: String) {
        self.reasons.push(Reason {
            code: code.into(),
            severity,
            message,
        });
    }

    fn checked(&mut self, what: impl Into<String>) {
        self.checked.push(what.into());
    }
}

/// Observed annual failure rates of Backblaze drives by attribute value, as
/// Scrutiny tabulates them. `from..=to` are inclusive; Scrutiny's half-open
/// edges are made contiguous so that every count has a bucket (its own table
/// leaves e.g. 1 pending sector in none).
struct Bucket {
    from: u64,
    to: u64,
    /// Percent per year.
    afr: f64,
}

const fn b(from: u64, to: u64, afr: f64) -> Bucket {
    Bucket { from, to, afr }
}

/// A failure rate at or above this, percent per year, fails the drive.
const FAIL_AFR: f64 = 10.0;
/// A failure rate at or above this, percent per year, warns.
const WARN_AFR: f64 = 5.0;

const BUCKETS_5: &[Bucket] = &[
    b(0, 0, 2.52),
    b(1, 4, 2.74),
    b(5, 16, 7.50),
    b(17, 70, 23.59),
    b(71, 260, 36.19),
    b(261, 1100, 56.77),
    b(1101, 4500, 150.28),
    b(4501, 17000, 206.60),
    b(17001, 70000, 177.55),
];
const BUCKETS_10: &[Bucket] = &[b(0, 0, 5.46), b(1, 80, 55.56)];
/// 184 is bucketed by how far its normalized value dropped below 100.
const BUCKETS_184_DROP: &[Bucket] = &[
    b(0, 0, 9.33),
    b(1, 1, 83.72),
    b(2, 2, 180.69),
    b(3, 5, 0.0),
    b(6, 6, 163.12),
];
const BUCKETS_187: &[Bucket] = &[
    b(0, 0, 2.81),
    b(1, 1, 33.88),
    b(2, 3, 24.06),
    b(4, 6, 50.14),
    b(7, 11, 38.01),
    b(12, 20, 53.46),
    b(21, 35, 84.28),
    b(36, 65, 144.29),
    b(66, 120, 161.91),
];
/// Scrutiny widened 188's baseline to 100 so that a few timeouts from a
/// cable or power glitch do not alarm. Its higher buckets are in units of
/// Seagate's packed raw value, meaningless once the low 16 bits are taken.
const BUCKETS_188: &[Bucket] = &[b(0, 100, 2.49), b(101, 65535, 10.04)];
const BUCKETS_196: &[Bucket] = &[
    b(0, 0, 0.74),
    b(1, 1, 2.66),
    b(2, 2, 2.47),
    b(3, 4, 3.20),
    b(5, 7, 4.31),
    b(8, 11, 3.38),
    b(12, 17, 16.98),
    b(18, 27, 5.90),
    b(28, 45, 24.70),
];
const BUCKETS_197: &[Bucket] = &[
    b(0, 0, 2.55),
    b(1, 2, 34.20),
    b(3, 6, 68.24),
    b(7, 16, 61.08),
    b(17, 40, 95.65),
    b(41, 100, 165.20),
    b(101, 250, 251.38),
    b(251, 650, 332.03),
    b(651, 1600, 313.30),
];
const BUCKETS_198: &[Bucket] = &[
    b(0, 0, 2.87),
    b(1, 2, 81.36),
    b(3, 4, 111.73),
    b(5, 6, 135.59),
    b(7, 8, 73.24),
    b(9, 10, 57.77),
    b(11, 12, 174.64),
    b(13, 14, 264.49),
    b(15, 16, 79.69),
];

struct CriticalSpec {
    id: u8,
    slug: &'static str,
    one: &'static str,
    many: &'static str,
    /// Empty: no observed rates, so any non-zero count is a warning.
    buckets: &'static [Bucket],
    /// Names smartctl uses for a different meaning of this id; `None` accepts
    /// any name but the placeholders.
    only_names: Option<&'static [&'static str]>,
}

const CRITICAL: &[CriticalSpec] = &[
    CriticalSpec {
        id: 5,
        slug: "reallocated",
        one: "reallocated sector",
        many: "reallocated sectors",
        buckets: BUCKETS_5,
        only_names: None,
    },
    CriticalSpec {
        id: 10,
        slug: "spin_retry",
        one: "spin-up retry",
        many: "spin-up retries",
        buckets: BUCKETS_10,
        only_names: None,
    },
    CriticalSpec {
        id: 184,
        slug: "end_to_end",
        one: "end-to-end data path error",
        many: "end-to-end data path errors",
        buckets: BUCKETS_184_DROP,
        only_names: None,
    },
    CriticalSpec {
        id: 187,
        slug: "reported_uncorrectable",
        one: "reported uncorrectable error",
        many: "reported uncorrectable errors",
        buckets: BUCKETS_187,
        only_names: None,
    },
    CriticalSpec {
        id: 188,
        slug: "command_timeout",
        one: "command timeout",
        many: "command timeouts",
        buckets: BUCKETS_188,
        only_names: None,
    },
    CriticalSpec {
        id: 196,
        slug: "reallocation_events",
        one: "reallocation event",
        many: "reallocation events",
        buckets: BUCKETS_196,
        only_names: None,
    },
    CriticalSpec {
        id: 197,
        slug: "pending",
        one: "pending (unreadable) sector",
        many: "pending (unreadable) sectors",
        buckets: BUCKETS_197,
        only_names: None,
    },
    CriticalSpec {
        id: 198,
        slug: "offline_uncorrectable",
        one: "offline uncorrectable sector",
        many: "offline uncorrectable sectors",
        buckets: BUCKETS_198,
        only_names: None,
    },
    CriticalSpec {
        id: 201,
        slug: "soft_read_errors",
        one: "soft read error",
        many: "soft read errors",
        buckets: &[],
        // Intel's S3520 reports its capacitor self-test under 201.
        only_names: Some(&["Soft_Read_Error_Rate", "Soft_Read_Err_Rate"]),
    },
];

fn critical_spec(id: u8) -> Option<&'static CriticalSpec> {
    CRITICAL.iter().find(|s| s.id == id)
}

/// The attribute if the drive reports it under a name that means what the
/// spec assumes.
fn usable_attribute<'a>(report: &'a Report, spec: &CriticalSpec) -> Option<&'a AtaAttribute> {
    let attr = report.ata_attribute(spec.id)?;
    let name = attr.name.as_str();
    let usable = match spec.only_names {
        Some(names) => names.contains(&name),
        None => name != "Not_In_Use" && !name.starts_with("Unknown_"),
    };
    usable.then_some(attr)
}

struct Decoded {
    count: u64,
    /// The count came out of a packed raw value.
    packed: bool,
    /// The packing is a guess, so the count may be misread.
    uncertain: bool,
}

fn decode_count(attr: &AtaAttribute) -> Option<Decoded> {
    let raw = attr.raw_value?;
    if attr.id == 188 {
        return Some(Decoded {
            count: raw & 0xffff,
            packed: raw > 0xffff,
            uncertain: false,
        });
    }
    if raw > 0xffff_ffff {
        return Some(Decoded {
            count: raw & 0xffff,
            packed: true,
            uncertain: true,
        });
    }
    Some(Decoded {
        count: raw,
        packed: false,
        uncertain: false,
    })
}

struct Placement<'a> {
    /// `None` when the value is above the highest bucket.
    bucket: Option<&'a Bucket>,
    top: &'a Bucket,
    /// Worst rate at or below the value.
    afr: f64,
    baseline: bool,
}

fn place(value: u64, buckets: &[Bucket]) -> Option<Placement<'_>> {
    let first = buckets.first()?;
    let top = buckets.last()?;
    let bucket = buckets.iter().find(|b| b.from <= value && value <= b.to);
    let afr = buckets
        .iter()
        .filter(|b| b.from <= value)
        .map(|b| b.afr)
        .fold(0.0, f64::max);
    Some(Placement {
        bucket,
        top,
        afr,
        baseline: value >= first.from && value <= first.to,
    })
}

fn range(b: &Bucket) -> String {
    if b.from == b.to {
        b.from.to_string()
    } else {
        format!("{}-{}", b.from, b.to)
    }
}

fn plural<'a>(n: u64, one: &'a str, many: &'a str) -> &'a str {
    if n == 1 { one } else { many }
}

/// Severity and sentence for a value placed in the buckets.
fn bucket_finding(p: &Placement<'_>, range_of: impl Fn(&Bucket) -> String) -> (Verdict, String) {
    let severity = if p.afr >= FAIL_AFR {
        Verdict::Failed
    } else if p.afr >= WARN_AFR {
        Verdict::Warning
    } else {
        Verdict::Passed
    };
    let mut text = match p.bucket {
        Some(bucket) => format!(
            "Backblaze drives reading {} failed at {:.1} %/year",
            range_of(bucket),
            bucket.afr
        ),
        None => format!(
            "above the highest observed bucket, {} at {:.1} %/year",
            range_of(p.top),
            p.top.afr
        ),
    };
    if p.afr > p.bucket.unwrap_or(p.top).afr {
        text.push_str(&format!(
            "; rated as the worst bucket at or below it, {:.1} %/year",
            p.afr
        ));
    }
    text.push_str(&match severity {
        Verdict::Failed => format!(" (fails at {FAIL_AFR:.0} %/year or more)"),
        Verdict::Warning => {
            format!(" (warns at {WARN_AFR:.0} %/year, fails at {FAIL_AFR:.0} %/year)")
        }
        _ => format!(
            " (below the {WARN_AFR:.0} %/year warning line, close to drives reading 0: noted only)"
        ),
    });
    (severity, text)
}

fn attr_label(attr: &AtaAttribute) -> String {
    if attr.name.is_empty() {
        format!("ATA {}", attr.id)
    } else {
        format!("ATA {} {}", attr.id, attr.name)
    }
}

fn packed_note(attr: &AtaAttribute, d: &Decoded) -> Option<String> {
    if !d.packed {
        return None;
    }
    let raw = attr.raw_value.unwrap_or_default();
    // smartctl's rendering only adds something when it unpacked the value.
    let shown = attr
        .raw_string
        .as_deref()
        .filter(|s| *s != raw.to_string())
        .map(|s| format!(" (\"{s}\")"))
        .unwrap_or_default();
    Some(if attr.id == 188 {
        format!(
            "low 16 bits of packed raw value {raw}{shown}: Seagate packs three timeout counters here"
        )
    } else {
        format!("low 16 bits of packed raw value {raw}{shown}; the packing is vendor-specific")
    })
}

fn rule_smart_status(report: &Report, out: &mut Findings) {
    match report.smart_passed {
        Some(true) => out.checked("SMART overall-health (passed)"),
        Some(false) if nvme_warning_explains(report) => {}
        Some(false) => out.reason(
            "smart_status.failed",
            Verdict::Failed,
            "SMART overall-health self-assessment: FAILED; the drive itself predicts failure"
                .to_string(),
        ),
        None => {}
    }
}

/// smartctl derives NVMe smart_status and exit bit 3 from critical_warning,
/// whose bits are reported one by one instead.
fn nvme_warning_explains(report: &Report) -> bool {
    report
        .nvme
        .as_ref()
        .and_then(|n| n.critical_warning)
        .is_some_and(|w| w != 0)
}

fn rule_exit_status(report: &Report, has_data: bool, out: &mut Findings) {
    let Some(exit) = report.exit_status else {
        return;
    };
    for bit in exit.set_bits() {
        let severity = match bit.bit {
            0..=2 if has_data => Verdict::Passed,
            0..=2 => Verdict::Unknown,
            3 if nvme_warning_explains(report) => continue,
            3 | 4 => Verdict::Failed,
            _ => Verdict::Warning,
        };
        let tail = if bit.bit <= 2 && has_data {
            "; the health data shown may be incomplete"
        } else {
            ""
        };
        out.reason(
            format!("exit.{}", bit.code),
            severity,
            format!(
                "smartctl exit status {} has bit {} set: {}{tail}",
                exit.0, bit.bit, bit.description
            ),
        );
    }
}

fn rule_ata_thresholds(report: &Report, out: &mut Findings) {
    if !report.ata_attributes.is_empty() {
        out.checked(format!(
            "{} ATA attribute thresholds",
            report.ata_attributes.len()
        ));
    }
    for attr in &report.ata_attributes {
        let kind = if attr.prefailure {
            "pre-failure"
        } else {
            "old-age"
        };
        let values = format!(
            "normalized value {}, worst {}, vendor threshold {}",
            opt(attr.value),
            opt(attr.worst),
            opt(attr.thresh)
        );
        match attr.when_failed {
            WhenFailed::Now => out.reason(
                format!("ata.attr.{}.failing_now", attr.id),
                if attr.prefailure {
                    Verdict::Failed
                } else {
                    Verdict::Warning
                },
                format!(
                    "{} ({kind} attribute) is at or below its vendor threshold now: {values}",
                    attr_label(attr)
                ),
            ),
            WhenFailed::Past => out.reason(
                format!("ata.attr.{}.failed_past", attr.id),
                Verdict::Warning,
                format!(
                    "{} ({kind} attribute) was at or below its vendor threshold in the past: {values}",
                    attr_label(attr)
                ),
            ),
            WhenFailed::None | WhenFailed::Other(_) => {}
        }
    }
}

fn opt<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "?".to_string(), |v| v.to_string())
}

fn rule_ata_critical(report: &Report, out: &mut Findings) {
    let mut seen = Vec::new();
    for spec in CRITICAL {
        let Some(attr) = usable_attribute(report, spec) else {
            continue;
        };
        let Some(decoded) = decode_count(attr) else {
            continue;
        };
        seen.push(spec.id.to_string());
        let count = decoded.count;
        let label = attr_label(attr);
        let code = format!("ata.attr.{}.{}", spec.id, spec.slug);
        let noun = plural(count, spec.one, spec.many);
        let note = packed_note(attr, &decoded)
            .map(|n| format!(" Count taken from the {n}."))
            .unwrap_or_default();

        let (severity, mut message) = if spec.id == 184 {
            // 184's observed rates are by normalized value, which drops by one
            // per error on the drives Backblaze runs; a drive that counts errors
            // without lowering its normalized value still warns.
            let drop = attr
                .value
                .map_or(0, |v| 100u64.saturating_sub(u64::from(v)));
            if count == 0 && drop == 0 {
                continue;
            }
            let Some(p) = place(drop, spec.buckets) else {
                continue;
            };
            let (severity, text) = bucket_finding(&p, |b| {
                if b.from == b.to {
                    format!("normalized {}", 100u64.saturating_sub(b.from))
                } else {
                    format!(
                        "normalized {}-{}",
                        100u64.saturating_sub(b.to),
                        100u64.saturating_sub(b.from)
                    )
                }
            });
            (
                severity,
                format!(
                    "{label}: {count} {noun}, normalized value {}; {text}.",
                    opt(attr.value)
                ),
            )
        } else if spec.buckets.is_empty() {
            if count == 0 {
                continue;
            }
            (
                Verdict::Warning,
                format!(
                    "{label}: {count} {noun}; no observed failure rates exist for this attribute, so any count warns."
                ),
            )
        } else {
            let Some(p) = place(count, spec.buckets) else {
                continue;
            };
            if p.baseline {
                continue;
            }
            let (severity, text) = bucket_finding(&p, range);
            (severity, format!("{label}: {count} {noun}; {text}."))
        };
        message.push_str(&note);
        let severity = if decoded.uncertain && severity > Verdict::Warning {
            message.push_str(" Held at warning because the packed value may be misread.");
            Verdict::Warning
        } else {
            severity
        };
        out.reason(code, severity, message);
    }
    if !seen.is_empty() {
        out.checked(format!("critical ATA attributes {}", seen.join(", ")));
    }
}

/// NVMe critical warning bits: code, meaning, severity.
const NVME_WARNING_BITS: [(&str, &str, Verdict); 6] = [
    (
        "spare",
        "available spare capacity has fallen below the threshold",
        Verdict::Failed,
    ),
    (
        "temperature",
        "temperature is above an over-temperature or below an under-temperature threshold",
        Verdict::Warning,
    ),
    (
        "reliability",
        "NVM subsystem reliability has been degraded by media-related or internal errors",
        Verdict::Failed,
    ),
    (
        "read_only",
        "media has been placed in read-only mode",
        Verdict::Failed,
    ),
    (
        "volatile_backup",
        "volatile memory backup device (power-loss protection) has failed",
        Verdict::Failed,
    ),
    (
        "pmr_read_only",
        "persistent memory region has become read-only or unreliable",
        Verdict::Failed,
    ),
];

fn rule_nvme(report: &Report, out: &mut Findings) {
    let Some(nvme) = &report.nvme else {
        return;
    };
    if let Some(w) = nvme.critical_warning {
        out.checked(format!("NVMe critical warning (0x{w:02x})"));
        let derived = if w != 0
            && (report.smart_passed == Some(false)
                || report.exit_status.is_some_and(|e| e.failing()))
        {
            "; smartctl's FAILED SMART status for this drive is derived from this byte"
        } else {
            ""
        };
        for (bit, (slug, meaning, severity)) in (0u8..).zip(NVME_WARNING_BITS) {
            if w & (1 << bit) != 0 {
                out.reason(
                    format!("nvme.critical_warning.{slug}"),
                    severity,
                    format!("NVMe critical warning 0x{w:02x}, bit {bit}: {meaning}{derived}"),
                );
            }
        }
        if w & 0xc0 != 0 {
            out.reason(
                "nvme.critical_warning.other",
                Verdict::Warning,
                format!(
                    "NVMe critical warning 0x{w:02x} has bits 6-7 (0x{:02x}) set, which the NVMe versions known here do not define",
                    w & 0xc0
                ),
            );
        }
    }
    if let Some(errors) = nvme.media_errors {
        out.checked(format!("NVMe media errors ({errors})"));
        if errors > 0 {
            out.reason(
                "nvme.media_errors",
                Verdict::Warning,
                format!(
                    "NVMe media and data integrity errors: {errors} (expected 0); the controller found data it could not recover"
                ),
            );
        }
    }
    if let (Some(spare), Some(threshold)) = (nvme.available_spare, nvme.available_spare_threshold) {
        out.checked(format!("NVMe available spare ({spare} %)"));
        if spare < threshold {
            out.reason(
                "nvme.available_spare",
                Verdict::Failed,
                format!(
                    "NVMe available spare {spare} % is below the drive's threshold of {threshold} %"
                ),
            );
        }
    }
}

fn rule_scsi(report: &Report, out: &mut Findings) {
    let Some(scsi) = &report.scsi else {
        return;
    };
    if let Some(defects) = scsi.grown_defects {
        out.checked(format!("SCSI grown defects ({defects})"));
        if let Some(p) = place(defects, BUCKETS_5).filter(|p| !p.baseline) {
            let (severity, text) = bucket_finding(&p, range);
            out.reason(
                "scsi.grown_defects",
                severity,
                format!(
                    "SCSI grown defect list: {defects} {} remapped since manufacture; \
                     rated with ATA attribute 5's buckets: {text}.",
                    plural(defects, "sector", "sectors")
                ),
            );
        }
    }
    let directions = [
        ("read", scsi.read_uncorrected),
        ("write", scsi.write_uncorrected),
        ("verify", scsi.verify_uncorrected),
    ];
    for (direction, errors) in directions {
        let Some(errors) = errors else { continue };
        out.checked(format!("SCSI {direction} uncorrected errors ({errors})"));
        if let Some(p) = place(errors, BUCKETS_187).filter(|p| !p.baseline) {
            let (severity, text) = bucket_finding(&p, range);
            out.reason(
                format!("scsi.uncorrected.{direction}"),
                severity,
                format!(
                    "SCSI {direction} errors the drive could not correct: {errors}; \
                     rated with ATA attribute 187's buckets: {text}."
                ),
            );
        }
    }
}

/// Wear at or above these percentages warns / fails.
const WEAR_WARN: u32 = 95;
const WEAR_FAIL: u32 = 100;

struct Wear {
    percent_used: u32,
    code: String,
    label: String,
}

/// ATA attributes that count remaining life down from a normalized 100.
const ATA_WEAR: [(u8, &str); 4] = [
    (233, "Media_Wearout_Indicator"),
    (231, "SSD_Life_Left"),
    (202, "Percent_Lifetime_Remain"),
    (177, "Wear_Leveling_Count"),
];

fn wear(report: &Report) -> Option<Wear> {
    if let Some(used) = report.nvme.as_ref().and_then(|n| n.percentage_used) {
        return Some(Wear {
            percent_used: used,
            code: "nvme.percentage_used".to_string(),
            label: "NVMe percentage used".to_string(),
        });
    }
    if let Some(used) = report
        .scsi
        .as_ref()
        .and_then(|s| s.percentage_used_endurance)
    {
        return Some(Wear {
            percent_used: used,
            code: "scsi.endurance_used".to_string(),
            label: "SCSI percentage used endurance indicator".to_string(),
        });
    }
    ATA_WEAR.iter().find_map(|(id, name)| {
        let attr = report.ata_attribute(*id).filter(|a| a.name == *name)?;
        let value = attr.value.filter(|v| *v <= 100)?;
        Some(Wear {
            percent_used: 100 - u32::from(value),
            code: format!("ata.wear.{id}"),
            label: format!(
                "{} (normalized value {value} of 100 remaining)",
                attr_label(attr)
            ),
        })
    })
}

fn rule_wear(report: &Report, out: &mut Findings) {
    let Some(w) = wear(report) else {
        return;
    };
    out.checked(format!("wear ({} % used)", w.percent_used));
    let severity = if w.percent_used >= WEAR_FAIL {
        Verdict::Failed
    } else if w.percent_used >= WEAR_WARN {
        Verdict::Warning
    } else {
        return;
    };
    let limit = if severity == Verdict::Failed {
        WEAR_FAIL
    } else {
        WEAR_WARN
    };
    out.reason(
        w.code,
        severity,
        format!(
            "{}: {} % of rated endurance used, at or above {limit} %",
            w.label, w.percent_used
        ),
    );
}

fn current_temperature(report: &Report) -> Option<i64> {
    // smartctl and RAID volumes write 0 for "no sensor".
    report
        .temperature
        .or_else(|| report.nvme.as_ref().and_then(|n| n.temperature))
        .filter(|t| *t > 0)
}

fn plausible_limit(t: Option<i64>) -> Option<i64> {
    t.filter(|t| (30..=150).contains(t))
}

struct TemperatureRule {
    warn: i64,
    warn_source: &'static str,
    critical: Option<i64>,
    critical_source: &'static str,
}

fn temperature_rule(report: &Report) -> TemperatureRule {
    let nvme = report.nvme.as_ref();
    let is_nvme = report.protocol == Some(Protocol::Nvme) || nvme.is_some();
    let (default_warn, default_crit, default_source) = if is_nvme {
        (70, 80, "default limit for NVMe drives")
    } else {
        (60, 70, "default limit for ATA/SCSI drives")
    };
    let warn = plausible_limit(
        nvme.and_then(|n| n.warning_temperature)
            .or(report.temperature_limits.warning),
    );
    let crit = plausible_limit(
        nvme.and_then(|n| n.critical_temperature)
            .or(report.temperature_limits.critical),
    );
    match (warn, crit) {
        (Some(w), Some(c)) => TemperatureRule {
            warn: w.min(c),
            warn_source: "the drive's own warning limit",
            critical: Some(w.max(c)),
            critical_source: "the drive's own critical limit",
        },
        (Some(w), None) => TemperatureRule {
            warn: w,
            warn_source: "the drive's own warning limit",
            critical: (default_crit > w).then_some(default_crit),
            critical_source: default_source,
        },
        (None, Some(c)) => TemperatureRule {
            warn: c.saturating_sub(10),
            warn_source: "10 °C below the drive's own critical limit",
            critical: Some(c),
            critical_source: "the drive's own critical limit",
        },
        (None, None) => TemperatureRule {
            warn: default_warn,
            warn_source: default_source,
            critical: Some(default_crit),
            critical_source: default_source,
        },
    }
}

fn rule_temperature(report: &Report, out: &mut Findings) {
    let Some(t) = current_temperature(report) else {
        return;
    };
    let rule = temperature_rule(report);
    out.checked(format!("temperature ({t} °C, warning at {} °C)", rule.warn));
    if let Some(c) = rule.critical.filter(|c| t >= *c) {
        out.reason(
            "temperature.critical",
            Verdict::Failed,
            format!(
                "Temperature {t} °C is at or above {c} °C, {}",
                rule.critical_source
            ),
        );
    } else if t >= rule.warn {
        out.reason(
            "temperature.high",
            Verdict::Warning,
            format!(
                "Temperature {t} °C is at or above {} °C, {}",
                rule.warn, rule.warn_source
            ),
        );
    }
}

/// The window in which a rising error counter warns.
const RATE_WINDOW_SECS: i64 = 24 * 3600;

type Counter = fn(&Sample) -> Option<u64>;

const RATE_COUNTERS: [(&str, &str, Counter); 6] = [
    (
        "rate.ata.5.reallocated",
        "Reallocated sectors (ATA 5)",
        |s| s.reallocated_sectors,
    ),
    ("rate.ata.197.pending", "Pending sectors (ATA 197)", |s| {
        s.pending_sectors
    }),
    (
        "rate.ata.198.offline_uncorrectable",
        "Offline uncorrectable sectors (ATA 198)",
        |s| s.offline_uncorrectable,
    ),
    (
        "rate.ata.187.reported_uncorrectable",
        "Reported uncorrectable errors (ATA 187)",
        |s| s.reported_uncorrectable,
    ),
    ("rate.nvme.media_errors", "NVMe media errors", |s| {
        s.media_errors
    }),
    ("rate.scsi.grown_defects", "SCSI grown defects", |s| {
        s.grown_defects
    }),
];

fn rule_rates(report: &Report, history: &[Sample], now_unix: i64, out: &mut Findings) {
    let current = sample(report, now_unix);
    let window_start = now_unix.saturating_sub(RATE_WINDOW_SECS);
    let in_window: Vec<&Sample> = history
        .iter()
        .filter(|s| s.at_unix >= window_start && s.at_unix <= now_unix)
        .collect();
    for (code, label, counter) in RATE_COUNTERS {
        let Some(now_value) = counter(&current) else {
            continue;
        };
        let lowest = in_window
            .iter()
            .filter_map(|s| counter(s).map(|v| (v, s.at_unix)))
            .min_by_key(|(v, _)| *v);
        let Some((then_value, then_at)) = lowest else {
            continue;
        };
        if now_value > then_value {
            let hours = (now_unix.saturating_sub(then_at)) as f64 / 3600.0;
            out.reason(
                code,
                Verdict::Warning,
                format!(
                    "{label} rose from {then_value} to {now_value} (+{}) within the last 24 h \
                     (since the reading {hours:.1} h ago): the drive is losing sectors now",
                    now_value - then_value
                ),
            );
        }
    }
}

fn rule_self_tests(report: &Report, out: &mut Findings) {
    if report.self_tests.is_empty() {
        return;
    }
    out.checked(format!("{} self-test log entries", report.self_tests.len()));
    for test in &report.self_tests {
        match test.passed {
            // smartctl too ignores failures that a later passing extended test
            // outdates: the whole surface has been read since.
            Some(true) if test.extended => return,
            Some(false) => {
                let hours = test
                    .lifetime_hours
                    .map(|h| format!(" at {h} power-on hours"))
                    .unwrap_or_default();
                let lba = test
                    .lba_of_first_error
                    .map(|l| format!(", first error at LBA {l}"))
                    .unwrap_or_default();
                out.reason(
                    "selftest.failed",
                    Verdict::Warning,
                    format!(
                        "Self-test \"{}\" ended \"{}\"{hours}{lba}; no later extended self-test has passed",
                        test.kind, test.status
                    ),
                );
                return;
            }
            _ => {}
        }
    }
}

fn rule_messages(report: &Report, has_data: bool, out: &mut Findings) {
    use super::smartctl::MessageSeverity;
    for m in &report.messages {
        let kind = match m.severity {
            MessageSeverity::Warning => "warning",
            MessageSeverity::Error => "error",
            _ => continue,
        };
        out.reason(
            format!("smartctl.message.{kind}"),
            if has_data {
                Verdict::Passed
            } else {
                Verdict::Unknown
            },
            format!("smartctl {kind}: {}", m.text),
        );
    }
}

fn key(name: impl Into<String>, value: impl ToString) -> KeyAttribute {
    KeyAttribute {
        name: name.into(),
        value: value.to_string(),
        unit: None,
        note: None,
    }
}

impl KeyAttribute {
    fn unit(mut self, unit: &str) -> Self {
        self.unit = Some(unit.to_string());
        self
    }

    fn note(mut self, note: Option<String>) -> Self {
        self.note = note;
        self
    }
}

fn key_attributes(report: &Report) -> Vec<KeyAttribute> {
    let mut keys = Vec::new();
    if report.has_health_data() {
        let status = match report.smart_passed {
            Some(true) => "PASSED",
            Some(false) => "FAILED",
            None => "not reported",
        };
        keys.push(key("SMART overall-health", status));
    }
    if let Some(exit) = report.exit_status {
        let bits: Vec<&str> = exit.set_bits().iter().map(|b| b.code).collect();
        let note = if bits.is_empty() {
            "no bits set".to_string()
        } else {
            bits.join(", ")
        };
        keys.push(key("smartctl exit status", exit.0).note(Some(note)));
    }
    if let Some(t) = current_temperature(report) {
        let rule = temperature_rule(report);
        let note = match rule.critical {
            Some(c) => format!("warning at {} °C, critical at {c} °C", rule.warn),
            None => format!("warning at {} °C", rule.warn),
        };
        keys.push(key("Temperature", t).unit("°C").note(Some(note)));
    }
    if let Some(h) = report.power_on_hours {
        keys.push(key("Power-on time", h).unit("hours"));
    }
    for spec in CRITICAL {
        let Some(attr) = usable_attribute(report, spec) else {
            continue;
        };
        let Some(decoded) = decode_count(attr) else {
            continue;
        };
        let note = if spec.id == 184 {
            Some(format!("normalized value {}", opt(attr.value)))
        } else {
            packed_note(attr, &decoded)
        };
        keys.push(key(attr_label(attr), decoded.count).note(note));
    }
    if let Some(n) = &report.nvme {
        if let Some(w) = n.critical_warning {
            keys.push(key("NVMe critical warning", format!("0x{w:02x}")));
        }
        if let Some(spare) = n.available_spare {
            let note = n
                .available_spare_threshold
                .map(|t| format!("threshold {t} %"));
            keys.push(key("NVMe available spare", spare).unit("%").note(note));
        }
        if let Some(e) = n.media_errors {
            keys.push(key("NVMe media errors", e));
        }
        if let Some(e) = n.num_err_log_entries {
            keys.push(key("NVMe error log entries", e).note(Some(
                "informational: hosts provoke entries with harmless commands".to_string(),
            )));
        }
        if let Some(u) = n.unsafe_shutdowns {
            keys.push(key("NVMe unsafe shutdowns", u));
        }
        if let Some(d) = n.data_units_written {
            // One data unit is 1000 blocks of 512 bytes.
            let tb = d as f64 * 512_000.0 / 1e12;
            keys.push(key("NVMe data written", format!("{tb:.1}")).unit("TB"));
        }
    }
    if let Some(s) = &report.scsi {
        if let Some(d) = s.grown_defects {
            keys.push(key("SCSI grown defects", d));
        }
        for (direction, errors) in [
            ("read", s.read_uncorrected),
            ("write", s.write_uncorrected),
            ("verify", s.verify_uncorrected),
        ] {
            if let Some(e) = errors {
                keys.push(key(format!("SCSI {direction} uncorrected errors"), e));
            }
        }
    }
    if let Some(w) = wear(report) {
        keys.push(
            key("Wear", w.percent_used)
                .unit("% used")
                .note(Some(w.label)),
        );
    }
    keys
}

/// Wear points must span at least this long for a trend: percentages are
/// integers, and at typical rates well under 1 %/day a shorter span measures
/// rounding steps, not wear.
const MIN_TREND_SPAN_SECS: f64 = 7.0 * 86400.0;

fn remaining_life(report: &Report, history: &[Sample], now_unix: i64) -> Option<RemainingLife> {
    let current = wear(report)?.percent_used;
    // Days relative to now keep the numbers small for the fit.
    let points: Vec<(f64, f64)> = history
        .iter()
        .filter(|s| s.at_unix <= now_unix)
        .filter_map(|s| {
            let used = s.wear_percent_used?;
            Some((
                (s.at_unix as f64 - now_unix as f64) / 86400.0,
                f64::from(used),
            ))
        })
        .chain(std::iter::once((0.0, f64::from(current))))
        .collect();
    let (min_x, max_x) = points
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), (x, _)| {
            (lo.min(*x), hi.max(*x))
        });
    if (max_x - min_x) * 86400.0 < MIN_TREND_SPAN_SECS {
        return None;
    }
    let n = points.len() as f64;
    let mean_x = points.iter().map(|(x, _)| x).sum::<f64>() / n;
    let mean_y = points.iter().map(|(_, y)| y).sum::<f64>() / n;
    let sxy: f64 = points
        .iter()
        .map(|(x, y)| (x - mean_x) * (y - mean_y))
        .sum();
    let sxx: f64 = points.iter().map(|(x, _)| (x - mean_x).powi(2)).sum();
    let per_day = sxy / sxx;
    if !per_day.is_finite() || per_day <= 0.0 {
        return None;
    }
    let percent_used = f64::from(current);
    let days_left = ((100.0 - percent_used) / per_day).max(0.0);
    Some(RemainingLife {
        percent_used,
        per_day,
        days_left,
    })
}
