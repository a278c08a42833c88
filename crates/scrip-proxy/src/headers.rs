//! What crosses the proxy in each direction, header by header.
//!
//! Toward the upstream: the agent's credentials (`Authorization`,
//! `Proxy-Authorization`, `Cookie`), forwarding headers a client could forge
//! (`Forwarded`, `X-Forwarded-*`, `X-Real-IP` and the other client-address
//! names, `X-Envoy-*`; see [`STRIPPED_UP`]), the header the secret goes
//! into, `Host` (set from the upstream URL), `Expect`, and hop-by-hop headers
//! (RFC 9110 §7.6.1: `Connection` and every header it names, `Keep-Alive`,
//! `TE`, `Trailer`, `Transfer-Encoding`, `Upgrade`, `Proxy-*`) are dropped;
//! `Accept-Encoding` becomes `identity` so the response can be checked for
//! the secret. Then the secret is injected.
//!
//! Toward the agent: hop-by-hop headers, `Set-Cookie` (an upstream session
//! would be a credential the agent holds), and orders to a server or cache
//! in front of scrip ([`STRIPPED_DOWN`]) are dropped, `Cache-Control` is
//! made `private`, and any value holding the secret is redacted.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Arc, Mutex};

use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use scrip_config::{HOP_BY_HOP, Injection};

use crate::redact::Patterns;
use crate::secrets::SecretValue;

/// Why a request cannot be forwarded.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum InjectError {
    /// The secret cannot be put in a header (checked at `secret set`; a
    /// value stored otherwise is refused here).
    #[error("the secret is not a valid header value")]
    BadValue,
}

fn named_by_connection(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        // Split the raw bytes: one odd byte in the value must not hide the
        // names beside it (RFC 9110 §7.6.1: every one named is removed).
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .filter_map(|name| HeaderName::from_bytes(name.trim_ascii()).ok())
        .collect()
}

fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // RFC 9112 §6.3: a message with both is framed by Transfer-Encoding,
    // and an intermediary must remove the Content-Length, or the next hop
    // would cut the body at a length the sender never meant (hyper frames
    // each hop itself from the body's size).
    if headers.contains_key(header::TRANSFER_ENCODING) {
        headers.remove(header::CONTENT_LENGTH);
    }
    for name in named_by_connection(headers) {
        headers.remove(name);
    }
    for name in HOP_BY_HOP {
        headers.remove(*name);
    }
}

/// The agent's headers that never go up, besides hop-by-hop ones, those
/// of [`STRIPPED_UP_PREFIXES`] and the injection header.
const STRIPPED_UP: [&str; 33] = [
    "authorization",
    "proxy-authorization",
    "cookie",
    "host",
    "expect",
    "forwarded",
    // A part of a representation can hold a piece of the secret that
    // redaction, which looks for whole forms, would not know: pieces
    // fetched one range at a time would spell the key out.
    "range",
    "if-range",
    // The client's address as proxies and CDNs name it: an upstream that
    // trusts its private peers (Rails' `remote_ip` reads `Client-IP`) would
    // take the agent's word for where it calls from.
    "x-real-ip",
    "x-forwarded",
    "forwarded-for",
    "proxy-client-ip",
    "wl-proxy-client-ip",
    "do-connecting-ip",
    "x-appengine-user-ip",
    "cf-pseudo-ipv4",
    "client-ip",
    "true-client-ip",
    "x-client-ip",
    "cf-connecting-ip",
    "fastly-client-ip",
    "x-cluster-client-ip",
    "x-original-forwarded-for",
    "x-originating-ip",
    "x-remote-ip",
    // The agent's proof of possession is for scrip, not the upstream.
    "dpop",
    // The action is what the request does, never what it claims: no
    // header may make the upstream run another method or path.
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-original-url",
    "x-rewrite-url",
    // Replaced by `identity` below.
    "accept-encoding",
    // A body in a character set the agent chose (UTF-16, EBCDIC) would
    // spell the secret in bytes redaction does not look for.
    "accept-charset",
];

/// Prefixes of the agent's headers that never go up: `x-forwarded-*` (a
/// client could forge them; scrip sets none), and `x-envoy-*`, which an
/// Envoy in front of the upstream obeys from a peer it deems internal
/// (retry policy, timeouts, the original path).
const STRIPPED_UP_PREFIXES: [&str; 2] = ["x-forwarded-", "x-envoy-"];

/// The request headers as the upstream gets them, with the secret injected
/// (header and basic injection; query injection is in the URI).
///
/// # Errors
/// [`InjectError`] when the secret cannot be a header value.
pub fn to_upstream(
    mut headers: HeaderMap,
    injection: &Injection,
    secret: &SecretValue,
) -> Result<HeaderMap, InjectError> {
    strip_hop_by_hop(&mut headers);
    // Compared with `_` read as `-`: CGI-style servers (Rack, PHP) turn
    // `X-HTTP-Method_Override` and `X-HTTP-Method-Override` alike into
    // `HTTP_X_HTTP_METHOD_OVERRIDE`.
    let injected = match injection {
        Injection::Header { name, .. } => Some(name.to_ascii_lowercase().replace('_', "-")),
        Injection::Basic { .. } | Injection::Query { .. } => None,
    };
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            let name = k.as_str().replace('_', "-");
            STRIPPED_UP.contains(&name.as_str())
                || STRIPPED_UP_PREFIXES.iter().any(|p| name.starts_with(p))
                || injected.as_deref() == Some(name.as_str())
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
    headers.insert(
        header::ACCEPT_ENCODING,
        HeaderValue::from_static("identity"),
    );
    match injection {
        Injection::Header {
            name,
            prefix,
            suffix,
        } => {
            let name =
                HeaderName::from_bytes(name.as_bytes()).map_err(|_| InjectError::BadValue)?;
            let mut value = zeroize::Zeroizing::new(Vec::with_capacity(
                prefix.len() + secret.expose().len() + suffix.len(),
            ));
            value.extend_from_slice(prefix.as_bytes());
            value.extend_from_slice(secret.expose());
            value.extend_from_slice(suffix.as_bytes());
            let mut value = HeaderValue::from_bytes(&value).map_err(|_| InjectError::BadValue)?;
            value.set_sensitive(true);
            headers.insert(name, value);
        }
        Injection::Basic { username } => {
            let mut value = HeaderValue::from_bytes(&basic_value(username, secret))
                .map_err(|_| InjectError::BadValue)?;
            value.set_sensitive(true);
            headers.insert(header::AUTHORIZATION, value);
        }
        Injection::Query { .. } => {}
    }
    Ok(headers)
}

