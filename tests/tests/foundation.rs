//! The foundation: health, metrics, roles, sessions, CSRF, audit, configuration, store
//! durability, backup and restore, graceful shutdown, TLS. Each test starts the real binary.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use atlasmesh_tests::{
    Options, Server, atlasmesh, closed_pipe, http, mint_token, mint_token_command, panel_login, run,
};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn json_of(response: reqwest::blocking::Response) -> Value {
    let text = response.text().expect("body");
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"))
}

fn error_code(response: reqwest::blocking::Response) -> String {
    json_of(response)["error"]["code"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

fn open_store(server: &Server) -> rusqlite::Connection {
    rusqlite::Connection::open(server.data_dir.join("depot.db")).expect("opening the store file")
}

fn integrity(conn: &rusqlite::Connection) -> String {
    conn.query_row("PRAGMA integrity_check", [], |r| r.get(0))
        .unwrap()
}

#[test]
fn health_and_database_health_answer_json() {
    let depot = Server::depot();
    let client = http();
    let response = client.get(depot.url("/health")).send().unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let body = json_of(response);
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["mode"], "depot");
    assert!(
        body["version"].is_string() && body["uptime_seconds"].is_u64(),
        "{body}"
    );

    let body = json_of(client.get(depot.url("/health/database")).send().unwrap());
    assert_eq!(body["database"], "connected");
    assert!(body["schema_version"].as_i64().unwrap() >= 1);
}

#[test]
fn metrics_count_requests_by_route_and_status() {
    let depot = Server::depot();
    let client = http();
    for _ in 0..3 {
        assert_eq!(
            client.get(depot.url("/health")).send().unwrap().status(),
            StatusCode::OK
        );
    }
    assert_eq!(
        client
            .get(depot.url("/api/v1/status"))
            .send()
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        client
            .get(depot.url("/no/such/page"))
            .send()
            .unwrap()
            .status(),
        StatusCode::NOT_FOUND
    );

    let response = client.get(depot.url("/metrics")).send().unwrap();
    assert!(
        response.headers()["content-type"]
            .to_str()
            .unwrap()
            .contains("openmetrics-text")
    );
    let text = response.text().unwrap();
    for line in [
        r#"atlasmesh_http_requests_total{method="GET",route="/health",status="200"} 3"#,
        r#"atlasmesh_http_requests_total{method="GET",route="/api/v1/status",status="401"} 1"#,
        r#"atlasmesh_http_requests_total{method="GET",route="unmatched",status="404"} 1"#,
        r#"atlasmesh_http_request_duration_seconds_count{method="GET",route="/health"} 3"#,
        r#"atlasmesh_build_info{version="0.1.0",mode="depot"} 1"#,
    ] {
        assert!(
            text.lines().any(|l| l == line),
            "missing `{line}` in:\n{text}"
        );
    }
    assert!(text.trim_end().ends_with("# EOF"));

    // An independent implementation (prometheus_client's strict OpenMetrics parser) reads it.
    let (status, stdout, stderr) =
        run(atlasmesh_tests::python_peer("parse_metrics.py").arg(depot.url("/metrics"))).unwrap();
    assert!(status.success(), "the exposition does not parse: {stderr}");
    let samples: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let health = samples
        .iter()
        .find(|s| {
            s["name"] == "atlasmesh_http_requests_total"
                && s["labels"]["route"] == "/health"
                && s["labels"]["status"] == "200"
        })
        .expect("the /health counter");
    assert_eq!(health["value"], 3.0);
    assert!(
        samples
            .iter()
            .any(|s| s["family"] == "atlasmesh_http_request_duration_seconds"
                && s["type"] == "histogram")
    );
}

#[test]
fn api_needs_a_token_and_the_right_role() {
    let depot = Server::depot();
    let client = http();
    let status = depot.url("/api/v1/status");

    let response = client.get(&status).send().unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(response.headers().contains_key("www-authenticate"));
    assert_eq!(error_code(response), "unauthorized");
    let response = client
        .get(&status)
        .bearer_auth("amt_not-a-real-token")
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    // Unknown API paths are no way around authentication.
    let response = client
        .get(depot.url("/api/v1/no-such-thing"))
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);

    let viewer = depot.token("viewer");
    let technician = depot.token("technician");
    let admin = depot.token("admin");

    let body = json_of(client.get(&status).bearer_auth(&viewer).send().unwrap());
    assert!(
        body["depot"]["id"].as_str().unwrap().starts_with("depot-"),
        "{body}"
    );
    assert!(body["uptime_seconds"].is_u64() && body["version"].is_string());

    let new_user =
        json!({"username": "tech1", "password": "a long enough password", "role": "technician"});
    for token in [&viewer, &technician] {
        let response = client
            .post(depot.url("/api/v1/users"))
            .bearer_auth(token)
            .json(&new_user)
            .send()
            .unwrap();
        assert_eq!(response.status(), StatusCode::FORBIDDEN);
        assert_eq!(error_code(response), "forbidden");
    }
    let response = client
        .get(depot.url("/api/v1/audit"))
        .bearer_auth(&viewer)
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);

    let response = client
        .post(depot.url("/api/v1/users"))
        .bearer_auth(&admin)
        .json(&new_user)
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let response = client
        .post(depot.url("/api/v1/users"))
        .bearer_auth(&admin)
        .json(&new_user)
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::CONFLICT);

    // The token named `name` in the depot's list.
    let token_named = |name: &str| -> Value {
        let tokens = json_of(
            client
                .get(depot.url("/api/v1/tokens"))
                .bearer_auth(&admin)
                .send()
                .unwrap(),
        );
        tokens["tokens"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["name"] == name)
            .unwrap_or_else(|| panic!("no token {name}: {tokens}"))
            .clone()
    };

    // A revoked token stops working at once.
    let viewer_id = token_named("test-viewer")["id"].as_i64().unwrap();
    let response = client
        .delete(depot.url(&format!("/api/v1/tokens/{viewer_id}")))
        .bearer_auth(&admin)
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        client
            .get(&status)
            .bearer_auth(&viewer)
            .send()
            .unwrap()
            .status(),
        StatusCode::UNAUTHORIZED
    );

    // A token whose secret could not be printed (a full disk, a reader that has gone) is
    // revoked again, so no live token is left that nobody holds.
    let full = std::fs::File::options()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let mint = |name: &str| mint_token_command(&depot.data_dir, "admin", name);
    let (status, _, stderr) = run(mint("unseen-full").stdout(full)).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("No space left"), "{stderr}");
    assert!(
        stderr.contains("revoked API token \"unseen-full\""),
        "{stderr}"
    );
    let (status, _, stderr) = run(mint("unseen-pipe").stdout(closed_pipe())).unwrap();
    assert_eq!(status.code(), Some(141), "{stderr}");
    assert!(
        stderr.contains("revoked API token \"unseen-pipe\""),
        "{stderr}"
    );
    for name in ["unseen-full", "unseen-pipe"] {
        let token = token_named(name);
        assert_eq!(token["revoked"], true, "{token}");
    }
}

