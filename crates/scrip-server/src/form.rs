//! Strict `application/x-www-form-urlencoded` parsing for the OAuth
//! endpoints: the media type is checked, the body is capped, a parameter
//! may appear once, and an empty value counts as absent (RFC 6749 §3.2).

use std::borrow::Cow;
use std::collections::HashMap;

use axum::body::Body;
use axum::http::{HeaderMap, header};

use crate::error::OAuthError;

/// The largest request body accepted.
pub const MAX_BODY: usize = 64 * 1024;

/// How long a request body may take to arrive: a form is a few hundred
/// bytes, and a client that trickles one would hold its connection (and a
/// place under the connection cap) for good.
pub const BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// Parameters that RFC 8693 allows to repeat; scrip still accepts only one
/// and says so precisely.
const MULTI: &[&str] = &["audience", "resource"];

/// The parsed parameters of a form body.
#[derive(Debug, Default)]
pub struct Form {
    params: HashMap<String, String>,
    repeated_multi: Option<String>,
}

impl Form {
    /// Reads and parses a form body.
    ///
    /// # Errors
    /// `invalid_request` on a wrong media type, an oversized or non-UTF-8
    /// body, or a repeated parameter.
    pub async fn read(headers: &HeaderMap, body: Body) -> Result<Self, OAuthError> {
        let content_type = headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let mut parts = content_type.split(';');
        let media = parts.next().map(|v| v.trim().to_ascii_lowercase());
        if media.as_deref() != Some("application/x-www-form-urlencoded") {
            return Err(OAuthError::invalid_request(
                "the request body must be application/x-www-form-urlencoded",
            ));
        }
        // RFC 6749 Appendix B: the form is UTF-8. Text in another charset
        // would be read as UTF-8, other text than the client meant. ASCII
        // reads the same in the charsets built on it (Java's
        // `UrlEncodedFormEntity` labels its forms ISO-8859-1 by default), so
        // with those only a body beyond ASCII is refused; UTF-16 and UTF-32
        // are not built on it, and are refused whatever the body.
        let charset = parts.find_map(|p| {
            let (name, value) = p.split_once('=')?;
            name.trim()
                .eq_ignore_ascii_case("charset")
                .then(|| value.trim().trim_matches('"').to_ascii_lowercase())
        });
        let other_charset = charset
            .as_deref()
            .is_some_and(|c| c != "utf-8" && c != "utf8");
        let not_ascii_based = charset.as_deref().is_some_and(|c| {
            ["utf-16", "utf-32", "ucs-2", "ucs-4", "utf16", "utf32"]
                .iter()
                .any(|w| c.starts_with(w))
        });
        let bytes = tokio::time::timeout(BODY_TIMEOUT, axum::body::to_bytes(body, MAX_BODY))
            .await
            .map_err(|_| {
                OAuthError::invalid_request(format!(
                    "the request body did not arrive within {} s",
                    BODY_TIMEOUT.as_secs()
                ))
            })?
            .map_err(|e| {
                // The limit, or the body itself (its chunked framing
                // broken, the connection gone mid-body).
                let too_large = std::iter::successors(std::error::Error::source(&e), |s| s.source())
                    .any(|s| s.is::<http_body_util::LengthLimitError>());
                OAuthError::invalid_request(if too_large {
                    format!("the request body is larger than {MAX_BODY} bytes")
                } else {
                    "the request body could not be read: it was cut short, or its chunked framing is broken".into()
                })
            })?;
        if not_ascii_based || (other_charset && !decoded_bytes(&bytes).is_ascii()) {
            return Err(OAuthError::invalid_request(
                "the request body must be UTF-8 (charset=utf-8, or no charset)",
            ));
        }
        Self::parse(&bytes)
    }

    /// Parses form bytes.
    ///
    /// # Errors
    /// `invalid_request` on non-UTF-8 input or a repeated parameter.
    pub fn parse(bytes: &[u8]) -> Result<Self, OAuthError> {
        let Ok(body) = std::str::from_utf8(bytes) else {
            return Err(OAuthError::invalid_request("the request body is not UTF-8"));
        };
        let mut form = Self::default();
        for pair in pairs(body) {
            // An escape that is not UTF-8 (`%E9`) would be text the client
            // never sent (a decoder's U+FFFD), reaching the audit trail and
            // the approvers' screens.
            let Some((k, v)) = pair else {
                return Err(OAuthError::invalid_request(
                    "the request body is not UTF-8 once percent-decoded",
                ));
            };
            if v.is_empty() {
                continue;
            }
            if form.params.contains_key(k.as_ref()) {
                if MULTI.contains(&k.as_ref()) {
                    form.repeated_multi = Some(k.into_owned());
                    continue;
                }
                return Err(OAuthError::invalid_request(format!(
                    "parameter `{}` is repeated",
                    short(&k)
                )));
            }
            form.params.insert(k.into_owned(), v.into_owned());
        }
        Ok(form)
    }

    /// An optional parameter.
    #[must_use]
    pub fn get(&self, name: &str) -> Option<&str> {
        self.params.get(name).map(String::as_str)
    }

