//! The Redis backend: limits shared by every replica.
//!
//! One decision is one round trip: `EVALSHA` of [`ACQUIRE_LUA`] (the
//! `redis` crate loads the script on `NOSCRIPT`, so the first call after a
//! Redis restart costs two more). The script reads the windows, checks rpm,
//! tpm and `max_concurrent`, and only if all three fit records all three,
//! atomically: there is no read-then-write gap for another replica to slip
//! through. Releasing a permit (freeing its slot, correcting its tokens) is
//! a second small script sent from a spawned task, never on the response
//! path, and skipped when there is nothing to release.
//!
//! Time comes from Redis (`TIME` inside the script), not from the replica:
//! replicas' clocks may differ by seconds, and windows must start at the same
//! instant for everyone counting into them. A `Retry-After` is a duration,
//! so the replica's clock offset does not matter for it.
//!
//! Keys, all with a TTL so nothing outlives its use:
//! - `{prefix}:key:{id}:rpm:{window}` and `...:tpm:{window}`: counts of one
//!   window (Unix minute); they expire one second after the end of the next
//!   window, when they stop counting.
//! - `{prefix}:key:{id}:inflight`: a ZSET of permit ids scored by the end of
//!   their lease ([`LEASE_MS`]). The script drops expired members first, so the
//!   slots of a replica that crashed without releasing free themselves.
//! - `{prefix}:client:{id}:rpm:{window}`: client windows, as for keys.
//!
//! Unavailability: a request waits at most [`CALL_TIMEOUT`] for Redis, so a
//! hung Redis cannot stall it; a slot or tokens that Redis grants after the
//! request stopped waiting are given back. After a failure Redis is left
//! alone for [`RETRY_EVERY_MS`]; then one request probes it while the others
//! keep to the fallback. Going down logs one warning and coming back one
//! info line; the URL (which may hold a password) is never logged.

use super::Limited;
use super::local::{estimate, now_ms};
use crate::keys::Limits;
use crate::metrics::Metrics;
use crate::secret::Secret;
use prometheus::{IntCounter, IntGauge};
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{FromRedisValue, Script, ScriptInvocation};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock};
use std::time::Duration;
use tokio::sync::oneshot;

/// The longest a decision may wait for Redis before it is decided without.
const CALL_TIMEOUT: Duration = Duration::from_millis(250);

/// How long a call goes on after its caller stopped waiting, so that a
/// grant that arrives late is given back rather than left to its lease.
const LATE_REPLY_WAIT: Duration = Duration::from_secs(5);

/// How long (ms) after a failure Redis is tried again.
const RETRY_EVERY_MS: u64 = 1_000;

/// Time to open a connection (at start-up and on reconnects, which run in
/// the background: requests never wait longer than [`CALL_TIMEOUT`]).
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);

/// How long (ms) a concurrency slot is held without being released.
/// Generous, as an LLM stream can run for minutes; a request that outlives
/// it stops counting against `max_concurrent` in Redis.
const LEASE_MS: u64 = 600_000;

/// One decision. Mirrors `local::wait_ms` (the window math, line for line)
/// and `local::acquire` (all limits or none): change them together.
///
/// `KEYS[1]` the counter base, `{prefix}:key:{id}` or `{prefix}:client:{id}`.
/// Window keys are built here because the window comes from the server's
/// clock. `ARGV`: rpm, tpm, tokens, `max_concurrent` (0 = no such limit),
/// permit id, lease in ms. Returns `{window wait ms, concurrency full (0|1),
/// window id}`; the request was admitted when both of the first are 0.
const ACQUIRE_LUA: &str = r"
local W = 60000
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local window = math.floor(now / W)
local elapsed = now - window * W

local function wait_ms(prev, cur, cost, limit)
  local room = limit - math.min(cost, limit)
  if cur <= room then
    local room_prev = room - cur
    if prev * (W - elapsed) <= room_prev * W then
      return 0
    end
    return W - math.floor(room_prev * W / prev) - elapsed
  end
  return (W - elapsed) + (W - math.floor(room * W / cur))
end

local function check(name, cost, limit)
  local base = KEYS[1] .. ':' .. name .. ':'
  local prev = tonumber(redis.call('GET', base .. (window - 1)) or 0)
  local cur_key = base .. window
  local cur = tonumber(redis.call('GET', cur_key) or 0)
  return wait_ms(prev, cur, cost, limit), cur_key
end

