//! The harness of the integration tests: a real gateway on loopback ports
//! (port 0 for all three listeners) with a SQLite store in a temporary
//! directory, and an HTTP client for the management API that checks every
//! answer for leaked secrets.
//!
//! ```ignore
//! let gw = TestGateway::start().await;
//! let key = gw.register_key("openai", "sk-test-material-0001").await;
//! let reply = gw.get(&format!("/keys/{}", key["id"].as_str().unwrap())).send().await;
//! ```
//!
//! Proxy tests put the gateway in front of a [`mock_upstream::MockUpstream`]
//! (plain, or HTTPS with a [`tls::TestCa`] certificate) and talk to
//! `gw.proxy`:
//!
//! ```ignore
//! let mock = MockUpstream::start().await;
//! let gw = TestGateway::builder()
//!     .providers(&format!("[[providers]]\nid = \"openai\"\nkind = \"openai\"\nbase_url = \"{}\"\nroute_prefix = \"/openai\"\n", mock.url))
//!     .toml("[server]\nmax_body_bytes = 1024")
//!     .start()
//!     .await;
//! let resp = gw.client().get(gw.proxy_url("/openai/v1/models")).send().await;
//! ```

// Each test file uses its own part of the harness.
#![allow(dead_code)]

pub mod answer;
pub mod mock_upstream;
pub mod records;
pub mod redis;
pub mod tls;

use chrono::Utc;
use jsonwebtoken::{EncodingKey, Header, encode};
use keyrouter::app::{App, Listeners, Running};
use keyrouter::audit::{Actor, AuditEvent, EventKind};
use keyrouter::config::Config;
use keyrouter::keys::{KeyId, KeyRecord, KeyState, KeyStatus, Vault};
use keyrouter::store::{AuditFilter, PageRequest};
use reqwest::Method;
use reqwest::header::HeaderMap;
use serde_json::{Value, json};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub const API_KEY: &str = "test-admin-api-key-0123456789abcdef-XYZ";
pub const JWT_SECRET: &str = "test-admin-jwt-secret-0123456789abcdef-XYZ";
/// The providers' base URLs: distinctive, so a test can prove they never
/// appear in an answer (and never contacted: `.test` does not resolve).
pub const OPENAI_BASE_URL: &str = "http://openai-upstream.test";
pub const ANTHROPIC_BASE_URL: &str = "http://anthropic-upstream.test";

/// How a test gateway is configured.
pub struct GatewayBuilder {
    api_key: Option<String>,
    jwt_secret: Option<String>,
    fernet_keys: Vec<String>,
    state_dir: Option<PathBuf>,
    extra_toml: String,
    /// `[[providers]]` entries replacing the default ones.
    providers: Option<String>,
    /// What the harness's client uses toward TLS listeners.
    client_tls: Option<rustls::ClientConfig>,
    /// More environment variables (secrets such as
    /// `KEYROUTER_CLIENT_JWT_SECRET`, `KEYROUTER_REDIS_URL`, overrides).
    extra_env: Vec<(String, String)>,
}

impl GatewayBuilder {
    /// No admin API key (the JWT secret stays unless removed too).
    pub fn without_api_key(mut self) -> Self {
        self.api_key = None;
        self
    }

    pub fn without_jwt_secret(mut self) -> Self {
        self.jwt_secret = None;
        self
    }

    /// The Fernet ring, primary first.
    pub fn fernet_keys(mut self, keys: &[&str]) -> Self {
        self.fernet_keys = keys.iter().map(|k| (*k).to_owned()).collect();
        self
    }

    /// Keeps the store in `dir` (for restarts) instead of a fresh directory.
    pub fn state_dir(mut self, dir: &Path) -> Self {
        self.state_dir = Some(dir.to_owned());
        self
    }

    /// More TOML, merged into the generated file: tables are merged key by
    /// key (so `[server]`, `[tls]` or `[sanitize]` settings join the
    /// generated ones, later values winning), any other value replaces the
    /// generated one (so `[[providers]]` here replaces the default
    /// providers, as [`GatewayBuilder::providers`] does).
    pub fn toml(mut self, extra: &str) -> Self {
        self.extra_toml.push_str(extra);
        self.extra_toml.push('\n');
        self
    }

