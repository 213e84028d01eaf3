//! Deploying into the cluster's Swarm through node1's engine: the internal overlay (not attachable, its
//! MTU fitted to the underlay), secrets, services (a global one on the workers with `dnsrr`, the Docker
//! socket and a state directory bound at the same path; a replicated one with host-mode ports), waiting
//! for their tasks, and looking inside a task (exec, DNS).

use std::collections::HashMap;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use base64::Engine as _;
use bollard::Docker;
use bollard::exec::{StartExecOptions, StartExecResults};
use bollard::models::{
    EndpointPortConfig, EndpointPortConfigPublishModeEnum, EndpointSpec, EndpointSpecModeEnum, ExecConfig,
    HealthConfig, Mount, MountType, NetworkAttachmentConfig, NetworkCreateRequest, SecretSpec, ServiceSpec,
    ServiceSpecMode, ServiceSpecModeReplicated, TaskSpec, TaskSpecContainerSpec, TaskSpecContainerSpecFile,
    TaskSpecContainerSpecSecrets, TaskSpecPlacement, TaskSpecRestartPolicy, TaskSpecRestartPolicyConditionEnum,
    TaskState,
};
use bollard::query_parameters::{ListTasksOptionsBuilder, UpdateServiceOptionsBuilder};
use futures::StreamExt;

use super::cluster::{Cluster, LABEL_RUN};

/// The overlay MTU for an underlay of `underlay` bytes: VXLAN costs 50 bytes; Docker assumes a 1500-byte
/// underlay, so below that the overlay must be told (moby/libnetwork#2661). `None`: Docker's default fits.
pub fn overlay_mtu(underlay: u32) -> Option<u32> {
    (underlay < 1500).then(|| underlay - 50)
}

/// Where a service runs.
#[derive(Debug, Clone)]
pub enum Placement {
    /// One task on every worker (`node.role==worker`): the agents' shape.
    GlobalOnWorkers,
    /// `replicas` tasks, under these placement constraints (e.g. `node.hostname==node1`).
    Replicated { replicas: i64, constraints: Vec<String> },
}

/// A Swarm service, as the tests deploy them.
#[derive(Debug, Clone)]
pub struct ServiceDef {
    pub name: String,
    pub image: String,
    /// The container's command (the image's entrypoint stays).
    pub args: Vec<String>,
    /// Replaces the image's entrypoint when set.
    pub entrypoint: Option<Vec<String>>,
    pub env: Vec<String>,
    pub placement: Placement,
    /// Overlays to join.
    pub networks: Vec<String>,
    /// `endpoint_mode: dnsrr` (no VIP: this kernel has no IPVS).
    pub dnsrr: bool,
    /// Host paths bound at the same path inside (the Docker socket, the state directory).
    pub binds: Vec<String>,
    /// (secret id, secret name, file name under /run/secrets/).
    pub secrets: Vec<(String, String, String)>,
    /// (container port, published port), published in host mode on the node that runs the task.
    pub host_ports: Vec<(u16, u16)>,
    /// The image's health check run this often instead (Swarm puts a task in DNS only once it is healthy,
    /// so this bounds how long a restarted task stays out of `tasks.<service>`).
    pub health_interval: Option<Duration>,
}

impl ServiceDef {
    pub fn new(name: &str, image: &str, placement: Placement) -> Self {
        ServiceDef {
            name: name.into(),
            image: image.into(),
            args: Vec::new(),
            entrypoint: None,
            env: Vec::new(),
            placement,
            networks: Vec::new(),
            dnsrr: false,
            binds: Vec::new(),
            secrets: Vec::new(),
            host_ports: Vec::new(),
            health_interval: None,
        }
    }

