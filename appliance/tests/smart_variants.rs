//! Failing drives made by hand: each test takes a healthy real fixture, edits
//! one thing in its JSON the way a failing drive would report it, and checks
//! the verdict and the reason. The untouched fixture passes (checked first in
//! every test), so each test fails if its rule stops firing.

use atlasmesh::disks::smartctl::{self, ParseError};
use atlasmesh::disks::verdict::{self, Assessment, Reason, Sample, Verdict};
use serde_json::{Value, json};

const NOW: i64 = 1_700_000_000;
const HOUR: i64 = 3600;
const DAY: i64 = 24 * HOUR;

const ATA: &str = "smartctl/WDC_WD20EFRX-68EUZN0_17.json";
const NVME: &str = "smartctl-scrutiny/smart-nvme.json";
const SCSI: &str = "smartctl/HITACHI_H109060SESUN600G_10.json";

fn fixture(name: &str) -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    let text = std::fs::read_to_string(&path).expect("fixture readable");
    serde_json::from_str(&text).expect("fixture is JSON")
}

/// Sets the value at a JSON pointer, creating the last key if needed.
fn set(doc: &mut Value, pointer: &str, value: Value) {
    let (parent, key) = pointer.rsplit_once('/').expect("pointer has a key");
    let parent = doc.pointer_mut(parent).expect("parent exists");
    match parent {
        Value::Object(map) => {
            map.insert(key.to_string(), value);
        }
        Value::Array(items) => {
            let index: usize = key.parse().expect("array index");
            *items.get_mut(index).expect("index in range") = value;
        }
        _ => panic!("{pointer}: parent is neither object nor array"),
    }
}

/// Pointer to the ATA attribute row with this id.
fn attr(doc: &Value, id: u64) -> String {
    let table = doc
        .pointer("/ata_smart_attributes/table")
        .and_then(Value::as_array)
        .expect("attribute table");
    let index = table
        .iter()
        .position(|row| row["id"] == id)
        .expect("attribute present");
    format!("/ata_smart_attributes/table/{index}")
}

fn report(doc: &Value) -> smartctl::Report {
    smartctl::parse(&doc.to_string()).expect("edited fixture parses")
}

fn assess(doc: &Value) -> Assessment {
    verdict::assess(&report(doc), &[], NOW)
}

fn alarms(a: &Assessment) -> Vec<(&str, Verdict)> {
    a.reasons
        .iter()
        .filter(|r| r.severity != Verdict::Passed)
        .map(|r| (r.code.as_str(), r.severity))
        .collect()
}

fn reason<'a>(a: &'a Assessment, code: &str) -> &'a Reason {
    a.reasons
        .iter()
        .find(|r| r.code == code)
        .unwrap_or_else(|| panic!("no {code} in {:?}", a.reasons))
}

fn assert_healthy(name: &str) -> Value {
    let doc = fixture(name);
    let a = assess(&doc);
    assert_eq!(a.verdict, Verdict::Passed, "{name}: {:?}", a.reasons);
    assert_eq!(alarms(&a), []);
    doc
}

#[test]
fn smart_status_failed_fails() {
    let mut doc = assert_healthy(ATA);
    set(&mut doc, "/smart_status/passed", json!(false));
    let a = assess(&doc);
    assert_eq!(a.verdict, Verdict::Failed);
    assert_eq!(alarms(&a), [("smart_status.failed", Verdict::Failed)]);
}

#[test]
fn when_failed_now_fails_a_prefailure_attribute() {
    let mut doc = assert_healthy(ATA);
    let row = attr(&doc, 5);
    set(&mut doc, &format!("{row}/value"), json!(140));
    set(&mut doc, &format!("{row}/when_failed"), json!("now"));
    let a = assess(&doc);
    assert_eq!(a.verdict, Verdict::Failed);
    assert_eq!(alarms(&a), [("ata.attr.5.failing_now", Verdict::Failed)]);
    assert_eq!(
        reason(&a, "ata.attr.5.failing_now").message,
        "ATA 5 Reallocated_Sector_Ct (pre-failure attribute) is at or below its vendor \
         threshold now: normalized value 140, worst 200, vendor threshold 140"
    );
}

