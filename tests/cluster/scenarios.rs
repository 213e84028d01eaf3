//! The multi-node scenarios of issue 21 against the real roles: `kernelbox agent` on node2 and node3
//! (workers), `kernelbox api` replica A on node1 (the manager, no agent) and replica B on node2, deployed by
//! `harness::stack` into one three-node Swarm that every scenario of this file shares (moving the python
//! image in costs most of a cluster's start). The scenarios run in order, each leaving the cluster as the
//! next expects:
//! 1. spread: sequential creates land half and half on the workers, each id's tag naming the node whose
//!    engine holds its container;
//! 2. the boundary: a session on a worker has only `lo` and reaches neither the agent's port nor another
//!    node; a container on the overlay without the API's certificate is refused by the agent; the API
//!    replicas have no Docker socket;
//! 3. node loss: node3 killed, its sessions answer 503 and then 410 while a node2 session never misses an
//!    execute, creates go to node2, lists name node3 as missing;
//! 4. node return: node3 restarted, its old sessions stay 410 with their containers gone, new sessions land
//!    on it again;
//! 5. partitions: node3 cut off shorter than lost_after (503, then the session as it was) and longer
//!    (410, its containers removed by its own agent, the ids still 410 after the reconnect);
//! 6. and 7. an agent and an API replica killed;
//! 8. warm pools per node, set by a rolling update of the agents (their sessions adopted): two creates at
//!    once, one from each node's pool, counted per node in a replica's `/metrics`;
//! 9. images: a node without the current python image gets no python session, and none at all is 503;
//!    and over the whole run, never two agents serving one node (the state directory's lock).
//!
//! Latencies and fault timings are printed (`--nocapture`), not asserted beyond the issue's bounds.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, anyhow, bail, ensure};
use bollard::query_parameters::{ListContainersOptionsBuilder, RemoveImageOptionsBuilder, TagImageOptionsBuilder};
use kernelbox::node::NodeTag;
use serde_json::{Value, json};

use crate::harness::stack::{self, AGENT_PORT, AGENT_SERVICE, API_SERVICE, Deployment, KernelboxStack};
use crate::harness::swarm::{Placement, ServiceDef};
use crate::harness::{Cluster, run_id};

const KEY: &str = "test-key-a";
const SESSION_LABEL: &str = "kernelbox.session";
/// The boundary scenario's container on the overlay without the API's certificate.
const INTRUDER: &str = "kb-intruder";
/// What the intruder runs against `URL`: without a client certificate, with the agent's, with the API's.
const INTRUDER_SCRIPT: &str = r#"
import ssl, urllib.request
for cert in [None, 'agent', 'api']:
    c = ssl.create_default_context(cafile='/run/secrets/ca.pem')
    c.check_hostname = False
    if cert:
        c.load_cert_chain('/run/secrets/%s.pem' % cert, '/run/secrets/%s-key.pem' % cert)
    try:
        urllib.request.urlopen('URL', context=c, timeout=5).read()
        print(cert, 'served')
    except Exception:
        print(cert, 'refused')
"#;

/// A client of one address (a replica, or the proxy over both).
#[derive(Clone)]
struct Api {
    base: String,
    http: reqwest::Client,
}

/// An answer: status, the `x-kernelbox-nodes-missing` header, the JSON body (or `null`).
struct Answer {
    status: u16,
    missing: Option<String>,
    body: Value,
}

impl Answer {
    fn code(&self) -> &str {
        self.body["error"]["code"].as_str().unwrap_or("")
    }
}

impl Api {
    fn new(base: String) -> Self {
        // A connection per call, as a client of a TCP balancer sees it when a replica dies between calls.
        let http = reqwest::Client::builder()
            .no_proxy()
            .pool_max_idle_per_host(0)
            .timeout(Duration::from_secs(60))
            .build()
            .unwrap();
        Api { base, http }
    }

    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> anyhow::Result<Answer> {
        let mut req = self.http.request(method, format!("{}{path}", self.base)).bearer_auth(KEY);
        if let Some(body) = body {
            req = req.json(&body);
        }
        let r = req.send().await.with_context(|| format!("{path} through {}", self.base))?;
        let status = r.status().as_u16();
        let missing = r.headers().get("x-kernelbox-nodes-missing").and_then(|v| v.to_str().ok()).map(str::to_owned);
        let body = r.json::<Value>().await.unwrap_or(Value::Null);
        Ok(Answer { status, missing, body })
    }

    async fn create(&self) -> anyhow::Result<String> {
        let a = self.call(reqwest::Method::POST, "/v1/sessions", Some(json!({"language": "python"}))).await?;
        ensure!(a.status == 201, "create through {}: {} {}", self.base, a.status, a.body);
        Ok(a.body["id"].as_str().ok_or_else(|| anyhow!("no id in {}", a.body))?.to_owned())
    }

    /// Runs `code`; returns its stdout.
    async fn exec(&self, id: &str, code: &str) -> anyhow::Result<String> {
        let a = self
            .call(reqwest::Method::POST, &format!("/v1/sessions/{id}/execute"), Some(json!({"code": code})))
            .await?;
        ensure!(a.status == 200, "execute in {id} through {}: {} {}", self.base, a.status, a.body);
        Ok(a.body["stdout"].as_str().unwrap_or_default().to_owned())
    }

    async fn get(&self, id: &str) -> anyhow::Result<Answer> {
        self.call(reqwest::Method::GET, &format!("/v1/sessions/{id}"), None).await
    }
}

/// The stack of these scenarios: no warm pool at first (placement by load alone, so a burst of creates
/// spreads evenly; pools have their own scenario), and the product's default `lost_after` (60 s). A
/// shorter one loses a node's sessions to a short partition: when Swarm marks the node Down (seconds,
/// with the harness's 1 s heartbeat) it replaces the agent's task after the heal, and the new task's
/// address reaches the other nodes' DNS and overlay only when their gossip converges, 35–40 s later
/// (measured), all of which counts as time out of contact.
fn stack() -> KernelboxStack {
    KernelboxStack { agent_flags: vec!["--pool".into(), "none".into()], lost_after_s: 60, ..KernelboxStack::default() }
}

