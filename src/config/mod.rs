//! Configuration: built-in defaults, then the TOML file, then
//! `KEYROUTER_<SECTION>__<KEY>` overrides, then secrets from the environment.
//!
//! The raw shape (`file.rs`) is validated into the typed [`Config`] here. Every
//! error is one line naming the setting or variable, never its value (an
//! error about a value an override set names that variable too, see
//! [`env::Overrides`]), and a missing security setting is an error (or, for
//! the management API, a deny-everything mode), never a silent default.

pub mod env;
mod file;
pub mod masked;

use crate::keys::Vault;
use crate::secret::Secret;
use env::{Env, Overrides, read_secret};
use file::{RawConfig, RawProvider};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The default config file, used when `--config` is not given and it exists.
pub const DEFAULT_CONFIG_PATH: &str = "config/keyrouter.toml";

/// A configuration problem: one line naming the setting or variable at
/// fault, never a value.
#[derive(thiserror::Error)]
pub enum ConfigError {
    /// A setting's value, or its absence, is refused. `settings` are the
    /// paths it is about (`server.listen`, `providers[0].id`), by which
    /// [`Overrides::blame`] finds a variable that set one.
    #[error("{message}")]
    Setting {
        settings: Vec<String>,
        message: String,
    },
    /// The value at fault came from the environment variable `var`, which
    /// the line names first.
    #[error("{var}: {error}")]
    Override {
        var: String,
        error: Box<ConfigError>,
    },
    /// Anything else: the file itself, a secret variable (the message
    /// names it), the Fernet key ring, a TLS file.
    #[error("{0}")]
    Other(String),
}

/// Shows the one line `Display` shows: the paths kept for the blame may
/// hold a setting name typed into the file, which could be a secret pasted
/// in the wrong place.
impl fmt::Debug for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Display::fmt(self, f)
    }
}

/// A problem that is not about a setting's value: [`ConfigError::Other`].
fn bad(msg: impl Into<String>) -> ConfigError {
    ConfigError::Other(msg.into())
}

/// `setting` refused, `problem` completing the sentence:
/// "server.workers must be between 1 and 1024".
fn invalid(setting: impl Into<String>, problem: impl fmt::Display) -> ConfigError {
    let setting = setting.into();
    ConfigError::Setting {
        message: format!("{setting} {problem}"),
        settings: vec![setting],
    }
}

/// A problem about `settings`, told by `message`.
fn about<S: Into<String>>(
    settings: impl IntoIterator<Item = S>,
    message: impl Into<String>,
) -> ConfigError {
    ConfigError::Setting {
        settings: settings.into_iter().map(Into::into).collect(),
        message: message.into(),
    }
}

/// The validated configuration.
#[derive(Debug)]
pub struct Config {
    pub server: ServerConfig,
    pub tls: Option<TlsConfig>,
    pub providers: Vec<ProviderConfig>,
    pub store: StoreConfig,
    pub rate_limit: RateLimitConfig,
    pub client_auth: ClientAuth,
    pub sanitize: SanitizeConfig,
    pub audit: AuditConfig,
    pub log: LogConfig,
    pub admin_auth: AdminAuth,
    /// The Fernet key ring, primary first. Always at least one valid key.
    pub fernet_keys: Vec<Secret>,
}

