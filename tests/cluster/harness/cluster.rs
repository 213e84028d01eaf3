//! A real Docker Swarm of docker-in-docker nodes on this one host, driven through bollard only.
//!
//! Nodes are not privileged (this host refuses `--privileged`): all capabilities but `SYS_RESOURCE`,
//! seccomp/AppArmor/system paths unconfined, a volume at `/var/lib/docker`, and the node image's entry
//! (cgroups writable, stale pid files gone, `dockerd --storage-driver=overlay2`). They sit on a test
//! network with an explicit subnet the inner daemons do not use and fixed addresses (a restarted node
//! keeps its Swarm address); each node's Docker API reaches the test through a unix socket in a
//! bind-mounted temporary directory. Everything carries `kernelbox.test=<run id>` and a guard removes it
//! all, even when the test panicked.

use std::collections::HashMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail};
use bollard::Docker;
use bollard::models::{
    ContainerCreateBody, EndpointIpamConfig, EndpointSettings, HostConfig, Ipam, IpamConfig, NetworkCreateRequest,
    NetworkingConfig, NodeSpec, NodeState, PortBinding, SwarmInitRequest, SwarmJoinRequest, SwarmSpec,
    SwarmSpecDispatcher, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, ListContainersOptionsBuilder, ListNetworksOptionsBuilder, ListVolumesOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, RemoveVolumeOptionsBuilder, UpdateNodeOptionsBuilder,
};
use futures::StreamExt;

use super::images;

/// The label on everything a run creates (host and nodes): `kernelbox.test=<run id>`.
pub const LABEL_RUN: &str = "kernelbox.test";
/// The label on each node container and Swarm node: its name in the test (`node1`, ...).
pub const LABEL_NODE: &str = "kernelbox.test.node";
/// Where each node's socket directory is mounted inside it.
const SOCKET_DIR_IN_NODE: &str = "/kernelbox-node";
/// The third octets tried for the nodes' /24 (192.168.X.0/24): outside what the inner daemons allocate
/// (their bridges take 172.17–31 first, overlays 10.0.0.0/8), and not in use by another network here.
const SUBNET_CANDIDATES: std::ops::RangeInclusive<u8> = 213..=223;
/// How long a node's dockerd, or the Swarm, may take to come up.
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// What to start.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// How many nodes (`node1` ... `nodeN`).
    pub nodes: usize,
    /// The first `managers` nodes are Swarm managers; the rest are workers.
    pub managers: usize,
    /// Ports of every node published on 127.0.0.1 with an ephemeral host port (see [`Node::host_port`]).
    pub published: Vec<u16>,
}

impl ClusterOptions {
    /// `n` nodes, node1 the only manager, port 8080 of each published.
    pub fn new(n: usize) -> Self {
        ClusterOptions { nodes: n, managers: 1, published: vec![8080] }
    }
}

/// One simulated node.
#[derive(Clone)]
pub struct Node {
    /// `node1`, ...: its hostname, Swarm hostname and network alias.
    pub name: String,
    /// Its container on the host engine.
    pub container: String,
    /// Its fixed address on the test network (its Swarm advertise address).
    pub ip: Ipv4Addr,
    /// Its own engine, through the socket in its bind-mounted directory.
    pub docker: Docker,
    /// Whether it is a Swarm manager.
    pub manager: bool,
    /// Its Swarm node id (set once it joined).
    pub swarm_id: String,
}

/// Times of the start-up steps, for the report.
#[derive(Debug, Clone, Default)]
pub struct StartTimings {
    pub images: images::Timings,
    pub containers: Duration,
    pub dockerd: Duration,
    pub swarm: Duration,
    pub total: Duration,
}

