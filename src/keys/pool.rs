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
//! applied here meanwhile is newer than they are. Each such change notes the
//! revision it stands for (a provider's refusal: that its transition is yet
//! to be stored), and a reload keeps the pool's entry for such a key until
//! the store shows that revision, so a stale read does not bring back a key
//! revoked or refused a moment ago. (Should a transition never be stored,
//! the store's view wins again after the ten minutes it is retried for.)
//!
//! A key's counters (requests and tokens in the current windows, requests
//! in flight) outlive its entries: a key that rests (cooling down) and
//! comes back, or whose label changes, keeps counting where it was, so
//! coming back does not reset its limits.

use super::{KeyEvent, KeyId, KeyRecord, KeyState, Limits, Vault};
use crate::config::{ProviderConfig, ProviderKind};
use crate::limits::{KeyCounters, KeyUsage};
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
    /// In-flight count and rate windows: the key's own, shared by every
    /// entry it ever has (see [`KeyPool::counters`]).
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

/// The keys of one provider that serve or will serve again soon: active
/// ones and those cooling down, and when each rest ends.
#[derive(Default)]
pub struct ProviderKeys {
    /// Active and cooling-down keys. A cooling-down key is in the list for
    /// the moment its cooldown ends: from then on it serves, without
    /// waiting for its recovery to be stored and read back (a client told
    /// `Retry-After: N` finds it ready after N seconds).
    pub keys: Vec<Arc<PoolKey>>,
    /// Keys cooling down after a provider 429, with the end of each
    /// cooldown: they make "all keys busy" a 429 with `Retry-After` rather
    /// than a 503. A map: a request asks about each key it looks at, and
    /// after a burst of 429s many keys rest at once.
    pub cooling: HashMap<KeyId, DateTime<Utc>>,
    /// Rotating start position for round-robin and tie-breaking.
    pub cursor: AtomicUsize,
}

impl ProviderKeys {
    /// The earliest end of a cooldown still running at `now`, if any. (A
    /// cooldown that ended stays listed until its recovery is read back;
    /// its key serves meanwhile.)
    pub fn next_cooldown_end(&self, now: DateTime<Utc>) -> Option<DateTime<Utc>> {
        self.cooling
            .values()
            .copied()
            .filter(|until| *until > now)
            .min()
    }

    /// Whether key `id` is still resting at `now`.
    pub fn is_resting(&self, id: &KeyId, now: DateTime<Utc>) -> bool {
        self.cooling.get(id).is_some_and(|until| *until > now)
    }

    /// A copy with the same cursor position, with `id` taken out.
    fn without(&self, id: &KeyId) -> ProviderKeys {
        ProviderKeys {
            keys: self.keys.iter().filter(|k| &k.id != id).cloned().collect(),
            cooling: self
                .cooling
                .iter()
                .filter(|(k, _)| *k != id)
                .map(|(k, until)| (k.clone(), *until))
                .collect(),
            cursor: AtomicUsize::new(self.cursor.load(Ordering::Relaxed)),
        }
    }
}

/// Every provider's active keys.
pub struct KeyPool {
    providers: HashMap<String, (ProviderKind, ArcSwap<ProviderKeys>)>,
    /// Keys changed here one by one ([`KeyPool::apply`],
    /// [`KeyPool::suspend`]), possibly ahead of what a reload read. Writers
    /// hold this lock while they publish, so a reload never publishes over a
    /// change it did not take into account.
    ahead: Mutex<HashMap<KeyId, Ahead>>,
    /// Every key's counters, while the key exists and is not revoked,
    /// whether or not it is in a list now. Read when an entry is built and
    /// by the management API, never by requests.
    counters: Mutex<HashMap<KeyId, Arc<KeyCounters>>>,
    /// The revision at which each key that should serve could not be
    /// opened. The Fernet keys are fixed for the life of the process, so a
    /// revision that failed once fails again: it is neither decrypted nor
    /// logged again at every reload, only when the key changes.
    unopened: Mutex<HashMap<KeyId, i64>>,
}

#[derive(Clone, Copy)]
struct Ahead {
    /// The revision this replica last applied: older records are stale.
    revision: i64,
    /// When a provider refused the key, while that refusal's transition is
    /// not stored: the key stays out whatever the records say.
    refused_at: Option<Instant>,
    /// After this the store's view wins again (a transition is given up
    /// after as long).
    until: Instant,
}

/// What a reload made of the keys that should serve (active or cooling
/// down, material kept).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Loaded {
    /// Keys in the pool.
    pub opened: usize,
    /// Keys left out: their material does not decrypt with any configured
    /// Fernet key (or is not a valid header value); each is logged.
    pub unopened: usize,
}

