//! Who is calling the management API, and what they may do.
//!
//! Two credentials (contract section 7): the static `X-API-Key`, compared in
//! constant time, which grants every scope; or `Authorization: Bearer <JWT>`
//! signed HS256 with the admin JWT secret (the rules in [`crate::jwt`]), whose
//! `scope` claim lists what it grants. With neither secret configured every
//! request is refused: missing security configuration fails closed.
//!
//! A refusal is counted, audited (`auth_failed` with the caller's address and
//! a fixed reason) and logged, never with the presented credential.

use crate::app::App;
use crate::audit::{Actor, AuditEvent};
use crate::config::AdminAuth;
use crate::error::GatewayError;
use crate::secret::Secret;
use http::{HeaderMap, header};
use jsonwebtoken::errors::ErrorKind as JwtError;
use jsonwebtoken::{DecodingKey, Validation};
use serde::Deserialize;
use std::net::IpAddr;

/// What a credential may do; each route needs one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    KeysRead,
    KeysWrite,
    AuditRead,
}

impl Scope {
    pub const ALL: [Scope; 3] = [Scope::KeysRead, Scope::KeysWrite, Scope::AuditRead];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::KeysRead => "keys:read",
            Scope::KeysWrite => "keys:write",
            Scope::AuditRead => "audit:read",
        }
    }

    fn parse(s: &str) -> Option<Self> {
        Scope::ALL.into_iter().find(|scope| scope.as_str() == s)
    }
}

/// An authenticated caller.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Principal {
    /// `api_key`, or the JWT's `sub`: what the audit log's `actor` names.
    name: String,
    scopes: Vec<Scope>,
}

/// The principal name of the static API key (`actor: "admin:api_key"`).
const API_KEY_PRINCIPAL: &str = "api_key";

impl Principal {
    /// The audit `actor` of changes this caller makes.
    pub fn actor(&self) -> Actor {
        Actor::Admin(self.name.clone())
    }

    pub fn require(&self, scope: Scope) -> Result<(), AuthFailure> {
        if self.scopes.contains(&scope) {
            Ok(())
        } else {
            Err(AuthFailure::InsufficientScope)
        }
    }
}

/// Why a request was refused; `reason` is what the audit event records.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AuthFailure {
    /// Neither the API key nor the JWT secret is configured.
    NotConfigured,
    MissingCredentials,
    InvalidApiKey,
    /// Malformed, wrongly signed, wrong algorithm, missing claims, or a JWT
    /// presented while no JWT secret is configured.
    InvalidToken,
    ExpiredToken,
    InsufficientScope,
}

impl AuthFailure {
    pub fn reason(self) -> &'static str {
        match self {
            AuthFailure::NotConfigured => "auth_not_configured",
            AuthFailure::MissingCredentials => "missing_credentials",
            AuthFailure::InvalidApiKey => "invalid_api_key",
            AuthFailure::InvalidToken => "invalid_token",
            AuthFailure::ExpiredToken => "expired_token",
            AuthFailure::InsufficientScope => "insufficient_scope",
        }
    }

    /// 403 for a valid credential lacking the scope, 401 for everything else.
    /// The messages are the same for every 401, so a caller cannot tell a
    /// wrong key from an unconfigured one.
    fn into_error(self) -> GatewayError {
        match self {
            AuthFailure::InsufficientScope => {
                GatewayError::forbidden("The credentials do not grant access to this route.")
            }
            _ => GatewayError::unauthorized(),
        }
    }
}

/// Counts, audits and logs a refused request, and returns the error to
/// answer with. `resource` is the route template (or the path when no route
/// matched); the presented credential never reaches this function.
pub fn refuse(
    app: &App,
    resource: &str,
    client: IpAddr,
    request_id: &str,
    failure: AuthFailure,
) -> GatewayError {
    app.metrics.admin_auth_failures.inc();
    app.audit
        .record(AuditEvent::auth_failed(resource, client, failure.reason()));
    tracing::warn!(
        %client,
        resource,
        request_id,
        reason = failure.reason(),
        "management API request refused"
    );
    failure.into_error()
}

/// Longest bearer token looked at; anything longer is refused unparsed.
const MAX_TOKEN_LEN: usize = 8 * 1024;
/// Longest JWT `sub` accepted: it becomes the audit actor and a log field.
const MAX_SUBJECT_LEN: usize = 128;
/// Clock skew tolerated on `exp` and `nbf`.
const LEEWAY_SECS: u64 = 30;

/// Checks credentials; built once from the configuration.
pub struct Authenticator {
    api_key: Option<Secret>,
    jwt: Option<JwtVerifier>,
}

struct JwtVerifier {
    key: DecodingKey,
    validation: Validation,
}

/// The claims keyrouter reads; `exp` is checked by the validation.
#[derive(Deserialize)]
struct Claims {
    sub: String,
    /// Space-separated scopes. Scopes keyrouter does not know are ignored,
    /// so one token may also serve other services.
    #[serde(default)]
    scope: Option<String>,
}

