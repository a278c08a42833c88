-- The index `tasks_agent_open` replaces (see 0012), dropped on its own: its
-- lock is held only for the drop.
DROP INDEX tasks_agent;