/// A running cluster. Dropping it removes everything it made; prefer [`Cluster::cleanup`] at the end of
/// a test, which reports what it could not remove.
pub struct Cluster {
    pub run_id: String,
    /// The host engine.
    pub host: Docker,
    /// The nodes' network on the host engine, its subnet and MTU (the underlay of the overlays).
    pub network: String,
    pub subnet: String,
    pub mtu: u32,
    pub nodes: Vec<Node>,
    pub timings: StartTimings,
    guard: Guard,
}

impl Cluster {
    /// Starts `n_nodes` nodes (node1 manager, the others workers) under `run_id`.
    pub async fn start(run_id: &str, n_nodes: usize) -> anyhow::Result<Cluster> {
        Cluster::start_with(run_id, ClusterOptions::new(n_nodes)).await
    }

    pub async fn start_with(run_id: &str, options: ClusterOptions) -> anyhow::Result<Cluster> {
        assert!(options.nodes >= 1 && (1..=options.nodes).contains(&options.managers), "1 ≤ managers ≤ nodes");
        let started = Instant::now();
        let mut timings = StartTimings { images: images::ensure().await.1.clone(), ..Default::default() };
        let host = images::host_docker().await?;
        let tmp = std::env::temp_dir().join(format!("kbcluster-{run_id}"));
        // From here on, whatever fails, the guard removes what was made.
        let guard = Guard { run_id: run_id.to_owned(), tmp: tmp.clone(), armed: true };
        let step = Instant::now();
        let mtu = underlay_mtu(&host).await;
        let (network, subnet, prefix) = create_network(&host, run_id, mtu).await?;
        let mut made = Vec::new();
        for i in 1..=options.nodes {
            let name = format!("node{i}");
            let ip = Ipv4Addr::new(prefix[0], prefix[1], prefix[2], 10 + i as u8);
            let dir = tmp.join(&name);
            std::fs::create_dir_all(&dir)?;
            let container = create_node(&host, run_id, &name, &network, ip, &dir, &options.published).await?;
            host.start_container(&container, None::<bollard::query_parameters::StartContainerOptions>).await?;
            made.push((name, container, ip, i <= options.managers));
        }
        timings.containers = step.elapsed();
        let step = Instant::now();
        let waits = made.iter().map(|(name, container, _, _)| wait_for_dockerd(&host, name, container, &tmp));
        let engines = futures::future::try_join_all(waits).await?;
        let nodes = made
            .into_iter()
            .zip(engines)
            .map(|((name, container, ip, manager), docker)| Node {
                name,
                container,
                ip,
                docker,
                manager,
                swarm_id: String::new(),
            })
            .collect();
        timings.dockerd = step.elapsed();
        let step = Instant::now();
        let mut cluster = Cluster { run_id: run_id.to_owned(), host, network, subnet, mtu, nodes, timings, guard };
        cluster.form_swarm().await?;
        cluster.timings.swarm = step.elapsed();
        cluster.timings.total = started.elapsed();
        Ok(cluster)
    }

