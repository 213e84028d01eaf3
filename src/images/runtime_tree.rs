//! The runtime tree of each kernel image: its `/usr` and `/opt` (the interpreter, its libraries, the venv,
//! the JDK, Deno, the start contract) copied out once into `<runtimes>/<image id>/` and bind-mounted
//! read-only over the same paths in every session of that image.
//!
//! Why: with a `fuse-overlayfs` engine every container reads its image's files through a FUSE mount of
//! its own, so no page of a kernel's files is shared between sessions, and every lookup costs a trip to
//! the FUSE daemon. A file read through a plain bind mount is one host inode: its pages are cached once
//! for all sessions, and the kernel's imports run at the host filesystem's speed.
//!
//! The invariants (ARCHITECTURE.md):
//! - Only the service writes the runtimes folder; a session mounts its tree read-only (EROFS on write)
//!   and sees nothing else of it. The folder is never a path a sandbox can create or replace.
//! - A tree is complete or absent: it is written under a temporary name, marked with its image id, and
//!   renamed into place. Nothing found in the folder is followed: a name that is not a real directory
//!   holding the marker (a planted link, a file) is left alone and not used.
//! - A tree is named by the image's id (its content hash), and a boot that uses it runs exactly that image
//!   id. A rebuilt image gets a new tree; an old one is removed once no image and no container names it.
//! - A tree that cannot be made (disk full, an image without the paths, something in the way) is logged
//!   and counted, and sessions boot from the image's own files: a boot never fails or waits for a tree.

use std::collections::{HashMap, HashSet};
use std::io::Read;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::file_lock;
use crate::runtime::{ContainerRuntime, RuntimeError, labels};

/// The directories a tree holds, each mounted read-only over the same path in the container: the
/// interpreters and their shared libraries (the JDK is in `/usr/lib/jvm`), the venvs and Deno. Not all of
/// `/usr`: the engine mounts its init at `/sbin/docker-init`, which is `/usr/sbin` in a merged-`/usr`
/// image, and cannot make that mount point inside a read-only mount.
pub const PATHS: [&str; 3] = ["/usr/bin", "/usr/lib", "/opt"];
/// Written last, holding the image id: a directory without it is not a tree.
const MARKER: &str = ".kernelbox-tree";
/// Chunks of a copy in flight between the engine and the disk.
const CHUNKS_IN_FLIGHT: usize = 16;
/// A tree that could not be made is tried again after this long (a full disk may have been cleared).
const RETRY_AFTER: Duration = Duration::from_secs(300);
/// A temporary tree older than this belongs to no copy still under way.
const ABANDONED_AFTER: Duration = Duration::from_secs(3600);

/// Why a tree could not be made or used.
#[derive(Debug, thiserror::Error)]
pub enum TreeError {
    #[error("the runtimes folder {0} is not a directory (a link, or another kind of file): left as it is")]
    FolderNotADirectory(PathBuf),
    #[error("{0} is in the way: not a tree the service made (a link, a file, no marker); left as it is")]
    InTheWay(PathBuf),
    #[error("the image {0} is not here")]
    NoImage(String),
    #[error("the image id {0:?} is not a sha256 digest")]
    BadImageId(String),
    #[error("the image {image} has no {path}")]
    MissingPath { image: String, path: String },
    #[error("copying the image's files: {0}")]
    Runtime(#[from] RuntimeError),
    #[error("writing the tree: {0}")]
    Io(#[from] std::io::Error),
    #[error("the service is stopping")]
    Stopping,
}

impl TreeError {
    /// The reason as a metric label.
    fn reason(&self) -> &'static str {
        match self {
            TreeError::FolderNotADirectory(_) | TreeError::InTheWay(_) => "in_the_way",
            TreeError::NoImage(_) | TreeError::BadImageId(_) => "no_image",
            TreeError::MissingPath { .. } => "missing_path",
            TreeError::Runtime(_) => "engine",
            TreeError::Io(_) => "disk",
            TreeError::Stopping => "stopping",
        }
    }
}

/// What a boot that uses a tree changes in its container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TreeMounts {
    /// Run exactly this image (its id), whose files the tree holds.
    pub image_id: String,
    /// The tree's name (the id's hex), for the container's [`labels::RUNTIME_TREE`].
    pub hash: String,
    /// `host:container:ro` bind mounts, one per path in [`PATHS`].
    pub binds: Vec<String>,
}

