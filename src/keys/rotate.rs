//! Re-encryption of every stored key with the primary Fernet key: the second
//! half of a key rotation, shared by `keyrouter reencrypt` and
//! `POST /admin/v1/encryption/rotate`.

use super::Vault;
use crate::audit::{Actor, AuditEvent, EventKind};
use crate::store::{Resealed, Store, StoreError};

#[derive(Debug, thiserror::Error)]
pub enum RotateError {
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A key's token opens with none of the configured Fernet keys: the ring
    /// lacks the key it was made with. Nothing was changed.
    #[error("key {0} cannot be decrypted with any configured Fernet key; nothing was re-encrypted")]
    Undecryptable(String),
}

/// Re-encrypts every key that still holds material, in one store write with
/// its `encryption_rotated` event. Returns how many keys were re-encrypted.
pub async fn reencrypt_all(
    store: &dyn Store,
    vault: &Vault,
    actor: Actor,
) -> Result<u64, RotateError> {
    let mut resealed = Vec::new();
    for key in store.all_keys().await? {
        let Some(sealed) = &key.sealed else { continue };
        // Decrypted in memory only, to encrypt again and rehash.
        let material = vault
            .open(sealed)
            .map_err(|_| RotateError::Undecryptable(key.id.to_string()))?;
        resealed.push(Resealed {
            sealed: vault.seal(&material),
            material_hash: vault.material_hash(&material),
            id: key.id,
        });
    }
    let event = AuditEvent::new(EventKind::EncryptionRotated, actor, "encryption");
    Ok(store.reseal_keys(&resealed, &event).await?)
}
