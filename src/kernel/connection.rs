//! The connection file: how a kernel and the service find each other and share the signing key.
//!
//! The service always writes an `ipc` connection file whose sockets live in a directory bind-mounted into
//! the session container at [`CONTAINER_DIR`]; the image's `start-kernel` hides whether the kernel itself
//! speaks ipc or needs a TCP relay inside the container (ARCHITECTURE.md, "The start contract").

use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// Where the session directory is mounted inside the container.
pub const CONTAINER_DIR: &str = "/kernel";
/// The socket-path prefix inside the container; sockets are `<prefix>-<port>`.
const CONTAINER_PREFIX: &str = "/kernel/k";
/// Fixed "ports": with ipc they only name socket files; a TCP relay binds them on the container's own
/// loopback, so they must be unprivileged.
const PORTS: [u16; 5] = [50001, 50002, 50003, 50004, 50005];

/// A Jupyter connection file (the fields kernels read).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectionInfo {
    pub transport: String,
    pub ip: String,
    pub shell_port: u16,
    pub iopub_port: u16,
    pub stdin_port: u16,
    pub control_port: u16,
    pub hb_port: u16,
    pub signature_scheme: String,
    pub key: String,
    #[serde(default)]
    pub kernel_name: String,
}

impl ConnectionInfo {
    /// A new ipc connection with a fresh random 256-bit key.
    pub fn new_ipc() -> Self {
        let mut key = [0u8; 32];
        SystemRandom::new().fill(&mut key).expect("the system random source is available");
        let [shell, iopub, stdin, control, hb] = PORTS;
        ConnectionInfo {
            transport: "ipc".into(),
            ip: CONTAINER_PREFIX.into(),
            shell_port: shell,
            iopub_port: iopub,
            stdin_port: stdin,
            control_port: control,
            hb_port: hb,
            signature_scheme: "hmac-sha256".into(),
            key: hex::encode(key),
            kernel_name: String::new(),
        }
    }

    /// The endpoints as the service sees them, with the session directory at `host_dir`.
    pub fn host_endpoints(&self, host_dir: &Path) -> Endpoints {
        let at = |port: u16| format!("ipc://{}", host_dir.join(format!("k-{port}")).display());
        Endpoints { shell: at(self.shell_port), iopub: at(self.iopub_port), control: at(self.control_port) }
    }
}

/// The ZeroMQ endpoints the client connects to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoints {
    pub shell: String,
    pub iopub: String,
    pub control: String,
}

/// Paths of the files in a session directory, shared with `start-kernel` in the images.
pub fn connection_file(dir: &Path) -> PathBuf {
    dir.join("connection.json")
}

/// `start-kernel` writes this file once the kernel's sockets accept connections, and again after every
/// restart; the service removes it before asking for a restart.
pub fn ready_file(dir: &Path) -> PathBuf {
    dir.join("ready")
}

/// The connection file's path inside the container.
pub fn container_connection_file() -> String {
    format!("{CONTAINER_DIR}/connection.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_connection_gets_its_own_key() {
        let (a, b) = (ConnectionInfo::new_ipc(), ConnectionInfo::new_ipc());
        assert_ne!(a.key, b.key);
        assert_eq!(a.key.len(), 64);
    }

    #[test]
    fn host_endpoints_are_unix_sockets_in_the_session_directory() {
        let info = ConnectionInfo::new_ipc();
        let ends = info.host_endpoints(Path::new("/var/lib/kernelbox/sessions/abc"));
        assert_eq!(ends.shell, "ipc:///var/lib/kernelbox/sessions/abc/k-50001");
        assert_eq!(ends.iopub, "ipc:///var/lib/kernelbox/sessions/abc/k-50002");
        assert_eq!(ends.control, "ipc:///var/lib/kernelbox/sessions/abc/k-50004");
    }

    #[test]
    fn the_file_round_trips_through_json() {
        let info = ConnectionInfo::new_ipc();
        let json = serde_json::to_string(&info).unwrap();
        assert!(json.contains(r#""transport":"ipc""#));
        assert_eq!(serde_json::from_str::<ConnectionInfo>(&json).unwrap(), info);
    }
}