    /// `swarm init` on node1 (heartbeat 1 s, so a dead node goes Down in seconds), the other managers and
    /// the workers join, every node is labelled, and the start waits until all are Ready.
    async fn form_swarm(&mut self) -> anyhow::Result<()> {
        let first = &self.nodes[0];
        let spec = SwarmSpec {
            dispatcher: Some(SwarmSpecDispatcher { heartbeat_period: Some(1_000_000_000) }),
            labels: Some(HashMap::from([(LABEL_RUN.to_owned(), self.run_id.clone())])),
            ..Default::default()
        };
        first
            .docker
            .init_swarm(SwarmInitRequest {
                listen_addr: Some("0.0.0.0:2377".into()),
                advertise_addr: Some(first.ip.to_string()),
                spec: Some(spec),
                ..Default::default()
            })
            .await
            .context("swarm init on node1")?;
        let tokens = first.docker.inspect_swarm().await?.join_tokens.ok_or_else(|| anyhow!("no join tokens"))?;
        let remote = format!("{}:2377", first.ip);
        for node in &self.nodes[1..] {
            let token = if node.manager { tokens.manager.clone() } else { tokens.worker.clone() };
            node.docker
                .join_swarm(SwarmJoinRequest {
                    listen_addr: Some("0.0.0.0:2377".into()),
                    advertise_addr: Some(node.ip.to_string()),
                    remote_addrs: Some(vec![remote.clone()]),
                    join_token: token,
                    ..Default::default()
                })
                .await
                .with_context(|| format!("{} joining the swarm", node.name))?;
        }
        self.wait_ready(&self.nodes.iter().map(|n| n.name.clone()).collect::<Vec<_>>(), READY_TIMEOUT).await?;
        let manager = self.manager().clone();
        let listed = manager.list_nodes(None::<bollard::query_parameters::ListNodesOptions>).await?;
        for swarm_node in listed {
            let hostname = swarm_node.description.as_ref().and_then(|d| d.hostname.clone()).unwrap_or_default();
            let id = swarm_node.id.clone().unwrap_or_default();
            let Some(node) = self.nodes.iter_mut().find(|n| n.name == hostname) else { continue };
            node.swarm_id = id.clone();
            let mut spec: NodeSpec = swarm_node.spec.clone().unwrap_or_default();
            let mut labels = spec.labels.take().unwrap_or_default();
            labels.insert(LABEL_RUN.into(), self.run_id.clone());
            labels.insert(LABEL_NODE.into(), hostname.clone());
            spec.labels = Some(labels);
            let version = swarm_node.version.and_then(|v| v.index).unwrap_or_default();
            manager
                .update_node(&id, spec, UpdateNodeOptionsBuilder::default().version(version as i64).build())
                .await
                .with_context(|| format!("labelling {hostname}"))?;
        }
        Ok(())
    }

    /// The engine of node1 (a manager): where services, secrets and overlays are made.
    pub fn manager(&self) -> &Docker {
        &self.nodes[0].docker
    }

    /// The node called `name`.
    pub fn node(&self, name: &str) -> &Node {
        self.nodes.iter().find(|n| n.name == name).unwrap_or_else(|| panic!("no node {name}"))
    }

    /// The workers.
    pub fn workers(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| !n.manager)
    }

    /// Each Swarm node's state as the manager sees it, by hostname (`ready`, `down`, ...).
    pub async fn node_states(&self) -> anyhow::Result<HashMap<String, NodeState>> {
        let listed = self.manager().list_nodes(None::<bollard::query_parameters::ListNodesOptions>).await?;
        let mut states = HashMap::new();
        for n in listed {
            let hostname = n.description.and_then(|d| d.hostname).unwrap_or_default();
            let state = n.status.and_then(|s| s.state).unwrap_or(NodeState::UNKNOWN);
            // After a restart an old entry of the same hostname may linger: Ready wins.
            let entry = states.entry(hostname).or_insert(state);
            if state == NodeState::READY {
                *entry = state;
            }
        }
        Ok(states)
    }

    /// Waits until the manager sees every node of `names` in `state`.
    pub async fn wait_state(&self, names: &[String], state: NodeState, timeout: Duration) -> anyhow::Result<Duration> {
        let started = Instant::now();
        loop {
            let states = self.node_states().await.unwrap_or_default();
            if names.iter().all(|n| states.get(n) == Some(&state)) {
                return Ok(started.elapsed());
            }
            if started.elapsed() > timeout {
                bail!("nodes {names:?} not {state:?} within {timeout:?}: {states:?}");
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits until every node of `names` is Ready.
    pub async fn wait_ready(&self, names: &[String], timeout: Duration) -> anyhow::Result<Duration> {
        self.wait_state(names, NodeState::READY, timeout).await
    }

    /// The host port that `port` of `node` is published on (read afresh: a restart may change it).
    pub async fn host_port(&self, node: &str, port: u16) -> anyhow::Result<SocketAddr> {
        let inspect = self.host.inspect_container(&self.node(node).container, None).await?;
        let binding = inspect
            .network_settings
            .and_then(|s| s.ports)
            .and_then(|p| p.get(&format!("{port}/tcp")).cloned().flatten())
            .and_then(|b| b.into_iter().next())
            .ok_or_else(|| anyhow!("port {port} of {node} is not published (or the node is not running)"))?;
        let host_port: u16 = binding.host_port.unwrap_or_default().parse()?;
        Ok(SocketAddr::from(([127, 0, 0, 1], host_port)))
    }

    /// The directory that holds each node's socket directory.
    pub fn socket_root(&self) -> &Path {
        &self.guard.tmp
    }

    /// The last lines of a node's own log (its dockerd), for failure messages.
    pub async fn node_log(&self, node: &str) -> String {
        container_log(&self.host, &self.node(node).container).await
    }

    /// Removes everything of the run and says what could not be removed.
    pub async fn cleanup(mut self) -> anyhow::Result<()> {
        self.guard.armed = false;
        cleanup_run(&self.host, &self.run_id, &self.guard.tmp).await
    }
}

/// Removes the run's nodes, volumes and network on drop (a panicking test included), from a thread of its
/// own with its own runtime: drop cannot await, and the test's runtime may be going down.
struct Guard {
    run_id: String,
    tmp: PathBuf,
    armed: bool,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (run_id, tmp) = (self.run_id.clone(), self.tmp.clone());
        let cleaned = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(async {
                let host = images::host_docker().await?;
                cleanup_run(&host, &run_id, &tmp).await
            })
        })
        .join();
        match cleaned {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("[cluster] cleaning up run {}: {e:#}", self.run_id),
            Err(_) => eprintln!("[cluster] cleaning up run {} panicked", self.run_id),
        }
    }
}

