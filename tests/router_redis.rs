//! The key router with the Redis limiter, end to end: two gateways (as two
//! replicas) sharing one store and one Redis never admit more than a key's
//! or a client's `rpm` together; an unreachable Redis falls back to local
//! counting or denies, as configured; a Redis that dies mid-way leaves the
//! limits enforced.
//!
//! Needs a Redis at `KEYROUTER_TEST_REDIS_URL` (default
//! `redis://127.0.0.1:6379`; CI starts one) and, for the outage test, the
//! `redis-server` binary. Each test writes under its own
//! `rate_limit.redis_prefix`.

mod common;

use chrono::Utc;
use common::mock_upstream::MockUpstream;
use common::redis::{plain, redis_url, unique_prefix};
use common::{TestGateway, sign_jwt};
use keyrouter::keys::Vault;
use redis::aio::MultiplexedConnection;
use serde_json::{Value, json};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The sum of the counters matching `pattern`.
async fn sum_of(conn: &mut MultiplexedConnection, pattern: &str) -> i64 {
    let keys: Vec<String> = redis::cmd("KEYS")
        .arg(pattern)
        .query_async(conn)
        .await
        .unwrap();
    let mut sum = 0;
    for k in keys {
        let v: i64 = redis::cmd("GET").arg(&k).query_async(conn).await.unwrap();
        sum += v;
    }
    sum
}

fn openai(url: &str) -> String {
    format!(
        "[[providers]]\nid = \"openai\"\nkind = \"openai\"\nbase_url = \"{url}\"\nroute_prefix = \"/openai\"\ndefault = true\n"
    )
}

/// `[rate_limit]` for Redis under `prefix`.
fn redis_limits(prefix: &str, on_error: &str) -> String {
    format!(
        "[rate_limit]\nbackend = \"redis\"\nredis_prefix = \"{prefix}\"\non_backend_error = \"{on_error}\"\n"
    )
}

/// Two gateways sharing one SQLite store (so one key id) and one Redis.
struct Replicas {
    a: TestGateway,
    b: TestGateway,
    _dir: tempfile::TempDir,
}

async fn replicas(mock: &MockUpstream, url: &str, toml: &str, env: &[(&str, &str)]) -> Replicas {
    let dir = tempfile::tempdir().unwrap();
    let fernet = Vault::generate_key();
    let start = || {
        let mut builder = TestGateway::builder()
            .state_dir(dir.path())
            .fernet_keys(&[&fernet])
            .providers(&openai(&mock.url))
            .toml(toml)
            .env("KEYROUTER_REDIS_URL", url);
        for (name, value) in env {
            builder = builder.env(name, value);
        }
        builder.start()
    };
    let a = start().await;
    let b = start().await;
    Replicas { a, b, _dir: dir }
}

/// Registers `material` for OpenAI with `limits` through `gw`; returns the
/// key id.
async fn register(gw: &TestGateway, material: &str, limits: Value) -> String {
    let reply = gw
        .post(
            "/keys",
            json!({"key_material": material, "provider_id": "openai", "limits": limits}),
        )
        .send()
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text);
    reply.json()["id"].as_str().unwrap().to_owned()
}

/// Waits (up to 5 s) until `gw` would choose key `id` (its pool reload
/// brought a key registered through another replica).
async fn until_in_pool(gw: &TestGateway, id: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let keys = gw.app().pool.snapshot("openai").unwrap();
        if keys.keys.iter().any(|k| k.id.as_str() == id) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{id} never reached the other replica"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[derive(Debug)]
struct Answer {
    status: u16,
    headers: reqwest::header::HeaderMap,
    text: String,
}

impl Answer {
    async fn of(req: reqwest::RequestBuilder) -> Answer {
        let resp = req.send().await.unwrap();
        Answer {
            status: resp.status().as_u16(),
            headers: resp.headers().clone(),
            text: resp.text().await.unwrap(),
        }
    }

    /// Asserts the contract's gateway error shape.
    fn error(&self, status: u16, kind: &str) {
        assert_eq!(self.status, status, "{}", self.text);
        let v: Value = serde_json::from_str(&self.text).unwrap();
        let error = v["error"].as_object().unwrap_or_else(|| panic!("{v}"));
        let mut fields: Vec<&str> = error.keys().map(String::as_str).collect();
        fields.sort_unstable();
        assert_eq!(fields, ["message", "request_id", "type"], "{v}");
        assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
        assert_eq!(error["type"], kind, "{v}");
        assert_eq!(
            error["request_id"].as_str(),
            self.headers
                .get("x-request-id")
                .and_then(|h| h.to_str().ok()),
            "{v}"
        );
    }
}

fn chat(gw: &TestGateway) -> reqwest::RequestBuilder {
    gw.client()
        .post(gw.proxy_url("/openai/v1/chat/completions"))
        .json(&json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}))
}

/// 200s and 429s among `answers` (anything else fails the test).
fn tally(answers: &[Answer]) -> (usize, usize) {
    for a in answers {
        assert!(matches!(a.status, 200 | 429), "{}: {}", a.status, a.text);
        if a.status == 429 {
            a.error(429, "rate_limit_exceeded");
        }
    }
    let ok = answers.iter().filter(|a| a.status == 200).count();
    (ok, answers.len() - ok)
}

