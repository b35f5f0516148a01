//! The vehicle registry in the depot store: provisioning and credentials, applying checked
//! messages, and the views the API and panel show.
//!
//! Ordering: vehicles buffer while their link is down and send late, and QoS 1 may deliver a
//! message twice, so each kind of report carries the vehicle's timestamp and an older one never
//! overwrites a newer one. Applying the same message twice changes nothing.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use atlasmesh_vehicle_link::wire::{
    Dock, Health, Link, Message, OtaOutcome, OtaPhase, OtaReport, State,
};

use super::VehicleEvent;
use subtle::ConstantTimeEq;

use crate::auth::{new_secret, secret_hash};
use crate::store::StoreError;

/// Prefix of vehicle MQTT passwords, so a leaked one is recognisable.
pub const SECRET_PREFIX: &str = "amv_";

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("vehicle {0} is already registered")]
    Exists(String),
    #[error("no vehicle {0}")]
    NotFound(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<rusqlite::Error> for RegistryError {
    fn from(e: rusqlite::Error) -> Self {
        RegistryError::Store(e.into())
    }
}

/// Registers a vehicle and returns its MQTT password (shown once; only its hash is kept).
pub fn create(
    conn: &Connection,
    id: &str,
    hardware_id: Option<&str>,
    by: &str,
    now: i64,
) -> Result<String, RegistryError> {
    let secret = new_secret(SECRET_PREFIX);
    let inserted = conn.execute(
        "INSERT INTO vehicles (id, hardware_id, secret_sha256, credentials_at, created_at, created_by)
         VALUES (?1, ?2, ?3, ?4, ?4, ?5) ON CONFLICT (id) DO NOTHING",
        params![id, hardware_id, secret_hash(&secret), now, by],
    )?;
    if inserted == 0 {
        return Err(RegistryError::Exists(id.to_owned()));
    }
    Ok(secret)
}

/// Replaces a vehicle's MQTT password; the old one stops working at its next connection.
pub fn reissue(conn: &Connection, id: &str, now: i64) -> Result<String, RegistryError> {
    let secret = new_secret(SECRET_PREFIX);
    let n = conn.execute(
        "UPDATE vehicles SET secret_sha256 = ?2, credentials_at = ?3 WHERE id = ?1",
        params![id, secret_hash(&secret), now],
    )?;
    if n == 0 {
        return Err(RegistryError::NotFound(id.to_owned()));
    }
    Ok(secret)
}

/// Whether `secret` is the vehicle's current MQTT password.
pub fn check_secret(conn: &Connection, id: &str, secret: &str) -> Result<bool, StoreError> {
    let stored: Option<Option<Vec<u8>>> = conn
        .query_row(
            "SELECT secret_sha256 FROM vehicles WHERE id = ?1",
            [id],
            |r| r.get(0),
        )
        .optional()?;
    Ok(match stored.flatten() {
        Some(hash) => bool::from(hash.ct_eq(&secret_hash(secret))),
        None => false,
    })
}

/// How one message fared.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Applied,
    /// Older than what the registry holds (a late or redelivered message).
    Stale,
    /// Nobody registered this vehicle.
    UnknownVehicle,
}

impl Applied {
    pub fn as_str(self) -> &'static str {
        match self {
            Applied::Applied => "applied",
            Applied::Stale => "stale",
            Applied::UnknownVehicle => "unknown_vehicle",
        }
    }
}

