//! The session lifecycle: create, find, run code, restart, delete, reap, shut down.
//!
//! Every session is one task ([`Actor`]) that this manager spawns and tracks; the task boots the kernel,
//! serves it and removes its container at the end, and only then leaves the [`Registry`]. Callers only
//! await: a caller that goes away (a client that disconnects mid-create) closes the session through a
//! guard, and the task cleans up. Nothing here holds a lock across `.await`.

use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::sync::{Notify, mpsc, oneshot};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Limits;
use crate::images::{self, Catalog};
use crate::kernel::WireLimits;
use crate::packages::spec::{self, Ecosystem};
use crate::packages::{self, InstallReport, PackageConfig, PackageError, Packages};
use crate::runtime::{ContainerRuntime, ContainerSpec, labels};

use super::actor::{Actor, NotebookHandle, Start};
use super::error::SessionError;
use super::files::{self, Download, FileError, FilePath, Listing, Written};
use super::handle::{ExecuteCommand, InUse, Inbox, MAX_TRANSFERS, STREAM_EVENTS, Session};
use super::kernel_host::BootPlan;
use super::model::{
    ExecuteResult, Owner, SessionExtras, SessionId, SessionInfo, SessionLimits, SessionRequest, SessionSettings,
};
use super::notebook::{KernelSpec, Notebook};
use super::policy::{self, ReapRules, ReapView};
use super::pool::{Claim, Pool, PoolConfig, PoolStatus, Pooled};
use super::records;
use super::registry::Registry;
use super::{Pending, recovery};

/// How long DELETE waits for the container to be gone before it answers anyway (the task goes on).
const DELETE_WAIT: Duration = Duration::from_secs(30);
/// How long shutdown waits for the sessions' tasks; compose gives the service 40 s in all.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);
/// The reaper's margin over the boot deadline before a starting or restarting session counts as stuck.
const STUCK_MARGIN: Duration = Duration::from_secs(30);

/// An image of an execution saved as a file in the session's working directory.
#[derive(Debug, Clone, PartialEq, serde::Serialize, utoipa::ToSchema)]
pub struct SavedImage {
    /// The output (index in `outputs`) it was taken from.
    pub output_index: usize,
    pub mime: String,
    /// Relative to the working directory.
    pub path: String,
    pub size: u64,
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

/// Held while a file transfer runs.
struct TransferGuard {
    _in_use: InUse,
    _permit: tokio::sync::OwnedSemaphorePermit,
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
}

/// Service-owned folders on the host.
#[derive(Debug, Clone)]
pub struct Storage {
    /// Where the service writes notebooks; `<state>/notebooks` when unset. Never mounted into a session.
    pub notebooks_dir: Option<PathBuf>,
    /// How a deployment names the notebooks folder to its users (the session API's `notebook_path`).
    pub notebooks_public_path: String,
    /// Mounted read-only at `/mnt/data` in every session, when set.
    pub datasets_dir: Option<PathBuf>,
}

impl Default for Storage {
    fn default() -> Self {
        Storage { notebooks_dir: None, notebooks_public_path: "/mnt/jupyter_sessions".into(), datasets_dir: None }
    }
}

/// The registry of live sessions and their lifecycle.
pub struct SessionManager {
    runtime: Arc<dyn ContainerRuntime>,
    config: ManagerConfig,
    registry: Arc<Registry>,
    /// Tracks session tasks and container watchers, so shutdown waits for them.
    tracker: TaskTracker,
    /// Runs of the reaper never overlap (guards no data).
    reaping: tokio::sync::Mutex<()>,
    /// Package installs (the wheel cache and the fetchers).
    packages: Arc<Packages>,
    /// Kernels booted ahead of demand.
    pool: Pool,
    /// Wakes the pool's refill loop (after a claim or a boot).
    pool_wake: Notify,
    /// Stops the refill loop and the boots under way.
    pool_stop: CancellationToken,
}

/// The owner label of a pooled container (its real owner, once claimed, is in the claims folder).
const POOL_OWNER: &str = "kernelbox:pool";

impl SessionManager {
    pub fn new(runtime: Arc<dyn ContainerRuntime>, config: ManagerConfig) -> Arc<Self> {
        let packages = Arc::new(Packages::new(
            runtime.clone(),
            config.packages.clone(),
            config.state_dir.clone(),
            config.instance.clone(),
        ));
        Arc::new(SessionManager {
            runtime,
            packages,
            config,
            registry: Arc::new(Registry::default()),
            tracker: TaskTracker::new(),
            reaping: tokio::sync::Mutex::new(()),
            pool: Pool::default(),
            pool_wake: Notify::new(),
            pool_stop: CancellationToken::new(),
        })
    }

    pub fn runtime(&self) -> &Arc<dyn ContainerRuntime> {
        &self.runtime
    }

    /// Package installs: the wheel cache and the fetchers.
    pub fn packages(&self) -> &Arc<Packages> {
        &self.packages
    }

