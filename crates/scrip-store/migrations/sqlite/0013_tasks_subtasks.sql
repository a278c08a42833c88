-- A task tree's size: each sub-task names its tree's root (`root_id`; NULL
-- for a root, and for a task an older scrip stored, which counts as the
-- root of its own subtree), and a root counts the sub-tasks ever stored
-- under it (`subtasks`), which a commit refuses past MAX_SUBTASKS: ending a
-- task ends its tree in one transaction, which must stay bounded.
ALTER TABLE tasks ADD COLUMN root_id TEXT;
ALTER TABLE tasks ADD COLUMN subtasks INTEGER NOT NULL DEFAULT 0;
