//! OTA staging end to end: release tooling, staging from a directory, a URL and an upload,
//! serving, the director, the reference vehicle client and python-tuf, and every refusal.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use atlasmesh_tests::ota::{
    Fleet, OtaDepot, Vehicle, random_bytes, release, s, tuf_client, tuf_client_at, variant,
};
use atlasmesh_tests::{Options, http};
use serde_json::{Value, json};
use sha2::{Digest, Sha256};

const HW: &str = "veh-gen2";
const MIB: usize = 1024 * 1024;

fn sha(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}

fn audit(depot: &OtaDepot, action: &str) -> Vec<Value> {
    depot
        .get(&format!("/api/v1/audit?action={action}"))
        .unwrap()["records"]
        .as_array()
        .unwrap()
        .clone()
}

fn staged_versions(depot: &OtaDepot) -> Vec<String> {
    let mut v: Vec<String> = depot.get("/api/v1/images").unwrap()["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["version"].as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

fn staging_area_is_empty(depot: &OtaDepot) -> bool {
    std::fs::read_dir(depot.server.data_dir.join("ota/store/staging"))
        .unwrap()
        .next()
        .is_none()
}

/// Serves a directory over HTTP with Python's http.server, an independent server.
struct StaticServer {
    child: std::process::Child,
    port: u16,
}

impl StaticServer {
    fn start(dir: &Path) -> Self {
        let port = atlasmesh_tests::free_port();
        let child = std::process::Command::new("python3")
            .args([
                "-m",
                "http.server",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--directory",
                s(dir),
            ])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        for _ in 0..100 {
            if TcpStream::connect(("127.0.0.1", port)).is_ok() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Self { child, port }
    }
    fn url(&self) -> String {
        format!("http://127.0.0.1:{}/", self.port)
    }
}

impl Drop for StaticServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn stage_three_ways_serve_and_pull_a_delta() {
    let fleet = Fleet::new().unwrap();
    let v1 = random_bytes(6 * MIB, 1);
    let v2 = variant(&v1, 2, 6, 20_000, 3_000);
    let v3 = variant(&v2, 3, 6, 20_000, 3_000);
    fleet.add(HW, "1.0.0", &v1, &[]).unwrap();
    fleet
        .add(HW, "1.1.0", &v2, &["--min-version", "1.0.0"])
        .unwrap();
    fleet
        .add(
            HW,
            "1.2.0",
            &v3,
            &["--min-version", "1.0.0", "--notes", "brakes tuning"],
        )
        .unwrap();
    let depot = OtaDepot::start(&fleet, &[]).unwrap();

    // From a local directory (a USB stick), from a URL, and by upload.
    let job = depot.stage_dir(&fleet.repo, HW, "1.0.0").unwrap();
    assert_eq!(job["state"], "staged", "{job}");
    let web = StaticServer::start(&fleet.repo);
    let job = depot
        .stage_job(json!({"url": web.url(), "hardware": HW, "version": "1.1.0"}))
        .unwrap();
    assert_eq!(job["state"], "staged", "{job}");
    let (status, body) = depot.upload(&fleet.bundle(HW, "1.2.0").unwrap()).unwrap();
    assert_eq!(status, 201, "{body}");
    assert_eq!(body["image"]["sha256"], sha(&v3));
    assert_eq!(body["image"]["notes"], "brakes tuning");

    // Garbage collection keeps the current and the N-1 image.
    assert_eq!(staged_versions(&depot), ["1.1.0", "1.2.0"]);
    let gc = audit(&depot, "image.gc");
    assert_eq!(gc.len(), 1);
    assert_eq!(gc[0]["target"], format!("{HW}/1.0.0"));
    let staged = audit(&depot, "image.stage");
    assert_eq!(staged.iter().filter(|r| r["result"] == "ok").count(), 3);

    // Validation re-reads every chunk.
    let report = depot.get("/api/v1/images/1.2.0/validate").unwrap();
    assert_eq!(report["validation"]["ok"], true, "{report}");

    // Whole images with ranges, ETags and If-Range.
    let client = http();
    let image_url = depot.url(&format!("/images/{HW}_1.2.0.img"));
    let response = client
        .get(&image_url)
        .header("range", "bytes=100-199")
        .send()
        .unwrap();
    assert_eq!(response.status(), 206);
    let etag = response.headers()["etag"].to_str().unwrap().to_owned();
    assert_eq!(etag, format!("\"{}\"", sha(&v3)));
    assert_eq!(
        response.headers()["content-range"],
        format!("bytes 100-199/{}", v3.len())
    );
    assert_eq!(&response.bytes().unwrap()[..], &v3[100..200]);
    let response = client
        .get(&image_url)
        .header("range", "bytes=100-199")
        .header("if-range", "\"stale\"")
        .send()
        .unwrap();
    assert_eq!(
        response.status(),
        200,
        "a stale If-Range gets the whole image"
    );
    assert_eq!(response.bytes().unwrap().len(), v3.len());
    let response = client
        .get(&image_url)
        .header("range", format!("bytes={}-", v3.len()))
        .send()
        .unwrap();
    assert_eq!(response.status(), 416);
    let response = client
        .get(&image_url)
        .header("if-none-match", &etag)
        .send()
        .unwrap();
    assert_eq!(response.status(), 304);
    assert_eq!(
        client
            .get(depot.url(&format!("/images/{HW}_1.0.0.img")))
            .send()
            .unwrap()
            .status(),
        404,
        "collected images are gone"
    );

    // The director, certified by the fleet, tells veh-1 to install 1.2.0.
    depot.certify(&fleet).unwrap();
    depot.assign("veh-1", "1.2.0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let vehicle = Vehicle::new(dir.path(), "veh-1", &fleet, &v1).unwrap();
    let (status, report) = vehicle.pull(&depot, &[]).unwrap();
    assert!(status.success(), "{report}");
    assert_eq!(report["outcome"]["status"], "written");
    assert_eq!(report["outcome"]["version"], "1.2.0");
    assert_eq!(
        report["installed_version"], "1.0.0",
        "the running slot is recognised by its hash"
    );
    assert_eq!(std::fs::read(&vehicle.slot).unwrap(), v3);
    let fetched = report["bytes_fetched"].as_u64().unwrap();
    let reused = report["bytes_reused"].as_u64().unwrap();
    assert_eq!(fetched + reused, v3.len() as u64);
    assert!(
        fetched < v3.len() as u64 / 3,
        "a delta pull fetches a fraction: {report}"
    );
    // Pulling again changes nothing: the same assignment over a slot that already holds it
    // is fetched again only if the vehicle still runs 1.0.0, which it does; the chunks come
    // from the running slot and the depot as before.

    // python-tuf, an independent TUF client, refreshes both repositories and downloads.
    let out = dir.path().join("py-image.img");
    let (code, got) = tuf_client(
        &depot,
        "image",
        &fleet.root(),
        &dir.path().join("py-image"),
        Some((&format!("{HW}_1.2.0.img"), &out)),
    )
    .unwrap();
    assert_eq!(code, 0, "{got}");
    assert_eq!(got["custom"]["version"], "1.2.0");
    assert_eq!(std::fs::read(&out).unwrap(), v3);
    let director_root = dir.path().join("director-root.json");
    std::fs::write(
        &director_root,
        http()
            .get(depot.url("/tuf/director/metadata/1.root.json"))
            .send()
            .unwrap()
            .bytes()
            .unwrap(),
    )
    .unwrap();
    let out = dir.path().join("py-director.img");
    let (code, got) = tuf_client(
        &depot,
        "director",
        &director_root,
        &dir.path().join("py-director"),
        Some(("vehicle_veh-1.img", &out)),
    )
    .unwrap();
    assert_eq!(code, 0, "{got}");
    assert_eq!(got["custom"]["image_target"], format!("{HW}_1.2.0.img"));
    assert_eq!(std::fs::read(&out).unwrap(), v3);

    // A vehicle with nothing assigned is told so; one already on 1.2.0 is up to date.
    let idle = Vehicle::new(dir.path(), "veh-2", &fleet, &v1).unwrap();
    let (status, report) = idle.pull(&depot, &[]).unwrap();
    assert!(status.success());
    assert_eq!(report["outcome"]["status"], "no_assignment");
    depot.assign("veh-3", "1.2.0").unwrap();
    let current = Vehicle::new(dir.path(), "veh-3", &fleet, &v3).unwrap();
    let (_, report) = current.pull(&depot, &[]).unwrap();
    assert_eq!(report["outcome"]["status"], "up_to_date");

    let metrics = http()
        .get(depot.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics.contains("atlasmesh_ota_served_bytes_total{kind=\"chunk\"}"),
        "{metrics}"
    );
    assert!(
        metrics.contains("atlasmesh_ota_staging_total{result=\"staged\"} 3"),
        "{metrics}"
    );
}

/// Each staging refusal is its own error, leaves nothing behind, and is audited.
#[test]
fn tampered_and_unwanted_releases_are_refused_by_staging() {
    let fleet = Fleet::new().unwrap();
    let v1 = random_bytes(2 * MIB, 10);
    let v2 = variant(&v1, 11, 3, 10_000, 100);
    let v3 = variant(&v2, 12, 3, 10_000, 100);
    fleet.add(HW, "1.0.0", &v1, &[]).unwrap();
    let before_more = fleet.snapshot("v1-only").unwrap();
    fleet.add(HW, "1.1.0", &v2, &[]).unwrap();
    fleet.add(HW, "1.2.0", &v3, &[]).unwrap();
    let depot = OtaDepot::start(&fleet, &[]).unwrap();

    let refused = |repo: &Path, version: &str, code: &str| {
        let job = depot.stage_dir(repo, HW, version).unwrap();
        assert_eq!(job["state"], "failed", "{job}");
        assert_eq!(job["error_code"], code, "{job}");
        assert!(
            staging_area_is_empty(&depot),
            "a refused staging leaves nothing behind"
        );
    };

    // A swapped signature: the timestamp carrying the snapshot key's signature. (First: a
    // depot that already trusts a metadata version rightly never reads it again. And the
    // timestamp, because the other roles' hashes are pinned by the role above them, so their
    // tampering shows as a hash mismatch before any signature is checked.)
    let swapped = fleet.snapshot("swapped").unwrap();
    let newest = |role: &str| {
        let version = std::fs::read_dir(swapped.join("metadata"))
            .unwrap()
            .filter_map(|e| {
                e.ok()?
                    .file_name()
                    .into_string()
                    .ok()?
                    .strip_suffix(&format!(".{role}.json"))?
                    .parse::<u32>()
                    .ok()
            })
            .max()
            .unwrap();
        swapped.join(format!("metadata/{version}.{role}.json"))
    };
    let timestamp = swapped.join("metadata/timestamp.json");
    let snapshot: Value =
        serde_json::from_slice(&std::fs::read(newest("snapshot")).unwrap()).unwrap();
    let mut doc: Value = serde_json::from_slice(&std::fs::read(&timestamp).unwrap()).unwrap();
    doc["signatures"] = snapshot["signatures"].clone();
    std::fs::write(&timestamp, serde_json::to_vec(&doc).unwrap()).unwrap();
    refused(&swapped, "1.2.0", "bad_signature");

    // A flipped byte in the image.
    let tampered = fleet.snapshot("flipped").unwrap();
    let image = std::fs::read_dir(tampered.join("targets"))
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.to_str().unwrap().ends_with(&format!("{HW}_1.2.0.img")))
        .unwrap();
    let mut bytes = std::fs::read(&image).unwrap();
    bytes[1_000_000] ^= 0x01;
    std::fs::write(&image, &bytes).unwrap();
    refused(&tampered, "1.2.0", "hash_mismatch");

    // Nothing has been staged so far.
    assert!(staged_versions(&depot).is_empty());

    // Stage 1.1.0 and 1.2.0; then 1.0.0 is below the floor (N-1 = 1.1.0): a rollback.
    assert_eq!(
        depot.stage_dir(&fleet.repo, HW, "1.1.0").unwrap()["state"],
        "staged"
    );
    assert_eq!(
        depot.stage_dir(&fleet.repo, HW, "1.2.0").unwrap()["state"],
        "staged"
    );
    refused(&fleet.repo, "1.0.0", "version_below_floor");
    // The same version twice.
    refused(&fleet.repo, "1.2.0", "already_staged");
    // An older copy of the repository (replayed metadata) after the depot has seen newer.
    refused(&before_more, "1.0.0", "metadata_rollback");
    // A version the release does not contain.
    refused(&fleet.repo, "9.9.9", "not_in_release");

    let failed: Vec<Value> = audit(&depot, "image.stage")
        .into_iter()
        .filter(|r| r["result"] == "failed")
        .collect();
    let codes: Vec<&str> = failed
        .iter()
        .map(|r| r["detail"]["code"].as_str().unwrap())
        .collect();
    for code in [
        "hash_mismatch",
        "bad_signature",
        "version_below_floor",
        "already_staged",
        "metadata_rollback",
        "not_in_release",
    ] {
        assert!(codes.contains(&code), "{code} not audited: {codes:?}");
    }
    assert_eq!(staged_versions(&depot), ["1.1.0", "1.2.0"]);
}

#[test]
fn expired_metadata_hardware_and_disk_space_are_refused() {
    let fleet = Fleet::with_expiry(&["--timestamp-expires", "2s"]).unwrap();
    let v1 = random_bytes(MIB, 20);
    fleet
        .add(HW, "1.0.0", &v1, &["--timestamp-expires", "2s"])
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    let depot = OtaDepot::start(&fleet, &[]).unwrap();
    let job = depot.stage_dir(&fleet.repo, HW, "1.0.0").unwrap();
    assert_eq!(job["error_code"], "expired_metadata", "{job}");
    // Refreshed by release engineering, it stages.
    release(&[
        "refresh",
        "--keys",
        s(&fleet.keys),
        "--repo",
        s(&fleet.repo),
    ])
    .unwrap();
    drop(depot);

    let other = OtaDepot::start(&fleet, &[("ATLASMESH_OTA__HARDWARE", "[\"veh-gen3\"]")]).unwrap();
    let job = other.stage_dir(&fleet.repo, HW, "1.0.0").unwrap();
    assert_eq!(job["error_code"], "hardware_mismatch", "{job}");
    drop(other);

    // Disk full: the depot keeps a reserve free and refuses before writing anything.
    let full = OtaDepot::start(
        &fleet,
        &[("ATLASMESH_OTA__RESERVE_BYTES", "1000000000000000")],
    )
    .unwrap();
    let job = full.stage_dir(&fleet.repo, HW, "1.0.0").unwrap();
    assert_eq!(job["error_code"], "disk_full", "{job}");
    // By upload, the refusal is the response itself.
    let (status, body) = full.upload(&fleet.bundle(HW, "1.0.0").unwrap()).unwrap();
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["error"]["code"], "disk_full");
    assert!(staging_area_is_empty(&full));

    let ok = OtaDepot::start(&fleet, &[]).unwrap();
    assert_eq!(
        ok.stage_dir(&fleet.repo, HW, "1.0.0").unwrap()["state"],
        "staged"
    );
}

#[test]
fn staging_needs_a_technician_and_a_pinned_root() {
    let fleet = Fleet::new().unwrap();
    fleet.add(HW, "1.0.0", &random_bytes(MIB, 30), &[]).unwrap();
    // A depot with no fleet root pinned refuses, and an admin can pin one at run time.
    let server = atlasmesh_tests::Server::start(Options::default()).unwrap();
    let admin = server.token("admin");
    let viewer = server.token("viewer");
    let depot = OtaDepot {
        server,
        token: admin.clone(),
    };
    let body = json!({"path": fleet.repo, "hardware": HW, "version": "1.0.0"});
    let response = http()
        .post(depot.url("/api/v1/images"))
        .bearer_auth(&viewer)
        .json(&body)
        .send()
        .unwrap();
    assert_eq!(response.status(), 403);
    let job = depot.stage_job(body.clone()).unwrap();
    assert_eq!(job["error_code"], "no_fleet_root", "{job}");
    let response = http()
        .put(depot.url("/api/v1/ota/fleet-root"))
        .bearer_auth(&viewer)
        .body(std::fs::read(fleet.root()).unwrap())
        .send()
        .unwrap();
    assert_eq!(response.status(), 403);
    let response = http()
        .put(depot.url("/api/v1/ota/fleet-root"))
        .bearer_auth(&admin)
        .body(b"{\"not\": \"a root\"}".to_vec())
        .send()
        .unwrap();
    assert_eq!(response.status(), 422);
    let response = http()
        .put(depot.url("/api/v1/ota/fleet-root"))
        .bearer_auth(&admin)
        .body(std::fs::read(fleet.root()).unwrap())
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(depot.stage_job(body).unwrap()["state"], "staged");
    assert_eq!(audit(&depot, "ota.fleet_root").len(), 2);
}

/// A TCP proxy that passes traffic both ways but, once, cuts a connection after it has carried
/// `cut` bytes back to the client (only an image download is that long).
fn cutting_proxy(upstream: std::net::SocketAddr, cut: usize) -> (u16, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let cut_done = Arc::new(AtomicBool::new(false));
    let flag = cut_done.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { break };
            let flag = flag.clone();
            std::thread::spawn(move || {
                let mut server = TcpStream::connect(upstream).unwrap();
                let (mut client_in, mut server_out) =
                    (client.try_clone().unwrap(), server.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut client_in, &mut server_out);
                    let _ = server_out.shutdown(std::net::Shutdown::Write);
                });
                let mut buf = vec![0u8; 64 * 1024];
                let mut sent = 0;
                while let Ok(n) = server.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    if sent + n > cut && !flag.swap(true, Ordering::SeqCst) {
                        let _ = client.write_all(&buf[..cut - sent]);
                        let _ = client.shutdown(std::net::Shutdown::Both);
                        let _ = server.shutdown(std::net::Shutdown::Both);
                        break;
                    }
                    if client.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent += n;
                }
                let _ = client.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (port, cut_done)
}

#[test]
fn url_staging_resumes_a_cut_download_with_range() {
    let fleet = Fleet::new().unwrap();
    let v1 = random_bytes(4 * MIB, 40);
    fleet.add(HW, "1.0.0", &v1, &[]).unwrap();
    // The first depot serves the release (with Range support) to the second one.
    let upstream = OtaDepot::start(&fleet, &[]).unwrap();
    assert_eq!(
        upstream.stage_dir(&fleet.repo, HW, "1.0.0").unwrap()["state"],
        "staged"
    );
    let (port, cut) = cutting_proxy(upstream.server.addr, MIB + 12_345);
    let downstream = OtaDepot::start(&fleet, &[]).unwrap();
    let job = downstream
        .stage_job(json!({"url": format!("http://127.0.0.1:{port}/tuf/image/"), "hardware": HW, "version": "1.0.0"}))
        .unwrap();
    assert!(cut.load(Ordering::SeqCst), "the proxy cut a download");
    assert_eq!(job["state"], "staged", "{job}");
    let logs = downstream.server.logs().join("\n");
    assert!(
        logs.contains("download interrupted; resuming"),
        "the resume is logged"
    );
    let served = http()
        .get(downstream.url(&format!("/images/{HW}_1.0.0.img")))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(sha(&served), sha(&v1));
}

#[test]
fn depot_killed_mid_staging_restarts_with_nothing_visible() {
    let fleet = Fleet::new().unwrap();
    let v1 = random_bytes(8 * MIB, 50);
    fleet.add(HW, "1.0.0", &v1, &[]).unwrap();
    let bundle = std::fs::read(fleet.bundle(HW, "1.0.0").unwrap()).unwrap();
    let mut depot = OtaDepot::start(&fleet, &[]).unwrap();

    // Upload the bundle slowly by hand: metadata and half the image, then the depot dies.
    let mut stream = TcpStream::connect(depot.server.addr).unwrap();
    write!(
        stream,
        "POST /api/v1/images HTTP/1.1\r\nHost: depot\r\nAuthorization: Bearer {}\r\nContent-Type: application/x-tar\r\nContent-Length: {}\r\n\r\n",
        depot.token,
        bundle.len()
    )
    .unwrap();
    stream.write_all(&bundle[..bundle.len() / 2]).unwrap();
    stream.flush().unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    // Wait until the depot is ingesting the image.
    loop {
        let images = depot.get("/api/v1/images").unwrap();
        if images["staging"]["bytes_done"].as_u64().unwrap_or(0) > 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "staging did not start: {images}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    depot.server.kill9().unwrap();
    drop(stream);

    let (depot, temp) = depot.restart(&fleet).unwrap();
    assert!(
        staged_versions(&depot).is_empty(),
        "no partial image is visible"
    );
    assert!(staging_area_is_empty(&depot));
    let job = depot.get("/api/v1/staging/1").unwrap();
    assert_eq!(job["state"], "interrupted", "{job}");
    assert_eq!(
        http()
            .get(depot.url(&format!("/images/{HW}_1.0.0.img")))
            .send()
            .unwrap()
            .status(),
        404
    );
    // And the release stages cleanly afterwards.
    assert_eq!(
        depot.stage_dir(&fleet.repo, HW, "1.0.0").unwrap()["state"],
        "staged"
    );
    drop(temp);
}

#[test]
fn url_staging_resumes_after_the_depot_is_killed_and_fetches_only_the_rest() {
    const LEN: usize = 12 * MIB;
    let fleet = Fleet::new().unwrap();
    let v1 = random_bytes(LEN, 55);
    fleet.add(HW, "1.0.0", &v1, &[]).unwrap();
    // The upstream depot serves the release slowly enough to kill the downstream one halfway.
    let upstream = OtaDepot::start(&fleet, &[]).unwrap();
    assert_eq!(
        upstream.stage_dir(&fleet.repo, HW, "1.0.0").unwrap()["state"],
        "staged"
    );
    let response = http()
        .put(upstream.url("/api/v1/bandwidth"))
        .bearer_auth(&upstream.token)
        .json(&json!({"bytes_per_second": 4 * MIB}))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let served = || {
        let text = upstream.server.metrics().unwrap();
        atlasmesh_tests::metric_sum(
            &text,
            "atlasmesh_ota_served_bytes_total",
            &["kind=\"image\""],
        )
    };

    let mut depot = OtaDepot::start(&fleet, &[]).unwrap();
    let source = format!(
        "http://127.0.0.1:{}/tuf/image/",
        upstream.server.addr.port()
    );
    let response = http()
        .post(depot.url("/api/v1/images"))
        .bearer_auth(&depot.token)
        .json(&json!({"url": source, "hardware": HW, "version": "1.0.0"}))
        .send()
        .unwrap();
    assert_eq!(response.status(), 202);
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while depot.get("/api/v1/images").unwrap()["staging"]["bytes_done"]
        .as_u64()
        .unwrap_or(0)
        < (LEN / 2) as u64
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the download did not get halfway"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    depot.server.kill9().unwrap();
    let first_attempt = served();
    assert!(first_attempt >= (LEN / 2) as f64, "{first_attempt}");

    let (depot, temp) = depot.restart(&fleet).unwrap();
    // Nothing is visible until the resumed job has verified everything.
    assert!(staged_versions(&depot).is_empty());
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    let job = loop {
        let job = depot.get("/api/v1/staging/1").unwrap();
        if job["state"] != "running" {
            break job;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the job did not finish: {job}"
        );
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(job["state"], "staged", "{job}");
    assert_eq!(job["resumes"], 1, "{job}");
    assert_eq!(staged_versions(&depot), ["1.0.0"]);
    let logs = depot.server.logs().join("\n");
    assert!(
        logs.contains("resuming the download"),
        "the resume is logged"
    );
    let resumed = audit(&depot, "image.stage.resume");
    assert_eq!(resumed.len(), 1, "{resumed:?}");
    assert_eq!(resumed[0]["target"], format!("{HW}/1.0.0"));

    // Only the rest was fetched again: a restart from zero would have cost the whole image on
    // top of the first half.
    let total = served();
    eprintln!(
        "image of {LEN} bytes: upstream served {first_attempt} before the kill, {total} in all"
    );
    assert!(
        total < (LEN + LEN / 4) as f64,
        "upstream served {total} bytes for a {LEN}-byte image (first attempt {first_attempt})"
    );
    let image = http()
        .get(depot.url(&format!("/images/{HW}_1.0.0.img")))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    assert_eq!(sha(&image), sha(&v1));
    assert!(staging_area_is_empty(&depot));
    drop(temp);
}

#[test]
fn bandwidth_cap_is_applied_persisted_and_audited() {
    let fleet = Fleet::new().unwrap();
    let v1 = random_bytes(3 * MIB, 60);
    fleet.add(HW, "1.0.0", &v1, &[]).unwrap();
    let depot = OtaDepot::start(&fleet, &[]).unwrap();
    assert_eq!(
        depot.stage_dir(&fleet.repo, HW, "1.0.0").unwrap()["state"],
        "staged"
    );
    let technician = depot.server.token("technician");
    let response = http()
        .put(depot.url("/api/v1/bandwidth"))
        .bearer_auth(&technician)
        .json(&json!({"bytes_per_second": 1024 * 1024}))
        .send()
        .unwrap();
    assert_eq!(response.status(), 200);
    let started = std::time::Instant::now();
    let body = http()
        .get(depot.url(&format!("/images/{HW}_1.0.0.img")))
        .send()
        .unwrap()
        .bytes()
        .unwrap();
    let took = started.elapsed();
    assert_eq!(body.len(), v1.len());
    // 3 MiB at 1 MiB/s with a burst of a tenth of a second.
    assert!(
        took >= Duration::from_millis(2500),
        "cap not applied: {took:?}"
    );
    assert_eq!(audit(&depot, "bandwidth.set").len(), 1);
    assert_eq!(
        depot.get("/api/v1/bandwidth").unwrap()["bytes_per_second"],
        1024 * 1024
    );
    let response = http()
        .put(depot.url("/api/v1/bandwidth"))
        .bearer_auth(&technician)
        .json(&json!({"bytes_per_second": 10}))
        .send()
        .unwrap();
    assert_eq!(response.status(), 422);
}

#[derive(Clone, Copy, PartialEq)]
enum Tamper {
    /// Flip one byte in the body of the first response (longer than 100 bytes).
    Flip,
    /// Answer with a body that never ends (chunked encoding, until the client hangs up).
    Endless,
}

/// A TCP proxy that makes every request its own connection (`Connection: close`) and, once,
/// tampers with the response to the first request whose path contains `path`.
fn tampering_proxy(
    upstream: std::net::SocketAddr,
    path: &'static str,
    tamper: Tamper,
) -> (u16, Arc<AtomicBool>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let tampered = Arc::new(AtomicBool::new(false));
    let flag = tampered.clone();
    std::thread::spawn(move || {
        for client in listener.incoming() {
            let Ok(mut client) = client else { break };
            let flag = flag.clone();
            std::thread::spawn(move || {
                let mut head = Vec::new();
                let mut byte = [0u8; 1];
                while !head.ends_with(b"\r\n\r\n") {
                    if client.read(&mut byte).unwrap_or(0) == 0 {
                        return;
                    }
                    head.push(byte[0]);
                }
                let text = String::from_utf8_lossy(&head).to_string();
                let mut lines: Vec<&str> = text
                    .trim_end()
                    .split("\r\n")
                    .filter(|l| !l.to_ascii_lowercase().starts_with("connection:"))
                    .collect();
                lines.push("Connection: close");
                let request = format!("{}\r\n\r\n", lines.join("\r\n"));
                let chosen = lines[0].contains(path) && !flag.load(Ordering::SeqCst);
                if chosen && tamper == Tamper::Endless {
                    flag.store(true, Ordering::SeqCst);
                    let _ = client.write_all(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
                    );
                    let piece = [b'{'; 64 * 1024];
                    // 1 GiB at most, so a client that never stops cannot hang the test.
                    for _ in 0..16 * 1024 {
                        let sent = client
                            .write_all(format!("{:x}\r\n", piece.len()).as_bytes())
                            .and_then(|()| client.write_all(&piece))
                            .and_then(|()| client.write_all(b"\r\n"));
                        if sent.is_err() {
                            return;
                        }
                    }
                    return;
                }
                let mut server = TcpStream::connect(upstream).unwrap();
                server.write_all(request.as_bytes()).unwrap();
                let mut response = Vec::new();
                let _ = server.read_to_end(&mut response);
                if chosen
                    && let Some(body) = response
                        .windows(4)
                        .position(|w| w == b"\r\n\r\n")
                        .map(|p| p + 4)
                    && response.len() > body + 100
                    && response.starts_with(b"HTTP/1.1 200")
                {
                    response[body + 100] ^= 0xff;
                    flag.store(true, Ordering::SeqCst);
                }
                let _ = client.write_all(&response);
            });
        }
    });
    (port, tampered)
}

struct Setup {
    fleet: Fleet,
    depot: OtaDepot,
    v1: Vec<u8>,
    v2: Vec<u8>,
    dir: tempfile::TempDir,
}

/// A fleet with 1.0.0 and 1.1.0, a depot with both staged and its director certified.
fn setup(size: usize, edits: usize) -> Setup {
    let fleet = Fleet::new().unwrap();
    let v1 = random_bytes(size, 70);
    let v2 = variant(&v1, 71, edits, 30_000, 4_000);
    fleet.add(HW, "1.0.0", &v1, &[]).unwrap();
    fleet
        .add(HW, "1.1.0", &v2, &["--min-version", "1.0.0"])
        .unwrap();
    let depot = OtaDepot::start(&fleet, &[]).unwrap();
    for version in ["1.0.0", "1.1.0"] {
        assert_eq!(
            depot.stage_dir(&fleet.repo, HW, version).unwrap()["state"],
            "staged"
        );
    }
    depot.certify(&fleet).unwrap();
    Setup {
        fleet,
        depot,
        v1,
        v2,
        dir: tempfile::tempdir().unwrap(),
    }
}

fn director_root(depot: &OtaDepot, dir: &Path) -> std::path::PathBuf {
    let path = dir.join("director-1.root.json");
    std::fs::write(
        &path,
        http()
            .get(depot.url("/tuf/director/metadata/1.root.json"))
            .send()
            .unwrap()
            .bytes()
            .unwrap(),
    )
    .unwrap();
    path
}

fn refused(result: (std::process::ExitStatus, Value), code: &str) {
    let (status, body) = result;
    assert!(!status.success(), "expected a refusal ({code}), got {body}");
    assert_eq!(body["error"]["code"], code, "{body}");
}

#[test]
fn tampering_in_transit_is_caught_by_the_vehicle_and_python_tuf() {
    let t = setup(4 * MIB, 8);
    t.depot.assign("veh-1", "1.1.0").unwrap();
    // A vehicle pulling through a proxy that flips a byte of a chunk refuses the chunk.
    let (port, flipped) = tampering_proxy(t.depot.server.addr, "/chunks/", Tamper::Flip);
    let vehicle = Vehicle::new(t.dir.path(), "veh-1", &t.fleet, &t.v1).unwrap();
    let pulled = pull_through(&vehicle, port, &t.fleet);
    assert!(flipped.load(Ordering::SeqCst));
    refused(pulled, "chunk_hash");
    // Retrying straight from the depot completes, refetching only what was not verified.
    let (status, report) = vehicle.pull(&t.depot, &[]).unwrap();
    assert!(status.success(), "{report}");
    assert_eq!(std::fs::read(&vehicle.slot).unwrap(), t.v2);

    // python-tuf downloading the image through the same kind of proxy refuses it.
    let (port, flipped) = tampering_proxy(t.depot.server.addr, ".img", Tamper::Flip);
    let out = t.dir.path().join("py.img");
    let (code, got) = tuf_client_at(
        &format!("http://127.0.0.1:{port}/"),
        "image",
        &t.fleet.root(),
        &t.dir.path().join("py-state"),
        Some((&format!("{HW}_1.1.0.img"), &out)),
    )
    .unwrap();
    assert!(flipped.load(Ordering::SeqCst));
    assert_eq!(code, 2, "{got}");
    assert_eq!(got["error"], "LengthOrHashMismatchError", "{got}");
}

/// `vehicle pull` through a proxy on `port`, one chunk at a time.
fn pull_through(vehicle: &Vehicle, port: u16, fleet: &Fleet) -> (std::process::ExitStatus, Value) {
    let (status, out, err) = atlasmesh_tests::run(
        atlasmesh_tests::atlasmesh()
            .args([
                "vehicle",
                "pull",
                "--depot",
                &format!("http://127.0.0.1:{port}/"),
            ])
            .args(["--vehicle", &vehicle.id, "--slot", s(&vehicle.slot)])
            .args([
                "--current",
                s(&vehicle.current),
                "--state",
                s(&vehicle.state),
            ])
            .args(["--fleet-root", s(&fleet.root()), "--concurrency", "1"]),
    )
    .unwrap();
    let report =
        serde_json::from_str(&out).unwrap_or_else(|_| panic!("no JSON report: {out} {err}"));
    (status, report)
}

/// Endless data: a peer that never stops sending is cut off at what was signed (or at the
/// size any metadata may have), by the vehicle, by python-tuf and by the depot's staging.
#[test]
fn endless_responses_are_cut_off_at_the_signed_length() {
    let t = setup(2 * MIB, 4);
    t.depot.assign("veh-1", "1.1.0").unwrap();
    let vehicle = Vehicle::new(t.dir.path(), "veh-1", &t.fleet, &t.v1).unwrap();
    for path in [
        "/chunks/",
        "/tuf/image/metadata/timestamp.json",
        "/tuf/director/metadata/timestamp.json",
    ] {
        let (port, sent) = tampering_proxy(t.depot.server.addr, path, Tamper::Endless);
        let pulled = pull_through(&vehicle, port, &t.fleet);
        assert!(sent.load(Ordering::SeqCst), "{path}");
        refused(pulled, "too_large");
    }
    assert!(!vehicle.slot.exists() || std::fs::read(&vehicle.slot).unwrap() != t.v2);
    // Nothing was lost: straight from the depot the pull completes.
    let (status, report) = vehicle.pull(&t.depot, &[]).unwrap();
    assert!(status.success(), "{report}");
    assert_eq!(std::fs::read(&vehicle.slot).unwrap(), t.v2);

    // python-tuf, refreshing through an endless timestamp, refuses too.
    let (port, _) = tampering_proxy(t.depot.server.addr, "timestamp.json", Tamper::Endless);
    let (code, got) = tuf_client_at(
        &format!("http://127.0.0.1:{port}/"),
        "image",
        &t.fleet.root(),
        &t.dir.path().join("py"),
        None,
    )
    .unwrap();
    assert_eq!(code, 2, "{got}");
    assert_eq!(got["error"], "DownloadLengthMismatchError", "{got}");

    // A depot staging from a URL whose image never ends stops at the signed length, and
    // nothing of it becomes visible.
    let fleet = Fleet::new().unwrap();
    fleet.add(HW, "2.0.0", &t.v2, &[]).unwrap();
    let upstream = OtaDepot::start(&fleet, &[]).unwrap();
    assert_eq!(
        upstream.stage_dir(&fleet.repo, HW, "2.0.0").unwrap()["state"],
        "staged"
    );
    let (port, sent) = tampering_proxy(upstream.server.addr, ".img", Tamper::Endless);
    let downstream = OtaDepot::start(&fleet, &[]).unwrap();
    let job = downstream
        .stage_job(json!({"url": format!("http://127.0.0.1:{port}/tuf/image/"), "hardware": HW, "version": "2.0.0"}))
        .unwrap();
    assert!(sent.load(Ordering::SeqCst));
    assert_eq!(job["state"], "failed", "{job}");
    assert!(
        job["error"]
            .as_str()
            .unwrap()
            .contains("longer than the signed"),
        "{job}"
    );
    assert!(staged_versions(&downstream).is_empty());
}

#[test]
fn damage_on_the_depot_disk_is_found_and_never_served() {
    let t = setup(3 * MIB, 4);
    let image = t.depot.get("/api/v1/images/1.1.0").unwrap();
    let sha = image["sha256"].as_str().unwrap().to_owned();
    let pack = t
        .depot
        .server
        .data_dir
        .join(format!("ota/store/images/{sha}.img"));
    let mut bytes = std::fs::read(&pack).unwrap();
    bytes[2 * MIB] ^= 0x01;
    std::fs::write(&pack, &bytes).unwrap();

    let report = t.depot.get("/api/v1/images/1.1.0/validate").unwrap();
    assert_eq!(report["validation"]["ok"], false, "{report}");
    assert_eq!(
        report["validation"]["bad_chunks"].as_array().unwrap().len(),
        1
    );
    // Withdrawn: not served whole, not by chunk, not through TUF, and not assignable.
    assert_eq!(
        t.depot.get("/api/v1/images/1.1.0").unwrap()["status"],
        "damaged"
    );
    assert_eq!(
        http()
            .get(t.depot.url(&format!("/images/{sha}")))
            .send()
            .unwrap()
            .status(),
        404
    );
    let response = http()
        .post(t.depot.url("/api/v1/assignments"))
        .bearer_auth(&t.depot.token)
        .json(&json!({"vehicle_id": "veh-1", "version": "1.1.0"}))
        .send()
        .unwrap();
    assert_eq!(response.status(), 409);
    let out = t.dir.path().join("py.img");
    let (code, got) = tuf_client(
        &t.depot,
        "image",
        &t.fleet.root(),
        &t.dir.path().join("py"),
        Some((&format!("{HW}_1.1.0.img"), &out)),
    )
    .unwrap();
    assert_eq!(code, 2, "{got}");
}

#[test]
fn the_vehicle_refuses_what_uptane_refuses() {
    let t = setup(2 * MIB, 3);
    let dir = t.dir.path();

    // A lower version than the vehicle runs.
    t.depot.assign("veh-down", "1.0.0").unwrap();
    let down = Vehicle::new(dir, "veh-down", &t.fleet, &t.v2).unwrap();
    refused(down.pull(&t.depot, &[]).unwrap(), "downgrade");

    // A certificate for another depot.
    t.depot.assign("veh-1", "1.1.0").unwrap();
    let vehicle = Vehicle::new(dir, "veh-1", &t.fleet, &t.v1).unwrap();
    refused(
        vehicle
            .pull(&t.depot, &["--depot-id", "some-other-depot"])
            .unwrap(),
        "bad_certificate",
    );

    // An assignment for another vehicle is not this vehicle's.
    t.depot.assign("veh-2", "1.1.0").unwrap();
    let other = Vehicle::new(dir, "veh-9", &t.fleet, &t.v1).unwrap();
    let (status, report) = other.pull(&t.depot, &[]).unwrap();
    assert!(status.success());
    assert_eq!(report["outcome"]["status"], "no_assignment");

    // The vehicle pulls once: its state now remembers the director's versions.
    let (status, report) = vehicle
        .pull(&t.depot, &["--stop-after-chunks", "1"])
        .unwrap();
    assert_eq!(status.code(), Some(75), "{report}");
    let metadata = t.depot.director_dir().join("metadata");
    let old = dir.join("director-metadata-old");
    assert!(
        std::process::Command::new("cp")
            .arg("-a")
            .arg(&metadata)
            .arg(&old)
            .status()
            .unwrap()
            .success()
    );
    let py_root = director_root(&t.depot, dir);
    let (code, got) = tuf_client(
        &t.depot,
        "director",
        &py_root,
        &dir.join("py-director"),
        None,
    )
    .unwrap();
    assert_eq!(code, 0, "{got}");
    t.depot.assign("veh-3", "1.1.0").unwrap();
    let (status, _) = vehicle
        .pull(&t.depot, &["--stop-after-chunks", "1"])
        .unwrap();
    assert_eq!(status.code(), Some(75));
    let (code, _) = tuf_client(
        &t.depot,
        "director",
        &py_root,
        &dir.join("py-director"),
        None,
    )
    .unwrap();
    assert_eq!(code, 0);

    // Replayed older director metadata (as a compromised or restored depot might serve).
    std::fs::copy(old.join("timestamp.json"), metadata.join("timestamp.json")).unwrap();
    refused(vehicle.pull(&t.depot, &[]).unwrap(), "metadata_rollback");
    let (code, got) = tuf_client(
        &t.depot,
        "director",
        &py_root,
        &dir.join("py-director"),
        None,
    )
    .unwrap();
    assert_eq!(code, 2, "python-tuf refuses the replay too: {got}");

    // A swapped signature on the director's timestamp.
    t.depot.assign("veh-4", "1.1.0").unwrap(); // publishes fresh metadata
    let ts_path = metadata.join("timestamp.json");
    let mut ts: Value = serde_json::from_slice(&std::fs::read(&ts_path).unwrap()).unwrap();
    let snapshot_version = ts["signed"]["meta"]["snapshot.json"]["version"]
        .as_u64()
        .unwrap();
    let snapshot: Value = serde_json::from_slice(
        &std::fs::read(metadata.join(format!("{snapshot_version}.snapshot.json"))).unwrap(),
    )
    .unwrap();
    ts["signatures"] = snapshot["signatures"].clone();
    std::fs::write(&ts_path, serde_json::to_vec(&ts).unwrap()).unwrap();
    refused(vehicle.pull(&t.depot, &[]).unwrap(), "bad_signature");
    let (code, got) = tuf_client(
        &t.depot,
        "director",
        &py_root,
        &dir.join("py-director"),
        None,
    )
    .unwrap();
    assert_eq!(code, 2, "{got}");

    // A compromised depot key can sign any assignment, but only for a genuine image: a
    // director target whose hash differs from the image repository's is refused.
    let director = director_keys(&t.depot);
    let mut forged = t.depot.get("/api/v1/images/1.1.0").unwrap();
    forged["sha256"] = json!(sha(b"an image the fleet never released"));
    sign_director(&t.depot, &director, &[("veh-1", "veh-1", &forged)]);
    refused(vehicle.pull(&t.depot, &[]).unwrap(), "assignment_mismatch");
    // ... and one naming another vehicle inside this vehicle's target is refused.
    let genuine = t.depot.get("/api/v1/images/1.1.0").unwrap();
    sign_director(&t.depot, &director, &[("veh-1", "veh-2", &genuine)]);
    refused(vehicle.pull(&t.depot, &[]).unwrap(), "wrong_vehicle");

    // With honest metadata again, the pull resumes and completes.
    t.depot.assign("veh-1", "1.1.0").unwrap();
    let (status, report) = vehicle.pull(&t.depot, &[]).unwrap();
    assert!(status.success(), "{report}");
    assert_eq!(std::fs::read(&vehicle.slot).unwrap(), t.v2);
}

fn director_keys(depot: &OtaDepot) -> Vec<atlasmesh_ota_staging::keys::KeyPair> {
    ["root", "targets", "snapshot", "timestamp"]
        .iter()
        .map(|k| {
            atlasmesh_ota_staging::keys::KeyPair::load(
                &depot.director_dir().join(format!("keys/{k}.pem")),
            )
            .unwrap()
        })
        .collect()
}

/// Signs a director publication with the depot's own keys, as someone holding them could:
/// targets named for one vehicle but saying whatever the forger likes.
fn sign_director(
    depot: &OtaDepot,
    keys: &[atlasmesh_ota_staging::keys::KeyPair],
    entries: &[(&str, &str, &Value)],
) {
    use std::collections::HashMap;
    use std::num::NonZeroU64;
    use tough::schema::{Hashes, Signed, Target, Timestamp};
    let metadata = depot.director_dir().join("metadata");
    let ts: Signed<Timestamp> =
        serde_json::from_slice(&std::fs::read(metadata.join("timestamp.json")).unwrap()).unwrap();
    let snapshot_version = ts.signed.meta["snapshot.json"].version.get();
    let targets_version = std::fs::read_dir(&metadata)
        .unwrap()
        .filter_map(|e| {
            e.ok()?
                .file_name()
                .into_string()
                .ok()?
                .strip_suffix(".targets.json")?
                .parse::<u64>()
                .ok()
        })
        .max()
        .unwrap();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let mut editor = tough::editor::RepositoryEditor::new(metadata.join("root.json"))
            .await
            .unwrap();
        let in_an_hour = jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1);
        editor
            .targets_version(NonZeroU64::new(targets_version + 1).unwrap())
            .unwrap()
            .targets_expires(in_an_hour)
            .unwrap()
            .snapshot_version(NonZeroU64::new(snapshot_version + 1).unwrap())
            .snapshot_expires(in_an_hour)
            .timestamp_version(NonZeroU64::new(ts.signed.version.get() + 1).unwrap())
            .timestamp_expires(in_an_hour);
        for (named, claimed, image) in entries {
            let custom = HashMap::from([
                ("vehicle_id".to_owned(), json!(claimed)),
                ("image_target".to_owned(), image["target"].clone()),
                ("version".to_owned(), image["version"].clone()),
                ("hardware_id".to_owned(), image["hardware_id"].clone()),
                ("chunk_index".to_owned(), image["index_target"].clone()),
            ]);
            let target = Target {
                length: image["length"].as_u64().unwrap(),
                hashes: Hashes {
                    sha256: hex::decode(image["sha256"].as_str().unwrap())
                        .unwrap()
                        .into(),
                    _extra: HashMap::new(),
                },
                custom,
                _extra: HashMap::new(),
            };
            editor
                .add_target(
                    tough::TargetName::new(format!("vehicle_{named}.img")).unwrap(),
                    target,
                )
                .unwrap();
        }
        let sources: Vec<Box<dyn tough::key_source::KeySource>> =
            keys.iter().map(|k| k.source()).collect();
        editor
            .sign(&sources)
            .await
            .unwrap()
            .write(&metadata)
            .await
            .unwrap();
    });
}

