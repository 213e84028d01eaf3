//! Reading what an in-container tool prints through Docker's exec API, in the protocol kernelbox's tools
//! speak on stdout: a line (one JSON header), bounded before it is buffered, then raw bytes of exactly
//! the size the header announced, then the next line, and so on. Whatever a container prints is attacker
//! input: a line longer than its caller allows fails before it grows further, a body is handed out only
//! up to its announced size (what follows is kept for the next read), and of stderr only
//! [`MAX_STDERR`] bytes are kept, for error messages.
//!
//! It has two readers: the session's file transfers (`session/files.rs`, the images' file tool) and the
//! package fetcher (`packages/fetcher.rs`: the same tool's `collect`, and a `tar` stream). It lives in
//! the runtime layer because all it needs is the runtime's exec stream ([`ExecOutput`]), and both
//! readers sit above it: `packages/` may not import `session/`, and file transfers have no business
//! depending on the package layer. It does not start tools and does not know what a header means:
//! each reader parses its own lines and maps [`ReadError`] to its own errors. It must not grow a
//! dependency on any layer above the runtime.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;

use super::{ExecOutput, RuntimeError};

/// How much of a tool's stderr is kept for error messages.
pub const MAX_STDERR: usize = 4096;

/// Why a tool's output could not be read as announced. The messages are complete sentences for callers
/// whose errors are text.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// Nothing arrived for this long.
    #[error("no output for {} s", .0.as_secs())]
    Stalled(Duration),
    /// The exec's own stream broke (the container went away under it, or the engine did).
    #[error(transparent)]
    Broken(RuntimeError),
    /// A line grew past its caller's limit before its newline came.
    #[error("a line longer than {0} bytes")]
    LineTooLong(usize),
    #[error("the output ended in the middle of a line")]
    EndedInLine,
    #[error("the output ended in the middle of a file")]
    EndedInBody,
}

/// Which end of a tool's stderr is kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeepStderr {
    /// The first [`MAX_STDERR`] bytes.
    Start,
    /// The last [`MAX_STDERR`] bytes (errors come last).
    End,
}

/// A tool's output as it comes: stdout read as lines and bodies, stderr kept (bounded) on the side.
pub struct ToolOutput {
    output: BoxStream<'static, Result<ExecOutput, RuntimeError>>,
    /// stdout read past what was asked for: the start of the next line or body.
    buffered: Bytes,
    /// Part of stderr, at most [`MAX_STDERR`] bytes, for error messages.
    stderr: Vec<u8>,
    /// Which part of stderr [`ToolOutput::stderr`] keeps.
    keep: KeepStderr,
    /// How long a read waits for output before it is [`ReadError::Stalled`].
    idle: Duration,
}

impl ToolOutput {
    pub fn new(output: BoxStream<'static, Result<ExecOutput, RuntimeError>>, idle: Duration, keep: KeepStderr) -> Self {
        ToolOutput { output, buffered: Bytes::new(), stderr: Vec::new(), keep, idle }
    }

    /// What was kept of stderr so far.
    pub fn stderr(&self) -> &[u8] {
        &self.stderr
    }

    /// The next stdout bytes, as they come; `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Bytes>, ReadError> {
        if !self.buffered.is_empty() {
            return Ok(Some(std::mem::take(&mut self.buffered)));
        }
        loop {
            let item =
                tokio::time::timeout(self.idle, self.output.next()).await.map_err(|_| ReadError::Stalled(self.idle))?;
            match item {
                None => return Ok(None),
                Some(Ok(ExecOutput::Stdout(b))) => return Ok(Some(b)),
                Some(Ok(ExecOutput::Stderr(b))) => match self.keep {
                    KeepStderr::Start => {
                        let room = MAX_STDERR.saturating_sub(self.stderr.len());
                        self.stderr.extend_from_slice(&b[..b.len().min(room)]);
                    }
                    KeepStderr::End => keep_tail(&mut self.stderr, &b, MAX_STDERR),
                },
                Some(Err(e)) => return Err(ReadError::Broken(e)),
            }
        }
    }

    /// One line of at most `max` bytes, without its newline; what follows it is kept for the next read.
    pub async fn line(&mut self, max: usize) -> Result<Bytes, ReadError> {
        let mut line = BytesMut::new();
        loop {
            if let Some(i) = line.iter().position(|&b| b == b'\n') {
                self.buffered = line.split_off(i + 1).freeze();
                line.truncate(i);
                return Ok(line.freeze());
            }
            if line.len() > max {
                return Err(ReadError::LineTooLong(max));
            }
            match self.next().await? {
                Some(b) => line.extend_from_slice(&b),
                None => return Err(ReadError::EndedInLine),
            }
        }
    }

    /// The next piece of a body of which `left` bytes are still to come, `left` counted down: at most
    /// that many bytes (what follows is kept for the next read), `None` once the body is all read.
    pub async fn body_chunk(&mut self, left: &mut u64) -> Result<Option<Bytes>, ReadError> {
        if *left == 0 {
            return Ok(None);
        }
        let Some(mut chunk) = self.next().await? else {
            return Err(ReadError::EndedInBody);
        };
        if chunk.len() as u64 > *left {
            self.buffered = chunk.split_off(*left as usize);
        }
        *left -= chunk.len() as u64;
        Ok(Some(chunk))
    }
}

