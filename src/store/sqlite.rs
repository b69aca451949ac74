//! The embedded store: one SQLite file in WAL mode.
//!
//! Several keyrouter processes on one host may share the file, so every write
//! is an `IMMEDIATE` transaction (it takes the write lock up front instead of
//! failing when a read lock cannot be upgraded) and waits out a busy file for
//! up to [`BUSY_TIMEOUT`].
//!
//! This module also defines the flat row form of keys and events ([`KeyRow`],
//! [`EventRow`]); the MongoDB store keeps the same rows as documents, so both
//! backends read and validate stored data the same way.

use super::{
    AuditFilter, Cursor, KeyFilter, Page, PageRequest, Resealed, StateCount, Store, StoreError,
};
use crate::audit::{Actor, AuditEvent, EventKind, Outcome};
use crate::keys::{KeyId, KeyRecord, KeyState, KeyStatus, Limits, SealedMaterial};
use async_trait::async_trait;
use chrono::{DateTime, Utc};
use rusqlite::types::Value;
use rusqlite::{Connection, Row, TransactionBehavior, named_params, params_from_iter};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

/// How long a call waits for another process's write lock before failing.
const BUSY_TIMEOUT: Duration = Duration::from_secs(5);

/// Schema steps; `PRAGMA user_version` counts how many have been applied.
/// Append only: a step that has been released never changes.
const MIGRATIONS: &[&str] = &[r#"
    CREATE TABLE keys (
        id               TEXT PRIMARY KEY,
        provider_id      TEXT NOT NULL,
        label            TEXT,
        state            TEXT NOT NULL,
        cooldown_until   INTEGER,
        state_reason     TEXT,
        rpm              INTEGER,
        tpm              INTEGER,
        max_concurrent   INTEGER,
        weight           INTEGER NOT NULL,
        fingerprint      TEXT NOT NULL,
        metadata         TEXT NOT NULL,
        created_at       INTEGER NOT NULL,
        updated_at       INTEGER NOT NULL,
        state_changed_at INTEGER NOT NULL,
        revision         INTEGER NOT NULL,
        sealed           TEXT,
        material_hash    TEXT
    ) STRICT;
    -- NULLs are distinct in a unique index, so erased keys never collide.
    CREATE UNIQUE INDEX keys_provider_material ON keys (provider_id, material_hash);
    CREATE INDEX keys_created ON keys (created_at, id);

    CREATE TABLE audit_log (
        id          TEXT PRIMARY KEY,
        ts          INTEGER NOT NULL,
        event       TEXT NOT NULL,
        actor       TEXT NOT NULL,
        resource    TEXT NOT NULL,
        action      TEXT NOT NULL,
        from_state  TEXT,
        to_state    TEXT,
        reason      TEXT,
        result      TEXT NOT NULL,
        client_addr TEXT
    ) STRICT;
    CREATE INDEX audit_ts ON audit_log (ts, id);
    CREATE INDEX audit_resource ON audit_log (resource, ts);
"#];

const KEY_COLUMNS: &str = "id, provider_id, label, state, cooldown_until, state_reason, rpm, tpm, \
     max_concurrent, weight, fingerprint, metadata, created_at, updated_at, state_changed_at, \
     revision, sealed, material_hash";

const INSERT_KEY: &str = "INSERT INTO keys (id, provider_id, label, state, cooldown_until, \
     state_reason, rpm, tpm, max_concurrent, weight, fingerprint, metadata, created_at, \
     updated_at, state_changed_at, revision, sealed, material_hash) \
     VALUES (:id, :provider_id, :label, :state, :cooldown_until, :state_reason, :rpm, :tpm, \
     :max_concurrent, :weight, :fingerprint, :metadata, :created_at, :updated_at, \
     :state_changed_at, :revision, :sealed, :material_hash)";

/// Takes the same parameters as [`INSERT_KEY`], so one binding serves both.
const UPDATE_KEY: &str = "UPDATE keys SET provider_id = :provider_id, label = :label, \
     state = :state, cooldown_until = :cooldown_until, state_reason = :state_reason, rpm = :rpm, \
     tpm = :tpm, max_concurrent = :max_concurrent, weight = :weight, \
     fingerprint = :fingerprint, metadata = :metadata, created_at = :created_at, \
     updated_at = :updated_at, state_changed_at = :state_changed_at, revision = :revision, \
     sealed = :sealed, material_hash = :material_hash \
     WHERE id = :id AND revision = :revision - 1";

const EVENT_COLUMNS: &str =
    "id, ts, event, actor, resource, action, from_state, to_state, reason, result, client_addr";

/// A key as both backends store it: enums as their text, times as
/// microseconds since the epoch, metadata as JSON text (operator-chosen keys
/// then need no escaping for MongoDB's field-name rules).
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct KeyRow {
    pub id: String,
    pub provider_id: String,
    pub label: Option<String>,
    pub state: String,
    pub cooldown_until: Option<i64>,
    pub state_reason: Option<String>,
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    pub max_concurrent: Option<i64>,
    pub weight: i64,
    pub fingerprint: String,
    pub metadata: String,
    pub created_at: i64,
    pub updated_at: i64,
    pub state_changed_at: i64,
    pub revision: i64,
    pub sealed: Option<String>,
    pub material_hash: Option<String>,
}

impl KeyRow {
    pub fn from_record(key: &KeyRecord) -> Result<Self, StoreError> {
        let metadata = serde_json::to_string(&key.metadata)
            .map_err(|_| StoreError::Unavailable("encode key metadata".into()))?;
        Ok(KeyRow {
            id: key.id.as_str().to_owned(),
            provider_id: key.provider_id.clone(),
            label: key.label.clone(),
            state: key.status.state().as_str().to_owned(),
            cooldown_until: key.status.cooldown_until().map(micros),
            state_reason: key.state_reason.clone(),
            rpm: key.limits.rpm.map(i64::from),
            tpm: key.limits.tpm.map(i64::from),
            max_concurrent: key.limits.max_concurrent.map(i64::from),
            weight: i64::from(key.weight),
            fingerprint: key.fingerprint.clone(),
            metadata,
            created_at: micros(key.created_at),
            updated_at: micros(key.updated_at),
            state_changed_at: micros(key.state_changed_at),
            revision: key.revision,
            sealed: key.sealed.as_ref().map(|s| s.token().to_owned()),
            material_hash: key.material_hash.clone(),
        })
    }

    /// Validates every field; a `Corrupt` error names the key and the field,
    /// never a stored value (which could be a token).
    pub fn into_record(self) -> Result<KeyRecord, StoreError> {
        let id = KeyId::parse(&self.id)
            .ok_or_else(|| StoreError::Corrupt("a stored key id is malformed".into()))?;
        let bad = |field: &str| StoreError::Corrupt(format!("key {id}: malformed {field}"));
        let state = KeyState::parse(&self.state).ok_or_else(|| bad("state"))?;
        let cooldown_until = self
            .cooldown_until
            .map(|t| time(t).ok_or_else(|| bad("cooldown_until")))
            .transpose()?;
        let limit = |v: Option<i64>, field| v.map(|n| u32::try_from(n).map_err(|_| bad(field)));
        Ok(KeyRecord {
            provider_id: self.provider_id,
            label: self.label,
            status: KeyStatus::from_parts(state, cooldown_until),
            state_reason: self.state_reason,
            limits: Limits {
                rpm: limit(self.rpm, "rpm").transpose()?,
                tpm: limit(self.tpm, "tpm").transpose()?,
                max_concurrent: limit(self.max_concurrent, "max_concurrent").transpose()?,
            },
            weight: u32::try_from(self.weight).map_err(|_| bad("weight"))?,
            fingerprint: self.fingerprint,
            metadata: serde_json::from_str(&self.metadata).map_err(|_| bad("metadata"))?,
            created_at: time(self.created_at).ok_or_else(|| bad("created_at"))?,
            updated_at: time(self.updated_at).ok_or_else(|| bad("updated_at"))?,
            state_changed_at: time(self.state_changed_at).ok_or_else(|| bad("state_changed_at"))?,
            revision: self.revision,
            sealed: self.sealed.map(SealedMaterial::from_token),
            material_hash: self.material_hash,
            id,
        })
    }

    fn read(row: &Row) -> rusqlite::Result<Self> {
        Ok(KeyRow {
            id: row.get("id")?,
            provider_id: row.get("provider_id")?,
            label: row.get("label")?,
            state: row.get("state")?,
            cooldown_until: row.get("cooldown_until")?,
            state_reason: row.get("state_reason")?,
            rpm: row.get("rpm")?,
            tpm: row.get("tpm")?,
            max_concurrent: row.get("max_concurrent")?,
            weight: row.get("weight")?,
            fingerprint: row.get("fingerprint")?,
            metadata: row.get("metadata")?,
            created_at: row.get("created_at")?,
            updated_at: row.get("updated_at")?,
            state_changed_at: row.get("state_changed_at")?,
            revision: row.get("revision")?,
            sealed: row.get("sealed")?,
            material_hash: row.get("material_hash")?,
        })
    }

    /// Runs [`INSERT_KEY`] or [`UPDATE_KEY`]; returns the changed row count.
    fn write(&self, conn: &Connection, sql: &str) -> rusqlite::Result<usize> {
        conn.prepare_cached(sql)?.execute(named_params! {
            ":id": self.id,
            ":provider_id": self.provider_id,
            ":label": self.label,
            ":state": self.state,
            ":cooldown_until": self.cooldown_until,
            ":state_reason": self.state_reason,
            ":rpm": self.rpm,
            ":tpm": self.tpm,
            ":max_concurrent": self.max_concurrent,
            ":weight": self.weight,
            ":fingerprint": self.fingerprint,
            ":metadata": self.metadata,
            ":created_at": self.created_at,
            ":updated_at": self.updated_at,
            ":state_changed_at": self.state_changed_at,
            ":revision": self.revision,
            ":sealed": self.sealed,
            ":material_hash": self.material_hash,
        })
    }
}

/// An audit event as both backends store it. The id is MongoDB's `_id`, which
/// makes appending idempotent there.
#[derive(Debug, Serialize, Deserialize)]
pub(super) struct EventRow {
    #[serde(rename = "_id")]
    pub id: String,
    pub ts: i64,
    pub event: String,
    pub actor: String,
    pub resource: String,
    /// Stored for people reading the table; reads derive it from `event`.
    pub action: String,
    pub from_state: Option<String>,
    pub to_state: Option<String>,
    pub reason: Option<String>,
    pub result: String,
    pub client_addr: Option<String>,
}

impl EventRow {
    pub fn from_event(e: &AuditEvent) -> Self {
        EventRow {
            id: e.id.clone(),
            ts: micros(e.timestamp),
            event: e.event.as_str().to_owned(),
            actor: e.actor.render(),
            resource: e.resource.clone(),
            action: e.action.to_owned(),
            from_state: e.from.map(|s| s.as_str().to_owned()),
            to_state: e.to.map(|s| s.as_str().to_owned()),
            reason: e.reason.clone(),
            result: e.result.as_str().to_owned(),
            client_addr: e.client_addr.map(|a| a.to_string()),
        }
    }

    pub fn into_event(self) -> Result<AuditEvent, StoreError> {
        let id = self.id;
        let bad = |field: &str| StoreError::Corrupt(format!("audit event {id}: malformed {field}"));
        let state = |s: Option<String>, field| {
            s.map(|s| KeyState::parse(&s).ok_or_else(|| bad(field)))
                .transpose()
        };
        let event = EventKind::parse(&self.event).ok_or_else(|| bad("event"))?;
        Ok(AuditEvent {
            timestamp: time(self.ts).ok_or_else(|| bad("timestamp"))?,
            event,
            actor: Actor::parse(&self.actor).ok_or_else(|| bad("actor"))?,
            resource: self.resource,
            action: event.action(),
            from: state(self.from_state, "from_state")?,
            to: state(self.to_state, "to_state")?,
            reason: self.reason,
            result: Outcome::parse(&self.result).ok_or_else(|| bad("result"))?,
            client_addr: self
                .client_addr
                .map(|a| a.parse().map_err(|_| bad("client_addr")))
                .transpose()?,
            id,
        })
    }

    fn read(row: &Row) -> rusqlite::Result<Self> {
        Ok(EventRow {
            id: row.get("id")?,
            ts: row.get("ts")?,
            event: row.get("event")?,
            actor: row.get("actor")?,
            resource: row.get("resource")?,
            action: row.get("action")?,
            from_state: row.get("from_state")?,
            to_state: row.get("to_state")?,
            reason: row.get("reason")?,
            result: row.get("result")?,
            client_addr: row.get("client_addr")?,
        })
    }

    /// Appends the event; a stored event with the same id wins, so a retry
    /// cannot duplicate it.
    fn write(&self, conn: &Connection) -> rusqlite::Result<usize> {
        conn.prepare_cached(
            "INSERT OR IGNORE INTO audit_log (id, ts, event, actor, resource, action, from_state, \
             to_state, reason, result, client_addr) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
        )?
        .execute((
            &self.id,
            self.ts,
            &self.event,
            &self.actor,
            &self.resource,
            &self.action,
            &self.from_state,
            &self.to_state,
            &self.reason,
            &self.result,
            &self.client_addr,
        ))
    }
}

/// The stored form of a time (both backends).
pub(super) fn micros(t: DateTime<Utc>) -> i64 {
    t.timestamp_micros()
}

fn time(micros: i64) -> Option<DateTime<Utc>> {
    DateTime::from_timestamp_micros(micros)
}

/// How many rows to fetch for a page: one more than it holds, to learn
/// whether another page follows.
pub(super) fn fetch_limit(page: &PageRequest) -> u32 {
    page.limit.saturating_add(1)
}

/// Cuts rows fetched with [`fetch_limit`] down to the page; `next` is the
/// position of its last item when more rows follow.
pub(super) fn into_page<T>(
    mut items: Vec<T>,
    page: &PageRequest,
    position: impl Fn(&T) -> Cursor,
) -> Page<T> {
    let more = items.len() > page.limit as usize;
    items.truncate(page.limit as usize);
    let next = if more {
        items.last().map(position)
    } else {
        None
    };
    Page { items, next }
}

pub(super) fn key_position(key: &KeyRecord) -> Cursor {
    Cursor {
        at: key.created_at,
        id: key.id.as_str().to_owned(),
    }
}

pub(super) fn event_position(event: &AuditEvent) -> Cursor {
    Cursor {
        at: event.timestamp,
        id: event.id.clone(),
    }
}

/// How work on the connection fails: an SQLite error (described once, with
/// the name of the call) or an answer of the store.
enum CallError {
    Sql(rusqlite::Error),
    Store(StoreError),
}

impl CallError {
    fn describe(self, op: &str) -> StoreError {
        match self {
            CallError::Sql(e) => store_error(op, &e),
            CallError::Store(e) => e,
        }
    }
}

impl From<rusqlite::Error> for CallError {
    fn from(e: rusqlite::Error) -> Self {
        CallError::Sql(e)
    }
}

impl From<StoreError> for CallError {
    fn from(e: StoreError) -> Self {
        CallError::Store(e)
    }
}

/// Maps an SQLite error to the store's terms. Only the error code goes into
/// the message: rusqlite's own text can quote values.
fn store_error(op: &str, e: &rusqlite::Error) -> StoreError {
    match e.sqlite_error() {
        // The only UNIQUE index is the material one (the id is a PRIMARY KEY,
        // which reports its own code).
        Some(f) if f.extended_code == rusqlite::ffi::SQLITE_CONSTRAINT_UNIQUE => {
            StoreError::Duplicate
        }
        Some(f) => StoreError::Unavailable(format!("sqlite {op}: {:?}", f.code)),
        None => StoreError::Unavailable(format!("sqlite {op} failed")),
    }
}

type CallResult<T> = Result<T, CallError>;

/// WHERE conditions and their values, added filter by filter.
#[derive(Default)]
struct Conditions {
    clauses: Vec<&'static str>,
    values: Vec<Value>,
}

impl Conditions {
    fn add(&mut self, clause: &'static str, values: impl IntoIterator<Item = Value>) {
        self.clauses.push(clause);
        self.values.extend(values);
    }

    fn sql(&self) -> String {
        if self.clauses.is_empty() {
            String::new()
        } else {
            format!(" WHERE {}", self.clauses.join(" AND "))
        }
    }
}

/// Runs `sql` with `values` and reads each row with `read`.
fn query_rows<R>(
    conn: &Connection,
    sql: &str,
    values: Vec<Value>,
    read: fn(&Row) -> rusqlite::Result<R>,
) -> CallResult<Vec<R>> {
    let mut stmt = conn.prepare_cached(sql)?;
    let rows = stmt.query_map(params_from_iter(values), read)?;
    Ok(rows.collect::<rusqlite::Result<_>>()?)
}

fn read_keys(conn: &Connection, sql: &str, values: Vec<Value>) -> CallResult<Vec<KeyRecord>> {
    query_rows(conn, sql, values, KeyRow::read)?
        .into_iter()
        .map(|row| row.into_record().map_err(CallError::Store))
        .collect()
}

/// The SQLite store. Cheap to share: clones of the inner `Arc` go to the
/// blocking workers.
pub struct SqliteStore {
    /// A std mutex, not an async one: it is locked only inside
    /// `spawn_blocking` workers and never held across an `.await`, and SQLite
    /// calls block anyway. One connection serializes this process's calls;
    /// WAL lets other processes read while it writes.
    conn: Arc<Mutex<Connection>>,
}

impl SqliteStore {
    /// Opens (or creates) the database at `path`, creating its directory if
    /// missing, and brings the schema up to date.
    pub async fn open(path: &Path) -> Result<Self, StoreError> {
        let path = path.to_owned();
        let conn = tokio::task::spawn_blocking(move || open_connection(&path))
            .await
            .map_err(|_| StoreError::Unavailable("sqlite open: worker failed".into()))??;
        Ok(SqliteStore {
            conn: Arc::new(Mutex::new(conn)),
        })
    }

    /// Runs `f` with the connection on a blocking worker. `op` names the call
    /// in error messages.
    async fn call<T: Send + 'static>(
        &self,
        op: &'static str,
        f: impl FnOnce(&mut Connection) -> CallResult<T> + Send + 'static,
    ) -> Result<T, StoreError> {
        let conn = Arc::clone(&self.conn);
        let outcome = tokio::task::spawn_blocking(move || {
            // A panic in an earlier call rolled its transaction back while
            // unwinding, so the connection is still sound.
            let mut conn = conn.lock().unwrap_or_else(PoisonError::into_inner);
            f(&mut conn)
        })
        .await
        .map_err(|_| StoreError::Unavailable(format!("sqlite {op}: worker failed")))?;
        outcome.map_err(|e| e.describe(op))
    }
}

