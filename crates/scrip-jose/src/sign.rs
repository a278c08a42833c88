//! scrip's signing keys: generation, loading from PKCS#8, the public JWK and
//! compact JWS signing with a key parsed once.

use std::fmt;
use std::str::FromStr;

use aws_lc_rs::encoding::AsDer;
use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::rsa::KeySize;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair, RSA_PKCS1_SHA256,
    RsaKeyPair,
};
use serde::Serialize;

use crate::{JoseError, b64};

/// The algorithms scrip signs with.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Hash, Default, serde::Serialize, serde::Deserialize,
)]
pub enum SigningAlgorithm {
    /// ECDSA P-256 with SHA-256 (the default).
    #[default]
    ES256,
    /// Ed25519.
    EdDSA,
    /// RSASSA-PKCS1-v1_5 with SHA-256, 2048-bit keys.
    RS256,
}

impl SigningAlgorithm {
    /// Every algorithm scrip signs with.
    pub const ALL: [Self; 3] = [Self::ES256, Self::EdDSA, Self::RS256];

    /// The JOSE `alg` name.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::ES256 => "ES256",
            Self::EdDSA => "EdDSA",
            Self::RS256 => "RS256",
        }
    }

    /// The same algorithm as `jsonwebtoken` names it.
    #[must_use]
    pub fn to_jwt(self) -> jsonwebtoken::Algorithm {
        match self {
            Self::ES256 => jsonwebtoken::Algorithm::ES256,
            Self::EdDSA => jsonwebtoken::Algorithm::EdDSA,
            Self::RS256 => jsonwebtoken::Algorithm::RS256,
        }
    }
}

impl fmt::Display for SigningAlgorithm {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SigningAlgorithm {
    type Err = JoseError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "ES256" => Ok(Self::ES256),
            "EdDSA" => Ok(Self::EdDSA),
            "RS256" => Ok(Self::RS256),
            _ => Err(JoseError::AlgorithmNotAllowed(s.chars().take(16).collect())),
        }
    }
}

enum Inner {
    Ec(EcdsaKeyPair),
    Ed(Ed25519KeyPair),
    Rsa(RsaKeyPair),
}

/// A private signing key, parsed once, with its `kid`.
pub struct SigningKey {
    alg: SigningAlgorithm,
    kid: String,
    inner: Inner,
    rng: SystemRandom,
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never the private key.
        f.debug_struct("SigningKey")
            .field("alg", &self.alg)
            .field("kid", &self.kid)
            .finish_non_exhaustive()
    }
}

fn crypto(what: &'static str) -> impl Fn(aws_lc_rs::error::Unspecified) -> JoseError {
    move |_| JoseError::Crypto(what)
}

