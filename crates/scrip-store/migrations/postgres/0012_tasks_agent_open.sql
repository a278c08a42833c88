-- An agent's open tasks, soonest to end first (`scrip task revoke --agent`,
-- `scrip task list --agent`, a page at a time): the index on every task an
-- agent ever started, by start time, had each page read them all and sort
-- the open ones. Only open tasks are indexed, so a task start still
-- updates one index for its agent, and an ending drops the task from it.
-- In one transaction, as every migration (one that failed part-way would
-- leave a store no later start could migrate): the new index is built
-- first, under a lock that lets replicas still running read tasks (only
-- their task starts and endings wait for the build), and the old one is
-- dropped last, its lock held for a moment.
CREATE INDEX tasks_agent_open ON tasks(agent_sub, expires_at, id) WHERE ended_at IS NULL;
DROP INDEX tasks_agent;
