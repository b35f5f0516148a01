//! Disk health end to end: the real depot runs a smartctl stand-in that prints recorded
//! smartctl outputs (tests/fixtures/fake-smartctl), and is checked through its API, metrics,
//! health, staging, webhook and command line.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use atlasmesh_tests::smart::{FakeSmartctl, ata_with_reallocated, fixture};
use atlasmesh_tests::{Options, Server, atlasmesh, http, metric_sum, run};
use serde_json::{Value, json};

fn get(depot: &Server, token: &str, path: &str) -> (u16, Value) {
    let r = http()
        .get(depot.url(path))
        .bearer_auth(token)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn post(depot: &Server, token: &str, path: &str, body: Value) -> (u16, Value) {
    let r = http()
        .post(depot.url(path))
        .bearer_auth(token)
        .json(&body)
        .send()
        .unwrap();
    let status = r.status().as_u16();
    (status, r.json().unwrap_or(Value::Null))
}

fn wait_for<T>(what: &str, limit: Duration, mut probe: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = probe() {
            return v;
        }
        assert!(start.elapsed() < limit, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn disk<'a>(list: &'a Value, device: &str) -> &'a Value {
    list["disks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["device"] == device)
        .unwrap_or_else(|| panic!("no {device} in {list:#}"))
}

/// What the webhook receiver answered, and the body it got, per request.
type Received = Arc<Mutex<Vec<(u16, Value)>>>;

/// A webhook receiver that answers 500 to the first `fail` requests, then 204; keeps bodies.
fn webhook(fail: usize) -> (String, Received) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hooks/disks", listener.local_addr().unwrap());
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).unwrap_or(0) == 0 || line == "\r\n" {
                    break;
                }
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let mut seen = sink.lock().unwrap();
            let status = if seen.len() < fail { 500 } else { 204 };
            seen.push((status, serde_json::from_slice(&body).unwrap_or(Value::Null)));
            let _ = write!(
                stream,
                "HTTP/1.1 {status} X\r\ncontent-length: 0\r\nconnection: close\r\n\r\n"
            );
        }
    });
    (url, seen)
}

