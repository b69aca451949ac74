//! The local limiter's hot path against the naive way of limiting.
//!
//! Each iteration is one decision plus its release for ONE key shared by all
//! threads (the worst case: every thread contends for the same counters):
//! - `lock_free`: `Limiter::acquire` with rpm, tpm and `max_concurrent` set
//!   (none of them binding), then `Permit::settle` with a corrected token
//!   count: three compare-and-swap loops on acquire, one on settle, one
//!   atomic decrement on drop;
//! - `naive`: a `Mutex<HashMap<String, Vec<Instant>>>` sliding log: lock,
//!   look the key up, drop timestamps older than a minute, compare the count
//!   with the rpm, push. It checks rpm only and its settle is free, so it
//!   does less than the real limiter; it is also flattered by the bench, as
//!   nothing in a sample is old enough to be pruned.
//!
//! Reported times are wall-clock time per decision with all threads
//! running (`iter_custom`: total time / iterations), so at N threads a
//! perfectly scaling structure would show 1/N of its 1-thread time, and a
//! serialising one at least its 1-thread time. Thread start-up is outside the
//! measurement (the threads wait on a barrier). Numbers depend on the
//! machine's core count: past the number of cores, threads only take turns.

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use futures_util::FutureExt;
use keyrouter::config::{OnBackendError, RateLimitBackend, RateLimitConfig};
use keyrouter::keys::Limits;
use keyrouter::limits::{KeyCounters, KeyRef, Limiter};
use keyrouter::metrics::Metrics;
use std::collections::HashMap;
use std::hint::black_box;
use std::sync::{Arc, Barrier, Mutex};
use std::time::{Duration, Instant};

const KEY_ID: &str = "key_benchmark0001";
const THREADS: [usize; 3] = [1, 2, 8];

/// The naive limiter: a log of admission times per key under one mutex.
struct NaiveLimiter {
    rpm: usize,
    log: Mutex<HashMap<String, Vec<Instant>>>,
}

impl NaiveLimiter {
    fn acquire(&self, key: &str) -> bool {
        let now = Instant::now();
        let mut log = self.log.lock().unwrap();
        if !log.contains_key(key) {
            log.insert(key.to_owned(), Vec::new());
        }
        let times = log.get_mut(key).unwrap();
        let fresh = times.partition_point(|t| now.duration_since(*t) >= Duration::from_secs(60));
        times.drain(..fresh);
        if times.len() < self.rpm {
            times.push(now);
            true
        } else {
            false
        }
    }
}

/// Runs `op` `iters` times in total, split over `threads` threads started
/// together; returns the wall time of the whole batch.
fn run_threads(threads: usize, iters: u64, op: &(dyn Fn() + Sync)) -> Duration {
    let barrier = Barrier::new(threads + 1);
    let per_thread = iters.div_ceil(threads as u64);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(|| {
                barrier.wait();
                for _ in 0..per_thread {
                    op();
                }
            });
        }
        barrier.wait();
        // Leaving the scope joins every thread before `elapsed`.
        Instant::now()
    })
    .elapsed()
}

fn limiter() -> Limiter {
    let cfg = RateLimitConfig {
        backend: RateLimitBackend::Local,
        on_backend_error: OnBackendError::Local,
        redis_prefix: "keyrouter".into(),
        cooldown_base: Duration::from_secs(30),
        cooldown_max: Duration::from_secs(600),
    };
    // The local backend never awaits.
    Limiter::new(&cfg, &Metrics::default())
        .now_or_never()
        .expect("the local limiter is built without waiting")
}

fn acquire_settle(c: &mut Criterion) {
    let mut group = c.benchmark_group("limiter_acquire_settle_one_key");
    let limits = Limits {
        rpm: Some(u32::MAX),
        tpm: Some(u32::MAX),
        max_concurrent: Some(1_000),
    };
    for threads in THREADS {
        group.bench_with_input(
            BenchmarkId::new("lock_free", threads),
            &threads,
            |b, &threads| {
                let limiter = limiter();
                let counters = Arc::new(KeyCounters::new());
                let key = KeyRef {
                    id: KEY_ID,
                    limits: &limits,
                    counters: &counters,
                };
                let op = || {
                    // The local path completes on first poll; a refusal
                    // (none is expected with these limits) is still a decision.
                    if let Some(Ok(permit)) = limiter.acquire(key, 2).now_or_never() {
                        black_box(&permit);
                        permit.settle(1);
                    }
                };
                b.iter_custom(|iters| run_threads(threads, iters, &op));
            },
        );
        group.bench_with_input(
            BenchmarkId::new("naive_mutex_log", threads),
            &threads,
            |b, &threads| {
                b.iter_custom(|iters| {
                    // A fresh log per batch keeps its size to one batch.
                    let naive = NaiveLimiter {
                        rpm: usize::MAX,
                        log: Mutex::new(HashMap::new()),
                    };
                    let op = || {
                        black_box(naive.acquire(black_box(KEY_ID)));
                    };
                    run_threads(threads, iters, &op)
                });
            },
        );
    }
    group.finish();
}

criterion_group!(benches, acquire_settle);
criterion_main!(benches);
