//! Connection lifecycle: idle connections close, busy ones stay, shutdown
//! lets open requests finish.

use super::*;
use crate::http::full;
use crate::server::workers::{self, Workers};
use hyper::{Request, Response};
use std::sync::atomic::{AtomicUsize, Ordering};
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
    start_with(Duration::from_secs(5), idle).await
}

async fn start_with(
    header_read: Duration,
    idle: Duration,
) -> (SocketAddr, CancellationToken, tokio::task::JoinHandle<()>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let opts = ServeOptions {
        header_read_timeout: header_read,
        idle_timeout: idle,
        shutdown_drain: Duration::from_secs(5),
    };
    let task = tokio::spawn(serve(
        "test",
        listener,
        None,
        Arc::new(Sleepy),
        Arc::new(Semaphore::new(16)),
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

/// Asserts that `took` lies in `range`.
#[track_caller]
fn assert_took(took: Duration, range: std::ops::Range<Duration>) {
    assert!(range.contains(&took), "took {took:?}, expected {range:?}");
}

#[tokio::test]
async fn idle_keep_alive_connection_is_closed() {
    let (addr, _shutdown, _task) = start(Duration::from_millis(300)).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert!(request(&mut s, "/").await.starts_with("HTTP/1.1 200"));
    // Closed by the idle timeout, not by the 5 s header read timeout.
    assert_took(
        closed_after(&mut s).await,
        Duration::from_millis(200)..Duration::from_secs(2),
    );
}

#[tokio::test]
async fn a_kept_alive_connection_waits_for_its_idle_timeout_not_the_header_read_timeout() {
    let (addr, _shutdown, _task) =
        start_with(Duration::from_millis(300), Duration::from_secs(3)).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert!(request(&mut s, "/").await.starts_with("HTTP/1.1 200"));
    // Three header read timeouts with nothing to read: still open.
    tokio::time::sleep(Duration::from_millis(900)).await;
    let answer = request(&mut s, "/").await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer:?}");
}

/// Sends `head` a few bytes at a time, one piece every 100 ms, until the
/// server closes the connection (or 5 s pass); returns how long that took
/// from the first byte.
async fn trickle_until_closed(stream: &mut TcpStream, head: &str) -> Duration {
    let start = Instant::now();
    for piece in head.as_bytes().chunks(3).cycle() {
        if stream.write_all(piece).await.is_err() {
            break;
        }
        let mut buf = [0u8; 256];
        match tokio::time::timeout(Duration::from_millis(100), stream.read(&mut buf)).await {
            Err(_) => {}
            Ok(Ok(0) | Err(_)) => break,
            Ok(Ok(n)) => panic!("answered: {:?}", String::from_utf8_lossy(&buf[..n])),
        }
        assert!(start.elapsed() < Duration::from_secs(5), "never closed");
    }
    start.elapsed()
}

/// A head that never ends: header lines keep coming.
const ENDLESS_HEAD: &str = "GET / HTTP/1.1\r\nHost: x\r\nX-Slow: aaaaaaaaaaaa\r\n";

#[tokio::test]
async fn headers_trickled_past_the_header_read_timeout_close_the_connection() {
    let header_read = Duration::from_millis(400);
    let (addr, _shutdown, _task) = start_with(header_read, Duration::from_secs(30)).await;

    // A new connection: its first request's headers are due
    // `header_read_timeout` after it opened.
    let mut s = TcpStream::connect(addr).await.unwrap();
    let took = trickle_until_closed(&mut s, ENDLESS_HEAD).await;
    assert_took(
        took,
        Duration::from_millis(300)..Duration::from_millis(1500),
    );

    // A kept-alive one: from the first byte of the next request's head,
    // however long the connection idled before it.
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert!(request(&mut s, "/").await.starts_with("HTTP/1.1 200"));
    tokio::time::sleep(Duration::from_millis(600)).await;
    let took = trickle_until_closed(&mut s, ENDLESS_HEAD).await;
    assert_took(
        took,
        Duration::from_millis(300)..Duration::from_millis(1500),
    );
}

#[tokio::test]
async fn a_head_under_way_at_shutdown_is_still_cut_off_at_its_deadline() {
    let (addr, shutdown, task) =
        start_with(Duration::from_millis(300), Duration::from_secs(30)).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\n").await.unwrap();
    // The server has read the start of the head (a graceful close now
    // waits for the rest) when the shutdown comes.
    tokio::time::sleep(Duration::from_millis(100)).await;
    shutdown.cancel();
    assert_took(
        closed_after(&mut s).await,
        Duration::ZERO..Duration::from_millis(1500),
    );
    // The drain (5 s) did not have to run out.
    tokio::time::timeout(Duration::from_secs(2), task)
        .await
        .expect("the listener waited for the late head")
        .unwrap();
}

#[tokio::test]
async fn an_h2_connection_may_wait_its_idle_timeout_for_its_first_request() {
    let (addr, _shutdown, _task) =
        start_with(Duration::from_millis(300), Duration::from_secs(3)).await;
    let stream = TcpStream::connect(addr).await.unwrap();
    let (mut send, conn) = hyper::client::conn::http2::handshake(
        hyper_util::rt::TokioExecutor::new(),
        hyper_util::rt::TokioIo::new(stream),
    )
    .await
    .unwrap();
    tokio::spawn(conn);
    tokio::time::sleep(Duration::from_millis(900)).await;
    let req = Request::get(format!("http://{addr}/"))
        .body(http_body_util::Empty::<bytes::Bytes>::new())
        .unwrap();
    let resp = send
        .send_request(req)
        .await
        .expect("the h2 connection was dropped");
    assert_eq!(resp.status(), 200);
}

/// An idle h2 connection is said goodbye to (GOAWAY and a PING); a client
/// that never answers gets `header_read_timeout` more, not the minute the
/// h2 keep-alive would give it.
#[tokio::test]
async fn an_idle_h2_client_that_ignores_the_goodbye_is_closed() {
    let (addr, _shutdown, _task) =
        start_with(Duration::from_millis(300), Duration::from_millis(600)).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    // The preface and an empty SETTINGS frame; then nothing, not even the
    // acknowledgements the server asks for.
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\0\0\0\x04\0\0\0\0\0")
        .await
        .unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 1024];
    loop {
        let read = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
            .await
            .expect("connection was not closed");
        if matches!(read, Ok(0) | Err(_)) {
            break;
        }
    }
    assert_took(
        start.elapsed(),
        Duration::from_millis(600)..Duration::from_millis(2500),
    );
}

#[tokio::test]
async fn a_connection_that_sends_nothing_is_closed_after_the_header_read_timeout() {
    let (addr, _shutdown, _task) =
        start_with(Duration::from_millis(300), Duration::from_secs(30)).await;
    let mut s = TcpStream::connect(addr).await.unwrap();
    assert_took(
        closed_after(&mut s).await,
        Duration::from_millis(200)..Duration::from_millis(1500),
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

/// Answers with the name of the thread that served the request, after the
/// delay given in the path (`/sleep/300`), or once the test opens the gate
/// (`/hold`); counts the requests that arrived.
struct WhichThread {
    arrived: AtomicUsize,
    /// One permit lets one held request through.
    gate: Arc<Semaphore>,
}

impl Handler for WhichThread {
    async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        self.arrived.fetch_add(1, Ordering::SeqCst);
        if req.uri().path() == "/hold" {
            self.gate.acquire().await.unwrap().forget();
        }
        let answer = Sleepy.handle(req, conn).await;
        let name = std::thread::current().name().unwrap_or("").to_owned();
        answer.map(|_| full(name))
    }
}

/// Proxy-style threads serving a fresh listener; the handlers are returned
/// too, so a test can see requests arrive and threads let go of them.
struct Started {
    addr: SocketAddr,
    workers: Workers,
    shutdown: CancellationToken,
    handlers: Vec<Arc<WhichThread>>,
    gate: Arc<Semaphore>,
}

impl Started {
    fn arrived(&self) -> usize {
        self.handlers
            .iter()
            .map(|h| h.arrived.load(Ordering::SeqCst))
            .sum()
    }

    /// Every thread has stopped: none holds its handler any more.
    fn all_stopped(&self) -> bool {
        self.handlers.iter().all(|h| Arc::strong_count(h) == 1)
    }
}

async fn start_workers(threads: usize, slots: usize) -> Started {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let shutdown = CancellationToken::new();
    let shared = workers::Shared {
        tls: None,
        slots: Arc::new(Semaphore::new(slots)),
        opts: ServeOptions {
            header_read_timeout: Duration::from_secs(5),
            idle_timeout: Duration::from_secs(30),
            shutdown_drain: Duration::from_secs(5),
        },
        shutdown: shutdown.clone(),
    };
    let gate = Arc::new(Semaphore::new(0));
    let handlers: Vec<_> = (0..threads)
        .map(|_| {
            Arc::new(WhichThread {
                arrived: AtomicUsize::new(0),
                gate: gate.clone(),
            })
        })
        .collect();
    let workers = Workers::start("test", listener, handlers.clone(), shared).unwrap();
    Started {
        addr,
        workers,
        shutdown,
        handlers,
        gate,
    }
}

/// Polls `done` every 10 ms for up to 5 s.
async fn eventually(what: &str, done: impl Fn() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while !done() {
        assert!(Instant::now() < deadline, "{what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// `n` connections, each with one request held at the gate; their answers
/// once the gate lets them through.
async fn held(addr: SocketAddr, n: usize) -> Vec<tokio::task::JoinHandle<String>> {
    let mut pending = Vec::with_capacity(n);
    for _ in 0..n {
        let mut s = TcpStream::connect(addr).await.unwrap();
        pending.push(tokio::spawn(async move { request(&mut s, "/hold").await }));
    }
    pending
}

/// The body of a response read by [`request`].
fn body_of(response: &str) -> &str {
    response.split("\r\n\r\n").nth(1).unwrap_or("")
}

#[tokio::test]
async fn connections_are_dealt_to_the_threads_in_turn_and_stay_there() {
    let started = start_workers(2, 64).await;
    let mut served = std::collections::HashMap::<String, usize>::new();
    let mut open = Vec::new();
    for _ in 0..6 {
        let mut s = TcpStream::connect(started.addr).await.unwrap();
        let first = request(&mut s, "/").await;
        assert!(first.starts_with("HTTP/1.1 200"), "{first}");
        *served.entry(body_of(&first).to_owned()).or_default() += 1;
        open.push((s, body_of(&first).to_owned()));
    }
    let mut counts: Vec<_> = served.into_iter().collect();
    counts.sort();
    assert_eq!(
        counts,
        [
            ("keyrouter-test-0".to_owned(), 3),
            ("keyrouter-test-1".to_owned(), 3)
        ]
    );
    // Later requests on a connection are served by the same thread.
    for (s, thread) in &mut open {
        let again = request(s, "/sleep/10").await;
        assert_eq!(body_of(&again), thread.as_str());
    }
}

#[tokio::test]
async fn connection_slots_are_shared_by_every_thread() {
    let started = start_workers(3, 2).await;
    let addr = started.addr;
    // Two connections, dealt to two different threads, take both slots
    // while their requests are held.
    let busy = held(addr, 2).await;
    eventually("both busy requests arrived", || started.arrived() == 2).await;
    // A third connection waits in the backlog, though the third thread is
    // free, ...
    let third = tokio::spawn(async move {
        let mut s = TcpStream::connect(addr).await.unwrap();
        request(&mut s, "/").await
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(
        !third.is_finished(),
        "the third connection was served while both slots were held"
    );
    assert_eq!(started.arrived(), 2);
    // ... until one of them is done and closed.
    started.gate.add_permits(2);
    for b in busy {
        assert!(b.await.unwrap().starts_with("HTTP/1.1 200"));
    }
    assert!(third.await.unwrap().starts_with("HTTP/1.1 200"));
}

#[tokio::test]
async fn shutdown_lets_every_thread_finish_its_requests_then_stops_them() {
    let mut started = start_workers(2, 64).await;
    let addr = started.addr;
    let pending = held(addr, 6).await;
    eventually("every request arrived", || started.arrived() == 6).await;
    started.shutdown.cancel();
    // No new connections while the open requests are still held ...
    eventually("the listener closed", || {
        std::net::TcpStream::connect(addr).is_err()
    })
    .await;
    assert!(pending.iter().all(|p| !p.is_finished()));
    // ... and every open request still gets its answer.
    started.gate.add_permits(6);
    for p in pending {
        assert!(p.await.unwrap().starts_with("HTTP/1.1 200"));
    }
    tokio::time::timeout(Duration::from_secs(5), started.workers.join())
        .await
        .expect("the threads stopped");
    assert!(started.all_stopped(), "a thread still holds its handler");
}

#[tokio::test]
async fn dropping_the_workers_stops_them() {
    let Started {
        addr,
        workers,
        handlers,
        shutdown: _shutdown,
        ..
    } = start_workers(2, 64).await;
    let mut idle = TcpStream::connect(addr).await.unwrap();
    assert!(request(&mut idle, "/").await.starts_with("HTTP/1.1 200"));
    drop(workers);
    // The idle connection is closed, and both threads let go of their
    // handlers.
    assert!(closed_after(&mut idle).await < Duration::from_secs(5));
    eventually("both threads stopped", || {
        handlers.iter().all(|h| Arc::strong_count(h) == 1)
    })
    .await;
    assert!(TcpStream::connect(addr).await.is_err());
}
