//! The one JWT validation path (RFC 7519, RFC 8725).

use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::{Algorithm, Validation};
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};

use crate::{JoseError, KeySet, MAX_TOKEN_BYTES};

/// The longest `kid` accepted.
const MAX_KID_LEN: usize = 256;

/// Which `typ` headers a place accepts. Comparison is case-insensitive and
/// ignores an `application/` prefix (RFC 7515 §4.1.9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TypRule {
    /// Whether a token without `typ` is accepted.
    pub allow_absent: bool,
    /// The accepted values, lowercase, without `application/`.
    pub values: Vec<String>,
}

impl TypRule {
    /// Exactly this `typ`, which must be present.
    #[must_use]
    pub fn exactly(typ: &str) -> Self {
        Self {
            allow_absent: false,
            values: vec![typ.to_ascii_lowercase()],
        }
    }

    fn describe(&self) -> String {
        let mut parts: Vec<String> = self.values.iter().map(|v| format!("`{v}`")).collect();
        if self.allow_absent {
            parts.push("none".into());
        }
        parts.join(" or ")
    }

    fn check(&self, typ: Option<&str>) -> Result<(), JoseError> {
        let ok = match typ {
            None => self.allow_absent,
            Some(t) => {
                let t = t.to_ascii_lowercase();
                let t = t.strip_prefix("application/").unwrap_or(&t);
                self.values.iter().any(|v| v == t)
            }
        };
        if ok {
            Ok(())
        } else {
            Err(JoseError::WrongType {
                expected: self.describe(),
                found: typ.map_or_else(|| "none".to_owned(), sanitise),
            })
        }
    }
}

fn sanitise(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_ascii_graphic())
        .take(32)
        .collect()
}

/// What a token must satisfy to be accepted.
#[derive(Debug, Clone, Copy)]
pub struct Expectations<'a> {
    /// The exact `iss`.
    pub issuer: &'a str,
    /// `aud` must contain one of these; never empty.
    pub audiences: &'a [String],
    /// The `alg` allow-list.
    pub algorithms: &'a [Algorithm],
    /// The `typ` rule.
    pub typ: &'a TypRule,
    /// Clock leeway for `exp`, `nbf` and `iat`, in seconds.
    pub leeway: u64,
}

/// A verified token's claims and the header facts worth logging.
#[derive(Debug, Clone)]
pub struct Verified<T> {
    /// The claims.
    pub claims: T,
    /// The `kid` of the key that verified it.
    pub kid: Option<String>,
    /// The algorithm that verified it.
    pub alg: Algorithm,
}

fn decode_part(part: &str) -> Result<Vec<u8>, JoseError> {
    URL_SAFE_NO_PAD
        .decode(part)
        .map_err(|_| JoseError::Malformed("a part is not base64url"))
}

fn check_header(
    header: &Map<String, Value>,
    exp: &Expectations<'_>,
) -> Result<(Algorithm, Option<String>), JoseError> {
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or(JoseError::Malformed("header has no `alg`"))?;
    let algorithm = Algorithm::from_str(alg)
        .ok()
        .filter(|a| exp.algorithms.contains(a))
        .ok_or_else(|| JoseError::AlgorithmNotAllowed(sanitise(alg)))?;
    if header.contains_key("crit") {
        return Err(JoseError::CriticalHeader);
    }
    for name in ["jku", "x5u", "jwk", "x5c"] {
        if header.contains_key(name) {
            return Err(JoseError::ForbiddenHeader(name));
        }
    }
    let typ = match header.get("typ") {
        None => None,
        Some(Value::String(s)) => Some(s.as_str()),
        Some(_) => return Err(JoseError::Malformed("`typ` is not a string")),
    };
    exp.typ.check(typ)?;
    let kid = match header.get("kid") {
        None => None,
        Some(Value::String(s)) if s.len() <= MAX_KID_LEN => Some(s.clone()),
        Some(_) => return Err(JoseError::Malformed("`kid` is not a short string")),
    };
    Ok((algorithm, kid))
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Verifies a compact JWT against `keys` and `exp` and returns its claims.
///
/// Checks, in order: size, compact form, header (`alg` allow-list, no `crit`,
/// no key-location headers, `typ`, `kid`), the key and its pinned algorithm,
/// the signature, `iss`, `aud`, `exp`, `nbf` and `iat` (each with the
/// leeway), and finally that the claims have the expected shape.
///
/// # Errors
/// A [`JoseError`] naming the first check that failed.
pub fn verify<T: DeserializeOwned>(
    token: &str,
    keys: &KeySet,
    exp: &Expectations<'_>,
) -> Result<Verified<T>, JoseError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(JoseError::TooLarge);
    }
    if !token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(JoseError::Malformed("not a compact JWS"));
    }
    let parts: Vec<&str> = token.split('.').collect();
    let header_part = match parts.as_slice() {
        [h, _, _] => *h,
        [_, _, _, _, _] => return Err(JoseError::Encrypted),
        _ => return Err(JoseError::Malformed("not a compact JWS")),
    };
    let header: Map<String, Value> = serde_json::from_slice(&decode_part(header_part)?)
        .map_err(|_| JoseError::Malformed("header is not a JSON object"))?;
    let (alg, kid) = check_header(&header, exp)?;
    let key = keys.find(kid.as_deref(), alg)?;
    if exp.audiences.is_empty() {
        return Err(JoseError::WrongAudience);
    }

    let mut validation = Validation::new(alg);
    validation.set_issuer(&[exp.issuer]);
    validation.set_audience(exp.audiences);
    validation.set_required_spec_claims(&["exp", "iss", "aud"]);
    validation.leeway = exp.leeway;
    validation.validate_exp = true;
    validation.validate_nbf = true;
    let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation)?;

    match data.claims.get("iat") {
        None => {}
        Some(Value::Number(n)) => {
            let iat = n.as_f64().ok_or(JoseError::BadClaims)?;
            if iat > now().saturating_add(exp.leeway) as f64 {
                return Err(JoseError::IssuedInFuture);
            }
        }
        Some(_) => return Err(JoseError::BadClaims),
    }
    let claims =
        serde_json::from_value(Value::Object(data.claims)).map_err(|_| JoseError::BadClaims)?;
    Ok(Verified { claims, kid, alg })
}
