//! Prometheus metrics. Every series is registered here with its contract
//! name; labels come only from closed enums, configured provider ids, key ids
//! and route templates, never from request data, so cardinality stays bounded
//! and no secret can become a label.

use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry};

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
    /// `keyrouter_store_errors_total{op}`.
    pub store_errors: IntCounterVec,
    /// Audit events accepted but not yet in the store.
    pub audit_pending: IntGauge,
}

impl Metrics {
    pub fn new() -> Self {
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
            registry,
        };
        for c in [
            Box::new(m.keys.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(m.admin_requests.clone()),
            Box::new(m.admin_auth_failures.clone()),
            Box::new(m.store_errors.clone()),
            Box::new(m.audit_pending.clone()),
        ] {
            m.registry.register(c).expect("metric names are unique");
        }
        m
    }

    /// The Prometheus text exposition of every series.
    pub fn render(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(8 * 1024);
        // Encoding into a Vec cannot fail for well-formed metric families.
        let _ = prometheus::TextEncoder::new().encode(&self.registry.gather(), &mut out);
        out
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}
