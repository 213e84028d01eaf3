//! Kernels that survive what Jupyter survives: a kernel that exits, crashes or runs out of memory is
//! restarted by the service in a new container, and every client hears of it (an `auto_restart` event on
//! SSE streams, the session's `auto_restarts` and `last_auto_restart`, a metric); past the operator's
//! bound it stays dead. (A `shutdown_request` sent over the gateway WebSocket: `gateway_ws.rs`.)

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

use crate::helpers::*;

/// What an SSE stream carried: each event's name and data, up to and with the `result`.
async fn stream_events(response: reqwest::Response) -> Vec<(String, Value)> {
    let mut body = response.bytes_stream();
    let mut text = String::new();
    let read = tokio::time::timeout(Duration::from_secs(120), async {
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
            if text.contains("event: result") && text.ends_with("\n\n") {
                break;
            }
        }
    });
    assert!(read.await.is_ok(), "the stream did not end with a result within 120 s: {text}");
    let mut events = Vec::new();
    for block in text.split("\n\n").filter(|b| !b.trim().is_empty()) {
        let field = |name: &str| block.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_default().to_owned();
        let (event, data) = (field("event: "), field("data: "));
        if !event.is_empty() {
            events.push((event, serde_json::from_str(&data).unwrap_or(Value::String(data))));
        }
    }
    events
}

/// Sends an execution that streams; the future owns what it needs (it may be spawned).
fn execute_streamed(app: &TestApp, id: &str, code: &str) -> impl Future<Output = reqwest::Response> + use<> {
    let request = app.client.post(app.url(&format!("/v1/sessions/{id}/execute"))).header("accept", "text/event-stream");
    let request = request.json(&json!({ "code": code }));
    async move { request.send().await.unwrap() }
}

fn named<'a>(events: &'a [(String, Value)], name: &str) -> Vec<&'a Value> {
    events.iter().filter(|(e, _)| e == name).map(|(_, d)| d).collect()
}