#[derive(Debug)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub admin_listen: SocketAddr,
    pub ops_listen: SocketAddr,
    pub max_body_bytes: usize,
    /// Bytes of request bodies all requests together may hold in memory
    /// for replay; a body arriving when they are spent is refused (503)
    /// instead of waiting, so many large uploads at once cannot exhaust
    /// memory. At least `max_body_bytes`.
    pub max_buffered_body_bytes: usize,
    /// Open connections per listener; further connections wait in the
    /// kernel's backlog instead of exhausting memory or file descriptors.
    pub max_connections: usize,
    /// Threads serving the proxy listener, each with its own runtime and
    /// upstream connections (see `server::workers`).
    pub workers: usize,
    pub header_read_timeout: Duration,
    /// Time a client has to send a request's whole body, counted from when
    /// the gateway starts reading it (408 after it).
    pub body_read_timeout: Duration,
    pub upstream_connect_timeout: Duration,
    pub upstream_first_byte_timeout: Duration,
    /// Longest wait for the next bytes of a provider's response body once
    /// its headers arrived; a body silent for longer is cut off. Generous
    /// by default: reasoning models can think for minutes between events
    /// of a stream (most send keep-alive comments meanwhile, some do not).
    pub upstream_read_timeout: Duration,
    pub idle_timeout: Duration,
    pub shutdown_drain: Duration,
    pub cors_origins: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct TlsConfig {
    pub cert_path: PathBuf,
    pub key_path: PathBuf,
    pub client_ca_path: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProviderKind {
    OpenAi,
    Anthropic,
    AzureOpenAi,
    Gemini,
    OpenAiCompatible,
}

impl ProviderKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::OpenAi => "openai",
            ProviderKind::Anthropic => "anthropic",
            ProviderKind::AzureOpenAi => "azure_openai",
            ProviderKind::Gemini => "gemini",
            ProviderKind::OpenAiCompatible => "openai_compatible",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        [
            ProviderKind::OpenAi,
            ProviderKind::Anthropic,
            ProviderKind::AzureOpenAi,
            ProviderKind::Gemini,
            ProviderKind::OpenAiCompatible,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }
}

/// How a key is chosen among a provider's usable keys.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    LeastLoaded,
    RoundRobin,
    Weighted,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::LeastLoaded => "least_loaded",
            Policy::RoundRobin => "round_robin",
            Policy::Weighted => "weighted",
        }
    }
}

#[derive(Debug, Clone)]
pub struct ProviderConfig {
    pub id: String,
    pub kind: ProviderKind,
    /// The provider's origin (scheme, host, optional port), no trailing slash.
    pub base_url: http::Uri,
    /// Starts with `/`, no trailing slash.
    pub route_prefix: String,
    pub default: bool,
    pub upstream_ca_path: Option<PathBuf>,
    pub policy: Policy,
    /// Further attempts on other keys after the first one fails.
    pub retry_budget: u32,
    pub probe_interval: Option<Duration>,
}

#[derive(Debug)]
pub enum StoreConfig {
    Sqlite { path: PathBuf },
    MongoDb { uri: Secret, database: String },
}

impl StoreConfig {
    /// The `store.backend` value.
    pub fn backend_name(&self) -> &'static str {
        match self {
            StoreConfig::Sqlite { .. } => "sqlite",
            StoreConfig::MongoDb { .. } => "mongodb",
        }
    }
}

#[derive(Debug)]
pub struct RateLimitConfig {
    pub backend: RateLimitBackend,
    pub on_backend_error: OnBackendError,
    /// Prefix of every Redis key the limiter writes, so several deployments
    /// (or test runs) can share one Redis.
    pub redis_prefix: String,
    pub cooldown_base: Duration,
    pub cooldown_max: Duration,
}

#[derive(Debug)]
pub enum RateLimitBackend {
    Local,
    Redis { url: Secret },
}

