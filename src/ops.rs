//! The ops listener: `/healthz`, `/readyz` and `/metrics`, plain HTTP for the
//! cluster network. Nothing here needs credentials, so nothing here may show
//! one.

use crate::app::App;
use crate::error::GatewayError;
use crate::http::{Body, RequestId, finish, full, json};
use crate::server::{ConnInfo, Handler};
use http::{HeaderValue, Method, Response, StatusCode, header};
use hyper::Request;
use hyper::body::Incoming;
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub struct OpsApi {
    app: Arc<App>,
}

impl OpsApi {
    pub fn new(app: Arc<App>) -> Self {
        OpsApi { app }
    }

    fn route(&self, method: &Method, path: &str) -> Result<Response<Body>, GatewayError> {
        if method != Method::GET && method != Method::HEAD {
            return Err(GatewayError::invalid("Only GET is supported here.")
                .with_status(StatusCode::METHOD_NOT_ALLOWED));
        }
        match path {
            "/healthz" => Ok(json(StatusCode::OK, &serde_json::json!({"status": "ok"}))),
            "/readyz" => {
                let ready = self.app.ready.load(Ordering::Relaxed);
                let (status, text) = if ready {
                    (StatusCode::OK, "ready")
                } else {
                    (StatusCode::SERVICE_UNAVAILABLE, "not_ready")
                };
                Ok(json(status, &serde_json::json!({"status": text})))
            }
            "/metrics" => {
                let mut resp = Response::new(full(self.app.metrics.render()));
                resp.headers_mut().insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
                );
                Ok(resp)
            }
            _ => Err(GatewayError::not_found("No such endpoint.")),
        }
    }
}

impl Handler for OpsApi {
    async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        let id = RequestId::of(req.headers());
        let mut resp = self
            .route(req.method(), req.uri().path())
            .unwrap_or_else(|e| e.into_response(id.as_str()));
        finish(&mut resp, &id, conn.tls);
        resp
    }
}
