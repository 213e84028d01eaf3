//! The `kernelbox agent` role: everything `serve` does, on one node of a cluster. It knows its node by the
//! engine's Swarm node ID (or `--node-id`), so every id it hands out ends with the node's tag; it takes its
//! state directory's lock before it touches a session; it trusts the owner an API replica names in
//! `x-kernelbox-owner` instead of API keys; it answers `GET /internal/v1/info`; and it fences itself
//! after a loss of contact with the API tier (`session/fence.rs`).
//!
//! Two listeners: the plain one (`--listen`, loopback) serves only `/healthz` and `/readyz`, from the
//! first moment; the cluster router ([`AgentApplication::cluster_router`]) is what the caller serves on
//! the mutually authenticated listener — it answers the info at once and 503 `not_ready` to everything
//! else until the lock is held and adoption is over.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::api::internal::{self, Agent};
use crate::file_lock;
use crate::node::NodeTag;
use crate::runtime::ContainerRuntime;
use crate::session::node_report::NodeReporter;
use crate::session::{FenceConfig, fence};
use crate::{Built, ServeError, Settings, api, prepare_state_dir};

/// The state directory's lock file (`file_lock.rs`): one agent per node touches its sessions.
pub const LOCK_FILE: &str = "agent.lock";

/// What only an agent is told.
#[derive(Debug, Clone)]
pub struct AgentSettings {
    /// The node's name when the engine is not in a Swarm (tests, other engines); else its Swarm node ID.
    pub node_id: Option<String>,
    /// Sessions held through a longer loss of contact are removed (fencing); zero: never.
    pub lost_after: Duration,
}

/// An agent, known by its node, not yet serving.
pub struct AgentApplication {
    health: TcpListener,
    settings: Settings,
    runtime: Arc<dyn ContainerRuntime>,
    agent: Agent,
}

impl AgentApplication {
    /// Learns the node's identity: `agent.node_id`, else the engine's Swarm node ID; an engine outside a
    /// Swarm without `--node-id` is refused. Touches nothing in the state directory yet.
    pub async fn new(
        health: TcpListener,
        mut settings: Settings,
        agent: AgentSettings,
        runtime: Arc<dyn ContainerRuntime>,
    ) -> Result<Self, ServeError> {
        let node_id = match agent.node_id.filter(|id| !id.trim().is_empty()) {
            Some(id) => id,
            None => runtime.swarm_node_id().await?.ok_or(ServeError::NotInSwarm)?,
        };
        let tag = NodeTag::from_node_id(&node_id);
        settings.manager.node = Some(tag);
        settings.manager.fencing =
            (!agent.lost_after.is_zero()).then_some(FenceConfig { lost_after: agent.lost_after });
        // No API keys on an agent: its callers are API replicas, authenticated by their certificate.
        settings.api_keys.clear();
        let reporter = Arc::new(NodeReporter::new(tag, node_id));
        let agent = Agent { reporter, serving: Arc::new(OnceLock::new()) };
        Ok(AgentApplication { health, settings, runtime, agent })
    }

    /// The node's tag: the end of every id this agent hands out.
    pub fn node_tag(&self) -> NodeTag {
        self.agent.reporter.tag
    }

    /// The plain (health) listener's address.
    pub fn health_addr(&self) -> std::io::Result<std::net::SocketAddr> {
        self.health.local_addr()
    }

    /// The router to serve on the cluster listener (mutual TLS only: it trusts the owner header). Ready
    /// to serve before [`run_until_stopped`](Self::run_until_stopped) is, answering `not_ready` until then.
    pub fn cluster_router(&self) -> axum::Router {
        internal::cluster_router(self.agent.clone())
    }

