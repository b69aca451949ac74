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
//!
//! A reload publishes records read from the store some time before; a change
//! applied meanwhile is newer than they are. Every change counts itself
//! before it is published, and a reload whose read began before the latest
//! change is dropped (the next one brings what it had), so a stale read never
//! brings back a key revoked a moment ago.

use super::{KeyEvent, KeyId, KeyRecord, KeyState, Limits, Vault};
use crate::config::{ProviderConfig, ProviderKind};
use crate::limits::KeyCounters;
use crate::secret::Secret;
use arc_swap::ArcSwap;
use chrono::{DateTime, Utc};
use http::HeaderValue;
use prometheus::IntCounter;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
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
    /// Changes applied one by one ([`KeyPool::apply`], [`KeyPool::suspend`]),
    /// counted before each is published.
    changes: AtomicU64,
}

impl KeyPool {
    pub fn new(providers: &[ProviderConfig]) -> Self {
        KeyPool {
            providers: providers
                .iter()
                .map(|p| (p.id.clone(), (p.kind, ArcSwap::default())))
                .collect(),
            changes: AtomicU64::new(0),
        }
    }

    /// Taken before reading the store for [`KeyPool::reload`].
    pub fn changes(&self) -> u64 {
        self.changes.load(Ordering::SeqCst)
    }

    /// The provider's active keys now (one atomic load).
    pub fn snapshot(&self, provider_id: &str) -> Option<Arc<ProviderKeys>> {
        self.providers.get(provider_id).map(|(_, k)| k.load_full())
    }

    /// Replaces every provider's lists with the keys among `records` (all
    /// keys from the store, read after [`KeyPool::changes`] returned
    /// `read_after`). Entries whose revision did not change are kept as they
    /// are. Returns false, leaving newer lists in place, when a change was
    /// applied since `read_after`: the records may predate it.
    pub fn reload(&self, records: &[KeyRecord], vault: &Vault, read_after: u64) -> bool {
        for (provider_id, (kind, slot)) in &self.providers {
            let current = slot.load_full();
            if self.changes() != read_after {
                return false;
            }
            let mine = || records.iter().filter(|r| &r.provider_id == provider_id);
            let next = Arc::new(ProviderKeys {
                keys: mine()
                    .filter_map(|r| entry(r, *kind, &current.keys, vault))
                    .collect(),
                cooling: mine()
                    .filter_map(|r| Some((r.id.clone(), r.status.cooldown_until()?)))
                    .collect(),
                cursor: AtomicUsize::new(current.cursor.load(Ordering::Relaxed)),
            });
            // A change published since `current` was loaded wins.
            let previous = slot.compare_and_swap(&current, next);
            if !Arc::ptr_eq(&previous, &current) {
                return false;
            }
        }
        true
    }

    /// Applies one changed record at once (a management API write, a stored
    /// transition).
    pub fn apply(&self, record: &KeyRecord, vault: &Vault) {
        let Some((kind, slot)) = self.providers.get(&record.provider_id) else {
            return;
        };
        self.changes.fetch_add(1, Ordering::SeqCst);
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
        self.changes.fetch_add(1, Ordering::SeqCst);
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Policy;
    use crate::keys::KeyStatus;
    use std::collections::BTreeMap;

    fn provider() -> ProviderConfig {
        ProviderConfig {
            id: "openai".into(),
            kind: ProviderKind::OpenAi,
            base_url: "https://api.openai.com".parse().unwrap(),
            route_prefix: "/openai".into(),
            default: true,
            upstream_ca_path: None,
            policy: Policy::LeastLoaded,
            retry_budget: 2,
            probe_interval: None,
        }
    }

    fn record(n: u8, vault: &Vault) -> KeyRecord {
        let now = Utc::now();
        let material = Secret::new(format!("sk-pool-test-{n:04}-0123456789abcdef"));
        KeyRecord {
            id: KeyId::parse(&format!("key_pooltest{n:04}")).unwrap(),
            provider_id: "openai".into(),
            label: None,
            status: KeyStatus::Active,
            state_reason: None,
            limits: Limits::default(),
            weight: 1,
            fingerprint: super::super::vault::fingerprint(&material),
            metadata: BTreeMap::new(),
            created_at: now,
            updated_at: now,
            state_changed_at: now,
            revision: 1,
            sealed: Some(vault.seal(&material)),
            material_hash: Some(vault.material_hash(&material)),
        }
    }

    fn ids(pool: &KeyPool) -> Vec<String> {
        let keys = pool.snapshot("openai").unwrap();
        keys.keys.iter().map(|k| k.id.as_str().to_owned()).collect()
    }

    #[test]
    fn a_read_older_than_a_revoke_does_not_bring_the_key_back() {
        let vault = Vault::new(&[Secret::new(Vault::generate_key())]).unwrap();
        let pool = KeyPool::new(&[provider()]);
        let (a, b) = (record(1, &vault), record(2, &vault));
        assert!(pool.reload(&[a.clone(), b.clone()], &vault, pool.changes()));
        assert_eq!(ids(&pool), ["key_pooltest0001", "key_pooltest0002"]);

        // A reload reads the store; a revoke lands before it publishes.
        let read_after = pool.changes();
        let stale = [a.clone(), b.clone()];
        let mut revoked = a.clone();
        revoked.status = KeyStatus::Revoked;
        revoked.revision = 2;
        pool.apply(&revoked, &vault);
        assert!(!pool.reload(&stale, &vault, read_after));
        assert_eq!(ids(&pool), ["key_pooltest0002"]);

        // A read made after the revoke is published.
        let read_after = pool.changes();
        assert!(pool.reload(&[revoked, b], &vault, read_after));
        assert_eq!(ids(&pool), ["key_pooltest0002"]);
    }

    #[test]
    fn a_read_older_than_a_suspension_does_not_undo_it() {
        let vault = Vault::new(&[Secret::new(Vault::generate_key())]).unwrap();
        let pool = KeyPool::new(&[provider()]);
        let a = record(1, &vault);
        assert!(pool.reload(std::slice::from_ref(&a), &vault, pool.changes()));
        let read_after = pool.changes();
        pool.suspend("openai", &a.id, KeyEvent::QuotaExhausted);
        assert!(!pool.reload(&[a], &vault, read_after));
        assert!(ids(&pool).is_empty());
    }
}
