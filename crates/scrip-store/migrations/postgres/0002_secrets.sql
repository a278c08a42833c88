-- Static keys of legacy upstreams, for the proxy to inject (see
-- migrations/sqlite/0002_secrets.sql): sealed, never the plaintext.
CREATE TABLE secrets (
    name         TEXT NOT NULL,
    action       TEXT NOT NULL,
    version      BIGINT NOT NULL,
    sealed       BYTEA NOT NULL,
    created_at   BIGINT NOT NULL,
    retired_at   BIGINT,
    PRIMARY KEY (name, action, version)
);
