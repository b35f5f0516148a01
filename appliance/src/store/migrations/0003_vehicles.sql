-- Vehicle link: the registry of vehicles this depot knows, their MQTT credentials, the last
-- state each reported, and the history of their OTA reports (canary waves read it).

CREATE TABLE vehicles (
    id                TEXT PRIMARY KEY,
    hardware_id       TEXT,
    secret_sha256     BLOB,                 -- MQTT password hash; the password is random, 256 bits
    credentials_at    INTEGER,
    created_at        INTEGER NOT NULL,
    created_by        TEXT NOT NULL,
    online            INTEGER NOT NULL DEFAULT 0,
    link_at           INTEGER,              -- depot clock when `online` last changed
    docked            INTEGER NOT NULL DEFAULT 0,
    bay               TEXT,
    dock_ts           INTEGER,              -- vehicle clocks from here on: newest report wins
    soc_percent       REAL,
    battery_kwh       REAL,
    plugged_in        INTEGER,
    departure_ms      INTEGER,
    installed_version TEXT,
    slot              TEXT,
    free_bytes        INTEGER,
    state_ts          INTEGER,
    health_status     TEXT,
    health_faults     TEXT,                 -- JSON array
    health_ts         INTEGER,
    ota_version       TEXT,
    ota_phase         TEXT,
    ota_outcome       TEXT,
    ota_bytes_done    INTEGER,
    ota_bytes_total   INTEGER,
    ota_error         TEXT,
    ota_ts            INTEGER,
    last_seen_at      INTEGER,              -- depot clock of the last message applied
    messages          INTEGER NOT NULL DEFAULT 0
) STRICT;
CREATE INDEX vehicles_by_bay ON vehicles(bay) WHERE docked = 1;

CREATE TABLE vehicle_ota_reports (
    id          INTEGER PRIMARY KEY,
    vehicle_id  TEXT NOT NULL REFERENCES vehicles(id) ON DELETE CASCADE,
    version     TEXT NOT NULL,
    phase       TEXT NOT NULL,
    outcome     TEXT NOT NULL,
    error       TEXT,
    ts          INTEGER NOT NULL,          -- vehicle clock
    received_at INTEGER NOT NULL,
    UNIQUE (vehicle_id, version, phase, outcome, ts)  -- a redelivered report is one report
) STRICT;
CREATE INDEX vehicle_ota_reports_by_version ON vehicle_ota_reports(version, vehicle_id);

-- Every bay a vehicle has docked at, so a free bay still shows on the board.
CREATE TABLE bays (
    id            TEXT PRIMARY KEY,
    first_seen_at INTEGER NOT NULL
) STRICT;
