//! The closed label sets of the counters whose series exist before their
//! first event. The code that counts names a label only through these
//! enums, and [`Metrics::new`](super::Metrics::new) creates a zero series
//! for each of their values, so what is exported at start-up and what is
//! counted later cannot drift apart.

/// `op` of `keyrouter_store_errors_total`: the store call that failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StoreOp {
    InsertKey,
    GetKey,
    ListKeys,
    AllKeys,
    UpdateKey,
    ResealKeys,
    CountKeys,
    AppendAudit,
    ListAudit,
    PruneAudit,
}

impl StoreOp {
    pub const ALL: [StoreOp; 10] = [
        StoreOp::InsertKey,
        StoreOp::GetKey,
        StoreOp::ListKeys,
        StoreOp::AllKeys,
        StoreOp::UpdateKey,
        StoreOp::ResealKeys,
        StoreOp::CountKeys,
        StoreOp::AppendAudit,
        StoreOp::ListAudit,
        StoreOp::PruneAudit,
    ];

    /// The label value: the name of the [`Store`](crate::store::Store)
    /// method.
    pub fn as_str(self) -> &'static str {
        match self {
            StoreOp::InsertKey => "insert_key",
            StoreOp::GetKey => "get_key",
            StoreOp::ListKeys => "list_keys",
            StoreOp::AllKeys => "all_keys",
            StoreOp::UpdateKey => "update_key",
            StoreOp::ResealKeys => "reseal_keys",
            StoreOp::CountKeys => "count_keys",
            StoreOp::AppendAudit => "append_audit",
            StoreOp::ListAudit => "list_audit",
            StoreOp::PruneAudit => "prune_audit",
        }
    }
}

/// `scope` of `keyrouter_rate_limited_total`: what was at its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RateLimitScope {
    /// A key over its own limits was passed over for another.
    Key,
    /// Every usable key was at its limit: the client got 429.
    AllKeys,
    /// The client was over the `rpm` of its token: the client got 429.
    Client,
}

impl RateLimitScope {
    pub const ALL: [RateLimitScope; 3] = [
        RateLimitScope::Key,
        RateLimitScope::AllKeys,
        RateLimitScope::Client,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RateLimitScope::Key => "key",
            RateLimitScope::AllKeys => "all_keys",
            RateLimitScope::Client => "client",
        }
    }
}

/// `reason` of `keyrouter_upstream_retries_total`: why a request went on
/// to another key.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RetryReason {
    /// The provider answered 429 for the key.
    KeyRateLimited,
    /// The provider said the key's quota or billing is exhausted.
    KeyQuotaExhausted,
    /// The provider refused the key (401, 403).
    KeyRejected,
    /// The provider answered 5xx.
    Upstream5xx,
    /// No response headers within `server.upstream_first_byte_timeout`.
    UpstreamTimeout,
    /// The connection failed or broke before an answer.
    UpstreamUnreachable,
}

impl RetryReason {
    pub const ALL: [RetryReason; 6] = [
        RetryReason::KeyRateLimited,
        RetryReason::KeyQuotaExhausted,
        RetryReason::KeyRejected,
        RetryReason::Upstream5xx,
        RetryReason::UpstreamTimeout,
        RetryReason::UpstreamUnreachable,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RetryReason::KeyRateLimited => "key_rate_limited",
            RetryReason::KeyQuotaExhausted => "key_quota_exhausted",
            RetryReason::KeyRejected => "key_rejected",
            RetryReason::Upstream5xx => "upstream_5xx",
            RetryReason::UpstreamTimeout => "upstream_timeout",
            RetryReason::UpstreamUnreachable => "upstream_unreachable",
        }
    }
}
