//! OAuth errors (RFC 6749 §5.2) as HTTP responses.
//!
//! The client sees a code and a lowercase description that says what to fix
//! and never reveals internals; the detail of a server-side failure goes to
//! the log only.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use scrip_store::StoreError;

/// An OAuth error response.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OAuthError {
    /// HTTP status.
    pub status: StatusCode,
    /// The `error` code.
    pub code: &'static str,
    /// The `error_description`.
    pub description: String,
    /// Whether a 401's `WWW-Authenticate` challenge names the error: not
    /// when the request carried no credentials (RFC 6750 §3.1).
    pub challenge_names_error: bool,
    /// Seconds for a `Retry-After` header.
    pub retry_after: Option<u64>,
}

fn lowercase_first(s: String) -> String {
    let mut chars = s.chars();
    match chars.next() {
        Some(c) if c.is_uppercase() => c.to_lowercase().chain(chars).collect(),
        _ => s,
    }
}

/// `s` in the characters RFC 6749 §5.2 allows in an `error_description`
/// (`%x20-21 / %x23-5B / %x5D-7E`): a description often quotes what the
/// client sent, and a control character in it would reach the client's
/// parser and scrip's log lines as it came (a forged line, a terminal
/// escape). `"` becomes `'`, `\` becomes `/`, `…` becomes `...`, and any
/// other character outside the set `?`.
fn printable(s: &str) -> String {
    if s.bytes()
        .all(|b| matches!(b, 0x20..=0x21 | 0x23..=0x5B | 0x5D..=0x7E))
    {
        return s.to_owned();
    }
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            ' '..='!' | '#'..='[' | ']'..='~' => out.push(c),
            '"' => out.push('\''),
            '\\' => out.push('/'),
            '…' => out.push_str("..."),
            _ => out.push('?'),
        }
    }
    out
}

impl OAuthError {
    fn new(status: StatusCode, code: &'static str, description: impl Into<String>) -> Self {
        Self {
            status,
            code,
            description: printable(&lowercase_first(description.into())),
            challenge_names_error: true,
            retry_after: None,
        }
    }

    /// `temporarily_unavailable` (503) with `Retry-After`, saying why.
    pub fn unavailable_for(d: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "temporarily_unavailable",
                d,
            )
        }
    }

    /// `temporarily_unavailable` (429) with `Retry-After`: the caller asked
    /// faster than `[limits]` allows; nothing was issued.
    pub fn too_many(d: impl Into<String>, retry_after: u64) -> Self {
        Self {
            retry_after: Some(retry_after),
            ..Self::new(StatusCode::TOO_MANY_REQUESTS, "temporarily_unavailable", d)
        }
    }

    /// `invalid_token` (401) for a request that carried no credentials:
    /// its challenge names no error (RFC 6750 §3.1).
    pub fn no_credentials(d: impl Into<String>) -> Self {
        Self {
            challenge_names_error: false,
            ..Self::invalid_token(d)
        }
    }

    /// `invalid_request` (400).
    pub fn invalid_request(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request", d)
    }

    /// `invalid_request` (405) for a method the endpoint does not take
    /// (the `Allow` header names those it does).
    pub fn method_not_allowed() -> Self {
        Self::new(
            StatusCode::METHOD_NOT_ALLOWED,
            "invalid_request",
            "this endpoint does not take this method; the Allow header says which it does",
        )
    }

    /// `invalid_scope` (400).
    pub fn invalid_scope(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_scope", d)
    }

    /// `invalid_target` (400, RFC 8693 / RFC 8707).
    pub fn invalid_target(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_target", d)
    }

    /// `access_denied` (400): policy refused.
    pub fn access_denied(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "access_denied", d)
    }

    /// `unsupported_grant_type` (400).
    pub fn unsupported_grant_type(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "unsupported_grant_type", d)
    }

    /// `invalid_token` (401), for a missing or bad caller credential.
    pub fn invalid_token(d: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_token", d)
    }

    /// `invalid_dpop_proof` (400, RFC 9449 §5): the token request's DPoP
    /// proof was refused.
    pub fn invalid_dpop_proof(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_dpop_proof", d)
    }

    /// `invalid_grant` (400): an unknown, used or foreign `auth_req_id`.
    pub fn invalid_grant(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_grant", d)
    }

    /// `authorization_pending` (400): nobody has decided yet.
    pub fn authorization_pending() -> Self {
        Self::authorization_pending_for(
            "waiting for a person's decision; poll again after the interval",
        )
    }

    /// `authorization_pending` (400) saying why the poll is to come again.
    pub fn authorization_pending_for(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "authorization_pending", d)
    }

    /// `slow_down` (400): polled sooner than the interval.
    pub fn slow_down() -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            "slow_down",
            "polled too soon; wait at least the interval between polls",
        )
    }

    /// `expired_token` (400): the approval request expired, saying how.
    pub fn expired_token(d: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "expired_token", d)
    }

    /// `access_denied` (403) for an authenticated caller without the right.
    pub fn forbidden(d: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, "access_denied", d)
    }

    /// `not_found` (404).
    pub fn not_found(d: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", d)
    }

    /// `conflict` (409): the object is not in a state that allows this.
    pub fn conflict(d: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", d)
    }

    /// `temporarily_unavailable` (503): scrip fails closed.
    pub fn temporarily_unavailable() -> Self {
        Self::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "temporarily_unavailable",
            "the token service cannot record decisions right now; nothing was issued; try again shortly",
        )
    }

    /// `server_error` (500): a fault of scrip's, never of the client's.
    pub fn server_error() -> Self {
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "server_error",
            "the token service failed; nothing was issued",
        )
    }
}

