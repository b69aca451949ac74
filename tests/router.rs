//! The key router through the front door, with the local limiter: what
//! providers say about keys (429, 401, 402, `insufficient_quota`, 5xx,
//! resets, timeouts) moves keys between states and sends requests to other
//! keys; per-key and client limits; recovery by cooldown and by probe; live
//! usage in the management API; an operator's revoke beating the router.
//!
//! The mock upstream is scripted per key (`MockUpstream::script`): the
//! behaviour follows the credential keyrouter injects, so each test proves
//! which key served what by looking at the mock. Cooldowns and probe
//! intervals are one second, and every wait polls with a deadline.

mod common;

use chrono::{DateTime, Utc};
use common::answer::Answer;
use common::mock_upstream::{Behaviour, MockUpstream, key_fragment};
use common::{TestGateway, series_value, sign_jwt};
use keyrouter::audit::EventKind;
use keyrouter::health::Health;
use keyrouter::keys::{KeyEvent, KeyState};
use serde_json::{Value, json};
use std::time::{Duration, Instant};

/// Generous bound for a key transition written in the background.
const TRANSITION: Duration = Duration::from_secs(3);

/// The OpenAI provider at `url`, default, served under `/openai`.
fn openai(url: &str, extra: &str) -> String {
    format!(
        "[[providers]]\nid = \"openai\"\nkind = \"openai\"\nbase_url = \"{url}\"\nroute_prefix = \"/openai\"\ndefault = true\n{extra}\n"
    )
}

/// Short cooldowns so recoveries happen within a test's time.
const FAST_COOLDOWN: &str = "[rate_limit]\ncooldown_base = \"1s\"\ncooldown_max = \"4s\"\n";

/// A gateway in front of `mock` (OpenAI provider with `provider_extra`),
/// with `extra_toml` merged in and, unless it has a `[rate_limit]` of its
/// own, one-second cooldowns.
async fn gateway(mock: &MockUpstream, provider_extra: &str, extra_toml: &str) -> TestGateway {
    let mut builder = TestGateway::builder().providers(&openai(&mock.url, provider_extra));
    if !extra_toml.contains("[rate_limit]") {
        builder = builder.toml(FAST_COOLDOWN);
    }
    builder.toml(extra_toml).start().await
}

/// Registers `material` for OpenAI with `limits` and returns the key id.
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

