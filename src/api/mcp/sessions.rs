//! rmcp's MCP sessions, bounded per API key and in total: a wrapper over its `LocalSessionManager` that
//! knows whose each session is ([`Table`]), closes the least recently used idle one to make room, and
//! refuses a new one only when nothing can be closed: 429 (the key's share) or 503 (the service's), with
//! `Retry-After` and a JSON-RPC error that names the limit, never rmcp's 500. rmcp closes a session idle
//! for [`MCP_KEEP_ALIVE`]. MCP sessions are rmcp's protocol state only: kernel sessions are not tied to
//! them (see the parent module's doc).
//!
//! rmcp asks for a new session without saying for whom, so [`bounded`] (the middleware in front of rmcp)
//! puts the request's owner in a task-local for the time rmcp serves the request, and reads back a
//! refusal, if any, to answer it. (rmcp itself logs the refusal as an internal error on its way out; the
//! client never sees that answer.)

use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::extract::Request;
use axum::http::{Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use futures::{Stream, StreamExt};
use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::streamable_http_server::session::local::{
    LocalSessionManager, LocalSessionManagerError, SessionConfig,
};
use rmcp::transport::streamable_http_server::session::{SessionId as McpSessionId, SessionManager as McpSessions};
use serde_json::json;

use super::table::{Refusal, Table};
use crate::config::McpSessionLimits;
use crate::node::NodeTag;
use crate::session::Owner;

/// An MCP session without requests for this long is closed by rmcp (its kernels are not: see the `mcp` module doc).
pub const MCP_KEEP_ALIVE: Duration = Duration::from_secs(600);
/// What a refused client is told to wait: a request under way usually ends within it.
const RETRY_AFTER: Duration = Duration::from_secs(5);
/// The most of an `initialize` body kept to answer a refusal with its JSON-RPC id.
const ID_PREFIX: usize = 64 * 1024;

tokio::task_local! {
    /// The caller of the request rmcp is serving (set by [`bounded`]).
    static CALLER: Caller;
}

/// Whose request rmcp is serving, and where a refusal of a new session is left for [`bounded`].
#[derive(Clone)]
struct Caller {
    owner: Owner,
    refused: Arc<OnceLock<Refusal>>,
}

/// rmcp's in-memory MCP sessions, bounded per key and in total.
pub struct BoundedSessions {
    inner: LocalSessionManager,
    /// Touched briefly, never across an `.await`. Keyed by rmcp's own ids.
    table: Arc<Mutex<Table<McpSessionId>>>,
    /// On a cluster's agent, the node's tag: clients see `<rmcp id>-<tag>` (so any API replica routes
    /// the MCP session by its id alone), rmcp and the table its own id. `None`: rmcp's ids as they are.
    node: Option<NodeTag>,
}

impl BoundedSessions {
    pub fn new(limits: McpSessionLimits) -> Self {
        let mut inner = LocalSessionManager::default();
        let mut config = SessionConfig::default();
        config.keep_alive = Some(MCP_KEEP_ALIVE);
        inner.session_config = config;
        BoundedSessions { inner, table: Arc::new(Mutex::new(Table::new(limits))), node: None }
    }

    /// The same, for the node tagged `node` (ids as clients see them end with `-<tag>`).
    pub fn on_node(self, node: Option<NodeTag>) -> Self {
        BoundedSessions { node, ..self }
    }

    /// rmcp's id as clients see it.
    fn outward(&self, id: McpSessionId) -> McpSessionId {
        match self.node {
            Some(tag) => format!("{id}-{tag}").into(),
            None => id,
        }
    }

    /// The rmcp id behind an id a client sent; `None` when it is not one of this node's.
    fn inward(&self, id: &McpSessionId) -> Option<McpSessionId> {
        match self.node {
            Some(tag) => id.strip_suffix(tag.as_str())?.strip_suffix('-').filter(|s| !s.is_empty()).map(Into::into),
            None => Some(id.clone()),
        }
    }

    /// [`inward`](Self::inward), or the error rmcp answers an unknown session with.
    fn known(&self, id: &McpSessionId) -> Result<McpSessionId, McpSessionError> {
        self.inward(id).ok_or_else(|| McpSessionError::Local(LocalSessionManagerError::SessionNotFound(id.clone())))
    }

    /// MCP sessions held now (those being made included), for `/metrics`.
    pub fn count(&self) -> usize {
        self.table().len()
    }

    fn table(&self) -> std::sync::MutexGuard<'_, Table<McpSessionId>> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new session for `owner`, once there is room (the sessions that make it are closed first).
    async fn create_for(
        &self,
        owner: &Owner,
    ) -> Result<(McpSessionId, <Self as McpSessions>::Transport), McpSessionError> {
        let closing = self.table().admit(owner).map_err(|refusal| {
            let limit = match refusal {
                Refusal::PerKey(_) => "per_key",
                Refusal::Total(_) => "total",
            };
            metrics::counter!("kernelbox_mcp_sessions_refused_total", "limit" => limit).increment(1);
            McpSessionError::Full(refusal)
        })?;
        // Counted from here on: given back unless the session gets its id (also if this call is dropped).
        let mut admitted = Admitted { table: &self.table, owner: Some(owner) };
        for id in closing {
            metrics::counter!("kernelbox_mcp_sessions_evicted_total").increment(1);
            tracing::info!(mcp_session = %id, "closing an idle MCP session to make room for a new one");
            if let Err(e) = self.inner.close_session(&id).await {
                tracing::warn!(mcp_session = %id, error = %e, "could not close an idle MCP session");
            }
        }
        let (id, transport) = self.inner.create_session().await?;
        admitted.owner = None;
        self.table().name(owner, id.clone(), Instant::now());
        Ok((id, transport))
    }

    /// Marks a stream of session `id` under way until the returned guard is dropped.
    fn in_use(&self, id: &McpSessionId) -> InUse {
        self.table().begin(id, Instant::now(), true);
        InUse { table: self.table.clone(), id: id.clone() }
    }
}

/// A session admitted into the table but not yet named: given back when dropped with its owner.
struct Admitted<'a> {
    table: &'a Mutex<Table<McpSessionId>>,
    owner: Option<&'a Owner>,
}

