//! The in-process limiter: the window math both backends share, per-key
//! counters ([`KeyCounters`]) and per-client windows ([`ClientWindows`]).
//!
//! Lock-free on the hot path: a window slot is one `AtomicU64` holding the
//! window id and the count, updated by compare-and-swap, so `acquire` and
//! `settle` never take a lock. Only the client map (a `DashMap`) locks, per
//! shard and briefly.
//!
//! Every internal function takes the time as `now` (milliseconds on the
//! limiter clock, see [`now_ms`]), so tests drive the clock by hand.

use super::{Limited, WINDOW_MS};
use crate::keys::Limits;
use dashmap::DashMap;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

// ---------------------------------------------------------------------------
// The clock

/// The limiter clock's zero: first use in this process.
static EPOCH: OnceLock<Instant> = OnceLock::new();

fn epoch() -> Instant {
    *EPOCH.get_or_init(Instant::now)
}

/// Milliseconds since the limiter epoch: monotonic, so a wall-clock jump
/// can neither reopen nor freeze a window. (Local windows are aligned to
/// process start, not to wall-clock minutes; nothing outside this process
/// sees them.)
/// Milliseconds on the limiter's clock. Callers that check many keys read it
/// once and pass it to [`KeyCounters::is_limited_at`].
pub fn now_ms() -> u64 {
    u64::try_from(epoch().elapsed().as_millis()).unwrap_or(u64::MAX)
}

// ---------------------------------------------------------------------------
// Window math, shared with the Lua script in `redis.rs` (which mirrors
// `wait_ms` line for line: change both or neither).

/// Milliseconds until `cost` fits under `limit`, 0 when it fits now.
///
/// `prev` and `cur` are the counts of the previous and the current one-minute
/// window, `elapsed` the milliseconds since the current window began. The
/// estimate of the last minute is `ceil(prev * (W - elapsed) / W) + cur`
/// (rounded up so the estimate never under-counts).
///
/// A cost above the limit is checked as if it were the limit: it fits only
/// when the estimate is zero (the window is otherwise empty), so a huge
/// request waits for a quiet minute instead of being refused forever.
pub(super) fn wait_ms(prev: u64, cur: u64, elapsed: u64, cost: u64, limit: u64) -> u64 {
    let room = limit - cost.min(limit);
    if cur <= room {
        let room_prev = room - cur;
        // ceil(prev*(W-e)/W) <= room_prev  <=>  prev*(W-e) <= room_prev*W
        if prev * (WINDOW_MS - elapsed) <= room_prev * WINDOW_MS {
            return 0;
        }
        // prev > 0 here (else the check above passed). Fits from
        // e >= W - room_prev*W/prev on.
        WINDOW_MS - room_prev * WINDOW_MS / prev - elapsed
    } else {
        // Not in this window: in the next one `cur` becomes the previous
        // count (cur > room >= 0) and the current one starts empty.
        (WINDOW_MS - elapsed) + (WINDOW_MS - room * WINDOW_MS / cur)
    }
}

/// The sliding estimate of the last minute, as `wait_ms` sees it.
pub(super) fn estimate(prev: u64, cur: u64, elapsed: u64) -> u64 {
    (prev * (WINDOW_MS - elapsed)).div_ceil(WINDOW_MS) + cur
}

// ---------------------------------------------------------------------------
// One counter: two window slots

/// Bits of a slot holding the count; the window id takes the rest.
const COUNT_BITS: u32 = 40;
/// The largest count a slot holds (~10^12). Token counts are capped to it
/// on the way in, which also keeps them exact in the Lua script's doubles.
pub(super) const COUNT_MAX: u64 = (1 << COUNT_BITS) - 1;
/// Window ids are kept modulo 2^24 minutes (~32 years of uptime).
const ID_MASK: u64 = (1 << (64 - COUNT_BITS)) - 1;

fn pack(window: u64, count: u64) -> u64 {
    ((window & ID_MASK) << COUNT_BITS) | count.min(COUNT_MAX)
}

/// The count a slot holds for `window`; 0 when it holds an older window.
fn count_in(slot: u64, window: u64) -> u64 {
    if slot >> COUNT_BITS == window & ID_MASK {
        slot & COUNT_MAX
    } else {
        0
    }
}

