-- Tracked messages (operator -> device, with the client's outbox) and the last uplink messages
-- of each client (device -> operators). `seq` orders a client's messages (delivery order,
-- newest-first listings); states only move forward (see store/messages.rs).
CREATE TABLE messages (
    seq INTEGER PRIMARY KEY,
    id TEXT NOT NULL UNIQUE,
    client_id TEXT NOT NULL,
    connection_id TEXT,
    direction TEXT NOT NULL,
    message_type TEXT NOT NULL,
    body TEXT NOT NULL,
    track TEXT NOT NULL,
    state TEXT NOT NULL,
    created TEXT NOT NULL,
    written TEXT,
    acked TEXT,
    replied TEXT,
    ended TEXT,
    expires TEXT,
    reply TEXT,
    reason TEXT,
    idempotency_key TEXT,
    size BIGINT NOT NULL
);
-- A client's history and outbox; NULL keys never collide, so only keyed sends are deduplicated.
CREATE INDEX messages_client ON messages (client_id, direction, seq);
CREATE UNIQUE INDEX messages_idempotency ON messages (client_id, idempotency_key);
-- What the expiry sweep, the connection-end requeue and the pending check look for.
CREATE INDEX messages_open_expiry ON messages (expires) WHERE state IN ('queued', 'written');
CREATE INDEX messages_written ON messages (connection_id) WHERE state = 'written';
CREATE INDEX messages_created ON messages (created);
