//! TLS on the gateway's own listeners (`[tls]`): certificates from a test
//! CA, ALPN, protocol versions, HSTS, certificate reload without restart,
//! and client certificates on the admin listener. Clients trust only the
//! test CA.

mod common;

use common::TestGateway;
use common::mock_upstream::MockUpstream;
use common::tls::{Leaf, TestCa};
use rustls_pki_types::ServerName;
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const OPENAI_KEY: &str = "sk-openai-tls-test-key-0123456789";
/// The day the gateway's certificate is valid until (midnight UTC).
const LEAF_EXPIRY: (i32, u8, u8) = (2036, 1, 1);

/// A gateway serving TLS with `leaf` (files in `dir`), in front of `mock`.
struct TlsGateway {
    gw: TestGateway,
    mock: MockUpstream,
    ca: TestCa,
    cert_path: PathBuf,
    key_path: PathBuf,
    _dir: tempfile::TempDir,
}

fn toml_path(p: &Path) -> String {
    toml::Value::String(p.display().to_string()).to_string()
}

/// Starts the gateway with a certificate for `cn`; `client_ca` turns on
/// mTLS on the admin listener, `identity` is what the harness presents.
async fn tls_gateway(cn: &str, client_ca: Option<&TestCa>, identity: Option<&Leaf>) -> TlsGateway {
    let ca = TestCa::new("keyrouter test CA");
    let dir = tempfile::tempdir().unwrap();
    let (cert_path, key_path) = ca.leaf_until(cn, LEAF_EXPIRY).write(dir.path());
    let mut tls = format!(
        "[tls]\ncert_path = {}\nkey_path = {}\n",
        toml_path(&cert_path),
        toml_path(&key_path)
    );
    if let Some(client_ca) = client_ca {
        let path = dir.path().join("clients.pem");
        std::fs::write(&path, &client_ca.pem).unwrap();
        tls.push_str(&format!("client_ca_path = {}\n", toml_path(&path)));
    }
    let mock = MockUpstream::start().await;
    let gw = TestGateway::builder()
        .providers(&format!(
            "[[providers]]\nid = \"openai\"\nkind = \"openai\"\nbase_url = \"{}\"\nroute_prefix = \"/openai\"\ndefault = true\n",
            mock.url
        ))
        .toml(&tls)
        .client_tls(ca.client_config(&["h2", "http/1.1"], identity))
        .start()
        .await;
    assert!(gw.proxy.starts_with("https://"), "{}", gw.proxy);
    gw.register_key("openai", OPENAI_KEY).await;
    TlsGateway {
        gw,
        mock,
        ca,
        cert_path,
        key_path,
        _dir: dir,
    }
}

/// A TLS handshake with `config` to `addr` as `localhost`.
async fn handshake(
    addr: std::net::SocketAddr,
    config: rustls::ClientConfig,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from("localhost").unwrap();
    tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
}

/// The DER of the certificate the server presents in a new handshake.
async fn served_cert(addr: std::net::SocketAddr, ca: &TestCa) -> Vec<u8> {
    let tls = handshake(addr, ca.client_config(&["http/1.1"], None))
        .await
        .unwrap();
    tls.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

fn client(config: rustls::ClientConfig) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .use_preconfigured_tls(config)
        .build()
        .unwrap()
}

fn chat(stream: bool) -> Value {
    json!({"model": "gpt-4o", "stream": stream, "messages": [{"role": "user", "content": "hi"}]})
}