#[test]
fn panel_login_session_and_csrf() {
    let depot = Server::depot();
    let password = depot.admin_password();
    let (client, csrf) = panel_login(&depot, "admin", &password).unwrap();

    let overview = client.get(depot.url("/")).send().unwrap().text().unwrap();
    assert!(overview.contains("<h1>Overview</h1>"), "{overview}");

    // The session works for the API too, and reads need no CSRF token.
    let me = json_of(client.get(depot.url("/api/v1/me")).send().unwrap());
    assert_eq!(me["actor"], "user:admin");
    assert_eq!(me["via"], "session");

    // A change with the session cookie but without the CSRF token is refused and writes nothing.
    let body = json!({"name": "from-panel", "role": "viewer"});
    let response = client
        .post(depot.url("/api/v1/tokens"))
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let response = client
        .post(depot.url("/api/v1/tokens"))
        .header("x-csrf-token", "wrong")
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    let tokens = json_of(client.get(depot.url("/api/v1/tokens")).send().unwrap());
    assert_eq!(tokens["tokens"].as_array().unwrap().len(), 0);
    // With it, the change goes through.
    let response = client
        .post(depot.url("/api/v1/tokens"))
        .header("x-csrf-token", &csrf)
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);

    // The logout form without its CSRF token does not end the session.
    let response = client
        .post(depot.url("/logout"))
        .form(&[("csrf", "forged")])
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        client.get(depot.url("/")).send().unwrap().status(),
        StatusCode::OK
    );
    let response = client
        .post(depot.url("/logout"))
        .form(&[("csrf", csrf.as_str())])
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::SEE_OTHER);
    let response = client.get(depot.url("/")).send().unwrap();
    assert_eq!(
        response.status(),
        StatusCode::SEE_OTHER,
        "signed out users are sent to the login page"
    );
    assert_eq!(
        client.get(depot.url("/api/v1/me")).send().unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
}

