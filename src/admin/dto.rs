//! The management API's JSON and query strings: request bodies with their
//! validation, query parameters, and the response shapes.
//!
//! A 400 names the offending field and states its rule, never its value.
//! serde's own messages quote values (a mistyped `key_material` would come
//! straight back), so they are only inspected, never forwarded: the error's
//! path (`serde_path_to_error`) picks the [`Field`] whose rule becomes the
//! message. `key_material` deserializes directly into a [`Secret`], and the
//! raw body is held in a buffer that is zeroed when dropped.

use crate::config::ProviderConfig;
use crate::error::GatewayError;
use crate::http::{ReadBodyError, read_limited};
use crate::keys::{KeyId, KeyRecord, KeyState, Limits};
use crate::secret::Secret;
use crate::store::{Cursor, PageRequest, StateCount};
use bytes::Bytes;
use chrono::{DateTime, SecondsFormat, Utc};
use http::StatusCode;
use serde::de::value::MapAccessDeserializer;
use serde::de::{DeserializeOwned, Error as _, MapAccess, Visitor};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_path_to_error::Segment;
use std::collections::BTreeMap;
use std::fmt;
use std::marker::PhantomData;
use std::time::Duration;
use zeroize::Zeroizing;

/// Largest request body accepted (contract: larger is a 400).
pub const MAX_BODY_BYTES: usize = 64 * 1024;

/// A body field or query parameter with its rule: the text of every 400
/// about it, so a message can never carry the value that broke the rule.
#[derive(Debug)]
pub struct Field {
    pub name: &'static str,
    rule: &'static str,
}

impl Field {
    pub fn error(&self) -> GatewayError {
        GatewayError::invalid(format!("{}: {}", self.name, self.rule))
    }

    fn check(&self, ok: bool) -> Result<(), GatewayError> {
        if ok { Ok(()) } else { Err(self.error()) }
    }
}

const fn field(name: &'static str, rule: &'static str) -> Field {
    Field { name, rule }
}

// Body fields. The numeric maxima sit next to the rules that state them.
pub const KEY_MATERIAL: Field = field(
    "key_material",
    "must be 10 to 200 printable ASCII characters without whitespace",
);
const MATERIAL_LEN: std::ops::RangeInclusive<usize> = 10..=200;
pub const PROVIDER_ID: Field = field("provider_id", "must be the id of a configured provider");
pub const LABEL: Field = field(
    "label",
    "must be 1 to 64 characters without control characters",
);
const MAX_LABEL_CHARS: usize = 64;
pub const LIMITS: Field = field(
    "limits",
    "must be an object with the optional fields rpm, tpm and max_concurrent",
);
pub const RPM: Field = field("limits.rpm", "must be an integer from 1 to 1000000");
const MAX_RPM: u32 = 1_000_000;
pub const TPM: Field = field("limits.tpm", "must be an integer from 1 to 1000000000");
const MAX_TPM: u32 = 1_000_000_000;
pub const MAX_CONCURRENT: Field = field(
    "limits.max_concurrent",
    "must be an integer from 1 to 100000",
);
const MAX_MAX_CONCURRENT: u32 = 100_000;
pub const WEIGHT: Field = field("weight", "must be an integer from 1 to 1000");
const WEIGHTS: std::ops::RangeInclusive<u32> = 1..=1000;
const DEFAULT_WEIGHT: u32 = 1;
pub const METADATA: Field = field("metadata", "must be an object of string values");
pub const METADATA_SIZE: Field = field("metadata", "at most 16 entries");
const MAX_METADATA_ENTRIES: usize = 16;
pub const METADATA_KEY: Field = field("metadata", "keys must match ^[a-z0-9_]{1,32}$");
const MAX_METADATA_KEY_CHARS: usize = 32;
pub const METADATA_VALUE: Field = field("metadata", "values must be at most 256 characters");
const MAX_METADATA_VALUE_CHARS: usize = 256;
pub const REASON: Field = field(
    "reason",
    "must be 1 to 256 characters without control characters",
);
const MAX_REASON_CHARS: usize = 256;

/// Where a serde error is looked up by its path.
const BODY_FIELDS: [&Field; 10] = [
    &KEY_MATERIAL,
    &PROVIDER_ID,
    &LABEL,
    &LIMITS,
    &RPM,
    &TPM,
    &MAX_CONCURRENT,
    &WEIGHT,
    &METADATA,
    &REASON,
];

// Query parameters.
pub const PROVIDER_FILTER: Field = field("provider_id", "must match ^[a-z0-9_]{1,32}$");
pub const STATE: Field = field(
    "state",
    "must be one of active, cooling_down, exhausted, invalid, revoked",
);
pub const RESOURCE: Field = field("resource", "must be 1 to 64 characters");
const MAX_RESOURCE_CHARS: usize = 64;
pub const EVENT: Field = field(
    "event",
    "must be one of key_registered, key_updated, key_revoked, key_deleted, key_reactivated, key_state_changed, encryption_rotated, auth_failed",
);
pub const SINCE: Field = field(
    "since",
    "must be an RFC 3339 timestamp such as 2026-11-23T10:30:00Z",
);
pub const UNTIL: Field = field(
    "until",
    "must be an RFC 3339 timestamp such as 2026-11-23T10:30:00Z",
);
pub const LIMIT: Field = field("limit", "must be an integer from 1 to 200");
const MAX_PAGE: u32 = 200;
const DEFAULT_PAGE: u32 = 50;
pub const CURSOR: Field = field("cursor", "must be a next_cursor value returned by this API");