/// Applies one checked message received at `now` (depot clock).
pub fn apply(
    conn: &Connection,
    vehicle: &str,
    message: &Message,
    now: i64,
) -> Result<(Applied, Option<VehicleEvent>), StoreError> {
    let changed = match message {
        Message::Dock(m) => return apply_dock(conn, vehicle, m, now),
        Message::State(m) => apply_state(conn, vehicle, m, now)?,
        Message::Ota(m) => apply_ota(conn, vehicle, m, now)?,
        Message::Health(m) => apply_health(conn, vehicle, m, now)?,
        Message::Link(m) => return apply_link(conn, vehicle, m, now),
    };
    if changed {
        let event = match message {
            Message::State(m) => VehicleEvent::State {
                vehicle: vehicle.to_owned(),
                state: m.clone(),
            },
            Message::Ota(m) => VehicleEvent::Ota {
                vehicle: vehicle.to_owned(),
                report: m.clone(),
            },
            Message::Health(m) => VehicleEvent::Health {
                vehicle: vehicle.to_owned(),
                health: m.clone(),
            },
            Message::Dock(_) | Message::Link(_) => unreachable!("handled above"),
        };
        return Ok((Applied::Applied, Some(event)));
    }
    Ok((missing_or_stale(conn, vehicle)?, None))
}

fn missing_or_stale(conn: &Connection, vehicle: &str) -> Result<Applied, StoreError> {
    let exists = conn
        .prepare_cached("SELECT 1 FROM vehicles WHERE id = ?1")?
        .exists([vehicle])?;
    Ok(if exists {
        Applied::Stale
    } else {
        Applied::UnknownVehicle
    })
}

