//! The public proxy through its front door: a real gateway on loopback ports
//! in front of mock providers (plain HTTP, and HTTPS with a test CA given as
//! the provider's `upstream_ca_path`), driven by an HTTP client the way an
//! SDK drives it, or by raw bytes where a client library would normalise the
//! request. Each test asserts what the application (or the provider) sees.

mod common;

use bytes::Bytes;
use common::TestGateway;
use common::answer::{Answer, assert_error_shape};
use common::mock_upstream::{
    ANTHROPIC_ID, ANTHROPIC_MODEL, Behaviour, FILE_ID, FINE_TUNED_MODEL, FINE_TUNING_JOB_ID,
    GEMINI_MODEL_VERSION, GEMINI_RESPONSE_ID, LEAKED_KEY, MODEL_OWNER_USER, MockUpstream,
    OLLAMA_MODEL, ORGANIZATION, PROVIDER_HEADERS, PROVIDER_ID, PROVIDER_MODEL, Received,
    STREAM_DECORATION, file_object,
};
use common::tls::TestCa;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const OPENAI_KEY: &str = "sk-openai-test-key-0123456789abcdef";
const ANTHROPIC_KEY: &str = "sk-ant-api03-test-key-0123456789abcd";
const AZURE_KEY: &str = "azure0123456789abcdef0123456789ab";
const GEMINI_KEY: &str = "AIzaSyTestGeminiKey0123456789abcdefg";

/// Credentials the client sends of its own; none may reach a provider.
const CLIENT_SECRET: &str = "client-own-secret-0000";
const CLIENT_COOKIE: &str = "session=client-cookie-0000";

/// The `[[providers]]` entry for `kind` at `url`, served under `/{id}`.
fn provider(id: &str, kind: &str, url: &str, extra: &str) -> String {
    format!(
        "[[providers]]\nid = \"{id}\"\nkind = \"{kind}\"\nbase_url = \"{url}\"\nroute_prefix = \"/{id}\"\n{extra}\n"
    )
}

/// One provider of every kind, all answered by `mock`; OpenAI is the
/// default. `ca` is the test CA's file for an HTTPS mock.
fn all_kinds(mock: &MockUpstream, ca: Option<&std::path::Path>) -> String {
    let ca = ca.map_or(String::new(), |p| {
        format!("upstream_ca_path = {}", toml_str(&p.display().to_string()))
    });
    [
        provider(
            "openai",
            "openai",
            &mock.url,
            &format!("default = true\n{ca}"),
        ),
        provider("anthropic", "anthropic", &mock.url, &ca),
        provider("azure", "azure_openai", &mock.url, &ca),
        provider("gemini", "gemini", &mock.url, &ca),
    ]
    .concat()
}

fn toml_str(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// A gateway in front of `mock` with one key per provider kind.
async fn gateway(mock: &MockUpstream, extra_toml: &str) -> TestGateway {
    gateway_with(all_kinds(mock, None), extra_toml).await
}

async fn gateway_with(providers: String, extra_toml: &str) -> TestGateway {
    let gw = TestGateway::builder()
        .providers(&providers)
        .toml(extra_toml)
        .start()
        .await;
    for (provider, key) in [
        ("openai", OPENAI_KEY),
        ("anthropic", ANTHROPIC_KEY),
        ("azure", AZURE_KEY),
        ("gemini", GEMINI_KEY),
    ] {
        if providers.contains(&format!("id = \"{provider}\"")) {
            gw.register_key(provider, key).await;
        }
    }
    gw
}

fn chat(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}]})
}

/// An OpenAI chat stream for `gpt-4o`, with the mock header `name: value`;
/// the response as soon as its head arrives.
async fn openai_stream_with(gw: &TestGateway, name: &str, value: &str) -> reqwest::Response {
    gw.client()
        .post(gw.proxy_url("/openai/v1/chat/completions"))
        .header(name, value)
        .json(&chat_stream("gpt-4o"))
        .send()
        .await
        .unwrap()
}

fn chat_stream(model: &str) -> Value {
    json!({"model": model, "stream": true, "messages": [{"role": "user", "content": "hi"}]})
}

fn anthropic_body(model: &str, stream: bool) -> Value {
    json!({"model": model, "max_tokens": 64, "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

async fn post(gw: &TestGateway, path: &str, body: &Value) -> Answer {
    post_with(gw, path, body, &[]).await
}

async fn post_with(gw: &TestGateway, path: &str, body: &Value, headers: &[(&str, &str)]) -> Answer {
    let mut req = gw.client().post(gw.proxy_url(path)).json(body);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    Answer::of(req.send().await.unwrap()).await
}

async fn get(gw: &TestGateway, path: &str) -> Answer {
    Answer::of(gw.client().get(gw.proxy_url(path)).send().await.unwrap()).await
}

/// One SSE event as a client parses it.
#[derive(Debug)]
struct Event {
    name: Option<String>,
    data: String,
}

impl Event {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data).unwrap_or_else(|e| panic!("{e}: {}", self.data))
    }
}

/// The events a client dispatches: blocks without data (comments, a lone
/// `retry:`) dispatch nothing.
fn parse_sse(text: &str) -> Vec<Event> {
    text.replace("\r\n", "\n")
        .split("\n\n")
        .filter_map(|block| {
            let mut name = None;
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = Some(v.trim().to_owned());
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v));
                }
            }
            (!data.is_empty()).then(|| Event {
                name,
                data: data.join("\n"),
            })
        })
        .collect()
}

/// Strings that identify the provider's answer; none may reach a client
/// ("PROVIDERID" is part of every provider id the mock sends).
const PROVIDER_TRACES: [&str; 8] = [
    "PROVIDERID",
    PROVIDER_MODEL,
    ANTHROPIC_MODEL,
    GEMINI_MODEL_VERSION,
    "fp_mockfingerprint",
    "system_fingerprint",
    "service_tier",
    "x_provider_trace",
];

fn assert_no_provider_traces(text: &str) {
    for trace in PROVIDER_TRACES {
        assert!(!text.contains(trace), "{trace} reached the client: {text}");
    }
}

/// Waits (up to 5 s) until the series has `expected`.
async fn eventually_metric(gw: &TestGateway, name: &str, labels: &[(&str, &str)], expected: f64) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let value = gw.metric(name, labels).await.unwrap_or(0.0);
        if value == expected {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{name}{labels:?} is {value}, expected {expected}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}

/// Waits until no request to `openai` is in flight.
async fn nothing_in_flight(gw: &TestGateway) {
    eventually_metric(
        gw,
        "keyrouter_inflight_requests",
        &[("provider", "openai")],
        0.0,
    )
    .await;
}

