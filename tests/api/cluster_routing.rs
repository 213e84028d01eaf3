//! A real API replica (`kernelbox api`'s router, membership, placement) in front of stand-in agents over
//! plain HTTP (the test-support transport; the product speaks mutual TLS): small in-process servers
//! that report an `AgentInfo`, mint ids ending in their tag, and keep sessions in memory. No Docker:
//! this pins the replica's routing; the real agents are exercised by the cluster suite.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use kernelbox::cluster::api_role::{ApiRole, ApiRoleSettings};
use kernelbox::cluster::membership::{Discovery, Membership, MembershipConfig};
use kernelbox::cluster::placement::Policy;
use kernelbox::cluster::transport::PlainHttp;
use kernelbox::node::{AgentInfo, Capacity, NodeTag, OWNER_HEADER, Usage};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

/// One stand-in agent: its tag and its sessions (owner, json).
#[derive(Clone)]
struct Agent {
    tag: NodeTag,
    sessions: Arc<Mutex<Vec<(String, Value)>>>,
}

fn owner(headers: &HeaderMap) -> Option<String> {
    headers.get(OWNER_HEADER).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

impl Agent {
    fn info(&self) -> AgentInfo {
        let sessions = self.sessions.lock().unwrap();
        let mut owners = BTreeMap::new();
        for (o, _) in sessions.iter() {
            *owners.entry(o.clone()).or_insert(0) += 1;
        }
        AgentInfo {
            node_tag: self.tag,
            node_id: format!("node-{}", self.tag),
            epoch: "e".into(),
            version: "test".into(),
            ready: true,
            reasons: vec![],
            capacity: Capacity { max_sessions: 50, memory_mb: 64 * 1024, cpus: 64.0 },
            usage: Usage {
                sessions: sessions.len() as u32,
                memory_mb: 512 * sessions.len() as u64,
                cpus: sessions.len() as f64,
            },
            owners,
            warm: BTreeMap::new(),
            images: BTreeMap::from([
                ("python".into(), Some("h1".into())),
                ("python_scientific".into(), Some("h2".into())),
            ]),
            pools: BTreeMap::new(),
        }
    }

    fn create(&self, owner: &str, language: &str, metadata: Value) -> Value {
        let mut sessions = self.sessions.lock().unwrap();
        let id = format!("{:016x}{}", sessions.len() as u64 + 1, self.tag);
        let created = format!("2026-01-01T00:00:{:02}Z", sessions.len());
        let s = json!({"id": id, "language": language, "metadata": metadata, "created_at": created});
        sessions.push((owner.to_owned(), s.clone()));
        s
    }

    fn users(&self, owner: &str, user: &str) -> Option<Value> {
        self.sessions
            .lock()
            .unwrap()
            .iter()
            .find(|(o, s)| o == owner && s["metadata"]["kernelbox.user_id"] == user)
            .map(|(_, s)| s.clone())
    }
}

async fn info(State(a): State<Agent>) -> Json<AgentInfo> {
    Json(a.info())
}

async fn create(State(a): State<Agent>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let Some(owner) = owner(&headers) else { return StatusCode::UNAUTHORIZED.into_response() };
    let language = body["language"].as_str().unwrap_or("python").to_owned();
    (StatusCode::CREATED, Json(a.create(&owner, &language, json!({})))).into_response()
}

async fn list(State(a): State<Agent>, headers: HeaderMap) -> Json<Vec<Value>> {
    let owner = owner(&headers).unwrap_or_default();
    Json(a.sessions.lock().unwrap().iter().filter(|(o, _)| *o == owner).map(|(_, s)| s.clone()).collect())
}

async fn get_one(State(a): State<Agent>, headers: HeaderMap, Path(id): Path<String>) -> Response {
    let owner = owner(&headers).unwrap_or_default();
    let found = a.sessions.lock().unwrap().iter().find(|(o, s)| *o == owner && s["id"] == id).map(|(_, s)| s.clone());
    match found {
        Some(s) => ([("x-answered-by", a.tag.to_string())], Json(s)).into_response(),
        None => (StatusCode::NOT_FOUND, Json(json!({"error": {"code": "not_found", "message": "no such session"}})))
            .into_response(),
    }
}

async fn start_session(State(a): State<Agent>, headers: HeaderMap, body: String) -> Response {
    let owner = owner(&headers).unwrap_or_default();
    let user = body.strip_prefix("user_id=").unwrap_or("").to_owned();
    if a.users(&owner, &user).is_none() {
        a.create(&owner, "python_scientific", json!({"kernelbox.user_id": user, "kernelbox.api": "session"}));
    }
    Json(json!({"message": "Session started successfully"})).into_response()
}

async fn execute(State(a): State<Agent>, headers: HeaderMap, Json(body): Json<Value>) -> Response {
    let owner = owner(&headers).unwrap_or_default();
    let user = body["user_id"].as_str().unwrap_or("");
    match a.users(&owner, user) {
        Some(_) => Json(json!({"output": format!("ran on {}", a.tag)})).into_response(),
        None => (StatusCode::NOT_FOUND, Json(json!({"detail": format!("no active session for user_id `{user}`")})))
            .into_response(),
    }
}

/// Starts a stand-in agent; cancelling `stop` closes its listener.
async fn spawn_agent(tag: &str, stop: CancellationToken) -> (Agent, SocketAddr) {
    let agent = Agent { tag: NodeTag::parse(tag).unwrap(), sessions: Arc::default() };
    let app = axum::Router::new()
        .route(kernelbox::node::INFO_PATH, get(info))
        .route("/v1/sessions", post(create).get(list))
        .route("/v1/sessions/{id}", get(get_one))
        .route("/start_session", post(start_session))
        .route("/execute", post(execute))
        .with_state(agent.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(stop.cancelled_owned()).await;
    });
    (agent, addr)
}

