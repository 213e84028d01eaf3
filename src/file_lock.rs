//! A lock file between processes: `flock(LOCK_EX|LOCK_NB)` on a file the service makes (never through a
//! link), tried again every second while another holds it. The kernel drops the lock when its holder
//! exits, however it exits.
//!
//! Two hold one: an agent's state directory (`<state>/agent.lock`: a restarted node runs a new agent task
//! while Swarm kills the old one only seconds later, and the second waits for it before it adopts or
//! touches anything), and a runtime tree being copied (`images/runtime_tree.rs`: one copy per tree across
//! the services that share the folder).

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// How often a held lock is tried again.
pub const RETRY: Duration = Duration::from_secs(1);

/// The held lock: released when dropped (or when the process ends).
#[derive(Debug)]
pub struct FileLock {
    _file: File,
}

/// Tries once: `Ok(None)` when another holder (another open of the file) has it.
pub fn try_lock(path: &Path) -> std::io::Result<Option<FileLock>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)?;
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(FileLock { _file: file }));
    }
    match std::io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
        e => Err(e),
    }
}

/// Waits for the lock, trying every [`RETRY`]; `Ok(None)` when `stop` is cancelled first. `waiting` is
/// called once when the first try finds it held.
pub async fn lock(
    path: &Path,
    stop: &CancellationToken,
    mut waiting: impl FnMut(),
) -> std::io::Result<Option<FileLock>> {
    let mut told = false;
    loop {
        if let Some(lock) = try_lock(path)? {
            return Ok(Some(lock));
        }
        if !told {
            told = true;
            waiting();
        }
        tokio::select! {
            _ = stop.cancelled() => return Ok(None),
            _ = tokio::time::sleep(RETRY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time_and_the_next_gets_it_when_the_first_lets_go() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let first = try_lock(&path).unwrap().expect("free");
        assert!(try_lock(&path).unwrap().is_none(), "held (a second open file is a second holder)");
        drop(first);
        assert!(try_lock(&path).unwrap().is_some());
    }

    #[tokio::test]
    async fn a_waiting_holder_takes_over_when_the_first_exits() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let first = try_lock(&path).unwrap().unwrap();
        let stop = CancellationToken::new();
        let (told_tx, told_rx) = tokio::sync::oneshot::channel();
        let mut told_tx = Some(told_tx);
        let second = tokio::spawn(async move {
            lock(&path, &stop, || {
                let _ = told_tx.take().map(|t| t.send(()));
            })
            .await
        });
        told_rx.await.expect("the second waits");
        assert!(!second.is_finished());
        drop(first);
        let got = tokio::time::timeout(Duration::from_secs(5), second).await.unwrap().unwrap().unwrap();
        assert!(got.is_some(), "taken over within a retry");
    }

    #[tokio::test]
    async fn waiting_ends_at_shutdown() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("x.lock");
        let _held = try_lock(&path).unwrap().unwrap();
        let stop = CancellationToken::new();
        stop.cancel();
        assert!(lock(&path, &stop, || {}).await.unwrap().is_none());
    }

    #[test]
    fn a_link_in_place_of_the_lock_file_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), dir.path().join("x.lock")).unwrap();
        assert!(try_lock(&dir.path().join("x.lock")).is_err());
        assert!(!dir.path().join("elsewhere").exists());
    }
}
