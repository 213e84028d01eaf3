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
use crate::node::NodeTag;
use crate::runtime::ContainerRuntime;
use crate::session::node_report::NodeReporter;
use crate::session::{FenceConfig, fence, state_lock};
use crate::{Built, ServeError, Settings, api, prepare_state_dir};

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
        settings.manager.fencing = (!agent.lost_after.is_zero()).then_some(FenceConfig { lost_after: agent.lost_after });
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
    /// router; runs until `shutdown`, then stops every session as `serve` does.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) -> Result<(), ServeError> {
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
        let locked = state_lock::lock(&state_dir, &shutdown, || {
            tracing::warn!(state_dir = %state_dir.display(), "another agent holds the state directory; waiting for it to exit");
            reporter.waiting("another agent holds the state directory's lock; waiting for it to exit");
        })
        .await
        .map_err(|source| ServeError::Lock { path: state_dir.display().to_string(), source })?;
        let Some(_lock) = locked else {
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
        shutdown.cancelled().await;
        tracing::info!("shutting down: waiting for in-flight calls");
        tokio::time::sleep(settings.shutdown_grace).await;
        let _ = stamper.await;
        let _ = scheduler.shutdown().await;
        manager.shutdown().await;
        manager.persist_contact();
        let _ = health.await;
        tracing::info!("stopped");
        Ok(())
    }
}
