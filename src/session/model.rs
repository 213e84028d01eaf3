//! The session's data: ids, settings, status, and what an execution returns. Plain types, shared by the
//! manager, the actor and (as JSON) the HTTP API.

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use std::path::PathBuf;

use crate::config::{Limits, PoolConfig, StateFolder};
use crate::images::Catalog;
use crate::kernel::{ErrorInfo, Output};
use crate::node::NodeTag;
use crate::packages::PackageConfig;

/// A session id: 24 lowercase hex characters (short enough for unix socket paths). On a cluster's agent the
/// last 8 are the node's tag, so that any API replica finds the node from the id alone.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize)]
pub struct SessionId(String);

impl SessionId {
    /// A fresh single-node id: 24 random hex digits.
    pub fn new() -> Self {
        Self::new_on(None)
    }

    /// A fresh id for the node tagged `node`: 16 random hex digits and the tag; without a tag (single
    /// node), 24 random hex digits.
    pub fn new_on(node: Option<NodeTag>) -> Self {
        let random = uuid::Uuid::new_v4().simple().to_string();
        match node {
            Some(tag) => SessionId(format!("{}{tag}", &random[..16])),
            None => SessionId(random[..24].to_owned()),
        }
    }

    /// Parses a client-supplied id; anything else than 24 hex characters is no session of ours.
    pub fn parse(s: &str) -> Option<Self> {
        (s.len() == 24 && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)))
            .then(|| SessionId(s.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for SessionId {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Who owns a session: a digest of the API key that made it, never the key itself.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Owner(pub String);

/// What a client may ask for when it starts a session (all optional but the language).
#[derive(Debug, Clone, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SessionRequest {
    /// `python`, `python_scientific`, `javascript`, `typescript`, `java` or `bash`.
    pub language: String,
    pub memory_mb: Option<u64>,
    pub cpus: Option<f64>,
    /// Default execution timeout for this session, seconds.
    pub timeout_s: Option<u64>,
    /// Idle time after which the session is removed, seconds.
    pub idle_timeout_s: Option<u64>,
    /// Environment variables for the kernel.
    pub env: Option<BTreeMap<String, String>>,
    /// Free-form labels for the client's own use (returned as given).
    pub metadata: Option<BTreeMap<String, String>>,
    /// Restart the kernel by itself when it dies (it exits, crashes or runs out of memory), as Jupyter's
    /// server does; at most `--auto-restart-limit` times within `--auto-restart-window-s`, then the
    /// session stays `dead`. Default true.
    pub auto_restart: Option<bool>,
    /// The OCI runtime the session's container runs under, e.g. `runsc` (gVisor's user-space kernel):
    /// one of those `/v1/languages` lists for the language. Default: the language's.
    pub runtime: Option<String>,
    /// Network by name, when the operator allows it (`--egress`): the host names the session's code may
    /// reach through its proxy. Without it the session has no network at all (and may be given one later
    /// with `PUT /v1/sessions/{id}/network`).
    pub network: Option<NetworkRequest>,
}

/// A session's network as asked for.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NetworkRequest {
    /// Host names the session's code may reach through its proxy: `api.example.com`, `*.example.com`
    /// (any name under it), with an optional port (`pypi.org:443`; default 80 and 443).
    pub allow: Vec<String>,
}

/// The settings a session runs with, after defaults and checks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionSettings {
    pub language: String,
    pub memory_mb: u64,
    pub cpus: f64,
    pub timeout_s: u64,
    pub idle_timeout_s: u64,
    pub env: BTreeMap<String, String>,
    pub metadata: BTreeMap<String, String>,
    /// The notebook the service keeps, relative to the notebooks folder; `None`: one per session,
    /// removed with it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub notebook: Option<String>,
    /// Service-owned host directories mounted read-only into the container.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub mounts: Vec<Mount>,
    /// The session API's user whose output folder this session fills: `/mnt/data/output` is writable and
    /// copied to `<datasets>/output/<user>/` (`outputs.rs`). `None`: read-only and empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output: Option<String>,
    /// A kernel that dies is restarted by the session's task (within the operator's bound). Sessions
    /// made before the setting existed have it on.
    #[serde(default = "on")]
    pub auto_restart: bool,
    /// The OCI runtime its container runs under (`runc`, `runsc`). Sessions made before the setting
    /// existed ran under Docker's default, `runc`.
    #[serde(default = "runc")]
    pub runtime: String,
    /// The allow-list it started with (`PUT …/network` replaces it; the service records that).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<Vec<String>>,
}

fn on() -> bool {
    true
}

fn runc() -> String {
    crate::config::oci_runtimes::DEFAULT_RUNTIME.to_owned()
}

/// A host directory that only the service writes, mounted read-only into a session.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    pub host: std::path::PathBuf,
    pub container: String,
}