// === Request bodies ===

/// Reads a request body of at most [`MAX_BODY_BYTES`], all of it within
/// `within` (`server.body_read_timeout`: a client trickling its body must
/// not hold a connection and its buffer for ever), into a buffer that is
/// zeroed when dropped: a registration body holds key material. (hyper's own
/// read buffers are beyond reach; this keeps at least our copy from lingering.)
pub async fn read_body<B>(body: B, within: Duration) -> Result<Zeroizing<Vec<u8>>, GatewayError>
where
    B: http_body::Body<Data = Bytes>,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    match tokio::time::timeout(within, read_limited(body, MAX_BODY_BYTES)).await {
        // Reuses the allocation when the buffer is not shared.
        Ok(Ok(bytes)) => Ok(Zeroizing::new(Vec::from(bytes))),
        Ok(Err(ReadBodyError::TooLarge)) => Err(GatewayError::invalid(
            "request body: must be at most 65536 bytes",
        )
        .closing_connection()),
        Ok(Err(ReadBodyError::Broken(_))) => {
            Err(GatewayError::invalid("request body: could not be read").closing_connection())
        }
        Err(_) => Err(
            GatewayError::invalid("request body: did not arrive in time")
                .with_status(StatusCode::REQUEST_TIMEOUT)
                .closing_connection(),
        ),
    }
}

/// `POST /keys`, validated.
pub struct NewKey {
    pub material: Secret,
    pub provider_id: String,
    pub label: Option<String>,
    pub limits: Limits,
    pub weight: u32,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKeyBody {
    key_material: Secret,
    provider_id: String,
    label: Option<String>,
    limits: Option<Object<Limits>>,
    weight: Option<u32>,
    metadata: Option<Metadata>,
}

/// Parses and validates a registration; `is_provider` says whether an id
/// names a configured provider.
pub fn new_key(body: &[u8], is_provider: impl Fn(&str) -> bool) -> Result<NewKey, GatewayError> {
    let b: CreateKeyBody = decode(body)?;
    KEY_MATERIAL.check(material_ok(&b.key_material))?;
    PROVIDER_ID.check(is_provider(&b.provider_id))?;
    if let Some(label) = &b.label {
        check_label(label)?;
    }
    let limits = b.limits.map(|o| o.0).unwrap_or_default();
    check_limits(&limits)?;
    let weight = b.weight.unwrap_or(DEFAULT_WEIGHT);
    WEIGHT.check(WEIGHTS.contains(&weight))?;
    let metadata = b.metadata.map(|m| m.0).unwrap_or_default();
    check_metadata(&metadata)?;
    Ok(NewKey {
        material: b.key_material,
        provider_id: b.provider_id,
        label: b.label,
        limits,
        weight,
        metadata,
    })
}

/// `PATCH /keys/{id}`, validated: what to change. `limits` and `metadata`
/// replace the whole object; `"label": null` removes the label.
#[derive(Debug, PartialEq)]
pub struct KeyChanges {
    label: Option<Option<String>>,
    limits: Option<Limits>,
    weight: Option<u32>,
    metadata: Option<BTreeMap<String, String>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpdateKeyBody {
    #[serde(default, deserialize_with = "present")]
    label: Option<Option<String>>,
    limits: Option<Object<Limits>>,
    weight: Option<u32>,
    metadata: Option<Metadata>,
}

/// Tells an explicit `null` (`Some(None)`) from an absent field (`None`).
fn present<'de, D: Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

pub fn key_changes(body: &[u8]) -> Result<KeyChanges, GatewayError> {
    let b: UpdateKeyBody = decode(body)?;
    if let Some(Some(label)) = &b.label {
        check_label(label)?;
    }
    let limits = b.limits.map(|o| o.0);
    if let Some(limits) = &limits {
        check_limits(limits)?;
    }
    if let Some(weight) = b.weight {
        WEIGHT.check(WEIGHTS.contains(&weight))?;
    }
    let metadata = b.metadata.map(|m| m.0);
    if let Some(metadata) = &metadata {
        check_metadata(metadata)?;
    }
    let changes = KeyChanges {
        label: b.label,
        limits,
        weight: b.weight,
        metadata,
    };
    if changes.fields().is_empty() {
        return Err(GatewayError::invalid(
            "request body: must set at least one of label, limits, weight, metadata",
        ));
    }
    Ok(changes)
}

impl KeyChanges {
    pub fn apply(&self, key: &mut KeyRecord) {
        if let Some(label) = &self.label {
            key.label.clone_from(label);
        }
        if let Some(limits) = self.limits {
            key.limits = limits;
        }
        if let Some(weight) = self.weight {
            key.weight = weight;
        }
        if let Some(metadata) = &self.metadata {
            key.metadata.clone_from(metadata);
        }
    }

