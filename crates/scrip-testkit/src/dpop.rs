//! A DPoP client key (RFC 9449) for tests and the load generator:
//! `scrip-client`'s key, whose failures here are the test's.

use serde_json::Value;

/// An ES256 DPoP key.
#[derive(Debug)]
pub struct DpopKey(scrip_client::DpopKey);

impl DpopKey {
    /// A fresh key.
    ///
    /// # Panics
    /// If the system random generator fails.
    #[must_use]
    #[expect(clippy::expect_used, reason = "test support")]
    pub fn new() -> Self {
        Self(scrip_client::DpopKey::generate().expect("make a DPoP key"))
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
