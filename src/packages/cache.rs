//! The wheel cache: `<state>/wheels`, a flat directory of wheel files that only the service writes and
//! every python session mounts read-only (at [`super::settings::WHEELS_MOUNT`]).
//!
//! Files are named by their wheel file name (checked by [`super::spec::is_wheel_filename`], so never a
//! path), written to a hidden temporary file created `O_CREAT|O_EXCL|O_NOFOLLOW` and linked into place
//! without replacing anything: a session (or pip inside it) sees a wheel whole or not at all, and
//! temporary files are invisible to pip (they do not end in `.whl`). Nothing here follows a link: the
//! directory is the service's own and no container can write it. Least recently used wheels are evicted
//! when the directory grows past its cap; "used" is the file's mtime, refreshed when an install uses it.

use std::collections::HashSet;
use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use super::spec::is_wheel_filename;

/// The service's wheel directory.
#[derive(Debug)]
pub struct WheelCache {
    dir: PathBuf,
    /// What a file of this cache may be called (wheel file names; npm archive names).
    valid: fn(&str) -> bool,
    /// Evict down to this many bytes.
    max_bytes: u64,
}

impl WheelCache {
    /// The cache at `dir` (nothing is touched until [`WheelCache::prepare`]).
    pub fn new(dir: PathBuf, max_bytes: u64) -> WheelCache {
        WheelCache { dir, valid: is_wheel_filename, max_bytes }
    }

    /// The same kind of directory for npm archives (`<sha256>.tar`, see [`npm_archive_name`]).
    pub fn new_npm(dir: PathBuf, max_bytes: u64) -> WheelCache {
        WheelCache { dir, valid: is_npm_archive_name, max_bytes }
    }

