//! A local stand-in for OpenAI, Anthropic, Azure OpenAI and Gemini: answers
//! like they do (JSON, SSE streams, error shapes, provider headers that must
//! never reach a client), over plain HTTP or HTTPS with a test CA, and
//! records every request it receives.
//!
//! Tests choose a behaviour with request headers, which keyrouter forwards:
//! - `x-mock-status: 400` answers with that status and the provider's error
//!   body (`x-mock-retry-after: N` adds `Retry-After`);
//! - `x-mock-echo: TEXT` answers 400 with a message quoting TEXT as a
//!   value the client sent, as providers quote invalid input;
//! - `x-mock-cut-json: 1` answers a chat completion cut off in the middle,
//!   as a complete HTTP response (`Content-Length` of the half sent);
//! - `x-mock-hang: 1` never answers;
//! - `x-mock-pause-ms: N` pauses N ms after the first SSE event;
//! - `x-mock-hold: 1` stops after the first SSE event until the test calls
//!   [`MockUpstream::release`];
//! - `x-mock-fragment: N` sends the SSE bytes in N-byte frames, about 1 ms
//!   apart, so events arrive split anywhere (even inside `data:` or `\n\n`);
//! - `x-mock-close: 1` answers with `Connection: close` and closes the
//!   connection after the response;
//! - `x-mock-gzip: 1` sends the body gzip-compressed with
//!   `Content-Encoding: gzip`, whatever the request's `Accept-Encoding`;
//! - `x-mock-unlabelled: 1` sends the answer without its `Content-Type`;
//! - `x-mock-truncate: 1` announces the whole body's `Content-Length` but
//!   breaks the connection off after half of it (a provider failing
//!   mid-response);
//! - `x-mock-stall: 1` announces the whole body's `Content-Length`, sends
//!   half of it and then nothing more, keeping the connection open (a
//!   provider stalling mid-response);
//! - `x-mock-decorate: 1` answers a chat stream whose events come with what
//!   providers add around the data: comments naming their routing, `id:`
//!   lines, a `retry:` hint;
//! - `x-mock-lines: ndjson` (or `jsonl`) answers the chat stream as JSON
//!   lines (`application/x-ndjson` or `application/jsonl`);
//! - Ollama's native API (`/api/chat`, `/api/generate`, `/api/embed`)
//!   answers as Ollama does: JSON lines unless the body says
//!   `"stream":false`;
//! - `x-mock-stream-error: 1` ends a chat or message stream, after its
//!   first event, with an error event quoting the served key's start and
//!   end ([`key_edges_message`]); a non-SSE `streamGenerateContent` array
//!   ends, after its first chunk, with Gemini's error object quoting them;
//! - `x-mock-unterminated: N` answers a stream with one chat chunk, then an
//!   event that never ends (N bytes of one `data:` line in 16 KiB frames),
//!   then silence.
//!
//! Tests can also script the mock per KEY: the behaviour is chosen by the
//! credential the mock receives (`Authorization: Bearer <key>`,
//! `x-api-key`, `api-key` or `x-goog-api-key`) and can be changed while the
//! gateway runs ([`MockUpstream::script`], [`Behaviour`]); the mock counts
//! the requests each key made ([`MockUpstream::requests_for`]). A key
//! without a script (or scripted [`Behaviour::Ok`]) gets the plain answer,
//! `x-mock-*` headers honoured.
//!
//! This file is also the load benchmark's upstream
//! (`benches/load/mock_upstream.rs`), so it uses no dev-dependency.
#![allow(dead_code)]

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Request, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, StreamBody, combinators::BoxBody};
use hyper::body::{Frame, Incoming};
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

type Body = BoxBody<Bytes, Infallible>;

/// What the mock received.
#[derive(Clone, Debug)]
pub struct Received {
    /// Which connection it came on: the mock numbers them as it accepts
    /// them, from 0.
    pub connection: usize,
    pub version: http::Version,
    pub method: http::Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Received {
    /// A header's value as text (the first one), if present.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// The provider key this request carried, whatever the provider kind.
    pub fn credential(&self) -> Option<String> {
        credential(&self.headers)
    }
}

/// How the mock answers requests made with one key (see
/// [`MockUpstream::script`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Behaviour {
    /// The plain answer (`x-mock-*` headers honoured).
    Ok,
    /// 429 rate limit, with `Retry-After: N` when given.
    Status429 { retry_after: Option<u64> },
    /// 401 whose message quotes the key's first eight and last four
    /// characters, as OpenAI's does ([`key_fragment`]).
    Unauthorized,
    /// 429 with OpenAI's `insufficient_quota` error; the model list is
    /// still answered, as OpenAI does for a key whose quota is gone.
    InsufficientQuota,
    /// 402 Payment Required.
    PaymentRequired,
    /// 400 as Gemini answers a bad key: `API_KEY_INVALID` in its details.
    KeyNotValid,
    /// 400 as Anthropic answers a spent prepaid balance.
    CreditBalanceTooLow,
    /// 500 with the provider's error body.
    ServerError,
    /// The plain answer, after this long (before the response head).
    Slow(Duration),
    /// Closes the connection without answering.
    Reset,
    /// Waits this long, then behaves as the inner behaviour.
    After(Duration, Box<Behaviour>),
}

