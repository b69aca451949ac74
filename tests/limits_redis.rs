//! The Redis rate-limit backend against a real Redis: limits shared by two
//! limiters (as two replicas would), keys that expire by themselves, and the
//! fallback when Redis goes away and comes back.
//!
//! Needs a Redis at `KEYROUTER_TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379`; CI starts one) and, for the outage tests, the
//! `redis-server` binary, which they start on a free port of their own. Each
//! test writes under its own `rate_limit.redis_prefix`, so tests run in
//! parallel and leave nothing another run could trip over.

#[path = "common/logs.rs"]
mod logs;
#[path = "common/redis.rs"]
mod test_redis;
use keyrouter::config::{OnBackendError, RateLimitBackend, RateLimitConfig};
use keyrouter::keys::Limits;
use keyrouter::limits::{KeyCounters, KeyRef, KeyUsage, Limiter, Permit, Refusal};
use keyrouter::metrics::Metrics;
use keyrouter::secret::Secret;
use logs::{Captured, capture};
use redis::AsyncCommands;
use redis::aio::MultiplexedConnection;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};
use test_redis::{plain, redis_url, unique_prefix};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const KEY_ID: &str = "key_sharedtest01";

/// Held by the tests that make a limiter log that Redis is down or back.
/// Log capture is per thread, and `tracing` caches whether a log line is
/// wanted when the line is first reached: a test without a capture reaching
/// a line while another test installs its capture can leave the line cached
/// as unwanted, and the capturing test then misses it. These tests do not
/// overlap, so the cache is rebuilt between them.
static LIMITER_LOGS: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn config(url: &str, prefix: &str, on_error: OnBackendError) -> RateLimitConfig {
    RateLimitConfig {
        backend: RateLimitBackend::Redis {
            url: Secret::new(url.to_owned()),
        },
        on_backend_error: on_error,
        redis_prefix: prefix.to_owned(),
        cooldown_base: Duration::from_secs(30),
        cooldown_max: Duration::from_secs(600),
    }
}

/// One replica: a limiter with its own metrics and its own key counters.
struct Replica {
    limiter: Limiter,
    metrics: Metrics,
    counters: Arc<KeyCounters>,
}

impl Replica {
    async fn new(url: &str, prefix: &str, on_error: OnBackendError) -> Replica {
        let metrics = Metrics::default();
        let limiter = Limiter::new(&config(url, prefix, on_error), &metrics).await;
        Replica {
            limiter,
            metrics,
            counters: Arc::new(KeyCounters::new()),
        }
    }

    async fn acquire(&self, limits: &Limits, tokens: u64) -> Result<Permit, Refusal> {
        let key = KeyRef {
            id: KEY_ID,
            limits,
            counters: &self.counters,
        };
        self.limiter.acquire(key, tokens).await
    }

    fn fallback(&self) -> i64 {
        self.metrics.rate_limit_fallback.get()
    }
}

fn limits(rpm: Option<u32>, tpm: Option<u32>, max_concurrent: Option<u32>) -> Limits {
    Limits {
        rpm,
        tpm,
        max_concurrent,
    }
}

/// Counts are per Unix minute: a test that asserts exact counts starts well
/// inside one (waiting at most ~3 s), so all its requests share a window.
async fn away_from_window_edge(conn: &mut MultiplexedConnection) {
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query_async(conn).await.unwrap();
    let into_minute = (secs % 60) * 1000 + micros / 1000;
    if into_minute > 57_000 {
        tokio::time::sleep(Duration::from_millis(60_000 - into_minute + 50)).await;
    }
}

