//! keyrouter: an LLM provider key router.
#![forbid(unsafe_code)]

pub mod audit;
pub mod error;
pub mod http;
pub mod keys;
pub mod secret;
pub mod store;
