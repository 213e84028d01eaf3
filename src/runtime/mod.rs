//! The container runtime seen from the session layer: a trait with the few operations kernelbox needs.
//!
//! [`docker::DockerRuntime`] implements it with bollard; [`fake::FakeRuntime`] is an in-memory stand-in for
//! unit tests of session logic. Architecture invariant: only `runtime/docker.rs` speaks bollard. The trait
//! carries no Jupyter or HTTP types. [`tool`] reads what a tool run through the exec API prints.

pub mod docker;
#[cfg(any(test, feature = "test-support"))]
pub mod fake;
pub mod tool;

use std::collections::HashMap;

use async_trait::async_trait;
use futures::stream::BoxStream;

/// Label keys every kernelbox container carries. Set at create time, never baked into images.
pub mod labels {
    /// The session id: the mark of a session container.
    pub const SESSION: &str = "kernelbox.session";
    /// Which service instance (state directory) made it.
    pub const INSTANCE: &str = "kernelbox.instance";
    /// A digest of the API key that owns the session ("anonymous" with no keys).
    pub const OWNER: &str = "kernelbox.owner";
    pub const LANGUAGE: &str = "kernelbox.language";
    pub const CREATED: &str = "kernelbox.created";
    /// The session's settings as JSON, so an adopted session keeps its limits.
    pub const CONFIG: &str = "kernelbox.config";
    /// Which boot of the session: names the run directory the container mounts.
    pub const BOOT: &str = "kernelbox.boot";
    /// The mark of a package fetcher (`src/packages/`): its fetch id. A fetcher has no session label.
    pub const FETCHER: &str = "kernelbox.fetcher";
    /// A kernel booted for the warm pool (the language): its owner is in the service's claims, if any.
    pub const POOL: &str = "kernelbox.pool";
    /// The runtime tree (`images/runtime_tree.rs`) a session container mounts: the image id's hex. Old
    /// trees are kept while a container names them.
    pub const RUNTIME_TREE: &str = "kernelbox.runtime_tree";
    /// The mark of a container made only to copy an image's files out (never started): the image.
    pub const EXPORT: &str = "kernelbox.export";
    /// The OCI runtime a session container runs under (`runc`, `runsc`).
    pub const OCI_RUNTIME: &str = "kernelbox.runtime";
}

/// What goes wrong in the runtime.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("the Docker engine is unreachable: {0}")]
    Unavailable(String),
    #[error("no such container or image: {0}")]
    NotFound(String),
    #[error("the Docker engine refused the request ({status}): {message}")]
    Api { status: u16, message: String },
    #[error("image build failed: {0}")]
    Build(String),
}

/// Everything needed to start a session container. The hardening that every container gets (no network,
/// no capabilities, read-only root, init, ...) is not optional and so is not a field: the runtime always
/// applies it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ContainerSpec {
    pub name: String,
    pub image: String,
    pub cmd: Vec<String>,
    pub env: Vec<String>,
    pub labels: HashMap<String, String>,
    /// Hard memory limit; swap is not allowed beyond it.
    pub memory_bytes: i64,
    pub nano_cpus: i64,
    pub pids_limit: i64,
    /// Mount point → tmpfs options (`size=...,uid=...`).
    pub tmpfs: HashMap<String, String>,
    /// `host_path:container_path:ro` bind mounts (a session never gets a writable host path).
    pub binds: Vec<String>,
    pub user: String,
    pub working_dir: String,
    /// A Docker network with egress, for package fetchers only (`src/packages/`): every session leaves it
    /// `None` and gets `--network none`. The rest of the sandbox applies either way.
    pub egress_network: Option<String>,
    /// The OCI runtime registered with the engine that runs it (`runc`, `runsc`); empty: the engine's
    /// default.
    pub oci_runtime: String,
}

/// An OCI runtime registered with the engine (`docker info`'s `Runtimes`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OciRuntimeInfo {
    pub name: String,
    /// The binary the engine runs (`runc`, `/usr/bin/runsc`).
    pub path: String,
    /// The arguments the engine passes it (gVisor's `--network=none`, `--fsgofer-host-uds`, ...).
    pub args: Vec<String>,
}

/// A container as listed.
#[derive(Debug, Clone, PartialEq)]
pub struct ContainerSummary {
    pub id: String,
    pub labels: HashMap<String, String>,
    pub running: bool,
}

/// How a container ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExitInfo {
    pub exit_code: i64,
    /// Docker saw the cgroup's OOM killer act.
    pub oom_killed: bool,
}

/// An image as inspected.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageInfo {
    pub id: String,
    pub labels: HashMap<String, String>,
    pub size_bytes: i64,
    pub created: String,
}

/// A request to build an image from a tar build context.
#[derive(Debug, Clone)]
pub struct BuildRequest {
    pub tag: String,
    pub context_tar: Vec<u8>,
    pub build_args: HashMap<String, String>,
    pub labels: HashMap<String, String>,
    pub no_cache: bool,
}

