//! `/mcp`: a Model Context Protocol server (Streamable HTTP, the official `rmcp` SDK) for agents, an
//! adapter over the same [`SessionManager`] as `/v1`. The tools only translate: their arguments become
//! manager calls, and results become MCP content (text for streams, results and errors; image content
//! for PNG and JPEG displays) plus structured content with the whole result.
//!
//! The route sits behind the same API-key middleware as `/v1` (`auth::require_key`): every HTTP request
//! carries its own key, and the tools act for that request's [`Owner`] (rmcp hands the request's
//! `http::request::Parts` to each tool call), so an MCP session cannot be used to reach another key's
//! kernels, whichever `Mcp-Session-Id` it presents.
//!
//! Lifetimes: `run_code` always ends its kernel session (a drop guard closes it if the call is cut
//! short); sessions from `start_session` live until `end_session` or their idle timeout (the reaper),
//! as on `/v1`. A tool call that is cancelled (`notifications/cancelled`, or the client disconnecting)
//! drops its pending execution, which interrupts the kernel. Long executions report progress
//! notifications as output arrives, when the call carries a progress token.
//!
//! Bounds: request bodies (16 MiB, rmcp's own reader), MCP sessions held in memory ([`MAX_MCP_SESSIONS`],
//! idle ones closed by rmcp after [`MCP_KEEP_ALIVE`]), downloads returned inline ([`MAX_DOWNLOAD_BYTES`]),
//! progress messages ([`PROGRESS_TEXT`]).

use std::sync::Arc;
use std::time::Duration;

use base64::Engine as _;
use futures::StreamExt;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{
    CallToolResult, ContentBlock, Implementation, ProgressNotificationParam, ServerCapabilities, ServerConfig,
};
use rmcp::service::RequestContext;
use rmcp::transport::streamable_http_server::session::local::{LocalSessionManager, SessionConfig};
use rmcp::transport::streamable_http_server::{StreamableHttpServerConfig, StreamableHttpService};
use rmcp::{ErrorData, RoleServer, ServerHandler, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::kernel::{Event, Output};
use crate::session::{ExecStatus, ExecuteResult, Owner, SessionError, SessionManager, SessionRequest, Submission};
use crate::text::strip_ansi;

/// MCP sessions held at once (each is a small task in rmcp); beyond it `initialize` is refused.
pub const MAX_MCP_SESSIONS: usize = 1024;
/// An MCP session without requests for this long is closed by rmcp (its kernels are not: see the module doc).
pub const MCP_KEEP_ALIVE: Duration = Duration::from_secs(600);
/// The largest file `download_file` returns inline; larger ones go through `/v1/sessions/{id}/files`.
pub const MAX_DOWNLOAD_BYTES: u64 = 8 * 1024 * 1024;
/// The largest request body `/mcp` reads (the same as `/v1`'s).
const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;
/// How much output text one progress notification quotes.
const PROGRESS_TEXT: usize = 1000;

/// The service mounted at `/mcp`. Its rmcp sessions stop when the router (and so this service) is dropped.
pub fn service(manager: Arc<SessionManager>) -> StreamableHttpService<KernelboxMcp, BoundedSessions> {
    let stop = CancellationToken::new();
    let on_drop = Arc::new(stop.clone().drop_guard());
    let config = StreamableHttpServerConfig::default()
        // Deployed behind API keys and usually a proxy with its own host name: the key, not the Host
        // header, decides who may call.
        .disable_allowed_hosts()
        .with_max_request_body_bytes(MAX_BODY_BYTES)
        .with_cancellation_token(stop);
    let sessions = BoundedSessions::new(MAX_MCP_SESSIONS);
    StreamableHttpService::new(
        move || {
            let _stops_with_the_service = &on_drop;
            Ok(KernelboxMcp::new(manager.clone()))
        },
        Arc::new(sessions),
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
            (status = 413, description = "the body is larger than 16 MiB")))]
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

