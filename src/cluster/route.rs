//! Route classification: where a request goes, from its method, path and headers, and (for a create or a
//! session API call) a bounded look at its body. Pure: the replica's handler (`api_role`) acts on the
//! answer. Every route of `api::router` is classified (a test walks the OpenAPI document).
//!
//! - [`Target::Local`]: the replica answers itself (health, readiness, metrics, docs, unknown paths).
//! - [`Target::Session`]: the node the id's tag names (`/v1/sessions/{id}/…`, `/api/kernels/{id}/…`,
//!   `Mcp-Session-Id`, `/jupyter` stored file names, signed links by their session or file).
//! - [`Target::NotFound`]: an id that cannot name a node (malformed, no tag): 404 `not_found` (what a single node answers for an unknown session).
//! - [`Target::Create`]: placement (`POST /v1/sessions`, `POST /api/kernels`, MCP `initialize`).
//! - [`Target::FanOut`]: every agent, lists merged (`GET /v1/sessions`, `GET /api/kernels`).
//! - [`Target::Any`]: any ready agent (kernel specs, languages, and bodies too broken to route, so the
//!   agent gives its own error).
//! - [`Target::UserSession`]: the session API, by (owner, `user_id`) (see `user_session`).
//! - [`Target::OwnerPinned`]: the `/jupyter` API's executes and uploads, by rendezvous of the owner.

use axum::body::{Body, Bytes};
use axum::extract::FromRequest;
use axum::http::{HeaderMap, Method, Request};

use crate::api::compat::FormFields;
use crate::node::NodeTag;

/// The largest body read to route a create (`/v1`, the gateway): far more than a create request needs.
pub const CREATE_PEEK_LIMIT: usize = 64 * 1024;
/// The largest session API form read to find its `user_id` (the API's own form limit).
pub const FORM_PEEK_LIMIT: usize = crate::api::compat::FORM_LIMIT;
/// The largest session API JSON body read to find its `user_id` (the API's own body limit: the agent
/// reads these bodies whole too).
pub const JSON_PEEK_LIMIT: usize = crate::api::compat::BODY_LIMIT;

/// Which list a fan-out merges.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum List {
    /// `GET /v1/sessions`.
    Sessions,
    /// `GET /api/kernels`.
    Kernels,
}

/// Where a request goes.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    Local,
    Session(NodeTag),
    NotFound,
    Create { language: Option<String>, memory_mb: Option<u64>, cpus: Option<f64> },
    FanOut(List),
    Any,
    UserSession { user_id: String, start: bool },
    OwnerPinned,
}

/// A body the classification needs, and how much of it may be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Peek {
    /// `POST /v1/sessions`: JSON `{language, memory_mb, cpus}`.
    V1Create,
    /// `POST /api/kernels`: JSON `{name}` (empty: `python3`).
    KernelCreate,
    /// `/start_session`, `/reset`, `/end_session`: a form with `user_id`.
    UserForm { start: bool },
    /// `/execute`, `/install_package`: JSON with `user_id`.
    UserJson,
    /// `POST /mcp` without an MCP session: `initialize` (read, so a refusal can be retried elsewhere).
    McpOpen,
}

impl Peek {
    pub fn limit(self) -> usize {
        match self {
            Peek::V1Create | Peek::KernelCreate | Peek::McpOpen => CREATE_PEEK_LIMIT,
            Peek::UserForm { .. } => FORM_PEEK_LIMIT,
            Peek::UserJson => JSON_PEEK_LIMIT,
        }
    }
}

/// What the head of a request says.
#[derive(Debug, Clone, PartialEq)]
pub enum Step {
    Done(Target),
    /// Read the body (at most `Peek::limit`), then [`classify_body`].
    Body(Peek),
}

/// The MCP session id header.
pub const MCP_SESSION_HEADER: &str = "mcp-session-id";

/// The session API's paths (the compatibility shapes apply to them and to `/jupyter/…` and `/health`).
const USER_PATHS: [&str; 5] = ["/start_session", "/execute", "/install_package", "/reset", "/end_session"];

/// Whether `path` is one of the compatibility APIs', whose errors are `{"detail": ...}`.
pub fn is_compat(path: &str) -> bool {
    USER_PATHS.contains(&path) || path == "/health" || path.starts_with("/jupyter/")
}

