//! The management API (`server.admin_listen`, prefix `/admin/v1`).
//!
//! Request path, in order, all in [`AdminApi::respond`]:
//! 1. per-address rate limit ([`ratelimit`]), before anything else so that
//!    guessing credentials is throttled too;
//! 2. authentication ([`auth`]), before routing, so an unauthenticated
//!    caller learns nothing about which routes exist;
//! 3. routing by method and path ([`Resource`], [`Endpoint`]), then the
//!    route's scope;
//! 4. the query string, held to the parameters the operation takes
//!    ([`Endpoint::query_fields`]);
//! 5. the body, read whole up to 64 KiB into a buffer zeroed on drop;
//! 6. the route function ([`keys`], [`audit`]), which returns
//!    `Result<Response, GatewayError>`.
//!
//! The [`Handler`] impl around it is the one place where a `GatewayError`
//! becomes a response; it also adds the common headers, counts
//! `keyrouter_admin_requests_total{route,code}` by route template and writes
//! one access line (never bodies or headers).

mod audit;
mod auth;
mod dto;
mod keys;
mod ratelimit;

use crate::app::App;
use crate::audit::Actor;
use crate::error::{ErrorKind, GatewayError};
use crate::http::{Body, RequestId, finish};
use crate::keys::KeyId;
use crate::metrics::StoreOp;
use crate::server::{ConnInfo, Handler};
use crate::store::StoreError;
use auth::{Authenticator, Principal, Scope};
use dto::{Field, Query};
use http::{HeaderValue, Method, StatusCode, header};
use hyper::body::Incoming;
use hyper::{Request, Response};
use ratelimit::AddressLimiter;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};
use zeroize::Zeroizing;

/// The metrics label of paths that match no route.
const UNMATCHED: &str = "unmatched";
/// Longest path recorded as the resource of an `auth_failed` event on an
/// unmatched path (the path is the caller's, so it is bounded).
const MAX_AUDITED_PATH: usize = 64;

pub struct AdminApi {
    app: Arc<App>,
    auth: Authenticator,
    /// Lives with the listener; its state is per address and self-cleaning.
    limiter: AddressLimiter,
}

impl AdminApi {
    pub fn new(app: Arc<App>) -> Self {
        let auth = Authenticator::new(&app.config.admin_auth);
        AdminApi {
            app,
            auth,
            limiter: AddressLimiter::new(Instant::now()),
        }
    }

    /// The request path up to the route function; every error is returned,
    /// none rendered.
    async fn respond(
        &self,
        req: Request<Incoming>,
        target: Option<&Target<'_>>,
        client: IpAddr,
        request_id: &str,
    ) -> Result<Response<Body>, GatewayError> {
        self.limiter.check(client, Instant::now()).map_err(|wait| {
            GatewayError::rate_limited(
                "Too many requests from this address. Retry later.",
                whole_seconds(wait),
            )
        })?;
        let refuse = |failure| {
            let resource = target.map_or_else(
                || req.uri().path().chars().take(MAX_AUDITED_PATH).collect(),
                |t| t.resource.template().to_owned(),
            );
            auth::refuse(&self.app, &resource, client, request_id, failure)
        };
        let principal = self.auth.authenticate(req.headers()).map_err(refuse)?;
        let target = target.ok_or_else(|| GatewayError::not_found("No such endpoint."))?;
        let endpoint = target.resource.endpoint(req.method()).ok_or_else(|| {
            GatewayError::invalid("This method is not allowed on this endpoint.")
                .with_status(StatusCode::METHOD_NOT_ALLOWED)
        })?;
        principal.require(endpoint.scope()).map_err(refuse)?;

        let query = match endpoint.query_fields() {
            Some(fields) => Query::parse(req.uri().query(), fields)?,
            None => Query::default(),
        };
        let (parts, body) = req.into_parts();
        let body = if parts.method == Method::GET {
            Zeroizing::new(Vec::new())
        } else {
            dto::read_body(body, self.app.config.server.body_read_timeout).await?
        };
        let call = Call {
            app: &self.app,
            principal: &principal,
            id: target.id,
            query: &query,
            body: &body,
        };
        endpoint.run(&call).await
    }
}