/// The MCP server of one MCP session.
#[derive(Clone)]
pub struct KernelboxMcp {
    manager: Arc<SessionManager>,
    tool_router: ToolRouter<Self>,
}

/// `start_session`'s arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct StartSessionArgs {
    /// The language of the kernel: one of the names `list_languages` returns (python, python_scientific,
    /// javascript, typescript, java, bash).
    pub language: String,
    /// Memory for the session in MiB (default: the server's).
    pub memory_mb: Option<u64>,
    /// CPUs for the session, e.g. 0.5 or 2 (default: the server's).
    pub cpus: Option<f64>,
    /// Default time limit of each execution, in seconds.
    pub timeout_s: Option<u64>,
    /// The session is ended after this many seconds without use.
    pub idle_timeout_s: Option<u64>,
}

/// `execute`'s arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ExecuteArgs {
    /// The session to run in (from `start_session`).
    pub session_id: String,
    /// The code to run, in the session's language. State (variables, imports, files) persists between
    /// calls in one session.
    pub code: String,
    /// Seconds before the code is interrupted (default: the session's).
    pub timeout_s: Option<u64>,
    /// Answers for the code's prompts (`input()`, `prompt()`, `Scanner(System.in)`), in order. A prompt
    /// with no answer left interrupts the code with an `InputRequired` error.
    #[serde(default)]
    pub stdin: Vec<String>,
}

/// `run_code`'s arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct RunCodeArgs {
    /// The language: one of the names `list_languages` returns.
    pub language: String,
    /// The code to run in a fresh session that is ended afterwards.
    pub code: String,
    /// Seconds before the code is interrupted (default: the server's).
    pub timeout_s: Option<u64>,
    /// Answers for the code's prompts, in order.
    #[serde(default)]
    pub stdin: Vec<String>,
}

/// Arguments naming one session.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct SessionArgs {
    /// The session's id (from `start_session`).
    pub session_id: String,
}

/// `upload_file`'s arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct UploadArgs {
    pub session_id: String,
    /// Where to write, relative to the session's working directory (e.g. `data/input.csv`); folders are made.
    pub path: String,
    /// The file's content: text as is, or base64 when `base64` is true.
    pub content: String,
    /// `content` is base64 (for binary files).
    #[serde(default)]
    pub base64: bool,
}

/// Arguments naming one file of a session.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct FileArgs {
    pub session_id: String,
    /// Relative to the session's working directory.
    pub path: String,
}

/// `list_files`' arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct ListFilesArgs {
    pub session_id: String,
    /// The folder to list, relative to the working directory (default: the working directory itself).
    #[serde(default = "dot")]
    pub path: String,
}

fn dot() -> String {
    ".".into()
}

/// `install_packages`' arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct InstallArgs {
    pub session_id: String,
    /// Package specifiers for the session's language, e.g. `["requests==2.32.3"]`.
    pub packages: Vec<String>,
}

#[tool_router]
impl KernelboxMcp {
    pub fn new(manager: Arc<SessionManager>) -> Self {
        KernelboxMcp { manager, tool_router: Self::tool_router() }
    }

    #[tool(description = "List the programming languages this server can run, with their versions. Use a \
        name from this list as `language` in start_session or run_code.")]
    async fn list_languages(&self) -> Result<CallToolResult, ErrorData> {
        let catalog = self.manager.catalog();
        let mut languages = Vec::new();
        for lang in &catalog.languages {
            let image = self.manager.runtime().image(&catalog.image_ref(&lang.image)).await.ok().flatten();
            let label = |k: &str| image.as_ref().and_then(|i| i.labels.get(k).cloned());
            languages.push(json!({
                "name": lang.name,
                "display_name": label(crate::images::catalog::LABEL_DISPLAY_NAME),
                "language_version": label(crate::images::catalog::LABEL_LANGUAGE_VERSION),
                "available": image.is_some(),
            }));
        }
        let text = languages
            .iter()
            .map(|l| format!("{} ({})", l["name"].as_str().unwrap_or(""), l["display_name"].as_str().unwrap_or("")))
            .collect::<Vec<_>>()
            .join(", ");
        Ok(structured(text, json!({ "languages": languages }), false))
    }

