//! Turning the provider's answer into the client's: error statuses become
//! gateway errors, headers pass an allow-list, JSON bodies are rewritten
//! whole, event streams and JSON-lines streams are rewritten event by event
//! (line by line) as they flow, other bodies stream through unchanged. A
//! body the provider sent without a `Content-Type` is judged by its first
//! bytes: one that opens like a JSON document is rewritten as JSON, one that
//! opens like an event stream (`data:`, `event:`, a `:` comment) as events,
//! so a provider that leaves the header out cannot pass its ids through.

use super::body::{Mode, RewriteSpec, StreamBody};
use super::error::ProxyError;
use super::outcome::{Completion, End};
use super::provider_error::ProviderError;
use super::read_timeout::BodyStalled;
use super::upstream::UpstreamBody;
use crate::health::Verdict;
use crate::http::{Body, BoxError, ReadBodyError, full, read_limited};
use crate::keys::pool::PoolKey;
use crate::sanitize::json::{Rewritten, Unrewritten, Usage, rewrite, scrub_error};
use crate::sanitize::stream::{Framing, StreamRewriter};
use bytes::Bytes;
use http::Response;
use http::header::{self, HeaderMap};
use http_body::Frame;
use http_body_util::BodyExt;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// Largest JSON body rewritten in one piece (a big embeddings batch is tens
/// of MiB); a larger one is refused rather than passed on unsanitized.
const MAX_JSON_BODY: usize = 256 * 1024 * 1024;
/// Largest provider error body read for its message.
const MAX_ERROR_BODY: usize = 64 * 1024;
/// Time allowed for reading a provider's error body.
const ERROR_BODY_TIMEOUT: Duration = Duration::from_secs(10);

/// What a provider's answer means for the attempt.
pub enum Answer {
    /// Goes to the client: a success, or a refusal of the request itself.
    Deliver(Response<UpstreamBody>),
    /// The provider refused the request itself (read and judged already):
    /// not retried, and the key keeps its state.
    Refused(ProxyError),
    /// The key's fault (429, 402, 401, and 400/403 that name the key):
    /// try another key.
    KeyFault(Verdict),
    /// The provider's trouble (5xx): try another key; the key is fine.
    ProviderFault(ProxyError),
}

async fn error_body(resp: Response<UpstreamBody>) -> bytes::Bytes {
    tokio::time::timeout(
        ERROR_BODY_TIMEOUT,
        read_limited(resp.into_body(), MAX_ERROR_BODY),
    )
    .await
    .ok()
    .and_then(Result::ok)
    .unwrap_or_default()
}

/// Sorts a provider answer. Bodies of 400, 403 and 429 are read: a 403 is
/// the key's fault only when it says so (a 403 about a resource the client
/// named must not let a client invalidate keys at will), a 400 can be
/// Gemini's bad key or Anthropic's spent balance, a 429 OpenAI's exhausted
/// quota.
pub async fn classify(resp: Response<UpstreamBody>, key: &PoolKey) -> Answer {
    let status = resp.status();
    match status.as_u16() {
        401 => Answer::KeyFault(Verdict::Rejected),
        402 => Answer::KeyFault(Verdict::QuotaExhausted),
        400 | 403 => {
            let error = ProviderError::parse(&error_body(resp).await);
            match error.about_key() {
                Some(verdict) => Answer::KeyFault(verdict),
                None => {
                    let message = (status.as_u16() == 400)
                        .then(|| error.client_message(key))
                        .flatten();
                    Answer::Refused(ProxyError::ProviderRefused { status, message })
                }
            }
        }
        429 => {
            let wait = retry_after(resp.headers(), chrono::Utc::now());
            match ProviderError::parse(&error_body(resp).await).about_key() {
                Some(Verdict::QuotaExhausted) => Answer::KeyFault(Verdict::QuotaExhausted),
                _ => Answer::KeyFault(Verdict::RateLimited { retry_after: wait }),
            }
        }
        504 => Answer::ProviderFault(ProxyError::UpstreamTimeout),
        500..=599 => Answer::ProviderFault(ProxyError::UpstreamFailed),
        _ => Answer::Deliver(resp),
    }
}

