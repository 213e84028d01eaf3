//! The file store of the `/jupyter` API: files clients upload (`PUT /jupyter/files`) and files executions
//! produce (written files, displayed images), each with a lifetime, kept on the host by the service.
//!
//! It owns `<files-dir>` (0700) and one subdirectory per owner (`<files-dir>/<owner digest>`, 0755), which
//! later `/jupyter/execute` sessions of the same owner get mounted **read-only** at [`MOUNT_POINT`]: no
//! sandbox can write, create or replace anything here, so the service's own opens cannot be redirected.
//! Even so every file is created `O_CREAT|O_EXCL|O_NOFOLLOW` under a hidden temporary name and renamed into
//! place (a reader never sees half a file), and opened for reading `O_NOFOLLOW`, regular files only.
//!
//! A file's expiry is part of its name (`<stem>-<random>-<expiry epoch s>.<ext>`), so what the service
//! knows survives a restart without a database, and a name that does not parse is not ours to serve. Expired
//! files are removed by [`FileStore::sweep`] (a scheduler job, see `reaper.rs`). The disk the store may use
//! is capped (bytes and files in all): space is reserved before a write, so concurrent uploads cannot
//! overshoot it.
//!
//! Must not touch: sessions or Docker (the mount itself is the session manager's business).

use std::fs::{DirBuilder, File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use crate::node::NodeTag;
use crate::session::Owner;

/// Where a session sees its owner's stored files (read-only).
pub const MOUNT_POINT: &str = "/mnt/files";
/// The longest stem kept from a client's file name, in characters.
const MAX_STEM: usize = 64;
/// The longest extension kept, in characters.
const MAX_EXT: usize = 16;
/// A temporary file older than this is a leftover of an interrupted write.
const STALE_TMP: Duration = Duration::from_secs(3600);
const TMP_PREFIX: &str = ".tmp-";

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    Invalid(String),
    #[error("no such file (or it expired)")]
    NotFound,
    #[error("{0}")]
    TooLarge(String),
    #[error("{0}")]
    Full(String),
    #[error("file store: {0}")]
    Io(#[from] std::io::Error),
}

/// A stored file.
#[derive(Debug, Clone, PartialEq)]
pub struct StoredFile {
    /// Its name in the owner's folder and in its URL.
    pub name: String,
    pub size: u64,
    /// Seconds since the epoch.
    pub expires_at: i64,
}

/// What a sweep removed.
#[derive(Debug, Default, PartialEq)]
pub struct SweepReport {
    pub removed: usize,
    pub bytes: u64,
}

/// Bytes and files on disk, plus what writes in flight have reserved.
#[derive(Debug, Default)]
struct Usage {
    bytes: u64,
    files: u64,
}

pub struct FileStore {
    root: PathBuf,
    /// On a cluster's agent, the node's tag: it follows the random part of every name the store makes, so
    /// that a file id names its node. `None`: single-node names.
    node: Option<NodeTag>,
    /// The cap on all owners' files together.
    max_bytes: u64,
    max_files: u64,
    /// Reserved before each write, under this lock only for the arithmetic.
    usage: Mutex<Usage>,
}

impl FileStore {
    /// Opens (creating it 0700 if missing) the store at `root`: removes leftovers of interrupted writes and
    /// counts what is there.
    pub fn open(root: &Path, max_bytes: u64, max_files: u64) -> std::io::Result<FileStore> {
        DirBuilder::new().recursive(true).mode(0o700).create(root)?;
        if !std::fs::symlink_metadata(root)?.is_dir() {
            return Err(std::io::Error::other(format!("{} is not a directory", root.display())));
        }
        std::fs::set_permissions(root, std::fs::Permissions::from_mode(0o700))?;
        let store =
            FileStore { root: root.to_owned(), node: None, max_bytes, max_files, usage: Mutex::new(Usage::default()) };
        let mut usage = Usage::default();
        store.each_file(|path, name, meta| {
            if name.starts_with(TMP_PREFIX) {
                let _ = std::fs::remove_file(path);
            } else {
                usage.bytes += meta.len();
                usage.files += 1;
            }
        })?;
        *store.usage.lock().expect("usage lock") = usage;
        Ok(store)
    }

    /// The owner's folder, created (0755: the session's user reads it through its read-only mount) if
    /// missing. The path a session mounts at [`MOUNT_POINT`].
    /// The same store, making and serving the names of the node tagged `node`.
    pub fn on_node(self, node: Option<NodeTag>) -> Self {
        FileStore { node, ..self }
    }

    pub fn owner_dir(&self, owner: &Owner) -> std::io::Result<PathBuf> {
        let dir = self.root.join(owner_dir_name(owner)?);
        match DirBuilder::new().mode(0o755).create(&dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        if !std::fs::symlink_metadata(&dir)?.is_dir() {
            return Err(std::io::Error::other(format!("{} is not a directory", dir.display())));
        }
        Ok(dir)
    }

    /// Whether `owner` has stored files. Its folder is mounted only then, so that the other executions can
    /// take a pre-started kernel (a running container cannot get a mount).
    pub fn has_files(&self, owner: &Owner) -> bool {
        let Ok(name) = owner_dir_name(owner) else { return false };
        std::fs::read_dir(self.root.join(name)).is_ok_and(|mut entries| {
            entries.any(|e| e.is_ok_and(|e| !e.file_name().to_string_lossy().starts_with('.')))
        })
    }

    /// Stores `content` for `owner` under a new, unique, safe name made from `filename` and `extension`,
    /// living `lifetime` from `now` (seconds since the epoch).
    pub fn put(
        &self,
        owner: &Owner,
        filename: &str,
        extension: &str,
        content: &[u8],
        lifetime: Duration,
        now: i64,
    ) -> Result<StoredFile, StoreError> {
        let size = content.len() as u64;
        if size > self.max_bytes {
            return Err(StoreError::TooLarge(format!(
                "the file ({size} bytes) is larger than the file store's capacity ({} bytes)",
                self.max_bytes
            )));
        }
        let expires_at = now + lifetime.as_secs() as i64;
        let name = stored_name_on(filename, extension, expires_at, self.node);
        self.reserve(size)?;
        let written = self.write(owner, &name, content);
        if written.is_err() {
            self.release(size, 1);
        }
        written?;
        Ok(StoredFile { name, size, expires_at })
    }

    fn reserve(&self, size: u64) -> Result<(), StoreError> {
        let mut usage = self.usage.lock().expect("usage lock");
        if usage.bytes + size > self.max_bytes || usage.files + 1 > self.max_files {
            return Err(StoreError::Full(format!(
                "the file store is full ({} of {} bytes, {} of {} files); retry when files expire",
                usage.bytes, self.max_bytes, usage.files, self.max_files
            )));
        }
        usage.bytes += size;
        usage.files += 1;
        Ok(())
    }

    fn release(&self, bytes: u64, files: u64) {
        let mut usage = self.usage.lock().expect("usage lock");
        usage.bytes = usage.bytes.saturating_sub(bytes);
        usage.files = usage.files.saturating_sub(files);
    }

    fn write(&self, owner: &Owner, name: &str, content: &[u8]) -> std::io::Result<()> {
        let dir = self.owner_dir(owner)?;
        let tmp = dir.join(format!("{TMP_PREFIX}{}", random_hex()));
        let result = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&tmp)?;
            file.write_all(content)?;
            file.sync_all()?;
            std::fs::rename(&tmp, dir.join(name))
        })();
        if result.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
        result
    }

    /// Opens `owner`'s file `name` for reading, if it exists and has not expired at `now`. Another owner's
    /// file is `NotFound` too.
    pub fn open_file(&self, owner: &Owner, name: &str, now: i64) -> Result<(File, u64), StoreError> {
        let expires_at = parse_name_on(name, self.node).ok_or(StoreError::NotFound)?;
        if expires_at <= now {
            return Err(StoreError::NotFound);
        }
        let path = self.root.join(owner_dir_name(owner)?).join(name);
        let file = match OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC).open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Err(StoreError::NotFound),
            // ELOOP: a symlink, which the service never makes.
            Err(e) if e.raw_os_error() == Some(libc::ELOOP) => return Err(StoreError::NotFound),
            Err(e) => return Err(e.into()),
        };
        let meta = file.metadata()?;
        if !meta.is_file() {
            return Err(StoreError::NotFound);
        }
        Ok((file, meta.len()))
    }

    /// Removes every file expired at `now` (seconds since the epoch), names that are not the store's, and
    /// temporary files of interrupted writes.
    pub fn sweep(&self, now: i64) -> SweepReport {
        let mut report = SweepReport::default();
        let stale_tmp = std::time::SystemTime::now() - STALE_TMP;
        let result = self.each_file(|path, name, meta| {
            let remove = if name.starts_with(TMP_PREFIX) {
                meta.modified().is_ok_and(|m| m < stale_tmp)
            } else {
                // Either shape: a file is removed when it expires, never for its name's node part.
                parse_name_as(name, |random| random_part(random, None) || random_part(random, self.node))
                    .is_none_or(|expires_at| expires_at <= now)
            };
            if remove && std::fs::remove_file(path).is_ok() && !name.starts_with(TMP_PREFIX) {
                report.removed += 1;
                report.bytes += meta.len();
            }
        });
        if let Err(e) = result {
            tracing::warn!(error = %e, "file store sweep: could not list the store");
        }
        self.release(report.bytes, report.removed as u64);
        report
    }

    /// Calls `f(path, name, metadata)` for each regular file in each owner's folder (symlinks and other
    /// kinds are never followed; the service makes none).
    fn each_file(&self, mut f: impl FnMut(&Path, &str, &std::fs::Metadata)) -> std::io::Result<()> {
        for owner in std::fs::read_dir(&self.root)? {
            let owner = owner?;
            if !owner.file_type()?.is_dir() {
                continue;
            }
            let Ok(entries) = std::fs::read_dir(owner.path()) else { continue };
            for entry in entries.flatten() {
                let Ok(meta) = entry.metadata() else { continue };
                if !meta.is_file() {
                    continue;
                }
                let name = entry.file_name();
                if let Some(name) = name.to_str() {
                    f(&entry.path(), name, &meta);
                }
            }
        }
        Ok(())
    }

    /// The owners with a folder in the store (the candidates of a cluster agent's signed links).
    pub fn owners(&self) -> Vec<Owner> {
        let Ok(entries) = std::fs::read_dir(&self.root) else { return Vec::new() };
        entries
            .flatten()
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().to_str().map(|name| Owner(name.to_owned())))
            .filter(|owner| owner_dir_name(owner).is_ok())
            .collect()
    }

    /// Bytes and files stored now (reservations of writes in flight included).
    pub fn usage(&self) -> (u64, u64) {
        let usage = self.usage.lock().expect("usage lock");
        (usage.bytes, usage.files)
    }
}