#[test]
fn session_cookie_is_hardened() {
    let depot = Server::depot();
    let client = atlasmesh_tests::http_with_cookies();
    let page = client
        .get(depot.url("/login"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let csrf = atlasmesh_tests::csrf_from(&page).unwrap();
    let response = client
        .post(depot.url("/login"))
        .form(&[
            ("username", "admin"),
            ("password", depot.admin_password().as_str()),
            ("csrf", csrf.as_str()),
        ])
        .send()
        .unwrap();
    let cookie = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|c| c.starts_with("atlasmesh_session="))
        .expect("a session cookie");
    assert!(
        cookie.contains("HttpOnly") && cookie.contains("SameSite=Strict"),
        "{cookie}"
    );
    assert!(
        !cookie.contains("Secure"),
        "plain HTTP cannot set Secure cookies: {cookie}"
    );
}

#[test]
fn login_form_without_its_csrf_token_is_refused() {
    let depot = Server::depot();
    let client = atlasmesh_tests::http_with_cookies();
    client.get(depot.url("/login")).send().unwrap();
    let response = client
        .post(depot.url("/login"))
        .form(&[
            ("username", "admin"),
            ("password", depot.admin_password().as_str()),
            ("csrf", "forged"),
        ])
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::FORBIDDEN);
    assert_eq!(
        client.get(depot.url("/")).send().unwrap().status(),
        StatusCode::SEE_OTHER
    );
}

#[test]
fn failed_logins_are_rate_limited_and_audited() {
    let depot = Server::depot();
    let client = atlasmesh_tests::http_with_cookies();
    let attempt = |password: &str| {
        let page = client
            .get(depot.url("/login"))
            .send()
            .unwrap()
            .text()
            .unwrap();
        let csrf = atlasmesh_tests::csrf_from(&page).unwrap();
        client
            .post(depot.url("/login"))
            .form(&[
                ("username", "admin"),
                ("password", password),
                ("csrf", csrf.as_str()),
            ])
            .send()
            .unwrap()
            .status()
    };
    for _ in 0..5 {
        assert_eq!(attempt("wrong password"), StatusCode::UNAUTHORIZED);
    }
    // Over the limit even the right password is refused until the window passes.
    assert_eq!(
        attempt(&depot.admin_password()),
        StatusCode::TOO_MANY_REQUESTS
    );

    let admin = depot.token("admin");
    let audit = json_of(
        http()
            .get(depot.url("/api/v1/audit?action=session.login"))
            .bearer_auth(&admin)
            .send()
            .unwrap(),
    );
    let denied = audit["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["result"] == "denied")
        .count();
    assert_eq!(denied, 5);
    let metrics = http()
        .get(depot.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l == "atlasmesh_login_failures_total 5"),
        "{metrics}"
    );
}

