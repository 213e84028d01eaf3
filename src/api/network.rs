//! `/v1/sessions/{id}/network`: a session's network by name (issue 22), read and replaced while it runs.

use axum::Json;
use axum::extract::Path;

use super::extract::ApiJson;
use super::state::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::session::model::NetworkRequest;
use crate::session::network::NetworkView;

/// A session's network: the allow-list its next connection follows, its open connections, and whether
/// the egress proxy is up. 403 `network_off` when the server offers no networks.
#[utoipa::path(get, path = "/v1/sessions/{id}/network", operation_id = "get_session_network", tag = "sessions",
    responses((status = 200, body = NetworkView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody)))]
pub async fn get(caller: Caller, Path(id): Path<String>) -> Result<Json<NetworkView>, ApiError> {
    Ok(Json(caller.manager.network(&caller.owner, &id)?))
}

/// Replace a session's allow-list (an empty list takes every name away). The next connection follows
/// it; open connections to a host it no longer allows are closed. 422 names an entry that is malformed
/// or that the operator forbids; 403 `network_off` when the server offers no networks.
#[utoipa::path(put, path = "/v1/sessions/{id}/network", operation_id = "set_session_network", request_body = NetworkRequest, tag = "sessions",
    responses((status = 200, body = NetworkView), (status = 403, body = ErrorBody), (status = 404, body = ErrorBody), (status = 422, body = ErrorBody)))]
pub async fn put(
    caller: Caller,
    Path(id): Path<String>,
    ApiJson(req): ApiJson<NetworkRequest>,
) -> Result<Json<NetworkView>, ApiError> {
    Ok(Json(caller.manager.set_network(&caller.owner, &id, &req)?))
}
