//! Tamper evidence for the audit record: hash chains and their verification.
//!
//! Each writer (one server process) appends to its own chain, so several
//! replicas write at once without a global lock. A record's stored JSON
//! holds its `chain_id`, `chain_seq` and `prev_hash`; its hash is the SHA-256
//! of exactly that JSON. The first record of a chain (`chain.started`) links
//! to the heads of the chains already in the store, and each commit stores
//! its chain's head signed by the writer ([`HeadSigner`]; earlier versions
//! signed checkpoints from time to time). Together these detect an edited,
//! deleted, inserted, reordered or truncated record.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};

use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::AuditEvent;

/// The `prev_hash` of a chain's first record.
pub const GENESIS: &str = "";

/// SHA-256 of `data`, base64url.
#[must_use]
pub fn hash(data: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
        .encode(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref())
}

/// A fresh, random chain id.
pub(crate) fn new_chain_id() -> Result<String, crate::StoreError> {
    let mut bytes = [0u8; 12];
    aws_lc_rs::rand::fill(&mut bytes)
        .map_err(|_| crate::StoreError::Open("random generator failed".into()))?;
    Ok(base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes))
}

/// A reference to a record of a chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ChainLink {
    /// The chain.
    pub chain_id: String,
    /// The record's position in it (from 1).
    pub chain_seq: u64,
    /// The record's hash.
    pub hash: String,
}

/// Milliseconds since the epoch.
fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}

/// Signs a writer's chain head inside every commit that moves it, so that
/// no committed audit record waits for a signature: see
/// [`Store::sign_heads_with`](crate::Store::sign_heads_with).
pub trait HeadSigner: Send + Sync + std::fmt::Debug + 'static {
    /// The detached signature (base64url) of `message`, a
    /// [`Checkpoint::message`], as [`Checkpoint::signature`] holds it.
    ///
    /// # Errors
    /// Why it cannot sign; the commit then fails and changes nothing.
    fn sign(&self, message: &[u8]) -> Result<String, Box<dyn std::error::Error + Send + Sync>>;
}

/// The signer a writer's chains share, set once.
pub(crate) type Signer = Arc<OnceLock<Arc<dyn HeadSigner>>>;

/// Where a writer's chain stands.
#[derive(Debug, Clone)]
pub(crate) struct ChainState {
    pub id: String,
    pub seq: u64,
    pub head: String,
    /// The `replica` of the last record appended, carried into a chain
    /// that replaces this one.
    replica: String,
    /// Replaces a chain whose last commit may or may not have taken effect:
    /// it starts at the next commit of any kind (see [`Self::genesis_for`]).
    replaces: bool,
    /// Signs the head in each commit that moves it, once set.
    signer: Signer,
    /// The heads of the chains this writer wrote before this one (the
    /// [`MAX_PREDECESSORS`] latest), as it last saw them committed: the new
    /// chain's start checks that the store still holds each ([`Lost`]), so
    /// that a rollback past an earlier replacement names every chain it cut.
    predecessors: Vec<ChainLink>,
    /// The losses a start of this writer's chains has committed already:
    /// named again by a later start (the store still lacks them), but not
    /// logged as a new rollback.
    recorded: Vec<Lost>,
    /// The signed head this chain's row in `audit_heads` holds since its
    /// last commit: the next commit replaces that row only if it still holds
    /// it, so a store rolled back under this writer is noticed
    /// ([`crate::StoreError::RolledBack`]).
    stored: Option<ChainLink>,
}

/// Records a writer had committed that its store no longer holds, as the
/// `lost` of the `chain.started` record of the chain that replaced it: the
/// store was rolled back under the running writer (a failover to a standby
/// that had not received them, a backup restored in place). Signed with that
/// chain, so it is evidence of what was committed, not only of what is left.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Lost {
    /// The chain they belonged to.
    pub chain_id: String,
    /// The first position the store no longer holds.
    pub from: u64,
    /// The last position the writer had committed.
    pub to: u64,
    /// That last record's hash.
    pub hash: String,
}

/// The most earlier chains of a writer a new chain's start checks
/// ([`ChainState::predecessors`]): one is added each time a commit's outcome
/// is unknown or the store is found rolled back.
const MAX_PREDECESSORS: usize = 16;

/// A signed head to store in a commit ([`ChainState::signed_head`]).
#[derive(Debug, Clone)]
pub(crate) struct HeadWrite {
    /// The head.
    pub checkpoint: Checkpoint,
    /// The head the chain's row must hold for the commit to replace it;
    /// `None`: the chain has no row yet, and the commit inserts it.
    pub over: Option<ChainLink>,
}

impl ChainState {
    pub fn new(id: String, signer: Signer) -> Self {
        Self {
            id,
            seq: 0,
            head: GENESIS.to_owned(),
            replica: String::new(),
            replaces: false,
            signer,
            predecessors: Vec::new(),
            recorded: Vec::new(),
            stored: None,
        }
    }

    /// A new chain `id` replacing this one after a commit whose outcome is
    /// unknown.
    pub fn replaced_by(&self, id: String) -> Self {
        // A replacement that never wrote passes its predecessors on.
        let mut predecessors = self.predecessors.clone();
        predecessors.extend(self.link());
        let extra = predecessors.len().saturating_sub(MAX_PREDECESSORS);
        predecessors.drain(..extra);
        Self {
            replica: self.replica.clone(),
            replaces: true,
            predecessors,
            recorded: self.recorded.clone(),
            ..Self::new(id, self.signer.clone())
        }
    }

    /// The heads of the chains this writer wrote before this one, as it
    /// last saw them committed, while this chain has not started.
    pub fn predecessors(&self) -> &[ChainLink] {
        if self.seq == 0 {
            &self.predecessors
        } else {
            &[]
        }
    }

