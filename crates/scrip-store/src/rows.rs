//! Decoding stored rows into the model, once for both backends.
//!
//! Both schemas store the same columns with the same names (text, and
//! 64-bit integers), so a row of either backend is read through [`Cols`]
//! and mapped here.

use crate::{
    Approval, AuditEvent, ChainLink, Checkpoint, KeyPurpose, Revocation, RevocationKind,
    SecretRecord, StoreError, StoredKey, StoredRecord, TaskRecord,
};

pub(crate) fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn to_u64(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

fn corrupt(e: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt(e.to_string())
}

/// A store that could not be read or written (the same for every backend).
pub(crate) fn unavailable(e: impl std::fmt::Display) -> StoreError {
    StoreError::Unavailable(e.to_string())
}

/// Refuses a new approval when `same` approvals of its task already wait for
/// its step, or `waiting` approvals of its task wait in all (see
/// [`crate::Write::InsertApproval`]).
pub(crate) fn check_pending(
    a: &Approval,
    waiting: i64,
    same: i64,
    agent_waiting: i64,
    actor_waiting: i64,
) -> Result<(), StoreError> {
    if a.state != crate::ApprovalState::Pending {
        return Ok(());
    }
    if same > 0 {
        return Err(StoreError::Conflict(format!(
            "a step of task {} for these actions at {} already waits for a person",
            a.task_id, a.tool
        )));
    }
    if usize::try_from(waiting).unwrap_or(usize::MAX) >= crate::MAX_PENDING_PER_TASK {
        return Err(StoreError::Conflict(format!(
            "{} steps of task {} already wait for a person",
            crate::MAX_PENDING_PER_TASK,
            a.task_id
        )));
    }
    if usize::try_from(actor_waiting).unwrap_or(usize::MAX) >= crate::MAX_PENDING_PER_ACTOR {
        return Err(StoreError::Conflict(format!(
            "{} steps of the tasks task {}'s sub-agent acts in in its tree already wait for a person",
            crate::MAX_PENDING_PER_ACTOR,
            a.task_id
        )));
    }
    if usize::try_from(agent_waiting).unwrap_or(usize::MAX) >= crate::MAX_PENDING_PER_AGENT {
        return Err(StoreError::Conflict(format!(
            "{} steps of the tasks of task {}'s agent already wait for a person",
            crate::MAX_PENDING_PER_AGENT,
            a.task_id
        )));
    }
    Ok(())
}

/// How many approvals of an agent's tasks wait: now, issuer, subject. A
/// step of a task that has ended (or reached its deadline) waits for nobody
/// (nobody may decide it, and `pending_approvals` leaves it out): it does
/// not count.
pub(crate) const AGENT_PENDING: &str = "SELECT COUNT(*) FROM approvals a \
     JOIN tasks t ON t.id = a.task_id \
     WHERE a.state = 'pending' AND a.expires_at > $1 \
     AND t.ended_at IS NULL AND t.expires_at > $1 \
     AND t.agent_iss = $2 AND t.agent_sub = $3";

/// As [`AGENT_PENDING`], for the agent of a task (task id, now), and of
/// those how many are in the task's tree with its current actor (the
/// outermost `act`'s `sub` and `iss`; none for a task without an actor):
/// two counts, in SQLite's JSON functions. Both read the pending approvals
/// (indexed by state) and each one's task by its key, never the tasks of
/// an agent (unindexed, and possibly millions).
pub(crate) const PENDING_NEAR_TASK_SQLITE: &str = "SELECT COUNT(*), \
     COALESCE(SUM(CASE WHEN COALESCE(t.root_id, t.id) = COALESCE(me.root_id, me.id) \
     AND json_valid(me.actor) AND json_valid(t.actor) \
     AND json_extract(t.actor, '$.sub') = json_extract(me.actor, '$.sub') \
     AND json_extract(t.actor, '$.iss') IS json_extract(me.actor, '$.iss') \
     THEN 1 ELSE 0 END), 0) \
     FROM approvals a \
     JOIN tasks me ON me.id = $1 \
     JOIN tasks t ON t.id = a.task_id \
     WHERE a.state = 'pending' AND a.expires_at > $2 \
     AND t.ended_at IS NULL AND t.expires_at > $2 \
     AND t.agent_iss = me.agent_iss AND t.agent_sub = me.agent_sub";

/// [`PENDING_NEAR_TASK_SQLITE`] in PostgreSQL's.
pub(crate) const PENDING_NEAR_TASK_POSTGRES: &str = "SELECT COUNT(*), \
     COUNT(*) FILTER (WHERE COALESCE(t.root_id, t.id) = COALESCE(me.root_id, me.id) \
     AND me.actor IS NOT NULL AND t.actor IS NOT NULL \
     AND (t.actor::jsonb ->> 'sub') = (me.actor::jsonb ->> 'sub') \
     AND (t.actor::jsonb ->> 'iss') IS NOT DISTINCT FROM (me.actor::jsonb ->> 'iss')) \
     FROM approvals a \
     JOIN tasks me ON me.id = $1 \
     JOIN tasks t ON t.id = a.task_id \
     WHERE a.state = 'pending' AND a.expires_at > $2 \
     AND t.ended_at IS NULL AND t.expires_at > $2 \
     AND t.agent_iss = me.agent_iss AND t.agent_sub = me.agent_sub";

/// Typed column access, the same for a SQLite and a PostgreSQL row.
pub(crate) trait Cols {
    fn text(&self, col: &str) -> Result<String, StoreError>;
    fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError>;
    fn int(&self, col: &str) -> Result<i64, StoreError>;
    fn opt_int(&self, col: &str) -> Result<Option<i64>, StoreError>;
    fn bytes(&self, col: &str) -> Result<Vec<u8>, StoreError>;

    fn uint(&self, col: &str) -> Result<u64, StoreError> {
        self.int(col).map(to_u64)
    }
    fn opt_uint(&self, col: &str) -> Result<Option<u64>, StoreError> {
        Ok(self.opt_int(col)?.map(to_u64))
    }
}

macro_rules! impl_cols {
    ($row:ty, $get:path) => {
        impl Cols for $row {
            fn text(&self, col: &str) -> Result<String, StoreError> {
                $get(self, col).map_err(corrupt)
            }
            fn opt_text(&self, col: &str) -> Result<Option<String>, StoreError> {
                $get(self, col).map_err(corrupt)
            }
            fn int(&self, col: &str) -> Result<i64, StoreError> {
                $get(self, col).map_err(corrupt)
            }
            fn opt_int(&self, col: &str) -> Result<Option<i64>, StoreError> {
                $get(self, col).map_err(corrupt)
            }
            fn bytes(&self, col: &str) -> Result<Vec<u8>, StoreError> {
                $get(self, col).map_err(corrupt)
            }
        }
    };
}
impl_cols!(sqlx::sqlite::SqliteRow, sqlx::Row::try_get);
impl_cols!(sqlx::postgres::PgRow, sqlx::Row::try_get);
impl_cols!(rusqlite::Row<'_>, rusqlite::Row::get);

/// The columns [`task`] reads.
macro_rules! task_columns {
    () => {
        "id, parent_id, agent, actor, may_act, grants, held, purpose, environment, depth, token_jti, \
         created_at, expires_at, ended_at, end_reason"
    };
}

/// The columns [`approval`] reads.
macro_rules! approval_columns {
    () => {
        "id, task_id, tool, actions, approvable, state, created_at, expires_at, decided_by, decided_at, reason, token_jti"
    };
}

/// The condition of [`crate::Store::orphaned_approvals`], `now` written
/// as the placeholder given: a step still pending, or approved and not
/// collected, not yet at its expiry, whose task has ended or reached its
/// deadline. The steps are read by state through the approvals index, and
/// each one's task by its key; those past their expiry are
/// [`crate::Store::expired_approvals`]'.
macro_rules! orphaned_where {
    ($now:literal) => {
        concat!(
            "state IN ('pending', 'approved') AND expires_at > ",
            $now,
            " AND EXISTS (SELECT 1 FROM tasks t WHERE t.id = approvals.task_id \
             AND (t.ended_at IS NOT NULL OR t.expires_at <= ",
            $now,
            "))"
        )
    };
}

/// [`crate::Store::agent_denials`]: since, tool, issuer, subject, limit. A
/// person decides a step before it expires, and an approved step is
/// overruled by a denial when it is collected, before it expires too,
/// give or take the collection's few seconds: so one denied since `$1`
/// expires after `$1` less 300 s. The bound lets the read take the
/// approvals index by state and expiry over its recent range only, and
/// each one's task by its key.
pub(crate) const AGENT_DENIALS: &str = concat!(
    "SELECT ",
    approval_columns!(),
    " FROM approvals WHERE state = 'denied' AND expires_at >= $1 - 300 AND decided_at >= $1 \
     AND tool = $2 AND EXISTS (SELECT 1 FROM tasks t WHERE t.id = approvals.task_id \
     AND t.agent_iss = $3 AND t.agent_sub = $4) \
     ORDER BY decided_at DESC, id LIMIT $5"
);

/// The columns [`key`] reads.
macro_rules! key_columns {
    () => {
        "kid, purpose, alg, public_jwk, sealed, created_at, active_at, retired_at, publish_until"
    };
}
pub(crate) use {approval_columns, key_columns, orphaned_where, task_columns};

/// The `(kid, active_at)` of every key of one purpose, for
/// [`refuse_unless_newest`].
pub(crate) const KEYS_OF_PURPOSE: &str = "SELECT kid, active_at FROM signing_keys \
     WHERE purpose = $1 AND (publish_until IS NULL OR publish_until > $2)";

/// A [`crate::Write::ResealKey`] or [`crate::Write::ResealSecret`] that
/// changed nothing: the row is gone, or its value changed since it was read.
pub(crate) fn resealed(changed: usize, what: &str) -> Result<(), StoreError> {
    if changed == 0 {
        return Err(StoreError::Conflict(format!(
            "{what} changed or went since it was read; read it again"
        )));
    }
    Ok(())
}

/// The SQL of [`crate::Write::DeleteSecret`]'s check: name, action, through.
pub(crate) const SECRET_NEWER: &str = "SELECT EXISTS (SELECT 1 FROM secrets \
     WHERE name = $1 AND action = $2 AND version > $3)";

/// The SQL of [`crate::Write::DeleteSecret`]: name, action.
pub(crate) const DELETE_SECRET: &str = "DELETE FROM secrets WHERE name = $1 AND action = $2";

/// A [`crate::Write::DeleteSecret`] that found a newer version, or deleted
/// nothing.
pub(crate) fn deleted_secret(
    newer: bool,
    changed: usize,
    name: &str,
    action: &str,
) -> Result<(), StoreError> {
    if newer {
        return Err(StoreError::Conflict(format!(
            "secret `{name}` `{action}` has a version newer than those read (a rotation since)"
        )));
    }
    if changed == 0 {
        return Err(StoreError::Conflict(format!(
            "no secret `{name}` `{action}` is stored"
        )));
    }
    Ok(())
}

/// The SQL of [`crate::Write::ResealKey`]: to, kid, from. (In SQLite `$n`
/// is a name, numbered by its first appearance: they appear in order.)
pub(crate) const RESEAL_KEY: &str =
    "UPDATE signing_keys SET sealed = $1 WHERE kid = $2 AND sealed = $3";

/// The SQL of [`crate::Write::ResealSecret`]: to, name, action, version, from.
pub(crate) const RESEAL_SECRET: &str = "UPDATE secrets SET sealed = $1 \
     WHERE name = $2 AND action = $3 AND version = $4 AND sealed = $5";

/// A [`crate::Write::WithdrawKey`] that found no key: already purged, or
/// never there.
pub(crate) fn withdrawn(changed: usize, kid: &str) -> Result<(), StoreError> {
    if changed == 0 {
        return Err(StoreError::Conflict(format!("no key `{kid}` to withdraw")));
    }
    Ok(())
}

/// A [`crate::Write::RetireKey`] that retired nothing: another writer
/// retired the key first, so this commit (with its audit record of the
/// retirement) is a [`StoreError::Conflict`], and the key is recorded
/// retired once.
pub(crate) fn retired_once(rows: usize, kid: &str) -> Result<(), StoreError> {
    if rows == 0 {
        return Err(StoreError::Conflict(format!(
            "signing key `{kid}` was retired already, or is unknown"
        )));
    }
    Ok(())
}

/// [`StoreError::Conflict`] unless the newest of `keys` (`(kid,
/// active_at)`, newest by `active_at` then `kid`, compared here so no
/// collation decides it) is `after`, or, with `after` `None`, unless there
/// are none.
pub(crate) fn refuse_unless_newest(
    keys: &[(String, i64)],
    after: Option<&str>,
) -> Result<(), StoreError> {
    let newest = keys
        .iter()
        .max_by(|a, b| (a.1, &a.0).cmp(&(b.1, &b.0)))
        .map(|(kid, _)| kid.as_str());
    if newest == after {
        return Ok(());
    }
    Err(StoreError::Conflict(match newest {
        Some(kid) => {
            format!("the newest key of its purpose is now `{kid}`: another writer added it")
        }
        None => "the key it follows is gone".to_owned(),
    }))
}

pub(crate) fn task(row: &impl Cols) -> Result<TaskRecord, StoreError> {
    Ok(TaskRecord {
        id: row.text("id")?,
        parent: row.opt_text("parent_id")?,
        agent: serde_json::from_str(&row.text("agent")?).map_err(corrupt)?,
        actor: row
            .opt_text("actor")?
            .map(|a| serde_json::from_str(&a))
            .transpose()
            .map_err(corrupt)?,
        may_act: row
            .opt_text("may_act")?
            .map(|m| serde_json::from_str(&m))
            .transpose()
            .map_err(corrupt)?
            .unwrap_or_default(),
        grants: row.text("grants")?,
        held: row.opt_text("held")?.unwrap_or_default(),
        purpose: row.text("purpose")?,
        environment: row.text("environment")?,
        depth: u32::try_from(row.int("depth")?).unwrap_or(u32::MAX),
        token_jti: row.text("token_jti")?,
        created_at: row.uint("created_at")?,
        expires_at: row.uint("expires_at")?,
        ended_at: row.opt_uint("ended_at")?,
        end_reason: row.opt_text("end_reason")?,
    })
}

/// The columns [`task`] reads and `revoked`, an integer that is 0 when
/// the token was not revoked on its own ([`crate::Store::token_task`]).
pub(crate) fn token_task(row: &impl Cols) -> Result<(TaskRecord, bool), StoreError> {
    Ok((task(row)?, row.int("revoked")? != 0))
}

pub(crate) fn approval(row: &impl Cols) -> Result<Approval, StoreError> {
    let state = row.text("state")?;
    Ok(Approval {
        id: row.text("id")?,
        task_id: row.text("task_id")?,
        tool: row.text("tool")?,
        actions: row.text("actions")?,
        approvable: row.opt_text("approvable")?,
        state: Approval::parse_state(&state)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown approval state `{state}`")))?,
        created_at: row.uint("created_at")?,
        expires_at: row.uint("expires_at")?,
        decided_by: row.opt_text("decided_by")?,
        decided_at: row.opt_uint("decided_at")?,
        reason: row.opt_text("reason")?,
        token_jti: row.opt_text("token_jti")?,
    })
}

/// An audit record from `seq, hash, record`.
pub(crate) fn audit_event(row: &impl Cols) -> Result<AuditEvent, StoreError> {
    let mut event: AuditEvent = serde_json::from_str(&row.text("record")?).map_err(corrupt)?;
    event.seq = row.int("seq")?;
    event.hash = Some(row.text("hash")?);
    Ok(event)
}

pub(crate) fn stored_record(row: &impl Cols) -> Result<StoredRecord, StoreError> {
    Ok(StoredRecord {
        seq: row.int("seq")?,
        chain_id: row.text("chain_id")?,
        chain_seq: row.uint("chain_seq")?,
        hash: row.text("hash")?,
        record: row.text("record")?,
        columns: crate::IndexedColumns {
            at_ms: row.uint("at_ms")?,
            event: row.text("event")?,
            decision: row.opt_text("decision")?,
            agent_iss: row.opt_text("agent_iss")?,
            agent_sub: row.opt_text("agent_sub")?,
            task_id: row.opt_text("task_id")?,
            parent_id: row.opt_text("parent_id")?,
            tool: row.opt_text("tool")?,
            jti: row.opt_text("jti")?,
            replica: row.text("replica")?,
        },
    })
}

pub(crate) fn chain_link(row: &impl Cols) -> Result<ChainLink, StoreError> {
    Ok(ChainLink {
        chain_id: row.text("chain_id")?,
        chain_seq: row.uint("chain_seq")?,
        hash: row.text("hash")?,
    })
}

/// The links of a `chain.started` record, from its `record` column. An
/// unreadable record yields none: the verification pass reports it.
pub(crate) fn genesis_links(row: &impl Cols) -> Result<Vec<ChainLink>, StoreError> {
    Ok(serde_json::from_str::<AuditEvent>(&row.text("record")?)
        .map(|e| e.links)
        .unwrap_or_default())
}

/// A revocation as stored. A kind this version does not know (a newer
/// scrip's, in a rolling upgrade) is [`StoreError::Corrupt`]: served as a
/// token's, it would pass a follower's check of unknown event types.
pub(crate) fn revocation(row: &impl Cols) -> Result<Revocation, StoreError> {
    let kind = row.text("kind")?;
    Ok(Revocation {
        seq: row.int("seq")?,
        kind: match kind.as_str() {
            "task" => RevocationKind::Task,
            "token" => RevocationKind::Token,
            other => {
                return Err(StoreError::Corrupt(format!(
                    "a revocation of a kind this scrip does not know (`{}`): a newer scrip's?",
                    other.escape_debug()
                )));
            }
        },
        txn: row.text("txn")?,
        jti: row.opt_text("jti")?,
        exp: row.uint("exp")?,
    })
}

/// A value bound to a statement built at run time.
pub(crate) enum Arg {
    Text(String),
    Int(i64),
}

/// `query` with `args` bound in their order.
pub(crate) fn bind_all<DB: sqlx::Database>(
    query: sqlx::query::Query<'_, DB, <DB as sqlx::Database>::Arguments>,
    args: Vec<Arg>,
) -> sqlx::query::Query<'_, DB, <DB as sqlx::Database>::Arguments>
where
    String: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
    i64: for<'t> sqlx::Encode<'t, DB> + sqlx::Type<DB>,
{
    args.into_iter().fold(query, |query, arg| match arg {
        Arg::Text(t) => query.bind(t),
        Arg::Int(i) => query.bind(i),
    })
}

/// The first record (lowest `seq`) stamped at or after `$1`, a query's
/// `since_ms`, read through the `audit_time` index: a query with `since_ms`
/// starts there rather than reading the trail from its first record (the
/// `seq` order it is read in leaves `audit_time` unused). Exact whatever
/// the writers' clocks: no record before it is stamped that late. (`seq +
/// 0`: PostgreSQL would otherwise find the least `seq` by reading the key
/// from its start until a record matches, the whole trail before `$1`.)
pub(crate) const FIRST_SINCE: &str = "SELECT MIN(seq + 0) FROM audit WHERE at_ms >= $1";

/// Where a query of `filter` starts: after the record before the first one
/// [`FIRST_SINCE`] found (`first`) or, with none found, after every record
/// (no record is stamped that late).
pub(crate) fn since_floor(first: Option<i64>) -> i64 {
    first.map_or(i64::MAX, |seq| seq.saturating_sub(1))
}

/// The query of [`crate::Store::open_tasks`], with only the conditions it
/// is given, as [`audit_query`] and for the same reason: with the agent's
/// subject a constant of the SQL's shape, rather than `(? IS NULL OR
/// agent_sub = ?)`, both backends seek the `tasks_agent_open` index (open
/// tasks by subject and deadline) to the next page instead of reading every
/// open task or every task the agent ever started.
///
/// With `actor`, a subject and the backend's SQL for the subject of a
/// task's current actor (the outermost `act` of its stored JSON), only the
/// sub-tasks that actor acts in: every open task is looked at then (no
/// index holds actors), which only the operator's `task revoke` asks.
pub(crate) fn open_tasks_query(
    now: u64,
    agent_sub: Option<&str>,
    actor: Option<(&str, &str)>,
    after: Option<(u64, &str)>,
    limit: u32,
    param: impl Fn(usize) -> String,
) -> (String, Vec<Arg>) {
    let mut args = vec![Arg::Int(to_i64(now))];
    let mut sql = format!(
        concat!(
            "SELECT ",
            task_columns!(),
            " FROM tasks WHERE ended_at IS NULL AND expires_at > {}"
        ),
        param(1)
    );
    if let Some(agent) = agent_sub {
        args.push(Arg::Text(agent.to_owned()));
        sql.push_str(&format!(" AND agent_sub = {}", param(args.len())));
    }
    if let Some((sub, current_actor)) = actor {
        args.push(Arg::Text(sub.to_owned()));
        sql.push_str(&format!(
            " AND parent_id IS NOT NULL AND actor IS NOT NULL AND {current_actor} = {}",
            param(args.len())
        ));
    }
    if let Some((at, id)) = after {
        args.push(Arg::Int(to_i64(at)));
        let at = param(args.len());
        args.push(Arg::Text(id.to_owned()));
        let id = param(args.len());
        sql.push_str(&format!(
            " AND (expires_at > {at} OR (expires_at = {at} AND id > {id}))"
        ));
    }
    args.push(Arg::Int(i64::from(limit)));
    sql.push_str(&format!(
        " ORDER BY expires_at, id LIMIT {}",
        param(args.len())
    ));
    (sql, args)
}

/// [`audit_query`]'s `in_chain` for SQLite. A stored record that is not
/// JSON (only an edit of the database makes one) matches nothing rather
/// than failing the query: `audit verify` is what reports it.
pub(crate) fn sqlite_in_chain(p: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM json_each(CASE WHEN json_valid(record) THEN record END, '$.chain') \
         WHERE value = {p})"
    )
}

