//! The audit queue while the store does not take events: bounded, with new
//! `auth_failed` events dropped first and key changes never, each burst of
//! drops counted and logged once; failed writes retried and counted.

#[path = "common/logs.rs"]
mod logs;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use keyrouter::audit::{Actor, AuditEvent, AuditQueue, EventKind};
use keyrouter::keys::{KeyId, KeyRecord};
use keyrouter::metrics::Metrics;
use keyrouter::metrics::StoreOp;
use keyrouter::store::{
    AuditFilter, KeyFilter, Page, PageRequest, Resealed, StateCount, Store, StoreError,
};
use logs::{Captured, capture};
use std::net::{IpAddr, Ipv4Addr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// A store whose audit writes wait while its gate is closed (a store that
/// is slow or away), then keep what they were given.
struct GatedStore {
    open: watch::Sender<bool>,
    written: Mutex<Vec<AuditEvent>>,
    /// Writes that fail (the store refusing) before they succeed again.
    failures: AtomicUsize,
}

impl GatedStore {
    fn closed() -> Arc<GatedStore> {
        Arc::new(GatedStore {
            open: watch::Sender::new(false),
            written: Mutex::new(Vec::new()),
            failures: AtomicUsize::new(0),
        })
    }

    fn set_open(&self, open: bool) {
        self.open.send_replace(open);
    }

    fn written_ids(&self) -> Vec<String> {
        self.written
            .lock()
            .unwrap()
            .iter()
            .map(|e| e.id.clone())
            .collect()
    }

    /// Waits (up to 5 s) until the store holds `n` events.
    async fn wait_for(&self, n: usize) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while self.written.lock().unwrap().len() < n {
            assert!(
                Instant::now() < deadline,
                "the queue never wrote {n} events"
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

#[async_trait]
impl Store for GatedStore {
    async fn append_audit(&self, events: &[AuditEvent]) -> Result<(), StoreError> {
        let mut open = self.open.subscribe();
        let _ = open.wait_for(|open| *open).await;
        let failing = self
            .failures
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
        if failing.is_ok() {
            return Err(StoreError::Unavailable("refused".into()));
        }
        self.written.lock().unwrap().extend_from_slice(events);
        Ok(())
    }

    async fn ping(&self) -> Result<(), StoreError> {
        unreachable!("not used by the audit queue")
    }
    async fn insert_key(
        &self,
        _: &KeyRecord,
        _: &[String],
        _: &AuditEvent,
    ) -> Result<(), StoreError> {
        unreachable!("not used by the audit queue")
    }
    async fn get_key(&self, _: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        unreachable!("not used by the audit queue")
    }
    async fn list_keys(
        &self,
        _: &KeyFilter,
        _: &PageRequest,
    ) -> Result<Page<KeyRecord>, StoreError> {
        unreachable!("not used by the audit queue")
    }
    async fn all_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        unreachable!("not used by the audit queue")
    }
    async fn update_key(&self, _: &KeyRecord, _: &AuditEvent) -> Result<(), StoreError> {
        unreachable!("not used by the audit queue")
    }
    async fn reseal_keys(&self, _: &[Resealed], _: &AuditEvent) -> Result<u64, StoreError> {
        unreachable!("not used by the audit queue")
    }
    async fn count_keys(&self) -> Result<Vec<StateCount>, StoreError> {
        unreachable!("not used by the audit queue")
    }
    async fn list_audit(
        &self,
        _: &AuditFilter,
        _: &PageRequest,
    ) -> Result<Page<AuditEvent>, StoreError> {
        unreachable!("not used by the audit queue")
    }
    async fn prune_audit(&self, _: DateTime<Utc>) -> Result<u64, StoreError> {
        unreachable!("not used by the audit queue")
    }
}

fn auth_failed(n: u8) -> AuditEvent {
    AuditEvent::auth_failed(
        "/admin/v1/keys",
        IpAddr::V4(Ipv4Addr::new(10, 0, 0, n)),
        "missing_credentials",
    )
}

fn key_revoked() -> AuditEvent {
    AuditEvent::new(
        EventKind::KeyRevoked,
        Actor::Admin("api_key".into()),
        "key_0123abcd",
    )
}

const FULL: &str = "audit queue full";
const AGAIN: &str = "accepts auth_failed events again";

#[tokio::test]
async fn a_full_queue_drops_new_auth_failed_events_and_keeps_key_changes() {
    let logs = Captured::default();
    let _guard = capture(&logs);
    let store = GatedStore::closed();
    let metrics = Metrics::default();
    let (queue, writer) = AuditQueue::start(store.clone(), &metrics, 3);

    // The store takes nothing: three events fill the queue, the two newest
    // auth_failed events are dropped, a key change still gets in.
    let failures: Vec<AuditEvent> = (1..=5).map(auth_failed).collect();
    for e in &failures {
        queue.record(e.clone());
    }
    let revoked = key_revoked();
    queue.record(revoked.clone());
    assert_eq!(metrics.audit_dropped.get(), 2);
    assert_eq!(metrics.audit_pending.get(), 4);
    assert_eq!(logs.text().matches(FULL).count(), 1, "{}", logs.text());

    // The store is back: what was queued is written, the queue takes
    // auth_failed events again, and the burst's end is logged once.
    store.set_open(true);
    store.wait_for(4).await;
    let mut expected: Vec<String> = failures[..3].iter().map(|e| e.id.clone()).collect();
    expected.push(revoked.id.clone());
    assert_eq!(
        store.written_ids(),
        expected,
        "the oldest failures and the key change, in order"
    );
    let later = auth_failed(6);
    queue.record(later.clone());
    store.wait_for(5).await;
    assert!(store.written_ids().contains(&later.id));
    assert_eq!(metrics.audit_dropped.get(), 2);
    assert_eq!(metrics.audit_pending.get(), 0);
    let text = logs.text();
    assert_eq!(text.matches(AGAIN).count(), 1, "{text}");
    assert!(text.contains("dropped=2"), "{text}");

    // A second outage is a second burst, with its own warning.
    store.set_open(false);
    for n in 7..=11 {
        queue.record(auth_failed(n));
    }
    assert_eq!(metrics.audit_dropped.get(), 4);
    assert_eq!(logs.text().matches(FULL).count(), 2, "{}", logs.text());

    store.set_open(true);
    writer.drain(Duration::from_secs(5)).await;
    assert_eq!(store.written_ids().len(), 8);
}

/// A write the store refuses is retried until it is taken, and each
/// refusal counts in `keyrouter_store_errors_total{op="append_audit"}`.
#[tokio::test]
async fn refused_writes_are_retried_and_counted() {
    let store = GatedStore::closed();
    store.failures.store(2, Ordering::Relaxed);
    store.set_open(true);
    let metrics = Metrics::default();
    let errors = metrics.store_errors_of(StoreOp::AppendAudit);
    let (queue, writer) = AuditQueue::start(store.clone(), &metrics, 3);
    let revoked = key_revoked();
    queue.record(revoked.clone());
    store.wait_for(1).await;
    assert_eq!(store.written_ids(), [revoked.id]);
    assert_eq!(errors.get(), 2);
    assert_eq!(metrics.audit_pending.get(), 0);
    writer.drain(Duration::from_secs(1)).await;
}
