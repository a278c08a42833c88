//! The claims of the tokens scrip signs.
//!
//! Task tokens are shaped like OAuth Transaction Tokens (`txn`, `tctx`);
//! access tokens follow RFC 9068. The delegation chain is the RFC 8693 §4.1
//! `act` claim: the outermost actor is the current one.

use serde::{Deserialize, Serialize};

/// An actor in a delegation chain (RFC 8693 §4.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    /// The actor's subject.
    pub sub: String,
    /// The issuer of the actor's workload identity.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
    /// The actor before this one, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Box<Actor>>,
}

impl Actor {
    /// The number of actors in this chain.
    #[must_use]
    pub fn depth(&self) -> u32 {
        let mut depth = 1;
        let mut cur = self;
        while let Some(next) = cur.act.as_deref() {
            depth += 1;
            cur = next;
        }
        depth
    }

    /// The actors, current first.
    pub fn actors(&self) -> impl Iterator<Item = &Actor> {
        std::iter::successors(Some(self), |a| a.act.as_deref())
    }

    /// The issuers of the actors' identities, current first (an actor
    /// recorded without its issuer, before scrip kept it, gives none).
    #[must_use]
    pub fn issuers(&self) -> Vec<String> {
        self.actors().filter_map(|a| a.iss.clone()).collect()
    }

    /// The actors' subjects, current first.
    #[must_use]
    pub fn chain(&self) -> Vec<String> {
        let mut out = vec![self.sub.clone()];
        let mut cur = self;
        while let Some(next) = cur.act.as_deref() {
            out.push(next.sub.clone());
            cur = next;
        }
        out
    }
}

/// The task context (`tctx`) of a task token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskContext {
    /// Why the task exists, as the agent said.
    pub purpose: String,
    /// Where it runs (`dev`, `prod`, ...).
    pub environment: String,
    /// Delegation depth: 0 for a task started by the agent itself.
    pub depth: u32,
    /// The issuer of the agent's workload identity.
    pub agent_iss: String,
    /// The parent task, for a delegated task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parent: Option<String>,
}

/// The claims of a task token (`typ` `txntoken+jwt`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TaskClaims {
    /// scrip's issuer.
    pub iss: String,
    /// The agent: the subject of its workload identity.
    pub sub: String,
    /// scrip's issuer: a task token is only ever presented back to scrip.
    pub aud: String,
    /// Issued at (seconds since the epoch).
    pub iat: u64,
    /// Expiry: the task's deadline.
    pub exp: u64,
    /// Unique token id.
    pub jti: String,
    /// The task id.
    pub txn: String,
    /// The grants the task holds, space-separated `tool:action`.
    pub scope: String,
    /// The task context.
    pub tctx: TaskContext,
    /// The delegation chain, for a delegated task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Actor>,
    /// The DPoP key the task token is bound to (RFC 9449 §5, as a refresh
    /// token is), when its task was started with a proof: every exchange
    /// of it must then come with a proof by that key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
}

/// The claims of an RFC 9068 access token (`typ` `at+jwt`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AccessClaims {
    /// scrip's issuer.
    pub iss: String,
    /// The agent.
    pub sub: String,
    /// The issuer of the agent's workload identity: `sub` is unique only
    /// with it (two clusters' service accounts, say, can share a name).
    /// Absent from tokens of scrip before 2026-12.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_iss: Option<String>,
    /// Exactly one tool.
    pub aud: String,
    /// Issued at.
    pub iat: u64,
    /// Expiry: never after the task's.
    pub exp: u64,
    /// Unique token id.
    pub jti: String,
    /// The party the token was issued to: the current actor, else the agent.
    pub client_id: String,
    /// The actions granted at the tool, space-separated.
    pub scope: String,
    /// The task the token belongs to.
    pub txn: String,
    /// The delegation chain, for a token of a delegated task.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub act: Option<Actor>,
    /// For a token issued on a person's approval: which approval, who
    /// approved. Such a token is single use.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub approval: Option<ApprovalClaim>,
    /// For a token bound to a DPoP key (RFC 9449 §6.1): the key's
    /// thumbprint. Such a token is accepted only with a proof by that key.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cnf: Option<Confirmation>,
}

/// The confirmation claim (RFC 7800) of a DPoP-bound token.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Confirmation {
    /// The RFC 7638 SHA-256 thumbprint of the DPoP key, base64url.
    pub jkt: String,
}

/// The `approval` claim of a single-use access token issued on a person's
/// approval.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ApprovalClaim {
    /// The approval (`auth_req_id`).
    pub id: String,
    /// The approver's name.
    pub approver: String,
    /// Always true: the token may be presented once.
    pub single_use: bool,
}

/// Who may act for a task (RFC 8693 §4.4 `may_act`, as a list): an actor
/// matches an entry when its subject is `sub` and, if `iss` is given, its
/// identity's issuer is `iss`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MayAct {
    /// The actor's subject.
    pub sub: String,
    /// The issuer of the actor's identity, when it matters.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub iss: Option<String>,
}

impl MayAct {
    /// Whether an actor with this issuer and subject matches.
    #[must_use]
    pub fn matches(&self, issuer: &str, subject: &str) -> bool {
        self.sub == subject && self.iss.as_deref().is_none_or(|i| i == issuer)
    }
}
