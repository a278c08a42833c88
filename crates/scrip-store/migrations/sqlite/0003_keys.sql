-- The key set that replicas of a shared store sign with (see StoredKey):
-- public halves in the clear, private halves sealed under the
-- key-encryption key, which is never stored here.
CREATE TABLE signing_keys (
    kid           TEXT PRIMARY KEY NOT NULL,
    purpose       TEXT NOT NULL,      -- signing | checkpoint
    alg           TEXT NOT NULL,
    public_jwk    TEXT NOT NULL,
    sealed        TEXT NOT NULL,
    created_at    INTEGER NOT NULL,
    active_at     INTEGER NOT NULL,   -- signs from then on; published from creation
    retired_at    INTEGER,
    publish_until INTEGER             -- leaves the published set after
) STRICT;