local rpm, tpm, tokens = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local max_concurrent = tonumber(ARGV[4])
local wait, full = 0, 0
local rpm_key, tpm_key, slots_key
if rpm > 0 then
  local w
  w, rpm_key = check('rpm', 1, rpm)
  wait = math.max(wait, w)
end
if tpm > 0 then
  local w
  w, tpm_key = check('tpm', tokens, tpm)
  wait = math.max(wait, w)
end
if max_concurrent > 0 then
  slots_key = KEYS[1] .. ':inflight'
  redis.call('ZREMRANGEBYSCORE', slots_key, '-inf', now)
  if redis.call('ZCARD', slots_key) >= max_concurrent then
    full = 1
  end
end
if wait > 0 or full == 1 then
  return {wait, full, window}
end

-- A window counts until the end of the next one.
local ttl = (window + 2) * W - now + 1000
if rpm_key then
  redis.call('INCR', rpm_key)
  redis.call('PEXPIRE', rpm_key, ttl)
end
if tpm_key then
  redis.call('INCRBY', tpm_key, tokens)
  redis.call('PEXPIRE', tpm_key, ttl)
end
if slots_key then
  local lease = tonumber(ARGV[6])
  redis.call('ZADD', slots_key, now + lease, ARGV[5])
  redis.call('PEXPIRE', slots_key, lease + 1000)
end
return {0, 0, window}
";

/// Releases a permit. `KEYS[1]` the counter base. `ARGV`: the tpm window id
/// ('' = none), the token correction (may be negative), the permit id
/// ('' = none). A window key that is gone has stopped counting (it expires
/// after the next window), so there is nothing to correct; a count never
/// goes below zero (as `local::WindowCounter::correct`).
const RELEASE_LUA: &str = r"
if ARGV[1] ~= '' then
  local key = KEYS[1] .. ':tpm:' .. ARGV[1]
  if redis.call('EXISTS', key) == 1 then
    local count = redis.call('INCRBY', key, ARGV[2])
    if count < 0 then
      redis.call('INCRBY', key, -count)
    end
  end
end
if ARGV[3] ~= '' then
  redis.call('ZREM', KEYS[1] .. ':inflight', ARGV[3])
end
return 0
";

/// A key's shared counts, for the management API. `KEYS[1]` the counter
/// base. Returns `{elapsed ms in the window, previous and current rpm
/// counts, previous and current tpm counts, slots held}`; the sliding
/// estimate is made by the caller with the same function the local counters
/// use. A window or slot set that is absent counts as zero (no limit of that
/// kind, or nothing counted lately).
const USAGE_LUA: &str = r"
local W = 60000
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
local window = math.floor(now / W)
local function count(name, w)
  return tonumber(redis.call('GET', KEYS[1] .. ':' .. name .. ':' .. w) or 0)
end
local slots = redis.call('ZCOUNT', KEYS[1] .. ':inflight', '(' .. now, '+inf')
return {now - window * W, count('rpm', window - 1), count('rpm', window),
  count('tpm', window - 1), count('tpm', window), slots}
";

static ACQUIRE: LazyLock<Script> = LazyLock::new(|| Script::new(ACQUIRE_LUA));
static RELEASE: LazyLock<Script> = LazyLock::new(|| Script::new(RELEASE_LUA));
static USAGE: LazyLock<Script> = LazyLock::new(|| Script::new(USAGE_LUA));

/// What Redis said, or that it could not be asked.
pub(super) enum Remote<T> {
    Granted(T),
    Limited(Limited),
    /// Unreachable, timed out or failing: decide without it.
    Unavailable,
}

impl<T> Remote<T> {
    fn map<U>(self, f: impl FnOnce(T) -> U) -> Remote<U> {
        match self {
            Remote::Granted(t) => Remote::Granted(f(t)),
            Remote::Limited(limited) => Remote::Limited(limited),
            Remote::Unavailable => Remote::Unavailable,
        }
    }
}

/// What every replica together counted for a key: each figure is there
/// only where the key has the limit that makes Redis count it (`rpm` for
/// requests, `tpm` for tokens, `max_concurrent` for slots).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct SharedUsage {
    pub requests_last_minute: Option<u64>,
    pub tokens_last_minute: Option<u64>,
    pub in_flight: Option<u32>,
}

/// The Redis backend, shared with the permits it grants.
pub(super) struct RedisBackend {
    inner: Arc<Inner>,
}

