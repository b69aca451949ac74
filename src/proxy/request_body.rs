//! The client's request body, read whole before the first attempt so that a
//! retry on another key can replay it. Three bounds keep clients from
//! holding the gateway with it:
//!
//! - size: a body over `server.max_body_bytes` is refused (413) as soon as
//!   the limit is passed, never buffered first;
//! - time: the whole body must arrive within `server.body_read_timeout`
//!   (408). The deadline covers the whole body rather than each read: a
//!   client sending a byte just before every idle deadline would pass any
//!   per-read timeout and hold its task and buffer indefinitely;
//! - memory: the bodies of all requests together draw on one budget of
//!   `server.max_buffered_body_bytes`. Budget is taken as bytes arrive (a
//!   client must send bytes to hold any; announcing a large
//!   `Content-Length` costs nothing) and given back when the buffer is freed,
//!   which is when the last attempt no longer needs it. A body that finds
//!   the budget spent is refused at once (503, `Retry-After: 1`) rather
//!   than made to wait: the requests holding the budget may be the slow
//!   ones, and a waiting request would hold its connection too.

use super::error::ProxyError;
use crate::config::ServerConfig;
use bytes::Bytes;
use http_body::Body;
use http_body_util::BodyExt;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

/// Reads request bodies within the configured bounds. Clones share the
/// memory budget: one budget for the whole proxy listener.
#[derive(Clone)]
pub struct BodyReader {
    max_bytes: usize,
    timeout: Duration,
    /// One permit per byte of request body held in memory.
    budget: Arc<Semaphore>,
}

impl BodyReader {
    pub fn new(server: &ServerConfig) -> Self {
        BodyReader {
            max_bytes: server.max_body_bytes,
            timeout: server.body_read_timeout,
            budget: Arc::new(Semaphore::new(server.max_buffered_body_bytes)),
        }
    }

    /// The whole body; `declared` is the request's `Content-Length`, if
    /// any, so that an announced oversize body is refused unread.
    pub async fn read<B>(&self, body: B, declared: Option<u64>) -> Result<Bytes, ProxyError>
    where
        B: Body<Data = Bytes>,
    {
        if declared.is_some_and(|n| n > self.max_bytes as u64) {
            return Err(ProxyError::BodyTooLarge);
        }
        // The timer is registered only if the body is not already there
        // when first polled (small bodies usually arrive with the headers).
        tokio::time::timeout(self.timeout, self.collect(body))
            .await
            .map_err(|_| ProxyError::RequestBodyTimeout)?
    }

    async fn collect<B>(&self, body: B) -> Result<Bytes, ProxyError>
    where
        B: Body<Data = Bytes>,
    {
        let mut body = std::pin::pin!(body);
        let mut held: Option<OwnedSemaphorePermit> = None;
        // The frames as they came: most bodies are one frame, kept without
        // a copy; several are joined once at the end into an exact-size
        // buffer, so the memory held is the length the budget counts.
        let mut first: Option<Bytes> = None;
        let mut more: Vec<Bytes> = Vec::new();
        let mut len = 0usize;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|_| ProxyError::BrokenRequestBody)?;
            // Trailers are not forwarded.
            let Ok(data) = frame.into_data() else {
                continue;
            };
            if data.is_empty() {
                continue;
            }
            len += data.len();
            if len > self.max_bytes {
                return Err(ProxyError::BodyTooLarge);
            }
            self.take_budget(&mut held, data.len())?;
            if first.is_none() {
                first = Some(data);
            } else {
                more.push(data);
            }
        }
        let (Some(first), Some(permit)) = (first, held) else {
            return Ok(Bytes::new());
        };
        let data = if more.is_empty() {
            first
        } else {
            let mut joined = Vec::with_capacity(len);
            joined.extend_from_slice(&first);
            for part in &more {
                joined.extend_from_slice(part);
            }
            Bytes::from(joined)
        };
        // The budget goes back when the last clone of the body is dropped.
        Ok(Bytes::from_owner(Budgeted {
            data,
            _permit: permit,
        }))
    }

    /// Takes `n` more bytes of budget into `held`, without waiting.
    fn take_budget(
        &self,
        held: &mut Option<OwnedSemaphorePermit>,
        n: usize,
    ) -> Result<(), ProxyError> {
        // `n` is at most `max_body_bytes`, which fits in a u32.
        let n = u32::try_from(n).map_err(|_| ProxyError::BodyTooLarge)?;
        let more = self
            .budget
            .clone()
            .try_acquire_many_owned(n)
            .map_err(|_| ProxyError::BodyBudgetExhausted)?;
        match held {
            Some(permit) => permit.merge(more),
            None => *held = Some(more),
        }
        Ok(())
    }
}

