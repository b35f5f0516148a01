//! Cloud federation end to end: the real `atlasmesh cloud` and `atlasmesh depot` binaries over
//! real gRPC with mutual TLS; an independent gRPC client (grpcio, with message types from the
//! server's reflection); two cloud instances on one real PostgreSQL.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use atlasmesh_tests::{
    Mode, Options, Server, atlasmesh, free_port, http, panel_login, python_peer, run,
};
use serde_json::{Value, json};

/// Polls `check` until it returns `Some` or `limit` passes.
fn wait_for<T>(limit: Duration, what: &str, mut check: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = check() {
            return v;
        }
        assert!(
            start.elapsed() < limit,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

struct Cloud {
    server: Server,
    data_dir: PathBuf,
    http_port: u16,
    grpc_port: u16,
    database_url: Option<String>,
    env: Vec<(String, String)>,
}

impl Cloud {
    fn start(data_dir: &Path, database_url: Option<&str>, env: &[(&str, &str)]) -> Result<Cloud> {
        let (http_port, grpc_port) = (free_port(), free_port());
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let server = Self::spawn(data_dir, database_url, http_port, grpc_port, &env)?;
        Ok(Cloud {
            server,
            data_dir: data_dir.to_owned(),
            http_port,
            grpc_port,
            database_url: database_url.map(str::to_owned),
            env,
        })
    }

    fn spawn(
        data_dir: &Path,
        database_url: Option<&str>,
        http_port: u16,
        grpc_port: u16,
        env: &[(String, String)],
    ) -> Result<Server> {
        let mut args = vec![
            "--http".to_owned(),
            format!("127.0.0.1:{http_port}"),
            "--grpc".to_owned(),
            format!("127.0.0.1:{grpc_port}"),
        ];
        if let Some(url) = database_url {
            args.extend(["--database-url".to_owned(), url.to_owned()]);
        }
        let mut env = env.to_vec();
        env.push(("ATLASMESH_CLOUD__POLL_INTERVAL".into(), "500ms".into()));
        Server::start(Options {
            mode: Mode::Cloud,
            data_dir: Some(data_dir.to_owned()),
            env,
            args,
        })
    }

    fn restart(&mut self) -> Result<()> {
        self.server = Self::spawn(
            &self.data_dir,
            self.database_url.as_deref(),
            self.http_port,
            self.grpc_port,
            &self.env,
        )?;
        Ok(())
    }

    fn grpc_url(&self) -> String {
        format!("https://127.0.0.1:{}", self.grpc_port)
    }

    /// Runs `atlasmesh cloud <args> --data-dir ... [--database-url ...]`; returns stdout.
    fn tool(&self, args: &[&str]) -> Result<String> {
        let mut cmd = atlasmesh();
        cmd.arg("cloud")
            .args(args)
            .arg("--data-dir")
            .arg(&self.data_dir);
        if let Some(url) = &self.database_url {
            cmd.args(["--database-url", url]);
        }
        let (status, stdout, stderr) = run(&mut cmd)?;
        if !status.success() {
            bail!("atlasmesh cloud {args:?} failed: {stderr}");
        }
        Ok(stdout.trim().to_owned())
    }

    fn enroll_token(&self, depot: &str) -> String {
        self.tool(&["enroll-token", "--depot", depot])
            .expect("minting an enrolment token")
    }

    fn api_token(&self) -> String {
        self.tool(&["token", "--role", "admin", "--name", "test"])
            .expect("minting an API token")
    }

    fn get(&self, token: &str, path: &str) -> Value {
        let response = http()
            .get(self.server.url(path))
            .bearer_auth(token)
            .send()
            .expect("cloud API request");
        assert!(
            response.status().is_success(),
            "GET {path}: {}",
            response.status()
        );
        response.json().expect("JSON")
    }
}

fn start_depot(data_dir: &Path, cloud_url: &str, token: Option<&str>) -> Result<Server> {
    start_depot_with(data_dir, cloud_url, token, &[])
}

fn start_depot_with(
    data_dir: &Path,
    cloud_url: &str,
    token: Option<&str>,
    env: &[(&str, &str)],
) -> Result<Server> {
    let mut args = vec!["--cloud".to_owned(), cloud_url.to_owned()];
    if let Some(token) = token {
        args.extend(["--enroll-token".to_owned(), token.to_owned()]);
    }
    let mut all = vec![
        ("ATLASMESH_CLOUD_LINK__REPORT_INTERVAL".into(), "1s".into()),
        ("ATLASMESH_DISKS__ENABLED".into(), "false".into()),
    ];
    all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    Server::start(Options {
        mode: Mode::Depot,
        data_dir: Some(data_dir.to_owned()),
        env: all,
        args,
    })
}

fn depot_get(depot: &Server, token: &str, path: &str) -> Value {
    http()
        .get(depot.url(path))
        .bearer_auth(token)
        .send()
        .and_then(|r| r.error_for_status())
        .and_then(|r| r.json())
        .unwrap_or_else(|e| panic!("GET {path}: {e}"))
}

/// The depot's cloud link once it reaches `state`.
fn link_reaches(depot: &Server, token: &str, state: &str) -> Value {
    wait_for(
        Duration::from_secs(60),
        &format!("the cloud link to be {state}"),
        || {
            let v = depot_get(depot, token, "/api/v1/cloud");
            (v["link"]["state"] == state).then_some(v)
        },
    )
}

#[test]
fn a_depot_enrols_follows_desired_state_and_loses_no_event_while_the_cloud_is_down() -> Result<()> {
    let temp = tempfile::tempdir()?;
    let mut cloud = Cloud::start(&temp.path().join("cloud"), None, &[])?;
    let api = cloud.api_token();
    let token = cloud.enroll_token("north");
    let depot_dir = temp.path().join("depot");
    let mut depot = start_depot(&depot_dir, &cloud.grpc_url(), Some(&token))?;
    let local = depot.token("admin");

    let link = link_reaches(&depot, &local, "online");
    assert_eq!(link["link"]["depot_name"], "north");
    let creds = depot_dir.join("cloud/credentials.json");
    assert_eq!(
        std::fs::metadata(&creds)?.permissions().mode() & 0o777,
        0o600
    );
    assert!(!std::fs::read_to_string(&creds)?.contains(token.split('.').next().unwrap()));
    let seen = wait_for(Duration::from_secs(30), "the depot's first report", || {
        let d = cloud.get(&api, "/api/v1/depots/north");
        (d["online"] == true && d["reported"].as_array().is_some_and(|r| !r.is_empty()))
            .then_some(d)
    });
    assert_eq!(seen["software_version"], env!("CARGO_PKG_VERSION"));
    let listed = cloud.get(&api, "/api/v1/depots");
    let summary = &listed["depots"][0]["summary"];
    assert_eq!(summary["health"], "healthy", "{listed}");
    assert_eq!(summary["version"], env!("CARGO_PKG_VERSION"));
    let fleet_panel = atlasmesh_tests::http_with_cookies();
    fleet_panel
        .post(cloud.server.url("/login"))
        .form(&[("token", api.as_str())])
        .send()?;
    let page = fleet_panel.get(cloud.server.url("/")).send()?.text()?;
    let row = page
        .split("data-depot=\"north\"")
        .nth(1)
        .expect("north on the fleet panel");
    assert!(row.contains("online") && row.contains("healthy"), "{row}");

    // Desired state from the fleet: stored, applied, acknowledged, and reported back.
    let put = http()
        .put(cloud.server.url("/api/v1/depots/north/desired/site-limit"))
        .bearer_auth(&api)
        .json(&json!({ "limit_kw": 77.5 }))
        .send()?;
    assert_eq!(put.status(), 200, "{}", put.text()?);
    wait_for(
        Duration::from_secs(30),
        "the site limit to reach the depot",
        || {
            let site = depot_get(&depot, &local, "/api/v1/charging/site");
            (site["limit_kw"] == 77.5 && site["limit_source"] == "cloud").then_some(())
        },
    );
    wait_for(
        Duration::from_secs(30),
        "the acknowledgement and report",
        || {
            let d = cloud.get(&api, "/api/v1/depots/north");
            let reported = d["reported"]
                .as_array()?
                .iter()
                .find(|r| r["kind"] == "site_limit")?
                .clone();
            (d["acked_revision"] == d["desired_revision"]
                && reported["observed_generation"] == 1
                && reported["json"]["limit_kw"] == 77.5)
                .then_some(())
        },
    );
    // An invalid value never leaves the cloud.
    let bad = http()
        .put(cloud.server.url("/api/v1/depots/north/desired/site-limit"))
        .bearer_auth(&api)
        .json(&json!({ "limit_kw": -5 }))
        .send()?;
    assert_eq!(bad.status(), 422);

    // The cloud goes away hard; the depot works on and keeps what happens.
    cloud.server.kill9()?;
    for i in 0..5 {
        let created = http()
            .post(depot.url("/api/v1/tokens"))
            .bearer_auth(&local)
            .json(&json!({ "name": format!("offline-{i}"), "role": "viewer" }))
            .send()?;
        assert_eq!(created.status(), 201, "{}", created.text()?);
    }
    let offline = link_reaches(&depot, &local, "offline");
    assert!(
        offline["outbox"]["pending"].as_u64().unwrap() >= 5,
        "{offline}"
    );
    let site = depot_get(&depot, &local, "/api/v1/charging/site");
    assert_eq!(
        site["limit_kw"], 77.5,
        "the last known desired state holds offline"
    );
    let (panel, _) = panel_login(&depot, "admin", &depot.admin_password())?;
    let overview = panel.get(depot.url("/")).send()?.text()?;
    let card = overview
        .split("data-cloud-link")
        .nth(1)
        .expect("a cloud link card");
    assert!(
        card.contains("offline") && card.contains("Events waiting"),
        "{card}"
    );

    // Back: every event arrives, once, in order.
    cloud.restart()?;
    link_reaches(&depot, &local, "online");
    let events = wait_for(Duration::from_secs(60), "the offline events", || {
        let events = cloud.get(&api, "/api/v1/depots/north/events?limit=1000")["events"]
            .as_array()?
            .clone();
        let offline = events
            .iter()
            .filter(|e| {
                e["json"]["action"] == "token.create"
                    && e["json"]["target"]
                        .as_str()
                        .is_some_and(|t| t.starts_with("offline-"))
            })
            .count();
        (offline == 5).then_some(events)
    });
    let mut ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    let sequences: Vec<u64> = events
        .iter()
        .map(|e| e["sequence"].as_u64().unwrap())
        .collect();
    assert!(sequences.windows(2).all(|w| w[0] < w[1]), "{sequences:?}");
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), events.len(), "no event stored twice");
    wait_for(Duration::from_secs(30), "the outbox to drain", || {
        (depot_get(&depot, &local, "/api/v1/cloud")["outbox"]["pending"] == 0).then_some(())
    });

    // Removing the override gives the depot back its own setting.
    let removed = http()
        .delete(cloud.server.url("/api/v1/depots/north/desired/site-limit"))
        .bearer_auth(&api)
        .send()?;
    assert_eq!(removed.status(), 200);
    wait_for(Duration::from_secs(30), "the override to go", || {
        (depot_get(&depot, &local, "/api/v1/charging/site")["limit_source"] == "config")
            .then_some(())
    });

    // A restarted depot resumes with its stored identity; the spent token is not needed.
    depot.terminate()?;
    let depot = start_depot(&depot_dir, &cloud.grpc_url(), None)?;
    link_reaches(&depot, &local, "online");

    // The token was spent: another machine cannot use it.
    let thief = start_depot(&temp.path().join("thief"), &cloud.grpc_url(), Some(&token))?;
    let thief_token = thief.token("admin");
    let refused = link_reaches(&thief, &thief_token, "not_enrolled");
    assert!(
        refused["link"]["error"]
            .as_str()
            .unwrap()
            .contains("already used"),
        "{refused}"
    );

    // Revoked: the next session is refused and the depot says why.
    cloud.tool(&["revoke", "--depot", "north"])?;
    let revoked = link_reaches(&depot, &local, "offline");
    wait_for(Duration::from_secs(30), "the revocation to show", || {
        let v = depot_get(&depot, &local, "/api/v1/cloud");
        v["link"]["error"]
            .as_str()
            .is_some_and(|e| e.contains("revoked"))
            .then_some(())
    });
    assert!(
        cloud.get(&api, "/api/v1/depots/north")["revoked_ms"].is_i64(),
        "{revoked}"
    );
    let audit = cloud.get(&api, "/api/v1/audit?limit=100");
    let actions: Vec<&str> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    for action in [
        "depot.enroll_token",
        "depot.enrolled",
        "desired.set",
        "desired.remove",
        "depot.revoke",
    ] {
        assert!(
            actions.contains(&action),
            "{action} missing from {actions:?}"
        );
    }
    Ok(())
}

