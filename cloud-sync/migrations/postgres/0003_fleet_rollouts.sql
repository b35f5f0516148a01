-- Fleet rollouts: one release over depots in phases. The machine (atlasmesh-canary's
-- FleetRollout, as JSON) is the state; `revision` grows with every stored step so that
-- several cloud instances driving the same rollout never overwrite each other's step (a
-- write names the revision it read). Kept the same as the other backend's file except for
-- the log id column.
CREATE TABLE fleet_rollouts (
    id          TEXT PRIMARY KEY,
    hardware_id TEXT NOT NULL,
    version     TEXT NOT NULL,
    status      TEXT NOT NULL,              -- running, paused, halted, completed
    machine     TEXT NOT NULL,              -- JSON
    depot_plan  TEXT NOT NULL,              -- JSON: each depot's own plan for its vehicles
    revision    BIGINT NOT NULL,
    created_ms  BIGINT NOT NULL,
    created_by  TEXT NOT NULL,
    updated_ms  BIGINT NOT NULL
);
CREATE INDEX fleet_rollouts_by_status ON fleet_rollouts (status);

-- Every stored step: the event, the decisions, the fleet gate's judgement.
CREATE TABLE fleet_rollout_log (
    id         BIGSERIAL PRIMARY KEY,
    rollout_id TEXT NOT NULL REFERENCES fleet_rollouts(id),
    at_ms      BIGINT NOT NULL,
    entry      TEXT NOT NULL                -- JSON
);
CREATE INDEX fleet_rollout_log_by_rollout ON fleet_rollout_log (rollout_id, id);