/// The part of `key` the mock's 401 message quotes: its first eight and
/// last four characters around asterisks (`sk-proj-****wxyz`).
pub fn key_fragment(key: &str) -> String {
    let head: String = key.chars().take(8).collect();
    let tail: String = key
        .chars()
        .rev()
        .take(4)
        .collect::<Vec<_>>()
        .into_iter()
        .rev()
        .collect();
    format!("{head}****{tail}")
}

/// The key a request carries: `Authorization: Bearer <key>` or one of the
/// bare key headers.
fn credential(h: &HeaderMap) -> Option<String> {
    let text = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
    text("authorization")
        .and_then(|v| v.strip_prefix("Bearer "))
        .or_else(|| text("x-api-key"))
        .or_else(|| text("api-key"))
        .or_else(|| text("x-goog-api-key"))
        .map(str::to_owned)
}

/// The error a service returns to make hyper close the connection without
/// an answer ([`Behaviour::Reset`]).
#[derive(Debug)]
struct ResetConnection;

impl std::fmt::Display for ResetConnection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("connection reset by the mock")
    }
}

impl std::error::Error for ResetConnection {}

/// Per-key scripts and request counts, shared by the mock and its handle.
#[derive(Default)]
struct Scripts {
    behaviours: Mutex<HashMap<String, Behaviour>>,
    counts: Mutex<HashMap<String, usize>>,
}

impl Scripts {
    /// Counts a request made with `key`; returns the key's behaviour.
    fn note(&self, key: &str) -> Behaviour {
        *self
            .counts
            .lock()
            .unwrap()
            .entry(key.to_owned())
            .or_default() += 1;
        self.behaviours
            .lock()
            .unwrap()
            .get(key)
            .cloned()
            .unwrap_or(Behaviour::Ok)
    }
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
/// Anthropic's message id and model snapshot in the mock's answers.
pub const ANTHROPIC_ID: &str = "msg_01PROVIDERID0123456789";
pub const ANTHROPIC_MODEL: &str = "claude-3-5-sonnet-20241022";
/// The Gemini model version and response id in the mock's answers.
pub const GEMINI_MODEL_VERSION: &str = "gemini-1.5-pro-002";
pub const GEMINI_RESPONSE_ID: &str = "mAitaLmkHPPlzPROVIDERID";
/// The model tag an Ollama server names in its native answers.
pub const OLLAMA_MODEL: &str = "llama3.2:3b-instruct-q4_K_M";
/// The mock's 400 message quotes this key-like string.
pub const LEAKED_KEY: &str = "sk-proj-LEAKEDKEY0123456789abcdef";

/// What a serving mock shares with its handle.
struct Shared {
    /// Every request, when recording (tests); `None` in the load benchmark.
    received: Option<Arc<Mutex<Vec<Received>>>>,
    /// SSE response bodies alive now (dropped when sent or abandoned).
    streams: Arc<AtomicUsize>,
    /// Turns `true` when the test releases `x-mock-hold` streams.
    released: watch::Receiver<bool>,
    /// Per-key behaviours and request counts.
    scripts: Arc<Scripts>,
}

pub struct MockUpstream {
    pub addr: SocketAddr,
    /// Base URL for keyrouter's `base_url`.
    pub url: String,
    received: Arc<Mutex<Vec<Received>>>,
    /// Connections currently open to the mock.
    open: Arc<AtomicUsize>,
    streams: Arc<AtomicUsize>,
    release: watch::Sender<bool>,
    scripts: Arc<Scripts>,
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
        let open = Arc::new(AtomicUsize::new(0));
        let streams = Arc::new(AtomicUsize::new(0));
        let (release, released) = watch::channel(false);
        let scheme = if tls.is_some() { "https" } else { "http" };
        let scripts = Arc::new(Scripts::default());
        let shared = Arc::new(Shared {
            received: Some(received.clone()),
            streams: streams.clone(),
            released,
            scripts: scripts.clone(),
        });
        let task = tokio::spawn(serve_shared(listener, tls, shared, open.clone()));
        MockUpstream {
            addr,
            url: format!("{scheme}://localhost:{}", addr.port()),
            received,
            open,
            streams,
            release,
            scripts,
            task,
        }
    }

    pub fn received(&self) -> Vec<Received> {
        self.received.lock().unwrap().clone()
    }

    /// The last request received; panics when there was none.
    pub fn last(&self) -> Received {
        self.received().pop().expect("the mock received no request")
    }

    /// Forgets the requests received so far.
    pub fn clear(&self) {
        self.received.lock().unwrap().clear();
    }

    pub fn open_connections(&self) -> usize {
        self.open.load(Ordering::SeqCst)
    }