/// A command to run inside a running container (Docker's exec API), with stdin, stdout and stderr
/// attached. It runs in the container's namespaces and cgroup, as `user`: what it can touch is what the
/// sandbox itself can.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ExecRequest {
    pub cmd: Vec<String>,
    pub user: String,
    pub working_dir: String,
    pub env: Vec<String>,
}

/// A chunk of a running exec's output.
#[derive(Debug, Clone, PartialEq)]
pub enum ExecOutput {
    Stdout(bytes::Bytes),
    Stderr(bytes::Bytes),
}

/// A running exec: write its stdin, read its output until the stream ends, then ask for its exit code.
/// Dropping it closes both streams; the process then sees EOF and a broken pipe.
pub struct ExecProcess {
    pub id: String,
    pub stdin: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
    pub output: BoxStream<'static, Result<ExecOutput, RuntimeError>>,
}

/// A progress line from a build, import or pull.
pub type Progress<'a> = &'a mut (dyn FnMut(&str) + Send);

/// A running container's resource limits, as they can be changed after its start.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Resources {
    /// Memory, swap included: none beyond it.
    pub memory_bytes: i64,
    pub nano_cpus: i64,
    pub pids_limit: i64,
}

#[async_trait]
pub trait ContainerRuntime: Send + Sync + 'static {
    /// Succeeds when the engine answers.
    async fn ping(&self) -> Result<(), RuntimeError>;
    /// The OCI runtimes registered with the engine.
    async fn oci_runtimes(&self) -> Result<Vec<OciRuntimeInfo>, RuntimeError>;
    /// The engine's Swarm node ID, `None` when the engine is not an active member of a Swarm. An agent's
    /// node tag is derived from it.
    async fn swarm_node_id(&self) -> Result<Option<String>, RuntimeError>;
    /// Creates and starts a container; returns its id. On a failed start the container is removed.
    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<String, RuntimeError>;
    /// Makes a bridge network of ours named `name` (with `labels`) unless one exists: the containers on it
    /// cannot reach each other (inter-container traffic off); the host reaches them.
    async fn ensure_network(&self, name: &str, labels: HashMap<String, String>) -> Result<(), RuntimeError>;
    /// Removes a network (gone already is fine).
    async fn remove_network(&self, name: &str) -> Result<(), RuntimeError>;
    /// A running container's address on a network it joined (`None`: not on it).
    async fn container_address(&self, id: &str, network: &str) -> Result<Option<std::net::IpAddr>, RuntimeError>;
    /// Removes a container, killing it if needed. A container that is already gone is not an error.
    async fn remove(&self, id: &str) -> Result<(), RuntimeError>;
    /// Sends a signal (e.g. `SIGINT`) to the container's init, which passes it on.
    async fn signal(&self, id: &str, signal: &str) -> Result<(), RuntimeError>;
    /// Waits until the container stops, then tells how.
    async fn wait_exit(&self, id: &str) -> Result<ExitInfo, RuntimeError>;
    /// Containers (running or not) that carry label `key` (with `value`, when given).
    async fn list(&self, key: &str, value: Option<&str>) -> Result<Vec<ContainerSummary>, RuntimeError>;
    /// The image called `reference`, or `None`.
    async fn image(&self, reference: &str) -> Result<Option<ImageInfo>, RuntimeError>;
    /// Builds an image, reporting each line of build output.
    async fn build_image(&self, request: BuildRequest, progress: Progress<'_>) -> Result<(), RuntimeError>;
    /// Changes a running container's memory (swap included: none beyond it), CPU and pids limits.
    async fn update_limits(&self, id: &str, limits: Resources) -> Result<(), RuntimeError>;
    /// Starts `request` inside the running container `id`.
    async fn exec(&self, id: &str, request: &ExecRequest) -> Result<ExecProcess, RuntimeError>;
    /// The exit code of a finished exec, `None` while it runs.
    async fn exec_exit_code(&self, exec_id: &str) -> Result<Option<i64>, RuntimeError>;
    /// Copies the directory `path` out of `image` as a tar stream (Docker's archive API, on a container
    /// created from the image with `labels` and never started), chunk by chunk into `out`. The container is
    /// removed before this returns, whatever happened; a closed `out` ends the copy early (`Ok`).
    async fn copy_from_image(
        &self,
        image: &str,
        path: &str,
        labels: HashMap<String, String>,
        out: tokio::sync::mpsc::Sender<bytes::Bytes>,
    ) -> Result<(), RuntimeError>;
    /// Pulls an image from a registry.
    async fn pull_image(&self, reference: &str, progress: Progress<'_>) -> Result<(), RuntimeError>;
    /// Makes an image from a root filesystem tar stream (`docker import`).
    async fn import_image(
        &self,
        rootfs_tar: BoxStream<'static, std::io::Result<bytes::Bytes>>,
        reference: &str,
    ) -> Result<(), RuntimeError>;
}
