//! Small JSON records the service keeps per session in folders of its state directory that only it writes
//! (a pooled session's claim, the packages a session installed), so that adoption after a restart knows
//! what labels cannot say. Written `O_CREAT|O_EXCL|O_NOFOLLOW` (a replacement goes through a temporary
//! file and a rename), read `O_NOFOLLOW` as a regular file of at most 64 KiB, removed with their session.

use std::io::{Read, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::model::SessionId;

/// The folders of the state directory that hold what the service keeps per session.
#[derive(Debug, Clone)]
pub struct StateDirs {
    /// Run directories, one per boot (`rundir.rs`).
    pub runs: PathBuf,
    /// Claims of pooled kernels: who owns a claimed container (`<state>/claims/<session>.json`).
    pub claims: PathBuf,
    /// The packages each session installed, for a session adopted after a restart.
    pub installed: PathBuf,
    /// Each session's network allow-list after its last `PUT` (`network.rs`).
    pub network: PathBuf,
}

impl StateDirs {
    pub fn new(state_dir: &Path) -> Self {
        StateDirs {
            runs: state_dir.join("sessions"),
            claims: state_dir.join("claims"),
            installed: state_dir.join("installed"),
            network: state_dir.join("network"),
        }
    }

    /// Removes the records of a session that is not kept for adoption.
    pub fn forget(&self, id: &str) {
        remove(&self.claims, id);
        remove(&self.installed, id);
        remove(&self.network, id);
    }

    /// Removes the run directories and records that no session needs.
    pub fn sweep(&self, needed: impl Fn(&str) -> bool) {
        super::rundir::sweep(&self.runs, &needed);
        sweep(&self.claims, &needed);
        sweep(&self.installed, &needed);
        sweep(&self.network, &needed);
    }
}

/// The largest record read back.
const MAX_RECORD: u64 = 64 << 10;

fn path(dir: &Path, id: &str) -> PathBuf {
    dir.join(format!("{id}.json"))
}

fn create(path: &Path) -> std::io::Result<std::fs::File> {
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path)
}

fn make_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)
}

/// Writes the record of session `id`; fails if it exists.
pub fn write_new<T: Serialize>(dir: &Path, id: &SessionId, record: &T) -> std::io::Result<()> {
    make_dir(dir)?;
    create(&path(dir, id.as_str()))?.write_all(&serde_json::to_vec(record).expect("records serialize"))
}

/// Writes or replaces the record of session `id`, whole or not at all.
pub fn replace<T: Serialize>(dir: &Path, id: &SessionId, record: &T) -> std::io::Result<()> {
    make_dir(dir)?;
    let temporary = dir.join(format!(".{id}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let written = create(&temporary)
        .and_then(|mut f| f.write_all(&serde_json::to_vec(record).expect("records serialize")))
        .and_then(|()| std::fs::rename(&temporary, path(dir, id.as_str())));
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

/// Reads the record of session `id` (`None` if absent, not a regular file, too large or not the type).
pub fn read<T: DeserializeOwned>(dir: &Path, id: &str) -> Option<T> {
    SessionId::parse(id)?;
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
        .open(path(dir, id))
        .ok()?;
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(MAX_RECORD).read_to_end(&mut bytes).ok()?;
    serde_json::from_slice(&bytes).ok()
}

/// Writes `dir/name` whole or not at all: a fresh temporary file (`O_EXCL|O_NOFOLLOW`) renamed into
/// place, which replaces a link planted there rather than following it.
pub fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> std::io::Result<()> {
    let temporary = dir.join(format!(".{name}.{}.tmp", uuid::Uuid::new_v4().simple()));
    let written = create(&temporary)
        .and_then(|mut f| f.write_all(bytes).and_then(|()| f.sync_all()))
        .and_then(|()| std::fs::rename(&temporary, dir.join(name)));
    if written.is_err() {
        let _ = std::fs::remove_file(&temporary);
    }
    written
}

/// Reads a regular file of at most `max` bytes without following a link (`None`: absent, a link, not a
/// regular file, too large).
pub fn read_small(path: &Path, max: u64) -> Option<Vec<u8>> {
    let file =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(path).ok()?;
    let meta = file.metadata().ok()?;
    if !meta.is_file() || meta.len() > max {
        return None;
    }
    let mut bytes = Vec::new();
    file.take(max).read_to_end(&mut bytes).ok()?;
    Some(bytes)
}

pub fn remove(dir: &Path, id: &str) {
    let _ = std::fs::remove_file(path(dir, id));
}

/// Removes the records (and stray temporary files) of sessions that are not `needed`.
pub fn sweep(dir: &Path, needed: impl Fn(&str) -> bool) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let id = name.strip_suffix(".json").unwrap_or("");
        if !needed(id) {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id() -> SessionId {
        SessionId::parse("0123456789abcdef01234567").unwrap()
    }

    #[test]
    fn a_record_is_written_once_replaced_whole_read_back_and_removed() {
        let dir = tempfile::tempdir().unwrap();
        let folder = dir.path().join("records");
        write_new(&folder, &id(), &vec!["six"]).unwrap();
        assert!(write_new(&folder, &id(), &vec!["other"]).is_err(), "never overwritten in place");
        replace(&folder, &id(), &vec!["six", "orjson==3.10.0"]).unwrap();
        assert_eq!(read::<Vec<String>>(&folder, id().as_str()), Some(vec!["six".into(), "orjson==3.10.0".into()]));
        assert_eq!(std::fs::read_dir(&folder).unwrap().count(), 1, "no temporary file left");
        assert_eq!(read::<Vec<String>>(&folder, "../../etc/passwd"), None);
        sweep(&folder, |_| false);
        assert_eq!(read::<Vec<String>>(&folder, id().as_str()), None);
    }

    #[test]
    fn a_link_planted_in_place_of_a_record_is_not_followed() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("target.json");
        std::fs::write(&target, b"[\"planted\"]").unwrap();
        std::os::unix::fs::symlink(&target, dir.path().join(format!("{}.json", id()))).unwrap();
        assert_eq!(read::<Vec<String>>(dir.path(), id().as_str()), None);
        assert!(write_new(dir.path(), &id(), &vec!["x"]).is_err());
        replace(dir.path(), &id(), &vec!["x"]).unwrap();
        assert_eq!(std::fs::read(&target).unwrap(), b"[\"planted\"]", "the link's target is untouched");
    }
}