/// Polls `check` every 20 ms until it holds, for at most `limit`.
async fn eventually<F: std::future::Future<Output = bool>>(
    limit: Duration,
    what: &str,
    mut check: impl FnMut() -> F,
) {
    let deadline = Instant::now() + limit;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn sum_of(conn: &mut MultiplexedConnection, pattern: &str) -> i64 {
    let keys: Vec<String> = conn.keys(pattern).await.unwrap();
    let mut sum = 0;
    for k in keys {
        let v: Option<i64> = conn.get(&k).await.unwrap();
        sum += v.unwrap_or(0);
    }
    sum
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_replicas_admit_exactly_the_rpm_together() {
    let url = redis_url();
    let mut conn = plain(&url).await;
    away_from_window_edge(&mut conn).await;
    let prefix = unique_prefix("rpm");
    // `deny`, so a slow Redis shows up as a failure here rather than as
    // requests admitted by the local fallback.
    let a = Arc::new(Replica::new(&url, &prefix, OnBackendError::Deny).await);
    let b = Arc::new(Replica::new(&url, &prefix, OnBackendError::Deny).await);
    let l = limits(Some(50), None, None);

    let mut tasks = Vec::new();
    for i in 0..200 {
        let replica = Arc::clone(if i % 2 == 0 { &a } else { &b });
        tasks.push(tokio::spawn(async move {
            replica.acquire(&l, 0).await.map(drop)
        }));
    }
    let mut admitted = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(()) => admitted += 1,
            Err(Refusal::Limited { retry_after }) => assert!(retry_after > Duration::ZERO),
            Err(Refusal::BackendUnavailable) => panic!("Redis did not answer in time"),
        }
    }
    assert_eq!(admitted, 50);
    let counted = sum_of(&mut conn, &format!("{prefix}:key:{KEY_ID}:rpm:*")).await;
    assert_eq!(counted, 50);
    // A refused key is marked, so a selector can skip it without asking.
    assert!(a.counters.limited_until().is_some() || b.counters.limited_until().is_some());
}

#[tokio::test]
async fn tokens_are_shared_and_settle_corrections_reach_the_other_replica() {
    let url = redis_url();
    let mut conn = plain(&url).await;
    away_from_window_edge(&mut conn).await;
    let prefix = unique_prefix("tpm");
    let a = Replica::new(&url, &prefix, OnBackendError::Deny).await;
    let b = Replica::new(&url, &prefix, OnBackendError::Deny).await;
    let l = limits(None, Some(1_000), None);
    let tpm_keys = format!("{prefix}:key:{KEY_ID}:tpm:*");

    let first = a.acquire(&l, 600).await.unwrap();
    assert!(matches!(
        b.acquire(&l, 600).await,
        Err(Refusal::Limited { .. })
    ));
    // A used less than it reserved: B sees the room once the release lands.
    first.settle(100);
    eventually(
        Duration::from_secs(3),
        "the correction reaches Redis",
        || {
            let mut conn = conn.clone();
            let keys = tpm_keys.clone();
            async move { sum_of(&mut conn, &keys).await == 100 }
        },
    )
    .await;
    let second = b.acquire(&l, 600).await.unwrap();

    // B used more than it reserved: the excess counts for A.
    second.settle(900);
    eventually(
        Duration::from_secs(3),
        "the correction reaches Redis",
        || {
            let mut conn = conn.clone();
            let keys = tpm_keys.clone();
            async move { sum_of(&mut conn, &keys).await == 1_000 }
        },
    )
    .await;
    assert!(matches!(
        a.acquire(&l, 1).await,
        Err(Refusal::Limited { .. })
    ));
    // This replica's own view counts what it settled.
    assert_eq!(a.counters.usage().tokens_last_minute, 100);
}