#[tokio::test]
async fn handshake_alpn_and_hsts() {
    let t = tls_gateway("gateway.test", None, None).await;
    let addr = t.gw.running.proxy_addr;

    let h2 = handshake(addr, t.ca.client_config(&["h2"], None))
        .await
        .unwrap();
    assert_eq!(h2.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let both = handshake(addr, t.ca.client_config(&["h2", "http/1.1"], None))
        .await
        .unwrap();
    assert_eq!(both.get_ref().1.alpn_protocol(), Some(&b"h2"[..]));
    let h1 = handshake(addr, t.ca.client_config(&["http/1.1"], None))
        .await
        .unwrap();
    assert_eq!(h1.get_ref().1.alpn_protocol(), Some(&b"http/1.1"[..]));
    assert_eq!(
        h1.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_3)
    );

    // A certificate from another CA is not trusted: the test CA is what
    // makes the handshake succeed.
    let stranger = TestCa::new("some other CA");
    assert!(
        handshake(addr, stranger.client_config(&["h2"], None))
            .await
            .is_err()
    );

    for (alpn, version) in [
        (&["h2"][..], reqwest::Version::HTTP_2),
        (&["http/1.1"][..], reqwest::Version::HTTP_11),
    ] {
        let c = client(t.ca.client_config(alpn, None));
        let resp = c
            .post(t.gw.proxy_url("/openai/v1/chat/completions"))
            .json(&chat(false))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.version(), version);
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.headers()["strict-transport-security"],
            "max-age=31536000"
        );
        assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["model"], "gpt-4o");

        // Streams and gateway errors over TLS carry HSTS too.
        let resp = c
            .post(t.gw.proxy_url("/v1/chat/completions"))
            .json(&chat(true))
            .send()
            .await
            .unwrap();
        assert_eq!(
            resp.headers()["strict-transport-security"],
            "max-age=31536000"
        );
        assert!(resp.text().await.unwrap().ends_with("data: [DONE]\n\n"));
        let resp = c.get(t.gw.proxy_url("/nowhere")).send().await.unwrap();
        assert_eq!(resp.status(), 404);
        assert_eq!(
            resp.headers()["strict-transport-security"],
            "max-age=31536000"
        );
    }
    let key = t.mock.last();
    assert_eq!(
        key.headers["authorization"],
        format!("Bearer {OPENAI_KEY}").as_str()
    );

    // The admin listener speaks TLS with HSTS as well; ops stays plain HTTP.
    let reply = t.gw.get("/keys").send().await;
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(
        reply.header("strict-transport-security"),
        Some("max-age=31536000")
    );
    let ops = reqwest::get(format!("{}/healthz", t.gw.ops)).await.unwrap();
    assert_eq!(ops.status(), 200);
    assert!(ops.headers().get("strict-transport-security").is_none());
}

/// Monitoring sees when the certificate in force expires; a gateway without
/// TLS exports no such series (a zero would read as long expired).
#[tokio::test]
async fn the_certificate_expiry_is_exported() {
    const NAME: &str = "keyrouter_tls_certificate_expiry_timestamp_seconds";
    let t = tls_gateway("gateway.test", None, None).await;
    let (year, month, day) = LEAF_EXPIRY;
    let expiry = chrono::NaiveDate::from_ymd_opt(year, month.into(), day.into())
        .unwrap()
        .and_hms_opt(0, 0, 0)
        .unwrap()
        .and_utc();
    assert_eq!(
        t.gw.metric(NAME, &[]).await,
        Some(expiry.timestamp() as f64)
    );

    let plain = TestGateway::builder().start().await;
    assert!(!plain.metrics().await.contains(NAME));
}

#[tokio::test]
async fn plain_http_to_a_tls_port_gets_no_http_answer() {
    let t = tls_gateway("gateway.test", None, None).await;
    let plain = reqwest::Client::new()
        .get(format!(
            "http://{}/openai/v1/models",
            t.gw.running.proxy_addr
        ))
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(plain.is_err(), "{plain:?}");

    let mut tcp = TcpStream::connect(t.gw.running.proxy_addr).await.unwrap();
    tcp.write_all(b"GET /openai/v1/models HTTP/1.1\r\nHost: localhost\r\n\r\n")
        .await
        .unwrap();
    let answer = read_some(&mut tcp).await;
    assert!(!answer.starts_with(b"HTTP/"), "{answer:?}");
    assert!(t.mock.received().is_empty());
}

/// What the server sends back (until it closes, 64 KiB or 5 s).
async fn read_some(tcp: &mut TcpStream) -> Vec<u8> {
    let mut out = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        let mut buf = [0u8; 4096];
        while out.len() < 65536 {
            match tcp.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    out.extend_from_slice(&buf[..n]);
                    // A whole record arrived: enough to judge.
                    if out.len() >= 5
                        && out.len() >= 5 + usize::from(u16::from_be_bytes([out[3], out[4]]))
                    {
                        break;
                    }
                }
            }
        }
    })
    .await;
    out
}

