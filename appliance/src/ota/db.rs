//! SQL for the OTA tables (migration 0002).

use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;

use crate::store::StoreError;

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ImageRow {
    pub id: i64,
    pub hardware_id: String,
    pub version: String,
    pub target: String,
    pub index_target: String,
    pub sha256: String,
    pub length: i64,
    pub chunk_count: i64,
    pub min_version: Option<String>,
    pub notes: Option<String>,
    pub targets_version: i64,
    pub targets_expires: i64,
    pub source: String,
    pub staged_at: i64,
    pub staged_by: String,
    pub corrupt_at: Option<i64>,
    pub deleted_at: Option<i64>,
}

const IMAGE_COLUMNS: &str = "id, hardware_id, version, target, index_target, sha256, length, chunk_count, min_version, notes,
     targets_version, targets_expires, source, staged_at, staged_by, corrupt_at, deleted_at";

fn image_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<ImageRow> {
    Ok(ImageRow {
        id: r.get(0)?,
        hardware_id: r.get(1)?,
        version: r.get(2)?,
        target: r.get(3)?,
        index_target: r.get(4)?,
        sha256: r.get(5)?,
        length: r.get(6)?,
        chunk_count: r.get(7)?,
        min_version: r.get(8)?,
        notes: r.get(9)?,
        targets_version: r.get(10)?,
        targets_expires: r.get(11)?,
        source: r.get(12)?,
        staged_at: r.get(13)?,
        staged_by: r.get(14)?,
        corrupt_at: r.get(15)?,
        deleted_at: r.get(16)?,
    })
}

/// Staged (not deleted) images, or every image ever staged with `include_deleted`.
pub fn images(conn: &Connection, include_deleted: bool) -> Result<Vec<ImageRow>, StoreError> {
    let sql = format!(
        "SELECT {IMAGE_COLUMNS} FROM ota_images {} ORDER BY hardware_id, staged_at",
        if include_deleted {
            ""
        } else {
            "WHERE deleted_at IS NULL"
        }
    );
    let mut stmt = conn.prepare(&sql)?;
    let rows = stmt.query_map([], image_row)?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn image_by_id(conn: &Connection, id: i64) -> Result<Option<ImageRow>, StoreError> {
    Ok(conn
        .query_row(
            &format!("SELECT {IMAGE_COLUMNS} FROM ota_images WHERE id = ?1"),
            [id],
            image_row,
        )
        .optional()?)
}

pub struct NewImage<'a> {
    pub hardware_id: &'a str,
    pub version: &'a str,
    pub target: &'a str,
    pub index_target: &'a str,
    pub sha256: &'a str,
    pub length: u64,
    pub chunk_count: usize,
    pub min_version: Option<&'a str>,
    pub notes: Option<&'a str>,
    pub targets_version: u64,
    pub targets_expires: i64,
    pub source: &'a str,
    pub staged_by: &'a str,
}

/// Records a staged image; a version staged before and deleted is brought back.
pub fn insert_image(conn: &Connection, image: &NewImage<'_>, now: i64) -> Result<i64, StoreError> {
    conn.execute(
        "INSERT INTO ota_images (hardware_id, version, target, index_target, sha256, length, chunk_count, min_version, notes,
                                 targets_version, targets_expires, source, staged_at, staged_by)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14)
         ON CONFLICT (hardware_id, version) DO UPDATE SET
             target = excluded.target, index_target = excluded.index_target, sha256 = excluded.sha256,
             length = excluded.length, chunk_count = excluded.chunk_count, min_version = excluded.min_version,
             notes = excluded.notes, targets_version = excluded.targets_version, targets_expires = excluded.targets_expires,
             source = excluded.source, staged_at = excluded.staged_at, staged_by = excluded.staged_by,
             corrupt_at = NULL, deleted_at = NULL",
        params![
            image.hardware_id,
            image.version,
            image.target,
            image.index_target,
            image.sha256,
            image.length as i64,
            image.chunk_count as i64,
            image.min_version,
            image.notes,
            image.targets_version as i64,
            image.targets_expires,
            image.source,
            now,
            image.staged_by,
        ],
    )?;
    Ok(conn.query_row(
        "SELECT id FROM ota_images WHERE hardware_id = ?1 AND version = ?2",
        params![image.hardware_id, image.version],
        |r| r.get(0),
    )?)
}

