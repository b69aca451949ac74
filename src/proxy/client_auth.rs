//! Client tokens (`client_auth.mode = "jwt"`): `Authorization: Bearer <JWT>`
//! signed with HS256 and `KEYROUTER_CLIENT_JWT_SECRET`, `exp` required, `sub`
//! the client id, optional `providers` (allow-list of provider ids) and `rpm`
//! (the client's own request limit); `aud` is not checked (the rules shared
//! with operator tokens are in [`crate::jwt`]). Read from the request headers
//! only; the token is never forwarded (the client's `Authorization` is
//! dropped upstream).

use super::error::ProxyError;
use crate::secret::Secret;
use http::{HeaderMap, header};
use jsonwebtoken::{DecodingKey, Validation, decode};

/// An authenticated client.
#[derive(Debug, PartialEq, Eq)]
pub struct Client {
    pub id: String,
    providers: Option<Vec<String>>,
    pub rpm: Option<u32>,
}

impl Client {
    /// Whether the token allows `provider`.
    pub fn may_use(&self, provider: &str) -> bool {
        self.providers
            .as_ref()
            .is_none_or(|list| list.iter().any(|p| p == provider))
    }
}

/// Clock skew tolerated on `exp`.
const LEEWAY_SECS: u64 = 5;

#[derive(serde::Deserialize)]
struct Claims {
    sub: String,
    providers: Option<Vec<String>>,
    rpm: Option<u32>,
}

pub struct ClientAuth {
    key: DecodingKey,
    validation: Validation,
}

impl ClientAuth {
    pub fn new(secret: &Secret) -> Self {
        ClientAuth {
            // The secret is copied into the verifier once, at start-up.
            key: DecodingKey::from_secret(secret.expose().as_bytes()),
            validation: crate::jwt::hs256_validation(LEEWAY_SECS),
        }
    }

    /// The client presenting the request's bearer token; 401 for a missing,
    /// malformed, wrongly signed or expired one.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Client, ProxyError> {
        let token = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .ok_or(ProxyError::ClientUnauthorized)?;
        let data = decode::<Claims>(token.trim(), &self.key, &self.validation)
            .map_err(|_| ProxyError::ClientUnauthorized)?;
        let c = data.claims;
        if c.sub.is_empty() || c.sub.len() > 128 {
            return Err(ProxyError::ClientUnauthorized);
        }
        Ok(Client {
            id: c.sub,
            providers: c.providers,
            rpm: c.rpm.filter(|&n| n > 0),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    use serde_json::json;

    const SECRET: &str = "client-jwt-secret-for-unit-tests-0123456789";

    fn auth() -> ClientAuth {
        ClientAuth::new(&Secret::new(SECRET.into()))
    }

    fn headers(token: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            format!("Bearer {token}").parse().unwrap(),
        );
        h
    }

    fn sign(secret: &str, claims: serde_json::Value) -> String {
        encode(
            &Header::default(),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn exp(offset: i64) -> i64 {
        chrono::Utc::now().timestamp() + offset
    }

    #[test]
    fn valid_token_gives_the_client() {
        let t = sign(
            SECRET,
            json!({"sub": "app-1", "exp": exp(60), "providers": ["openai"], "rpm": 10}),
        );
        let c = auth().authenticate(&headers(&t)).unwrap();
        assert_eq!(c.id, "app-1");
        assert_eq!(c.rpm, Some(10));
        assert!(c.may_use("openai"));
        assert!(!c.may_use("anthropic"));
        let open = sign(SECRET, json!({"sub": "app-2", "exp": exp(60)}));
        assert!(
            auth()
                .authenticate(&headers(&open))
                .unwrap()
                .may_use("anything")
        );
    }

    #[test]
    fn bad_tokens_are_refused() {
        let a = auth();
        let cases = [
            sign(SECRET, json!({"sub": "x", "exp": exp(-60)})),
            sign(
                "another-secret-another-secret-0123456789",
                json!({"sub": "x", "exp": exp(60)}),
            ),
            sign(SECRET, json!({"sub": "x"})),
            sign(SECRET, json!({"exp": exp(60)})),
            "not.a.jwt".to_owned(),
        ];
        for t in cases {
            assert_eq!(
                a.authenticate(&headers(&t)),
                Err(ProxyError::ClientUnauthorized)
            );
        }
        assert_eq!(
            a.authenticate(&HeaderMap::new()),
            Err(ProxyError::ClientUnauthorized)
        );
        let none_alg = {
            let mut h = Header::new(Algorithm::HS512);
            h.typ = None;
            encode(
                &h,
                &json!({"sub": "x", "exp": exp(60)}),
                &EncodingKey::from_secret(SECRET.as_bytes()),
            )
            .unwrap()
        };
        assert_eq!(
            a.authenticate(&headers(&none_alg)),
            Err(ProxyError::ClientUnauthorized)
        );
    }
}
