//! The audit trail: who did what to which thing, with what result, when, under which request.
//!
//! A change and its audit record are written in the same transaction (see
//! [`crate::http::Ctx::audited`]), so there is never a change without its record or a record
//! of a change that was rolled back.

use rusqlite::{Connection, params};
use serde::Serialize;

use crate::auth::Role;
use crate::store::StoreError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    Ok,
    /// Refused for lack of a role or a failed check (CSRF, wrong password).
    Denied,
    /// Attempted but failed (conflict, not found, internal error).
    Failed,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Denied => "denied",
            Outcome::Failed => "failed",
        }
    }
}

/// One thing that happened, before it is stored.
#[derive(Debug, Clone)]
pub struct Entry {
    pub actor: String,
    pub role: Option<Role>,
    pub action: String,
    pub target: Option<String>,
    pub outcome: Outcome,
    pub request_id: Option<String>,
    pub detail: serde_json::Value,
}

#[derive(Debug, Clone, Serialize)]
pub struct Record {
    pub id: i64,
    /// RFC 3339, UTC.
    pub at: String,
    pub actor: String,
    pub role: Option<String>,
    pub action: String,
    pub target: Option<String>,
    pub result: String,
    pub request_id: Option<String>,
    pub detail: serde_json::Value,
}

pub fn record(conn: &Connection, entry: &Entry, at_ms: i64) -> Result<i64, StoreError> {
    conn.execute(
        "INSERT INTO audit_log (at, actor, role, action, target, result, request_id, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
        params![
            at_ms,
            entry.actor,
            entry.role.map(Role::as_str),
            entry.action,
            entry.target,
            entry.outcome.as_str(),
            entry.request_id,
            entry.detail.to_string(),
        ],
    )?;
    Ok(conn.last_insert_rowid())
}

#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Query {
    /// At most this many records, newest first (default 100, at most 1000).
    pub limit: Option<u32>,
    /// Only records with an id below this one (for paging backwards).
    pub before: Option<i64>,
    pub actor: Option<String>,
    pub action: Option<String>,
}

pub fn list(conn: &Connection, q: &Query) -> Result<Vec<Record>, StoreError> {
    let limit = q.limit.unwrap_or(100).clamp(1, 1000);
    let mut stmt = conn.prepare(
        "SELECT id, at, actor, role, action, target, result, request_id, detail FROM audit_log
         WHERE (?1 IS NULL OR id < ?1) AND (?2 IS NULL OR actor = ?2) AND (?3 IS NULL OR action = ?3)
         ORDER BY id DESC LIMIT ?4",
    )?;
    let rows = stmt.query_map(params![q.before, q.actor, q.action, limit], |r| {
        let at: i64 = r.get(1)?;
        let detail: String = r.get(8)?;
        Ok(Record {
            id: r.get(0)?,
            at: rfc3339(at),
            actor: r.get(2)?,
            role: r.get(3)?,
            action: r.get(4)?,
            target: r.get(5)?,
            result: r.get(6)?,
            request_id: r.get(7)?,
            detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::String(detail)),
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Formats store milliseconds as RFC 3339 UTC.
pub fn rfc3339(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.to_rfc3339_opts(chrono::SecondsFormat::Millis, true))
        .unwrap_or_default()
}