/// What an adapter may ask for beyond a `/v1` request: a named notebook that outlives the session (the
/// session API's `<user>/notebook_<user>.ipynb`), read-only mounts of service-owned folders, and a user's
/// output folder (the session API's `/mnt/data/output`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct SessionExtras {
    pub notebook: Option<String>,
    pub mounts: Vec<Mount>,
    pub output: Option<String>,
}

impl SessionSettings {
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_s)
    }
    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.idle_timeout_s)
    }
}

/// Where a session is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum SessionStatus {
    /// The container is starting and the kernel booting.
    Starting,
    /// Ready for code.
    Idle,
    /// Running code.
    Busy,
    /// The kernel is restarting.
    Restarting,
    /// The kernel died; only a restart or delete helps.
    Dead,
}

impl SessionStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            SessionStatus::Starting => "starting",
            SessionStatus::Idle => "idle",
            SessionStatus::Busy => "busy",
            SessionStatus::Restarting => "restarting",
            SessionStatus::Dead => "dead",
        }
    }
}

/// The limits a session runs with, as the API shows them.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SessionLimits {
    pub memory_mb: u64,
    pub cpus: f64,
    pub pids: i64,
    pub timeout_s: u64,
    pub idle_timeout_s: u64,
    pub tmpfs_mb: u64,
}

/// What a kernel says of itself (`kernel_info_reply`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, utoipa::ToSchema)]
pub struct KernelInfo {
    pub implementation: String,
    /// `language_info.name`, e.g. `python`, `typescript`, `Java`, `bash`.
    pub language: String,
    pub language_version: String,
}

impl KernelInfo {
    pub fn from_reply(reply: &serde_json::Value) -> Self {
        let text = |p: &str| reply.pointer(p).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
        KernelInfo {
            implementation: text("/implementation"),
            language: text("/language_info/name"),
            language_version: text("/language_info/version"),
        }
    }
}

/// A session as the API shows it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct SessionInfo {
    #[schema(value_type = String)]
    pub id: SessionId,
    pub language: String,
    /// The OCI runtime its container runs under: `runc`, or `runsc` for gVisor's user-space kernel.
    pub runtime: String,
    pub status: SessionStatus,
    pub created_at: DateTime<Utc>,
    pub last_used_at: DateTime<Utc>,
    pub limits: SessionLimits,
    pub metadata: BTreeMap<String, String>,
    /// The running kernel, as it describes itself.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub kernel: Option<KernelInfo>,
    /// Why the kernel died, when `status` is `dead`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dead_reason: Option<String>,
    pub executions: u64,
    /// Whether a kernel that dies is restarted automatically (the session's setting).
    pub auto_restart: bool,
    /// Automatic restarts so far (each a new kernel with fresh state, in a new container).
    pub auto_restarts: u64,
    /// The latest automatic restart.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_auto_restart: Option<AutoRestart>,
}

/// One automatic restart: when the kernel died and why.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AutoRestart {
    pub at: DateTime<Utc>,
    /// How the kernel died: `out_of_memory`, `exited with code N`.
    pub reason: String,
}

/// Where an automatic restart is, as streaming clients hear of it (the `auto_restart` SSE event).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AutoRestartPhase {
    /// The kernel died; a new one is starting (the session is `restarting`).
    Restarting,
    /// The new kernel is ready: its state is fresh, the files of the old container are gone.
    Restarted,
    /// No automatic restart: the bound is reached or the restart failed; the session is `dead` until a
    /// client restarts it.
    Dead,
}

/// An automatic restart's news for the streams open on the session.
#[derive(Debug, Clone, PartialEq, Serialize, utoipa::ToSchema)]
pub struct AutoRestartNotice {
    pub phase: AutoRestartPhase,
    /// How the kernel died (`restarting`, `restarted`), or why it stays dead (`dead`).
    pub reason: String,
    /// Automatic restarts of the session so far.
    pub auto_restarts: u64,
}

/// How an execution ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ExecStatus {
    Ok,
    Error,
    /// The time limit passed; the kernel was interrupted (or restarted, see `kernel_restarted`).
    Timeout,
    /// The kernel died (see `killed_reason`).
    Killed,
}

impl ExecStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            ExecStatus::Ok => "ok",
            ExecStatus::Error => "error",
            ExecStatus::Timeout => "timeout",
            ExecStatus::Killed => "killed",
        }
    }
}

