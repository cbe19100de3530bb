-- Commands too large for the cluster bus's transport travel through this table.
CREATE TABLE bus_payloads (
    id TEXT PRIMARY KEY,
    body TEXT NOT NULL,
    created TEXT NOT NULL
);
CREATE INDEX bus_payloads_created ON bus_payloads (created);