/// Whether the request presents a signed link instead of a key (the agent that made the link checks it).
pub fn presents_link(method: &Method, path: &str, query: Option<&str>, headers: &HeaderMap) -> bool {
    if !(method == Method::GET || method == Method::HEAD) || crate::api::auth::presents_key(headers) {
        return false;
    }
    if path.starts_with("/jupyter/files/signed/") {
        return true;
    }
    let v1_file = path
        .strip_prefix("/v1/sessions/")
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(_, r)| r.starts_with("files/"));
    v1_file
        && serde_urlencoded::from_str::<Vec<(String, String)>>(query.unwrap_or(""))
            .is_ok_and(|pairs| pairs.iter().any(|(k, _)| k == "signature" || k == "expires"))
}

/// A `/v1` session id (24 lowercase hex digits)'s node, if it has one.
pub fn session_tag(id: &str) -> Option<NodeTag> {
    let hex = id.len() == 24 && id.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    hex.then(|| NodeTag::suffix_of(id)).flatten()
}

/// A gateway kernel id (UUID shape, lowercase)'s node, if it has one.
pub fn kernel_tag(id: &str) -> Option<NodeTag> {
    let parts: Vec<usize> = id.split('-').map(str::len).collect();
    if parts != [8, 4, 4, 4, 12] {
        return None;
    }
    let hex: String = id.split('-').collect();
    let ok = hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
    ok.then(|| NodeTag::suffix_of(&hex)).flatten()
}

/// An MCP session id (`<rmcp id>-<tag>`)'s node, if it has one.
pub fn mcp_tag(id: &str) -> Option<NodeTag> {
    id.rsplit_once('-').and_then(|(rest, tag)| (!rest.is_empty()).then(|| NodeTag::parse(tag)).flatten())
}

/// A `/jupyter` stored file name's node (the store knows its shape: `store::node_of`), if it has one.
pub fn file_tag(name: &str) -> Option<NodeTag> {
    crate::store::node_of(name)
}

fn by_tag(tag: Option<NodeTag>) -> Target {
    tag.map_or(Target::NotFound, Target::Session)
}

/// Where a request goes, as far as its head tells.
pub fn classify_head(method: &Method, path: &str, headers: &HeaderMap) -> Step {
    use Step::{Body, Done};
    let get = method == Method::GET || method == Method::HEAD;
    let post = method == Method::POST;
    if let Some(rest) = path.strip_prefix("/v1/sessions/") {
        let id = rest.split('/').next().unwrap_or("");
        return Done(by_tag(session_tag(id)));
    }
    if let Some(rest) = path.strip_prefix("/api/kernels/") {
        let id = rest.split('/').next().unwrap_or("");
        return Done(by_tag(kernel_tag(id)));
    }
    if let Some(name) = path.strip_prefix("/jupyter/files/signed/") {
        // `<expires>/<signature>/<name>`: the name names the node.
        let name = name.splitn(3, '/').nth(2).unwrap_or("");
        return Done(by_tag(file_tag(name)));
    }
    match path {
        "/v1/sessions" if post => Body(Peek::V1Create),
        "/v1/sessions" if get => Done(Target::FanOut(List::Sessions)),
        "/api/kernels" if post => Body(Peek::KernelCreate),
        "/api/kernels" if get => Done(Target::FanOut(List::Kernels)),
        "/v1/languages" | "/api" | "/api/kernelspecs" | "/jupyter/list_kernel_specs" => Done(Target::Any),
        "/start_session" => Body(Peek::UserForm { start: true }),
        "/reset" | "/end_session" => Body(Peek::UserForm { start: false }),
        "/execute" | "/install_package" => Body(Peek::UserJson),
        "/jupyter/execute" | "/jupyter/files" | "/jupyter/files/long-lifetime" => Done(Target::OwnerPinned),
        "/mcp" => match headers.get(MCP_SESSION_HEADER) {
            Some(id) => Done(by_tag(id.to_str().ok().and_then(mcp_tag))),
            // No MCP session yet: `initialize` opens one where placement says; anything else is the
            // agent's to refuse.
            None if post => Body(Peek::McpOpen),
            None => Done(Target::Any),
        },
        _ => match path.strip_prefix("/jupyter/files/") {
            Some(name) if !name.contains('/') => Done(by_tag(file_tag(name))),
            _ => Done(Target::Local),
        },
    }
}

