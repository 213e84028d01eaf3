//! A service restart must not kill long work: the service, a real process, is killed with SIGKILL while a
//! session runs a long cell; the next run adopts the busy kernel, the session is `busy` until that cell
//! ends, keeps its state, and the next execution waits behind the cell.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{InstanceGuard, instance_containers};
use crate::process::{ProcessOptions, ServiceProcess};

async fn start(instance: &str, state: &std::path::Path, run: &str) -> ServiceProcess {
    let log = state.parent().unwrap().join(format!("{instance}-{run}.log"));
    ServiceProcess::start(ProcessOptions { instance, state_dir: state, args: &[], env: &[], log }).await
}

async fn execute(service: &ServiceProcess, id: &str, code: &str) -> Value {
    let (status, r) =
        service.post(&format!("/v1/sessions/{id}/execute"), json!({"code": code, "timeout_s": 120})).await;
    assert_eq!(status, 200, "{r}");
    r
}

#[tokio::test(flavor = "multi_thread")]
async fn a_cell_running_when_the_service_is_killed_finishes_after_adoption() {
    let scratch = tempfile::Builder::new().prefix("kbt").tempdir_in("/tmp").unwrap();
    let state = scratch.path().join("state");
    let instance = format!("test-busy-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let _guard = InstanceGuard(instance.clone());

    let mut first = start(&instance, &state, "first").await;
    let (status, session) = first.post("/v1/sessions", json!({"language": "python"})).await;
    assert_eq!(status, 201, "{session}");
    let id = session["id"].as_str().unwrap().to_owned();
    execute(&first, &id, "kept = 'state'").await;
    let long = {
        let request = first.client.post(first.url(&format!("/v1/sessions/{id}/execute")));
        let request = request.json(&json!({"code": "import time\ntime.sleep(30)\nfinished = True", "timeout_s": 120}));
        tokio::spawn(request.send())
    };
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (_, view) = first.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(view["status"], "busy", "{view}");
    first.kill9();
    let killed_at = Instant::now();
    assert!(long.await.unwrap().is_err(), "the call was cut with the service");

    let second = start(&instance, &state, "second").await;
    let (status, view) = second.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!((status, view["status"].as_str()), (200, Some("busy")), "adopted while its cell runs: {view}");

    // The next execution waits behind the cell, in the same kernel: the cell's variable is there.
    let r = execute(&second, &id, "print(kept, finished)").await;
    let waited = killed_at.elapsed();
    assert_eq!((r["status"].as_str(), r["stdout"].as_str()), (Some("ok"), Some("state True\n")), "{r}");
    eprintln!("FIGURE busy adoption: the next execution answered {waited:?} after the kill (the cell had ~27 s left)");
    let (_, view) = second.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(view["status"], "idle", "{view}");
    assert_eq!(instance_containers(&instance).await.len(), 1, "one container, adopted, not replaced");
}
