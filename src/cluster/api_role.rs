//! `kernelbox api`: a replica with no Docker socket. It checks API keys and the request limit (the same
//! `api::auth::Access` as one node), then routes every request to the agent that owns it (see `route`),
//! places new sessions (`placement`), fans lists out (`fanout`), finds the session API's users
//! (`user_session`), and answers itself only `/healthz`, `/readyz` (fails while no agent is Up),
//! `/metrics` (per node), `/docs`, `/openapi.json`, the compatibility health checks, and the errors of
//! `cluster::error`. It re-implements no session operation: what the agent answers is what the client
//! gets.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{Request, State};
use axum::http::request::Parts;
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::error::RouteError;
use super::fanout::{ask_all, merged};
use super::membership::{Discovery, Lookup, Member, Membership, MembershipConfig, NodeState, Reservation};
use super::placement::{Ask, NoPlace, Policy, owner_key, place, rendezvous, user_key};
use super::route::{self, Peek, Step, Target};
use super::transport::{AgentTransport, TransportError};
use super::user_session::{self, Found};
use crate::api::auth::{self, Access, Keys};
use crate::api::compat;
use crate::api::{docs, jupyter_compat, rate_limit, system};
use crate::config::HttpLimits;
use crate::error::ApiError;
use crate::node::NodeTag;
use crate::session::Owner;

/// What a replica needs besides its listener and its link.
#[derive(Debug, Clone)]
pub struct ApiRoleSettings {
    pub api_keys: Vec<String>,
    pub http: HttpLimits,
    pub discovery: Discovery,
    pub membership: MembershipConfig,
    pub policy: Policy,
    /// What a create that names no memory or CPUs reserves (the agents' defaults), for placement.
    pub default_memory_mb: u64,
    pub default_cpus: f64,
}

/// The routing state every request shares.
#[derive(Clone)]
pub struct Routing {
    pub membership: Arc<Membership>,
    pub policy: Arc<Policy>,
    pub default_memory_mb: u64,
    pub default_cpus: f64,
    /// How long a body the replica reads to route may take to arrive.
    pub body_read_timeout: Duration,
}

/// A request's body: as it came (streamed through), or read (to route it, and replayable on a retry).
enum Payload {
    Stream(Body),
    Read(Bytes),
}

