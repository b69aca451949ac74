//! The store contract: every scenario is written once against `dyn Store` and
//! run on SQLite always, and on MongoDB when `KEYROUTER_TEST_MONGODB_URI` is
//! set (each test then uses its own database and drops it afterwards).

use chrono::{DateTime, Utc};
use keyrouter::audit::{Actor, AuditEvent, EventKind};
use keyrouter::ids::random_token;
use keyrouter::keys::{KeyId, KeyRecord, KeyState, KeyStatus, Limits, SealedMaterial, Vault};
use keyrouter::secret::Secret;
use keyrouter::store::mongo::MongoStore;
use keyrouter::store::sqlite::SqliteStore;
use keyrouter::store::{
    AuditFilter, Cursor, KeyFilter, Page, PageRequest, Resealed, StateCount, Store, StoreError,
};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::Path;
use tempfile::TempDir;

const MONGODB_URI_VAR: &str = "KEYROUTER_TEST_MONGODB_URI";

/// A fixed instant plus `micros`; the odd base checks microsecond precision.
fn t(micros: i64) -> DateTime<Utc> {
    DateTime::from_timestamp_micros(1_800_000_000_123_457 + micros).unwrap()
}

/// A fully populated active key whose material hash is `hash`.
fn key(provider: &str, hash: &str, created: DateTime<Utc>) -> KeyRecord {
    KeyRecord {
        id: KeyId::generate(),
        provider_id: provider.into(),
        label: Some("primary".into()),
        status: KeyStatus::Active,
        state_reason: None,
        limits: Limits {
            rpm: Some(600),
            tpm: None,
            max_concurrent: Some(4),
        },
        weight: 3,
        fingerprint: "sha256:0123abcd".into(),
        metadata: BTreeMap::from([
            ("team".into(), "search".into()),
            ("cost.center".into(), "$42".into()),
        ]),
        created_at: created,
        updated_at: t(1),
        state_changed_at: t(2),
        revision: 1,
        sealed: Some(SealedMaterial::from_token(format!(
            "gAAAAA-token-of-{hash}"
        ))),
        material_hash: Some(hash.into()),
    }
}

fn event(kind: EventKind, resource: &str, at: DateTime<Utc>) -> AuditEvent {
    let mut e = AuditEvent::new(kind, Actor::Admin("ops@example.com".into()), resource);
    e.timestamp = at;
    e
}

/// Registers `key` with its own hash as the only ring hash.
async fn insert(store: &dyn Store, key: &KeyRecord) -> AuditEvent {
    let e = event(EventKind::KeyRegistered, key.id.as_str(), key.created_at);
    let hashes = [key.material_hash.clone().unwrap()];
    store.insert_key(key, &hashes, &e).await.unwrap();
    e
}

/// The next revision of `key`, as a caller of `update_key` builds it.
fn next(key: &KeyRecord) -> KeyRecord {
    KeyRecord {
        revision: key.revision + 1,
        ..key.clone()
    }
}

fn erased(key: &KeyRecord) -> KeyRecord {
    KeyRecord {
        status: KeyStatus::Revoked,
        sealed: None,
        material_hash: None,
        ..next(key)
    }
}

fn page(limit: u32) -> PageRequest {
    PageRequest {
        limit,
        cursor: None,
    }
}

/// Follows `next` cursors (through their wire form, as the API would) until
/// the last page.
async fn all_pages<T, F, Fut>(limit: u32, mut fetch: F) -> Vec<Vec<T>>
where
    F: FnMut(PageRequest) -> Fut,
    Fut: Future<Output = Result<Page<T>, StoreError>>,
{
    let mut pages = Vec::new();
    let mut cursor = None;
    loop {
        let page = fetch(PageRequest { limit, cursor }).await.unwrap();
        pages.push(page.items);
        let Some(next) = page.next else { break pages };
        cursor = Some(Cursor::decode(&next.encode()).expect("a cursor the API can hand out"));
        assert!(pages.len() < 100, "pagination does not end");
    }
}