    #[tool(description = "Start a stateful session: a sandboxed Jupyter kernel (no network) in the given \
        language. Returns its `session_id` for execute, the file tools, restart and end_session. Variables, \
        imports and files persist across executions until end_session (or until it stays unused past its \
        idle timeout). For a single snippet, run_code is simpler.")]
    async fn start_session(
        &self,
        Parameters(args): Parameters<StartSessionArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let owner = owner(&ctx)?;
        let request = SessionRequest {
            language: args.language,
            memory_mb: args.memory_mb,
            cpus: args.cpus,
            timeout_s: args.timeout_s,
            idle_timeout_s: args.idle_timeout_s,
            ..Default::default()
        };
        match self.manager.create(owner, request).await {
            Ok(info) => {
                let text = format!("session {} started ({})", info.id, info.language);
                Ok(structured(text, to_value(&info), false))
            }
            Err(e) => Ok(failed(e)),
        }
    }

    #[tool(description = "Run code in a session started with start_session and return its outputs: \
        printed text, results, errors with tracebacks, and images (e.g. matplotlib plots) as image content. \
        Code that reads input gets the `stdin` answers in order. The structured content has the whole result \
        (status ok/error/timeout/killed, outputs in Jupyter's format, stdout, stderr, error).")]
    async fn execute(
        &self,
        Parameters(args): Parameters<ExecuteArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let owner = owner(&ctx)?;
        Ok(self.run(&owner, &args.session_id, args.code, args.timeout_s, args.stdin, &ctx).await)
    }

    #[tool(description = "Run code once in a fresh session of the given language and end the session: for \
        one-off snippets that need no state afterwards. Returns the outputs like execute.")]
    async fn run_code(
        &self,
        Parameters(args): Parameters<RunCodeArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let owner = owner(&ctx)?;
        let request = SessionRequest { language: args.language, timeout_s: args.timeout_s, ..Default::default() };
        let info = match self.manager.create(owner.clone(), request).await {
            Ok(info) => info,
            Err(e) => return Ok(failed(e)),
        };
        let id = info.id.to_string();
        // Ends the session however this call ends: returned, failed, or cancelled mid-run.
        let _end = EndOnDrop { manager: self.manager.clone(), owner: owner.clone(), id: id.clone() };
        let result = self.run(&owner, &id, args.code, args.timeout_s, args.stdin, &ctx).await;
        if let Err(e) = self.manager.delete(&owner, &id).await {
            tracing::warn!(session_id = %id, error = %e, "run_code could not end its session");
        }
        Ok(result)
    }

    #[tool(description = "Write a file into a session's working directory (the code's current directory). \
        Text as is, or base64 with `base64: true` for binary files.")]
    async fn upload_file(
        &self,
        Parameters(args): Parameters<UploadArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let owner = owner(&ctx)?;
        let bytes = match args.base64 {
            true => match base64::engine::general_purpose::STANDARD.decode(args.content.as_bytes()) {
                Ok(b) => b,
                Err(e) => return Ok(tool_error(format!("`content` is not valid base64: {e}"))),
            },
            false => args.content.into_bytes(),
        };
        let body = futures::stream::once(async move { Ok::<_, std::convert::Infallible>(bytes::Bytes::from(bytes)) });
        match self.manager.upload(&owner, &args.session_id, &args.path, body).await {
            Ok(written) => {
                Ok(structured(format!("wrote {} ({} bytes)", written.path, written.size), to_value(&written), false))
            }
            Err(e) => Ok(failed(e)),
        }
    }

    #[tool(description = "Read a file from a session's working directory (at most 8 MiB). Images come back \
        as image content, text as text, other files as base64.")]
    async fn download_file(
        &self,
        Parameters(args): Parameters<FileArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let owner = owner(&ctx)?;
        let download = match self.manager.download(&owner, &args.session_id, &args.path).await {
            Ok(d) => d,
            Err(e) => return Ok(failed(e)),
        };
        if download.size > MAX_DOWNLOAD_BYTES {
            return Ok(tool_error(format!(
                "{} is {} bytes; at most {MAX_DOWNLOAD_BYTES} are returned here: download it from \
                 GET /v1/sessions/{}/files/{} instead",
                args.path, download.size, args.session_id, args.path
            )));
        }
        let mut bytes = Vec::with_capacity(download.size as usize);
        let mut body = download.body;
        while let Some(chunk) = body.next().await {
            match chunk {
                Ok(chunk) if bytes.len() + chunk.len() <= MAX_DOWNLOAD_BYTES as usize => {
                    bytes.extend_from_slice(&chunk)
                }
                Ok(_) => {
                    return Ok(tool_error(format!("{} grew past {MAX_DOWNLOAD_BYTES} bytes while read", args.path)));
                }
                Err(e) => return Ok(tool_error(format!("reading {} failed: {e}", args.path))),
            }
        }
        let size = bytes.len();
        let b64 = || base64::engine::general_purpose::STANDARD.encode(&bytes);
        let result = match image_mime(&args.path) {
            Some(mime) => {
                let data = b64();
                let meta =
                    json!({"path": args.path, "size": size, "mime": mime, "encoding": "base64", "content": data});
                let mut result = CallToolResult::success(vec![ContentBlock::image(data, mime)]);
                result.structured_content = Some(meta);
                result
            }
            None => match std::str::from_utf8(&bytes) {
                Ok(text) => {
                    let meta = json!({"path": args.path, "size": size, "encoding": "utf-8", "content": text});
                    structured(text.to_owned(), meta, false)
                }
                Err(_) => {
                    let data = b64();
                    let meta = json!({"path": args.path, "size": size, "encoding": "base64", "content": data});
                    structured(data, meta, false)
                }
            },
        };
        Ok(result)
    }

    #[tool(description = "List a folder of a session's working directory: names, kinds (file or directory), \
        sizes and modification times.")]
    async fn list_files(
        &self,
        Parameters(args): Parameters<ListFilesArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let owner = owner(&ctx)?;
        match self.manager.list_files(&owner, &args.session_id, &args.path).await {
            Ok(listing) => {
                let value = to_value(&listing);
                let names: Vec<String> = value["entries"]
                    .as_array()
                    .map(|e| e.iter().map(|e| e["name"].as_str().unwrap_or("").to_owned()).collect())
                    .unwrap_or_default();
                let text = if names.is_empty() { format!("{} is empty", args.path) } else { names.join("\n") };
                Ok(structured(text, value, false))
            }
            Err(e) => Ok(failed(e)),
        }
    }

    #[tool(description = "Install packages into a session: pip packages for python and python_scientific \
        (`requests`, `pandas==2.2.*`), npm packages for javascript and typescript (`chalk@5`). The session has \
        no network; the server fetches them. They import in the running kernel without a restart.")]
    async fn install_packages(
        &self,
        Parameters(args): Parameters<InstallArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let owner = owner(&ctx)?;
        Ok(install_packages(&self.manager, &owner, &args.session_id, &args.packages).await)
    }

    #[tool(description = "Restart a session's kernel: variables and imports are lost, files are kept. Use \
        it when the kernel is stuck or dead.")]
    async fn restart(
        &self,
        Parameters(args): Parameters<SessionArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let owner = owner(&ctx)?;
        match self.manager.restart(&owner, &args.session_id).await {
            Ok(info) => Ok(structured(format!("session {} restarted", info.id), to_value(&info), false)),
            Err(e) => Ok(failed(e)),
        }
    }

    #[tool(description = "End a session: its kernel and files are removed. End sessions you no longer need.")]
    async fn end_session(
        &self,
        Parameters(args): Parameters<SessionArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let owner = owner(&ctx)?;
        match self.manager.delete(&owner, &args.session_id).await {
            Ok(()) => {
                Ok(structured(format!("session {} ended", args.session_id), json!({"ended": args.session_id}), false))
            }
            Err(e) => Ok(failed(e)),
        }
    }
}

impl KernelboxMcp {
    /// Runs code, reporting progress as output arrives; a cancelled call drops the execution, which
    /// interrupts the kernel.
    async fn run(
        &self,
        owner: &Owner,
        id: &str,
        code: String,
        timeout_s: Option<u64>,
        stdin: Vec<String>,
        ctx: &RequestContext<RoleServer>,
    ) -> CallToolResult {
        let progress = ctx.meta.get_progress_token();
        // Without a progress token nothing is streamed; the prompts are answered from `stdin` either way.
        let submission = Submission { code, timeout_s, stream: progress.is_some(), stdin, ask_for_input: false };
        let mut pending = match self.manager.submit_with(owner, id, submission) {
            Ok(p) => p,
            Err(e) => return failed(e),
        };
        let follow = async {
            let mut step = 0.0;
            while let Some(event) = pending.next_event().await {
                let (Some(token), Some(message)) = (&progress, progress_text(&event)) else { continue };
                step += 1.0;
                let note = ProgressNotificationParam::new(token.clone(), step).with_message(message);
                // A client that cannot take a notification loses it; the result still has everything.
                let _ = ctx.peer.notify_progress(note).await;
            }
            pending.finish().await
        };
        tokio::select! {
            result = follow => render(&result),
            _ = ctx.ct.cancelled() => tool_error("the call was cancelled; the code was interrupted".into()),
        }
    }
}

#[tool_handler(router = self.tool_router)]
impl ServerHandler for KernelboxMcp {
    fn get_info(&self) -> ServerConfig {
        ServerConfig::new(ServerCapabilities::builder().enable_tools().build())
            .with_server_info(Implementation::new("kernelbox", env!("CARGO_PKG_VERSION")))
            .with_instructions(
                "Run code in sandboxed, stateful Jupyter kernels (no network). run_code for one-off snippets; \
                 start_session + execute for work that keeps state; end_session when done.",
            )
    }
}

/// Installs through the manager (the server fetches, the sandbox installs); the outcome per package.
async fn install_packages(manager: &SessionManager, owner: &Owner, id: &str, packages: &[String]) -> CallToolResult {
    match manager.install_packages(owner, id, packages).await {
        Ok(report) => {
            let lines: Vec<String> = report
                .packages
                .iter()
                .map(|p| match (&p.version, &p.error) {
                    (_, Some(error)) => format!("{}: failed: {error}", p.spec),
                    (Some(version), None) => format!("{} {version} installed", p.name),
                    (None, None) => format!("{} installed", p.name),
                })
                .collect();
            let text = if lines.is_empty() { "nothing to install".to_owned() } else { lines.join("\n") };
            structured(text, to_value(&report), !report.ok)
        }
        Err(e) => failed(e),
    }
}

/// The owner the HTTP request speaks for (set by the API-key middleware).
fn owner(ctx: &RequestContext<RoleServer>) -> Result<Owner, ErrorData> {
    ctx.extensions
        .get::<axum::http::request::Parts>()
        .and_then(|parts| parts.extensions.get::<Owner>())
        .cloned()
        .ok_or_else(|| {
            ErrorData::internal_error("the request carries no owner (a bug: /mcp must sit behind the key check)", None)
        })
}

/// Closes a session when dropped (the session's own task removes its container).
struct EndOnDrop {
    manager: Arc<SessionManager>,
    owner: Owner,
    id: String,
}

impl Drop for EndOnDrop {
    fn drop(&mut self) {
        if let Ok(session) = self.manager.get(&self.owner, &self.id)
            && session.close("client_gone", false)
        {
            tracing::info!(session_id = %self.id, "run_code was cut short; ending its session");
        }
    }
}

fn to_value<T: serde::Serialize>(v: &T) -> Value {
    serde_json::to_value(v).unwrap_or(Value::Null)
}

fn structured(text: String, value: Value, is_error: bool) -> CallToolResult {
    let mut result = if is_error {
        CallToolResult::error(vec![ContentBlock::text(text)])
    } else {
        CallToolResult::success(vec![ContentBlock::text(text)])
    };
    result.structured_content = Some(value);
    result
}

fn tool_error(message: String) -> CallToolResult {
    CallToolResult::error(vec![ContentBlock::text(message)])
}

/// A manager error as the model sees it: the message, which says what to do.
fn failed(e: SessionError) -> CallToolResult {
    let api = crate::error::ApiError::from(e);
    structured(api.message.clone(), json!({"error": {"code": api.code, "message": api.message}}), true)
}

fn image_mime(path: &str) -> Option<&'static str> {
    let lower = path.to_ascii_lowercase();
    [
        (".png", "image/png"),
        (".jpg", "image/jpeg"),
        (".jpeg", "image/jpeg"),
        (".gif", "image/gif"),
        (".webp", "image/webp"),
    ]
    .into_iter()
    .find_map(|(ext, mime)| lower.ends_with(ext).then_some(mime))
}

