//! The Jupyter Kernel Gateway's REST API (`/api`, `/api/kernelspecs`, `/api/kernels`), the part of the
//! gateway protocol Jupyter servers use to list, start, interrupt, restart and end kernels: an adapter
//! over the same [`SessionManager`](crate::session::SessionManager) as `/v1`. A kernel is a session like
//! any other (limits, reaper, metrics, the same `/v1` views) and belongs to the key that made it.
//!
//! The kernel WebSocket (`/api/kernels/{id}/channels`) is its own module, `kernel_ws.rs`.
//!
//! Kernel ids: Jupyter servers only route UUID-shaped kernel ids, so a session id (24 hex digits) is shown
//! as a UUID whose last 8 digits are zero ([`kernel_id`]), and read back only in that shape.
//!
//! Kernel names are the languages, plus [`PYTHON3`], Jupyter's own name for Python: what most notebooks'
//! `kernelspec.name` says and what Jupyter's tools start when nothing else is named. It is the `python`
//! language, listed as a spec of its own and the default; a kernel started under it is reported under it
//! (its session's metadata keeps the name, so an adopted kernel keeps it too).

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::{Value, json};

use super::state::{AppState, Caller};
use crate::error::{ApiError, ErrorBody};
use crate::node::NodeTag;
use crate::session::model::NetworkRequest;
use crate::session::{SessionError, SessionInfo, SessionRequest, SessionStatus};

/// The Jupyter server version this API answers as (what `GET /api` reports).
const API_VERSION: &str = "2.14.2";

/// Jupyter's conventional name for Python (ipykernel's spec): the `python` language here.
pub const PYTHON3: &str = "python3";
/// The language [`PYTHON3`] starts.
const PYTHON3_LANGUAGE: &str = "python";
/// The `env` entry of a kernel start that names the OCI runtime (`runsc`), as the spec's
/// `metadata.kernelbox.runtimes` allow.
pub const KERNEL_RUNTIME: &str = "KERNEL_RUNTIME";
/// The `env` entry of a kernel start that gives the kernel a network by name: the hosts it may reach,
/// comma-separated (kernelbox's, in the way of Enterprise Gateway's `KERNEL_*` settings).
pub const KERNEL_NETWORK_ALLOW: &str = "KERNEL_NETWORK_ALLOW";
/// The session metadata that says a kernel was started as [`PYTHON3`].
pub const KERNEL_NAME_KEY: &str = "kernelbox.kernel_name";

/// The name a kernel is reported under: [`PYTHON3`] if it was started so, else its language.
fn kernel_name(info: &SessionInfo) -> &str {
    match info.metadata.get(KERNEL_NAME_KEY) {
        Some(name) if name == PYTHON3 && info.language == PYTHON3_LANGUAGE => PYTHON3,
        _ => &info.language,
    }
}

/// A single-node session id as a Jupyter kernel id: `xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxx0000`... in UUID
/// shape.
pub fn kernel_id(session: &str) -> String {
    kernel_id_on(session, None)
}

/// A session id as a Jupyter kernel id, in UUID shape: its 24 hex digits and 8 more, `00000000` on a single
/// node, the node's tag on a cluster's agent (so any API replica routes the kernel id alone).
pub fn kernel_id_on(session: &str, node: Option<NodeTag>) -> String {
    let suffix = node.as_ref().map_or("00000000", NodeTag::as_str);
    let hex = format!("{session}{suffix}");
    format!("{}-{}-{}-{}-{}", &hex[0..8], &hex[8..12], &hex[12..16], &hex[16..20], &hex[20..32])
}

/// The session id behind a single-node kernel id (`None` for anything not in [`kernel_id`]'s shape).
pub fn session_id(kernel: &str) -> Option<String> {
    session_id_on(kernel, None)
}

/// The session id behind a kernel id of node `node` (`None` for anything not in [`kernel_id_on`]'s shape
/// for that node: another node's suffix, or `00000000` on an agent, is no kernel of this one).
pub fn session_id_on(kernel: &str, node: Option<NodeTag>) -> Option<String> {
    let suffix = node.as_ref().map_or("00000000", NodeTag::as_str);
    let hex: String = kernel.split('-').collect();
    let parts: Vec<usize> = kernel.split('-').map(str::len).collect();
    (parts == [8, 4, 4, 4, 12] && hex.len() == 32 && hex.ends_with(suffix))
        .then(|| hex[..24].to_owned())
        .filter(|id| crate::session::SessionId::parse(id).is_some())
}