async fn audit_of(store: &dyn Store, filter: AuditFilter) -> Vec<AuditEvent> {
    let page = store.list_audit(&filter, &page(1000)).await.unwrap();
    assert!(page.next.is_none());
    page.items
}

fn about(resource: &str) -> AuditFilter {
    AuditFilter {
        resource: Some(resource.into()),
        ..AuditFilter::default()
    }
}

fn ids<'a>(keys: impl IntoIterator<Item = &'a KeyRecord>) -> Vec<&'a str> {
    keys.into_iter().map(|k| k.id.as_str()).collect()
}

// ---------------------------------------------------------------- scenarios

async fn round_trip(store: &dyn Store) {
    let mut full = key("openai", "hash-full", t(0));
    full.status = KeyStatus::CoolingDown {
        until: t(3_000_001),
    };
    full.state_reason = Some("upstream_rate_limited".into());
    full.revision = 7;
    let bare = KeyRecord {
        label: None,
        limits: Limits::default(),
        metadata: BTreeMap::new(),
        ..key("anthropic", "hash-bare", t(5))
    };
    for k in [&full, &bare] {
        insert(store, k).await;
        assert_eq!(store.get_key(&k.id).await.unwrap().as_ref(), Some(k));
    }
    let unknown = KeyId::parse("key_doesnotexist").unwrap();
    assert_eq!(store.get_key(&unknown).await.unwrap(), None);
    assert_eq!(store.all_keys().await.unwrap(), vec![full, bare]);
    store.ping().await.unwrap();
}

async fn duplicate_material(store: &dyn Store) {
    let first = key("openai", "hash-old-ring-key", t(0));
    insert(store, &first).await;

    let same = key("openai", "hash-old-ring-key", t(1));
    let e = event(EventKind::KeyRegistered, same.id.as_str(), t(1));
    let outcome = store
        .insert_key(&same, &["hash-old-ring-key".into()], &e)
        .await;
    assert!(matches!(outcome, Err(StoreError::Duplicate)), "{outcome:?}");

    // The hash made with an older ring key gives the duplicate away.
    let rotated = key("openai", "hash-new-ring-key", t(2));
    let hashes = ["hash-new-ring-key".into(), "hash-old-ring-key".into()];
    let e2 = event(EventKind::KeyRegistered, rotated.id.as_str(), t(2));
    let outcome = store.insert_key(&rotated, &hashes, &e2).await;
    assert!(matches!(outcome, Err(StoreError::Duplicate)), "{outcome:?}");

    // A refused key leaves neither a record nor an event behind.
    for refused in [&same, &rotated] {
        assert_eq!(store.get_key(&refused.id).await.unwrap(), None);
        assert!(audit_of(store, about(refused.id.as_str())).await.is_empty());
    }

    let other_provider = key("anthropic", "hash-old-ring-key", t(3));
    insert(store, &other_provider).await;
    assert_eq!(
        ids(&store.all_keys().await.unwrap()),
        ids([&first, &other_provider])
    );
}

async fn insert_records_its_event(store: &dyn Store) {
    let k = key("openai", "hash-a", t(0));
    let registered = insert(store, &k).await;
    assert_eq!(
        audit_of(store, about(k.id.as_str())).await,
        vec![registered]
    );
}

