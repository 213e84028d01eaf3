//! The HTTP API. Handlers only translate: they parse a request, call the session manager, and turn its
//! answer or error into a response.
//!
//! Architecture invariant: only `api/` (and `error.rs`) know about HTTP; nothing here talks to Docker or a
//! kernel directly.

pub mod auth;
pub mod body;
pub mod compat;
pub mod execute;
pub mod extract;
pub mod files;
pub mod gateway;
pub mod json_errors;
pub mod jupyter_compat;
pub mod kernel_ws;
pub mod kernel_ws_codec;
pub mod mcp;
pub mod packages;
pub mod rate_limit;
pub mod serve;
pub mod session_compat;
pub mod sessions;
pub mod system;

use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::http::{Request, StatusCode};
use axum::routing::{get, post, put};
use tower_http::catch_panic::CatchPanicLayer;
use tower_http::request_id::{MakeRequestUuid, PropagateRequestIdLayer, SetRequestIdLayer};
use tower_http::trace::TraceLayer;
use utoipa::OpenApi;
use utoipa_swagger_ui::SwaggerUi;

use crate::config::HttpLimits;
use crate::error::ApiError;
use crate::session::SessionManager;

/// What every handler can reach.
#[derive(Clone)]
pub struct AppState {
    pub manager: Arc<SessionManager>,
    /// The `/jupyter` API's files.
    pub store: Arc<crate::store::FileStore>,
}

/// The largest request body we read (code and uploads).
const BODY_LIMIT: usize = 16 * 1024 * 1024;

#[derive(OpenApi)]
#[openapi(
    info(title = "kernelbox", description = "Run untrusted code in stateful Jupyter kernels, one sealed container per session."),
    paths(
        sessions::create, sessions::list, sessions::get, sessions::delete, sessions::interrupt, sessions::restart,
        packages::install, execute::execute, execute::input, files::list, files::download, files::upload, files::delete, files::notebook, system::healthz, system::readyz, system::languages, system::metrics_text,
        session_compat::start_session, session_compat::execute, session_compat::install_package, session_compat::reset,
        session_compat::end_session, jupyter_compat::list_kernel_specs, jupyter_compat::execute, jupyter_compat::upload,
        jupyter_compat::upload_long, jupyter_compat::download, jupyter_compat::health, jupyter_compat::health_root,
        mcp::doc::post, mcp::doc::get, mcp::doc::delete,
        gateway::version, gateway::kernelspecs, gateway::list, gateway::start, gateway::get, gateway::delete,
        gateway::interrupt, gateway::restart, kernel_ws::channels,
    ),
    components(schemas(crate::error::ErrorBody, compat::DetailBody, crate::kernel::Output, crate::kernel::ErrorInfo)),
    modifiers(&Security),
)]
pub struct ApiDoc;

struct Security;
impl utoipa::Modify for Security {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::security::{ApiKey, ApiKeyValue, HttpAuthScheme, HttpBuilder, SecurityScheme};
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
        );
        components
            .add_security_scheme("api_key", SecurityScheme::ApiKey(ApiKey::Header(ApiKeyValue::new("X-API-Key"))));
        guarded_responses(openapi);
        known_languages(openapi);
    }
}

/// `language` is one of the catalog's names: saying so lets clients (and the fuzzer) know the valid
/// values instead of guessing.
fn known_languages(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::{RefOr, Schema};
    let Some(components) = openapi.components.as_mut() else { return };
    let Some(RefOr::T(Schema::Object(request))) = components.schemas.get_mut("SessionRequest") else { return };
    if let Some(RefOr::T(Schema::Object(language))) = request.properties.get_mut("language") {
        let names = crate::images::Catalog::new("").languages.into_iter().map(|l| serde_json::Value::from(l.name));
        language.enum_values = Some(names.collect());
    }
}

