//! Persistence: keys (sealed material only) and the append-only audit log.
//!
//! One trait, two backends: SQLite (embedded default) and MongoDB (clusters).
//! Both pass the same contract suite in `tests/store_contract.rs`.
//!
//! Every change to a key is written together with the audit event that
//! records it, so the log can never miss a change that happened nor record
//! one that did not.

pub mod cursor;
pub mod mongo;
pub mod sqlite;

use crate::audit::{AuditEvent, EventKind};
use crate::keys::{KeyId, KeyRecord, KeyState, SealedMaterial};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
pub use cursor::Cursor;

/// What can go wrong in a store. The details are for logs (they never carry
/// key material); clients only ever see the mapped gateway error.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The same material is already registered for this provider.
    #[error("duplicate key material for this provider")]
    Duplicate,
    /// The record changed since it was read; re-read and try again.
    #[error("the record changed concurrently")]
    Stale,
    #[error("no such record")]
    NotFound,
    /// The backend could not be reached or refused the operation.
    #[error("store unavailable: {0}")]
    Unavailable(String),
    /// A stored value could not be understood.
    #[error("stored data is malformed: {0}")]
    Corrupt(String),
}

/// Filters of `GET /admin/v1/keys`.
#[derive(Clone, Debug, Default)]
pub struct KeyFilter {
    pub provider_id: Option<String>,
    pub state: Option<KeyState>,
}

/// Filters of `GET /admin/v1/audit`.
#[derive(Clone, Debug, Default)]
pub struct AuditFilter {
    pub resource: Option<String>,
    pub event: Option<EventKind>,
    /// `since` and `until` are inclusive, each of the whole millisecond it
    /// names; backends apply them through [`AuditFilter::from_micros`] and
    /// [`AuditFilter::before_micros`].
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
}

impl AuditFilter {
    /// The first stored timestamp (microseconds) `since` admits: the start
    /// of its millisecond. Events are shown in milliseconds but stored in
    /// microseconds, so a bound copied from a shown timestamp must take in
    /// the whole millisecond.
    pub fn from_micros(&self) -> Option<i64> {
        self.since.map(|t| t.timestamp_millis() * MICROS_PER_MILLI)
    }

    /// The first stored timestamp (microseconds) past `until`: the end of
    /// its millisecond. `until` set to an event's shown timestamp finds
    /// that event, whose stored microseconds lie within that millisecond.
    pub fn before_micros(&self) -> Option<i64> {
        self.until
            .map(|t| (t.timestamp_millis() + 1) * MICROS_PER_MILLI)
    }
}

const MICROS_PER_MILLI: i64 = 1000;

/// One page request: at most `limit` items after `cursor`.
#[derive(Clone, Debug)]
pub struct PageRequest {
    pub limit: u32,
    pub cursor: Option<Cursor>,
}

/// One page of results; `next` is set when more items follow.
#[derive(Clone, Debug)]
pub struct Page<T> {
    pub items: Vec<T>,
    pub next: Option<Cursor>,
}

/// A re-encrypted key: its new token and its material hash under the new
/// primary Fernet key.
#[derive(Clone, Debug)]
pub struct Resealed {
    pub id: KeyId,
    pub sealed: SealedMaterial,
    pub material_hash: String,
}

/// Number of keys per (provider, state).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct StateCount {
    pub provider_id: String,
    pub state: KeyState,
    pub count: u64,
}

#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Succeeds when the backend answers; `/readyz` uses it.
    async fn ping(&self) -> Result<(), StoreError>;

    /// Inserts a new key together with its `key_registered` event.
    /// `Duplicate` when a key of the same provider carries any of
    /// `material_hashes` (one per Fernet ring key).
    async fn insert_key(
        &self,
        key: &KeyRecord,
        material_hashes: &[String],
        event: &AuditEvent,
    ) -> Result<(), StoreError>;

    async fn get_key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError>;

    /// Keys ordered by `(created_at, id)`, oldest first.
    async fn list_keys(
        &self,
        filter: &KeyFilter,
        page: &PageRequest,
    ) -> Result<Page<KeyRecord>, StoreError>;

    /// Every key, for loading the in-memory pool.
    async fn all_keys(&self) -> Result<Vec<KeyRecord>, StoreError>;

    /// Replaces the stored key with `key` together with `event`, if the
    /// stored revision is still `key.revision - 1`. `Stale` otherwise,
    /// `NotFound` when there is no such key.
    async fn update_key(&self, key: &KeyRecord, event: &AuditEvent) -> Result<(), StoreError>;

    /// Stores re-encrypted material for keys that still hold material (a key
    /// deleted meanwhile stays erased), together with the `encryption_rotated`
    /// event. Returns how many keys were updated.
    async fn reseal_keys(&self, keys: &[Resealed], event: &AuditEvent) -> Result<u64, StoreError>;

    /// Counts per provider and state, for `GET /admin/v1/providers` and the
    /// `keyrouter_keys` gauge.
    async fn count_keys(&self) -> Result<Vec<StateCount>, StoreError>;

    /// Appends events that do not go with a key change (`auth_failed`).
    /// Appending an event whose id is already stored is a no-op, so a retry
    /// after an unclear failure cannot duplicate it.
    async fn append_audit(&self, events: &[AuditEvent]) -> Result<(), StoreError>;

    /// Events ordered newest first by `(timestamp, id)`.
    async fn list_audit(
        &self,
        filter: &AuditFilter,
        page: &PageRequest,
    ) -> Result<Page<AuditEvent>, StoreError>;

    /// Deletes events older than `before`; returns how many.
    async fn prune_audit(&self, before: DateTime<Utc>) -> Result<u64, StoreError>;
}
