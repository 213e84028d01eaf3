//! `/v1/sessions`: start, list, inspect, interrupt, restart and end sessions.

use axum::Extension;
use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;

use super::extract::ApiJson;
use super::state::AppState;
use crate::error::{ApiError, ErrorBody};
use crate::session::{Owner, SessionInfo, SessionRequest};

/// Start a session: a private kernel in its own container. Returns once the kernel is ready.
#[utoipa::path(post, path = "/v1/sessions", request_body = SessionRequest, tag = "sessions",
    responses((status = 201, body = SessionInfo), (status = 422, body = ErrorBody), (status = 429, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn create(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    ApiJson(req): ApiJson<SessionRequest>,
) -> Result<(StatusCode, Json<SessionInfo>), ApiError> {
    let info = state.manager.create(owner, req).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

/// The caller's sessions.
#[utoipa::path(get, path = "/v1/sessions", tag = "sessions", responses((status = 200, body = Vec<SessionInfo>)))]
pub async fn list(State(state): State<AppState>, Extension(owner): Extension<Owner>) -> Json<Vec<SessionInfo>> {
    Json(state.manager.list(&owner))
}

#[utoipa::path(get, path = "/v1/sessions/{id}", tag = "sessions",
    responses((status = 200, body = SessionInfo), (status = 404, body = ErrorBody)))]
pub async fn get(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Json<SessionInfo>, ApiError> {
    Ok(Json(state.manager.get(&owner, &id)?.info()))
}

/// End a session and remove its container.
#[utoipa::path(delete, path = "/v1/sessions/{id}", tag = "sessions",
    responses((status = 204), (status = 404, body = ErrorBody)))]
pub async fn delete(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.manager.delete(&owner, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Interrupt the running execution (like Ctrl-C); the session keeps its state.
#[utoipa::path(post, path = "/v1/sessions/{id}/interrupt", tag = "sessions",
    responses((status = 202), (status = 404, body = ErrorBody)))]
pub async fn interrupt(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    state.manager.interrupt(&owner, &id)?;
    Ok(StatusCode::ACCEPTED)
}

/// Restart the kernel: fresh state, same container and files (a dead session gets a new container).
#[utoipa::path(post, path = "/v1/sessions/{id}/restart", tag = "sessions",
    responses((status = 200, body = SessionInfo), (status = 404, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn restart(
    State(state): State<AppState>,
    Extension(owner): Extension<Owner>,
    Path(id): Path<String>,
) -> Result<Json<SessionInfo>, ApiError> {
    Ok(Json(state.manager.restart(&owner, &id).await?))
}