    /// The names of the fields this change sets, for the audit reason.
    pub fn fields(&self) -> Vec<&'static str> {
        [
            (self.label.is_some(), "label"),
            (self.limits.is_some(), "limits"),
            (self.weight.is_some(), "weight"),
            (self.metadata.is_some(), "metadata"),
        ]
        .into_iter()
        .filter_map(|(set, name)| set.then_some(name))
        .collect()
    }
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RevokeBody {
    reason: Option<String>,
}

/// `POST /keys/{id}/revoke`: the operator's reason, if any. The body may be
/// empty.
pub fn revoke_reason(body: &[u8]) -> Result<Option<String>, GatewayError> {
    let b: RevokeBody = decode_optional(body)?;
    if let Some(reason) = &b.reason {
        REASON.check(
            !reason.is_empty()
                && reason.chars().count() <= MAX_REASON_CHARS
                && !reason.chars().any(char::is_control),
        )?;
    }
    Ok(b.reason)
}

#[derive(Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct NoFields {}

/// Routes that take no input accept an empty body or `{}`, nothing else.
pub fn no_fields(body: &[u8]) -> Result<(), GatewayError> {
    decode_optional::<NoFields>(body).map(|_| ())
}

/// Every byte printable ASCII, no space: what provider keys look like, and
/// nothing that could split a header when the key is injected upstream.
fn material_ok(material: &Secret) -> bool {
    // Validation must look at the plaintext; nothing is kept or printed.
    let m = material.expose();
    MATERIAL_LEN.contains(&m.len()) && m.bytes().all(|b| (0x21..=0x7e).contains(&b))
}

fn check_label(label: &str) -> Result<(), GatewayError> {
    LABEL.check(
        !label.is_empty()
            && label.chars().count() <= MAX_LABEL_CHARS
            && !label.chars().any(char::is_control),
    )
}

fn check_limits(limits: &Limits) -> Result<(), GatewayError> {
    let within = |value: Option<u32>, max: u32| value.is_none_or(|v| (1..=max).contains(&v));
    RPM.check(within(limits.rpm, MAX_RPM))?;
    TPM.check(within(limits.tpm, MAX_TPM))?;
    MAX_CONCURRENT.check(within(limits.max_concurrent, MAX_MAX_CONCURRENT))
}

fn check_metadata(metadata: &BTreeMap<String, String>) -> Result<(), GatewayError> {
    METADATA_SIZE.check(metadata.len() <= MAX_METADATA_ENTRIES)?;
    METADATA_KEY.check(metadata.keys().all(|k| is_name(k, MAX_METADATA_KEY_CHARS)))?;
    METADATA_VALUE.check(
        metadata
            .values()
            .all(|v| v.chars().count() <= MAX_METADATA_VALUE_CHARS),
    )
}

/// `^[a-z0-9_]{1,max}$`.
fn is_name(s: &str, max: usize) -> bool {
    (1..=max).contains(&s.len())
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
}

/// A value that must be a JSON object. serde's derived structs also accept
/// arrays (fields by position); the API does not.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct ObjectVisitor<T>(PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for ObjectVisitor<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Object<T>, A::Error> {
                T::deserialize(MapAccessDeserializer::new(map)).map(Object)
            }
        }
        d.deserialize_map(ObjectVisitor(PhantomData))
    }
}

/// The `metadata` object, each key given once. A map alone keeps the last of
/// repeated keys without a word (and 17 pairs with one repeat would pass the
/// 16-entry cap); repeated body fields and `limits` fields are refused with
/// serde's `duplicate field` error, and so is a repeated key here.
struct Metadata(BTreeMap<String, String>);

impl<'de> Deserialize<'de> for Metadata {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct MetadataVisitor;
        impl<'de> Visitor<'de> for MetadataVisitor {
            type Value = Metadata;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object of string values")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Metadata, A::Error> {
                let mut entries = BTreeMap::new();
                while let Some(key) = map.next_key::<String>()? {
                    if entries.contains_key(&key) {
                        // Worded as serde's own, for `decode_error`.
                        return Err(A::Error::custom(format_args!("duplicate field `{key}`")));
                    }
                    let value = map.next_value()?;
                    entries.insert(key, value);
                }
                Ok(Metadata(entries))
            }
        }
        d.deserialize_map(MetadataVisitor)
    }
}

/// Parses a JSON object body; errors name the field, never a value.
fn decode<T: DeserializeOwned>(body: &[u8]) -> Result<T, GatewayError> {
    let mut de = serde_json::Deserializer::from_slice(body);
    let Object(value) = serde_path_to_error::deserialize(&mut de).map_err(|e| decode_error(&e))?;
    de.end()
        .map_err(|_| GatewayError::invalid("request body: must be one JSON object"))?;
    Ok(value)
}

