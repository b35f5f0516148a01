//! The vehicle link end to end, on both brokers (the embedded one and Debian's Mosquitto):
//! paho-mqtt vehicles dock and hear their assignments, the ACL holds, bad messages are counted
//! and dropped, and a broker restart loses nothing.

use std::time::{Duration, Instant};

use atlasmesh_tests::mqtt::{Mosquitto, paho_vehicle};
use atlasmesh_tests::ota::{Fleet, OtaDepot, random_bytes};
use atlasmesh_tests::{http, metric_sum, panel_login, python_peer};
use serde_json::{Value, json};

const HW: &str = "veh-gen2";
const DEPOT: &str = "depot-link";

/// A depot with its broker: embedded, or Mosquitto started here.
struct Link {
    depot: OtaDepot,
    mosquitto: Option<Mosquitto>,
    _fleet: Fleet,
}

impl Link {
    fn start(external: bool) -> Link {
        let fleet = Fleet::new().unwrap();
        let mosquitto = external.then(|| Mosquitto::start(DEPOT).unwrap());
        let mut env: Vec<(String, String)> = vec![("ATLASMESH_DEPOT__ID".into(), DEPOT.into())];
        if let Some(m) = &mosquitto {
            env.extend(m.depot_env());
        }
        let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let depot = OtaDepot::start(&fleet, &env).unwrap();
        let link = Link {
            depot,
            mosquitto,
            _fleet: fleet,
        };
        link.wait_connected();
        link
    }

    fn port(&self) -> u16 {
        match &self.mosquitto {
            Some(m) => m.port,
            None => {
                let addr: std::net::SocketAddr =
                    self.depot.server.mqtt.as_deref().unwrap().parse().unwrap();
                addr.port()
            }
        }
    }

    fn wait_connected(&self) {
        wait_for("the depot connected to its broker", || {
            metric(&self.depot, "atlasmesh_vehicle_link_connected") == 1.0
        });
    }

    /// Registers a vehicle through the API (and at Mosquitto); returns its password.
    fn register(&self, vehicle: &str) -> String {
        let response = http()
            .post(self.depot.url("/api/v1/vehicles"))
            .bearer_auth(&self.depot.token)
            .json(&json!({"id": vehicle, "hardware_id": HW}))
            .send()
            .unwrap();
        assert_eq!(response.status(), 201);
        let body: Value = response.json().unwrap();
        assert_eq!(body["mqtt"]["username"], vehicle);
        let password = body["mqtt"]["password"].as_str().unwrap().to_owned();
        if let Some(m) = &self.mosquitto {
            m.set_password(vehicle, &password).unwrap();
        }
        password
    }

    fn vehicle(&self, id: &str) -> Value {
        self.depot.get(&format!("/api/v1/vehicles/{id}")).unwrap()
    }

    fn topic(&self, vehicle: &str, kind: &str) -> String {
        format!("atlasmesh/v1/depots/{DEPOT}/vehicles/{vehicle}/{kind}")
    }

    /// paho publishes one message as `vehicle`.
    fn publish(&self, vehicle: &str, password: &str, topic: &str, payload: &str) -> Value {
        let port = self.port().to_string();
        paho_vehicle(&[
            "publish",
            "--port",
            &port,
            "--vehicle",
            vehicle,
            "--password",
            password,
            "--topic",
            topic,
            "--payload",
            payload,
        ])
        .unwrap()
    }
}

/// A metric summed over its series; `name` may carry label filters: `name{a="1",b="2"}`.
fn metric(depot: &OtaDepot, name: &str) -> f64 {
    let (name, labels) = name.split_once('{').unwrap_or((name, ""));
    let labels: Vec<&str> = labels
        .trim_end_matches('}')
        .split(',')
        .filter(|l| !l.is_empty())
        .collect();
    metric_sum(&depot.server.metrics().unwrap(), name, &labels)
}

fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting: {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
}

fn state(soc: f64) -> String {
    json!({"soc_percent": soc, "battery_kwh": 82.5, "plugged_in": true, "installed_version": "1.0.0",
           "slot": "a", "free_bytes": 8_000_000_000u64, "departure_ms": now_ms() + 3_600_000,
           "ts_ms": now_ms()})
    .to_string()
}

