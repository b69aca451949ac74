//! Small HTTP helpers shared by every listener: the response body type,
//! request ids, security headers and bounded body reading.

use crate::error::GatewayError;
use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue, Response, StatusCode, header};
use http_body_util::{BodyExt, Full, Limited, combinators::BoxBody};
use serde::Serialize;

/// Boxed error of a response body stream.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The response body of every listener: a whole buffer for keyrouter's own
/// answers, a stream for proxied ones.
pub type Body = BoxBody<Bytes, BoxError>;

/// A body made of one buffer.
pub fn full(bytes: impl Into<Bytes>) -> Body {
    Full::new(bytes.into())
        .map_err(|never| match never {})
        .boxed()
}

/// A JSON response with the given status.
pub fn json<T: Serialize>(status: StatusCode, value: &T) -> Response<Body> {
    match serde_json::to_vec(value) {
        Ok(bytes) => {
            let mut resp = Response::new(full(bytes));
            *resp.status_mut() = status;
            resp.headers_mut().insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/json"),
            );
            resp
        }
        Err(_) => GatewayError::internal().into_response(""),
    }
}

/// A name constant rather than a `&str`: a `&str` name is parsed and
/// validated again at every lookup.
pub const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// A request's id: the client's `x-request-id` when it matches
/// `^[A-Za-z0-9._-]{1,64}$`, else a new `req_...` one.
///
/// Held as the header value itself: echoing it in the response, the error
/// body and the access log costs no copy (a reused client id shares the
/// request head's buffer).
#[derive(Clone, Debug)]
pub struct RequestId(HeaderValue);

impl RequestId {
    pub fn of(headers: &HeaderMap) -> Self {
        match headers.get(&X_REQUEST_ID) {
            Some(v) if is_well_formed(v.as_bytes()) => RequestId(v.clone()),
            _ => RequestId::generate(),
        }
    }

    fn generate() -> Self {
        let id = crate::ids::prefixed("req_", 20);
        RequestId(HeaderValue::from_maybe_shared(Bytes::from(id)).expect("ids are visible ASCII"))
    }

    pub fn as_str(&self) -> &str {
        // Well-formed ids are ASCII by construction.
        self.0.to_str().unwrap_or_default()
    }
}

impl std::fmt::Display for RequestId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

fn is_well_formed(id: &[u8]) -> bool {
    (1..=64).contains(&id.len())
        && id
            .iter()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Adds `x-request-id` and the security headers every response carries.
pub fn finish(resp: &mut Response<Body>, request_id: &RequestId, over_tls: bool) {
    let headers = resp.headers_mut();
    headers.insert(X_REQUEST_ID, request_id.0.clone());
    headers.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    headers.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    headers.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    if over_tls {
        headers.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=31536000"),
        );
    }
}

/// Why a body could not be read whole.
#[derive(Debug)]
pub enum ReadBodyError {
    TooLarge,
    /// The body failed with this error (kept so a caller can tell, say, a
    /// stalled provider from a broken connection).
    Broken(BoxError),
}

/// Reads a body of at most `max` bytes, stopping as soon as the limit is
/// passed (never buffering more than `max`). A body whose announced length
/// (`Content-Length`) is already over `max` is refused without being
/// polled: waiting for it would only hold the connection, and hyper sends
/// `100 Continue` to a client that asked for it only once the body is polled.
pub async fn read_limited<B>(body: B, max: usize) -> Result<Bytes, ReadBodyError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
    if body.size_hint().lower() > max as u64 {
        return Err(ReadBodyError::TooLarge);
    }
    match Limited::new(body, max).collect().await {
        Ok(collected) => Ok(collected.to_bytes()),
        Err(e) if e.is::<http_body_util::LengthLimitError>() => Err(ReadBodyError::TooLarge),
        Err(e) => Err(ReadBodyError::Broken(e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_request_id_reused_only_when_well_formed() {
        let mut h = HeaderMap::new();
        assert!(RequestId::of(&h).as_str().starts_with("req_"));
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc.DEF_1-2"));
        assert_eq!(RequestId::of(&h).as_str(), "abc.DEF_1-2");
        h.insert(X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert!(RequestId::of(&h).as_str().starts_with("req_"));
        h.insert(
            X_REQUEST_ID,
            HeaderValue::from_str(&"a".repeat(65)).unwrap(),
        );
        assert!(RequestId::of(&h).as_str().starts_with("req_"));
        h.insert(X_REQUEST_ID, HeaderValue::from_static(""));
        assert!(RequestId::of(&h).as_str().starts_with("req_"));
    }

    #[tokio::test]
    async fn limited_read_stops_at_the_limit() {
        let ok = read_limited(Full::new(Bytes::from_static(b"12345")), 5).await;
        assert_eq!(ok.unwrap(), Bytes::from_static(b"12345"));
        let big = read_limited(Full::new(Bytes::from_static(b"123456")), 5).await;
        assert!(matches!(big, Err(ReadBodyError::TooLarge)), "{big:?}");
    }

    /// Announces a length and panics if polled.
    struct Announced(u64);

    impl http_body::Body for Announced {
        type Data = Bytes;
        type Error = std::convert::Infallible;
        fn poll_frame(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
            panic!("a body announced over the limit was polled")
        }
        fn size_hint(&self) -> http_body::SizeHint {
            http_body::SizeHint::with_exact(self.0)
        }
    }

    #[tokio::test]
    async fn an_announced_oversize_body_is_refused_unread() {
        let big = read_limited(Announced(6), 5).await;
        assert!(matches!(big, Err(ReadBodyError::TooLarge)), "{big:?}");
    }
}