    /// SSE response bodies still alive: being sent, paused or held.
    pub fn open_streams(&self) -> usize {
        self.streams.load(Ordering::SeqCst)
    }

    /// Lets every `x-mock-hold` stream (current and future) go on.
    pub fn release(&self) {
        let _ = self.release.send(true);
    }

    /// From now on, requests made with `key` get `behaviour`.
    pub fn script(&self, key: &str, behaviour: Behaviour) {
        self.scripts
            .behaviours
            .lock()
            .unwrap()
            .insert(key.to_owned(), behaviour);
    }

    /// Requests the mock received with `key` (every path, probes included).
    pub fn requests_for(&self, key: &str) -> usize {
        self.scripts
            .counts
            .lock()
            .unwrap()
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// The requests received with `key` whose method and path are these.
    pub fn requests_to(&self, key: &str, method: &http::Method, path: &str) -> usize {
        self.received()
            .iter()
            .filter(|r| r.credential().as_deref() == Some(key))
            .filter(|r| r.method == *method && r.path_and_query == path)
            .count()
    }
}

/// Serves mock answers on `listener` until the task is aborted. With
/// `received`, every request is recorded (tests); without, nothing is kept
/// (load benchmarks).
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    received: Option<Arc<Mutex<Vec<Received>>>>,
    open: Arc<AtomicUsize>,
) {
    // Nobody holds the sender: `x-mock-hold` streams are never released.
    let (_, released) = watch::channel(false);
    let shared = Arc::new(Shared {
        received,
        streams: Arc::new(AtomicUsize::new(0)),
        released,
        scripts: Arc::default(),
    });
    serve_shared(listener, tls, shared, open).await;
}

async fn serve_shared(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    shared: Arc<Shared>,
    open: Arc<AtomicUsize>,
) {
    for connection in 0.. {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let _ = stream.set_nodelay(true);
        let shared = shared.clone();
        let open = open.clone();
        let tls = tls.clone();
        tokio::spawn(async move {
            open.fetch_add(1, Ordering::SeqCst);
            let service = service_fn(move |req| answer(req, shared.clone(), connection));
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
            open.fetch_sub(1, Ordering::SeqCst);
        });
    }
}

