-- How far rollouts have read the vehicles' OTA reports (vehicle_ota_reports.id). Rollouts read
-- reports from the store, not only from the live feed, so none is lost when they fall behind
-- or the depot is killed between receiving a report and judging it.

CREATE TABLE rollout_cursor (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    reports_seen INTEGER NOT NULL
) STRICT;