pub fn mark_deleted(conn: &Connection, id: i64, now: i64) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE ota_images SET deleted_at = ?2 WHERE id = ?1",
        params![id, now],
    )?;
    Ok(())
}

pub fn set_corrupt(conn: &Connection, id: i64, at: Option<i64>) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE ota_images SET corrupt_at = ?2 WHERE id = ?1",
        params![id, at],
    )?;
    Ok(())
}

#[derive(Debug, Clone, Serialize)]
pub struct JobRow {
    pub id: i64,
    pub source_kind: String,
    pub source: String,
    pub hardware_id: Option<String>,
    pub version: Option<String>,
    pub state: String,
    pub bytes_done: i64,
    pub bytes_total: Option<i64>,
    pub error_code: Option<String>,
    pub error: Option<String>,
    pub image_id: Option<i64>,
    pub started_at: i64,
    pub finished_at: Option<i64>,
    pub started_by: String,
    /// Times the depot resumed this download after stopping under it.
    pub resumes: i64,
}

pub fn insert_job(
    conn: &Connection,
    kind: &str,
    source: &str,
    hardware: Option<&str>,
    version: Option<&str>,
    by: &str,
    now: i64,
) -> Result<i64, StoreError> {
    conn.execute(
        "INSERT INTO ota_jobs (source_kind, source, hardware_id, version, state, started_at, started_by) VALUES (?1, ?2, ?3, ?4, 'running', ?5, ?6)",
        params![kind, source, hardware, version, now, by],
    )?;
    Ok(conn.last_insert_rowid())
}

pub struct JobEnd<'a> {
    pub state: &'a str,
    pub bytes_done: u64,
    pub bytes_total: Option<u64>,
    pub hardware_id: Option<&'a str>,
    pub version: Option<&'a str>,
    pub error_code: Option<&'a str>,
    pub error: Option<&'a str>,
    pub image_id: Option<i64>,
}

pub fn finish_job(
    conn: &Connection,
    id: i64,
    end: &JobEnd<'_>,
    now: i64,
) -> Result<(), StoreError> {
    conn.execute(
        "UPDATE ota_jobs SET state = ?2, bytes_done = ?3, bytes_total = ?4, hardware_id = COALESCE(?5, hardware_id),
             version = COALESCE(?6, version), error_code = ?7, error = ?8, image_id = ?9, finished_at = ?10 WHERE id = ?1",
        params![
            id,
            end.state,
            end.bytes_done as i64,
            end.bytes_total.map(|b| b as i64),
            end.hardware_id,
            end.version,
            end.error_code,
            end.error,
            end.image_id,
            now
        ],
    )?;
    Ok(())
}

