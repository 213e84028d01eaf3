//! The operations façade: what `api/` calls on sessions (create, find, run code, files, packages,
//! restart, delete), plus the reaper's pass and shutdown. Each duty is done by the part that owns its
//! state: [`Launcher`] starts session tasks, [`WarmPool`] keeps kernels ready, [`Transfers`] moves
//! files, [`Installs`] installs packages, [`NotebookStore`] keeps notebooks, `recovery` adopts and sweeps.
//!
//! Every session is one task (`actor.rs`) that boots the kernel, serves it and removes its container at
//! the end, and only then leaves the [`Registry`]. Callers only await: a caller that goes away (a client
//! that disconnects mid-create) closes the session through a guard, and the task cleans up. Nothing here
//! holds a lock across `.await`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Limits;
use crate::egress::hub::EgressHub;
use crate::egress::keeper::Keeper;
use crate::images::Catalog;
use crate::images::runtime_tree::{RuntimeTrees, TreeError, TreeMounts};
use crate::node::NodeTag;
use crate::packages::fetch_egress::{self, FetchEgress};
use crate::packages::{InstallReport, Packages};
use crate::runtime::ContainerRuntime;

use super::actor::Start;
use super::boot::BootPlanner;
use super::costs::{Costs, Limit};
use super::error::SessionError;
use super::fence::{self, ContactClock, Tombstones};
use super::files::Written;
use super::handle::{PeerLink, Pending, Session};
use super::installs::Installs;
use super::launch::Launcher;
use super::model::{
    ExecuteResult, ManagerConfig, NetworkRequest, Owner, ReapReport, SessionExtras, SessionId, SessionInfo,
    SessionRequest, Storage, Submission,
};
use super::network::{NetworkView, Networks};
use super::notebook_store::NotebookStore;
use super::policy::{self, ReapRules, ReapView};
use super::pool::{Pool, PoolStatus};
use super::records::StateDirs;
use super::recovery::{self, Recovery};
use super::registry::Registry;
use super::transfers::Transfers;
use super::warm_pool::WarmPool;

pub use super::transfers::SavedImage;

/// How long DELETE waits for the container to be gone before it answers anyway (the task goes on).
const DELETE_WAIT: Duration = Duration::from_secs(30);
/// How long shutdown waits for the sessions' tasks; compose gives the service 40 s in all.
const SHUTDOWN_WAIT: Duration = Duration::from_secs(10);
/// The reaper's margin over the boot deadline before a starting or restarting session counts as stuck.
const STUCK_MARGIN: Duration = Duration::from_secs(30);

/// The registry of live sessions and the operations on them.
pub struct SessionManager {
    config: ManagerConfig,
    registry: Arc<Registry>,
    launcher: Launcher,
    pool: Arc<WarmPool>,
    transfers: Transfers,
    installs: Arc<Installs>,
    /// The per-key limits on what costs: creates, installs, upload bytes.
    costs: Costs,
    /// Tracks every task the manager's parts spawn, so shutdown waits for them.
    tracker: TaskTracker,
    /// Runs of the reaper never overlap (guards no data).
    reaping: tokio::sync::Mutex<()>,
    /// An agent's contact clock (`fence.rs`); `None`: fencing is off.
    contact: Option<Mutex<ContactClock>>,
    /// The sessions adopted at start were held through a fatal gap: [`SessionManager::fence_stale`]
    /// removes them.
    stale_at_start: bool,
}