#[test]
fn when_failed_now_on_an_old_age_attribute_warns() {
    let mut doc = assert_healthy(ATA);
    let row = attr(&doc, 194);
    set(&mut doc, &format!("{row}/when_failed"), json!("now"));
    let a = assess(&doc);
    assert_eq!(a.verdict, Verdict::Warning);
    assert_eq!(alarms(&a), [("ata.attr.194.failing_now", Verdict::Warning)]);
}

#[test]
fn when_failed_past_warns() {
    let mut doc = assert_healthy(ATA);
    let row = attr(&doc, 5);
    set(&mut doc, &format!("{row}/when_failed"), json!("past"));
    let a = assess(&doc);
    assert_eq!(a.verdict, Verdict::Warning);
    assert_eq!(alarms(&a), [("ata.attr.5.failed_past", Verdict::Warning)]);
}

#[test]
fn when_failed_other_strings_are_not_failures() {
    // The trap: comparing with anything but "now"/"past" (e.g. "!= ''" or
    // smartctl's text-mode "-") misreads healthy attributes.
    for odd in ["-", "never", "FAILING_NOW?"] {
        let mut doc = assert_healthy(ATA);
        let row = attr(&doc, 5);
        set(&mut doc, &format!("{row}/when_failed"), json!(odd));
        assert_eq!(assess(&doc).verdict, Verdict::Passed, "{odd}");
    }
}

#[test]
fn exit_status_bits_become_reasons() {
    let mut doc = assert_healthy(ATA);
    set(&mut doc, "/smartctl/exit_status", json!(0b1111_0000));
    let a = assess(&doc);
    assert_eq!(a.verdict, Verdict::Failed);
    assert_eq!(
        alarms(&a),
        [
            ("exit.prefail_at_threshold", Verdict::Failed),
            ("exit.past_threshold", Verdict::Warning),
            ("exit.error_log_has_errors", Verdict::Warning),
            ("exit.self_test_log_has_errors", Verdict::Warning),
        ]
    );
}

#[test]
fn reallocated_sectors_rising_within_a_day_warn() {
    let doc = assert_healthy(ATA);
    let before = verdict::sample(&report(&doc), NOW - 5 * HOUR);
    assert_eq!(before.reallocated_sectors, Some(0));

    let mut doc = doc;
    let row = attr(&doc, 5);
    set(&mut doc, &format!("{row}/raw/value"), json!(3));
    set(&mut doc, &format!("{row}/raw/string"), json!("3"));
    let now = report(&doc);

    // Without history, 3 reallocated sectors are baseline-level risk.
    let alone = verdict::assess(&now, &[], NOW);
    assert_eq!(alone.verdict, Verdict::Passed);
    assert_eq!(
        reason(&alone, "ata.attr.5.reallocated").severity,
        Verdict::Passed
    );

    let a = verdict::assess(&now, std::slice::from_ref(&before), NOW);
    assert_eq!(a.verdict, Verdict::Warning);
    assert_eq!(alarms(&a), [("rate.ata.5.reallocated", Verdict::Warning)]);
    assert_eq!(
        reason(&a, "rate.ata.5.reallocated").message,
        "Reallocated sectors (ATA 5) rose from 0 to 3 (+3) within the last 24 h (since the \
         reading 5.0 h ago): the drive is losing sectors now"
    );

    // The same rise seen only against a reading older than a day says
    // nothing about the last 24 h.
    let old = Sample {
        at_unix: NOW - 30 * HOUR,
        ..before.clone()
    };
    assert_eq!(verdict::assess(&now, &[old], NOW).verdict, Verdict::Passed);

    // Readings from the future (clock skew) are ignored.
    let future = Sample {
        at_unix: NOW + HOUR,
        ..before
    };
    assert_eq!(
        verdict::assess(&now, &[future], NOW).verdict,
        Verdict::Passed
    );
}

