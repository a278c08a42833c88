//! What the store holds.

use std::collections::BTreeMap;

use scrip_token::{Actor, MayAct, WorkloadIdentity};
use serde::{Deserialize, Serialize};

/// A task.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskRecord {
    /// The task id (`txn`).
    pub id: String,
    /// The parent task, for a delegated task.
    pub parent: Option<String>,
    /// The agent that started the (root) task.
    pub agent: WorkloadIdentity,
    /// The delegation chain, current actor outermost.
    pub actor: Option<Actor>,
    /// Who may act for the task (empty: anyone the policy allows).
    #[serde(default)]
    pub may_act: Vec<MayAct>,
    /// The grants, canonical `tool:action` list.
    pub grants: String,
    /// Those of `grants` that policy allowed, when the task was started or
    /// delegated, only with a person's approval (canonical `tool:action`
    /// list, empty for none): each use of one waits for a person, whatever
    /// policy says at the time of the use.
    #[serde(default)]
    pub held: String,
    /// The purpose.
    pub purpose: String,
    /// The environment.
    pub environment: String,
    /// Delegation depth.
    pub depth: u32,
    /// The `jti` of the task token.
    pub token_jti: String,
    /// Started at (seconds).
    pub created_at: u64,
    /// Deadline (seconds).
    pub expires_at: u64,
    /// Ended at, if ended.
    pub ended_at: Option<u64>,
    /// Why it ended (`revoked`, `expired`, `parent ended`).
    pub end_reason: Option<String>,
}

/// Where a task stands at a moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskState {
    /// Usable.
    Active,
    /// Ended (revoked or swept).
    Ended,
    /// Past its deadline.
    Expired,
}

impl TaskRecord {
    /// The task's state at `now`.
    #[must_use]
    pub fn state(&self, now: u64) -> TaskState {
        if self.ended_at.is_some() {
            TaskState::Ended
        } else if now >= self.expires_at {
            TaskState::Expired
        } else {
            TaskState::Active
        }
    }
}

/// One audit record. Never holds a token, key or secret: tokens are named by
/// their `jti`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct AuditEvent {
    /// Sequence number, assigned by the store (not part of the hashed record).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub seq: i64,
    /// The record's hash, filled in when read (not part of the hashed record).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hash: Option<String>,
    /// The writer's chain, assigned by the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chain_id: Option<String>,
    /// Position in the chain, assigned by the store.
    #[serde(default)]
    pub chain_seq: u64,
    /// Hash of the record before it in the chain, assigned by the store.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prev_hash: Option<String>,
    /// For a chain's first record: the heads of the chains already stored.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub links: Vec<crate::ChainLink>,
    /// For a chain's first record: what the store no longer held of the
    /// chains its writer wrote before, when it was rolled back under it.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub lost: Vec<crate::Lost>,
    /// Milliseconds since the epoch.
    pub at_ms: u64,
    /// What happened (`task.started`, `token.issued`, `exchange.denied`, ...).
    pub event: String,
    /// `allow` or `deny`, for decisions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub decision: Option<String>,
    /// The agent's issuer.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_iss: Option<String>,
    /// The agent's subject.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_sub: Option<String>,
    /// The workload identity the request was identified by, where its
    /// record is of that identification (a task started or refused, a
    /// sub-agent's delegation): its kind, its token's `jti`, its well-known
    /// attributes and the claims that name its run
    /// (`scrip_token::WorkloadIdentity::provenance`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub identity: BTreeMap<String, String>,
    /// The task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_id: Option<String>,
    /// Its parent task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent_id: Option<String>,
    /// The delegation chain (actor subjects, current first).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub chain: Vec<String>,
    /// The tool.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool: Option<String>,
    /// The actions or grants asked or issued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub actions: Option<String>,
    /// The task's environment.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<String>,
    /// The task's purpose.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub purpose: Option<String>,
    /// Policies that decided.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub policies: Vec<String>,
    /// Why.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// The `jti` of the token concerned.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub jti: Option<String>,
    /// The client's address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<String>,
    /// A proxied request's HTTP method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub method: Option<String>,
    /// A proxied request's path below the upstream, without its query.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// The HTTP status answered to the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub status: Option<u16>,
    /// Request body bytes forwarded upstream.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_in: Option<u64>,
    /// Response body bytes returned to the client.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes_out: Option<u64>,
    /// Microseconds from receiving the request to the end of the response.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub latency_us: Option<u64>,
    /// The replica that wrote the record.
    pub replica: String,
}

