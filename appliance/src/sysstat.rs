//! The appliance's own vital signs (CPU, memory, the data directory's filesystem, the process'
//! memory), sampled by sysinfo on a timer off the async workers and published on a watch
//! channel, so requests read the latest sample instead of each touching /proc.

use std::path::{Path, PathBuf};
use std::time::Duration;

use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use sysinfo::{
    Components, Disks, MemoryRefreshKind, Pid, ProcessRefreshKind, ProcessesToUpdate, System,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct SystemSnapshot {
    /// Whole-machine CPU use in percent (0 to 100), averaged since the previous sample.
    pub cpu_percent: f32,
    pub cpu_count: usize,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    /// The process' resident memory.
    pub process_rss_bytes: u64,
    /// The filesystem that holds the data directory.
    pub data_fs: Option<FilesystemUse>,
    pub load_average: [f64; 3],
    /// Temperature sensors (hwmon): CPU, chipset, NVMe composite, whatever the board exposes.
    pub temperatures: Vec<Temperature>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Temperature {
    pub label: String,
    pub celsius: f32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub critical_celsius: Option<f32>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct FilesystemUse {
    pub mount_point: String,
    pub total_bytes: u64,
    pub available_bytes: u64,
}

struct Sampler {
    system: System,
    disks: Disks,
    components: Components,
    pid: Pid,
    data_dir: PathBuf,
}

impl Sampler {
    fn new(data_dir: &Path) -> Self {
        let mut system = System::new();
        system.refresh_cpu_usage();
        Self {
            system,
            disks: Disks::new_with_refreshed_list(),
            components: Components::new_with_refreshed_list(),
            pid: Pid::from_u32(std::process::id()),
            data_dir: std::fs::canonicalize(data_dir).unwrap_or_else(|_| data_dir.to_owned()),
        }
    }

    fn sample(&mut self) -> SystemSnapshot {
        self.system.refresh_cpu_usage();
        self.system
            .refresh_memory_specifics(MemoryRefreshKind::nothing().with_ram());
        self.system.refresh_processes_specifics(
            ProcessesToUpdate::Some(&[self.pid]),
            false,
            ProcessRefreshKind::nothing().with_memory(),
        );
        self.disks.refresh(true);
        let load = System::load_average();
        self.components.refresh(false);
        let temperatures = self
            .components
            .list()
            .iter()
            .filter_map(|c| {
                Some(Temperature {
                    label: c.label().to_owned(),
                    celsius: c.temperature().filter(|t| t.is_finite())?,
                    critical_celsius: c.critical().filter(|t| t.is_finite()),
                })
            })
            .collect();
        // The filesystem holding the data dir is the mount point that is its longest prefix.
        let data_fs = self
            .disks
            .list()
            .iter()
            .filter(|d| self.data_dir.starts_with(d.mount_point()))
            .max_by_key(|d| d.mount_point().as_os_str().len())
            .map(|d| FilesystemUse {
                mount_point: d.mount_point().display().to_string(),
                total_bytes: d.total_space(),
                available_bytes: d.available_space(),
            });
        SystemSnapshot {
            cpu_percent: self.system.global_cpu_usage(),
            cpu_count: self.system.cpus().len(),
            memory_total_bytes: self.system.total_memory(),
            memory_used_bytes: self.system.used_memory(),
            process_rss_bytes: self
                .system
                .process(self.pid)
                .map(|p| p.memory())
                .unwrap_or(0),
            data_fs,
            load_average: [load.one, load.five, load.fifteen],
            temperatures,
        }
    }
}

/// Starts sampling every `every` until `shutdown`; the receiver always holds the latest sample.
pub fn spawn(
    data_dir: &Path,
    every: Duration,
    rss_gauge: Gauge,
    shutdown: CancellationToken,
) -> watch::Receiver<SystemSnapshot> {
    let mut sampler = Sampler::new(data_dir);
    let first = sampler.sample();
    let (tx, rx) = watch::channel(first);
    tokio::spawn(async move {
        let mut sampler = Some(sampler);
        let mut ticker = tokio::time::interval(every);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = ticker.tick() => {}
            }
            let Some(mut s) = sampler.take() else { break };
            // sysinfo reads /proc and calls statvfs: blocking work, kept off the async workers.
            let Ok((s, snapshot)) = tokio::task::spawn_blocking(move || {
                let snap = s.sample();
                (s, snap)
            })
            .await
            else {
                break;
            };
            sampler = Some(s);
            rss_gauge.set(i64::try_from(snapshot.process_rss_bytes).unwrap_or(i64::MAX));
            if tx.send(snapshot).is_err() {
                break;
            }
        }
    });
    rx
}