    /// Replaces the default providers (whose base URLs do not resolve) with
    /// `entries`, the TOML of one or more `[[providers]]` tables, e.g. ones
    /// pointing at a [`mock_upstream::MockUpstream`].
    pub fn providers(mut self, entries: &str) -> Self {
        self.providers = Some(entries.to_owned());
        self
    }

    /// The TLS config the harness's client uses when the gateway's
    /// listeners speak TLS (`[tls]` set): trusted roots and, for an admin
    /// listener requiring client certificates, the client's identity.
    pub fn client_tls(mut self, config: rustls::ClientConfig) -> Self {
        self.client_tls = Some(config);
        self
    }

    /// Sets an environment variable for the gateway's configuration (the
    /// process environment is left alone). The value of a variable whose
    /// name contains `SECRET` joins the strings no answer may contain.
    pub fn env(mut self, name: &str, value: &str) -> Self {
        self.extra_env.push((name.to_owned(), value.to_owned()));
        self
    }

    pub async fn start(self) -> TestGateway {
        let temp = tempfile::tempdir().unwrap();
        let dir = self.state_dir.unwrap_or_else(|| temp.path().to_owned());
        let config_path = temp.path().join("keyrouter.toml");
        let providers = self.providers.unwrap_or_else(|| {
            format!(
                r#"
[[providers]]
id = "openai"
kind = "openai"
base_url = "{OPENAI_BASE_URL}"
route_prefix = "/openai"
default = true

[[providers]]
id = "anthropic"
kind = "anthropic"
base_url = "{ANTHROPIC_BASE_URL}"
route_prefix = "/anthropic"
"#
            )
        });
        let mut table = toml_table(&format!(
            r#"
[server]
shutdown_drain = "1s"

[store]
path = {db}
{providers}"#,
            db = toml::Value::String(dir.join("keyrouter.db").display().to_string()),
        ));
        merge_toml(&mut table, toml_table(&self.extra_toml));
        std::fs::write(&config_path, toml::to_string(&table).unwrap()).unwrap();

        let mut env = HashMap::from([(
            "KEYROUTER_FERNET_KEYS".to_owned(),
            self.fernet_keys.join(","),
        )]);
        let mut secrets = vec![];
        if let Some(k) = &self.api_key {
            env.insert("KEYROUTER_ADMIN_API_KEY".into(), k.clone());
            secrets.push(k.clone());
        }
        if let Some(s) = &self.jwt_secret {
            env.insert("KEYROUTER_ADMIN_JWT_SECRET".into(), s.clone());
            secrets.push(s.clone());
        }
        for (name, value) in &self.extra_env {
            if name.contains("SECRET") {
                secrets.push(value.clone());
            }
            env.insert(name.clone(), value.clone());
        }
        let config = Config::load(Some(&config_path), &env).unwrap();
        let bind = || tokio::net::TcpListener::bind("127.0.0.1:0");
        let listeners = Listeners {
            proxy: bind().await.unwrap(),
            admin: bind().await.unwrap(),
            ops: bind().await.unwrap(),
        };
        let scheme = if config.tls.is_some() {
            "https"
        } else {
            "http"
        };
        let running = keyrouter::app::start(config, listeners).await.unwrap();
        TestGateway {
            admin: format!("{scheme}://{}/admin/v1", running.admin_addr),
            ops: format!("http://{}", running.ops_addr),
            proxy: format!("{scheme}://{}", running.proxy_addr),
            running,
            client: http_client(None, self.client_tls.as_ref()),
            client_tls: self.client_tls,
            never_shown: Arc::new(Mutex::new(secrets)),
            _temp: temp,
        }
    }
}

/// The parsed TOML `text` (panics on invalid TOML: a broken test).
fn toml_table(text: &str) -> toml::Table {
    text.parse()
        .unwrap_or_else(|e| panic!("invalid test TOML ({e}):\n{text}"))
}

