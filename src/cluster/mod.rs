//! The cluster: what `kernelbox api` (a replica with no Docker socket) does to route every request to the
//! agent that owns it, and what the link between them is. Sits above `api/` and below `lib.rs`.

pub mod api_role;
pub mod error;
pub mod fanout;
pub mod membership;
pub mod placement;
pub mod route;
pub mod transport;
pub mod user_session;
