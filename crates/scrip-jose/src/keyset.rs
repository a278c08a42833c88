//! A set of public verification keys, read from a JWKS document or built from
//! scrip's own signing keys.
//!
//! Each key is pinned to the algorithms it may verify: the JWK's `alg` when it
//! names one, else what its type and curve allow. Symmetric (`oct`) keys and
//! encryption keys are never loaded, which closes the HMAC-with-a-public-key
//! confusion at the source.

use std::collections::HashMap;

use aws_lc_rs::signature::{self as sig, ParsedPublicKey, RsaPublicKeyComponents};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyOperations, PublicKeyUse};

use crate::JoseError;

/// The most keys a JWKS may hold: a verifier refuses a larger document.
pub const MAX_KEYS: usize = 64;

/// One key, parsed once for each algorithm it may verify.
struct Entry {
    keys: Vec<(Algorithm, ParsedPublicKey)>,
}

/// Parses the public key of `jwk` for each of `algorithms`; an empty list
/// when the key material is unusable (bad encoding, point not on the curve,
/// RSA modulus under 2048 bits).
pub(crate) fn parse(jwk: &Jwk, algorithms: &[Algorithm]) -> Vec<(Algorithm, ParsedPublicKey)> {
    let dec = |s: &str| URL_SAFE_NO_PAD.decode(s).ok();
    let mut out = Vec::new();
    for &alg in algorithms {
        let parsed = match (&jwk.algorithm, alg) {
            (AlgorithmParameters::EllipticCurve(p), Algorithm::ES256 | Algorithm::ES384) => {
                let (Some(x), Some(y)) = (dec(&p.x), dec(&p.y)) else {
                    continue;
                };
                let (verifier, size): (&'static sig::EcdsaVerificationAlgorithm, usize) =
                    if alg == Algorithm::ES256 {
                        (&sig::ECDSA_P256_SHA256_FIXED, 32)
                    } else {
                        (&sig::ECDSA_P384_SHA384_FIXED, 48)
                    };
                if x.len() != size || y.len() != size {
                    continue;
                }
                let mut point = Vec::with_capacity(1 + 2 * size);
                point.push(4);
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                ParsedPublicKey::new(verifier, point).ok()
            }
            (AlgorithmParameters::OctetKeyPair(p), Algorithm::EdDSA) => dec(&p.x)
                .filter(|x| x.len() == 32 && !small_order(x))
                .and_then(|x| ParsedPublicKey::new(&sig::ED25519, x).ok()),
            (AlgorithmParameters::RSA(p), _) => {
                let params: &'static sig::RsaParameters = match alg {
                    Algorithm::RS256 => &sig::RSA_PKCS1_2048_8192_SHA256,
                    Algorithm::RS384 => &sig::RSA_PKCS1_2048_8192_SHA384,
                    Algorithm::RS512 => &sig::RSA_PKCS1_2048_8192_SHA512,
                    Algorithm::PS256 => &sig::RSA_PSS_2048_8192_SHA256,
                    Algorithm::PS384 => &sig::RSA_PSS_2048_8192_SHA384,
                    Algorithm::PS512 => &sig::RSA_PSS_2048_8192_SHA512,
                    _ => continue,
                };
                let (Some(n), Some(e)) = (dec(&p.n), dec(&p.e)) else {
                    continue;
                };
                // Leading zero bytes do not count towards the key size.
                let significant = n.iter().skip_while(|b| **b == 0).count();
                if significant < 256 {
                    continue;
                }
                RsaPublicKeyComponents { n: &n, e: &e }
                    .to_parsed_public_key(params)
                    .ok()
            }
            _ => None,
        };
        if let Some(k) = parsed {
            out.push((alg, k));
        }
    }
    out
}

/// A [`KeySet`] that can be replaced while in use (key rotation): each
/// verification takes a snapshot, so a replacement never tears one.
#[derive(Clone, Debug, Default)]
pub struct SharedKeySet(std::sync::Arc<std::sync::RwLock<std::sync::Arc<KeySet>>>);