    /// A required parameter.
    ///
    /// # Errors
    /// `invalid_request` naming the missing parameter.
    pub fn require(&self, name: &str) -> Result<&str, OAuthError> {
        self.get(name)
            .ok_or_else(|| OAuthError::invalid_request(format!("parameter `{name}` is required")))
    }

    /// The name of an `audience` or `resource` parameter given more than once.
    #[must_use]
    pub fn repeated_target(&self) -> Option<&str> {
        self.repeated_multi.as_deref()
    }
}

/// The decoded `(name, value)` pairs of a form body, as
/// `form_urlencoded::parse` gives them, but `None` for a pair whose escapes
/// do not decode to UTF-8 (where the decoder puts U+FFFD). A pair without
/// `%` or `+` decodes to itself, so it is borrowed as it is. Most of a token
/// request is a token, in base64url: one scan here instead of the decoder's
/// three and a copy (BENCHMARKS.md, "Seventh pass").
fn pairs(body: &str) -> impl Iterator<Item = Option<(Cow<'_, str>, Cow<'_, str>)>> {
    body.split('&').filter(|p| !p.is_empty()).map(|pair| {
        let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
        Some((decode(name)?, decode(value)?))
    })
}

/// One name or value decoded as `form_urlencoded` does (`+` is a space,
/// then escapes), `None` when the escapes are not UTF-8.
fn decode(s: &str) -> Option<Cow<'_, str>> {
    if !s.bytes().any(|b| b == b'%' || b == b'+') {
        return Some(Cow::Borrowed(s));
    }
    let spaced = s.replace('+', " ");
    let decoded = percent_encoding::percent_decode_str(&spaced)
        .decode_utf8()
        .ok()?;
    Some(Cow::Owned(decoded.into_owned()))
}

/// `bytes` with every escape decoded.
fn decoded_bytes(bytes: &[u8]) -> Cow<'_, [u8]> {
    percent_encoding::percent_decode(bytes).into()
}

/// A tool or action name a request gave, for an error message: a name as
/// short as a tool's is quoted; anything else (a secret pasted into the
/// wrong parameter) only counted.
#[must_use]
pub fn shown_name(s: &str) -> String {
    if s.len() <= 24 && scrip_token::ToolName::parse(s).is_ok() {
        format!("`{s}`")
    } else {
        format!("(a name of {} characters)", s.chars().count())
    }
}

/// A `resource` for an error message: its scheme and host only, since its
/// path or query may hold a secret.
#[must_use]
pub fn shown_uri(s: &str) -> String {
    let Some((scheme, rest)) = s.split_once("://") else {
        return "(not an absolute URI)".into();
    };
    // Credentials (`user:key@`), wherever the `@` is: none of it is shown.
    if rest.contains('@') {
        return "(a URI with credentials)".into();
    }
    let host = rest
        .split(['/', '?', '#'])
        .next()
        .unwrap_or("")
        .rsplit('@')
        .next()
        .unwrap_or("");
    let plain = |t: &str| {
        !t.is_empty()
            && t.len() <= 255
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b".-:[]".contains(&b))
    };
    if plain(scheme) && plain(host) {
        format!("`{scheme}://{host}/…`")
    } else {
        "(not an absolute URI)".into()
    }
}

/// A parameter value that names a kind of thing (`grant_type`, a token
/// type) for an error message: a URN or a short word is quoted; anything
/// else (a token or key given in the wrong parameter) only counted.
#[must_use]
pub fn shown_value(s: &str) -> String {
    let urn = s.starts_with("urn:")
        && s.len() <= 100
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b":._-".contains(&b));
    let word = s.len() <= 24
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b"_-".contains(&b));
    if urn || word {
        format!("`{s}`")
    } else {
        format!("(a value of {} characters)", s.chars().count())
    }
}

