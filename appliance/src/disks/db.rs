//! Disk health in the depot store: each device's latest view, its downsampled history, the
//! self-tests started, and verdict-change alerts with their webhook delivery state.

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use super::schedule::{self, Change, Resolution, TestKind};
use super::verdict::{Sample, Verdict};
use crate::store::StoreError;

/// Stores the latest view of a device; the verdict it had before, if it was known.
pub fn upsert(
    conn: &Connection,
    id: &str,
    device: &str,
    verdict: Verdict,
    view: &str,
    now_ms: i64,
) -> Result<Option<Verdict>, StoreError> {
    let before: Option<String> = conn
        .query_row("SELECT verdict FROM disks WHERE id = ?1", [id], |r| {
            r.get(0)
        })
        .optional()?;
    conn.execute(
        "INSERT INTO disks (id, device, verdict, view, first_seen_at, read_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?5)
         ON CONFLICT (id) DO UPDATE SET device = ?2, verdict = ?3, view = ?4, read_at = ?5",
        params![id, device, verdict.as_str(), view, now_ms],
    )?;
    Ok(before.as_deref().and_then(Verdict::parse))
}

/// Every device's latest view (JSON), by id.
pub fn list(conn: &Connection) -> Result<Vec<(String, String)>, StoreError> {
    let mut stmt = conn.prepare_cached("SELECT id, view FROM disks ORDER BY device, id")?;
    let rows = stmt
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

pub fn get(conn: &Connection, id: &str) -> Result<Option<String>, StoreError> {
    Ok(conn
        .query_row("SELECT view FROM disks WHERE id = ?1", [id], |r| r.get(0))
        .optional()?)
}

/// Adds one reading's counters and downsamples the device's history.
pub fn add_sample(conn: &Connection, id: &str, sample: &Sample) -> Result<(), StoreError> {
    let json = serde_json::to_string(sample).expect("a sample serialises");
    conn.execute(
        "INSERT INTO disk_samples (disk_id, at, resolution, sample) VALUES (?1, ?2, 'raw', ?3)
         ON CONFLICT (disk_id, at) DO UPDATE SET sample = ?3",
        params![id, sample.at_unix, json],
    )?;
    let stored: Vec<(i64, Resolution)> = {
        let mut stmt =
            conn.prepare_cached("SELECT at, resolution FROM disk_samples WHERE disk_id = ?1")?;
        stmt.query_map([id], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?
            .filter_map(|r| match r {
                Ok((at, res)) => Resolution::parse(&res).map(|res| Ok((at, res))),
                Err(e) => Some(Err(e)),
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    for change in schedule::compact(&stored, sample.at_unix) {
        match change {
            Change::Delete { at } => conn.execute(
                "DELETE FROM disk_samples WHERE disk_id = ?1 AND at = ?2",
                params![id, at],
            )?,
            Change::Coarsen { at, to } => conn.execute(
                "UPDATE disk_samples SET resolution = ?3 WHERE disk_id = ?1 AND at = ?2",
                params![id, at, to.as_str()],
            )?,
        };
    }
    Ok(())
}

/// One stored point of a device's history.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryPoint {
    pub resolution: Resolution,
    #[serde(flatten)]
    pub sample: Sample,
}

/// The device's history since `since` (unix seconds), oldest first.
pub fn history(conn: &Connection, id: &str, since: i64) -> Result<Vec<HistoryPoint>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT resolution, sample FROM disk_samples WHERE disk_id = ?1 AND at >= ?2 ORDER BY at",
    )?;
    let rows = stmt
        .query_map(params![id, since], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows
        .into_iter()
        .filter_map(|(res, json)| {
            Some(HistoryPoint {
                resolution: Resolution::parse(&res)?,
                sample: serde_json::from_str(&json).ok()?,
            })
        })
        .collect())
}

/// When each kind of self-test was last started on the device (unix seconds).
pub fn tests_started(
    conn: &Connection,
    id: &str,
) -> Result<(Option<i64>, Option<i64>), StoreError> {
    let mut stmt =
        conn.prepare_cached("SELECT kind, started_at FROM disk_self_tests WHERE disk_id = ?1")?;
    let mut out = (None, None);
    for row in stmt.query_map([id], |r| Ok((r.get::<_, String>(0)?, r.get::<_, i64>(1)?)))? {
        match row? {
            (k, at) if k == "short" => out.0 = Some(at),
            (_, at) => out.1 = Some(at),
        }
    }
    Ok(out)
}

pub fn record_test(conn: &Connection, id: &str, kind: TestKind, at: i64) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO disk_self_tests (disk_id, kind, started_at) VALUES (?1, ?2, ?3)
         ON CONFLICT (disk_id, kind) DO UPDATE SET started_at = ?3",
        params![id, kind.as_str(), at],
    )?;
    Ok(())
}

