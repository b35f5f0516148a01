//! The panel in a real browser: Debian's chromium, headless, driven over WebDriver
//! (chromedriver) by fantoccini. Signs in, sees the overview go live, saves a screenshot.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use atlasmesh_tests::{Server, artifacts_dir, free_port};
use fantoccini::{ClientBuilder, Locator};
use serde_json::json;

const CHROMIUM: &str = "/usr/bin/chromium";
const CHROMEDRIVER: &str = "/usr/bin/chromedriver";

struct Driver {
    child: Child,
    url: String,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn start_chromedriver() -> Driver {
    assert!(
        std::path::Path::new(CHROMEDRIVER).exists() && std::path::Path::new(CHROMIUM).exists(),
        "chromium and chromium-driver are not installed; tests/run installs them"
    );
    let port = free_port();
    let child = Command::new(CHROMEDRIVER)
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("starting chromedriver");
    let url = format!("http://127.0.0.1:{port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while reqwest::blocking::get(format!("{url}/status")).is_err() {
        assert!(Instant::now() < deadline, "chromedriver did not come up");
        std::thread::sleep(Duration::from_millis(100));
    }
    Driver { child, url }
}

fn capabilities(profile: &std::path::Path) -> serde_json::Map<String, serde_json::Value> {
    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1366,900",
                format!("--user-data-dir={}", profile.display()),
            ],
        }),
    );
    caps
}

/// chromedriver and a headless chromium session on a fresh profile (kept while the session
/// lives).
async fn open_browser() -> (Driver, tempfile::TempDir, fantoccini::Client) {
    let driver = tokio::task::spawn_blocking(start_chromedriver)
        .await
        .unwrap();
    let profile = tempfile::tempdir().unwrap();
    // chromedriver listens on loopback in plain HTTP; no TLS stack is needed to reach it.
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(capabilities(profile.path()))
        .connect(&driver.url)
        .await
        .expect("connecting to chromedriver");
    (driver, profile, client)
}