impl Drop for Admitted<'_> {
    fn drop(&mut self) {
        if let Some(owner) = self.owner {
            self.table.lock().unwrap_or_else(|e| e.into_inner()).cancel(owner);
        }
    }
}

/// A stream of a session under way: the session is not idle while this lives.
struct InUse {
    table: Arc<Mutex<Table<McpSessionId>>>,
    id: McpSessionId,
}

impl Drop for InUse {
    fn drop(&mut self) {
        self.table.lock().unwrap_or_else(|e| e.into_inner()).end(&self.id, Instant::now());
    }
}

/// `stream`, keeping its session in use until it ends or is dropped.
fn held<S: Stream<Item = Sse> + Send + Sync + 'static>(
    stream: S,
    in_use: InUse,
) -> impl Stream<Item = Sse> + Send + Sync + 'static {
    stream.map(move |message| {
        let _held = &in_use;
        message
    })
}

/// Why an MCP session operation failed.
#[derive(Debug, thiserror::Error)]
pub enum McpSessionError {
    #[error("{}", refusal_message(*.0))]
    Full(Refusal),
    #[error(transparent)]
    Local(#[from] rmcp::transport::streamable_http_server::session::local::LocalSessionManagerError),
}

fn refusal_message(refusal: Refusal) -> String {
    let wait = RETRY_AFTER.as_secs();
    match refusal {
        Refusal::PerKey(max) => format!(
            "too many MCP sessions in use for this API key: at most {max}, and none is idle to make room; \
             close one (DELETE /mcp) or retry after {wait} s"
        ),
        Refusal::Total(max) => format!(
            "too many MCP sessions in use on this server: at most {max}, and none is idle to make room; retry \
             after {wait} s"
        ),
    }
}

type Local = LocalSessionManager;
type Sse = rmcp::transport::common::server_side_http::ServerSseMessage;
/// rmcp's stream of a session, owned (its id here is a translated copy, not the caller's).
type Streamed = std::pin::Pin<Box<dyn Stream<Item = Sse> + Send + Sync + 'static>>;

impl McpSessions for BoundedSessions {
    type Error = McpSessionError;
    type Transport = <Local as McpSessions>::Transport;

    async fn create_session(&self) -> Result<(McpSessionId, Self::Transport), Self::Error> {
        // Outside `bounded` (never on the router) the caller is nobody in particular.
        let caller = CALLER.try_with(Caller::clone).ok();
        let owner = caller.as_ref().map_or_else(|| Owner("anonymous".into()), |c| c.owner.clone());
        let created = self.create_for(&owner).await.map(|(id, transport)| (self.outward(id), transport));
        if let (Err(McpSessionError::Full(refusal)), Some(caller)) = (&created, &caller) {
            let _ = caller.refused.set(*refusal);
        }
        created
    }

