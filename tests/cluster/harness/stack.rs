//! The hooks the scenario tests of issue 21 start from: kernelbox itself deployed into a test cluster the
//! way `deploy/stack.yml` deploys it (internal overlay, `kernelbox agent` global on the workers with
//! `dnsrr`, the Docker socket and its state directory at the same path and its certificate as secrets,
//! `kernelbox api` replicated on the nodes labelled for it with host-mode ports), and the "one address"
//! in front of the API replicas.
//!
//! Topology of the tests: node1 = manager running API replica A (no agent); node2 and node3 = workers
//! running agents; API replica B on node2.
//!
//! Depends on pieces not merged when this was written: the `agent` and `api` roles and `kernelbox cluster
//! certs` (see /work/shared-cluster-contract.md); the smoke test validates everything else with a stand-in.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use bollard::query_parameters::UpdateNodeOptionsBuilder;

use super::cluster::Cluster;
use super::images;
use super::proxy::Proxy;
use super::swarm::{Placement, ServiceDef};

pub const OVERLAY: &str = "kb-internal";
pub const AGENT_SERVICE: &str = "kernelbox-agent";
pub const API_SERVICE: &str = "kernelbox-api";
/// The agent's state directory, bound at the same path (the engine mounts session sockets from it).
pub const AGENT_STATE_DIR: &str = "/var/lib/kernelbox-agent";
pub const DOCKER_SOCKET: &str = "/var/run/docker.sock";
/// The agents' mutual-TLS port on the overlay (never published).
pub const AGENT_PORT: u16 = 7443;
/// The API replicas' port, published in host mode on their nodes.
pub const API_PORT: u16 = 8080;
/// The services' health-check interval. Swarm lists a task in `tasks.<service>` only once it is healthy,
/// so a restarted agent is out of the replicas' view for about one interval: it must stay well under
/// lost_after (the stack file's 10 s against its 60 s; here 1 s against 10 s), or an agent restart
/// costs its node's sessions.
pub const HEALTH_INTERVAL: Duration = Duration::from_secs(1);
/// The node label that says where API replicas run.
pub const API_NODE_LABEL: &str = "kernelbox.api";

/// What to deploy.
#[derive(Debug, Clone)]
pub struct KernelboxStack {
    /// API keys the replicas accept.
    pub api_keys: Vec<String>,
    /// Seconds without contact after which a node's sessions are lost (fencing on the agent side).
    pub lost_after_s: u64,
    /// The nodes that run an API replica (one each).
    pub api_nodes: Vec<String>,
    /// Extra `kernelbox agent` flags (e.g. `--pool python=1`).
    pub agent_flags: Vec<String>,
}

impl Default for KernelboxStack {
    fn default() -> Self {
        KernelboxStack {
            api_keys: vec!["test-key-a".into(), "test-key-b".into()],
            lost_after_s: 10,
            api_nodes: vec!["node1".into(), "node2".into()],
            agent_flags: Vec::new(),
        }
    }
}

/// kernelbox running in the cluster.
pub struct Deployment {
    /// The round-robin proxy over the API replicas' published ports.
    pub proxy: Proxy,
    /// Each API replica's own address (by node), for tests that pick one.
    pub replicas: HashMap<String, SocketAddr>,
}

/// Puts `label=value` on a Swarm node.
pub async fn label_node(cluster: &Cluster, node: &str, label: &str, value: &str) -> anyhow::Result<()> {
    let manager = cluster.manager();
    let inspected = manager.inspect_node(&cluster.node(node).swarm_id).await?;
    let mut spec = inspected.spec.unwrap_or_default();
    spec.labels.get_or_insert_with(HashMap::new).insert(label.into(), value.into());
    let version = inspected.version.and_then(|v| v.index).unwrap_or_default();
    manager
        .update_node(
            &cluster.node(node).swarm_id,
            spec,
            UpdateNodeOptionsBuilder::default().version(version as i64).build(),
        )
        .await
        .with_context(|| format!("labelling {node}"))
}