/// What is known of one image reference's tree.
#[derive(Debug, Clone)]
enum Entry {
    Making,
    Ready { id: String, root: PathBuf },
    Failed { at: Instant },
}

/// The runtime trees of this service's kernel images.
pub struct RuntimeTrees {
    runtime: Arc<dyn ContainerRuntime>,
    /// `None`: the feature is off and every session reads its image's files.
    dir: Option<PathBuf>,
    instance: String,
    /// Where sessions mount something of their own inside a tree's paths (a tmpfs over
    /// `/opt/kernelbox/packages`): made in each tree, as the engine cannot make a mount point in a
    /// read-only mount.
    mount_points: Vec<String>,
    /// Per image reference. Never held across an `.await`.
    entries: Mutex<HashMap<String, Entry>>,
    tracker: TaskTracker,
    stop: CancellationToken,
}

impl RuntimeTrees {
    /// Trees kept in `dir` (`None`: off), each with the empty directories `mount_points`.
    pub fn new(
        runtime: Arc<dyn ContainerRuntime>,
        dir: Option<PathBuf>,
        instance: &str,
        mount_points: &[&str],
    ) -> Arc<Self> {
        Arc::new(RuntimeTrees {
            runtime,
            dir,
            instance: instance.to_owned(),
            mount_points: mount_points.iter().map(|m| m.to_string()).collect(),
            entries: Mutex::default(),
            tracker: TaskTracker::new(),
            stop: CancellationToken::new(),
        })
    }