impl RateLimitBackend {
    /// The `rate_limit.backend` value.
    pub fn name(&self) -> &'static str {
        match self {
            RateLimitBackend::Local => "local",
            RateLimitBackend::Redis { .. } => "redis",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnBackendError {
    Local,
    Deny,
}

#[derive(Debug)]
pub enum ClientAuth {
    None,
    Jwt { secret: Secret },
}

#[derive(Debug, Clone, Copy)]
pub struct SanitizeConfig {
    pub strip_usage: bool,
}

#[derive(Debug, Clone, Copy)]
pub struct AuditConfig {
    pub retention_days: u32,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: String,
    pub format: LogFormat,
}

/// The management API's credentials. With neither, every request is 401.
#[derive(Debug)]
pub struct AdminAuth {
    pub api_key: Option<Secret>,
    pub jwt_secret: Option<Secret>,
}

/// Largest `server.max_buffered_body_bytes` accepted (64 GiB).
const MAX_BUFFERED_BODY_BYTES: u64 = 64 * 1024 * 1024 * 1024;

/// Most proxy threads accepted: far more than any machine's cores.
const MAX_WORKERS: u32 = 1024;

/// Minimum length of the admin API key and the JWT secrets.
pub const MIN_SECRET_LEN: usize = 32;

impl Config {
    /// Loads and validates: the file at `path` (or [`DEFAULT_CONFIG_PATH`] when
    /// it exists), environment overrides, then secrets.
    pub fn load(path: Option<&Path>, env: &dyn Env) -> Result<Config, ConfigError> {
        let default_path = Path::new(DEFAULT_CONFIG_PATH);
        let path = match path {
            Some(p) => Some(p),
            None => default_path.exists().then_some(default_path),
        };
        let mut table = match path {
            Some(p) => read_toml(p)?,
            None => toml::Table::new(),
        };
        let overrides = Overrides::apply(&mut table, env)?;
        from_table(table, env).map_err(|e| overrides.blame(e))
    }

    pub fn default_provider(&self) -> Option<&ProviderConfig> {
        self.providers.iter().find(|p| p.default)
    }

    pub fn provider(&self, id: &str) -> Option<&ProviderConfig> {
        self.providers.iter().find(|p| p.id == id)
    }
}

/// The configuration the merged `table` and the secrets in `env` make.
fn from_table(table: toml::Table, env: &dyn Env) -> Result<Config, ConfigError> {
    let raw: RawConfig = serde_path_to_error::deserialize(table).map_err(|e| {
        let setting = e.path().to_string();
        let inner = e.into_inner().to_string();
        if let Some(field) = quoted_after(&inner, "unknown field") {
            // The path already ends with the unknown name.
            let message = if field == "?" {
                "unknown setting (its name is not a valid setting name)".to_owned()
            } else {
                format!("unknown setting `{setting}`")
            };
            about([setting], message)
        } else if let Some(field) = quoted_after(&inner, "missing field") {
            let missing = format!("{setting}.{field}");
            let message = format!("setting `{missing}` is required");
            about([missing], message)
        } else {
            let message = format!("setting `{setting}` has a value of the wrong type");
            about([setting], message)
        }
    })?;
    validate(raw, env)
}

fn read_toml(path: &Path) -> Result<toml::Table, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        bad(format!(
            "config file {}: cannot be read ({})",
            path.display(),
            e.kind()
        ))
    })?;
    text.parse::<toml::Table>().map_err(|e| {
        let line = e
            .span()
            .map(|s| text[..s.start].matches('\n').count() + 1)
            .unwrap_or(0);
        bad(format!(
            "config file {}: invalid TOML at line {line}: {}",
            path.display(),
            e.message()
        ))
    })
}

/// The name in backquotes after `prefix` in a serde message, if it looks like
/// a setting name (so a stray secret used as a key is never echoed).
fn quoted_after(message: &str, prefix: &str) -> Option<String> {
    let rest = message.strip_prefix(prefix)?.trim_start();
    let name = rest.strip_prefix('`')?.split('`').next()?;
    let plausible = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
    Some(if plausible {
        name.to_owned()
    } else {
        "?".to_owned()
    })
}

