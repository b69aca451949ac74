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
//! applied here meanwhile is newer than they are. Each such change marks its
//! key with the revision it stands for, and a reload keeps the pool's entry
//! for a marked key until the store shows that revision, so a stale read
//! never brings back a key revoked (or refused by its provider) a moment ago.

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
use std::sync::{Arc, Mutex, MutexGuard, OnceLock, PoisonError};
use std::time::{Duration, Instant};

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
    /// Keys changed one by one ([`KeyPool::apply`], [`KeyPool::suspend`])
    /// ahead of what a reload may have read: the oldest revision of each
    /// that a reload may publish. Writers take this lock for the whole
    /// change, so a reload never publishes over a change it did not see.
    ahead: Mutex<HashMap<KeyId, Ahead>>,
}

#[derive(Clone, Copy)]
struct Ahead {
    min_revision: i64,
    /// After this the store's view wins again: a transition that could not
    /// be stored for this long was given up.
    until: Instant,
}

/// How long a change made here outranks the store's records of the key:
/// as long as a stored transition is retried.
const AHEAD_FOR: Duration = crate::health::PERSIST_GIVE_UP;

impl KeyPool {
    pub fn new(providers: &[ProviderConfig]) -> Self {
        KeyPool {
            providers: providers
                .iter()
                .map(|p| (p.id.clone(), (p.kind, ArcSwap::default())))
                .collect(),
            ahead: Mutex::default(),
        }
    }

    /// The provider's active keys now (one atomic load).
    pub fn snapshot(&self, provider_id: &str) -> Option<Arc<ProviderKeys>> {
        self.providers.get(provider_id).map(|(_, k)| k.load_full())
    }

    fn ahead(&self) -> MutexGuard<'_, HashMap<KeyId, Ahead>> {
        self.ahead.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces every provider's lists with the keys among `records` (all
    /// keys from the store), except for keys changed here since: their
    /// records may predate the change (read before it was stored, or before
    /// the provider's refusal was), so their entries stay as they are until
    /// the store has caught up. Entries whose revision did not change are
    /// kept as they are.
    pub fn reload(&self, records: &[KeyRecord], vault: &Vault) {
        let mut ahead = self.ahead();
        let now = Instant::now();
        ahead.retain(|id, a| {
            let caught_up = records
                .iter()
                .any(|r| &r.id == id && r.revision >= a.min_revision);
            !caught_up && a.until > now
        });
        for (provider_id, (kind, slot)) in &self.providers {
            let current = slot.load();
            let fresh = || {
                records
                    .iter()
                    .filter(|r| &r.provider_id == provider_id && !ahead.contains_key(&r.id))
            };
            let keys = fresh()
                .filter_map(|r| entry(r, *kind, &current.keys, vault))
                .chain(
                    current
                        .keys
                        .iter()
                        .filter(|k| ahead.contains_key(&k.id))
                        .cloned(),
                )
                .collect();
            let cooling = fresh()
                .filter_map(|r| Some((r.id.clone(), r.status.cooldown_until()?)))
                .chain(
                    current
                        .cooling
                        .iter()
                        .filter(|(id, _)| ahead.contains_key(id))
                        .cloned(),
                )
                .collect();
            slot.store(Arc::new(ProviderKeys {
                keys,
                cooling,
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
        let mut ahead = self.ahead();
        mark_ahead(&mut ahead, &record.id, record.revision);
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
        let mut ahead = self.ahead();
        // The records a reload may hold still show the key usable, at the
        // revision it was chosen at; the transition will be a later one.
        if let Some(k) = slot.load().keys.iter().find(|k| &k.id == id) {
            mark_ahead(&mut ahead, id, k.revision + 1);
        }
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

/// Records that `id`'s records older than `min_revision` are stale here.
fn mark_ahead(ahead: &mut HashMap<KeyId, Ahead>, id: &KeyId, min_revision: i64) {
    let until = Instant::now() + AHEAD_FOR;
    ahead
        .entry(id.clone())
        .and_modify(|a| {
            a.min_revision = a.min_revision.max(min_revision);
            a.until = until;
        })
        .or_insert(Ahead {
            min_revision,
            until,
        });
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
    fn a_read_older_than_a_change_made_here_does_not_undo_it() {
        let vault = Vault::new(&[Secret::new(Vault::generate_key())]).unwrap();
        let pool = KeyPool::new(&[provider()]);
        let (a, b, c) = (record(1, &vault), record(2, &vault), record(3, &vault));
        pool.reload(&[a.clone(), b.clone()], &vault);
        assert_eq!(ids(&pool), ["key_pooltest0001", "key_pooltest0002"]);

        // A reload reads the store; meanwhile `a` is revoked and `c`
        // registered here. The stale read brings neither change back.
        let stale = [a.clone(), b.clone()];
        let mut revoked = a.clone();
        revoked.status = KeyStatus::Revoked;
        revoked.revision = 2;
        pool.apply(&revoked, &vault);
        pool.apply(&c, &vault);
        pool.reload(&stale, &vault);
        assert_eq!(ids(&pool), ["key_pooltest0002", "key_pooltest0003"]);

        // Once the store has caught up, its records rule again: `b`, revoked
        // through another replica, leaves with the next reload.
        let mut b_elsewhere = b.clone();
        b_elsewhere.status = KeyStatus::Revoked;
        b_elsewhere.revision = 2;
        pool.reload(&[revoked, b_elsewhere, c], &vault);
        assert_eq!(ids(&pool), ["key_pooltest0003"]);
        assert!(pool.ahead().is_empty());
    }

    #[test]
    fn a_read_older_than_a_refusal_keeps_the_key_out_until_the_store_moves_on() {
        let vault = Vault::new(&[Secret::new(Vault::generate_key())]).unwrap();
        let pool = KeyPool::new(&[provider()]);
        let a = record(1, &vault);
        pool.reload(std::slice::from_ref(&a), &vault);
        pool.suspend("openai", &a.id, KeyEvent::QuotaExhausted);
        // The transition is not stored yet: the store still says active.
        pool.reload(std::slice::from_ref(&a), &vault);
        assert!(ids(&pool).is_empty());
        // Stored, then reactivated through another replica.
        let mut exhausted = a.clone();
        exhausted.status = KeyStatus::Exhausted;
        exhausted.revision = 2;
        pool.reload(&[exhausted], &vault);
        assert!(ids(&pool).is_empty());
        let mut reactivated = a.clone();
        reactivated.revision = 3;
        pool.reload(&[reactivated], &vault);
        assert_eq!(ids(&pool), ["key_pooltest0001"]);
    }
}
