-- The steps of a task a person denied, read when the task asks for one
-- again: a denied step is not put to the approvers again at once.
CREATE INDEX approvals_task_denied ON approvals(task_id, decided_at) WHERE state = 'denied';
