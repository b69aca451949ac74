//! Recovery probes: when a provider sets `probe_interval`, its exhausted and
//! invalid keys are tried with a cheap authenticated request (listing models)
//! and go back to active when the provider accepts them again, so a pool
//! never shrinks to zero silently after a billing top-up or a provider-side
//! fix.
//!
//! Probes of one pass are spread over the interval, and no key is probed
//! twice within one interval, whatever the timing of the passes. A cheap
//! request can succeed for a key that still cannot serve (OpenAI lists
//! models for a key whose quota is gone): such a key comes back, fails its
//! next request, and is probed back again. Each such relapse doubles the
//! spacing of that key's probes, up to [`MAX_SPACING`] intervals, so a key
//! that cannot serve stops flapping (and filling the audit log) at every
//! interval; a key whose probe is refused outright (401, 402, 403), or that
//! stays healthy for that long, is probed every interval again.

use super::Health;
use crate::app::App;
use crate::config::{ProviderConfig, ProviderKind};
use crate::keys::pool::credential_header;
use crate::keys::{KeyEvent, KeyId, KeyRecord, KeyState};
use crate::metrics::StoreOp;
use crate::proxy::upstream::{self, Upstream};
use bytes::Bytes;
use chrono::{DateTime, Utc};
use http::{HeaderMap, Method, Uri};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// Probes `provider`'s exhausted and invalid keys every `interval`, for as
/// long as it is polled.
pub async fn run(app: Arc<App>, provider: ProviderConfig, interval: Duration) {
    let upstream = match upstream::tls_config(&provider) {
        Ok(tls) => Upstream::new(&provider, &app.config.server, tls),
        Err(e) => {
            tracing::error!(error = %e, "probes disabled");
            return;
        }
    };
    let mut schedule = Schedule::new(interval);
    loop {
        let pass_start = Instant::now();
        match app.store.all_keys().await {
            Ok(records) => {
                let candidates: Vec<KeyRecord> = records
                    .into_iter()
                    .filter(|r| r.provider_id == provider.id && is_candidate(r))
                    .collect();
                schedule.new_pass(&candidates, Instant::now());
                probe_pass(&app, &provider, &upstream, &mut schedule, candidates).await;
            }
            // No pass this time; what the schedule knows is kept.
            Err(e) => {
                app.store_failed(StoreOp::AllKeys, e);
            }
        }
        tokio::time::sleep_until(pass_start + interval).await;
    }
}

/// Whether a key is one to probe: exhausted or invalid, its material kept.
fn is_candidate(record: &KeyRecord) -> bool {
    record.sealed.is_some()
        && matches!(
            record.status.state(),
            KeyState::Exhausted | KeyState::Invalid
        )
}

/// Probes the due keys among `candidates`, spread over one interval, each
/// as it is now in the store.
async fn probe_pass(
    app: &Arc<App>,
    provider: &ProviderConfig,
    upstream: &Upstream,
    schedule: &mut Schedule,
    candidates: Vec<KeyRecord>,
) {
    let gap = schedule.interval / (candidates.len() as u32 + 1);
    for record in candidates {
        tokio::time::sleep(gap).await;
        if !schedule.is_due(&record.id, Instant::now()) {
            continue;
        }
        schedule.probing(&record.id, Instant::now());
        // The pass's records are up to an interval old: a key revoked or
        // deleted since (through any replica) must not be sent anywhere.
        let record = match app.store.get_key(&record.id).await {
            Ok(Some(now)) if is_candidate(&now) => now,
            Ok(_) => continue,
            Err(e) => {
                app.store_failed(StoreOp::GetKey, e);
                continue;
            }
        };
        let Some(sealed) = &record.sealed else {
            continue;
        };
        // The probe authenticates with the key itself.
        let Ok(material) = app.vault.open(sealed) else {
            continue;
        };
        let Some(credential) = credential_header(provider.kind, &material) else {
            continue;
        };
        let Ok(uri) = probe_uri(provider) else {
            continue;
        };
        let req = upstream.request(
            &Method::GET,
            uri,
            &HeaderMap::new(),
            &credential,
            Bytes::new(),
        );
        match upstream.send(req).await {
            Ok(resp) if resp.status().is_success() => {
                tracing::info!(key_id = %record.id, provider = %provider.id, "probe succeeded");
                schedule.revived(&record.id, Utc::now());
                Health::record(app, &record.id, KeyEvent::ProbeSucceeded);
            }
            Ok(resp) => {
                tracing::debug!(key_id = %record.id, status = resp.status().as_u16(), "probe refused");
                // Refused outright (not a passing 429 or 5xx): the key is
                // failing, not flapping.
                if matches!(resp.status().as_u16(), 401..=403) {
                    schedule.refused(&record.id);
                }
            }
            Err(e) => tracing::debug!(key_id = %record.id, error = e.as_str(), "probe failed"),
        }
    }
}