/// A kernel's model. `last_activity` is written with microseconds and `Z`, the one form Jupyter's gateway
/// client parses.
fn model(info: &SessionInfo, connections: usize, node: Option<NodeTag>) -> Value {
    let state = match info.status {
        SessionStatus::Starting => "starting",
        SessionStatus::Idle => "idle",
        SessionStatus::Busy => "busy",
        SessionStatus::Restarting => "restarting",
        SessionStatus::Dead => "dead",
    };
    json!({
        "id": kernel_id_on(info.id.as_str(), node),
        "name": kernel_name(info),
        "last_activity": info.last_used_at.to_rfc3339_opts(chrono::SecondsFormat::Micros, true),
        "execution_state": state,
        "connections": connections,
    })
}

pub(super) fn not_found(kernel: &str) -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", format!("no kernel with id {kernel}"))
}

/// The session behind a kernel id of the caller's, on this node.
pub(super) fn session(kernel: &str, node: Option<NodeTag>) -> Result<String, ApiError> {
    session_id_on(kernel, node).ok_or_else(|| not_found(kernel))
}

/// A failed lookup of a kernel: a session lost to fencing says so (410), anything else is no kernel.
fn missing(kernel: &str) -> impl Fn(SessionError) -> ApiError + '_ {
    move |e| match e {
        SessionError::Lost(_) => e.into(),
        _ => not_found(kernel),
    }
}

/// `GET /api`: the version, as a Jupyter server says it.
#[utoipa::path(get, path = "/api", operation_id = "gateway_version", tag = "jupyter gateway",
    responses((status = 200, description = "`{\"version\"}`, as a Jupyter server answers", body = Object)))]
pub async fn version() -> Json<Value> {
    Json(json!({ "version": API_VERSION }))
}

/// `GET /api/kernelspecs`: one spec per language, and `python3` (the `python` language under Jupyter's own
/// name for it), the default.
#[utoipa::path(get, path = "/api/kernelspecs", operation_id = "gateway_kernelspecs", tag = "jupyter gateway",
    responses((status = 200, description = "`{default, kernelspecs: {name: {name, spec: {display_name, language, ..}}}}`; `python3` is the `python` language", body = Object)))]
pub async fn kernelspecs(State(state): State<AppState>) -> Json<Value> {
    let runtimes = &state.manager.limits().runtimes;
    // The runtime a kernel of the spec runs under, and those `KERNEL_RUNTIME` may name, in the metadata.
    let spec = |name: &str, display_name: &str, language: &str, kernelbox_language: &str| {
        json!({
            "name": name,
            "spec": {
                "argv": [], "env": {}, "interrupt_mode": "message",
                "metadata": { "kernelbox": {
                    "runtime": runtimes.default_for(kernelbox_language),
                    "runtimes": runtimes.allowed_for(kernelbox_language),
                } },
                "display_name": display_name, "language": language,
            },
            "resources": {},
        })
    };
    let catalog = state.manager.catalog();
    let mut specs: serde_json::Map<String, Value> = catalog
        .languages
        .iter()
        .map(|l| (l.name.clone(), spec(&l.name, &l.display_name(), l.programming_language(), &l.name)))
        .collect();
    // The display name most notebooks carry with `python3`, so one opened here shows what it showed there.
    if catalog.language(PYTHON3_LANGUAGE).is_some() {
        specs.insert(PYTHON3.into(), spec(PYTHON3, "Python 3 (ipykernel)", "python", PYTHON3_LANGUAGE));
    }
    Json(json!({ "default": PYTHON3, "kernelspecs": specs }))
}

/// `GET /api/kernels`: the caller's kernels.
#[utoipa::path(get, path = "/api/kernels", operation_id = "gateway_list_kernels", tag = "jupyter gateway",
    responses((status = 200, description = "the caller's kernels: `[{id, name, last_activity, execution_state, connections}]`", body = [Object],
        headers(("x-kernelbox-nodes-missing" = String, description = "cluster only, and only when the list is incomplete: the comma-separated tags of the nodes that did not answer")))))]
pub async fn list(caller: Caller) -> Json<Vec<Value>> {
    let connections =
        |info: &SessionInfo| caller.manager.get(&caller.owner, info.id.as_str()).map_or(0, |s| s.connections());
    let node = caller.manager.node();
    Json(caller.manager.list(&caller.owner).iter().map(|info| model(info, connections(info), node)).collect())
}

