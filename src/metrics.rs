//! Prometheus metrics. Every series is registered here with its contract
//! name; labels come only from closed enums, configured provider ids, key ids
//! and route templates, never from request data, so cardinality stays bounded
//! and no secret can become a label.
//!
//! A counter whose label values are all known at start-up (store
//! operations, and per configured provider: rate-limit scopes, retry
//! reasons, state changes) exports each of its series at zero from the
//! start, so `rate()` and `absent()` see the series before its first event.

mod labels;

use crate::keys::KeyState;
use crate::keys::state::state_changes;
use http::StatusCode;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};
use std::sync::{Arc, OnceLock};

pub use labels::{RateLimitScope, RetryReason, StoreOp};

/// Typed handles to every series keyrouter exports.
#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    /// `keyrouter_keys{provider,state}`: keys per state, refreshed from the store.
    pub keys: IntGaugeVec,
    /// `keyrouter_admin_requests_total{route,code}`; `route` is the route
    /// template (`/admin/v1/keys/{id}`), never the raw path.
    pub admin_requests: IntCounterVec,
    pub admin_auth_failures: IntCounter,
    /// `keyrouter_store_errors_total{op}`, counted by
    /// [`Metrics::count_store_error`].
    store_errors: IntCounterVec,
    /// Audit events accepted but not yet in the store.
    pub audit_pending: IntGauge,
    /// `auth_failed` events dropped because the audit queue was full.
    pub audit_dropped: IntCounter,
    /// `keyrouter_requests_total{provider,code}`: proxied requests by the
    /// status the client got.
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    /// Time from sending upstream to the provider's response headers.
    pub upstream_duration: HistogramVec,
    pub inflight: IntGaugeVec,
    /// `keyrouter_key_requests_total{provider,key_id}`.
    pub key_requests: IntCounterVec,
    /// `keyrouter_tokens_total{provider,kind}` from the providers' `usage`.
    pub tokens: IntCounterVec,
    /// `keyrouter_key_transitions_total{provider,from,to}`, counted by
    /// [`Metrics::count_state_change`].
    key_transitions: IntCounterVec,
    /// `keyrouter_rate_limited_total{provider,scope}`, counted by
    /// [`Metrics::count_rate_limited`].
    rate_limited: IntCounterVec,
    /// `keyrouter_upstream_retries_total{provider,reason}`, counted by
    /// [`Metrics::count_retry`].
    upstream_retries: IntCounterVec,
    /// `keyrouter_rate_limit_backend_errors_total`: failed or timed-out
    /// calls to the Redis rate-limit backend.
    pub rate_limit_backend_errors: IntCounter,
    /// `keyrouter_rate_limit_fallback`: 1 while limits are counted in this
    /// process because Redis is unreachable.
    pub rate_limit_fallback: IntGauge,
    /// `keyrouter_keys_unopened`: keys that should serve (active or cooling
    /// down) but that this replica cannot use, as of the last pool reload.
    pub keys_unopened: IntGauge,
    /// `keyrouter_tls_certificate_expiry_timestamp_seconds`, exported only
    /// while it is known (see [`Metrics::set_certificate_expiry`]).
    certificate_expiry: IntGauge,
}

/// Latency buckets from 1 ms to 5 min: LLM calls range from a cached
/// embedding to a long generation.
const LATENCY_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

/// One provider's series, resolved once so a request does not look labels up.
pub struct ProviderMetrics {
    pub provider: Arc<str>,
    pub requests: RequestsByCode,
    pub request_duration: Histogram,
    pub upstream_duration: Histogram,
    pub inflight: IntGauge,
    pub prompt_tokens: IntCounter,
    pub completion_tokens: IntCounter,
}

