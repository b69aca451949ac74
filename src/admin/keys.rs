//! The key routes: registration, listing, reading, changes, the operator's
//! state moves (revoke, reactivate, delete), encryption rotation and the
//! provider overview.
//!
//! Every change is a read-modify-write through [`write_key`]: the new record
//! carries `revision + 1`, so the store refuses it if anyone (another
//! operator, the router on any replica) wrote the key in between, and the
//! change is retried on a fresh read. State moves go through
//! [`keys::transition`](crate::keys::transition) only, so an illegal move is
//! a 409 here exactly as it is an error everywhere else. Each change is
//! written together with its audit event.

use super::dto::{self, KeyView, PageView, ProvidersView, Rotated, Usage};
use super::{Call, store_error};
use crate::app::App;
use crate::audit::{AuditEvent, EventKind};
use crate::error::GatewayError;
use crate::http::{Body, json};
use crate::keys::rotate::{self, RotateError};
use crate::keys::vault::fingerprint;
use crate::keys::{KeyEvent, KeyId, KeyRecord, KeyState, KeyStatus, transition};
use crate::metrics::StoreOp;
use crate::store::{KeyFilter, StoreError};
use http::{Response, StatusCode};

/// Attempts of one change before giving up on a key that keeps changing.
const WRITE_ATTEMPTS: usize = 5;
/// `state_reason` and audit reason of a key erased by `DELETE`.
const DELETED: &str = "operator_deleted";

/// `POST /keys`.
pub(super) async fn create(call: &Call<'_>) -> Result<Response<Body>, GatewayError> {
    let app = call.app;
    let new = dto::new_key(call.body, |id| app.config.provider(id).is_some())?;
    let id = KeyId::generate();
    let mut event = AuditEvent::new(EventKind::KeyRegistered, call.actor(), id.as_str());
    event.to = Some(KeyState::Active);
    let key = KeyRecord {
        provider_id: new.provider_id,
        label: new.label,
        status: KeyStatus::Active,
        state_reason: None,
        limits: new.limits,
        weight: new.weight,
        fingerprint: fingerprint(&new.material),
        metadata: new.metadata,
        created_at: event.timestamp,
        updated_at: event.timestamp,
        state_changed_at: event.timestamp,
        revision: 1,
        sealed: Some(app.vault.seal(&new.material)),
        material_hash: Some(app.vault.material_hash(&new.material)),
        id,
    };
    let hashes = app.vault.material_hashes(&new.material);
    // The plaintext is not needed past this point; dropping it zeroes it.
    drop(new.material);
    match app.store.insert_key(&key, &hashes, &event).await {
        Ok(()) => {}
        Err(StoreError::Duplicate) => {
            return Err(GatewayError::conflict(
                "This key material is already registered for this provider.",
            ));
        }
        Err(e) => return Err(store_error(app, StoreOp::InsertKey, e)),
    }
    written(app, &key, &event).await;
    Ok(json(StatusCode::CREATED, &KeyView::new(&key)))
}

/// `GET /keys`.
pub(super) async fn list(call: &Call<'_>) -> Result<Response<Body>, GatewayError> {
    let q = call.query;
    let filter = KeyFilter {
        provider_id: q.parsed(&dto::PROVIDER_FILTER, dto::provider_filter)?,
        state: q.parsed(&dto::STATE, KeyState::parse)?,
    };
    let page = q.page()?;
    let found = call
        .app
        .store
        .list_keys(&filter, &page)
        .await
        .map_err(|e| store_error(call.app, StoreOp::ListKeys, e))?;
    let views: Vec<KeyView> = found.items.iter().map(KeyView::new).collect();
    Ok(json(
        StatusCode::OK,
        &PageView {
            items_name: "keys",
            items: &views,
            next: found.next.as_ref(),
        },
    ))
}

/// `GET /keys/{id}`.
pub(super) async fn get(call: &Call<'_>) -> Result<Response<Body>, GatewayError> {
    let key = read_key(call, &call.key_id()?).await?;
    let usage = usage(call.app, &key).await;
    Ok(json(StatusCode::OK, &KeyView::new(&key).with_usage(usage)))
}

