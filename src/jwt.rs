//! The rules every JWT keyrouter verifies shares: operator tokens on the
//! management API ([`admin`](crate::admin)) and client tokens on the proxy
//! (`client_auth.mode = "jwt"`).
//!
//! - HS256 only: a token naming another algorithm is refused, so a token
//!   cannot pick its own verification.
//! - `exp` and `sub` are required.
//! - `aud` is not checked. keyrouter has no audience of its own to compare
//!   it with, and identity providers put one in every token; jsonwebtoken's
//!   default refuses any token that carries `aud` when no audience is set,
//!   which made every such token a 401.

use jsonwebtoken::{Algorithm, Validation};

/// The shared rules, with `leeway_secs` of clock skew tolerated on `exp`
/// (and on `nbf` where a caller turns its check on).
pub fn hs256_validation(leeway_secs: u64) -> Validation {
    let mut validation = Validation::new(Algorithm::HS256);
    validation.set_required_spec_claims(&["exp", "sub"]);
    validation.validate_aud = false;
    validation.leeway = leeway_secs;
    validation
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{DecodingKey, EncodingKey, Header, decode, encode};
    use serde_json::{Value, json};

    const SECRET: &[u8] = b"jwt-rules-unit-test-secret-0123456789";

    fn verify(claims: &Value) -> Result<Value, jsonwebtoken::errors::Error> {
        let token = encode(
            &Header::default(),
            claims,
            &EncodingKey::from_secret(SECRET),
        )
        .unwrap();
        decode::<Value>(
            &token,
            &DecodingKey::from_secret(SECRET),
            &hs256_validation(0),
        )
        .map(|data| data.claims)
    }

    #[test]
    fn an_audience_is_accepted_unchecked() {
        let exp = chrono::Utc::now().timestamp() + 60;
        for aud in [
            json!("https://idp.example.com"),
            json!(["a", "b"]),
            json!([]),
        ] {
            let claims = json!({"sub": "ops", "exp": exp, "aud": aud});
            assert!(verify(&claims).is_ok(), "{claims}");
        }
        assert!(verify(&json!({"sub": "ops"})).is_err(), "exp is required");
        assert!(verify(&json!({"exp": exp})).is_err(), "sub is required");
    }
}
