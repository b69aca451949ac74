//! One connection's life: HTTP/1.1 or h2 over the (TLS) stream, closed
//! gracefully on shutdown or when it has been idle too long.
//!
//! hyper has no idle timeout of its own, so the connection tracks how many
//! requests are open (a guard travels with each response body) and when the
//! last one ended. It is idle when no request is open and none ended within
//! `idle_timeout`; a long generation that sends nothing for minutes is not
//! idle. A client that opens a connection and trickles a request's headers
//! is cut off by hyper's header read timeout instead, and one that trickles
//! a proxied request's body by `server.body_read_timeout`.

use super::{ConnInfo, Handler};
use crate::http::{Body, BoxError};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http_body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Activity of one connection, shared by its requests and its watchdog.
struct Activity {
    opened: Instant,
    /// Milliseconds after `opened` when the last request ended.
    last_request_ms: AtomicU64,
    open_requests: AtomicUsize,
}

impl Activity {
    fn request_ended(&self) {
        let ms = self.opened.elapsed().as_millis() as u64;
        self.last_request_ms.store(ms, Ordering::Relaxed);
    }

    /// When the connection becomes idle if nothing happens meanwhile.
    fn idle_deadline(&self, idle: Duration) -> Instant {
        self.opened + Duration::from_millis(self.last_request_ms.load(Ordering::Relaxed)) + idle
    }
}

/// Serves one connection until the client closes it, it idles out, or
/// `shutdown` fires (then open requests finish and the connection closes).
pub async fn serve<I, H>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    info: ConnInfo,
    handler: Arc<H>,
    idle_timeout: Duration,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let activity = Arc::new(Activity {
        opened: Instant::now(),
        last_request_ms: AtomicU64::new(0),
        open_requests: AtomicUsize::new(0),
    });
    let per_request = activity.clone();
    let service = service_fn(move |req| {
        let handler = handler.clone();
        let guard = RequestGuard::new(per_request.clone());
        async move {
            let resp = handler.handle(req, info).await;
            Ok::<_, std::convert::Infallible>(resp.map(|body| Guarded {
                body,
                _guard: guard,
            }))
        }
    });
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    // The watchdog sits in its own waker's slot: a wake-up of the
    // connection (several per request, one per streamed chunk) polls the
    // connection only, and the watchdog runs when its own timer or the
    // shutdown signal wakes it.
    let mut watchdog = FuturesUnordered::new();
    watchdog.push(close_when_due(activity, idle_timeout, shutdown));
    let result = std::future::poll_fn(|cx| {
        if let Poll::Ready(Some(())) = watchdog.poll_next_unpin(cx) {
            conn.as_mut().graceful_shutdown();
        }
        conn.as_mut().poll(cx)
    })
    .await;
    if let Err(e) = result {
        tracing::debug!(peer = %info.peer, error = %e, "connection ended with an error");
    }
}

/// Resolves when the connection should close gracefully: on `shutdown`, or
/// once it has been idle for `idle_timeout`.
async fn close_when_due(
    activity: Arc<Activity>,
    idle_timeout: Duration,
    shutdown: CancellationToken,
) {
    loop {
        // With a request open the connection is busy, whatever the stream
        // does; look again one period later.
        let deadline = if activity.open_requests.load(Ordering::Relaxed) > 0 {
            Instant::now() + idle_timeout
        } else {
            activity.idle_deadline(idle_timeout)
        };
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(deadline) => {
                let idle = activity.open_requests.load(Ordering::Relaxed) == 0
                    && activity.idle_deadline(idle_timeout) <= Instant::now();
                if idle {
                    return;
                }
            }
        }
    }
}

/// Counts a request as open until its response body is finished or dropped.
struct RequestGuard(Arc<Activity>);

impl RequestGuard {
    fn new(activity: Arc<Activity>) -> Self {
        activity.open_requests.fetch_add(1, Ordering::Relaxed);
        RequestGuard(activity)
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
        self.0.open_requests.fetch_sub(1, Ordering::Relaxed);
        self.0.request_ended();
    }
}

/// A response body carrying its request's guard.
struct Guarded {
    body: Body,
    _guard: RequestGuard,
}

impl http_body::Body for Guarded {
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}
