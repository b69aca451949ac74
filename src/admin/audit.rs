//! `GET /admin/v1/audit`: the audit log, newest first, filtered and paged.

use super::dto::{self, PageView};
use super::{Call, store_error};
use crate::audit::EventKind;
use crate::error::GatewayError;
use crate::http::{Body, json};
use crate::metrics::StoreOp;
use crate::store::AuditFilter;
use http::{Response, StatusCode};

pub(super) async fn list(call: &Call<'_>) -> Result<Response<Body>, GatewayError> {
    let q = call.query;
    let filter = AuditFilter {
        resource: q.parsed(&dto::RESOURCE, dto::resource_filter)?,
        event: q.parsed(&dto::EVENT, EventKind::parse)?,
        since: q.parsed(&dto::SINCE, dto::timestamp)?,
        until: q.parsed(&dto::UNTIL, dto::timestamp)?,
    };
    // By the milliseconds they name, as the store applies them: both in
    // one millisecond is that millisecond, not an empty range.
    if let (Some(since), Some(until)) = (filter.since, filter.until)
        && until.timestamp_millis() < since.timestamp_millis()
    {
        return Err(GatewayError::invalid("until: must not be before since"));
    }
    let page = q.page()?;
    let found = call
        .app
        .store
        .list_audit(&filter, &page)
        .await
        .map_err(|e| store_error(call.app, StoreOp::ListAudit, e))?;
    Ok(json(
        StatusCode::OK,
        &PageView {
            items_name: "events",
            items: &found.items,
            next: found.next.as_ref(),
        },
    ))
}