/// A key's live counters (requests and tokens in the last minute, sliding
/// estimate; requests in flight), kept while it rests: this replica's, or
/// every replica's where Redis counts them (see [`Limiter::usage`]).
///
/// [`Limiter::usage`]: crate::limits::Limiter::usage
async fn usage(app: &App, key: &KeyRecord) -> Usage {
    let here = app.pool.usage(&key.id);
    let counters = app.limiter.usage(key.id.as_str(), &key.limits, here).await;
    Usage {
        requests_last_minute: counters.requests_last_minute,
        tokens_last_minute: counters.tokens_last_minute,
        in_flight: u64::from(counters.in_flight),
    }
}

/// `PATCH /keys/{id}`.
pub(super) async fn update(call: &Call<'_>) -> Result<Response<Body>, GatewayError> {
    let id = call.key_id()?;
    let changes = dto::key_changes(call.body)?;
    let key = write_key(call, &id, |_, next| {
        changes.apply(next);
        Ok(event(call, EventKind::KeyUpdated, &id)
            .reason(format!("changed {}", changes.fields().join(", "))))
    })
    .await?;
    Ok(json(StatusCode::OK, &KeyView::new(&key)))
}

/// `POST /keys/{id}/revoke`.
pub(super) async fn revoke(call: &Call<'_>) -> Result<Response<Body>, GatewayError> {
    let id = call.key_id()?;
    let reason =
        dto::revoke_reason(call.body)?.unwrap_or_else(|| KeyEvent::Revoked.reason().to_owned());
    let key = write_key(call, &id, |current, next| {
        move_state(current, next, KeyEvent::Revoked, &reason)?;
        Ok(event(call, EventKind::KeyRevoked, &id)
            .transition(current.status.state(), next.status.state())
            .reason(reason.clone()))
    })
    .await?;
    Ok(json(StatusCode::OK, &KeyView::new(&key)))
}

/// `POST /keys/{id}/reactivate`: exhausted or invalid back to active.
pub(super) async fn reactivate(call: &Call<'_>) -> Result<Response<Body>, GatewayError> {
    let id = call.key_id()?;
    dto::no_fields(call.body)?;
    let reason = KeyEvent::Reactivated.reason();
    let key = write_key(call, &id, |current, next| {
        move_state(current, next, KeyEvent::Reactivated, reason)?;
        Ok(event(call, EventKind::KeyReactivated, &id)
            .transition(current.status.state(), next.status.state())
            .reason(reason))
    })
    .await?;
    Ok(json(StatusCode::OK, &KeyView::new(&key)))
}

/// `DELETE /keys/{id}`: revoke (unless already revoked) and erase the sealed
/// material and its hash. The record and its audit history stay, and the
/// same material may be registered again.
pub(super) async fn delete(call: &Call<'_>) -> Result<Response<Body>, GatewayError> {
    let id = call.key_id()?;
    dto::no_fields(call.body)?;
    let key = write_key(call, &id, |current, next| {
        if current.sealed.is_none() {
            return Err(GatewayError::conflict("The key has already been deleted."));
        }
        if current.status.state() != KeyState::Revoked {
            move_state(current, next, KeyEvent::Revoked, DELETED)?;
        }
        next.sealed = None;
        next.material_hash = None;
        Ok(event(call, EventKind::KeyDeleted, &id)
            .transition(current.status.state(), next.status.state())
            .reason(DELETED))
    })
    .await?;
    Ok(json(StatusCode::OK, &KeyView::new(&key)))
}

/// `POST /encryption/rotate`.
pub(super) async fn rotate(call: &Call<'_>) -> Result<Response<Body>, GatewayError> {
    dto::no_fields(call.body)?;
    let app = call.app;
    match rotate::reencrypt_all(app.store.as_ref(), &app.vault, call.actor()).await {
        Ok(reencrypted) => Ok(json(StatusCode::OK, &Rotated { reencrypted })),
        Err(RotateError::Store(e)) => Err(store_error(app, StoreOp::ResealKeys, e)),
        Err(e @ RotateError::Undecryptable(_)) => {
            // The ring lacks a key that sealed stored material: an operator
            // mistake to fix in the configuration. The id goes to the log only.
            tracing::error!(error = %e, "encryption rotation refused");
            Err(GatewayError::internal())
        }
    }
}