/// The replica's router: local routes, then everything else routed behind the key check.
pub fn router(routing: Routing, keys: Keys, http: &HttpLimits) -> Router {
    let access = Access { keys, limiter: http.rate_limit.map(|l| Arc::new(rate_limit::RateLimiter::new(l))) };
    let routed = Router::new()
        .fallback(route_request)
        .layer(axum::middleware::from_fn_with_state(access, key_or_link))
        .layer(axum::middleware::from_fn(compat_shapes))
        .with_state(routing.clone());
    Router::new()
        .route("/healthz", get(system::healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/health", get(jupyter_compat::health_root))
        .route("/jupyter/health", get(jupyter_compat::health))
        .merge(docs::routes())
        .with_state(routing)
        .fallback_service(routed)
        .layer(tower_http::catch_panic::CatchPanicLayer::custom(|_| {
            ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "internal error (a bug): see the server log")
                .into_response()
        }))
        .layer(tower_http::trace::TraceLayer::new_for_http().make_span_with(|req: &Request| {
            let request_id = req.headers().get("x-request-id").and_then(|v| v.to_str().ok()).unwrap_or("");
            let path = crate::api::signed::loggable_path(req.uri().path());
            tracing::info_span!("request", method = %req.method(), path = %path, request_id)
        }))
        .layer(tower_http::request_id::PropagateRequestIdLayer::x_request_id())
        .layer(tower_http::request_id::SetRequestIdLayer::x_request_id(tower_http::request_id::MakeRequestUuid))
}

/// Middleware: a signed link goes through as it is (the agent that made it checks it; the request limit
/// of the client's address applies); anything else through the key check and the request limit.
async fn key_or_link(State(access): State<Access>, req: Request, next: Next) -> Response {
    if route::presents_link(req.method(), req.uri().path(), req.uri().query(), req.headers()) {
        if let Some(refused) = access.spend_by_address(&req) {
            return refused;
        }
        return next.run(req).await;
    }
    auth::require_key(State(access), req, next).await
}

/// Middleware: on the compatibility APIs' routes, errors in their `{"detail": ...}` shape (the agent's
/// already are; the replica's own are rewritten).
async fn compat_shapes(req: Request, next: Next) -> Response {
    let compat = route::is_compat(req.uri().path());
    let response = next.run(req).await;
    if compat { compat::detail_errors(response).await } else { response }
}

/// Fails while no agent is Up. Says, per node, its state and why it is not ready or lacks a language's
/// image (what its agent last reported), so an operator sees why a node gets no sessions.
async fn readyz(State(routing): State<Routing>) -> Response {
    let snapshot = routing.membership.snapshot();
    let up = snapshot.up().count();
    let ready = snapshot.members.values().filter(|m| m.is_ready()).count();
    let nodes: serde_json::Map<String, serde_json::Value> = snapshot
        .members
        .iter()
        .map(|(tag, m)| {
            let state = match m.state {
                NodeState::Up => "up",
                NodeState::Unreachable => "unreachable",
            };
            let node = serde_json::json!({"state": state, "ready": m.is_ready(), "reasons": m.info.reasons});
            (tag.to_string(), node)
        })
        .collect();
    let body = serde_json::json!({
        "ready": up > 0,
        "agents_up": up,
        "agents_ready": ready,
        "agents_unreachable": snapshot.members.len() - up,
        "nodes": nodes,
    });
    let status = if up > 0 { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, axum::Json(body)).into_response()
}

/// Prometheus text: membership by state, each node's sessions, warm containers and pool hits and misses
/// (as its agent last reported them), plus the counters (`kernelbox_routed_requests_total{node}`,
/// `kernelbox_route_errors_total{kind}`).
async fn metrics(State(routing): State<Routing>) -> Response {
    let snapshot = routing.membership.snapshot();
    let up = snapshot.up().count();
    metrics::gauge!("kernelbox_cluster_members", "state" => "up").set(up as f64);
    metrics::gauge!("kernelbox_cluster_members", "state" => "unreachable").set((snapshot.members.len() - up) as f64);
    metrics::gauge!("kernelbox_cluster_members", "state" => "lost").set(snapshot.lost_count() as f64);
    for (tag, m) in &snapshot.members {
        let node = tag.to_string();
        metrics::gauge!("kernelbox_node_up", "node" => node.clone()).set(f64::from(u8::from(m.state == NodeState::Up)));
        metrics::gauge!("kernelbox_node_sessions", "node" => node.clone()).set(f64::from(m.info.usage.sessions));
        // Every pooled language, so a pool emptied by a burst shows 0 (an agent lists only warm > 0).
        let pooled = m.info.pools.keys().chain(m.info.warm.keys()).collect::<std::collections::BTreeSet<_>>();
        for language in pooled {
            let warm = m.info.warm.get(language).copied().unwrap_or(0);
            metrics::gauge!("kernelbox_node_warm", "node" => node.clone(), "language" => language.clone())
                .set(f64::from(warm));
        }
        // The agent's own counters, mirrored per node (they restart from 0 with the agent).
        for (language, pool) in &m.info.pools {
            let labels = [("node", node.clone()), ("language", language.clone())];
            metrics::counter!("kernelbox_node_pool_hits_total", &labels).absolute(pool.hits);
            metrics::counter!("kernelbox_node_pool_misses_total", &labels).absolute(pool.misses);
        }
    }
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], system::prometheus().render()).into_response()
}

/// The fallback: every request the replica does not answer itself.
async fn route_request(State(routing): State<Routing>, req: Request) -> Response {
    let owner = req.extensions().get::<Owner>().cloned();
    let delete = req.method() == Method::DELETE;
    match routing.route(req, owner).await {
        Ok(response) => response,
        Err(RouteError::SessionLost(_)) if delete => StatusCode::NO_CONTENT.into_response(),
        Err(e) => {
            let node = e.node().unwrap_or_default();
            metrics::counter!("kernelbox_route_errors_total", "kind" => e.kind(), "node" => node).increment(1);
            if matches!(e, RouteError::AgentProtocol { .. }) {
                tracing::error!(error = %e, "an agent answered garbage");
            }
            ApiError::from(e).into_response()
        }
    }
}