/// Like [`decode`], but an empty body means "all defaults".
fn decode_optional<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, GatewayError> {
    if body.trim_ascii().is_empty() {
        Ok(T::default())
    } else {
        decode(body)
    }
}

fn decode_error(e: &serde_path_to_error::Error<serde_json::Error>) -> GatewayError {
    if e.inner().classify() != serde_json::error::Category::Data {
        return GatewayError::invalid("request body: must be a valid JSON object");
    }
    // Inspected for its kind only; it may quote the value, so it never leaves.
    let serde_message = e.inner().to_string();
    let path: Vec<&str> = e
        .path()
        .iter()
        .map(|s| match s {
            Segment::Map { key } => key.as_str(),
            _ => "",
        })
        .collect();
    if serde_message.starts_with("unknown field") {
        // The path ends with the unknown field's own name.
        let (unknown, parent) = path.split_last().unwrap_or((&"", &[]));
        let at = known_field(parent).map_or(String::new(), |f| format!("{}: ", f.name));
        return GatewayError::invalid(if is_name(unknown, 64) {
            format!("{at}unknown field `{unknown}`")
        } else {
            format!("{at}unknown field")
        });
    }
    for (prefix, problem) in [
        ("missing field", "is required"),
        ("duplicate field", "given more than once"),
    ] {
        if let Some(name) = quoted_after(&serde_message, prefix) {
            let full: Vec<&str> = path.iter().copied().chain([name]).collect();
            match known_field(&full) {
                Some(f) if f.name == full.join(".") => {
                    return GatewayError::invalid(format!("{}: {problem}", f.name));
                }
                // A key inside `metadata`, the one object whose keys are the
                // operator's: named only when it is a valid key.
                Some(f) if is_name(name, MAX_METADATA_KEY_CHARS) => {
                    return GatewayError::invalid(format!("{}.{name}: {problem}", f.name));
                }
                Some(_) => return METADATA_KEY.error(),
                None => {}
            }
        }
    }
    match known_field(&path) {
        Some(f) => f.error(),
        None => {
            GatewayError::invalid("request body: must be a JSON object with the documented fields")
        }
    }
}

/// The known field at `path` or, failing that, at its longest known prefix
/// (`metadata.<key>` is `metadata`).
fn known_field(path: &[&str]) -> Option<&'static Field> {
    (1..=path.len()).rev().find_map(|n| {
        let name = path[..n].join(".");
        BODY_FIELDS.into_iter().find(|f| f.name == name)
    })
}

/// The name in backquotes after `prefix` in a serde message.
fn quoted_after<'m>(message: &'m str, prefix: &str) -> Option<&'m str> {
    let rest = message.strip_prefix(prefix)?.trim_start();
    rest.strip_prefix('`')?.split('`').next()
}

// === Query strings ===

/// A route's query parameters: only those it names, each at most once.
/// Empty values (`?state=`) count as not given.
#[derive(Default)]
pub struct Query {
    params: Vec<(&'static str, String)>,
}

impl Query {
    pub fn parse(raw: Option<&str>, allowed: &[&'static Field]) -> Result<Self, GatewayError> {
        let mut params: Vec<(&'static str, String)> = Vec::new();
        for pair in raw.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
            let (name, value) = pair.split_once('=').unwrap_or((pair, ""));
            let malformed = || GatewayError::invalid("query string: malformed percent-encoding");
            let name = percent_decode(name).ok_or_else(malformed)?;
            let Some(field) = allowed.iter().find(|f| f.name == name) else {
                return Err(GatewayError::invalid(if is_name(&name, 64) {
                    format!("unknown query parameter `{name}`")
                } else {
                    "unknown query parameter".to_owned()
                }));
            };
            if params.iter().any(|(n, _)| *n == field.name) {
                return Err(GatewayError::invalid(format!(
                    "{}: given more than once",
                    field.name
                )));
            }
            let value = percent_decode(value).ok_or_else(|| field.error())?;
            params.push((field.name, value));
        }
        Ok(Query { params })
    }

    /// The parameter run through `parse`; `None` when not given, the field's
    /// 400 when `parse` refuses it.
    pub fn parsed<T>(
        &self,
        field: &Field,
        parse: impl FnOnce(&str) -> Option<T>,
    ) -> Result<Option<T>, GatewayError> {
        match self
            .params
            .iter()
            .find(|(n, v)| *n == field.name && !v.is_empty())
        {
            None => Ok(None),
            Some((_, v)) => parse(v).map(Some).ok_or_else(|| field.error()),
        }
    }

    /// `limit` and `cursor`, shared by every listing.
    pub fn page(&self) -> Result<PageRequest, GatewayError> {
        let limit = self
            .parsed(&LIMIT, |s| {
                s.parse::<u32>().ok().filter(|n| (1..=MAX_PAGE).contains(n))
            })?
            .unwrap_or(DEFAULT_PAGE);
        let cursor = self.parsed(&CURSOR, Cursor::decode)?;
        Ok(PageRequest { limit, cursor })
    }
}

/// The `provider_id` filter of the key listing.
pub fn provider_filter(s: &str) -> Option<String> {
    is_name(s, 32).then(|| s.to_owned())
}

/// The `resource` filter of the audit listing.
pub fn resource_filter(s: &str) -> Option<String> {
    (s.chars().count() <= MAX_RESOURCE_CHARS).then(|| s.to_owned())
}

/// RFC 3339 with any offset, as UTC.
pub fn timestamp(s: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&Utc))
}

