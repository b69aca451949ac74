//! What the client gets back from a provider, stripped of every trace of the
//! provider: JSON bodies rewritten whole (`json`), streams rewritten record
//! by record as they flow (`stream`, with the framings of SSE in `sse` and
//! of JSON lines in `ndjson`),
//! key-like text scrubbed from the messages that are kept (`scrub`).

pub mod json;
mod ndjson;
pub mod scrub;
mod sse;
pub mod stream;
