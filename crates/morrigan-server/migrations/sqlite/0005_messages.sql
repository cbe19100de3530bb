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
-- A client's history and outbox.
CREATE INDEX messages_client ON messages (client_id, direction, seq);
-- Partial indexes hold only the rows their statements look for, so most sends touch few of
-- them: keyed sends (deduplicated per client), messages with a ttl still waiting (the expiry
-- sweep), messages written and unanswered (the requeue at a connection's end), messages still
-- waiting at all (whether any outbox holds something). Retention deletes by `seq`.
CREATE UNIQUE INDEX messages_idempotency ON messages (client_id, idempotency_key)
    WHERE idempotency_key IS NOT NULL;
CREATE INDEX messages_open_expiry ON messages (expires)
    WHERE expires IS NOT NULL AND state IN ('queued', 'written');
CREATE INDEX messages_written ON messages (connection_id) WHERE state = 'written';
CREATE INDEX messages_waiting ON messages (seq) WHERE state IN ('queued', 'written');
