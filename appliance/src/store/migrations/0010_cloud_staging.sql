-- Staging jobs may come from the cloud's image repository (`source_kind = 'cloud'`). SQLite
-- cannot change a CHECK constraint in place, so the table is rebuilt with the same columns
-- and rows (nothing references ota_jobs).
CREATE TABLE ota_jobs_new (
    id          INTEGER PRIMARY KEY,
    source_kind TEXT NOT NULL CHECK (source_kind IN ('upload', 'url', 'path', 'cloud')),
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
    started_by  TEXT NOT NULL,
    resumes     INTEGER NOT NULL DEFAULT 0
) STRICT;

INSERT INTO ota_jobs_new (id, source_kind, source, hardware_id, version, state, bytes_done,
    bytes_total, error_code, error, image_id, started_at, finished_at, started_by, resumes)
SELECT id, source_kind, source, hardware_id, version, state, bytes_done, bytes_total,
    error_code, error, image_id, started_at, finished_at, started_by, resumes
FROM ota_jobs;

DROP TABLE ota_jobs;
ALTER TABLE ota_jobs_new RENAME TO ota_jobs;
