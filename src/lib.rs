//! keyrouter: an LLM provider key router.
#![forbid(unsafe_code)]

pub mod admin;
pub mod app;
pub mod audit;
pub mod cli;
pub mod config;
pub mod error;
pub mod health;
pub mod http;
pub mod ids;
pub mod json_members;
pub mod jwt;
pub mod keys;
pub mod limits;
pub mod metrics;
pub mod ops;
pub mod proxy;
pub mod sanitize;
pub mod secret;
pub mod server;
pub mod store;
pub mod telemetry;
