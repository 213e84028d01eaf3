//! kernelbox runs untrusted code in stateful Jupyter kernels, one hardened Docker container per session.
//!
//! The module map (ARCHITECTURE.md says more):
//! - [`agent`] — the `kernelbox agent` role: [`Application`]'s service on a cluster node, behind its state
//!   directory's lock, with the owner trusted from an API replica's header, its node's info and fencing.
//! - [`config`] — flags and environment → checked settings.
//! - [`api`] — the axum HTTP API; handlers only translate requests ([`error`] is its error shape).
//! - [`session`] — the session registry, lifecycle and per-session actors: the single owner of session state.
//! - [`kernel`] — the Jupyter wire protocol over ZeroMQ; knows nothing of HTTP or Docker.
//! - [`runtime`] — the container runtime trait, its Docker implementation (the only bollard user) and a fake.
//! - [`images`] — the kernel images, their builder, and their runtime trees (shared read-only files).
//! - [`file_lock`] — a lock file between processes (an agent's state directory, a tree being copied); a leaf.
//! - [`packages`] — package installs into sessions: spec checks, the wheel cache, the fetchers.
//! - [`store`] — the `/jupyter` API's files with a lifetime, kept by the service on the host.
//! - [`links`] — signed file links: the server's secret and the signatures that open one file without a key.
//! - [`reaper`] — the scheduler jobs that remove idle sessions and expired stored files, and tend the trees.
//! - [`telemetry`] — the log setup.
//! - [`text`] — text helpers (terminal escapes out); a leaf that imports nothing of the crate.
//! - [`rate`] — token buckets keyed by API key or address, which every rate limit is made of; a leaf.
//! - [`cluster`] — API replicas and agents as one service: certificates and the mutual TLS between them,
//!   the agents' TLS listener, and the `kernelbox api` role: membership, placement, routing, fan-out.
//! - [`node`] — what a node is to a cluster: its tag (the end of every id it hands out), what its agent
//!   reports; a leaf.

pub mod agent;
pub mod api;
pub mod cluster;
pub mod config;
pub mod egress;
pub mod error;
pub mod file_lock;
pub mod images;
pub mod kernel;
pub mod links;
pub mod node;
pub mod packages;
pub mod rate;
pub mod reaper;
pub mod runtime;
pub mod session;
pub mod store;
pub mod telemetry;
pub mod text;

use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::AppState;
use crate::session::{ManagerConfig, SessionManager};

/// Why the service could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    #[error("could not prepare the state directory {path}: {source}")]
    StateDir { path: String, source: std::io::Error },
    #[error("could not recover sessions from an earlier run: {0}")]
    Recover(#[from] session::SessionError),
    #[error(
        "could not prepare the datasets folder {path} (it and its `output/` must be folders the service can make or find): {source}"
    )]
    Datasets { path: String, source: std::io::Error },
    #[error("could not open the file store {path}: {source}")]
    FileStore { path: String, source: std::io::Error },
    #[error("no secret to sign file links with: {0}")]
    Secret(#[from] links::SecretError),
    #[error("the reaper did not start: {0}")]
    Reaper(#[from] tokio_cron_scheduler::JobSchedulerError),
    #[error("the HTTP server failed: {0}")]
    Http(#[from] std::io::Error),
    #[error(
        "the Docker engine is not an active member of a Swarm, so this node has no Swarm node ID to be known by; \
         join the Swarm, or name the node with --node-id"
    )]
    NotInSwarm,
    #[error("could not ask the Docker engine for its Swarm node ID: {0}")]
    Engine(#[from] runtime::RuntimeError),
    #[error("could not lock the state directory {path}: {source}")]
    Lock { path: String, source: std::io::Error },
    #[error("the sessions' OCI runtimes cannot work: {}", .0.join("; "))]
    OciRuntimes(Vec<String>),
}

/// Everything [`run`] needs besides the listener and the runtime.
#[derive(Debug, Clone)]
pub struct Settings {
    pub manager: ManagerConfig,
    pub api_keys: Vec<String>,
    /// Rate limit and slow-client timeouts.
    pub http: config::HttpLimits,
    /// The `/jupyter` API's file store.
    pub files: config::FileStoreSettings,
    /// Signed file links (their secret and longest lifetime).
    pub links: config::SignedUrlSettings,
    /// How long in-flight calls may finish after a shutdown signal before they are cut short.
    pub shutdown_grace: Duration,
}

/// A built service: state recovered, reaper running, not yet serving.
pub struct Application {
    listener: TcpListener,
    manager: Arc<SessionManager>,
    store: Arc<store::FileStore>,
    scheduler: tokio_cron_scheduler::JobScheduler,
    router: axum::Router,
    header_read_timeout: Duration,
    shutdown_grace: Duration,
}

impl Application {
    /// Prepares the state directory, adopts or removes what an earlier run left, starts the reaper.
    pub async fn build(
        listener: TcpListener,
        settings: Settings,
        runtime: Arc<dyn runtime::ContainerRuntime>,
    ) -> Result<Self, ServeError> {
        let keys = api::auth::Keys::new(&settings.api_keys);
        let header_read_timeout = settings.http.header_read_timeout;
        let shutdown_grace = settings.shutdown_grace;
        let Built { manager, store, scheduler, router } = Built::build(settings, runtime, keys).await?;
        Ok(Application { listener, manager, store, scheduler, router, header_read_timeout, shutdown_grace })
    }

    pub fn local_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.listener.local_addr()
    }

    /// The session manager (tests drive the reaper through it).
    pub fn manager(&self) -> Arc<SessionManager> {
        self.manager.clone()
    }

    /// The `/jupyter` API's file store (tests drive its sweep through it).
    pub fn store(&self) -> Arc<store::FileStore> {
        self.store.clone()
    }

    /// Serves until `shutdown` is cancelled; then stops accepting, gives in-flight calls a grace period,
    /// cuts the rest short and stops every session (removing its container unless configured to keep it).
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), ServeError> {
        let Application { listener, manager, store: _, mut scheduler, router, header_read_timeout, shutdown_grace } =
            self;
        let server = tokio::spawn(api::serve::serve(listener, router, header_read_timeout, shutdown.clone()));
        let mut server = std::pin::pin!(server);
        tokio::select! {
            _ = shutdown.cancelled() => {}
            result = &mut server => {
                // The server stopped by itself: it panicked (it retries listener errors).
                let _ = scheduler.shutdown().await;
                manager.shutdown().await;
                return result.map_err(|e| ServeError::Http(std::io::Error::other(e)));
            }
        }
        tracing::info!("shutting down: no new requests; waiting for in-flight calls");
        let finished_in_time = tokio::time::timeout(shutdown_grace, &mut server).await.is_ok();
        let _ = scheduler.shutdown().await;
        manager.shutdown().await;
        if !finished_in_time && tokio::time::timeout(Duration::from_secs(10), &mut server).await.is_err() {
            // Connections still open (a client that never finishes its request): cut them.
            server.abort();
        }
        tracing::info!("stopped");
        Ok(())
    }
}

