//! A tower layer that admits only requests with a valid scrip access token.
//!
//! It reads `Authorization: Bearer <token>` (RFC 6750 §2.1; the form-body and
//! query forms are not accepted), verifies the token, requires an action when
//! configured, and puts the [`AccessToken`] in the request extensions. A
//! refused request never reaches the inner service; it is answered with:
//!
//! | case | status | `WWW-Authenticate` |
//! |---|---|---|
//! | no bearer credentials | 401 | `Bearer realm="<tool>"` |
//! | a malformed `Authorization` header | 400 | `error="invalid_request"` |
//! | a refused token | 401 | `error="invalid_token"` |
//! | the scope lacks the action | 403 | `error="insufficient_scope", scope="<action>"` |
//! | revocation state stale | 503 | none; `Retry-After` |

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use scrip_token::ActionName;

use crate::{AccessToken, Verifier, VerifyError};

/// Seconds a client is told to wait when the revocation state is stale.
const RETRY_AFTER_SECS: &str = "5";

/// A layer that verifies bearer tokens with a [`Verifier`].
#[derive(Debug, Clone)]
pub struct VerifierLayer {
    verifier: Verifier,
    required: Option<ActionName>,
}

impl VerifierLayer {
    /// Admits any valid token for this tool.
    #[must_use]
    pub fn new(verifier: Verifier) -> Self {
        Self {
            verifier,
            required: None,
        }
    }

    /// Admits only tokens whose scope includes `action`.
    #[must_use]
    pub fn requiring(verifier: Verifier, action: ActionName) -> Self {
        Self {
            verifier,
            required: Some(action),
        }
    }
}

impl<S> tower::Layer<S> for VerifierLayer {
    type Service = VerifierService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        VerifierService {
            inner,
            verifier: self.verifier.clone(),
            required: self.required.clone(),
        }
    }
}

/// The service [`VerifierLayer`] builds.
#[derive(Debug, Clone)]
pub struct VerifierService<S> {
    inner: S,
    verifier: Verifier,
    required: Option<ActionName>,
}

/// Why a request was refused, as an RFC 6750 answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    /// The HTTP status.
    pub status: StatusCode,
    /// The `WWW-Authenticate` challenge, if any.
    pub www_authenticate: Option<String>,
}

/// Keeps only the characters RFC 6750 §3 allows in a quoted value.
fn quoted(s: &str) -> String {
    s.chars()
        .filter(|c| matches!(c, ' ' | '!' | '#'..='[' | ']'..='~'))
        .collect()
}

impl Rejection {
    /// The answer to a request without bearer credentials.
    #[must_use]
    pub fn missing(realm: &str) -> Self {
        Self {
            status: StatusCode::UNAUTHORIZED,
            www_authenticate: Some(format!("Bearer realm=\"{}\"", quoted(realm))),
        }
    }

    /// The answer to a malformed `Authorization` header.
    #[must_use]
    pub fn invalid_request(realm: &str, description: &str) -> Self {
        Self {
            status: StatusCode::BAD_REQUEST,
            www_authenticate: Some(format!(
                "Bearer realm=\"{}\", error=\"invalid_request\", error_description=\"{}\"",
                quoted(realm),
                quoted(description)
            )),
        }
    }

    /// The answer to a refused token.
    #[must_use]
    pub fn from_error(realm: &str, error: &VerifyError) -> Self {
        let realm = quoted(realm);
        let description = quoted(&error.to_string());
        match error {
            VerifyError::InsufficientScope { required } => Self {
                status: StatusCode::FORBIDDEN,
                www_authenticate: Some(format!(
                    "Bearer realm=\"{realm}\", error=\"insufficient_scope\", error_description=\"{description}\", scope=\"{}\"",
                    quoted(required)
                )),
            },
            VerifyError::RevocationStale => Self {
                status: StatusCode::SERVICE_UNAVAILABLE,
                www_authenticate: None,
            },
            VerifyError::Token(_)
            | VerifyError::BadScope
            | VerifyError::Revoked
            | VerifyError::AlreadyUsed => Self {
                status: StatusCode::UNAUTHORIZED,
                www_authenticate: Some(format!(
                    "Bearer realm=\"{realm}\", error=\"invalid_token\", error_description=\"{description}\""
                )),
            },
        }
    }

