//! The depot store: one SQLite file (`depot.db`) opened through rusqlite with WAL,
//! `synchronous=FULL` and foreign keys on, migrated by versioned migrations.
//!
//! SQLite calls block, so they never run on the async runtime's worker threads:
//! [`Store::write`] and [`Store::read`] hop onto tokio's blocking pool. There is one writer
//! connection (SQLite serialises writers anyway; one connection avoids `SQLITE_BUSY` between our
//! own writers) and a small pool of reader connections, which WAL lets run beside the writer.

mod backup;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rusqlite::{Connection, OpenFlags, Transaction, TransactionBehavior};
use rusqlite_migration::{M, Migrations};

pub use backup::{BackupReport, RestoreReport, backup, restore};

/// Schema versions, oldest first. Never edit a migration that has shipped; add a new one.
const MIGRATIONS: &[&str] = &[
    include_str!("migrations/0001_foundation.sql"),
    include_str!("migrations/0002_ota.sql"),
    include_str!("migrations/0003_vehicles.sql"),
    include_str!("migrations/0004_rollouts.sql"),
    include_str!("migrations/0005_rollout_cursor.sql"),
    include_str!("migrations/0006_disks.sql"),
    include_str!("migrations/0007_job_resumes.sql"),
    include_str!("migrations/0008_charging.sql"),
    include_str!("migrations/0009_cloud_link.sql"),
    include_str!("migrations/0010_cloud_staging.sql"),
];

/// The schema version this binary migrates to.
pub fn schema_version() -> usize {
    MIGRATIONS.len()
}

fn migrations() -> Migrations<'static> {
    Migrations::new(MIGRATIONS.iter().map(|sql| M::up(sql)).collect())
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store {path}: {source}")]
    Open {
        path: PathBuf,
        source: rusqlite::Error,
    },
    #[error("store query failed: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error("store schema migration failed: {0}")]
    Migration(String),
    #[error(
        "store {path} has schema version {found}, newer than this binary knows ({known}); run a newer atlasmesh or restore an older backup"
    )]
    TooNew {
        path: PathBuf,
        found: usize,
        known: usize,
    },
    #[error("store integrity check failed: {0}")]
    Integrity(String),
    #[error("store is closed")]
    Closed,
    #[error("stored data is not as expected: {0}")]
    Invalid(String),
    #[error("store worker thread failed: {0}")]
    Worker(String),
    #[error("{context}: {source}")]
    Io {
        context: String,
        source: std::io::Error,
    },
}

impl StoreError {
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            context: context.into(),
            source,
        }
    }
}

/// Cheap to clone; all clones share the connections.
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    path: PathBuf,
    writer: Mutex<Option<Connection>>,
    readers: Mutex<Option<Vec<Connection>>>,
}

const MAX_IDLE_READERS: usize = 4;

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    let conn = Connection::open_with_flags(
        path,
        OpenFlags::SQLITE_OPEN_READ_WRITE
            | OpenFlags::SQLITE_OPEN_CREATE
            | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|source| StoreError::Open {
        path: path.to_owned(),
        source,
    })?;
    configure(&conn)?;
    Ok(conn)
}

/// Per-connection settings. `journal_mode` persists in the file; the rest are per connection.
fn configure(conn: &Connection) -> Result<(), StoreError> {
    conn.busy_timeout(Duration::from_secs(10))?;
    let mode: String = conn.query_row("PRAGMA journal_mode=WAL", [], |r| r.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Migration(format!(
            "could not switch the store to WAL (journal_mode is {mode})"
        )));
    }
    // FULL: a transaction we acknowledged survives power loss, not only a process crash.
    conn.pragma_update(None, "synchronous", "FULL")?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    Ok(())
}

/// Reads the schema version without migrating (for restore and backup checks).
pub(crate) fn user_version(conn: &Connection) -> Result<usize, StoreError> {
    let v: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    Ok(usize::try_from(v).unwrap_or(0))
}

/// Runs SQLite's full integrity check; `Ok` only when it answers exactly `ok`.
pub fn integrity_check(conn: &Connection) -> Result<(), StoreError> {
    let mut stmt = conn.prepare("PRAGMA integrity_check")?;
    let rows: Vec<String> = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    if rows.len() == 1 && rows[0] == "ok" {
        Ok(())
    } else {
        Err(StoreError::Integrity(rows.join("; ")))
    }
}