/// A ClientHello without the supported_versions extension, as a TLS 1.1
/// client sends it: record version 3.1, `client_version` (0x0302 for TLS
/// 1.1), TLS 1.0/1.1 CBC suites. With `tls12_parts`, it also offers what a
/// TLS 1.2 server needs (ECDHE-GCM suites, signature_algorithms), so that
/// only the protocol version can stand in the way.
fn legacy_client_hello(client_version: u16, tls12_parts: bool) -> Vec<u8> {
    let mut body = client_version.to_be_bytes().to_vec();
    body.extend((0u8..32).map(|i| i.wrapping_mul(37)));
    body.push(0); // no session id
    let mut suites = vec![0xc013u16, 0xc014, 0xc009, 0xc00a, 0x002f, 0x0035];
    if tls12_parts {
        suites.extend_from_slice(&[0xc02b, 0xc02f, 0xcca9, 0xcca8]);
    }
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for s in suites {
        body.extend_from_slice(&s.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // null compression
    let mut ext = Vec::new();
    // server_name: localhost
    let host = b"localhost";
    ext.extend_from_slice(&[0x00, 0x00]);
    ext.extend_from_slice(&((host.len() + 5) as u16).to_be_bytes());
    ext.extend_from_slice(&((host.len() + 3) as u16).to_be_bytes());
    ext.push(0);
    ext.extend_from_slice(&(host.len() as u16).to_be_bytes());
    ext.extend_from_slice(host);
    // supported_groups: secp256r1, x25519
    ext.extend_from_slice(&[0x00, 0x0a, 0x00, 0x06, 0x00, 0x04, 0x00, 0x17, 0x00, 0x1d]);
    // ec_point_formats: uncompressed
    ext.extend_from_slice(&[0x00, 0x0b, 0x00, 0x02, 0x01, 0x00]);
    if tls12_parts {
        // signature_algorithms: ecdsa_secp256r1_sha256, rsa_pss_rsae_sha256,
        // rsa_pkcs1_sha256
        ext.extend_from_slice(&[
            0x00, 0x0d, 0x00, 0x08, 0x00, 0x06, 0x04, 0x03, 0x08, 0x04, 0x04, 0x01,
        ]);
    }
    body.extend_from_slice(&(ext.len() as u16).to_be_bytes());
    body.extend_from_slice(&ext);

    let mut handshake = vec![0x01];
    handshake.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    handshake.extend_from_slice(&body);
    let mut record = vec![0x16, 0x03, 0x01];
    record.extend_from_slice(&(handshake.len() as u16).to_be_bytes());
    record.extend_from_slice(&handshake);
    record
}

#[tokio::test]
async fn tls_1_1_is_refused_and_tls_1_2_allowed() {
    let t = tls_gateway("gateway.test", None, None).await;
    let first_record = |hello: Vec<u8>, addr| async move {
        let mut tcp = TcpStream::connect(addr).await.unwrap();
        tcp.write_all(&hello).await.unwrap();
        read_some(&mut tcp).await
    };
    for addr in [t.gw.running.proxy_addr, t.gw.running.admin_addr] {
        for tls12_parts in [false, true] {
            let answer = first_record(legacy_client_hello(0x0302, tls12_parts), addr).await;
            // An alert record, or nothing at all; never a handshake record
            // (which would carry the ServerHello).
            assert!(
                answer.is_empty() || answer[0] == 0x15,
                "the server answered a TLS 1.1 hello with {answer:?}"
            );
            if tls12_parts && !answer.is_empty() {
                // alert(21), level fatal(2), protocol_version(70)
                assert_eq!(answer.get(5..7), Some(&[2u8, 70][..]), "{answer:?}");
            }
        }
        // The same hello saying TLS 1.2 gets a ServerHello: the bytes are
        // well-formed and the version is what was refused above.
        let answer = first_record(legacy_client_hello(0x0303, true), addr).await;
        assert_eq!(answer.first(), Some(&0x16), "{answer:?}");
    }

    let tls12 = rustls::ClientConfig::builder_with_provider(common::tls::provider())
        .with_protocol_versions(&[&rustls::version::TLS12])
        .unwrap()
        .with_root_certificates(t.ca.roots())
        .with_no_client_auth();
    let conn = handshake(t.gw.running.proxy_addr, tls12.clone())
        .await
        .unwrap();
    assert_eq!(
        conn.get_ref().1.protocol_version(),
        Some(rustls::ProtocolVersion::TLSv1_2)
    );
    let resp = client(tls12)
        .post(t.gw.proxy_url("/openai/v1/chat/completions"))
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

/// Rewrites `path` with `contents` and a modification time no earlier file
/// had, so the change is seen even on coarse-grained file systems.
fn rewrite(path: &Path, contents: &str, bump_secs: u64) {
    std::fs::write(path, contents).unwrap();
    let f = std::fs::File::options().write(true).open(path).unwrap();
    f.set_modified(SystemTime::now() + Duration::from_secs(bump_secs))
        .unwrap();
}

#[tokio::test]
async fn certificates_are_reloaded_without_dropping_streams() {
    let t = tls_gateway("gateway-a.test", None, None).await;
    let addr = t.gw.running.proxy_addr;
    let cert_a = std::fs::read_to_string(&t.cert_path).unwrap();
    let der_a = Leaf {
        cert_pem: cert_a,
        key_pem: String::new(),
    }
    .der();
    assert_eq!(served_cert(addr, &t.ca).await, der_a);

    // A stream that starts under certificate A and outlives the reload.
    let streaming = client(t.ca.client_config(&["h2", "http/1.1"], None));
    let mut resp = streaming
        .post(t.gw.proxy_url("/openai/v1/chat/completions"))
        .header("x-mock-hold", "1")
        .json(&chat(true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let mut text = String::new();
    while !text.contains("\n\n") {
        let chunk = resp.chunk().await.unwrap().unwrap();
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }

    let b = t.ca.leaf("gateway-b.test");
    assert_ne!(b.der(), der_a);
    rewrite(&t.key_path, &b.key_pem, 2);
    rewrite(&t.cert_path, &b.cert_pem, 2);
    let deadline = Instant::now() + Duration::from_secs(12);
    while served_cert(addr, &t.ca).await != b.der() {
        assert!(
            Instant::now() < deadline,
            "certificate B not served 12 s after the files changed"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // The admin listener reloads with the proxy.
    assert_eq!(served_cert(t.gw.running.admin_addr, &t.ca).await, b.der());

    // The stream begun under A is still open and completes.
    assert_eq!(t.mock.open_streams(), 1);
    t.mock.release();
    while let Some(chunk) = resp.chunk().await.unwrap() {
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    assert!(text.ends_with("data: [DONE]\n\n"), "{text}");
    assert!(!text.contains("PROVIDERID"));

    // A broken certificate file keeps B in force (and requests working).
    rewrite(&t.cert_path, "-----BEGIN CERTIFICATE-----\nbroken\n", 4);
    tokio::time::sleep(Duration::from_millis(5600)).await;
    assert_eq!(served_cert(addr, &t.ca).await, b.der());
    let fresh = client(t.ca.client_config(&["http/1.1"], None));
    let resp = fresh
        .post(t.gw.proxy_url("/openai/v1/chat/completions"))
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn the_admin_listener_requires_a_client_certificate_from_the_client_ca() {
    let clients = TestCa::new("keyrouter test client CA");
    let operator = clients.client("operator");
    let t = tls_gateway("gateway.test", Some(&clients), Some(&operator)).await;
    let keys_url = format!("{}/keys", t.gw.admin);

    // Without a certificate, no request completes.
    let anonymous = client(t.ca.client_config(&["h2", "http/1.1"], None))
        .get(&keys_url)
        .header("x-api-key", common::API_KEY)
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(anonymous.is_err(), "{anonymous:?}");
    // Nor with one from another CA.
    let stranger = TestCa::new("not the client CA").client("intruder");
    let intruder = client(t.ca.client_config(&["http/1.1"], Some(&stranger)))
        .get(&keys_url)
        .header("x-api-key", common::API_KEY)
        .timeout(Duration::from_secs(5))
        .send()
        .await;
    assert!(intruder.is_err(), "{intruder:?}");

    // With a certificate from the client CA, the request is served.
    for alpn in [&["h2"][..], &["http/1.1"][..]] {
        let resp = client(t.ca.client_config(alpn, Some(&operator)))
            .get(&keys_url)
            .header("x-api-key", common::API_KEY)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        let v: Value = resp.json().await.unwrap();
        assert_eq!(v["keys"].as_array().unwrap().len(), 1);
    }

    // The proxy listener asks no client certificate.
    let resp = client(t.ca.client_config(&["h2", "http/1.1"], None))
        .post(t.gw.proxy_url("/openai/v1/chat/completions"))
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

#[tokio::test]
async fn an_http2_client_leaving_mid_stream_closes_the_upstream_stream() {
    let t = tls_gateway("gateway.test", None, None).await;
    let h2 = client(t.ca.client_config(&["h2"], None));
    let mut resp = h2
        .post(t.gw.proxy_url("/openai/v1/chat/completions"))
        .header("x-mock-hold", "1")
        .json(&chat(true))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.version(), reqwest::Version::HTTP_2);
    let first = resp.chunk().await.unwrap().unwrap();
    assert!(first.starts_with(b"data: "));
    assert_eq!(t.mock.open_streams(), 1);
    // The stream is reset; the client's connection stays open.
    drop(resp);
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.mock.open_streams() > 0 || t.mock.open_connections() > 0 {
        assert!(
            Instant::now() < deadline,
            "the upstream stream is still open"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let provider = [("provider", "openai")];
    let gone = [("provider", "openai"), ("code", "499")];
    let deadline = Instant::now() + Duration::from_secs(5);
    while t.gw.metric("keyrouter_requests_total", &gone).await != Some(1.0)
        || t.gw.metric("keyrouter_inflight_requests", &provider).await != Some(0.0)
    {
        assert!(Instant::now() < deadline, "not accounted as abandoned");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The same connection serves the next request.
    let resp = h2
        .post(t.gw.proxy_url("/openai/v1/chat/completions"))
        .json(&chat(false))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}
