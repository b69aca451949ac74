use super::*;
use std::collections::HashMap;
use std::io::Write;

fn env(pairs: &[(&str, &str)]) -> HashMap<String, String> {
    let mut m: HashMap<String, String> = pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    m.entry("KEYROUTER_FERNET_KEYS".into())
        .or_insert_with(Vault::generate_key);
    m
}

fn file(text: &str) -> tempfile::NamedTempFile {
    let mut f = tempfile::NamedTempFile::new().unwrap();
    f.write_all(text.as_bytes()).unwrap();
    f
}

fn load(toml: &str, env_map: &HashMap<String, String>) -> Result<Config, ConfigError> {
    let f = file(toml);
    Config::load(Some(f.path()), env_map)
}

fn err(toml: &str, env_map: &HashMap<String, String>) -> String {
    load(toml, env_map).unwrap_err().to_string()
}

#[test]
fn defaults_are_pinned() {
    let c = load("", &env(&[])).unwrap();
    assert_eq!(c.server.listen.to_string(), "0.0.0.0:8080");
    assert_eq!(c.server.admin_listen.to_string(), "127.0.0.1:8081");
    assert_eq!(c.server.ops_listen.to_string(), "0.0.0.0:9090");
    assert_eq!(c.server.max_body_bytes, 10 * 1024 * 1024);
    assert_eq!(c.server.max_buffered_body_bytes, 256 * 1024 * 1024);
    assert_eq!(c.server.body_read_timeout, Duration::from_secs(60));
    assert_eq!(c.server.upstream_read_timeout, Duration::from_secs(300));
    let cores = std::thread::available_parallelism().map_or(1, usize::from);
    assert_eq!(c.server.workers, cores);
    assert!(
        matches!(c.store, StoreConfig::Sqlite { ref path } if path == Path::new("data/keyrouter.db"))
    );
    assert!(matches!(c.rate_limit.backend, RateLimitBackend::Local));
    assert_eq!(c.rate_limit.on_backend_error, OnBackendError::Local);
    assert!(matches!(c.client_auth, ClientAuth::None));
    assert_eq!(c.audit.retention_days, 90);
    assert!(c.admin_auth.api_key.is_none() && c.admin_auth.jwt_secret.is_none());
    let ids: Vec<_> = c.providers.iter().map(|p| p.id.as_str()).collect();
    assert_eq!(ids, ["openai", "anthropic"]);
    assert_eq!(c.default_provider().unwrap().id, "openai");
}

#[test]
fn env_overrides_file_values_at_any_depth() {
    let toml = r#"
        [server]
        listen = "127.0.0.1:1000"
        [[providers]]
        id = "openai"
        kind = "openai"
        base_url = "https://api.openai.com"
        route_prefix = "/openai"
    "#;
    let e = env(&[
        ("KEYROUTER_SERVER__LISTEN", "127.0.0.1:2000"),
        ("KEYROUTER_AUDIT__RETENTION_DAYS", "7"),
        ("KEYROUTER_PROVIDERS__0__RETRY_BUDGET", "4"),
        ("KEYROUTER_LOG__FORMAT", "pretty"),
    ]);
    let c = load(toml, &e).unwrap();
    assert_eq!(c.server.listen.to_string(), "127.0.0.1:2000");
    assert_eq!(c.audit.retention_days, 7);
    assert_eq!(c.providers[0].retry_budget, 4);
    assert_eq!(c.log.format, LogFormat::Pretty);
}

#[test]
fn a_list_entry_can_be_added_by_overrides_only_as_the_next_one() {
    let provider = |i: usize| {
        [
            ("ID", "extra"),
            ("KIND", "openai"),
            ("BASE_URL", "https://api.openai.com"),
            ("ROUTE_PREFIX", "/extra"),
        ]
        .map(|(k, v)| (format!("KEYROUTER_PROVIDERS__{i}__{k}"), v.to_string()))
    };
    // Without `[[providers]]` in the file: the first entry comes whole
    // from the environment.
    let mut e = env(&[]);
    e.extend(provider(0));
    assert_eq!(load("", &e).unwrap().providers[0].id, "extra");
    // Entries are added in the order of their indices (10 after 9, where
    // names alone would put it before 2), and `00` is entry 0.
    let mut e = env(&[]);
    for i in 0..11 {
        let index = if i == 0 {
            "00".to_string()
        } else {
            i.to_string()
        };
        for (key, value) in [
            ("ID", format!("p{i}")),
            ("KIND", "openai".to_string()),
            ("BASE_URL", "https://api.openai.com".to_string()),
            ("ROUTE_PREFIX", format!("/p{i}")),
        ] {
            e.insert(format!("KEYROUTER_PROVIDERS__{index}__{key}"), value);
        }
    }
    let ids: Vec<String> = load("", &e)
        .unwrap()
        .providers
        .into_iter()
        .map(|p| p.id)
        .collect();
    assert_eq!(ids, (0..11).map(|i| format!("p{i}")).collect::<Vec<_>>());
    // An entry past the next one is named as such.
    let msg = err("", &env(&[("KEYROUTER_PROVIDERS__2__ID", "foo")]));
    assert!(
        msg.starts_with(
            "KEYROUTER_PROVIDERS__2__ID: there is no entry 2 to set in a list of 0; \
             an override can only add the next one, entry 0"
        ),
        "{msg}"
    );
}