struct Cluster {
    base: String,
    client: reqwest::Client,
    membership: Arc<Membership>,
    agents: Vec<(Agent, CancellationToken)>,
    stop: CancellationToken,
}

impl Drop for Cluster {
    fn drop(&mut self) {
        self.stop.cancel();
        self.agents.iter().for_each(|(_, s)| s.cancel());
    }
}

async fn spawn_cluster(tags: &[&str]) -> Cluster {
    let mut agents = Vec::new();
    let mut addrs = Vec::new();
    for tag in tags {
        let stop = CancellationToken::new();
        let (agent, addr) = spawn_agent(tag, stop.clone()).await;
        agents.push((agent, stop));
        addrs.push(addr);
    }
    let settings = ApiRoleSettings {
        api_keys: vec!["key-a".into(), "key-b".into()],
        http: crate::helpers::http(&[]).validate().unwrap(),
        discovery: Discovery::Static(addrs),
        membership: MembershipConfig {
            lost_after: Duration::from_secs(60),
            probe_timeout: Duration::from_millis(1500),
        },
        policy: Policy { max_per_owner: Some(40), ..Default::default() },
        default_memory_mb: 512,
        default_cpus: 1.0,
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let replica = ApiRole::build(listener, settings, Arc::new(PlainHttp)).await;
    let base = format!("http://{}", replica.local_addr().unwrap());
    let membership = replica.membership();
    let stop = CancellationToken::new();
    tokio::spawn(replica.run_until_stopped(stop.clone()));
    Cluster { base, client: reqwest::Client::new(), membership, agents, stop }
}

impl Cluster {
    fn req(&self, method: reqwest::Method, path: &str, key: &str) -> reqwest::RequestBuilder {
        self.client.request(method, format!("{}{path}", self.base)).header("x-api-key", key)
    }

    async fn create(&self, key: &str) -> String {
        let r = self
            .req(reqwest::Method::POST, "/v1/sessions", key)
            .json(&json!({"language": "python"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 201);
        r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
    }

    /// Lets the agents' reports catch up (what the 2 s loop does).
    async fn probe(&self) {
        self.membership.refresh(Instant::now()).await;
    }
}

#[tokio::test]
async fn creates_spread_over_the_agents_and_each_id_is_served_by_its_own_node() {
    let c = spawn_cluster(&["0000000a", "0000000b"]).await;
    let mut ids = Vec::new();
    for _ in 0..8 {
        ids.push(c.create("key-a").await);
        c.probe().await;
    }
    for (agent, _) in &c.agents {
        assert_eq!(agent.sessions.lock().unwrap().len(), 4, "4 and 4");
    }
    for id in &ids {
        let r = c.req(reqwest::Method::GET, &format!("/v1/sessions/{id}"), "key-a").send().await.unwrap();
        assert_eq!(r.status(), 200);
        assert_eq!(r.headers()["x-answered-by"], &id[16..], "the id's tag names the node that holds it");
        let other = c.req(reqwest::Method::GET, &format!("/v1/sessions/{id}"), "key-b").send().await.unwrap();
        assert_eq!(other.status(), 404, "another key's session is not found");
    }
    let r = c.req(reqwest::Method::GET, "/v1/sessions", "key-a").send().await.unwrap();
    assert!(r.headers().get("x-kernelbox-nodes-missing").is_none());
    assert_eq!(r.json::<Vec<Value>>().await.unwrap().len(), 8, "the list is merged from both nodes");
}

#[tokio::test]
async fn a_node_that_stops_answering_gives_503_and_is_named_in_the_list() {
    let c = spawn_cluster(&["0000000a", "0000000b"]).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        ids.push(c.create("key-a").await);
        c.probe().await;
    }
    c.agents[1].1.cancel();
    tokio::time::sleep(Duration::from_millis(100)).await;
    c.probe().await;
    let on_b = ids.iter().find(|id| id.ends_with("0000000b")).unwrap();
    let r = c.req(reqwest::Method::GET, &format!("/v1/sessions/{on_b}"), "key-a").send().await.unwrap();
    assert_eq!(r.status(), 503);
    assert_eq!(r.headers()["retry-after"], "2");
    assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "node_unreachable");
    let r = c.req(reqwest::Method::GET, "/v1/sessions", "key-a").send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["x-kernelbox-nodes-missing"], "0000000b");
    assert_eq!(r.json::<Vec<Value>>().await.unwrap().len(), 2);
    // New sessions all land on the node that answers.
    for _ in 0..3 {
        assert!(c.create("key-a").await.ends_with("0000000a"));
    }
}