    /// Adds to `start` (a replacing chain's `chain.started`) what the store
    /// lost of `p`, one of its [`Self::predecessors`], given `held`, the
    /// last position of that chain the store holds (0: none), and says so
    /// in the log: as an error until a start recording it has committed
    /// (each try of that start's commit logs it), then at `info`.
    pub fn note_loss(&self, start: &mut AuditEvent, p: &ChainLink, held: u64) {
        if held >= p.chain_seq {
            return;
        }
        let lost = Lost {
            chain_id: p.chain_id.clone(),
            from: held.saturating_add(1),
            to: p.chain_seq,
            hash: p.hash.clone(),
        };
        if self.recorded.contains(&lost) {
            tracing::info!(
                chain = %lost.chain_id,
                from = lost.from,
                to = lost.to,
                "audit records this replica committed are still missing from the store (recorded already when it was found rolled back)"
            );
        } else {
            tracing::error!(
                chain = %lost.chain_id,
                from = lost.from,
                to = lost.to,
                "the store was rolled back: it no longer holds audit records this replica committed, nor anything committed with them (revocations, ended tasks, withdrawn keys, approvals); a failover to a standby that had not received them, or a backup restored under a running server. Re-apply what was done since (docs/backups.md); `scrip audit verify` lists the loss"
            );
        }
        start.lost.push(lost);
    }

    /// Places `event` next in the chain; returns its JSON and hash.
    pub fn append(
        &mut self,
        event: &AuditEvent,
    ) -> Result<(AuditEvent, String, String), serde_json::Error> {
        let mut e = event.clone();
        e.seq = 0;
        e.hash = None;
        e.chain_id = Some(self.id.clone());
        e.chain_seq = self.seq.saturating_add(1);
        e.prev_hash = Some(self.head.clone());
        let json = serde_json::to_string(&e)?;
        let h = hash(json.as_bytes());
        for lost in &e.lost {
            if !self.recorded.contains(lost) {
                self.recorded.push(lost.clone());
            }
        }
        let extra = self.recorded.len().saturating_sub(MAX_PREDECESSORS);
        self.recorded.drain(..extra);
        self.seq += 1;
        self.head.clone_from(&h);
        self.replica.clone_from(&e.replica);
        Ok((e, json, h))
    }

    /// The `chain.started` record this chain needs before `writes`, when
    /// they hold its first audit record; the backend fills in `links` with
    /// the heads of the chains already stored, read inside the same
    /// transaction.
    ///
    /// A chain that replaces one whose last commit may have taken effect
    /// starts at the next commit even without an audit record (an empty
    /// commit, a checkpoint): its start links the old chain's true head, so
    /// what that commit wrote is covered once this chain is signed, even if
    /// the process writes nothing more.
    pub fn genesis_for(&self, writes: &[&crate::Write]) -> Option<AuditEvent> {
        if self.seq > 0 {
            return None;
        }
        let first = writes.iter().find_map(|w| match w {
            crate::Write::Audit(a) => Some(a),
            _ => None,
        });
        let (at_ms, replica) = match first {
            Some(a) => (a.at_ms, a.replica.clone()),
            None if self.replaces => (now_ms(), self.replica.clone()),
            None => return None,
        };
        Some(AuditEvent {
            event: "chain.started".into(),
            at_ms,
            replica,
            ..AuditEvent::default()
        })
    }

    /// The signed head a commit stores when it moved the chain past
    /// position `before` (where the chain stood when the commit began),
    /// once a signer is set: the backend writes it in the same transaction,
    /// so every committed record is signed by its writer.
    ///
    /// The backend inserts the chain's row when [`HeadWrite::over`] is
    /// `None`, and otherwise replaces it only where it still holds that
    /// head, failing the commit with [`crate::StoreError::RolledBack`] when
    /// it does not.
    ///
    /// # Errors
    /// [`crate::StoreError::Unavailable`] when the signer fails: the commit
    /// must fail, rather than store records its writer did not sign.
    pub fn signed_head(&mut self, before: u64) -> Result<Option<HeadWrite>, crate::StoreError> {
        let Some(signer) = self.signer.get() else {
            return Ok(None);
        };
        if self.seq == before {
            return Ok(None);
        }
        let at_ms = now_ms();
        let signature = signer
            .sign(&Checkpoint::message(&self.id, self.seq, &self.head, at_ms))
            .map_err(|e| {
                crate::StoreError::Unavailable(format!("cannot sign the audit chain head: {e}"))
            })?;
        let checkpoint = Checkpoint {
            chain_id: self.id.clone(),
            chain_seq: self.seq,
            hash: self.head.clone(),
            at_ms,
            signature,
        };
        // Applied to a copy that is kept only if the commit succeeds.
        let now = self.link();
        let over = std::mem::replace(&mut self.stored, now);
        Ok(Some(HeadWrite { checkpoint, over }))
    }

    /// The head as a link, if the chain has a record.
    pub fn link(&self) -> Option<ChainLink> {
        (self.seq > 0).then(|| ChainLink {
            chain_id: self.id.clone(),
            chain_seq: self.seq,
            hash: self.head.clone(),
        })
    }
}

/// An audit row as stored.
#[derive(Debug, Clone)]
pub struct StoredRecord {
    /// Global sequence number.
    pub seq: i64,
    /// Chain columns.
    pub chain_id: String,
    /// Position in the chain.
    pub chain_seq: u64,
    /// Stored hash.
    pub hash: String,
    /// The exact JSON that was hashed.
    pub record: String,
    /// The columns beside it that queries filter on.
    pub columns: IndexedColumns,
}

