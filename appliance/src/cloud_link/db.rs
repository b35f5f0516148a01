//! The cloud link's tables in the depot store: enrolment, desired state, the outbox.

use rusqlite::{Connection, OptionalExtension, Transaction, params};

use atlasmesh_cloud_sync::client::{OutboxEvent, OutboxStatus};
use atlasmesh_cloud_sync::desired::{DesiredRevision, Spec};

use crate::store::StoreError;

#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct Enrolment {
    pub depot_id: String,
    pub depot_name: String,
    pub cloud_url: String,
    pub enrolled_at: i64,
    pub desired_revision: i64,
    pub dropped_total: i64,
    pub dropped_last_at: Option<i64>,
}

pub fn enrolment(conn: &Connection) -> Result<Option<Enrolment>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT depot_id, depot_name, cloud_url, enrolled_at, desired_revision, dropped_total,
                    dropped_last_at FROM cloud_link WHERE id = 1",
            [],
            |r| {
                Ok(Enrolment {
                    depot_id: r.get(0)?,
                    depot_name: r.get(1)?,
                    cloud_url: r.get(2)?,
                    enrolled_at: r.get(3)?,
                    desired_revision: r.get(4)?,
                    dropped_total: r.get(5)?,
                    dropped_last_at: r.get(6)?,
                })
            },
        )
        .optional()?)
}

/// Records the enrolment; from here on the outbox triggers record events.
pub fn set_enrolment(
    tx: &Transaction<'_>,
    depot_id: &str,
    depot_name: &str,
    cloud_url: &str,
    now: i64,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO cloud_link (id, depot_id, depot_name, cloud_url, enrolled_at)
         VALUES (1, ?1, ?2, ?3, ?4)
         ON CONFLICT (id) DO UPDATE SET depot_id = ?1, depot_name = ?2, cloud_url = ?3,
             enrolled_at = ?4",
        params![depot_id, depot_name, cloud_url, now],
    )?;
    Ok(())
}

/// Stores a desired revision: all of it or nothing (the caller's transaction).
pub fn store_desired(
    tx: &Transaction<'_>,
    rev: &DesiredRevision,
    now: i64,
) -> Result<(), StoreError> {
    if rev.full {
        tx.execute("DELETE FROM cloud_desired", [])?;
    }
    for o in &rev.objects {
        match &o.spec {
            Some(spec) => {
                tx.execute(
                    "INSERT INTO cloud_desired (kind, key, generation, spec, stored_at)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT (kind, key) DO UPDATE SET generation = ?3, spec = ?4,
                         stored_at = ?5",
                    params![
                        o.kind,
                        o.key,
                        i64::try_from(o.generation).unwrap_or(i64::MAX),
                        serde_json::to_string(spec).unwrap_or_default(),
                        now
                    ],
                )?;
            }
            None => {
                tx.execute(
                    "DELETE FROM cloud_desired WHERE kind = ?1 AND key = ?2",
                    params![o.kind, o.key],
                )?;
            }
        }
    }
    let updated = tx.execute(
        "UPDATE cloud_link SET desired_revision = ?1 WHERE id = 1",
        params![i64::try_from(rev.revision).unwrap_or(i64::MAX)],
    )?;
    if updated == 0 {
        return Err(StoreError::Invalid("the depot is not enrolled".into()));
    }
    Ok(())
}

/// A stored desired object.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct DesiredView {
    pub kind: String,
    pub key: String,
    pub generation: i64,
    pub spec: Spec,
    pub stored_at: i64,
}

pub fn desired(conn: &Connection) -> Result<Vec<DesiredView>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT kind, key, generation, spec, stored_at FROM cloud_desired ORDER BY kind, key",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok((
            r.get::<_, String>(0)?,
            r.get::<_, String>(1)?,
            r.get::<_, i64>(2)?,
            r.get::<_, String>(3)?,
            r.get::<_, i64>(4)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (kind, key, generation, spec, stored_at) = row?;
        // Written only by `store_desired` from a validated spec.
        let spec = serde_json::from_str(&spec)
            .map_err(|e| StoreError::Invalid(format!("stored desired {kind}/{key}: {e}")))?;
        out.push(DesiredView {
            kind,
            key,
            generation,
            spec,
            stored_at,
        });
    }
    Ok(out)
}

/// Events after `after`, oldest first, stopping at `max` events or once `max_bytes` is passed.
pub fn outbox_after(
    conn: &Connection,
    after: u64,
    max: usize,
    max_bytes: usize,
) -> Result<Vec<OutboxEvent>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, id, at, kind, body FROM outbox WHERE seq > ?1 ORDER BY seq LIMIT ?2",
    )?;
    let rows = stmt.query_map(
        params![i64::try_from(after).unwrap_or(i64::MAX), max as i64],
        |r| {
            Ok(OutboxEvent {
                sequence: r.get::<_, i64>(0)? as u64,
                id: r.get(1)?,
                at_ms: r.get(2)?,
                kind: r.get(3)?,
                json: r.get(4)?,
            })
        },
    )?;
    let mut out = Vec::new();
    let mut bytes = 0;
    for row in rows {
        let event = row?;
        bytes += event.json.len() + 64;
        out.push(event);
        if bytes >= max_bytes {
            break;
        }
    }
    Ok(out)
}