fn chat_body() -> Value {
    json!({"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
}

/// A chat completion through the proxy.
async fn chat(gw: &TestGateway) -> Answer {
    send(
        gw.client()
            .post(gw.proxy_url("/openai/v1/chat/completions"))
            .json(&chat_body()),
    )
    .await
}

async fn send(req: reqwest::RequestBuilder) -> Answer {
    Answer::of(req.send().await.unwrap()).await
}

async fn metric(gw: &TestGateway, name: &str, labels: &[(&str, &str)]) -> f64 {
    gw.metric(name, labels).await.unwrap_or(0.0)
}

/// Waits (up to 5 s) until the series reaches at least `min`.
async fn metric_at_least(gw: &TestGateway, name: &str, labels: &[(&str, &str)], min: f64) -> f64 {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let value = metric(gw, name, labels).await;
        if value >= min {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} is {value}, expected at least {min}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Sends chat requests until the mock has seen `key` once, asserting
/// every client answer is a 200; at most `max` requests.
async fn until_key_used(
    gw: &TestGateway,
    mock: &MockUpstream,
    key: &str,
    max: usize,
) -> Vec<Answer> {
    let mut answers = Vec::new();
    for _ in 0..max {
        let a = chat(gw).await;
        assert_eq!(a.status, 200, "{}", a.text);
        answers.push(a);
        if mock.requests_for(key) > 0 {
            return answers;
        }
    }
    panic!("{key} was never chosen in {max} requests");
}

/// Registers `failing` (each answered as scripted) and then `good`, and
/// sends requests (each served, by `good` when need be) until every
/// failing key was tried. The failing keys' ids, in order.
async fn failing_keys_tried<const N: usize>(
    gw: &TestGateway,
    mock: &MockUpstream,
    failing: [(&str, Behaviour); N],
    good: &str,
) -> [String; N] {
    let mut ids = Vec::new();
    for (key, behaviour) in &failing {
        ids.push(register(gw, key, json!({})).await);
        mock.script(key, behaviour.clone());
    }
    register(gw, good, json!({})).await;
    until_keys_used(gw, mock, &failing.map(|(key, _)| key)).await;
    ids.try_into().unwrap()
}

/// Sends chat requests, each answered 200, until the mock has seen every
/// one of `keys`; at most ten.
async fn until_keys_used(gw: &TestGateway, mock: &MockUpstream, keys: &[&str]) {
    for _ in 0..10 {
        let a = chat(gw).await;
        assert_eq!(a.status, 200, "{}", a.text);
        if keys.iter().all(|k| mock.requests_for(k) > 0) {
            return;
        }
    }
    panic!("not all of {keys:?} were chosen in 10 requests");
}

/// The key's view through the management API.
async fn key_view(gw: &TestGateway, id: &str) -> Value {
    let reply = gw.get(&format!("/keys/{id}")).send().await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    reply.json()
}

/// The `key_state_changed` events of `id`, oldest first.
async fn transitions(gw: &TestGateway, id: &str) -> Vec<(String, String, String, String)> {
    gw.events_for(id)
        .await
        .into_iter()
        .filter(|e| e.event == EventKind::KeyStateChanged)
        .map(|e| {
            (
                e.actor.render(),
                e.from.unwrap().as_str().to_owned(),
                e.to.unwrap().as_str().to_owned(),
                e.reason.unwrap_or_default(),
            )
        })
        .collect()
}

fn router_event(from: &str, to: &str, reason: &str) -> (String, String, String, String) {
    ("router".into(), from.into(), to.into(), reason.into())
}

// ---------------------------------------------------------------------------
// 1. Rate limit: cooldown and recovery

const LIMITED: &str = "sk-router-limited-key-000000AAAA";
const HEALTHY: &str = "sk-router-healthy-key-000000BBBB";

#[tokio::test]
async fn a_rate_limited_key_cools_down_and_comes_back_after_its_cooldown() {
    let mock = MockUpstream::start().await;
    // A base longer than the provider's Retry-After, to tell them apart.
    let gw = gateway(
        &mock,
        "",
        "[rate_limit]\ncooldown_base = \"3s\"\ncooldown_max = \"4s\"",
    )
    .await;
    let limited = register(&gw, LIMITED, json!({})).await;
    let healthy = register(&gw, HEALTHY, json!({})).await;
    mock.script(
        LIMITED,
        Behaviour::Status429 {
            retry_after: Some(1),
        },
    );
    let retries = [("provider", "openai"), ("reason", "key_rate_limited")];
    assert_eq!(
        metric(&gw, "keyrouter_upstream_retries_total", &retries).await,
        0.0
    );

    let answers = until_key_used(&gw, &mock, LIMITED, 6).await;
    let rate_limited_at = Utc::now();
    // The request the limited key failed went on to the healthy one.
    assert_eq!(mock.last().credential().as_deref(), Some(HEALTHY));
    for a in &answers {
        assert!(!a.text.contains("Rate limit reached"), "{}", a.text);
        assert!(a.header("retry-after").is_none());
    }

    gw.wait_for_key_state(&limited, KeyState::CoolingDown, TRANSITION)
        .await;
    let view = key_view(&gw, &limited).await;
    assert_eq!(view["state"], "cooling_down", "{view}");
    assert_eq!(view["state_reason"], "upstream_rate_limited", "{view}");
    let until: DateTime<Utc> = view["cooldown_until"]
        .as_str()
        .unwrap_or_else(|| panic!("no cooldown_until: {view}"))
        .parse()
        .unwrap();
    // The provider's Retry-After (1 s), not the configured base (3 s);
    // its end rounded up to a whole second.
    let rest = until - rate_limited_at;
    assert!(
        rest > chrono::Duration::zero() && rest <= chrono::Duration::seconds(2),
        "cooldown_until {until} for a Retry-After of 1 s at {rate_limited_at}"
    );
    assert_eq!(key_view(&gw, &healthy).await["state"], "active");

    // While it rests, the limited key is never chosen.
    for _ in 0..4 {
        assert_eq!(chat(&gw).await.status, 200);
    }
    assert_eq!(mock.requests_for(LIMITED), 1);

    // Back to active within a few seconds, recorded by the router.
    let started = Instant::now();
    gw.wait_for_key_state(&limited, KeyState::Active, Duration::from_secs(5))
        .await;
    assert!(
        started.elapsed() < Duration::from_millis(4500),
        "{:?}",
        started.elapsed()
    );
    let view = key_view(&gw, &limited).await;
    assert_eq!(view["state"], "active", "{view}");
    assert!(view["cooldown_until"].is_null(), "{view}");
    assert_eq!(
        transitions(&gw, &limited).await,
        [
            router_event("active", "cooling_down", "upstream_rate_limited"),
            router_event("cooling_down", "active", "cooldown_elapsed"),
        ]
    );
    // The same events through the management API.
    let audit = gw
        .get(&format!(
            "/audit?resource={limited}&event=key_state_changed"
        ))
        .send()
        .await
        .json();
    let events = audit["events"].as_array().unwrap();
    assert_eq!(events.len(), 2, "{audit}");
    assert_eq!(
        (
            &events[1]["actor"],
            &events[1]["from"],
            &events[1]["to"],
            &events[1]["reason"]
        ),
        (
            &json!("router"),
            &json!("active"),
            &json!("cooling_down"),
            &json!("upstream_rate_limited")
        )
    );
    assert_eq!(
        (&events[0]["actor"], &events[0]["from"], &events[0]["to"]),
        (&json!("router"), &json!("cooling_down"), &json!("active"))
    );

    let transitions_metric = |from, to| [("provider", "openai"), ("from", from), ("to", to)];
    assert_eq!(
        metric(
            &gw,
            "keyrouter_key_transitions_total",
            &transitions_metric("active", "cooling_down")
        )
        .await,
        1.0
    );
    assert_eq!(
        metric(
            &gw,
            "keyrouter_key_transitions_total",
            &transitions_metric("cooling_down", "active")
        )
        .await,
        1.0
    );
    assert!(metric(&gw, "keyrouter_upstream_retries_total", &retries).await >= 1.0);

    // And it serves again once the provider accepts it.
    mock.script(LIMITED, Behaviour::Ok);
    until_key_used_again(&gw, &mock, LIMITED, 2).await;
}

/// Sends requests until the mock has seen `key` `count` times in all.
async fn until_key_used_again(gw: &TestGateway, mock: &MockUpstream, key: &str, count: usize) {
    for _ in 0..10 {
        assert_eq!(chat(gw).await.status, 200);
        if mock.requests_for(key) >= count {
            return;
        }
    }
    panic!("{key} was not chosen again");
}

// ---------------------------------------------------------------------------
// 2. 401: invalid, and the provider's message never reaches the client

/// Strings of a 401 for `key` that must never reach a client.
fn traces_of_401(key: &str) -> Vec<String> {
    vec![
        "Incorrect API key".into(),
        "platform.openai.com".into(),
        "invalid_api_key".into(),
        "sk-".into(),
        key_fragment(key),
        key.into(),
        key[..8].into(),
        key[key.len() - 4..].into(),
    ]
}

#[tokio::test]
async fn a_rejected_key_becomes_invalid_and_its_provider_message_never_reaches_the_client() {
    const BAD: &str = "sk-rejected-router-key-0000QXWZ";
    const GOOD: &str = "sk-accepted-router-key-0000JKLM";
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "", "").await;
    let bad = register(&gw, BAD, json!({})).await;
    register(&gw, GOOD, json!({})).await;
    mock.script(BAD, Behaviour::Unauthorized);

    let answers = until_key_used(&gw, &mock, BAD, 6).await;
    assert_eq!(mock.last().credential().as_deref(), Some(GOOD));
    for a in &answers {
        for trace in traces_of_401(BAD) {
            assert!(
                !a.text.contains(&trace),
                "{trace} reached the client: {}",
                a.text
            );
        }
    }
    let record = gw
        .wait_for_key_state(&bad, KeyState::Invalid, TRANSITION)
        .await;
    assert_eq!(
        record.state_reason.as_deref(),
        Some("upstream_unauthorized")
    );
    assert_eq!(
        transitions(&gw, &bad).await,
        [router_event("active", "invalid", "upstream_unauthorized")]
    );
    // An invalid key is not chosen again.
    for _ in 0..4 {
        assert_eq!(chat(&gw).await.status, 200);
    }
    assert_eq!(mock.requests_for(BAD), 1);

    // With only a rejected key, the client hears that no key is available
    // and nothing of what the provider said.
    const ONLY: &str = "sk-lonely-rejected-key-000RSTU";
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "", "").await;
    let only = register(&gw, ONLY, json!({})).await;
    mock.script(ONLY, Behaviour::Unauthorized);
    for _ in 0..2 {
        let a = chat(&gw).await;
        a.error(503, "no_available_key");
        for trace in traces_of_401(ONLY) {
            assert!(
                !a.text.contains(&trace),
                "{trace} reached the client: {}",
                a.text
            );
            for (name, value) in &a.headers {
                let value = String::from_utf8_lossy(value.as_bytes());
                assert!(!value.contains(&trace), "{trace} in header {name}: {value}");
            }
        }
    }
    assert_eq!(mock.requests_for(ONLY), 1, "the invalid key was used again");
    gw.wait_for_key_state(&only, KeyState::Invalid, TRANSITION)
        .await;
}

// ---------------------------------------------------------------------------
// 3. Quota: exhausted

#[tokio::test]
async fn insufficient_quota_and_402_exhaust_the_key() {
    const QUOTA: &str = "sk-router-quota-key-00000000CCCC";
    const BILLING: &str = "sk-router-billing-key-000000DDDD";
    const GOOD: &str = "sk-router-good-key-000000000EEEE";
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "", "").await;
    let quota = register(&gw, QUOTA, json!({})).await;
    let billing = register(&gw, BILLING, json!({})).await;
    let good = register(&gw, GOOD, json!({})).await;
    mock.script(QUOTA, Behaviour::InsufficientQuota);
    mock.script(BILLING, Behaviour::PaymentRequired);

    for _ in 0..10 {
        let a = chat(&gw).await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert!(!a.text.contains("quota"), "{}", a.text);
        assert!(!a.text.contains("credit balance"), "{}", a.text);
        if mock.requests_for(QUOTA) > 0 && mock.requests_for(BILLING) > 0 {
            break;
        }
    }
    for id in [&quota, &billing] {
        let record = gw
            .wait_for_key_state(id, KeyState::Exhausted, TRANSITION)
            .await;
        assert_eq!(
            record.state_reason.as_deref(),
            Some("upstream_quota_exhausted")
        );
        assert_eq!(
            transitions(&gw, id).await,
            [router_event(
                "active",
                "exhausted",
                "upstream_quota_exhausted"
            )]
        );
        assert_eq!(key_view(&gw, id).await["state"], "exhausted");
    }
    assert_eq!(key_view(&gw, &good).await["state"], "active");
    // An insufficient_quota 429 is not a cooldown.
    assert_eq!(
        metric(
            &gw,
            "keyrouter_key_transitions_total",
            &[("provider", "openai"), ("to", "cooling_down")]
        )
        .await,
        0.0
    );
    assert_eq!(
        metric(
            &gw,
            "keyrouter_key_transitions_total",
            &[
                ("provider", "openai"),
                ("from", "active"),
                ("to", "exhausted")
            ]
        )
        .await,
        2.0
    );
    for _ in 0..3 {
        assert_eq!(chat(&gw).await.status, 200);
    }
    assert_eq!(
        (mock.requests_for(QUOTA), mock.requests_for(BILLING)),
        (1, 1)
    );
}

