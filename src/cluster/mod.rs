//! The cluster: what lets API replicas (`kernelbox api`, no Docker socket) and agents (`kernelbox agent`)
//! work as one service across machines. Sits above `api/` and below `lib.rs`.
//!
//! The link:
//! - `certs` — the cluster CA and the agent and API certificates (`kernelbox cluster certs`).
//! - `tls` — the mutual TLS settings of both ends (rustls over ring); which role a certificate names.
//! - `listener` — an agent's cluster listener: the router over mutual TLS only, the verified peer in every
//!   request.
//! - `link` — an API replica's HTTP/1.1 client to agents over that TLS.
//! - `forward` — one client request forwarded to an agent and its answer streamed back (SSE, WebSocket).
//!
//! The routing tier (`kernelbox api`):
//! - `transport` — what routing needs of a link to agents (the mTLS link in the binary, plain HTTP in tests).
//! - `membership` — the agents known, probed every 2 s: up, unreachable, lost.
//! - `placement` — which agent gets a new session; rendezvous hashing for the compatibility APIs.
//! - `route` — which agent a request goes to, from its path, headers or a bounded look at its body.
//! - `fanout` — lists asked of every agent and merged, naming the nodes that did not answer.
//! - `user_session` — the session API's `user_id` → node lookup.
//! - `error` — the answers a replica makes itself (503 node_unreachable, 410 session_lost, ...).
//! - `api_role` — the replica's router and its life.

pub mod api_role;
pub mod certs;
pub mod error;
pub mod fanout;
pub mod forward;
pub mod link;
pub mod listener;
pub mod membership;
pub mod placement;
pub mod route;
pub mod tls;
pub mod transport;
pub mod user_session;

#[cfg(test)]
mod testing;

pub use forward::forward;
pub use link::{AgentLink, LinkError};
pub use listener::{ClusterPeer, serve_mtls};
pub use tls::{PeerRole, TlsError, TlsFiles, agent_server_config, api_client_config};
