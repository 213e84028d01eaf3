//! The cluster in one process, against the real Docker engine and real kernels: two agents
//! (`AgentApplication`, nodes "node-a" and "node-b", each with its own state directory and instance)
//! served over mutual TLS (`cluster::serve_mtls`, certificates from `ClusterCerts::generate`), and two
//! API replicas (`ApiRole` over the mTLS `AgentLink`, the agents' addresses static, keys k1 and k2).
//! Every call goes through a replica: sessions spread over both nodes and are used through either
//! replica (state, streamed outputs, files, lists, another key, delete), the Jupyter gateway with its
//! WebSocket, MCP (run_code, a plot as an image), the session and `/jupyter` APIs; a stopped agent's
//! sessions answer 503 while the other's keep working; the agent's listener serves nothing to a client
//! without the API certificate.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::{SinkExt, StreamExt};
use kernelbox::agent::{AgentApplication, AgentSettings};
use kernelbox::cluster::api_role::{ApiRole, ApiRoleSettings};
use kernelbox::cluster::certs::ClusterCerts;
use kernelbox::cluster::membership::{Discovery, Membership, MembershipConfig, PROBE_TIMEOUT};
use kernelbox::cluster::placement::Policy;
use kernelbox::cluster::tls::{agent_server_config_from_pem, api_client_config_from_pem};
use kernelbox::cluster::{AgentLink, serve_mtls};
use kernelbox::node::NodeTag;
use reqwest::Method;
use serde_json::{Value, json};
use tokio_tungstenite::tungstenite::Message as Ws;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_util::sync::CancellationToken;

use crate::helpers::{
    AppOptions, SharedInstance, docker, ensure_images, eventually, http, instance_containers, settings,
};

const K1: &str = "k1";
const K2: &str = "k2";
/// The DNS name in the agents' certificate.
const AGENT_NAME: &str = "kernelbox-agent";

/// One agent: its node's tag, its mutual-TLS address, its instance (whose containers are removed when
/// it drops, whatever the test did).
struct Agent {
    tag: NodeTag,
    addr: SocketAddr,
    health: String,
    shutdown: CancellationToken,
    running: Option<tokio::task::JoinHandle<()>>,
    instance: SharedInstance,
}

impl Agent {
    async fn start(node_id: &str, certs: &ClusterCerts) -> Agent {
        let instance = SharedInstance::new(node_id);
        let options = AppOptions { shutdown_grace: Duration::from_millis(500), ..AppOptions::default() };
        let settings = settings(options, &instance.name, instance.dir.path());
        let header_read_timeout = settings.http.header_read_timeout;
        let health = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agent = AgentSettings { node_id: Some(node_id.to_owned()), lost_after: Duration::from_secs(60) };
        let app = AgentApplication::new(health, settings, agent, docker().await).await.expect("the agent builds");
        let tls = agent_server_config_from_pem(
            certs.ca.cert_pem.as_bytes(),
            certs.agent.cert_pem.as_bytes(),
            certs.agent.key_pem.as_bytes(),
        )
        .expect("the agent's TLS settings");
        let cluster = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = cluster.local_addr().unwrap();
        let health = format!("http://{}", app.health_addr().unwrap());
        let tag = app.node_tag();
        let shutdown = CancellationToken::new();
        let serving =
            tokio::spawn(serve_mtls(cluster, app.cluster_router(), tls, shutdown.clone(), header_read_timeout));
        let token = shutdown.clone();
        let running = tokio::spawn(async move { app.run_until_stopped(token, serving).await.expect("the agent runs") });
        Agent { tag, addr, health, shutdown, running: Some(running), instance }
    }

    async fn ready(&self) -> bool {
        reqwest::get(format!("{}/readyz", self.health)).await.is_ok_and(|r| r.status() == 200)
    }

    /// This agent's containers, as Docker lists them.
    async fn containers(&self) -> Vec<kernelbox::runtime::ContainerSummary> {
        instance_containers(&self.instance.name).await
    }

    /// Whether a container of this agent belongs to session `id`.
    async fn holds(&self, id: &str) -> bool {
        self.containers().await.iter().any(|c| c.labels.get("kernelbox.session").map(String::as_str) == Some(id))
    }

