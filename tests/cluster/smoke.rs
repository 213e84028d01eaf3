//! The harness, proven on a three-node Swarm before any scenario relies on it: node1 manager, node2 and
//! node3 workers. A hardened sandbox inside a worker has only `lo` and its memory limit; a stand-in for
//! the agent (a global service on the workers: dnsrr, the Docker socket and a state directory bound at the
//! same path, a secret) and for the API (a replicated service on node1), both on a non-attachable
//! overlay, answer on their host-mode ports and through the round-robin proxy; `tasks.<agent>` resolves
//! inside the overlay; a crashed node goes Down, drops out of DNS, and after a restart is Ready and runs
//! its task again. The timings are printed (`--nocapture`), not asserted.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure};
use bollard::Docker;
use bollard::models::{ContainerCreateBody, HostConfig, NodeState};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, LogsOptionsBuilder, RemoveContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use futures::StreamExt;

use crate::harness::cluster::{LABEL_RUN, leftovers};
use crate::harness::images::{self, copy_image, kernel_image};
use crate::harness::proxy::Proxy;
use crate::harness::swarm::{Placement, ServiceDef, overlay_mtu};
use crate::harness::{Cluster, run_id};

const AGENT: &str = "kb-standin-agent";
const API: &str = "kb-standin-api";
const STATE_DIR: &str = "/var/lib/kb-standin";
const PORT: u16 = 8080;

/// A stand-in role: python's HTTP server on [`PORT`], serving one file `node` = the Swarm node's hostname.
fn stand_in(name: &str, image: &str, placement: Placement) -> ServiceDef {
    let mut def = ServiceDef::new(name, image, placement);
    def.entrypoint = Some(vec!["sh".into(), "-c".into()]);
    def.args = vec![format!(
        "mkdir -p /tmp/www && printf %s \"$NODE\" > /tmp/www/node && cd /tmp/www && exec python3 -m http.server {PORT}"
    )];
    def.env = vec!["NODE={{.Node.Hostname}}".into()];
    def.host_ports = vec![(PORT, PORT)];
    def
}

fn http() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().timeout(Duration::from_secs(3)).build().unwrap()
}