fn open_connection(path: &Path) -> Result<Connection, StoreError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        private_dir(dir).map_err(|e| {
            StoreError::Unavailable(format!("create directory {}: {e}", dir.display()))
        })?;
    }
    private_file(path)
        .map_err(|e| StoreError::Unavailable(format!("create {}: {e}", path.display())))?;
    let mut conn = Connection::open(path).map_err(|e| store_error("open database", &e))?;
    configure(&conn).map_err(|e| e.describe("configure database"))?;
    migrate(&mut conn).map_err(|e| e.describe("migrate schema"))?;
    Ok(conn)
}

/// A new data directory is readable by its owner only.
fn private_dir(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

/// A new database file is created owner-only before SQLite opens it; SQLite
/// gives its `-wal` and `-shm` files the same permissions. Existing files
/// keep theirs.
fn private_file(path: &Path) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.create(true).append(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options.open(path).map(drop)
}

fn configure(conn: &Connection) -> CallResult<()> {
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let mode: String =
        conn.pragma_update_and_check(None, "journal_mode", "WAL", |row| row.get(0))?;
    if !mode.eq_ignore_ascii_case("wal") {
        return Err(StoreError::Unavailable(format!(
            "sqlite: WAL mode unavailable (journal mode is {mode})"
        ))
        .into());
    }
    // Erased tokens are overwritten rather than left in free pages.
    conn.pragma_update(None, "secure_delete", true)?;
    Ok(())
}

/// Applies the missing schema steps in one transaction; two processes
/// starting together take turns on the write lock.
fn migrate(conn: &mut Connection) -> CallResult<()> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let applied: usize = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if applied > MIGRATIONS.len() {
        return Err(StoreError::Unavailable(format!(
            "sqlite schema version {applied} is newer than this keyrouter supports ({})",
            MIGRATIONS.len()
        ))
        .into());
    }
    for (done, step) in MIGRATIONS.iter().enumerate().skip(applied) {
        tx.execute_batch(step)?;
        tx.pragma_update(None, "user_version", done + 1)?;
    }
    tx.commit()?;
    Ok(())
}

