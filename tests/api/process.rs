//! The service as a separate process (the real `kernelbox serve` binary), for what an in-process app
//! cannot show: its own memory (`/proc/<pid>/status`), a SIGKILL, a Docker socket that goes away.
//! Dropping a [`ServiceProcess`] kills it; its containers go with the test's [`InstanceGuard`].

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::helpers::{ensure_images, eventually};

pub struct ServiceProcess {
    child: Child,
    pub base: String,
    pub client: reqwest::Client,
}

/// How to start one.
pub struct ProcessOptions<'a> {
    pub instance: &'a str,
    pub state_dir: &'a Path,
    /// Extra `serve` flags.
    pub args: &'a [&'a str],
    /// Extra environment (e.g. `DOCKER_HOST`).
    pub env: &'a [(&'a str, String)],
    /// Where its log goes (kept for a failing test to show).
    pub log: PathBuf,
}

impl ServiceProcess {
    /// Starts `kernelbox serve` on a free loopback port and waits until `/readyz` answers 200.
    pub async fn start(o: ProcessOptions<'_>) -> ServiceProcess {
        ensure_images().await;
        let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        let log = std::fs::File::create(&o.log).expect("log file");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_kernelbox"));
        cmd.arg("serve")
            .args(["--listen", &format!("127.0.0.1:{port}")])
            .args(["--instance", o.instance])
            // No warm pool unless a test asks for one (KERNELBOX_POOL in its environment).
            .env("KERNELBOX_POOL", "none")
            .arg("--state-dir")
            .arg(o.state_dir)
            .arg("--no-build")
            .args(o.args)
            .env("KERNELBOX_LOG_FORMAT", "json")
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log);
        for (k, v) in o.env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("starting kernelbox serve");
        let p = ServiceProcess { child, base: format!("http://127.0.0.1:{port}"), client: reqwest::Client::new() };
        let ready = eventually(Duration::from_secs(60), || async {
            p.client.get(p.url("/readyz")).send().await.is_ok_and(|r| r.status() == 200)
        })
        .await;
        assert!(
            ready,
            "the service did not become ready; log: {}",
            std::fs::read_to_string(&o.log).unwrap_or_default()
        );
        p
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Resident memory now, KiB.
    pub fn rss_kib(&self) -> u64 {
        status_field(self.pid(), "VmRSS")
    }

    /// Peak resident memory since the last [`ServiceProcess::reset_peak`], KiB.
    pub fn peak_kib(&self) -> u64 {
        status_field(self.pid(), "VmHWM")
    }

    /// Resets the peak (`/proc/<pid>/clear_refs` "5", as root).
    pub fn reset_peak(&self) {
        std::fs::write(format!("/proc/{}/clear_refs", self.pid()), "5").expect("resetting the peak RSS (needs root)");
    }

    /// SIGKILL: no shutdown, nothing cleaned.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then waits (at most `limit`) for a clean exit; returns how long it took.
    pub fn terminate(&mut self, limit: Duration) -> Option<Duration> {
        let started = std::time::Instant::now();
        sigterm(self.pid());
        while started.elapsed() < limit {
            if let Ok(Some(_)) = self.child.try_wait() {
                return Some(started.elapsed());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub async fn post(&self, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let r = self.client.post(self.url(path)).json(&body).send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    pub async fn get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self.client.get(self.url(path)).send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }
}

impl Drop for ServiceProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn status_field(pid: u32, field: &str) -> u64 {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    text.lines()
        .find_map(|l| l.strip_prefix(field)?.trim_start_matches(':').split_whitespace().next()?.parse().ok())
        .unwrap_or(0)
}

fn sigterm(pid: u32) {
    let _ = Command::new("kill").args(["-TERM", &pid.to_string()]).status();
}