/// Jobs left `running` by a process that stopped: URL downloads resumed fewer than
/// `max_resumes` times stay `running`, counted once more, and are returned to be resumed; the
/// others are marked `interrupted`. Returns the number interrupted and the jobs to resume.
pub fn recover_running_jobs(
    conn: &Connection,
    now: i64,
    max_resumes: i64,
) -> Result<(usize, Vec<JobRow>), StoreError> {
    let resumed: Vec<i64> = conn
        .prepare(
            "UPDATE ota_jobs SET resumes = resumes + 1
             WHERE state = 'running' AND source_kind = 'url' AND resumes < ?1
                   AND hardware_id IS NOT NULL AND version IS NOT NULL
             RETURNING id",
        )?
        .query_map([max_resumes], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let interrupted = conn.execute(
        "UPDATE ota_jobs SET state = 'interrupted', finished_at = ?1, error_code = 'interrupted',
             error = CASE WHEN source_kind = 'url'
                 THEN 'the depot stopped while staging; gave up after ' || resumes || ' resumes'
                 WHEN source_kind = 'cloud'
                 THEN 'the depot stopped while staging; the cloud link stages it again from the chunks that verify'
                 ELSE 'the depot stopped while staging; nothing of it was kept' END
         WHERE state = 'running' AND id NOT IN (SELECT value FROM json_each(?2))",
        params![now, serde_json::to_string(&resumed).expect("ids serialise")],
    )?;
    let mut jobs = Vec::new();
    for id in resumed {
        jobs.extend(job(conn, id)?);
    }
    Ok((interrupted, jobs))
}

pub fn job(conn: &Connection, id: i64) -> Result<Option<JobRow>, StoreError> {
    Ok(conn
        .query_row(
            "SELECT id, source_kind, source, hardware_id, version, state, bytes_done, bytes_total, error_code, error, image_id,
                    started_at, finished_at, started_by, resumes FROM ota_jobs WHERE id = ?1",
            [id],
            |r| {
                Ok(JobRow {
                    id: r.get(0)?,
                    source_kind: r.get(1)?,
                    source: r.get(2)?,
                    hardware_id: r.get(3)?,
                    version: r.get(4)?,
                    state: r.get(5)?,
                    bytes_done: r.get(6)?,
                    bytes_total: r.get(7)?,
                    error_code: r.get(8)?,
                    error: r.get(9)?,
                    image_id: r.get(10)?,
                    started_at: r.get(11)?,
                    finished_at: r.get(12)?,
                    started_by: r.get(13)?,
                    resumes: r.get(14)?,
                })
            },
        )
        .optional()?)
}

pub fn recent_jobs(conn: &Connection, limit: u32) -> Result<Vec<JobRow>, StoreError> {
    let ids: Vec<i64> = conn
        .prepare("SELECT id FROM ota_jobs ORDER BY id DESC LIMIT ?1")?
        .query_map([limit], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    let mut out = Vec::new();
    for id in ids {
        if let Some(job) = job(conn, id)? {
            out.push(job);
        }
    }
    Ok(out)
}

#[derive(Debug, Clone, Serialize)]
pub struct AssignmentRow {
    pub vehicle_id: String,
    pub image_id: i64,
    pub hardware_id: String,
    pub version: String,
    pub assigned_at: i64,
    pub assigned_by: String,
}

pub fn assignments(conn: &Connection) -> Result<Vec<AssignmentRow>, StoreError> {
    let mut stmt = conn.prepare(
        "SELECT a.vehicle_id, a.image_id, i.hardware_id, i.version, a.assigned_at, a.assigned_by
         FROM ota_assignments a JOIN ota_images i ON i.id = a.image_id ORDER BY a.vehicle_id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(AssignmentRow {
            vehicle_id: r.get(0)?,
            image_id: r.get(1)?,
            hardware_id: r.get(2)?,
            version: r.get(3)?,
            assigned_at: r.get(4)?,
            assigned_by: r.get(5)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn assign(
    conn: &Connection,
    vehicle: &str,
    image_id: i64,
    by: &str,
    now: i64,
) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO ota_assignments (vehicle_id, image_id, assigned_at, assigned_by) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (vehicle_id) DO UPDATE SET image_id = excluded.image_id, assigned_at = excluded.assigned_at,
             assigned_by = excluded.assigned_by",
        params![vehicle, image_id, now, by],
    )?;
    Ok(())
}

pub fn unassign(conn: &Connection, vehicle: &str) -> Result<bool, StoreError> {
    Ok(conn.execute(
        "DELETE FROM ota_assignments WHERE vehicle_id = ?1",
        [vehicle],
    )? > 0)
}

pub fn assigned_count(conn: &Connection, image_id: i64) -> Result<i64, StoreError> {
    Ok(conn.query_row(
        "SELECT count(*) FROM ota_assignments WHERE image_id = ?1",
        [image_id],
        |r| r.get(0),
    )?)
}
