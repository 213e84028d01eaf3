//! The session registry and lifecycle: the single owner of session state.
//!
//! It checks requests against the operator's limits, boots containers through [`BootPlan`], hands each
//! session to its [`Actor`], finds the sessions an earlier run left behind, and removes idle ones
//! ([`SessionManager::reap_once`]). The registry is a std mutex over a map, never held across `.await`.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Limits;
use crate::images::{self, Catalog};
use crate::runtime::{ContainerRuntime, ContainerSpec, labels};

use super::actor::{Actor, Control, ExecuteCommand, StreamEvent};
use super::error::SessionError;
use super::kernel_host::{BootPlan, InterruptMode, KernelHost};
use super::model::{
    ExecuteResult, KernelInfo, Owner, SessionId, SessionInfo, SessionLimits, SessionRequest, SessionSettings,
    SessionStatus,
};

/// The mutable part of a session, shared between the actor and the API.
#[derive(Debug, Clone)]
pub struct SessionState {
    pub status: SessionStatus,
    pub last_used: DateTime<Utc>,
    pub container_id: String,
    pub dead_reason: Option<String>,
    pub executions: u64,
    pub kernel: Option<KernelInfo>,
}

/// One session, as the registry holds it.
pub struct Session {
    pub id: SessionId,
    pub owner: Owner,
    pub settings: SessionSettings,
    pub created_at: DateTime<Utc>,
    /// Kept for the API's view of the limits.
    pids_limit: i64,
    tmpfs_mb: u64,
    state: Mutex<SessionState>,
    /// Executions queued or running: a session in use is never reaped.
    in_use: AtomicUsize,
    commands: mpsc::Sender<ExecuteCommand>,
    control: mpsc::UnboundedSender<Control>,
    /// Stops the actor.
    pub cancel: CancellationToken,
    /// When set, the actor leaves its container running on exit (for adoption by the next run).
    keep: AtomicBool,
    /// Why the session is closing, for executions it cuts short.
    closing_reason: Mutex<String>,
    actor: Mutex<Option<JoinHandle<()>>>,
}

impl Session {
    pub fn update(&self, f: impl FnOnce(&mut SessionState)) {
        f(&mut self.state.lock().unwrap());
    }

    pub fn snapshot(&self) -> SessionState {
        self.state.lock().unwrap().clone()
    }

    pub fn keep_on_exit(&self) -> bool {
        self.keep.load(Ordering::SeqCst)
    }

    pub fn closing_reason(&self) -> String {
        self.closing_reason.lock().unwrap().clone()
    }

    pub fn info(&self) -> SessionInfo {
        let s = self.snapshot();
        SessionInfo {
            id: self.id.clone(),
            language: self.settings.language.clone(),
            status: s.status,
            created_at: self.created_at,
            last_used_at: s.last_used,
            limits: SessionLimits {
                memory_mb: self.settings.memory_mb,
                cpus: self.settings.cpus,
                pids: self.pids_limit,
                timeout_s: self.settings.timeout_s,
                idle_timeout_s: self.settings.idle_timeout_s,
                tmpfs_mb: self.tmpfs_mb,
            },
            metadata: self.settings.metadata.clone(),
            kernel: s.kernel,
            dead_reason: s.dead_reason,
            executions: s.executions,
        }
    }
}

/// Marks a session in use while alive.
struct InUse(Arc<Session>);
impl InUse {
    fn mark(session: &Arc<Session>) -> Self {
        session.in_use.fetch_add(1, Ordering::SeqCst);
        InUse(session.clone())
    }
}
impl Drop for InUse {
    fn drop(&mut self) {
        self.0.in_use.fetch_sub(1, Ordering::SeqCst);
    }
}

/// A queued execution; keeps its session marked in use until dropped.
pub struct Pending {
    _in_use: InUse,
    result: oneshot::Receiver<ExecuteResult>,
}