impl SharedKeySet {
    /// A shared set holding `keys`.
    #[must_use]
    pub fn new(keys: KeySet) -> Self {
        Self(std::sync::Arc::new(std::sync::RwLock::new(
            std::sync::Arc::new(keys),
        )))
    }

    /// The keys now.
    #[must_use]
    pub fn snapshot(&self) -> std::sync::Arc<KeySet> {
        match self.0.read() {
            Ok(k) => k.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Replaces the keys.
    pub fn replace(&self, keys: KeySet) {
        let keys = std::sync::Arc::new(keys);
        match self.0.write() {
            Ok(mut k) => *k = keys,
            Err(poisoned) => *poisoned.into_inner() = keys,
        }
    }
}

/// Public keys by `kid`, each with the algorithms it may verify.
#[derive(Default)]
pub struct KeySet {
    by_kid: HashMap<String, Entry>,
    /// Keys without a `kid`: usable only when the set holds exactly one key.
    anonymous: Vec<Entry>,
}

impl std::fmt::Debug for KeySet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KeySet")
            .field("kids", &self.by_kid.keys().collect::<Vec<_>>())
            .field("anonymous", &self.anonymous.len())
            .finish()
    }
}

/// Whether a JWK may verify signatures (RFC 7517 §4.2, §4.3): its `use`,
/// if any, is `sig` (or SPIFFE's `jwt-svid`, the use of a trust bundle's
/// JWT-SVID keys), and its `key_ops`, if any, include `verify`.
fn for_signatures(jwk: &Jwk) -> bool {
    let use_ok = match &jwk.common.public_key_use {
        None | Some(PublicKeyUse::Signature) => true,
        Some(PublicKeyUse::Other(other)) => other == "jwt-svid",
        Some(PublicKeyUse::Encryption) => false,
    };
    let ops_ok = jwk
        .common
        .key_operations
        .as_ref()
        .is_none_or(|ops| ops.iter().any(|op| matches!(op, KeyOperations::Verify)));
    use_ok && ops_ok
}

fn algorithms_for(jwk: &Jwk) -> Vec<Algorithm> {
    let from_type = match &jwk.algorithm {
        AlgorithmParameters::EllipticCurve(p) => match p.curve {
            EllipticCurve::P256 => vec![Algorithm::ES256],
            EllipticCurve::P384 => vec![Algorithm::ES384],
            _ => vec![],
        },
        AlgorithmParameters::OctetKeyPair(p) => match p.curve {
            EllipticCurve::Ed25519 => vec![Algorithm::EdDSA],
            _ => vec![],
        },
        AlgorithmParameters::RSA(_) => vec![
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
        ],
        // Symmetric and unknown key types are never usable for verification.
        _ => vec![],
    };
    match jwk.common.key_algorithm {
        None => from_type,
        Some(named) => from_type
            .into_iter()
            .filter(|a| format!("{a:?}") == named.to_string())
            .collect(),
    }
}

