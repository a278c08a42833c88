//! Which action a request is: the method and path of a proxied request
//! mapped to an action class, so that the token's scope and the secret
//! injected follow from what the request does, not from what it claims.
//!
//! Overrides (`[[upstreams.routes]]`) are tried in order; the first whose
//! method (or `*`; for a HEAD, also GET) and path (exact, or a prefix when
//! it ends with `*`) match wins. Otherwise GET and HEAD are `read`, POST,
//! PUT and PATCH `write`, DELETE `delete`; any other method (OPTIONS,
//! TRACE, CONNECT, ...) maps to nothing and is refused.
//!
//! Paths are normalised and checked before mapping ([`normalize`]): a
//! percent-encoded letter is the same URI as the letter (RFC 3986
//! §6.2.2.2), so it is decoded before routes and Cedar see the path; a dot
//! segment, an encoded slash or an empty segment could make the upstream
//! see another path than the one the mapping and Cedar saw, so such a path
//! is refused.

use http::Method;
use scrip_config::Route;
use scrip_token::ActionName;

/// One compiled override.
#[derive(Debug, Clone)]
struct Rule {
    method: Option<Method>,
    path: String,
    prefix: bool,
    action: ActionName,
}

/// The mapping of one upstream.
#[derive(Debug, Clone)]
pub struct ActionMap {
    rules: Vec<Rule>,
    read: ActionName,
    write: ActionName,
    delete: ActionName,
}

/// Why a path is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PathError {
    /// A `.` or `..` segment, plain or percent-encoded.
    #[error("path must not contain `.` or `..` segments")]
    DotSegment,
    /// An encoded `/` or `\`, a backslash, a control character, or a `%`
    /// not followed by two hex digits.
    #[error("path must not contain encoded slashes, backslashes, control characters or stray `%`")]
    Ambiguous,
    /// An empty segment (`//`), which some servers merge with its neighbour.
    #[error("path must not contain empty segments (`//`)")]
    EmptySegment,
    /// An encoded `%` before two hex digits (`%2561`), or before `u` and
    /// four (`%25u002e`, in the `%uXXXX` form some servers decode): an
    /// upstream that decodes twice reads a different path (`%2561dmin` as
    /// `admin`, `%252e%252e` as `..`) from the one the routes and Cedar
    /// decided on.
    #[error(
        "path must not contain double-encoded characters (`%25` before two hex digits, or before `u` and four)"
    )]
    DoubleEncoded,
    /// An escaped control character (`%0A`, `%7F`), escaped bytes that are
    /// not UTF-8 (an overlong `%C0%AE` reads as `.` to a lenient decoder),
    /// or an escaped space at either end of a segment: servers that trim
    /// or decode leniently would route another path (`/admin%0A`,
    /// `/admin%20/users` as `/admin/users`) than the one routes and Cedar
    /// decided on.
    #[error(
        "path must not contain escaped control characters, escapes that are not UTF-8, or an escaped space at either end of a segment"
    )]
    Escape,
    /// A `;`, plain or encoded: servers that take path parameters strip
    /// `;...` from a segment (`/..;/admin` becomes `/../admin`, `/admin;x`
    /// becomes `/admin`), so the upstream would run another path than the
    /// one the routes and Cedar decided on.
    #[error("path must not contain `;` (path parameters), which servers strip differently")]
    Parameter,
}