impl Pending {
    pub async fn wait(self) -> Result<ExecuteResult, SessionError> {
        self.result.await.map_err(|_| SessionError::Closing)
    }
}

/// What one reaper pass did.
#[derive(Debug, Default, PartialEq)]
pub struct ReapReport {
    /// Sessions removed, with why.
    pub removed: Vec<(SessionId, &'static str)>,
}

/// Fixed settings of the manager.
#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub limits: Limits,
    /// Session directories live under `<state_dir>/sessions`.
    pub state_dir: PathBuf,
    pub instance: String,
    pub catalog: Catalog,
    pub keep_sessions: bool,
}

/// The registry of live sessions.
pub struct SessionManager {
    runtime: Arc<dyn ContainerRuntime>,
    config: ManagerConfig,
    sessions: Mutex<HashMap<SessionId, Arc<Session>>>,
    /// Tracks actors and container watchers, so shutdown waits for them.
    tracker: TaskTracker,
    /// Set during shutdown: no new sessions.
    closing: AtomicBool,
    /// Runs of the reaper never overlap.
    reaping: tokio::sync::Mutex<()>,
}

impl SessionManager {
    pub fn new(runtime: Arc<dyn ContainerRuntime>, config: ManagerConfig) -> Arc<Self> {
        Arc::new(SessionManager {
            runtime,
            config,
            sessions: Mutex::new(HashMap::new()),
            tracker: TaskTracker::new(),
            closing: AtomicBool::new(false),
            reaping: tokio::sync::Mutex::new(()),
        })
    }

    pub fn runtime(&self) -> &Arc<dyn ContainerRuntime> {
        &self.runtime
    }

    pub fn catalog(&self) -> &Catalog {
        &self.config.catalog
    }

    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    fn sessions_dir(&self) -> PathBuf {
        self.config.state_dir.join("sessions")
    }

    /// Checks a request against the limits and fills in defaults. Asking for more than the operator
    /// allows is refused, never silently lowered.
    pub fn settle(&self, req: SessionRequest) -> Result<SessionSettings, SessionError> {
        let l = &self.config.limits;
        if self.config.catalog.language(&req.language).is_none() {
            return Err(SessionError::UnknownLanguage(req.language));
        }
        let memory_mb = req.memory_mb.unwrap_or(l.default_memory_mb);
        if !(64..=l.max_memory_mb).contains(&memory_mb) {
            return Err(SessionError::Invalid(format!("memory_mb must be between 64 and {}", l.max_memory_mb)));
        }
        let cpus = req.cpus.unwrap_or(l.default_cpus);
        if !(cpus >= 0.01 && cpus <= l.max_cpus) {
            return Err(SessionError::Invalid(format!("cpus must be between 0.01 and {}", l.max_cpus)));
        }
        let timeout_s = req.timeout_s.unwrap_or(l.default_timeout.as_secs());
        if !(1..=l.max_timeout.as_secs()).contains(&timeout_s) {
            return Err(SessionError::Invalid(format!("timeout_s must be between 1 and {}", l.max_timeout.as_secs())));
        }
        let idle_timeout_s = req.idle_timeout_s.unwrap_or(l.default_idle_timeout.as_secs());
        if !(1..=l.max_idle_timeout.as_secs()).contains(&idle_timeout_s) {
            return Err(SessionError::Invalid(format!(
                "idle_timeout_s must be between 1 and {}",
                l.max_idle_timeout.as_secs()
            )));
        }
        let env = req.env.unwrap_or_default();
        check_env(&env)?;
        let metadata = req.metadata.unwrap_or_default();
        if metadata.len() > 64 || metadata.iter().any(|(k, v)| k.len() > 256 || v.len() > 4096) {
            return Err(SessionError::Invalid(
                "metadata: at most 64 entries, keys up to 256 and values up to 4096 bytes".into(),
            ));
        }
        Ok(SessionSettings { language: req.language, memory_mb, cpus, timeout_s, idle_timeout_s, env, metadata })
    }

