//! Key states and the one function that moves a key between them.
//!
//! The contract's state table lives here and nowhere else: the router, the
//! probes and the management API all ask [`transition`] for the next state, so
//! an illegal move (reviving a revoked key, say) cannot be written anywhere.

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

/// The label of a key's state, as the API, the store and metrics spell it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeyState {
    Active,
    CoolingDown,
    Exhausted,
    Invalid,
    Revoked,
}

impl KeyState {
    /// Every state, in the order the providers listing and metrics show them.
    pub const ALL: [KeyState; 5] = [
        KeyState::Active,
        KeyState::CoolingDown,
        KeyState::Exhausted,
        KeyState::Invalid,
        KeyState::Revoked,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            KeyState::Active => "active",
            KeyState::CoolingDown => "cooling_down",
            KeyState::Exhausted => "exhausted",
            KeyState::Invalid => "invalid",
            KeyState::Revoked => "revoked",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        KeyState::ALL.into_iter().find(|state| state.as_str() == s)
    }
}

/// A key's state with the data that only some states have: a cooldown always
/// has an end, and no other state has one.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyStatus {
    Active,
    CoolingDown { until: DateTime<Utc> },
    Exhausted,
    Invalid,
    Revoked,
}

impl KeyStatus {
    pub fn state(&self) -> KeyState {
        match self {
            KeyStatus::Active => KeyState::Active,
            KeyStatus::CoolingDown { .. } => KeyState::CoolingDown,
            KeyStatus::Exhausted => KeyState::Exhausted,
            KeyStatus::Invalid => KeyState::Invalid,
            KeyStatus::Revoked => KeyState::Revoked,
        }
    }

    pub fn cooldown_until(&self) -> Option<DateTime<Utc>> {
        match self {
            KeyStatus::CoolingDown { until } => Some(*until),
            _ => None,
        }
    }

    /// Rebuilds a status from its stored parts. A cooling-down key without an
    /// end is treated as already cooled down rather than stuck forever.
    pub fn from_parts(state: KeyState, cooldown_until: Option<DateTime<Utc>>) -> Self {
        match (state, cooldown_until) {
            (KeyState::Active, _) | (KeyState::CoolingDown, None) => KeyStatus::Active,
            (KeyState::CoolingDown, Some(until)) => KeyStatus::CoolingDown { until },
            (KeyState::Exhausted, _) => KeyStatus::Exhausted,
            (KeyState::Invalid, _) => KeyStatus::Invalid,
            (KeyState::Revoked, _) => KeyStatus::Revoked,
        }
    }
}

/// Something that happened to a key: a provider answer, the clock, a probe or
/// an operator.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyEvent {
    /// The provider answered 429 (rate limit); the key rests until `until`.
    RateLimited { until: DateTime<Utc> },
    /// A cooldown reached its end.
    CooldownOver,
    /// The provider said the quota or billing is exhausted.
    QuotaExhausted,
    /// The provider answered 401 or 403 for this key.
    Rejected,
    /// An operator asked for the key to be used again.
    Reactivated,
    /// A background probe with this key succeeded.
    ProbeSucceeded,
    /// An operator revoked or deleted the key.
    Revoked,
}

impl KeyEvent {
    /// One event of each kind, a rate limit lasting until `until`: what
    /// [`state_changes`] tries on every state.
    pub fn every(until: DateTime<Utc>) -> [KeyEvent; 7] {
        [
            KeyEvent::RateLimited { until },
            KeyEvent::CooldownOver,
            KeyEvent::QuotaExhausted,
            KeyEvent::Rejected,
            KeyEvent::Reactivated,
            KeyEvent::ProbeSucceeded,
            KeyEvent::Revoked,
        ]
    }

    /// A provider's refusal of the key (which the router holds the key out
    /// for until it is stored).
    pub fn is_refusal(&self) -> bool {
        matches!(
            self,
            KeyEvent::RateLimited { .. } | KeyEvent::QuotaExhausted | KeyEvent::Rejected
        )
    }

    /// The audit record's `reason` for a transition caused by this event.
    pub fn reason(&self) -> &'static str {
        match self {
            KeyEvent::RateLimited { .. } => "upstream_rate_limited",
            KeyEvent::CooldownOver => "cooldown_elapsed",
            KeyEvent::QuotaExhausted => "upstream_quota_exhausted",
            KeyEvent::Rejected => "upstream_unauthorized",
            KeyEvent::Reactivated => "operator_reactivated",
            KeyEvent::ProbeSucceeded => "probe_succeeded",
            KeyEvent::Revoked => "operator_revoked",
        }
    }
}

/// The event does not apply to a key in this state.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("a key that is {} cannot be {}", from.as_str(), event_name(event))]
pub struct IllegalTransition {
    pub from: KeyState,
    pub event: KeyEvent,
}

fn event_name(event: &KeyEvent) -> &'static str {
    match event {
        KeyEvent::RateLimited { .. } => "rate limited",
        KeyEvent::CooldownOver => "released from a cooldown",
        KeyEvent::QuotaExhausted => "marked exhausted",
        KeyEvent::Rejected => "marked invalid",
        KeyEvent::Reactivated => "reactivated",
        KeyEvent::ProbeSucceeded => "restored by a probe",
        KeyEvent::Revoked => "revoked",
    }
}

