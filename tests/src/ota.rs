//! OTA test fixtures: a fleet (keys and an image repository made with `atlasmesh release`),
//! deterministic images and their variants, a depot that pins the fleet root, and the two
//! clients that pull from it: `atlasmesh vehicle pull` and python-tuf's ngclient.

use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use rand::{Rng, SeedableRng};
use serde_json::{Value, json};

use crate::{Options, Server, atlasmesh, http, python_peer, run};

/// Deterministic pseudo-random bytes.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len];
    rng.fill(&mut v[..]);
    v
}

/// A new version of `base`: `edits` regions of `edit_len` bytes rewritten and one insertion
/// of `insert` bytes in the middle (which shifts every offset after it).
pub fn variant(base: &[u8], seed: u64, edits: usize, edit_len: usize, insert: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = base.to_vec();
    for _ in 0..edits {
        let at = rng.random_range(0..v.len().saturating_sub(edit_len).max(1));
        let len = edit_len.min(v.len() - at);
        rng.fill(&mut v[at..at + len]);
    }
    let mid = v.len() / 2;
    let inserted = random_bytes(insert, seed ^ 0x5eed);
    v.splice(mid..mid, inserted);
    v
}

fn json_out(stdout: &str) -> Value {
    serde_json::from_str(stdout).unwrap_or(Value::Null)
}

/// Release engineering's side: keys and the fleet's image repository.
pub struct Fleet {
    pub dir: tempfile::TempDir,
    pub keys: PathBuf,
    pub repo: PathBuf,
}

impl Fleet {
    pub fn new() -> Result<Self> {
        Self::with_expiry(&[])
    }

    /// A fleet whose `release init` gets extra expiry flags (e.g. `--timestamp-expires 3s`).
    pub fn with_expiry(expiry: &[&str]) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let keys = dir.path().join("keys");
        let repo = dir.path().join("repo");
        release(&["keygen", "--keys", s(&keys)])?;
        let mut args = vec!["init", "--keys", s(&keys), "--repo", s(&repo)];
        args.extend_from_slice(expiry);
        release(&args)?;
        Ok(Self { dir, keys, repo })
    }

    /// The fleet root vehicles and depots are provisioned with.
    pub fn root(&self) -> PathBuf {
        self.repo.join("metadata/1.root.json")
    }

    /// Writes `data` as an image file and releases it; returns the image file.
    pub fn add(
        &self,
        hardware: &str,
        version: &str,
        data: &[u8],
        extra: &[&str],
    ) -> Result<PathBuf> {
        let image = self.dir.path().join(format!("{hardware}-{version}.img"));
        std::fs::write(&image, data)?;
        let mut args = vec![
            "add",
            "--keys",
            s(&self.keys),
            "--repo",
            s(&self.repo),
            "--image",
            s(&image),
            "--version",
            version,
            "--hardware",
            hardware,
        ];
        args.extend_from_slice(extra);
        release(&args)?;
        Ok(image)
    }

    pub fn bundle(&self, hardware: &str, version: &str) -> Result<PathBuf> {
        let out = self.dir.path().join(format!("{hardware}-{version}.tar"));
        release(&[
            "bundle",
            "--repo",
            s(&self.repo),
            "--hardware",
            hardware,
            "--version",
            version,
            "--out",
            s(&out),
        ])?;
        Ok(out)
    }

    /// The repository file of a target (consistent snapshots: `<sha256>.<name>`).
    pub fn target_file(&self, name: &str) -> PathBuf {
        std::fs::read_dir(self.repo.join("targets"))
            .expect("targets dir")
            .filter_map(|e| e.ok().map(|e| e.path()))
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.len() > 65 && &n[65..] == name)
            })
            .unwrap_or_else(|| panic!("no target file for {name}"))
    }

    /// A copy of the repository as it is now (to replay it later).
    pub fn snapshot(&self, label: &str) -> Result<PathBuf> {
        let out = self.dir.path().join(format!("repo-{label}"));
        let status = std::process::Command::new("cp")
            .arg("-a")
            .arg(&self.repo)
            .arg(&out)
            .status()?;
        if !status.success() {
            bail!("cp failed");
        }
        Ok(out)
    }
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("UTF-8 path")
}

