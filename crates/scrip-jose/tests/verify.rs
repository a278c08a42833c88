//! The one JWT validation path, driven from outside the crate: tokens signed
//! by scrip's own [`SigningKey`] and by `jsonwebtoken` (an independent
//! implementation) verify, and every RFC 8725 refusal names the exact
//! [`JoseError`] variant.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    clippy::indexing_slicing,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::sync::LazyLock;

use aws_lc_rs::signature::{
    ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair, Ed25519KeyPair, KeyPair as _,
};
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use scrip_jose::{
    Algorithm, Expectations, JoseError, KeySet, MAX_TOKEN_BYTES, SigningAlgorithm, SigningKey,
    TypRule, Verified, verify,
};
use serde_json::{Map, Value, json};

const ISS: &str = "https://idp.example";
const AUD: &str = "https://scrip.example";

// ---------------------------------------------------------------- fixtures

struct Keys {
    ec: SigningKey,
    ec_pkcs8: Vec<u8>,
    ed: SigningKey,
    ed_pkcs8: Vec<u8>,
    rsa: SigningKey,
    /// A second P-256 key: its signatures must not verify under `ec`'s kid.
    other_ec_pkcs8: Vec<u8>,
}

static KEYS: LazyLock<Keys> = LazyLock::new(|| {
    let (ec, ec_pkcs8) = SigningKey::generate(SigningAlgorithm::ES256).unwrap();
    let (ed, ed_pkcs8) = SigningKey::generate(SigningAlgorithm::EdDSA).unwrap();
    let (rsa, _) = SigningKey::generate(SigningAlgorithm::RS256).unwrap();
    let (_, other_ec_pkcs8) = SigningKey::generate(SigningAlgorithm::ES256).unwrap();
    Keys {
        ec,
        ec_pkcs8: ec_pkcs8.to_vec(),
        ed,
        ed_pkcs8: ed_pkcs8.to_vec(),
        rsa,
        other_ec_pkcs8: other_ec_pkcs8.to_vec(),
    }
});

fn keys() -> &'static Keys {
    &KEYS
}

/// A key set holding the public JWKs of all three fixture keys.
fn all_keys() -> KeySet {
    let k = keys();
    KeySet::from_public_jwks(&[k.ec.public_jwk(), k.ed.public_jwk(), k.rsa.public_jwk()]).unwrap()
}

fn key_set(jwks: Value) -> KeySet {
    KeySet::from_jwks_json(&serde_json::to_vec(&jwks).unwrap()).unwrap()
}

fn now() -> i64 {
    i64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs(),
    )
    .unwrap()
}

/// Valid claims for [`ISS`] and [`AUD`].
fn claims() -> Value {
    let now = now();
    json!({
        "iss": ISS,
        "sub": "agent-1",
        "aud": AUD,
        "exp": now + 300,
        "iat": now,
        "nbf": now,
    })
}

fn with(mut claims: Value, name: &str, value: Value) -> Value {
    claims[name] = value;
    claims
}

fn without(mut claims: Value, name: &str) -> Value {
    claims.as_object_mut().unwrap().remove(name);
    claims
}

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn b64_json(value: &Value) -> String {
    b64(&serde_json::to_vec(value).unwrap())
}

/// Signs a compact JWS with an arbitrary header, independently of
/// [`SigningKey::sign_jwt`], so tests control every header member.
enum Signer<'a> {
    Es256(&'a [u8]),
    Ed(&'a [u8]),
}

fn forge(header: &Value, claims: &Value, signer: &Signer<'_>) -> String {
    let input = format!("{}.{}", b64_json(header), b64_json(claims));
    let signature = match signer {
        Signer::Es256(pkcs8) => {
            let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pkcs8).unwrap();
            pair.sign(&aws_lc_rs::rand::SystemRandom::new(), input.as_bytes())
                .unwrap()
                .as_ref()
                .to_vec()
        }
        Signer::Ed(pkcs8) => {
            let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(pkcs8).unwrap();
            pair.sign(input.as_bytes()).as_ref().to_vec()
        }
    };
    format!("{input}.{}", b64(&signature))
}

/// An ES256 token from the fixture EC key with `extra` header members.
fn es256_with_header(extra: &Value) -> String {
    let k = keys();
    let mut header = json!({"alg": "ES256", "typ": "JWT", "kid": k.ec.kid()});
    for (name, value) in extra.as_object().unwrap() {
        header[name] = value.clone();
    }
    forge(&header, &claims(), &Signer::Es256(&k.ec_pkcs8))
}

/// An HS256 token keyed with the bytes of the EC public JWK: the classic
/// algorithm-confusion attack.
fn hs256_with_public_key(kid: &str) -> String {
    let k = keys();
    let header = json!({"alg": "HS256", "typ": "JWT", "kid": kid});
    let input = format!("{}.{}", b64_json(&header), b64_json(&claims()));
    let secret = serde_json::to_vec(&k.ec.public_jwk()).unwrap();
    let key = aws_lc_rs::hmac::Key::new(aws_lc_rs::hmac::HMAC_SHA256, &secret);
    let tag = aws_lc_rs::hmac::sign(&key, input.as_bytes());
    format!("{input}.{}", b64(tag.as_ref()))
}

// ------------------------------------------------------------ expectations

/// Owned expectations, so table rows can vary them.
#[derive(Clone)]
struct Rule {
    issuer: String,
    audiences: Vec<String>,
    algorithms: Vec<Algorithm>,
    typ: TypRule,
    leeway: u64,
}