    /// The mounts for a boot of `image` (a reference) if its tree is ready; otherwise `None`, and the
    /// tree is begun in the background the first time, so that later boots have it. `inside` are the
    /// boot's own mount points: one inside a tree's paths that the tree lacks means no tree for this
    /// boot. Never waits.
    pub fn for_boot<'a>(
        self: &Arc<Self>,
        image: &str,
        inside: impl IntoIterator<Item = &'a str>,
    ) -> Option<TreeMounts> {
        self.dir.as_ref()?;
        let mut entries = self.entries.lock().expect("tree entries");
        match entries.get(image) {
            Some(Entry::Ready { id, root }) => {
                if is_tree_shape(root) {
                    let missing = inside.into_iter().find(|m| within_paths(m) && !is_real_dir_below(root, m));
                    if let Some(missing) = missing {
                        tracing::warn!(tree = %root.display(), mount = missing, "the runtime tree has no such mount point: not used for this boot");
                        return None;
                    }
                    return Some(mounts(id, root));
                }
                tracing::warn!(tree = %root.display(), "a runtime tree changed shape under the service: not used");
                entries.remove(image);
                None
            }
            Some(Entry::Making) => None,
            Some(Entry::Failed { at }) if at.elapsed() < RETRY_AFTER => None,
            _ => {
                entries.insert(image.to_owned(), Entry::Making);
                drop(entries);
                let this = self.clone();
                let image = image.to_owned();
                self.tracker.spawn(async move { this.settle(&image).await });
                None
            }
        }
    }

    /// A boot that used the tree of `image` could not create its container (the image or the tree may
    /// have gone): the next boot looks again.
    pub fn forget(&self, image: &str) {
        self.entries.lock().expect("tree entries").remove(image);
    }

    /// Makes (or finds) the tree of `image`'s current id, records the outcome for [`Self::for_boot`], and
    /// returns it.
    pub async fn ensure(&self, image: &str) -> Result<TreeMounts, TreeError> {
        self.entries.lock().expect("tree entries").insert(image.to_owned(), Entry::Making);
        let made = self.make(image).await;
        metrics::gauge!("kernelbox_runtime_tree_ready", "image" => image.to_owned())
            .set(f64::from(u8::from(made.is_ok())));
        let entry = match &made {
            Ok((id, root)) => Entry::Ready { id: id.clone(), root: root.clone() },
            Err(e) => {
                metrics::counter!("kernelbox_runtime_tree_failures_total", "reason" => e.reason()).increment(1);
                tracing::warn!(image, error = %e, "no runtime tree: sessions of this image read the image's own files");
                Entry::Failed { at: Instant::now() }
            }
        };
        self.entries.lock().expect("tree entries").insert(image.to_owned(), entry);
        made.map(|(id, root)| mounts(&id, &root))
    }

    async fn settle(&self, image: &str) {
        if let Ok(m) = self.ensure(image).await {
            tracing::info!(image, tree = %m.hash, "runtime tree ready: sessions of this image share its files");
        }
    }

    /// The upkeep: a tree whose image was rebuilt is replaced (made anew for the current id), and trees
    /// that neither a current image of `images` nor any container names are removed.
    pub async fn tend(self: &Arc<Self>, images: &[String]) {
        let Some(dir) = self.dir.clone() else { return };
        let mut current = HashSet::new();
        for image in images {
            let id = match self.runtime.image(image).await {
                Ok(found) => found.map(|i| i.id),
                Err(_) => return, // the engine is away: decide nothing
            };
            let hash = id.as_deref().and_then(id_hex);
            current.extend(hash.map(str::to_owned));
            let stale = matches!(
                self.entries.lock().expect("tree entries").get(image),
                Some(Entry::Ready { id: known, .. }) if Some(known) != id.as_ref()
            );
            if stale {
                self.forget(image);
                // Used before: make the new one now rather than at the next boot.
                let _ = self.for_boot(image, []);
            }
        }
        let named = match self.runtime.list(labels::RUNTIME_TREE, None).await {
            Ok(containers) => containers.into_iter().filter_map(|c| c.labels.get(labels::RUNTIME_TREE).cloned()),
            Err(_) => return,
        };
        current.extend(named);
        let removed = tokio::task::spawn_blocking(move || remove_unused(&dir, &current)).await.unwrap_or_default();
        if removed > 0 {
            tracing::info!(removed, "old runtime trees removed");
        }
        self.sweep_copiers().await;
    }

    /// Whether a tree is being made: its copy containers are not orphans.
    pub fn is_copying(&self) -> bool {
        !self.tracker.is_empty()
    }

    /// Containers of an earlier copy that was cut off (a service killed mid-copy) are removed.
    async fn sweep_copiers(&self) {
        if self.is_copying() {
            return;
        }
        let Ok(found) = self.runtime.list(labels::EXPORT, None).await else { return };
        for c in found.into_iter().filter(|c| c.labels.get(labels::INSTANCE) == Some(&self.instance)) {
            let _ = self.runtime.remove(&c.id).await;
        }
    }

    /// Stops copies under way (their containers are removed) and waits for them, 20 s at most (an engine
    /// that stopped answering; the upkeep of the next start removes what is left).
    pub async fn shutdown(&self) {
        self.stop.cancel();
        self.tracker.close();
        if tokio::time::timeout(Duration::from_secs(20), self.tracker.wait()).await.is_err() {
            tracing::warn!("a runtime tree copy did not stop within 20 s");
        }
    }

    async fn make(&self, image: &str) -> Result<(String, PathBuf), TreeError> {
        let dir = self.dir.clone().expect("trees on");
        let id = self.runtime.image(image).await?.ok_or_else(|| TreeError::NoImage(image.to_owned()))?.id;
        let hash = id_hex(&id).ok_or_else(|| TreeError::BadImageId(id.clone()))?.to_owned();
        let root = dir.join(&hash);
        if found(&dir, &root, &id).await? {
            return Ok((id, root));
        }
        // One copy per tree, across every service sharing the folder: the others wait for it.
        let lock_file = dir.join(format!(".lock-{hash}"));
        let lock = file_lock::lock(&lock_file, &self.stop, || {
            tracing::info!(image, "another service is copying this runtime tree; waiting for it")
        });
        let Some(_lock) = lock.await? else { return Err(TreeError::Stopping) };
        if found(&dir, &root, &id).await? {
            return Ok((id, root));
        }
        let temp = dir.join(format!(".tmp-{hash}-{}", uuid::Uuid::new_v4().simple()));
        std::fs::DirBuilder::new().mode(0o755).create(&temp)?;
        let copied = self.copy_into(image, &id, &temp).await;
        let placed = match copied {
            Ok(()) => {
                let (temp, root, id) = (temp.clone(), root.clone(), id.clone());
                let mount_points = self.mount_points.clone();
                let finish = move || {
                    for m in mount_points.iter().filter(|m| within_paths(m)) {
                        std::fs::DirBuilder::new().recursive(true).mode(0o755).create(in_tree(&temp, m))?;
                    }
                    place(&temp, &root, &id)
                };
                tokio::task::spawn_blocking(finish).await.map_err(io_join)?
            }
            Err(e) => Err(e),
        };
        if temp.exists() {
            let temp = temp.clone();
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(temp)).await;
        }
        placed.map(|()| (id, root))
    }

    /// Each of [`PATHS`], streamed from the engine into `temp` without touching the disk in between.
    async fn copy_into(&self, image: &str, id: &str, temp: &Path) -> Result<(), TreeError> {
        for path in PATHS {
            let (tx, rx) = mpsc::channel(CHUNKS_IN_FLIGHT);
            let labels = HashMap::from([
                (labels::EXPORT.to_owned(), image.to_owned()),
                (labels::INSTANCE.to_owned(), self.instance.clone()),
            ]);
            let runtime = self.runtime.clone();
            let (from, what) = (id.to_owned(), path.to_owned());
            // Its own task: a Docker call is never dropped half-way (the container it made is removed).
            let copy = self.tracker.spawn(async move { runtime.copy_from_image(&from, &what, labels, tx).await });
            let reader = ChannelReader { rx, chunk: bytes::Bytes::new(), stop: self.stop.clone() };
            // The engine names the entries from the path's last component: `/usr/lib` → `lib/...`.
            let dest = in_tree(temp, path).parent().expect("a path below the root").to_owned();
            std::fs::DirBuilder::new().recursive(true).mode(0o755).create(&dest)?;
            let unpacked = tokio::task::spawn_blocking(move || unpack(reader, &dest)).await.map_err(io_join)?;
            let copied = copy.await.map_err(io_join)?;
            match copied {
                Err(RuntimeError::NotFound(_)) => {
                    return Err(TreeError::MissingPath { image: image.to_owned(), path: path.to_owned() });
                }
                Err(e) => return Err(e.into()),
                Ok(()) => {}
            }
            if self.stop.is_cancelled() {
                return Err(TreeError::Stopping);
            }
            unpacked?;
            let top = in_tree(temp, path);
            if !std::fs::symlink_metadata(&top).map(|m| m.is_dir()).unwrap_or(false) {
                return Err(TreeError::MissingPath { image: image.to_owned(), path: path.to_owned() });
            }
        }
        Ok(())
    }
}