impl SessionManager {
    pub fn new(runtime: Arc<dyn ContainerRuntime>, config: ManagerConfig) -> Arc<Self> {
        let dirs = StateDirs::new(&config.state_dir);
        let networks = (config.egress.clone())
            .map(|egress| Arc::new(Networks { hub: EgressHub::new(egress), dir: dirs.network.clone() }));
        let mut packages =
            Packages::new(runtime.clone(), config.packages.clone(), config.state_dir.clone(), config.instance.clone());
        if let Some(networks) = &networks {
            let hosts = fetch_egress::index_hosts(&config.packages, &networks.hub.config.package_hosts);
            let fetchers = config.state_dir.join("fetchers");
            packages = packages.through_egress(FetchEgress::new(networks.hub.clone(), fetchers, &hosts));
        }
        let packages = Arc::new(packages);
        let tracker = TaskTracker::new();
        let now = Utc::now();
        let registry = Arc::new(match config.node {
            Some(_) => Registry::with_tombstones(Tombstones::load(&config.state_dir, now)),
            None => Registry::default(),
        });
        let (contact, stale_at_start) = match config.fencing {
            Some(fencing) => {
                let persisted = fence::read_last_contact(&config.state_dir);
                let (clock, stale) = ContactClock::starting(persisted, now, fencing.lost_after);
                (Some(Mutex::new(clock)), stale)
            }
            None => (None, false),
        };
        let planner = Arc::new(BootPlanner {
            runtime: runtime.clone(),
            limits: config.limits.clone(),
            catalog: config.catalog.clone(),
            instance: config.instance.clone(),
            wheels_dir: packages.cache_dir(),
            npm_registry: config.packages.npm_registry.clone(),
            datasets_dir: config.storage.datasets.resolve(&config.state_dir, "datasets"),
            user_output: config.storage.user_output,
            runs_dir: dirs.runs.clone(),
            tracker: tracker.clone(),
            trees: RuntimeTrees::new(
                runtime.clone(),
                config.storage.runtimes.resolve(&config.state_dir, "runtimes"),
                &config.instance,
                &[crate::packages::PACKAGES_DIR],
            ),
            network: networks,
        });
        let notebooks_dir = config.storage.notebooks_dir.clone().unwrap_or_else(|| config.state_dir.join("notebooks"));
        let notebooks = Arc::new(NotebookStore { dir: notebooks_dir, catalog: config.catalog.clone() });
        let installs = Arc::new(Installs { packages, planner: planner.clone(), installed_dir: dirs.installed.clone() });
        Arc::new(SessionManager {
            launcher: Launcher {
                registry: registry.clone(),
                planner: planner.clone(),
                notebooks,
                output_locks: Default::default(),
                dirs: dirs.clone(),
                tracker: tracker.clone(),
                refit: installs.clone(),
            },
            pool: Arc::new(WarmPool {
                pool: Pool::on(config.node),
                config: config.pool.clone(),
                planner: planner.clone(),
                dirs: dirs.clone(),
                tracker: tracker.clone(),
                wake: Notify::new(),
                stop: CancellationToken::new(),
                demand: Default::default(),
                targets: Default::default(),
            }),
            transfers: Transfers {
                runtime,
                registry: registry.clone(),
                max_upload_bytes: config.limits.max_upload_bytes,
            },
            installs,
            costs: Costs::new(&config.limits.costs),
            registry,
            config,
            tracker,
            reaping: tokio::sync::Mutex::new(()),
            contact,
            stale_at_start,
        })
    }

    pub fn runtime(&self) -> &Arc<dyn ContainerRuntime> {
        &self.transfers.runtime
    }

    /// Package installs: the wheel cache and the fetchers.
    pub fn packages(&self) -> &Arc<Packages> {
        &self.installs.packages
    }

    pub fn catalog(&self) -> &Catalog {
        &self.config.catalog
    }

    /// The node's tag on a cluster's agent (every id it hands out ends with it); `None` on a single node.
    pub fn node(&self) -> Option<NodeTag> {
        self.config.node
    }

    pub fn limits(&self) -> &Limits {
        &self.config.limits
    }

    /// What is wrong with the engine's OCI runtimes for the operator's choice (`oci.rs`): empty when
    /// every runtime a session may run under is registered as it needs to be.
    pub async fn oci_runtime_problems(&self) -> Result<Vec<String>, SessionError> {
        let engine = self.runtime().oci_runtimes().await?;
        Ok(super::oci::problems(&self.config.limits.runtimes, &engine))
    }

