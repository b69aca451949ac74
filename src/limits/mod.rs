//! Per-key limits (`rpm`, `tpm`, `max_concurrent`) and client `rpm`, counted
//! in this process (`local`) or shared by every replica through Redis
//! (`redis`).
//!
//! # Algorithm: a sliding-window counter
//!
//! `rpm` and `tpm` are counted in fixed one-minute windows; a decision uses
//! the estimate of the last sixty seconds
//!
//! ```text
//! estimate = ceil(previous * (1 - elapsed / 60 s)) + current
//! ```
//!
//! and admits a cost when `estimate + cost <= limit` (the approach
//! Cloudflare describes in "Counting things, a lot of different things").
//! Why this one: two counters per limit, so the local state is two atomics
//! and the Redis state two small keys that expire by themselves; a sliding
//! log would keep one entry per request (tens of thousands per busy key), a
//! token bucket needs a read-modify-write of a float plus a timestamp and
//! cannot take the token correction that `settle` makes after the fact.
//!
//! Error bound. The estimate assumes the previous window's traffic was spread
//! evenly over it; for steady traffic it is exact, and on real traffic
//! Cloudflare measured 0.003 % of requests wrongly allowed or refused. It
//! can never admit more than `limit` within one fixed window (the current
//! count alone must fit), and it rounds up, so it never under-counts. The
//! adversarial worst case is a full previous window spent in its last
//! instant followed by the current window filling as that weight decays:
//! up to ~2 x `limit` in one sliding minute, though still `limit` per fixed
//! minute on average.
//!
//! `Retry-After` is the time until the estimate plus this request's cost
//! fits again if nothing else arrives meanwhile (`local::wait_ms` has the
//! closed form), the longest among the limits that refused. A refusal for
//! `max_concurrent` alone says one second: a slot frees whenever a response
//! ends, which no counter can predict.
//!
//! Tokens are reserved at the estimate before the request is sent;
//! [`Permit::settle`] adds `actual - estimate` (never going below zero) to
//! the window the reservation went into, if that window is still the
//! current or the previous one (else it no longer counts and nothing is
//! corrected). A cost that can never fit (`estimate > tpm`) is checked as if
//! it were exactly `tpm`: it passes when the key's window is otherwise empty
//! instead of blocking the key forever.
//!
//! # Backends
//!
//! - `local`: see `local.rs`: atomics per key, no lock on the hot path.
//! - `redis`: see `redis.rs`: one Lua script per decision (one round trip)
//!   that checks and records all three limits atomically, timed by the
//!   Redis server's clock. When Redis is unreachable the limiter counts
//!   locally (`on_backend_error = "local"`) or refuses keys that have limits
//!   (`"deny"`), and tries Redis again at most once a second.
//!
//! Whatever the backend, every permit counts in its key's local in-flight
//! counter (read by `least_loaded`) and in the local windows, so
//! [`KeyCounters::usage`] always shows this replica's traffic and a fallback
//! to local counting starts from it rather than from zero.

mod local;
mod redis;

pub use local::{KeyCounters, KeyUsage, now_ms};

use crate::config::{OnBackendError, RateLimitBackend, RateLimitConfig};
use crate::keys::Limits;
use crate::metrics::Metrics;
use local::{COUNT_MAX, ClientWindows, LocalPermit};
use redis::{RedisBackend, Remote, RemotePermit};
use std::sync::Arc;
use std::time::Duration;

/// The length of a counting window.
const WINDOW_MS: u64 = 60_000;

/// The `Retry-After` of a refusal for `max_concurrent` alone.
const CONCURRENCY_RETRY: Duration = Duration::from_secs(1);

/// A key as the limiter needs it. The caller owns the counters (one `Arc`
/// per key id, kept across pool reloads).
#[derive(Clone, Copy)]
pub struct KeyRef<'a> {
    pub id: &'a str,
    pub limits: &'a Limits,
    pub counters: &'a Arc<KeyCounters>,
}

/// Why an attempt may not go ahead.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Over a limit; `retry_after` is never zero (the caller rounds it up to
    /// whole seconds).
    Limited { retry_after: Duration },
    /// Redis is unreachable and `on_backend_error = "deny"`.
    BackendUnavailable,
}

/// A refusal as a backend reports it, before it becomes a [`Refusal`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Limited {
    /// Wait for rpm/tpm; 0 when they fit.
    window_wait_ms: u64,
    concurrency_full: bool,
}

impl Limited {
    fn retry_after(self) -> Duration {
        let window = Duration::from_millis(self.window_wait_ms);
        let concurrency = if self.concurrency_full {
            CONCURRENCY_RETRY
        } else {
            Duration::ZERO
        };
        window.max(concurrency).max(Duration::from_millis(1))
    }
}