#[test]
fn fernet_keys_are_required_and_checked_without_echo() {
    let mut e = env(&[]);
    e.remove("KEYROUTER_FERNET_KEYS");
    assert!(err("", &e).contains("KEYROUTER_FERNET_KEYS is required"));
    let e = env(&[("KEYROUTER_FERNET_KEYS", "definitely-not-a-fernet-key")]);
    let msg = err("", &e);
    assert!(msg.contains("KEYROUTER_FERNET_KEYS entry 1"), "{msg}");
    assert!(!msg.contains("definitely-not"), "{msg}");
}

#[test]
fn short_admin_key_is_refused_without_echo() {
    let e = env(&[("KEYROUTER_ADMIN_API_KEY", "short-admin-key")]);
    let msg = err("", &e);
    assert!(
        msg.contains("KEYROUTER_ADMIN_API_KEY must be at least 32"),
        "{msg}"
    );
    assert!(!msg.contains("short-admin-key"));
}

#[test]
fn secret_from_file_variable() {
    let secret_file = file("0123456789abcdef0123456789abcdef-from-file\n");
    let path = secret_file.path().to_str().unwrap();
    let e = env(&[("KEYROUTER_ADMIN_API_KEY_FILE", path)]);
    let c = load("", &e).unwrap();
    assert_eq!(
        c.admin_auth.api_key.unwrap().expose(),
        "0123456789abcdef0123456789abcdef-from-file"
    );
    let both = env(&[
        ("KEYROUTER_ADMIN_API_KEY_FILE", path),
        (
            "KEYROUTER_ADMIN_API_KEY",
            "0123456789abcdef0123456789abcdef",
        ),
    ]);
    assert!(err("", &both).contains("set only one of KEYROUTER_ADMIN_API_KEY"));
}

/// Whitespace around a secret (a file saved with a trailing space or tab,
/// a value pasted with spaces) is not part of it: no client could send it
/// back in a header.
#[test]
fn secrets_lose_the_whitespace_around_them() {
    let key = "0123456789abcdef0123456789abcdef-padded";
    let secret_file = file(&format!(" \t{key} \t\r\n"));
    let path = secret_file.path().to_str().unwrap();
    let from_file = load("", &env(&[("KEYROUTER_ADMIN_API_KEY_FILE", path)])).unwrap();
    assert_eq!(from_file.admin_auth.api_key.unwrap().expose(), key);
    let padded = format!("  {key}\t");
    let from_var = load("", &env(&[("KEYROUTER_ADMIN_JWT_SECRET", &padded)])).unwrap();
    assert_eq!(from_var.admin_auth.jwt_secret.unwrap().expose(), key);
    // Nothing but whitespace is no secret at all: the management API stays
    // closed rather than accepting a blank key.
    let blank_file = file(" \t\n");
    let blank = env(&[
        ("KEYROUTER_ADMIN_API_KEY", "   "),
        (
            "KEYROUTER_ADMIN_JWT_SECRET_FILE",
            blank_file.path().to_str().unwrap(),
        ),
    ]);
    let c = load("", &blank).unwrap();
    assert!(c.admin_auth.api_key.is_none() && c.admin_auth.jwt_secret.is_none());
}

#[test]
fn backends_that_need_secrets_fail_closed() {
    let e = env(&[]);
    assert!(
        err("[store]\nbackend = \"mongodb\"", &e).contains("KEYROUTER_MONGODB_URI is required")
    );
    assert!(
        err("[rate_limit]\nbackend = \"redis\"", &e).contains("KEYROUTER_REDIS_URL is required")
    );
    assert!(
        err("[client_auth]\nmode = \"jwt\"", &e)
            .contains("KEYROUTER_CLIENT_JWT_SECRET is required")
    );
}

