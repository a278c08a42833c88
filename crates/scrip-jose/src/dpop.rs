//! DPoP proofs (RFC 9449): a JWT the client signs with a key it holds,
//! naming the request it goes with. scrip binds an access token to the
//! proof key's thumbprint (`cnf.jkt`, RFC 7638) when the token request
//! carries a proof, and a resource server then accepts that token only with
//! a fresh proof by the same key for the very request.
//!
//! [`verify_proof`] makes the checks of RFC 9449 §4.3: a compact JWS whose
//! header has `typ` `dpop+jwt`, an asymmetric `alg` on the allow-list and a
//! public `jwk` (no private members) that fits it, no `crit`; a signature by
//! that key; `jti`, `htm`, `htu` and `iat` present; `htm` the request's
//! method, `htu` its URL (query and fragment aside, scheme and host compared
//! without case, default ports dropped); `iat` within the accepted window;
//! and with an access token, `ath` its SHA-256. [`ReplayCache`] refuses a
//! proof seen before in its window (§11.1).
//!
//! Architecture invariant: a [`Proof`] exists only for a proof JWT that
//! passed every check above; its `jkt` is the thumbprint of the key that
//! signed it.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Instant;

use aws_lc_rs::digest::{SHA256, digest};
use jsonwebtoken::Algorithm;
use jsonwebtoken::jwk::Jwk;
use serde_json::{Map, Value};

use crate::verify::{decode_part, normalise_typ, sanitise};
use crate::{JoseError, b64};

/// The `typ` of a DPoP proof.
pub const DPOP_TYP: &str = "dpop+jwt";

/// The algorithms a proof may be signed with, as published in the
/// authorization server's metadata (`dpop_signing_alg_values_supported`).
pub const DPOP_ALGORITHMS: [Algorithm; 5] = [
    Algorithm::ES256,
    Algorithm::ES384,
    Algorithm::EdDSA,
    Algorithm::PS256,
    Algorithm::RS256,
];

/// How old a proof may be, in seconds, besides the clock leeway. A client
/// makes a proof per request, so a minute is room for a slow queue, not a
/// reuse window: each proof is accepted once ([`ReplayCache`]).
pub const MAX_PROOF_AGE: u64 = 60;

/// The largest proof accepted, in bytes (an RSA-4096 `jwk` fits).
pub const MAX_PROOF_BYTES: usize = 8 * 1024;

/// The longest `jti` accepted.
const MAX_JTI_LEN: usize = 256;

/// The largest RSA modulus a proof's key may have, in bytes (4096 bits).
/// Anyone may send a proof, and its signature is checked before the
/// request's other credentials: an 8192-bit key with a large exponent
/// would cost many times a normal check, for nothing.
const MAX_RSA_MODULUS: usize = 512;

/// The one RSA public exponent a proof's key may have (65537, as every
/// RSA key generator makes by default): a larger one costs more to check.
const RSA_EXPONENT: [u8; 3] = [1, 0, 1];

/// JWK members that hold private key material (RFC 7518 §6, RFC 8037).
pub(crate) const PRIVATE_MEMBERS: [&str; 8] = ["d", "p", "q", "dp", "dq", "qi", "oth", "k"];

/// What a proof must match.
#[derive(Debug, Clone, Copy)]
pub struct ProofCheck<'a> {
    /// The request's method, as sent (`POST`).
    pub method: &'a str,
    /// The request's URL as this server is reached (`https://host/token`);
    /// a query, if any, is ignored.
    pub url: &'a str,
    /// The access token the proof comes with, at a resource server; `None`
    /// at the token endpoint.
    pub access_token: Option<&'a str>,
    /// Now, in seconds since the epoch.
    pub now: u64,
    /// How old a proof may be, in seconds.
    pub max_age: u64,
    /// Allowed clock difference, in seconds.
    pub leeway: u64,
}

/// The latest `iat` of a proof that no verifier takes any more at `now`:
/// one whose `max_age` is [`MAX_PROOF_AGE`] and whose leeway is `leeway`,
/// with a clock within `leeway` of this one's (behind it by that much, it
/// still takes a proof made `MAX_PROOF_AGE` plus twice the leeway ago).
/// The use of a proof made at or before it may be forgotten.
#[must_use]
pub fn forgettable_before(now: u64, leeway: u64) -> u64 {
    now.saturating_sub(
        MAX_PROOF_AGE
            .saturating_add(leeway.saturating_mul(2))
            .saturating_add(1),
    )
}

/// A verified proof.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Proof {
    /// The RFC 7638 SHA-256 thumbprint of the proof's key, base64url.
    pub jkt: String,
    /// The proof's unique id.
    pub jti: String,
    /// When it was made.
    pub iat: u64,
}

impl Proof {
    /// What names this proof among those used: SHA-256 of the key's
    /// thumbprint, a zero byte, and the `jti`. Keyed by the key, so that
    /// one client cannot spend another's proof by choosing its `jti`; a
    /// digest, so that no text a client chose is kept.
    #[must_use]
    pub fn replay_id(&self) -> [u8; 32] {
        let mut input = Vec::with_capacity(self.jkt.len() + 1 + self.jti.len());
        input.extend_from_slice(self.jkt.as_bytes());
        input.push(0);
        input.extend_from_slice(self.jti.as_bytes());
        // SHA-256 is 32 bytes: the default is never taken.
        <[u8; 32]>::try_from(digest(&SHA256, &input).as_ref()).unwrap_or_default()
    }