/// The hex of a `sha256:<64 hex>` image id: a safe file name.
fn id_hex(id: &str) -> Option<&str> {
    let hex = id.strip_prefix("sha256:")?;
    (hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))).then_some(hex)
}

fn mounts(id: &str, root: &Path) -> TreeMounts {
    TreeMounts {
        image_id: id.to_owned(),
        hash: id_hex(id).unwrap_or_default().to_owned(),
        binds: PATHS.iter().map(|p| format!("{}{p}:{p}:ro", root.display())).collect(),
    }
}

fn io_join(e: tokio::task::JoinError) -> TreeError {
    TreeError::Io(std::io::Error::other(e))
}

/// Whether the container path `path` lies inside one of [`PATHS`].
fn within_paths(path: &str) -> bool {
    PATHS.iter().any(|p| path.strip_prefix(p).is_some_and(|rest| rest.starts_with('/')))
}

/// Where the container path `path` is in the tree at `root`.
fn in_tree(root: &Path, path: &str) -> PathBuf {
    root.join(path.trim_start_matches('/'))
}

/// A real directory (not a link to one).
fn is_real_dir(path: &Path) -> bool {
    std::fs::symlink_metadata(path).map(|m| m.file_type().is_dir()).unwrap_or(false)
}

/// The tree's root and each of its paths are real directories.
fn is_tree_shape(root: &Path) -> bool {
    is_real_dir(root) && PATHS.iter().all(|p| is_real_dir_below(root, p))
}