/// What the middleware in front of every `/v1` and compatibility operation may answer, written once here
/// rather than on each handler: the key (401), the rate limit (429 with `Retry-After`) and, with a body, the body limits.
fn guarded_responses(openapi: &mut utoipa::openapi::OpenApi) {
    use utoipa::openapi::security::SecurityRequirement;
    use utoipa::openapi::{ContentBuilder, Ref, ResponseBuilder};
    let error = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content("application/json", ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build())
            .build()
    };
    let detail = |description: &str| {
        ResponseBuilder::new()
            .description(description)
            .content(
                "application/json",
                ContentBuilder::new().schema(Some(Ref::from_schema_name("DetailBody"))).build(),
            )
            .build()
    };
    let guarded = |path: &str| {
        let open = ["/healthz", "/readyz", "/metrics", "/health", "/jupyter/health"];
        !open.contains(&path) && !path.starts_with("/docs") && path != "/openapi.json"
    };
    for (path, item) in openapi.paths.paths.iter_mut().filter(|(path, _)| guarded(path)) {
        let compat = !path.starts_with("/v1/") && path != "/mcp" && !path.starts_with("/api");
        let error = |description: &str| if compat { detail(description) } else { error(description) };
        for op in
            [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch].into_iter().flatten()
        {
            op.security = Some(vec![
                SecurityRequirement::new("bearer", Vec::<String>::new()),
                SecurityRequirement::new("api_key", Vec::<String>::new()),
            ]);
            let mut add = |status: &str, description: &str| {
                op.responses.responses.entry(status.to_owned()).or_insert_with(|| error(description).into());
            };
            add("401", "no API key, or not a valid one (when the server has keys)");
            add("429", "too many requests for this API key (see `Retry-After`), or a limit of the server");
            let json_body = matches!(&op.request_body, Some(utoipa::openapi::RefOr::T(b)) if b.content.contains_key("application/json"));
            if path == "/mcp" {
                // `/mcp` reads its own bodies (rmcp): its answers are listed on it.
            } else if path.starts_with("/api") {
                // The gateway API takes any body it can parse (its answers are listed on it).
                if op.request_body.is_some() {
                    add("408", "the body did not arrive in time");
                    add("413", "the body is larger than 16 MiB");
                }
            } else if op.request_body.is_some() && compat {
                add("408", "the body did not arrive in time");
                add("413", "the body is larger than 16 MiB");
                add("422", "the body is not what this operation takes, or asks for something not allowed");
            } else if json_body {
                add("400", "the body is not valid JSON for this operation");
                add("408", "the body did not arrive in time");
                add("413", "the body is larger than 16 MiB");
                add("415", "the body is not `application/json`");
                add("422", "the request is well-formed but asks for something not allowed");
            }
        }
    }
}

/// The API: `/v1` behind the API key, the rate limit and the body limits (in that order, so a stranger
/// neither spends a key's budget nor gets a body read), the rest open; every error in the JSON shape.
pub fn router(state: AppState, keys: auth::Keys, http: &HttpLimits) -> Router {
    let access = auth::Access { keys, limiter: http.rate_limit.map(|l| Arc::new(rate_limit::RateLimiter::new(l))) };
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
        .route("/languages", get(system::languages))
        .layer(axum::middleware::from_fn_with_state(body_limits, body::read_whole))
        // Files stream through, under the upload limit and an idle limit, instead of arriving whole.
        .merge(
            Router::new()
                .route("/sessions/{id}/files", get(files::list))
                .route("/sessions/{id}/files/{*path}", get(files::download).put(files::upload).delete(files::delete))
                .layer(DefaultBodyLimit::disable()),
        )
        .layer(axum::middleware::from_fn_with_state(access.clone(), auth::require_key));
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
    // MCP for agents: the same keys and rate limit; rmcp reads (and bounds) its own bodies.
    let mcp = Router::new()
        .route_service("/mcp", mcp::service(state.manager.clone()))
        .layer(axum::middleware::map_response(mcp::deleted_is_no_content))
        .layer(axum::middleware::from_fn_with_state(access, auth::require_key));
    Router::new()
        .nest("/v1", v1)
        .merge(compat)
        .merge(gateway)
        .merge(mcp)
        .route("/healthz", get(system::healthz))
        .route("/readyz", get(system::readyz))
        .route("/metrics", get(system::metrics_text))
        .merge(SwaggerUi::new("/docs").url("/openapi.json", ApiDoc::openapi()))
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
            tracing::info_span!("request", method = %req.method(), path = %req.uri().path(), request_id, session_id)
        }))
        .layer(PropagateRequestIdLayer::x_request_id())
        .layer(SetRequestIdLayer::x_request_id(MakeRequestUuid))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clients and tools (the fuzzer's link inference among them) address operations by id: one each.
    #[test]
    fn every_operation_has_its_own_id() {
        let doc = ApiDoc::openapi();
        let mut seen = std::collections::BTreeMap::new();
        for (path, item) in &doc.paths.paths {
            for op in [&item.get, &item.put, &item.post, &item.delete, &item.patch].into_iter().flatten() {
                let id = op.operation_id.clone().unwrap_or_default();
                assert!(!id.is_empty(), "{path} has an operation without an id");
                if let Some(other) = seen.insert(id.clone(), path.clone()) {
                    panic!("operation id `{id}` is used by both {other} and {path}");
                }
            }
        }
    }

    /// The OpenAPI document is generated from the code and kept in `docs/openapi.json`, so that every API
    /// change is a visible diff. After an intended change: `KERNELBOX_UPDATE_OPENAPI=1 cargo test openapi`.
    #[test]
    fn the_openapi_document_matches_its_snapshot() {
        let current = ApiDoc::openapi().to_pretty_json().expect("the document serializes") + "\n";
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json");
        if std::env::var_os("KERNELBOX_UPDATE_OPENAPI").is_some() {
            std::fs::write(path, &current).expect("writing the snapshot");
        }
        let snapshot = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            snapshot == current,
            "the API changed: review it, then run `KERNELBOX_UPDATE_OPENAPI=1 cargo test openapi` to accept it"
        );
    }
}
