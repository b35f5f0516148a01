//! What people set for charging: per-vehicle departure, target and priority (technicians),
//! the site limit and tariff (admins). Changes are audited by the API that makes them.

use rusqlite::{Connection, OptionalExtension, Transaction, params};
use serde::{Deserialize, Serialize};

use crate::store::StoreError;

/// Quarter-hours in a day: the tariff's resolution.
pub const TARIFF_SLOTS: usize = 96;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct VehicleSettings {
    pub vehicle_id: String,
    pub departure_ms: Option<i64>,
    pub target_soc_percent: Option<f64>,
    pub priority: u8,
    pub updated_at: i64,
    pub updated_by: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Site {
    pub limit_kw: f64,
    /// Price per kWh for each local quarter-hour from midnight.
    pub tariff: Vec<f64>,
    /// Who set it; None while the configured defaults are in force.
    pub updated_by: Option<String>,
    pub updated_at: Option<i64>,
    /// Where the limit in force comes from: `config`, `admin` or `cloud` (a fleet override,
    /// which wins over the depot's own setting while it lasts).
    #[serde(default = "config_source")]
    pub limit_source: String,
    #[serde(default = "config_source")]
    pub tariff_source: String,
}

fn config_source() -> String {
    "config".into()
}

/// A time-of-use tariff for when nobody has set one: cheap at night, dear at the evening peak.
pub fn default_tariff() -> Vec<f64> {
    (0..TARIFF_SLOTS)
        .map(|q| match q / 4 {
            0..=5 => 0.12,
            6..=16 => 0.26,
            17..=20 => 0.38,
            _ => 0.18,
        })
        .collect()
}

pub fn vehicle_settings(conn: &Connection) -> Result<Vec<VehicleSettings>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT vehicle_id, departure_ms, target_soc_percent, priority, updated_at, updated_by
         FROM charging_vehicles ORDER BY vehicle_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(VehicleSettings {
            vehicle_id: r.get(0)?,
            departure_ms: r.get(1)?,
            target_soc_percent: r.get(2)?,
            priority: r.get(3)?,
            updated_at: r.get(4)?,
            updated_by: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn set_vehicle(tx: &Transaction<'_>, s: &VehicleSettings) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO charging_vehicles
             (vehicle_id, departure_ms, target_soc_percent, priority, updated_at, updated_by)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (vehicle_id) DO UPDATE SET departure_ms = ?2, target_soc_percent = ?3,
             priority = ?4, updated_at = ?5, updated_by = ?6",
        params![
            s.vehicle_id,
            s.departure_ms,
            s.target_soc_percent,
            s.priority,
            s.updated_at,
            s.updated_by
        ],
    )?;
    Ok(())
}

/// The site as set by an admin, or None while the configuration's defaults hold.
pub fn site(conn: &Connection) -> Result<Option<Site>, StoreError> {
    let row: Option<(f64, String, i64, String)> = conn
        .query_row(
            "SELECT limit_kw, tariff, updated_at, updated_by FROM charging_site WHERE id = 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)),
        )
        .optional()?;
    Ok(row.map(|(limit_kw, tariff, at, by)| Site {
        limit_kw,
        // Written only through `set_site`, which stores a checked array.
        tariff: serde_json::from_str(&tariff).unwrap_or_else(|_| default_tariff()),
        updated_by: Some(by),
        updated_at: Some(at),
        limit_source: "admin".into(),
        tariff_source: "admin".into(),
    }))
}

pub fn set_site(
    tx: &Transaction<'_>,
    limit_kw: f64,
    tariff: &[f64],
    at: i64,
    by: &str,
) -> Result<(), StoreError> {
    let tariff = serde_json::to_string(tariff).unwrap_or_default();
    tx.execute(
        "INSERT INTO charging_site (id, limit_kw, tariff, updated_at, updated_by)
         VALUES (1, ?1, ?2, ?3, ?4)
         ON CONFLICT (id) DO UPDATE SET limit_kw = ?1, tariff = ?2, updated_at = ?3,
             updated_by = ?4",
        params![limit_kw, tariff, at, by],
    )?;
    Ok(())
}