/// Every directory from `root` down to the container path `path` in it is a real directory.
fn is_real_dir_below(root: &Path, path: &str) -> bool {
    let mut at = root.to_owned();
    path.split('/').filter(|c| !c.is_empty()).all(|c| {
        at.push(c);
        is_real_dir(&at)
    })
}

/// [`find_tree`], off the async workers.
async fn found(dir: &Path, root: &Path, id: &str) -> Result<bool, TreeError> {
    let (dir, root, id) = (dir.to_owned(), root.to_owned(), id.to_owned());
    tokio::task::spawn_blocking(move || find_tree(&dir, &root, &id)).await.map_err(io_join)?
}

/// Whether `root` holds the tree of `id`. The folder is made if missing; anything at either name that is
/// not what the service makes is an error, and is neither followed nor replaced.
fn find_tree(dir: &Path, root: &Path, id: &str) -> Result<bool, TreeError> {
    match std::fs::symlink_metadata(dir) {
        Ok(m) if m.file_type().is_dir() => {}
        Ok(_) => return Err(TreeError::FolderNotADirectory(dir.to_owned())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
            if !is_real_dir(dir) {
                return Err(TreeError::FolderNotADirectory(dir.to_owned()));
            }
        }
        Err(e) => return Err(e.into()),
    }
    match std::fs::symlink_metadata(root) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(e.into()),
        Ok(_) if is_tree_shape(root) && read_marker(root).as_deref() == Some(id) => Ok(true),
        Ok(_) => Err(TreeError::InTheWay(root.to_owned())),
    }
}

/// The marker's content, read without following a link.
fn read_marker(root: &Path) -> Option<String> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut file =
        std::fs::OpenOptions::new().read(true).custom_flags(libc::O_NOFOLLOW).open(root.join(MARKER)).ok()?;
    let mut text = String::new();
    file.by_ref().take(256).read_to_string(&mut text).ok()?;
    Some(text)
}

/// Marks the finished `temp` with `id` and renames it to `root`. Another service that placed the same
/// tree first wins (its tree is the same image's files).
fn place(temp: &Path, root: &Path, id: &str) -> Result<(), TreeError> {
    use std::io::Write;
    let mut marker = std::fs::OpenOptions::new().write(true).create_new(true).open(temp.join(MARKER))?;
    marker.write_all(id.as_bytes())?;
    marker.sync_all()?;
    match std::fs::rename(temp, root) {
        Ok(()) => Ok(()),
        Err(_) if is_tree_shape(root) && read_marker(root).as_deref() == Some(id) => Ok(()),
        Err(_) if std::fs::symlink_metadata(root).is_ok() => Err(TreeError::InTheWay(root.to_owned())),
        Err(e) => Err(e.into()),
    }
}

/// Unpacks one tar stream of the engine into `dest`. Set-id and sticky bits are dropped, nothing is
/// writable but by its owner, and every file is the service's; entries that would land outside `dest`
/// are refused by the tar reader.
fn unpack(reader: ChannelReader, dest: &Path) -> std::io::Result<()> {
    let mut archive = tar::Archive::new(reader);
    archive.set_preserve_permissions(false);
    archive.set_mask(0o022);
    archive.set_preserve_ownerships(false);
    archive.set_unpack_xattrs(false);
    archive.set_overwrite(false);
    archive.unpack(dest)
}

