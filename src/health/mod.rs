//! Key health: what providers say about keys moves them between states.
//!
//! ```text
//! proxy sees 429/402/401/403 ──► report() ──► pool drops the key at once
//!                                         └─► store: transition + audit event
//!                                             (background, retried until it lands)
//! pool reload sees a cooldown that ended ──► report(CooldownOver)
//! probe succeeds for an exhausted/invalid key ──► report(ProbeSucceeded)
//! ```
//!
//! Every state change goes through [`crate::keys::transition`] against the
//! record just read from the store, and is written with a revision check, so
//! replicas reporting the same thing at once produce one transition and one
//! audit event, and nothing a router does can undo an operator's revoke.

pub mod probe;

use crate::app::App;
use crate::audit::{Actor, AuditEvent, EventKind};
use crate::keys::{KeyEvent, KeyId, KeyRecord, transition};
use crate::metrics::{RetryReason, StoreOp};
use crate::store::StoreError;
use chrono::{DateTime, DurationRound, Utc};
use dashmap::DashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio_util::task::TaskTracker;

/// How long a transition keeps being retried while the store is unreachable.
pub(crate) const PERSIST_GIVE_UP: Duration = Duration::from_secs(600);
const MIN_BACKOFF: Duration = Duration::from_millis(100);
const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// Router-side bookkeeping of key health.
pub struct Health {
    /// Keys with a transition being written, and the latest event that
    /// arrived meanwhile: a burst of 429s on one key starts one write, not
    /// hundreds, and an event arriving during a write is written after it.
    writing: DashMap<KeyId, Option<KeyEvent>>,
    /// Consecutive rate-limit cooldowns per key, for the doubling.
    streaks: DashMap<KeyId, Streak>,
    /// Where transitions are written: the gateway's main runtime, not the
    /// proxy thread whose request noticed the refusal (a write must not
    /// wait behind that thread's requests, nor stop when that thread stops
    /// on shutdown before the others).
    writer: tokio::runtime::Handle,
    /// The writes under way, which a graceful stop waits for: what a
    /// provider said about a key just before the stop is not lost.
    writes: TaskTracker,
}

#[derive(Clone, Copy)]
struct Streak {
    repeats: u32,
    last_until: DateTime<Utc>,
}

/// What a provider answer says about the key that served it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// 429: rest the key; `retry_after` from the provider when it sent one.
    RateLimited { retry_after: Option<Duration> },
    /// 402, or 429 with `insufficient_quota`.
    QuotaExhausted,
    /// 401 or 403.
    Rejected,
}

impl Verdict {
    pub fn retry_reason(self) -> RetryReason {
        match self {
            Verdict::RateLimited { .. } => RetryReason::KeyRateLimited,
            Verdict::QuotaExhausted => RetryReason::KeyQuotaExhausted,
            Verdict::Rejected => RetryReason::KeyRejected,
        }
    }
}

impl Health {
    /// Transitions are written on `writer`.
    pub fn new(writer: tokio::runtime::Handle) -> Self {
        Health {
            writing: DashMap::new(),
            streaks: DashMap::new(),
            writer,
            writes: TaskTracker::new(),
        }
    }

    /// Waits until every transition reported so far is written, or until
    /// `deadline`: a write that keeps failing (the store away) is retried
    /// for minutes, longer than a stop can wait. Called on shutdown, once
    /// no request can report anything more.
    pub async fn drain(&self, deadline: tokio::time::Instant) {
        self.writes.close();
        if tokio::time::timeout_at(deadline, self.writes.wait())
            .await
            .is_err()
        {
            tracing::error!(
                pending = self.writes.len(),
                "key state changes were still being written when the drain time ran out"
            );
        }
    }

    /// The cooldown for a 429: the provider's `Retry-After` when given, else
    /// the configured base, doubled for each repeat (a 429 arriving within
    /// `cooldown_max` of the previous cooldown's end) up to `cooldown_max`;
    /// its end rounded up to a whole second.
    fn cooldown_until(
        &self,
        app: &App,
        id: &KeyId,
        retry_after: Option<Duration>,
    ) -> DateTime<Utc> {
        let now = Utc::now();
        let rl = &app.config.rate_limit;
        let mut streak = self.streaks.entry(id.clone()).or_insert(Streak {
            repeats: 0,
            last_until: DateTime::<Utc>::MIN_UTC,
        });
        let recent = now - streak.last_until
            < chrono::Duration::from_std(rl.cooldown_max).unwrap_or(chrono::Duration::MAX);
        streak.repeats = if recent {
            streak.repeats.saturating_add(1)
        } else {
            0
        };
        let wait = retry_after.unwrap_or_else(|| {
            let factor = 1u32.checked_shl(streak.repeats.min(20)).unwrap_or(u32::MAX);
            rl.cooldown_base.saturating_mul(factor).min(rl.cooldown_max)
        });
        let until = now + chrono::Duration::from_std(wait).unwrap_or(chrono::Duration::MAX);
        // On a whole second: the key object shows `cooldown_until` in
        // whole seconds, and the shown time must not come before the end.
        let until = until
            .duration_round_up(chrono::TimeDelta::seconds(1))
            .unwrap_or(until);
        streak.last_until = until;
        until
    }

