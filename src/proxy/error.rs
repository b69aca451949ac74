//! Everything that can end a proxied request early, and the gateway error
//! each becomes. Messages are static: none carries a provider name, a key id
//! or provider text (kept provider messages travel in `ProviderRefused`,
//! already scrubbed).

use crate::error::{ErrorKind, GatewayError};
use crate::health::Verdict;
use http::StatusCode;

#[derive(Debug, PartialEq, Eq)]
pub enum ProxyError {
    /// No provider serves this path.
    UnknownRoute,
    /// Path traversal, encoded separators or a foreign absolute-form target.
    BadTarget,
    /// The request body is larger than `server.max_body_bytes`.
    BodyTooLarge,
    /// The client's body could not be read.
    BrokenRequestBody,
    /// The client did not send its whole body within
    /// `server.body_read_timeout`.
    RequestBodyTimeout,
    /// The request bodies held in memory already use all of
    /// `server.max_buffered_body_bytes`.
    BodyBudgetExhausted,
    /// `client_auth.mode = "jwt"` and no valid client token.
    ClientUnauthorized,
    /// The client token does not allow this provider.
    ProviderNotAllowed,
    /// The client is over its own `rpm`.
    ClientRateLimited { retry_after_secs: u64 },
    /// Redis is down and `on_backend_error = "deny"`.
    LimiterUnavailable,
    /// The provider has no active key.
    NoActiveKey,
    /// Every usable key is at its limit or cooling down.
    AllKeysLimited { retry_after_secs: u64 },
    /// The provider could not be reached or broke the connection.
    UpstreamUnreachable,
    /// The provider did not answer within the first-byte timeout.
    UpstreamTimeout,
    /// The provider answered with a status that is not passed on as such.
    UpstreamFailed,
    /// The provider refused the request itself (400/404/413/422 ...): the
    /// status is kept and the message, scrubbed, when there is one.
    ProviderRefused {
        status: StatusCode,
        message: Option<String>,
    },
}

impl ProxyError {
    /// The label this error carries in logs.
    pub fn as_str(&self) -> &'static str {
        match self {
            ProxyError::UnknownRoute => "unknown_route",
            ProxyError::BadTarget => "bad_target",
            ProxyError::BodyTooLarge => "body_too_large",
            ProxyError::BrokenRequestBody => "broken_request_body",
            ProxyError::RequestBodyTimeout => "request_body_timeout",
            ProxyError::BodyBudgetExhausted => "body_budget_exhausted",
            ProxyError::ClientUnauthorized => "client_unauthorized",
            ProxyError::ProviderNotAllowed => "provider_not_allowed",
            ProxyError::ClientRateLimited { .. } => "client_rate_limited",
            ProxyError::LimiterUnavailable => "limiter_unavailable",
            ProxyError::NoActiveKey => "no_active_key",
            ProxyError::AllKeysLimited { .. } => "all_keys_limited",
            ProxyError::UpstreamUnreachable => "upstream_unreachable",
            ProxyError::UpstreamTimeout => "upstream_timeout",
            ProxyError::UpstreamFailed => "upstream_failed",
            ProxyError::ProviderRefused { .. } => "provider_refused",
        }
    }
}

/// What the client hears when a key problem was the last attempt's outcome:
/// a rate-limited key's wait, else a failure that says nothing about keys.
impl From<Verdict> for ProxyError {
    fn from(v: Verdict) -> Self {
        match v {
            Verdict::RateLimited { retry_after } => ProxyError::AllKeysLimited {
                retry_after_secs: retry_after.map_or(1, |d| d.as_secs().max(1)),
            },
            Verdict::QuotaExhausted | Verdict::Rejected => ProxyError::UpstreamFailed,
        }
    }
}