#[test]
fn provider_rules_name_the_setting() {
    let provider = |id: &str, prefix: &str, base: &str| {
        format!(
            "[[providers]]\nid = \"{id}\"\nkind = \"openai\"\nbase_url = \"{base}\"\nroute_prefix = \"{prefix}\"\n"
        )
    };
    let e = env(&[]);
    assert!(
        err(&provider("Open-AI", "/o", "https://x"), &e).contains("providers[0].id must match")
    );
    assert!(err(&provider("o", "o", "https://x"), &e).contains("providers[0].route_prefix"));
    assert!(err(&provider("o", "/v1", "https://x"), &e).contains("must not start with /v1"));
    assert!(err(&provider("o", "/o", "ftp://x"), &e).contains("providers[0].base_url"));
    assert!(err(&provider("o", "/o", "https://u:p@x"), &e).contains("providers[0].base_url"));
    let twice = format!(
        "{}{}",
        provider("o", "/o", "https://x"),
        provider("o", "/p", "https://x")
    );
    assert!(err(&twice, &e).contains("providers[1].id repeats"));
    let bad_kind = "[[providers]]\nid = \"o\"\nkind = \"nope\"\nbase_url = \"https://x\"\nroute_prefix = \"/o\"\n";
    assert!(err(bad_kind, &e).contains("providers[0].kind must be one of"));
}

#[test]
fn unknown_and_mistyped_settings_are_named() {
    let e = env(&[]);
    assert_eq!(
        err("[server]\nlisten_port = 1", &e),
        "unknown setting `server.listen_port`"
    );
    let msg = err("[server]\nmax_body_bytes = \"big\"", &e);
    assert!(msg.contains("server.max_body_bytes"), "{msg}");
    assert!(!msg.contains("big"), "{msg}");
    assert!(err("[server]\nlisten = \"nowhere\"", &e).contains("server.listen must be an address"));
    assert!(
        err("[server]\nidle_timeout = \"soon\"", &e)
            .contains("server.idle_timeout must be a duration")
    );
}

#[test]
fn proxy_threads_are_between_one_and_the_cap() {
    let c = load("[server]\nworkers = 3", &env(&[])).unwrap();
    assert_eq!(c.server.workers, 3);
    let c = load("", &env(&[("KEYROUTER_SERVER__WORKERS", "1")])).unwrap();
    assert_eq!(c.server.workers, 1);
    for bad in ["0", "1025"] {
        let msg = err(&format!("[server]\nworkers = {bad}"), &env(&[]));
        assert_eq!(msg, "server.workers must be between 1 and 1024");
    }
}

#[test]
fn the_body_memory_budget_holds_at_least_one_whole_body() {
    let e = env(&[("KEYROUTER_SERVER__BODY_READ_TIMEOUT", "2s")]);
    let c = load(
        "[server]\nmax_body_bytes = 1000\nmax_buffered_body_bytes = 1000",
        &e,
    )
    .unwrap();
    assert_eq!(c.server.max_buffered_body_bytes, 1000);
    assert_eq!(c.server.body_read_timeout, Duration::from_secs(2));
    let msg = err(
        "[server]\nmax_body_bytes = 1001\nmax_buffered_body_bytes = 1000",
        &e,
    );
    assert_eq!(
        msg,
        "server.max_buffered_body_bytes must not be below server.max_body_bytes"
    );
    let msg = err("[server]\nmax_buffered_body_bytes = 0", &e);
    assert!(
        msg.starts_with("server.max_buffered_body_bytes must be between 1 and"),
        "{msg}"
    );
}

#[test]
fn unreadable_tls_file_is_named() {
    let e = env(&[]);
    let msg = err(
        "[tls]\ncert_path = \"/nonexistent/cert.pem\"\nkey_path = \"/nonexistent/key.pem\"",
        &e,
    );
    assert!(
        msg.starts_with("tls.cert_path: /nonexistent/cert.pem cannot be read"),
        "{msg}"
    );
}

#[test]
fn masked_view_never_shows_secrets() {
    let admin = "admin-key-that-is-long-enough-0123456789";
    let fernet = Vault::generate_key();
    let e = env(&[
        ("KEYROUTER_ADMIN_API_KEY", admin),
        ("KEYROUTER_FERNET_KEYS", &fernet),
        (
            "KEYROUTER_REDIS_URL",
            "redis://:hunter2-redis-password@localhost:6379",
        ),
    ]);
    let c = load("[rate_limit]\nbackend = \"redis\"", &e).unwrap();
    let text = masked::render(&c);
    assert!(!text.contains(admin) && !text.contains(&fernet) && !text.contains("hunter2"));
    assert!(
        text.contains("KEYROUTER_ADMIN_API_KEY = \"[set]\""),
        "{text}"
    );
    assert!(text.contains("backend = \"redis\""), "{text}");
    assert!(!format!("{c:?}").contains("hunter2"));
}