    /// The Engine API spec, labelled with the run.
    pub fn spec(&self, run_id: &str) -> ServiceSpec {
        let labels = HashMap::from([(LABEL_RUN.to_owned(), run_id.to_owned())]);
        let (mode, constraints) = match &self.placement {
            Placement::GlobalOnWorkers => (
                ServiceSpecMode { global: Some(HashMap::new()), ..Default::default() },
                vec!["node.role==worker".to_owned()],
            ),
            Placement::Replicated { replicas, constraints } => (
                ServiceSpecMode {
                    replicated: Some(ServiceSpecModeReplicated { replicas: Some(*replicas) }),
                    ..Default::default()
                },
                constraints.clone(),
            ),
        };
        let mounts = self
            .binds
            .iter()
            .map(|path| Mount {
                source: Some(path.clone()),
                target: Some(path.clone()),
                typ: Some(MountType::BIND),
                ..Default::default()
            })
            .collect();
        let secrets = self
            .secrets
            .iter()
            .map(|(id, name, file)| TaskSpecContainerSpecSecrets {
                secret_id: Some(id.clone()),
                secret_name: Some(name.clone()),
                file: Some(TaskSpecContainerSpecFile {
                    name: Some(file.clone()),
                    uid: Some("0".into()),
                    gid: Some("0".into()),
                    mode: Some(0o400),
                }),
            })
            .collect();
        let ports = self
            .host_ports
            .iter()
            .map(|(target, published)| EndpointPortConfig {
                target_port: Some(i64::from(*target)),
                published_port: Some(i64::from(*published)),
                publish_mode: Some(EndpointPortConfigPublishModeEnum::HOST),
                ..Default::default()
            })
            .collect();
        ServiceSpec {
            name: Some(self.name.clone()),
            labels: Some(labels.clone()),
            mode: Some(mode),
            task_template: Some(TaskSpec {
                container_spec: Some(TaskSpecContainerSpec {
                    image: Some(self.image.clone()),
                    command: self.entrypoint.clone(),
                    args: Some(self.args.clone()),
                    env: Some(self.env.clone()),
                    labels: Some(labels),
                    mounts: Some(mounts),
                    secrets: Some(secrets),
                    // No test: the image's own, at this interval.
                    health_check: self.health_interval.map(|every| HealthConfig {
                        interval: Some(every.as_nanos() as i64),
                        start_interval: Some(every.as_nanos() as i64),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                placement: Some(TaskSpecPlacement { constraints: Some(constraints), ..Default::default() }),
                networks: Some(
                    self.networks
                        .iter()
                        .map(|n| NetworkAttachmentConfig { target: Some(n.clone()), ..Default::default() })
                        .collect(),
                ),
                restart_policy: Some(TaskSpecRestartPolicy {
                    condition: Some(TaskSpecRestartPolicyConditionEnum::ANY),
                    delay: Some(1_000_000_000),
                    ..Default::default()
                }),
                ..Default::default()
            }),
            endpoint_spec: Some(EndpointSpec {
                mode: Some(if self.dnsrr { EndpointSpecModeEnum::DNSRR } else { EndpointSpecModeEnum::VIP }),
                ports: Some(ports),
            }),
            ..Default::default()
        }
    }
}

impl Cluster {
    /// Creates the internal overlay through node1: not attachable (only services join it), MTU fitted to
    /// the nodes' network. Returns its name.
    pub async fn create_overlay(&self, name: &str) -> anyhow::Result<String> {
        let mut options = HashMap::new();
        if let Some(mtu) = overlay_mtu(self.mtu) {
            options.insert("com.docker.network.driver.mtu".to_owned(), mtu.to_string());
        }
        let request = NetworkCreateRequest {
            name: name.into(),
            driver: Some("overlay".into()),
            attachable: Some(false),
            options: Some(options),
            labels: Some(HashMap::from([(LABEL_RUN.to_owned(), self.run_id.clone())])),
            ..Default::default()
        };
        self.manager().create_network(request).await.with_context(|| format!("creating the overlay {name}"))?;
        Ok(name.to_owned())
    }

    /// A Swarm secret; returns its id.
    pub async fn create_secret(&self, name: &str, data: &[u8]) -> anyhow::Result<String> {
        let spec = SecretSpec {
            name: Some(name.into()),
            labels: Some(HashMap::from([(LABEL_RUN.to_owned(), self.run_id.clone())])),
            data: Some(base64::engine::general_purpose::STANDARD.encode(data)),
            ..Default::default()
        };
        let created = self.manager().create_secret(spec).await.with_context(|| format!("creating secret {name}"))?;
        Ok(created.id)
    }

    /// Makes `path` a directory on every node (a bind source must exist before a task can start).
    pub async fn mkdir_on_nodes(&self, path: &str) -> anyhow::Result<()> {
        for node in &self.nodes {
            let (code, out) = exec(&self.host, &node.container, &["mkdir", "-p", path]).await?;
            if code != 0 {
                bail!("mkdir -p {path} on {}: {out}", node.name);
            }
        }
        Ok(())
    }

    /// Creates the service; returns its id.
    pub async fn deploy(&self, service: &ServiceDef) -> anyhow::Result<String> {
        let created = self
            .manager()
            .create_service(service.spec(&self.run_id), None)
            .await
            .with_context(|| format!("creating service {}", service.name))?;
        created.id.ok_or_else(|| anyhow!("service {} has no id", service.name))
    }

    /// Changes the arguments of `service`'s tasks (an operator's `docker service update --args`): Swarm
    /// replaces each task, one node at a time, stopping the old one first (its default update order).
    pub async fn update_args(&self, service: &str, args: Vec<String>) -> anyhow::Result<()> {
        let current = self.manager().inspect_service(service, None).await?;
        let version =
            current.version.and_then(|v| v.index).ok_or_else(|| anyhow!("service {service} has no version"))?;
        let mut spec = current.spec.ok_or_else(|| anyhow!("service {service} has no spec"))?;
        let container = spec
            .task_template
            .as_mut()
            .and_then(|t| t.container_spec.as_mut())
            .ok_or_else(|| anyhow!("service {service} has no container spec"))?;
        container.args = Some(args);
        let options = UpdateServiceOptionsBuilder::new().version(i32::try_from(version)?).build();
        let answer = self.manager().update_service(service, spec, options, None).await?;
        // Without a registry Swarm warns that it cannot pin the image's digest: said, not fatal.
        if let Some(warnings) = answer.warnings.filter(|w| !w.is_empty()) {
            eprintln!("[cluster] updating {service}: {warnings:?}");
        }
        Ok(())
    }

    /// The arguments `service`'s tasks run with.
    pub async fn service_args(&self, service: &str) -> anyhow::Result<Vec<String>> {
        let current = self.manager().inspect_service(service, None).await?;
        Ok(current.spec.and_then(|s| s.task_template?.container_spec?.args).unwrap_or_default())
    }

    /// The nodes (by name) where `service` has a running task.
    pub async fn running_on(&self, service: &str) -> anyhow::Result<Vec<String>> {
        let filters = HashMap::from([("service", vec![service]), ("desired-state", vec!["running"])]);
        let tasks =
            self.manager().list_tasks(Some(ListTasksOptionsBuilder::default().filters(&filters).build())).await?;
        let mut names: Vec<String> = tasks
            .into_iter()
            .filter(|t| t.status.as_ref().and_then(|s| s.state) == Some(TaskState::RUNNING))
            .filter_map(|t| {
                let node_id = t.node_id?;
                self.nodes.iter().find(|n| n.swarm_id == node_id).map(|n| n.name.clone())
            })
            .collect();
        names.sort();
        Ok(names)
    }

    /// Waits until `service` runs on exactly `nodes` (sorted names); returns how long it took.
    pub async fn wait_running(&self, service: &str, nodes: &[&str], timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let running = self.running_on(service).await.unwrap_or_default();
            if running == nodes {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!("service {service} runs on {running:?}, not {nodes:?}, after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// The container of `service`'s running task on `node`.
    pub async fn task_container(&self, node: &str, service: &str) -> anyhow::Result<String> {
        let label = format!("com.docker.swarm.service.name={service}");
        self.containers_in(node, &[&label])
            .await?
            .into_iter()
            .next()
            .ok_or_else(|| anyhow!("no running task of {service} on {node}"))
    }

    /// Runs `cmd` inside `service`'s task on `node`; returns its exit code and output.
    pub async fn exec_in_task(&self, node: &str, service: &str, cmd: &[&str]) -> anyhow::Result<(i64, String)> {
        let container = self.task_container(node, service).await?;
        exec(&self.node(node).docker, &container, cmd).await
    }

    /// The IPv4 addresses `dns_name` resolves to inside `service`'s task on `node` (Swarm's embedded DNS;
    /// `tasks.<service>` gives one address per running task).
    pub async fn resolve_in_task(&self, node: &str, service: &str, dns_name: &str) -> anyhow::Result<Vec<Ipv4Addr>> {
        let (code, out) = self.exec_in_task(node, service, &["getent", "ahostsv4", dns_name]).await?;
        if code != 0 {
            return Ok(Vec::new());
        }
        let mut addrs: Vec<Ipv4Addr> = out.lines().filter_map(|l| l.split_whitespace().next()?.parse().ok()).collect();
        addrs.sort();
        addrs.dedup();
        Ok(addrs)
    }
}

/// Runs `cmd` as root in `container` of `docker` (the test looks at what a task has, whatever user the
/// task runs as); returns its exit code and its stdout and stderr together.
pub async fn exec(docker: &Docker, container: &str, cmd: &[&str]) -> anyhow::Result<(i64, String)> {
    let config = ExecConfig {
        user: Some("0".into()),
        attach_stdout: Some(true),
        attach_stderr: Some(true),
        cmd: Some(cmd.iter().map(|s| s.to_string()).collect()),
        ..Default::default()
    };
    let created = docker.create_exec(container, config).await.with_context(|| format!("exec {cmd:?}"))?;
    let mut out = String::new();
    match docker.start_exec(&created.id, None::<StartExecOptions>).await? {
        StartExecResults::Attached { mut output, .. } => {
            while let Some(chunk) = output.next().await {
                out.push_str(&chunk?.to_string());
                if out.len() > 1 << 20 {
                    bail!("exec {cmd:?} printed more than 1 MiB");
                }
            }
        }
        StartExecResults::Detached => bail!("exec {cmd:?} started detached"),
    }
    let code = docker.inspect_exec(&created.id).await?.exit_code.unwrap_or(-1);
    Ok((code, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_overlay_mtu_leaves_room_for_vxlan_only_under_a_small_underlay() {
        assert_eq!(overlay_mtu(1400), Some(1350));
        assert_eq!(overlay_mtu(1500), None);
        assert_eq!(overlay_mtu(9000), None);
    }

    #[test]
    fn a_global_service_runs_on_workers_only_with_dnsrr_and_same_path_binds() {
        let mut def = ServiceDef::new("agent", "img", Placement::GlobalOnWorkers);
        def.dnsrr = true;
        def.binds = vec!["/var/run/docker.sock".into()];
        def.host_ports = vec![(8080, 8080)];
        let spec = def.spec("run1");
        let task = spec.task_template.unwrap();
        assert_eq!(task.placement.unwrap().constraints.unwrap(), ["node.role==worker"]);
        assert!(spec.mode.unwrap().global.is_some());
        let endpoint = spec.endpoint_spec.unwrap();
        assert_eq!(endpoint.mode, Some(EndpointSpecModeEnum::DNSRR));
        assert_eq!(endpoint.ports.unwrap()[0].publish_mode, Some(EndpointPortConfigPublishModeEnum::HOST));
        let mount = &task.container_spec.unwrap().mounts.unwrap()[0];
        assert_eq!(mount.source, mount.target);
        assert_eq!(spec.labels.unwrap()[LABEL_RUN], "run1");
    }
}
