-- The approvals a task has waiting, read at every step that needs a person
-- and checked inside the commit that opens one.
CREATE INDEX approvals_task_pending ON approvals(task_id) WHERE state = 'pending';