/// `Basic base64(user:secret)`.
fn basic_value(username: &str, secret: &SecretValue) -> zeroize::Zeroizing<Vec<u8>> {
    let mut out = zeroize::Zeroizing::new(b"Basic ".to_vec());
    out.extend_from_slice(zeroize::Zeroizing::new(basic_token(username, secret)).as_bytes());
    out
}

fn basic_token(username: &str, secret: &SecretValue) -> String {
    use base64::Engine as _;
    let mut pair = zeroize::Zeroizing::new(username.as_bytes().to_vec());
    pair.push(b':');
    pair.extend_from_slice(secret.expose());
    base64::engine::general_purpose::STANDARD.encode(pair.as_slice())
}

/// Percent-encodes a query component (RFC 3986 unreserved kept).
#[must_use]
pub fn query_encode(bytes: &[u8]) -> String {
    // Sized for the worst case: growing would free a buffer that holds part
    // of what is encoded (a secret), unzeroed.
    let mut out = String::with_capacity(bytes.len().saturating_mul(3));
    for &b in bytes {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(b));
        } else {
            // Written in place: `format!` would leave a freed copy.
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// Query parameters that make some frameworks run another method than the
/// request's, in the form [`is_method_override`] compares: Rails, Laravel and
/// Symfony read `_method`; ASP.NET MVC reads `X-HTTP-Method-Override` from
/// the query as well as from the headers, in any case. Dropped, as the
/// method-override headers are, so the upstream runs the method the action
/// was decided on.
const METHOD_OVERRIDES: [&str; 4] = [
    "_method",
    "x_http_method_override",
    "x_http_method",
    "x_method_override",
];

/// A query parameter's name, decoded as the upstream reads it: `api%5Fkey`
/// is `api_key`, and so is `api%255Fkey` for an upstream that decodes twice.
fn decoded_names(pair: &str) -> [Option<String>; 2] {
    let key = pair.split_once('=').map_or(pair, |(k, _)| k);
    let decoded = |k: &str| {
        form_urlencoded::parse(k.as_bytes())
            .next()
            .map(|(k, _)| k.into_owned())
    };
    let once = decoded(key);
    let twice = once
        .as_deref()
        .filter(|k| k.contains('%'))
        .and_then(decoded);
    [once, twice]
}

/// Whether the query pair `pair` names one of `names`, as the upstream
/// reads it ([`decoded_names`], or [`php_name`]).
fn names_one_of(pair: &str, names: &[&str]) -> bool {
    decoded_names(pair)
        .iter()
        .flatten()
        .any(|k| names.contains(&k.as_str()) || names.contains(&php_name(k).as_str()))
}

/// Whether the query pair `pair` is a method override, in any form an
/// upstream reads as one: decoded ([`decoded_names`]), as PHP reads it
/// ([`php_name`]), in any case and with `-` read as `_` (ASP.NET compares
/// without case; `X-HTTP-Method-Override` and `x_http_method_override` are
/// one name to CGI-style servers).
fn is_method_override(pair: &str) -> bool {
    decoded_names(pair).iter().flatten().any(|k| {
        [k.clone(), php_name(k)].iter().any(|n| {
            let n = n.to_ascii_lowercase().replace('-', "_");
            METHOD_OVERRIDES.contains(&n.as_str())
        })
    })
}

/// A parameter name as PHP reads it: cut at a NUL (PHP registers a name
/// with C's `strlen`, so `_method%00x` is `_method`), leading spaces
/// dropped, and `.`, ` ` and `[` (one without its `]`) made `_`, so
/// `.method` is `_method` there.
fn php_name(name: &str) -> String {
    let name = name.split('\0').next().unwrap_or_default();
    let name = name.trim_start_matches(' ');
    let closed = name.find('[').is_some_and(|i| name[i..].contains(']'));
    name.chars()
        .map(|c| match c {
            '.' | ' ' => '_',
            '[' if !closed => '_',
            other => other,
        })
        .collect()
}

/// The agent's query as the upstream gets it: without method overrides
/// ([`is_method_override`]), and for query injection without `param` and
/// with the secret appended as `param`; otherwise unchanged.
#[must_use]
pub fn upstream_query(query: Option<&str>, injection: &Injection, secret: &SecretValue) -> String {
    let Injection::Query { param } = injection else {
        let Some(q) = query else {
            return String::new();
        };
        if !q.split('&').any(is_method_override) {
            return format!("?{q}");
        }
        let kept: Vec<&str> = q
            .split('&')
            .filter(|p| !p.is_empty() && !is_method_override(p))
            .collect();
        return if kept.is_empty() {
            String::new()
        } else {
            format!("?{}", kept.join("&"))
        };
    };
    let encoded_param = query_encode(param.as_bytes());
    let mut out = String::from("?");
    for pair in query.unwrap_or_default().split('&') {
        // The injected parameter replaces every form of the agent's.
        if pair.is_empty() || names_one_of(pair, &[param.as_str()]) || is_method_override(pair) {
            continue;
        }
        out.push_str(pair);
        out.push('&');
    }
    out.push_str(&encoded_param);
    out.push('=');
    // Appended last: `out` may grow here, but what it frees then holds no
    // part of the secret; the encoded copy is zeroed.
    out.push_str(&zeroize::Zeroizing::new(query_encode(secret.expose())));
    out
}

/// The forms redaction looks for, for each of `secrets` (the one injected
/// first, then the upstream's keys for its other actions, which a response
/// may show as well): the form the injection puts on the wire, and the
/// escapings upstreams commonly echo text in: percent-encoding (escapes in
/// either case), JSON (`\/`, `\"`, `\\`) and HTML (`&amp;`, `&lt;`, `&gt;`,
/// `&quot;`, `&#39;`, `&#x27;`).
#[must_use]
pub fn patterns(injection: &Injection, secrets: &[&SecretValue]) -> Patterns {
    let mut forms = Vec::new();
    for secret in secrets {
        let raw = secret.expose();
        // What goes on the wire, and what an upstream may echo of it...
        let mut wire = vec![raw.to_vec()];
        if let Injection::Basic { username } = injection {
            wire.push(basic_token(username, secret).into_bytes());
        }
        let encoded = query_encode(raw);
        wire.push(lowercase_escapes(&encoded).into_bytes());
        // Form encoders write a space as `+`; Python's `quote` leaves `/`.
        wire.push(shorter(&encoded, "%20", "+").into_bytes());
        wire.push(shorter(&encoded, "%2F", "/").into_bytes());
        wire.push(encoded.into_bytes());
        // ...in UTF-16 or UTF-32, from an upstream that answers so without
        // saying it (a declared one is refused: `readable_charset`)...
        let wide: Vec<Vec<u8>> = wire
            .iter()
            .filter_map(|form| std::str::from_utf8(form).ok())
            .flat_map(wide_forms)
            .collect();
        // ...each also as a JSON or HTML encoder escapes it.
        for form in wire {
            for table in ESCAPINGS {
                forms.push(escape(&form, table));
            }
            forms.push(form);
        }
        forms.extend(wide);
    }
    Patterns::new(forms)
}

/// `text` in UTF-16 and UTF-32, each little- and big-endian. Each buffer
/// is sized for the worst case first: one that grew would free a copy of
/// the secret without zeroing it.
fn wide_forms(text: &str) -> [Vec<u8>; 4] {
    let mut units = zeroize::Zeroizing::new(Vec::with_capacity(text.len()));
    units.extend(text.encode_utf16());
    let mut out: [Vec<u8>; 4] = [
        Vec::with_capacity(units.len() * 2),
        Vec::with_capacity(units.len() * 2),
        Vec::with_capacity(text.len() * 4),
        Vec::with_capacity(text.len() * 4),
    ];
    let [le16, be16, le32, be32] = &mut out;
    for u in units.iter() {
        le16.extend(u.to_le_bytes());
        be16.extend(u.to_be_bytes());
    }
    for c in text.chars() {
        le32.extend(u32::from(c).to_le_bytes());
        be32.extend(u32::from(c).to_be_bytes());
    }
    out
}

/// Whether a response's `Content-Type` leaves its body in bytes redaction
/// can read: no charset, or one where ASCII is itself (UTF-8, US-ASCII,
/// ISO 8859, Windows 125x). In any other (UTF-16, UTF-32, UTF-7, EBCDIC)
/// the secret is spelled in other bytes.
#[must_use]
pub fn readable_charset(headers: &HeaderMap) -> bool {
    headers.get_all(header::CONTENT_TYPE).iter().all(|v| {
        v.as_bytes()
            .split(|b| *b == b';')
            .skip(1)
            .filter_map(|param| {
                let (name, value) = param.split_at(param.iter().position(|b| *b == b'=')?);
                name.trim_ascii()
                    .eq_ignore_ascii_case(b"charset")
                    .then(|| value.strip_prefix(b"=").unwrap_or(value).trim_ascii())
            })
            .all(|value| {
                let value = value
                    .strip_prefix(b"\"")
                    .and_then(|v| v.strip_suffix(b"\""))
                    .unwrap_or(value)
                    .to_ascii_lowercase();
                let value = value.as_slice();
                matches!(
                    value,
                    b"utf-8" | b"utf8" | b"us-ascii" | b"ascii" | b"latin1"
                ) || value.starts_with(b"iso-8859-")
                    || value.starts_with(b"windows-125")
            })
    })
}

/// The redaction patterns last built for each `(upstream, action)`, with
/// the very secret values they were built from. With a long key the patterns
/// are hundreds of kilobytes: every response in flight shares one set, and
/// CPU goes into building them only when a value changed (a new version, or
/// [`crate::SecretCache`]'s reread, which opens new values).
#[derive(Default)]
pub struct PatternCache(Mutex<HashMap<(String, String), CachedPatterns>>);

struct CachedPatterns {
    keys: Vec<Arc<SecretValue>>,
    patterns: Arc<Patterns>,
}

impl std::fmt::Debug for PatternCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PatternCache").finish_non_exhaustive()
    }
}

