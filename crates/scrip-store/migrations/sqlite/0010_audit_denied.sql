-- `scrip audit query --decision deny`: denials are rare, so without an index
-- the query reads the whole trail in `seq` order. Only denied records are
-- indexed: allowed ones are most of the trail and are found at once by
-- `seq`, and the hot insert stays as it was.
CREATE INDEX audit_denied ON audit(seq) WHERE decision = 'deny';