/// [`audit_query`]'s `in_chain` for PostgreSQL: read as `json`, which
/// keeps the text as it is (`jsonb` refuses a `\u0000` that serde_json may
/// write).
pub(crate) fn postgres_in_chain(p: &str) -> String {
    format!(
        "EXISTS (SELECT 1 FROM json_array_elements_text(CASE WHEN json_typeof(record::json -> 'chain') = 'array' \
         THEN record::json -> 'chain' END) AS c(v) WHERE c.v = {p})"
    )
}

/// The audit query for `filter`, with only the conditions it sets, so that
/// each can use its index (`audit_task`, `audit_agent` and `audit_tool` are
/// `(column, seq)`): a condition written `(? IS NULL OR task_id = ?)` is
/// planned once for every value, and then reads the table in `seq` order,
/// all of it when matches are rare. `param(n)` writes the n-th placeholder
/// (`?n`, `$n`); the values come back in their order. Nothing of the filter
/// goes into the SQL itself.
///
/// `floor` is [`since_floor`] for a filter with `since_ms`: only records
/// after it are read. `in_chain(p)` is the backend's condition that the
/// record's `chain` (a JSON array in its `record`) holds placeholder `p`'s
/// value.
pub(crate) fn audit_query(
    filter: &crate::AuditFilter,
    floor: Option<i64>,
    param: impl Fn(usize) -> String,
    in_chain: impl Fn(&str) -> String,
) -> (String, Vec<Arg>) {
    let after = filter.after_seq.unwrap_or(0).max(floor.unwrap_or(0));
    let mut args = vec![Arg::Int(after)];
    let mut sql = format!(
        "SELECT seq, hash, record FROM audit WHERE seq > {}",
        param(1)
    );
    let mut and = |condition: &str, arg: Arg| {
        args.push(arg);
        sql.push_str(&format!(" AND {condition} {}", param(args.len())));
    };
    for (column, value) in [
        ("task_id =", &filter.task_id),
        ("agent_sub =", &filter.agent_sub),
        ("agent_iss =", &filter.agent_iss),
        ("tool =", &filter.tool),
        ("decision =", &filter.decision),
        ("event =", &filter.event),
        ("jti =", &filter.jti),
    ] {
        if let Some(v) = value {
            and(column, Arg::Text(v.clone()));
        }
    }
    if let Some(since) = filter.since_ms {
        and("at_ms >=", Arg::Int(to_i64(since)));
    }
    if let Some(until) = filter.until_ms {
        and("at_ms <", Arg::Int(to_i64(until)));
    }
    if let Some(actor) = &filter.actor {
        args.push(Arg::Text(actor.clone()));
        sql.push_str(&format!(" AND {}", in_chain(&param(args.len()))));
    }
    args.push(Arg::Int(i64::from(filter.limit.unwrap_or(10_000))));
    sql.push_str(&format!(" ORDER BY seq LIMIT {}", param(args.len())));
    (sql, args)
}

