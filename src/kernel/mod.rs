//! The Jupyter side: the wire format, the connection file, a ZeroMQ client for one kernel, and the logic
//! that follows one execution.
//!
//! Architecture invariant: nothing here knows about HTTP or Docker. The session layer decides *when* to
//! talk to a kernel; this module only knows *how*.

pub mod client;
pub mod connection;
pub mod execution;
pub mod fake;
pub mod wire;

pub use client::{Channel, KernelClient, KernelError};
pub use connection::{ConnectionInfo, Endpoints};
pub use execution::{ErrorInfo, Event, ExecutionTracker, Output, ReplyStatus, Report};