    /// Serves health at once; waits for the state directory's lock (retried every second); then builds
    /// what `serve` builds (adoption, then fencing of what was held through a gap) and opens the cluster
    /// router; runs until `shutdown`, then, as `serve` does, gives the calls in flight on `cluster` (the
    /// task serving [`cluster_router`](Self::cluster_router), which stops accepting on the same token) the
    /// grace period, cuts the rest and stops every session.
    pub async fn run_until_stopped<T>(
        self,
        shutdown: CancellationToken,
        cluster: tokio::task::JoinHandle<T>,
    ) -> Result<(), ServeError> {
        let AgentApplication { health, settings, runtime, agent } = self;
        let header_read_timeout = settings.http.header_read_timeout;
        let health = tokio::spawn(api::serve::serve(
            health,
            internal::health_router(agent.clone()),
            header_read_timeout,
            shutdown.clone(),
        ));
        let state_dir = settings.manager.state_dir.clone();
        prepare_state_dir(&state_dir)
            .map_err(|source| ServeError::StateDir { path: state_dir.display().to_string(), source })?;
        agent.reporter.waiting("waiting for the lock on the state directory");
        let reporter = agent.reporter.clone();
        let locked = file_lock::lock(&state_dir.join(LOCK_FILE), &shutdown, || {
            tracing::warn!(state_dir = %state_dir.display(), "another agent holds the state directory; waiting for it to exit");
            reporter.waiting("another agent holds the state directory's lock; waiting for it to exit");
        })
        .await
        .map_err(|source| ServeError::Lock { path: state_dir.display().to_string(), source })?;
        let Some(_lock) = locked else {
            // Stopped while waiting: no session was touched; what is in flight gets `not_ready` anyway.
            let abort = cluster.abort_handle();
            if tokio::time::timeout(settings.shutdown_grace, cluster).await.is_err() {
                abort.abort();
            }
            let _ = health.await;
            return Ok(());
        };
        agent.reporter.waiting("adopting the sessions an earlier run left");
        let Built { manager, store: _, mut scheduler, router } =
            Built::build(settings.clone(), runtime, api::auth::Keys::trusting_owner_header()).await?;
        manager.persist_contact();
        let _ = agent.serving.set((manager.clone(), router));
        agent.reporter.set_ready();
        tracing::info!(node_tag = %agent.reporter.tag, node_id = %agent.reporter.node_id, "agent ready");
        let persist = manager.clone();
        let stamping = shutdown.clone();
        let stamper = tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = stamping.cancelled() => return,
                    _ = tokio::time::sleep(fence::PERSIST_EVERY) => persist.persist_contact(),
                }
            }
        });
        let mut cluster = std::pin::pin!(cluster);
        // The listener stops on the same token: once it is cancelled both branches may be ready, and a
        // finished JoinHandle must not be polled again (it panics, and the sessions would never stop).
        let listener_ended = tokio::select! {
            biased;
            _ = shutdown.cancelled() => false,
            _ = &mut cluster => {
                tracing::error!("the cluster listener stopped by itself");
                true
            }
        };
        tracing::info!("shutting down: no new requests; waiting for in-flight calls");
        let finished_in_time =
            listener_ended || tokio::time::timeout(settings.shutdown_grace, &mut cluster).await.is_ok();
        if !finished_in_time {
            cluster.abort();
        }
        shutdown.cancel();
        let _ = stamper.await;
        let _ = scheduler.shutdown().await;
        manager.shutdown().await;
        manager.persist_contact();
        let _ = health.await;
        // The lock goes with this function's return: a successor may serve from the next moment.
        tracing::info!("agent stopped; releasing the state directory's lock");
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Cli, Command};
    use crate::node::{INFO_PATH, OWNER_HEADER};
    use crate::runtime::fake::FakeRuntime;
    use axum::body::Body;
    use axum::http::{Request, StatusCode};
    use clap::Parser;
    use tower::ServiceExt;

    fn settings(state_dir: &std::path::Path) -> Settings {
        let dir = state_dir.to_str().unwrap();
        let Command::Serve(args) = Cli::try_parse_from(["kernelbox", "serve", "--state-dir", dir]).unwrap().command
        else {
            unreachable!()
        };
        Settings {
            manager: crate::session::tests::config(&["--state-dir", dir], state_dir),
            api_keys: vec!["a key the agent must ignore".into()],
            http: args.http.validate().unwrap(),
            files: args.files.validate().unwrap(),
            links: args.links.validate().unwrap(),
            shutdown_grace: Duration::from_millis(10),
        }
    }

    struct Running {
        router: axum::Router,
        health: String,
        shutdown: CancellationToken,
        task: tokio::task::JoinHandle<Result<(), ServeError>>,
    }

    async fn start(state_dir: &std::path::Path, runtime: Arc<FakeRuntime>) -> Running {
        let health = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let agent = AgentSettings { node_id: Some("unit-node".into()), lost_after: Duration::from_secs(60) };
        let app = AgentApplication::new(health, settings(state_dir), agent, runtime).await.unwrap();
        let (router, health) = (app.cluster_router(), format!("http://{}", app.health_addr().unwrap()));
        let shutdown = CancellationToken::new();
        let serving = tokio::spawn(std::future::pending::<()>());
        let task = tokio::spawn(app.run_until_stopped(shutdown.clone(), serving));
        Running { router, health, shutdown, task }
    }

    impl Running {
        async fn call(&self, path: &str, owner: Option<&str>) -> (StatusCode, serde_json::Value) {
            let mut request = Request::get(path);
            if let Some(owner) = owner {
                request = request.header(OWNER_HEADER, owner);
            }
            let response = self.router.clone().oneshot(request.body(Body::empty()).unwrap()).await.unwrap();
            let status = response.status();
            let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
            (status, serde_json::from_slice(&body).unwrap_or_default())
        }

        async fn ready(&self) -> bool {
            self.call(INFO_PATH, None).await.1["ready"] == true
        }

        async fn readyz(&self) -> u16 {
            reqwest::get(format!("{}/readyz", self.health)).await.unwrap().status().as_u16()
        }
    }

    async fn until(limit: Duration, mut check: impl AsyncFnMut() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if check().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_second_agent_on_one_state_directory_waits_and_takes_over_when_the_first_exits() {
        let dir = tempfile::Builder::new().prefix("kba").tempdir_in("/tmp").unwrap();
        let runtime = Arc::new(FakeRuntime::new());
        let first = start(dir.path(), runtime.clone()).await;
        assert!(until(Duration::from_secs(10), async || first.ready().await).await);
        assert_eq!(first.readyz().await, 200);
        let (status, sessions) = first.call("/v1/sessions", Some("a")).await;
        assert_eq!((status, sessions), (StatusCode::OK, serde_json::json!([])), "the owner header is the caller");

        let second = start(dir.path(), runtime.clone()).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        let (_, info) = second.call(INFO_PATH, None).await;
        assert_eq!(info["ready"], false, "{info}");
        assert!(info["reasons"][0].as_str().unwrap().contains("lock"), "{info}");
        let (status, v) = second.call("/v1/sessions", Some("a")).await;
        assert_eq!((status, v["error"]["code"].as_str()), (StatusCode::SERVICE_UNAVAILABLE, Some("not_ready")));
        assert_eq!(second.readyz().await, 503);
        let third = start(dir.path(), runtime.clone()).await;
        third.shutdown.cancel();
        let stopped = tokio::time::timeout(Duration::from_secs(5), third.task).await;
        assert!(stopped.is_ok_and(|r| r.unwrap().is_ok()), "an agent stopped while it waits just stops");

        first.shutdown.cancel();
        first.task.await.unwrap().unwrap();
        assert!(until(Duration::from_secs(5), async || second.ready().await).await, "took over");
        assert_eq!(second.readyz().await, 200);
        second.shutdown.cancel();
        second.task.await.unwrap().unwrap();
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_stop_ends_the_listener_and_the_agent_together_without_a_panic() {
        // As the binary runs it: the cluster listener stops on the agent's own token, so both are done
        // at once (select! picks either at random: a few rounds meet both orders).
        for _ in 0..8 {
            let dir = tempfile::Builder::new().prefix("kba").tempdir_in("/tmp").unwrap();
            let health = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let agent = AgentSettings { node_id: Some("unit-node".into()), lost_after: Duration::ZERO };
            let runtime = Arc::new(FakeRuntime::new());
            let app = AgentApplication::new(health, settings(dir.path()), agent, runtime).await.unwrap();
            let router = app.cluster_router();
            let shutdown = CancellationToken::new();
            let stop = shutdown.clone();
            let serving = tokio::spawn(async move { stop.cancelled().await });
            let task = tokio::spawn(app.run_until_stopped(shutdown.clone(), serving));
            let ready = async || {
                let request = Request::get(INFO_PATH).body(Body::empty()).unwrap();
                let response = router.clone().oneshot(request).await.unwrap();
                let body = axum::body::to_bytes(response.into_body(), 1 << 20).await.unwrap();
                serde_json::from_slice::<serde_json::Value>(&body).unwrap()["ready"] == true
            };
            assert!(until(Duration::from_secs(10), ready).await);
            shutdown.cancel();
            task.await.expect("no panic").expect("a clean stop");
        }
    }

    #[tokio::test]
    async fn outside_a_swarm_an_agent_starts_only_with_a_node_id() {
        let dir = tempfile::Builder::new().prefix("kba").tempdir_in("/tmp").unwrap();
        let runtime = Arc::new(FakeRuntime::new());
        let new = |node_id: Option<&str>| {
            let runtime = runtime.clone();
            let agent = AgentSettings { node_id: node_id.map(str::to_owned), lost_after: Duration::ZERO };
            let settings = settings(dir.path());
            async move {
                let health = TcpListener::bind("127.0.0.1:0").await.unwrap();
                AgentApplication::new(health, settings, agent, runtime).await
            }
        };
        assert!(matches!(new(None).await, Err(ServeError::NotInSwarm)));
        let named = new(Some("elsewhere")).await.unwrap();
        assert_eq!(named.node_tag(), NodeTag::from_node_id("elsewhere"));
        runtime.set_swarm_node_id(Some("swarm-node-1"));
        assert_eq!(new(None).await.unwrap().node_tag(), NodeTag::from_node_id("swarm-node-1"));
        assert!(named.settings.api_keys.is_empty() && named.settings.manager.fencing.is_none(), "0 turns fencing off");
    }
}
