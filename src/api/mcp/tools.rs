//! The MCP tools: each one's arguments (with the JSON schemas `tools/list` shows) become a
//! [`SessionManager`] call for the HTTP request's [`Owner`], and its answer becomes MCP content through
//! [`content`](super::content). Code runs with progress notifications as output arrives; a cancelled call
//! drops its execution, which interrupts the kernel.

use std::sync::Arc;

use base64::Engine as _;
use futures::StreamExt;
use rmcp::handler::server::router::tool::ToolRouter;
use rmcp::handler::server::wrapper::Parameters;
use rmcp::model::{CallToolResult, Implementation, ProgressNotificationParam, ServerCapabilities, ServerConfig};
use rmcp::service::RequestContext;
use rmcp::{ErrorData, RoleServer, ServerHandler, tool, tool_handler, tool_router};
use schemars::JsonSchema;
use serde::Deserialize;
use serde_json::json;

use super::content::{self, failed, progress_text, render, structured, to_value, tool_error};
use crate::session::model::NetworkRequest;
use crate::session::{Owner, SessionManager, SessionRequest, Submission};

/// The largest file `download_file` returns inline; larger ones go through `/v1/sessions/{id}/files`.
pub const MAX_DOWNLOAD_BYTES: u64 = 8 * 1024 * 1024;

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
    /// The sandbox's OCI runtime, e.g. `runsc` (gVisor: a user-space kernel between the code and the
    /// host's): one of the language's `runtimes` in `list_languages` (default: its `runtime`).
    pub runtime: Option<String>,
    /// Host names the session's code may reach (`api.example.com`, `*.example.com`, `pypi.org:443`),
    /// when the server offers networks. Without it the session has no network.
    pub network_allow: Option<Vec<String>>,
}

/// `set_network`'s arguments.
#[derive(Debug, Deserialize, JsonSchema)]
pub struct SetNetworkArgs {
    /// The session (from `start_session`).
    pub session_id: String,
    /// The hosts its code may reach from now on: `api.example.com`, `*.example.com`, `pypi.org:443`.
    pub allow: Vec<String>,
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

    #[tool(description = "List the programming languages this server can run, with their versions and \
        sandbox runtimes. Use a name from this list as `language` in start_session or run_code, and one of \
        its `runtimes` as start_session's `runtime` (`runsc`: gVisor).")]
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
                "runtime": self.manager.limits().runtimes.default_for(&lang.name),
                "runtimes": self.manager.limits().runtimes.allowed_for(&lang.name),
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
            runtime: args.runtime,
            network: args.network_allow.map(|allow| NetworkRequest { allow }),
            ..Default::default()
        };
        match self.manager.create(owner, request).await {
            Ok(info) => {
                let text = format!("session {} started ({}, runtime {})", info.id, info.language, info.runtime);
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
        // One execution, then the session ends: nothing to restart a dead kernel for.
        let request = SessionRequest {
            language: args.language,
            timeout_s: args.timeout_s,
            auto_restart: Some(false),
            ..Default::default()
        };
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
        let size = bytes.len() as u64;
        let body = futures::stream::once(async move { Ok::<_, std::convert::Infallible>(bytes::Bytes::from(bytes)) });
        match self.manager.upload(&owner, &args.session_id, &args.path, Some(size), body).await {
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
        let download = match self.manager.files().download(&owner, &args.session_id, &args.path).await {
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
        Ok(content::file(&args.path, &bytes))
    }

    #[tool(description = "List a folder of a session's working directory: names, kinds (file or directory), \
        sizes and modification times.")]
    async fn list_files(
        &self,
        Parameters(args): Parameters<ListFilesArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let owner = owner(&ctx)?;
        match self.manager.files().list(&owner, &args.session_id, &args.path).await {
            Ok(listing) => Ok(content::listing(&args.path, &listing)),
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
        // The server fetches, the sandbox installs; the outcome per package.
        match self.manager.install_packages(&owner, &args.session_id, &args.packages).await {
            Ok(report) => Ok(content::installed(&report)),
            Err(e) => Ok(failed(e)),
        }
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

    #[tool(description = "Replace the hosts a session's code may reach through its proxy (servers that \
        offer networks): host names like api.example.com, *.example.com or pypi.org:443. The next connection \
        follows the new list; an empty list takes every host away. Execute results list what was refused.")]
    async fn set_network(
        &self,
        Parameters(args): Parameters<SetNetworkArgs>,
        ctx: RequestContext<RoleServer>,
    ) -> Result<CallToolResult, ErrorData> {
        let owner = owner(&ctx)?;
        let request = NetworkRequest { allow: args.allow };
        match self.manager.set_network(&owner, &args.session_id, &request) {
            Ok(view) => {
                let text = format!("session {} may reach: {}", args.session_id, view.allow.join(", "));
                Ok(structured(text, to_value(&view), false))
            }
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
