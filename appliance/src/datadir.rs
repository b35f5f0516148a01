//! The data directory: its exclusive lock and how secrets are written into it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DataDirError {
    #[error("cannot create data directory {path}: {source}")]
    Create { path: PathBuf, source: io::Error },
    #[error(
        "another atlasmesh process is using the data directory {0} (its lock is held); stop it first"
    )]
    Busy(PathBuf),
    #[error("cannot lock data directory {path}: {source}")]
    Lock { path: PathBuf, source: io::Error },
}

/// Held for the lifetime of a depot (or of a restore), so two processes never share one store.
/// The lock is an OS file lock: it goes away with the process, even on `kill -9`.
#[derive(Debug)]
pub struct DataDirLock {
    _file: File,
    path: PathBuf,
}

impl DataDirLock {
    pub fn acquire(dir: &Path) -> Result<Self, DataDirError> {
        ensure_dir(dir)?;
        let path = dir.join("atlasmesh.lock");
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(0o600)
            .open(&path)
            .map_err(|source| DataDirError::Lock {
                path: path.clone(),
                source,
            })?;
        match file.try_lock() {
            Ok(()) => Ok(Self { _file: file, path }),
            Err(fs::TryLockError::WouldBlock) => Err(DataDirError::Busy(dir.to_owned())),
            Err(fs::TryLockError::Error(source)) => Err(DataDirError::Lock { path, source }),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
}

/// Creates the directory (and parents) readable only by its owner if it does not exist yet.
pub fn ensure_dir(dir: &Path) -> Result<(), DataDirError> {
    if dir.is_dir() {
        return Ok(());
    }
    fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|source| DataDirError::Create {
            path: dir.to_owned(),
            source,
        })
}

/// Writes a secret (key, password, certificate key) with mode 0600, atomically: a reader sees
/// the old file or the whole new one, never a torn or world-readable one.
pub fn write_private(path: &Path, contents: &[u8]) -> io::Result<()> {
    let tmp = path.with_file_name(format!(
        ".{}.tmp-{}",
        path.file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("secret"),
        std::process::id()
    ));
    let result = (|| {
        let mut file = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .mode(0o600)
            .open(&tmp)?;
        // The mode given at creation is filtered by the umask; set it explicitly.
        file.set_permissions(fs::Permissions::from_mode(0o600))?;
        file.write_all(contents)?;
        file.sync_all()?;
        fs::rename(&tmp, path)?;
        sync_dir(path)
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

/// Flushes the directory entry of `path` so a rename survives power loss.
pub fn sync_dir(path: &Path) -> io::Result<()> {
    let dir = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn second_lock_is_refused_and_released_on_drop() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::acquire(dir.path()).unwrap();
        assert!(matches!(
            DataDirLock::acquire(dir.path()),
            Err(DataDirError::Busy(_))
        ));
        drop(first);
        DataDirLock::acquire(dir.path()).unwrap();
    }

    #[test]
    fn private_files_are_0600() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("key");
        write_private(&path, b"secret").unwrap();
        let mode = fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        assert_eq!(fs::read(&path).unwrap(), b"secret");
    }
}