    /// Reports what the provider said about `key` (provider `provider`):
    /// this replica stops choosing it at once, and the transition is written
    /// in the background.
    pub fn report(app: &Arc<App>, provider: &str, key: &KeyId, verdict: Verdict) {
        let event = match verdict {
            Verdict::RateLimited { retry_after } => KeyEvent::RateLimited {
                until: app.health.cooldown_until(app, key, retry_after),
            },
            Verdict::QuotaExhausted => KeyEvent::QuotaExhausted,
            Verdict::Rejected => KeyEvent::Rejected,
        };
        app.pool.suspend(provider, key, event);
        Self::record(app, key, event);
    }

    /// Writes `event` for `key` in the background; while a write for the
    /// key is under way, the event waits for it (the latest one wins).
    pub fn record(app: &Arc<App>, key: &KeyId, event: KeyEvent) {
        match app.health.writing.entry(key.clone()) {
            dashmap::Entry::Occupied(mut waiting) => {
                // A recovery noticed meanwhile (a cooldown over, a probe)
                // does not replace a refusal waiting to be stored: the
                // refusal is the newer news about the key.
                let queued_refusal = waiting.get().is_some_and(|e| e.is_refusal());
                if event.is_refusal() || !queued_refusal {
                    waiting.insert(Some(event));
                }
                return;
            }
            dashmap::Entry::Vacant(slot) => {
                slot.insert(None);
            }
        }
        let (writer, writes) = (&app.health.writer, app.health.writes.clone());
        let app = app.clone();
        let key = key.clone();
        let write = async move {
            let mut next = Some(event);
            while let Some(event) = next {
                app.metrics.audit_pending.inc();
                persist(&app, &key, event).await;
                app.metrics.audit_pending.dec();
                // Done unless an event arrived during the write.
                let finished = app
                    .health
                    .writing
                    .remove_if(&key, |_, waiting| waiting.is_none());
                next = if finished.is_some() {
                    None
                } else {
                    app.health.writing.get_mut(&key).and_then(|mut w| w.take())
                };
            }
        };
        writes.spawn_on(write, writer);
    }

    /// Cooling-down keys whose cooldown has ended go back to active (called
    /// with every pool reload, so the recovery is recorded within one reload
    /// interval of the cooldown's end).
    pub fn recover_cooled(app: &Arc<App>, records: &[KeyRecord]) {
        let now = Utc::now();
        for r in records {
            if r.status.cooldown_until().is_some_and(|until| until <= now) {
                Self::record(app, &r.id, KeyEvent::CooldownOver);
            }
        }
    }
}

/// Reads the key, applies the transition and writes it with its audit event;
/// retries on concurrent writes and, with backoff, while the store is down.
/// Then the pool stops holding the key out for the refusals this write dealt
/// with, whether a transition was stored or not.
async fn persist(app: &Arc<App>, id: &KeyId, event: KeyEvent) {
    let started = std::time::Instant::now();
    let mut backoff = MIN_BACKOFF;
    loop {
        match try_persist(app, id, event).await {
            // Stored or not, the refusals made before this write began are
            // dealt with: the pool follows the store for them again.
            Ok(()) => return app.pool.settled(id, started),
            Err(StoreError::Stale) => continue,
            Err(e) => {
                let e = app.store_failed(StoreOp::UpdateKey, e);
                if started.elapsed() > PERSIST_GIVE_UP {
                    tracing::error!(key_id = %id, error = %e, "key transition could not be stored; giving up");
                    return app.pool.settled(id, started);
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

async fn try_persist(app: &Arc<App>, id: &KeyId, event: KeyEvent) -> Result<(), StoreError> {
    let Some(current) = app.store.get_key(id).await? else {
        return Ok(());
    };
    let Ok(next_status) = transition(current.status, event) else {
        // Already moved on (another replica, an operator): nothing to do.
        return Ok(());
    };
    let (from, to) = (current.status.state(), next_status.state());
    if from == to {
        // A second 429 for a key that is already resting: the first
        // cooldown stands, and no transition happened.
        return Ok(());
    }
    let audit = AuditEvent::new(EventKind::KeyStateChanged, Actor::Router, id.as_str())
        .transition(from, to)
        .reason(event.reason());
    let mut next = current.clone();
    next.status = next_status;
    next.state_reason = Some(event.reason().to_owned());
    next.revision = current.revision + 1;
    next.updated_at = audit.timestamp;
    next.state_changed_at = audit.timestamp;
    app.store.update_key(&next, &audit).await?;
    app.metrics.count_state_change(&next.provider_id, from, to);
    tracing::info!(
        key_id = %id, provider = %next.provider_id, from = from.as_str(), to = to.as_str(),
        reason = event.reason(), "key state changed"
    );
    app.pool.apply(&next, &app.vault);
    let _ = app.refresh_key_gauges().await;
    Ok(())
}