#[expect(
    clippy::trivially_copy_pass_by_ref,
    reason = "serde's skip_serializing_if passes a reference"
)]
fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// Which audit records to read.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    /// Only this task.
    pub task_id: Option<String>,
    /// Only this agent subject.
    pub agent_sub: Option<String>,
    /// Only agents of this identity issuer.
    pub agent_iss: Option<String>,
    /// Only this tool.
    pub tool: Option<String>,
    /// Only records naming this subject in their delegation chain: what a
    /// sub-agent did, and what was done in the tasks delegated from its
    /// own. Read from each record (no index holds it): bound the records
    /// read with another condition, a time above all.
    pub actor: Option<String>,
    /// Only this decision (`allow` or `deny`).
    pub decision: Option<String>,
    /// Only this event (`token.issued`). No index holds it: bound the
    /// records read with another condition, a time above all.
    pub event: Option<String>,
    /// Only records naming this `jti` (a token's: its issue, uses,
    /// introspections, revocation; a key's id for key records). No index
    /// holds it either.
    pub jti: Option<String>,
    /// Only records at or after this time (ms since the epoch).
    pub since_ms: Option<u64>,
    /// Only records before this time (ms since the epoch).
    pub until_ms: Option<u64>,
    /// Only records after this sequence number.
    pub after_seq: Option<i64>,
    /// At most this many.
    pub limit: Option<u32>,
}

/// The most approvals of one task that may wait for a person at once: an
/// agent cannot bury the approvers' queue (and the webhook) under its
/// requests. [`Write::InsertApproval`] enforces it.
pub const MAX_PENDING_PER_TASK: usize = 10;

/// The most approvals of one agent's tasks (its own and its sub-agents',
/// by the issuer and subject of the workload that started them) that may
/// wait for a person at once: one agent starting task after task cannot
/// crowd every other agent's steps out of the approvers' queue.
/// [`Write::InsertApproval`] enforces it.
pub const MAX_PENDING_PER_AGENT: usize = 50;

/// The most approvals that may wait at once among the tasks of one tree
/// in which one sub-agent is the current actor (by its issuer and
/// subject): a sub-agent delegating to itself, task after task (all in
/// the tree it was given), cannot take the whole of its agent's
/// [`MAX_PENDING_PER_AGENT`] from the agent's other work.
/// [`Write::InsertApproval`] enforces it.
pub const MAX_PENDING_PER_ACTOR: usize = 10;

/// The most sub-tasks one task's tree may hold over its life (its
/// delegations, theirs, and so on): ending a task ends its tree in one
/// transaction, under the lock every replica writes with, which must stay
/// well within a commit's time. [`Write::InsertTask`] enforces it.
pub const MAX_SUBTASKS: u32 = 10_000;

