//! What keyrouter knows about a provider key. The material itself is never a
//! field here: a record holds only its Fernet token ([`SealedMaterial`]).

use super::state::KeyStatus;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::fmt;

/// A key's public id, `key_` followed by 8 to 32 lowercase letters or digits.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct KeyId(String);

impl KeyId {
    /// A fresh id with 16 random characters (80 bits): collisions are not a
    /// practical concern, and the store's unique index catches one anyway.
    pub fn generate() -> Self {
        KeyId(crate::ids::prefixed("key_", 16))
    }

    /// Accepts only the contract's id pattern; anything else is a 400.
    pub fn parse(s: &str) -> Option<Self> {
        let rest = s.strip_prefix("key_")?;
        let ok = (8..=32).contains(&rest.len())
            && rest
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
        ok.then(|| KeyId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A key's optional per-minute and concurrency limits.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    pub rpm: Option<u32>,
    pub tpm: Option<u32>,
    pub max_concurrent: Option<u32>,
}

/// The Fernet token of a key's material: safe to store, still never logged or
/// returned (the contract forbids even the encrypted form in logs and APIs).
#[derive(Clone, PartialEq, Eq)]
pub struct SealedMaterial(String);

impl SealedMaterial {
    pub fn from_token(token: String) -> Self {
        SealedMaterial(token)
    }

    pub fn token(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for SealedMaterial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[sealed]")
    }
}

/// A registered key as the store keeps it.
#[derive(Clone, Debug, PartialEq)]
pub struct KeyRecord {
    pub id: KeyId,
    pub provider_id: String,
    pub label: Option<String>,
    pub status: KeyStatus,
    /// Why the key is in its current state (`upstream_rate_limited`,
    /// `operator_revoked`, an operator's revoke reason, ...).
    pub state_reason: Option<String>,
    pub limits: Limits,
    pub weight: u32,
    /// `sha256:` and the first 8 hex digits of the material's SHA-256: lets an
    /// operator tell keys apart without seeing them.
    pub fingerprint: String,
    pub metadata: BTreeMap<String, String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub state_changed_at: DateTime<Utc>,
    /// Bumped on every write; the store refuses a write based on a stale read,
    /// so a router transition can never overwrite an operator's revoke.
    pub revision: i64,
    /// `None` once the key has been deleted (material erased).
    pub sealed: Option<SealedMaterial>,
    /// Keyed hash of the material for duplicate detection; `None` once erased
    /// so the same material may be registered again.
    pub material_hash: Option<String>,
}

#[cfg(test)]
impl KeyRecord {
    /// An active `openai` key at revision 1 for unit tests, every time set
    /// to `at`, with no material.
    pub(crate) fn sample(id: &str, at: DateTime<Utc>) -> KeyRecord {
        KeyRecord {
            id: KeyId::parse(id).expect("a well-formed key id"),
            provider_id: "openai".into(),
            label: None,
            status: KeyStatus::Active,
            state_reason: None,
            limits: Limits::default(),
            weight: 1,
            fingerprint: "sha256:9c1d44e0".into(),
            metadata: BTreeMap::new(),
            created_at: at,
            updated_at: at,
            state_changed_at: at,
            revision: 1,
            sealed: None,
            material_hash: None,
        }
    }
}
