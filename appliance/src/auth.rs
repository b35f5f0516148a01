//! People and credentials: roles, argon2 password hashes, API bearer tokens, panel sessions and
//! the failed-login limiter.
//!
//! Secrets are never stored: tokens and session ids are random 256-bit values kept only as
//! SHA-256 hashes (enough for values that cannot be guessed), passwords as argon2id hashes.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use argon2::Argon2;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use rand::RngCore;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::store::StoreError;

/// Roles are ordered: each one can do everything the ones below it can.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Sees everything a depot shows; changes nothing.
    Viewer,
    /// Runs the depot day to day: staging, rollouts, departures.
    Technician,
    /// Manages people, credentials, keys and destructive actions.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Technician => "technician",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "technician" => Some(Role::Technician),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("user {0:?} already exists")]
    UserExists(String),
    #[error("no user {0:?}")]
    NoSuchUser(String),
    #[error("no API token with id {0}")]
    NoSuchToken(i64),
    #[error("{0}")]
    Invalid(String),
    #[error("password hashing failed: {0}")]
    Hash(String),
}

impl From<rusqlite::Error> for AuthError {
    fn from(e: rusqlite::Error) -> Self {
        AuthError::Store(StoreError::Sqlite(e))
    }
}

pub const MIN_PASSWORD_LEN: usize = 10;

pub fn validate_username(name: &str) -> Result<(), AuthError> {
    let ok = (1..=64).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_' | b'@'));
    if ok {
        Ok(())
    } else {
        Err(AuthError::Invalid(
            "user names are 1 to 64 characters from letters, digits, '.', '-', '_' and '@'".into(),
        ))
    }
}

pub fn validate_password(password: &str) -> Result<(), AuthError> {
    if password.chars().count() < MIN_PASSWORD_LEN {
        return Err(AuthError::Invalid(format!(
            "passwords must have at least {MIN_PASSWORD_LEN} characters"
        )));
    }
    if password.len() > 1024 {
        return Err(AuthError::Invalid(
            "passwords must not exceed 1024 bytes".into(),
        ));
    }
    Ok(())
}

pub fn hash_password(password: &str) -> Result<String, AuthError> {
    let mut salt = [0u8; 16];
    rand::rng().fill_bytes(&mut salt);
    let salt = SaltString::encode_b64(&salt).map_err(|e| AuthError::Hash(e.to_string()))?;
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| AuthError::Hash(e.to_string()))
}

pub fn verify_password(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash)
        .map(|parsed| {
            Argon2::default()
                .verify_password(password.as_bytes(), &parsed)
                .is_ok()
        })
        .unwrap_or(false)
}

/// A hash that no password matches, verified against when a user does not exist so that a
/// login for an unknown name takes as long as one for a known name.
pub fn dummy_hash() -> &'static str {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    DUMMY.get_or_init(|| hash_password("atlasmesh-no-such-user-placeholder").unwrap_or_default())
}

/// A random secret: 32 bytes from the OS generator, URL-safe base64, with a readable prefix.
pub fn new_secret(prefix: &str) -> String {
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    format!("{prefix}{}", URL_SAFE_NO_PAD.encode(bytes))
}

pub fn secret_hash(secret: &str) -> Vec<u8> {
    Sha256::digest(secret.as_bytes()).to_vec()
}

/// A random password for the first admin: long and free of look-alike characters, because a
/// technician may have to type it from a printout.
pub fn new_password() -> String {
    const ALPHABET: &[u8] = b"abcdefghjkmnpqrstuvwxyzABCDEFGHJKMNPQRSTUVWXYZ23456789";
    let mut bytes = [0u8; 20];
    rand::rng().fill_bytes(&mut bytes);
    bytes
        .iter()
        .map(|b| ALPHABET[usize::from(*b) % ALPHABET.len()] as char)
        .collect()
}

pub const TOKEN_PREFIX: &str = "amt_";
pub const SESSION_PREFIX: &str = "ams_";

