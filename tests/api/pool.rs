//! The warm pool against the real engine: a session starts from a pooled container with the limits it
//! asked for, the pool refills, and a claimed container survives a SIGKILL of the service (adopted with
//! its owner) while an unclaimed one is removed.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::*;
use crate::process::{ProcessOptions, ServiceProcess};

fn pooled_containers(all: &[kernelbox::runtime::ContainerSummary]) -> Vec<String> {
    all.iter()
        .filter(|c| c.labels.contains_key("kernelbox.pool"))
        .map(|c| c.labels["kernelbox.session"].clone())
        .collect()
}

async fn pool_ready(get: impl AsyncFn() -> Value, n: u64) -> bool {
    eventually(Duration::from_secs(120), || async {
        get().await.as_array().unwrap().iter().any(|l| l["name"] == "python" && l["pool"]["ready"] == n)
    })
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_starts_from_the_pool_with_its_own_limits_and_the_pool_refills() {
    let app = spawn_app_with(AppOptions { pool: crate::helpers::python_pool(1), ..Default::default() }).await;
    assert!(pool_ready(async || app.get("/v1/languages").await.1, 1).await, "the pool fills");
    let pooled = pooled_containers(&app.containers().await);
    assert_eq!(pooled.len(), 1);

    let started = Instant::now();
    let id = app.start_with(json!({"language": "python", "memory_mb": 515, "cpus": 0.5})).await;
    let took = started.elapsed();
    eprintln!("FIGURE pooled session start (POST /v1/sessions → 201): {:.1} ms", took.as_secs_f64() * 1e3);
    assert_eq!(id, pooled[0], "the session is the pooled kernel");

    // The limits asked for are the running container's now (cgroup v1 or v2).
    let v = app
        .exec(
            &id,
            "import os\ndef first(*paths):\n    for p in paths:\n        if os.path.exists(p):\n            return open(p).read().split()[0]\n\
             print(first('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory/memory.limit_in_bytes'))\n\
             print(first('/sys/fs/cgroup/cpu.max', '/sys/fs/cgroup/cpu/cpu.cfs_quota_us'))",
        )
        .await;
    let lines: Vec<String> = v["stdout"].as_str().unwrap().lines().map(str::to_owned).collect();
    assert_eq!(lines[0], (515u64 << 20).to_string(), "memory limit: {v}");
    assert_eq!(lines[1], "50000", "half a CPU (quota per 100 ms period): {v}");

    assert!(pool_ready(async || app.get("/v1/languages").await.1, 1).await, "the pool refills after a claim");
    let (_, metrics) = (200, app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap());
    // The recorder is shared by every app of the test process: other tests' claims count too.
    let hits = sample(&metrics, "kernelbox_pool_hits_total{language=\"python\"}");
    assert!(hits.is_some_and(|n| n >= 1.0), "{metrics}");

    // A request the pool cannot serve starts cold and leaves the pool as it was.
    let cold = app.start_with(json!({"language": "python", "env": {"A": "1"}})).await;
    assert!(!pooled_containers(&app.containers().await).contains(&cold));
    assert_eq!(app.exec(&cold, "import os; print(os.environ['A'])").await["stdout"], "1\n");

    // Ending the service removes the pool's containers too.
    let instance = app.instance.clone();
    app.stop().await;
    assert!(instance_containers(&instance).await.is_empty(), "nothing left after a stop");
}

#[tokio::test(flavor = "multi_thread")]
async fn after_a_sigkill_a_claimed_container_is_adopted_with_its_owner_and_an_unclaimed_one_removed() {
    let dir = tempfile::Builder::new().prefix("kbpool").tempdir_in("/tmp").unwrap();
    let instance = format!("test-pool-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let _guard = InstanceGuard(instance.clone());
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let start = |log: &str| {
        let log = dir.path().join(log);
        let state = state.clone();
        let instance = instance.clone();
        async move {
            let env = [("KERNELBOX_POOL", "python=1".to_owned()), ("KERNELBOX_API_KEYS", "key-a,key-b".to_owned())];
            ServiceProcess::start(ProcessOptions {
                instance: &instance,
                state_dir: &state,
                args: &["--rate-limit-per-minute", "0"],
                env: &env,
                log,
            })
            .await
        }
    };
    let mut first = start("first.log").await;
    let client = reqwest::Client::new();
    let languages = async |p: &ServiceProcess| -> Value {
        client.get(p.url("/v1/languages")).bearer_auth("key-a").send().await.unwrap().json().await.unwrap()
    };
    assert!(pool_ready(async || languages(&first).await, 1).await);
    let r = client
        .post(first.url("/v1/sessions"))
        .bearer_auth("key-a")
        .json(&json!({"language": "python"}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 201);
    let id = r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
    let exec = async |p: &ServiceProcess, key: &str, code: &str| {
        client
            .post(p.url(&format!("/v1/sessions/{id}/execute")))
            .bearer_auth(key)
            .json(&json!({"code": code}))
            .send()
            .await
            .unwrap()
    };
    assert_eq!(exec(&first, "key-a", "kept = 'mine'").await.status(), 200);
    assert!(pool_ready(async || languages(&first).await, 1).await, "a new pooled kernel waits, unclaimed");
    first.kill9();
    let left = instance_containers(&instance).await;
    assert_eq!(left.len(), 2, "the claimed and the unclaimed pooled containers outlive the SIGKILL: {left:?}");

    let second = start("second.log").await;
    let r = exec(&second, "key-a", "print(kept)").await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["stdout"], "mine\n", "adopted with its state");
    assert_eq!(exec(&second, "key-b", "print(kept)").await.status(), 404, "and with its owner");
    let remaining = instance_containers(&instance).await;
    let sessions: Vec<&String> = remaining.iter().map(|c| &c.labels["kernelbox.session"]).collect();
    assert!(sessions.contains(&&id));
    assert!(!pooled_containers(&left).iter().all(|s| sessions.contains(&s)), "the unclaimed one was removed");
    let claims: Vec<_> = std::fs::read_dir(state.join("claims")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert_eq!(claims, vec![std::ffi::OsString::from(format!("{id}.json"))], "only the live claim is kept");
    // A graceful stop: a SIGKILL now could cut the refill's container create half-way.
    let mut second = second;
    assert!(second.terminate(Duration::from_secs(40)).is_some(), "the service stops on SIGTERM");
    assert!(instance_containers(&instance).await.is_empty(), "nothing left after the stop");
}

/// The pool's status of `language` in `/v1/languages`.
fn pool_of(languages: &Value, language: &str) -> Value {
    languages.as_array().unwrap().iter().find(|l| l["name"] == language).map(|l| l["pool"].clone()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_adaptive_pool_rises_under_a_burst_of_creates_and_falls_back_after_a_quiet_spell() {
    let mut pool = kernelbox::session::pool::PoolConfig::fixed([], 2);
    pool.bounds.insert("python".into(), kernelbox::session::pool::PoolBounds { floor: 0, ceiling: 3 });
    // Long enough for the risen target to outlast the pool's boots under a loaded machine's test run.
    pool.quiet = Duration::from_secs(20);
    let app = spawn_app_with(AppOptions { pool, ..Default::default() }).await;
    let status = async || pool_of(&app.get("/v1/languages").await.1, "python");
    let s = status().await;
    assert_eq!((&s["floor"], &s["ceiling"], &s["target"], &s["ready"]), (&json!(0), &json!(3), &json!(0), &json!(0)));

    // A burst: eight creates back to back. The first find the pool empty (misses, cold starts); their
    // rate raises the target, the pool boots kernels, and the later creates take them (hits).
    let mut ids = Vec::new();
    let mut highest = 0;
    for _ in 0..8 {
        ids.push(app.start("python").await);
        highest = highest.max(status().await["target"].as_u64().unwrap());
    }
    assert!(highest >= 2, "the target rose under the burst (highest seen: {highest})");
    assert!(
        eventually(Duration::from_secs(60), || async { status().await["ready"].as_u64().unwrap() >= 2 }).await,
        "the pool filled up to its risen target: {}",
        status().await
    );
    ids.push(app.start("python").await);
    let s = status().await;
    assert!(s["misses"].as_u64().unwrap() >= 1 && s["hits"].as_u64().unwrap() >= 1, "hits and misses counted: {s}");
    for id in &ids {
        assert_eq!(app.delete(&format!("/v1/sessions/{id}")).await, 204);
    }

    // Quiet for longer than --pool-quiet-s: back to the floor, the pooled containers removed.
    assert!(
        eventually(Duration::from_secs(60), || async {
            let s = status().await;
            s["target"] == 0 && s["ready"] == 0
        })
        .await,
        "the target fell back to the floor: {}",
        status().await
    );
    assert!(
        eventually(Duration::from_secs(20), || async { app.containers().await.is_empty() }).await,
        "the pooled containers went with the fallen target"
    );
}