/// The columns of an audit row that repeat fields of its record so that
/// queries can filter on them. They are not hashed: verification checks
/// that they say what the hashed record says, so that editing one cannot
/// hide a record from `audit query` or show it where it does not belong.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexedColumns {
    /// Milliseconds since the epoch.
    pub at_ms: u64,
    /// The event.
    pub event: String,
    /// `allow` or `deny`.
    pub decision: Option<String>,
    /// The agent's issuer.
    pub agent_iss: Option<String>,
    /// The agent's subject.
    pub agent_sub: Option<String>,
    /// The task.
    pub task_id: Option<String>,
    /// The parent task.
    pub parent_id: Option<String>,
    /// The tool.
    pub tool: Option<String>,
    /// The token's `jti`.
    pub jti: Option<String>,
    /// The replica that wrote it.
    pub replica: String,
}

impl IndexedColumns {
    /// The columns a record should have been stored with.
    #[must_use]
    pub fn of(e: &AuditEvent) -> Self {
        Self {
            at_ms: e.at_ms,
            event: e.event.clone(),
            decision: e.decision.clone(),
            agent_iss: e.agent_iss.clone(),
            agent_sub: e.agent_sub.clone(),
            task_id: e.task_id.clone(),
            parent_id: e.parent_id.clone(),
            tool: e.tool.clone(),
            jti: e.jti.clone(),
            replica: e.replica.clone(),
        }
    }

    /// The names of the columns that differ from `other`'s.
    fn differing(&self, other: &Self) -> Vec<&'static str> {
        [
            ("at_ms", self.at_ms == other.at_ms),
            ("event", self.event == other.event),
            ("decision", self.decision == other.decision),
            ("agent_iss", self.agent_iss == other.agent_iss),
            ("agent_sub", self.agent_sub == other.agent_sub),
            ("task_id", self.task_id == other.task_id),
            ("parent_id", self.parent_id == other.parent_id),
            ("tool", self.tool == other.tool),
            ("jti", self.jti == other.jti),
            ("replica", self.replica == other.replica),
        ]
        .into_iter()
        .filter(|(_, same)| !same)
        .map(|(name, _)| name)
        .collect()
    }
}

/// A signed checkpoint as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// The chain.
    pub chain_id: String,
    /// The chain's head position.
    pub chain_seq: u64,
    /// The head's hash.
    pub hash: String,
    /// When it was taken.
    pub at_ms: u64,
    /// The checkpoint key's detached signature of [`Checkpoint::message`]
    /// (base64url), over the fields above.
    pub signature: String,
}

impl Checkpoint {
    /// The exact bytes the checkpoint key signs.
    #[must_use]
    pub fn message(chain_id: &str, chain_seq: u64, hash: &str, at_ms: u64) -> Vec<u8> {
        format!("scrip-audit-checkpoint/v1\n{chain_id}\n{chain_seq}\n{hash}\n{at_ms}").into_bytes()
    }
}

/// A run of a chain's records no signature covers yet, all recent
/// ([`Report::recent`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecentRun {
    /// The chain.
    pub chain_id: String,
    /// The first position of the run.
    pub from: u64,
    /// The last.
    pub to: u64,
    /// The sequence number of its first record: the others come after it.
    pub first_seq: Option<i64>,
}

/// One problem `verify` found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The global sequence number of the record concerned, when there is one.
    pub seq: Option<i64>,
    /// The chain concerned.
    pub chain_id: String,
    /// The position in the chain concerned.
    pub chain_seq: u64,
    /// What is wrong.
    pub what: String,
}

impl std::fmt::Display for Problem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.seq {
            Some(seq) => write!(
                f,
                "record {seq} (chain {} #{}): {}",
                self.chain_id, self.chain_seq, self.what
            ),
            None => write!(
                f,
                "chain {} #{}: {}",
                self.chain_id, self.chain_seq, self.what
            ),
        }
    }
}

/// What `verify` checked.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Report {
    /// Records checked.
    pub records: usize,
    /// Chains seen.
    pub chains: usize,
    /// Checkpoints whose signature verified and whose record matched.
    pub checkpoints: usize,
    /// Records no signed checkpoint covers yet (directly, or through a later
    /// chain's start that one covers), all written after the time given to
    /// [`Verifier::require_signed`]: the heads their writers have not
    /// signed yet. Older ones are problems.
    pub unsigned: u64,
    /// The runs of records counted in [`Report::unsigned`]: at most two a
    /// chain.
    pub recent: Vec<RecentRun>,
    /// The newest sequence number read ([`verify_store`]).
    pub read_to: i64,
    /// Runs of records (`chain`, first and last position) that no
    /// checkpoint of their own chain covers, only a link from a later
    /// chain's signed start, and written longer than the grace ago: their
    /// writer did not sign them (a writer signing only from time to time
    /// that stopped first; writers with a [`HeadSigner`] sign every
    /// commit). Recent ones count in [`Report::unsigned`]: their writer may
    /// still be running. The link proves they existed when that chain
    /// started, not that scrip wrote them: someone who can write the store
    /// could have put them there.
    pub vouched: Vec<(String, u64, u64)>,
    /// Records the store lost to a rollback under their running writer, as
    /// the chain that replaced theirs recorded it at its start: (that
    /// chain, its start's time in ms, what was lost). The trail verifies
    /// without them; they were committed, and are gone with whatever was
    /// committed with them.
    pub lost: Vec<(String, u64, Lost)>,
    /// Losses named past the first [`MAX_LOST`], counted only (a loss
    /// named again among them counts again).
    pub more_lost: u64,
    /// Problems, in the order found: the first [`MAX_PROBLEMS`].
    pub problems: Vec<Problem>,
    /// Problems found past those, counted only: a trail tampered with on
    /// every row would otherwise be held in memory a problem a row.
    pub more_problems: u64,
}

/// The most problems a [`Report`] lists; the rest are counted.
pub const MAX_PROBLEMS: usize = 10_000;

/// The most losses a [`Report`] lists ([`Report::lost`]), over the whole
/// trail; the rest are counted. Each is about a hundred bytes.
pub const MAX_LOST: usize = 10_000;

impl Report {
    /// Notes a problem found.
    pub fn add(&mut self, problem: Problem) {
        if self.problems.len() < MAX_PROBLEMS {
            self.problems.push(problem);
        } else {
            self.more_problems = self.more_problems.saturating_add(1);
        }
    }