async fn metric(gw: &TestGateway, name: &str, labels: &[(&str, &str)]) -> f64 {
    gw.metric(name, labels).await.unwrap_or(0.0)
}

// ---------------------------------------------------------------------------
// 13. A key's rpm shared by two gateways

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_gateways_never_exceed_a_keys_rpm_together() {
    const KEY: &str = "sk-redis-shared-rpm-key-0000AAAA";
    let url = redis_url();
    let mut conn = plain(&url).await;
    let prefix = unique_prefix("key_rpm");
    let mock = MockUpstream::start().await;
    // `deny`: a slow Redis shows up as 503s here, never as requests counted
    // locally.
    let r = replicas(&mock, &url, &redis_limits(&prefix, "deny"), &[]).await;
    let id = register(&r.a, KEY, json!({"rpm": 8})).await;
    until_in_pool(&r.b, &id).await;

    let requests = (0..20).map(|i| Answer::of(chat(if i % 2 == 0 { &r.a } else { &r.b })));
    let answers = futures_util::future::join_all(requests).await;
    assert_eq!(tally(&answers), (8, 12));
    assert_eq!(mock.requests_for(KEY), 8, "the mock saw more than the rpm");
    assert_eq!(
        sum_of(&mut conn, &format!("{prefix}:key:{id}:rpm:*")).await,
        8
    );
    // Both replicas served some and refused some.
    for gw in [&r.a, &r.b] {
        let served = metric(
            gw,
            "keyrouter_requests_total",
            &[("provider", "openai"), ("code", "200")],
        )
        .await;
        let refused = metric(
            gw,
            "keyrouter_requests_total",
            &[("provider", "openai"), ("code", "429")],
        )
        .await;
        assert_eq!(served + refused, 10.0);
    }
}

/// What the management API of one replica says the key did in the last
/// minute, when the key's `rpm` makes Redis count its requests.
#[tokio::test]
async fn either_gateway_shows_the_requests_both_served() {
    const KEY: &str = "sk-redis-shared-usage-key-000BBBB";
    let url = redis_url();
    let prefix = unique_prefix("key_usage");
    let mock = MockUpstream::start().await;
    let r = replicas(&mock, &url, &redis_limits(&prefix, "deny"), &[]).await;
    let id = register(&r.a, KEY, json!({"rpm": 100})).await;
    until_in_pool(&r.b, &id).await;

    for gw in [&r.a, &r.a, &r.b] {
        let answer = Answer::of(chat(gw)).await;
        assert_eq!(answer.status, 200, "{}", answer.text);
    }
    for gw in [&r.a, &r.b] {
        let reply = gw.get(&format!("/keys/{id}")).send().await;
        assert_eq!(reply.status, 200, "{}", reply.text);
        let usage = &reply.json()["usage"];
        assert_eq!(usage["requests_last_minute"], 3, "{usage}");
        assert_eq!(usage["in_flight"], 0, "{usage}");
    }
}

// ---------------------------------------------------------------------------
// 14. Redis unreachable

/// A port nothing listens on (right after this returns).
fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    listener.local_addr().unwrap().port()
}

async fn single(mock: &MockUpstream, url: &str, prefix: &str, on_error: &str) -> TestGateway {
    TestGateway::builder()
        .providers(&openai(&mock.url))
        .toml(&redis_limits(prefix, on_error))
        .env("KEYROUTER_REDIS_URL", url)
        .start()
        .await
}

#[tokio::test]
async fn with_redis_unreachable_local_fallback_still_enforces_limits() {
    const KEY: &str = "sk-redis-down-local-key-000BBBB";
    let mock = MockUpstream::start().await;
    let closed = format!("redis://127.0.0.1:{}", free_port());
    let gw = single(&mock, &closed, &unique_prefix("down_local"), "local").await;
    register(&gw, KEY, json!({"rpm": 3})).await;
    let mut answers = Vec::new();
    for _ in 0..5 {
        answers.push(Answer::of(chat(&gw)).await);
    }
    assert_eq!(tally(&answers), (3, 2));
    assert_eq!(mock.requests_for(KEY), 3);
    assert_eq!(metric(&gw, "keyrouter_rate_limit_fallback", &[]).await, 1.0);
}

#[tokio::test]
async fn with_redis_unreachable_deny_refuses_keys_with_limits() {
    const LIMITED: &str = "sk-redis-down-deny-key-0000CCCC";
    const UNLIMITED: &str = "sk-redis-down-deny-free-000DDDD";
    let mock = MockUpstream::start().await;
    let closed = format!("redis://127.0.0.1:{}", free_port());
    let gw = single(&mock, &closed, &unique_prefix("down_deny"), "deny").await;
    let limited = register(&gw, LIMITED, json!({"rpm": 3})).await;
    for _ in 0..3 {
        let a = Answer::of(chat(&gw)).await;
        a.error(503, "internal_error");
        assert!(
            !a.text.contains("redis") && !a.text.contains("Redis"),
            "{}",
            a.text
        );
        assert!(!a.text.contains(&limited), "{}", a.text);
        assert!(a.headers.get("retry-after").is_some());
    }
    assert!(mock.received().is_empty());

    // A key without limits needs no limiter: it serves every request, even
    // next to a key that has limits.
    register(&gw, UNLIMITED, json!({})).await;
    for _ in 0..6 {
        let a = Answer::of(chat(&gw)).await;
        assert_eq!(a.status, 200, "{}", a.text);
    }
    assert_eq!(
        (mock.requests_for(UNLIMITED), mock.requests_for(LIMITED)),
        (6, 0)
    );
}