impl From<ProxyError> for GatewayError {
    fn from(e: ProxyError) -> Self {
        match e {
            ProxyError::UnknownRoute => GatewayError::not_found("No provider serves this path."),
            ProxyError::BadTarget => GatewayError::invalid("The request target is not allowed."),
            ProxyError::BodyTooLarge => GatewayError::new(
                ErrorKind::PayloadTooLarge,
                "The request body is larger than the gateway accepts.",
            )
            .closing_connection(),
            ProxyError::BrokenRequestBody => {
                GatewayError::invalid("The request body could not be read.").closing_connection()
            }
            ProxyError::RequestBodyTimeout => {
                GatewayError::invalid("The request body did not arrive in time.")
                    .with_status(StatusCode::REQUEST_TIMEOUT)
                    .closing_connection()
            }
            // The gateway's own capacity, not a limit of the client's or a
            // key's: the client is within every limit it was given, so
            // neither `rate_limit_exceeded` nor `no_available_key` fits.
            ProxyError::BodyBudgetExhausted => GatewayError::new(
                ErrorKind::InternalError,
                "The gateway is receiving too many request bodies at once. Retry shortly.",
            )
            .unavailable_retry_after(1)
            .closing_connection(),
            ProxyError::ClientUnauthorized => GatewayError::unauthorized(),
            ProxyError::ProviderNotAllowed => {
                GatewayError::forbidden("This client may not use this provider.")
            }
            ProxyError::ClientRateLimited { retry_after_secs } => GatewayError::rate_limited(
                "This client is over its request limit. Retry later.",
                retry_after_secs,
            ),
            ProxyError::LimiterUnavailable => GatewayError::new(
                ErrorKind::InternalError,
                "Rate limiting is unavailable. Retry later.",
            )
            .unavailable_retry_after(1),
            ProxyError::NoActiveKey => GatewayError::new(
                ErrorKind::NoAvailableKey,
                "No key is available for this provider.",
            ),
            ProxyError::AllKeysLimited { retry_after_secs } => GatewayError::rate_limited(
                "All keys for this provider are at their limit. Retry later.",
                retry_after_secs,
            ),
            ProxyError::UpstreamUnreachable | ProxyError::UpstreamFailed => GatewayError::new(
                ErrorKind::UpstreamError,
                "The provider could not complete the request.",
            ),
            ProxyError::UpstreamTimeout => GatewayError::new(
                ErrorKind::UpstreamTimeout,
                "The provider did not answer in time.",
            ),
            ProxyError::ProviderRefused { status, message } => {
                let kind = match status {
                    StatusCode::FORBIDDEN => ErrorKind::Forbidden,
                    StatusCode::NOT_FOUND => ErrorKind::NotFound,
                    StatusCode::CONFLICT => ErrorKind::Conflict,
                    StatusCode::PAYLOAD_TOO_LARGE => ErrorKind::PayloadTooLarge,
                    _ => ErrorKind::InvalidRequest,
                };
                let message = message.unwrap_or_else(|| "The provider refused the request.".into());
                GatewayError::new(kind, message).with_status(status)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_error_has_its_status() {
        let cases = [
            (ProxyError::UnknownRoute, 404, "not_found"),
            (ProxyError::BadTarget, 400, "invalid_request"),
            (ProxyError::RequestBodyTimeout, 408, "invalid_request"),
            (ProxyError::BodyBudgetExhausted, 503, "internal_error"),
            (ProxyError::BodyTooLarge, 413, "payload_too_large"),
            (ProxyError::NoActiveKey, 503, "no_available_key"),
            (ProxyError::ClientUnauthorized, 401, "unauthorized"),
            (ProxyError::ProviderNotAllowed, 403, "forbidden"),
            (
                ProxyError::ClientRateLimited {
                    retry_after_secs: 1,
                },
                429,
                "rate_limit_exceeded",
            ),
            (ProxyError::LimiterUnavailable, 503, "internal_error"),
            (
                ProxyError::AllKeysLimited {
                    retry_after_secs: 3,
                },
                429,
                "rate_limit_exceeded",
            ),
            (ProxyError::UpstreamUnreachable, 502, "upstream_error"),
            (ProxyError::UpstreamFailed, 502, "upstream_error"),
            (ProxyError::UpstreamTimeout, 504, "upstream_timeout"),
            (
                ProxyError::ProviderRefused {
                    status: StatusCode::UNPROCESSABLE_ENTITY,
                    message: None,
                },
                422,
                "invalid_request",
            ),
            (
                ProxyError::ProviderRefused {
                    status: StatusCode::FORBIDDEN,
                    message: None,
                },
                403,
                "forbidden",
            ),
            (
                ProxyError::ProviderRefused {
                    status: StatusCode::CONFLICT,
                    message: None,
                },
                409,
                "conflict",
            ),
        ];
        for (e, status, kind) in cases {
            let g = GatewayError::from(e);
            assert_eq!((g.status.as_u16(), g.kind.as_str()), (status, kind));
        }
    }
}
