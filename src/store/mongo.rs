//! The cluster store: MongoDB through the official driver.
//!
//! Documents are the rows of the SQLite store ([`KeyRow`], [`EventRow`]), so
//! both backends validate what they read the same way. A key document holds
//! the Fernet token, never material.
//!
//! A standalone server has no multi-document transactions, so a key change and
//! its audit event are made atomic with an outbox: the event rides in the key
//! document's `pending_audit` array, written by the same single-document
//! write. Afterwards it is copied into `audit_log` (idempotent on `_id`, the
//! event id) and pulled from the array. Whatever a crash or an outage leaves
//! behind is flushed at startup and before every read of the audit log.

use super::sqlite::{
    EventRow, KeyRow, event_position, fetch_limit, into_page, key_position, micros,
};
use super::{AuditFilter, KeyFilter, Page, PageRequest, Resealed, StateCount, Store, StoreError};
use crate::audit::AuditEvent;
use crate::keys::{KeyId, KeyRecord, KeyState};
use crate::secret::Secret;
use async_trait::async_trait;
use chrono::{DateTime, TimeDelta, Utc};
use futures_util::TryStreamExt;
use mongodb::bson::{self, Bson, Document, doc};
use mongodb::error::{Error as MongoError, ErrorKind, WriteFailure};
use mongodb::options::{ClientOptions, IndexOptions};
use mongodb::{Client, Collection, Database, IndexModel};
use serde::Deserialize;
use std::time::Duration;

/// The server's code for a unique index violation.
const DUPLICATE_KEY: i32 = 11000;

pub struct MongoStore {
    db: Database,
    keys: Collection<Document>,
    audit: Collection<Document>,
    /// How long events are kept: each one carries its `expire_at`, which a
    /// TTL index acts on. A per-document expiry (rather than an
    /// `expireAfterSeconds` on the event time) lets the retention setting
    /// change without an index conflict at startup.
    retention: TimeDelta,
}

impl MongoStore {
    /// Connects, creates the collections' indexes and flushes audit events
    /// left pending by an earlier process.
    pub async fn connect(
        uri: &Secret,
        database: &str,
        audit_retention_days: u32,
    ) -> Result<Self, StoreError> {
        // The driver's parse errors can quote the URI, which may hold a
        // password, so they are replaced rather than passed on.
        let mut options = ClientOptions::parse(uri.expose()).await.map_err(|_| {
            StoreError::Unavailable("the MongoDB URI is not a valid connection string".into())
        })?;
        options.app_name.get_or_insert_with(|| "keyrouter".into());
        let client = Client::with_options(options).map_err(failed("configure client"))?;
        let db = client.database(database);
        let store = MongoStore {
            keys: db.collection("keys"),
            audit: db.collection("audit_log"),
            db,
            retention: TimeDelta::days(audit_retention_days.into()),
        };
        store.create_indexes().await?;
        store.flush_pending().await?;
        Ok(store)
    }

    async fn create_indexes(&self) -> Result<(), StoreError> {
        let keys = [
            index(
                doc! { "id": 1 },
                "id_unique",
                IndexOptions::builder().unique(true).build(),
            ),
            // Erased keys hold a null hash and stay out of the index, so the
            // same material can be registered again.
            index(
                doc! { "provider_id": 1, "material_hash": 1 },
                "provider_material_unique",
                IndexOptions::builder()
                    .unique(true)
                    .partial_filter_expression(doc! { "material_hash": { "$type": "string" } })
                    .build(),
            ),
            index(
                doc! { "created_at": 1, "id": 1 },
                "created",
                IndexOptions::default(),
            ),
        ];
        let audit = [
            index(
                doc! { "ts": -1, "_id": -1 },
                "newest_first",
                IndexOptions::default(),
            ),
            index(
                doc! { "resource": 1, "ts": -1 },
                "by_resource",
                IndexOptions::default(),
            ),
            index(
                doc! { "expire_at": 1 },
                "expiry",
                IndexOptions::builder().expire_after(Duration::ZERO).build(),
            ),
        ];
        self.keys
            .create_indexes(keys)
            .await
            .map_err(failed("create key indexes"))?;
        self.audit
            .create_indexes(audit)
            .await
            .map_err(failed("create audit indexes"))?;
        Ok(())
    }

    /// The stored form of an event, with its expiry.
    fn event_doc(&self, event: &AuditEvent) -> Result<Document, StoreError> {
        let mut doc = encode(&EventRow::from_event(event))?;
        let expires = event
            .timestamp
            .checked_add_signed(self.retention)
            .unwrap_or(DateTime::<Utc>::MAX_UTC);
        doc.insert(
            "expire_at",
            bson::DateTime::from_millis(expires.timestamp_millis()),
        );
        Ok(doc)
    }