// ---------------------------------------------------------------------------
// 4. Every key limited: 429 with Retry-After

#[tokio::test]
async fn when_every_key_is_rate_limited_by_the_provider_the_client_gets_429_with_retry_after() {
    const A: &str = "sk-router-all-limited-a-0000FFFF";
    const B: &str = "sk-router-all-limited-b-0000GGGG";
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "", "").await;
    let a = register(&gw, A, json!({})).await;
    let b = register(&gw, B, json!({})).await;
    for key in [A, B] {
        mock.script(
            key,
            Behaviour::Status429 {
                retry_after: Some(3),
            },
        );
    }
    let all_keys = [("provider", "openai"), ("scope", "all_keys")];

    let first = chat(&gw).await;
    first.error(429, "rate_limit_exceeded");
    let wait = first.retry_after();
    assert!(
        (1..=4).contains(&wait),
        "Retry-After {wait} for a provider's 3"
    );
    assert!(!first.text.contains("Rate limit reached"), "{}", first.text);
    assert_eq!((mock.requests_for(A), mock.requests_for(B)), (1, 1));

    // While both rest, the client is told when to come back, and the
    // provider is not asked.
    let second = chat(&gw).await;
    second.error(429, "rate_limit_exceeded");
    let wait = second.retry_after();
    assert!((1..=4).contains(&wait), "Retry-After {wait}");
    assert_eq!(mock.received().len(), 2);
    metric_at_least(&gw, "keyrouter_rate_limited_total", &all_keys, 1.0).await;
    for id in [&a, &b] {
        gw.wait_for_key_state(id, KeyState::CoolingDown, TRANSITION)
            .await;
    }
}

/// A client that waits the `Retry-After` it was given finds the key
/// serving again, without waiting for the recovery to be stored and read
/// back. Without a provider `Retry-After`, the client is told the key's
/// own cooldown, not a second.
#[tokio::test]
async fn a_client_waiting_its_retry_after_is_served() {
    const KEY: &str = "sk-router-waits-000000000WWWW";
    let mock = MockUpstream::start().await;
    let gw = gateway(
        &mock,
        "retry_budget = 0",
        "[rate_limit]\ncooldown_base = \"2s\"\ncooldown_max = \"4s\"",
    )
    .await;
    register(&gw, KEY, json!({})).await;
    for retry_after in [Some(1), None] {
        mock.script(KEY, Behaviour::Status429 { retry_after });
        let refused = chat(&gw).await;
        refused.error(429, "rate_limit_exceeded");
        let wait = refused.retry_after();
        match retry_after {
            Some(provider) => assert!((provider..=provider + 1).contains(&wait), "{wait}"),
            // The configured base: 2 s, its end rounded up to a second.
            None => assert!((2..=3).contains(&wait), "Retry-After {wait}"),
        }
        mock.script(KEY, Behaviour::Ok);
        tokio::time::sleep(Duration::from_secs(wait)).await;
        let served = chat(&gw).await;
        assert_eq!(served.status, 200, "after {wait} s: {}", served.text);
        // Far from any reload: the streak of 429s starts over.
        tokio::time::sleep(Duration::from_secs(4)).await;
    }
}

/// When the retry budget runs out on keys the provider refused, the client
/// hears what the provider's keys are now: none left is a 503 (as for a
/// request that found none), only resting ones a 429 until the first rest
/// ends, never a 502 that reads as the provider failing.
#[tokio::test]
async fn refusals_that_use_up_the_keys_answer_as_the_pool_now_is() {
    const REJECTED: &str = "sk-router-gone-rejected-00AAAA";
    const SPENT: &str = "sk-router-gone-spent-00000BBBB";
    const RESTING: &str = "sk-router-gone-resting-000CCCC";
    let mock = MockUpstream::start().await;
    // A budget that runs out exactly as the last key is refused.
    let gw = gateway(&mock, "retry_budget = 1", "").await;
    register(&gw, REJECTED, json!({})).await;
    register(&gw, SPENT, json!({})).await;
    mock.script(REJECTED, Behaviour::Unauthorized);
    mock.script(SPENT, Behaviour::PaymentRequired);
    chat(&gw).await.error(503, "no_available_key");
    assert_eq!(mock.received().len(), 2);

    // A key that rests for 3 s is all there is: 429 until its rest ends.
    register(&gw, RESTING, json!({})).await;
    mock.script(
        RESTING,
        Behaviour::Status429 {
            retry_after: Some(3),
        },
    );
    let a = chat(&gw).await;
    a.error(429, "rate_limit_exceeded");
    assert!(
        (2..=4).contains(&a.retry_after()),
        "Retry-After {}",
        a.retry_after()
    );
}

/// `keyrouter_upstream_retries_total` counts the retries sent, not the
/// ones the budget would have allowed.
#[tokio::test]
async fn only_retries_that_happen_are_counted() {
    const ONLY: &str = "sk-router-lone-failing-000DDDD";
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "retry_budget = 2", "").await;
    register(&gw, ONLY, json!({})).await;
    mock.script(ONLY, Behaviour::ServerError);
    chat(&gw).await.error(502, "upstream_error");
    assert_eq!(mock.received().len(), 1);
    metric_at_least(
        &gw,
        "keyrouter_requests_total",
        &[("provider", "openai"), ("code", "502")],
        1.0,
    )
    .await;
    let retries = [("provider", "openai"), ("reason", "upstream_5xx")];
    assert_eq!(
        metric(&gw, "keyrouter_upstream_retries_total", &retries).await,
        0.0
    );
}

#[tokio::test]
async fn when_every_key_is_at_its_rpm_the_client_gets_429_with_retry_after() {
    const A: &str = "sk-router-rpm-full-a-000000HHHH";
    const B: &str = "sk-router-rpm-full-b-000000IIII";
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "", "").await;
    let rpm: u32 = 3;
    for key in [A, B] {
        register(&gw, key, json!({"rpm": rpm})).await;
    }
    let all_keys = [("provider", "openai"), ("scope", "all_keys")];
    let key_scope = [("provider", "openai"), ("scope", "key")];
    assert_eq!(
        metric(&gw, "keyrouter_rate_limited_total", &all_keys).await,
        0.0
    );

    for _ in 0..2 * rpm {
        let a = chat(&gw).await;
        assert_eq!(a.status, 200, "{}", a.text);
    }
    assert_eq!((mock.requests_for(A), mock.requests_for(B)), (3, 3));
    for _ in 0..2 {
        let a = chat(&gw).await;
        a.error(429, "rate_limit_exceeded");
        // The limiter's window is a minute: the wait is until the sliding
        // estimate drops below the rpm, between 60/rpm seconds and one
        // minute plus 60/rpm (see src/limits/mod.rs), never "1" as for a
        // concurrency refusal.
        let wait = a.retry_after();
        assert!(
            (60 / u64::from(rpm)..=60 + 60 / u64::from(rpm)).contains(&wait),
            "Retry-After {wait} for an rpm of {rpm}"
        );
    }
    assert_eq!(
        mock.received().len(),
        6,
        "a request beyond the rpm reached the provider"
    );
    assert!(metric(&gw, "keyrouter_rate_limited_total", &all_keys).await >= 2.0);
    assert!(metric(&gw, "keyrouter_rate_limited_total", &key_scope).await >= 2.0);
}

