//! The key vault: Fernet encryption of key material with a key ring.
//!
//! The first Fernet key encrypts, every key decrypts, so an operator rotates by
//! putting a new key first, then re-encrypting (`keyrouter reencrypt` or
//! `POST /admin/v1/encryption/rotate`), then dropping the old key.
//!
//! Duplicate detection needs to compare materials without storing them, so the
//! vault also derives a keyed hash (HMAC-SHA256) per ring key: a plain hash of
//! a short key could be brute-forced from a stolen database, a keyed one
//! cannot without the Fernet keys.

use super::model::SealedMaterial;
use crate::secret::Secret;
use hmac::{Hmac, Mac};
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

type HmacSha256 = Hmac<Sha256>;

/// Why the ring or a token could not be used. Messages name positions, never
/// key values.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum VaultError {
    #[error("KEYROUTER_FERNET_KEYS is empty")]
    NoKeys,
    #[error(
        "KEYROUTER_FERNET_KEYS entry {0} is not a Fernet key (32 bytes, url-safe base64; `keyrouter gen-fernet-key` makes one)"
    )]
    MalformedKey(usize),
    #[error("a stored key could not be decrypted with any configured Fernet key")]
    Undecryptable,
}

/// Fernet key ring plus the matching hash keys.
pub struct Vault {
    primary: fernet::Fernet,
    ring: fernet::MultiFernet,
    /// One HMAC key per Fernet key, primary first.
    hash_keys: Vec<Zeroizing<[u8; 32]>>,
}

impl Vault {
    pub fn new(keys: &[Secret]) -> Result<Self, VaultError> {
        if keys.is_empty() {
            return Err(VaultError::NoKeys);
        }
        let mut fernets = Vec::with_capacity(keys.len());
        let mut hash_keys = Vec::with_capacity(keys.len());
        for (i, key) in keys.iter().enumerate() {
            // The key is decoded only to build the cipher and its hash key.
            let f =
                fernet::Fernet::new(key.expose().trim()).ok_or(VaultError::MalformedKey(i + 1))?;
            fernets.push(f);
            hash_keys.push(derive_hash_key(key));
        }
        Ok(Vault {
            primary: fernets[0].clone(),
            ring: fernet::MultiFernet::new(fernets),
            hash_keys,
        })
    }

    /// A new random Fernet key, for `keyrouter gen-fernet-key`.
    pub fn generate_key() -> String {
        fernet::Fernet::generate_key()
    }

    pub fn seal(&self, material: &Secret) -> SealedMaterial {
        // Encrypting needs the plaintext bytes; nothing else sees them.
        SealedMaterial::from_token(self.primary.encrypt(material.expose().as_bytes()))
    }

    pub fn open(&self, sealed: &SealedMaterial) -> Result<Secret, VaultError> {
        let bytes = Zeroizing::new(
            self.ring
                .decrypt(sealed.token())
                .map_err(|_| VaultError::Undecryptable)?,
        );
        let text = std::str::from_utf8(&bytes).map_err(|_| VaultError::Undecryptable)?;
        Ok(Secret::new(text.to_owned()))
    }

    /// Decrypts with whichever ring key made the token and encrypts with the
    /// primary one.
    pub fn reseal(&self, sealed: &SealedMaterial) -> Result<SealedMaterial, VaultError> {
        Ok(self.seal(&self.open(sealed)?))
    }

    /// The material's hash under the primary key (what new records store).
    pub fn material_hash(&self, material: &Secret) -> String {
        hash_with(&self.hash_keys[0], material)
    }

    /// The material's hash under every ring key: a duplicate registered before
    /// the last rotation carries a hash made with an older key.
    pub fn material_hashes(&self, material: &Secret) -> Vec<String> {
        self.hash_keys
            .iter()
            .map(|k| hash_with(k, material))
            .collect()
    }
}

/// `sha256:` plus the first 8 hex digits of the material's SHA-256 (contract).
pub fn fingerprint(material: &Secret) -> String {
    let digest = Sha256::digest(material.expose().as_bytes());
    format!("sha256:{}", &hex::encode(digest)[..8])
}

fn derive_hash_key(fernet_key: &Secret) -> Zeroizing<[u8; 32]> {
    let mut mac = HmacSha256::new_from_slice(fernet_key.expose().trim().as_bytes())
        .expect("HMAC accepts keys of any length");
    mac.update(b"keyrouter material hash v1");
    Zeroizing::new(mac.finalize().into_bytes().into())
}

fn hash_with(key: &[u8; 32], material: &Secret) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(material.expose().as_bytes());
    hex::encode(mac.finalize().into_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ring(keys: &[&str]) -> Vault {
        Vault::new(
            &keys
                .iter()
                .map(|k| Secret::new((*k).into()))
                .collect::<Vec<_>>(),
        )
        .unwrap()
    }

    #[test]
    fn seal_and_open_round_trip_without_plaintext_in_token() {
        let k = Vault::generate_key();
        let v = ring(&[&k]);
        let material = Secret::new("sk-test-0123456789abcdef".into());
        let sealed = v.seal(&material);
        assert!(!sealed.token().contains("0123456789abcdef"));
        assert_eq!(v.open(&sealed).unwrap().expose(), material.expose());
    }

    #[test]
    fn token_from_old_key_still_decrypts_after_rotation() {
        let old = Vault::generate_key();
        let new = Vault::generate_key();
        let before = ring(&[&old]);
        let material = Secret::new("sk-rotate-me-123456".into());
        let sealed_old = before.seal(&material);

        let after = ring(&[&new, &old]);
        assert_eq!(after.open(&sealed_old).unwrap().expose(), material.expose());

        // Re-encryption moves it to the new key: the new key alone opens it.
        let resealed = after.reseal(&sealed_old).unwrap();
        let only_new = ring(&[&new]);
        assert_eq!(
            only_new.open(&resealed).unwrap().expose(),
            material.expose()
        );
        assert_eq!(
            only_new.open(&sealed_old).err(),
            Some(VaultError::Undecryptable)
        );
    }

    #[test]
    fn hashes_cover_every_ring_key() {
        let old = Vault::generate_key();
        let new = Vault::generate_key();
        let material = Secret::new("sk-dup-check-000111".into());
        let old_hash = ring(&[&old]).material_hash(&material);
        let rotated = ring(&[&new, &old]);
        assert_ne!(rotated.material_hash(&material), old_hash);
        assert!(rotated.material_hashes(&material).contains(&old_hash));
    }

    #[test]
    fn malformed_key_is_named_by_position_only() {
        let good = Vault::generate_key();
        let err = Vault::new(&[Secret::new(good), Secret::new("not-a-key".into())])
            .err()
            .unwrap();
        assert_eq!(err, VaultError::MalformedKey(2));
        assert!(!err.to_string().contains("not-a-key"));
        assert_eq!(Vault::new(&[]).err(), Some(VaultError::NoKeys));
    }

    #[test]
    fn fingerprint_is_sha256_prefix() {
        // sha256("abc") = ba7816bf...
        assert_eq!(fingerprint(&Secret::new("abc".into())), "sha256:ba7816bf");
    }
}