impl PatternCache {
    /// [`patterns`] for a response to `action` at `upstream`, whose injected
    /// key is `secret` and whose keys for its other actions are `others`.
    pub fn get(
        &self,
        upstream: &str,
        action: &str,
        injection: &Injection,
        secret: &Arc<SecretValue>,
        others: &[Arc<SecretValue>],
    ) -> Arc<Patterns> {
        let keys = || std::iter::once(secret).chain(others);
        let same = |c: &CachedPatterns| {
            c.keys.len() == others.len() + 1 && keys().zip(&c.keys).all(|(a, b)| Arc::ptr_eq(a, b))
        };
        let key = (upstream.to_owned(), action.to_owned());
        if let Ok(cache) = self.0.lock()
            && let Some(c) = cache.get(&key).filter(|c| same(c))
        {
            return c.patterns.clone();
        }
        let values: Vec<&SecretValue> = keys().map(AsRef::as_ref).collect();
        let patterns = Arc::new(self::patterns(injection, &values));
        if let Ok(mut cache) = self.0.lock() {
            let keys = keys().cloned().collect();
            let patterns = patterns.clone();
            cache.insert(key, CachedPatterns { keys, patterns });
        }
        patterns
    }
}

/// Byte → escape tables of the escapings redaction looks for (besides
/// percent-encoding): JSON with and without the optional `\/` (PHP writes
/// it), JSON as Go's encoder writes it (`<`, `>`, `&` as lowercase `\u00xx`)
/// and as .NET's does (`"`, `&`, `'`, `+`, `<`, `>`, `` ` `` as uppercase
/// `\u00XX`), HTML with either escape of `'`, and HTML as Go's
/// `html/template` writes it (`"`, `'`, `+` as decimal references).
const ESCAPINGS: [&[(u8, &[u8])]; 7] = [
    &[(b'"', b"\\\""), (b'\\', b"\\\\"), (b'/', b"\\/")],
    &[(b'"', b"\\\""), (b'\\', b"\\\\")],
    &[
        (b'"', b"\\\""),
        (b'\\', b"\\\\"),
        (b'<', b"\\u003c"),
        (b'>', b"\\u003e"),
        (b'&', b"\\u0026"),
    ],
    &[
        (b'"', b"\\u0022"),
        (b'\\', b"\\\\"),
        (b'&', b"\\u0026"),
        (b'\'', b"\\u0027"),
        (b'+', b"\\u002B"),
        (b'<', b"\\u003C"),
        (b'>', b"\\u003E"),
        (b'`', b"\\u0060"),
    ],
    &[
        (b'&', b"&amp;"),
        (b'<', b"&lt;"),
        (b'>', b"&gt;"),
        (b'"', b"&quot;"),
        (b'\'', b"&#39;"),
    ],
    &[
        (b'&', b"&amp;"),
        (b'<', b"&lt;"),
        (b'>', b"&gt;"),
        (b'"', b"&quot;"),
        (b'\'', b"&#x27;"),
    ],
    &[
        (b'&', b"&amp;"),
        (b'<', b"&lt;"),
        (b'>', b"&gt;"),
        (b'"', b"&#34;"),
        (b'\'', b"&#39;"),
        (b'+', b"&#43;"),
    ],
];

