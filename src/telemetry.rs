//! Logging: one tracing subscriber, JSON or pretty, to stderr.
//!
//! What may appear in a log line: request ids, key ids, provider ids, routes,
//! status codes, timings, client addresses. What never may: key material, the
//! admin key or any other credential, request or response bodies. Handlers log
//! route templates, not raw paths with query strings.

use crate::config::{LogConfig, LogFormat};
use std::io::IsTerminal;
use tracing_subscriber::EnvFilter;

/// Installs the global subscriber. `RUST_LOG`, when set, overrides `log.level`.
pub fn init(cfg: &LogConfig) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(&cfg.level));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    // A second init (tests that start several gateways) keeps the first one.
    let _ = match cfg.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        // Colours only on a terminal: a log file or journald gets plain text.
        LogFormat::Pretty => builder
            .compact()
            .with_ansi(std::io::stderr().is_terminal())
            .try_init(),
    };
}
