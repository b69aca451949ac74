//! The TOML file's shape, field for field. Everything is optional here;
//! defaults and validation live in `config/mod.rs`. Unknown settings are
//! rejected so a typo never silently falls back to a default. There is no
//! place for a secret in this shape: secrets come only from the environment.

use serde::Deserialize;

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    #[serde(default)]
    pub server: RawServer,
    pub tls: Option<RawTls>,
    pub providers: Option<Vec<RawProvider>>,
    #[serde(default)]
    pub store: RawStore,
    #[serde(default)]
    pub rate_limit: RawRateLimit,
    #[serde(default)]
    pub client_auth: RawClientAuth,
    #[serde(default)]
    pub sanitize: RawSanitize,
    #[serde(default)]
    pub audit: RawAudit,
    #[serde(default)]
    pub log: RawLog,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawServer {
    pub listen: Option<String>,
    pub admin_listen: Option<String>,
    pub ops_listen: Option<String>,
    pub max_body_bytes: Option<u64>,
    pub max_buffered_body_bytes: Option<u64>,
    pub max_connections: Option<u32>,
    pub workers: Option<u32>,
    pub header_read_timeout: Option<String>,
    pub body_read_timeout: Option<String>,
    pub upstream_connect_timeout: Option<String>,
    pub upstream_first_byte_timeout: Option<String>,
    pub upstream_read_timeout: Option<String>,
    pub idle_timeout: Option<String>,
    pub shutdown_drain: Option<String>,
    pub cors_origins: Option<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    pub cert_path: Option<String>,
    pub key_path: Option<String>,
    pub client_ca_path: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProvider {
    pub id: String,
    pub kind: String,
    pub base_url: String,
    pub route_prefix: String,
    #[serde(default)]
    pub default: bool,
    pub upstream_ca_path: Option<String>,
    pub policy: Option<String>,
    pub retry_budget: Option<u32>,
    pub probe_interval: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    pub backend: Option<String>,
    pub path: Option<String>,
    pub database: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimit {
    pub backend: Option<String>,
    pub on_backend_error: Option<String>,
    pub redis_prefix: Option<String>,
    pub cooldown_base: Option<String>,
    pub cooldown_max: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawClientAuth {
    pub mode: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSanitize {
    pub strip_usage: Option<bool>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAudit {
    pub retention_days: Option<u32>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLog {
    pub level: Option<String>,
    pub format: Option<String>,
}
