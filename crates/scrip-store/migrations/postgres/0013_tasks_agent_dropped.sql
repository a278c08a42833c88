-- no-transaction
-- The index `tasks_agent_open` replaces (see 0012), dropped without taking
-- the lock that would stop replicas reading tasks.
DROP INDEX CONCURRENTLY tasks_agent;