fn apply_dock(
    conn: &Connection,
    vehicle: &str,
    m: &Dock,
    now: i64,
) -> Result<(Applied, Option<VehicleEvent>), StoreError> {
    let before: Option<(bool, Option<String>, Option<i64>)> = conn
        .prepare_cached("SELECT docked, bay, dock_ts FROM vehicles WHERE id = ?1")?
        .query_row([vehicle], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
        .optional()?;
    let Some((was_docked, was_bay, dock_ts)) = before else {
        return Ok((Applied::UnknownVehicle, None));
    };
    if dock_ts.is_some_and(|ts| ts > m.ts_ms) {
        return Ok((Applied::Stale, None));
    }
    let bay = if m.docked { m.bay.as_deref() } else { None };
    conn.prepare_cached(
        "UPDATE vehicles SET docked = ?2, bay = ?3, dock_ts = ?4, last_seen_at = ?5,
         messages = messages + 1 WHERE id = ?1",
    )?
    .execute(params![vehicle, m.docked, bay, m.ts_ms, now])?;
    if let Some(bay) = bay {
        conn.prepare_cached(
            "INSERT INTO bays (id, first_seen_at) VALUES (?1, ?2) ON CONFLICT DO NOTHING",
        )?
        .execute(params![bay, now])?;
    }
    let event = (was_docked != m.docked || was_bay.as_deref() != bay).then(|| {
        if m.docked {
            VehicleEvent::Docked {
                vehicle: vehicle.to_owned(),
                bay: bay.map(str::to_owned),
            }
        } else {
            VehicleEvent::Undocked {
                vehicle: vehicle.to_owned(),
            }
        }
    });
    Ok((Applied::Applied, event))
}

fn apply_state(conn: &Connection, vehicle: &str, m: &State, now: i64) -> Result<bool, StoreError> {
    let n = conn
        .prepare_cached(
            "UPDATE vehicles SET soc_percent = ?2, battery_kwh = ?3, plugged_in = ?4,
             departure_ms = ?5, installed_version = ?6, slot = ?7, free_bytes = ?8, state_ts = ?9,
             last_seen_at = ?10, messages = messages + 1
             WHERE id = ?1 AND (state_ts IS NULL OR state_ts <= ?9)",
        )?
        .execute(params![
            vehicle,
            m.soc_percent,
            m.battery_kwh,
            m.plugged_in,
            m.departure_ms,
            m.installed_version,
            m.slot.to_string(),
            i64::try_from(m.free_bytes).unwrap_or(i64::MAX),
            m.ts_ms,
            now
        ])?;
    Ok(n > 0)
}

fn apply_ota(
    conn: &Connection,
    vehicle: &str,
    m: &OtaReport,
    now: i64,
) -> Result<bool, StoreError> {
    let phase = serde_plain(&m.phase);
    let outcome = serde_plain(&m.outcome);
    let n = conn
        .prepare_cached(
            "UPDATE vehicles SET ota_version = ?2, ota_phase = ?3, ota_outcome = ?4,
             ota_bytes_done = ?5, ota_bytes_total = ?6, ota_error = ?7, ota_ts = ?8,
             last_seen_at = ?9, messages = messages + 1
             WHERE id = ?1 AND (ota_ts IS NULL OR ota_ts <= ?8)",
        )?
        .execute(params![
            vehicle,
            m.version,
            phase,
            outcome,
            m.bytes_done.map(|b| i64::try_from(b).unwrap_or(i64::MAX)),
            m.bytes_total.map(|b| i64::try_from(b).unwrap_or(i64::MAX)),
            m.error,
            m.ts_ms,
            now
        ])?;
    // Progress reports only move the bar; the history keeps the steps canary waves judge by,
    // including late ones that no longer change the current state.
    if m.outcome != OtaOutcome::Progress {
        conn.prepare_cached(
            "INSERT INTO vehicle_ota_reports (vehicle_id, version, phase, outcome, error, ts, received_at)
             SELECT ?1, ?2, ?3, ?4, ?5, ?6, ?7 WHERE EXISTS (SELECT 1 FROM vehicles WHERE id = ?1)
             ON CONFLICT DO NOTHING",
        )?
        .execute(params![vehicle, m.version, phase, outcome, m.error, m.ts_ms, now])?;
    }
    Ok(n > 0)
}

fn apply_health(
    conn: &Connection,
    vehicle: &str,
    m: &Health,
    now: i64,
) -> Result<bool, StoreError> {
    let faults = serde_json::to_string(&m.faults).unwrap_or_else(|_| "[]".into());
    let n = conn
        .prepare_cached(
            "UPDATE vehicles SET health_status = ?2, health_faults = ?3, health_ts = ?4,
             last_seen_at = ?5, messages = messages + 1
             WHERE id = ?1 AND (health_ts IS NULL OR health_ts <= ?4)",
        )?
        .execute(params![
            vehicle,
            serde_plain(&m.status),
            faults,
            m.ts_ms,
            now
        ])?;
    Ok(n > 0)
}

fn apply_link(
    conn: &Connection,
    vehicle: &str,
    m: &Link,
    now: i64,
) -> Result<(Applied, Option<VehicleEvent>), StoreError> {
    let before: Option<bool> = conn
        .prepare_cached("SELECT online FROM vehicles WHERE id = ?1")?
        .query_row([vehicle], |r| r.get(0))
        .optional()?;
    let Some(was_online) = before else {
        return Ok((Applied::UnknownVehicle, None));
    };
    // The link message has no vehicle clock (the broker sends the Last Will); the broker keeps
    // per-topic order, so the last one received is the current one.
    conn.prepare_cached(
        "UPDATE vehicles SET online = ?2, link_at = ?3, messages = messages + 1,
         last_seen_at = CASE WHEN ?2 THEN ?3 ELSE last_seen_at END WHERE id = ?1",
    )?
    .execute(params![vehicle, m.online, now])?;
    let event = (was_online != m.online).then(|| VehicleEvent::Link {
        vehicle: vehicle.to_owned(),
        online: m.online,
    });
    Ok((Applied::Applied, event))
}

/// The lower-case name serde gives a unit enum variant.
/// A unit enum's serde name (`"rolling_back"`); empty for anything else.
pub(crate) fn serde_plain<T: Serialize>(value: &T) -> String {
    match serde_json::to_value(value) {
        Ok(serde_json::Value::String(s)) => s,
        _ => String::new(),
    }
}

/// A vehicle as the API and panel show it.
#[derive(Debug, Clone, Serialize)]
pub struct VehicleView {
    pub id: String,
    pub hardware_id: Option<String>,
    pub online: bool,
    pub docked: bool,
    pub bay: Option<String>,
    pub soc_percent: Option<f64>,
    pub battery_kwh: Option<f64>,
    pub plugged_in: Option<bool>,
    pub departure_ms: Option<i64>,
    pub installed_version: Option<String>,
    pub slot: Option<String>,
    pub free_bytes: Option<i64>,
    pub health: Option<String>,
    pub health_faults: Vec<String>,
    pub ota: Option<OtaView>,
    /// The version the depot has assigned it, if any.
    pub assigned_version: Option<String>,
    /// Depot clock, Unix ms, of the last message applied.
    pub last_seen_at: Option<i64>,
    pub messages: i64,
    pub created_at: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct OtaView {
    pub version: String,
    pub phase: String,
    pub outcome: String,
    pub bytes_done: Option<i64>,
    pub bytes_total: Option<i64>,
    pub error: Option<String>,
    pub ts_ms: i64,
}

const VIEW_COLUMNS: &str = "v.id, v.hardware_id, v.online, v.docked, v.bay, v.soc_percent,
    v.battery_kwh, v.plugged_in, v.departure_ms, v.installed_version, v.slot, v.free_bytes,
    v.health_status, v.health_faults, v.ota_version, v.ota_phase, v.ota_outcome,
    v.ota_bytes_done, v.ota_bytes_total, v.ota_error, v.ota_ts, i.version, v.last_seen_at,
    v.messages, v.created_at
    FROM vehicles v
    LEFT JOIN ota_assignments a ON a.vehicle_id = v.id
    LEFT JOIN ota_images i ON i.id = a.image_id";

fn view_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<VehicleView> {
    let faults: Option<String> = r.get(13)?;
    let ota_version: Option<String> = r.get(14)?;
    let ota = match ota_version {
        Some(version) => Some(OtaView {
            version,
            phase: r.get(15)?,
            outcome: r.get(16)?,
            bytes_done: r.get(17)?,
            bytes_total: r.get(18)?,
            error: r.get(19)?,
            ts_ms: r.get(20)?,
        }),
        None => None,
    };
    Ok(VehicleView {
        id: r.get(0)?,
        hardware_id: r.get(1)?,
        online: r.get(2)?,
        docked: r.get(3)?,
        bay: r.get(4)?,
        soc_percent: r.get(5)?,
        battery_kwh: r.get(6)?,
        plugged_in: r.get(7)?,
        departure_ms: r.get(8)?,
        installed_version: r.get(9)?,
        slot: r.get(10)?,
        free_bytes: r.get(11)?,
        health: r.get(12)?,
        health_faults: faults
            .and_then(|f| serde_json::from_str(&f).ok())
            .unwrap_or_default(),
        ota,
        assigned_version: r.get(21)?,
        last_seen_at: r.get(22)?,
        messages: r.get(23)?,
        created_at: r.get(24)?,
    })
}

pub fn list(conn: &Connection) -> Result<Vec<VehicleView>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!("SELECT {VIEW_COLUMNS} ORDER BY v.id"))?;
    let rows = stmt.query_map([], view_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// One stored OTA report (not progress), in arrival order.
pub struct StoredReport {
    pub id: i64,
    pub vehicle_id: String,
    pub version: String,
    pub phase: OtaPhase,
    pub outcome: OtaOutcome,
    pub error: Option<String>,
    /// Depot clock, ms.
    pub received_at: i64,
}

/// The reports after `after` (by id), oldest first, at most `limit`. Rows whose phase or
/// outcome this binary does not know are skipped.
pub fn reports_since(
    conn: &Connection,
    after: i64,
    limit: usize,
) -> Result<Vec<StoredReport>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, vehicle_id, version, phase, outcome, error, received_at
         FROM vehicle_ota_reports WHERE id > ?1 ORDER BY id LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![after, limit as i64], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, String>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, String>(4)?,
            r.get::<_, Option<String>>(5)?,
            r.get::<_, i64>(6)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, vehicle_id, version, phase, outcome, error, received_at) = row?;
        let (Some(phase), Some(outcome)) = (from_plain(&phase), from_plain(&outcome)) else {
            continue;
        };
        out.push(StoredReport {
            id,
            vehicle_id,
            version,
            phase,
            outcome,
            error,
            received_at,
        });
    }
    Ok(out)
}

