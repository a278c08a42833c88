//! `scrip proxy`: the legacy bridge as its own process, in front of the
//! upstreams of a configuration, trusting the scrip at `[proxy] issuer`
//! (discovered through its metadata, tokens verified offline, revocations
//! followed on its feed with the proxy's own workload identity). Policies
//! reload as in `scrip serve`: on SIGHUP and when `policy_dir` changes.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use scrip_config::Config;
use scrip_server::policies::Policies;

use scrip_verifier::{FileIdentity, Verifier, VerifierConfig};

use crate::audit::now_s;
use crate::fail;

/// What a started proxy runs with.
struct Started {
    listener: tokio::net::TcpListener,
    /// `metrics_listen`'s.
    metrics: Option<tokio::net::TcpListener>,
    proxy: scrip_proxy::Proxy,
    policies: Policies,
    /// The store, which signs this process's audit chain head in every
    /// commit.
    store: Arc<dyn scrip_store::Store>,
}

async fn start(config: Config) -> Result<Started, String> {
    let first = config
        .upstreams
        .first()
        .map(|u| u.name.to_string())
        .ok_or("the configuration has no [[upstreams]] to proxy")?;
    // What the proxy would refuse of the configuration alone, before
    // anything (the store, a key, a record) is written.
    scrip_proxy::check_routes(&config).map_err(|e| e.to_string())?;
    for warning in config.cleartext_warnings(true) {
        tracing::warn!("{warning}");
    }
    let identity = config.proxy.identity_file.clone().ok_or(
        "[proxy] identity_file is required: the proxy presents that workload identity to scrip's revocation feed",
    )?;
    let issuer = config
        .proxy
        .issuer
        .clone()
        .unwrap_or_else(|| config.issuer());
    let mut vc = VerifierConfig::new(issuer.clone(), first, Arc::new(FileIdentity::new(identity)));
    if let scrip_verifier::Revocation::Follow(feed) = &mut vc.revocation {
        feed.max_staleness = Duration::from_secs(config.proxy.max_staleness);
        // Under a third: an idle long poll shows the set as it was when
        // asked for, and the next answer comes one more `wait` later.
        feed.wait = feed
            .wait
            .min(feed.max_staleness / 3)
            .max(Duration::from_secs(1));
    }
    vc.leeway = config.clock_skew;
    vc.dpop_leeway = config.clock_skew;
    vc.public_url.clone_from(&config.proxy.public_url);
    // The proxy claims a single use itself, with its `allow` record.
    vc.danger_caller_claims_single_use = true;
    let verifier = Verifier::discover(vc)
        .await
        .map_err(|e| format!("cannot trust `{issuer}`: {e}"))?;
    let (policy_seen, policy) = scrip_server::policies::load_at_start(&config.policy_dir)
        .await
        .map_err(|e| e.to_string())?;
    policy
        .check_tools(&config.tools)
        .map_err(|e| e.to_string())?;
    scrip_server::keys::ensure_private_dir(&config.data_dir).map_err(|e| e.to_string())?;
    let store = scrip_store::open(
        config.database_url.as_deref(),
        &config.data_dir.join("scrip.db"),
    )
    .await
    .map_err(|e| e.to_string())?;
    let kek = scrip_proxy::Kek::new(
        scrip_server::keys::store_kek(&config, store.as_ref())
            .await
            .map_err(|e| e.to_string())?,
    );
    let listener = tokio::net::TcpListener::bind(config.proxy.listen)
        .await
        .map_err(|e| format!("cannot listen on `{}`: {e}", config.proxy.listen))?;
    let metrics = match config.proxy.metrics_listen {
        Some(addr) => Some(
            scrip_server::bind_metrics(addr)
                .await
                .map_err(|e| e.to_string())?,
        ),
        None => {
            tracing::info!(
                "/metrics is not served: set [proxy] metrics_listen to serve it (apart from the API)"
            );
            None
        }
    };
    let local = listener.local_addr().map_err(|e| e.to_string())?;
    let replica = format!("proxy:{}:{}", local.port(), std::process::id());
    let key = scrip_server::keyring::checkpoint_signer(&config, store.as_ref(), now_s(), &replica)
        .await
        .map_err(|e| format!("cannot sign audit checkpoints: {e}"))?;
    // Every commit signs this process's chain head in its transaction.
    store.sign_heads_with(Arc::new(scrip_server::keyring::HeadKey(key)));
    // On the record before the set decides anything, as `scrip serve` does.
    store
        .commit(vec![scrip_server::policies::loaded_record(
            &replica,
            &policy,
            &config.policy_dir,
        )])
        .await
        .map_err(|e| format!("cannot record the policies loaded: {e}"))?;
    let policies = Policies::new(policy, policy_seen, &config, store.clone(), replica.clone());
    let current = policies.clone();
    let proxy = scrip_proxy::Proxy::new(
        &config,
        scrip_proxy::Parts {
            store: store.clone(),
            policy: Arc::new(move || current.current()),
            verifier,
            kek,
            replica,
        },
    )
    .map_err(|e| e.to_string())?;
    Ok(Started {
        listener,
        metrics,
        proxy,
        policies,
        store,
    })
}

/// `scrip proxy [--config FILE]`.
pub fn proxy(config: Option<&Path>) -> ExitCode {
    let (config, runtime) = match crate::server_setup(config) {
        Ok(s) => s,
        Err(code) => return code,
    };
    let limits = scrip_server::http::Limits::new(config.http_header_timeout).proxying();
    let header_timeout = config.http_header_timeout;
    let code = runtime.block_on(async {
        let mut stop = crate::Stop::new();
        let Started {
            listener,
            metrics,
            proxy,
            policies,
            store,
        } = match stop.starting(start(config)).await {
            None => return fail("stopped during start-up"),
            Some(Ok(p)) => p,
            Some(Err(e)) => return fail(e),
        };
        // The same reload as `scrip serve`: SIGHUP (one during start-up
        // included) and policy file changes.
        let reloader = policies.spawn_reloader(stop.take_hangup());
        let metrics =
            metrics.map(|listener| scrip_server::serve_metrics(listener, &proxy, header_timeout));
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "proxy listening");
        }
        let ready = proxy.clone();
        let writes = proxy.clone();
        let app = scrip_server::with_fallbacks(
            proxy
                .router()
                .route("/healthz", axum::routing::get(|| async { "ok" }))
                .route(
                    "/readyz",
                    axum::routing::get(move || {
                        let ready = ready.is_ready();
                        async move { scrip_server::readiness(ready) }
                    }),
                ),
        );
        let (stopped, hurry) = stop.stages();
        let served = scrip_server::http::serve_until(listener, app, limits, stopped, hurry).await;
        reloader.abort();
        if let Some(metrics) = metrics {
            metrics.abort();
        }
        // Store what it writes in the background.
        let _ = tokio::time::timeout(Duration::from_secs(5), writes.flush()).await;
        // An empty commit waits for the batches queued before it.
        let _ = store.commit(Vec::new()).await;
        match served {
            Ok(()) => crate::stopped_whole(),
            Err(e) => fail(format!("proxy error: {e}")),
        }
    });
    crate::leave(runtime);
    code
}