    /// The folder the service writes notebooks in.
    pub fn notebooks_dir(&self) -> PathBuf {
        self.launcher.notebooks.dir.clone()
    }

    /// The service's storage settings.
    pub fn storage(&self) -> &Storage {
        &self.config.storage
    }

    /// The datasets folder sessions see at `/mnt/data`, if there is one.
    pub fn datasets_dir(&self) -> Option<&std::path::Path> {
        self.launcher.planner.datasets_dir.as_deref()
    }

    /// Starts a session: a container, a booted kernel, a task. Returns once the kernel answers. If the
    /// caller goes away first, the session is closed and its task removes whatever it made.
    pub async fn create(self: &Arc<Self>, owner: Owner, req: SessionRequest) -> Result<SessionInfo, SessionError> {
        self.create_with(owner, req, SessionExtras::default()).await
    }

    /// [`create`](Self::create) with an adapter's extras (a named notebook, read-only mounts). A request
    /// a pooled kernel can serve is a claim instead of a boot.
    pub async fn create_with(
        self: &Arc<Self>,
        owner: Owner,
        req: SessionRequest,
        extras: SessionExtras,
    ) -> Result<SessionInfo, SessionError> {
        policy::check_extras(&extras)?;
        let network = match &req.network {
            Some(request) => {
                let networks = self.networks().ok_or(crate::egress::allow::ListRefused::Off)?;
                Some(networks.check(request)?)
            }
            None => None,
        };
        let mut settings = policy::settle(&self.config.catalog, &self.config.limits, req)?;
        settings.network = network.as_ref().map(|n| n.entries());
        settings.notebook = extras.notebook;
        settings.mounts = extras.mounts;
        // No datasets folder, no output folder: the session's /mnt/data does not exist.
        settings.output = extras.output.filter(|_| self.launcher.planner.datasets_dir.is_some());
        let language = settings.language.clone();
        let runtime = settings.runtime.clone();
        let pool = self.pool.pool_of(&settings);
        // A quota that is full fails here, before a pooled kernel or a create of the key's budget is spent.
        self.registry.check_admit(&owner, &settings, &self.config.limits)?;
        self.costs.spend(&owner, Limit::Creates)?;
        if self.pool.poolable(&pool, &settings)
            && let Some(pooled) = self.pool.claim(&pool, &owner, &settings).await
        {
            // The pooled kernel's network was made with no list: the caller's now.
            if let (Some(networks), Some(allow)) = (self.networks(), network)
                && let Err(e) = networks.set(&pooled.id, allow)
            {
                self.pool.unclaim(pooled).await;
                return Err(e);
            }
            let (session, inbox) = self.launcher.new_session(pooled.id.clone(), owner, settings, pooled.created_at);
            if let Err(e) = self.registry.reserve(&session, &self.config.limits) {
                self.pool.unclaim(pooled).await;
                return Err(e);
            }
            // In the registry now: it may leave the pool's members.
            self.pool.release(&pooled.id);
            let ready = self.launcher.spawn(session.clone(), inbox, Start::Ready(Box::new(pooled.host)));
            Launcher::until_ready(&session, ready).await.map_err(|_| SessionError::Closing)??;
            self.pool.hit(&pool);
            metrics::counter!("kernelbox_sessions_created_total", "language" => language, "runtime" => runtime)
                .increment(1);
            tracing::info!(session_id = %session.id, "session started from the pool");
            return Ok(session.info());
        }
        let image_ref = self.launcher.planner.image_ref(&language);
        if self.runtime().image(&image_ref).await?.is_none() {
            let image = self.config.catalog.language(&language).expect("checked by settle").image.clone();
            return Err(SessionError::ImageMissing(image));
        }
        let (session, inbox) =
            self.launcher.new_session(SessionId::new_on(self.config.node), owner, settings, Utc::now());
        if let Err(e) = self.registry.reserve(&session, &self.config.limits) {
            // Its network was attached with the handle: it goes with it.
            if let Some(networks) = self.networks() {
                networks.forget(session.id.as_str(), false);
            }
            return Err(e);
        }
        let ready = self.launcher.spawn(session.clone(), inbox, Start::Fresh);
        match Launcher::until_ready(&session, ready).await {
            Ok(Ok(())) => {
                metrics::counter!("kernelbox_sessions_created_total", "language" => language.clone(), "runtime" => runtime)
                    .increment(1);
                tracing::info!(session_id = %session.id, %language, "session started");
                Ok(session.info())
            }
            Ok(Err(e)) => {
                metrics::counter!("kernelbox_session_start_failures_total", "language" => language).increment(1);
                Err(e)
            }
            Err(_) => Err(SessionError::Closing),
        }
    }