impl Handler for AdminApi {
    async fn handle(&self, req: Request<Incoming>, conn: ConnInfo) -> Response<Body> {
        let started = Instant::now();
        let request_id = RequestId::of(req.headers());
        let client = conn.peer.ip();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let target = Target::resolve(&path);
        let route = target.as_ref().map_or(UNMATCHED, |t| t.resource.template());

        let mut resp = match self
            .respond(req, target.as_ref(), client, request_id.as_str())
            .await
        {
            Ok(resp) => resp,
            Err(e) => {
                let status = e.status;
                let mut resp = e.into_response(request_id.as_str());
                if let (StatusCode::METHOD_NOT_ALLOWED, Some(t)) = (status, &target)
                    && let Ok(allow) = HeaderValue::from_str(&t.resource.allowed_methods())
                {
                    resp.headers_mut().insert(header::ALLOW, allow);
                }
                resp
            }
        };
        finish(&mut resp, &request_id, conn.tls);

        let status = resp.status();
        self.app
            .metrics
            .admin_requests
            .with_label_values(&[route, status.as_str()])
            .inc();
        tracing::info!(
            method = %method,
            route,
            status = status.as_u16(),
            request_id = %request_id,
            duration_ms = started.elapsed().as_secs_f64() * 1000.0,
            client = %client,
            "admin request"
        );
        resp
    }
}

/// `Retry-After` wants whole seconds; round up so a client that waits that
/// long is let in.
fn whole_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

// === Routing ===

/// Every route the router serves, as `(method, path template, scope)`: each
/// [`Resource`] crossed with the methods [`Resource::endpoint`] accepts, and
/// that endpoint's [`Endpoint::scope`]. `tests/openapi.rs` compares it with
/// `docs/admin-api.yaml`.
pub fn routes() -> Vec<(Method, &'static str, &'static str)> {
    let methods = [
        Method::GET,
        Method::HEAD,
        Method::POST,
        Method::PUT,
        Method::PATCH,
        Method::DELETE,
        Method::OPTIONS,
        Method::TRACE,
        Method::CONNECT,
    ];
    Resource::ALL
        .into_iter()
        .flat_map(|r| {
            methods.iter().filter_map(move |m| {
                r.endpoint(m)
                    .map(|e| (m.clone(), r.template(), e.scope().as_str()))
            })
        })
        .collect()
}

/// A path of the API, independent of the method.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Resource {
    Keys,
    Key,
    KeyRevoke,
    KeyReactivate,
    Audit,
    Providers,
    EncryptionRotate,
}

/// A matched path: the resource and its `{id}` segment, if it has one.
#[derive(Debug, PartialEq, Eq)]
struct Target<'p> {
    resource: Resource,
    id: Option<&'p str>,
}

impl<'p> Target<'p> {
    fn resolve(path: &'p str) -> Option<Self> {
        let rest = path.strip_prefix("/admin/v1/")?;
        let segments: Vec<&str> = rest.split('/').collect();
        let (resource, id) = match segments.as_slice() {
            ["keys"] => (Resource::Keys, None),
            ["keys", id] if !id.is_empty() => (Resource::Key, Some(*id)),
            ["keys", id, "revoke"] if !id.is_empty() => (Resource::KeyRevoke, Some(*id)),
            ["keys", id, "reactivate"] if !id.is_empty() => (Resource::KeyReactivate, Some(*id)),
            ["audit"] => (Resource::Audit, None),
            ["providers"] => (Resource::Providers, None),
            ["encryption", "rotate"] => (Resource::EncryptionRotate, None),
            _ => return None,
        };
        Some(Target { resource, id })
    }
}

impl Resource {
    /// Every variant, for [`routes`].
    const ALL: [Resource; 7] = [
        Resource::Keys,
        Resource::Key,
        Resource::KeyRevoke,
        Resource::KeyReactivate,
        Resource::Audit,
        Resource::Providers,
        Resource::EncryptionRotate,
    ];