async fn answer(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    connection: usize,
) -> Result<Response<Body>, ResetConnection> {
    let close = req.headers().contains_key("x-mock-close");
    let mut resp = answer_request(req, shared, connection).await?;
    if close {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    Ok(resp)
}

async fn answer_request(
    req: Request<Incoming>,
    shared: Arc<Shared>,
    connection: usize,
) -> Result<Response<Body>, ResetConnection> {
    let (parts, body) = req.into_parts();
    let body = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    let Some(received) = &shared.received else {
        return Ok(route(&parts, &body));
    };
    let key = credential(&parts.headers);
    received.lock().unwrap().push(Received {
        connection,
        version: parts.version,
        method: parts.method.clone(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_owned())
            .unwrap_or_default(),
        headers: parts.headers.clone(),
        body: body.clone(),
    });
    if let Some(key) = key {
        let behaviour = shared.scripts.note(&key);
        if let Some(resp) = per_key(behaviour, &key, &parts).await? {
            return Ok(resp);
        }
    }
    Ok(scripted(&parts, &body, &shared).await)
}

/// The answer `behaviour` scripts for a request made with `key`; `None`
/// for the plain answer.
async fn per_key(
    mut behaviour: Behaviour,
    key: &str,
    parts: &http::request::Parts,
) -> Result<Option<Response<Body>>, ResetConnection> {
    let anthropic = parts.uri.path().ends_with("/messages");
    let error = |status: u16, message: &str, kind: &str, code: &str| {
        let body = if anthropic {
            serde_json::json!({"type": "error", "error": {"type": kind, "message": message}})
        } else {
            serde_json::json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
        };
        let mut resp = json(body.to_string().into());
        *resp.status_mut() = StatusCode::from_u16(status).unwrap();
        Some(resp)
    };
    loop {
        let resp = match behaviour {
            Behaviour::Ok => None,
            Behaviour::After(wait, next) => {
                tokio::time::sleep(wait).await;
                behaviour = *next;
                continue;
            }
            Behaviour::Slow(wait) => {
                tokio::time::sleep(wait).await;
                None
            }
            Behaviour::Reset => return Err(ResetConnection),
            Behaviour::Status429 { retry_after } => {
                let mut resp = error(
                    429,
                    "Rate limit reached for gpt-4o in organization org-mockorganization on requests per min (RPM): Limit 3, Used 3, Requested 1.",
                    "requests",
                    "rate_limit_exceeded",
                );
                if let (Some(resp), Some(secs)) = (resp.as_mut(), retry_after) {
                    resp.headers_mut()
                        .insert(header::RETRY_AFTER, HeaderValue::from(secs));
                }
                resp
            }
            Behaviour::Unauthorized => error(
                401,
                &format!(
                    "Incorrect API key provided: {}. You can find your API key at https://platform.openai.com/account/api-keys.",
                    key_fragment(key)
                ),
                "invalid_request_error",
                "invalid_api_key",
            ),
            Behaviour::InsufficientQuota
                if parts.method == http::Method::GET && parts.uri.path().ends_with("/models") =>
            {
                None
            }
            Behaviour::InsufficientQuota => error(
                429,
                "You exceeded your current quota, please check your plan and billing details.",
                "insufficient_quota",
                "insufficient_quota",
            ),
            Behaviour::PaymentRequired => error(
                402,
                "Your credit balance is too low to access the API.",
                "billing_error",
                "billing_hard_limit_reached",
            ),
            Behaviour::KeyNotValid => {
                let body = serde_json::json!({"error": {
                    "code": 400,
                    "message": "API key not valid. Please pass a valid API key.",
                    "status": "INVALID_ARGUMENT",
                    "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "API_KEY_INVALID", "domain": "googleapis.com"}]
                }});
                let mut resp = json(body.to_string().into());
                *resp.status_mut() = StatusCode::BAD_REQUEST;
                Some(resp)
            }
            Behaviour::CreditBalanceTooLow => error(
                400,
                "Your credit balance is too low to access the Anthropic API. Please go to Plans & Billing to upgrade or purchase credits.",
                "invalid_request_error",
                "invalid_request_error",
            ),
            Behaviour::ServerError => error(
                500,
                "The server had an error while processing your request.",
                "server_error",
                "server_error",
            ),
        };
        return Ok(resp);
    }
}

/// How an SSE answer is paced.
#[derive(Clone, Default)]
struct Pacing {
    /// Wait after the first event.
    pause: Option<Duration>,
    /// Wait after the first event until released.
    hold: Option<watch::Receiver<bool>>,
    /// Frame size in bytes; `None` sends one frame per event.
    fragment: Option<usize>,
    /// After the last frame, send nothing more and never end.
    hang: bool,
}

/// The answer for a request, honouring the `x-mock-*` behaviours.
async fn scripted(parts: &http::request::Parts, body: &Bytes, shared: &Shared) -> Response<Body> {
    let mut resp = scripted_answer(parts, body, shared).await;
    if parts.headers.contains_key("x-mock-unlabelled") {
        resp.headers_mut().remove(header::CONTENT_TYPE);
    }
    resp
}

async fn scripted_answer(
    parts: &http::request::Parts,
    body: &Bytes,
    shared: &Shared,
) -> Response<Body> {
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
    if let Some(text) = flag("x-mock-echo") {
        let status = flag("x-mock-echo-status")
            .and_then(|s| s.parse::<u16>().ok())
            .map_or(StatusCode::BAD_REQUEST, |s| {
                StatusCode::from_u16(s).unwrap()
            });
        return echo_error(&text, status, anthropic);
    }
    if flag("x-mock-cut-json").is_some() {
        let whole = openai_completion().to_string();
        return json(Bytes::from(whole[..whole.len() / 2].to_owned()));
    }
    let pacing = Pacing {
        pause: flag("x-mock-pause-ms")
            .and_then(|s| s.parse().ok())
            .map(Duration::from_millis),
        hold: flag("x-mock-hold").map(|_| shared.released.clone()),
        fragment: flag("x-mock-fragment")
            .and_then(|s| s.parse().ok())
            .filter(|n| *n > 0),
        hang: false,
    };
    let streams = Some(shared.streams.clone());
    if let Some(size) = flag("x-mock-unterminated").and_then(|s| s.parse().ok()) {
        let pacing = Pacing {
            fragment: Some(16 * 1024),
            hang: true,
            ..pacing
        };
        return sse(unterminated_events(size), pacing, streams);
    }
    if flag("x-mock-stream-error").is_some() {
        let key = credential(h).unwrap_or_default();
        let sse_asked = parts.uri.query().is_some_and(|q| q.contains("alt=sse"));
        if parts.uri.path().ends_with(":streamGenerateContent") && !sse_asked {
            return json(failing_gemini_chunks(&key).to_string().into());
        }
        let anthropic = parts.uri.path().ends_with("/messages");
        return sse(failing_events(&key, anthropic), pacing, streams);
    }
    if flag("x-mock-decorate").is_some() {
        return sse(decorated(openai_chunks()), pacing, streams);
    }
    match flag("x-mock-lines").as_deref() {
        Some("jsonl") => return streamed("application/jsonl", json_lines(), pacing, streams),
        Some(_) => return streamed("application/x-ndjson", json_lines(), pacing, streams),
        None => {}
    }
    let resp = answer_for(parts, body, pacing, streams);
    let (gzipped, truncated, stalled) = (
        flag("x-mock-gzip").is_some(),
        flag("x-mock-truncate").is_some(),
        flag("x-mock-stall").is_some(),
    );
    if !gzipped && !truncated && !stalled {
        return resp;
    }
    let (mut head, body) = resp.into_parts();
    let mut bytes = body
        .collect()
        .await
        .map(|c| c.to_bytes())
        .unwrap_or_default();
    if gzipped {
        head.headers
            .insert(header::CONTENT_ENCODING, HeaderValue::from_static("gzip"));
        bytes = Bytes::from(gzip(&bytes));
    }
    head.headers.remove(header::CONTENT_LENGTH);
    if stalled {
        head.headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        let half = bytes.slice(..bytes.len() / 2);
        let frames = futures_util::StreamExt::chain(
            futures_util::stream::once(async { Ok(Frame::data(half)) }),
            futures_util::stream::pending(),
        );
        return Response::from_parts(head, StreamBody::new(frames).boxed());
    }
    if truncated {
        // The server sends the head with this length, then half the body,
        // then closes the connection: the body is shorter than announced.
        head.headers
            .insert(header::CONTENT_LENGTH, HeaderValue::from(bytes.len()));
        let half = bytes.slice(..bytes.len() / 2);
        let frames = futures_util::stream::unfold(Some(half), |half| async move {
            match half {
                Some(half) => Some((Ok(Frame::data(half)), None)),
                None => {
                    // Let the head and the half go out before the break.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    None
                }
            }
        });
        return Response::from_parts(head, StreamBody::new(frames).boxed());
    }
    Response::from_parts(head, Full::new(bytes).boxed())
}

/// The plain answer for a request, without scripted behaviours (fast path
/// of the load benchmark).
fn route(parts: &http::request::Parts, body: &Bytes) -> Response<Body> {
    answer_for(parts, body, Pacing::default(), None)
}

fn answer_for(
    parts: &http::request::Parts,
    body: &Bytes,
    pacing: Pacing,
    streams: Option<Arc<AtomicUsize>>,
) -> Response<Body> {
    static COMPLETION: LazyLock<Bytes> = LazyLock::new(|| openai_completion().to_string().into());
    static MESSAGE: LazyLock<Bytes> = LazyLock::new(|| anthropic_message().to_string().into());
    let contains = |needle: &[u8]| body.windows(needle.len()).any(|w| w == needle);
    let stream = contains(b"\"stream\":true") || contains(b"\"stream\": true");
    let path = parts.uri.path();
    let anthropic = path.ends_with("/messages");
    if let Some(endpoint) = path.strip_prefix("/api/") {
        let streamed_lines = !(contains(b"\"stream\":false") || contains(b"\"stream\": false"));
        return match endpoint {
            "embed" => json(ollama_embed().to_string().into()),
            "chat" | "generate" if streamed_lines => streamed(
                "application/x-ndjson",
                ollama_lines(endpoint == "generate"),
                pacing,
                streams,
            ),
            "chat" | "generate" => json(
                ollama_answer(endpoint == "generate", "Hello world")
                    .to_string()
                    .into(),
            ),
            _ => error_response(StatusCode::NOT_FOUND, false),
        };
    }
    match (path, stream) {
        (p, true) if p.ends_with("/chat/completions") => sse(openai_chunks(), pacing, streams),
        (p, true) if p.ends_with("/messages") => sse(anthropic_events(), pacing, streams),
        (p, _) if p.ends_with(":streamGenerateContent") => {
            if parts.uri.query().is_some_and(|q| q.contains("alt=sse")) {
                sse(gemini_events(), pacing, streams)
            } else {
                json(serde_json::Value::from(gemini_chunks()).to_string().into())
            }
        }
        (p, false) if p.ends_with("/chat/completions") => json(COMPLETION.clone()),
        (p, false) if p.ends_with("/messages") => json(MESSAGE.clone()),
        (p, false) if p.ends_with(":generateContent") => json(gemini_response().to_string().into()),
        (p, false) if p.ends_with("/embeddings") => json(
            serde_json::json!({
                "object": "list", "model": PROVIDER_MODEL,
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, -0.2, 0.3]}],
                "usage": {"prompt_tokens": 5, "total_tokens": 5}
            })
            .to_string()
            .into(),
        ),
        (p, false) if p.ends_with("/models") => json(models_list().to_string().into()),
        (p, false) if p.contains("/models/") => json(
            model_object(p.rsplit('/').next().unwrap_or_default())
                .to_string()
                .into(),
        ),
        (p, false) if p.contains("/fine_tuning/jobs/") => {
            json(fine_tuning_job().to_string().into())
        }
        (p, false) if p.contains("/files/") => json(file_object().to_string().into()),
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