/// One change, applied inside a [`crate::Store::commit`].
#[derive(Debug, Clone)]
pub enum Write {
    /// A new task. A child task's commit fails with
    /// [`crate::StoreError::Conflict`] (changing nothing) when its parent
    /// has ended, so that ending a task always ends every child of it, or
    /// when its tree already holds [`MAX_SUBTASKS`] sub-tasks.
    InsertTask(Box<TaskRecord>),
    /// Changes nothing; fails the commit with
    /// [`crate::StoreError::Conflict`] when the task `id` has ended. In the
    /// commit that records a credential issued under the task, it makes
    /// the end and the issue exclusive: a credential whose task's end was
    /// committed first (on any replica, while this one decided) is not
    /// recorded, and so not handed out.
    TaskOpen {
        /// The task.
        id: String,
    },
    /// Changes nothing; fails the commit with
    /// [`crate::StoreError::Conflict`] when task `task` has a denied
    /// approval decided at or after `since` that is not one of `seen` (the
    /// denials the server read before deciding). In the commit that hands
    /// out an approved step's token, or opens a step, it makes a person's
    /// denial and that commit exclusive: a denial committed after the read
    /// (on any replica) stops it, and the server reads again.
    NoNewDenial {
        /// The task.
        task: String,
        /// Seconds: denials decided before this do not count.
        since: u64,
        /// The ids of the denials the server read.
        seen: Vec<String>,
    },
    /// End a task and every open descendant.
    EndTask {
        /// The task.
        id: String,
        /// When (seconds).
        at: u64,
        /// Why.
        reason: String,
        /// Seconds past each task's deadline that its revocation stays in
        /// the feed: the clock leeway with which verifiers still accept a
        /// token after its `exp` (0: no event for a task already at its
        /// deadline, as when it expires by itself). A task past its
        /// deadline by less than this still gets an event.
        grace: u64,
    },
    /// End a task that has not ended, and every open descendant: like
    /// [`Write::EndTask`], but the commit fails with
    /// [`crate::StoreError::Conflict`] (changing nothing) when the task has
    /// ended already, so that of several endings racing (a revocation and
    /// the expiry sweep, two replicas' sweeps) exactly one is recorded.
    EndOpenTask {
        /// The task.
        id: String,
        /// When (seconds).
        at: u64,
        /// Why.
        reason: String,
        /// As in [`Write::EndTask`].
        grace: u64,
    },
    /// Publish the end of a task that has ended, and of its descendants: a
    /// `task` event for each whose deadline plus `grace` is still ahead and
    /// that has none yet. A task that reached its deadline ended without
    /// one (its tokens expire with it), but verifiers accept a token up to
    /// their leeway past its `exp`: a revocation of its token in that time
    /// still reaches them. Changes nothing else. The commit fails with
    /// [`crate::StoreError::Conflict`] (changing nothing, audit records
    /// included) when the task has an event already.
    AnnounceEnded {
        /// The task.
        id: String,
        /// When (seconds).
        at: u64,
        /// As in [`Write::EndTask`].
        grace: u64,
    },
    /// Revoke one token.
    RevokeToken {
        /// The token's `jti`.
        jti: String,
        /// Its task.
        task_id: String,
        /// Its expiry (the entry is dropped after).
        expires_at: u64,
        /// When revoked.
        at: u64,
    },
    /// Revoke one token once: like [`Write::RevokeToken`], but the commit
    /// fails with [`crate::StoreError::Conflict`] (changing nothing) when
    /// the token was already revoked (or used), so that of concurrent
    /// revocations, on any replica, exactly one commits (and its record).
    /// Unlike [`Write::ClaimToken`], whatever its task's state: a token of
    /// a task ended at its deadline is still in the feed only so.
    RevokeTokenOnce {
        /// The token's `jti`.
        jti: String,
        /// Its task.
        task_id: String,
        /// Its expiry (the entry is dropped after).
        expires_at: u64,
        /// When revoked.
        at: u64,
    },
    /// Mark a single-use token used: like [`Write::RevokeToken`], but the
    /// commit fails with [`crate::StoreError::Conflict`] (changing nothing)
    /// when the token was already used or revoked, or its task has ended,
    /// so exactly one of several concurrent presentations, on any replica,
    /// wins.
    ClaimToken {
        /// The token's `jti`.
        jti: String,
        /// Its task.
        task_id: String,
        /// Its expiry (the entry is dropped after).
        expires_at: u64,
        /// When presented.
        at: u64,
    },
    /// Record a DPoP proof as used (RFC 9449 §11.1), for every replica and
    /// process on the store: the commit fails with
    /// [`crate::StoreError::ProofUsed`] (changing nothing) when the same
    /// proof is recorded already, however old it is: only the purge forgets
    /// a proof ([`Write::PurgeProofs`], once no verifier can accept it), so
    /// the clock of the process that presents it again does not decide
    /// whether it may be taken (the purging replica's does, within its
    /// margin).
    /// Put in the commit of what the proof was presented for (the
    /// credential issued, the proxied request's `allow`), so that of several
    /// presentations, on any replica, exactly one takes effect.
    SpendProof {
        /// SHA-256 of the key's thumbprint, a zero byte, and the proof's
        /// `jti` (`scrip_jose::dpop::Proof::replay_id`): the same proof by
        /// another key is another proof, and no text a client chose is
        /// stored.
        id: [u8; 32],
        /// The proof's `iat`, signed with it: the same wherever it is
        /// presented. Proofs are stored in the order of their time, so
        /// that recording and purging them touch the end of the one index
        /// they have rather than a random page each.
        iat: u64,
    },
    /// A new pending approval. The commit fails with
    /// [`crate::StoreError::Conflict`] (changing nothing) when the same step
    /// (task, tool and actions) already waits for a person, or when
    /// [`MAX_PENDING_PER_TASK`] steps of the task (or
    /// [`MAX_PENDING_PER_ACTOR`] of the tasks its current actor acts in, in
    /// its tree, or [`MAX_PENDING_PER_AGENT`] of its agent's tasks) already
    /// wait, counting
    /// the approvals unexpired at the new one's `created_at`. The check runs
    /// inside the commit, under the write lock every replica takes, so two
    /// replicas asked at once cannot both open one.
    InsertApproval(Box<Approval>),
    /// Move an approval from `from` to `to`. The commit fails with
    /// [`crate::StoreError::Conflict`] (changing nothing, its audit record
    /// included) when the approval is not in `from` any more: the first
    /// decision wins, and the audit never records one that did not apply.
    UpdateApproval {
        /// The approval.
        id: String,
        /// The state it must be in.
        from: ApprovalState,
        /// The new state.
        to: ApprovalState,
        /// Who decided (for approve/deny).
        by: Option<String>,
        /// When (seconds).
        at: u64,
        /// Why.
        reason: Option<String>,
        /// The token issued (for `Used`).
        token_jti: Option<String>,
    },
    /// Drop revocation entries of tokens that expired at or before `now`:
    /// at most `limit` of the revoked tokens and `limit` of the feed's
    /// events, the oldest first, so that one purge of a backlog does not
    /// hold the write lock (and every commit batched beside it) for long.
    PurgeRevocations {
        /// Seconds since the epoch.
        now: u64,
        /// The most rows of each table dropped.
        limit: u32,
    },
    /// Drop the DPoP proofs recorded by [`Write::SpendProof`] that were made
    /// (`iat`) at or before `made_before`: at most `limit`, the oldest
    /// first. The caller says when no verifier can accept a proof any more
    /// (its age and the clock leeway, past which the proof is refused
    /// anyway).
    PurgeProofs {
        /// Seconds since the epoch.
        made_before: u64,
        /// The most rows dropped.
        limit: u32,
    },
    /// An audit record; the store chains it.
    Audit(Box<AuditEvent>),
    /// A signed checkpoint of a chain's head.
    Checkpoint(Box<crate::Checkpoint>),
    /// A new key of the shared key set. Fails with
    /// [`crate::StoreError::Conflict`] when its `kid` exists, or when the
    /// newest key of its purpose (by `active_at`, then `kid`) is not
    /// `after` (`None`: when the store holds a key of its purpose), so
    /// replicas that plan the same key at once add one between them.
    InsertKey {
        /// The key.
        key: Box<StoredKey>,
        /// The `kid` of the newest key of its purpose the writer saw.
        after: Option<String>,
    },
    /// Withdraw a key at once, retired or not (one that leaked): it stops
    /// signing (retired at `at`, if not before) and leaves the published key
    /// set whatever tokens it signed and whatever a reader's clock says
    /// (`publish_until` 0). Fails with [`crate::StoreError::Conflict`] when
    /// no key has that `kid`.
    WithdrawKey {
        /// The key.
        kid: String,
        /// When (seconds).
        at: u64,
    },
    /// Stop signing with a key; it stays published until `publish_until`.
    RetireKey {
        /// The key.
        kid: String,
        /// When it stopped signing (seconds).
        at: u64,
        /// When it leaves the published key set (seconds): after the last
        /// token it signed has expired.
        publish_until: u64,
    },
    /// A new version of a secret: retires the current version (at the new
    /// one's `created_at`) and drops versions retired at or before
    /// `purge_retired_before`.
    PutSecret {
        /// The new version (its `version` one above the newest stored).
        secret: Box<SecretRecord>,
        /// Seconds since the epoch: retired versions older than this go.
        purge_retired_before: u64,
    },
    /// Delete every version of a secret (an upstream decommissioned, or a
    /// key revoked at its provider): the proxy has none to inject from
    /// then on. Fails with [`crate::StoreError::Conflict`] (changing
    /// nothing) when no version of it is stored, or one newer than
    /// `through` (stored since the caller read them: a rotation's new key,
    /// which the caller has not seen, is not deleted unseen).
    DeleteSecret {
        /// The upstream.
        name: String,
        /// The action class.
        action: String,
        /// The newest version the caller read.
        through: u32,
    },
    /// A key's private half sealed again (under a new key-encryption key):
    /// its `sealed` becomes `to`. Fails with [`crate::StoreError::Conflict`]
    /// (changing nothing) when no key has that `kid` or its `sealed` is not
    /// `from`, so a value changed since it was read is never overwritten.
    ResealKey {
        /// The key.
        kid: String,
        /// Its sealed private half as read.
        from: String,
        /// The same private half sealed again.
        to: String,
    },
    /// A secret version sealed again, as [`Write::ResealKey`]: fails with
    /// [`crate::StoreError::Conflict`] when the version is gone (purged) or
    /// its `sealed` is not `from`.
    ResealSecret {
        /// The upstream.
        name: String,
        /// The action class.
        action: String,
        /// The version.
        version: u32,
        /// Its sealed value as read.
        from: Vec<u8>,
        /// The same value sealed again.
        to: Vec<u8>,
    },
}