    /// Starts a session: a container, a booted kernel, an actor. Returns once the kernel answers.
    pub async fn create(self: &Arc<Self>, owner: Owner, req: SessionRequest) -> Result<SessionInfo, SessionError> {
        let settings = self.settle(req)?;
        let language = self.config.catalog.language(&settings.language).expect("checked by settle").clone();
        let image_ref = self.config.catalog.image_ref(&language.image);
        let image =
            self.runtime.image(&image_ref).await?.ok_or_else(|| SessionError::ImageMissing(language.image.clone()))?;
        let interrupt_mode = interrupt_mode(&image.labels);

        let id = SessionId::new();
        let created_at = Utc::now();
        let (session, commands, control) = self.new_session(id.clone(), owner, settings, created_at, String::new());
        self.reserve(&session)?;

        let plan = self.boot_plan(&session, &image_ref, interrupt_mode);
        let booted = tokio::select! {
            r = plan.boot() => r,
            _ = session.cancel.cancelled() => Err(SessionError::Closing),
        };
        let host = match booted {
            Ok(host) => host,
            Err(e) => {
                self.sessions.lock().unwrap().remove(&id);
                let _ = std::fs::remove_dir_all(&plan.dir);
                metrics::counter!("kernelbox_session_start_failures_total", "language" => session.settings.language.clone()).increment(1);
                return Err(e);
            }
        };
        metrics::counter!("kernelbox_sessions_created_total", "language" => session.settings.language.clone())
            .increment(1);
        tracing::info!(session_id = %id, language = %session.settings.language, container = %host.container_id, "session started");
        self.start_actor(&session, plan, host, commands, control);
        Ok(session.info())
    }

    fn new_session(
        &self,
        id: SessionId,
        owner: Owner,
        settings: SessionSettings,
        created_at: DateTime<Utc>,
        container_id: String,
    ) -> (Arc<Session>, mpsc::Receiver<ExecuteCommand>, mpsc::UnboundedReceiver<Control>) {
        let (commands_tx, commands) = mpsc::channel(self.config.limits.queue_depth);
        let (control_tx, control) = mpsc::unbounded_channel();
        let session = Arc::new(Session {
            id,
            owner,
            settings,
            created_at,
            pids_limit: self.config.limits.pids_limit,
            tmpfs_mb: self.config.limits.tmpfs_mb,
            state: Mutex::new(SessionState {
                status: SessionStatus::Starting,
                last_used: Utc::now(),
                container_id,
                dead_reason: None,
                executions: 0,
                kernel: None,
            }),
            in_use: AtomicUsize::new(0),
            commands: commands_tx,
            control: control_tx,
            cancel: CancellationToken::new(),
            keep: AtomicBool::new(false),
            closing_reason: Mutex::new("session_deleted".into()),
            actor: Mutex::new(None),
        });
        (session, commands, control)
    }