/// The cluster certificates, made by the binary under test (`kernelbox cluster certs`).
pub fn make_certs(dir: &Path) -> anyhow::Result<()> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_kernelbox"))
        .args(["cluster", "certs", "--out"])
        .arg(dir)
        .output()
        .context("running kernelbox cluster certs")?;
    if !out.status.success() {
        bail!("kernelbox cluster certs failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

/// Moves the images in (python kernel to the workers, the service image everywhere), makes the
/// certificates and secrets, the overlay and both services, waits until they run, and starts the proxy.
pub async fn deploy_kernelbox(cluster: &Cluster, stack: &KernelboxStack) -> anyhow::Result<Deployment> {
    let (service_image, _) = images::ensure().await;
    let workers: Vec<_> = cluster.workers().map(|n| n.docker.clone()).collect();
    let all: Vec<_> = cluster.nodes.iter().map(|n| n.docker.clone()).collect();
    images::copy_image(&cluster.host, &images::kernel_image("python"), &workers).await?;
    images::copy_image(&cluster.host, service_image, &all).await?;

    let certs = cluster.socket_root().join("certs");
    std::fs::create_dir_all(&certs)?;
    make_certs(&certs)?;
    let mut secrets = Vec::new();
    for file in ["ca.pem", "agent.pem", "agent-key.pem", "api.pem", "api-key.pem"] {
        let name = format!("kb-{file}");
        let id = cluster.create_secret(&name, &std::fs::read(certs.join(file))?).await?;
        secrets.push((file, (id, name, file.to_owned())));
    }
    let secret = |file: &str| secrets.iter().find(|(f, _)| *f == file).map(|(_, s)| s.clone()).unwrap();

    cluster.create_overlay(OVERLAY).await?;
    cluster.mkdir_on_nodes(AGENT_STATE_DIR).await?;
    let lost_after = stack.lost_after_s.to_string();
    let mut agent = ServiceDef::new(AGENT_SERVICE, service_image, Placement::GlobalOnWorkers);
    agent.networks = vec![OVERLAY.into()];
    agent.dnsrr = true;
    agent.binds = vec![DOCKER_SOCKET.into(), AGENT_STATE_DIR.into()];
    agent.secrets = vec![secret("ca.pem"), secret("agent.pem"), secret("agent-key.pem")];
    agent.health_interval = Some(HEALTH_INTERVAL);
    agent.args = [
        "agent",
        // The image's environment says 0.0.0.0:8080 (for `serve`); the agent's plain listener serves only
        // health, for the container's own health check: loopback.
        "--listen",
        "127.0.0.1:8080",
        "--no-build",
        // As the stack file: a replaced agent task leaves its sessions to its successor.
        "--keep-sessions",
        "--state-dir",
        AGENT_STATE_DIR,
        "--instance",
        &format!("kbcluster-{}", cluster.run_id),
        "--cluster-listen",
        &format!("0.0.0.0:{AGENT_PORT}"),
        "--cluster-ca",
        "/run/secrets/ca.pem",
        "--cluster-cert",
        "/run/secrets/agent.pem",
        "--cluster-key",
        "/run/secrets/agent-key.pem",
        "--lost-after-s",
        &lost_after,
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(stack.agent_flags.iter().cloned())
    .collect();
    cluster.deploy(&agent).await?;

    for node in &stack.api_nodes {
        label_node(cluster, node, API_NODE_LABEL, "true").await?;
    }
    let mut api = ServiceDef::new(
        API_SERVICE,
        service_image,
        Placement::Replicated {
            replicas: stack.api_nodes.len() as i64,
            constraints: vec![format!("node.labels.{API_NODE_LABEL}==true")],
        },
    );
    api.networks = vec![OVERLAY.into()];
    api.host_ports = vec![(API_PORT, API_PORT)];
    api.secrets = vec![secret("ca.pem"), secret("api.pem"), secret("api-key.pem")];
    api.health_interval = Some(HEALTH_INTERVAL);
    api.args = [
        "api",
        "--listen",
        &format!("0.0.0.0:{API_PORT}"),
        "--agents",
        &format!("tasks.{AGENT_SERVICE}"),
        "--agent-port",
        &AGENT_PORT.to_string(),
        "--cluster-ca",
        "/run/secrets/ca.pem",
        "--cluster-cert",
        "/run/secrets/api.pem",
        "--cluster-key",
        "/run/secrets/api-key.pem",
        "--lost-after-s",
        &lost_after,
    ]
    .iter()
    .map(|s| s.to_string())
    .chain(stack.api_keys.iter().flat_map(|k| ["--api-key".to_owned(), k.clone()]))
    .collect();
    cluster.deploy(&api).await?;

    let worker_names: Vec<String> = cluster.workers().map(|n| n.name.clone()).collect();
    let worker_refs: Vec<&str> = worker_names.iter().map(String::as_str).collect();
    cluster.wait_running(AGENT_SERVICE, &worker_refs, Duration::from_secs(120)).await?;
    let mut api_nodes = stack.api_nodes.clone();
    api_nodes.sort();
    let api_refs: Vec<&str> = api_nodes.iter().map(String::as_str).collect();
    cluster.wait_running(API_SERVICE, &api_refs, Duration::from_secs(120)).await?;
    let mut replicas = HashMap::new();
    for node in &api_nodes {
        replicas.insert(node.clone(), cluster.host_port(node, API_PORT).await?);
    }
    let proxy = Proxy::start(api_nodes.iter().map(|n| replicas[n]).collect()).await?;
    Ok(Deployment { proxy, replicas })
}
