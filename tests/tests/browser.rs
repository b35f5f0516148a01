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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn technician_signs_in_and_sees_the_live_overview() {
    let depot = tokio::task::spawn_blocking(Server::depot).await.unwrap();
    let password = depot.admin_password();
    let driver = tokio::task::spawn_blocking(start_chromedriver)
        .await
        .unwrap();
    let profile = tempfile::tempdir().unwrap();

    let mut caps = serde_json::Map::new();
    caps.insert(
        "goog:chromeOptions".into(),
        json!({
            "binary": CHROMIUM,
            "args": [
                "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--no-first-run", "--window-size=1366,900",
                format!("--user-data-dir={}", profile.path().display()),
            ],
        }),
    );
    // chromedriver listens on loopback in plain HTTP; no TLS stack is needed to reach it.
    let client = ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
        .capabilities(caps)
        .connect(&driver.url)
        .await
        .expect("connecting to chromedriver");

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