/// `%XX` escapes to bytes, then UTF-8. `+` stays a plus sign (RFC 3986, not
/// form encoding), so `since=...+02:00` works unescaped.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes.get(i + 1..i + 3)?;
            let digit = |b: u8| (b as char).to_digit(16);
            out.push((digit(hex[0])? * 16 + digit(hex[1])?) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

// === Responses ===

/// The contract's key object. Material, its token and its hash have no field
/// here, so no route can return them.
#[derive(Serialize)]
pub struct KeyView<'a> {
    id: &'a KeyId,
    provider_id: &'a str,
    label: Option<&'a str>,
    state: KeyState,
    state_reason: Option<&'a str>,
    cooldown_until: Option<String>,
    limits: Limits,
    weight: u32,
    fingerprint: &'a str,
    metadata: &'a BTreeMap<String, String>,
    created_at: String,
    updated_at: String,
    state_changed_at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

impl<'a> KeyView<'a> {
    pub fn new(key: &'a KeyRecord) -> Self {
        KeyView {
            id: &key.id,
            provider_id: &key.provider_id,
            label: key.label.as_deref(),
            state: key.status.state(),
            state_reason: key.state_reason.as_deref(),
            cooldown_until: key.status.cooldown_until().as_ref().map(seconds),
            limits: key.limits,
            weight: key.weight,
            fingerprint: &key.fingerprint,
            metadata: &key.metadata,
            created_at: seconds(&key.created_at),
            updated_at: seconds(&key.updated_at),
            state_changed_at: seconds(&key.state_changed_at),
            usage: None,
        }
    }

    /// Adds the live counters (`GET /keys/{id}` only).
    pub fn with_usage(mut self, usage: Usage) -> Self {
        self.usage = Some(usage);
        self
    }
}

/// A key's live counters on this replica.
#[derive(Debug, Default, Serialize)]
pub struct Usage {
    pub requests_last_minute: u64,
    pub tokens_last_minute: u64,
    pub in_flight: u64,
}

/// `YYYY-MM-DDTHH:MM:SSZ` (contract: seconds, UTC).
fn seconds(t: &DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// One page of a listing: `{"<items>": [...], "next_cursor": "..." | null}`.
pub struct PageView<'a, T> {
    pub items_name: &'static str,
    pub items: &'a [T],
    pub next: Option<&'a Cursor>,
}

impl<T: Serialize> Serialize for PageView<'_, T> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(Some(2))?;
        map.serialize_entry(self.items_name, self.items)?;
        map.serialize_entry("next_cursor", &self.next.map(Cursor::encode))?;
        map.end()
    }
}

/// `GET /providers`: every configured provider with its key counts.
#[derive(Serialize)]
pub struct ProvidersView<'a> {
    providers: Vec<ProviderView<'a>>,
}

/// One provider: no base URL, nothing secret.
#[derive(Serialize)]
struct ProviderView<'a> {
    id: &'a str,
    kind: &'static str,
    route_prefix: &'a str,
    default: bool,
    keys: BTreeMap<&'static str, u64>,
}

impl<'a> ProvidersView<'a> {
    pub fn new(providers: &'a [ProviderConfig], counts: &[StateCount]) -> Self {
        let providers = providers
            .iter()
            .map(|p| ProviderView {
                id: &p.id,
                kind: p.kind.as_str(),
                route_prefix: &p.route_prefix,
                default: p.default,
                keys: KeyState::ALL
                    .into_iter()
                    .map(|state| {
                        let n = counts
                            .iter()
                            .filter(|c| c.provider_id == p.id && c.state == state)
                            .map(|c| c.count)
                            .sum::<u64>();
                        (state.as_str(), n)
                    })
                    .collect(),
            })
            .collect();
        ProvidersView { providers }
    }
}

/// `POST /encryption/rotate`.
#[derive(Serialize)]
pub struct Rotated {
    pub reencrypted: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    const MATERIAL: &str = "sk-UNIT-distinctive-0123456789";

    fn providers(id: &str) -> bool {
        id == "openai"
    }

    fn create(body: &str) -> Result<NewKey, GatewayError> {
        new_key(body.as_bytes(), providers)
    }

    /// The 400 message, checked never to contain `value`.
    fn rejected(result: Result<impl Sized, GatewayError>, value: &str) -> String {
        let Err(e) = result else { panic!("accepted") };
        assert_eq!(
            (e.status.as_u16(), e.kind.as_str()),
            (400, "invalid_request")
        );
        assert!(
            !value.is_empty() && !e.message.contains(value),
            "{}",
            e.message
        );
        e.message.into_owned()
    }

