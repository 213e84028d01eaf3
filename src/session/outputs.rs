//! The session API's output folder. In the session API's sessions `/mnt/data/output` is a writable tmpfs
//! of the container (over the read-only datasets folder); what the code writes there reaches the host in
//! `<datasets>/output/<user>/`, copied by the service after each execution and when the session ends, through
//! the file tool's `collect` (Docker's exec API, as the session's user): the service never opens a path
//! of the sandbox's. At start-up [`prepare`] makes the datasets folder (when it is the default one) and
//! its `output/`, which every session's `/mnt/data/output` tmpfs needs as its mountpoint.
//!
//! The host side trusts nothing the tool sends (a session can write into the tool's stdout): every name is
//! checked here (relative, no `..`, no hidden or control characters, bounded lengths) and writes go only
//! into the user's folder, which no session can write (the datasets folder is mounted read-only and a
//! tmpfs hides its `output/` in every session). Each file is written to a hidden temporary file created
//! `O_CREAT|O_EXCL|O_NOFOLLOW` and renamed into place; folders on the way are made by the service and must
//! be real folders (a symlink there is never followed, its file is skipped). The folder is capped (files
//! and bytes, [`OutputCaps`]): a file that would go past is not copied, and the execution's stderr says
//! so; nothing here ever fails an execution. Deleting in the session deletes nothing on the host.
//!
//! One copy per user folder at a time ([`FolderLocks`]): the same user id under two API keys shares a
//! folder, and the caps count what is there.

use std::collections::HashMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::io::AsyncWriteExt;

use crate::runtime::ContainerRuntime;

use super::files::{Collecting, FileError, FilePath};
use super::model::OutputCaps;

/// Where the output folder is in a session's container.
pub const OUTPUT_MOUNT: &str = "/mnt/data/output";
/// The output folder's name in the datasets folder (the tmpfs's mountpoint).
pub const OUTPUT_DIR: &str = "output";
/// Each copy takes the files modified since the tool began the last one's walk (it says when, by the
/// clock file times come from). An older tool does not say: then since the service began the last copy,
/// less this margin (file times are coarser than the clock); a file copied twice is replaced by itself.
const MARGIN: f64 = 1.0;
/// How many entries a scan of a user's folder looks at before it calls the folder full.
const SCAN_LIMIT: usize = 100_000;
/// How many refused names a note quotes.
const QUOTED: usize = 5;

/// Whether `name` may name a user's output folder: 1 to 64 of `[A-Za-z0-9_.-]`, not starting with `.`
/// (the session API's user ids, which are checked by this same rule).
pub fn valid_user_folder(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"_.-".contains(&b))
}

/// Makes the datasets folder (when missing) and its `output/` (the session API's output folders, and the
/// mountpoint every session's `/mnt/data/output` tmpfs needs), both 0755, both real folders.
pub fn prepare(datasets: &Path) -> std::io::Result<()> {
    for dir in [datasets.to_path_buf(), datasets.join(OUTPUT_DIR)] {
        real_dir(&dir)?;
    }
    Ok(())
}

/// Makes `dir` (0755) unless it exists; either way it must be a folder, not a symlink or a file.
fn real_dir(dir: &Path) -> std::io::Result<()> {
    if made_or_found(dir)? {
        Ok(())
    } else {
        Err(std::io::Error::other(format!("{} is not a folder (a file or a symlink)", dir.display())))
    }
}

/// Makes `dir` (0755) unless it exists; `false` when what exists is not a real folder (a symlink to one
/// is not).
fn made_or_found(dir: &Path) -> std::io::Result<bool> {
    match std::fs::DirBuilder::new().mode(0o755).create(dir) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => Ok(std::fs::symlink_metadata(dir)?.is_dir()),
        Err(e) => Err(e),
    }
}