impl Routing {
    async fn route(&self, req: Request, owner: Option<Owner>) -> Result<Response, RouteError> {
        let (parts, body) = req.into_parts();
        let (target, payload) = match route::classify_head(&parts.method, parts.uri.path(), &parts.headers) {
            Step::Done(target) => (target, Payload::Stream(body)),
            Step::Body(peek) => {
                let bytes = self.read(body, peek).await?;
                (route::classify_body(peek, &parts.headers, &bytes).await, Payload::Read(bytes))
            }
        };
        let snapshot = self.membership.snapshot();
        // Only a session's own routes may be reached with a signed link instead of a key.
        let Some(owner) = owner else {
            return match target {
                Target::Session(tag) => self.to_session(&snapshot, tag, parts, payload, None).await,
                _ => Err(RouteError::SessionNotFound),
            };
        };
        match target {
            Target::Local => Err(RouteError::NoSuchEndpoint),
            Target::NotFound => Err(RouteError::SessionNotFound),
            Target::Session(tag) => self.to_session(&snapshot, tag, parts, payload, Some(&owner)).await,
            Target::Create { language, memory_mb, cpus } => {
                // A language no agent knows: the agent's own 422 says so.
                let known = language.as_ref().is_none_or(|l| snapshot.up().any(|(_, m)| m.info.images.contains_key(l)));
                if !known {
                    return self.to_any(&snapshot, parts, payload, &owner).await;
                }
                let ask = Ask {
                    language: language.as_deref(),
                    memory_mb: memory_mb.unwrap_or(self.default_memory_mb),
                    cpus: cpus.unwrap_or(self.default_cpus),
                    owner: &owner.0,
                };
                let seed = random_seed();
                let (candidates, reserved) = self.membership.place(&ask, |now| place(now, &ask, &self.policy, seed))?;
                self.try_in_turn(&candidates, parts, payload, &owner, Some(reserved)).await
            }
            Target::FanOut(_) => {
                let transport = self.membership.transport();
                let answers = ask_all(&transport, &snapshot, || {
                    let head = copy_head(&parts);
                    super::transport::prepare_forward(Request::from_parts(head, Body::empty()), Some(&owner))
                })
                .await;
                merged(answers)
            }
            Target::Any => self.to_any(&snapshot, parts, payload, &owner).await,
            Target::OwnerPinned => {
                let ready: Vec<NodeTag> =
                    snapshot.members.iter().filter(|(_, m)| m.is_ready()).map(|(t, _)| *t).collect();
                let Some(tag) = rendezvous(&owner_key(&owner.0), ready).first().copied() else {
                    return Err(no_live_agent(&snapshot));
                };
                self.to_session(&snapshot, tag, parts, payload, Some(&owner)).await
            }
            Target::UserSession { user_id, start } => {
                let Payload::Read(bytes) = payload else {
                    return Err(RouteError::BodyUnreadable("the session API's body was not read".into()));
                };
                self.to_user(&snapshot, &user_id, start, parts, bytes, &owner).await
            }
        }
    }

    /// Reads a body the classification needs, within its limit and the body deadline.
    async fn read(&self, body: Body, peek: Peek) -> Result<Bytes, RouteError> {
        let limit = peek.limit();
        match tokio::time::timeout(self.body_read_timeout, axum::body::to_bytes(body, limit)).await {
            Err(_) => Err(RouteError::BodyTimeout),
            Ok(Err(e)) if is_length_limit(&e) => Err(RouteError::TooLarge(limit)),
            Ok(Err(e)) => Err(RouteError::BodyUnreadable(e.to_string())),
            Ok(Ok(bytes)) => Ok(bytes),
        }
    }

    /// To the node `tag` names: 503 while it does not answer, 410 once lost, 404 for a tag never seen.
    async fn to_session(
        &self,
        snapshot: &super::membership::Snapshot,
        tag: NodeTag,
        parts: Parts,
        payload: Payload,
        owner: Option<&Owner>,
    ) -> Result<Response, RouteError> {
        match snapshot.lookup(tag) {
            Lookup::Up(member) => self.send(tag, member, parts, payload, owner).await,
            Lookup::Unreachable(_) => Err(RouteError::NodeUnreachable(tag)),
            Lookup::Lost => Err(RouteError::SessionLost(tag)),
            Lookup::Unknown => Err(RouteError::SessionNotFound),
        }
    }