/// Scenario 5's short partition: well under lost_after, including Swarm's re-convergence after it.
const SHORT_CUT: Duration = Duration::from_secs(5);

/// The shared cluster: three nodes, kernelbox deployed, each worker's tag.
struct Fixture {
    cluster: Cluster,
    deployment: Deployment,
    /// The one address (round-robin over both replicas).
    api: Api,
    /// Each replica on its own: A (node1), B (node2).
    a: Api,
    b: Api,
    /// Node name → its tag (from its Swarm node id, as the agent derives it).
    tags: HashMap<String, NodeTag>,
    report: Vec<(String, Duration)>,
    spread_failure: Option<String>,
}

impl Fixture {
    async fn start() -> anyhow::Result<Fixture> {
        let run = run_id();
        let started = Instant::now();
        let cluster = Cluster::start(&run, 3).await?;
        let mut report = vec![("cluster: 3 nodes, swarm formed".to_owned(), started.elapsed())];
        let step = Instant::now();
        let deployment = match stack::deploy_kernelbox(&cluster, &stack()).await {
            Ok(d) => d,
            Err(e) => bail!("deploying kernelbox: {e:#}\n{}", service_logs(&cluster).await),
        };
        report.push(("deploy: images in, certs, services running".into(), step.elapsed()));
        let tags = cluster.nodes.iter().map(|n| (n.name.clone(), NodeTag::from_node_id(&n.swarm_id))).collect();
        let api = Api::new(deployment.proxy.url());
        let a = Api::new(format!("http://{}", deployment.replicas["node1"]));
        let b = Api::new(format!("http://{}", deployment.replicas["node2"]));
        let mut fixture = Fixture { cluster, deployment, api, a, b, tags, report, spread_failure: None };
        let step = Instant::now();
        fixture.wait_agents(&["node2", "node3"], Duration::from_secs(90)).await?;
        fixture.report.push(("deploy: both replicas see both agents ready".into(), step.elapsed()));
        Ok(fixture)
    }

    fn tag(&self, node: &str) -> NodeTag {
        self.tags[node]
    }

    /// The node whose tag ends `id`.
    fn node_of(&self, id: &str) -> Option<String> {
        let tag = NodeTag::suffix_of(id)?;
        self.tags.iter().find(|(_, t)| **t == tag).map(|(n, _)| n.clone())
    }

