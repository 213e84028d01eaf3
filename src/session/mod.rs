//! Sessions: the registry and lifecycle ([`manager`]), the per-session actor that runs code ([`actor`]),
//! the bridge between a container and its kernel ([`kernel_host`]), and the plain data they share
//! ([`model`]).
//!
//! Architecture invariant: this module never speaks HTTP and never calls bollard; it reaches Docker only
//! through [`crate::runtime::ContainerRuntime`] and kernels only through [`crate::kernel`].

pub mod actor;
pub mod error;
pub mod kernel_host;
pub mod manager;
pub mod model;

pub use actor::StreamEvent;
pub use error::SessionError;
pub use manager::{ManagerConfig, Pending, ReapReport, SessionManager};
pub use model::{ExecStatus, ExecuteResult, Owner, SessionId, SessionInfo, SessionRequest, SessionStatus};

#[cfg(test)]
mod tests;
