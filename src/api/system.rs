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
    /// What is wrong with the engine's OCI runtimes (a runtime sessions run under is not registered, or
    /// not as they need it).
    pub runtime_problems: Vec<String>,
    /// Whether the egress proxy runs (servers with `--egress` only): while it is down every session's
    /// connection is refused.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub egress_proxy: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// Docker is reachable, every kernel image is present, every OCI runtime sessions run under is
/// registered as they need it, and (with `--egress`) the egress proxy runs.
#[utoipa::path(get, path = "/readyz", tag = "system", responses((status = 200, body = Readiness), (status = 503, body = Readiness)))]
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let runtime = state.manager.runtime();
    if let Err(e) = runtime.ping().await {
        let body = Readiness {
            ready: false,
            docker: false,
            missing_images: vec![],
            runtime_problems: vec![],
            egress_proxy: None,
            message: Some(e.to_string()),
        };
        return (StatusCode::SERVICE_UNAVAILABLE, Json(body));
    }
    let catalog = state.manager.catalog();
    let mut missing = Vec::new();
    for image in catalog.language_images() {
        if !matches!(runtime.image(&catalog.image_ref(&image)).await, Ok(Some(_))) {
            missing.push(image);
        }
    }
    let runtime_problems = match state.manager.oci_runtime_problems().await {
        Ok(problems) => problems,
        Err(e) => vec![format!("could not read the engine's runtimes: {e}")],
    };
    let egress_up = state.manager.networks().map(|n| n.hub.is_up());
    let egress_proxy = egress_up.map(|up| if up { "up" } else { "down" });
    let ready = missing.is_empty() && runtime_problems.is_empty() && egress_up != Some(false);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let message = match (missing.is_empty(), runtime_problems.first(), egress_up) {
        (false, _, _) => Some("some kernel images are missing: run `kernelbox images build`".to_owned()),
        (true, Some(problem), _) => Some(problem.clone()),
        (true, None, Some(false)) => {
            Some("the egress proxy is down: sessions' connections are refused until it is back".to_owned())
        }
        (true, None, _) => None,
    };
    let body = Readiness { ready, docker: true, missing_images: missing, runtime_problems, egress_proxy, message };
    (status, Json(body))
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct LanguageInfo {
    pub name: String,
    pub image: String,
    pub display_name: Option<String>,
    pub language_version: Option<String>,
    /// The image is built and sessions can start.
    pub available: bool,
    /// The OCI runtime its sessions run under unless they ask (`runc`; `runsc` is gVisor's user-space
    /// kernel).
    pub runtime: String,
    /// The runtimes a session of the language may ask for (`"runtime"` at create), its default first.
    pub runtimes: Vec<String>,
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
            runtime: state.manager.limits().runtimes.default_for(&lang.name).to_owned(),
            runtimes: state.manager.limits().runtimes.allowed_for(&lang.name),
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

/// Prometheus metrics: sessions by language and state and by OCI runtime, MCP sessions, executions, durations, container
/// starts, limits met.
#[utoipa::path(get, path = "/metrics", tag = "system", responses((status = 200, content_type = "text/plain")))]
pub async fn metrics_text(State(state): State<AppState>, mcp_sessions: Arc<BoundedSessions>) -> impl IntoResponse {
    metrics::gauge!("kernelbox_mcp_sessions").set(mcp_sessions.count() as f64);
    let census = state.manager.census();
    let by_runtime = state.manager.runtime_census();
    for runtime in state.manager.limits().runtimes.named() {
        let n = by_runtime.get(runtime).copied().unwrap_or(0);
        metrics::gauge!("kernelbox_sessions_by_runtime", "runtime" => runtime.to_owned()).set(n as f64);
    }
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