    /// The session's notebook as it is now (written only by the service).
    pub async fn notebook(&self, owner: &Owner, id: &str) -> Result<Vec<u8>, SessionError> {
        let session = self.registry.get(owner, id)?;
        self.launcher.notebooks.read(&session).await
    }

    /// Network by name, when the operator offers it.
    pub fn networks(&self) -> Option<&Arc<Networks>> {
        self.launcher.planner.network.as_ref()
    }

    /// Starts the egress proxy's keeper and the reader of its events (network by name, if offered).
    pub fn start_egress(&self) {
        let Some(networks) = self.networks() else { return };
        let hub = networks.hub.clone();
        let keeper = Keeper {
            runtime: self.runtime().clone(),
            hub: hub.clone(),
            catalog: self.config.catalog.clone(),
            instance: self.config.instance.clone(),
            binary: hub.config.proxy_binary.clone(),
        };
        self.tracker.spawn(keeper.run());
        self.tracker.spawn(hub.report_events());
    }

    /// A session's network now.
    pub fn network(&self, owner: &Owner, id: &str) -> Result<NetworkView, SessionError> {
        let session = self.registry.get(owner, id)?;
        let networks = self.networks().ok_or(crate::egress::allow::ListRefused::Off)?;
        networks.get(&session.id)
    }

    /// Replaces a running session's allow-list: the next connection follows it, open connections it
    /// drops are closed.
    pub fn set_network(&self, owner: &Owner, id: &str, request: &NetworkRequest) -> Result<NetworkView, SessionError> {
        let session = self.registry.get(owner, id)?;
        let networks = self.networks().ok_or(crate::egress::allow::ListRefused::Off)?;
        let allow = networks.check(request)?;
        networks.set(&session.id, allow)
    }

    /// Starts the warm pool's refill loop (after adoption, so that start-up does not race it).
    pub fn start_pool(&self) {
        self.pool.start();
    }

    /// The runtime trees' upkeep (`images/runtime_tree.rs`): a rebuilt image gets a new tree, and trees
    /// that no image and no container names are removed.
    pub async fn tend_runtime_trees(&self) {
        let images: Vec<String> =
            self.config.catalog.language_images().iter().map(|i| self.config.catalog.image_ref(i)).collect();
        self.launcher.planner.trees.tend(&images).await;
    }

    /// The runtime tree of `language`'s image, made now if need be (tests and the benchmark wait for it).
    pub async fn runtime_tree(&self, language: &str) -> Result<TreeMounts, TreeError> {
        let image = self.launcher.planner.image_ref(language);
        self.launcher.planner.trees.ensure(&image).await
    }