/// `raw` with each byte `table` names replaced by its escape.
fn escape(raw: &[u8], table: &[(u8, &[u8])]) -> Vec<u8> {
    // Sized for the longest escape (`\u002B`, `&quot;`): never grown, so no
    // freed buffer holds part of a secret.
    let longest = table.iter().map(|(_, to)| to.len()).max().unwrap_or(1);
    let mut out = Vec::with_capacity(raw.len().saturating_mul(longest));
    for &b in raw {
        match table.iter().find(|(from, _)| *from == b) {
            Some((_, to)) => out.extend_from_slice(to),
            None => out.push(b),
        }
    }
    out
}

/// `s` with every `from` replaced by the shorter `to`, in one buffer of
/// `s`'s length that is never grown (`str::replace` grows its result, and
/// would free buffers holding part of a secret, unzeroed).
fn shorter(s: &str, from: &str, to: &str) -> String {
    // Checked in every build: a longer `to` would grow the buffer.
    assert!(
        to.len() <= from.len(),
        "`shorter` replaces with a shorter form"
    );
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(at) = rest.find(from) {
        out.push_str(rest.get(..at).unwrap_or_default());
        out.push_str(to);
        rest = rest.get(at + from.len()..).unwrap_or_default();
    }
    out.push_str(rest);
    out
}

/// `encoded` with the hex digits of its `%XX` escapes in lowercase.
fn lowercase_escapes(encoded: &str) -> String {
    let mut out = String::with_capacity(encoded.len());
    let mut hex_left = 0;
    for c in encoded.chars() {
        if hex_left > 0 {
            out.push(c.to_ascii_lowercase());
            hex_left -= 1;
        } else {
            if c == '%' {
                hex_left = 2;
            }
            out.push(c);
        }
    }
    out
}

/// Response headers the agent never gets, besides hop-by-hop ones: an
/// upstream session would be a credential in the agent's hands; the
/// sendfile headers are orders to a web server in front of scrip (nginx's
/// `X-Accel-*` is matched as a prefix), which would serve a file or an
/// internal location the upstream names to whoever asked; and the cache
/// headers that a CDN or Varnish obeys in place of `Cache-Control`
/// (RFC 9213's `CDN-Cache-Control` and its `*-CDN-Cache-Control`, matched
/// as a suffix) would let it keep the answer for other clients, whatever
/// [`private_cache_control`] says.
const STRIPPED_DOWN: [&str; 8] = [
    "set-cookie",
    "x-sendfile",
    "x-sendfile2",
    "x-sendfile-temporary",
    "x-lighttpd-send-file",
    "surrogate-control",
    "cdn-cache-control",
    "edge-control",
];

/// The upstream's `Cache-Control` with `private` in it: every proxied
/// response answers a request scrip authorised for one token, and a shared
/// cache in front of scrip (the TLS terminator) may otherwise keep one the
/// upstream marked `public`, `s-maxage` or `must-revalidate` and hand it to
/// other clients, with another token or none (RFC 9111 §3.5). `public` and
/// `s-maxage` go (they would contradict it); `private` comes first, so that
/// no malformed directive before it can hide it; the other directives stay.
fn private_cache_control(headers: &mut HeaderMap) {
    let mut kept = vec!["private"];
    for value in headers.get_all(header::CACHE_CONTROL) {
        let Ok(value) = value.to_str() else {
            continue;
        };
        for directive in directives(value) {
            let name = directive
                .split('=')
                .next()
                .unwrap_or_default()
                .trim()
                .to_ascii_lowercase();
            if !matches!(name.as_str(), "" | "public" | "s-maxage" | "private") {
                kept.push(directive);
            }
        }
    }
    let value = HeaderValue::from_str(&kept.join(", "))
        .unwrap_or_else(|_| HeaderValue::from_static("private, no-store"));
    headers.insert(header::CACHE_CONTROL, value);
}

