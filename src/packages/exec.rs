//! Running one command in a container through Docker's exec API, with what it prints bounded before it
//! is buffered: whatever a container prints is attacker input (a session's code can shadow the tools
//! on its own `PYTHONPATH`; a fetcher handles downloaded content). Output read as lines and bodies of
//! announced sizes is [`crate::runtime::tool`]'s.

use std::time::Duration;

use futures::StreamExt;

use crate::runtime::tool::keep_tail;
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

    /// Killed by [`time_limited`]'s limit.
    pub fn killed_at_limit(&self) -> bool {
        self.exit == Some(KILLED_AT_LIMIT)
    }

    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

/// The exit status of a command [`time_limited`] killed (128 + SIGKILL).
pub const KILLED_AT_LIMIT: i64 = 137;

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
}