/// Everything labelled with `run_id` on the host: node containers (their inner containers, services and
/// images die with them), their volumes, the network; then the socket directories.
pub async fn cleanup_run(host: &Docker, run_id: &str, tmp: &Path) -> anyhow::Result<()> {
    let label = format!("{LABEL_RUN}={run_id}");
    let filters = HashMap::from([("label", vec![label.as_str()])]);
    let started = Instant::now();
    let mut problems = Vec::new();
    // In parallel: each node's removal waits on its engine's disk (its volume holds unpacked images).
    let containers =
        host.list_containers(Some(ListContainersOptionsBuilder::default().all(true).filters(&filters).build())).await?;
    let removals = containers.into_iter().map(|c| async move {
        let id = c.id.unwrap_or_default();
        let options = RemoveContainerOptionsBuilder::default().force(true).v(true).build();
        host.remove_container(&id, Some(options)).await.map_err(|e| format!("container {id}: {e}"))
    });
    problems.extend(futures::future::join_all(removals).await.into_iter().filter_map(Result::err));
    let containers_took = started.elapsed();
    let volumes = host.list_volumes(Some(ListVolumesOptionsBuilder::default().filters(&filters).build())).await?;
    let removals = volumes.volumes.unwrap_or_default().into_iter().map(|v| async move {
        let options = RemoveVolumeOptionsBuilder::default().force(true).build();
        host.remove_volume(&v.name, Some(options)).await.map_err(|e| format!("volume {}: {e}", v.name))
    });
    problems.extend(futures::future::join_all(removals).await.into_iter().filter_map(Result::err));
    let networks = host.list_networks(Some(ListNetworksOptionsBuilder::default().filters(&filters).build())).await?;
    for n in networks {
        let id = n.id.unwrap_or_default();
        if let Err(e) = host.remove_network(&id).await {
            problems.push(format!("network {id}: {e}"));
        }
    }
    eprintln!(
        "[cluster] clean-up of {run_id}: containers {:.1} s, volumes and network {:.1} s",
        containers_took.as_secs_f64(),
        (started.elapsed() - containers_took).as_secs_f64()
    );
    if tmp.exists()
        && let Err(e) = std::fs::remove_dir_all(tmp)
    {
        problems.push(format!("{}: {e}", tmp.display()));
    }
    if problems.is_empty() { Ok(()) } else { bail!("left behind: {}", problems.join("; ")) }
}

