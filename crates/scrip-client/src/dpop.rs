//! DPoP (RFC 9449) for agents: a key made in memory and never written
//! anywhere, the proof that binds an access token to it at scrip, and a
//! fresh proof for each call the token is used on. A bound token that leaks
//! calls nothing without the key.

use aws_lc_rs::rand::SystemRandom;
use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _,
};
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

/// The signature algorithm of a [`DpopKey`]: both are in scrip's
/// `dpop_signing_alg_values_supported`. An EdDSA proof costs scrip (and a
/// resource server) less to verify than an ES256 one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DpopAlgorithm {
    /// ECDSA on P-256 with SHA-256 (RFC 7518), the default.
    Es256,
    /// Ed25519 (RFC 8037).
    EdDsa,
}

impl DpopAlgorithm {
    /// The JOSE `alg` name.
    #[must_use]
    pub fn name(self) -> &'static str {
        match self {
            Self::Es256 => "ES256",
            Self::EdDsa => "EdDSA",
        }
    }
}

enum Pair {
    Es256(EcdsaKeyPair),
    Ed25519(Ed25519KeyPair),
}

/// A DPoP key (ES256 or EdDSA). Its `Debug` shows only the thumbprint.
pub struct DpopKey {
    pair: Pair,
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
    /// A fresh ES256 key from the system's random generator.
    ///
    /// # Errors
    /// [`Error::Protocol`] if the key cannot be made.
    pub fn generate() -> Result<Self, Error> {
        Self::generate_with(DpopAlgorithm::Es256)
    }

    /// A fresh key for `algorithm` from the system's random generator.
    ///
    /// # Errors
    /// [`Error::Protocol`] if the key cannot be made.
    pub fn generate_with(algorithm: DpopAlgorithm) -> Result<Self, Error> {
        let cannot = || Error::Protocol("cannot make a DPoP key".into());
        match algorithm {
            DpopAlgorithm::Es256 => {
                let pair = EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING)
                    .map_err(|_| cannot())?;
                Self::es256(pair)
            }
            DpopAlgorithm::EdDsa => {
                Self::ed25519(Ed25519KeyPair::generate().map_err(|_| cannot())?)
            }
        }
    }

    fn es256(pair: EcdsaKeyPair) -> Result<Self, Error> {
        let point = pair.public_key().as_ref();
        let (Some(x), Some(y)) = (point.get(1..33), point.get(33..65)) else {
            return Err(Error::Protocol("cannot read the DPoP public key".into()));
        };
        let (x, y) = (b64(x), b64(y));
        // RFC 7638: the required members, in lexicographic order.
        let jkt =
            sha256_b64(format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#).as_bytes());
        Ok(Self {
            pair: Pair::Es256(pair),
            jwk: json!({"kty": "EC", "crv": "P-256", "x": x, "y": y}),
            jkt,
        })
    }

    fn ed25519(pair: Ed25519KeyPair) -> Result<Self, Error> {
        let x = b64(pair.public_key().as_ref());
        // RFC 8037 §2 and RFC 7638: crv, kty, x, in that order.
        let jkt = sha256_b64(format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#).as_bytes());
        Ok(Self {
            pair: Pair::Ed25519(pair),
            jwk: json!({"kty": "OKP", "crv": "Ed25519", "x": x}),
            jkt,
        })
    }

    /// The key's algorithm.
    #[must_use]
    pub fn algorithm(&self) -> DpopAlgorithm {
        match self.pair {
            Pair::Es256(_) => DpopAlgorithm::Es256,
            Pair::Ed25519(_) => DpopAlgorithm::EdDsa,
        }
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
        let htu = htu(url)?;
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
        let header = json!({"typ": "dpop+jwt", "alg": self.algorithm().name(), "jwk": self.jwk});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(claims.to_string().as_bytes())
        );
        let signature = match &self.pair {
            Pair::Es256(pair) => pair
                .sign(&SystemRandom::new(), input.as_bytes())
                .map_err(|_| Error::Protocol("cannot sign a DPoP proof".into()))?
                .as_ref()
                .to_vec(),
            Pair::Ed25519(pair) => pair.sign(input.as_bytes()).as_ref().to_vec(),
        };
        Ok(format!("{input}.{}", b64(&signature)))
    }
}

