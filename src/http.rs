//! Small HTTP helpers shared by every listener: the response body type,
//! request ids, security headers and bounded body reading.

use crate::error::GatewayError;
use bytes::Bytes;
use http::{HeaderMap, HeaderValue, Response, StatusCode, header};
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

pub const X_REQUEST_ID: &str = "x-request-id";

/// The request id for this request: the client's `x-request-id` when it
/// matches `^[A-Za-z0-9._-]{1,64}$`, else a new one.
pub fn request_id(headers: &HeaderMap) -> String {
    headers
        .get(X_REQUEST_ID)
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 64
                && v.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        })
        .map_or_else(
            || format!("req_{}", crate::keys::model::random_token(20)),
            str::to_owned,
        )
}

/// Adds `x-request-id` and the security headers every response carries.
pub fn finish(resp: &mut Response<Body>, request_id: &str, over_tls: bool) {
    let headers = resp.headers_mut();
    if let Ok(v) = HeaderValue::from_str(request_id) {
        headers.insert(X_REQUEST_ID, v);
    }
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
/// passed (never buffering more than `max`).
pub async fn read_limited<B>(body: B, max: usize) -> Result<Bytes, ReadBodyError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: Into<BoxError>,
{
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
        h.insert(X_REQUEST_ID, HeaderValue::from_static("abc.DEF_1-2"));
        assert_eq!(request_id(&h), "abc.DEF_1-2");
        h.insert(X_REQUEST_ID, HeaderValue::from_static("has space"));
        assert!(request_id(&h).starts_with("req_"));
        h.insert(
            X_REQUEST_ID,
            HeaderValue::from_str(&"a".repeat(65)).unwrap(),
        );
        assert!(request_id(&h).starts_with("req_"));
    }

    #[tokio::test]
    async fn limited_read_stops_at_the_limit() {
        let ok = read_limited(Full::new(Bytes::from_static(b"12345")), 5).await;
        assert_eq!(ok.unwrap(), Bytes::from_static(b"12345"));
        let big = read_limited(Full::new(Bytes::from_static(b"123456")), 5).await;
        assert!(matches!(big, Err(ReadBodyError::TooLarge)), "{big:?}");
    }
}
