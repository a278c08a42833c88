-- DPoP proofs used (RFC 9449 §11.1), for every process on the store: a
-- proof is recorded in the commit of what it was presented for, and a
-- second presentation's commit fails. `id` is SHA-256 of the key's
-- thumbprint, a zero byte and the proof's `jti`; `iat` the proof's signed
-- time, which leads the key so that rows go in (and, purged, leave) near
-- the end of the table, as time goes, rather than on a random page each;
-- `until` a Unix time past which the proof cannot pass the `iat` check.
-- Dropped with the revocations past their time, the oldest first (the
-- index on `until`).
CREATE TABLE dpop_proofs (
    iat INTEGER NOT NULL,
    id BLOB NOT NULL,
    until INTEGER NOT NULL,
    PRIMARY KEY (iat, id)
) WITHOUT ROWID;
CREATE INDEX dpop_proofs_until ON dpop_proofs(until);