/// A sliding-window counter: slot `w % 2` holds window `w`, the other slot
/// the previous one. A slot still holding window `w - 2` reads as empty and
/// is overwritten by the first add of window `w`.
#[derive(Default)]
pub(super) struct WindowCounter {
    slots: [AtomicU64; 2],
}

/// Where an amount was added, so it can be corrected or taken back.
#[derive(Clone, Copy, Debug)]
pub(super) struct Reservation {
    window: u64,
    amount: u64,
}

impl WindowCounter {
    fn slot(&self, window: u64) -> &AtomicU64 {
        &self.slots[(window % 2) as usize]
    }

    fn count(&self, window: u64) -> u64 {
        count_in(self.slot(window).load(Ordering::Acquire), window)
    }

    /// Adds `cost` to the current window if the estimate plus `cost` fits
    /// under `limit` (always with no limit); otherwise the wait in ms.
    ///
    /// Only the current slot is compare-and-swapped: the previous window
    /// takes no more adds (bar a caller whose clock reading is microseconds
    /// older, right at the boundary), only settle corrections, so reading it
    /// once before the loop is enough.
    pub(super) fn try_add(
        &self,
        now: u64,
        cost: u64,
        limit: Option<u32>,
    ) -> Result<Reservation, u64> {
        let window = now / WINDOW_MS;
        let elapsed = now % WINDOW_MS;
        let prev = self.count(window.wrapping_sub(1));
        let slot = self.slot(window);
        let mut seen = slot.load(Ordering::Acquire);
        loop {
            let cur = count_in(seen, window);
            if let Some(limit) = limit {
                let wait = wait_ms(prev, cur, elapsed, cost, u64::from(limit));
                if wait > 0 {
                    return Err(wait);
                }
            }
            let next = pack(window, cur.saturating_add(cost));
            match slot.compare_exchange_weak(seen, next, Ordering::AcqRel, Ordering::Acquire) {
                Ok(_) => {
                    return Ok(Reservation {
                        window,
                        amount: cost,
                    });
                }
                Err(actual) => seen = actual,
            }
        }
    }

    /// Replaces a reservation's amount by `actual` (saturating at zero), in
    /// the window it went into if that slot still holds it (the window is
    /// current or previous); otherwise the reservation no longer counts and
    /// there is nothing to correct.
    pub(super) fn correct(&self, r: Reservation, actual: u64) {
        if actual == r.amount {
            return;
        }
        let _ = self
            .slot(r.window)
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |seen| {
                if seen >> COUNT_BITS != r.window & ID_MASK {
                    return None;
                }
                let count = seen & COUNT_MAX;
                let count = if actual > r.amount {
                    count.saturating_add(actual - r.amount)
                } else {
                    count.saturating_sub(r.amount - actual)
                };
                Some(pack(r.window, count))
            });
    }

    /// The sliding estimate of the last minute.
    fn estimate(&self, now: u64) -> u64 {
        let window = now / WINDOW_MS;
        estimate(
            self.count(window.wrapping_sub(1)),
            self.count(window),
            now % WINDOW_MS,
        )
    }

    /// Nothing counted in the current or previous window: the counter no
    /// longer influences any decision.
    fn is_idle(&self, now: u64) -> bool {
        let window = now / WINDOW_MS;
        self.count(window) == 0 && self.count(window.wrapping_sub(1)) == 0
    }
}

// ---------------------------------------------------------------------------
// Per-key counters

/// One key's live counters in this replica. The caller keeps one `Arc` per
/// key id for as long as the key is known (across pool reloads), so the
/// windows survive a reload.
///
/// With the local backend these counters are the limits' state. With Redis
/// they still record this replica's traffic (for [`KeyCounters::usage`],
/// `least_loaded` and a warm start of the local fallback), but decisions are
/// Redis's.
#[derive(Default)]
pub struct KeyCounters {
    requests: WindowCounter,
    tokens: WindowCounter,
    /// Permits alive right now, limited or not: `least_loaded` reads it, and
    /// the local backend enforces `max_concurrent` on it.
    in_flight: AtomicU32,
    /// Limiter-clock ms until which the key was refused by its request
    /// window (see [`KeyCounters::limited_until`]);
    /// 0 when never.
    limited_until: AtomicU64,
}