    pub fn catalog(&self) -> &Catalog {
        &self.config.catalog
    }

    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    pub(super) fn config(&self) -> &ManagerConfig {
        &self.config
    }

    pub(super) fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Where run directories live.
    pub fn runs_dir(&self) -> PathBuf {
        self.config.state_dir.join("sessions")
    }

    /// Starts a session: a container, a booted kernel, a task. Returns once the kernel answers. If the
    /// caller goes away first, the session is closed and its task removes whatever it made.
    pub async fn create(self: &Arc<Self>, owner: Owner, req: SessionRequest) -> Result<SessionInfo, SessionError> {
        self.create_with(owner, req, SessionExtras::default()).await
    }

    /// [`create`](Self::create) with an adapter's extras (a named notebook, read-only mounts).
    pub async fn create_with(
        self: &Arc<Self>,
        owner: Owner,
        req: SessionRequest,
        extras: SessionExtras,
    ) -> Result<SessionInfo, SessionError> {
        policy::check_extras(&extras)?;
        let mut settings = policy::settle(&self.config.catalog, &self.config.limits, req)?;
        settings.notebook = extras.notebook;
        settings.mounts = extras.mounts;
        if let Some(claimed) = self.claim(&owner, &settings).await? {
            return Ok(claimed);
        }
        let image_ref = self.image_ref(&settings.language);
        if self.runtime.image(&image_ref).await?.is_none() {
            let image = self.config.catalog.language(&settings.language).expect("checked by settle").image.clone();
            return Err(SessionError::ImageMissing(image));
        }
        let (session, inbox) = self.new_session(SessionId::new(), owner, settings, Utc::now());
        self.registry.reserve(&session, &self.config.limits)?;
        let ready = self.spawn(session.clone(), inbox, Start::Fresh);
        let guard = CloseOnDrop(Some(session.clone()));
        let outcome = ready.await;
        guard.disarm();
        match outcome {
            Ok(Ok(())) => {
                metrics::counter!("kernelbox_sessions_created_total", "language" => session.settings.language.clone())
                    .increment(1);
                tracing::info!(session_id = %session.id, language = %session.settings.language, "session started");
                Ok(session.info())
            }
            Ok(Err(e)) => {
                metrics::counter!("kernelbox_session_start_failures_total", "language" => session.settings.language.clone()).increment(1);
                Err(e)
            }
            Err(_) => Err(SessionError::Closing),
        }
    }

    pub(super) fn image_ref(&self, language: &str) -> String {
        let image = &self.config.catalog.language(language).expect("a known language").image;
        self.config.catalog.image_ref(image)
    }

    pub(super) fn new_session(
        &self,
        id: SessionId,
        owner: Owner,
        settings: SessionSettings,
        created_at: DateTime<Utc>,
    ) -> (Arc<Session>, Inbox) {
        let l = &self.config.limits;
        let limits = SessionLimits {
            memory_mb: settings.memory_mb,
            cpus: settings.cpus,
            pids: l.pids_limit,
            timeout_s: settings.timeout_s,
            idle_timeout_s: settings.idle_timeout_s,
            tmpfs_mb: tmpfs_mb(l.tmpfs_mb, settings.memory_mb),
        };
        Session::new(id, owner, settings, created_at, limits, l.queue_depth)
    }

    /// Spawns the session's task. The registry entry stays until the task has ended, whatever ends it
    /// (a panic included).
    pub(super) fn spawn(
        &self,
        session: Arc<Session>,
        inbox: Inbox,
        start: Start,
    ) -> oneshot::Receiver<Result<(), SessionError>> {
        let (ready_tx, ready) = oneshot::channel();
        let actor = Actor {
            notebook: self.open_notebook(&session),
            session: session.clone(),
            plan: self.boot_plan(&session),
            host: None,
            inbox,
            output_limit: self.config.limits.output_limit_bytes,
            interrupt_grace: self.config.limits.interrupt_grace,
            late_output: self
                .config
                .catalog
                .language(&session.settings.language)
                .map(|l| l.late_output())
                .unwrap_or_default(),
            peers: Default::default(),
            link_broken: false,
        };
        let leave = Deregister {
            registry: self.registry.clone(),
            session,
            claims: self.claims_dir(),
            installed: self.installed_dir(),
        };
        self.tracker.spawn(async move {
            let _leave = leave;
            actor.run(start, ready_tx).await;
        });
        ready
    }

    /// The session's notebook, opened (or created). A notebook that cannot be written is logged, not
    /// fatal: the session runs without one.
    fn open_notebook(&self, session: &Session) -> Option<NotebookHandle> {
        let (path, keep) = self.notebook_plan(session);
        let language = self.config.catalog.language(&session.settings.language)?;
        let spec = KernelSpec {
            name: language.name.clone(),
            display_name: language.display_name(),
            language: language.programming_language().to_owned(),
        };
        match Notebook::open(&path, &spec) {
            Ok(notebook) => Some(NotebookHandle { notebook, keep }),
            Err(e) => {
                tracing::error!(session_id = %session.id, path = %path.display(), error = %e, "cannot write the session's notebook");
                None
            }
        }
    }