/// The most intervals between two probes of a key that keeps relapsing.
const MAX_SPACING: u64 = 64;

/// When each exhausted or invalid key is next probed. Spacing is counted in
/// passes (one per interval), so it does not hang on the exact timing of a
/// probe within its pass; a key is never probed twice within one interval
/// all the same (which can put a probe off by one pass when this pass's
/// probe would come a little early).
struct Schedule {
    interval: Duration,
    /// Passes started so far.
    pass: u64,
    keys: HashMap<KeyId, KeyProbes>,
}

struct KeyProbes {
    last_probe: Instant,
    last_pass: u64,
    /// When a probe last brought the key back, and in which pass, until it
    /// is seen failing again.
    revived: Option<(DateTime<Utc>, u64)>,
    /// Times the key failed again after a probe brought it back.
    relapses: u32,
}

impl Schedule {
    fn new(interval: Duration) -> Self {
        Schedule {
            interval,
            pass: 0,
            keys: HashMap::new(),
        }
    }

    /// Starts a pass over `candidates`, the keys exhausted or invalid now. A
    /// candidate that failed again after a probe brought it back has
    /// relapsed (one whose revival is not stored yet has not). A key that is
    /// no longer a candidate is forgotten, unless a probe brought it back
    /// less than [`MAX_SPACING`] passes ago (it may yet relapse).
    fn new_pass(&mut self, candidates: &[KeyRecord], now: Instant) {
        self.pass += 1;
        for c in candidates {
            if let Some(k) = self.keys.get_mut(&c.id)
                && let Some((revived_at, _)) = k.revived
                && c.state_changed_at > revived_at
            {
                k.revived = None;
                k.relapses = k.relapses.saturating_add(1);
            }
        }
        let pass = self.pass;
        let interval = self.interval;
        self.keys.retain(|id, k| {
            let candidate = candidates.iter().any(|c| &c.id == id);
            let may_relapse = k.revived.is_some_and(|(_, p)| pass - p < MAX_SPACING);
            // A key probed within the last interval stays known, so that it
            // is not probed again too soon.
            candidate || may_relapse || now.duration_since(k.last_probe) < interval
        });
    }

    /// Whether `id` may be probed at `now`: one pass after its last probe,
    /// twice as many for each relapse (at most [`MAX_SPACING`]), and never
    /// within one interval of it.
    fn is_due(&self, id: &KeyId, now: Instant) -> bool {
        self.keys.get(id).is_none_or(|k| {
            let spacing = 1u64
                .checked_shl(k.relapses)
                .map_or(MAX_SPACING, |s| s.min(MAX_SPACING));
            self.pass - k.last_pass >= spacing && now.duration_since(k.last_probe) >= self.interval
        })
    }

    fn probing(&mut self, id: &KeyId, now: Instant) {
        let pass = self.pass;
        self.keys
            .entry(id.clone())
            .and_modify(|k| {
                k.last_probe = now;
                k.last_pass = pass;
            })
            .or_insert(KeyProbes {
                last_probe: now,
                last_pass: pass,
                revived: None,
                relapses: 0,
            });
    }

    /// The provider refuses the key outright: it is failing, not flapping,
    /// and is probed every pass again, to notice a recovery soon.
    fn refused(&mut self, id: &KeyId) {
        if let Some(k) = self.keys.get_mut(id) {
            k.relapses = 0;
        }
    }

    fn revived(&mut self, id: &KeyId, at: DateTime<Utc>) {
        let pass = self.pass;
        if let Some(k) = self.keys.get_mut(id) {
            k.revived = Some((at, pass));
        }
    }
}