async fn sign_in(
    client: &fantoccini::Client,
    depot: &Server,
    password: &str,
) -> Result<(), fantoccini::error::CmdError> {
    client.goto(&depot.url("/login")).await?;
    client
        .find(Locator::Css("input[name=username]"))
        .await?
        .send_keys("admin")
        .await?;
    client
        .find(Locator::Css("input[name=password]"))
        .await?
        .send_keys(password)
        .await?;
    client
        .find(Locator::Css("button[type=submit]"))
        .await?
        .click()
        .await?;
    client.wait().for_element(Locator::Css("main h1")).await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn technician_stages_and_validates_an_image_in_the_panel() {
    let (fleet, depot, bundle) = tokio::task::spawn_blocking(|| {
        let fleet = atlasmesh_tests::ota::Fleet::new().unwrap();
        fleet
            .add(
                "veh-gen2",
                "2.4.0",
                &atlasmesh_tests::ota::random_bytes(3 << 20, 7),
                &["--notes", "Winter traction control"],
            )
            .unwrap();
        let bundle = fleet.bundle("veh-gen2", "2.4.0").unwrap();
        let depot = atlasmesh_tests::ota::OtaDepot::start(&fleet, &[]).unwrap();
        (fleet, depot, bundle)
    })
    .await
    .unwrap();
    let password = depot.server.admin_password();
    let (driver, _profile, client) = open_browser().await;
    let result = async {
        sign_in(&client, &depot.server, &password).await?;
        client.goto(&depot.server.url("/ota")).await?;
        let heading = client.wait().for_element(Locator::Css("main h1")).await?;
        assert_eq!(heading.text().await?, "OTA images");
        // Upload the bundle through the panel's form, as a technician at the depot would.
        client
            .find(Locator::Css("form[data-upload] input[type=file]"))
            .await?
            .send_keys(bundle.to_str().unwrap())
            .await?;
        client
            .find(Locator::Css("form[data-upload] button[type=submit]"))
            .await?
            .click()
            .await?;
        let row = client
            .wait()
            .at_most(Duration::from_secs(30))
            .for_element(Locator::XPath("//table//td/strong[text()='2.4.0']"))
            .await?;
        assert_eq!(row.text().await?, "2.4.0");
        let page = client.find(Locator::Css("main")).await?.text().await?;
        assert!(page.contains("Winter traction control"), "{page}");
        assert!(page.to_lowercase().contains("verified"), "{page}");
        // Validate re-reads the image on the depot and reports it intact.
        client
            .find(Locator::Css("button[data-validate]"))
            .await?
            .click()
            .await?;
        client
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::XPath("//button[@data-validate][text()='Intact']"))
            .await?;
        let png = client.screenshot().await?;
        std::fs::write(artifacts_dir().join("panel-ota.png"), &png).expect("saving the screenshot");
        Ok::<_, fantoccini::error::CmdError>(())
    }
    .await;
    client.close().await.ok();
    drop(driver);
    let audit = tokio::task::spawn_blocking(move || {
        let audit = depot.get("/api/v1/audit?action=image.stage").unwrap();
        drop((fleet, depot));
        audit
    })
    .await
    .unwrap();
    result.expect("browser session");
    assert_eq!(
        audit["records"][0]["result"], "ok",
        "the panel upload is audited: {audit}"
    );
    assert_eq!(audit["records"][0]["actor"], "user:admin");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn technician_signs_in_and_sees_the_live_overview() {
    let depot = tokio::task::spawn_blocking(Server::depot).await.unwrap();
    let password = depot.admin_password();
    let (driver, _profile, client) = open_browser().await;

    let result = async {
        // Not signed in: the panel sends us to the sign-in page.
        client.goto(&depot.url("/")).await?;
        let url = client.current_url().await?;
        assert_eq!(url.path(), "/login", "{url}");

        client
            .find(Locator::Css("input[name=username]"))
            .await?
            .send_keys("admin")
            .await?;
        client
            .find(Locator::Css("input[name=password]"))
            .await?
            .send_keys(&password)
            .await?;
        client
            .find(Locator::Css("button[type=submit]"))
            .await?
            .click()
            .await?;

        let heading = client.wait().for_element(Locator::Css("main h1")).await?;
        assert_eq!(heading.text().await?, "Overview");
        // WebDriver returns text as rendered, and card titles are upper-cased by the style sheet.
        let body = client
            .find(Locator::Css("body"))
            .await?
            .text()
            .await?
            .to_lowercase();
        for expected in [
            "atlasmesh depot",
            "cpu",
            "memory",
            "data filesystem",
            "uptime",
        ] {
            assert!(
                body.contains(expected),
                "overview lacks {expected:?}:\n{body}"
            );
        }
        // The script connects to the depot's event stream and marks the page live.
        client
            .wait()
            .at_most(Duration::from_secs(15))
            .for_element(Locator::Css("[data-live-indicator][data-state=live]"))
            .await?;

        let png = client.screenshot().await?;
        assert!(png.starts_with(b"\x89PNG"), "a PNG screenshot");
        let path = artifacts_dir().join("panel-overview.png");
        std::fs::write(&path, &png).expect("saving the screenshot");
        eprintln!("screenshot saved to {}", path.display());

        // Navigation reaches the other sections, which say honestly what is not there yet.
        client
            .find(Locator::LinkText("Audit"))
            .await?
            .click()
            .await?;
        let heading = client.wait().for_element(Locator::Css("main h1")).await?;
        assert_eq!(heading.text().await?, "Audit log");
        let table = client
            .find(Locator::Css("table.data"))
            .await?
            .text()
            .await?;
        assert!(
            table.contains("session.login"),
            "the sign-in is in the audit log:\n{table}"
        );
        Ok::<_, fantoccini::error::CmdError>(())
    }
    .await;
    client.close().await.ok();
    drop(driver);
    drop(depot);
    result.expect("browser session");
}

/// A depot started with `args` (a simulated fleet), off the async runtime.
async fn simulated_depot(args: &[&str]) -> Server {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    tokio::task::spawn_blocking(move || {
        Server::start(atlasmesh_tests::Options {
            args,
            ..Default::default()
        })
        .unwrap()
    })
    .await
    .unwrap()
}

/// README's run command (`atlasmesh depot --simulate-fleet N`): a newcomer sees docked
/// vehicles on the panel within a minute, and the Vehicles page updates by itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simulated_fleet_shows_docked_vehicles_on_the_panel() {
    let depot = simulated_depot(&["--simulate-fleet", "12"]).await;
    let password = depot.admin_password();
    let (driver, _profile, client) = open_browser().await;
    let started = Instant::now();
    let result = async {
        sign_in(&client, &depot, &password).await?;
        client
            .wait()
            .at_most(Duration::from_secs(60))
            .for_element(Locator::Css("[data-bay-board] .bay[data-state=occupied]"))
            .await?;
        assert!(started.elapsed() < Duration::from_secs(60));
        let board = client
            .find(Locator::Css("[data-bay-board]"))
            .await?
            .text()
            .await?;
        assert!(board.contains("sim-"), "bay board:\n{board}");
        let png = client.screenshot().await?;
        std::fs::write(artifacts_dir().join("panel-bays.png"), &png).expect("screenshot");

        client.goto(&depot.url("/vehicles")).await?;
        let heading = client.wait().for_element(Locator::Css("main h1")).await?;
        assert_eq!(heading.text().await?, "Vehicles");
        let rows = client
            .find_all(Locator::Css("tbody[data-vehicles] tr"))
            .await?;
        assert_eq!(rows.len(), 12);
        // Live: the table changes without a reload as vehicles report (every 5 s each).
        let table = client.find(Locator::Css("tbody[data-vehicles]")).await?;
        let before = table.text().await?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            tokio::time::sleep(Duration::from_millis(500)).await;
            if table.text().await? != before {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "the Vehicles page did not update live"
            );
        }
        let png = client.screenshot().await?;
        std::fs::write(artifacts_dir().join("panel-vehicles.png"), &png).expect("screenshot");
        Ok::<_, fantoccini::error::CmdError>(())
    }
    .await;
    client.close().await.ok();
    drop(driver);
    drop(depot);
    result.expect("browser session");
}

