//! A verified workload identity: who the agent is.
//!
//! The claims are those of a JWT that already passed verification; this
//! module only reads them. Three shapes are recognised so that policies can
//! use plain attribute names: Kubernetes service-account tokens, GitHub
//! Actions OIDC tokens and SPIFFE JWT-SVIDs. Every scalar claim is also kept
//! as a flat `name -> text` map (nested objects joined with `.`), which the
//! policy engine exposes as Cedar tags.
//!
//! An identity from scrip's own local attestation is built only by
//! [`WorkloadIdentity::from_local_claims`], which the identity verifier calls
//! for tokens of the local issuer: a federated token that happens to carry a
//! `scrip_attestation` claim is never of kind [`IdentityKind::Local`].

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// The deepest nesting of claim objects that is flattened.
const MAX_DEPTH: usize = 4;
/// The most flattened claims kept.
const MAX_CLAIMS: usize = 128;

/// The recognised shape of a workload identity.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentityKind {
    /// A Kubernetes service-account token (`kubernetes.io` claim).
    Kubernetes,
    /// A GitHub Actions OIDC token (`repository` and `workflow` claims).
    GithubActions,
    /// A SPIFFE JWT-SVID (`sub` is a `spiffe://` id).
    Spiffe,
    /// An identity scrip's local attestation issued.
    Local,
    /// Any other JWT.
    Generic,
}

impl IdentityKind {
    /// The lowercase name Cedar sees.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kubernetes => "kubernetes",
            Self::GithubActions => "github_actions",
            Self::Spiffe => "spiffe",
            Self::Local => "local",
            Self::Generic => "jwt",
        }
    }
}

/// A verified workload identity.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct WorkloadIdentity {
    /// The issuer that vouched for it.
    pub issuer: String,
    /// Its subject.
    pub subject: String,
    /// Its recognised shape.
    pub kind: IdentityKind,
    /// Well-known attributes drawn from the claims (`repository`,
    /// `namespace`, `service_account`, `trust_domain`, ...).
    pub attributes: BTreeMap<String, String>,
    /// Every scalar claim, flattened.
    pub claims: BTreeMap<String, String>,
}

/// The longest subject an identity may have, in bytes: the longest SPIFFE
/// ID (SPIFFE-ID §2.3). Subjects are indexed in the store, and a longer one
/// would not fit an index row of PostgreSQL's (about 2.7 KB).
pub const MAX_SUBJECT_BYTES: usize = 2048;

/// Why verified claims are not an identity of their issuer.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ShapeError {
    /// `sub` is missing, not a string, or empty.
    #[error("token has no subject")]
    NoSubject,
    /// `sub` holds control, line-separating, bidirectional-format or
    /// invisible characters ([`crate::is_deceptive`]), which could forge or
    /// hide a line of what an approver or auditor reads.
    #[error("token subject holds control, bidirectional-format or invisible characters")]
    SubjectNotText,
    /// `sub` is longer than [`MAX_SUBJECT_BYTES`].
    #[error("token subject is longer than {MAX_SUBJECT_BYTES} bytes")]
    SubjectTooLong,
    /// The issuer is a SPIFFE issuer and `sub` is no SPIFFE ID of its trust
    /// domain.
    #[error("token subject is not a SPIFFE ID{}", .0.as_deref().map(|d| format!(" in trust domain `{d}`")).unwrap_or_default())]
    NotSpiffe(Option<String>),
    /// More scalar claims than policies are given.
    #[error("token has more than {MAX_CLAIMS} claims")]
    TooManyClaims,
    /// Two claims under one dotted name (`"a.b"` beside `{"a": {"b": ..}}`).
    #[error("token has two claims under one name (a dotted claim name beside a nested claim)")]
    ClaimShadowed,
}

impl WorkloadIdentity {
    /// Reads an identity from verified claims, its kind told by their shape.
    /// `None` when `sub` is missing or empty: an identity must name a
    /// subject.
    #[must_use]
    pub fn from_claims(issuer: &str, claims: &Map<String, Value>) -> Option<Self> {
        Self::from_claims_of(issuer, claims, None, None).ok()
    }

