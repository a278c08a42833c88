//! A property test over real HTTP exchanges: across random sequences of task
//! starts, delegations, access-token exchanges and revocations over a
//! growing tree of tasks, no derived token has a grant, an audience or an
//! expiry that its ancestors lacked, the `act` chain is kept, and no token of
//! an ended task is active.
//!
//! The server's only policy permits everything, so every bound checked here
//! is one scrip enforces itself, whatever the policy says.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed unwrap is a failed test"
)]

mod common;

use std::collections::BTreeSet;

use common::*;
use proptest::prelude::*;
use proptest::test_runner::{Config as ProptestConfig, TestCaseError, TestRunner};
use serde_json::{Value, json};

/// The deepest delegation the test server allows (small, to reach it often).
const MAX_DEPTH: u32 = 2;

/// Every grant the test tools offer.
const GRANTS: &[&str] = &[
    "github:read",
    "github:write",
    "github:delete",
    "jira:read",
    "jira:write",
    "deploy:read",
    "deploy:execute",
    "deploy:delete",
];

const TOOLS: &[&str] = &["github", "jira", "deploy"];

/// Actions asked for, including one no tool has.
const ACTIONS: &[&str] = &["read", "write", "delete", "execute", "admin"];

const AGENT: &str = "system:serviceaccount:agents:coder";

/// The scope a delegation asks for.
#[derive(Debug, Clone)]
enum Scope {
    /// No `scope`: the parent's grants.
    Default,
    /// The parent's grants picked by this mask (at least one).
    Within(Vec<bool>),
    /// Any grants, often beyond the parent's.
    Any(Vec<&'static str>),
}

#[derive(Debug, Clone)]
enum Op {
    Start {
        grants: Vec<&'static str>,
        ttl: Option<u64>,
    },
    Delegate {
        /// Which live task (or, with `ended`, which task of all).
        from: usize,
        ended: bool,
        actor: usize,
        scope: Scope,
        ttl: Option<u64>,
    },
    Exchange {
        from: usize,
        /// Pick a tool and actions the task holds (picked by `mask`).
        within: bool,
        mask: Vec<bool>,
        tool: &'static str,
        actions: Option<Vec<&'static str>>,
    },
    RevokeTask(usize),
    RevokeToken(usize),
}

fn op() -> impl Strategy<Value = Op> {
    let start = (
        proptest::sample::subsequence(GRANTS, 1..=5),
        proptest::option::of(60u64..7200),
    )
        .prop_map(|(grants, ttl)| Op::Start { grants, ttl });
    let scope = prop_oneof![
        1 => Just(Scope::Default),
        3 => proptest::collection::vec(any::<bool>(), GRANTS.len()).prop_map(Scope::Within),
        2 => proptest::sample::subsequence(GRANTS, 1..=3).prop_map(Scope::Any),
    ];
    let delegate = (
        any::<usize>(),
        proptest::bool::weighted(0.1),
        0..3usize,
        scope,
        proptest::option::of(60u64..10_000),
    )
        .prop_map(|(from, ended, actor, scope, ttl)| Op::Delegate {
            from,
            ended,
            actor,
            scope,
            ttl,
        });
    let exchange = (
        any::<usize>(),
        proptest::bool::weighted(0.7),
        proptest::collection::vec(any::<bool>(), ACTIONS.len()),
        proptest::sample::select(TOOLS),
        proptest::option::weighted(0.8, proptest::sample::subsequence(ACTIONS, 1..=3)),
    )
        .prop_map(|(from, within, mask, tool, actions)| Op::Exchange {
            from,
            within,
            mask,
            tool,
            actions,
        });
    prop_oneof![
        1 => start,
        4 => delegate,
        4 => exchange,
        1 => any::<usize>().prop_map(Op::RevokeTask),
        1 => any::<usize>().prop_map(Op::RevokeToken),
    ]
}

fn case() -> impl Strategy<Value = (Op, Vec<Op>)> {
    (
        (
            proptest::sample::subsequence(GRANTS, 1..=GRANTS.len()),
            proptest::option::of(60u64..7200),
        )
            .prop_map(|(grants, ttl)| Op::Start { grants, ttl }),
        proptest::collection::vec(op(), 1..30),
    )
}

/// A task the model knows.
#[derive(Debug)]
struct Task {
    token: String,
    txn: Value,
    parent: Option<usize>,
    grants: BTreeSet<String>,
    exp: u64,
    depth: u64,
    /// The `act` claim (`Null` for a root task).
    act: Value,
    revoked: bool,
}

/// An access token the model knows.
#[derive(Debug)]
struct Access {
    token: String,
    task: usize,
    revoked: bool,
}

#[derive(Default)]
struct Model {
    tasks: Vec<Task>,
    tokens: Vec<Access>,
}

impl Model {
    /// Whether the task or any ancestor has ended.
    fn ended(&self, mut i: usize) -> bool {
        loop {
            let t = &self.tasks[i];
            if t.revoked {
                return true;
            }
            match t.parent {
                Some(p) => i = p,
                None => return false,
            }
        }
    }

