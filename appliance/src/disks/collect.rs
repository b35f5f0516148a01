//! Running smartctl: the device scan, one device's report, starting a self-test. The only part
//! of disk health that spawns processes; each run has a timeout and is killed when it passes.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use super::schedule::TestKind;
use super::smartctl::{self, ExitStatus, ParseError, Report};

/// A device as smartd names it: `/dev/sda`, or `/dev/bus/0 -d megaraid,3`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct DeviceSpec {
    pub name: String,
    /// smartctl's `-d` type, when autodetection cannot find the device on its own.
    pub device_type: Option<String>,
}

impl DeviceSpec {
    pub fn parse(s: &str) -> Result<DeviceSpec, String> {
        let mut words = s.split_whitespace();
        let name = words
            .next()
            .ok_or_else(|| "an empty device name".to_string())?;
        if name.starts_with('-') {
            return Err(format!("{s:?}: the device name comes first"));
        }
        let device_type = match (words.next(), words.next(), words.next()) {
            (None, _, _) => None,
            (Some("-d"), Some(t), None) if !t.starts_with('-') => Some(t.to_owned()),
            _ => return Err(format!("{s:?} is not `DEVICE` or `DEVICE -d TYPE`")),
        };
        Ok(DeviceSpec {
            name: name.to_owned(),
            device_type,
        })
    }

    fn args(&self) -> Vec<String> {
        let mut args = Vec::new();
        if let Some(t) = &self.device_type {
            args.extend(["-d".to_owned(), t.clone()]);
        }
        args.push(self.name.clone());
        args
    }
}

impl std::fmt::Display for DeviceSpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.device_type {
            Some(t) => write!(f, "{} -d {t}", self.name),
            None => f.write_str(&self.name),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SmartctlError {
    #[error(
        "smartctl was not found at {0:?}; install smartmontools (7.0 or later) or set disks.smartctl"
    )]
    NotFound(PathBuf),
    #[error("cannot run {path:?}: {error}")]
    Spawn { path: PathBuf, error: String },
    #[error("smartctl {args} did not finish within {seconds} s and was killed")]
    Timeout { args: String, seconds: u64 },
    #[error("smartctl {args} was killed by a signal")]
    Signal { args: String },
    #[error("smartctl {args}: {error}")]
    Output { args: String, error: ParseError },
    #[error("smartctl {args} failed: {message}")]
    Refused { args: String, message: String },
}

/// The smartctl program and how long one run may take.
#[derive(Debug, Clone)]
pub struct Smartctl {
    pub path: PathBuf,
    pub timeout: Duration,
}

impl Smartctl {
    pub fn new(path: &Path, timeout: Duration) -> Smartctl {
        Smartctl {
            path: path.to_owned(),
            timeout,
        }
    }

    /// Runs smartctl with `args`; its standard output and exit code.
    async fn run(&self, args: &[String]) -> Result<(String, Option<i32>), SmartctlError> {
        let shown = args.join(" ");
        let child = tokio::process::Command::new(&self.path)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| match e.kind() {
                std::io::ErrorKind::NotFound => SmartctlError::NotFound(self.path.clone()),
                _ => SmartctlError::Spawn {
                    path: self.path.clone(),
                    error: e.to_string(),
                },
            })?;
        let output = tokio::time::timeout(self.timeout, child.wait_with_output())
            .await
            .map_err(|_| SmartctlError::Timeout {
                args: shown.clone(),
                seconds: self.timeout.as_secs(),
            })?
            .map_err(|e| SmartctlError::Spawn {
                path: self.path.clone(),
                error: e.to_string(),
            })?;
        let code = output.status.code();
        if code.is_none() {
            return Err(SmartctlError::Signal { args: shown });
        }
        Ok((String::from_utf8_lossy(&output.stdout).into_owned(), code))
    }

    /// `smartctl --scan --json`: the devices smartctl can find.
    pub async fn scan(&self) -> Result<Vec<DeviceSpec>, SmartctlError> {
        let args = vec!["--scan".to_owned(), "--json".to_owned()];
        let (out, _) = self.run(&args).await?;
        let devices = smartctl::parse_scan(&out).map_err(|error| SmartctlError::Output {
            args: args.join(" "),
            error,
        })?;
        Ok(devices
            .into_iter()
            .map(|d| DeviceSpec {
                name: d.name,
                // The scan names plain disks `scsi` or `nvme` without opening them; passing that
                // back would read a SATA disk as SCSI. Only a type with a parameter (a disk behind
                // a RAID controller: `megaraid,3`, `sat+cciss,1`) cannot be autodetected.
                device_type: d.device_type.filter(|t| t.contains(',')),
            })
            .collect())
    }

    /// `smartctl --json --xall DEV`: everything smartctl can say about one device. smartctl's
    /// exit bits are in the report; a report without them takes the process' exit code.
    pub async fn read(&self, device: &DeviceSpec) -> Result<Report, SmartctlError> {
        let mut args = vec!["--json".to_owned(), "--xall".to_owned()];
        args.extend(device.args());
        let (out, code) = self.run(&args).await?;
        let mut report = smartctl::parse(&out).map_err(|error| SmartctlError::Output {
            args: args.join(" "),
            error,
        })?;
        if report.exit_status.is_none() {
            report.exit_status = code.map(|c| ExitStatus(c as u8));
        }
        Ok(report)
    }

    /// `smartctl --json -t short|long DEV`: starts a self-test (the drive runs it on its own;
    /// its result shows in the self-test log of a later read).
    pub async fn start_test(
        &self,
        device: &DeviceSpec,
        kind: TestKind,
    ) -> Result<(), SmartctlError> {
        let mut args = vec![
            "--json".to_owned(),
            "-t".to_owned(),
            kind.as_str().to_owned(),
        ];
        args.extend(device.args());
        let (out, code) = self.run(&args).await?;
        let report = smartctl::parse(&out).ok();
        let status = report
            .as_ref()
            .and_then(|r| r.exit_status)
            .or(code.map(|c| ExitStatus(c as u8)))
            .unwrap_or(ExitStatus(0));
        if status.command_line() || status.device_open_failed() || status.command_failed() {
            let message = report
                .and_then(|r| r.messages.first().map(|m| m.text.clone()))
                .unwrap_or_else(|| format!("exit status {}", status.0));
            return Err(SmartctlError::Refused {
                args: args.join(" "),
                message,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn devices_are_named_as_smartd_names_them() {
        assert_eq!(
            DeviceSpec::parse("/dev/sda").unwrap(),
            DeviceSpec {
                name: "/dev/sda".into(),
                device_type: None
            }
        );
        let raid = DeviceSpec::parse(" /dev/bus/0  -d megaraid,3 ").unwrap();
        assert_eq!(raid.args(), ["-d", "megaraid,3", "/dev/bus/0"]);
        assert_eq!(raid.to_string(), "/dev/bus/0 -d megaraid,3");
        for bad in [
            "",
            "-d sat /dev/sda",
            "/dev/sda -d",
            "/dev/sda -x sat",
            "/dev/sda -d sat extra",
        ] {
            assert!(DeviceSpec::parse(bad).is_err(), "{bad:?}");
        }
    }
}
