//! Running one command in a container through Docker's exec API, with what it prints bounded before it
//! is buffered: whatever a container prints is attacker input (a session's code can shadow the tools
//! on its own `PYTHONPATH`; a fetcher handles downloaded content).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::StreamExt;
use futures::stream::BoxStream;

use crate::runtime::{ContainerRuntime, ExecOutput, ExecRequest, RuntimeError};

/// What of stderr is kept (its end: errors come last).
pub const MAX_STDERR: usize = 64 << 10;

/// A finished command.
#[derive(Debug, Default)]
pub struct Finished {
    /// `None` when Docker did not report one (the process was killed with its container).
    pub exit: Option<i64>,
    pub stdout: Vec<u8>,
    /// stdout was longer than allowed: the rest was dropped.
    pub stdout_truncated: bool,
    /// The last [`MAX_STDERR`] bytes of stderr.
    pub stderr: Vec<u8>,
}

impl Finished {
    pub fn ok(&self) -> bool {
        self.exit == Some(0)
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// The argv prefix that kills a command at `limit` inside the container: dropping an exec's stream does
/// not stop its process, so the limit is enforced where the process runs.
pub fn time_limited(limit: Duration, cmd: &[&str]) -> Vec<String> {
    let mut argv = vec!["timeout".to_owned(), "-s".into(), "KILL".into(), format!("{}", limit.as_secs().max(1))];
    argv.extend(cmd.iter().map(|s| s.to_string()));
    argv
}

/// Runs `cmd` as uid 1000 and collects its output: at most `max_stdout` bytes of stdout, the end of stderr.
pub async fn run(
    runtime: &dyn ContainerRuntime,
    container: &str,
    cmd: Vec<String>,
    env: Vec<String>,
    max_stdout: usize,
) -> Result<Finished, RuntimeError> {
    let request = ExecRequest { cmd, user: "1000:1000".into(), working_dir: "/tmp".into(), env };
    let mut exec = runtime.exec(container, &request).await?;
    let mut done = Finished::default();
    while let Some(item) = exec.output.next().await {
        match item? {
            ExecOutput::Stdout(b) => {
                let room = max_stdout.saturating_sub(done.stdout.len());
                if b.len() > room {
                    done.stdout_truncated = true;
                }
                done.stdout.extend_from_slice(&b[..b.len().min(room)]);
            }
            ExecOutput::Stderr(b) => keep_tail(&mut done.stderr, &b, MAX_STDERR),
        }
    }
    drop(exec.stdin);
    done.exit = exit_code(runtime, &exec.id).await?;
    Ok(done)
}

/// The exit code once Docker has it (it can lag the end of the output by a moment).
pub async fn exit_code(runtime: &dyn ContainerRuntime, exec_id: &str) -> Result<Option<i64>, RuntimeError> {
    for _ in 0..50 {
        if let Some(code) = runtime.exec_exit_code(exec_id).await? {
            return Ok(Some(code));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(None)
}

/// Appends `more` to `buf`, keeping only its last `max` bytes.
pub fn keep_tail(buf: &mut Vec<u8>, more: &[u8], max: usize) {
    buf.extend_from_slice(more);
    if buf.len() > max {
        let cut = buf.len() - max;
        buf.drain(..cut);
    }
}

/// A command's stdout read as a byte stream (stderr's end kept for error messages): lines bounded
/// before they are buffered, then raw bodies of announced sizes.
pub struct StdoutReader {
    output: BoxStream<'static, Result<ExecOutput, RuntimeError>>,
    buffered: BytesMut,
    pub stderr: Vec<u8>,
    idle: Duration,
}

impl StdoutReader {
    pub fn new(output: BoxStream<'static, Result<ExecOutput, RuntimeError>>, idle: Duration) -> Self {
        StdoutReader { output, buffered: BytesMut::new(), stderr: Vec::new(), idle }
    }

    /// The next stdout bytes; `None` at the end.
    pub async fn next(&mut self) -> Result<Option<Bytes>, String> {
        if !self.buffered.is_empty() {
            return Ok(Some(self.buffered.split().freeze()));
        }
        loop {
            let item = tokio::time::timeout(self.idle, self.output.next())
                .await
                .map_err(|_| format!("no output for {} s", self.idle.as_secs()))?;
            match item {
                None => return Ok(None),
                Some(Ok(ExecOutput::Stdout(b))) => return Ok(Some(b)),
                Some(Ok(ExecOutput::Stderr(b))) => keep_tail(&mut self.stderr, &b, 4096),
                Some(Err(e)) => return Err(e.to_string()),
            }
        }
    }

    /// One line of at most `max` bytes, without its newline.
    pub async fn line(&mut self, max: usize) -> Result<Bytes, String> {
        let mut line = BytesMut::new();
        loop {
            if let Some(i) = line.iter().position(|&b| b == b'\n') {
                self.buffered = line.split_off(i + 1);
                line.truncate(i);
                return Ok(line.freeze());
            }
            if line.len() > max {
                return Err(format!("a line longer than {max} bytes"));
            }
            match self.next().await? {
                Some(b) => line.extend_from_slice(&b),
                None => return Err("the output ended in the middle of a line".into()),
            }
        }
    }

    /// Hands exactly `size` bytes to `sink`, chunk by chunk.
    pub async fn body(&mut self, size: u64, mut sink: impl FnMut(&[u8]) -> Result<(), String>) -> Result<(), String> {
        let mut left = size;
        while left > 0 {
            let Some(mut chunk) = self.next().await? else {
                return Err("the output ended in the middle of a file".into());
            };
            if chunk.len() as u64 > left {
                self.buffered = BytesMut::from(&chunk[left as usize..]);
                chunk.truncate(left as usize);
            }
            left -= chunk.len() as u64;
            sink(&chunk)?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tail_is_kept() {
        let mut buf = Vec::new();
        keep_tail(&mut buf, b"hello ", 8);
        keep_tail(&mut buf, b"world", 8);
        assert_eq!(buf, b"lo world");
        assert_eq!(time_limited(Duration::from_secs(0), &["pip"]), ["timeout", "-s", "KILL", "1", "pip"]);
    }

    #[tokio::test]
    async fn lines_and_bodies_are_cut_where_announced() {
        let chunks = vec![
            Ok(ExecOutput::Stdout(Bytes::from_static(b"{\"a\":1}\nabc"))),
            Ok(ExecOutput::Stderr(Bytes::from_static(b"warn"))),
            Ok(ExecOutput::Stdout(Bytes::from_static(b"de{\"end\":true}\n"))),
        ];
        let mut r = StdoutReader::new(futures::stream::iter(chunks).boxed(), Duration::from_secs(1));
        assert_eq!(&r.line(100).await.unwrap()[..], b"{\"a\":1}");
        let mut body = Vec::new();
        r.body(5, |b| {
            body.extend_from_slice(b);
            Ok(())
        })
        .await
        .unwrap();
        assert_eq!(body, b"abcde");
        assert_eq!(&r.line(100).await.unwrap()[..], b"{\"end\":true}");
        assert_eq!(r.stderr, b"warn");
        let long = vec![Ok(ExecOutput::Stdout(Bytes::from(vec![b'x'; 300])))];
        let mut r = StdoutReader::new(futures::stream::iter(long).boxed(), Duration::from_secs(1));
        assert!(r.line(100).await.is_err(), "a line is bounded before it is buffered");
    }
}