    async fn initialize_session(
        &self,
        id: &McpSessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, Self::Error> {
        let id = self.known(id)?;
        Ok(self.inner.initialize_session(&id, message).await?)
    }

    async fn has_session(&self, id: &McpSessionId) -> Result<bool, Self::Error> {
        let Some(id) = self.inward(id) else { return Ok(false) };
        self.table().begin(&id, Instant::now(), false);
        Ok(self.inner.has_session(&id).await?)
    }

    async fn close_session(&self, id: &McpSessionId) -> Result<(), Self::Error> {
        let id = self.known(id)?;
        self.table().remove(&id);
        Ok(self.inner.close_session(&id).await?)
    }

    async fn create_stream(
        &self,
        id: &McpSessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<impl Stream<Item = Sse> + Send + Sync + 'static, Self::Error> {
        let id = self.known(id)?;
        let in_use = self.in_use(&id);
        let stream: Streamed = Box::pin(self.inner.create_stream(&id, message).await?);
        Ok(held(stream, in_use))
    }

    async fn accept_message(&self, id: &McpSessionId, message: ClientJsonRpcMessage) -> Result<(), Self::Error> {
        let id = self.known(id)?;
        self.table().begin(&id, Instant::now(), false);
        Ok(self.inner.accept_message(&id, message).await?)
    }

    async fn create_standalone_stream(
        &self,
        id: &McpSessionId,
    ) -> Result<impl Stream<Item = Sse> + Send + Sync + 'static, Self::Error> {
        let id = self.known(id)?;
        let in_use = self.in_use(&id);
        let stream: Streamed = Box::pin(self.inner.create_standalone_stream(&id).await?);
        Ok(held(stream, in_use))
    }

    async fn resume(
        &self,
        id: &McpSessionId,
        last_event_id: String,
    ) -> Result<impl Stream<Item = Sse> + Send + Sync + 'static, Self::Error> {
        let id = self.known(id)?;
        let in_use = self.in_use(&id);
        let stream: Streamed = Box::pin(self.inner.resume(&id, last_event_id).await?);
        Ok(held(stream, in_use))
    }
}

/// Middleware in front of rmcp: serves the request with its owner known to [`BoundedSessions`], and
/// answers a refused new session with 429 (the key's share) or 503 (the service's), `Retry-After`, and a
/// JSON-RPC error naming the limit, in place of rmcp's 500.
pub async fn bounded(req: Request, next: Next) -> Response {
    let Some(owner) = req.extensions().get::<Owner>().cloned() else {
        return next.run(req).await;
    };
    // A POST without a session id may be an `initialize`: keep the start of its body for the answer's id.
    let opens = req.method() == Method::POST && !req.headers().contains_key("mcp-session-id");
    let prefix = Arc::new(Mutex::new(Vec::new()));
    let req = if opens { keep_prefix(req, prefix.clone()) } else { req };
    let caller = Caller { owner, refused: Arc::new(OnceLock::new()) };
    let refused = caller.refused.clone();
    let response = CALLER.scope(caller, next.run(req)).await;
    match refused.get() {
        Some(refusal) => {
            let prefix = prefix.lock().unwrap_or_else(|e| e.into_inner());
            refusal_response(*refusal, &prefix)
        }
        None => response,
    }
}

/// The request, keeping the first [`ID_PREFIX`] bytes of its body in `prefix` as rmcp reads it.
fn keep_prefix(req: Request, prefix: Arc<Mutex<Vec<u8>>>) -> Request {
    req.map(|body| {
        let stream = body.into_data_stream().inspect(move |chunk| {
            if let Ok(bytes) = chunk {
                let mut kept = prefix.lock().unwrap_or_else(|e| e.into_inner());
                let room = ID_PREFIX.saturating_sub(kept.len());
                kept.extend_from_slice(&bytes[..bytes.len().min(room)]);
            }
        });
        Body::from_stream(stream)
    })
}

