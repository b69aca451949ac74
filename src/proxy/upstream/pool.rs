//! Connections to one provider, kept by one proxy thread.
//!
//! HTTP/1.1 connections carry one request at a time. Idle ones wait on a
//! stack, the most recently used on top: its TCP state is warm and it is
//! the least likely to have been closed by the provider meanwhile. A
//! connection goes back on the stack when its response body was read to
//! the end (one cut off mid-body is closed, as its stream is mid-message).
//! HTTP/2, when the provider offers it over TLS (ALPN), is one connection
//! shared by every request of the thread, pinged while requests are open
//! and replaced when it closes.
//!
//! Why not hyper-util's pooled `Client`: it serves any number of origins
//! from one pool, so every checkout and every return hashes the origin to
//! find its list, and every request clones the client and formats or
//! parses a `Host` header. Here one pool serves one origin on one thread:
//! a checkout is a pop, a return a push, and the `Host` value is built
//! once. This is the proxy's hot path, and that bookkeeping was a tenth of
//! its own work per request.
//!
//! A request sent on a kept connection that the provider has just closed
//! fails before any of it is written; hyper hands it back, and it goes out
//! again on a new connection (as hyper-util's client does).

use crate::http::BoxError;
use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::client::conn::{http1, http2};
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::{Connection, HttpConnector};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use std::collections::VecDeque;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use tower_service::Service;

type H1 = http1::SendRequest<Full<Bytes>>;

/// How often a shared HTTP/2 connection is pinged while requests are open,
/// and how long a ping may go unanswered.
const H2_PING_EVERY: Duration = Duration::from_secs(30);
const H2_PING_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection whose response was dropped unread may take to
/// finish that response (hyper reads off what is left) and be kept.
const DRAIN_WAIT: Duration = Duration::from_secs(1);
type H2 = http2::SendRequest<Full<Bytes>>;

/// One provider's connections on one proxy thread.
pub struct Pool {
    connector: HttpsConnector<HttpConnector>,
    /// `scheme://authority` of the provider, where connections go.
    origin: Uri,
    /// The `Host` header of HTTP/1.1 requests (the port only when it is not
    /// the scheme's default, as browsers and curl send it).
    host: HeaderValue,
    idle: Arc<Idle>,
    /// The shared HTTP/2 connection, once the provider chose HTTP/2.
    shared: Mutex<Option<H2>>,
}

/// Idle HTTP/1.1 connections, with when each was last used: the oldest at
/// the front, the most recently used at the back.
struct Idle {
    stack: Mutex<VecDeque<(H1, Instant)>>,
    /// Kept no longer than this unused.
    timeout: Duration,
    /// Kept no more than this many; one more closes the oldest.
    max: usize,
}

impl Idle {
    fn stack(&self) -> std::sync::MutexGuard<'_, VecDeque<(H1, Instant)>> {
        self.stack.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most recently used connection that can take a request now.
    /// Connections the provider closed are dropped on the way.
    fn take(&self) -> Option<H1> {
        let mut stack = self.stack();
        expire(&mut stack, self.timeout, Instant::now());
        while let Some((conn, _)) = stack.pop_back() {
            if conn.is_ready() {
                return Some(conn);
            }
        }
        None
    }

    fn put(&self, conn: H1) {
        if conn.is_closed() {
            return;
        }
        let now = Instant::now();
        let mut stack = self.stack();
        expire(&mut stack, self.timeout, now);
        if stack.len() >= self.max {
            stack.pop_front();
        }
        stack.push_back((conn, now));
    }

    /// Closes the connections that waited too long, for a pool that sees no
    /// requests (see [`sweep`]).
    fn sweep(&self) {
        expire(&mut self.stack(), self.timeout, Instant::now());
    }
}

/// Drops the connections unused for longer than `timeout`: the oldest, at
/// the front.
fn expire<C>(stack: &mut VecDeque<(C, Instant)>, timeout: Duration, now: Instant) {
    let expired =
        stack.partition_point(|(_, since)| now.saturating_duration_since(*since) > timeout);
    stack.drain(..expired);
}