impl Write {
    /// Whether this write adds to the revocation feed.
    #[must_use]
    pub fn revokes(&self) -> bool {
        matches!(
            self,
            Self::EndTask { .. }
                | Self::EndOpenTask { .. }
                | Self::AnnounceEnded { .. }
                | Self::RevokeToken { .. }
                | Self::RevokeTokenOnce { .. }
                | Self::ClaimToken { .. }
        )
    }
}

/// What a key of the shared key set is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyPurpose {
    /// Signs scrip's tokens.
    Signing,
    /// Signs audit checkpoints.
    Checkpoint,
}

impl KeyPurpose {
    /// The stored name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Signing => "signing",
            Self::Checkpoint => "checkpoint",
        }
    }

    /// Parses a stored name.
    #[must_use]
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "signing" => Some(Self::Signing),
            "checkpoint" => Some(Self::Checkpoint),
            _ => None,
        }
    }
}

/// A key of the key set that replicas of a shared store sign with. The
/// private half is stored only sealed (authenticated encryption under the
/// key-encryption key, which never enters the store), so reading or writing
/// the store alone neither reveals a key nor plants one.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StoredKey {
    /// The RFC 7638 thumbprint.
    pub kid: String,
    /// What it signs.
    pub purpose: KeyPurpose,
    /// The JOSE algorithm.
    pub alg: String,
    /// The public JWK, JSON.
    pub public_jwk: String,
    /// The sealed private key.
    pub sealed: String,
    /// Created at (seconds).
    pub created_at: u64,
    /// Replicas sign with it from then on (seconds); it is published from
    /// creation, so verifiers know it before any token signed with it.
    pub active_at: u64,
    /// When it stopped signing.
    pub retired_at: Option<u64>,
    /// When it leaves the published key set.
    pub publish_until: Option<u64>,
}

