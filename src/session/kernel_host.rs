//! One kernel in one container: booting it, connecting to it, restarting it, noticing its death.
//!
//! This is where the runtime (Docker) and the kernel client (ZMTP) meet; the actor decides when to
//! call what. The start contract with the images (v2): the service writes `connection.json` into the
//! session directory (mounted at `/kernel`) and binds the kernel sockets there; `start-kernel` connects
//! its relay to them once the kernel is up, restarts the kernel on SIGHUP (dropping the connections first)
//! and passes SIGINT on; when the kernel dies, the container exits.

use std::os::unix::fs::FileTypeExt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;
use tokio::time::Instant;

use crate::kernel::connection::{self, ConnectionInfo};
use crate::kernel::{KernelClient, KernelListener, WireLimits};
use crate::runtime::{ContainerRuntime, ContainerSpec, ExitInfo, RuntimeError};

use super::error::SessionError;
use super::model::KernelInfo;

/// How the kernel in an image wants to be interrupted (image label `kernelbox.image.interrupt_mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptMode {
    /// An `interrupt_request` on the control channel.
    Message,
    /// SIGINT, passed on by Docker's init and `start-kernel`.
    Signal,
}

/// A running kernel container and our connection to it.
pub struct KernelHost {
    pub container_id: String,
    pub client: KernelClient,
    /// The session directory's sockets; a restart accepts the new kernel's connections here.
    pub listener: KernelListener,
    /// What the kernel said of itself in its `kernel_info_reply`.
    pub info: KernelInfo,
    /// Becomes `Some` when the container stops.
    pub exit: watch::Receiver<Option<ExitInfo>>,
}

/// What a boot needs; shared by all boots of one session.
#[derive(Clone)]
pub struct BootPlan {
    pub runtime: Arc<dyn ContainerRuntime>,
    pub spec: ContainerSpec,
    pub dir: PathBuf,
    pub start_timeout: Duration,
    pub interrupt_mode: InterruptMode,
    pub tracker: tokio_util::task::TaskTracker,
    /// How much of a kernel message is kept.
    pub wire_limits: WireLimits,
}

impl BootPlan {
    /// Starts a fresh container and connects to its kernel. On failure nothing is left running.
    pub async fn boot(&self) -> Result<KernelHost, SessionError> {
        let info = ConnectionInfo::new_ipc();
        prepare_dir(&self.dir, &info)?;
        let listener = KernelListener::bind(&self.dir, &info)?;
        // A fresh name per boot: the container of a dead kernel may still be on its way out.
        let mut spec = self.spec.clone();
        spec.name = format!("{}-{}", self.spec.name, &uuid::Uuid::new_v4().simple().to_string()[..6]);
        let container_id = self.runtime.create_and_start(&spec).await?;
        metrics::counter!("kernelbox_container_starts_total").increment(1);
        let exit = self.watch_exit(&container_id);
        match self.connect(&listener, &info, exit.clone()).await {
            Ok((client, info)) => Ok(KernelHost { container_id, client, listener, info, exit }),
            Err(e) => {
                metrics::counter!("kernelbox_container_start_failures_total").increment(1);
                let _ = self.runtime.remove(&container_id).await;
                Err(e)
            }
        }
    }

    /// Reconnects to a container that is already running (adoption after a service restart).
    pub async fn adopt(&self, container_id: String, timeout: Duration) -> Result<KernelHost, SessionError> {
        let info = read_connection(&self.dir)?;
        // The relay in the container retries its connects: it finds the new sockets.
        let listener = KernelListener::bind(&self.dir, &info)?;
        let exit = self.watch_exit(&container_id);
        let deadline = Instant::now() + timeout;
        let (client, info) = connect_client(&listener, &info, self.wire_limits, deadline, exit.clone()).await?;
        Ok(KernelHost { container_id, client, listener, info, exit })
    }

    /// Restarts the kernel process inside the same container (its files stay), or boots a new container
    /// when the old one is gone.
    pub async fn restart(&self, host: Option<KernelHost>) -> Result<KernelHost, SessionError> {
        let Some(host) = host.filter(|h| h.exit.borrow().is_none()) else {
            return self.boot().await;
        };
        let info = read_connection(&self.dir)?;
        let KernelHost { container_id, mut client, listener, exit, .. } = host;
        self.runtime.signal(&container_id, "SIGHUP").await?;
        // The old kernel's connections must end before new ones are accepted, or we would talk to it.
        let closed = client.closed(Instant::now() + self.start_timeout).await;
        drop(client);
        if closed.is_err() {
            let _ = self.runtime.remove(&container_id).await;
            return Err(SessionError::KernelStart("the old kernel did not let go of its connections".into()));
        }
        match self.connect(&listener, &info, exit.clone()).await {
            Ok((client, info)) => Ok(KernelHost { container_id, client, listener, info, exit }),
            Err(e) => {
                let _ = self.runtime.remove(&container_id).await;
                Err(e)
            }
        }
    }

    /// Interrupts the running code the way the kernel wants.
    pub async fn interrupt(&self, host: &mut KernelHost) -> Result<(), SessionError> {
        match self.interrupt_mode {
            InterruptMode::Message => {
                host.client.interrupt().await?;
            }
            InterruptMode::Signal => self.runtime.signal(&host.container_id, "SIGINT").await?,
        }
        Ok(())
    }

    async fn connect(
        &self,
        listener: &KernelListener,
        info: &ConnectionInfo,
        exit: watch::Receiver<Option<ExitInfo>>,
    ) -> Result<(KernelClient, KernelInfo), SessionError> {
        let deadline = Instant::now() + self.start_timeout;
        connect_client(listener, info, self.wire_limits, deadline, exit).await
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

/// The connection file the current container was started with.
fn read_connection(dir: &std::path::Path) -> Result<ConnectionInfo, SessionError> {
    connection::read_connection_file(dir).map_err(|e| SessionError::KernelStart(format!("connection file: {e}")))
}

fn prepare_dir(dir: &std::path::Path, info: &ConnectionInfo) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    // Sockets and files of an earlier boot must not be mistaken for this one's.
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let kind = entry.file_type()?;
        if kind.is_file() || kind.is_socket() || kind.is_symlink() {
            std::fs::remove_file(entry.path())?;
        }
    }
    // Only the service writes here (contract v2): the kernel gets it read-only.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))?;
    connection::write_connection_file(dir, info)
}

async fn connect_client(
    listener: &KernelListener,
    info: &ConnectionInfo,
    limits: WireLimits,
    deadline: Instant,
    mut exit: watch::Receiver<Option<ExitInfo>>,
) -> Result<(KernelClient, KernelInfo), SessionError> {
    let exit_now = exit.clone();
    let attempt = async {
        let accepted = tokio::time::timeout_at(deadline, listener.accept(&info.key, limits)).await;
        let mut client = accepted.map_err(|_| crate::kernel::KernelError::Timeout)??;
        let reply = client.wait_ready(deadline).await?;
        Ok::<_, SessionError>((client, KernelInfo::from_reply(&reply)))
    };
    tokio::select! {
        result = attempt => result.map_err(|e| match e {
            SessionError::Kernel(k) => SessionError::KernelStart(k.to_string()),
            other => other,
        }),
        _ = exit.wait_for(Option::is_some) => {
            let reason = exit_now.borrow().as_ref().map(death_reason).unwrap_or_default();
            Err(SessionError::KernelStart(format!("the container stopped while connecting: {reason}")))
        }
    }
}
