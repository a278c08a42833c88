-- An agent's open tasks, soonest to end first (`scrip task revoke --agent`,
-- `scrip task list --agent`, a page at a time): the index on every task an
-- agent ever started, by start time, had each page read them all and sort
-- the open ones. Only open tasks are indexed, so a task start still
-- updates one index for its agent, and an ending drops the task from it.
CREATE INDEX tasks_agent_open ON tasks(agent_sub, expires_at, id) WHERE ended_at IS NULL;
DROP INDEX tasks_agent;
