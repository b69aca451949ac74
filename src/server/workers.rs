//! The proxy listener is served by `server.workers` threads (one per core
//! by default), each running its own single-threaded runtime, as nginx runs
//! one worker process per core.
//!
//! Why not one work-stealing runtime: a proxied request hops between the
//! client's connection task and the task driving the pooled upstream
//! connection, several times per request. On a shared runtime the two often
//! sit on different threads, so each hop is a cross-thread wake-up, buffers
//! are freed on another thread than the one that allocated them, and a
//! thread preempted by the OS holds up work queued behind it. Here a
//! connection, its requests and the upstream connections they use stay on
//! one thread from hand-over to close: each thread has its own handler and
//! so its own upstream connection pools. The key pool, limiter and metrics
//! are shared by all threads; Redis limiter calls and key state writes run
//! on the main runtime.
//!
//! One acceptor task (on the runtime that started the workers) takes the
//! connections and hands them to the threads in turn. Threads racing to
//! accept from one socket would not spread them: the thread already running
//! wins every race against threads woken from their poll, and can end up
//! with every connection. Kernel-level spreading (`SO_REUSEPORT`) would let
//! a second process bind the same port unnoticed. A connection never moves
//! once handed over, so a few very busy long-lived connections can load
//! threads unevenly; clients that keep a pool of connections (as SDKs do)
//! even this out.

use super::{Accepted, ConnectionSlots, Connections, Handler, ServeOptions, TlsSource, accept};
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, mpsc, oneshot};
use tokio_util::sync::CancellationToken;

/// The threads serving one listener. Dropping it stops them as `shutdown`
/// does (in the background).
pub struct Workers {
    /// Fires with `shutdown`, or when this is dropped.
    stop: CancellationToken,
    /// Each closes when its thread has drained its connections and dropped
    /// its runtime (and with it every task left).
    stopped: Vec<oneshot::Receiver<()>>,
}

/// What every thread of a listener shares.
pub struct Shared {
    pub tls: TlsSource,
    pub slots: ConnectionSlots,
    pub opts: ServeOptions,
    pub shutdown: CancellationToken,
}

/// A connection on its way from the acceptor to a thread: out of the
/// acceptor's runtime, not yet in the thread's.
struct Handoff {
    stream: std::net::TcpStream,
    peer: SocketAddr,
    slot: OwnedSemaphorePermit,
}

impl Workers {
    /// Serves `listener` with one thread per handler until `shutdown`
    /// fires; then the acceptor stops and each thread drains its
    /// connections. Must be called within a Tokio runtime, which runs the
    /// acceptor.
    pub fn start<H: Handler>(
        name: &'static str,
        listener: TcpListener,
        handlers: Vec<Arc<H>>,
        shared: Shared,
    ) -> std::io::Result<Self> {
        // Built first: if a later thread cannot start, dropping this stops
        // the ones already started.
        let mut workers = Workers {
            stop: shared.shutdown.child_token(),
            stopped: Vec::with_capacity(handlers.len()),
        };
        let mut threads = Vec::with_capacity(handlers.len());
        for (i, handler) in handlers.into_iter().enumerate() {
            let runtime = Unstarted(Some(
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()?,
            ));
            let (handoff, mut incoming) = mpsc::unbounded_channel::<Handoff>();
            let (done, stopped) = oneshot::channel::<()>();
            let (tls, opts, shutdown) = (shared.tls.clone(), shared.opts, workers.stop.clone());
            std::thread::Builder::new()
                .name(format!("keyrouter-{name}-{i}"))
                .spawn(move || {
                    let runtime = runtime.take();
                    runtime.block_on(async move {
                        let connections = Connections::new(name, handler, tls, opts, shutdown);
                        // Ends when the acceptor stops (and drops its sender).
                        while let Some(Handoff { stream, peer, slot }) = incoming.recv().await {
                            match TcpStream::from_std(stream) {
                                Ok(stream) => connections.serve(Accepted { stream, peer, slot }),
                                Err(e) => {
                                    tracing::warn!(listener = name, error = %e, "cannot take over a connection");
                                }
                            }
                        }
                        connections.drain().await;
                    });
                    drop(runtime);
                    drop(done);
                })?;
            threads.push(handoff);
            workers.stopped.push(stopped);
        }
        let (slots, stop) = (shared.slots, workers.stop.clone());
        tokio::spawn(async move {
            // Round-robin: connection n goes to thread n mod threads.
            for thread in threads.iter().cycle() {
                let Some(Accepted { stream, peer, slot }) =
                    accept(name, &listener, &slots, &stop).await
                else {
                    break;
                };
                match stream.into_std() {
                    // A thread that is gone has stopped: so is everything.
                    Ok(stream) => drop(thread.send(Handoff { stream, peer, slot })),
                    Err(e) => {
                        tracing::warn!(listener = name, error = %e, "cannot hand over a connection")
                    }
                }
            }
        });
        Ok(workers)
    }

    /// Waits until every thread has stopped.
    pub async fn join(&mut self) {
        for rx in self.stopped.drain(..) {
            // Closed without a value: the thread is done.
            let _ = rx.await;
        }
    }
}

impl Drop for Workers {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// A thread's runtime until the thread takes it. If the thread cannot be
/// started, the runtime is dropped inside the async start-up, where a plain
/// drop (which waits for its blocking tasks) is not allowed: it is shut
/// down without waiting instead (it never ran anything).
struct Unstarted(Option<tokio::runtime::Runtime>);

impl Unstarted {
    fn take(mut self) -> tokio::runtime::Runtime {
        self.0.take().expect("a runtime is taken once")
    }
}

impl Drop for Unstarted {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