    /// The HTTP answer, with an empty body.
    #[must_use]
    pub fn into_response<B: Default>(self) -> Response<B> {
        let mut response = Response::new(B::default());
        *response.status_mut() = self.status;
        let headers = response.headers_mut();
        if let Some(challenge) = self
            .www_authenticate
            .and_then(|c| HeaderValue::from_str(&c).ok())
        {
            headers.insert(header::WWW_AUTHENTICATE, challenge);
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            headers.insert(
                header::RETRY_AFTER,
                HeaderValue::from_static(RETRY_AFTER_SECS),
            );
        }
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

/// The bearer token of a request: `Ok(None)` when there are no bearer
/// credentials, `Err` when the header is malformed.
fn bearer(headers: &HeaderMap) -> Result<Option<&str>, &'static str> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err("more than one authorization header");
    }
    let value = value
        .to_str()
        .map_err(|_| "authorization header is not ascii")?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    if !scheme.eq_ignore_ascii_case("bearer") {
        // Another scheme: no bearer credentials at all (RFC 6750 §3.1).
        return Ok(None);
    }
    let token = token.trim_start_matches(' ');
    // b64token (RFC 6750 §2.1).
    let ok = !token.is_empty()
        && token.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'=')
        });
    if ok {
        Ok(Some(token))
    } else {
        Err("bearer token is malformed")
    }
}

/// Verifies a request's bearer token and requires `required`.
///
/// # Errors
/// The RFC 6750 [`Rejection`] to send.
pub(crate) async fn authorize(
    verifier: &Verifier,
    required: Option<&ActionName>,
    headers: &HeaderMap,
) -> Result<AccessToken, Rejection> {
    let realm = verifier.audience();
    let token = match bearer(headers) {
        Ok(Some(token)) => token,
        Ok(None) => return Err(Rejection::missing(realm)),
        Err(why) => return Err(Rejection::invalid_request(realm, why)),
    };
    let result = match required {
        Some(action) => verifier.verify_for(token, action).await,
        None => verifier.verify(token).await,
    };
    result.map_err(|error| {
        tracing::debug!(%error, "request refused");
        Rejection::from_error(realm, &error)
    })
}

impl<S, ReqB, ResB> tower::Service<Request<ReqB>> for VerifierService<S>
where
    S: tower::Service<Request<ReqB>, Response = Response<ResB>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    ReqB: Send + 'static,
    ResB: Default + Send + 'static,
{
    type Response = Response<ResB>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, Self::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: Request<ReqB>) -> Self::Future {
        // The clone is not ready; keep the ready one for this request.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let verifier = self.verifier.clone();
        let required = self.required.clone();
        Box::pin(async move {
            match authorize(&verifier, required.as_ref(), request.headers()).await {
                Ok(token) => {
                    request.extensions_mut().insert(token);
                    inner.call(request).await
                }
                Err(rejection) => Ok(rejection.into_response()),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_bearer(values: &[&str], expected: Result<Option<&str>, &str>) {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        assert_eq!(bearer(&headers), expected, "{values:?}");
    }

    #[test]
    fn reads_bearer_credentials() {
        check_bearer(&[], Ok(None));
        check_bearer(&["Bearer abc.def-ghi_"], Ok(Some("abc.def-ghi_")));
        check_bearer(&["bearer abc"], Ok(Some("abc")));
        check_bearer(&["Basic dXNlcjpwYXNz"], Ok(None));
        check_bearer(&["Bearer"], Err("bearer token is malformed"));
        check_bearer(&["Bearer a b"], Err("bearer token is malformed"));
        check_bearer(&["Bearer a\"b"], Err("bearer token is malformed"));
        check_bearer(
            &["Bearer a", "Bearer b"],
            Err("more than one authorization header"),
        );
    }

    fn check_rejection(error: VerifyError, status: u16, challenge: Option<&str>) {
        let r = Rejection::from_error("git\"hub", &error);
        assert_eq!(r.status.as_u16(), status, "{error:?}");
        assert_eq!(r.www_authenticate.as_deref(), challenge, "{error:?}");
    }

    #[test]
    fn rfc6750_challenges() {
        check_rejection(
            VerifyError::Token(scrip_jose::JoseError::Expired),
            401,
            Some(
                r#"Bearer realm="github", error="invalid_token", error_description="token has expired""#,
            ),
        );
        check_rejection(
            VerifyError::Revoked,
            401,
            Some(
                r#"Bearer realm="github", error="invalid_token", error_description="token has been revoked""#,
            ),
        );
        check_rejection(
            VerifyError::InsufficientScope {
                required: "write".into(),
            },
            403,
            Some(
                r#"Bearer realm="github", error="insufficient_scope", error_description="token scope does not include `write`", scope="write""#,
            ),
        );
        check_rejection(VerifyError::RevocationStale, 503, None);
        assert_eq!(
            Rejection::missing("github").www_authenticate.as_deref(),
            Some(r#"Bearer realm="github""#)
        );
    }
}