/// The head of every chain not yet linked as far as it has gone, for a new
/// chain's `chain.started` to link, the same SQL for both backends: a skip
/// scan over the `(chain_id, chain_seq)` index, one probe a chain (a GROUP
/// BY takes ~0.1 s per million records, and this runs at every start). A
/// head some earlier chain start links already is covered through that
/// chain, so linking every head every time would only make each first
/// record, and all of them together, grow with the square of the chains.
/// The table is bookkeeping that verification never reads (it reads the
/// links in the records): a value other than the head, which only an edit
/// of the table makes (one past the head would otherwise stop every later
/// start from linking the chain, leaving its tail open to truncation for
/// good), links the head again.
pub(crate) const UNLINKED_HEADS: &str = "WITH RECURSIVE chains(id) AS (SELECT MIN(chain_id) FROM audit \
     UNION ALL SELECT (SELECT MIN(chain_id) FROM audit WHERE chain_id > chains.id) \
     FROM chains WHERE chains.id IS NOT NULL) \
     SELECT a.chain_id, a.chain_seq, a.hash FROM chains JOIN audit a ON a.chain_id = chains.id \
     AND a.chain_seq = (SELECT MAX(chain_seq) FROM audit WHERE chain_id = chains.id) \
     LEFT JOIN chain_links l ON l.chain_id = a.chain_id \
     WHERE l.chain_seq IS NULL OR l.chain_seq <> a.chain_seq \
     ORDER BY a.seq";

