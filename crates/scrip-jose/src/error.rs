//! Why a JWT or a key was refused. Messages are lowercase, name the failed
//! check and never contain the token.

/// A JOSE failure.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JoseError {
    /// Longer than [`crate::MAX_TOKEN_BYTES`].
    #[error("token is larger than {} bytes", crate::MAX_TOKEN_BYTES)]
    TooLarge,
    /// Not a compact JWS.
    #[error("token is malformed: {0}")]
    Malformed(&'static str),
    /// A JWE (five parts) where a signed JWT was expected.
    #[error("encrypted tokens are not accepted")]
    Encrypted,
    /// `alg` not on the allow-list (this includes `none` and HMAC).
    #[error("token algorithm `{0}` is not allowed")]
    AlgorithmNotAllowed(String),
    /// A `crit` header: scrip understands no JWS extensions.
    #[error("token has a critical header extension, which is not supported")]
    CriticalHeader,
    /// A header that names or embeds a key.
    #[error("token header `{0}` is not accepted: keys come only from configuration")]
    ForbiddenHeader(&'static str),
    /// The `typ` header is not the one expected here.
    #[error("token type `{found}` is not accepted here; expected {expected}")]
    WrongType {
        /// What this place accepts.
        expected: String,
        /// What the token said (sanitised and shortened).
        found: String,
    },
    /// No key with the token's `kid` (or no `kid` where one is needed).
    #[error("token is signed by an unknown key")]
    UnknownKey,
    /// The key's algorithm differs from the token's.
    #[error("token algorithm does not match its key")]
    KeyAlgorithmMismatch,
    /// Past `exp`.
    #[error("token has expired")]
    Expired,
    /// Before `nbf`.
    #[error("token is not yet valid")]
    NotYetValid,
    /// `iat` in the future.
    #[error("token was issued in the future")]
    IssuedInFuture,
    /// `iss` differs.
    #[error("token issuer is not accepted")]
    WrongIssuer,
    /// No `aud` matched.
    #[error("token audience is not accepted")]
    WrongAudience,
    /// The signature does not verify.
    #[error("token signature is invalid")]
    BadSignature,
    /// A required claim is missing.
    #[error("token is missing the `{0}` claim")]
    MissingClaim(String),
    /// The claims are not what this kind of token holds.
    #[error("token claims are malformed")]
    BadClaims,
    /// A key could not be parsed or used.
    #[error("key error: {0}")]
    Key(String),
    /// The crypto library failed.
    #[error("cryptographic operation failed: {0}")]
    Crypto(&'static str),
}

impl From<jsonwebtoken::errors::Error> for JoseError {
    fn from(e: jsonwebtoken::errors::Error) -> Self {
        use jsonwebtoken::errors::ErrorKind as K;
        match e.kind() {
            K::ExpiredSignature => Self::Expired,
            K::ImmatureSignature => Self::NotYetValid,
            K::InvalidIssuer => Self::WrongIssuer,
            K::InvalidAudience => Self::WrongAudience,
            K::InvalidSignature => Self::BadSignature,
            K::InvalidAlgorithm | K::InvalidAlgorithmName => {
                Self::AlgorithmNotAllowed("mismatch".into())
            }
            K::MissingRequiredClaim(c) => Self::MissingClaim(c.clone()),
            K::InvalidClaimFormat(_) | K::InvalidSubject => Self::BadClaims,
            K::Json(_) | K::Utf8(_) | K::Base64(_) | K::InvalidToken => {
                Self::Malformed("a part does not decode")
            }
            K::InvalidEcdsaKey
            | K::InvalidEddsaKey
            | K::InvalidRsaKey(_)
            | K::InvalidKeyFormat
            | K::UnsupportedAlgorithm
            | K::MissingAlgorithm => Self::Key("key is not usable for this algorithm".into()),
            K::Provider(_) | K::RsaFailedSigning | K::Signing(_) => {
                Self::Crypto("verification failed")
            }
            // ErrorKind is non-exhaustive: anything new refuses the token.
            _ => Self::BadSignature,
        }
    }
}