    /// To any ready agent (random), the next one if it cannot be reached.
    async fn to_any(
        &self,
        snapshot: &super::membership::Snapshot,
        parts: Parts,
        payload: Payload,
        owner: &Owner,
    ) -> Result<Response, RouteError> {
        let seed = random_seed();
        let mut live: Vec<(NodeTag, SocketAddr)> =
            snapshot.members.iter().filter(|(_, m)| m.is_ready()).map(|(t, m)| (*t, m.addr)).collect();
        if live.is_empty() {
            live = snapshot.up().map(|(t, m)| (*t, m.addr)).collect();
        }
        if live.is_empty() {
            return Err(no_live_agent(snapshot));
        }
        let n = live.len();
        live.rotate_left((seed % n as u64) as usize);
        self.try_in_turn(&live, parts, payload, owner, None).await
    }

    /// The session API (see `user_session` for the rule).
    async fn to_user(
        &self,
        snapshot: &super::membership::Snapshot,
        user_id: &str,
        start: bool,
        parts: Parts,
        bytes: Bytes,
        owner: &Owner,
    ) -> Result<Response, RouteError> {
        let transport = self.membership.transport();
        let key = user_key(&owner.0, user_id);
        if start {
            match user_session::find(&transport, snapshot, owner, user_id, None).await {
                Found::At(tag, _) => {
                    return self.to_session(snapshot, tag, parts, Payload::Read(bytes), Some(owner)).await;
                }
                Found::Unknown(missing) => return Err(RouteError::NodeUnreachable(missing[0])),
                Found::Nowhere => {}
            }
            let ask = Ask {
                language: Some(route::USER_SESSION_LANGUAGE),
                memory_mb: self.default_memory_mb,
                cpus: self.default_cpus,
                owner: &owner.0,
            };
            let seed = random_seed();
            let (ordered, reserved) = self.membership.place(&ask, |now| {
                let candidates = place(now, &ask, &self.policy, seed)?;
                let order = rendezvous(&key, candidates.iter().map(|(t, _)| *t));
                Ok::<_, NoPlace>(
                    order.into_iter().filter_map(|t| candidates.iter().find(|(c, _)| *c == t).copied()).collect(),
                )
            })?;
            return self.try_in_turn(&ordered, parts, Payload::Read(bytes), owner, Some(reserved)).await;
        }
        let up: Vec<NodeTag> = snapshot.up().map(|(t, _)| *t).collect();
        let Some(first) = rendezvous(&key, up).first().copied() else {
            return Err(no_live_agent(snapshot));
        };
        let head = copy_head(&parts);
        let response = self.to_session(snapshot, first, parts, Payload::Read(bytes.clone()), Some(owner)).await;
        match response {
            Ok(r) if r.status() == StatusCode::NOT_FOUND => {
                match user_session::find(&transport, snapshot, owner, user_id, Some(first)).await {
                    Found::At(tag, _) => self.to_session(snapshot, tag, head, Payload::Read(bytes), Some(owner)).await,
                    Found::Unknown(missing) => Err(RouteError::NodeUnreachable(missing[0])),
                    Found::Nowhere => Ok(r),
                }
            }
            other => other,
        }
    }