/// What `POST /api/kernels` takes. Of `env` (Jupyter's `KERNEL_*` variables, as Enterprise Gateway takes
/// per-kernel settings), [`KERNEL_RUNTIME`] and [`KERNEL_NETWORK_ALLOW`] are read; the rest is accepted
/// and not passed on.
#[derive(Debug, Default, Deserialize)]
pub struct StartKernel {
    pub name: Option<String>,
    #[serde(default)]
    pub env: serde_json::Map<String, Value>,
}

/// `POST /api/kernels`: a new kernel (a session), ready when this answers.
#[utoipa::path(post, path = "/api/kernels", operation_id = "gateway_start_kernel", tag = "jupyter gateway",
    request_body(content = Object, description = "`{name, env}`: a name from `/api/kernelspecs` (`python3` is the `python` language); no name: `python3`. Of `env`, `KERNEL_RUNTIME` names the OCI runtime (one of the spec's `metadata.kernelbox.runtimes`) and `KERNEL_NETWORK_ALLOW` the hosts the kernel may reach (comma-separated; servers with networks only); the rest is not passed on"),
    responses((status = 201, description = "the kernel, ready", body = Object), (status = 400, body = ErrorBody), (status = 422, body = ErrorBody), (status = 503, body = ErrorBody)))]
pub async fn start(caller: Caller, body: axum::body::Bytes) -> Result<Response, ApiError> {
    // Jupyter servers send JSON; an empty body asks for the default kernel.
    let req: StartKernel = match body.is_empty() {
        true => StartKernel::default(),
        false => serde_json::from_slice(&body)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "bad_request", format!("not a kernel request: {e}")))?,
    };
    let mut request = session_request(req.name.as_deref().unwrap_or(PYTHON3));
    let text = |key: &str| match req.env.get(key) {
        None => Ok(None),
        Some(Value::String(value)) => Ok(Some(value.clone())),
        Some(_) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_request",
            format!("env.{key} must be a string"),
        )),
    };
    request.runtime = text(KERNEL_RUNTIME)?;
    request.network = text(KERNEL_NETWORK_ALLOW)?.map(|allow| NetworkRequest {
        allow: allow.split(',').map(str::trim).filter(|h| !h.is_empty()).map(str::to_owned).collect(),
    });
    let node = caller.manager.node();
    let info = caller.manager.create(caller.owner, request).await?;
    let body = model(&info, 0, node);
    let mut response = (StatusCode::CREATED, Json(body)).into_response();
    if let Ok(location) = HeaderValue::from_str(&format!("/api/kernels/{}", kernel_id_on(info.id.as_str(), node))) {
        response.headers_mut().insert(header::LOCATION, location);
    }
    Ok(response)
}

/// The session a kernel name asks for: its language; [`PYTHON3`] is `python`, and says so in the metadata.
fn session_request(name: &str) -> SessionRequest {
    match name {
        PYTHON3 => SessionRequest {
            language: PYTHON3_LANGUAGE.into(),
            metadata: Some([(KERNEL_NAME_KEY.to_owned(), PYTHON3.to_owned())].into()),
            ..Default::default()
        },
        language => SessionRequest { language: language.into(), ..Default::default() },
    }
}

/// `GET /api/kernels/{id}`.
#[utoipa::path(get, path = "/api/kernels/{id}", operation_id = "gateway_get_kernel", tag = "jupyter gateway",
    responses((status = 200, body = Object), (status = 404, body = ErrorBody)))]
pub async fn get(caller: Caller, Path(kernel): Path<String>) -> Result<Json<Value>, ApiError> {
    let node = caller.manager.node();
    let session = caller.manager.get(&caller.owner, &session(&kernel, node)?).map_err(missing(&kernel))?;
    Ok(Json(model(&session.info(), session.connections(), node)))
}

/// `DELETE /api/kernels/{id}`: ends the kernel and its container.
#[utoipa::path(delete, path = "/api/kernels/{id}", operation_id = "gateway_delete_kernel", tag = "jupyter gateway",
    responses((status = 204, description = "ended, its container gone"), (status = 404, body = ErrorBody)))]