/// One key's usage, for `GET /admin/v1/keys/{id}`: this replica's view,
/// or with Redis partly every replica's (see [`Limiter::usage`]).
///
/// [`Limiter::usage`]: super::Limiter::usage
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KeyUsage {
    pub requests_last_minute: u64,
    pub tokens_last_minute: u64,
    pub in_flight: u32,
}

impl KeyCounters {
    pub fn new() -> Self {
        Self::default()
    }

    /// Requests holding a permit for this key through this replica.
    pub fn in_flight(&self) -> u32 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// Requests and tokens in the last minute (sliding estimate) and in
    /// flight, as this replica saw them.
    pub fn usage(&self) -> KeyUsage {
        self.usage_at(now_ms())
    }

    fn usage_at(&self, now: u64) -> KeyUsage {
        KeyUsage {
            requests_last_minute: self.requests.estimate(now),
            tokens_last_minute: self.tokens.estimate(now),
            in_flight: self.in_flight(),
        }
    }

    /// Until when the key was refused by its windows (by either backend), if
    /// that moment is still ahead: a selector can skip the key without
    /// asking the backend. `Limiter::acquire` sets it only where the wait
    /// holds for any request: not for `max_concurrent` (a slot may free at
    /// any moment) nor for a key with a `tpm` (a smaller request, or one
    /// after a settle correction, may fit sooner).
    pub fn limited_until(&self) -> Option<Instant> {
        self.limited_until_at(now_ms())
            .map(|ms| epoch() + Duration::from_millis(ms))
    }

    /// Whether the key is marked refused at `now` (from [`now_ms`]): the
    /// selector's per-key check, without a clock read per key.
    pub fn is_limited_at(&self, now: u64) -> bool {
        self.limited_until_at(now).is_some()
    }

    fn limited_until_at(&self, now: u64) -> Option<u64> {
        let until = self.limited_until.load(Ordering::Relaxed);
        (until > now).then_some(until)
    }

    /// Records a window refusal that lasts `wait` from `now`.
    pub(super) fn mark_limited(&self, now: u64, wait: Duration) {
        let wait = u64::try_from(wait.as_millis()).unwrap_or(u64::MAX);
        self.limited_until
            .store(now.saturating_add(wait), Ordering::Relaxed);
    }
}

/// A key's local share of a permit: the request in flight and its tokens.
/// Dropping it leaves the request slot.
pub(super) struct LocalPermit {
    counters: Arc<KeyCounters>,
    tokens: Reservation,
}

impl LocalPermit {
    /// Corrects the token reservation to `actual`.
    pub(super) fn correct(&self, actual: u64) {
        self.counters.tokens.correct(self.tokens, actual);
    }

    pub(super) fn estimate(&self) -> u64 {
        self.tokens.amount
    }
}