fn validate(raw: RawConfig, env: &dyn Env) -> Result<Config, ConfigError> {
    let s = raw.server;
    let server = ServerConfig {
        listen: addr("server.listen", s.listen, "0.0.0.0:8080")?,
        admin_listen: addr("server.admin_listen", s.admin_listen, "127.0.0.1:8081")?,
        ops_listen: addr("server.ops_listen", s.ops_listen, "0.0.0.0:9090")?,
        max_body_bytes: match s.max_body_bytes {
            None => 10 * 1024 * 1024,
            Some(n @ 1..=1_073_741_824) => n as usize,
            Some(_) => {
                return Err(invalid(
                    "server.max_body_bytes",
                    "must be between 1 and 1073741824",
                ));
            }
        },
        max_buffered_body_bytes: match s.max_buffered_body_bytes {
            None => 256 * 1024 * 1024,
            Some(n @ 1..=MAX_BUFFERED_BODY_BYTES) => n as usize,
            Some(_) => {
                return Err(invalid(
                    "server.max_buffered_body_bytes",
                    format_args!("must be between 1 and {MAX_BUFFERED_BODY_BYTES}"),
                ));
            }
        },
        max_connections: match s.max_connections {
            None => 10_000,
            Some(n @ 1..) => n as usize,
            Some(0) => return Err(invalid("server.max_connections", "must be at least 1")),
        },
        workers: match s.workers {
            None => std::thread::available_parallelism().map_or(1, usize::from),
            Some(n @ 1..=MAX_WORKERS) => n as usize,
            Some(_) => {
                return Err(invalid(
                    "server.workers",
                    format_args!("must be between 1 and {MAX_WORKERS}"),
                ));
            }
        },
        header_read_timeout: duration("server.header_read_timeout", s.header_read_timeout, 10)?,
        body_read_timeout: duration("server.body_read_timeout", s.body_read_timeout, 60)?,
        upstream_connect_timeout: duration(
            "server.upstream_connect_timeout",
            s.upstream_connect_timeout,
            5,
        )?,
        upstream_first_byte_timeout: duration(
            "server.upstream_first_byte_timeout",
            s.upstream_first_byte_timeout,
            120,
        )?,
        upstream_read_timeout: duration(
            "server.upstream_read_timeout",
            s.upstream_read_timeout,
            300,
        )?,
        idle_timeout: duration("server.idle_timeout", s.idle_timeout, 90)?,
        shutdown_drain: duration("server.shutdown_drain", s.shutdown_drain, 30)?,
        cors_origins: s.cors_origins.unwrap_or_default(),
    };
    if server.max_buffered_body_bytes < server.max_body_bytes {
        return Err(about(
            ["server.max_buffered_body_bytes", "server.max_body_bytes"],
            "server.max_buffered_body_bytes must not be below server.max_body_bytes",
        ));
    }
    distinct_listeners(&server)?;

    let tls = raw.tls.map(tls_config).transpose()?;
    let providers = providers(raw.providers)?;

    let store = match raw.store.backend.as_deref().unwrap_or("sqlite") {
        "sqlite" => StoreConfig::Sqlite {
            path: PathBuf::from(raw.store.path.unwrap_or_else(|| "data/keyrouter.db".into())),
        },
        "mongodb" => StoreConfig::MongoDb {
            uri: required_secret(env, "KEYROUTER_MONGODB_URI", "store.backend = \"mongodb\"")?,
            database: raw.store.database.unwrap_or_else(|| "keyrouter".into()),
        },
        _ => {
            return Err(invalid(
                "store.backend",
                "must be \"sqlite\" or \"mongodb\"",
            ));
        }
    };

    let rl = raw.rate_limit;
    let rate_limit = RateLimitConfig {
        backend: match rl.backend.as_deref().unwrap_or("local") {
            "local" => RateLimitBackend::Local,
            "redis" => RateLimitBackend::Redis {
                url: required_secret(env, "KEYROUTER_REDIS_URL", "rate_limit.backend = \"redis\"")?,
            },
            _ => {
                return Err(invalid(
                    "rate_limit.backend",
                    "must be \"local\" or \"redis\"",
                ));
            }
        },
        on_backend_error: match rl.on_backend_error.as_deref().unwrap_or("local") {
            "local" => OnBackendError::Local,
            "deny" => OnBackendError::Deny,
            _ => {
                return Err(invalid(
                    "rate_limit.on_backend_error",
                    "must be \"local\" or \"deny\"",
                ));
            }
        },
        redis_prefix: match rl.redis_prefix {
            None => "keyrouter".into(),
            Some(p)
                if (1..=64).contains(&p.len())
                    && p.bytes()
                        .all(|b| b.is_ascii_alphanumeric() || b"_-.:".contains(&b)) =>
            {
                p
            }
            Some(_) => {
                return Err(invalid(
                    "rate_limit.redis_prefix",
                    "must be 1 to 64 letters, digits, '_', '-', '.' or ':'",
                ));
            }
        },
        cooldown_base: duration("rate_limit.cooldown_base", rl.cooldown_base, 30)?,
        cooldown_max: duration("rate_limit.cooldown_max", rl.cooldown_max, 600)?,
    };
    if rate_limit.cooldown_max < rate_limit.cooldown_base {
        return Err(about(
            ["rate_limit.cooldown_max", "rate_limit.cooldown_base"],
            "rate_limit.cooldown_max must not be below rate_limit.cooldown_base",
        ));
    }

    let client_auth = match raw.client_auth.mode.as_deref().unwrap_or("none") {
        "none" => ClientAuth::None,
        "jwt" => ClientAuth::Jwt {
            secret: long_secret(
                required_secret(
                    env,
                    "KEYROUTER_CLIENT_JWT_SECRET",
                    "client_auth.mode = \"jwt\"",
                )?,
                "KEYROUTER_CLIENT_JWT_SECRET",
            )?,
        },
        _ => return Err(invalid("client_auth.mode", "must be \"none\" or \"jwt\"")),
    };

    let retention_days = raw.audit.retention_days.unwrap_or(90);
    if retention_days == 0 {
        return Err(invalid("audit.retention_days", "must be at least 1"));
    }

    let log = LogConfig {
        level: raw.log.level.unwrap_or_else(|| "info".into()),
        format: match raw.log.format.as_deref().unwrap_or("json") {
            "json" => LogFormat::Json,
            "pretty" => LogFormat::Pretty,
            _ => return Err(invalid("log.format", "must be \"json\" or \"pretty\"")),
        },
    };
    if tracing_subscriber::EnvFilter::try_new(&log.level).is_err() {
        return Err(invalid(
            "log.level",
            "is not a valid level or filter (e.g. \"info\")",
        ));
    }

    let fernet_keys = fernet_keys(env)?;
    let admin_auth = AdminAuth {
        api_key: secret_opt(env, "KEYROUTER_ADMIN_API_KEY")?
            .map(|k| long_secret(k, "KEYROUTER_ADMIN_API_KEY"))
            .transpose()?,
        jwt_secret: secret_opt(env, "KEYROUTER_ADMIN_JWT_SECRET")?
            .map(|k| long_secret(k, "KEYROUTER_ADMIN_JWT_SECRET"))
            .transpose()?,
    };

    Ok(Config {
        server,
        tls,
        providers,
        store,
        rate_limit,
        client_auth,
        sanitize: SanitizeConfig {
            strip_usage: raw.sanitize.strip_usage.unwrap_or(false),
        },
        audit: AuditConfig { retention_days },
        log,
        admin_auth,
        fernet_keys,
    })
}