/// The client's response for the provider's answer `resp`. A streamed
/// event longer than `max_record` bytes ends the stream.
pub async fn respond(
    mut resp: Response<UpstreamBody>,
    spec: RewriteSpec,
    max_record: usize,
    completion: &mut Option<Completion>,
) -> Result<Response<Body>, ProxyError> {
    let status = resp.status();
    if status.is_client_error() || status.is_server_error() {
        return Err(refusal(resp, &spec.key).await);
    }
    let encoded = resp
        .headers()
        .get(header::CONTENT_ENCODING)
        .is_some_and(|v| v.as_bytes() != b"identity");
    if encoded {
        // Asked for identity; a compressed body could not be sanitized.
        tracing::warn!("provider sent a compressed body despite accept-encoding: identity");
        return Err(ProxyError::UpstreamFailed);
    }
    // `None` without a `Content-Type`: judged by how the body opens.
    let labelled = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .map(|v| v.to_str().map_or(BodyKind::Other, BodyKind::of));
    let mut out = Response::builder().status(status);
    let mut headers = std::mem::take(resp.headers_mut());
    keep_allowed(&mut headers);
    *out.headers_mut().expect("builder without errors") = headers;

    let mut acct = completion
        .take()
        .expect("completion started before respond");
    acct.set_status(status);
    let mut body = Prepended {
        first: None,
        rest: resp.into_body(),
    };
    let kind = match labelled {
        Some(kind) => kind,
        None => match body.rest.frame().await.transpose() {
            Ok(first) => {
                body.first = first.and_then(|f| f.into_data().ok());
                BodyKind::sniff(body.first.as_deref().unwrap_or_default())
            }
            Err(e) => {
                *completion = Some(acct);
                return Err(unreadable(e));
            }
        },
    };
    let body: Body = match kind {
        BodyKind::Json => json_body(body, &spec, acct, completion).await?,
        BodyKind::Records(framing) => {
            let stream = StreamRewriter::new(framing, max_record);
            let mode = Mode::Records(Box::new(stream), spec);
            BodyExt::boxed(StreamBody::new(body, mode, acct))
        }
        BodyKind::Other => BodyExt::boxed(StreamBody::new(body, Mode::Raw, acct)),
    };
    out.body(body).map_err(|_| ProxyError::UpstreamFailed)
}

enum BodyKind {
    Json,
    /// A stream of records rewritten one by one.
    Records(Framing),
    Other,
}

/// The media types of JSON-lines streams (Ollama-style servers and others).
const JSON_LINES: [&str; 4] = [
    "application/x-ndjson",
    "application/ndjson",
    "application/jsonl",
    "application/x-jsonlines",
];

impl BodyKind {
    /// What a body without a `Content-Type` is, by how it opens: a JSON
    /// document, an event stream (`data:`, `event:`, a `:` comment), or
    /// anything else.
    fn sniff(opening: &[u8]) -> Self {
        let opening = opening.trim_ascii_start();
        if matches!(opening.first(), Some(b'{' | b'[')) {
            BodyKind::Json
        } else if [&b"data:"[..], b"event:", b":"]
            .iter()
            .any(|field| opening.starts_with(field))
        {
            BodyKind::Records(Framing::Events)
        } else {
            BodyKind::Other
        }
    }

    fn of(content_type: &str) -> Self {
        let essence = content_type.split(';').next().unwrap_or("").trim();
        if essence.eq_ignore_ascii_case("text/event-stream") {
            BodyKind::Records(Framing::Events)
        } else if JSON_LINES.iter().any(|t| essence.eq_ignore_ascii_case(t)) {
            BodyKind::Records(Framing::Lines)
        } else if essence.eq_ignore_ascii_case("application/json") || essence.ends_with("+json") {
            BodyKind::Json
        } else {
            BodyKind::Other
        }
    }
}

/// A JSON answer read whole and rewritten. On failure `acct` is handed back
/// through `completion`, so that the caller accounts the request once, as
/// the error the client gets.
async fn json_body(
    body: Prepended,
    spec: &RewriteSpec,
    acct: Completion,
    completion: &mut Option<Completion>,
) -> Result<Body, ProxyError> {
    let bytes = match read_limited(body, MAX_JSON_BODY).await {
        Ok(bytes) => bytes,
        Err(e) => {
            *completion = Some(acct);
            return Err(match e {
                ReadBodyError::Broken(e) => unreadable(e),
                ReadBodyError::TooLarge => ProxyError::UpstreamUnreachable,
            });
        }
    };
    let mut usage = Usage::default();
    let mut rewritten = Vec::new();
    let rw = spec.as_rewrite();
    let (body, end) = match rewrite(&bytes, &rw, &mut rewritten, &mut usage) {
        Ok(Rewritten::Document) => (full(rewritten), End::Complete),
        // A provider error in a successful answer (OpenAI-compatible
        // servers send some, Gemini ends a failed non-SSE stream with one):
        // its text may quote the key, and the request failed, as with an
        // error event in a stream.
        Ok(Rewritten::Error) => (
            full(scrub_error(&rewritten, rw.key).into_owned()),
            End::ErrorEvent,
        ),
        Err(Unrewritten::NotJson) => (full(bytes), End::Complete),
        Err(Unrewritten::Broken) => {
            // Cut short or garbled: it may name the provider's id and model
            // snapshot, and cannot be rewritten.
            tracing::warn!("the provider's JSON body does not parse; not passed on");
            *completion = Some(acct);
            return Err(ProxyError::UpstreamFailed);
        }
    };
    acct.finish(end, usage);
    Ok(body)
}

/// A provider body, with its first chunk in front when that was taken to
/// be looked at (a body without a `Content-Type`).
struct Prepended {
    first: Option<Bytes>,
    rest: UpstreamBody,
}

impl http_body::Body for Prepended {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        match self.first.take() {
            Some(first) => Poll::Ready(Some(Ok(Frame::data(first)))),
            None => Pin::new(&mut self.rest).poll_frame(cx),
        }
    }

    fn is_end_stream(&self) -> bool {
        self.first.is_none() && self.rest.is_end_stream()
    }
}

