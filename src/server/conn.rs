//! One connection's life: HTTP/1.1 or h2 over the (TLS) stream, closed
//! gracefully on shutdown, when it has been idle too long, or when a
//! client takes too long to send a request's headers.
//!
//! The connection tracks how many requests are open (a guard travels with
//! each response body), when the last one ended, and when bytes of the next
//! request began to arrive (its stream is watched). A watchdog closes it:
//! - when its first request's headers are not in within
//!   `header_read_timeout` of the connection's start (an h2 connection,
//!   known by its preface, may wait `idle_timeout` for its first request);
//! - on HTTP/1, when a later request's headers are not in within
//!   `header_read_timeout` of their first byte (a client that trickles
//!   headers);
//! - when no request is open and none ended within `idle_timeout`. A long
//!   generation that sends nothing for minutes is not idle.
//!
//! A client that trickles a proxied request's body is cut off by
//! `server.body_read_timeout` instead.
//!
//! hyper's own header read timeout is not used: it also runs while a
//! kept-alive connection waits for its next request, so it would close
//! every such connection after `header_read_timeout`, long before
//! `idle_timeout`; and it arms a runtime timer for every request, where
//! the watchdog has one per connection, which wakes about once per
//! timeout period.

use super::{ConnInfo, Handler, ServeOptions};
use crate::http::{Body, BoxError};
use bytes::Bytes;
use futures_util::StreamExt;
use futures_util::stream::FuturesUnordered;
use http_body::Frame;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// A moment that has not come (yet), among the millisecond offsets below.
const NEVER: u64 = u64::MAX;

/// What an h2 connection begins with; HTTP/1 requests begin with a method.
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n";

/// Activity of one connection, shared by its requests, its stream and its
/// watchdog. Moments are milliseconds after `opened`.
struct Activity {
    opened: Instant,
    /// When the last request ended, plus one; 0 before the first did. (So
    /// that the latest end wins when h2 requests end at once on several
    /// threads: `fetch_max`.)
    last_request_end: AtomicU64,
    /// When bytes began to arrive while no request was open (the head of
    /// the next request); `NEVER` when none did since the last request
    /// began.
    head_started_ms: AtomicU64,
    open_requests: AtomicUsize,
    /// The requests come over h2: bytes (pings, window updates) move with
    /// no request open, so only the idle rule applies.
    multiplexed: AtomicBool,
}

impl Activity {
    fn new() -> Self {
        Activity {
            opened: Instant::now(),
            last_request_end: AtomicU64::new(0),
            head_started_ms: AtomicU64::new(NEVER),
            open_requests: AtomicUsize::new(0),
            multiplexed: AtomicBool::new(false),
        }
    }

    fn now_ms(&self) -> u64 {
        self.opened.elapsed().as_millis() as u64
    }

    fn at(&self, ms: u64) -> Instant {
        self.opened + Duration::from_millis(ms)
    }

    fn request_started(&self, multiplexed: bool) {
        self.open_requests.fetch_add(1, Ordering::Relaxed);
        self.head_started_ms.store(NEVER, Ordering::Relaxed);
        if multiplexed {
            self.multiplexed.store(true, Ordering::Relaxed);
        }
    }

    fn request_ended(&self) {
        self.last_request_end
            .fetch_max(self.now_ms() + 1, Ordering::Relaxed);
        // Released after the end is noted: a watchdog that sees no request
        // open sees when the last one ended.
        self.open_requests.fetch_sub(1, Ordering::Release);
    }

