//! The charging scheduler against an independent LP solver: HiGHS (through SciPy, in the test
//! venv) solves the same instance from the formulation in docs/charging.md.

use std::io::Write;
use std::process::Stdio;

use atlasmesh_charging::instances::depot_night;
use atlasmesh_charging::schedule::{Method, Problem, optimal, plan};
use atlasmesh_tests::python_peer;
use serde_json::Value;

fn highs(problem: &Problem) -> Value {
    let mut child = python_peer("lp_reference.py")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(&serde_json::to_vec(problem).unwrap())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "lp_reference.py failed");
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn the_scheduler_finds_the_optimum_highs_finds_and_meets_every_deadline() {
    for (vehicles, seed) in [(40, 5), (120, 6)] {
        let problem = depot_night(vehicles, seed);
        let answer = highs(&problem);
        assert_eq!(answer["status"], "optimal", "{answer}");
        let best = answer["cost"].as_f64().unwrap();
        let relaxed: f64 = optimal(&problem, u64::MAX)
            .unwrap()
            .iter()
            .flat_map(|row| {
                row.iter()
                    .zip(&problem.price)
                    .map(|(p, c)| p * c * problem.slot_hours)
            })
            .sum();
        assert!(
            (relaxed - best).abs() <= 1e-6 * best,
            "{vehicles} vehicles: ours {relaxed}, HiGHS {best}"
        );
        let planned = plan(&problem).unwrap();
        assert_eq!(planned.method, Method::Optimal);
        assert_eq!(planned.missed(), 0, "{:?}", planned.explanation);
        assert!(
            planned.cost <= best * 1.01,
            "rounded plan {} against {best}",
            planned.cost
        );
    }
}

/// A write a device received: (function code, address, values).
type Received = (u64, u64, Vec<u64>);

/// A charger or meter served by pymodbus from `tests/peers/modbus_device.py`.
struct ModbusPeer {
    child: std::process::Child,
    port: u16,
    writes: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

impl ModbusPeer {
    fn start(model: &str, mode: &str) -> ModbusPeer {
        use std::io::BufRead;
        let dir = tempfile::tempdir().unwrap();
        let writes = dir.path().join("writes.jsonl");
        let port = atlasmesh_tests::free_port();
        let mut child = python_peer("modbus_device.py")
            .args([
                model,
                "--mode",
                mode,
                "--port",
                &port.to_string(),
                "--writes",
            ])
            .arg(&writes)
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        assert_eq!(line.trim(), format!("PORT {port}"), "{model} {mode}");
        ModbusPeer {
            child,
            port,
            writes,
            _dir: dir,
        }
    }

    fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Every write the device received.
    fn writes(&self) -> Vec<Received> {
        std::fs::read_to_string(&self.writes)
            .unwrap_or_default()
            .lines()
            .map(|l| {
                let v: Value = serde_json::from_str(l).unwrap();
                let values = v["values"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|x| x.as_u64().unwrap())
                    .collect();
                (
                    v["fc"].as_u64().unwrap(),
                    v["address"].as_u64().unwrap(),
                    values,
                )
            })
            .collect()
    }
}

impl Drop for ModbusPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn charger_read(profile: &str, address: &str, extra: &[&str]) -> (bool, Value, String) {
    let mut cmd = atlasmesh_tests::atlasmesh();
    cmd.args([
        "charger",
        "read",
        "--profile",
        profile,
        "--address",
        address,
        "--timeout",
        "1s",
    ]);
    cmd.args(extra);
    let (status, stdout, stderr) = atlasmesh_tests::run(&mut cmd).unwrap();
    assert!(!stderr.contains("panicked"), "{stderr}");
    (
        status.success(),
        serde_json::from_str(&stdout).unwrap_or(Value::Null),
        stderr,
    )
}

fn f32_words(v: f32) -> Vec<u64> {
    let b = v.to_bits();
    vec![u64::from(b >> 16), u64::from(b & 0xffff)]
}

#[test]
fn every_shipped_profile_reads_and_writes_a_pymodbus_device_with_that_register_map() {
    // The setpoint and keep-alive writes each model must receive for 16 A, from the vendors'
    // tables (fc, address, values), in the order they must arrive.
    let chargers: [(&str, f64, Vec<Received>); 5] = [
        ("alfen-ng9xx", 12345.5, vec![(16, 1210, f32_words(16.0))]),
        (
            "abb-terra-ac",
            12345.0,
            vec![
                (6, 0x4109, vec![6]),
                (6, 0x4106, vec![60]),
                (16, 0x4100, vec![0, 16000]),
            ],
        ),
        (
            "phoenix-em-cp-pp-eth",
            12340.0,
            vec![(6, 300, vec![16]), (5, 400, vec![1])],
        ),
        (
            "keba-p30",
            12345.5,
            vec![
                (6, 5016, vec![6000]),
                (6, 5018, vec![60]),
                (6, 5018, vec![60]),
                (6, 5004, vec![16000]),
                (6, 5014, vec![1]),
            ],
        ),
        (
            "schneider-evlink-pro",
            12345.0,
            vec![(6, 4000, vec![1]), (6, 4004, vec![16])],
        ),
    ];
    for (model, energy_wh, expected) in chargers {
        let peer = ModbusPeer::start(model, "normal");
        let (ok, out, err) = charger_read(
            model,
            &peer.address(),
            &["--set-current", "16", "--keep-alive"],
        );
        assert!(ok, "{model}: {err}");
        let before = &out["before"];
        assert_eq!(before["state"], "C", "{model}: {out}");
        assert_eq!(
            (
                before["plugged"].as_bool(),
                before["charging"].as_bool(),
                before["fault"].as_bool()
            ),
            (Some(true), Some(true), Some(false)),
            "{model}"
        );
        let power = before["power_w"].as_f64().unwrap();
        assert!((power - 11040.0).abs() < 0.01, "{model}: power {power}");
        let energy = before["energy_wh"].as_f64().unwrap();
        assert!(
            (energy - energy_wh).abs() < 0.01,
            "{model}: energy {energy}"
        );
        assert_eq!(peer.writes(), expected, "{model}: writes");
    }
    for model in ["eastron-sdm630", "sunspec-meter", "sunspec-float-meter"] {
        let peer = ModbusPeer::start(model, "normal");
        let (ok, out, err) = charger_read(model, &peer.address(), &[]);
        assert!(ok, "{model}: {err}");
        let power = out["before"]["power_w"].as_f64().unwrap();
        let energy = out["before"]["energy_wh"].as_f64().unwrap();
        assert!((power - 43210.0).abs() < 0.01, "{model}: power {power}");
        assert!(
            (energy - 1_234_500.0).abs() < 0.01,
            "{model}: energy {energy}"
        );
        assert!(peer.writes().is_empty(), "{model}: a meter is only read");
    }
}

#[test]
fn a_device_that_is_down_slow_failing_or_malformed_is_a_clear_error() {
    let down = format!("127.0.0.1:{}", atlasmesh_tests::free_port());
    let (ok, _, err) = charger_read("alfen-ng9xx", &down, &[]);
    assert!(
        !ok && err.contains("(unreachable)") && err.contains("Connection refused"),
        "{err}"
    );
    for (mode, expected) in [
        ("slow", "(timeout): status: no reply within 1s"),
        (
            "exception",
            "(exception): status: the device answered with exception",
        ),
        ("short", "(malformed): status: expected 5 registers, got 4"),
    ] {
        let peer = ModbusPeer::start("alfen-ng9xx", mode);
        let (ok, _, err) = charger_read("alfen-ng9xx", &peer.address(), &["--set-current", "16"]);
        assert!(!ok && err.contains(expected), "{mode}: {err}");
        assert!(
            peer.writes().is_empty(),
            "{mode}: nothing written to a device that failed its read"
        );
    }
}

#[test]
fn the_depot_plans_under_its_limit_and_faults_chargers_that_time_out_fail_or_answer_wrongly() {
    use atlasmesh_tests::{Options, Server, http};
    let good: Vec<ModbusPeer> = (0..2)
        .map(|_| ModbusPeer::start("alfen-ng9xx", "normal"))
        .collect();
    let failing = ModbusPeer::start("keba-p30", "exception");
    let malformed = ModbusPeer::start("alfen-ng9xx", "short");
    let down = format!("127.0.0.1:{}", atlasmesh_tests::free_port());
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("depot.toml");
    // Vehicles leave twelve hours from now (the depot runs on UTC here), whatever the hour
    // the suite runs at: enough for the energy, and the deadline inside the 24-hour plan.
    let now_s = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let leave = (now_s / 60 + 12 * 60) % (24 * 60);
    let mut toml = format!(
        "[charging]\npoll_interval = \"1s\"\nrequest_timeout = \"1s\"\nsite_limit_kw = 20.0\n\
         departure = \"{:02}:{:02}\"\n\
         [[charging.circuits]]\nname = \"feeder-a\"\nlimit_kw = 11.0\n",
        leave / 60,
        leave % 60
    );
    let points = [
        ("cp-1", "alfen-ng9xx", good[0].address()),
        ("cp-2", "alfen-ng9xx", good[1].address()),
        ("cp-3", "keba-p30", failing.address()),
        ("cp-4", "alfen-ng9xx", malformed.address()),
        ("cp-5", "alfen-ng9xx", down.clone()),
    ];
    for (id, profile, address) in &points {
        toml.push_str(&format!(
            "[[charging.chargers]]\nid = \"{id}\"\nprofile = \"{profile}\"\naddress = \"{address}\"\nbay = \"bay-{}\"\n",
            &id[3..]
        ));
        // The two that work share a feeder below the site limit.
        if *id == "cp-1" || *id == "cp-2" {
            toml.push_str("circuit = \"feeder-a\"\n");
        }
    }
    std::fs::write(&config, toml).unwrap();
    let depot = Server::start(Options {
        args: vec!["--config".into(), config.display().to_string()],
        env: vec![("TZ".into(), "UTC".into())],
        ..Options::default()
    })
    .unwrap();
    let token = depot.token("viewer");
    let get = |path: &str| -> Value {
        http()
            .get(depot.url(path))
            .bearer_auth(&token)
            .send()
            .unwrap()
            .json()
            .unwrap()
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (chargers, plan) = loop {
        let chargers = get("/api/v1/chargers");
        let plan = get("/api/v1/charging/plan");
        let statuses: Vec<String> = chargers["chargers"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["status"].as_str().unwrap().to_owned())
            .collect();
        if statuses == ["ok", "ok", "faulted", "faulted", "faulted"]
            && plan["vehicles"].as_array().is_some_and(|v| v.len() == 2)
        {
            break (chargers, plan);
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{chargers:#}\n{plan:#}"
        );
        std::thread::sleep(std::time::Duration::from_millis(300));
    };
    let codes: Vec<&str> = chargers["chargers"].as_array().unwrap()[2..]
        .iter()
        .map(|c| c["error_code"].as_str().unwrap())
        .collect();
    assert_eq!(
        codes,
        ["exception", "malformed", "unreachable"],
        "{chargers:#}"
    );
    // Two unknown vehicles of 30 kWh on an 11 kW feeder under a 20 kW site: every slot
    // within both limits.
    let limit = plan["site_limit_kw"].as_f64().unwrap();
    assert_eq!(
        plan["circuits"],
        serde_json::json!([{"name": "feeder-a", "limit_kw": 11.0}]),
        "{plan:#}"
    );
    let slots = plan["price"].as_array().unwrap().len();
    for t in 0..slots {
        let total: f64 = plan["vehicles"]
            .as_array()
            .unwrap()
            .iter()
            .inspect(|v| assert_eq!(v["circuit"], "feeder-a", "{v:#}"))
            .map(|v| v["power_kw"][t].as_f64().unwrap())
            .sum();
        let base = plan["base_load_kw"][t].as_f64().unwrap();
        assert!(
            total + base <= limit + 1e-6,
            "slot {t}: {total} + {base} > {limit}"
        );
        assert!(total <= 11.0 + 1e-6, "slot {t}: {total} kW on feeder-a");
    }
    assert!(
        plan["vehicles"]
            .as_array()
            .unwrap()
            .iter()
            .all(|v| v["ready"] == true),
        "{plan:#}"
    );
    // Each working charger got a current it can run at (6 A to 32 A) or 0, as an f32 at 1210.
    for peer in &good {
        let writes = peer.writes();
        assert!(!writes.is_empty(), "no setpoint written");
        for (fc, address, values) in &writes {
            assert_eq!((*fc, *address), (16, 1210));
            let amps = f32::from_bits(((values[0] as u32) << 16) | values[1] as u32);
            assert!(amps == 0.0 || (6.0..=32.0).contains(&amps), "{amps}");
        }
    }
    // The failing charger got its failsafe armed on connecting (writes succeed, reads fail),
    // but never a current: a charger whose state is unknown is not driven.
    assert!(
        failing
            .writes()
            .iter()
            .all(|(_, address, _)| *address == 5016 || *address == 5018),
        "{:?}",
        failing.writes()
    );
    // A technician's priority and departure are audited and re-planned with.
    let tech = depot.token("technician");
    let put = |path: &str, token: &str, body: Value| {
        http()
            .put(depot.url(path))
            .bearer_auth(token)
            .json(&body)
            .send()
            .unwrap()
            .status()
    };
    let bus = "/api/v1/charging/vehicles/bus-1";
    let site = "/api/v1/charging/site";
    let day = serde_json::json!({"limit_kw": 50.0, "tariff": vec![0.2; 24]});
    assert_eq!(
        put(
            bus,
            &tech,
            serde_json::json!({"priority": 3, "target_soc_percent": 90.0})
        ),
        200
    );
    assert_eq!(
        put(bus, &token, serde_json::json!({"priority": 3})),
        403,
        "a viewer changes nothing"
    );
    assert_eq!(
        put(site, &tech, day.clone()),
        403,
        "only admins set the site"
    );
    let admin = depot.token("admin");
    assert_eq!(
        put(
            site,
            &admin,
            serde_json::json!({"limit_kw": 50.0, "tariff": vec![0.2; 7]})
        ),
        422,
        "a tariff of 7 prices is refused"
    );
    assert_eq!(put(site, &admin, day), 200);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while get("/api/v1/charging/plan")["site_limit_kw"] != 50.0 {
        assert!(
            std::time::Instant::now() < deadline,
            "not re-planned with the new limit"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let audit: Value = http()
        .get(depot.url("/api/v1/audit"))
        .bearer_auth(&admin)
        .send()
        .unwrap()
        .json()
        .unwrap();
    let actions: Vec<&str> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["action"].as_str())
        .collect();
    assert!(
        actions.contains(&"charging.site") && actions.contains(&"charging.vehicle"),
        "{actions:?}"
    );
    assert!(!depot.logs().iter().any(|l| l.contains("panicked")));
}