/// Waits until the provider has no stream open (keyrouter closed its side).
async fn provider_streams_closed(mock: &MockUpstream) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while mock.open_streams() > 0 {
        assert!(Instant::now() < deadline, "the provider stream stayed open");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn metric(gw: &TestGateway, name: &str, labels: &[(&str, &str)]) -> f64 {
    gw.metric(name, labels).await.unwrap_or(0.0)
}

/// Every header value the provider received, lowercased names.
fn header_text(r: &Received) -> String {
    r.headers
        .iter()
        .map(|(k, v)| format!("{k}: {}\n", String::from_utf8_lossy(v.as_bytes())))
        .collect()
}

/// Asserts none of the client's own credentials reached the provider.
fn assert_no_client_credentials(r: &Received) {
    let all = format!("{} {}", r.path_and_query, header_text(r));
    for secret in [CLIENT_SECRET, "client-cookie", "CLIENTKEY"] {
        assert!(!all.contains(secret), "{secret} was forwarded: {all}");
    }
    assert!(r.headers.get("cookie").is_none());
}

const CLIENT_CREDENTIALS: [(&str, &str); 5] = [
    ("authorization", "Bearer client-own-secret-0000"),
    ("x-api-key", CLIENT_SECRET),
    ("api-key", CLIENT_SECRET),
    ("x-goog-api-key", CLIENT_SECRET),
    ("cookie", CLIENT_COOKIE),
];

async fn credentials_are_swapped(mock: &MockUpstream, gw: &TestGateway) {
    // OpenAI: Bearer, query kept, /openai prefix removed, identity
    // encoding asked for whatever the client accepts.
    let mut openai_headers = CLIENT_CREDENTIALS.to_vec();
    openai_headers.push(("accept-encoding", "gzip, br"));
    let a = post_with(
        gw,
        "/openai/v1/chat/completions?trace=1&x=a%20b",
        &chat("gpt-4o"),
        &openai_headers,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let r = mock.last();
    assert_eq!(r.path_and_query, "/v1/chat/completions?trace=1&x=a%20b");
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str())
    );
    for absent in ["x-api-key", "api-key", "x-goog-api-key"] {
        assert!(r.headers.get(absent).is_none(), "{absent}");
    }
    assert_eq!(r.header("accept-encoding"), Some("identity"));
    assert_eq!(r.headers.get_all("accept-encoding").iter().count(), 1);
    assert_eq!(r.body, serde_json::to_vec(&chat("gpt-4o")).unwrap());
    assert_no_client_credentials(&r);

    // Bare /v1/... goes to the default provider, path unchanged.
    let a = Answer::of(
        gw.client()
            .get(gw.proxy_url("/v1/models?limit=2"))
            .header("authorization", "Bearer client-own-secret-0000")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let r = mock.last();
    assert_eq!(r.path_and_query, "/v1/models?limit=2");
    assert_eq!(
        r.header("authorization"),
        Some(format!("Bearer {OPENAI_KEY}").as_str())
    );
    assert_no_client_credentials(&r);

    // Anthropic: x-api-key; the client's anthropic-version kept...
    let mut with_version = CLIENT_CREDENTIALS.to_vec();
    with_version.push(("anthropic-version", "2024-10-22"));
    let a = post_with(
        gw,
        "/anthropic/v1/messages",
        &anthropic_body("claude-3-5-sonnet-latest", false),
        &with_version,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let r = mock.last();
    assert_eq!(r.path_and_query, "/v1/messages");
    assert_eq!(r.header("x-api-key"), Some(ANTHROPIC_KEY));
    assert_eq!(r.header("anthropic-version"), Some("2024-10-22"));
    assert_eq!(r.headers.get_all("anthropic-version").iter().count(), 1);
    assert!(r.headers.get("authorization").is_none());
    assert_eq!(r.header("accept-encoding"), Some("identity"));
    assert_no_client_credentials(&r);
    // ... and the default added when the client names none.
    post_with(
        gw,
        "/anthropic/v1/messages",
        &anthropic_body("claude-3-5-sonnet-latest", false),
        &CLIENT_CREDENTIALS,
    )
    .await;
    let r = mock.last();
    assert_eq!(r.header("anthropic-version"), Some("2023-06-01"));
    assert_eq!(r.header("x-api-key"), Some(ANTHROPIC_KEY));

    // Azure OpenAI: api-key, deployment path and api-version kept.
    let a = post_with(
        gw,
        "/azure/openai/deployments/gpt4o/chat/completions?api-version=2024-06-01",
        &chat("gpt-4o"),
        &CLIENT_CREDENTIALS,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let r = mock.last();
    assert_eq!(
        r.path_and_query,
        "/openai/deployments/gpt4o/chat/completions?api-version=2024-06-01"
    );
    assert_eq!(r.header("api-key"), Some(AZURE_KEY));
    assert!(r.headers.get("authorization").is_none());
    assert!(r.headers.get("x-api-key").is_none());
    assert_no_client_credentials(&r);
    // Azure clients name a deployment, not a model: the answer's `model` is
    // the deployment they asked for.
    let a = post_with(
        gw,
        "/azure/openai/deployments/gpt4o/chat/completions?api-version=2024-06-01",
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
        &CLIENT_CREDENTIALS,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json()["model"], "gpt4o");

    // Gemini: x-goog-api-key; the client's ?key= removed, the rest kept.
    let a = post_with(
        gw,
        "/gemini/v1beta/models/gemini-1.5-pro:generateContent?key=CLIENTKEY&alt=json",
        &json!({"contents": [{"parts": [{"text": "hi"}]}]}),
        &CLIENT_CREDENTIALS,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let r = mock.last();
    assert_eq!(
        r.path_and_query,
        "/v1beta/models/gemini-1.5-pro:generateContent?alt=json"
    );
    assert_eq!(r.header("x-goog-api-key"), Some(GEMINI_KEY));
    assert!(r.headers.get("authorization").is_none());
    assert_no_client_credentials(&r);
    // Gemini's model version is the model named in the path.
    let v = a.json();
    assert_eq!(v["modelVersion"], "gemini-1.5-pro");
    assert_eq!(
        v["candidates"][0]["content"]["parts"][0]["text"],
        "Hello from the mock."
    );
}

#[tokio::test]
async fn each_provider_kind_gets_its_key_and_never_the_clients_credentials() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;
    credentials_are_swapped(&mock, &gw).await;
    // The provider is addressed by its own name, not the gateway's.
    let a = post_with(&gw, "/openai/v1/chat/completions", &chat("gpt-4o"), &[]).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let authority = mock.url.strip_prefix("http://").unwrap();
    assert_eq!(mock.last().header("host"), Some(authority));
    assert_eq!(mock.last().headers.get_all("host").iter().count(), 1);
}

#[tokio::test]
async fn an_azure_deployment_below_a_base_path_is_the_answers_model() {
    let mock = MockUpstream::start().await;
    let base = format!("{}/apim", mock.url);
    let gw = gateway_with(provider("azure", "azure_openai", &base, ""), "").await;
    let a = post_with(
        &gw,
        "/azure/openai/deployments/gpt4o/chat/completions?api-version=2024-06-01",
        &json!({"messages": [{"role": "user", "content": "hi"}]}),
        &[],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(
        mock.last().path_and_query,
        "/apim/openai/deployments/gpt4o/chat/completions?api-version=2024-06-01"
    );
    assert_eq!(a.json()["model"], "gpt4o");
}

/// An HTTPS mock provider whose certificate a test CA signed, and a gateway
/// with every provider kind in front of it, trusting that CA. The CA file
/// lives in the returned directory.
async fn https_provider_gateway() -> (MockUpstream, TestGateway, tempfile::TempDir) {
    let ca = TestCa::new("keyrouter test upstream CA");
    let dir = tempfile::tempdir().unwrap();
    let ca_path = ca.write(dir.path());
    let mock = MockUpstream::start_tls(ca.leaf("localhost").server_config()).await;
    let gw = gateway_with(all_kinds(&mock, Some(&ca_path)), "").await;
    (mock, gw, dir)
}

#[tokio::test]
async fn credentials_are_swapped_toward_an_https_provider_too() {
    let (mock, gw, _ca_dir) = https_provider_gateway().await;
    credentials_are_swapped(&mock, &gw).await;
}

/// Requests in a row go over one kept provider connection: HTTP/1.1 to a
/// plain HTTP provider, with the provider's own `Host`. A connection the
/// provider closes after its answer is not used again.
#[tokio::test]
async fn provider_connections_are_kept_and_reused() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;
    for _ in 0..5 {
        let a = post(&gw, "/openai/v1/chat/completions", &chat("gpt-4o")).await;
        assert_eq!(a.status, 200, "{}", a.text);
    }
    let received = mock.received();
    assert_eq!(received.len(), 5);
    let first = received[0].connection;
    assert!(
        received.iter().all(|r| r.connection == first),
        "one connection for requests in a row: {:?}",
        received.iter().map(|r| r.connection).collect::<Vec<_>>()
    );
    assert!(received.iter().all(|r| r.version == http::Version::HTTP_11));
    let host = format!("localhost:{}", mock.addr.port());
    assert_eq!(received[0].header("host"), Some(host.as_str()));

    let closing = [("x-mock-close", "1")];
    let a = post_with(
        &gw,
        "/openai/v1/chat/completions",
        &chat("gpt-4o"),
        &closing,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    let b = post(&gw, "/openai/v1/chat/completions", &chat("gpt-4o")).await;
    assert_eq!(b.status, 200, "{}", b.text);
    let received = mock.received();
    assert_eq!(received[5].connection, first);
    assert_ne!(
        received[6].connection, first,
        "a closed connection was used again"
    );
}

/// A provider's error answer is dropped unread, yet the connection that
/// carried it is kept: the next request goes over it.
#[tokio::test]
async fn a_connection_that_carried_an_error_answer_is_kept() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;
    mock.script(OPENAI_KEY, Behaviour::ServerError);
    let a = post(&gw, "/openai/v1/chat/completions", &chat("gpt-4o")).await;
    assert_eq!(a.status, 502, "{}", a.text);
    mock.script(OPENAI_KEY, Behaviour::Ok);
    // The connection returns once hyper has read off the rest of the answer.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let b = post(&gw, "/openai/v1/chat/completions", &chat("gpt-4o")).await;
    assert_eq!(b.status, 200, "{}", b.text);
    let received = mock.received();
    assert_eq!(received.len(), 2);
    assert_eq!(received[0].connection, received[1].connection);
}

/// An HTTPS provider that offers HTTP/2 gets every request over one
/// HTTP/2 connection, addressed by `:authority` (no `Host`).
#[tokio::test]
async fn an_https_provider_offering_http2_gets_one_http2_connection() {
    let (mock, gw, _ca_dir) = https_provider_gateway().await;
    for _ in 0..3 {
        let a = post(&gw, "/openai/v1/chat/completions", &chat("gpt-4o")).await;
        assert_eq!(a.status, 200, "{}", a.text);
    }
    let received = mock.received();
    assert!(received.iter().all(|r| r.version == http::Version::HTTP_2));
    assert!(
        received
            .iter()
            .all(|r| r.connection == received[0].connection)
    );
    assert!(received.iter().all(|r| r.header("host").is_none()));
}

/// Writes `request` on a fresh connection to `addr` and reads one response.
async fn raw_request(addr: SocketAddr, request: &[u8]) -> RawReply {
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(request).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), read_response(&mut conn))
        .await
        .expect("no response within 10 s")
}

/// A response read off the wire.
#[derive(Debug)]
struct RawReply {
    status: u16,
    headers: HashMap<String, String>,
    body: String,
}

impl RawReply {
    fn error(&self, status: u16, kind: &str) {
        assert_eq!(self.status, status, "{self:?}");
        let v: Value = serde_json::from_str(&self.body).unwrap();
        assert_error_shape(
            &v,
            kind,
            self.headers.get("x-request-id").map(String::as_str),
        );
    }
}

async fn read_response(conn: &mut (impl tokio::io::AsyncRead + Unpin)) -> RawReply {
    let mut buf = Vec::new();
    let head_end = loop {
        if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break p;
        }
        let mut chunk = [0u8; 4096];
        let n = conn.read(&mut chunk).await.unwrap();
        assert!(n > 0, "connection closed before a response head");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8(buf[..head_end].to_vec()).unwrap();
    let mut rest = buf[head_end + 4..].to_vec();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers: HashMap<String, String> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let body = if let Some(len) = headers.get("content-length") {
        let len: usize = len.parse().unwrap();
        while rest.len() < len {
            let mut chunk = [0u8; 4096];
            let n = conn.read(&mut chunk).await.unwrap();
            assert!(n > 0, "connection closed inside the body");
            rest.extend_from_slice(&chunk[..n]);
        }
        rest.truncate(len);
        rest
    } else {
        // Chunked or close-delimited: read to the end and decode.
        let _ = conn.read_to_end(&mut rest).await;
        if headers
            .get("transfer-encoding")
            .is_some_and(|t| t.contains("chunked"))
        {
            dechunk(&rest)
        } else {
            rest
        }
    };
    RawReply {
        status,
        headers,
        body: String::from_utf8(body).unwrap(),
    }
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = data.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = std::str::from_utf8(&data[..eol]).unwrap();
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&data[eol + 2..eol + 2 + size]);
        data = &data[eol + 2 + size + 2..];
    }
}

#[tokio::test]
async fn hop_by_hop_headers_are_not_forwarded() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;
    let body = chat("gpt-4o").to_string();
    let request = format!(
        "POST /openai/v1/chat/completions?q=1 HTTP/1.1\r\n\
         Host: {addr}\r\n\
         Content-Type: application/json\r\n\
         Content-Length: {len}\r\n\
         Connection: x-foo, close\r\n\
         X-Foo: hop-value\r\n\
         Keep-Alive: timeout=5\r\n\
         TE: trailers\r\n\
         Upgrade: websocket\r\n\
         Proxy-Authorization: Basic cHJveHk6c2VjcmV0\r\n\
         X-End-To-End: kept\r\n\
         \r\n{body}",
        addr = gw.running.proxy_addr,
        len = body.len()
    );
    let reply = raw_request(gw.running.proxy_addr, request.as_bytes()).await;
    assert_eq!(reply.status, 200, "{reply:?}");
    let r = mock.last();
    for hop in [
        "connection",
        "x-foo",
        "keep-alive",
        "te",
        "upgrade",
        "proxy-authorization",
    ] {
        assert!(r.headers.get(hop).is_none(), "{hop} was forwarded");
    }
    assert!(!header_text(&r).contains("hop-value"));
    assert!(!header_text(&r).contains("cHJveHk6c2VjcmV0"));
    assert_eq!(r.header("x-end-to-end"), Some("kept"));
    assert_eq!(r.path_and_query, "/v1/chat/completions?q=1");
}

/// The headers a client may see on a proxied answer (framing, `date` from
/// the HTTP server, keyrouter's own).
const ALLOWED_HEADERS: [&str; 9] = [
    "content-type",
    "cache-control",
    "content-length",
    "transfer-encoding",
    "date",
    "x-request-id",
    "x-content-type-options",
    "x-frame-options",
    "referrer-policy",
];

fn assert_only_allowed_headers(a: &Answer) {
    for (name, value) in &a.headers {
        assert!(
            ALLOWED_HEADERS.contains(&name.as_str()),
            "{name}: {value:?} reached the client"
        );
    }
    for (name, value) in PROVIDER_HEADERS {
        assert!(a.headers.get(name).is_none_or(|v| v != value), "{name}");
    }
    assert_eq!(a.header("x-content-type-options"), Some("nosniff"));
    assert_eq!(a.header("x-frame-options"), Some("DENY"));
    assert_eq!(a.header("referrer-policy"), Some("no-referrer"));
    assert!(a.headers.get("strict-transport-security").is_none());
}

fn is_generated_request_id(id: &str) -> bool {
    id.starts_with("req_")
        && id.len() > 10
        && id.len() <= 64
        && id != "req_provider_0123456789"
        && id[4..].bytes().all(|b| b.is_ascii_alphanumeric())
}

