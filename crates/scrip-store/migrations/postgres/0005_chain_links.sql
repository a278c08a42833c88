-- How far each chain is linked: the furthest position of it that some
-- `chain.started` record links to. A new chain links only the heads not
-- linked that far yet, so its first record stays small however many chains
-- the store has held (the verifier follows links from chain to chain). It
-- decides only which links are written; verification reads the records.
CREATE TABLE chain_links (
    chain_id  TEXT PRIMARY KEY,
    chain_seq BIGINT NOT NULL
);