pub async fn delete(caller: Caller, Path(kernel): Path<String>) -> Result<StatusCode, ApiError> {
    let id = session(&kernel, caller.manager.node())?;
    caller.manager.delete(&caller.owner, &id).await.map_err(missing(&kernel))?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/kernels/{id}/interrupt`.
#[utoipa::path(post, path = "/api/kernels/{id}/interrupt", operation_id = "gateway_interrupt_kernel", tag = "jupyter gateway",
    responses((status = 204, description = "interrupt sent"), (status = 404, body = ErrorBody)))]
pub async fn interrupt(caller: Caller, Path(kernel): Path<String>) -> Result<StatusCode, ApiError> {
    caller.manager.interrupt(&caller.owner, &session(&kernel, caller.manager.node())?)?;
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/kernels/{id}/restart`: a fresh kernel, files kept.
#[utoipa::path(post, path = "/api/kernels/{id}/restart", operation_id = "gateway_restart_kernel", tag = "jupyter gateway",
    responses((status = 200, description = "the kernel, restarted", body = Object), (status = 404, body = ErrorBody)))]
pub async fn restart(caller: Caller, Path(kernel): Path<String>, _headers: HeaderMap) -> Result<Json<Value>, ApiError> {
    let node = caller.manager.node();
    let id = session(&kernel, node)?;
    let info = caller.manager.restart(&caller.owner, &id).await?;
    let connections = caller.manager.get(&caller.owner, &id).map_or(0, |s| s.connections());
    Ok(Json(model(&info, connections, node)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_travel_as_uuid_shaped_kernel_ids_and_back() {
        let id = "0123456789abcdef01234567";
        let kernel = kernel_id(id);
        assert_eq!(kernel, "01234567-89ab-cdef-0123-456700000000");
        assert_eq!(session_id(&kernel).as_deref(), Some(id));
        assert_eq!(session_id("01234567-89ab-cdef-0123-456700000001"), None);
        assert_eq!(session_id("0123456789abcdef0123456700000000"), None);
        assert_eq!(session_id("../../etc"), None);
    }

    #[test]
    fn on_an_agent_a_kernel_id_ends_with_the_node_tag_and_only_that_tag_is_read_back() {
        let tag = NodeTag::parse("0123abcd").unwrap();
        let id = "0123456789abcdef0123abcd";
        let kernel = kernel_id_on(id, Some(tag));
        assert_eq!(kernel, "01234567-89ab-cdef-0123-abcd0123abcd");
        assert_eq!(NodeTag::suffix_of(&kernel.replace('-', "")), Some(tag), "what a replica routes by");
        assert_eq!(session_id_on(&kernel, Some(tag)).as_deref(), Some(id));
        assert_eq!(session_id_on(&kernel, None), None, "a single node takes only its own shape");
        assert_eq!(session_id_on("01234567-89ab-cdef-0123-abcd00000000", Some(tag)), None);
        let other = NodeTag::parse("89abcdef").unwrap();
        assert_eq!(session_id_on(&kernel, Some(other)), None, "another node's kernel is no kernel here");
    }

    #[test]
    fn python3_is_the_python_language_and_keeps_its_name() {
        let request = session_request("python3");
        assert_eq!(request.language, "python");
        let metadata = request.metadata.unwrap();
        assert_eq!(metadata.get(KERNEL_NAME_KEY).map(String::as_str), Some("python3"));
        let plain = session_request("python_scientific");
        assert_eq!((plain.language.as_str(), plain.metadata), ("python_scientific", None));

        let info = |language: &str, metadata: &[(&str, &str)]| SessionInfo {
            id: crate::session::SessionId::parse("0123456789abcdef01234567").unwrap(),
            language: language.into(),
            runtime: "runc".into(),
            status: SessionStatus::Idle,
            created_at: chrono::Utc::now(),
            last_used_at: chrono::Utc::now(),
            limits: crate::session::model::SessionLimits {
                memory_mb: 512,
                cpus: 1.0,
                pids: 256,
                timeout_s: 60,
                idle_timeout_s: 3600,
                tmpfs_mb: 128,
            },
            metadata: metadata.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            kernel: None,
            dead_reason: None,
            executions: 0,
            auto_restart: true,
            auto_restarts: 0,
            last_auto_restart: None,
        };
        assert_eq!(kernel_name(&info("python", &[(KERNEL_NAME_KEY, "python3")])), "python3");
        assert_eq!(kernel_name(&info("python", &[])), "python");
        // Metadata a /v1 client set cannot rename another language's kernel.
        assert_eq!(kernel_name(&info("bash", &[(KERNEL_NAME_KEY, "python3")])), "bash");
        assert_eq!(kernel_name(&info("python", &[(KERNEL_NAME_KEY, "cobol")])), "python");
    }
}
