//! The public proxy: what an application's SDK talks to.
//!
//! ```text
//! handle (outer shell: request id, CORS, errors → gateway error, headers)
//!   └─ forward (inner path, `?` on ProxyError)
//!        route        target → provider + upstream URI               route.rs
//!        client auth  JWT, provider allow-list, client rpm           client_auth.rs
//!        read body    bounded in size, time and shared memory,       request_body.rs
//!                     kept for replay
//!        peek         requested model (body, or Gemini's path),      peek.rs
//!                     output token cap
//!        attempts     up to 1 + retry_budget:
//!          pick key   policy over active keys, limits, permit        pick.rs
//!          send       credentials swapped, identity encoding,        upstream.rs,
//!                     body cut off when it stalls                    read_timeout.rs
//!          classify   429/402/401 (and 400/403 whose codes name      respond.rs,
//!                     the key) → key state + next key,               provider_error.rs, health
//!                     5xx/connect/timeout → next key
//!        respond      headers allow-listed, JSON rewritten,          respond.rs, body.rs
//!                     SSE and JSON lines streamed and rewritten,
//!                     an event past max_body_bytes ends the stream
//!        account      metrics, access log, permit settled (once)     outcome.rs
//! ```
//!
//! A retry happens only before any byte of a response went to the client:
//! once `respond` hands a body to hyper, the attempt is final.

mod body;
mod client_auth;
mod cors;
pub mod error;
mod outcome;
mod peek;
mod pick;
mod provider_error;
mod read_timeout;
mod request_body;
mod respond;
pub mod route;
pub mod upstream;

use crate::app::App;
use crate::config::ClientAuth as ClientAuthConfig;
use crate::error::GatewayError;
use crate::health::Health;
use crate::http::{Body, RequestId, finish};
use crate::keys::pool::PoolKey;
use crate::limits::Refusal;
use crate::metrics::{RateLimitScope, RetryReason};
use crate::server::{ConnInfo, Handler};
use client_auth::ClientAuth;
use cors::Cors;
use error::ProxyError;
use hyper::body::Incoming;
use hyper::{Request, Response};
use outcome::{Accounts, Completion};
use request_body::BodyReader;
use respond::Answer;
use route::RouteTable;
use std::sync::Arc;
use std::time::Instant;
use upstream::{Upstream, UpstreamInitError};

/// An attempt that failed, and may be retried on another key.
struct Failure {
    error: ProxyError,
    /// The key's fault (a refusal that took it out), not the provider's.
    key_fault: bool,
    /// The `keyrouter_upstream_retries_total` reason, counted if another
    /// key is tried.
    reason: RetryReason,
}

/// Per-provider parts built once at start-up.
struct ProviderRuntime {
    id: Arc<str>,
    kind: crate::config::ProviderKind,
    policy: crate::config::Policy,
    retry_budget: u32,
    upstream: Upstream,
    accounts: Arc<Accounts>,
}

/// The proxy's handler; one per proxy thread (`server::workers`), so that
/// each thread has its own upstream clients and connection pools.
pub struct ProxyApi {
    app: Arc<App>,
    routes: RouteTable,
    providers: Vec<ProviderRuntime>,
    cors: Cors,
    /// Reads request bodies within their size, time and memory bounds.
    bodies: BodyReader,
    /// Set when `client_auth.mode = "jwt"`.
    client_auth: Option<ClientAuth>,
}

impl ProxyApi {
    /// One handler for each of `threads` proxy threads. Each has its own
    /// upstream clients; they share the memory budget for request bodies
    /// (and everything in [`App`]).
    pub fn per_thread(app: &Arc<App>, threads: usize) -> Result<Vec<Self>, UpstreamInitError> {
        let bodies = BodyReader::new(&app.config.server);
        // Each provider's TLS settings, read once and shared by the threads.
        let tls = app
            .config
            .providers
            .iter()
            .map(upstream::tls_config)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((0..threads)
            .map(|_| Self::new(app.clone(), bodies.clone(), &tls))
            .collect())
    }

