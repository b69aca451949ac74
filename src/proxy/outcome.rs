//! Accounting of one proxied request: metrics, the access log line and the
//! key lease, done exactly once when the request is over, whichever way it
//! ends (the work happens in `Drop`, so a request whose client disappears
//! mid-way is accounted too).

use crate::http::RequestId;
use crate::keys::pool::PoolKey;
use crate::limits::Permit;
use crate::metrics::ProviderMetrics;
use crate::sanitize::json::Usage;
use http::StatusCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

/// How a request ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The whole response reached the client.
    Complete,
    /// The provider's answer carried an error: an error event in a
    /// stream, or a provider error as a successful JSON answer.
    ErrorEvent,
    /// The provider broke the stream off.
    Broken,
    /// A streamed event outgrew the size limit; keyrouter broke the stream
    /// off.
    Oversized,
    /// The provider sent nothing for `server.upstream_read_timeout`.
    Stalled,
    /// The client went away first.
    ClientGone,
    /// A graceful stop's drain ran out first (or the client left during
    /// it): the gateway cut the request off.
    Stopped,
}

impl End {
    fn as_str(self) -> &'static str {
        match self {
            End::Complete => "complete",
            End::ErrorEvent => "error_event",
            End::Broken => "broken",
            End::Oversized => "oversized_event",
            End::Stalled => "stalled",
            End::ClientGone => "client_gone",
            End::Stopped => "stopped",
        }
    }
}

/// The code counted for a client that left before its response was over.
const CLIENT_CLOSED: u16 = 499;

/// What the accounting of one provider's requests shares (one per proxy
/// thread and provider).
pub struct Accounts {
    pub metrics: ProviderMetrics,
    /// The gateway's stop began: a request that did not finish was cut off
    /// by the stop, not abandoned by its client.
    pub stopping: Arc<AtomicBool>,
}

/// Everything needed to account a request when it ends.
pub struct Completion {
    accounts: Arc<Accounts>,
    request_id: RequestId,
    started: Instant,
    status: StatusCode,
    /// The key that served the request and its limiter permit, settled
    /// with the real token count when the request ends.
    key: Option<(Arc<PoolKey>, Permit)>,
    end: End,
    usage: Usage,
}

impl Completion {
    /// Starts accounting a request routed to the provider of `metrics`
    /// (counted in flight from now on).
    pub fn start(accounts: &Arc<Accounts>, request_id: &RequestId, started: Instant) -> Self {
        accounts.metrics.inflight.inc();
        Completion {
            accounts: accounts.clone(),
            request_id: request_id.clone(),
            started,
            status: StatusCode::OK,
            key: None,
            end: End::ClientGone,
            usage: Usage::default(),
        }
    }

    /// The status the client gets.
    pub fn set_status(&mut self, status: StatusCode) {
        self.status = status;
    }

    /// The key serving the request; its permit is settled when the
    /// request ends.
    pub fn set_key(&mut self, key: Arc<PoolKey>, permit: Permit) {
        self.key = Some((key, permit));
    }

    pub fn finish(mut self, end: End, usage: Usage) {
        self.end = end;
        self.usage = usage;
    }
}

impl Drop for Completion {
    fn drop(&mut self) {
        let m = &self.accounts.metrics;
        if self.end == End::ClientGone && self.accounts.stopping.load(Ordering::Relaxed) {
            self.end = End::Stopped;
        }
        m.inflight.dec();
        let elapsed = self.started.elapsed();
        m.request_duration.observe(elapsed.as_secs_f64());
        if self.usage.prompt > 0 {
            m.prompt_tokens.inc_by(self.usage.prompt);
        }
        if self.usage.completion > 0 {
            m.completion_tokens.inc_by(self.usage.completion);
        }
        // A stream that fails after its headers were sent is an upstream
        // error (a timeout when the provider stalled), whatever status line
        // went out; an abandoned one is 499, one a stop cut off 503.
        let code = match self.end {
            End::Complete => self.status,
            End::ErrorEvent | End::Broken | End::Oversized => StatusCode::BAD_GATEWAY,
            End::Stalled => StatusCode::GATEWAY_TIMEOUT,
            End::ClientGone => StatusCode::from_u16(CLIENT_CLOSED).expect("a valid code"),
            End::Stopped => StatusCode::SERVICE_UNAVAILABLE,
        };
        m.requests.inc(code);
        let (key, permit) = self.key.take().unzip();
        let tokens = self.usage.prompt + self.usage.completion;
        // Without reported usage the reservation stands (the permit's drop).
        if let Some(permit) = permit.filter(|_| tokens > 0) {
            permit.settle(tokens);
        }
        let key_id = key.as_ref().map(|k| k.id.as_str());
        let duration_ms = elapsed.as_secs_f64() * 1000.0;
        if self.end == End::Complete && self.status.as_u16() < 500 {
            tracing::debug!(
                request_id = %self.request_id, provider = &*m.provider, key_id, status = self.status.as_u16(),
                outcome = self.end.as_str(), duration_ms, prompt_tokens = self.usage.prompt,
                completion_tokens = self.usage.completion, "request"
            );
        } else {
            tracing::warn!(
                request_id = %self.request_id, provider = &*m.provider, key_id, status = self.status.as_u16(),
                outcome = self.end.as_str(), duration_ms, "request did not complete normally"
            );
        }
    }
}
