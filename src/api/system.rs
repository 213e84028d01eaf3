//! Health, readiness, metrics and the language list.

use std::sync::{Arc, OnceLock};

use axum::Json;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde::Serialize;

use super::mcp::BoundedSessions;
use super::state::AppState;
use crate::images::catalog::{LABEL_DISPLAY_NAME, LABEL_LANGUAGE_VERSION};
use crate::session::SessionStatus;
use crate::session::pool::PoolStatus;

#[derive(Serialize, utoipa::ToSchema)]
pub struct Health {
    pub status: &'static str,
}

/// The process is alive.
#[utoipa::path(get, path = "/healthz", tag = "system", responses((status = 200, body = Health)))]
pub async fn healthz() -> Json<Health> {
    Json(Health { status: "ok" })
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct Readiness {
    pub ready: bool,
    pub docker: bool,
    /// Images that are not built.
    pub missing_images: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Docker is reachable and every kernel image is present.
#[utoipa::path(get, path = "/readyz", tag = "system", responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let runtime = state.manager.runtime();
    if let Err(e) = runtime.ping().await {
        let body = Readiness { ready: false, docker: false, missing_images: vec![], message: Some(e.to_string()) };
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body));
    }
    let catalog = state.manager.catalog();
    let mut missing = Vec::new();
    for image in catalog.language_images() {
        if !matches!(runtime.image(&catalog.image_ref(&image)).await, Ok(Some(_))) {
            missing.push(image);
        }
    }
    let ready = missing.is_empty();
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let message = (!ready).then(|| "some kernel images are missing: run `kernelbox images build`".to_owned());
    (status, Json(Readiness { ready, docker: true, missing_images: missing, message }))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct LanguageInfo {
    pub name: String,
    pub image: String,
    pub display_name: Option<String>,
    pub language_version: Option<String>,
    /// The image is built and sessions can start.
    pub available: bool,
    /// Kernels booted ahead of demand: a session that fits starts from one in milliseconds.
    pub pool: PoolStatus,
}

/// The languages this server offers and whether their images are built.
#[utoipa::path(get, path = "/v1/languages", tag = "system", responses((status = 200, body = Vec<LanguageInfo>)))]
pub async fn languages(State(state): State<AppState>) -> Json<Vec<LanguageInfo>> {
    let catalog = state.manager.catalog();
    let mut out = Vec::new();
    for lang in &catalog.languages {
        let image_ref = catalog.image_ref(&lang.image);
        let image = state.manager.runtime().image(&image_ref).await.ok().flatten();
        let label = |k: &str| image.as_ref().and_then(|i| i.labels.get(k).cloned());
        out.push(LanguageInfo {
            name: lang.name.clone(),
            image: image_ref.clone(),
            display_name: label(LABEL_DISPLAY_NAME),
            language_version: label(LABEL_LANGUAGE_VERSION),
            available: image.is_some(),
            pool: state.manager.pool_status(&lang.name),
        });
    }
    Json(out)
}

/// The process-wide Prometheus recorder (installed once, shared by every app in a test process).
pub fn prometheus() -> &'static PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE.get_or_init(|| {
        let recorder = PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        // Another recorder may already be installed (a test harness); then ours just renders nothing new.
        let _ = metrics::set_global_recorder(recorder);
        handle
    })
}

/// Prometheus metrics: sessions by language and state, MCP sessions, executions, durations, container
/// starts, limits met.
#[utoipa::path(get, path = "/metrics", tag = "system", responses((status = 200, content_type = "text/plain")))]
pub async fn metrics_text(State(state): State<AppState>, mcp_sessions: Arc<BoundedSessions>) -> impl IntoResponse {
    metrics::gauge!("kernelbox_mcp_sessions").set(mcp_sessions.count() as f64);
    let census = state.manager.census();
    for lang in &state.manager.catalog().languages {
        for status in [
            SessionStatus::Starting,
            SessionStatus::Idle,
            SessionStatus::Busy,
            SessionStatus::Restarting,
            SessionStatus::Dead,
        ] {
            let n = census.get(&(lang.name.clone(), status.as_str())).copied().unwrap_or(0);
            metrics::gauge!("kernelbox_sessions", "language" => lang.name.clone(), "state" => status.as_str())
                .set(n as f64);
        }
        let pool = state.manager.pool_status(&lang.name);
        if pool.ceiling > 0 {
            metrics::gauge!("kernelbox_pool_ready", "language" => lang.name.clone()).set(pool.ready as f64);
            metrics::gauge!("kernelbox_pool_target", "language" => lang.name.clone()).set(pool.target as f64);
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], prometheus().render())
}
