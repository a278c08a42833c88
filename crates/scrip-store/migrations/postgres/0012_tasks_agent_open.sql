-- no-transaction
-- An agent's open tasks, soonest to end first (`scrip task revoke --agent`,
-- `scrip task list --agent`, a page at a time): the index on every task an
-- agent ever started, by start time, had each page read them all and sort
-- the open ones. Only open tasks are indexed. Built CONCURRENTLY (outside a
-- transaction, one statement a migration), so that replicas still running
-- go on reading and writing tasks while it is built; the old index is
-- dropped by the next migration.
CREATE INDEX CONCURRENTLY tasks_agent_open ON tasks(agent_sub, expires_at, id) WHERE ended_at IS NULL;
