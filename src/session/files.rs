//! Files in and out of a session's working directory, through the image's file tool (`images/shared/files`)
//! run by Docker's exec API inside the session's container, as the session's user.
//!
//! The service never opens a path in the sandbox: every path resolves in the sandbox's own view, with the
//! sandbox's own rights. Paths are checked here first ([`FilePath`]) so that bad input is a clear 4xx
//! before anything runs, and again by the tool (symlinks that lead out of the working directory are
//! refused there). What the tool sends back is attacker input: its header is bounded before it is
//! buffered, and a body is exactly the size the header announced or the transfer fails.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::stream::BoxStream;
use futures::{Stream, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use crate::images::{FILES_TOOL, HOME};
use crate::runtime::tool::{self, KeepStderr, ReadError, ToolOutput};
use crate::runtime::{ContainerRuntime, ExecOutput, ExecProcess, ExecRequest, RuntimeError};

/// The longest path a client may name, in bytes.
pub const MAX_PATH: usize = 1024;
/// The longest name of one path component, in bytes (Linux's NAME_MAX).
pub const MAX_NAME: usize = 255;
/// How long a transfer may go without progress.
pub const IDLE_LIMIT: Duration = Duration::from_secs(30);
/// The largest header the tool may send (a listing of 10,000 entries fits).
const MAX_HEADER: usize = 4 << 20;

/// Why a file operation failed.
#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Outside(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    TooLarge(String),
    #[error("the session's disk is full: {0}")]
    NoSpace(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("too many file transfers on this session at once (at most {0}); retry when one finishes")]
    Busy(usize),
    #[error("the session's container is not running: {0}")]
    NotRunning(String),
    #[error("the transfer stalled for {} s", IDLE_LIMIT.as_secs())]
    Stalled,
    #[error("the file tool failed: {0}")]
    Tool(String),
    #[error(transparent)]
    Runtime(RuntimeError),
}

impl From<RuntimeError> for FileError {
    fn from(e: RuntimeError) -> Self {
        match e {
            RuntimeError::NotFound(m) => FileError::NotRunning(m),
            // 409: the container exists but is not running.
            RuntimeError::Api { status: 409, message } => FileError::NotRunning(message),
            other => FileError::Runtime(other),
        }
    }
}

/// A path relative to the session's working directory, checked: no `..`, not absolute, no NUL or other
/// control character, no component over [`MAX_NAME`] bytes, at most [`MAX_PATH`] bytes. `.` and empty
/// components are dropped; the empty path is the working directory itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FilePath(String);

impl FilePath {
    pub fn parse(raw: &str) -> Result<FilePath, FileError> {
        let invalid = |why: &str| Err(FileError::Invalid(format!("path {:?}: {why}", truncate(raw, 80))));
        if raw.len() > MAX_PATH {
            return invalid(&format!("longer than {MAX_PATH} bytes"));
        }
        if raw.starts_with('/') {
            return invalid("absolute paths are refused; paths are relative to the working directory");
        }
        if raw.chars().any(|c| c.is_control()) {
            return invalid("NUL and control characters are refused");
        }
        let mut parts = Vec::new();
        for part in raw.split('/') {
            match part {
                "" | "." => {}
                ".." => return invalid("`..` is refused"),
                p if p.len() > MAX_NAME => return invalid(&format!("a name is longer than {MAX_NAME} bytes")),
                p => parts.push(p),
            }
        }
        Ok(FilePath(parts.join("/")))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_root(&self) -> bool {
        self.0.is_empty()
    }

    /// The last component (the file's name), or "" for the working directory.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or("")
    }
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

/// One entry of a directory listing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    /// `file`, `directory`, `symlink` or `other` (symlinks are listed, never followed).
    pub kind: String,
    /// Modification time, seconds since the epoch.
    pub mtime: f64,
}

/// A directory listing.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Listing {
    pub path: String,
    pub entries: Vec<FileEntry>,
    /// More than 10,000 entries: the rest are not listed.
    pub truncated: bool,
}

