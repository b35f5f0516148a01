-- Foundation of the cloud store: the instance's identity. Depots, enrolment and sync state
-- arrive with federation.
CREATE TABLE meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