// ---------------------------------------------------------------------------
// 5. Per-key limits

/// Fires `n` chat requests at once and returns their answers.
async fn concurrently(gw: &TestGateway, n: usize, body: Value) -> Vec<Answer> {
    let requests = (0..n).map(|_| {
        send(
            gw.client()
                .post(gw.proxy_url("/openai/v1/chat/completions"))
                .json(&body),
        )
    });
    futures_util::future::join_all(requests).await
}

fn statuses(answers: &[Answer]) -> (usize, usize) {
    for a in answers {
        assert!(matches!(a.status, 200 | 429), "{}: {}", a.status, a.text);
        if a.status == 429 {
            a.error(429, "rate_limit_exceeded");
        }
    }
    let ok = answers.iter().filter(|a| a.status == 200).count();
    (ok, answers.len() - ok)
}

#[tokio::test]
async fn rpm_is_enforced_under_concurrent_requests() {
    const KEY: &str = "sk-router-rpm-five-00000000JJJJ";
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "", "").await;
    let id = register(&gw, KEY, json!({"rpm": 5})).await;
    let answers = concurrently(&gw, 8, chat_body()).await;
    assert_eq!(statuses(&answers), (5, 3));
    assert_eq!(mock.requests_for(KEY), 5);
    assert_eq!(key_view(&gw, &id).await["usage"]["requests_last_minute"], 5);
}

/// A key that rests after a provider 429 comes back with the requests it
/// made this minute still counted: its rpm is not reset by the rest, and
/// its usage is shown while it rests.
#[tokio::test]
async fn a_key_back_from_a_cooldown_keeps_its_counts() {
    const KEY: &str = "sk-router-rpm-rests-000000RRRR";
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "retry_budget = 0", "").await;
    let id = register(&gw, KEY, json!({"rpm": 3})).await;
    for _ in 0..2 {
        assert_eq!(chat(&gw).await.status, 200);
    }
    mock.script(
        KEY,
        Behaviour::Status429 {
            retry_after: Some(1),
        },
    );
    chat(&gw).await.error(429, "rate_limit_exceeded");
    gw.wait_for_key_state(&id, KeyState::CoolingDown, TRANSITION)
        .await;
    let view = key_view(&gw, &id).await;
    assert_eq!(view["usage"]["requests_last_minute"], 3);
    mock.script(KEY, Behaviour::Ok);
    // Just after the cooldown's end: the key is back (and its ended
    // cooldown may still be listed until its recovery is stored).
    let until: DateTime<Utc> = view["cooldown_until"].as_str().unwrap().parse().unwrap();
    let back = (until - Utc::now()).to_std().unwrap_or_default() + Duration::from_millis(100);
    tokio::time::sleep(back).await;
    // Three requests reached the provider this minute: the key is at its
    // rpm, back or not (a wait of a third of a minute, not a cooldown's).
    let a = chat(&gw).await;
    a.error(429, "rate_limit_exceeded");
    assert!(a.retry_after() >= 20, "Retry-After {}", a.retry_after());
    assert_eq!(mock.requests_for(KEY), 3);
    gw.wait_for_key_state(&id, KeyState::Active, Duration::from_secs(5))
        .await;
}

#[tokio::test]
async fn tpm_is_enforced_and_corrected_by_the_reported_usage() {
    const KEY: &str = "sk-router-tpm-small-0000000KKKK";
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "", "").await;
    let id = register(&gw, KEY, json!({"tpm": 1000})).await;
    // Each request reserves its max_tokens (700) plus its input until the
    // provider reports usage: two at once do not fit in 1000.
    let big = json!({"model": "gpt-4o", "max_tokens": 700, "messages": [{"role": "user", "content": "hi"}]});
    mock.script(KEY, Behaviour::Slow(Duration::from_millis(800)));
    let first = {
        let req = gw
            .client()
            .post(gw.proxy_url("/openai/v1/chat/completions"))
            .json(&big);
        tokio::spawn(async move { Answer::of(req.send().await.unwrap()).await })
    };
    while mock.requests_for(KEY) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reserved = key_view(&gw, &id).await["usage"]["tokens_last_minute"]
        .as_u64()
        .unwrap();
    assert!(reserved >= 700, "reservation {reserved}");
    let refused = send(
        gw.client()
            .post(gw.proxy_url("/openai/v1/chat/completions"))
            .json(&big),
    )
    .await;
    refused.error(429, "rate_limit_exceeded");
    assert_eq!(mock.requests_for(KEY), 1);

    // The provider reports 29 tokens: the reservation shrinks to that.
    assert_eq!(first.await.unwrap().status, 200);
    let used = key_view(&gw, &id).await["usage"]["tokens_last_minute"]
        .as_u64()
        .unwrap();
    assert!(
        (1..=29).contains(&used),
        "tokens_last_minute {used} after a 29-token answer"
    );

    // Room again for more requests of the same size, one after another.
    mock.script(KEY, Behaviour::Ok);
    for n in 2..=4 {
        let a = send(
            gw.client()
                .post(gw.proxy_url("/openai/v1/chat/completions"))
                .json(&big),
        )
        .await;
        assert_eq!(a.status, 200, "request {n}: {}", a.text);
    }
    assert_eq!(mock.requests_for(KEY), 4);
    let used = key_view(&gw, &id).await["usage"]["tokens_last_minute"]
        .as_u64()
        .unwrap();
    assert!((1..=4 * 29).contains(&used), "tokens_last_minute {used}");
}

#[tokio::test]
async fn max_concurrent_is_enforced_per_key() {
    const KEY: &str = "sk-router-concurrent-two-000LLLL";
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "", "").await;
    register(&gw, KEY, json!({"max_concurrent": 2})).await;
    mock.script(KEY, Behaviour::Slow(Duration::from_millis(700)));
    let answers = concurrently(&gw, 4, chat_body()).await;
    assert_eq!(statuses(&answers), (2, 2));
    assert_eq!(mock.requests_for(KEY), 2);
    for a in answers.iter().filter(|a| a.status == 429) {
        assert_eq!(
            a.retry_after(),
            1,
            "a concurrency slot may free at any moment"
        );
    }
    // Slots free when the responses end.
    assert_eq!(chat(&gw).await.status, 200);

    // Two keys of one slot each: two requests at once go one to each.
    const ONE: &str = "sk-router-single-slot-a-00MMMM";
    const TWO: &str = "sk-router-single-slot-b-00NNNN";
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "", "").await;
    for key in [ONE, TWO] {
        register(&gw, key, json!({"max_concurrent": 1})).await;
        mock.script(key, Behaviour::Slow(Duration::from_millis(700)));
    }
    let answers = concurrently(&gw, 2, chat_body()).await;
    assert_eq!(statuses(&answers), (2, 0));
    assert_eq!((mock.requests_for(ONE), mock.requests_for(TWO)), (1, 1));
}

// ---------------------------------------------------------------------------
// 6. Retry budget, resets