    /// Inserts events into `audit_log`; events already there are skipped.
    async fn insert_events(&self, events: Vec<Document>) -> Result<(), MongoError> {
        if events.is_empty() {
            return Ok(());
        }
        match self.audit.insert_many(events).ordered(false).await {
            Err(e) if !only_duplicates(&e) => Err(e),
            _ => Ok(()),
        }
    }

    /// Moves a key document's pending events into `audit_log`.
    async fn deliver(&self, key_id: &str, events: Vec<Document>) -> Result<(), MongoError> {
        let ids: Vec<Bson> = events
            .iter()
            .filter_map(|e| e.get("_id").cloned())
            .collect();
        self.insert_events(events).await?;
        self.keys
            .update_one(
                doc! { "id": key_id },
                doc! { "$pull": { "pending_audit": { "_id": { "$in": ids } } } },
            )
            .await?;
        Ok(())
    }

    /// Delivers the event of a key write that has already succeeded. A failure
    /// here must not fail the write: the event is safe in the key document
    /// and the next flush delivers it.
    async fn deliver_after_write(&self, key_id: &str, event: Document) {
        if let Err(e) = self.deliver(key_id, vec![event]).await {
            tracing::warn!(
                key = key_id,
                error = %describe(&e),
                "audit event stays pending until the next flush"
            );
        }
    }

    /// Delivers every pending event. The scan of `keys` is cheap (one small
    /// document per provider key) and usually finds nothing.
    async fn flush_pending(&self) -> Result<(), StoreError> {
        let docs: Vec<Document> = self
            .keys
            .find(doc! { "pending_audit.0": { "$exists": true } })
            .projection(doc! { "_id": 0, "id": 1, "pending_audit": 1 })
            .await
            .map_err(failed("find pending audit events"))?
            .try_collect()
            .await
            .map_err(failed("find pending audit events"))?;
        for doc in docs {
            let (Ok(id), Ok(pending)) = (doc.get_str("id"), doc.get_array("pending_audit")) else {
                return Err(StoreError::Corrupt(
                    "a key document's pending audit events are malformed".into(),
                ));
            };
            let events = pending
                .iter()
                .map(|e| e.as_document().cloned())
                .collect::<Option<Vec<_>>>()
                .ok_or_else(|| {
                    StoreError::Corrupt(format!("key {id}: malformed pending audit event"))
                })?;
            self.deliver(id, events)
                .await
                .map_err(failed("deliver pending audit events"))?;
        }
        Ok(())
    }

    /// Keys matching `filter`, oldest first, at most `limit` of them.
    async fn find_keys(
        &self,
        filter: Document,
        limit: Option<u32>,
    ) -> Result<Vec<KeyRecord>, StoreError> {
        let docs: Vec<Document> = self
            .keys
            .find(filter)
            .projection(doc! { "_id": 0, "pending_audit": 0 })
            .sort(doc! { "created_at": 1, "id": 1 })
            .limit(limit.map_or(0, i64::from)) // 0: no limit
            .await
            .map_err(failed("find keys"))?
            .try_collect()
            .await
            .map_err(failed("read keys"))?;
        docs.into_iter().map(key_from_doc).collect()
    }
}

fn index(keys: Document, name: &str, mut options: IndexOptions) -> IndexModel {
    options.name = Some(name.to_owned());
    IndexModel::builder().keys(keys).options(options).build()
}

fn encode<T: serde::Serialize>(value: &T) -> Result<Document, StoreError> {
    bson::to_document(value)
        .map_err(|_| StoreError::Unavailable("mongodb: could not encode a document".into()))
}

/// Never passes the decoder's message on: it can quote a stored value.
fn key_from_doc(doc: Document) -> Result<KeyRecord, StoreError> {
    bson::from_document::<KeyRow>(doc)
        .map_err(|_| StoreError::Corrupt("a key document is malformed".into()))?
        .into_record()
}

fn event_from_doc(doc: Document) -> Result<AuditEvent, StoreError> {
    bson::from_document::<EventRow>(doc)
        .map_err(|_| StoreError::Corrupt("an audit document is malformed".into()))?
        .into_event()
}

/// Maps a driver error to the store's terms: a unique index violation is a
/// duplicate, anything else is described without the driver's own text
/// (server messages quote the offending values).
fn failed(op: &'static str) -> impl Fn(MongoError) -> StoreError {
    move |e| {
        if is_duplicate(&e) {
            StoreError::Duplicate
        } else {
            StoreError::Unavailable(format!("mongodb {op}: {}", describe(&e)))
        }
    }
}