#[tokio::test]
async fn unknown_tags_malformed_ids_and_missing_keys_get_the_replicas_own_errors() {
    let c = spawn_cluster(&["0000000a"]).await;
    for path in ["/v1/sessions/0123456789abcdef0000ffff", "/v1/sessions/nope", "/api/kernels/nope"] {
        let r = c.req(reqwest::Method::GET, path, "key-a").send().await.unwrap();
        assert_eq!(r.status(), 404, "{path}");
        assert_eq!(r.json::<Value>().await.unwrap()["error"]["code"], "not_found", "{path}");
    }
    let r = c.client.get(format!("{}/v1/sessions", c.base)).send().await.unwrap();
    assert_eq!(r.status(), 401);
    let r = c.client.post(format!("{}/execute", c.base)).body("{}").send().await.unwrap();
    assert_eq!(r.status(), 401);
    assert!(r.json::<Value>().await.unwrap()["detail"].is_string(), "the session API's shape");
    let r = c.client.get(format!("{}/readyz", c.base)).send().await.unwrap();
    assert_eq!(r.status(), 200);
    let metrics = c.client.get(format!("{}/metrics", c.base)).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("kernelbox_cluster_members"), "{metrics}");
}

#[tokio::test]
async fn the_session_api_keeps_one_session_per_user_and_finds_it_after_membership_changes() {
    let c = spawn_cluster(&["0000000a", "0000000b", "0000000c"]).await;
    let form = |user: &str| format!("user_id={user}");
    for _ in 0..3 {
        let r = c
            .req(reqwest::Method::POST, "/start_session", "key-a")
            .header("content-type", "application/x-www-form-urlencoded")
            .body(form("u1"))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        c.probe().await;
    }
    let total: usize = c.agents.iter().map(|(a, _)| a.sessions.lock().unwrap().len()).sum();
    assert_eq!(total, 1, "one session for the user");
    let holder = c.agents.iter().find(|(a, _)| !a.sessions.lock().unwrap().is_empty()).unwrap().0.tag;
    let r = c
        .req(reqwest::Method::POST, "/execute", "key-a")
        .json(&json!({"user_id": "u1", "code": "1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["output"], format!("ran on {holder}"));
    // Another user's calls, without a session, get the agent's own 404.
    let r = c
        .req(reqwest::Method::POST, "/execute", "key-a")
        .json(&json!({"user_id": "u2", "code": "1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);
    assert!(r.json::<Value>().await.unwrap()["detail"].as_str().unwrap().contains("u2"));
    // A session placed elsewhere (membership changed since) is still found by asking every node.
    let elsewhere = c.agents.iter().find(|(a, _)| a.tag != holder).unwrap();
    elsewhere.0.create("owner-of-nobody", "python_scientific", json!({}));
    let moved = c.agents.iter().find(|(a, _)| a.tag != holder && a.tag != elsewhere.0.tag).unwrap();
    let owner_a = c.agents.iter().find(|(a, _)| a.tag == holder).unwrap().0.sessions.lock().unwrap()[0].0.clone();
    moved.0.create(&owner_a, "python_scientific", json!({"kernelbox.user_id": "u3", "kernelbox.api": "session"}));
    let r = c
        .req(reqwest::Method::POST, "/execute", "key-a")
        .json(&json!({"user_id": "u3", "code": "1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["output"], format!("ran on {}", moved.0.tag));
}