async fn update_checks_the_revision(store: &dyn Store) {
    let k = key("openai", "hash-a", t(0));
    let registered = insert(store, &k).await;

    let mut changed = next(&k);
    changed.status = KeyStatus::Exhausted;
    changed.state_reason = Some("upstream_quota_exhausted".into());
    changed.label = Some("renamed".into());
    changed.limits.tpm = Some(90_000);
    changed.weight = 9;
    changed.metadata.insert("owner".into(), "ml".into());
    changed.updated_at = t(10);
    changed.state_changed_at = t(10);
    let updated = event(EventKind::KeyStateChanged, k.id.as_str(), t(10))
        .transition(KeyState::Active, KeyState::Exhausted);
    store.update_key(&changed, &updated).await.unwrap();
    assert_eq!(store.get_key(&k.id).await.unwrap(), Some(changed.clone()));

    // Both a replay of the same revision and one from the future are stale.
    for revision in [changed.revision, changed.revision + 2] {
        let stale = KeyRecord {
            revision,
            status: KeyStatus::Revoked,
            ..changed.clone()
        };
        let e = event(EventKind::KeyRevoked, k.id.as_str(), t(20));
        let outcome = store.update_key(&stale, &e).await;
        assert!(matches!(outcome, Err(StoreError::Stale)), "{outcome:?}");
    }
    assert_eq!(store.get_key(&k.id).await.unwrap(), Some(changed));

    let ghost = next(&key("openai", "hash-ghost", t(0)));
    let e = event(EventKind::KeyUpdated, ghost.id.as_str(), t(20));
    let outcome = store.update_key(&ghost, &e).await;
    assert!(matches!(outcome, Err(StoreError::NotFound)), "{outcome:?}");

    // Refused updates recorded nothing.
    assert_eq!(
        audit_of(store, about(k.id.as_str())).await,
        vec![updated, registered]
    );
    assert!(audit_of(store, about(ghost.id.as_str())).await.is_empty());
}

async fn erased_material_can_be_registered_again(store: &dyn Store) {
    let k = key("openai", "hash-a", t(0));
    insert(store, &k).await;
    let gone = erased(&k);
    store
        .update_key(&gone, &event(EventKind::KeyDeleted, k.id.as_str(), t(1)))
        .await
        .unwrap();
    let stored = store.get_key(&k.id).await.unwrap().unwrap();
    assert_eq!((stored.sealed, stored.material_hash), (None, None));

    let again = key("openai", "hash-a", t(2));
    insert(store, &again).await;
    // A second erased key of the same provider does not collide either.
    let again_gone = erased(&again);
    store
        .update_key(
            &again_gone,
            &event(EventKind::KeyDeleted, again.id.as_str(), t(3)),
        )
        .await
        .unwrap();
}

async fn list_keys_pages(store: &dyn Store) {
    // Pairs share a creation time, so the id decides their order.
    let mut keys: Vec<_> = (0..7)
        .map(|i| key("openai", &format!("hash-{i}"), t((i / 2) * 1_000)))
        .collect();
    for k in keys.iter().rev() {
        insert(store, k).await;
    }
    keys.sort_by(|a, b| (a.created_at, &a.id).cmp(&(b.created_at, &b.id)));

    let filter = KeyFilter::default();
    let fetch = |req: PageRequest| {
        let filter = &filter;
        async move { store.list_keys(filter, &req).await }
    };
    let pages = all_pages(3, fetch).await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [3, 3, 1]);
    assert_eq!(pages.concat(), keys, "no overlap, no gap, oldest first");

    let whole = store.list_keys(&filter, &page(7)).await.unwrap();
    assert_eq!((whole.items.len(), whole.next), (7, None));
}

async fn list_keys_filters(store: &dyn Store) {
    let a = key("openai", "hash-a", t(0));
    let b = key("openai", "hash-b", t(1));
    let c = KeyRecord {
        status: KeyStatus::Exhausted,
        ..key("openai", "hash-c", t(2))
    };
    let d = key("anthropic", "hash-d", t(3));
    for k in [&a, &b, &c, &d] {
        insert(store, k).await;
    }
    let list = |provider: Option<&str>, state: Option<KeyState>| {
        let filter = KeyFilter {
            provider_id: provider.map(str::to_owned),
            state,
        };
        async move { store.list_keys(&filter, &page(100)).await.unwrap().items }
    };
    assert_eq!(ids(&list(Some("openai"), None).await), ids([&a, &b, &c]));
    assert_eq!(
        ids(&list(None, Some(KeyState::Active)).await),
        ids([&a, &b, &d])
    );
    assert_eq!(
        ids(&list(Some("openai"), Some(KeyState::Exhausted)).await),
        ids([&c])
    );
    assert!(list(Some("mistral"), None).await.is_empty());
}