#[test]
fn pending_sectors_clearing_is_not_a_rise() {
    let mut doc = assert_healthy(ATA);
    let earlier = Sample {
        at_unix: NOW - 2 * HOUR,
        pending_sectors: Some(4),
        ..Sample::default()
    };
    let a = verdict::assess(&report(&doc), std::slice::from_ref(&earlier), NOW);
    assert_eq!(a.verdict, Verdict::Passed);

    let row = attr(&doc, 197);
    set(&mut doc, &format!("{row}/raw/value"), json!(6));
    let a = verdict::assess(&report(&doc), &[earlier], NOW);
    assert!(alarms(&a).contains(&("rate.ata.197.pending", Verdict::Warning)));
    assert_eq!(
        reason(&a, "ata.attr.197.pending").severity,
        Verdict::Failed,
        "6 pending sectors are in the 3-6 bucket, 68 %/year"
    );
}

#[test]
fn critical_attribute_buckets_name_the_rate() {
    let cases = [
        (
            5,
            10,
            Verdict::Warning,
            "Backblaze drives reading 5-16 failed at 7.5 %/year",
        ),
        (
            5,
            100,
            Verdict::Failed,
            "Backblaze drives reading 71-260 failed at 36.2 %/year",
        ),
        (
            187,
            1,
            Verdict::Failed,
            "Backblaze drives reading 1 failed at 33.9 %/year",
        ),
        (
            198,
            1,
            Verdict::Failed,
            "Backblaze drives reading 1-2 failed at 81.4 %/year",
        ),
        (
            10,
            1,
            Verdict::Failed,
            "Backblaze drives reading 1-80 failed at 55.6 %/year",
        ),
        // 18-27 is observed lower than 12-17; a higher count never rates milder.
        (
            196,
            20,
            Verdict::Failed,
            "rated as the worst bucket at or below it, 17.0 %/year",
        ),
    ];
    for (id, raw, severity, text) in cases {
        let mut doc = fixture(ATA);
        if id == 187 {
            // The WD fixture lacks 187: add it as smartctl would print it.
            let table = doc
                .pointer_mut("/ata_smart_attributes/table")
                .and_then(Value::as_array_mut)
                .expect("table");
            table.push(
                json!({"id": 187, "name": "Reported_Uncorrect", "value": 100,
                "worst": 100, "thresh": 0, "when_failed": "",
                "flags": {"prefailure": false}, "raw": {"value": 0, "string": "0"}}),
            );
        }
        let row = attr(&doc, id);
        set(&mut doc, &format!("{row}/raw/value"), json!(raw));
        let a = assess(&doc);
        let r = a
            .reasons
            .iter()
            .find(|r| r.code.starts_with(&format!("ata.attr.{id}.")))
            .unwrap_or_else(|| panic!("{id}: {:?}", a.reasons));
        assert_eq!(r.severity, severity, "{id}={raw}: {}", r.message);
        assert!(r.message.contains(text), "{id}={raw}: {}", r.message);
    }
}

#[test]
fn seagate_style_packed_timeouts_use_the_low_16_bits() {
    let mut doc = fixture(ATA);
    doc.pointer_mut("/ata_smart_attributes/table")
        .and_then(Value::as_array_mut)
        .expect("table")
        .push(
            json!({"id": 188, "name": "Command_Timeout", "value": 100, "worst": 99,
            "thresh": 0, "when_failed": "", "flags": {"prefailure": false},
            // Three counters 3, 3, 150: the total (low word) is over 100.
            "raw": {"value": (3u64 << 32) | (3 << 16) | 150, "string": "3 3 150"}}),
        );
    let a = assess(&doc);
    let r = reason(&a, "ata.attr.188.command_timeout");
    assert_eq!(r.severity, Verdict::Failed);
    assert!(
        r.message
            .starts_with("ATA 188 Command_Timeout: 150 command timeouts;")
    );
    assert!(r.message.contains("Seagate packs three timeout counters"));
}