/// Where a request goes, given the body `peek` asked for (the same bytes are forwarded). A body that does
/// not say (unreadable, no `user_id`) goes to any agent, whose handler answers it as on one node.
pub async fn classify_body(peek: Peek, headers: &HeaderMap, body: &Bytes) -> Target {
    let json = || serde_json::from_slice::<serde_json::Value>(body).ok();
    match peek {
        Peek::McpOpen => Target::Create { language: None, memory_mb: None, cpus: None },
        Peek::V1Create => match json() {
            Some(v) => match v.get("language").and_then(|l| l.as_str()) {
                Some(language) => Target::Create {
                    language: Some(language.to_owned()),
                    memory_mb: v.get("memory_mb").and_then(|m| m.as_u64()),
                    cpus: v.get("cpus").and_then(|c| c.as_f64()),
                },
                None => Target::Any,
            },
            None => Target::Any,
        },
        Peek::KernelCreate => {
            let name = match body.is_empty() {
                true => Some(crate::api::gateway::PYTHON3.to_owned()),
                false => json().and_then(|v| v.get("name").and_then(|n| n.as_str()).map(str::to_owned)),
            };
            match name {
                Some(name) => Target::Create { language: Some(kernel_language(&name)), memory_mb: None, cpus: None },
                None if !body.is_empty() && json().is_some() => Target::Create {
                    language: Some(kernel_language(crate::api::gateway::PYTHON3)),
                    memory_mb: None,
                    cpus: None,
                },
                None => Target::Any,
            }
        }
        Peek::UserJson => match json().and_then(|v| v.get("user_id").and_then(|u| u.as_str()).map(str::to_owned)) {
            Some(user_id) => Target::UserSession { user_id, start: false },
            None => Target::Any,
        },
        Peek::UserForm { start } => {
            let mut req = Request::new(Body::from(body.clone()));
            *req.headers_mut() = headers.clone();
            match FormFields::from_request(req, &()).await {
                Ok(form) => match form.required("user_id") {
                    Ok(user_id) => Target::UserSession { user_id: user_id.to_owned(), start },
                    Err(_) => Target::Any,
                },
                Err(_) => Target::Any,
            }
        }
    }
}

/// The language a gateway kernel name starts (`python3` is `python`).
pub fn kernel_language(name: &str) -> String {
    match name {
        crate::api::gateway::PYTHON3 => "python".into(),
        other => other.into(),
    }
}