    /// How many problems were found, listed or not.
    #[must_use]
    pub fn problems_found(&self) -> u64 {
        u64::try_from(self.problems.len())
            .unwrap_or(u64::MAX)
            .saturating_add(self.more_problems)
    }
}

/// Where a chain stands during verification.
#[derive(Debug, Default)]
struct Cursor {
    pos: u64,
    hash: String,
    seq: Option<i64>,
}

/// The times of a run of a chain's records: those after one position a
/// checkpoint or link may cover, up to the next such position.
#[derive(Debug, Clone, Copy)]
struct Span {
    earliest: u64,
    latest: u64,
    /// The sequence number of its first record.
    first_seq: Option<i64>,
}

/// The chain starts that named one loss: (chain, time claimed).
#[derive(Debug)]
struct Finders {
    /// When the loss was first named, among the others.
    order: usize,
    /// Those of chains some checkpoint names, in the order met: the one
    /// whose start its chain's signature covers found it.
    signable: Vec<(String, u64)>,
    /// The one claiming the latest time, for a loss no signed start names.
    latest: (String, u64),
}

impl Finders {
    fn new(order: usize, finder: (String, u64), signable: bool) -> Self {
        Self {
            order,
            signable: if signable {
                vec![finder.clone()]
            } else {
                Vec::new()
            },
            latest: finder,
        }
    }

    fn add(&mut self, finder: (String, u64), signable: bool) {
        if finder.1 > self.latest.1 {
            self.latest = finder.clone();
        }
        if signable {
            self.signable.push(finder);
        }
    }
}

/// Streaming verification of the audit chains: memory grows with the number
/// of chains and of checkpoints, not of records.
///
/// Feed every record in global order with [`Verifier::push`], then call
/// [`Verifier::finish`]. `wanted` are the positions that checkpoints and
/// chain links refer to (read them first: [`Checkpoint`]s and the `links` of
/// `chain.started` records); their hashes are kept to be compared at the end.
#[derive(Debug)]
pub struct Verifier {
    wanted: HashSet<(String, u64)>,
    found: HashMap<(String, u64), String>,
    chains: HashMap<String, Cursor>,
    links: Vec<(i64, String, u64, ChainLink)>,
    /// Every link of a `chain.started` record: (its chain, its position,
    /// the head it names), for what a checkpoint covers through it.
    all_links: Vec<(String, u64, ChainLink)>,
    /// Per chain, the times of its records after each position a checkpoint
    /// or link may cover (0: from the chain's start), for which records a
    /// coverage leaves out: memory grows with those positions, not records.
    spans: HashMap<String, std::collections::BTreeMap<u64, Span>>,
    /// Records must be covered by a signature once older than this (ms):
    /// `(now, grace)`.
    signed: Option<(u64, u64)>,
    /// The losses chain starts named (each start's first
    /// [`MAX_PREDECESSORS`]), the first [`MAX_LOST`] alike told apart, in
    /// the order first named, with the starts that may have found them;
    /// made [`Report::lost`] once the signatures are known.
    named: HashMap<Lost, Finders>,
    /// The chains some checkpoint names: only their starts can be
    /// covered by their own chain's signature.
    checkpointed: HashSet<String>,
    report: Report,
}