    #[test]
    fn full_registration_is_accepted() {
        let k = create(&format!(
            r#"{{"key_material":"{MATERIAL}","provider_id":"openai","label":"team-a production",
               "limits":{{"rpm":500,"tpm":200000,"max_concurrent":50}},"weight":3,"metadata":{{"owner":"team-a"}}}}"#
        ))
        .unwrap();
        assert_eq!(k.material.expose(), MATERIAL);
        assert_eq!(
            k.limits,
            Limits {
                rpm: Some(500),
                tpm: Some(200_000),
                max_concurrent: Some(50)
            }
        );
        assert_eq!(
            (k.weight, k.label.as_deref()),
            (3, Some("team-a production"))
        );
        let minimal = create(&format!(
            r#"{{"key_material":"{MATERIAL}","provider_id":"openai"}}"#
        ))
        .unwrap();
        assert_eq!((minimal.weight, minimal.limits), (1, Limits::default()));
    }

    #[test]
    fn material_rules_never_echo_the_material() {
        let secret_like = "sk-SECRET space inside";
        for bad in [
            secret_like,
            "sk-SHORT",
            &"x".repeat(201),
            "sk-ÜNICODE-123456",
            "sk-TAB\\tINSIDE123",
        ] {
            let body = format!(r#"{{"key_material":"{bad}","provider_id":"openai"}}"#);
            let msg = rejected(create(&body), bad.split(' ').next().unwrap());
            assert_eq!(
                msg,
                "key_material: must be 10 to 200 printable ASCII characters without whitespace"
            );
        }
        // Wrong type: serde would quote the number; the message does not.
        let msg = rejected(
            create(r#"{"key_material":987654321987,"provider_id":"openai"}"#),
            "987654321987",
        );
        assert!(msg.starts_with("key_material:"), "{msg}");
        let msg = rejected(create(r#"{"provider_id":"openai"}"#), "openai");
        assert_eq!(msg, "key_material: is required");
    }

    #[test]
    fn each_rule_names_its_field() {
        let m = MATERIAL;
        let cases = [
            (
                format!(r#"{{"key_material":"{m}","provider_id":"nosuchprovider"}}"#),
                "nosuchprovider",
                "provider_id:",
            ),
            (
                format!(
                    r#"{{"key_material":"{m}","provider_id":"openai","label":"{}"}}"#,
                    "L".repeat(65)
                ),
                "LLLLLLLL",
                "label:",
            ),
            (
                format!(
                    r#"{{"key_material":"{m}","provider_id":"openai","label":"ctl\u0007char"}}"#
                ),
                "ctl",
                "label:",
            ),
            (
                format!(r#"{{"key_material":"{m}","provider_id":"openai","label":""}}"#),
                "label\":\"\"",
                "label:",
            ),
            (
                format!(r#"{{"key_material":"{m}","provider_id":"openai","limits":{{"rpm":0}}}}"#),
                "rpm\":0",
                "limits.rpm:",
            ),
            (
                format!(
                    r#"{{"key_material":"{m}","provider_id":"openai","limits":{{"rpm":"77777"}}}}"#
                ),
                "77777",
                "limits.rpm:",
            ),
            (
                format!(
                    r#"{{"key_material":"{m}","provider_id":"openai","limits":{{"tpm":4000000000}}}}"#
                ),
                "4000000000",
                "limits.tpm:",
            ),
            (
                format!(
                    r#"{{"key_material":"{m}","provider_id":"openai","limits":{{"max_concurrent":-5}}}}"#
                ),
                "-5",
                "limits.max_concurrent:",
            ),
            (
                format!(r#"{{"key_material":"{m}","provider_id":"openai","limits":[1,2,3]}}"#),
                "[1,2,3]",
                "limits:",
            ),
            (
                format!(r#"{{"key_material":"{m}","provider_id":"openai","limits":{{"rpx":1}}}}"#),
                "rpx\":1",
                "limits: unknown field `rpx`",
            ),
            (
                format!(r#"{{"key_material":"{m}","provider_id":"openai","weight":1001}}"#),
                "1001",
                "weight:",
            ),
            (
                format!(r#"{{"key_material":"{m}","provider_id":"openai","weight":1.5}}"#),
                "1.5",
                "weight:",
            ),
            (
                format!(
                    r#"{{"key_material":"{m}","provider_id":"openai","metadata":{{"BadKey":"v"}}}}"#
                ),
                "BadKey",
                "metadata: keys",
            ),
            (
                format!(
                    r#"{{"key_material":"{m}","provider_id":"openai","metadata":{{"k":"{}"}}}}"#,
                    "V".repeat(257)
                ),
                "VVVVVVVV",
                "metadata: values",
            ),
            (
                format!(
                    r#"{{"key_material":"{m}","provider_id":"openai","metadata":{{"k":424242}}}}"#
                ),
                "424242",
                "metadata:",
            ),
            (
                format!(r#"{{"key_material":"{m}","provider_id":"openai","foo_bar":1}}"#),
                "\":1",
                "unknown field `foo_bar`",
            ),
            (
                format!(r#"{{"key_material":"{m}","provider_id":"openai","Sk-Leaky Name":1}}"#),
                "Leaky",
                "unknown field",
            ),
            (
                format!(r#"{{"key_material":"{m}","provider_id":"openai","weight":2,"weight":3}}"#),
                "\"weight\":3",
                "weight: given more than once",
            ),
            (
                format!(
                    r#"{{"key_material":"{m}","provider_id":"openai","limits":{{"rpm":1,"rpm":7777}}}}"#
                ),
                "7777",
                "limits.rpm: given more than once",
            ),
            (
                format!(
                    r#"{{"key_material":"{m}","provider_id":"openai","metadata":{{"a":"XFIRST","a":"YSECOND"}}}}"#
                ),
                "SECOND",
                "metadata.a: given more than once",
            ),
            (
                format!(
                    r#"{{"key_material":"{m}","provider_id":"openai","metadata":{{"Bad Key":"x","Bad Key":"y"}}}}"#
                ),
                "Bad",
                "metadata: keys must match",
            ),
            (
                format!(
                    r#"{{"key_material":"{m}","provider_id":"openai","metadata":{{"a":"x"}},"metadata":{{}}}}"#
                ),
                "\"a\"",
                "metadata: given more than once",
            ),
        ];
        for (body, value, prefix) in cases {
            let msg = rejected(create(&body), value);
            assert!(msg.starts_with(prefix), "{body} -> {msg}");
            assert!(!msg.contains(MATERIAL), "{msg}");
        }
        let with_metadata = |entries: Vec<String>| {
            format!(
                r#"{{"key_material":"{m}","provider_id":"openai","metadata":{{{}}}}}"#,
                entries.join(",")
            )
        };
        let many = (0..17).map(|i| format!(r#""k{i}":"v""#)).collect();
        assert_eq!(
            rejected(create(&with_metadata(many)), "k16"),
            "metadata: at most 16 entries"
        );
        // Sixteen keys, one of them twice: a repeat, not a 17th entry.
        let repeated = (0..16)
            .map(|i| format!(r#""k{i}":"v""#))
            .chain([r#""k0":"AGAIN""#.to_owned()])
            .collect();
        assert_eq!(
            rejected(create(&with_metadata(repeated)), "AGAIN"),
            "metadata.k0: given more than once"
        );
    }

    #[test]
    fn body_must_be_one_json_object() {
        let m = MATERIAL;
        for body in [
            String::new(),
            "not json".to_owned(),
            format!(r#"["{m}","openai"]"#),
            format!(r#"{{"key_material":"{m}","provider_id":"openai"}} trailing"#),
            format!(r#"{{"key_material":"{m}""#),
        ] {
            let msg = rejected(create(&body), m);
            assert!(msg.starts_with("request body:"), "{body} -> {msg}");
        }
    }

    #[test]
    fn patch_needs_a_field_and_null_label_clears() {
        assert!(
            key_changes(b"{}")
                .unwrap_err()
                .message
                .contains("at least one")
        );
        let c = key_changes(br#"{"label":null}"#).unwrap();
        assert_eq!(c.fields(), ["label"]);
        let mut key = sample_key();
        key.label = Some("old".into());
        c.apply(&mut key);
        assert_eq!(key.label, None);
        let c = key_changes(br#"{"limits":{"rpm":10},"weight":7,"metadata":{}}"#).unwrap();
        assert_eq!(c.fields(), ["limits", "weight", "metadata"]);
        c.apply(&mut key);
        assert_eq!(
            key.limits,
            Limits {
                rpm: Some(10),
                ..Limits::default()
            }
        );
        assert_eq!(key.weight, 7);
        assert!(key.metadata.is_empty());
        let msg = rejected(
            key_changes(br#"{"key_material":"sk-PATCHED-123456789"}"#),
            "sk-PATCHED",
        );
        assert_eq!(msg, "unknown field `key_material`");
        rejected(key_changes(br#"{"weight":0}"#), "\"weight\":0");
        assert_eq!(
            rejected(
                key_changes(br#"{"metadata":{"owner":"a","owner":"BSECOND"}}"#),
                "BSECOND"
            ),
            "metadata.owner: given more than once"
        );
    }

    #[test]
    fn revoke_body_is_optional() {
        assert_eq!(revoke_reason(b"").unwrap(), None);
        assert_eq!(revoke_reason(b"  ").unwrap(), None);
        assert_eq!(revoke_reason(b"{}").unwrap(), None);
        assert_eq!(
            revoke_reason(br#"{"reason":"leaked"}"#).unwrap().as_deref(),
            Some("leaked")
        );
        let long = format!(r#"{{"reason":"{}"}}"#, "R".repeat(257));
        assert!(rejected(revoke_reason(long.as_bytes()), "RRRRRRRR").starts_with("reason:"));
        assert!(rejected(revoke_reason(br#"{"why":"x"}"#), "\"x\"").contains("`why`"));
        assert!(no_fields(b"").is_ok() && no_fields(b"{}").is_ok());
        rejected(no_fields(br#"{"force":true}"#), "true");
    }

    #[test]
    fn query_parameters_are_strict() {
        let allowed = [&STATE, &LIMIT, &CURSOR];
        let q = Query::parse(Some("state=active&limit=5"), &allowed).unwrap();
        assert_eq!(
            q.parsed(&STATE, KeyState::parse).unwrap(),
            Some(KeyState::Active)
        );
        assert_eq!(q.page().unwrap().limit, 5);
        assert_eq!(
            Query::parse(None, &allowed).unwrap().page().unwrap().limit,
            50
        );
        // Empty means not given.
        let q = Query::parse(Some("state=&limit="), &allowed).unwrap();
        assert_eq!(q.parsed(&STATE, KeyState::parse).unwrap(), None);
        let cases = [
            ("state=sleepingXYZ", "sleepingXYZ", "state:"),
            ("limit=0", "=0", "limit:"),
            ("limit=201", "201", "limit:"),
            ("limit=abcQQ", "abcQQ", "limit:"),
            (
                "cursor=bm90LWEtY3Vyc29yUUU",
                "bm90LWEtY3Vyc29yUUU",
                "cursor:",
            ),
            ("sort=desc", "desc", "unknown query parameter `sort`"),
            (
                "state=active&state=revoked",
                "revoked",
                "state: given more than once",
            ),
            ("Bad%20Name=1", "Bad", "unknown query parameter"),
            ("state=%zz", "%zz", "state:"),
        ];
        for (raw, value, prefix) in cases {
            let r = Query::parse(Some(raw), &allowed).and_then(|q| {
                q.parsed(&STATE, KeyState::parse)?;
                q.page()
            });
            let msg = rejected(r, value);
            assert!(msg.starts_with(prefix), "{raw} -> {msg}");
        }
    }

    #[test]
    fn percent_decoding_and_timestamps() {
        assert_eq!(percent_decode("a%2Bb+c").as_deref(), Some("a+b+c"));
        assert_eq!(percent_decode("%e2%9c%93").as_deref(), Some("✓"));
        assert_eq!(percent_decode("%+f"), None);
        assert_eq!(percent_decode("%4"), None);
        assert_eq!(percent_decode("%ff"), None);
        let t = timestamp("2026-11-23T12:30:00+02:00").unwrap();
        assert_eq!(seconds(&t), "2026-11-23T10:30:00Z");
        assert_eq!(timestamp("yesterday"), None);
    }

    fn sample_key() -> KeyRecord {
        let t = DateTime::from_timestamp(1_795_429_800, 123_456_000).unwrap();
        KeyRecord {
            metadata: BTreeMap::from([("owner".into(), "team-a".into())]),
            sealed: Some(crate::keys::SealedMaterial::from_token(
                "gAAAAAtoken".into(),
            )),
            material_hash: Some("abcdef".into()),
            ..KeyRecord::sample("key_7f3k2m9q", t)
        }
    }

    #[test]
    fn key_view_has_the_contract_shape_and_no_material() {
        let key = sample_key();
        let v = serde_json::to_value(KeyView::new(&key)).unwrap();
        let mut keys: Vec<&str> = v.as_object().unwrap().keys().map(String::as_str).collect();
        keys.sort_unstable();
        let mut expected = [
            "id",
            "provider_id",
            "label",
            "state",
            "state_reason",
            "cooldown_until",
            "limits",
            "weight",
            "fingerprint",
            "metadata",
            "created_at",
            "updated_at",
            "state_changed_at",
        ];
        expected.sort_unstable();
        assert_eq!(keys, expected);
        assert_eq!(v["created_at"], "2026-11-23T10:30:00Z");
        assert_eq!(
            v["limits"],
            serde_json::json!({"rpm": null, "tpm": null, "max_concurrent": null})
        );
        assert_eq!(v["label"], serde_json::Value::Null);
        let text = v.to_string();
        assert!(
            !text.contains("gAAAA") && !text.contains("abcdef"),
            "{text}"
        );
        let with = serde_json::to_value(KeyView::new(&key).with_usage(Usage::default())).unwrap();
        assert_eq!(
            with["usage"],
            serde_json::json!({"requests_last_minute": 0, "tokens_last_minute": 0, "in_flight": 0})
        );
    }

    #[test]
    fn page_view_names_its_items() {
        let c = Cursor {
            at: DateTime::from_timestamp(1, 0).unwrap(),
            id: "key_abcdefgh".into(),
        };
        let v = serde_json::to_value(PageView {
            items_name: "keys",
            items: &[1, 2],
            next: Some(&c),
        })
        .unwrap();
        assert_eq!(v["keys"], serde_json::json!([1, 2]));
        assert_eq!(v["next_cursor"], c.encode());
        let v = serde_json::to_value(PageView::<u8> {
            items_name: "events",
            items: &[],
            next: None,
        })
        .unwrap();
        assert_eq!(v, serde_json::json!({"events": [], "next_cursor": null}));
    }
}