    fn boot_plan(&self, session: &Session) -> BootPlan {
        self.boot_plan_for(&session.id, &session.owner, &session.settings, session.created_at, false)
    }

    /// The plan of a session's boots (or, `pooled`, of a kernel for the warm pool).
    fn boot_plan_for(
        &self,
        id: &SessionId,
        owner: &Owner,
        s: &SessionSettings,
        created_at: DateTime<Utc>,
        pooled: bool,
    ) -> BootPlan {
        let l = &self.config.limits;
        let mut labels = HashMap::from([
            (labels::SESSION.to_owned(), id.to_string()),
            (labels::INSTANCE.to_owned(), self.config.instance.clone()),
            (labels::OWNER.to_owned(), owner.0.clone()),
            (labels::LANGUAGE.to_owned(), s.language.clone()),
            (labels::CREATED.to_owned(), created_at.to_rfc3339()),
            (labels::CONFIG.to_owned(), serde_json::to_string(s).expect("settings serialize")),
        ]);
        if pooled {
            labels.insert(labels::POOL.to_owned(), s.language.clone());
        }
        let size = tmpfs_mb(l.tmpfs_mb, s.memory_mb);
        let tmpfs = |extra: &str| format!("rw,nosuid,nodev,size={size}m{extra}");
        let mut env: Vec<String> = s.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        // The kernel-side output cap (python images): beyond it the kernel drops output before it is
        // buffered in the kernel's own memory.
        env.push(format!("KERNELBOX_OUTPUT_LIMIT_BYTES={}", l.output_limit_bytes));
        let mut tmpfs_mounts = HashMap::from([
            ("/tmp".to_owned(), tmpfs("")),
            (images::HOME.to_owned(), tmpfs(",uid=1000,gid=1000,mode=0700")),
        ]);
        let mut binds = Vec::new();
        if Ecosystem::of(&s.language) == Some(Ecosystem::Python) {
            // Installed packages (src/packages/): the shared wheel cache read-only, and a directory of the
            // session's own on the kernel's PYTHONPATH from its start, so what is installed imports without
            // a restart (importlib caches a finder per existing path entry).
            binds.push(format!("{}:{}:ro", self.packages.cache_dir().display(), packages::WHEELS_MOUNT));
            // `exec`: compiled wheels are shared objects, mapped executable. (Docker's tmpfs default is
            // noexec; this lets the session run binaries it writes there, nothing its Python could not do.)
            tmpfs_mounts.insert(packages::PACKAGES_DIR.to_owned(), tmpfs(",exec,uid=1000,gid=1000,mode=0755"));
            let theirs = env.iter().position(|e| e.starts_with("PYTHONPATH=")).map(|i| env.remove(i));
            let path = match theirs.as_deref().and_then(|e| e.strip_prefix("PYTHONPATH=")) {
                Some(p) if !p.is_empty() => format!("PYTHONPATH={}:{p}", packages::PACKAGES_DIR),
                _ => format!("PYTHONPATH={}", packages::PACKAGES_DIR),
            };
            env.push(path);
        }
        if Ecosystem::of(&s.language) == Some(Ecosystem::Npm)
            && let Some(registry) = &self.config.packages.npm_registry
        {
            // Deno keys its npm cache by registry: the kernel looks where the fetcher put the packages.
            env.push(format!("NPM_CONFIG_REGISTRY={registry}"));
        }
        let spec = ContainerSpec {
            name: String::new(),
            image: self.image_ref(&s.language),
            cmd: vec![images::START_KERNEL.to_owned(), crate::kernel::connection::container_connection_file()],
            env,
            labels,
            memory_bytes: (s.memory_mb * 1024 * 1024) as i64,
            nano_cpus: (s.cpus * 1e9) as i64,
            pids_limit: l.pids_limit,
            tmpfs: tmpfs_mounts,
            binds: [self.binds(s), binds].concat(),
            user: "1000:1000".into(),
            working_dir: images::HOME.into(),
            egress_network: None,
        };
        BootPlan {
            runtime: self.runtime.clone(),
            spec,
            runs_dir: self.runs_dir(),
            session_id: id.to_string(),
            start_timeout: l.start_timeout,
            wire: WireLimits::for_output_cap(l.output_limit_bytes),
            tracker: self.tracker.clone(),
        }
    }

    /// The read-only mounts of a session: the datasets folder, then the adapter's.
    fn binds(&self, s: &SessionSettings) -> Vec<String> {
        let datasets = self.config.storage.datasets_dir.iter().map(|d| (d.clone(), policy::DATASETS_MOUNT.to_owned()));
        let mounts = s.mounts.iter().map(|m| (m.host.clone(), m.container.clone()));
        datasets.chain(mounts).map(|(host, container)| format!("{}:{container}:ro", host.display())).collect()
    }

