-- OTA staging: images staged on this depot, staging jobs, and per-vehicle assignments.

CREATE TABLE ota_images (
    id              INTEGER PRIMARY KEY,
    hardware_id     TEXT NOT NULL,
    version         TEXT NOT NULL,
    target          TEXT NOT NULL,           -- image repository target name
    index_target    TEXT NOT NULL,           -- its chunk index target
    sha256          TEXT NOT NULL,
    length          INTEGER NOT NULL,
    chunk_count     INTEGER NOT NULL,
    min_version     TEXT,
    notes           TEXT,
    targets_version INTEGER NOT NULL,         -- image repository targets version it verified under
    targets_expires INTEGER NOT NULL,
    source          TEXT NOT NULL,            -- where it was staged from
    staged_at       INTEGER NOT NULL,
    staged_by       TEXT NOT NULL,
    corrupt_at      INTEGER,                  -- validation found damage on disk: not served
    deleted_at      INTEGER,                  -- rows stay, so version floors remember history
    UNIQUE (hardware_id, version)
) STRICT;

CREATE TABLE ota_jobs (
    id          INTEGER PRIMARY KEY,
    source_kind TEXT NOT NULL CHECK (source_kind IN ('upload', 'url', 'path')),
    source      TEXT NOT NULL,
    hardware_id TEXT,
    version     TEXT,
    state       TEXT NOT NULL CHECK (state IN ('running', 'staged', 'failed', 'interrupted')),
    bytes_done  INTEGER NOT NULL DEFAULT 0,
    bytes_total INTEGER,
    error_code  TEXT,
    error       TEXT,
    image_id    INTEGER REFERENCES ota_images(id),
    started_at  INTEGER NOT NULL,
    finished_at INTEGER,
    started_by  TEXT NOT NULL
) STRICT;

CREATE TABLE ota_assignments (
    vehicle_id  TEXT PRIMARY KEY,
    image_id    INTEGER NOT NULL REFERENCES ota_images(id),
    assigned_at INTEGER NOT NULL,
    assigned_by TEXT NOT NULL
) STRICT;
CREATE INDEX ota_assignments_by_image ON ota_assignments(image_id);