#[test]
fn nvme_media_errors_warn() {
    let mut doc = assert_healthy(NVME);
    set(
        &mut doc,
        "/nvme_smart_health_information_log/media_errors",
        json!(3),
    );
    let a = assess(&doc);
    assert_eq!(a.verdict, Verdict::Warning);
    assert_eq!(alarms(&a), [("nvme.media_errors", Verdict::Warning)]);
    assert_eq!(
        reason(&a, "nvme.media_errors").message,
        "NVMe media and data integrity errors: 3 (expected 0); the controller found data it \
         could not recover"
    );
}

#[test]
fn each_nvme_critical_warning_bit_is_its_own_reason() {
    let expected = [
        ("nvme.critical_warning.spare", Verdict::Failed),
        ("nvme.critical_warning.temperature", Verdict::Warning),
        ("nvme.critical_warning.reliability", Verdict::Failed),
        ("nvme.critical_warning.read_only", Verdict::Failed),
        ("nvme.critical_warning.volatile_backup", Verdict::Failed),
        ("nvme.critical_warning.pmr_read_only", Verdict::Failed),
    ];
    for (bit, (code, severity)) in expected.iter().enumerate() {
        let mut doc = assert_healthy(NVME);
        let byte = 1u64 << bit;
        set(
            &mut doc,
            "/nvme_smart_health_information_log/critical_warning",
            json!(byte),
        );
        // As smartctl reports it: SMART status and exit bit 3 follow the byte.
        set(&mut doc, "/smart_status/passed", json!(false));
        set(&mut doc, "/smartctl/exit_status", json!(8));
        let a = assess(&doc);
        assert_eq!(alarms(&a), [(*code, *severity)], "bit {bit}");
        assert_eq!(a.verdict, *severity, "bit {bit}");
        assert!(
            reason(&a, code)
                .message
                .starts_with(&format!("NVMe critical warning 0x{byte:02x}, bit {bit}: ")),
            "bit {bit}"
        );
    }

    let mut doc = fixture(NVME);
    set(
        &mut doc,
        "/nvme_smart_health_information_log/critical_warning",
        json!(0b0010_0101),
    );
    let a = assess(&doc);
    let codes: Vec<&str> = alarms(&a).iter().map(|(c, _)| *c).collect();
    assert_eq!(
        codes,
        [
            "nvme.critical_warning.spare",
            "nvme.critical_warning.reliability",
            "nvme.critical_warning.pmr_read_only",
        ]
    );
}

#[test]
fn nvme_spare_below_threshold_fails() {
    let mut doc = assert_healthy(NVME);
    set(
        &mut doc,
        "/nvme_smart_health_information_log/available_spare",
        json!(8),
    );
    let a = assess(&doc);
    assert_eq!(alarms(&a), [("nvme.available_spare", Verdict::Failed)]);
    assert_eq!(
        reason(&a, "nvme.available_spare").message,
        "NVMe available spare 8 % is below the drive's threshold of 10 %"
    );
}

#[test]
fn nvme_percentage_used_96_warns_and_100_fails() {
    for (used, severity) in [
        (94, Verdict::Passed),
        (96, Verdict::Warning),
        (100, Verdict::Failed),
        (255, Verdict::Failed),
    ] {
        let mut doc = assert_healthy(NVME);
        set(
            &mut doc,
            "/nvme_smart_health_information_log/percentage_used",
            json!(used),
        );
        let a = assess(&doc);
        assert_eq!(a.verdict, severity, "{used}");
        if severity != Verdict::Passed {
            assert_eq!(alarms(&a), [("nvme.percentage_used", severity)]);
        }
    }
    let mut doc = fixture(NVME);
    set(
        &mut doc,
        "/nvme_smart_health_information_log/percentage_used",
        json!(96),
    );
    assert_eq!(
        reason(&assess(&doc), "nvme.percentage_used").message,
        "NVMe percentage used: 96 % of rated endurance used, at or above 95 %"
    );
}

#[test]
fn scsi_grown_defects_warn_then_fail() {
    for (defects, severity) in [
        (2, Verdict::Passed),
        (8, Verdict::Warning),
        (30, Verdict::Failed),
    ] {
        let mut doc = assert_healthy(SCSI);
        set(&mut doc, "/scsi_grown_defect_list", json!(defects));
        let a = assess(&doc);
        assert_eq!(a.verdict, severity, "{defects}");
        assert_eq!(reason(&a, "scsi.grown_defects").severity, severity);
    }
}

