//! A test identity provider: an ES256 key that signs Kubernetes-shaped
//! service-account tokens, and the JWKS scrip trusts it with.

use std::time::{SystemTime, UNIX_EPOCH};

use scrip_jose::{SigningAlgorithm, SigningKey};
use serde_json::{Value, json};

use crate::Result;

/// The issuer of the generated identities (a Kubernetes cluster).
pub const K8S_ISSUER: &str = "https://kubernetes.default.svc.cluster.local";
/// The audience scrip expects in identities.
pub const AUDIENCE: &str = "scrip";
/// How long a minted identity is valid, seconds (covers setup and the run).
const IDENTITY_TTL: u64 = 3600;

/// Seconds since the epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An identity provider with one ES256 key.
#[derive(Debug)]
pub struct Idp {
    issuer: String,
    key: SigningKey,
}

impl Idp {
    /// A fresh key; also returns its PKCS#8 DER.
    ///
    /// # Errors
    /// When key generation fails.
    pub fn generate(issuer: &str) -> Result<(Self, Vec<u8>)> {
        let (key, pkcs8) = SigningKey::generate(SigningAlgorithm::ES256)?;
        Ok((
            Self {
                issuer: issuer.to_owned(),
                key,
            },
            pkcs8.to_vec(),
        ))
    }

    /// An existing ES256 key (PKCS#8 DER).
    ///
    /// # Errors
    /// When the key does not parse as ES256.
    pub fn from_pkcs8(issuer: &str, der: &[u8]) -> Result<Self> {
        Ok(Self {
            issuer: issuer.to_owned(),
            key: SigningKey::from_pkcs8(SigningAlgorithm::ES256, der)?,
        })
    }

    /// The JWKS to put in a `jwks_file` of the trusted issuer.
    pub fn jwks(&self) -> Value {
        json!({ "keys": [self.key.public_jwk()] })
    }

    /// The issuer URL.
    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    /// A Kubernetes service-account token for `namespace`/`name`, signed
    /// ES256, valid for an hour.
    ///
    /// # Errors
    /// When signing fails.
    pub fn kubernetes(&self, namespace: &str, name: &str) -> Result<String> {
        let now = now();
        let claims = json!({
            "iss": self.issuer,
            "sub": format!("system:serviceaccount:{namespace}:{name}"),
            "aud": AUDIENCE,
            "iat": now,
            "nbf": now,
            "exp": now + IDENTITY_TTL,
            "kubernetes.io": {
                "namespace": namespace,
                "serviceaccount": { "name": name, "uid": "4f1e6c52-0000-4000-8000-000000000001" },
                "pod": { "name": format!("{name}-7d9f8"), "uid": "4f1e6c52-0000-4000-8000-000000000002" }
            }
        });
        Ok(self.key.sign_jwt("JWT", &claims)?)
    }
}
