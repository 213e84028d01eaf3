//! The kernelbox benchmark: runs the release binary as a real service on loopback, against the real Docker
//! engine and kernel images, and prints the figures that go into bench/BENCHMARKS.md:
//! cold session start (create → first execute done) per language, the execute round trip of `1+1`, and the
//! service's resident memory with 20 idle sessions.
//!
//! `cargo bench --bench service` (images must be built: `kernelbox images build`).
//! Set `KB_BENCH_ROUNDS` (default 200) for the round-trip sample size.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

const ADDR: &str = "127.0.0.1:18089";

struct Service(Child);

impl Drop for Service {
    fn drop(&mut self) {
        // SIGTERM: the service removes its sessions on the way out.
        let _ = Command::new("kill").arg("-TERM").arg(self.0.id().to_string()).status();
        let _ = self.0.wait();
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn rss_mib(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb: f64 = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0);
    kb / 1024.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let status = Command::new("cargo").args(["build", "--release", "--locked", "--quiet"]).status()?;
    anyhow::ensure!(status.success(), "cargo build --release failed");
    let state = tempfile::Builder::new().prefix("kbbench").tempdir_in("/tmp")?;
    let child = Command::new("target/release/kernelbox")
        .args(["serve", "--no-build", "--listen", ADDR, "--instance", "bench", "--max-sessions-per-owner", "40"])
        // The benchmark is one client measuring latency, not an abuser.
        .args(["--rate-limit-per-minute", "0"])
        .arg("--state-dir")
        .arg(state.path())
        .env("KERNELBOX_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()?;
    let service = Service(child);
    let http = reqwest::Client::new();
    let base = format!("http://{ADDR}");
    for _ in 0..100 {
        if http.get(format!("{base}/readyz")).send().await.is_ok_and(|r| r.status().is_success()) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let idle_rss = rss_mib(service.0.id());

    let start = |language: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let r: Value = http
                .post(format!("{base}/v1/sessions"))
                .json(&json!({"language": language}))
                .send()
                .await?
                .json()
                .await?;
            let id = r["id"].as_str().ok_or_else(|| anyhow::anyhow!("no session: {r}"))?.to_owned();
            anyhow::Ok(id)
        }
    };
    let exec = |id: String, code: &'static str| {
        let (http, base) = (http.clone(), base.clone());
        async move {
            let r: Value = http
                .post(format!("{base}/v1/sessions/{id}/execute"))
                .json(&json!({"code": code}))
                .send()
                .await?
                .json()
                .await?;
            anyhow::ensure!(r["status"] == "ok", "execute failed: {r}");
            anyhow::Ok(r)
        }
    };

    println!("## Cold session start (POST /v1/sessions → first execute done), 3 runs each\n");
    println!("| language | min | median | max |\n|---|---|---|---|");
    let probes = [
        ("python", "1+1"),
        ("python_scientific", "1+1"),
        ("javascript", "1+1"),
        ("typescript", "1+1"),
        ("java", "1+1"),
        ("bash", "echo 2"),
    ];
    for (language, code) in probes {
        let mut times = Vec::new();
        for _ in 0..3 {
            let t = Instant::now();
            let id = start(language).await?;
            exec(id.clone(), code).await?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            http.delete(format!("{base}/v1/sessions/{id}")).send().await?;
        }
        times.sort_by(f64::total_cmp);
        println!("| {language} | {:.0} ms | {:.0} ms | {:.0} ms |", times[0], times[1], times[2]);
    }

    let rounds: usize = std::env::var("KB_BENCH_ROUNDS").ok().and_then(|v| v.parse().ok()).unwrap_or(200);
    println!("\n## Execute round trip of `1+1` over HTTP ({rounds} sequential calls, after 10 warm-up)\n");
    println!("| language | p50 | p95 | p99 |\n|---|---|---|---|");
    for (language, code) in [("python", "1+1"), ("javascript", "1+1"), ("java", "1+1"), ("bash", "echo 2")] {
        let id = start(language).await?;
        for _ in 0..10 {
            exec(id.clone(), code).await?;
        }
        let mut times = Vec::with_capacity(rounds);
        for _ in 0..rounds {
            let t = Instant::now();
            exec(id.clone(), code).await?;
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        times.sort_by(f64::total_cmp);
        let p = |q| percentile(&times, q);
        println!("| {language} | {:.1} ms | {:.1} ms | {:.1} ms |", p(0.5), p(0.95), p(0.99));
        http.delete(format!("{base}/v1/sessions/{id}")).send().await?;
    }

    println!("\n## Service memory (VmRSS of the kernelbox process)\n");
    let mut ids = Vec::new();
    for _ in 0..20 {
        let id = start("python").await?;
        exec(id.clone(), "1+1").await?;
        ids.push(id);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded_rss = rss_mib(service.0.id());
    println!(
        "| state | RSS |\n|---|---|\n| started, no sessions | {idle_rss:.1} MiB |\n| 20 idle python sessions | {loaded_rss:.1} MiB |"
    );
    let t = Instant::now();
    for id in &ids {
        http.delete(format!("{base}/v1/sessions/{id}")).send().await?;
    }
    println!("\nDeleting 20 sessions took {:.1} s.", t.elapsed().as_secs_f64());
    drop(service);
    Ok(())
}