#[test]
fn scsi_uncorrected_errors_are_flagged_per_direction() {
    let mut doc = assert_healthy(SCSI);
    set(
        &mut doc,
        "/scsi_error_counter_log/verify/total_uncorrected_errors",
        json!(2),
    );
    let a = assess(&doc);
    assert_eq!(alarms(&a), [("scsi.uncorrected.verify", Verdict::Failed)]);
}

#[test]
fn temperature_over_default_limits() {
    for (t, expected) in [
        (59, vec![]),
        (60, vec![("temperature.high", Verdict::Warning)]),
        (71, vec![("temperature.critical", Verdict::Failed)]),
    ] {
        let mut doc = assert_healthy(ATA);
        set(&mut doc, "/temperature/current", json!(t));
        assert_eq!(alarms(&assess(&doc)), expected, "{t} °C");
    }
    let mut doc = fixture(ATA);
    set(&mut doc, "/temperature/current", json!(65));
    assert_eq!(
        reason(&assess(&doc), "temperature.high").message,
        "Temperature 65 °C is at or above 60 °C, default limit for ATA/SCSI drives"
    );
}

#[test]
fn temperature_over_the_drives_own_limits() {
    // ATA SCT limits.
    let mut doc = assert_healthy(ATA);
    set(&mut doc, "/temperature/op_limit_max", json!(55));
    set(&mut doc, "/temperature/limit_max", json!(65));
    set(&mut doc, "/temperature/current", json!(56));
    let a = assess(&doc);
    assert_eq!(alarms(&a), [("temperature.high", Verdict::Warning)]);
    assert_eq!(
        reason(&a, "temperature.high").message,
        "Temperature 56 °C is at or above 55 °C, the drive's own warning limit"
    );

    // NVMe WCTEMP/CCTEMP as smartctl 7.4+ reports them.
    let mut doc = assert_healthy(NVME);
    set(
        &mut doc,
        "/nvme_composite_temperature_threshold",
        json!({"warning": 75, "critical": 80}),
    );
    set(&mut doc, "/temperature/current", json!(74));
    assert_eq!(alarms(&assess(&doc)), []);
    set(&mut doc, "/temperature/current", json!(81));
    assert_eq!(
        alarms(&assess(&doc)),
        [("temperature.critical", Verdict::Failed)]
    );

    // SCSI trip point 85 °C: warn 10 °C below it.
    let mut doc = assert_healthy(SCSI);
    set(&mut doc, "/temperature/current", json!(76));
    let a = assess(&doc);
    assert_eq!(alarms(&a), [("temperature.high", Verdict::Warning)]);
    assert_eq!(
        reason(&a, "temperature.high").message,
        "Temperature 76 °C is at or above 75 °C, 10 °C below the drive's own critical limit"
    );
}

#[test]
fn malformed_and_truncated_json_give_parse_errors() {
    let text = fixture(NVME).to_string();
    let cut = text.get(..text.len() / 2).expect("ASCII fixture");
    assert!(matches!(
        smartctl::parse(cut),
        Err(ParseError::Truncated { line: 1, .. })
    ));

    let broken = text.replacen("\"critical_warning\":", "\"critical_warning\" ", 1);
    match smartctl::parse(&broken) {
        Err(ParseError::Malformed {
            line: 1, message, ..
        }) => assert_eq!(message, "expected `:`"),
        other => panic!("{other:?}"),
    }

    let pretty = serde_json::to_string_pretty(&fixture(NVME)).expect("pretty");
    let broken = pretty.replacen("\"percentage_used\": 0", "\"percentage_used\": 0x", 1);
    assert!(matches!(
        smartctl::parse(&broken),
        Err(ParseError::Malformed { line, .. }) if line > 1
    ));

    let unread = verdict::unknown(&ParseError::Truncated { line: 3, column: 7 }.to_string());
    assert_eq!(unread.verdict, Verdict::Unknown);
    assert_eq!(
        unread.reasons[0].message,
        "smartctl output could not be read, so the disk cannot be assessed: truncated JSON: \
         input ends at line 3, column 7"
    );
}