/// Removes every tree in `dir` that `keep` does not name, and temporary trees abandoned long ago. Links
/// and files are removed as themselves, never followed. Returns how many trees went.
fn remove_unused(dir: &Path, keep: &HashSet<String>) -> usize {
    if !is_real_dir(dir) {
        return 0;
    }
    let Ok(read) = std::fs::read_dir(dir) else { return 0 };
    let mut removed = 0;
    for entry in read.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let path = entry.path();
        if let Some(hex) = name.strip_prefix(".lock-") {
            // The lock of a tree being copied is held; that of a tree nobody names goes with it. (A copy
            // that raced this removal is still safe: the second copy to finish is discarded.)
            if !keep.contains(hex) && matches!(file_lock::try_lock(&path), Ok(Some(_))) {
                let _ = std::fs::remove_file(&path);
            }
            continue;
        }
        let unused = if name.starts_with(".tmp-") {
            let age =
                entry.metadata().and_then(|m| m.modified()).ok().and_then(|t| SystemTime::now().duration_since(t).ok());
            age.is_some_and(|age| age > ABANDONED_AFTER)
        } else {
            id_hex(&format!("sha256:{name}")).is_some() && !keep.contains(&name) && is_real_dir(&path)
        };
        if unused && std::fs::remove_dir_all(&path).is_ok() {
            removed += 1;
        }
    }
    removed
}