#[tokio::test]
async fn the_retry_budget_bounds_the_attempts_and_a_reset_is_retried_on_another_key() {
    const KEYS: [&str; 3] = [
        "sk-router-budget-a-0000000OOOO",
        "sk-router-budget-b-0000000PPPP",
        "sk-router-budget-c-0000000QQQQ",
    ];
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "retry_budget = 1", "").await;
    let mut ids = Vec::new();
    for key in KEYS {
        ids.push(register(&gw, key, json!({})).await);
        mock.script(key, Behaviour::ServerError);
    }
    let a = chat(&gw).await;
    a.error(502, "upstream_error");
    assert!(!a.text.contains("processing your request"), "{}", a.text);
    assert_eq!(
        mock.received().len(),
        2,
        "one attempt plus a retry budget of 1"
    );
    let used: std::collections::HashSet<_> =
        mock.received().iter().map(|r| r.credential()).collect();
    assert_eq!(used.len(), 2, "the retry went to another key");
    let retries_5xx = [("provider", "openai"), ("reason", "upstream_5xx")];
    assert_eq!(
        metric(&gw, "keyrouter_upstream_retries_total", &retries_5xx).await,
        1.0
    );
    metric_at_least(
        &gw,
        "keyrouter_requests_total",
        &[("provider", "openai"), ("code", "502")],
        1.0,
    )
    .await;

    // A connection the provider resets: the request goes to another key.
    mock.script(KEYS[0], Behaviour::Reset);
    for key in &KEYS[1..] {
        mock.script(key, Behaviour::Ok);
    }
    mock.clear();
    let before = mock.requests_for(KEYS[0]);
    for _ in 0..6 {
        let a = chat(&gw).await;
        assert_eq!(a.status, 200, "{}", a.text);
        if mock.requests_for(KEYS[0]) > before {
            break;
        }
    }
    assert_eq!(
        mock.requests_for(KEYS[0]),
        before + 1,
        "the resetting key was never chosen"
    );
    let last = mock.last();
    assert_ne!(last.credential().as_deref(), Some(KEYS[0]));
    let unreachable = [("provider", "openai"), ("reason", "upstream_unreachable")];
    assert!(metric(&gw, "keyrouter_upstream_retries_total", &unreachable).await >= 1.0);
    // Neither 5xx nor resets touch the keys' states.
    for id in &ids {
        assert_eq!(gw.key_record(id).await.status.state(), KeyState::Active);
    }
}

// ---------------------------------------------------------------------------
// 7. No retry once a stream started

#[tokio::test]
async fn a_stream_broken_off_midway_is_not_retried_and_counts_as_an_error() {
    const A: &str = "sk-router-stream-a-000000RRRR";
    const B: &str = "sk-router-stream-b-000000SSSS";
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "", "").await;
    for key in [A, B] {
        register(&gw, key, json!({})).await;
    }
    let resp = gw
        .client()
        .post(gw.proxy_url("/openai/v1/chat/completions"))
        .header("x-mock-truncate", "1")
        .json(&json!({"model": "gpt-4o", "stream": true, "messages": [{"role": "user", "content": "hi"}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut resp = resp;
    let mut text = String::new();
    let outcome = loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => text.push_str(&String::from_utf8_lossy(&chunk)),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    assert!(outcome.is_err(), "the client saw a complete stream: {text}");
    assert!(text.contains("data:"), "some events came through: {text}");
    assert!(!text.contains("[DONE]"));
    // Give a retry, if there were one, time to happen.
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(mock.received().len(), 1, "the broken stream was retried");
    let errors = [("provider", "openai"), ("code", "502")];
    metric_at_least(&gw, "keyrouter_requests_total", &errors, 1.0).await;
    assert_eq!(
        metric(
            &gw,
            "keyrouter_requests_total",
            &[("provider", "openai"), ("code", "200")]
        )
        .await,
        0.0,
        "a broken stream counted as a success"
    );
}

// ---------------------------------------------------------------------------
// 8. Provider trouble never changes a key's state

#[tokio::test]
async fn provider_errors_and_timeouts_never_change_a_keys_state() {
    const A: &str = "sk-router-trouble-a-00000TTTT";
    const B: &str = "sk-router-trouble-b-00000UUUU";
    let mock = MockUpstream::start().await;
    let gw = gateway(
        &mock,
        "retry_budget = 1",
        "[server]\nupstream_first_byte_timeout = \"400ms\"",
    )
    .await;
    let ids = [
        register(&gw, A, json!({})).await,
        register(&gw, B, json!({})).await,
    ];
    let cases = [
        (Behaviour::ServerError, 502, "upstream_error"),
        (
            Behaviour::Slow(Duration::from_millis(1500)),
            504,
            "upstream_timeout",
        ),
        (Behaviour::Reset, 502, "upstream_error"),
    ];
    for (behaviour, status, kind) in cases {
        for key in [A, B] {
            mock.script(key, behaviour.clone());
        }
        for _ in 0..2 {
            chat(&gw).await.error(status, kind);
        }
    }
    assert_eq!(
        mock.received().len(),
        12,
        "every attempt reached the provider"
    );
    // Time for a background transition, were one started.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in &ids {
        assert_eq!(gw.key_record(id).await.status.state(), KeyState::Active);
        assert_eq!(transitions(&gw, id).await, []);
        assert_eq!(key_view(&gw, id).await["state"], "active");
    }
    let text = gw.metrics().await;
    let counted: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("keyrouter_key_transitions_total{") && !l.ends_with(" 0"))
        .collect();
    assert_eq!(counted, [] as [&str; 0], "no transition counted");
    for key in [A, B] {
        mock.script(key, Behaviour::Ok);
    }
    assert_eq!(chat(&gw).await.status, 200);
}

// ---------------------------------------------------------------------------
// 9. Client tokens

const CLIENT_JWT_SECRET: &str = "client-jwt-secret-for-router-tests-0123456789";

fn client_token(secret: &str, claims: Value) -> String {
    let mut claims = claims;
    if claims.get("exp").is_none() {
        claims["exp"] = json!(Utc::now().timestamp() + 600);
    }
    sign_jwt(secret, &claims)
}

#[tokio::test]
async fn client_tokens_are_checked_limited_and_never_forwarded() {
    const KEY: &str = "sk-router-client-jwt-key-00VVVV";
    let mock = MockUpstream::start().await;
    let gw = TestGateway::builder()
        .providers(&format!(
            "{}[[providers]]\nid = \"anthropic\"\nkind = \"anthropic\"\nbase_url = \"{}\"\nroute_prefix = \"/anthropic\"\n",
            openai(&mock.url, ""),
            mock.url
        ))
        .toml("[client_auth]\nmode = \"jwt\"")
        .env("KEYROUTER_CLIENT_JWT_SECRET", CLIENT_JWT_SECRET)
        .start()
        .await;
    register(&gw, KEY, json!({})).await;
    let with_token = |token: &str| {
        gw.client()
            .post(gw.proxy_url("/openai/v1/chat/completions"))
            .bearer_auth(token)
            .json(&chat_body())
    };

    // Missing, expired, wrongly signed: 401.
    chat(&gw).await.error(401, "unauthorized");
    let expired = client_token(
        CLIENT_JWT_SECRET,
        json!({"sub": "app-1", "exp": Utc::now().timestamp() - 120}),
    );
    send(with_token(&expired)).await.error(401, "unauthorized");
    let forged = client_token(
        "another-secret-another-secret-0123456789",
        json!({"sub": "app-1"}),
    );
    send(with_token(&forged)).await.error(401, "unauthorized");
    assert!(mock.received().is_empty());

    // A token for another provider only: 403.
    let anthropic_only = client_token(
        CLIENT_JWT_SECRET,
        json!({"sub": "app-2", "providers": ["anthropic"]}),
    );
    send(with_token(&anthropic_only))
        .await
        .error(403, "forbidden");
    assert!(mock.received().is_empty());

    // A client with rpm 3: the fourth request in the minute is refused.
    let limited = client_token(
        CLIENT_JWT_SECRET,
        json!({"sub": "app-3", "providers": ["openai"], "rpm": 3}),
    );
    for _ in 0..3 {
        let a = send(with_token(&limited)).await;
        assert_eq!(a.status, 200, "{}", a.text);
    }
    let fourth = send(with_token(&limited)).await;
    fourth.error(429, "rate_limit_exceeded");
    let wait = fourth.retry_after();
    assert!(
        (60 / 3..=60 + 60 / 3).contains(&wait),
        "Retry-After {wait} for an rpm of 3"
    );
    assert_eq!(mock.received().len(), 3);
    assert_eq!(
        metric(
            &gw,
            "keyrouter_rate_limited_total",
            &[("provider", "openai"), ("scope", "client")]
        )
        .await,
        1.0
    );
    // Another client has its own count.
    let other = client_token(CLIENT_JWT_SECRET, json!({"sub": "app-4", "rpm": 3}));
    assert_eq!(send(with_token(&other)).await.status, 200);
    // Tokens from identity providers name an audience: not checked.
    let audience = client_token(
        CLIENT_JWT_SECRET,
        json!({"sub": "app-5", "aud": ["keyrouter", "other-api"]}),
    );
    let a = send(with_token(&audience)).await;
    assert_eq!(a.status, 200, "{}", a.text);

    // The token never went upstream: the provider saw only the key.
    for r in mock.received() {
        assert_eq!(
            r.header("authorization"),
            Some(format!("Bearer {KEY}").as_str())
        );
        for (name, value) in &r.headers {
            let value = String::from_utf8_lossy(value.as_bytes());
            for token in [&limited, &other, &audience] {
                assert!(
                    !value.contains(token.as_str()),
                    "the client token went upstream in {name}"
                );
            }
            assert!(
                !value.contains("eyJ"),
                "a JWT went upstream in {name}: {value}"
            );
        }
    }
}

#[tokio::test]
async fn a_refusal_waiting_to_be_stored_is_not_replaced_by_a_recovery() {
    const KEY: &str = "sk-router-queued-refusal-0TTTT";
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "", "").await;
    let id = register(&gw, KEY, json!({})).await;
    let key = keyrouter::keys::KeyId::parse(&id).unwrap();
    let app = gw.app();
    // Three reports before the first write can run (nothing awaits in
    // between): a 429 being written, an exhausted quota waiting behind it,
    // and a cooldown seen ending meanwhile.
    let until = Utc::now() + chrono::Duration::seconds(60);
    Health::record(app, &key, KeyEvent::RateLimited { until });
    Health::record(app, &key, KeyEvent::QuotaExhausted);
    Health::record(app, &key, KeyEvent::CooldownOver);
    gw.wait_for_key_state(&id, KeyState::Exhausted, TRANSITION)
        .await;
    assert_eq!(
        transitions(&gw, &id).await,
        [
            router_event("active", "cooling_down", "upstream_rate_limited"),
            router_event("cooling_down", "exhausted", "upstream_quota_exhausted"),
        ]
    );
}

