//! Choosing a key among a provider's active keys: `least_loaded` (default),
//! `round_robin` or `weighted`. Lock-free: one atomic increment of the
//! provider's cursor plus a scan of the key list, which for `least_loaded`
//! and `round_robin` stops at the first idle (or first usable) key.

use super::pool::{PoolKey, ProviderKeys};
use crate::config::Policy;
use rand::Rng;
use std::sync::Arc;
use std::sync::atomic::Ordering;

/// Picks a key that `usable` accepts (callers skip keys over their limits or
/// already tried by this request), or `None` when there is none.
pub fn pick(
    pool: &ProviderKeys,
    policy: Policy,
    usable: impl Fn(&PoolKey) -> bool,
) -> Option<Arc<PoolKey>> {
    let keys = &pool.keys;
    let n = keys.len();
    if n == 0 {
        return None;
    }
    match policy {
        Policy::RoundRobin => {
            let start = pool.cursor.fetch_add(1, Ordering::Relaxed);
            let offset = (0..n).find(|i| usable(&keys[(start + i) % n]))?;
            Some(chosen(pool, start, offset, n))
        }
        Policy::LeastLoaded => {
            // Scanning from a rotating start makes the first of several
            // equally loaded keys a different one each time.
            let start = pool.cursor.fetch_add(1, Ordering::Relaxed);
            let mut best: Option<(usize, u32)> = None;
            for i in 0..n {
                let k = &keys[(start + i) % n];
                let load = k.in_flight();
                if best.is_some_and(|(_, least)| load >= least) || !usable(k) {
                    continue;
                }
                best = Some((i, load));
                // Nothing beats an idle key: with many keys the scan ends
                // after a few, not after the whole list.
                if load == 0 {
                    break;
                }
            }
            best.map(|(offset, _)| chosen(pool, start, offset, n))
        }
        Policy::Weighted => {
            let total: u64 = keys
                .iter()
                .filter(|k| usable(k))
                .map(|k| u64::from(k.weight))
                .sum();
            if total == 0 {
                return None;
            }
            let mut point = rand::rng().random_range(0..total);
            keys.iter()
                .filter(|k| usable(k))
                .find(|k| {
                    let w = u64::from(k.weight);
                    if point < w {
                        true
                    } else {
                        point -= w;
                        false
                    }
                })
                .cloned()
        }
    }
}

/// The key `offset` places after `start`. When keys were skipped to reach
/// it (busy, limited, resting), the cursor moves past it: the next request
/// starts after the chosen key, so a skipped key's turn does not fall to
/// its neighbour every time (ties stay round-robin).
fn chosen(pool: &ProviderKeys, start: usize, offset: usize, n: usize) -> Arc<PoolKey> {
    if offset > 0 {
        pool.cursor
            .fetch_max(start.wrapping_add(offset + 1), Ordering::Relaxed);
    }
    pool.keys[(start + offset) % n].clone()
}