impl Store {
    /// Opens (creating if needed) and migrates the store. Blocking: call it before serving or
    /// through `spawn_blocking`.
    pub fn open(path: &Path) -> Result<Store, StoreError> {
        let mut conn = open_connection(path)?;
        // The store holds password and credential hashes: owner only. SQLite gives the -wal
        // and -shm files the main file's mode.
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
            .map_err(|e| StoreError::io(format!("restricting {}", path.display()), e))?;
        let found = user_version(&conn)?;
        if found > schema_version() {
            return Err(StoreError::TooNew {
                path: path.to_owned(),
                found,
                known: schema_version(),
            });
        }
        migrations()
            .to_latest(&mut conn)
            .map_err(|e| StoreError::Migration(e.to_string()))?;
        Ok(Store {
            inner: Arc::new(Inner {
                path: path.to_owned(),
                writer: Mutex::new(Some(conn)),
                readers: Mutex::new(Some(Vec::new())),
            }),
        })
    }

    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    /// Runs `f` in one IMMEDIATE transaction on the writer connection, committing when it
    /// returns `Ok` and rolling back when it returns `Err`.
    pub async fn write<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Transaction<'_>) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        run_blocking(move || inner.write_blocking(f)).await
    }

    /// Runs `f` on a reader connection (a consistent snapshot if `f` opens a transaction).
    pub async fn read<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E> + Send + 'static,
        T: Send + 'static,
        E: From<StoreError> + Send + 'static,
    {
        let inner = self.inner.clone();
        run_blocking(move || inner.read_blocking(f)).await
    }

    /// Blocking write, for command-line tools that run without an async runtime.
    pub fn write_blocking<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Transaction<'_>) -> Result<T, E>,
        E: From<StoreError>,
    {
        self.inner.write_blocking(f)
    }

    /// Blocking read, for command-line tools that run without an async runtime.
    pub fn read_blocking<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E>,
        E: From<StoreError>,
    {
        self.inner.read_blocking(f)
    }

    /// Checkpoints the WAL into the main file and closes every connection. Later calls fail
    /// with [`StoreError::Closed`]. Blocking.
    pub fn close(&self) -> Result<(), StoreError> {
        let readers = self.inner.readers.lock().expect("reader pool lock").take();
        drop(readers);
        let writer = self.inner.writer.lock().expect("writer lock").take();
        if let Some(conn) = writer {
            // TRUNCATE leaves an empty WAL, so a cleanly stopped depot is one self-contained file.
            conn.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(()))?;
            conn.close().map_err(|(_, e)| StoreError::Sqlite(e))?;
        }
        Ok(())
    }
}

impl Inner {
    fn write_blocking<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Transaction<'_>) -> Result<T, E>,
        E: From<StoreError>,
    {
        let mut guard = self
            .writer
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        let conn = guard.as_mut().ok_or(StoreError::Closed)?;
        let tx = conn
            .transaction_with_behavior(TransactionBehavior::Immediate)
            .map_err(StoreError::from)?;
        let value = f(&tx)?;
        tx.commit().map_err(StoreError::from)?;
        Ok(value)
    }

    fn read_blocking<T, E, F>(&self, f: F) -> Result<T, E>
    where
        F: FnOnce(&Connection) -> Result<T, E>,
        E: From<StoreError>,
    {
        let pooled = {
            let mut pool = self.readers.lock().unwrap_or_else(|p| p.into_inner());
            match pool.as_mut() {
                None => return Err(StoreError::Closed.into()),
                Some(pool) => pool.pop(),
            }
        };
        let conn = match pooled {
            Some(conn) => conn,
            None => open_connection(&self.path)?,
        };
        let result = f(&conn);
        let mut pool = self.readers.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(pool) = pool.as_mut()
            && pool.len() < MAX_IDLE_READERS
            && conn.is_autocommit()
        {
            pool.push(conn);
        }
        result
    }
}

async fn run_blocking<T, E, F>(f: F) -> Result<T, E>
where
    F: FnOnce() -> Result<T, E> + Send + 'static,
    T: Send + 'static,
    E: From<StoreError> + Send + 'static,
{
    match tokio::task::spawn_blocking(f).await {
        Ok(result) => result,
        Err(join) => Err(StoreError::Worker(join.to_string()).into()),
    }
}

/// Current time as Unix milliseconds, the store's timestamp format.
pub fn unix_ms(t: std::time::SystemTime) -> i64 {
    t.duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

/// Reads a value from the `meta` table.
pub fn meta_get(conn: &Connection, key: &str) -> Result<Option<String>, StoreError> {
    use rusqlite::OptionalExtension;
    Ok(conn
        .query_row("SELECT value FROM meta WHERE key = ?1", [key], |r| r.get(0))
        .optional()?)
}

/// Writes a value into the `meta` table.
pub fn meta_set(conn: &Connection, key: &str, value: &str) -> Result<(), StoreError> {
    conn.execute(
        "INSERT INTO meta (key, value) VALUES (?1, ?2) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
        [key, value],
    )?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn opens_migrates_and_reopens() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("depot.db");
        let store = Store::open(&path).unwrap();
        store.write(|tx| meta_set(tx, "k", "v")).await.unwrap();
        let mode: String = store
            .read(|c| Ok::<_, StoreError>(c.query_row("PRAGMA journal_mode", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(mode, "wal");
        let fk: i64 = store
            .read(|c| Ok::<_, StoreError>(c.query_row("PRAGMA foreign_keys", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(fk, 1);
        store.close().unwrap();
        assert!(matches!(
            store.read(|c| meta_get(c, "k")).await,
            Err(StoreError::Closed)
        ));

        let again = Store::open(&path).unwrap();
        assert_eq!(
            again.read(|c| meta_get(c, "k")).await.unwrap().as_deref(),
            Some("v")
        );
        let version = again.read(user_version).await.unwrap();
        assert_eq!(version, schema_version());
    }

    #[tokio::test]
    async fn failed_write_rolls_back() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("depot.db")).unwrap();
        let result: Result<(), StoreError> = store
            .write(|tx| {
                meta_set(tx, "half", "done")?;
                Err(StoreError::Integrity("simulated failure".into()))
            })
            .await;
        assert!(result.is_err());
        assert_eq!(store.read(|c| meta_get(c, "half")).await.unwrap(), None);
    }

    #[test]
    fn refuses_a_newer_schema() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("depot.db");
        Store::open(&path).unwrap().close().unwrap();
        let conn = Connection::open(&path).unwrap();
        conn.pragma_update(None, "user_version", 999).unwrap();
        drop(conn);
        let err = Store::open(&path)
            .err()
            .expect("newer schema must be refused");
        assert!(
            matches!(err, StoreError::TooNew { found: 999, .. }),
            "{err}"
        );
    }
}