#[test]
fn the_fleet_api_needs_a_role_for_every_route() -> Result<()> {
    let temp = tempfile::tempdir()?;
    let cloud = Cloud::start(&temp.path().join("cloud"), None, &[])?;
    let viewer = cloud.tool(&["token", "--role", "viewer", "--name", "v"])?;
    let none = http().get(cloud.server.url("/api/v1/depots")).send()?;
    assert_eq!(none.status(), 401);
    let wrong = http()
        .get(cloud.server.url("/api/v1/depots"))
        .bearer_auth("nope")
        .send()?;
    assert_eq!(wrong.status(), 401);
    assert_eq!(
        http()
            .get(cloud.server.url("/api/v1/depots"))
            .bearer_auth(&viewer)
            .send()?
            .status(),
        200
    );
    let denied = http()
        .post(cloud.server.url("/api/v1/enroll-tokens"))
        .bearer_auth(&viewer)
        .json(&json!({ "depot": "x" }))
        .send()?;
    assert_eq!(denied.status(), 403);
    let admin = cloud.api_token();
    let malformed = http()
        .post(cloud.server.url("/api/v1/enroll-tokens"))
        .bearer_auth(&admin)
        .header("content-type", "application/json")
        .body("{\"depot\": ")
        .send()?;
    assert_eq!(malformed.status(), 400);
    let bad_name = http()
        .post(cloud.server.url("/api/v1/enroll-tokens"))
        .bearer_auth(&admin)
        .json(&json!({ "depot": "two words" }))
        .send()?;
    assert_eq!(bad_name.status(), 422);
    let unknown = http()
        .put(cloud.server.url("/api/v1/depots/nowhere/desired/tariff"))
        .bearer_auth(&admin)
        .json(&json!({ "prices_per_kwh": vec![0.1; 96] }))
        .send()?;
    assert_eq!(unknown.status(), 404);
    // Fleet rollouts: a role for each route, operators to change, clear refusals.
    for (method, path) in [
        ("GET", "/api/v1/fleet-rollouts"),
        ("POST", "/api/v1/fleet-rollouts"),
        ("GET", "/api/v1/fleet-rollouts/fr-1"),
        ("POST", "/api/v1/fleet-rollouts/fr-1/halt"),
    ] {
        let url = cloud.server.url(path);
        let anonymous = match method {
            "GET" => http().get(&url),
            _ => http().post(&url).json(&json!({})),
        }
        .send()?;
        assert_eq!(anonymous.status(), 401, "{method} {path}");
        if method == "POST" {
            let viewer_post = http()
                .post(&url)
                .bearer_auth(&viewer)
                .json(&json!({}))
                .send()?;
            assert_eq!(viewer_post.status(), 403, "{method} {path}");
        }
    }
    let malformed = http()
        .post(cloud.server.url("/api/v1/fleet-rollouts"))
        .bearer_auth(&admin)
        .header("content-type", "application/json")
        .body("{\"hardware_id\": ")
        .send()?;
    assert_eq!(malformed.status(), 400);
    let missing = http()
        .get(cloud.server.url("/api/v1/fleet-rollouts/fr-none"))
        .bearer_auth(&viewer)
        .send()?;
    assert_eq!(missing.status(), 404);
    let no_command = http()
        .post(cloud.server.url("/api/v1/fleet-rollouts/fr-none/launch"))
        .bearer_auth(&admin)
        .send()?;
    assert_eq!(no_command.status(), 404);
    Ok(())
}