#[test]
fn every_change_leaves_one_audit_record() {
    let depot = Server::depot();
    let client = http();
    let admin = depot.token("admin");
    let post = |path: &str, body: Value| {
        let r = client
            .post(depot.url(path))
            .bearer_auth(&admin)
            .json(&body)
            .send()
            .unwrap();
        let id = r.headers()["x-request-id"].to_str().unwrap().to_owned();
        (r.status(), id, json_of(r))
    };
    let (status, user_req, _) = post(
        "/api/v1/users",
        json!({"username": "ana", "password": "long password 1", "role": "viewer"}),
    );
    assert_eq!(status, StatusCode::CREATED);
    let (status, token_req, token) =
        post("/api/v1/tokens", json!({"name": "ci", "role": "viewer"}));
    assert_eq!(status, StatusCode::CREATED);
    let response = client
        .delete(depot.url(&format!("/api/v1/tokens/{}", token["id"])))
        .bearer_auth(&admin)
        .send()
        .unwrap();
    let revoke_req = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(response.status(), StatusCode::OK);
    let response = client
        .delete(depot.url("/api/v1/users/ana"))
        .bearer_auth(&admin)
        .send()
        .unwrap();
    let disable_req = response.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert_eq!(response.status(), StatusCode::OK);
    // A failed change is recorded as failed, and changes nothing.
    let response = client
        .delete(depot.url("/api/v1/users/nobody"))
        .bearer_auth(&admin)
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::NOT_FOUND);

    let audit = json_of(
        client
            .get(depot.url("/api/v1/audit"))
            .bearer_auth(&admin)
            .send()
            .unwrap(),
    );
    let records = audit["records"].as_array().unwrap();
    let find = |request_id: &str| -> Vec<&Value> {
        records
            .iter()
            .filter(|r| r["request_id"] == request_id)
            .collect()
    };
    for (request_id, action, target) in [
        (&user_req, "user.create", "ana"),
        (&token_req, "token.create", "ci"),
        (
            &revoke_req,
            "token.revoke",
            token["id"].to_string().as_str(),
        ),
        (&disable_req, "user.disable", "ana"),
    ] {
        let found = find(request_id);
        assert_eq!(found.len(), 1, "one record for {action}: {found:?}");
        let r = found[0];
        assert_eq!(r["action"], action);
        assert_eq!(r["target"], target);
        assert_eq!(r["actor"], "token:test-admin");
        assert_eq!(r["role"], "admin");
        assert_eq!(r["result"], "ok");
        assert!(r["at"].as_str().unwrap().ends_with('Z'));
    }
    let failed: Vec<&Value> = records.iter().filter(|r| r["target"] == "nobody").collect();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["result"], "failed");
    // The token minted on the command line is in the trail too.
    assert!(
        records
            .iter()
            .any(|r| r["action"] == "token.create"
                && r["actor"].as_str().unwrap().starts_with("cli:"))
    );
    // And the secret of a token never is.
    assert!(
        !audit
            .to_string()
            .contains(token["secret"].as_str().unwrap())
    );
}

#[test]
fn malformed_and_oversized_bodies_are_rejected_and_change_nothing() {
    let depot = Server::depot();
    let client = http();
    let admin = depot.token("admin");
    let users_before = json_of(
        client
            .get(depot.url("/api/v1/users"))
            .bearer_auth(&admin)
            .send()
            .unwrap(),
    );
    let audit_before = json_of(
        client
            .get(depot.url("/api/v1/audit"))
            .bearer_auth(&admin)
            .send()
            .unwrap(),
    );

    let response = client
        .post(depot.url("/api/v1/users"))
        .bearer_auth(&admin)
        .header("content-type", "application/json")
        .body(r#"{"username": "x", "password": "#)
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::BAD_REQUEST);
    assert_eq!(error_code(response), "malformed_json");

    let response = client
        .post(depot.url("/api/v1/users"))
        .bearer_auth(&admin)
        .json(&json!({"username": "x", "password": "long enough pw", "role": "wizard"}))
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNPROCESSABLE_ENTITY);

    // A client announcing a too-large body with `Expect: 100-continue` (as curl does) gets
    // the 413 before it sends a byte of it.
    let mut stream = TcpStream::connect(depot.addr).unwrap();
    write!(
        stream,
        "POST /api/v1/users HTTP/1.1\r\nHost: depot\r\nAuthorization: Bearer {admin}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nExpect: 100-continue\r\nConnection: close\r\n\r\n",
        2 * 1024 * 1024
    )
    .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 413"), "{response}");
    assert!(!response.contains("100 Continue"), "{response}");
    assert!(
        response.contains(r#""code":"payload_too_large""#),
        "{response}"
    );

    let response = client
        .post(depot.url("/api/v1/users"))
        .bearer_auth(&admin)
        .body("not json")
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);

    let users_after = json_of(
        client
            .get(depot.url("/api/v1/users"))
            .bearer_auth(&admin)
            .send()
            .unwrap(),
    );
    assert_eq!(users_before, users_after);
    let audit_after = json_of(
        client
            .get(depot.url("/api/v1/audit"))
            .bearer_auth(&admin)
            .send()
            .unwrap(),
    );
    assert_eq!(
        audit_before, audit_after,
        "rejected bodies must not write audit records either"
    );
}

