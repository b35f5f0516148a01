//! `atlasmesh charger`: commissioning checks of a charger or meter against its profile, the
//! same driver the depot's control loop uses.

use std::sync::Arc;

use anyhow::Context;
use atlasmesh_charging::driver::Device;
use serde_json::json;

use crate::cli::{ChargerProfilesArgs, ChargerReadArgs};

/// Reads (and optionally writes) once; prints JSON. Exit code 1 on a device error.
pub async fn read(args: ChargerReadArgs) -> anyhow::Result<u8> {
    let profiles = crate::charging::load_profiles(args.profiles_dir.as_deref())?;
    let profile = profiles.get(&args.profile).cloned().with_context(|| {
        format!(
            "no profile {:?}; known: {}",
            args.profile,
            profiles.keys().cloned().collect::<Vec<_>>().join(", ")
        )
    })?;
    let addr = crate::charging::resolve(&args.address)
        .await
        .map_err(anyhow::Error::msg)?;
    let unit = args.unit_id.unwrap_or(profile.device.unit_id);
    let result = async {
        let mut device = Device::connect(addr, unit, Arc::clone(&profile), args.timeout).await?;
        let mut out = json!({ "profile": args.profile, "address": args.address, "unit_id": unit });
        out["before"] = serde_json::to_value(device.poll().await?).unwrap_or_default();
        if args.keep_alive {
            device.configure_failsafe().await?;
            device.life_bit().await?;
            out["keep_alive"] = json!(true);
        }
        if let Some(amps) = args.set_current {
            device.set_current(amps).await?;
            out["set_current_a"] = json!(amps);
            out["after"] = serde_json::to_value(device.poll().await?).unwrap_or_default();
        }
        Ok::<_, atlasmesh_charging::driver::DriverError>(out)
    }
    .await;
    match result {
        Ok(out) => {
            crate::outln!("{}", serde_json::to_string_pretty(&out)?)?;
            Ok(0)
        }
        Err(e) => {
            crate::errln!("error: {} ({}): {e}", args.address, e.code());
            Ok(1)
        }
    }
}

pub fn profiles(args: ChargerProfilesArgs) -> anyhow::Result<u8> {
    let profiles = crate::charging::load_profiles(args.profiles_dir.as_deref())?;
    for (name, p) in profiles {
        crate::outln!(
            "{name:24} {:8} {} {}",
            format!("{:?}", p.device.kind).to_lowercase(),
            p.device.manufacturer,
            p.device.model
        )?;
    }
    Ok(0)
}
