//! The one JWT validation path (RFC 7519, RFC 8725).

use std::str::FromStr;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::Algorithm;
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
            values: vec![normalise_typ(typ)],
        }
    }

    /// Any of these `typ` values, written with or without `application/`
    /// and in any case, and none at all when `allow_absent`.
    #[must_use]
    pub fn any_of<'a>(allow_absent: bool, values: impl IntoIterator<Item = &'a str>) -> Self {
        Self {
            allow_absent,
            values: values.into_iter().map(normalise_typ).collect(),
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
                let t = normalise_typ(t);
                self.values.contains(&t)
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

/// A `typ` value as compared: lowercase, without `application/`.
pub(crate) fn normalise_typ(typ: &str) -> String {
    let t = typ.to_ascii_lowercase();
    match t.strip_prefix("application/") {
        Some(rest) => rest.to_owned(),
        None => t,
    }
}

pub(crate) fn sanitise(s: &str) -> String {
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

/// The registered claims, read loosely so that a wrong type is reported as
/// such rather than as an unreadable token.
#[derive(serde::Deserialize)]
struct Registered {
    #[serde(default, deserialize_with = "present")]
    iss: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    aud: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    exp: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    nbf: Option<Value>,
    #[serde(default, deserialize_with = "present")]
    iat: Option<Value>,
}

/// A claim that is present, even as `null`: serde's `Option` would read
/// `"nbf": null` as absent, and RFC 7519 §4.1 wants a NumericDate there.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Value>, D::Error> {
    serde::Deserialize::deserialize(d).map(Some)
}

/// Checks `exp`, `nbf`, `iat`, `iss` and `aud` (RFC 7519 §4.1, RFC 8725).
fn check_registered(r: &Registered, exp: &Expectations<'_>) -> Result<Validity, JoseError> {
    let now = now() as f64;
    let leeway = exp.leeway as f64;
    let Some(expiry) = r.exp.as_ref().and_then(Value::as_f64) else {
        return Err(JoseError::MissingClaim("exp".into()));
    };
    if r.iss.is_none() {
        return Err(JoseError::MissingClaim("iss".into()));
    }
    if r.aud.is_none() {
        return Err(JoseError::MissingClaim("aud".into()));
    }
    // RFC 7519 §4.1.4: the current time must be before `exp`. `now` is
    // rounded down, so at `now == exp` the true time is already past it.
    if expiry <= now - leeway {
        return Err(JoseError::Expired);
    }
    let mut earliest = f64::NEG_INFINITY;
    match &r.nbf {
        None => {}
        Some(Value::Number(n)) => {
            let nbf = n.as_f64().ok_or(JoseError::BadClaims)?;
            if nbf > now + leeway {
                return Err(JoseError::NotYetValid);
            }
            earliest = earliest.max(nbf);
        }
        Some(_) => return Err(JoseError::BadClaims),
    }
    match &r.iat {
        None => {}
        Some(Value::Number(n)) => {
            let iat = n.as_f64().ok_or(JoseError::BadClaims)?;
            if iat > now + leeway {
                return Err(JoseError::IssuedInFuture);
            }
            earliest = earliest.max(iat);
        }
        Some(_) => return Err(JoseError::BadClaims),
    }
    if r.iss.as_ref().and_then(Value::as_str) != Some(exp.issuer) {
        return Err(JoseError::WrongIssuer);
    }
    let accepted = |a: &Value| {
        a.as_str()
            .is_some_and(|a| exp.audiences.iter().any(|e| e == a))
    };
    let audience_ok = match &r.aud {
        Some(Value::String(_)) => r.aud.as_ref().is_some_and(accepted),
        Some(Value::Array(list)) => list.iter().any(accepted),
        _ => false,
    };
    if !audience_ok {
        return Err(JoseError::WrongAudience);
    }
    Ok(Validity { expiry, earliest })
}

/// When a verified token is valid: its `exp`, and the later of its `nbf`
/// and `iat`, in seconds since the epoch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Validity {
    pub(crate) expiry: f64,
    pub(crate) earliest: f64,
}

impl Validity {
    /// Whether the token is still valid now, with `leeway` seconds: the
    /// same test [`verify`] applies to `exp`, `nbf` and `iat`.
    #[must_use]
    pub fn holds(&self, leeway: u64) -> bool {
        self.holds_at(now(), leeway)
    }

    pub(crate) fn holds_at(&self, now: u64, leeway: u64) -> bool {
        let (now, leeway) = (now as f64, leeway as f64);
        self.expiry > now - leeway && self.earliest <= now + leeway
    }
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
    /// When it is valid, as checked.
    pub validity: Validity,
}

/// The claims of `token`, decoded and not checked: only for a token that
/// [`verify`] has verified already (to describe it after a later check
/// refused it). `None` when they do not decode as `T`.
#[must_use]
pub fn claims_of_verified<T: serde::de::DeserializeOwned>(token: &str) -> Option<T> {
    let payload = token.split('.').nth(1)?;
    serde_json::from_slice(&decode_part(payload).ok()?).ok()
}

pub(crate) fn decode_part(part: &str) -> Result<Vec<u8>, JoseError> {
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
    let (header_part, payload_part, signature_part) = match parts.as_slice() {
        [h, p, s] => (*h, *p, *s),
        [_, _, _, _, _] => return Err(JoseError::Encrypted),
        _ => return Err(JoseError::Malformed("not a compact JWS")),
    };
    let header = decode_part(header_part)?;
    if !crate::plain::plain(&header) {
        return Err(JoseError::Malformed("header names a reserved member"));
    }
    let header: Map<String, Value> = serde_json::from_slice(&header)
        .map_err(|_| JoseError::Malformed("header is not a JSON object"))?;
    let (alg, kid) = check_header(&header, exp)?;
    let key = keys.find(kid.as_deref(), alg, exp.algorithms)?;
    if exp.audiences.is_empty() {
        return Err(JoseError::WrongAudience);
    }
    let signature = decode_part(signature_part)?;
    let signing_input = token
        .get(..header_part.len() + 1 + payload_part.len())
        .ok_or(JoseError::Malformed("not a compact JWS"))?;
    key.verify_sig(signing_input.as_bytes(), &signature)
        .map_err(|_| JoseError::BadSignature)?;

    let payload = decode_part(payload_part)?;
    // A struct also deserializes from a JSON array: insist on an object.
    if payload.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(JoseError::Malformed("claims are not a JSON object"));
    }
    if !crate::plain::plain(&payload) {
        return Err(JoseError::Malformed("claims name a reserved member"));
    }
    let registered: Registered = serde_json::from_slice(&payload)
        .map_err(|_| JoseError::Malformed("claims are not a JSON object"))?;
    let validity = check_registered(&registered, exp)?;
    let claims = serde_json::from_slice(&payload).map_err(|_| JoseError::BadClaims)?;
    Ok(Verified {
        claims,
        kid,
        alg,
        validity,
    })
}
