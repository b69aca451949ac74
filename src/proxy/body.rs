//! The streamed response body: provider frames go to the client as they
//! arrive, SSE events and JSON lines rewritten on the way, and the request
//! is accounted (metrics, access log, key lease) exactly once, when the
//! stream ends, breaks (or outgrows the event size limit) or is abandoned by
//! the client.
//!
//! Back-pressure is hyper's: the next provider frame is polled only when the
//! client connection took the previous one. When the client goes away, hyper
//! drops this body, which drops the provider's body and closes that
//! connection, so the provider stops generating. When the provider breaks
//! off or stalls (`read_timeout.rs`), the stream ends with an error: the
//! request is accounted at once (its key lease released), the client sees
//! the stream break, and hyper drops this body and the provider connection.

use super::outcome::{Completion, End};
use super::read_timeout::BodyStalled;
use crate::http::BoxError;
use crate::keys::pool::PoolKey;
use crate::sanitize::json::{Rewrite, Usage};
use crate::sanitize::stream::StreamRewriter;
use bytes::Bytes;
use http_body::{Body, Frame};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll, ready};

/// The owned form of [`Rewrite`], kept for the life of a stream.
pub struct RewriteSpec {
    pub id_suffix: String,
    pub model: Option<String>,
    pub strip_usage: bool,
    /// The key serving the response, whose edges are scrubbed from provider
    /// messages.
    pub key: Arc<PoolKey>,
}

impl RewriteSpec {
    pub fn as_rewrite(&self) -> Rewrite<'_> {
        Rewrite {
            id_suffix: &self.id_suffix,
            model: self.model.as_deref(),
            strip_usage: self.strip_usage,
            key: Some(&self.key.material),
        }
    }
}

/// How the body is treated.
pub enum Mode {
    /// A stream of records (SSE events, JSON lines): every record rewritten.
    Records(Box<StreamRewriter>, RewriteSpec),
    /// Anything else that is streamed: bytes pass unchanged.
    Raw,
}

pub struct StreamBody<B> {
    inner: B,
    mode: Mode,
    usage: Usage,
    /// `None` once the request was accounted.
    completion: Option<Completion>,
}

impl<B> StreamBody<B> {
    pub fn new(inner: B, mode: Mode, completion: Completion) -> Self {
        StreamBody {
            inner,
            mode,
            usage: Usage::default(),
            completion: Some(completion),
        }
    }

    fn end(&mut self, end: End) {
        if let Some(c) = self.completion.take() {
            c.finish(end, self.usage);
        }
    }
}

impl<B> Body for StreamBody<B>
where
    B: Body<Data = Bytes> + Unpin,
    B::Error: Into<BoxError>,
{
    type Data = Bytes;
    type Error = BoxError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BoxError>>> {
        let this = &mut *self;
        if this.completion.is_none() {
            return Poll::Ready(None);
        }
        loop {
            match ready!(Pin::new(&mut this.inner).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Provider trailers could carry provider metadata: dropped.
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    match &mut this.mode {
                        Mode::Raw => return Poll::Ready(Some(Ok(Frame::data(data)))),
                        Mode::Records(stream, spec) => {
                            let mut out = Vec::with_capacity(data.len() + 32);
                            let rw = spec.as_rewrite();
                            if let Err(e) = stream.push(&data, &rw, &mut this.usage, &mut out) {
                                // The client sees the stream break off.
                                this.end(End::Oversized);
                                return Poll::Ready(Some(Err(e.into())));
                            }
                            if !out.is_empty() {
                                return Poll::Ready(Some(Ok(Frame::data(out.into()))));
                            }
                        }
                    }
                }
                Some(Err(e)) => {
                    let e: BoxError = e.into();
                    this.end(if e.is::<BodyStalled>() {
                        End::Stalled
                    } else {
                        End::Broken
                    });
                    return Poll::Ready(Some(Err(e)));
                }
                None => {
                    let mut tail = Vec::new();
                    let mut end = End::Complete;
                    if let Mode::Records(stream, spec) = &mut this.mode {
                        stream.finish(&spec.as_rewrite(), &mut this.usage, &mut tail);
                        if stream.errored() {
                            end = End::ErrorEvent;
                        }
                    }
                    this.end(end);
                    return Poll::Ready((!tail.is_empty()).then(|| Ok(Frame::data(tail.into()))));
                }
            }
        }
    }
}

impl<B> Drop for StreamBody<B> {
    fn drop(&mut self) {
        self.end(End::ClientGone);
    }
}