async fn list_audit_pages_and_filters(store: &dyn Store) {
    let e1 = event(EventKind::KeyRegistered, "key_aaaaaaaa", t(1_000));
    let e2 = event(EventKind::KeyUpdated, "key_aaaaaaaa", t(2_000));
    let e3 = event(EventKind::KeyRegistered, "key_bbbbbbbb", t(2_000));
    let mut e4 =
        AuditEvent::auth_failed("/admin/v1/keys", "2001:db8::7".parse().unwrap(), "bad_key");
    e4.timestamp = t(3_000);
    let mut e5 = event(EventKind::KeyStateChanged, "key_aaaaaaaa", t(4_000))
        .transition(KeyState::Active, KeyState::CoolingDown)
        .reason("upstream_rate_limited");
    e5.actor = Actor::Router;
    let all = [e1.clone(), e2.clone(), e3.clone(), e4.clone(), e5.clone()];
    store.append_audit(&all).await.unwrap();

    let mut newest_first = all.to_vec();
    newest_first.sort_by(|a, b| (b.timestamp, &b.id).cmp(&(a.timestamp, &a.id)));
    let filter = AuditFilter::default();
    let fetch = |req: PageRequest| {
        let filter = &filter;
        async move { store.list_audit(filter, &req).await }
    };
    let pages = all_pages(2, fetch).await;
    assert_eq!(pages.iter().map(Vec::len).collect::<Vec<_>>(), [2, 2, 1]);
    assert_eq!(
        pages.concat(),
        newest_first,
        "no overlap, no gap, newest first"
    );

    let same_instant = |a: &AuditEvent, b: &AuditEvent| {
        if a.id > b.id {
            vec![a.clone(), b.clone()]
        } else {
            vec![b.clone(), a.clone()]
        }
    };
    assert_eq!(
        audit_of(store, about("key_aaaaaaaa")).await,
        [e5.clone(), e2.clone(), e1.clone()]
    );
    let registered = AuditFilter {
        event: Some(EventKind::KeyRegistered),
        ..AuditFilter::default()
    };
    assert_eq!(audit_of(store, registered).await, [e3.clone(), e1.clone()]);
    let since = AuditFilter {
        since: Some(t(2_000)),
        ..AuditFilter::default()
    };
    let mut expected = vec![e5.clone(), e4.clone()];
    expected.extend(same_instant(&e2, &e3));
    assert_eq!(audit_of(store, since).await, expected, "since is inclusive");
    let until = AuditFilter {
        until: Some(t(2_000)),
        ..AuditFilter::default()
    };
    let mut expected = same_instant(&e2, &e3);
    expected.push(e1);
    assert_eq!(audit_of(store, until).await, expected, "until is inclusive");
    let window = AuditFilter {
        since: Some(t(2_000)),
        until: Some(t(3_000)),
        ..AuditFilter::default()
    };
    let mut expected = vec![e4];
    expected.extend(same_instant(&e2, &e3));
    assert_eq!(audit_of(store, window).await, expected);
}

