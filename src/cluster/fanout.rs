//! Fan-out: one request to every agent in parallel (each within [`FANOUT_TIMEOUT`], its answer bounded),
//! and the lists they answer merged into one. Lists are `GET /v1/sessions` and `GET /api/kernels` (JSON
//! arrays); the session API's user look-up reads the same `/v1/sessions` per node.
//!
//! An incomplete list is never silent: the merged answer stays the array clients know, and the response
//! carries [`MISSING_HEADER`] (`x-kernelbox-nodes-missing: <tag>,<tag>`) naming every node that did not
//! answer (unreachable, too slow, or an answer that was not a list); the header is absent when every node
//! answered. When nodes are known and none answered, the replica answers 503 `node_unreachable` instead
//! of an empty list.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Body;
use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::error::RouteError;
use super::membership::Snapshot;
use super::transport::AgentTransport;
use crate::node::NodeTag;

/// How long each agent may take to answer a fan-out.
pub const FANOUT_TIMEOUT: Duration = Duration::from_secs(2);
/// The largest list read from one agent.
pub const LIST_LIMIT: usize = 16 * 1024 * 1024;
/// The response header naming the nodes that did not answer.
pub const MISSING_HEADER: &str = "x-kernelbox-nodes-missing";

/// What each node answered.
#[derive(Debug)]
pub struct Answers {
    pub lists: Vec<(NodeTag, Vec<Value>)>,
    pub missing: Vec<NodeTag>,
}

/// Sends the request `make` builds to every Up member of `snapshot` (Unreachable ones are missing at
/// once, unasked) and reads each answer as a JSON array.
pub async fn ask_all(
    transport: &Arc<dyn AgentTransport>,
    snapshot: &Snapshot,
    make: impl Fn() -> Request<Body>,
) -> Answers {
    let mut missing: Vec<NodeTag> =
        snapshot.members.iter().filter(|(_, m)| m.state != super::membership::NodeState::Up).map(|(t, _)| *t).collect();
    let asks = snapshot.up().map(|(tag, m)| {
        let (tag, addr, req, transport) = (*tag, m.addr, make(), transport.clone());
        async move { (tag, ask_one(transport.as_ref(), addr, req).await) }
    });
    let mut lists = Vec::new();
    for (tag, answer) in futures::future::join_all(asks).await {
        match answer {
            Ok(list) => lists.push((tag, list)),
            Err(why) => {
                tracing::warn!(%tag, why, "a node did not answer a fan-out");
                missing.push(tag);
            }
        }
    }
    missing.sort();
    Answers { lists, missing }
}

async fn ask_one(transport: &dyn AgentTransport, addr: SocketAddr, req: Request<Body>) -> Result<Vec<Value>, String> {
    let ask = async {
        let response = transport.send(addr, req).await.map_err(|e| e.to_string())?;
        if response.status() != StatusCode::OK {
            return Err(format!("answered {}", response.status()));
        }
        let bytes = axum::body::to_bytes(response.into_body(), LIST_LIMIT).await.map_err(|e| e.to_string())?;
        match serde_json::from_slice(&bytes) {
            Ok(Value::Array(items)) => Ok(items),
            _ => Err("the answer is not a JSON array".into()),
        }
    };
    tokio::time::timeout(FANOUT_TIMEOUT, ask).await.unwrap_or_else(|_| Err("no answer in time".into()))
}

/// The merged list as a response: one array (each node's items in tag order), and the missing nodes in
/// [`MISSING_HEADER`]. No node known: 503 `no_node_available`; nodes known, none answered: 503
/// `node_unreachable`.
pub fn merged(answers: Answers) -> Result<Response, RouteError> {
    if answers.lists.is_empty() {
        return Err(if answers.missing.is_empty() {
            RouteError::NoNodeAvailable("no agent is known or answers".into())
        } else {
            RouteError::NoNodeAnswers
        });
    }
    let items: Vec<Value> = answers.lists.into_iter().flat_map(|(_, list)| list).collect();
    let mut response = (StatusCode::OK, axum::Json(Value::Array(items))).into_response();
    if !answers.missing.is_empty() {
        let names: Vec<&str> = answers.missing.iter().map(NodeTag::as_str).collect();
        if let Ok(value) = HeaderValue::from_str(&names.join(",")) {
            response.headers_mut().insert(MISSING_HEADER, value);
        }
    }
    response.headers_mut().insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    Ok(response)
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::sync::Mutex;
    use std::time::Instant;

    use super::*;
    use crate::cluster::membership::tests::{FakeAgents, info};
    use crate::cluster::membership::{MembershipConfig, Round, next};

    fn addr(n: u8) -> SocketAddr {
        SocketAddr::from(([10, 0, 0, n], 7443))
    }

    async fn body(r: Response) -> Value {
        serde_json::from_slice(&axum::body::to_bytes(r.into_body(), 1 << 20).await.unwrap()).unwrap()
    }

    #[tokio::test]
    async fn lists_merge_and_a_node_that_does_not_answer_is_named() {
        let config = MembershipConfig { lost_after: Duration::from_secs(60), probe_timeout: Duration::from_secs(1) };
        let t0 = Instant::now();
        let probes = vec![
            (addr(1), Ok(info("0000000a", "n1", true))),
            (addr(2), Ok(info("0000000b", "n2", true))),
            (addr(3), Ok(info("0000000c", "n3", true))),
            (addr(4), Ok(info("0000000d", "n4", true))),
        ];
        let s = next(&Snapshot::default(), Round { resolved: vec![], probes }, t0, &config);
        // d stops answering its probes: unreachable, missing without being asked.
        let probes = (1..=3)
            .map(|n| (addr(n), Ok(info(&format!("0000000{}", (b'a' + n - 1) as char), &format!("n{n}"), true))))
            .collect();
        let s = next(&s, Round { resolved: vec![], probes }, t0, &config);
        let agents = FakeAgents(Mutex::new(BTreeMap::from([
            (addr(1), Some((StatusCode::OK, r#"[{"id":"a1"},{"id":"a2"}]"#.into()))),
            (addr(2), Some((StatusCode::OK, r#"{"not":"a list"}"#.into()))),
            (addr(3), Some((StatusCode::OK, r#"[{"id":"c1"}]"#.into()))),
        ])));
        let transport: Arc<dyn AgentTransport> = Arc::new(agents);
        let answers = ask_all(&transport, &s, || Request::get("/v1/sessions").body(Body::empty()).unwrap()).await;
        let response = merged(answers).unwrap();
        assert_eq!(response.headers()[MISSING_HEADER], "0000000b,0000000d");
        assert_eq!(body(response).await, serde_json::json!([{"id":"a1"},{"id":"a2"},{"id":"c1"}]));
    }

    #[tokio::test]
    async fn a_complete_list_has_no_header_and_no_answer_at_all_is_an_error() {
        let complete = Answers { lists: vec![(NodeTag::parse("0000000a").unwrap(), vec![])], missing: vec![] };
        let response = merged(complete).unwrap();
        assert!(response.headers().get(MISSING_HEADER).is_none());
        assert_eq!(body(response).await, serde_json::json!([]));
        let tag = NodeTag::parse("0000000a").unwrap();
        assert_eq!(merged(Answers { lists: vec![], missing: vec![tag] }).unwrap_err(), RouteError::NoNodeAnswers);
        assert!(matches!(merged(Answers { lists: vec![], missing: vec![] }), Err(RouteError::NoNodeAvailable(_))));
    }
}