    /// The stream delivered `data`: with no request open, it begins the
    /// next request's head (one clock read per request). The connection's
    /// very first bytes tell h2 (its preface) from HTTP/1.
    fn bytes_arrived(&self, data: &[u8]) {
        if self.open_requests.load(Ordering::Relaxed) == 0
            && self.head_started_ms.load(Ordering::Relaxed) == NEVER
            && !self.multiplexed.load(Ordering::Relaxed)
        {
            let first = self.last_request_end.load(Ordering::Relaxed) == 0;
            if first
                && data.len() >= 3
                && H2_PREFACE.starts_with(&data[..data.len().min(H2_PREFACE.len())])
            {
                self.multiplexed.store(true, Ordering::Relaxed);
                return;
            }
            self.head_started_ms.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// When and how the connection is to close if nothing else happens;
    /// `None` while a request is open.
    fn due(&self, opts: &ServeOptions) -> Option<(Instant, Close)> {
        if self.open_requests.load(Ordering::Acquire) > 0 {
            return None;
        }
        let multiplexed = self.multiplexed.load(Ordering::Relaxed);
        let last = match self.last_request_end.load(Ordering::Relaxed) {
            // No request yet: an h2 client may connect ahead of its first
            // request; HTTP/1 gets the header read timeout from the start.
            0 if multiplexed => self.opened,
            0 => return Some((self.opened + opts.header_read_timeout, Close::Now)),
            end => self.at(end - 1),
        };
        let head = self.head_started_ms.load(Ordering::Relaxed);
        if head != NEVER && !multiplexed {
            return Some((self.at(head) + opts.header_read_timeout, Close::Now));
        }
        Some((last + opts.idle_timeout, Close::Gracefully))
    }
}

/// How the watchdog closes a connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Close {
    /// Open requests finish, then it closes (h2 says goodbye first).
    Gracefully,
    /// At once: no request is open, and the client is late with a request's
    /// headers (a graceful close would wait for them).
    Now,
}

/// Serves one connection until the client closes it, the watchdog closes
/// it, or `shutdown` fires (then open requests finish and the connection
/// closes).
pub async fn serve<I, H>(
    builder: &auto::Builder<TokioExecutor>,
    io: I,
    info: ConnInfo,
    handler: Arc<H>,
    opts: ServeOptions,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    H: Handler,
{
    let activity = Arc::new(Activity::new());
    let per_request = activity.clone();
    let service = service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let handler = handler.clone();
        let multiplexed = req.version() == http::Version::HTTP_2;
        let guard = RequestGuard::new(per_request.clone(), multiplexed);
        async move {
            let resp = handler.handle(req, info).await;
            Ok::<_, std::convert::Infallible>(resp.map(|body| Guarded {
                body,
                _guard: guard,
            }))
        }
    });
    let io = Watched {
        io,
        activity: activity.clone(),
    };
    let conn = builder.serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    // The watchdog sits in its own waker's slot: a wake-up of the
    // connection (several per request, one per streamed chunk) polls the
    // connection only, and the watchdog runs when its own timer or the
    // shutdown signal wakes it.
    let mut watchdog = FuturesUnordered::new();
    watchdog.push(close_when_due(activity.clone(), opts, Some(shutdown)));
    // The connection is polled first: a head that arrived by the deadline
    // is taken as a request, not cut off.
    let result = std::future::poll_fn(|cx| {
        loop {
            if let Poll::Ready(result) = conn.as_mut().poll(cx) {
                return Poll::Ready(result);
            }
            match watchdog.poll_next_unpin(cx) {
                Poll::Ready(Some(Close::Gracefully)) => {
                    conn.as_mut().graceful_shutdown();
                    // Closing gracefully waits for a head under way: a late
                    // one is still cut off.
                    watchdog.push(close_when_due(activity.clone(), opts, None));
                }
                Poll::Ready(Some(Close::Now)) => {
                    tracing::debug!(peer = %info.peer, "request headers not received in time; connection closed");
                    return Poll::Ready(Ok(()));
                }
                _ => return Poll::Pending,
            }
        }
    })
    .await;
    if let Err(e) = result {
        tracing::debug!(peer = %info.peer, error = %e, "connection ended with an error");
    }
}

/// Resolves when the connection should close, and how: gracefully on
/// `shutdown`, else as [`Activity::due`] says. Without `shutdown` the
/// connection is closing gracefully already, and only [`Close::Now`] is
/// still looked for: a late head, or an idle connection whose goodbye is
/// not over within `header_read_timeout` (an h2 client that never answers
/// the GOAWAY's PING would otherwise hold it until the keep-alive gives
/// up, close to a minute). It looks at least once per `header_read_timeout` or
/// `idle_timeout`, whichever is shorter, so a deadline that moved nearer
/// meanwhile (a request ended, a head began to arrive) is never missed.
async fn close_when_due(
    activity: Arc<Activity>,
    opts: ServeOptions,
    shutdown: Option<CancellationToken>,
) -> Close {
    let period = opts.header_read_timeout.min(opts.idle_timeout);
    loop {
        let now = Instant::now();
        let look_again = now + period;
        let wake = match activity.due(&opts) {
            Some((at, close)) if at <= now && (close == Close::Now || shutdown.is_some()) => {
                return close;
            }
            Some((at, Close::Gracefully))
                if shutdown.is_none() && at + opts.header_read_timeout <= now =>
            {
                return Close::Now;
            }
            Some((at, _)) if at > now => at.min(look_again),
            _ => look_again,
        };
        match &shutdown {
            Some(shutdown) => tokio::select! {
                _ = shutdown.cancelled() => return Close::Gracefully,
                _ = tokio::time::sleep_until(wake) => {}
            },
            None => tokio::time::sleep_until(wake).await,
        }
    }
}

/// The connection's stream, telling its [`Activity`] when bytes arrive.
struct Watched<I> {
    io: I,
    activity: Arc<Activity>,
}

impl<I: AsyncRead + Unpin> AsyncRead for Watched<I> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = Pin::new(&mut this.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            this.activity.bytes_arrived(&buf.filled()[before..]);
        }
        polled
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Watched<I> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }
}

/// Counts a request as open until its response body is finished or dropped.
struct RequestGuard(Arc<Activity>);

impl RequestGuard {
    fn new(activity: Arc<Activity>, multiplexed: bool) -> Self {
        activity.request_started(multiplexed);
        RequestGuard(activity)
    }
}

impl Drop for RequestGuard {
    fn drop(&mut self) {
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
