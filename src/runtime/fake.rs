//! An in-memory [`ContainerRuntime`] for unit tests of session and reaper logic. A "container" is a map
//! entry; when its spec mounts a run directory at `/kernel`, a [`FakeKernel`] connects to the service's
//! sockets there (as `start-kernel` does), so the session layer runs for real against a fake peer. `kill`
//! makes a container exit; a boot delay makes kernels slow to come up. Never used instead of the
//! end-to-end tests.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use tokio::sync::watch;

use crate::kernel::fake::FakeKernel;

use super::{
    BuildRequest, ContainerRuntime, ContainerSpec, ContainerSummary, ExecProcess, ExecRequest, ExitInfo, ImageInfo,
    OciRuntimeInfo, Progress, Resources, RuntimeError,
};

#[derive(Default)]
pub struct FakeRuntime {
    state: Arc<Mutex<State>>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    containers: HashMap<String, FakeContainer>,
    images: HashMap<String, ImageInfo>,
    /// When set, `ping` and every call fail as if the engine were down.
    down: bool,
    /// How long a new container's kernel takes before it connects.
    boot_delay: Duration,
    /// The Swarm node ID the engine reports (`None`: not in a Swarm).
    swarm_node_id: Option<String>,
}

struct FakeContainer {
    spec: ContainerSpec,
    /// The session directory mounted at `/kernel`, if any.
    dir: Option<std::path::PathBuf>,
    kernel: Option<FakeKernel>,
    exit: watch::Sender<Option<ExitInfo>>,
    signals: Vec<String>,
}

impl FakeRuntime {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes a container stop as if its kernel died.
    pub fn kill(&self, id: &str, oom_killed: bool) {
        let mut state = self.state.lock().unwrap();
        if let Some(c) = state.containers.get_mut(id) {
            c.kernel = None;
            let _ = c.exit.send(Some(ExitInfo { exit_code: 137, oom_killed }));
        }
    }

    /// Makes the engine report `id` as its Swarm node ID (`None`: not in a Swarm).
    pub fn set_swarm_node_id(&self, id: Option<&str>) {
        self.state.lock().unwrap().swarm_node_id = id.map(str::to_owned);
    }

    /// Kernels of containers created from now on connect only after `delay`.
    pub fn set_boot_delay(&self, delay: Duration) {
        self.state.lock().unwrap().boot_delay = delay;
    }

    /// Starts the fake kernel of container `id`, now or (with a boot delay) in the background.
    async fn start_kernel_in(&self, id: String, dir: std::path::PathBuf) -> Result<(), RuntimeError> {
        let delay = self.state.lock().unwrap().boot_delay;
        if delay.is_zero() {
            let kernel = start_kernel(&dir).await?;
            if let Some(c) = self.state.lock().unwrap().containers.get_mut(&id) {
                c.kernel = Some(kernel);
            }
            return Ok(());
        }
        let state = self.state.clone();
        tokio::spawn(async move {
            tokio::time::sleep(delay).await;
            if !state.lock().unwrap().containers.contains_key(&id) {
                return;
            }
            if let Ok(kernel) = start_kernel(&dir).await
                && let Some(c) = state.lock().unwrap().containers.get_mut(&id)
            {
                c.kernel = Some(kernel);
            }
        });
        Ok(())
    }

    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
    }

    pub fn add_image(&self, reference: &str, labels: HashMap<String, String>) {
        let info = ImageInfo { id: format!("sha256:{reference}"), labels, size_bytes: 1, created: String::new() };
        self.state.lock().unwrap().images.insert(reference.to_owned(), info);
    }

    /// Ids of the containers that exist.
    pub fn container_ids(&self) -> Vec<String> {
        self.state.lock().unwrap().containers.keys().cloned().collect()
    }

    /// The spec a container runs with now (limits updated included).
    pub fn spec_of(&self, id: &str) -> Option<ContainerSpec> {
        self.state.lock().unwrap().containers.get(id).map(|c| c.spec.clone())
    }

    pub fn signals(&self, id: &str) -> Vec<String> {
        self.state.lock().unwrap().containers.get(id).map(|c| c.signals.clone()).unwrap_or_default()
    }

    fn check_up(&self) -> Result<(), RuntimeError> {
        if self.state.lock().unwrap().down {
            return Err(RuntimeError::Unavailable("fake engine is down".into()));
        }
        Ok(())
    }
}

#[async_trait]
impl ContainerRuntime for FakeRuntime {
    async fn ping(&self) -> Result<(), RuntimeError> {
        self.check_up()
    }

    async fn oci_runtimes(&self) -> Result<Vec<OciRuntimeInfo>, RuntimeError> {
        // An engine with Docker's own runtime only.
        self.check_up()?;
        Ok(vec![OciRuntimeInfo { name: "runc".into(), path: "runc".into(), args: vec![] }])
    }

    async fn swarm_node_id(&self) -> Result<Option<String>, RuntimeError> {
        self.check_up()?;
        Ok(self.state.lock().unwrap().swarm_node_id.clone())
    }

    async fn ensure_network(&self, _name: &str, _labels: HashMap<String, String>) -> Result<(), RuntimeError> {
        self.check_up()
    }

    async fn remove_network(&self, _name: &str) -> Result<(), RuntimeError> {
        self.check_up()
    }