#[async_trait]
impl Store for SqliteStore {
    async fn ping(&self) -> Result<(), StoreError> {
        self.call("ping", |conn| {
            Ok(conn.query_row("SELECT 1", [], |_| Ok(()))?)
        })
        .await
    }

    async fn insert_key(
        &self,
        key: &KeyRecord,
        material_hashes: &[String],
        event: &AuditEvent,
    ) -> Result<(), StoreError> {
        let (row, hashes, event) = (
            KeyRow::from_record(key)?,
            material_hashes.to_vec(),
            EventRow::from_event(event),
        );
        self.call("insert key", move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            {
                let mut taken = tx.prepare_cached(
                    "SELECT EXISTS (SELECT 1 FROM keys WHERE provider_id = ? AND material_hash = ?)",
                )?;
                for hash in &hashes {
                    if taken.query_row((&row.provider_id, hash), |r| r.get(0))? {
                        return Err(StoreError::Duplicate.into());
                    }
                }
            }
            row.write(&tx, INSERT_KEY)?;
            event.write(&tx)?;
            Ok(tx.commit()?)
        })
        .await
    }

    async fn get_key(&self, id: &KeyId) -> Result<Option<KeyRecord>, StoreError> {
        let id = id.as_str().to_owned();
        self.call("get key", move |conn| {
            let sql = format!("SELECT {KEY_COLUMNS} FROM keys WHERE id = ?");
            Ok(read_keys(conn, &sql, vec![Value::Text(id)])?.pop())
        })
        .await
    }

    async fn list_keys(
        &self,
        filter: &KeyFilter,
        page: &PageRequest,
    ) -> Result<Page<KeyRecord>, StoreError> {
        let mut cond = Conditions::default();
        if let Some(provider) = &filter.provider_id {
            cond.add("provider_id = ?", [Value::Text(provider.clone())]);
        }
        if let Some(state) = filter.state {
            cond.add("state = ?", [Value::Text(state.as_str().into())]);
        }
        if let Some(after) = &page.cursor {
            cond.add(
                "(created_at, id) > (?, ?)",
                [
                    Value::Integer(micros(after.at)),
                    Value::Text(after.id.clone()),
                ],
            );
        }
        let sql = format!(
            "SELECT {KEY_COLUMNS} FROM keys{} ORDER BY created_at, id LIMIT ?",
            cond.sql()
        );
        let mut values = cond.values;
        values.push(Value::Integer(fetch_limit(page).into()));
        let rows = self
            .call("list keys", move |conn| read_keys(conn, &sql, values))
            .await?;
        Ok(into_page(rows, page, key_position))
    }

    async fn all_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.call("load keys", |conn| {
            let sql = format!("SELECT {KEY_COLUMNS} FROM keys ORDER BY created_at, id");
            read_keys(conn, &sql, Vec::new())
        })
        .await
    }

    async fn update_key(&self, key: &KeyRecord, event: &AuditEvent) -> Result<(), StoreError> {
        let (row, event) = (KeyRow::from_record(key)?, EventRow::from_event(event));
        self.call("update key", move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            if row.write(&tx, UPDATE_KEY)? == 0 {
                let exists: bool = tx.query_row(
                    "SELECT EXISTS (SELECT 1 FROM keys WHERE id = ?)",
                    [&row.id],
                    |r| r.get(0),
                )?;
                let outcome = if exists {
                    StoreError::Stale
                } else {
                    StoreError::NotFound
                };
                return Err(outcome.into());
            }
            event.write(&tx)?;
            Ok(tx.commit()?)
        })
        .await
    }

    /// Bumps each updated key's revision: an update based on an earlier read
    /// would otherwise write the old token back.
    async fn reseal_keys(&self, keys: &[Resealed], event: &AuditEvent) -> Result<u64, StoreError> {
        let keys: Vec<_> = keys
            .iter()
            .map(|k| {
                let token = k.sealed.token().to_owned();
                (k.id.as_str().to_owned(), token, k.material_hash.clone())
            })
            .collect();
        let event = EventRow::from_event(event);
        self.call("reseal keys", move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let mut updated = 0;
            {
                let mut reseal = tx.prepare_cached(
                    "UPDATE keys SET sealed = ?, material_hash = ?, revision = revision + 1 \
                     WHERE id = ? AND sealed IS NOT NULL",
                )?;
                for (id, token, hash) in &keys {
                    updated += reseal.execute((token, hash, id))? as u64;
                }
            }
            event.write(&tx)?;
            tx.commit()?;
            Ok(updated)
        })
        .await
    }

    async fn count_keys(&self) -> Result<Vec<StateCount>, StoreError> {
        let rows = self
            .call("count keys", |conn| {
                query_rows(
                    conn,
                    "SELECT provider_id, state, COUNT(*) FROM keys GROUP BY provider_id, state",
                    Vec::new(),
                    |row| Ok((row.get(0)?, row.get::<_, String>(1)?, row.get(2)?)),
                )
            })
            .await?;
        rows.into_iter()
            .map(|(provider_id, state, count): (String, String, u64)| {
                let state = KeyState::parse(&state).ok_or_else(|| {
                    StoreError::Corrupt(format!(
                        "a key of provider {provider_id} has a malformed state"
                    ))
                })?;
                Ok(StateCount {
                    provider_id,
                    state,
                    count,
                })
            })
            .collect()
    }

    async fn append_audit(&self, events: &[AuditEvent]) -> Result<(), StoreError> {
        let rows: Vec<_> = events.iter().map(EventRow::from_event).collect();
        self.call("append audit events", move |conn| {
            let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
            for row in &rows {
                row.write(&tx)?;
            }
            Ok(tx.commit()?)
        })
        .await
    }

    async fn list_audit(
        &self,
        filter: &AuditFilter,
        page: &PageRequest,
    ) -> Result<Page<AuditEvent>, StoreError> {
        let mut cond = Conditions::default();
        if let Some(resource) = &filter.resource {
            cond.add("resource = ?", [Value::Text(resource.clone())]);
        }
        if let Some(event) = filter.event {
            cond.add("event = ?", [Value::Text(event.as_str().into())]);
        }
        if let Some(from) = filter.from_micros() {
            cond.add("ts >= ?", [Value::Integer(from)]);
        }
        if let Some(before) = filter.before_micros() {
            cond.add("ts < ?", [Value::Integer(before)]);
        }
        if let Some(after) = &page.cursor {
            cond.add(
                "(ts, id) < (?, ?)",
                [
                    Value::Integer(micros(after.at)),
                    Value::Text(after.id.clone()),
                ],
            );
        }
        let sql = format!(
            "SELECT {EVENT_COLUMNS} FROM audit_log{} ORDER BY ts DESC, id DESC LIMIT ?",
            cond.sql()
        );
        let mut values = cond.values;
        values.push(Value::Integer(fetch_limit(page).into()));
        let rows = self
            .call("list audit events", move |conn| {
                query_rows(conn, &sql, values, EventRow::read)
            })
            .await?;
        let events = rows
            .into_iter()
            .map(EventRow::into_event)
            .collect::<Result<_, _>>()?;
        Ok(into_page(events, page, event_position))
    }

    async fn prune_audit(&self, before: DateTime<Utc>) -> Result<u64, StoreError> {
        self.call("prune audit events", move |conn| {
            let deleted = conn.execute("DELETE FROM audit_log WHERE ts < ?", [micros(before)])?;
            Ok(deleted as u64)
        })
        .await
    }
}