/// Why a copy stopped.
#[derive(Debug, thiserror::Error)]
pub enum OutputError {
    #[error("reading /mnt/data/output failed: {0}")]
    Transfer(#[from] FileError),
    #[error("writing the output folder failed: {0}")]
    Host(#[from] std::io::Error),
}

/// What one copy did.
#[derive(Debug, Default, PartialEq)]
pub struct CopyReport {
    pub copied: u64,
    /// Files not copied because the folder would go past its caps (the tool's count included).
    pub over_cap: u64,
    /// Files whose name the folder does not take, or that something on the host is in the way of.
    pub refused: u64,
    /// The first few refused names, quoted, with why.
    pub quoted: Vec<String>,
}

impl CopyReport {
    fn refuse(&mut self, name: &str, why: &str) {
        self.refused += 1;
        if self.quoted.len() < QUOTED {
            let shown: String = name.chars().take(80).collect();
            self.quoted.push(format!("{shown:?} ({why})"));
        }
    }

    /// What the execution's stderr says when something was not copied.
    pub fn note(&self, caps: &OutputCaps) -> Option<String> {
        let mut parts = Vec::new();
        if self.over_cap > 0 {
            parts.push(format!(
                "{} file(s) not copied: the output folder keeps at most {} files and {} MiB per user",
                self.over_cap,
                caps.max_files,
                caps.max_bytes >> 20
            ));
        }
        if self.refused > 0 {
            parts.push(format!("{} file(s) not copied: {}", self.refused, self.quoted.join(", ")));
        }
        (!parts.is_empty()).then(|| format!("[kernelbox: /mnt/data/output: {}]\n", parts.join("; ")))
    }
}

/// One lock per user folder, held while a copy runs (it guards no data: it keeps two copies into one
/// folder from counting the caps without each other). Entries go when nobody holds them.
#[derive(Default)]
pub struct FolderLocks(Mutex<HashMap<PathBuf, Weak<tokio::sync::Mutex<()>>>>);

impl FolderLocks {
    fn lock_for(&self, dir: &Path) -> Arc<tokio::sync::Mutex<()>> {
        let mut map = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(lock) = map.get(dir).and_then(Weak::upgrade) {
            return lock;
        }
        map.retain(|_, lock| lock.strong_count() > 0);
        let lock = Arc::new(tokio::sync::Mutex::new(()));
        map.insert(dir.to_path_buf(), Arc::downgrade(&lock));
        lock
    }
}

/// The copier of one session: its user's folder on the host, the caps, and when the last copy began.
pub struct OutputCopier {
    /// `<datasets>/output/<user>`, written only by the service.
    dir: PathBuf,
    caps: OutputCaps,
    locks: Arc<FolderLocks>,
    /// Files modified before this (seconds since the epoch) were copied already.
    since: f64,
}

impl OutputCopier {
    /// The copier for `user`'s folder under `datasets` (`user` passed [`valid_user_folder`]).
    pub fn new(datasets: &Path, user: &str, caps: OutputCaps, locks: Arc<FolderLocks>) -> OutputCopier {
        OutputCopier { dir: datasets.join(OUTPUT_DIR).join(user), caps, locks, since: 0.0 }
    }

    pub fn caps(&self) -> &OutputCaps {
        &self.caps
    }

    /// Copies what changed in the container's `/mnt/data/output` since the last copy into the user's
    /// folder, within the caps. A copy cut short (an error, or this future dropped) copies its files again
    /// next time.
    pub async fn copy(&mut self, runtime: &dyn ContainerRuntime, container: &str) -> Result<CopyReport, OutputError> {
        let lock = self.locks.lock_for(&self.dir);
        let _one_at_a_time = lock.lock().await;
        let began = epoch_now() - MARGIN;
        let collecting =
            Collecting::start(runtime, container, OUTPUT_MOUNT, self.max_files(), self.caps.max_bytes, self.since)
                .await?;
        let (report, started) = self.copy_from(collecting).await?;
        self.since = started.unwrap_or(began);
        Ok(report)
    }

    fn max_files(&self) -> usize {
        usize::try_from(self.caps.max_files).unwrap_or(usize::MAX)
    }

    /// Writes what `collecting` brings into the user's folder, within the caps; returns what it did and
    /// when the tool began its walk, if it said.
    async fn copy_from(&self, mut collecting: Collecting) -> Result<(CopyReport, Option<f64>), OutputError> {
        let dir = self.dir.clone();
        let mut usage = blocking(move || Usage::scan(&dir)).await?;
        let mut report = CopyReport::default();
        while let Some((raw, size)) = collecting.next_file().await? {
            let name = match host_name(&raw) {
                Ok(name) => name,
                Err(why) => {
                    report.refuse(&raw, why);
                    continue;
                }
            };
            if !usage.admits(&name, size, &self.caps) {
                report.over_cap += 1;
                continue;
            }
            match self.write(&name, &mut collecting).await? {
                Written::Done => {
                    usage.record(name, size);
                    report.copied += 1;
                }
                Written::InTheWay(why) => report.refuse(&raw, why),
            }
        }
        report.over_cap += collecting.skipped();
        Ok((report, collecting.started()))
    }

    /// Writes the current file of `collecting` to `name` under the user's folder: a hidden temporary file
    /// created `O_EXCL|O_NOFOLLOW`, renamed into place once whole. Folders on the way are made here and must
    /// be real folders.
    async fn write(&self, name: &FilePath, collecting: &mut Collecting) -> Result<Written, OutputError> {
        let (dir, rel) = (self.dir.clone(), name.as_str().to_owned());
        let parent = match blocking(move || folders_on_the_way(&dir, &rel)).await? {
            Some(parent) => parent,
            None => return Ok(Written::InTheWay("a file or link is in the way on the host")),
        };
        // Removed by its guard unless renamed into place: on an error, and when the copy is cut (dropped).
        let temp = Temp(Some(parent.join(format!(".kernelbox-{}.part", uuid::Uuid::new_v4().simple()))));
        let mut file = tokio::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
            .open(temp.path())
            .await?;
        while let Some(chunk) = collecting.chunk().await? {
            file.write_all(&chunk).await?;
        }
        file.flush().await?;
        drop(file);
        match tokio::fs::rename(temp.path(), parent.join(name.file_name())).await {
            Ok(()) => {
                temp.placed();
                Ok(Written::Done)
            }
            // A folder of that name on the host (rename never replaces one): the file is skipped.
            Err(e) if e.raw_os_error().is_some_and(|n| [libc::EISDIR, libc::ENOTEMPTY, libc::EEXIST].contains(&n)) => {
                Ok(Written::InTheWay("a folder of that name is on the host"))
            }
            Err(e) => Err(e.into()),
        }
    }
}

/// A temporary file of the service's in a user's folder, removed when dropped unless it was placed.
struct Temp(Option<PathBuf>);

impl Temp {
    fn path(&self) -> &Path {
        self.0.as_deref().expect("a temporary file until placed")
    }

    fn placed(mut self) {
        self.0 = None;
    }
}

impl Drop for Temp {
    fn drop(&mut self) {
        if let Some(path) = self.0.take() {
            let _ = std::fs::remove_file(path);
        }
    }
}

/// How a write ended, short of an error that stops the copy.
enum Written {
    Done,
    InTheWay(&'static str),
}

/// A name as the host folder takes it: a relative path with no `..`, no control characters, no component
/// over 255 bytes nor hidden (`.`; the service's temporary files are hidden), at most 1024 bytes.
fn host_name(raw: &str) -> Result<FilePath, &'static str> {
    let name = FilePath::parse(raw).map_err(|_| "not a relative path the folder takes")?;
    if name.is_root() {
        return Err("an empty name");
    }
    if name.as_str().split('/').any(|part| part.starts_with('.')) {
        return Err("a hidden name");
    }
    Ok(name)
}

/// Makes the user's folder and the folders of `rel` on the way (0755), each a real folder, and returns
/// the last; `None` when something else (a file, a symlink) is in the way.
fn folders_on_the_way(user_dir: &Path, rel: &str) -> std::io::Result<Option<PathBuf>> {
    let mut dir = user_dir.to_path_buf();
    let mut parts: Vec<&str> = rel.split('/').collect();
    parts.pop();
    if !made_or_found(&dir)? {
        return Ok(None);
    }
    for part in parts {
        dir.push(part);
        if !made_or_found(&dir)? {
            return Ok(None);
        }
    }
    Ok(Some(dir))
}

/// What a user's folder holds: regular files (the service's own leftovers included) and their sizes.
#[derive(Debug, Default)]
struct Usage {
    files: u64,
    bytes: u64,
    sizes: HashMap<String, u64>,
}

impl Usage {
    /// Walks `dir` without following links. A folder with more than [`SCAN_LIMIT`] entries counts as full.
    fn scan(dir: &Path) -> std::io::Result<Usage> {
        let mut usage = Usage::default();
        let mut seen = 0usize;
        let mut stack = vec![(dir.to_path_buf(), String::new())];
        while let Some((path, prefix)) = stack.pop() {
            let entries = match std::fs::read_dir(&path) {
                Ok(entries) => entries,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(e),
            };
            for entry in entries {
                let entry = entry?;
                seen += 1;
                if seen > SCAN_LIMIT {
                    return Ok(Usage { files: u64::MAX, bytes: u64::MAX, sizes: HashMap::new() });
                }
                let rel = format!("{prefix}{}", entry.file_name().to_string_lossy());
                let kind = entry.file_type()?;
                if kind.is_dir() {
                    stack.push((entry.path(), format!("{rel}/")));
                } else if kind.is_file() {
                    let size = entry.metadata()?.len();
                    usage.files += 1;
                    usage.bytes = usage.bytes.saturating_add(size);
                    usage.sizes.insert(rel, size);
                }
            }
        }
        Ok(usage)
    }

    /// Whether writing `size` bytes at `name` (replacing what is there) keeps the folder within `caps`.
    fn admits(&self, name: &FilePath, size: u64, caps: &OutputCaps) -> bool {
        let old = self.sizes.get(name.as_str()).copied();
        let files = self.files.saturating_add(u64::from(old.is_none()));
        let bytes = self.bytes.saturating_sub(old.unwrap_or(0)).saturating_add(size);
        files <= caps.max_files && bytes <= caps.max_bytes
    }

    fn record(&mut self, name: FilePath, size: u64) {
        let old = self.sizes.insert(name.as_str().to_owned(), size);
        self.files += u64::from(old.is_none());
        self.bytes = self.bytes.saturating_sub(old.unwrap_or(0)).saturating_add(size);
    }
}

/// Every entry under `dir` (none if it is missing), relative and sorted, `/` after folders and `@` after
/// symlinks (never followed): what tests compare a folder with, the end-to-end tests too.
#[cfg(any(test, feature = "test-support"))]
pub fn tree(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, prefix)) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&path) else { continue };
        for entry in entries.flatten() {
            let name = format!("{prefix}{}", entry.file_name().to_string_lossy());
            match entry.file_type() {
                Ok(kind) if kind.is_symlink() => found.push(format!("{name}@")),
                Ok(kind) if kind.is_dir() => {
                    found.push(format!("{name}/"));
                    stack.push((entry.path(), format!("{name}/")));
                }
                _ => found.push(name),
            }
        }
    }
    found.sort();
    found
}