#[tokio::test]
async fn provider_headers_never_reach_the_client_and_request_ids_are_ours() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;

    let json_answer = post(&gw, "/openai/v1/chat/completions", &chat("gpt-4o")).await;
    assert_eq!(json_answer.status, 200, "{}", json_answer.text);
    assert_only_allowed_headers(&json_answer);
    assert_eq!(json_answer.header("content-type"), Some("application/json"));
    let first = json_answer.header("x-request-id").unwrap().to_owned();
    assert!(is_generated_request_id(&first), "{first}");

    let stream = post(&gw, "/openai/v1/chat/completions", &chat_stream("gpt-4o")).await;
    assert_eq!(stream.status, 200);
    assert_only_allowed_headers(&stream);
    assert_eq!(stream.header("content-type"), Some("text/event-stream"));
    assert_eq!(stream.header("cache-control"), Some("no-cache"));
    let second = stream.header("x-request-id").unwrap();
    assert!(is_generated_request_id(second), "{second}");
    assert_ne!(first, second, "every request gets its own id");

    let anthropic = post(
        &gw,
        "/anthropic/v1/messages",
        &anthropic_body("claude-3-5-sonnet-latest", false),
    )
    .await;
    assert_only_allowed_headers(&anthropic);

    // A well-formed client id is reused, and never sent to the provider.
    let traced = post_with(
        &gw,
        "/openai/v1/chat/completions",
        &chat("gpt-4o"),
        &[("x-request-id", "trace-abc.123_X")],
    )
    .await;
    assert_eq!(traced.header("x-request-id"), Some("trace-abc.123_X"));
    assert!(mock.last().headers.get("x-request-id").is_none());
    // A malformed one is replaced.
    for bad in ["has spaces in it", &"a".repeat(65), "semi;colon"] {
        let a = post_with(
            &gw,
            "/openai/v1/chat/completions",
            &chat("gpt-4o"),
            &[("x-request-id", bad)],
        )
        .await;
        let id = a.header("x-request-id").unwrap();
        assert!(is_generated_request_id(id), "{bad:?} -> {id}");
    }

    // Errors carry the same id in the body.
    let err = Answer::of(
        gw.client()
            .get(gw.proxy_url("/nowhere/v1/models"))
            .header("x-request-id", "client-trace-7")
            .send()
            .await
            .unwrap(),
    )
    .await;
    err.error(404, "not_found");
    assert_eq!(err.header("x-request-id"), Some("client-trace-7"));
    let err = get(&gw, "/nowhere/v1/models").await;
    err.error(404, "not_found");
    assert!(is_generated_request_id(err.header("x-request-id").unwrap()));
}

#[tokio::test]
async fn json_bodies_are_rewritten_and_usage_is_counted() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;
    let openai_key = gw.get("/keys?provider_id=openai").send().await.json()["keys"][0]["id"]
        .as_str()
        .unwrap()
        .to_owned();

    // OpenAI chat completion.
    let a = post(&gw, "/openai/v1/chat/completions", &chat("gpt-4o")).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_no_provider_traces(&a.text);
    let v = a.json();
    let id = v["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-") && id != PROVIDER_ID, "{id}");
    assert_eq!(v["model"], "gpt-4o");
    assert_eq!(v["object"], "chat.completion");
    assert_eq!(
        v["choices"][0]["message"]["content"],
        "Hello from the mock."
    );
    assert_eq!(
        v["usage"],
        json!({"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29})
    );
    for gone in ["system_fingerprint", "service_tier", "x_provider_trace"] {
        assert!(v.get(gone).is_none(), "{gone}: {v}");
    }
    // Each response gets its own id.
    let again = post(&gw, "/openai/v1/chat/completions", &chat("gpt-4o"))
        .await
        .json();
    assert_ne!(again["id"], v["id"]);

    // Embeddings.
    let a = post(
        &gw,
        "/v1/embeddings",
        &json!({"model": "text-embedding-3-small", "input": "hi"}),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_no_provider_traces(&a.text);
    let v = a.json();
    assert_eq!(v["model"], "text-embedding-3-small");
    assert_eq!(v["data"][0]["embedding"], json!([0.1, -0.2, 0.3]));
    assert_eq!(v["usage"], json!({"prompt_tokens": 5, "total_tokens": 5}));

    // Anthropic message.
    let a = post(
        &gw,
        "/anthropic/v1/messages",
        &anthropic_body("claude-3-5-sonnet-latest", false),
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_no_provider_traces(&a.text);
    let v = a.json();
    let id = v["id"].as_str().unwrap();
    assert!(id.starts_with("msg_") && id != ANTHROPIC_ID, "{id}");
    assert_eq!(v["model"], "claude-3-5-sonnet-latest");
    assert_eq!(v["content"][0]["text"], "Hello from the mock.");
    assert_eq!(v["usage"], json!({"input_tokens": 12, "output_tokens": 6}));

    // Metrics: 3 OpenAI requests (19+19+5 prompt, 10+10 completion), 1 Anthropic.
    let openai = [("provider", "openai")];
    eventually_metric(
        &gw,
        "keyrouter_requests_total",
        &[("provider", "openai"), ("code", "200")],
        3.0,
    )
    .await;
    eventually_metric(
        &gw,
        "keyrouter_requests_total",
        &[("provider", "anthropic"), ("code", "200")],
        1.0,
    )
    .await;
    eventually_metric(
        &gw,
        "keyrouter_tokens_total",
        &[("provider", "openai"), ("kind", "prompt")],
        43.0,
    )
    .await;
    eventually_metric(
        &gw,
        "keyrouter_tokens_total",
        &[("provider", "openai"), ("kind", "completion")],
        20.0,
    )
    .await;
    eventually_metric(
        &gw,
        "keyrouter_tokens_total",
        &[("provider", "anthropic"), ("kind", "prompt")],
        12.0,
    )
    .await;
    eventually_metric(
        &gw,
        "keyrouter_tokens_total",
        &[("provider", "anthropic"), ("kind", "completion")],
        6.0,
    )
    .await;
    eventually_metric(
        &gw,
        "keyrouter_key_requests_total",
        &[("provider", "openai"), ("key_id", &openai_key)],
        3.0,
    )
    .await;
    assert_eq!(
        metric(&gw, "keyrouter_upstream_duration_seconds_count", &openai).await,
        3.0
    );
    assert_eq!(
        metric(&gw, "keyrouter_request_duration_seconds_count", &openai).await,
        3.0
    );
    assert!(metric(&gw, "keyrouter_request_duration_seconds_sum", &openai).await > 0.0);
    eventually_metric(&gw, "keyrouter_inflight_requests", &openai, 0.0).await;
    eventually_metric(
        &gw,
        "keyrouter_inflight_requests",
        &[("provider", "anthropic")],
        0.0,
    )
    .await;
}

#[tokio::test]
async fn resources_keep_their_ids_and_lose_account_details() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;

    let a = get(&gw, "/v1/models").await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(
        a.json(),
        json!({
            "object": "list",
            "data": [
                {"id": "gpt-4o", "object": "model", "created": 1715367049, "owned_by": "system"},
                {"id": FINE_TUNED_MODEL, "object": "model", "created": 1721000000, "owned_by": "organization-owner"}
            ]
        })
    );
    assert!(!a.text.contains(MODEL_OWNER_USER), "{}", a.text);

    for id in ["gpt-4o", FINE_TUNED_MODEL] {
        let a = get(&gw, &format!("/openai/v1/models/{id}")).await;
        assert_eq!(a.status, 200, "{}", a.text);
        let v = a.json();
        assert_eq!(v["id"], id);
        assert_eq!(v["object"], "model");
        assert_ne!(v["owned_by"], ORGANIZATION);
        assert!(!a.text.contains(ORGANIZATION), "{}", a.text);
    }

    // A fine-tuning job: its id, its base model and the file it names are
    // what the client reuses; the organisation is not the client's business.
    let a = get(&gw, &format!("/v1/fine_tuning/jobs/{FINE_TUNING_JOB_ID}")).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let v = a.json();
    assert_eq!(v["id"], FINE_TUNING_JOB_ID);
    assert_eq!(v["model"], "gpt-4o-mini-2024-07-18");
    assert_eq!(v["training_file"], FILE_ID);
    assert!(v.get("organization_id").is_none(), "{v}");
    assert!(!a.text.contains(ORGANIZATION), "{}", a.text);

    let a = get(&gw, &format!("/v1/files/{FILE_ID}")).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_eq!(a.json(), file_object());

    // Resources report no usage of this request.
    eventually_metric(
        &gw,
        "keyrouter_requests_total",
        &[("provider", "openai"), ("code", "200")],
        5.0,
    )
    .await;
    assert_eq!(
        metric(&gw, "keyrouter_tokens_total", &[("provider", "openai")]).await,
        0.0
    );
}

/// The `responseId` of every Gemini answer or chunk in `chunks`: one
/// keyrouter id for the whole answer, never the provider's. Checks each
/// names the model of the path.
fn gemini_response_id(chunks: &[Value]) -> String {
    let id = chunks[0]["responseId"].as_str().unwrap().to_owned();
    assert!(!id.is_empty() && id != GEMINI_RESPONSE_ID, "{id}");
    for chunk in chunks {
        assert_eq!(chunk["responseId"], id.as_str(), "one id per answer");
        assert_eq!(chunk["modelVersion"], "gemini-1.5-pro");
    }
    id
}

#[tokio::test]
async fn gemini_answers_get_our_id_the_path_model_and_count_tokens() {
    let mock = MockUpstream::start().await;
    let gw = TestGateway::builder()
        .providers(&provider("gemini", "gemini", &mock.url, ""))
        .start()
        .await;
    let key = gw
        .post(
            "/keys",
            json!({"key_material": GEMINI_KEY, "provider_id": "gemini", "limits": {"tpm": 100000}}),
        )
        .send()
        .await;
    assert_eq!(key.status, 201, "{}", key.text);
    let key_id = key.json()["id"].as_str().unwrap().to_owned();
    let body = json!({"contents": [{"parts": [{"text": "hi"}]}]});
    let base = "/gemini/v1beta/models/gemini-1.5-pro";

    // generateContent: 4 prompt, 5 answer + 3 thinking tokens.
    let a = post(&gw, &format!("{base}:generateContent"), &body).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_no_provider_traces(&a.text);
    let v = a.json();
    let first = gemini_response_id(std::slice::from_ref(&v));
    assert_eq!(
        v["candidates"][0]["content"]["parts"][0]["text"],
        "Hello from the mock."
    );
    assert_eq!(v["usageMetadata"]["totalTokenCount"], 12);
    // The tpm window holds what the provider reported, not the
    // reservation made before (input estimate + 512 output tokens).
    let used =
        gw.get(&format!("/keys/{key_id}")).send().await.json()["usage"]["tokens_last_minute"]
            .as_u64()
            .unwrap();
    assert!((1..=12).contains(&used), "tokens_last_minute {used}");

    // streamGenerateContent as SSE and as one JSON array: 4 + 2 each.
    let a = post(&gw, &format!("{base}:streamGenerateContent?alt=sse"), &body).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_no_provider_traces(&a.text);
    let events: Vec<Value> = parse_sse(&a.text).iter().map(Event::json).collect();
    assert_eq!(events.len(), 2, "{}", a.text);
    let streamed = gemini_response_id(&events);
    let a = post(&gw, &format!("{base}:streamGenerateContent"), &body).await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_no_provider_traces(&a.text);
    let chunks = a.json().as_array().unwrap().clone();
    assert_eq!(chunks.len(), 2, "{}", a.text);
    let arrayed = gemini_response_id(&chunks);
    assert!(first != streamed && streamed != arrayed && first != arrayed);

    let gemini = |kind| [("provider", "gemini"), ("kind", kind)];
    eventually_metric(&gw, "keyrouter_tokens_total", &gemini("prompt"), 12.0).await;
    eventually_metric(&gw, "keyrouter_tokens_total", &gemini("completion"), 12.0).await;
}

#[tokio::test]
async fn strip_usage_removes_usage_but_still_counts_tokens() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "[sanitize]\nstrip_usage = true").await;
    let v = post(&gw, "/openai/v1/chat/completions", &chat("gpt-4o"))
        .await
        .json();
    assert!(v.get("usage").is_none(), "{v}");
    assert_eq!(v["model"], "gpt-4o");
    let v = post(
        &gw,
        "/anthropic/v1/messages",
        &anthropic_body("claude-3-5-sonnet-latest", false),
    )
    .await
    .json();
    assert!(v.get("usage").is_none(), "{v}");
    let text = post(&gw, "/openai/v1/chat/completions", &chat_stream("gpt-4o"))
        .await
        .text;
    assert!(!text.contains("usage"), "{text}");
    assert!(text.contains("data: [DONE]"));
    eventually_metric(
        &gw,
        "keyrouter_tokens_total",
        &[("provider", "openai"), ("kind", "prompt")],
        28.0,
    )
    .await;
}