impl Default for Rule {
    fn default() -> Self {
        Self {
            issuer: ISS.into(),
            audiences: vec![AUD.into()],
            algorithms: vec![Algorithm::ES256, Algorithm::EdDSA, Algorithm::RS256],
            typ: TypRule {
                allow_absent: true,
                values: vec!["jwt".into()],
            },
            leeway: 30,
        }
    }
}

impl Rule {
    fn expectations(&self) -> Expectations<'_> {
        Expectations {
            issuer: &self.issuer,
            audiences: &self.audiences,
            algorithms: &self.algorithms,
            typ: &self.typ,
            leeway: self.leeway,
        }
    }

    fn algorithms(algorithms: &[Algorithm]) -> Self {
        Self {
            algorithms: algorithms.to_vec(),
            ..Self::default()
        }
    }

    fn typ(typ: &str) -> Self {
        Self {
            typ: TypRule::exactly(typ),
            ..Self::default()
        }
    }
}

/// The one way these tests verify a token.
fn check(
    token: &str,
    keys: &KeySet,
    expectations: &Expectations<'_>,
) -> Result<Verified<Map<String, Value>>, JoseError> {
    verify(token, keys, expectations)
}

// ------------------------------------------------------------------ tables

enum Want {
    Accept,
    /// Exactly this error, payload included.
    Refuse(JoseError),
    /// This variant, whatever its payload.
    RefuseLike(JoseError),
}

struct Case {
    name: &'static str,
    token: String,
    keys: KeySet,
    rule: Rule,
    want: Want,
}

fn case(name: &'static str, token: String, want: Want) -> Case {
    Case {
        name,
        token,
        keys: all_keys(),
        rule: Rule::default(),
        want,
    }
}

fn case_with(name: &'static str, token: String, rule: Rule, want: Want) -> Case {
    Case {
        rule,
        ..case(name, token, want)
    }
}