struct Inner {
    /// `None` when `KEYROUTER_REDIS_URL` does not parse: permanently
    /// unavailable (an error was logged at start-up).
    conn: Option<ConnectionManager>,
    prefix: String,
    /// `on_backend_error = "deny"`.
    deny: bool,
    /// Limiter-clock ms before which Redis is not asked; 0 when healthy.
    retry_at: AtomicU64,
    /// Redis is considered down: set by the first failure (which logs),
    /// cleared by the first success (which logs).
    down: AtomicBool,
    errors: IntCounter,
    fallback: IntGauge,
    /// Makes permit ids unique across replicas.
    replica: String,
    next_permit: AtomicU64,
    /// The runtime that built the backend (the gateway's main one). Every
    /// call runs there, whichever proxy thread asks: the connection, and
    /// the task the client library starts for each reconnect, then live on
    /// a runtime that serves no proxied requests and that outlives the
    /// proxy threads on shutdown.
    runtime: tokio::runtime::Handle,
}

impl RedisBackend {
    /// Prepares the connection and tries it once; an unreachable Redis is
    /// logged and left to the retry logic, never an error.
    pub(super) async fn connect(
        url: &Secret,
        prefix: &str,
        deny: bool,
        metrics: &Metrics,
    ) -> RedisBackend {
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(CONNECT_TIMEOUT))
            // The library's own bound on an answer: long enough for a late
            // answer to arrive and be given back (callers wait far less).
            .set_response_timeout(Some(LATE_REPLY_WAIT))
            // Each failed call triggers one reconnect; the pace of calls
            // (at most one per `RETRY_EVERY_MS` while down) is the pace of retries.
            .set_number_of_retries(0);
        // The URL may hold a password: neither it nor a parse error (which
        // may quote it) is logged.
        let conn = match redis::Client::open(url.expose()) {
            Ok(client) => ConnectionManager::new_lazy_with_config(client, config).ok(),
            Err(_) => None,
        };
        if conn.is_none() {
            tracing::error!(
                "KEYROUTER_REDIS_URL is not a usable Redis URL; rate limits cannot be shared"
            );
        }
        let inner = Inner {
            conn,
            prefix: prefix.to_owned(),
            deny,
            retry_at: AtomicU64::new(0),
            down: AtomicBool::new(false),
            errors: metrics.rate_limit_backend_errors.clone(),
            fallback: metrics.rate_limit_fallback.clone(),
            replica: crate::ids::random_token(12),
            next_permit: AtomicU64::new(0),
            runtime: tokio::runtime::Handle::current(),
        };
        inner.ping().await;
        RedisBackend {
            inner: Arc::new(inner),
        }
    }

    /// Whether an unavailable Redis means refusing (`"deny"`).
    pub(super) fn denies(&self) -> bool {
        self.inner.deny
    }

    /// The decision for one attempt with a key.
    pub(super) async fn acquire_key(
        &self,
        id: &str,
        limits: &Limits,
        tokens: u64,
    ) -> Remote<RemotePermit> {
        let inner = &self.inner;
        let base = inner.key_base(id);
        let member = limits.max_concurrent.map(|_| {
            let n = inner.next_permit.fetch_add(1, Ordering::Relaxed);
            format!("{}:{n}", inner.replica)
        });
        let request = Request {
            rpm: limits.rpm,
            tpm: limits.tpm,
            tokens,
            max_concurrent: limits.max_concurrent,
            member: member.as_deref(),
        };
        let decision = inner.decide(&base, request).await;
        decision.map(|window| RemotePermit {
            inner: Arc::clone(inner),
            base,
            tpm_window: limits.tpm.map(|_| window),
            estimate: tokens,
            member,
        })
    }

    /// The decision for one request of a client.
    pub(super) async fn acquire_client(&self, id: &str, rpm: u32) -> Remote<()> {
        let base = format!("{}:client:{id}", self.inner.prefix);
        let request = Request {
            rpm: Some(rpm),
            tpm: None,
            tokens: 0,
            max_concurrent: None,
            member: None,
        };
        self.inner.decide(&base, request).await.map(drop)
    }

    /// The shared counts of key `id`; `None` when Redis cannot be asked
    /// (resting after a failure, unreachable or slow).
    pub(super) async fn usage(&self, id: &str, limits: &Limits) -> Option<SharedUsage> {
        let inner = &self.inner;
        if !inner.may_try(now_ms()) {
            return None;
        }
        let mut invocation = USAGE.prepare_invoke();
        invocation.key(inner.key_base(id));
        let counts: Vec<u64> = inner.call(invocation, |_| None).await?;
        let [elapsed, prev_rpm, cur_rpm, prev_tpm, cur_tpm, slots] = counts[..] else {
            return None;
        };
        Some(SharedUsage {
            requests_last_minute: limits.rpm.map(|_| estimate(prev_rpm, cur_rpm, elapsed)),
            tokens_last_minute: limits.tpm.map(|_| estimate(prev_tpm, cur_tpm, elapsed)),
            in_flight: limits
                .max_concurrent
                .map(|_| u32::try_from(slots).unwrap_or(u32::MAX)),
        })
    }
}

