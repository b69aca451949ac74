//! The audit record. Every field is a closed enum or an id, so an event cannot
//! carry key material by construction.

use crate::keys::KeyState;
use chrono::{DateTime, SecondsFormat, Utc};
use serde::{Serialize, Serializer};
use std::net::IpAddr;

/// What happened (`event` in the contract's shape).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum EventKind {
    KeyRegistered,
    KeyUpdated,
    KeyRevoked,
    KeyDeleted,
    KeyReactivated,
    KeyStateChanged,
    EncryptionRotated,
    AuthFailed,
}

impl EventKind {
    pub const ALL: [EventKind; 8] = [
        EventKind::KeyRegistered,
        EventKind::KeyUpdated,
        EventKind::KeyRevoked,
        EventKind::KeyDeleted,
        EventKind::KeyReactivated,
        EventKind::KeyStateChanged,
        EventKind::EncryptionRotated,
        EventKind::AuthFailed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::KeyRegistered => "key_registered",
            EventKind::KeyUpdated => "key_updated",
            EventKind::KeyRevoked => "key_revoked",
            EventKind::KeyDeleted => "key_deleted",
            EventKind::KeyReactivated => "key_reactivated",
            EventKind::KeyStateChanged => "key_state_changed",
            EventKind::EncryptionRotated => "encryption_rotated",
            EventKind::AuthFailed => "auth_failed",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        EventKind::ALL.into_iter().find(|k| k.as_str() == s)
    }

    /// The `action` that goes with each event.
    pub fn action(self) -> &'static str {
        match self {
            EventKind::KeyRegistered => "register",
            EventKind::KeyUpdated => "update",
            EventKind::KeyRevoked => "revoke",
            EventKind::KeyDeleted => "delete",
            EventKind::KeyReactivated => "reactivate",
            EventKind::KeyStateChanged => "transition",
            EventKind::EncryptionRotated => "rotate",
            EventKind::AuthFailed => "authenticate",
        }
    }
}

/// Who caused it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Actor {
    /// The gateway itself: provider answers, cooldowns, probes.
    Router,
    /// An operator: `api_key`, a JWT `sub`, or `cli` for offline commands.
    Admin(String),
    /// A caller that failed to authenticate.
    Anonymous,
}

impl Actor {
    pub fn render(&self) -> String {
        match self {
            Actor::Router => "router".into(),
            Actor::Admin(principal) => format!("admin:{principal}"),
            Actor::Anonymous => "anonymous".into(),
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "router" => Some(Actor::Router),
            "anonymous" => Some(Actor::Anonymous),
            other => other
                .strip_prefix("admin:")
                .map(|p| Actor::Admin(p.to_owned())),
        }
    }
}

impl Serialize for Actor {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.render())
    }
}

/// `success` or `failure`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Success,
    Failure,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Success => "success",
            Outcome::Failure => "failure",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "success" => Some(Outcome::Success),
            "failure" => Some(Outcome::Failure),
            _ => None,
        }
    }
}

/// One audit record, in the contract's shape when serialized.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct AuditEvent {
    pub id: String,
    #[serde(serialize_with = "millis")]
    pub timestamp: DateTime<Utc>,
    #[serde(serialize_with = "event_kind")]
    pub event: EventKind,
    pub actor: Actor,
    /// A key id, `encryption` for rotations, or the requested path for
    /// `auth_failed`.
    pub resource: String,
    pub action: &'static str,
    pub from: Option<KeyState>,
    pub to: Option<KeyState>,
    pub reason: Option<String>,
    pub result: Outcome,
    /// The caller's address; set on `auth_failed` only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_addr: Option<IpAddr>,
}

fn millis<S: Serializer>(t: &DateTime<Utc>, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&t.to_rfc3339_opts(SecondsFormat::Millis, true))
}

fn event_kind<S: Serializer>(k: &EventKind, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(k.as_str())
}

impl AuditEvent {
    /// A new successful event about `resource`, stamped now. Timestamps are
    /// truncated to microseconds, the precision both stores keep.
    pub fn new(event: EventKind, actor: Actor, resource: impl Into<String>) -> Self {
        AuditEvent {
            id: crate::ids::prefixed("evt_", 20),
            timestamp: now_micros(),
            event,
            actor,
            resource: resource.into(),
            action: event.action(),
            from: None,
            to: None,
            reason: None,
            result: Outcome::Success,
            client_addr: None,
        }
    }

    pub fn transition(mut self, from: KeyState, to: KeyState) -> Self {
        self.from = Some(from);
        self.to = Some(to);
        self
    }

    pub fn reason(mut self, reason: impl Into<String>) -> Self {
        self.reason = Some(reason.into());
        self
    }

    /// An `auth_failed` event: actor `anonymous`, the caller's address, never
    /// the presented credential.
    pub fn auth_failed(path: &str, client_addr: IpAddr, reason: &'static str) -> Self {
        let mut e = AuditEvent::new(EventKind::AuthFailed, Actor::Anonymous, path);
        e.result = Outcome::Failure;
        e.reason = Some(reason.into());
        e.client_addr = Some(client_addr);
        e
    }
}

/// Now, at the microsecond precision the stores keep (so a record reads back
/// equal to what was written).
pub fn now_micros() -> DateTime<Utc> {
    let now = Utc::now();
    DateTime::from_timestamp_micros(now.timestamp_micros()).unwrap_or(now)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serializes_in_contract_shape() {
        let e = AuditEvent::new(EventKind::KeyStateChanged, Actor::Router, "key_7f3k2m9q")
            .transition(KeyState::Active, KeyState::CoolingDown)
            .reason("upstream_rate_limited");
        let v = serde_json::to_value(&e).unwrap();
        assert_eq!(v["event"], "key_state_changed");
        assert_eq!(v["actor"], "router");
        assert_eq!(v["action"], "transition");
        assert_eq!(v["from"], "active");
        assert_eq!(v["to"], "cooling_down");
        assert_eq!(v["result"], "success");
        assert!(v["id"].as_str().unwrap().starts_with("evt_"));
        let ts = v["timestamp"].as_str().unwrap();
        assert_eq!(ts.len(), "2026-11-23T10:30:00.123Z".len(), "{ts}");
        assert!(v.get("client_addr").is_none());
    }

    #[test]
    fn actor_round_trips() {
        for a in [
            Actor::Router,
            Actor::Anonymous,
            Actor::Admin("ops@x".into()),
        ] {
            assert_eq!(Actor::parse(&a.render()), Some(a));
        }
    }
}
