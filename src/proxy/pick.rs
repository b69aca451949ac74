//! Choosing the key for one attempt: the provider's policy among its active
//! keys, skipping keys this request already tried and keys over their own
//! limits, with a limiter permit for the one chosen.
//!
//! When nothing is left the answer says why: some key will have capacity
//! again (429 with `Retry-After` until the earliest moment), or the provider
//! has no key that is active or cooling down at all (503).

use super::error::ProxyError;
use crate::config::Policy;
use crate::keys::KeyId;
use crate::keys::pool::{PoolKey, ProviderKeys};
use crate::keys::select;
use crate::limits::{self, KeyRef, Limiter, Permit, Refusal};
use chrono::Utc;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// A chosen key with its permit.
pub struct Chosen {
    pub key: Arc<PoolKey>,
    pub permit: Permit,
}

/// Why no key could be chosen, before it becomes a [`ProxyError`].
pub enum NoKey {
    /// Capacity returns after this long.
    Busy(Duration),
    /// No active or cooling-down key at all.
    None,
    /// The shared limiter is down and configured to deny.
    LimiterDown,
}

impl From<NoKey> for ProxyError {
    fn from(n: NoKey) -> Self {
        match n {
            NoKey::Busy(wait) => ProxyError::AllKeysLimited {
                retry_after_secs: whole_seconds(wait),
            },
            NoKey::None => ProxyError::NoActiveKey,
            NoKey::LimiterDown => ProxyError::LimiterUnavailable,
        }
    }
}

/// Whole seconds for `Retry-After`, rounded up, at least 1.
pub fn whole_seconds(d: Duration) -> u64 {
    d.as_secs()
        .saturating_add(u64::from(d.subsec_nanos() > 0))
        .max(1)
}

/// Picks a key not in `tried` and acquires its permit. Each key is asked
/// at most once per call, so the loop is bounded by the pool size.
pub async fn choose(
    keys: &ProviderKeys,
    policy: Policy,
    limiter: &Limiter,
    tried: &[Arc<PoolKey>],
    estimated_tokens: u64,
    on_key_limited: impl Fn(),
) -> Result<Chosen, NoKey> {
    let mut refused: Vec<KeyId> = Vec::new();
    // The shared limiter refused some key for being down ("deny"); keys
    // without limits need no limiter and are still tried.
    let mut limiter_down = false;
    let mut soonest: Option<Duration> = None;
    let mut note = |wait: Duration| soonest = Some(soonest.map_or(wait, |s| s.min(wait)));
    // One clock read for the whole scan, not one per key (and none for
    // cooldowns while no key rests).
    let now_ms = limits::now_ms();
    let resting_at = (!keys.cooling.is_empty()).then(Utc::now);
    loop {
        let key = select::pick(keys, policy, |k| {
            !k.counters.is_limited_at(now_ms)
                && !tried.iter().any(|t| t.id == k.id)
                && !refused.contains(&k.id)
                && resting_at.is_none_or(|now| !keys.is_resting(&k.id, now))
        });
        let Some(key) = key else { break };
        let key_ref = KeyRef {
            id: key.id.as_str(),
            limits: &key.limits,
            counters: &key.counters,
        };
        match limiter.acquire(key_ref, estimated_tokens).await {
            Ok(permit) => return Ok(Chosen { key, permit }),
            Err(Refusal::Limited { retry_after }) => {
                on_key_limited();
                note(retry_after);
                refused.push(key.id.clone());
            }
            Err(Refusal::BackendUnavailable) => {
                limiter_down = true;
                refused.push(key.id.clone());
            }
        }
    }
    if limiter_down {
        return Err(NoKey::LimiterDown);
    }
    // Keys skipped on an earlier refusal still count toward "when".
    let now = Instant::now();
    for k in &keys.keys {
        if let Some(until) = k.counters.limited_until().filter(|t| *t > now) {
            note(until - now);
        }
    }
    let wall_now = Utc::now();
    if let Some(end) = keys.next_cooldown_end(wall_now) {
        note((end - wall_now).to_std().unwrap_or(Duration::ZERO));
    }
    let any_usable = !keys.keys.is_empty() || !keys.cooling.is_empty();
    match soonest {
        Some(wait) => Err(NoKey::Busy(wait)),
        // Active keys exist but this request tried them all already.
        None if any_usable => Err(NoKey::Busy(Duration::from_secs(1))),
        None => Err(NoKey::None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        assert_eq!(whole_seconds(Duration::ZERO), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1000)), 1);
        assert_eq!(whole_seconds(Duration::from_millis(1001)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(30)), 30);
    }
}
