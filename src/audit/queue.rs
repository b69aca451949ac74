//! The audit queue: events that are not written in the same transaction as a
//! key change (`auth_failed`, and router transitions whose store write must not
//! hold up a request) wait here until the store takes them.
//!
//! A brief store outage loses nothing: the writer retries with backoff, and
//! `keyrouter_audit_pending` shows the backlog. On graceful shutdown the
//! queue is drained before the process exits (bounded by the drain time).
//!
//! The queue is bounded: a flood of failed management logins (from many
//! addresses, so the per-address rate limit does not stop it) during a long
//! store outage must not grow memory without limit. Once [`CAPACITY`]
//! events wait, new `auth_failed` events are dropped, newest first, and
//! counted in `keyrouter_audit_dropped_total`; one warning marks the start
//! of each such burst and one line its end. Every other event (a key change
//! the contract requires to be durable) is always queued: those are few,
//! bounded by what operators and the router do, and never shed.

use super::{AuditEvent, EventKind};
use crate::metrics::{Metrics, StoreOp};
use crate::store::Store;
use prometheus::{IntCounter, IntGauge};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Events waiting for the store beyond which `auth_failed` events are
/// dropped: a few MiB at most (an event is a few hundred bytes), far more
/// than a healthy store ever lets wait.
pub const CAPACITY: usize = 10_000;
/// Events taken in one store write.
const BATCH: usize = 256;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct AuditQueue {
    tx: mpsc::UnboundedSender<AuditEvent>,
    bound: Arc<Bound>,
}

/// What the senders and the writer share to keep the queue bounded.
struct Bound {
    capacity: usize,
    /// Events accepted and not yet written (the writer's batch included).
    /// `keyrouter_audit_pending` cannot serve: it also counts router
    /// transitions written outside this queue.
    queued: AtomicUsize,
    pending: IntGauge,
    dropped: IntCounter,
    /// `keyrouter_store_errors_total{op="append_audit"}`: each failed write
    /// (retried until it succeeds).
    write_errors: IntCounter,
    /// Set by the first drop of a burst (which logs), cleared by the next
    /// `auth_failed` event accepted (which logs the burst's count).
    shedding: AtomicBool,
    dropped_in_burst: AtomicU64,
}

/// The writer task; [`AuditWriter::drain`] flushes what is left and stops it.
pub struct AuditWriter {
    task: JoinHandle<()>,
    stop: CancellationToken,
}

impl AuditQueue {
    /// Starts the writer task on the current runtime; `capacity` is
    /// [`CAPACITY`] outside tests.
    pub fn start(
        store: Arc<dyn Store>,
        metrics: &Metrics,
        capacity: usize,
    ) -> (AuditQueue, AuditWriter) {
        let (tx, rx) = mpsc::unbounded_channel();
        let bound = Arc::new(Bound {
            capacity,
            queued: AtomicUsize::new(0),
            pending: metrics.audit_pending.clone(),
            dropped: metrics.audit_dropped.clone(),
            write_errors: metrics.store_errors_of(StoreOp::AppendAudit),
            shedding: AtomicBool::new(false),
            dropped_in_burst: AtomicU64::new(0),
        });
        let stop = CancellationToken::new();
        let task = tokio::spawn(write_loop(store, rx, bound.clone(), stop.clone()));
        (AuditQueue { tx, bound }, AuditWriter { task, stop })
    }

    /// Queues an event; never blocks the caller. An `auth_failed` event
    /// finding the queue full is dropped.
    pub fn record(&self, event: AuditEvent) {
        let b = &*self.bound;
        let sheddable = event.event == EventKind::AuthFailed;
        let before = b.queued.fetch_add(1, Ordering::Relaxed);
        if sheddable {
            if before >= b.capacity {
                b.queued.fetch_sub(1, Ordering::Relaxed);
                b.shed();
                return;
            }
            b.end_burst();
        }
        b.pending.inc();
        if self.tx.send(event).is_err() {
            // Only after shutdown began: the writer is gone.
            b.queued.fetch_sub(1, Ordering::Relaxed);
            b.pending.dec();
            tracing::error!("audit event dropped: the audit writer has stopped");
        }
    }
}

impl Bound {
    fn shed(&self) {
        self.dropped.inc();
        self.dropped_in_burst.fetch_add(1, Ordering::Relaxed);
        if !self.shedding.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                capacity = self.capacity,
                "audit queue full: new auth_failed events are dropped until the store catches up"
            );
        }
    }

    fn end_burst(&self) {
        if self.shedding.load(Ordering::Relaxed) && self.shedding.swap(false, Ordering::Relaxed) {
            let dropped = self.dropped_in_burst.swap(0, Ordering::Relaxed);
            tracing::info!(dropped, "audit queue accepts auth_failed events again");
        }
    }

    /// `n` queued events reached the store.
    fn written(&self, n: usize) {
        self.queued.fetch_sub(n, Ordering::Relaxed);
        self.pending.sub(n as i64);
    }
}

impl AuditWriter {
    /// Closes the queue (later events are refused and logged) and waits until
    /// every queued event is written, or `deadline` passes.
    pub async fn drain(self, deadline: Duration) {
        self.stop.cancel();
        if tokio::time::timeout(deadline, self.task).await.is_err() {
            tracing::error!("audit events were still pending when the drain time ran out");
        }
    }
}

async fn write_loop(
    store: Arc<dyn Store>,
    mut rx: mpsc::UnboundedReceiver<AuditEvent>,
    bound: Arc<Bound>,
    stop: CancellationToken,
) {
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        let received = tokio::select! {
            n = rx.recv_many(&mut batch, BATCH) => n,
            _ = stop.cancelled(), if !rx.is_closed() => {
                // From now on `recv_many` returns what is left, then 0.
                rx.close();
                continue;
            }
        };
        if received == 0 {
            return;
        }
        let mut backoff = MIN_BACKOFF;
        loop {
            match store.append_audit(&batch).await {
                Ok(()) => break,
                Err(e) => {
                    bound.write_errors.inc();
                    tracing::warn!(error = %e, pending = bound.pending.get(), "audit write failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        bound.written(batch.len());
        batch.clear();
    }
}
