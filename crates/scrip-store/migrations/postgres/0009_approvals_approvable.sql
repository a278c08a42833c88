-- The actions of a step that needed a person's approval when it was asked
-- (the rest of `actions` policy allowed outright): a denial answers the
-- steps waiting before it that share one of these with it, not those that
-- share only an action allowed outright. NULL for a step an older scrip
-- stored (all of `actions` is taken then).
ALTER TABLE approvals ADD COLUMN approvable TEXT;
