//! The connection file and the socket paths of a session directory (start contract v2, ARCHITECTURE.md).
//!
//! The service owns the session directory: it writes `connection.json` there and binds the four unix
//! sockets `k-<port>` ([`socket_path`]); the directory is mounted read-only into the container at
//! [`CONTAINER_DIR`], where `start-kernel` reads the file and connects its relay to the sockets. Files here
//! are opened without following symlinks, so even a directory that somehow became writable by the sandbox
//! cannot make the service write or read elsewhere.

use std::fs::OpenOptions;
use std::io::{Read, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use ring::rand::{SecureRandom, SystemRandom};
use serde::{Deserialize, Serialize};

/// Where the session directory is mounted inside the container.
pub const CONTAINER_DIR: &str = "/kernel";
/// The socket-path prefix inside the container; sockets are `<prefix>-<port>`.
const CONTAINER_PREFIX: &str = "/kernel/k";
/// Fixed "ports": with ipc they only name socket files; a TCP kernel behind start-kernel gets its own
/// ports on the container's loopback.
const PORTS: [u16; 5] = [50001, 50002, 50003, 50004, 50005];
/// A connection file is a few hundred bytes; anything longer is not one.
const MAX_CONNECTION_FILE: u64 = 64 * 1024;

/// A Jupyter connection file (the fields kernels read).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ConnectionInfo {
    pub transport: String,
    pub ip: String,
    pub shell_port: u16,
    pub iopub_port: u16,
    pub stdin_port: u16,
    pub control_port: u16,
    /// Named for kernels that expect it; never bound (no heartbeat socket in contract v2).
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
}

/// The connection file's path in a session directory.
pub fn connection_file(dir: &Path) -> PathBuf {
    dir.join("connection.json")
}

/// The connection file's path inside the container.
pub fn container_connection_file() -> String {
    format!("{CONTAINER_DIR}/connection.json")
}

/// The unix socket the service binds for `port` in the session directory `dir`.
pub fn socket_path(dir: &Path, port: u16) -> PathBuf {
    dir.join(format!("k-{port}"))
}

/// Writes `dir/connection.json` (mode 0644 whatever the umask: the container's user reads it). Fails if the file exists
/// (`O_EXCL`) or is a symlink (`O_NOFOLLOW`): a boot writes into a fresh directory.
pub fn write_connection_file(dir: &Path, info: &ConnectionInfo) -> std::io::Result<()> {
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(connection_file(dir))?;
    // The mode above is filtered by the umask; the container's user must read the file whatever it is.
    file.set_permissions(std::fs::Permissions::from_mode(0o644))?;
    file.write_all(&serde_json::to_vec_pretty(info).expect("a connection file serializes"))?;
    file.sync_all()
}

/// Reads `dir/connection.json`: never through a symlink, only a regular file, at most 64 KiB.
pub fn read_connection_file(dir: &Path) -> std::io::Result<ConnectionInfo> {
    let invalid = |what: String| std::io::Error::new(std::io::ErrorKind::InvalidData, what);
    // O_NONBLOCK: opening a FIFO planted here must not hang the service (no effect on regular files).
    let file =
        OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK).open(connection_file(dir))?;
    if !file.metadata()?.is_file() {
        return Err(invalid("the connection file is not a regular file".into()));
    }
    let mut text = Vec::new();
    file.take(MAX_CONNECTION_FILE + 1).read_to_end(&mut text)?;
    if text.len() as u64 > MAX_CONNECTION_FILE {
        return Err(invalid(format!("the connection file is larger than {MAX_CONNECTION_FILE} bytes")));
    }
    serde_json::from_slice(&text).map_err(|e| invalid(format!("unreadable connection file: {e}")))
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
    fn sockets_are_named_by_port_in_the_session_directory() {
        let dir = Path::new("/var/lib/kernelbox/sessions/abc");
        assert_eq!(socket_path(dir, 50001), Path::new("/var/lib/kernelbox/sessions/abc/k-50001"));
        let info = ConnectionInfo::new_ipc();
        assert_eq!(format!("{}-{}", info.ip, info.shell_port), "/kernel/k-50001");
        assert_eq!(container_connection_file(), "/kernel/connection.json");
    }

    #[test]
    fn the_file_round_trips_through_json() {
        let info = ConnectionInfo::new_ipc();
        let json = serde_json::to_string(&info).unwrap();
        assert!(json.contains(r#""transport":"ipc""#));
        assert!(json.contains(r#""stdin_port":50003"#));
        assert_eq!(serde_json::from_str::<ConnectionInfo>(&json).unwrap(), info);
    }

    #[test]
    fn the_file_is_written_once_world_readable_and_read_back() {
        let dir = tempfile::tempdir().unwrap();
        let info = ConnectionInfo::new_ipc();
        write_connection_file(dir.path(), &info).unwrap();
        let mode = std::fs::metadata(connection_file(dir.path())).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o644);
        assert_eq!(read_connection_file(dir.path()).unwrap(), info);
        let again = write_connection_file(dir.path(), &ConnectionInfo::new_ipc()).unwrap_err();
        assert_eq!(again.kind(), std::io::ErrorKind::AlreadyExists);
        assert_eq!(read_connection_file(dir.path()).unwrap(), info, "the first file is untouched");
    }

    #[test]
    fn a_planted_symlink_is_neither_written_through_nor_read() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, serde_json::to_vec(&ConnectionInfo::new_ipc()).unwrap()).unwrap();
        std::os::unix::fs::symlink(&target, connection_file(dir.path())).unwrap();
        let before = std::fs::read(&target).unwrap();
        assert!(write_connection_file(dir.path(), &ConnectionInfo::new_ipc()).is_err());
        assert_eq!(std::fs::read(&target).unwrap(), before, "the symlink target is untouched");
        assert!(read_connection_file(dir.path()).is_err());
    }

    #[test]
    fn only_a_small_regular_file_is_read() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(connection_file(dir.path())).unwrap();
        assert!(read_connection_file(dir.path()).is_err(), "a directory");

        let dir = tempfile::tempdir().unwrap();
        let fifo = std::ffi::CString::new(connection_file(dir.path()).to_str().unwrap()).unwrap();
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o644) }, 0);
        assert!(read_connection_file(dir.path()).is_err(), "a FIFO, without hanging");

        let dir = tempfile::tempdir().unwrap();
        let mut big = serde_json::to_vec(&ConnectionInfo::new_ipc()).unwrap();
        big.extend(std::iter::repeat_n(b' ', 70_000));
        std::fs::write(connection_file(dir.path()), big).unwrap();
        let err = read_connection_file(dir.path()).unwrap_err();
        assert!(err.to_string().contains("larger"), "{err}");
    }
}
