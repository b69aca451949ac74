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
//! next request the same way, and is probed back again. Each such relapse
//! doubles the spacing of that key's probes, up to [`MAX_SPACING`]
//! intervals, so a key that cannot serve stops flapping (and filling the
//! audit log) at every interval; a key that stays healthy for that long
//! starts afresh.

use super::Health;
use crate::app::App;
use crate::config::{ProviderConfig, ProviderKind};
use crate::keys::pool::credential_header;
use crate::keys::{KeyEvent, KeyId, KeyState};
use crate::proxy::upstream::Upstream;
use bytes::Bytes;
use http::{HeaderMap, Method, Uri};
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// Probes `provider`'s exhausted and invalid keys every `interval` until
/// `shutdown`.
pub async fn run(
    app: Arc<App>,
    provider: ProviderConfig,
    interval: Duration,
    shutdown: CancellationToken,
) {
    let upstream = match Upstream::new(&provider, &app.config.server) {
        Ok(u) => u,
        Err(e) => {
            tracing::error!(error = %e, "probes disabled");
            return;
        }
    };
    let mut schedule = Schedule::new(interval);
    loop {
        let pass_start = Instant::now();
        let candidates = match app.store.all_keys().await {
            Ok(records) => records
                .into_iter()
                .filter(|r| r.provider_id == provider.id && r.sealed.is_some())
                .filter(|r| matches!(r.status.state(), KeyState::Exhausted | KeyState::Invalid))
                .collect(),
            Err(e) => {
                app.store_failed("all_keys", e);
                Vec::new()
            }
        };
        schedule.new_pass(candidates.iter().map(|r| &r.id), Instant::now());
        let gap = interval / (candidates.len() as u32 + 1);
        for record in candidates {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(gap) => {}
            }
            if !schedule.is_due(&record.id, Instant::now()) {
                continue;
            }
            schedule.probing(&record.id, Instant::now());
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
            let Ok(uri) = probe_uri(&provider) else {
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
                    schedule.revived(&record.id, Instant::now());
                    Health::record(&app, &record.id, KeyEvent::ProbeSucceeded);
                }
                Ok(resp) => {
                    tracing::debug!(key_id = %record.id, status = resp.status().as_u16(), "probe refused");
                }
                Err(e) => tracing::debug!(key_id = %record.id, error = e.as_str(), "probe failed"),
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(pass_start + interval) => {}
        }
    }
}

/// The most intervals between two probes of a key that keeps relapsing.
const MAX_SPACING: u32 = 64;

/// When each exhausted or invalid key is next probed.
struct Schedule {
    interval: Duration,
    keys: HashMap<KeyId, KeyProbes>,
}

struct KeyProbes {
    last_probe: Instant,
    /// When a probe last brought the key back, until it is seen failing
    /// again.
    revived: Option<Instant>,
    /// Times the key failed again after a probe brought it back.
    relapses: u32,
}

impl Schedule {
    fn new(interval: Duration) -> Self {
        Schedule {
            interval,
            keys: HashMap::new(),
        }
    }

    /// Starts a pass over `candidates`, the keys exhausted or invalid now.
    /// A candidate that a probe brought back has relapsed. A key that is no
    /// longer a candidate is forgotten, unless a probe brought it back less
    /// than [`MAX_SPACING`] intervals ago (it may yet relapse).
    fn new_pass<'a>(&mut self, candidates: impl Iterator<Item = &'a KeyId>, now: Instant) {
        let stable_after = self.interval * MAX_SPACING;
        let mut seen = std::collections::HashSet::new();
        for id in candidates {
            if let Some(k) = self.keys.get_mut(id)
                && k.revived.take().is_some()
            {
                k.relapses += 1;
            }
            seen.insert(id.clone());
        }
        self.keys.retain(|id, k| {
            seen.contains(id)
                || k.revived
                    .is_some_and(|t| now.duration_since(t) < stable_after)
        });
    }

    /// Whether `id` may be probed at `now`: one interval after its last
    /// probe, twice that for each relapse, at most [`MAX_SPACING`].
    fn is_due(&self, id: &KeyId, now: Instant) -> bool {
        self.keys.get(id).is_none_or(|k| {
            let spacing = 1u32
                .checked_shl(k.relapses)
                .map_or(MAX_SPACING, |s| s.min(MAX_SPACING));
            now.duration_since(k.last_probe) >= self.interval * spacing
        })
    }

    fn probing(&mut self, id: &KeyId, now: Instant) {
        self.keys
            .entry(id.clone())
            .and_modify(|k| k.last_probe = now)
            .or_insert(KeyProbes {
                last_probe: now,
                revived: None,
                relapses: 0,
            });
    }

    fn revived(&mut self, id: &KeyId, now: Instant) {
        if let Some(k) = self.keys.get_mut(id) {
            k.revived = Some(now);
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

    const INTERVAL: Duration = Duration::from_secs(10);

    fn key(n: u8) -> KeyId {
        KeyId::parse(&format!("key_test{n:04}")).unwrap()
    }

    #[test]
    fn a_failing_key_is_probed_once_per_interval() {
        let mut s = Schedule::new(INTERVAL);
        let t0 = Instant::now();
        let a = key(1);
        s.new_pass([&a].into_iter(), t0);
        assert!(s.is_due(&a, t0));
        s.probing(&a, t0);
        assert!(!s.is_due(&a, t0 + INTERVAL / 2));
        s.new_pass([&a].into_iter(), t0 + INTERVAL);
        assert!(s.is_due(&a, t0 + INTERVAL));
    }

    #[test]
    fn each_relapse_doubles_the_spacing_up_to_the_cap() {
        let mut s = Schedule::new(INTERVAL);
        let a = key(1);
        let mut now = Instant::now();
        let mut spacings = Vec::new();
        for _ in 0..9 {
            s.new_pass([&a].into_iter(), now);
            // The first moment the key is due, in whole intervals.
            let mut waited = 0;
            while !s.is_due(&a, now + INTERVAL * waited) {
                waited += 1;
            }
            spacings.push(waited);
            now += INTERVAL * waited;
            s.probing(&a, now);
            // The probe brings it back; the next pass finds it failing.
            s.revived(&a, now);
            now += Duration::from_secs(1);
        }
        assert_eq!(spacings, [0, 2, 4, 8, 16, 32, 64, 64, 64]);
    }

    #[test]
    fn a_key_that_stays_healthy_starts_afresh() {
        let mut s = Schedule::new(INTERVAL);
        let a = key(1);
        let b = key(2);
        let t0 = Instant::now();
        for k in [&a, &b] {
            s.new_pass([k].into_iter(), t0);
            s.probing(k, t0);
            s.revived(k, t0);
        }
        // `a` fails again after its probe: it waits two intervals from it.
        // `b` stays healthy.
        s.new_pass([&a].into_iter(), t0 + INTERVAL);
        assert!(!s.is_due(&a, t0 + INTERVAL));
        assert!(s.is_due(&a, t0 + INTERVAL * 2));
        assert!(s.keys.contains_key(&b), "b may yet relapse");
        // Healthy for the whole span: `b` is forgotten, and when it fails
        // again later it is probed at the plain interval.
        let later = t0 + INTERVAL * MAX_SPACING;
        s.new_pass([&a].into_iter(), later);
        assert!(!s.keys.contains_key(&b));
        s.new_pass([&b].into_iter(), later);
        s.probing(&b, later);
        s.new_pass([&b].into_iter(), later + INTERVAL);
        assert!(s.is_due(&b, later + INTERVAL));
    }
}