/// The path in the form the action mapping, Cedar, the audit and the
/// upstream all see: percent-encoded unreserved characters decoded and the
/// remaining escapes in uppercase (RFC 3986 §6.2.2.1, §6.2.2.2), so that
/// `/%61dmin` is `/admin` to the routes as it is to the upstream. Other
/// escapes are kept (an escaped reserved character is another URI, RFC 3986
/// §6.2.2.2); routes and Cedar compare [`match_form`].
///
/// # Errors
/// [`PathError`] for a path the upstream might read differently from scrip
/// (see [`check_path`]) or one with an empty segment.
pub fn normalize(path: &str) -> Result<String, PathError> {
    if !path.is_ascii() {
        return Err(PathError::Ambiguous);
    }
    let bytes = path.as_bytes();
    let mut out = String::with_capacity(path.len());
    let mut i = 0;
    // The escaped bytes of 0x80 and above seen in a row: they must spell
    // UTF-8, checked when the run ends.
    let mut high = Vec::new();
    while let Some(&b) = bytes.get(i) {
        if b != b'%' {
            utf8_run(&mut high)?;
            out.push(char::from(b));
            i += 1;
            continue;
        }
        let hex = |j: usize| bytes.get(j).and_then(|h| char::from(*h).to_digit(16));
        let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
            return Err(PathError::Ambiguous);
        };
        let value = u8::try_from(hi * 16 + lo).map_err(|_| PathError::Ambiguous)?;
        if value.is_ascii_control() {
            return Err(PathError::Escape);
        }
        if value >= 0x80 {
            high.push(value);
        } else {
            utf8_run(&mut high)?;
        }
        if value.is_ascii_alphanumeric() || matches!(value, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(value));
        } else {
            out.push('%');
            out.push_str(&format!("{value:02X}"));
        }
        i += 3;
    }
    utf8_run(&mut high)?;
    if out
        .split('/')
        .any(|s| s.starts_with("%20") || s.ends_with("%20"))
    {
        return Err(PathError::Escape);
    }
    // Checked on the result, where encoded hex digits are digits again:
    // `%25%36%31` is `%2561` to the upstream.
    let canonical = out.as_bytes();
    let double = canonical.windows(5).any(
        |w| matches!(w, [b'%', b'2', b'5', a, b] if a.is_ascii_hexdigit() && b.is_ascii_hexdigit()),
    ) || canonical.windows(8).any(|w| {
        // `%25u002e`: `%u002e` to a server that decodes IIS's `%uXXXX`.
        matches!(w, [b'%', b'2', b'5', b'u' | b'U', rest @ ..] if rest.iter().all(u8::is_ascii_hexdigit))
    });
    if double {
        return Err(PathError::DoubleEncoded);
    }
    check_path(&out)?;
    if out.contains("//") {
        return Err(PathError::EmptySegment);
    }
    Ok(out)
}

/// Refuses a run of escaped bytes that is not UTF-8 (strictly: no
/// overlong forms, no surrogates), and empties it.
fn utf8_run(run: &mut Vec<u8>) -> Result<(), PathError> {
    if run.is_empty() {
        return Ok(());
    }
    let ok = std::str::from_utf8(run).is_ok();
    run.clear();
    if ok { Ok(()) } else { Err(PathError::Escape) }
}

/// The characters whose escapes [`match_form`] decodes: those a segment
/// may hold as they are (RFC 3986 §3.3) and that servers decode to the same
/// character before they route. Not `+` (form decoders read a plain `+` as
/// a space, `%2B` as `+`), `*` (a route's wildcard), `;` (refused) or `/`.
const DECODED_FOR_MATCHING: [(&str, char); 10] = [
    ("%3A", ':'),
    ("%40", '@'),
    ("%21", '!'),
    ("%24", '$'),
    ("%26", '&'),
    ("%27", '\''),
    ("%28", '('),
    ("%29", ')'),
    ("%2C", ','),
    ("%3D", '='),
];

