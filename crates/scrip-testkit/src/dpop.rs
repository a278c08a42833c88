//! A DPoP client key (RFC 9449) for tests: it makes proofs, and names its
//! own RFC 7638 thumbprint, computed here apart from scrip's code.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::{Value, json};

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn sha256_b64(data: &[u8]) -> String {
    b64(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref())
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// An ES256 DPoP key.
#[derive(Debug)]
pub struct DpopKey {
    pair: EcdsaKeyPair,
    x: String,
    y: String,
}

impl DpopKey {
    /// A fresh key.
    ///
    /// # Panics
    /// If the system random generator fails.
    #[must_use]
    #[expect(clippy::expect_used, reason = "test support")]
    pub fn new() -> Self {
        let pair =
            EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).expect("generate a P-256 key");
        let point = pair.public_key().as_ref();
        let x = b64(point.get(1..33).unwrap_or_default());
        let y = b64(point.get(33..65).unwrap_or_default());
        Self { pair, x, y }
    }

    /// The public JWK.
    #[must_use]
    pub fn jwk(&self) -> Value {
        json!({"kty": "EC", "crv": "P-256", "x": self.x, "y": self.y})
    }

    /// The RFC 7638 thumbprint: SHA-256 of the required members, in order.
    #[must_use]
    pub fn jkt(&self) -> String {
        let canonical = format!(
            r#"{{"crv":"P-256","kty":"EC","x":"{}","y":"{}"}}"#,
            self.x, self.y
        );
        sha256_b64(canonical.as_bytes())
    }

    /// A proof for `method` `url`, made now with a fresh `jti`; with the
    /// access token's hash when one is given.
    #[must_use]
    pub fn proof(&self, method: &str, url: &str, access_token: Option<&str>) -> String {
        let mut claims = json!({
            "jti": format!("{:x}", rand_u128()),
            "htm": method,
            "htu": url,
            "iat": now(),
        });
        if let (Some(t), Some(obj)) = (access_token, claims.as_object_mut()) {
            obj.insert("ath".into(), json!(sha256_b64(t.as_bytes())));
        }
        self.sign(&claims)
    }

    /// A proof with exactly these claims.
    ///
    /// # Panics
    /// If signing fails.
    #[must_use]
    #[expect(clippy::expect_used, reason = "test support")]
    pub fn sign(&self, claims: &Value) -> String {
        let header = json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": self.jwk()});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let sig = self
            .pair
            .sign(&SystemRandom::new(), input.as_bytes())
            .expect("sign a proof");
        format!("{input}.{}", b64(sig.as_ref()))
    }
}

impl Default for DpopKey {
    fn default() -> Self {
        Self::new()
    }
}

fn rand_u128() -> u128 {
    let mut bytes = [0u8; 16];
    // A failed fill leaves zeros: the replay check would then refuse, and
    // the test says so.
    let _ = aws_lc_rs::rand::fill(&mut bytes);
    u128::from_le_bytes(bytes)
}
