//! `kernelbox agent` against the real engine: ids carry the node's tag, the owner is the header an API
//! replica sets, the node reports itself on `/internal/v1/info`, and a session held through a loss of
//! contact longer than `lost_after` is removed and answers 410 for good. The cluster router is served on a
//! plain loopback listener here (the product serves it over mutual TLS only).

use std::time::Duration;

use kernelbox::agent::{AgentApplication, AgentSettings};
use kernelbox::node::{AgentInfo, INFO_PATH, NodeTag, OWNER_HEADER};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::helpers::{
    AppOptions, SharedInstance, docker, ensure_images, eventually, instance_containers, settings, uuid_like,
};

/// A running agent: its cluster router's base URL, its health listener's, its tag.
struct TestAgent {
    cluster: String,
    health: String,
    tag: NodeTag,
    client: reqwest::Client,
    shutdown: CancellationToken,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl TestAgent {
    async fn start(instance: &SharedInstance, node_id: &str, lost_after: Duration) -> TestAgent {
        let options = AppOptions { shutdown_grace: Duration::from_millis(200), ..AppOptions::default() };
        let settings = settings(options, &instance.name, instance.dir.path());
        let health = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agent = AgentSettings { node_id: Some(node_id.to_owned()), lost_after };
        let app = AgentApplication::new(health, settings, agent, docker().await).await.expect("the agent builds");
        let cluster = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let (cluster_addr, health_addr) = (cluster.local_addr().unwrap(), app.health_addr().unwrap());
        let tag = app.node_tag();
        let router = app.cluster_router();
        let shutdown = CancellationToken::new();
        let serving =
            tokio::spawn(kernelbox::api::serve::serve(cluster, router, Duration::from_secs(10), shutdown.clone()));
        let token = shutdown.clone();
        let running = tokio::spawn(async move { app.run_until_stopped(token, serving).await.expect("the agent runs") });
        TestAgent {
            cluster: format!("http://{cluster_addr}"),
            health: format!("http://{health_addr}"),
            tag,
            client: reqwest::Client::new(),
            shutdown,
            tasks: vec![running],
        }
    }

    async fn ready(&self) -> bool {
        let r = self.client.get(format!("{}/readyz", self.health)).send().await;
        r.is_ok_and(|r| r.status() == 200)
    }

    async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        owner: Option<&str>,
        body: Option<Value>,
    ) -> (u16, Value) {
        let mut request = self.client.request(method, format!("{}{path}", self.cluster));
        if let Some(owner) = owner {
            request = request.header(OWNER_HEADER, owner);
        }
        if let Some(body) = body {
            request = request.json(&body);
        }
        let r = request.send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn info(&self) -> AgentInfo {
        let (status, v) = self.call(reqwest::Method::GET, INFO_PATH, None, None).await;
        assert_eq!(status, 200, "{v}");
        serde_json::from_value(v).expect("an AgentInfo")
    }

    async fn stop(self) {
        self.shutdown.cancel();
        for task in self.tasks {
            task.await.expect("stopped cleanly");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_tags_its_ids_trusts_the_owner_header_and_fences_itself_after_a_gap() {
    ensure_images().await;
    let instance = SharedInstance::new("agent");
    let agent = TestAgent::start(&instance, &format!("test-node-{}", uuid_like()), Duration::from_secs(4)).await;
    assert!(eventually(Duration::from_secs(30), || agent.ready()).await, "the agent gets ready");
    let info = agent.info().await;
    assert_eq!((info.node_tag, info.ready), (agent.tag, true), "{info:?}");
    assert!(info.images.get("python").is_some_and(Option::is_some), "the python image's hash: {info:?}");

    use reqwest::Method;
    let (status, v) = agent.call(Method::POST, "/v1/sessions", None, Some(json!({"language": "python"}))).await;
    assert_eq!(status, 401, "no owner, no call: {v}");
    let (status, v) = agent.call(Method::POST, "/v1/sessions", Some("a-b"), Some(json!({"language": "python"}))).await;
    assert_eq!((status, v["error"]["code"].as_str()), (400, Some("invalid_owner")), "{v}");
    let (status, v) = agent.call(Method::POST, "/v1/sessions", Some("a"), Some(json!({"language": "python"}))).await;
    assert_eq!(status, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    assert_eq!(NodeTag::suffix_of(&id), Some(agent.tag), "{id}");
    let (status, v) = agent
        .call(Method::POST, &format!("/v1/sessions/{id}/execute"), Some("a"), Some(json!({"code": "print(6*7)"})))
        .await;
    assert_eq!((status, v["stdout"].as_str()), (200, Some("42\n")), "{v}");
    let (status, _) = agent.call(Method::GET, &format!("/v1/sessions/{id}"), Some("b"), None).await;
    assert_eq!(status, 404, "another owner's session is not found");
    let info = agent.info().await;
    assert_eq!((info.usage.sessions, info.owners.get("a").copied()), (1, Some(1)), "{info:?}");

    // Every other id this node hands out names it too: a gateway kernel id, a /jupyter stored file.
    let (status, v) = agent.call(Method::POST, "/api/kernels", Some("a"), Some(json!({"name": "python3"}))).await;
    assert_eq!(status, 201, "{v}");
    let kernel = v["id"].as_str().unwrap().to_owned();
    assert_eq!(NodeTag::suffix_of(&kernel.replace('-', "")), Some(agent.tag), "{kernel}");
    let (status, _) = agent.call(Method::DELETE, &format!("/api/kernels/{kernel}"), Some("a"), None).await;
    assert_eq!(status, 204);
    let upload = json!({"filename": "data", "extension": "csv", "content": "MSwy"});
    let (status, v) = agent.call(Method::PUT, "/jupyter/files", Some("a"), Some(upload)).await;
    assert_eq!(status, 200, "{v}");
    let url = v["url"].as_str().unwrap().to_owned();
    let name = url.rsplit('/').next().unwrap();
    assert_eq!(kernelbox::store::node_of(name), Some(agent.tag), "{url}");
    // A signed link opens the file with no owner named (an API replica has none to name for a link).
    let r = agent.client.get(&url).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.text().await.unwrap(), "1,2");
    let (status, _) = agent.call(Method::GET, &format!("/jupyter/files/{name}"), Some("b"), None).await;
    assert_eq!(status, 404, "another owner's file");

    // No request from the API tier for longer than lost_after: the next one fences.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let (status, v) = agent.call(Method::GET, &format!("/v1/sessions/{id}"), Some("a"), None).await;
    assert_eq!((status, v["error"]["code"].as_str()), (410, Some("session_lost")), "{v}");
    let (status, v) =
        agent.call(Method::POST, &format!("/v1/sessions/{id}/execute"), Some("a"), Some(json!({"code": "1"}))).await;
    assert_eq!(status, 410, "{v}");
    let (status, _) = agent.call(Method::DELETE, &format!("/v1/sessions/{id}"), Some("a"), None).await;
    assert_eq!(status, 204, "deleting a lost session succeeds");
    let gone = eventually(Duration::from_secs(30), || async {
        instance_containers(&instance.name).await.iter().all(|c| c.labels.get("kernelbox.session") != Some(&id))
    })
    .await;
    assert!(gone, "the fenced session's container is removed");
    let (status, _) = agent.call(Method::GET, &format!("/v1/sessions/{id}"), Some("a"), None).await;
    assert_eq!(status, 410, "and it never comes back");
    agent.stop().await;
}
