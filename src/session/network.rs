//! Sessions' networks by name (issue 22) as the session layer keeps them: a request's allow-list checked
//! against the operator's bounds, each session's network attached at its first boot (its list from the
//! service's record of the last `PUT`, else from its settings: adoption after a restart keeps it), a
//! list replaced while the session runs, and what a client reads back. The proxy and the gates are
//! `src/egress/`'s.

use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;

use super::error::SessionError;
use super::model::{NetworkRequest, SessionId, SessionSettings};
use super::records;
use crate::egress::allow::AllowList;
use crate::egress::hub::EgressHub;
use crate::egress::session::SessionEgress;

/// A session's network as it is now.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, utoipa::ToSchema)]
pub struct NetworkView {
    /// What the next connection follows.
    pub allow: Vec<String>,
    /// Connections open now.
    pub open_connections: usize,
    /// The proxy is up (when it is not, every connection is refused).
    pub proxy_up: bool,
}

/// The session layer's side of the egress hub.
pub struct Networks {
    pub hub: Arc<EgressHub>,
    /// `<state>/network`: each session's list after its last `PUT`.
    pub dir: PathBuf,
}

impl Networks {
    /// Checks a request's list against the operator's bounds.
    pub fn check(&self, request: &NetworkRequest) -> Result<AllowList, SessionError> {
        Ok(AllowList::parse(&request.allow, self.hub.policy())?)
    }

    /// The session's network, made on its first boot: its list as last set (the record), else as it
    /// started (its settings), else empty.
    pub fn attach(&self, id: &SessionId, settings: &SessionSettings) -> Arc<SessionEgress> {
        self.hub.session(id.as_str(), || {
            let entries = records::read::<Vec<String>>(&self.dir, id.as_str())
                .or_else(|| settings.network.clone())
                .unwrap_or_default();
            // Checked when it was set; the operator's bounds may have narrowed since: what they refuse now
            // leaves the session with no list (its connections are refused, and reported).
            AllowList::parse(&entries, self.hub.policy()).unwrap_or_else(|e| {
                tracing::warn!(session_id = %id, error = %e, "a session's allow-list is no longer allowed; it has none now");
                AllowList::default()
            })
        })
    }

    /// Replaces a running session's list (recorded first, so a restart keeps it).
    pub fn set(&self, id: &SessionId, allow: AllowList) -> Result<NetworkView, SessionError> {
        // Attached at its first boot: a session without one is gone (or going).
        let session = self.hub.get(id.as_str()).ok_or_else(|| SessionError::NotFound(id.to_string()))?;
        records::replace(&self.dir, id, &allow.entries())?;
        let closed = session.set_allow_list(allow, self.hub.policy());
        if closed > 0 {
            tracing::info!(session_id = %id, closed, "closed the connections the new allow-list drops");
        }
        Ok(self.view(&session))
    }

    pub fn get(&self, id: &SessionId) -> Result<NetworkView, SessionError> {
        let session = self.hub.get(id.as_str()).ok_or_else(|| SessionError::NotFound(id.to_string()))?;
        Ok(self.view(&session))
    }

    fn view(&self, session: &SessionEgress) -> NetworkView {
        NetworkView {
            allow: session.allow_list().entries(),
            open_connections: session.open_connections(),
            proxy_up: self.hub.is_up(),
        }
    }

    /// The session's task ended: its connections close; its record goes unless it is kept for adoption.
    pub fn forget(&self, id: &str, keep_record: bool) {
        self.hub.forget(id);
        if !keep_record {
            records::remove(&self.dir, id);
        }
    }
}