#[test]
fn expired_image_metadata_stops_vehicles_until_a_metadata_only_refresh() {
    let fleet = Fleet::with_expiry(&["--timestamp-expires", "4s"]).unwrap();
    let v1 = random_bytes(MIB, 80);
    let v2 = variant(&v1, 81, 2, 10_000, 100);
    fleet
        .add(HW, "1.0.0", &v1, &["--timestamp-expires", "4s"])
        .unwrap();
    fleet
        .add(HW, "1.1.0", &v2, &["--timestamp-expires", "4s"])
        .unwrap();
    let depot = OtaDepot::start(&fleet, &[]).unwrap();
    assert_eq!(
        depot.stage_dir(&fleet.repo, HW, "1.1.0").unwrap()["state"],
        "staged"
    );
    depot.certify(&fleet).unwrap();
    depot.assign("veh-1", "1.1.0").unwrap();
    std::thread::sleep(Duration::from_secs(5));
    let dir = tempfile::tempdir().unwrap();
    let vehicle = Vehicle::new(dir.path(), "veh-1", &fleet, &v1).unwrap();
    refused(vehicle.pull(&depot, &[]).unwrap(), "expired_metadata");
    let (code, got) =
        tuf_client(&depot, "image", &fleet.root(), &dir.path().join("py"), None).unwrap();
    assert_eq!(code, 2, "{got}");
    assert!(got["error"].as_str().unwrap().contains("Expired"), "{got}");

    // Release engineering re-signs the timestamp; a metadata-only refresh (by the CLI) brings
    // the depot's mirror up to date without staging anything, and the same vehicle pulls.
    let refresh_fleet = || {
        release(&[
            "refresh",
            "--keys",
            s(&fleet.keys),
            "--repo",
            s(&fleet.repo),
        ])
        .unwrap()
    };
    refresh_fleet();
    let out = atlasmesh_tests::atlasmesh()
        .args(["stage", "--depot", &depot.url("/"), "--token", &depot.token])
        .args(["--metadata-only", "--dir", s(&fleet.repo)])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let refreshed: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(
        refreshed["timestamp_version"].as_u64().unwrap() >= 2,
        "{refreshed}"
    );
    let (status, report) = vehicle.pull(&depot, &[]).unwrap();
    assert!(status.success(), "{report}");
    assert_eq!(std::fs::read(&vehicle.slot).unwrap(), v2);
    let (code, got) =
        tuf_client(&depot, "image", &fleet.root(), &dir.path().join("py"), None).unwrap();
    assert_eq!(code, 0, "{got}");
    assert_eq!(staged_versions(&depot), ["1.1.0"]);

    // A copy that verified once but has since been superseded is a replay: refused, the
    // mirror left as it was, and audited like the refresh that went through.
    let replay = fleet.snapshot("replay").unwrap();
    refresh_fleet();
    let refresh = |path: &Path| {
        let response = http()
            .post(depot.url("/api/v1/ota/metadata"))
            .bearer_auth(&depot.token)
            .json(&json!({"path": path}))
            .send()
            .unwrap();
        (
            response.status().as_u16(),
            response.json::<Value>().unwrap(),
        )
    };
    let (status, newest) = refresh(&fleet.repo);
    assert_eq!(status, 200, "{newest}");
    let mirrored = || {
        std::fs::read(
            depot
                .server
                .data_dir
                .join("ota/mirror/metadata/timestamp.json"),
        )
        .unwrap()
    };
    let before = mirrored();
    let (status, body) = refresh(&replay);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (422, Some("metadata_rollback")),
        "{body}"
    );
    assert_eq!(mirrored(), before);
    let outcomes: Vec<Value> = audit(&depot, "image.metadata_refresh")
        .iter()
        .map(|r| r["result"].clone())
        .collect();
    assert_eq!(
        outcomes.iter().filter(|o| *o == "ok").count(),
        2,
        "{outcomes:?}"
    );
    assert_eq!(
        outcomes.iter().filter(|o| *o == "failed").count(),
        1,
        "{outcomes:?}"
    );
    // A viewer may not change what the depot trusts.
    let viewer = depot.server.token("viewer");
    let response = http()
        .post(depot.url("/api/v1/ota/metadata"))
        .bearer_auth(viewer)
        .json(&json!({"path": fleet.repo}))
        .send()
        .unwrap();
    assert_eq!(response.status(), 403);
}

