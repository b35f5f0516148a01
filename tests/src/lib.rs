//! # atlasmesh-tests
//!
//! End-to-end tests: each starts the real `atlasmesh` binary on a free port with its own data
//! directory and talks to it as users and vehicles do (HTTP clients, a browser, and the real
//! peers later issues bring). This library holds the harness; the tests are in `tests/`.
//!
//! Must not: reach into the binary's internals, or stub any of our own servers. Everything is
//! observed from outside, through the same interfaces people and machines use.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};

pub mod bench;
pub mod mqtt;
pub mod ota;
pub mod smart;

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_owned()
}

/// Where tests leave artifacts (screenshots, logs) for people to look at.
pub fn artifacts_dir() -> PathBuf {
    let dir = target_dir().join("test-artifacts");
    std::fs::create_dir_all(&dir).expect("creating the artifacts directory");
    dir
}

fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"))
}

/// The `atlasmesh` binary of the same profile as this test, built once per test process if
/// it is missing or stale (cargo decides; a no-op when `tests/run` already built it).
///
/// It is built by the very command the test run uses (`cargo test --workspace --no-run`; the
/// appliance's own integration tests make cargo build the binary). Any other build command
/// (`cargo build -p ...`) unifies features or picks profiles differently, and each build
/// would undo the other.
pub fn atlasmesh_bin() -> PathBuf {
    if let Some(bin) = BINARY_OVERRIDE.get() {
        return bin.clone();
    }
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        // Test executables live in target/<profile>/deps/.
        let exe = std::env::current_exe().expect("current test executable");
        let profile_dir = exe
            .parent()
            .and_then(Path::parent)
            .expect("target/<profile>");
        let release = profile_dir.file_name().is_some_and(|n| n == "release");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut build = Command::new(cargo);
        build
            .current_dir(workspace_root())
            .args(["test", "--quiet", "--workspace", "--no-run"]);
        if release {
            build.arg("--release");
        }
        // Cargo sets per-package variables for the test process (CARGO_MANIFEST_DIR and
        // friends). Build scripts track some of them (ring's does), so passing them on would
        // make this build look different from the one that made the test, and rebuild.
        for (key, _) in std::env::vars_os() {
            let key = key.to_string_lossy();
            let per_package = [
                "CARGO_MANIFEST_",
                "CARGO_PKG_",
                "CARGO_CRATE_",
                "CARGO_BIN_",
                "CARGO_PRIMARY_",
                "CARGO_TARGET_TMPDIR",
                "CARGO_RUSTC_CURRENT_DIR",
                "OUT_DIR",
                "NEXTEST",
            ];
            if per_package.iter().any(|p| key.starts_with(p)) {
                build.env_remove(key.as_ref());
            }
        }
        let status = build
            .status()
            .expect("running cargo build for the atlasmesh binary");
        assert!(status.success(), "building the atlasmesh binary failed");
        let bin = profile_dir.join("atlasmesh");
        assert!(
            bin.is_file(),
            "{} is missing after the build",
            bin.display()
        );
        bin
    })
    .clone()
}

static BINARY_OVERRIDE: OnceLock<PathBuf> = OnceLock::new();

/// Makes the harness run `bin` instead of building one (benchmarks use the release build).
pub fn use_binary(bin: PathBuf) {
    let _ = BINARY_OVERRIDE.set(bin);
}

/// A `Command` for the binary with a clean environment: no `ATLASMESH_*` variable of the
/// developer's shell leaks into a test.
pub fn atlasmesh() -> Command {
    let mut cmd = Command::new(atlasmesh_bin());
    for (key, _) in std::env::vars_os() {
        if key.to_string_lossy().starts_with("ATLASMESH_") {
            cmd.env_remove(key);
        }
    }
    cmd
}

/// Runs a command to completion; returns (status, stdout, stderr).
pub fn run(cmd: &mut Command) -> Result<(ExitStatus, String, String)> {
    let out = cmd.output().context("running atlasmesh")?;
    Ok((
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    ))
}

/// The writing end of a pipe whose reader has gone, for a command's stdout: what
/// `atlasmesh ... | head -1` becomes once head has exited. Every write to it fails with EPIPE.
pub fn closed_pipe() -> std::io::PipeWriter {
    let (reader, writer) = std::io::pipe().expect("a pipe");
    drop(reader);
    writer
}

/// A running `atlasmesh depot` (or `cloud`) process.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// The vehicle broker: `host:port` of the embedded one, or the external broker's URL.
    pub mqtt: Option<String>,
    pub data_dir: PathBuf,
    pub scheme: &'static str,
    logs: Arc<Mutex<Vec<String>>>,
    // Keeps a temporary data dir alive as long as the server.
    _temp: Option<tempfile::TempDir>,
}

