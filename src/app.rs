//! Wiring: builds every part from the [`Config`], starts the listeners and
//! background tasks, and owns the shutdown sequence.

use crate::admin::AdminApi;
use crate::audit::AuditQueue;
use crate::audit::queue::{self, AuditWriter};
use crate::config::{Config, ConfigError, ServerConfig, StoreConfig};
use crate::health::{self, Health};
use crate::keys::Vault;
use crate::keys::pool::KeyPool;
use crate::limits::Limiter;
use crate::metrics::{Metrics, StoreOp};
use crate::ops::OpsApi;
use crate::proxy::ProxyApi;
use crate::server::tls::{CertStore, TlsListener};
use crate::server::workers::{self, Workers};
use crate::server::{self, ServeOptions, TlsSource};
use crate::store::mongo::MongoStore;
use crate::store::sqlite::SqliteStore;
use crate::store::{Store, StoreError};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

/// A start-up failure: the process prints it as one line and exits 1.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("{setting}: cannot listen on {addr}: {kind}")]
    Bind {
        setting: &'static str,
        addr: SocketAddr,
        kind: std::io::ErrorKind,
    },
    #[error("store: {0}")]
    Store(#[from] StoreError),
    #[error(transparent)]
    Upstream(#[from] crate::proxy::upstream::UpstreamInitError),
    #[error("server.workers: cannot start the proxy threads: {0}")]
    Workers(std::io::Error),
}

/// Shared state of every listener and background task.
///
/// Nothing here is locked on a request path: the config, vault and metric
/// handles are immutable after start, the store does its own pooling, and
/// the audit queue is a channel.
pub struct App {
    pub config: Config,
    pub store: Arc<dyn Store>,
    pub vault: Vault,
    pub metrics: Metrics,
    /// Events written apart from a key change (`auth_failed`).
    pub audit: AuditQueue,
    /// Decrypted active keys per provider, read by every proxied request.
    pub pool: KeyPool,
    /// Provider-driven key state changes under way.
    pub health: Health,
    /// Per-key and per-client rate limits (local or Redis).
    pub limiter: Limiter,
    /// Set once the store answered and the keys are loaded; cleared
    /// while the store is unreachable. `/readyz` reports it.
    pub ready: AtomicBool,
    /// Set when a graceful stop begins: a request cut off from then on is
    /// the stop's doing, not its client's (see `proxy::outcome`).
    pub stopping: Arc<AtomicBool>,
}

impl App {
    /// Records a failed store operation in metrics and the log, and hands the
    /// error back.
    pub fn store_failed(&self, op: StoreOp, e: StoreError) -> StoreError {
        if matches!(e, StoreError::Unavailable(_) | StoreError::Corrupt(_)) {
            self.metrics.count_store_error(op);
            tracing::error!(op = op.as_str(), error = %e, "store operation failed");
        }
        e
    }

    /// Reloads the key pool from the store (changes made through other
    /// replicas or processes), and says whether this replica is ready: the
    /// store answered, and if it holds keys that should serve, some of them
    /// open (a replica started with the wrong Fernet keys is not ready).
    /// Cooldowns that ended are recorded as they are noticed here.
    pub async fn reload_pool(self: &Arc<Self>) -> Result<bool, StoreError> {
        let records = self
            .store
            .all_keys()
            .await
            .map_err(|e| self.store_failed(StoreOp::AllKeys, e))?;
        let loaded = self.pool.reload(&records, &self.vault);
        self.metrics
            .keys_unopened
            .set(i64::try_from(loaded.unopened).unwrap_or(i64::MAX));
        if loaded.none_opens() {
            tracing::error!(
                keys = loaded.unopened,
                "no stored key can be decrypted with KEYROUTER_FERNET_KEYS: not ready"
            );
        }
        Health::recover_cooled(self, &records);
        Ok(!loaded.none_opens())
    }

    /// Refreshes `keyrouter_keys` from the store's counts.
    pub async fn refresh_key_gauges(&self) -> Result<(), StoreError> {
        let counts = self
            .store
            .count_keys()
            .await
            .map_err(|e| self.store_failed(StoreOp::CountKeys, e))?;
        for p in &self.config.providers {
            for state in crate::keys::KeyState::ALL {
                let n = counts
                    .iter()
                    .find(|c| c.provider_id == p.id && c.state == state)
                    .map_or(0, |c| c.count);
                self.metrics
                    .keys
                    .with_label_values(&[p.id.as_str(), state.as_str()])
                    .set(n as i64);
            }
        }
        Ok(())
    }
}

/// The three bound sockets. Binding happens before [`start`] so tests can
/// bind port 0 and read the real addresses.
pub struct Listeners {
    pub proxy: TcpListener,
    pub admin: TcpListener,
    pub ops: TcpListener,
}

impl Listeners {
    pub async fn bind(cfg: &ServerConfig) -> Result<Self, InitError> {
        async fn one(setting: &'static str, addr: SocketAddr) -> Result<TcpListener, InitError> {
            TcpListener::bind(addr).await.map_err(|e| InitError::Bind {
                setting,
                addr,
                kind: e.kind(),
            })
        }
        Ok(Listeners {
            proxy: one("server.listen", cfg.listen).await?,
            admin: one("server.admin_listen", cfg.admin_listen).await?,
            ops: one("server.ops_listen", cfg.ops_listen).await?,
        })
    }
}

/// Opens the configured store backend.
pub async fn open_store(config: &Config) -> Result<Arc<dyn Store>, InitError> {
    Ok(match &config.store {
        StoreConfig::Sqlite { path } => Arc::new(SqliteStore::open(path).await?),
        StoreConfig::MongoDb { uri, database } => {
            Arc::new(MongoStore::connect(uri, database, config.audit.retention_days).await?)
        }
    })
}

/// A started gateway.
pub struct Running {
    pub admin_addr: SocketAddr,
    pub ops_addr: SocketAddr,
    pub proxy_addr: SocketAddr,
    pub app: Arc<App>,
    shutdown: CancellationToken,
    tasks: JoinSet<()>,
    proxy: Workers,
    audit_writer: AuditWriter,
    /// The ops listener outlives the others: it answers `/healthz`,
    /// `/readyz` (503 once the stop began) and `/metrics` until the drain
    /// is over.
    ops: JoinHandle<()>,
    ops_shutdown: CancellationToken,
}

/// How often background tasks refresh gauges, prune the audit log and check
/// certificate files.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(5);
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);