fn addr(name: &str, value: Option<String>, default: &str) -> Result<SocketAddr, ConfigError> {
    value
        .as_deref()
        .unwrap_or(default)
        .parse()
        .map_err(|_| invalid(name, "must be an address like 127.0.0.1:8080"))
}

/// Refuses two listeners on one socket, which `serve` could not bind (the
/// second one would find the address in use).
fn distinct_listeners(server: &ServerConfig) -> Result<(), ConfigError> {
    let listeners = [
        ("server.listen", server.listen),
        ("server.admin_listen", server.admin_listen),
        ("server.ops_listen", server.ops_listen),
    ];
    for (i, &(name, addr)) in listeners.iter().enumerate() {
        for &(other_name, other) in &listeners[i + 1..] {
            if clash(addr, other) {
                return Err(about(
                    [name, other_name],
                    format!(
                        "{name} and {other_name} must not use the same port on the same address \
                         (0.0.0.0 or [::] takes the port on every address)"
                    ),
                ));
            }
        }
    }
    Ok(())
}

/// Whether two listeners cannot both bind: the same port on the same
/// address, or on any address when either is a wildcard (which takes the
/// port on every address; `[::]` on IPv4 ones too, as Linux binds it
/// dual-stack). Port 0 never clashes: each bind gets a free port of its own.
fn clash(a: SocketAddr, b: SocketAddr) -> bool {
    a.port() != 0
        && a.port() == b.port()
        && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
}