    /// Saves the images among an execution's outputs as files in the session's working directory
    /// (`outputs/exec-<n>-<output>.<ext>`), removing them from the outputs. Returns what was saved.
    pub async fn save_images(
        &self,
        owner: &Owner,
        id: &str,
        result: &mut ExecuteResult,
    ) -> Result<Vec<SavedImage>, SessionError> {
        let stamp = match result.execution_count {
            Some(n) => n.to_string(),
            None => Utc::now().format("%Y%m%dT%H%M%S%3f").to_string(),
        };
        let images = files::take_images(&mut result.outputs, &format!("outputs/exec-{stamp}"));
        let mut saved = Vec::with_capacity(images.len());
        for image in images {
            let size = image.content.len() as u64;
            let body = futures::stream::once(async move { Ok::<_, std::convert::Infallible>(image.content) });
            self.upload(owner, id, image.path.as_str(), body).await?;
            saved.push(SavedImage {
                output_index: image.output_index,
                mime: image.mime,
                path: image.path.as_str().to_owned(),
                size,
            });
        }
        Ok(saved)
    }

    /// The folder the service writes notebooks in.
    pub fn notebooks_dir(&self) -> PathBuf {
        self.config.storage.notebooks_dir.clone().unwrap_or_else(|| self.config.state_dir.join("notebooks"))
    }

    /// The service's storage settings.
    pub fn storage(&self) -> &Storage {
        &self.config.storage
    }

    /// Where a session's notebook is, and whether it outlives the session.
    fn notebook_plan(&self, session: &Session) -> (PathBuf, bool) {
        match &session.settings.notebook {
            Some(rel) => (self.notebooks_dir().join(rel), true),
            None => (self.notebooks_dir().join("sessions").join(format!("{}.ipynb", session.id)), false),
        }
    }