/// Leave to make one upstream attempt with a key. It holds a concurrency
/// slot and a token reservation until [`Permit::settle`] or drop.
pub struct Permit {
    local: LocalPermit,
    /// The Redis side, when Redis made the decision.
    remote: Option<RemotePermit>,
}

impl Permit {
    /// Corrects the token reservation to the real count and releases the
    /// permit. The Redis side is updated from a spawned task, never on the
    /// response path.
    pub fn settle(mut self, actual_tokens: u64) {
        let actual_tokens = actual_tokens.min(COUNT_MAX);
        self.local.correct(actual_tokens);
        if let Some(remote) = self.remote.take() {
            remote.release(actual_tokens);
        }
    }
}

/// An unsettled permit is released with its estimate standing (a response
/// without usage, a client gone mid-stream).
impl Drop for Permit {
    fn drop(&mut self) {
        if let Some(remote) = self.remote.take() {
            remote.release(self.local.estimate());
        }
    }
}

/// The limiter: one per process, shared by every request.
pub struct Limiter {
    /// Client windows for local counting (and the fallback's warm state).
    clients: ClientWindows,
    /// `Some` with `rate_limit.backend = "redis"`.
    redis: Option<RedisBackend>,
}

impl Limiter {
    /// Builds the configured backend. With Redis it connects, but an
    /// unreachable Redis never fails start-up: the limiter starts in
    /// fallback and switches to Redis once it answers.
    pub async fn new(cfg: &RateLimitConfig, metrics: &Metrics) -> Limiter {
        let redis = match &cfg.backend {
            RateLimitBackend::Local => None,
            RateLimitBackend::Redis { url } => Some(
                RedisBackend::connect(
                    url,
                    &cfg.redis_prefix,
                    cfg.on_backend_error == OnBackendError::Deny,
                    metrics,
                )
                .await,
            ),
        };
        Limiter {
            clients: ClientWindows::default(),
            redis,
        }
    }

    /// One decision for one upstream attempt with `key`: reserves one request
    /// and `estimated_tokens` against rpm/tpm and a slot against
    /// `max_concurrent`. The permit always counts in the key's in-flight
    /// counter while it lives, limits or not. A key without limits never
    /// costs a Redis round trip.
    ///
    /// # Errors
    ///
    /// [`Refusal::Limited`] when a limit is reached (the key is then marked,
    /// see [`KeyCounters::limited_until`], unless only `max_concurrent`
    /// refused or the key has a `tpm` limit); [`Refusal::BackendUnavailable`]
    /// when Redis cannot be asked and `on_backend_error = "deny"` (keys
    /// without limits still pass).
    pub async fn acquire(&self, key: KeyRef<'_>, estimated_tokens: u64) -> Result<Permit, Refusal> {
        let estimated_tokens = estimated_tokens.min(COUNT_MAX);
        let decision = match &self.redis {
            Some(redis) if *key.limits != Limits::default() => {
                match redis
                    .acquire_key(key.id, key.limits, estimated_tokens)
                    .await
                {
                    Remote::Granted(remote) => {
                        return Ok(Permit {
                            local: local::record(key.counters, estimated_tokens, now_ms()),
                            remote: Some(remote),
                        });
                    }
                    Remote::Limited(limited) => Err(limited),
                    Remote::Unavailable if redis.denies() => {
                        return Err(Refusal::BackendUnavailable);
                    }
                    Remote::Unavailable => {
                        local::acquire(key.counters, key.limits, estimated_tokens, now_ms())
                    }
                }
            }
            _ => local::acquire(key.counters, key.limits, estimated_tokens, now_ms()),
        };
        match decision {
            Ok(local) => Ok(Permit {
                local,
                remote: None,
            }),
            Err(limited) => {
                // A `tpm` refusal depends on this request's estimate and on
                // reservations that settling may still shrink: a smaller
                // request, or the next one after a correction, may fit. So
                // only a key without `tpm` is marked for skipping.
                if limited.window_wait_ms > 0 && key.limits.tpm.is_none() {
                    key.counters
                        .mark_limited(now_ms(), Duration::from_millis(limited.window_wait_ms));
                }
                Err(Refusal::Limited {
                    retry_after: limited.retry_after(),
                })
            }
        }
    }

