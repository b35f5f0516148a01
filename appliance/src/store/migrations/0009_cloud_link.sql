-- The depot's side of the cloud link: its enrolment, the desired state the cloud set and the
-- revision it came with, and the outbox of events waiting for the cloud.

-- Present once the depot is enrolled; the outbox triggers record only while it is.
CREATE TABLE cloud_link (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    depot_id    TEXT NOT NULL,              -- the cloud's id for this depot
    depot_name  TEXT NOT NULL,
    cloud_url   TEXT NOT NULL,
    enrolled_at INTEGER NOT NULL,           -- unix ms
    desired_revision INTEGER NOT NULL DEFAULT 0,
    dropped_total    INTEGER NOT NULL DEFAULT 0,  -- events the bound dropped, ever
    dropped_last_at  INTEGER                      -- unix ms of the last drop
) STRICT;

-- The cloud's desired objects as stored at `desired_revision`.
CREATE TABLE cloud_desired (
    kind       TEXT NOT NULL,
    key        TEXT NOT NULL,
    generation INTEGER NOT NULL,
    spec       TEXT NOT NULL,               -- JSON
    stored_at  INTEGER NOT NULL,
    PRIMARY KEY (kind, key)
) STRICT;

-- Events for the cloud, in commit order. `seq` never repeats (AUTOINCREMENT), so the cloud's
-- acknowledgement "up to seq" stays meaningful after rows are deleted.
CREATE TABLE outbox (
    seq   INTEGER PRIMARY KEY AUTOINCREMENT,
    id    TEXT NOT NULL UNIQUE,             -- 128 random bits, hex
    at    INTEGER NOT NULL,                 -- unix ms
    kind  TEXT NOT NULL,
    body  TEXT NOT NULL                     -- JSON
) STRICT;
CREATE INDEX outbox_by_time ON outbox(at);

-- The events are written by triggers in the transaction of the change itself, so an event is
-- in the outbox exactly when its change is in the store, whatever code path made it.
CREATE TRIGGER outbox_audit AFTER INSERT ON audit_log
WHEN EXISTS (SELECT 1 FROM cloud_link)
BEGIN
    INSERT INTO outbox (id, at, kind, body) VALUES (
        lower(hex(randomblob(16))), NEW.at, 'audit',
        json_object('actor', NEW.actor, 'role', NEW.role, 'action', NEW.action,
                    'target', NEW.target, 'result', NEW.result, 'request_id', NEW.request_id,
                    'detail', json(NEW.detail)));
END;

CREATE TRIGGER outbox_rollout AFTER INSERT ON rollout_log
WHEN EXISTS (SELECT 1 FROM cloud_link)
BEGIN
    INSERT INTO outbox (id, at, kind, body) VALUES (
        lower(hex(randomblob(16))), NEW.at, 'rollout',
        json_object('rollout_id', NEW.rollout_id, 'seq', NEW.seq, 'entry', json(NEW.entry),
                    'hash', lower(hex(NEW.hash))));
END;

CREATE TRIGGER outbox_disk_alert AFTER INSERT ON disk_alerts
WHEN EXISTS (SELECT 1 FROM cloud_link)
BEGIN
    INSERT INTO outbox (id, at, kind, body) VALUES (
        lower(hex(randomblob(16))), NEW.at, 'disk_alert',
        json_object('disk_id', NEW.disk_id, 'device', NEW.device, 'from', NEW.from_verdict,
                    'to', NEW.to_verdict, 'reasons', json(NEW.reasons)));
END;

CREATE TRIGGER outbox_ota_report AFTER INSERT ON vehicle_ota_reports
WHEN EXISTS (SELECT 1 FROM cloud_link)
BEGIN
    INSERT INTO outbox (id, at, kind, body) VALUES (
        lower(hex(randomblob(16))), NEW.received_at, 'ota_report',
        json_object('vehicle_id', NEW.vehicle_id, 'version', NEW.version, 'phase', NEW.phase,
                    'outcome', NEW.outcome, 'error', NEW.error, 'vehicle_ts', NEW.ts));
END;