#[test]
fn an_independent_grpc_client_enrols_and_syncs_through_reflection() -> Result<()> {
    let temp = tempfile::tempdir()?;
    let cloud = Cloud::start(&temp.path().join("cloud"), None, &[])?;
    let api = cloud.api_token();
    let ca = cloud.get(&api, "/api/v1/ca");
    let ca_file = temp.path().join("ca.pem");
    std::fs::write(&ca_file, ca["certificate_pem"].as_str().unwrap())?;
    let token = cloud.enroll_token("py-depot");
    assert!(
        token.ends_with(ca["sha256"].as_str().unwrap()),
        "the token pins the CA"
    );
    let (status, stdout, stderr) = run(python_peer("grpc_depot.py")
        .args(["--target", &format!("127.0.0.1:{}", cloud.grpc_port)])
        .arg("--ca")
        .arg(&ca_file)
        .args(["--token", &token]))?;
    assert!(status.success(), "the peer failed: {stderr}");
    let out: Value = serde_json::from_str(&stdout)?;
    assert_eq!(
        out["health"]["atlasmesh.sync.v1.DepotSync"], "SERVING",
        "{out}"
    );
    assert_eq!(out["health"]["atlasmesh.sync.v1.Enrollment"], "SERVING");
    assert_eq!(out["health_unknown"], "NOT_FOUND");
    for service in [
        "atlasmesh.sync.v1.DepotSync",
        "atlasmesh.sync.v1.Enrollment",
        "grpc.health.v1.Health",
    ] {
        assert!(
            out["services"]
                .as_array()
                .unwrap()
                .contains(&json!(service)),
            "{out}"
        );
    }
    assert_eq!(out["wrong_token"][0], "UNAUTHENTICATED");
    assert_eq!(out["bad_csr"][0], "INVALID_ARGUMENT");
    assert_eq!(out["enrolled"]["depot_name"], "py-depot");
    assert_eq!(out["enrolled"]["cn"], out["enrolled"]["depot_id"]);
    assert_eq!(out["enrolled"]["same_key"], true);
    assert_eq!(out["reused_token"][0], "UNAUTHENTICATED");
    assert!(
        out["reused_token"][1]
            .as_str()
            .unwrap()
            .contains("already used")
    );
    assert_eq!(
        out["session"],
        json!(["welcome", "events_ack:2", "events_ack:2"])
    );
    assert_eq!(out["no_client_cert"], "UNAUTHENTICATED");
    let events = cloud.get(&api, "/api/v1/depots/py-depot/events");
    assert_eq!(events["events"].as_array().unwrap().len(), 2, "{events}");
    Ok(())
}

/// The admin URL of the PostgreSQL that `tests/run` starts.
fn postgres_admin_url() -> String {
    std::env::var("ATLASMESH_TEST_POSTGRES_URL").expect(
        "ATLASMESH_TEST_POSTGRES_URL is unset: run tests/run, which starts PostgreSQL for the tests",
    )
}

fn fresh_postgres_database() -> Result<String> {
    let admin = postgres_admin_url();
    let name = format!("atlasmesh_test_{}", hex::encode(rand::random::<[u8; 6]>()));
    let (status, _, stderr) = run(std::process::Command::new("psql").arg(&admin).args([
        "-v",
        "ON_ERROR_STOP=1",
        "-c",
        &format!("CREATE DATABASE {name}"),
    ]))?;
    if !status.success() {
        bail!("creating database {name}: {stderr}");
    }
    let (base, query) = admin
        .split_once('?')
        .map_or((admin.as_str(), ""), |(b, q)| (b, q));
    let base = base.rsplit_once('/').map_or(base, |(b, _)| b);
    Ok(if query.is_empty() {
        format!("{base}/{name}")
    } else {
        format!("{base}/{name}?{query}")
    })
}