/// An SSE response sending `events` as `pacing` says. `streams` counts the
/// body while it is alive.
fn sse(events: Vec<String>, pacing: Pacing, streams: Option<Arc<AtomicUsize>>) -> Response<Body> {
    streamed("text/event-stream", events, pacing, streams)
}

/// A streamed response of `content_type` sending `records` as `pacing`
/// says.
fn streamed(
    content_type: &'static str,
    records: Vec<String>,
    pacing: Pacing,
    streams: Option<Arc<AtomicUsize>>,
) -> Response<Body> {
    let stream = event_stream(records, pacing, streams.map(StreamGuard::new));
    let mut resp = Response::new(StreamBody::new(stream).boxed());
    resp.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    with_provider_headers(resp)
}

/// Counts one live SSE body; the count drops when the body is dropped
/// (finished, or abandoned when the connection closed).
struct StreamGuard(Arc<AtomicUsize>);

impl StreamGuard {
    fn new(count: Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::SeqCst);
        StreamGuard(count)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// One frame of a paced stream: its bytes and what to wait for before it.
struct Step {
    bytes: Bytes,
    delay: Option<Duration>,
    /// Wait for the hold to be released before this frame.
    held: bool,
}

fn event_stream(
    events: Vec<String>,
    pacing: Pacing,
    guard: Option<StreamGuard>,
) -> impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>> {
    let mut steps = Vec::new();
    for (n, event) in events.into_iter().enumerate() {
        let after_first = n == 1;
        let event = Bytes::from(event);
        let pieces: Vec<Bytes> = match pacing.fragment {
            None => vec![event],
            Some(size) => (0..event.len())
                .step_by(size)
                .map(|at| event.slice(at..(at + size).min(event.len())))
                .collect(),
        };
        for (i, bytes) in pieces.into_iter().enumerate() {
            let first_piece = i == 0;
            let fragment_delay = pacing.fragment.map(|_| Duration::from_millis(1));
            steps.push(Step {
                bytes,
                delay: if after_first && first_piece {
                    pacing.pause.or(fragment_delay)
                } else {
                    fragment_delay
                },
                held: after_first && first_piece && pacing.hold.is_some(),
            });
        }
    }
    let (hold, hang) = (pacing.hold, pacing.hang);
    futures_util::stream::unfold(
        (steps.into_iter(), hold, guard),
        move |(mut it, mut hold, guard)| async move {
            let Some(step) = it.next() else {
                if hang {
                    std::future::pending::<()>().await;
                }
                return None;
            };
            if step.held
                && let Some(rx) = hold.as_mut()
            {
                let _ = rx.wait_for(|released| *released).await;
            }
            if let Some(d) = step.delay {
                tokio::time::sleep(d).await;
            }
            Some((Ok(Frame::data(step.bytes)), (it, hold, guard)))
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
        "system_fingerprint": "fp_mockfingerprint",
        "x_provider_trace": {"region": "us-east-mock"}
    })
}

/// The organisation the mock's resources belong to; never shown to a client.
pub const ORGANIZATION: &str = "org-mockorganization";
/// A fine-tuned model of the mock's organisation, and the user owning it.
pub const FINE_TUNED_MODEL: &str = "ft:gpt-4o-mini-2024-07-18:acme::9A8b7C6d";
pub const MODEL_OWNER_USER: &str = "user-mockowner0123";

/// `GET /v1/models`: a vendor model and a fine-tuned one owned by a user.
pub fn models_list() -> serde_json::Value {
    serde_json::json!({
        "object": "list",
        "data": [
            {"id": "gpt-4o", "object": "model", "created": 1715367049, "owned_by": "system"},
            {"id": FINE_TUNED_MODEL, "object": "model", "created": 1721000000, "owned_by": MODEL_OWNER_USER}
        ]
    })
}

/// `GET /v1/models/{id}`: fine-tuned models belong to the organisation.
pub fn model_object(id: &str) -> serde_json::Value {
    let owner = if id.starts_with("ft:") {
        ORGANIZATION
    } else {
        "system"
    };
    serde_json::json!({"id": id, "object": "model", "created": 1715367049, "owned_by": owner})
}

/// Handles of the mock's resources, which clients pass back.
pub const FINE_TUNING_JOB_ID: &str = "ftjob-abc123mock";
pub const FILE_ID: &str = "file-abc123mock";

/// `GET /v1/fine_tuning/jobs/{id}`: a job of the mock's organisation.
pub fn fine_tuning_job() -> serde_json::Value {
    serde_json::json!({
        "object": "fine_tuning.job", "id": FINE_TUNING_JOB_ID, "model": "gpt-4o-mini-2024-07-18",
        "created_at": 1721000000, "fine_tuned_model": null, "organization_id": ORGANIZATION,
        "result_files": [], "status": "queued", "training_file": FILE_ID, "metadata": null
    })
}

/// `GET /v1/files/{id}`.
pub fn file_object() -> serde_json::Value {
    serde_json::json!({
        "id": FILE_ID, "object": "file", "bytes": 120000, "created_at": 1721000000,
        "filename": "train.jsonl", "purpose": "fine-tune"
    })
}

pub fn anthropic_message() -> serde_json::Value {
    serde_json::json!({
        "id": ANTHROPIC_ID,
        "type": "message",
        "role": "assistant",
        "model": ANTHROPIC_MODEL,
        "content": [{"type": "text", "text": "Hello from the mock."}],
        "stop_reason": "end_turn",
        "stop_sequence": null,
        "usage": {"input_tokens": 12, "output_tokens": 6, "service_tier": "standard"}
    })
}

/// A `generateContent` answer: 4 prompt tokens, 5 answer and 3 thinking
/// tokens.
pub fn gemini_response() -> serde_json::Value {
    serde_json::json!({
        "candidates": [{"content": {"parts": [{"text": "Hello from the mock."}], "role": "model"}, "finishReason": "STOP", "index": 0}],
        "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": 5, "thoughtsTokenCount": 3, "totalTokenCount": 12},
        "modelVersion": GEMINI_MODEL_VERSION,
        "responseId": GEMINI_RESPONSE_ID
    })
}