/// A file on its way out: its size and its bytes, exactly `size` of them or an error.
pub struct Download {
    pub size: u64,
    pub mtime: f64,
    pub body: BoxStream<'static, std::io::Result<Bytes>>,
}

/// A file written.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Written {
    pub path: String,
    pub size: u64,
    pub mtime: f64,
}

/// A file collected from a session (the `/jupyter` API's files written by the code).
#[derive(Debug, Clone, PartialEq)]
pub struct Collected {
    pub path: String,
    pub content: Bytes,
}

/// The image types an execution's outputs can be saved as files.
pub const IMAGE_TYPES: [(&str, &str); 3] = [("image/png", "png"), ("image/jpeg", "jpg"), ("image/svg+xml", "svg")];

/// An image taken out of an execution's outputs, to be saved as a file.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageOut {
    /// Which output it came from.
    pub output_index: usize,
    pub mime: String,
    pub path: FilePath,
    pub content: Bytes,
}

/// Takes every image out of `outputs` (display data and results): base64 images are decoded, SVG is
/// text. The image types are removed from the outputs' data, so the response carries each image once,
/// as a file. Images whose data is not valid are left inline.
pub fn take_images(outputs: &mut [crate::kernel::Output], prefix: &str) -> Vec<ImageOut> {
    use crate::kernel::Output;
    use base64::Engine;
    let mut images = Vec::new();
    for (index, output) in outputs.iter_mut().enumerate() {
        let data = match output {
            Output::DisplayData { data, .. } | Output::ExecuteResult { data, .. } => data,
            _ => continue,
        };
        for (mime, ext) in IMAGE_TYPES {
            let Some(serde_json::Value::String(text)) = data.get(mime) else { continue };
            let content = if mime == "image/svg+xml" {
                Bytes::from(text.clone().into_bytes())
            } else {
                let compact: String = text.chars().filter(|c| !c.is_ascii_whitespace()).collect();
                match base64::engine::general_purpose::STANDARD.decode(compact) {
                    Ok(bytes) => Bytes::from(bytes),
                    Err(_) => continue,
                }
            };
            let Ok(path) = FilePath::parse(&format!("{prefix}-{index}.{ext}")) else { continue };
            data.remove(mime);
            images.push(ImageOut { output_index: index, mime: mime.to_owned(), path, content });
        }
    }
    images
}

/// The tool's header line.
#[derive(Deserialize)]
struct Header {
    ok: bool,
    code: Option<String>,
    message: Option<String>,
    size: Option<u64>,
    mtime: Option<f64>,
    entries: Option<Vec<FileEntry>>,
    truncated: Option<bool>,
}

impl Header {
    fn into_result(self) -> Result<Header, FileError> {
        if self.ok {
            return Ok(self);
        }
        let message = self.message.clone().unwrap_or_default();
        Err(match self.code.as_deref().unwrap_or("") {
            "invalid" => FileError::Invalid(message),
            "not_found" => FileError::NotFound(message),
            "outside" => FileError::Outside(message),
            "not_a_file" | "not_a_directory" | "is_directory" => FileError::Conflict(message),
            "too_large" => FileError::TooLarge(message),
            "no_space" => FileError::NoSpace(message),
            "forbidden" => FileError::Forbidden(message),
            _ => FileError::Tool(message),
        })
    }
}

/// The tool's output, read as lines and bodies. Of its stderr the start is kept (its last line is what
/// [`broke`] reports).
fn tool_output(output: BoxStream<'static, Result<ExecOutput, RuntimeError>>) -> ToolOutput {
    ToolOutput::new(output, IDLE_LIMIT, KeepStderr::Start)
}

/// A read error as a file operation reports it, or `None` where the tool's output merely stopped short:
/// the stream ended, or the exec's own connection broke (the container went away under it), which is
/// the same cut transfer. Each caller says what a cut means where it happened.
fn read_failure(e: ReadError) -> Option<FileError> {
    match e {
        ReadError::Stalled(_) => Some(FileError::Stalled),
        ReadError::LineTooLong(max) => Some(FileError::Tool(format!("the tool's header is longer than {max} bytes"))),
        ReadError::Broken(e) => {
            tracing::debug!(error = %e, "a file transfer's stream broke");
            None
        }
        ReadError::EndedInLine | ReadError::EndedInBody => None,
    }
}

