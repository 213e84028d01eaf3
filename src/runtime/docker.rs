//! The Docker implementation of [`ContainerRuntime`], through bollard.
//!
//! Architecture invariant: this is the only file that speaks bollard. It applies the hardening every
//! session container gets, whatever the caller asks for.

use std::collections::HashMap;

use async_trait::async_trait;
use bollard::Docker;
use bollard::errors::Error as BollardError;
use bollard::models::{ContainerCreateBody, HostConfig, HostConfigLogConfig, LocalNodeState, NetworkCreateRequest};
use bollard::query_parameters::{
    BuildImageOptionsBuilder, CreateContainerOptions, CreateContainerOptionsBuilder, CreateImageOptionsBuilder,
    DownloadFromContainerOptionsBuilder, InspectNetworkOptions, KillContainerOptionsBuilder,
    ListContainersOptionsBuilder, RemoveContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures::StreamExt;
use futures::stream::BoxStream;

use super::{
    BuildRequest, ContainerRuntime, ContainerSpec, ContainerSummary, ExecOutput, ExecProcess, ExecRequest, ExitInfo,
    ImageInfo, OciRuntimeInfo, Progress, Resources, RuntimeError,
};

/// A Docker engine reached through its API socket.
#[derive(Clone)]
pub struct DockerRuntime {
    docker: Docker,
}

impl DockerRuntime {
    /// Connects as the docker CLI would (`DOCKER_HOST`, else the local socket). Does not contact the
    /// engine yet: see [`ContainerRuntime::ping`].
    pub fn connect() -> Result<Self, RuntimeError> {
        let docker = Docker::connect_with_defaults().map_err(|e| RuntimeError::Unavailable(e.to_string()))?;
        Ok(DockerRuntime { docker })
    }
}

/// The host configuration of every session container: the sandbox.
fn host_config(spec: &ContainerSpec) -> HostConfig {
    HostConfig {
        memory: Some(spec.memory_bytes),
        // Equal to `memory`: no swap beyond the memory limit.
        memory_swap: Some(spec.memory_bytes),
        nano_cpus: Some(spec.nano_cpus),
        pids_limit: Some(spec.pids_limit),
        runtime: (!spec.oci_runtime.is_empty()).then(|| spec.oci_runtime.clone()),
        // No network, except the egress a package fetcher asks for by name.
        network_mode: Some(spec.egress_network.clone().unwrap_or_else(|| "none".into())),
        cap_drop: Some(vec!["ALL".into()]),
        security_opt: Some(vec!["no-new-privileges:true".into()]),
        readonly_rootfs: Some(true),
        init: Some(true),
        ipc_mode: Some("private".into()),
        tmpfs: Some(spec.tmpfs.clone()),
        // Read-only whatever the caller wrote: a session never gets a writable host path.
        binds: Some(spec.binds.iter().map(|b| read_only(b)).collect()),
        // A kernel that floods its own stderr must not fill the host's disk.
        log_config: Some(HostConfigLogConfig {
            typ: Some("json-file".into()),
            config: Some(HashMap::from([("max-size".into(), "1m".into()), ("max-file".into(), "1".into())])),
        }),
        ..Default::default()
    }
}

/// `host:container[:mode]` → `host:container:ro`.
fn read_only(bind: &str) -> String {
    let mut parts: Vec<&str> = bind.splitn(3, ':').collect();
    parts.truncate(2);
    format!("{}:ro", parts.join(":"))
}

fn map_err(e: BollardError) -> RuntimeError {
    match e {
        BollardError::DockerResponseServerError { status_code: 404, message } => RuntimeError::NotFound(message),
        BollardError::DockerResponseServerError { status_code, message } => {
            RuntimeError::Api { status: status_code, message }
        }
        BollardError::DockerStreamError { error } => RuntimeError::Build(error),
        other => RuntimeError::Unavailable(other.to_string()),
    }
}

impl DockerRuntime {
    /// How a stopped container ended, as the engine says now.
    async fn exit_info(&self, id: &str) -> Result<ExitInfo, RuntimeError> {
        let inspect = self.docker.inspect_container(id, None).await.map_err(map_err)?;
        let state = inspect.state.unwrap_or_default();
        Ok(ExitInfo { exit_code: state.exit_code.unwrap_or(-1), oom_killed: state.oom_killed.unwrap_or(false) })
    }
}

#[async_trait]
impl ContainerRuntime for DockerRuntime {
    async fn ping(&self) -> Result<(), RuntimeError> {
        self.docker.ping().await.map(|_| ()).map_err(|e| RuntimeError::Unavailable(e.to_string()))
    }

    async fn oci_runtimes(&self) -> Result<Vec<OciRuntimeInfo>, RuntimeError> {
        let info = self.docker.info().await.map_err(map_err)?;
        let mut runtimes: Vec<OciRuntimeInfo> = info
            .runtimes
            .unwrap_or_default()
            .into_iter()
            .map(|(name, r)| OciRuntimeInfo {
                name,
                path: r.path.unwrap_or_default(),
                args: r.runtime_args.unwrap_or_default(),
            })
            .collect();
        runtimes.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(runtimes)
    }

    async fn swarm_node_id(&self) -> Result<Option<String>, RuntimeError> {
        let info = self.docker.info().await.map_err(map_err)?;
        let Some(swarm) = info.swarm else { return Ok(None) };
        if swarm.local_node_state != Some(LocalNodeState::ACTIVE) {
            return Ok(None);
        }
        Ok(swarm.node_id.filter(|id| !id.is_empty()))
    }

    async fn create_and_start(&self, spec: &ContainerSpec) -> Result<String, RuntimeError> {
        let body = ContainerCreateBody {
            image: Some(spec.image.clone()),
            cmd: Some(spec.cmd.clone()),
            env: Some(spec.env.clone()),
            labels: Some(spec.labels.clone()),
            user: Some(spec.user.clone()),
            working_dir: Some(spec.working_dir.clone()),
            network_disabled: Some(spec.egress_network.is_none()),
            host_config: Some(host_config(spec)),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default().name(&spec.name).build();
        let created = self.docker.create_container(Some(options), body).await.map_err(map_err)?;
        if let Err(e) = self.docker.start_container(&created.id, None).await {
            let _ = self.remove(&created.id).await;
            return Err(map_err(e));
        }
        Ok(created.id)
    }

    async fn ensure_network(&self, name: &str, labels: HashMap<String, String>) -> Result<(), RuntimeError> {
        if self.docker.inspect_network(name, None::<InspectNetworkOptions>).await.is_ok() {
            return Ok(());
        }
        let request = NetworkCreateRequest {
            name: name.to_owned(),
            driver: Some("bridge".into()),
            options: Some(HashMap::from([("com.docker.network.bridge.enable_icc".into(), "false".into())])),
            labels: Some(labels),
            ..Default::default()
        };
        match self.docker.create_network(request).await {
            Ok(_) => Ok(()),
            // Made meanwhile by another call: what we wanted.
            Err(BollardError::DockerResponseServerError { status_code: 409, .. }) => Ok(()),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn remove_network(&self, name: &str) -> Result<(), RuntimeError> {
        match self.docker.remove_network(name).await {
            Ok(()) | Err(BollardError::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn container_address(&self, id: &str, network: &str) -> Result<Option<std::net::IpAddr>, RuntimeError> {
        let inspect = self.docker.inspect_container(id, None).await.map_err(map_err)?;
        let address = (inspect.network_settings.and_then(|n| n.networks))
            .and_then(|mut networks| networks.remove(network))
            .and_then(|endpoint| endpoint.ip_address)
            .and_then(|ip| ip.parse().ok());
        Ok(address)
    }

    async fn copy_from_image(
        &self,
        image: &str,
        path: &str,
        labels: HashMap<String, String>,
        out: tokio::sync::mpsc::Sender<bytes::Bytes>,
    ) -> Result<(), RuntimeError> {
        let body = ContainerCreateBody {
            image: Some(image.to_owned()),
            // Never run: a command that would do nothing, in the sandbox's shape all the same.
            cmd: Some(vec!["/bin/true".into()]),
            labels: Some(labels),
            network_disabled: Some(true),
            host_config: Some(HostConfig {
                network_mode: Some("none".into()),
                cap_drop: Some(vec!["ALL".into()]),
                readonly_rootfs: Some(true),
                ..Default::default()
            }),
            ..Default::default()
        };
        let created = self.docker.create_container(None::<CreateContainerOptions>, body).await.map_err(map_err)?;
        let options = DownloadFromContainerOptionsBuilder::default().path(path).build();
        let mut stream = self.docker.download_from_container(&created.id, Some(options));
        let mut copied = Ok(());
        loop {
            // A reader that left ends the copy at once, even while the engine sends nothing.
            let chunk = tokio::select! {
                chunk = stream.next() => chunk,
                _ = out.closed() => break,
            };
            match chunk {
                None => break,
                Some(Ok(bytes)) => {
                    if out.send(bytes).await.is_err() {
                        break;
                    }
                }
                Some(Err(e)) => {
                    copied = Err(map_err(e));
                    break;
                }
            }
        }
        drop(stream);
        let removed = self.remove(&created.id).await;
        copied.and(removed)
    }

    async fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
        match self.docker.remove_container(id, Some(options)).await {
            Ok(()) => Ok(()),
            Err(BollardError::DockerResponseServerError { status_code: 404, .. }) => Ok(()),
            // 409: removal already in progress, which is what we want.
            Err(BollardError::DockerResponseServerError { status_code: 409, .. }) => Ok(()),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn signal(&self, id: &str, signal: &str) -> Result<(), RuntimeError> {
        let options = KillContainerOptionsBuilder::default().signal(signal).build();
        self.docker.kill_container(id, Some(options)).await.map_err(map_err)
    }

    async fn wait_exit(&self, id: &str) -> Result<ExitInfo, RuntimeError> {
        let options = WaitContainerOptionsBuilder::default().condition("not-running").build();
        let mut wait = self.docker.wait_container(id, Some(options));
        // bollard reports a non-zero exit as an error; either way the container has stopped.
        let waited = wait.next().await;
        if let Some(Err(e @ BollardError::DockerResponseServerError { .. })) = waited {
            return Err(map_err(e));
        }
        let mut exit = self.exit_info(id).await?;
        // A SIGKILL may be the cgroup's OOM killer whose event the engine has not handled yet: it marks the
        // container after the exit at times (seen under gVisor on a loaded host). Look again, briefly.
        for _ in 0..3 {
            if exit.exit_code != 137 || exit.oom_killed {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            exit = self.exit_info(id).await?;
        }
        Ok(exit)
    }

    async fn list(&self, key: &str, value: Option<&str>) -> Result<Vec<ContainerSummary>, RuntimeError> {
        let label = match value {
            Some(v) => format!("{key}={v}"),
            None => key.to_owned(),
        };
        let filters = HashMap::from([("label", vec![label.as_str()])]);
        let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
        let list = self.docker.list_containers(Some(options)).await.map_err(map_err)?;
        Ok(list
            .into_iter()
            .filter_map(|c| {
                Some(ContainerSummary {
                    id: c.id?,
                    labels: c.labels.unwrap_or_default(),
                    running: c.state.map(|s| s.to_string() == "running").unwrap_or(false),
                })
            })
            .collect())
    }

    async fn image(&self, reference: &str) -> Result<Option<ImageInfo>, RuntimeError> {
        match self.docker.inspect_image(reference).await {
            Ok(image) => Ok(Some(ImageInfo {
                id: image.id.unwrap_or_default(),
                labels: image.config.and_then(|c| c.labels).unwrap_or_default(),
                size_bytes: image.size.unwrap_or(0),
                created: image.created.unwrap_or_default(),
            })),
            Err(BollardError::DockerResponseServerError { status_code: 404, .. }) => Ok(None),
            Err(e) => Err(map_err(e)),
        }
    }

    async fn build_image(&self, request: BuildRequest, progress: Progress<'_>) -> Result<(), RuntimeError> {
        let options = BuildImageOptionsBuilder::default()
            .t(&request.tag)
            .rm(true)
            .forcerm(true)
            .nocache(request.no_cache)
            .buildargs(&request.build_args)
            .labels(&request.labels)
            .build();
        let body = bollard::body_full(request.context_tar.into());
        let mut stream = self.docker.build_image(options, None, Some(body));
        let mut stream_error = None;
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    if let Some(detail) = info.error_detail.and_then(|d| d.message) {
                        return Err(RuntimeError::Build(detail));
                    }
                    if let Some(line) = info.stream {
                        for l in line.lines().filter(|l| !l.trim().is_empty()) {
                            progress(l);
                        }
                    }
                }
                Err(BollardError::DockerStreamError { error }) => {
                    return Err(RuntimeError::Build(error));
                }
                Err(e @ BollardError::DockerResponseServerError { .. }) => return Err(map_err(e)),
                // bollard 0.21 can end a CRLF-framed stream with a spurious decoding error (#560):
                // the image's presence below decides.
                Err(e) => stream_error = Some(e),
            }
        }
        match self.image(&request.tag).await? {
            Some(_) => Ok(()),
            None => Err(RuntimeError::Build(
                stream_error.map(|e| e.to_string()).unwrap_or_else(|| "the build produced no image".into()),
            )),
        }
    }

    async fn update_limits(&self, id: &str, limits: Resources) -> Result<(), RuntimeError> {
        let body = bollard::models::ContainerUpdateBody {
            memory: Some(limits.memory_bytes),
            memory_swap: Some(limits.memory_bytes),
            nano_cpus: Some(limits.nano_cpus),
            pids_limit: Some(limits.pids_limit),
            ..Default::default()
        };
        self.docker.update_container(id, body).await.map_err(map_err)
    }

    async fn exec(&self, id: &str, request: &ExecRequest) -> Result<ExecProcess, RuntimeError> {
        let config = bollard::models::ExecConfig {
            attach_stdin: Some(true),
            attach_stdout: Some(true),
            attach_stderr: Some(true),
            tty: Some(false),
            cmd: Some(request.cmd.clone()),
            env: Some(request.env.clone()),
            user: Some(request.user.clone()),
            working_dir: Some(request.working_dir.clone()),
            privileged: Some(false),
            ..Default::default()
        };
        let created = self.docker.create_exec(id, config).await.map_err(map_err)?;
        let options = bollard::exec::StartExecOptions { detach: false, tty: false, output_capacity: Some(64 * 1024) };
        match self.docker.start_exec(&created.id, Some(options)).await.map_err(map_err)? {
            bollard::exec::StartExecResults::Attached { output, input } => {
                let output = output
                    .filter_map(|item| async move {
                        match item {
                            Ok(bollard::container::LogOutput::StdOut { message }) => {
                                Some(Ok(ExecOutput::Stdout(message)))
                            }
                            Ok(bollard::container::LogOutput::StdErr { message }) => {
                                Some(Ok(ExecOutput::Stderr(message)))
                            }
                            Ok(_) => None,
                            Err(e) => Some(Err(map_err(e))),
                        }
                    })
                    .boxed();
                Ok(ExecProcess { id: created.id, stdin: input, output })
            }
            bollard::exec::StartExecResults::Detached => {
                Err(RuntimeError::Api { status: 500, message: "the exec started detached".into() })
            }
        }
    }

    async fn exec_exit_code(&self, exec_id: &str) -> Result<Option<i64>, RuntimeError> {
        let inspect = self.docker.inspect_exec(exec_id).await.map_err(map_err)?;
        Ok(match inspect.running {
            Some(true) => None,
            _ => inspect.exit_code,
        })
    }

    async fn pull_image(&self, reference: &str, progress: Progress<'_>) -> Result<(), RuntimeError> {
        let options = CreateImageOptionsBuilder::default().from_image(reference).build();
        let mut stream = self.docker.create_image(Some(options), None, None);
        while let Some(item) = stream.next().await {
            let info = item.map_err(map_err)?;
            if let Some(status) = info.status {
                progress(&status);
            }
        }
        Ok(())
    }

    async fn import_image(
        &self,
        rootfs_tar: BoxStream<'static, std::io::Result<bytes::Bytes>>,
        reference: &str,
    ) -> Result<(), RuntimeError> {
        let (repo, tag) = reference.rsplit_once(':').unwrap_or((reference, "latest"));
        let options = CreateImageOptionsBuilder::default().from_src("-").repo(repo).tag(tag).build();
        let body = bollard::body_try_stream(rootfs_tar);
        let mut stream = self.docker.create_image(Some(options), Some(body), None);
        while let Some(item) = stream.next().await {
            item.map_err(map_err)?;
        }
        match self.image(reference).await? {
            Some(_) => Ok(()),
            None => Err(RuntimeError::Build(format!("docker import produced no image {reference}"))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_container_is_sealed_whatever_the_spec_says() {
        let spec = ContainerSpec {
            memory_bytes: 256 << 20,
            nano_cpus: 1_000_000_000,
            pids_limit: 64,
            binds: vec!["/srv/run/a:/kernel:rw".into(), "/srv/data:/mnt/data".into()],
            ..Default::default()
        };
        let hc = host_config(&spec);
        assert_eq!(hc.network_mode.as_deref(), Some("none"));
        assert_eq!(hc.cap_drop, Some(vec!["ALL".to_string()]));
        assert_eq!(hc.security_opt, Some(vec!["no-new-privileges:true".to_string()]));
        assert_eq!(hc.readonly_rootfs, Some(true));
        assert_eq!(hc.init, Some(true));
        assert_eq!(hc.memory_swap, hc.memory, "no swap beyond the memory limit");
        assert_eq!(hc.pids_limit, Some(64));
        assert_eq!(hc.binds, Some(vec!["/srv/run/a:/kernel:ro".to_string(), "/srv/data:/mnt/data:ro".to_string()]));
    }

    #[test]
    fn a_fetcher_gets_its_network_and_nothing_else_of_the_sandbox_changes() {
        let session = ContainerSpec { memory_bytes: 1 << 30, ..Default::default() };
        let fetcher = ContainerSpec { egress_network: Some("bridge".into()), ..session.clone() };
        let (a, b) = (host_config(&session), host_config(&fetcher));
        assert_eq!(b.network_mode.as_deref(), Some("bridge"));
        assert_eq!(HostConfig { network_mode: None, ..a }, HostConfig { network_mode: None, ..b });
    }

    #[test]
    fn a_session_under_gvisor_names_its_runtime_and_keeps_every_seal() {
        let runc = ContainerSpec { memory_bytes: 1 << 30, ..Default::default() };
        let gvisor = ContainerSpec { oci_runtime: "runsc".into(), ..runc.clone() };
        let (a, b) = (host_config(&runc), host_config(&gvisor));
        assert_eq!(a.runtime, None, "empty: the engine's default");
        assert_eq!(b.runtime.as_deref(), Some("runsc"));
        assert_eq!(HostConfig { runtime: None, ..a }, HostConfig { runtime: None, ..b });
    }
}
