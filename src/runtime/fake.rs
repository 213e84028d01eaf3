//! An in-memory [`ContainerRuntime`] for unit tests of session and reaper logic. It starts nothing: a
//! "container" is a map entry, and `kill` makes it exit. Never used instead of the end-to-end tests.

use std::collections::HashMap;
use std::sync::Mutex;

use async_trait::async_trait;
use futures::stream::BoxStream;
use tokio::sync::watch;

use super::{
    BuildRequest, ContainerRuntime, ContainerSpec, ContainerSummary, ExitInfo, ImageInfo, Progress,
    RuntimeError,
};

#[derive(Default)]
pub struct FakeRuntime {
    state: Mutex<State>,
}

#[derive(Default)]
struct State {
    next_id: u64,
    containers: HashMap<String, FakeContainer>,
    images: HashMap<String, ImageInfo>,
    /// When set, `ping` and every call fail as if the engine were down.
    down: bool,
}

struct FakeContainer {
    spec: ContainerSpec,
    exit: watch::Sender<Option<ExitInfo>>,
    signals: Vec<String>,
}

impl FakeRuntime {
    pub fn new() -> Self {
        Self::default()
    }

    /// Makes a container stop as if its kernel died.
    pub fn kill(&self, id: &str, oom_killed: bool) {
        let state = self.state.lock().unwrap();
        if let Some(c) = state.containers.get(id) {
            let _ = c.exit.send(Some(ExitInfo {
                exit_code: 137,
                oom_killed,
            }));
        }
    }

    pub fn set_down(&self, down: bool) {
        self.state.lock().unwrap().down = down;
    }

    pub fn add_image(&self, reference: &str, labels: HashMap<String, String>) {
        let info = ImageInfo {
            id: format!("sha256:{reference}"),
            labels,
            size_bytes: 1,
            created: String::new(),
        };
        self.state
            .lock()
            .unwrap()
            .images
            .insert(reference.to_owned(), info);
    }

    /// Ids of the containers that exist.
    pub fn container_ids(&self) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .containers
            .keys()
            .cloned()
            .collect()
    }

    pub fn spec(&self, id: &str) -> Option<ContainerSpec> {
        self.state
            .lock()
            .unwrap()
            .containers
            .get(id)
            .map(|c| c.spec.clone())
    }

    pub fn signals(&self, id: &str) -> Vec<String> {
        self.state
            .lock()
            .unwrap()
            .containers
            .get(id)
            .map(|c| c.signals.clone())
            .unwrap_or_default()
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

    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        self.check_up()?;
        let mut state = self.state.lock().unwrap();
        state.next_id += 1;
        let id = format!("fake-{}", state.next_id);
        let (exit, _) = watch::channel(None);
        state.containers.insert(
            id.clone(),
            FakeContainer {
                spec: spec.clone(),
                exit,
                signals: Vec::new(),
            },
        );
        Ok(id)
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.check_up()?;
        if let Some(c) = self.state.lock().unwrap().containers.remove(id) {
            let _ = c.exit.send(Some(ExitInfo {
                exit_code: 137,
                oom_killed: false,
            }));
        }
        Ok(())
    }

    async fn signal(&self, id: &str, signal: &str) -> Result<(), RuntimeError> {
        self.check_up()?;
        let mut state = self.state.lock().unwrap();
        let c = state
            .containers
            .get_mut(id)
            .ok_or_else(|| RuntimeError::NotFound(id.into()))?;
        c.signals.push(signal.to_owned());
        Ok(())
    }

    async fn wait_exit(&self, id: &str) -> Result<ExitInfo, RuntimeError> {
        let mut rx = {
            let state = self.state.lock().unwrap();
            let c = state
                .containers
                .get(id)
                .ok_or_else(|| RuntimeError::NotFound(id.into()))?;
            c.exit.subscribe()
        };
        let info = rx
            .wait_for(Option::is_some)
            .await
            .map_err(|_| RuntimeError::NotFound(id.into()))?;
        Ok(info.clone().expect("waited for Some"))
    }

    async fn list(
        &self,
        key: &str,
        value: Option<&str>,
    ) -> Result<Vec<ContainerSummary>, RuntimeError> {
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

    async fn build_image(
        &self,
        request: BuildRequest,
        progress: Progress<'_>,
    ) -> Result<(), RuntimeError> {
        self.check_up()?;
        progress("Step 1/1 : fake build");
        self.add_image(&request.tag, request.labels);
        Ok(())
    }

    async fn pull_image(
        &self,
        reference: &str,
        _progress: Progress<'_>,
    ) -> Result<(), RuntimeError> {
        Err(RuntimeError::NotFound(format!(
            "no registry in the fake runtime: {reference}"
        )))
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