    /// Waits until both replicas' `/readyz` name `nodes` as ready agents (a create can land on each).
    async fn wait_agents(&self, nodes: &[&str], timeout: Duration) -> anyhow::Result<()> {
        let started = Instant::now();
        loop {
            let mut all = true;
            let mut seen = Vec::new();
            for replica in [&self.a, &self.b] {
                let r = replica.http.get(format!("{}/readyz", replica.base)).send().await;
                let body = match r {
                    Ok(r) => r.json::<Value>().await.unwrap_or(Value::Null),
                    Err(_) => Value::Null,
                };
                seen.push(body.clone());
                let ready = body["agents_ready"].as_u64().unwrap_or(0);
                all &= ready as usize >= nodes.len();
            }
            if all {
                return Ok(());
            }
            if started.elapsed() > timeout {
                bail!(
                    "the replicas do not see {nodes:?} ready within {timeout:?}: {seen:?}\n{}",
                    service_logs(&self.cluster).await
                );
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The session ids whose containers run in `node`'s engine (by their label).
    async fn sessions_in(&self, node: &str) -> anyhow::Result<Vec<String>> {
        let filters = HashMap::from([("label", vec![SESSION_LABEL])]);
        let listed = self
            .cluster
            .node(node)
            .docker
            .list_containers(Some(ListContainersOptionsBuilder::default().all(true).filters(&filters).build()))
            .await?;
        Ok(listed.into_iter().filter_map(|c| c.labels?.get(SESSION_LABEL).cloned()).collect())
    }
}

/// The last lines of both services' tasks, for a failure message.
async fn service_logs(cluster: &Cluster) -> String {
    use bollard::query_parameters::LogsOptionsBuilder;
    use futures::StreamExt;
    let mut out = String::new();
    for node in &cluster.nodes {
        for service in [AGENT_SERVICE, API_SERVICE] {
            let label = format!("com.docker.swarm.service.name={service}");
            let filters = HashMap::from([("label", vec![label.as_str()])]);
            let options = ListContainersOptionsBuilder::default().all(true).filters(&filters).build();
            // A dead node's engine may not answer: its logs are skipped.
            let Ok(Ok(listed)) =
                tokio::time::timeout(Duration::from_secs(3), node.docker.list_containers(Some(options))).await
            else {
                continue;
            };
            for c in listed.into_iter().take(2) {
                let id = c.id.unwrap_or_default();
                out.push_str(&format!("--- {service} on {} ({:?}):\n", node.name, c.status));
                let options = LogsOptionsBuilder::default().stdout(true).stderr(true).tail("15").build();
                let mut logs = node.docker.logs(&id, Some(options));
                while let Some(Ok(chunk)) = logs.next().await {
                    out.push_str(&chunk.to_string());
                }
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread")]
async fn kernelbox_on_a_three_node_swarm_spreads_isolates_and_survives_losing_a_node() -> anyhow::Result<()> {
    let _serial = crate::harness::one_cluster_at_a_time().await;
    let mut f = Fixture::start().await?;
    let outcome = async {
        let on_node3 = spread(&mut f).await?;
        boundary(&mut f).await?;
        let on_node2 = f.sessions_in("node2").await?.first().cloned().ok_or_else(|| anyhow!("none on node2"))?;
        replica_loss(&mut f, &on_node2).await?;
        agent_restart(&mut f, &on_node2).await?;
        f.wait_agents(&["node2", "node3"], Duration::from_secs(60)).await?;
        let (old, survivor) = node_loss(&mut f, &on_node3).await?;
        node_return(&mut f, &old, &survivor).await?;
        partition(&mut f).await?;
        pools(&mut f).await?;
        images(&mut f).await?;
        for node in ["node2", "node3"] {
            one_agent_at_a_time(&f, node).await?;
        }
        anyhow::Ok(())
    }
    .await;
    if outcome.is_err() {
        eprintln!("[cluster] service logs at the failure:\n{}", service_logs(&f.cluster).await);
    }
    let Fixture { cluster, deployment, mut report, spread_failure, .. } = f;
    deployment.proxy.stop().await;
    let run = cluster.run_id.clone();
    let host = cluster.host.clone();
    let step = Instant::now();
    cluster.cleanup().await?;
    report.push(("clean-up".into(), step.elapsed()));
    let left = crate::harness::cluster::leftovers(&host, &run).await?;
    eprintln!("\n[cluster] scenario timings of run {run}:");
    for (what, took) in &report {
        eprintln!("[cluster]   {what:<66} {:>8.3} s", took.as_secs_f64());
    }
    outcome?;
    if let Some(failure) = spread_failure {
        bail!(failure);
    }
    ensure!(left.is_empty(), "the run left {left:?}");
    Ok(())
}

/// Scenario 1: eight sequential creates land four and four on node2 and node3; each id's tag names the
/// node whose engine holds its container. Returns node3's sessions. Through one replica: each replica
/// counts what it placed until its next probe, but not what the other placed meanwhile (through the one
/// address the split may be 5/3).
async fn spread(f: &mut Fixture) -> anyhow::Result<Vec<String>> {
    let mut ids = Vec::new();
    let mut took = Vec::new();
    let mut views = Vec::new();
    for i in 0..8 {
        if i > 0 {
            // Sequential creates, each after a probe round that began once the last one was made: a
            // replica's view of the loads is exact only then. (Faster bursts are spread by the replica's
            // own count of what it placed, which a probe overlapping a create can count twice or not at
            // all: see the issue note.)
            tokio::time::sleep(kernelbox::cluster::membership::PROBE_INTERVAL * 2).await;
        }
        views.push(node_sessions_seen_by(&f.a).await);
        let started = Instant::now();
        ids.push(f.a.create().await?);
        took.push(started.elapsed());
    }
    let mut by_node: HashMap<String, Vec<String>> = HashMap::new();
    for id in &ids {
        let node = f.node_of(id).ok_or_else(|| anyhow!("{id} names no worker's tag ({:?})", f.tags))?;
        by_node.entry(node).or_default().push(id.clone());
    }
    let counts: HashMap<&str, usize> = by_node.iter().map(|(n, v)| (n.as_str(), v.len())).collect();
    let landed: Vec<String> = ids.iter().filter_map(|id| f.node_of(id)).collect();
    if counts.get("node2") != Some(&4) || counts.get("node3") != Some(&4) {
        // Reported at the end, after the other scenarios ran.
        f.spread_failure = Some(format!("8 creates landed {counts:?}: {landed:?}; A's view before each: {views:?}"));
    }
    for (node, ids) in &by_node {
        let held = f.sessions_in(node).await?;
        for id in ids {
            ensure!(held.contains(id), "{id} (tag of {node}) has no container in {node}'s engine: {held:?}");
        }
    }
    took.sort();
    f.report.push(("create through replica A (median of 8)".into(), took[4]));
    f.report.push(("create through replica A (slowest of 8)".into(), took[7]));

    // Execute latency: one hop (replica B on node2 → node2's agent), across nodes (A on node1 → node2),
    // and through the proxy in front.
    let id = by_node["node2"][0].clone();
    f.api.exec(&id, "x = 1").await?;
    for (what, api) in [("replica B (node2) → agent node2", &f.b), ("replica A (node1) → agent node2", &f.a)] {
        let mut took = Vec::new();
        for _ in 0..10 {
            let started = Instant::now();
            api.exec(&id, "x += 1").await?;
            took.push(started.elapsed());
        }
        took.sort();
        f.report.push((format!("execute via {what} (median of 10)"), took[5]));
    }
    let mut took = Vec::new();
    for _ in 0..10 {
        let started = Instant::now();
        f.api.exec(&id, "x += 1").await?;
        took.push(started.elapsed());
    }
    took.sort();
    f.report.push(("execute via proxy → replica → agent (median of 10)".into(), took[5]));
    ensure!(f.a.exec(&id, "print(x)").await?.trim() == "31", "the session kept its state across replicas");
    Ok(by_node.remove("node3").unwrap_or_default())
}

/// Scenario 10: the boundary across nodes.
async fn boundary(f: &mut Fixture) -> anyhow::Result<()> {
    let ids: Vec<String> = f.sessions_in("node3").await?;
    let id = ids.first().ok_or_else(|| anyhow!("no session on node3"))?;
    // Only lo inside a worker's session.
    let out = f.api.exec(id, "import os; print(sorted(os.listdir('/sys/class/net')))").await?;
    ensure!(out.trim() == "['lo']", "interfaces inside a session on node3: {out}");
    // Nothing of the overlay, the other nodes, the agents or Swarm's ports is reachable.
    let mut targets: Vec<(String, u16)> = Vec::new();
    for node in &f.cluster.nodes {
        for port in [2377, 7946, 4789, 8080, 2375] {
            targets.push((node.ip.to_string(), port));
        }
    }
    for addr in f.cluster.resolve_in_task("node1", API_SERVICE, &format!("tasks.{AGENT_SERVICE}")).await? {
        targets.push((addr.to_string(), AGENT_PORT));
    }
    let code = format!(
        "import socket\nreached = []\nfor h, p in {}:\n    s = socket.socket()\n    s.settimeout(1)\n    try:\n        s.connect((h, p))\n        reached.append((h, p))\n    except OSError:\n        pass\n    finally:\n        s.close()\nprint(reached)",
        serde_json::to_string(&targets)?
    );
    let out = f.api.exec(id, &code).await?;
    ensure!(out.trim() == "[]", "a session on node3 reached {out}");

    // A container on the overlay without the API's certificate: the agents' TLS refuses it. The overlay
    // is not attachable, so the intruder is a service of its own on node2 (the python image: it has an
    // HTTPS client), holding the CA and the agent's certificate (a server certificate, not the API role's).
    // The API's certificate, tried last, is the control: the same script is served with it.
    let certs = f.cluster.socket_root().join("certs");
    let mut secrets = Vec::new();
    for file in ["ca.pem", "agent.pem", "agent-key.pem", "api.pem", "api-key.pem"] {
        let name = format!("kbi-{file}");
        let id = f.cluster.create_secret(&name, &std::fs::read(certs.join(file))?).await?;
        secrets.push((id, name, file.to_owned()));
    }
    let python = crate::harness::images::kernel_image("python");
    let on_node2 = Placement::Replicated { replicas: 1, constraints: vec!["node.hostname==node2".into()] };
    let mut intruder = ServiceDef::new(INTRUDER, &python, on_node2);
    intruder.entrypoint = Some(vec!["sleep".into(), "3600".into()]);
    intruder.networks = vec![stack::OVERLAY.into()];
    intruder.secrets = secrets;
    f.cluster.deploy(&intruder).await?;
    f.cluster.wait_running(INTRUDER, &["node2"], Duration::from_secs(60)).await?;
    let addrs = f.cluster.resolve_in_task("node2", INTRUDER, &format!("tasks.{AGENT_SERVICE}")).await?;
    ensure!(addrs.len() == 2, "tasks.{AGENT_SERVICE} from the intruder: {addrs:?}");
    for addr in addrs {
        let script = INTRUDER_SCRIPT.replace("URL", &format!("https://{addr}:{AGENT_PORT}/internal/v1/info"));
        let (code, out) = f.cluster.exec_in_task("node2", INTRUDER, &["python3", "-c", &script]).await?;
        ensure!(
            code == 0 && out.lines().collect::<Vec<_>>() == ["None refused", "agent refused", "api served"],
            "the agent at {addr} to an intruder on the overlay: {code} {out}"
        );
    }

    // The API replicas have no Docker socket.
    for node in ["node1", "node2"] {
        let (code, out) = f
            .cluster
            .exec_in_task(node, API_SERVICE, &["sh", "-c", "ls -la /var/run/docker.sock /run/docker.sock 2>&1; true"])
            .await?;
        ensure!(code == 0 && !out.contains("srw"), "replica on {node} sees a Docker socket: {out}");
    }
    Ok(())
}

/// Scenario 3: node3 killed. Returns node3's old sessions and the node2 session that kept running.
async fn node_loss(f: &mut Fixture, on_node3: &[String]) -> anyhow::Result<(Vec<String>, String)> {
    ensure!(!on_node3.is_empty(), "no session on node3 to lose");
    let survivor = session_on(f, "node2").await?;
    node_loss_with(f, on_node3, survivor).await
}

async fn node_loss_with(
    f: &mut Fixture,
    on_node3: &[String],
    survivor: String,
) -> anyhow::Result<(Vec<String>, String)> {
    f.api.exec(&survivor, "n = 0").await?;
    // The loop on node2: through the one address, every execute answers and counts on.
    let stop = Arc::new(AtomicBool::new(false));
    let looping = {
        let (api, id, stop) = (f.api.clone(), survivor.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            let mut slowest = Duration::ZERO;
            while !stop.load(Ordering::Relaxed) {
                let started = Instant::now();
                let out = api.exec(&id, "n += 1; print(n)").await?;
                slowest = slowest.max(started.elapsed());
                n += 1;
                ensure!(out.trim() == n.to_string(), "execute {n} on node2 printed {out:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            anyhow::Ok((n, slowest))
        })
    };
    let victim = on_node3[0].clone();
    ensure!(f.api.get(&victim).await?.status == 200, "node3's session answers before the kill");

    let killed = Instant::now();
    f.cluster.kill_node("node3").await?;
    let mut unreachable_at = None;
    let mut lost_at = None;
    let mut missing_seen = None;
    let deadline = Duration::from_secs(stack().lost_after_s + 10);
    while lost_at.is_none() {
        let a = f.api.get(&victim).await?;
        match (a.status, a.code()) {
            (200, _) => {}
            (503, "node_unreachable") => {
                unreachable_at.get_or_insert(killed.elapsed());
                if missing_seen.is_none() {
                    let list = f.api.call(reqwest::Method::GET, "/v1/sessions", None).await?;
                    ensure!(list.status == 200, "the list while node3 is down: {} {}", list.status, list.body);
                    missing_seen = list.missing.clone();
                }
            }
            (410, "session_lost") => lost_at = Some(killed.elapsed()),
            (s, _) => bail!("node3's session answered {s} {} after {:?}", a.body, killed.elapsed()),
        }
        ensure!(killed.elapsed() < deadline, "node3's session not lost within {deadline:?} ({unreachable_at:?})");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let unreachable_at = unreachable_at.ok_or_else(|| anyhow!("never 503 before 410"))?;
    f.report.push(("fault: node3 killed → its session 503 node_unreachable".into(), unreachable_at));
    f.report.push(("fault: node3 killed → its session 410 session_lost".into(), lost_at.unwrap()));
    // How fast is a figure (the report and bench/BENCHMARKS.md: 1.7 s on a quiet machine, the issue's
    // target is 2 s); what must hold is the order: a dead node's sessions answer 503 (retry) well before
    // they can be declared lost, never 410 first and never a hang.
    let before_lost = Duration::from_secs(stack().lost_after_s);
    ensure!(unreachable_at < before_lost, "503 after {unreachable_at:?}, not before lost_after ({before_lost:?})");
    let node3 = f.tag("node3").to_string();
    ensure!(
        missing_seen.as_deref().is_some_and(|m| m.split(',').any(|t| t == node3)),
        "the list while node3 was down named {missing_seen:?} missing, not {node3}"
    );
    // Every session of node3, through both replicas (each decides Lost from its own probes).
    for id in on_node3 {
        for replica in [&f.a, &f.b] {
            loop {
                let a = replica.get(id).await?;
                if a.status == 410 && a.code() == "session_lost" {
                    break;
                }
                ensure!(a.status == 503, "{id} on node3 answers {} {} through {}", a.status, a.body, replica.base);
                ensure!(killed.elapsed() < deadline, "{id} not 410 through {} within {deadline:?}", replica.base);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    f.report.push(("fault: node3 killed → all its sessions 410 through both replicas".into(), killed.elapsed()));
    // New sessions: all on node2.
    for _ in 0..3 {
        let id = f.api.create().await?;
        ensure!(f.node_of(&id).as_deref() == Some("node2"), "a create with node3 lost landed on {id}");
        f.api.call(reqwest::Method::DELETE, &format!("/v1/sessions/{id}"), None).await?;
    }
    stop.store(true, Ordering::Relaxed);
    let (n, slowest) = looping.await??;
    ensure!(n >= 10, "only {n} executes on node2 during the loss");
    f.report.push((format!("fault: node2 loop during the loss ({n} executes), slowest"), slowest));
    Ok((on_node3.to_vec(), survivor))
}

/// Scenario 4: node3 restarted. Its agent comes back; its old sessions stay 410 and their containers are
/// gone; new sessions can land on node3 again.
async fn node_return(f: &mut Fixture, old: &[String], survivor: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    f.cluster.restart_node("node3").await?;
    f.cluster.wait_ready(&["node3".to_owned()], Duration::from_secs(60)).await?;
    f.cluster.wait_running(AGENT_SERVICE, &["node2", "node3"], Duration::from_secs(90)).await?;
    f.wait_agents(&["node2", "node3"], Duration::from_secs(90)).await?;
    f.report.push(("fault: node3 restarted → both replicas see its agent ready".into(), started.elapsed()));
    for id in old {
        let a = f.api.get(id).await?;
        ensure!(a.status == 410 && a.code() == "session_lost", "{id} after node3's return: {} {}", a.status, a.body);
    }
    let held = f.sessions_in("node3").await?;
    for id in old {
        ensure!(!held.contains(id), "{id}'s container is still in node3's engine after its return");
    }
    // node3 holds nothing, node2 several: the next creates land on node3.
    let mut landed = Vec::new();
    for _ in 0..2 {
        let id = f.api.create().await?;
        landed.push(f.node_of(&id).unwrap_or_default());
        if landed.last().map(String::as_str) == Some("node3") {
            ensure!(f.api.exec(&id, "print(6*7)").await?.trim() == "42", "a session on the returned node3 runs");
            break;
        }
    }
    ensure!(landed.iter().any(|n| n == "node3"), "no create landed on the returned node3: {landed:?}");
    ensure!(f.api.exec(survivor, "print(n > 0)").await?.trim() == "True", "node2's session kept its state");
    Ok(())
}

/// Scenario 7: replica B's container killed. Calls through the one address keep working (the proxy
/// takes the next replica; a client opens a connection per call, as through any TCP balancer) and no
/// session is lost; Swarm brings B back.
async fn replica_loss(f: &mut Fixture, id: &str) -> anyhow::Result<()> {
    f.api.exec(id, "r = 0").await?;
    let b = f.cluster.task_container("node2", API_SERVICE).await?;
    let killed = Instant::now();
    f.cluster.kill_in_node("node2", &b).await?;
    for i in 1..=10 {
        let out = f.api.exec(id, "r += 1; print(r)").await?;
        ensure!(out.trim() == i.to_string(), "execute {i} through the one address with B dead: {out:?}");
    }
    let created = f.api.create().await?;
    f.api.call(reqwest::Method::DELETE, &format!("/v1/sessions/{created}"), None).await?;
    f.report
        .push(("fault: replica B killed → 10 executes + a create through the one address".into(), killed.elapsed()));
    // B comes back (a new task on node2) and serves again.
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let back = f.cluster.task_container("node2", API_SERVICE).await.ok().filter(|c| *c != b);
        if back.is_some() && f.b.exec(id, "print(r)").await.is_ok_and(|out| out.trim() == "10") {
            break;
        }
        ensure!(Instant::now() < deadline, "replica B did not come back within 90 s");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    f.report.push(("fault: replica B killed → a new B serves the session".into(), killed.elapsed()));
    Ok(())
}

/// Scenario 6: the agent's container inside node2 killed. Swarm starts another; an execute in flight
/// ends with a clear error (not a hang); the session is adopted and the next execute sees its state. The
/// new agent serves only once the old one is gone (the lock: Swarm starts it after the old one died, and
/// it says it waited when it did not get the lock at once).
async fn agent_restart(f: &mut Fixture, id: &str) -> anyhow::Result<()> {
    f.api.exec(id, "kept = 'yes'").await?;
    let old = f.cluster.task_container("node2", AGENT_SERVICE).await?;
    let in_flight = {
        let (api, id) = (f.api.clone(), id.to_owned());
        tokio::spawn(async move {
            let body = json!({"code": "import time; time.sleep(4); print('slept')"});
            api.call(reqwest::Method::POST, &format!("/v1/sessions/{id}/execute"), Some(body)).await
        })
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    let killed = Instant::now();
    f.cluster.kill_in_node("node2", &old).await?;
    let answer =
        tokio::time::timeout(Duration::from_secs(30), in_flight).await.context("the execute in flight hung")??;
    match answer {
        Ok(a) => ensure!(
            a.status >= 500 && !a.code().is_empty(),
            "the execute in flight when its agent died answered {} {}",
            a.status,
            a.body
        ),
        // The replica cut the stream: also an error the client sees at once.
        Err(e) => eprintln!("[cluster] the execute in flight ended with {e:#}"),
    }
    f.report.push(("fault: agent killed → the execute in flight ends".into(), killed.elapsed()));
    let deadline = killed + Duration::from_secs(90);
    loop {
        if let Ok(out) = f.api.exec(id, "print(kept)").await {
            ensure!(out.trim() == "yes", "the adopted session printed {out:?}");
            break;
        }
        ensure!(Instant::now() < deadline, "node2's session not served again within 90 s of its agent's death");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    f.report.push(("fault: agent killed → the session adopted, state kept".into(), killed.elapsed()));
    let agents = f.cluster.containers_in("node2", &[&format!("com.docker.swarm.service.name={AGENT_SERVICE}")]).await?;
    ensure!(agents.len() == 1 && agents[0] != old, "agents running on node2 after the restart: {agents:?}");
    Ok(())
}

/// A new session on `node`: creates until one lands there (placement goes to the least loaded node, so
/// the others are kept until then, each making the other nodes fuller), then deletes the others.
async fn session_on(f: &Fixture, node: &str) -> anyhow::Result<String> {
    let mut elsewhere = Vec::new();
    let mut found = None;
    for _ in 0..12 {
        let id = f.api.create().await?;
        if f.node_of(&id).as_deref() == Some(node) {
            found = Some(id);
            break;
        }
        elsewhere.push(id);
    }
    for id in &elsewhere {
        f.api.call(reqwest::Method::DELETE, &format!("/v1/sessions/{id}"), None).await?;
    }
    found.ok_or_else(|| anyhow!("twelve creates, none on {node}"))
}

/// Polls `id` until it answers `status`; fails on any answer but 200 and `allowed` on the way.
async fn until_status(
    f: &Fixture,
    id: &str,
    status: u16,
    allowed: &[u16],
    timeout: Duration,
) -> anyhow::Result<Duration> {
    let started = Instant::now();
    loop {
        let a = f.api.get(id).await?;
        if a.status == status {
            return Ok(started.elapsed());
        }
        ensure!(
            a.status == 200 || allowed.contains(&a.status),
            "{id} answered {} {} on the way to {status}",
            a.status,
            a.body
        );
        ensure!(started.elapsed() < timeout, "{id} not {status} within {timeout:?}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Scenario 5: node3 cut off the network. Shorter than lost_after: 503 while cut, then the same session
/// answers with its state. Longer: 410, and after the reconnect node3's agent removes the old containers
/// (it fences itself) while their ids still answer 410.
async fn partition(f: &mut Fixture) -> anyhow::Result<()> {
    let lost_after = Duration::from_secs(stack().lost_after_s);
    let id = session_on(f, "node3").await?;
    f.api.exec(&id, "p = 5").await?;
    let cut = Instant::now();
    f.cluster.disconnect_node("node3").await?;
    let unreachable = until_status(f, &id, 503, &[], Duration::from_secs(5)).await?;
    f.report.push(("partition: node3 cut → its session 503".into(), unreachable));
    while cut.elapsed() < SHORT_CUT {
        let a = f.api.get(&id).await?;
        ensure!(a.status == 503, "{id} while cut for less than lost_after: {} {}", a.status, a.body);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    f.cluster.connect_node("node3").await?;
    let healed = Instant::now();
    loop {
        if let Ok(out) = f.api.exec(&id, "print(p)").await {
            ensure!(out.trim() == "5", "after a short partition {id} printed {out:?}");
            break;
        }
        ensure!(
            healed.elapsed() < lost_after,
            "{id} not served again within lost_after ({lost_after:?}) of the reconnect"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    f.report.push(("partition: short cut healed → the session answers again".into(), healed.elapsed()));

    let cut = Instant::now();
    f.cluster.disconnect_node("node3").await?;
    let lost = until_status(f, &id, 410, &[503], lost_after + Duration::from_secs(20)).await?;
    f.report.push(("partition: node3 cut → its session 410".into(), lost));
    // Past lost_after on the agent's side too, whatever the replicas decided.
    let hold = lost_after + Duration::from_secs(2);
    if cut.elapsed() < hold {
        tokio::time::sleep(hold - cut.elapsed()).await;
    }
    f.cluster.connect_node("node3").await?;
    let healed = Instant::now();
    loop {
        let held = f.sessions_in("node3").await?;
        if !held.contains(&id) {
            break;
        }
        ensure!(healed.elapsed() < Duration::from_secs(60), "{id}'s container still in node3 60 s after the reconnect");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    f.report.push(("partition: long cut healed → node3 removed the old container".into(), healed.elapsed()));
    f.wait_agents(&["node2", "node3"], Duration::from_secs(60)).await?;
    for replica in [&f.a, &f.b] {
        let a = replica.get(&id).await?;
        ensure!(
            a.status == 410 && a.code() == "session_lost",
            "{id} after the long cut healed: {} {}",
            a.status,
            a.body
        );
    }
    Ok(())
}

/// Each node's sessions as a replica sees them (its `/metrics`), for a failure message.
async fn node_sessions_seen_by(replica: &Api) -> Vec<String> {
    let Ok(r) = replica.http.get(format!("{}/metrics", replica.base)).send().await else { return Vec::new() };
    let text = r.text().await.unwrap_or_default();
    text.lines().filter(|l| l.starts_with("kernelbox_node_sessions")).map(str::to_owned).collect()
}

/// Scenario 8: warm pools per node. The operator gives every agent a pool of one python kernel (a rolling
/// update of the agent service: Swarm replaces each node's agent in turn, stopping the old one first, and
/// the new one adopts its sessions); once both nodes report a warm kernel, two creates at once go one to
/// each node, both served from its pool, as each node's pool hits in a replica's `/metrics` show.
async fn pools(f: &mut Fixture) -> anyhow::Result<()> {
    let kept = session_on(f, "node2").await?;
    f.api.exec(&kept, "u = 'kept'").await?;
    let mut args = f.cluster.service_args(AGENT_SERVICE).await?;
    let at = args.iter().position(|a| a == "--pool").ok_or_else(|| anyhow!("no --pool in {args:?}"))?;
    args[at + 1] = "python=1".into();
    let mut before = HashMap::new();
    for node in ["node2", "node3"] {
        before.insert(node, f.cluster.task_container(node, AGENT_SERVICE).await?);
    }
    let started = Instant::now();
    f.cluster.update_args(AGENT_SERVICE, args).await?;
    let (t2, t3) = (f.tag("node2").to_string(), f.tag("node3").to_string());
    loop {
        let mut replaced = true;
        for node in ["node2", "node3"] {
            let now = f.cluster.task_container(node, AGENT_SERVICE).await.ok();
            replaced &= now.is_some_and(|c| c != before[node]);
        }
        let mut warm = true;
        for replica in [&f.a, &f.b] {
            let seen = node_metric(replica, "kernelbox_node_warm", "python").await;
            warm &= [&t2, &t3].iter().all(|t| seen.get(*t).copied().unwrap_or(0.0) >= 1.0);
        }
        if replaced && warm {
            break;
        }
        ensure!(
            started.elapsed() < Duration::from_secs(180),
            "the agents' rolling update to a pool of one: replaced {replaced}, both warm {warm}\n{}",
            service_logs(&f.cluster).await
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    f.report.push(("pools: rolling update of both agents → both nodes warm".into(), started.elapsed()));
    ensure!(
        f.api.exec(&kept, "print(u)").await?.trim() == "kept",
        "node2's session kept its state through its agent's replacement"
    );

    let hits_before = node_metric(&f.a, "kernelbox_node_pool_hits_total", "python").await;
    let started = Instant::now();
    let (x, y) = tokio::join!(f.a.create(), f.a.create());
    let (x, y) = (x?, y?);
    f.report.push(("pools: two creates at once, both from a pool".into(), started.elapsed()));
    let mut landed = vec![f.node_of(&x).unwrap_or_default(), f.node_of(&y).unwrap_or_default()];
    landed.sort();
    ensure!(landed == ["node2", "node3"], "two creates with one warm kernel per node landed on {landed:?}");
    // Each node's pool served one: its agent's count, as the replica last probed it.
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let hits = node_metric(&f.a, "kernelbox_node_pool_hits_total", "python").await;
        let gained = |t: &String| hits.get(t).copied().unwrap_or(0.0) - hits_before.get(t).copied().unwrap_or(0.0);
        if gained(&t2) == 1.0 && gained(&t3) == 1.0 {
            break;
        }
        ensure!(Instant::now() < deadline, "pool hits per node before {hits_before:?}, after {hits:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    for id in [&x, &y, &kept] {
        f.api.call(reqwest::Method::DELETE, &format!("/v1/sessions/{id}"), None).await?;
    }
    Ok(())
}

/// Scenario 9: images. node3 without the current python image (its tag removed from node3's engine; the
/// image kept under another name) gets no python session and says why; with node2 without it too, a
/// create answers 503 `no_node_available`; with the image back, creates land on both again.
async fn images(f: &mut Fixture) -> anyhow::Result<()> {
    let python = crate::harness::images::kernel_image("python");
    let (repo, tag) = (format!("kbtest-hidden-{}", f.cluster.run_id), "python".to_owned());
    let hidden = format!("{repo}:{tag}");
    let hide = |node: &'static str| {
        let (docker, python, repo, tag) =
            (f.cluster.node(node).docker.clone(), python.clone(), repo.clone(), tag.clone());
        async move {
            let options = TagImageOptionsBuilder::default().repo(&repo).tag(&tag).build();
            docker.tag_image(&python, Some(options)).await?;
            let options = RemoveImageOptionsBuilder::default().noprune(true).build();
            docker.remove_image(&python, Some(options), None).await?;
            anyhow::Ok(())
        }
    };
    let restore = |node: &'static str| {
        let (docker, python, hidden) = (f.cluster.node(node).docker.clone(), python.clone(), hidden.clone());
        async move {
            let (repo, tag) = python.rsplit_once(':').ok_or_else(|| anyhow!("{python} has no tag"))?;
            let options = TagImageOptionsBuilder::default().repo(repo).tag(tag).build();
            docker.tag_image(&hidden, Some(options)).await?;
            let options = RemoveImageOptionsBuilder::default().noprune(true).build();
            docker.remove_image(&hidden, Some(options), None).await?;
            anyhow::Ok(())
        }
    };
    let t3 = f.tag("node3").to_string();
    hide("node3").await?;
    let started = Instant::now();
    // Both replicas learn it from node3's next reports (the agent looks at its images every few seconds).
    loop {
        let mut said = true;
        for replica in [&f.a, &f.b] {
            let r = replica.http.get(format!("{}/readyz", replica.base)).send().await?;
            let body: Value = r.json().await.unwrap_or(Value::Null);
            let reasons = body["nodes"][&t3]["reasons"].as_array().cloned().unwrap_or_default();
            let says = |r: &Value| r.as_str().is_some_and(|r| r.starts_with("python: ") && r.contains("not built"));
            said &= reasons.iter().any(says);
        }
        if said {
            break;
        }
        ensure!(started.elapsed() < Duration::from_secs(30), "the replicas never saw node3 without python");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    f.report.push(("images: python untagged on node3 → both replicas know".into(), started.elapsed()));
    let mut made = Vec::new();
    for _ in 0..4 {
        let id = f.api.create().await?;
        ensure!(f.node_of(&id).as_deref() == Some("node2"), "a python create landed on {id} with node3 imageless");
        made.push(id);
    }
    hide("node2").await?;
    let started = Instant::now();
    loop {
        let a = f.api.call(reqwest::Method::POST, "/v1/sessions", Some(json!({"language": "python"}))).await?;
        if a.status == 503 && a.code() == "no_node_available" {
            break;
        }
        if a.status == 201 {
            // node2's report is a few seconds old: that create went through, the agent itself had no
            // image... or it did, the report being older than the untagging. Either way, it is not kept.
            if let Some(id) = a.body["id"].as_str() {
                f.api.call(reqwest::Method::DELETE, &format!("/v1/sessions/{id}"), None).await?;
            }
        }
        ensure!(
            a.status == 201 || a.status == 503,
            "a create with no node holding python answered {} {}",
            a.status,
            a.body
        );
        ensure!(started.elapsed() < Duration::from_secs(30), "never 503 no_node_available: {} {}", a.status, a.body);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    f.report.push(("images: python untagged on both → 503 no_node_available".into(), started.elapsed()));
    restore("node2").await?;
    restore("node3").await?;
    let started = Instant::now();
    f.wait_agents(&["node2", "node3"], Duration::from_secs(30)).await?;
    loop {
        let a = f.api.call(reqwest::Method::POST, "/v1/sessions", Some(json!({"language": "python"}))).await?;
        if a.status == 201 {
            let id = a.body["id"].as_str().unwrap_or_default().to_owned();
            ensure!(f.api.exec(&id, "print(6*7)").await?.trim() == "42", "a session after the image came back runs");
            made.push(id);
            break;
        }
        ensure!(started.elapsed() < Duration::from_secs(30), "no create with the image back: {} {}", a.status, a.body);
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    for id in &made {
        f.api.call(reqwest::Method::DELETE, &format!("/v1/sessions/{id}"), None).await?;
    }
    Ok(())
}

/// Scenario 6's invariant, over the whole run: at no time did two agents serve `node`. Each agent task
/// that ever ran there (Swarm keeps the exited ones) served from its "agent ready" line to its "agent
/// stopped" line (it holds the state directory's lock until just after) or, when it was killed, its end; no two
/// such spans overlap. (Up to 250 ms of slack for a killed agent, whose end the engine stamps a moment
/// after the process is gone and the lock with it.)
async fn one_agent_at_a_time(f: &Fixture, node: &str) -> anyhow::Result<()> {
    use bollard::query_parameters::{InspectContainerOptions, LogsOptionsBuilder};
    use chrono::{DateTime, Utc};
    use futures::StreamExt;
    let docker = &f.cluster.node(node).docker;
    let label = format!("com.docker.swarm.service.name={AGENT_SERVICE}");
    let filters = HashMap::from([("label", vec![label.as_str()])]);
    let listed = docker
        .list_containers(Some(ListContainersOptionsBuilder::default().all(true).filters(&filters).build()))
        .await?;
    let stamp = |line: &str, what: &str| -> Option<DateTime<Utc>> {
        let (at, rest) = line.split_once(' ')?;
        rest.contains(what).then(|| DateTime::parse_from_rfc3339(at).ok().map(|t| t.with_timezone(&Utc))).flatten()
    };
    let mut spans = Vec::new();
    for c in listed {
        let id = c.id.unwrap_or_default();
        let options = LogsOptionsBuilder::default().stdout(true).stderr(true).timestamps(true).build();
        let mut logs = docker.logs(&id, Some(options));
        let (mut ready, mut stopped) = (None, None);
        while let Some(chunk) = logs.next().await {
            for line in chunk?.to_string().lines() {
                ready = ready.or(stamp(line, "agent ready"));
                stopped = stopped.or(stamp(line, "agent stopped"));
            }
        }
        let Some(ready) = ready else { continue };
        let state = docker.inspect_container(&id, None::<InspectContainerOptions>).await?.state.unwrap_or_default();
        let finished = state
            .finished_at
            .filter(|_| state.running != Some(true))
            .and_then(|t| DateTime::parse_from_rfc3339(&t).ok())
            .map(|t| t.with_timezone(&Utc));
        let end = match (stopped, finished) {
            (Some(s), _) => Some(s),
            (None, Some(f)) => Some(f - chrono::Duration::milliseconds(250)),
            (None, None) => None,
        };
        spans.push((id[..12].to_owned(), ready, end));
    }
    spans.sort_by_key(|(_, ready, _)| *ready);
    ensure!(spans.len() >= 2, "{node} saw {} agents serve (a restart at least was expected): {spans:?}", spans.len());
    for pair in spans.windows(2) {
        let ((a, _, a_end), (b, b_ready, _)) = (&pair[0], &pair[1]);
        let a_end = a_end.ok_or_else(|| anyhow!("agent {a} on {node} still runs while {b} serves: {spans:?}"))?;
        ensure!(*b_ready >= a_end, "agents {a} and {b} both served {node} (their spans overlap): {spans:?}");
    }
    eprintln!("[cluster] agents that served {node} in turn: {spans:?}");
    Ok(())
}

/// A per-node metric of `language` in a replica's `/metrics`: node tag → value.
async fn node_metric(replica: &Api, name: &str, language: &str) -> HashMap<String, f64> {
    let Ok(r) = replica.http.get(format!("{}/metrics", replica.base)).send().await else { return HashMap::new() };
    let text = r.text().await.unwrap_or_default();
    let language = format!("language=\"{language}\"");
    text.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(&language))
        .filter_map(|l| {
            let node = l.split("node=\"").nth(1)?.split('"').next()?.to_owned();
            let value = l.rsplit(' ').next()?.parse().ok()?;
            Some((node, value))
        })
        .collect()
}