/// A key state change still being written when the gateway stops gracefully
/// is stored before the stop returns; a store that stays away holds the stop
/// up for the drain time only.
#[tokio::test]
async fn a_key_state_change_being_written_at_shutdown_is_stored_before_the_stop_returns() {
    const KEY: &str = "sk-router-shutdown-write-0VVVV";
    // Drain time for open requests, then for pending writes.
    const DRAIN: Duration = Duration::from_secs(2);
    for store_comes_back in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let mock = MockUpstream::start().await;
        let gw = TestGateway::builder()
            .providers(&openai(&mock.url, ""))
            .state_dir(dir.path())
            .toml(&format!(
                "[server]\nshutdown_drain = \"{}s\"\n",
                DRAIN.as_secs()
            ))
            .start()
            .await;
        let id = register(&gw, KEY, json!({})).await;
        mock.script(KEY, Behaviour::Unauthorized);
        // Another process holds the database's write lock: the transition
        // waits for it.
        let other = rusqlite::Connection::open(dir.path().join("keyrouter.db")).unwrap();
        other.execute_batch("BEGIN IMMEDIATE").unwrap();
        chat(&gw).await.error(503, "no_available_key");

        let app = gw.app().clone();
        let started = Instant::now();
        let stopping = tokio::spawn(gw.stop());
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(
            !stopping.is_finished(),
            "the stop did not wait for the key's state change"
        );
        if store_comes_back {
            other.execute_batch("COMMIT").unwrap();
        }
        stopping.await.unwrap();
        let took = started.elapsed();
        assert!(
            took < DRAIN + Duration::from_millis(800),
            "the stop took {took:?}"
        );
        if !store_comes_back {
            assert!(took >= DRAIN, "the stop gave up after {took:?}");
            continue;
        }
        let key = common::stored_key(&app, &id).await;
        assert_eq!(key.status.state(), KeyState::Invalid);
        let events = common::stored_events(&app, &id).await;
        assert!(
            events
                .iter()
                .any(|e| e.event == EventKind::KeyStateChanged && e.to == Some(KeyState::Invalid)),
            "no transition in the audit log: {events:?}"
        );
    }
}

// ---------------------------------------------------------------------------
// 10. Probes

#[tokio::test]
async fn probes_bring_a_recovered_key_back_and_pace_themselves() {
    const RECOVERS: &str = "sk-router-probe-recovers-00WWWW";
    const STAYS_BAD: &str = "sk-router-probe-stays-bad-0XXXX";
    const GOOD: &str = "sk-router-probe-good-key-00YYYY";
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "probe_interval = \"1s\"", "").await;
    let failing = [
        (RECOVERS, Behaviour::Unauthorized),
        (STAYS_BAD, Behaviour::Unauthorized),
    ];
    let [recovers, stays_bad] = failing_keys_tried(&gw, &mock, failing, GOOD).await;
    gw.wait_for_key_state(&recovers, KeyState::Invalid, TRANSITION)
        .await;
    gw.wait_for_key_state(&stays_bad, KeyState::Invalid, TRANSITION)
        .await;

    // The provider accepts the key again: a probe notices within two
    // intervals.
    let probes_from = mock.requests_to(STAYS_BAD, &http::Method::GET, "/v1/models");
    let counting_since = Instant::now();
    mock.script(RECOVERS, Behaviour::Ok);
    // Two intervals plus a second of slack.
    gw.wait_for_key_state(&recovers, KeyState::Active, Duration::from_secs(3))
        .await;
    let probed = mock.requests_to(RECOVERS, &http::Method::GET, "/v1/models");
    assert!(probed >= 1, "no probe with the recovered key");
    assert_eq!(
        transitions(&gw, &recovers).await,
        [
            router_event("active", "invalid", "upstream_unauthorized"),
            router_event("invalid", "active", "probe_succeeded"),
        ]
    );
    assert_eq!(key_view(&gw, &recovers).await["state"], "active");
    mock.script(GOOD, Behaviour::Unauthorized);
    // The recovered key serves again (the good one is now refused, so the
    // request can only succeed through it).
    let a = chat(&gw).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(mock.last().credential().as_deref(), Some(RECOVERS));

    // The key that stays bad is probed at most once per interval.
    let elapsed_target = Duration::from_millis(3500);
    if let Some(rest) = elapsed_target.checked_sub(counting_since.elapsed()) {
        tokio::time::sleep(rest).await;
    }
    let elapsed = counting_since.elapsed();
    let probes = mock.requests_to(STAYS_BAD, &http::Method::GET, "/v1/models") - probes_from;
    // Probes at least an interval apart: at most one more than the whole
    // seconds elapsed (4 in 3.5 s).
    let bound = elapsed.as_secs() as usize + 1;
    assert!(
        (1..=bound).contains(&probes),
        "{probes} probes of a failing key in {elapsed:?}"
    );
    assert_eq!(
        gw.key_record(&stays_bad).await.status.state(),
        KeyState::Invalid
    );
    assert_eq!(
        transitions(&gw, &stays_bad).await,
        [router_event("active", "invalid", "upstream_unauthorized")]
    );
}