    fn live(&self) -> Vec<usize> {
        (0..self.tasks.len()).filter(|i| !self.ended(*i)).collect()
    }
}

fn set(s: &str) -> BTreeSet<String> {
    s.split_whitespace().map(str::to_owned).collect()
}

fn actions_at(grants: &BTreeSet<String>, tool: &str) -> BTreeSet<String> {
    grants
        .iter()
        .filter_map(|g| g.split_once(':'))
        .filter(|(t, _)| *t == tool)
        .map(|(_, a)| a.to_owned())
        .collect()
}

/// The sub-agents: identity token, subject, issuer.
fn actor(s: &TestServer, which: usize) -> (String, String, &'static str) {
    match which {
        0 => (
            s.k8s.kubernetes("agents", "helper"),
            "system:serviceaccount:agents:helper".into(),
            K8S_ISSUER,
        ),
        1 => (
            s.spiffe.spiffe("acme.example", "/worker"),
            "spiffe://acme.example/worker".into(),
            SPIFFE_ISSUER,
        ),
        _ => (
            s.github.github("acme/reviewer"),
            "repo:acme/reviewer:ref:refs/heads/main".into(),
            GITHUB_ISSUER,
        ),
    }
}

async fn start(
    s: &TestServer,
    m: &mut Model,
    grants: &[&str],
    ttl: Option<u64>,
) -> Result<(), TestCaseError> {
    let identity = s.k8s.kubernetes("agents", "coder");
    let scope = grants.join(" ");
    let r = s
        .try_start_task(&identity, &scope, "dev", "work on JIRA-7", ttl)
        .await;
    prop_assert_eq!(r.status, 200, "start {}: {}", scope, r.text);
    let token = r.body["access_token"].as_str().unwrap().to_owned();
    let (_, c) = decode_parts(&token);
    let got = set(c["scope"].as_str().unwrap());
    prop_assert_eq!(&got, &set(&scope), "a permit-all policy allows every grant");
    prop_assert_eq!(c["tctx"]["depth"].as_u64(), Some(0));
    prop_assert!(c.get("act").is_none(), "a root task has no act: {}", c);
    m.tasks.push(Task {
        token,
        txn: c["txn"].clone(),
        parent: None,
        grants: got,
        exp: c["exp"].as_u64().unwrap(),
        depth: 0,
        act: Value::Null,
        revoked: false,
    });
    Ok(())
}

async fn delegate(
    s: &TestServer,
    m: &mut Model,
    from: usize,
    ended: bool,
    which: usize,
    scope: &Scope,
    ttl: Option<u64>,
) -> Result<(), TestCaseError> {
    let candidates = if ended {
        (0..m.tasks.len()).collect()
    } else {
        m.live()
    };
    if candidates.is_empty() {
        return Ok(());
    }
    let p = candidates[from % candidates.len()];
    let parent = &m.tasks[p];
    let parent_grants: Vec<&String> = parent.grants.iter().collect();
    let asked: Option<BTreeSet<String>> = match scope {
        Scope::Default => None,
        Scope::Within(mask) => {
            let mut picked: BTreeSet<String> = parent_grants
                .iter()
                .zip(mask)
                .filter(|(_, keep)| **keep)
                .map(|(g, _)| (*g).clone())
                .collect();
            if picked.is_empty() {
                picked.insert(parent_grants[0].clone());
            }
            Some(picked)
        }
        Scope::Any(gs) => Some(gs.iter().map(|g| (*g).to_owned()).collect()),
    };
    let scope_text = asked
        .as_ref()
        .map(|a| a.iter().cloned().collect::<Vec<_>>().join(" "));
    let details = ttl.map(|t| json!({ "ttl": t }).to_string());
    let (identity, actor_sub, actor_iss) = actor(s, which);
    let mut form = vec![
        ("grant_type", TOKEN_EXCHANGE),
        ("subject_token", parent.token.as_str()),
        ("subject_token_type", TXN),
        ("actor_token", identity.as_str()),
        ("actor_token_type", JWT),
        ("requested_token_type", TXN),
    ];
    if let Some(sc) = scope_text.as_deref() {
        form.push(("scope", sc));
    }
    if let Some(d) = details.as_deref() {
        form.push(("request_details", d));
    }
    let r = s.post_form("/token", &form).await;

    let parent_ended = m.ended(p);
    let too_deep = parent.depth + 1 > u64::from(MAX_DEPTH);
    let beyond = asked.as_ref().is_some_and(|a| !a.is_subset(&parent.grants));
    let expected_error = if parent_ended || too_deep {
        Some("invalid_request")
    } else if beyond {
        Some("invalid_scope")
    } else {
        None
    };
    let what = format!(
        "delegate from task {p} (depth {}, grants {:?}, ended {parent_ended}) scope {scope_text:?} ttl {ttl:?}",
        parent.depth, parent.grants
    );
    if let Some(code) = expected_error {
        prop_assert_eq!(
            (r.status, r.body["error"].as_str()),
            (400, Some(code)),
            "{}: {}",
            what,
            r.text
        );
        return Ok(());
    }
    prop_assert_eq!(r.status, 200, "{}: {}", what, r.text);
    let token = r.body["access_token"].as_str().unwrap().to_owned();
    let (h, c) = decode_parts(&token);
    prop_assert_eq!(&h["typ"], &json!("txntoken+jwt"));
    let grants = set(c["scope"].as_str().unwrap());
    prop_assert_eq!(&r.body["scope"], &c["scope"]);
    prop_assert!(
        grants.is_subset(&parent.grants),
        "{}: child grants {:?} beyond the parent's",
        what,
        grants
    );
    let want = asked.unwrap_or_else(|| parent.grants.clone());
    prop_assert_eq!(&grants, &want, "{}", what);
    let exp = c["exp"].as_u64().unwrap();
    prop_assert!(
        exp <= parent.exp,
        "{}: child exp {} after the parent's {}",
        what,
        exp,
        parent.exp
    );
    if let Some(t) = ttl {
        prop_assert!(
            exp <= c["iat"].as_u64().unwrap() + t,
            "{}: ttl ignored",
            what
        );
    }
    let depth = c["tctx"]["depth"].as_u64().unwrap();
    prop_assert_eq!(depth, parent.depth + 1, "{}", what);
    prop_assert!(depth <= u64::from(MAX_DEPTH));
    prop_assert_eq!(&c["tctx"]["parent"], &parent.txn);
    prop_assert_eq!(&c["sub"], &json!(AGENT));
    let mut act = json!({ "sub": actor_sub, "iss": actor_iss });
    if !parent.act.is_null() {
        act["act"] = parent.act.clone();
    }
    prop_assert_eq!(&c["act"], &act, "{}", what);
    m.tasks.push(Task {
        token,
        txn: c["txn"].clone(),
        parent: Some(p),
        grants,
        exp,
        depth,
        act,
        revoked: false,
    });
    Ok(())
}

async fn exchange(
    s: &TestServer,
    m: &mut Model,
    from: usize,
    (within, mask): (bool, &[bool]),
    tool: &str,
    actions: Option<&[&str]>,
) -> Result<(), TestCaseError> {
    let live = m.live();
    if live.is_empty() {
        return Ok(());
    }
    let i = live[from % live.len()];
    let task = &m.tasks[i];
    let mut tool = tool;
    let mut scope = actions.map(|a| a.join(" "));
    if within {
        let tools: Vec<&str> = TOOLS
            .iter()
            .copied()
            .filter(|t| !actions_at(&task.grants, t).is_empty())
            .collect();
        tool = tools[from % tools.len()];
        if scope.is_some() {
            let held: Vec<String> = actions_at(&task.grants, tool).into_iter().collect();
            let mut picked: Vec<&str> = held
                .iter()
                .zip(mask)
                .filter(|(_, keep)| **keep)
                .map(|(a, _)| a.as_str())
                .collect();
            if picked.is_empty() {
                picked.push(&held[0]);
            }
            scope = Some(picked.join(" "));
        }
    }
    let actions: Option<Vec<&str>> = scope.as_deref().map(|s| s.split(' ').collect());
    let actions = actions.as_deref();
    let r = s.access_token(&task.token, tool, scope.as_deref()).await;
    let held = actions_at(&task.grants, tool);
    let asked: Option<BTreeSet<String>> =
        actions.map(|a| a.iter().map(|x| (*x).to_owned()).collect());
    let ok = !held.is_empty() && asked.as_ref().is_none_or(|a| a.is_subset(&held));
    let what = format!(
        "exchange task {i} (grants {:?}) at {tool} scope {scope:?}",
        task.grants
    );
    if !ok {
        prop_assert_eq!(
            (r.status, r.body["error"].as_str()),
            (400, Some("invalid_scope")),
            "{}: {}",
            what,
            r.text
        );
        return Ok(());
    }
    prop_assert_eq!(r.status, 200, "{}: {}", what, r.text);
    let token = r.body["access_token"].as_str().unwrap().to_owned();
    let (h, c) = decode_parts(&token);
    prop_assert_eq!(&h["typ"], &json!("at+jwt"));
    prop_assert_eq!(&c["aud"], &json!(tool), "{}", what);
    let got = set(c["scope"].as_str().unwrap());
    prop_assert!(
        got.is_subset(&held),
        "{}: scope {:?} beyond the task's {:?}",
        what,
        got,
        held
    );
    prop_assert_eq!(&got, asked.as_ref().unwrap_or(&held), "{}", what);
    prop_assert!(
        c["exp"].as_u64().unwrap() <= task.exp,
        "{}: exp {} after the task's {}",
        what,
        c["exp"],
        task.exp
    );
    prop_assert_eq!(&c["txn"], &task.txn);
    prop_assert_eq!(&c["sub"], &json!(AGENT));
    if task.act.is_null() {
        prop_assert!(
            c.get("act").is_none(),
            "{}: act on a root task's token",
            what
        );
        prop_assert_eq!(&c["client_id"], &json!(AGENT));
    } else {
        prop_assert_eq!(&c["act"], &task.act, "{}", what);
        prop_assert_eq!(&c["client_id"], &task.act["sub"], "{}", what);
    }
    m.tokens.push(Access {
        token,
        task: i,
        revoked: false,
    });
    Ok(())
}

async fn run_case(s: &TestServer, first: &Op, ops: &[Op]) -> Result<(), TestCaseError> {
    let mut m = Model::default();
    for op in std::iter::once(first).chain(ops) {
        match op {
            Op::Start { grants, ttl } => start(s, &mut m, grants, *ttl).await?,
            Op::Delegate {
                from,
                ended,
                actor,
                scope,
                ttl,
            } => delegate(s, &mut m, *from, *ended, *actor, scope, *ttl).await?,
            Op::Exchange {
                from,
                within,
                mask,
                tool,
                actions,
            } => exchange(s, &mut m, *from, (*within, mask), tool, actions.as_deref()).await?,
            Op::RevokeTask(i) => {
                let i = i % m.tasks.len();
                let r = s.revoke(&m.tasks[i].token).await;
                prop_assert_eq!(r.status, 200, "revoke task: {}", r.text);
                m.tasks[i].revoked = true;
            }
            Op::RevokeToken(i) => {
                if m.tokens.is_empty() {
                    continue;
                }
                let i = i % m.tokens.len();
                let r = s.revoke(&m.tokens[i].token).await;
                prop_assert_eq!(r.status, 200, "revoke token: {}", r.text);
                m.tokens[i].revoked = true;
            }
        }
    }

    for (i, t) in m.tasks.iter().enumerate() {
        let r = s.introspect(&t.token).await;
        prop_assert_eq!(r.status, 200, "{}", r.text);
        if m.ended(i) {
            prop_assert_eq!(&r.body, &json!({"active": false}), "task {} ended", i);
        } else {
            prop_assert_eq!(&r.body["active"], &json!(true), "task {}: {}", i, r.text);
            prop_assert_eq!(&r.body["txn"], &t.txn);
            if t.act.is_null() {
                prop_assert!(r.body.get("act").is_none(), "{}", r.text);
            } else {
                prop_assert_eq!(&r.body["act"], &t.act);
            }
        }
    }
    for (j, a) in m.tokens.iter().enumerate() {
        let r = s.introspect(&a.token).await;
        prop_assert_eq!(r.status, 200, "{}", r.text);
        if a.revoked || m.ended(a.task) {
            prop_assert_eq!(
                &r.body,
                &json!({"active": false}),
                "token {} (task {}, revoked {}) should be inactive",
                j,
                a.task,
                a.revoked
            );
        } else {
            prop_assert_eq!(&r.body["active"], &json!(true), "token {}: {}", j, r.text);
            let act = &m.tasks[a.task].act;
            if act.is_null() {
                prop_assert!(r.body.get("act").is_none(), "{}", r.text);
            } else {
                prop_assert_eq!(&r.body["act"], act);
            }
        }
    }
    Ok(())
}

#[test]
fn delegated_tokens_never_exceed_their_ancestors() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    // The only policy permits everything: every bound is scrip's own.
    let policies = tempfile::tempdir().unwrap();
    std::fs::write(
        policies.path().join("permit-everything.cedar"),
        "@id(\"permit-everything\")\npermit (principal, action, resource);\n",
    )
    .unwrap();
    let policy_dir = policies.path().to_path_buf();
    let server = rt.block_on(TestServer::start_with(Options {
        edit: Some(Box::new(move |c| {
            c.policy_dir = policy_dir;
            c.max_delegation_depth = MAX_DEPTH;
            // Every case, and every shrinking step, starts tasks of one
            // agent on this one server: its pace is not what is tested.
            c.limits.tasks_per_minute = scrip_config::MAX_PER_MINUTE;
            c.limits.task_burst = scrip_config::MAX_BURST;
        })),
        ..Options::default()
    }));
    let mut runner = TestRunner::new(ProptestConfig {
        failure_persistence: None,
        ..ProptestConfig::with_cases(16)
    });
    let result = runner.run(&case(), |(first, ops)| {
        rt.block_on(run_case(&server, &first, &ops))
    });
    rt.block_on(server.stop());
    drop(policies);
    if let Err(e) = result {
        panic!("{e}");
    }
}