impl From<StoreError> for OAuthError {
    fn from(e: StoreError) -> Self {
        if matches!(e, StoreError::ProofUsed) {
            // Not the store's failure: another replica took the request's
            // DPoP proof first (a replayed request).
            return Self::invalid_dpop_proof(format!("the {e}"));
        }
        static FAILED: crate::logs::Budget = crate::logs::Budget::new(10);
        if FAILED.allow("store failure; refusing to issue") {
            tracing::error!(error = %e, "store failure; refusing to issue");
        }
        match e {
            // A record the store refused is a record not written: SPEC's
            // fail-closed answer, as for a store that is down.
            StoreError::Unavailable(_)
            | StoreError::Open(_)
            | StoreError::Refused(_)
            | StoreError::RolledBack(_) => Self::temporarily_unavailable(),
            StoreError::Corrupt(_) | StoreError::Conflict(_) | StoreError::ProofUsed => {
                Self::server_error()
            }
        }
    }
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let body = serde_json::json!({
            "error": self.code,
            "error_description": self.description,
        });
        let mut response = (self.status, axum::Json(body)).into_response();
        let headers = response.headers_mut();
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        headers.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
        if let Some(after) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(after));
        }
        if self.status == StatusCode::UNAUTHORIZED {
            let value = if self.challenge_names_error {
                format!("Bearer realm=\"scrip\", error=\"{}\"", self.code)
            } else {
                "Bearer realm=\"scrip\"".to_owned()
            };
            if let Ok(v) = HeaderValue::from_str(&value) {
                headers.insert(header::WWW_AUTHENTICATE, v);
            }
        }
        response
    }
}

#[cfg(test)]
mod tests {
    use super::OAuthError;

    #[test]
    fn a_description_holds_only_what_rfc_6749_allows() {
        let e = OAuthError::invalid_scope(
            "`\u{1b}[2J\nINFO scrip: forged` is not a grant \"quoted\" \\ \u{202e}é…",
        );
        assert_eq!(
            e.description,
            "`?[2J?INFO scrip: forged` is not a grant 'quoted' / ??..."
        );
        assert!(
            e.description
                .bytes()
                .all(|b| matches!(b, 0x20..=0x21 | 0x23..=0x5B | 0x5D..=0x7E))
        );
        // Text already in the set is kept as it is.
        let plain = "subject_token: token has expired; `scope` must name `tool:action`";
        assert_eq!(OAuthError::invalid_request(plain).description, plain);
    }
}