#[test]
fn the_collector_judges_every_disk_and_a_failing_store_disk_holds_staging() {
    let fake = FakeSmartctl::new(&[
        ("/dev/sda", None),
        ("/dev/nvme0", Some("smartctl-scrutiny/smart-nvme.json")),
        ("/dev/sdb", Some("smartctl-scrutiny/smart-scsi.json")),
        ("/dev/sdc", None),
        ("/dev/sdd", None),
        ("/dev/sde", None),
    ]);
    fake.set("/dev/sda", &ata_with_reallocated(0));
    // Truncated JSON, as a smartctl killed mid-write leaves it.
    let whole = std::fs::read_to_string(fixture("smartctl-scrutiny/smart-nvme2.json")).unwrap();
    fake.set("/dev/sdd", &whole[..whole.len() / 2]);
    // Not smartctl's output at all (a wrapper script printing its own error).
    fake.set(
        "/dev/sde",
        "sudo: a terminal is required to read the password\n",
    );
    let (hook, received) = webhook(1);
    let smartctl = fake.path().display().to_string();
    let depot = Server::start(Options {
        env: vec![
            ("ATLASMESH_DISKS__SMARTCTL".into(), smartctl),
            ("ATLASMESH_DISKS__STORE_DEVICE".into(), "/dev/sda".into()),
            ("ATLASMESH_DISKS__QUIET_HOURS".into(), "00:00-23:59".into()),
            ("ATLASMESH_DISKS__WEBHOOK".into(), hook),
        ],
        ..Options::default()
    })
    .unwrap();
    let viewer = depot.token("viewer");
    let technician = depot.token("technician");
    let admin = depot.token("admin");

    // The first reading runs at start.
    let list = wait_for("the first reading", Duration::from_secs(30), || {
        let (_, list) = get(&depot, &viewer, "/api/v1/disks");
        (list["disks"].as_array()?.len() == 6).then_some(list)
    });
    assert_eq!(list["store_device"], "/dev/sda");
    assert!(list["staging_held"].is_null(), "{list:#}");
    let sda = disk(&list, "/dev/sda");
    assert_eq!(
        (&sda["verdict"], &sda["holds_store"]),
        (&json!("passed"), &json!(true))
    );
    assert_eq!(sda["serial"], "9RK1XXXX");
    assert_eq!(disk(&list, "/dev/nvme0")["verdict"], "passed");
    let sdb = disk(&list, "/dev/sdb");
    assert_eq!(sdb["verdict"], "failed");
    assert!(
        sdb["reasons"][0]["message"]
            .as_str()
            .unwrap()
            .contains("grown defect list"),
        "{sdb:#}"
    );
    // A device that cannot be opened, and one whose output is cut short: unknown, with why.
    let sdc = disk(&list, "/dev/sdc");
    assert_eq!(sdc["verdict"], "unknown");
    assert!(
        sdc["reasons"].to_string().contains("No such device"),
        "{sdc:#}"
    );
    let sdd = disk(&list, "/dev/sdd");
    assert_eq!(sdd["verdict"], "unknown");
    assert!(
        sdd["error"].as_str().unwrap().contains("truncated"),
        "{sdd:#}"
    );
    let sde = disk(&list, "/dev/sde");
    assert_eq!(sde["verdict"], "unknown");
    assert!(
        sde["error"].as_str().unwrap().contains("malformed JSON"),
        "{sde:#}"
    );
    // Self-tests: in quiet hours (all day here) the long one is started first.
    assert!(
        fake.calls().contains("--json -t long /dev/sda"),
        "{}",
        fake.calls()
    );
    assert!(sda["long_test_started"].is_string(), "{sda:#}");
    assert!(!sda["self_tests"].as_array().unwrap().is_empty());

    // Metrics under smartctl_exporter's names, and the verdict.
    let metrics = depot.metrics().unwrap();
    assert_eq!(
        metric_sum(
            &metrics,
            "smartctl_device_smart_status",
            &["device=\"sda\""]
        ),
        1.0
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "smartctl_device_percentage_used",
            &["device=\"nvme0\""]
        ),
        0.0
    );
    assert!(
        metric_sum(
            &metrics,
            "smartctl_device_attribute",
            &[
                "device=\"sda\"",
                "attribute_name=\"Reallocated_Sector_Ct\"",
                "attribute_value_type=\"raw\""
            ]
        ) == 0.0
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "atlasmesh_disk_verdict",
            &["device=\"sdb\"", "verdict=\"failed\""]
        ),
        1.0,
        "{metrics}"
    );
    assert_eq!(
        metric_sum(
            &metrics,
            "atlasmesh_disk_verdict",
            &["device=\"sdb\"", "verdict=\"passed\""]
        ),
        0.0
    );
    let (status, health) = get(&depot, &viewer, "/health");
    assert_eq!(status, 200, "{health}");

    // The store disk starts losing sectors: the rate rule warns, staging is held, health degrades.
    fake.set("/dev/sda", &ata_with_reallocated(3));
    // History keeps one reading per second; this one must not replace the first.
    std::thread::sleep(Duration::from_millis(1100));
    let (status, _) = post(&depot, &viewer, "/api/v1/disks/check", json!({}));
    assert_eq!(status, 403, "a viewer cannot trigger readings");
    let (status, checked) = post(&depot, &technician, "/api/v1/disks/check", json!({}));
    assert_eq!(status, 200, "{checked}");
    let sda = disk(&checked, "/dev/sda");
    assert_eq!(sda["verdict"], "warning", "{sda:#}");
    assert!(
        sda["reasons"][0]["message"]
            .as_str()
            .unwrap()
            .contains("rose from 0 to 3"),
        "{sda:#}"
    );
    let (status, health) = get(&depot, &viewer, "/health");
    assert_eq!(
        (status, &health["status"]),
        (503, &json!("degraded")),
        "{health}"
    );
    assert!(
        health["reasons"][0]
            .as_str()
            .unwrap()
            .contains("image store"),
        "{health}"
    );
    let stage = json!({"path": "/nonexistent/bundle", "hardware": "hw", "version": "1.0.0"});
    let (status, refused) = post(&depot, &technician, "/api/v1/images", stage.clone());
    assert_eq!(
        (status, &refused["error"]["code"]),
        (503, &json!("store_disk_unhealthy")),
        "{refused}"
    );
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("/dev/sda"),
        "{refused}"
    );
    let (status, _) = post(
        &depot,
        &technician,
        "/api/v1/images?disk_override=deadline",
        stage.clone(),
    );
    assert_eq!(status, 403, "only an admin overrides");
    let (status, passed) = post(
        &depot,
        &admin,
        "/api/v1/images?disk_override=fleet%20recall%20tonight",
        stage,
    );
    assert_ne!(status, 503, "{passed}");
    let (_, audit) = get(
        &depot,
        &admin,
        "/api/v1/audit?action=image.stage.disk_override",
    );
    let entries = audit.to_string();
    assert!(
        entries.contains("fleet recall tonight") && entries.contains("denied"),
        "{audit:#}"
    );

    // The detail: history of both readings, and the alerts.
    let (status, detail) = get(&depot, &viewer, "/api/v1/disks/9RK1XXXX");
    assert_eq!(status, 200, "{detail}");
    let history = detail["history"].as_array().unwrap();
    assert_eq!(history.len(), 2, "{detail:#}");
    assert_eq!(history[1]["reallocated_sectors"], 3);
    let alerts = detail["alerts"].as_array().unwrap();
    assert_eq!(
        (&alerts[0]["from"], &alerts[0]["to"]),
        (&json!("passed"), &json!("warning"))
    );
    assert_eq!(get(&depot, &viewer, "/api/v1/disks/nope").0, 404);

    // The webhook got every alert, the first after a failed attempt and a retry.
    let delivered = wait_for("webhook deliveries", Duration::from_secs(30), || {
        let (_, alerts) = get(&depot, &viewer, "/api/v1/disks/alerts");
        let all = alerts["alerts"].as_array()?.clone();
        all.iter()
            .all(|a| a["webhook"] == "delivered")
            .then_some(all)
    });
    // sdb (new, failed), sdc, sdd and sde (new, unknown), sda (passed to warning).
    assert_eq!(delivered.len(), 5, "{delivered:#?}");
    assert!(
        delivered.iter().any(|a| a["attempts"] == 2),
        "{delivered:#?}"
    );
    let seen = received.lock().unwrap().clone();
    assert_eq!(seen[0].0, 500);
    assert!(
        seen.iter()
            .any(|(_, b)| b["alert"]["to"] == "warning" && b["kind"] == "disk_verdict_changed")
    );

    // Healthy again (disk replaced): staging resumes, health recovers.
    fake.set(
        "/dev/sda",
        &std::fs::read_to_string(fixture("smartctl/WDC_WD20EFRX-68EUZN0_17.json")).unwrap(),
    );
    let (_, checked) = post(&depot, &technician, "/api/v1/disks/check", json!({}));
    assert!(checked["disks"].to_string().contains("WD20EFRX"));
    assert_eq!(get(&depot, &viewer, "/health").0, 200);
}