/// What an execution returns.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ExecuteResult {
    pub status: ExecStatus,
    pub execution_count: Option<u64>,
    pub outputs: Vec<Output>,
    /// All stdout stream text, concatenated: the text of the `stream` outputs again. When the printed
    /// text does not fit twice within the output cap, `stdout` and `stderr` keep their beginning with a
    /// marker (`streams_abridged`); `outputs` has the whole text.
    pub stdout: String,
    pub stderr: String,
    /// `stdout` or `stderr` was abridged (see `stdout`); nothing of the output is lost.
    #[serde(skip_serializing_if = "is_false")]
    pub streams_abridged: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorInfo>,
    pub duration_ms: u64,
    /// Something the code printed or showed was cut or dropped to keep the response within the output
    /// cap (abridged `stdout`/`stderr` are not: see `streams_abridged`).
    pub truncated: bool,
    /// Why, when `status` is `killed`: `out_of_memory`, `exited with code N`, `restarted`, `session_deleted`,
    /// `reaped`, `service_shutdown` or `client_gone`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub killed_reason: Option<String>,
    /// The kernel was restarted: it ignored the interrupt after a timeout, or it died (`killed`) and is
    /// restarted automatically. Its state is gone.
    pub kernel_restarted: bool,
    /// Output events a streaming client did not read in time and so did not get as events (the result
    /// still carries every output within the cap). Always 0 for a plain JSON call.
    #[serde(skip_serializing_if = "is_zero")]
    pub stream_events_dropped: u64,
    /// What the code tried on the network and was refused, and the bytes it moved (sessions of a
    /// server with `--egress` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub network: Option<crate::egress::session::NetworkReport>,
}

impl ExecuteResult {
    /// Adds a line of the service's own to the execution's stderr (an output of its own, at the end).
    pub fn note(&mut self, text: String) {
        self.stderr.push_str(&text);
        self.outputs.push(Output::Stream { name: "stderr".into(), text });
    }
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// One execution to queue.
#[derive(Debug, Default)]
pub struct Submission {
    pub code: String,
    /// Seconds before the kernel is interrupted (default: the session's).
    pub timeout_s: Option<u64>,
    /// Outputs (and prompts) as events, through [`Pending::next_event`].
    pub stream: bool,
    /// Answers to the code's prompts, in order.
    pub stdin: Vec<String>,
    /// With `stream`: when the answers run out, ask the caller (an `InputRequested` event) rather than
    /// refuse the prompt.
    pub ask_for_input: bool,
}

/// What one reaper pass did.
#[derive(Debug, Default, PartialEq)]
pub struct ReapReport {
    /// Sessions removed, with why.
    pub removed: Vec<(SessionId, &'static str)>,
    /// Containers of this instance that no session owned, removed.
    pub orphans: usize,
}

/// Fixed settings of the manager.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub limits: Limits,
    /// Run directories live under `<state_dir>/sessions`.
    pub state_dir: PathBuf,
    pub instance: String,
    pub catalog: Catalog,
    pub keep_sessions: bool,
    /// Package installs: fetchers, the wheel cache (`<state_dir>/wheels`), limits.
    pub packages: PackageConfig,
    pub storage: Storage,
    pub pool: PoolConfig,
    /// The node's tag on a cluster's agent (every session id ends with it); `None` on a single node.
    pub node: Option<NodeTag>,
    /// Fencing after a loss of contact with the API tier (an agent only); `None`: off.
    pub fencing: Option<FenceConfig>,
    /// Network by name (`src/egress/`); `None`: off, every session has no network.
    pub egress: Option<crate::config::EgressConfig>,
}

/// How an agent fences itself (see `fence.rs`): after more than `lost_after` without a request from the
/// API tier, the sessions it held are removed and their ids answer `session_lost`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FenceConfig {
    pub lost_after: Duration,
}

/// Service-owned folders on the host.
#[derive(Debug, Clone)]
pub struct Storage {
    /// Where the service writes notebooks; `<state>/notebooks` when unset. Never mounted into a session.
    pub notebooks_dir: Option<PathBuf>,
    /// How a deployment names the notebooks folder to its users (the session API's `notebook_path`).
    pub notebooks_public_path: String,
    /// Mounted read-only at `/mnt/data` in every session (`<state>/datasets` unless named, or none).
    pub datasets: StateFolder,
    /// The caps of each session API user's output folder, `<datasets>/output/<user>/`.
    pub user_output: OutputCaps,
    /// Where the runtime trees are kept (`<state>/runtimes` unless named, or none: sessions read their
    /// image's own files). See `images/runtime_tree.rs`.
    pub runtimes: StateFolder,
}

impl Default for Storage {
    fn default() -> Self {
        Storage {
            notebooks_dir: None,
            notebooks_public_path: "/mnt/jupyter_sessions".into(),
            datasets: StateFolder::default(),
            user_output: OutputCaps::default(),
            runtimes: StateFolder::default(),
        }
    }
}

/// What one user's output folder may hold; a file past either cap is not copied out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutputCaps {
    pub max_bytes: u64,
    pub max_files: u64,
}

impl Default for OutputCaps {
    /// `--user-output-max-mb` and `--user-output-max-files`'s defaults.
    fn default() -> Self {
        OutputCaps { max_bytes: 256 << 20, max_files: 1000 }
    }
}