    /// Key `id`'s usage for the management API. `here` is this replica's
    /// view ([`KeyCounters::usage`]). With Redis, each figure that Redis
    /// counts for every replica (requests with an `rpm`, tokens with a
    /// `tpm`, slots with a `max_concurrent`) is the shared one; the others,
    /// and all of them while Redis cannot be asked, stay this replica's.
    pub async fn usage(&self, id: &str, limits: &Limits, here: KeyUsage) -> KeyUsage {
        let shared = match &self.redis {
            Some(redis) if *limits != Limits::default() => redis.usage(id, limits).await,
            _ => None,
        };
        let Some(shared) = shared else {
            return here;
        };
        KeyUsage {
            requests_last_minute: shared
                .requests_last_minute
                .unwrap_or(here.requests_last_minute),
            tokens_last_minute: shared.tokens_last_minute.unwrap_or(here.tokens_last_minute),
            in_flight: shared.in_flight.unwrap_or(here.in_flight),
        }
    }

    /// One request of a client against its `rpm` (the JWT claim), counted in
    /// the same backend as the keys. An `rpm` of 0 admits nothing.
    ///
    /// # Errors
    ///
    /// As [`Limiter::acquire`].
    pub async fn acquire_client(&self, client_id: &str, rpm: u32) -> Result<(), Refusal> {
        if rpm == 0 {
            return Err(Refusal::Limited {
                retry_after: Duration::from_millis(WINDOW_MS),
            });
        }
        let decision = match &self.redis {
            Some(redis) => match redis.acquire_client(client_id, rpm).await {
                Remote::Granted(()) => {
                    // Counted locally too, for a warm fallback.
                    let _ = self.clients.acquire(client_id, None, now_ms());
                    Ok(())
                }
                Remote::Limited(limited) => Err(limited.window_wait_ms),
                Remote::Unavailable if redis.denies() => {
                    return Err(Refusal::BackendUnavailable);
                }
                Remote::Unavailable => self.clients.acquire(client_id, Some(rpm), now_ms()),
            },
            None => self.clients.acquire(client_id, Some(rpm), now_ms()),
        };
        decision.map_err(|wait| Refusal::Limited {
            retry_after: Limited {
                window_wait_ms: wait,
                concurrency_full: false,
            }
            .retry_after(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::OnBackendError;

    fn local_config() -> RateLimitConfig {
        RateLimitConfig {
            backend: RateLimitBackend::Local,
            on_backend_error: OnBackendError::Local,
            redis_prefix: "keyrouter".into(),
            cooldown_base: Duration::from_secs(30),
            cooldown_max: Duration::from_secs(600),
        }
    }

    #[test]
    fn retry_after_is_the_longest_wait_and_never_zero() {
        let l = |window_wait_ms, concurrency_full| Limited {
            window_wait_ms,
            concurrency_full,
        };
        assert_eq!(l(0, false).retry_after(), Duration::from_millis(1));
        assert_eq!(l(0, true).retry_after(), CONCURRENCY_RETRY);
        assert_eq!(l(2_500, true).retry_after(), Duration::from_millis(2_500));
        assert_eq!(l(300, true).retry_after(), CONCURRENCY_RETRY);
    }

    #[tokio::test]
    async fn the_local_limiter_marks_a_limited_key_and_settles() {
        let limiter = Limiter::new(&local_config(), &Metrics::default()).await;
        let counters = Arc::new(KeyCounters::new());
        let limits = Limits {
            rpm: Some(1),
            tpm: None,
            max_concurrent: None,
        };
        let key = KeyRef {
            id: "key_abcdefgh",
            limits: &limits,
            counters: &counters,
        };
        let permit = limiter.acquire(key, 10).await.unwrap();
        assert_eq!(counters.in_flight(), 1);
        permit.settle(25);
        assert_eq!(counters.in_flight(), 0);
        assert_eq!(counters.usage().tokens_last_minute, 25);
        assert!(counters.limited_until().is_none());
        let Err(Refusal::Limited { retry_after }) = limiter.acquire(key, 10).await else {
            panic!("the second request in a minute must be refused");
        };
        assert!(retry_after > Duration::from_secs(59));
        assert!(counters.limited_until().is_some());
    }

    #[tokio::test]
    async fn a_client_rpm_of_zero_admits_nothing() {
        let limiter = Limiter::new(&local_config(), &Metrics::default()).await;
        assert!(limiter.acquire_client("c", 0).await.is_err());
        assert!(limiter.acquire_client("c", 1).await.is_ok());
        assert!(limiter.acquire_client("c", 1).await.is_err());
    }

    #[test]
    fn the_acquire_future_is_send() {
        fn assert_send<T: Send>(_: &T) {}
        let counters = Arc::new(KeyCounters::new());
        let limits = Limits::default();
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        let limiter = rt.block_on(Limiter::new(&local_config(), &Metrics::default()));
        let key = KeyRef {
            id: "key_abcdefgh",
            limits: &limits,
            counters: &counters,
        };
        assert_send(&limiter.acquire(key, 0));
        assert_send(&limiter.acquire_client("c", 1));
    }
}