    /// Until when (a Unix time) a proof verified with `check` must be
    /// remembered: past it, no verifier whose clock is within `leeway` of
    /// `check`'s can accept it any more (its `iat` plus the largest age,
    /// plus the leeway on both clocks, plus one second of rounding).
    #[must_use]
    pub fn kept_until(&self, check: &ProofCheck<'_>) -> u64 {
        self.iat
            .saturating_add(check.max_age)
            .saturating_add(check.leeway.saturating_mul(2))
            .saturating_add(1)
    }
}

/// Why a proof was refused. Messages name the failed check and never hold
/// the proof.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("DPoP proof {0}")]
pub struct ProofError(pub String);

fn refuse(why: impl Into<String>) -> ProofError {
    ProofError(why.into())
}

impl From<JoseError> for ProofError {
    fn from(e: JoseError) -> Self {
        Self(format!("is refused: {e}"))
    }
}

/// Whether `jkt` is written as an RFC 7638 SHA-256 thumbprint is (the
/// `cnf.jkt` of RFC 9449 §6.1): 32 bytes in unpadded base64url, 43
/// characters, in the one spelling that encodes them (no stray low bits in
/// the last character), so that two spellings cannot name one key.
#[must_use]
pub fn is_thumbprint(jkt: &str) -> bool {
    jkt.len() == 43 && decode_part(jkt).is_ok_and(|bytes| bytes.len() == 32)
}

/// The RFC 7638 thumbprint of a public JWK: SHA-256 over its required
/// members in lexicographic order, base64url.
///
/// # Errors
/// [`ProofError`] when the key type is not `EC`, `OKP` or `RSA`, or a
/// required member is missing or not a string.
pub fn thumbprint(jwk: &Map<String, Value>) -> Result<String, ProofError> {
    let kty = jwk
        .get("kty")
        .and_then(Value::as_str)
        .ok_or_else(|| refuse("key has no `kty`"))?;
    let members: &[&str] = match kty {
        "EC" => &["crv", "kty", "x", "y"],
        "OKP" => &["crv", "kty", "x"],
        "RSA" => &["e", "kty", "n"],
        _ => return Err(refuse("key type is not EC, OKP or RSA")),
    };
    let mut canonical = Vec::with_capacity(members.len());
    for m in members {
        let value = jwk
            .get(*m)
            .and_then(Value::as_str)
            .ok_or_else(|| refuse(format!("key has no `{m}`")))?;
        canonical.push((*m, value));
    }
    Ok(crate::jwk_thumbprint(&canonical))
}

/// The `ath` of an access token: SHA-256 of its ASCII, base64url.
#[must_use]
pub fn access_token_hash(token: &str) -> String {
    b64(digest(&SHA256, token.as_bytes()).as_ref())
}