/// Events are shown in milliseconds but stored in microseconds: a bound
/// copied from a shown timestamp takes in its whole millisecond.
async fn audit_bounds_take_in_whole_milliseconds(store: &dyn Store) {
    let at = |micros: i64| DateTime::from_timestamp_micros(micros).unwrap();
    // The millisecond ...123, its neighbours, and its first and last
    // microseconds.
    let ms = 1_800_000_000_123_000;
    let before = event(EventKind::AuthFailed, "/admin/v1/keys", at(ms - 1));
    let first = event(EventKind::AuthFailed, "/admin/v1/keys", at(ms));
    let inside = event(EventKind::AuthFailed, "/admin/v1/keys", at(ms + 457));
    let last = event(EventKind::AuthFailed, "/admin/v1/keys", at(ms + 999));
    let after = event(EventKind::AuthFailed, "/admin/v1/keys", at(ms + 1_000));
    store
        .append_audit(&[
            before.clone(),
            first.clone(),
            inside.clone(),
            last.clone(),
            after.clone(),
        ])
        .await
        .unwrap();
    let listed = |since: Option<i64>, until: Option<i64>| {
        let filter = AuditFilter {
            since: since.map(at),
            until: until.map(at),
            ..AuditFilter::default()
        };
        async move { audit_of(store, filter).await }
    };

    // `inside` as the API shows it: ...123 (its 457 microseconds cut off).
    let shown = serde_json::to_value(&inside).unwrap()["timestamp"]
        .as_str()
        .unwrap()
        .to_owned();
    let shown = DateTime::parse_from_rfc3339(&shown)
        .unwrap()
        .timestamp_micros();
    assert_eq!(shown, ms);
    let millisecond = vec![last.clone(), inside.clone(), first.clone()];
    assert_eq!(
        listed(Some(shown), Some(shown)).await,
        millisecond,
        "since and until both at the shown timestamp: its whole millisecond"
    );
    assert_eq!(
        listed(None, Some(shown)).await,
        [millisecond.clone(), vec![before]].concat(),
        "until takes in the rest of its millisecond"
    );
    assert_eq!(
        listed(Some(ms + 999), None).await,
        [vec![after], millisecond.clone()].concat(),
        "since takes in the start of its millisecond"
    );
    assert_eq!(
        listed(Some(ms + 500), Some(ms + 200)).await,
        millisecond,
        "bounds inside one millisecond name that millisecond"
    );
}

async fn append_audit_is_idempotent(store: &dyn Store) {
    let e1 = event(EventKind::AuthFailed, "/admin/v1/keys", t(1));
    let e2 = event(EventKind::AuthFailed, "/admin/v1/keys", t(2));
    store.append_audit(std::slice::from_ref(&e1)).await.unwrap();
    store.append_audit(&[e1.clone(), e2.clone()]).await.unwrap();
    store.append_audit(&[e2.clone(), e1.clone()]).await.unwrap();
    store.append_audit(&[]).await.unwrap();
    assert_eq!(audit_of(store, AuditFilter::default()).await, [e2, e1]);
}

async fn reseal_skips_erased_keys(store: &dyn Store) {
    let live = key("openai", "hash-live", t(0));
    let gone = key("openai", "hash-gone", t(1));
    insert(store, &live).await;
    insert(store, &gone).await;
    let gone = erased(&gone);
    store
        .update_key(&gone, &event(EventKind::KeyDeleted, gone.id.as_str(), t(2)))
        .await
        .unwrap();

    let resealed = |k: &KeyRecord| Resealed {
        id: k.id.clone(),
        sealed: SealedMaterial::from_token(format!("gAAAAA-resealed-{}", k.id)),
        material_hash: format!("hash-new-{}", k.id),
    };
    let rotated = event(EventKind::EncryptionRotated, "encryption", t(3));
    let count = store
        .reseal_keys(&[resealed(&live), resealed(&gone)], &rotated)
        .await
        .unwrap();
    assert_eq!(count, 1);

    let now_live = store.get_key(&live.id).await.unwrap().unwrap();
    let expected = KeyRecord {
        sealed: Some(resealed(&live).sealed),
        material_hash: Some(resealed(&live).material_hash),
        revision: live.revision + 1,
        ..live.clone()
    };
    assert_eq!(now_live, expected);
    assert_eq!(store.get_key(&gone.id).await.unwrap(), Some(gone.clone()));

    // A write based on a read from before the rotation would restore the old
    // token, so it is stale.
    let outdated = next(&live);
    let e = event(EventKind::KeyUpdated, live.id.as_str(), t(4));
    let outcome = store.update_key(&outdated, &e).await;
    assert!(matches!(outcome, Err(StoreError::Stale)), "{outcome:?}");

    // A rotation that changed nothing is still recorded.
    let again = event(EventKind::EncryptionRotated, "encryption", t(5));
    assert_eq!(
        store.reseal_keys(&[resealed(&gone)], &again).await.unwrap(),
        0
    );
    assert_eq!(audit_of(store, about("encryption")).await, [again, rotated]);
}