    /// Tries `candidates` in order: the next on a connection failure, and (for creates, which hold the
    /// `reserved` count of their session in the membership's view) on a refusal (429/503); a create that
    /// succeeds keeps its count until the probes report it, one that fails gives it back. A streamed body
    /// can be sent once only.
    async fn try_in_turn(
        &self,
        candidates: &[(NodeTag, SocketAddr)],
        parts: Parts,
        payload: Payload,
        owner: &Owner,
        reserved: Option<Reservation<'_>>,
    ) -> Result<Response, RouteError> {
        let retry_refusal = reserved.is_some();
        let bytes = match payload {
            Payload::Read(bytes) => bytes,
            Payload::Stream(body) => {
                let Some((tag, addr)) = candidates.first() else {
                    return Err(RouteError::NoNodeAvailable("no agent is known or answers".into()));
                };
                return self.send_addr(*tag, *addr, parts, Payload::Stream(body), Some(owner)).await;
            }
        };
        let mut last = Err(RouteError::NoNodeAvailable("no agent is known or answers".into()));
        // The first and one more: "one retry on the next candidate".
        let mut reserved = reserved;
        for (i, (tag, addr)) in candidates.iter().take(2).enumerate() {
            let head = copy_head(&parts);
            if i > 0
                && let Some(r) = &reserved
            {
                r.moved_to(*tag);
            }
            let result = self.send_addr(*tag, *addr, head, Payload::Read(bytes.clone()), Some(owner)).await;
            let refused = |r: &Response| {
                retry_refusal && matches!(r.status(), StatusCode::TOO_MANY_REQUESTS | StatusCode::SERVICE_UNAVAILABLE)
            };
            let again = match &result {
                Err(RouteError::NodeUnreachable(_)) => true,
                Ok(r) => refused(r),
                Err(_) => false,
            };
            if let Ok(r) = &result
                && r.status().is_success()
                && let Some(r) = reserved.take()
            {
                r.confirm();
            }
            if !again || i + 1 == candidates.len().min(2) {
                return result;
            }
            tracing::info!(node = %tag, "the chosen node refused or did not answer: trying the next");
            last = result;
        }
        last
    }

    async fn send(
        &self,
        tag: NodeTag,
        member: &Member,
        parts: Parts,
        payload: Payload,
        owner: Option<&Owner>,
    ) -> Result<Response, RouteError> {
        self.send_addr(tag, member.addr, parts, payload, owner).await
    }

    /// Forwards one request to one agent.
    async fn send_addr(
        &self,
        tag: NodeTag,
        addr: SocketAddr,
        parts: Parts,
        payload: Payload,
        owner: Option<&Owner>,
    ) -> Result<Response, RouteError> {
        let body = match payload {
            Payload::Stream(body) => body,
            Payload::Read(bytes) => Body::from(bytes),
        };
        metrics::counter!("kernelbox_routed_requests_total", "node" => tag.to_string()).increment(1);
        let transport = self.membership.transport();
        match transport.forward(addr, Request::from_parts(parts, body), owner).await {
            Ok(response) => Ok(response),
            Err(TransportError::Connect { why, .. }) => {
                tracing::warn!(node = %tag, %addr, why, "could not reach the node");
                Err(RouteError::NodeUnreachable(tag))
            }
            Err(TransportError::Timeout { .. }) => Err(RouteError::NodeUnreachable(tag)),
            Err(TransportError::Protocol { why, .. }) => Err(RouteError::AgentProtocol { tag: tag.to_string(), why }),
        }
    }
}

/// A request's head without its extensions (for a retry or a fan-out: no upgrade there).
fn copy_head(parts: &Parts) -> Parts {
    let mut req = Request::new(());
    *req.method_mut() = parts.method.clone();
    *req.uri_mut() = parts.uri.clone();
    *req.version_mut() = parts.version;
    *req.headers_mut() = parts.headers.clone();
    req.into_parts().0
}

/// Why no agent can take a request that any agent could: none known, or none answers.
fn no_live_agent(snapshot: &super::membership::Snapshot) -> RouteError {
    if snapshot.members.is_empty() {
        RouteError::NoNodeAvailable("no agent is known or answers".into())
    } else {
        RouteError::NoNodeAnswers
    }
}

fn is_length_limit(e: &axum::Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if err.is::<http_body_util::LengthLimitError>() {
            return true;
        }
        source = err.source();
    }
    false
}

fn random_seed() -> u64 {
    uuid::Uuid::new_v4().as_u64_pair().0
}

/// A built replica: membership refreshed once, not yet serving.
pub struct ApiRole {
    listener: TcpListener,
    router: Router,
    membership: Arc<Membership>,
    header_read_timeout: Duration,
}

