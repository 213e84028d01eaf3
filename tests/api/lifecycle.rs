//! Restart, adoption after a service restart, the idle reaper, and shutdown.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread")]
async fn restart_gives_fresh_state_in_the_same_container_with_its_files() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    let container = app.containers().await.pop().unwrap().id;
    app.exec(&id, "x = 1\nopen('notes.txt', 'w').write('kept')").await;
    let (status, s) = app.post(&format!("/v1/sessions/{id}/restart"), json!({})).await;
    assert_eq!(status, 200, "{s}");
    let r = app.exec(&id, "x").await;
    assert_eq!(r["error"]["ename"], "NameError");
    assert_eq!(result_text(&app.exec(&id, "open('notes.txt').read()").await).as_deref(), Some("'kept'"));
    assert_eq!(app.containers().await.pop().unwrap().id, container, "the same container");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restarted_service_adopts_live_sessions_and_removes_the_rest() {
    let shared = SharedInstance::new("adopt");

    let mut first =
        spawn_app_with(AppOptions { keep_sessions: true, instance: shared.options(), ..Default::default() }).await;
    let id = first.start("python").await;
    first.exec(&id, "survivor = 'still here'").await;
    let doomed = first.start("bash").await;
    first.cleanup = false;
    first.stop().await;

    let list = instance_containers(&shared.name).await;
    assert_eq!(list.len(), 2, "sessions were kept running through the stop");
    let doomed_container = list.into_iter().find(|c| c.labels["kernelbox.session"] == doomed).unwrap().id;
    // Kill one kernel while no service runs: the next start must remove it, not adopt it.
    std::process::Command::new("docker").args(["kill", &doomed_container]).output().unwrap();

    let second = spawn_app_with(AppOptions { instance: shared.options(), ..Default::default() }).await;
    let r = second.exec(&id, "survivor").await;
    assert_eq!(result_text(&r).as_deref(), Some("'still here'"), "adopted with its state: {r}");
    assert_eq!(second.get(&format!("/v1/sessions/{doomed}")).await.0, 404);
    assert_eq!(second.containers().await.len(), 1, "the dead one was removed");
    second.stop().await;
    assert!(instance_containers(&shared.name).await.is_empty(), "a normal stop removes every session container");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reaper_removes_idle_sessions_but_never_a_busy_one() {
    // The scheduled reaper stays out of the way: this test drives the passes itself.
    let app = spawn_app_with(AppOptions { limits: limits(&["--reap-interval-s", "3600"]), ..Default::default() }).await;
    let idle = app.start_with(json!({"language": "python", "idle_timeout_s": 1})).await;
    let busy = app.start_with(json!({"language": "python", "idle_timeout_s": 1})).await;
    let fresh = app.start_with(json!({"language": "python", "idle_timeout_s": 3600})).await;
    let (client, url) = (app.client.clone(), app.url(&format!("/v1/sessions/{busy}/execute")));
    let running = tokio::spawn(async move {
        client.post(url).json(&json!({"code": "import time; time.sleep(4)"})).send().await.unwrap().status()
    });
    tokio::time::sleep(Duration::from_secs(2)).await;

    let report = app.manager.reap_once(chrono::Utc::now()).await;
    let removed: Vec<String> = report.removed.iter().map(|(id, _)| id.to_string()).collect();
    assert_eq!(removed, vec![idle.clone()], "only the idle one");
    assert_eq!(report.removed[0].1, "idle");
    assert_eq!(app.get(&format!("/v1/sessions/{idle}")).await.0, 404);
    assert_eq!(running.await.unwrap(), 200, "the busy session finished its work");
    assert_eq!(app.containers().await.len(), 2);

    let later = chrono::Utc::now() + chrono::Duration::hours(2);
    let report = app.manager.reap_once(later).await;
    assert_eq!(report.removed.len(), 2, "{report:?}");
    assert!(app.containers().await.is_empty());
    let _ = fresh;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_scheduled_reaper_runs_by_itself() {
    let app = spawn_app_with(AppOptions { limits: limits(&["--reap-interval-s", "1"]), ..Default::default() }).await;
    let id = app.start_with(json!({"language": "bash", "idle_timeout_s": 1})).await;
    // Generous: the scheduler polls every 0.5 s, but a loaded machine may start the next pass late.
    let gone =
        eventually(Duration::from_secs(30), || async { app.get(&format!("/v1/sessions/{id}")).await.0 == 404 }).await;
    assert!(gone, "the scheduler reaped the idle session within 30 s");
    // The session leaves the registry first; its container is removed right after.
    let removed = eventually(Duration::from_secs(10), || async { app.containers().await.is_empty() }).await;
    assert!(removed, "the reaped session's container is removed");
}