async fn count_keys_per_provider_and_state(store: &dyn Store) {
    let with = |status, provider, hash, at| KeyRecord {
        status,
        ..key(provider, hash, t(at))
    };
    let cooling = KeyStatus::CoolingDown {
        until: t(60_000_000),
    };
    for k in [
        with(KeyStatus::Active, "openai", "h1", 0),
        with(KeyStatus::Active, "openai", "h2", 1),
        with(KeyStatus::Revoked, "openai", "h3", 2),
        with(cooling, "anthropic", "h4", 3),
    ] {
        insert(store, &k).await;
    }
    let mut counts = store.count_keys().await.unwrap();
    counts.sort_by(|a, b| (&a.provider_id, a.state).cmp(&(&b.provider_id, b.state)));
    let count = |provider: &str, state, count| StateCount {
        provider_id: provider.into(),
        state,
        count,
    };
    assert_eq!(
        counts,
        [
            count("anthropic", KeyState::CoolingDown, 1),
            count("openai", KeyState::Active, 2),
            count("openai", KeyState::Revoked, 1),
        ]
    );
}

async fn prune_audit_deletes_older_events(store: &dyn Store) {
    let events: Vec<_> = (1..=5)
        .map(|i| event(EventKind::AuthFailed, "/admin/v1/keys", t(i * 1_000)))
        .collect();
    store.append_audit(&events).await.unwrap();
    assert_eq!(store.prune_audit(t(3_000)).await.unwrap(), 2);
    assert_eq!(store.prune_audit(t(3_000)).await.unwrap(), 0);
    let left = audit_of(store, AuditFilter::default()).await;
    assert_eq!(
        left,
        [events[4].clone(), events[3].clone(), events[2].clone()]
    );
}

// ------------------------------------------------------------------ runners

async fn open_sqlite(path: &Path) -> SqliteStore {
    SqliteStore::open(path).await.unwrap()
}

/// A MongoDB database of its own, or `None` (after saying so) when no server
/// is configured.
struct MongoDb {
    uri: String,
    name: String,
    store: MongoStore,
}

impl MongoDb {
    async fn create() -> Option<Self> {
        let Ok(uri) = std::env::var(MONGODB_URI_VAR) else {
            println!("skipped: {MONGODB_URI_VAR} is not set");
            return None;
        };
        let name = format!("keyrouter_test_{}", random_token(12));
        let store = MongoStore::connect(&Secret::new(uri.clone()), &name, 90)
            .await
            .unwrap();
        Some(MongoDb { uri, name, store })
    }

    async fn drop(self) {
        let client = mongodb::Client::with_uri_str(&self.uri).await.unwrap();
        client.database(&self.name).drop().await.unwrap();
    }
}

macro_rules! contract {
    ($($scenario:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let dir = tempfile::tempdir().unwrap();
                    let store = super::open_sqlite(&dir.path().join("keyrouter.db")).await;
                    super::$scenario(&store).await;
                }
            )*
        }

        mod mongo {
            $(
                #[tokio::test]
                async fn $scenario() {
                    let Some(db) = super::MongoDb::create().await else { return };
                    super::$scenario(&db.store).await;
                    db.drop().await;
                }
            )*
        }
    };
}

