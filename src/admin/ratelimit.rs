//! Per-client-address request limit of the management API: 100 requests per
//! minute, counted before authentication so that guessing credentials is
//! throttled as hard as using them.
//!
//! A fixed window per address, opened by the address's first request: cheap
//! (one map entry of a few bytes per address), exact about "100 in any minute
//! since the window opened", and it yields an honest `Retry-After` (the end
//! of the window). Memory stays bounded by sweeping expired windows whenever
//! the map has doubled since the last sweep or a window length has passed,
//! so a sweep costs amortised O(1) per new address.
//!
//! An IPv6 client is counted by its /64 network: one host usually holds a
//! whole /64 and could otherwise pick a fresh address for every request.

use dashmap::DashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Requests one address may make per window (contract).
pub const LIMIT: u32 = 100;
/// The window length (contract: per minute).
pub const WINDOW: Duration = Duration::from_secs(60);
/// Below this many addresses the map is only swept once per window.
const MIN_SWEEP_LEN: usize = 1024;

/// One address's current window.
#[derive(Clone, Copy, Debug)]
struct Window {
    opened: Instant,
    count: u32,
}

/// When the next sweep of expired windows is due.
#[derive(Debug)]
struct SweepPlan {
    at_len: usize,
    at_time: Instant,
}

/// The limiter; one per admin listener, shared by every connection.
#[derive(Debug)]
pub struct AddressLimiter {
    windows: DashMap<IpAddr, Window>,
    /// Taken only when a new address arrives, and only with `try_lock`: a
    /// request never waits for another one's sweep.
    sweep: Mutex<SweepPlan>,
}

impl AddressLimiter {
    pub fn new(now: Instant) -> Self {
        AddressLimiter {
            windows: DashMap::new(),
            sweep: Mutex::new(SweepPlan {
                at_len: MIN_SWEEP_LEN,
                at_time: now + WINDOW,
            }),
        }
    }

    /// Counts a request from `addr` at `now`. `Err` holds how long until the
    /// address may try again (at least one second, for `Retry-After`).
    pub fn check(&self, addr: IpAddr, now: Instant) -> Result<(), Duration> {
        let mut new_address = false;
        let verdict = {
            let mut window = self.windows.entry(client_key(addr)).or_insert_with(|| {
                new_address = true;
                Window {
                    opened: now,
                    count: 0,
                }
            });
            if now.saturating_duration_since(window.opened) >= WINDOW {
                *window = Window {
                    opened: now,
                    count: 0,
                };
            }
            if window.count < LIMIT {
                window.count += 1;
                Ok(())
            } else {
                let left = (window.opened + WINDOW).saturating_duration_since(now);
                Err(left.max(Duration::from_secs(1)))
            }
            // The entry guard drops here, before a sweep touches the map.
        };
        if new_address {
            self.maybe_sweep(now);
        }
        verdict
    }

    fn maybe_sweep(&self, now: Instant) {
        let Ok(mut plan) = self.sweep.try_lock() else {
            return;
        };
        if self.windows.len() < plan.at_len && now < plan.at_time {
            return;
        }
        self.windows
            .retain(|_, w| now.saturating_duration_since(w.opened) < WINDOW);
        plan.at_len = (self.windows.len() * 2).max(MIN_SWEEP_LEN);
        plan.at_time = now + WINDOW;
    }

    #[cfg(test)]
    fn tracked(&self) -> usize {
        self.windows.len()
    }
}

/// The address a client is counted under: IPv4 as is (also when it arrives
/// IPv4-mapped on a dual-stack socket), IPv6 by its /64 network.
fn client_key(addr: IpAddr) -> IpAddr {
    match addr {
        IpAddr::V4(_) => addr,
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6((u128::from(v6) & !u128::from(u64::MAX)).into()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(0x0a00_0000 + n))
    }

    #[test]
    fn hundred_pass_then_refused_until_the_window_ends() {
        let t0 = Instant::now();
        let l = AddressLimiter::new(t0);
        for i in 0..LIMIT {
            assert!(l.check(ip(1), t0 + Duration::from_millis(i.into())).is_ok());
        }
        let wait = l.check(ip(1), t0 + Duration::from_secs(10)).unwrap_err();
        assert_eq!(wait, Duration::from_secs(50));
        // Another address has its own window.
        assert!(l.check(ip(2), t0 + Duration::from_secs(10)).is_ok());
        // A new window opens once the old one is over.
        assert!(l.check(ip(1), t0 + WINDOW).is_ok());
    }

    #[test]
    fn ipv6_counts_per_64_and_mapped_ipv4_as_ipv4() {
        let t0 = Instant::now();
        let l = AddressLimiter::new(t0);
        for n in 0..LIMIT {
            let addr: IpAddr = format!("2001:db8:1:2::{n:x}").parse().unwrap();
            l.check(addr, t0).unwrap();
        }
        let same_64: IpAddr = "2001:db8:1:2:ffff::1".parse().unwrap();
        assert!(l.check(same_64, t0).is_err());
        let other_64: IpAddr = "2001:db8:1:3::1".parse().unwrap();
        assert!(l.check(other_64, t0).is_ok());

        let mapped: IpAddr = "::ffff:10.0.0.1".parse().unwrap();
        assert_eq!(client_key(mapped), ip(1));
    }

    #[test]
    fn retry_after_is_at_least_one_second() {
        let t0 = Instant::now();
        let l = AddressLimiter::new(t0);
        for _ in 0..LIMIT {
            l.check(ip(1), t0).unwrap();
        }
        let wait = l
            .check(ip(1), t0 + WINDOW - Duration::from_millis(1))
            .unwrap_err();
        assert_eq!(wait, Duration::from_secs(1));
    }

    #[test]
    fn expired_windows_are_swept_so_memory_stays_bounded() {
        let t0 = Instant::now();
        let l = AddressLimiter::new(t0);
        // Stay below the size threshold so only the clock triggers the sweep.
        for n in 0..(MIN_SWEEP_LEN as u32 - 2) {
            l.check(ip(n), t0).unwrap();
        }
        assert_eq!(l.tracked(), MIN_SWEEP_LEN - 2);
        // A window later, the next new address triggers a sweep of the old ones.
        l.check(ip(1_000_000), t0 + WINDOW).unwrap();
        assert_eq!(l.tracked(), 1);
    }

    #[test]
    fn growth_triggers_a_sweep_before_the_window_ends() {
        let t0 = Instant::now();
        let l = AddressLimiter::new(t0);
        let min = MIN_SWEEP_LEN as u32;
        for n in 0..min - 1 {
            l.check(ip(n), t0).unwrap();
        }
        // Reaching the threshold sweeps (nothing has expired yet) and moves
        // the time-based sweep to a window from now.
        l.check(ip(min), t0 + Duration::from_secs(30)).unwrap();
        assert_eq!(l.tracked(), MIN_SWEEP_LEN);
        // Before that time, doubling the map sweeps the windows that expired.
        let later = t0 + WINDOW + Duration::from_secs(1);
        for n in 0..min {
            l.check(ip(100_000 + n), later).unwrap();
        }
        assert_eq!(l.tracked(), MIN_SWEEP_LEN + 1);
    }
}