fn refusal_response(refusal: Refusal, body_prefix: &[u8]) -> Response {
    let (status, limit, max) = match refusal {
        Refusal::PerKey(max) => (StatusCode::TOO_MANY_REQUESTS, "mcp_sessions_per_key", max),
        Refusal::Total(max) => (StatusCode::SERVICE_UNAVAILABLE, "mcp_sessions", max),
    };
    let id = serde_json::from_slice::<serde_json::Value>(body_prefix)
        .ok()
        .and_then(|v| v.get("id").cloned())
        .unwrap_or(serde_json::Value::Null);
    let retry_after_s = RETRY_AFTER.as_secs();
    let body = json!({
        "jsonrpc": "2.0",
        "id": id,
        "error": {
            "code": -32000,
            "message": refusal_message(refusal),
            "data": {"limit": limit, "max": max, "retry_after_s": retry_after_s},
        },
    });
    let response = (status, [(header::CONTENT_TYPE, "application/json")], body.to_string()).into_response();
    crate::error::with_retry_after(response, Some(RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(total: usize, per_key: usize) -> McpSessionLimits {
        McpSessionLimits { total, per_key }
    }

    async fn open(sessions: &BoundedSessions, owner: &str) -> Result<McpSessionId, McpSessionError> {
        let caller = Caller { owner: Owner(owner.into()), refused: Arc::new(OnceLock::new()) };
        CALLER.scope(caller, sessions.create_session()).await.map(|(id, _transport)| id)
    }

    #[tokio::test]
    async fn a_key_past_its_share_closes_its_own_oldest_idle_session_in_rmcp_too() {
        let sessions = BoundedSessions::new(limits(4, 2));
        let first = open(&sessions, "a").await.unwrap();
        open(&sessions, "a").await.unwrap();
        open(&sessions, "a").await.unwrap();
        assert_eq!(sessions.count(), 2);
        assert!(!sessions.inner.has_session(&first).await.unwrap(), "rmcp let the oldest go");
        open(&sessions, "b").await.unwrap();
        assert_eq!(sessions.count(), 3);
    }

    #[tokio::test]
    async fn sessions_in_use_are_never_closed_and_a_full_table_is_a_refusal_not_an_error() {
        let sessions = BoundedSessions::new(limits(2, 2));
        let a = open(&sessions, "a").await.unwrap();
        let b = open(&sessions, "b").await.unwrap();
        let _streams = (sessions.in_use(&a), sessions.in_use(&b));
        assert!(matches!(open(&sessions, "c").await, Err(McpSessionError::Full(Refusal::Total(2)))));
        drop(_streams);
        open(&sessions, "c").await.unwrap();
        assert_eq!(sessions.count(), 2);
    }

    #[tokio::test]
    async fn a_closed_session_leaves_the_table() {
        let sessions = BoundedSessions::new(limits(2, 2));
        let a = open(&sessions, "a").await.unwrap();
        sessions.close_session(&a).await.unwrap();
        assert_eq!(sessions.count(), 0);
    }

    #[tokio::test]
    async fn on_an_agent_clients_see_ids_ending_with_the_node_tag_and_rmcp_its_own() {
        let tag = NodeTag::parse("0123abcd").unwrap();
        let sessions = BoundedSessions::new(limits(4, 4)).on_node(Some(tag));
        let a = open(&sessions, "a").await.unwrap();
        assert!(a.ends_with("-0123abcd"), "{a}");
        assert_eq!(NodeTag::suffix_of(&a), Some(tag), "what a replica routes by");
        assert!(sessions.has_session(&a).await.unwrap());
        let bare: McpSessionId = a.strip_suffix("-0123abcd").unwrap().into();
        assert!(sessions.inner.has_session(&bare).await.unwrap(), "rmcp knows its own id");
        assert!(!sessions.has_session(&bare).await.unwrap(), "an id without the tag is no session here");
        let elsewhere: McpSessionId = format!("{bare}-89abcdef").into();
        assert!(!sessions.has_session(&elsewhere).await.unwrap(), "nor one of another node");
        assert!(sessions.close_session(&elsewhere).await.is_err());
        assert_eq!(sessions.count(), 1, "closing another node's id closed nothing here");
        sessions.close_session(&a).await.unwrap();
        assert_eq!(sessions.count(), 0);
    }

    /// The refusal's status, `Retry-After` and JSON-RPC body.
    async fn refused(refusal: Refusal, body_prefix: &[u8]) -> (StatusCode, String, serde_json::Value) {
        let r = refusal_response(refusal, body_prefix);
        let retry_after = r.headers()[header::RETRY_AFTER].to_str().unwrap().to_owned();
        let status = r.status();
        let body = axum::body::to_bytes(r.into_body(), 1 << 16).await.unwrap();
        (status, retry_after, serde_json::from_slice(&body).unwrap())
    }

    #[tokio::test]
    async fn a_refusal_is_a_json_rpc_error_naming_the_limit_with_the_requests_id() {
        let initialize = br#"{"jsonrpc":"2.0","method":"initialize","params":{},"id":7}"#;
        let (status, retry_after, v) = refused(Refusal::PerKey(256), initialize).await;
        assert_eq!((status, retry_after.as_str()), (StatusCode::TOO_MANY_REQUESTS, "5"));
        assert_eq!(v["id"], 7);
        assert_eq!(v["error"]["data"]["limit"], "mcp_sessions_per_key");
        assert!(v["error"]["message"].as_str().unwrap().contains("at most 256"));
        let (status, _, v) = refused(Refusal::Total(1024), b"{cut").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(v["id"], serde_json::Value::Null, "no id to be read");
        assert_eq!(v["error"]["data"]["limit"], "mcp_sessions");
    }
}