/// How to start a server.
#[derive(Default, Clone)]
pub struct Options {
    pub mode: Mode,
    pub data_dir: Option<PathBuf>,
    pub env: Vec<(String, String)>,
    pub args: Vec<String>,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    #[default]
    Depot,
    Cloud,
}

impl Server {
    /// A depot on a fresh data directory.
    pub fn depot() -> Server {
        Self::start(Options::default()).expect("starting the depot")
    }

    pub fn start(options: Options) -> Result<Server> {
        let (temp, data_dir) = match options.data_dir {
            Some(dir) => (None, dir),
            None => {
                let temp = tempfile::tempdir()?;
                let dir = temp.path().join("data");
                (Some(temp), dir)
            }
        };
        let mut cmd = atlasmesh();
        match options.mode {
            Mode::Depot => cmd.arg("depot"),
            Mode::Cloud => cmd.arg("cloud"),
        };
        cmd.arg("--data-dir").arg(&data_dir);
        // A free port unless the test fixes one (to restart on the same address).
        if !options.args.iter().any(|a| a == "--http") {
            cmd.args(["--http", "127.0.0.1:0"]);
        }
        if options.mode == Mode::Cloud && !options.args.iter().any(|a| a == "--grpc") {
            cmd.args(["--grpc", "127.0.0.1:0"]);
        }
        cmd.args(&options.args);
        cmd.env("ATLASMESH_LOG__LEVEL", "info");
        // Tests run side by side: the embedded broker takes a free port, reported in the log.
        cmd.env("ATLASMESH_VEHICLE_LINK__LISTEN", "127.0.0.1:0");
        for (k, v) in &options.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = cmd.spawn().context("spawning atlasmesh")?;
        let stderr = child.stderr.take().expect("piped stderr");
        let logs = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = logs.clone();
        std::thread::spawn(move || {
            let mut tx = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(|l| l.ok()) {
                if let Some(sender) = &tx
                    && let Ok(json) = serde_json::from_str::<serde_json::Value>(&line)
                    && json["message"] == "listening"
                {
                    let addr = json["addr"].as_str().unwrap_or_default().to_owned();
                    let scheme = json["scheme"].as_str().unwrap_or("http").to_owned();
                    let mqtt = json["mqtt"].as_str().map(str::to_owned);
                    let _ = sender.send((addr, scheme, mqtt));
                    tx = None;
                }
                sink.lock().unwrap().push(line);
            }
        });
        let (addr, scheme, mqtt) = match rx.recv_timeout(Duration::from_secs(60)) {
            Ok(found) => found,
            Err(_) => {
                let _ = child.kill();
                let _ = child.wait();
                let logs = logs.lock().unwrap().join("\n");
                bail!("atlasmesh did not report listening within 60 s; its log:\n{logs}");
            }
        };
        Ok(Server {
            child: Some(child),
            addr: addr
                .parse()
                .with_context(|| format!("bad listen address {addr:?}"))?,
            mqtt,
            data_dir,
            scheme: if scheme == "https" { "https" } else { "http" },
            logs,
            _temp: temp,
        })
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}://{}{}", self.scheme, self.addr, path)
    }

    /// The Prometheus text at `/metrics`.
    pub fn metrics(&self) -> Result<String> {
        Ok(http().get(self.url("/metrics")).send()?.text()?)
    }

    pub fn logs(&self) -> Vec<String> {
        self.logs.lock().unwrap().clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("server running").id()
    }

    pub fn admin_password(&self) -> String {
        std::fs::read_to_string(self.data_dir.join("initial-admin-password"))
            .expect("initial admin password file")
            .trim()
            .to_owned()
    }

    /// Mints a token with `atlasmesh token create`, as an operator would.
    pub fn token(&self, role: &str) -> String {
        mint_token(&self.data_dir, role, &format!("test-{role}")).expect("minting a token")
    }

    /// Sends SIGTERM and waits for the exit (up to 30 s).
    pub fn terminate(&mut self) -> Result<ExitStatus> {
        self.signal("TERM")?;
        self.wait(Duration::from_secs(30))
    }

    /// `kill -9`: no chance to clean up.
    pub fn kill9(&mut self) -> Result<ExitStatus> {
        self.signal("KILL")?;
        self.wait(Duration::from_secs(10))
    }

    pub fn signal(&self, name: &str) -> Result<()> {
        let status = Command::new("kill")
            .arg(format!("-{name}"))
            .arg(self.pid().to_string())
            .status()?;
        if !status.success() {
            bail!("kill -{name} failed");
        }
        Ok(())
    }

    pub fn wait(&mut self, limit: Duration) -> Result<ExitStatus> {
        let child = self
            .child
            .as_mut()
            .ok_or_else(|| anyhow!("already stopped"))?;
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait()? {
                self.child = None;
                // Let the log reader drain the last lines.
                std::thread::sleep(Duration::from_millis(50));
                return Ok(status);
            }
            if Instant::now() > deadline {
                bail!("atlasmesh did not exit within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Keeps the temporary directory a predecessor's data dir lives in (see `into_parts`).
    pub fn keep(&mut self, temp: Option<tempfile::TempDir>) {
        if temp.is_some() {
            self._temp = temp;
        }
    }

    /// Gives up the data dir (for a restart on the same data) after the process has stopped.
    pub fn into_parts(mut self) -> (PathBuf, Option<tempfile::TempDir>) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        (self.data_dir.clone(), self._temp.take())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running child such as `atlasmesh sim`, stopped with SIGTERM (so it cleans up) and
/// reaped when dropped.
pub struct Sim(pub Child);

impl Drop for Sim {
    fn drop(&mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.0.id().to_string()])
            .status();
        let _ = self.0.wait();
    }
}

/// Sum of the samples of metric `name` in Prometheus text whose labels include every one of
/// `labels` (each written as in the text: `result="applied"`).
pub fn metric_sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = series.split_once('{').unwrap_or((series, ""));
            (metric == name && labels.iter().all(|label| rest.contains(label)))
                .then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

/// The command `atlasmesh token create --data-dir DIR --role ROLE --name NAME`.
pub fn mint_token_command(data_dir: &Path, role: &str, name: &str) -> Command {
    let mut cmd = atlasmesh();
    cmd.args(["token", "create", "--data-dir"])
        .arg(data_dir)
        .args(["--role", role, "--name", name]);
    cmd
}

/// Runs [`mint_token_command`]; returns the printed token.
pub fn mint_token(data_dir: &Path, role: &str, name: &str) -> Result<String> {
    let (status, stdout, stderr) = run(&mut mint_token_command(data_dir, role, name))?;
    if !status.success() {
        bail!("token create failed: {stderr}");
    }
    Ok(stdout.trim().to_owned())
}

/// A blocking HTTP client that accepts the depot's self-signed certificate.
pub fn http() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .danger_accept_invalid_certs(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client")
}

/// Like [`http`] but keeping cookies, as a browser does.
pub fn http_with_cookies() -> reqwest::blocking::Client {
    reqwest::blocking::Client::builder()
        .danger_accept_invalid_certs(true)
        .cookie_store(true)
        .redirect(reqwest::redirect::Policy::none())
        .timeout(Duration::from_secs(30))
        .build()
        .expect("HTTP client")
}

/// Extracts `name="csrf" value="..."` (or the csrf meta tag) from a page.
pub fn csrf_from(html: &str) -> Option<String> {
    for marker in ["name=\"csrf\" value=\"", "name=\"csrf-token\" content=\""] {
        if let Some(start) = html.find(marker) {
            let rest = &html[start + marker.len()..];
            return rest.split('"').next().map(str::to_owned);
        }
    }
    None
}

/// Signs in through the panel's form; returns the client (holding the session cookie) and the
/// session's CSRF token.
pub fn panel_login(
    server: &Server,
    user: &str,
    password: &str,
) -> Result<(reqwest::blocking::Client, String)> {
    let client = http_with_cookies();
    let page = client.get(server.url("/login")).send()?.text()?;
    let csrf = csrf_from(&page).ok_or_else(|| anyhow!("no csrf field on the login page"))?;
    let response = client
        .post(server.url("/login"))
        .form(&[
            ("username", user),
            ("password", password),
            ("csrf", &csrf),
            ("next", "/"),
        ])
        .send()?;
    if response.status() != reqwest::StatusCode::SEE_OTHER {
        bail!("login answered {}", response.status());
    }
    let overview = client.get(server.url("/")).send()?.text()?;
    let session_csrf =
        csrf_from(&overview).ok_or_else(|| anyhow!("no csrf token on the overview"))?;
    Ok((client, session_csrf))
}

/// A free TCP port on loopback (for peers that cannot report the port they bound).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// The Python of the test venv (`tests/.venv`), where `tests/run` installs the independent
/// peers listed in `tests/requirements.txt`.
pub fn venv_python() -> PathBuf {
    let python = workspace_root().join("tests/.venv/bin/python");
    assert!(
        python.is_file(),
        "{} is missing: run tests/run, which creates the venv with the Python test peers",
        python.display()
    );
    python
}

/// Runs a peer script from `tests/peers/` with the venv's Python.
pub fn python_peer(script: &str) -> Command {
    let mut cmd = Command::new(venv_python());
    cmd.arg(workspace_root().join("tests/peers").join(script));
    cmd
}
