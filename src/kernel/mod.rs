//! The Jupyter side: our own ZMTP framing, the wire format, the connection file, the service's end of one
//! kernel's connections, and the logic that follows one execution.
//!
//! Architecture invariant: nothing here knows about HTTP or Docker. The session layer decides *when* to
//! talk to a kernel; this module only knows *how*. Everything read from a kernel is bounded before it is
//! buffered (`zmtp.rs`, `wire.rs`).

pub mod client;
pub mod connection;
pub mod execution;
#[cfg(any(test, feature = "test-support"))]
pub mod fake;
pub mod relay;
mod salvage;
pub mod stdin;
pub mod wire;
pub mod zmtp;

pub use client::{Adopted, Channel, KernelClient, KernelError, KernelListener};
pub use connection::ConnectionInfo;
pub use execution::{ErrorInfo, Event, ExecutionTracker, Output, ReplyStatus, Report};
pub use stdin::InputRequest;
pub use wire::{Message, WireLimits};