/// The owner's folder name: its digest (hex, or `anonymous` without keys), checked all the same.
fn owner_dir_name(owner: &Owner) -> std::io::Result<&str> {
    let name = owner.0.as_str();
    let ok = !name.is_empty() && name.len() <= 64 && name.bytes().all(|b| b.is_ascii_alphanumeric());
    if ok { Ok(name) } else { Err(std::io::Error::other("an owner that is not a plain digest")) }
}

fn random_hex() -> String {
    uuid::Uuid::new_v4().simple().to_string()[..12].to_owned()
}

/// `<stem>-<12 random hex>-<expiry>.<ext>`: the stem keeps `[A-Za-z0-9_-]` (the rest becomes `_`, at most
/// [`MAX_STEM`] characters, `file` when nothing is left), the extension `[A-Za-z0-9]` (at most
/// [`MAX_EXT`]; none when nothing is left).
pub fn stored_name(filename: &str, extension: &str, expires_at: i64) -> String {
    stored_name_on(filename, extension, expires_at, None)
}

/// [`stored_name`] on the node tagged `node`: the 12 random hex digits are followed by the tag (20 in all).
pub fn stored_name_on(filename: &str, extension: &str, expires_at: i64, node: Option<NodeTag>) -> String {
    let stem: String = filename
        .chars()
        .take(MAX_STEM)
        .map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' })
        .collect();
    let stem = if stem.trim_matches('_').is_empty() { "file".to_owned() } else { stem };
    let ext: String =
        extension.trim_start_matches('.').chars().filter(|c| c.is_ascii_alphanumeric()).take(MAX_EXT).collect();
    let tag = node.as_ref().map_or("", NodeTag::as_str);
    let mut name = format!("{stem}-{}{tag}-{expires_at}", random_hex());
    if !ext.is_empty() {
        name.push('.');
        name.push_str(&ext);
    }
    name
}