/// A row when task `$1` has ended: a single use claimed, or an ending made,
/// after another ending committed is refused (the writers serialise
/// commits, so this sees every earlier one).
/// The root of the tree of task `$1` (itself for a root, or for a task an
/// older scrip stored), when it has not ended.
pub(crate) const TASK_OPEN_ROOT: &str =
    "SELECT COALESCE(root_id, id) FROM tasks WHERE id = $1 AND ended_at IS NULL";

/// Counts one more sub-task in root `$1`'s tree, unless it holds `$2`
/// already: changes no row then.
pub(crate) const COUNT_SUBTASK: &str =
    "UPDATE tasks SET subtasks = subtasks + 1 WHERE id = $1 AND subtasks < $2";

/// The sub-tasks counted at the root of task `$1`'s tree.
pub(crate) const TREE_SIZE: &str = "SELECT r.subtasks FROM tasks t \
     JOIN tasks r ON r.id = COALESCE(t.root_id, t.id) WHERE t.id = $1";

/// The conflict of a sub-task whose tree is full.
pub(crate) fn too_many_subtasks(root: &str) -> StoreError {
    StoreError::Conflict(format!(
        "the tree of task {root} holds {} sub-tasks, the most it may",
        crate::MAX_SUBTASKS
    ))
}

pub(crate) const TASK_ENDED: &str = "SELECT 1 FROM tasks WHERE id = $1 AND ended_at IS NOT NULL";

