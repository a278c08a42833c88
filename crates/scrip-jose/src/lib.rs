//! JOSE for scrip: the keys scrip signs with, the JWKS it publishes, and the
//! one path by which any JWT — a federated workload identity or one of
//! scrip's own tokens — is verified.
//!
//! Signing keeps a parsed key and assembles the compact JWS itself (the
//! [`SigningKey`]), which is twice as fast as re-parsing a PKCS#8 document per
//! token and leaves room for an HSM behind the same type. Verification uses
//! `jsonwebtoken` for the signature and the registered claims, and adds the
//! checks RFC 8725 asks for that it leaves out: an explicit `typ`, refusing
//! `crit`, refusing key-location headers (`jku`, `x5u`, `jwk`, `x5c`), a size
//! cap and compact serialization only.
//!
//! Architecture invariant: the only way to obtain claims from a JWT is
//! [`verify`], and it never returns claims whose signature, `typ`, `iss`,
//! `aud`, `exp` and `nbf` were not checked against explicit expectations.

mod error;
mod keyset;
mod sign;
mod verify;

pub use error::JoseError;
pub use jsonwebtoken::Algorithm;
pub use keyset::KeySet;
pub use sign::{SigningAlgorithm, SigningKey, verify_detached};
pub use verify::{Expectations, TypRule, Verified, verify};

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;

/// The largest JWT accepted anywhere, in bytes.
pub const MAX_TOKEN_BYTES: usize = 16 * 1024;

/// Base64url without padding, as JOSE uses it.
#[must_use]
pub fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// A fresh random identifier: 128 bits from the system CSPRNG, base64url.
///
/// # Errors
/// [`JoseError::Crypto`] if the system random generator fails.
pub fn random_id() -> Result<String, JoseError> {
    let mut bytes = [0u8; 16];
    aws_lc_rs::rand::fill(&mut bytes).map_err(|_| JoseError::Crypto("random generator failed"))?;
    Ok(b64(&bytes))
}

/// SHA-256 of `data`, base64url: how scrip names a token in a log without
/// revealing it.
#[must_use]
pub fn sha256_b64(data: &[u8]) -> String {
    b64(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref())
}