/// The arguments of one decision.
struct Request<'a> {
    rpm: Option<u32>,
    tpm: Option<u32>,
    tokens: u64,
    max_concurrent: Option<u32>,
    /// The permit id, when a slot is to be taken.
    member: Option<&'a str>,
}

impl Inner {
    /// Where key `id`'s counters live: `{prefix}:key:{id}`.
    fn key_base(&self, id: &str) -> String {
        format!("{}:key:{id}", self.prefix)
    }

    /// Runs [`ACQUIRE_LUA`] unless Redis is resting after a failure; on
    /// success, the window id the tokens went into.
    async fn decide(self: &Arc<Self>, base: &str, r: Request<'_>) -> Remote<u64> {
        if !self.may_try(now_ms()) {
            return Remote::Unavailable;
        }
        let mut invocation = ACQUIRE.prepare_invoke();
        invocation
            .key(base)
            .arg(r.rpm.unwrap_or(0))
            .arg(r.tpm.unwrap_or(0))
            .arg(r.tokens)
            .arg(r.max_concurrent.unwrap_or(0))
            .arg(r.member.unwrap_or(""))
            .arg(LEASE_MS);
        // A grant that arrives after the caller stopped waiting is given
        // back: its slot would otherwise stay taken for a whole lease.
        let (base, tokens, tpm) = (base.to_owned(), r.tokens, r.tpm.is_some());
        let member = r.member.map(str::to_owned);
        let undo = move |(wait, full, window): (u64, u64, u64)| {
            let granted = wait == 0 && full == 0;
            (granted && (tpm || member.is_some())).then(|| {
                release_invocation(
                    &base,
                    tpm.then_some(window),
                    -i64::try_from(tokens).unwrap_or(i64::MAX),
                    member.as_deref(),
                )
            })
        };
        match self.call::<(u64, u64, u64)>(invocation, undo).await {
            Some((0, 0, window)) => Remote::Granted(window),
            Some((wait, full, _)) => Remote::Limited(Limited {
                window_wait_ms: wait,
                concurrency_full: full != 0,
            }),
            None => Remote::Unavailable,
        }
    }

    /// Healthy, or resting long enough that this caller may probe (only one
    /// caller per [`RETRY_EVERY_MS`] wins the probe).
    fn may_try(&self, now: u64) -> bool {
        let at = self.retry_at.load(Ordering::Acquire);
        at == 0
            || (now >= at
                && self
                    .retry_at
                    .compare_exchange(
                        at,
                        now + RETRY_EVERY_MS,
                        Ordering::AcqRel,
                        Ordering::Relaxed,
                    )
                    .is_ok())
    }

    /// One call, made on the backend's runtime. The caller waits at most
    /// [`CALL_TIMEOUT`]; the call itself goes on for up to [`LATE_REPLY_WAIT`]
    /// so that what it took in Redis can be given back (`undo`'s script)
    /// when its answer comes after the caller stopped waiting, timed out or
    /// dropped.
    async fn call<T>(
        self: &Arc<Self>,
        invocation: ScriptInvocation<'static>,
        undo: impl FnOnce(T) -> Option<ScriptInvocation<'static>> + Send + 'static,
    ) -> Option<T>
    where
        T: FromRedisValue + Send + 'static,
    {
        let Some(conn) = &self.conn else {
            self.failed("invalid URL");
            return None;
        };
        let mut conn = conn.clone();
        let inner = Arc::clone(self);
        let (reply, answer) = oneshot::channel();
        self.runtime.spawn(async move {
            let outcome =
                tokio::time::timeout(LATE_REPLY_WAIT, invocation.invoke_async::<T>(&mut conn))
                    .await;
            let value = match outcome {
                Ok(Ok(value)) => {
                    inner.succeeded();
                    value
                }
                // Recorded here only while the caller waits: a caller that
                // timed out has recorded that already.
                Ok(Err(e)) if !reply.is_closed() => return inner.failed(e.category()),
                Err(_) if !reply.is_closed() => return inner.failed("timeout"),
                _ => return,
            };
            if let Err(value) = reply.send(value)
                && let Some(release) = undo(value)
            {
                let _ =
                    tokio::time::timeout(LATE_REPLY_WAIT, release.invoke_async::<i64>(&mut conn))
                        .await;
            }
        });
        match tokio::time::timeout(CALL_TIMEOUT, answer).await {
            Ok(Ok(value)) => Some(value),
            // Failed (and recorded by the call), or the gateway is shutting
            // down and the call never ran.
            Ok(Err(_)) => None,
            Err(_) => {
                self.failed("timeout");
                None
            }
        }
    }