/// A verdict change, as the panel lists it and the webhook receives it.
#[derive(Debug, Clone, Serialize)]
pub struct Alert {
    pub id: i64,
    pub disk: String,
    pub device: String,
    /// Unix ms.
    pub at: i64,
    pub from: Option<Verdict>,
    pub to: Verdict,
    pub reasons: serde_json::Value,
    /// `none` (no webhook configured), `pending` or `delivered`.
    pub webhook: String,
    pub attempts: i64,
    pub last_error: Option<String>,
}

pub struct NewAlert<'a> {
    pub disk: &'a str,
    pub device: &'a str,
    pub from: Option<Verdict>,
    pub to: Verdict,
    pub reasons: &'a serde_json::Value,
    pub webhook: bool,
}

pub fn insert_alert(conn: &Connection, a: &NewAlert<'_>, now_ms: i64) -> Result<i64, StoreError> {
    conn.execute(
        "INSERT INTO disk_alerts (disk_id, device, at, from_verdict, to_verdict, reasons, webhook,
                                  next_attempt_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            a.disk,
            a.device,
            now_ms,
            a.from.map(Verdict::as_str),
            a.to.as_str(),
            a.reasons.to_string(),
            if a.webhook { "pending" } else { "none" },
            a.webhook.then_some(now_ms),
        ],
    )?;
    Ok(conn.last_insert_rowid())
}

const ALERT_COLUMNS: &str =
    "id, disk_id, device, at, from_verdict, to_verdict, reasons, webhook, attempts, last_error";

fn alert_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Alert> {
    let from: Option<String> = r.get(4)?;
    let to: String = r.get(5)?;
    let reasons: String = r.get(6)?;
    Ok(Alert {
        id: r.get(0)?,
        disk: r.get(1)?,
        device: r.get(2)?,
        at: r.get(3)?,
        from: from.as_deref().and_then(Verdict::parse),
        to: Verdict::parse(&to).unwrap_or(Verdict::Unknown),
        reasons: serde_json::from_str(&reasons).unwrap_or_default(),
        webhook: r.get(7)?,
        attempts: r.get(8)?,
        last_error: r.get(9)?,
    })
}

/// The newest alerts first, of one disk or of all.
pub fn recent_alerts(
    conn: &Connection,
    disk: Option<&str>,
    limit: i64,
) -> Result<Vec<Alert>, StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {ALERT_COLUMNS} FROM disk_alerts WHERE ?1 IS NULL OR disk_id = ?1
         ORDER BY id DESC LIMIT ?2"
    ))?;
    let rows = stmt
        .query_map(params![disk, limit], alert_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Alerts whose webhook delivery is due at `now_ms`, oldest first; and when the next one after
/// them falls due, if any.
pub fn due_alerts(conn: &Connection, now_ms: i64) -> Result<(Vec<Alert>, Option<i64>), StoreError> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {ALERT_COLUMNS} FROM disk_alerts
         WHERE webhook = 'pending' AND next_attempt_at <= ?1 ORDER BY id LIMIT 50"
    ))?;
    let due = stmt
        .query_map([now_ms], alert_row)?
        .collect::<Result<Vec<_>, _>>()?;
    let next = conn.query_row(
        "SELECT min(next_attempt_at) FROM disk_alerts WHERE webhook = 'pending' AND next_attempt_at > ?1",
        [now_ms],
        |r| r.get(0),
    )?;
    Ok((due, next))
}

pub fn delivered(conn: &Connection, id: i64) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE disk_alerts SET webhook = 'delivered', attempts = attempts + 1,
                next_attempt_at = NULL, last_error = NULL WHERE id = ?1",
        [id],
    )?;
    Ok(())
}

pub fn delivery_failed(
    conn: &Connection,
    id: i64,
    error: &str,
    next_attempt_at: i64,
) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE disk_alerts SET attempts = attempts + 1, last_error = ?2, next_attempt_at = ?3
         WHERE id = ?1",
        params![id, error, next_attempt_at],
    )?;
    Ok(())
}