    /// Adds a starting session to the registry if the totals allow it.
    fn reserve(&self, session: &Arc<Session>) -> Result<(), SessionError> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(SessionError::Closing);
        }
        let mut sessions = self.sessions.lock().unwrap();
        let l = &self.config.limits;
        if sessions.len() >= l.max_sessions {
            return Err(SessionError::TooMany(format!(
                "the server runs its maximum of {} sessions; end one first",
                l.max_sessions
            )));
        }
        let owned = sessions.values().filter(|s| s.owner == session.owner).count();
        if owned >= l.max_sessions_per_owner {
            return Err(SessionError::TooMany(format!(
                "this API key has its maximum of {} sessions; end one first",
                l.max_sessions_per_owner
            )));
        }
        sessions.insert(session.id.clone(), session.clone());
        Ok(())
    }

    fn boot_plan(&self, session: &Session, image_ref: &str, interrupt_mode: InterruptMode) -> BootPlan {
        let dir = self.sessions_dir().join(session.id.as_str());
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
        let tmpfs = |extra: &str| format!("rw,nosuid,nodev,size={}m{extra}", l.tmpfs_mb);
        let spec = ContainerSpec {
            name: format!("kernelbox-{}", session.id),
            image: image_ref.to_owned(),
            cmd: vec![images::START_KERNEL.to_owned(), crate::kernel::connection::container_connection_file()],
            env: s.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
            labels,
            memory_bytes: (s.memory_mb * 1024 * 1024) as i64,
            nano_cpus: (s.cpus * 1e9) as i64,
            pids_limit: l.pids_limit,
            tmpfs: HashMap::from([
                ("/tmp".to_owned(), tmpfs("")),
                (images::HOME.to_owned(), tmpfs(",uid=1000,gid=1000,mode=0700")),
            ]),
            binds: vec![format!("{}:{}:rw", dir.display(), crate::kernel::connection::CONTAINER_DIR)],
            user: "1000:1000".into(),
            working_dir: images::HOME.into(),
        };
        BootPlan {
            runtime: self.runtime.clone(),
            spec,
            dir,
            start_timeout: l.start_timeout,
            interrupt_mode,
            tracker: self.tracker.clone(),
            wire_limits: crate::kernel::WireLimits::for_output_cap(l.output_limit_bytes),
        }
    }

    fn start_actor(
        &self,
        session: &Arc<Session>,
        plan: BootPlan,
        host: KernelHost,
        commands: mpsc::Receiver<ExecuteCommand>,
        control: mpsc::UnboundedReceiver<Control>,
    ) {
        session.update(|s| {
            s.status = SessionStatus::Idle;
            s.container_id = host.container_id.clone();
            s.kernel = Some(host.info.clone());
        });
        let actor = Actor {
            session: session.clone(),
            plan,
            host: Some(host),
            output_limit: self.config.limits.output_limit_bytes,
            interrupt_grace: self.config.limits.interrupt_grace,
            commands,
            control,
        };
        let handle = self.tracker.spawn(actor.run());
        *session.actor.lock().unwrap() = Some(handle);
    }

    /// The session `id` if `owner` owns it (another owner's session is "not found", not "forbidden").
    pub fn get(&self, owner: &Owner, id: &str) -> Result<Arc<Session>, SessionError> {
        let not_found = || SessionError::NotFound(id.to_owned());
        let id = SessionId::parse(id).ok_or_else(not_found)?;
        let sessions = self.sessions.lock().unwrap();
        sessions.get(&id).filter(|s| &s.owner == owner).cloned().ok_or_else(not_found)
    }

    pub fn list(&self, owner: &Owner) -> Vec<SessionInfo> {
        let sessions: Vec<Arc<Session>> =
            self.sessions.lock().unwrap().values().filter(|s| &s.owner == owner).cloned().collect();
        let mut infos: Vec<SessionInfo> = sessions.iter().map(|s| s.info()).collect();
        infos.sort_by_key(|i| i.created_at);
        infos
    }

    /// Counts of sessions by language and status, for metrics.
    pub fn census(&self) -> BTreeMap<(String, &'static str), u64> {
        let sessions: Vec<Arc<Session>> = self.sessions.lock().unwrap().values().cloned().collect();
        let mut counts = BTreeMap::new();
        for s in sessions {
            *counts.entry((s.settings.language.clone(), s.snapshot().status.as_str())).or_insert(0) += 1;
        }
        counts
    }

    /// Queues code to run after the executions queued before it. Errors that a client must see as a
    /// status code (unknown session, full queue, dead kernel) come back here, before anything runs;
    /// `events` then receives outputs as they come.
    pub fn submit(
        &self,
        owner: &Owner,
        id: &str,
        code: String,
        timeout_s: Option<u64>,
        events: Option<mpsc::UnboundedSender<StreamEvent>>,
    ) -> Result<Pending, SessionError> {
        let session = self.get(owner, id)?;
        let timeout = match timeout_s {
            None => session.settings.timeout(),
            Some(t) if (1..=self.config.limits.max_timeout.as_secs()).contains(&t) => Duration::from_secs(t),
            Some(_) => {
                return Err(SessionError::Invalid(format!(
                    "timeout_s must be between 1 and {}",
                    self.config.limits.max_timeout.as_secs()
                )));
            }
        };
        let in_use = InUse::mark(&session);
        let (reply, result) = oneshot::channel();
        let command = ExecuteCommand { code, timeout, events, reply };
        session.commands.try_send(command).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => SessionError::QueueFull(self.config.limits.queue_depth),
            mpsc::error::TrySendError::Closed(_) => SessionError::Closing,
        })?;
        Ok(Pending { _in_use: in_use, result })
    }

    /// Runs code and waits for its result.
    pub async fn execute(
        &self,
        owner: &Owner,
        id: &str,
        code: String,
        timeout_s: Option<u64>,
    ) -> Result<ExecuteResult, SessionError> {
        self.submit(owner, id, code, timeout_s, None)?.wait().await
    }

    pub fn interrupt(&self, owner: &Owner, id: &str) -> Result<(), SessionError> {
        let session = self.get(owner, id)?;
        session.control.send(Control::Interrupt).map_err(|_| SessionError::Closing)
    }

    /// A fresh kernel (state gone, files kept); a dead session gets a new container.
    pub async fn restart(&self, owner: &Owner, id: &str) -> Result<SessionInfo, SessionError> {
        let session = self.get(owner, id)?;
        let _in_use = InUse::mark(&session);
        let (tx, rx) = oneshot::channel();
        session.control.send(Control::Restart(tx)).map_err(|_| SessionError::Closing)?;
        rx.await.map_err(|_| SessionError::Closing)??;
        Ok(session.info())
    }

    /// Ends a session and removes its container.
    pub async fn delete(&self, owner: &Owner, id: &str) -> Result<(), SessionError> {
        let session = self.get(owner, id)?;
        if self.sessions.lock().unwrap().remove(&session.id).is_none() {
            return Err(SessionError::NotFound(id.to_owned()));
        }
        close(&session, "session_deleted").await;
        tracing::info!(session_id = %session.id, "session deleted");
        Ok(())
    }

    /// One pass of the idle reaper. Removes sessions idle past their idle timeout or older than the
    /// maximum lifetime, never one with an execution queued or running. Passes never overlap.
    pub async fn reap_once(&self, now: DateTime<Utc>) -> ReapReport {
        let _pass = self.reaping.lock().await;
        let max_lifetime = self.config.limits.max_lifetime;
        let doomed: Vec<(Arc<Session>, &'static str)> = {
            let mut sessions = self.sessions.lock().unwrap();
            let picked: Vec<(SessionId, &'static str)> = sessions
                .values()
                .filter_map(|s| {
                    let in_use = s.in_use.load(Ordering::SeqCst) > 0;
                    let why =
                        reap_reason(now, &s.snapshot(), s.created_at, s.settings.idle_timeout(), max_lifetime, in_use);
                    why.map(|why| (s.id.clone(), why))
                })
                .collect();
            picked.into_iter().filter_map(|(id, why)| sessions.remove(&id).map(|s| (s, why))).collect()
        };
        let mut report = ReapReport::default();
        for (session, why) in doomed {
            tracing::info!(session_id = %session.id, reason = why, "reaping session");
            metrics::counter!("kernelbox_sessions_reaped_total", "reason" => why).increment(1);
            close(&session, "reaped").await;
            report.removed.push((session.id.clone(), why));
        }
        report
    }

    /// Finds containers an earlier run of this instance left: adopts those whose kernel answers, removes
    /// the rest, and clears session directories that belong to no container.
    pub async fn recover(self: &Arc<Self>) -> Result<(usize, usize), SessionError> {
        let found = self.runtime.list(labels::INSTANCE, Some(&self.config.instance)).await?;
        let (mut adopted, mut removed) = (0, 0);
        let mut live_dirs = Vec::new();
        for container in found {
            match self.try_adopt(&container).await {
                Ok(id) => {
                    adopted += 1;
                    live_dirs.push(id.to_string());
                }
                Err(e) => {
                    tracing::info!(container = %container.id, error = %e, "removing a container left by an earlier run");
                    self.runtime.remove(&container.id).await?;
                    if let Some(id) = container.labels.get(labels::SESSION).and_then(|s| SessionId::parse(s)) {
                        let _ = std::fs::remove_dir_all(self.sessions_dir().join(id.as_str()));
                    }
                    removed += 1;
                }
            }
        }
        if let Ok(entries) = std::fs::read_dir(self.sessions_dir()) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if !live_dirs.contains(&name) && !self.sessions.lock().unwrap().keys().any(|k| k.as_str() == name) {
                    let _ = std::fs::remove_dir_all(entry.path());
                }
            }
        }
        Ok((adopted, removed))
    }

    async fn try_adopt(self: &Arc<Self>, c: &crate::runtime::ContainerSummary) -> Result<SessionId, SessionError> {
        let bad = |what: &str| SessionError::KernelStart(format!("cannot adopt: {what}"));
        if !c.running {
            return Err(bad("not running"));
        }
        let id = c.labels.get(labels::SESSION).and_then(|s| SessionId::parse(s)).ok_or_else(|| bad("no session id"))?;
        let owner = Owner(c.labels.get(labels::OWNER).cloned().ok_or_else(|| bad("no owner"))?);
        let settings: SessionSettings = c
            .labels
            .get(labels::CONFIG)
            .and_then(|j| serde_json::from_str(j).ok())
            .ok_or_else(|| bad("no settings"))?;
        let created_at = c
            .labels
            .get(labels::CREATED)
            .and_then(|t| DateTime::parse_from_rfc3339(t).ok())
            .map(|t| t.with_timezone(&Utc))
            .ok_or_else(|| bad("no creation time"))?;
        let language = self.config.catalog.language(&settings.language).ok_or_else(|| bad("unknown language"))?.clone();
        let image_ref = self.config.catalog.image_ref(&language.image);
        let image_labels = self.runtime.image(&image_ref).await?.map(|i| i.labels).unwrap_or_default();
        let (session, commands, control) = self.new_session(id.clone(), owner, settings, created_at, c.id.clone());
        let plan = self.boot_plan(&session, &image_ref, interrupt_mode(&image_labels));
        let host = plan.adopt(c.id.clone(), Duration::from_secs(10)).await?;
        self.sessions.lock().unwrap().insert(id.clone(), session.clone());
        self.start_actor(&session, plan, host, commands, control);
        tracing::info!(session_id = %id, container = %c.id, "adopted a session from an earlier run");
        Ok(id)
    }

    /// Stops all sessions: removes their containers, or keeps them for the next run to adopt.
    pub async fn shutdown(&self) {
        self.closing.store(true, Ordering::SeqCst);
        let sessions: Vec<Arc<Session>> = self.sessions.lock().unwrap().drain().map(|(_, s)| s).collect();
        for s in &sessions {
            s.keep.store(self.config.keep_sessions, Ordering::SeqCst);
        }
        futures::future::join_all(sessions.iter().map(|s| close(s, "service_shutdown"))).await;
        self.tracker.close();
        let _ = tokio::time::timeout(Duration::from_secs(10), self.tracker.wait()).await;
    }
}

