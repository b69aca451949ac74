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

use super::{KeyEvent, KeyId, KeyRecord, KeyState, Limits, Vault};
use crate::config::{ProviderConfig, ProviderKind};
use crate::limits::KeyCounters;
use crate::secret::Secret;
use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use http::HeaderValue;
use prometheus::IntCounter;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock};

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
    /// the entry across reloads without decrypting again.
    revision: i64,
    /// In-flight count and rate windows; carried over when the entry is
    /// rebuilt for a new revision, so a label change resets no limit.
    pub counters: Arc<KeyCounters>,
    /// This key's `keyrouter_key_requests_total` series, found on first use
    /// rather than by label lookup on every request.
    requests: OnceLock<IntCounter>,
}

impl PoolKey {
    pub fn in_flight(&self) -> u32 {
        self.counters.in_flight()
    }

    /// Counts one upstream request sent with this key; `series` finds the
    /// key's series the first time.
    pub fn count_request(&self, series: impl FnOnce() -> IntCounter) {
        self.requests.get_or_init(series).inc();
    }
}

/// The active keys of one provider, and when its resting keys wake up.
#[derive(Default)]
pub struct ProviderKeys {
    pub keys: Vec<Arc<PoolKey>>,
    /// Keys cooling down after a provider 429, with the end of each
    /// cooldown: they make "all keys busy" a 429 with `Retry-After` rather
    /// than a 503.
    pub cooling: Vec<(KeyId, DateTime<Utc>)>,
    /// Rotating start position for round-robin and tie-breaking.
    pub cursor: AtomicUsize,
}

impl ProviderKeys {
    /// The earliest end of a cooldown, if any key is cooling down.
    pub fn next_cooldown_end(&self) -> Option<DateTime<Utc>> {
        self.cooling.iter().map(|(_, until)| *until).min()
    }

    /// A copy with the same cursor position, with `id` taken out.
    fn without(&self, id: &KeyId) -> ProviderKeys {
        ProviderKeys {
            keys: self.keys.iter().filter(|k| &k.id != id).cloned().collect(),
            cooling: self
                .cooling
                .iter()
                .filter(|(k, _)| k != id)
                .cloned()
                .collect(),
            cursor: AtomicUsize::new(self.cursor.load(Ordering::Relaxed)),
        }
    }
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

    /// Replaces every provider's lists with the keys among `records` (all
    /// keys from the store). Entries whose revision did not change are kept
    /// as they are.
    pub fn reload(&self, records: &[KeyRecord], vault: &Vault) {
        for (provider_id, (kind, slot)) in &self.providers {
            let current = slot.load();
            let mine = || records.iter().filter(|r| &r.provider_id == provider_id);
            slot.store(Arc::new(ProviderKeys {
                keys: mine()
                    .filter_map(|r| entry(r, *kind, &current.keys, vault))
                    .collect(),
                cooling: mine()
                    .filter_map(|r| Some((r.id.clone(), r.status.cooldown_until()?)))
                    .collect(),
                cursor: AtomicUsize::new(current.cursor.load(Ordering::Relaxed)),
            }));
        }
    }

    /// Applies one changed record at once (a management API write, a stored
    /// transition).
    pub fn apply(&self, record: &KeyRecord, vault: &Vault) {
        let Some((kind, slot)) = self.providers.get(&record.provider_id) else {
            return;
        };
        slot.rcu(|current| {
            let mut next = current.without(&record.id);
            if let Some(e) = entry(record, *kind, &current.keys, vault) {
                next.keys.push(e);
            }
            if let Some(until) = record.status.cooldown_until() {
                next.cooling.push((record.id.clone(), until));
            }
            next
        });
    }

    /// Stops choosing a key that a provider just refused, before the
    /// transition is stored (a rate-limited key joins the cooling list). A
    /// key that is no longer in the pool (revoked meanwhile) stays out.
    pub fn suspend(&self, provider_id: &str, id: &KeyId, event: KeyEvent) {
        let Some((_, slot)) = self.providers.get(provider_id) else {
            return;
        };
        slot.rcu(|current| {
            let known = current.keys.iter().any(|k| &k.id == id)
                || current.cooling.iter().any(|(k, _)| k == id);
            let mut next = current.without(id);
            if let (true, KeyEvent::RateLimited { until }) = (known, event) {
                next.cooling.push((id.clone(), until));
            }
            next
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
    let previous = current.iter().find(|k| k.id == record.id);
    if let Some(same) = previous.filter(|k| k.revision == record.revision) {
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
        counters: previous.map_or_else(Default::default, |p| p.counters.clone()),
        requests: OnceLock::new(),
    }))
}

/// The header value a provider kind expects the key in: `Bearer <key>` for
/// OpenAI-style `Authorization`, the bare key for the others.
pub fn credential_header(kind: ProviderKind, material: &Secret) -> Option<HeaderValue> {
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