    /// Stops the agent as SIGTERM would (its listener closes, its sessions stop), and waits for it.
    async fn stop(&mut self) {
        self.shutdown.cancel();
        if let Some(running) = self.running.take() {
            running.await.expect("the agent stopped cleanly");
        }
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.shutdown.cancel();
        // Let the agent stop its sessions itself; the instance guard then removes whatever is left.
        if let Some(running) = self.running.take()
            && let Ok(handle) = tokio::runtime::Handle::try_current()
            && handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
        {
            tokio::task::block_in_place(|| {
                handle.block_on(async {
                    let _ = tokio::time::timeout(Duration::from_secs(30), running).await;
                })
            });
        }
    }
}

/// One API replica: its base URL and its membership (refreshed by tests that cannot wait 2 s).
struct Replica {
    base: String,
    membership: Arc<Membership>,
    stop: CancellationToken,
}

impl Replica {
    async fn start(agents: &[&Agent], certs: &ClusterCerts) -> Replica {
        let tls = api_client_config_from_pem(
            certs.ca.cert_pem.as_bytes(),
            certs.api.cert_pem.as_bytes(),
            certs.api.key_pem.as_bytes(),
        )
        .expect("the replica's TLS settings");
        let link = AgentLink::new(tls, AGENT_NAME).unwrap();
        let settings = ApiRoleSettings {
            api_keys: vec![K1.into(), K2.into()],
            http: http(&[]).validate().unwrap(),
            discovery: Discovery::Static(agents.iter().map(|a| a.addr).collect()),
            membership: MembershipConfig { lost_after: Duration::from_secs(60), probe_timeout: PROBE_TIMEOUT },
            policy: Policy::default(),
            default_memory_mb: 512,
            default_cpus: 1.0,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let replica = ApiRole::build(listener, settings, Arc::new(link)).await;
        let base = format!("http://{}", replica.local_addr().unwrap());
        let membership = replica.membership();
        let stop = CancellationToken::new();
        tokio::spawn(replica.run_until_stopped(stop.clone()));
        Replica { base, membership, stop }
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Two agents and two replicas (A and B) in front of both. Replicas drop first, then the agents.
struct Cluster {
    a: Replica,
    b: Replica,
    agents: Vec<Agent>,
    certs: ClusterCerts,
    client: reqwest::Client,
}

async fn spawn_cluster() -> Cluster {
    ensure_images().await;
    let certs = ClusterCerts::generate(AGENT_NAME, 1).expect("certificates");
    let agents = vec![Agent::start("node-a", &certs).await, Agent::start("node-b", &certs).await];
    for agent in &agents {
        assert!(eventually(Duration::from_secs(60), || agent.ready()).await, "agent {} gets ready", agent.tag);
    }
    let refs: Vec<&Agent> = agents.iter().collect();
    let a = Replica::start(&refs, &certs).await;
    let b = Replica::start(&refs, &certs).await;
    let c = Cluster { a, b, agents, certs, client: reqwest::Client::new() };
    c.probe().await;
    for replica in [&c.a, &c.b] {
        let up = replica.membership.snapshot().up().filter(|(_, m)| m.is_ready()).count();
        assert_eq!(up, 2, "both agents are up and ready for every replica");
    }
    c
}

impl Cluster {
    fn req(&self, replica: &Replica, method: Method, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.client.request(method, format!("{}{path}", replica.base)).header("x-api-key", key)
    }

    /// Lets both replicas' view of the agents catch up (what their 2 s loop does).
    async fn probe(&self) {
        let now = Instant::now();
        self.a.membership.refresh(now).await;
        self.b.membership.refresh(now).await;
    }

    fn agent(&self, tag: NodeTag) -> &Agent {
        self.agents.iter().find(|a| a.tag == tag).unwrap_or_else(|| panic!("no agent has tag {tag}"))
    }

    /// Creates a python session through `replica` with `key`; returns its id.
    async fn create(&self, replica: &Replica, key: &str) -> String {
        let r = self.req(replica, Method::POST, "/v1/sessions", key).json(&json!({"language": "python"})).send();
        let (status, v) = status_json(r.await.unwrap()).await;
        assert_eq!(status, 201, "create: {v}");
        v["id"].as_str().unwrap().to_owned()
    }

    async fn exec(&self, replica: &Replica, id: &str, code: &str) -> Value {
        let r = self.req(replica, Method::POST, &format!("/v1/sessions/{id}/execute"), K1).json(&json!({"code": code}));
        let (status, v) = status_json(r.send().await.unwrap()).await;
        assert_eq!(status, 200, "execute {code:?}: {v}");
        v
    }

    async fn call(&self, replica: &Replica, method: Method, path: &str, key: &str) -> (u16, Value) {
        status_json(self.req(replica, method, path, key).send().await.unwrap()).await
    }

    /// A session API form, as `curl -F` sends it.
    async fn form(&self, replica: &Replica, path: &str, user: &str) -> (u16, Value) {
        let boundary = "------------------------d74496d66958873e";
        let body = format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"user_id\"\r\n\r\n{user}\r\n--{boundary}--\r\n"
        );
        let r = self
            .req(replica, Method::POST, path, K1)
            .header("content-type", format!("multipart/form-data; boundary={boundary}"))
            .body(body);
        status_json(r.send().await.unwrap()).await
    }

    async fn post_json(&self, replica: &Replica, path: &str, body: Value) -> (u16, Value) {
        status_json(self.req(replica, Method::POST, path, K1).json(&body).send().await.unwrap()).await
    }
}

async fn status_json(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

fn tag_of(id: &str) -> NodeTag {
    NodeTag::suffix_of(id).unwrap_or_else(|| panic!("{id} ends with no node tag"))
}

fn ids(list: &Value) -> Vec<String> {
    list.as_array()
        .unwrap_or_else(|| panic!("a list: {list}"))
        .iter()
        .map(|s| s["id"].as_str().unwrap().into())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn v1_sessions_spread_over_both_agents_and_work_through_either_replica() {
    let c = spawn_cluster().await;
    // Creates spread over both agents (each reports its load; the replicas place on the lighter).
    let mut created = Vec::new();
    for replica in [&c.a, &c.b, &c.a, &c.b] {
        created.push(c.create(replica, K1).await);
        c.probe().await;
    }
    for agent in &c.agents {
        let here: Vec<&String> = created.iter().filter(|id| NodeTag::suffix_of(id) == Some(agent.tag)).collect();
        assert_eq!(here.len(), 2, "two of four on {}: {created:?}", agent.tag);
        for id in here {
            assert!(agent.holds(id).await, "{id} runs on the agent its tag names");
        }
    }

    // One session used through both replicas: state, streamed outputs, files.
    let id = c.create(&c.a, K1).await;
    let holder = tag_of(&id);
    assert!(c.agent(holder).holds(&id).await);
    c.exec(&c.b, &id, "x = 6*7").await;
    let v = c.exec(&c.a, &id, "print(x)").await;
    assert_eq!(v["stdout"], "42\n", "{v}");

    let code = "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.4)\n'done'";
    let response = c
        .req(&c.b, Method::POST, &format!("/v1/sessions/{id}/execute"), K1)
        .header("accept", "text/event-stream")
        .json(&json!({"code": code}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut body = response.bytes_stream();
    let (mut text, mut outputs_at, mut result_at) = (String::new(), Vec::new(), None);
    while let Some(chunk) =
        tokio::time::timeout(Duration::from_secs(30), body.next()).await.expect("the stream goes on")
    {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        let now = Instant::now();
        while outputs_at.len() < text.matches("event: output").count() {
            outputs_at.push(now);
        }
        if text.contains("event: result") && text.ends_with("\n\n") {
            result_at = Some(now);
            break;
        }
    }
    let result_at = result_at.unwrap_or_else(|| panic!("no result event: {text}"));
    assert!(outputs_at.len() >= 3, "each print is its own event: {text}");
    let before = text.split("event: result").next().unwrap();
    assert!(before.matches("event: output").count() >= 3, "every print comes before the result: {text}");
    assert!(
        result_at.duration_since(outputs_at[0]) >= Duration::from_millis(600),
        "the first print arrived while the code still ran (not buffered until the end): {text}"
    );
    let result_line = text.lines().skip_while(|l| *l != "event: result").nth(1).unwrap();
    let result: Value = serde_json::from_str(result_line.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!((&result["status"], &result["stdout"]), (&json!("ok"), &json!("0\n1\n2\n")), "{result}");

    let r = c
        .req(&c.a, Method::PUT, &format!("/v1/sessions/{id}/files/data/in.txt"), K1)
        .body("through replica A")
        .send()
        .await
        .unwrap();
    assert!(r.status().is_success(), "upload: {}", r.status());
    let r = c.req(&c.b, Method::GET, &format!("/v1/sessions/{id}/files/data/in.txt"), K1).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "through replica A");
    for replica in [&c.a, &c.b] {
        let (status, listing) = c.call(replica, Method::GET, &format!("/v1/sessions/{id}/files?path=data"), K1).await;
        assert_eq!(status, 200, "{listing}");
        let names: Vec<&str> =
            listing["entries"].as_array().unwrap().iter().map(|e| e["name"].as_str().unwrap()).collect();
        assert_eq!(names, ["in.txt"], "{listing}");
        // The session list, merged from both agents, has all five, and no node is missing.
        let r = c.req(replica, Method::GET, "/v1/sessions", K1).send().await.unwrap();
        assert!(r.headers().get("x-kernelbox-nodes-missing").is_none());
        let mut listed = ids(&r.json().await.unwrap());
        listed.sort();
        let mut all: Vec<String> = created.iter().cloned().chain([id.clone()]).collect();
        all.sort();
        assert_eq!(listed, all);
    }

    // Another key finds none of it, through either replica.
    for replica in [&c.a, &c.b] {
        let (status, v) = c.call(replica, Method::GET, &format!("/v1/sessions/{id}"), K2).await;
        assert_eq!((status, v["error"]["code"].as_str()), (404, Some("not_found")), "{v}");
        let r = c.req(replica, Method::POST, &format!("/v1/sessions/{id}/execute"), K2).json(&json!({"code": "x"}));
        assert_eq!(r.send().await.unwrap().status(), 404);
        let (status, v) = c.call(replica, Method::GET, "/v1/sessions", K2).await;
        assert_eq!((status, v), (200, json!([])));
    }

    // Deleted through B: gone from its agent, and through A.
    let (status, _) = c.call(&c.b, Method::DELETE, &format!("/v1/sessions/{id}"), K1).await;
    assert_eq!(status, 204);
    let agent = c.agent(holder);
    assert!(eventually(Duration::from_secs(30), || async { !agent.holds(&id).await }).await, "its container is gone");
    let (status, _) = c.call(&c.a, Method::GET, &format!("/v1/sessions/{id}"), K1).await;
    assert_eq!(status, 404);
}

/// rustls's ring provider (the project's; its post-quantum-less default is what the product uses too).
#[allow(deprecated)]
fn ring_provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

type Socket = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// Reads the kernel's messages until the reply and the idle status of `msg_id` have both come.
async fn until_idle(ws: &mut Socket, msg_id: &str) -> Vec<Value> {
    let (mut got, mut replied, mut idle) = (Vec::new(), false, false);
    while !(replied && idle) {
        let frame = tokio::time::timeout(Duration::from_secs(60), ws.next()).await;
        let msg: Value = match frame {
            Ok(Some(Ok(Ws::Text(text)))) => serde_json::from_str(&text).unwrap(),
            Ok(Some(Ok(Ws::Ping(_) | Ws::Pong(_)))) => continue,
            other => panic!("the channel ended or stalled ({other:?}) after {got:?}"),
        };
        if msg["parent_header"]["msg_id"] == msg_id {
            replied |= msg["msg_type"] == "execute_reply";
            idle |= msg["msg_type"] == "status" && msg["content"]["execution_state"] == "idle";
        }
        got.push(msg);
    }
    got
}

fn execute_request(code: &str) -> (String, Value) {
    let msg_id = format!("execute-{}", uuid::Uuid::new_v4().simple());
    let msg = json!({
        "channel": "shell",
        "header": {"msg_id": msg_id, "msg_type": "execute_request", "session": "cluster-test", "username": "t",
                   "date": "2026-12-01T10:00:00.000000Z", "version": "5.3"},
        "parent_header": {}, "metadata": {},
        "content": {"code": code, "silent": false, "store_history": true, "user_expressions": {},
                    "allow_stdin": false, "stop_on_error": true},
    });
    (msg_id, msg)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_jupyter_gateway_and_mcp_work_through_a_replica() {
    let c = spawn_cluster().await;
    let token = format!("token {K1}");
    let mut kernels = Vec::new();
    for replica in [&c.a, &c.b] {
        let r = c.client.post(format!("{}/api/kernels", replica.base)).header("authorization", &token);
        let (status, v) = status_json(r.json(&json!({"name": "python3"})).send().await.unwrap()).await;
        assert_eq!(status, 201, "{v}");
        kernels.push(v["id"].as_str().unwrap().to_owned());
        c.probe().await;
    }
    let tags: Vec<NodeTag> = kernels.iter().map(|k| tag_of(&k.replace('-', ""))).collect();
    assert_ne!(tags[0], tags[1], "the two kernels are on the two agents: {kernels:?}");

    // The channels WebSocket through replica A to a kernel (whichever agent holds it).
    let kernel = &kernels[1];
    let url = format!("{}/api/kernels/{kernel}/channels", c.a.base.replace("http://", "ws://"));
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert("authorization", token.parse().unwrap());
    let (mut ws, _) = tokio_tungstenite::connect_async(request).await.expect("the channels upgrade");
    let (msg_id, msg) = execute_request("print('hello through the replica')\n6*7");
    ws.send(Ws::Text(msg.to_string().into())).await.unwrap();
    let got = until_idle(&mut ws, &msg_id).await;
    let stdout: String = got
        .iter()
        .filter(|m| m["msg_type"] == "stream" && m["parent_header"]["msg_id"] == msg_id)
        .filter_map(|m| m["content"]["text"].as_str())
        .collect();
    assert_eq!(stdout, "hello through the replica\n");
    let reply = got.iter().find(|m| m["msg_type"] == "execute_reply").unwrap();
    assert_eq!((&reply["channel"], &reply["content"]["status"]), (&json!("shell"), &json!("ok")), "{reply}");
    let result = got.iter().find(|m| m["msg_type"] == "execute_result").expect("an execute_result");
    assert_eq!(result["content"]["data"]["text/plain"], "42");
    let _ = ws.close(None).await;

    // Interrupt and restart through replica B; the kernel runs after.
    let gateway = |replica: &Replica, method: Method, path: String| {
        c.client.request(method, format!("{}{path}", replica.base)).header("authorization", &token).send()
    };
    let r = gateway(&c.b, Method::POST, format!("/api/kernels/{kernel}/interrupt")).await.unwrap();
    assert_eq!(r.status(), 204);
    let (status, v) =
        status_json(gateway(&c.b, Method::POST, format!("/api/kernels/{kernel}/restart")).await.unwrap()).await;
    assert_eq!((status, v["id"].as_str()), (200, Some(kernel.as_str())), "{v}");
    let session = kernelbox::api::gateway::session_id_on(kernel, Some(tags[1])).expect("the kernel's session");
    let v = c.exec(&c.b, &session, "print(1 + 1)").await;
    assert_eq!(v["stdout"], "2\n", "the restarted kernel runs: {v}");

    // The kernel specs come from any agent.
    let (status, specs) = status_json(gateway(&c.a, Method::GET, "/api/kernelspecs".into()).await.unwrap()).await;
    assert_eq!(status, 200, "{specs}");
    assert!(specs["kernelspecs"]["python3"].is_object(), "{specs}");
    // The kernel list, through either replica, has both (asked of both agents).
    for replica in [&c.a, &c.b] {
        let r = gateway(replica, Method::GET, "/api/kernels".into()).await.unwrap();
        assert!(r.headers().get("x-kernelbox-nodes-missing").is_none());
        let mut listed = ids(&r.json().await.unwrap());
        listed.sort();
        let mut expected = kernels.clone();
        expected.sort();
        assert_eq!(listed, expected);
    }

    // MCP through replica B: the session id names its agent; a run_code call returns its output; the
    // next call of the same MCP session through replica A reaches the same agent.
    let mcp = |replica: &Replica, session: Option<&str>, body: Value| {
        let mut request = c
            .req(replica, Method::POST, "/mcp", K1)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2025-06-18")
            .json(&body);
        if let Some(session) = session {
            request = request.header("mcp-session-id", session);
        }
        request.send()
    };
    let answer = |text: &str, id: u64| {
        text.lines()
            .map(|l| l.strip_prefix("data:").map(str::trim).unwrap_or(l))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|m| m["id"] == id)
            .unwrap_or_else(|| panic!("no answer {id}: {text}"))
    };
    let init = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "cluster-test", "version": "0"}}});
    let r = mcp(&c.b, None, init).await.unwrap();
    assert_eq!(r.status(), 200);
    let session = r.headers()["mcp-session-id"].to_str().unwrap().to_owned();
    let tag = kernelbox::cluster::route::mcp_tag(&session).unwrap_or_else(|| panic!("a tag in {session}"));
    assert!(c.agents.iter().any(|a| a.tag == tag), "{session} names one of the agents");
    assert_eq!(answer(&r.text().await.unwrap(), 1)["result"]["serverInfo"]["name"], "kernelbox");
    let r = mcp(&c.a, Some(&session), json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await.unwrap();
    assert!(r.status().is_success(), "{}", r.status());
    let call = json!({"jsonrpc": "2.0", "id": 2, "method": "tools/call", "params": {"name": "run_code",
        "arguments": {"language": "python", "code": "print('hello from mcp', 6*7)"}}});
    let r = mcp(&c.a, Some(&session), call).await.unwrap();
    assert_eq!(r.status(), 200);
    let result = answer(&r.text().await.unwrap(), 2)["result"].clone();
    assert_eq!(result["isError"], false, "{result}");
    let said: String = result["content"].as_array().unwrap().iter().filter_map(|c| c["text"].as_str()).collect();
    assert!(said.contains("hello from mcp 42"), "{result}");
    // A plot comes back as image content, through replica B this time.
    let plot = "import matplotlib.pyplot as plt\nplt.plot([1, 3, 2])\nplt.show()";
    let call = json!({"jsonrpc": "2.0", "id": 3, "method": "tools/call", "params": {"name": "run_code",
        "arguments": {"language": "python_scientific", "code": plot}}});
    let r = mcp(&c.b, Some(&session), call).await.unwrap();
    assert_eq!(r.status(), 200);
    let result = answer(&r.text().await.unwrap(), 3)["result"].clone();
    assert_eq!(result["isError"], false, "{result}");
    let image = result["content"].as_array().unwrap().iter().find(|c| c["type"] == "image").cloned();
    let image = image.unwrap_or_else(|| panic!("a plot comes back as image content: {result}"));
    assert_eq!(image["mimeType"], "image/png");
    assert!(image["data"].as_str().is_some_and(|d| d.len() > 1000), "a PNG's base64");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_session_and_jupyter_apis_keep_one_node_per_user_and_owner_across_replicas() {
    let c = spawn_cluster().await;
    let started = json!({"message": "Session started successfully",
        "notebook_path": "/mnt/jupyter_sessions/u1/notebook_u1.ipynb"});
    assert_eq!(c.form(&c.a, "/start_session", "u1").await, (200, started.clone()));
    c.probe().await;
    assert_eq!(c.form(&c.b, "/start_session", "u1").await, (200, started));
    let mut holders = Vec::new();
    for agent in &c.agents {
        let n = agent.containers().await.len();
        assert!(n <= 1, "{}: {n} containers", agent.tag);
        if n == 1 {
            holders.push(agent.tag);
        }
    }
    assert_eq!(holders.len(), 1, "one session for the user, on one agent");
    for replica in [&c.a, &c.b] {
        let (status, list) = c.call(replica, Method::GET, "/v1/sessions", K1).await;
        assert_eq!(status, 200);
        let sessions = list.as_array().unwrap();
        assert_eq!(sessions.len(), 1, "{list}");
        assert_eq!(sessions[0]["metadata"]["kernelbox.user_id"], "u1", "{list}");
        assert_eq!(tag_of(sessions[0]["id"].as_str().unwrap()), holders[0]);
    }
    let (status, v) = c.post_json(&c.a, "/execute", json!({"user_id": "u1", "code": "x = 41"})).await;
    assert_eq!((status, v), (200, json!({"output": ""})));
    let (status, v) = c.post_json(&c.b, "/execute", json!({"user_id": "u1", "code": "print(x + 1)"})).await;
    assert_eq!((status, v), (200, json!({"output": "42\n"})), "replica B reaches the same kernel");
    let (status, v) = c.post_json(&c.b, "/execute", json!({"user_id": "nobody", "code": "1"})).await;
    assert_eq!(status, 404, "{v}");
    assert!(v["detail"].is_string(), "the session API's shape: {v}");

    // `/jupyter`: a file uploaded through A is at /mnt/files for code run through B.
    let upload = json!({"filename": "data", "extension": "csv", "content": "MSwyLDMKNCw1LDY="});
    let r = c.req(&c.a, Method::PUT, "/jupyter/files", K1).json(&upload).send().await.unwrap();
    let (status, v) = status_json(r).await;
    assert_eq!(status, 200, "{v}");
    let url = v["url"].as_str().unwrap().to_owned();
    assert!(
        url.starts_with(&format!("{}/jupyter/files/", c.a.base)),
        "the link names the replica it came through: {url}"
    );
    let name = url.rsplit('/').next().unwrap().to_owned();
    let file_node = kernelbox::store::node_of(&name).unwrap_or_else(|| panic!("a tag in {name}"));
    assert!(c.agents.iter().any(|a| a.tag == file_node), "{name}");
    let code = format!("print(open('/mnt/files/{name}').read())");
    let (status, v) = c
        .post_json(&c.b, "/jupyter/execute", json!({"code": code, "execution_environment": "python", "timeout": 60}))
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!((&v["output"], &v["error"]), (&json!("1,2,3\n4,5,6\n"), &Value::Null), "{v}");
    let r = c.req(&c.b, Method::GET, &format!("/jupyter/files/{name}"), K1).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "1,2,3\n4,5,6");
    let r = c.req(&c.b, Method::GET, &format!("/jupyter/files/{name}"), K2).send().await.unwrap();
    assert_eq!(r.status(), 404, "another key's file");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stopped_agent_answers_503_while_the_other_keeps_working() {
    let mut c = spawn_cluster().await;
    let mut created = Vec::new();
    for replica in [&c.a, &c.b] {
        created.push(c.create(replica, K1).await);
        c.probe().await;
    }
    let [on_stopped, on_live] = [created[0].clone(), created[1].clone()];
    let stopped_tag = tag_of(&on_stopped);
    assert_ne!(tag_of(&on_live), stopped_tag, "two creates with fresh reports land on both agents");
    c.exec(&c.a, &on_live, "y = 'still here'").await;

    let stopped = c.agents.iter_mut().find(|a| a.tag == stopped_tag).unwrap();
    stopped.stop().await;
    assert!(stopped.containers().await.is_empty(), "a stopped agent stops its sessions");
    c.probe().await;

    for replica in [&c.a, &c.b] {
        let (status, v) = c.call(replica, Method::GET, &format!("/v1/sessions/{on_stopped}"), K1).await;
        assert_eq!((status, v["error"]["code"].as_str()), (503, Some("node_unreachable")), "{v}");
        let r = c.req(replica, Method::POST, &format!("/v1/sessions/{on_stopped}/execute"), K1);
        let r = r.json(&json!({"code": "1"})).send().await.unwrap();
        assert_eq!(r.status(), 503);
        assert_eq!(r.headers()["retry-after"], "2");
        let v = c.exec(replica, &on_live, "print(y)").await;
        assert_eq!(v["stdout"], "still here\n", "{v}");
        let r = c.req(replica, Method::GET, "/v1/sessions", K1).send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-kernelbox-nodes-missing"], stopped_tag.as_str());
        assert_eq!(ids(&r.json().await.unwrap()), std::slice::from_ref(&on_live));
    }
    // New sessions go to the agent that is left.
    let id = c.create(&c.b, K1).await;
    assert_ne!(tag_of(&id), stopped_tag);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_agents_listener_serves_nothing_to_a_client_without_the_api_certificate() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let c = spawn_cluster().await;
    let agent = &c.agents[0];
    let request = format!("GET {} HTTP/1.1\r\nHost: {AGENT_NAME}\r\n\r\n", kernelbox::node::INFO_PATH);

    // Plain HTTP.
    let mut tcp = tokio::net::TcpStream::connect(agent.addr).await.unwrap();
    tcp.write_all(request.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    let read = tokio::time::timeout(Duration::from_secs(15), tcp.read_to_end(&mut answer)).await;
    assert!(read.is_ok(), "the agent closes the connection");
    assert!(!answer.starts_with(b"HTTP"), "{:?}", String::from_utf8_lossy(&answer));

    // TLS that trusts the agent but shows no certificate.
    let roots = {
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        let ca = rustls::pki_types::CertificateDer::from_pem_slice(c.certs.ca.cert_pem.as_bytes());
        roots.add(ca.unwrap()).unwrap();
        roots
    };
    let provider = ring_provider();
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(agent.addr).await.unwrap();
    let name = rustls::pki_types::ServerName::try_from(AGENT_NAME).unwrap();
    let mut answer = Vec::new();
    if let Ok(mut tls) = connector.connect(name, tcp).await {
        let _ = tls.write_all(request.as_bytes()).await;
        let read = tokio::time::timeout(Duration::from_secs(15), tls.read_to_end(&mut answer)).await;
        assert!(read.is_ok(), "the agent closes the connection");
    }
    assert!(!answer.starts_with(b"HTTP"), "{:?}", String::from_utf8_lossy(&answer));

    // An API certificate of another cluster's CA; and this cluster's agent certificate used as a client's.
    let other = ClusterCerts::generate(AGENT_NAME, 1).unwrap();
    let ca = c.certs.ca.cert_pem.as_bytes();
    for (cert, key) in [(&other.api.cert_pem, &other.api.key_pem), (&c.certs.agent.cert_pem, &c.certs.agent.key_pem)] {
        let tls = api_client_config_from_pem(ca, cert.as_bytes(), key.as_bytes()).unwrap();
        let link = AgentLink::new(tls, AGENT_NAME).unwrap();
        let info = axum::http::Request::get(kernelbox::node::INFO_PATH).body(axum::body::Body::empty()).unwrap();
        let sent = link.send(agent.addr, info).await;
        assert!(sent.is_err(), "refused: {:?}", sent.map(|r| r.status()));
    }

    // The replicas' certificate still works.
    let (status, v) = c.call(&c.a, Method::GET, "/v1/sessions", K1).await;
    assert_eq!((status, v), (200, json!([])));
}

/// Scenario 2b of the cluster: the real clients through one address (a round-robin TCP balancer over both
/// replicas, so consecutive connections of one client reach different replicas). A Jupyter server with
/// `--gateway-url` at that address runs the whole front end of `gateway_jupyter` (kernels in two
/// languages, a plot, interrupt, restart, a notebook) and the reference MCP client its main scenario
/// (every language, a plot, progress, stdin, files, a package, a stranger refused, a cancel); both pass the
/// single-node checks unchanged, both replicas served them, and kernels ran on both agents.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_jupyter_server_and_the_reference_mcp_client_work_through_one_address() {
    let c = spawn_cluster().await;
    let addr = |r: &Replica| r.base.trim_start_matches("http://").parse::<SocketAddr>().unwrap();
    let balancer = crate::proxy::Proxy::start(vec![addr(&c.a), addr(&c.b)]).await.unwrap();
    // Which agents held kernels, watched from their engines while the clients run.
    let stop = CancellationToken::new();
    let watcher = {
        let (stop, instances) = (stop.clone(), c.agents.iter().map(|a| a.instance.name.clone()).collect::<Vec<_>>());
        tokio::spawn(async move {
            let mut held = vec![0usize; instances.len()];
            while !stop.is_cancelled() {
                for (i, instance) in instances.iter().enumerate() {
                    held[i] = held[i].max(instance_containers(instance).await.len());
                }
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
            held
        })
    };
    // The agents' probes keep both replicas' views fresh (their own loops run every 2 s).
    let r = crate::gateway_jupyter::front_end_through(&balancer.url(), K1).await;
    crate::gateway_jupyter::check_front_end(&r);
    let r = crate::mcp::reference_client_at(&balancer.url(), "main", K1, K2).await;
    crate::mcp::check_main_scenario(&r);
    stop.cancel();
    let held = watcher.await.unwrap();
    assert!(held.iter().all(|n| *n > 0), "kernels ran on both agents (most containers seen on each: {held:?})");
    let served = balancer.served();
    assert!(served.iter().all(|n| *n > 0), "both replicas served the clients' connections: {served:?}");
    for agent in &c.agents {
        let name = agent.instance.name.clone();
        assert!(
            eventually(Duration::from_secs(30), || async { instance_containers(&name).await.is_empty() }).await,
            "every kernel the clients ended is gone from {}",
            agent.tag
        );
    }
    balancer.stop().await;
}