impl Verifier {
    /// A verifier that will check `checkpoints` and `links`.
    #[must_use]
    pub fn new<'a>(
        checkpoints: &[Checkpoint],
        links: impl IntoIterator<Item = &'a ChainLink>,
    ) -> Self {
        let mut wanted: HashSet<(String, u64)> = checkpoints
            .iter()
            .map(|c| (c.chain_id.clone(), c.chain_seq))
            .collect();
        wanted.extend(links.into_iter().map(|l| (l.chain_id.clone(), l.chain_seq)));
        Self {
            wanted,
            found: HashMap::new(),
            chains: HashMap::new(),
            links: Vec::new(),
            all_links: Vec::new(),
            spans: HashMap::new(),
            signed: None,
            named: HashMap::new(),
            checkpointed: checkpoints.iter().map(|c| c.chain_id.clone()).collect(),
            report: Report::default(),
        }
    }

    /// Also requires every record written more than `grace_ms` before
    /// `now_ms` to be covered by a signed checkpoint: of its own chain at or
    /// past it, or of a later chain whose start links to a head at or past
    /// it. Without this, whoever can write the store could delete the
    /// checkpoints, rewrite records and recompute every hash (which needs no
    /// key) unnoticed. Uncovered records written since are counted in
    /// [`Report::unsigned`] (committed after the signatures were read, or
    /// by a writer that signs only from time to time); an uncovered record that claims to be
    /// written more than `grace_ms` after `now_ms` is a problem too.
    pub fn require_signed(&mut self, now_ms: u64, grace_ms: u64) {
        self.signed = Some((now_ms, grace_ms));
    }

    /// Records of `chain` after `pos`, a position a checkpoint or link may
    /// cover, start a span of their own (empty until one comes).
    fn start_span(&mut self, chain: &str, pos: u64) {
        self.spans
            .entry(chain.to_owned())
            .or_default()
            .entry(pos)
            .or_insert(Span {
                earliest: u64::MAX,
                latest: 0,
                first_seq: None,
            });
    }

    /// Checks one record, given in global order.
    pub fn push(&mut self, r: &StoredRecord) {
        self.report.records += 1;
        let mut links = Vec::new();
        let mut at_ms = None;
        let cursor = self.chains.entry(r.chain_id.clone()).or_default();
        let problem = |what: String| Problem {
            seq: Some(r.seq),
            chain_id: r.chain_id.clone(),
            chain_seq: r.chain_seq,
            what,
        };
        if r.seq <= 0 {
            self.report.add(problem(format!(
                "held at sequence number {}, which no writer gives (they count from 1): moved out of the trail's reads",
                r.seq
            )));
        }
        let expected = cursor.pos.saturating_add(1);
        if r.chain_seq < expected {
            self.report.add(problem(format!(
                "chain position {} repeats or goes back: inserted or reordered",
                r.chain_seq
            )));
            return;
        }
        if r.chain_seq > expected {
            self.report.add(problem(format!(
                "expected chain position {expected}: record(s) before it were deleted"
            )));
            // Resynchronise so that one deletion is reported once.
            cursor.hash = r.hash.clone();
        }
        if hash(r.record.as_bytes()) != r.hash {
            self.report
                .add(problem("content does not match its hash: edited".into()));
        }
        match serde_json::from_str::<AuditEvent>(&r.record) {
            Ok(e) => {
                if e.chain_id.as_deref() != Some(r.chain_id.as_str()) || e.chain_seq != r.chain_seq
                {
                    self.report.add(problem(
                        "chain position in the record differs from the row: moved".into(),
                    ));
                }
                let differing = IndexedColumns::of(&e).differing(&r.columns);
                if !differing.is_empty() {
                    self.report.add(problem(format!(
                        "column(s) {} differ from the record: edited",
                        differing.join(", ")
                    )));
                }
                if r.chain_seq == 1 && e.event != "chain.started" {
                    self.report.add(problem(
                        "a chain that does not begin with `chain.started`: forged".into(),
                    ));
                }
                if r.chain_seq == expected && e.prev_hash.as_deref() != Some(cursor.hash.as_str()) {
                    self.report.add(problem(
                        "does not link to the record before it: inserted, reordered or edited"
                            .into(),
                    ));
                }
                at_ms = Some(e.at_ms);
                links = e.links;
                // scrip's own starts name at most one loss for each of the
                // chains they check.
                if e.lost.len() > MAX_PREDECESSORS {
                    self.report.add(problem(format!(
                        "a chain start naming {} losses (scrip's name at most {MAX_PREDECESSORS}): forged",
                        e.lost.len()
                    )));
                }
                if r.chain_seq == 1 {
                    // As many as scrip's starts name (more is reported
                    // above): memory stays bounded by the chains.
                    let signable = self.checkpointed.contains(&r.chain_id);
                    for lost in e.lost.into_iter().take(MAX_PREDECESSORS) {
                        let finder = (r.chain_id.clone(), e.at_ms);
                        let order = self.named.len();
                        match self.named.get_mut(&lost) {
                            Some(f) => f.add(finder, signable),
                            None if order < MAX_LOST => {
                                self.named
                                    .insert(lost, Finders::new(order, finder, signable));
                            }
                            None => {
                                self.report.more_lost = self.report.more_lost.saturating_add(1);
                            }
                        }
                    }
                }
            }
            Err(_) => self
                .report
                .add(problem("content is not a valid record: edited".into())),
        }
        if cursor.seq.is_some_and(|p| p >= r.seq) {
            self.report.add(problem(
                "out of order with the record before it: reordered".into(),
            ));
        }
        cursor.pos = r.chain_seq;
        cursor.hash = r.hash.clone();
        cursor.seq = Some(r.seq);
        // The record's time joins the span after the nearest position
        // before it that a checkpoint or link may cover; an unreadable record
        // (reported above) counts as written at 0, so it is never taken
        // for one waiting for its signature.
        let at = at_ms.unwrap_or(0);
        let spans = self.spans.entry(r.chain_id.clone()).or_default();
        let start = spans
            .range(..r.chain_seq)
            .next_back()
            .map_or(0, |(p, _)| *p);
        let span = spans.entry(start).or_insert(Span {
            earliest: at,
            latest: at,
            first_seq: None,
        });
        span.first_seq.get_or_insert(r.seq);
        span.earliest = span.earliest.min(at);
        span.latest = span.latest.max(at);
        let key = (r.chain_id.clone(), r.chain_seq);
        if self.wanted.contains(&key) {
            self.found.insert(key, r.hash.clone());
            self.start_span(&r.chain_id, r.chain_seq);
        }
        // A new chain links to the heads of the others when it started,
        // which are the records of those chains just before it: compared
        // now, so a chain started after the links were first read (a replica
        // starting while `scrip audit verify` runs) is checked too. A link
        // to an older position is checked at the end, against what was kept.
        for l in links {
            self.all_links
                .push((r.chain_id.clone(), r.chain_seq, l.clone()));
            match self.chains.get(&l.chain_id) {
                Some(c) if c.pos == l.chain_seq => {
                    let key = (l.chain_id.clone(), l.chain_seq);
                    if c.hash == l.hash {
                        // Kept for what a checkpoint covers through it.
                        self.found.insert(key.clone(), c.hash.clone());
                        self.start_span(&l.chain_id, l.chain_seq);
                        self.wanted.insert(key);
                    } else {
                        self.report.add(Problem {
                            seq: Some(r.seq),
                            chain_id: r.chain_id.clone(),
                            chain_seq: r.chain_seq,
                            what: format!(
                                "links to chain {} #{} which is different: edited",
                                l.chain_id, l.chain_seq
                            ),
                        });
                    }
                }
                _ => self.links.push((r.seq, r.chain_id.clone(), r.chain_seq, l)),
            }
        }
    }

    /// Checks the links and the checkpoints (`signature_ok` verifies a
    /// checkpoint's signature) and returns the report.
    #[must_use]
    pub fn finish(
        mut self,
        checkpoints: &[Checkpoint],
        signature_ok: impl Fn(&Checkpoint) -> bool,
    ) -> Report {
        self.report.chains = self.chains.len();
        for (seq, chain_id, chain_seq, l) in std::mem::take(&mut self.links) {
            if self.found.get(&(l.chain_id.clone(), l.chain_seq)) != Some(&l.hash) {
                self.report.add(Problem {
                    seq: Some(seq),
                    chain_id,
                    chain_seq,
                    what: format!(
                        "links to chain {} #{} which is missing or different: truncated or edited",
                        l.chain_id, l.chain_seq
                    ),
                });
            }
        }
        // How far each chain is covered by a valid signature.
        let mut signed: HashMap<String, u64> = HashMap::new();
        for c in checkpoints {
            let problem = |what: &str| Problem {
                seq: None,
                chain_id: c.chain_id.clone(),
                chain_seq: c.chain_seq,
                what: what.to_owned(),
            };
            if !signature_ok(c) {
                self.report.add(problem("checkpoint signature is invalid"));
                continue;
            }
            match self.found.get(&(c.chain_id.clone(), c.chain_seq)) {
                Some(h) if *h == c.hash => {
                    self.report.checkpoints += 1;
                    let covered = signed.entry(c.chain_id.clone()).or_insert(0);
                    *covered = (*covered).max(c.chain_seq);
                }
                Some(_) => self.report.add(problem(
                    "checkpointed record differs from the checkpoint: edited",
                )),
                None => self
                    .report
                    .add(problem("checkpointed record is missing: truncated")),
            }
        }
        self.take_losses(&signed);
        if let Some((now, grace)) = self.signed {
            self.check_coverage(signed, now, grace);
        }
        self.report
    }

    /// Makes [`Report::lost`] of the losses chain starts named, each once
    /// (a later start names a loss again while the store lacks it, and a
    /// start whose commit's outcome was unknown is replaced by one naming
    /// the same): found by the first start its own chain's signature
    /// covers (`own`: how far each chain's signed head reaches). A loss
    /// that only starts no such signature covers name is taken as found at
    /// the latest time any of them claims, so that a start someone added,
    /// claiming an earlier time, cannot make a loss pass as found before
    /// `--allow-rolled-back-before`.
    fn take_losses(&mut self, own: &HashMap<String, u64>) {
        let mut named: Vec<(Lost, Finders)> = std::mem::take(&mut self.named).into_iter().collect();
        named.sort_by_key(|(_, f)| f.order);
        for (lost, finders) in named {
            let (chain, at_ms) = finders
                .signable
                .into_iter()
                .find(|(chain, _)| own.get(chain).is_some_and(|covered| *covered >= 1))
                .unwrap_or(finders.latest);
            self.report.lost.push((chain, at_ms, lost));
        }
    }

    /// The earliest and latest time claimed by the records of chain `id` in
    /// the spans starting at `positions` (each span runs from a position a
    /// checkpoint or link covers to the next); `(0, 0)` when there are none.
    fn times(&self, id: &str, positions: impl std::ops::RangeBounds<u64>) -> (u64, u64) {
        self.spans
            .get(id)
            .map(|spans| {
                spans
                    .range(positions)
                    .filter(|(_, s)| s.earliest <= s.latest)
                    .fold((u64::MAX, 0), |(e, l), (_, s)| {
                        (e.min(s.earliest), l.max(s.latest))
                    })
            })
            .unwrap_or((0, 0))
    }

    /// The run of chain `id` after position `after` (a position a
    /// checkpoint or link covers, or 0, where a span starts) to `to`.
    fn recent_run(&self, id: &str, after: u64, to: u64) -> RecentRun {
        RecentRun {
            chain_id: id.to_owned(),
            from: after.saturating_add(1),
            to,
            first_seq: self
                .spans
                .get(id)
                .and_then(|spans| spans.get(&after))
                .and_then(|span| span.first_seq),
        }
    }

    /// Extends `signed` (how far each chain is covered) through the links
    /// of covered chain starts: a covered start vouches for the heads it
    /// links to (each link was checked in [`Self::finish`]), and so on
    /// through theirs. Each link is visited once, whatever order the
    /// chains vouch in (a store's records cannot make this quadratic).
    fn spread(&self, signed: &mut HashMap<String, u64>) {
        // Each chain's links, by the position of the start that holds them.
        let mut by_chain: HashMap<&str, Vec<(u64, &ChainLink)>> = HashMap::new();
        for (chain, pos, l) in &self.all_links {
            by_chain.entry(chain.as_str()).or_default().push((*pos, l));
        }
        for links in by_chain.values_mut() {
            links.sort_by_key(|(pos, _)| *pos);
        }
        // How many of each chain's links were visited.
        let mut visited: HashMap<&str, usize> = HashMap::new();
        let mut grown: Vec<String> = signed.keys().cloned().collect();
        while let Some(chain) = grown.pop() {
            let Some((id, links)) = by_chain.get_key_value(chain.as_str()) else {
                continue;
            };
            let covered = signed.get(&chain).copied().unwrap_or(0);
            let from = visited.get(id).copied().unwrap_or(0);
            let rest = links.get(from..).unwrap_or_default();
            let newly = rest.iter().take_while(|(pos, _)| *pos <= covered).count();
            visited.insert(id, from.saturating_add(newly));
            for (_, l) in rest.iter().take(newly) {
                if self.found.get(&(l.chain_id.clone(), l.chain_seq)) != Some(&l.hash) {
                    continue;
                }
                let reach = signed.entry(l.chain_id.clone()).or_insert(0);
                if *reach < l.chain_seq {
                    *reach = l.chain_seq;
                    grown.push(l.chain_id.clone());
                }
            }
        }
    }

    /// Extends `signed` through the links of covered chain starts, then
    /// reports each chain's uncovered records: problems when one was
    /// written more than `grace` ms before `now` (or claims to be written
    /// more than `grace` after it), else counted as [`Report::unsigned`].
    fn check_coverage(&mut self, mut signed: HashMap<String, u64>, now: u64, grace: u64) {
        let own = signed.clone();
        self.spread(&mut signed);
        let mut chains: Vec<(&String, &Cursor)> = self.chains.iter().collect();
        chains.sort_by_key(|(_, c)| c.seq);
        for (id, cursor) in chains {
            let covered = signed.get(id).copied().unwrap_or(0);
            let by_itself = own.get(id).copied().unwrap_or(0);
            if covered > by_itself {
                let last = covered.min(cursor.pos);
                // Their times, from the spans after each position a
                // checkpoint or link covers: the times they claim, so one
                // claimed to come must not make the others recent.
                let (earliest, latest) = self.times(id, by_itself..covered);
                if latest > now.saturating_add(grace) {
                    self.report.add(Problem {
                        seq: None,
                        chain_id: id.clone(),
                        chain_seq: by_itself.saturating_add(1),
                        what: format!(
                            "records #{} to #{} were never signed by the process that wrote them and claim a time to come: written by someone else",
                            by_itself.saturating_add(1),
                            last
                        ),
                    });
                } else if earliest < now.saturating_sub(grace) {
                    self.report
                        .vouched
                        .push((id.clone(), by_itself.saturating_add(1), last));
                } else {
                    // Recent: a replica that started since linked a writer
                    // that is still running, and will sign them.
                    self.report.unsigned = self
                        .report
                        .unsigned
                        .saturating_add(last.saturating_sub(by_itself));
                    let run = self.recent_run(id, by_itself, last);
                    self.report.recent.push(run);
                }
            }
            if cursor.pos <= covered {
                continue;
            }
            // Every record past `covered` is in the spans from it on.
            let (earliest, latest) = self.times(id, covered..);
            let old = earliest < now.saturating_sub(grace);
            let future = latest > now.saturating_add(grace);
            if old || future {
                self.report.add(Problem {
                    seq: None,
                    chain_id: id.clone(),
                    chain_seq: covered.saturating_add(1),
                    what: format!(
                        "records #{} to #{} are covered by no signed checkpoint{}: rewritten with its checkpoints deleted, or written by a process that stopped before it signed them",
                        covered.saturating_add(1),
                        cursor.pos,
                        if future { " and claim a time to come" } else { "" }
                    ),
                });
            } else {
                self.report.unsigned = self
                    .report
                    .unsigned
                    .saturating_add(cursor.pos.saturating_sub(covered));
                let run = self.recent_run(id, covered, cursor.pos);
                self.report.recent.push(run);
            }
        }
    }
}

