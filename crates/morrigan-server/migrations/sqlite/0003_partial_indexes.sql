-- A connection's life (insert, accept, close) rewrote an entry in every index that included
-- `open` or `server_id`: 17 B-tree changes per connect/close cycle. Partial indexes hold only
-- the rows their queries look for, so the cycle now makes 7 (the primary key, the client, the
-- pending entry added then removed, the live entry on its node added then removed, the closed
-- entry). Each WHERE repeats the queries' own terms so that SQLite's planner matches it.
DROP INDEX connections_client;
DROP INDEX connections_server;
DROP INDEX connections_disconnected;
DROP INDEX connections_pending;
CREATE INDEX connections_client ON connections (client_id);
CREATE INDEX connections_live_on_server ON connections (server_id) WHERE open;
CREATE INDEX connections_closed ON connections (disconnected) WHERE open = FALSE;
CREATE INDEX connections_pending ON connections (token_expires) WHERE open AND token_used = FALSE;
