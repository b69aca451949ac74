//! The key pool against reloads that race with changes made through this
//! replica: a store read taken before a revoke, a registration or a
//! provider's refusal must not undo it when it is published. And the
//! policies' turns among the keys that can serve.

mod common;
#[path = "common/logs.rs"]
mod logs;

use chrono::Utc;
use common::records::{active_record, openai_provider};
use keyrouter::config::Policy;
use keyrouter::keys::pool::KeyPool;
use keyrouter::keys::{KeyEvent, KeyStatus, Vault, select};
use keyrouter::secret::Secret;
use std::time::{Duration, Instant};

/// The keys that would serve now (resting ones left out).
fn ids(pool: &KeyPool) -> Vec<String> {
    let keys = pool.snapshot("openai").unwrap();
    let now = Utc::now();
    keys.keys
        .iter()
        .filter(|k| !keys.is_resting(&k.id, now))
        .map(|k| k.id.as_str().to_owned())
        .collect()
}

fn vault() -> Vault {
    Vault::new(&[Secret::new(Vault::generate_key())]).unwrap()
}

#[test]
fn a_read_older_than_a_change_made_here_does_not_undo_it() {
    let vault = vault();
    let pool = KeyPool::new(&[openai_provider()]);
    let (a, b, c) = (
        active_record(1, &vault),
        active_record(2, &vault),
        active_record(3, &vault),
    );
    pool.reload(&[a.clone(), b.clone()], &vault);
    assert_eq!(ids(&pool), ["key_test000001", "key_test000002"]);

    // A reload reads the store; meanwhile `a` is revoked and `c`
    // registered here. The stale read brings neither change back.
    let stale = [a.clone(), b.clone()];
    let mut revoked = a.clone();
    revoked.status = KeyStatus::Revoked;
    revoked.revision = 2;
    pool.apply(&revoked, &vault);
    pool.apply(&c, &vault);
    pool.reload(&stale, &vault);
    assert_eq!(ids(&pool), ["key_test000002", "key_test000003"]);

    // Once the store has caught up, its records rule again: `b`, revoked
    // through another replica, leaves with the next reload.
    let mut b_elsewhere = b.clone();
    b_elsewhere.status = KeyStatus::Revoked;
    b_elsewhere.revision = 2;
    pool.reload(&[revoked.clone(), b_elsewhere, c], &vault);
    assert_eq!(ids(&pool), ["key_test000003"]);

    // A write overtaken on its way here (a transition stored before the
    // revoke, applied after it) changes nothing.
    let mut overtaken = revoked;
    overtaken.status = KeyStatus::Active;
    overtaken.revision = 1;
    pool.apply(&overtaken, &vault);
    assert_eq!(ids(&pool), ["key_test000003"]);
}

#[test]
fn a_refused_key_stays_out_until_its_transition_is_stored() {
    let vault = vault();
    let pool = KeyPool::new(&[openai_provider()]);
    let a = active_record(1, &vault);
    pool.reload(std::slice::from_ref(&a), &vault);
    pool.suspend("openai", &a.id, KeyEvent::QuotaExhausted);
    // The store still says active, even at a later revision (a label
    // changed through another replica, or through this one).
    pool.reload(std::slice::from_ref(&a), &vault);
    let mut relabelled = a.clone();
    relabelled.revision = 2;
    pool.reload(std::slice::from_ref(&relabelled), &vault);
    assert!(ids(&pool).is_empty());
    pool.apply(&relabelled, &vault);
    assert!(ids(&pool).is_empty());
    pool.reload(std::slice::from_ref(&relabelled), &vault);
    assert!(ids(&pool).is_empty());
    // The transition is stored and applied; later the key is
    // reactivated through another replica.
    let mut exhausted = relabelled.clone();
    exhausted.status = KeyStatus::Exhausted;
    exhausted.revision = 3;
    pool.apply(&exhausted, &vault);
    pool.reload(&[exhausted], &vault);
    assert!(ids(&pool).is_empty());
    let mut reactivated = a.clone();
    reactivated.revision = 4;
    pool.reload(&[reactivated], &vault);
    assert_eq!(ids(&pool), ["key_test000001"]);
}

#[test]
fn a_refusal_that_stores_nothing_lets_the_store_rule_again() {
    let vault = vault();
    let pool = KeyPool::new(&[openai_provider()]);
    let a = active_record(1, &vault);
    pool.reload(std::slice::from_ref(&a), &vault);
    // The write for an earlier refusal began before this one: it settles
    // nothing about it.
    let earlier_write = Instant::now() - Duration::from_millis(10);
    pool.suspend("openai", &a.id, KeyEvent::Rejected);
    pool.reload(std::slice::from_ref(&a), &vault);
    assert!(ids(&pool).is_empty());
    pool.settled(&a.id, earlier_write);
    pool.reload(std::slice::from_ref(&a), &vault);
    assert!(ids(&pool).is_empty());
    // The write for this refusal stores nothing: the store rules again.
    pool.settled(&a.id, Instant::now());
    pool.reload(std::slice::from_ref(&a), &vault);
    assert_eq!(ids(&pool), ["key_test000001"]);
}

