//! Online backup through SQLite's backup API, and restore of such a backup.
//!
//! The backup copies the whole database in one step, which holds a single read transaction:
//! under WAL the depot keeps writing meanwhile and the copy is the database as of one instant.
//! (Copying in small steps would restart every time the depot commits, and might never end.)

use std::fs::{self, File};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::Duration;

use rusqlite::backup::{Backup, StepResult};
use rusqlite::{Connection, OpenFlags};
use sha2::{Digest, Sha256};

use super::{StoreError, integrity_check, schema_version, user_version};
use crate::datadir::sync_dir;

#[derive(Debug, Clone, serde::Serialize)]
pub struct BackupReport {
    pub out: PathBuf,
    pub bytes: u64,
    pub sha256: String,
    pub schema_version: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub restored: PathBuf,
    pub from: PathBuf,
    /// Where the store that was replaced now lives, if there was one.
    pub previous_kept_as: Option<PathBuf>,
    pub schema_version: usize,
}

/// Copies the live store at `db_path` into `out` (a self-contained SQLite file), verifies the
/// copy and only then moves it into place, so `out` is either a good backup or absent.
pub fn backup(db_path: &Path, out: &Path) -> Result<BackupReport, StoreError> {
    if !db_path.is_file() {
        return Err(StoreError::io(
            format!("no depot store at {}", db_path.display()),
            std::io::Error::from(std::io::ErrorKind::NotFound),
        ));
    }
    let src = Connection::open_with_flags(
        db_path,
        OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| StoreError::Open {
        path: db_path.to_owned(),
        source,
    })?;
    src.busy_timeout(Duration::from_secs(10))?;

    let partial = partial_path(out);
    let _ = fs::remove_file(&partial);
    let result = (|| {
        let mut dst = Connection::open(&partial).map_err(|source| StoreError::Open {
            path: partial.clone(),
            source,
        })?;
        {
            let backup = Backup::new(&src, &mut dst)?;
            loop {
                match backup.step(-1)? {
                    StepResult::Done => break,
                    StepResult::More => {}
                    // The writer holds a lock for a moment; wait and go on.
                    StepResult::Busy | StepResult::Locked => {
                        thread::sleep(Duration::from_millis(20))
                    }
                    _ => thread::sleep(Duration::from_millis(20)),
                }
            }
        }
        // The copy inherits WAL mode from the source; a backup should be one file on its own.
        let _: String = dst.query_row("PRAGMA journal_mode=DELETE", [], |r| r.get(0))?;
        integrity_check(&dst)?;
        let version = user_version(&dst)?;
        dst.close().map_err(|(_, e)| StoreError::Sqlite(e))?;
        File::open(&partial)
            .and_then(|f| f.sync_all())
            .map_err(|e| StoreError::io(format!("syncing {}", partial.display()), e))?;
        fs::rename(&partial, out)
            .map_err(|e| StoreError::io(format!("moving backup to {}", out.display()), e))?;
        sync_dir(out).map_err(|e| StoreError::io("syncing backup directory", e))?;
        Ok(version)
    })();
    let version = match result {
        Ok(version) => version,
        Err(err) => {
            let _ = fs::remove_file(&partial);
            return Err(err);
        }
    };
    let (bytes, sha256) = hash_file(out)?;
    Ok(BackupReport {
        out: out.to_owned(),
        bytes,
        sha256,
        schema_version: version,
    })
}

