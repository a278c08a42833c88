-- Fewer index updates per audit record, the store's hottest insert: no query
-- reads records by `jti` (a token is traced through its task), and only
-- `chain.started` records are looked up by event (the chain starts that
-- `scrip audit verify` and the chain links read).
DROP INDEX audit_jti;
DROP INDEX audit_event;
CREATE INDEX audit_chain_starts ON audit(seq) WHERE event = 'chain.started';
