//! Why a token was refused, and why a verifier could not be set up. Messages
//! are lowercase, name the failed check and never contain a token.

use scrip_jose::JoseError;

/// Why an access token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// The token failed a JOSE or RFC 9068 check (signature, `typ`, `iss`,
    /// `aud`, `exp`, algorithm, claims).
    #[error(transparent)]
    Token(#[from] JoseError),
    /// Its `scope` claim is not a list of actions.
    #[error("token scope is malformed")]
    BadScope,
    /// Its task or the token itself was revoked.
    #[error("token has been revoked")]
    Revoked,
    /// A single-use token (issued on a person's approval) presented again.
    #[error("single-use token was already presented")]
    AlreadyUsed,
    /// A single-use token whose first use scrip could not confirm (its
    /// introspection did not answer): refused, and it may be presented
    /// again.
    #[error(
        "cannot confirm with scrip that this single-use token is used for the first time; try again later"
    )]
    UseUnconfirmed,
    /// The revocation feed has not answered for longer than the allowed
    /// staleness (or never has): every token is refused until it does.
    #[error("revocation state is stale; try again later")]
    RevocationStale,
    /// scrip's keys could not be fetched for longer than
    /// [`crate::VerifierConfig::jwks_max_age`]: every token is refused
    /// until they are.
    #[error("scrip's signing keys could not be refreshed for too long; try again later")]
    KeysStale,
    /// The token is valid but does not grant the action.
    #[error("token scope does not include `{required}`")]
    InsufficientScope {
        /// The action that was required.
        required: String,
    },
    /// A token bound to a DPoP key (`cnf.jkt`) presented without a proof,
    /// as a bearer token.
    #[error("token is bound to a DPoP key: present it with `Authorization: DPoP` and a DPoP proof")]
    ProofRequired,
    /// A DPoP proof with a token that is not bound to a key.
    #[error("token is not bound to a DPoP key: present it with `Authorization: Bearer`")]
    NotBound,
    /// The DPoP proof failed a check of RFC 9449 §4.3, was used before, or
    /// is signed by another key than the token's.
    #[error("{0}")]
    Proof(String),
    /// This resource server cannot check DPoP proofs: it does not know the
    /// URL clients reach it at ([`crate::VerifierConfig::public_url`]).
    #[error("this resource server does not accept DPoP-bound tokens (it has no public_url)")]
    ProofUnchecked,
}

impl VerifyError {
    /// The RFC 6750 error code: `invalid_token` or `insufficient_scope`;
    /// `None` when the fault is the verifier's, not the token's.
    #[must_use]
    pub fn rfc6750_code(&self) -> Option<&'static str> {
        match self {
            Self::Token(_)
            | Self::BadScope
            | Self::Revoked
            | Self::AlreadyUsed
            | Self::ProofRequired
            | Self::NotBound
            | Self::ProofUnchecked => Some("invalid_token"),
            Self::Proof(_) => Some("invalid_dpop_proof"),
            Self::InsufficientScope { .. } => Some("insufficient_scope"),
            Self::RevocationStale | Self::KeysStale | Self::UseUnconfirmed => None,
        }
    }
}

/// Why a verifier could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    /// The configuration is inconsistent.
    #[error("verifier configuration: {0}")]
    Config(String),
    /// The HTTP client could not be built.
    #[error("cannot build the HTTP client: {0}")]
    Http(String),
    /// The issuer's metadata could not be fetched or is unusable.
    #[error("issuer metadata: {0}")]
    Metadata(String),
    /// The issuer's JWKS could not be fetched or holds no usable key.
    #[error("issuer keys: {0}")]
    Jwks(String),
    /// The first read of the revocation feed failed.
    #[error("revocation feed: {0}")]
    Feed(String),
}