fn describe(e: &MongoError) -> String {
    match e.kind.as_ref() {
        ErrorKind::Command(c) => format!("server error {} ({})", c.code, c.code_name),
        ErrorKind::Write(WriteFailure::WriteError(w)) => format!("write error {}", w.code),
        ErrorKind::Write(WriteFailure::WriteConcernError(w)) => {
            format!("write concern error {}", w.code)
        }
        ErrorKind::InsertMany(_) => "insert failed".into(),
        ErrorKind::Authentication { .. } => "authentication failed".into(),
        ErrorKind::ServerSelection { .. } => "no suitable server reachable".into(),
        ErrorKind::DnsResolve { .. } => "DNS resolution failed".into(),
        ErrorKind::InvalidTlsConfig { .. } => "invalid TLS configuration".into(),
        ErrorKind::Io(io) => format!("I/O error ({:?})", io.kind()),
        _ => "driver error".into(),
    }
}

fn is_duplicate(e: &MongoError) -> bool {
    matches!(
        e.kind.as_ref(),
        ErrorKind::Write(WriteFailure::WriteError(w)) if w.code == DUPLICATE_KEY
    )
}

/// Whether an insert failed only because some documents were already there.
fn only_duplicates(e: &MongoError) -> bool {
    match e.kind.as_ref() {
        ErrorKind::InsertMany(f) => {
            f.write_concern_error.is_none()
                && f.write_errors
                    .as_ref()
                    .is_some_and(|errs| errs.iter().all(|w| w.code == DUPLICATE_KEY))
        }
        _ => is_duplicate(e),
    }
}

/// Continues strictly after `(at, id)` in the given direction (`$gt` for
/// oldest first, `$lt` for newest first).
fn after(time_field: &str, id_field: &str, dir: &str, at: i64, id: &str) -> Bson {
    bson::bson!([
        { time_field: { dir: at } },
        { time_field: at, id_field: { dir: id } },
    ])
}

