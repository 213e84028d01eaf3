//! Faults injected into a running cluster, as they happen to real machines: a crash (`kill`), a freeze
//! (`pause`), a partition (network disconnect), a reboot (start again), and a crashed process inside a node
//! (its container killed through that node's own engine).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use bollard::models::NetworkConnectRequest;
use bollard::models::NetworkDisconnectRequest;
use bollard::query_parameters::{KillContainerOptionsBuilder, ListContainersOptionsBuilder};

use super::cluster::{Cluster, endpoint, wait_for_dockerd};

impl Cluster {
    /// Crashes a node: SIGKILL to its container (dockerd, containerd and every task die at once).
    pub async fn kill_node(&self, name: &str) -> anyhow::Result<()> {
        let options = KillContainerOptionsBuilder::default().signal("SIGKILL").build();
        self.host
            .kill_container(&self.node(name).container, Some(options))
            .await
            .with_context(|| format!("killing {name}"))
    }

    /// Boots a stopped or killed node again (its entry removes the stale pid files) and waits until its
    /// dockerd answers. Its address stays; its published host ports may change ([`Cluster::host_port`]).
    pub async fn restart_node(&self, name: &str) -> anyhow::Result<Duration> {
        let started = Instant::now();
        let node = self.node(name);
        self.host
            .start_container(&node.container, None::<bollard::query_parameters::StartContainerOptions>)
            .await
            .with_context(|| format!("starting {name} again"))?;
        wait_for_dockerd(&self.host, name, &node.container, self.socket_root()).await?;
        Ok(started.elapsed())
    }

    /// Freezes a node (every process stopped, sockets open, nothing answers).
    pub async fn pause_node(&self, name: &str) -> anyhow::Result<()> {
        self.host.pause_container(&self.node(name).container).await.with_context(|| format!("pausing {name}"))
    }

    pub async fn unpause_node(&self, name: &str) -> anyhow::Result<()> {
        self.host.unpause_container(&self.node(name).container).await.with_context(|| format!("unpausing {name}"))
    }

    /// Cuts a node off the test network (a partition: it keeps running and believes all is well).
    pub async fn disconnect_node(&self, name: &str) -> anyhow::Result<()> {
        let request = NetworkDisconnectRequest { container: self.node(name).container.clone(), force: Some(true) };
        self.host.disconnect_network(&self.network, request).await.with_context(|| format!("disconnecting {name}"))
    }

    /// Heals the partition: the node rejoins the network at its old address.
    pub async fn connect_node(&self, name: &str) -> anyhow::Result<()> {
        let node = self.node(name);
        let request =
            NetworkConnectRequest { container: node.container.clone(), endpoint_config: Some(endpoint(name, node.ip)) };
        self.host.connect_network(&self.network, request).await.with_context(|| format!("reconnecting {name}"))
    }

    /// The running containers inside a node whose labels include every `key=value` of `labels` (for a
    /// Swarm task: `com.docker.swarm.service.name=<service>`).
    pub async fn containers_in(&self, name: &str, labels: &[&str]) -> anyhow::Result<Vec<String>> {
        let filters = HashMap::from([("label", labels.to_vec())]);
        let options = ListContainersOptionsBuilder::default().filters(&filters).build();
        let listed = self.node(name).docker.list_containers(Some(options)).await?;
        Ok(listed.into_iter().filter_map(|c| c.id).collect())
    }

    /// Crashes one container inside a node, through that node's own engine.
    pub async fn kill_in_node(&self, name: &str, container: &str) -> anyhow::Result<()> {
        let options = KillContainerOptionsBuilder::default().signal("SIGKILL").build();
        self.node(name)
            .docker
            .kill_container(container, Some(options))
            .await
            .with_context(|| format!("killing {container} in {name}"))
    }
}
