//! Canary rollouts through the real depot: simulated vehicles (`atlasmesh sim`, pulling real
//! OTA through the reference client) take a good release wave by wave, and a bad one halts in
//! its first wave and rolls back.

use std::process::Stdio;
use std::time::{Duration, Instant};

use atlasmesh_tests::ota::{Fleet, OtaDepot, random_bytes, s};
use atlasmesh_tests::{Options, Server, Sim, free_port, http};
use serde_json::{Value, json};

const HW: &str = "canary-hw";
const VEHICLES: usize = 30;

fn wait_for(what: &str, limit: Duration, mut done: impl FnMut() -> bool) {
    let start = Instant::now();
    while !done() {
        assert!(start.elapsed() < limit, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
    eprintln!("{what}: {:.1} s", start.elapsed().as_secs_f64());
}

fn post(depot: &OtaDepot, path: &str, body: Value) -> (u16, Value) {
    let response = http()
        .post(depot.url(path))
        .bearer_auth(&depot.token)
        .json(&body)
        .send()
        .unwrap();
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

/// A depot with 2.0.0 and 3.0.0 staged for `HW`, and the simulator running `VEHICLES`
/// `vehicles` on 1.0.0 against it, failing installs at the `fail` rates (`VERSION=RATE`);
/// `sim_second` sets how fast they live.
fn depot_with_fleet(
    fleet: &Fleet,
    env: &[(&str, &str)],
    sim_second: &str,
    vehicles: usize,
    fail: &str,
) -> (OtaDepot, Sim) {
    let mut all = vec![
        // Simulated vehicles run ten times fast and dock for seconds, not hours.
        ("ATLASMESH_CANARY__INSTALL_ESTIMATE", "1s"),
        ("ATLASMESH_CANARY__DEPARTURE_MARGIN", "0s"),
    ];
    all.extend_from_slice(env);
    let depot = OtaDepot::start(fleet, &all).unwrap();
    for (version, seed) in [("2.0.0", 2), ("3.0.0", 3)] {
        fleet
            .add(HW, version, &random_bytes(200_000, seed), &[])
            .unwrap();
        let staged = depot.stage_dir(&fleet.repo, HW, version).unwrap();
        assert_eq!(staged["state"], "staged", "{staged}");
    }
    depot.certify(fleet).unwrap();
    let mut sim = atlasmesh_tests::atlasmesh();
    sim.args([
        "sim",
        "--depot",
        &depot.url("/"),
        "--vehicles",
        &vehicles.to_string(),
    ])
    .args([
        "--sim-second",
        sim_second,
        "--seed",
        "11",
        "--sim-hardware",
        HW,
    ])
    .args(["--sim-version", "1.0.0", "--fail", fail])
    .env("ATLASMESH_TOKEN", &depot.token)
    .stdout(Stdio::null())
    .stderr(Stdio::null());
    if let Some(mqtt) = &depot.server.mqtt {
        sim.args(["--mqtt", &format!("mqtt://{mqtt}")]);
    }
    let sim = Sim(sim.spawn().unwrap());
    wait_for(
        "the simulated vehicles report",
        // Registering is one synchronous store write per vehicle.
        Duration::from_secs(60 + vehicles as u64 / 5),
        || running(&depot, "1.0.0") == vehicles,
    );
    (depot, sim)
}

/// Whether every vehicle a rollout assigned (to any wave) is back on its previous version.
fn touched_all_rolled_back(rollout: &Value) -> bool {
    rollout["vehicles"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| !v["wave"].is_null())
        .all(|v| v["stage"] == "rolled_back")
}

/// Kills the depot with SIGKILL and starts it again on the same data directory, HTTP address
/// and MQTT listener (`mqtt_addr`), so the simulated vehicles find it where they left it.
fn kill9_and_restart(depot: OtaDepot, fleet: &Fleet, mqtt_addr: &str) -> OtaDepot {
    let OtaDepot { mut server, token } = depot;
    let addr = server.addr.to_string();
    server.kill9().unwrap();
    let (data_dir, temp) = server.into_parts();
    let mut server = Server::start(Options {
        data_dir: Some(data_dir),
        env: vec![
            ("ATLASMESH_OTA__FLEET_ROOT".into(), s(&fleet.root()).into()),
            ("ATLASMESH_VEHICLE_LINK__LISTEN".into(), mqtt_addr.into()),
            ("ATLASMESH_CANARY__INSTALL_ESTIMATE".into(), "1s".into()),
            ("ATLASMESH_CANARY__DEPARTURE_MARGIN".into(), "0s".into()),
        ],
        args: vec!["--http".into(), addr],
        ..Options::default()
    })
    .unwrap();
    server.keep(temp);
    OtaDepot { server, token }
}

/// How many vehicles the registry says run `version`.
fn running(depot: &OtaDepot, version: &str) -> usize {
    depot.get("/api/v1/vehicles").unwrap()["vehicles"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| v["installed_version"] == version)
        .count()
}

fn plan(version: &str, soak: &str) -> Value {
    json!({
        "version": version,
        "waves": [{"count": 5}, {"percent": 50}, {"percent": 100}],
        "gate": {"threshold": 0.8, "confidence": 0.8},
        "soak": soak,
        "vehicle_deadline": "60s",
        "max_concurrent": 10,
    })
}

#[test]
fn a_good_release_completes_its_waves_and_a_bad_one_halts_and_rolls_back() {
    let fleet = Fleet::new().unwrap();
    let (depot, _sim) = depot_with_fleet(&fleet, &[], "100ms", VEHICLES, "3.0.0=0.7");

    // The default gate cannot be shown with 30 vehicles: refused, saying what would work.
    let (status, refused) = post(&depot, "/api/v1/rollouts", json!({"version": "2.0.0"}));
    assert_eq!(status, 422, "{refused}");
    assert!(
        refused["error"]["message"]
            .as_str()
            .unwrap()
            .contains("at least 133 vehicles"),
        "{refused}"
    );

    let (status, good) = post(&depot, "/api/v1/rollouts", plan("2.0.0", "2s"));
    assert_eq!(status, 201, "{good}");
    let good_id = good["id"].as_i64().unwrap();
    assert_eq!(good["waves"][0]["target"], 5);
    let mut last = Value::Null;
    wait_for(
        "the good release completes",
        Duration::from_secs(120),
        || {
            last = depot.get(&format!("/api/v1/rollouts/{good_id}")).unwrap();
            assert_ne!(last["phase"], "halted", "{last}");
            last["phase"] == "completed"
        },
    );
    assert_eq!(last["counts"]["succeeded"], VEHICLES, "{last}");
    assert_eq!(last["gate"]["verdict"], "pass");
    wait_for(
        "the registry shows 2.0.0 everywhere",
        Duration::from_secs(30),
        || running(&depot, "2.0.0") == VEHICLES,
    );

    // A release failing on most vehicles halts within its first wave.
    let (status, bad) = post(&depot, "/api/v1/rollouts", plan("3.0.0", "2s"));
    assert_eq!(status, 201, "{bad}");
    let bad_id = bad["id"].as_i64().unwrap();
    wait_for("the bad release halts", Duration::from_secs(90), || {
        last = depot.get(&format!("/api/v1/rollouts/{bad_id}")).unwrap();
        last["phase"] == "halted"
    });
    assert_eq!(last["wave"], 1, "{last}");
    assert!(
        last["status"]["reason"]
            .as_str()
            .unwrap()
            .contains("wave 1 cannot pass the gate"),
        "{last}"
    );
    let assigned: Vec<&Value> = last["vehicles"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|v| !v["wave"].is_null())
        .collect();
    assert!(!assigned.is_empty() && assigned.len() <= 5, "{last}");
    assert!(assigned.iter().all(|v| v["wave"] == 1));
    // Every vehicle it touched comes back to 2.0.0, and says so.
    wait_for(
        "the first wave is rolled back",
        Duration::from_secs(60),
        || {
            last = depot.get(&format!("/api/v1/rollouts/{bad_id}")).unwrap();
            touched_all_rolled_back(&last)
        },
    );
    wait_for(
        "the registry shows 2.0.0 everywhere again",
        Duration::from_secs(30),
        || running(&depot, "2.0.0") == VEHICLES,
    );
    let assignments = depot.get("/api/v1/assignments").unwrap();
    assert!(
        !assignments.to_string().contains("3.0.0"),
        "withdrawn: {assignments}"
    );
    // The panel shows it: why it halted, the gate, the decision log, the actions.
    let (panel, _) =
        atlasmesh_tests::panel_login(&depot.server, "admin", &depot.server.admin_password())
            .unwrap();
    let page = panel
        .get(depot.url("/rollouts"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    for expected in [
        "<strong>Halted: </strong>wave 1 cannot pass the gate",
        "Decision log",
        "Silent (counted as failures)",
        &format!("POST /api/v1/rollouts/{bad_id}/rollback"),
        "Earlier rollouts",
    ] {
        assert!(
            page.contains(expected),
            "{expected} not on the page:\n{page}"
        );
    }
    // Halted stays halted; a technician cannot start another rollout over it.
    let (status, _) = post(&depot, "/api/v1/rollouts", plan("3.0.0", "2s"));
    assert_eq!(status, 409);
    // Pausing a halted rollout is refused; rolling it back (admin) finishes it.
    let (status, _) = post(
        &depot,
        &format!("/api/v1/rollouts/{bad_id}/pause"),
        json!({}),
    );
    assert_eq!(status, 409);
    let (status, rolled) = post(
        &depot,
        &format!("/api/v1/rollouts/{bad_id}/rollback"),
        json!({}),
    );
    assert_eq!(status, 200, "{rolled}");
    assert_eq!(rolled["phase"], "rolled_back");

    // The evidence bundle checks out with an independent verifier (Python, `cryptography`)
    // against the director root the fleet certified...
    let dir = tempfile::tempdir().unwrap();
    let bundle_file = dir.path().join("evidence.json");
    let root_file = dir.path().join("director-root.json");
    let bundle = depot
        .get(&format!("/api/v1/rollouts/{bad_id}/evidence"))
        .unwrap();
    assert_eq!(bundle["chain"]["verified"], true, "{bundle}");
    std::fs::write(&bundle_file, bundle.to_string()).unwrap();
    let root = http()
        .get(depot.url("/tuf/director/metadata/1.root.json"))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    std::fs::write(&root_file, &root).unwrap();
    let verify = |file: &std::path::Path| -> Value {
        let (status, stdout, stderr) = atlasmesh_tests::run(
            atlasmesh_tests::python_peer("verify_evidence.py")
                .arg(file)
                .arg(&root_file),
        )
        .unwrap();
        assert!(status.success(), "{stderr}");
        serde_json::from_str(stdout.trim()).unwrap()
    };
    let verdict = verify(&bundle_file);
    assert_eq!(verdict["ok"], true, "{verdict}");
    let decisions = verdict["decisions"].to_string();
    for d in ["assign", "halt", "roll_back"] {
        assert!(decisions.contains(d), "{d} missing from {decisions}");
    }
    // ...and shows an entry changed after the fact, in the bundle or in the store.
    let mut forged = bundle.clone();
    let entry = format!("{} ", forged["log"][1]["entry"].as_str().unwrap());
    forged["log"][1]["entry"] = entry.into();
    std::fs::write(&bundle_file, forged.to_string()).unwrap();
    let verdict = verify(&bundle_file);
    assert_eq!(verdict["ok"], false, "{verdict}");
    let db = rusqlite::Connection::open(depot.server.data_dir.join("depot.db")).unwrap();
    db.busy_timeout(Duration::from_secs(5)).unwrap();
    db.execute(
        "UPDATE rollout_log SET entry = replace(entry, 'halt', 'note') WHERE rollout_id = ?1",
        [bad_id],
    )
    .unwrap();
    let bundle = depot
        .get(&format!("/api/v1/rollouts/{bad_id}/evidence"))
        .unwrap();
    assert_eq!(bundle["chain"]["verified"], false, "{bundle}");
    assert!(
        bundle["signature"].is_null(),
        "a broken chain is not signed"
    );
}

#[test]
fn a_depot_killed_mid_wave_resumes_exactly_where_it_was() {
    let fleet = Fleet::new().unwrap();
    // Fixed ports, so the simulated vehicles find the restarted depot where they left it.
    let mqtt_addr = format!("127.0.0.1:{}", free_port());
    // Vehicles dock for 12 to 48 s here, long enough for a 10 s soak.
    let (depot, _sim) = depot_with_fleet(
        &fleet,
        &[("ATLASMESH_VEHICLE_LINK__LISTEN", &mqtt_addr)],
        "200ms",
        VEHICLES,
        "3.0.0=0.7",
    );
    let (status, rollout) = post(&depot, "/api/v1/rollouts", plan("2.0.0", "10s"));
    assert_eq!(status, 201, "{rollout}");
    let id = rollout["id"].as_i64().unwrap();
    let path = format!("/api/v1/rollouts/{id}");
    // Mid-wave: the canary's five have installed and are soaking; nothing else is assigned.
    let mut before = Value::Null;
    wait_for("the canary wave soaks", Duration::from_secs(60), || {
        before = depot.get(&path).unwrap();
        before["counts"]["soaking"] == 5
    });

    let depot = kill9_and_restart(depot, &fleet, &mqtt_addr);
    let after = depot.get(&path).unwrap();
    assert_eq!(after["phase"], "running", "{after}");
    assert_eq!(after["wave"], before["wave"]);
    assert_eq!(after["counts"]["soaking"], 5, "{after}");
    let stages = |v: &Value| -> Vec<(String, String)> {
        v["vehicles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["id"].to_string(), v["stage"].to_string()))
            .collect()
    };
    assert_eq!(stages(&after), stages(&before));
    // ...and carries on to the end.
    let start = Instant::now();
    let mut last = depot.get(&path).unwrap();
    while last["phase"] != "completed" {
        assert_ne!(last["phase"], "halted", "{last}");
        assert!(
            start.elapsed() < Duration::from_secs(120),
            "not completed after the restart: {}\n{}",
            last,
            depot.server.logs().join("\n")
        );
        std::thread::sleep(Duration::from_millis(250));
        last = depot.get(&path).unwrap();
    }
    assert_eq!(last["counts"]["succeeded"], VEHICLES);
}

#[test]
fn a_thousand_vehicles_a_bad_release_halts_within_the_canary_and_a_good_one_completes() {
    const FLEET: usize = 1000;
    let fleet = Fleet::new().unwrap();
    // Fixed ports, so the vehicles find the depot again after the kill -9 below.
    let mqtt_addr = format!("127.0.0.1:{}", free_port());
    let (depot, _sim) = depot_with_fleet(
        &fleet,
        &[("ATLASMESH_VEHICLE_LINK__LISTEN", &mqtt_addr)],
        "200ms",
        FLEET,
        "2.0.0=0.05",
    );
    // The runbooks' gate, 98 % at 95 % confidence, and the default waves: 5 % raised to the
    // 133 vehicles that gate needs, then 25 %, then everyone.
    let (status, rollout) = post(
        &depot,
        "/api/v1/rollouts",
        json!({"version": "2.0.0", "soak": "3s", "vehicle_deadline": "60s", "max_concurrent": 40}),
    );
    assert_eq!(status, 201, "{rollout}");
    assert_eq!(rollout["waves"][0]["target"], 133, "{}", rollout["waves"]);
    let id = rollout["id"].as_i64().unwrap();
    let path = format!("/api/v1/rollouts/{id}");
    let mut last = Value::Null;
    wait_for("the rollout halts", Duration::from_secs(120), || {
        last = depot.get(&path).unwrap();
        assert_ne!(last["phase"], "completed", "{}", last["waves"]);
        last["phase"] == "halted"
    });
    assert_eq!(last["wave"], 1);
    let vehicles = last["vehicles"].as_array().unwrap();
    assert_eq!(vehicles.len(), FLEET);
    let touched: Vec<&Value> = vehicles.iter().filter(|v| !v["wave"].is_null()).collect();
    assert!(touched.len() <= 133, "{} assigned", touched.len());
    assert!(
        touched.iter().all(|v| v["wave"] == 1),
        "nobody outside the canary"
    );
    // Everyone it touched goes back to 1.0.0: in flight, failed, and already updated.
    wait_for("the canary is rolled back", Duration::from_secs(60), || {
        last = depot.get(&path).unwrap();
        touched_all_rolled_back(&last)
    });
    wait_for("no vehicle runs 2.0.0", Duration::from_secs(30), || {
        running(&depot, "1.0.0") == FLEET
    });
    let metrics = depot.server.metrics().unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("atlasmesh_rollout_halts_total") && l.ends_with(" 1")),
        "{metrics}"
    );

    // The runbook's next steps: the halted rollout is closed, and the fixed release goes out
    // to the whole fleet through the same gate and waves.
    let (status, closed) = post(&depot, &format!("{path}/rollback"), json!({}));
    assert_eq!(
        (status, &closed["phase"]),
        (200, &json!("rolled_back")),
        "{closed}"
    );
    let (status, rollout) = post(
        &depot,
        "/api/v1/rollouts",
        json!({"version": "3.0.0", "soak": "3s", "vehicle_deadline": "60s", "max_concurrent": 40}),
    );
    assert_eq!(status, 201, "{rollout}");
    assert_eq!(rollout["vehicles"].as_array().unwrap().len(), FLEET);
    let path = format!("/api/v1/rollouts/{}", rollout["id"]);
    let started = Instant::now();
    // Killed mid-wave, with vehicles in flight and reports arriving, it resumes where it was:
    // no vehicle's progress is lost and none is counted twice.
    let mut before = Value::Null;
    wait_for(
        "the second wave is under way",
        Duration::from_secs(120),
        || {
            before = depot.get(&path).unwrap();
            before["wave"] == 2 && before["counts"]["succeeded"].as_u64() > Some(140)
        },
    );
    let depot = kill9_and_restart(depot, &fleet, &mqtt_addr);
    let after = depot.get(&path).unwrap();
    assert_eq!(
        (&after["phase"], &after["wave"]),
        (&json!("running"), &json!(2))
    );
    // What it had stored survives: nothing succeeded is forgotten, every vehicle is counted once.
    assert!(
        after["counts"]["succeeded"].as_u64() >= before["counts"]["succeeded"].as_u64(),
        "{} before, {} after",
        before["counts"],
        after["counts"]
    );
    let total: u64 = after["counts"]
        .as_object()
        .unwrap()
        .values()
        .map(|n| n.as_u64().unwrap())
        .sum();
    assert_eq!(total, FLEET as u64, "{}", after["counts"]);
    loop {
        last = depot.get(&path).unwrap();
        if last["phase"] == "completed" {
            break;
        }
        let stuck: Vec<&Value> = last["vehicles"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|v| v["outcome"]["kind"] == "silent" || v["outcome"]["kind"] == "failed")
            .collect();
        assert!(
            last["phase"] == "running" && stuck.is_empty(),
            "a good release must not stall or fail: {} {}\n{stuck:#?}\nthe depot's warnings and what it did with those vehicles:\n{}",
            last["phase"],
            last["waves"],
            depot
                .server
                .logs()
                .iter()
                .filter(|l| l.contains("WARN")
                    || l.contains("ERROR")
                    || stuck.iter().any(|v| l.contains(v["id"].as_str().unwrap())))
                .cloned()
                .collect::<Vec<_>>()
                .join("\n"),
        );
        if started.elapsed() > Duration::from_secs(300) {
            let waiting: Vec<&Value> = last["vehicles"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|v| v["outcome"]["kind"] != "succeeded")
                .collect();
            panic!(
                "the good release did not complete: {}\nthe vehicles not done:\n{waiting:#?}",
                last["waves"]
            );
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    eprintln!(
        "the good release completed: {:.1} s",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(last["counts"]["succeeded"], FLEET, "{}", last["counts"]);
    assert_eq!(last["wave"], 3, "{}", last["waves"]);
    wait_for("every vehicle runs 3.0.0", Duration::from_secs(30), || {
        running(&depot, "3.0.0") == FLEET
    });
}