fn docking_vehicle_hears_its_assignment(external: bool) {
    let link = Link::start(external);
    link._fleet
        .add(HW, "2.0.0", &random_bytes(300_000, 7), &[])
        .unwrap();
    let staged = link
        .depot
        .stage_dir(&link._fleet.repo, HW, "2.0.0")
        .unwrap();
    assert_eq!(staged["state"], "staged", "{staged}");
    let password = link.register("veh-1");
    let port = link.port().to_string();
    // veh-2 tries to listen in on veh-1's commands for the whole exchange. The embedded front
    // refuses the subscription; Mosquitto grants it and must then deliver nothing its ACL denies.
    let p2 = link.register("veh-2");
    let eavesdropper = python_peer("mqtt_vehicle.py")
        .args([
            "subscribe",
            "--port",
            &port,
            "--vehicle",
            "veh-2",
            "--password",
            &p2,
        ])
        .args(["--topic", &link.topic("veh-1", "cmd/+"), "--listen", "6"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(1));
    link.depot.assign("veh-1", "2.0.0").unwrap();

    let heard = paho_vehicle(&[
        "dock",
        "--port",
        &port,
        "--depot",
        DEPOT,
        "--vehicle",
        "veh-1",
        "--password",
        &password,
        "--bay",
        "bay-4",
    ])
    .unwrap();
    assert_eq!(heard["topic"], link.topic("veh-1", "cmd/ota"), "{heard}");
    assert_eq!(heard["payload"]["version"], "2.0.0");
    assert_eq!(heard["payload"]["hardware_id"], HW);
    assert!(
        heard["payload"]["depot_url"]
            .as_str()
            .unwrap()
            .starts_with("http")
    );

    let v = link.vehicle("veh-1");
    assert_eq!(v["docked"], true, "{v}");
    assert_eq!(v["bay"], "bay-4");
    assert_eq!(v["assigned_version"], "2.0.0");
    let bays = link.depot.get("/api/v1/bays").unwrap();
    assert_eq!(bays["bays"][0]["bay"], "bay-4");
    assert_eq!(bays["bays"][0]["vehicle"], "veh-1");
    // The paho client went away without a clean goodbye? No: it disconnected cleanly, so no
    // Last Will; its retained `online: true` stands.
    assert_eq!(link.vehicle("veh-1")["online"], true);

    // The depot published veh-1's command on assignment and again on docking: veh-2 heard neither.
    let out = eavesdropper.wait_with_output().unwrap();
    let overheard: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(overheard["messages"], json!([]), "{overheard}");
    if !external {
        assert_eq!(overheard["connected"], false, "{overheard}");
    }
}

#[test]
fn docking_vehicle_hears_its_assignment_embedded_broker() {
    docking_vehicle_hears_its_assignment(false);
}

#[test]
fn docking_vehicle_hears_its_assignment_mosquitto() {
    docking_vehicle_hears_its_assignment(true);
}

fn acl_and_bad_messages(external: bool) {
    let link = Link::start(external);
    let p1 = link.register("veh-1");
    let p2 = link.register("veh-2");
    let port = link.port().to_string();

    // veh-1 speaking for veh-2: the broker refuses (the embedded front closes the connection,
    // Mosquitto drops it silently); either way veh-2's record never changes.
    let answer = link.publish("veh-1", &p1, &link.topic("veh-2", "state"), &state(12.0));
    if !external {
        assert_eq!(answer["connected"], false, "{answer}");
    }
    // ...nor may it read veh-2's commands. (Mosquitto grants such a subscription and then
    // never delivers what its ACL denies; the embedded front refuses it outright.)
    let sub = paho_vehicle(&[
        "subscribe",
        "--port",
        &port,
        "--vehicle",
        "veh-1",
        "--password",
        &p1,
        "--topic",
        &link.topic("veh-2", "cmd/+"),
    ])
    .unwrap();
    if !external {
        assert_eq!(sub["connected"], false, "{sub}");
        assert_eq!(sub["granted"], Value::Null, "{sub}");
    }
    // A wrong password is refused at connect: CONNACK 5, not authorised, which paho reports
    // as MQTT 5's reason code 135.
    let wrong = paho_vehicle(&[
        "connect",
        "--port",
        &port,
        "--vehicle",
        "veh-1",
        "--password",
        "amv_wrong",
    ])
    .unwrap();
    assert_eq!(wrong["reason_code"], 135, "{wrong}");

    // Garbage and an oversized payload from veh-1 on its own topic: counted, dropped.
    let bad = link.publish("veh-1", &p1, &link.topic("veh-1", "state"), "{not json");
    assert_eq!(bad["acked"], true, "{bad}");
    let port_s = port.clone();
    let big = paho_vehicle(&[
        "publish",
        "--port",
        &port_s,
        "--vehicle",
        "veh-1",
        "--password",
        &p1,
        "--topic",
        &link.topic("veh-1", "health"),
        "--size",
        "20000",
    ])
    .unwrap();
    assert_eq!(big["acked"], true, "{big}");
    let invalid = link.publish(
        "veh-1",
        &p1,
        &link.topic("veh-1", "state"),
        &json!({"soc_percent": 250.0, "battery_kwh": 80, "plugged_in": true, "installed_version": "1.0.0",
                "slot": "a", "free_bytes": 1, "ts_ms": now_ms()}).to_string(),
    );
    assert_eq!(invalid["acked"], true);
    wait_for("bad messages counted", || {
        metric(
            &link.depot,
            r#"atlasmesh_vehicle_messages_total{kind="state",result="malformed"}"#,
        ) == 1.0
            && metric(
                &link.depot,
                r#"atlasmesh_vehicle_messages_total{kind="health",result="too_large"}"#,
            ) == 1.0
            && metric(
                &link.depot,
                r#"atlasmesh_vehicle_messages_total{kind="state",result="invalid"}"#,
            ) == 1.0
    });
    let logs = link.depot.server.logs().join("\n");
    assert!(logs.contains("dropped a vehicle message"), "no log line");

    // A good message after all that is applied: nothing was wedged.
    let good = link.publish("veh-1", &p1, &link.topic("veh-1", "state"), &state(64.0));
    assert_eq!(good["acked"], true);
    wait_for("veh-1's state applied", || {
        link.vehicle("veh-1")["soc_percent"] == 64.0
    });
    let v2 = link.vehicle("veh-2");
    assert_eq!(v2["soc_percent"], Value::Null, "veh-1 changed veh-2: {v2}");
    assert_eq!(v2["messages"], 0);
    let _ = p2;

    if external {
        // A vehicle the broker admits but the depot never registered: counted and dropped.
        let m = link.mosquitto.as_ref().unwrap();
        m.set_password("veh-ghost", "ghost-password").unwrap();
        let ghost = link.publish(
            "veh-ghost",
            "ghost-password",
            &link.topic("veh-ghost", "state"),
            &state(50.0),
        );
        assert_eq!(ghost["acked"], true);
        wait_for("unknown vehicle counted", || {
            metric(
                &link.depot,
                r#"atlasmesh_vehicle_messages_total{kind="state",result="unknown_vehicle"}"#,
            ) == 1.0
        });
        assert_eq!(
            http()
                .get(link.depot.url("/api/v1/vehicles/veh-ghost"))
                .bearer_auth(&link.depot.token)
                .send()
                .unwrap()
                .status(),
            404
        );
    } else {
        // The embedded broker's front: client id must be the user name.
        let hijack = paho_vehicle(&[
            "connect",
            "--port",
            &port,
            "--vehicle",
            "veh-1",
            "--password",
            &p1,
            "--client-id",
            "veh-2",
        ])
        .unwrap();
        assert_eq!(hijack["reason_code"], 135, "{hijack}");
        assert!(metric(&link.depot, "atlasmesh_mqtt_front_refusals_total") >= 3.0);
    }
}

#[test]
fn acl_holds_and_bad_messages_are_counted_and_dropped_embedded_broker() {
    acl_and_bad_messages(false);
}

#[test]
fn acl_holds_and_bad_messages_are_counted_and_dropped_mosquitto() {
    acl_and_bad_messages(true);
}

#[test]
fn broker_restart_loses_no_registry_state_and_the_depot_resubscribes() {
    let mut link = Link::start(true);
    let p1 = link.register("veh-1");
    link.publish("veh-1", &p1, &link.topic("veh-1", "state"), &state(41.0));
    wait_for("state applied", || {
        link.vehicle("veh-1")["soc_percent"] == 41.0
    });

    let reconnects = metric(&link.depot, "atlasmesh_vehicle_link_reconnects_total");
    let m = link.mosquitto.as_mut().unwrap();
    m.restart().unwrap();
    // Mosquitto restarted empty (no persistence): the vehicle's password file is still there,
    // the depot's session and subscription are not.
    wait_for("the depot noticed and reconnected", || {
        metric(&link.depot, "atlasmesh_vehicle_link_reconnects_total") > reconnects
            && metric(&link.depot, "atlasmesh_vehicle_link_connected") == 1.0
    });
    assert_eq!(link.vehicle("veh-1")["soc_percent"], 41.0, "registry kept");
    // Only a fresh subscription lets this through (the gauge reads 1 once it is granted).
    link.publish("veh-1", &p1, &link.topic("veh-1", "state"), &state(43.5));
    wait_for("state after the restart applied", || {
        link.vehicle("veh-1")["soc_percent"] == 43.5
    });
    let logs = link.depot.server.logs().join("\n");
    assert!(logs.contains("vehicle broker connection lost"), "{logs}");
}

#[test]
fn five_hundred_simulated_vehicles_for_a_minute_and_the_registry_matches() {
    let link = Link::start(false);
    let report = link.depot.server.data_dir.with_file_name("sim-report.json");
    let (status, _stdout, stderr) = atlasmesh_tests::run(
        atlasmesh_tests::atlasmesh()
            .args(["sim", "--depot", &link.depot.url("/"), "--vehicles", "500"])
            .args(["--duration", "60s", "--seed", "7", "--report"])
            .arg(&report)
            .env("ATLASMESH_TOKEN", &link.depot.token),
    )
    .unwrap();
    assert!(status.success(), "simulator failed: {stderr}");
    let finals: Vec<Value> = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    assert_eq!(finals.len(), 500);
    for f in &finals {
        assert_eq!(f["errors"], json!([]), "{f}");
    }
    let docked = finals.iter().filter(|f| f["docked"] == true).count();
    assert!(
        docked > 100,
        "only {docked} of 500 docked: the schedule did not run"
    );

    // Every message was acknowledged before the simulator disconnected; the registry has
    // applied them all once its writer has drained.
    let mut mismatches = Vec::new();
    wait_for("the registry matches what the vehicles sent", || {
        let vehicles = link.depot.get("/api/v1/vehicles").unwrap();
        let by_id: std::collections::HashMap<&str, &Value> = vehicles["vehicles"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| (v["id"].as_str().unwrap(), v))
            .collect();
        mismatches = finals
            .iter()
            .filter(|f| {
                let v = by_id[f["id"].as_str().unwrap()];
                v["docked"] != f["docked"]
                    || v["bay"] != f["bay"]
                    || v["soc_percent"] != f["soc_percent"]
                    || v["plugged_in"] != f["plugged_in"]
                    || v["installed_version"] != f["installed_version"]
            })
            .map(|f| f["id"].as_str().unwrap().to_owned())
            .collect();
        mismatches.is_empty()
    });
    assert!(mismatches.is_empty());
    // Nothing was dropped along the way.
    let text = http()
        .get(link.depot.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    for line in text
        .lines()
        .filter(|l| l.starts_with("atlasmesh_vehicle_messages_total"))
    {
        assert!(
            line.contains("result=\"applied\"") || line.contains("result=\"stale\""),
            "{line}"
        );
    }
    let bays = link.depot.get("/api/v1/bays").unwrap();
    let occupied = bays["bays"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|b| !b["vehicle"].is_null())
        .count();
    assert_eq!(occupied, docked);
}

#[test]
fn simulated_vehicles_pull_assigned_versions_and_report_how_it_went() {
    let link = Link::start(false);
    let fleet = &link._fleet;
    for (version, seed) in [("2.0.0", 21), ("3.0.0", 31)] {
        fleet
            .add(HW, version, &random_bytes(400_000, seed), &[])
            .unwrap();
        let staged = link.depot.stage_dir(&fleet.repo, HW, version).unwrap();
        assert_eq!(staged["state"], "staged", "{staged}");
    }
    link.depot.certify(fleet).unwrap();
    // The simulator names its vehicles sim-0001...; registered and assigned beforehand, they
    // hear their assignment as soon as they are online and docked. 3.0.0 always fails to
    // install in this fleet.
    for id in ["sim-0001", "sim-0002", "sim-0003", "sim-0004"] {
        link.register(id);
    }
    for (id, version) in [
        ("sim-0001", "2.0.0"),
        ("sim-0002", "2.0.0"),
        ("sim-0003", "3.0.0"),
        ("sim-0004", "3.0.0"),
    ] {
        link.depot.assign(id, version).unwrap();
    }
    let report = link
        .depot
        .server
        .data_dir
        .with_file_name("sim-ota-report.json");
    let (status, _stdout, stderr) = atlasmesh_tests::run(
        atlasmesh_tests::atlasmesh()
            .args(["sim", "--depot", &link.depot.url("/"), "--vehicles", "4"])
            .args(["--duration", "30s", "--sim-second", "100ms", "--seed", "3"])
            .args(["--sim-hardware", HW, "--sim-version", "1.0.0"])
            .args(["--fail", "3.0.0=1", "--report"])
            .arg(&report)
            .env("ATLASMESH_TOKEN", &link.depot.token),
    )
    .unwrap();
    assert!(status.success(), "simulator failed: {stderr}");
    let finals: Vec<Value> = serde_json::from_slice(&std::fs::read(&report).unwrap()).unwrap();
    let installed: Vec<&str> = finals
        .iter()
        .map(|f| f["installed_version"].as_str().unwrap())
        .collect();
    assert_eq!(
        installed,
        ["2.0.0", "2.0.0", "1.0.0", "1.0.0"],
        "{finals:?}"
    );

    wait_for("the registry has every vehicle's last report", || {
        let v = |id| link.vehicle(id);
        let ok = |v: Value, version: &str, phase: &str, outcome: &str| {
            v["ota"]["version"] == version
                && v["ota"]["phase"] == phase
                && v["ota"]["outcome"] == outcome
        };
        ok(v("sim-0001"), "2.0.0", "health", "succeeded")
            && ok(v("sim-0002"), "2.0.0", "health", "succeeded")
            && ok(v("sim-0003"), "3.0.0", "install", "failed")
            && ok(v("sim-0004"), "3.0.0", "install", "failed")
            && v("sim-0001")["installed_version"] == "2.0.0"
            && v("sim-0003")["installed_version"] == "1.0.0"
    });
    assert_eq!(
        link.vehicle("sim-0003")["ota"]["error"],
        "simulated install failure"
    );
    // The image list says who runs each image and who is told to.
    let images = link.depot.get("/api/v1/images").unwrap();
    let image = |version: &str| {
        images["images"]
            .as_array()
            .unwrap()
            .iter()
            .find(|i| i["version"] == version)
            .cloned()
            .unwrap()
    };
    assert_eq!(
        image("2.0.0")["installed_vehicles"],
        json!(["sim-0001", "sim-0002"])
    );
    assert_eq!(
        image("2.0.0")["assigned_vehicles"],
        json!(["sim-0001", "sim-0002"])
    );
    assert_eq!(image("3.0.0")["installed_vehicles"], json!([]));
    assert_eq!(
        image("3.0.0")["assigned_vehicles"],
        json!(["sim-0003", "sim-0004"])
    );
    let (panel, _) = panel_login(
        &link.depot.server,
        "admin",
        &link.depot.server.admin_password(),
    )
    .unwrap();
    let page = panel
        .get(link.depot.url("/ota"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(page.contains("2 vehicles: sim-0001, sim-0002"), "{page}");
    assert!(page.contains("2 vehicles: sim-0003, sim-0004"), "{page}");

    // The successful ones really fetched the image from the depot.
    let served = metric_sum(
        &link.depot.server.metrics().unwrap(),
        "atlasmesh_ota_served_bytes_total",
        &[r#"kind="chunk""#],
    );
    assert!(
        served >= 2.0 * 400_000.0,
        "only {served} chunk bytes served"
    );
}