/// Closes a pool's expired idle connections every `every` while the pool
/// exists: a pool that stops getting requests must not hold its connections
/// open for as long as the provider allows (some servers never close idle
/// connections themselves).
async fn sweep(idle: Weak<Idle>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        match idle.upgrade() {
            Some(idle) => idle.sweep(),
            None => return,
        }
    }
}

/// A connection for one request.
enum Conn {
    H1(H1),
    H2(H2),
}

impl Pool {
    pub fn new(
        connector: HttpsConnector<HttpConnector>,
        base_url: &Uri,
        idle_timeout: Duration,
        max_idle: usize,
    ) -> Self {
        let scheme = base_url.scheme().cloned().unwrap_or(Scheme::HTTPS);
        let authority = base_url
            .authority()
            .cloned()
            .expect("configured base URLs have an authority");
        let default_port = if scheme == Scheme::HTTP { 80 } else { 443 };
        let host = match authority.port_u16() {
            Some(port) if port != default_port => authority.as_str().to_owned(),
            _ => authority.host().to_owned(),
        };
        let idle = Arc::new(Idle {
            stack: Mutex::new(VecDeque::new()),
            timeout: idle_timeout,
            max: max_idle,
        });
        if let Ok(runtime) = Handle::try_current() {
            runtime.spawn(sweep(Arc::downgrade(&idle), idle_timeout / 3));
        }
        Pool {
            connector,
            origin: Uri::builder()
                .scheme(scheme)
                .authority(authority)
                .path_and_query("/")
                .build()
                .expect("scheme and authority of a valid URI"),
            host: HeaderValue::try_from(host).expect("an authority is a valid header value"),
            idle,
            shared: Mutex::new(None),
        }
    }

    /// Sends `req` (whose URI names the provider's origin) and waits for the
    /// response head.
    pub async fn send(&self, mut req: Request<Full<Bytes>>) -> Result<Response<Pooled>, BoxError> {
        loop {
            let (conn, kept) = match self.take() {
                Some(conn) => (conn, true),
                // Boxed: its state (TLS handshake included) is large, and
                // would otherwise be part of every request's future, which
                // the server moves several times per request.
                None => (Box::pin(self.connect()).await?, false),
            };
            let sent = match conn {
                Conn::H1(mut conn) => {
                    self.for_http1(&mut req);
                    if !kept {
                        conn.ready().await?;
                    }
                    match conn.try_send_request(req).await {
                        Ok(resp) => {
                            let idle = self.idle.clone();
                            return Ok(resp.map(|body| Pooled::new(body, Some((conn, idle)))));
                        }
                        Err(e) => e,
                    }
                }
                Conn::H2(mut conn) => {
                    self.for_http2(&mut req);
                    match conn.try_send_request(req).await {
                        Ok(resp) => return Ok(resp.map(|body| Pooled::new(body, None))),
                        Err(e) => e,
                    }
                }
            };
            let mut failed = sent;
            match failed.take_message() {
                // Not written: the kept connection had closed. Once more,
                // on a connection that may be new.
                Some(back) if kept => req = back,
                _ => return Err(failed.into_error().into()),
            }
        }
    }

    fn take(&self) -> Option<Conn> {
        if let Some(conn) = self.idle.take() {
            return Some(Conn::H1(conn));
        }
        let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
        match shared.as_ref() {
            Some(conn) if !conn.is_closed() => Some(Conn::H2(conn.clone())),
            Some(_) => {
                *shared = None;
                None
            }
            None => None,
        }
    }

    /// Opens a connection (TLS when the provider's scheme is https), HTTP/2
    /// when the provider picks it in the handshake.
    async fn connect(&self) -> Result<Conn, BoxError> {
        let io = self.connector.clone().call(self.origin.clone()).await?;
        if io.connected().is_negotiated_h2() {
            // Pings while requests are open: a connection that went dead
            // without a reset is given up within about 40 s, not left to
            // the kernel's retransmission limit (every request of the
            // thread shares it).
            let (conn, driver) = http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                .keep_alive_interval(H2_PING_EVERY)
                .keep_alive_timeout(H2_PING_TIMEOUT)
                .handshake(io)
                .await?;
            drive(driver);
            let mut shared = self.shared.lock().unwrap_or_else(PoisonError::into_inner);
            *shared = Some(conn.clone());
            Ok(Conn::H2(conn))
        } else {
            let (conn, driver) = http1::Builder::new().handshake(io).await?;
            drive(driver);
            Ok(Conn::H1(conn))
        }
    }