impl Metrics {
    /// Every series, for a gateway serving `providers` (their ids): the
    /// series of every label combination known now exist at zero.
    pub fn new<'a>(providers: impl IntoIterator<Item = &'a str>) -> Self {
        let registry = Registry::new();
        let m = Metrics {
            keys: IntGaugeVec::new(
                Opts::new("keyrouter_keys", "Registered provider keys by state"),
                &["provider", "state"],
            )
            .expect("valid metric"),
            admin_requests: IntCounterVec::new(
                Opts::new(
                    "keyrouter_admin_requests_total",
                    "Management API requests by route and status code",
                ),
                &["route", "code"],
            )
            .expect("valid metric"),
            admin_auth_failures: IntCounter::new(
                "keyrouter_admin_auth_failures_total",
                "Management API requests refused for missing, wrong or insufficient credentials",
            )
            .expect("valid metric"),
            store_errors: IntCounterVec::new(
                Opts::new("keyrouter_store_errors_total", "Failed store operations"),
                &["op"],
            )
            .expect("valid metric"),
            audit_pending: IntGauge::new(
                "keyrouter_audit_pending",
                "Audit events waiting to be written to the store",
            )
            .expect("valid metric"),
            audit_dropped: IntCounter::new(
                "keyrouter_audit_dropped_total",
                "auth_failed audit events dropped because the audit queue was full",
            )
            .expect("valid metric"),
            requests: IntCounterVec::new(
                Opts::new(
                    "keyrouter_requests_total",
                    "Proxied requests by provider and status code",
                ),
                &["provider", "code"],
            )
            .expect("valid metric"),
            request_duration: HistogramVec::new(
                HistogramOpts::new(
                    "keyrouter_request_duration_seconds",
                    "Time from receiving a request to the end of its response",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["provider"],
            )
            .expect("valid metric"),
            upstream_duration: HistogramVec::new(
                HistogramOpts::new(
                    "keyrouter_upstream_duration_seconds",
                    "Time from sending a request upstream to the provider's response headers",
                )
                .buckets(LATENCY_BUCKETS.to_vec()),
                &["provider"],
            )
            .expect("valid metric"),
            inflight: IntGaugeVec::new(
                Opts::new(
                    "keyrouter_inflight_requests",
                    "Proxied requests in progress",
                ),
                &["provider"],
            )
            .expect("valid metric"),
            key_requests: IntCounterVec::new(
                Opts::new(
                    "keyrouter_key_requests_total",
                    "Upstream requests sent with each key",
                ),
                &["provider", "key_id"],
            )
            .expect("valid metric"),
            tokens: IntCounterVec::new(
                Opts::new("keyrouter_tokens_total", "Tokens reported by providers"),
                &["provider", "kind"],
            )
            .expect("valid metric"),
            key_transitions: IntCounterVec::new(
                Opts::new("keyrouter_key_transitions_total", "Key state transitions"),
                &["provider", "from", "to"],
            )
            .expect("valid metric"),
            rate_limited: IntCounterVec::new(
                Opts::new(
                    "keyrouter_rate_limited_total",
                    "Requests or keys held back by a rate limit",
                ),
                &["provider", "scope"],
            )
            .expect("valid metric"),
            upstream_retries: IntCounterVec::new(
                Opts::new(
                    "keyrouter_upstream_retries_total",
                    "Requests retried on another key",
                ),
                &["provider", "reason"],
            )
            .expect("valid metric"),
            rate_limit_backend_errors: IntCounter::new(
                "keyrouter_rate_limit_backend_errors_total",
                "Failed or timed-out calls to the Redis rate-limit backend",
            )
            .expect("valid metric"),
            rate_limit_fallback: IntGauge::new(
                "keyrouter_rate_limit_fallback",
                "1 while rate limits are counted locally because Redis is unreachable",
            )
            .expect("valid metric"),
            keys_unopened: IntGauge::new(
                "keyrouter_keys_unopened",
                "Active or cooling-down keys this replica cannot use: their material does not decrypt with KEYROUTER_FERNET_KEYS or is not a valid header value",
            )
            .expect("valid metric"),
            certificate_expiry: IntGauge::new(
                "keyrouter_tls_certificate_expiry_timestamp_seconds",
                "End of validity of the TLS certificate in force, in Unix seconds",
            )
            .expect("valid metric"),
            registry,
        };
        for c in [
            Box::new(m.keys.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.admin_requests.clone()),
            Box::new(m.admin_auth_failures.clone()),
            Box::new(m.store_errors.clone()),
            Box::new(m.audit_pending.clone()),
            Box::new(m.audit_dropped.clone()),
            Box::new(m.requests.clone()),
            Box::new(m.request_duration.clone()),
            Box::new(m.upstream_duration.clone()),
            Box::new(m.inflight.clone()),
            Box::new(m.key_requests.clone()),
            Box::new(m.tokens.clone()),
            Box::new(m.key_transitions.clone()),
            Box::new(m.rate_limited.clone()),
            Box::new(m.upstream_retries.clone()),
            Box::new(m.rate_limit_backend_errors.clone()),
            Box::new(m.rate_limit_fallback.clone()),
            Box::new(m.keys_unopened.clone()),
        ] {
            m.registry.register(c).expect("metric names are unique");
        }
        m.start_at_zero(providers);
        m
    }

    /// Sets the TLS certificate's expiry (Unix seconds), or stops
    /// exporting it when it is unknown: without TLS, or for a certificate
    /// whose expiry cannot be read. A gauge at zero would look like a
    /// certificate that expired in 1970 to an expiry alert.
    pub fn set_certificate_expiry(&self, expiry: Option<i64>) {
        let gauge = || Box::new(self.certificate_expiry.clone());
        match expiry {
            Some(at) => {
                self.certificate_expiry.set(at);
                // Registering it twice is refused by the registry and harmless.
                let _ = self.registry.register(gauge());
            }
            None => {
                let _ = self.registry.unregister(gauge());
            }
        }
    }

    /// Creates the zero series of every label combination known before its
    /// first event; `with_label_values` creates a series without counting.
    fn start_at_zero<'a>(&self, providers: impl IntoIterator<Item = &'a str>) {
        for op in StoreOp::ALL {
            self.store_errors.with_label_values(&[op.as_str()]);
        }
        let changes = state_changes();
        for provider in providers {
            for scope in RateLimitScope::ALL {
                self.rate_limited
                    .with_label_values(&[provider, scope.as_str()]);
            }
            for reason in RetryReason::ALL {
                self.upstream_retries
                    .with_label_values(&[provider, reason.as_str()]);
            }
            for (from, to) in &changes {
                self.key_transitions
                    .with_label_values(&[provider, from.as_str(), to.as_str()]);
            }
        }
    }

    pub fn count_store_error(&self, op: StoreOp) {
        self.store_errors_of(op).inc();
    }

    /// The `keyrouter_store_errors_total` series of `op`, for a writer that
    /// counts its failures itself (the audit queue's).
    pub fn store_errors_of(&self, op: StoreOp) -> IntCounter {
        self.store_errors.with_label_values(&[op.as_str()])
    }

    /// Counts a key's move from `from` to `to`, by the router, a probe or
    /// an operator; nothing when the state stays the same (a revoked key
    /// deleted, a second 429 on a resting key).
    pub fn count_state_change(&self, provider: &str, from: KeyState, to: KeyState) {
        if from != to {
            self.key_transitions
                .with_label_values(&[provider, from.as_str(), to.as_str()])
                .inc();
        }
    }

    pub fn count_rate_limited(&self, provider: &str, scope: RateLimitScope) {
        self.rate_limited
            .with_label_values(&[provider, scope.as_str()])
            .inc();
    }

    pub fn count_retry(&self, provider: &str, reason: RetryReason) {
        self.upstream_retries
            .with_label_values(&[provider, reason.as_str()])
            .inc();
    }

    /// The series of one provider, to be resolved once at start-up.
    pub fn provider(&self, provider: &str) -> ProviderMetrics {
        ProviderMetrics {
            provider: Arc::from(provider),
            requests: RequestsByCode {
                vec: self.requests.clone(),
                provider: provider.to_owned(),
                codes: (StatusCode::CONTINUE.as_u16()..=MAX_STATUS)
                    .map(|_| OnceLock::new())
                    .collect(),
            },
            request_duration: self.request_duration.with_label_values(&[provider]),
            upstream_duration: self.upstream_duration.with_label_values(&[provider]),
            inflight: self.inflight.with_label_values(&[provider]),
            prompt_tokens: self.tokens.with_label_values(&[provider, "prompt"]),
            completion_tokens: self.tokens.with_label_values(&[provider, "completion"]),
        }
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * 1024);
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