/// A proof's `htu` for `url` (RFC 9449 §4.2): the URL without its query and
/// fragment, and without any user name or password (which a proof must
/// not carry, and which the server refuses).
fn htu(url: &str) -> Result<String, Error> {
    let mut u = reqwest::Url::parse(url)
        .map_err(|e| Error::Protocol(format!("`{url}` is not a URL for a DPoP proof: {e}")))?;
    if !matches!(u.scheme(), "https" | "http") || u.host().is_none() {
        return Err(Error::Protocol(format!(
            "`{url}` is not an http(s) URL for a DPoP proof"
        )));
    }
    u.set_query(None);
    u.set_fragment(None);
    // Only fails for URLs that cannot have them, refused above.
    let _ = u.set_username("");
    let _ = u.set_password(None);
    Ok(u.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A proof's `htu` carries no query, fragment, user name or password;
    /// a URL that is not http(s) gets no proof.
    #[test]
    fn htu_is_the_url_without_query_fragment_or_credentials() {
        assert_eq!(
            htu("https://user:pw@rs.example:8443/a/b?x=1#f").unwrap(),
            "https://rs.example:8443/a/b"
        );
        assert_eq!(
            htu("http://127.0.0.1:7070/token").unwrap(),
            "http://127.0.0.1:7070/token"
        );
        for bad in ["ftp://rs.example/x", "not a url", "file:///etc/passwd"] {
            assert!(htu(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn an_ed25519_key_has_the_rfc_8037_jwk_and_thumbprint() {
        // RFC 8037 A.1 (the key) and A.3 (its thumbprint).
        let seed = base64::engine::general_purpose::URL_SAFE_NO_PAD
            .decode("nWGxne_9WmC6hEr0kuwsxERJxWl7MmkZcDusAxyuf2A")
            .unwrap();
        let key = DpopKey::ed25519(Ed25519KeyPair::from_seed_unchecked(&seed).unwrap()).unwrap();
        assert_eq!(key.algorithm(), DpopAlgorithm::EdDsa);
        assert_eq!(
            key.jwk,
            json!({"kty": "OKP", "crv": "Ed25519", "x": "11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"})
        );
        assert_eq!(
            key.thumbprint(),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
        // RFC 8037 A.4: Ed25519 is deterministic, so the signature over
        // the example's input is the example's.
        let Pair::Ed25519(pair) = &key.pair else {
            panic!("not Ed25519")
        };
        assert_eq!(
            b64(pair
                .sign(b"eyJhbGciOiJFZERTQSJ9.RXhhbXBsZSBvZiBFZDI1NTE5IHNpZ25pbmc")
                .as_ref()),
            "hgyY0il_MGCjP0JzlnLWG1PPOt7-09PGcvMg3AIbQR6dWbhijcNR4ki4iylGjg5BhVsPt9g7sVvpAr_MuM0KAg"
        );
    }

    #[test]
    fn a_proof_names_its_algorithm_and_key() {
        for alg in [DpopAlgorithm::Es256, DpopAlgorithm::EdDsa] {
            let key = DpopKey::generate_with(alg).unwrap();
            let proof = key
                .proof("POST", "https://scrip.example/token?x=1", None)
                .unwrap();
            let header: serde_json::Value = serde_json::from_slice(
                &URL_SAFE_NO_PAD
                    .decode(proof.split('.').next().unwrap())
                    .unwrap(),
            )
            .unwrap();
            assert_eq!(header["alg"], alg.name());
            assert_eq!(header["typ"], "dpop+jwt");
            assert_eq!(header["jwk"], key.jwk);
        }
    }
}
