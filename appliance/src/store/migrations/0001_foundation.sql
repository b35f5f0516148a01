-- Foundation: identity, people and their credentials, and the audit trail.
-- Timestamps are Unix milliseconds (UTC).

CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
) STRICT;

CREATE TABLE users (
    id                  INTEGER PRIMARY KEY,
    username            TEXT NOT NULL UNIQUE,
    password_hash       TEXT NOT NULL,          -- argon2id PHC string
    role                TEXT NOT NULL CHECK (role IN ('viewer', 'technician', 'admin')),
    created_at          INTEGER NOT NULL,
    password_changed_at INTEGER NOT NULL,
    disabled_at         INTEGER
) STRICT;

CREATE TABLE api_tokens (
    id           INTEGER PRIMARY KEY,
    name         TEXT NOT NULL,
    role         TEXT NOT NULL CHECK (role IN ('viewer', 'technician', 'admin')),
    token_sha256 BLOB NOT NULL UNIQUE,          -- the token itself is never stored
    created_at   INTEGER NOT NULL,
    created_by   TEXT NOT NULL,
    last_used_at INTEGER,
    revoked_at   INTEGER
) STRICT;

CREATE TABLE sessions (
    id_sha256  BLOB PRIMARY KEY,                -- the cookie value is never stored
    user_id    INTEGER NOT NULL REFERENCES users(id) ON DELETE CASCADE,
    csrf_token TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    expires_at INTEGER NOT NULL
) STRICT;
CREATE INDEX sessions_by_expiry ON sessions(expires_at);
CREATE INDEX sessions_by_user ON sessions(user_id);

CREATE TABLE audit_log (
    id         INTEGER PRIMARY KEY,
    at         INTEGER NOT NULL,
    actor      TEXT NOT NULL,                   -- user:NAME, token:NAME, cli:COMMAND, system
    role       TEXT,
    action     TEXT NOT NULL,                   -- e.g. user.create, token.revoke
    target     TEXT,
    result     TEXT NOT NULL,                   -- ok, denied, failed
    request_id TEXT,
    detail     TEXT NOT NULL DEFAULT '{}'       -- JSON object
) STRICT;
CREATE INDEX audit_by_time ON audit_log(at);