/// The ids of task `$1`'s denied approvals decided at or after `$2` (see
/// [`crate::Write::NoNewDenial`]).
pub(crate) const TASK_DENIED_SINCE: &str =
    "SELECT id FROM approvals WHERE state = 'denied' AND task_id = $1 AND decided_at >= $2";

/// [`StoreError::Conflict`] when `denied` (the ids [`TASK_DENIED_SINCE`]
/// found) holds one not in `seen`.
pub(crate) fn refuse_new_denial(
    task: &str,
    denied: &[String],
    seen: &[String],
) -> Result<(), StoreError> {
    match denied.iter().find(|id| !seen.contains(id)) {
        Some(id) => Err(StoreError::Conflict(format!(
            "approval {id} of task {task} was denied after the denials were read"
        ))),
        None => Ok(()),
    }
}

/// Records how far a chain start links a chain (`$1` the chain, `$2` the
/// position); SQLite's, run in process once a link (PostgreSQL writes them
/// all in one statement).
pub(crate) const LINKED: &str = "INSERT INTO chain_links (chain_id, chain_seq) VALUES ($1, $2) \
     ON CONFLICT (chain_id) DO UPDATE SET chain_seq = excluded.chain_seq \
     WHERE chain_links.chain_seq <> excluded.chain_seq";