impl std::fmt::Debug for StoredKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoredKey")
            .field("kid", &self.kid)
            .field("purpose", &self.purpose)
            .field("alg", &self.alg)
            .field("active_at", &self.active_at)
            .field("retired_at", &self.retired_at)
            .finish_non_exhaustive()
    }
}

/// One version of a proxy secret, sealed. Never holds the plaintext; its
/// `Debug` prints no ciphertext either.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretRecord {
    /// The upstream (tool) name.
    pub name: String,
    /// The action class.
    pub action: String,
    /// The version, from 1.
    pub version: u32,
    /// The AEAD output (nonce, ciphertext, tag).
    pub sealed: Vec<u8>,
    /// Created at (seconds).
    pub created_at: u64,
    /// When a newer version replaced it.
    pub retired_at: Option<u64>,
}

impl std::fmt::Debug for SecretRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SecretRecord")
            .field("name", &self.name)
            .field("action", &self.action)
            .field("version", &self.version)
            .field("created_at", &self.created_at)
            .field("retired_at", &self.retired_at)
            .finish_non_exhaustive()
    }
}

/// What a revocation covers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum RevocationKind {
    /// Every token of a task.
    Task,
    /// One token.
    Token,
}

/// One entry of the revocation feed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revocation {
    /// Feed position.
    pub seq: i64,
    /// What it covers.
    pub kind: RevocationKind,
    /// The task.
    pub txn: String,
    /// The token, for a token revocation.
    pub jti: Option<String>,
    /// When it would have expired anyway.
    pub exp: u64,
}

