//! The token model: what a grant, a scope, a task token and an access token
//! are, as plain data with the parsing that guards them.
//!
//! Everything here is pure (no I/O, no clock, no keys) so that the rules that
//! keep credentials narrow — a derived credential never has more grants, a
//! later expiry or a wider audience than its source — can be tested
//! exhaustively and reused by the server, the verifier and the client.
//!
//! Architecture invariant: a [`Grant`], [`ToolName`] or [`ActionName`] value is
//! always well-formed; the only way to build one from untrusted text is its
//! `parse` function.

mod claims;
mod identity;
mod names;
mod scope;

pub use claims::{
    AccessClaims, Actor, ApprovalClaim, Confirmation, MayAct, TaskClaims, TaskContext,
};
pub use identity::{IdentityKind, ShapeError, WorkloadIdentity};
pub use names::{ActionName, MAX_NAME_LEN, NameError, ToolName};
pub use scope::{ActionSet, Grant, GrantSet, ScopeError};

/// RFC 8693 token type URIs that scrip speaks.
pub mod token_type {
    /// A JWT: a workload identity (subject or actor token).
    pub const JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
    /// A transaction token: scrip's task token.
    pub const TXN_TOKEN: &str = "urn:ietf:params:oauth:token-type:txn_token";
    /// An OAuth access token.
    pub const ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
}

/// The RFC 8693 grant type.
pub const TOKEN_EXCHANGE_GRANT: &str = "urn:ietf:params:oauth:grant-type:token-exchange";

/// The well-known URI suffix of RFC 8414 authorization server metadata.
pub const METADATA_SUFFIX: &str = "/.well-known/oauth-authorization-server";

/// The path component of `issuer` (an absolute URL without query or
/// fragment, as configuration checks it): `""` for `https://a.example`,
/// `/tenant` for `https://a.example/tenant`. A trailing `/` is not part of
/// it.
#[must_use]
pub fn issuer_path(issuer: &str) -> &str {
    let after_scheme = issuer.find("://").map_or(0, |i| i + 3);
    issuer
        .get(after_scheme..)
        .and_then(|rest| rest.find('/'))
        .and_then(|i| issuer.get(after_scheme + i..))
        .unwrap_or("")
        .trim_end_matches('/')
}

/// Where RFC 8414 §3.1 puts `issuer`'s metadata: the well-known suffix
/// inserted between the host and the issuer's path, so
/// `https://a.example/tenant` has it at
/// `https://a.example/.well-known/oauth-authorization-server/tenant`. For
/// an issuer without a path this is the issuer with the suffix appended.
#[must_use]
pub fn metadata_url(issuer: &str) -> String {
    let path = issuer_path(issuer);
    let origin = issuer
        .trim_end_matches('/')
        .strip_suffix(path)
        .unwrap_or(issuer);
    format!("{origin}{METADATA_SUFFIX}{path}")
}

/// JOSE `typ` header values of the tokens scrip signs.
pub mod typ {
    /// Task tokens (shaped like OAuth Transaction Tokens).
    pub const TASK: &str = "txntoken+jwt";
    /// RFC 9068 access tokens.
    pub const ACCESS: &str = "at+jwt";
}

/// Which of scrip's own tokens a verified JWT is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TokenKind {
    /// A task token (`typ` `txntoken+jwt`).
    Task,
    /// An access token (`typ` `at+jwt`).
    Access,
}

impl TokenKind {
    /// The JOSE `typ` header this kind of token carries.
    #[must_use]
    pub fn typ(self) -> &'static str {
        match self {
            Self::Task => typ::TASK,
            Self::Access => typ::ACCESS,
        }
    }

    /// A short lowercase name for logs and audit records.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Task => "task",
            Self::Access => "access",
        }
    }
}

/// Whether `c` changes how the text around it reads on a screen without
/// showing itself: control characters (newlines, escape sequences), the
/// line and paragraph separators, bidirectional-format characters (which
/// reorder what follows, U+061C included) and invisible format characters
/// (zero-width spaces and joiners, the word joiner and invisible operators,
/// the byte-order mark, the soft hyphen, annotation marks, variation
/// selectors, the Hangul fillers, the tag characters that can spell hidden
/// text: Unicode's whole Default_Ignorable_Code_Point set), and the Braille
/// blank U+2800 and the musical null notehead U+1D159, which show as a
/// blank but are not whitespace: runs of them survive trimming and could
/// pad a line to wrap where a person reads it, and one at the end of a
/// branch name in a subject would pass for nothing.
/// Text from an agent or a token holding one could forge or hide a line of
/// what a person reads; such text is refused as an identity or a purpose
/// and escaped when printed ([`escape_deceptive`]).
#[must_use]
pub fn is_deceptive(c: char) -> bool {
    c.is_control()
        || matches!(
            c,
            '\u{00ad}'
                | '\u{034f}'
                | '\u{061c}'
                | '\u{115f}'
                | '\u{1160}'
                | '\u{17b4}'
                | '\u{17b5}'
                | '\u{180b}'..='\u{180f}'
                | '\u{200b}'..='\u{200f}'
                | '\u{2028}'..='\u{202e}'
                | '\u{2060}'..='\u{206f}'
                | '\u{2800}'
                | '\u{3164}'
                | '\u{fe00}'..='\u{fe0f}'
                | '\u{feff}'
                | '\u{ffa0}'
                | '\u{fff0}'..='\u{fffb}'
                | '\u{1bca0}'..='\u{1bca3}'
                | '\u{1d159}'
                | '\u{1d173}'..='\u{1d17a}'
                | '\u{e0000}'..='\u{e0fff}'
        )
}