/// Reads one line (at most `max` bytes): a header, or a `collect` entry.
async fn line(out: &mut ToolOutput, max: usize) -> Result<Bytes, FileError> {
    out.line(max).await.map_err(|e| {
        read_failure(e).unwrap_or_else(|| {
            if out.stderr().is_empty() {
                // Silent: killed, not broken (a Python error always says why on stderr). The container
                // stopped under the transfer (a DELETE, a restart of a dead session) or ran out of memory.
                FileError::NotRunning(
                    "the transfer was cut: the session's container stopped or ran out of memory".into(),
                )
            } else {
                FileError::Tool(broke(out, "the tool ended without a header"))
            }
        })
    })
}

async fn header(out: &mut ToolOutput, max: usize) -> Result<Header, FileError> {
    let line = line(out, max).await?;
    let header: Header =
        serde_json::from_slice(&line).map_err(|e| FileError::Tool(broke(out, &format!("unreadable header ({e})"))))?;
    header.into_result()
}

/// `what`, and the last line of the tool's stderr if it wrote any.
fn broke(out: &ToolOutput, what: &str) -> String {
    let stderr = String::from_utf8_lossy(out.stderr());
    let last = stderr.trim().lines().last().unwrap_or("").to_owned();
    if last.is_empty() { what.to_owned() } else { format!("{what}: {last}") }
}

async fn start(runtime: &dyn ContainerRuntime, container: &str, args: &[&str]) -> Result<ExecProcess, FileError> {
    if container.is_empty() {
        return Err(FileError::NotRunning("the session has no container yet".into()));
    }
    let mut cmd = vec![FILES_TOOL.to_owned()];
    cmd.extend(args.iter().map(|a| a.to_string()));
    let request = ExecRequest { cmd, user: "1000:1000".into(), working_dir: HOME.into(), env: Vec::new() };
    Ok(runtime.exec(container, &request).await?)
}

/// Lists a directory.
pub async fn list(runtime: &dyn ContainerRuntime, container: &str, path: &FilePath) -> Result<Listing, FileError> {
    let exec = start(runtime, container, &["list", HOME, path.as_str()]).await?;
    let header = header(&mut tool_output(exec.output), MAX_HEADER).await?;
    Ok(Listing {
        path: path.as_str().to_owned(),
        entries: header.entries.unwrap_or_default(),
        truncated: header.truncated.unwrap_or(false),
    })
}

/// Removes a file, a symlink (not what it points to) or a directory with everything in it.
pub async fn delete(runtime: &dyn ContainerRuntime, container: &str, path: &FilePath) -> Result<(), FileError> {
    if path.is_root() {
        return Err(FileError::Invalid("the working directory itself cannot be deleted".into()));
    }
    let exec = start(runtime, container, &["delete", HOME, path.as_str()]).await?;
    header(&mut tool_output(exec.output), 64 << 10).await.map(|_| ())
}

/// Starts a download: the header is read here (so a missing file is an error before any byte is sent);
/// the body follows as a stream of exactly `size` bytes, or ends with an error.
pub async fn download(runtime: &dyn ContainerRuntime, container: &str, path: &FilePath) -> Result<Download, FileError> {
    let exec = start(runtime, container, &["get", HOME, path.as_str()]).await?;
    let mut out = tool_output(exec.output);
    let header = header(&mut out, 64 << 10).await?;
    let size = header.size.ok_or_else(|| FileError::Tool("the header has no size".into()))?;
    let mtime = header.mtime.unwrap_or(0.0);
    // The exec's stdin stays open until the body is done: dropping it early would not stop the tool.
    let stdin = exec.stdin;
    let body = futures::stream::unfold((out, size, stdin), |(mut out, mut left, stdin)| async move {
        match out.body_chunk(&mut left).await {
            Ok(None) => None,
            Ok(Some(chunk)) => Some((Ok(chunk), (out, left, stdin))),
            Err(e) => {
                let why = match read_failure(e) {
                    Some(e) => e.to_string(),
                    None => "the file ended early (changed while read?)".to_owned(),
                };
                Some((Err(std::io::Error::other(why)), (out, 0, stdin)))
            }
        }
    })
    .boxed();
    Ok(Download { size, mtime, body })
}

