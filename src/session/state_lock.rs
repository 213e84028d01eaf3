//! The state directory's lock: at most one agent per node touches its sessions. A restarted node runs
//! a new agent task while Swarm kills the old one only seconds later; both see the same state directory
//! and the same containers, so the second takes `flock(LOCK_EX|LOCK_NB)` on `<state>/agent.lock`,
//! retried every second, before it adopts or touches anything, and is not ready until it holds it. The
//! kernel drops the lock when its holder exits, however it exits.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

/// The lock file's name in the state directory.
pub const LOCK_FILE: &str = "agent.lock";
/// How often a held lock is tried again.
pub const RETRY: Duration = Duration::from_secs(1);

/// The held lock: released when dropped (or when the process ends).
#[derive(Debug)]
pub struct StateLock {
    _file: File,
}

/// Tries once: `Ok(None)` when another process holds it.
pub fn try_lock(state_dir: &Path) -> std::io::Result<Option<StateLock>> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(state_dir.join(LOCK_FILE))?;
    // SAFETY: flock on a descriptor this function owns; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(Some(StateLock { _file: file }));
    }
    match std::io::Error::last_os_error() {
        e if e.raw_os_error() == Some(libc::EWOULDBLOCK) => Ok(None),
        e => Err(e),
    }
}

/// Waits for the lock, trying every [`RETRY`]; `Ok(None)` when `stop` is cancelled first. `waiting` is
/// called once when the first try finds it held.
pub async fn lock(
    state_dir: &Path,
    stop: &CancellationToken,
    mut waiting: impl FnMut(),
) -> std::io::Result<Option<StateLock>> {
    let mut told = false;
    loop {
        if let Some(lock) = try_lock(state_dir)? {
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
        let first = try_lock(dir.path()).unwrap().expect("free");
        assert!(try_lock(dir.path()).unwrap().is_none(), "held (a second open file is a second holder)");
        drop(first);
        assert!(try_lock(dir.path()).unwrap().is_some());
    }

    #[tokio::test]
    async fn a_waiting_agent_takes_over_when_the_holder_exits() {
        let dir = tempfile::tempdir().unwrap();
        let first = try_lock(dir.path()).unwrap().unwrap();
        let stop = CancellationToken::new();
        let path = dir.path().to_owned();
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
        let _held = try_lock(dir.path()).unwrap().unwrap();
        let stop = CancellationToken::new();
        stop.cancel();
        assert!(lock(dir.path(), &stop, || {}).await.unwrap().is_none());
    }

    #[test]
    fn a_link_in_place_of_the_lock_file_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(dir.path().join("elsewhere"), dir.path().join(LOCK_FILE)).unwrap();
        assert!(try_lock(dir.path()).is_err());
        assert!(!dir.path().join("elsewhere").exists());
    }
}