/// A blocking reader over the chunks a copy sends; ends at the copy's end, fails once the service stops.
struct ChannelReader {
    rx: mpsc::Receiver<bytes::Bytes>,
    chunk: bytes::Bytes,
    stop: CancellationToken,
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        while self.chunk.is_empty() {
            if self.stop.is_cancelled() {
                // Not `Interrupted`: readers retry those, and this one would never end.
                return Err(std::io::Error::other("the service is stopping"));
            }
            match self.rx.blocking_recv() {
                Some(chunk) => self.chunk = chunk,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.chunk.len());
        buf[..n].copy_from_slice(&self.chunk.split_to(n));
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    fn tree_at(root: &Path, id: &str) {
        for p in PATHS {
            std::fs::create_dir_all(root.join(p.trim_start_matches('/'))).unwrap();
        }
        std::fs::write(root.join(MARKER), id).unwrap();
    }

    #[test]
    fn only_a_sha256_digest_names_a_tree() {
        assert_eq!(id_hex(ID), Some(&ID[7..]));
        for bad in ["", "sha256:", "sha256:../../etc", "md5:0123", &ID.to_uppercase(), &format!("{ID}0")] {
            assert_eq!(id_hex(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_tree_is_mounted_read_only_over_the_same_paths() {
        let m = mounts(ID, Path::new("/state/runtimes/abc"));
        assert_eq!(
            m.binds,
            [
                "/state/runtimes/abc/usr/bin:/usr/bin:ro",
                "/state/runtimes/abc/usr/lib:/usr/lib:ro",
                "/state/runtimes/abc/opt:/opt:ro"
            ]
        );
        assert_eq!((m.image_id.as_str(), m.hash.as_str()), (ID, &ID[7..]));
    }

    #[test]
    fn a_tree_is_found_only_when_it_is_a_real_directory_marked_with_its_image() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("runtimes");
        let root = dir.join(&ID[7..]);
        assert!(!find_tree(&dir, &root, ID).unwrap(), "absent: to be made (the folder is made)");
        assert!(is_real_dir(&dir));
        tree_at(&root, ID);
        assert!(find_tree(&dir, &root, ID).unwrap());
        std::fs::write(root.join(MARKER), "sha256:other").unwrap();
        assert!(matches!(find_tree(&dir, &root, ID), Err(TreeError::InTheWay(_))), "another image's marker");
    }

    #[test]
    fn a_planted_link_is_neither_followed_nor_replaced() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("runtimes");
        std::fs::create_dir(&dir).unwrap();
        let decoy = tmp.path().join("decoy");
        tree_at(&decoy, ID);
        let root = dir.join(&ID[7..]);
        std::os::unix::fs::symlink(&decoy, &root).unwrap();
        assert!(matches!(find_tree(&dir, &root, ID), Err(TreeError::InTheWay(_))));
        assert!(!is_tree_shape(&root));
        // Placing a finished tree does not replace the link either.
        let temp = dir.join(".tmp-x");
        tree_at(&temp, ID);
        std::fs::remove_file(temp.join(MARKER)).unwrap();
        assert!(place(&temp, &root, ID).is_err());
        assert!(std::fs::symlink_metadata(&root).unwrap().file_type().is_symlink(), "the link is still there");
        // The upkeep removes trees nobody names, but never goes through a link.
        assert_eq!(remove_unused(&dir, &HashSet::new()), 0);
        assert!(decoy.join("usr").is_dir(), "the link's target is untouched");
    }

    #[test]
    fn a_runtimes_folder_that_is_a_link_or_a_file_is_not_used() {
        let tmp = tempfile::tempdir().unwrap();
        let file = tmp.path().join("runtimes");
        std::fs::write(&file, "").unwrap();
        assert!(matches!(find_tree(&file, &file.join("x"), ID), Err(TreeError::FolderNotADirectory(_))));
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(tmp.path(), &link).unwrap();
        assert!(matches!(find_tree(&link, &link.join("x"), ID), Err(TreeError::FolderNotADirectory(_))));
    }

    #[test]
    fn unused_and_abandoned_trees_are_removed_and_named_ones_kept() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let other = format!("sha256:{}", "f".repeat(64));
        tree_at(&dir.join(&ID[7..]), ID);
        tree_at(&dir.join(&other[7..]), &other);
        std::fs::create_dir(dir.join(".tmp-fresh")).unwrap();
        std::fs::create_dir(dir.join("not-a-tree")).unwrap();
        std::fs::write(dir.join(format!(".lock-{}", &other[7..])), "").unwrap();
        std::fs::write(dir.join(format!(".lock-{}", &ID[7..])), "").unwrap();
        let keep = HashSet::from([ID[7..].to_owned()]);
        assert_eq!(remove_unused(dir, &keep), 1);
        assert!(dir.join(&ID[7..]).is_dir() && !dir.join(&other[7..]).exists());
        assert!(dir.join(".tmp-fresh").is_dir(), "a copy may still be under way");
        assert!(dir.join("not-a-tree").is_dir(), "not the service's name: not its to remove");
        assert!(!dir.join(format!(".lock-{}", &other[7..])).exists(), "the lock goes with its tree");
        assert!(dir.join(format!(".lock-{}", &ID[7..])).exists());
    }

    #[test]
    fn a_copy_cut_off_by_a_stop_ends_its_reader() {
        let (tx, rx) = mpsc::channel(1);
        let stop = CancellationToken::new();
        let mut reader = ChannelReader { rx, chunk: bytes::Bytes::new(), stop: stop.clone() };
        tx.try_send(bytes::Bytes::from_static(b"abc")).unwrap();
        let mut buf = [0u8; 2];
        assert_eq!(reader.read(&mut buf).unwrap(), 2);
        stop.cancel();
        assert_eq!(reader.read(&mut buf).unwrap(), 1, "what was read is passed on");
        let mut rest = Vec::new();
        let err = reader.read_to_end(&mut rest).expect_err("a stop is an error that readers do not retry");
        assert_ne!(err.kind(), std::io::ErrorKind::Interrupted);
    }

    #[tokio::test]
    async fn a_tree_that_cannot_be_made_leaves_boots_on_the_image() {
        let tmp = tempfile::tempdir().unwrap();
        let runtime = Arc::new(crate::runtime::fake::FakeRuntime::new());
        let trees = RuntimeTrees::new(runtime, Some(tmp.path().join("runtimes")), "test", &[]);
        assert_eq!(trees.for_boot("kernelbox/kernel-python:latest", []), None, "never waits for a tree");
        assert!(trees.ensure("kernelbox/kernel-python:latest").await.is_err());
        assert_eq!(trees.for_boot("kernelbox/kernel-python:latest", []), None, "not tried again at once");
        trees.shutdown().await;
        let off = RuntimeTrees::new(Arc::new(crate::runtime::fake::FakeRuntime::new()), None, "test", &[]);
        assert_eq!(off.for_boot("kernelbox/kernel-python:latest", []), None);
    }

    #[test]
    fn mount_points_inside_a_trees_paths_are_known() {
        assert!(within_paths("/opt/kernelbox/packages") && within_paths("/usr/lib/x"));
        for outside in ["/opt", "/optional/x", "/usr/sbin/docker-init", "/usr/x", "/tmp", "/kernel"] {
            assert!(!within_paths(outside), "{outside}");
        }
        assert_eq!(in_tree(Path::new("/r"), "/opt/kernelbox/packages"), PathBuf::from("/r/opt/kernelbox/packages"));
    }
}
