//! DPoP (RFC 9449) for agents: a key made in memory and never written
//! anywhere, the proof that binds an access token to it at scrip, and a
//! fresh proof for each call the token is used on. A bound token that leaks
//! calls nothing without the key.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, KeyPair as _};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use serde_json::json;

use crate::{Error, now};

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn sha256_b64(data: &[u8]) -> String {
    b64(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data).as_ref())
}

/// An ES256 DPoP key. Its `Debug` shows only the thumbprint.
pub struct DpopKey {
    pair: EcdsaKeyPair,
    /// The public JWK, as the proofs' header carries it.
    jwk: serde_json::Value,
    /// Its RFC 7638 thumbprint: the `cnf.jkt` of the tokens bound to it.
    jkt: String,
}

impl std::fmt::Debug for DpopKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpopKey")
            .field("jkt", &self.jkt)
            .finish_non_exhaustive()
    }
}

impl DpopKey {
    /// A fresh key from the system's random generator.
    ///
    /// # Errors
    /// [`Error::Protocol`] if the key cannot be made.
    pub fn generate() -> Result<Self, Error> {
        let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
            .map_err(|_| Error::Protocol("cannot make a DPoP key".into()))?;
        let point = pair.public_key().as_ref();
        let (Some(x), Some(y)) = (point.get(1..33), point.get(33..65)) else {
            return Err(Error::Protocol("cannot read the DPoP public key".into()));
        };
        let (x, y) = (b64(x), b64(y));
        // RFC 7638: the required members, in lexicographic order.
        let jkt =
            sha256_b64(format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#).as_bytes());
        Ok(Self {
            pair,
            jwk: json!({"kty": "EC", "crv": "P-256", "x": x, "y": y}),
            jkt,
        })
    }

    /// The key's RFC 7638 thumbprint (base64url SHA-256).
    #[must_use]
    pub fn thumbprint(&self) -> &str {
        &self.jkt
    }

    /// A proof for one request: `method` and `url` (its query and fragment
    /// are left out, RFC 9449 §4.2), made now with a fresh `jti`, and with
    /// the access token's hash when it goes with one. Each proof is good
    /// once.
    ///
    /// # Errors
    /// [`Error::Protocol`] if the random generator or the signature fails.
    pub fn proof(
        &self,
        method: &str,
        url: &str,
        access_token: Option<&str>,
    ) -> Result<String, Error> {
        let mut jti = [0u8; 16];
        aws_lc_rs::rand::fill(&mut jti)
            .map_err(|_| Error::Protocol("cannot make a DPoP proof's jti".into()))?;
        let htu = url.split(['?', '#']).next().unwrap_or(url);
        let mut claims = json!({"jti": b64(&jti), "htm": method, "htu": htu, "iat": now()});
        if let (Some(token), Some(obj)) = (access_token, claims.as_object_mut()) {
            obj.insert("ath".into(), json!(sha256_b64(token.as_bytes())));
        }
        self.sign_claims(&claims)
    }

    /// A proof with exactly these claims, for a request [`DpopKey::proof`]
    /// does not describe (a server that asks for a `nonce`, RFC 9449 §8).
    ///
    /// # Errors
    /// [`Error::Protocol`] if the signature fails.
    pub fn sign_claims(&self, claims: &serde_json::Value) -> Result<String, Error> {
        let header = json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": self.jwk});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = self
            .pair
            .sign(&SystemRandom::new(), input.as_bytes())
            .map_err(|_| Error::Protocol("cannot sign a DPoP proof".into()))?;
        Ok(format!("{input}.{}", b64(signature.as_ref())))
    }
}