#[test]
fn a_held_key_keeps_its_cooldown_and_returns_once_its_refusal_is_dealt_with() {
    let vault = vault();
    let pool = KeyPool::new(&[openai_provider()]);
    let a = active_record(1, &vault);
    pool.reload(std::slice::from_ref(&a), &vault);
    let until = Utc::now() + chrono::Duration::seconds(30);
    pool.suspend("openai", &a.id, KeyEvent::RateLimited { until });
    let cooling = |pool: &KeyPool| pool.snapshot("openai").unwrap().cooling.len();
    assert_eq!(cooling(&pool), 1);
    // An operator's label change lands first: the key stays out, and its
    // cooldown still counts (429 with Retry-After, not 503).
    let mut relabelled = a.clone();
    relabelled.revision = 3;
    pool.apply(&relabelled, &vault);
    assert!(ids(&pool).is_empty());
    assert_eq!(cooling(&pool), 1);
    // The refusal's transition (revision 2) arrives late and changes
    // nothing; its write ends, and the store (which moved on to revision
    // 3, active) rules again.
    let mut cooling_down = a.clone();
    cooling_down.status = KeyStatus::CoolingDown { until };
    cooling_down.revision = 2;
    pool.apply(&cooling_down, &vault);
    // (The write began after the refusal.)
    pool.settled(&a.id, Instant::now());
    pool.reload(std::slice::from_ref(&relabelled), &vault);
    assert_eq!(ids(&pool), ["key_test000001"]);
}

/// A rate-limited key serves again the moment its cooldown ends, before
/// its recovery is stored and read back; it keeps its entry (and so its
/// counters) while it rests.
#[test]
fn a_resting_key_serves_again_when_its_cooldown_ends() {
    let vault = vault();
    let pool = KeyPool::new(&[openai_provider()]);
    let a = active_record(1, &vault);
    pool.reload(std::slice::from_ref(&a), &vault);
    let until = Utc::now() + chrono::Duration::milliseconds(300);
    pool.suspend("openai", &a.id, KeyEvent::RateLimited { until });
    assert!(ids(&pool).is_empty());
    // The stored transition comes back with the next reload.
    let mut cooling_down = a.clone();
    cooling_down.status = KeyStatus::CoolingDown { until };
    cooling_down.revision = 2;
    pool.settled(&a.id, Instant::now());
    pool.reload(std::slice::from_ref(&cooling_down), &vault);
    assert!(ids(&pool).is_empty());
    std::thread::sleep(Duration::from_millis(350));
    assert_eq!(ids(&pool), ["key_test000001"]);
}

/// While one key cannot serve (busy, at its limit, resting), the others
/// share its turns evenly: its turn does not fall to its neighbour each
/// time round.
#[test]
fn a_key_that_cannot_serve_leaves_its_turns_to_all_the_others() {
    let vault = vault();
    let pool = KeyPool::new(&[openai_provider()]);
    let records: Vec<_> = (1..=4).map(|n| active_record(n, &vault)).collect();
    pool.reload(&records, &vault);
    let keys = pool.snapshot("openai").unwrap();
    let out = &records[0].id;
    for policy in [Policy::RoundRobin, Policy::LeastLoaded] {
        let mut turns = std::collections::HashMap::new();
        for _ in 0..30 {
            let key = select::pick(&keys, policy, |k| &k.id != out).unwrap();
            *turns.entry(key.id.as_str().to_owned()).or_insert(0) += 1;
        }
        assert_eq!(turns.len(), 3, "{policy:?}: {turns:?}");
        assert!(turns.values().all(|&n| n == 10), "{policy:?}: {turns:?}");
    }
}

/// A key whose material this replica cannot open (sealed with another
/// Fernet key) is reported once, not at every reload; a new revision of it
/// is tried again, and opens once it is sealed with a key of the ring.
#[test]
fn a_key_that_cannot_be_opened_is_reported_once_per_revision() {
    let mut foreign = active_record(1, &vault());
    let vault = vault();
    let pool = KeyPool::new(&[openai_provider()]);
    let logs = logs::Captured::default();
    let _guard = logs::capture(&logs);
    let skipped = || logs.text().matches("key skipped").count();

    for _ in 0..3 {
        let loaded = pool.reload(std::slice::from_ref(&foreign), &vault);
        assert_eq!((loaded.opened, loaded.unopened), (0, 1));
    }
    assert_eq!(skipped(), 1, "{}", logs.text());
    assert!(logs.text().contains("key_test000001"), "{}", logs.text());

    foreign.revision = 2;
    pool.reload(std::slice::from_ref(&foreign), &vault);
    assert_eq!(skipped(), 2, "{}", logs.text());

    let mut resealed = active_record(1, &vault);
    resealed.revision = 3;
    let loaded = pool.reload(std::slice::from_ref(&resealed), &vault);
    assert_eq!((loaded.opened, loaded.unopened), (1, 0));
    assert_eq!(ids(&pool), ["key_test000001"]);
}