#[test]
fn two_cloud_instances_share_one_postgresql_and_renew_depot_certificates() -> Result<()> {
    let url = fresh_postgres_database()?;
    let temp = tempfile::tempdir()?;
    // Short certificates, so the depot renews during the test (after two thirds: 16 s).
    let env = [("ATLASMESH_CLOUD__DEPOT_CERT_LIFETIME", "24s")];
    let a = Cloud::start(&temp.path().join("a"), Some(&url), &env)?;
    let b = Cloud::start(&temp.path().join("b"), Some(&url), &env)?;
    let api = a.api_token();
    // One CA for the fleet, whichever instance is asked.
    assert_eq!(
        a.get(&api, "/api/v1/ca")["sha256"],
        b.get(&api, "/api/v1/ca")["sha256"]
    );
    let token = b.enroll_token("south");
    let depot_dir = temp.path().join("depot");
    let depot = start_depot(&depot_dir, &a.grpc_url(), Some(&token))?;
    let local = depot.token("admin");
    link_reaches(&depot, &local, "online");

    // A change through instance B reaches the depot whose session instance A holds.
    let tariff: Vec<f64> = (0..96).map(|q| if q < 24 { 0.08 } else { 0.3 }).collect();
    let put = http()
        .put(b.server.url("/api/v1/depots/south/desired/tariff"))
        .bearer_auth(&api)
        .json(&json!({ "prices_per_kwh": tariff }))
        .send()?;
    assert_eq!(put.status(), 200, "{}", put.text()?);
    wait_for(
        Duration::from_secs(30),
        "the tariff to reach the depot",
        || {
            let site = depot_get(&depot, &local, "/api/v1/charging/site");
            (site["tariff_source"] == "cloud" && site["tariff"][0] == 0.08).then_some(())
        },
    );
    // The depot acknowledges after applying, and the cloud stores that a moment later.
    wait_for(
        Duration::from_secs(30),
        "instance B to see the depot's acknowledgement",
        || (b.get(&api, "/api/v1/depots/south")["acked_revision"] == 1).then_some(()),
    );

    let first: Value =
        serde_json::from_slice(&std::fs::read(depot_dir.join("cloud/credentials.json"))?)?;
    let renewed = wait_for(
        Duration::from_secs(60),
        "the certificate to be renewed",
        || {
            let now: Value = serde_json::from_slice(
                &std::fs::read(depot_dir.join("cloud/credentials.json")).ok()?,
            )
            .ok()?;
            (now["certificate_pem"] != first["certificate_pem"]).then_some(now)
        },
    );
    assert_ne!(
        renewed["key_pem"], first["key_pem"],
        "a renewal uses a fresh key"
    );
    link_reaches(&depot, &local, "online");
    let audit = b.get(&api, "/api/v1/audit?limit=100");
    assert!(
        audit["records"]
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["action"] == "depot.renewed"),
        "{audit}"
    );
    Ok(())
}

#[test]
fn the_fleet_api_serves_https_when_tls_is_on() -> Result<()> {
    let temp = tempfile::tempdir()?;
    let cloud = Cloud::start(
        &temp.path().join("cloud"),
        None,
        &[("ATLASMESH_TLS__ENABLED", "true")],
    )?;
    assert_eq!(cloud.server.scheme, "https");
    let api = cloud.api_token();
    assert_eq!(cloud.get(&api, "/api/v1/depots")["depots"], json!([]));
    let plain = http()
        .get(format!("http://{}/api/v1/depots", cloud.server.addr))
        .bearer_auth(&api)
        .send();
    assert!(
        plain.is_err() || !plain?.status().is_success(),
        "no plain HTTP beside HTTPS"
    );
    Ok(())
}

#[test]
fn the_fleet_panel_lists_depots_after_sign_in_with_a_fleet_token() -> Result<()> {
    let temp = tempfile::tempdir()?;
    let cloud = Cloud::start(&temp.path().join("cloud"), None, &[])?;
    let viewer = cloud.tool(&["token", "--role", "viewer", "--name", "panel"])?;
    cloud.enroll_token("east");
    let browser = atlasmesh_tests::http_with_cookies();
    let first = browser.get(cloud.server.url("/")).send()?;
    assert_eq!(first.status(), 303, "signed out: to the sign-in page");
    let refused = browser
        .post(cloud.server.url("/login"))
        .form(&[("token", "0123abcd")])
        .send()?;
    assert_eq!(refused.status(), 401);
    let signed_in = browser
        .post(cloud.server.url("/login"))
        .form(&[("token", viewer.as_str())])
        .send()?;
    assert_eq!(signed_in.status(), 303);
    let cookie = signed_in.headers()["set-cookie"].to_str()?.to_owned();
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    let page = browser.get(cloud.server.url("/")).send()?.text()?;
    let row = page
        .split("data-depot=\"east\"")
        .nth(1)
        .expect("a row for the depot");
    assert!(row.contains("not enrolled"), "{row}");
    let out = browser.post(cloud.server.url("/logout")).send()?;
    assert_eq!(out.status(), 303);
    assert_eq!(browser.get(cloud.server.url("/")).send()?.status(), 303);
    Ok(())
}