/// The chunks of a `streamGenerateContent` answer: usage grows to 4 prompt
/// and 2 answer tokens.
pub fn gemini_chunks() -> Vec<serde_json::Value> {
    ["Hel", "lo"]
        .iter()
        .enumerate()
        .map(|(i, text)| {
            let mut chunk = serde_json::json!({
                "candidates": [{"content": {"parts": [{"text": text}], "role": "model"}, "index": 0}],
                "usageMetadata": {"promptTokenCount": 4, "candidatesTokenCount": i + 1, "totalTokenCount": 5 + i},
                "modelVersion": GEMINI_MODEL_VERSION,
                "responseId": GEMINI_RESPONSE_ID
            });
            if i == 1 {
                chunk["candidates"][0]["finishReason"] = "STOP".into();
            }
            chunk
        })
        .collect()
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
        format!("event: message_start\ndata: {{\"type\":\"message_start\",\"message\":{{\"id\":\"{ANTHROPIC_ID}\",\"type\":\"message\",\"role\":\"assistant\",\"model\":\"{ANTHROPIC_MODEL}\",\"content\":[],\"stop_reason\":null,\"usage\":{{\"input_tokens\":25,\"output_tokens\":1,\"service_tier\":\"standard\"}}}}}}\n\n"),
        "event: content_block_start\ndata: {\"type\":\"content_block_start\",\"index\":0,\"content_block\":{\"type\":\"text\",\"text\":\"\"}}\n\n".into(),
        "event: ping\ndata: {\"type\": \"ping\"}\n\n".into(),
        "event: content_block_delta\ndata: {\"type\":\"content_block_delta\",\"index\":0,\"delta\":{\"type\":\"text_delta\",\"text\":\"Hello\"}}\n\n".into(),
        "event: content_block_stop\ndata: {\"type\":\"content_block_stop\",\"index\":0}\n\n".into(),
        "event: message_delta\ndata: {\"type\":\"message_delta\",\"delta\":{\"stop_reason\":\"end_turn\",\"stop_sequence\":null},\"usage\":{\"output_tokens\":15}}\n\n".into(),
        "event: message_stop\ndata: {\"type\":\"message_stop\"}\n\n".into(),
    ]
}

