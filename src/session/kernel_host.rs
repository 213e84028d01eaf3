//! One kernel in one container: booting it, adopting it, restarting it, noticing its death.
//!
//! This is where the runtime (Docker) and the kernel client (the Jupyter wire) meet; the actor decides
//! when to call what. The start contract (ARCHITECTURE.md): per boot the service creates a run directory
//! ([`RunDir`]) with the connection file, **listens** on the kernel's unix sockets there, and mounts it
//! read-only at `/kernel`; the image's `start-kernel` connects out to those sockets and relays to the
//! kernel. The kernel is ready when all its channels have connected and it answers `kernel_info`.
//!
//! Every call that fails leaves no container behind: `boot`, `adopt` and `restart` remove the container
//! they were working on before they return an error. Docker calls are never dropped half-way (a create
//! cut short could leave a container nobody knows); cancellation is checked between them.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::{Instant, timeout_at};
use tokio_util::sync::CancellationToken;

use crate::egress::gate::Gate;
use crate::egress::hub::EgressHub;
use crate::egress::session::SessionEgress;
use crate::images::runtime_tree::RuntimeTrees;
use crate::kernel::connection::{self, ConnectionInfo};
use crate::kernel::{KernelClient, KernelListener, WireLimits};
use crate::runtime::{ContainerRuntime, ContainerSpec, ExitInfo, RuntimeError, labels};

use super::error::SessionError;
use super::model::KernelInfo;
use super::rundir::{self, RunDir};

/// A running kernel container and our connection to it.
pub struct KernelHost {
    pub container_id: String,
    pub client: KernelClient,
    /// The sockets the kernel's relays connect to; kept across kernel restarts in the same container.
    listener: KernelListener,
    /// Kept alive as long as the container: removed when the host is dropped.
    dir: RunDir,
    /// What the kernel said of itself in its `kernel_info_reply`.
    pub info: KernelInfo,
    /// Becomes `Some` when the container stops.
    pub exit: watch::Receiver<Option<ExitInfo>>,
    /// The session's way out (`egress/gate.rs`), listening in the run directory while the host lives.
    _gate: Option<Gate>,
}

impl KernelHost {
    /// Leaves the run directory on disk (the container stays for the next run of the service).
    pub fn keep(mut self) {
        self.dir.keep();
    }

    pub fn is_alive(&self) -> bool {
        self.exit.borrow().is_none()
    }
}

/// What a boot needs; shared by all boots of one session.
#[derive(Clone)]
pub struct BootPlan {
    pub runtime: Arc<dyn ContainerRuntime>,
    /// The container to create; [`BootPlan::boot`] adds the name, the boot label and the mount.
    pub spec: ContainerSpec,
    /// Where run directories live (`<state>/sessions`).
    pub runs_dir: std::path::PathBuf,
    pub session_id: String,
    pub start_timeout: Duration,
    pub wire: WireLimits,
    pub tracker: tokio_util::task::TaskTracker,
    /// The image's runtime tree, mounted over its files when it is ready.
    pub trees: Arc<RuntimeTrees>,
    /// The session's network and the hub, when the server offers networks: each boot opens its gate.
    pub egress: Option<(Arc<SessionEgress>, Arc<EgressHub>)>,
}

impl BootPlan {
    /// Starts a fresh container and connects to its kernel.
    pub async fn boot(&self, cancel: &CancellationToken) -> Result<KernelHost, SessionError> {
        if cancel.is_cancelled() {
            return Err(SessionError::Closing);
        }
        let boot = uuid::Uuid::new_v4().simple().to_string()[..8].to_owned();
        let info = ConnectionInfo::new_ipc();
        let dir = RunDir::create(&self.runs_dir, &rundir::dir_name(&self.session_id, &boot), &info)?;
        let listener = KernelListener::bind(dir.path(), &info)?;
        let gate = self.gate(&dir)?;
        let mut spec = self.spec.clone();
        // A fresh name per boot: the container of a dead kernel may still be on its way out.
        spec.name = format!("kernelbox-{}-{boot}", self.session_id);
        spec.labels.insert(labels::BOOT.to_owned(), boot);
        spec.binds.insert(0, format!("{}:{}:ro", dir.path().display(), connection::CONTAINER_DIR));
        // Not raced against `cancel`: it runs to its end, and what it made is removed below if need be.
        let began = Instant::now();
        let container_id = self.create(spec).await?;
        let started = Instant::now();
        metrics::counter!("kernelbox_container_starts_total").increment(1);
        let exit = self.watch_exit(&container_id);
        let deadline = Instant::now() + self.start_timeout;
        match connect(&listener, &info, &self.wire, deadline, exit.clone(), cancel, Readiness::Fresh).await {
            Ok(Connected { client, info: kinfo, at: connected, .. }) => {
                // Where a cold start goes: the container, the kernel's boot until its four connections
                // are in, and its first answers (kernel_info and IOPub).
                let phases = [
                    ("container", began, started),
                    ("connect", started, connected),
                    ("ready", connected, Instant::now()),
                ];
                for (phase, from, to) in phases {
                    metrics::histogram!("kernelbox_boot_phase_seconds", "phase" => phase)
                        .record((to - from).as_secs_f64());
                }
                tracing::debug!(
                    session_id = %self.session_id,
                    container_ms = (started - began).as_millis() as u64,
                    connect_ms = (connected - started).as_millis() as u64,
                    ready_ms = connected.elapsed().as_millis() as u64,
                    "kernel booted"
                );
                Ok(KernelHost { container_id, client, listener, dir, info: kinfo, exit, _gate: gate })
            }
            Err(e) => {
                if !matches!(e, SessionError::Closing) {
                    metrics::counter!("kernelbox_container_start_failures_total").increment(1);
                }
                self.remove(&container_id).await;
                Err(e)
            }
        }
    }

