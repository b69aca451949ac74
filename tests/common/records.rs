//! Key records and a provider for tests and benchmarks that drive the key
//! pool directly, without a store.

use chrono::Utc;
use keyrouter::config::{Policy, ProviderConfig, ProviderKind};
use keyrouter::keys::{KeyId, KeyRecord, KeyStatus, Limits, Vault};
use keyrouter::secret::Secret;
use std::collections::BTreeMap;

/// OpenAI, id `openai`, least-loaded.
pub fn openai_provider() -> ProviderConfig {
    ProviderConfig {
        id: "openai".into(),
        kind: ProviderKind::OpenAi,
        base_url: "https://api.openai.com".parse().unwrap(),
        route_prefix: "/openai".into(),
        default: true,
        upstream_ca_path: None,
        policy: Policy::LeastLoaded,
        retry_budget: 2,
        probe_interval: None,
    }
}

/// An active `openai` key at revision 1: id `key_test{n:06}`, its material
/// sealed with `vault`.
pub fn active_record(n: usize, vault: &Vault) -> KeyRecord {
    let now = Utc::now();
    let material = Secret::new(format!("sk-test-{n:06}-0123456789abcdef"));
    KeyRecord {
        id: KeyId::parse(&format!("key_test{n:06}")).unwrap(),
        provider_id: "openai".into(),
        label: None,
        status: KeyStatus::Active,
        state_reason: None,
        limits: Limits::default(),
        weight: 1,
        fingerprint: keyrouter::keys::vault::fingerprint(&material),
        metadata: BTreeMap::new(),
        created_at: now,
        updated_at: now,
        state_changed_at: now,
        revision: 1,
        sealed: Some(vault.seal(&material)),
        material_hash: Some(vault.material_hash(&material)),
    }
}