impl Authenticator {
    pub fn new(cfg: &AdminAuth) -> Self {
        let jwt = cfg.jwt_secret.as_ref().map(|secret| {
            let mut validation = crate::jwt::hs256_validation(LEEWAY_SECS);
            validation.validate_nbf = true;
            JwtVerifier {
                // The HMAC key needs the secret's bytes; it lives as long as
                // the listener.
                key: DecodingKey::from_secret(secret.expose().as_bytes()),
                validation,
            }
        });
        Authenticator {
            api_key: cfg.api_key.clone(),
            jwt,
        }
    }

    /// The caller behind the request's credentials. `X-API-Key` wins when
    /// both headers are sent.
    pub fn authenticate(&self, headers: &HeaderMap) -> Result<Principal, AuthFailure> {
        if self.api_key.is_none() && self.jwt.is_none() {
            return Err(AuthFailure::NotConfigured);
        }
        let mut api_keys = headers.get_all("x-api-key").iter();
        if let Some(presented) = api_keys.next() {
            let single = api_keys.next().is_none();
            return match &self.api_key {
                Some(key) if single && key.ct_eq(presented.as_bytes()) => Ok(Principal {
                    name: API_KEY_PRINCIPAL.to_owned(),
                    scopes: Scope::ALL.to_vec(),
                }),
                _ => Err(AuthFailure::InvalidApiKey),
            };
        }
        let authorization = headers
            .get(header::AUTHORIZATION)
            .ok_or(AuthFailure::MissingCredentials)?;
        let token = bearer_token(authorization.as_bytes()).ok_or(AuthFailure::InvalidToken)?;
        self.jwt
            .as_ref()
            .ok_or(AuthFailure::InvalidToken)?
            .verify(token)
    }
}

/// The token of `Bearer <token>` (scheme case-insensitive, RFC 9110).
fn bearer_token(value: &[u8]) -> Option<&str> {
    let value = std::str::from_utf8(value).ok()?;
    let (scheme, token) = value.split_once(' ')?;
    let token = token.trim();
    let ok =
        scheme.eq_ignore_ascii_case("bearer") && !token.is_empty() && token.len() <= MAX_TOKEN_LEN;
    ok.then_some(token)
}