/// What the run left on the host (containers, volumes, networks with its label): empty after cleanup.
pub async fn leftovers(host: &Docker, run_id: &str) -> anyhow::Result<Vec<String>> {
    let label = format!("{LABEL_RUN}={run_id}");
    let filters = HashMap::from([("label", vec![label.as_str()])]);
    let mut left = Vec::new();
    let containers =
        host.list_containers(Some(ListContainersOptionsBuilder::default().all(true).filters(&filters).build())).await?;
    left.extend(containers.into_iter().map(|c| format!("container {}", c.names.unwrap_or_default().join(","))));
    let volumes = host.list_volumes(Some(ListVolumesOptionsBuilder::default().filters(&filters).build())).await?;
    left.extend(volumes.volumes.unwrap_or_default().into_iter().map(|v| format!("volume {}", v.name)));
    let networks = host.list_networks(Some(ListNetworksOptionsBuilder::default().filters(&filters).build())).await?;
    left.extend(networks.into_iter().map(|n| format!("network {}", n.name.unwrap_or_default())));
    Ok(left)
}

/// The MTU of the host's own bridge network (what the engine was told its underlay allows), else 1500. The
/// test network gets the same, so the overlays inside see a realistic underlay.
async fn underlay_mtu(host: &Docker) -> u32 {
    host.inspect_network("bridge", None::<bollard::query_parameters::InspectNetworkOptions>)
        .await
        .ok()
        .and_then(|n| n.options?.get("com.docker.network.driver.mtu")?.parse().ok())
        .unwrap_or(1500)
}

/// Creates the nodes' bridge network on the first free 192.168.X.0/24 of [`SUBNET_CANDIDATES`].
async fn create_network(host: &Docker, run_id: &str, mtu: u32) -> anyhow::Result<(String, String, [u8; 3])> {
    let taken: Vec<String> = host
        .list_networks(None::<bollard::query_parameters::ListNetworksOptions>)
        .await?
        .into_iter()
        .flat_map(|n| n.ipam.and_then(|i| i.config).unwrap_or_default())
        .filter_map(|c| c.subnet)
        .collect();
    let name = format!("kbtest-{run_id}");
    let mut last_error = None;
    for octet in SUBNET_CANDIDATES {
        let subnet = format!("192.168.{octet}.0/24");
        if taken.contains(&subnet) {
            continue;
        }
        let request = NetworkCreateRequest {
            name: name.clone(),
            driver: Some("bridge".into()),
            ipam: Some(Ipam {
                config: Some(vec![IpamConfig { subnet: Some(subnet.clone()), ..Default::default() }]),
                ..Default::default()
            }),
            options: Some(HashMap::from([("com.docker.network.driver.mtu".into(), mtu.to_string())])),
            labels: Some(HashMap::from([(LABEL_RUN.to_owned(), run_id.to_owned())])),
            ..Default::default()
        };
        match host.create_network(request).await {
            Ok(_) => return Ok((name, subnet, [192, 168, octet])),
            // Another engine user took it meanwhile ("Pool overlaps"): try the next.
            Err(e) => last_error = Some(e),
        }
    }
    bail!("no free subnet among 192.168.{SUBNET_CANDIDATES:?}.0/24: {last_error:?}")
}

fn socket_path(dir: &Path) -> String {
    dir.join("docker.sock").display().to_string()
}