/// Merges `from` into `into`: tables key by key, other values replaced.
fn merge_toml(into: &mut toml::Table, from: toml::Table) {
    for (key, value) in from {
        match (into.get_mut(&key), value) {
            (Some(toml::Value::Table(mine)), toml::Value::Table(theirs)) => {
                merge_toml(mine, theirs)
            }
            (_, value) => {
                into.insert(key, value);
            }
        }
    }
}

/// The key's record as `app`'s store holds it now (also after the gateway
/// stopped).
pub async fn stored_key(app: &App, id: &str) -> KeyRecord {
    app.store
        .get_key(&KeyId::parse(id).unwrap())
        .await
        .unwrap()
        .unwrap_or_else(|| panic!("no key {id} in the store"))
}

/// Every audit event about `resource` in `app`'s store, oldest first.
pub async fn stored_events(app: &App, resource: &str) -> Vec<AuditEvent> {
    let filter = AuditFilter {
        resource: Some(resource.to_owned()),
        ..AuditFilter::default()
    };
    let page = PageRequest {
        limit: 200,
        cursor: None,
    };
    let mut events = app.store.list_audit(&filter, &page).await.unwrap().items;
    events.reverse();
    events
}

/// A started gateway.
pub struct TestGateway {
    pub running: Running,
    /// `http://127.0.0.1:<port>/admin/v1` (`https` when `[tls]` is set)
    pub admin: String,
    /// `http://127.0.0.1:<port>`
    pub ops: String,
    /// The public proxy: `http://127.0.0.1:<port>` (`https` when `[tls]` is
    /// set).
    pub proxy: String,
    client: reqwest::Client,
    client_tls: Option<rustls::ClientConfig>,
    /// Strings no answer may contain: admin credentials, every key material
    /// and token sent through this harness.
    never_shown: Arc<Mutex<Vec<String>>>,
    _temp: tempfile::TempDir,
}

impl TestGateway {
    pub fn builder() -> GatewayBuilder {
        GatewayBuilder {
            api_key: Some(API_KEY.to_owned()),
            jwt_secret: Some(JWT_SECRET.to_owned()),
            fernet_keys: vec![Vault::generate_key()],
            state_dir: None,
            extra_toml: String::new(),
            providers: None,
            client_tls: None,
            extra_env: Vec::new(),
        }
    }

    /// Both admin credentials configured, fresh store.
    pub async fn start() -> TestGateway {
        Self::builder().start().await
    }

    pub fn app(&self) -> &Arc<App> {
        &self.running.app
    }