/// Whether the reaper removes a session now, and why: idle past its idle timeout, or older than the
/// maximum lifetime. A session with an execution queued or running, or one starting or restarting, is
/// never removed.
pub fn reap_reason(
    now: DateTime<Utc>,
    state: &SessionState,
    created_at: DateTime<Utc>,
    idle_timeout: Duration,
    max_lifetime: Duration,
    in_use: bool,
) -> Option<&'static str> {
    if in_use || matches!(state.status, SessionStatus::Busy | SessionStatus::Starting | SessionStatus::Restarting) {
        return None;
    }
    let delta = |d: Duration| chrono::Duration::from_std(d).unwrap_or(chrono::TimeDelta::MAX);
    if now - state.last_used >= delta(idle_timeout) {
        Some("idle")
    } else if now - created_at >= delta(max_lifetime) {
        Some("lifetime")
    } else {
        None
    }
}

/// Stops a session's actor and waits for it to remove its container.
async fn close(session: &Session, reason: &str) {
    *session.closing_reason.lock().unwrap() = reason.to_owned();
    session.cancel.cancel();
    let handle = session.actor.lock().unwrap().take();
    if let Some(handle) = handle {
        let _ = handle.await;
    }
}

fn interrupt_mode(image_labels: &HashMap<String, String>) -> InterruptMode {
    match image_labels.get(images::LABEL_INTERRUPT_MODE).map(String::as_str) {
        Some("signal") => InterruptMode::Signal,
        _ => InterruptMode::Message,
    }
}

