//! The audit log: the event type, and the durable queue for events that are not
//! written together with a store change.

pub mod event;
pub mod queue;

pub use event::{Actor, AuditEvent, EventKind, Outcome};
pub use queue::AuditQueue;