/// `atlasmesh release ...`; returns its JSON output.
pub fn release(args: &[&str]) -> Result<Value> {
    let (status, stdout, stderr) = run(atlasmesh().arg("release").args(args))?;
    if !status.success() {
        bail!("release {args:?} failed: {stderr}");
    }
    Ok(json_out(&stdout))
}

/// A depot that pins `fleet`'s root, with an admin token.
pub struct OtaDepot {
    pub server: Server,
    pub token: String,
}

impl OtaDepot {
    pub fn start(fleet: &Fleet, env: &[(&str, &str)]) -> Result<Self> {
        let mut all = vec![(
            "ATLASMESH_OTA__FLEET_ROOT".to_owned(),
            s(&fleet.root()).to_owned(),
        )];
        all.extend(env.iter().map(|(k, v)| (k.to_string(), v.to_string())));
        let server = Server::start(Options {
            env: all,
            ..Default::default()
        })?;
        let token = server.token("admin");
        Ok(Self { server, token })
    }

    /// Stops this depot (if still running) and starts a new one on the same data directory,
    /// pinned to the same fleet, with the same admin token; the returned directory guard keeps
    /// the data alive.
    pub fn restart(self, fleet: &Fleet) -> Result<(Self, Option<tempfile::TempDir>)> {
        let (data_dir, temp) = self.server.into_parts();
        let server = Server::start(Options {
            data_dir: Some(data_dir),
            env: vec![(
                "ATLASMESH_OTA__FLEET_ROOT".to_owned(),
                s(&fleet.root()).to_owned(),
            )],
            ..Default::default()
        })?;
        Ok((
            Self {
                server,
                token: self.token,
            },
            temp,
        ))
    }

    pub fn url(&self, path: &str) -> String {
        self.server.url(path)
    }

    pub fn get(&self, path: &str) -> Result<Value> {
        Ok(http()
            .get(self.url(path))
            .bearer_auth(&self.token)
            .send()?
            .json()?)
    }

    pub fn depot_id(&self) -> Result<String> {
        Ok(self.get("/api/v1/ota/director")?["depot_id"]
            .as_str()
            .context("depot id")?
            .to_owned())
    }

    /// Stages a bundle by upload; returns (HTTP status, body).
    pub fn upload(&self, bundle: &Path) -> Result<(u16, Value)> {
        let body = std::fs::read(bundle)?;
        let response = http()
            .post(self.url("/api/v1/images"))
            .bearer_auth(&self.token)
            .header("content-type", "application/x-tar")
            .body(body)
            .send()?;
        Ok((
            response.status().as_u16(),
            response.json().unwrap_or(Value::Null),
        ))
    }