/// What a progress notification says about an output event.
fn progress_text(event: &Event) -> Option<String> {
    let text = match event {
        Event::Output { output, .. } | Event::Updated { output, .. } => match output {
            Output::Stream { text, .. } => text.clone(),
            Output::Error { ename, evalue, .. } => format!("{ename}: {evalue}"),
            Output::DisplayData { data, .. } | Output::ExecuteResult { data, .. } => data
                .get("text/plain")
                .and_then(Value::as_str)
                .map(str::to_owned)
                .unwrap_or_else(|| format!("[{}]", data.keys().cloned().collect::<Vec<_>>().join(", "))),
        },
        Event::Cleared => "[output cleared]".into(),
        Event::InputRequested(asked) => format!("[input requested: {}]", asked.prompt),
    };
    Some(text.chars().take(PROGRESS_TEXT).collect())
}

/// An execution's result as MCP content: each output in order (text, or an image for PNG/JPEG), then a
/// line on how it ended unless it simply succeeded; the whole result as structured content.
pub fn render(result: &ExecuteResult) -> CallToolResult {
    let mut content = Vec::new();
    // A refused prompt's KeyboardInterrupt is our doing; the closing line says what happened instead.
    let refused = result.error.as_ref().is_some_and(|e| e.ename == "InputRequired");
    for output in &result.outputs {
        if refused && matches!(output, Output::Error { .. }) {
            continue;
        }
        match output {
            Output::Stream { name, text } if name == "stderr" => {
                content.push(ContentBlock::text(format!("[stderr]\n{text}")))
            }
            Output::Stream { text, .. } => content.push(ContentBlock::text(text.clone())),
            Output::DisplayData { data, .. } | Output::ExecuteResult { data, .. } => content.push(bundle(data)),
            Output::Error { ename, evalue, traceback } => {
                // Tracebacks carry terminal colours; a model reads them better plain.
                let trace = strip_ansi(&traceback.join("\n"));
                content.push(ContentBlock::text(format!("{ename}: {evalue}\n{trace}")));
            }
        }
    }
    let ending = match result.status {
        ExecStatus::Ok => None,
        ExecStatus::Error => result.error.as_ref().map(|e| format!("error: {}: {}", e.ename, e.evalue)),
        ExecStatus::Timeout => Some(format!(
            "timeout: the code ran past its time limit and was interrupted{}",
            if result.kernel_restarted { "; the kernel was restarted, its state is gone" } else { "" }
        )),
        ExecStatus::Killed => Some(format!("killed: {}", result.killed_reason.as_deref().unwrap_or("unknown"))),
    };
    let already_shown = result.status == ExecStatus::Error
        && result.outputs.iter().any(|o| matches!(o, Output::Error { .. }))
        && result.error.as_ref().is_some_and(|e| e.ename != "InputRequired");
    if let Some(ending) = ending.filter(|_| !already_shown) {
        content.push(ContentBlock::text(ending));
    }
    if result.truncated {
        content.push(ContentBlock::text("[output truncated: the output limit was reached]".to_owned()));
    }
    if content.is_empty() {
        content.push(ContentBlock::text("(no output)".to_owned()));
    }
    let mut rendered =
        if result.status == ExecStatus::Ok { CallToolResult::success(content) } else { CallToolResult::error(content) };
    rendered.structured_content = Some(to_value(result));
    rendered
}