/// Starts every listener and background task.
pub async fn start(config: Config, listeners: Listeners) -> Result<Running, InitError> {
    let store = open_store(&config).await?;
    let vault = Vault::new(&config.fernet_keys).map_err(|e| ConfigError::Other(e.to_string()))?;
    let metrics = Metrics::new(config.providers.iter().map(|p| p.id.as_str()));
    let (audit, audit_writer) = AuditQueue::start(store.clone(), &metrics, queue::CAPACITY);
    let certs = config
        .tls
        .clone()
        .map(|files| CertStore::new(files, metrics.clone()))
        .transpose()
        .map_err(|e| ConfigError::Other(e.to_string()))?
        .map(Arc::new);
    if config.admin_auth.api_key.is_none() && config.admin_auth.jwt_secret.is_none() {
        tracing::warn!(
            "neither KEYROUTER_ADMIN_API_KEY nor KEYROUTER_ADMIN_JWT_SECRET is set: the management API refuses every request"
        );
    }

    let app = Arc::new(App {
        pool: KeyPool::new(&config.providers),
        health: Health::new(tokio::runtime::Handle::current()),
        limiter: Limiter::new(&config.rate_limit, &metrics).await,
        config,
        store,
        vault,
        metrics,
        audit,
        ready: AtomicBool::new(false),
        stopping: Arc::default(),
    });
    let ready = app.reload_pool().await.unwrap_or(false) && app.refresh_key_gauges().await.is_ok();
    app.ready.store(ready, Ordering::Relaxed);
    // One handler per proxy thread: each holds its own upstream clients.
    let proxies = ProxyApi::per_thread(&app, app.config.server.workers)?
        .into_iter()
        .map(Arc::new)
        .collect();

    let addr = |l: &TcpListener| l.local_addr().expect("bound listener has an address");
    let (admin_addr, ops_addr, proxy_addr) = (
        addr(&listeners.admin),
        addr(&listeners.ops),
        addr(&listeners.proxy),
    );
    let s = &app.config.server;
    let slots = || Arc::new(tokio::sync::Semaphore::new(s.max_connections));
    let opts = ServeOptions {
        header_read_timeout: s.header_read_timeout,
        idle_timeout: s.idle_timeout,
        shutdown_drain: s.shutdown_drain,
    };
    let shutdown = CancellationToken::new();
    let ops_shutdown = CancellationToken::new();
    let mut tasks = JoinSet::new();
    let tls_for = |listener: TlsListener| -> TlsSource { certs.clone().map(|c| (c, listener)) };
    tasks.spawn(server::serve(
        "admin",
        listeners.admin,
        tls_for(TlsListener::Admin),
        Arc::new(AdminApi::new(app.clone())),
        slots(),
        opts,
        shutdown.clone(),
    ));
    let ops = tokio::spawn(server::serve(
        "ops",
        listeners.ops,
        None,
        Arc::new(OpsApi::new(app.clone())),
        slots(),
        opts,
        ops_shutdown.clone(),
    ));
    let proxy = Workers::start(
        "proxy",
        listeners.proxy,
        proxies,
        workers::Shared {
            tls: tls_for(TlsListener::Proxy),
            slots: slots(),
            opts,
            shutdown: shutdown.clone(),
        },
    )
    .map_err(InitError::Workers)?;
    spawn_until(&mut tasks, &shutdown, refresh_pool(app.clone()));
    for p in &app.config.providers {
        if let Some(interval) = p.probe_interval {
            let probes = health::probe::run(app.clone(), p.clone(), interval);
            spawn_until(&mut tasks, &shutdown, probes);
        }
    }
    spawn_until(&mut tasks, &shutdown, maintenance(app.clone(), certs));
    let tls = app.config.tls.as_ref();
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        %proxy_addr,
        %admin_addr,
        %ops_addr,
        tls = tls.is_some(),
        admin_client_certificates = tls.is_some_and(|t| t.client_ca_path.is_some()),
        store = app.config.store.backend_name(),
        rate_limit = app.config.rate_limit.backend.name(),
        "keyrouter started"
    );
    Ok(Running {
        admin_addr,
        ops_addr,
        proxy_addr,
        app,
        shutdown,
        tasks,
        proxy,
        audit_writer,
        ops,
        ops_shutdown,
    })
}

