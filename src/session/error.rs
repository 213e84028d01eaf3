//! Why a session operation failed. The API maps each variant to a status code; the variants say which
//! side is at fault.

use crate::kernel::KernelError;
use crate::runtime::RuntimeError;

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("no session with id {0}")]
    NotFound(String),
    /// The session was removed because its node lost contact with the cluster for too long (fencing):
    /// its id answers this, never "not found", and never comes back.
    #[error("session {0} was lost: its node was out of contact with the cluster for too long; start a new one")]
    Lost(String),
    #[error("unknown language `{0}`; GET /v1/languages lists the languages this server offers")]
    UnknownLanguage(String),
    #[error("{0}")]
    Invalid(String),
    /// The session asked for an OCI runtime the operator does not offer for its language.
    #[error(transparent)]
    RuntimeRefused(#[from] crate::config::RuntimeRefused),
    /// A network allow-list the operator's bounds refuse (or networking is off).
    #[error(transparent)]
    Network(#[from] crate::egress::allow::ListRefused),
    #[error("the image for `{0}` is not built yet; run `kernelbox images build {0}`")]
    ImageMissing(String),
    #[error("{0}")]
    TooMany(String),
    /// A per-key limit on what costs (creates, installs, upload bytes) was met.
    #[error(transparent)]
    RateLimited(#[from] super::costs::Limited),
    #[error("too many executions are waiting on this session (at most {0}); retry when one finishes")]
    QueueFull(usize),
    #[error("no execution of this session is waiting for input")]
    NoInputWaiting,
    #[error("the session is being removed")]
    Closing,
    #[error("the kernel did not start: {0}")]
    KernelStart(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("kernel communication failed: {0}")]
    Kernel(#[from] KernelError),
    #[error(transparent)]
    File(#[from] super::files::FileError),
    #[error(transparent)]
    Package(#[from] crate::packages::PackageError),
    #[error("session state directory: {0}")]
    Io(#[from] std::io::Error),
}