    /// Stages from a directory or URL and waits for the job; returns the finished job.
    pub fn stage_job(&self, source: Value) -> Result<Value> {
        let response = http()
            .post(self.url("/api/v1/images"))
            .bearer_auth(&self.token)
            .json(&source)
            .send()?;
        let status = response.status().as_u16();
        let body: Value = response.json()?;
        if status != 202 {
            bail!("staging not accepted ({status}): {body}");
        }
        let job = body["job"].as_i64().context("job id")?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let state = self.get(&format!("/api/v1/staging/{job}"))?;
            if state["state"] != "running" {
                return Ok(state);
            }
            if Instant::now() > deadline {
                bail!("staging job {job} did not finish");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    pub fn stage_dir(&self, repo: &Path, hardware: &str, version: &str) -> Result<Value> {
        self.stage_job(json!({"path": repo, "hardware": hardware, "version": version}))
    }

    /// Certifies the depot's director with the fleet's certifier key and installs it.
    pub fn certify(&self, fleet: &Fleet) -> Result<()> {
        let root = http()
            .get(self.url("/tuf/director/metadata/1.root.json"))
            .send()?
            .bytes()?;
        let root_file = fleet.dir.path().join("director-root.json");
        std::fs::write(&root_file, &root)?;
        let cert = fleet.dir.path().join("certificate.json");
        let depot_id = self.depot_id()?;
        release(&[
            "certify-depot",
            "--keys",
            s(&fleet.keys),
            "--depot-id",
            &depot_id,
            "--director-root",
            s(&root_file),
            "--out",
            s(&cert),
        ])?;
        let response = http()
            .put(self.url("/api/v1/ota/director/certificate"))
            .bearer_auth(&self.token)
            .body(std::fs::read(&cert)?)
            .send()?;
        if !response.status().is_success() {
            bail!("installing the certificate: {}", response.text()?);
        }
        Ok(())
    }

    pub fn assign(&self, vehicle: &str, version: &str) -> Result<Value> {
        let response = http()
            .post(self.url("/api/v1/assignments"))
            .bearer_auth(&self.token)
            .json(&json!({"vehicle_id": vehicle, "version": version}))
            .send()?;
        let status = response.status();
        let body: Value = response.json()?;
        if !status.is_success() {
            bail!("assign failed ({status}): {body}");
        }
        Ok(body)
    }

    pub fn director_dir(&self) -> PathBuf {
        self.server.data_dir.join("ota/director")
    }
}

/// A vehicle: its state directory, provisioned with the fleet root.
pub struct Vehicle {
    pub id: String,
    pub state: PathBuf,
    pub slot: PathBuf,
    pub current: PathBuf,
    fleet_root: PathBuf,
}

impl Vehicle {
    pub fn new(dir: &Path, id: &str, fleet: &Fleet, current_image: &[u8]) -> Result<Self> {
        let base = dir.join(id);
        std::fs::create_dir_all(&base)?;
        let current = base.join("slot-a.img");
        std::fs::write(&current, current_image)?;
        Ok(Self {
            id: id.into(),
            state: base.join("state"),
            slot: base.join("slot-b.img"),
            current,
            fleet_root: fleet.root(),
        })
    }

    /// `atlasmesh vehicle pull`; returns (exit status, JSON report or error).
    pub fn pull(&self, depot: &OtaDepot, extra: &[&str]) -> Result<(ExitStatus, Value)> {
        let (status, stdout, _stderr) = run(atlasmesh()
            .args(["vehicle", "pull", "--depot"])
            .arg(depot.url("/"))
            .args([
                "--vehicle",
                &self.id,
                "--slot",
                s(&self.slot),
                "--current",
                s(&self.current),
                "--state",
                s(&self.state),
            ])
            .args(["--fleet-root", s(&self.fleet_root)])
            .args(extra))?;
        Ok((status, json_out(&stdout)))
    }
}

/// python-tuf's ngclient against one of the depot's repositories; returns (exit code, JSON).
pub fn tuf_client(
    depot: &OtaDepot,
    repo: &str,
    root: &Path,
    state: &Path,
    target: Option<(&str, &Path)>,
) -> Result<(i32, Value)> {
    tuf_client_at(&depot.url("/"), repo, root, state, target)
}

/// As [`tuf_client`], against any base URL (a proxy in front of a depot).
pub fn tuf_client_at(
    base: &str,
    repo: &str,
    root: &Path,
    state: &Path,
    target: Option<(&str, &Path)>,
) -> Result<(i32, Value)> {
    let base = base.trim_end_matches('/');
    let mut cmd = python_peer("tuf_client.py");
    cmd.args(["--metadata-url", &format!("{base}/tuf/{repo}/metadata/")])
        .args(["--targets-url", &format!("{base}/tuf/{repo}/targets/")])
        .args(["--root", s(root), "--state", s(state)]);
    if let Some((name, out)) = target {
        cmd.args(["--target", name, "--out", s(out)]);
    }
    let (status, stdout, stderr) = run(&mut cmd)?;
    if stdout.trim().is_empty() {
        bail!("tuf_client.py printed nothing: {stderr}");
    }
    Ok((
        status.code().unwrap_or(-1),
        json_out(stdout.lines().last().unwrap_or_default()),
    ))
}