/// The error for a provider body that broke off while being read: a stall
/// is a timeout, anything else a lost provider.
fn unreadable(e: BoxError) -> ProxyError {
    if e.is::<BodyStalled>() {
        ProxyError::UpstreamTimeout
    } else {
        ProxyError::UpstreamUnreachable
    }
}

/// Empties the provider's header map of all but the only headers a client
/// sees from it (length and framing headers are set by the server for the
/// body actually sent). The client's response is built in that map, reusing
/// its room instead of allocating another; room is kept for the most a
/// response gets besides (request id, security headers, CORS), so nothing
/// regrows on the way out.
fn keep_allowed(headers: &mut HeaderMap) {
    let kept = [header::CONTENT_TYPE, header::CACHE_CONTROL].map(|name| {
        let value = headers.remove(&name);
        (name, value)
    });
    headers.clear();
    headers.reserve(10);
    for (name, value) in kept {
        if let Some(value) = value {
            headers.insert(name, value);
        }
    }
}

/// The error for a provider's refusal of the request itself (a 4xx that
/// is not about the key). A message is kept only for the statuses that are
/// about the request's content, scrubbed of anything key-like.
async fn refusal(resp: Response<UpstreamBody>, key: &PoolKey) -> ProxyError {
    let status = resp.status();
    let message = if matches!(status.as_u16(), 404 | 413 | 422) {
        ProviderError::parse(&error_body(resp).await).client_message(key)
    } else {
        None
    };
    ProxyError::ProviderRefused { status, message }
}

/// The longest provider `Retry-After` honoured: a day (a daily quota's
/// reset). A longer one is taken as a day rather than parking a key for as
/// long as a broken header says.
const MAX_PROVIDER_WAIT: Duration = Duration::from_secs(24 * 3600);

/// A provider's `Retry-After` as a wait from `now`: delay-seconds (a
/// fraction rounded up) or an HTTP-date, at least one second and at most
/// [`MAX_PROVIDER_WAIT`]. `None` when absent or unreadable.
pub fn retry_after(headers: &HeaderMap, now: chrono::DateTime<chrono::Utc>) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    let secs = match value.parse::<f64>() {
        Ok(secs) if secs.is_finite() && secs >= 0.0 => secs,
        Ok(_) => return None,
        Err(_) => {
            let date = chrono::DateTime::parse_from_rfc2822(value).ok()?;
            (date.with_timezone(&chrono::Utc) - now)
                .num_milliseconds()
                .max(0) as f64
                / 1000.0
        }
    };
    let secs = secs.ceil().clamp(1.0, MAX_PROVIDER_WAIT.as_secs_f64());
    Some(Duration::from_secs(secs as u64))
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::header::HeaderValue;

    #[test]
    fn retry_after_is_whole_seconds_from_one_second_to_a_day() {
        let now = chrono::DateTime::parse_from_rfc3339("2015-10-21T07:27:50Z")
            .unwrap()
            .to_utc();
        let wait = |value: &'static str| {
            let mut h = HeaderMap::new();
            h.insert(header::RETRY_AFTER, HeaderValue::from_static(value));
            retry_after(&h, now).map(|d| d.as_secs())
        };
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
        assert_eq!(wait("0"), Some(1));
        assert_eq!(wait("2.3"), Some(3));
        assert_eq!(wait("99999999"), Some(24 * 3600));
        assert_eq!(wait("-5"), None);
        assert_eq!(wait("soon"), None);
        // An HTTP-date: ten seconds after `now`; one already past is 1 s.
        assert_eq!(wait("Wed, 21 Oct 2015 07:28:00 GMT"), Some(10));
        assert_eq!(wait("Wed, 21 Oct 2015 07:00:00 GMT"), Some(1));
    }

    #[test]
    fn body_kinds() {
        assert!(matches!(
            BodyKind::of("application/json; charset=utf-8"),
            BodyKind::Json
        ));
        assert!(matches!(
            BodyKind::of("text/event-stream"),
            BodyKind::Records(Framing::Events)
        ));
        for lines in ["application/x-ndjson", "application/jsonl; charset=utf-8"] {
            assert!(matches!(
                BodyKind::of(lines),
                BodyKind::Records(Framing::Lines)
            ));
        }
        assert!(matches!(
            BodyKind::of("application/problem+json"),
            BodyKind::Json
        ));
        assert!(matches!(BodyKind::of("audio/mpeg"), BodyKind::Other));
        // Without a Content-Type, by how the body opens.
        for json in [&b" {\"id\":1}"[..], b"\n[{}]"] {
            assert!(matches!(BodyKind::sniff(json), BodyKind::Json));
        }
        for events in [&b"data: {}"[..], b"event: x", b": keep-alive"] {
            assert!(matches!(
                BodyKind::sniff(events),
                BodyKind::Records(Framing::Events)
            ));
        }
        for other in [&b""[..], b"plain words", b"\xff\xd8 jpeg", b"WEBVTT"] {
            assert!(matches!(BodyKind::sniff(other), BodyKind::Other));
        }
    }
}
