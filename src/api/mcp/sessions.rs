//! rmcp's MCP sessions, bounded: a wrapper over its `LocalSessionManager` that refuses a new MCP session
//! beyond [`MAX_MCP_SESSIONS`] and has rmcp close idle ones after [`MCP_KEEP_ALIVE`]. MCP sessions are
//! rmcp's protocol state only: kernel sessions are not tied to them (see the parent module's doc).

use std::time::Duration;

use rmcp::model::{ClientJsonRpcMessage, ServerJsonRpcMessage};
use rmcp::transport::streamable_http_server::session::local::{LocalSessionManager, SessionConfig};
use rmcp::transport::streamable_http_server::session::{SessionId as McpSessionId, SessionManager as McpSessions};

/// MCP sessions held at once (each is a small task in rmcp); beyond it `initialize` is refused.
pub const MAX_MCP_SESSIONS: usize = 1024;
/// An MCP session without requests for this long is closed by rmcp (its kernels are not: see the `mcp` module doc).
pub const MCP_KEEP_ALIVE: Duration = Duration::from_secs(600);

/// rmcp's in-memory MCP sessions, at most `max` at once.
pub struct BoundedSessions {
    inner: LocalSessionManager,
    max: usize,
}

impl BoundedSessions {
    pub(super) fn new(max: usize) -> Self {
        let mut inner = LocalSessionManager::default();
        let mut config = SessionConfig::default();
        config.keep_alive = Some(MCP_KEEP_ALIVE);
        inner.session_config = config;
        BoundedSessions { inner, max }
    }
}

/// Why an MCP session operation failed.
#[derive(Debug, thiserror::Error)]
pub enum McpSessionError {
    #[error("too many MCP sessions are open (at most {0}); close one (DELETE /mcp) or retry later")]
    Full(usize),
    #[error(transparent)]
    Local(#[from] rmcp::transport::streamable_http_server::session::local::LocalSessionManagerError),
}

type Local = LocalSessionManager;
type Sse = rmcp::transport::common::server_side_http::ServerSseMessage;

impl McpSessions for BoundedSessions {
    type Error = McpSessionError;
    type Transport = <Local as McpSessions>::Transport;

    async fn create_session(&self) -> Result<(McpSessionId, Self::Transport), Self::Error> {
        if self.inner.sessions.read().await.len() >= self.max {
            return Err(McpSessionError::Full(self.max));
        }
        Ok(self.inner.create_session().await?)
    }

    async fn initialize_session(
        &self,
        id: &McpSessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<ServerJsonRpcMessage, Self::Error> {
        Ok(self.inner.initialize_session(id, message).await?)
    }

    async fn has_session(&self, id: &McpSessionId) -> Result<bool, Self::Error> {
        Ok(self.inner.has_session(id).await?)
    }

    async fn close_session(&self, id: &McpSessionId) -> Result<(), Self::Error> {
        Ok(self.inner.close_session(id).await?)
    }

    async fn create_stream(
        &self,
        id: &McpSessionId,
        message: ClientJsonRpcMessage,
    ) -> Result<impl futures::Stream<Item = Sse> + Send + Sync + 'static, Self::Error> {
        Ok(self.inner.create_stream(id, message).await?)
    }

    async fn accept_message(&self, id: &McpSessionId, message: ClientJsonRpcMessage) -> Result<(), Self::Error> {
        Ok(self.inner.accept_message(id, message).await?)
    }

    async fn create_standalone_stream(
        &self,
        id: &McpSessionId,
    ) -> Result<impl futures::Stream<Item = Sse> + Send + Sync + 'static, Self::Error> {
        Ok(self.inner.create_standalone_stream(id).await?)
    }

    async fn resume(
        &self,
        id: &McpSessionId,
        last_event_id: String,
    ) -> Result<impl futures::Stream<Item = Sse> + Send + Sync + 'static, Self::Error> {
        Ok(self.inner.resume(id, last_event_id).await?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn mcp_sessions_are_bounded() {
        let sessions = BoundedSessions::new(2);
        for _ in 0..2 {
            sessions.create_session().await.expect("within the bound");
        }
        assert!(matches!(sessions.create_session().await, Err(McpSessionError::Full(2))));
    }
}
