//! TLS termination: rustls server configs built from PEM files, TLS 1.2/1.3
//! only, ALPN `h2` and `http/1.1`, optional client certificates (mTLS) on the
//! admin listener, and reload without restart of all three files (a rotated
//! client CA is picked up like a rotated certificate).

use super::cert_info::CertInfo;
use crate::config::TlsConfig;
use crate::metrics::Metrics;
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

impl TlsError {
    /// The setting whose file is at fault (`tls.cert_path`, ...).
    pub fn setting(&self) -> &'static str {
        self.setting
    }
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
    /// The served certificate's subject and expiry, for the logs and the
    /// expiry gauge.
    pub leaf: Option<CertInfo>,
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
    let leaf = certs[0].clone();
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
        leaf: CertInfo::of(&leaf),
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
    stamp: std::sync::Mutex<Option<Stamp>>,
    /// Where the served certificate's expiry is exported.
    metrics: Metrics,
}

impl CertStore {
    /// Loads the files; the served certificate's expiry is exported now
    /// and after every reload.
    pub fn new(files: TlsConfig, metrics: Metrics) -> Result<Self, TlsError> {
        let configs = load_server_config(&files)?;
        announce(configs.leaf.as_ref(), &metrics, false);
        Ok(CertStore {
            stamp: std::sync::Mutex::new(file_stamp(&files)),
            files,
            current: ArcSwap::from_pointee(configs),
            metrics,
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

    /// Reloads the certificate, key and client CA from disk. A broken new
    /// file keeps the previous set in force and logs why.
    pub fn reload(&self) {
        match load_server_config(&self.files) {
            Ok(configs) => {
                announce(configs.leaf.as_ref(), &self.metrics, true);
                self.current.store(Arc::new(configs));
            }
            Err(e) => {
                tracing::error!(error = %e, "TLS reload failed; keeping the previous certificate and client CA")
            }
        }
    }

    /// Reloads when the modification time of the certificate, key or client
    /// CA file changed. The mutex is only touched by the reload watcher,
    /// never by handshakes.
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

/// Logs the certificate about to be in force and exports its expiry.
fn announce(leaf: Option<&CertInfo>, metrics: &Metrics, reloaded: bool) {
    match leaf {
        Some(leaf) => leaf.announce(reloaded, chrono::Utc::now()),
        None => tracing::warn!(
            "the TLS certificate's subject and expiry cannot be read; it is served all the same"
        ),
    }
    metrics.set_certificate_expiry(leaf.map(|l| l.not_after.timestamp()));
}

/// Modification times of the files a reload reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    cert: SystemTime,
    key: SystemTime,
    client_ca: Option<SystemTime>,
}

/// `None` while a configured file is missing (being replaced): no reload
/// is tried until the set is whole again.
fn file_stamp(files: &TlsConfig) -> Option<Stamp> {
    let m = |p: &Path| std::fs::metadata(p).and_then(|m| m.modified()).ok();
    Some(Stamp {
        cert: m(&files.cert_path)?,
        key: m(&files.key_path)?,
        client_ca: match &files.client_ca_path {
            Some(p) => Some(m(p)?),
            None => None,
        },
    })
}

/// The test CA of the integration tests, for the reload tests below.
#[cfg(test)]
#[path = "../../tests/common/tls.rs"]
mod test_ca;

#[cfg(test)]
mod tests {
    use super::test_ca::{Leaf, TestCa};
    use super::*;
    use std::time::Duration;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// Whether the admin listener's config in force accepts a client
    /// presenting `identity` (handshake over an in-memory pipe).
    async fn admits(certs: &CertStore, server_ca: &TestCa, identity: &Leaf) -> bool {
        let (client_io, server_io) = tokio::io::duplex(64 * 1024);
        let acceptor = tokio_rustls::TlsAcceptor::from(certs.config(TlsListener::Admin));
        let connector = tokio_rustls::TlsConnector::from(Arc::new(
            server_ca.client_config(&["http/1.1"], Some(identity)),
        ));
        let server = async {
            let mut tls = acceptor.accept(server_io).await?;
            tls.write_all(b"!").await?;
            tls.flush().await
        };
        let client = async {
            let name = rustls_pki_types::ServerName::try_from("localhost").unwrap();
            let mut tls = connector.connect(name, client_io).await?;
            tls.read_u8().await
        };
        let (server, client) = tokio::join!(server, client);
        server.is_ok() && client.is_ok()
    }

    /// Rewrites `path` with a modification time `secs` in the future, so
    /// the change is seen even on coarse-grained file systems.
    fn rewrite(path: &Path, contents: &str, secs: u64) {
        std::fs::write(path, contents).unwrap();
        let f = std::fs::File::options().write(true).open(path).unwrap();
        f.set_modified(SystemTime::now() + Duration::from_secs(secs))
            .unwrap();
    }

    #[tokio::test]
    async fn a_changed_client_ca_is_reloaded_and_a_broken_one_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let server_ca = TestCa::new("server CA");
        let (cert_path, key_path) = server_ca.leaf("gateway.test").write(dir.path());
        let (old_ca, new_ca) = (TestCa::new("old client CA"), TestCa::new("new client CA"));
        let (old_client, new_client) = (old_ca.client("old"), new_ca.client("new"));
        let ca_path = dir.path().join("clients.pem");
        std::fs::write(&ca_path, &old_ca.pem).unwrap();
        let certs = CertStore::new(
            TlsConfig {
                cert_path,
                key_path,
                client_ca_path: Some(ca_path.clone()),
            },
            Metrics::new([]),
        )
        .unwrap();
        assert!(admits(&certs, &server_ca, &old_client).await);
        assert!(!admits(&certs, &server_ca, &new_client).await);

        // Only the CA file changes: the watcher reloads it.
        rewrite(&ca_path, &new_ca.pem, 2);
        certs.reload_if_changed();
        assert!(admits(&certs, &server_ca, &new_client).await);
        assert!(!admits(&certs, &server_ca, &old_client).await);

        // A broken CA file keeps the one in force.
        rewrite(
            &ca_path,
            "-----BEGIN CERTIFICATE-----
broken
",
            4,
        );
        certs.reload_if_changed();
        assert!(admits(&certs, &server_ca, &new_client).await);

        // A reload on demand (SIGHUP) reads it too.
        std::fs::write(&ca_path, &old_ca.pem).unwrap();
        certs.reload();
        assert!(admits(&certs, &server_ca, &old_client).await);
        assert!(!admits(&certs, &server_ca, &new_client).await);
    }

    #[test]
    fn the_expiry_gauge_follows_the_certificate_in_force() {
        let dir = tempfile::tempdir().unwrap();
        let ca = TestCa::new("server CA");
        let (cert_path, key_path) = ca
            .leaf_until("gateway.test", (2031, 5, 17))
            .write(dir.path());
        let metrics = Metrics::new([]);
        let exported = || {
            let text = String::from_utf8(metrics.render()).unwrap();
            text.lines()
                .find_map(|l| l.strip_prefix("keyrouter_tls_certificate_expiry_timestamp_seconds "))
                .map(|v| v.parse::<i64>().unwrap())
        };
        assert_eq!(
            exported(),
            None,
            "not exported before a certificate is loaded"
        );
        let files = TlsConfig {
            cert_path: cert_path.clone(),
            key_path: key_path.clone(),
            client_ca_path: None,
        };
        let certs = CertStore::new(files, metrics.clone()).unwrap();
        let until = |rfc3339| {
            chrono::DateTime::parse_from_rfc3339(rfc3339)
                .unwrap()
                .timestamp()
        };
        assert_eq!(exported(), Some(until("2031-05-17T00:00:00Z")));
        let leaf = certs.current.load().leaf.clone().unwrap();
        assert_eq!(leaf.subject, "CN=gateway.test");

        // A renewed certificate moves it; a broken one leaves it.
        let renewed = ca.leaf_until("gateway.test", (2032, 1, 2));
        rewrite(&cert_path, &renewed.cert_pem, 2);
        rewrite(&key_path, &renewed.key_pem, 2);
        certs.reload_if_changed();
        assert_eq!(exported(), Some(until("2032-01-02T00:00:00Z")));
        rewrite(&cert_path, "not a certificate", 4);
        certs.reload_if_changed();
        assert_eq!(exported(), Some(until("2032-01-02T00:00:00Z")));

        // A certificate served all the same though its expiry cannot be
        // read here (a serial number longer than RFC 5280 allows): its
        // expiry is not exported, rather than exported as 0.
        let unreadable = ca.leaf_serial("gateway.test", vec![0x42; 25]);
        rewrite(&cert_path, &unreadable.cert_pem, 6);
        rewrite(&key_path, &unreadable.key_pem, 6);
        certs.reload_if_changed();
        assert!(certs.current.load().leaf.is_none());
        assert_eq!(exported(), None);
    }
}
