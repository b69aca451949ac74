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
//! one thread from accept to close: each thread has its own handler and so
//! its own upstream connection pools. The key pool, limiter and metrics are
//! shared by all threads, as before.
//!
//! All threads accept from the one listening socket (each polls its own
//! handle of it), so a second process cannot bind the same port unnoticed,
//! and a thread that is busy is slower to accept than an idle one, which
//! spreads new connections toward idle threads. A connection never moves
//! once accepted: long-lived busy connections can load threads unevenly,
//! which clients with a pool of connections (as SDKs keep) even out.

use super::{ConnectionSlots, Handler, ServeOptions, TlsSource, serve};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

/// The threads serving one listener. Dropping it stops them as `shutdown`
/// does (in the background).
pub struct Workers {
    /// Fires with `shutdown`, or when this is dropped.
    stop: CancellationToken,
    /// Each closes when its thread has stopped serving and dropped its
    /// runtime (and with it every connection task left).
    stopped: Vec<oneshot::Receiver<()>>,
}

/// What every thread of a listener shares.
pub struct Shared {
    pub tls: TlsSource,
    pub slots: ConnectionSlots,
    pub opts: ServeOptions,
    pub shutdown: CancellationToken,
}

impl Workers {
    /// Serves `listener` with one thread per handler until `shutdown`
    /// fires (then each thread drains its connections as [`serve`] does).
    /// Must be called within a Tokio runtime (the listener's).
    pub fn start<H: Handler>(
        name: &'static str,
        listener: TcpListener,
        handlers: Vec<Arc<H>>,
        shared: Shared,
    ) -> std::io::Result<Self> {
        let socket = listener.into_std()?;
        // Built first: if a later thread cannot start, dropping this stops
        // the ones already started.
        let mut workers = Workers {
            stop: shared.shutdown.child_token(),
            stopped: Vec::with_capacity(handlers.len()),
        };
        for (i, handler) in handlers.into_iter().enumerate() {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            // Registered with the thread's runtime here, so that a failure
            // fails the start rather than one thread.
            let listener = {
                let _entered = runtime.enter();
                TcpListener::from_std(socket.try_clone()?)?
            };
            let (done, rx) = oneshot::channel::<()>();
            let (tls, slots, opts, shutdown) = (
                shared.tls.clone(),
                shared.slots.clone(),
                shared.opts,
                workers.stop.clone(),
            );
            std::thread::Builder::new()
                .name(format!("keyrouter-{name}-{i}"))
                .spawn(move || {
                    runtime.block_on(serve(name, listener, tls, handler, slots, opts, shutdown));
                    drop(runtime);
                    drop(done);
                })?;
            workers.stopped.push(rx);
        }
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
