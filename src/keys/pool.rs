//! The hot in-memory view of usable keys, per provider: decrypted once, read
//! lock-free by every request.
//!
//! Each provider's key list sits behind an `ArcSwap`: a request takes a
//! snapshot (one atomic load), writers publish a whole new list. Writers are
//! the periodic reload from the store (which brings changes made through
//! other replicas or processes within the reload interval) and the management
//! API, which applies its own change before it answers, so a key revoked
//! through this replica is never chosen for a request that starts after the
//! revoke returned.

use super::{KeyId, KeyRecord, KeyState, Limits, Vault};
use crate::config::{ProviderConfig, ProviderKind};
use crate::secret::Secret;
use arc_swap::ArcSwap;
use http::HeaderValue;
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};

/// A usable key with its live counters.
pub struct PoolKey {
    pub id: KeyId,
    /// The material, for scrubbing its edges from provider messages.
    pub material: Secret,
    /// The credential header value for this provider kind, built once and
    /// marked sensitive (hyper and h2 never log or index it).
    pub credential: HeaderValue,
    pub weight: u32,
    pub limits: Limits,
    /// Store revision this entry was built from; an unchanged revision keeps
    /// the entry (and its counters) across reloads without decrypting again.
    revision: i64,
    /// Requests using this key right now, through this replica.
    in_flight: AtomicU32,
}

impl PoolKey {
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }
}

/// One request's use of a key: counted in flight until dropped (which
/// happens when the response body has been sent or abandoned).
pub struct Lease {
    key: Arc<PoolKey>,
}

impl Lease {
    pub fn new(key: Arc<PoolKey>) -> Self {
        key.in_flight.fetch_add(1, Ordering::Relaxed);
        Lease { key }
    }

    pub fn key(&self) -> &Arc<PoolKey> {
        &self.key
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.key.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The active keys of one provider.
#[derive(Default)]
pub struct ProviderKeys {
    pub keys: Vec<Arc<PoolKey>>,
    /// Rotating start position for round-robin and tie-breaking.
    pub cursor: AtomicUsize,
}

/// Every provider's active keys.
pub struct KeyPool {
    providers: HashMap<String, (ProviderKind, ArcSwap<ProviderKeys>)>,
}

impl KeyPool {
    pub fn new(providers: &[ProviderConfig]) -> Self {
        KeyPool {
            providers: providers
                .iter()
                .map(|p| (p.id.clone(), (p.kind, ArcSwap::default())))
                .collect(),
        }
    }

    /// The provider's active keys now (one atomic load).
    pub fn snapshot(&self, provider_id: &str) -> Option<Arc<ProviderKeys>> {
        self.providers.get(provider_id).map(|(_, k)| k.load_full())
    }

    /// Replaces every provider's list with the active keys among `records`
    /// (all keys from the store). Entries whose revision did not change are
    /// kept as they are.
    pub fn reload(&self, records: &[KeyRecord], vault: &Vault) {
        for (provider_id, (kind, slot)) in &self.providers {
            let current = slot.load();
            let keys = records
                .iter()
                .filter(|r| &r.provider_id == provider_id)
                .filter_map(|r| entry(r, *kind, &current.keys, vault))
                .collect();
            slot.store(Arc::new(ProviderKeys {
                keys,
                cursor: AtomicUsize::new(current.cursor.load(Ordering::Relaxed)),
            }));
        }
    }

    /// Applies one changed record at once (a management API write).
    pub fn apply(&self, record: &KeyRecord, vault: &Vault) {
        let Some((kind, slot)) = self.providers.get(&record.provider_id) else {
            return;
        };
        slot.rcu(|current| {
            let mut keys: Vec<Arc<PoolKey>> = current
                .keys
                .iter()
                .filter(|k| k.id != record.id)
                .cloned()
                .collect();
            if let Some(e) = entry(record, *kind, &current.keys, vault) {
                keys.push(e);
            }
            ProviderKeys {
                keys,
                cursor: AtomicUsize::new(current.cursor.load(Ordering::Relaxed)),
            }
        });
    }
}

/// The pool entry for a record, if the key is active and its material opens.
fn entry(
    record: &KeyRecord,
    kind: ProviderKind,
    current: &[Arc<PoolKey>],
    vault: &Vault,
) -> Option<Arc<PoolKey>> {
    if record.status.state() != KeyState::Active {
        return None;
    }
    if let Some(same) = current
        .iter()
        .find(|k| k.id == record.id && k.revision == record.revision)
    {
        return Some(same.clone());
    }
    let material = match vault.open(record.sealed.as_ref()?) {
        Ok(m) => m,
        Err(e) => {
            tracing::error!(key_id = %record.id, error = %e, "key skipped: its material cannot be decrypted");
            return None;
        }
    };
    let credential = match credential_header(kind, &material) {
        Some(v) => v,
        None => {
            tracing::error!(key_id = %record.id, "key skipped: its material is not a valid header value");
            return None;
        }
    };
    Some(Arc::new(PoolKey {
        id: record.id.clone(),
        material,
        credential,
        weight: record.weight,
        limits: record.limits,
        revision: record.revision,
        in_flight: AtomicU32::new(0),
    }))
}

/// The header value a provider kind expects the key in: `Bearer <key>` for
/// OpenAI-style `Authorization`, the bare key for the others.
fn credential_header(kind: ProviderKind, material: &Secret) -> Option<HeaderValue> {
    // Building the header is the one place the material becomes request bytes.
    let mut value = match kind {
        ProviderKind::OpenAi | ProviderKind::OpenAiCompatible => {
            let text = zeroize::Zeroizing::new(format!("Bearer {}", material.expose()));
            HeaderValue::from_str(&text).ok()?
        }
        ProviderKind::Anthropic | ProviderKind::AzureOpenAi | ProviderKind::Gemini => {
            HeaderValue::from_str(material.expose()).ok()?
        }
    };
    value.set_sensitive(true);
    Some(value)
}
