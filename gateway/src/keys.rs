//! Tenant API keys: creation, hashing, and the in-memory cache the request path authenticates
//! from. The database holds only SHA-256 hashes; the request path never queries it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rand::RngCore;
use sha2::{Digest, Sha256};
use tollgate_billing::store::{KeyRecord, Store};

/// What an authenticated request knows about its key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyInfo {
    pub id: String,
    pub tenant: String,
}

/// SHA-256 of a secret, hex-encoded: the only form in which secrets are stored.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// Creates a key for `tenant` and returns it with its secret, which is shown once and never stored.
pub async fn create_key(
    store: &Store,
    tenant: &str,
    name: Option<&str>,
) -> anyhow::Result<(KeyRecord, String)> {
    let mut random = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut random);
    let secret = format!("tg-{}", hex::encode(random));
    let mut id_bytes = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut id_bytes);
    let now = chrono::Utc::now().timestamp_millis();
    let record = KeyRecord {
        id: format!("key_{}", hex::encode(id_bytes)),
        tenant: tenant.to_string(),
        name: name.map(str::to_string),
        secret_hash: hash_secret(&secret),
        prefix: secret[..9].to_string(),
        created_ms: now,
        revoked_ms: None,
        updated_ms: now,
    };
    store.insert_key(&record).await?;
    Ok((record, secret))
}

/// Active keys by secret hash. Refreshed in the background from the database.
#[derive(Default)]
pub struct KeyCache {
    inner: RwLock<CacheState>,
}

#[derive(Default)]
struct CacheState {
    by_hash: HashMap<String, Arc<KeyInfo>>,
    /// Newest `updated_ms` seen; the next refresh asks for changes from a little before it.
    watermark: i64,
}

/// Re-read changes this far behind the newest one seen, to tolerate clock skew between the
/// processes that write keys.
const REFRESH_OVERLAP_MS: i64 = 10_000;

impl KeyCache {
    /// Looks a presented secret up. Unknown and revoked keys are `None`.
    pub fn authenticate(&self, secret: &str) -> Option<Arc<KeyInfo>> {
        let hash = hash_secret(secret);
        self.inner
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .by_hash
            .get(&hash)
            .cloned()
    }

    /// Applies key changes since the last refresh (`full`: reloads everything).
    pub async fn refresh(&self, store: &Store, full: bool) -> anyhow::Result<()> {
        let since = if full {
            0
        } else {
            let state = self.inner.read().unwrap_or_else(|e| e.into_inner());
            (state.watermark - REFRESH_OVERLAP_MS).max(0)
        };
        let changed = store.keys_changed_since(since).await?;
        let mut state = self.inner.write().unwrap_or_else(|e| e.into_inner());
        if full {
            state.by_hash.clear();
        }
        for key in changed {
            state.watermark = state.watermark.max(key.updated_ms);
            if key.revoked_ms.is_some() {
                state.by_hash.remove(&key.secret_hash);
            } else {
                let info = KeyInfo {
                    id: key.id,
                    tenant: key.tenant,
                };
                state.by_hash.insert(key.secret_hash, Arc::new(info));
            }
        }
        Ok(())
    }
}