#[async_trait]
impl Store for MongoStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.db
            .run_command(doc! { "ping": 1 })
            .await
            .map_err(failed("ping"))?;
        Ok(())
    }

    async fn insert_key(
        &self,
        key: &KeyRecord,
        material_hashes: &[String],
        event: &AuditEvent,
    ) -> Result<(), StoreError> {
        // Not atomic with the insert, and it need not be: two registrations
        // of the same material racing each other carry the same primary-key
        // hash, which the unique index refuses.
        let taken = self
            .keys
            .find_one(doc! {
                "provider_id": &key.provider_id,
                "material_hash": { "$in": material_hashes },
            })
            .projection(doc! { "_id": 1 })
            .await
            .map_err(failed("check duplicate material"))?;
        if taken.is_some() {
            return Err(StoreError::Duplicate);
        }
        let event = self.event_doc(event)?;
        let mut doc = encode(&KeyRow::from_record(key)?)?;
        doc.insert("pending_audit", vec![event.clone()]);
        self.keys
            .insert_one(doc)
            .await
            .map_err(failed("insert key"))?;
        self.deliver_after_write(key.id.as_str(), event).await;
        Ok(())
    }

    async fn get_key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        Ok(self
            .find_keys(doc! { "id": id.as_str() }, Some(1))
            .await?
            .pop())
    }

    async fn list_keys(
        &self,
        filter: &KeyFilter,
        page: &PageRequest,
    ) -> Result<Page<KeyRecord>, StoreError> {
        let mut query = doc! {};
        if let Some(provider) = &filter.provider_id {
            query.insert("provider_id", provider);
        }
        if let Some(state) = filter.state {
            query.insert("state", state.as_str());
        }
        if let Some(c) = &page.cursor {
            query.insert("$or", after("created_at", "id", "$gt", micros(c.at), &c.id));
        }
        let keys = self.find_keys(query, Some(fetch_limit(page))).await?;
        Ok(into_page(keys, page, key_position))
    }

    async fn all_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.find_keys(doc! {}, None).await
    }

    async fn update_key(&self, key: &KeyRecord, event: &AuditEvent) -> Result<(), StoreError> {
        let event = self.event_doc(event)?;
        let row = encode(&KeyRow::from_record(key)?)?;
        let id = key.id.as_str();
        let result = self
            .keys
            .update_one(
                doc! { "id": id, "revision": key.revision - 1 },
                doc! { "$set": row, "$push": { "pending_audit": event.clone() } },
            )
            .await
            .map_err(failed("update key"))?;
        if result.matched_count == 0 {
            let exists = self
                .keys
                .find_one(doc! { "id": id })
                .projection(doc! { "_id": 1 })
                .await
                .map_err(failed("find key"))?
                .is_some();
            return Err(if exists {
                StoreError::Stale
            } else {
                StoreError::NotFound
            });
        }
        self.deliver_after_write(id, event).await;
        Ok(())
    }

    /// Bumps each updated key's revision: an update based on an earlier read
    /// would otherwise write the old token back.
    ///
    /// Without transactions the keys are written one by one; the event rides
    /// with the first key actually updated, so it is recorded exactly when
    /// the rotation changed something (a run cut short is then retried, and
    /// records its own event).
    async fn reseal_keys(&self, keys: &[Resealed], event: &AuditEvent) -> Result<u64, StoreError> {
        let mut pending = Some(self.event_doc(event)?);
        let mut carrier = None;
        let mut updated = 0;
        for k in keys {
            let mut update = doc! {
                "$set": { "sealed": k.sealed.token(), "material_hash": &k.material_hash },
                "$inc": { "revision": 1_i64 },
            };
            if let Some(event) = &pending {
                update.insert("$push", doc! { "pending_audit": event.clone() });
            }
            let result = self
                .keys
                .update_one(
                    doc! { "id": k.id.as_str(), "sealed": { "$type": "string" } },
                    update,
                )
                .await
                .map_err(failed("reseal key"))?;
            if result.matched_count > 0 {
                updated += 1;
                if let Some(event) = pending.take() {
                    carrier = Some((k.id.as_str(), event));
                }
            }
        }
        if let Some((id, event)) = carrier {
            self.deliver_after_write(id, event).await;
        }
        if let Some(event) = pending {
            // No key changed, so there is no write to be atomic with.
            self.insert_events(vec![event])
                .await
                .map_err(failed("record rotation event"))?;
        }
        Ok(updated)
    }

    async fn count_keys(&self) -> Result<Vec<StateCount>, StoreError> {
        #[derive(Deserialize)]
        struct Group {
            #[serde(rename = "_id")]
            key: GroupKey,
            count: u64,
        }
        #[derive(Deserialize)]
        struct GroupKey {
            provider_id: String,
            state: String,
        }
        let groups: Vec<Document> = self
            .keys
            .aggregate([doc! { "$group": {
                "_id": { "provider_id": "$provider_id", "state": "$state" },
                "count": { "$sum": 1 },
            } }])
            .await
            .map_err(failed("count keys"))?
            .try_collect()
            .await
            .map_err(failed("count keys"))?;
        groups
            .into_iter()
            .map(|doc| {
                let malformed =
                    || StoreError::Corrupt("a key document's state is malformed".into());
                let group: Group = bson::from_document(doc).map_err(|_| malformed())?;
                Ok(StateCount {
                    state: KeyState::parse(&group.key.state).ok_or_else(malformed)?,
                    provider_id: group.key.provider_id,
                    count: group.count,
                })
            })
            .collect()
    }

    async fn append_audit(&self, events: &[AuditEvent]) -> Result<(), StoreError> {
        let docs = events
            .iter()
            .map(|e| self.event_doc(e))
            .collect::<Result<_, _>>()?;
        self.insert_events(docs)
            .await
            .map_err(failed("append audit events"))
    }

    async fn list_audit(
        &self,
        filter: &AuditFilter,
        page: &PageRequest,
    ) -> Result<Page<AuditEvent>, StoreError> {
        self.flush_pending().await?;
        let mut query = doc! {};
        if let Some(resource) = &filter.resource {
            query.insert("resource", resource);
        }
        if let Some(event) = filter.event {
            query.insert("event", event.as_str());
        }
        let mut ts = doc! {};
        if let Some(from) = filter.from_micros() {
            ts.insert("$gte", from);
        }
        if let Some(before) = filter.before_micros() {
            ts.insert("$lt", before);
        }
        if !ts.is_empty() {
            query.insert("ts", ts);
        }
        if let Some(c) = &page.cursor {
            query.insert("$or", after("ts", "_id", "$lt", micros(c.at), &c.id));
        }
        let docs: Vec<Document> = self
            .audit
            .find(query)
            .projection(doc! { "expire_at": 0 })
            .sort(doc! { "ts": -1, "_id": -1 })
            .limit(i64::from(fetch_limit(page)))
            .await
            .map_err(failed("find audit events"))?
            .try_collect()
            .await
            .map_err(failed("read audit events"))?;
        let events = docs
            .into_iter()
            .map(event_from_doc)
            .collect::<Result<_, _>>()?;
        Ok(into_page(events, page, event_position))
    }

    async fn prune_audit(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        let result = self
            .audit
            .delete_many(doc! { "ts": { "$lt": micros(before) } })
            .await
            .map_err(failed("prune audit events"))?;
        Ok(result.deleted_count)
    }
}