/// Verifies a DPoP proof for the request described by `check`.
///
/// # Errors
/// [`ProofError`] naming the first check that failed.
pub fn verify_proof(proof: &str, check: &ProofCheck<'_>) -> Result<Proof, ProofError> {
    if proof.len() > MAX_PROOF_BYTES {
        return Err(refuse(format!("is larger than {MAX_PROOF_BYTES} bytes")));
    }
    if !proof
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(refuse("is not a compact JWS"));
    }
    let [header_part, payload_part, signature_part] = proof
        .split('.')
        .collect::<Vec<_>>()
        .try_into()
        .map_err(|_| refuse("is not a compact JWS"))?;
    let header = decode_part(header_part)?;
    if !crate::plain::plain(&header) {
        return Err(refuse("header names a reserved member"));
    }
    let header: Map<String, Value> =
        serde_json::from_slice(&header).map_err(|_| refuse("header is not a JSON object"))?;

    match header.get("typ").and_then(Value::as_str) {
        // As every `typ`: in any case, with or without `application/` (RFC
        // 7515 §4.1.9).
        Some(t) if normalise_typ(t) == DPOP_TYP => {}
        Some(t) => {
            return Err(refuse(format!(
                "has `typ` `{}`; expected `{DPOP_TYP}`",
                sanitise(t)
            )));
        }
        None => return Err(refuse(format!("has no `typ`; expected `{DPOP_TYP}`"))),
    }
    let alg_name = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or_else(|| refuse("header has no `alg`"))?;
    let alg = alg_name
        .parse::<Algorithm>()
        .ok()
        .filter(|a| DPOP_ALGORITHMS.contains(a))
        .ok_or_else(|| refuse(format!("algorithm `{}` is not allowed", sanitise(alg_name))))?;
    if header.contains_key("crit") {
        return Err(refuse("has a critical header extension"));
    }
    for name in ["jku", "x5u", "x5c"] {
        if header.contains_key(name) {
            return Err(refuse(format!("header `{name}` is not accepted")));
        }
    }
    let jwk_value = header
        .get("jwk")
        .and_then(Value::as_object)
        .ok_or_else(|| refuse("header has no `jwk` object"))?;
    if let Some(m) = PRIVATE_MEMBERS.iter().find(|m| jwk_value.contains_key(**m)) {
        return Err(refuse(format!("key holds the private member `{m}`")));
    }
    // RFC 7518 §6.2.1.1, RFC 8037 §2: the curve a key names is the one its
    // algorithm uses, so one key has one thumbprint.
    let (kty, crv) = match alg {
        Algorithm::ES256 => ("EC", Some("P-256")),
        Algorithm::ES384 => ("EC", Some("P-384")),
        Algorithm::EdDSA => ("OKP", Some("Ed25519")),
        _ => ("RSA", None),
    };
    if jwk_value.get("kty").and_then(Value::as_str) != Some(kty)
        || jwk_value.get("crv").and_then(Value::as_str) != crv
    {
        return Err(refuse(format!(
            "key is not {} as `{}` requires",
            crv.unwrap_or(kty),
            sanitise(alg_name)
        )));
    }
    // RFC 7518 §2, §6.3.1: `n` and `e` take the fewest octets their value
    // needs. With a leading zero octet, one RSA key would have many
    // thumbprints (RFC 7638 §3.2), and pass for many keys.
    if kty == "RSA" {
        for m in ["n", "e"] {
            let minimal = jwk_value
                .get(m)
                .and_then(Value::as_str)
                .and_then(|v| decode_part(v).ok())
                .is_some_and(|v| v.first().is_some_and(|b| *b != 0));
            if !minimal {
                return Err(refuse(format!(
                    "key's `{m}` is not an integer in its fewest octets"
                )));
            }
        }
        let octets = |m: &str| {
            jwk_value
                .get(m)
                .and_then(Value::as_str)
                .and_then(|v| decode_part(v).ok())
                .unwrap_or_default()
        };
        if octets("n").len() > MAX_RSA_MODULUS {
            return Err(refuse(format!(
                "key's modulus is longer than {} bits",
                MAX_RSA_MODULUS * 8
            )));
        }
        if octets("e") != RSA_EXPONENT {
            return Err(refuse("key's exponent is not 65537 (`AQAB`)"));
        }
    }
    let jkt = thumbprint(jwk_value)?;
    let jwk: Jwk = serde_json::from_value(Value::Object(jwk_value.clone()))
        .map_err(|_| refuse("header `jwk` is not a JWK"))?;
    let parsed = crate::keyset::parse(&jwk, &[alg]);
    let key = parsed
        .first()
        .map(|(_, k)| k)
        .ok_or_else(|| refuse("key does not fit its algorithm"))?;
    let signing_input = proof
        .get(..header_part.len() + 1 + payload_part.len())
        .ok_or_else(|| refuse("is not a compact JWS"))?;
    key.verify_sig(signing_input.as_bytes(), &decode_part(signature_part)?)
        .map_err(|_| refuse("signature is invalid"))?;

    let payload = decode_part(payload_part)?;
    if !crate::plain::plain(&payload) {
        return Err(refuse("claims name a reserved member"));
    }
    let claims: Map<String, Value> =
        serde_json::from_slice(&payload).map_err(|_| refuse("claims are not a JSON object"))?;
    let text = |name: &str| {
        claims
            .get(name)
            .and_then(Value::as_str)
            .ok_or_else(|| refuse(format!("has no `{name}` string")))
    };
    let jti = text("jti")?;
    if jti.is_empty() || jti.len() > MAX_JTI_LEN {
        return Err(refuse(format!("`jti` must be 1 to {MAX_JTI_LEN} bytes")));
    }
    if text("htm")? != check.method {
        return Err(refuse(format!("`htm` is not `{}`", check.method)));
    }
    if !same_target(text("htu")?, check.url) {
        return Err(refuse(format!("`htu` is not `{}`", strip_query(check.url))));
    }
    let iat = claims
        .get("iat")
        .and_then(Value::as_f64)
        .filter(|t| t.is_finite() && *t >= 0.0)
        .ok_or_else(|| refuse("has no numeric `iat`"))?;
    #[expect(
        clippy::cast_precision_loss,
        reason = "seconds since the epoch fit an f64's 53 bits"
    )]
    let (now, max_age, leeway) = (check.now as f64, check.max_age as f64, check.leeway as f64);
    if iat > now + leeway {
        return Err(refuse("was made in the future"));
    }
    if iat < now - max_age - leeway {
        return Err(refuse(format!(
            "is too old (more than {} s)",
            check.max_age
        )));
    }
    if let Some(token) = check.access_token {
        let ath = text("ath")?;
        if ath != access_token_hash(token) {
            return Err(refuse("`ath` is not the access token's hash"));
        }
    }
    #[expect(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        reason = "iat is finite, non-negative and at most now + leeway"
    )]
    let iat = iat as u64;
    Ok(Proof {
        jkt,
        jti: jti.to_owned(),
        iat,
    })
}

fn strip_query(url: &str) -> &str {
    url.split(['?', '#']).next().unwrap_or(url)
}

/// Whether two URLs name the same target (RFC 9449 §4.3 step 9): the same
/// scheme, host and port (scheme and host without case, default ports
/// dropped) and path (escapes of unreserved characters read as those
/// characters, and hex digits without case: RFC 3986 §6.2.2.1-2); query
/// and fragment ignored.
fn same_target(htu: &str, url: &str) -> bool {
    let (Ok(a), Ok(b)) = (url::Url::parse(htu), url::Url::parse(url)) else {
        return false;
    };
    matches!(a.scheme(), "http" | "https")
        && a.scheme() == b.scheme()
        && a.host_str().is_some()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
        && normal_escapes(a.path()) == normal_escapes(b.path())
        && a.username().is_empty()
        && a.password().is_none()
}

/// `path` with each escape of an unreserved character (`A-Z a-z 0-9 - . _
/// ~`) decoded and the hex digits of the others in upper case; an escaped
/// reserved character stays escaped (another URI, RFC 3986 §6.2.2.2).
fn normal_escapes(path: &str) -> String {
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    while let Some(&b) = bytes.get(i) {
        let hex = |j: usize| bytes.get(j).and_then(|h| char::from(*h).to_digit(16));
        match (b, hex(i + 1), hex(i + 2)) {
            (b'%', Some(hi), Some(lo)) => {
                let value = u8::try_from(hi * 16 + lo).unwrap_or(0);
                if value.is_ascii_alphanumeric() || matches!(value, b'-' | b'.' | b'_' | b'~') {
                    out.push(char::from(value));
                } else {
                    out.push_str(&format!("%{value:02X}"));
                }
                i += 3;
            }
            _ => {
                out.push(char::from(b));
                i += 1;
            }
        }
    }
    out
}

