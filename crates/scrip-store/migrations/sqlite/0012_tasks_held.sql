-- The grants of a task that policy allowed, when the task was started or
-- delegated, only with a person's approval (a canonical `tool:action`
-- list): each use of one waits for a person, whatever policy says at the
-- time of the use. NULL for a task an older scrip stored (none held).
ALTER TABLE tasks ADD COLUMN held TEXT;