    /// The proxy URL of `path_and_query` (`/openai/v1/models?x=1`).
    pub fn proxy_url(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.proxy)
    }

    /// The harness's HTTP client (plain HTTP, or the TLS config given to
    /// [`GatewayBuilder::client_tls`]), for requests to the proxy.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    pub async fn stop(self) {
        self.running.stop().await;
    }

    /// Adds a string that no answer may contain from now on.
    pub fn never_show(&self, s: &str) {
        self.never_shown.lock().unwrap().push(s.to_owned());
    }

    /// A request to `/admin/v1{path}` authenticated with the API key.
    pub fn request(&self, method: Method, path: &str) -> AdminRequest<'_> {
        AdminRequest {
            gw: self,
            method,
            url: format!("{}{path}", self.admin),
            auth: Auth::ApiKey(API_KEY.to_owned()),
            body: None,
            from: None,
        }
    }

    pub fn get(&self, path: &str) -> AdminRequest<'_> {
        self.request(Method::GET, path)
    }

    pub fn post(&self, path: &str, body: Value) -> AdminRequest<'_> {
        self.request(Method::POST, path).json(body)
    }

    pub fn patch(&self, path: &str, body: Value) -> AdminRequest<'_> {
        self.request(Method::PATCH, path).json(body)
    }

    pub fn delete(&self, path: &str) -> AdminRequest<'_> {
        self.request(Method::DELETE, path)
    }

    /// Registers `material` for `provider` and returns the key object.
    pub async fn register_key(&self, provider: &str, material: &str) -> Value {
        let reply = self
            .post(
                "/keys",
                json!({"key_material": material, "provider_id": provider}),
            )
            .send()
            .await;
        assert_eq!(reply.status, 201, "{}", reply.text);
        reply.json()
    }

    /// The ops listener's `/metrics` text.
    pub async fn metrics(&self) -> String {
        let text = self
            .client
            .get(format!("{}/metrics", self.ops))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        self.assert_nothing_secret(&text);
        text
    }

    /// The value of the series `name` whose labels include `labels`.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        series_value(&self.metrics().await, name, labels)
    }

    /// Audit events of `kind` read from the store directly (no request
    /// counted against the rate limit), waiting up to 5 s until at least
    /// `min` are there: events outside a key change are written by a queue.
    pub async fn wait_for_events(&self, kind: EventKind, min: usize) -> Vec<AuditEvent> {
        let filter = AuditFilter {
            event: Some(kind),
            ..AuditFilter::default()
        };
        let page = PageRequest {
            limit: 200,
            cursor: None,
        };
        for _ in 0..250 {
            let found = self.app().store.list_audit(&filter, &page).await.unwrap();
            if found.items.len() >= min {
                return found.items;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        panic!("fewer than {min} {} events after 5 s", kind.as_str());
    }

    /// Moves a key to `status` through the store, as the router would
    /// (provider-driven transitions are not part of the management API).
    pub async fn set_state(&self, id: &str, status: KeyStatus) {
        let store = &self.app().store;
        let mut key = store
            .get_key(&KeyId::parse(id).unwrap())
            .await
            .unwrap()
            .unwrap();
        let event = AuditEvent::new(EventKind::KeyStateChanged, Actor::Router, id)
            .transition(key.status.state(), status.state())
            .reason("test_forced");
        key.status = status;
        key.revision += 1;
        key.updated_at = event.timestamp;
        key.state_changed_at = event.timestamp;
        store.update_key(&key, &event).await.unwrap();
    }

    /// The key's record as the store holds it now (no request counted
    /// against the management API's rate limit).
    pub async fn key_record(&self, id: &str) -> KeyRecord {
        stored_key(self.app(), id).await
    }

    /// Waits until the store holds the key in `state`, polling every 20 ms
    /// for at most `within`; returns the record.
    pub async fn wait_for_key_state(
        &self,
        id: &str,
        state: KeyState,
        within: Duration,
    ) -> KeyRecord {
        let deadline = tokio::time::Instant::now() + within;
        loop {
            let key = self.key_record(id).await;
            if key.status.state() == state {
                return key;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "key {id} is {} after {within:?}, expected {}",
                key.status.state().as_str(),
                state.as_str()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Every audit event about `resource`, oldest first, read from the store
    /// directly.
    pub async fn events_for(&self, resource: &str) -> Vec<AuditEvent> {
        stored_events(self.app(), resource).await
    }

    fn assert_nothing_secret(&self, text: &str) {
        for s in self.never_shown.lock().unwrap().iter() {
            assert!(
                !text.contains(s.as_str()),
                "an answer contains a secret: {text}"
            );
        }
    }
}

/// The value of the first series `name` in the `/metrics` `text` whose
/// labels include `labels`.
pub fn series_value(text: &str, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|line| {
            let (series, value) = line.rsplit_once(' ')?;
            let (metric, label_text) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            let all_match = labels
                .iter()
                .all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            (metric == name && all_match).then(|| value.parse().unwrap())
        })
}

/// The credentials a request presents.
#[derive(Clone, Debug)]
pub enum Auth {
    None,
    ApiKey(String),
    Bearer(String),
}

/// One request to the management API, built step by step.
pub struct AdminRequest<'g> {
    gw: &'g TestGateway,
    method: Method,
    url: String,
    auth: Auth,
    body: Option<String>,
    from: Option<IpAddr>,
}

impl AdminRequest<'_> {
    pub fn auth(mut self, auth: Auth) -> Self {
        if let Auth::ApiKey(s) | Auth::Bearer(s) = &auth {
            self.gw.never_show(s);
        }
        self.auth = auth;
        self
    }

    pub fn no_auth(self) -> Self {
        self.auth(Auth::None)
    }

    pub fn bearer(self, token: &str) -> Self {
        self.auth(Auth::Bearer(token.to_owned()))
    }

    /// A JSON body; a `key_material` in it joins the never-shown strings.
    pub fn json(mut self, body: Value) -> Self {
        if let Some(m) = body.get("key_material").and_then(Value::as_str) {
            self.gw.never_show(m);
        }
        self.body = Some(body.to_string());
        self
    }

    /// A raw body, sent as is.
    pub fn raw(mut self, body: impl Into<String>) -> Self {
        self.body = Some(body.into());
        self
    }

    /// Sends from another loopback address (each address has its own
    /// rate-limit window).
    pub fn from(mut self, addr: IpAddr) -> Self {
        self.from = Some(addr);
        self
    }

    pub async fn send(self) -> Reply {
        let client = match self.from {
            Some(addr) => http_client(Some(addr), self.gw.client_tls.as_ref()),
            None => self.gw.client.clone(),
        };
        let mut req = client.request(self.method, &self.url);
        req = match &self.auth {
            Auth::None => req,
            Auth::ApiKey(k) => req.header("x-api-key", k),
            Auth::Bearer(t) => req.bearer_auth(t),
        };
        if let Some(body) = self.body {
            req = req.header("content-type", "application/json").body(body);
        }
        let resp = req.send().await.unwrap();
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let text = resp.text().await.unwrap();
        self.gw.assert_nothing_secret(&text);
        Reply {
            status,
            headers,
            text,
        }
    }
}

/// An answer of the management API.
#[derive(Debug)]
pub struct Reply {
    pub status: u16,
    pub headers: HeaderMap,
    pub text: String,
}

impl Reply {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.get(name).and_then(|v| v.to_str().ok())
    }

    /// Asserts a gateway error of `status` and `kind` whose `request_id`
    /// matches `x-request-id`; returns its message.
    pub fn error(&self, status: u16, kind: &str) -> String {
        assert_eq!(self.status, status, "{}", self.text);
        let v = self.json();
        assert_eq!(v["error"]["type"], kind, "{}", self.text);
        assert_eq!(
            v["error"]["request_id"].as_str(),
            self.header("x-request-id"),
            "{}",
            self.text
        );
        v["error"]["message"].as_str().unwrap().to_owned()
    }
}