/// The encodings of the eight points of small order on edwards25519 (and
/// the non-canonical ones of two of them), sign bit cleared: the identity,
/// the point of order 2, the two of order 4 and the four of order 8.
/// Computed as the multiples of the torsion subgroup's generator; the same
/// list as libsodium's `ge25519_has_small_order`.
const SMALL_ORDER: [[u8; 32]; 7] = [
    // y = 0 (order 4)
    [0; 32],
    // y = 1, the identity
    [
        0x01, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        0, 0, 0,
    ],
    // order 8
    [
        0x26, 0xe8, 0x95, 0x8f, 0xc2, 0xb2, 0x27, 0xb0, 0x45, 0xc3, 0xf4, 0x89, 0xf2, 0xef, 0x98,
        0xf0, 0xd5, 0xdf, 0xac, 0x05, 0xd3, 0xc6, 0x33, 0x39, 0xb1, 0x38, 0x02, 0x88, 0x6d, 0x53,
        0xfc, 0x05,
    ],
    // order 8
    [
        0xc7, 0x17, 0x6a, 0x70, 0x3d, 0x4d, 0xd8, 0x4f, 0xba, 0x3c, 0x0b, 0x76, 0x0d, 0x10, 0x67,
        0x0f, 0x2a, 0x20, 0x53, 0xfa, 0x2c, 0x39, 0xcc, 0xc6, 0x4e, 0xc7, 0xfd, 0x77, 0x92, 0xac,
        0x03, 0x7a,
    ],
    // y = p - 1 (order 2)
    [
        0xec, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
    // y = p, a non-canonical 0
    [
        0xed, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
    // y = p + 1, a non-canonical 1
    [
        0xee, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        0xff, 0x7f,
    ],
];

/// Whether an Ed25519 public key is a point of small order. AWS-LC decodes
/// such a key and verifies with it; for the identity, `[S]B` with any `S`
/// is a signature over every message, and for the others one try in eight
/// is. A key set never holds one by mistake: it is skipped.
fn small_order(x: &[u8]) -> bool {
    SMALL_ORDER.iter().any(|bad| {
        x.len() == 32
            && x.iter()
                .zip(bad)
                .enumerate()
                .all(|(i, (a, b))| if i == 31 { a & 0x7f == *b } else { a == b })
    })
}

/// The first private member of an asymmetric key among `keys`, if any;
/// symmetric keys (`k`) are never used, and skipped.
fn private_member(keys: &[serde_json::Value]) -> Option<&'static str> {
    keys.iter().find_map(|value| {
        crate::dpop::PRIVATE_MEMBERS
            .iter()
            .find(|m| **m != "k" && value.get(**m).is_some())
            .copied()
    })
}

/// Whether `bytes`, a JWKS document, publishes an asymmetric private key:
/// whoever read it can sign as its issuer, so the keys a cache holds from
/// an earlier document of that issuer are no longer to be trusted either.
/// A JSON document naming a member serde_json reserves (see
/// [`crate::plain_json`]) cannot be read as other parsers read it, so
/// whether it publishes one cannot be told: it is taken to (fail closed);
/// text that is no JSON (or that nests deeper than serde_json reads)
/// publishes nothing, as before it could be read at all.
#[must_use]
pub fn publishes_private_key(bytes: &[u8]) -> bool {
    #[derive(serde::Deserialize)]
    struct Doc {
        keys: Vec<serde_json::Value>,
    }
    if !crate::plain::plain(bytes) {
        return crate::plain::names_reserved(bytes);
    }
    serde_json::from_slice::<Doc>(bytes).is_ok_and(|doc| private_member(&doc.keys).is_some())
}

impl KeySet {
    /// Reads a JWKS document (`{"keys":[...]}`). Keys that cannot verify
    /// signatures here (symmetric, encryption, unknown curve) are skipped.
    ///
    /// # Errors
    /// [`JoseError::Key`] when the document is not a JWKS, holds too many keys,
    /// repeats a `kid`, publishes a private key (whoever read it can sign
    /// as its issuer: none of the document's keys is trusted), or holds no
    /// usable key.
    pub fn from_jwks_json(bytes: &[u8]) -> Result<Self, JoseError> {
        #[derive(serde::Deserialize)]
        struct Doc {
            keys: Vec<serde_json::Value>,
        }
        if !crate::plain::plain(bytes) {
            return Err(JoseError::Key(
                "document is not a JWKS as other parsers read it (malformed, or naming a member serde_json reserves)".into(),
            ));
        }
        let doc: Doc = serde_json::from_slice(bytes)
            .map_err(|_| JoseError::Key("document is not a JWKS (`{\"keys\":[...]}`)".into()))?;
        if doc.keys.len() > MAX_KEYS {
            return Err(JoseError::Key(format!(
                "JWKS holds more than {MAX_KEYS} keys"
            )));
        }
        let mut set = Self::default();
        if let Some(member) = private_member(&doc.keys) {
            return Err(JoseError::Key(format!(
                "JWKS publishes private key material (member `{member}`): the issuer's key is exposed, and none of the document's keys is used"
            )));
        }
        for value in doc.keys {
            // A key of a type jsonwebtoken does not know is skipped, not fatal.
            let Ok(jwk) = serde_json::from_value::<Jwk>(value) else {
                continue;
            };
            if !for_signatures(&jwk) {
                continue;
            }
            let algorithms = algorithms_for(&jwk);
            if algorithms.is_empty() {
                continue;
            }
            let keys = parse(&jwk, &algorithms);
            if keys.is_empty() {
                continue;
            }
            set.insert(jwk.common.key_id, Entry { keys })?;
        }
        if set.is_empty() {
            return Err(JoseError::Key("JWKS holds no usable signature key".into()));
        }
        Ok(set)
    }

    fn insert(&mut self, kid: Option<String>, entry: Entry) -> Result<(), JoseError> {
        match kid {
            Some(kid) => {
                if self.by_kid.insert(kid, entry).is_some() {
                    return Err(JoseError::Key("JWKS repeats a `kid`".into()));
                }
            }
            None => self.anonymous.push(entry),
        }
        Ok(())
    }

    /// Builds a set from public JWKs that scrip itself produced.
    ///
    /// # Errors
    /// [`JoseError::Key`] when a JWK is unusable.
    pub fn from_public_jwks(jwks: &[serde_json::Value]) -> Result<Self, JoseError> {
        let doc = serde_json::json!({ "keys": jwks });
        let bytes = serde_json::to_vec(&doc).map_err(|_| JoseError::Key("unencodable".into()))?;
        Self::from_jwks_json(&bytes)
    }

    /// The number of usable keys.
    #[must_use]
    pub fn len(&self) -> usize {
        self.by_kid.len() + self.anonymous.len()
    }

    /// Whether the set holds no usable key.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether a key with this `kid` is present.
    #[must_use]
    pub fn contains_kid(&self, kid: &str) -> bool {
        self.by_kid.contains_key(kid)
    }

    /// Whether every key of this set is still listed in `document`, a JWKS
    /// that may itself be unusable (too many keys, a repeated `kid`, none
    /// usable): each `kid` of the set is the `kid` of one of its keys, and a
    /// key without a `kid` is held only if the document has one too.
    /// `None` when `document` is no JWKS at all (`{"keys":[...]}`).
    #[must_use]
    pub fn still_listed_in(&self, document: &[u8]) -> Option<bool> {
        #[derive(serde::Deserialize)]
        struct Doc {
            keys: Vec<serde_json::Value>,
        }
        fn kid(k: &serde_json::Value) -> Option<&str> {
            k.get("kid").and_then(serde_json::Value::as_str)
        }
        if !crate::plain::plain(document) {
            return None;
        }
        let doc: Doc = serde_json::from_slice(document).ok()?;
        let listed: std::collections::HashSet<&str> = doc.keys.iter().filter_map(kid).collect();
        let anonymous = doc.keys.iter().any(|k| kid(k).is_none());
        Some(
            self.by_kid.keys().all(|k| listed.contains(k.as_str()))
                && (self.anonymous.is_empty() || anonymous),
        )
    }

    /// The key that may verify a token with this `kid` and `alg`. A key is
    /// used with exactly one algorithm (RFC 8725 §3.1): its JWK's `alg`, or
    /// else the first of `allowed` that fits its type, so that an RSA key
    /// without `alg` never verifies both RS256 and PS256.
    ///
    /// # Errors
    /// [`JoseError::UnknownKey`] when no key matches;
    /// [`JoseError::KeyAlgorithmMismatch`] when the key is used with another
    /// algorithm.
    pub(crate) fn find(
        &self,
        kid: Option<&str>,
        alg: Algorithm,
        allowed: &[Algorithm],
    ) -> Result<&ParsedPublicKey, JoseError> {
        let entry = match kid {
            Some(kid) => self.by_kid.get(kid),
            // Without a `kid`, only an unambiguous set may be used.
            None if self.len() == 1 => self
                .anonymous
                .first()
                .or_else(|| self.by_kid.values().next()),
            None => None,
        }
        .ok_or(JoseError::UnknownKey)?;
        let its_algorithm = allowed
            .iter()
            .find(|a| entry.keys.iter().any(|(k, _)| k == *a));
        if its_algorithm != Some(&alg) {
            return Err(JoseError::KeyAlgorithmMismatch);
        }
        entry
            .keys
            .iter()
            .find(|(a, _)| *a == alg)
            .map(|(_, k)| k)
            .ok_or(JoseError::KeyAlgorithmMismatch)
    }
}