/// Whether `url` is in the form a proof's `htu` can be compared with: it
/// parses, and parsing changes nothing in its path. A request path with
/// `\`, `.` or `..` segments (plain or percent-encoded) is not: URL
/// parsing would resolve them, so a proof for `/api/admin` would count for
/// `/api/x/%2e%2e/admin`, which the server may route elsewhere.
#[must_use]
pub fn plain_target(url: &str) -> bool {
    let Ok(parsed) = url::Url::parse(url) else {
        return false;
    };
    let Some(after_scheme) = url.split_once("://").map(|(_, rest)| rest) else {
        return false;
    };
    let raw_path = after_scheme
        .find('/')
        .map_or("", |i| after_scheme.get(i..).unwrap_or(""));
    let raw_path = strip_query(raw_path);
    let raw_path = if raw_path.is_empty() { "/" } else { raw_path };
    parsed.path() == raw_path
}

/// Proofs seen recently (RFC 9449 §11.1): one proof is accepted once.
///
/// Each entry is kept until the proof could no longer pass
/// [`verify_proof`]'s `iat` check, so a proof is refused the second time
/// for as long as it could be accepted at all. That time is counted on the
/// wall clock, which the `iat` check reads, and on the monotonic clock from
/// when the proof was taken, and an entry is dropped only once both have
/// passed it: a wall clock stepped ahead and back again forgets no proof.
/// Entries are keyed by key
/// and `jti`, so one client cannot spend another's. At most `capacity`
/// are kept; when expired entries cannot make room, proofs are refused
/// (fail closed) until they can.
///
/// No key may hold more live proofs than there are free places: one
/// client sending proofs as fast as it can takes at most half the cache,
/// and a key over its share is refused ([`Replay::Full`]) while other keys
/// go on. This bounds one client, not many: keys filling it one after the
/// other each take half of what is left, so about `log2(capacity)` keys
/// (20 for a million places), each bound to an access token from an
/// audited exchange, can still fill it until their proofs expire.
#[derive(Debug)]
pub struct ReplayCache {
    seen: Mutex<Seen>,
    capacity: usize,
    /// The origin of the monotonic clock's seconds.
    started: Instant,
}

/// A proof taken.
#[derive(Debug, Clone, Copy)]
struct Kept {
    /// Until when it is kept: a Unix time, and seconds after
    /// [`ReplayCache::started`].
    wall: u64,
    mono: u64,
    /// The key that signed it (a digest of its thumbprint).
    owner: u64,
}

/// The time now on both clocks.
#[derive(Debug, Clone, Copy)]
struct Now {
    wall: u64,
    mono: u64,
}

impl Kept {
    /// Whether either clock says the proof may still be presented.
    fn live(&self, now: Now) -> bool {
        self.wall >= now.wall || self.mono >= now.mono
    }
}

#[derive(Debug, Default)]
struct Seen {
    /// Each proof taken, by a digest of its key and `jti`.
    until: HashMap<u128, Kept>,
    /// How many proofs each key holds (expired ones included until the
    /// next sweep).
    per_key: HashMap<u64, usize>,
    /// When expired entries were last dropped (monotonic seconds): at most
    /// once a second, so a full cache does not cost a sweep per request.
    swept_at: u64,
}

impl Seen {
    /// Whether a proof of `owner` cannot be taken: the cache is full, or
    /// the key holds as many proofs as there are free places.
    fn refuses(&self, owner: u64, capacity: usize) -> bool {
        let free = capacity.saturating_sub(self.until.len());
        free == 0 || self.per_key.get(&owner).is_some_and(|held| *held >= free)
    }

    /// Drops expired entries and recounts what each key holds.
    fn sweep(&mut self, now: Now, capacity: usize) {
        self.swept_at = now.mono;
        self.until.retain(|_, kept| kept.live(now));
        self.per_key.clear();
        for kept in self.until.values() {
            *self.per_key.entry(kept.owner).or_default() += 1;
        }
        // Give back what a burst took.
        let live = self.until.len();
        if live < capacity / 4 {
            self.until.shrink_to(live.saturating_mul(2));
            self.per_key.shrink_to_fit();
        }
    }
}

/// Why [`ReplayCache::first_use`] refused a proof.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Replay {
    /// The proof was presented before.
    #[error("DPoP proof was used before")]
    Used,
    /// Too many recent proofs are held to check this one.
    #[error("DPoP proof cannot be checked for reuse now (too many recent proofs); retry shortly")]
    Full,
}

/// A proof's place in a [`ReplayCache`]: the first half of its replay id.
fn replay_key(proof: &Proof) -> u128 {
    let id = proof.replay_id();
    let mut first = [0u8; 16];
    first.copy_from_slice(id.get(..16).unwrap_or(&[0; 16]));
    u128::from_be_bytes(first)
}

impl ReplayCache {
    /// A cache of at most `capacity` proofs.
    #[must_use]
    pub fn new(capacity: usize) -> Self {
        Self {
            seen: Mutex::new(Seen::default()),
            capacity,
            started: Instant::now(),
        }
    }

