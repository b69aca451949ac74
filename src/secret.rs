//! `Secret`: the only type that ever holds key material or a credential in memory.
//!
//! It cannot leak by accident: `Debug` prints `[redacted]`, there is no `Display`
//! and no `Serialize`, and the bytes are zeroed when the value is dropped
//! (`secrecy` does the zeroing). The one way to read the value is
//! [`Secret::expose`]; every caller says in a comment why it needs the plaintext.

use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Deserializer};
use std::fmt;
use subtle::ConstantTimeEq;

/// A string secret: provider key material, the admin API key, a JWT secret, a
/// connection URI with credentials.
#[derive(Clone)]
pub struct Secret(SecretString);

impl Secret {
    /// Wraps a value. The caller's `String` moves in, so no copy stays behind.
    pub fn new(value: String) -> Self {
        Self(SecretString::from(value))
    }

    /// The plaintext. Keep the borrow short and never pass it to a formatter.
    pub fn expose(&self) -> &str {
        self.0.expose_secret()
    }

    /// Length in bytes (validation messages may say a value is too short,
    /// never what it is).
    pub fn len(&self) -> usize {
        self.expose().len()
    }

    /// Whether the secret is the empty string.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Constant-time comparison with presented credentials, so response timing
    /// tells an attacker nothing about how much of a guess was right.
    pub fn ct_eq(&self, presented: &[u8]) -> bool {
        self.expose().as_bytes().ct_eq(presented).into()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("[redacted]")
    }
}

/// Request bodies deserialize straight into a `Secret`, so the material never
/// lives in a plain `String` field of a DTO.
impl<'de> Deserialize<'de> for Secret {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        String::deserialize(deserializer).map(Secret::new)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_is_redacted() {
        let s = Secret::new("sk-live-abcdef0123456789".into());
        let shown = format!("{s:?} {:#?}", s);
        assert!(!shown.contains("abcdef"), "{shown}");
        assert!(shown.contains("[redacted]"));
    }

    #[test]
    fn constant_time_eq_matches_only_the_same_bytes() {
        let s = Secret::new("correct horse battery staple 0123".into());
        assert!(s.ct_eq(b"correct horse battery staple 0123"));
        assert!(!s.ct_eq(b"correct horse battery staple 0124"));
        assert!(!s.ct_eq(b"correct"));
    }

    #[test]
    fn deserializes_from_json_string() {
        let s: Secret = serde_json::from_str("\"abc\"").unwrap();
        assert_eq!(s.expose(), "abc");
    }
}