    /// HTTP/1.1 requests name their path only, with the origin in `Host`.
    fn for_http1(&self, req: &mut Request<Full<Bytes>>) {
        if let Some(path) = req.uri().path_and_query().cloned() {
            *req.uri_mut() = Uri::from(path);
        }
        req.headers_mut().insert(header::HOST, self.host.clone());
    }

    /// HTTP/2 requests carry scheme and authority in the URI (sent as
    /// `:scheme` and `:authority`), and no `Host`. The URI a request comes
    /// with names them already; it lost them only when an HTTP/1.1
    /// connection handed it back.
    fn for_http2(&self, req: &mut Request<Full<Bytes>>) {
        if req.uri().authority().is_none() {
            let mut parts = http::uri::Parts::default();
            parts.scheme = self.origin.scheme().cloned();
            parts.authority = self.origin.authority().cloned();
            parts.path_and_query = Some(
                req.uri()
                    .path_and_query()
                    .cloned()
                    .unwrap_or_else(|| PathAndQuery::from_static("/")),
            );
            if let Ok(uri) = Uri::from_parts(parts) {
                *req.uri_mut() = uri;
            }
            req.headers_mut().remove(header::HOST);
        }
    }
}

/// Runs a connection's driver as a task on this thread's runtime until the
/// connection closes.
fn drive(driver: impl Future<Output = hyper::Result<()>> + Send + 'static) {
    tokio::spawn(async move {
        if let Err(e) = driver.await {
            tracing::debug!(error = %e, "upstream connection ended");
        }
    });
}

/// A response body from a pooled connection. When it is dropped, its
/// HTTP/1.1 connection goes back to the idle stack (see the module notes).
pub struct Pooled {
    body: Incoming,
    ended: bool,
    conn: Option<(H1, Arc<Idle>)>,
}

impl Pooled {
    fn new(body: Incoming, conn: Option<(H1, Arc<Idle>)>) -> Self {
        Pooled {
            body,
            ended: false,
            conn,
        }
    }
}

impl Drop for Pooled {
    fn drop(&mut self) {
        let Some((mut conn, idle)) = self.conn.take() else {
            return;
        };
        if self.ended || self.body.is_end_stream() {
            idle.put(conn);
            return;
        }
        // Dropped before its end: an error answer that was not read, or a
        // stream whose client left. Once this body is gone, hyper reads
        // off what the provider already sent; if that was the rest, the
        // connection is ready again (as a provider's 5xx usually is) and
        // kept, else hyper closes it.
        if conn.is_closed() {
            return;
        }
        if let Ok(runtime) = Handle::try_current() {
            runtime.spawn(async move {
                if let Ok(Ok(())) = tokio::time::timeout(DRAIN_WAIT, conn.ready()).await {
                    idle.put(conn);
                }
            });
        }
    }
}

impl Body for Pooled {
    type Data = Bytes;
    type Error = hyper::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, hyper::Error>>> {
        let polled = Pin::new(&mut self.body).poll_frame(cx);
        if let Poll::Ready(None) = polled {
            self.ended = true;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.body.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_connections_unused_for_the_idle_timeout_expire() {
        let timeout = Duration::from_secs(90);
        let now = Instant::now() + Duration::from_secs(1000);
        let ago = |secs| now - Duration::from_secs(secs);
        // Oldest first, as connections come back.
        let mut stack: VecDeque<(u32, Instant)> =
            [(1, ago(300)), (2, ago(91)), (3, ago(90)), (4, ago(5))].into();
        expire(&mut stack, timeout, now);
        assert_eq!(stack.iter().map(|(c, _)| *c).collect::<Vec<_>>(), [3, 4]);
        expire(&mut stack, timeout, now + Duration::from_secs(100));
        assert!(stack.is_empty());
    }
}