/// Where an approval stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ApprovalState {
    /// Waiting for a person.
    Pending,
    /// Approved, token not yet collected.
    Approved,
    /// Denied.
    Denied,
    /// Approved and its single token issued.
    Used,
    /// Not decided in time.
    Expired,
}

impl ApprovalState {
    /// The stored name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Approved => "approved",
            Self::Denied => "denied",
            Self::Used => "used",
            Self::Expired => "expired",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        match s {
            "pending" => Some(Self::Pending),
            "approved" => Some(Self::Approved),
            "denied" => Some(Self::Denied),
            "used" => Some(Self::Used),
            "expired" => Some(Self::Expired),
            _ => None,
        }
    }
}

/// A step that needs, or had, a person's approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Approval {
    /// The `auth_req_id`.
    pub id: String,
    /// The task asking.
    pub task_id: String,
    /// The tool.
    pub tool: String,
    /// The actions, space-separated.
    pub actions: String,
    /// Those of `actions` that needed a person's approval when it was asked
    /// (policy allowed the others outright), space-separated; `None` for
    /// one an older scrip stored (take all of `actions` then).
    pub approvable: Option<String>,
    /// Where it stands.
    pub state: ApprovalState,
    /// Asked at (seconds).
    pub created_at: u64,
    /// A pending approval expires at (seconds).
    pub expires_at: u64,
    /// Who decided.
    pub decided_by: Option<String>,
    /// When.
    pub decided_at: Option<u64>,
    /// Why (a denial's reason).
    pub reason: Option<String>,
    /// The `jti` of the single token issued for it.
    pub token_jti: Option<String>,
}

impl Approval {
    /// Parses a stored state.
    #[must_use]
    pub fn parse_state(s: &str) -> Option<ApprovalState> {
        ApprovalState::parse(s)
    }
}
