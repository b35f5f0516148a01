//! No input makes the parser or the verdict engine panic: every prefix of
//! real outputs is a clean `Truncated` error, and real outputs with any one
//! value replaced by something of the wrong type or an extreme number still
//! parse and assess. Debug builds check integer overflow, so this also
//! catches arithmetic on hostile numbers.

use atlasmesh::disks::smartctl::{self, ParseError};
use atlasmesh::disks::verdict::{self, Sample};
use serde_json::{Value, json};

const NOW: i64 = 1_700_000_000;

const FIXTURES: [&str; 4] = [
    "smartctl-scrutiny/smart-fail2.json",
    "smartctl-scrutiny/smart-nvme-failed.json",
    "smartctl/SEAGATE_ST373453LC_26.json",
    "smartctl/sat-Seagate_Exos_X16-ST16000NM001G-2KK103-sda.json",
];

fn fixture_text(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(path).expect("fixture readable")
}

/// Hostile history: extreme times and counters.
fn hostile_history() -> Vec<Sample> {
    let extreme = |at_unix| Sample {
        at_unix,
        reallocated_sectors: Some(u64::MAX),
        pending_sectors: Some(0),
        offline_uncorrectable: Some(u64::MAX),
        reported_uncorrectable: Some(0),
        media_errors: Some(0),
        grown_defects: Some(u64::MAX),
        wear_percent_used: Some(u32::MAX),
        temperature_c: Some(i64::MIN),
    };
    vec![
        extreme(i64::MIN),
        extreme(i64::MAX),
        extreme(NOW),
        extreme(NOW - 1),
        Sample {
            at_unix: NOW - 10 * 86400,
            wear_percent_used: Some(0),
            ..Sample::default()
        },
    ]
}

#[test]
fn every_prefix_is_a_truncation_error() {
    for name in FIXTURES {
        let text = fixture_text(name);
        let step = (text.len() / 500).max(1);
        for end in (0..text.len()).step_by(step) {
            let Some(prefix) = text.get(..end) else {
                continue;
            };
            match smartctl::parse(prefix) {
                Err(ParseError::Truncated { .. }) => {}
                other => panic!("{name}[..{end}]: {other:?}"),
            }
        }
    }
}

fn pointers(value: &Value, at: String, out: &mut Vec<String>) {
    match value {
        Value::Object(map) => {
            for (k, v) in map {
                pointers(
                    v,
                    format!("{at}/{}", k.replace('~', "~0").replace('/', "~1")),
                    out,
                );
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                pointers(v, format!("{at}/{i}"), out);
            }
        }
        _ => {}
    }
    out.push(at);
}

/// The fixture cut down to the parts the parser reads: odd values elsewhere
/// are ignored by construction, and the smaller document keeps the
/// one-edit-at-a-time loop below fast in debug builds.
fn read_parts(mut doc: Value) -> Value {
    const READ: [&str; 27] = [
        "json_format_version",
        "smartctl",
        "device",
        "model_name",
        "scsi_model_name",
        "scsi_vendor",
        "scsi_product",
        "vendor",
        "product",
        "serial_number",
        "firmware_version",
        "scsi_revision",
        "revision",
        "user_capacity",
        "nvme_total_capacity",
        "rotation_rate",
        "smart_status",
        "temperature",
        "power_on_time",
        "ata_smart_attributes",
        "ata_smart_self_test_log",
        "nvme_smart_health_information_log",
        "nvme_composite_temperature_threshold",
        "nvme_self_test_log",
        "scsi_grown_defect_list",
        "scsi_error_counter_log",
        "scsi_percentage_used_endurance_indicator",
    ];
    if let Value::Object(map) = &mut doc {
        map.retain(|k, _| READ.contains(&k.as_str()));
        if let Some(Value::Object(smartctl)) = map.get_mut("smartctl") {
            smartctl.retain(|k, _| ["version", "exit_status", "messages"].contains(&k.as_str()));
        }
    }
    // Every attribute row goes through the same code; keep the ones with
    // rules of their own.
    if let Some(Value::Array(rows)) = doc.pointer_mut("/ata_smart_attributes/table") {
        rows.retain(|row| {
            [1, 5, 7, 184, 187, 188, 194, 197, 201, 233]
                .iter()
                .any(|id| row["id"] == *id)
        });
    }
    for table in [
        "/ata_smart_self_test_log/standard/table",
        "/ata_smart_self_test_log/extended/table",
    ] {
        if let Some(Value::Array(rows)) = doc.pointer_mut(table) {
            rows.truncate(4);
        }
    }
    doc
}

#[test]
fn any_single_odd_value_still_parses_and_assesses() {
    let replacements = [
        Value::Null,
        json!("x"),
        json!(-1),
        json!(i64::MIN),
        json!(u64::MAX),
        json!(1e300),
        json!(255),
        json!(true),
        json!([]),
        json!({}),
    ];
    let history = hostile_history();
    for name in FIXTURES {
        let doc = read_parts(serde_json::from_str(&fixture_text(name)).expect("JSON"));
        let mut all = Vec::new();
        pointers(&doc, String::new(), &mut all);
        for pointer in all {
            for replacement in &replacements {
                let mut edited = doc.clone();
                if pointer.is_empty() {
                    edited = replacement.clone();
                } else if let Some(slot) = edited.pointer_mut(&pointer) {
                    *slot = replacement.clone();
                }
                if let Ok(report) = smartctl::parse(&edited.to_string()) {
                    let a = verdict::assess(&report, &history, NOW);
                    assert!(!a.reasons.is_empty(), "{name}{pointer}");
                    let _ = verdict::sample(&report, i64::MIN);
                }
            }
        }
    }
}

#[test]
fn extreme_values_everywhere_at_once() {
    let report = smartctl::parse(
        &json!({
            "smartctl": {"exit_status": 255},
            "device": {"protocol": "NVMe"},
            "temperature": {"current": i64::MAX, "op_limit_max": i64::MIN, "drive_trip": i64::MAX},
            "nvme_composite_temperature_threshold": {"warning": i64::MIN, "critical": i64::MAX},
            "ata_smart_attributes": {"table": [
                {"id": 184, "value": 0, "raw": {"value": u64::MAX}},
                {"id": 188, "value": 255, "raw": {"value": u64::MAX}},
                {"id": 201, "name": "Soft_Read_Error_Rate", "raw": {"value": u64::MAX}},
                {"id": 233, "name": "Media_Wearout_Indicator", "value": 0}
            ]},
            "nvme_smart_health_information_log": {
                "critical_warning": 255, "percentage_used": u32::MAX,
                "available_spare": 0, "available_spare_threshold": u32::MAX,
                "media_errors": u64::MAX, "data_units_written": u64::MAX
            },
            "scsi_grown_defect_list": u64::MAX,
            "scsi_error_counter_log": {"read": {"total_uncorrected_errors": u64::MAX}},
            "scsi_percentage_used_endurance_indicator": u32::MAX
        })
        .to_string(),
    )
    .expect("parses");
    let a = verdict::assess(&report, &hostile_history(), i64::MIN);
    assert_eq!(a.verdict, verdict::Verdict::Failed);
    let a = verdict::assess(&report, &hostile_history(), i64::MAX);
    assert_eq!(a.verdict, verdict::Verdict::Failed);
}