/// The chat chunks as JSON lines; the last one (the usage) has no newline
/// after it.
pub fn json_lines() -> Vec<String> {
    let mut lines: Vec<String> = openai_chunks()
        .iter()
        .filter_map(|event| event.strip_prefix("data: "))
        .map(str::trim_end)
        .filter(|json| *json != "[DONE]")
        .map(|json| format!("{json}\n"))
        .collect();
    if let Some(last) = lines.last_mut() {
        last.pop();
    }
    lines
}

/// An Ollama native chat (or, with `generate`, generate) answer carrying
/// `text`; with an empty text, a stream's first line before the last.
fn ollama_line(generate: bool, text: &str, done: bool) -> serde_json::Value {
    let mut line = serde_json::json!({
        "model": OLLAMA_MODEL, "created_at": "2026-11-23T10:30:00.123456789Z", "done": done
    });
    if generate {
        line["response"] = text.into();
    } else {
        line["message"] = serde_json::json!({"role": "assistant", "content": text});
    }
    line
}

/// The whole answer: the last line of a stream, with its counts.
fn ollama_answer(generate: bool, text: &str) -> serde_json::Value {
    let mut last = ollama_line(generate, text, true);
    for (k, v) in [
        ("done_reason", serde_json::json!("stop")),
        ("total_duration", 4883583458u64.into()),
        ("load_duration", 1334875.into()),
        ("prompt_eval_count", 26.into()),
        ("prompt_eval_duration", 342546000.into()),
        ("eval_count", 2.into()),
        ("eval_duration", 4535599000u64.into()),
    ] {
        last[k] = v;
    }
    if generate {
        last["context"] = serde_json::json!([128006, 882, 128007]);
    }
    last
}

/// An Ollama native stream: a line per word, then the last line (empty
/// text, the counts).
pub fn ollama_lines(generate: bool) -> Vec<String> {
    let words = ["Hello", " world"].map(|w| ollama_line(generate, w, false));
    words
        .iter()
        .chain([&ollama_answer(generate, "")])
        .map(|line| format!("{line}\n"))
        .collect()
}