    /// The start-up check, so the log says at once where limits are counted.
    async fn ping(&self) {
        let Some(conn) = &self.conn else {
            return self.failed("invalid URL");
        };
        let mut conn = conn.clone();
        let ping = redis::cmd("PING");
        match tokio::time::timeout(CONNECT_TIMEOUT, ping.query_async::<()>(&mut conn)).await {
            Ok(Ok(())) => tracing::info!("rate limits are counted in Redis"),
            Ok(Err(e)) => self.failed(e.category()),
            Err(_) => self.failed("timeout"),
        }
    }

    fn succeeded(&self) {
        if self.retry_at.load(Ordering::Relaxed) != 0 {
            self.retry_at.store(0, Ordering::Release);
        }
        if self.down.load(Ordering::Relaxed) && self.down.swap(false, Ordering::AcqRel) {
            self.fallback.set(0);
            tracing::info!("rate limit backend Redis is reachable again; limits are shared");
        }
    }

    /// `cause` is a fixed description (an error category), never a message
    /// that could quote the URL.
    fn failed(&self, cause: &str) {
        self.errors.inc();
        self.retry_at
            .store(now_ms() + RETRY_EVERY_MS, Ordering::Release);
        if !self.down.swap(true, Ordering::AcqRel) {
            if self.deny {
                tracing::warn!(
                    cause,
                    "rate limit backend Redis is unreachable; refusing keys with limits until it is back"
                );
            } else {
                self.fallback.set(1);
                tracing::warn!(
                    cause,
                    "rate limit backend Redis is unreachable; counting limits in this process until it is back"
                );
            }
        }
    }
}

/// The Redis side of a permit: what to release when it ends.
pub(super) struct RemotePermit {
    inner: Arc<Inner>,
    base: String,
    /// The window the tokens went into, when the key has a tpm.
    tpm_window: Option<u64>,
    estimate: u64,
    /// The slot, when the key has a `max_concurrent`.
    member: Option<String>,
}

impl RemotePermit {
    /// Sends the release from a task on the backend's runtime. If the call
    /// fails the slot frees itself when its lease ends and the estimate
    /// stands.
    pub(super) fn release(self, actual_tokens: u64) {
        let correction = i128::from(actual_tokens) - i128::from(self.estimate);
        let correction =
            i64::try_from(correction).unwrap_or(if correction < 0 { i64::MIN } else { i64::MAX });
        let window = self.tpm_window.filter(|_| correction != 0);
        if window.is_none() && self.member.is_none() {
            return;
        }
        let invocation = release_invocation(&self.base, window, correction, self.member.as_deref());
        let runtime = self.inner.runtime.clone();
        runtime.spawn(async move {
            // Releases go out even while Redis rests: they are bounded by
            // the permits it granted before, and a lost one only delays a
            // slot until its lease ends.
            let _: Option<i64> = self.inner.call(invocation, |_| None).await;
        });
    }
}

/// [`RELEASE_LUA`] for the permit `member` (if any) of the key `base`,
/// correcting the tokens reserved in `window` (if any) by `correction`.
fn release_invocation(
    base: &str,
    window: Option<u64>,
    correction: i64,
    member: Option<&str>,
) -> ScriptInvocation<'static> {
    let mut invocation = RELEASE.prepare_invoke();
    invocation
        .key(base)
        .arg(window.map(|w| w.to_string()).unwrap_or_default())
        .arg(correction)
        .arg(member.unwrap_or(""));
    invocation
}
