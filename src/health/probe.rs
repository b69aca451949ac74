//! Recovery probes: when a provider sets `probe_interval`, its exhausted and
//! invalid keys are tried with a cheap authenticated request (listing models)
//! and go back to active when the provider accepts them again, so a pool
//! never shrinks to zero silently after a billing top-up or a provider-side
//! fix.
//!
//! Probes of one pass are spread over the interval, and no key is probed
//! twice within one interval, whatever the timing of the passes.

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
    let mut last_probe: HashMap<KeyId, Instant> = HashMap::new();
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
        last_probe.retain(|id, _| candidates.iter().any(|r| &r.id == id));
        let gap = interval / (candidates.len() as u32 + 1);
        for record in candidates {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(gap) => {}
            }
            if last_probe
                .get(&record.id)
                .is_some_and(|t| t.elapsed() < interval)
            {
                continue;
            }
            last_probe.insert(record.id.clone(), Instant::now());
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
