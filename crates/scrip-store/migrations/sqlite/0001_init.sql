-- Tasks: one row per task, delegated or not.
CREATE TABLE tasks (
    id           TEXT PRIMARY KEY NOT NULL,
    parent_id    TEXT REFERENCES tasks(id),
    agent        TEXT NOT NULL,      -- the workload identity, JSON
    actor        TEXT,               -- the RFC 8693 act chain, JSON
    may_act      TEXT,               -- who may act for the task, JSON list
    agent_iss    TEXT NOT NULL,
    agent_sub    TEXT NOT NULL,
    grants       TEXT NOT NULL,      -- canonical space-separated tool:action
    purpose      TEXT NOT NULL,
    environment  TEXT NOT NULL,
    depth        INTEGER NOT NULL,
    token_jti    TEXT NOT NULL,
    created_at   INTEGER NOT NULL,   -- seconds since the epoch
    expires_at   INTEGER NOT NULL,
    ended_at     INTEGER,
    end_reason   TEXT
) STRICT;
CREATE INDEX tasks_parent ON tasks(parent_id);
CREATE INDEX tasks_agent ON tasks(agent_sub, created_at);
CREATE INDEX tasks_open_expiry ON tasks(expires_at) WHERE ended_at IS NULL;

-- Individually revoked tokens, kept until they would have expired anyway.
CREATE TABLE revoked_tokens (
    jti          TEXT PRIMARY KEY NOT NULL,
    task_id      TEXT NOT NULL,
    expires_at   INTEGER NOT NULL,
    revoked_at   INTEGER NOT NULL
) STRICT;
CREATE INDEX revoked_tokens_expiry ON revoked_tokens(expires_at);

-- Steps waiting for, or decided by, a person (CIBA-style approvals).
CREATE TABLE approvals (
    id           TEXT PRIMARY KEY NOT NULL,   -- the auth_req_id
    task_id      TEXT NOT NULL REFERENCES tasks(id),
    tool         TEXT NOT NULL,
    actions      TEXT NOT NULL,
    state        TEXT NOT NULL,               -- pending | approved | denied | used
    created_at   INTEGER NOT NULL,
    expires_at   INTEGER NOT NULL,
    decided_by   TEXT,
    decided_at   INTEGER,
    reason       TEXT,
    token_jti    TEXT
) STRICT;
CREATE INDEX approvals_pending ON approvals(state, expires_at);

-- The revocation feed: what resource servers must stop accepting, in order,
-- kept until it would have expired anyway.
CREATE TABLE revocations (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    kind         TEXT NOT NULL,      -- 'task' (every token of txn) or 'token' (one jti)
    txn          TEXT NOT NULL,
    jti          TEXT,
    exp          INTEGER NOT NULL,
    at           INTEGER NOT NULL
) STRICT;
CREATE INDEX revocations_exp ON revocations(exp);

-- The decision and event record: one hash chain per writer (a chain starts
-- each time a server process starts writing). `record` is the exact JSON that
-- was hashed: hash = sha256(record), and record holds chain_id, chain_seq and
-- prev_hash, so editing, deleting, inserting or reordering breaks a link.
CREATE TABLE audit (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ms        INTEGER NOT NULL,
    event        TEXT NOT NULL,
    decision     TEXT,
    agent_iss    TEXT,
    agent_sub    TEXT,
    task_id      TEXT,
    parent_id    TEXT,
    tool         TEXT,
    jti          TEXT,
    replica      TEXT NOT NULL,
    chain_id     TEXT NOT NULL,
    chain_seq    INTEGER NOT NULL,
    hash         TEXT NOT NULL,
    record       TEXT NOT NULL,
    UNIQUE (chain_id, chain_seq)
) STRICT;
CREATE INDEX audit_task ON audit(task_id, seq);
CREATE INDEX audit_agent ON audit(agent_sub, seq);
CREATE INDEX audit_tool ON audit(tool, seq);
CREATE INDEX audit_jti ON audit(jti);
CREATE INDEX audit_time ON audit(at_ms);
CREATE INDEX audit_event ON audit(event);

-- Signed checkpoints: "chain X had record N with hash H at time T", signed
-- with the audit checkpoint key (a compact JWS in `signature`).
CREATE TABLE audit_checkpoints (
    id           INTEGER PRIMARY KEY AUTOINCREMENT,
    chain_id     TEXT NOT NULL,
    chain_seq    INTEGER NOT NULL,
    hash         TEXT NOT NULL,
    at_ms        INTEGER NOT NULL,
    signature    TEXT NOT NULL
) STRICT;
CREATE INDEX audit_checkpoints_chain ON audit_checkpoints(chain_id, chain_seq);