#[tokio::test]
async fn concurrency_slots_are_shared_released_and_expire() {
    let url = redis_url();
    let mut conn = plain(&url).await;
    let prefix = unique_prefix("slots");
    let a = Replica::new(&url, &prefix, OnBackendError::Deny).await;
    let b = Replica::new(&url, &prefix, OnBackendError::Deny).await;
    let l = limits(None, None, Some(2));
    let slots = format!("{prefix}:key:{KEY_ID}:inflight");

    let held_a = a.acquire(&l, 0).await.unwrap();
    let held_b = b.acquire(&l, 0).await.unwrap();
    assert_eq!(a.counters.in_flight(), 1);
    let Err(Refusal::Limited { retry_after }) = a.acquire(&l, 0).await else {
        panic!("a third slot must be refused");
    };
    assert_eq!(retry_after, Duration::from_secs(1));
    // A refusal for concurrency alone does not mark the key as limited.
    assert!(a.counters.limited_until().is_none());

    // Released on drop (from a spawned task).
    drop(held_a);
    assert_eq!(a.counters.in_flight(), 0);
    eventually(Duration::from_secs(3), "the slot is released", || {
        let mut conn = conn.clone();
        let slots = slots.clone();
        async move { conn.zcard::<_, u64>(&slots).await.unwrap() == 1 }
    })
    .await;
    let held_a = a.acquire(&l, 0).await.unwrap();

    // Never released (as if the replica crashed): the slot stays taken ...
    std::mem::forget(held_b);
    drop(held_a);
    eventually(Duration::from_secs(3), "the other slot is released", || {
        let mut conn = conn.clone();
        let slots = slots.clone();
        async move { conn.zcard::<_, u64>(&slots).await.unwrap() == 1 }
    })
    .await;
    let ttl: i64 = conn.pttl(&slots).await.unwrap();
    assert!((1..=601_000).contains(&ttl), "slots PTTL {ttl}");
    let _a1 = a.acquire(&l, 0).await.unwrap();
    assert!(a.acquire(&l, 0).await.is_err());
    // ... until its lease ends: shorten the leases of every slot, plus one
    // of a replica that crashed earlier.
    let members: Vec<String> = conn.zrange(&slots, 0, -1).await.unwrap();
    for m in &members {
        let _: () = conn.zadd(&slots, m, 1).await.unwrap();
    }
    let _: () = conn.zadd(&slots, "crashed-replica:0", 1).await.unwrap();
    let _a2 = a.acquire(&l, 0).await.unwrap();
    let _b2 = b.acquire(&l, 0).await.unwrap();
    assert!(a.acquire(&l, 0).await.is_err());
}

#[tokio::test]
async fn client_rpm_is_shared() {
    let url = redis_url();
    let mut conn = plain(&url).await;
    away_from_window_edge(&mut conn).await;
    let prefix = unique_prefix("client");
    let a = Replica::new(&url, &prefix, OnBackendError::Deny).await;
    let b = Replica::new(&url, &prefix, OnBackendError::Deny).await;
    a.limiter.acquire_client("client-1", 3).await.unwrap();
    b.limiter.acquire_client("client-1", 3).await.unwrap();
    a.limiter.acquire_client("client-1", 3).await.unwrap();
    for r in [&a, &b] {
        let Err(Refusal::Limited { retry_after }) = r.limiter.acquire_client("client-1", 3).await
        else {
            panic!("the 4th request of the minute must be refused");
        };
        assert!(retry_after > Duration::from_secs(1));
    }
    // Another client has its own window.
    b.limiter.acquire_client("client-2", 3).await.unwrap();
}

impl Replica {
    /// The key's usage as the management API shows it through this replica.
    async fn usage(&self, limits: &Limits) -> KeyUsage {
        self.limiter
            .usage(KEY_ID, limits, self.counters.usage())
            .await
    }
}