#[derive(Debug, Clone, Serialize)]
pub struct User {
    pub id: i64,
    pub username: String,
    pub role: Role,
    pub created_at: i64,
    pub disabled: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct ApiToken {
    pub id: i64,
    pub name: String,
    pub role: Role,
    pub created_at: i64,
    pub created_by: String,
    pub last_used_at: Option<i64>,
    pub revoked: bool,
}

fn role_column(value: String) -> rusqlite::Result<Role> {
    Role::parse(&value)
        .ok_or_else(|| rusqlite::Error::InvalidColumnType(0, value, rusqlite::types::Type::Text))
}

pub fn count_users(conn: &Connection) -> Result<i64, AuthError> {
    Ok(conn.query_row("SELECT count(*) FROM users", [], |r| r.get(0))?)
}

pub fn create_user(
    conn: &Connection,
    username: &str,
    password_hash: &str,
    role: Role,
    now: i64,
) -> Result<User, AuthError> {
    validate_username(username)?;
    let exists: bool = conn.query_row(
        "SELECT EXISTS(SELECT 1 FROM users WHERE username = ?1)",
        [username],
        |r| r.get(0),
    )?;
    if exists {
        return Err(AuthError::UserExists(username.to_owned()));
    }
    conn.execute(
        "INSERT INTO users (username, password_hash, role, created_at, password_changed_at) VALUES (?1, ?2, ?3, ?4, ?4)",
        params![username, password_hash, role.as_str(), now],
    )?;
    Ok(User {
        id: conn.last_insert_rowid(),
        username: username.to_owned(),
        role,
        created_at: now,
        disabled: false,
    })
}

pub fn list_users(conn: &Connection) -> Result<Vec<User>, AuthError> {
    let mut stmt = conn.prepare("SELECT id, username, role, created_at, disabled_at IS NOT NULL FROM users ORDER BY username")?;
    let rows = stmt.query_map([], |r| {
        Ok(User {
            id: r.get(0)?,
            username: r.get(1)?,
            role: role_column(r.get(2)?)?,
            created_at: r.get(3)?,
            disabled: r.get(4)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

/// The user's id, role and password hash, for login. Disabled users are not found.
pub fn login_lookup(
    conn: &Connection,
    username: &str,
) -> Result<Option<(i64, Role, String)>, AuthError> {
    Ok(conn
        .query_row(
            "SELECT id, role, password_hash FROM users WHERE username = ?1 AND disabled_at IS NULL",
            [username],
            |r| Ok((r.get(0)?, role_column(r.get(1)?)?, r.get(2)?)),
        )
        .optional()?)
}

pub fn set_password(
    conn: &Connection,
    username: &str,
    password_hash: &str,
    now: i64,
) -> Result<(), AuthError> {
    let changed = conn.execute(
        "UPDATE users SET password_hash = ?2, password_changed_at = ?3 WHERE username = ?1",
        params![username, password_hash, now],
    )?;
    if changed == 0 {
        return Err(AuthError::NoSuchUser(username.to_owned()));
    }
    // A new password ends every session opened with the old one.
    conn.execute(
        "DELETE FROM sessions WHERE user_id = (SELECT id FROM users WHERE username = ?1)",
        [username],
    )?;
    Ok(())
}

/// Disables a user and ends their sessions; the row stays so the audit trail keeps its meaning.
pub fn disable_user(conn: &Connection, username: &str, now: i64) -> Result<(), AuthError> {
    let changed = conn.execute(
        "UPDATE users SET disabled_at = ?2 WHERE username = ?1 AND disabled_at IS NULL",
        params![username, now],
    )?;
    if changed == 0 {
        return Err(AuthError::NoSuchUser(username.to_owned()));
    }
    conn.execute(
        "DELETE FROM sessions WHERE user_id = (SELECT id FROM users WHERE username = ?1)",
        [username],
    )?;
    Ok(())
}

pub fn count_active_admins(conn: &Connection) -> Result<i64, AuthError> {
    Ok(conn.query_row(
        "SELECT count(*) FROM users WHERE role = 'admin' AND disabled_at IS NULL",
        [],
        |r| r.get(0),
    )?)
}

/// Creates an API token and returns it with the secret, which is shown once and never again.
pub fn create_token(
    conn: &Connection,
    name: &str,
    role: Role,
    created_by: &str,
    now: i64,
) -> Result<(ApiToken, String), AuthError> {
    let name = name.trim();
    if name.is_empty() || name.len() > 100 {
        return Err(AuthError::Invalid(
            "token names are 1 to 100 characters".into(),
        ));
    }
    let secret = new_secret(TOKEN_PREFIX);
    conn.execute(
        "INSERT INTO api_tokens (name, role, token_sha256, created_at, created_by) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![name, role.as_str(), secret_hash(&secret), now, created_by],
    )?;
    let token = ApiToken {
        id: conn.last_insert_rowid(),
        name: name.to_owned(),
        role,
        created_at: now,
        created_by: created_by.to_owned(),
        last_used_at: None,
        revoked: false,
    };
    Ok((token, secret))
}

pub fn list_tokens(conn: &Connection) -> Result<Vec<ApiToken>, AuthError> {
    let mut stmt = conn.prepare(
        "SELECT id, name, role, created_at, created_by, last_used_at, revoked_at IS NOT NULL FROM api_tokens ORDER BY id",
    )?;
    let rows = stmt.query_map([], |r| {
        Ok(ApiToken {
            id: r.get(0)?,
            name: r.get(1)?,
            role: role_column(r.get(2)?)?,
            created_at: r.get(3)?,
            created_by: r.get(4)?,
            last_used_at: r.get(5)?,
            revoked: r.get(6)?,
        })
    })?;
    Ok(rows.collect::<Result<_, _>>()?)
}

pub fn revoke_token(conn: &Connection, id: i64, now: i64) -> Result<ApiToken, AuthError> {
    conn.execute(
        "UPDATE api_tokens SET revoked_at = ?2 WHERE id = ?1 AND revoked_at IS NULL",
        params![id, now],
    )?;
    list_tokens(conn)?
        .into_iter()
        .find(|t| t.id == id)
        .ok_or(AuthError::NoSuchToken(id))
}

/// The live token a bearer secret belongs to.
#[derive(Debug, Clone)]
pub struct TokenOwner {
    pub id: i64,
    pub name: String,
    pub role: Role,
    pub last_used_at: Option<i64>,
}

pub fn token_lookup(conn: &Connection, secret: &str) -> Result<Option<TokenOwner>, AuthError> {
    Ok(conn
        .query_row(
            "SELECT id, name, role, last_used_at FROM api_tokens WHERE token_sha256 = ?1 AND revoked_at IS NULL",
            [secret_hash(secret)],
            |r| {
                Ok(TokenOwner {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    role: role_column(r.get(2)?)?,
                    last_used_at: r.get(3)?,
                })
            },
        )
        .optional()?)
}

pub fn touch_token(conn: &Connection, id: i64, now: i64) -> Result<(), AuthError> {
    conn.execute(
        "UPDATE api_tokens SET last_used_at = ?2 WHERE id = ?1",
        params![id, now],
    )?;
    Ok(())
}

/// A signed-in panel user.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    pub user_id: i64,
    pub username: String,
    pub role: Role,
    pub csrf_token: String,
}

/// Opens a session; returns the cookie value and the session's CSRF token.
pub fn create_session(
    conn: &Connection,
    user_id: i64,
    now: i64,
    ttl: Duration,
) -> Result<(String, String), AuthError> {
    let cookie = new_secret(SESSION_PREFIX);
    let csrf = new_secret("");
    let expires = now + i64::try_from(ttl.as_millis()).unwrap_or(i64::MAX / 2);
    conn.execute(
        "INSERT INTO sessions (id_sha256, user_id, csrf_token, created_at, expires_at) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![secret_hash(&cookie), user_id, csrf, now, expires],
    )?;
    Ok((cookie, csrf))
}

pub fn session_lookup(
    conn: &Connection,
    cookie: &str,
    now: i64,
) -> Result<Option<SessionInfo>, AuthError> {
    Ok(conn
        .query_row(
            "SELECT u.id, u.username, u.role, s.csrf_token FROM sessions s JOIN users u ON u.id = s.user_id
             WHERE s.id_sha256 = ?1 AND s.expires_at > ?2 AND u.disabled_at IS NULL",
            params![secret_hash(cookie), now],
            |r| {
                Ok(SessionInfo {
                    user_id: r.get(0)?,
                    username: r.get(1)?,
                    role: role_column(r.get(2)?)?,
                    csrf_token: r.get(3)?,
                })
            },
        )
        .optional()?)
}

pub fn delete_session(conn: &Connection, cookie: &str) -> Result<(), AuthError> {
    conn.execute(
        "DELETE FROM sessions WHERE id_sha256 = ?1",
        [secret_hash(cookie)],
    )?;
    Ok(())
}

pub fn delete_expired_sessions(conn: &Connection, now: i64) -> Result<usize, AuthError> {
    Ok(conn.execute("DELETE FROM sessions WHERE expires_at <= ?1", [now])?)
}

/// Compares secrets in constant time.
pub fn secrets_equal(a: &str, b: &str) -> bool {
    use subtle::ConstantTimeEq;
    a.len() == b.len() && bool::from(a.as_bytes().ct_eq(b.as_bytes()))
}

/// Counts failed logins per key (client address, user name) in a sliding window. Both keys are
/// checked, so neither spraying one account from many addresses nor many accounts from one
/// address gets more than `max_failures` guesses per window. Time is passed in.
#[derive(Debug)]
pub struct LoginLimiter {
    max_failures: usize,
    window: Duration,
    failures: Mutex<HashMap<String, VecDeque<Instant>>>,
}

impl LoginLimiter {
    pub fn new(max_failures: u32, window: Duration) -> Self {
        Self {
            max_failures: usize::try_from(max_failures).unwrap_or(usize::MAX),
            window,
            failures: Mutex::new(HashMap::new()),
        }
    }

    /// `Err(retry_after)` when any key is over its allowance.
    pub fn check(&self, keys: &[&str], now: Instant) -> Result<(), Duration> {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let mut wait = Duration::ZERO;
        for key in keys {
            if let Some(times) = map.get_mut(*key) {
                while times
                    .front()
                    .is_some_and(|t| now.duration_since(*t) >= self.window)
                {
                    times.pop_front();
                }
                if times.len() >= self.max_failures
                    && let Some(oldest) = times.front()
                {
                    wait = wait.max(self.window.saturating_sub(now.duration_since(*oldest)));
                }
            }
        }
        if wait.is_zero() {
            Ok(())
        } else {
            Err(wait.max(Duration::from_secs(1)))
        }
    }

    pub fn record_failure(&self, keys: &[&str], now: Instant) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        // Bound memory under a spray of random names: forget idle keys first.
        if map.len() > 10_000 {
            let window = self.window;
            map.retain(|_, times| {
                times
                    .back()
                    .is_some_and(|t| now.duration_since(*t) < window)
            });
        }
        for key in keys {
            map.entry((*key).to_owned()).or_default().push_back(now);
        }
    }

    pub fn reset(&self, keys: &[&str]) {
        let mut map = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        for key in keys {
            map.remove(*key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_are_ordered() {
        assert!(Role::Viewer < Role::Technician && Role::Technician < Role::Admin);
        for role in [Role::Viewer, Role::Technician, Role::Admin] {
            assert_eq!(Role::parse(role.as_str()), Some(role));
        }
    }

    #[test]
    fn passwords_verify_only_themselves() {
        let hash = hash_password("correct horse battery").unwrap();
        assert!(hash.starts_with("$argon2id$"));
        assert!(verify_password(&hash, "correct horse battery"));
        assert!(!verify_password(&hash, "correct horse batterY"));
        assert!(!verify_password("not a hash", "x"));
        assert!(!verify_password(dummy_hash(), ""));
    }

    #[test]
    fn limiter_blocks_after_max_failures_and_forgets_after_window() {
        let limiter = LoginLimiter::new(3, Duration::from_secs(60));
        let t0 = Instant::now();
        for i in 0..3 {
            assert!(
                limiter
                    .check(&["ip:1"], t0 + Duration::from_secs(i))
                    .is_ok()
            );
            limiter.record_failure(&["ip:1"], t0 + Duration::from_secs(i));
        }
        let wait = limiter
            .check(&["ip:1"], t0 + Duration::from_secs(3))
            .unwrap_err();
        assert_eq!(wait, Duration::from_secs(57));
        assert!(
            limiter
                .check(&["ip:2"], t0 + Duration::from_secs(3))
                .is_ok()
        );
        assert!(
            limiter
                .check(&["ip:1"], t0 + Duration::from_secs(61))
                .is_ok()
        );
    }

    #[test]
    fn generated_secrets_differ() {
        assert_ne!(new_secret(TOKEN_PREFIX), new_secret(TOKEN_PREFIX));
        assert_eq!(new_password().len(), 20);
        assert!(
            secrets_equal("abc", "abc")
                && !secrets_equal("abc", "abd")
                && !secrets_equal("a", "ab")
        );
    }
}
