-- Disk health of the depot's own disks: the latest reading of each device, its history
-- (downsampled: raw 15 days, then daily, then weekly), self-tests started, and verdict-change
-- alerts with their webhook delivery state (kept here so a restart keeps retrying).

CREATE TABLE disks (
    id            TEXT PRIMARY KEY,       -- serial number, or the device name without one
    device        TEXT NOT NULL,          -- /dev/sda, or "/dev/bus/0 -d megaraid,3"
    verdict       TEXT NOT NULL CHECK (verdict IN ('passed', 'unknown', 'warning', 'failed')),
    view          TEXT NOT NULL,          -- the API's view of the latest reading, JSON
    first_seen_at INTEGER NOT NULL,
    read_at       INTEGER NOT NULL
) STRICT;

CREATE TABLE disk_samples (
    disk_id    TEXT NOT NULL REFERENCES disks(id) ON DELETE CASCADE,
    at         INTEGER NOT NULL,          -- unix seconds
    resolution TEXT NOT NULL CHECK (resolution IN ('raw', 'day', 'week')),
    sample     TEXT NOT NULL,             -- counters, JSON
    PRIMARY KEY (disk_id, at)
) STRICT, WITHOUT ROWID;

CREATE TABLE disk_self_tests (
    disk_id    TEXT NOT NULL REFERENCES disks(id) ON DELETE CASCADE,
    kind       TEXT NOT NULL CHECK (kind IN ('short', 'long')),
    started_at INTEGER NOT NULL,          -- unix seconds
    PRIMARY KEY (disk_id, kind)
) STRICT;

CREATE TABLE disk_alerts (
    id               INTEGER PRIMARY KEY,
    disk_id          TEXT NOT NULL,
    device           TEXT NOT NULL,
    at               INTEGER NOT NULL,    -- unix ms
    from_verdict     TEXT,
    to_verdict       TEXT NOT NULL,
    reasons          TEXT NOT NULL,       -- JSON
    webhook          TEXT NOT NULL CHECK (webhook IN ('none', 'pending', 'delivered')),
    attempts         INTEGER NOT NULL DEFAULT 0,
    next_attempt_at  INTEGER,             -- unix ms
    last_error       TEXT,
    acknowledged_by  TEXT,
    acknowledged_at  INTEGER
) STRICT;

CREATE INDEX disk_alerts_pending ON disk_alerts (next_attempt_at) WHERE webhook = 'pending';
