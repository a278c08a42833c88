//! `scrip key`: scrip's own keys, for an operator.

use std::path::Path;
use std::process::ExitCode;

use crate::audit::{now_s, open, runtime};
use crate::fail;

/// Runs `act` on the configuration's store, with this process's name for
/// its records, which the store signs as `scrip serve` signs its own.
fn on_store<T>(
    config: Option<&Path>,
    loaded: &scrip_config::Config,
    act: impl AsyncFnOnce(&dyn scrip_store::Store, &str) -> Result<T, String>,
) -> Result<T, String> {
    runtime()?.block_on(async {
        let (_, store) = open(config).await?;
        crate::secret::sign_heads(loaded, store.as_ref()).await?;
        act(store.as_ref(), &crate::secret::replica()).await
    })
}

/// `scrip key withdraw --reason TEXT`.
pub fn withdraw(config: Option<&Path>, reason: &str) -> ExitCode {
    let result = (|| {
        let loaded = scrip_config::Config::load(config).map_err(|e| e.to_string())?;
        let reason = crate::task::reason(reason)?;
        if loaded.database_url.is_none() {
            // Said before the store is opened: nothing to open it for.
            return Err(scrip_server::keyring::WithdrawError::Embedded(
                scrip_server::keys::signing_key_file(&loaded.data_dir, loaded.signing_algorithm),
            )
            .to_string());
        }
        on_store(config, &loaded, async |store, replica| {
            scrip_server::keyring::withdraw_signing_keys(&loaded, store, now_s(), replica, reason)
                .await
                .map_err(|e| e.to_string())
        })
    })();
    match result {
        Err(e) => fail(e),
        Ok(done) => {
            for kid in &done.withdrawn {
                out!("withdrawn {kid}");
            }
            out!("signing {}", done.signing);
            ExitCode::SUCCESS
        }
    }
}

/// `scrip key reseal --reason TEXT`.
pub fn reseal(config: Option<&Path>, reason: &str) -> ExitCode {
    let result = (|| {
        let loaded = scrip_config::Config::load(config).map_err(|e| e.to_string())?;
        let reason = crate::task::reason(reason)?;
        on_store(config, &loaded, async |store, replica| {
            scrip_server::keyring::reseal(&loaded, store, replica, reason)
                .await
                .map_err(|e| e.to_string())
        })
    })();
    match result {
        Err(e) => fail(e),
        Ok(done) => {
            for kid in &done.keys {
                out!("resealed key {kid}");
            }
            for version in &done.secrets {
                out!("resealed secret {version}");
            }
            out!(
                "{} values sealed under the key-encryption key {} ({} sealed again now)",
                done.current,
                done.key,
                done.keys.len() + done.secrets.len()
            );
            for version in &done.skipped {
                out!(
                    "left as it was: secret {version} (replaced, and opens under neither key: the proxy passes over it, and the next rotation purges it)"
                );
            }
            match done.previous {
                Some(previous) => out!(
                    "the previous key {previous} opens nothing here any more: once every replica logs key {} and this command seals nothing more, remove the previous key from each and destroy it",
                    done.key
                ),
                None => out!(
                    "no previous key-encryption key is given: nothing could need sealing again"
                ),
            }
            ExitCode::SUCCESS
        }
    }
}