async fn create_node(
    host: &Docker,
    run_id: &str,
    name: &str,
    network: &str,
    ip: Ipv4Addr,
    socket_dir: &Path,
    published: &[u16],
) -> anyhow::Result<String> {
    let container = format!("kbtest-{run_id}-{name}");
    let labels = HashMap::from([(LABEL_RUN.to_owned(), run_id.to_owned()), (LABEL_NODE.to_owned(), name.to_owned())]);
    let volume = format!("{container}-docker");
    host.create_volume(VolumeCreateRequest {
        name: Some(volume.clone()),
        labels: Some(labels.clone()),
        ..Default::default()
    })
    .await?;
    let port_bindings = published
        .iter()
        .map(|p| {
            let binding = PortBinding { host_ip: Some("127.0.0.1".into()), host_port: Some(String::new()) };
            (format!("{p}/tcp"), Some(vec![binding]))
        })
        .collect();
    let body = ContainerCreateBody {
        image: Some(images::NODE_IMAGE.into()),
        hostname: Some(name.into()),
        env: Some(vec![format!("KERNELBOX_NODE_SOCKET_DIR={SOCKET_DIR_IN_NODE}")]),
        labels: Some(labels),
        exposed_ports: Some(published.iter().map(|p| format!("{p}/tcp")).collect()),
        host_config: Some(HostConfig {
            // Not --privileged (refused here): every capability but the one this host's bounding set lacks.
            cap_add: Some(vec!["ALL".into()]),
            cap_drop: Some(vec!["SYS_RESOURCE".into()]),
            security_opt: Some(vec!["seccomp=unconfined".into(), "apparmor=unconfined".into()]),
            // `--security-opt systempaths=unconfined` is the CLI's name for these two: nothing of /proc and
            // /sys masked or read-only (the inner dockerd and runc need them).
            masked_paths: Some(Vec::new()),
            readonly_paths: Some(Vec::new()),
            binds: Some(vec![
                format!("{volume}:/var/lib/docker"),
                format!("{}:{SOCKET_DIR_IN_NODE}", socket_dir.display()),
            ]),
            port_bindings: Some(port_bindings),
            network_mode: Some(network.into()),
            ..Default::default()
        }),
        networking_config: Some(NetworkingConfig {
            endpoints_config: Some(HashMap::from([(network.to_owned(), endpoint(name, ip))])),
        }),
        ..Default::default()
    };
    let options = CreateContainerOptionsBuilder::default().name(&container).build();
    host.create_container(Some(options), body).await.with_context(|| format!("creating {container}"))?;
    Ok(container)
}

/// A node's endpoint on the test network: its fixed address and its name as an alias.
pub fn endpoint(name: &str, ip: Ipv4Addr) -> EndpointSettings {
    EndpointSettings {
        ipam_config: Some(EndpointIpamConfig { ipv4_address: Some(ip.to_string()), ..Default::default() }),
        aliases: Some(vec![name.to_owned()]),
        ..Default::default()
    }
}

/// Waits until the node's dockerd answers on the socket in its directory, and returns a client for it
/// (at the highest API version both sides speak).
pub async fn wait_for_dockerd(host: &Docker, name: &str, container: &str, tmp: &Path) -> anyhow::Result<Docker> {
    let path = socket_path(&tmp.join(name));
    let started = Instant::now();
    loop {
        if Path::new(&path).exists()
            && let Ok(docker) = Docker::connect_with_unix(&path, 120, bollard::API_DEFAULT_VERSION)
            && docker.ping().await.is_ok()
            && let Ok(docker) = docker.negotiate_version().await
        {
            return Ok(docker);
        }
        if started.elapsed() > READY_TIMEOUT {
            let log = container_log(host, container).await;
            bail!("dockerd of {name} did not answer within {READY_TIMEOUT:?}; its log ends:\n{log}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

async fn container_log(host: &Docker, container: &str) -> String {
    let options = LogsOptionsBuilder::default().stdout(true).stderr(true).tail("40").build();
    let mut logs = host.logs(container, Some(options));
    let mut out = String::new();
    while let Some(Ok(chunk)) = logs.next().await {
        out.push_str(&chunk.to_string());
    }
    out
}