/// Replaces the store at `db_path` with the backup `from`. The caller must hold the data-dir
/// lock, so no depot is running on it. The replaced store is kept beside it.
pub fn restore(from: &Path, db_path: &Path) -> Result<RestoreReport, StoreError> {
    let version = check_backup(from)?;

    // Stage the copy next to the store so the final rename is atomic on one filesystem.
    let staged = partial_path(db_path);
    let _ = fs::remove_file(&staged);
    fs::copy(from, &staged)
        .map_err(|e| StoreError::io(format!("copying {}", from.display()), e))?;
    File::open(&staged)
        .and_then(|f| f.sync_all())
        .map_err(|e| StoreError::io(format!("syncing {}", staged.display()), e))?;

    let mut previous_kept_as = None;
    if db_path.exists() {
        // Opening and checkpointing folds any WAL left by a crash into the main file, so the
        // kept copy is complete and no stale -wal can be replayed onto the restored database.
        {
            let old = Connection::open(db_path).map_err(|source| StoreError::Open {
                path: db_path.to_owned(),
                source,
            })?;
            old.busy_timeout(Duration::from_secs(10))?;
            old.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
            let _: String = old.query_row("PRAGMA journal_mode=DELETE", [], |r| r.get(0))?;
            old.close().map_err(|(_, e)| StoreError::Sqlite(e))?;
        }
        let stamp = chrono::Utc::now().format("%Y%m%dT%H%M%SZ");
        let kept = db_path.with_file_name(format!(
            "{}.before-restore-{stamp}",
            db_path
                .file_name()
                .and_then(|n| n.to_str())
                .unwrap_or("depot.db")
        ));
        fs::copy(db_path, &kept)
            .map_err(|e| StoreError::io(format!("keeping {}", kept.display()), e))?;
        previous_kept_as = Some(kept);
    }
    for suffix in ["-wal", "-shm"] {
        let side = PathBuf::from(format!("{}{suffix}", db_path.display()));
        if side.exists() {
            fs::remove_file(&side)
                .map_err(|e| StoreError::io(format!("removing {}", side.display()), e))?;
        }
    }
    fs::rename(&staged, db_path).map_err(|e| {
        StoreError::io(format!("moving restored store to {}", db_path.display()), e)
    })?;
    sync_dir(db_path).map_err(|e| StoreError::io("syncing data directory", e))?;
    Ok(RestoreReport {
        restored: db_path.to_owned(),
        from: from.to_owned(),
        previous_kept_as,
        schema_version: version,
    })
}

/// A backup must be an intact atlasmesh store that this binary can run.
fn check_backup(from: &Path) -> Result<usize, StoreError> {
    let conn =
        Connection::open_with_flags(from, OpenFlags::SQLITE_OPEN_READ_ONLY).map_err(|source| {
            StoreError::Open {
                path: from.to_owned(),
                source,
            }
        })?;
    integrity_check(&conn)
        .map_err(|e| StoreError::Integrity(format!("{}: {e}", from.display())))?;
    let version = user_version(&conn)?;
    let has_meta: i64 = conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name = 'meta'",
        [],
        |r| r.get(0),
    )?;
    if version == 0 || has_meta == 0 {
        return Err(StoreError::Integrity(format!(
            "{} is a SQLite database but not an atlasmesh depot store",
            from.display()
        )));
    }
    if version > schema_version() {
        return Err(StoreError::TooNew {
            path: from.to_owned(),
            found: version,
            known: schema_version(),
        });
    }
    Ok(version)
}

fn partial_path(target: &Path) -> PathBuf {
    let name = target
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("backup");
    target.with_file_name(format!(".{name}.partial-{}", std::process::id()))
}

fn hash_file(path: &Path) -> Result<(u64, String), StoreError> {
    let mut file =
        File::open(path).map_err(|e| StoreError::io(format!("reading {}", path.display()), e))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    let mut total = 0u64;
    loop {
        let n = file
            .read(&mut buf)
            .map_err(|e| StoreError::io(format!("reading {}", path.display()), e))?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((total, hex::encode(hasher.finalize())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Store, meta_get, meta_set};

    #[test]
    fn backup_then_restore_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("depot.db");
        let store = Store::open(&db).unwrap();
        store
            .write_blocking(|tx| meta_set(tx, "before", "yes"))
            .unwrap();
        let out = dir.path().join("backup.db");
        let report = backup(&db, &out).unwrap();
        assert_eq!(report.schema_version, schema_version());
        assert!(report.bytes > 0);
        store
            .write_blocking(|tx| meta_set(tx, "after", "yes"))
            .unwrap();
        store.close().unwrap();

        let restored = restore(&out, &db).unwrap();
        assert!(restored.previous_kept_as.as_ref().unwrap().exists());
        let store = Store::open(&db).unwrap();
        assert_eq!(
            store
                .read_blocking(|c| meta_get(c, "before"))
                .unwrap()
                .as_deref(),
            Some("yes")
        );
        assert_eq!(store.read_blocking(|c| meta_get(c, "after")).unwrap(), None);
    }

    #[test]
    fn restore_refuses_a_foreign_or_damaged_file() {
        let dir = tempfile::tempdir().unwrap();
        let db = dir.path().join("depot.db");
        let not_ours = dir.path().join("other.db");
        Connection::open(&not_ours)
            .unwrap()
            .execute_batch("CREATE TABLE t(x)")
            .unwrap();
        assert!(restore(&not_ours, &db).is_err());
        let garbage = dir.path().join("garbage.db");
        fs::write(
            &garbage,
            b"this is not a database at all, not even close............",
        )
        .unwrap();
        assert!(restore(&garbage, &db).is_err());
        assert!(!db.exists(), "a refused restore must leave nothing behind");
    }
}