pub fn outbox_acked(conn: &Connection, upto: u64) -> Result<usize, StoreError> {
    Ok(conn.execute(
        "DELETE FROM outbox WHERE seq <= ?1",
        params![i64::try_from(upto).unwrap_or(i64::MAX)],
    )?)
}

pub fn outbox_status(conn: &Connection) -> Result<OutboxStatus, StoreError> {
    let (oldest, pending): (Option<i64>, i64) =
        conn.query_row("SELECT MIN(seq), COUNT(*) FROM outbox", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })?;
    let dropped: i64 = conn
        .query_row(
            "SELECT dropped_total FROM cloud_link WHERE id = 1",
            [],
            |r| r.get(0),
        )
        .optional()?
        .unwrap_or(0);
    Ok(OutboxStatus {
        oldest: oldest.unwrap_or(0) as u64,
        pending: pending as u64,
        dropped_total: dropped as u64,
    })
}

/// Keeps the outbox within its bounds: drops events older than `cutoff`, then the oldest
/// until the rest fit in `max_bytes`. Returns how many went; they are counted, so the panel and
/// the cloud learn that something was lost.
pub fn prune_outbox(
    tx: &Transaction<'_>,
    cutoff: i64,
    max_bytes: u64,
    now: i64,
) -> Result<u64, StoreError> {
    let mut dropped = tx.execute("DELETE FROM outbox WHERE at < ?1", params![cutoff])? as u64;
    // The newest event whose own size and everything newer exceed the bound, and all before.
    let last_to_drop: Option<i64> = tx
        .query_row(
            "SELECT seq FROM (
                 SELECT seq, SUM(length(body) + 64) OVER (ORDER BY seq DESC) AS newer
                 FROM outbox)
             WHERE newer > ?1 ORDER BY seq DESC LIMIT 1",
            params![i64::try_from(max_bytes).unwrap_or(i64::MAX)],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(seq) = last_to_drop {
        dropped += tx.execute("DELETE FROM outbox WHERE seq <= ?1", params![seq])? as u64;
    }
    if dropped > 0 {
        tx.execute(
            "UPDATE cloud_link SET dropped_total = dropped_total + ?1, dropped_last_at = ?2
             WHERE id = 1",
            params![dropped as i64, now],
        )?;
    }
    Ok(dropped)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::{self, Entry, Outcome};

    fn audit_entry(conn: &Connection, action: &str, at: i64) {
        audit::record(
            conn,
            &Entry {
                actor: "test".into(),
                role: None,
                action: action.into(),
                target: None,
                outcome: Outcome::Ok,
                request_id: None,
                detail: serde_json::json!({ "pad": "x".repeat(100) }),
            },
            at,
        )
        .unwrap();
    }

    #[test]
    fn the_outbox_records_only_once_enrolled_and_keeps_within_its_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("depot.db")).unwrap();
        store
            .write_blocking(|tx| -> Result<(), StoreError> {
                audit_entry(tx, "before", 1);
                assert_eq!(
                    outbox_status(tx)?.pending,
                    0,
                    "not enrolled: nothing recorded"
                );
                set_enrolment(tx, "d1", "north", "https://cloud:9443", 2)?;
                for i in 0..10 {
                    audit_entry(tx, &format!("a{i}"), 10 + i);
                }
                let all = outbox_after(tx, 0, 100, usize::MAX)?;
                assert_eq!(all.len(), 10);
                let body: serde_json::Value = serde_json::from_str(&all[0].json).unwrap();
                assert_eq!(body["action"], "a0");
                assert_eq!(body["detail"]["pad"].as_str().unwrap().len(), 100);
                // Sequences grow and the ids differ.
                assert!(
                    all.windows(2)
                        .all(|w| w[0].sequence < w[1].sequence && w[0].id != w[1].id)
                );

                // Age: the two oldest go. Size: room for about three of the rest.
                assert_eq!(prune_outbox(tx, 12, u64::MAX, 100)?, 2);
                let size = all[0].json.len() as u64 + 64;
                assert_eq!(prune_outbox(tx, 0, size * 3, 100)?, 5);
                let left = outbox_after(tx, 0, 100, usize::MAX)?;
                assert_eq!(
                    left.iter().map(|e| e.at_ms).collect::<Vec<_>>(),
                    vec![17, 18, 19],
                    "the newest stay"
                );
                let status = outbox_status(tx)?;
                assert_eq!((status.pending, status.dropped_total), (3, 7));

                assert_eq!(outbox_acked(tx, left[1].sequence)?, 2);
                audit_entry(tx, "after", 30);
                let next = outbox_after(tx, 0, 100, usize::MAX)?;
                assert_eq!(next.len(), 2);
                assert!(
                    next[1].sequence > left[2].sequence,
                    "a sequence is never reused"
                );
                Ok(())
            })
            .unwrap();
    }
}