fn progress_done(state: &Path) -> usize {
    let file = std::fs::read_dir(state)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("pull-")
        })
        .expect("a progress file");
    let progress: Value = serde_json::from_slice(&std::fs::read(file).unwrap()).unwrap();
    hex::decode(progress["done"].as_str().unwrap())
        .unwrap()
        .iter()
        .map(|b| b.count_ones() as usize)
        .sum()
}

#[test]
fn an_interrupted_pull_resumes_and_fetches_only_what_it_lacks() {
    let t = setup(6 * MIB, 12);
    t.depot.assign("veh-1", "1.1.0").unwrap();
    let vehicle = Vehicle::new(t.dir.path(), "veh-1", &t.fleet, &t.v1).unwrap();

    // Undocked after five chunks.
    let (status, first) = vehicle
        .pull(&t.depot, &["--stop-after-chunks", "5"])
        .unwrap();
    assert_eq!(status.code(), Some(75), "{first}");
    assert_eq!(first["chunks_fetched"], 5);
    let total = first["chunks_total"].as_u64().unwrap();
    let reused = first["chunks_reused"].as_u64().unwrap();
    assert_eq!(progress_done(&vehicle.state) as u64, reused + 5);

    // Killed mid-pull, with the depot capped so that the pull takes a while.
    http()
        .put(t.depot.url("/api/v1/bandwidth"))
        .bearer_auth(&t.depot.token)
        .json(&json!({"bytes_per_second": 512 * 1024}))
        .send()
        .unwrap();
    let mut child = atlasmesh_tests::atlasmesh()
        .args([
            "vehicle",
            "pull",
            "--depot",
            &t.depot.url("/"),
            "--vehicle",
            "veh-1",
        ])
        .args([
            "--slot",
            s(&vehicle.slot),
            "--current",
            s(&vehicle.current),
            "--state",
            s(&vehicle.state),
        ])
        .args(["--concurrency", "2"])
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(2500));
    child.kill().unwrap();
    child.wait().unwrap();
    let done = progress_done(&vehicle.state) as u64;
    assert!(done > reused + 5, "progress was recorded before the kill");
    http()
        .put(t.depot.url("/api/v1/bandwidth"))
        .bearer_auth(&t.depot.token)
        .json(&json!({"bytes_per_second": null}))
        .send()
        .unwrap();

    // The last pull resumes: it fetches exactly the chunks not yet verified on disk.
    let (status, last) = vehicle.pull(&t.depot, &[]).unwrap();
    assert!(status.success(), "{last}");
    assert_eq!(last["chunks_resumed"].as_u64().unwrap(), done);
    assert_eq!(last["chunks_reused"], 0);
    assert_eq!(last["chunks_fetched"].as_u64().unwrap(), total - done);
    assert_eq!(std::fs::read(&vehicle.slot).unwrap(), t.v2);
}