/// Writes a file from `body`, creating the directories on the way; the file appears whole or not at all
/// (the tool writes a hidden temporary file and renames it). More than `max_size` bytes → `TooLarge`.
pub async fn upload<S, E>(
    runtime: &dyn ContainerRuntime,
    container: &str,
    path: &FilePath,
    max_size: u64,
    body: S,
) -> Result<Written, FileError>
where
    S: Stream<Item = Result<Bytes, E>> + Send,
    E: std::fmt::Display,
{
    if path.is_root() {
        return Err(FileError::Invalid("a file needs a name".into()));
    }
    let max = max_size.to_string();
    let exec = start(runtime, container, &["put", HOME, path.as_str(), &max]).await?;
    let mut stdin = exec.stdin;
    let mut out = tool_output(exec.output);
    let mut body = std::pin::pin!(body);
    let mut total: u64 = 0;
    let mut tool_stopped = false;
    loop {
        let chunk = match tokio::time::timeout(IDLE_LIMIT, body.next()).await {
            Err(_) => return Err(FileError::Stalled),
            Ok(None) => break,
            Ok(Some(Err(e))) => return Err(FileError::Invalid(format!("the upload was cut short: {e}"))),
            Ok(Some(Ok(chunk))) => chunk,
        };
        total += chunk.len() as u64;
        if total > max_size {
            // Dropping the exec mid-frame makes the tool discard its temporary file.
            return Err(FileError::TooLarge(format!("the file is larger than the upload limit of {max_size} bytes")));
        }
        for piece in chunk.chunks(1 << 20) {
            let mut frame = Vec::with_capacity(piece.len() + 4);
            frame.extend_from_slice(&(piece.len() as u32).to_be_bytes());
            frame.extend_from_slice(piece);
            let written = tokio::time::timeout(IDLE_LIMIT, stdin.write_all(&frame)).await;
            match written {
                Err(_) => return Err(FileError::Stalled),
                // The tool stopped reading: its header says why.
                Ok(Err(_)) => {
                    tool_stopped = true;
                    break;
                }
                Ok(Ok(())) => {}
            }
        }
        if tool_stopped {
            break;
        }
    }
    if !tool_stopped {
        let end = async {
            stdin.write_all(&0u32.to_be_bytes()).await?;
            stdin.flush().await
        };
        let _ = tokio::time::timeout(IDLE_LIMIT, end).await;
    }
    let header = header(&mut out, 64 << 10).await?;
    drop(stdin);
    Ok(Written {
        path: path.as_str().to_owned(),
        size: header.size.unwrap_or(total),
        mtime: header.mtime.unwrap_or(0.0),
    })
}

/// The regular files under the working directory modified at or after `since` (seconds since the epoch),
/// hidden ones excepted: at most `max_files` of them and `max_bytes` in all, held in memory. Returns the
/// files and how many were skipped over the limits.
pub async fn collect(
    runtime: &dyn ContainerRuntime,
    container: &str,
    max_files: usize,
    max_bytes: u64,
    since: f64,
) -> Result<(Vec<Collected>, u64), FileError> {
    let mut collecting = Collecting::start(runtime, container, HOME, max_files, max_bytes, since).await?;
    let mut files = Vec::new();
    while let Some((path, size)) = collecting.next_file().await? {
        let mut content = BytesMut::with_capacity(size as usize);
        while let Some(chunk) = collecting.chunk().await? {
            content.extend_from_slice(&chunk);
        }
        files.push(Collected { path, content: content.freeze() });
    }
    Ok((files, collecting.skipped()))
}

