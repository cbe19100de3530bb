-- The SHA-256 (base64url) of each token's text, recorded when it is issued: the connect path
-- proves possession of an identity or connection token by matching it in the statement it runs
-- anyway, instead of an Ed25519 check per token (see tokens.rs). NULL for tokens issued before
-- this migration, which are checked by signature as before.
ALTER TABLE tokens ADD COLUMN digest TEXT;
ALTER TABLE connections ADD COLUMN token_digest TEXT;
