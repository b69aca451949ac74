//! CORS for browser clients, by allow-list (`server.cors_origins`). With an
//! empty list no CORS header is ever sent and preflights are refused, so a
//! browser page on another origin cannot use the gateway.

use crate::error::GatewayError;
use crate::http::{Body, full};
use http::{HeaderMap, HeaderValue, Method, Response, StatusCode, header};

pub struct Cors {
    origins: Vec<HeaderValue>,
}

const ALLOW_METHODS: &str = "GET, POST, PUT, PATCH, DELETE, OPTIONS";
const EXPOSE_HEADERS: &str = "x-request-id, retry-after";

impl Cors {
    pub fn new(origins: &[String]) -> Self {
        Cors {
            origins: origins
                .iter()
                .filter_map(|o| HeaderValue::from_str(o.trim_end_matches('/')).ok())
                .collect(),
        }
    }

    /// The request's `Origin` when it is on the allow-list.
    pub fn allowed<'h>(&self, headers: &'h HeaderMap) -> Option<&'h HeaderValue> {
        let origin = headers.get(header::ORIGIN)?;
        self.origins.iter().any(|o| o == origin).then_some(origin)
    }

    pub fn is_preflight(method: &Method, headers: &HeaderMap) -> bool {
        method == Method::OPTIONS
            && headers.contains_key(header::ORIGIN)
            && headers.contains_key(header::ACCESS_CONTROL_REQUEST_METHOD)
    }

    /// Answers a preflight: 204 with the CORS headers for an allowed origin,
    /// 403 otherwise.
    pub fn preflight(&self, headers: &HeaderMap) -> Result<Response<Body>, GatewayError> {
        let origin = self
            .allowed(headers)
            .ok_or_else(|| GatewayError::forbidden("This origin is not allowed."))?;
        let mut resp = Response::new(full(bytes::Bytes::new()));
        *resp.status_mut() = StatusCode::NO_CONTENT;
        let h = resp.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(ALLOW_METHODS),
        );
        if let Some(requested) = headers.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, requested.clone());
        }
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        Ok(resp)
    }

    /// Adds the CORS headers of an actual (non-preflight) response.
    pub fn decorate(&self, origin: Option<HeaderValue>, resp: &mut Response<Body>) {
        if self.origins.is_empty() {
            return;
        }
        let h = resp.headers_mut();
        h.insert(header::VARY, HeaderValue::from_static("Origin"));
        if let Some(origin) = origin {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
            h.insert(
                header::ACCESS_CONTROL_EXPOSE_HEADERS,
                HeaderValue::from_static(EXPOSE_HEADERS),
            );
        }
    }
}