    /// The pool's numbers for `language`.
    pub fn pool_status(&self, language: &str) -> PoolStatus {
        self.pool.status(language)
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

    /// What every live session reserves together (closing ones included: their containers still run),
    /// and how many each owner holds: what a cluster's agent reports of its node.
    pub fn reserved(&self) -> (crate::node::Usage, BTreeMap<String, u32>) {
        let mut usage = crate::node::Usage::default();
        let mut owners = BTreeMap::new();
        for s in self.registry.all() {
            usage.sessions += 1;
            usage.memory_mb += s.settings.memory_mb;
            usage.cpus += s.settings.cpus;
            *owners.entry(s.owner.0.clone()).or_insert(0) += 1;
        }
        (usage, owners)
    }

    /// The owners with a session here now (the candidates of a cluster agent's signed links).
    pub fn owners(&self) -> Vec<Owner> {
        let mut owners: Vec<Owner> = self.registry.all().iter().map(|s| s.owner.clone()).collect();
        owners.sort_by(|a, b| a.0.cmp(&b.0));
        owners.dedup();
        owners
    }

    /// Counts of sessions by language and status (`closing` for those on their way out), for metrics.
    /// Live sessions per OCI runtime.
    pub fn runtime_census(&self) -> BTreeMap<String, u64> {
        let mut counts = BTreeMap::new();
        for s in self.registry.all() {
            *counts.entry(s.settings.runtime.clone()).or_insert(0) += 1;
        }
        counts
    }

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
        let timeout = submission
            .timeout_s
            .map(|t| policy::check_timeout("timeout_s", t, self.config.limits.max_timeout))
            .transpose()?;
        crate::kernel::stdin::check_answers(&submission.stdin).map_err(|e| SessionError::Invalid(e.to_string()))?;
        let (session, in_use) = self.registry.get_in_use(owner, id)?;
        session.submit(in_use, submission, timeout, self.config.limits.queue_depth)
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

    /// File transfers (list, download, upload, delete, collect, images saved as files).
    pub fn files(&self) -> &Transfers {
        &self.transfers
    }

    /// Writes a file a client sent into the session's working directory (at most the operator's upload
    /// limit). The bytes count against the owner's upload budget: `size` (the announced size, else the
    /// upload limit) is reserved first, and what the body did not carry is given back.
    pub async fn upload<S, E>(
        &self,
        owner: &Owner,
        id: &str,
        path: &str,
        size: Option<u64>,
        body: S,
    ) -> Result<Written, SessionError>
    where
        S: futures::Stream<Item = Result<bytes::Bytes, E>> + Send,
        E: std::fmt::Display,
    {
        let charge = self.costs.reserve_upload(owner, size.unwrap_or(self.config.limits.max_upload_bytes))?;
        self.transfers.upload(owner, id, path, charge.count(body)).await
    }

    /// Counts `bytes` a client uploaded elsewhere (the `/jupyter` file store) against the owner's upload
    /// budget.
    pub fn charge_upload(&self, owner: &Owner, bytes: u64) -> Result<(), SessionError> {
        Ok(self.costs.charge(owner, Limit::UploadBytes, bytes)?)
    }

    /// Installs packages into a session (see `installs.rs`). Every spec is checked before anything runs;
    /// a failed install is a report with `ok: false`. The compatibility APIs call this too.
    pub async fn install_packages(
        &self,
        owner: &Owner,
        id: &str,
        requested: &[String],
    ) -> Result<InstallReport, SessionError> {
        let session = self.registry.get(owner, id)?;
        let specs = self.installs.check(&session, requested)?;
        let transfer = self.transfers.begin(owner, id)?;
        self.costs.spend(owner, Limit::Installs)?;
        self.installs.install(&session, &transfer.container, &specs).await
    }

    /// Attaches a Jupyter client to the session's kernel (the gateway's WebSocket); see `peers.rs`.
    pub async fn attach(&self, owner: &Owner, id: &str, session_key: Option<String>) -> Result<PeerLink, SessionError> {
        self.registry.get(owner, id)?.attach(session_key).await
    }

    pub fn interrupt(&self, owner: &Owner, id: &str) -> Result<(), SessionError> {
        self.registry.get(owner, id)?.request_interrupt()
    }

    /// A fresh kernel (state gone, files kept); a dead session gets a new container, with its installed
    /// packages put back by its task. A caller that leaves before the restart begins cancels it.
    pub async fn restart(&self, owner: &Owner, id: &str) -> Result<SessionInfo, SessionError> {
        let (session, _in_use) = self.registry.get_in_use(owner, id)?;
        let done = session.request_restart()?;
        done.await.map_err(|_| SessionError::Closing)??;
        Ok(session.info())
    }

    /// Ends a session in any state and waits (bounded) until its container is gone. A session lost to
    /// fencing is gone already: deleting it succeeds.
    pub async fn delete(&self, owner: &Owner, id: &str) -> Result<(), SessionError> {
        let session = match self.registry.get(owner, id) {
            Err(SessionError::Lost(_)) => return Ok(()),
            found => found?,
        };
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
        let orphans = recovery::sweep_orphans(&self.recovery()).await;
        ReapReport { removed: picked.into_iter().map(|(s, why)| (s.id.clone(), why)).collect(), orphans }
    }

    /// Finds what an earlier run of this instance left: adopts the sessions whose kernel answers and
    /// removes the rest. Returns (adopted, removed).
    pub async fn recover(&self) -> Result<(usize, usize), SessionError> {
        recovery::recover(&self.recovery()).await
    }

    fn recovery(&self) -> Recovery<'_> {
        Recovery {
            instance: &self.config.instance,
            launcher: &self.launcher,
            pool: &self.pool,
            installs: &self.installs,
            bury_dead: self.stale_at_start,
        }
    }

