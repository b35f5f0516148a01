//! Offline commands that work on a data directory directly: token minting, backup, restore.
//! Each writes its own audit record, so the trail shows changes made outside the API too;
//! [`record_cli_change`] does the same for the image tools (install, mark-good).

use std::path::Path;
use std::time::SystemTime;

use serde_json::json;

use crate::audit::{self, Outcome};
use crate::auth::{self, ApiToken, AuthError, Role};
use crate::config::store_path;
use crate::datadir::{DataDirError, DataDirLock};
use crate::store::{self, BackupReport, RestoreReport, Store, StoreError, unix_ms};

#[derive(Debug, thiserror::Error)]
pub enum ToolError {
    #[error(
        "no depot store in {0}: start the depot once with this data directory, or check --data-dir"
    )]
    NoStore(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    DataDir(#[from] DataDirError),
}

/// `cli:<login name>`, the actor of changes made from the command line.
fn cli_actor() -> String {
    format!(
        "cli:{}",
        std::env::var("USER").unwrap_or_else(|_| "unknown".into())
    )
}

/// An audit record of a change made from the command line (by [`cli_actor`], no role or
/// request id: there was no API request).
fn cli_entry(
    action: &str,
    target: Option<String>,
    outcome: Outcome,
    detail: serde_json::Value,
) -> audit::Entry {
    audit::Entry {
        actor: cli_actor(),
        role: None,
        action: action.into(),
        target,
        outcome,
        request_id: None,
        detail,
    }
}

fn open_existing(data_dir: &Path) -> Result<Store, ToolError> {
    let path = store_path(data_dir);
    if !path.is_file() {
        return Err(ToolError::NoStore(data_dir.display().to_string()));
    }
    Ok(Store::open(&path)?)
}

/// Mints an API token; returns it with its secret (print it once).
pub fn token_create(
    data_dir: &Path,
    role: Role,
    name: &str,
) -> Result<(ApiToken, String), ToolError> {
    let store = open_existing(data_dir)?;
    let actor = cli_actor();
    let now = unix_ms(SystemTime::now());
    let created = store.write_blocking(|tx| -> Result<_, ToolError> {
        let (token, secret) = auth::create_token(tx, name, role, &actor, now)?;
        let entry = cli_entry(
            "token.create",
            Some(token.name.clone()),
            Outcome::Ok,
            json!({"token_id": token.id, "role": role}),
        );
        audit::record(tx, &entry, now)?;
        Ok((token, secret))
    })?;
    store.close()?;
    Ok(created)
}

/// Revokes a token minted by [`token_create`] whose secret never reached anyone (standard
/// output was closed or full), so no live token is left that nobody holds. Audited as
/// `token.revoke` with the reason.
pub fn token_revoke_unseen(data_dir: &Path, token: &ApiToken, why: &str) -> Result<(), ToolError> {
    let store = open_existing(data_dir)?;
    let entry = cli_entry(
        "token.revoke",
        Some(token.id.to_string()),
        Outcome::Ok,
        json!({"name": token.name, "reason": why}),
    );
    let now = unix_ms(SystemTime::now());
    store.write_blocking(|tx| -> Result<_, ToolError> {
        auth::revoke_token(tx, token.id, now)?;
        audit::record(tx, &entry, now)?;
        Ok(())
    })?;
    store.close()?;
    Ok(())
}

/// Writes one audit record, by `cli:<user>`, for a change made on the command line outside the
/// API (the depot may be running: the store takes concurrent writers). `Ok(false)` when the
/// data directory has no store yet (an appliance whose depot never started): no trail exists
/// to write to.
pub fn record_cli_change(
    data_dir: &Path,
    action: &str,
    target: Option<String>,
    outcome: Outcome,
    detail: serde_json::Value,
) -> Result<bool, ToolError> {
    let store = match open_existing(data_dir) {
        Ok(store) => store,
        Err(ToolError::NoStore(_)) => return Ok(false),
        Err(e) => return Err(e),
    };
    let entry = cli_entry(action, target, outcome, detail);
    let now = unix_ms(SystemTime::now());
    store.write_blocking(|tx| audit::record(tx, &entry, now))?;
    store.close()?;
    Ok(true)
}

pub fn backup(data_dir: &Path, out: &Path) -> Result<BackupReport, ToolError> {
    let path = store_path(data_dir);
    if !path.is_file() {
        return Err(ToolError::NoStore(data_dir.display().to_string()));
    }
    Ok(store::backup(&path, out)?)
}

/// Restores a backup. Holds the data-dir lock throughout, so it refuses to run beside a depot.
pub fn restore(data_dir: &Path, from: &Path) -> Result<RestoreReport, ToolError> {
    let lock = DataDirLock::acquire(data_dir)?;
    let report = store::restore(from, &store_path(data_dir))?;
    // The restored store gets a record of its own restoration.
    let detail = json!({
        "from": report.from.display().to_string(),
        "previous_kept_as": report.previous_kept_as.as_ref().map(|p| p.display().to_string()),
    });
    record_cli_change(
        data_dir,
        "store.restore",
        Some(report.restored.display().to_string()),
        Outcome::Ok,
        detail,
    )?;
    drop(lock);
    Ok(report)
}