#[test]
fn root_rotation_reaches_depots_vehicles_and_python_tuf() {
    let fleet = Fleet::new().unwrap();
    let v1 = random_bytes(MIB, 90);
    let v2 = variant(&v1, 91, 2, 10_000, 100);
    fleet.add(HW, "1.0.0", &v1, &[]).unwrap();
    let depot = OtaDepot::start(&fleet, &[]).unwrap();
    assert_eq!(
        depot.stage_dir(&fleet.repo, HW, "1.0.0").unwrap()["state"],
        "staged"
    );

    // Release engineering replaces the root key, then releases 1.1.0 under the new root.
    let new_key = fleet.dir.path().join("new-root.pem");
    release(&["keygen", "--out", s(&new_key)]).unwrap();
    let rotated = release(&[
        "rotate",
        "--keys",
        s(&fleet.keys),
        "--repo",
        s(&fleet.repo),
        "--role",
        "root",
        "--new-key",
        s(&new_key),
    ])
    .unwrap();
    assert_eq!(rotated["root_version"], 2);
    fleet.add(HW, "1.1.0", &v2, &[]).unwrap();

    // A forged rotation, signed by the new key alone, is refused by a depot.
    let forged = fleet.snapshot("forged").unwrap();
    let root1: Value = serde_json::from_slice(&std::fs::read(fleet.root()).unwrap()).unwrap();
    let old_id = root1["signed"]["roles"]["root"]["keyids"][0].clone();
    let root2_path = forged.join("metadata/2.root.json");
    let mut root2: Value = serde_json::from_slice(&std::fs::read(&root2_path).unwrap()).unwrap();
    root2["signatures"] = json!(
        root2["signatures"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|s| s["keyid"] != old_id)
            .cloned()
            .collect::<Vec<_>>()
    );
    std::fs::write(&root2_path, serde_json::to_vec(&root2).unwrap()).unwrap();
    let fresh = OtaDepot::start(&fleet, &[]).unwrap();
    let job = fresh.stage_dir(&forged, HW, "1.1.0").unwrap();
    assert_eq!(job["state"], "failed", "{job}");
    assert_eq!(job["error_code"], "bad_signature", "{job}");

    // The genuine rotation is followed by the depot, a vehicle and python-tuf, all of which
    // were provisioned with root version 1.
    assert_eq!(
        depot.stage_dir(&fleet.repo, HW, "1.1.0").unwrap()["state"],
        "staged"
    );
    depot.certify(&fleet).unwrap();
    depot.assign("veh-1", "1.1.0").unwrap();
    let dir = tempfile::tempdir().unwrap();
    let vehicle = Vehicle::new(dir.path(), "veh-1", &fleet, &v1).unwrap();
    let (status, report) = vehicle.pull(&depot, &[]).unwrap();
    assert!(status.success(), "{report}");
    assert_eq!(std::fs::read(&vehicle.slot).unwrap(), v2);
    let out = dir.path().join("py.img");
    let (code, got) = tuf_client(
        &depot,
        "image",
        &fleet.root(),
        &dir.path().join("py"),
        Some((&format!("{HW}_1.1.0.img"), &out)),
    )
    .unwrap();
    assert_eq!(code, 0, "{got}");
    assert!(
        depot
            .server
            .data_dir
            .join("ota/mirror/metadata/2.root.json")
            .is_file()
    );
}