/// Spawns a background loop that ends with `shutdown` wherever it is: a
/// store call or a probe under way is abandoned, not waited for, so a store
/// that does not answer cannot hold up a stop.
fn spawn_until(
    tasks: &mut JoinSet<()>,
    shutdown: &CancellationToken,
    work: impl Future<Output = ()> + Send + 'static,
) {
    let shutdown = shutdown.clone();
    tasks.spawn(async move {
        shutdown.run_until_cancelled(work).await;
    });
}

/// How often the key pool is reloaded from the store: changes made through
/// another replica reach this one within this interval (the contract allows
/// 5 s).
const POOL_REFRESH_INTERVAL: Duration = Duration::from_secs(2);

async fn refresh_pool(app: Arc<App>) {
    let mut tick = tokio::time::interval(POOL_REFRESH_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let ready = app.reload_pool().await.unwrap_or(false);
        app.ready.store(ready, Ordering::Relaxed);
    }
}

/// Gauges, certificate reload and audit retention, on one timer.
async fn maintenance(app: Arc<App>, certs: Option<Arc<CertStore>>) {
    let mut tick = tokio::time::interval(MAINTENANCE_INTERVAL);
    let mut last_prune: Option<tokio::time::Instant> = None;
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        #[cfg(unix)]
        let sighup = async {
            match hup.as_mut() {
                Some(h) => h.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let sighup = std::future::pending::<Option<()>>();
        tokio::select! {
            _ = sighup => {
                if let Some(c) = &certs {
                    c.reload();
                }
                continue;
            }
            _ = tick.tick() => {}
        }
        if let Some(c) = &certs {
            c.reload_if_changed();
        }
        let _ = app.refresh_key_gauges().await;
        if last_prune.is_none_or(|t| t.elapsed() >= PRUNE_INTERVAL) {
            last_prune = Some(tokio::time::Instant::now());
            let days = i64::from(app.config.audit.retention_days);
            let before = chrono::Utc::now() - chrono::Duration::days(days);
            match app.store.prune_audit(before).await {
                Ok(0) => {}
                Ok(n) => tracing::info!(pruned = n, "audit events past retention removed"),
                Err(e) => {
                    app.store_failed(StoreOp::PruneAudit, e);
                }
            }
        }
    }
}

impl Running {
    /// Graceful stop: `/readyz` turns 503, the proxy and admin listeners
    /// stop accepting, open requests get the drain time; then key state
    /// changes being written and queued audit events get the drain time
    /// again, side by side; the ops listener stops last.
    pub async fn stop(mut self) {
        // After the pool refresh (which sets readiness) is stopped.
        self.shutdown.cancel();
        self.app.ready.store(false, Ordering::Relaxed);
        self.app.stopping.store(true, Ordering::Relaxed);
        while self.tasks.join_next().await.is_some() {}
        self.proxy.join().await;
        let drain = self.app.config.server.shutdown_drain;
        tokio::join!(
            self.app.health.drain(tokio::time::Instant::now() + drain),
            self.audit_writer.drain(drain),
        );
        self.ops_shutdown.cancel();
        let _ = self.ops.await;
    }
}
