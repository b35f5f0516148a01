//! Rollouts in the depot store: the state machine after each step, and the hash-chained log.

use rusqlite::{Connection, OptionalExtension, params};
use sha2::{Digest, Sha256};

use crate::store::StoreError;

pub struct RolloutRow {
    pub id: i64,
    pub hardware_id: String,
    pub version: String,
    pub image_id: i64,
    pub phase: String,
    pub machine: String,
    pub created_at: i64,
    pub created_by: String,
    pub updated_at: i64,
}

const COLUMNS: &str =
    "id, hardware_id, version, image_id, phase, machine, created_at, created_by, updated_at";

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<RolloutRow> {
    Ok(RolloutRow {
        id: r.get(0)?,
        hardware_id: r.get(1)?,
        version: r.get(2)?,
        image_id: r.get(3)?,
        phase: r.get(4)?,
        machine: r.get(5)?,
        created_at: r.get(6)?,
        created_by: r.get(7)?,
        updated_at: r.get(8)?,
    })
}

#[allow(clippy::too_many_arguments)]
pub fn insert(
    conn: &Connection,
    hardware_id: &str,
    version: &str,
    image_id: i64,
    phase: &str,
    machine: &str,
    by: &str,
    now: i64,
) -> Result<i64, StoreError> {
    conn.execute(
        "INSERT INTO rollouts (hardware_id, version, image_id, phase, machine, created_at, created_by, updated_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?6)",
        params![hardware_id, version, image_id, phase, machine, now, by],
    )?;
    Ok(conn.last_insert_rowid())
}

pub fn save(
    conn: &Connection,
    id: i64,
    phase: &str,
    machine: &str,
    now: i64,
) -> Result<(), StoreError> {
    conn.prepare_cached(
        "UPDATE rollouts SET phase = ?2, machine = ?3, updated_at = ?4 WHERE id = ?1",
    )?
    .execute(params![id, phase, machine, now])?;
    Ok(())
}

/// The last OTA report rollouts have judged, if any was recorded.
pub fn reports_seen(conn: &Connection) -> Result<Option<i64>, StoreError> {
    Ok(conn
        .prepare_cached("SELECT reports_seen FROM rollout_cursor WHERE id = 1")?
        .query_row([], |r| r.get(0))
        .optional()?)
}

pub fn set_reports_seen(conn: &Connection, seen: i64) -> Result<(), StoreError> {
    conn.prepare_cached(
        "INSERT INTO rollout_cursor (id, reports_seen) VALUES (1, ?1)
         ON CONFLICT (id) DO UPDATE SET reports_seen = max(reports_seen, excluded.reports_seen)",
    )?
    .execute([seen])?;
    Ok(())
}

pub fn list(conn: &Connection) -> Result<Vec<RolloutRow>, StoreError> {
    let mut stmt =
        conn.prepare_cached(&format!("SELECT {COLUMNS} FROM rollouts ORDER BY id DESC"))?;
    let rows = stmt.query_map([], row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn get(conn: &Connection, id: i64) -> Result<Option<RolloutRow>, StoreError> {
    Ok(conn
        .prepare_cached(&format!("SELECT {COLUMNS} FROM rollouts WHERE id = ?1"))?
        .query_row([id], row)
        .optional()?)
}

/// One link of the chain.
pub struct LogRow {
    pub seq: i64,
    pub at: i64,
    pub entry: String,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

fn link_hash(prev: &[u8], seq: i64, entry: &str) -> Vec<u8> {
    let mut h = Sha256::new();
    h.update(prev);
    h.update(seq.to_be_bytes());
    h.update(entry.as_bytes());
    h.finalize().to_vec()
}

/// Appends an entry after the rollout's last one; returns its sequence number.
pub fn append(conn: &Connection, id: i64, at: i64, entry: &str) -> Result<i64, StoreError> {
    let last: Option<(i64, Vec<u8>)> = conn
        .prepare_cached(
            "SELECT seq, hash FROM rollout_log WHERE rollout_id = ?1 ORDER BY seq DESC LIMIT 1",
        )?
        .query_row([id], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    let (seq, prev) = match last {
        Some((seq, hash)) => (seq + 1, hash),
        None => (1, vec![0u8; 32]),
    };
    let hash = link_hash(&prev, seq, entry);
    conn.prepare_cached(
        "INSERT INTO rollout_log (rollout_id, seq, at, entry, prev_hash, hash) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![id, seq, at, entry, prev, hash])?;
    Ok(seq)
}

fn log_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<LogRow> {
    Ok(LogRow {
        seq: r.get(0)?,
        at: r.get(1)?,
        entry: r.get(2)?,
        prev_hash: r.get(3)?,
        hash: r.get(4)?,
    })
}

pub fn log(conn: &Connection, id: i64) -> Result<Vec<LogRow>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, at, entry, prev_hash, hash FROM rollout_log WHERE rollout_id = ?1 ORDER BY seq",
    )?;
    let rows = stmt.query_map([id], log_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The last `n` entries, newest first (the panel's view of a long log).
pub fn log_tail(conn: &Connection, id: i64, n: usize) -> Result<Vec<LogRow>, StoreError> {
    let mut stmt = conn.prepare_cached(
        "SELECT seq, at, entry, prev_hash, hash FROM rollout_log WHERE rollout_id = ?1
         ORDER BY seq DESC LIMIT ?2",
    )?;
    let rows = stmt.query_map(params![id, n as i64], log_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// Recomputes the chain: `Err(seq)` names the first entry that does not follow from the ones
/// before it (edited, inserted or removed).
pub fn verify(rows: &[LogRow]) -> Result<(), i64> {
    let mut prev = vec![0u8; 32];
    for (i, r) in rows.iter().enumerate() {
        if r.seq != i as i64 + 1
            || r.prev_hash != prev
            || r.hash != link_hash(&prev, r.seq, &r.entry)
        {
            return Err(r.seq);
        }
        prev.clone_from(&r.hash);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_chain_shows_an_edited_entry() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(&dir.path().join("depot.db")).unwrap();
        store
            .write_blocking(|tx| {
                tx.execute(
                    "INSERT INTO ota_images (id, hardware_id, version, target, index_target, sha256, length, chunk_count,
                     targets_version, targets_expires, source, staged_at, staged_by)
                     VALUES (1, 'hw', '2.0.0', 't', 'i', 's', 1, 1, 1, 1, 'x', 1, 'me')",
                    [],
                )?;
                let id = insert(tx, "hw", "2.0.0", 1, "running", "{}", "me", 1)?;
                for i in 0..3 {
                    append(tx, id, i, &format!("{{\"n\":{i}}}"))?;
                }
                Ok::<_, StoreError>(())
            })
            .unwrap();
        let mut rows = store.read_blocking(|c| log(c, 1)).unwrap();
        assert_eq!(verify(&rows), Ok(()));
        rows[1].entry = "{\"n\":7}".into();
        assert_eq!(verify(&rows), Err(2));
        // A removed entry: the one after it no longer follows.
        rows.remove(1);
        assert_eq!(verify(&rows), Err(3));
    }
}
