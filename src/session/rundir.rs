//! The run directory of one container boot: `<state>/sessions/<session id>-<boot>`, created and written
//! only by the service and mounted **read-only** into the container at `/kernel`. It holds the connection
//! file and the unix sockets the service listens on (see ARCHITECTURE.md, "The start contract").
//!
//! The sandbox cannot create, replace or remove anything here (the mount is read-only), so the service
//! may use these paths; it still writes the connection file with `O_EXCL | O_NOFOLLOW` and removes the
//! directory with `remove_dir_all`, which never follows links. Nothing here is ever read back from a
//! place the sandbox can write.

use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use crate::kernel::connection::{self, ConnectionInfo};

/// A run directory; removed when dropped unless [`RunDir::keep`] was called.
#[derive(Debug)]
pub struct RunDir {
    path: PathBuf,
    keep: bool,
}

impl RunDir {
    /// Creates `root/name` (it must not exist) with the connection file in it.
    pub fn create(root: &Path, name: &str, info: &ConnectionInfo) -> std::io::Result<RunDir> {
        check_name(name)?;
        // The root stays private (0700): the container reaches its own directory through the mount.
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(root)?;
        let path = root.join(name);
        // 0755: the container's uid 1000 reads the connection file and connects to the sockets through
        // the read-only mount; nothing in it is writable to anyone but the service.
        std::fs::DirBuilder::new().mode(0o755).create(&path)?;
        let dir = RunDir { path, keep: false };
        connection::write_connection_file(&dir.path, info)?;
        Ok(dir)
    }

    /// Opens the run directory of a container left by an earlier run of the service, and its connection
    /// file (written by the service, never by the sandbox).
    pub fn open(root: &Path, name: &str) -> std::io::Result<(RunDir, ConnectionInfo)> {
        check_name(name)?;
        let path = root.join(name);
        let meta = std::fs::symlink_metadata(&path)?;
        if !meta.is_dir() {
            return Err(std::io::Error::other(format!("{} is not a directory", path.display())));
        }
        let info = connection::read_connection_file(&path)?;
        Ok((RunDir { path, keep: false }, info))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Leaves the directory in place (the container keeps running for the next run of the service).
    pub fn keep(&mut self) {
        self.keep = true;
    }
}

impl Drop for RunDir {
    fn drop(&mut self) {
        if !self.keep
            && let Err(e) = std::fs::remove_dir_all(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(path = %self.path.display(), error = %e, "could not remove a run directory");
        }
    }
}

/// The name of a run directory: `<24 hex session id>-<hex boot id>`.
pub fn dir_name(session: &str, boot: &str) -> String {
    format!("{session}-{boot}")
}

/// The session id part of a run directory's name, if the name is one of ours.
pub fn session_of(name: &str) -> Option<&str> {
    check_name(name).ok()?;
    name.split_once('-').map(|(s, _)| s)
}

fn check_name(name: &str) -> std::io::Result<()> {
    let hex = |s: &str, min: usize, max: usize| {
        (min..=max).contains(&s.len()) && s.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
    };
    match name.split_once('-') {
        Some((session, boot)) if hex(session, 24, 24) && hex(boot, 4, 16) => Ok(()),
        _ => {
            Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("`{name}` is not a run directory name")))
        }
    }
}

/// Removes what is in `root` that no session needs: run directories of unknown sessions (a crash, an
/// older version) and anything else. Never follows links.
pub fn sweep(root: &Path, needed: impl Fn(&str) -> bool) -> usize {
    let Ok(entries) = std::fs::read_dir(root) else { return 0 };
    let mut removed = 0;
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if session_of(&name).is_some_and(&needed) {
            continue;
        }
        let path = entry.path();
        let result = match entry.file_type() {
            Ok(t) if t.is_dir() => std::fs::remove_dir_all(&path),
            _ => std::fs::remove_file(&path),
        };
        match result {
            Ok(()) => removed += 1,
            Err(e) => tracing::warn!(path = %path.display(), error = %e, "could not remove a stale run directory"),
        }
    }
    removed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked_before_they_become_paths() {
        assert!(check_name("0123456789abcdef01234567-a1b2c3").is_ok());
        for bad in [
            "../etc",
            "0123456789abcdef01234567",
            "0123456789abcdef01234567-",
            "0123456789abcdef01234567-../x",
            "0123456789ABCDEF01234567-a1b2c3",
            "0123456789abcdef01234567-a1b2c3/x",
            "",
        ] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
        assert_eq!(session_of("0123456789abcdef01234567-a1b2c3"), Some("0123456789abcdef01234567"));
    }

    #[test]
    fn a_run_directory_is_created_once_read_back_and_removed_without_following_links() {
        let root = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("precious"), b"keep me").unwrap();
        let name = dir_name("0123456789abcdef01234567", "a1b2c3");
        let info = ConnectionInfo::new_ipc();
        let dir = RunDir::create(root.path(), &name, &info).unwrap();
        assert!(RunDir::create(root.path(), &name, &info).is_err(), "an existing directory is never reused");
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(dir.path()).unwrap().permissions().mode() & 0o777, 0o755);
        std::os::unix::fs::symlink(outside.path(), dir.path().join("link")).unwrap();
        let (again, read) = RunDir::open(root.path(), &name).unwrap();
        assert_eq!(read, info);
        std::mem::forget(again);
        drop(dir);
        assert!(!root.path().join(&name).exists());
        assert_eq!(std::fs::read(outside.path().join("precious")).unwrap(), b"keep me");
    }

    #[test]
    fn the_sweep_keeps_what_is_needed_and_removes_the_rest() {
        let root = tempfile::tempdir().unwrap();
        let keep = dir_name("0123456789abcdef01234567", "aaaa");
        let stale = dir_name("ffffffffffffffffffffffff", "bbbb");
        for n in [&keep, &stale, &"junk".to_owned()] {
            std::fs::create_dir(root.path().join(n)).unwrap();
        }
        let removed = sweep(root.path(), |s| s == "0123456789abcdef01234567");
        assert_eq!(removed, 2);
        assert!(root.path().join(&keep).exists());
    }
}