/// A probe pass reads its keys once and spreads their probes over the
/// interval. A key revoked or deleted meanwhile is not probed: its material
/// goes nowhere after the operator's call returned.
#[tokio::test]
async fn a_key_revoked_or_deleted_during_a_probe_pass_is_not_probed() {
    const KEYS: [&str; 5] = [
        "sk-router-pass-key-1-0000AAAA",
        "sk-router-pass-key-2-0000BBBB",
        "sk-router-pass-key-3-0000CCCC",
        "sk-router-pass-key-4-0000DDDD",
        "sk-router-pass-key-5-0000EEEE",
    ];
    const GOOD: &str = "sk-router-pass-good-0000FFFF";
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "probe_interval = \"3s\"\nretry_budget = 5", "").await;
    let mut ids = Vec::new();
    for key in KEYS {
        ids.push(register(&gw, key, json!({})).await);
        mock.script(key, Behaviour::Unauthorized);
    }
    register(&gw, GOOD, json!({})).await;
    until_keys_used(&gw, &mock, &KEYS).await;
    for id in &ids {
        gw.wait_for_key_state(id, KeyState::Invalid, TRANSITION)
            .await;
    }
    // A pass has begun once the first key is probed; the others follow
    // over the interval.
    let probes = |key: &str| mock.requests_to(key, &http::Method::GET, "/v1/models");
    let deadline = Instant::now() + Duration::from_secs(8);
    while probes(KEYS[0]) == 0 {
        assert!(Instant::now() < deadline, "no probe pass began");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let revoked = gw
        .post(&format!("/keys/{}/revoke", ids[3]), json!({}))
        .send()
        .await;
    assert_eq!(revoked.status, 200, "{}", revoked.text);
    let deleted = gw.delete(&format!("/keys/{}", ids[4])).send().await;
    assert_eq!(deleted.status, 200, "{}", deleted.text);
    let before = [probes(KEYS[3]), probes(KEYS[4])];
    // The rest of this pass and all of the next.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    assert_eq!([probes(KEYS[3]), probes(KEYS[4])], before);
    assert!(probes(KEYS[2]) > 0, "the pass went on for the other keys");
}

#[tokio::test]
async fn a_key_that_fails_again_after_each_probe_is_probed_less_and_less_often() {
    const RELAPSES: &str = "sk-router-probe-relapses-0ZZZZ";
    const STEADY: &str = "sk-router-probe-steady-key-0VVVV";
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "probe_interval = \"300ms\"", "").await;
    let relapses = register(&gw, RELAPSES, json!({})).await;
    register(&gw, STEADY, json!({})).await;
    // Its quota is gone, but the model list still answers: every probe
    // brings it back, and the next request that picks it finds it empty.
    mock.script(RELAPSES, Behaviour::InsufficientQuota);
    let probes = || mock.requests_to(RELAPSES, &http::Method::GET, "/v1/models");
    async fn traffic(gw: &TestGateway, until: Instant) {
        while Instant::now() < until {
            let a = chat(gw).await;
            assert_eq!(a.status, 200, "{}", a.text);
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    // Counted from the first probe: the key must first be found exhausted.
    let deadline = Instant::now() + Duration::from_secs(5);
    while probes() == 0 {
        assert!(
            Instant::now() < deadline,
            "the exhausted key was never probed"
        );
        traffic(&gw, Instant::now() + Duration::from_millis(50)).await;
    }
    let started = Instant::now();
    traffic(&gw, started + Duration::from_secs(3)).await;
    let first_half = probes();
    traffic(&gw, started + Duration::from_secs(6)).await;
    let second_half = probes() - first_half;
    // At one probe per interval the key would be probed about ten times in
    // each half; with the spacing doubling after each relapse (2, 4, 8
    // passes of 0.3 s) about three times in the first (the first probe
    // included) and once in the second.
    assert!(
        (2..=5).contains(&first_half),
        "{first_half} probes in the first 3 s"
    );
    assert!(
        second_half < first_half,
        "{second_half} probes in the last 3 s after {first_half} in the first"
    );
    // Each probe that brought the key back shows in its history, and each
    // relapse after it.
    let history = transitions(&gw, &relapses).await;
    let revivals = history
        .iter()
        .filter(|e| **e == router_event("exhausted", "active", "probe_succeeded"))
        .count();
    assert!(
        revivals >= 2 && revivals <= first_half + second_half,
        "{history:?}"
    );
    assert_eq!(
        history[0],
        router_event("active", "exhausted", "upstream_quota_exhausted")
    );
}

// ---------------------------------------------------------------------------
// 11. Live usage

#[tokio::test]
async fn the_management_api_shows_live_usage() {
    const KEY: &str = "sk-router-usage-key-0000000ZZZZ";
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "", "").await;
    let id = register(&gw, KEY, json!({})).await;
    let usage = |v: &Value| v["usage"].clone();
    assert_eq!(
        usage(&key_view(&gw, &id).await),
        json!({"requests_last_minute": 0, "tokens_last_minute": 0, "in_flight": 0})
    );
    for _ in 0..3 {
        assert_eq!(chat(&gw).await.status, 200);
    }
    let u = usage(&key_view(&gw, &id).await);
    assert_eq!(u["requests_last_minute"], 3, "{u}");
    // The mock reports 29 tokens per completion.
    assert_eq!(u["tokens_last_minute"], 3 * 29, "{u}");
    assert_eq!(u["in_flight"], 0, "{u}");

    mock.script(KEY, Behaviour::Slow(Duration::from_millis(1000)));
    let slow = {
        let req = gw
            .client()
            .post(gw.proxy_url("/openai/v1/chat/completions"))
            .json(&chat_body());
        tokio::spawn(async move { Answer::of(req.send().await.unwrap()).await })
    };
    let deadline = Instant::now() + Duration::from_millis(800);
    loop {
        let u = usage(&key_view(&gw, &id).await);
        if u["in_flight"] == 1 {
            assert_eq!(u["requests_last_minute"], 4, "{u}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "in_flight never showed the slow request: {u}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(slow.await.unwrap().status, 200);
    let u = usage(&key_view(&gw, &id).await);
    assert_eq!(u["in_flight"], 0, "{u}");
    assert_eq!(u["tokens_last_minute"], 4 * 29, "{u}");
}

// ---------------------------------------------------------------------------
// 12. Revoke beats the router

#[tokio::test]
async fn an_operators_revoke_beats_a_concurrent_rate_limit() {
    const SLOW_429: &str = "sk-router-revoked-while-429-AAAB";
    const FAST_429: &str = "sk-router-revoked-after-429-AAAC";
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "", "").await;

    // The revoke lands while the provider is still answering the request
    // that ends in a 429.
    let slow_id = register(&gw, SLOW_429, json!({})).await;
    mock.script(
        SLOW_429,
        Behaviour::After(
            Duration::from_millis(500),
            Box::new(Behaviour::Status429 {
                retry_after: Some(1),
            }),
        ),
    );
    let pending = {
        let req = gw
            .client()
            .post(gw.proxy_url("/openai/v1/chat/completions"))
            .json(&chat_body());
        tokio::spawn(async move { Answer::of(req.send().await.unwrap()).await })
    };
    while mock.requests_for(SLOW_429) == 0 {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let reply = gw
        .post(
            &format!("/keys/{slow_id}/revoke"),
            json!({"reason": "leaked"}),
        )
        .send()
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json()["state"], "revoked");
    let a = pending.await.unwrap();
    assert!(matches!(a.status, 429 | 503), "{}", a.text);

    // The revoke comes right after the 429, while its transition may still
    // be being written.
    let fast_id = register(&gw, FAST_429, json!({})).await;
    mock.script(
        FAST_429,
        Behaviour::Status429 {
            retry_after: Some(1),
        },
    );
    let a = chat(&gw).await;
    assert!(matches!(a.status, 429 | 503), "{}", a.text);
    let reply = gw
        .post(&format!("/keys/{fast_id}/revoke"), json!({}))
        .send()
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);

    // Past both cooldowns and a pool reload: still revoked, and revoked
    // is the last word in the audit log.
    tokio::time::sleep(Duration::from_millis(3200)).await;
    for id in [&slow_id, &fast_id] {
        assert_eq!(gw.key_record(id).await.status.state(), KeyState::Revoked);
        assert_eq!(key_view(&gw, id).await["state"], "revoked");
        let events = gw.events_for(id).await;
        let last = events.last().unwrap();
        assert_eq!(last.event, EventKind::KeyRevoked, "{events:?}");
        assert!(
            transitions(&gw, id)
                .await
                .iter()
                .all(|(_, _, to, _)| to != "active"),
            "a router transition revived the key: {events:?}"
        );
    }
    // Nothing left to serve with.
    let before = mock.received().len();
    chat(&gw).await.error(503, "no_available_key");
    assert_eq!(mock.received().len(), before);
}

// ---------------------------------------------------------------------------
// Refusals of the request, not the key: what a provider's error says about
// the key is read from its codes, not its words

/// Two keys for a provider with a retry budget of 2, for requests the
/// provider refuses whatever the key.
async fn two_keys(a: &str, b: &str) -> (MockUpstream, TestGateway, [String; 2]) {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "retry_budget = 2", "").await;
    let ids = [
        register(&gw, a, json!({})).await,
        register(&gw, b, json!({})).await,
    ];
    (mock, gw, ids)
}