impl ApiRole {
    /// Starts membership (one round now, so a replica that starts next to its agents is ready at once).
    pub async fn build(listener: TcpListener, settings: ApiRoleSettings, transport: Arc<dyn AgentTransport>) -> Self {
        system::prometheus();
        let membership = Arc::new(Membership::new(settings.membership, settings.discovery, transport));
        membership.refresh(Instant::now()).await;
        let routing = Routing {
            membership: membership.clone(),
            policy: Arc::new(settings.policy),
            default_memory_mb: settings.default_memory_mb,
            default_cpus: settings.default_cpus,
            body_read_timeout: settings.http.body_read_timeout,
        };
        let router = router(routing, Keys::new(&settings.api_keys), &settings.http);
        ApiRole { listener, router, membership, header_read_timeout: settings.http.header_read_timeout }
    }

    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    pub fn membership(&self) -> Arc<Membership> {
        self.membership.clone()
    }

    /// Serves and refreshes membership until `shutdown`.
    pub async fn run_until_stopped(self, shutdown: CancellationToken) {
        let tracker = TaskTracker::new();
        tracker.spawn(self.membership.clone().run(shutdown.clone()));
        crate::api::serve::serve(self.listener, self.router, self.header_read_timeout, shutdown).await;
        tracker.close();
        tracker.wait().await;
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;

    use tower::ServiceExt;

    use super::*;
    use crate::cluster::membership::tests::info;
    use crate::cluster::transport::TransportError;

    /// Agents at 10.0.0.n: each answers its info, and `answers[n]` (status) to anything else; every
    /// request other than a probe is recorded as (n, method path).
    struct Agents {
        answers: BTreeMap<u8, Option<StatusCode>>,
        calls: Mutex<Vec<(u8, String)>>,
    }

    #[async_trait::async_trait]
    impl AgentTransport for Agents {
        async fn send(&self, addr: SocketAddr, req: Request) -> Result<Response, TransportError> {
            let n = match addr.ip() {
                std::net::IpAddr::V4(ip) => ip.octets()[3],
                std::net::IpAddr::V6(_) => 0,
            };
            if req.uri().path() == crate::node::INFO_PATH {
                let mut i = info(&format!("0000000{n}"), &format!("n{n}"), true);
                i.images.insert("python".into(), Some("h".into()));
                i.usage.sessions = u32::from(n);
                return Ok(axum::Json(i).into_response());
            }
            self.calls.lock().unwrap().push((n, format!("{} {}", req.method(), req.uri().path())));
            match self.answers.get(&n).copied().flatten() {
                Some(status) => Ok(status.into_response()),
                None => Err(TransportError::Connect { addr, why: "refused".into() }),
            }
        }
    }

    async fn replica(answers: &[(u8, Option<StatusCode>)]) -> (Router, Arc<Agents>) {
        replica_with(answers, |_| {}).await
    }

    /// A replica whose membership `alter` may change after the first probe.
    async fn replica_with(
        answers: &[(u8, Option<StatusCode>)],
        alter: impl FnOnce(&Membership),
    ) -> (Router, Arc<Agents>) {
        let agents = Arc::new(Agents { answers: answers.iter().copied().collect(), calls: Mutex::default() });
        let addrs = answers.iter().map(|(n, _)| SocketAddr::from(([10, 0, 0, *n], 7443))).collect();
        let config = MembershipConfig { lost_after: Duration::from_secs(60), probe_timeout: Duration::from_secs(1) };
        let membership = Arc::new(Membership::new(config, Discovery::Static(addrs), agents.clone()));
        membership.refresh(Instant::now()).await;
        alter(&membership);
        let routing = Routing {
            membership,
            policy: Arc::new(Policy::default()),
            default_memory_mb: 512,
            default_cpus: 1.0,
            body_read_timeout: Duration::from_secs(5),
        };
        let http = HttpLimits {
            rate_limit: None,
            mcp_sessions: crate::config::McpSessionLimits { total: 8, per_key: 8 },
            header_read_timeout: Duration::from_secs(5),
            body_read_timeout: Duration::from_secs(5),
        };
        (router(routing, Keys::new(&["k".into()]), &http), agents)
    }

    fn create() -> Request {
        Request::post("/v1/sessions")
            .header("x-api-key", "k")
            .header("content-type", "application/json")
            .body(Body::from(r#"{"language":"python"}"#))
            .unwrap()
    }

    #[tokio::test]
    async fn a_create_refused_by_the_chosen_node_is_retried_once_on_the_next() {
        // Node 1 is the least loaded (1 session against 2 and 3): chosen first; it is full.
        let (app, agents) = replica(&[
            (1, Some(StatusCode::TOO_MANY_REQUESTS)),
            (2, Some(StatusCode::CREATED)),
            (3, Some(StatusCode::CREATED)),
        ])
        .await;
        let response = app.clone().oneshot(create()).await.unwrap();
        assert_eq!(response.status(), StatusCode::CREATED);
        assert_eq!(
            agents.calls.lock().unwrap().clone(),
            [(1, "POST /v1/sessions".into()), (2, "POST /v1/sessions".into())]
        );
        // Both refuse: the second refusal is the answer, no third try.
        let (app, agents) =
            replica(&[(1, Some(StatusCode::SERVICE_UNAVAILABLE)), (2, None), (3, Some(StatusCode::CREATED))]).await;
        let response = app.oneshot(create()).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(agents.calls.lock().unwrap().len(), 2);
    }

    #[tokio::test]
    async fn a_call_on_a_session_is_not_retried_elsewhere() {
        let (app, agents) = replica(&[(1, Some(StatusCode::SERVICE_UNAVAILABLE)), (2, Some(StatusCode::OK))]).await;
        let req = Request::post("/v1/sessions/0123456789abcdef00000001/execute")
            .header("x-api-key", "k")
            .body(Body::from("{}"))
            .unwrap();
        let response = app.oneshot(req).await.unwrap();
        assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(
            agents.calls.lock().unwrap().clone(),
            [(1, "POST /v1/sessions/0123456789abcdef00000001/execute".into())]
        );
    }

    fn call(method: &str, path: &str) -> Request {
        Request::builder().method(method).uri(path).header("x-api-key", "k").body(Body::empty()).unwrap()
    }

    async fn detail(response: Response) -> serde_json::Value {
        let body = axum::body::to_bytes(response.into_body(), 1 << 16).await.unwrap();
        serde_json::from_slice(&body).unwrap()
    }

    #[tokio::test]
    async fn a_lost_nodes_sessions_are_410_delete_204_and_an_unknown_tag_404_in_each_apis_shape() {
        // Node 2 answered once, then went silent and left DNS for longer than lost_after.
        let (app, agents) = replica_with(&[(1, Some(StatusCode::OK)), (2, Some(StatusCode::OK))], |m| {
            let config =
                MembershipConfig { lost_after: Duration::from_secs(60), probe_timeout: Duration::from_secs(1) };
            let one = SocketAddr::from(([10, 0, 0, 1], 7443));
            let round = super::super::membership::Round {
                resolved: vec![one],
                probes: vec![(one, Ok(info("00000001", "n1", true)))],
            };
            let later = Instant::now() + Duration::from_secs(61);
            m.set(super::super::membership::next(&m.snapshot(), round, later, &config));
        })
        .await;
        let lost = "/v1/sessions/0123456789abcdef00000002";
        let response = app.clone().oneshot(call("GET", lost)).await.unwrap();
        assert_eq!(response.status(), StatusCode::GONE);
        assert_eq!(detail(response).await["error"]["code"], "session_lost");
        assert_eq!(app.clone().oneshot(call("DELETE", lost)).await.unwrap().status(), StatusCode::NO_CONTENT);
        assert_eq!(
            app.clone()
                .oneshot(call("DELETE", "/api/kernels/01234567-89ab-cdef-0123-456700000002"))
                .await
                .unwrap()
                .status(),
            StatusCode::NO_CONTENT
        );
        let response = app.clone().oneshot(call("GET", "/jupyter/files/a-0123456789ab00000002-1.txt")).await.unwrap();
        assert_eq!(response.status(), StatusCode::GONE);
        assert!(detail(response).await["detail"].as_str().unwrap().contains("lost"), "the /jupyter API's shape");
        // A tag never seen.
        let response = app.clone().oneshot(call("DELETE", "/v1/sessions/0123456789abcdef0000000f")).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert_eq!(detail(response).await["error"]["code"], "not_found");
        let response = app.oneshot(call("GET", "/jupyter/files/a-0123456789ab0000000f-1.txt")).await.unwrap();
        assert_eq!(response.status(), StatusCode::NOT_FOUND);
        assert!(detail(response).await["detail"].is_string());
        assert!(agents.calls.lock().unwrap().is_empty(), "the replica answered all of these itself");
    }
}