/// The depot's staged images, as `hardware/version`.
fn staged_images(depot: &Server, token: &str) -> Vec<String> {
    depot_get(depot, token, "/api/v1/images")["images"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|i| {
                    format!(
                        "{}/{}",
                        i["hardware_id"].as_str().unwrap_or(""),
                        i["version"].as_str().unwrap_or("")
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `atlasmesh cloud repository`: the cloud in `cloud_dir` pins the fleet's root and takes its
/// online keys (release engineering keeps root and targets offline).
fn pin_repository(fleet: &atlasmesh_tests::ota::Fleet, cloud_dir: &Path) -> Result<()> {
    let mut setup = atlasmesh();
    setup
        .args(["cloud", "repository", "--root"])
        .arg(fleet.root())
        .arg("--keys")
        .arg(&fleet.keys)
        .arg("--data-dir")
        .arg(cloud_dir);
    let (status, _, stderr) = run(&mut setup)?;
    assert!(status.success(), "{stderr}");
    Ok(())
}

fn post_bundle(cloud: &Cloud, token: &str, bundle: Vec<u8>) -> reqwest::blocking::Response {
    http()
        .post(cloud.server.url("/api/v1/releases"))
        .bearer_auth(token)
        .header("content-type", "application/x-tar")
        .body(bundle)
        .send()
        .expect("release upload")
}

#[test]
fn a_release_published_in_the_cloud_is_staged_on_two_depots_fetching_only_missing_chunks()
-> Result<()> {
    use atlasmesh_tests::ota::{Fleet, random_bytes, variant};
    let temp = tempfile::tempdir()?;
    // Release engineering: keys and repository, root and targets signed offline.
    let fleet = Fleet::new()?;
    let v1 = random_bytes(3 << 20, 81);
    fleet.add("av-compute", "1.0.0", &v1, &[])?;
    let bundle_v1 = std::fs::read(fleet.bundle("av-compute", "1.0.0")?)?;

    // The cloud pins the fleet root and takes only the online keys.
    let cloud_dir = temp.path().join("cloud");
    pin_repository(&fleet, &cloud_dir)?;
    let keys_dir = cloud_dir.join("repository/keys");
    let mut taken: Vec<String> = std::fs::read_dir(&keys_dir)?
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    taken.sort();
    assert_eq!(taken, ["certifier.pem", "snapshot.pem", "timestamp.pem"]);
    for key in &taken {
        let mode = std::fs::metadata(keys_dir.join(key))?.permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{key}");
    }
    let cloud = Cloud::start(&cloud_dir, None, &[])?;
    let api = cloud.api_token();

    // A tampered image in the bundle is refused and nothing is published.
    let mut tampered = bundle_v1.clone();
    let at = tampered.len() - 4096;
    tampered[at] ^= 0x40;
    let refused = post_bundle(&cloud, &api, tampered);
    assert_eq!(refused.status(), 422, "{}", refused.text()?);
    assert_eq!(
        cloud.get(&api, "/api/v1/releases")["releases"],
        json!([]),
        "a refused upload publishes nothing"
    );
    let imported = post_bundle(&cloud, &api, bundle_v1.clone());
    assert_eq!(imported.status(), 201);
    let imported: Value = imported.json()?;
    let chunks_v1 = imported["release"]["chunks"].as_u64().unwrap();
    assert_eq!(imported["new_chunks"].as_u64(), Some(chunks_v1));
    assert!(
        imported["signed"]["snapshot_version"].as_u64() > Some(1),
        "{imported}"
    );
    assert_eq!(
        post_bundle(&cloud, &api, bundle_v1).status(),
        409,
        "a release is published once"
    );

    // Without a depot certificate the repository says nothing.
    let ca = cloud.get(&api, "/api/v1/ca");
    let stranger = reqwest::blocking::Client::builder()
        .add_root_certificate(reqwest::Certificate::from_pem(
            ca["certificate_pem"].as_str().unwrap().as_bytes(),
        )?)
        .build()?;
    let anonymous = stranger
        .get(format!(
            "{}/repository/metadata/timestamp.json",
            cloud.grpc_url()
        ))
        .send()?;
    assert_eq!(anonymous.status(), 401);

    // Two depots enrol; the release is staged on both through their own verification.
    let mut depots = Vec::new();
    for name in ["north", "south"] {
        let token = cloud.enroll_token(name);
        let depot = start_depot(&temp.path().join(name), &cloud.grpc_url(), Some(&token))?;
        let local = depot.token("admin");
        link_reaches(&depot, &local, "online");
        depots.push((depot, local));
    }
    let stage = http()
        .post(cloud.server.url("/api/v1/releases/av-compute/1.0.0/stage"))
        .bearer_auth(&api)
        .json(&json!({ "depots": ["north", "south"] }))
        .send()?;
    assert_eq!(stage.status(), 200, "{}", stage.text()?);
    for (depot, local) in &depots {
        let start = Instant::now();
        while !staged_images(depot, local).contains(&"av-compute/1.0.0".to_owned()) {
            if start.elapsed() > Duration::from_secs(90) {
                let logs: Vec<String> = depot
                    .logs()
                    .into_iter()
                    .filter(|l| !l.contains("\"message\":\"request\""))
                    .collect();
                panic!(
                    "the release did not reach the depot; its log ends:\n{}",
                    logs[logs.len().saturating_sub(30)..].join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        let metrics = depot.metrics()?;
        let fetched = atlasmesh_tests::metric_sum(
            &metrics,
            "atlasmesh_ota_cloud_chunk_bytes_total",
            &["source=\"fetched\""],
        );
        assert_eq!(
            fetched as usize,
            v1.len(),
            "a new depot fetches every chunk once"
        );
        // The cloud certified the depot's director root; the depot installed it.
        wait_for(Duration::from_secs(30), "the director certificate", || {
            let director = depot_get(depot, local, "/api/v1/ota/director");
            director["certificate"]["depot_id"]
                .is_string()
                .then_some(())
        });
    }
    for name in ["north", "south"] {
        wait_for(
            Duration::from_secs(30),
            "the release reported as staged",
            || {
                let d = cloud.get(&api, &format!("/api/v1/depots/{name}"));
                let r = d["reported"]
                    .as_array()?
                    .iter()
                    .find(|r| r["kind"] == "release" && r["key"] == "av-compute/1.0.0")?
                    .clone();
                (r["json"]["state"] == "staged" && r["observed_generation"] == 1).then_some(())
            },
        );
    }

    // A new version that shares most of its chunks: north fetches only what changed.
    let v2 = variant(&v1, 7, 3, 2_000, 10_000);
    fleet.add("av-compute", "1.1.0", &v2, &[])?;
    let imported: Value = post_bundle(
        &cloud,
        &api,
        std::fs::read(fleet.bundle("av-compute", "1.1.0")?)?,
    )
    .json()?;
    let (chunks_v2, new_v2) = (
        imported["release"]["chunks"].as_u64().unwrap(),
        imported["new_chunks"].as_u64().unwrap(),
    );
    assert!(new_v2 > 0 && new_v2 * 4 < chunks_v2, "{imported}");
    let stage = http()
        .post(cloud.server.url("/api/v1/releases/av-compute/1.1.0/stage"))
        .bearer_auth(&api)
        .json(&json!({ "depots": ["north"] }))
        .send()?;
    assert_eq!(stage.status(), 200);
    let (north, local) = &depots[0];
    wait_for(Duration::from_secs(90), "1.1.0 on north", || {
        staged_images(north, local)
            .contains(&"av-compute/1.1.0".to_owned())
            .then_some(())
    });
    let metrics = north.metrics()?;
    let fetched = atlasmesh_tests::metric_sum(
        &metrics,
        "atlasmesh_ota_cloud_chunk_bytes_total",
        &["source=\"fetched\""],
    ) as usize
        - v1.len();
    let reused = atlasmesh_tests::metric_sum(
        &metrics,
        "atlasmesh_ota_cloud_chunk_bytes_total",
        &["source=\"reused\""],
    ) as usize;
    assert_eq!(fetched + reused, v2.len());
    assert!(
        fetched * 4 < v2.len(),
        "fetched {fetched} of {} bytes",
        v2.len()
    );
    assert!(!staged_images(&depots[1].0, &depots[1].1).contains(&"av-compute/1.1.0".to_owned()));
    Ok(())
}

fn post_json(cloud: &Cloud, token: &str, path: &str, body: Value) -> (u16, Value) {
    let response = http()
        .post(cloud.server.url(path))
        .bearer_auth(token)
        .json(&body)
        .send()
        .expect("fleet API request");
    let status = response.status().as_u16();
    (status, response.json().unwrap_or(Value::Null))
}

#[test]
fn a_fleet_rollout_runs_in_phases_over_depots_and_halts_before_the_next_phase_on_a_bad_release()
-> Result<()> {
    use atlasmesh_tests::ota::{Fleet, random_bytes};
    const HW: &str = "fleet-hw";
    const VEHICLES: usize = 6;
    let temp = tempfile::tempdir()?;
    let fleet = Fleet::new()?;
    let cloud_dir = temp.path().join("cloud");
    pin_repository(&fleet, &cloud_dir)?;
    // On PostgreSQL: fleet rollouts are stored with compare-and-set for shared databases.
    let database = fresh_postgres_database()?;
    let cloud = Cloud::start(&cloud_dir, Some(&database), &[])?;
    let api = cloud.api_token();
    for (version, seed) in [("2.0.0", 2), ("3.0.0", 3)] {
        fleet.add(HW, version, &random_bytes(200_000, seed), &[])?;
        let imported = post_bundle(&cloud, &api, std::fs::read(fleet.bundle(HW, version)?)?);
        assert_eq!(imported.status(), 201);
    }

    // Two depots, each with its own simulated vehicles on 1.0.0; 3.0.0 fails every install.
    let mut depots = Vec::new();
    for name in ["north", "south"] {
        let token = cloud.enroll_token(name);
        let depot = start_depot_with(
            &temp.path().join(name),
            &cloud.grpc_url(),
            Some(&token),
            &[
                // Simulated vehicles live ten times fast and dock for seconds, not hours.
                ("ATLASMESH_CANARY__INSTALL_ESTIMATE", "1s"),
                ("ATLASMESH_CANARY__DEPARTURE_MARGIN", "0s"),
            ],
        )?;
        let local = depot.token("admin");
        link_reaches(&depot, &local, "online");
        let mut sim = atlasmesh();
        sim.args(["sim", "--depot", &depot.url("/"), "--vehicles"])
            .arg(VEHICLES.to_string())
            .args(["--sim-second", "100ms", "--seed", "5", "--sim-hardware", HW])
            .args(["--sim-version", "1.0.0", "--fail", "3.0.0=1.0"])
            .env("ATLASMESH_TOKEN", &local)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null());
        if let Some(mqtt) = &depot.mqtt {
            sim.args(["--mqtt", &format!("mqtt://{mqtt}")]);
        }
        let sim = atlasmesh_tests::Sim(sim.spawn()?);
        depots.push((name, depot, local, sim));
    }
    let running = |depot: &Server, local: &str, version: &str| {
        depot_get(depot, local, "/api/v1/vehicles")["vehicles"]
            .as_array()
            .map_or(0, |a| {
                a.iter()
                    .filter(|v| v["installed_version"] == version)
                    .count()
            })
    };
    for (_, depot, local, _) in &depots {
        wait_for(Duration::from_secs(60), "the simulated vehicles", || {
            (running(depot, local, "1.0.0") == VEHICLES).then_some(())
        });
    }

    let depot_plan = json!({
        "waves": [{"count": 3}, {"percent": 100}],
        "gate": {"threshold": 0.8, "confidence": 0.8},
        "soak": "1s",
        "vehicle_deadline": "60s",
        "max_concurrent": 10,
    });
    let request = |version: &str| {
        json!({
            "hardware_id": HW,
            "version": version,
            "phases": [
                {"name": "canary", "depots": ["north"]},
                {"name": "all", "depots": ["south"]},
            ],
            "gate": {"threshold": 0.8, "confidence": 0.8},
            "soak": "2s",
            "depot_plan": depot_plan,
        })
    };
    // Refusals change nothing.
    let (status, body) = post_json(&cloud, &api, "/api/v1/fleet-rollouts", request("9.9.9"));
    assert_eq!(status, 422, "{body}");
    let mut unknown = request("2.0.0");
    unknown["phases"][1]["depots"] = json!(["nowhere"]);
    let (status, body) = post_json(&cloud, &api, "/api/v1/fleet-rollouts", unknown);
    assert_eq!(status, 404, "{body}");
    let mut bad_plan = request("2.0.0");
    bad_plan["depot_plan"] = json!({"waves": "many"});
    let (status, body) = post_json(&cloud, &api, "/api/v1/fleet-rollouts", bad_plan);
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("depot_plan"),
        "{body}"
    );
    assert_eq!(
        cloud.get(&api, "/api/v1/fleet-rollouts")["fleet_rollouts"],
        json!([])
    );

    // A good release: the canary depot first, then the rest once it completed and soaked.
    let (status, good) = post_json(&cloud, &api, "/api/v1/fleet-rollouts", request("2.0.0"));
    assert_eq!(status, 201, "{good}");
    let good_id = good["id"].as_str().unwrap().to_owned();
    assert_eq!(good["phase"], "canary");
    let (status, twice) = post_json(&cloud, &api, "/api/v1/fleet-rollouts", request("3.0.0"));
    assert_eq!(
        status, 409,
        "one fleet rollout per hardware at a time: {twice}"
    );
    let south_slice = |id: &str| {
        cloud.get(&api, "/api/v1/depots/south")["desired"]
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["kind"] == "rollout_slice" && d["key"] == id)
    };
    let path = format!("/api/v1/fleet-rollouts/{good_id}");
    let mut south_waited = false;
    let done = wait_for(
        Duration::from_secs(180),
        "the good release everywhere",
        || {
            let r = cloud.get(&api, &path);
            if r["status"] == "halted" {
                let (_, north, local, _) = &depots[0];
                let mine = depot_get(north, local, "/api/v1/rollouts");
                let id = mine["rollouts"][0]["id"].as_i64().unwrap_or(0);
                panic!(
                    "halted: {r}\nnorth's rollout: {}",
                    depot_get(north, local, &format!("/api/v1/rollouts/{id}"))
                );
            }
            let north = &r["depots"][0];
            if north["state"] != "completed" {
                // While the canary depot is at it, the next phase has not started.
                assert!(!south_slice(&good_id), "{r}");
                south_waited = true;
            }
            (r["status"] == "completed").then_some(r)
        },
    );
    assert!(south_waited);
    for d in done["depots"].as_array().unwrap() {
        assert_eq!(d["state"], "completed", "{done}");
        assert_eq!(d["tally"]["successes"], VEHICLES, "{done}");
    }
    assert_eq!(done["gate"]["verdict"], "pass");
    assert_eq!(done["gate"]["tally"]["successes"], 2 * VEHICLES);
    let log: Vec<&Value> = done["log"].as_array().unwrap().iter().collect();
    assert!(
        log.iter().any(|e| e["entry"]["decisions"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|d| d["decision"] == "start_phase" && d["phase"] == "all")),
        "{done}"
    );
    for (_, depot, local, _) in &depots {
        wait_for(Duration::from_secs(30), "2.0.0 on every vehicle", || {
            (running(depot, local, "2.0.0") == VEHICLES).then_some(())
        });
        let local_rollouts = depot_get(depot, local, "/api/v1/rollouts");
        assert!(
            local_rollouts
                .to_string()
                .contains(&format!("cloud:fleet/{good_id}")),
            "the depot ran its own rollout for the slice: {local_rollouts}"
        );
    }

    // A bad release halts at the canary depot; the other phase never starts.
    let (status, bad) = post_json(&cloud, &api, "/api/v1/fleet-rollouts", request("3.0.0"));
    assert_eq!(status, 201, "{bad}");
    let bad_id = bad["id"].as_str().unwrap().to_owned();
    let halted = wait_for(Duration::from_secs(120), "the bad release to halt", || {
        let r = cloud.get(&api, &format!("/api/v1/fleet-rollouts/{bad_id}"));
        (r["status"] == "halted").then_some(r)
    });
    assert!(
        halted["reason"]
            .as_str()
            .unwrap()
            .contains("depot north halted in phase canary"),
        "{halted}"
    );
    assert_eq!(halted["depots"][1]["action"], Value::Null, "{halted}");
    assert!(!south_slice(&bad_id), "south was never told to run 3.0.0");
    let (_, south, south_local, _) = &depots[1];
    assert_eq!(running(south, south_local, "2.0.0"), VEHICLES);
    // A halted fleet rollout takes no more commands but a new rollout may start.
    let (status, _) = post_json(
        &cloud,
        &api,
        &format!("/api/v1/fleet-rollouts/{bad_id}/resume"),
        json!({}),
    );
    assert_eq!(status, 409);

    // The fleet panel shows both, with each depot's part.
    let panel = atlasmesh_tests::http_with_cookies();
    panel
        .post(cloud.server.url("/login"))
        .form(&[("token", api.as_str())])
        .send()?;
    let page = panel
        .get(cloud.server.url("/fleet-rollouts"))
        .send()?
        .text()?;
    let card = page
        .split(&format!("data-fleet-rollout=\"{bad_id}\""))
        .nth(1)
        .expect("the bad rollout on the panel");
    assert!(
        card.contains("halted") && card.contains("depot north halted"),
        "{card}"
    );
    assert!(page.contains(&format!("data-fleet-rollout=\"{good_id}\"")));
    let releases = panel.get(cloud.server.url("/releases")).send()?.text()?;
    assert!(releases.contains(&format!("data-release=\"{HW}/3.0.0\"")));
    let audit = cloud.get(&api, "/api/v1/audit?limit=200").to_string();
    assert!(audit.contains("fleet_rollout.create"), "{audit}");
    Ok(())
}

/// Every event of a depot the cloud holds, following its pages.
fn all_events(cloud: &Cloud, token: &str, depot: &str) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    loop {
        let after = out.last().map_or(0, |e| e["sequence"].as_i64().unwrap());
        let page = cloud.get(
            token,
            &format!("/api/v1/depots/{depot}/events?after={after}&limit=1000"),
        )["events"]
            .as_array()
            .cloned()
            .unwrap_or_default();
        if page.is_empty() {
            return out;
        }
        out.extend(page);
    }
}

#[test]
fn ten_thousand_events_made_while_the_cloud_is_down_arrive_exactly_once_and_a_killed_depot_resumes_from_its_acknowledged_revision()
-> Result<()> {
    const PER_DEPOT: usize = 5_000;
    let temp = tempfile::tempdir()?;
    // On PostgreSQL: the first test covers the cloud's SQLite store through the same outage.
    let database = fresh_postgres_database()?;
    let mut cloud = Cloud::start(&temp.path().join("cloud"), Some(&database), &[])?;
    let api = cloud.api_token();
    let mut depots = Vec::new();
    for name in ["north", "south"] {
        let token = cloud.enroll_token(name);
        let depot_id = format!("{name}-depot");
        let depot = start_depot_with(
            &temp.path().join(name),
            &cloud.grpc_url(),
            Some(&token),
            &[("ATLASMESH_DEPOT__ID", depot_id.as_str())],
        )?;
        let local = depot.token("admin");
        link_reaches(&depot, &local, "online");
        let registered: Value = http()
            .post(depot.url("/api/v1/vehicles"))
            .bearer_auth(&local)
            .json(&json!({"id": "veh-1", "hardware_id": "hw"}))
            .send()?
            .json()?;
        let password = registered["mqtt"]["password"].as_str().unwrap().to_owned();
        depots.push((name, depot_id, depot, local, password));
    }
    for (name, ..) in &depots {
        wait_for(Duration::from_secs(30), "the first events", || {
            (cloud.get(&api, &format!("/api/v1/depots/{name}"))["events_stored"]
                .as_i64()
                .unwrap_or(0)
                > 0)
            .then_some(())
        });
    }

    // The cloud dies hard; each depot's vehicle reports 5,000 install steps meanwhile.
    cloud.server.kill9()?;
    let publishers: Vec<std::process::Child> = depots
        .iter()
        .map(|(_, depot_id, depot, _, password)| {
            let port = depot
                .mqtt
                .as_deref()
                .unwrap()
                .rsplit(':')
                .next()
                .unwrap()
                .to_owned();
            python_peer("mqtt_vehicle.py")
                .args([
                    "publish",
                    "--port",
                    &port,
                    "--vehicle",
                    "veh-1",
                    "--password",
                ])
                .arg(password)
                .arg("--topic")
                .arg(format!("atlasmesh/v1/depots/{depot_id}/vehicles/veh-1/ota"))
                .args([
                    "--payload",
                    r#"{"version":"2.0.0","phase":"install","outcome":"started","ts_ms":{n}}"#,
                    "--count",
                ])
                .arg(PER_DEPOT.to_string())
                .stdout(std::process::Stdio::piped())
                .spawn()
                .expect("the MQTT peer")
        })
        .collect();
    for p in publishers {
        let out = p.wait_with_output()?;
        let result: Value = serde_json::from_slice(&out.stdout)?;
        assert_eq!(result["acked"], PER_DEPOT, "{result}");
    }
    for (_, _, depot, local, _) in &depots {
        wait_for(Duration::from_secs(60), "the events in the outbox", || {
            let v = depot_get(depot, local, "/api/v1/cloud");
            (v["link"]["state"] == "offline"
                && v["outbox"]["pending"].as_u64().unwrap_or(0) >= PER_DEPOT as u64)
                .then_some(())
        });
    }

    // Back: every event arrives exactly once, in order, none lost.
    cloud.restart()?;
    for (name, _, depot, local, _) in &depots {
        wait_for(Duration::from_secs(120), "the outbox to drain", || {
            (depot_get(depot, local, "/api/v1/cloud")["outbox"]["pending"] == 0).then_some(())
        });
        let events = all_events(&cloud, &api, name);
        let sequences: Vec<i64> = events
            .iter()
            .map(|e| e["sequence"].as_i64().unwrap())
            .collect();
        assert!(sequences.windows(2).all(|w| w[0] < w[1]));
        let mut ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
        ids.sort_unstable();
        ids.dedup();
        assert_eq!(ids.len(), events.len(), "no event stored twice");
        let mut reports: Vec<i64> = events
            .iter()
            .filter(|e| e["kind"] == "ota_report")
            .map(|e| e["json"]["vehicle_ts"].as_i64().unwrap())
            .collect();
        reports.sort_unstable();
        assert_eq!(
            reports,
            (1..=PER_DEPOT as i64).collect::<Vec<_>>(),
            "every report of {name} once"
        );
        let row = cloud.get(&api, &format!("/api/v1/depots/{name}"));
        assert_eq!(row["events_stored"].as_u64(), Some(events.len() as u64));
    }

    // A depot killed with desired state moving on resumes from its acknowledged revision:
    // the cloud sends only what changed since.
    let set_limit = |kw: f64| {
        let put = http()
            .put(cloud.server.url("/api/v1/depots/north/desired/site-limit"))
            .bearer_auth(&api)
            .json(&json!({ "limit_kw": kw }))
            .send()
            .unwrap();
        assert_eq!(put.status(), 200);
    };
    set_limit(60.0);
    let acked = wait_for(Duration::from_secs(30), "the acknowledgement", || {
        let d = cloud.get(&api, "/api/v1/depots/north");
        (d["acked_revision"] == d["desired_revision"])
            .then(|| d["acked_revision"].as_i64().unwrap())
    });
    let (_, _, north, local, _) = depots.remove(0);
    let data_dir = north.data_dir.clone();
    let mut north = north;
    north.kill9()?;
    let tariff: Vec<f64> = (0..96).map(|i| 0.1 + f64::from(i) / 1000.0).collect();
    let put = http()
        .put(cloud.server.url("/api/v1/depots/north/desired/tariff"))
        .bearer_auth(&api)
        .json(&json!({ "prices_per_kwh": tariff }))
        .send()?;
    assert_eq!(put.status(), 200);
    let north = start_depot(&data_dir, &cloud.grpc_url(), None)?;
    link_reaches(&north, &local, "online");
    wait_for(Duration::from_secs(30), "the new revision", || {
        let d = cloud.get(&api, "/api/v1/depots/north");
        (d["acked_revision"].as_i64() == Some(acked + 1)).then_some(())
    });
    let audit = depot_get(&north, &local, "/api/v1/audit?limit=50");
    let received: Vec<&Value> = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["action"] == "cloud.desired")
        .collect();
    let last = received
        .iter()
        .find(|r| r["target"] == format!("revision {}", acked + 1))
        .unwrap_or_else(|| panic!("{received:?}"));
    assert_eq!(last["detail"]["full"], false, "{last}");
    let objects = last["detail"]["objects"].as_array().unwrap();
    assert_eq!(objects.len(), 1, "only the change: {last}");
    assert_eq!(objects[0]["kind"], "tariff");
    let site = depot_get(&north, &local, "/api/v1/charging/site");
    assert_eq!(site["limit_kw"], 60.0, "the earlier revision still holds");
    Ok(())
}

#[test]
fn a_depot_killed_while_fetching_a_release_resumes_and_fetches_only_what_it_lacks() -> Result<()> {
    use atlasmesh_tests::ota::{Fleet, random_bytes};
    const LEN: usize = 24 << 20;
    let temp = tempfile::tempdir()?;
    let fleet = Fleet::new()?;
    let image = random_bytes(LEN, 91);
    fleet.add("av-compute", "4.0.0", &image, &[])?;
    let cloud_dir = temp.path().join("cloud");
    pin_repository(&fleet, &cloud_dir)?;
    let cloud = Cloud::start(&cloud_dir, None, &[])?;
    let api = cloud.api_token();
    let bundle = std::fs::read(fleet.bundle("av-compute", "4.0.0")?)?;
    assert_eq!(post_bundle(&cloud, &api, bundle).status(), 201);

    // A slow link (4 MB/s): the depot is killed a third of the way through.
    let depot_dir = temp.path().join("north");
    let token = cloud.enroll_token("north");
    let slow = [("ATLASMESH_OTA__DOWNLOAD_BYTES_PER_SECOND", "4000000")];
    let mut depot = start_depot_with(&depot_dir, &cloud.grpc_url(), Some(&token), &slow)?;
    let local = depot.token("admin");
    link_reaches(&depot, &local, "online");
    let stage = http()
        .post(cloud.server.url("/api/v1/releases/av-compute/4.0.0/stage"))
        .bearer_auth(&api)
        .json(&json!({ "depots": ["north"] }))
        .send()?;
    assert_eq!(stage.status(), 200);
    let fetched = |depot: &Server| {
        depot.metrics().map_or(0.0, |m| {
            atlasmesh_tests::metric_sum(
                &m,
                "atlasmesh_ota_cloud_chunk_bytes_total",
                &["source=\"fetched\""],
            )
        }) as usize
    };
    let before = wait_for(Duration::from_secs(60), "a third of the image", || {
        let f = fetched(&depot);
        (f >= LEN / 3).then_some(f)
    });
    assert!(before < LEN, "killed before the end: {before}");
    depot.kill9()?;

    // Restarted at full speed, it keeps what verifies and fetches the rest.
    let depot = start_depot(&depot_dir, &cloud.grpc_url(), None)?;
    wait_for(Duration::from_secs(90), "the release staged", || {
        staged_images(&depot, &local)
            .contains(&"av-compute/4.0.0".to_owned())
            .then_some(())
    });
    let after = fetched(&depot);
    assert!(
        after + LEN / 4 <= LEN,
        "fetched {after} of {LEN} bytes after the restart (had {before} before the kill)"
    );
    let staged = depot_get(&depot, &local, "/api/v1/images");
    let image_row = staged["images"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["version"] == "4.0.0")
        .unwrap()
        .clone();
    assert_eq!(
        image_row["length"].as_u64(),
        Some(LEN as u64),
        "{image_row}"
    );
    Ok(())
}