/// Starts a rollout from the Rollouts page's form.
async fn start_rollout(
    client: &fantoccini::Client,
    depot: &Server,
    version: &str,
) -> Result<(), fantoccini::error::CmdError> {
    client.goto(&depot.url("/rollouts")).await?;
    let form = client
        .wait()
        .for_element(Locator::Css("form[data-json=rollout]"))
        .await?;
    for (name, value) in [
        ("version", version),
        ("canary", "3"),
        ("threshold", "80"),
        ("confidence", "80"),
    ] {
        form.find(Locator::Css(&format!("input[name={name}]")))
            .await?
            .send_keys(value)
            .await?;
    }
    form.find(Locator::Css("button[type=submit]"))
        .await?
        .click()
        .await?;
    Ok(())
}

/// Waits until the current rollout's card (live, without reloads) says `phase`; returns its
/// text.
async fn rollout_reaches(
    client: &fantoccini::Client,
    phase: &str,
    limit: Duration,
) -> Result<String, fantoccini::error::CmdError> {
    let deadline = Instant::now() + limit;
    loop {
        let text = match client.find(Locator::Css("section[data-rollout]")).await {
            Ok(card) => card.text().await.unwrap_or_default(),
            Err(_) => String::new(),
        };
        if text.to_lowercase().contains(phase) {
            return Ok(text);
        }
        assert!(
            Instant::now() < deadline,
            "the rollout did not reach {phase}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

/// The simulator's demo: `depot --simulate-fleet` stages a good and a bad release; from the
/// Rollouts page a technician takes the good one through its waves and watches the bad one
/// halt, the gate saying why, then rolls it back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_demo_fleet_shows_a_good_and_a_bad_release_on_the_rollouts_page() {
    let depot = simulated_depot(&["--simulate-fleet", "12", "--sim-second", "200ms"]).await;
    let password = depot.admin_password();
    let (driver, _profile, client) = open_browser().await;
    let result = async {
        sign_in(&client, &depot, &password).await?;
        start_rollout(&client, &depot, "1.1.0").await?;
        let card = rollout_reaches(&client, "running", Duration::from_secs(10)).await?;
        assert!(card.contains("1.1.0"), "{card}");
        let card = rollout_reaches(&client, "completed", Duration::from_secs(180)).await?;
        assert!(
            card.to_lowercase().contains("lower bound"),
            "gate statistics shown:\n{card}"
        );
        client.execute("window.scrollTo(0, 0)", vec![]).await?;
        let png = client.screenshot().await?;
        std::fs::write(artifacts_dir().join("panel-rollout-good.png"), &png).expect("screenshot");

        start_rollout(&client, &depot, "1.2.0").await?;
        let card = rollout_reaches(&client, "halted", Duration::from_secs(180)).await?;
        let page = client.find(Locator::Css("main")).await?.text().await?;
        assert!(
            page.to_lowercase().contains("cannot pass the gate"),
            "the decision log says why:\n{page}"
        );
        assert!(card.contains("1.2.0"), "{card}");
        client.execute("window.scrollTo(0, 0)", vec![]).await?;
        let png = client.screenshot().await?;
        std::fs::write(artifacts_dir().join("panel-rollout-bad.png"), &png).expect("screenshot");

        // Rolling back asks first.
        client
            .find(Locator::Css("button[data-api-button$='/rollback']"))
            .await?
            .click()
            .await?;
        client.accept_alert().await?;
        rollout_reaches(&client, "rolled back", Duration::from_secs(60)).await?;
        Ok::<_, fantoccini::error::CmdError>(())
    }
    .await;
    client.close().await.ok();
    drop(driver);
    drop(depot);
    result.expect("browser session");
}

/// The text of the first element matching `css`.
async fn text_of(client: &fantoccini::Client, css: &str) -> String {
    client
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no {css}: {e}"))
        .text()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_disks_page_shows_verdicts_reasons_trends_and_the_staging_hold() {
    use atlasmesh_tests::smart::{FakeSmartctl, ata_with_reallocated};
    let (_fake, depot) = tokio::task::spawn_blocking(|| {
        let fake = FakeSmartctl::new(&[
            ("/dev/sda", None),
            ("/dev/nvme0", Some("smartctl-scrutiny/smart-nvme.json")),
        ]);
        fake.set("/dev/sda", &ata_with_reallocated(0));
        let depot = Server::start(atlasmesh_tests::Options {
            env: vec![
                (
                    "ATLASMESH_DISKS__SMARTCTL".into(),
                    fake.path().display().to_string(),
                ),
                ("ATLASMESH_DISKS__STORE_DEVICE".into(), "/dev/sda".into()),
            ],
            ..Default::default()
        })
        .unwrap();
        let token = depot.token("technician");
        let http = atlasmesh_tests::http();
        let deadline = Instant::now() + Duration::from_secs(30);
        while http
            .get(depot.url("/api/v1/disks"))
            .bearer_auth(&token)
            .send()
            .unwrap()
            .json::<serde_json::Value>()
            .unwrap()["checked_at"]
            .is_null()
        {
            assert!(Instant::now() < deadline, "no first disk reading");
            std::thread::sleep(Duration::from_millis(200));
        }
        // A second reading a second later, with the store disk losing sectors: a trend and a
        // warning.
        std::thread::sleep(Duration::from_millis(1100));
        fake.set("/dev/sda", &ata_with_reallocated(3));
        let r = http
            .post(depot.url("/api/v1/disks/check"))
            .bearer_auth(&token)
            .send()
            .unwrap();
        assert!(r.status().is_success());
        (fake, depot)
    })
    .await
    .unwrap();
    let (_driver, _profile, client) = open_browser().await;
    sign_in(&client, &depot, &depot.admin_password())
        .await
        .unwrap();
    client.goto(&depot.url("/disks")).await.unwrap();
    let banner = text_of(&client, "[data-disk-banner]").await;
    assert!(
        banner.contains("Staging new images is held") && banner.contains("/dev/sda"),
        "{banner}"
    );
    let sda = client
        .find(Locator::Css("[data-disk='9RK1XXXX']"))
        .await
        .unwrap();
    let verdict = text_of(&client, "[data-disk='9RK1XXXX'] h2 [data-verdict]").await;
    // Pills are upper-cased by the style sheet.
    assert_eq!(verdict.to_lowercase(), "warning");
    let reasons = text_of(&client, "[data-disk='9RK1XXXX'] ul.reasons").await;
    assert!(reasons.contains("rose from 0 to 3"), "{reasons}");
    let chart = sda
        .find(Locator::Css("[data-trend='Reallocated sectors'] polyline"))
        .await
        .unwrap();
    let points = chart.attr("points").await.unwrap().unwrap_or_default();
    assert_eq!(points.split(' ').count(), 2, "{points}");
    let tests = sda
        .find_all(Locator::Css("[data-self-tests] tbody tr"))
        .await
        .unwrap();
    assert!(!tests.is_empty());
    let nvme = text_of(&client, "[data-disk='BTNH93710FS91P0B'] h2 [data-verdict]").await;
    assert_eq!(nvme.to_lowercase(), "passed");
    let alerts = text_of(&client, "[data-disk-alerts]").await;
    assert!(alerts.contains("passed → warning"), "{alerts}");
    let png = client.screenshot().await.unwrap();
    std::fs::write(artifacts_dir().join("panel-disks.png"), png).unwrap();
    // The banner follows the technician to every page while the hold lasts.
    client.goto(&depot.url("/")).await.unwrap();
    assert!(
        client
            .find(Locator::Css("[data-disk-banner]"))
            .await
            .is_ok()
    );
    client.close().await.unwrap();
}

/// `atlasmesh depot --simulate-fleet 10 --chargers 10`: simulated Modbus chargers at the
/// bays, vehicles with morning departures; the Charging page shows the night's plan as a
/// chart, stacked by vehicle under the site limit, and every charger answering, updating
/// without reloads. A technician's priority and an admin's site limit are set from its forms.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_charging_page_charts_a_night_of_simulated_depot_charging() {
    let depot = simulated_depot(&["--simulate-fleet", "10", "--chargers", "10"]).await;
    let password = depot.admin_password();
    let (driver, _profile, client) = open_browser().await;
    let result = async {
        sign_in(&client, &depot, &password).await?;
        client.goto(&depot.url("/charging")).await?;
        // The plan appears after the first polls; the open page picks it up by itself.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let bars = client
                .find_all(Locator::Css("[data-charging-chart] rect[data-vehicle]"))
                .await?;
            let ok = client
                .find_all(Locator::Css("tr[data-charger][data-status=ok]"))
                .await?;
            // Known vehicles (from the vehicle link) rather than only plugged chargers.
            let known = client
                .find_all(Locator::Css("[data-charging-chart] rect[data-vehicle^=sim-0]"))
                .await?;
            if bars.len() > 20 && ok.len() == 10 && !known.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                let html = client.source().await?;
                std::fs::write(artifacts_dir().join("panel-charging.html"), &html).expect("page");
                panic!(
                    "no chart of ten answering chargers within 60 s: {} bars, {} ok (page in panel-charging.html)",
                    bars.len(),
                    ok.len()
                );
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        }
        let limit = client
            .find(Locator::Css("[data-charging-chart] line[data-site-limit]"))
            .await?;
        assert_eq!(limit.attr("data-site-limit").await?.as_deref(), Some("150"));
        let legend = client
            .find(Locator::Css("[data-charging-chart] .legend"))
            .await?
            .text()
            .await?;
        assert!(legend.contains("sim-0001"), "legend: {legend}");
        let png = client.screenshot().await?;
        std::fs::write(artifacts_dir().join("panel-charging.png"), &png).expect("screenshot");

        let table = client
            .find(Locator::Css("[data-charging-vehicles]"))
            .await?;
        client
            .execute("arguments[0].scrollIntoView()", vec![serde_json::to_value(&table)?])
            .await?;
        let table = table.screenshot().await?;
        std::fs::write(artifacts_dir().join("panel-charging-vehicles.png"), &table)
            .expect("screenshot");
        // Priority 7 for the first vehicle listed, from its row's form; its departure is left
        // to the vehicle (no override is saved with the priority).
        let row = client
            .find(Locator::Css("tr[data-charging-vehicle]"))
            .await?;
        let vehicle = row.attr("data-charging-vehicle").await?.expect("vehicle id");
        let priority = row.find(Locator::Css("input[name=priority]")).await?;
        priority.clear().await?;
        priority.send_keys("7").await?;
        row.find(Locator::Css("button[type=submit]"))
            .await?
            .click()
            .await?;
        let selector = format!("tr[data-charging-vehicle=\"{vehicle}\"] input[name=priority][value=\"7\"]");
        client
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css(&selector))
            .await?;
        let departure = client
            .find(Locator::Css(&format!(
                "tr[data-charging-vehicle=\"{vehicle}\"] input[name=departure]"
            )))
            .await?
            .prop("value")
            .await?;
        assert_eq!(departure.as_deref(), Some(""), "no departure override");
        // A tariff typed with decimal commas is refused in the page, not misread.
        let form = client
            .find(Locator::Css("form[data-json=charging-site]"))
            .await?;
        let tariff = form.find(Locator::Css("textarea[name=tariff]")).await?;
        tariff.clear().await?;
        tariff.send_keys("0,25 0,30").await?;
        form.find(Locator::Css("button[type=submit]"))
            .await?
            .click()
            .await?;
        let error = text_of(&client, "[data-api-error]").await;
        assert!(error.contains("\"0,25\" is not a price"), "{error}");
        client.refresh().await?;

        // A site limit of 120 kW from the admin's form reaches the chart.
        let form = client
            .find(Locator::Css("form[data-json=charging-site]"))
            .await?;
        let limit = form.find(Locator::Css("input[name=limit_kw]")).await?;
        limit.clear().await?;
        limit.send_keys("120").await?;
        form.find(Locator::Css("button[type=submit]"))
            .await?
            .click()
            .await?;
        client
            .wait()
            .at_most(Duration::from_secs(30))
            .for_element(Locator::Css(
                "[data-charging-chart] line[data-site-limit=\"120\"]",
            ))
            .await?;
        let site = text_of(&client, "[data-charging-site]").await;
        assert!(site.contains("120 kW") && site.contains("set by"), "{site}");
        Ok::<_, fantoccini::error::CmdError>(())
    }
    .await;
    client.close().await.ok();
    drop(driver);
    drop(depot);
    result.expect("browser session");
}