/// A stored file's expiry from its name, or `None` when the name is not one a single-node store makes.
pub fn parse_name(name: &str) -> Option<i64> {
    parse_name_on(name, None)
}

/// A stored file's expiry from its name, or `None` when the name is not one the store of node `node`
/// makes (on an agent: its tag after the 12 random hex digits; single node: none).
pub fn parse_name_on(name: &str, node: Option<NodeTag>) -> Option<i64> {
    parse_name_as(name, |random| random_part(random, node))
}

/// The tag of the node whose store made `name` (`None`: a single-node name, or not a stored name): what
/// an API replica routes a `/jupyter` file by.
pub fn node_of(name: &str) -> Option<NodeTag> {
    let mut tag = None;
    parse_name_as(name, |random| {
        tag = random.get(12..).and_then(NodeTag::parse);
        random_part(random, tag)
    })?;
    tag
}

/// Whether `random` is the random part of a name of node `node`'s store.
fn random_part(random: &str, node: Option<NodeTag>) -> bool {
    let (hex, tag) = random.split_at_checked(12).unwrap_or((random, "?"));
    let tag_ok = match node {
        Some(node) => tag == node.as_str(),
        None => tag.is_empty(),
    };
    hex.len() == 12 && hex.bytes().all(|b| b.is_ascii_hexdigit()) && tag_ok
}