    /// The metrics label and log field: never the raw path.
    fn template(self) -> &'static str {
        match self {
            Resource::Keys => "/admin/v1/keys",
            Resource::Key => "/admin/v1/keys/{id}",
            Resource::KeyRevoke => "/admin/v1/keys/{id}/revoke",
            Resource::KeyReactivate => "/admin/v1/keys/{id}/reactivate",
            Resource::Audit => "/admin/v1/audit",
            Resource::Providers => "/admin/v1/providers",
            Resource::EncryptionRotate => "/admin/v1/encryption/rotate",
        }
    }

    fn endpoint(self, method: &Method) -> Option<Endpoint> {
        use Resource as R;
        Some(match (self, method) {
            (R::Keys, &Method::GET) => Endpoint::ListKeys,
            (R::Keys, &Method::POST) => Endpoint::CreateKey,
            (R::Key, &Method::GET) => Endpoint::GetKey,
            (R::Key, &Method::PATCH) => Endpoint::UpdateKey,
            (R::Key, &Method::DELETE) => Endpoint::DeleteKey,
            (R::KeyRevoke, &Method::POST) => Endpoint::RevokeKey,
            (R::KeyReactivate, &Method::POST) => Endpoint::ReactivateKey,
            (R::Audit, &Method::GET) => Endpoint::ListAudit,
            (R::Providers, &Method::GET) => Endpoint::ListProviders,
            (R::EncryptionRotate, &Method::POST) => Endpoint::RotateEncryption,
            _ => return None,
        })
    }

    /// The `Allow` header of a 405, derived from [`Resource::endpoint`].
    fn allowed_methods(self) -> String {
        [Method::GET, Method::POST, Method::PATCH, Method::DELETE]
            .iter()
            .filter(|m| self.endpoint(m).is_some())
            .map(Method::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// One operation of the API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Endpoint {
    ListKeys,
    CreateKey,
    GetKey,
    UpdateKey,
    DeleteKey,
    RevokeKey,
    ReactivateKey,
    ListAudit,
    ListProviders,
    RotateEncryption,
}

impl Endpoint {
    fn scope(self) -> Scope {
        match self {
            Endpoint::ListKeys | Endpoint::GetKey | Endpoint::ListProviders => Scope::KeysRead,
            Endpoint::CreateKey
            | Endpoint::UpdateKey
            | Endpoint::DeleteKey
            | Endpoint::RevokeKey
            | Endpoint::ReactivateKey
            | Endpoint::RotateEncryption => Scope::KeysWrite,
            Endpoint::ListAudit => Scope::AuditRead,
        }
    }

    /// The query parameters the operation reads; any other is a 400, so a
    /// misspelt or misplaced parameter is never silently without effect.
    /// `None`: the query string is ignored (documented for
    /// `GET /providers`).
    fn query_fields(self) -> Option<&'static [&'static Field]> {
        match self {
            Endpoint::ListKeys => Some(&[
                &dto::PROVIDER_FILTER,
                &dto::STATE,
                &dto::LIMIT,
                &dto::CURSOR,
            ]),
            Endpoint::ListAudit => Some(&[
                &dto::RESOURCE,
                &dto::EVENT,
                &dto::SINCE,
                &dto::UNTIL,
                &dto::LIMIT,
                &dto::CURSOR,
            ]),
            Endpoint::ListProviders => None,
            Endpoint::CreateKey
            | Endpoint::GetKey
            | Endpoint::UpdateKey
            | Endpoint::DeleteKey
            | Endpoint::RevokeKey
            | Endpoint::ReactivateKey
            | Endpoint::RotateEncryption => Some(&[]),
        }
    }

    async fn run(self, call: &Call<'_>) -> Result<Response<Body>, GatewayError> {
        match self {
            Endpoint::ListKeys => keys::list(call).await,
            Endpoint::CreateKey => keys::create(call).await,
            Endpoint::GetKey => keys::get(call).await,
            Endpoint::UpdateKey => keys::update(call).await,
            Endpoint::DeleteKey => keys::delete(call).await,
            Endpoint::RevokeKey => keys::revoke(call).await,
            Endpoint::ReactivateKey => keys::reactivate(call).await,
            Endpoint::ListAudit => audit::list(call).await,
            Endpoint::ListProviders => keys::providers(call).await,
            Endpoint::RotateEncryption => keys::rotate(call).await,
        }
    }
}

