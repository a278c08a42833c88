//! HTTP clients that carry tokens and keys safely to a URL that may be on
//! this machine, shared by scrip's crates (key sets, metadata, the feed,
//! introspection, the approval webhook, the command line's client).

use std::time::Duration;

/// Where a URL on this machine points: its host name, when it is
/// `localhost`, and its port. `None` for any other URL.
fn loopback(uri: &str) -> Option<(Option<String>, u16)> {
    let url = url::Url::parse(uri).ok()?;
    let port = url.port_or_known_default()?;
    match url.host()? {
        url::Host::Domain(d) if is_localhost(d) => Some((Some(d.to_owned()), port)),
        url::Host::Ipv4(ip) if ip.is_loopback() => Some((None, port)),
        url::Host::Ipv6(ip) if ip.is_loopback() => Some((None, port)),
        _ => None,
    }
}

/// A client for requests to `url` (key sets, scrip's approval webhook):
/// no redirects, `timeout` for the whole request. For a `url` on this
/// machine, which may be plain `http`, it also never goes through a proxy
/// named in the environment (which would carry the request off the machine
/// unprotected, and could answer with any keys), and `localhost` is
/// 127.0.0.1, never what the resolver lists first: most hosts files also map
/// it to `::1`, tried first, where another local user could answer on the
/// same port while the real service listens on 127.0.0.1 only.
///
/// # Errors
/// When the TLS backend cannot be set up.
pub fn http_client(url: &str, timeout: Duration) -> Result<reqwest::Client, reqwest::Error> {
    let mut builder = reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none());
    if let Some((name, port)) = loopback(url) {
        builder = builder.no_proxy();
        if let Some(name) = name {
            builder = builder.resolve(
                &name,
                std::net::SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, port)),
            );
        }
    }
    builder.build()
}

/// Whether a host name is `localhost`, whatever its case, with or without
/// the root's dot: a name scrip connects to at 127.0.0.1 only.
#[must_use]
pub fn is_localhost(host: &str) -> bool {
    host.strip_suffix('.')
        .unwrap_or(host)
        .eq_ignore_ascii_case("localhost")
}

/// Whether `url` is on this machine (`localhost` or a loopback address),
/// where plain `http` is allowed.
#[must_use]
pub fn is_local(url: &str) -> bool {
    loopback(url).is_some()
}

#[cfg(test)]
mod tests {
    use super::loopback;

    #[test]
    fn urls_on_this_machine_are_told_apart() {
        assert_eq!(
            loopback("http://localhost:8080/jwks"),
            Some((Some("localhost".to_owned()), 8080))
        );
        assert_eq!(
            loopback("http://LocalHost/jwks"),
            Some((Some("localhost".to_owned()), 80))
        );
        assert_eq!(loopback("http://127.0.0.2:9/k"), Some((None, 9)));
        assert_eq!(loopback("https://[::1]/k"), Some((None, 443)));
        assert_eq!(loopback("https://idp.example/jwks"), None);
        assert_eq!(loopback("https://localhost.example/jwks"), None);
        assert_eq!(loopback("http://10.0.0.1/jwks"), None);
        assert_eq!(loopback("not a url"), None);
    }
}