    /// Records `proof` and says whether this is its first use. `check` is
    /// what it was verified with: the entry lasts as long as the proof
    /// could pass the `iat` window.
    ///
    /// # Errors
    /// [`Replay::Used`] for a proof seen before; [`Replay::Full`] when the
    /// cache cannot take another.
    pub fn first_use(&self, proof: &Proof, check: &ProofCheck<'_>) -> Result<(), Replay> {
        let mono = self.started.elapsed().as_secs();
        self.first_use_at(proof, check, mono)
    }

    /// [`Self::first_use`] at `mono` seconds after the cache started.
    fn first_use_at(&self, proof: &Proof, check: &ProofCheck<'_>, mono: u64) -> Result<(), Replay> {
        let now = Now {
            wall: check.now,
            mono,
        };
        let key = replay_key(proof);
        let owner = {
            let d = digest(&SHA256, proof.jkt.as_bytes());
            let mut first = [0u8; 8];
            first.copy_from_slice(d.as_ref().get(..8).unwrap_or(&[0; 8]));
            u64::from_be_bytes(first)
        };
        let until = proof.kept_until(check);
        let kept = Kept {
            wall: until,
            mono: mono.saturating_add(until.saturating_sub(check.now)),
            owner,
        };
        let mut seen = match self.seen.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        if seen.until.get(&key).is_some_and(|k| k.live(now)) {
            return Err(Replay::Used);
        }
        if seen.refuses(owner, self.capacity) {
            if seen.swept_at < now.mono {
                seen.sweep(now, self.capacity);
            }
            if seen.refuses(owner, self.capacity) {
                return Err(Replay::Full);
            }
        }
        if let Some(previous) = seen.until.insert(key, kept) {
            // An expired entry of the same proof, replaced.
            if let Some(held) = seen.per_key.get_mut(&previous.owner) {
                *held = held.saturating_sub(1);
            }
        }
        *seen.per_key.entry(owner).or_default() += 1;
        Ok(())
    }

    /// Whether `proof` was taken before and is still remembered, changing
    /// nothing: for a caller that must know before it charges the
    /// request to anyone (a replayed request is no one's).
    #[must_use]
    pub fn seen(&self, proof: &Proof, check: &ProofCheck<'_>) -> bool {
        let now = Now {
            wall: check.now,
            mono: self.started.elapsed().as_secs(),
        };
        let seen = match self.seen.lock() {
            Ok(s) => s,
            Err(poisoned) => poisoned.into_inner(),
        };
        seen.until
            .get(&replay_key(proof))
            .is_some_and(|k| k.live(now))
    }

    /// How many proofs are held.
    #[must_use]
    pub fn len(&self) -> usize {
        match self.seen.lock() {
            Ok(s) => s.until.len(),
            Err(poisoned) => poisoned.into_inner().until.len(),
        }
    }

    /// Whether none is held.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use aws_lc_rs::rand::SystemRandom;
    use aws_lc_rs::signature::{
        ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _,
    };
    use serde_json::json;

    use super::*;

    const NOW: u64 = 1_800_000_000;
    const URL: &str = "https://scrip.example/token";

    /// A client's proof key.
    enum Key {
        Es(EcdsaKeyPair),
        Ed(Ed25519KeyPair),
    }

    impl Key {
        fn es256() -> Self {
            Self::Es(EcdsaKeyPair::generate(&ECDSA_P256_SHA256_FIXED_SIGNING).unwrap())
        }

        fn ed25519() -> Self {
            Self::Ed(Ed25519KeyPair::generate().unwrap())
        }

        fn alg(&self) -> &'static str {
            match self {
                Self::Es(_) => "ES256",
                Self::Ed(_) => "EdDSA",
            }
        }

        fn jwk(&self) -> Value {
            match self {
                Self::Es(k) => {
                    let point = k.public_key().as_ref();
                    json!({"kty": "EC", "crv": "P-256",
                        "x": b64(&point[1..33]), "y": b64(&point[33..65])})
                }
                Self::Ed(k) => {
                    json!({"kty": "OKP", "crv": "Ed25519", "x": b64(k.public_key().as_ref())})
                }
            }
        }

        fn sign_jws(&self, header: &Value, claims: &Value) -> String {
            let input = format!(
                "{}.{}",
                b64(header.to_string().as_bytes()),
                b64(claims.to_string().as_bytes())
            );
            let sig = match self {
                Self::Es(k) => k
                    .sign(&SystemRandom::new(), input.as_bytes())
                    .unwrap()
                    .as_ref()
                    .to_vec(),
                Self::Ed(k) => k.sign(input.as_bytes()).as_ref().to_vec(),
            };
            format!("{input}.{}", b64(&sig))
        }