impl Loaded {
    /// Keys exist but none opens: the Fernet keys are not the ones the
    /// store was written with, and every request would find no key.
    pub fn none_opens(&self) -> bool {
        self.opened == 0 && self.unopened > 0
    }
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
            counters: Mutex::default(),
            unopened: Mutex::default(),
        }
    }

    /// The counters of key `id`, created on first use.
    fn counters(&self, id: &KeyId) -> Arc<KeyCounters> {
        let mut all = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        all.entry(id.clone()).or_default().clone()
    }

    /// This replica's live counts of key `id`, resting or not (zero for a
    /// key it has not served).
    pub fn usage(&self, id: &KeyId) -> KeyUsage {
        let all = self.counters.lock().unwrap_or_else(PoisonError::into_inner);
        all.get(id).map(|c| c.usage()).unwrap_or_default()
    }

    /// The provider's active keys now (one atomic load).
    pub fn snapshot(&self, provider_id: &str) -> Option<Arc<ProviderKeys>> {
        self.providers.get(provider_id).map(|(_, k)| k.load_full())
    }

    fn ahead(&self) -> MutexGuard<'_, HashMap<KeyId, Ahead>> {
        self.ahead.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn unopened(&self) -> MutexGuard<'_, HashMap<KeyId, i64>> {
        self.unopened.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Replaces every provider's lists with the keys among `records` (all
    /// keys from the store), except where this replica is ahead of them: a
    /// key changed here since the read, or refused by its provider with the
    /// transition not stored yet, keeps the entry it has until the store
    /// catches up. Entries whose revision did not change are kept as they
    /// are. Returns how many keys that should serve could be opened and how
    /// many could not.
    pub fn reload(&self, records: &[KeyRecord], vault: &Vault) -> Loaded {
        // Changed keys are decrypted before the lock is taken, so the lock
        // (which a request refusing a key takes) is never held for all of
        // them at once.
        type Built<'r> = Vec<(&'r KeyRecord, Option<Arc<PoolKey>>)>;
        let built: Vec<(&ArcSwap<ProviderKeys>, Built)> = self
            .providers
            .iter()
            .map(|(provider_id, (kind, slot))| {
                let current = slot.load();
                let previous = by_id(&current.keys);
                let mine = records
                    .iter()
                    .filter(|r| &r.provider_id == provider_id)
                    .map(|r| (r, self.entry(r, *kind, previous.get(&r.id).copied(), vault)))
                    .collect();
                (slot, mine)
            })
            .collect();
        let read: HashMap<&KeyId, &KeyRecord> = records.iter().map(|r| (&r.id, r)).collect();
        let mut loaded = Loaded::default();
        for (record, entry) in built.iter().flat_map(|(_, mine)| mine) {
            let serves = matches!(
                record.status.state(),
                KeyState::Active | KeyState::CoolingDown
            );
            match entry {
                Some(_) => loaded.opened += 1,
                None if serves && record.sealed.is_some() => loaded.unopened += 1,
                None => {}
            }
        }
        // Counters of keys gone or revoked (through any replica) go too.
        self.counters
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|id, _| {
                read.get(id)
                    .is_some_and(|r| r.status.state() != KeyState::Revoked)
            });
        self.unopened().retain(|id, _| read.contains_key(id));

        let mut ahead = self.ahead();
        let now = Instant::now();
        ahead.retain(|_, a| a.until > now);
        // Whether this replica holds something newer for `id` than the read.
        let is_ahead = |id: &KeyId| {
            ahead.get(id).is_some_and(|a| {
                a.refused_at.is_some() || read.get(id).is_none_or(|r| r.revision < a.revision)
            })
        };
        for (slot, mine) in built {
            let current = slot.load();
            // An entry published meanwhile for the same revision is the one
            // requests hold counters in.
            let published = by_id(&current.keys);
            let fresh = || mine.iter().filter(|(r, _)| !is_ahead(&r.id));
            let keys = fresh()
                .filter_map(|(r, e)| match published.get(&r.id) {
                    Some(k) if k.revision == r.revision => Some(Arc::clone(k)),
                    _ => e.clone(),
                })
                .chain(current.keys.iter().filter(|k| is_ahead(&k.id)).cloned())
                .collect();
            let cooling = fresh()
                .filter_map(|(r, _)| Some((r.id.clone(), r.status.cooldown_until()?)))
                .chain(
                    current
                        .cooling
                        .iter()
                        .filter(|(id, _)| is_ahead(id))
                        .map(|(id, until)| (id.clone(), *until)),
                )
                .collect();
            slot.store(Arc::new(ProviderKeys {
                keys,
                cooling,
                cursor: AtomicUsize::new(current.cursor.load(Ordering::Relaxed)),
            }));
        }
        loaded
    }

    /// Applies one changed record at once (a management API write, a stored
    /// transition). A record older than one applied already (a write that
    /// was overtaken on its way here) changes nothing. A record that leaves
    /// the key usable (a label changed, a cooldown over) does not bring back
    /// a key whose refusal is still being stored; one that does not (the
    /// refusal's transition, a revoke) ends that wait.
    pub fn apply(&self, record: &KeyRecord, vault: &Vault) {
        let Some((kind, slot)) = self.providers.get(&record.provider_id) else {
            return;
        };
        let mut ahead = self.ahead();
        let previous = ahead.get(&record.id).copied();
        if previous.is_some_and(|a| record.revision < a.revision) {
            return;
        }
        let usable = record.status.state() == KeyState::Active;
        let refused_at = previous.and_then(|a| a.refused_at).filter(|_| usable);
        ahead.insert(
            record.id.clone(),
            Ahead {
                revision: record.revision,
                refused_at,
                until: Instant::now() + AHEAD_FOR,
            },
        );
        slot.rcu(|current| {
            let mut next = current.without(&record.id);
            let previous = current.keys.iter().find(|k| k.id == record.id);
            if refused_at.is_some() {
                // Still held out: a cooldown the refusal started still
                // counts, and a key resting for it stays in the list (with
                // the record's limits and weight) for when it ends.
                let cooling = current.cooling.get(&record.id);
                next.cooling
                    .extend(cooling.map(|until| (record.id.clone(), *until)));
                if cooling.is_some() {
                    next.keys.extend(self.entry(record, *kind, previous, vault));
                }
            } else {
                next.keys.extend(self.entry(record, *kind, previous, vault));
            }
            if let Some(until) = record.status.cooldown_until() {
                next.cooling.insert(record.id.clone(), until);
            }
            next
        });
    }

    /// Stops choosing a key that a provider just refused, before the
    /// transition is stored (a rate-limited key rests: it joins the cooling
    /// list and serves again when the rest ends). A key that is no longer in
    /// the pool (revoked meanwhile) stays out.
    /// Reloads (and writes that leave it usable) keep it out until the
    /// write that deals with the refusal ends ([`KeyPool::settled`]).
    pub fn suspend(&self, provider_id: &str, id: &KeyId, event: KeyEvent) {
        let Some((_, slot)) = self.providers.get(provider_id) else {
            return;
        };
        let mut ahead = self.ahead();
        let now = Instant::now();
        let until = now + AHEAD_FOR;
        ahead
            .entry(id.clone())
            .and_modify(|a| {
                a.refused_at = Some(now);
                a.until = until;
            })
            .or_insert(Ahead {
                revision: 0,
                refused_at: Some(now),
                until,
            });
        slot.rcu(|current| {
            let entry = current.keys.iter().find(|k| &k.id == id);
            let known = entry.is_some() || current.cooling.contains_key(id);
            let mut next = current.without(id);
            if let (true, KeyEvent::RateLimited { until }) = (known, event) {
                next.keys.extend(entry.cloned());
                next.cooling.insert(id.clone(), until);
            }
            next
        });
    }

    /// The pool entry for a record, if the key is active or cooling down and
    /// its material opens; `previous` (the key's entry now, if any) is
    /// reused when its revision is the record's. A revision that did not
    /// open is logged once and not tried again.
    fn entry(
        &self,
        record: &KeyRecord,
        kind: ProviderKind,
        previous: Option<&Arc<PoolKey>>,
        vault: &Vault,
    ) -> Option<Arc<PoolKey>> {
        if !matches!(
            record.status.state(),
            KeyState::Active | KeyState::CoolingDown
        ) {
            return None;
        }
        if let Some(same) = previous.filter(|k| k.revision == record.revision) {
            return Some(same.clone());
        }
        let sealed = record.sealed.as_ref()?;
        if self.unopened().get(&record.id) == Some(&record.revision) {
            return None;
        }
        let opened = match vault.open(sealed) {
            Err(_) => Err("its material does not decrypt with KEYROUTER_FERNET_KEYS"),
            Ok(material) => match credential_header(kind, &material) {
                Some(credential) => Ok((material, credential)),
                None => Err("its material is not a valid header value"),
            },
        };
        let (material, credential) = match opened {
            Ok(opened) => {
                self.unopened().remove(&record.id);
                opened
            }
            Err(why) => {
                tracing::error!(key_id = %record.id, revision = record.revision, "key skipped: {why}");
                self.unopened().insert(record.id.clone(), record.revision);
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
            counters: self.counters(&record.id),
            requests: OnceLock::new(),
        }))
    }

    /// The refusals of `id` made before `until` are dealt with: their
    /// transition is stored, or none will be (the key had moved on, the
    /// store stayed unreachable). Unless the key was refused again since,
    /// the store's view of it rules again.
    pub fn settled(&self, id: &KeyId, until: Instant) {
        if let Some(a) = self.ahead().get_mut(id)
            && a.refused_at.is_some_and(|at| at <= until)
        {
            a.refused_at = None;
        }
    }
}

/// A provider's entries by key id, so a reload finds each key's previous
/// entry without a search per key.
fn by_id(keys: &[Arc<PoolKey>]) -> HashMap<&KeyId, &Arc<PoolKey>> {
    keys.iter().map(|k| (&k.id, k)).collect()
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