/// Verifies the trail `store` holds, streaming its records `page` at a
/// time: every chain, link and checkpoint, and with `signed` (`(now,
/// grace)` in ms), every record's signature ([`Verifier::require_signed`]).
/// `signature_ok` verifies a checkpoint's signature.
///
/// The trail is read as it stood just after the signatures were read:
/// records committed while this runs (however long it takes on a large
/// store) are left to the next verification, rather than read unsigned.
/// (Read after the signatures, so that none names a record past it; those
/// committed in between count as recent.) Every row is read from the
/// lowest number a row can hold: no writer gives one of 0 or below, and a
/// row moved there, out of a read that starts at 1, is reported rather
/// than passed over.
///
/// # Errors
/// [`crate::StoreError`] when the store cannot be read.
pub async fn verify_store(
    store: &dyn crate::Store,
    signed: Option<(u64, u64)>,
    page: u32,
    signature_ok: impl Fn(&Checkpoint) -> bool,
) -> Result<Report, crate::StoreError> {
    let checkpoints = store.latest_checkpoints().await?;
    let links = store.chain_links().await?;
    let until = store.latest_audit_seq().await?;
    let mut verifier = Verifier::new(&checkpoints, &links);
    if let Some((now, grace)) = signed {
        verifier.require_signed(now, grace);
    }
    let mut after = i64::MIN;
    while after < until {
        let rows = store.audit_rows(after, page).await?;
        let Some(last) = rows.last() else {
            break;
        };
        after = last.seq;
        for r in rows.iter().filter(|r| r.seq <= until) {
            verifier.push(r);
        }
    }
    let mut report = verifier.finish(&checkpoints, signature_ok);
    report.read_to = until;
    Ok(report)
}

