//! What the client gets back from a provider, stripped of every trace of the
//! provider: response headers by allow-list, JSON bodies and SSE events
//! rewritten, key-like text scrubbed from the messages that are kept.

pub mod json;
pub mod scrub;
pub mod sse;
