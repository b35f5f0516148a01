//! Peers of the vehicle link: Debian's Mosquitto as the external broker, and paho-mqtt vehicles
//! (`tests/peers/mqtt_vehicle.py`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use serde_json::Value;

use crate::{free_port, python_peer, workspace_root};

/// The user name the depot signs in with at an external broker.
pub const DEPOT_USER: &str = "atlasmesh-depot";

/// A Mosquitto broker with password file and the ACL from docs/mosquitto-acl.conf.
pub struct Mosquitto {
    child: Option<Child>,
    pub port: u16,
    conf: PathBuf,
    passwd: PathBuf,
    /// The depot's password, in a file as `vehicle_link.password_file` wants it.
    pub depot_password_file: PathBuf,
    dir: tempfile::TempDir,
}

impl Mosquitto {
    pub fn start(depot_id: &str) -> Result<Self> {
        let dir = tempfile::tempdir()?;
        let port = free_port();
        let passwd = dir.path().join("passwd");
        let acl = dir.path().join("acl");
        let template = std::fs::read_to_string(workspace_root().join("docs/mosquitto-acl.conf"))?;
        std::fs::write(&acl, template.replace("{depot}", depot_id))?;
        let depot_password = "depot-secret-for-tests";
        let depot_password_file = dir.path().join("depot-password");
        std::fs::write(&depot_password_file, format!("{depot_password}\n"))?;
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\n\
                 allow_anonymous false\n\
                 use_username_as_clientid true\n\
                 password_file {}\n\
                 acl_file {}\n\
                 persistence false\n\
                 max_inflight_messages 1000\n\
                 max_queued_messages 100000\n\
                 log_dest stderr\n\
                 log_type error\n\
                 log_type warning\n",
                passwd.display(),
                acl.display()
            ),
        )?;
        let mosquitto = Mosquitto {
            child: None,
            port,
            conf,
            passwd,
            depot_password_file,
            dir,
        };
        mosquitto.set_password(DEPOT_USER, depot_password)?;
        let mut mosquitto = mosquitto;
        mosquitto.launch()?;
        Ok(mosquitto)
    }

    fn launch(&mut self) -> Result<()> {
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&self.conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting mosquitto (Debian package mosquitto; tests/run installs it)")?;
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            if Instant::now() > deadline {
                bail!("mosquitto did not listen on {}", self.port);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(())
    }

    /// `mqtt://127.0.0.1:<port>`
    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }

    /// Environment that points a depot at this broker.
    pub fn depot_env(&self) -> Vec<(String, String)> {
        vec![
            ("ATLASMESH_VEHICLE_LINK__BROKER_URL".into(), self.url()),
            ("ATLASMESH_VEHICLE_LINK__USERNAME".into(), DEPOT_USER.into()),
            (
                "ATLASMESH_VEHICLE_LINK__PASSWORD_FILE".into(),
                self.depot_password_file.display().to_string(),
            ),
        ]
    }

    /// Adds or changes a user with `mosquitto_passwd` and makes a running broker reload.
    pub fn set_password(&self, user: &str, password: &str) -> Result<()> {
        self.set_passwords(&[(user.to_owned(), password.to_owned())])
    }

    /// Adds or changes many users with one `mosquitto_passwd -U` (each hash is slow on
    /// purpose) and makes a running broker reload.
    pub fn set_passwords(&self, logins: &[(String, String)]) -> Result<()> {
        let plain = self.dir.path().join("passwd.new");
        let lines: String = logins.iter().map(|(u, p)| format!("{u}:{p}\n")).collect();
        std::fs::write(&plain, lines)?;
        let status = Command::new("mosquitto_passwd")
            .arg("-U")
            .arg(&plain)
            .stdout(Stdio::null())
            .status()
            .context("running mosquitto_passwd")?;
        if !status.success() {
            bail!("mosquitto_passwd -U failed");
        }
        let hashed = std::fs::read_to_string(&plain)?;
        let existing = std::fs::read_to_string(&self.passwd).unwrap_or_default();
        let kept = existing.lines().filter(|line| {
            let user = line.split(':').next().unwrap_or_default();
            !logins.iter().any(|(u, _)| u == user)
        });
        let mut all: Vec<&str> = kept.chain(hashed.lines()).collect();
        all.push("");
        std::fs::write(&self.passwd, all.join("\n"))?;
        self.reload()
    }

    /// Lets `user` read `topic` (a filter), beside the vehicles' and the depot's rules.
    pub fn allow_read(&self, user: &str, topic: &str) -> Result<()> {
        use std::io::Write;
        let mut acl = std::fs::OpenOptions::new()
            .append(true)
            .open(self.dir.path().join("acl"))?;
        writeln!(acl, "\nuser {user}\ntopic read {topic}")?;
        self.reload()
    }

    /// SIGHUP: Mosquitto rereads its password and ACL files.
    fn reload(&self) -> Result<()> {
        if let Some(child) = &self.child {
            Command::new("kill")
                .args(["-HUP", &child.id().to_string()])
                .status()?;
            std::thread::sleep(Duration::from_millis(300));
        }
        Ok(())
    }

    /// Stops the broker (it keeps nothing: persistence is off) and starts it on the same port.
    pub fn restart(&mut self) -> Result<()> {
        self.stop();
        self.launch()
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The broker's process id while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    pub fn dir(&self) -> &std::path::Path {
        self.dir.path()
    }
}

impl Drop for Mosquitto {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Runs `tests/peers/mqtt_vehicle.py` and parses the JSON it prints.
pub fn paho_vehicle(args: &[&str]) -> Result<Value> {
    let out = python_peer("mqtt_vehicle.py")
        .args(args)
        .output()
        .context("running the paho vehicle")?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(stdout.trim()).with_context(|| {
        format!(
            "paho vehicle printed {stdout:?}; stderr: {}",
            String::from_utf8_lossy(&out.stderr)
        )
    })
}
