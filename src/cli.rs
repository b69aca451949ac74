//! The command line: `serve`, `gen-fernet-key`, `check-config`, `reencrypt`.
//!
//! Exit codes: 0 ok, 1 invalid configuration or fatal start-up error (one line
//! on stderr naming the setting), 2 usage error (clap's own).

use crate::app::{self, InitError, Listeners};
use crate::audit::Actor;
use crate::config::{Config, env::ProcessEnv, masked};
use crate::keys::{Vault, rotate};
use clap::{Parser, Subcommand};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

#[derive(Parser, Debug)]
#[command(name = "keyrouter", version, about = "LLM provider key router")]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Run the gateway.
    Serve {
        /// Config file (default: config/keyrouter.toml if present, else built-in defaults).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Print a new random Fernet key.
    GenFernetKey,
    /// Validate config and environment, print the effective config with secrets masked.
    CheckConfig {
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Re-encrypt every stored key with the primary Fernet key (offline rotation).
    Reencrypt {
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

/// Runs a parsed command line.
pub fn run(cli: Cli) -> ExitCode {
    match cli.command {
        Command::GenFernetKey => {
            println!("{}", Vault::generate_key());
            ExitCode::SUCCESS
        }
        Command::CheckConfig { config } => match Config::load(config.as_deref(), &ProcessEnv) {
            Ok(cfg) => {
                print!("{}", masked::render(&cfg));
                ExitCode::SUCCESS
            }
            Err(e) => fail(&e.into()),
        },
        Command::Serve { config } => with_runtime(config, serve),
        Command::Reencrypt { config } => with_runtime(config, reencrypt),
    }
}

fn fail(e: &InitError) -> ExitCode {
    eprintln!("keyrouter: error: {e}");
    ExitCode::from(1)
}

fn with_runtime<F, Fut>(config: Option<PathBuf>, f: F) -> ExitCode
where
    F: FnOnce(Config) -> Fut,
    Fut: Future<Output = Result<(), InitError>>,
{
    let cfg = match Config::load(config.as_deref(), &ProcessEnv) {
        Ok(c) => c,
        Err(e) => return fail(&e.into()),
    };
    crate::telemetry::init(&cfg.log);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("keyrouter: error: cannot start the async runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let outcome = runtime.block_on(f(cfg));
    // Whatever still runs was given up by the graceful stop (a store call
    // that did not answer in time): it gets a moment, not a wait as long
    // as the store's own timeouts.
    runtime.shutdown_timeout(EXIT_GRACE);
    match outcome {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => fail(&e),
    }
}

/// How long work left over after a stop may hold up the exit.
const EXIT_GRACE: Duration = Duration::from_secs(1);

async fn serve(cfg: Config) -> Result<(), InitError> {
    let listeners = Listeners::bind(&cfg.server).await?;
    let running = app::start(cfg, listeners).await?;
    shutdown_signal().await;
    tracing::info!("shutting down");
    running.stop().await;
    Ok(())
}

async fn reencrypt(cfg: Config) -> Result<(), InitError> {
    let store = app::open_store(&cfg).await?;
    let vault = Vault::new(&cfg.fernet_keys)
        .map_err(|e| crate::config::ConfigError::Other(e.to_string()))?;
    match rotate::reencrypt_all(store.as_ref(), &vault, Actor::Admin("cli".into())).await {
        Ok(n) => {
            println!("re-encrypted {n} key(s) with the primary Fernet key");
            Ok(())
        }
        Err(rotate::RotateError::Store(e)) => Err(e.into()),
        Err(e) => Err(crate::config::ConfigError::Other(e.to_string()).into()),
    }
}

/// Resolves on SIGINT or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
}