/// Waits (at most 60 s) until the session is idle again after `restarts` automatic restarts.
async fn back_after(app: &TestApp, id: &str, restarts: u64) -> Value {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (_, view) = app.get(&format!("/v1/sessions/{id}")).await;
        if view["status"] == "idle" && view["auto_restarts"] == restarts {
            return view;
        }
        assert!(tokio::time::Instant::now() < deadline, "not back within 60 s: {view}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_python_kernel_that_exits_is_back_within_seconds_and_every_client_hears_of_it() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    let (_, view) = app.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!((view["auto_restart"].clone(), view["auto_restarts"].clone()), (json!(true), json!(0)), "{view}");
    app.exec(&id, "x = 1").await;

    // The cell that exits streams; a second one waits in the queue behind it, streaming too.
    let exiting = tokio::spawn(execute_streamed(&app, &id, "import os, time\ntime.sleep(2)\nos._exit(1)"));
    tokio::time::sleep(Duration::from_millis(500)).await;
    let queued = execute_streamed(&app, &id, "print('x' in dir())").await;

    let events = stream_events(exiting.await.unwrap()).await;
    let result = named(&events, "result")[0];
    assert_eq!(
        (result["status"].as_str(), result["killed_reason"].as_str()),
        (Some("killed"), Some("exited with code 1"))
    );
    assert_eq!(result["kernel_restarted"], true, "the result says the state is gone: {result}");
    let notices = named(&events, "auto_restart");
    assert_eq!(notices.first().map(|n| n["phase"].clone()), Some(json!("restarting")), "{events:?}");
    assert_eq!(notices[0]["reason"], "exited with code 1");

    let events = stream_events(queued).await;
    let phases: Vec<&Value> = named(&events, "auto_restart").iter().map(|n| &n["phase"]).collect();
    assert_eq!(phases, [&json!("restarting"), &json!("restarted")], "{events:?}");
    let result = named(&events, "result")[0];
    assert_eq!((result["status"].as_str(), result["stdout"].as_str()), (Some("ok"), Some("False\n")), "{result}");

    let view = back_after(&app, &id, 1).await;
    assert_eq!(view["last_auto_restart"]["reason"], "exited with code 1", "{view}");
    assert_eq!(app.exec(&id, "print(6 * 7)").await["stdout"], "42\n");
    assert_eq!(app.containers().await.len(), 1, "the dead container is gone, the new one serves");
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(r#"kernelbox_kernel_auto_restarts_total{language="python",outcome="restarted"}"#),
        "{metrics}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn bash_restarts_its_shell_on_exit_and_a_bash_kernel_that_dies_is_restarted() {
    let app = spawn_app().await;
    let id = app.start("bash").await;
    app.exec(&id, "X=5").await;
    // bash_kernel starts a new bash itself when the shell exits: the kernel lives on, the shell's state
    // is gone.
    let r = app.exec(&id, "exit").await;
    assert_eq!(r["status"], "ok", "{r}");
    assert!(r["stdout"].as_str().unwrap().contains("Restarting Bash"), "{r}");
    assert_eq!(app.exec(&id, "echo \"[$X]\"").await["stdout"], "[]\n");

    // The kernel itself (bash's parent) dies: the service restarts it.
    app.exec(&id, "X=6").await;
    let r = app.exec(&id, "kill -9 $PPID").await;
    assert_eq!(
        (r["status"].as_str(), r["killed_reason"].as_str()),
        (Some("killed"), Some("exited with code 137")),
        "{r}"
    );
    let view = back_after(&app, &id, 1).await;
    assert_eq!(view["last_auto_restart"]["reason"], "exited with code 137");
    assert_eq!(app.exec(&id, "echo \"[$X] $((6 * 7))\"").await["stdout"], "[] 42\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_out_of_memory_kill_is_restarted_and_past_the_bound_the_session_stays_dead() {
    let app = spawn_app_with(AppOptions {
        limits: limits(&["--auto-restart-limit", "1", "--auto-restart-window-s", "600"]),
        ..Default::default()
    })
    .await;
    let id = app.start_with(json!({"language": "python", "memory_mb": 128})).await;
    // Out of memory: restarted too, as Jupyter's server restarts any dead kernel.
    let r = app.exec(&id, "x = bytearray(1024 * 1024 * 1024)").await;
    assert_eq!((r["status"].as_str(), r["killed_reason"].as_str()), (Some("killed"), Some("out_of_memory")), "{r}");
    assert_eq!(r["kernel_restarted"], true);
    let view = back_after(&app, &id, 1).await;
    assert_eq!(view["last_auto_restart"]["reason"], "out_of_memory");

    // A second death within the window: over the bound of one, the session stays dead.
    let r = app.exec(&id, "import os; os._exit(3)").await;
    assert_eq!((r["status"].as_str(), r["kernel_restarted"].as_bool()), (Some("killed"), Some(false)), "{r}");
    let (_, view) = app.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!((view["status"].as_str(), view["auto_restarts"].as_u64()), (Some("dead"), Some(1)), "{view}");
    let why = view["dead_reason"].as_str().unwrap();
    assert!(why.starts_with("exited with code 3; not restarted automatically"), "{why}");
    assert_eq!(app.exec(&id, "1").await["status"], "killed", "a dead kernel answers at once");
    let gone = eventually(Duration::from_secs(10), || async { app.containers().await.is_empty() });
    assert!(gone.await, "nothing runs for a dead session");
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"kernelbox_kernel_auto_restarts_total{language="python",outcome="refused"}"#));

    // A client's restart brings it back.
    let (status, view) = app.post(&format!("/v1/sessions/{id}/restart"), json!({})).await;
    assert_eq!((status, view["status"].as_str()), (200, Some("idle")), "{view}");
    assert_eq!(app.exec(&id, "print(6 * 7)").await["stdout"], "42\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_that_asked_for_no_automatic_restart_stays_dead() {
    let app = spawn_app().await;
    let id = app.start_with(json!({"language": "python", "auto_restart": false})).await;
    let r = app.exec(&id, "import os; os._exit(1)").await;
    assert_eq!((r["status"].as_str(), r["kernel_restarted"].as_bool()), (Some("killed"), Some(false)), "{r}");
    let (_, view) = app.get(&format!("/v1/sessions/{id}")).await;
    let got = (view["status"].as_str(), view["auto_restart"].as_bool(), view["dead_reason"].as_str());
    assert_eq!(got, (Some("dead"), Some(false), Some("exited with code 1")), "{view}");
    let (status, v) = app.post("/v1/sessions", json!({"language": "python", "auto_restart": "yes"})).await;
    assert_client_error(status, &v, "a setting that is not a boolean");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_automatic_restart_installs_the_sessions_packages_again() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    let (status, report) = app.post(&format!("/v1/sessions/{id}/packages"), json!({"packages": ["six"]})).await;
    assert_eq!((status, report["ok"].as_bool()), (200, Some(true)), "{report}");
    let r = app.exec(&id, "import os; os._exit(1)").await;
    assert_eq!(r["status"], "killed", "{r}");
    back_after(&app, &id, 1).await;
    // Idle only once the packages are back: the first execution after the restart imports them.
    let r = app.exec(&id, "import six\nprint(six.PY3)").await;
    assert_eq!(r["stdout"], "True\n", "installed again in the new container: {r}");
}
