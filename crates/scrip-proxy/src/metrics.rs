//! `GET /metrics`: a small Prometheus text exposition of what an operator
//! must see: proxied requests by upstream and outcome, and secrets overdue
//! for rotation (`scrip_secret_overdue{name,action} 1`).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::Mutex;

use crate::secrets::SecretStatus;

/// What happened to a proxied request.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Outcome {
    /// Forwarded and answered by the upstream.
    Forwarded,
    /// Refused by scrip with a 4xx: the token, its scope, the policy, the
    /// path, or a request the agent broke off or malformed.
    Denied,
    /// A 5xx: the upstream failed or timed out, or scrip could not forward
    /// (the store unavailable, no secret set).
    Failed,
}

impl Outcome {
    /// A request scrip answered itself with `status`: a 5xx is a failure.
    #[must_use]
    pub fn of_refusal(status: http::StatusCode) -> Self {
        if status.is_server_error() {
            Self::Failed
        } else {
            Self::Denied
        }
    }
}

impl Outcome {
    fn as_str(self) -> &'static str {
        match self {
            Self::Forwarded => "forwarded",
            Self::Denied => "denied",
            Self::Failed => "failed",
        }
    }
}

/// Request counters.
#[derive(Debug, Default)]
pub struct Metrics {
    requests: Mutex<BTreeMap<(String, Outcome), u64>>,
}

impl Metrics {
    /// Counts one request.
    pub fn count(&self, upstream: &str, outcome: Outcome) {
        if let Ok(mut m) = self.requests.lock() {
            if let Some(n) = m.get_mut(&(upstream.to_owned(), outcome)) {
                *n += 1;
            } else {
                m.insert((upstream.to_owned(), outcome), 1);
            }
        }
    }

    /// The exposition, with the secrets' state when it could be read
    /// (`None`: the store did not answer; the request counters still are
    /// shown, and `scrip_secrets_readable` is 0).
    #[must_use]
    pub fn render(&self, secrets: Option<&[SecretStatus]>) -> String {
        let mut out = String::new();
        out.push_str("# HELP scrip_proxy_requests_total Requests to the proxy, by upstream and outcome.\n# TYPE scrip_proxy_requests_total counter\n");
        if let Ok(m) = self.requests.lock() {
            for ((upstream, outcome), n) in m.iter() {
                let _ = writeln!(
                    out,
                    "scrip_proxy_requests_total{{upstream=\"{}\",outcome=\"{}\"}} {n}",
                    label(upstream),
                    outcome.as_str()
                );
            }
        }
        out.push_str("# HELP scrip_secrets_readable Whether the secrets' state could be read from the store for this scrape.\n# TYPE scrip_secrets_readable gauge\n");
        let _ = writeln!(
            out,
            "scrip_secrets_readable {}",
            u8::from(secrets.is_some())
        );
        let Some(secrets) = secrets else {
            return out;
        };
        // Each family whole, its HELP and TYPE first, as the text format
        // asks: all the overdue gauges, then all the ages.
        let current = || secrets.iter().filter(|s| s.state == "current");
        let labels = |s: &SecretStatus| {
            format!(
                "name=\"{}\",action=\"{}\"",
                label(&s.name),
                label(&s.action)
            )
        };
        out.push_str("# HELP scrip_secret_overdue Whether a secret's current version is older than its max_age.\n# TYPE scrip_secret_overdue gauge\n");
        for s in current() {
            let _ = writeln!(
                out,
                "scrip_secret_overdue{{{}}} {}",
                labels(s),
                u8::from(s.overdue)
            );
        }
        out.push_str("# HELP scrip_secret_age_seconds Age of a secret's current version.\n# TYPE scrip_secret_age_seconds gauge\n");
        for s in current() {
            let _ = writeln!(out, "scrip_secret_age_seconds{{{}}} {}", labels(s), s.age);
        }
        out
    }
}

/// A label value, escaped (names are tool and action names already).
fn label(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders() {
        let m = Metrics::default();
        m.count("legacy", Outcome::Forwarded);
        m.count("legacy", Outcome::Forwarded);
        m.count("legacy", Outcome::Denied);
        let s = SecretStatus {
            name: "legacy".into(),
            action: "read".into(),
            version: 2,
            age: 99,
            state: "current",
            overdue: true,
        };
        let other = SecretStatus {
            name: "legacy".into(),
            action: "write".into(),
            version: 1,
            age: 5,
            state: "current",
            overdue: false,
        };
        let text = m.render(Some(&[s, other]));
        // Each family's lines together, after its own HELP and TYPE.
        let families: Vec<&str> = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split(['{', ' ']).next())
            .collect();
        let mut grouped = families.clone();
        grouped.dedup();
        assert_eq!(
            grouped,
            [
                "scrip_proxy_requests_total",
                "scrip_secrets_readable",
                "scrip_secret_overdue",
                "scrip_secret_age_seconds"
            ],
            "{text}"
        );
        for family in grouped {
            let help = text.find(&format!("# HELP {family} ")).unwrap();
            let kind = text.find(&format!("# TYPE {family} ")).unwrap();
            let first = text
                .find(&format!("\n{family}{{"))
                .or_else(|| text.find(&format!("\n{family} ")))
                .unwrap();
            assert!(help < kind && kind < first, "{text}");
        }
        assert!(
            text.contains(
                "scrip_proxy_requests_total{upstream=\"legacy\",outcome=\"forwarded\"} 2\n"
            )
        );
        assert!(
            text.contains("scrip_proxy_requests_total{upstream=\"legacy\",outcome=\"denied\"} 1\n")
        );
        assert!(text.contains("scrip_secret_overdue{name=\"legacy\",action=\"read\"} 1\n"));
        assert!(text.contains("scrip_secret_age_seconds{name=\"legacy\",action=\"read\"} 99\n"));
        assert!(text.contains("\nscrip_secrets_readable 1\n"), "{text}");
        // The store did not answer: the counters still, no secret family.
        let text = m.render(None);
        assert!(
            text.contains("scrip_proxy_requests_total{upstream=\"legacy\",outcome=\"denied\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("\nscrip_secrets_readable 0\n"), "{text}");
        assert!(!text.contains("scrip_secret_overdue"), "{text}");
    }
}
