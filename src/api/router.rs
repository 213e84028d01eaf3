//! The router: every route of every API, with the middleware in front of each (the key check, or a signed
//! link's on the two file downloads; the rate limit, the body limits, the error shapes), the OpenAPI
//! document and Swagger UI, request ids and traces.

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Request, StatusCode};
use axum::routing::{get, post, put};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;

use super::signed::{Candidates, LinkForm, SignedAccess};
use super::state::AppState;
use super::{
    auth, body, compat, docs, execute, files, gateway, json_errors, jupyter_compat, kernel_ws, mcp, network, packages,
    rate_limit, session_compat, sessions, signed, system,
};
use crate::config::HttpLimits;
use crate::error::ApiError;

/// The largest request body we read (code and uploads).
const BODY_LIMIT: usize = 16 * 1024 * 1024;

/// The API: `/v1` behind the API key, the request limit (when on) and the body limits (in that order, so a
/// stranger neither spends a key's budget nor gets a body read), the rest open; every error in the JSON
/// shape.
///
/// On a cluster's agent (`keys` trusting the owner header) the owner of every keyed route is the header
/// an API replica set, and a signed link is checked against the owners with something on this node.
pub fn router(state: AppState, keys: auth::Keys, http: &HttpLimits) -> Router {
    let owners = match keys.trusts_owner_header() {
        true => {
            let (manager, store) = (state.manager.clone(), state.store.clone());
            Candidates::Known(Arc::new(move || {
                let mut owners = manager.owners();
                owners.extend(store.owners());
                owners.sort_by(|a, b| a.0.cmp(&b.0));
                owners.dedup();
                owners
            }))
        }
        false => Candidates::Fixed(keys.owners().into()),
    };
    let access = auth::Access { keys, limiter: http.rate_limit.map(|l| Arc::new(rate_limit::RateLimiter::new(l))) };
    // A file download opens with the key or with a signed link (see `signed.rs`).
    let key_or_link = |form| {
        let signed = SignedAccess { access: access.clone(), signer: state.links.clone(), owners: owners.clone(), form };
        axum::middleware::from_fn_with_state(signed, signed::key_or_link)
    };
    let body_limits = body::BodyLimits { max_bytes: BODY_LIMIT, deadline: http.body_read_timeout };
    let v1 = Router::new()
        .route("/sessions", post(sessions::create).get(sessions::list))
        .route("/sessions/{id}", get(sessions::get).delete(sessions::delete))
        .route("/sessions/{id}/execute", post(execute::execute))
        .route("/sessions/{id}/input", post(execute::input))
        .route("/sessions/{id}/interrupt", post(sessions::interrupt))
        .route("/sessions/{id}/restart", post(sessions::restart))
        .route("/sessions/{id}/packages", post(packages::install))
        .route("/sessions/{id}/notebook", get(files::notebook))
        .route("/sessions/{id}/network", get(network::get).put(network::put))
        .route("/languages", get(system::languages))
        .layer(axum::middleware::from_fn_with_state(body_limits, body::read_whole))
        // Files stream through, under the upload limit and an idle limit, instead of arriving whole.
        .merge(
            Router::new()
                .route("/sessions/{id}/files", get(files::list))
                .route("/sessions/{id}/files/{*path}", put(files::upload).delete(files::delete))
                .layer(DefaultBodyLimit::disable()),
        )
        .layer(axum::middleware::from_fn_with_state(access.clone(), auth::require_key))
        .merge(
            Router::new()
                .route("/sessions/{id}/files/{*path}", get(files::download))
                .layer(key_or_link(LinkForm::Query)),
        );
    // The two compatibility APIs: behind the same key and limits, bodies read whole (forms and JSON as
    // their clients send them), every error as FastAPI's `{"detail": ...}`.
    let compat = Router::new()
        .route("/start_session", post(session_compat::start_session))
        .route("/execute", post(session_compat::execute))
        .route("/install_package", post(session_compat::install_package))
        .route("/reset", post(session_compat::reset))
        .route("/end_session", post(session_compat::end_session))
        .route("/jupyter/list_kernel_specs", get(jupyter_compat::list_kernel_specs))
        .route("/jupyter/execute", post(jupyter_compat::execute))
        .route("/jupyter/files", put(jupyter_compat::upload))
        .route("/jupyter/files/long-lifetime", put(jupyter_compat::upload_long))
        .route("/jupyter/files/{name}", get(jupyter_compat::download))
        .layer(axum::middleware::from_fn_with_state(body_limits, body::read_whole))
        .layer(axum::middleware::from_fn_with_state(access.clone(), auth::require_key))
        .route(
            "/jupyter/files/signed/{expires}/{signature}/{name}",
            get(jupyter_compat::download_signed).layer(key_or_link(LinkForm::JupyterPath)),
        )
        .route("/health", get(jupyter_compat::health_root))
        .route("/jupyter/health", get(jupyter_compat::health))
        .layer(axum::middleware::map_response(compat::detail_errors));
    // The Jupyter Kernel Gateway's REST API (Jupyter servers send `Authorization: token <key>`).
    let gateway = Router::new()
        .route("/api", get(gateway::version))
        .route("/api/kernelspecs", get(gateway::kernelspecs))
        .route("/api/kernels", get(gateway::list).post(gateway::start))
        .route("/api/kernels/{id}", get(gateway::get).delete(gateway::delete))
        .route("/api/kernels/{id}/interrupt", post(gateway::interrupt))
        .route("/api/kernels/{id}/restart", post(gateway::restart))
        .route("/api/kernels/{id}/channels", get(kernel_ws::channels))
        .layer(axum::middleware::from_fn_with_state(body_limits, body::read_whole))
        .layer(axum::middleware::from_fn_with_state(access.clone(), auth::require_key));
    // MCP for agents: the same keys and limits; rmcp reads (and bounds) its own bodies; its MCP sessions
    // are bounded per key and in total, and counted in /metrics.
    let mcp_sessions = Arc::new(mcp::BoundedSessions::new(http.mcp_sessions).on_node(state.manager.node()));
    let mcp = Router::new()
        .route_service("/mcp", mcp::service(state.manager.clone(), mcp_sessions.clone()))
        .layer(axum::middleware::from_fn(mcp::bounded))
        .layer(axum::middleware::map_response(mcp::deleted_is_no_content))
        .layer(axum::middleware::from_fn_with_state(access, auth::require_key));
    Router::new()
        .nest("/v1", v1)
        .merge(compat)
        .merge(gateway)
        .merge(mcp)
        .route("/healthz", get(system::healthz))
        .route("/readyz", get(system::readyz))
        .route("/metrics", get(move |state| system::metrics_text(state, mcp_sessions)))
        .merge(docs::routes())
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint; see /docs") })
        .method_not_allowed_fallback(|| async {
            ApiError::new(
                StatusCode::METHOD_NOT_ALLOWED,
                "method_not_allowed",
                "this method is not allowed here; see /docs",
            )
        })
        .with_state(state)
        .layer(DefaultBodyLimit::max(BODY_LIMIT))
        .layer(axum::middleware::map_response(json_errors::json_errors))
        .layer(CatchPanicLayer::custom(|_| {
            axum::response::IntoResponse::into_response(ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "internal error (a bug): see the server log",
            ))
        }))
        .layer(TraceLayer::new_for_http().make_span_with(|req: &Request<_>| {
            let request_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
            let session_id =
                req.uri().path().strip_prefix("/v1/sessions/").and_then(|p| p.split('/').next()).unwrap_or("");
            let path = signed::loggable_path(req.uri().path());
            tracing::info_span!("request", method = %req.method(), path = %path, request_id, session_id)
        }))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}
