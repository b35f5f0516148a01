//! Every fixture under `tests/fixtures/` parses, and its assessment is pinned
//! by an insta snapshot, so any change in a verdict, a reason or a key
//! attribute shows up in review. A few verdicts that matter most are also
//! asserted outright, so they cannot slip through a careless snapshot update.

use atlasmesh::disks::smartctl::{self, ParseError, Protocol};
use atlasmesh::disks::verdict::{self, Assessment, Verdict};
use serde::Serialize;

/// Fixtures that are genuinely not smartctl device output, with the error
/// `parse` must give. All real outputs shipped today are device reports.
const NOT_DEVICE_OUTPUT: &[(&str, ExpectedError)] = &[];

type ExpectedError = fn() -> ParseError;

/// Readings are assessed as if taken at this time; without history it only
/// matters for the rate rules, which need history.
const NOW: i64 = 1_700_000_000;

#[derive(Serialize)]
struct Snapshot {
    model: Option<String>,
    protocol: Option<Protocol>,
    assessment: Assessment,
}

fn fixture(name: &str) -> String {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn assess_fixture(name: &str) -> Assessment {
    let report = smartctl::parse(&fixture(name)).expect("fixture parses");
    verdict::assess(&report, &[], NOW)
}

fn codes(a: &Assessment) -> Vec<&str> {
    a.reasons.iter().map(|r| r.code.as_str()).collect()
}

#[test]
fn every_fixture_parses_and_its_assessment_is_snapshotted() {
    insta::glob!("fixtures/**/*.json", |path| {
        let text = std::fs::read_to_string(path).expect("fixture readable");
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        let parsed = smartctl::parse(&text);
        if let Some((_, expected)) = NOT_DEVICE_OUTPUT.iter().find(|(n, _)| *n == name) {
            assert_eq!(parsed, Err(expected()), "{name}");
            return;
        }
        let report = parsed.unwrap_or_else(|e| panic!("{name}: {e}"));
        let assessment = verdict::assess(&report, &[], NOW);
        assert!(
            !assessment.reasons.is_empty(),
            "{name}: every verdict says why"
        );
        insta::assert_yaml_snapshot!(Snapshot {
            model: report.model.clone(),
            protocol: report.protocol.clone(),
            assessment,
        });
    });
}

#[test]
fn smart_fail2_is_failed_by_smart_status_and_reallocated_sectors() {
    let a = assess_fixture("smartctl-scrutiny/smart-fail2.json");
    assert_eq!(a.verdict, Verdict::Failed);
    for code in [
        "smart_status.failed",
        "exit.failing",
        "exit.prefail_at_threshold",
        "ata.attr.5.failing_now",
        "ata.attr.5.reallocated",
        "ata.attr.197.pending",
        "selftest.failed",
    ] {
        assert!(
            codes(&a).contains(&code),
            "missing {code} in {:?}",
            codes(&a)
        );
    }
}

#[test]
fn smart_nvme_failed_is_flagged_for_media_errors() {
    let a = assess_fixture("smartctl-scrutiny/smart-nvme-failed.json");
    assert_eq!(a.verdict, Verdict::Warning);
    let reason = a
        .reasons
        .iter()
        .find(|r| r.code == "nvme.media_errors")
        .expect("media error reason");
    assert!(reason.message.contains(": 7 "), "{}", reason.message);
}

#[test]
fn smart_fail_device_not_opened_is_unknown() {
    let a = assess_fixture("smartctl-scrutiny/smart-fail.json");
    assert_eq!(a.verdict, Verdict::Unknown);
    assert!(codes(&a).contains(&"exit.device_open_failed"));
    assert!(codes(&a).contains(&"data.none"));
}

#[test]
fn seagate_packed_raw_values_raise_nothing() {
    // Attributes 1, 7 and 195 hold six-byte packed error rates and 188 three
    // packed timeout counters (here 12 12 12 and 4 4 4): none is an alarm.
    for name in [
        "smartctl/sat-Seagate_Exos_X16-ST16000NM001G-2KK103-sda.json",
        "smartctl/sat-Seagate_Enterprise_Capacity_3.5_HDD-ST2000NM0008-2F3100-sdl.json",
        "smartctl/ST3200820AS_15.json",
    ] {
        let a = assess_fixture(name);
        assert_eq!(a.verdict, Verdict::Passed, "{name}: {:?}", a.reasons);
    }
    let a = assess_fixture("smartctl/sat-Seagate_Constellation_ES.3-ST3000NM0033-9ZM178-sdc.json");
    assert_eq!(a.verdict, Verdict::Passed, "{:?}", a.reasons);
    let timeouts = a
        .key_attributes
        .iter()
        .find(|k| k.name == "ATA 188 Command_Timeout")
        .expect("188 shown");
    assert_eq!(timeouts.value, "4");
}

#[test]
fn raid_volume_without_health_data_is_unknown() {
    let a = assess_fixture("smartctl-scrutiny/smart-raid.json");
    assert_eq!(a.verdict, Verdict::Unknown);
}
