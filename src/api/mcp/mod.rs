//! `/mcp`: a Model Context Protocol server (Streamable HTTP, the official `rmcp` SDK) for agents, an
//! adapter over the same [`SessionManager`] as `/v1`. The tools only translate: their arguments become
//! manager calls, and results become MCP content (text for streams, results and errors; image content
//! for PNG and JPEG displays) plus structured content with the whole result.
//!
//! The route sits behind the same API-key middleware as `/v1` (`auth::require_key`): every HTTP request
//! carries its own key, and the tools act for that request's [`Owner`](crate::session::Owner) (rmcp hands the request's
//! `http::request::Parts` to each tool call), so an MCP session cannot be used to reach another key's
//! kernels, whichever `Mcp-Session-Id` it presents.
//!
//! Lifetimes: `run_code` always ends its kernel session (a drop guard closes it if the call is cut
//! short); sessions from `start_session` live until `end_session` or their idle timeout (the reaper),
//! as on `/v1`. A tool call that is cancelled (`notifications/cancelled`, or the client disconnecting)
//! drops its pending execution, which interrupts the kernel. Long executions report progress
//! notifications as output arrives, when the call carries a progress token.
//!
//! Bounds: request bodies (16 MiB, rmcp's own reader), MCP sessions held in memory (per API key and in
//! total, `--max-mcp-sessions-per-key` and `--max-mcp-sessions`: a key past its share closes its own least
//! recently used idle session; idle ones are closed by rmcp after [`MCP_KEEP_ALIVE`]), downloads returned
//! inline ([`MAX_DOWNLOAD_BYTES`]), progress messages ([`PROGRESS_TEXT`]).
//!
//! Here: the service as mounted (and its OpenAPI stubs); `tools` (the tools, each a manager call),
//! `content` (results as MCP content), `sessions` (rmcp's MCP sessions, bounded, and the middleware that
//! tells them whose request it is) over `table` (who holds which MCP session, whose goes to make room).

mod content;
mod sessions;
mod table;
mod tools;

pub use content::PROGRESS_TEXT;
pub use sessions::{BoundedSessions, MCP_KEEP_ALIVE, McpSessionError, bounded};
pub use table::Refusal;
pub use tools::{KernelboxMcp, MAX_DOWNLOAD_BYTES};

use std::sync::Arc;

use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use tokio_util::sync::CancellationToken;

use crate::session::SessionManager;

/// The largest request body `/mcp` reads (the same as `/v1`'s).
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// The service mounted at `/mcp`, keeping its MCP sessions in `sessions` (behind [`bounded`], which tells
/// them whose request it is). Its rmcp sessions stop when the router (and so this service) is dropped.
pub fn service(
    manager: Arc<SessionManager>,
    sessions: Arc<BoundedSessions>,
) -> StreamableHttpService<KernelboxMcp, BoundedSessions> {
    let stop = CancellationToken::new();
    let on_drop = Arc::new(stop.clone().drop_guard());
    let config = StreamableHttpServerConfig::default()
        // Deployed behind API keys and usually a proxy with its own host name: the key, not the Host
        // header, decides who may call.
        .disable_allowed_hosts()
        .with_max_request_body_bytes(MAX_BODY_BYTES)
        .with_cancellation_token(stop);
    StreamableHttpService::new(
        move || {
            let _stops_with_the_service = &on_drop;
            Ok(KernelboxMcp::new(manager.clone()))
        },
        sessions,
        config,
    )
}

/// The MCP endpoint as the OpenAPI document describes it (the operations are served by rmcp; these
/// functions only carry the documentation).
pub mod doc {
    /// MCP over Streamable HTTP: send one JSON-RPC message (`initialize`, `tools/list`, `tools/call`, ...)
    /// with `Accept: application/json, text/event-stream`. Requests are answered as server-sent events
    /// (progress notifications, then the result); notifications and responses get 202. After
    /// `initialize`, send the `Mcp-Session-Id` it returned. Tools: `list_languages`, `start_session`,
    /// `execute`, `run_code`, `upload_file`, `download_file`, `list_files`, `install_packages`, `restart`,
    /// `end_session` (`tools/list` has their JSON schemas). A key sees only its own sessions.
    #[utoipa::path(post, path = "/mcp", tag = "mcp", operation_id = "mcp_post",
        request_body(content = Object, content_type = "application/json", description = "a JSON-RPC 2.0 message"),
        responses(
            (status = 200, description = "the answer, as `text/event-stream` (or JSON)"),
            (status = 202, description = "a notification or response was accepted"),
            (status = 400, description = "not a valid JSON-RPC message, or a missing or unknown session"),
            (status = 406, description = "the `Accept` header lacks `application/json` and `text/event-stream`"),
            (status = 413, description = "the body is larger than 16 MiB"),
            (status = 429, description = "`initialize` when every MCP session of this key is in use (a JSON-RPC error), or the request limit; see `Retry-After`"),
            (status = 503, description = "`initialize`: every MCP session of the server is in use (`Retry-After`, a JSON-RPC error)")))]
    pub fn post() {}

    /// MCP over Streamable HTTP: the session's stream of server-to-client messages (`Mcp-Session-Id`).
    #[utoipa::path(get, path = "/mcp", tag = "mcp", operation_id = "mcp_get",
        responses((status = 200, description = "`text/event-stream`"), (status = 400, description = "no or unknown session")))]
    pub fn get() {}

    /// MCP over Streamable HTTP: ends the MCP session named by `Mcp-Session-Id`. Kernel sessions started
    /// through it stay until `end_session` or their idle timeout.
    #[utoipa::path(delete, path = "/mcp", tag = "mcp", operation_id = "mcp_delete",
        responses((status = 204, description = "the session is closed"), (status = 400, description = "no or unknown session")))]
    pub fn delete() {}
}

/// rmcp answers a session's DELETE with 202; clients (the reference Python one among them) expect 200 or
/// 204 for a session that is gone, and warn otherwise. The only 202 a DELETE gets is that one.
pub async fn deleted_is_no_content(
    method: axum::http::Method,
    mut response: axum::response::Response,
) -> axum::response::Response {
    if method == axum::http::Method::DELETE && response.status() == axum::http::StatusCode::ACCEPTED {
        *response.status_mut() = axum::http::StatusCode::NO_CONTENT;
    }
    response
}