/// `s` with each [`is_deceptive`] character written as a `\u{..}` escape,
/// for text from an agent that a record or a terminal shows.
#[must_use]
pub fn escape_deceptive(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if is_deceptive(c) {
            out.extend(c.escape_unicode());
        } else {
            out.push(c);
        }
    }
    out
}

/// The expiry of a derived credential: `now + ttl`, but never after the
/// expiry of what it is derived from (invariant 3).
#[must_use]
pub fn derived_expiry(now: u64, ttl: u64, ceiling: u64) -> u64 {
    now.saturating_add(ttl).min(ceiling)
}

#[cfg(test)]
mod deceptive_tests {
    use super::{escape_deceptive, is_deceptive};

    /// Unicode 16's Default_Ignorable_Code_Point ranges
    /// (DerivedCoreProperties.txt): each shows as nothing.
    const DEFAULT_IGNORABLE: &[(char, char)] = &[
        ('\u{00ad}', '\u{00ad}'),
        ('\u{034f}', '\u{034f}'),
        ('\u{061c}', '\u{061c}'),
        ('\u{115f}', '\u{1160}'),
        ('\u{17b4}', '\u{17b5}'),
        ('\u{180b}', '\u{180f}'),
        ('\u{200b}', '\u{200f}'),
        ('\u{202a}', '\u{202e}'),
        ('\u{2060}', '\u{206f}'),
        ('\u{3164}', '\u{3164}'),
        ('\u{fe00}', '\u{fe0f}'),
        ('\u{feff}', '\u{feff}'),
        ('\u{ffa0}', '\u{ffa0}'),
        ('\u{fff0}', '\u{fff8}'),
        ('\u{1bca0}', '\u{1bca3}'),
        ('\u{1d173}', '\u{1d17a}'),
        ('\u{e0000}', '\u{e0fff}'),
    ];

    #[test]
    fn what_shows_as_nothing_or_as_a_blank_that_is_not_a_space_is_deceptive() {
        for &(first, last) in DEFAULT_IGNORABLE {
            for c in first..=last {
                assert!(is_deceptive(c), "U+{:04X}", u32::from(c));
            }
        }
        // Controls, C1 ones too (U+009B opens a terminal's control
        // sequence), the line separators, and the Braille blank.
        for c in [
            '\0', '\n', '\r', '\u{1b}', '\u{7f}', '\u{85}', '\u{9b}', '\u{9d}',
        ] {
            assert!(is_deceptive(c), "U+{:04X}", u32::from(c));
        }
        for c in ['\u{2028}', '\u{2029}', '\u{2800}', '\u{1d159}'] {
            assert!(is_deceptive(c), "U+{:04X}", u32::from(c));
        }
        // What shows as itself does not.
        for c in [
            'a', 'Z', ' ', 'é', '中', '⠁', '🦀', '\u{3000}', '\u{fffd}', '\u{fffc}',
        ] {
            assert!(!is_deceptive(c), "U+{:04X}", u32::from(c));
        }
    }

    #[test]
    fn deceptive_characters_are_written_as_escapes() {
        assert_eq!(
            escape_deceptive("a\u{2800}b\u{9b}1A\u{202e}c é"),
            "a\\u{2800}b\\u{9b}1A\\u{202e}c é"
        );
    }
}

#[cfg(test)]
mod metadata_tests {
    use super::{issuer_path, metadata_url};

    #[test]
    fn the_suffix_goes_between_the_host_and_the_issuers_path() {
        for (issuer, path, url) in [
            (
                "https://a.example",
                "",
                "https://a.example/.well-known/oauth-authorization-server",
            ),
            (
                "http://127.0.0.1:7070",
                "",
                "http://127.0.0.1:7070/.well-known/oauth-authorization-server",
            ),
            (
                "https://a.example/tenant",
                "/tenant",
                "https://a.example/.well-known/oauth-authorization-server/tenant",
            ),
            (
                "https://a.example:8443/a/b",
                "/a/b",
                "https://a.example:8443/.well-known/oauth-authorization-server/a/b",
            ),
            (
                "https://a.example/tenant/",
                "/tenant",
                "https://a.example/.well-known/oauth-authorization-server/tenant",
            ),
            (
                "https://a.example/",
                "",
                "https://a.example/.well-known/oauth-authorization-server",
            ),
        ] {
            assert_eq!(issuer_path(issuer), path, "{issuer}");
            assert_eq!(metadata_url(issuer), url, "{issuer}");
        }
    }
}