    /// Creates and starts the container, over the image's runtime tree when it is ready. A create that
    /// fails with the tree (the image rebuilt and the old one removed, the tree gone) is made once more
    /// from the image's own files: a tree never makes a boot fail.
    async fn create(&self, spec: ContainerSpec) -> Result<String, RuntimeError> {
        let language = spec.labels.get(labels::LANGUAGE).cloned().unwrap_or_default();
        let boots = |files: &'static str| {
            metrics::counter!("kernelbox_runtime_tree_boots_total", "language" => language.clone(), "files" => files)
                .increment(1)
        };
        let inside = spec.tmpfs.keys().map(String::as_str).chain(spec.binds.iter().filter_map(|b| b.split(':').nth(1)));
        if let Some(tree) = self.trees.for_boot(&spec.image, inside) {
            let mut shared = spec.clone();
            shared.image = tree.image_id;
            shared.binds.extend(tree.binds);
            shared.labels.insert(labels::RUNTIME_TREE.to_owned(), tree.hash);
            match self.runtime.create_and_start(&shared).await {
                Ok(id) => {
                    boots("tree");
                    return Ok(id);
                }
                Err(e) => {
                    tracing::warn!(session_id = %self.session_id, error = %e, "a boot over the runtime tree failed; booting from the image's files");
                    self.trees.forget(&spec.image);
                }
            }
        }
        let id = self.runtime.create_and_start(&spec).await?;
        boots("image");
        Ok(id)
    }

    /// Reconnects to a container an earlier run of the service left running. Its run directory was
    /// written by that service, never by the sandbox; the service binds its sockets anew and the
    /// container's relays connect to them again. A kernel busy with a cell is alive too (it answers on
    /// its control channel): the second value is then the `msg_id` whose reply marks the cell's end.
    pub async fn adopt(
        &self,
        container_id: String,
        boot: &str,
        cancel: &CancellationToken,
    ) -> Result<(KernelHost, Option<String>), SessionError> {
        let attempt = async {
            let (dir, info) = RunDir::open(&self.runs_dir, &rundir::dir_name(&self.session_id, boot))?;
            let listener = KernelListener::bind(dir.path(), &info)?;
            let gate = self.gate(&dir)?;
            let exit = self.watch_exit(&container_id);
            // start-kernel retries its connections every few hundred milliseconds.
            let deadline = Instant::now() + Duration::from_secs(15).min(self.start_timeout);
            let connected =
                connect(&listener, &info, &self.wire, deadline, exit.clone(), cancel, Readiness::Adopted).await?;
            let Connected { client, info: kinfo, busy_until, .. } = connected;
            let host = KernelHost {
                container_id: container_id.clone(),
                client,
                listener,
                dir,
                info: kinfo,
                exit,
                _gate: gate,
            };
            Ok::<_, SessionError>((host, busy_until))
        };
        match attempt.await {
            Ok(host) => Ok(host),
            Err(e) => {
                self.remove(&container_id).await;
                Err(e)
            }
        }
    }

    /// Restarts the kernel process inside the same container (its files stay), or boots a new container
    /// when the old one is gone. On failure or cancellation the container is removed.
    pub async fn restart(&self, host: KernelHost, cancel: &CancellationToken) -> Result<KernelHost, SessionError> {
        if !host.is_alive() {
            self.remove(&host.container_id).await;
            drop(host);
            return self.boot(cancel).await;
        }
        let KernelHost { container_id, mut client, listener, dir, exit, _gate: gate, .. } = host;
        let deadline = Instant::now() + self.start_timeout;
        let attempt = async {
            self.runtime.signal(&container_id, "SIGHUP").await?;
            // The old kernel's connections end first, so the new ones cannot be the old kernel's.
            tokio::select! {
                _ = client.closed(deadline) => {}
                _ = cancel.cancelled() => return Err(SessionError::Closing),
            }
            let info = connection::read_connection_file(dir.path())?;
            connect(&listener, &info, &self.wire, deadline, exit.clone(), cancel, Readiness::Fresh).await
        };
        match attempt.await {
            Ok(Connected { client, info, .. }) => {
                Ok(KernelHost { container_id, client, listener, dir, info, exit, _gate: gate })
            }
            Err(e) => {
                self.remove(&container_id).await;
                Err(e)
            }
        }
    }

    /// Opens the session's gate in a boot's run directory, when the server offers networks.
    fn gate(&self, dir: &RunDir) -> Result<Option<Gate>, SessionError> {
        match &self.egress {
            Some((session, hub)) => Ok(Some(Gate::open(dir.path(), session.clone(), hub.clone())?)),
            None => Ok(None),
        }
    }

    /// Removes a container; an engine that does not answer is logged (the orphan sweep retries).
    pub async fn remove(&self, container_id: &str) {
        if let Err(e) = self.runtime.remove(container_id).await {
            tracing::error!(session_id = %self.session_id, container = %container_id, error = %e, "could not remove the session container");
        }
    }

    /// A task that waits for the container to stop; tracked so shutdown can wait for it.
    fn watch_exit(&self, container_id: &str) -> watch::Receiver<Option<ExitInfo>> {
        let (tx, rx) = watch::channel(None);
        let runtime = self.runtime.clone();
        let id = container_id.to_owned();
        self.tracker.spawn(async move {
            loop {
                tokio::select! {
                    _ = tx.closed() => return,
                    result = runtime.wait_exit(&id) => match result {
                        Ok(info) => { let _ = tx.send(Some(info)); return; }
                        Err(RuntimeError::NotFound(_)) => {
                            let _ = tx.send(Some(ExitInfo { exit_code: -1, oom_killed: false }));
                            return;
                        }
                        // The engine is unreachable for a moment: ask again.
                        Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                    }
                }
            }
        });
        rx
    }
}