impl Drop for LocalPermit {
    fn drop(&mut self) {
        self.counters.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The local decision for one attempt with a key: reserves one request and
/// `tokens` against rpm and tpm and a slot against `max_concurrent`, all or
/// nothing. Each limit is tried in turn; if any refuses, what the others
/// reserved is taken back (a concurrent caller may briefly see those
/// reservations and be refused: never over-admitting is the point), and the
/// wait is the longest among the refusing limits.
pub(super) fn acquire(
    counters: &Arc<KeyCounters>,
    limits: &Limits,
    tokens: u64,
    now: u64,
) -> Result<LocalPermit, Limited> {
    let requests = counters.requests.try_add(now, 1, limits.rpm);
    let token_res = counters.tokens.try_add(now, tokens, limits.tpm);
    let slot = enter(&counters.in_flight, limits.max_concurrent);
    match (requests, token_res, slot) {
        (Ok(_), Ok(tokens), true) => Ok(LocalPermit {
            counters: Arc::clone(counters),
            tokens,
        }),
        (requests, token_res, slot) => {
            let mut wait = 0;
            match requests {
                Ok(r) => counters.requests.correct(r, 0),
                Err(w) => wait = wait.max(w),
            }
            match token_res {
                Ok(r) => counters.tokens.correct(r, 0),
                Err(w) => wait = wait.max(w),
            }
            if slot {
                counters.in_flight.fetch_sub(1, Ordering::Relaxed);
            }
            Err(Limited {
                window_wait_ms: wait,
                concurrency_full: !slot,
            })
        }
    }
}

/// Records an attempt another backend (Redis) admitted: counted, never
/// refused.
pub(super) fn record(counters: &Arc<KeyCounters>, tokens: u64, now: u64) -> LocalPermit {
    let none = Limits::default();
    match acquire(counters, &none, tokens, now) {
        Ok(permit) => permit,
        // Without limits `try_add` and `enter` always succeed.
        Err(_) => unreachable!("an attempt without limits is never refused"),
    }
}

/// Takes an in-flight slot if fewer than `max` are taken.
fn enter(in_flight: &AtomicU32, max: Option<u32>) -> bool {
    in_flight
        .fetch_update(Ordering::AcqRel, Ordering::Relaxed, |n| {
            max.is_none_or(|m| n < m).then_some(n.saturating_add(1))
        })
        .is_ok()
}

// ---------------------------------------------------------------------------
// Clients

/// How often the client map is swept of idle entries.
const SWEEP_EVERY_MS: u64 = WINDOW_MS;

/// Per-client request windows (JWT `rpm`). An entry idle for two windows
/// influences no decision and is removed by a sweep that one caller runs at
/// most once a minute, so memory is bounded by the clients seen in the last
/// ~3 minutes, with no background task to own.
#[derive(Default)]
pub(super) struct ClientWindows {
    map: DashMap<String, WindowCounter>,
    /// Limiter-clock ms of the next sweep.
    next_sweep: AtomicU64,
}

impl ClientWindows {
    /// One request for `client` against `rpm` (always counted with `None`).
    pub(super) fn acquire(&self, client: &str, rpm: Option<u32>, now: u64) -> Result<(), u64> {
        self.sweep_if_due(now);
        // The common case (a known client) takes only a shard read lock.
        if let Some(w) = self.map.get(client) {
            return w.try_add(now, 1, rpm).map(drop);
        }
        self.map
            .entry(client.to_owned())
            .or_default()
            .try_add(now, 1, rpm)
            .map(drop)
    }

    fn sweep_if_due(&self, now: u64) {
        let due = self.next_sweep.load(Ordering::Relaxed);
        if now < due {
            return;
        }
        // One caller wins the sweep; the others go on.
        if self
            .next_sweep
            .compare_exchange(
                due,
                now + SWEEP_EVERY_MS,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
        {
            self.map.retain(|_, w| !w.is_idle(now));
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: u64 = WINDOW_MS;

    fn limits(rpm: Option<u32>, tpm: Option<u32>, max_concurrent: Option<u32>) -> Limits {
        Limits {
            rpm,
            tpm,
            max_concurrent,
        }
    }

    fn counters() -> Arc<KeyCounters> {
        Arc::new(KeyCounters::new())
    }

    #[test]
    fn rpm_is_enforced_and_recovers_after_the_announced_wait() {
        let c = counters();
        let l = limits(Some(3), None, None);
        let t0 = 10 * MIN; // start of a window
        for _ in 0..3 {
            drop(acquire(&c, &l, 0, t0).unwrap());
        }
        let refused = acquire(&c, &l, 0, t0).err().unwrap();
        assert!(!refused.concurrency_full);
        // 3 in this window: the 4th fits only when the window has passed and
        // the estimate ceil(3 * (W - e) / W) is at most 2, at e = W/3.
        assert_eq!(refused.window_wait_ms, MIN + MIN / 3);
        let t1 = t0 + refused.window_wait_ms;
        assert!(acquire(&c, &l, 0, t1 - 1).is_err());
        assert!(acquire(&c, &l, 0, t1).is_ok());
    }

    #[test]
    fn the_estimate_slides_across_a_window_boundary() {
        let c = counters();
        let l = limits(Some(10), None, None);
        for _ in 0..10 {
            drop(acquire(&c, &l, 0, MIN / 2).unwrap());
        }
        // 15 s into the next window: ceil(10 * 45/60) = 8 still count.
        let t = MIN + 15_000;
        assert_eq!(c.usage_at(t).requests_last_minute, 8);
        drop(acquire(&c, &l, 0, t).unwrap());
        drop(acquire(&c, &l, 0, t).unwrap());
        let refused = acquire(&c, &l, 0, t).err().unwrap();
        // Room for the previous window: 10 - 1 - 2 = 7, reached at
        // e = W - 7W/10 = 18 s.
        assert_eq!(refused.window_wait_ms, 3_000);
        assert!(acquire(&c, &l, 0, MIN + 17_999).is_err());
        assert!(acquire(&c, &l, 0, MIN + 18_000).is_ok());
        // Two windows later nothing of it is left.
        assert_eq!(c.usage_at(3 * MIN).requests_last_minute, 0);
    }

    #[test]
    fn tokens_are_reserved_and_settle_corrects_both_ways() {
        let c = counters();
        let l = limits(None, Some(1_000), None);
        let p = acquire(&c, &l, 600, 0).unwrap();
        assert!(acquire(&c, &l, 600, 0).is_err(), "600 + 600 > 1000");
        // Used fewer than estimated: the rest is given back.
        p.correct(100);
        drop(p);
        assert_eq!(c.usage_at(0).tokens_last_minute, 100);
        let p = acquire(&c, &l, 600, 0).unwrap();
        // Used more than estimated: the excess counts.
        p.correct(900);
        drop(p);
        assert_eq!(c.usage_at(0).tokens_last_minute, 1_000);
        assert!(acquire(&c, &l, 1, 0).is_err());
    }

    #[test]
    fn a_correction_below_zero_stops_at_zero_and_an_old_window_is_left_alone() {
        let c = counters();
        let none = Limits::default();
        let p = acquire(&c, &none, 50, 0).unwrap();
        // Another reservation in the same window was corrected down meanwhile.
        c.tokens.correct(p.tokens, 0);
        p.correct(0);
        assert_eq!(c.usage_at(0).tokens_last_minute, 0);

        let old = acquire(&c, &none, 50, 0).unwrap();
        drop(acquire(&c, &none, 7, 2 * MIN).unwrap());
        // Window 0's slot now holds window 2: the settle must not touch it.
        old.correct(500);
        assert_eq!(c.tokens.count(2), 7);
    }

    #[test]
    fn a_cost_above_tpm_passes_once_on_an_empty_window() {
        let c = counters();
        let l = limits(None, Some(1_000), None);
        let p = acquire(&c, &l, 5_000, 0).unwrap();
        drop(p);
        let refused = acquire(&c, &l, 5_000, 0).err().unwrap();
        // It waits until the estimate is zero: the next window's end.
        assert_eq!(refused.window_wait_ms, 2 * MIN);
        assert!(acquire(&c, &l, 5_000, 2 * MIN - 1).is_err());
        assert!(acquire(&c, &l, 5_000, 2 * MIN).is_ok());
    }

    #[test]
    fn max_concurrent_is_enforced_and_released_on_drop_and_on_settle() {
        let c = counters();
        let l = limits(None, None, Some(2));
        let a = acquire(&c, &l, 0, 0).unwrap();
        let b = acquire(&c, &l, 0, 0).unwrap();
        let refused = acquire(&c, &l, 0, 0).err().unwrap();
        assert!(refused.concurrency_full);
        assert_eq!(refused.window_wait_ms, 0);
        assert_eq!(c.in_flight(), 2);
        drop(a);
        let a = acquire(&c, &l, 0, 0).unwrap();
        // `Permit::settle` corrects, then drops the local share.
        b.correct(10);
        drop(b);
        assert_eq!(c.in_flight(), 1);
        assert!(acquire(&c, &l, 0, 0).is_ok());
        drop(a);
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn a_refusal_takes_back_what_the_other_limits_reserved() {
        let c = counters();
        let l = limits(Some(10), Some(100), Some(5));
        let _held = acquire(&c, &l, 80, 0).unwrap();
        // rpm and the slot fit, tpm refuses: neither may keep its share.
        assert!(acquire(&c, &l, 50, 0).is_err());
        let u = c.usage_at(0);
        assert_eq!(
            (u.requests_last_minute, u.tokens_last_minute, u.in_flight),
            (1, 80, 1)
        );
    }

    #[test]
    fn in_flight_counts_requests_of_a_key_without_limits() {
        let c = counters();
        let none = Limits::default();
        let a = acquire(&c, &none, 0, 0).unwrap();
        let b = record(&c, 0, 0);
        assert_eq!(c.in_flight(), 2);
        drop(a);
        drop(b);
        assert_eq!(c.in_flight(), 0);
        assert_eq!(c.usage_at(0).requests_last_minute, 2);
    }

    #[test]
    fn limited_until_is_reported_while_ahead() {
        let c = counters();
        c.mark_limited(1_000, Duration::from_millis(500));
        assert_eq!(c.limited_until_at(1_200), Some(1_500));
        assert_eq!(c.limited_until_at(1_500), None);
    }

    #[test]
    fn client_rpm_is_enforced_per_client() {
        let clients = ClientWindows::default();
        for _ in 0..2 {
            clients.acquire("alice", Some(2), 0).unwrap();
        }
        let wait = clients.acquire("alice", Some(2), 0).unwrap_err();
        assert_eq!(wait, MIN + MIN / 2);
        clients.acquire("bob", Some(2), 0).unwrap();
    }

    #[test]
    fn idle_clients_are_evicted() {
        let clients = ClientWindows::default();
        clients.acquire("a", Some(5), 0).unwrap();
        clients.acquire("b", Some(5), 0).unwrap();
        assert_eq!(clients.len(), 2);
        // Still within the previous window: kept.
        clients.acquire("c", Some(5), MIN + 1).unwrap();
        assert_eq!(clients.len(), 3);
        // Two windows on, a and b count no more.
        clients.acquire("c", Some(5), 2 * MIN + 2).unwrap();
        assert_eq!(clients.len(), 1);
    }

    #[test]
    fn concurrent_acquires_never_exceed_rpm() {
        const RPM: u32 = 1_000;
        let c = counters();
        let l = limits(Some(RPM), Some(u32::MAX), None);
        let admitted = AtomicU32::new(0);
        std::thread::scope(|s| {
            for _ in 0..8 {
                s.spawn(|| {
                    for _ in 0..500 {
                        if let Ok(p) = acquire(&c, &l, 3, 5) {
                            admitted.fetch_add(1, Ordering::Relaxed);
                            p.correct(2);
                        }
                    }
                });
            }
        });
        assert_eq!(admitted.load(Ordering::Relaxed), RPM);
        assert_eq!(c.usage_at(5).requests_last_minute, u64::from(RPM));
        assert_eq!(c.usage_at(5).tokens_last_minute, 2 * u64::from(RPM));
        assert_eq!(c.in_flight(), 0);
    }

    #[test]
    fn wait_ms_matches_a_brute_force_search() {
        // The closed form is the first elapsed time at which the cost fits.
        for (prev, cur, elapsed, cost, limit) in [
            (10, 2, 15_000, 1, 10),
            (7, 0, 1, 3, 9),
            (1, 0, 0, 1, 1),
            (5, 5, 59_999, 1, 5),
            (0, 9, 30_000, 2, 10),
            (3, 1, 0, 50, 4),
        ] {
            let wait = wait_ms(prev, cur, elapsed, cost, limit);
            let fits = |t: u64| {
                // At elapsed time t (possibly in the next window).
                let (p, c, e) = match t / WINDOW_MS {
                    0 => (prev, cur, t),
                    1 => (cur, 0, t - WINDOW_MS),
                    _ => (0, 0, t % WINDOW_MS),
                };
                estimate(p, c, e) + cost.min(limit) <= limit
            };
            let first = (elapsed..3 * WINDOW_MS).find(|&t| fits(t)).unwrap();
            assert_eq!(
                wait,
                first - elapsed,
                "{prev} {cur} {elapsed} {cost} {limit}"
            );
        }
    }
}