    /// The session's notebook as it is now (written only by the service; read whole between appends).
    pub async fn notebook(&self, owner: &Owner, id: &str) -> Result<Vec<u8>, SessionError> {
        let session = self.registry.get(owner, id)?;
        let path = self.notebook_plan(&session).0;
        let lock = session.notebook_lock.clone();
        let read = tokio::task::spawn_blocking(move || {
            let _reading = lock.lock().unwrap_or_else(|p| p.into_inner());
            let mut file =
                std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(&path)?;
            let mut bytes = Vec::new();
            std::io::Read::read_to_end(&mut file, &mut bytes)?;
            Ok::<_, std::io::Error>(bytes)
        })
        .await
        .map_err(|e| SessionError::Io(std::io::Error::other(e)))?;
        read.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => SessionError::NotFound(format!("{id} (its notebook)")),
            _ => SessionError::Io(e),
        })
    }

    /// The regular files under the session's working directory modified at or after `since` (seconds
    /// since the epoch), hidden ones excepted, within `max_files` and `max_bytes` (held in memory), and
    /// how many were skipped over those limits.
    pub async fn collect_files(
        &self,
        owner: &Owner,
        id: &str,
        since: f64,
        max_files: usize,
        max_bytes: u64,
    ) -> Result<(Vec<files::Collected>, u64), SessionError> {
        let (container, _guard) = self.transfer(owner, id)?;
        Ok(files::collect(self.runtime.as_ref(), &container, max_files, max_bytes, since).await?)
    }

    /// Starts the warm pool's refill loop (after adoption, so that start-up does not race it).
    pub fn start_pool(self: &Arc<Self>) {
        if self.config.pool.targets.values().all(|&n| n == 0) {
            return;
        }
        let me = self.clone();
        self.tracker.spawn(async move { me.refill().await });
    }

    /// Keeps each language's pool at its target: replaces dead kernels, starts boots (at most
    /// `max_boots` at once), and sleeps until a claim or a finished boot wakes it (or 5 s pass).
    async fn refill(self: Arc<Self>) {
        loop {
            for dead in self.pool.take_dead() {
                self.remove_pooled(dead).await;
            }
            for (language, &target) in &self.config.pool.targets {
                if self.config.catalog.language(language).is_none() {
                    continue;
                }
                while let Some(id) = self.pool.begin_boot(language, target, self.config.pool.max_boots) {
                    let me = self.clone();
                    let language = language.clone();
                    self.tracker.spawn(async move { me.boot_pooled(language, id).await });
                }
            }
            tokio::select! {
                _ = self.pool_stop.cancelled() => return,
                _ = self.pool_wake.notified() => {}
                _ = tokio::time::sleep(Duration::from_secs(5)) => {}
            }
        }
    }

    /// Boots one kernel for the pool with the language's default settings.
    async fn boot_pooled(&self, language: String, id: SessionId) {
        let started = std::time::Instant::now();
        let request = SessionRequest { language: language.clone(), ..Default::default() };
        let booted = match policy::settle(&self.config.catalog, &self.config.limits, request) {
            Ok(settings) => {
                let created_at = Utc::now();
                let plan = self.boot_plan_for(&id, &Owner(POOL_OWNER.into()), &settings, created_at, true);
                match plan.boot(&self.pool_stop).await {
                    Ok(host) => Some(Pooled { id: id.clone(), settings, created_at, host }),
                    Err(e) => {
                        tracing::warn!(%language, error = %e, "a pooled kernel did not boot; retrying later");
                        None
                    }
                }
            }
            Err(e) => {
                tracing::error!(%language, error = %e, "the pool's default settings are invalid");
                None
            }
        };
        if booted.is_some() {
            metrics::histogram!("kernelbox_pool_boot_seconds", "language" => language.clone())
                .record(started.elapsed().as_secs_f64());
        }
        if let Some(unwanted) = self.pool.end_boot(&language, &id, booted) {
            self.remove_pooled(unwanted).await;
        }
        self.pool_gauge(&language);
        self.pool_wake.notify_one();
    }

    async fn remove_pooled(&self, pooled: Pooled) {
        if let Err(e) = self.runtime.remove(&pooled.host.container_id).await {
            tracing::warn!(container = %pooled.host.container_id, error = %e, "could not remove a pooled kernel");
        }
        self.pool.release(pooled.id.as_str());
        // Dropping the host removes its run directory.
    }

    fn pool_gauge(&self, language: &str) {
        let status = self.pool_status(language);
        metrics::gauge!("kernelbox_pool_ready", "language" => language.to_owned()).set(status.ready as f64);
    }

    /// The pool's numbers for `language`.
    pub fn pool_status(&self, language: &str) -> PoolStatus {
        self.pool.status(language, self.config.pool.targets.get(language).copied().unwrap_or(0))
    }

    /// Whether a request can be served by a pooled kernel: one booted with the language's defaults can
    /// take other memory and CPU limits (Docker updates them), but not environment variables, mounts or
    /// another tmpfs size (both fixed at create time).
    fn poolable(&self, settings: &SessionSettings) -> bool {
        let l = &self.config.limits;
        self.config.pool.targets.get(&settings.language).is_some_and(|&n| n > 0)
            && settings.env.is_empty()
            && settings.mounts.is_empty()
            && tmpfs_mb(l.tmpfs_mb, settings.memory_mb) == tmpfs_mb(l.tmpfs_mb, l.default_memory_mb)
    }

    /// Starts the session from the pool if it can: takes a ready kernel atomically, applies the limits,
    /// writes the claim, registers the session and hands the kernel to its task. `None`: start cold.
    async fn claim(
        self: &Arc<Self>,
        owner: &Owner,
        settings: &SessionSettings,
    ) -> Result<Option<SessionInfo>, SessionError> {
        if !self.poolable(settings) {
            return Ok(None);
        }
        let language = settings.language.clone();
        // A quota that is full fails here, before a pooled kernel is spent.
        self.registry.check_admit(owner, &self.config.limits)?;
        let (found, dead) = self.pool.take(&language);
        for d in dead {
            self.remove_pooled(d).await;
        }
        self.pool_wake.notify_one();
        let Some(pooled) = found else {
            metrics::counter!("kernelbox_pool_misses_total", "language" => language).increment(1);
            return Ok(None);
        };
        self.pool_gauge(&language);
        let container = pooled.host.container_id.clone();
        if pooled.settings.memory_mb != settings.memory_mb || pooled.settings.cpus != settings.cpus {
            let memory = (settings.memory_mb * 1024 * 1024) as i64;
            let cpus = (settings.cpus * 1e9) as i64;
            if let Err(e) = self.runtime.update_limits(&container, memory, cpus, self.config.limits.pids_limit).await {
                tracing::warn!(container = %container, error = %e, "could not apply limits to a pooled kernel; starting cold");
                self.remove_pooled(pooled).await;
                return Ok(None);
            }
        }
        let now = Utc::now();
        let claim = Claim { owner: owner.clone(), settings: settings.clone(), created_at: now };
        if let Err(e) = records::write_new(&self.claims_dir(), &pooled.id, &claim) {
            tracing::error!(error = %e, "could not write a claim; starting cold");
            self.remove_pooled(pooled).await;
            return Ok(None);
        }
        let (session, inbox) = self.new_session(pooled.id.clone(), owner.clone(), settings.clone(), now);
        if let Err(e) = self.registry.reserve(&session, &self.config.limits) {
            records::remove(&self.claims_dir(), pooled.id.as_str());
            self.remove_pooled(pooled).await;
            return Err(e);
        }
        // In the registry now: it may leave the pool's members.
        self.pool.release(pooled.id.as_str());
        let ready = self.spawn(session.clone(), inbox, Start::Ready(Box::new(pooled.host)));
        let guard = CloseOnDrop(Some(session.clone()));
        let outcome = ready.await;
        guard.disarm();
        match outcome {
            Ok(Ok(())) => {
                metrics::counter!("kernelbox_pool_hits_total", "language" => language.clone()).increment(1);
                metrics::counter!("kernelbox_sessions_created_total", "language" => language).increment(1);
                tracing::info!(session_id = %session.id, "session started from the pool");
                Ok(Some(session.info()))
            }
            Ok(Err(e)) => Err(e),
            Err(_) => Err(SessionError::Closing),
        }
    }

    /// Where claims of pooled containers are written.
    pub(super) fn claims_dir(&self) -> PathBuf {
        self.config.state_dir.join("claims")
    }

    /// Where each session's installed packages are recorded, for a session adopted after a restart.
    pub(super) fn installed_dir(&self) -> PathBuf {
        self.config.state_dir.join("installed")
    }

    /// Whether `id` is a session's or a pooled kernel's: the sweeps leave those alone.
    pub(super) fn knows(&self, id: &str) -> bool {
        self.registry.knows(id) || self.pool.knows(id)
    }

    /// The session `id` if `owner` owns it.
    pub fn get(&self, owner: &Owner, id: &str) -> Result<Arc<Session>, SessionError> {
        self.registry.get(owner, id)
    }

    pub fn list(&self, owner: &Owner) -> Vec<SessionInfo> {
        let mut infos: Vec<SessionInfo> =
            self.registry.visible().iter().filter(|s| &s.owner == owner).map(|s| s.info()).collect();
        infos.sort_by_key(|i| i.created_at);
        infos
    }

    /// Counts of sessions by language and status (`closing` for those on their way out), for metrics.
    pub fn census(&self) -> BTreeMap<(String, &'static str), u64> {
        let mut counts = BTreeMap::new();
        for s in self.registry.all() {
            let status = if s.is_closing() { "closing" } else { s.snapshot().status.as_str() };
            *counts.entry((s.settings.language.clone(), status)).or_insert(0) += 1;
        }
        counts
    }

    /// Queues code to run after the executions queued before it. Errors that a client must see as a
    /// status code (unknown session, full queue, bad timeout) come back here, before anything runs.
    /// With `stream`, [`Pending::next_event`] yields outputs as they come.
    pub fn submit(
        &self,
        owner: &Owner,
        id: &str,
        code: String,
        timeout_s: Option<u64>,
        stream: bool,
    ) -> Result<Pending, SessionError> {
        self.submit_with(owner, id, Submission { code, timeout_s, stream, ask_for_input: stream, stdin: Vec::new() })
    }

    /// [`submit`](Self::submit) with answers for the code's prompts (see `kernel::stdin`): they answer
    /// prompts in order; then a streaming caller that asked for it is asked (an
    /// [`Event::InputRequested`](crate::kernel::Event) answered with [`answer_input`](Self::answer_input));
    /// otherwise the prompt is refused.
    pub fn submit_with(&self, owner: &Owner, id: &str, submission: Submission) -> Result<Pending, SessionError> {
        let Submission { code, timeout_s, stream, stdin, ask_for_input } = submission;
        let timeout =
            timeout_s.map(|t| policy::check_timeout("timeout_s", t, self.config.limits.max_timeout)).transpose()?;
        crate::kernel::stdin::check_answers(&stdin).map_err(|e| SessionError::Invalid(e.to_string()))?;
        let (session, in_use) = self.registry.get_in_use(owner, id)?;
        let (reply, result) = oneshot::channel();
        let (events, events_rx) = match stream {
            true => {
                let (tx, rx) = mpsc::channel(STREAM_EVENTS);
                (Some(tx), Some(rx))
            }
            false => (None, None),
        };
        let command = ExecuteCommand {
            code,
            timeout: timeout.unwrap_or_else(|| session.settings.timeout()),
            events,
            interrupt_when_abandoned: true,
            stdin,
            ask_for_input,
            reply,
        };
        session.queue(command, self.config.limits.queue_depth)?;
        Ok(Pending::new(in_use, result, events_rx))
    }

    /// Answers the prompt a streaming execution of the session waits on (409 when none waits).
    pub fn answer_input(&self, owner: &Owner, id: &str, value: String) -> Result<(), SessionError> {
        self.registry.get(owner, id)?.answer_input(value)
    }

    /// Runs code and waits for its result.
    pub async fn execute(
        &self,
        owner: &Owner,
        id: &str,
        code: String,
        timeout_s: Option<u64>,
    ) -> Result<ExecuteResult, SessionError> {
        self.submit(owner, id, code, timeout_s, false)?.wait().await
    }

    /// The session's container for a file transfer. The guard keeps the session in use (never reaped
    /// mid-transfer) and holds one of its [`MAX_TRANSFERS`] slots.
    fn transfer(&self, owner: &Owner, id: &str) -> Result<(String, TransferGuard), SessionError> {
        let (session, in_use) = self.registry.get_in_use(owner, id)?;
        let permit = session.transfers.clone().try_acquire_owned().map_err(|_| FileError::Busy(MAX_TRANSFERS))?;
        session.update(|s| s.last_used = Utc::now());
        let container = session.snapshot().container_id;
        Ok((container, TransferGuard { _in_use: in_use, _permit: permit }))
    }

    /// Lists a directory of the session's working directory.
    pub async fn list_files(&self, owner: &Owner, id: &str, path: &str) -> Result<Listing, SessionError> {
        let path = FilePath::parse(path)?;
        let (container, _guard) = self.transfer(owner, id)?;
        Ok(files::list(self.runtime.as_ref(), &container, &path).await?)
    }

    /// Starts a download; the session stays in use until the body is consumed or dropped.
    pub async fn download(&self, owner: &Owner, id: &str, path: &str) -> Result<Download, SessionError> {
        let path = FilePath::parse(path)?;
        let (container, guard) = self.transfer(owner, id)?;
        let mut download = files::download(self.runtime.as_ref(), &container, &path).await?;
        download.body = download
            .body
            .map(move |chunk| {
                let _held = &guard;
                chunk
            })
            .boxed();
        Ok(download)
    }

    /// Writes a file into the session's working directory (at most the operator's upload limit).
    pub async fn upload<S, E>(&self, owner: &Owner, id: &str, path: &str, body: S) -> Result<Written, SessionError>
    where
        S: futures::Stream<Item = Result<bytes::Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let path = FilePath::parse(path)?;
        let (container, _guard) = self.transfer(owner, id)?;
        let max = self.config.limits.max_upload_bytes;
        Ok(files::upload(self.runtime.as_ref(), &container, &path, max, body).await?)
    }

    /// Removes a file or a directory (with its contents) from the session's working directory.
    pub async fn delete_file(&self, owner: &Owner, id: &str, path: &str) -> Result<(), SessionError> {
        let path = FilePath::parse(path)?;
        let (container, _guard) = self.transfer(owner, id)?;
        Ok(files::delete(self.runtime.as_ref(), &container, &path).await?)
    }

    /// Installs packages into a session (python: wheels from the shared cache, fetched first by a
    /// short-lived fetcher container when the cache lacks them; see `src/packages/`). Every spec is checked
    /// before anything runs. A failed install is a report with `ok: false`, and the session keeps what it
    /// had. The compatibility APIs call this too.
    pub async fn install_packages(
        &self,
        owner: &Owner,
        id: &str,
        requested: &[String],
    ) -> Result<InstallReport, SessionError> {
        let session = self.registry.get(owner, id)?;
        let language = session.settings.language.clone();
        let ecosystem = Ecosystem::of(&language).ok_or_else(|| PackageError::Unsupported(language.clone()))?;
        let specs = spec::parse_all(ecosystem, requested).map_err(PackageError::Invalid)?;
        let (container, _guard) = self.transfer(owner, id)?;
        let _one = session.installing.clone().try_acquire_owned().map_err(|_| PackageError::Busy)?;
        let report = self.packages.install(&container, &language, &self.image_ref(&language), &specs).await?;
        if report.ok {
            let recorded = {
                let mut recorded = session.packages.lock().unwrap();
                for s in &specs {
                    if !recorded.contains(&s.text) {
                        recorded.push(s.text.clone());
                    }
                }
                recorded.clone()
            };
            // On disk too: a session adopted by the next run of the service installs them again when a
            // restart gives it a new container.
            if let Err(e) = records::replace(&self.installed_dir(), &session.id, &recorded) {
                tracing::error!(session_id = %session.id, error = %e, "could not record the installed packages");
            }
        }
        Ok(report)
    }

    /// After a restart that gave the session a new container, installs its recorded packages again (from
    /// the cache; fetched again if evicted meanwhile). Failures are logged: the restart itself succeeded.
    async fn reinstall_packages(&self, session: &Session) {
        let specs: Vec<String> = session.packages.lock().unwrap().clone();
        let language = &session.settings.language;
        let Some(ecosystem) = Ecosystem::of(language) else { return };
        if specs.is_empty() {
            return;
        }
        let Ok(specs) = spec::parse_all(ecosystem, &specs) else { return };
        let container = session.snapshot().container_id;
        let Ok(_one) = session.installing.clone().try_acquire_owned() else { return };
        match self.packages.install(&container, language, &self.image_ref(language), &specs).await {
            Ok(r) if r.ok => tracing::info!(session_id = %session.id, cached = r.cached, "packages installed again"),
            Ok(r) => tracing::warn!(session_id = %session.id, log = %r.log, "packages could not be installed again"),
            Err(e) => tracing::warn!(session_id = %session.id, error = %e, "packages could not be installed again"),
        }
    }

    /// Attaches a Jupyter client to the session's kernel (the gateway's WebSocket); see `peers.rs`.
    pub async fn attach(
        &self,
        owner: &Owner,
        id: &str,
        session_key: Option<String>,
    ) -> Result<super::PeerLink, SessionError> {
        self.registry.get(owner, id)?.attach(session_key).await
    }

    pub fn interrupt(&self, owner: &Owner, id: &str) -> Result<(), SessionError> {
        self.registry.get(owner, id)?.request_interrupt()
    }

    /// A fresh kernel (state gone, files kept); a dead session gets a new container. A caller that
    /// leaves before the restart begins cancels it.
    pub async fn restart(&self, owner: &Owner, id: &str) -> Result<SessionInfo, SessionError> {
        let (session, _in_use) = self.registry.get_in_use(owner, id)?;
        let before = session.snapshot().container_id;
        let done = session.request_restart()?;
        done.await.map_err(|_| SessionError::Closing)??;
        if session.snapshot().container_id != before {
            // A dead session got a new container: its tmpfs (and the packages in it) did not survive.
            self.reinstall_packages(&session).await;
        }
        Ok(session.info())
    }

    /// Ends a session in any state and waits (bounded) until its container is gone.
    pub async fn delete(&self, owner: &Owner, id: &str) -> Result<(), SessionError> {
        let session = self.registry.get(owner, id)?;
        if !session.close("session_deleted", false) {
            return Err(SessionError::NotFound(id.to_owned()));
        }
        tracing::info!(session_id = %session.id, "deleting session");
        if !session.wait_finished(DELETE_WAIT).await {
            tracing::warn!(session_id = %session.id, "the session's container is not gone yet; its task goes on");
        }
        Ok(())
    }

    /// One pass of the reaper: removes sessions idle past their idle timeout, older than the maximum
    /// lifetime, or stuck starting or restarting (never one with work queued or running), then removes
    /// containers of this instance that no session owns. Passes never overlap.
    pub async fn reap_once(&self, now: DateTime<Utc>) -> ReapReport {
        let _pass = self.reaping.lock().await;
        let rules = ReapRules {
            max_lifetime: self.config.limits.max_lifetime,
            stuck_after: self.config.limits.start_timeout + STUCK_MARGIN,
        };
        let picked = self.registry.pick_and_close(|s| {
            let st = s.snapshot();
            let view = ReapView {
                status: st.status,
                status_since: st.status_since,
                last_used: st.last_used,
                created_at: s.created_at,
                idle_timeout: s.settings.idle_timeout(),
                in_use: s.in_use(),
            };
            policy::reap_reason(now, &view, rules)
        });
        for (session, why) in &picked {
            tracing::info!(session_id = %session.id, reason = why, "reaping session");
            metrics::counter!("kernelbox_sessions_reaped_total", "reason" => *why).increment(1);
        }
        // Closing is prompt in every state; wait for all at once, bounded, so passes stay short.
        futures::future::join_all(picked.iter().map(|(s, _)| s.wait_finished(DELETE_WAIT))).await;
        let orphans = recovery::sweep_orphans(self).await;
        ReapReport { removed: picked.into_iter().map(|(s, why)| (s.id.clone(), why)).collect(), orphans }
    }

    /// Finds what an earlier run of this instance left: adopts the sessions whose kernel answers and
    /// removes the rest. Returns (adopted, removed).
    pub async fn recover(self: &Arc<Self>) -> Result<(usize, usize), SessionError> {
        recovery::recover(self).await
    }

    /// Stops all sessions: removes their containers, or keeps them for the next run to adopt. New
    /// sessions are refused from the first moment. Bounded in time.
    pub async fn shutdown(&self) {
        self.pool_stop.cancel();
        let pooled = self.pool.close();
        futures::future::join_all(pooled.into_iter().map(|p| self.remove_pooled(p))).await;
        let sessions = self.registry.close_all();
        for s in &sessions {
            s.close("service_shutdown", self.config.keep_sessions);
        }
        futures::future::join_all(sessions.iter().map(|s| s.wait_finished(SHUTDOWN_WAIT))).await;
        // Boots under way (the pool's) finish their Docker calls and remove what they made: a create cut
        // off by the process's exit would leave a container behind.
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(20), self.tracker.wait()).await;
    }
}