/// Checks an OpenAI stream as the client got it: every event rewritten,
/// one keyrouter id for the whole stream, the text and `[DONE]` intact.
fn assert_openai_stream(text: &str, model: &str) {
    assert_no_provider_traces(text);
    let events = parse_sse(text);
    assert_eq!(events.len(), 6, "{text}");
    assert_eq!(events.last().unwrap().data, "[DONE]");
    let chunks: Vec<Value> = events[..5].iter().map(Event::json).collect();
    let id = chunks[0]["id"].as_str().unwrap();
    assert!(id.starts_with("chatcmpl-") && id != PROVIDER_ID, "{id}");
    let mut content = String::new();
    for c in &chunks {
        assert_eq!(c["id"], id, "one id for the whole stream");
        assert_eq!(c["model"], model);
        assert_eq!(c["object"], "chat.completion.chunk");
        if let Some(t) = c["choices"][0]["delta"]["content"].as_str() {
            content.push_str(t);
        }
    }
    assert_eq!(content, "Hello world");
    assert_eq!(
        chunks[4]["usage"],
        json!({"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13})
    );
}

/// Checks an Anthropic stream: event names kept, message id and model
/// rewritten inside `message_start`, usage kept.
fn assert_anthropic_stream(text: &str, model: &str) {
    assert_no_provider_traces(text);
    let events = parse_sse(text);
    let names: Vec<&str> = events.iter().map(|e| e.name.as_deref().unwrap()).collect();
    assert_eq!(
        names,
        [
            "message_start",
            "content_block_start",
            "ping",
            "content_block_delta",
            "content_block_stop",
            "message_delta",
            "message_stop"
        ]
    );
    let start = events[0].json();
    let id = start["message"]["id"].as_str().unwrap();
    assert!(id.starts_with("msg_") && id != ANTHROPIC_ID, "{id}");
    assert_eq!(start["message"]["model"], model);
    assert_eq!(
        start["message"]["usage"],
        json!({"input_tokens": 25, "output_tokens": 1})
    );
    assert_eq!(events[3].json()["delta"]["text"], "Hello");
    assert_eq!(events[5].json()["usage"]["output_tokens"], 15);
    for e in &events {
        assert_eq!(e.json()["type"], e.name.as_deref().unwrap());
    }
}

#[tokio::test]
async fn streams_are_rewritten_event_by_event_and_counted() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;

    let a = post(
        &gw,
        "/openai/v1/chat/completions",
        &chat_stream("gpt-4o-mini"),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_openai_stream(&a.text, "gpt-4o-mini");

    let a = post(
        &gw,
        "/anthropic/v1/messages",
        &anthropic_body("claude-3-5-haiku-latest", true),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_anthropic_stream(&a.text, "claude-3-5-haiku-latest");

    // Gemini streams use CRLF line ends.
    let a = post(
        &gw,
        "/gemini/v1beta/models/gemini-1.5-pro:streamGenerateContent?alt=sse&key=CLIENTKEY",
        &json!({"contents": [{"parts": [{"text": "hi"}]}]}),
    )
    .await;
    assert_eq!(a.status, 200);
    assert_no_provider_traces(&a.text);
    let events = parse_sse(&a.text);
    assert_eq!(events.len(), 2, "{}", a.text);
    assert_eq!(events[1].json()["candidates"][0]["finishReason"], "STOP");

    eventually_metric(
        &gw,
        "keyrouter_tokens_total",
        &[("provider", "openai"), ("kind", "prompt")],
        9.0,
    )
    .await;
    eventually_metric(
        &gw,
        "keyrouter_tokens_total",
        &[("provider", "openai"), ("kind", "completion")],
        4.0,
    )
    .await;
    eventually_metric(
        &gw,
        "keyrouter_tokens_total",
        &[("provider", "anthropic"), ("kind", "prompt")],
        25.0,
    )
    .await;
    eventually_metric(
        &gw,
        "keyrouter_tokens_total",
        &[("provider", "anthropic"), ("kind", "completion")],
        15.0,
    )
    .await;
    eventually_metric(
        &gw,
        "keyrouter_requests_total",
        &[("provider", "openai"), ("code", "200")],
        1.0,
    )
    .await;
    eventually_metric(
        &gw,
        "keyrouter_requests_total",
        &[("provider", "anthropic"), ("code", "200")],
        1.0,
    )
    .await;
    nothing_in_flight(&gw).await;
}

#[tokio::test]
async fn streams_split_into_tiny_fragments_are_still_rewritten() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;
    for size in ["7", "1"] {
        let fragment = [("x-mock-fragment", size)];
        let a = post_with(
            &gw,
            "/openai/v1/chat/completions",
            &chat_stream("gpt-4o-mini"),
            &fragment,
        )
        .await;
        assert_eq!(a.status, 200);
        assert_openai_stream(&a.text, "gpt-4o-mini");
        let a = post_with(
            &gw,
            "/anthropic/v1/messages",
            &anthropic_body("claude-3-5-haiku-latest", true),
            &fragment,
        )
        .await;
        assert_eq!(a.status, 200);
        assert_anthropic_stream(&a.text, "claude-3-5-haiku-latest");
    }
    eventually_metric(
        &gw,
        "keyrouter_tokens_total",
        &[("provider", "anthropic"), ("kind", "completion")],
        30.0,
    )
    .await;
}

#[tokio::test]
async fn stream_comments_lose_their_text_and_event_ids_go() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;
    for fragment in ["0", "3"] {
        let a = post_with(
            &gw,
            "/openai/v1/chat/completions",
            &chat_stream("gpt-4o-mini"),
            &[("x-mock-decorate", "1"), ("x-mock-fragment", fragment)],
        )
        .await;
        assert_eq!(a.status, 200);
        assert_openai_stream(&a.text, "gpt-4o-mini");
        for trace in STREAM_DECORATION {
            assert!(
                !a.text.contains(trace),
                "{trace} reached the client: {}",
                a.text
            );
        }
        let lines: Vec<&str> = a.text.lines().collect();
        assert!(!lines.iter().any(|l| l.starts_with("id")), "{}", a.text);
        // Comments stay as bare keep-alives; the retry hint stays.
        let comments = lines.iter().filter(|l| l.starts_with(':')).count();
        assert_eq!(comments, 7, "{}", a.text);
        assert!(lines.iter().all(|l| !l.starts_with(':') || *l == ":"));
        assert_eq!(lines.iter().filter(|l| **l == "retry: 3000").count(), 1);
    }
}

#[tokio::test]
async fn ollama_native_answers_get_the_asked_model_and_count_tokens() {
    let mock = MockUpstream::start().await;
    let gw = gateway_with(provider("ollama", "openai_compatible", &mock.url, ""), "").await;
    gw.register_key("ollama", "ollama-key-0123456789").await;
    let asked = |stream: Option<bool>| {
        let mut body =
            json!({"model": "llama3.2", "messages": [{"role": "user", "content": "hi"}]});
        if let Some(s) = stream {
            body["stream"] = s.into();
        }
        body
    };
    // Ollama streams unless told not to; every line gets the asked model.
    for (path, text_of) in [
        ("/ollama/api/chat", "/message/content"),
        ("/ollama/api/generate", "/response"),
    ] {
        let a = post(&gw, path, &asked(None)).await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(a.header("content-type"), Some("application/x-ndjson"));
        assert!(!a.text.contains(OLLAMA_MODEL), "{}", a.text);
        let lines: Vec<Value> = a
            .text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 3, "{}", a.text);
        let text: String = lines
            .iter()
            .filter_map(|l| l.pointer(text_of)?.as_str())
            .collect();
        assert_eq!(text, "Hello world");
        assert!(lines.iter().all(|l| l["model"] == "llama3.2"), "{}", a.text);
        assert_eq!(lines[2]["done"], true);
        assert_eq!(
            (
                lines[2]["prompt_eval_count"].clone(),
                lines[2]["eval_count"].clone()
            ),
            (json!(26), json!(2))
        );
    }
    let whole = post(&gw, "/ollama/api/chat", &asked(Some(false))).await;
    assert_eq!(whole.status, 200, "{}", whole.text);
    assert_eq!(whole.json()["model"], "llama3.2");
    assert_eq!(whole.json()["message"]["content"], "Hello world");
    let embed = post(
        &gw,
        "/ollama/api/embed",
        &json!({"model": "all-minilm", "input": "hi"}),
    )
    .await;
    assert_eq!(embed.status, 200, "{}", embed.text);
    assert_eq!(embed.json()["model"], "all-minilm");
    assert!(!embed.text.contains(OLLAMA_MODEL), "{}", embed.text);

    // Three answers of 26 + 2 tokens, and the embedding's 8.
    for (kind, tokens) in [("prompt", 3.0 * 26.0 + 8.0), ("completion", 3.0 * 2.0)] {
        eventually_metric(
            &gw,
            "keyrouter_tokens_total",
            &[("provider", "ollama"), ("kind", kind)],
            tokens,
        )
        .await;
    }

    // With `strip_usage` the counts leave the answer and are still counted.
    let stripping = gateway_with(
        provider("ollama", "openai_compatible", &mock.url, ""),
        "[sanitize]\nstrip_usage = true\n",
    )
    .await;
    stripping
        .register_key("ollama", "ollama-key-0123456789")
        .await;
    let a = post(&stripping, "/ollama/api/chat", &asked(None)).await;
    assert_eq!(a.status, 200, "{}", a.text);
    let last: Value = serde_json::from_str(a.text.lines().last().unwrap()).unwrap();
    assert_eq!(last["done"], true, "{}", a.text);
    assert!(!a.text.contains("eval_count"), "{}", a.text);
    eventually_metric(
        &stripping,
        "keyrouter_tokens_total",
        &[("provider", "ollama"), ("kind", "prompt")],
        26.0,
    )
    .await;
}

