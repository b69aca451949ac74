//! The audit queue: events that are not written in the same transaction as a
//! key change (`auth_failed`, and router transitions whose store write must not
//! hold up a request) wait here until the store takes them.
//!
//! A brief store outage loses nothing: the writer retries with backoff, and
//! `keyrouter_audit_pending` shows the backlog. On graceful shutdown the
//! queue is drained before the process exits (bounded by the drain time).

use super::AuditEvent;
use crate::store::Store;
use prometheus::IntGauge;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

/// Events taken in one store write.
const BATCH: usize = 256;
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct AuditQueue {
    tx: mpsc::UnboundedSender<AuditEvent>,
    pending: IntGauge,
}

/// The writer task; [`AuditWriter::drain`] flushes what is left and stops it.
pub struct AuditWriter {
    task: JoinHandle<()>,
    stop: CancellationToken,
}

impl AuditQueue {
    /// Starts the writer task on the current runtime.
    pub fn start(store: Arc<dyn Store>, pending: IntGauge) -> (AuditQueue, AuditWriter) {
        let (tx, rx) = mpsc::unbounded_channel();
        let stop = CancellationToken::new();
        let task = tokio::spawn(write_loop(store, rx, pending.clone(), stop.clone()));
        (AuditQueue { tx, pending }, AuditWriter { task, stop })
    }

    /// Queues an event; never blocks the caller.
    pub fn record(&self, event: AuditEvent) {
        self.pending.inc();
        if self.tx.send(event).is_err() {
            // Only after shutdown began: the writer is gone.
            self.pending.dec();
            tracing::error!("audit event dropped: the audit writer has stopped");
        }
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
    pending: IntGauge,
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
                    tracing::warn!(error = %e, pending = pending.get(), "audit write failed; retrying");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
        pending.sub(batch.len() as i64);
        batch.clear();
    }
}