/// The inverse of [`serde_plain`].
fn from_plain<T: serde::de::DeserializeOwned>(s: &str) -> Option<T> {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).ok()
}

/// The newest stored report's id (0 when there is none).
pub fn last_report_id(conn: &Connection) -> Result<i64, StoreError> {
    Ok(conn.query_row(
        "SELECT coalesce(max(id), 0) FROM vehicle_ota_reports",
        [],
        |r| r.get(0),
    )?)
}

/// Which vehicles report running which image: `(hardware id, version)` to vehicle ids, sorted.
pub fn installed(
    conn: &Connection,
) -> Result<std::collections::BTreeMap<(String, String), Vec<String>>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT hardware_id, installed_version, id FROM vehicles
         WHERE hardware_id IS NOT NULL AND installed_version IS NOT NULL ORDER BY id",
    )?;
    let mut by_image = std::collections::BTreeMap::<_, Vec<String>>::new();
    for row in stmt.query_map([], |r| Ok(((r.get(0)?, r.get(1)?), r.get(2)?)))? {
        let (image, vehicle) = row?;
        by_image.entry(image).or_default().push(vehicle);
    }
    Ok(by_image)
}

pub fn get(conn: &Connection, id: &str) -> Result<Option<VehicleView>, StoreError> {
    Ok(conn
        .prepare_cached(&format!("SELECT {VIEW_COLUMNS} WHERE v.id = ?1"))?
        .query_row([id], view_row)
        .optional()?)
}