fn parse_name_as(name: &str, mut random_ok: impl FnMut(&str) -> bool) -> Option<i64> {
    if name.is_empty() || name.len() > 255 || name.starts_with('.') {
        return None;
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_-.".contains(&b)) {
        return None;
    }
    let base = match name.split_once('.') {
        Some((base, ext)) if !ext.is_empty() && ext.bytes().all(|b| b.is_ascii_alphanumeric()) => base,
        Some(_) => return None,
        None => name,
    };
    let mut parts = base.rsplitn(3, '-');
    let expiry = parts.next()?;
    let random = parts.next()?;
    let stem = parts.next()?;
    (random_ok(random) && !stem.is_empty() && expiry.bytes().all(|b| b.is_ascii_digit()))
        .then(|| expiry.parse().ok())
        .flatten()
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_800_000_000;
    const MIN20: Duration = Duration::from_secs(20 * 60);

    fn owner(s: &str) -> Owner {
        Owner(s.into())
    }

    fn read(store: &FileStore, o: &Owner, name: &str, now: i64) -> Result<Vec<u8>, StoreError> {
        use std::io::Read;
        let (mut f, _) = store.open_file(o, name, now)?;
        let mut v = Vec::new();
        f.read_to_end(&mut v)?;
        Ok(v)
    }

    #[test]
    fn on_an_agent_names_carry_the_node_tag_and_only_its_own_shape_is_served() {
        let tag = NodeTag::parse("0123abcd").unwrap();
        let name = stored_name_on("data", "csv", NOW, Some(tag));
        let random = name.strip_prefix("data-").unwrap().split('-').next().unwrap();
        assert_eq!((random.len(), &random[12..]), (20, "0123abcd"), "{name}");
        assert_eq!(parse_name_on(&name, Some(tag)), Some(NOW));
        assert_eq!(node_of(&name), Some(tag), "what a replica routes by");
        assert_eq!(parse_name(&name), None, "a single node does not serve it");
        assert_eq!(parse_name_on(&name, NodeTag::parse("89abcdef")), None, "nor another node");
        let single = stored_name("data", "csv", NOW);
        assert_eq!(parse_name_on(&single, Some(tag)), None);
        assert_eq!(node_of(&single), None);
    }

    #[test]
    fn an_agents_store_keeps_its_files_until_they_expire_and_serves_them() {
        let dir = tempfile::tempdir().unwrap();
        let tag = NodeTag::parse("0123abcd").unwrap();
        let store = FileStore::open(dir.path(), 1 << 20, 100).unwrap().on_node(Some(tag));
        let o = owner("a");
        let f = store.put(&o, "data", "csv", b"1,2", MIN20, NOW).unwrap();
        assert_eq!(store.sweep(NOW + 60).removed, 0, "not expired, not swept for its name");
        assert_eq!(read(&store, &o, &f.name, NOW + 60).unwrap(), b"1,2");
        assert_eq!(store.sweep(NOW + 1200).removed, 1);
    }

    #[test]
    fn names_are_safe_unique_and_carry_their_expiry() {
        let a = stored_name("data", "csv", NOW);
        assert!(a.starts_with("data-") && a.ends_with(&format!("-{NOW}.csv")), "{a}");
        assert_ne!(a, stored_name("data", "csv", NOW));
        assert_eq!(parse_name(&a), Some(NOW));
        let evil = stored_name("../../etc/pass wd.x", "/sh;rm", NOW);
        assert!(!evil.contains('/') && !evil.contains(' ') && evil.ends_with(".shrm"), "{evil}");
        assert_eq!(parse_name(&evil), Some(NOW));
        let bare = stored_name("", "", NOW);
        assert!(bare.starts_with("file-") && !bare.contains('.'), "{bare}");
        assert_eq!(parse_name(&bare), Some(NOW));
        assert_eq!(parse_name(&stored_name("my-file.tar", ".gz", NOW)), Some(NOW));
        for bad in ["", ".hidden", "../x", "a/b", "plain.txt", "x-zzzzzzzzzzzz-1.txt", "x-0123456789ab-1a.txt", "a.b.c"]
        {
            assert_eq!(parse_name(bad), None, "{bad}");
        }
    }

    #[test]
    fn files_live_until_their_expiry_and_only_for_their_owner() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(&dir.path().join("files"), 1 << 20, 100).unwrap();
        let (alice, bob) = (owner("a1b2"), owner("c3d4"));
        assert!(!store.has_files(&alice));
        let short = store.put(&alice, "data", "csv", b"1,2,3\n", MIN20, NOW).unwrap();
        let long = store.put(&alice, "keep", "txt", b"kept", Duration::from_secs(2 * 86400), NOW).unwrap();
        assert_eq!(short.expires_at, NOW + 1200);
        assert_eq!(read(&store, &alice, &short.name, NOW).unwrap(), b"1,2,3\n");
        assert!(matches!(read(&store, &bob, &short.name, NOW), Err(StoreError::NotFound)));
        assert_eq!(store.usage(), (10, 2));
        assert!(store.has_files(&alice) && !store.has_files(&bob));
        // The file's mode lets the session's user read it; the owner folder is readable, the root is not.
        let path = dir.path().join("files/a1b2").join(&short.name);
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o644);
        assert_eq!(std::fs::metadata(dir.path().join("files")).unwrap().permissions().mode() & 0o777, 0o700);

        // A minute before its expiry it is there; at its expiry it is not served, and the sweep removes it.
        assert_eq!(store.sweep(NOW + 1140), SweepReport::default());
        assert!(matches!(read(&store, &alice, &short.name, NOW + 1200), Err(StoreError::NotFound)));
        assert_eq!(store.sweep(NOW + 1200), SweepReport { removed: 1, bytes: 6 });
        assert!(!path.exists());
        assert_eq!(read(&store, &alice, &long.name, NOW + 1200).unwrap(), b"kept");
        assert_eq!(store.usage(), (4, 1));

        // What a restarted service knows comes from the names alone.
        drop(store);
        let store = FileStore::open(&dir.path().join("files"), 1 << 20, 100).unwrap();
        assert_eq!(store.usage(), (4, 1));
        assert_eq!(store.sweep(NOW + 2 * 86400), SweepReport { removed: 1, bytes: 4 });
    }

    #[test]
    fn the_cap_refuses_what_does_not_fit() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path(), 10, 3).unwrap();
        let o = owner("a1");
        assert!(matches!(store.put(&o, "big", "bin", &[0; 11], MIN20, NOW), Err(StoreError::TooLarge(_))));
        store.put(&o, "a", "bin", &[0; 6], MIN20, NOW).unwrap();
        assert!(matches!(store.put(&o, "b", "bin", &[0; 5], MIN20, NOW), Err(StoreError::Full(_))));
        store.put(&o, "c", "bin", &[0; 4], MIN20, NOW).unwrap();
        store.sweep(NOW + 1200);
        store.put(&o, "d", "bin", &[], MIN20, NOW + 1200).unwrap();
        store.put(&o, "e", "bin", &[], MIN20, NOW + 1200).unwrap();
        store.put(&o, "f", "bin", &[], MIN20, NOW + 1200).unwrap();
        assert!(matches!(store.put(&o, "g", "bin", &[], MIN20, NOW + 1200), Err(StoreError::Full(_))));
    }

    #[test]
    fn links_and_strangers_in_the_store_are_neither_followed_nor_served() {
        let dir = tempfile::tempdir().unwrap();
        let store = FileStore::open(dir.path(), 1 << 20, 100).unwrap();
        let o = owner("a1");
        let odir = store.owner_dir(&o).unwrap();
        let secret = dir.path().join("secret");
        std::fs::write(&secret, "secret").unwrap();
        let name = format!("link-0123456789ab-{}.txt", NOW + 100);
        std::os::unix::fs::symlink(&secret, odir.join(&name)).unwrap();
        assert!(matches!(read(&store, &o, &name, NOW), Err(StoreError::NotFound)));
        assert!(matches!(store.open_file(&owner("../x"), &name, NOW), Err(StoreError::Io(_))));
        std::fs::write(odir.join("stranger.txt"), "x").unwrap();
        store.sweep(NOW);
        assert!(!odir.join("stranger.txt").exists());
        assert_eq!(std::fs::read_to_string(&secret).unwrap(), "secret");
    }
}