    /// A request from the API tier reached this agent at `now` (every request on its cluster listener).
    /// When it ends a gap longer than `lost_after`, the API tier has declared this node lost: every
    /// session held through the gap is removed, its id tombstoned, before the request is served.
    pub fn contact(&self, now: DateTime<Utc>) {
        let Some(contact) = &self.contact else { return };
        let mut clock = contact.lock().unwrap();
        if clock.touch(now) {
            // Under the clock's lock: a request right behind this one finds every id tombstoned already.
            self.fence(now);
        }
    }

    /// At start, after adoption: when the persisted contact stamp was older than `lost_after`, removes the
    /// adopted sessions (held through the gap) and waits (bounded) for their containers to go.
    pub async fn fence_stale(&self) -> usize {
        if !self.stale_at_start {
            return 0;
        }
        let sessions = self.fence(Utc::now());
        futures::future::join_all(sessions.iter().map(|s| s.wait_finished(DELETE_WAIT))).await;
        sessions.len()
    }

    /// Closes every session as lost and persists the tombstones.
    fn fence(&self, now: DateTime<Utc>) -> Vec<Arc<Session>> {
        let (sessions, tombstones) = self.registry.fence_all("session_lost", now);
        tracing::warn!(
            sessions = sessions.len(),
            "fencing: out of contact with the API tier for longer than lost_after; removing every session it held"
        );
        metrics::counter!("kernelbox_sessions_fenced_total").increment(sessions.len() as u64);
        if let Err(e) = tombstones.save(&self.config.state_dir) {
            tracing::error!(error = %e, "could not write the tombstones; fenced ids answer session_lost until the service restarts");
        }
        sessions
    }

    /// Writes the contact stamp if it moved (every few seconds, and at shutdown).
    pub fn persist_contact(&self) {
        let Some(contact) = &self.contact else { return };
        let Some(stamp) = contact.lock().unwrap().unsaved() else { return };
        match fence::write_last_contact(&self.config.state_dir, stamp) {
            Ok(()) => contact.lock().unwrap().saved(stamp),
            Err(e) => tracing::warn!(error = %e, "could not write the last-contact stamp"),
        }
    }

    /// Stops all sessions: removes their containers, or keeps them for the next run to adopt. New
    /// sessions are refused from the first moment. Bounded in time.
    pub async fn shutdown(&self) {
        if let Some(networks) = self.networks() {
            // Every connection ends; the keeper removes the proxy (tracked below).
            networks.hub.stop();
        }
        self.pool.shutdown().await;
        self.launcher.planner.trees.shutdown().await;
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