/// A chat completion with the mock header `name: value`.
async fn chat_with(gw: &TestGateway, name: &str, value: &str) -> Answer {
    send(
        gw.client()
            .post(gw.proxy_url("/openai/v1/chat/completions"))
            .header(name, value)
            .json(&chat_body()),
    )
    .await
}

/// Each of `requests` refusals took one attempt (no other key was tried),
/// and no key changed state.
async fn keys_untouched(gw: &TestGateway, mock: &MockUpstream, ids: &[String], requests: usize) {
    assert_eq!(
        mock.received().len(),
        requests,
        "one attempt per request, no retries"
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    for id in ids {
        assert_eq!(gw.key_record(id).await.status.state(), KeyState::Active);
        assert_eq!(transitions(gw, id).await, []);
    }
}

/// A provider 403 that does not name the key (a resource the client may not
/// use) goes to the client as it is: not retried, and the key stays active,
/// so no client can invalidate keys by asking for forbidden things.
#[tokio::test]
async fn a_403_about_the_request_leaves_the_key_alone() {
    let (mock, gw, ids) = two_keys(
        "sk-router-forbidden-a-000VVVV",
        "sk-router-forbidden-b-000WWWW",
    )
    .await;
    for _ in 0..3 {
        chat_with(&gw, "x-mock-status", "403")
            .await
            .error(403, "forbidden");
    }
    keys_untouched(&gw, &mock, &ids, 3).await;
}

/// Providers quote the client's invalid input in their 400 messages. A
/// client that sends the words providers use for a bad key or a spent
/// balance gets the provider's refusal of its request; no key changes
/// state and no other key is tried.
#[tokio::test]
async fn words_a_client_sends_cannot_get_keys_invalidated() {
    let (mock, gw, ids) = two_keys(
        "sk-router-echo-a-0000000AAAA",
        "sk-router-echo-b-0000000BBBB",
    )
    .await;
    let echoed = [
        "invalid_api_key",
        "authentication_error",
        "API_KEY_INVALID",
        "insufficient_quota",
        "Your credit balance is too low",
        "Incorrect API key",
    ];
    for text in echoed {
        let message = chat_with(&gw, "x-mock-echo", text)
            .await
            .error(400, "invalid_request");
        assert!(message.contains(text), "{message}");
    }
    keys_untouched(&gw, &mock, &ids, echoed.len()).await;
}

/// A 400 is about the key when the provider's own codes say so: Gemini's
/// `API_KEY_INVALID`, Anthropic's spent balance. The request is served by
/// another key, and the keys leave the rotation.
#[tokio::test]
async fn a_400_whose_codes_name_the_key_takes_it_out() {
    const NOT_VALID: &str = "sk-router-notvalid-0000FFFF";
    const SPENT: &str = "sk-router-spent-000000GGGG";
    const GOOD: &str = "sk-router-fine-0000000HHHH";
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "retry_budget = 2", "").await;
    let failing = [
        (NOT_VALID, Behaviour::KeyNotValid),
        (SPENT, Behaviour::CreditBalanceTooLow),
    ];
    let [not_valid, spent] = failing_keys_tried(&gw, &mock, failing, GOOD).await;
    for (id, state, reason) in [
        (&not_valid, KeyState::Invalid, "upstream_unauthorized"),
        (&spent, KeyState::Exhausted, "upstream_quota_exhausted"),
    ] {
        let record = gw.wait_for_key_state(id, state, TRANSITION).await;
        assert_eq!(record.state_reason.as_deref(), Some(reason));
    }
    let before = (mock.requests_for(NOT_VALID), mock.requests_for(SPENT));
    for _ in 0..4 {
        assert_eq!(chat(&gw).await.status, 200);
    }
    assert_eq!(
        (mock.requests_for(NOT_VALID), mock.requests_for(SPENT)),
        before
    );
}

// ---------------------------------------------------------------------------
// 13. Counters exist before their first event

/// A fresh gateway exports, at zero, every series whose labels are known at
/// start-up: `rate()` and `absent()` alerts see them before a first event.
#[tokio::test]
async fn counters_with_known_labels_exist_at_zero_from_the_start() {
    let gw = TestGateway::start().await;
    let text = gw.metrics().await;
    let zero = |name: &str, labels: &[(&str, &str)]| {
        assert_eq!(
            series_value(&text, name, labels),
            Some(0.0),
            "{name}{labels:?} missing or not 0:\n{text}"
        );
    };
    for op in [
        "insert_key",
        "get_key",
        "list_keys",
        "all_keys",
        "update_key",
        "reseal_keys",
        "count_keys",
        "append_audit",
        "list_audit",
        "prune_audit",
    ] {
        zero("keyrouter_store_errors_total", &[("op", op)]);
    }
    for provider in ["openai", "anthropic"] {
        for scope in ["key", "all_keys", "client"] {
            zero(
                "keyrouter_rate_limited_total",
                &[("provider", provider), ("scope", scope)],
            );
        }
        for reason in [
            "key_rate_limited",
            "key_quota_exhausted",
            "key_rejected",
            "upstream_5xx",
            "upstream_timeout",
            "upstream_unreachable",
        ] {
            zero(
                "keyrouter_upstream_retries_total",
                &[("provider", provider), ("reason", reason)],
            );
        }
        for (from, to) in [
            ("active", "cooling_down"),
            ("cooling_down", "active"),
            ("active", "exhausted"),
            ("cooling_down", "exhausted"),
            ("active", "invalid"),
            ("cooling_down", "invalid"),
            ("exhausted", "active"),
            ("invalid", "active"),
            ("active", "revoked"),
            ("cooling_down", "revoked"),
            ("exhausted", "revoked"),
            ("invalid", "revoked"),
        ] {
            zero(
                "keyrouter_key_transitions_total",
                &[("provider", provider), ("from", from), ("to", to)],
            );
        }
    }
    for name in [
        "keyrouter_store_errors_total",
        "keyrouter_rate_limited_total",
        "keyrouter_upstream_retries_total",
        "keyrouter_key_transitions_total",
    ] {
        assert!(text.contains(&format!("# TYPE {name} counter")), "{text}");
    }
    // Only moves the state table allows have a series.
    assert!(!text.contains(r#"from="revoked""#), "{text}");
    assert!(
        series_value(
            &text,
            "keyrouter_key_transitions_total",
            &[("from", "exhausted"), ("to", "invalid")]
        )
        .is_none()
    );
    gw.stop().await;
}