#[test]
fn request_ids_and_trace_context_reach_the_response_and_the_log() {
    let depot = Server::depot();
    let trace = "4bf92f3577b34da6a3ce929d0e0e4736";
    let response = http()
        .get(depot.url("/api/v1/status"))
        .header("traceparent", format!("00-{trace}-00f067aa0ba902b7-01"))
        .header("x-request-id", "req-from-client-1")
        .send()
        .unwrap();
    assert_eq!(response.headers()["x-request-id"], "req-from-client-1");
    let traceparent = response.headers()["traceparent"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(
        traceparent.starts_with(&format!("00-{trace}-")),
        "{traceparent}"
    );
    assert_ne!(
        traceparent,
        format!("00-{trace}-00f067aa0ba902b7-01"),
        "our span id is our own"
    );

    std::thread::sleep(Duration::from_millis(200));
    let line = depot
        .logs()
        .into_iter()
        .find(|l| l.contains("req-from-client-1"))
        .expect("a log line for the request");
    let json: Value = serde_json::from_str(&line).expect("log lines are JSON");
    assert_eq!(json["span"]["trace_id"], trace);
    assert_eq!(json["span"]["request_id"], "req-from-client-1");
    assert_eq!(json["status"], 401);
}

#[test]
fn sigterm_lets_in_flight_requests_finish_and_closes_the_store() {
    let mut depot = Server::depot();
    let admin = depot.token("admin");
    let body = json!({"name": "in-flight", "role": "viewer"}).to_string();
    let (head, tail) = body.split_at(10);

    let mut stream = TcpStream::connect(depot.addr).unwrap();
    write!(
        stream,
        "POST /api/v1/tokens HTTP/1.1\r\nHost: depot\r\nAuthorization: Bearer {admin}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{head}",
        body.len()
    )
    .unwrap();
    stream.flush().unwrap();
    std::thread::sleep(Duration::from_millis(300));
    depot.signal("TERM").unwrap();
    std::thread::sleep(Duration::from_millis(300));
    // The server is draining: new connections are refused, but this request completes.
    assert!(
        TcpStream::connect(depot.addr).is_err(),
        "a draining depot accepts no new connections"
    );
    stream.write_all(tail.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    assert!(response.starts_with("HTTP/1.1 201"), "{response}");

    let status = depot.wait(Duration::from_secs(30)).unwrap();
    assert!(status.success(), "{status:?}");
    assert!(depot.logs().iter().any(|l| l.contains("stopped cleanly")));
    // A clean stop checkpoints the WAL: the store is one self-contained, intact file.
    assert!(!depot.data_dir.join("depot.db-wal").exists());
    let conn = open_store(&depot);
    assert_eq!(integrity(&conn), "ok");
    let n: i64 = conn
        .query_row(
            "SELECT count(*) FROM api_tokens WHERE name = 'in-flight'",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(n, 1);
}

/// Creates tokens through the API as fast as it can until stopped; returns the names the depot
/// acknowledged with 201.
fn writer(
    url: String,
    admin: String,
    stop: Arc<AtomicBool>,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let client = http();
        let mut acknowledged = Vec::new();
        let mut i = 0;
        while !stop.load(Ordering::Relaxed) {
            let name = format!("w{i}");
            i += 1;
            match client
                .post(&url)
                .bearer_auth(&admin)
                .json(&json!({"name": name, "role": "viewer"}))
                .send()
            {
                Ok(r) if r.status() == StatusCode::CREATED => acknowledged.push(name),
                Ok(r) => panic!("unexpected status {}", r.status()),
                Err(_) => break, // the depot went away
            }
        }
        acknowledged
    })
}

#[test]
fn kill_9_during_writes_loses_no_acknowledged_write() {
    let mut depot = Server::depot();
    let admin = depot.token("admin");
    let stop = Arc::new(AtomicBool::new(false));
    let handle = writer(depot.url("/api/v1/tokens"), admin.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(1500));
    depot.kill9().unwrap();
    stop.store(true, Ordering::Relaxed);
    let acknowledged = handle.join().unwrap();
    assert!(
        acknowledged.len() > 10,
        "the writer should have made progress: {}",
        acknowledged.len()
    );

    let (data_dir, temp) = depot.into_parts();
    let depot = Server::start(Options {
        data_dir: Some(data_dir),
        ..Default::default()
    })
    .expect("restart after kill -9");
    let tokens = json_of(
        http()
            .get(depot.url("/api/v1/tokens"))
            .bearer_auth(&admin)
            .send()
            .unwrap(),
    );
    let names: Vec<&str> = tokens["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["name"].as_str().unwrap())
        .collect();
    for name in &acknowledged {
        assert!(
            names.contains(&name.as_str()),
            "acknowledged write {name} was lost"
        );
    }
    assert_eq!(integrity(&open_store(&depot)), "ok");
    drop(depot);
    drop(temp);
}

#[test]
fn backup_while_writing_then_restore() {
    let mut depot = Server::depot();
    let admin = depot.token("admin");
    let stop = Arc::new(AtomicBool::new(false));
    let handle = writer(depot.url("/api/v1/tokens"), admin.clone(), stop.clone());
    std::thread::sleep(Duration::from_millis(700));

    let backup_dir = tempfile::tempdir().unwrap();
    let backup = backup_dir.path().join("depot-backup.db");
    let (status, stdout, stderr) = run(atlasmesh()
        .args(["backup", "--data-dir"])
        .arg(&depot.data_dir)
        .arg("--out")
        .arg(&backup))
    .unwrap();
    assert!(status.success(), "backup failed: {stderr}");
    assert!(stdout.contains("sha256"), "{stdout}");

    std::thread::sleep(Duration::from_millis(500));
    stop.store(true, Ordering::Relaxed);
    let acknowledged = handle.join().unwrap();

    // The backup is a consistent, self-contained store holding a prefix of the writes.
    let conn = rusqlite::Connection::open(&backup).unwrap();
    assert_eq!(integrity(&conn), "ok");
    let in_backup: Vec<String> = conn
        .prepare("SELECT name FROM api_tokens WHERE name LIKE 'w%' ORDER BY id")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    drop(conn);
    assert!(
        !in_backup.is_empty() && in_backup.len() < acknowledged.len(),
        "{} of {}",
        in_backup.len(),
        acknowledged.len()
    );
    assert_eq!(
        in_backup[..],
        acknowledged[..in_backup.len()],
        "a backup is the store at one instant"
    );

    // Restore refuses to run beside a live depot.
    let (status, _, stderr) = run(atlasmesh()
        .args(["restore", "--data-dir"])
        .arg(&depot.data_dir)
        .arg("--from")
        .arg(&backup))
    .unwrap();
    assert!(!status.success());
    assert!(stderr.contains("another atlasmesh process"), "{stderr}");

    depot.terminate().unwrap();
    let (status, stdout, stderr) = run(atlasmesh()
        .args(["restore", "--data-dir"])
        .arg(&depot.data_dir)
        .arg("--from")
        .arg(&backup))
    .unwrap();
    assert!(status.success(), "restore failed: {stderr}");
    assert!(stdout.contains("kept as"), "{stdout}");

    let (data_dir, temp) = depot.into_parts();
    let depot = Server::start(Options {
        data_dir: Some(data_dir),
        ..Default::default()
    })
    .unwrap();
    let tokens = json_of(
        http()
            .get(depot.url("/api/v1/tokens"))
            .bearer_auth(&admin)
            .send()
            .unwrap(),
    );
    let restored = tokens["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|t| t["name"].as_str().unwrap().starts_with('w'))
        .count();
    assert_eq!(restored, in_backup.len());
    let audit = json_of(
        http()
            .get(depot.url("/api/v1/audit?action=store.restore"))
            .bearer_auth(&admin)
            .send()
            .unwrap(),
    );
    assert_eq!(audit["records"].as_array().unwrap().len(), 1);
    drop(depot);
    drop(temp);
}

#[test]
fn a_second_depot_on_the_same_data_dir_is_refused() {
    let depot = Server::depot();
    let second = Server::start(Options {
        data_dir: Some(depot.data_dir.clone()),
        ..Default::default()
    });
    let err = second
        .err()
        .expect("the second depot must not start")
        .to_string();
    assert!(
        err.contains("another atlasmesh process is using the data directory"),
        "{err}"
    );
}

#[test]
fn first_start_creates_an_admin_with_a_private_password_file() {
    use std::os::unix::fs::PermissionsExt;
    let depot = Server::depot();
    let file = depot.data_dir.join("initial-admin-password");
    assert_eq!(
        std::fs::metadata(&file).unwrap().permissions().mode() & 0o777,
        0o600
    );
    assert_eq!(
        std::fs::metadata(depot.data_dir.join("depot.db"))
            .unwrap()
            .permissions()
            .mode()
            & 0o777,
        0o600
    );
    assert!(
        depot
            .logs()
            .iter()
            .any(|l| l.contains("initial-admin-password")),
        "the log says where the password is"
    );
    let password = depot.admin_password();
    assert!(password.len() >= 16);

    // Changing it through the API removes the file; the new password signs in.
    let (client, csrf) = panel_login(&depot, "admin", &password).unwrap();
    let response = client
        .put(depot.url("/api/v1/users/admin/password"))
        .header("x-csrf-token", csrf)
        .json(&json!({"current_password": password, "new_password": "a brand new password"}))
        .send()
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    assert!(!file.exists());
    assert!(panel_login(&depot, "admin", &password).is_err());
    panel_login(&depot, "admin", "a brand new password").unwrap();
}

#[test]
fn output_to_a_closed_pipe_or_a_full_disk_is_handled_without_a_panic() {
    // The reader has gone (`atlasmesh depot --print-config | head -1` once head exits):
    // quiet exit with 128 + SIGPIPE, as a shell shows for coreutils.
    let (status, _, stderr) = run(atlasmesh()
        .args(["depot", "--print-config"])
        .stdout(closed_pipe()))
    .unwrap();
    assert_eq!(status.code(), Some(141), "{stderr}");
    assert!(stderr.is_empty(), "{stderr}");

    // Output lost to a full disk is an error, not a success.
    let full = std::fs::File::options()
        .write(true)
        .open("/dev/full")
        .unwrap();
    let (status, _, stderr) =
        run(atlasmesh().args(["depot", "--print-config"]).stdout(full)).unwrap();
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("writing to standard output") && stderr.contains("No space left"),
        "{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn configuration_from_file_env_and_flags() {
    let dir = tempfile::tempdir().unwrap();
    // Defaults with no file at all.
    let (status, stdout, _) = run(atlasmesh()
        .current_dir(dir.path())
        .args(["depot", "--print-config"]))
    .unwrap();
    assert!(status.success());
    let config: toml::Value = toml::from_str(&stdout).unwrap();
    assert_eq!(config["data_dir"].as_str(), Some("./atlasmesh-data"));
    assert_eq!(config["depot"]["http"].as_str(), Some("0.0.0.0:8080"));

    // A file, overridden by the environment, overridden by a flag.
    let file = dir.path().join("atlasmesh.toml");
    std::fs::write(
        &file,
        "[depot]\nname = \"North yard\"\nhttp = \"127.0.0.1:7000\"\n[log]\nformat = \"pretty\"\n",
    )
    .unwrap();
    let (status, stdout, _) = run(atlasmesh()
        .args(["depot", "--print-config", "--config"])
        .arg(&file)
        .env("ATLASMESH_DEPOT__NAME", "South yard")
        .env("ATLASMESH_DATA_DIR", "/srv/atlasmesh")
        .args(["--http", "127.0.0.1:7001"]))
    .unwrap();
    assert!(status.success());
    let config: toml::Value = toml::from_str(&stdout).unwrap();
    assert_eq!(config["depot"]["name"].as_str(), Some("South yard"));
    assert_eq!(config["depot"]["http"].as_str(), Some("127.0.0.1:7001"));
    assert_eq!(config["data_dir"].as_str(), Some("/srv/atlasmesh"));
    assert_eq!(config["log"]["format"].as_str(), Some("pretty"));

    // Mistakes name the key and exit with a usage error.
    std::fs::write(&file, "[depot]\nhtpp = \"127.0.0.1:7000\"\n").unwrap();
    let (status, _, stderr) = run(atlasmesh()
        .args(["depot", "--print-config", "--config"])
        .arg(&file))
    .unwrap();
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("htpp"), "{stderr}");
    std::fs::write(&file, "[http]\nmax_body_bytes = \"lots\"\n").unwrap();
    let (status, _, stderr) = run(atlasmesh()
        .args(["depot", "--print-config", "--config"])
        .arg(&file))
    .unwrap();
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("http.max_body_bytes"), "{stderr}");
    let (status, _, stderr) = run(atlasmesh()
        .args(["depot", "--print-config"])
        .env("ATLASMESH_DEPOT__HTTP", "nowhere"))
    .unwrap();
    assert_eq!(status.code(), Some(2));
    assert!(
        stderr.contains("depot.http") || stderr.contains("DEPOT.HTTP"),
        "{stderr}"
    );
    let (status, _, stderr) =
        run(atlasmesh().args(["depot", "--print-config", "--config", "/no/such/file.toml"]))
            .unwrap();
    assert_eq!(status.code(), Some(2));
    assert!(stderr.contains("/no/such/file.toml"), "{stderr}");
}

#[test]
fn runs_on_embedded_defaults_in_an_empty_directory() {
    let dir = tempfile::tempdir().unwrap();
    // Only the port is chosen (tests cannot rely on 8080 being free); everything else is default.
    let mut child = atlasmesh()
        .current_dir(dir.path())
        .args(["depot", "--http", "127.0.0.1:0"])
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stderr = child.stderr.take().unwrap();
    let mut addr = None;
    for line in std::io::BufRead::lines(std::io::BufReader::new(stderr)) {
        let line = line.unwrap();
        let json: Value = serde_json::from_str(&line).expect("default logs are JSON lines");
        if json["message"] == "listening" {
            assert_eq!(json["data_dir"], "./atlasmesh-data");
            addr = json["addr"].as_str().map(str::to_owned);
            break;
        }
    }
    let addr = addr.expect("listening line");
    let body = json_of(http().get(format!("http://{addr}/health")).send().unwrap());
    assert_eq!(body["status"], "healthy");
    assert!(dir.path().join("atlasmesh-data/depot.db").is_file());
    let _ = child.kill();
    let _ = child.wait();
}

#[test]
fn tls_with_a_generated_certificate() {
    use std::os::unix::fs::PermissionsExt;
    let depot = Server::start(Options {
        env: vec![("ATLASMESH_TLS__ENABLED".into(), "true".into())],
        ..Default::default()
    })
    .unwrap();
    assert_eq!(depot.scheme, "https");
    let key = depot.data_dir.join("tls/key.pem");
    assert_eq!(
        std::fs::metadata(&key).unwrap().permissions().mode() & 0o777,
        0o600
    );
    let body = json_of(http().get(depot.url("/health")).send().unwrap());
    assert_eq!(body["status"], "healthy");
    // Plain HTTP to the TLS port gets no answer from the API.
    assert!(
        http()
            .get(format!("http://{}/health", depot.addr))
            .send()
            .is_err()
    );

    let client = atlasmesh_tests::http_with_cookies();
    let page = client
        .get(depot.url("/login"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    let csrf = atlasmesh_tests::csrf_from(&page).unwrap();
    let response = client
        .post(depot.url("/login"))
        .form(&[
            ("username", "admin"),
            ("password", depot.admin_password().as_str()),
            ("csrf", csrf.as_str()),
        ])
        .send()
        .unwrap();
    let cookie = response
        .headers()
        .get_all("set-cookie")
        .iter()
        .map(|v| v.to_str().unwrap().to_owned())
        .find(|c| c.starts_with("atlasmesh_session="))
        .unwrap();
    assert!(cookie.contains("; Secure"), "{cookie}");
}

#[test]
fn token_create_refuses_a_data_dir_without_a_store() {
    let dir = tempfile::tempdir().unwrap();
    let err = mint_token(dir.path(), "viewer", "x")
        .unwrap_err()
        .to_string();
    assert!(err.contains("no depot store"), "{err}");
}

#[test]
fn cloud_mode_opens_its_store_and_answers_health() {
    let mut cloud = Server::start(Options {
        mode: atlasmesh_tests::Mode::Cloud,
        ..Default::default()
    })
    .unwrap();
    let body = json_of(http().get(cloud.url("/health")).send().unwrap());
    assert_eq!(body["status"], "healthy");
    assert_eq!(body["mode"], "cloud");
    let body = json_of(http().get(cloud.url("/health/database")).send().unwrap());
    assert_eq!(body["database"], "connected");
    assert!(cloud.data_dir.join("cloud.db").is_file());
    assert!(cloud.terminate().unwrap().success());
}
