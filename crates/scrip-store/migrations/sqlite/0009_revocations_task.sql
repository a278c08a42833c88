-- Whether a task already has an event in the revocation feed, read when the
-- end of a task that reached its deadline is published (AnnounceEnded).
CREATE INDEX revocations_task ON revocations(txn) WHERE kind = 'task';