#[test]
fn remaining_life_follows_the_wear_trend() {
    let mut doc = fixture(NVME);
    set(
        &mut doc,
        "/nvme_smart_health_information_log/percentage_used",
        json!(19),
    );
    let wear = |days_ago: i64, used: u32| Sample {
        at_unix: NOW - days_ago * DAY,
        wear_percent_used: Some(used),
        ..Sample::default()
    };
    // 10, 13, 16 then 19 now: 0.3 points a day, 81 points to go.
    let history = [wear(30, 10), wear(20, 13), wear(10, 16)];
    let a = verdict::assess(&report(&doc), &history, NOW);
    let life = a.remaining_life.expect("trend");
    assert_eq!(life.percent_used, 19.0);
    assert!((life.per_day - 0.3).abs() < 1e-9, "{}", life.per_day);
    assert!((life.days_left - 270.0).abs() < 1e-6, "{}", life.days_left);

    // Noisy but rising: least squares over all points, not the end points.
    let history = [wear(30, 10), wear(20, 14), wear(10, 15)];
    let life = verdict::assess(&report(&doc), &history, NOW)
        .remaining_life
        .expect("trend");
    // x = -30, -20, -10, 0; y = 10, 14, 15, 19: slope = 140 / 500 per day.
    assert!((life.per_day - 0.28).abs() < 1e-9, "{}", life.per_day);
    assert!((life.days_left - 81.0 / 0.28).abs() < 1e-6);

    // Flat, too short, or no wear reported: no estimate.
    let flat = [wear(30, 19), wear(10, 19)];
    assert_eq!(
        verdict::assess(&report(&doc), &flat, NOW).remaining_life,
        None
    );
    let short = [wear(3, 10)];
    assert_eq!(
        verdict::assess(&report(&doc), &short, NOW).remaining_life,
        None
    );
    assert_eq!(
        verdict::assess(&report(&doc), &[], NOW).remaining_life,
        None
    );
    let hdd = fixture(ATA);
    assert_eq!(
        verdict::assess(&report(&hdd), &history, NOW).remaining_life,
        None
    );
}

#[test]
fn samples_round_trip_as_json() {
    let doc = fixture("smartctl-scrutiny/smart-fail2.json");
    let s = verdict::sample(&report(&doc), NOW);
    assert_eq!(
        s,
        Sample {
            at_unix: NOW,
            reallocated_sectors: Some(1975),
            pending_sectors: Some(8),
            offline_uncorrectable: Some(0),
            reported_uncorrectable: None,
            media_errors: None,
            grown_defects: None,
            wear_percent_used: None,
            temperature_c: Some(25),
        }
    );
    let stored = serde_json::to_string(&s).expect("serializes");
    assert_eq!(
        stored,
        r#"{"at_unix":1700000000,"reallocated_sectors":1975,"pending_sectors":8,"offline_uncorrectable":0,"temperature_c":25}"#
    );
    let back: Sample = serde_json::from_str(&stored).expect("deserializes");
    assert_eq!(back, s);
    // Samples stored by an older version, with fewer fields, still load.
    let old: Sample = serde_json::from_str(r#"{"at_unix": 5}"#).expect("old sample");
    assert_eq!(old.at_unix, 5);
}

#[test]
fn verdicts_order_by_urgency_and_serialize_lowercase() {
    assert!(Verdict::Passed < Verdict::Unknown);
    assert!(Verdict::Unknown < Verdict::Warning);
    assert!(Verdict::Warning < Verdict::Failed);
    assert_eq!(
        serde_json::to_string(&[
            Verdict::Passed,
            Verdict::Warning,
            Verdict::Failed,
            Verdict::Unknown
        ])
        .expect("serializes"),
        r#"["passed","warning","failed","unknown"]"#
    );
}
