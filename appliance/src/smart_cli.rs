//! `atlasmesh smart report`: one reading of every disk smartctl can see, judged like the depot
//! judges them, for a field engineer at the garage PC's console. No store, no history.

use anyhow::anyhow;
use serde_json::json;

use crate::config::DisksConfig;
use crate::disks;
use crate::disks::collect::DeviceSpec;
use crate::disks::verdict::Verdict;

pub async fn report(config: &DisksConfig, as_json: bool) -> anyhow::Result<u8> {
    for d in &config.devices {
        DeviceSpec::parse(d).map_err(|m| anyhow!("device {d:?}: {m}"))?;
    }
    let readings = disks::report_once(config)
        .await
        .map_err(|e| anyhow!("{e}"))?;
    let mut worst = Verdict::Passed;
    let mut out = Vec::new();
    for (device, read) in &readings {
        let item = match read {
            Ok((report, a)) => {
                worst = worst.max(a.verdict);
                json!({
                    "device": device.to_string(),
                    "protocol": report.protocol.as_ref().map(|p| p.name()),
                    "model": report.model,
                    "serial": report.serial,
                    "verdict": a.verdict,
                    "reasons": a.reasons,
                    "key_attributes": a.key_attributes,
                    "remaining_life": a.remaining_life,
                })
            }
            Err(e) => {
                worst = worst.max(Verdict::Unknown);
                json!({"device": device.to_string(), "verdict": Verdict::Unknown, "error": e})
            }
        };
        out.push(item);
    }
    if as_json {
        crate::outln!(
            "{}",
            serde_json::to_string_pretty(&json!({ "disks": out }))?
        )?;
    } else if readings.is_empty() {
        crate::outln!(
            "smartctl ({}) found no disks to read. Disks of a virtual machine (virtio) and some USB \
             bridges do not pass SMART through; name a device with --device to see why smartctl \
             cannot read it.",
            config.smartctl.display()
        )?;
    } else {
        for (device, read) in &readings {
            match read {
                Ok((report, a)) => {
                    crate::outln!(
                        "{device}: {} ({}{}{})",
                        a.verdict.as_str().to_uppercase(),
                        report.model.as_deref().unwrap_or("unknown model"),
                        report
                            .serial
                            .as_deref()
                            .map(|s| format!(", serial {s}"))
                            .unwrap_or_default(),
                        report
                            .protocol
                            .as_ref()
                            .map(|p| format!(", {}", p.name()))
                            .unwrap_or_default(),
                    )?;
                    for r in &a.reasons {
                        crate::outln!("  [{}] {}", r.severity.as_str(), r.message)?;
                    }
                    for k in &a.key_attributes {
                        crate::outln!(
                            "  {}: {}{}",
                            k.name,
                            k.value,
                            k.unit
                                .as_deref()
                                .map(|u| format!(" {u}"))
                                .unwrap_or_default()
                        )?;
                    }
                    if let Some(life) = &a.remaining_life {
                        crate::outln!(
                            "  wear: {} % used, about {:.0} days left at the current rate",
                            life.percent_used,
                            life.days_left
                        )?;
                    }
                }
                Err(e) => crate::outln!("{device}: UNKNOWN\n  [unknown] {e}")?,
            }
        }
    }
    if readings.is_empty() {
        return Ok(1);
    }
    Ok(match worst {
        Verdict::Passed => 0,
        Verdict::Unknown | Verdict::Warning => 1,
        Verdict::Failed => 2,
    })
}
