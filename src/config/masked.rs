//! The effective configuration as `keyrouter check-config` prints it: a view
//! built field by field, where a secret shows only whether it is set. The
//! config itself is never serialized, so a secret cannot slip into the output
//! through a derive.

use super::{ClientAuth, Config, RateLimitBackend, StoreConfig};
use serde::Serialize;

#[derive(Serialize)]
struct Masked<'a> {
    server: MaskedServer<'a>,
    #[serde(skip_serializing_if = "Option::is_none")]
    tls: Option<MaskedTls>,
    providers: Vec<MaskedProvider<'a>>,
    store: MaskedStore,
    rate_limit: MaskedRateLimit<'a>,
    client_auth: MaskedClientAuth,
    sanitize: MaskedSanitize,
    audit: MaskedAudit,
    log: MaskedLog<'a>,
    secrets: MaskedSecrets,
}

#[derive(Serialize)]
struct MaskedServer<'a> {
    listen: String,
    admin_listen: String,
    ops_listen: String,
    max_body_bytes: usize,
    max_buffered_body_bytes: usize,
    max_connections: usize,
    workers: usize,
    header_read_timeout: String,
    body_read_timeout: String,
    upstream_connect_timeout: String,
    upstream_first_byte_timeout: String,
    upstream_read_timeout: String,
    idle_timeout: String,
    shutdown_drain: String,
    cors_origins: &'a [String],
}

#[derive(Serialize)]
struct MaskedTls {
    cert_path: String,
    key_path: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    client_ca_path: Option<String>,
}

#[derive(Serialize)]
struct MaskedProvider<'a> {
    id: &'a str,
    kind: &'static str,
    base_url: String,
    route_prefix: &'a str,
    default: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    upstream_ca_path: Option<String>,
    policy: &'static str,
    retry_budget: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    probe_interval: Option<String>,
}

#[derive(Serialize)]
struct MaskedStore {
    backend: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    database: Option<String>,
}

#[derive(Serialize)]
struct MaskedRateLimit<'a> {
    backend: &'static str,
    on_backend_error: &'static str,
    redis_prefix: &'a str,
    cooldown_base: String,
    cooldown_max: String,
}

#[derive(Serialize)]
struct MaskedClientAuth {
    mode: &'static str,
}

#[derive(Serialize)]
struct MaskedSanitize {
    strip_usage: bool,
}

#[derive(Serialize)]
struct MaskedAudit {
    retention_days: u32,
}

#[derive(Serialize)]
struct MaskedLog<'a> {
    level: &'a str,
    format: &'static str,
}

/// Secrets appear only as "set" or "not set" (Fernet keys as a count).
#[derive(Serialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
struct MaskedSecrets {
    keyrouter_fernet_keys: String,
    keyrouter_admin_api_key: &'static str,
    keyrouter_admin_jwt_secret: &'static str,
    keyrouter_client_jwt_secret: &'static str,
    keyrouter_mongodb_uri: &'static str,
    keyrouter_redis_url: &'static str,
}

fn set(present: bool) -> &'static str {
    if present { "[set]" } else { "[not set]" }
}

fn dur(d: std::time::Duration) -> String {
    humantime::format_duration(d).to_string()
}

/// The masked configuration as TOML text.
pub fn render(cfg: &Config) -> String {
    let s = &cfg.server;
    let view = Masked {
        server: MaskedServer {
            listen: s.listen.to_string(),
            admin_listen: s.admin_listen.to_string(),
            ops_listen: s.ops_listen.to_string(),
            max_body_bytes: s.max_body_bytes,
            max_buffered_body_bytes: s.max_buffered_body_bytes,
            max_connections: s.max_connections,
            workers: s.workers,
            header_read_timeout: dur(s.header_read_timeout),
            body_read_timeout: dur(s.body_read_timeout),
            upstream_connect_timeout: dur(s.upstream_connect_timeout),
            upstream_first_byte_timeout: dur(s.upstream_first_byte_timeout),
            upstream_read_timeout: dur(s.upstream_read_timeout),
            idle_timeout: dur(s.idle_timeout),
            shutdown_drain: dur(s.shutdown_drain),
            cors_origins: &s.cors_origins,
        },
        tls: cfg.tls.as_ref().map(|t| MaskedTls {
            cert_path: t.cert_path.display().to_string(),
            key_path: t.key_path.display().to_string(),
            client_ca_path: t.client_ca_path.as_ref().map(|p| p.display().to_string()),
        }),
        providers: cfg
            .providers
            .iter()
            .map(|p| MaskedProvider {
                id: &p.id,
                kind: p.kind.as_str(),
                base_url: p.base_url.to_string().trim_end_matches('/').to_owned(),
                route_prefix: &p.route_prefix,
                default: p.default,
                upstream_ca_path: p.upstream_ca_path.as_ref().map(|c| c.display().to_string()),
                policy: p.policy.as_str(),
                retry_budget: p.retry_budget,
                probe_interval: p.probe_interval.map(dur),
            })
            .collect(),
        store: match &cfg.store {
            StoreConfig::Sqlite { path } => MaskedStore {
                backend: cfg.store.backend_name(),
                path: Some(path.display().to_string()),
                database: None,
            },
            StoreConfig::MongoDb { database, .. } => MaskedStore {
                backend: cfg.store.backend_name(),
                path: None,
                database: Some(database.clone()),
            },
        },
        rate_limit: MaskedRateLimit {
            backend: cfg.rate_limit.backend.name(),
            on_backend_error: match cfg.rate_limit.on_backend_error {
                super::OnBackendError::Local => "local",
                super::OnBackendError::Deny => "deny",
            },
            redis_prefix: &cfg.rate_limit.redis_prefix,
            cooldown_base: dur(cfg.rate_limit.cooldown_base),
            cooldown_max: dur(cfg.rate_limit.cooldown_max),
        },
        client_auth: MaskedClientAuth {
            mode: match cfg.client_auth {
                ClientAuth::None => "none",
                ClientAuth::Jwt { .. } => "jwt",
            },
        },
        sanitize: MaskedSanitize {
            strip_usage: cfg.sanitize.strip_usage,
        },
        audit: MaskedAudit {
            retention_days: cfg.audit.retention_days,
        },
        log: MaskedLog {
            level: &cfg.log.level,
            format: match cfg.log.format {
                super::LogFormat::Json => "json",
                super::LogFormat::Pretty => "pretty",
            },
        },
        secrets: MaskedSecrets {
            keyrouter_fernet_keys: format!("[set: {} key(s)]", cfg.fernet_keys.len()),
            keyrouter_admin_api_key: set(cfg.admin_auth.api_key.is_some()),
            keyrouter_admin_jwt_secret: set(cfg.admin_auth.jwt_secret.is_some()),
            keyrouter_client_jwt_secret: set(matches!(cfg.client_auth, ClientAuth::Jwt { .. })),
            keyrouter_mongodb_uri: set(matches!(cfg.store, StoreConfig::MongoDb { .. })),
            keyrouter_redis_url: set(matches!(
                cfg.rate_limit.backend,
                RateLimitBackend::Redis { .. }
            )),
        },
    };
    toml::to_string_pretty(&view).unwrap_or_else(|_| "# (could not render)\n".into())
}
