//! Whether a vehicle may take an update now, and why not: the runbooks' readiness check. Pure:
//! the registry's view of the vehicle, the image and the time in; reasons out.

use std::time::Duration;

use crate::config::CanaryConfig;
use crate::link::db::VehicleView;

/// What an update needs from a vehicle.
pub struct Needs<'a> {
    pub hardware_id: &'a str,
    pub version: &'a str,
    pub image_bytes: u64,
    pub soak: Duration,
}

/// Every reason the vehicle is not ready; empty means ready.
pub fn reasons(
    v: &VehicleView,
    needs: &Needs<'_>,
    config: &CanaryConfig,
    now_ms: i64,
) -> Vec<String> {
    let mut out = Vec::new();
    match v.hardware_id.as_deref() {
        Some(hw) if hw == needs.hardware_id => {}
        Some(hw) => out.push(format!(
            "hardware {hw}; the image is for {}",
            needs.hardware_id
        )),
        None => out.push("hardware unknown".into()),
    }
    if v.installed_version.as_deref() == Some(needs.version) {
        out.push(format!("already runs {}", needs.version));
    }
    out.extend(presence(v));
    match (v.plugged_in, v.soc_percent) {
        (Some(true), _) => {}
        (_, Some(soc)) if soc >= config.soc_floor_percent => {}
        (_, Some(soc)) => out.push(format!(
            "not plugged in, and {soc:.0} % charge is below the {:.0} % floor",
            config.soc_floor_percent
        )),
        (_, None) => out.push("no charge state reported yet".into()),
    }
    let download = Duration::from_secs_f64(
        needs.image_bytes as f64 / config.assumed_download_bytes_per_second.max(1) as f64,
    );
    let needed = download + config.install_estimate + needs.soak + config.departure_margin;
    if let Some(departure) = v.departure_ms {
        let ready_by = now_ms + needed.as_millis() as i64;
        if departure < ready_by {
            out.push(format!(
                "leaves in {} min; an update needs about {} min with its soak and margin",
                ((departure - now_ms).max(0)) / 60_000,
                needed.as_secs().div_ceil(60)
            ));
        }
    }
    match v.free_bytes {
        Some(free) if free >= 0 && free as u64 >= needs.image_bytes => {}
        Some(free) => out.push(format!(
            "{} MB free on the inactive slot; the image needs {} MB",
            free.max(0) / 1_000_000,
            needs.image_bytes.div_ceil(1_000_000)
        )),
        None => out.push("free space not reported yet".into()),
    }
    out
}

/// Whether the vehicle is here to take an update at all: online and docked.
pub fn presence(v: &VehicleView) -> Vec<String> {
    let mut out = Vec::new();
    if !v.online {
        out.push("offline".into());
    }
    if !v.docked {
        out.push("not docked".into());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ready_vehicle() -> VehicleView {
        VehicleView {
            id: "veh-1".into(),
            hardware_id: Some("hw".into()),
            online: true,
            docked: true,
            bay: Some("bay-1".into()),
            soc_percent: Some(20.0),
            battery_kwh: Some(80.0),
            plugged_in: Some(true),
            departure_ms: Some(10 * 3_600_000),
            installed_version: Some("1.0.0".into()),
            slot: Some("a".into()),
            free_bytes: Some(8_000_000_000),
            health: None,
            health_faults: vec![],
            ota: None,
            assigned_version: None,
            last_seen_at: None,
            messages: 0,
            created_at: 0,
        }
    }

    #[test]
    fn each_reason_is_named() {
        let needs = Needs {
            hardware_id: "hw",
            version: "2.0.0",
            image_bytes: 2_000_000_000,
            soak: Duration::from_secs(600),
        };
        let config = CanaryConfig::default();
        assert_eq!(
            reasons(&ready_vehicle(), &needs, &config, 0),
            Vec::<String>::new()
        );

        let mut v = ready_vehicle();
        v.docked = false;
        v.online = false;
        v.plugged_in = Some(false);
        v.free_bytes = Some(1_000_000_000);
        // 2 GB at 20 MB/s is 100 s, plus 10 min install, 10 min soak, 15 min margin.
        v.departure_ms = Some(30 * 60_000);
        v.hardware_id = Some("other".into());
        let r = reasons(&v, &needs, &config, 0);
        assert_eq!(r.len(), 6, "{r:?}");
        assert!(r[0].starts_with("hardware other"));
        assert_eq!(r[1], "offline");
        assert_eq!(r[2], "not docked");
        assert!(
            r[3].contains("20 % charge is below the 30 % floor"),
            "{}",
            r[3]
        );
        assert!(
            r[4].contains("leaves in 30 min; an update needs about 37 min"),
            "{}",
            r[4]
        );
        assert!(r[5].contains("1000 MB free"), "{}", r[5]);
    }
}