/// The size of each of a session's two tmpfs mounts (`/tmp` and the working directory). Their pages count
/// against the session's memory limit, so both together get at most half of it: a full disk is then
/// ENOSPC for the code that writes, never an out-of-memory kill of the kernel.
pub fn tmpfs_mb(configured_max: u64, memory_mb: u64) -> u64 {
    configured_max.min(memory_mb / 4).max(8)
}

/// Closes a session whose creator went away before it was ready (dropped with the create future).
struct CloseOnDrop(Option<Arc<Session>>);

impl CloseOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for CloseOnDrop {
    fn drop(&mut self) {
        if let Some(session) = self.0.take()
            && session.close("client_gone", false)
        {
            tracing::info!(session_id = %session.id, "the client left during the boot; removing the session");
            metrics::counter!("kernelbox_sessions_abandoned_total").increment(1);
        }
    }
}

/// Leaves the registry when a session's task ends, however it ends.
struct Deregister {
    registry: Arc<Registry>,
    session: Arc<Session>,
    claims: PathBuf,
    installed: PathBuf,
}

impl Drop for Deregister {
    fn drop(&mut self) {
        // A claim (pooled sessions) and the installed packages go with their session, unless the session
        // is kept for adoption.
        if !self.session.keep_on_exit() {
            records::remove(&self.claims, self.session.id.as_str());
            records::remove(&self.installed, self.session.id.as_str());
        }
        self.registry.remove(&self.session.id);
        self.session.finished.cancel();
    }
}