/// The cheapest authenticated request of each provider kind: its model list.
fn probe_uri(p: &ProviderConfig) -> Result<Uri, http::Error> {
    let path = match p.kind {
        ProviderKind::OpenAi | ProviderKind::OpenAiCompatible | ProviderKind::Anthropic => {
            "/v1/models"
        }
        ProviderKind::Gemini => "/v1beta/models",
        ProviderKind::AzureOpenAi => "/openai/models?api-version=2024-10-21",
    };
    let base = p.base_url.path().trim_end_matches('/');
    let mut parts = p.base_url.clone().into_parts();
    parts.path_and_query = Some(format!("{base}{path}").parse()?);
    Ok(Uri::from_parts(parts)?)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::keys::KeyStatus;

    const INTERVAL: Duration = Duration::from_secs(10);

    fn key(n: u8) -> KeyId {
        KeyId::parse(&format!("key_test{n:04}")).unwrap()
    }

    /// `id`, exhausted since `since`.
    fn failing(id: &KeyId, since: DateTime<Utc>) -> KeyRecord {
        KeyRecord {
            status: KeyStatus::Exhausted,
            ..KeyRecord::sample(id.as_str(), since)
        }
    }

    /// Runs `passes` passes, one interval apart, over `a` failing as of each
    /// pass; every probe succeeds (`revive`), and the revival is stored
    /// before the next pass. Returns the passes between probes.
    fn passes_between_probes(passes: u64, revive: bool) -> Vec<u64> {
        let mut s = Schedule::new(INTERVAL);
        let a = key(1);
        let (mut now, mut utc) = (Instant::now(), Utc::now());
        let (mut probed_in, mut between) = (None, Vec::new());
        for pass in 1..=passes {
            now += INTERVAL;
            utc += chrono::Duration::seconds(10);
            s.new_pass(&[failing(&a, utc)], now);
            if s.is_due(&a, now) {
                between.extend(probed_in.map(|p| pass - p));
                probed_in = Some(pass);
                s.probing(&a, now);
                if revive {
                    s.revived(&a, utc + chrono::Duration::seconds(1));
                }
            }
        }
        between
    }

    #[test]
    fn a_key_that_stays_failing_is_probed_every_pass() {
        assert_eq!(passes_between_probes(6, false), [1, 1, 1, 1, 1]);
    }

    #[test]
    fn each_relapse_doubles_the_spacing_up_to_the_cap() {
        assert_eq!(
            passes_between_probes(300, true),
            [2, 4, 8, 16, 32, 64, 64, 64]
        );
    }

    /// A schedule whose one key a probe has just brought back; the time of
    /// that pass.
    fn revived_once(a: &KeyId) -> (Schedule, Instant, DateTime<Utc>) {
        let mut s = Schedule::new(INTERVAL);
        let (now, utc) = (Instant::now(), Utc::now());
        s.new_pass(&[failing(a, utc)], now);
        s.probing(a, now);
        s.revived(a, utc + chrono::Duration::seconds(1));
        (s, now, utc)
    }

    #[test]
    fn a_refused_probe_ends_the_spacing() {
        let a = key(1);
        let (mut s, mut now, utc) = revived_once(&a);
        now += INTERVAL;
        s.new_pass(&[failing(&a, utc + chrono::Duration::seconds(5))], now);
        assert!(!s.is_due(&a, now), "relapsed: two passes");
        now += INTERVAL;
        s.new_pass(&[failing(&a, utc + chrono::Duration::seconds(5))], now);
        assert!(s.is_due(&a, now));
        s.probing(&a, now);
        s.refused(&a);
        now += INTERVAL;
        s.new_pass(&[failing(&a, utc + chrono::Duration::seconds(5))], now);
        assert!(s.is_due(&a, now), "refused: every pass again");
    }

    #[test]
    fn never_twice_within_one_interval() {
        let mut s = Schedule::new(INTERVAL);
        let a = key(1);
        let t0 = Instant::now();
        s.new_pass(&[failing(&a, Utc::now())], t0);
        assert!(s.is_due(&a, t0));
        s.probing(&a, t0);
        // A pass that comes early (the previous one ran long).
        s.new_pass(&[failing(&a, Utc::now())], t0 + INTERVAL / 2);
        assert!(!s.is_due(&a, t0 + INTERVAL / 2));
        assert!(s.is_due(&a, t0 + INTERVAL));
    }

    #[test]
    fn a_revival_not_stored_yet_is_no_relapse() {
        let mut s = Schedule::new(INTERVAL);
        let a = key(1);
        let (t0, before) = (Instant::now(), Utc::now());
        s.new_pass(&[failing(&a, before)], t0);
        s.probing(&a, t0);
        s.revived(&a, before + chrono::Duration::seconds(1));
        // The store still shows the old failure: due again next pass.
        s.new_pass(&[failing(&a, before)], t0 + INTERVAL);
        assert!(s.is_due(&a, t0 + INTERVAL));
        // A failure after the revival is a relapse: two passes.
        s.probing(&a, t0 + INTERVAL);
        s.new_pass(
            &[failing(&a, before + chrono::Duration::seconds(5))],
            t0 + INTERVAL * 2,
        );
        assert!(!s.is_due(&a, t0 + INTERVAL * 2));
        s.new_pass(
            &[failing(&a, before + chrono::Duration::seconds(5))],
            t0 + INTERVAL * 3,
        );
        assert!(s.is_due(&a, t0 + INTERVAL * 3));
    }

    #[test]
    fn a_key_that_stays_healthy_starts_afresh() {
        let a = key(1);
        let (mut s, mut now, utc) = revived_once(&a);
        // Healthy (not a candidate) for the whole span: forgotten.
        for _ in 0..MAX_SPACING {
            now += INTERVAL;
            s.new_pass(&[], now);
        }
        assert!(s.keys.is_empty());
        // It fails much later: probed at once, and the pass after.
        let later = utc + chrono::Duration::days(1);
        s.new_pass(&[failing(&a, later)], now);
        assert!(s.is_due(&a, now));
        s.probing(&a, now);
        now += INTERVAL;
        s.new_pass(&[failing(&a, later)], now);
        assert!(s.is_due(&a, now));
    }
}