/// One bay on the board.
#[derive(Debug, Clone, Serialize)]
pub struct BayView {
    pub bay: String,
    /// The docked vehicle, if any.
    pub vehicle: Option<String>,
    pub online: Option<bool>,
    pub soc_percent: Option<f64>,
    pub plugged_in: Option<bool>,
    pub departure_ms: Option<i64>,
    pub installed_version: Option<String>,
    pub health: Option<String>,
}

pub fn bays(conn: &Connection) -> Result<Vec<BayView>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT b.id, v.id, v.online, v.soc_percent, v.plugged_in, v.departure_ms,
                v.installed_version, v.health_status
         FROM bays b LEFT JOIN vehicles v ON v.bay = b.id AND v.docked = 1
         ORDER BY length(b.id), b.id, v.dock_ts DESC",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(BayView {
            bay: r.get(0)?,
            vehicle: r.get(1)?,
            online: r.get(2)?,
            soc_percent: r.get(3)?,
            plugged_in: r.get(4)?,
            departure_ms: r.get(5)?,
            installed_version: r.get(6)?,
            health: r.get(7)?,
        })
    })?;
    let mut out: Vec<BayView> = Vec::new();
    for row in rows {
        let row = row?;
        // Two vehicles claiming one bay: the most recent dock is shown.
        if out.last().is_some_and(|b| b.bay == row.bay) {
            continue;
        }
        out.push(row);
    }
    Ok(out)
}

/// Whether the registry has `vehicle` docked (an unknown vehicle is not).
pub fn is_docked(conn: &Connection, vehicle: &str) -> Result<bool, StoreError> {
    Ok(conn
        .prepare_cached("SELECT docked FROM vehicles WHERE id = ?1")?
        .query_row([vehicle], |r| r.get(0))
        .optional()?
        .unwrap_or(false))
}