/// A display or result: an image when it has PNG or JPEG, else its plain text (or which types it has).
fn bundle(data: &serde_json::Map<String, Value>) -> ContentBlock {
    for mime in ["image/png", "image/jpeg"] {
        if let Some(b64) = data.get(mime).and_then(Value::as_str) {
            // Jupyter may wrap base64 in lines; MCP wants it plain.
            return ContentBlock::image(b64.split_whitespace().collect::<String>(), mime);
        }
    }
    match data.get("text/plain").and_then(Value::as_str) {
        Some(text) => ContentBlock::text(text.to_owned()),
        None => ContentBlock::text(format!("[display: {}]", data.keys().cloned().collect::<Vec<_>>().join(", "))),
    }
}

/// rmcp's in-memory MCP sessions, at most `max` at once.
pub struct BoundedSessions {
    inner: LocalSessionManager,
    max: usize,
}

impl BoundedSessions {
    fn new(max: usize) -> Self {
        let mut inner = LocalSessionManager::default();
        let mut config = SessionConfig::default();
        config.keep_alive = Some(MCP_KEEP_ALIVE);
        inner.session_config = config;
        BoundedSessions { inner, max }
    }
}

/// Why an MCP session operation failed.
#[derive(Debug, thiserror::Error)]
pub enum McpSessionError {
    #[error("too many MCP sessions are open (at most {0}); close one (DELETE /mcp) or retry later")]
    Full(usize),
    #[error(transparent)]
    Local(#[from] rmcp::transport::streamable_http_server::session::local::LocalSessionManagerError),
}

type Local = LocalSessionManager;
type Sse = rmcp::transport::common::server_side_http::ServerSseMessage;
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::streamable_http_server::session::{SessionId as McpSessionId, SessionManager as McpSessions};

impl McpSessions for BoundedSessions {
    type Error = McpSessionError;
    type Transport = <Local as McpSessions>::Transport;

