//! One behaviour, two backends: every test here runs against the embedded
//! SQLite store and against PostgreSQL (a fresh database of the test's own
//! on the machine's server, started when it is not running). A difference
//! between the backends is a failure of one of them.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code"
)]

use std::collections::BTreeMap;
use std::sync::Arc;

use scrip_store::{
    Approval, ApprovalState, AuditEvent, AuditFilter, Checkpoint, KeyPurpose, PgStore, Revocation,
    RevocationKind, SecretRecord, SqliteStore, Store, StoreError, StoredKey, TaskRecord, Write,
};
use scrip_testkit::PgDatabase;
use scrip_token::{Actor, IdentityKind, MayAct, WorkloadIdentity};

/// A store and what keeps its database alive.
struct Fixture {
    store: Arc<dyn Store>,
    place: Place,
}

enum Place {
    Sqlite(tempfile::TempDir),
    Postgres(PgDatabase),
}

impl Fixture {
    async fn sqlite() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = SqliteStore::open_in(dir.path()).await.unwrap();
        Self {
            store: Arc::new(store),
            place: Place::Sqlite(dir),
        }
    }

    async fn postgres() -> Self {
        let db = PgDatabase::new();
        let store = PgStore::connect(db.url()).await.unwrap();
        Self {
            store: Arc::new(store),
            place: Place::Postgres(db),
        }
    }

    /// Runs `statement` on the database behind the store's back, as a
    /// restore or a failover would change it.
    async fn exec(&self, statement: &str) {
        use sqlx::{ConnectOptions as _, Connection as _};
        let statement = sqlx::AssertSqlSafe(statement.to_owned());
        match &self.place {
            Place::Sqlite(dir) => {
                let mut conn = sqlx::sqlite::SqliteConnectOptions::new()
                    .filename(dir.path().join("scrip.db"))
                    .connect()
                    .await
                    .unwrap();
                sqlx::query(statement).execute(&mut conn).await.unwrap();
                conn.close().await.unwrap();
            }
            Place::Postgres(db) => {
                let mut conn = sqlx::PgConnection::connect(db.url()).await.unwrap();
                sqlx::query(statement).execute(&mut conn).await.unwrap();
                conn.close().await.unwrap();
            }
        }
    }

    /// A second writer on the same database, as another replica would be.
    async fn replica(&self) -> Arc<dyn Store> {
        match &self.place {
            Place::Sqlite(dir) => Arc::new(SqliteStore::open_in(dir.path()).await.unwrap()),
            Place::Postgres(db) => Arc::new(PgStore::connect(db.url()).await.unwrap()),
        }
    }
}

macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Fixture::sqlite().await).await }) *
        }
        mod postgres {
            $(#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $name() { super::$name(super::Fixture::postgres().await).await }) *
        }
    };
}

conformance!(
    a_task_reads_back_as_written,
    a_failed_commit_changes_nothing,
    ending_a_task_ends_its_descendants_and_feeds_revocations,
    a_child_never_outlives_its_ended_parent,
    a_task_tree_holds_at_most_max_subtasks,
    nothing_is_recorded_under_an_ended_task,
    a_task_event_outlasts_the_deadline_by_the_grace,
    the_end_of_an_expired_task_is_announced_once_within_the_grace,
    ending_a_task_announces_sub_tasks_that_just_reached_their_deadline,
    revoking_a_token_twice_feeds_it_once,
    a_token_reads_with_its_task_and_its_revocation,
    a_single_use_token_is_claimed_exactly_once,
    a_dpop_proof_is_spent_once_across_writers,
    used_dpop_proofs_are_purged_past_their_time,
    expired_revocations_leave_the_feed_and_are_purged,
    a_purge_drops_a_backlog_a_chunk_at_a_time,
    a_long_feed_reads_back_in_order,
    due_tasks_come_oldest_first,
    open_tasks_list_what_still_runs,
    open_tasks_acted_by_list_what_a_sub_agent_holds,
    the_first_decision_on_an_approval_wins,
    a_step_waits_for_a_person_once,
    a_denial_since_the_read_refuses_the_commit,
    a_task_has_at_most_ten_steps_waiting,
    agent_denials_are_an_agents_latest_at_a_tool,
    an_agent_has_at_most_fifty_steps_waiting,
    a_sub_agent_has_at_most_ten_steps_waiting_for_an_agent,
    concurrent_commits_chain_and_verify,
    two_writers_chain_and_verify,
    audit_queries_filter,
    a_query_since_a_time_reads_from_its_first_record,
    checkpoints_and_chain_links_read_back,
    every_commit_signs_its_head_once_a_signer_is_set,
    a_store_rolled_back_under_its_writer_is_noticed_and_recorded,
    a_live_tail_rewritten_or_hidden_is_named_lost,
    keys_are_published_until_their_time,
    a_key_is_added_only_after_the_newest_its_writer_saw,
    commits_signal_what_changed,
    secrets_keep_their_versions,
    a_sealed_value_is_replaced_only_as_read,
);

fn identity(sub: &str) -> WorkloadIdentity {
    WorkloadIdentity {
        issuer: "https://idp.test".into(),
        subject: sub.into(),
        kind: IdentityKind::Generic,
        attributes: BTreeMap::from([("repository".into(), "acme/app".into())]),
        claims: BTreeMap::from([("sub".into(), sub.into())]),
    }
}

fn task(id: &str, parent: Option<&str>, expires_at: u64) -> TaskRecord {
    TaskRecord {
        id: id.into(),
        parent: parent.map(Into::into),
        agent: identity("agent-1"),
        actor: parent.map(|_| Actor {
            sub: "sub-agent".into(),
            iss: Some("https://idp.test".into()),
            act: None,
        }),
        may_act: vec![MayAct {
            sub: "sub-agent".into(),
            iss: None,
        }],
        grants: "github:read jira:write".into(),
        held: "jira:write".into(),
        purpose: "fix JIRA-1".into(),
        environment: "dev".into(),
        depth: u32::from(parent.is_some()),
        token_jti: format!("jti-{id}"),
        created_at: 1_000,
        expires_at,
        ended_at: None,
        end_reason: None,
    }
}

fn audit(event: &str, task: Option<&str>) -> Write {
    Write::Audit(Box::new(AuditEvent {
        at_ms: 1_000_000,
        event: event.into(),
        decision: Some("allow".into()),
        agent_sub: Some("agent-1".into()),
        task_id: task.map(Into::into),
        tool: Some("github".into()),
        replica: "test".into(),
        ..AuditEvent::default()
    }))
}

async fn all_audit(store: &dyn Store) -> Vec<AuditEvent> {
    store.audit(&AuditFilter::default()).await.unwrap()
}

async fn verify(store: &dyn Store) -> scrip_store::Report {
    let rows = store.audit_rows(0, u32::MAX).await.unwrap();
    let checkpoints = store.latest_checkpoints().await.unwrap();
    scrip_store::verify(&rows, &checkpoints, |_| true)
}

async fn a_task_reads_back_as_written(f: Fixture) {
    let s = &f.store;
    let parent = task("t1", None, 5_000);
    let child = task("t2", Some("t1"), 4_000);
    s.commit(vec![
        Write::InsertTask(Box::new(parent.clone())),
        Write::InsertTask(Box::new(child.clone())),
    ])
    .await
    .unwrap();
    assert_eq!(s.task("t1").await.unwrap(), Some(parent));
    assert_eq!(s.task("t2").await.unwrap(), Some(child));
    assert_eq!(s.task("nope").await.unwrap(), None);
    assert_eq!(s.open_descendants("t1").await.unwrap(), vec!["t2"]);
}

async fn a_failed_commit_changes_nothing(f: Fixture) {
    let s = &f.store;
    s.commit(vec![
        Write::InsertTask(Box::new(task("t1", None, 5_000))),
        audit("task.started", Some("t1")),
    ])
    .await
    .unwrap();
    let before = all_audit(s.as_ref()).await;
    let head = s.chain_head();
    // The audit record comes first: it must be rolled back with the rest.
    let err = s
        .commit(vec![
            audit("task.started", Some("t1")),
            Write::InsertTask(Box::new(task("t1", None, 6_000))),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(all_audit(s.as_ref()).await, before);
    assert_eq!(s.chain_head(), head);
    assert_eq!(s.task("t1").await.unwrap().unwrap().expires_at, 5_000);
    // And the store goes on writing the same chain.
    s.commit(vec![audit("token.issued", Some("t1"))])
        .await
        .unwrap();
    assert!(verify(s.as_ref()).await.problems.is_empty());
}

/// [`Write::TaskOpen`] refuses a commit once the task has ended, changing
/// nothing; commits racing the end are each on one side of it, however
/// the store batches them.
async fn nothing_is_recorded_under_an_ended_task(f: Fixture) {
    let s = &f.store;
    s.commit(vec![
        Write::InsertTask(Box::new(task("t1", None, 9_000))),
        Write::InsertTask(Box::new(task("t2", None, 9_000))),
    ])
    .await
    .unwrap();
    let issue = |id: &str| {
        vec![
            audit("token.issued", Some(id)),
            Write::TaskOpen { id: id.into() },
        ]
    };
    s.commit(issue("t1")).await.unwrap();
    // A task no store holds has not ended.
    s.commit(issue("nope")).await.unwrap();
    s.commit(vec![Write::EndTask {
        id: "t1".into(),
        at: 2_000,
        reason: "revoked".into(),
        grace: 0,
    }])
    .await
    .unwrap();
    let before = all_audit(s.as_ref()).await;
    let err = s.commit(issue("t1")).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(all_audit(s.as_ref()).await, before);
    // Racing: issues before and after the end, queued in this order and
    // committed together: those before it are recorded, those after it
    // refused, however the store batches them.
    let mut commits = Vec::new();
    for i in 0..40 {
        let writes = if i == 20 {
            vec![
                audit("task.ended", Some("t2")),
                Write::EndTask {
                    id: "t2".into(),
                    at: 2_100,
                    reason: "revoked".into(),
                    grace: 0,
                },
            ]
        } else {
            issue("t2")
        };
        commits.push(s.commit(writes));
    }
    let results = in_order(commits).await;
    for (i, r) in results.iter().enumerate() {
        match (i.cmp(&20), r) {
            (std::cmp::Ordering::Less | std::cmp::Ordering::Equal, Ok(()))
            | (std::cmp::Ordering::Greater, Err(StoreError::Conflict(_))) => {}
            _ => panic!("commit {i}: {r:?}"),
        }
    }
    let refused = 19;
    let audit = all_audit(s.as_ref()).await;
    let t2 = |event: &str| {
        audit
            .iter()
            .filter(|a| a.event == event && a.task_id.as_deref() == Some("t2"))
            .map(|a| a.seq)
            .collect::<Vec<_>>()
    };
    let ended = t2("task.ended");
    let issued = t2("token.issued");
    assert_eq!(ended.len(), 1);
    assert_eq!(issued.len() + refused, 39, "{issued:?}");
    assert!(
        issued.iter().all(|seq| *seq < ended[0]),
        "{issued:?} {ended:?}"
    );
    // Within one commit, a task must be open where its `TaskOpen` stands:
    // another task's ending before it, and its own after it, do not refuse
    // it; its own before it does.
    s.commit(vec![
        Write::InsertTask(Box::new(task("t3", None, 9_000))),
        Write::InsertTask(Box::new(task("t4", None, 9_000))),
        Write::InsertTask(Box::new(task("t5", None, 9_000))),
    ])
    .await
    .unwrap();
    let end = |id: &str| Write::EndTask {
        id: id.into(),
        at: 2_200,
        reason: "revoked".into(),
        grace: 0,
    };
    let mut writes = vec![end("t3")];
    writes.extend(issue("t4"));
    writes.push(end("t4"));
    s.commit(writes).await.unwrap();
    let mut writes = vec![end("t5")];
    writes.extend(issue("t5"));
    let err = s.commit(writes).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert!(verify(s.as_ref()).await.problems.is_empty());
}

/// Runs `commits` together, each first polled (and so queued) in order;
/// their results, in that order.
async fn in_order<T>(
    commits: Vec<std::pin::Pin<Box<dyn std::future::Future<Output = T> + Send + '_>>>,
) -> Vec<T> {
    use std::task::Poll;
    let mut commits: Vec<_> = commits.into_iter().map(Some).collect();
    let mut results: Vec<Option<T>> = commits.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        for (c, r) in commits.iter_mut().zip(results.iter_mut()) {
            if let Some(f) = c
                && let Poll::Ready(v) = f.as_mut().poll(cx)
            {
                *r = Some(v);
                *c = None;
            }
        }
        if results.iter().all(Option::is_some) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    })
    .await;
    results.into_iter().flatten().collect()
}

