//! Tenant API keys: creation, hashing, and the in-memory cache the request path authenticates
//! from. The database holds only SHA-256 hashes; the request path never queries it.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use rand::RngCore;
use sha2::{Digest, Sha256};
use tollgate_billing::store::{KeyRecord, Rotation, Store};

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

/// A new random secret and its shown prefix.
fn new_secret() -> (String, String) {
    let mut random = [0u8; 24];
    rand::rngs::OsRng.fill_bytes(&mut random);
    let secret = format!("tg-{}", hex::encode(random));
    let prefix = secret[..9].to_string();
    (secret, prefix)
}

/// What creating a key did.
pub enum Created {
    /// A new key and its secret, which is shown once and never stored.
    New(KeyRecord, String),
    /// The idempotency key made this key earlier; its secret cannot be shown again.
    Existing(KeyRecord),
}

/// Creates a key for `tenant`. With an idempotency key, a retry returns the key the first call
/// made instead of making another.
pub async fn create_key(
    store: &Store,
    tenant: &str,
    name: Option<&str>,
    idempotency_key: Option<&str>,
) -> anyhow::Result<Created> {
    let (secret, prefix) = new_secret();
    let mut id_bytes = [0u8; 8];
    rand::rngs::OsRng.fill_bytes(&mut id_bytes);
    let now = chrono::Utc::now().timestamp_millis();
    let record = KeyRecord {
        id: format!("key_{}", hex::encode(id_bytes)),
        tenant: tenant.to_string(),
        name: name.map(str::to_string),
        secret_hash: hash_secret(&secret),
        prefix,
        created_ms: now,
        revoked_ms: None,
        updated_ms: now,
        previous_secret_hash: None,
        previous_expires_ms: None,
        rotated_ms: None,
        idempotency_key: idempotency_key.map(str::to_string),
    };
    if store.insert_key(&record).await? {
        return Ok(Created::New(record, secret));
    }
    let existing = store
        .key_by_idempotency(idempotency_key.unwrap_or_default())
        .await?
        .ok_or_else(|| anyhow::anyhow!("key insert skipped without an idempotency conflict"))?;
    Ok(Created::Existing(existing))
}

/// Gives a key a new secret (same id); the old secret keeps working for `grace`.
pub async fn rotate_key(
    store: &Store,
    id: &str,
    grace: std::time::Duration,
    rotation_key: Option<&str>,
) -> anyhow::Result<(Rotation, Option<String>)> {
    let (secret, prefix) = new_secret();
    let expires = chrono::Utc::now().timestamp_millis()
        + i64::try_from(grace.as_millis()).unwrap_or(i64::MAX / 2);
    let rotation = store
        .rotate_key(id, &hash_secret(&secret), &prefix, expires, rotation_key)
        .await?;
    let secret = matches!(rotation, Rotation::Rotated(_)).then_some(secret);
    Ok((rotation, secret))
}

/// Active keys by secret hash. Refreshed in the background from the database.
#[derive(Default)]
pub struct KeyCache {
    inner: RwLock<CacheState>,
    /// One refresh at a time: a slow read applied after a newer one would bring back a key that
    /// was just revoked or rotated.
    refreshing: tokio::sync::Mutex<()>,
}

#[derive(Default)]
struct CacheState {
    by_hash: HashMap<String, Entry>,
    /// Key id -> the hashes it is reachable by, so a rotation or revocation removes them all.
    hashes_of: HashMap<String, Vec<String>>,
    /// Newest `updated_ms` seen; the next refresh asks for changes from a little before it.
    watermark: i64,
}

struct Entry {
    info: Arc<KeyInfo>,
    /// A rotated-out secret works until then (epoch ms).
    expires_ms: Option<i64>,
}

/// Re-read changes this far behind the newest one seen, to tolerate clock skew between the
/// processes that write keys.
const REFRESH_OVERLAP_MS: i64 = 10_000;

impl KeyCache {
    /// Looks a presented secret up. Unknown, revoked and expired secrets are `None`.
    pub fn authenticate(&self, secret: &str) -> Option<Arc<KeyInfo>> {
        let hash = hash_secret(secret);
        let state = self.inner.read().unwrap_or_else(|e| e.into_inner());
        let entry = state.by_hash.get(&hash)?;
        if let Some(expires) = entry.expires_ms {
            if chrono::Utc::now().timestamp_millis() >= expires {
                return None;
            }
        }
        Some(entry.info.clone())
    }

    /// Applies key changes since the last refresh (`full`: reloads everything).
    pub async fn refresh(&self, store: &Store, full: bool) -> anyhow::Result<()> {
        let _one_at_a_time = self.refreshing.lock().await;
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
            state.hashes_of.clear();
        }
        for key in changed {
            state.apply(key);
        }
        Ok(())
    }
}

impl CacheState {
    fn apply(&mut self, key: KeyRecord) {
        self.watermark = self.watermark.max(key.updated_ms);
        for hash in self.hashes_of.remove(&key.id).unwrap_or_default() {
            self.by_hash.remove(&hash);
        }
        if key.revoked_ms.is_some() {
            return;
        }
        let info = Arc::new(KeyInfo {
            id: key.id.clone(),
            tenant: key.tenant,
        });
        let mut hashes = vec![key.secret_hash.clone()];
        self.by_hash.insert(
            key.secret_hash,
            Entry {
                info: info.clone(),
                expires_ms: None,
            },
        );
        if let (Some(hash), Some(expires_ms)) = (key.previous_secret_hash, key.previous_expires_ms)
        {
            hashes.push(hash.clone());
            self.by_hash.insert(
                hash,
                Entry {
                    info,
                    expires_ms: Some(expires_ms),
                },
            );
        }
        self.hashes_of.insert(key.id, hashes);
    }
}