fn ollama_embed() -> serde_json::Value {
    serde_json::json!({
        "model": OLLAMA_MODEL, "embeddings": [[0.010071029, -0.0017594862, 0.05007221]],
        "total_duration": 14143917, "load_duration": 1019500, "prompt_eval_count": 8
    })
}

/// The message of the mock's stream error events: it quotes the first six
/// and last four characters of `key`, as providers quote masked keys.
pub fn key_edges_message(key: &str) -> String {
    let head: String = key.chars().take(6).collect();
    let tail = &key[key.len().saturating_sub(4)..];
    format!("Overloaded while serving key {head}.. (ending {tail}); retry later")
}

/// A stream's first event, then the provider's error event: OpenAI's
/// `{"error": …}` data, or Anthropic's `error` event.
pub fn failing_events(key: &str, anthropic: bool) -> Vec<String> {
    let message = key_edges_message(key);
    if anthropic {
        vec![
            anthropic_events().swap_remove(0),
            format!(
                "event: error\ndata: {}\n\n",
                serde_json::json!({"type": "error", "error": {"type": "overloaded_error", "message": message}})
            ),
        ]
    } else {
        vec![
            openai_chunks().swap_remove(0),
            format!(
                "data: {}\n\n",
                serde_json::json!({"error": {"message": message, "type": "server_error", "code": null}})
            ),
        ]
    }
}

/// A non-SSE `streamGenerateContent` answer failing after its first chunk:
/// Gemini ends the array with its error object.
pub fn failing_gemini_chunks(key: &str) -> serde_json::Value {
    let mut chunks = gemini_chunks();
    chunks.truncate(1);
    chunks.push(serde_json::json!({"error": {"code": 503, "message": key_edges_message(key), "status": "UNAVAILABLE"}}));
    chunks.into()
}

/// Text of the mock's SSE comments and event ids; never shown to a client.
pub const STREAM_DECORATION: [&str; 3] = ["OPENROUTER PROCESSING", "mock-node-7", "evt_PROVIDER"];

/// `events` with a leading comment, an `id:` line and a comment in each
/// event, and a `retry:` hint in the first.
pub fn decorated(events: Vec<String>) -> Vec<String> {
    let mut out = vec![": OPENROUTER PROCESSING upstream=mock-eastus\n\n".to_owned()];
    for (i, event) in events.into_iter().enumerate() {
        let retry = if i == 0 { "retry: 3000\n" } else { "" };
        out.push(format!(
            "id: evt_PROVIDER_{i}\n{retry}: served by mock-node-7\n{event}"
        ));
    }
    out
}

/// A chat chunk, then an event whose `data:` line runs on for `size` bytes
/// without ever ending.
pub fn unterminated_events(size: usize) -> Vec<String> {
    let mut long = format!(
        "data: {{\"id\":\"{PROVIDER_ID}\",\"object\":\"chat.completion.chunk\",\"choices\":[{{\"index\":0,\"delta\":{{\"content\":\""
    );
    long.push_str(&"a".repeat(size));
    vec![openai_chunks().swap_remove(0), long]
}

/// `streamGenerateContent?alt=sse`: the chunks as events with CRLF line ends.
pub fn gemini_events() -> Vec<String> {
    gemini_chunks()
        .iter()
        .map(|chunk| format!("data: {chunk}\r\n\r\n"))
        .collect()
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

/// A 400 whose message quotes `text` as the value the client sent, in
/// OpenAI's or Anthropic's shape.
fn echo_error(text: &str, status: StatusCode, anthropic: bool) -> Response<Body> {
    let body = if anthropic {
        serde_json::json!({"type": "error", "error": {"type": "invalid_request_error",
            "message": format!("messages.0.role: Input should be 'user' or 'assistant', got '{text}'")}})
    } else {
        serde_json::json!({"error": {"type": "invalid_request_error", "param": "messages[0].role", "code": "invalid_value",
            "message": format!("Invalid value: '{text}'. Supported values are: 'system', 'assistant', 'user'.")}})
    };
    let mut resp = json(body.to_string().into());
    *resp.status_mut() = status;
    resp
}

/// `data` as a gzip member made of stored (uncompressed) deflate blocks: a
/// valid gzip body any decoder accepts, without a compression dependency.
pub fn gzip(data: &[u8]) -> Vec<u8> {
    let mut out = vec![0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 0xff];
    let blocks: Vec<&[u8]> = if data.is_empty() {
        vec![&[]]
    } else {
        data.chunks(0xffff).collect()
    };
    let last = blocks.len() - 1;
    for (i, block) in blocks.into_iter().enumerate() {
        out.push(u8::from(i == last));
        let len = block.len() as u16;
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&(!len).to_le_bytes());
        out.extend_from_slice(block);
    }
    out.extend_from_slice(&crc32(data).to_le_bytes());
    out.extend_from_slice(&(data.len() as u32).to_le_bytes());
    out
}

fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xedb8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}