/// Why a container stopped, in the words the API uses.
pub fn death_reason(exit: &ExitInfo) -> String {
    if exit.oom_killed { "out_of_memory".into() } else { format!("exited with code {}", exit.exit_code) }
}

/// What a kernel must show before it is served.
#[derive(Debug, Clone, Copy)]
enum Readiness {
    /// A new kernel: it answers on shell (and IOPub is live).
    Fresh,
    /// A kernel an earlier run left: it answers on control, busy or not (see `KernelClient::wait_adopted`).
    Adopted,
}

/// A kernel connected and answering.
struct Connected {
    client: KernelClient,
    info: KernelInfo,
    /// An adopted kernel busy with a cell: the `msg_id` whose reply marks the cell's end.
    busy_until: Option<String>,
    /// When its four connections were in.
    at: Instant,
}

/// Accepts the kernel's four connections and waits until it answers, whichever comes first of that, the
/// deadline, the container's death and `cancel`.
async fn connect(
    listener: &KernelListener,
    info: &ConnectionInfo,
    wire: &WireLimits,
    deadline: Instant,
    mut exit: watch::Receiver<Option<ExitInfo>>,
    cancel: &CancellationToken,
    readiness: Readiness,
) -> Result<Connected, SessionError> {
    let exit_now = exit.clone();
    let attempt = async {
        let mut client = timeout_at(deadline, listener.accept(&info.key, *wire))
            .await
            .map_err(|_| SessionError::KernelStart("the kernel did not connect in time".into()))??;
        let at = Instant::now();
        let (reply, busy_until) = match readiness {
            Readiness::Fresh => (client.wait_ready(deadline).await?, None),
            Readiness::Adopted => {
                let adopted = client.wait_adopted(deadline).await?;
                (adopted.info, adopted.busy_until)
            }
        };
        Ok::<_, SessionError>(Connected { client, info: KernelInfo::from_reply(&reply), busy_until, at })
    };
    tokio::select! {
        result = attempt => result.map_err(|e| match e {
            SessionError::Kernel(k) => SessionError::KernelStart(k.to_string()),
            other => other,
        }),
        _ = exit.wait_for(Option::is_some) => {
            let reason = exit_now.borrow().as_ref().map(death_reason).unwrap_or_default();
            Err(SessionError::KernelStart(format!("the container stopped while the kernel was starting: {reason}")))
        }
        _ = cancel.cancelled() => Err(SessionError::Closing),
    }
}