fn epoch_now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or(Duration::ZERO).as_secs_f64()
}

async fn blocking<T: Send + 'static>(f: impl FnOnce() -> std::io::Result<T> + Send + 'static) -> std::io::Result<T> {
    tokio::task::spawn_blocking(f).await.map_err(std::io::Error::other)?
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use bytes::Bytes;
    use futures::StreamExt;
    use serde_json::json;

    use super::*;
    use crate::runtime::{ExecOutput, ExecProcess};

    /// A `collect` as the tool (or a session writing into the tool's stdout) would send it: each entry a
    /// line and its bytes (`None`: the line only, its bytes never come), then the end line.
    fn scripted(entries: &[(&str, Option<&[u8]>)], announced: Option<u64>, skipped: u64) -> ExecProcess {
        let mut out = Vec::new();
        for (path, body) in entries {
            let size = announced.unwrap_or(body.map_or(0, |b| b.len() as u64));
            out.extend_from_slice(json!({"path": path, "size": size}).to_string().as_bytes());
            out.push(b'\n');
            match body {
                Some(body) => out.extend_from_slice(body),
                None => break,
            }
        }
        if entries.iter().all(|(_, body)| body.is_some()) {
            let end = json!({"end": true, "skipped": skipped, "started": 1_700_000_000.25});
            out.extend_from_slice(format!("{end}\n").as_bytes());
        }
        // In pieces, as an exec stream comes.
        let chunks: Vec<_> = out.chunks(7).map(|c| Ok(ExecOutput::Stdout(Bytes::copy_from_slice(c)))).collect();
        ExecProcess {
            id: "exec".into(),
            stdin: Box::pin(tokio::io::sink()),
            output: futures::stream::iter(chunks).boxed(),
        }
    }

    struct Setup {
        _tmp: tempfile::TempDir,
        datasets: PathBuf,
        outside: PathBuf,
        copier: OutputCopier,
    }

    fn setup(caps: OutputCaps) -> Setup {
        let tmp = tempfile::tempdir().unwrap();
        let datasets = tmp.path().join("datasets");
        prepare(&datasets).unwrap();
        let outside = tmp.path().join("outside");
        std::fs::create_dir(&outside).unwrap();
        std::fs::write(outside.join("secret.txt"), "keep").unwrap();
        std::fs::set_permissions(outside.join("secret.txt"), std::fs::Permissions::from_mode(0o600)).unwrap();
        let copier = OutputCopier::new(&datasets, "user_test", caps, Default::default());
        Setup { _tmp: tmp, datasets, outside, copier }
    }

    async fn copy(s: &Setup, exec: ExecProcess) -> Result<CopyReport, OutputError> {
        let collecting = Collecting::read(exec, s.copier.max_files(), s.copier.caps.max_bytes);
        s.copier.copy_from(collecting).await.map(|(report, _)| report)
    }

    fn assert_outside_untouched(s: &Setup) {
        assert_eq!(tree(&s.outside), ["secret.txt"]);
        assert_eq!(std::fs::read_to_string(s.outside.join("secret.txt")).unwrap(), "keep");
        let mode = std::fs::metadata(s.outside.join("secret.txt")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn user_folders_are_plain_names() {
        for ok in ["user_test", "a", "A.b-c_9", &"x".repeat(64)] {
            assert!(valid_user_folder(ok), "{ok}");
        }
        for bad in ["", ".", "..", ".hidden", "a/b", "../x", "a b", "é", "a\0b", &"x".repeat(65)] {
            assert!(!valid_user_folder(bad), "{bad:?}");
        }
    }

    #[tokio::test]
    async fn planted_symlinks_and_escaping_names_leave_the_host_untouched() {
        let s = setup(OutputCaps::default());
        let user = s.datasets.join("output/user_test");
        std::fs::create_dir(&user).unwrap();
        // Links where the copy writes: a folder on the way, and the file's own name.
        std::os::unix::fs::symlink(&s.outside, user.join("linkdir")).unwrap();
        std::os::unix::fs::symlink(s.outside.join("secret.txt"), user.join("out.png")).unwrap();
        let escape = format!("../../../{}", s.outside.join("escape.txt").display());
        let absolute = s.outside.join("abs.txt").display().to_string();
        let entries: Vec<(&str, Option<&[u8]>)> = vec![
            (escape.as_str(), Some(b"PWND")),
            (absolute.as_str(), Some(b"PWND")),
            ("..", Some(b"PWND")),
            ("a/../../escape.txt", Some(b"PWND")),
            ("linkdir/x.txt", Some(b"PWND")),
            ("linkdir/../escape.txt", Some(b"PWND")),
            ("a\nb.txt", Some(b"PWND")),
            (".hidden", Some(b"PWND")),
            ("sub/.kernelbox-x.part", Some(b"PWND")),
            ("out.png", Some(b"\x89PNG new")),
            ("plots/fig 1.png", Some(b"fig")),
        ];
        let report = copy(&s, scripted(&entries, None, 0)).await.unwrap();
        assert_eq!((report.copied, report.refused, report.over_cap), (2, 9, 0), "{report:?}");
        assert_outside_untouched(&s);
        assert_eq!(
            tree(&s.datasets),
            [
                "output/",
                "output/user_test/",
                "output/user_test/linkdir@",
                "output/user_test/out.png",
                "output/user_test/plots/",
                "output/user_test/plots/fig 1.png"
            ]
        );
        // The link at the file's name was replaced, never followed.
        assert_eq!(std::fs::read(user.join("out.png")).unwrap(), b"\x89PNG new");
        let note = report.note(&OutputCaps::default()).unwrap();
        assert!(
            note.starts_with("[kernelbox: /mnt/data/output: 9 file(s) not copied: ") && note.contains("\"..\""),
            "{note}"
        );
    }

    #[tokio::test]
    async fn a_link_in_place_of_the_users_folder_is_not_followed() {
        let s = setup(OutputCaps::default());
        std::os::unix::fs::symlink(&s.outside, s.datasets.join("output/user_test")).unwrap();
        let report = copy(&s, scripted(&[("secret.txt", Some(b"PWND")), ("new.txt", Some(b"PWND"))], None, 0)).await;
        assert_eq!(report.unwrap().refused, 2);
        assert_outside_untouched(&s);
    }

    #[tokio::test]
    async fn the_caps_hold_whatever_the_tool_says() {
        let caps = OutputCaps { max_bytes: 10, max_files: 3 };
        let s = setup(caps);
        let user = s.datasets.join("output/user_test");
        std::fs::create_dir(&user).unwrap();
        std::fs::write(user.join("a.txt"), "aaaa").unwrap();
        // What one copy sends stays within the caps (3 files, 10 bytes here), as the tool keeps it.
        let entries: Vec<(&str, Option<&[u8]>)> = vec![
            ("b.txt", Some(b"bbbb")), // 2 files, 8 bytes
            ("c.txt", Some(b"ccc")),  // 11 bytes: over
            ("a.txt", Some(b"AA")),   // replaces: 2 files, 6 bytes
        ];
        let report = copy(&s, scripted(&entries, None, 2)).await.unwrap();
        assert_eq!((report.copied, report.over_cap, report.refused), (2, 3, 0), "the tool's 2 skipped count too");
        assert_eq!(tree(&user), ["a.txt", "b.txt"]);
        assert_eq!(std::fs::read_to_string(user.join("a.txt")).unwrap(), "AA");
        let note = report.note(&caps).unwrap();
        assert!(note.contains("3 file(s) not copied: the output folder keeps at most 3 files"), "{note}");
        // The next copy starts where the tool said its walk began.
        let (_, started) = s.copier.copy_from(Collecting::read(scripted(&[], None, 0), 3, 10)).await.unwrap();
        assert_eq!(started, Some(1_700_000_000.25));
        // A fourth file is over the file cap; a file replaced keeps the count.
        let entries: Vec<(&str, Option<&[u8]>)> =
            vec![("d.txt", Some(b"d")), ("e.txt", Some(b"e")), ("b.txt", Some(b"B"))];
        let report = copy(&s, scripted(&entries, None, 0)).await.unwrap();
        assert_eq!((report.copied, report.over_cap), (2, 1));
        assert_eq!(tree(&user), ["a.txt", "b.txt", "d.txt"]);

        // A tool that announces more than the caps allow in one copy, or a file that ends early, stops the
        // copy and leaves no partial file.
        let lying = scripted(&[("e.txt", Some(&[b'e'; 100]))], None, 0);
        assert!(matches!(copy(&s, lying).await, Err(OutputError::Transfer(_))));
        let cut = scripted(&[("f.txt", None)], Some(8), 0);
        assert!(matches!(copy(&s, cut).await, Err(OutputError::Transfer(_))));
        assert_eq!(tree(&user), ["a.txt", "b.txt", "d.txt"]);
    }

    #[tokio::test]
    async fn a_copy_cut_short_leaves_no_partial_file() {
        let s = setup(OutputCaps::default());
        // Half a file, then nothing more: the copy waits on it until it is dropped (a cut, a DELETE).
        let mut exec = scripted(&[("slow.txt", None)], Some(8), 0);
        let head = std::mem::replace(&mut exec.output, futures::stream::empty().boxed());
        let half = futures::stream::iter([Ok(ExecOutput::Stdout(Bytes::from_static(b"half")))]);
        exec.output = head.chain(half).chain(futures::stream::pending()).boxed();
        let cut = tokio::time::timeout(Duration::from_millis(200), copy(&s, exec)).await;
        assert!(cut.is_err(), "still waiting for the rest");
        assert_eq!(tree(&s.datasets), ["output/", "output/user_test/"], "the temporary file went with it");
    }

    #[tokio::test]
    async fn a_folder_in_the_way_skips_the_file_and_the_copy_goes_on() {
        let s = setup(OutputCaps::default());
        let user = s.datasets.join("output/user_test");
        std::fs::create_dir_all(user.join("plot.png")).unwrap();
        std::fs::write(user.join("file"), "f").unwrap();
        let entries: Vec<(&str, Option<&[u8]>)> =
            vec![("plot.png", Some(b"png")), ("file/inner.txt", Some(b"x")), ("ok.txt", Some(b"ok"))];
        let report = copy(&s, scripted(&entries, None, 0)).await.unwrap();
        assert_eq!((report.copied, report.refused), (1, 2), "{report:?}");
        assert_eq!(tree(&user), ["file", "ok.txt", "plot.png/"]);
    }

    #[test]
    fn the_datasets_folder_must_be_a_folder() {
        let tmp = tempfile::tempdir().unwrap();
        let datasets = tmp.path().join("datasets");
        prepare(&datasets).unwrap();
        prepare(&datasets).unwrap();
        assert!(datasets.join("output").is_dir());
        let linked = tmp.path().join("linked");
        std::fs::create_dir(&linked).unwrap();
        std::os::unix::fs::symlink(tmp.path(), linked.join("output")).unwrap();
        assert!(prepare(&linked).is_err(), "a link in place of output/ is refused");
    }
}