/// A request body together with the budget it holds.
struct Budgeted {
    data: Bytes,
    _permit: OwnedSemaphorePermit,
}

impl AsRef<[u8]> for Budgeted {
    fn as_ref(&self) -> &[u8] {
        &self.data
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures_util::StreamExt;
    use http_body::Frame;
    use http_body_util::{Full, StreamBody};
    use std::convert::Infallible;

    const TIMEOUT: Duration = Duration::from_millis(100);

    fn reader(max_bytes: usize, budget: usize) -> BodyReader {
        BodyReader {
            max_bytes,
            timeout: TIMEOUT,
            budget: Arc::new(Semaphore::new(budget)),
        }
    }

    fn frames(
        parts: &[&'static [u8]],
    ) -> StreamBody<impl futures_util::Stream<Item = Result<Frame<Bytes>, Infallible>>> {
        let frames: Vec<_> = parts
            .iter()
            .map(|p| Ok(Frame::data(Bytes::from_static(p))))
            .collect();
        StreamBody::new(futures_util::stream::iter(frames))
    }

    #[tokio::test]
    async fn frames_are_joined_and_limits_hold() {
        let r = reader(8, 100);
        let body = r.read(frames(&[b"ab", b"", b"cde"]), None).await.unwrap();
        assert_eq!(body, Bytes::from_static(b"abcde"));
        assert_eq!(r.read(Full::new(Bytes::new()), None).await.unwrap(), "");
        assert_eq!(
            r.read(frames(&[b"12345", b"6789"]), None).await,
            Err(ProxyError::BodyTooLarge)
        );
        assert_eq!(
            r.read(Full::new(Bytes::from_static(b"1")), Some(9)).await,
            Err(ProxyError::BodyTooLarge)
        );
    }

    #[tokio::test]
    async fn the_budget_is_held_while_a_body_lives() {
        let r = reader(10, 10);
        let held = r.read(frames(&[b"12345", b"678"]), None).await.unwrap();
        let copy = held.clone();
        // The first byte fits, the next two do not: the byte taken is
        // given back at once.
        assert_eq!(
            r.read(frames(&[b"a", b"bc"]), None).await,
            Err(ProxyError::BodyBudgetExhausted)
        );
        assert_eq!(r.read(frames(&[b"ab"]), None).await.unwrap(), "ab");
        drop(held);
        assert_eq!(
            r.read(frames(&[b"abc"]), None).await,
            Err(ProxyError::BodyBudgetExhausted),
            "a clone still holds the body"
        );
        drop(copy);
        assert_eq!(
            r.read(frames(&[b"0123456789"]), None).await.unwrap().len(),
            10
        );
        assert_eq!(r.budget.available_permits(), 10);
    }

    #[tokio::test]
    async fn a_body_that_does_not_arrive_in_time_is_refused() {
        let r = reader(10, 10);
        // One frame, then nothing.
        let stalled = StreamBody::new(
            futures_util::stream::iter([Ok(Frame::data(Bytes::from_static(b"abc")))]).chain(
                futures_util::stream::pending::<Result<Frame<Bytes>, Infallible>>(),
            ),
        );
        let started = std::time::Instant::now();
        assert_eq!(
            r.read(stalled, None).await,
            Err(ProxyError::RequestBodyTimeout)
        );
        assert!(started.elapsed() >= TIMEOUT);
        assert_eq!(r.budget.available_permits(), 10);
    }
}
