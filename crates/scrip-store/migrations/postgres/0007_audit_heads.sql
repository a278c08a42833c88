-- Each writer's chain head, signed with the audit checkpoint key in the same
-- transaction as the records that moved it: one row a chain, replaced at
-- every commit. A committed record is therefore signed by its writer.
CREATE TABLE audit_heads (
    chain_id     TEXT PRIMARY KEY,
    chain_seq    BIGINT NOT NULL,
    hash         TEXT NOT NULL,
    at_ms        BIGINT NOT NULL,
    signature    TEXT NOT NULL
);
