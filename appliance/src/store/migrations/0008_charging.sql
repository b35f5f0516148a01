-- Charging: what technicians set per vehicle (departure, target state of charge, priority) and
-- what admins set for the site (grid connection limit, time-of-use tariff). Everything else
-- the planner uses is read live from the chargers, the meter and the vehicles.

CREATE TABLE charging_vehicles (
    vehicle_id         TEXT PRIMARY KEY,
    departure_ms       INTEGER,            -- Unix ms; NULL: the vehicle's own or the depot default
    target_soc_percent REAL,               -- NULL: the depot default
    priority           INTEGER NOT NULL DEFAULT 0,
    updated_at         INTEGER NOT NULL,
    updated_by         TEXT NOT NULL
) STRICT;

CREATE TABLE charging_site (
    id           INTEGER PRIMARY KEY CHECK (id = 1),
    limit_kw     REAL NOT NULL,
    tariff       TEXT NOT NULL,            -- JSON array of 96 prices per kWh, local quarter-hours from midnight
    updated_at   INTEGER NOT NULL,
    updated_by   TEXT NOT NULL
) STRICT;
