//! Listeners: accept → (TLS) → HTTP/1.1 or h2 → handler, with bounded
//! connections, timeouts and graceful shutdown. The admin and ops listeners
//! are served by [`serve`]; the proxy listener by [`workers`], whose threads
//! serve connections the same way ([`Connections`]). Only the handler
//! differs.

mod cert_info;
mod conn;
pub mod tls;
pub mod workers;

use crate::http::Body;
use hyper::body::Incoming;
use hyper::{Request, Response};
use hyper_util::rt::{TokioExecutor, TokioTimer};
use hyper_util::server::conn::auto;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// What a handler knows about the connection a request came on.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    pub peer: SocketAddr,
    /// The address the client connected to (what an HTTP/1 absolute-form
    /// target must name, see `proxy::route`).
    pub local: SocketAddr,
    /// Whether the connection is TLS (adds HSTS to responses).
    pub tls: bool,
}

/// Answers one request. Handlers never fail: every error has already become a
/// gateway error response.
pub trait Handler: Send + Sync + 'static {
    fn handle(
        &self,
        req: Request<Incoming>,
        conn: ConnInfo,
    ) -> impl Future<Output = Response<Body>> + Send;
}

/// Where a listener gets its TLS config for each handshake (it may change on
/// reload); `None` serves plain HTTP.
pub type TlsSource = Option<(Arc<tls::CertStore>, tls::TlsListener)>;

/// The open connections a listener allows (`server.max_connections`), one
/// permit each, shared by every thread that serves the listener: further
/// connections wait in the kernel's backlog.
pub type ConnectionSlots = Arc<Semaphore>;

/// Timeouts of one listener.
#[derive(Clone, Copy, Debug)]
pub struct ServeOptions {
    /// Time a client gets to send a request's headers (see `conn`); also
    /// bounds the TLS handshake.
    pub header_read_timeout: Duration,
    /// A connection with no request open for this long is closed.
    pub idle_timeout: Duration,
    pub shutdown_drain: Duration,
}

/// Serves `listener` until `shutdown` fires, then stops accepting and gives
/// open connections `shutdown_drain` to finish their requests.
pub async fn serve<H: Handler>(
    name: &'static str,
    listener: TcpListener,
    tls: TlsSource,
    handler: Arc<H>,
    slots: ConnectionSlots,
    opts: ServeOptions,
    shutdown: CancellationToken,
) {
    let connections = Connections::new(name, handler, tls, opts, shutdown.clone());
    while let Some(accepted) = accept(name, &listener, &slots, &shutdown).await {
        connections.serve(accepted);
    }
    drop(listener);
    connections.drain().await;
}

/// A connection taken from a listener, with the slot it holds until it
/// closes.
pub struct Accepted {
    stream: TcpStream,
    peer: SocketAddr,
    slot: OwnedSemaphorePermit,
}

/// Waits for a free slot, then for the next connection; `None` once
/// `shutdown` fires. A connection waits in the kernel's backlog while every
/// slot is taken.
async fn accept(
    name: &'static str,
    listener: &TcpListener,
    slots: &ConnectionSlots,
    shutdown: &CancellationToken,
) -> Option<Accepted> {
    let slot = tokio::select! {
        _ = shutdown.cancelled() => return None,
        p = slots.clone().acquire_owned() => p.expect("semaphore never closed"),
    };
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return None,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => return Some(Accepted { stream, peer, slot }),
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(listener = name, error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

/// The open connections of one listener on one runtime: each is served by
/// its own task, and all are drained together on shutdown.
struct Connections<H> {
    name: &'static str,
    tasks: TaskTracker,
    builder: Arc<auto::Builder<TokioExecutor>>,
    handler: Arc<H>,
    tls: TlsSource,
    opts: ServeOptions,
    shutdown: CancellationToken,
}

/// The largest request head accepted, the same over HTTP/1.1 (hyper's
/// read buffer; a larger head gets 431) and h2 (the header list size it
/// advertises), so a request does not work or fail by the protocol
/// negotiated.
const MAX_HEADER_BYTES: usize = 64 * 1024;

impl<H: Handler> Connections<H> {
    fn new(
        name: &'static str,
        handler: Arc<H>,
        tls: TlsSource,
        opts: ServeOptions,
        shutdown: CancellationToken,
    ) -> Self {
        let mut builder = auto::Builder::new(TokioExecutor::new());
        // The header read timeout is the connection watchdog's (`conn`).
        builder
            .http1()
            .header_read_timeout(None)
            .max_buf_size(MAX_HEADER_BYTES);
        builder
            .http2()
            .max_header_list_size(MAX_HEADER_BYTES as u32)
            .timer(TokioTimer::new())
            .keep_alive_interval(Some(Duration::from_secs(30)))
            .max_concurrent_streams(256);
        Connections {
            name,
            tasks: TaskTracker::new(),
            builder: Arc::new(builder),
            handler,
            tls,
            opts,
            shutdown,
        }
    }

    /// Serves one connection (TLS handshake first when configured) on the
    /// current runtime.
    fn serve(&self, accepted: Accepted) {
        let Accepted { stream, peer, slot } = accepted;
        let _ = stream.set_nodelay(true);
        // Unknown (it never is for an accepted socket): no absolute-form
        // target names it.
        let local = stream
            .local_addr()
            .unwrap_or_else(|_| SocketAddr::from(([0, 0, 0, 0], 0)));
        let (name, opts) = (self.name, self.opts);
        let handler = self.handler.clone();
        let builder = self.builder.clone();
        let tls = self.tls.clone();
        let shutdown = self.shutdown.clone();
        self.tasks.spawn(async move {
            let _slot = slot;
            match tls {
                None => {
                    let info = ConnInfo {
                        peer,
                        local,
                        tls: false,
                    };
                    conn::serve(&builder, stream, info, handler, opts, shutdown).await;
                }
                Some((certs, listener)) => {
                    let config = certs.config(listener);
                    let Some(tls_stream) = handshake(name, config, stream, peer, opts).await else {
                        return;
                    };
                    let info = ConnInfo {
                        peer,
                        local,
                        tls: true,
                    };
                    conn::serve(&builder, tls_stream, info, handler, opts, shutdown).await;
                }
            }
        });
    }

    /// Gives the open connections `shutdown_drain` to finish their
    /// requests (they close gracefully once `shutdown` fired).
    async fn drain(self) {
        self.tasks.close();
        if tokio::time::timeout(self.opts.shutdown_drain, self.tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                listener = self.name,
                "drain time ran out; closing remaining connections"
            );
        }
    }
}

async fn handshake(
    name: &'static str,
    config: Arc<rustls::ServerConfig>,
    stream: TcpStream,
    peer: SocketAddr,
    opts: ServeOptions,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    let accept = TlsAcceptor::from(config).accept(stream);
    match tokio::time::timeout(opts.header_read_timeout, accept).await {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            tracing::debug!(listener = name, %peer, error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!(listener = name, %peer, "TLS handshake timed out");
            None
        }
    }
}

#[cfg(test)]
mod tests;