/// Appends `more` to `buf`, keeping only its last `max` bytes.
pub fn keep_tail(buf: &mut Vec<u8>, more: &[u8], max: usize) {
    buf.extend_from_slice(more);
    if buf.len() > max {
        let cut = buf.len() - max;
        buf.drain(..cut);
    }
}

/// The file tool's `collect` (`images/shared/files`), which both readers run: each file is a line
/// `{"path": P, "size": N}` and then N raw bytes; the last line is `{"end": true, "skipped": K,
/// "started": T}` (T: when the walk began, by the clock file times come from); a refusal is
/// `{"ok": false, "message": M}`. Each reader decides what a line is and checks it.
pub mod collect {
    use serde::Deserialize;

    /// One line of `collect`, every field as the tool may send it.
    #[derive(Debug, Deserialize)]
    pub struct Item {
        pub path: Option<String>,
        pub size: Option<u64>,
        pub end: Option<bool>,
        pub skipped: Option<u64>,
        pub started: Option<f64>,
        pub ok: Option<bool>,
        pub message: Option<String>,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reader(chunks: Vec<Result<ExecOutput, RuntimeError>>, keep: KeepStderr) -> ToolOutput {
        ToolOutput::new(futures::stream::iter(chunks).boxed(), Duration::from_secs(1), keep)
    }

    async fn body(r: &mut ToolOutput, size: u64) -> Result<Vec<u8>, ReadError> {
        let mut body = Vec::new();
        let mut left = size;
        while let Some(chunk) = r.body_chunk(&mut left).await? {
            body.extend_from_slice(&chunk);
        }
        Ok(body)
    }

    #[tokio::test]
    async fn lines_and_bodies_are_cut_where_announced() {
        let chunks = vec![
            Ok(ExecOutput::Stdout(Bytes::from_static(b"{\"a\":1}\nabc"))),
            Ok(ExecOutput::Stderr(Bytes::from_static(b"warn"))),
            Ok(ExecOutput::Stdout(Bytes::from_static(b"de{\"end\":true}\n"))),
        ];
        let mut r = reader(chunks, KeepStderr::End);
        assert_eq!(&r.line(100).await.unwrap()[..], b"{\"a\":1}");
        assert_eq!(body(&mut r, 5).await.unwrap(), b"abcde");
        assert_eq!(&r.line(100).await.unwrap()[..], b"{\"end\":true}");
        assert_eq!(r.stderr(), b"warn");
        let long = vec![Ok(ExecOutput::Stdout(Bytes::from(vec![b'x'; 300])))];
        let mut r = reader(long, KeepStderr::End);
        assert!(r.line(100).await.is_err(), "a line is bounded before it is buffered");
    }

    #[tokio::test]
    async fn the_output_stopping_short_or_breaking_is_told_apart() {
        let cut = vec![Ok(ExecOutput::Stdout(Bytes::from_static(b"{}\nab")))];
        let mut r = reader(cut, KeepStderr::End);
        r.line(100).await.unwrap();
        assert!(matches!(body(&mut r, 5).await, Err(ReadError::EndedInBody)));
        let mut r = reader(vec![Ok(ExecOutput::Stdout(Bytes::from_static(b"{")))], KeepStderr::End);
        assert!(matches!(r.line(100).await, Err(ReadError::EndedInLine)));
        let mut r = reader(vec![Err(RuntimeError::NotFound("c".into()))], KeepStderr::End);
        assert!(matches!(r.line(100).await, Err(ReadError::Broken(_))));
        let mut r = ToolOutput::new(futures::stream::pending().boxed(), Duration::from_millis(10), KeepStderr::End);
        assert!(matches!(r.next().await, Err(ReadError::Stalled(_))));
    }

    #[tokio::test]
    async fn stderr_is_kept_from_the_end_asked_for_and_bounded() {
        let noisy = || {
            vec![
                Ok(ExecOutput::Stderr(Bytes::from(vec![b'a'; MAX_STDERR]))),
                Ok(ExecOutput::Stderr(Bytes::from_static(b"last"))),
            ]
        };
        let mut r = reader(noisy(), KeepStderr::Start);
        assert!(r.next().await.unwrap().is_none());
        assert_eq!(r.stderr(), vec![b'a'; MAX_STDERR]);
        let mut r = reader(noisy(), KeepStderr::End);
        assert!(r.next().await.unwrap().is_none());
        assert_eq!(r.stderr().len(), MAX_STDERR);
        assert!(r.stderr().ends_with(b"last"));
    }
}