/// Splits one raw HTTP/1.1 response off the front of `raw`: (head, body), given whether the
/// response has a body (not for HEAD).
fn split_response(raw: &mut Vec<u8>, with_body: bool) -> (String, Vec<u8>) {
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a complete head")
        + 4;
    let head = String::from_utf8(raw[..end].to_vec()).unwrap();
    let length: usize = head
        .lines()
        .find_map(|l| {
            l.to_ascii_lowercase()
                .strip_prefix("content-length: ")
                .map(|v| v.trim().parse().unwrap())
        })
        .expect("content-length");
    let body_len = if with_body { length } else { 0 };
    let body = raw[end..end + body_len].to_vec();
    raw.drain(..end + body_len);
    (head, body)
}

#[test]
fn bulk_reads_and_api_calls_share_one_keep_alive_connection() {
    // Image ranges go out with sendfile on the server's own HTTP/1 path; anything else on the
    // same connection must still reach the router, in order, pipelined or not.
    let t = setup(MIB, 2);
    let sha = t.depot.get("/api/v1/images/1.0.0").unwrap()["sha256"]
        .as_str()
        .unwrap()
        .to_owned();
    let addr = t
        .depot
        .url("/")
        .trim_start_matches("http://")
        .trim_end_matches('/')
        .to_owned();
    let mut stream = TcpStream::connect(&addr).unwrap();
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    write!(
        stream,
        "GET /images/{sha}.img HTTP/1.1\r\nHost: depot\r\nRange: bytes=10-19\r\n\r\n\
         HEAD /images/{sha}.img HTTP/1.1\r\nHost: depot\r\n\r\n\
         GET /images/{sha}.img HTTP/1.1\r\nHost: depot\r\nRange: bytes=999999999-\r\n\r\n\
         GET /health HTTP/1.1\r\nHost: depot\r\n\r\n\
         GET /chunks/{sha} HTTP/1.1\r\nHost: depot\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).unwrap();

    let (head, body) = split_response(&mut raw, true);
    assert!(
        head.starts_with("HTTP/1.1 206 Partial Content\r\n"),
        "{head}"
    );
    assert!(
        head.contains(&format!("content-range: bytes 10-19/{}", t.v1.len())),
        "{head}"
    );
    assert!(
        head.contains("x-request-id: ") && head.contains("traceparent: 00-"),
        "{head}"
    );
    assert_eq!(body, &t.v1[10..20]);

    let (head, _) = split_response(&mut raw, false);
    assert!(head.starts_with("HTTP/1.1 200 OK\r\n"), "{head}");
    assert!(
        head.contains(&format!("content-length: {}", t.v1.len())),
        "{head}"
    );

    let (head, body) = split_response(&mut raw, true);
    assert!(head.starts_with("HTTP/1.1 416"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("range_not_satisfiable"));

    let (head, body) = split_response(&mut raw, true);
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(String::from_utf8_lossy(&body).contains("healthy"));

    // An image hash is not a chunk: the router's 404, and the connection closes as asked.
    let (head, _) = split_response(&mut raw, true);
    assert!(head.starts_with("HTTP/1.1 404"), "{head}");
    assert!(raw.is_empty(), "nothing after the last response");

    let metrics = http()
        .get(t.depot.url("/metrics"))
        .send()
        .unwrap()
        .text()
        .unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("atlasmesh_http_requests_total")
                && l.contains("route=\"/images/{name}\"")
                && l.contains("status=\"206\"")),
        "bulk reads are counted like any request"
    );
}
