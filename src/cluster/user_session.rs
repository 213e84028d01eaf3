//! The session API through a cluster (`/start_session`, `/execute`, `/install_package`, `/reset`,
//! `/end_session`, keyed by `user_id`): where a user's session is, and where a new one goes.
//!
//! The rule:
//! - A call on an existing session goes first to the user's rendezvous node (highest weight for
//!   (owner, `user_id`) among the Up agents). If that agent answers 404 (it has no session for the user:
//!   membership changed since the session was made), the replica asks every other Up agent for the
//!   owner's sessions (`GET /v1/sessions`, the user's is the one whose metadata says `kernelbox.api =
//!   session` and `kernelbox.user_id = <user>`) and sends the call, the same bytes, to the node that has
//!   it. None has it: the first 404 stands; unless some node did not answer, then 503 `node_unreachable`
//!   (the session may be there).
//! - `/start_session` asks every Up agent first, in parallel. A node that has the user's session gets the
//!   call (the agent keeps it, or replaces a dead one). No node has it and every node answered: the
//!   user's rendezvous node among the placement candidates gets it (the next candidate if it refuses).
//!   Some node did not answer: 503 `node_unreachable`, so that two sessions are never made for one user.
//!   Two replicas starting one new user at once pick the same node (same membership), where the agent's
//!   own guard keeps the oldest session; only replicas with different views of membership could both
//!   create, and the next call's look-up then finds the oldest (the other idles out).

use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{HeaderName, HeaderValue, Request};
use serde_json::Value;

use super::fanout::ask_all;
use super::membership::Snapshot;
use super::transport::AgentTransport;
use crate::api::session_compat::{API_KEY, USER_KEY};
use crate::node::{NodeTag, OWNER_HEADER};
use crate::session::Owner;

/// Where a user's session is, as far as the agents answered.
#[derive(Debug, PartialEq)]
pub enum Found {
    At(NodeTag, SocketAddr),
    /// Every asked node answered: the user has no session.
    Nowhere,
    /// No node that answered has it, and these did not answer.
    Unknown(Vec<NodeTag>),
}

/// Whether a `/v1/sessions` item is the session API's session of `user_id`.
fn is_users(item: &Value, user_id: &str) -> bool {
    let meta = |k: &str| item.get("metadata").and_then(|m| m.get(k)).and_then(Value::as_str);
    meta(USER_KEY) == Some(user_id) && meta(API_KEY) == Some("session")
}

/// Asks every Up agent but `skip` for `owner`'s sessions and finds `user_id`'s (the oldest, should there
/// be two).
pub async fn find(
    transport: &Arc<dyn AgentTransport>,
    snapshot: &Snapshot,
    owner: &Owner,
    user_id: &str,
    skip: Option<NodeTag>,
) -> Found {
    let mut view = snapshot.clone();
    if let Some(skip) = skip {
        view.members.remove(&skip);
    }
    let answers = ask_all(transport, &view, || {
        let mut req = Request::get("/v1/sessions").body(Body::empty()).unwrap_or_default();
        if let Ok(value) = HeaderValue::from_str(&owner.0) {
            req.headers_mut().insert(HeaderName::from_static(OWNER_HEADER), value);
        }
        req
    })
    .await;
    let oldest = answers
        .lists
        .iter()
        .flat_map(|(tag, list)| list.iter().map(move |item| (tag, item)))
        .filter(|(_, item)| is_users(item, user_id))
        .min_by_key(|(_, item)| item.get("created_at").and_then(Value::as_str).unwrap_or("").to_owned());
    match oldest {
        Some((tag, _)) => match snapshot.members.get(tag) {
            Some(m) => Found::At(*tag, m.addr),
            None => Found::Nowhere,
        },
        None if answers.missing.is_empty() => Found::Nowhere,
        None => Found::Unknown(answers.missing),
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::time::{Duration, Instant};

    use axum::http::StatusCode;

    use super::*;
    use crate::cluster::membership::tests::{FakeAgents, info};
    use crate::cluster::membership::{MembershipConfig, Round, next};

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 7443))
    }

    fn snapshot(n: u8) -> Snapshot {
        let config = MembershipConfig { lost_after: Duration::from_secs(60), probe_timeout: Duration::from_secs(1) };
        let probes = (1..=n).map(|i| (addr(i), Ok(info(&format!("0000000{i}"), &format!("n{i}"), true)))).collect();
        next(&Snapshot::default(), Round { resolved: vec![], probes }, Instant::now(), &config)
    }

    fn session(user: &str, api: &str, created: &str) -> String {
        format!(r#"{{"id":"x","created_at":"{created}","metadata":{{"{USER_KEY}":"{user}","{API_KEY}":"{api}"}}}}"#)
    }

    fn agents(answers: &[(u8, Option<String>)]) -> Arc<dyn AgentTransport> {
        Arc::new(FakeAgents(Mutex::new(
            answers.iter().map(|(n, a)| (addr(*n), a.clone().map(|b| (StatusCode::OK, b)))).collect::<BTreeMap<_, _>>(),
        )))
    }

    #[tokio::test]
    async fn the_users_session_is_found_on_whichever_node_has_it_the_oldest_first() {
        let owner = Owner("o".into());
        let t = agents(&[
            (1, Some(format!("[{}]", session("u1", "v1", "2026-01-01T00:00:00Z")))),
            (2, Some(format!("[{}]", session("u1", "session", "2026-01-02T00:00:00Z")))),
            (3, Some(format!("[{}]", session("u1", "session", "2026-01-01T00:00:00Z")))),
        ]);
        let s = snapshot(3);
        let tag = |n: u8| NodeTag::parse(&format!("0000000{n}")).unwrap();
        assert_eq!(find(&t, &s, &owner, "u1", None).await, Found::At(tag(3), addr(3)));
        assert_eq!(find(&t, &s, &owner, "u1", Some(tag(3))).await, Found::At(tag(2), addr(2)));
        assert_eq!(find(&t, &s, &owner, "u2", None).await, Found::Nowhere);
    }

    #[tokio::test]
    async fn a_node_that_does_not_answer_makes_the_answer_unknown() {
        let owner = Owner("o".into());
        let t = agents(&[(1, Some("[]".into())), (2, None)]);
        let tag2 = NodeTag::parse("00000002").unwrap();
        assert_eq!(find(&t, &snapshot(2), &owner, "u1", None).await, Found::Unknown(vec![tag2]));
        let t = agents(&[(1, Some(format!("[{}]", session("u1", "session", "t")))), (2, None)]);
        assert!(matches!(find(&t, &snapshot(2), &owner, "u1", None).await, Found::At(..)), "found is found");
    }
}