#[tokio::test]
async fn json_lines_streams_are_rewritten_line_by_line() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;
    for (kind, content_type, fragment) in [
        ("ndjson", "application/x-ndjson", "0"),
        ("jsonl", "application/jsonl", "1"),
    ] {
        let a = post_with(
            &gw,
            "/openai/v1/chat/completions",
            &chat_stream("gpt-4o-mini"),
            &[("x-mock-lines", kind), ("x-mock-fragment", fragment)],
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert_eq!(a.header("content-type"), Some(content_type));
        assert_no_provider_traces(&a.text);
        let lines: Vec<Value> = a
            .text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
            .collect();
        // The last line came without a newline and is rewritten too.
        assert_eq!(lines.len(), 5, "{}", a.text);
        let id = lines[0]["id"].as_str().unwrap();
        assert!(id.starts_with("chatcmpl-") && id != PROVIDER_ID, "{id}");
        let mut content = String::new();
        for line in &lines {
            assert_eq!(line["id"], id, "one id for the whole stream");
            assert_eq!(line["model"], "gpt-4o-mini");
            content.push_str(
                line["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap_or(""),
            );
        }
        assert_eq!(content, "Hello world");
        assert_eq!(lines[4]["usage"]["completion_tokens"], 4);
    }
    eventually_metric(
        &gw,
        "keyrouter_tokens_total",
        &[("provider", "openai"), ("kind", "prompt")],
        18.0,
    )
    .await;
    eventually_metric(
        &gw,
        "keyrouter_requests_total",
        &[("provider", "openai"), ("code", "200")],
        2.0,
    )
    .await;
}

/// Reads the body until the first complete SSE event; returns it and what/// Reads the body until the first complete SSE event; returns it and what
/// else arrived with it.
async fn first_event(resp: &mut reqwest::Response) -> String {
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = resp.chunk().await.unwrap().expect("stream ended early");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    text
}

#[tokio::test]
async fn the_first_event_reaches_the_client_before_the_stream_ends() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;
    let started = Instant::now();
    let mut resp = openai_stream_with(&gw, "x-mock-pause-ms", "1500").await;
    assert_eq!(resp.status(), 200);
    let mut text = first_event(&mut resp).await;
    let first = started.elapsed();
    assert!(
        first < Duration::from_millis(1000),
        "first event after {first:?}"
    );
    let event = &parse_sse(&text)[0];
    assert_eq!(event.json()["model"], "gpt-4o");
    assert!(!event.data.contains("PROVIDERID"));
    while let Some(chunk) = resp.chunk().await.unwrap() {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let total = started.elapsed();
    assert!(
        total >= Duration::from_millis(1500),
        "whole stream after {total:?}"
    );
    assert_openai_stream(&text, "gpt-4o");
}

/// While a graceful stop drains open requests, monitoring still reaches
/// the ops listener: `/healthz` 200, `/readyz` 503 (take no new traffic),
/// `/metrics` scraped; it closes once the stop is over. A stream the drain
/// cut off counts as 503 (the gateway's doing), not as its client leaving.
#[tokio::test]
async fn the_ops_listener_answers_through_the_drain() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "[server]\nshutdown_drain = \"2s\"").await;
    let mut held = openai_stream_with(&gw, "x-mock-hold", "1").await;
    first_event(&mut held).await;
    let ops = gw.ops.clone();
    let client = reqwest::Client::new();
    let status = |path: &str| {
        let req = client.get(format!("{ops}{path}"));
        async move { req.send().await.map(|r| r.status().as_u16()) }
    };
    assert_eq!(status("/readyz").await.unwrap(), 200);
    let app = gw.app().clone();
    let stopping = tokio::spawn(gw.stop());
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !stopping.is_finished(),
        "the held stream keeps the drain busy"
    );
    assert_eq!(status("/healthz").await.unwrap(), 200);
    assert_eq!(status("/readyz").await.unwrap(), 503);
    assert_eq!(status("/metrics").await.unwrap(), 200);
    stopping.await.unwrap();
    assert!(
        status("/healthz").await.is_err(),
        "still listening after the stop"
    );
    let metrics = String::from_utf8(app.metrics.render()).unwrap();
    let line =
        |code: &str| format!("keyrouter_requests_total{{code=\"{code}\",provider=\"openai\"}} 1");
    assert!(metrics.contains(&line("503")), "{metrics}");
    assert!(!metrics.contains(&line("499")), "{metrics}");
}

#[tokio::test]
async fn a_client_leaving_mid_stream_closes_the_upstream_stream() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;
    let mut resp = gw
        .client()
        .post(gw.proxy_url("/anthropic/v1/messages"))
        .header("x-mock-hold", "1")
        .json(&anthropic_body("claude-3-5-sonnet-latest", true))
        .send()
        .await
        .unwrap();
    first_event(&mut resp).await;
    assert_eq!(mock.open_streams(), 1);
    assert_eq!(
        metric(
            &gw,
            "keyrouter_inflight_requests",
            &[("provider", "anthropic")]
        )
        .await,
        1.0
    );
    drop(resp);

    let deadline = Instant::now() + Duration::from_secs(5);
    while mock.open_streams() > 0 || mock.open_connections() > 0 {
        assert!(
            Instant::now() < deadline,
            "upstream still open: {} streams, {} connections",
            mock.open_streams(),
            mock.open_connections()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    eventually_metric(
        &gw,
        "keyrouter_inflight_requests",
        &[("provider", "anthropic")],
        0.0,
    )
    .await;
    eventually_metric(
        &gw,
        "keyrouter_requests_total",
        &[("provider", "anthropic"), ("code", "499")],
        1.0,
    )
    .await;
    assert_eq!(
        metric(
            &gw,
            "keyrouter_requests_total",
            &[("provider", "anthropic"), ("code", "200")]
        )
        .await,
        0.0
    );
}

#[tokio::test]
async fn oversized_bodies_are_refused_with_and_without_content_length() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "[server]\nmax_body_bytes = 1024").await;
    let big = json!({"model": "gpt-4o", "input": "x".repeat(2000)});

    let a = post(&gw, "/openai/v1/embeddings", &big).await;
    a.error(413, "payload_too_large");

    // Chunked: no Content-Length, the limit is found while reading.
    let chunks: Vec<Result<Bytes, std::io::Error>> =
        (0..4).map(|_| Ok(Bytes::from(vec![b'x'; 600]))).collect();
    let resp = gw
        .client()
        .post(gw.proxy_url("/openai/v1/embeddings"))
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            chunks,
        )))
        .send()
        .await
        .unwrap();
    Answer::of(resp).await.error(413, "payload_too_large");

    // A body at the limit passes.
    let small = json!({"model": "gpt-4o", "input": "x".repeat(900)});
    assert!(small.to_string().len() <= 1024);
    assert_eq!(post(&gw, "/openai/v1/embeddings", &small).await.status, 200);
    assert_eq!(
        mock.received().len(),
        1,
        "oversized bodies never went upstream"
    );
}

#[tokio::test]
async fn a_body_given_up_half_read_closes_the_connection_and_says_so() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "[server]\nmax_body_bytes = 1024").await;
    let addr = gw.running.proxy_addr;
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    // Announced larger than the limit, and only its start sent.
    conn.write_all(format!("{}{{\"model\":", chat_head(addr, 4000)).as_bytes())
        .await
        .unwrap();
    let reply = read_response(&mut conn).await;
    reply.error(413, "payload_too_large");
    assert_eq!(
        reply.headers.get("connection").map(String::as_str),
        Some("close")
    );
    let mut rest = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), conn.read_to_end(&mut rest))
        .await
        .expect("the connection stayed open")
        .unwrap();

    // Refused before its body is read, a request whose small body came
    // whole keeps its connection: hyper reads the rest.
    let body = r#"{"model":"gpt-4o"}"#;
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    for _ in 0..2 {
        let request = format!(
            "POST /nowhere/v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\n\
             Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        conn.write_all(request.as_bytes()).await.unwrap();
        let reply = read_response(&mut conn).await;
        reply.error(404, "not_found");
        assert_eq!(reply.headers.get("connection"), None);
    }
}

/// The head of a raw chat request announcing a body of `len` bytes.
fn chat_head(addr: SocketAddr, len: usize) -> String {
    format!(
        "POST /openai/v1/chat/completions HTTP/1.1\r\nHost: {addr}\r\n\
         Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n"
    )
}

#[tokio::test]
async fn a_client_trickling_its_body_gets_408_and_is_disconnected() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "[server]\nbody_read_timeout = \"300ms\"").await;
    let addr = gw.running.proxy_addr;
    // The answer, then the end of the connection: the rest of the body is
    // not waited for.
    let (answer, took) = common::trickle_body(addr, &format!("{}{{", chat_head(addr, 1000))).await;
    assert!(took >= Duration::from_millis(250));
    read_response(&mut &answer[..])
        .await
        .error(408, "invalid_request");
    let answers = answer.windows(9).filter(|w| w == b"HTTP/1.1 ").count();
    assert_eq!(answers, 1, "{}", String::from_utf8_lossy(&answer));

    assert!(mock.received().is_empty(), "a partial body went upstream");
    let labels = [("provider", "openai"), ("code", "408")];
    eventually_metric(&gw, "keyrouter_requests_total", &labels, 1.0).await;
    nothing_in_flight(&gw).await;
}

