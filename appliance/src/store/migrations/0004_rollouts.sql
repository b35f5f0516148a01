-- Canary rollouts: each rollout's state machine (the canary crate's Rollout, as JSON) after its
-- last step, and the hash-chained log of every step that changed something: the event, the
-- decisions that followed, and the gate at that moment. The evidence bundle is built from it.

CREATE TABLE rollouts (
    id          INTEGER PRIMARY KEY,
    hardware_id TEXT NOT NULL,
    version     TEXT NOT NULL,
    image_id    INTEGER NOT NULL REFERENCES ota_images(id),
    phase       TEXT NOT NULL,          -- running, paused, halted, completed, rolled_back
    machine     TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    created_by  TEXT NOT NULL,
    updated_at  INTEGER NOT NULL
);

CREATE TABLE rollout_log (
    rollout_id INTEGER NOT NULL REFERENCES rollouts(id),
    seq        INTEGER NOT NULL,        -- 1, 2, ... per rollout
    at         INTEGER NOT NULL,
    entry      TEXT NOT NULL,           -- JSON: actor, event, decisions, gate
    prev_hash  BLOB NOT NULL,           -- the previous entry's hash; 32 zero bytes for the first
    hash       BLOB NOT NULL,           -- SHA-256(prev_hash || seq as 8 bytes BE || entry)
    PRIMARY KEY (rollout_id, seq)
);