#[test]
fn redis_prefix_is_checked() {
    let e = env(&[("KEYROUTER_REDIS_URL", "redis://127.0.0.1:6379")]);
    let c = load(
        "[rate_limit]\nbackend = \"redis\"\nredis_prefix = \"kr:test-1\"",
        &e,
    )
    .unwrap();
    assert_eq!(c.rate_limit.redis_prefix, "kr:test-1");
    assert_eq!(load("", &e).unwrap().rate_limit.redis_prefix, "keyrouter");
    let msg = err("[rate_limit]\nredis_prefix = \"has space\"", &e);
    assert!(msg.contains("rate_limit.redis_prefix"), "{msg}");
}

/// A value from a `KEYROUTER_*` override that is refused: the line names
/// the variable first (the file shows another value or none), never the
/// value, which may be a secret typed into the wrong variable.
#[test]
fn errors_caused_by_an_override_name_its_variable_never_its_value() {
    let pasted = "sk-pasted-into-the-wrong-variable";
    let cases = [
        ("KEYROUTER_FOO__BAR", "1", "unknown setting `foo`"),
        (
            "KEYROUTER_SERVER__MAX_BODY_BYTES",
            pasted,
            "setting `server.max_body_bytes` has a value of the wrong type",
        ),
        (
            "KEYROUTER_SERVER__WORKERS",
            "0",
            "server.workers must be between 1 and 1024",
        ),
        (
            "KEYROUTER_SERVER__LISTEN",
            pasted,
            "server.listen must be an address like 127.0.0.1:8080",
        ),
        (
            "KEYROUTER_PROVIDERS__0__BASE_URL",
            pasted,
            "providers[0].base_url must be an http(s) origin",
        ),
        (
            "KEYROUTER_SERVER__MAX_BODY_BYTES",
            "2000",
            "server.max_buffered_body_bytes must not be below server.max_body_bytes",
        ),
    ];
    let toml = "[server]\nmax_body_bytes = 1000\nmax_buffered_body_bytes = 1000\n\
        [[providers]]\nid = \"o\"\nkind = \"openai\"\nbase_url = \"https://x\"\nroute_prefix = \"/o\"\n";
    for (var, value, problem) in cases {
        let msg = err(toml, &env(&[(var, value)]));
        assert!(msg.starts_with(&format!("{var}: {problem}")), "{msg}");
        assert!(!msg.contains(pasted), "{msg}");
    }
    // A problem the file made stays the file's, whatever else the
    // environment overrides.
    let e = env(&[("KEYROUTER_SERVER__LISTEN", "127.0.0.1:1000")]);
    assert_eq!(
        err("[server]\nworkers = 0", &e),
        "server.workers must be between 1 and 1024"
    );
    let debug = format!(
        "{:?}",
        load("[server]\nsk-in-a-name = 1", &env(&[])).unwrap_err()
    );
    assert!(!debug.contains("sk-in-a-name"), "{debug}");
}

/// Two listeners on one socket cannot both start; a wildcard address takes
/// its port on every address, and port 0 is a free port each time.
#[test]
fn listeners_must_not_share_a_socket() {
    let server = |listen: &str, admin: &str, ops: &str| {
        format!(
            "[server]\nlisten = \"{listen}\"\nadmin_listen = \"{admin}\"\nops_listen = \"{ops}\""
        )
    };
    let e = env(&[]);
    let clashes = [
        (
            server("127.0.0.1:8080", "127.0.0.1:8080", "127.0.0.1:9090"),
            "server.listen and server.admin_listen",
        ),
        (
            server("0.0.0.0:8080", "127.0.0.1:8081", "127.0.0.1:8080"),
            "server.listen and server.ops_listen",
        ),
        (
            server("127.0.0.1:8080", "[::]:9090", "10.0.0.1:9090"),
            "server.admin_listen and server.ops_listen",
        ),
    ];
    for (toml, settings) in clashes {
        assert_eq!(
            err(&toml, &e),
            format!(
                "{settings} must not use the same port on the same address \
                 (0.0.0.0 or [::] takes the port on every address)"
            )
        );
    }
    for fine in [
        server("127.0.0.1:8080", "127.0.0.2:8080", "[::1]:8080"),
        server("127.0.0.1:0", "127.0.0.1:0", "127.0.0.1:0"),
    ] {
        load(&fine, &e).unwrap();
    }
    // The built-in ops port, taken by the proxy through the environment.
    let e = env(&[("KEYROUTER_SERVER__LISTEN", "127.0.0.1:9090")]);
    assert!(
        err("", &e).starts_with(
            "KEYROUTER_SERVER__LISTEN: server.listen and server.ops_listen must not use"
        ),
        "{}",
        err("", &e)
    );
}