/// A `redis-server` of the test's own, on a free port, killed on drop.
struct OwnRedis {
    child: Child,
    port: u16,
}

const REDIS_SERVER: &str = "/usr/bin/redis-server";

impl OwnRedis {
    async fn start() -> OwnRedis {
        assert!(
            std::path::Path::new(REDIS_SERVER).exists(),
            "the outage test needs the redis-server binary at {REDIS_SERVER} (apt install redis-server)"
        );
        let port = free_port();
        let child = Command::new(REDIS_SERVER)
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts");
        let server = OwnRedis { child, port };
        let deadline = Instant::now() + Duration::from_secs(5);
        loop {
            let client = redis::Client::open(server.url()).unwrap();
            if let Ok(mut c) = client.get_multiplexed_async_connection().await
                && redis::cmd("PING").query_async::<()>(&mut c).await.is_ok()
            {
                return server;
            }
            assert!(Instant::now() < deadline, "redis-server did not answer");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for OwnRedis {
    fn drop(&mut self) {
        self.kill();
    }
}

#[tokio::test]
async fn a_redis_dying_mid_way_leaves_the_limits_enforced() {
    const KEY: &str = "sk-redis-dies-midway-key-00EEEE";
    let mut redis = OwnRedis::start().await;
    let mut conn = plain(&redis.url()).await;
    let prefix = unique_prefix("dies");
    let mock = MockUpstream::start().await;
    let gw = single(&mock, &redis.url(), &prefix, "local").await;
    let id = register(&gw, KEY, json!({"rpm": 4})).await;
    for _ in 0..2 {
        assert_eq!(Answer::of(chat(&gw)).await.status, 200);
    }
    assert_eq!(
        sum_of(&mut conn, &format!("{prefix}:key:{id}:rpm:*")).await,
        2
    );
    assert_eq!(metric(&gw, "keyrouter_rate_limit_fallback", &[]).await, 0.0);

    redis.kill();
    // Counting goes on locally from what this replica already counted: two
    // more, then refused.
    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(Answer::of(chat(&gw)).await);
    }
    assert_eq!(tally(&answers), (2, 1));
    assert_eq!(mock.requests_for(KEY), 4);
    assert_eq!(metric(&gw, "keyrouter_rate_limit_fallback", &[]).await, 1.0);
}

// ---------------------------------------------------------------------------
// 15. A client's rpm shared by two gateways

const CLIENT_JWT_SECRET: &str = "client-jwt-secret-for-redis-router-0123456789";

#[tokio::test]
async fn two_gateways_share_a_clients_rpm() {
    const KEY: &str = "sk-redis-client-rpm-key-000FFFF";
    let url = redis_url();
    let mut conn = plain(&url).await;
    let prefix = unique_prefix("client_rpm");
    let mock = MockUpstream::start().await;
    let toml = format!(
        "{}[client_auth]\nmode = \"jwt\"\n",
        redis_limits(&prefix, "deny")
    );
    let r = replicas(
        &mock,
        &url,
        &toml,
        &[("KEYROUTER_CLIENT_JWT_SECRET", CLIENT_JWT_SECRET)],
    )
    .await;
    let id = register(&r.a, KEY, json!({})).await;
    until_in_pool(&r.b, &id).await;
    let token = sign_jwt(
        CLIENT_JWT_SECRET,
        &json!({"sub": "shared-app", "rpm": 4, "exp": Utc::now().timestamp() + 600}),
    );
    let mut answers = Vec::new();
    for i in 0..6 {
        let gw = if i % 2 == 0 { &r.a } else { &r.b };
        answers.push(Answer::of(chat(gw).bearer_auth(&token)).await);
    }
    assert_eq!(tally(&answers), (4, 2));
    assert_eq!(mock.received().len(), 4);
    // The last two, one on each replica, were the refused ones.
    assert_eq!((answers[4].status, answers[5].status), (429, 429));
    let client = [("provider", "openai"), ("scope", "client")];
    assert_eq!(
        metric(&r.a, "keyrouter_rate_limited_total", &client).await
            + metric(&r.b, "keyrouter_rate_limited_total", &client).await,
        2.0
    );
    assert_eq!(
        sum_of(&mut conn, &format!("{prefix}:client:shared-app:rpm:*")).await,
        4
    );
    // The token never went upstream.
    for req in mock.received() {
        assert_eq!(
            req.header("authorization"),
            Some(format!("Bearer {KEY}").as_str())
        );
    }
}