fn check_env(env: &BTreeMap<String, String>) -> Result<(), SessionError> {
    if env.len() > 64 {
        return Err(SessionError::Invalid("env: at most 64 variables".into()));
    }
    for (k, v) in env {
        let valid_name = !k.is_empty()
            && k.len() <= 128
            && !k.as_bytes()[0].is_ascii_digit()
            && k.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid_name {
            return Err(SessionError::Invalid(format!("env: `{k}` is not a valid variable name")));
        }
        if v.len() > 32 * 1024 || v.contains('\0') {
            return Err(SessionError::Invalid(format!("env: the value of `{k}` is too long or contains NUL")));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(status: SessionStatus, last_used: DateTime<Utc>) -> SessionState {
        SessionState { status, last_used, container_id: "c".into(), dead_reason: None, executions: 0, kernel: None }
    }

    const HOUR: Duration = Duration::from_secs(3600);
    const DAY: Duration = Duration::from_secs(86400);

    #[test]
    fn a_session_idle_past_its_timeout_is_reaped() {
        let now = Utc::now();
        let idle = state(SessionStatus::Idle, now - chrono::Duration::minutes(61));
        assert_eq!(reap_reason(now, &idle, now - chrono::Duration::hours(2), HOUR, DAY, false), Some("idle"));
        let recent = state(SessionStatus::Idle, now - chrono::Duration::minutes(59));
        assert_eq!(reap_reason(now, &recent, now - chrono::Duration::hours(2), HOUR, DAY, false), None);
    }

    #[test]
    fn a_session_past_its_lifetime_is_reaped_even_if_recently_used() {
        let now = Utc::now();
        let st = state(SessionStatus::Idle, now);
        assert_eq!(reap_reason(now, &st, now - chrono::Duration::hours(25), HOUR, DAY, false), Some("lifetime"));
    }

    #[test]
    fn a_session_in_use_is_never_reaped() {
        let now = Utc::now();
        let long_ago = now - chrono::Duration::days(30);
        for status in [SessionStatus::Busy, SessionStatus::Starting, SessionStatus::Restarting] {
            assert_eq!(reap_reason(now, &state(status, long_ago), long_ago, HOUR, DAY, false), None, "{status:?}");
        }
        let queued = state(SessionStatus::Idle, long_ago);
        assert_eq!(reap_reason(now, &queued, long_ago, HOUR, DAY, true), None, "an execution is queued");
    }

    #[test]
    fn a_dead_session_is_reaped_like_an_idle_one() {
        let now = Utc::now();
        let dead = state(SessionStatus::Dead, now - chrono::Duration::hours(2));
        assert_eq!(reap_reason(now, &dead, now - chrono::Duration::hours(2), HOUR, DAY, false), Some("idle"));
    }
}
