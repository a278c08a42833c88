//! JOSE for scrip: the keys scrip signs with, the JWKS it publishes, and the
//! one path by which any JWT — a federated workload identity or one of
//! scrip's own tokens — is verified.
//!
//! Signing keeps a parsed key and assembles the compact JWS itself (the
//! [`SigningKey`]), which is twice as fast as re-parsing a PKCS#8 document per
//! token and leaves room for an HSM behind the same type. Verification keeps
//! each public key parsed once (aws-lc-rs) per algorithm it may verify,
//! checks the signature over the signing input, decodes the claims once, and
//! checks what RFC 7519 and RFC 8725 ask: an explicit `typ`, no `crit`, no
//! key-location headers (`jku`, `x5u`, `jwk`, `x5c`), a size cap, compact
//! serialization only, the algorithm allow-list, exact `iss`, a required
//! `aud`, `exp`, `nbf` and `iat`. `jsonwebtoken` is used for its JWK and
//! algorithm types.
//!
//! DPoP proofs (RFC 9449), the one kind of JWT that carries its own key,
//! are checked apart, by [`dpop::verify_proof`].
//!
//! Architecture invariant: the only way to obtain claims from a JWT is
//! [`verify`], and it never returns claims whose signature, `typ`, `iss`,
//! `aud`, `exp` and `nbf` were not checked against explicit expectations;
//! the only way to accept a DPoP proof is [`dpop::verify_proof`].

mod clock;
pub mod dpop;
mod error;
mod keyset;
mod plain;
mod recent;
mod seal;
mod sign;
mod verify;

pub use clock::Stamp;
pub use error::JoseError;
pub use jsonwebtoken::Algorithm;
pub use keyset::{KeySet, MAX_KEYS as MAX_JWKS_KEYS, SharedKeySet, publishes_private_key};
pub use plain::plain as plain_json;
pub use recent::{Recent, TokenDigest, token_digest};
pub use seal::{KEK_LEN, Kek, Under};
pub use sign::{SigningAlgorithm, SigningKey, verify_detached};
pub use verify::{Expectations, TypRule, Validity, Verified, claims_of_verified, verify};

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

/// A unique id for a row that is written once and looked up by it (a task):
/// 48 bits of the time in milliseconds, then 80 random bits, base64url (22
/// characters, as [`random_id`]). Ids made close in time share their first
/// characters, so their inserts land on the same few pages of an index
/// instead of one random page each in a store of millions of rows. Not for
/// anything that must be unguessable (`jti`s, secrets): use [`random_id`].
///
/// # Errors
/// [`JoseError::Crypto`] if the system random generator fails.
pub fn time_ordered_id() -> Result<String, JoseError> {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut bytes = [0u8; 16];
    let (time, random) = bytes.split_at_mut(6);
    // The low 48 bits: milliseconds until the year 10889.
    for (to, from) in time.iter_mut().zip(ms.to_be_bytes().into_iter().skip(10)) {
        *to = from;
    }
    aws_lc_rs::rand::fill(random).map_err(|_| JoseError::Crypto("random generator failed"))?;
    Ok(b64(&bytes))
}

/// SHA-256 of `data`, base64url: how scrip names a token in a log without
/// revealing it.
#[must_use]
pub fn sha256_b64(data: &[u8]) -> String {
    b64(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref())
}

/// The RFC 7638 thumbprint of a JWK's required members: SHA-256 of the
/// JSON object of `members` in lexicographic order of their names, without
/// whitespace, base64url. Written out here rather than left to a JSON map,
/// whose order depends on the build's serde_json features (`preserve_order`
/// keeps insertion order, and another crate in the build turns it on).
pub(crate) fn jwk_thumbprint(members: &[(&str, &str)]) -> String {
    let mut sorted: Vec<&(&str, &str)> = members.iter().collect();
    sorted.sort_by(|a, b| a.0.cmp(b.0));
    let mut text = String::from("{");
    for (i, (name, value)) in sorted.iter().enumerate() {
        if i > 0 {
            text.push(',');
        }
        text.push_str(&serde_json::Value::from(*name).to_string());
        text.push(':');
        text.push_str(&serde_json::Value::from(*value).to_string());
    }
    text.push('}');
    sha256_b64(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7638 §3.1's example, its members given in any order: the
    /// thumbprint does not depend on how a JSON map orders keys.
    #[test]
    fn a_jwk_thumbprint_sorts_its_members_itself() {
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
        for members in [
            [("e", "AQAB"), ("kty", "RSA"), ("n", n)],
            [("n", n), ("kty", "RSA"), ("e", "AQAB")],
            [("kty", "RSA"), ("n", n), ("e", "AQAB")],
        ] {
            assert_eq!(
                jwk_thumbprint(&members),
                "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
            );
        }
    }

    #[test]
    fn time_ordered_ids_start_with_the_time_and_differ() {
        let a = time_ordered_id().unwrap();
        let b = time_ordered_id().unwrap();
        assert_eq!(a.len(), 22);
        assert_ne!(a, b);
        let bytes = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode(&a)
            .unwrap();
        let mut ms = [0u8; 8];
        ms[2..].copy_from_slice(&bytes[..6]);
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_millis();
        let at = u128::from(u64::from_be_bytes(ms));
        assert!(now.abs_diff(at) < 5_000, "{at} vs {now}");
    }
}
