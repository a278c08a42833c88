//! A DPoP client key (RFC 9449) for tests and the load generator:
//! `scrip-client`'s key, whose failures here are the test's.

pub use scrip_client::DpopAlgorithm;
use serde_json::Value;

/// A DPoP key, ES256 unless made with [`DpopKey::with`].
#[derive(Debug)]
pub struct DpopKey(scrip_client::DpopKey);

impl DpopKey {
    /// A fresh ES256 key.
    ///
    /// # Panics
    /// If the system random generator fails.
    #[must_use]
    pub fn new() -> Self {
        Self::with(scrip_client::DpopAlgorithm::Es256)
    }

    /// A fresh key for `algorithm`.
    ///
    /// # Panics
    /// If the system random generator fails.
    #[must_use]
    #[expect(clippy::expect_used, reason = "test support")]
    pub fn with(algorithm: scrip_client::DpopAlgorithm) -> Self {
        Self(scrip_client::DpopKey::generate_with(algorithm).expect("make a DPoP key"))
    }

    /// The key's algorithm.
    #[must_use]
    pub fn algorithm(&self) -> DpopAlgorithm {
        self.0.algorithm()
    }

    /// The RFC 7638 thumbprint: the `cnf.jkt` of tokens bound to the key.
    #[must_use]
    pub fn jkt(&self) -> String {
        self.0.thumbprint().to_owned()
    }

    /// A proof for `method` `url`, made now with a fresh `jti`; with the
    /// access token's hash when one is given.
    ///
    /// # Panics
    /// If signing fails.
    #[must_use]
    #[expect(clippy::expect_used, reason = "test support")]
    pub fn proof(&self, method: &str, url: &str, access_token: Option<&str>) -> String {
        self.0
            .proof(method, url, access_token)
            .expect("sign a proof")
    }

    /// A proof with exactly these claims.
    ///
    /// # Panics
    /// If signing fails.
    #[must_use]
    #[expect(clippy::expect_used, reason = "test support")]
    pub fn sign(&self, claims: &Value) -> String {
        self.0.sign_claims(claims).expect("sign a proof")
    }
}

impl Default for DpopKey {
    fn default() -> Self {
        Self::new()
    }
}
