//! The cluster: what lets API replicas (`kernelbox api`) and agents (`kernelbox agent`) work as one
//! service across machines.
//!
//! - `certs` — the cluster CA and the agent and API certificates (`kernelbox cluster certs`).
//! - `tls` — the mutual TLS settings of both ends (rustls over ring); which role a certificate names.
//! - `listener` — an agent's cluster listener: the router over mutual TLS only, the verified peer in every
//!   request.
//! - `link` — an API replica's HTTP/1.1 client to agents over that TLS.
//! - `forward` — one client request forwarded to an agent and its answer streamed back (SSE, WebSocket).

pub mod certs;
pub mod forward;
pub mod link;
pub mod listener;
pub mod tls;

#[cfg(test)]
mod testing;

pub use forward::forward;
pub use link::{AgentLink, LinkError};
pub use listener::{ClusterPeer, serve_mtls};
pub use tls::{PeerRole, TlsError, TlsFiles, agent_server_config, api_client_config};
