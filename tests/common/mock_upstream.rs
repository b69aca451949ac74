//! A local stand-in for OpenAI and Anthropic: answers like they do (JSON,
//! SSE streams, error shapes, provider headers that must never reach a
//! client), over plain HTTP or HTTPS with a test CA, and records every request
//! it receives.
//!
//! Tests choose a behaviour with request headers, which keyrouter forwards:
//! `x-mock-status: 400` answers with that status and the provider's error
//! body, `x-mock-hang: 1` never answers, `x-mock-pause-ms: N` pauses N ms
//! after the first SSE event, `x-mock-gzip: 1` sends a compressed body,
//! `x-mock-retry-after: N` adds `Retry-After`.
#![allow(dead_code)]

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;

type Body = BoxBody<Bytes, Infallible>;

/// What the mock received.
#[derive(Clone, Debug)]
pub struct Received {
    pub method: http::Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

/// Provider headers every mock response carries; none may reach a client.
pub const PROVIDER_HEADERS: [(&str, &str); 9] = [
    ("openai-organization", "org-mockorganization"),
    ("openai-processing-ms", "42"),
    ("openai-version", "2020-10-01"),
    ("x-ratelimit-remaining-requests", "4999"),
    ("x-request-id", "req_provider_0123456789"),
    ("anthropic-ratelimit-requests-remaining", "49"),
    ("cf-ray", "8f00000000000000-SJC"),
    ("set-cookie", "__cf_bm=providercookie; path=/"),
    ("server", "cloudflare"),
];

/// The model snapshot the mock claims served every request.
pub const PROVIDER_MODEL: &str = "gpt-4o-2024-08-06-snapshot";
pub const PROVIDER_ID: &str = "chatcmpl-PROVIDERID0123456789";

pub struct MockUpstream {
    pub addr: SocketAddr,
    /// Base URL for keyrouter's `base_url`.
    pub url: String,
    received: Arc<Mutex<Vec<Received>>>,
    /// Connections currently open to the mock.
    open: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl MockUpstream {
    /// A plain HTTP mock on a loopback port.
    pub async fn start() -> MockUpstream {
        Self::start_with(None).await
    }

    /// An HTTPS mock whose certificate is signed by the test CA.
    pub async fn start_tls(server: Arc<rustls::ServerConfig>) -> MockUpstream {
        Self::start_with(Some(server)).await
    }

    async fn start_with(tls: Option<Arc<rustls::ServerConfig>>) -> MockUpstream {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let received = Arc::new(Mutex::new(Vec::new()));
        let open = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let scheme = if tls.is_some() { "https" } else { "http" };
        let task = tokio::spawn(serve(listener, tls, Some(received.clone()), open.clone()));
        MockUpstream {
            addr,
            url: format!("{scheme}://localhost:{}", addr.port()),
            received,
            open,
            task,
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(std::sync::atomic::Ordering::SeqCst)
    }
}

/// Serves mock answers on `listener` until the task is aborted. With
/// `received`, every request is recorded (tests); without, nothing is kept
/// (load benchmarks).
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    received: Option<Arc<Mutex<Vec<Received>>>>,
    open: Arc<std::sync::atomic::AtomicUsize>,
) {
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let rec = received.clone();
        let open = open.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            open.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            let service = service_fn(move |req| answer(req, rec.clone()));
            let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
            match tls {
                None => {
                    let _ = builder
                        .serve_connection(TokioIo::new(stream), service)
                        .await;
                }
                Some(cfg) => {
                    if let Ok(s) = tokio_rustls::TlsAcceptor::from(cfg).accept(stream).await {
                        let _ = builder.serve_connection(TokioIo::new(s), service).await;
                    }
                }
            }
            open.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    received: Option<Arc<Mutex<Vec<Received>>>>,
) -> Result<Response<Body>, Infallible> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let Some(received) = received else {
        return Ok(route(&parts, &body));
    };
    received.lock().unwrap().push(Received {
        method: parts.method.clone(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    Ok(scripted(&parts, &body).await)
}

/// The answer for a request, honouring the `x-mock-*` behaviours.
async fn scripted(parts: &http::request::Parts, body: &Bytes) -> Response<Body> {
    let h = &parts.headers;
    let flag = |name: &str| h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    if flag("x-mock-hang").is_some() {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    let anthropic = parts.uri.path().ends_with("/messages");
    if let Some(status) = flag("x-mock-status").and_then(|s| s.parse::<u16>().ok()) {
        let mut resp = error_response(StatusCode::from_u16(status).unwrap(), anthropic);
        if let Some(secs) = flag("x-mock-retry-after") {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, secs.parse().unwrap());
        }
        return resp;
    }
    let pause = flag("x-mock-pause-ms")
        .and_then(|s| s.parse().ok())
        .map(Duration::from_millis);
    let mut resp = answer_for(parts, body, pause);
    if flag("x-mock-gzip").is_some() {
        resp.headers_mut()
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
    }
    resp
}

/// The plain answer for a request, without scripted behaviours (fast path
/// of the load benchmark).
fn route(parts: &http::request::Parts, body: &Bytes) -> Response<Body> {
    answer_for(parts, body, None)
}

fn answer_for(
    parts: &http::request::Parts,
    body: &Bytes,
    pause: Option<Duration>,
) -> Response<Body> {
    static COMPLETION: LazyLock<Bytes> = LazyLock::new(|| openai_completion().to_string().into());
    static MESSAGE: LazyLock<Bytes> = LazyLock::new(|| anthropic_message().to_string().into());
    let stream = body.windows(14).any(|w| w == b"\"stream\":true")
        || body.windows(15).any(|w| w == b"\"stream\": true");
    let anthropic = parts.uri.path().ends_with("/messages");
    match (parts.uri.path(), stream) {
        (p, true) if p.ends_with("/chat/completions") => sse(openai_chunks(), pause),
        (p, true) if p.ends_with("/messages") => sse(anthropic_events(), pause),
        (p, false) if p.ends_with("/chat/completions") => json(COMPLETION.clone()),
        (p, false) if p.ends_with("/messages") => json(MESSAGE.clone()),
        (p, false) if p.ends_with("/embeddings") => json(serde_json::json!({
            "object": "list", "model": PROVIDER_MODEL,
            "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2, 0.3]}],
            "usage": {"prompt_tokens": 5, "total_tokens": 5}
        }).to_string().into()),
        (p, false) if p.ends_with("/models") => json(serde_json::json!({
            "object": "list", "data": [{"id": "gpt-4o", "object": "model", "owned_by": "system"}]
        }).to_string().into()),
        _ => error_response(StatusCode::NOT_FOUND, anthropic),
    }
}

fn with_provider_headers(mut resp: Response<Body>) -> Response<Body> {
    for (k, v) in PROVIDER_HEADERS {
        resp.headers_mut().append(k, HeaderValue::from_static(v));
    }
    resp
}

fn json(body: Bytes) -> Response<Body> {
    let mut resp = Response::new(Full::new(body).boxed());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    with_provider_headers(resp)
}

/// An SSE response sending `events` one frame each; with `pause`, it waits
/// after the first event before sending the rest.
fn sse(events: Vec<String>, pause: Option<Duration>) -> Response<Body> {
    let stream = async_stream(events, pause);
    let mut resp = Response::new(StreamBody::new(stream).boxed());
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    with_provider_headers(resp)
}

fn async_stream(
    events: Vec<String>,
    pause: Option<Duration>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> {
    futures_util::stream::unfold(
        (events.into_iter(), 0usize),
        move |(mut it, n)| async move {
            let event = it.next()?;
            if n == 1 {
                if let Some(p) = pause {
                    tokio::time::sleep(p).await;
                }
            }
            Some((Ok(Frame::data(Bytes::from(event))), (it, n + 1)))
        },
    )
}

pub fn openai_completion() -> serde_json::Value {
    serde_json::json!({
        "id": PROVIDER_ID,
        "object": "chat.completion",
        "created": 1741569952,
        "model": PROVIDER_MODEL,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello from the mock.", "refusal": null}, "logprobs": null, "finish_reason": "stop"}],
        "usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29},
        "service_tier": "default",
        "system_fingerprint": "fp_mockfingerprint"
    })
}

pub fn anthropic_message() -> serde_json::Value {
    serde_json::json!({
        "id": "msg_01PROVIDERID0123456789",
        "type": "message",
        "role": "assistant",
        "model": "claude-3-5-sonnet-20241022",
        "content": [{"type": "text", "text": "Hello from the mock."}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {"input_tokens": 12, "output_tokens": 6, "service_tier": "standard"}
    })
}

pub fn openai_chunks() -> Vec<String> {
    let mut events: Vec<String> = ["Hel", "lo", " wor", "ld"]
        .iter()
        .map(|w| {
            format!(
                "data: {{\"id\":\"{PROVIDER_ID}\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"{PROVIDER_MODEL}\",\"system_fingerprint\":\"fp_mockfingerprint\",\"service_tier\":\"default\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\"{w}\"}},\"finish_reason\":null}}]}}\n\n"
            )
        })
        .collect();
    events.push(format!(
        "data: {{\"id\":\"{PROVIDER_ID}\",\"object\":\"chat.completion.chunk\",\"created\":1741569952,\"model\":\"{PROVIDER_MODEL}\",\"choices\":[],\"usage\":{{\"prompt_tokens\":9,\"completion_tokens\":4,\"total_tokens\":13}}}}\n\n"
    ));
    events.push("data: [DONE]\n\n".into());
    events
}

pub fn anthropic_events() -> Vec<String> {
    vec![
        "event: message_start\ndata: {\"type\":\"message_start\",\"message\":{\"id\":\"msg_01PROVIDERID0123456789\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"claude-3-5-sonnet-20241022\",\"content\":[],\"stop_reason\":null,\"usage\":{\"input_tokens\":25,\"output_tokens\":1,\"service_tier\":\"standard\"}}}\n\n".into(),
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n".into(),
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n".into(),
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n".into(),
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n".into(),
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".into(),
    ]
}

/// The provider's error body for `status`, in OpenAI's or Anthropic's shape.
/// The message quotes part of a key, as real 401s do.
fn error_response(status: StatusCode, anthropic: bool) -> Response<Body> {
    let message = match status.as_u16() {
        400 => "Invalid value for 'temperature': got sk-proj-LEAKEDKEY0123456789abcdef.",
        401 => "Incorrect API key provided: sk-proj-****************wxyz.",
        404 => "The model 'gpt-9' does not exist.",
        429 => "Rate limit reached for requests.",
        _ => "The server had an error while processing your request.",
    };
    let body = if anthropic {
        serde_json::json!({"type": "error", "error": {"type": "invalid_request_error", "message": message}})
    } else {
        serde_json::json!({"error": {"message": message, "type": "invalid_request_error", "param": null, "code": null}})
    };
    let mut resp = json(body.to_string().into());
    *resp.status_mut() = status;
    resp
}