/// The file tool's `collect` as it runs: the regular files under a folder of the container modified at or
/// after a time, hidden ones excepted, one after another, each its path and size, then its bytes in
/// pieces, never held whole. Everything the tool sends is attacker input: a line is bounded before it is
/// buffered, and more than `max_files` files or `max_bytes` bytes in all, whatever the tool says, is an
/// error. Paths are as the tool sends them: the caller checks them before they name anything.
pub struct Collecting {
    out: ToolOutput,
    /// Kept open until the tool is done, as for a download.
    _stdin: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
    /// Bytes of the current file not read yet.
    left: u64,
    files: usize,
    total: u64,
    max_files: usize,
    max_bytes: u64,
    /// Set at the end: the files the tool skipped over its limits.
    skipped: Option<u64>,
    /// Set at the end: when the tool began its walk (epoch seconds, the clock of file times), if it said.
    started: Option<f64>,
}

impl Collecting {
    /// Starts `collect` under `root` (an absolute path in the container).
    pub async fn start(
        runtime: &dyn ContainerRuntime,
        container: &str,
        root: &str,
        max_files: usize,
        max_bytes: u64,
        since: f64,
    ) -> Result<Collecting, FileError> {
        // `since` as its shortest exact text: Python reads back the same number (no rounding up that would
        // skip a file changed right at it).
        let args = [max_files.to_string(), max_bytes.to_string(), since.to_string()];
        let exec = start(runtime, container, &["collect", root, &args[0], &args[1], &args[2]]).await?;
        Ok(Collecting::read(exec, max_files, max_bytes))
    }

    /// Reads a `collect` already started (tests give it a scripted one).
    pub fn read(exec: ExecProcess, max_files: usize, max_bytes: u64) -> Collecting {
        Collecting {
            out: tool_output(exec.output),
            _stdin: exec.stdin,
            left: 0,
            files: 0,
            total: 0,
            max_files,
            max_bytes,
            skipped: None,
            started: None,
        }
    }

    /// The next file's path and size (what is left of the one before is read and dropped first), or `None`
    /// at the end.
    pub async fn next_file(&mut self) -> Result<Option<(String, u64)>, FileError> {
        while self.chunk().await?.is_some() {}
        if self.skipped.is_some() {
            return Ok(None);
        }
        let line = line(&mut self.out, 64 << 10).await?;
        let item: tool::collect::Item =
            serde_json::from_slice(&line).map_err(|e| FileError::Tool(format!("collect: {e}")))?;
        if item.ok == Some(false) {
            return Err(FileError::Tool(item.message.unwrap_or_default()));
        }
        if item.end == Some(true) {
            self.skipped = Some(item.skipped.unwrap_or(0));
            self.started = item.started.filter(|t| t.is_finite() && *t >= 0.0);
            return Ok(None);
        }
        let (Some(path), Some(size)) = (item.path, item.size) else {
            return Err(FileError::Tool("collect: an entry without path or size".into()));
        };
        self.files += 1;
        self.total = self.total.saturating_add(size);
        if self.files > self.max_files || self.total > self.max_bytes {
            return Err(FileError::Tool("collect: the tool went over its limits".into()));
        }
        self.left = size;
        Ok(Some((path, size)))
    }

    /// The next piece of the current file, `None` once it is all read.
    pub async fn chunk(&mut self) -> Result<Option<Bytes>, FileError> {
        let ended = || FileError::Tool("collect: a file ended early".into());
        self.out.body_chunk(&mut self.left).await.map_err(|e| read_failure(e).unwrap_or_else(ended))
    }

    /// How many files the tool skipped over its limits (known at the end).
    pub fn skipped(&self) -> u64 {
        self.skipped.unwrap_or(0)
    }

