-- Morrigan schema, version 1. Timestamps are fixed-width ISO 8601 UTC text.
CREATE TABLE signing_keys (
    kid TEXT PRIMARY KEY,
    node_id TEXT NOT NULL,
    public_key BYTEA NOT NULL,
    created TEXT NOT NULL
);

CREATE TABLE nodes (
    id TEXT PRIMARY KEY,
    public_url TEXT NOT NULL,
    version TEXT NOT NULL,
    started TEXT NOT NULL,
    lease_expires TEXT NOT NULL,
    state TEXT NOT NULL
);

CREATE TABLE identities (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    functions TEXT NOT NULL,
    password_hash TEXT NOT NULL,
    created TEXT NOT NULL,
    updated TEXT NOT NULL
);

CREATE TABLE tokens (
    id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    issuer TEXT NOT NULL,
    issued TEXT NOT NULL,
    expires TEXT NOT NULL
);
CREATE INDEX tokens_subject ON tokens (kind, subject);
CREATE INDEX tokens_expires ON tokens (expires);

CREATE TABLE clients (
    id TEXT PRIMARY KEY,
    created TEXT NOT NULL,
    updated TEXT NOT NULL,
    token_id TEXT,
    state TEXT,
    state_updated TEXT,
    capabilities TEXT,
    capabilities_reported TEXT
);

CREATE TABLE connections (
    id TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    server_id TEXT,
    token_id TEXT NOT NULL,
    token_expires TEXT NOT NULL,
    token_used BOOLEAN NOT NULL DEFAULT FALSE,
    client_address TEXT,
    connected TEXT,
    alive BOOLEAN NOT NULL DEFAULT FALSE,
    open BOOLEAN NOT NULL DEFAULT TRUE,
    last_heartbeat TEXT,
    disconnected TEXT,
    report_url TEXT NOT NULL,
    created TEXT NOT NULL,
    close_code BIGINT,
    close_reason TEXT
);
CREATE INDEX connections_client ON connections (client_id, open);
CREATE INDEX connections_server ON connections (server_id, open);
CREATE INDEX connections_disconnected ON connections (open, disconnected);
CREATE INDEX connections_pending ON connections (open, token_used, token_expires);