/// The directives of a `Cache-Control` value, trimmed: split at commas
/// outside quoted strings (`no-cache="a, b"` is one directive). A quoted
/// string left open runs to the end of the value, and that last directive
/// is dropped: a cache could read what follows it as the string's.
fn directives(value: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let (mut start, mut quoted, mut escaped) = (0, false, false);
    for (i, c) in value.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(value[start..i].trim());
                start = i + 1;
            }
            _ => {}
        }
    }
    if !quoted {
        out.push(value[start..].trim());
    }
    out
}

/// The response headers as the agent gets them.
#[must_use]
pub fn to_agent(mut headers: HeaderMap, patterns: &Patterns) -> HeaderMap {
    strip_hop_by_hop(&mut headers);
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|k| {
            let name = k.as_str().replace('_', "-");
            STRIPPED_DOWN.contains(&name.as_str())
                || name.starts_with("x-accel-")
                || name.ends_with("-cdn-cache-control")
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
    private_cache_control(&mut headers);
    let names: Vec<header::HeaderName> = headers.keys().cloned().collect();
    for name in names {
        let values: Vec<HeaderValue> = headers.get_all(&name).iter().cloned().collect();
        if !values
            .iter()
            .any(|v| patterns.redact_header(v.as_bytes()).is_some())
        {
            continue;
        }
        // Every value of the header, each redacted as needed, in order.
        headers.remove(&name);
        for value in values {
            let clean = patterns
                .redact_header(value.as_bytes())
                .map_or(Some(value), |c| HeaderValue::from_bytes(&c).ok());
            if let Some(v) = clean {
                headers.append(name.clone(), v);
            }
        }
    }
    headers
}

#[cfg(test)]
mod tests {
    use super::*;

    fn secret() -> SecretValue {
        SecretValue::from_input(b"k3y/+=".to_vec()).unwrap()
    }

    fn map(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    fn names(h: &HeaderMap) -> Vec<String> {
        let mut v: Vec<String> = h.keys().map(|k| k.to_string()).collect();
        v.sort();
        v
    }

    #[test]
    fn strips_and_injects_toward_the_upstream() {
        let incoming = map(&[
            ("authorization", "Bearer agent-token"),
            ("proxy-authorization", "Basic x"),
            ("cookie", "scrip=1"),
            ("host", "evil"),
            ("connection", "keep-alive, x-private"),
            ("x-private", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
            ("trailer", "x"),
            ("content-length", "4"),
            ("transfer-encoding", "chunked"),
            ("upgrade", "websocket"),
            ("forwarded", "for=1.2.3.4"),
            ("x-forwarded-for", "1.2.3.4"),
            ("x-forwarded-host", "evil"),
            ("x-real-ip", "1.2.3.4"),
            ("x-forwarded", "for=1.2.3.4"),
            ("forwarded-for", "1.2.3.4"),
            ("proxy-client-ip", "1.2.3.4"),
            ("wl-proxy-client-ip", "1.2.3.4"),
            ("do-connecting-ip", "1.2.3.4"),
            ("x-appengine-user-ip", "1.2.3.4"),
            ("cf-pseudo-ipv4", "1.2.3.4"),
            ("client-ip", "1.2.3.4"),
            ("true-client-ip", "1.2.3.4"),
            ("x-client-ip", "1.2.3.4"),
            ("cf-connecting-ip", "1.2.3.4"),
            ("fastly-client-ip", "1.2.3.4"),
            ("x-cluster-client-ip", "1.2.3.4"),
            ("x-original-forwarded-for", "1.2.3.4"),
            ("x-originating-ip", "1.2.3.4"),
            ("x-remote-ip", "1.2.3.4"),
            ("x-envoy-retry-on", "5xx"),
            ("x-envoy-original-path", "/admin"),
            ("accept-encoding", "gzip"),
            ("content-type", "application/json"),
            ("x-api-key", "agent-chosen"),
            ("dpop", "eyJ.proof.sig"),
            ("x-http-method-override", "DELETE"),
            ("x-http-method", "DELETE"),
            ("x-method-override", "DELETE"),
            ("x-original-url", "/admin"),
            ("x-rewrite-url", "/admin"),
            ("x-other-private", "1"),
            // The same names as CGI-style servers read them.
            ("x-http-method_override", "DELETE"),
            ("x_original_url", "/admin"),
            ("x-forwarded_host", "evil"),
            ("client_ip", "1.2.3.4"),
            ("x_envoy_upstream_rq_timeout_ms", "1"),
            ("proxy_authorization", "Basic x"),
            ("x_api_key", "agent-chosen"),
            ("accept_encoding", "gzip"),
        ]);
        // A name beside a byte that is not visible ASCII is still removed.
        let mut incoming = incoming;
        incoming.append(
            header::CONNECTION,
            HeaderValue::from_bytes(b"x-other-private, \x80").unwrap(),
        );
        let injection = Injection::Header {
            name: "x-api-key".into(),
            prefix: "Key ".into(),
            suffix: String::new(),
        };
        let out = to_upstream(incoming.clone(), &injection, &secret()).unwrap();
        assert_eq!(
            names(&out),
            ["accept-encoding", "content-type", "x-api-key"]
        );
        assert_eq!(out["x-api-key"], "Key k3y/+=");
        assert!(out["x-api-key"].is_sensitive());
        assert_eq!(out["accept-encoding"], "identity");

        let basic = Injection::Basic {
            username: "svc".into(),
        };
        let out = to_upstream(incoming, &basic, &secret()).unwrap();
        assert_eq!(out["authorization"], "Basic c3ZjOmszeS8rPQ==");
        assert!(
            out.get("x-api-key").is_some(),
            "only the injection header is replaced"
        );
        // Without Transfer-Encoding the length is the message's own.
        let out = to_upstream(map(&[("content-length", "4")]), &basic, &secret()).unwrap();
        assert_eq!(out["content-length"], "4");
        let out = to_agent(map(&[("content-length", "4")]), &Patterns::default());
        assert_eq!(out["content-length"], "4");
    }

    #[test]
    fn queries() {
        let q = Injection::Query {
            param: "api_key".into(),
        };
        let h = Injection::Header {
            name: "authorization".into(),
            prefix: "Bearer ".into(),
            suffix: String::new(),
        };
        let check = |query: Option<&str>, inj: &Injection, want: &str| {
            assert_eq!(upstream_query(query, inj, &secret()), want, "{query:?}");
        };
        check(None, &h, "");
        check(Some("a=1"), &h, "?a=1");
        // A method override is dropped, in any encoding.
        check(Some("a=1&_method=DELETE&b=2"), &h, "?a=1&b=2");
        check(Some("%5Fmethod=DELETE"), &h, "");
        check(Some("%255Fmethod=PUT&x"), &h, "?x");
        check(Some("_methods=1"), &h, "?_methods=1");
        // As PHP reads names: `.method`, `[method` and ` _method` are `_method`.
        check(Some(".method=DELETE&a=1"), &h, "?a=1");
        check(Some("%2Emethod=DELETE"), &h, "");
        check(Some("%20_method=PUT&b"), &h, "?b");
        check(Some("[method=DELETE"), &h, "");
        check(Some("x[method]=1"), &h, "?x[method]=1");
        // PHP cuts a name at a NUL: `_method%00` and `_method%00x` are
        // `_method` there.
        check(Some("_method%00=DELETE&a=1"), &h, "?a=1");
        check(Some("a&_method%00x=PUT"), &h, "?a");
        check(Some("%255Fmethod%2500=PUT"), &h, "");
        // ASP.NET MVC reads `X-HTTP-Method-Override` from the query too, in
        // any case; CGI-style servers read `_` as `-`.
        check(Some("X-HTTP-Method-Override=DELETE&b=2"), &h, "?b=2");
        check(Some("x-http-method-override=DELETE"), &h, "");
        check(Some("X_HTTP_METHOD_OVERRIDE=DELETE"), &h, "");
        check(Some("x-http-method=PUT&x-method-override=PUT"), &h, "");
        check(Some("X%2DHTTP%2DMethod%2DOverride=DELETE"), &h, "");
        check(Some("_METHOD=DELETE"), &h, "");
        check(
            Some("x-http-method-overrides=1"),
            &h,
            "?x-http-method-overrides=1",
        );
        check(
            Some("X-HTTP-Method-Override=DELETE&api_key=mine"),
            &q,
            "?api_key=k3y%2F%2B%3D",
        );
        check(
            Some("_method=DELETE&api_key=mine"),
            &q,
            "?api_key=k3y%2F%2B%3D",
        );
        check(None, &q, "?api_key=k3y%2F%2B%3D");
        check(
            Some("a=1&api_key=mine&b"),
            &q,
            "?a=1&b&api_key=k3y%2F%2B%3D",
        );
        check(Some("api_key"), &q, "?api_key=k3y%2F%2B%3D");
        check(
            Some("api%5Fkey=mine&api%5fkey=m2&%61pi_key=m3&api_keys=1"),
            &q,
            "?api_keys=1&api_key=k3y%2F%2B%3D",
        );
        // Encoded twice, for an upstream that decodes twice.
        check(
            Some("api%255Fkey=mine&%2561pi%255fkey=m2&api%2525key=x"),
            &q,
            "?api%2525key=x&api_key=k3y%2F%2B%3D",
        );
    }

    #[test]
    fn patterns_are_built_once_for_the_same_keys() {
        let injection = Injection::Header {
            name: "x-api-key".into(),
            prefix: String::new(),
            suffix: String::new(),
        };
        let cache = PatternCache::default();
        let read = Arc::new(secret());
        let write = Arc::new(SecretValue::from_input(b"wr1te-k3y".to_vec()).unwrap());
        let first = cache.get(
            "legacy",
            "read",
            &injection,
            &read,
            std::slice::from_ref(&write),
        );
        assert!(first.found_in(b"x wr1te-k3y y") && first.found_in(b"k3y%2F%2B%3D"));
        // The same values: the same patterns, shared.
        let again = cache.get(
            "legacy",
            "read",
            &injection,
            &read,
            std::slice::from_ref(&write),
        );
        assert!(Arc::ptr_eq(&first, &again));
        // Another action has patterns of its own.
        let other = cache.get(
            "legacy",
            "write",
            &injection,
            &write,
            std::slice::from_ref(&read),
        );
        assert!(!Arc::ptr_eq(&first, &other));
        // A new version of either key (or the same value opened again)
        // builds them anew, and they look for the new value.
        let rotated = Arc::new(SecretValue::from_input(b"n3w-wr1te".to_vec()).unwrap());
        let after = cache.get("legacy", "read", &injection, &read, &[rotated]);
        assert!(!Arc::ptr_eq(&first, &after));
        assert!(after.found_in(b"n3w-wr1te") && !after.found_in(b"wr1te-k3y"));
        let reopened = Arc::new(secret());
        let fresh = cache.get("legacy", "read", &injection, &reopened, &[]);
        assert!(!Arc::ptr_eq(&after, &fresh));
        assert!(fresh.found_in(b"k3y/+=") && !fresh.found_in(b"n3w-wr1te"));
        assert!(Arc::ptr_eq(
            &fresh,
            &cache.get("legacy", "read", &injection, &reopened, &[])
        ));
    }

    #[test]
    fn response_headers() {
        let injection = Injection::Basic {
            username: "svc".into(),
        };
        let s = secret();
        let p = patterns(&injection, &[&s]);
        let out = to_agent(
            map(&[
                ("connection", "close, x-hop"),
                ("x-hop", "1"),
                ("content-length", "4"),
                ("transfer-encoding", "chunked"),
                ("set-cookie", "session=abc"),
                ("set_cookie", "session=abc"),
                ("x-accel-redirect", "/internal/keys"),
                ("x-accel-buffering", "no"),
                ("x-sendfile", "/etc/scrip/keys"),
                ("x-lighttpd-send-file", "/etc/scrip/keys"),
                ("x-sendfile2", "/etc/scrip/keys 0-"),
                ("x-sendfile-temporary", "/etc/scrip/keys"),
                ("surrogate-control", "max-age=600"),
                ("cdn-cache-control", "public, max-age=600"),
                ("cloudflare-cdn-cache-control", "max-age=600"),
                ("edge-control", "cache-maxage=600"),
                ("x-echo", "got k3y/+= from you"),
                ("x-echo-basic", "Basic c3ZjOmszeS8rPQ=="),
                ("content-type", "text/plain"),
            ]),
            &p,
        );
        assert_eq!(
            names(&out),
            ["cache-control", "content-type", "x-echo", "x-echo-basic"]
        );
        assert_eq!(out["cache-control"], "private");
        assert_eq!(out["x-echo"], "got [redacted] from you");
        assert_eq!(out["x-echo-basic"], "Basic [redacted]");

        // A header with several values keeps them all, each redacted alone.
        let mut h = HeaderMap::new();
        for v in ["<a>", "<b> k3y/+=", "<c>"] {
            h.append("link", HeaderValue::from_static(v));
        }
        let out = to_agent(h, &p);
        let links: Vec<&str> = out
            .get_all("link")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(links, ["<a>", "<b> [redacted]", "<c>"]);

        // A value that ends with less than a form's first `threshold`
        // bytes (an echo cut short, or the agent's own guess echoed back)
        // is left as it is; one that ends with that many is masked, with
        // whatever follows them up to a delimiter (see `redact`).
        let out = to_agent(
            map(&[
                ("x-cut", "key k3y/"),
                ("x-cut-escaped", "key=k3y%2F%"),
                ("x-cut-longer", "key=k3y%2F%2 and on"),
                ("x-short", "key k3y"),
            ]),
            &p,
        );
        assert_eq!(out["x-cut"], "key k3y/");
        assert_eq!(out["x-cut-escaped"], "key=k3y%2F%");
        assert_eq!(out["x-cut-longer"], "key=[redacted] and on");
        assert_eq!(out["x-short"], "key k3y");

        // A query key reflected with lowercase escapes is redacted too.
        let q = patterns(
            &Injection::Query {
                param: "api_key".into(),
            },
            &[&s],
        );
        let out = to_agent(
            map(&[
                ("location", "/next?api_key=k3y%2f%2b%3d"),
                ("x-upper", "k3y%2F%2B%3D"),
            ]),
            &q,
        );
        assert_eq!(out["location"], "/next?api_key=[redacted]");
        assert_eq!(out["x-upper"], "[redacted]");
    }

    /// No proxied response may be kept by a shared cache in front of scrip
    /// for other clients: each is made `private`, and the upstream's other
    /// directives stay.
    #[test]
    fn responses_are_private_to_the_agent() {
        let p = Patterns::default();
        let cc = |values: &[&str]| {
            let mut h = HeaderMap::new();
            for v in values {
                h.append(header::CACHE_CONTROL, HeaderValue::from_str(v).unwrap());
            }
            let out = to_agent(h, &p);
            assert_eq!(out.get_all(header::CACHE_CONTROL).iter().count(), 1);
            out[header::CACHE_CONTROL].to_str().unwrap().to_owned()
        };
        assert_eq!(cc(&[]), "private");
        assert_eq!(cc(&["public, max-age=300"]), "private, max-age=300");
        assert_eq!(
            cc(&["Public", "S-MaxAge=600, must-revalidate"]),
            "private, must-revalidate"
        );
        assert_eq!(cc(&["no-store"]), "private, no-store");
        assert_eq!(cc(&["private=\"x-a\", max-age=5"]), "private, max-age=5");
        // A comma in a quoted string does not end a directive.
        assert_eq!(
            cc(&["no-cache=\"set-cookie, x-b\", public"]),
            "private, no-cache=\"set-cookie, x-b\""
        );
        assert_eq!(
            cc(&["no-cache=\"a\\\", public\", max-age=1"]),
            "private, no-cache=\"a\\\", public\", max-age=1"
        );
        // A quoted string left open: what it would swallow is dropped.
        assert_eq!(
            cc(&["max-age=600, must-revalidate, no-cache=\"x"]),
            "private, max-age=600, must-revalidate"
        );
    }

    /// A key echoed the way upstreams escape text (JSON, HTML, a URL), and
    /// the upstream's other keys, are found whatever the injection.
    #[test]
    fn escaped_forms_and_other_keys() {
        let key = SecretValue::from_input(b"k3y/+=&<'\"".to_vec()).unwrap();
        let other = SecretValue::from_input(b"wr1te-k3y".to_vec()).unwrap();
        let p = patterns(
            &Injection::Header {
                name: "x-api-key".into(),
                prefix: String::new(),
                suffix: String::new(),
            },
            &[&key, &other],
        );
        for echoed in [
            r#"{"key":"k3y\/+=&<'\""}"#,
            r#"{"key":"k3y/+=&<'\""}"#,
            "<td>k3y/+=&amp;&lt;&#39;&quot;</td>",
            "<td>k3y/+=&amp;&lt;&#x27;&quot;</td>",
            "next=k3y%2F%2B%3D%26%3C%27%22",
            "next=k3y%2f%2b%3d%26%3c%27%22",
            // Go's encoder, and .NET's.
            r#"{"key":"k3y/+=\u0026\u003c'\""}"#,
            r#"{"key":"k3y/\u002B=\u0026\u003C\u0027\u0022"}"#,
            // Go's html/template; Python's quote, which leaves `/`.
            "<td>k3y/&#43;=&amp;&lt;&#39;&#34;</td>",
            "next=k3y/%2B%3D%26%3C%27%22",
            "wr1te-k3y",
        ] {
            assert!(p.found_in(echoed.as_bytes()), "{echoed}");
        }
        // A space as form encoders write it.
        let spaced = SecretValue::from_input(b"ab c".to_vec()).unwrap();
        let p = patterns(
            &Injection::Header {
                name: "x-api-key".into(),
                prefix: String::new(),
                suffix: String::new(),
            },
            &[&spaced],
        );
        assert!(p.found_in(b"key=ab+c&x=1"));
        assert!(!p.found_in(b"k3y/+= alone"));

        // Basic auth's token as PHP echoes the Authorization header in JSON.
        let basic = SecretValue::from_input(b"k3ya?~~".to_vec()).unwrap();
        let token = basic_token("svc", &basic);
        assert!(token.contains('/'), "{token}");
        let p = patterns(
            &Injection::Basic {
                username: "svc".into(),
            },
            &[&basic],
        );
        let echoed = format!(
            r#"{{"authorization":"Basic {}"}}"#,
            token.replace('/', "\\/")
        );
        assert!(p.found_in(echoed.as_bytes()), "{echoed}");
    }
}

#[cfg(test)]
mod charset_tests {
    use super::*;
    use crate::redact::Redactor;

    /// A key echoed in UTF-16 or UTF-32 (an upstream answering so without
    /// saying it) is masked too, whatever the injection.
    #[test]
    fn a_key_in_utf16_or_utf32_is_masked() {
        let key = SecretValue::from_input(b"k3y-0123456789".to_vec()).unwrap();
        let p = Arc::new(patterns(
            &Injection::Basic {
                username: "svc".into(),
            },
            &[&key],
        ));
        for (name, encode) in [
            (
                "utf-16le",
                (|s: &str| s.encode_utf16().flat_map(u16::to_le_bytes).collect())
                    as fn(&str) -> Vec<u8>,
            ),
            ("utf-16be", |s: &str| {
                s.encode_utf16().flat_map(u16::to_be_bytes).collect()
            }),
            ("utf-32le", |s: &str| {
                s.chars().flat_map(|c| u32::from(c).to_le_bytes()).collect()
            }),
            ("utf-32be", |s: &str| {
                s.chars().flat_map(|c| u32::from(c).to_be_bytes()).collect()
            }),
        ] {
            // The agent's own guess echoed back: past the key's first
            // half, a wrong guess is masked as a right one would be, up to
            // a delimiter (over the NULs between its characters), so it
            // tells nothing.
            {
                let body = encode("you sent k3y-0123X4Y5 to us");
                let mut r = Redactor::new(p.clone());
                let mut out = r.push(&body).to_vec();
                out.extend_from_slice(&r.finish());
                let rest = encode("Y5");
                assert!(
                    !out.windows(rest.len()).any(|w| w == rest.as_slice()),
                    "{name}: a guess showed past the key's first half: {:?}",
                    String::from_utf8_lossy(&out)
                );
                assert!(out.ends_with(&encode("to us")), "{name}");
            }
            for echoed in ["k3y-0123456789", "Basic c3ZjOmszeS0wMTIzNDU2Nzg5"] {
                let body = encode(&format!("you sent {echoed} to us"));
                let mut r = Redactor::new(p.clone());
                let mut out = r.push(&body).to_vec();
                out.extend_from_slice(&r.finish());
                assert_eq!(out.len(), body.len(), "{name}");
                let secret = encode(echoed.trim_start_matches("Basic "));
                assert!(
                    !out.windows(secret.len()).any(|w| w == secret.as_slice()),
                    "{name}: {echoed} went through"
                );
                // The key's span, and at most a byte either side of it (a
                // form in the other byte order is found one byte off).
                assert!(
                    out.starts_with(&encode("you sent")) && out.ends_with(&encode("to us")),
                    "{name}: more than the key was masked: {:?}",
                    String::from_utf8_lossy(&out)
                );
            }
        }
    }

    #[test]
    fn only_ascii_compatible_charsets_are_readable() {
        let with = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::CONTENT_TYPE, HeaderValue::from_str(v).unwrap());
            readable_charset(&h)
        };
        assert!(readable_charset(&HeaderMap::new()));
        for ok in [
            "text/plain",
            "application/json",
            "text/html; charset=utf-8",
            "text/html;charset=UTF-8",
            "text/plain; charset=\"us-ascii\"",
            "text/plain; format=flowed; charset=ISO-8859-15",
            "text/plain; charset=windows-1252",
        ] {
            assert!(with(ok), "{ok}");
        }
        for refused in [
            "text/plain; charset=utf-16",
            "application/json;charset=UTF-16BE",
            "text/plain; charset=\"utf-32le\"",
            "text/plain; charset=utf-7",
            "text/plain; charset=ibm037",
            "text/plain; format=flowed; Charset = UCS-2",
        ] {
            assert!(!with(refused), "{refused}");
        }
    }
}