#[tokio::test]
async fn bodies_beyond_the_shared_memory_budget_get_503_until_memory_frees() {
    let mock = MockUpstream::start().await;
    // Two proxy threads: the budget is the listener's, whichever thread
    // serves a connection.
    let gw = gateway(
        &mock,
        "[server]\nmax_body_bytes = 1024\nmax_buffered_body_bytes = 1024\nworkers = 2",
    )
    .await;
    let addr = gw.running.proxy_addr;
    let held = chat("gpt-4o").to_string() + &" ".repeat(900);
    let (first, last) = held.as_bytes().split_at(900);
    // This client sends 900 bytes of its body and waits.
    let mut holder = tokio::net::TcpStream::connect(addr).await.unwrap();
    holder
        .write_all(chat_head(addr, held.len()).as_bytes())
        .await
        .unwrap();
    holder.write_all(first).await.unwrap();
    // Its 900 bytes are read (and held) before another body competes for
    // the budget; had the other come first, this one would be refused.
    tokio::time::sleep(Duration::from_millis(200)).await;

    // Another client's 200 bytes fit once the first's 900 are in memory
    // no more.
    let small = json!({"model": "gpt-4o", "input": "x".repeat(150)});
    let deadline = Instant::now() + Duration::from_secs(5);
    let refused = loop {
        let a = post(&gw, "/openai/v1/embeddings", &small).await;
        if a.status != 200 {
            break a;
        }
        assert!(
            Instant::now() < deadline,
            "the held body never counted against the budget"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    refused.error(503, "internal_error");
    assert_eq!(refused.retry_after(), 1);

    // The held request completes, and its memory is available again.
    holder.write_all(last).await.unwrap();
    let reply = tokio::time::timeout(Duration::from_secs(5), read_response(&mut holder))
        .await
        .expect("the held request got no answer");
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(post(&gw, "/openai/v1/embeddings", &small).await.status, 200);
    assert_eq!(
        metric(
            &gw,
            "keyrouter_requests_total",
            &[("provider", "openai"), ("code", "503")]
        )
        .await,
        1.0
    );
}

#[tokio::test]
async fn traversal_foreign_targets_and_unknown_prefixes_are_refused() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;
    let addr = gw.running.proxy_addr;
    for target in [
        "/openai/../admin",
        "/openai/v1/../../admin/v1/keys",
        "/openai/v1/%2e%2e/x",
        "/openai/v1/%2E%2e/x",
        "/openai/v1/.%2e/x",
        "/openai/v1%2fmodels",
        "/openai/v1/a%2Fb",
        "/openai/v1%5cmodels",
        "/v1/./models",
    ] {
        let reply = raw_request(
            addr,
            format!("GET {target} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await;
        reply.error(400, "invalid_request");
    }
    // An absolute-form target for another host.
    let reply = raw_request(
        addr,
        format!(
            "GET http://evil.example/openai/v1/models HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    reply.error(400, "invalid_request");
    // As a forward proxy's client sends it: `Host` names the target too.
    let reply = raw_request(
        addr,
        b"GET http://api.openai.com/v1/models HTTP/1.1\r\nHost: api.openai.com\r\nConnection: close\r\n\r\n",
    )
    .await;
    reply.error(400, "invalid_request");
    // The same form naming this gateway is an ordinary request.
    let reply = raw_request(
        addr,
        format!(
            "GET http://{addr}/openai/v1/models HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(reply.status, 200, "{reply:?}");
    assert_eq!(mock.received().len(), 1);
    assert_eq!(mock.last().path_and_query, "/v1/models");

    for path in [
        "/unknown/v1/models",
        "/openaix/v1/models",
        "/v2/models",
        "/",
    ] {
        get(&gw, path).await.error(404, "not_found");
    }
    assert_eq!(
        mock.received().len(),
        1,
        "refused requests never went upstream"
    );
}

#[tokio::test]
async fn a_provider_that_does_not_answer_is_a_timeout() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "[server]\nupstream_first_byte_timeout = \"500ms\"").await;
    let started = Instant::now();
    let a = post_with(
        &gw,
        "/openai/v1/chat/completions",
        &chat("gpt-4o"),
        &[("x-mock-hang", "1")],
    )
    .await;
    a.error(504, "upstream_timeout");
    assert!(started.elapsed() >= Duration::from_millis(500));
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    nothing_in_flight(&gw).await;
}

#[tokio::test]
async fn provider_failures_and_compressed_bodies_are_upstream_errors() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;
    let a = post_with(
        &gw,
        "/openai/v1/chat/completions",
        &chat("gpt-4o"),
        &[("x-mock-status", "500")],
    )
    .await;
    let message = a.error(502, "upstream_error");
    assert!(!message.contains("processing your request"), "{message}");
    assert_only_allowed_headers(&a);

    // A gzip body (never asked for) is refused, not passed on unsanitized.
    for path in ["/openai/v1/chat/completions", "/anthropic/v1/messages"] {
        let a = post_with(&gw, path, &chat("gpt-4o"), &[("x-mock-gzip", "1")]).await;
        a.error(502, "upstream_error");
        assert!(a.headers.get("content-encoding").is_none());
        assert_no_provider_traces(&a.text);
    }
    let stream = post_with(
        &gw,
        "/openai/v1/chat/completions",
        &chat_stream("gpt-4o"),
        &[("x-mock-gzip", "1")],
    )
    .await;
    stream.error(502, "upstream_error");
}

/// A provider that leaves out `Content-Type` cannot pass its ids through:
/// the body is judged by how it opens.
#[tokio::test]
async fn answers_without_a_content_type_are_sanitized_by_how_they_open() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;
    let unlabelled = [("x-mock-unlabelled", "1")];

    let a = post_with(
        &gw,
        "/openai/v1/chat/completions",
        &chat("gpt-4o"),
        &unlabelled,
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert!(a.header("content-type").is_none());
    assert_no_provider_traces(&a.text);
    let v = a.json();
    assert_eq!(v["model"], "gpt-4o");
    assert!(v["id"].as_str().unwrap().starts_with("chatcmpl-"));

    let stream = post_with(
        &gw,
        "/openai/v1/chat/completions",
        &chat_stream("gpt-4o"),
        &unlabelled,
    )
    .await;
    assert_eq!(stream.status, 200, "{}", stream.text);
    assert_no_provider_traces(&stream.text);
    assert!(
        stream.text.contains("\"model\":\"gpt-4o\""),
        "{}",
        stream.text
    );
    assert!(stream.text.ends_with("data: [DONE]\n\n"), "{}", stream.text);

    // One cut short is refused like a labelled one.
    let cut = post_with(
        &gw,
        "/openai/v1/chat/completions",
        &chat("gpt-4o"),
        &[("x-mock-unlabelled", "1"), ("x-mock-cut-json", "1")],
    )
    .await;
    cut.error(502, "upstream_error");
    assert_no_provider_traces(&cut.text);
}

#[tokio::test]
async fn answers_the_provider_breaks_off_count_as_upstream_errors() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;
    let broken = [("x-mock-truncate", "1")];

    // A JSON body cut short: a gateway error, accounted once, to the provider.
    let a = post_with(&gw, "/openai/v1/chat/completions", &chat("gpt-4o"), &broken).await;
    a.error(502, "upstream_error");
    assert_no_provider_traces(&a.text);
    let openai_502 = [("provider", "openai"), ("code", "502")];
    eventually_metric(&gw, "keyrouter_requests_total", &openai_502, 1.0).await;
    nothing_in_flight(&gw).await;
    for code in ["200", "499"] {
        let labels = [("provider", "openai"), ("code", code)];
        assert_eq!(
            metric(&gw, "keyrouter_requests_total", &labels).await,
            0.0,
            "{code}"
        );
    }
    assert_eq!(
        gw.metric("keyrouter_requests_total", &[("provider", "none")])
            .await,
        None,
        "a routed request counted as unrouted"
    );

    // A stream cut short: the events that came are rewritten, the client
    // sees the stream break, and the request counts as an error.
    let resp = openai_stream_with(&gw, "x-mock-truncate", "1").await;
    assert_eq!(resp.status(), 200);
    let mut resp = resp;
    let mut text = String::new();
    let outcome = loop {
        match resp.chunk().await {
            Ok(Some(chunk)) => text.push_str(std::str::from_utf8(&chunk).unwrap()),
            Ok(None) => break Ok(()),
            Err(e) => break Err(e),
        }
    };
    assert!(outcome.is_err(), "the client saw a complete stream: {text}");
    assert!(!text.contains("[DONE]"));
    assert_no_provider_traces(&text);
    assert!(!parse_sse(&text).is_empty());
    eventually_metric(&gw, "keyrouter_requests_total", &openai_502, 2.0).await;
    nothing_in_flight(&gw).await;
}

/// A gateway whose only provider is OpenAI at `mock`, with one key that
/// serves one request at a time, cutting provider bodies off after 1 s of
/// silence.
async fn one_slot_gateway(mock: &MockUpstream) -> TestGateway {
    let gw = TestGateway::builder()
        .providers(&provider("openai", "openai", &mock.url, ""))
        .toml("[server]\nupstream_read_timeout = \"1s\"")
        .start()
        .await;
    let reply = gw
        .post(
            "/keys",
            json!({"key_material": OPENAI_KEY, "provider_id": "openai", "limits": {"max_concurrent": 1}}),
        )
        .send()
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text);
    gw
}

#[tokio::test]
async fn a_stream_the_provider_stalls_is_cut_off_and_frees_its_key() {
    let mock = MockUpstream::start().await;
    let gw = one_slot_gateway(&mock).await;
    let mut resp = openai_stream_with(&gw, "x-mock-hold", "1").await;
    assert_eq!(resp.status(), 200);
    let mut text = first_event(&mut resp).await;
    let silent_since = Instant::now();
    // While the stream is open it holds the key's only slot.
    post(&gw, "/openai/v1/chat/completions", &chat("gpt-4o"))
        .await
        .error(429, "rate_limit_exceeded");

    let outcome = tokio::time::timeout(Duration::from_secs(5), async {
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => text.push_str(std::str::from_utf8(&chunk).unwrap()),
                Ok(None) => break Ok(()),
                Err(e) => break Err(e),
            }
        }
    })
    .await
    .expect("the stalled stream was never cut off");
    assert!(outcome.is_err(), "the client saw a complete stream: {text}");
    let silent = silent_since.elapsed();
    assert!(silent >= Duration::from_millis(900), "cut after {silent:?}");
    assert!(silent < Duration::from_secs(4), "cut after {silent:?}");
    assert_eq!(parse_sse(&text).len(), 1, "{text}");
    assert_no_provider_traces(&text);

    // The slot, the request and the provider connection are released.
    assert_eq!(
        post(&gw, "/openai/v1/chat/completions", &chat("gpt-4o"))
            .await
            .status,
        200
    );
    let stalled = [("provider", "openai"), ("code", "504")];
    eventually_metric(&gw, "keyrouter_requests_total", &stalled, 1.0).await;
    nothing_in_flight(&gw).await;
    provider_streams_closed(&mock).await;
}

#[tokio::test]
async fn a_json_answer_the_provider_stalls_is_a_timeout() {
    let mock = MockUpstream::start().await;
    let gw = one_slot_gateway(&mock).await;
    let started = Instant::now();
    let a = tokio::time::timeout(
        Duration::from_secs(5),
        post_with(
            &gw,
            "/openai/v1/chat/completions",
            &chat("gpt-4o"),
            &[("x-mock-stall", "1")],
        ),
    )
    .await
    .expect("the stalled answer was never cut off");
    a.error(504, "upstream_timeout");
    assert_no_provider_traces(&a.text);
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(
        started.elapsed() < Duration::from_secs(4),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(mock.received().len(), 1, "a stall is not retried");
    // The key's only slot is free again.
    assert_eq!(
        post(&gw, "/openai/v1/chat/completions", &chat("gpt-4o"))
            .await
            .status,
        200
    );
    let labels = [("provider", "openai"), ("code", "504")];
    eventually_metric(&gw, "keyrouter_requests_total", &labels, 1.0).await;
}

#[tokio::test]
async fn a_stream_longer_than_the_read_timeout_that_keeps_sending_is_not_cut() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "[server]\nupstream_read_timeout = \"200ms\"").await;
    let started = Instant::now();
    // Frames of 4 bytes about 1 ms apart: a second or more in all.
    let a = post_with(
        &gw,
        "/openai/v1/chat/completions",
        &chat_stream("gpt-4o"),
        &[("x-mock-fragment", "4")],
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(started.elapsed() > Duration::from_millis(200));
    assert_openai_stream(&a.text, "gpt-4o");
}

#[tokio::test]
async fn a_stream_event_larger_than_the_body_limit_ends_the_stream() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "[server]\nmax_body_bytes = 65536").await;
    let mut resp = openai_stream_with(&gw, "x-mock-unterminated", "262144").await;
    assert_eq!(resp.status(), 200);
    // The provider never ends its second event and then goes silent: the
    // client sees the stream break off instead of waiting while keyrouter
    // buffers.
    let read = async {
        let mut text = String::new();
        loop {
            match resp.chunk().await {
                Ok(Some(chunk)) => text.push_str(std::str::from_utf8(&chunk).unwrap()),
                Ok(None) => break (text, Ok(())),
                Err(e) => break (text, Err(e)),
            }
        }
    };
    let (text, outcome) = tokio::time::timeout(Duration::from_secs(10), read)
        .await
        .expect("the stream neither ended nor broke off");
    assert!(outcome.is_err(), "the client saw a complete stream: {text}");
    assert_no_provider_traces(&text);
    let events = parse_sse(&text);
    assert_eq!(events.len(), 1, "{text}");
    assert_eq!(events[0].json()["model"], "gpt-4o");
    assert!(
        !text.contains("aaaa"),
        "part of the oversized event went out"
    );

    eventually_metric(
        &gw,
        "keyrouter_requests_total",
        &[("provider", "openai"), ("code", "502")],
        1.0,
    )
    .await;
    nothing_in_flight(&gw).await;
    provider_streams_closed(&mock).await;
}