    /// Reads an identity from claims verified for an issuer declared to be
    /// of `kind`: the identity is of that kind whatever the claims look
    /// like, and draws only that kind's attributes, so one issuer's tokens
    /// never pass for another kind's. With `kind` `None` the shape decides,
    /// as [`Self::from_claims`]. A SPIFFE issuer's subject must be a SPIFFE
    /// ID, in `trust_domain` when one is given. [`IdentityKind::Local`] is
    /// never declared: it is read as [`IdentityKind::Generic`].
    ///
    /// # Errors
    /// [`ShapeError`] when `sub` is missing or empty, or not the SPIFFE ID a
    /// SPIFFE issuer must give.
    pub fn from_claims_of(
        issuer: &str,
        claims: &Map<String, Value>,
        kind: Option<IdentityKind>,
        trust_domain: Option<&str>,
    ) -> Result<Self, ShapeError> {
        let subject = claims
            .get("sub")
            .and_then(Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or(ShapeError::NoSubject)?;
        if subject.chars().any(crate::is_deceptive) {
            return Err(ShapeError::SubjectNotText);
        }
        if subject.len() > MAX_SUBJECT_BYTES {
            return Err(ShapeError::SubjectTooLong);
        }
        let mut flat = BTreeMap::new();
        flatten("", claims, 0, &mut flat)?;
        let declared = kind.is_some();
        let kind = match kind {
            None => detect(subject, claims, &flat),
            Some(IdentityKind::Local) => IdentityKind::Generic,
            Some(k) => k,
        };
        if declared && kind == IdentityKind::Spiffe {
            let fits = match (spiffe_id(subject), trust_domain) {
                (Some((d, _)), Some(want)) => d == want,
                (Some(_), None) => true,
                (None, _) => false,
            };
            if !fits {
                return Err(ShapeError::NotSpiffe(trust_domain.map(str::to_owned)));
            }
        }
        let attributes = well_known(kind, subject, claims, &flat);
        Ok(Self {
            issuer: issuer.to_owned(),
            subject: subject.to_owned(),
            kind,
            attributes,
            claims: flat,
        })
    }

    /// Reads an identity that scrip's local attestation issued, from claims
    /// verified against scrip's own keys and local issuer. Its kind is
    /// [`IdentityKind::Local`] and the attributes are those of the
    /// `scrip_attestation` claim (`workload`, `uid`, `gid`, `exe`,
    /// `exe_sha256`). `None` without a subject or that claim.
    #[must_use]
    pub fn from_local_claims(issuer: &str, claims: &Map<String, Value>) -> Option<Self> {
        let subject = claims.get("sub")?.as_str()?;
        if subject.is_empty() || !claims.get(ATTESTATION_CLAIM)?.is_object() {
            return None;
        }
        let mut flat = BTreeMap::new();
        flatten("", claims, 0, &mut flat).ok()?;
        let attributes = well_known(IdentityKind::Local, subject, claims, &flat);
        Some(Self {
            issuer: issuer.to_owned(),
            subject: subject.to_owned(),
            kind: IdentityKind::Local,
            attributes,
            claims: flat,
        })
    }

    /// What tells this identity's token and run apart from others of its
    /// subject, for the audit trail: its `kind`, the token's `jti`, the
    /// well-known attributes, and the claims that name the run (`run_id`,
    /// `run_attempt` and `sha` of GitHub Actions; the pod's `uid` of
    /// Kubernetes, as `pod_uid`; the process of a local identity, as
    /// `pid`). Each value is the issuer's, cut at [`PROVENANCE_CHARS`]
    /// characters (then ending `…`) and its deceptive characters escaped
    /// ([`crate::escape_deceptive`]), so a record stays small and shows
    /// what it holds.
    #[must_use]
    pub fn provenance(&self) -> BTreeMap<String, String> {
        let run: &[(&str, &str)] = match self.kind {
            IdentityKind::GithubActions => &[
                ("run_id", "run_id"),
                ("run_attempt", "run_attempt"),
                ("sha", "sha"),
            ],
            IdentityKind::Kubernetes => &[("pod_uid", "kubernetes.io.pod.uid")],
            IdentityKind::Local => &[("pid", "scrip_attestation.pid")],
            IdentityKind::Spiffe | IdentityKind::Generic => &[],
        };
        let shown = |v: &str| {
            let cut: String = v.chars().take(PROVENANCE_CHARS).collect();
            let mut shown = crate::escape_deceptive(&cut);
            if cut.len() < v.len() {
                shown.push('…');
            }
            shown
        };
        let mut out: BTreeMap<String, String> = self
            .attributes
            .iter()
            .map(|(k, v)| (k.clone(), shown(v)))
            .collect();
        for (to, from) in run.iter().chain(&[("jti", "jti")]) {
            if let Some(v) = self.claims.get(*from) {
                out.insert((*to).to_owned(), shown(v));
            }
        }
        out.insert("kind".into(), self.kind.as_str().into());
        out
    }
}

/// The most characters of one value [`WorkloadIdentity::provenance`] keeps.
pub const PROVENANCE_CHARS: usize = 256;

/// The claim of a local identity that holds what attestation observed.
const ATTESTATION_CLAIM: &str = "scrip_attestation";

/// Flattens `obj` into `out`: every scalar claim under its dotted name.
/// Nothing is dropped silently where a policy could miss it: more than
/// [`MAX_CLAIMS`] scalars, or two claims under one dotted name (`"a.b"`
/// beside `{"a": {"b": ..}}`), refuse the identity, since a `forbid` on a
/// tag must not be escaped by padding or shadowing claims. Arrays, nulls
/// and objects nested deeper than [`MAX_DEPTH`] are not tags at all.
fn flatten(
    prefix: &str,
    obj: &Map<String, Value>,
    depth: usize,
    out: &mut BTreeMap<String, String>,
) -> Result<(), ShapeError> {
    for (k, v) in obj {
        let key = if prefix.is_empty() {
            k.clone()
        } else {
            format!("{prefix}.{k}")
        };
        let text = match v {
            Value::String(s) => s.clone(),
            Value::Number(n) => n.to_string(),
            Value::Bool(b) => b.to_string(),
            Value::Object(inner) if depth < MAX_DEPTH => {
                flatten(&key, inner, depth + 1, out)?;
                continue;
            }
            _ => continue,
        };
        if out.len() >= MAX_CLAIMS {
            return Err(ShapeError::TooManyClaims);
        }
        if out.insert(key, text).is_some() {
            return Err(ShapeError::ClaimShadowed);
        }
    }
    Ok(())
}

/// A Kubernetes claim at `path` inside the `kubernetes.io` object, as
/// Kubernetes nests it. Never a top-level claim whose dotted name flattens
/// to the same tag (`"kubernetes.io.namespace": "agents"`), which a user of
/// another issuer may be able to choose.
fn kubernetes_claim(claims: &Map<String, Value>, path: &[&str]) -> Option<String> {
    let mut at = claims.get("kubernetes.io")?;
    for key in path {
        at = at.as_object()?.get(*key)?;
    }
    at.as_str().map(str::to_owned)
}

/// The trust domain and path of a workload's SPIFFE ID, `None` for anything
/// else (SPIFFE-ID §2): `spiffe://`, a trust domain of lowercase letters,
/// digits, `.`, `-` and `_` (no port, no user info), and a path of one or
/// more segments of letters, digits, `.`, `-` and `_`, none empty, `.` or
/// `..` (no trailing `/`, no percent-encoding, query or fragment). A
/// workload's ID has a path: one without names the trust domain itself.
fn spiffe_id(subject: &str) -> Option<(&str, &str)> {
    let rest = subject.strip_prefix("spiffe://")?;
    let slash = rest.find('/')?;
    let (domain, path) = rest.split_at(slash);
    let domain_ok = !domain.is_empty()
        && domain.bytes().all(|b| {
            b.is_ascii_lowercase() || b.is_ascii_digit() || matches!(b, b'.' | b'-' | b'_')
        });
    let path_ok = path.split('/').skip(1).all(|segment| {
        !segment.is_empty()
            && segment != "."
            && segment != ".."
            && segment
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    });
    (domain_ok && path_ok).then_some((domain, path))
}

fn detect(
    subject: &str,
    raw: &Map<String, Value>,
    claims: &BTreeMap<String, String>,
) -> IdentityKind {
    if kubernetes_claim(raw, &["namespace"]).is_some() {
        IdentityKind::Kubernetes
    } else if claims.contains_key("repository") && claims.contains_key("workflow") {
        IdentityKind::GithubActions
    } else if spiffe_id(subject).is_some() {
        IdentityKind::Spiffe
    } else {
        // Local identities come only from `from_local_claims`: a claim in a
        // federated token must not make it one.
        IdentityKind::Generic
    }
}

fn well_known(
    kind: IdentityKind,
    subject: &str,
    raw: &Map<String, Value>,
    c: &BTreeMap<String, String>,
) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut copy = |to: &str, from: &str| {
        if let Some(v) = c.get(from) {
            out.insert(to.to_owned(), v.clone());
        }
    };
    match kind {
        IdentityKind::Kubernetes => {
            for (to, path) in [
                ("namespace", &["namespace"][..]),
                ("service_account", &["serviceaccount", "name"][..]),
                ("pod", &["pod", "name"][..]),
            ] {
                if let Some(v) = kubernetes_claim(raw, path) {
                    out.insert(to.to_owned(), v);
                }
            }
        }
        IdentityKind::GithubActions => {
            copy("repository", "repository");
            copy("repository_owner", "repository_owner");
            copy("ref", "ref");
            copy("workflow", "workflow");
            copy("actor", "actor");
        }
        IdentityKind::Spiffe => {
            if let Some((domain, path)) = spiffe_id(subject) {
                out.insert("trust_domain".into(), domain.to_owned());
                out.insert("spiffe_path".into(), path.to_owned());
            }
        }
        IdentityKind::Local => {
            for key in ["workload", "uid", "gid", "exe", "exe_sha256"] {
                copy(key, &format!("{ATTESTATION_CLAIM}.{key}"));
            }
        }
        IdentityKind::Generic => {}
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn identity(claims: Value) -> WorkloadIdentity {
        let Value::Object(map) = claims else {
            panic!("not an object")
        };
        WorkloadIdentity::from_claims("https://issuer", &map).unwrap()
    }

    #[test]
    fn kubernetes() {
        let id = identity(json!({
            "sub": "system:serviceaccount:agents:coder",
            "kubernetes.io": {"namespace": "agents", "serviceaccount": {"name": "coder", "uid": "u1"},
                              "pod": {"name": "coder-7d9", "uid": "p1"}}
        }));
        assert_eq!(id.kind, IdentityKind::Kubernetes);
        assert_eq!(id.attributes["namespace"], "agents");
        assert_eq!(id.attributes["service_account"], "coder");
        assert_eq!(id.claims["kubernetes.io.pod.uid"], "p1");
    }

    #[test]
    fn github_actions() {
        let id = identity(json!({
            "sub": "repo:acme/web:ref:refs/heads/main", "repository": "acme/web",
            "repository_owner": "acme", "workflow": "ci", "ref": "refs/heads/main", "run_id": 42
        }));
        assert_eq!(id.kind, IdentityKind::GithubActions);
        assert_eq!(id.attributes["repository"], "acme/web");
        assert_eq!(id.claims["run_id"], "42");
    }

    /// The record of an identity tells its token and its run apart from
    /// others of its subject, each value shown as it can be read and
    /// bounded; another kind's run claims are not drawn.
    #[test]
    fn provenance_names_the_token_and_the_run() {
        let github = identity(json!({
            "sub": "repo:acme/web:ref:refs/heads/main", "repository": "acme/web",
            "workflow": "ci", "ref": "refs/heads/\u{202e}niam", "run_id": 42,
            "run_attempt": "2", "sha": "5f3a", "jti": "j-1", "pod": "nope"
        }));
        let p = github.provenance();
        assert_eq!(p["kind"], "github_actions");
        assert_eq!(p["jti"], "j-1");
        assert_eq!(p["run_id"], "42");
        assert_eq!(p["run_attempt"], "2");
        assert_eq!(p["sha"], "5f3a");
        assert_eq!(p["repository"], "acme/web");
        assert_eq!(p["ref"], "refs/heads/\\u{202e}niam");
        assert!(!p.contains_key("pod"), "{p:?}");

        let kube = identity(json!({
            "sub": "system:serviceaccount:agents:coder", "run_id": "7",
            "kubernetes.io": {"namespace": "agents", "serviceaccount": {"name": "coder"},
                              "pod": {"name": "coder-7d9", "uid": "p1"}}
        }));
        let p = kube.provenance();
        assert_eq!(p["kind"], "kubernetes");
        assert_eq!(p["pod"], "coder-7d9");
        assert_eq!(p["pod_uid"], "p1");
        assert!(!p.contains_key("run_id") && !p.contains_key("jti"), "{p:?}");

        // Cut, then escaped: an escape is never cut in two.
        let edge = format!("{}\u{202e}b", "a".repeat(PROVENANCE_CHARS - 1));
        let p = identity(json!({"sub": "svc", "jti": edge})).provenance();
        assert_eq!(
            p["jti"],
            format!("{}\\u{{202e}}…", "a".repeat(PROVENANCE_CHARS - 1))
        );
        let long = "x".repeat(PROVENANCE_CHARS + 1);
        let generic = identity(json!({"sub": "svc", "jti": long, "run_id": "7"}));
        let p = generic.provenance();
        assert_eq!(p.len(), 2, "{p:?}");
        assert_eq!(p["kind"], "jwt");
        assert_eq!(p["jti"], format!("{}…", &long[..PROVENANCE_CHARS]));
    }

    #[test]
    fn spiffe() {
        let id = identity(json!({"sub": "spiffe://prod.acme.com/ns/agents/sa/coder"}));
        assert_eq!(id.kind, IdentityKind::Spiffe);
        assert_eq!(id.attributes["trust_domain"], "prod.acme.com");
        assert_eq!(id.attributes["spiffe_path"], "/ns/agents/sa/coder");
    }

    #[test]
    fn local_only_through_its_constructor() {
        let claims = json!({
            "sub": "local:coder",
            "scrip_attestation": {"workload": "coder", "uid": 1000, "gid": 1000, "pid": 42,
                                  "exe": "/usr/bin/agent", "exe_sha256": "ab12"}
        });
        // A federated token carrying the claim is not a local identity.
        let federated = identity(claims.clone());
        assert_eq!(federated.kind, IdentityKind::Generic);
        assert!(federated.attributes.is_empty());

        let Value::Object(map) = claims else { panic!() };
        let id = WorkloadIdentity::from_local_claims("http://scrip/local", &map).unwrap();
        assert_eq!(id.kind, IdentityKind::Local);
        assert_eq!(id.kind.as_str(), "local");
        for (k, v) in [
            ("workload", "coder"),
            ("uid", "1000"),
            ("gid", "1000"),
            ("exe", "/usr/bin/agent"),
            ("exe_sha256", "ab12"),
        ] {
            assert_eq!(id.attributes[k], v, "{k}");
        }
        assert!(!id.attributes.contains_key("pid"));
        assert_eq!(id.claims["scrip_attestation.pid"], "42");

        let Value::Object(map) = json!({"sub": "local:x"}) else {
            panic!()
        };
        assert!(WorkloadIdentity::from_local_claims("i", &map).is_none());
    }

    fn of(
        claims: Value,
        kind: IdentityKind,
        trust_domain: Option<&str>,
    ) -> Result<WorkloadIdentity, ShapeError> {
        let Value::Object(map) = claims else {
            panic!("not an object")
        };
        WorkloadIdentity::from_claims_of("https://issuer", &map, Some(kind), trust_domain)
    }

    #[test]
    fn a_declared_kind_wins_over_the_claims_shape() {
        let kube_shaped = json!({
            "sub": "system:serviceaccount:agents:coder",
            "kubernetes.io": {"namespace": "agents", "serviceaccount": {"name": "coder"}},
            "repository": "acme/web", "workflow": "ci"
        });
        // An issuer of any other kind never yields a namespace.
        let generic = of(kube_shaped.clone(), IdentityKind::Generic, None).unwrap();
        assert_eq!(generic.kind, IdentityKind::Generic);
        assert!(generic.attributes.is_empty(), "{:?}", generic.attributes);
        assert_eq!(generic.claims["kubernetes.io.namespace"], "agents");
        let github = of(kube_shaped.clone(), IdentityKind::GithubActions, None).unwrap();
        assert_eq!(github.kind, IdentityKind::GithubActions);
        assert_eq!(github.attributes["repository"], "acme/web");
        assert!(!github.attributes.contains_key("namespace"));
        // A GitHub-shaped token from a Kubernetes issuer has no repository.
        let kube = of(kube_shaped, IdentityKind::Kubernetes, None).unwrap();
        assert_eq!(kube.attributes["namespace"], "agents");
        assert!(!kube.attributes.contains_key("repository"));
        // A SPIFFE-shaped subject from a generic issuer is no SVID.
        let svid = json!({"sub": "spiffe://prod.acme.com/ns/agents"});
        let generic = of(svid.clone(), IdentityKind::Generic, None).unwrap();
        assert_eq!(generic.kind, IdentityKind::Generic);
        assert!(!generic.attributes.contains_key("trust_domain"));
        // Local is never declared: it reads as a plain JWT.
        let local = of(
            json!({"sub": "local:coder", "scrip_attestation": {"uid": 0}}),
            IdentityKind::Local,
            None,
        )
        .unwrap();
        assert_eq!(local.kind, IdentityKind::Generic);
        assert!(local.attributes.is_empty());
    }

    #[test]
    fn a_spiffe_issuer_speaks_for_its_trust_domain_only() {
        let svid = |sub: &str| json!({ "sub": sub });
        let id = of(
            svid("spiffe://prod.acme.com/ns/agents"),
            IdentityKind::Spiffe,
            Some("prod.acme.com"),
        )
        .unwrap();
        assert_eq!(id.attributes["trust_domain"], "prod.acme.com");
        for sub in [
            "spiffe://dev.acme.com/ns/agents",
            "spiffe://prod.acme.com.evil.example/ns/agents",
            "spiffe://prod.acme.co/ns/agents",
            "system:serviceaccount:agents:coder",
        ] {
            assert_eq!(
                of(svid(sub), IdentityKind::Spiffe, Some("prod.acme.com")).unwrap_err(),
                ShapeError::NotSpiffe(Some("prod.acme.com".into())),
                "{sub}"
            );
        }
        // Without a trust domain any SPIFFE ID passes, and nothing else.
        assert!(of(svid("spiffe://dev.acme.com/x"), IdentityKind::Spiffe, None).is_ok());
        // Only a workload's well-formed SPIFFE ID (SPIFFE-ID §2).
        for sub in [
            "spiffe:///x",
            "https://dev.acme.com/x",
            "spiffe://dev.acme.com",
            "spiffe://dev.acme.com/",
            "spiffe://dev.acme.com/ns/a/../b",
            "spiffe://dev.acme.com/ns/./b",
            "spiffe://dev.acme.com/ns//b",
            "spiffe://dev.acme.com/ns/b/",
            "spiffe://dev.acme.com/a%2Fb",
            "spiffe://dev.acme.com/a?x=1",
            "spiffe://dev.acme.com/a#f",
            "spiffe://Dev.acme.com/a",
            "spiffe://dev.acme.com:443/a",
            "spiffe://user@dev.acme.com/a",
            "SPIFFE://dev.acme.com/a",
        ] {
            assert_eq!(
                of(svid(sub), IdentityKind::Spiffe, None).unwrap_err(),
                ShapeError::NotSpiffe(None),
                "{sub}"
            );
        }
        assert_eq!(
            of(svid(""), IdentityKind::Spiffe, None).unwrap_err(),
            ShapeError::NoSubject
        );
        let id = of(
            svid("spiffe://dev.acme.com/ns/a_b/sa.x-1"),
            IdentityKind::Spiffe,
            None,
        )
        .unwrap();
        assert_eq!(id.attributes["spiffe_path"], "/ns/a_b/sa.x-1");
        // From an issuer of no declared kind, a malformed one is no SPIFFE
        // identity: no trust domain or path for a policy to match.
        let undeclared = |sub: &str| {
            let Value::Object(map) = svid(sub) else {
                panic!("not an object")
            };
            WorkloadIdentity::from_claims_of("https://issuer", &map, None, None).unwrap()
        };
        let id = undeclared("spiffe://dev.acme.com/ns/a/../b");
        assert_eq!(id.kind, IdentityKind::Generic);
        assert!(id.attributes.is_empty(), "{:?}", id.attributes);
        assert_eq!(
            undeclared("spiffe://dev.acme.com/ns/a").kind,
            IdentityKind::Spiffe
        );
    }

    #[test]
    fn a_subject_past_the_longest_spiffe_id_is_refused() {
        let sub = |len: usize| {
            let Value::Object(map) = json!({ "sub": "s".repeat(len) }) else {
                panic!("not an object")
            };
            WorkloadIdentity::from_claims_of("https://issuer", &map, None, None)
        };
        assert!(sub(MAX_SUBJECT_BYTES).is_ok());
        assert_eq!(
            sub(MAX_SUBJECT_BYTES + 1).unwrap_err(),
            ShapeError::SubjectTooLong
        );
    }

    /// A top-level claim named like a nested Kubernetes one (which a user of
    /// a generic issuer may choose) makes no Kubernetes identity and gives
    /// no namespace, whether the issuer's kind is declared or not.
    #[test]
    fn a_dotted_claim_name_is_not_a_kubernetes_claim() {
        let Value::Object(map) = json!({
            "sub": "alice",
            "kubernetes.io.namespace": "agents",
            "kubernetes.io.serviceaccount.name": "deployer",
        }) else {
            panic!("not an object")
        };
        for kind in [None, Some(IdentityKind::Kubernetes)] {
            let id = WorkloadIdentity::from_claims_of("https://issuer", &map, kind, None).unwrap();
            assert_eq!(id.kind, kind.unwrap_or(IdentityKind::Generic));
            assert!(id.attributes.is_empty(), "{:?}", id.attributes);
            // Still a tag, under its own name, for a policy that asks.
            assert_eq!(
                id.claims.get("kubernetes.io.namespace").map(String::as_str),
                Some("agents")
            );
        }
    }

    /// A subject that could forge or hide a line of what a person reads is
    /// no identity.
    #[test]
    fn a_subject_with_control_or_bidi_characters_is_refused() {
        for sub in [
            "a\nb",
            "x\u{1b}[2Jy",
            "ab\u{202e}cd",
            "tab\there",
            "ara\u{061c}bic",
            "line\u{2028}sep",
            "para\u{2029}sep",
            "zero\u{200b}width",
            "bom\u{feff}",
            "word\u{2060}joiner",
            "tag\u{e0041}chars",
            "variation\u{fe0f}",
            "filler\u{3164}",
        ] {
            let Value::Object(map) = json!({ "sub": sub }) else {
                panic!("not an object")
            };
            assert_eq!(
                WorkloadIdentity::from_claims_of("https://issuer", &map, None, None).unwrap_err(),
                ShapeError::SubjectNotText,
                "{sub:?}"
            );
        }
        let Value::Object(map) = json!({ "sub": "système:agents:é" }) else {
            panic!("not an object")
        };
        assert!(WorkloadIdentity::from_claims_of("https://issuer", &map, None, None).is_ok());
    }

    #[test]
    fn claims_are_never_dropped_or_shadowed_silently() {
        let shape = |claims: Value| {
            let Value::Object(map) = claims else {
                panic!("not an object")
            };
            WorkloadIdentity::from_claims_of("https://issuer", &map, None, None)
        };
        // A dotted claim beside the nested one of the same name.
        let shadowed = json!({
            "sub": "s", "kubernetes.io": {"namespace": "agents"}, "kubernetes.io.namespace": "x"
        });
        assert_eq!(shape(shadowed).unwrap_err(), ShapeError::ClaimShadowed);
        // Padding past the limit, which would push a tag out.
        let mut padded = serde_json::Map::new();
        padded.insert("sub".into(), json!("s"));
        for i in 0..MAX_CLAIMS {
            padded.insert(format!("pad{i:03}"), json!(i));
        }
        assert_eq!(
            shape(Value::Object(padded.clone())).unwrap_err(),
            ShapeError::TooManyClaims
        );
        padded.remove("pad000");
        let id = shape(Value::Object(padded)).unwrap();
        assert_eq!(id.claims.len(), MAX_CLAIMS);
        // Arrays, nulls and deep objects are no tags, and refuse nothing.
        let id = shape(json!({
            "sub": "s", "groups": ["a", "b"], "none": null,
            "a": {"b": {"c": {"d": {"e": {"f": "deep"}}}, "x": "shallow"}}
        }))
        .unwrap();
        assert_eq!(id.claims["a.b.x"], "shallow");
        assert!(!id.claims.keys().any(|k| k.ends_with(".f") || k == "groups"));
    }

    #[test]
    fn subject_is_required() {
        let Value::Object(map) = json!({"sub": ""}) else {
            panic!()
        };
        assert!(WorkloadIdentity::from_claims("i", &map).is_none());
        let Value::Object(map) = json!({"iss": "i"}) else {
            panic!()
        };
        assert!(WorkloadIdentity::from_claims("i", &map).is_none());
    }
}