/// Stores a writer's signed chain head (`$1`..`$5`: chain, position, hash,
/// time, signature) in the commit that moved it: one row a chain, replaced
/// each time.
pub(crate) const SIGNED_HEAD: &str = "INSERT INTO audit_heads (chain_id, chain_seq, hash, at_ms, signature) \
     VALUES ($1, $2, $3, $4, $5) \
     ON CONFLICT (chain_id) DO UPDATE SET chain_seq = excluded.chain_seq, hash = excluded.hash, \
     at_ms = excluded.at_ms, signature = excluded.signature";

/// Replaces a writer's signed chain head (`$1`..`$5` as in
/// [`SIGNED_HEAD`]) only where the row still holds the head its last commit
/// stored (`$6`, `$7`: position and hash): one row changed, or the store was
/// rolled back under the writer. The parameters appear in order (SQLite
/// numbers `$N` parameters as they first appear).
pub(crate) const SIGNED_HEAD_OVER: &str = "UPDATE audit_heads SET chain_id = $1, chain_seq = $2, \
     hash = $3, at_ms = $4, signature = $5 WHERE chain_id = $1 AND chain_seq = $6 AND hash = $7";

/// The last position of chain `$1` the store holds, up to `$2` (0: none),
/// where `$2` itself counts only with the hash `$3` its writer committed:
/// a record rewritten in place is not held. Among the records verification
/// reads: a row moved to a sequence number of 0 or below (which no writer
/// gives) is not held either. (SQLite numbers `$N` parameters as they
/// first appear, so they appear in order.)
pub(crate) const HELD_UP_TO: &str = "SELECT COALESCE(MAX(chain_seq), 0) FROM audit \
     WHERE chain_id = $1 AND chain_seq <= $2 AND seq > 0 AND (chain_seq < $2 OR hash = $3)";