    async fn container_address(&self, id: &str, _network: &str) -> Result<Option<std::net::IpAddr>, RuntimeError> {
        self.check_up()?;
        // The fake's containers join no network.
        match self.state.lock().unwrap().containers.contains_key(id) {
            true => Ok(None),
            false => Err(RuntimeError::NotFound(id.to_owned())),
        }
    }

    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        self.check_up()?;
        let dir = kernel_dir(spec);
        let id = {
            let mut state = self.state.lock().unwrap();
            state.next_id += 1;
            let id = format!("fake-{}", state.next_id);
            let (exit, _) = watch::channel(None);
            let container =
                FakeContainer { spec: spec.clone(), dir: dir.clone(), kernel: None, exit, signals: Vec::new() };
            state.containers.insert(id.clone(), container);
            id
        };
        if let Some(dir) = dir {
            self.start_kernel_in(id.clone(), dir).await?;
        }
        Ok(id)
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.check_up()?;
        let removed = self.state.lock().unwrap().containers.remove(id);
        if let Some(c) = removed {
            let _ = c.exit.send(Some(ExitInfo { exit_code: 137, oom_killed: false }));
        }
        Ok(())
    }

    async fn signal(&self, id: &str, signal: &str) -> Result<(), RuntimeError> {
        self.check_up()?;
        let (old_kernel, restart_dir) = {
            let mut state = self.state.lock().unwrap();
            let c = state.containers.get_mut(id).ok_or_else(|| RuntimeError::NotFound(id.into()))?;
            c.signals.push(signal.to_owned());
            match signal {
                "SIGINT" => {
                    if let Some(k) = &c.kernel {
                        k.interrupt();
                    }
                    (None, None)
                }
                "SIGHUP" => (c.kernel.take(), c.dir.clone()),
                "SIGKILL" => {
                    c.kernel = None;
                    let _ = c.exit.send(Some(ExitInfo { exit_code: 137, oom_killed: false }));
                    (None, None)
                }
                _ => (None, None),
            }
        };
        if let Some(old) = old_kernel {
            old.stop().await;
        }
        // SIGHUP restarts the kernel, as `start-kernel` does (after the boot delay, if any).
        if let Some(dir) = restart_dir {
            self.start_kernel_in(id.to_owned(), dir).await?;
        }
        Ok(())
    }

    async fn wait_exit(&self, id: &str) -> Result<ExitInfo, RuntimeError> {
        let mut rx = {
            let state = self.state.lock().unwrap();
            let c = state.containers.get(id).ok_or_else(|| RuntimeError::NotFound(id.into()))?;
            c.exit.subscribe()
        };
        let info = rx.wait_for(Option::is_some).await.map_err(|_| RuntimeError::NotFound(id.into()))?;
        Ok(info.clone().expect("waited for Some"))
    }

    async fn list(&self, key: &str, value: Option<&str>) -> Result<Vec<ContainerSummary>, RuntimeError> {
        self.check_up()?;
        let state = self.state.lock().unwrap();
        Ok(state
            .containers
            .iter()
            .filter(|(_, c)| match (c.spec.labels.get(key), value) {
                (Some(v), Some(want)) => v == want,
                (Some(_), None) => true,
                _ => false,
            })
            .map(|(id, c)| ContainerSummary {
                id: id.clone(),
                labels: c.spec.labels.clone(),
                running: c.exit.borrow().is_none(),
            })
            .collect())
    }

    async fn image(&self, reference: &str) -> Result<Option<ImageInfo>, RuntimeError> {
        self.check_up()?;
        Ok(self.state.lock().unwrap().images.get(reference).cloned())
    }

    async fn build_image(&self, request: BuildRequest, progress: Progress<'_>) -> Result<(), RuntimeError> {
        self.check_up()?;
        progress("Step 1/1 : fake build");
        self.add_image(&request.tag, request.labels);
        Ok(())
    }

    async fn update_limits(&self, id: &str, limits: Resources) -> Result<(), RuntimeError> {
        let mut state = self.state.lock().unwrap();
        let c = state.containers.get_mut(id).ok_or_else(|| RuntimeError::NotFound(id.to_owned()))?;
        c.spec.memory_bytes = limits.memory_bytes;
        c.spec.nano_cpus = limits.nano_cpus;
        c.spec.pids_limit = limits.pids_limit;
        Ok(())
    }

    async fn exec(&self, id: &str, _request: &ExecRequest) -> Result<ExecProcess, RuntimeError> {
        // File transfer runs a tool inside the real image: the end-to-end tests cover it.
        Err(RuntimeError::Api { status: 501, message: format!("the fake runtime cannot exec in {id}") })
    }

    async fn exec_exit_code(&self, exec_id: &str) -> Result<Option<i64>, RuntimeError> {
        Err(RuntimeError::NotFound(exec_id.to_owned()))
    }

    async fn copy_from_image(
        &self,
        image: &str,
        _path: &str,
        _labels: HashMap<String, String>,
        _out: tokio::sync::mpsc::Sender<bytes::Bytes>,
    ) -> Result<(), RuntimeError> {
        Err(RuntimeError::NotFound(format!("the fake runtime holds no image files: {image}")))
    }

    async fn pull_image(&self, reference: &str, _progress: Progress<'_>) -> Result<(), RuntimeError> {
        Err(RuntimeError::NotFound(format!("no registry in the fake runtime: {reference}")))
    }

    async fn import_image(
        &self,
        _rootfs_tar: BoxStream<'static, std::io::Result<bytes::Bytes>>,
        reference: &str,
    ) -> Result<(), RuntimeError> {
        self.add_image(reference, HashMap::new());
        Ok(())
    }
}

async fn start_kernel(dir: &std::path::Path) -> Result<FakeKernel, RuntimeError> {
    FakeKernel::start(dir).await.map_err(|e| RuntimeError::Api { status: 500, message: e.to_string() })
}

fn kernel_dir(spec: &ContainerSpec) -> Option<std::path::PathBuf> {
    spec.binds.iter().find_map(|b| {
        let mut parts = b.split(':');
        let host = parts.next()?;
        (parts.next()? == crate::kernel::connection::CONTAINER_DIR).then(|| host.into())
    })
}