/// A [`normalize`]d path as routes and Cedar compare it: also the escapes
/// of [`DECODED_FOR_MATCHING`] decoded, since the upstream decodes them
/// before it routes (`/v1/items%3Apurge` runs the `/v1/items:purge` a route
/// or policy names). The upstream itself gets the normalised path.
#[must_use]
pub fn match_form(canonical: &str) -> std::borrow::Cow<'_, str> {
    if !canonical.contains('%') {
        return std::borrow::Cow::Borrowed(canonical);
    }
    let mut out = canonical.to_owned();
    for (escape, c) in DECODED_FOR_MATCHING {
        if out.contains(escape) {
            out = out.replace(escape, c.encode_utf8(&mut [0; 4]));
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Refuses a path the upstream might read differently from scrip.
///
/// # Errors
/// [`PathError`] naming the problem.
pub fn check_path(path: &str) -> Result<(), PathError> {
    if path.bytes().any(|b| b == b'\\' || b.is_ascii_control()) {
        return Err(PathError::Ambiguous);
    }
    let lower = path.to_ascii_lowercase();
    if lower.contains("%2f") || lower.contains("%5c") || lower.contains("%00") {
        return Err(PathError::Ambiguous);
    }
    if lower.contains(';') || lower.contains("%3b") {
        return Err(PathError::Parameter);
    }
    for segment in lower.split('/') {
        let decoded = segment.replace("%2e", ".");
        if decoded == "." || decoded == ".." {
            return Err(PathError::DotSegment);
        }
    }
    Ok(())
}

fn action(name: &str) -> Option<ActionName> {
    ActionName::parse(name).ok()
}

impl ActionMap {
    /// Compiles the overrides of one upstream. Route values were checked by
    /// the configuration's validation; a method that does not parse never
    /// matches.
    #[must_use]
    pub fn new(routes: &[Route]) -> Option<Self> {
        let rules = routes
            .iter()
            .map(|r| Rule {
                method: (r.method != "*")
                    .then(|| Method::from_bytes(r.method.as_bytes()).unwrap_or(Method::CONNECT)),
                prefix: r.path.ends_with('*'),
                path: r.path.trim_end_matches('*').to_owned(),
                action: r.action.clone(),
            })
            .collect();
        Some(Self {
            rules,
            read: action("read")?,
            write: action("write")?,
            delete: action("delete")?,
        })
    }

    /// The action of `method path` (path below the upstream, no query), or
    /// `None` when nothing maps it.
    #[must_use]
    pub fn action(&self, method: &Method, path: &str) -> Option<&ActionName> {
        // Methods are case-sensitive to HTTP (RFC 9110 §9.1), but not to
        // every upstream: some frameworks uppercase them, and would run as
        // `DELETE` a `delete` that routes and policies here took for another
        // method. Every method in use is uppercase; others are refused.
        let name = method.as_str();
        if name.bytes().any(|b| b.is_ascii_lowercase()) {
            return None;
        }
        // CONNECT asks for a tunnel (the client drops the path, and logs it
        // with the injected query) and TRACE echoes the request, secret
        // included: neither is a call of the upstream's API, whatever a
        // route for any method says.
        if name == "CONNECT" || name == "TRACE" {
            return None;
        }
        let at = |r: &&Rule| {
            if r.prefix {
                path.starts_with(&r.path)
            } else {
                path == r.path
            }
        };
        // HEAD is GET without the body (RFC 9110 §9.3.2), and servers run
        // the GET handler for it: it takes the first rule, as every request
        // does, of those for any method, for HEAD or for the GET it stands
        // for. So a HEAD is never mapped as a GET would not be unless a
        // rule naming HEAD comes first, and no later rule overrides an
        // earlier one.
        let matched = self.rules.iter().filter(at).find(|r| match &r.method {
            None => true,
            Some(m) if *method == Method::HEAD => *m == Method::HEAD || *m == Method::GET,
            Some(m) => m == method,
        });
        if let Some(rule) = matched {
            return Some(&rule.action);
        }
        match *method {
            Method::GET | Method::HEAD => Some(&self.read),
            Method::POST | Method::PUT | Method::PATCH => Some(&self.write),
            Method::DELETE => Some(&self.delete),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn route(method: &str, path: &str, action: &str) -> Route {
        Route {
            method: method.into(),
            path: path.into(),
            action: ActionName::parse(action).unwrap(),
        }
    }

    fn check(routes: &[Route], method: &str, path: &str, expected: Option<&str>) {
        let map = ActionMap::new(routes).unwrap();
        let m = Method::from_bytes(method.as_bytes()).unwrap();
        assert_eq!(
            map.action(&m, path).map(ActionName::as_str),
            expected,
            "{method} {path}"
        );
    }

    #[test]
    fn default_mapping() {
        check(&[], "GET", "/x", Some("read"));
        check(&[], "HEAD", "/x", Some("read"));
        check(&[], "POST", "/x", Some("write"));
        check(&[], "PUT", "/x", Some("write"));
        check(&[], "PATCH", "/x", Some("write"));
        check(&[], "DELETE", "/x", Some("delete"));
        check(&[], "OPTIONS", "/x", None);
        check(&[], "TRACE", "/x", None);
        check(&[], "PROPFIND", "/x", None);
    }

    #[test]
    fn overrides_first_match_wins() {
        let routes = [
            route("POST", "/search*", "read"),
            route("*", "/admin", "delete"),
            route("*", "/admin/*", "delete"),
        ];
        check(&routes, "POST", "/search", Some("read"));
        check(&routes, "POST", "/search/users", Some("read"));
        check(&routes, "PUT", "/search", Some("write"));
        check(&routes, "GET", "/admin", Some("delete"));
        check(&routes, "GET", "/admin/x", Some("delete"));
        check(&routes, "GET", "/administrator", Some("read"));
        check(&routes, "OPTIONS", "/admin", Some("delete"));
        // A route for any method still leaves no way to a tunnel or an echo.
        check(&routes, "CONNECT", "/admin", None);
        check(&routes, "TRACE", "/admin/x", None);
        check(&routes, "trace", "/admin/x", None);
        check(&routes, "Connect", "/admin", None);
    }

    /// A `delete` is not a `DELETE` here, but an upstream that uppercases
    /// methods runs it as one: whatever a route for any method says, a
    /// method that is not uppercase maps to nothing.
    #[test]
    fn a_method_not_in_uppercase_maps_to_nothing() {
        let routes = [route("*", "/items*", "write")];
        check(&routes, "DELETE", "/items/1", Some("write"));
        for method in ["delete", "Delete", "get", "pOST", "purge"] {
            check(&routes, method, "/items/1", None);
            check(&[], method, "/items/1", None);
        }
        check(&[], "PURGE", "/items/1", None);
    }

    /// A HEAD runs the upstream's GET handler: it takes the first rule for
    /// any method, HEAD or GET, so a read token cannot set off what a GET
    /// rule makes a `delete`, and a later rule naming HEAD does not
    /// override an earlier one for every method.
    #[test]
    fn a_get_rule_decides_head() {
        let routes = [
            route("GET", "/admin/purge*", "delete"),
            route("HEAD", "/status", "write"),
            route("GET", "/*", "read"),
            route("HEAD", "/secret*", "delete"),
            route("*", "/any*", "write"),
        ];
        check(&routes, "HEAD", "/admin/purge", Some("delete"));
        check(&routes, "GET", "/admin/purge/all", Some("delete"));
        check(&routes, "HEAD", "/status", Some("write"));
        check(&routes, "GET", "/status", Some("read"));
        check(&routes, "HEAD", "/other", Some("read"));
        // First match wins: a broader GET rule before a rule naming HEAD
        // decides the HEAD as it decides the GET.
        check(&routes, "HEAD", "/secret/x", Some("read"));
        check(&routes, "GET", "/secret/x", Some("read"));
        // A rule for every method before a rule naming HEAD decides it.
        let routes = [route("*", "/admin*", "delete"), route("HEAD", "/*", "read")];
        check(&routes, "HEAD", "/admin/purge", Some("delete"));
        check(&routes, "HEAD", "/other", Some("read"));
        check(&routes, "GET", "/other", Some("read"));
        // A rule naming HEAD decides it where it comes first.
        let routes = [
            route("HEAD", "/secret*", "delete"),
            route("GET", "/*", "read"),
        ];
        check(&routes, "HEAD", "/secret/x", Some("delete"));
        // With no rule for HEAD or GET there, one for any method applies.
        check(
            &[route("*", "/any*", "write")],
            "HEAD",
            "/anything",
            Some("write"),
        );
    }

    #[test]
    fn paths() {
        let c = |p: &str, want: Result<(), PathError>| assert_eq!(check_path(p), want, "{p}");
        c("/", Ok(()));
        c("/a/b.txt", Ok(()));
        c("/a/..b", Ok(()));
        c("/a/../admin", Err(PathError::DotSegment));
        c("/a/%2e%2E/admin", Err(PathError::DotSegment));
        c("/a/.%2e", Err(PathError::DotSegment));
        c("/./a", Err(PathError::DotSegment));
        c("/..", Err(PathError::DotSegment));
        c("/a%2fb", Err(PathError::Ambiguous));
        c("/a%5Cb", Err(PathError::Ambiguous));
        c("/a\\b", Err(PathError::Ambiguous));
        c("/a%00", Err(PathError::Ambiguous));
        c("/search/..;/admin", Err(PathError::Parameter));
        c("/admin;x=1", Err(PathError::Parameter));
        c("/admin%3bx", Err(PathError::Parameter));
        c("/a.b-c_d~e", Ok(()));
    }

    #[test]
    fn normalised_paths() {
        let n = |p: &str| normalize(p);
        // Encoded unreserved characters are the characters themselves.
        assert_eq!(n("/%61dmin/users"), Ok("/admin/users".into()));
        assert_eq!(n("/%41%2d%5F%7e%30"), Ok("/A-_~0".into()));
        // Escaped reserved characters are kept for the upstream; routes and
        // Cedar see those a server decodes before routing decoded (`:verb`
        // custom methods), but not `+` or `*`.
        assert_eq!(n("/v1/items%3apurge"), Ok("/v1/items%3Apurge".into()));
        assert_eq!(match_form("/v1/items%3Apurge"), "/v1/items:purge");
        assert_eq!(
            match_form(&n("/%40%21%24%26%27%28%29%2A%2B%2C%3D").unwrap()),
            "/@!$&'()%2A%2B,="
        );
        assert_eq!(match_form("/100%25%3A"), "/100%25:");
        // A route naming `:purge` decides the escaped spelling too.
        let routes = [route("POST", "/v1/items:purge", "delete")];
        let canonical = n("/v1/items%3Apurge").unwrap();
        check(&routes, "POST", &match_form(&canonical), Some("delete"));
        assert_eq!(n("/a%3bb"), Err(PathError::Parameter));
        // Other escapes stay, in uppercase; nothing is decoded twice, and
        // what a second decoding would change is refused.
        assert_eq!(n("/a%20b%3f"), Ok("/a%20b%3F".into()));
        assert_eq!(n("/%2561dmin"), Err(PathError::DoubleEncoded));
        assert_eq!(n("/%252e%252E/admin"), Err(PathError::DoubleEncoded));
        assert_eq!(n("/a%252fb"), Err(PathError::DoubleEncoded));
        // The hex digits themselves encoded: decoded here, so refused too.
        assert_eq!(n("/%25%36%31dmin"), Err(PathError::DoubleEncoded));
        assert_eq!(n("/%256%31dmin"), Err(PathError::DoubleEncoded));
        assert_eq!(n("/p/%25%32e%25%32e/admin"), Err(PathError::DoubleEncoded));
        assert_eq!(n("/a%25%32fb"), Err(PathError::DoubleEncoded));
        assert_eq!(n("/100%25"), Ok("/100%25".into()));
        assert_eq!(n("/100%25off"), Ok("/100%25off".into()));
        assert_eq!(n("/%25z1"), Ok("/%25z1".into()));
        // IIS's `%uXXXX`, encoded (its digits too).
        assert_eq!(
            n("/p/%25u002e%25u002e/admin"),
            Err(PathError::DoubleEncoded)
        );
        assert_eq!(n("/p/%25U%30%30%32E"), Err(PathError::DoubleEncoded));
        assert_eq!(n("/100%25up"), Ok("/100%25up".into()));
        assert_eq!(n("/a/b/"), Ok("/a/b/".into()));
        // An encoded dot makes a dot segment; `//` is refused.
        assert_eq!(n("/a/%2E%2e/admin"), Err(PathError::DotSegment));
        assert_eq!(n("/%2e"), Err(PathError::DotSegment));
        assert_eq!(n("//admin"), Err(PathError::EmptySegment));
        assert_eq!(n("/a//b"), Err(PathError::EmptySegment));
        // Stray or broken escapes, encoded slashes, non-ASCII.
        assert_eq!(n("/a%"), Err(PathError::Ambiguous));
        assert_eq!(n("/a%4"), Err(PathError::Ambiguous));
        assert_eq!(n("/a%zz"), Err(PathError::Ambiguous));
        assert_eq!(n("/a%2Fb"), Err(PathError::Ambiguous));
        assert_eq!(n("/é"), Err(PathError::Ambiguous));
        // Escaped controls, escapes that are not UTF-8, and escaped spaces
        // at a segment's end, which servers trim or decode leniently.
        for p in [
            "/admin%0A",
            "/admin%0d%0a",
            "/admin%09",
            "/admin%7F",
            "/a%00",
            "/%C0%AE%C0%AE/admin",
            "/%E0%80%AE",
            "/%ED%A0%80",
            "/a%C3",
            "/a%C3%41",
            "/a%C3/b",
            "/%FF",
            "/admin%20/users",
            "/%20admin",
            "/admin%20",
        ] {
            assert_eq!(n(p), Err(PathError::Escape), "{p}");
        }
        assert_eq!(n("/caf%C3%A9/%E2%82%AC"), Ok("/caf%C3%A9/%E2%82%AC".into()));
        assert_eq!(n("/my%20file.txt"), Ok("/my%20file.txt".into()));
    }
}