impl JwtVerifier {
    fn verify(&self, token: &str) -> Result<Principal, AuthFailure> {
        let data = jsonwebtoken::decode::<Claims>(token, &self.key, &self.validation).map_err(
            |e| match e.kind() {
                JwtError::ExpiredSignature => AuthFailure::ExpiredToken,
                _ => AuthFailure::InvalidToken,
            },
        )?;
        let Claims { sub, scope } = data.claims;
        // `api_key` is reserved so the audit log can always tell the static
        // key from a token holder.
        let sub_ok = !sub.is_empty()
            && sub.chars().count() <= MAX_SUBJECT_LEN
            && !sub.chars().any(char::is_control)
            && sub != API_KEY_PRINCIPAL;
        if !sub_ok {
            return Err(AuthFailure::InvalidToken);
        }
        let scopes = scope
            .as_deref()
            .unwrap_or_default()
            .split_ascii_whitespace()
            .filter_map(Scope::parse)
            .collect();
        Ok(Principal { name: sub, scopes })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;
    use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
    use serde_json::json;

    const API_KEY: &str = "test-admin-api-key-0123456789abcdef";
    const JWT_SECRET: &str = "test-admin-jwt-secret-0123456789abcdef";

    fn auth(api_key: bool, jwt: bool) -> Authenticator {
        Authenticator::new(&AdminAuth {
            api_key: api_key.then(|| Secret::new(API_KEY.into())),
            jwt_secret: jwt.then(|| Secret::new(JWT_SECRET.into())),
        })
    }

    fn now() -> i64 {
        chrono::Utc::now().timestamp()
    }

    fn token(claims: serde_json::Value, alg: Algorithm, secret: &str) -> String {
        encode(
            &Header::new(alg),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn with(name: &'static str, value: &str) -> HeaderMap {
        let mut h = HeaderMap::new();
        h.insert(name, HeaderValue::from_str(value).unwrap());
        h
    }

    fn bearer(t: &str) -> HeaderMap {
        with("authorization", &format!("Bearer {t}"))
    }

    #[test]
    fn api_key_grants_every_scope() {
        let p = auth(true, true)
            .authenticate(&with("x-api-key", API_KEY))
            .unwrap();
        assert_eq!(p.actor().render(), "admin:api_key");
        for s in Scope::ALL {
            assert_eq!(p.require(s), Ok(()));
        }
    }

    #[test]
    fn wrong_or_repeated_api_key_is_refused() {
        let a = auth(true, true);
        let wrong = format!("{API_KEY}x");
        assert_eq!(
            a.authenticate(&with("x-api-key", &wrong)),
            Err(AuthFailure::InvalidApiKey)
        );
        let mut twice = with("x-api-key", API_KEY);
        twice.append("x-api-key", HeaderValue::from_static("other"));
        assert_eq!(a.authenticate(&twice), Err(AuthFailure::InvalidApiKey));
        // Only a JWT secret configured: any API key is wrong.
        assert_eq!(
            auth(false, true).authenticate(&with("x-api-key", API_KEY)),
            Err(AuthFailure::InvalidApiKey)
        );
    }

    #[test]
    fn nothing_configured_refuses_everything() {
        let a = auth(false, false);
        assert_eq!(
            a.authenticate(&with("x-api-key", API_KEY)),
            Err(AuthFailure::NotConfigured)
        );
        assert_eq!(
            a.authenticate(&HeaderMap::new()),
            Err(AuthFailure::NotConfigured)
        );
    }

    #[test]
    fn missing_credentials() {
        assert_eq!(
            auth(true, true).authenticate(&HeaderMap::new()),
            Err(AuthFailure::MissingCredentials)
        );
    }

    #[test]
    fn jwt_scopes_and_subject() {
        let t = token(
            json!({"sub": "ops@example.com", "exp": now() + 600, "scope": "keys:read other audit:read"}),
            Algorithm::HS256,
            JWT_SECRET,
        );
        let p = auth(false, true).authenticate(&bearer(&t)).unwrap();
        assert_eq!(p.actor().render(), "admin:ops@example.com");
        assert_eq!(p.require(Scope::KeysRead), Ok(()));
        assert_eq!(p.require(Scope::AuditRead), Ok(()));
        assert_eq!(
            p.require(Scope::KeysWrite),
            Err(AuthFailure::InsufficientScope)
        );
        // Lower-case scheme is the same scheme.
        let lower = with("authorization", &format!("bearer {t}"));
        assert!(auth(false, true).authenticate(&lower).is_ok());
    }

    #[test]
    fn no_scope_claim_means_no_scopes() {
        let t = token(
            json!({"sub": "a", "exp": now() + 600}),
            Algorithm::HS256,
            JWT_SECRET,
        );
        let p = auth(false, true).authenticate(&bearer(&t)).unwrap();
        for s in Scope::ALL {
            assert_eq!(p.require(s), Err(AuthFailure::InsufficientScope));
        }
    }

    #[test]
    fn bad_tokens_are_refused_with_their_reason() {
        let a = auth(true, true);
        let cases = [
            (
                token(
                    json!({"sub": "a", "exp": now() - 3600}),
                    Algorithm::HS256,
                    JWT_SECRET,
                ),
                AuthFailure::ExpiredToken,
            ),
            (
                token(
                    json!({"sub": "a", "exp": now() + 600}),
                    Algorithm::HS256,
                    "another-secret-of-enough-length-000",
                ),
                AuthFailure::InvalidToken,
            ),
            (
                token(
                    json!({"sub": "a", "exp": now() + 600}),
                    Algorithm::HS512,
                    JWT_SECRET,
                ),
                AuthFailure::InvalidToken,
            ),
            (
                token(json!({"sub": "a"}), Algorithm::HS256, JWT_SECRET),
                AuthFailure::InvalidToken,
            ),
            (
                token(json!({"exp": now() + 600}), Algorithm::HS256, JWT_SECRET),
                AuthFailure::InvalidToken,
            ),
            (
                token(
                    json!({"sub": "", "exp": now() + 600}),
                    Algorithm::HS256,
                    JWT_SECRET,
                ),
                AuthFailure::InvalidToken,
            ),
            (
                token(
                    json!({"sub": "api_key", "exp": now() + 600}),
                    Algorithm::HS256,
                    JWT_SECRET,
                ),
                AuthFailure::InvalidToken,
            ),
            (
                token(
                    json!({"sub": "a", "exp": now() + 600, "scope": 7}),
                    Algorithm::HS256,
                    JWT_SECRET,
                ),
                AuthFailure::InvalidToken,
            ),
            ("not.a.jwt".to_owned(), AuthFailure::InvalidToken),
        ];
        for (t, expected) in cases {
            assert_eq!(a.authenticate(&bearer(&t)), Err(expected), "{t}");
        }
        // A JWT without a configured JWT secret.
        let t = token(
            json!({"sub": "a", "exp": now() + 600}),
            Algorithm::HS256,
            JWT_SECRET,
        );
        assert_eq!(
            auth(true, false).authenticate(&bearer(&t)),
            Err(AuthFailure::InvalidToken)
        );
    }

    #[test]
    fn only_the_bearer_scheme_is_accepted() {
        assert_eq!(bearer_token(b"Bearer abc"), Some("abc"));
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"Bearer"), None);
        let long = format!("Bearer {}", "a".repeat(MAX_TOKEN_LEN + 1));
        assert_eq!(bearer_token(long.as_bytes()), None);
    }

    #[test]
    fn refusals_map_to_401_or_403() {
        assert_eq!(AuthFailure::InsufficientScope.into_error().status, 403);
        for f in [
            AuthFailure::NotConfigured,
            AuthFailure::MissingCredentials,
            AuthFailure::InvalidApiKey,
            AuthFailure::InvalidToken,
            AuthFailure::ExpiredToken,
        ] {
            let e = f.into_error();
            assert_eq!((e.status.as_u16(), e.kind.as_str()), (401, "unauthorized"));
        }
    }
}