/// What a route function gets: the authenticated request, already routed.
struct Call<'a> {
    app: &'a App,
    principal: &'a Principal,
    /// The `{id}` path segment as sent; [`Call::key_id`] validates it.
    id: Option<&'a str>,
    /// Already held to [`Endpoint::query_fields`].
    query: &'a Query,
    /// Empty for GET.
    body: &'a [u8],
}

impl Call<'_> {
    fn key_id(&self) -> Result<KeyId, GatewayError> {
        self.id
            .and_then(KeyId::parse)
            .ok_or_else(|| GatewayError::invalid("id: must match ^key_[a-z0-9]{8,32}$"))
    }

    fn actor(&self) -> Actor {
        self.principal.actor()
    }
}

/// A failed store call as the client sees it: 503 while the store is
/// unreachable, 500 otherwise, with a static message either way (the store's
/// own text goes to the log and metrics via [`App::store_failed`]).
fn store_error(app: &App, op: StoreOp, e: StoreError) -> GatewayError {
    match app.store_failed(op, e) {
        StoreError::Unavailable(_) => GatewayError::new(
            ErrorKind::InternalError,
            "The key store is unavailable. Retry later.",
        )
        .with_status(StatusCode::SERVICE_UNAVAILABLE),
        _ => GatewayError::internal(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_resolve_to_resources_and_ids() {
        let t = |p| Target::resolve(p);
        assert_eq!(t("/admin/v1/keys").unwrap().resource, Resource::Keys);
        let key = t("/admin/v1/keys/key_abcdefgh").unwrap();
        assert_eq!(
            (key.resource, key.id),
            (Resource::Key, Some("key_abcdefgh"))
        );
        assert_eq!(
            t("/admin/v1/keys/x/revoke").unwrap().resource,
            Resource::KeyRevoke
        );
        assert_eq!(
            t("/admin/v1/keys/x/reactivate").unwrap().resource,
            Resource::KeyReactivate
        );
        assert_eq!(t("/admin/v1/audit").unwrap().resource, Resource::Audit);
        assert_eq!(
            t("/admin/v1/providers").unwrap().resource,
            Resource::Providers
        );
        assert_eq!(
            t("/admin/v1/encryption/rotate").unwrap().resource,
            Resource::EncryptionRotate
        );
        for unmatched in [
            "/",
            "/admin/v1",
            "/admin/v1/",
            "/admin/v1/keys/",
            "/admin/v2/keys",
            "/admin/v1/keys/a/b",
            "/admin/v1/keys//revoke",
        ] {
            assert_eq!(t(unmatched), None, "{unmatched}");
        }
    }

    #[test]
    fn methods_scopes_and_allow_header() {
        assert_eq!(
            Resource::Keys.endpoint(&Method::POST),
            Some(Endpoint::CreateKey)
        );
        assert_eq!(Resource::Keys.endpoint(&Method::DELETE), None);
        assert_eq!(Resource::Key.allowed_methods(), "GET, PATCH, DELETE");
        assert_eq!(Resource::Keys.allowed_methods(), "GET, POST");
        assert_eq!(Endpoint::ListAudit.scope(), Scope::AuditRead);
        assert_eq!(Endpoint::RotateEncryption.scope(), Scope::KeysWrite);
        assert_eq!(Endpoint::ListProviders.scope(), Scope::KeysRead);
    }

    #[test]
    fn retry_after_rounds_up() {
        assert_eq!(whole_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(whole_seconds(Duration::from_secs(3)), 3);
    }
}
