-- The same tables and columns as the embedded SQLite store (see
-- migrations/sqlite), in PostgreSQL types: text, and 64-bit integers for
-- every number so that both backends decode the same way.

CREATE TABLE tasks (
    id           TEXT PRIMARY KEY NOT NULL,
    parent_id    TEXT REFERENCES tasks(id),
    agent        TEXT NOT NULL,
    actor        TEXT,
    may_act      TEXT,
    agent_iss    TEXT NOT NULL,
    agent_sub    TEXT NOT NULL,
    grants       TEXT NOT NULL,
    purpose      TEXT NOT NULL,
    environment  TEXT NOT NULL,
    depth        BIGINT NOT NULL,
    token_jti    TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    ended_at     BIGINT,
    end_reason   TEXT
);
CREATE INDEX tasks_parent ON tasks(parent_id);
CREATE INDEX tasks_agent ON tasks(agent_sub, created_at);
CREATE INDEX tasks_open_expiry ON tasks(expires_at) WHERE ended_at IS NULL;

CREATE TABLE revoked_tokens (
    jti          TEXT PRIMARY KEY NOT NULL,
    task_id      TEXT NOT NULL,
    expires_at   BIGINT NOT NULL,
    revoked_at   BIGINT NOT NULL
);
CREATE INDEX revoked_tokens_expiry ON revoked_tokens(expires_at);

CREATE TABLE approvals (
    id           TEXT PRIMARY KEY NOT NULL,
    task_id      TEXT NOT NULL REFERENCES tasks(id),
    tool         TEXT NOT NULL,
    actions      TEXT NOT NULL,
    state        TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    expires_at   BIGINT NOT NULL,
    decided_by   TEXT,
    decided_at   BIGINT,
    reason       TEXT,
    token_jti    TEXT
);
CREATE INDEX approvals_pending ON approvals(state, expires_at);

-- Writers serialize on an advisory lock (see postgres.rs), so `seq` order
-- is commit order and a reader following `seq` never skips a row.
CREATE TABLE revocations (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    kind         TEXT NOT NULL,
    txn          TEXT NOT NULL,
    jti          TEXT,
    exp          BIGINT NOT NULL,
    at           BIGINT NOT NULL
);
CREATE INDEX revocations_exp ON revocations(exp);

CREATE TABLE audit (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at_ms        BIGINT NOT NULL,
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
    chain_seq    BIGINT NOT NULL,
    hash         TEXT NOT NULL,
    record       TEXT NOT NULL,
    UNIQUE (chain_id, chain_seq)
);
CREATE INDEX audit_task ON audit(task_id, seq);
CREATE INDEX audit_agent ON audit(agent_sub, seq);
CREATE INDEX audit_tool ON audit(tool, seq);
CREATE INDEX audit_jti ON audit(jti);
CREATE INDEX audit_time ON audit(at_ms);
CREATE INDEX audit_event ON audit(event);

CREATE TABLE audit_checkpoints (
    id           BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    chain_id     TEXT NOT NULL,
    chain_seq    BIGINT NOT NULL,
    hash         TEXT NOT NULL,
    at_ms        BIGINT NOT NULL,
    signature    TEXT NOT NULL
);
CREATE INDEX audit_checkpoints_chain ON audit_checkpoints(chain_id, chain_seq);

CREATE TABLE signing_keys (
    kid           TEXT PRIMARY KEY NOT NULL,
    purpose       TEXT NOT NULL,
    alg           TEXT NOT NULL,
    public_jwk    TEXT NOT NULL,
    sealed        TEXT NOT NULL,
    created_at    BIGINT NOT NULL,
    active_at     BIGINT NOT NULL,
    retired_at    BIGINT,
    publish_until BIGINT
);