#[test]
fn smartctl_missing_or_hanging_leaves_disks_unknown_and_the_depot_serving() {
    let fake = FakeSmartctl::new(&[("/dev/sda", Some("smartctl-scrutiny/smart-ata.json"))]);
    std::fs::write(fake.dir.path().join("sda.hang"), "").unwrap();
    let depot = Server::start(Options {
        env: vec![
            (
                "ATLASMESH_DISKS__SMARTCTL".into(),
                fake.path().display().to_string(),
            ),
            ("ATLASMESH_DISKS__TIMEOUT".into(), "1s".into()),
            ("ATLASMESH_DISKS__STORE_DEVICE".into(), "/dev/sda".into()),
        ],
        ..Options::default()
    })
    .unwrap();
    let viewer = depot.token("viewer");
    let list = wait_for("the first reading", Duration::from_secs(30), || {
        let (_, list) = get(&depot, &viewer, "/api/v1/disks");
        (list["disks"].as_array()?.len() == 1).then_some(list)
    });
    let sda = disk(&list, "/dev/sda");
    assert_eq!(sda["verdict"], "unknown");
    assert!(
        sda["error"]
            .as_str()
            .unwrap()
            .contains("did not finish within 1 s"),
        "{sda:#}"
    );
    // Unknown is not a failure: staging and health are not held for it.
    assert_eq!(get(&depot, &viewer, "/health").0, 200);
    drop(depot);

    let depot = Server::start(Options {
        env: vec![(
            "ATLASMESH_DISKS__SMARTCTL".into(),
            "/nonexistent/smartctl".into(),
        )],
        ..Options::default()
    })
    .unwrap();
    let viewer = depot.token("viewer");
    let list = wait_for("the first check", Duration::from_secs(30), || {
        let (_, list) = get(&depot, &viewer, "/api/v1/disks");
        list["checked_at"].is_string().then_some(list)
    });
    assert!(
        list["error"].as_str().unwrap().contains("smartmontools"),
        "{list:#}"
    );
    assert_eq!(get(&depot, &viewer, "/health").0, 200);
    assert!(
        depot
            .logs()
            .iter()
            .any(|l| l.contains("cannot list the disks"))
    );
}

#[test]
fn smart_report_prints_each_disk_with_its_verdict_and_exits_by_the_worst() {
    let fake = FakeSmartctl::new(&[
        ("/dev/sda", Some("smartctl-scrutiny/smart-ata.json")),
        ("/dev/sdb", Some("smartctl-scrutiny/smart-nvme-failed.json")),
    ]);
    let smartctl = fake.path();
    let (status, stdout, stderr) = run(atlasmesh()
        .args(["smart", "report", "--smartctl"])
        .arg(&smartctl))
    .unwrap();
    assert_eq!(status.code(), Some(1), "a warning: {stdout}{stderr}");
    assert!(
        stdout.contains("/dev/sda: PASSED (WDC WD140EDFZ"),
        "{stdout}"
    );
    assert!(
        stdout.contains("/dev/sdb: WARNING")
            && stdout.contains("media and data integrity errors: 7"),
        "{stdout}"
    );
    let (status, stdout, _) = run(atlasmesh()
        .args([
            "smart",
            "report",
            "--json",
            "--device",
            "/dev/sda",
            "--smartctl",
        ])
        .arg(&smartctl))
    .unwrap();
    assert_eq!(status.code(), Some(0));
    let report: Value = serde_json::from_str(&stdout).unwrap();
    assert_eq!(report["disks"][0]["verdict"], "passed", "{report:#}");
    let (status, _, stderr) =
        run(atlasmesh().args(["smart", "report", "--smartctl", "/nonexistent/smartctl"])).unwrap();
    assert!(!status.success());
    assert!(stderr.contains("smartctl was not found"), "{stderr}");
}
