//! TLS termination: rustls server configs built from PEM files, TLS 1.2/1.3
//! only, ALPN `h2` and `http/1.1`, optional client certificates (mTLS) on the
//! admin listener, and reload without restart.

use crate::config::TlsConfig;
use arc_swap::ArcSwap;
use rustls::server::WebPkiClientVerifier;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use std::path::Path;
use std::sync::Arc;
use std::time::SystemTime;

/// Why a certificate set could not be loaded; names the setting and file.
#[derive(Debug, thiserror::Error)]
#[error("{setting}: {path}: {problem}")]
pub struct TlsError {
    setting: &'static str,
    path: String,
    problem: &'static str,
}

fn tls_err(setting: &'static str, path: &Path, problem: &'static str) -> TlsError {
    TlsError {
        setting,
        path: path.display().to_string(),
        problem,
    }
}

/// The ring provider, installed explicitly so every TLS config in the process
/// (listeners and upstream clients) uses the same, known implementation.
pub fn crypto_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// Server configs for both TLS listeners, built from the same files.
pub struct ServerConfigs {
    pub proxy: Arc<rustls::ServerConfig>,
    /// Requires client certificates when `client_ca_path` is set.
    pub admin: Arc<rustls::ServerConfig>,
}

/// Reads and checks the certificate, key and optional client CA.
pub fn load_server_config(tls: &TlsConfig) -> Result<ServerConfigs, TlsError> {
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&tls.cert_path)
        .map_err(|_| tls_err("tls.cert_path", &tls.cert_path, "cannot be read as PEM"))?
        .collect::<Result<_, _>>()
        .map_err(|_| {
            tls_err(
                "tls.cert_path",
                &tls.cert_path,
                "holds a malformed certificate",
            )
        })?;
    if certs.is_empty() {
        return Err(tls_err(
            "tls.cert_path",
            &tls.cert_path,
            "holds no certificate",
        ));
    }
    let key = PrivateKeyDer::from_pem_file(&tls.key_path).map_err(|_| {
        tls_err(
            "tls.key_path",
            &tls.key_path,
            "holds no readable private key",
        )
    })?;

    let builder = || {
        rustls::ServerConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .expect("ring supports TLS 1.2 and 1.3")
    };
    let finish = |mut cfg: rustls::ServerConfig| {
        cfg.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        Arc::new(cfg)
    };
    let proxy = builder()
        .with_no_client_auth()
        .with_single_cert(certs.clone(), key.clone_key())
        .map_err(|_| {
            tls_err(
                "tls.key_path",
                &tls.key_path,
                "does not match the certificate",
            )
        })?;
    let admin = match &tls.client_ca_path {
        None => proxy.clone(),
        Some(ca_path) => {
            let mut roots = rustls::RootCertStore::empty();
            for cert in CertificateDer::pem_file_iter(ca_path)
                .map_err(|_| tls_err("tls.client_ca_path", ca_path, "cannot be read as PEM"))?
            {
                let cert = cert.map_err(|_| {
                    tls_err(
                        "tls.client_ca_path",
                        ca_path,
                        "holds a malformed certificate",
                    )
                })?;
                roots.add(cert).map_err(|_| {
                    tls_err(
                        "tls.client_ca_path",
                        ca_path,
                        "holds an unusable CA certificate",
                    )
                })?;
            }
            let verifier =
                WebPkiClientVerifier::builder_with_provider(Arc::new(roots), crypto_provider())
                    .build()
                    .map_err(|_| {
                        tls_err(
                            "tls.client_ca_path",
                            ca_path,
                            "holds no usable CA certificate",
                        )
                    })?;
            builder()
                .with_client_cert_verifier(verifier)
                .with_single_cert(certs, key)
                .map_err(|_| {
                    tls_err(
                        "tls.key_path",
                        &tls.key_path,
                        "does not match the certificate",
                    )
                })?
        }
    };
    Ok(ServerConfigs {
        proxy: finish(proxy),
        admin: finish(admin),
    })
}

/// Which listener a handshake is for: the admin listener may require
/// client certificates, the proxy never does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TlsListener {
    Proxy,
    Admin,
}

/// The certificates in force, swapped atomically on reload: handshakes in
/// progress keep the config they started with, new ones get the new one.
pub struct CertStore {
    files: TlsConfig,
    current: ArcSwap<ServerConfigs>,
    stamp: std::sync::Mutex<Option<(SystemTime, SystemTime)>>,
}

impl CertStore {
    pub fn new(files: TlsConfig) -> Result<Self, TlsError> {
        let configs = load_server_config(&files)?;
        let stamp = std::sync::Mutex::new(file_stamp(&files));
        Ok(CertStore {
            files,
            current: ArcSwap::from_pointee(configs),
            stamp,
        })
    }

    /// The config in force for new handshakes on `listener`.
    pub fn config(&self, listener: TlsListener) -> Arc<rustls::ServerConfig> {
        let current = self.current.load();
        match listener {
            TlsListener::Proxy => current.proxy.clone(),
            TlsListener::Admin => current.admin.clone(),
        }
    }

    /// Reloads from disk. A broken new file keeps the old certificate in
    /// force and logs why.
    pub fn reload(&self) {
        match load_server_config(&self.files) {
            Ok(configs) => {
                self.current.store(Arc::new(configs));
                tracing::info!("TLS certificate reloaded");
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS reload failed; keeping the previous certificate")
            }
        }
    }

    /// Reloads when the certificate or key file's modification time changed.
    /// The mutex is only touched by the reload watcher, never by handshakes.
    pub fn reload_if_changed(&self) {
        let now = file_stamp(&self.files);
        let mut last = self.stamp.lock().unwrap_or_else(|p| p.into_inner());
        if now.is_some() && now != *last {
            *last = now;
            drop(last);
            self.reload();
        }
    }
}

fn file_stamp(files: &TlsConfig) -> Option<(SystemTime, SystemTime)> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some((m(&files.cert_path)?, m(&files.key_path)?))
}