        fn proof(&self, claims: &Value) -> String {
            let header = json!({"typ": "dpop+jwt", "alg": self.alg(), "jwk": self.jwk()});
            self.sign_jws(&header, claims)
        }
    }

    fn claims() -> Value {
        json!({"jti": "j-1", "htm": "POST", "htu": URL, "iat": NOW})
    }

    fn check() -> ProofCheck<'static> {
        ProofCheck {
            method: "POST",
            url: URL,
            access_token: None,
            now: NOW,
            max_age: 60,
            leeway: 5,
        }
    }

    /// A proof made at [`forgettable_before`] is refused by a verifier
    /// whose clock runs behind by the whole leeway, the last to take it;
    /// one made a second later is still taken there: the bound is tight,
    /// so forgetting at it loses no proof that could pass.
    #[test]
    fn a_proof_is_forgotten_only_once_no_verifier_takes_it() {
        let key = Key::es256();
        for leeway in [0, 5, 30, 300] {
            let forget = forgettable_before(NOW, leeway);
            let behind = ProofCheck {
                now: NOW - leeway,
                max_age: MAX_PROOF_AGE,
                leeway,
                ..check()
            };
            let mut c = claims();
            c["iat"] = json!(forget);
            refused(&key.proof(&c), &behind, "too old");
            c["iat"] = json!(forget + 1);
            assert!(
                verify_proof(&key.proof(&c), &behind).is_ok(),
                "leeway {leeway}"
            );
        }
        assert_eq!(forgettable_before(10, 30), 0);
    }

    fn refused(proof: &str, check: &ProofCheck<'_>, why: &str) {
        let e = verify_proof(proof, check).expect_err(why);
        assert!(e.to_string().contains(why), "{e} (expected: {why})");
    }

    #[test]
    fn a_thumbprint_has_one_spelling() {
        assert!(is_thumbprint("NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"));
        for not in [
            "",
            // Padded; standard base64; one character short or long.
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs=",
            "NzbLsXh8uDCcd+6MNwXF4W/7noWXFZAfHkxZsRGC9Xs",
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9X",
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xss",
            // The same 32 bytes with stray low bits in the last character.
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xt",
            // Not base64 at all, of the right length.
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9X!",
        ] {
            assert!(!is_thumbprint(not), "{not}");
        }
    }

    #[test]
    fn rfc7638_thumbprint() {
        // RFC 7638 §3.1.
        let jwk = json!({
            "kty": "RSA",
            "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
            "e": "AQAB",
            "alg": "RS256",
            "kid": "2011-04-29"
        });
        assert_eq!(
            thumbprint(jwk.as_object().unwrap()).unwrap(),
            "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"
        );
        assert!(thumbprint(json!({"kty": "oct", "k": "AAAA"}).as_object().unwrap()).is_err());
        assert!(
            thumbprint(
                json!({"kty": "EC", "crv": "P-256", "x": "AA"})
                    .as_object()
                    .unwrap()
            )
            .is_err()
        );
    }

    #[test]
    fn an_rsa_key_has_one_form() {
        // RFC 7638 §3.1's key; the proofs' signatures are not RS256 ones, so
        // a key in its one form is refused for the signature, after the
        // form is checked.
        let n = "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECPebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQMicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRwr3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw";
        let padded = |v: &str| {
            let mut bytes = vec![0];
            bytes.extend(decode_part(v).unwrap());
            b64(&bytes)
        };
        let signer = Key::es256();
        let proof = |n: &str, e: &str| {
            let header = json!({"typ": "dpop+jwt", "alg": "RS256",
                "jwk": {"kty": "RSA", "n": n, "e": e}});
            signer.sign_jws(&header, &claims())
        };
        refused(&proof(n, "AQAB"), &check(), "signature");
        refused(
            &proof(&padded(n), "AQAB"),
            &check(),
            "key's `n` is not an integer in its fewest octets",
        );
        refused(
            &proof(n, &padded("AQAB")),
            &check(),
            "key's `e` is not an integer in its fewest octets",
        );
        // Keys that cost more to check than any client needs: refused
        // before the signature is. A 4096-bit one is still checked.
        refused(&proof(n, "AQAD"), &check(), "exponent is not 65537");
        refused(&proof(n, "_____w"), &check(), "exponent is not 65537");
        let bits = |octets: usize| b64(&[0xc5; 1024][..octets]);
        refused(
            &proof(&bits(513), "AQAB"),
            &check(),
            "longer than 4096 bits",
        );
        refused(
            &proof(&bits(1024), "AQAB"),
            &check(),
            "longer than 4096 bits",
        );
        refused(&proof(&bits(512), "AQAB"), &check(), "signature");
    }

    #[test]
    fn a_good_proof_names_its_key() {
        for key in [Key::es256(), Key::ed25519()] {
            let p = verify_proof(&key.proof(&claims()), &check()).unwrap();
            assert_eq!(p.jkt, thumbprint(key.jwk().as_object().unwrap()).unwrap());
            assert_eq!((p.jti.as_str(), p.iat), ("j-1", NOW));
        }
        // Query, fragment, case of scheme and host, and a default port do
        // not matter; a fractional iat is a time.
        let key = Key::es256();
        let mut c = claims();
        c["htu"] = json!("HTTPS://Scrip.Example:443/token?x=1#f");
        c["iat"] = json!(1_799_999_990.5);
        verify_proof(&key.proof(&c), &check()).unwrap();
        let at = ProofCheck {
            url: "https://scrip.example/token?y=2",
            ..check()
        };
        verify_proof(&key.proof(&claims()), &at).unwrap();
    }

    #[test]
    fn a_proof_for_another_request_is_refused() {
        let key = Key::es256();
        let mut c = claims();
        c["htm"] = json!("GET");
        refused(&key.proof(&c), &check(), "`htm` is not `POST`");
        for htu in [
            "https://scrip.example/token/",
            "https://scrip.example/Token",
            "http://scrip.example/token",
            "https://scrip.example:8443/token",
            "https://other.example/token",
            "https://user@scrip.example/token",
            "/token",
            "",
        ] {
            let mut c = claims();
            c["htu"] = json!(htu);
            refused(&key.proof(&c), &check(), "`htu` is not");
        }
    }

    #[test]
    fn a_proof_outside_its_window_is_refused() {
        let key = Key::es256();
        let mut c = claims();
        c["iat"] = json!(NOW + 6);
        refused(&key.proof(&c), &check(), "in the future");
        c["iat"] = json!(NOW + 5);
        verify_proof(&key.proof(&c), &check()).unwrap();
        c["iat"] = json!(NOW - 66);
        refused(&key.proof(&c), &check(), "too old");
        c["iat"] = json!(NOW - 65);
        verify_proof(&key.proof(&c), &check()).unwrap();
        for bad in [json!("1800000000"), json!(null), json!(-1)] {
            c["iat"] = bad;
            refused(&key.proof(&c), &check(), "numeric `iat`");
        }
    }

    #[test]
    fn missing_claims_are_refused() {
        let key = Key::es256();
        for name in ["jti", "htm", "htu"] {
            let mut c = claims();
            c.as_object_mut().unwrap().remove(name);
            refused(&key.proof(&c), &check(), &format!("no `{name}`"));
        }
        let mut c = claims();
        c["jti"] = json!("");
        refused(&key.proof(&c), &check(), "`jti` must be");
        c["jti"] = json!("x".repeat(257));
        refused(&key.proof(&c), &check(), "`jti` must be");
    }

    #[test]
    fn the_access_token_hash_must_match() {
        let key = Key::es256();
        let with = ProofCheck {
            method: "GET",
            url: "https://rs.example/repos",
            access_token: Some("the.access.token"),
            ..check()
        };
        let mut c =
            json!({"jti": "j", "htm": "GET", "htu": "https://rs.example/repos", "iat": NOW});
        refused(&key.proof(&c), &with, "no `ath`");
        c["ath"] = json!(access_token_hash("another.access.token"));
        refused(&key.proof(&c), &with, "`ath` is not");
        c["ath"] = json!(access_token_hash("the.access.token"));
        verify_proof(&key.proof(&c), &with).unwrap();
    }

    #[test]
    fn bad_headers_and_signatures_are_refused() {
        let key = Key::es256();
        let jwk = key.jwk();
        let sign = |h: Value| key.sign_jws(&h, &claims());
        refused(
            &sign(json!({"typ": "JWT", "alg": "ES256", "jwk": jwk})),
            &check(),
            "`typ` `JWT`",
        );
        refused(
            &sign(json!({"alg": "ES256", "jwk": jwk})),
            &check(),
            "no `typ`",
        );
        refused(
            &sign(json!({"typ": "application/jwt", "alg": "ES256", "jwk": jwk})),
            &check(),
            "`typ` `application/jwt`",
        );
        // The same media type written in full, or in capitals.
        for typ in ["application/dpop+jwt", "Application/DPoP+JWT", "DPOP+JWT"] {
            verify_proof(
                &sign(json!({"typ": typ, "alg": "ES256", "jwk": jwk})),
                &check(),
            )
            .unwrap();
        }
        for alg in ["none", "HS256", "ES512"] {
            refused(
                &sign(json!({"typ": "dpop+jwt", "alg": alg, "jwk": jwk})),
                &check(),
                "is not allowed",
            );
        }
        // The key must fit the algorithm it signs with.
        refused(
            &sign(json!({"typ": "dpop+jwt", "alg": "EdDSA", "jwk": jwk})),
            &check(),
            "key is not Ed25519",
        );
        let mut short = jwk.clone();
        short["x"] = json!("AAAA");
        refused(
            &sign(json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": short})),
            &check(),
            "does not fit",
        );
        refused(
            &sign(json!({"typ": "dpop+jwt", "alg": "ES256"})),
            &check(),
            "no `jwk`",
        );
        let mut private = jwk.clone();
        private["d"] = json!("AAAA");
        refused(
            &sign(json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": private})),
            &check(),
            "private member `d`",
        );
        refused(
            &sign(json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk, "crit": ["x"]})),
            &check(),
            "critical",
        );
        refused(
            &sign(json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk, "x5c": ["MII"]})),
            &check(),
            "`x5c`",
        );
        // Signed by another key than the one it names.
        let other = Key::es256();
        let lie = other.sign_jws(
            &json!({"typ": "dpop+jwt", "alg": "ES256", "jwk": jwk}),
            &claims(),
        );
        refused(&lie, &check(), "signature is invalid");
        // Claims changed after signing.
        let good = key.proof(&claims());
        let mut parts: Vec<&str> = good.split('.').collect();
        let mut c = claims();
        c["htu"] = json!("https://evil.example/token");
        let forged = b64(c.to_string().as_bytes());
        parts[1] = &forged;
        refused(&parts.join("."), &check(), "signature is invalid");
        refused("a.b", &check(), "compact");
        refused(&"a".repeat(MAX_PROOF_BYTES + 1), &check(), "larger");
    }

    /// RFC 9449 §4.3 asks for syntax-based normalization before `htu` is
    /// compared: an escaped unreserved character is that character, and hex
    /// digits have no case; an escaped reserved character is another path.
    #[test]
    fn targets_are_compared_as_rfc_3986_normalizes_them() {
        for (htu, url) in [
            ("https://rs.example/a~b", "https://rs.example/a%7Eb"),
            ("https://rs.example/a%7eb", "https://rs.example/a~b"),
            ("https://rs.example/a%2fb", "https://rs.example/a%2Fb"),
            ("https://rs.example/%41", "https://rs.example/A"),
            ("HTTPS://RS.example:443/x?q=1", "https://rs.example/x"),
        ] {
            assert!(same_target(htu, url), "{htu} {url}");
            assert!(same_target(url, htu), "{url} {htu}");
        }
        for (htu, url) in [
            ("https://rs.example/a/b", "https://rs.example/a%2Fb"),
            ("https://rs.example/a", "https://rs.example/A"),
            ("https://rs.example/a", "https://rs.example:8443/a"),
            ("http://rs.example/a", "https://rs.example/a"),
            ("https://rs.example/a%25", "https://rs.example/a%"),
        ] {
            assert!(!same_target(htu, url), "{htu} {url}");
        }
        assert_eq!(normal_escapes("/a%zz%2"), "/a%zz%2");
    }

    #[test]
    fn only_a_plain_target_is_compared() {
        assert!(plain_target("https://rs.example/api/read"));
        assert!(plain_target("https://rs.example/api/read?x=/../y"));
        assert!(plain_target("https://rs.example"));
        assert!(plain_target("https://rs.example/a%20b/%41"));
        for aliased in [
            "https://rs.example/api/x/../admin",
            "https://rs.example/api/x/%2e%2e/admin",
            "https://rs.example/api/x/%2E./admin",
            "https://rs.example/api/x\\..\\admin",
            "https://rs.example/api/./admin",
            "https://rs.example/api/a b",
            "not a url",
        ] {
            assert!(!plain_target(aliased), "{aliased}");
        }
    }

    #[test]
    fn a_proof_is_used_once() {
        let cache = ReplayCache::new(2);
        let key = Key::es256();
        let p = verify_proof(&key.proof(&claims()), &check()).unwrap();
        cache.first_use(&p, &check()).unwrap();
        assert_eq!(cache.first_use(&p, &check()), Err(Replay::Used));
        // The same jti under another key is another proof.
        let q = verify_proof(&Key::es256().proof(&claims()), &check()).unwrap();
        cache.first_use(&q, &check()).unwrap();
        // Full of live proofs: refused, not forgotten.
        let mut c = claims();
        c["jti"] = json!("j-2");
        let r = verify_proof(&key.proof(&c), &check()).unwrap();
        assert_eq!(cache.first_use(&r, &check()), Err(Replay::Full));
        assert_eq!(cache.first_use(&p, &check()), Err(Replay::Used));
        // Once the first proofs are past their window they make room, and
        // the proof is still refused while it could pass the window.
        let later = ProofCheck {
            now: NOW + 60 + 10 + 2,
            ..check()
        };
        assert_eq!(
            cache.first_use_at(
                &p,
                &ProofCheck {
                    now: NOW + 70,
                    ..check()
                },
                70
            ),
            Err(Replay::Used)
        );
        let mut c = claims();
        c["jti"] = json!("j-3");
        c["iat"] = json!(later.now);
        let s = verify_proof(&key.proof(&c), &later).unwrap();
        cache.first_use_at(&s, &later, 72).unwrap();
        assert_eq!(cache.len(), 1);
    }

    /// A wall clock stepped ahead (a bad NTP source, a VM resumed) makes
    /// every proof look expired; stepped back, those proofs pass the `iat`
    /// check again. The monotonic clock did not move, so none was
    /// forgotten while the wall clock was ahead.
    #[test]
    fn a_wall_clock_stepped_ahead_and_back_forgets_no_proof() {
        let cache = ReplayCache::new(2);
        let key = Key::es256();
        let p = verify_proof(&key.proof(&claims()), &check()).unwrap();
        cache.first_use_at(&p, &check(), 0).unwrap();
        let ahead = ProofCheck {
            now: NOW + 3600,
            ..check()
        };
        let mut c = claims();
        c["jti"] = json!("j-ahead");
        c["iat"] = json!(ahead.now);
        let q = verify_proof(&key.proof(&c), &ahead).unwrap();
        // The cache is full for this key only if `p` is still held.
        assert_eq!(cache.first_use_at(&q, &ahead, 5), Err(Replay::Full));
        assert_eq!(cache.first_use_at(&p, &check(), 6), Err(Replay::Used));
        // Once the monotonic clock too is past the window, it makes room.
        cache.first_use_at(&q, &ahead, 73).unwrap();
    }

    /// One client sending proofs as fast as it can cannot lock every other
    /// client out: no key holds more proofs than there are free places.
    #[test]
    fn one_key_cannot_fill_the_cache_for_everyone() {
        let cache = ReplayCache::new(8);
        let proofs = |key: &Key, n: usize, tag: &str| -> Vec<Proof> {
            (0..n)
                .map(|i| {
                    let mut c = claims();
                    c["jti"] = json!(format!("{tag}-{i}"));
                    verify_proof(&key.proof(&c), &check()).unwrap()
                })
                .collect()
        };
        let (a, b, c) = (Key::es256(), Key::es256(), Key::es256());
        let from_a = proofs(&a, 5, "a");
        for p in &from_a[..4] {
            cache.first_use(p, &check()).unwrap();
        }
        // Half the cache: `a` is refused from here on, and nobody else is.
        assert_eq!(cache.first_use(&from_a[4], &check()), Err(Replay::Full));
        let from_b = proofs(&b, 3, "b");
        cache.first_use(&from_b[0], &check()).unwrap();
        cache.first_use(&from_b[1], &check()).unwrap();
        assert_eq!(cache.first_use(&from_b[2], &check()), Err(Replay::Full));
        for p in proofs(&c, 1, "c") {
            cache.first_use(&p, &check()).unwrap();
        }
        // Every proof taken is still refused a second time.
        for p in from_a[..4].iter().chain(&from_b[..2]) {
            assert_eq!(cache.first_use(p, &check()), Err(Replay::Used));
        }
        assert_eq!(cache.len(), 7);
    }
}