#[tokio::test]
async fn a_keys_usage_counts_every_replica_where_redis_counts_it() {
    let url = redis_url();
    let mut conn = plain(&url).await;
    away_from_window_edge(&mut conn).await;
    let all = limits(Some(100), Some(100_000), Some(10));
    let prefix = unique_prefix("usage");
    let a = Replica::new(&url, &prefix, OnBackendError::Deny).await;
    let b = Replica::new(&url, &prefix, OnBackendError::Deny).await;

    let held = [
        a.acquire(&all, 40).await.unwrap(),
        a.acquire(&all, 40).await.unwrap(),
    ];
    let done = b.acquire(&all, 40).await.unwrap();
    done.settle(70);
    let shared = KeyUsage {
        requests_last_minute: 3,
        tokens_last_minute: 150,
        in_flight: 2,
    };
    // The release of B's slot and tokens lands from a spawned task.
    eventually(
        Duration::from_secs(3),
        "B's release reaches Redis",
        || async { b.usage(&all).await == shared },
    )
    .await;
    assert_eq!(a.usage(&all).await, shared);
    // Each replica's own counters saw only its own traffic.
    assert_eq!(b.counters.usage().requests_last_minute, 1);
    assert_eq!(a.counters.usage().in_flight, 2);
    drop(held);

    // Only the `rpm` makes Redis count: requests are shared, tokens and
    // slots stay each replica's.
    let rpm_only = limits(Some(100), None, None);
    let prefix = unique_prefix("usage_rpm");
    let a = Replica::new(&url, &prefix, OnBackendError::Deny).await;
    let b = Replica::new(&url, &prefix, OnBackendError::Deny).await;
    let _held = a.acquire(&rpm_only, 40).await.unwrap();
    a.acquire(&rpm_only, 40).await.unwrap().settle(25);
    assert_eq!(
        b.usage(&rpm_only).await,
        KeyUsage {
            requests_last_minute: 2,
            tokens_last_minute: 0,
            in_flight: 0,
        }
    );
    assert_eq!(
        a.usage(&rpm_only).await,
        KeyUsage {
            requests_last_minute: 2,
            tokens_last_minute: 65,
            in_flight: 1,
        }
    );
}

#[tokio::test]
async fn every_counter_carries_a_ttl() {
    let url = redis_url();
    let mut conn = plain(&url).await;
    let prefix = unique_prefix("ttl");
    let a = Replica::new(&url, &prefix, OnBackendError::Deny).await;
    let _held = a
        .acquire(&limits(Some(10), Some(1_000), Some(5)), 10)
        .await
        .unwrap();
    a.limiter.acquire_client("client-1", 10).await.unwrap();

    let keys: Vec<String> = conn.keys(format!("{prefix}:*")).await.unwrap();
    let kinds = ["rpm:", "tpm:", "inflight", "client:"];
    for kind in kinds {
        assert!(
            keys.iter().any(|k| k.contains(kind)),
            "no {kind} key in {keys:?}"
        );
    }
    for k in &keys {
        let ttl: i64 = conn.pttl(k).await.unwrap();
        let max = if k.ends_with(":inflight") {
            601_000
        } else {
            130_000
        };
        assert!((1..=max).contains(&ttl), "{k}: PTTL {ttl}");
    }
}

/// A `redis-server` of the test's own, on a free port, killed on drop.
struct OwnRedis {
    child: Child,
    port: u16,
}

const REDIS_SERVER: &str = "/usr/bin/redis-server";

