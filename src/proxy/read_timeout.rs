//! A provider body that stops making progress is cut off.
//!
//! Once a provider has sent its response headers nothing else bounds its
//! body: a provider that stalls would hold the request, the key's
//! concurrency slot and the upstream connection until the client gives up.
//! [`ReadTimeout`] fails the body with [`BodyStalled`] when no frame came
//! for `server.upstream_read_timeout` while keyrouter was waiting for one.
//! It is a per-read (idle) timeout, not a deadline for the whole body: a
//! long generation that keeps sending is never cut.
//!
//! Only time spent waiting on the provider counts. While the client is slow
//! to take frames, the body is not polled and its clock does not run, so a
//! slow reader never makes the provider look stalled.
//!
//! This sits on every frame of every stream, so it costs at most one
//! `Sleep` per response and no timer work per frame: each wait notes when
//! it began (one clock read), and the sleep, armed for the deadline of some
//! earlier wait, is moved to the current wait's deadline only when it fires
//! early. It fires about once per timeout period however many frames flow.
//! A body that never makes keyrouter wait (a JSON answer that arrived with
//! its headers, the common case) never arms one.

use crate::http::BoxError;
use http_body::{Body, Frame, SizeHint};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::time::{Instant, Sleep};

/// The error a body ends with when the provider sent nothing for too long.
#[derive(Debug, thiserror::Error)]
#[error("the provider sent no data within the read timeout")]
pub struct BodyStalled;

/// `B`, failed with [`BodyStalled`] when a wait for its next frame lasts
/// `timeout`.
pub struct ReadTimeout<B> {
    inner: B,
    timeout: Duration,
    /// Never fires after the current wait's deadline; may fire before it.
    /// Armed at the first wait.
    sleep: Option<Pin<Box<Sleep>>>,
    /// When the current wait for a frame began; `None` after a frame.
    waiting_since: Option<Instant>,
}

impl<B> ReadTimeout<B> {
    /// Must be polled within the Tokio runtime.
    pub fn new(inner: B, timeout: Duration) -> Self {
        ReadTimeout {
            inner,
            timeout,
            sleep: None,
            waiting_since: None,
        }
    }
}

impl<B> Body for ReadTimeout<B>
where
    B: Body + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = B::Data;
    type Error = BoxError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, BoxError>>> {
        let this = self.get_mut();
        if let Poll::Ready(frame) = Pin::new(&mut this.inner).poll_frame(cx) {
            this.waiting_since = None;
            return Poll::Ready(frame.map(|f| f.map_err(Into::into)));
        }
        let deadline = *this.waiting_since.get_or_insert_with(Instant::now) + this.timeout;
        let sleep = this
            .sleep
            .get_or_insert_with(|| Box::pin(tokio::time::sleep_until(deadline)));
        while sleep.as_mut().poll(cx).is_ready() {
            if sleep.deadline() >= deadline {
                return Poll::Ready(Some(Err(BodyStalled.into())));
            }
            // Armed for an earlier wait: re-armed, and polled again to
            // register for the new deadline.
            sleep.as_mut().reset(deadline);
        }
        Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;
    use futures_util::StreamExt;
    use http_body_util::{BodyExt, StreamBody};
    use std::convert::Infallible;

    const TIMEOUT: Duration = Duration::from_millis(100);

    type Frames = futures_util::stream::BoxStream<'static, Result<Frame<Bytes>, Infallible>>;

    /// `n` frames `gap` apart, then nothing ever again.
    fn paced(n: usize, gap: Duration) -> ReadTimeout<StreamBody<Frames>> {
        let frames = futures_util::stream::iter(0..n)
            .then(move |i| async move {
                if i > 0 && !gap.is_zero() {
                    tokio::time::sleep(gap).await;
                }
                Ok(Frame::data(Bytes::from_static(b"x")))
            })
            .chain(futures_util::stream::pending())
            .boxed();
        ReadTimeout::new(StreamBody::new(frames), TIMEOUT)
    }

    async fn next(body: &mut ReadTimeout<StreamBody<Frames>>) -> Result<(), BoxError> {
        body.frame().await.expect("the body never ends").map(drop)
    }

    #[tokio::test]
    async fn a_body_that_keeps_sending_is_never_cut() {
        let mut body = paced(8, TIMEOUT / 4);
        let started = std::time::Instant::now();
        for _ in 0..8 {
            next(&mut body).await.unwrap();
        }
        assert!(started.elapsed() > TIMEOUT, "{:?}", started.elapsed());
    }

    #[tokio::test]
    async fn a_body_that_goes_silent_is_cut_one_timeout_after_its_last_frame() {
        let mut body = paced(1, Duration::ZERO);
        next(&mut body).await.unwrap();
        let waited = std::time::Instant::now();
        let e = next(&mut body).await.unwrap_err();
        assert!(e.is::<BodyStalled>(), "{e}");
        assert!(waited.elapsed() >= TIMEOUT, "{:?}", waited.elapsed());
    }

    #[tokio::test]
    async fn time_the_reader_takes_is_not_counted() {
        let mut body = paced(3, Duration::ZERO);
        next(&mut body).await.unwrap();
        // A slow client: nothing polls the body for longer than the timeout.
        tokio::time::sleep(TIMEOUT * 2).await;
        next(&mut body).await.unwrap();
        next(&mut body).await.unwrap();
        let waited = std::time::Instant::now();
        assert!(next(&mut body).await.unwrap_err().is::<BodyStalled>());
        assert!(waited.elapsed() >= TIMEOUT, "{:?}", waited.elapsed());
    }
}