#[tokio::test]
async fn a_provider_400_keeps_its_message_without_key_material() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;
    for path in ["/openai/v1/chat/completions", "/anthropic/v1/messages"] {
        let a = post_with(&gw, path, &chat("gpt-4o"), &[("x-mock-status", "400")]).await;
        let message = a.error(400, "invalid_request");
        assert!(!a.text.contains(LEAKED_KEY), "{}", a.text);
        assert!(!a.text.contains("LEAKEDKEY"), "{}", a.text);
        assert!(
            message.contains("Invalid value for 'temperature': got"),
            "{message}"
        );
        assert_only_allowed_headers(&a);
    }
    let a = post_with(
        &gw,
        "/openai/v1/chat/completions",
        &chat("gpt-9"),
        &[("x-mock-status", "404")],
    )
    .await;
    let message = a.error(404, "not_found");
    assert!(
        message.contains("The model 'gpt-9' does not exist."),
        "{message}"
    );
}

/// A JSON body labelled as a form (as `curl -d` sends it) names the model
/// the client asked for all the same.
#[tokio::test]
async fn a_json_body_labelled_as_a_form_names_the_model_all_the_same() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;
    let form = gw
        .client()
        .post(gw.proxy_url("/openai/v1/chat/completions"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(chat("gpt-4o-mini").to_string())
        .send()
        .await
        .unwrap();
    let form = Answer::of(form).await;
    assert_eq!(form.status, 200, "{}", form.text);
    assert_eq!(form.json()["model"], "gpt-4o-mini");
}

/// A provider error inside a successful answer (some OpenAI-compatible
/// servers send them) loses the key it quotes, as an error answer does.
#[tokio::test]
async fn an_error_in_a_successful_answer_loses_the_key_it_quotes() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;
    for path in ["/openai/v1/chat/completions", "/anthropic/v1/messages"] {
        let a = post_with(
            &gw,
            path,
            &chat("gpt-4o"),
            &[("x-mock-echo", OPENAI_KEY), ("x-mock-echo-status", "200")],
        )
        .await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert!(
            a.text.contains("Input should be") || a.text.contains("Invalid value"),
            "{}",
            a.text
        );
        for secret in [OPENAI_KEY, ANTHROPIC_KEY, &OPENAI_KEY[..12]] {
            assert!(!a.text.contains(secret), "{}", a.text);
        }
    }
    // The requests failed, whatever status line went out.
    for provider in ["openai", "anthropic"] {
        eventually_metric(
            &gw,
            "keyrouter_requests_total",
            &[("provider", provider), ("code", "502")],
            1.0,
        )
        .await;
    }
}

/// Gemini's non-SSE `streamGenerateContent` answer is one JSON array; a
/// stream failing after its first chunk ends it with an error object. That
/// error loses the served key's edges it quotes, and the request counts as
/// failed.
#[tokio::test]
async fn an_error_ending_a_gemini_array_loses_the_key_and_counts_as_failed() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;
    let a = post_with(
        &gw,
        "/gemini/v1beta/models/gemini-1.5-pro:streamGenerateContent",
        &json!({"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}),
        &[("x-mock-stream-error", "1")],
    )
    .await;
    assert_eq!(a.status, 200, "{}", a.text);
    assert_no_provider_traces(&a.text);
    let chunks = a.json().as_array().unwrap().clone();
    assert_eq!(chunks.len(), 2, "{}", a.text);
    let message = chunks[1]["error"]["message"].as_str().unwrap();
    assert!(
        message.starts_with("Overloaded while serving key [redacted]")
            && message.contains("(ending [redacted])"),
        "{message}"
    );
    for leak in [&GEMINI_KEY[..6], &GEMINI_KEY[GEMINI_KEY.len() - 4..]] {
        assert!(!a.text.contains(leak), "{leak} of the key in {}", a.text);
    }
    let gemini = |code| [("provider", "gemini"), ("code", code)];
    eventually_metric(&gw, "keyrouter_requests_total", &gemini("502"), 1.0).await;
    assert_eq!(
        metric(&gw, "keyrouter_requests_total", &gemini("200")).await,
        0.0
    );
}

/// Key material may hold any punctuation. A provider quoting such a key in
/// its JSON error writes its `"` and `\` escaped; the client finds the key
/// neither in the bytes it receives nor in the message its parser decodes,
/// whether the error comes as a successful answer or as a refusal.
#[tokio::test]
async fn a_key_with_punctuation_quoted_through_json_escapes_does_not_reach_the_client() {
    const PUNCTUATED_KEY: &str = r#"pk"7:Zq\w%2F!x~y@Wv0T"#;
    let (head, tail) = (
        &PUNCTUATED_KEY[..8],
        &PUNCTUATED_KEY[PUNCTUATED_KEY.len() - 4..],
    );
    let mock = MockUpstream::start().await;
    let gw = gateway_with(provider("local", "openai_compatible", &mock.url, ""), "").await;
    gw.register_key("local", PUNCTUATED_KEY).await;
    for status in ["200", "400"] {
        let a = post_with(
            &gw,
            "/local/v1/chat/completions",
            &chat("llama3"),
            &[
                ("x-mock-echo", PUNCTUATED_KEY),
                ("x-mock-echo-status", status),
            ],
        )
        .await;
        assert_eq!(a.status.to_string(), status, "{}", a.text);
        let message = a.json()["error"]["message"].as_str().unwrap().to_owned();
        assert!(message.contains("Invalid value: '[redacted]'"), "{message}");
        let escaped = serde_json::to_string(head).unwrap();
        for leak in [head, tail, escaped.trim_matches('"')] {
            assert!(!a.text.contains(leak), "{leak} in {}", a.text);
            assert!(!message.contains(leak), "{leak} in {message}");
        }
    }
}

/// Key material glued to a name (`key=sk-…`) and account ids quoted in a
/// kept provider message are scrubbed like free-standing ones.
#[tokio::test]
async fn a_kept_provider_message_loses_glued_keys_and_account_ids() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;
    for path in ["/openai/v1/chat/completions", "/anthropic/v1/messages"] {
        for (quoted, secret) in [
            ("key=sk-1234567890abcdef", "sk-"),
            ("previous key=sk-proj-ab12...yz89 was rotated", "sk-"),
            ("org-SECRETORG123", "SECRETORG"),
            ("proj_abcdefgh1234", "abcdefgh1234"),
        ] {
            let a = post_with(&gw, path, &chat("gpt-4o"), &[("x-mock-echo", quoted)]).await;
            let message = a.error(400, "invalid_request");
            assert!(message.contains("[redacted]"), "{message}");
            assert!(!a.text.contains(secret), "{secret} in {}", a.text);
        }
    }
}

/// A JSON body that does not parse (a provider cutting its answer short,
/// yet ending the HTTP response cleanly) cannot be rewritten: the client
/// gets a gateway error, never the provider's id or model snapshot.
#[tokio::test]
async fn a_json_body_that_does_not_parse_is_not_passed_on() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;
    let a = post_with(
        &gw,
        "/openai/v1/chat/completions",
        &chat("gpt-4o"),
        &[("x-mock-cut-json", "1")],
    )
    .await;
    a.error(502, "upstream_error");
    assert_no_provider_traces(&a.text);
    assert_only_allowed_headers(&a);
    eventually_metric(
        &gw,
        "keyrouter_requests_total",
        &[("provider", "openai"), ("code", "502")],
        1.0,
    )
    .await;
    nothing_in_flight(&gw).await;
}

#[tokio::test]
async fn stream_error_events_lose_the_served_keys_edges() {
    const SHORT_KEY: &str = "Zq7sh0rtK3y9";
    let mock = MockUpstream::start().await;
    let providers = [
        all_kinds(&mock, None),
        provider("local", "openai_compatible", &mock.url, ""),
    ]
    .concat();
    let gw = gateway_with(providers, "").await;
    gw.register_key("local", SHORT_KEY).await;
    let failing = [("x-mock-stream-error", "1")];
    for (path, body, key) in [
        (
            "/openai/v1/chat/completions",
            chat_stream("gpt-4o"),
            OPENAI_KEY,
        ),
        (
            "/anthropic/v1/messages",
            anthropic_body("claude-3-5-sonnet-latest", true),
            ANTHROPIC_KEY,
        ),
        (
            "/local/v1/chat/completions",
            chat_stream("llama3"),
            SHORT_KEY,
        ),
    ] {
        let a = post_with(&gw, path, &body, &failing).await;
        assert_eq!(a.status, 200, "{}", a.text);
        assert_no_provider_traces(&a.text);
        let events = parse_sse(&a.text);
        assert_eq!(events.len(), 2, "{}", a.text);
        let error = events[1].json();
        let message = error["error"]["message"].as_str().unwrap();
        assert!(
            message.starts_with("Overloaded while serving key [redacted]"),
            "{message}"
        );
        let (head, tail) = (&key[..6], &key[key.len() - 4..]);
        for leak in [head, tail] {
            assert!(!a.text.contains(leak), "{leak} of the key in {}", a.text);
        }
        assert!(message.contains("(ending [redacted])"), "{message}");
    }
    // Each stream ended in an error: none counts as a success.
    for provider in ["openai", "anthropic", "local"] {
        eventually_metric(
            &gw,
            "keyrouter_requests_total",
            &[("provider", provider), ("code", "502")],
            1.0,
        )
        .await;
        assert_eq!(
            metric(
                &gw,
                "keyrouter_requests_total",
                &[("provider", provider), ("code", "200")]
            )
            .await,
            0.0
        );
    }
}

#[tokio::test]
async fn a_provider_401_is_never_shown() {
    let mock = MockUpstream::start().await;
    let material = "sk-proj-unit-test-material-000wxyz";
    let gw = gateway_with(
        provider("openai", "openai", &mock.url, "default = true"),
        "",
    )
    .await;
    gw.register_key("openai", material).await;
    for status in ["401", "403"] {
        let a = post_with(
            &gw,
            "/openai/v1/chat/completions",
            &chat("gpt-4o"),
            &[("x-mock-status", status)],
        )
        .await;
        assert!(a.status >= 400, "{}", a.text);
        let kind = a.json()["error"]["type"].as_str().unwrap().to_owned();
        a.error(a.status, &kind);
        for leak in [
            "Incorrect API key",
            "wxyz",
            "sk-",
            "****",
            material,
            &material[..8],
            OPENAI_KEY,
            &OPENAI_KEY[..8],
        ] {
            assert!(!a.text.contains(leak), "{leak} in {}", a.text);
        }
        assert_only_allowed_headers(&a);
    }
}

#[tokio::test]
async fn a_provider_without_an_active_key_is_503() {
    let mock = MockUpstream::start().await;
    let gw = TestGateway::builder()
        .providers(&provider("openai", "openai", &mock.url, "default = true"))
        .start()
        .await;
    post(&gw, "/openai/v1/chat/completions", &chat("gpt-4o"))
        .await
        .error(503, "no_available_key");
    let key = gw.register_key("openai", OPENAI_KEY).await;
    let id = key["id"].as_str().unwrap();
    gw.post(&format!("/keys/{id}/revoke"), json!({}))
        .send()
        .await;
    post(&gw, "/v1/chat/completions", &chat("gpt-4o"))
        .await
        .error(503, "no_available_key");
    assert!(mock.received().is_empty());
    eventually_metric(
        &gw,
        "keyrouter_requests_total",
        &[("provider", "openai"), ("code", "503")],
        2.0,
    )
    .await;
}