    async fn create_session(&self) -> Result<(McpSessionId, Self::Transport), Self::Error> {
        if self.inner.sessions.read().await.len() >= self.max {
            return Err(McpSessionError::Full(self.max));
        }
        Ok(self.inner.create_session().await?)
    }

    async fn initialize_session(
        &self,
        id: &McpSessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, Self::Error> {
        Ok(self.inner.initialize_session(id, message).await?)
    }

    async fn has_session(&self, id: &McpSessionId) -> Result<bool, Self::Error> {
        Ok(self.inner.has_session(id).await?)
    }

    async fn close_session(&self, id: &McpSessionId) -> Result<(), Self::Error> {
        Ok(self.inner.close_session(id).await?)
    }

    async fn create_stream(
        &self,
        id: &McpSessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<impl futures::Stream<Item = Sse> + Send + Sync + 'static, Self::Error> {
        Ok(self.inner.create_stream(id, message).await?)
    }

    async fn accept_message(&self, id: &McpSessionId, message: ClientJsonRpcMessage) -> Result<(), Self::Error> {
        Ok(self.inner.accept_message(id, message).await?)
    }

    async fn create_standalone_stream(
        &self,
        id: &McpSessionId,
    ) -> Result<impl futures::Stream<Item = Sse> + Send + Sync + 'static, Self::Error> {
        Ok(self.inner.create_standalone_stream(id).await?)
    }