/// Vehicles that have an assignment they do not run yet (`vehicle` alone, if given): who
/// to notify.
pub fn pending_notifications(
    conn: &Connection,
    vehicle: Option<&str>,
) -> Result<Vec<(String, String, String)>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT v.id, i.version, i.hardware_id FROM vehicles v
         JOIN ota_assignments a ON a.vehicle_id = v.id
         JOIN ota_images i ON i.id = a.image_id
         WHERE i.deleted_at IS NULL AND i.corrupt_at IS NULL
           AND (v.installed_version IS NULL OR v.installed_version <> i.version)
           AND (?1 IS NULL OR v.id = ?1)",
    )?;
    let rows = stmt.query_map([vehicle], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))?;
    Ok(rows.collect::<Result<_, _>>()?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use atlasmesh_vehicle_link::wire::{OtaPhase, Slot};

    fn store() -> (tempfile::TempDir, crate::store::Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("depot.db")).unwrap();
        (dir, store)
    }

    fn state(soc: f64, ts: i64) -> Message {
        Message::State(State {
            soc_percent: soc,
            battery_kwh: 80.0,
            plugged_in: true,
            departure_ms: None,
            installed_version: "1.0.0".into(),
            slot: Slot::A,
            free_bytes: 1 << 30,
            ts_ms: ts,
        })
    }

    #[test]
    fn newer_reports_win_and_duplicates_change_nothing() {
        let (_dir, store) = store();
        store
            .write_blocking(|tx| -> Result<(), RegistryError> {
                let secret = create(tx, "veh-1", Some("hw"), "test", 1)?;
                assert!(check_secret(tx, "veh-1", &secret)?);
                assert!(!check_secret(tx, "veh-1", "amv_wrong")?);
                assert!(!check_secret(tx, "veh-2", &secret)?);
                assert!(matches!(
                    create(tx, "veh-1", None, "test", 2),
                    Err(RegistryError::Exists(_))
                ));

                assert_eq!(
                    apply(tx, "veh-1", &state(40.0, 100), 5)?.0,
                    Applied::Applied
                );
                assert_eq!(apply(tx, "veh-1", &state(30.0, 90), 6)?.0, Applied::Stale);
                assert_eq!(
                    apply(tx, "veh-1", &state(40.0, 100), 7)?.0,
                    Applied::Applied
                );
                assert_eq!(
                    apply(tx, "veh-9", &state(40.0, 100), 7)?.0,
                    Applied::UnknownVehicle
                );
                let v = get(tx, "veh-1")?.unwrap();
                assert_eq!(v.soc_percent, Some(40.0));

                let dock = |docked, ts| {
                    Message::Dock(Dock {
                        docked,
                        bay: docked.then(|| "bay-3".to_owned()),
                        ts_ms: ts,
                    })
                };
                let (a, e) = apply(tx, "veh-1", &dock(true, 200), 8)?;
                assert_eq!(a, Applied::Applied);
                assert!(matches!(e, Some(VehicleEvent::Docked { .. })));
                // The same dock again: applied, but nothing changed, so no event.
                assert!(apply(tx, "veh-1", &dock(true, 200), 9)?.1.is_none());
                assert_eq!(apply(tx, "veh-1", &dock(false, 150), 9)?.0, Applied::Stale);
                let board = bays(tx)?;
                assert_eq!(board.len(), 1);
                assert_eq!(board[0].vehicle.as_deref(), Some("veh-1"));
                apply(tx, "veh-1", &dock(false, 300), 10)?;
                assert_eq!(bays(tx)?[0].vehicle, None);

                let report = |outcome, ts| {
                    Message::Ota(OtaReport {
                        version: "1.1.0".into(),
                        phase: OtaPhase::Install,
                        outcome,
                        bytes_done: None,
                        bytes_total: None,
                        error: None,
                        ts_ms: ts,
                    })
                };
                apply(tx, "veh-1", &report(OtaOutcome::Started, 400), 11)?;
                apply(tx, "veh-1", &report(OtaOutcome::Started, 400), 12)?;
                apply(tx, "veh-1", &report(OtaOutcome::Succeeded, 500), 13)?;
                let history: i64 =
                    tx.query_row("SELECT count(*) FROM vehicle_ota_reports", [], |r| r.get(0))?;
                assert_eq!(history, 2, "a redelivered report is recorded once");
                assert_eq!(get(tx, "veh-1")?.unwrap().ota.unwrap().outcome, "succeeded");
                Ok(())
            })
            .unwrap();
    }
}