impl OwnRedis {
    async fn start(port: Option<u16>) -> OwnRedis {
        assert!(
            std::path::Path::new(REDIS_SERVER).exists(),
            "the outage tests need the redis-server binary at {REDIS_SERVER} (apt install redis-server)"
        );
        let port = port.unwrap_or_else(free_port);
        let child = Command::new(REDIS_SERVER)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let server = OwnRedis { child, port };
        let url = server.url();
        eventually(Duration::from_secs(5), "redis-server answers", || {
            let url = url.clone();
            async move {
                let Ok(client) = redis::Client::open(url.as_str()) else {
                    return false;
                };
                match client.get_multiplexed_async_connection().await {
                    Ok(mut c) => redis::cmd("PING").query_async::<()>(&mut c).await.is_ok(),
                    Err(_) => false,
                }
            }
        })
        .await;
        server
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn kill(mut self) -> u16 {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.port
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nothing listens on (right after this returns).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

#[tokio::test]
async fn counts_locally_while_redis_is_down_and_returns_to_it() {
    let _serial = LIMITER_LOGS.lock().await;
    let logs = Captured::default();
    let _guard = capture(&logs);
    let server = OwnRedis::start(None).await;
    let url = server.url();
    let prefix = unique_prefix("outage");
    let local = Replica::new(&url, &prefix, OnBackendError::Local).await;
    let deny = Replica::new(&url, &prefix, OnBackendError::Deny).await;
    let l = limits(Some(1_000), None, None);
    let no_limits = Limits::default();
    let rpm_keys = format!("{prefix}:key:{KEY_ID}:rpm:*");

    local.acquire(&l, 0).await.unwrap();
    deny.acquire(&l, 0).await.unwrap();
    assert_eq!(local.fallback(), 0);
    assert_eq!(sum_of(&mut plain(&url).await, &rpm_keys).await, 2);

    let port = server.kill();
    // `local`: still admitted, counted in this process.
    let before = local.counters.usage().requests_last_minute;
    local.acquire(&l, 0).await.unwrap();
    assert_eq!(local.fallback(), 1);
    assert!(local.metrics.rate_limit_backend_errors.get() >= 1);
    assert_eq!(local.counters.usage().requests_last_minute, before + 1);
    // Local counting enforces the limits too.
    let tight = limits(Some(1), None, None);
    let other = Arc::new(KeyCounters::new());
    let key = KeyRef {
        id: "key_othertest01",
        limits: &tight,
        counters: &other,
    };
    local.limiter.acquire(key, 0).await.unwrap();
    assert!(matches!(
        local.limiter.acquire(key, 0).await,
        Err(Refusal::Limited { .. })
    ));
    // `deny`: refused, except a key without limits, which has nothing to
    // count.
    assert!(matches!(
        deny.acquire(&l, 0).await,
        Err(Refusal::BackendUnavailable)
    ));
    assert!(matches!(
        deny.limiter.acquire_client("client-1", 5).await,
        Err(Refusal::BackendUnavailable)
    ));
    deny.acquire(&no_limits, 0).await.unwrap();
    assert_eq!(deny.fallback(), 0, "deny does not count locally");

    // Back on the same port: both return to Redis within a few seconds.
    let server = OwnRedis::start(Some(port)).await;
    eventually(
        Duration::from_secs(6),
        "the local replica uses Redis again",
        || async {
            let _ = local.acquire(&l, 0).await;
            local.fallback() == 0
        },
    )
    .await;
    eventually(
        Duration::from_secs(6),
        "the deny replica uses Redis again",
        || async { deny.acquire(&l, 0).await.is_ok() },
    )
    .await;
    let mut conn = plain(&server.url()).await;
    assert!(
        sum_of(&mut conn, &rpm_keys).await >= 2,
        "counts are in Redis again"
    );
    // One line each way per replica, however many requests saw the outage.
    let text = logs.text();
    assert_eq!(text.matches("Redis is unreachable").count(), 2, "{text}");
    assert_eq!(text.matches("reachable again").count(), 2, "{text}");
}

#[tokio::test]
async fn starts_when_redis_is_unreachable() {
    let _serial = LIMITER_LOGS.lock().await;
    let url = format!("redis://127.0.0.1:{}", free_port());
    let prefix = unique_prefix("closed");
    let started = Instant::now();
    let local = Replica::new(&url, &prefix, OnBackendError::Local).await;
    let deny = Replica::new(&url, &prefix, OnBackendError::Deny).await;
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(local.fallback(), 1);

    let l = limits(Some(2), None, None);
    local.acquire(&l, 0).await.unwrap();
    local.acquire(&l, 0).await.unwrap();
    assert!(matches!(
        local.acquire(&l, 0).await,
        Err(Refusal::Limited { .. })
    ));
    local.limiter.acquire_client("client-1", 1).await.unwrap();
    assert!(local.limiter.acquire_client("client-1", 1).await.is_err());
    assert!(matches!(
        deny.acquire(&l, 0).await,
        Err(Refusal::BackendUnavailable)
    ));
    // With Redis out of reach, a key's usage is what this replica counted.
    assert_eq!(local.usage(&l).await.requests_last_minute, 2);
}

#[tokio::test]
async fn the_redis_url_is_never_logged() {
    let _serial = LIMITER_LOGS.lock().await;
    let logs = Captured::default();
    let _guard = capture(&logs);
    let prefix = unique_prefix("secret");
    let unreachable = format!("redis://:hunter2-secret@127.0.0.1:{}", free_port());
    let bad = "not-a-url://:hunter3-secret@nowhere";
    for url in [unreachable.as_str(), bad] {
        let r = Replica::new(url, &prefix, OnBackendError::Local).await;
        assert_eq!(r.fallback(), 1);
        r.acquire(&limits(Some(1), None, None), 0).await.unwrap();
    }
    let text = logs.text();
    assert!(text.contains("unreachable"), "{text}");
    assert!(text.contains("KEYROUTER_REDIS_URL"), "{text}");
    assert!(!text.contains("hunter"), "{text}");
    assert!(!text.contains("127.0.0.1"), "{text}");
}

/// A TCP relay in front of the Redis at `url` that, while `slow` is set,
/// holds every read from the limiter for `delay` before passing it on: a
/// Redis that answers late. Returns the URL to reach Redis through it.
async fn slow_relay(url: &str, slow: Arc<AtomicBool>, delay: Duration) -> String {
    let (scheme, rest) = url.split_once("://").expect("a redis URL");
    let (auth, host) = rest
        .rsplit_once('@')
        .map_or((String::new(), rest), |(a, h)| (format!("{a}@"), h));
    let (addr, path) = host.split_once('/').unwrap_or((host, ""));
    let target = if addr.contains(':') {
        addr.to_owned()
    } else {
        format!("{addr}:6379")
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let relay = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let Ok(mut server) = tokio::net::TcpStream::connect(&target).await else {
                continue;
            };
            let slow = slow.clone();
            tokio::spawn(async move {
                let (mut client_read, mut client_write) = client.split();
                let (mut server_read, mut server_write) = server.split();
                let upstream = async {
                    let mut buf = vec![0u8; 16 * 1024];
                    loop {
                        let n = client_read.read(&mut buf).await?;
                        if n == 0 {
                            return Ok::<_, std::io::Error>(());
                        }
                        if slow.load(Ordering::SeqCst) {
                            tokio::time::sleep(delay).await;
                        }
                        server_write.write_all(&buf[..n]).await?;
                    }
                };
                let downstream = tokio::io::copy(&mut server_read, &mut client_write);
                let _ = tokio::join!(upstream, downstream);
            });
        }
    });
    format!("{scheme}://{auth}{relay}/{path}")
}

#[tokio::test]
async fn a_slot_granted_after_the_caller_gave_up_is_given_back() {
    let _serial = LIMITER_LOGS.lock().await;
    let url = redis_url();
    let mut conn = plain(&url).await;
    away_from_window_edge(&mut conn).await;
    let prefix = unique_prefix("late");
    let slow = Arc::new(AtomicBool::new(false));
    let relayed = slow_relay(&url, slow.clone(), Duration::from_millis(600)).await;
    let a = Replica::new(&relayed, &prefix, OnBackendError::Local).await;
    let l = limits(Some(1000), None, Some(1));

    // Redis answers after the caller's timeout: the request is decided in
    // this process, and the grant Redis makes later ...
    slow.store(true, Ordering::SeqCst);
    let started = Instant::now();
    let permit = a.acquire(&l, 0).await.expect("decided locally");
    assert!(
        started.elapsed() < Duration::from_millis(550),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(a.fallback(), 1);
    slow.store(false, Ordering::SeqCst);

    // ... does happen (the request is counted in the rpm window), but its
    // slot is given back at once instead of being held for its lease.
    let slots = format!("{prefix}:key:{KEY_ID}:inflight");
    let rpm = format!("{prefix}:key:{KEY_ID}:rpm:*");
    eventually(
        Duration::from_secs(5),
        "the late grant is given back",
        || {
            let mut conn = conn.clone();
            let (slots, rpm) = (slots.clone(), rpm.clone());
            async move {
                sum_of(&mut conn, &rpm).await == 1
                    && conn.zcard::<_, u64>(&slots).await.unwrap() == 0
            }
        },
    )
    .await;
    drop(permit);
}
