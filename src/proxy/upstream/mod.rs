//! The upstream side: a pool of connections per provider (HTTP/1.1, or
//! HTTP/2 where the provider offers it over TLS), and the request that goes
//! to the provider: the client's credentials and hop-by-hop headers removed,
//! the chosen key injected the way the provider kind expects it, identity
//! encoding asked for so that no compressed body can bypass sanitization.

mod pool;

use super::error::ProxyError;
use super::read_timeout::ReadTimeout;
use crate::config::{ProviderConfig, ProviderKind, ServerConfig};
use crate::server::tls::crypto_provider;
use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Request, Response, Uri};
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use pool::{Pool, Pooled};
use rustls_pki_types::CertificateDer;
use rustls_pki_types::pem::PemObject;
use std::time::Duration;

/// A provider's response body: cut off when it stalls.
pub type UpstreamBody = ReadTimeout<Pooled>;

/// How long an upstream connection is kept unused.
const IDLE_TIMEOUT: Duration = Duration::from_secs(90);
/// Idle upstream connections kept per provider and proxy thread.
const MAX_IDLE: usize = 1024;

/// A provider's HTTP client.
pub struct Upstream {
    pool: Pool,
    kind: ProviderKind,
    first_byte_timeout: Duration,
    read_timeout: Duration,
}

/// Why a client could not be built (a CA file that went bad after
/// validation).
#[derive(Debug, thiserror::Error)]
#[error("providers: {0}: upstream_ca_path holds no usable CA certificate")]
pub struct UpstreamInitError(pub String);

/// A provider's TLS client settings: the webpki roots plus its
/// `upstream_ca_path`. Built once per provider for all proxy threads: their
/// clients get clones, which share the root store and the TLS session
/// cache.
pub fn tls_config(p: &ProviderConfig) -> Result<rustls::ClientConfig, UpstreamInitError> {
    let mut roots = rustls::RootCertStore::empty();
    roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
    if let Some(ca) = &p.upstream_ca_path {
        let certs: Vec<CertificateDer> = CertificateDer::pem_file_iter(ca)
            .and_then(|it| it.collect::<Result<_, _>>())
            .map_err(|_| UpstreamInitError(p.id.clone()))?;
        let (added, _) = roots.add_parsable_certificates(certs);
        if added == 0 {
            return Err(UpstreamInitError(p.id.clone()));
        }
    }
    Ok(
        rustls::ClientConfig::builder_with_provider(crypto_provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth(),
    )
}

impl Upstream {
    pub fn new(p: &ProviderConfig, server: &ServerConfig, tls: rustls::ClientConfig) -> Self {
        let mut http = HttpConnector::new();
        http.enforce_http(false);
        http.set_nodelay(true);
        http.set_connect_timeout(Some(server.upstream_connect_timeout));
        http.set_keepalive(Some(Duration::from_secs(60)));
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .enable_http2()
            .wrap_connector(http);
        Upstream {
            pool: Pool::new(connector, &p.base_url, IDLE_TIMEOUT, MAX_IDLE),
            kind: p.kind,
            first_byte_timeout: server.upstream_first_byte_timeout,
            read_timeout: server.upstream_read_timeout,
        }
    }

    /// Sends one attempt and waits for the response headers; from then on
    /// the body is bounded by the read timeout.
    pub async fn send(
        &self,
        req: Request<Full<Bytes>>,
    ) -> Result<Response<UpstreamBody>, ProxyError> {
        match tokio::time::timeout(self.first_byte_timeout, self.pool.send(req)).await {
            Err(_) => Err(ProxyError::UpstreamTimeout),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "upstream request failed");
                Err(ProxyError::UpstreamUnreachable)
            }
            Ok(Ok(resp)) => Ok(resp.map(|body| ReadTimeout::new(body, self.read_timeout))),
        }
    }

    /// The request for the provider: the client's method and headers minus
    /// credentials and hop-by-hop headers, plus the key.
    pub fn request(
        &self,
        method: &http::Method,
        uri: Uri,
        client_headers: &HeaderMap,
        credential: &HeaderValue,
        body: Bytes,
    ) -> Request<Full<Bytes>> {
        let mut headers = HeaderMap::with_capacity(client_headers.len() + 2);
        let listed = connection_listed(client_headers);
        for (name, value) in client_headers {
            if !is_dropped(name) && !listed.iter().any(|l| l == name) {
                headers.append(name.clone(), value.clone());
            }
        }
        headers.insert(
            header::ACCEPT_ENCODING,
            HeaderValue::from_static("identity"),
        );
        let name = match self.kind {
            ProviderKind::OpenAi | ProviderKind::OpenAiCompatible => header::AUTHORIZATION,
            ProviderKind::Anthropic => HeaderName::from_static("x-api-key"),
            ProviderKind::AzureOpenAi => HeaderName::from_static("api-key"),
            ProviderKind::Gemini => HeaderName::from_static("x-goog-api-key"),
        };
        headers.insert(name, credential.clone());
        if self.kind == ProviderKind::Anthropic && !headers.contains_key("anthropic-version") {
            headers.insert(
                HeaderName::from_static("anthropic-version"),
                HeaderValue::from_static(ANTHROPIC_VERSION),
            );
        }
        let mut req = Request::new(Full::new(body));
        *req.method_mut() = method.clone();
        *req.uri_mut() = uri;
        *req.headers_mut() = headers;
        req
    }
}

/// The API version sent to Anthropic when the client names none.
const ANTHROPIC_VERSION: &str = "2023-06-01";

/// Headers never forwarded upstream: hop-by-hop (RFC 9110 section 7.6.1),
/// the client's own credentials and account selectors, and what the client
/// library sets anew (`host` from the URI, `content-length` from the body).
fn is_dropped(name: &HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection"
            | "keep-alive"
            | "proxy-connection"
            | "proxy-authenticate"
            | "proxy-authorization"
            | "te"
            | "trailer"
            | "transfer-encoding"
            | "upgrade"
            | "host"
            | "content-length"
            | "authorization"
            | "x-api-key"
            | "api-key"
            | "x-goog-api-key"
            | "cookie"
            | "accept-encoding"
            | "x-request-id"
            // A client must not pick the organisation or project a shared
            // key bills to.
            | "openai-organization"
            | "openai-project"
    )
}

/// Header names listed in `Connection` (hop-by-hop by declaration).
fn connection_listed(headers: &HeaderMap) -> Vec<HeaderName> {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
        .collect()
}
