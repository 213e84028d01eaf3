//! A cluster agent's own routes and middleware, on its mutually authenticated listener only:
//! `GET /internal/v1/info` (what the node reports, [`NodeReporter`]), the gate that answers 503
//! `not_ready` until the agent holds its state directory's lock and has adopted its sessions, and the
//! contact stamp every request from the API tier leaves (which fencing reads, `session/fence.rs`).
//! Handlers only translate.

use std::sync::{Arc, OnceLock};

use axum::Json;
use axum::Router;
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tower::ServiceExt;

use crate::error::ApiError;
use crate::node::{AgentInfo, INFO_PATH};
use crate::session::SessionManager;
use crate::session::node_report::NodeReporter;

/// What the agent's routes share: its report, and (once ready) its manager and its full router.
#[derive(Clone)]
pub struct Agent {
    pub reporter: Arc<NodeReporter>,
    /// Set once the agent is ready: the public router (owner trusted from the header) and its manager.
    pub serving: Arc<OnceLock<(Arc<SessionManager>, Router)>>,
}

/// The router of the agent's cluster listener: `GET /internal/v1/info`, then (once ready) the public API
/// behind `x-kernelbox-owner`; every request stamps contact.
pub fn cluster_router(agent: Agent) -> Router {
    Router::new()
        .route(INFO_PATH, get(info))
        .fallback(gated)
        .layer(axum::middleware::from_fn_with_state(agent.clone(), contact))
        .with_state(agent)
}

/// `GET /internal/v1/info`.
pub async fn info(State(agent): State<Agent>) -> Json<AgentInfo> {
    match agent.serving.get() {
        Some((manager, _)) => Json(agent.reporter.info(manager).await),
        None => Json(agent.reporter.not_ready_info()),
    }
}

/// Everything but the info: the public router once ready, else 503 `not_ready`.
async fn gated(State(agent): State<Agent>, req: Request) -> Response {
    match agent.serving.get() {
        Some((_, router)) => router.clone().oneshot(req).await.into_response(),
        None => not_ready(),
    }
}

fn not_ready() -> Response {
    let mut response = ApiError::new(
        StatusCode::SERVICE_UNAVAILABLE,
        "not_ready",
        "this agent is starting: it waits for its state directory's lock or is adopting its sessions; retry shortly",
    )
    .into_response();
    response.headers_mut().insert(axum::http::header::RETRY_AFTER, axum::http::HeaderValue::from_static("1"));
    response
}

/// Middleware: the API tier reached this agent now (fencing first, if that ends a gap past `lost_after`).
pub async fn contact(State(agent): State<Agent>, req: Request, next: Next) -> Response {
    if let Some((manager, _)) = agent.serving.get() {
        manager.contact(chrono::Utc::now());
    }
    next.run(req).await
}

/// The agent's plain listener (loopback, for the container's health check): `/healthz` always,
/// `/readyz` 200 once ready, else 503 with why.
pub fn health_router(agent: Agent) -> Router {
    Router::new()
        .route("/healthz", get(|| async { Json(serde_json::json!({ "status": "ok" })) }))
        .route("/readyz", get(readyz))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "this listener serves /healthz and /readyz only")
        })
        .with_state(agent)
}

async fn readyz(State(agent): State<Agent>) -> Response {
    let ready = agent.reporter.is_ready() && agent.serving.get().is_some();
    let info = agent.reporter.not_ready_info();
    let body = serde_json::json!({ "ready": ready, "node_tag": info.node_tag, "reasons": if ready { vec![] } else { info.reasons } });
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(body)).into_response()
}
