//! Per-device gauges on `/metrics`, under smartctl_exporter's names where it has one (so its
//! dashboards and alert rules work unchanged) plus the depot's verdict.

use std::collections::{HashMap, HashSet};
use std::sync::Mutex;
use std::sync::atomic::AtomicU64;

use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::DiskView;
use super::smartctl::Report;
use super::verdict::Verdict;

type Labels = Vec<(String, String)>;
type Values = Family<Labels, Gauge<f64, AtomicU64>>;

const GAUGES: &[(&str, &str)] = &[
    ("smartctl_device", "Device identity (always 1)"),
    (
        "smartctl_device_smart_status",
        "SMART overall-health self-assessment: 1 passed, 0 failed",
    ),
    (
        "smartctl_device_smartctl_exit_status",
        "smartctl's exit status bits",
    ),
    ("smartctl_device_temperature", "Device temperature, °C"),
    ("smartctl_device_power_on_seconds", "Power-on time"),
    ("smartctl_device_capacity_bytes", "Device capacity"),
    (
        "smartctl_device_attribute",
        "ATA SMART attribute: normalized value, worst, threshold and raw",
    ),
    (
        "smartctl_device_percentage_used",
        "NVMe or SCSI endurance used, percent",
    ),
    (
        "smartctl_device_available_spare",
        "NVMe spare capacity left, percent",
    ),
    (
        "smartctl_device_available_spare_threshold",
        "NVMe spare threshold, percent",
    ),
    (
        "smartctl_device_critical_warning",
        "NVMe critical warning bits",
    ),
    (
        "smartctl_device_media_errors",
        "NVMe media and data integrity errors",
    ),
    (
        "smartctl_device_num_err_log_entries",
        "NVMe error log entries",
    ),
    (
        "smartctl_device_scsi_grown_defect_list",
        "SCSI grown defect list length",
    ),
    (
        "atlasmesh_disk_verdict",
        "The depot's verdict on the device: 1 for the current one",
    ),
    (
        "atlasmesh_disk_remaining_life_days",
        "Days until the device's rated endurance is used up, at its wear trend",
    ),
];

pub struct DiskMetrics {
    families: HashMap<&'static str, Values>,
    /// The label sets set by the last collection, per family: a device that went away
    /// disappears from `/metrics` instead of showing its last values forever.
    last: Mutex<HashMap<&'static str, HashSet<Labels>>>,
}

impl DiskMetrics {
    pub fn register(registry: &mut Registry) -> DiskMetrics {
        let mut families = HashMap::new();
        for (name, help) in GAUGES {
            let family = Values::default();
            registry.register(*name, *help, family.clone());
            families.insert(*name, family);
        }
        DiskMetrics {
            families,
            last: Mutex::new(HashMap::new()),
        }
    }

    /// Sets every gauge from one collection's readings.
    pub fn publish(&self, readings: &[(DiskView, Option<Report>)]) {
        let mut now: HashMap<&'static str, Vec<(Labels, f64)>> = HashMap::new();
        for (view, report) in readings {
            let device = view.device.trim_start_matches("/dev/").to_owned();
            let dev = || vec![("device".to_owned(), device.clone())];
            let mut put = |name: &'static str, labels: Labels, value: f64| {
                now.entry(name).or_default().push((labels, value));
            };
            for v in Verdict::ALL {
                let mut labels = dev();
                labels.push((
                    "serial_number".into(),
                    view.serial.clone().unwrap_or_default(),
                ));
                labels.push(("verdict".into(), v.as_str().into()));
                put(
                    "atlasmesh_disk_verdict",
                    labels,
                    f64::from(u8::from(view.verdict == v)),
                );
            }
            if let Some(life) = &view.remaining_life {
                put("atlasmesh_disk_remaining_life_days", dev(), life.days_left);
            }
            let Some(r) = report else { continue };
            let mut identity = dev();
            identity.extend([
                ("model_name".into(), r.model.clone().unwrap_or_default()),
                ("serial_number".into(), r.serial.clone().unwrap_or_default()),
                (
                    "firmware_version".into(),
                    r.firmware.clone().unwrap_or_default(),
                ),
                (
                    "protocol".into(),
                    r.protocol
                        .as_ref()
                        .map(|p| p.name().to_owned())
                        .unwrap_or_default(),
                ),
            ]);
            put("smartctl_device", identity, 1.0);
            if let Some(passed) = r.smart_passed {
                put(
                    "smartctl_device_smart_status",
                    dev(),
                    f64::from(u8::from(passed)),
                );
            }
            if let Some(s) = r.exit_status {
                put(
                    "smartctl_device_smartctl_exit_status",
                    dev(),
                    f64::from(s.0),
                );
            }
            if let Some(t) = r.temperature {
                let mut labels = dev();
                labels.push(("temperature_type".into(), "current".into()));
                put("smartctl_device_temperature", labels, t as f64);
            }
            if let Some(h) = r.power_on_hours {
                put("smartctl_device_power_on_seconds", dev(), h as f64 * 3600.0);
            }
            if let Some(c) = r.capacity_bytes {
                put("smartctl_device_capacity_bytes", dev(), c as f64);
            }
            for a in &r.ata_attributes {
                let kinds = [
                    ("value", a.value.map(f64::from)),
                    ("worst", a.worst.map(f64::from)),
                    ("thresh", a.thresh.map(f64::from)),
                    ("raw", a.raw_value.map(|v| v as f64)),
                ];
                for (kind, value) in kinds {
                    let Some(value) = value else { continue };
                    let mut labels = dev();
                    labels.extend([
                        ("attribute_id".into(), a.id.to_string()),
                        ("attribute_name".into(), a.name.clone()),
                        ("attribute_value_type".into(), kind.into()),
                    ]);
                    put("smartctl_device_attribute", labels, value);
                }
            }
            if let Some(n) = &r.nvme {
                let fields = [
                    (
                        "smartctl_device_percentage_used",
                        n.percentage_used.map(f64::from),
                    ),
                    (
                        "smartctl_device_available_spare",
                        n.available_spare.map(f64::from),
                    ),
                    (
                        "smartctl_device_available_spare_threshold",
                        n.available_spare_threshold.map(f64::from),
                    ),
                    (
                        "smartctl_device_critical_warning",
                        n.critical_warning.map(f64::from),
                    ),
                    (
                        "smartctl_device_media_errors",
                        n.media_errors.map(|v| v as f64),
                    ),
                    (
                        "smartctl_device_num_err_log_entries",
                        n.num_err_log_entries.map(|v| v as f64),
                    ),
                ];
                for (name, value) in fields {
                    if let Some(value) = value {
                        put(name, dev(), value);
                    }
                }
            }
            if let Some(s) = &r.scsi {
                if let Some(g) = s.grown_defects {
                    put("smartctl_device_scsi_grown_defect_list", dev(), g as f64);
                }
                if let Some(p) = s.percentage_used_endurance {
                    put("smartctl_device_percentage_used", dev(), f64::from(p));
                }
            }
        }
        let mut last = self.last.lock().unwrap_or_else(|e| e.into_inner());
        for (name, family) in &self.families {
            let values = now.remove(name).unwrap_or_default();
            let current: HashSet<Labels> = values.iter().map(|(l, _)| l.clone()).collect();
            for (labels, value) in values {
                family.get_or_create(&labels).set(value);
            }
            for gone in last.get(name).into_iter().flatten() {
                if !current.contains(gone) {
                    family.remove(gone);
                }
            }
            last.insert(name, current);
        }
    }
}