/// [`StoreError::RolledBack`] unless the guarded head update
/// ([`SIGNED_HEAD_OVER`]) changed `changed == 1` row.
pub(crate) fn head_replaced(changed: u64, over: &crate::ChainLink) -> Result<(), StoreError> {
    if changed == 1 {
        return Ok(());
    }
    Err(StoreError::RolledBack(format!(
        "it no longer holds record #{} of audit chain {}, which this process committed",
        over.chain_seq, over.chain_id
    )))
}

/// The newest checkpoint of each chain, the same SQL for both backends: a
/// skip scan over the `(chain_id, chain_seq)` index, one probe a chain;
/// then every signed head (a chain may appear twice: the verifier checks
/// both).
pub(crate) const LATEST_CHECKPOINTS: &str = "WITH RECURSIVE chains(id) AS \
     (SELECT MIN(chain_id) FROM audit_checkpoints \
     UNION ALL SELECT (SELECT MIN(chain_id) FROM audit_checkpoints WHERE chain_id > chains.id) \
     FROM chains WHERE chains.id IS NOT NULL) \
     SELECT c.chain_id, c.chain_seq, c.hash, c.at_ms, c.signature FROM chains \
     JOIN audit_checkpoints c ON c.chain_id = chains.id \
     AND c.chain_seq = (SELECT MAX(chain_seq) FROM audit_checkpoints WHERE chain_id = chains.id) \
     UNION ALL SELECT chain_id, chain_seq, hash, at_ms, signature FROM audit_heads \
     ORDER BY 1, 2";

