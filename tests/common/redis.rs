//! A real Redis for the tests that share limits through it.
#![allow(dead_code)]

use redis::aio::MultiplexedConnection;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// `KEYROUTER_TEST_REDIS_URL`, else the local default.
pub fn redis_url() -> String {
    std::env::var("KEYROUTER_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A plain connection, to look at what the limiter wrote. Fails the test
/// when no Redis answers: these tests are the only proof that limits are
/// shared, so they must not pass vacuously.
pub async fn plain(url: &str) -> MultiplexedConnection {
    let connect = async {
        redis::Client::open(url)
            .ok()?
            .get_multiplexed_async_connection()
            .await
            .ok()
    };
    match tokio::time::timeout(Duration::from_secs(3), connect).await {
        Ok(Some(conn)) => conn,
        _ => panic!(
            "these tests need a running Redis at {url} \
             (set KEYROUTER_TEST_REDIS_URL; CI starts one)"
        ),
    }
}

/// A prefix no other test or run uses.
pub fn unique_prefix(test: &str) -> String {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("krtest:{test}:{}:{nanos}", std::process::id())
}