/// The contract's state table.
///
/// A 429 on a key that is already cooling down keeps it cooling down until the
/// later of the two ends (a request that was in flight when the first 429
/// arrived may bring a second one).
pub fn transition(from: KeyStatus, event: KeyEvent) -> Result<KeyStatus, IllegalTransition> {
    use KeyStatus as S;
    let next = match (from, event) {
        (S::Active, KeyEvent::RateLimited { until }) => S::CoolingDown { until },
        (S::CoolingDown { until: old }, KeyEvent::RateLimited { until }) => S::CoolingDown {
            until: old.max(until),
        },
        (S::CoolingDown { .. }, KeyEvent::CooldownOver) => S::Active,
        (S::Active | S::CoolingDown { .. }, KeyEvent::QuotaExhausted) => S::Exhausted,
        (S::Active | S::CoolingDown { .. }, KeyEvent::Rejected) => S::Invalid,
        (S::Exhausted | S::Invalid, KeyEvent::Reactivated | KeyEvent::ProbeSucceeded) => S::Active,
        (S::Active | S::CoolingDown { .. } | S::Exhausted | S::Invalid, KeyEvent::Revoked) => {
            S::Revoked
        }
        (from, event) => {
            return Err(IllegalTransition {
                from: from.state(),
                event,
            });
        }
    };
    Ok(next)
}

/// Every move from one state to another that [`transition`] allows, each
/// once, in the order of [`KeyState::ALL`]: the label pairs of
/// `keyrouter_key_transitions_total`, which exist at zero from the start.
/// Asked of the table itself, so the list cannot drift from it. A move
/// that keeps the state (a second 429 on a resting key) is not a change.
pub fn state_changes() -> Vec<(KeyState, KeyState)> {
    let at = DateTime::<Utc>::UNIX_EPOCH;
    let mut changes = Vec::new();
    for from in KeyState::ALL {
        let status = KeyStatus::from_parts(from, Some(at));
        for event in KeyEvent::every(at) {
            if let Ok(next) = transition(status, event) {
                let change = (from, next.state());
                if change.0 != change.1 && !changes.contains(&change) {
                    changes.push(change);
                }
            }
        }
    }
    changes
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn t(secs: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + secs, 0).unwrap()
    }

    #[test]
    fn table_of_the_contract() {
        use KeyStatus as S;
        let cool = S::CoolingDown { until: t(10) };
        let rl = KeyEvent::RateLimited { until: t(10) };
        assert_eq!(transition(S::Active, rl), Ok(cool));
        assert_eq!(transition(cool, KeyEvent::CooldownOver), Ok(S::Active));
        assert_eq!(
            transition(S::Active, KeyEvent::QuotaExhausted),
            Ok(S::Exhausted)
        );
        assert_eq!(transition(cool, KeyEvent::QuotaExhausted), Ok(S::Exhausted));
        assert_eq!(transition(S::Active, KeyEvent::Rejected), Ok(S::Invalid));
        assert_eq!(transition(cool, KeyEvent::Rejected), Ok(S::Invalid));
        assert_eq!(
            transition(S::Exhausted, KeyEvent::Reactivated),
            Ok(S::Active)
        );
        assert_eq!(
            transition(S::Invalid, KeyEvent::ProbeSucceeded),
            Ok(S::Active)
        );
        for s in [S::Active, cool, S::Exhausted, S::Invalid] {
            assert_eq!(transition(s, KeyEvent::Revoked), Ok(S::Revoked));
        }
    }

    #[test]
    fn repeated_rate_limit_keeps_the_later_end() {
        let cool = KeyStatus::CoolingDown { until: t(30) };
        let next = transition(cool, KeyEvent::RateLimited { until: t(5) }).unwrap();
        assert_eq!(next.cooldown_until(), Some(t(30)));
    }

    #[test]
    fn illegal_moves_are_refused() {
        use KeyStatus as S;
        assert!(transition(S::Revoked, KeyEvent::Reactivated).is_err());
        assert!(transition(S::Revoked, KeyEvent::Revoked).is_err());
        assert!(transition(S::Active, KeyEvent::Reactivated).is_err());
        assert!(transition(S::Exhausted, KeyEvent::RateLimited { until: t(1) }).is_err());
        assert!(transition(S::Invalid, KeyEvent::CooldownOver).is_err());
        assert!(transition(S::Active, KeyEvent::CooldownOver).is_err());
    }

    #[test]
    fn state_changes_are_the_tables_moves() {
        use KeyState as S;
        assert_eq!(
            state_changes(),
            [
                (S::Active, S::CoolingDown),
                (S::Active, S::Exhausted),
                (S::Active, S::Invalid),
                (S::Active, S::Revoked),
                (S::CoolingDown, S::Active),
                (S::CoolingDown, S::Exhausted),
                (S::CoolingDown, S::Invalid),
                (S::CoolingDown, S::Revoked),
                (S::Exhausted, S::Active),
                (S::Exhausted, S::Revoked),
                (S::Invalid, S::Active),
                (S::Invalid, S::Revoked),
            ]
        );
    }

    fn any_event() -> impl Strategy<Value = KeyEvent> {
        (0i64..100, 0..KeyEvent::every(t(0)).len())
            .prop_map(|(s, kind)| KeyEvent::every(t(s))[kind])
    }

    proptest! {
        /// Random event sequences: revoked is terminal, a cooldown always has an
        /// end, and the stored form round-trips.
        #[test]
        fn random_sequences_stay_legal(events in proptest::collection::vec(any_event(), 0..64)) {
            let mut status = KeyStatus::Active;
            for event in events {
                match transition(status, event) {
                    Ok(next) => {
                        prop_assert_ne!(status.state(), KeyState::Revoked);
                        prop_assert_eq!(KeyStatus::from_parts(next.state(), next.cooldown_until()), next);
                        status = next;
                    }
                    Err(e) => prop_assert_eq!(e.from, status.state()),
                }
            }
        }
    }
}