    /// `tls` holds the TLS settings of each configured provider, in order.
    fn new(app: Arc<App>, bodies: BodyReader, tls: &[rustls::ClientConfig]) -> Self {
        let cfg = &app.config;
        let providers = cfg
            .providers
            .iter()
            .zip(tls)
            .map(|(p, tls)| ProviderRuntime {
                id: Arc::from(p.id.as_str()),
                kind: p.kind,
                policy: p.policy,
                retry_budget: p.retry_budget,
                upstream: Upstream::new(p, &cfg.server, tls.clone()),
                accounts: Arc::new(Accounts {
                    metrics: app.metrics.provider(&p.id),
                    stopping: app.stopping.clone(),
                }),
            })
            .collect();
        ProxyApi {
            routes: RouteTable::new(&cfg.providers),
            cors: Cors::new(&cfg.server.cors_origins),
            bodies,
            client_auth: match &cfg.client_auth {
                ClientAuthConfig::None => None,
                ClientAuthConfig::Jwt { secret } => Some(ClientAuth::new(secret)),
            },
            providers,
            app,
        }
    }

    /// The inner path: every stage in order, failing with a [`ProxyError`].
    async fn forward(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
        request_id: &RequestId,
        started: Instant,
        completion: &mut Option<Completion>,
    ) -> Result<Response<Body>, ProxyError> {
        let routed = self.routes.route(req.uri(), req.version(), conn.local)?;
        let provider = &self.providers[routed.provider];
        *completion = Some(Completion::start(&provider.accounts, request_id, started));
        self.authorize_client(provider, req.headers()).await?;

        let (parts, body) = req.into_parts();
        let declared = parts
            .headers
            .get(http::header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        let body = self.bodies.read(body, declared).await?;
        let peek = peek::peek_request(provider.kind, routed.rest(), &body);

        let mut tried: Vec<Arc<PoolKey>> = Vec::new();
        let mut last: Option<Failure> = None;
        for attempt in 0..=provider.retry_budget {
            let keys = self
                .app
                .pool
                .snapshot(&provider.id)
                .ok_or(ProxyError::NoActiveKey)?;
            let limited = || {
                self.app
                    .metrics
                    .count_rate_limited(&provider.id, RateLimitScope::Key)
            };
            let chosen = pick::choose(
                &keys,
                provider.policy,
                &self.app.limiter,
                &tried,
                peek.estimated_tokens(body.len()),
                limited,
            )
            .await;
            let chosen = match (chosen, last.take()) {
                (Ok(c), None) => c,
                (Ok(c), Some(failed)) => {
                    // Counted once another key is actually tried.
                    self.app.metrics.count_retry(&provider.id, failed.reason);
                    c
                }
                // After a provider failure (not the key's fault) the client
                // hears about that failure, not about keys being tried out.
                (Err(_), Some(failed)) if !failed.key_fault => return Err(failed.error),
                (Err(no_key), _) => {
                    if matches!(no_key, pick::NoKey::Busy(_)) {
                        self.app
                            .metrics
                            .count_rate_limited(&provider.id, RateLimitScope::AllKeys);
                    }
                    return Err(no_key.into());
                }
            };
            if attempt > 0 {
                tracing::debug!(request_id = %request_id, attempt, "retrying on another key");
            }
            let key = chosen.key;
            key.count_request(|| {
                self.app
                    .metrics
                    .key_requests
                    .with_label_values(&[&*provider.id, key.id.as_str()])
            });
            let upstream_req = provider.upstream.request(
                &parts.method,
                routed.upstream.clone(),
                &parts.headers,
                &key.credential,
                body.clone(),
            );
            let sent = Instant::now();
            let sent_result = provider.upstream.send(upstream_req).await;
            provider
                .accounts
                .metrics
                .upstream_duration
                .observe(sent.elapsed().as_secs_f64());
            let (error, key_fault, reason) = match sent_result {
                Err(e) => {
                    let reason = if e == ProxyError::UpstreamTimeout {
                        RetryReason::UpstreamTimeout
                    } else {
                        RetryReason::UpstreamUnreachable
                    };
                    (e, false, reason)
                }
                Ok(resp) => match respond::classify(resp, &key).await {
                    Answer::Deliver(resp) => {
                        if let Some(acct) = completion.as_mut() {
                            acct.set_key(key.clone(), chosen.permit);
                        }
                        let spec = body::RewriteSpec {
                            id_suffix: crate::ids::prefixed("kr", 24),
                            model: peek.model,
                            strip_usage: self.app.config.sanitize.strip_usage,
                            key,
                        };
                        // No single streamed event may be larger than the
                        // largest body accepted from a client.
                        let max_record = self.app.config.server.max_body_bytes;
                        return respond::respond(resp, spec, max_record, completion).await;
                    }
                    Answer::Refused(e) => return Err(e),
                    Answer::KeyFault(verdict) => {
                        Health::report(&self.app, &provider.id, &key.id, verdict);
                        (verdict.into(), true, verdict.retry_reason())
                    }
                    Answer::ProviderFault(e) => (e, false, RetryReason::Upstream5xx),
                },
            };
            // Remembered only once it failed: a request served by its
            // first key allocates no list.
            tried.push(key);
            last = Some(Failure {
                error,
                key_fault,
                reason,
            });
        }
        Err(match last {
            Some(failed) if failed.key_fault => self.after_refusals(provider, failed.error),
            Some(failed) => failed.error,
            None => ProxyError::UpstreamFailed,
        })
    }

    /// The answer when the retry budget ran out on a key's refusal: what
    /// the provider's keys are now that the refusals took them out. None
    /// left at all: 503, as for a request that found none. Only resting
    /// ones: 429 until the first rest ends. Keys still serving (the budget
    /// was too small to reach them): the last refusal's own error.
    fn after_refusals(&self, provider: &ProviderRuntime, refusal: ProxyError) -> ProxyError {
        let Some(keys) = self.app.pool.snapshot(&provider.id) else {
            return refusal;
        };
        let now = chrono::Utc::now();
        if keys.keys.iter().any(|k| !keys.is_resting(&k.id, now)) {
            return refusal;
        }
        match keys.next_cooldown_end(now) {
            Some(end) => ProxyError::AllKeysLimited {
                retry_after_secs: pick::whole_seconds((end - now).to_std().unwrap_or_default()),
            },
            None => ProxyError::NoActiveKey,
        }
    }

    /// With client tokens on: the client must present a valid one that
    /// allows this provider, and stay within its own `rpm`.
    async fn authorize_client(
        &self,
        provider: &ProviderRuntime,
        headers: &http::HeaderMap,
    ) -> Result<(), ProxyError> {
        let Some(auth) = &self.client_auth else {
            return Ok(());
        };
        let client = auth.authenticate(headers)?;
        if !client.may_use(&provider.id) {
            return Err(ProxyError::ProviderNotAllowed);
        }
        let Some(rpm) = client.rpm else {
            return Ok(());
        };
        match self.app.limiter.acquire_client(&client.id, rpm).await {
            Ok(()) => Ok(()),
            Err(Refusal::Limited { retry_after }) => {
                self.app
                    .metrics
                    .count_rate_limited(&provider.id, RateLimitScope::Client);
                Err(ProxyError::ClientRateLimited {
                    retry_after_secs: pick::whole_seconds(retry_after),
                })
            }
            Err(Refusal::BackendUnavailable) => Err(ProxyError::LimiterUnavailable),
        }
    }
}

impl Handler for ProxyApi {
    async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        let started = Instant::now();
        let id = RequestId::of(req.headers());
        if Cors::is_preflight(req.method(), req.headers()) {
            let mut resp = self
                .cors
                .preflight(req.headers())
                .unwrap_or_else(|e| e.into_response(id.as_str()));
            finish(&mut resp, &id, conn.tls);
            return resp;
        }
        let origin = self.cors.allowed(req.headers()).cloned();
        let mut completion = None;
        // Boxed: the server moves a request's future several times, and
        // this one holds every stage's state (a few KiB).
        let mut resp = match Box::pin(self.forward(req, conn, &id, started, &mut completion)).await
        {
            Ok(resp) => resp,
            Err(e) => {
                let label = e.as_str();
                let resp = GatewayError::from(e).into_response(id.as_str());
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