impl SigningKey {
    /// Generates a new key; returns it with its PKCS#8 (v1) encoding for
    /// storage, zeroed when dropped.
    ///
    /// # Errors
    /// [`JoseError::Crypto`] when key generation fails.
    pub fn generate(
        alg: SigningAlgorithm,
    ) -> Result<(Self, zeroize::Zeroizing<Vec<u8>>), JoseError> {
        let rng = SystemRandom::new();
        let pkcs8 = match alg {
            SigningAlgorithm::ES256 => {
                EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng)
                    .map_err(crypto("key generation"))?
                    .as_ref()
                    .to_vec()
            }
            SigningAlgorithm::EdDSA => Ed25519KeyPair::generate_pkcs8v1(&rng)
                .map_err(crypto("key generation"))?
                .as_ref()
                .to_vec(),
            SigningAlgorithm::RS256 => {
                let pair =
                    RsaKeyPair::generate(KeySize::Rsa2048).map_err(crypto("key generation"))?;
                AsDer::<aws_lc_rs::encoding::Pkcs8V1Der<'_>>::as_der(&pair)
                    .map_err(crypto("key encoding"))?
                    .as_ref()
                    .to_vec()
            }
        };
        let pkcs8 = zeroize::Zeroizing::new(pkcs8);
        let key = Self::from_pkcs8(alg, &pkcs8)?;
        Ok((key, pkcs8))
    }

    /// Loads a key from its PKCS#8 encoding.
    ///
    /// # Errors
    /// [`JoseError::Key`] when the bytes are not a key of that algorithm.
    pub fn from_pkcs8(alg: SigningAlgorithm, der: &[u8]) -> Result<Self, JoseError> {
        let bad = |_| JoseError::Key(format!("not a valid {alg} private key"));
        let inner = match alg {
            SigningAlgorithm::ES256 => Inner::Ec(
                EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der).map_err(bad)?,
            ),
            SigningAlgorithm::EdDSA => {
                Inner::Ed(Ed25519KeyPair::from_pkcs8_maybe_unchecked(der).map_err(bad)?)
            }
            SigningAlgorithm::RS256 => {
                let pair = RsaKeyPair::from_pkcs8(der).map_err(bad)?;
                if pair.public_modulus_len() < 256 {
                    return Err(JoseError::Key("RSA keys must be at least 2048 bits".into()));
                }
                Inner::Rsa(pair)
            }
        };
        let mut key = Self {
            alg,
            kid: String::new(),
            inner,
            rng: SystemRandom::new(),
        };
        key.kid = key.thumbprint();
        Ok(key)
    }

    /// The algorithm.
    #[must_use]
    pub fn algorithm(&self) -> SigningAlgorithm {
        self.alg
    }

    /// The key id: the RFC 7638 JWK thumbprint (SHA-256).
    #[must_use]
    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// The members of the public JWK that RFC 7638 hashes, in its order.
    fn required_members(&self) -> Vec<(&'static str, String)> {
        match &self.inner {
            Inner::Ec(k) => {
                // Uncompressed point: 0x04 || x (32) || y (32).
                let point = k.public_key().as_ref();
                let x = point.get(1..33).unwrap_or_default();
                let y = point.get(33..65).unwrap_or_default();
                vec![
                    ("crv", "P-256".into()),
                    ("kty", "EC".into()),
                    ("x", b64(x)),
                    ("y", b64(y)),
                ]
            }
            Inner::Ed(k) => vec![
                ("crv", "Ed25519".into()),
                ("kty", "OKP".into()),
                ("x", b64(k.public_key().as_ref())),
            ],
            Inner::Rsa(k) => {
                let public = k.public_key();
                vec![
                    (
                        "e",
                        b64(public.exponent().big_endian_without_leading_zero()),
                    ),
                    ("kty", "RSA".into()),
                    ("n", b64(public.modulus().big_endian_without_leading_zero())),
                ]
            }
        }
    }

    fn thumbprint(&self) -> String {
        let members = self.required_members();
        let members: Vec<(&str, &str)> = members.iter().map(|(k, v)| (*k, v.as_str())).collect();
        crate::jwk_thumbprint(&members)
    }

    /// The public JWK: key type, public parameters, `kid`, `alg`, `use`.
    /// Never any private parameter.
    #[must_use]
    pub fn public_jwk(&self) -> serde_json::Value {
        let mut map: serde_json::Map<String, serde_json::Value> = self
            .required_members()
            .into_iter()
            .map(|(k, v)| (k.to_owned(), serde_json::Value::String(v)))
            .collect();
        map.insert("kid".into(), self.kid.clone().into());
        map.insert("alg".into(), self.alg.as_str().into());
        map.insert("use".into(), "sig".into());
        serde_json::Value::Object(map)
    }

    /// Signs `claims` as a compact JWS with the given `typ` header.
    ///
    /// # Errors
    /// [`JoseError::Crypto`] when signing fails.
    pub fn sign_jwt<T: Serialize>(&self, typ: &str, claims: &T) -> Result<String, JoseError> {
        #[derive(Serialize)]
        struct Header<'a> {
            alg: &'a str,
            typ: &'a str,
            kid: &'a str,
        }
        let header = serde_json::to_vec(&Header {
            alg: self.alg.as_str(),
            typ,
            kid: &self.kid,
        })
        .map_err(|_| JoseError::Crypto("header encoding"))?;
        let payload =
            serde_json::to_vec(claims).map_err(|_| JoseError::Crypto("claims encoding"))?;
        let mut out = String::with_capacity(header.len() * 2 + payload.len() * 2 + 360);
        out.push_str(&b64(&header));
        out.push('.');
        out.push_str(&b64(&payload));
        let signature = self.sign_raw(out.as_bytes())?;
        out.push('.');
        out.push_str(&b64(&signature));
        Ok(out)
    }

    /// Signs `msg` itself (a detached signature, not a JWS): used for audit
    /// checkpoints. Verify with [`verify_detached`].
    ///
    /// # Errors
    /// [`JoseError::Crypto`] when signing fails.
    pub fn sign_detached(&self, msg: &[u8]) -> Result<String, JoseError> {
        self.sign_raw(msg).map(|s| b64(&s))
    }

    fn sign_raw(&self, msg: &[u8]) -> Result<Vec<u8>, JoseError> {
        match &self.inner {
            Inner::Ec(k) => Ok(k
                .sign(&self.rng, msg)
                .map_err(crypto("signing"))?
                .as_ref()
                .to_vec()),
            Inner::Ed(k) => Ok(k.sign(msg).as_ref().to_vec()),
            Inner::Rsa(k) => {
                let mut sig = vec![0u8; k.public_modulus_len()];
                k.sign(&RSA_PKCS1_SHA256, &self.rng, msg, &mut sig)
                    .map_err(crypto("signing"))?;
                Ok(sig)
            }
        }
    }
}

/// Verifies a detached signature made by [`SigningKey::sign_detached`] with
/// the key of public JWK `jwk` (Ed25519 or ES256).
#[must_use]
pub fn verify_detached(jwk: &serde_json::Value, msg: &[u8], signature_b64: &str) -> bool {
    use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED, ED25519, UnparsedPublicKey};
    use base64::Engine as _;
    let dec = |v: Option<&serde_json::Value>| {
        v.and_then(serde_json::Value::as_str).and_then(|s| {
            base64::engine::general_purpose::URL_SAFE_NO_PAD
                .decode(s)
                .ok()
        })
    };
    let Some(sig) = base64::engine::general_purpose::URL_SAFE_NO_PAD
        .decode(signature_b64)
        .ok()
    else {
        return false;
    };
    match (
        jwk.get("kty").and_then(|v| v.as_str()),
        jwk.get("crv").and_then(|v| v.as_str()),
    ) {
        (Some("OKP"), Some("Ed25519")) => dec(jwk.get("x")).is_some_and(|x| {
            UnparsedPublicKey::new(&ED25519, x)
                .verify(msg, &sig)
                .is_ok()
        }),
        (Some("EC"), Some("P-256")) => match (dec(jwk.get("x")), dec(jwk.get("y"))) {
            (Some(x), Some(y)) => {
                let mut point = vec![4u8];
                point.extend_from_slice(&x);
                point.extend_from_slice(&y);
                UnparsedPublicKey::new(&ECDSA_P256_SHA256_FIXED, point)
                    .verify(msg, &sig)
                    .is_ok()
            }
            _ => false,
        },
        _ => false,
    }
}