/// What serving takes, in either role: the manager (sessions adopted), the file store, the reaper, the
/// router.
pub(crate) struct Built {
    pub(crate) manager: Arc<SessionManager>,
    pub(crate) store: Arc<store::FileStore>,
    pub(crate) scheduler: tokio_cron_scheduler::JobScheduler,
    pub(crate) router: axum::Router,
}

impl Built {
    /// Prepares the state directory, adopts or removes what an earlier run left (on an agent, then fences
    /// what it held through a gap), starts the reaper; the router takes its owners from `keys`.
    pub(crate) async fn build(
        settings: Settings,
        runtime: Arc<dyn runtime::ContainerRuntime>,
        keys: api::auth::Keys,
    ) -> Result<Self, ServeError> {
        let state_dir = settings.manager.state_dir.clone();
        prepare_state_dir(&state_dir)
            .map_err(|source| ServeError::StateDir { path: state_dir.display().to_string(), source })?;
        if let Some(datasets) = settings.manager.storage.datasets.resolve(&state_dir, "datasets") {
            session::outputs::prepare(&datasets)
                .map_err(|source| ServeError::Datasets { path: datasets.display().to_string(), source })?;
        }
        // Before anything is adopted or started: a secret that cannot be had stops the start.
        let signer = match settings.links.max_lifetime {
            Some(max_lifetime) => {
                let secret = match &settings.links.secret {
                    Some(secret) => links::configured_secret(&secret.0)?,
                    None => links::state_secret(&state_dir)?,
                };
                Some(Arc::new(links::UrlSigner::new(&secret, max_lifetime)))
            }
            None => None,
        };
        api::system::prometheus();
        let reap_every = settings.manager.limits.reap_interval;
        let node = settings.manager.node;
        let manager = SessionManager::new(runtime, settings.manager);
        // Before anything is adopted: a session must not start under a runtime that cannot run it.
        let problems = (manager.oci_runtime_problems().await)
            .map_err(|e| ServeError::OciRuntimes(vec![format!("could not read the engine's runtimes: {e}")]))?;
        if !problems.is_empty() {
            return Err(ServeError::OciRuntimes(problems));
        }
        let wheels = manager.packages().cache_dir();
        manager
            .packages()
            .prepare()
            .map_err(|source| ServeError::StateDir { path: wheels.display().to_string(), source })?;
        let (adopted, removed) = manager.recover().await?;
        tracing::info!(adopted, removed, "recovered sessions from an earlier run");
        let fenced = manager.fence_stale().await;
        if fenced > 0 {
            tracing::warn!(fenced, "removed the sessions held through a loss of contact longer than lost_after");
        }
        let files_dir = settings.files.dir.clone().unwrap_or_else(|| state_dir.join("files"));
        let store = store::FileStore::open(&files_dir, settings.files.max_bytes, settings.files.max_files)
            .map_err(|source| ServeError::FileStore { path: files_dir.display().to_string(), source })?
            .on_node(node);
        let store = Arc::new(store);
        manager.start_pool();
        manager.start_egress();
        let scheduler = reaper::start(manager.clone(), reap_every).await?;
        reaper::add_store_sweep(&scheduler, store.clone(), reap_every).await?;
        reaper::add_tree_upkeep(&scheduler, manager.clone(), reap_every.max(Duration::from_secs(60))).await?;
        let state = AppState { manager: manager.clone(), store: store.clone(), links: signer };
        let router = api::router(state, keys, &settings.http);
        Ok(Built { manager, store, scheduler, router })
    }
}

/// The state directory (made 0700 if missing) and its `sessions` folder, private to the service (0700):
/// containers reach their own run directory through its read-only mount, never through these paths.
pub(crate) fn prepare_state_dir(state_dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
    let runs = state_dir.join("sessions");
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&runs)?;
    if !std::fs::symlink_metadata(&runs)?.is_dir() {
        return Err(std::io::Error::other(format!("{} is not a directory", runs.display())));
    }
    std::fs::set_permissions(&runs, std::fs::Permissions::from_mode(0o700))
}

/// Builds and runs the service on `listener` until `shutdown` is cancelled.
pub async fn run(
    listener: TcpListener,
    settings: Settings,
    runtime: Arc<dyn runtime::ContainerRuntime>,
    shutdown: CancellationToken,
) -> Result<(), ServeError> {
    Application::build(listener, settings, runtime).await?.run_until_stopped(shutdown).await
}