/// A parameter name or value shortened for an error message (which the log
/// also carries), without what would forge or hide a line where it is read
/// ([`scrip_token::is_deceptive`]).
#[must_use]
pub fn short(s: &str) -> String {
    let mut out: String = s
        .chars()
        .filter(|c| !scrip_token::is_deceptive(*c))
        .take(64)
        .collect();
    if s.chars().count() > 64 {
        out.push('…');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A name an unauthenticated client chose reaches the error and the
    /// log without what could reverse or forge the line there.
    #[test]
    fn a_shortened_value_keeps_only_what_shows() {
        assert_eq!(
            short("x\u{202e}=1 client=10.0.0.1\n\u{9b}2K\u{2800}\u{200b}y"),
            "x=1 client=10.0.0.12Ky"
        );
        let long = "a".repeat(70);
        assert_eq!(short(&long), format!("{}…", "a".repeat(64)));
    }

    /// A charset other than UTF-8 is refused, not read as UTF-8.
    #[tokio::test]
    async fn the_form_is_utf8() {
        let read_body = |content_type: &'static str, body: &'static str| async move {
            let mut headers = HeaderMap::new();
            headers.insert(
                header::CONTENT_TYPE,
                axum::http::HeaderValue::from_static(content_type),
            );
            Form::read(&headers, Body::from(body)).await
        };
        let read = |content_type| read_body(content_type, "a=caf%E9");
        let read_ascii = |content_type| read_body(content_type, "a=cafe%21");
        for ok in [
            "application/x-www-form-urlencoded",
            "application/x-www-form-urlencoded; charset=UTF-8",
            "Application/X-WWW-Form-Urlencoded;charset=\"utf-8\"",
        ] {
            // Parsed as UTF-8, where `%E9` alone is not.
            let e = read(ok).await.unwrap_err();
            assert!(
                e.description.contains("once percent-decoded"),
                "{ok}: {}",
                e.description
            );
        }
        for refused in [
            "application/x-www-form-urlencoded; charset=iso-8859-1",
            "application/x-www-form-urlencoded; charset=utf-16",
        ] {
            let e = read(refused).await.unwrap_err();
            assert!(
                e.description.contains("must be UTF-8"),
                "{refused}: {}",
                e.description
            );
        }
        // ASCII reads the same in the charsets built on it; UTF-16 is not.
        let form = read_ascii("application/x-www-form-urlencoded; charset=iso-8859-1")
            .await
            .unwrap();
        assert_eq!(form.get("a"), Some("cafe!"));
        let e = read_ascii("application/x-www-form-urlencoded; charset=utf-16")
            .await
            .unwrap_err();
        assert!(e.description.contains("must be UTF-8"), "{}", e.description);
    }

    #[test]
    fn parses_strictly() {
        let f = Form::parse(b"a=1&b=&c=x%20y").unwrap();
        assert_eq!(f.get("a"), Some("1"));
        assert_eq!(f.get("b"), None);
        assert_eq!(f.get("c"), Some("x y"));
        let e = Form::parse(b"a=1&a=2").unwrap_err();
        assert_eq!(e.code, "invalid_request");
        assert!(e.description.contains("`a` is repeated"));
        let f = Form::parse(b"audience=x&audience=y").unwrap();
        assert_eq!(f.repeated_target(), Some("audience"));
        // Escapes must decode to UTF-8 (RFC 6749 Appendix B).
        let e = Form::parse(b"purpose=caf%E9").unwrap_err();
        assert!(e.description.contains("not UTF-8"), "{}", e.description);
        assert!(Form::parse(b"a%FF=1").is_err());
        // A literal U+FFFD elsewhere does not hide one.
        assert!(Form::parse("x=\u{fffd}&purpose=caf%E9".as_bytes()).is_err());
        // U+FFFD itself, escaped as encoders send it, is text like any.
        assert_eq!(
            Form::parse(b"purpose=fix%20%EF%BF%BD")
                .unwrap()
                .get("purpose"),
            Some("fix \u{fffd}")
        );
        assert_eq!(
            Form::parse(b"a=100%25+sure").unwrap().get("a"),
            Some("100% sure")
        );
        assert_eq!(
            Form::parse(b"purpose=caf%C3%A9").unwrap().get("purpose"),
            Some("café")
        );
        assert!(Form::parse(&[0x61, 0x3d, 0xff]).is_err());
    }

    /// Form bodies of up to 40 pieces: separators, `+` and plain
    /// characters often, escapes (good, bad and lone `%`) and non-ASCII
    /// text less often, so that most bodies have several pairs, some with
    /// an escape and some without.
    fn body() -> impl proptest::strategy::Strategy<Value = String> {
        use proptest::prelude::*;
        let piece = prop_oneof![
            4 => Just("&".to_owned()),
            4 => Just("=".to_owned()),
            4 => Just("+".to_owned()),
            8 => "[a-zA-Z0-9_.~-]",
            1 => Just("%".to_owned()),
            1 => "%[0-9a-fA-F]{2}",
            1 => Just("%ff".to_owned()),
            1 => Just("é".to_owned()),
        ];
        proptest::collection::vec(piece, 0..40).prop_map(|pieces| pieces.concat())
    }

    proptest::proptest! {
        /// The pairs are the decoder's, whatever the body, but for those it
        /// could decode only lossily (the bodies here hold no U+FFFD of
        /// their own), which are refused.
        #[test]
        fn pairs_are_what_the_decoder_gives(body in body()) {
            let ours: Vec<Option<(String, String)>> = pairs(&body)
                .map(|p| p.map(|(k, v)| (k.into_owned(), v.into_owned())))
                .collect();
            let decoder: Vec<(String, String)> = form_urlencoded::parse(body.as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect();
            proptest::prop_assert_eq!(ours.len(), decoder.len());
            for (ours, (k, v)) in ours.into_iter().zip(decoder) {
                let lossy = k.contains('\u{fffd}') || v.contains('\u{fffd}');
                match ours {
                    Some(pair) => {
                        proptest::prop_assert!(!lossy, "took {:?}={:?}", k, v);
                        proptest::prop_assert_eq!(pair, (k, v));
                    }
                    None => proptest::prop_assert!(lossy, "refused {:?}={:?}", k, v),
                }
            }
        }
    }
}