/// Verifies `records` (in global order) in memory: both passes at once.
#[must_use]
pub fn verify(
    records: &[StoredRecord],
    checkpoints: &[Checkpoint],
    signature_ok: impl Fn(&Checkpoint) -> bool,
) -> Report {
    let links: Vec<ChainLink> = records
        .iter()
        .filter_map(|r| serde_json::from_str::<AuditEvent>(&r.record).ok())
        .flat_map(|e| e.links)
        .collect();
    let mut v = Verifier::new(checkpoints, &links);
    for r in records {
        v.push(r);
    }
    v.finish(checkpoints, signature_ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A chain that replaces another names a loss only where the store
    /// holds less of the old chain than its writer had committed: not
    /// where it holds all of it, nor more (the commit whose outcome was
    /// unknown landed).
    #[test]
    fn a_replacing_chain_names_only_what_the_store_lost() {
        let mut old = ChainState::new("old".into(), Signer::default());
        for _ in 0..3 {
            old.append(&AuditEvent::default()).unwrap();
        }
        let new = old.replaced_by("new".into());
        let [p] = new.predecessors() else {
            panic!("{:?}", new.predecessors())
        };
        assert_eq!(Some(p), old.link().as_ref());
        let lost = |held: u64| {
            let mut start = AuditEvent::default();
            new.note_loss(&mut start, p, held);
            start.lost
        };
        assert_eq!(lost(3), []);
        assert_eq!(lost(4), [], "the uncertain commit landed");
        assert_eq!(
            lost(1),
            [Lost {
                chain_id: "old".into(),
                from: 2,
                to: 3,
                hash: old.head.clone(),
            }]
        );
        assert_eq!(lost(0)[0].from, 1);
        // A replacement that never wrote passes its predecessors on; one
        // that wrote adds itself; a chain that started has none to check.
        let again = new.replaced_by("again".into());
        assert_eq!(again.predecessors(), new.predecessors());
        let mut started = again.clone();
        started.append(&AuditEvent::default()).unwrap();
        assert_eq!(started.predecessors(), []);
        let third = started.replaced_by("third".into());
        assert_eq!(
            third.predecessors(),
            [old.link().unwrap(), started.link().unwrap()]
        );
        // Only the latest are kept.
        let mut chain = third;
        for n in 0..20 {
            chain.append(&AuditEvent::default()).unwrap();
            chain = chain.replaced_by(format!("c{n}"));
        }
        assert_eq!(chain.predecessors().len(), MAX_PREDECESSORS);
        assert_eq!(chain.predecessors()[MAX_PREDECESSORS - 1].chain_id, "c18");
    }

    /// Chain `id`'s `chain.started` at `at_ms` naming `lost`, as the row
    /// at sequence number `seq + 1`, and the chain after it.
    fn start_row(seq: usize, id: &str, at_ms: u64, lost: Vec<Lost>) -> (ChainState, StoredRecord) {
        let mut chain = ChainState::new(id.into(), Signer::default());
        let start = AuditEvent {
            event: "chain.started".into(),
            at_ms,
            lost,
            ..AuditEvent::default()
        };
        let (e, record, hash) = chain.append(&start).unwrap();
        let row = StoredRecord {
            seq: i64::try_from(seq).unwrap() + 1,
            chain_id: id.into(),
            chain_seq: 1,
            hash,
            record,
            columns: IndexedColumns::of(&e),
        };
        (chain, row)
    }

    /// A loss named by several chain starts (a start whose commit's outcome
    /// was unknown, replaced, names it again) is listed once; past
    /// [`MAX_LOST`] the rest are counted, and a start naming more than a
    /// writer checks is a problem, of whose losses the first
    /// [`MAX_PREDECESSORS`] count; a writer knows the losses its committed
    /// starts recorded.
    #[test]
    fn a_loss_named_twice_is_listed_once() {
        let lost = |n: u64| Lost {
            chain_id: "a".into(),
            from: n,
            to: n,
            hash: format!("h{n}"),
        };
        let mut rows = Vec::new();
        let mut writers = Vec::new();
        let many = MAX_PREDECESSORS as u64;
        // Enough starts of scrip's own size to pass the most listed.
        let others = MAX_LOST as u64 / many + 2;
        let mut starts = vec![
            ("b".to_owned(), vec![lost(1)]),
            ("c".to_owned(), vec![lost(1)]),
            (
                "d".to_owned(),
                (2..=MAX_LOST as u64 + 6).map(lost).collect(),
            ),
        ];
        for i in 0..others {
            let first = 1_000_000 + i * many;
            starts.push((format!("e{i}"), (first..first + many).map(lost).collect()));
        }
        for (seq, (id, losses)) in starts.iter().cloned().enumerate() {
            let (chain, row) = start_row(seq, &id, 0, losses);
            rows.push(row);
            writers.push(chain);
        }
        let mut v = Verifier::new(&[], std::iter::empty());
        for r in &rows {
            v.push(r);
        }
        let report = v.finish(&[], |_| true);
        // No start of scrip's names so many: the one that does is forged.
        let [forged] = &report.problems[..] else {
            panic!("{:?}", report.problems)
        };
        assert_eq!(forged.chain_id, "d");
        assert!(forged.what.ends_with(": forged"), "{forged}");
        assert_eq!(report.lost.len(), MAX_LOST);
        assert_eq!(report.lost[0], ("b".to_owned(), 0, lost(1)));
        // d's first MAX_PREDECESSORS, then the others'.
        assert_eq!(report.lost[1].2, lost(2));
        assert_eq!(report.lost[many as usize].2, lost(many + 1));
        assert_eq!(report.lost[many as usize + 1].2, lost(1_000_000));
        let named = 1 + many + others * many;
        assert_eq!(report.more_lost, named - MAX_LOST as u64);
        assert_eq!(writers[0].recorded, [lost(1)]);
        assert_eq!(
            writers[2].recorded.len(),
            MAX_PREDECESSORS,
            "the latest kept"
        );
        assert_eq!(writers[0].replaced_by("e".into()).recorded, [lost(1)]);
    }

    /// A loss is taken as found by the first start its own chain's
    /// signature covers: a start someone added naming the same loss at an
    /// earlier time (and earlier in the trail) does not move it; named by
    /// unsigned starts only, it is found at the latest time any claims.
    #[test]
    fn a_loss_is_found_when_a_signed_start_found_it() {
        let lost = Lost {
            chain_id: "a".into(),
            from: 2,
            to: 3,
            hash: "h".into(),
        };
        let rows: Vec<StoredRecord> = [("forged", 1), ("b", 5_000), ("c", 9_000)]
            .into_iter()
            .enumerate()
            .map(|(seq, (id, at_ms))| start_row(seq, id, at_ms, vec![lost.clone()]).1)
            .collect();
        let signed_start = |id: &str| {
            let r = rows.iter().find(|r| r.chain_id == id).unwrap();
            Checkpoint {
                chain_id: id.into(),
                chain_seq: 1,
                hash: r.hash.clone(),
                at_ms: 0,
                signature: String::new(),
            }
        };
        let found = |checkpoints: &[Checkpoint]| {
            let mut v = Verifier::new(checkpoints, std::iter::empty());
            for r in &rows {
                v.push(r);
            }
            v.finish(checkpoints, |_| true).lost
        };
        // b's start is signed: found by b, whatever the forged one says.
        assert_eq!(
            found(&[signed_start("b"), signed_start("c")]),
            [("b".to_owned(), 5_000, lost.clone())]
        );
        assert_eq!(
            found(&[signed_start("c")]),
            [("c".to_owned(), 9_000, lost.clone())]
        );
        // None signed: the latest time claimed.
        assert_eq!(found(&[]), [("c".to_owned(), 9_000, lost.clone())]);
    }
}
