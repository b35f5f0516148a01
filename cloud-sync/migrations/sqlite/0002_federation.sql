-- Federation: the fleet CA, depots and their credentials, desired and reported state, events,
-- the fleet API's tokens and audit. Kept the same as postgres/0002_federation.sql except for
-- the audit id column; integers are BIGINT on both so one set of queries serves both.

-- The fleet CA. One row, shared by every cloud instance on the same database.
CREATE TABLE ca (
    id         BIGINT PRIMARY KEY CHECK (id = 1),
    cert_pem   TEXT NOT NULL,
    key_pem    TEXT NOT NULL,
    created_ms BIGINT NOT NULL
);

CREATE TABLE depots (
    id                   TEXT PRIMARY KEY,
    name                 TEXT NOT NULL UNIQUE,
    created_ms           BIGINT NOT NULL,
    enrolled_ms          BIGINT,
    revoked_ms           BIGINT,
    last_seen_ms         BIGINT,
    software_version     TEXT,
    desired_revision     BIGINT NOT NULL DEFAULT 0,  -- grows with every desired change
    acked_revision       BIGINT NOT NULL DEFAULT 0,  -- the newest the depot stored
    refused_revision     BIGINT,
    refused_reason       TEXT,
    events_acked         BIGINT NOT NULL DEFAULT 0,  -- every event up to this sequence is stored
    outbox_dropped_total BIGINT NOT NULL DEFAULT 0
);

-- One-time enrolment tokens, kept as SHA-256 of the secret.
CREATE TABLE enroll_tokens (
    token_hash TEXT PRIMARY KEY,
    depot_id   TEXT NOT NULL REFERENCES depots(id),
    created_ms BIGINT NOT NULL,
    expires_ms BIGINT NOT NULL,
    used_ms    BIGINT
);

CREATE TABLE depot_certs (
    serial       TEXT PRIMARY KEY,
    depot_id     TEXT NOT NULL REFERENCES depots(id),
    issued_ms    BIGINT NOT NULL,
    not_after_ms BIGINT NOT NULL,
    revoked_ms   BIGINT
);

-- Desired state per depot: the revision at which each object last changed; deletions stay as
-- tombstones so a depot that was offline learns of them.
CREATE TABLE desired (
    depot_id   TEXT NOT NULL REFERENCES depots(id),
    kind       TEXT NOT NULL,
    key        TEXT NOT NULL,
    generation BIGINT NOT NULL,
    revision   BIGINT NOT NULL,
    deleted    BIGINT NOT NULL DEFAULT 0,
    spec       TEXT NOT NULL,               -- JSON
    updated_ms BIGINT NOT NULL,
    updated_by TEXT NOT NULL,
    PRIMARY KEY (depot_id, kind, key)
);
CREATE INDEX desired_by_revision ON desired (depot_id, revision);

-- The latest report per key.
CREATE TABLE reported (
    depot_id            TEXT NOT NULL REFERENCES depots(id),
    kind                TEXT NOT NULL,
    key                 TEXT NOT NULL,
    observed_generation BIGINT NOT NULL,
    observed_ms         BIGINT NOT NULL,
    json                TEXT NOT NULL,
    deleted             BIGINT NOT NULL,
    received_ms         BIGINT NOT NULL,
    PRIMARY KEY (depot_id, kind, key)
);

CREATE TABLE events (
    depot_id    TEXT NOT NULL REFERENCES depots(id),
    event_id    TEXT NOT NULL,
    sequence    BIGINT NOT NULL,
    at_ms       BIGINT NOT NULL,
    kind        TEXT NOT NULL,
    json        TEXT NOT NULL,
    received_ms BIGINT NOT NULL,
    PRIMARY KEY (depot_id, event_id)
);
CREATE INDEX events_by_sequence ON events (depot_id, sequence);

CREATE TABLE api_tokens (
    token_hash TEXT PRIMARY KEY,
    name       TEXT NOT NULL,
    role       TEXT NOT NULL CHECK (role IN ('viewer', 'operator', 'admin')),
    created_ms BIGINT NOT NULL,
    revoked_ms BIGINT
);

CREATE TABLE audit_log (
    id     INTEGER PRIMARY KEY,
    at_ms  BIGINT NOT NULL,
    actor  TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT,
    result TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX audit_by_time ON audit_log (at_ms);