pub(crate) fn checkpoint(row: &impl Cols) -> Result<Checkpoint, StoreError> {
    Ok(Checkpoint {
        chain_id: row.text("chain_id")?,
        chain_seq: row.uint("chain_seq")?,
        hash: row.text("hash")?,
        at_ms: row.uint("at_ms")?,
        signature: row.text("signature")?,
    })
}

pub(crate) fn key(row: &impl Cols) -> Result<StoredKey, StoreError> {
    let purpose = row.text("purpose")?;
    Ok(StoredKey {
        kid: row.text("kid")?,
        purpose: KeyPurpose::parse(&purpose)
            .ok_or_else(|| StoreError::Corrupt(format!("unknown key purpose `{purpose}`")))?,
        alg: row.text("alg")?,
        public_jwk: row.text("public_jwk")?,
        sealed: row.text("sealed")?,
        created_at: row.uint("created_at")?,
        active_at: row.uint("active_at")?,
        retired_at: row.opt_uint("retired_at")?,
        publish_until: row.opt_uint("publish_until")?,
    })
}

pub(crate) fn secret(row: &impl Cols) -> Result<SecretRecord, StoreError> {
    let version = row.int("version")?;
    Ok(SecretRecord {
        name: row.text("name")?,
        action: row.text("action")?,
        version: u32::try_from(version)
            .map_err(|_| StoreError::Corrupt(format!("secret version {version}")))?,
        sealed: row.bytes("sealed")?,
        created_at: row.uint("created_at")?,
        retired_at: row.opt_uint("retired_at")?,
    })
}

/// The task's agent, actor and `may_act` as stored (JSON).
pub(crate) fn task_json(
    t: &TaskRecord,
) -> Result<(String, Option<String>, Option<String>), StoreError> {
    let unavailable = |e: serde_json::Error| StoreError::Unavailable(e.to_string());
    let agent = serde_json::to_string(&t.agent).map_err(unavailable)?;
    let actor = t
        .actor
        .as_ref()
        .map(serde_json::to_string)
        .transpose()
        .map_err(unavailable)?;
    let may_act = (!t.may_act.is_empty())
        .then(|| serde_json::to_string(&t.may_act))
        .transpose()
        .map_err(unavailable)?;
    Ok((agent, actor, may_act))
}

/// The conflict of storing `secret` when its version, or a later one, is
/// already stored: another process stored one since this one read.
pub(crate) fn secret_version_taken(secret: &crate::SecretRecord) -> StoreError {
    StoreError::Conflict(format!(
        "secret `{}` `{}` version {} was stored by another process meanwhile",
        secret.name, secret.action, secret.version
    ))
}
