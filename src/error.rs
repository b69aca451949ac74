//! The gateway error: the one place where anything that goes wrong becomes the
//! contract's error body.
//!
//! Every error keyrouter itself produces, on every listener, is a
//! [`GatewayError`]: an [`ErrorKind`] (which fixes the contract `type` and
//! the default status) and a message that is either static or built by code
//! that never puts a secret, a key id, a provider name or an internal path in
//! it.

use crate::http::{Body, full};
use bytes::Bytes;
use http::{HeaderValue, Response, StatusCode, header};
use std::borrow::Cow;

/// The contract's error `type`s.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    InvalidRequest,
    Unauthorized,
    Forbidden,
    NotFound,
    Conflict,
    PayloadTooLarge,
    RateLimitExceeded,
    NoAvailableKey,
    UpstreamError,
    UpstreamTimeout,
    InternalError,
}

impl ErrorKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorKind::InvalidRequest => "invalid_request",
            ErrorKind::Unauthorized => "unauthorized",
            ErrorKind::Forbidden => "forbidden",
            ErrorKind::NotFound => "not_found",
            ErrorKind::Conflict => "conflict",
            ErrorKind::PayloadTooLarge => "payload_too_large",
            ErrorKind::RateLimitExceeded => "rate_limit_exceeded",
            ErrorKind::NoAvailableKey => "no_available_key",
            ErrorKind::UpstreamError => "upstream_error",
            ErrorKind::UpstreamTimeout => "upstream_timeout",
            ErrorKind::InternalError => "internal_error",
        }
    }

    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::InvalidRequest => StatusCode::BAD_REQUEST,
            ErrorKind::Unauthorized => StatusCode::UNAUTHORIZED,
            ErrorKind::Forbidden => StatusCode::FORBIDDEN,
            ErrorKind::NotFound => StatusCode::NOT_FOUND,
            ErrorKind::Conflict => StatusCode::CONFLICT,
            ErrorKind::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::RateLimitExceeded => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::NoAvailableKey => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::UpstreamError => StatusCode::BAD_GATEWAY,
            ErrorKind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::InternalError => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

/// An error on its way to a client.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GatewayError {
    pub kind: ErrorKind,
    pub status: StatusCode,
    pub message: Cow<'static, str>,
    /// Whole seconds for `Retry-After` (429 and 503 answers).
    pub retry_after: Option<u64>,
    /// The request body was given up half read: see
    /// [`GatewayError::closing_connection`].
    pub closes_connection: bool,
}

impl GatewayError {
    pub fn new(kind: ErrorKind, message: impl Into<Cow<'static, str>>) -> Self {
        GatewayError {
            kind,
            status: kind.status(),
            message: message.into(),
            retry_after: None,
            closes_connection: false,
        }
    }

    pub fn invalid(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::InvalidRequest, message)
    }

    pub fn unauthorized() -> Self {
        Self::new(ErrorKind::Unauthorized, "Missing or invalid credentials.")
    }

    pub fn forbidden(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Forbidden, message)
    }

    pub fn not_found(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::NotFound, message)
    }

    pub fn conflict(message: impl Into<Cow<'static, str>>) -> Self {
        Self::new(ErrorKind::Conflict, message)
    }

    pub fn internal() -> Self {
        Self::new(
            ErrorKind::InternalError,
            "The gateway could not complete the request.",
        )
    }

    pub fn rate_limited(message: impl Into<Cow<'static, str>>, retry_after_secs: u64) -> Self {
        let mut e = Self::new(ErrorKind::RateLimitExceeded, message);
        e.retry_after = Some(retry_after_secs.max(1));
        e
    }

    /// 503 with `Retry-After`: the gateway cannot take the request now,
    /// and a retry shortly is expected to succeed.
    pub fn unavailable_retry_after(mut self, retry_after_secs: u64) -> Self {
        self.status = StatusCode::SERVICE_UNAVAILABLE;
        self.retry_after = Some(retry_after_secs.max(1));
        self
    }

    /// For an answer to a request whose body was given up half read (too
    /// large, too slow, broken): hyper does not read the rest and closes an
    /// HTTP/1 connection after the answer, so the answer says
    /// `Connection: close`, or the client could send its next request on
    /// that connection. (HTTP/2 drops the header; only the stream ends.)
    pub fn closing_connection(mut self) -> Self {
        self.closes_connection = true;
        self
    }

    /// The same kind with another status (405 is an `invalid_request`).
    pub fn with_status(mut self, status: StatusCode) -> Self {
        self.status = status;
        self
    }

    /// The contract's JSON body with `request_id`, the security headers and
    /// `Retry-After` when set. The caller adds `x-request-id`.
    pub fn into_response(self, request_id: &str) -> Response<Body> {
        let body = serde_json::json!({
            "error": {
                "type": self.kind.as_str(),
                "message": self.message,
                "request_id": request_id,
            }
        });
        let mut resp = Response::new(full(Bytes::from(body.to_string())));
        *resp.status_mut() = self.status;
        let headers = resp.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if let Some(secs) = self.retry_after {
            headers.insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        if self.closes_connection {
            headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http_body_util::BodyExt;

    #[test]
    fn every_kind_has_its_status() {
        let pairs = [
            (ErrorKind::InvalidRequest, 400),
            (ErrorKind::Unauthorized, 401),
            (ErrorKind::Forbidden, 403),
            (ErrorKind::NotFound, 404),
            (ErrorKind::Conflict, 409),
            (ErrorKind::PayloadTooLarge, 413),
            (ErrorKind::RateLimitExceeded, 429),
            (ErrorKind::NoAvailableKey, 503),
            (ErrorKind::UpstreamError, 502),
            (ErrorKind::UpstreamTimeout, 504),
            (ErrorKind::InternalError, 500),
        ];
        for (kind, status) in pairs {
            assert_eq!(kind.status().as_u16(), status, "{kind:?}");
        }
    }

    #[tokio::test]
    async fn body_has_contract_shape_and_retry_after() {
        let resp = GatewayError::rate_limited("slow down", 0).into_response("req_1");
        assert_eq!(resp.status(), 429);
        assert_eq!(resp.headers()[header::RETRY_AFTER], "1");
        let bytes = resp.into_body().collect().await.unwrap().to_bytes();
        let v: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        assert_eq!(v["error"]["type"], "rate_limit_exceeded");
        assert_eq!(v["error"]["message"], "slow down");
        assert_eq!(v["error"]["request_id"], "req_1");
    }
}