/// GET `url` until it answers 200 (a task that just started may not listen yet); returns the body.
async fn get_eventually(url: &str, timeout: Duration) -> anyhow::Result<String> {
    let started = Instant::now();
    loop {
        match http().get(url).send().await {
            Ok(r) if r.status().is_success() => return Ok(r.text().await?),
            other if started.elapsed() > timeout => bail!("{url} did not answer within {timeout:?}: {other:?}"),
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }
}

/// Runs a container with kernelbox's sandbox flags in `docker` and returns what it printed about itself.
async fn sandbox_report(docker: &Docker, image: &str, run: &str) -> anyhow::Result<String> {
    let script = "ls /sys/class/net; \
                  cat /sys/fs/cgroup/memory/memory.limit_in_bytes 2>/dev/null || cat /sys/fs/cgroup/memory.max; \
                  grep NoNewPrivs /proc/self/status; id -u; touch /x 2>&1 || true";
    let body = ContainerCreateBody {
        image: Some(image.into()),
        user: Some("1000:1000".into()),
        cmd: Some(vec!["sh".into(), "-c".into(), script.into()]),
        labels: Some(HashMap::from([(LABEL_RUN.to_owned(), run.to_owned())])),
        host_config: Some(HostConfig {
            network_mode: Some("none".into()),
            readonly_rootfs: Some(true),
            cap_drop: Some(vec!["ALL".into()]),
            security_opt: Some(vec!["no-new-privileges:true".into()]),
            memory: Some(256 << 20),
            memory_swap: Some(256 << 20),
            pids_limit: Some(64),
            init: Some(true),
            ipc_mode: Some("private".into()),
            tmpfs: Some(HashMap::from([("/tmp".to_owned(), "size=16m".to_owned())])),
            ..Default::default()
        }),
        ..Default::default()
    };
    run_to_end(docker, &format!("kbtest-{run}-sandbox"), body).await
}

/// Creates, starts and waits for a container; returns its output and removes it.
async fn run_to_end(docker: &Docker, name: &str, body: ContainerCreateBody) -> anyhow::Result<String> {
    let options = CreateContainerOptionsBuilder::default().name(name).build();
    docker.create_container(Some(options), body).await?;
    docker.start_container(name, None::<bollard::query_parameters::StartContainerOptions>).await?;
    let mut wait = docker.wait_container(name, Some(WaitContainerOptionsBuilder::default().build()));
    while wait.next().await.is_some() {}
    let mut logs = docker.logs(name, Some(LogsOptionsBuilder::default().stdout(true).stderr(true).build()));
    let mut out = String::new();
    while let Some(chunk) = logs.next().await {
        out.push_str(&chunk?.to_string());
    }
    docker.remove_container(name, Some(RemoveContainerOptionsBuilder::default().force(true).build())).await?;
    Ok(out)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_three_node_swarm_runs_sandboxes_and_services_and_takes_a_node_back_after_a_crash() -> anyhow::Result<()> {
    let _serial = crate::harness::one_cluster_at_a_time().await;
    let run = run_id();
    let mut report = Vec::<(String, Duration)>::new();
    let cluster = Cluster::start(&run, 3).await.map_err(|e| anyhow::anyhow!("starting the cluster: {e:?}"))?;
    let t = cluster.timings.clone();
    let what = |built: bool| if built { "built" } else { "cached" };
    report.push(("kernel images (python; build or check)".into(), t.images.kernel_images));
    report.push((format!("node image ({})", what(t.images.node_image_built)), t.images.node_image));
    report.push((format!("service image ({})", what(t.images.service_image_built)), t.images.service_image));
    report.push(("cluster: node containers created+started".into(), t.containers));
    report.push(("cluster: every dockerd answering".into(), t.dockerd));
    report.push(("cluster: swarm init + joins + all Ready + labels".into(), t.swarm));
    report.push(("cluster: start total (images included)".into(), t.total));

    // Images in, without a registry: one export each, streamed into the three nodes at once.
    let engines: Vec<Docker> = cluster.nodes.iter().map(|n| n.docker.clone()).collect();
    let python = kernel_image("python");
    let started = Instant::now();
    copy_image(&cluster.host, &python, &engines).await?;
    report.push(("import: python kernel image into 3 nodes".into(), started.elapsed()));
    let (service_image, _) = images::ensure().await;
    let started = Instant::now();
    copy_image(&cluster.host, service_image, &engines).await?;
    report.push(("import: service image into 3 nodes".into(), started.elapsed()));
    // The service image runs inside a node.
    let body = ContainerCreateBody {
        image: Some(service_image.clone()),
        cmd: Some(vec!["--version".into()]),
        labels: Some(HashMap::from([(LABEL_RUN.to_owned(), run.clone())])),
        host_config: Some(HostConfig { network_mode: Some("none".into()), ..Default::default() }),
        ..Default::default()
    };
    let out = run_to_end(&cluster.node("node1").docker, &format!("kbtest-{run}-version"), body).await?;
    ensure!(out.starts_with("kernelbox "), "the service image in node1 says {out:?}");

    // The sandbox, inside a worker: all our flags hold there too.
    let report_text = sandbox_report(&cluster.node("node2").docker, &python, &run).await?;
    let lines: Vec<&str> = report_text.lines().collect();
    ensure!(lines.first() == Some(&"lo") && lines.get(1) == Some(&"268435456"), "only lo, 256 MiB: {report_text}");
    ensure!(
        report_text.contains("NoNewPrivs:\t1") && lines.contains(&"1000"),
        "no new privileges, uid 1000: {report_text}"
    );
    ensure!(report_text.contains("Read-only file system"), "read-only root: {report_text}");

    // The stand-ins: an agent-shaped global service on the workers, an API-shaped replica on node1.
    let overlay = cluster.create_overlay("kb-internal").await?;
    let options = cluster
        .manager()
        .inspect_network(&overlay, None::<bollard::query_parameters::InspectNetworkOptions>)
        .await?
        .options
        .unwrap_or_default();
    let mtu = options.get("com.docker.network.driver.mtu").cloned();
    ensure!(
        mtu == overlay_mtu(cluster.mtu).map(|m| m.to_string()),
        "overlay MTU {mtu:?} on a {} underlay",
        cluster.mtu
    );
    let secret = cluster.create_secret("kb-standin-secret", b"s3cret").await?;
    cluster.mkdir_on_nodes(STATE_DIR).await?;
    let mut agent = stand_in(AGENT, &python, Placement::GlobalOnWorkers);
    agent.networks = vec![overlay.clone()];
    agent.dnsrr = true;
    agent.binds = vec!["/var/run/docker.sock".into(), STATE_DIR.into()];
    agent.secrets = vec![(secret, "kb-standin-secret".into(), "standin".into())];
    let mut api =
        stand_in(API, &python, Placement::Replicated { replicas: 1, constraints: vec!["node.hostname==node1".into()] });
    api.networks = vec![overlay.clone()];
    let started = Instant::now();
    cluster.deploy(&agent).await?;
    cluster.deploy(&api).await?;
    cluster.wait_running(AGENT, &["node2", "node3"], Duration::from_secs(90)).await?;
    cluster.wait_running(API, &["node1"], Duration::from_secs(90)).await?;
    report.push(("services: global on 2 workers + 1 replica running".into(), started.elapsed()));

    // Host-mode ports reach each task from the test.
    for node in ["node1", "node2", "node3"] {
        let url = format!("http://{}/node", cluster.host_port(node, PORT).await?);
        let body = get_eventually(&url, Duration::from_secs(30)).await?;
        ensure!(body == node, "{url} answered {body:?}, not {node}");
    }
    // What the agent's task sees: the secret, the socket and its state directory at the same path.
    let (code, out) = cluster
        .exec_in_task(
            "node2",
            AGENT,
            &["sh", "-c", "test -S /var/run/docker.sock && test -d /var/lib/kb-standin && cat /run/secrets/standin"],
        )
        .await?;
    ensure!(code == 0 && out == "s3cret", "the agent task's mounts and secret: {code} {out}");
    // Discovery inside the overlay: tasks.<agent> names both workers' tasks, reachable from node1's task.
    let addrs = cluster.resolve_in_task("node1", API, &format!("tasks.{AGENT}")).await?;
    ensure!(addrs.len() == 2, "tasks.{AGENT} from node1: {addrs:?}");
    let mut seen = Vec::new();
    for addr in &addrs {
        let code = format!(
            "import urllib.request; print(urllib.request.urlopen('http://{addr}:{PORT}/node', timeout=5).read().decode())"
        );
        let (status, out) = cluster.exec_in_task("node1", API, &["python3", "-c", &code]).await?;
        ensure!(status == 0, "node1 → {addr} over the overlay: {out}");
        seen.push(out.trim().to_owned());
    }
    seen.sort();
    ensure!(seen == ["node2", "node3"], "over the overlay: {seen:?}");

    // The one address: connections take turns over the replicas' ports.
    let mut backends = Vec::new();
    for node in ["node1", "node2", "node3"] {
        backends.push(cluster.host_port(node, PORT).await?);
    }
    let proxy = Proxy::start(backends).await?;
    let mut answers = Vec::new();
    for _ in 0..3 {
        answers.push(get_eventually(&format!("{}/node", proxy.url()), Duration::from_secs(10)).await?);
    }
    answers.sort();
    ensure!(answers == ["node1", "node2", "node3"], "through the proxy: {answers:?}");
    proxy.stop().await;

    // A crash: node3 goes Down and out of DNS; restarted, it is Ready and runs its task again.
    let started = Instant::now();
    cluster.kill_node("node3").await?;
    let down = cluster.wait_state(&["node3".into()], NodeState::DOWN, Duration::from_secs(60)).await?;
    report.push(("fault: node3 killed → manager says Down".into(), down));
    let deadline = Instant::now() + Duration::from_secs(60);
    while cluster.resolve_in_task("node1", API, &format!("tasks.{AGENT}")).await?.len() != 1 {
        ensure!(Instant::now() < deadline, "node3's task never left tasks.{AGENT}");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    report.push(("fault: node3 killed → gone from tasks.<agent> (from the kill)".into(), started.elapsed()));
    let dockerd = cluster.restart_node("node3").await?;
    report.push(("fault: node3 restarted → its dockerd answers".into(), dockerd));
    let started = Instant::now();
    let ready = cluster.wait_ready(&["node3".into()], Duration::from_secs(60)).await?;
    report.push(("fault: node3 restarted → Ready".into(), ready));
    cluster.wait_running(AGENT, &["node2", "node3"], Duration::from_secs(90)).await?;
    let url = format!("http://{}/node", cluster.host_port("node3", PORT).await?);
    ensure!(get_eventually(&url, Duration::from_secs(30)).await? == "node3", "node3's task answers again");
    report.push(("fault: node3 Ready → its task answers again (from restart)".into(), started.elapsed()));

    let started = Instant::now();
    let run_id = cluster.run_id.clone();
    let host = cluster.host.clone();
    cluster.cleanup().await?;
    report.push(("clean-up".into(), started.elapsed()));
    let left = leftovers(&host, &run_id).await?;
    ensure!(left.is_empty(), "the run left {left:?}");

    eprintln!("\n[cluster] timings of run {run_id}:");
    for (what, took) in &report {
        eprintln!("[cluster]   {what:<62} {:>7.1} s", took.as_secs_f64());
    }
    Ok(())
}
