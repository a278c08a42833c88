-- DPoP proofs used (RFC 9449 §11.1), for every process on the store: a
-- proof is recorded in the commit of what it was presented for, and a
-- second presentation's commit fails. `id` is SHA-256 of the key's
-- thumbprint, a zero byte and the proof's `jti`; `iat` the proof's signed
-- time, which leads the key so that rows go in (and, purged, leave) at the
-- end of the table's one index as time goes, rather than on a random page
-- each. Dropped, the oldest first, once no verifier can accept them.
CREATE TABLE dpop_proofs (
    iat INTEGER NOT NULL,
    id BLOB NOT NULL,
    PRIMARY KEY (iat, id)
) WITHOUT ROWID;
