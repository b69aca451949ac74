//! The public proxy: what an application's SDK talks to.
//!
//! ```text
//! handle (outer shell: request id, CORS, errors → gateway error, headers)
//!   └─ forward (inner path, `?` on ProxyError)
//!        route      target → provider + upstream URI            route.rs
//!        read body  capped at max_body_bytes, kept for replay
//!        pick key   pool snapshot + policy                      keys::{pool, select}
//!        send       credentials swapped, identity encoding      upstream.rs
//!        respond    status → error, headers allow-listed,       respond.rs
//!                   JSON rewritten, SSE streamed and rewritten  body.rs, sanitize
//!        account    metrics, access log, key lease (once)       outcome.rs
//! ```

mod body;
mod cors;
pub mod error;
mod outcome;
mod respond;
pub mod route;
pub mod upstream;

use crate::app::App;
use crate::error::GatewayError;
use crate::http::{Body, ReadBodyError, finish, read_limited, request_id};
use crate::keys::model::random_token;
use crate::keys::pool::Lease;
use crate::keys::select;
use crate::metrics::ProviderMetrics;
use crate::server::{ConnInfo, Handler};
use bytes::Bytes;
use cors::Cors;
use error::ProxyError;
use hyper::body::Incoming;
use hyper::{Request, Response};
use outcome::Completion;
use route::RouteTable;
use std::sync::Arc;
use std::time::Instant;
use upstream::{Upstream, UpstreamInitError};

/// Per-provider parts built once at start-up.
struct ProviderRuntime {
    id: Arc<str>,
    policy: crate::config::Policy,
    upstream: Upstream,
    metrics: ProviderMetrics,
}

pub struct ProxyApi {
    app: Arc<App>,
    routes: RouteTable,
    providers: Vec<ProviderRuntime>,
    cors: Cors,
}

impl ProxyApi {
    pub fn new(app: Arc<App>) -> Result<Self, UpstreamInitError> {
        let cfg = &app.config;
        let providers = cfg
            .providers
            .iter()
            .map(|p| {
                Ok(ProviderRuntime {
                    id: Arc::from(p.id.as_str()),
                    policy: p.policy,
                    upstream: Upstream::new(p, &cfg.server)?,
                    metrics: app.metrics.provider(&p.id),
                })
            })
            .collect::<Result<_, UpstreamInitError>>()?;
        Ok(ProxyApi {
            routes: RouteTable::new(&cfg.providers),
            cors: Cors::new(&cfg.server.cors_origins),
            providers,
            app,
        })
    }

    /// The inner path: every stage in order, failing with a [`ProxyError`].
    async fn forward(
        &self,
        req: Request<Incoming>,
        request_id: &str,
        started: Instant,
        completion: &mut Option<Completion>,
    ) -> Result<Response<Body>, ProxyError> {
        let routed = self.routes.route(req.uri(), req.version(), req.headers())?;
        let provider = &self.providers[routed.provider];
        let acct = completion.insert(Completion::start(
            provider.id.clone(),
            &provider.metrics,
            &self.app.metrics,
            request_id,
            started,
        ));

        let (parts, body) = req.into_parts();
        let max = self.app.config.server.max_body_bytes;
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > max as u64) {
            return Err(ProxyError::BodyTooLarge);
        }
        let body: Bytes = read_limited(body, max).await.map_err(|e| match e {
            ReadBodyError::TooLarge => ProxyError::BodyTooLarge,
            ReadBodyError::Broken => ProxyError::BrokenRequestBody,
        })?;
        let model = respond::requested_model(&parts.headers, &body);

        let keys = self
            .app
            .pool
            .snapshot(&provider.id)
            .ok_or(ProxyError::NoActiveKey)?;
        let key = select::pick(&keys, provider.policy, |_| true).ok_or(ProxyError::NoActiveKey)?;
        self.app
            .metrics
            .key_requests
            .with_label_values(&[&*provider.id, key.id.as_str()])
            .inc();
        let upstream_req = provider.upstream.request(
            &parts.method,
            routed.upstream,
            &parts.headers,
            &key.credential,
            body,
        );
        acct.set_lease(Lease::new(key.clone()));

        let sent = Instant::now();
        let resp = provider.upstream.send(upstream_req).await?;
        provider
            .metrics
            .upstream_duration
            .observe(sent.elapsed().as_secs_f64());

        let spec = body::RewriteSpec {
            id_suffix: format!("kr{}", random_token(24)),
            model,
            strip_usage: self.app.config.sanitize.strip_usage,
        };
        respond::respond(resp, &key, spec, completion).await
    }
}

impl Handler for ProxyApi {
    async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        let started = Instant::now();
        let id = request_id(req.headers());
        if Cors::is_preflight(req.method(), req.headers()) {
            let mut resp = self
                .cors
                .preflight(req.headers())
                .unwrap_or_else(|e| e.into_response(&id));
            finish(&mut resp, &id, conn.tls);
            return resp;
        }
        let origin = self.cors.allowed(req.headers()).cloned();
        let mut completion = None;
        let mut resp = match self.forward(req, &id, started, &mut completion).await {
            Ok(resp) => resp,
            Err(e) => {
                let label = e.as_str();
                let resp = GatewayError::from(e).into_response(&id);
                match completion.take() {
                    Some(mut c) => {
                        c.set_status(resp.status());
                        c.finish(outcome::End::Complete, Default::default());
                    }
                    None => {
                        self.app
                            .metrics
                            .requests
                            .with_label_values(&["none", resp.status().as_str()])
                            .inc();
                        tracing::debug!(request_id = %id, error = label, "request refused before routing");
                    }
                }
                resp
            }
        };
        self.cors.decorate(origin, &mut resp);
        finish(&mut resp, &id, conn.tls);
        resp
    }
}