/// An HTTP client, optionally bound to a local address, using `tls` toward
/// TLS listeners. reqwest is built without a default TLS crypto provider,
/// and refuses to build a client until one is installed, even for plain
/// HTTP.
fn http_client(local: Option<IpAddr>, tls: Option<&rustls::ClientConfig>) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut builder = reqwest::Client::builder().local_address(local);
    if let Some(tls) = tls {
        builder = builder.use_preconfigured_tls(tls.clone());
    }
    builder.build().unwrap()
}

/// An HS256 token signed with `secret`.
pub fn sign_jwt(secret: &str, claims: &Value) -> String {
    encode(
        &Header::default(),
        claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A token for `sub` with `scope`, valid for ten minutes, signed with the
/// test JWT secret.
pub fn token(sub: &str, scope: &str) -> String {
    sign_jwt(
        JWT_SECRET,
        &json!({"sub": sub, "scope": scope, "exp": Utc::now().timestamp() + 600}),
    )
}

/// Sends `head` (a request head and the start of its body) to `addr`, then
/// one more body byte every 20 ms: a body that keeps moving but would take
/// 20 s. Reads until the gateway closes the connection and returns what it
/// answered and how long that took; panics if the connection stays open
/// for 5 s.
pub async fn trickle_body(addr: SocketAddr, head: &str) -> (Vec<u8>, Duration) {
    let conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut read, mut write) = conn.into_split();
    write.write_all(head.as_bytes()).await.unwrap();
    let trickle = tokio::spawn(async move {
        while write.write_all(b" ").await.is_ok() {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let started = Instant::now();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), read.read_to_end(&mut answer))
        .await
        .expect("the connection stayed open while the body trickled")
        .unwrap();
    trickle.abort();
    (answer, started.elapsed())
}
