//! Connection lifecycle: idle connections close, busy ones stay, shutdown
//! lets open requests finish.

use super::*;
use crate::http::full;
use hyper::{Request, Response};
use std::time::Instant;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Answers after the delay given in the path (`/sleep/300`), else at once.
struct Sleepy;

impl Handler for Sleepy {
    async fn handle(&self, req: Request<Incoming>, _conn: ConnInfo) -> Response<Body> {
        if let Some(ms) = req.uri().path().strip_prefix("/sleep/") {
            tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
        }
        Response::new(full("done"))
    }
}

async fn start(idle: Duration) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let opts = ServeOptions {
        max_connections: 16,
        header_read_timeout: Duration::from_secs(5),
        idle_timeout: idle,
        shutdown_drain: Duration::from_secs(5),
    };
    let task = tokio::spawn(serve(
        "test",
        listener,
        None,
        Arc::new(Sleepy),
        opts,
        shutdown.clone(),
    ));
    (addr, shutdown, task)
}

async fn request(stream: &mut TcpStream, path: &str) -> String {
    let req = format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n");
    stream.write_all(req.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 1024];
    let n = stream.read(&mut buf).await.unwrap();
    String::from_utf8_lossy(&buf[..n]).into_owned()
}

/// Waits for the server to close `stream`; returns how long that took.
async fn closed_after(stream: &mut TcpStream) -> Duration {
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf))
        .await
        .expect("connection was not closed")
        .unwrap_or(0);
    assert_eq!(n, 0, "expected EOF");
    start.elapsed()
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed() {
    let (addr, _shutdown, _task) = start(Duration::from_millis(300)).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert!(request(&mut s, "/").await.starts_with("HTTP/1.1 200"));
    let waited = closed_after(&mut s).await;
    // Closed by the idle timeout, not by hyper's 5 s header read timeout.
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
}

#[tokio::test]
async fn a_slow_request_is_not_idle() {
    let (addr, _shutdown, _task) = start(Duration::from_millis(200)).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    // Nothing moves on the connection for 700 ms while the handler works.
    let answer = request(&mut s, "/sleep/700").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
}

#[tokio::test]
async fn shutdown_lets_open_requests_finish_and_stops_accepting() {
    let (addr, shutdown, task) = start(Duration::from_secs(30)).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    let pending = tokio::spawn(async move { request(&mut s, "/sleep/400").await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    shutdown.cancel();
    assert!(pending.await.unwrap().starts_with("HTTP/1.1 200"));
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
    assert!(TcpStream::connect(addr).await.is_err());
}