/// The largest status code `http::StatusCode` can hold.
const MAX_STATUS: u16 = 999;

/// `keyrouter_requests_total{provider,code}` for one provider. Finding a
/// series by label values hashes the strings under a lock; here each code's
/// series is found once, on its first use (so codes never answered export no
/// series), and then reused.
pub struct RequestsByCode {
    vec: IntCounterVec,
    provider: String,
    /// Indexed by status code minus 100.
    codes: Box<[OnceLock<IntCounter>]>,
}

impl RequestsByCode {
    pub fn inc(&self, code: StatusCode) {
        let slot = &self.codes[usize::from(code.as_u16() - StatusCode::CONTINUE.as_u16())];
        slot.get_or_init(|| self.vec.with_label_values(&[&self.provider, code.as_str()]))
            .inc();
    }
}

/// Serving no provider: for parts that count only provider-independent
/// series (the limiter, the audit queue) and their tests.
impl Default for Metrics {
    fn default() -> Self {
        Self::new([])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn text(m: &Metrics) -> String {
        String::from_utf8(m.render()).unwrap()
    }

    #[test]
    fn requests_by_code_count_each_code_under_its_own_series() {
        let m = Metrics::new(["openai"]);
        let p = m.provider("openai");
        p.requests.inc(StatusCode::OK);
        p.requests.inc(StatusCode::OK);
        p.requests.inc(StatusCode::from_u16(499).unwrap());
        p.requests.inc(StatusCode::from_u16(999).unwrap());
        let t = text(&m);
        assert!(
            t.contains(r#"keyrouter_requests_total{code="200",provider="openai"} 2"#),
            "{t}"
        );
        assert!(
            t.contains(r#"keyrouter_requests_total{code="499",provider="openai"} 1"#),
            "{t}"
        );
        assert!(
            t.contains(r#"keyrouter_requests_total{code="999",provider="openai"} 1"#),
            "{t}"
        );
        assert!(
            !t.contains(r#"code="404""#),
            "codes never answered have no series: {t}"
        );
    }
}
