//! The errors an API replica makes itself (everything else is the agent's answer, passed on as it is),
//! as a typed [`RouteError`] that becomes the API's `{"error": {...}}` (or, on the compatibility APIs'
//! routes, `{"detail": ...}`: see `api_role`).

use std::time::Duration;

use axum::http::StatusCode;

use crate::error::ApiError;
use crate::node::NodeTag;

/// How long a client should wait before trying again a node that does not answer, or a full cluster.
pub const RETRY_AFTER: Duration = Duration::from_secs(2);

/// Why a replica answers a request itself.
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum RouteError {
    /// A malformed id, or a tag no agent has ever had: the same answer as a random id on one node.
    #[error("no such session (or not yours)")]
    SessionNotFound,
    /// The node that holds the session did not answer its last probe (or this request).
    #[error("the node {0} holding this session does not answer; retry shortly")]
    NodeUnreachable(NodeTag),
    /// Nodes are known, but none answers (a request any node could serve, or a list).
    #[error("no node answers; retry shortly")]
    NoNodeAnswers,
    /// The node was away longer than `lost_after` and left the cluster: its sessions are gone.
    #[error("the node {0} holding this session was lost: the session is gone; start a new one")]
    SessionLost(NodeTag),
    /// No agent could take a new session, and more room would not help (see [`NoPlace`]).
    #[error("no node can take this session: {0}")]
    NoNodeAvailable(String),
    /// No agent has room now (or a cluster-wide limit is met): a limit, like `max_sessions` on one node.
    #[error("{0}")]
    NoRoom(String),
    /// The agent answered garbage or broke off.
    #[error("the node {tag} answered something that is not a valid answer: {why}")]
    AgentProtocol { tag: String, why: String },
    /// A path no API has.
    #[error("no such endpoint; see /docs")]
    NoSuchEndpoint,
    /// A body the replica must read to route (a create request) is larger than it reads.
    #[error("the request body is larger than {0} bytes")]
    TooLarge(usize),
    /// A body the replica must read to route did not arrive within the body deadline.
    #[error("the request body did not arrive in time")]
    BodyTimeout,
    /// A body the replica must read to route broke off.
    #[error("the request body could not be read: {0}")]
    BodyUnreadable(String),
}

impl RouteError {
    /// A stable label for metrics (`kernelbox_route_errors_total{kind}`).
    pub fn kind(&self) -> &'static str {
        self.parts().1
    }

    /// The node the error is about, when there is one (a metrics label).
    pub fn node(&self) -> Option<String> {
        match self {
            RouteError::NodeUnreachable(tag) | RouteError::SessionLost(tag) => Some(tag.to_string()),
            RouteError::AgentProtocol { tag, .. } => Some(tag.clone()),
            _ => None,
        }
    }

    fn parts(&self) -> (StatusCode, &'static str, Option<Duration>) {
        match self {
            RouteError::SessionNotFound => (StatusCode::NOT_FOUND, "not_found", None),
            RouteError::NoSuchEndpoint => (StatusCode::NOT_FOUND, "not_found", None),
            RouteError::NodeUnreachable(_) | RouteError::NoNodeAnswers => {
                (StatusCode::SERVICE_UNAVAILABLE, "node_unreachable", Some(RETRY_AFTER))
            }
            RouteError::SessionLost(_) => (StatusCode::GONE, "session_lost", None),
            RouteError::NoNodeAvailable(_) => (StatusCode::SERVICE_UNAVAILABLE, "no_node_available", Some(RETRY_AFTER)),
            RouteError::NoRoom(_) => (StatusCode::TOO_MANY_REQUESTS, "too_many_sessions", Some(RETRY_AFTER)),
            RouteError::AgentProtocol { .. } => (StatusCode::BAD_GATEWAY, "agent_protocol_error", None),
            RouteError::TooLarge(_) => (StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", None),
            RouteError::BodyTimeout => (StatusCode::REQUEST_TIMEOUT, "request_timeout", None),
            RouteError::BodyUnreadable(_) => (StatusCode::BAD_REQUEST, "invalid_body", None),
        }
    }
}

impl From<RouteError> for ApiError {
    fn from(e: RouteError) -> Self {
        let (status, code, retry) = e.parts();
        let error = ApiError::new(status, code, e.to_string());
        match retry {
            Some(wait) => error.retry_after(wait),
            None => error,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::compat::DetailError;

    #[test]
    fn each_error_the_replica_makes_has_its_status_code_and_retry() {
        let tag = NodeTag::parse("0000abcd").unwrap();
        let check = |e: RouteError, status: u16, code: &str, retry: bool| {
            let api = ApiError::from(e);
            assert_eq!((api.status.as_u16(), api.code, api.retry_after.is_some()), (status, code, retry));
        };
        check(RouteError::SessionNotFound, 404, "not_found", false);
        check(RouteError::NodeUnreachable(tag), 503, "node_unreachable", true);
        check(RouteError::SessionLost(tag), 410, "session_lost", false);
        check(RouteError::NoNodeAvailable("no agent".into()), 503, "no_node_available", true);
        check(RouteError::NoRoom("full".into()), 429, "too_many_sessions", true);
        check(RouteError::AgentProtocol { tag: "x".into(), why: "eof".into() }, 502, "agent_protocol_error", false);
    }

    #[test]
    fn a_compat_route_gets_the_same_error_as_detail() {
        let e: DetailError = ApiError::from(RouteError::NoNodeAvailable("no agent is known".into())).into();
        assert_eq!(e.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(e.detail.contains("no agent is known"));
        assert!(e.retry_after.is_some());
    }
}