async fn ending_a_task_ends_its_descendants_and_feeds_revocations(f: Fixture) {
    let s = &f.store;
    s.commit(vec![
        Write::InsertTask(Box::new(task("root", None, 9_000))),
        Write::InsertTask(Box::new(task("child", Some("root"), 8_000))),
        Write::InsertTask(Box::new(task("grandchild", Some("child"), 7_000))),
        Write::InsertTask(Box::new(task("other", None, 9_000))),
    ])
    .await
    .unwrap();
    // Ending a child leaves its parent alone.
    s.commit(vec![Write::EndTask {
        id: "grandchild".into(),
        at: 2_000,
        reason: "revoked".into(),
        grace: 0,
    }])
    .await
    .unwrap();
    assert_eq!(s.task("child").await.unwrap().unwrap().ended_at, None);
    s.commit(vec![Write::EndTask {
        id: "root".into(),
        at: 2_100,
        reason: "revoked".into(),
        grace: 0,
    }])
    .await
    .unwrap();
    let root = s.task("root").await.unwrap().unwrap();
    let child = s.task("child").await.unwrap().unwrap();
    let grandchild = s.task("grandchild").await.unwrap().unwrap();
    assert_eq!(
        (root.ended_at, root.end_reason.as_deref()),
        (Some(2_100), Some("revoked"))
    );
    assert_eq!(
        (child.ended_at, child.end_reason.as_deref()),
        (Some(2_100), Some("parent ended"))
    );
    assert_eq!(grandchild.ended_at, Some(2_000), "ended once, first time");
    assert_eq!(s.task("other").await.unwrap().unwrap().ended_at, None);
    assert!(s.open_descendants("root").await.unwrap().is_empty());
    let feed = s.revocations(0, 2_200, 100).await.unwrap();
    let mut txns: Vec<(&str, RevocationKind)> =
        feed.iter().map(|r| (r.txn.as_str(), r.kind)).collect();
    assert_eq!(txns.remove(0), ("grandchild", RevocationKind::Task));
    txns.sort_by_key(|t| t.0);
    assert_eq!(
        txns,
        [
            ("child", RevocationKind::Task),
            ("root", RevocationKind::Task)
        ]
    );
    assert!(feed.windows(2).all(|w| w[0].seq < w[1].seq));
    assert_eq!(s.latest_revocation().await.unwrap(), feed[2].seq);
    // Ending it again adds nothing.
    s.commit(vec![Write::EndTask {
        id: "root".into(),
        at: 2_300,
        reason: "revoked".into(),
        grace: 0,
    }])
    .await
    .unwrap();
    assert_eq!(s.revocations(0, 2_300, 100).await.unwrap().len(), 3);
    // Ending it only if open: a conflict that changes nothing, audit record
    // included, so that of two endings racing one is recorded.
    let err = s
        .commit(vec![
            Write::EndOpenTask {
                id: "root".into(),
                at: 2_400,
                reason: "expired".into(),
                grace: 0,
            },
            audit("task.expired", Some("root")),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(
        s.task("root").await.unwrap().unwrap().end_reason.as_deref(),
        Some("revoked")
    );
    assert!(
        !s.audit(&AuditFilter::default())
            .await
            .unwrap()
            .iter()
            .any(|a| a.event == "task.expired"),
        "the refused ending left no record"
    );
    // An open one ends as with `EndTask`.
    s.commit(vec![Write::EndOpenTask {
        id: "other".into(),
        at: 2_400,
        reason: "expired".into(),
        grace: 0,
    }])
    .await
    .unwrap();
    assert!(s.task("other").await.unwrap().unwrap().ended_at.is_some());
}

async fn a_child_never_outlives_its_ended_parent(f: Fixture) {
    let s = &f.store;
    s.commit(vec![
        Write::InsertTask(Box::new(task("root", None, 9_000))),
        Write::InsertTask(Box::new(task("child", Some("root"), 8_000))),
    ])
    .await
    .unwrap();
    // Delegations racing the end of the parent: each commits only if the
    // parent is still open then, and the end finds every one that did.
    let mut handles = Vec::new();
    for i in 0..40 {
        let store = f.store.clone();
        handles.push(tokio::spawn(async move {
            let parent = if i % 2 == 0 { "root" } else { "child" };
            let id = format!("sub-{i}");
            let r = store
                .commit(vec![
                    Write::InsertTask(Box::new(task(&id, Some(parent), 7_000))),
                    audit("task.delegated", Some(&id)),
                ])
                .await;
            (id, r)
        }));
        if i == 20 {
            let store = f.store.clone();
            handles.push(tokio::spawn(async move {
                let r = store
                    .commit(vec![Write::EndTask {
                        id: "root".into(),
                        at: 2_000,
                        reason: "revoked".into(),
                        grace: 0,
                    }])
                    .await;
                ("end".to_owned(), r)
            }));
        }
    }
    let mut refused = 0;
    for h in handles {
        let (id, r) = h.await.unwrap();
        match r {
            Ok(()) => {}
            Err(StoreError::Conflict(_)) if id != "end" => {
                refused += 1;
                assert_eq!(s.task(&id).await.unwrap(), None, "{id}");
            }
            Err(e) => panic!("{id}: {e:?}"),
        }
    }
    for i in 0..40 {
        if let Some(t) = s.task(&format!("sub-{i}")).await.unwrap() {
            assert_eq!(t.ended_at, Some(2_000), "sub-{i} outlived its parent");
        }
    }
    assert!(s.open_descendants("root").await.unwrap().is_empty());
    // Refused delegations left no audit record.
    let delegated = all_audit(s.as_ref())
        .await
        .iter()
        .filter(|a| a.event == "task.delegated")
        .count();
    assert_eq!(delegated + refused, 40);
    // After the end, a new child of either is refused, and nothing lands.
    for parent in ["root", "child"] {
        let err = s
            .commit(vec![
                audit("task.delegated", Some("late")),
                Write::InsertTask(Box::new(task("late", Some(parent), 7_000))),
            ])
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    }
    assert_eq!(s.task("late").await.unwrap(), None);
    assert!(verify(s.as_ref()).await.problems.is_empty());
}

/// A task's tree holds at most `MAX_SUBTASKS` sub-tasks over its life,
/// counted at its root whatever their depth, and ended ones included:
/// ending a task ends its tree in one transaction, which must stay
/// bounded. Other trees are not affected.
async fn a_task_tree_holds_at_most_max_subtasks(f: Fixture) {
    let s = &f.store;
    let max = scrip_store::MAX_SUBTASKS as usize;
    assert_eq!(max, 10_000);
    s.commit(vec![
        Write::InsertTask(Box::new(task("root", None, 9_000))),
        Write::InsertTask(Box::new(task("other", None, 9_000))),
        Write::InsertTask(Box::new(task("child", Some("root"), 9_000))),
        Write::InsertTask(Box::new(task("grandchild", Some("child"), 9_000))),
    ])
    .await
    .unwrap();
    // Ended sub-tasks still count.
    s.commit(vec![Write::EndTask {
        id: "grandchild".into(),
        at: 2_000,
        reason: "revoked".into(),
        grace: 0,
    }])
    .await
    .unwrap();
    // Up to the limit, at either depth, in commits of 500: each well within
    // the 5 s a batch has on PostgreSQL (2,500 took 3–5 s on a loaded
    // 2-core machine, and failed there now and then).
    let mut made = 2;
    while made < max {
        let writes = (made..max.min(made + 500))
            .map(|i| {
                let parent = if i % 2 == 0 { "root" } else { "child" };
                Write::InsertTask(Box::new(task(&format!("sub-{i}"), Some(parent), 9_000)))
            })
            .collect::<Vec<_>>();
        made += writes.len();
        s.commit(writes).await.unwrap();
    }
    // One more, under the root or deeper, is refused, and nothing lands.
    for parent in ["root", "child", "sub-5"] {
        let err = s
            .commit(vec![
                audit("task.delegated", Some("late")),
                Write::InsertTask(Box::new(task("late", Some(parent), 9_000))),
            ])
            .await
            .unwrap_err();
        let StoreError::Conflict(message) = err else {
            panic!("{err:?}")
        };
        assert!(
            message.contains("the tree of task root holds 10000 sub-tasks"),
            "{message}"
        );
    }
    assert_eq!(s.task("late").await.unwrap(), None);
    assert!(
        !all_audit(s.as_ref())
            .await
            .iter()
            .any(|a| a.event == "task.delegated"),
        "a refused sub-task left its record"
    );
    // Another tree still takes sub-tasks.
    s.commit(vec![Write::InsertTask(Box::new(task(
        "its-own",
        Some("other"),
        9_000,
    )))])
    .await
    .unwrap();
    // The count reads the same from anywhere in a tree.
    for (id, size) in [
        ("root", Some(10_000)),
        ("grandchild", Some(10_000)),
        ("sub-5", Some(10_000)),
        ("other", Some(1)),
        ("its-own", Some(1)),
        ("nothing", None),
    ] {
        assert_eq!(s.tree_size(id).await.unwrap(), size, "{id}");
    }
    // The whole tree still ends at once.
    s.commit(vec![Write::EndOpenTask {
        id: "root".into(),
        at: 3_000,
        reason: "revoked".into(),
        grace: 0,
    }])
    .await
    .unwrap();
    assert!(s.open_descendants("root").await.unwrap().is_empty());
    assert_eq!(
        s.task("sub-9999").await.unwrap().unwrap().ended_at,
        Some(3_000)
    );
}

async fn a_task_event_outlasts_the_deadline_by_the_grace(f: Fixture) {
    // Verifiers accept a token up to their leeway past its `exp`: a task
    // ended near its deadline stays in the feed that much longer, and one
    // ended just past its deadline still gets an event.
    let s = &f.store;
    s.commit(vec![
        Write::InsertTask(Box::new(task("before", None, 3_000))),
        Write::InsertTask(Box::new(task("after", None, 3_000))),
        Write::InsertTask(Box::new(task("long-past", None, 3_000))),
    ])
    .await
    .unwrap();
    for (id, at) in [("before", 2_990), ("after", 3_010), ("long-past", 3_030)] {
        s.commit(vec![Write::EndTask {
            id: id.into(),
            at,
            reason: "revoked".into(),
            grace: 30,
        }])
        .await
        .unwrap();
    }
    let listed = |now: u64| async move {
        s.revocations(0, now, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.txn, r.exp))
            .collect::<Vec<_>>()
    };
    let both = vec![("before".to_owned(), 3_030), ("after".to_owned(), 3_030)];
    assert_eq!(listed(3_010).await, both);
    assert_eq!(listed(3_029).await, both);
    assert!(listed(3_030).await.is_empty());
    for id in ["before", "after", "long-past"] {
        assert!(
            s.task(id).await.unwrap().unwrap().ended_at.is_some(),
            "{id}"
        );
    }
}

async fn the_end_of_an_expired_task_is_announced_once_within_the_grace(f: Fixture) {
    // The sweep ends a task at its deadline without an event (its tokens
    // expire with it); a revocation of its token within the verifiers'
    // leeway publishes its end, and its child's, once.
    let s = &f.store;
    s.commit(vec![
        Write::InsertTask(Box::new(task("swept", None, 3_000))),
        Write::InsertTask(Box::new(task("swept-child", Some("swept"), 3_000))),
        Write::InsertTask(Box::new(task("open", None, 9_000))),
    ])
    .await
    .unwrap();
    s.commit(vec![Write::EndOpenTask {
        id: "swept".into(),
        at: 3_001,
        reason: "expired".into(),
        grace: 0,
    }])
    .await
    .unwrap();
    let listed = || async move {
        s.revocations(0, 3_005, 100)
            .await
            .unwrap()
            .into_iter()
            .map(|r| (r.txn, r.exp))
            .collect::<Vec<_>>()
    };
    assert!(listed().await.is_empty());
    let mut changes = s.changes();
    changes.borrow_and_update();
    let announce = |id: &str, at| Write::AnnounceEnded {
        id: id.into(),
        at,
        grace: 30,
    };
    s.commit(vec![announce("swept", 3_005)]).await.unwrap();
    assert!(changes.has_changed().unwrap(), "followers are woken");
    let both = vec![
        ("swept".to_owned(), 3_030),
        ("swept-child".to_owned(), 3_030),
    ];
    assert_eq!(listed().await, both);
    // Once: a second announcement is a conflict that changes nothing, its
    // audit record included.
    let err = s
        .commit(vec![
            announce("swept", 3_006),
            audit("task.end_published", Some("swept")),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(listed().await, both);
    assert!(
        !all_audit(s.as_ref())
            .await
            .iter()
            .any(|a| a.event == "task.end_published"),
        "the refused announcement left no record"
    );
    // Nothing for a task still open, and nothing past the grace.
    s.commit(vec![announce("open", 3_007)]).await.unwrap();
    s.commit(vec![
        Write::InsertTask(Box::new(task("late", None, 3_000))),
        Write::EndOpenTask {
            id: "late".into(),
            at: 3_001,
            reason: "expired".into(),
            grace: 0,
        },
    ])
    .await
    .unwrap();
    s.commit(vec![announce("late", 3_030)]).await.unwrap();
    assert_eq!(listed().await, both);
    assert!(s.task("open").await.unwrap().unwrap().ended_at.is_none());
}

async fn ending_a_task_announces_sub_tasks_that_just_reached_their_deadline(f: Fixture) {
    // A sub-task the sweep ended at its deadline (no event: its tokens
    // expire with it), then its parent revoked within the verifiers'
    // leeway: the sub-task's tokens must reach them too. One past the
    // leeway, or with an event already, gets none.
    let s = &f.store;
    s.commit(vec![
        Write::InsertTask(Box::new(task("parent", None, 9_000))),
        Write::InsertTask(Box::new(task("just-swept", Some("parent"), 3_000))),
        Write::InsertTask(Box::new(task("long-swept", Some("parent"), 2_000))),
        Write::InsertTask(Box::new(task("revoked", Some("parent"), 3_000))),
        Write::InsertTask(Box::new(task("open-child", Some("parent"), 9_000))),
    ])
    .await
    .unwrap();
    let end = |id: &str, at, grace| Write::EndOpenTask {
        id: id.into(),
        at,
        reason: "expired".into(),
        grace,
    };
    s.commit(vec![end("long-swept", 2_001, 0)]).await.unwrap();
    s.commit(vec![end("just-swept", 3_001, 0)]).await.unwrap();
    s.commit(vec![end("revoked", 2_500, 30)]).await.unwrap();
    s.commit(vec![end("parent", 3_005, 30)]).await.unwrap();
    let mut listed: Vec<(String, u64)> = s
        .revocations(0, 3_005, 100)
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.txn, r.exp))
        .collect();
    listed.sort();
    assert_eq!(
        listed,
        [
            ("just-swept".to_owned(), 3_030),
            ("open-child".to_owned(), 9_030),
            ("parent".to_owned(), 9_030),
            ("revoked".to_owned(), 3_030),
        ]
    );
}

async fn revoking_a_token_twice_feeds_it_once(f: Fixture) {
    let s = &f.store;
    let revoke = || Write::RevokeToken {
        jti: "j1".into(),
        task_id: "t1".into(),
        expires_at: 3_000,
        at: 1_000,
    };
    assert!(!s.token_revoked("j1").await.unwrap());
    s.commit(vec![revoke()]).await.unwrap();
    s.commit(vec![revoke()]).await.unwrap();
    assert!(s.token_revoked("j1").await.unwrap());
    let feed = s.revocations(0, 1_000, 100).await.unwrap();
    assert_eq!(feed.len(), 1);
    assert_eq!(feed[0].kind, RevocationKind::Token);
    assert_eq!(feed[0].jti.as_deref(), Some("j1"));
    assert_eq!((feed[0].txn.as_str(), feed[0].exp), ("t1", 3_000));
    // Once: a second conflicts, changing nothing, as does one of a token
    // revoked already; a token of an ended task is still revoked so.
    let once = |jti: &str, task_id: &str| Write::RevokeTokenOnce {
        jti: jti.into(),
        task_id: task_id.into(),
        expires_at: 3_000,
        at: 1_100,
    };
    s.commit(vec![once("j2", "t1")]).await.unwrap();
    for jti in ["j1", "j2"] {
        let err = s.commit(vec![once(jti, "t1")]).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    }
    s.commit(vec![
        Write::InsertTask(Box::new(task("t-ended", None, 5_000))),
        Write::EndTask {
            id: "t-ended".into(),
            at: 1_000,
            reason: "done".into(),
            grace: 0,
        },
    ])
    .await
    .unwrap();
    s.commit(vec![once("j3", "t-ended")]).await.unwrap();
    let jtis: Vec<_> = s
        .revocations(0, 1_000, 100)
        .await
        .unwrap()
        .into_iter()
        .filter_map(|r| r.jti)
        .collect();
    assert_eq!(jtis, ["j1", "j2", "j3"]);
    // A kind a newer scrip might add is not served as a token's.
    f.exec("UPDATE revocations SET kind = 'grant' WHERE jti = 'j2'")
        .await;
    let err = s.revocations(0, 1_000, 100).await.unwrap_err();
    assert!(
        matches!(&err, StoreError::Corrupt(m) if m.contains("`grant`")),
        "{err:?}"
    );
}

async fn a_token_reads_with_its_task_and_its_revocation(f: Fixture) {
    let s = &f.store;
    let t1 = task("t1", None, 5_000);
    s.commit(vec![
        Write::InsertTask(Box::new(t1.clone())),
        Write::InsertTask(Box::new(task("t2", None, 5_000))),
    ])
    .await
    .unwrap();
    assert_eq!(s.token_task("j1", "nope").await.unwrap(), None);
    assert_eq!(
        s.token_task("j1", "t1").await.unwrap(),
        Some((t1.clone(), false))
    );
    s.commit(vec![Write::RevokeToken {
        jti: "j1".into(),
        task_id: "t1".into(),
        expires_at: 3_000,
        at: 1_000,
    }])
    .await
    .unwrap();
    assert_eq!(
        s.token_task("j1", "t1").await.unwrap(),
        Some((t1.clone(), true))
    );
    // The revocation is the token's, whichever task is asked with it; other
    // tokens of the task are not revoked by it.
    assert!(s.token_task("j1", "t2").await.unwrap().unwrap().1);
    assert_eq!(
        s.token_task("j2", "t1").await.unwrap(),
        Some((t1.clone(), false))
    );
    // An ended task reads back ended.
    s.commit(vec![Write::EndTask {
        id: "t1".into(),
        at: 1_500,
        reason: "done".into(),
        grace: 0,
    }])
    .await
    .unwrap();
    let (ended, revoked) = s.token_task("j2", "t1").await.unwrap().unwrap();
    assert_eq!((ended.ended_at, revoked), (Some(1_500), false));
    assert_eq!(ended.state(1_600), scrip_store::TaskState::Ended);
}

async fn a_single_use_token_is_claimed_exactly_once(f: Fixture) {
    let claim = |jti: &str| Write::ClaimToken {
        jti: jti.into(),
        task_id: "t1".into(),
        expires_at: 3_000,
        at: 1_000,
    };
    // Concurrent presentations, on two writers: exactly one wins.
    let other = f.replica().await;
    let mut handles = Vec::new();
    for i in 0..16 {
        let store = if i % 2 == 0 {
            f.store.clone()
        } else {
            other.clone()
        };
        let w = claim("once");
        handles.push(tokio::spawn(async move { store.commit(vec![w]).await }));
    }
    let mut won = 0;
    for h in handles {
        match h.await.unwrap() {
            Ok(()) => won += 1,
            Err(StoreError::Conflict(_)) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(won, 1);
    assert!(f.store.token_revoked("once").await.unwrap());
    // A revoked token cannot be claimed either.
    f.store
        .commit(vec![Write::RevokeToken {
            jti: "revoked".into(),
            task_id: "t1".into(),
            expires_at: 3_000,
            at: 1_000,
        }])
        .await
        .unwrap();
    let err = f.store.commit(vec![claim("revoked")]).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(f.store.revocations(0, 1_000, 100).await.unwrap().len(), 2);
    // Nor can a token of a task that has ended (its ending committed
    // between the caller's read and the claim).
    f.store
        .commit(vec![
            Write::InsertTask(Box::new(task("t-ended", None, 5_000))),
            Write::EndTask {
                id: "t-ended".into(),
                at: 1_000,
                reason: "done".into(),
                grace: 0,
            },
        ])
        .await
        .unwrap();
    let err = f
        .store
        .commit(vec![Write::ClaimToken {
            jti: "of-ended".into(),
            task_id: "t-ended".into(),
            expires_at: 3_000,
            at: 1_100,
        }])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert!(!f.store.token_revoked("of-ended").await.unwrap());
}

/// A proof's use, by its number, made at `iat`.
fn proof(n: u8, iat: u64) -> Write {
    Write::SpendProof { id: [n; 32], iat }
}

/// A write that can be seen after (a revoked token).
fn revoke(jti: &str) -> Write {
    Write::RevokeToken {
        jti: jti.into(),
        task_id: "t".into(),
        expires_at: 3_000,
        at: 1_000,
    }
}

/// A DPoP proof presented at two replicas at once is taken by exactly one
/// commit; the commits batched beside the others go on; a proof is kept
/// until the purge drops it.
async fn a_dpop_proof_is_spent_once_across_writers(f: Fixture) {
    let other = f.replica().await;
    let mut handles = Vec::new();
    for i in 0..24_u8 {
        let store = if i % 2 == 0 {
            f.store.clone()
        } else {
            other.clone()
        };
        // Two in three present the same proof; the others a proof each,
        // with a record that must be written whatever its neighbours did.
        let writes = if i % 3 == 0 {
            vec![proof(100 + i, 2_000), revoke(&format!("beside-{i}"))]
        } else {
            vec![proof(1, 2_000), revoke(&format!("replay-{i}"))]
        };
        handles.push(tokio::spawn(async move { store.commit(writes).await }));
    }
    let mut won = Vec::new();
    for (i, h) in handles.into_iter().enumerate() {
        match h.await.unwrap() {
            Ok(()) => won.push(i),
            Err(StoreError::ProofUsed) => assert!(i % 3 != 0, "commit {i} refused"),
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(won.iter().filter(|i| *i % 3 != 0).count(), 1, "{won:?}");
    assert_eq!(won.iter().filter(|i| *i % 3 == 0).count(), 8, "{won:?}");
    // A refused commit changed nothing: only the winner's record is there.
    let mut replays = 0;
    for i in (0..24).filter(|i| i % 3 != 0) {
        if f.store.token_revoked(&format!("replay-{i}")).await.unwrap() {
            replays += 1;
        }
    }
    assert_eq!(replays, 1);
    for i in (0..24).filter(|i| i % 3 == 0) {
        assert!(f.store.token_revoked(&format!("beside-{i}")).await.unwrap());
    }
    // Twice in one commit: the second is a replay of the first.
    let err = f
        .store
        .commit(vec![proof(50, 2_000), revoke("twice"), proof(50, 2_000)])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::ProofUsed), "{err:?}");
    assert!(!f.store.token_revoked("twice").await.unwrap());
    other
        .commit(vec![proof(51, 2_000), proof(52, 2_000)])
        .await
        .unwrap();
    let err = f.store.commit(vec![proof(52, 2_000)]).await.unwrap_err();
    assert!(matches!(err, StoreError::ProofUsed), "{err:?}");
    // Kept however often it is presented again, on either writer: only the
    // purge forgets it (below).
    for store in [&f.store, &other, &other] {
        let err = store.commit(vec![proof(1, 2_000)]).await.unwrap_err();
        assert!(matches!(err, StoreError::ProofUsed), "{err:?}");
    }
    // The same key and `jti` signed at another time is another proof (which
    // only the key's holder can make).
    f.store.commit(vec![proof(1, 2_001)]).await.unwrap();
}

/// Used proofs are dropped once made at or before the purge's time, at
/// most `limit`, the earliest made first; a proof made later is kept.
async fn used_dpop_proofs_are_purged_past_their_time(f: Fixture) {
    let s = &f.store;
    // Proof `i` is made at 1_100 - i: written in the reverse order of
    // their time.
    let iat = |i: u8| 1_100 - u64::from(i);
    s.commit((0..25_u8).map(|i| proof(i, iat(i))).collect())
        .await
        .unwrap();
    // Which proofs are kept, presented again: one taken again was dropped,
    // and is kept again after.
    let kept = || async {
        let mut kept = Vec::new();
        for i in 0..25_u8 {
            match s.commit(vec![proof(i, iat(i))]).await {
                Ok(()) => kept.push(false),
                Err(StoreError::ProofUsed) => kept.push(true),
                Err(e) => panic!("unexpected {e:?}"),
            }
        }
        kept
    };
    // At most `limit`, the earliest made first (proofs 17 to 24).
    s.commit(vec![Write::PurgeProofs {
        made_before: 2_000,
        limit: 8,
    }])
    .await
    .unwrap();
    assert_eq!(kept().await, (0..25).map(|i| i < 17).collect::<Vec<_>>());
    // Those made at or before `made_before` (1_090: proofs 10 to 24),
    // however many.
    s.commit(vec![Write::PurgeProofs {
        made_before: 1_090,
        limit: 100,
    }])
    .await
    .unwrap();
    assert_eq!(kept().await, (0..25).map(|i| i < 10).collect::<Vec<_>>());
    // The revocations' purge leaves them all (those taken again above
    // included).
    s.commit(vec![Write::PurgeRevocations {
        now: 9_000,
        limit: 100,
    }])
    .await
    .unwrap();
    assert_eq!(kept().await, vec![true; 25]);
}

async fn expired_revocations_leave_the_feed_and_are_purged(f: Fixture) {
    let s = &f.store;
    for (jti, exp) in [("a", 1_500), ("b", 2_500)] {
        s.commit(vec![Write::RevokeToken {
            jti: jti.into(),
            task_id: "t".into(),
            expires_at: exp,
            at: 1_000,
        }])
        .await
        .unwrap();
    }
    let all = s.revocations(0, 1_000, 100).await.unwrap();
    assert_eq!(all.len(), 2);
    let live = s.revocations(0, 2_000, 100).await.unwrap();
    assert_eq!(live.len(), 1);
    assert_eq!(live[0].jti.as_deref(), Some("b"));
    assert_eq!(
        s.revocations(all[0].seq, 1_000, 100).await.unwrap(),
        &all[1..]
    );
    assert_eq!(s.revocations(0, 1_000, 1).await.unwrap(), &all[..1]);
    s.commit(vec![Write::PurgeRevocations {
        now: 2_000,
        limit: 100,
    }])
    .await
    .unwrap();
    assert!(!s.token_revoked("a").await.unwrap());
    assert!(s.token_revoked("b").await.unwrap());
    assert_eq!(s.revocations(0, 0, 100).await.unwrap().len(), 1);
}

/// A purge drops at most `limit` rows of each table, the earliest expired
/// first: a backlog goes in several commits.
async fn a_purge_drops_a_backlog_a_chunk_at_a_time(f: Fixture) {
    let s = &f.store;
    let writes = (0..25_u64)
        .map(|i| Write::RevokeToken {
            jti: format!("p{i}"),
            task_id: "t".into(),
            // Written in the reverse order of their expiry.
            expires_at: 1_024 - i,
            at: 900,
        })
        .collect();
    s.commit(writes).await.unwrap();
    let purge = Write::PurgeRevocations {
        now: 2_000,
        limit: 10,
    };
    for left in [15, 5, 0] {
        s.commit(vec![purge.clone()]).await.unwrap();
        assert_eq!(s.revocations(0, 0, 100).await.unwrap().len(), left);
        let mut kept = Vec::new();
        for i in 0..25 {
            kept.push(s.token_revoked(&format!("p{i}")).await.unwrap());
        }
        // The earliest to expire went first.
        let expected: Vec<bool> = (0..25).map(|i| i < left).collect();
        assert_eq!(kept, expected);
    }
}

async fn a_long_feed_reads_back_in_order(f: Fixture) {
    let s = &f.store;
    // More than the SQLite store reads at once, in one commit and with
    // every other one already expired at `now` 2_000.
    let writes = (0..1_203)
        .map(|i| Write::RevokeToken {
            jti: format!("j{i}"),
            task_id: "t".into(),
            expires_at: if i % 2 == 0 { 3_000 } else { 1_500 },
            at: 1_000,
        })
        .collect();
    s.commit(writes).await.unwrap();
    let all = s.revocations(0, 1_000, 5_000).await.unwrap();
    let jtis: Vec<String> = all.iter().filter_map(|r| r.jti.clone()).collect();
    let expected: Vec<String> = (0..1_203).map(|i| format!("j{i}")).collect();
    assert_eq!(jtis, expected);
    assert!(all.windows(2).all(|w| w[0].seq < w[1].seq));
    // A page stops at its limit; the next one starts after its last.
    let first = s.revocations(0, 1_000, 1_000).await.unwrap();
    assert_eq!(first, &all[..1_000]);
    let rest = s.revocations(first[999].seq, 1_000, 1_000).await.unwrap();
    assert_eq!(rest, &all[1_000..]);
    let page = s.revocations(all[99].seq, 1_000, 260).await.unwrap();
    assert_eq!(page, &all[100..360]);
    // Past the expired ones' `exp`, only the live half.
    let live = s.revocations(0, 2_000, 5_000).await.unwrap();
    let expected: Vec<&Revocation> = all.iter().filter(|r| r.exp == 3_000).collect();
    assert_eq!(live.iter().collect::<Vec<_>>(), expected);
    assert_eq!(live.len(), 602);
    assert!(s.revocations(0, 1_000, 0).await.unwrap().is_empty());
}

async fn open_tasks_list_what_still_runs(f: Fixture) {
    let s = &f.store;
    let mut other = task("other-agent", None, 4_000);
    other.agent = identity("agent-2");
    s.commit(vec![
        Write::InsertTask(Box::new(task("late", None, 5_000))),
        Write::InsertTask(Box::new(task("soon", None, 3_000))),
        Write::InsertTask(Box::new(task("child", Some("late"), 2_500))),
        Write::InsertTask(Box::new(task("past", None, 1_500))),
        Write::InsertTask(Box::new(task("ended", None, 9_000))),
        Write::InsertTask(Box::new(other)),
    ])
    .await
    .unwrap();
    s.commit(vec![Write::EndTask {
        id: "ended".into(),
        at: 1_200,
        reason: "revoked".into(),
        grace: 0,
    }])
    .await
    .unwrap();
    let ids = |tasks: Vec<TaskRecord>| tasks.into_iter().map(|t| t.id).collect::<Vec<_>>();
    assert_eq!(
        ids(s.open_tasks(2_000, None, None, 10).await.unwrap()),
        ["child", "soon", "other-agent", "late"]
    );
    assert_eq!(
        ids(s.open_tasks(2_000, Some("agent-1"), None, 2).await.unwrap()),
        ["child", "soon"]
    );
    assert_eq!(
        ids(s
            .open_tasks(2_000, Some("agent-2"), None, 10)
            .await
            .unwrap()),
        ["other-agent"]
    );
    // Page by page: after a deadline and an id (one deadline shared by two
    // tasks orders them by id).
    s.commit(vec![Write::InsertTask(Box::new(task(
        "soon-b", None, 3_000,
    )))])
    .await
    .unwrap();
    assert_eq!(
        ids(s
            .open_tasks(2_000, None, Some((3_000, "soon")), 10)
            .await
            .unwrap()),
        ["soon-b", "other-agent", "late"]
    );
    assert_eq!(
        ids(s
            .open_tasks(2_000, Some("agent-1"), Some((2_500, "child")), 1)
            .await
            .unwrap()),
        ["soon"]
    );
    s.commit(vec![Write::EndTask {
        id: "soon-b".into(),
        at: 1_300,
        reason: "revoked".into(),
        grace: 0,
    }])
    .await
    .unwrap();
    // At the deadline a task no longer runs.
    assert_eq!(
        ids(s.open_tasks(3_000, None, None, 10).await.unwrap()),
        ["other-agent", "late"]
    );
    let late = s.open_tasks(4_500, None, None, 10).await.unwrap();
    assert_eq!(late, [s.task("late").await.unwrap().unwrap()]);
}

async fn open_tasks_acted_by_list_what_a_sub_agent_holds(f: Fixture) {
    let s = &f.store;
    // A sub-task whose current actor is `sub`, after `prior` if given.
    let acted = |id: &str, parent: &str, expires_at: u64, sub: &str, prior: Option<&str>| {
        let mut t = task(id, Some(parent), expires_at);
        t.actor = Some(Actor {
            sub: sub.into(),
            iss: Some("https://idp.test".into()),
            act: prior.map(|p| {
                Box::new(Actor {
                    sub: p.into(),
                    iss: None,
                    act: None,
                })
            }),
        });
        Write::InsertTask(Box::new(t))
    };
    // A subject JSON escapes, as a CI subject may hold.
    let odd = "repo:acme/\"app\":ref:\\main é";
    s.commit(vec![
        Write::InsertTask(Box::new(task("root", None, 5_000))),
        acted("held", "root", 4_000, "sub-a", None),
        acted("held-b", "root", 4_000, "sub-a", None),
        acted("passed-on", "held", 3_500, "sub-b", Some("sub-a")),
        acted("ended", "root", 3_000, "sub-a", None),
        acted("past", "root", 1_500, "sub-a", None),
        acted("odd", "root", 4_500, odd, None),
    ])
    .await
    .unwrap();
    s.commit(vec![Write::EndTask {
        id: "ended".into(),
        at: 1_200,
        reason: "revoked".into(),
        grace: 0,
    }])
    .await
    .unwrap();
    let ids = |tasks: Vec<TaskRecord>| tasks.into_iter().map(|t| t.id).collect::<Vec<_>>();
    // Where it is the current actor, not where it acted before.
    assert_eq!(
        ids(s
            .open_tasks_acted_by(2_000, "sub-a", None, 10)
            .await
            .unwrap()),
        ["held", "held-b"]
    );
    assert_eq!(
        ids(s
            .open_tasks_acted_by(2_000, "sub-b", None, 10)
            .await
            .unwrap()),
        ["passed-on"]
    );
    assert_eq!(
        ids(s.open_tasks_acted_by(2_000, odd, None, 10).await.unwrap()),
        ["odd"]
    );
    // The agent that started the tree acts in none of it.
    assert!(
        s.open_tasks_acted_by(2_000, "agent-1", None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    assert!(
        s.open_tasks_acted_by(2_000, "sub", None, 10)
            .await
            .unwrap()
            .is_empty()
    );
    // Page by page.
    assert_eq!(
        ids(s
            .open_tasks_acted_by(2_000, "sub-a", None, 1)
            .await
            .unwrap()),
        ["held"]
    );
    assert_eq!(
        ids(s
            .open_tasks_acted_by(2_000, "sub-a", Some((4_000, "held")), 10)
            .await
            .unwrap()),
        ["held-b"]
    );
    // At the deadline a task no longer runs.
    assert!(
        s.open_tasks_acted_by(4_000, "sub-a", None, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn due_tasks_come_oldest_first(f: Fixture) {
    let s = &f.store;
    s.commit(vec![
        Write::InsertTask(Box::new(task("late", None, 3_000))),
        Write::InsertTask(Box::new(task("early", None, 2_000))),
        Write::InsertTask(Box::new(task("future", None, 9_000))),
        Write::InsertTask(Box::new(task("ended", None, 1_500))),
    ])
    .await
    .unwrap();
    s.commit(vec![Write::EndTask {
        id: "ended".into(),
        at: 1_200,
        reason: "revoked".into(),
        grace: 0,
    }])
    .await
    .unwrap();
    let due: Vec<String> = s
        .due_tasks(3_000, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(due, ["early", "late"]);
    assert_eq!(s.due_tasks(3_000, 1).await.unwrap()[0].id, "early");
    assert!(s.due_tasks(1_999, 10).await.unwrap().is_empty());
    // A task's sub-tasks with its deadline come before it, though it was
    // made first and sorts first by id.
    s.commit(vec![
        Write::InsertTask(Box::new(task("a-root", None, 4_000))),
        Write::InsertTask(Box::new(task("b-child", Some("a-root"), 4_000))),
        Write::InsertTask(Box::new(task("c-child", Some("a-root"), 4_000))),
    ])
    .await
    .unwrap();
    let due: Vec<String> = s
        .due_tasks(4_000, 4)
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.id)
        .collect();
    assert_eq!(due, ["early", "late", "b-child", "c-child"]);
}

async fn the_first_decision_on_an_approval_wins(f: Fixture) {
    let s = &f.store;
    let approval = |id: &str, created_at: u64, expires_at: u64| Approval {
        id: id.into(),
        task_id: "t1".into(),
        tool: "github".into(),
        // One step each: the same step may not wait twice.
        actions: format!("delete-{id}"),
        approvable: None,
        state: ApprovalState::Pending,
        created_at,
        expires_at,
        decided_by: None,
        decided_at: None,
        reason: None,
        token_jti: None,
    };
    s.commit(vec![
        Write::InsertTask(Box::new(task("t1", None, 9_000))),
        Write::InsertApproval(Box::new(approval("a2", 1_100, 2_000))),
        Write::InsertApproval(Box::new(approval("a1", 1_000, 2_000))),
        Write::InsertApproval(Box::new(approval("old", 900, 1_050))),
    ])
    .await
    .unwrap();
    let decide = |to: ApprovalState, by: &str| Write::UpdateApproval {
        id: "a1".into(),
        from: ApprovalState::Pending,
        to,
        by: Some(by.into()),
        at: 1_200,
        reason: Some(format!("by {by}")),
        token_jti: None,
    };
    s.commit(vec![decide(ApprovalState::Approved, "alice")])
        .await
        .unwrap();
    // The second decision conflicts, and its audit record is not written.
    let audited = all_audit(s.as_ref()).await.len();
    let err = s
        .commit(vec![
            decide(ApprovalState::Denied, "bob"),
            audit("approval.denied", Some("t1")),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(all_audit(s.as_ref()).await.len(), audited);
    let a1 = s.approval("a1").await.unwrap().unwrap();
    assert_eq!(a1.state, ApprovalState::Approved);
    // Stored by an older scrip: no approvable actions.
    assert_eq!(a1.approvable, None);
    assert_eq!(a1.decided_by.as_deref(), Some("alice"));
    assert_eq!(a1.decided_at, Some(1_200));
    assert_eq!(a1.reason.as_deref(), Some("by alice"));
    // Approved and not collected: the task's, until it expires.
    let approved = |task: &'static str, at: u64| async move {
        s.task_approved_approvals(task, at)
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(approved("t1", 1_250).await, ["a1"]);
    assert!(approved("t1", 2_000).await.is_empty());
    assert!(approved("t2", 1_250).await.is_empty());
    // Collecting the token keeps who decided and records the jti.
    s.commit(vec![Write::UpdateApproval {
        id: "a1".into(),
        from: ApprovalState::Approved,
        to: ApprovalState::Used,
        by: None,
        at: 1_300,
        reason: None,
        token_jti: Some("jti-x".into()),
    }])
    .await
    .unwrap();
    let a1 = s.approval("a1").await.unwrap().unwrap();
    assert_eq!(a1.state, ApprovalState::Used);
    assert_eq!(
        (a1.decided_by.as_deref(), a1.decided_at),
        (Some("alice"), Some(1_200))
    );
    assert_eq!(a1.token_jti.as_deref(), Some("jti-x"));
    assert!(approved("t1", 1_300).await.is_empty(), "collected");
    // A second collection conflicts: one token per approval.
    let err = s
        .commit(vec![Write::UpdateApproval {
            id: "a1".into(),
            from: ApprovalState::Approved,
            to: ApprovalState::Used,
            by: None,
            at: 1_301,
            reason: None,
            token_jti: Some("jti-y".into()),
        }])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(
        s.approval("a1")
            .await
            .unwrap()
            .unwrap()
            .token_jti
            .as_deref(),
        Some("jti-x")
    );
    let pending: Vec<String> = s
        .pending_approvals(1_060, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(pending, ["a2"]);
    // One task's: another task's pending approval is not among them.
    s.commit(vec![
        Write::InsertTask(Box::new(task("t2", None, 9_000))),
        Write::InsertApproval(Box::new(Approval {
            task_id: "t2".into(),
            ..approval("b1", 1_010, 2_000)
        })),
    ])
    .await
    .unwrap();
    let of = |task: &'static str| async move {
        s.task_pending_approvals(task, 1_060)
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(of("t1").await, ["a2"]);
    assert_eq!(of("t2").await, ["b1"]);
    assert!(of("t3").await.is_empty());
    // A task that ended takes its waiting steps off the approvers' list.
    let listed = |at: u64| async move {
        s.pending_approvals(at, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(listed(1_060).await, ["b1", "a2"]);
    s.commit(vec![Write::EndTask {
        id: "t2".into(),
        at: 1_061,
        reason: "revoked".into(),
        grace: 0,
    }])
    .await
    .unwrap();
    assert_eq!(listed(1_062).await, ["a2"]);
    assert!(
        s.task_pending_approvals("t2", 2_000)
            .await
            .unwrap()
            .is_empty()
    );
    let expired: Vec<String> = s
        .expired_approvals(1_060, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(expired, ["old"]);
    // Steps before their time whose task has ended, or reached its
    // deadline unended: nobody may decide them.
    s.commit(vec![
        Write::InsertTask(Box::new(task("t4", None, 1_500))),
        Write::InsertApproval(Box::new(Approval {
            task_id: "t4".into(),
            ..approval("c1", 1_010, 3_000)
        })),
    ])
    .await
    .unwrap();
    let orphaned = |at: u64| async move {
        s.orphaned_approvals(at, 10)
            .await
            .unwrap()
            .into_iter()
            .map(|a| a.id)
            .collect::<Vec<_>>()
    };
    assert_eq!(orphaned(1_062).await, ["b1"]);
    assert_eq!(orphaned(1_500).await, ["b1", "c1"]);
    // Past its own time, a step is the other read's.
    assert_eq!(orphaned(2_000).await, ["c1"]);
    assert_eq!(s.approval("nope").await.unwrap(), None);
    // A task's denials since a time, the latest first.
    s.commit(vec![Write::UpdateApproval {
        id: "a2".into(),
        from: ApprovalState::Pending,
        to: ApprovalState::Denied,
        by: Some("bob".into()),
        at: 1_100,
        reason: Some("not now".into()),
        token_jti: None,
    }])
    .await
    .unwrap();
    let denied = s.task_denials("t1", 1_000).await.unwrap();
    assert_eq!(
        denied.iter().map(|a| a.id.as_str()).collect::<Vec<_>>(),
        ["a2"]
    );
    assert_eq!(denied[0].reason.as_deref(), Some("not now"));
    assert!(s.task_denials("t1", 1_101).await.unwrap().is_empty());
    assert!(s.task_denials("t2", 0).await.unwrap().is_empty());
    // An approved step whose token was never collected expires too; a
    // denied or used one does not.
    s.commit(vec![Write::UpdateApproval {
        id: "b1".into(),
        from: ApprovalState::Pending,
        to: ApprovalState::Approved,
        by: Some("bob".into()),
        at: 1_100,
        reason: None,
        token_jti: None,
    }])
    .await
    .unwrap();
    let expired: Vec<String> = s
        .expired_approvals(5_000, 10)
        .await
        .unwrap()
        .into_iter()
        .map(|a| a.id)
        .collect();
    assert_eq!(expired, ["old", "b1", "c1"]);
}

fn pending(id: &str, task_id: &str, actions: &str, created_at: u64) -> Approval {
    Approval {
        id: id.into(),
        task_id: task_id.into(),
        tool: "github".into(),
        actions: actions.into(),
        approvable: Some(actions.split(' ').next().unwrap_or_default().into()),
        state: ApprovalState::Pending,
        created_at,
        expires_at: created_at + 600,
        decided_by: None,
        decided_at: None,
        reason: None,
        token_jti: None,
    }
}

/// [`Write::NoNewDenial`] refuses a commit, changing nothing, when the
/// task has a denial since `since` that is not one of those `seen`,
/// including one made earlier in the same commit; another task's denials
/// and older ones do not count.
async fn a_denial_since_the_read_refuses_the_commit(f: Fixture) {
    let s = &f.store;
    let deny = |id: &str, at: u64| Write::UpdateApproval {
        id: id.into(),
        from: ApprovalState::Pending,
        to: ApprovalState::Denied,
        by: Some("bob".into()),
        at,
        reason: Some("no".into()),
        token_jti: None,
    };
    let guard = |since: u64, seen: &[&str]| Write::NoNewDenial {
        task: "t1".into(),
        since,
        seen: seen.iter().map(|&id| id.to_owned()).collect(),
    };
    let mut other = pending("b1", "t2", "read", 1_000);
    other.actions = "write".into();
    s.commit(vec![
        Write::InsertTask(Box::new(task("t1", None, 9_000))),
        Write::InsertTask(Box::new(task("t2", None, 9_000))),
        Write::InsertApproval(Box::new(pending("a1", "t1", "delete", 1_000))),
        Write::InsertApproval(Box::new(pending("a2", "t1", "write", 1_000))),
        Write::InsertApproval(Box::new(pending("a3", "t1", "read", 1_000))),
        Write::InsertApproval(Box::new(other)),
    ])
    .await
    .unwrap();
    s.commit(vec![deny("a1", 1_100)]).await.unwrap();
    let used = || audit("approval.used", Some("t1"));
    s.commit(vec![used(), guard(1_000, &["a1"])]).await.unwrap();
    s.commit(vec![used(), guard(1_101, &[])]).await.unwrap();
    let before = all_audit(s.as_ref()).await;
    let err = s.commit(vec![used(), guard(1_100, &[])]).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    // A denial earlier in the same commit counts, and is undone with it.
    let err = s
        .commit(vec![deny("a2", 1_200), used(), guard(1_000, &["a1"])])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(all_audit(s.as_ref()).await, before);
    let state = |id: &'static str| async move { s.approval(id).await.unwrap().unwrap().state };
    assert_eq!(state("a2").await, ApprovalState::Pending);
    // One after the check does not.
    s.commit(vec![used(), guard(1_000, &["a1"]), deny("a2", 1_200)])
        .await
        .unwrap();
    assert_eq!(state("a2").await, ApprovalState::Denied);
    s.commit(vec![deny("b1", 1_300)]).await.unwrap();
    s.commit(vec![used(), guard(1_000, &["a1", "a2"])])
        .await
        .unwrap();
    assert_eq!(state("a3").await, ApprovalState::Pending);
    assert!(verify(s.as_ref()).await.problems.is_empty());
}

async fn a_step_waits_for_a_person_once(f: Fixture) {
    let s = &f.store;
    let insert = |a: Approval| {
        vec![
            Write::InsertApproval(Box::new(a)),
            audit("approval.requested", None),
        ]
    };
    s.commit(vec![
        Write::InsertTask(Box::new(task("t1", None, 9_000))),
        Write::InsertTask(Box::new(task("t2", None, 9_000))),
    ])
    .await
    .unwrap();
    s.commit(insert(pending("a1", "t1", "delete", 1_000)))
        .await
        .unwrap();
    let a1 = s.approval("a1").await.unwrap().unwrap();
    assert_eq!(a1.approvable.as_deref(), Some("delete"));
    let audited = all_audit(s.as_ref()).await.len();
    // The same step again, while the first waits: refused with its record.
    let err = s
        .commit(insert(pending("a2", "t1", "delete", 1_100)))
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(all_audit(s.as_ref()).await.len(), audited);
    assert_eq!(s.approval("a2").await.unwrap(), None);
    // Another step, the same step of another task, another tool: each waits.
    s.commit(insert(pending("a3", "t1", "delete,write", 1_100)))
        .await
        .unwrap();
    s.commit(insert(pending("b1", "t2", "delete", 1_100)))
        .await
        .unwrap();
    s.commit(insert(Approval {
        tool: "jira".into(),
        ..pending("a4", "t1", "delete", 1_100)
    }))
    .await
    .unwrap();
    // Once the first is decided, or has expired, the step may wait again.
    s.commit(vec![Write::UpdateApproval {
        id: "a3".into(),
        from: ApprovalState::Pending,
        to: ApprovalState::Denied,
        by: Some("alice".into()),
        at: 1_200,
        reason: None,
        token_jti: None,
    }])
    .await
    .unwrap();
    s.commit(insert(pending("a5", "t1", "delete,write", 1_300)))
        .await
        .unwrap();
    s.commit(insert(pending("a6", "t1", "delete", 1_600)))
        .await
        .unwrap();
    // Two replicas asked for one step at once open one approval between them.
    let other = f.replica().await;
    let mut handles = Vec::new();
    for i in 0..8 {
        let store = if i % 2 == 0 { s.clone() } else { other.clone() };
        let a = pending(&format!("r{i}"), "t2", "admin", 1_300);
        handles.push(tokio::spawn(async move {
            store.commit(vec![Write::InsertApproval(Box::new(a))]).await
        }));
    }
    let mut opened = 0;
    for h in handles {
        match h.await.unwrap() {
            Ok(()) => opened += 1,
            Err(StoreError::Conflict(_)) => {}
            Err(e) => panic!("{e:?}"),
        }
    }
    assert_eq!(opened, 1);
    let waiting = s.task_pending_approvals("t2", 1_300).await.unwrap();
    assert_eq!(waiting.iter().filter(|a| a.actions == "admin").count(), 1);
}

/// An agent's denials at a tool, in any of its tasks, the latest first:
/// not another agent's (the same subject at another issuer included), not
/// another tool's, not those decided before `since`, nor a step still
/// waiting or approved; at most `limit`.
async fn agent_denials_are_an_agents_latest_at_a_tool(f: Fixture) {
    let s = &f.store;
    let mut elsewhere = task("w", None, 9_000);
    elsewhere.agent.issuer = "https://other.test".into();
    let mut other = task("u", None, 9_000);
    other.agent = identity("agent-2");
    let mut writes = vec![
        Write::InsertTask(Box::new(task("t1", None, 9_000))),
        Write::InsertTask(Box::new(task("t2", None, 9_000))),
        Write::InsertTask(Box::new(elsewhere)),
        Write::InsertTask(Box::new(other)),
    ];
    let mut at_jira = pending("j", "t1", "delete", 1_000);
    at_jira.tool = "jira".into();
    writes.push(Write::InsertApproval(Box::new(at_jira)));
    for (id, t) in [
        ("d1", "t1"),
        ("d2", "t2"),
        ("d3", "t2"),
        ("early", "t1"),
        ("w1", "w"),
        ("u1", "u"),
        ("waiting", "t1"),
        ("approved", "t2"),
    ] {
        writes.push(Write::InsertApproval(Box::new(pending(id, t, id, 1_000))));
    }
    s.commit(writes).await.unwrap();
    let decide = |id: &str, to: ApprovalState, at: u64| Write::UpdateApproval {
        id: id.into(),
        from: ApprovalState::Pending,
        to,
        by: Some("alice".into()),
        at,
        reason: Some(format!("no to {id}")),
        token_jti: None,
    };
    s.commit(vec![
        decide("early", ApprovalState::Denied, 1_001),
        decide("d1", ApprovalState::Denied, 1_010),
        decide("d2", ApprovalState::Denied, 1_030),
        decide("d3", ApprovalState::Denied, 1_020),
        decide("w1", ApprovalState::Denied, 1_040),
        decide("u1", ApprovalState::Denied, 1_040),
        decide("j", ApprovalState::Denied, 1_040),
        decide("approved", ApprovalState::Approved, 1_040),
    ])
    .await
    .unwrap();
    let ids = |list: Vec<Approval>| list.into_iter().map(|a| a.id).collect::<Vec<_>>();
    let denials = s
        .agent_denials("https://idp.test", "agent-1", "github", 1_005, 10)
        .await
        .unwrap();
    assert_eq!(denials[0].reason.as_deref(), Some("no to d2"));
    assert_eq!(denials[0].decided_by.as_deref(), Some("alice"));
    assert_eq!(ids(denials), ["d2", "d3", "d1"]);
    assert_eq!(
        ids(s
            .agent_denials("https://idp.test", "agent-1", "github", 1_005, 2)
            .await
            .unwrap()),
        ["d2", "d3"]
    );
    assert_eq!(
        ids(s
            .agent_denials("https://idp.test", "agent-1", "github", 0, 10)
            .await
            .unwrap()),
        ["d2", "d3", "d1", "early"]
    );
    assert_eq!(
        ids(s
            .agent_denials("https://other.test", "agent-1", "github", 0, 10)
            .await
            .unwrap()),
        ["w1"]
    );
    assert_eq!(
        ids(s
            .agent_denials("https://idp.test", "agent-1", "jira", 0, 10)
            .await
            .unwrap()),
        ["j"]
    );
    // Denials whose steps expired long ago are not read.
    assert!(
        s.agent_denials("https://idp.test", "agent-1", "github", 1_700, 10)
            .await
            .unwrap()
            .is_empty()
    );
}

async fn a_task_has_at_most_ten_steps_waiting(f: Fixture) {
    let s = &f.store;
    assert_eq!(scrip_store::MAX_PENDING_PER_TASK, 10);
    s.commit(vec![
        Write::InsertTask(Box::new(task("t1", None, 9_000))),
        Write::InsertTask(Box::new(task("t2", None, 9_000))),
        // Expired by 1,000: it does not count.
        Write::InsertApproval(Box::new(pending("old", "t1", "old", 300))),
    ])
    .await
    .unwrap();
    for i in 0..9 {
        s.commit(vec![Write::InsertApproval(Box::new(pending(
            &format!("a{i}"),
            "t1",
            &format!("step{i}"),
            1_000,
        )))])
        .await
        .unwrap();
    }
    // The tenth and eleventh in one commit: the eleventh sees the tenth.
    let err = s
        .commit(vec![
            Write::InsertApproval(Box::new(pending("a9", "t1", "step9", 1_000))),
            Write::InsertApproval(Box::new(pending("a10", "t1", "step10", 1_000))),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(
        s.approval("a9").await.unwrap(),
        None,
        "nothing of it applied"
    );
    s.commit(vec![Write::InsertApproval(Box::new(pending(
        "a9", "t1", "step9", 1_000,
    )))])
    .await
    .unwrap();
    let err = s
        .commit(vec![Write::InsertApproval(Box::new(pending(
            "a10", "t1", "step10", 1_000,
        )))])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(
        s.task_pending_approvals("t1", 1_000).await.unwrap().len(),
        10
    );
    // Another task is not held back by this one's.
    s.commit(vec![Write::InsertApproval(Box::new(pending(
        "b0", "t2", "step0", 1_000,
    )))])
    .await
    .unwrap();
    // A decision makes room.
    s.commit(vec![Write::UpdateApproval {
        id: "a0".into(),
        from: ApprovalState::Pending,
        to: ApprovalState::Approved,
        by: Some("alice".into()),
        at: 1_100,
        reason: None,
        token_jti: None,
    }])
    .await
    .unwrap();
    s.commit(vec![Write::InsertApproval(Box::new(pending(
        "a10", "t1", "step10", 1_100,
    )))])
    .await
    .unwrap();
}

async fn concurrent_commits_chain_and_verify(f: Fixture) {
    let mut handles = Vec::new();
    for i in 0..200 {
        let store = f.store.clone();
        handles.push(tokio::spawn(async move {
            store
                .commit(vec![audit("token.issued", Some(&format!("t{i}")))])
                .await
        }));
    }
    for h in handles {
        h.await.unwrap().unwrap();
    }
    let report = verify(f.store.as_ref()).await;
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!(report.records, 201, "200 records and the chain's start");
    assert_eq!(report.chains, 1);
    let head = f.store.chain_head().unwrap();
    assert_eq!(head.chain_seq, 201);
}

async fn two_writers_chain_and_verify(f: Fixture) {
    let other = f.replica().await;
    let mut handles = Vec::new();
    for i in 0..100 {
        let store = if i % 2 == 0 {
            f.store.clone()
        } else {
            other.clone()
        };
        handles.push(tokio::spawn(async move {
            store.commit(vec![audit("token.issued", None)]).await
        }));
    }
    for h in handles {
        h.await.unwrap().unwrap();
    }
    let report = verify(f.store.as_ref()).await;
    assert!(report.problems.is_empty(), "{:?}", report.problems);
    assert_eq!((report.records, report.chains), (102, 2));
    // The second chain's start links to the first chain's head then.
    let links = f.store.chain_links().await.unwrap();
    assert_eq!(links.len(), 1);
    // Sequence numbers are unique and increasing in the global order.
    let rows = f.store.audit_rows(0, u32::MAX).await.unwrap();
    assert!(rows.windows(2).all(|w| w[0].seq < w[1].seq));
}

/// When the `token.issued` records `filter` finds were stamped, in order.
async fn issued_at(s: &Arc<dyn Store>, filter: AuditFilter) -> Vec<u64> {
    s.audit(&filter)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event == "token.issued")
        .map(|e| e.at_ms)
        .collect()
}

/// `since_ms` finds every record stamped at or after it, in `seq` order,
/// whatever order they were committed in: the read starts just before the
/// first of them (not at the oldest record), so none is missed however far
/// a writer's clock ran ahead or behind.
async fn a_query_since_a_time_reads_from_its_first_record(f: Fixture) {
    const HOUR: u64 = 3_600_000;
    let since = 100 * HOUR;
    let s = &f.store;
    // In commit order.
    let stamps = [
        since - 3 * HOUR,
        since + 2 * HOUR, // a clock hours ahead: the first at or after it
        since - 2 * HOUR, // a clock hours behind, committed after
        since + 60_000,
        since - 50 * 60_000,
        since,
        since - HOUR,
    ];
    for at_ms in stamps {
        s.commit(vec![Write::Audit(Box::new(AuditEvent {
            at_ms,
            event: "token.issued".into(),
            replica: "test".into(),
            ..AuditEvent::default()
        }))])
        .await
        .unwrap();
    }
    let since_then = |since_ms: u64, after_seq: Option<i64>| AuditFilter {
        since_ms: Some(since_ms),
        after_seq,
        ..AuditFilter::default()
    };
    assert_eq!(
        issued_at(s, since_then(since, None)).await,
        [since + 2 * HOUR, since + 60_000, since]
    );
    // With a cursor, after the later of the cursor and the start.
    let all = s.audit(&AuditFilter::default()).await.unwrap();
    let seq_of = |at_ms: u64| all.iter().find(|e| e.at_ms == at_ms).unwrap().seq;
    assert_eq!(
        issued_at(s, since_then(since, Some(seq_of(since + 60_000)))).await,
        [since]
    );
    assert_eq!(
        issued_at(s, since_then(since, Some(seq_of(since - 3 * HOUR)))).await,
        [since + 2 * HOUR, since + 60_000, since]
    );
    // From the oldest, and after the latest.
    assert_eq!(
        issued_at(s, since_then(since - 3 * HOUR, None)).await,
        stamps
    );
    assert_eq!(
        issued_at(s, since_then(since + 3 * HOUR, None)).await,
        [0_u64; 0]
    );
}

async fn audit_queries_filter(f: Fixture) {
    let s = &f.store;
    let mut writes = Vec::new();
    for (i, (task, tool, decision, agent)) in [
        ("t1", "github", "allow", "a1"),
        ("t1", "jira", "deny", "a1"),
        ("t2", "github", "allow", "a2"),
    ]
    .into_iter()
    .enumerate()
    {
        writes.push(Write::Audit(Box::new(AuditEvent {
            at_ms: 1_000 + 100 * i as u64,
            event: "token.issued".into(),
            decision: Some(decision.into()),
            agent_sub: Some(agent.into()),
            // Two issuers' agents.
            agent_iss: Some(
                if agent == "a1" {
                    "https://idp"
                } else {
                    "https://other"
                }
                .into(),
            ),
            task_id: Some(task.into()),
            tool: Some(tool.into()),
            jti: Some(format!("jti-{i}")),
            // Sub-agents, the current one first.
            chain: match i {
                1 => vec!["s1".into(), "s\"2 é".into()],
                2 => vec!["s1".into()],
                _ => Vec::new(),
            },
            replica: "test".into(),
            ..AuditEvent::default()
        })));
    }
    // Another event, naming the first record's token.
    writes.push(Write::Audit(Box::new(AuditEvent {
        at_ms: 1_300,
        event: "token.revoked".into(),
        jti: Some("jti-0".into()),
        replica: "test".into(),
        ..AuditEvent::default()
    })));
    s.commit(writes).await.unwrap();
    let at = |filter: AuditFilter| async move {
        s.audit(&filter)
            .await
            .unwrap()
            .into_iter()
            .map(|e| (e.event, e.at_ms))
            .collect::<Vec<_>>()
    };
    assert_eq!(
        at(AuditFilter {
            jti: Some("jti-0".into()),
            ..AuditFilter::default()
        })
        .await,
        [
            ("token.issued".into(), 1_000),
            ("token.revoked".into(), 1_300)
        ]
    );
    assert_eq!(
        at(AuditFilter {
            event: Some("token.revoked".into()),
            ..AuditFilter::default()
        })
        .await,
        [("token.revoked".into(), 1_300)]
    );
    assert_eq!(
        at(AuditFilter {
            event: Some("token.issued".into()),
            jti: Some("jti-2".into()),
            ..AuditFilter::default()
        })
        .await,
        [("token.issued".into(), 1_200)]
    );
    assert!(
        at(AuditFilter {
            jti: Some("jti".into()),
            ..AuditFilter::default()
        })
        .await
        .is_empty()
    );
    let acted_by = |actor: &str| AuditFilter {
        actor: Some(actor.into()),
        ..AuditFilter::default()
    };
    assert_eq!(issued_at(s, acted_by("s1")).await, [1_100, 1_200]);
    assert_eq!(issued_at(s, acted_by("s\"2 é")).await, [1_100]);
    for nobody in ["s", "a1", "", "[]", "s1\"", "%"] {
        assert_eq!(issued_at(s, acted_by(nobody)).await, [0_u64; 0], "{nobody}");
    }
    assert_eq!(
        issued_at(
            s,
            AuditFilter {
                agent_sub: Some("a2".into()),
                ..acted_by("s1")
            }
        )
        .await,
        [1_200]
    );
    assert_eq!(
        issued_at(
            s,
            AuditFilter {
                task_id: Some("t1".into()),
                ..AuditFilter::default()
            }
        )
        .await,
        [1_000, 1_100]
    );
    assert_eq!(
        issued_at(
            s,
            AuditFilter {
                tool: Some("github".into()),
                ..AuditFilter::default()
            }
        )
        .await,
        [1_000, 1_200]
    );
    assert_eq!(
        issued_at(
            s,
            AuditFilter {
                decision: Some("deny".into()),
                ..AuditFilter::default()
            }
        )
        .await,
        [1_100]
    );
    assert_eq!(
        issued_at(
            s,
            AuditFilter {
                agent_sub: Some("a2".into()),
                ..AuditFilter::default()
            }
        )
        .await,
        [1_200]
    );
    assert_eq!(
        issued_at(
            s,
            AuditFilter {
                agent_iss: Some("https://idp".into()),
                ..AuditFilter::default()
            }
        )
        .await,
        [1_000, 1_100]
    );
    assert_eq!(
        issued_at(
            s,
            AuditFilter {
                agent_sub: Some("a2".into()),
                agent_iss: Some("https://idp".into()),
                ..AuditFilter::default()
            }
        )
        .await,
        [0_u64; 0]
    );
    assert_eq!(
        issued_at(
            s,
            AuditFilter {
                since_ms: Some(1_100),
                until_ms: Some(1_200),
                ..AuditFilter::default()
            }
        )
        .await,
        [1_100]
    );
    let all = s.audit(&AuditFilter::default()).await.unwrap();
    assert_eq!(all.len(), 5);
    assert!(all.iter().all(|e| e.hash.is_some() && e.seq > 0));
    let after = s
        .audit(&AuditFilter {
            after_seq: Some(all[1].seq),
            limit: Some(1),
            ..AuditFilter::default()
        })
        .await
        .unwrap();
    assert_eq!(after, &all[2..3]);
}

/// Signs with a key only the test knows (an HMAC would do as well: the
/// store only carries what the signer returns).
#[derive(Debug)]
struct TestSigner {
    fail: bool,
}

impl TestSigner {
    fn signature(message: &[u8]) -> String {
        scrip_store::hash(&[b"test-key\n".as_slice(), message].concat())
    }
}

impl scrip_store::HeadSigner for TestSigner {
    fn sign(&self, message: &[u8]) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
        if self.fail {
            return Err("the key is gone".into());
        }
        Ok(Self::signature(message))
    }
}

/// Verifies everything `store` holds, requiring every record to be signed
/// (no grace) with [`TestSigner`]'s key.
/// The `chain.started` record of `chain`, wherever its row is numbered.
async fn chain_start(store: &dyn Store, chain: &str) -> AuditEvent {
    let rows = store.audit_rows(i64::MIN, u32::MAX).await.unwrap();
    let row = rows
        .iter()
        .find(|r| r.chain_id == chain && r.chain_seq == 1)
        .unwrap();
    serde_json::from_str(&row.record).unwrap()
}

async fn verify_signed(store: &dyn Store) -> scrip_store::Report {
    let rows = store.audit_rows(0, u32::MAX).await.unwrap();
    let checkpoints = store.latest_checkpoints().await.unwrap();
    let links: Vec<scrip_store::ChainLink> = rows
        .iter()
        .filter_map(|r| serde_json::from_str::<AuditEvent>(&r.record).ok())
        .flat_map(|e| e.links)
        .collect();
    let mut v = scrip_store::Verifier::new(&checkpoints, &links);
    v.require_signed(u64::MAX / 2, 0);
    for r in &rows {
        v.push(r);
    }
    v.finish(&checkpoints, |c| {
        c.signature
            == TestSigner::signature(&Checkpoint::message(
                &c.chain_id,
                c.chain_seq,
                &c.hash,
                c.at_ms,
            ))
    })
}

/// A running writer's chain tail rewritten in place (its hashes made anew)
/// or moved out of verification's reach (to sequence numbers below 1),
/// with an older signed head put back: the writer's next commit finds its
/// head replaced, and the start of the chain it goes on in names what it
/// had committed as lost, as after a rollback, though the rows are there.
async fn a_live_tail_rewritten_or_hidden_is_named_lost(f: Fixture) {
    let f = &f;
    let s = &f.store;
    assert!(s.sign_heads_with(Arc::new(TestSigner { fail: false })));
    // Commits a record and two more; puts back the head of the first
    // after `edit` (with the chain's id); commits; the new chain's losses.
    let run = |edit: &'static str| async move {
        s.commit(vec![audit("token.issued", None)]).await.unwrap();
        let kept = s.chain_head().unwrap();
        let heads = s.latest_checkpoints().await.unwrap();
        let kept_head = heads
            .iter()
            .find(|c| c.chain_id == kept.chain_id)
            .unwrap()
            .clone();
        s.commit(vec![
            audit("token.issued", None),
            audit("token.issued", None),
        ])
        .await
        .unwrap();
        let head = s.chain_head().unwrap();
        let chain = &kept.chain_id;
        f.exec(
            &edit
                .replace("CHAIN", chain)
                .replace("KEPT", &kept.chain_seq.to_string()),
        )
        .await;
        f.exec(&format!(
            "UPDATE audit_heads SET chain_seq = {}, hash = '{}', at_ms = {}, signature = '{}' \
             WHERE chain_id = '{chain}'",
            kept_head.chain_seq, kept_head.hash, kept_head.at_ms, kept_head.signature
        ))
        .await;
        s.commit(vec![audit("token.issued", None)]).await.unwrap();
        let next = s.chain_head().unwrap();
        assert_ne!(&next.chain_id, chain, "a new chain");
        (chain_start(s.as_ref(), &next.chain_id).await.lost, head)
    };
    // The last record rewritten: its hash is not the one committed.
    let (lost, head) = run(
        "UPDATE audit SET hash = 'rewritten' WHERE chain_id = 'CHAIN' AND chain_seq > KEPT + 1",
    )
    .await;
    assert_eq!(
        lost,
        [scrip_store::Lost {
            chain_id: head.chain_id.clone(),
            from: head.chain_seq,
            to: head.chain_seq,
            hash: head.hash.clone(),
        }]
    );
    // Moved below 1 (on PostgreSQL once the identity column takes values
    // given, as its owner can make it).
    if let Place::Postgres(_) = &f.place {
        f.exec("ALTER TABLE audit ALTER COLUMN seq SET GENERATED BY DEFAULT")
            .await;
    }
    {
        let (lost, head) =
            run("UPDATE audit SET seq = -seq WHERE chain_id = 'CHAIN' AND chain_seq > KEPT").await;
        // After the first loss, named again (the store still lacks it).
        let expected = scrip_store::Lost {
            chain_id: head.chain_id.clone(),
            from: head.chain_seq - 1,
            to: head.chain_seq,
            hash: head.hash.clone(),
        };
        assert_eq!(lost.last(), Some(&expected), "{lost:?}");
    }
}

/// A store rolled back under a running writer (a failover to a standby that
/// had not received its last commits, a backup restored in place): the
/// writer's next commit finds its chain's head gone, and is applied on a
/// new chain whose signed start names the records lost; the trail then
/// verifies, listing the loss. Its caller sees nothing of it.
async fn a_store_rolled_back_under_its_writer_is_noticed_and_recorded(f: Fixture) {
    let s = &f.store;
    assert!(s.sign_heads_with(Arc::new(TestSigner { fail: false })));
    s.commit(vec![audit("token.issued", None)]).await.unwrap();
    let kept = s.chain_head().unwrap();
    assert_eq!(kept.chain_seq, 2, "its start and one record");
    let [kept_head] = &s.latest_checkpoints().await.unwrap()[..] else {
        panic!("one signed head")
    };
    for _ in 0..2 {
        s.commit(vec![
            audit("token.issued", None),
            audit("token.issued", None),
        ])
        .await
        .unwrap();
    }
    let lost = s.chain_head().unwrap();
    assert_eq!(lost.chain_seq, 6);

    // Rolled back to where the chain stood at #2, its signed head with it.
    let rollback = |chain: &str, to: &scrip_store::Checkpoint| {
        format!(
            "DELETE FROM audit WHERE chain_id = '{chain}' AND chain_seq > {}; \
             UPDATE audit_heads SET chain_seq = {}, hash = '{}', at_ms = {}, signature = '{}' \
             WHERE chain_id = '{chain}'",
            to.chain_seq, to.chain_seq, to.hash, to.at_ms, to.signature
        )
    };
    for statement in rollback(&kept.chain_id, kept_head).split("; ") {
        f.exec(statement).await;
    }
    assert!(verify_signed(s.as_ref()).await.problems.is_empty());
    s.commit(vec![
        audit("token.issued", None),
        Write::InsertTask(Box::new(task("t-after", None, 5_000))),
    ])
    .await
    .unwrap();
    assert!(s.task("t-after").await.unwrap().is_some());
    let now = s.chain_head().unwrap();
    assert_ne!(now.chain_id, kept.chain_id, "a new chain");
    assert_eq!(now.chain_seq, 2, "its start, then the commit's record");
    let expected = scrip_store::Lost {
        chain_id: kept.chain_id.clone(),
        from: 3,
        to: 6,
        hash: lost.hash.clone(),
    };
    assert_eq!(
        chain_start(s.as_ref(), &now.chain_id).await.lost,
        std::slice::from_ref(&expected)
    );
    assert!(
        chain_start(s.as_ref(), &kept.chain_id)
            .await
            .lost
            .is_empty()
    );
    let report = verify_signed(s.as_ref()).await;
    assert!(report.problems.is_empty(), "{report:?}");
    assert_eq!(report.lost.len(), 1, "{report:?}");
    assert_eq!(report.lost[0].0, now.chain_id);
    assert_eq!(report.lost[0].2, expected);

    // Rolled back past the new chain's start: its head row is gone, and
    // the whole chain is named lost.
    f.exec(&format!(
        "DELETE FROM audit WHERE chain_id = '{}'",
        now.chain_id
    ))
    .await;
    f.exec(&format!(
        "DELETE FROM audit_heads WHERE chain_id = '{}'",
        now.chain_id
    ))
    .await;
    s.commit(vec![audit("token.issued", None)]).await.unwrap();
    let third = s.chain_head().unwrap();
    let start = chain_start(s.as_ref(), &third.chain_id).await;
    // The first loss again (the record naming it went with the chain),
    // and the chain that named it.
    assert_eq!(
        start.lost,
        [
            expected.clone(),
            scrip_store::Lost {
                chain_id: now.chain_id.clone(),
                from: 1,
                to: 2,
                hash: now.hash.clone(),
            }
        ]
    );

    // A writer whose commit failed for its own reason goes on in its chain,
    // and one that lost nothing names nothing.
    s.commit(vec![Write::InsertTask(Box::new(task(
        "t-dup", None, 5_000,
    )))])
    .await
    .unwrap();
    s.commit(vec![
        audit("token.issued", None),
        Write::InsertTask(Box::new(task("t-dup", None, 5_000))),
    ])
    .await
    .unwrap_err();
    s.commit(vec![audit("token.issued", None)]).await.unwrap();
    assert_eq!(s.chain_head().unwrap().chain_id, third.chain_id);
    let report = verify_signed(s.as_ref()).await;
    assert!(report.problems.is_empty(), "{report:?}");
    assert_eq!(report.lost.len(), 2, "{report:?}");
}

/// With a signer, each commit that appends audit records stores its
/// chain's head signed, in the same transaction: nothing a writer
/// committed waits for a later checkpoint, so a writer killed at any point
/// leaves no unsigned record.
async fn every_commit_signs_its_head_once_a_signer_is_set(f: Fixture) {
    let s = &f.store;
    assert_eq!(s.latest_audit_seq().await.unwrap(), 0);
    s.commit(vec![audit("token.issued", None)]).await.unwrap();
    assert!(s.latest_checkpoints().await.unwrap().is_empty());
    let rows = s.audit_rows(0, u32::MAX).await.unwrap();
    assert_eq!(
        s.latest_audit_seq().await.unwrap(),
        rows.last().unwrap().seq,
        "the newest record's position"
    );
    let unsigned = verify_signed(s.as_ref()).await;
    assert_eq!(unsigned.problems.len(), 1, "{unsigned:?}");
    assert!(
        unsigned.problems[0]
            .what
            .contains("covered by no signed checkpoint"),
        "{unsigned:?}"
    );

    assert!(s.sign_heads_with(Arc::new(TestSigner { fail: false })));
    assert!(
        !s.sign_heads_with(Arc::new(TestSigner { fail: true })),
        "the first signer stays"
    );
    for n in 1..=3 {
        s.commit(vec![
            audit("token.issued", None),
            audit("token.issued", None),
        ])
        .await
        .unwrap();
        let head = s.chain_head().unwrap();
        let signed = s.latest_checkpoints().await.unwrap();
        assert_eq!(signed.len(), 1, "one row a chain: {signed:?}");
        assert_eq!(
            (
                signed[0].chain_id.as_str(),
                signed[0].chain_seq,
                signed[0].hash.as_str()
            ),
            (head.chain_id.as_str(), head.chain_seq, head.hash.as_str()),
            "commit {n}"
        );
        let report = verify_signed(s.as_ref()).await;
        assert!(report.problems.is_empty(), "{report:?}");
        assert_eq!(report.unsigned, 0);
        assert!(report.vouched.is_empty(), "{report:?}");
    }
    // A commit without an audit record leaves the signed head alone.
    let before = s.latest_checkpoints().await.unwrap();
    s.commit(vec![Write::InsertTask(Box::new(task("t1", None, 5_000)))])
        .await
        .unwrap();
    assert_eq!(s.latest_checkpoints().await.unwrap(), before);

    // Another writer signs its own chain; its start links this one's head.
    let other = f.replica().await;
    other.sign_heads_with(Arc::new(TestSigner { fail: false }));
    other
        .commit(vec![audit("token.issued", None)])
        .await
        .unwrap();
    assert_eq!(s.latest_checkpoints().await.unwrap().len(), 2);
    let report = verify_signed(s.as_ref()).await;
    assert!(report.problems.is_empty(), "{report:?}");

    // A signer that fails fails the commit, which changes nothing: no
    // record is stored that its writer did not sign.
    let failing = f.replica().await;
    failing.sign_heads_with(Arc::new(TestSigner { fail: true }));
    let records = s.audit_rows(0, u32::MAX).await.unwrap().len();
    let err = failing
        .commit(vec![
            audit("token.issued", None),
            Write::InsertTask(Box::new(task("t2", None, 5_000))),
        ])
        .await
        .unwrap_err();
    assert!(
        matches!(&err, StoreError::Unavailable(m) if m.contains("cannot sign the audit chain head")),
        "{err:?}"
    );
    assert_eq!(s.audit_rows(0, u32::MAX).await.unwrap().len(), records);
    assert_eq!(s.task("t2").await.unwrap(), None);

    // Cutting the newest records is seen: the signed head names a record
    // that is gone.
    s.commit(vec![audit("token.issued", None)]).await.unwrap();
    let head = s.chain_head().unwrap();
    let rows = s.audit_rows(0, u32::MAX).await.unwrap();
    let kept: Vec<_> = rows
        .into_iter()
        .filter(|r| !(r.chain_id == head.chain_id && r.chain_seq == head.chain_seq))
        .collect();
    let checkpoints = s.latest_checkpoints().await.unwrap();
    let report = scrip_store::verify(&kept, &checkpoints, |_| true);
    assert!(
        report
            .problems
            .iter()
            .any(|p| p.what.contains("checkpointed record is missing")),
        "{report:?}"
    );
}

async fn checkpoints_and_chain_links_read_back(f: Fixture) {
    let s = &f.store;
    s.commit(vec![audit("token.issued", None)]).await.unwrap();
    let head = s.chain_head().unwrap();
    let c = Checkpoint {
        chain_id: head.chain_id.clone(),
        chain_seq: head.chain_seq,
        hash: head.hash.clone(),
        at_ms: 5_000,
        signature: "sig".into(),
    };
    s.commit(vec![Write::Checkpoint(Box::new(c.clone()))])
        .await
        .unwrap();
    assert_eq!(s.latest_checkpoints().await.unwrap(), vec![c.clone()]);
    // A newer checkpoint of the chain replaces it among the latest.
    s.commit(vec![audit("token.issued", None)]).await.unwrap();
    let head = s.chain_head().unwrap();
    let newer = Checkpoint {
        chain_seq: head.chain_seq,
        hash: head.hash.clone(),
        at_ms: 6_000,
        ..c.clone()
    };
    s.commit(vec![Write::Checkpoint(Box::new(newer.clone()))])
        .await
        .unwrap();
    assert_eq!(s.latest_checkpoints().await.unwrap(), vec![newer]);
    // A second writer links to the first one's head.
    let other = f.replica().await;
    other
        .commit(vec![audit("token.issued", None)])
        .await
        .unwrap();
    assert_eq!(s.chain_links().await.unwrap(), vec![head.clone()]);
    // A third writer links to both other heads, in the order they were written.
    let other_head = other.chain_head().unwrap();
    s.commit(vec![audit("token.issued", None)]).await.unwrap();
    let s_head = s.chain_head().unwrap();
    let third = f.replica().await;
    third
        .commit(vec![audit("token.issued", None)])
        .await
        .unwrap();
    assert_eq!(
        s.chain_links().await.unwrap(),
        vec![head.clone(), other_head.clone(), s_head.clone()]
    );
    // A fourth links only what moved since: the third's head. The others
    // are linked as far as they go already, and stay covered through the
    // chains that link them; linking every head at every start would grow
    // with the square of the chains.
    let third_head = third.chain_head().unwrap();
    let fourth = f.replica().await;
    fourth
        .commit(vec![audit("token.issued", None)])
        .await
        .unwrap();
    assert_eq!(
        s.chain_links().await.unwrap(),
        vec![head, other_head, s_head, third_head]
    );
}

async fn keys_are_published_until_their_time(f: Fixture) {
    let s = &f.store;
    let key = |kid: &str, created_at: u64| StoredKey {
        kid: kid.into(),
        purpose: KeyPurpose::Signing,
        alg: "ES256".into(),
        public_jwk: format!("{{\"kid\":\"{kid}\"}}"),
        sealed: "sealed".into(),
        created_at,
        active_at: created_at + 10,
        retired_at: None,
        publish_until: None,
    };
    let insert = |k: StoredKey, after: Option<&str>| Write::InsertKey {
        key: Box::new(k),
        after: after.map(str::to_owned),
    };
    s.commit(vec![insert(key("k1", 100), None)]).await.unwrap();
    // A kid that exists.
    let err = s
        .commit(vec![insert(key("k1", 200), Some("k1"))])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    s.commit(vec![
        insert(key("k2", 200), Some("k1")),
        Write::RetireKey {
            kid: "k1".into(),
            at: 210,
            publish_until: 500,
        },
    ])
    .await
    .unwrap();
    let keys = s.keys(499).await.unwrap();
    assert_eq!(keys.len(), 2);
    assert_eq!(keys[0].kid, "k1");
    assert_eq!(
        (keys[0].retired_at, keys[0].publish_until),
        (Some(210), Some(500))
    );
    assert_eq!(keys[1], key("k2", 200));
    // Retiring twice keeps the first retirement: the second is a conflict,
    // and what came with it (another writer's record of the retirement)
    // is not committed either.
    let err = s
        .commit(vec![
            Write::RetireKey {
                kid: "k1".into(),
                at: 300,
                publish_until: 900,
            },
            Write::Audit(Box::new(AuditEvent {
                event: "key.retired".into(),
                ..AuditEvent::default()
            })),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(s.keys(499).await.unwrap()[0].publish_until, Some(500));
    assert!(
        s.audit(&AuditFilter::default())
            .await
            .unwrap()
            .iter()
            .all(|a| a.event != "key.retired"),
        "the losing retirement's record was committed"
    );
    let now: Vec<String> = s
        .keys(500)
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.kid)
        .collect();
    assert_eq!(now, ["k2"]);
    s.commit(vec![Write::PurgeRevocations {
        now: 500,
        limit: 10_000,
    }])
    .await
    .unwrap();
    assert_eq!(s.keys(0).await.unwrap().len(), 1);

    // Withdrawn (a key that leaked): unpublished at once, whatever the
    // reader's clock, retired or not; a key added after follows the newest
    // key still published; an unknown kid is a conflict that commits
    // nothing.
    s.commit(vec![insert(key("k3", 600), Some("k2"))])
        .await
        .unwrap();
    s.commit(vec![Write::WithdrawKey {
        kid: "k2".into(),
        at: 700,
    }])
    .await
    .unwrap();
    let left: Vec<(String, Option<u64>, Option<u64>)> = s
        .keys(0)
        .await
        .unwrap()
        .into_iter()
        .map(|k| (k.kid, k.retired_at, k.publish_until))
        .collect();
    assert_eq!(left, [("k3".into(), None, None)]);
    // k3 withdrawn too: a key added next follows no withdrawn one (their
    // rows not purged yet are passed over).
    s.commit(vec![Write::WithdrawKey {
        kid: "k3".into(),
        at: 705,
    }])
    .await
    .unwrap();
    let err = s
        .commit(vec![insert(key("k4", 705), Some("k3"))])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    s.commit(vec![insert(key("k4", 705), None)]).await.unwrap();
    let now: Vec<String> = s
        .keys(700)
        .await
        .unwrap()
        .into_iter()
        .map(|k| k.kid)
        .collect();
    assert_eq!(now, ["k4"]);
    let err = s
        .commit(vec![
            Write::WithdrawKey {
                kid: "nope".into(),
                at: 700,
            },
            Write::Audit(Box::new(AuditEvent {
                event: "key.withdrawn".into(),
                ..AuditEvent::default()
            })),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert!(
        s.audit(&AuditFilter::default())
            .await
            .unwrap()
            .iter()
            .all(|a| a.event != "key.withdrawn")
    );
}

/// Writers that plan the same key at once (replicas starting on an empty
/// store, or rotating together) add one between them: a key is added only
/// after the newest of its purpose its writer saw.
async fn a_key_is_added_only_after_the_newest_its_writer_saw(f: Fixture) {
    let s = &f.store;
    let key = |kid: &str, purpose: KeyPurpose, active_at: u64| StoredKey {
        kid: kid.into(),
        purpose,
        alg: "ES256".into(),
        public_jwk: format!("{{\"kid\":\"{kid}\"}}"),
        sealed: "sealed".into(),
        created_at: 100,
        active_at,
        retired_at: None,
        publish_until: None,
    };
    let insert = |k: StoredKey, after: Option<&str>| Write::InsertKey {
        key: Box::new(k),
        after: after.map(str::to_owned),
    };
    let kids = |keys: Vec<StoredKey>| keys.into_iter().map(|k| k.kid).collect::<Vec<_>>();
    s.commit(vec![insert(key("a", KeyPurpose::Signing, 100), None)])
        .await
        .unwrap();
    // A second first key, from a writer that saw none: refused, and the
    // whole batch with it.
    let err = s
        .commit(vec![
            insert(key("c1", KeyPurpose::Checkpoint, 100), None),
            insert(key("b", KeyPurpose::Signing, 100), None),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(kids(s.keys(0).await.unwrap()), ["a"]);
    // Each purpose has its own newest.
    s.commit(vec![insert(key("c1", KeyPurpose::Checkpoint, 100), None)])
        .await
        .unwrap();
    s.commit(vec![insert(key("m", KeyPurpose::Signing, 200), Some("a"))])
        .await
        .unwrap();
    // A rotation planned from `a`, which `m` has replaced: refused.
    let err = s
        .commit(vec![insert(key("n", KeyPurpose::Signing, 300), Some("a"))])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    // The newest is by `active_at`, then by `kid` as bytes: `Z` comes
    // before `n`, which a locale's collation would not say.
    s.commit(vec![insert(key("n", KeyPurpose::Signing, 300), Some("m"))])
        .await
        .unwrap();
    s.commit(vec![insert(key("Z", KeyPurpose::Signing, 300), Some("n"))])
        .await
        .unwrap();
    let err = s
        .commit(vec![insert(key("o", KeyPurpose::Signing, 400), Some("Z"))])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    s.commit(vec![insert(key("o", KeyPurpose::Signing, 400), Some("n"))])
        .await
        .unwrap();
    // A key it follows that is not there.
    let err = s
        .commit(vec![insert(
            key("p", KeyPurpose::Checkpoint, 500),
            Some("nope"),
        )])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    let mut all = kids(s.keys(0).await.unwrap());
    all.sort();
    assert_eq!(all, ["Z", "a", "c1", "m", "n", "o"]);
}

async fn commits_signal_what_changed(f: Fixture) {
    let s = &f.store;
    let mut changes = s.changes();
    let seen = *changes.borrow_and_update();
    s.commit(vec![audit("token.issued", None)]).await.unwrap();
    s.commit(vec![Write::RevokeToken {
        jti: "j".into(),
        task_id: "t".into(),
        expires_at: 9_000,
        at: 1_000,
    }])
    .await
    .unwrap();
    tokio::time::timeout(std::time::Duration::from_secs(5), changes.changed())
        .await
        .unwrap()
        .unwrap();
    let now = *changes.borrow_and_update();
    assert!(now.revocations > seen.revocations);
}

async fn secrets_keep_their_versions(f: Fixture) {
    let s = &f.store;
    let put = |name: &str, version: u32, created_at: u64, purge: u64| Write::PutSecret {
        secret: Box::new(SecretRecord {
            name: name.into(),
            action: "read".into(),
            version,
            sealed: vec![0, 1, 2, 255, u8::try_from(version).unwrap()],
            created_at,
            retired_at: None,
        }),
        purge_retired_before: purge,
    };
    s.commit(vec![put("legacy", 1, 100, 0)]).await.unwrap();
    s.commit(vec![put("legacy", 2, 200, 0)]).await.unwrap();
    s.commit(vec![put("other", 1, 150, 0)]).await.unwrap();
    let v = s.secret_versions("legacy", "read").await.unwrap();
    assert_eq!(
        v.iter()
            .map(|r| (r.version, r.retired_at))
            .collect::<Vec<_>>(),
        [(2, None), (1, Some(200))]
    );
    assert_eq!(v[0].sealed, [0, 1, 2, 255, 2], "bytes round-trip");
    // The same version twice is refused and changes nothing.
    let err = s.commit(vec![put("legacy", 2, 250, 0)]).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(s.secret_versions("legacy", "read").await.unwrap(), v);
    // Also when its purge would take the version already stored (no
    // grace), or the version is older than the newest: two processes that
    // read the same newest version cannot both store the next.
    for (version, purge) in [(2, 250), (1, 250), (1, 0)] {
        let err = s
            .commit(vec![put("legacy", version, 250, purge)])
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
        assert_eq!(s.secret_versions("legacy", "read").await.unwrap(), v);
    }
    // A third version purges versions retired before its purge time.
    s.commit(vec![put("legacy", 3, 300, 250)]).await.unwrap();
    let all: Vec<(String, u32)> = s
        .secrets()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.name, r.version))
        .collect();
    assert_eq!(
        all,
        [
            ("legacy".into(), 3),
            ("legacy".into(), 2),
            ("other".into(), 1)
        ]
    );
    assert!(s.secret_versions("nope", "read").await.unwrap().is_empty());

    // Deleted: every version of that name and action, nothing else; a
    // second delete is a conflict that commits nothing, its record included.
    s.commit(vec![Write::PutSecret {
        secret: Box::new(SecretRecord {
            name: "legacy".into(),
            action: "write".into(),
            version: 1,
            sealed: vec![1],
            created_at: 400,
            retired_at: None,
        }),
        purge_retired_before: 0,
    }])
    .await
    .unwrap();
    let delete = |through| Write::DeleteSecret {
        name: "legacy".into(),
        action: "read".into(),
        through,
    };
    // Read through version 2, but 3 is stored: a conflict, nothing goes.
    let err = s.commit(vec![delete(2)]).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(s.secret_versions("legacy", "read").await.unwrap().len(), 2);
    s.commit(vec![delete(3)]).await.unwrap();
    assert!(
        s.secret_versions("legacy", "read")
            .await
            .unwrap()
            .is_empty()
    );
    let left: Vec<(String, String, u32)> = s
        .secrets()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.name, r.action, r.version))
        .collect();
    assert_eq!(
        left,
        [
            ("legacy".into(), "write".into(), 1),
            ("other".into(), "read".into(), 1)
        ]
    );
    let err = s
        .commit(vec![
            delete(3),
            Write::Audit(Box::new(AuditEvent {
                event: "secret.deleted".into(),
                ..AuditEvent::default()
            })),
        ])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert!(
        s.audit(&AuditFilter::default())
            .await
            .unwrap()
            .iter()
            .all(|a| a.event != "secret.deleted")
    );
}

/// A sealed value is replaced only where it is still what was read: a key
/// or version that went, or changed, is a conflict that commits nothing
/// (the reseal's record included); nothing else of the row changes.
async fn a_sealed_value_is_replaced_only_as_read(f: Fixture) {
    let s = &f.store;
    let key = StoredKey {
        kid: "k1".into(),
        purpose: KeyPurpose::Signing,
        alg: "ES256".into(),
        public_jwk: "{\"kid\":\"k1\"}".into(),
        sealed: "under-old".into(),
        created_at: 100,
        active_at: 100,
        retired_at: None,
        publish_until: None,
    };
    let secret = |version: u32, sealed: Vec<u8>| SecretRecord {
        name: "legacy".into(),
        action: "read".into(),
        version,
        sealed,
        created_at: 100 + u64::from(version),
        retired_at: None,
    };
    s.commit(vec![
        Write::InsertKey {
            key: Box::new(key.clone()),
            after: None,
        },
        Write::PutSecret {
            secret: Box::new(secret(1, vec![1, 0, 255])),
            purge_retired_before: 0,
        },
    ])
    .await
    .unwrap();
    let reseal_secret = |version: u32, from: Vec<u8>, to: Vec<u8>| Write::ResealSecret {
        name: "legacy".into(),
        action: "read".into(),
        version,
        from,
        to,
    };
    let record = || {
        Write::Audit(Box::new(AuditEvent {
            event: "kek.resealed".into(),
            ..AuditEvent::default()
        }))
    };
    for wrong in [
        vec![
            Write::ResealKey {
                kid: "k1".into(),
                from: "under-another".into(),
                to: "under-new".into(),
            },
            record(),
        ],
        vec![
            Write::ResealKey {
                kid: "k2".into(),
                from: "under-old".into(),
                to: "under-new".into(),
            },
            record(),
        ],
        vec![reseal_secret(1, vec![1, 0], vec![9]), record()],
        vec![reseal_secret(2, vec![1, 0, 255], vec![9]), record()],
        // One right, one wrong: neither.
        vec![
            Write::ResealKey {
                kid: "k1".into(),
                from: "under-old".into(),
                to: "under-new".into(),
            },
            reseal_secret(1, vec![1, 0, 254], vec![9]),
            record(),
        ],
    ] {
        let err = s.commit(wrong).await.unwrap_err();
        assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    }
    assert_eq!(s.keys(0).await.unwrap(), std::slice::from_ref(&key));
    assert_eq!(s.secrets().await.unwrap(), [secret(1, vec![1, 0, 255])]);
    assert!(
        s.audit(&AuditFilter::default())
            .await
            .unwrap()
            .iter()
            .all(|a| a.event != "kek.resealed"),
        "a refused reseal's record was committed"
    );
    s.commit(vec![
        Write::ResealKey {
            kid: "k1".into(),
            from: "under-old".into(),
            to: "under-new".into(),
        },
        reseal_secret(1, vec![1, 0, 255], vec![7, 0, 8]),
        record(),
    ])
    .await
    .unwrap();
    assert_eq!(
        s.keys(0).await.unwrap(),
        [StoredKey {
            sealed: "under-new".into(),
            ..key
        }]
    );
    assert_eq!(s.secrets().await.unwrap(), [secret(1, vec![7, 0, 8])]);
    assert_eq!(
        s.audit(&AuditFilter::default())
            .await
            .unwrap()
            .iter()
            .filter(|a| a.event == "kek.resealed")
            .count(),
        1
    );
}

/// One agent's tasks (its sub-agents' included) may have at most
/// [`scrip_store::MAX_PENDING_PER_AGENT`] steps waiting at once, whatever
/// the tasks; the same subject at another issuer, another agent, expired
/// steps and steps of an ended task (nobody may decide them) do not count;
/// a decision makes room.
async fn an_agent_has_at_most_fifty_steps_waiting(f: Fixture) {
    let s = &f.store;
    assert_eq!(scrip_store::MAX_PENDING_PER_AGENT, 50);
    let mut writes: Vec<Write> = (0..6)
        .map(|i| Write::InsertTask(Box::new(task(&format!("t{i}"), None, 9_000))))
        .collect();
    writes.push(Write::InsertTask(Box::new(task("sub", Some("t0"), 9_000))));
    let mut other = task("u", None, 9_000);
    other.agent = identity("agent-2");
    let mut elsewhere = task("w", None, 9_000);
    elsewhere.agent.issuer = "https://other.test".into();
    writes.push(Write::InsertTask(Box::new(other)));
    writes.push(Write::InsertTask(Box::new(elsewhere)));
    // Expired by 1,000: it does not count.
    writes.push(Write::InsertApproval(Box::new(pending(
        "old", "t5", "old", 300,
    ))));
    s.commit(writes).await.unwrap();
    let put = |id: String, task: &str, step: String| {
        s.commit(vec![Write::InsertApproval(Box::new(pending(
            &id, task, &step, 1_000,
        )))])
    };
    // 49 across t0..t4 (ten at most each), the fiftieth on the sub-task.
    for n in 0..49 {
        put(format!("a{n}"), &format!("t{}", n / 10), format!("step{n}"))
            .await
            .unwrap();
    }
    put("a49".into(), "sub", "step49".into()).await.unwrap();
    assert_eq!(
        s.agent_pending_approvals("https://idp.test", "agent-1", 1_000)
            .await
            .unwrap(),
        50
    );
    let err = put("a50".into(), "t5", "step50".into()).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(s.approval("a50").await.unwrap(), None);
    for (task, id) in [("u", "b0"), ("w", "c0")] {
        put(id.into(), task, "step0".into()).await.unwrap();
    }
    assert_eq!(
        s.agent_pending_approvals("https://other.test", "agent-1", 1_000)
            .await
            .unwrap(),
        1
    );
    // Past their expiry, nothing counts.
    assert_eq!(
        s.agent_pending_approvals("https://idp.test", "agent-1", 1_600)
            .await
            .unwrap(),
        0
    );
    s.commit(vec![Write::UpdateApproval {
        id: "a0".into(),
        from: ApprovalState::Pending,
        to: ApprovalState::Denied,
        by: Some("alice".into()),
        at: 1_001,
        reason: Some("no".into()),
        token_jti: None,
    }])
    .await
    .unwrap();
    put("a50".into(), "t5", "step50".into()).await.unwrap();
    put("a51".into(), "t5", "step51".into()).await.unwrap_err();
    // t4's nine steps wait for nobody once it has ended.
    s.commit(vec![Write::EndTask {
        id: "t4".into(),
        at: 1_002,
        reason: "done".into(),
        grace: 0,
    }])
    .await
    .unwrap();
    assert_eq!(
        s.agent_pending_approvals("https://idp.test", "agent-1", 1_002)
            .await
            .unwrap(),
        41
    );
    put("a51".into(), "t5", "step51".into()).await.unwrap();
}

/// The tasks of one tree that one sub-agent acts in may have at most
/// [`scrip_store::MAX_PENDING_PER_ACTOR`] steps waiting at once, however
/// many such tasks it holds (delegating to itself); the agent's own tasks,
/// another sub-agent (one it delegated to included), the same subject at
/// another issuer, the same sub-agent in another tree or for another
/// agent, expired steps and an ended task's do not count against it.
async fn a_sub_agent_has_at_most_ten_steps_waiting_for_an_agent(f: Fixture) {
    let s = &f.store;
    assert_eq!(scrip_store::MAX_PENDING_PER_ACTOR, 10);
    let acting = |id: &str, sub: &str, iss: &str| {
        let mut t = task(id, Some("r"), 9_000);
        t.actor = Some(Actor {
            sub: sub.into(),
            iss: Some(iss.into()),
            act: None,
        });
        t
    };
    let mut writes = vec![Write::InsertTask(Box::new(task("r", None, 9_000)))];
    for id in ["s1", "s2", "s3"] {
        writes.push(Write::InsertTask(Box::new(acting(
            id,
            "helper",
            "https://idp.test",
        ))));
    }
    writes.push(Write::InsertTask(Box::new(acting(
        "elsewhere",
        "helper",
        "https://other.test",
    ))));
    writes.push(Write::InsertTask(Box::new(acting(
        "another",
        "reviewer",
        "https://idp.test",
    ))));
    // The helper delegated to the reviewer: the helper is in its chain, not
    // its current actor.
    let mut nested = acting("nested", "reviewer", "https://idp.test");
    nested.parent = Some("s1".into());
    if let Some(a) = nested.actor.as_mut() {
        a.act = Some(Box::new(Actor {
            sub: "helper".into(),
            iss: Some("https://idp.test".into()),
            act: None,
        }));
    }
    writes.push(Write::InsertTask(Box::new(nested)));
    // The same helper in another tree of the agent.
    writes.push(Write::InsertTask(Box::new(task("q", None, 9_000))));
    let mut other_tree = acting("q-helper", "helper", "https://idp.test");
    other_tree.parent = Some("q".into());
    writes.push(Write::InsertTask(Box::new(other_tree)));
    let mut root2 = task("r2", None, 9_000);
    root2.agent = identity("agent-2");
    let mut for_agent2 = acting("s-agent2", "helper", "https://idp.test");
    for_agent2.parent = Some("r2".into());
    for_agent2.agent = identity("agent-2");
    writes.push(Write::InsertTask(Box::new(root2)));
    writes.push(Write::InsertTask(Box::new(for_agent2)));
    // Expired by 1,000: it does not count.
    writes.push(Write::InsertApproval(Box::new(pending(
        "old", "s1", "old", 300,
    ))));
    s.commit(writes).await.unwrap();
    let put = |id: String, task: &str, step: String| {
        s.commit(vec![Write::InsertApproval(Box::new(pending(
            &id, task, &step, 1_000,
        )))])
    };
    // Ten across s1..s3.
    for n in 0..10 {
        let t = ["s1", "s2", "s3"][n % 3];
        put(format!("a{n}"), t, format!("step{n}")).await.unwrap();
    }
    for t in ["s1", "s2", "s3"] {
        assert_eq!(
            s.actor_pending_approvals(t, 1_000).await.unwrap(),
            10,
            "{t}"
        );
    }
    // An eleventh on any of them is refused, and nothing is stored.
    let err = put("a10".into(), "s3", "step10".into()).await.unwrap_err();
    assert!(matches!(err, StoreError::Conflict(_)), "{err:?}");
    assert_eq!(s.approval("a10").await.unwrap(), None);
    // The others are not held back.
    for (i, t) in ["r", "elsewhere", "another", "s-agent2"]
        .into_iter()
        .enumerate()
    {
        put(format!("b{i}"), t, "other".into()).await.unwrap();
        assert_eq!(
            s.actor_pending_approvals(t, 1_000).await.unwrap(),
            usize::from(t != "r"),
            "{t}"
        );
    }
    assert_eq!(
        s.actor_pending_approvals("unknown", 1_000).await.unwrap(),
        0
    );
    put("n0".into(), "nested", "other".into()).await.unwrap();
    assert_eq!(s.actor_pending_approvals("nested", 1_000).await.unwrap(), 2);
    put("q0".into(), "q-helper", "other".into()).await.unwrap();
    assert_eq!(
        s.actor_pending_approvals("q-helper", 1_000).await.unwrap(),
        1
    );
    assert_eq!(s.actor_pending_approvals("s1", 1_000).await.unwrap(), 10);
    // Past their expiry, nothing counts.
    assert_eq!(s.actor_pending_approvals("s1", 1_600).await.unwrap(), 0);
    // s1's four steps wait for nobody once it has ended.
    s.commit(vec![Write::EndTask {
        id: "s1".into(),
        at: 1_002,
        reason: "done".into(),
        grace: 0,
    }])
    .await
    .unwrap();
    assert_eq!(s.actor_pending_approvals("s2", 1_002).await.unwrap(), 6);
    put("a10".into(), "s3", "step10".into()).await.unwrap();
}