    async fn resume(
        &self,
        id: &McpSessionId,
        last_event_id: String,
    ) -> Result<impl futures::Stream<Item = Sse> + Send + Sync + 'static, Self::Error> {
        Ok(self.inner.resume(id, last_event_id).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernel::ErrorInfo;

    fn result(status: ExecStatus, outputs: Vec<Output>) -> ExecuteResult {
        ExecuteResult { status, outputs, ..ExecuteResult::killed("", 0) }
    }

    fn texts(r: &CallToolResult) -> Vec<String> {
        r.content.iter().filter_map(|c| c.as_text().map(|t| t.text.clone())).collect()
    }

    #[test]
    fn outputs_become_text_and_png_becomes_image_content_in_order() {
        let png = json!({"image/png": "iVBO\nRw==\n", "text/plain": "<Figure>"});
        let outputs = vec![
            Output::Stream { name: "stdout".into(), text: "hi\n".into() },
            Output::DisplayData { data: png.as_object().unwrap().clone(), metadata: Default::default() },
            Output::ExecuteResult {
                execution_count: Some(1),
                data: json!({"text/plain": "42"}).as_object().unwrap().clone(),
                metadata: Default::default(),
            },
        ];
        let r = render(&result(ExecStatus::Ok, outputs));
        assert_eq!(r.is_error, Some(false));
        assert_eq!(r.content.len(), 3);
        assert_eq!(r.content[0].as_text().unwrap().text, "hi\n");
        let image = r.content[1].as_image().expect("an image");
        assert_eq!((image.data.as_str(), image.mime_type.as_str()), ("iVBORw==", "image/png"));
        assert_eq!(r.content[2].as_text().unwrap().text, "42");
        assert_eq!(r.structured_content.as_ref().unwrap()["status"], "ok");
    }

    #[test]
    fn an_error_is_shown_once_without_colours_and_marks_the_call_failed() {
        let error = Output::Error {
            ename: "ZeroDivisionError".into(),
            evalue: "division by zero".into(),
            traceback: vec!["\u{1b}[0;31mZeroDivisionError\u{1b}[0m: division by zero".into()],
        };
        let mut r = result(ExecStatus::Error, vec![error]);
        r.error =
            Some(ErrorInfo { ename: "ZeroDivisionError".into(), evalue: "division by zero".into(), traceback: vec![] });
        let rendered = render(&r);
        assert_eq!(rendered.is_error, Some(true));
        assert_eq!(texts(&rendered), vec!["ZeroDivisionError: division by zero\nZeroDivisionError: division by zero"]);
    }

    #[test]
    fn timeouts_and_refused_prompts_say_what_happened() {
        let timed_out = render(&result(ExecStatus::Timeout, vec![]));
        assert!(texts(&timed_out)[0].starts_with("timeout:"));
        let mut refused = result(
            ExecStatus::Error,
            vec![Output::Error { ename: "KeyboardInterrupt".into(), evalue: "".into(), traceback: vec![] }],
        );
        refused.error =
            Some(ErrorInfo { ename: "InputRequired".into(), evalue: "send stdin".into(), traceback: vec![] });
        assert!(texts(&render(&refused)).last().unwrap().contains("InputRequired: send stdin"));
    }

    #[tokio::test]
    async fn mcp_sessions_are_bounded() {
        let sessions = BoundedSessions::new(2);
        for _ in 0..2 {
            sessions.create_session().await.expect("within the bound");
        }
        assert!(matches!(sessions.create_session().await, Err(McpSessionError::Full(2))));
    }

    #[test]
    fn progress_quotes_output_briefly() {
        let long = Event::Output {
            output: Output::Stream { name: "stdout".into(), text: "x".repeat(5000) },
            display_id: None,
        };
        assert_eq!(progress_text(&long).unwrap().len(), PROGRESS_TEXT);
        assert_eq!(progress_text(&Event::Cleared).unwrap(), "[output cleared]");
    }
}
