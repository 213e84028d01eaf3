//! Sessions: the lifecycle ([`manager`]), the registry of who exists ([`registry`]), the handle each
//! session is known by ([`handle`]), the task that runs its kernel ([`actor`]), the bridge between a
//! container and its kernel ([`kernel_host`]) and the run directory the service owns for it
//! ([`rundir`]), the Jupyter clients attached to a kernel ([`peers`]), the operator's rules as pure
//! functions ([`policy`]), the per-key limits on what costs ([`costs`]),
//! an agent's fencing after a loss of contact ([`fence`]) and what it reports of its node ([`node_report`]), what an earlier run left behind
//! ([`recovery`]) and the records adoption reads ([`records`]), the session API's output folders on the
//! host ([`outputs`]), and the plain data they share ([`model`]).
//!
//! Architecture invariant: this module never speaks HTTP and never calls bollard; it reaches Docker only
//! through [`crate::runtime::ContainerRuntime`] and kernels only through [`crate::kernel`].

pub mod actor;
pub mod boot;
pub mod costs;
pub mod error;
pub mod fence;
pub mod files;
pub mod handle;
pub mod installs;
pub mod kernel_host;
pub mod launch;
pub mod manager;
pub mod model;
pub mod network;
pub mod node_report;
pub mod notebook;
pub mod notebook_store;
pub mod oci;
pub mod outputs;
pub mod peers;
pub mod policy;
pub mod pool;
pub mod pool_demand;
pub mod records;
pub mod recovery;
pub mod registry;
pub mod rundir;
pub mod transfers;
pub mod warm_pool;

pub use error::SessionError;
pub use handle::{PeerLink, Pending, Session, Streamed};
pub use manager::SessionManager;
pub use model::{
    AutoRestart, AutoRestartNotice, AutoRestartPhase, ExecStatus, ExecuteResult, FenceConfig, ManagerConfig, Mount,
    OutputCaps, Owner, ReapReport, SessionExtras, SessionId, SessionInfo, SessionRequest, SessionStatus, Storage,
    Submission,
};

#[cfg(test)]
pub(crate) mod tests;