    /// Makes the directory (0755) if need be; it must be a real directory, not a link. Removes what an
    /// earlier run left half-written.
    pub fn prepare(&self) -> std::io::Result<()> {
        match std::fs::DirBuilder::new().mode(0o755).create(&self.dir) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
            Err(e) => return Err(e),
        }
        let meta = std::fs::symlink_metadata(&self.dir)?;
        if !meta.is_dir() {
            return Err(std::io::Error::other(format!("{} is not a directory", self.dir.display())));
        }
        // Readable by the sessions' uid through the read-only mount; writable by the service only.
        std::fs::set_permissions(&self.dir, std::fs::Permissions::from_mode(0o755))?;
        self.remove_temporaries();
        Ok(())
    }

    /// [`WheelCache::new`] and [`WheelCache::prepare`].
    pub fn open(dir: PathBuf, max_bytes: u64) -> std::io::Result<WheelCache> {
        let cache = WheelCache::new(dir, max_bytes);
        cache.prepare()?;
        Ok(cache)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Whether the cache holds `name`.
    pub fn contains(&self, name: &str) -> bool {
        (self.valid)(name) && std::fs::symlink_metadata(self.dir.join(name)).is_ok_and(|m| m.is_file())
    }

    /// Starts writing the wheel `name`. `None` when it is there already (same name, same wheel).
    pub fn create(&self, name: &str) -> std::io::Result<Option<WheelWriter>> {
        if !(self.valid)(name) {
            return Err(std::io::Error::other(format!("{name:?} is not a name of this cache")));
        }
        if self.contains(name) {
            return Ok(None);
        }
        let tmp = self.dir.join(format!(".tmp-{}", hex::encode(rand_bytes())));
        let file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .mode(0o644)
            .open(&tmp)?;
        Ok(Some(WheelWriter { file: Some(file), tmp, target: self.dir.join(name), written: 0 }))
    }

    /// Marks wheels as just used (their mtime), for the LRU order.
    pub fn touch<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        for name in names.into_iter().filter(|n| (self.valid)(n)) {
            let opened = std::fs::OpenOptions::new()
                .read(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
                .open(self.dir.join(name));
            if let Ok(f) = opened {
                let _ = f.set_modified(SystemTime::now());
            }
        }
    }

    /// The wheels and their sizes and mtimes.
    fn entries(&self) -> Vec<(String, u64, i64)> {
        let Ok(read) = std::fs::read_dir(&self.dir) else {
            return Vec::new();
        };
        read.flatten()
            .filter_map(|e| {
                let name = e.file_name().into_string().ok()?;
                let meta = e.metadata().ok()?; // DirEntry::metadata does not follow links
                (meta.is_file() && (self.valid)(&name)).then(|| (name, meta.len(), meta.mtime()))
            })
            .collect()
    }

    /// Bytes held.
    pub fn size(&self) -> u64 {
        self.entries().iter().map(|(_, size, _)| size).sum()
    }

    /// Removes the least recently used wheels until the cache is within its cap, never one of `keep`
    /// (the wheels of installs under way). Returns how many it removed.
    pub fn evict(&self, keep: &HashSet<String>) -> usize {
        let mut entries = self.entries();
        let mut total: u64 = entries.iter().map(|(_, size, _)| size).sum();
        if total <= self.max_bytes {
            return 0;
        }
        entries.sort_by_key(|(name, _, mtime)| (*mtime, name.clone()));
        let mut removed = 0;
        for (name, size, _) in entries {
            if total <= self.max_bytes {
                break;
            }
            if keep.contains(&name) {
                continue;
            }
            if std::fs::remove_file(self.dir.join(&name)).is_ok() {
                total -= size;
                removed += 1;
                tracing::info!(wheel = %name, "evicted a wheel from the package cache");
            }
        }
        metrics::counter!("kernelbox_package_cache_evictions_total").increment(removed as u64);
        removed
    }

    /// Temporary files an earlier run left (it stopped mid-write).
    fn remove_temporaries(&self) {
        if let Ok(read) = std::fs::read_dir(&self.dir) {
            for e in read.flatten() {
                if e.file_name().to_string_lossy().starts_with(".tmp-") {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }
}

/// The archive of one npm fetch: a digest of what decides its content, then `.tar`.
pub fn npm_archive_name(key: &str) -> String {
    let digest = ring::digest::digest(&ring::digest::SHA256, key.as_bytes());
    format!("{}.tar", hex::encode(digest.as_ref()))
}

fn is_npm_archive_name(name: &str) -> bool {
    name.strip_suffix(".tar").is_some_and(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// A file of the cache opened for reading (never through a link).
pub fn open_file(cache: &WheelCache, name: &str) -> std::io::Result<File> {
    if !(cache.valid)(name) {
        return Err(std::io::Error::other(format!("{name:?} is not a name of this cache")));
    }
    std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC | libc::O_NONBLOCK)
        .open(cache.dir.join(name))
}

fn rand_bytes() -> [u8; 8] {
    let mut b = [0u8; 8];
    // uuid's v4 is backed by the OS's random source.
    b.copy_from_slice(&uuid::Uuid::new_v4().as_bytes()[..8]);
    b
}

/// A wheel being written. Dropped before [`WheelWriter::commit`], its temporary file is removed.
pub struct WheelWriter {
    file: Option<File>,
    tmp: PathBuf,
    target: PathBuf,
    written: u64,
}

impl WheelWriter {
    pub fn write(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.written += bytes.len() as u64;
        self.file.as_mut().expect("open until commit").write_all(bytes)
    }

    pub fn written(&self) -> u64 {
        self.written
    }

    /// Puts the wheel in place, unless another install put the same wheel there first.
    pub fn commit(mut self) -> std::io::Result<()> {
        let file = self.file.take().expect("open until commit");
        file.sync_all()?;
        drop(file);
        // link(2) never replaces: the first complete copy wins.
        let linked = match std::fs::hard_link(&self.tmp, &self.target) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(e),
        };
        let _ = std::fs::remove_file(&self.tmp);
        linked
    }
}

impl Drop for WheelWriter {
    fn drop(&mut self) {
        if self.file.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "a-1.0-py3-none-any.whl";
    const B: &str = "b-1.0-py3-none-any.whl";
    const C: &str = "c-1.0-py3-none-any.whl";

    fn put(cache: &WheelCache, name: &str, size: usize) {
        let mut w = cache.create(name).unwrap().unwrap();
        w.write(&vec![7u8; size]).unwrap();
        w.commit().unwrap();
    }

    #[test]
    fn wheels_appear_whole_and_are_never_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = WheelCache::open(tmp.path().join("wheels"), 1 << 20).unwrap();
        put(&cache, A, 10);
        assert!(cache.contains(A));
        assert!(cache.create(A).unwrap().is_none(), "already there");
        // An abandoned write leaves nothing.
        let mut w = cache.create(B).unwrap().unwrap();
        w.write(b"partial").unwrap();
        drop(w);
        assert!(!cache.contains(B));
        assert_eq!(std::fs::read_dir(cache.dir()).unwrap().count(), 1, "no temporary file left");
        assert!(cache.create("../evil-1.0-py3-none-any.whl").is_err());
        assert!(cache.create("x.tar.gz").is_err());
        let npm = WheelCache::open(tmp.path().join("npm"), 1 << 20).unwrap();
        let npm = WheelCache::new_npm(npm.dir().to_path_buf(), 1 << 20);
        let name = npm_archive_name("image\nchalk@5");
        assert!(npm.create(A).is_err(), "only archive names in the npm cache");
        let mut w = npm.create(&name).unwrap().unwrap();
        w.write(b"tar").unwrap();
        w.commit().unwrap();
        assert!(npm.contains(&name) && open_file(&npm, &name).is_ok());
    }

    #[test]
    fn a_link_planted_in_place_of_a_wheel_is_neither_followed_nor_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = WheelCache::open(tmp.path().join("wheels"), 1 << 20).unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"host file").unwrap();
        std::os::unix::fs::symlink(&victim, cache.dir().join(A)).unwrap();
        assert!(!cache.contains(A), "a link is not a wheel");
        let mut w = cache.create(A).unwrap().unwrap();
        w.write(b"wheel").unwrap();
        w.commit().unwrap();
        cache.touch([A]);
        assert_eq!(std::fs::read(&victim).unwrap(), b"host file", "the host file is untouched");
    }

    #[test]
    fn the_least_recently_used_wheels_go_first() {
        let tmp = tempfile::tempdir().unwrap();
        let cache = WheelCache::open(tmp.path().join("wheels"), 250).unwrap();
        put(&cache, A, 100);
        put(&cache, B, 100);
        let old = SystemTime::now() - std::time::Duration::from_secs(3600);
        for (name, age) in [(A, 2), (B, 1)] {
            let f = File::open(cache.dir().join(name)).unwrap();
            f.set_modified(old - std::time::Duration::from_secs(age)).unwrap();
        }
        cache.touch([A]); // A was used just now: B is the oldest
        put(&cache, C, 100);
        assert_eq!(cache.evict(&HashSet::new()), 1);
        assert!(cache.contains(A) && cache.contains(C) && !cache.contains(B));
        assert_eq!(cache.size(), 200);
        // What an install under way needs stays, even over the cap.
        let tiny = WheelCache::open(cache.dir().to_path_buf(), 0).unwrap();
        assert_eq!(tiny.evict(&HashSet::from([A.to_owned(), C.to_owned()])), 0);
    }
}