contract!(
    round_trip,
    duplicate_material,
    insert_records_its_event,
    update_checks_the_revision,
    erased_material_can_be_registered_again,
    list_keys_pages,
    list_keys_filters,
    list_audit_pages_and_filters,
    audit_bounds_take_in_whole_milliseconds,
    append_audit_is_idempotent,
    reseal_skips_erased_keys,
    count_keys_per_provider_and_state,
    prune_audit_deletes_older_events,
);

// ----------------------------------------------------------- SQLite only

#[tokio::test]
async fn sqlite_reopened_file_keeps_keys_and_audit() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("keyrouter.db");
    let k = key("openai", "hash-a", t(0));
    let registered = {
        let store = open_sqlite(&path).await;
        insert(&store, &k).await
    };
    let store = open_sqlite(&path).await;
    assert_eq!(store.get_key(&k.id).await.unwrap(), Some(k.clone()));
    assert_eq!(audit_of(&store, about(k.id.as_str())).await, [registered]);

    let conn = rusqlite::Connection::open(&path).unwrap();
    let mode: String = conn
        .query_row("PRAGMA journal_mode", [], |r| r.get(0))
        .unwrap();
    let version: i64 = conn
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .unwrap();
    assert_eq!((mode.as_str(), version), ("wal", 1));
}

#[tokio::test]
async fn sqlite_file_never_holds_plaintext_material() {
    let dir = TempDir::new().unwrap();
    // A directory that does not exist yet is created.
    let path = dir.path().join("nested/data/keyrouter.db");
    let store = open_sqlite(&path).await;

    let plaintext = "sk-plaintext-must-not-appear-123";
    let vault = Vault::new(&[Secret::new(Vault::generate_key())]).unwrap();
    let material = Secret::new(plaintext.into());
    let k = KeyRecord {
        sealed: Some(vault.seal(&material)),
        material_hash: Some(vault.material_hash(&material)),
        ..key("openai", "unused", t(0))
    };
    store
        .insert_key(
            &k,
            &vault.material_hashes(&material),
            &event(EventKind::KeyRegistered, k.id.as_str(), t(0)),
        )
        .await
        .unwrap();

    // Read while the store is open, so the WAL still holds the write.
    let mut bytes = std::fs::read(&path).unwrap();
    bytes.extend(std::fs::read(path.with_extension("db-wal")).unwrap_or_default());
    let contains = |needle: &str| bytes.windows(needle.len()).any(|w| w == needle.as_bytes());
    let token = k.sealed.as_ref().unwrap().token();
    assert!(contains(token), "the files read are the ones written");
    assert!(
        !contains(plaintext),
        "plaintext material reached the database file"
    );
}

#[tokio::test]
async fn sqlite_handles_share_one_file() {
    let dir = TempDir::new().unwrap();
    let path = dir.path().join("keyrouter.db");
    // Two connections contend for the write lock like two processes do.
    let (a, b) = (open_sqlite(&path).await, open_sqlite(&path).await);
    let writes = (0..20).map(|i| {
        let store = if i % 2 == 0 { &a } else { &b };
        async move { insert(store, &key("openai", &format!("hash-{i}"), t(i))).await }
    });
    futures_util::future::join_all(writes).await;
    assert_eq!(a.all_keys().await.unwrap().len(), 20);
    assert_eq!(b.count_keys().await.unwrap()[0].count, 20);
}

#[cfg(unix)]
#[tokio::test]
async fn sqlite_files_are_owner_only() {
    use std::os::unix::fs::PermissionsExt;
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    let path = data.join("keyrouter.db");
    let store = open_sqlite(&path).await;
    insert(&store, &key("openai", "hash-perm", t(1))).await;
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    for file in ["keyrouter.db", "keyrouter.db-wal"] {
        assert_eq!(mode(&data.join(file)), 0o600, "{file}");
    }
}