/// `GET /providers`: configured providers with key counts per state.
pub(super) async fn providers(call: &Call<'_>) -> Result<Response<Body>, GatewayError> {
    let app = call.app;
    let counts = app
        .store
        .count_keys()
        .await
        .map_err(|e| store_error(app, StoreOp::CountKeys, e))?;
    Ok(json(
        StatusCode::OK,
        &ProvidersView::new(&app.config.providers, &counts),
    ))
}

/// After a key was written: the pool of this replica serves the change at
/// once (a revoked key is never chosen for a request that starts after the
/// revoke answered), and `keyrouter_keys` is current. A failed gauge refresh
/// is already logged and counted; the maintenance task retries it.
/// After a stored change: the pool applies it before the answer goes out,
/// the gauges follow, and the log records it (ids and states only).
async fn written(app: &App, key: &KeyRecord, event: &AuditEvent) {
    tracing::info!(
        key_id = %key.id,
        provider = %key.provider_id,
        event = event.event.as_str(),
        actor = %event.actor.render(),
        state = key.status.state().as_str(),
        "key changed"
    );
    app.pool.apply(key, &app.vault);
    let _ = app.refresh_key_gauges().await;
}

fn event(call: &Call<'_>, kind: EventKind, id: &KeyId) -> AuditEvent {
    AuditEvent::new(kind, call.actor(), id.as_str())
}

fn not_found() -> GatewayError {
    GatewayError::not_found("No key with this id.")
}

async fn read_key(call: &Call<'_>, id: &KeyId) -> Result<KeyRecord, GatewayError> {
    call.app
        .store
        .get_key(id)
        .await
        .map_err(|e| store_error(call.app, StoreOp::GetKey, e))?
        .ok_or_else(not_found)
}

/// Moves `next` to the state `event` leads to from `current`'s state, with
/// `reason` as its `state_reason`; 409 when the contract's table forbids it.
fn move_state(
    current: &KeyRecord,
    next: &mut KeyRecord,
    event: KeyEvent,
    reason: &str,
) -> Result<(), GatewayError> {
    next.status = transition(current.status, event).map_err(|illegal| {
        // The state machine's own text names only the state and the move.
        GatewayError::conflict(format!("Refused: {illegal}."))
    })?;
    next.state_reason = Some(reason.to_owned());
    Ok(())
}

/// The one read-modify-write of a key: reads it, lets `change` edit a copy
/// and name the audit event, then writes the copy with the next revision
/// (and a new `state_changed_at` if the state moved) together with the
/// event. A write that lost a race is retried on a fresh read; `change` runs
/// again, so its checks see the newest state. Refreshes `keyrouter_keys`,
/// and counts a state change in `keyrouter_key_transitions_total` as the
/// router's are.
async fn write_key<F>(call: &Call<'_>, id: &KeyId, change: F) -> Result<KeyRecord, GatewayError>
where
    F: Fn(&KeyRecord, &mut KeyRecord) -> Result<AuditEvent, GatewayError>,
{
    let app = call.app;
    for _ in 0..WRITE_ATTEMPTS {
        let current = read_key(call, id).await?;
        let mut next = current.clone();
        let event = change(&current, &mut next)?;
        next.revision = current.revision + 1;
        next.updated_at = event.timestamp;
        if next.status.state() != current.status.state() {
            next.state_changed_at = event.timestamp;
        }
        match app.store.update_key(&next, &event).await {
            Ok(()) => {
                let (from, to) = (current.status.state(), next.status.state());
                app.metrics.count_state_change(&next.provider_id, from, to);
                written(app, &next, &event).await;
                return Ok(next);
            }
            Err(StoreError::Stale) => continue,
            Err(StoreError::NotFound) => return Err(not_found()),
            Err(e) => return Err(store_error(app, StoreOp::UpdateKey, e)),
        }
    }
    tracing::warn!(key_id = %id, "key kept changing during an admin write; gave up");
    Err(GatewayError::conflict(
        "The key kept changing while this request tried to update it. Retry.",
    ))
}
