//! `/v1/sessions`: start, list, inspect, interrupt, restart and end sessions.

use axum::Json;
use axum::extract::Path;
use axum::http::StatusCode;

use super::extract::ApiJson;
use super::state::Caller;
use crate::error::{ApiError, ErrorBody};
use crate::session::{SessionInfo, SessionRequest};

/// Start a session: a private kernel in its own container. Returns once the kernel is ready. 429: the
/// key's session quota is full, or its creates per minute are spent (`Retry-After` says when to retry).
#[utoipa::path(post, path = "/v1/sessions", request_body = SessionRequest, tag = "sessions",
    responses((status = 201, body = SessionInfo), (status = 422, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create(
    caller: Caller,
    ApiJson(req): ApiJson<SessionRequest>,
) -> Result<(StatusCode, Json<SessionInfo>), ApiError> {
    let info = caller.manager.create(caller.owner, req).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

/// The caller's sessions. Through a cluster's API replica the list is merged from every node; a node that
/// did not answer in time is named in `x-kernelbox-nodes-missing` (the list is then incomplete).
#[utoipa::path(get, path = "/v1/sessions", tag = "sessions", responses((status = 200, body = Vec<SessionInfo>,
    headers(("x-kernelbox-nodes-missing" = String, description = "cluster only, and only when the list is incomplete: the comma-separated tags of the nodes that did not answer")))))]
pub async fn list(caller: Caller) -> Json<Vec<SessionInfo>> {
    Json(caller.manager.list(&caller.owner))
}

#[utoipa::path(get, path = "/v1/sessions/{id}", tag = "sessions",
    responses((status = 200, body = SessionInfo), (status = 404, body = ErrorBody)))]
pub async fn get(caller: Caller, Path(id): Path<String>) -> Result<Json<SessionInfo>, ApiError> {
    Ok(Json(caller.manager.get(&caller.owner, &id)?.info()))
}

/// End a session and remove its container.
#[utoipa::path(delete, path = "/v1/sessions/{id}", tag = "sessions",
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete(caller: Caller, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    caller.manager.delete(&caller.owner, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Interrupt the running execution (like Ctrl-C); the session keeps its state.
#[utoipa::path(post, path = "/v1/sessions/{id}/interrupt", tag = "sessions",
    responses((status = 202), (status = 404, body = ErrorBody)))]
pub async fn interrupt(caller: Caller, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    caller.manager.interrupt(&caller.owner, &id)?;
    Ok(StatusCode::ACCEPTED)
}

/// Restart the kernel: fresh state, same container and files (a dead session gets a new container).
#[utoipa::path(post, path = "/v1/sessions/{id}/restart", tag = "sessions",
    responses((status = 200, body = SessionInfo), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn restart(caller: Caller, Path(id): Path<String>) -> Result<Json<SessionInfo>, ApiError> {
    Ok(Json(caller.manager.restart(&caller.owner, &id).await?))
}