fn duration(name: &str, value: Option<String>, default_secs: u64) -> Result<Duration, ConfigError> {
    match value {
        None => Ok(Duration::from_secs(default_secs)),
        Some(v) => humantime::parse_duration(&v)
            .ok()
            .filter(|d| !d.is_zero())
            .ok_or_else(|| invalid(name, "must be a duration like \"30s\" or \"5m\"")),
    }
}

fn readable_file(name: &str, path: String) -> Result<PathBuf, ConfigError> {
    std::fs::File::open(&path)
        .map(|_| PathBuf::from(&path))
        .map_err(|e| {
            about(
                [name],
                format!("{name}: {path} cannot be read ({})", e.kind()),
            )
        })
}

fn tls_config(raw: file::RawTls) -> Result<TlsConfig, ConfigError> {
    let (Some(cert), Some(key)) = (raw.cert_path, raw.key_path) else {
        return Err(about(
            ["tls.cert_path", "tls.key_path"],
            "tls.cert_path and tls.key_path must both be set when [tls] is present",
        ));
    };
    let tls = TlsConfig {
        cert_path: readable_file("tls.cert_path", cert)?,
        key_path: readable_file("tls.key_path", key)?,
        client_ca_path: raw
            .client_ca_path
            .map(|p| readable_file("tls.client_ca_path", p))
            .transpose()?,
    };
    crate::server::tls::load_server_config(&tls)
        .map_err(|e| about([e.setting()], e.to_string()))?;
    Ok(tls)
}

/// OpenAI as the default provider and Anthropic, used when the file names no
/// providers.
fn builtin_providers() -> Vec<RawProvider> {
    let p = |id: &str, base: &str, default| RawProvider {
        id: id.into(),
        kind: id.into(),
        base_url: base.into(),
        route_prefix: format!("/{id}"),
        default,
        upstream_ca_path: None,
        policy: None,
        retry_budget: None,
        probe_interval: None,
    };
    vec![
        p("openai", "https://api.openai.com", true),
        p("anthropic", "https://api.anthropic.com", false),
    ]
}