/// The session API's sessions' language (placement asks for its image).
pub const USER_SESSION_LANGUAGE: &str = "python_scientific";

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;
    use utoipa::OpenApi;

    use super::*;

    const TAG: &str = "0000abcd";

    fn head(method: &str, path: &str) -> Step {
        classify_head(&method.parse().unwrap(), path, &HeaderMap::new())
    }

    fn tag() -> NodeTag {
        NodeTag::parse(TAG).unwrap()
    }

    /// An example value for each OpenAPI path parameter, naming node [`TAG`].
    fn fill(path: &str) -> String {
        path.replace(
            "{id}",
            if path.starts_with("/api/") { "01234567-89ab-cdef-0123-45670000abcd" } else { "0123456789abcdef0000abcd" },
        )
        .replace("{name}", "report-0123456789ab0000abcd-1800000000.csv")
        .replace("{expires}", "1800000000")
        .replace("{signature}", "c2lnbmF0dXJl")
        .replace("{path}", "out/a.png")
    }

    /// What each route of the public router is routed as (method, path → expected).
    fn expected(method: &str, path: &str) -> Step {
        let done = Step::Done;
        match (method, path) {
            (_, "/healthz" | "/readyz" | "/metrics" | "/health" | "/jupyter/health") => done(Target::Local),
            ("post", "/v1/sessions") => Step::Body(Peek::V1Create),
            ("get", "/v1/sessions") => done(Target::FanOut(List::Sessions)),
            ("post", "/api/kernels") => Step::Body(Peek::KernelCreate),
            ("get", "/api/kernels") => done(Target::FanOut(List::Kernels)),
            (_, "/v1/languages" | "/api" | "/api/kernelspecs" | "/jupyter/list_kernel_specs") => done(Target::Any),
            (_, "/start_session") => Step::Body(Peek::UserForm { start: true }),
            (_, "/reset" | "/end_session") => Step::Body(Peek::UserForm { start: false }),
            (_, "/execute" | "/install_package") => Step::Body(Peek::UserJson),
            (_, "/jupyter/execute" | "/jupyter/files" | "/jupyter/files/long-lifetime") => done(Target::OwnerPinned),
            ("post", "/mcp") => Step::Body(Peek::McpOpen),
            (_, "/mcp") => done(Target::Any),
            (_, p)
                if p.starts_with("/v1/sessions/{id}")
                    || p.starts_with("/api/kernels/{id}")
                    || p.starts_with("/jupyter/files/") =>
            {
                done(Target::Session(tag()))
            }
            other => panic!("a route this test does not know: {other:?}: say where it goes"),
        }
    }

    #[test]
    fn every_route_of_the_public_api_is_classified() {
        let doc = crate::api::openapi::ApiDoc::openapi();
        let mut count = 0;
        for (path, item) in &doc.paths.paths {
            let ops = [("get", &item.get), ("put", &item.put), ("post", &item.post), ("delete", &item.delete)];
            for (method, op) in ops {
                if op.is_none() {
                    continue;
                }
                count += 1;
                let method_upper = method.to_uppercase();
                assert_eq!(head(&method_upper, &fill(path)), expected(method, path), "{method} {path}");
            }
        }
        assert!(count >= 43, "{count} operations: the document lost some");
        // Routes outside the document: the docs themselves, and unknown paths.
        for local in ["/docs", "/docs/", "/docs/swagger-ui.css", "/openapi.json", "/nothing", "/v1/other"] {
            assert_eq!(head("GET", local), Step::Done(Target::Local), "{local}");
        }
    }

    #[test]
    fn ids_name_their_node_and_anything_else_is_not_found() {
        assert_eq!(session_tag("0123456789abcdef0000abcd"), Some(tag()));
        for bad in ["0123456789abcdef00000000", "0123456789ABCDEF0000ABCD", "0123456789abcdef0000abc", "x", ""] {
            assert_eq!(session_tag(bad), None, "{bad}");
        }
        assert_eq!(head("GET", "/v1/sessions/0123456789abcdef00000000/files"), Step::Done(Target::NotFound));
        assert_eq!(head("DELETE", "/v1/sessions/../etc"), Step::Done(Target::NotFound));
        assert_eq!(kernel_tag("01234567-89ab-cdef-0123-45670000abcd"), Some(tag()));
        assert_eq!(kernel_tag("01234567-89ab-cdef-0123-456700000000"), None, "a single node's kernel");
        assert_eq!(kernel_tag("0123456789abcdef012345670000abcd"), None, "not UUID-shaped");
        assert_eq!(head("GET", "/api/kernels/nope/channels"), Step::Done(Target::NotFound));
        assert_eq!(mcp_tag("3f2a9c1e-77b0-4c1d-9e8f-0a1b2c3d4e5f-0000abcd"), Some(tag()));
        assert_eq!(mcp_tag("3f2a9c1e-77b0-4c1d-9e8f-0a1b2c3d4e5f"), None);
        assert_eq!(mcp_tag("-0000abcd"), None);
        assert_eq!(file_tag("report-0123456789ab0000abcd-1800000000.csv"), Some(tag()));
        assert_eq!(file_tag("report-0123456789ab-1800000000.csv"), None, "a single node's file");
        assert_eq!(file_tag("../report-0123456789ab0000abcd-1800000000.csv"), None);
        assert_eq!(
            head("GET", "/jupyter/files/signed/1/sig/report-0123456789ab0000abcd-1800000000"),
            Step::Done(Target::Session(tag()))
        );
    }

    #[test]
    fn an_mcp_call_goes_where_its_session_is() {
        let mut headers = HeaderMap::new();
        headers.insert(MCP_SESSION_HEADER, HeaderValue::from_static("abc-0000abcd"));
        for m in [Method::POST, Method::GET, Method::DELETE] {
            assert_eq!(classify_head(&m, "/mcp", &headers), Step::Done(Target::Session(tag())));
        }
        headers.insert(MCP_SESSION_HEADER, HeaderValue::from_static("abc"));
        assert_eq!(classify_head(&Method::POST, "/mcp", &headers), Step::Done(Target::NotFound));
    }

    #[test]
    fn signed_links_are_recognised_only_without_a_key_and_only_on_reads() {
        let none = HeaderMap::new();
        let q = Some("expires=1&signature=x");
        assert!(presents_link(&Method::GET, "/v1/sessions/0123456789abcdef0000abcd/files/a.png", q, &none));
        assert!(!presents_link(&Method::GET, "/v1/sessions/0123456789abcdef0000abcd/files/a.png", None, &none));
        assert!(!presents_link(&Method::PUT, "/v1/sessions/0123456789abcdef0000abcd/files/a.png", q, &none));
        assert!(!presents_link(&Method::GET, "/v1/sessions/0123456789abcdef0000abcd/notebook", q, &none));
        assert!(presents_link(&Method::GET, "/jupyter/files/signed/1/s/n", None, &none));
        let mut keyed = HeaderMap::new();
        keyed.insert("x-api-key", HeaderValue::from_static("k"));
        assert!(!presents_link(&Method::GET, "/jupyter/files/signed/1/s/n", None, &keyed));
    }

    async fn body(peek: Peek, content_type: &str, body: &str) -> Target {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_str(content_type).unwrap());
        classify_body(peek, &headers, &Bytes::from(body.to_owned())).await
    }

    #[tokio::test]
    async fn a_create_is_placed_by_what_its_body_asks_for() {
        assert_eq!(
            body(Peek::V1Create, "application/json", r#"{"language":"java","memory_mb":1024,"cpus":1.5}"#).await,
            Target::Create { language: Some("java".into()), memory_mb: Some(1024), cpus: Some(1.5) }
        );
        assert_eq!(body(Peek::V1Create, "application/json", "{nope").await, Target::Any, "the agent says 400");
        let python = Target::Create { language: Some("python".into()), memory_mb: None, cpus: None };
        assert_eq!(body(Peek::KernelCreate, "application/json", "").await, python);
        assert_eq!(body(Peek::KernelCreate, "application/json", r#"{"name":"python3"}"#).await, python);
        assert_eq!(body(Peek::KernelCreate, "application/json", r#"{"env":{}}"#).await, python);
        assert_eq!(
            body(Peek::KernelCreate, "application/json", r#"{"name":"bash"}"#).await,
            Target::Create { language: Some("bash".into()), memory_mb: None, cpus: None }
        );
    }

    #[tokio::test]
    async fn the_session_api_is_routed_by_the_user_id_in_its_form_or_json() {
        let user = |start| Target::UserSession { user_id: "u1".into(), start };
        let form = Peek::UserForm { start: true };
        assert_eq!(body(form, "application/x-www-form-urlencoded", "user_id=u1").await, user(true));
        let multipart = "--b\r\nContent-Disposition: form-data; name=\"user_id\"\r\n\r\nu1\r\n--b--\r\n";
        assert_eq!(body(form, "multipart/form-data; boundary=b", multipart).await, user(true));
        assert_eq!(body(Peek::UserForm { start: false }, "", "user_id=u1").await, user(false));
        assert_eq!(body(form, "application/x-www-form-urlencoded", "other=1").await, Target::Any);
        assert_eq!(body(form, "text/plain", "user_id=u1").await, Target::Any, "the agent says 415");
        assert_eq!(body(Peek::UserJson, "text/plain", r#"{"user_id":"u1","code":"1"}"#).await, user(false));
        assert_eq!(body(Peek::UserJson, "application/json", r#"{"code":"1"}"#).await, Target::Any);
    }

    #[test]
    fn the_compatibility_routes_are_known_for_their_error_shape() {
        for p in ["/start_session", "/execute", "/jupyter/files/x", "/health", "/jupyter/execute"] {
            assert!(is_compat(p), "{p}");
        }
        for p in ["/v1/sessions", "/api/kernels", "/mcp", "/healthz"] {
            assert!(!is_compat(p), "{p}");
        }
    }
}
