//! The session lifecycle: create, find, run code, restart, delete, reap, shut down.
//!
//! Every session is one task ([`Actor`]) that this manager spawns and tracks; the task boots the kernel,
//! serves it and removes its container at the end, and only then leaves the [`Registry`]. Callers only
//! await: a caller that goes away (a client that disconnects mid-create) closes the session through a
//! guard, and the task cleans up. Nothing here holds a lock across `.await`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::sync::{mpsc, oneshot};
use tokio_util::task::TaskTracker;

use crate::config::Limits;
use crate::images::{self, Catalog};
use crate::kernel::WireLimits;
use crate::packages::spec::{self, Ecosystem};
use crate::packages::{self, InstallReport, PackageConfig, PackageError, Packages};
use crate::runtime::{ContainerRuntime, ContainerSpec, labels};

use super::actor::{Actor, Start};
use super::error::SessionError;
use super::files::{self, Download, FileError, FilePath, Listing, Written};
use super::handle::{ExecuteCommand, InUse, Inbox, MAX_TRANSFERS, STREAM_EVENTS, Session};
use super::kernel_host::BootPlan;
use super::model::{ExecuteResult, Owner, SessionId, SessionInfo, SessionLimits, SessionRequest, SessionSettings};
use super::policy::{self, ReapRules, ReapView};
use super::registry::Registry;
use super::{Pending, recovery};

/// How long DELETE waits for the container to be gone before it answers anyway (the task goes on).
const DELETE_WAIT: Duration = Duration::from_secs(30);
/// How long shutdown waits for the sessions' tasks; compose gives the service 40 s in all.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);
/// The reaper's margin over the boot deadline before a starting or restarting session counts as stuck.
const STUCK_MARGIN: Duration = Duration::from_secs(30);

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
}

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
        let settings = policy::settle(&self.config.catalog, &self.config.limits, req)?;
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
            session: session.clone(),
            plan: self.boot_plan(&session),
            host: None,
            inbox,
            output_limit: self.config.limits.output_limit_bytes,
            interrupt_grace: self.config.limits.interrupt_grace,
        };
        let leave = Deregister { registry: self.registry.clone(), session };
        self.tracker.spawn(async move {
            let _leave = leave;
            actor.run(start, ready_tx).await;
        });
        ready
    }

    fn boot_plan(&self, session: &Session) -> BootPlan {
        let l = &self.config.limits;
        let s = &session.settings;
        let labels = HashMap::from([
            (labels::SESSION.to_owned(), session.id.to_string()),
            (labels::INSTANCE.to_owned(), self.config.instance.clone()),
            (labels::OWNER.to_owned(), session.owner.0.clone()),
            (labels::LANGUAGE.to_owned(), s.language.clone()),
            (labels::CREATED.to_owned(), session.created_at.to_rfc3339()),
            (labels::CONFIG.to_owned(), serde_json::to_string(s).expect("settings serialize")),
        ]);
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
            binds,
            user: "1000:1000".into(),
            working_dir: images::HOME.into(),
            egress_network: None,
        };
        BootPlan {
            runtime: self.runtime.clone(),
            spec,
            runs_dir: self.runs_dir(),
            session_id: session.id.to_string(),
            start_timeout: l.start_timeout,
            wire: WireLimits::for_output_cap(l.output_limit_bytes),
            tracker: self.tracker.clone(),
        }
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
        let timeout =
            timeout_s.map(|t| policy::check_timeout("timeout_s", t, self.config.limits.max_timeout)).transpose()?;
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
            reply,
        };
        session.queue(command, self.config.limits.queue_depth)?;
        Ok(Pending::new(in_use, result, events_rx))
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
            let mut recorded = session.packages.lock().unwrap();
            for s in &specs {
                if !recorded.contains(&s.text) {
                    recorded.push(s.text.clone());
                }
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
        let sessions = self.registry.close_all();
        for s in &sessions {
            s.close("service_shutdown", self.config.keep_sessions);
        }
        futures::future::join_all(sessions.iter().map(|s| s.wait_finished(SHUTDOWN_WAIT))).await;
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(5), self.tracker.wait()).await;
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
}

impl Drop for Deregister {
    fn drop(&mut self) {
        self.registry.remove(&self.session.id);
        self.session.finished.cancel();
    }
}
