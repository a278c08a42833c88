-- Static keys of legacy upstreams, for the proxy to inject. One row per
-- version of one upstream's action-class secret. `sealed` is the AEAD
-- ciphertext (nonce || ciphertext || tag) under the key-encryption key, with
-- `name`, `action` and `version` as associated data: a value cannot be moved
-- to another row. The plaintext is never stored.
CREATE TABLE secrets (
    name         TEXT NOT NULL,      -- the upstream (tool) name
    action       TEXT NOT NULL,      -- the action class it serves
    version      INTEGER NOT NULL,   -- 1, 2, ... per (name, action)
    sealed       BLOB NOT NULL,
    created_at   INTEGER NOT NULL,   -- seconds since the epoch
    retired_at   INTEGER,            -- when a newer version replaced it
    PRIMARY KEY (name, action, version)
) STRICT;