    /// When the tool began its walk, by the clock file times come from (known at the end; an older tool
    /// does not say): the `since` of a next collect that misses nothing changed meanwhile.
    pub fn started(&self) -> Option<f64> {
        self.started
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(raw: &str) -> String {
        FilePath::parse(raw).unwrap().as_str().to_owned()
    }

    fn refused(raw: &str) -> bool {
        matches!(FilePath::parse(raw), Err(FileError::Invalid(_)))
    }

    #[test]
    fn paths_inside_the_working_directory_are_kept_and_tidied() {
        assert_eq!(ok("a.txt"), "a.txt");
        assert_eq!(ok("dir/sub/a.txt"), "dir/sub/a.txt");
        assert_eq!(ok("./dir//a.txt/"), "dir/a.txt");
        assert_eq!(ok(""), "");
        assert_eq!(ok("."), "");
        assert_eq!(ok("..."), "...");
        assert_eq!(ok("a..b"), "a..b");
        assert_eq!(ok("données/été.csv"), "données/été.csv");
        assert!(FilePath::parse("").unwrap().is_root());
        assert_eq!(FilePath::parse("a/b/c.png").unwrap().file_name(), "c.png");
    }

    #[test]
    fn paths_that_could_leave_it_are_refused() {
        for raw in ["..", "../etc/passwd", "a/../../b", "a/..", "/etc/passwd", "/", "a\0b", "a\nb", "a\rb", "\x7f"] {
            assert!(refused(raw), "{raw:?} must be refused");
        }
        assert!(refused(&"a".repeat(MAX_NAME + 1)));
        assert!(!refused(&"a".repeat(MAX_NAME)));
        assert!(refused(&"a/".repeat(MAX_PATH / 2 + 1)));
    }

    #[test]
    fn images_are_taken_out_of_outputs_once_each_and_the_rest_stays() {
        use crate::kernel::Output;
        let mut outputs = vec![
            Output::Stream { name: "stdout".into(), text: "hi".into() },
            Output::DisplayData {
                data: serde_json::json!({"image/png": "aGVs\nbG8=", "text/plain": "<Figure>"})
                    .as_object()
                    .unwrap()
                    .clone(),
                metadata: Default::default(),
            },
            Output::ExecuteResult {
                execution_count: Some(3),
                data: serde_json::json!({"image/svg+xml": "<svg/>", "image/jpeg": "not base64!"})
                    .as_object()
                    .unwrap()
                    .clone(),
                metadata: Default::default(),
            },
        ];
        let images = take_images(&mut outputs, "outputs/exec-3");
        let got: Vec<(usize, &str, &str, &[u8])> =
            images.iter().map(|i| (i.output_index, i.mime.as_str(), i.path.as_str(), i.content.as_ref())).collect();
        assert_eq!(
            got,
            vec![
                (1, "image/png", "outputs/exec-3-1.png", b"hello".as_slice()),
                (2, "image/svg+xml", "outputs/exec-3-2.svg", b"<svg/>".as_slice())
            ]
        );
        let Output::DisplayData { data, .. } = &outputs[1] else { panic!() };
        assert_eq!(data.keys().collect::<Vec<_>>(), vec!["text/plain"], "the image left the output; the text stayed");
        let Output::ExecuteResult { data, .. } = &outputs[2] else { panic!() };
        assert!(data.contains_key("image/jpeg"), "invalid data stays inline");
    }

    #[test]
    fn the_tools_refusals_become_typed_errors() {
        let refusal = |code: &str| Header {
            ok: false,
            code: Some(code.into()),
            message: Some("m".into()),
            size: None,
            mtime: None,
            entries: None,
            truncated: None,
        };
        assert!(matches!(refusal("not_found").into_result(), Err(FileError::NotFound(_))));
        assert!(matches!(refusal("outside").into_result(), Err(FileError::Outside(_))));
        assert!(matches!(refusal("is_directory").into_result(), Err(FileError::Conflict(_))));
        assert!(matches!(refusal("no_space").into_result(), Err(FileError::NoSpace(_))));
        assert!(matches!(refusal("something new").into_result(), Err(FileError::Tool(_))));
    }
}
