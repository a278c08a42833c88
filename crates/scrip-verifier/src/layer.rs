//! A tower layer that admits only requests with a valid scrip access token.
//!
//! It reads `Authorization: Bearer <token>` (RFC 6750 §2.1; the form-body and
//! query forms are not accepted) or `Authorization: DPoP <token>` with one
//! `DPoP` proof header (RFC 9449 §7.1), verifies the token (and the proof,
//! for the request's method and [`crate::VerifierConfig::public_url`] plus
//! its path), requires an action when configured, and puts the
//! [`AccessToken`] in the request extensions. A refused request never
//! reaches the inner service; it is answered with:
//!
//! | case | status | `WWW-Authenticate` |
//! |---|---|---|
//! | no credentials | 401 | `Bearer realm="<tool>"`; with `public_url` (DPoP taken), `Bearer realm="<tool>", DPoP realm="<tool>", algs="..."` |
//! | a malformed `Authorization` header | 400 | `error="invalid_request"` |
//! | a refused token | 401 | `error="invalid_token"` |
//! | a refused DPoP proof | 401 | `DPoP ... error="invalid_dpop_proof"` |
//! | the scope lacks the action | 403 | `error="insufficient_scope", scope="<action>"` |
//! | revocation state stale, or keys older than `jwks_max_age` | 503 | none; `Retry-After` |
//!
//! The challenge's scheme is `DPoP` (with `algs`) when the request used
//! DPoP or the token needs it, else `Bearer`; a request without credentials
//! is challenged with both where DPoP-bound tokens are taken.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode, Uri, header};
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
    /// Whether the token was refused after its signature and claims
    /// verified (revoked, used, out of scope, presented without its DPoP
    /// key): scrip issued it. `false` when it never got that far (no or
    /// malformed credentials, a bad signature or claim, keys unavailable),
    /// which anyone can cause.
    pub token_verified: bool,
    /// The claims of that verified token (with [`Rejection::token_verified`]),
    /// to say whose attempt was refused.
    pub claims: Option<Box<scrip_token::AccessClaims>>,
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
            token_verified: false,
            claims: None,
        }
    }

    /// The answer to a request without credentials, to a resource server
    /// that accepts DPoP-bound tokens too (it has a public URL to check
    /// proofs against): both schemes are challenged (RFC 9449 §7.1), so a
    /// client learns that DPoP is taken, and with which algorithms.
    #[must_use]
    pub fn missing_either(realm: &str) -> Self {
        let realm = quoted(realm);
        Self {
            www_authenticate: Some(format!(
                "Bearer realm=\"{realm}\", DPoP realm=\"{realm}\", algs=\"{}\"",
                dpop_algs()
            )),
            ..Self::missing(&realm)
        }
    }

    /// The answer to a malformed `Authorization` header.
    #[must_use]
    pub fn invalid_request(realm: &str, description: &str) -> Self {
        Self::invalid_request_as(realm, description, Scheme::Bearer)
    }

    /// As [`Rejection::invalid_request`], challenging with the scheme the
    /// request used (RFC 9449 §7.1: `DPoP`, with its `algs`, for a `DPoP`
    /// one).
    fn invalid_request_as(realm: &str, description: &str, scheme: Scheme) -> Self {
        let prefix = match scheme {
            Scheme::Bearer => format!("Bearer realm=\"{}\"", quoted(realm)),
            Scheme::Dpop => format!("DPoP realm=\"{}\", algs=\"{}\"", quoted(realm), dpop_algs()),
        };
        Self {
            status: StatusCode::BAD_REQUEST,
            www_authenticate: Some(format!(
                "{prefix}, error=\"invalid_request\", error_description=\"{}\"",
                quoted(description)
            )),
            token_verified: false,
            claims: None,
        }
    }

    /// The answer to a request whose `token`, accepted by
    /// [`Verifier::authenticate`], does not have `action` in its scope: what
    /// [`Verifier::authorize`] answers then (403 `insufficient_scope`,
    /// challenging with `DPoP` for a bound token), naming whose it is.
    #[must_use]
    pub fn scope_lacks(realm: &str, token: &AccessToken, action: &ActionName) -> Self {
        let error = VerifyError::InsufficientScope {
            required: action.to_string(),
        };
        Self::for_token(realm, token, &error)
    }

    /// The answer to a request whose `token` verified but is refused after
    /// all (`error`: its task ended meanwhile, its single use spent),
    /// challenging with the scheme it was presented with (`DPoP` for a
    /// bound token), naming whose it is.
    #[must_use]
    pub fn for_token(realm: &str, token: &AccessToken, error: &VerifyError) -> Self {
        // A bound token was accepted only with `Authorization: DPoP`, an
        // unbound one only without.
        let scheme = if token.claims().cnf.is_some() {
            Scheme::Dpop
        } else {
            Scheme::Bearer
        };
        let mut rejection = Self::challenge(realm, error, scheme);
        rejection.claims = Some(Box::new(token.claims().clone()));
        rejection
    }

    /// The answer to a refused token.
    #[must_use]
    pub fn from_error(realm: &str, error: &VerifyError) -> Self {
        Self::challenge(realm, error, Scheme::Bearer)
    }

    /// The answer to a refused token presented with `scheme`.
    fn challenge(realm: &str, error: &VerifyError, scheme: Scheme) -> Self {
        let scheme = match error {
            VerifyError::ProofRequired | VerifyError::Proof(_) => Scheme::Dpop,
            _ => scheme,
        };
        let prefix = match scheme {
            Scheme::Bearer => format!("Bearer realm=\"{}\"", quoted(realm)),
            Scheme::Dpop => format!("DPoP realm=\"{}\", algs=\"{}\"", quoted(realm), dpop_algs()),
        };
        let description = quoted(&error.to_string());
        // Every other check comes after the token's signature and claims.
        let token_verified = !matches!(error, VerifyError::Token(_) | VerifyError::KeysStale);
        match error {
            VerifyError::InsufficientScope { required } => Self {
                status: StatusCode::FORBIDDEN,
                www_authenticate: Some(format!(
                    "{prefix}, error=\"insufficient_scope\", error_description=\"{description}\", scope=\"{}\"",
                    quoted(required)
                )),
                token_verified,
                claims: None,
            },
            VerifyError::RevocationStale | VerifyError::KeysStale | VerifyError::UseUnconfirmed => {
                Self {
                    status: StatusCode::SERVICE_UNAVAILABLE,
                    www_authenticate: None,
                    token_verified,
                    claims: None,
                }
            }
            VerifyError::Token(_)
            | VerifyError::BadScope
            | VerifyError::Revoked
            | VerifyError::AlreadyUsed
            | VerifyError::ProofRequired
            | VerifyError::NotBound
            | VerifyError::ProofUnchecked
            | VerifyError::Proof(_) => Self {
                status: StatusCode::UNAUTHORIZED,
                www_authenticate: Some(format!(
                    "{prefix}, error=\"{}\", error_description=\"{description}\"",
                    error.rfc6750_code().unwrap_or("invalid_token")
                )),
                token_verified,
                claims: None,
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

/// How a token was presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Scheme {
    /// `Authorization: Bearer` (RFC 6750).
    Bearer,
    /// `Authorization: DPoP`, with a `DPoP` proof (RFC 9449).
    Dpop,
}

/// The algorithms a DPoP proof may use, for a challenge's `algs`.
fn dpop_algs() -> String {
    scrip_jose::dpop::DPOP_ALGORITHMS
        .iter()
        .map(|a| format!("{a:?}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// The token of a request and how it was presented: `Ok(None)` when there
/// are no bearer or DPoP credentials, `Err` when the header is malformed,
/// with the scheme it used when that much could be read.
fn credentials(headers: &HeaderMap) -> Result<Option<(Scheme, &str)>, (Scheme, &'static str)> {
    let mut values = headers.get_all(header::AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(None);
    };
    if values.next().is_some() {
        return Err((Scheme::Bearer, "more than one authorization header"));
    }
    let value = value
        .to_str()
        .map_err(|_| (Scheme::Bearer, "authorization header is not ascii"))?;
    let (scheme, token) = value.split_once(' ').unwrap_or((value, ""));
    let scheme = if scheme.eq_ignore_ascii_case("bearer") {
        Scheme::Bearer
    } else if scheme.eq_ignore_ascii_case("dpop") {
        Scheme::Dpop
    } else {
        // Another scheme: no credentials of ours at all (RFC 6750 §3.1).
        return Ok(None);
    };
    let token = token.trim_start_matches(' ');
    // b64token (RFC 6750 §2.1, RFC 9449 §7.1).
    let ok = !token.is_empty()
        && token.bytes().all(|b| {
            b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'+' | b'/' | b'=')
        });
    if ok {
        Ok(Some((scheme, token)))
    } else {
        Err((scheme, "access token is malformed"))
    }
}

/// The one `DPoP` header of a request (RFC 9449 §4.3 step 1).
fn proof_header(headers: &HeaderMap) -> Result<&str, VerifyError> {
    let mut values = headers.get_all("dpop").iter();
    let proof = match (values.next(), values.next()) {
        (Some(v), None) => v.to_str().ok(),
        (None, _) => return Err(VerifyError::Proof("DPoP proof header is missing".into())),
        (Some(_), Some(_)) => {
            return Err(VerifyError::Proof("more than one DPoP proof header".into()));
        }
    };
    proof.ok_or_else(|| VerifyError::Proof("DPoP proof header is not ascii".into()))
}

/// What a request's token must allow.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Need<'a> {
    /// Nothing in particular: any valid token for the tool (a single-use
    /// one is spent).
    Any,
    /// This action in its scope (a single-use one is spent).
    Action(&'a ActionName),
    /// Nothing, and a single-use token is not spent: the request is
    /// refused for another reason once its caller is known.
    Unspent,
}

/// Verifies a request's token (and DPoP proof) and requires `need`,
/// answering refusals for `realm`.
///
/// # Errors
/// The RFC 6750 (RFC 9449) [`Rejection`] to send.
pub(crate) async fn authorize(
    verifier: &Verifier,
    realm: &str,
    need: Need<'_>,
    method: &Method,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<AccessToken, Rejection> {
    let (scheme, token) = match credentials(headers) {
        Ok(Some(found)) => found,
        Ok(None) if verifier.request_url("").is_some() => {
            return Err(Rejection::missing_either(realm));
        }
        Ok(None) => return Err(Rejection::missing(realm)),
        Err((scheme, why)) => return Err(Rejection::invalid_request_as(realm, why, scheme)),
    };
    // Whether the token was checked at all (a proof header refused, or
    // one that cannot be checked here, stops the request before).
    let mut checked = true;
    let result = match scheme {
        Scheme::Bearer => verifier.check(token, need, None).await,
        Scheme::Dpop => match (proof_header(headers), verifier.request_url(uri.path())) {
            (Err(e), _) => {
                checked = false;
                Err(e)
            }
            (Ok(_), None) => {
                checked = false;
                Err(VerifyError::ProofUnchecked)
            }
            (Ok(proof), Some(url)) => {
                verifier
                    .check(token, need, Some((proof, method.as_str(), &url)))
                    .await
            }
        },
    };
    result.map_err(|error| {
        tracing::debug!(%error, "request refused");
        let mut rejection = Rejection::challenge(realm, &error, scheme);
        rejection.token_verified &= checked;
        if rejection.token_verified {
            rejection.claims = scrip_jose::claims_of_verified(token).map(Box::new);
        }
        rejection
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
            let need = required.as_ref().map_or(Need::Any, Need::Action);
            let found = authorize(
                &verifier,
                verifier.audience(),
                need,
                request.method(),
                request.uri(),
                request.headers(),
            )
            .await;
            match found {
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

    /// Only what anyone can cause without a token scrip issued (a bad
    /// token, keys unavailable) is a refusal of an unverified token; every
    /// other refusal comes after the token verified.
    #[test]
    fn which_refusals_come_after_the_token_verified() {
        let unverified = [
            VerifyError::Token(scrip_jose::JoseError::Malformed("x")),
            VerifyError::KeysStale,
        ];
        let verified = [
            VerifyError::BadScope,
            VerifyError::Revoked,
            VerifyError::AlreadyUsed,
            VerifyError::UseUnconfirmed,
            VerifyError::RevocationStale,
            VerifyError::InsufficientScope {
                required: "write".into(),
            },
            VerifyError::ProofRequired,
            VerifyError::NotBound,
            VerifyError::Proof("x".into()),
            VerifyError::ProofUnchecked,
        ];
        for e in &unverified {
            assert!(!Rejection::from_error("r", e).token_verified, "{e}");
        }
        for e in &verified {
            assert!(Rejection::from_error("r", e).token_verified, "{e}");
        }
        assert!(!Rejection::missing("r").token_verified);
        assert!(!Rejection::invalid_request("r", "x").token_verified);
    }

    fn check_bearer(values: &[&str], expected: Result<Option<&str>, &str>) {
        let mut headers = HeaderMap::new();
        for v in values {
            headers.append(header::AUTHORIZATION, HeaderValue::from_str(v).unwrap());
        }
        let found = credentials(&headers)
            .map(|c| {
                c.map(|(scheme, token)| {
                    assert_eq!(scheme, Scheme::Bearer, "{values:?}");
                    token
                })
            })
            .map_err(|(scheme, why)| {
                assert_eq!(scheme, Scheme::Bearer, "{values:?}");
                why
            });
        assert_eq!(found, expected, "{values:?}");
    }

    #[test]
    fn reads_bearer_credentials() {
        check_bearer(&[], Ok(None));
        check_bearer(&["Bearer abc.def-ghi_"], Ok(Some("abc.def-ghi_")));
        check_bearer(&["bearer abc"], Ok(Some("abc")));
        check_bearer(&["Basic dXNlcjpwYXNz"], Ok(None));
        check_bearer(&["Bearer"], Err("access token is malformed"));
        check_bearer(&["Bearer a b"], Err("access token is malformed"));
        check_bearer(&["Bearer a\"b"], Err("access token is malformed"));
        check_bearer(
            &["Bearer a", "Bearer b"],
            Err("more than one authorization header"),
        );
    }

    #[test]
    fn a_malformed_dpop_request_is_challenged_with_dpop() {
        for value in ["DPoP a b", "dpop a\"b", "DPoP"] {
            let mut headers = HeaderMap::new();
            headers.insert(header::AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            let (scheme, why) = credentials(&headers).unwrap_err();
            assert_eq!(scheme, Scheme::Dpop, "{value}");
            let r = Rejection::invalid_request_as("github", why, scheme);
            assert_eq!(r.status, StatusCode::BAD_REQUEST);
            let challenge = r.www_authenticate.unwrap();
            assert!(
                challenge.starts_with("DPoP realm=\"github\", algs=\"")
                    && challenge.contains("error=\"invalid_request\""),
                "{value}: {challenge}"
            );
        }
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
        assert_eq!(
            Rejection::missing_either("github").www_authenticate,
            Some(format!(
                r#"Bearer realm="github", DPoP realm="github", algs="{}""#,
                dpop_algs()
            ))
        );
        assert_eq!(Rejection::missing_either("github").status, 401);
    }
}