fn run(cases: Vec<Case>) {
    let mut failures = Vec::new();
    for c in &cases {
        let got = check(&c.token, &c.keys, &c.rule.expectations()).map(|v| v.claims);
        let ok = match (&c.want, &got) {
            (Want::Accept, Ok(_)) => true,
            (Want::Refuse(want), Err(e)) => want == e,
            (Want::RefuseLike(want), Err(e)) => {
                std::mem::discriminant(want) == std::mem::discriminant(e)
            }
            _ => false,
        };
        if !ok {
            let want = match &c.want {
                Want::Accept => "accepted".to_owned(),
                Want::Refuse(e) | Want::RefuseLike(e) => format!("{e:?}"),
            };
            failures.push(format!("{}: want {want}, got {got:?}", c.name));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases failed:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
}

#[test]
fn accepted_tokens() {
    let k = keys();
    let now = now();
    run(vec![
        case(
            "ES256 SigningKey",
            k.ec.sign_jwt("JWT", &claims()).unwrap(),
            Want::Accept,
        ),
        case(
            "EdDSA SigningKey",
            k.ed.sign_jwt("JWT", &claims()).unwrap(),
            Want::Accept,
        ),
        case(
            "RS256 SigningKey",
            k.rsa.sign_jwt("JWT", &claims()).unwrap(),
            Want::Accept,
        ),
        case(
            "untyped where allowed",
            forge(
                &json!({"alg": "ES256", "kid": k.ec.kid()}),
                &claims(),
                &Signer::Es256(&k.ec_pkcs8),
            ),
            Want::Accept,
        ),
        case_with(
            "typ application/at+jwt where at+jwt required",
            k.ec.sign_jwt("application/at+jwt", &claims()).unwrap(),
            Rule::typ("at+jwt"),
            Want::Accept,
        ),
        case_with(
            "typ AT+JWT where at+jwt required",
            k.ec.sign_jwt("AT+JWT", &claims()).unwrap(),
            Rule::typ("at+jwt"),
            Want::Accept,
        ),
        case(
            "aud array with one match",
            k.ec.sign_jwt("JWT", &with(claims(), "aud", json!(["https://other", AUD])))
                .unwrap(),
            Want::Accept,
        ),
        case_with(
            "one of several accepted audiences",
            k.ec.sign_jwt("JWT", &claims()).unwrap(),
            Rule {
                audiences: vec!["https://other.example".into(), AUD.into()],
                ..Rule::default()
            },
            Want::Accept,
        ),
        case(
            "expired within leeway",
            k.ec.sign_jwt("JWT", &with(claims(), "exp", json!(now - 10)))
                .unwrap(),
            Want::Accept,
        ),
        case(
            "nbf within leeway",
            k.ec.sign_jwt("JWT", &with(claims(), "nbf", json!(now + 10)))
                .unwrap(),
            Want::Accept,
        ),
        case(
            "iat within leeway",
            k.ec.sign_jwt("JWT", &with(claims(), "iat", json!(now + 10)))
                .unwrap(),
            Want::Accept,
        ),
        case(
            "no iat, no nbf",
            k.ec.sign_jwt("JWT", &without(without(claims(), "iat"), "nbf"))
                .unwrap(),
            Want::Accept,
        ),
        Case {
            keys: KeySet::from_public_jwks(&[k.ec.public_jwk()]).unwrap(),
            ..case(
                "no kid with a single-key set",
                forge(
                    &json!({"alg": "ES256", "typ": "JWT"}),
                    &claims(),
                    &Signer::Es256(&k.ec_pkcs8),
                ),
                Want::Accept,
            )
        },
    ]);
}

#[test]
fn refused_tokens() {
    use JoseError as E;
    let k = keys();
    let now = now();
    let ec = |claims: &Value| k.ec.sign_jwt("JWT", claims).unwrap();
    let valid = ec(&claims());
    let [h, p, s] = <[&str; 3]>::try_from(valid.split('.').collect::<Vec<_>>()).unwrap();
    let altered_payload = b64_json(&with(claims(), "sub", json!("admin")));

    run(vec![
        // Size and form.
        case(
            "too large, garbage",
            "a".repeat(MAX_TOKEN_BYTES + 1),
            Want::Refuse(E::TooLarge),
        ),
        case(
            "too large, validly signed",
            ec(&with(claims(), "pad", json!("x".repeat(MAX_TOKEN_BYTES)))),
            Want::Refuse(E::TooLarge),
        ),
        case(
            "two parts",
            format!("{h}.{p}"),
            Want::RefuseLike(E::Malformed("")),
        ),
        case(
            "four parts",
            format!("{h}.{p}.{s}.{s}"),
            Want::RefuseLike(E::Malformed("")),
        ),
        case("empty", String::new(), Want::RefuseLike(E::Malformed(""))),
        case(
            "header not base64url (length)",
            format!("a.{p}.{s}"),
            Want::RefuseLike(E::Malformed("")),
        ),
        case(
            "header not base64url (alphabet)",
            format!("{h}+/.{p}.{s}"),
            Want::RefuseLike(E::Malformed("")),
        ),
        case(
            "padded base64",
            format!("{h}=.{p}.{s}"),
            Want::RefuseLike(E::Malformed("")),
        ),
        case(
            "header not JSON",
            format!("{}.{p}.{s}", b64(b"not json")),
            Want::RefuseLike(E::Malformed("")),
        ),
        case(
            "header JSON but not an object",
            format!("{}.{p}.{s}", b64(b"[\"ES256\"]")),
            Want::RefuseLike(E::Malformed("")),
        ),
        case(
            "header without alg",
            es256_with_header(&json!({"alg": null})),
            Want::RefuseLike(E::Malformed("")),
        ),
        case(
            "JWS JSON serialization",
            serde_json::to_string(&json!({"protected": h, "payload": p, "signature": s})).unwrap(),
            Want::RefuseLike(E::Malformed("")),
        ),
        case(
            "JWE (five parts)",
            format!(
                "{}.a.b.c.d",
                b64_json(&json!({"alg": "RSA-OAEP", "enc": "A256GCM"}))
            ),
            Want::Refuse(E::Encrypted),
        ),
        // Algorithms.
        case(
            "alg none, empty signature",
            format!("{}.{p}.", b64_json(&json!({"alg": "none", "typ": "JWT"}))),
            Want::Refuse(E::AlgorithmNotAllowed("none".into())),
        ),
        case(
            "alg None with a kid",
            format!(
                "{}.{p}.",
                b64_json(&json!({"alg": "None", "typ": "JWT", "kid": k.ec.kid()}))
            ),
            Want::RefuseLike(E::AlgorithmNotAllowed(String::new())),
        ),
        case(
            "HS256 keyed with the public key",
            hs256_with_public_key(k.ec.kid()),
            Want::Refuse(E::AlgorithmNotAllowed("HS256".into())),
        ),
        case_with(
            "HS256 even when wrongly allow-listed",
            hs256_with_public_key(k.ec.kid()),
            Rule::algorithms(&[Algorithm::ES256, Algorithm::HS256]),
            Want::Refuse(E::KeyAlgorithmMismatch),
        ),
        case_with(
            "RS256 not on the allow-list",
            k.rsa.sign_jwt("JWT", &claims()).unwrap(),
            Rule::algorithms(&[Algorithm::ES256]),
            Want::Refuse(E::AlgorithmNotAllowed("RS256".into())),
        ),
        case(
            "unknown alg",
            es256_with_header(&json!({"alg": "ES999"})),
            Want::Refuse(E::AlgorithmNotAllowed("ES999".into())),
        ),
        // Headers.
        case(
            "crit",
            es256_with_header(&json!({"crit": ["exp"], "exp": 1})),
            Want::Refuse(E::CriticalHeader),
        ),
        case(
            "jku",
            es256_with_header(&json!({"jku": "https://attacker.example/jwks"})),
            Want::Refuse(E::ForbiddenHeader("jku")),
        ),
        case(
            "x5u",
            es256_with_header(&json!({"x5u": "https://attacker.example/cert.pem"})),
            Want::Refuse(E::ForbiddenHeader("x5u")),
        ),
        case(
            "jwk (embedded key)",
            es256_with_header(&json!({"jwk": k.ec.public_jwk()})),
            Want::Refuse(E::ForbiddenHeader("jwk")),
        ),
        case(
            "x5c",
            es256_with_header(&json!({"x5c": ["MIIBszCCAVmgAwIBAgIUb3Rf"]})),
            Want::Refuse(E::ForbiddenHeader("x5c")),
        ),
        case(
            "typ not a string",
            es256_with_header(&json!({"typ": 7})),
            Want::RefuseLike(E::Malformed("")),
        ),
        case(
            "kid not a string",
            es256_with_header(&json!({"kid": 7})),
            Want::RefuseLike(E::Malformed("")),
        ),
        case(
            "kid too long",
            es256_with_header(&json!({"kid": "k".repeat(300)})),
            Want::RefuseLike(E::Malformed("")),
        ),
        // Types.
        case_with(
            "typ absent where at+jwt required",
            forge(
                &json!({"alg": "ES256", "kid": k.ec.kid()}),
                &claims(),
                &Signer::Es256(&k.ec_pkcs8),
            ),
            Rule::typ("at+jwt"),
            Want::Refuse(E::WrongType {
                expected: "`at+jwt`".into(),
                found: "none".into(),
            }),
        ),
        case_with(
            "typ JWT where at+jwt required",
            k.ec.sign_jwt("JWT", &claims()).unwrap(),
            Rule::typ("at+jwt"),
            Want::Refuse(E::WrongType {
                expected: "`at+jwt`".into(),
                found: "JWT".into(),
            }),
        ),
        case_with(
            "task token where access token required",
            k.ec.sign_jwt("txntoken+jwt", &claims()).unwrap(),
            Rule::typ("at+jwt"),
            Want::RefuseLike(E::WrongType {
                expected: String::new(),
                found: String::new(),
            }),
        ),
        // Keys.
        case(
            "unknown kid",
            es256_with_header(&json!({"kid": "no-such-key"})),
            Want::Refuse(E::UnknownKey),
        ),
        case(
            "kid as a path",
            es256_with_header(&json!({"kid": "../../../etc/passwd"})),
            Want::Refuse(E::UnknownKey),
        ),
        case(
            "kid as a URL",
            es256_with_header(&json!({"kid": "https://attacker.example/jwks"})),
            Want::Refuse(E::UnknownKey),
        ),
        case(
            "no kid with several keys",
            forge(
                &json!({"alg": "ES256", "typ": "JWT"}),
                &claims(),
                &Signer::Es256(&k.ec_pkcs8),
            ),
            Want::Refuse(E::UnknownKey),
        ),
        case(
            "EdDSA token under an ES256 key's kid",
            forge(
                &json!({"alg": "EdDSA", "typ": "JWT", "kid": k.ec.kid()}),
                &claims(),
                &Signer::Ed(&k.ed_pkcs8),
            ),
            Want::Refuse(E::KeyAlgorithmMismatch),
        ),
        Case {
            // The JWK has no `alg`: P-256 alone allows only ES256.
            keys: key_set(json!({"keys": [without(k.ec.public_jwk(), "alg")]})),
            ..case(
                "EdDSA token under an unpinned EC key",
                forge(
                    &json!({"alg": "EdDSA", "typ": "JWT", "kid": k.ec.kid()}),
                    &claims(),
                    &Signer::Ed(&k.ed_pkcs8),
                ),
                Want::Refuse(E::KeyAlgorithmMismatch),
            )
        },
        case(
            "ES256 token under an RSA key's kid",
            forge(
                &json!({"alg": "ES256", "typ": "JWT", "kid": k.rsa.kid()}),
                &claims(),
                &Signer::Es256(&k.ec_pkcs8),
            ),
            Want::Refuse(E::KeyAlgorithmMismatch),
        ),
        case_with(
            "PS256 token under an RSA key pinned to RS256",
            es256_with_header(&json!({"alg": "PS256", "kid": k.rsa.kid()})),
            Rule::algorithms(&[Algorithm::RS256, Algorithm::PS256]),
            Want::Refuse(E::KeyAlgorithmMismatch),
        ),
        // Claims.
        case(
            "expired",
            ec(&with(claims(), "exp", json!(now - 3600))),
            Want::Refuse(E::Expired),
        ),
        case(
            "not yet valid",
            ec(&with(claims(), "nbf", json!(now + 3600))),
            Want::Refuse(E::NotYetValid),
        ),
        case(
            "issued in the future",
            ec(&with(claims(), "iat", json!(now + 3600))),
            Want::Refuse(E::IssuedInFuture),
        ),
        case(
            "wrong issuer",
            ec(&with(claims(), "iss", json!("https://other.example"))),
            Want::Refuse(E::WrongIssuer),
        ),
        case(
            "issuer differs only by a trailing slash",
            ec(&with(claims(), "iss", json!(format!("{ISS}/")))),
            Want::Refuse(E::WrongIssuer),
        ),
        case(
            "wrong audience",
            ec(&with(claims(), "aud", json!("https://other.example"))),
            Want::Refuse(E::WrongAudience),
        ),
        case(
            "aud array without a match",
            ec(&with(
                claims(),
                "aud",
                json!(["https://a.example", "https://b.example"]),
            )),
            Want::Refuse(E::WrongAudience),
        ),
        case_with(
            "no accepted audiences configured",
            valid.clone(),
            Rule {
                audiences: vec![],
                ..Rule::default()
            },
            Want::Refuse(E::WrongAudience),
        ),
        case(
            "payload altered",
            format!("{h}.{altered_payload}.{s}"),
            Want::Refuse(E::BadSignature),
        ),
        case(
            "signed by another key under this kid",
            forge(
                &json!({"alg": "ES256", "typ": "JWT", "kid": k.ec.kid()}),
                &claims(),
                &Signer::Es256(&k.other_ec_pkcs8),
            ),
            Want::Refuse(E::BadSignature),
        ),
        case(
            "signature truncated (canonical base64url, 60 bytes)",
            format!("{h}.{p}.{}", b64(&URL_SAFE_NO_PAD.decode(s).unwrap()[..60])),
            Want::Refuse(E::BadSignature),
        ),
        case(
            "signature empty",
            format!("{h}.{p}."),
            Want::Refuse(E::BadSignature),
        ),
        case(
            // 85 characters: a length no base64url encoding has, whatever
            // the signature's bytes (cutting 4 would decode 1 time in 16).
            "signature not base64url",
            format!("{h}.{p}.{}", &s[..s.len() - 1]),
            Want::RefuseLike(E::Malformed("")),
        ),
        case(
            "exp not a number",
            ec(&with(claims(), "exp", json!("soon"))),
            Want::Refuse(E::MissingClaim("exp".into())),
        ),
        case(
            "iat not a number",
            ec(&with(claims(), "iat", json!("earlier"))),
            Want::Refuse(E::BadClaims),
        ),
        case(
            "claims not an object",
            ec(&json!(["iss", ISS])),
            Want::RefuseLike(E::Malformed("")),
        ),
        // A member serde_json's Value would read as the JSON text it holds
        // (a number here, an object to every other library).
        case(
            "exp as serde_json's raw value",
            ec(&with(
                claims(),
                "exp",
                json!({"$serde_json::private::RawValue": "99999999999"}),
            )),
            Want::Refuse(E::Malformed("claims name a reserved member")),
        ),
        case(
            "a nested claim as serde_json's raw value",
            ec(&with(
                claims(),
                "kubernetes.io",
                json!({"$serde_json::private::RawValue": "{\"namespace\":\"prod\"}"}),
            )),
            Want::Refuse(E::Malformed("claims name a reserved member")),
        ),
        case(
            "a header member as serde_json's raw value",
            es256_with_header(&json!({"x": [{"$serde_json::private::RawValue": "1"}]})),
            Want::Refuse(E::Malformed("header names a reserved member")),
        ),
        case(
            "no exp",
            ec(&without(claims(), "exp")),
            Want::Refuse(E::MissingClaim("exp".into())),
        ),
        case(
            "no iss",
            ec(&without(claims(), "iss")),
            Want::Refuse(E::MissingClaim("iss".into())),
        ),
        case(
            "no aud",
            ec(&without(claims(), "aud")),
            Want::Refuse(E::MissingClaim("aud".into())),
        ),
    ]);
}

/// A validly signed token with a malformed `nbf` is refused, but it must be
/// reported as bad claims (like a malformed `iat`), not as a bad signature.
#[test]
fn malformed_nbf_is_bad_claims_not_bad_signature() {
    let k = keys();
    let token =
        k.ec.sign_jwt("JWT", &with(claims(), "nbf", json!("later")))
            .unwrap();
    assert_eq!(
        check(&token, &all_keys(), &Rule::default().expectations()).unwrap_err(),
        JoseError::BadClaims
    );
}

#[test]
fn null_time_claims_are_bad_claims_not_absent() {
    // RFC 7519 §4.1.5/§4.1.6: a present `nbf` or `iat` must be a
    // NumericDate; serde's `Option` alone would read `null` as absent.
    let k = keys();
    for name in ["nbf", "iat"] {
        let token =
            k.ec.sign_jwt("JWT", &with(claims(), name, Value::Null))
                .unwrap();
        assert_eq!(
            check(&token, &all_keys(), &Rule::default().expectations()).unwrap_err(),
            JoseError::BadClaims,
            "{name}: null"
        );
    }
    let token =
        k.ec.sign_jwt("JWT", &with(claims(), "exp", Value::Null))
            .unwrap();
    assert!(check(&token, &all_keys(), &Rule::default().expectations()).is_err());
}

#[test]
fn a_token_is_expired_at_its_exp_second() {
    // RFC 7519 §4.1.4: the current time must be before `exp`. Signed in a
    // loop so that the second cannot change between signing and checking.
    let k = keys();
    let rule = Rule {
        leeway: 0,
        ..Rule::default()
    };
    loop {
        let at = now();
        let expired =
            k.ec.sign_jwt("JWT", &with(claims(), "exp", json!(at)))
                .unwrap();
        let live =
            k.ec.sign_jwt("JWT", &with(claims(), "exp", json!(at + 1)))
                .unwrap();
        let (expired, live) = (
            check(&expired, &all_keys(), &rule.expectations()),
            check(&live, &all_keys(), &rule.expectations()),
        );
        if now() != at {
            continue;
        }
        assert_eq!(expired.unwrap_err(), JoseError::Expired);
        assert!(live.is_ok(), "{live:?}");
        break;
    }
}

#[test]
fn configured_types_may_be_written_with_application_prefix() {
    // RFC 7515 §4.1.9: `application/` may be left out, on either side.
    let k = keys();
    let rule = Rule {
        typ: TypRule::any_of(false, ["application/JWT"]),
        ..Rule::default()
    };
    for typ in ["JWT", "jwt", "application/jwt", "Application/JWT"] {
        let token = k.ec.sign_jwt(typ, &claims()).unwrap();
        assert!(
            check(&token, &all_keys(), &rule.expectations()).is_ok(),
            "{typ}"
        );
    }
    let token = k.ec.sign_jwt("at+jwt", &claims()).unwrap();
    assert!(matches!(
        check(&token, &all_keys(), &rule.expectations()).unwrap_err(),
        JoseError::WrongType { .. }
    ));
}

// ----------------------------------------------------- claims and interop

#[test]
fn claims_round_trip_for_each_algorithm() {
    let k = keys();
    let set = all_keys();
    let rule = Rule::default();
    let mut sent = claims();
    sent["kubernetes.io"] = json!({"namespace": "agents", "pod": {"name": "p-1"}});
    sent["list"] = json!([1, "two", null, true]);
    sent["unicode"] = json!("zürich ✓");
    for (key, alg) in [
        (&k.ec, Algorithm::ES256),
        (&k.ed, Algorithm::EdDSA),
        (&k.rsa, Algorithm::RS256),
    ] {
        let token = key.sign_jwt("JWT", &sent).unwrap();
        let verified = check(&token, &set, &rule.expectations()).unwrap();
        assert_eq!(Value::Object(verified.claims), sent, "{alg:?}");
        assert_eq!(verified.kid.as_deref(), Some(key.kid()), "{alg:?}");
        assert_eq!(verified.alg, alg);
        assert_eq!(key.algorithm().to_jwt(), alg);
    }
}

#[test]
fn token_from_jsonwebtoken_verifies() {
    let k = keys();
    let mut header = jsonwebtoken::Header::new(jsonwebtoken::Algorithm::ES256);
    header.kid = Some(k.ec.kid().to_owned());
    header.typ = Some("JWT".into());
    let encoding = jsonwebtoken::EncodingKey::from_ec_der(&k.ec_pkcs8);
    let sent = claims();
    let token = jsonwebtoken::encode(&header, &sent, &encoding).unwrap();

    let verified = check(&token, &all_keys(), &Rule::default().expectations()).unwrap();
    assert_eq!(Value::Object(verified.claims), sent);
    assert_eq!(verified.alg, Algorithm::ES256);
}

#[test]
fn signing_key_tokens_verify_with_jsonwebtoken() {
    // The other direction: scrip's JWK and signatures interoperate.
    let k = keys();
    for key in [&k.ec, &k.ed, &k.rsa] {
        let jwk: jsonwebtoken::jwk::Jwk = serde_json::from_value(key.public_jwk()).unwrap();
        let decoding = jsonwebtoken::DecodingKey::from_jwk(&jwk).unwrap();
        let mut validation = jsonwebtoken::Validation::new(key.algorithm().to_jwt());
        validation.set_issuer(&[ISS]);
        validation.set_audience(&[AUD]);
        let token = key.sign_jwt("JWT", &claims()).unwrap();
        let data = jsonwebtoken::decode::<Value>(&token, &decoding, &validation).unwrap();
        assert_eq!(data.claims["sub"], "agent-1");
        assert_eq!(data.header.kid.as_deref(), Some(key.kid()));
    }
}

#[test]
fn from_pkcs8_keeps_the_kid() {
    let k = keys();
    let again = SigningKey::from_pkcs8(SigningAlgorithm::ES256, &k.ec_pkcs8).unwrap();
    assert_eq!(again.kid(), k.ec.kid());
    assert_eq!(again.public_jwk(), k.ec.public_jwk());
    assert!(SigningKey::from_pkcs8(SigningAlgorithm::EdDSA, &k.ec_pkcs8).is_err());
    assert!(SigningKey::from_pkcs8(SigningAlgorithm::ES256, b"not a key").is_err());
}

// ------------------------------------------------------------------- JWKs

fn sha256_b64(data: &str) -> String {
    b64(aws_lc_rs::digest::digest(&aws_lc_rs::digest::SHA256, data.as_bytes()).as_ref())
}

#[test]
fn ec_kid_is_the_rfc7638_thumbprint() {
    let k = keys();
    // The public point straight from the PKCS#8, not from scrip's JWK.
    let pair = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &k.ec_pkcs8).unwrap();
    let point = pair.public_key().as_ref();
    assert_eq!(point.len(), 65);
    assert_eq!(point[0], 0x04, "uncompressed point");
    let x = b64(&point[1..33]);
    let y = b64(&point[33..65]);
    let canonical = format!(r#"{{"crv":"P-256","kty":"EC","x":"{x}","y":"{y}"}}"#);
    let thumbprint = sha256_b64(&canonical);

    assert_eq!(k.ec.kid(), thumbprint);
    let jwk = k.ec.public_jwk();
    assert_eq!(jwk["kid"], thumbprint.as_str());
    assert_eq!(jwk["x"], x.as_str());
    assert_eq!(jwk["y"], y.as_str());
    assert_eq!(jwk["kty"], "EC");
    assert_eq!(jwk["crv"], "P-256");
    assert_eq!(jwk["alg"], "ES256");
    assert_eq!(jwk["use"], "sig");
    // base64url without padding: 32 bytes of SHA-256.
    assert_eq!(thumbprint.len(), 43);
}

#[test]
fn ed25519_kid_is_the_rfc8037_thumbprint() {
    let k = keys();
    let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&k.ed_pkcs8).unwrap();
    let x = b64(pair.public_key().as_ref());
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    assert_eq!(k.ed.kid(), sha256_b64(&canonical));
    assert_eq!(k.ed.public_jwk()["x"], x.as_str());
}

#[test]
fn public_jwk_never_holds_private_members() {
    let k = keys();
    for key in [&k.ec, &k.ed, &k.rsa] {
        let jwk = key.public_jwk();
        let members = jwk.as_object().unwrap();
        for private in ["d", "p", "q", "dp", "dq", "qi", "oth", "k"] {
            assert!(
                !members.contains_key(private),
                "{} JWK holds `{private}`",
                key.algorithm()
            );
        }
        assert_eq!(jwk["kid"], key.kid());
        assert_eq!(jwk["alg"], key.algorithm().as_str());
    }
    let rsa = k.rsa.public_jwk();
    assert_eq!(rsa["kty"], "RSA");
    assert_eq!(rsa["e"], "AQAB");
    // 2048-bit modulus: 256 bytes, 342 base64url characters.
    assert_eq!(rsa["n"].as_str().unwrap().len(), 342);
}

// ----------------------------------------------------------------- KeySet

fn jwks_bytes(keys: &[Value]) -> Vec<u8> {
    serde_json::to_vec(&json!({ "keys": keys })).unwrap()
}

fn oct_key(kid: &str) -> Value {
    json!({"kty": "oct", "kid": kid, "k": b64(b"a shared secret of sufficient length"), "alg": "HS256"})
}

#[test]
fn keyset_skips_symmetric_and_encryption_keys() {
    let k = keys();
    let ec = k.ec.public_jwk();
    let mut enc = k.ed.public_jwk();
    enc["use"] = json!("enc");

    let set = KeySet::from_jwks_json(&jwks_bytes(&[oct_key("hmac"), enc, ec.clone()])).unwrap();
    assert_eq!(set.len(), 1);
    assert!(set.contains_kid(k.ec.kid()));
    assert!(!set.contains_kid("hmac"));
    assert!(!set.contains_kid(k.ed.kid()));

    // A token naming a skipped key finds no key, even if HS256 is allowed.
    let rule = Rule::algorithms(&[Algorithm::ES256, Algorithm::EdDSA, Algorithm::HS256]);
    let exp = rule.expectations();
    assert_eq!(
        check(&hs256_with_public_key("hmac"), &set, &exp).unwrap_err(),
        JoseError::UnknownKey
    );
    let ed_token = k.ed.sign_jwt("JWT", &claims()).unwrap();
    assert_eq!(
        check(&ed_token, &set, &exp).unwrap_err(),
        JoseError::UnknownKey
    );
    // Unknown key types and curves are skipped too, not fatal.
    let odd = [
        json!({"kty": "XYZ", "kid": "odd"}),
        json!({"kty": "EC", "crv": "secp256k1", "kid": "k1", "x": "AA", "y": "AA"}),
        ec,
    ];
    assert_eq!(KeySet::from_jwks_json(&jwks_bytes(&odd)).unwrap().len(), 1);
}

/// A JWKS that publishes a private key is refused whole: whoever read it can
/// sign as its issuer, so neither that key nor the others is trusted.
#[test]
fn a_key_set_publishing_a_private_key_is_refused() {
    let k = keys();
    let (ec, _) = SigningKey::generate(SigningAlgorithm::ES256).unwrap();
    let mut leaked = ec.public_jwk();
    // What `d` holds does not matter: that it is published does.
    leaked["d"] = json!(b64(&[7u8; 32]));
    let e = KeySet::from_jwks_json(&jwks_bytes(&[k.ed.public_jwk(), leaked])).unwrap_err();
    assert!(
        e.to_string().contains("private key material (member `d`)"),
        "{e}"
    );
    for member in ["p", "q", "dp", "dq", "qi", "oth"] {
        let mut rsa = k.ec.public_jwk();
        rsa[member] = json!("AQAB");
        let e = KeySet::from_jwks_json(&jwks_bytes(&[rsa])).unwrap_err();
        assert!(
            e.to_string().contains(&format!("(member `{member}`)")),
            "{e}"
        );
    }
    // The public halves alone load.
    KeySet::from_jwks_json(&jwks_bytes(&[k.ed.public_jwk(), ec.public_jwk()])).unwrap();
}

/// A key set naming a member that serde_json reserves (its `Value` would
/// read the member's string as JSON, with a fresh nesting limit) is read no
/// further: not loaded, not taken as withdrawing keys; and since whether it
/// publishes a private key cannot be told, it is taken to.
#[test]
fn a_key_set_naming_a_reserved_member_is_not_read() {
    let k = keys();
    let mut odd = k.ec.public_jwk();
    odd["x5t"] = json!({"$serde_json::private::RawValue": "\"x\""});
    let doc = jwks_bytes(&[k.ed.public_jwk(), odd]);
    let e = KeySet::from_jwks_json(&doc).unwrap_err();
    assert!(e.to_string().contains("reserves"), "{e}");
    let held = KeySet::from_jwks_json(&jwks_bytes(&[k.ec.public_jwk()])).unwrap();
    assert_eq!(held.still_listed_in(&doc), None);
    assert!(scrip_jose::publishes_private_key(&doc));
    // Text that is no JSON publishes nothing, a backslash in it or not, nor
    // does JSON serde_json does not read (too deep, a lone surrogate, a
    // number out of range) beside a `$`.
    assert!(!scrip_jose::publishes_private_key(br#"{"keys":[{"d":"\"#));
    let deep = format!(
        r#"{{"keys":[],"$x":{}{}}}"#,
        "[".repeat(200),
        "]".repeat(200)
    );
    for unread in [
        deep.as_bytes(),
        br#"{"keys":[{"d":"\ud800"}],"$x":1}"#,
        br#"{"keys":[{"d":"x"}],"$x":1e400}"#,
    ] {
        assert!(!scrip_jose::publishes_private_key(unread));
    }
    assert!(!scrip_jose::publishes_private_key(&jwks_bytes(&[k
        .ec
        .public_jwk()])));
}

/// An Ed25519 key of small order verifies signatures anyone can make (for
/// the identity, `[S]B` with any `S` signs every message): it is skipped,
/// whichever sign bit its encoding carries.
#[test]
fn ed25519_keys_of_small_order_are_skipped() {
    let k = keys();
    let mut identity = [0u8; 32];
    identity[0] = 1;
    let mut order_two = [0xffu8; 32];
    order_two[0] = 0xec;
    order_two[31] = 0x7f;
    let mut order_two_signed = order_two;
    order_two_signed[31] = 0xff;
    for x in [identity, order_two, order_two_signed] {
        let weak =
            json!({"kty": "OKP", "crv": "Ed25519", "kid": "weak", "x": b64(&x), "alg": "EdDSA"});
        let set = KeySet::from_jwks_json(&jwks_bytes(&[weak, k.ed.public_jwk()])).unwrap();
        assert!(!set.contains_kid("weak"), "{x:?}");
        assert!(set.contains_kid(k.ed.kid()));
    }
    // With the identity as the key, a signature that anyone can make
    // verifies: R = [1]B (the base point), S = 1. It finds no key here.
    // The base point's encoding: y = 4/5.
    let mut sig = vec![0x66u8; 32];
    sig[0] = 0x58;
    let mut one = [0u8; 32];
    one[0] = 1;
    sig.extend_from_slice(&one);
    let header = b64(br#"{"alg":"EdDSA","typ":"JWT","kid":"weak"}"#);
    let payload = b64(serde_json::to_vec(&claims()).unwrap().as_slice());
    let forged = format!("{header}.{payload}.{}", b64(&sig));
    let weak =
        json!({"kty": "OKP", "crv": "Ed25519", "kid": "weak", "x": b64(&identity), "alg": "EdDSA"});
    let set = KeySet::from_jwks_json(&jwks_bytes(&[weak, k.ed.public_jwk()])).unwrap();
    let rule = Rule::algorithms(&[Algorithm::EdDSA]);
    assert_eq!(
        check(&forged, &set, &rule.expectations()).unwrap_err(),
        JoseError::UnknownKey
    );
}

#[test]
fn an_unpinned_rsa_key_verifies_one_algorithm_only() {
    // RFC 8725 §3.1: each key is used with exactly one algorithm. An RSA
    // JWK without `alg` takes the first RSA algorithm of the allow-list.
    let (rsa, pkcs8) = SigningKey::generate(SigningAlgorithm::RS256).unwrap();
    let set = key_set(json!({"keys": [without(rsa.public_jwk(), "alg")]}));
    let pair = aws_lc_rs::signature::RsaKeyPair::from_pkcs8(&pkcs8).unwrap();
    let sign = |alg: &str| {
        let header = json!({"alg": alg, "typ": "JWT", "kid": rsa.kid()});
        let input = format!("{}.{}", b64_json(&header), b64_json(&claims()));
        let padding: &'static dyn aws_lc_rs::signature::RsaEncoding = match alg {
            "RS256" => &aws_lc_rs::signature::RSA_PKCS1_SHA256,
            _ => &aws_lc_rs::signature::RSA_PSS_SHA256,
        };
        let mut signature = vec![0; pair.public_modulus_len()];
        pair.sign(
            padding,
            &aws_lc_rs::rand::SystemRandom::new(),
            input.as_bytes(),
            &mut signature,
        )
        .unwrap();
        format!("{input}.{}", b64(&signature))
    };
    let (rs256, ps256) = (sign("RS256"), sign("PS256"));
    let rs_first = Rule::algorithms(&[Algorithm::ES256, Algorithm::RS256, Algorithm::PS256]);
    assert!(check(&rs256, &set, &rs_first.expectations()).is_ok());
    assert_eq!(
        check(&ps256, &set, &rs_first.expectations()).unwrap_err(),
        JoseError::KeyAlgorithmMismatch
    );
    let ps_first = Rule::algorithms(&[Algorithm::PS256, Algorithm::RS256]);
    assert!(check(&ps256, &set, &ps_first.expectations()).is_ok());
    assert_eq!(
        check(&rs256, &set, &ps_first.expectations()).unwrap_err(),
        JoseError::KeyAlgorithmMismatch
    );
}

#[test]
fn keyset_keeps_only_keys_meant_for_verifying() {
    // RFC 7517 §4.2/§4.3: `use` other than `sig` (SPIFFE's `jwt-svid`
    // aside) and `key_ops` without `verify` are not signature keys.
    let k = keys();
    let with_member = |name: &str, value: Value| {
        let mut jwk = k.ed.public_jwk();
        jwk[name] = value;
        KeySet::from_jwks_json(&jwks_bytes(&[jwk, k.ec.public_jwk()]))
            .unwrap()
            .contains_kid(k.ed.kid())
    };
    assert!(with_member("use", json!("sig")));
    assert!(with_member("use", json!("jwt-svid")));
    assert!(with_member("key_ops", json!(["verify"])));
    assert!(with_member("key_ops", json!(["sign", "verify"])));
    assert!(!with_member("use", json!("x509-svid")));
    assert!(!with_member("use", json!("foo")));
    assert!(!with_member("key_ops", json!(["encrypt"])));
    assert!(!with_member("key_ops", json!([])));
}

#[test]
fn keyset_refuses_unusable_documents() {
    let k = keys();
    let mut enc = k.ec.public_jwk();
    enc["use"] = json!("enc");
    let mut twin = k.ed.public_jwk();
    twin["kid"] = json!(k.ec.kid());
    let many: Vec<Value> = (0..65)
        .map(|i| {
            let mut jwk = k.ec.public_jwk();
            jwk["kid"] = json!(format!("k{i}"));
            jwk
        })
        .collect();
    let cases: Vec<(&str, Vec<u8>)> = vec![
        ("no keys", jwks_bytes(&[])),
        ("only an oct key", jwks_bytes(&[oct_key("hmac")])),
        ("only an encryption key", jwks_bytes(&[enc])),
        (
            "duplicate kid",
            jwks_bytes(&[k.ec.public_jwk(), k.ec.public_jwk()]),
        ),
        (
            "duplicate kid, different keys",
            jwks_bytes(&[k.ec.public_jwk(), twin]),
        ),
        ("too many keys", jwks_bytes(&many)),
        ("not a JWKS", br#"{"kty":"EC"}"#.to_vec()),
        ("not JSON", b"<html>".to_vec()),
    ];
    for (name, bytes) in cases {
        match KeySet::from_jwks_json(&bytes) {
            Err(JoseError::Key(_)) => {}
            other => panic!("{name}: want Err(Key(_)), got {other:?}"),
        }
    }
}