fn providers(raw: Option<Vec<RawProvider>>) -> Result<Vec<ProviderConfig>, ConfigError> {
    let raw = raw.unwrap_or_else(builtin_providers);
    let mut out: Vec<ProviderConfig> = Vec::with_capacity(raw.len());
    for (i, p) in raw.into_iter().enumerate() {
        let at = format!("providers[{i}]");
        let id_ok = (1..=32).contains(&p.id.len())
            && p.id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if !id_ok {
            return Err(invalid(format!("{at}.id"), "must match ^[a-z0-9_]{1,32}$"));
        }
        let kind = ProviderKind::parse(&p.kind).ok_or_else(|| {
            invalid(
                format!("{at}.kind"),
                "must be one of openai, anthropic, azure_openai, gemini, openai_compatible",
            )
        })?;
        let base_url = base_url(&at, &p.base_url)?;
        let prefix = p.route_prefix.trim_end_matches('/').to_owned();
        let prefix_ok = prefix.len() > 1
            && prefix.starts_with('/')
            && prefix[1..].split('/').all(|seg| {
                !seg.is_empty()
                    && seg
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'.'))
                    && seg != "."
                    && seg != ".."
            });
        if !prefix_ok {
            return Err(invalid(
                format!("{at}.route_prefix"),
                "must be a path like \"/openai\"",
            ));
        }
        if prefix == "/v1" || prefix.starts_with("/v1/") {
            return Err(invalid(
                format!("{at}.route_prefix"),
                "must not start with /v1 (reserved for the default provider)",
            ));
        }
        let policy = match p.policy.as_deref().unwrap_or("least_loaded") {
            "least_loaded" => Policy::LeastLoaded,
            "round_robin" => Policy::RoundRobin,
            "weighted" => Policy::Weighted,
            _ => {
                return Err(invalid(
                    format!("{at}.policy"),
                    "must be least_loaded, round_robin or weighted",
                ));
            }
        };
        let retry_budget = p.retry_budget.unwrap_or(2);
        if retry_budget > 10 {
            return Err(invalid(format!("{at}.retry_budget"), "must be at most 10"));
        }
        let provider = ProviderConfig {
            id: p.id,
            kind,
            base_url,
            route_prefix: prefix,
            default: p.default,
            upstream_ca_path: p
                .upstream_ca_path
                .map(|c| readable_file(&format!("{at}.upstream_ca_path"), c))
                .transpose()?,
            policy,
            retry_budget,
            probe_interval: p
                .probe_interval
                .map(|d| duration(&format!("{at}.probe_interval"), Some(d), 0))
                .transpose()?,
        };
        if let Some(j) = out.iter().position(|o| o.id == provider.id) {
            return Err(about(
                [format!("providers[{j}].id"), format!("{at}.id")],
                format!("{at}.id repeats an earlier provider's id"),
            ));
        }
        if let Some(j) = out
            .iter()
            .position(|o| o.route_prefix == provider.route_prefix)
        {
            return Err(about(
                [
                    format!("providers[{j}].route_prefix"),
                    format!("{at}.route_prefix"),
                ],
                format!("{at}.route_prefix repeats an earlier provider's"),
            ));
        }
        out.push(provider);
    }
    let defaults: Vec<String> = (out.iter().enumerate())
        .filter(|(_, p)| p.default)
        .map(|(i, _)| format!("providers[{i}].default"))
        .collect();
    if defaults.len() > 1 {
        return Err(about(
            defaults,
            "providers: at most one provider may set default = true",
        ));
    }
    Ok(out)
}

fn base_url(at: &str, raw: &str) -> Result<http::Uri, ConfigError> {
    let msg = || {
        invalid(
            format!("{at}.base_url"),
            "must be an http(s) origin like https://api.openai.com (no credentials, query or fragment)",
        )
    };
    let uri: http::Uri = raw.trim_end_matches('/').parse().map_err(|_| msg())?;
    let scheme_ok = matches!(uri.scheme_str(), Some("http" | "https"));
    let authority = uri.authority().ok_or_else(msg)?;
    if !scheme_ok || authority.as_str().contains('@') || uri.query().is_some() || raw.contains('#')
    {
        return Err(msg());
    }
    Ok(uri)
}

fn secret_opt(env: &dyn Env, name: &str) -> Result<Option<Secret>, ConfigError> {
    read_secret(env, name).map_err(ConfigError::Other)
}

fn required_secret(env: &dyn Env, name: &str, because: &str) -> Result<Secret, ConfigError> {
    secret_opt(env, name)?.ok_or_else(|| bad(format!("{name} is required when {because}")))
}

fn long_secret(secret: Secret, name: &str) -> Result<Secret, ConfigError> {
    if secret.len() < MIN_SECRET_LEN {
        return Err(bad(format!(
            "{name} must be at least {MIN_SECRET_LEN} characters long"
        )));
    }
    Ok(secret)
}

fn fernet_keys(env: &dyn Env) -> Result<Vec<Secret>, ConfigError> {
    let all = secret_opt(env, "KEYROUTER_FERNET_KEYS")?.ok_or_else(|| {
        bad("KEYROUTER_FERNET_KEYS is required (create one with `keyrouter gen-fernet-key`)")
    })?;
    let keys: Vec<Secret> = all
        .expose()
        .split(',')
        .map(|k| Secret::new(k.trim().to_owned()))
        .collect();
    Vault::new(&keys).map_err(|e| bad(e.to_string()))?;
    Ok(keys)
}

#[cfg(test)]
mod tests;