fn key_of(r: &Received) -> String {
    r.header("authorization")
        .unwrap()
        .strip_prefix("Bearer ")
        .unwrap()
        .to_owned()
}

/// Registers `material` with `weight` and returns the key id.
async fn register(gw: &TestGateway, material: &str, weight: u32) -> String {
    let reply = gw
        .post(
            "/keys",
            json!({"key_material": material, "provider_id": "openai", "weight": weight}),
        )
        .send()
        .await;
    assert_eq!(reply.status, 201, "{}", reply.text);
    reply.json()["id"].as_str().unwrap().to_owned()
}

/// How many of the requests the mock received carried each key.
fn key_counts(mock: &MockUpstream) -> HashMap<String, usize> {
    let mut counts = HashMap::new();
    for r in mock.received() {
        *counts.entry(key_of(&r)).or_default() += 1;
    }
    counts
}

#[tokio::test]
async fn a_revoked_key_is_never_used_after_the_revoke_returns() {
    let mock = MockUpstream::start().await;
    let gw = TestGateway::builder()
        .providers(&provider(
            "openai",
            "openai",
            &mock.url,
            "default = true\npolicy = \"round_robin\"",
        ))
        .start()
        .await;
    let (keep, gone) = ("sk-keep-0123456789abcdef", "sk-gone-0123456789abcdef");
    // A key registered through the admin API serves the very next request.
    let gone_id = register(&gw, gone, 1).await;
    assert_eq!(
        post(&gw, "/v1/chat/completions", &chat("gpt-4o"))
            .await
            .status,
        200
    );
    assert_eq!(key_of(&mock.last()), gone);
    register(&gw, keep, 1).await;
    for _ in 0..4 {
        post(&gw, "/v1/chat/completions", &chat("gpt-4o")).await;
    }
    assert_eq!(
        key_counts(&mock).len(),
        2,
        "both keys in use before the revoke"
    );

    let reply = gw
        .post(
            &format!("/keys/{gone_id}/revoke"),
            json!({"reason": "leaked"}),
        )
        .send()
        .await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    mock.clear();
    for _ in 0..30 {
        assert_eq!(
            post(&gw, "/v1/chat/completions", &chat("gpt-4o"))
                .await
                .status,
            200
        );
    }
    // Past the pool's periodic reload too.
    tokio::time::sleep(Duration::from_millis(2200)).await;
    for _ in 0..10 {
        post(&gw, "/v1/chat/completions", &chat("gpt-4o")).await;
    }
    let counts = key_counts(&mock);
    assert_eq!(
        counts.get(gone),
        None,
        "the revoked key was used: {counts:?}"
    );
    assert_eq!(counts.get(keep), Some(&40));
}

#[tokio::test]
async fn round_robin_spreads_requests_evenly() {
    let mock = MockUpstream::start().await;
    let gw = TestGateway::builder()
        .providers(&provider(
            "openai",
            "openai",
            &mock.url,
            "default = true\npolicy = \"round_robin\"",
        ))
        .start()
        .await;
    let keys = [
        "sk-rr-a-0123456789abcdef",
        "sk-rr-b-0123456789abcdef",
        "sk-rr-c-0123456789abcdef",
    ];
    for k in keys {
        register(&gw, k, 1).await;
    }
    for _ in 0..30 {
        assert_eq!(
            post(&gw, "/v1/chat/completions", &chat("gpt-4o"))
                .await
                .status,
            200
        );
    }
    let counts = key_counts(&mock);
    for k in keys {
        assert_eq!(counts.get(k), Some(&10), "{counts:?}");
    }
}

#[tokio::test]
async fn least_loaded_sends_new_requests_past_a_busy_key() {
    let mock = MockUpstream::start().await;
    let gw = TestGateway::builder()
        .providers(&provider("openai", "openai", &mock.url, "default = true"))
        .start()
        .await;
    let keys = ["sk-ll-a-0123456789abcdef", "sk-ll-b-0123456789abcdef"];
    for k in keys {
        register(&gw, k, 1).await;
    }
    let mut held = gw
        .client()
        .post(gw.proxy_url("/v1/chat/completions"))
        .header("x-mock-hold", "1")
        .json(&chat_stream("gpt-4o"))
        .send()
        .await
        .unwrap();
    first_event(&mut held).await;
    let busy = key_of(&mock.last());
    mock.clear();
    for _ in 0..10 {
        assert_eq!(
            post(&gw, "/v1/chat/completions", &chat("gpt-4o"))
                .await
                .status,
            200
        );
    }
    let counts = key_counts(&mock);
    let idle = keys.iter().find(|k| **k != busy).unwrap();
    assert_eq!(counts.get(*idle), Some(&10), "busy key {busy}: {counts:?}");

    // Once the stream ends both keys share the load again.
    mock.release();
    let mut rest = String::new();
    while let Some(chunk) = held.chunk().await.unwrap() {
        rest.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(rest.contains("[DONE]"));
    mock.clear();
    for _ in 0..10 {
        post(&gw, "/v1/chat/completions", &chat("gpt-4o")).await;
    }
    let counts = key_counts(&mock);
    assert_eq!(counts.len(), 2, "{counts:?}");
}

#[tokio::test]
async fn weighted_selection_follows_the_weights() {
    let mock = MockUpstream::start().await;
    let gw = TestGateway::builder()
        .providers(&provider(
            "openai",
            "openai",
            &mock.url,
            "default = true\npolicy = \"weighted\"",
        ))
        .start()
        .await;
    let (light, heavy) = ("sk-light-0123456789abcdef", "sk-heavy-0123456789abcdef");
    register(&gw, light, 1).await;
    register(&gw, heavy, 9).await;
    for _ in 0..200 {
        assert_eq!(
            post(&gw, "/v1/chat/completions", &chat("gpt-4o"))
                .await
                .status,
            200
        );
    }
    let counts = key_counts(&mock);
    let heavy_count = counts.get(heavy).copied().unwrap_or(0);
    assert!((150..=195).contains(&heavy_count), "{counts:?}");
    assert_eq!(counts.get(light).copied().unwrap_or(0) + heavy_count, 200);
}

async fn preflight(gw: &TestGateway, origin: &str) -> Answer {
    Answer::of(
        gw.client()
            .request(
                reqwest::Method::OPTIONS,
                gw.proxy_url("/openai/v1/chat/completions"),
            )
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header(
                "access-control-request-headers",
                "content-type, authorization",
            )
            .send()
            .await
            .unwrap(),
    )
    .await
}

fn cors_headers(a: &Answer) -> Vec<String> {
    a.headers
        .keys()
        .map(|k| k.as_str().to_owned())
        .filter(|k| k.starts_with("access-control-"))
        .collect()
}

#[tokio::test]
async fn cors_follows_the_allow_list() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "[server]\ncors_origins = [\"https://app.example\"]").await;

    let ok = preflight(&gw, "https://app.example").await;
    assert_eq!(ok.status, 204, "{}", ok.text);
    assert_eq!(
        ok.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    assert!(
        ok.header("access-control-allow-methods")
            .unwrap()
            .contains("POST")
    );
    assert_eq!(
        ok.header("access-control-allow-headers"),
        Some("content-type, authorization")
    );
    assert!(ok.header("x-request-id").is_some());

    let refused = preflight(&gw, "https://evil.example").await;
    refused.error(403, "forbidden");
    assert!(cors_headers(&refused).is_empty(), "{:?}", refused.headers);

    let allowed = post_with(
        &gw,
        "/openai/v1/chat/completions",
        &chat("gpt-4o"),
        &[("origin", "https://app.example")],
    )
    .await;
    assert_eq!(allowed.status, 200);
    assert_eq!(
        allowed.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    let other = post_with(
        &gw,
        "/openai/v1/chat/completions",
        &chat("gpt-4o"),
        &[("origin", "https://evil.example")],
    )
    .await;
    assert_eq!(other.status, 200);
    assert!(cors_headers(&other).is_empty(), "{:?}", other.headers);
    let error = Answer::of(
        gw.client()
            .get(gw.proxy_url("/nowhere"))
            .header("origin", "https://app.example")
            .send()
            .await
            .unwrap(),
    )
    .await;
    error.error(404, "not_found");
    assert_eq!(
        error.header("access-control-allow-origin"),
        Some("https://app.example")
    );
    // Preflights never reach the provider.
    assert_eq!(mock.received().len(), 2);
}

#[tokio::test]
async fn without_cors_origins_no_cors_header_ever_appears() {
    let mock = MockUpstream::start().await;
    let gw = gateway(&mock, "").await;
    let p = preflight(&gw, "https://app.example").await;
    assert!(p.status >= 400, "{}", p.status);
    assert!(cors_headers(&p).is_empty(), "{:?}", p.headers);
    let a = post_with(
        &gw,
        "/openai/v1/chat/completions",
        &chat("gpt-4o"),
        &[("origin", "https://app.example")],
    )
    .await;
    assert_eq!(a.status, 200);
    assert!(cors_headers(&a).is_empty(), "{:?}", a.headers);
    assert_only_allowed_headers(&a);
}

/// What an OpenAI SDK does: JSON in, JSON out, and a stream read event by
/// event as bytes arrive, through the gateway to an HTTPS provider.
#[tokio::test]
async fn an_sdk_style_client_works_through_to_an_https_provider() {
    use futures_util::StreamExt;

    let (mock, gw, _ca_dir) = https_provider_gateway().await;
    let sdk = reqwest::Client::builder()
        .user_agent("OpenAI/Python 1.54.0")
        .build()
        .unwrap();
    let base = format!("{}/openai/v1", gw.proxy);

    let completion: Value = sdk
        .post(format!("{base}/chat/completions"))
        .bearer_auth("sk-placeholder-the-gateway-replaces")
        .json(&chat("gpt-4o"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(completion["model"], "gpt-4o");
    assert_eq!(
        completion["choices"][0]["message"]["content"],
        "Hello from the mock."
    );
    assert_ne!(completion["id"], PROVIDER_ID);

    let resp = sdk
        .post(format!("{base}/chat/completions"))
        .bearer_auth("sk-placeholder-the-gateway-replaces")
        .json(&chat_stream("gpt-4o"))
        .send()
        .await
        .unwrap()
        .error_for_status()
        .unwrap();
    assert_eq!(resp.headers()["content-type"], "text/event-stream");
    let mut stream = resp.bytes_stream();
    let mut buffer = String::new();
    let mut content = String::new();
    let mut done = false;
    while let Some(chunk) = stream.next().await {
        buffer.push_str(std::str::from_utf8(&chunk.unwrap()).unwrap());
        while let Some(end) = buffer.find("\n\n") {
            let event: String = buffer.drain(..end + 2).collect();
            let data = event.trim().strip_prefix("data: ").unwrap().to_owned();
            if data == "[DONE]" {
                done = true;
                continue;
            }
            let chunk: Value = serde_json::from_str(&data).unwrap();
            assert_eq!(chunk["model"], "gpt-4o");
            if let Some(t) = chunk["choices"][0]["delta"]["content"].as_str() {
                content.push_str(t);
            }
        }
    }
    assert!(done && buffer.is_empty());
    assert_eq!(content, "Hello world");
    let seen = mock.received();
    assert_eq!(seen.len(), 2);
    for r in seen {
        assert_eq!(key_of(&r), OPENAI_KEY);
        assert!(!header_text(&r).contains("sk-placeholder"));
    }
}
