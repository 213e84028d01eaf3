//! Requests that end early: clients that leave mid-create, DELETE or shutdown during a boot or a
//! restart, queued and abandoned work, outputs over the cap, slow stream readers, and the memory bound
//! of many huge outputs at once. Every test ends by checking that nothing is left behind: no container
//! beyond the expected ones, no stale session in the list, no leftover run directory.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;
use crate::process::{ProcessOptions, ServiceProcess};

/// The run directories under `<state_dir>/sessions`.
fn run_dirs(state_dir: &Path) -> Vec<String> {
    std::fs::read_dir(state_dir.join("sessions"))
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect())
        .unwrap_or_default()
}

/// Waits (at most 20 s, the cleanup runs in the background) until the instance has exactly `expected`
/// containers, run directories and listed sessions, and asserts it.
async fn assert_clean(app: &TestApp, expected: usize) {
    let clean = eventually(Duration::from_secs(20), || async {
        let listed = app.get("/v1/sessions").await.1.as_array().map_or(usize::MAX, Vec::len);
        app.containers().await.len() == expected && listed == expected && run_dirs(&app.state_dir).len() == expected
    })
    .await;
    let (_, listed) = app.get("/v1/sessions").await;
    assert!(
        clean,
        "left behind: containers {:?}, sessions {listed}, run dirs {:?}",
        app.containers().await.iter().map(|c| c.id.clone()).collect::<Vec<_>>(),
        run_dirs(&app.state_dir)
    );
}

fn create_request(addr: &str) -> Vec<u8> {
    let body = r#"{"language":"python"}"#;
    format!(
        "POST /v1/sessions HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

fn figure(name: &str, value: impl std::fmt::Display) {
    eprintln!("FIGURE {name}={value}");
}

// 1.
async fn clients_leave_mid_create(limit_args: &[&str]) {
    let app = spawn_app_with(AppOptions { limits: limits(limit_args), ..Default::default() }).await;
    for delay in [50u64, 300, 800] {
        for _ in 0..5 {
            let mut stream = tokio::net::TcpStream::connect(app.addr()).await.unwrap();
            stream.write_all(&create_request(&app.addr())).await.unwrap();
            tokio::time::sleep(Duration::from_millis(delay)).await;
            drop(stream);
        }
        assert_clean(&app, 0).await;
    }
    // The quota slots came back: the owner may have two sessions (its whole quota with the limit of 2).
    let a = app.start("python").await;
    let b = app.start("python").await;
    assert_eq!(result_text(&app.exec(&a, "1 + 1").await).as_deref(), Some("2"));
    assert_eq!(app.delete(&format!("/v1/sessions/{a}")).await, 204);
    assert_eq!(app.delete(&format!("/v1/sessions/{b}")).await, 204);
    assert_clean(&app, 0).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_mid_create_leaves_nothing() {
    clients_leave_mid_create(&[]).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_client_that_leaves_mid_create_frees_its_quota_slot() {
    clients_leave_mid_create(&["--max-sessions-per-owner", "2"]).await;
}

/// Polls the session list (every 10 ms, at most 30 s) until a session shows up; returns it.
async fn first_listed(app: &TestApp) -> Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, list) = app.get("/v1/sessions").await;
        if let Some(s) = list.as_array().and_then(|a| a.first()) {
            return s.clone();
        }
        assert!(Instant::now() < deadline, "no session appeared in the list");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

// 2.
#[tokio::test(flavor = "multi_thread")]
async fn delete_during_boot_removes_the_container_before_it_returns() {
    let app = spawn_app().await;
    let (client, url) = (app.client.clone(), app.url("/v1/sessions"));
    let create = tokio::spawn(async move {
        let r = client.post(url).json(&json!({"language": "python"})).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().await.unwrap_or(Value::Null))
    });
    let session = first_listed(&app).await;
    assert_eq!(session["status"], "starting", "{session}");
    let id = session["id"].as_str().unwrap();
    let started = Instant::now();
    let status = app.delete(&format!("/v1/sessions/{id}")).await;
    figure("delete_during_boot_ms", started.elapsed().as_millis());
    assert_eq!(status, 204);
    assert!(app.containers().await.is_empty(), "the container is gone when DELETE returns");
    let (status, body) =
        tokio::time::timeout(Duration::from_secs(30), create).await.expect("the create hangs").unwrap();
    eprintln!("create of a session deleted during its boot: {status} {body}");
    assert!(status >= 400, "the create of a deleted session fails: {status} {body}");
    assert_error_shape(&body, body["error"]["code"].as_str().unwrap_or("?"));
    assert_clean(&app, 0).await;
}

// 3. Two creates booting when the app stops: with the usual grace the in-flight creates may finish
// (their sessions are then removed by the stop); with no grace the stop closes the booting sessions
// under them. Either way nothing is left.
async fn shutdown_during_boot(grace: Duration) -> Vec<Result<u16, String>> {
    let dir = tempfile::Builder::new().prefix("kbt").tempdir_in("/tmp").unwrap();
    let instance = format!("test-sdb-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let _guard = InstanceGuard(instance.clone());
    let mut app = spawn_app_with(AppOptions {
        instance: Some((instance.clone(), dir.path().to_path_buf())),
        shutdown_grace: grace,
        ..Default::default()
    })
    .await;
    // The app's own drop would remove what the stop left behind; the guard does that at the end instead.
    app.cleanup = false;
    let creates: Vec<_> = (0..2)
        .map(|_| {
            let (client, url) = (app.client.clone(), app.url("/v1/sessions"));
            tokio::spawn(async move {
                client
                    .post(url)
                    .json(&json!({"language": "python"}))
                    .send()
                    .await
                    .map(|r| r.status().as_u16())
                    .map_err(|e| e.to_string())
            })
        })
        .collect();
    let booting = eventually(Duration::from_secs(30), || async {
        app.get("/v1/sessions").await.1.as_array().is_some_and(|a| a.len() == 2)
    })
    .await;
    assert!(booting, "both sessions are listed while they boot");
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(30), app.stop()).await.expect("the stop finishes");
    figure(&format!("shutdown_during_boot_grace{}s_ms", grace.as_secs()), started.elapsed().as_millis());
    let mut answers = Vec::new();
    for create in creates {
        // A create answers (an error, or 201 if its kernel was up before the stop) or loses its connection.
        let answer = tokio::time::timeout(Duration::from_secs(10), create).await.expect("the create hangs").unwrap();
        eprintln!("create during shutdown (grace {grace:?}): {answer:?}");
        answers.push(answer);
    }
    assert!(instance_containers(&instance).await.is_empty(), "no container left after the stop");
    assert!(run_dirs(dir.path()).is_empty(), "run dirs left: {:?}", run_dirs(dir.path()));
    answers
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_during_boot_leaves_no_container() {
    shutdown_during_boot(Duration::from_secs(5)).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn shutdown_with_no_grace_cuts_booting_creates_and_leaves_no_container() {
    let answers = shutdown_during_boot(Duration::ZERO).await;
    assert!(answers.iter().all(|a| a != &Ok(201)), "the stop closed the boots under their creates: {answers:?}");
}

// 4.
#[tokio::test(flavor = "multi_thread")]
async fn delete_during_a_slow_restart_is_prompt_and_the_restart_fails() {
    let app = spawn_app().await;
    let id = app.start("java").await;
    let (client, url) = (app.client.clone(), app.url(&format!("/v1/sessions/{id}/restart")));
    let restart = tokio::spawn(async move {
        let r = client.post(url).json(&json!({})).send().await.unwrap();
        let status = r.status().as_u16();
        (status, r.json::<Value>().await.unwrap_or(Value::Null))
    });
    let restarting = eventually(Duration::from_secs(10), || async {
        app.get(&format!("/v1/sessions/{id}")).await.1["status"] == "restarting"
    })
    .await;
    let started = Instant::now();
    let status = app.delete(&format!("/v1/sessions/{id}")).await;
    figure("delete_during_restart_ms", started.elapsed().as_millis());
    figure("delete_during_restart_saw_restarting", restarting);
    assert_eq!(status, 204);
    assert!(app.containers().await.is_empty(), "the container is gone when DELETE returns");
    let (status, body) =
        tokio::time::timeout(Duration::from_secs(30), restart).await.expect("the restart hangs").unwrap();
    eprintln!("restart cut short by DELETE: {status} {body}");
    assert_ne!(status, 200, "a restart cut short by DELETE does not succeed: {body}");
    assert!(body["error"]["code"].is_string(), "a JSON error: {status} {body}");
    assert_clean(&app, 0).await;
}

/// The events of an SSE body: (event name, data).
fn sse_events(text: &str) -> Vec<(String, String)> {
    let text = text.replace("\r\n", "\n");
    text.split("\n\n")
        .filter_map(|block| {
            let mut name = String::from("message");
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    name = v.trim().to_owned();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v).to_owned());
                }
            }
            (!data.is_empty()).then(|| (name, data.join("\n")))
        })
        .collect()
}

// 5.
#[tokio::test(flavor = "multi_thread")]
async fn a_queued_sse_execution_gets_a_killed_result_when_the_session_is_deleted() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    let url = app.url(&format!("/v1/sessions/{id}/execute"));
    let (client, u) = (app.client.clone(), url.clone());
    let running = tokio::spawn(async move {
        let r = client.post(u).json(&json!({"code": "import time; time.sleep(30)"})).send().await.unwrap();
        r.json::<Value>().await.unwrap()
    });
    let busy = eventually(Duration::from_secs(10), || async {
        app.get(&format!("/v1/sessions/{id}")).await.1["status"] == "busy"
    })
    .await;
    assert!(busy);
    let queued = app
        .client
        .post(&url)
        .header("accept", "text/event-stream")
        .json(&json!({"code": "print('never')"}))
        .send()
        .await
        .unwrap();
    assert_eq!(queued.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(app.delete(&format!("/v1/sessions/{id}")).await, 204);
    let text = tokio::time::timeout(Duration::from_secs(30), queued.text()).await.expect("the stream ends").unwrap();
    let events = sse_events(&text);
    let (name, data) = events.last().expect("some event");
    assert_eq!(name, "result", "{text}");
    let result: Value = serde_json::from_str(data).unwrap();
    assert_eq!(result["status"], "killed", "{result}");
    assert_eq!(result["killed_reason"], "session_deleted", "{result}");
    assert!(events.iter().all(|(n, _)| n != "output"), "the queued code never ran: {text}");
    let first = tokio::time::timeout(Duration::from_secs(30), running).await.expect("the running call ends").unwrap();
    assert_eq!(first["status"], "killed", "{first}");
    assert_eq!(first["killed_reason"], "session_deleted", "{first}");
    assert_clean(&app, 0).await;
}

// 6a.
#[tokio::test(flavor = "multi_thread")]
async fn an_abandoned_execution_is_interrupted_and_the_session_keeps_its_state() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    app.exec(&id, "kept = 41").await;
    let impatient = reqwest::Client::builder().timeout(Duration::from_secs(1)).build().unwrap();
    let gone = impatient
        .post(app.url(&format!("/v1/sessions/{id}/execute")))
        .json(&json!({"code": "import time; time.sleep(12)"}))
        .send()
        .await;
    assert!(gone.is_err_and(|e| e.is_timeout()), "the client gave up");
    let started = Instant::now();
    let r = app.exec(&id, "kept + 1").await;
    figure("next_after_abandoned_execution_ms", started.elapsed().as_millis());
    assert_eq!(result_text(&r).as_deref(), Some("42"), "state kept: {r}");
    assert!(started.elapsed() < Duration::from_secs(11), "the abandoned sleep was interrupted, not waited for");
    assert_eq!(app.delete(&format!("/v1/sessions/{id}")).await, 204);
    assert_clean(&app, 0).await;
}

// 6b. A restart that reaches the session while code runs preempts it at once (the execution comes back
// `killed`/`restarted`: documented), so restarts can only queue behind another restart, the one time the
// session's task does not watch its control queue. Those, abandoned while queued, must not run: the kernel's
// pid (sequential in the container's pid namespace, one new kernel process per restart) shows how many ran.
#[tokio::test(flavor = "multi_thread")]
async fn abandoned_restarts_queued_behind_a_restart_do_not_run() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    let pid_code = "import os; os.getpid()";
    let pid = |r: Value| -> u64 { result_text(&r).and_then(|t| t.parse().ok()).unwrap_or_else(|| panic!("{r}")) };
    let restart_url = app.url(&format!("/v1/sessions/{id}/restart"));
    // What one restart costs in pids.
    let p0 = pid(app.exec(&id, pid_code).await);
    assert_eq!(app.client.post(&restart_url).json(&json!({})).send().await.unwrap().status(), 200);
    let p1 = pid(app.exec(&id, pid_code).await);
    let one = p1 - p0;
    assert!(one >= 1);

    let (client, url) = (app.client.clone(), restart_url.clone());
    let patient =
        tokio::spawn(async move { client.post(url).json(&json!({})).send().await.unwrap().status().as_u16() });
    let restarting = eventually(Duration::from_secs(10), || async {
        app.get(&format!("/v1/sessions/{id}")).await.1["status"] == "restarting"
    })
    .await;
    assert!(restarting);
    let impatient = reqwest::Client::builder().timeout(Duration::from_millis(200)).build().unwrap();
    let storm = (0..10).map(|_| impatient.post(&restart_url).json(&json!({})).send());
    let mut refused = 0;
    for answer in futures::future::join_all(storm).await {
        match answer {
            Ok(r) => {
                assert_eq!(r.status(), 429, "only a refusal can answer within 200 ms");
                refused += 1;
            }
            Err(e) => assert!(e.is_timeout(), "{e}"),
        }
    }
    figure("abandoned_restarts_refused_429", refused);
    assert_eq!(patient.await.unwrap(), 200);
    let started = Instant::now();
    let p2 = pid(app.exec(&id, pid_code).await);
    figure("next_after_abandoned_restarts_ms", started.elapsed().as_millis());
    figure("pids_per_restart", one);
    figure("pids_after_patient_and_abandoned_restarts", p2 - p1);
    assert!(p2 - p1 < 2 * one, "only the patient restart ran: {} pids for {one} per restart", p2 - p1);
    assert_eq!(app.delete(&format!("/v1/sessions/{id}")).await, 204);
    assert_clean(&app, 0).await;
}

// 7.
#[tokio::test(flavor = "multi_thread")]
async fn every_output_kind_over_the_cap_stays_within_it() {
    const CAP: usize = 1 << 20;
    let app = spawn_app().await;
    let id = app.start_with(json!({"language": "python", "memory_mb": 2048})).await;
    let cases = [
        ("stream", "print('x' * 5_000_000)"),
        (
            "update_display_data",
            "from IPython.display import display, update_display\nh = display('x', display_id=True)\n[h.update('y' * 3_000_000) for _ in range(5)]",
        ),
        (
            "shared_display_id",
            "from IPython.display import display\n[display('x', display_id='d') for _ in range(40)]\ndisplay('y' * 2_000_000, display_id='d', update=True)",
        ),
        (
            "metadata",
            "from IPython.display import display\n[display({'text/plain': 'a'}, raw=True, metadata={'m': 'x' * 1_000_000}) for _ in range(50)]",
        ),
        ("error", "raise ValueError('x' * 20_000_000)"),
        ("empty_displays", "from IPython.display import display\n[display({}, raw=True) for _ in range(50_000)]\nNone"),
    ];
    for (name, code) in cases {
        let r = app
            .client
            .post(app.url(&format!("/v1/sessions/{id}/execute")))
            .json(&json!({"code": code, "timeout_s": 300}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200, "{name}");
        let body = r.bytes().await.unwrap();
        figure(&format!("cap_ratio_{name}"), format!("{:.4} ({} bytes)", body.len() as f64 / CAP as f64, body.len()));
        let v: Value = serde_json::from_slice(&body).unwrap();
        assert!(body.len() <= CAP + 64 * 1024, "{name}: {} bytes over the cap", body.len());
        assert_eq!(v["truncated"], true, "{name}: status {} stdout {:.200}", v["status"], v["stdout"]);
    }
    assert_eq!(app.delete(&format!("/v1/sessions/{id}")).await, 204);
    assert_clean(&app, 0).await;
}

/// A ServiceProcess of its own instance, with the guard that removes its containers.
async fn service_process(args: &[&str]) -> (ServiceProcess, InstanceGuard, tempfile::TempDir) {
    let dir = tempfile::Builder::new().prefix("kbt").tempdir_in("/tmp").unwrap();
    let instance = format!("test-mem-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let guard = InstanceGuard(instance.clone());
    let mut all = vec!["--insecure-no-auth", "--rate-limit-per-minute", "0"];
    all.extend_from_slice(args);
    let log = dir.path().join("service.log");
    let state = dir.path().join("state");
    std::fs::create_dir_all(&state).unwrap();
    let p = ServiceProcess::start(ProcessOptions { instance: &instance, state_dir: &state, args: &all, env: &[], log })
        .await;
    (p, guard, dir)
}

async fn assert_process_clean(p: &ServiceProcess, guard: &InstanceGuard, dir: &Path) {
    let clean = eventually(Duration::from_secs(20), || async {
        instance_containers(&guard.0).await.is_empty()
            && p.get("/v1/sessions").await.1.as_array().is_some_and(Vec::is_empty)
            && run_dirs(&dir.join("state")).is_empty()
    })
    .await;
    assert!(clean, "left behind: run dirs {:?}", run_dirs(&dir.join("state")));
}

/// Decodes an HTTP/1.1 chunked body (what is complete of it).
fn dechunk(mut body: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = body.windows(2).position(|w| w == b"\r\n") {
        let size = usize::from_str_radix(String::from_utf8_lossy(&body[..pos]).trim(), 16).unwrap_or(0);
        if size == 0 || body.len() < pos + 2 + size {
            break;
        }
        out.extend_from_slice(&body[pos + 2..pos + 2 + size]);
        body = &body[(pos + 4 + size).min(body.len())..];
    }
    out
}

// 8.
#[tokio::test(flavor = "multi_thread")]
async fn a_slow_sse_reader_gets_its_result_and_costs_the_service_little_memory() {
    let (p, guard, dir) = service_process(&[]).await;
    let (status, s) = p.post("/v1/sessions", json!({"language": "python", "memory_mb": 2048})).await;
    assert_eq!(status, 201, "{s}");
    let id = s["id"].as_str().unwrap().to_owned();
    let idle = p.rss_kib();
    p.reset_peak();
    let code = "from IPython.display import display\n[display({'text/plain': str(i)}, raw=True, metadata={'m': 'x' * 1_000_000}) for i in range(80)]\nprint('done')";
    let body = serde_json::to_string(&json!({"code": code, "timeout_s": 300})).unwrap();
    let addr = p.base.trim_start_matches("http://").to_owned();
    let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
    let request = format!(
        "POST /v1/sessions/{id}/execute HTTP/1.1\r\nhost: {addr}\r\naccept: text/event-stream\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.unwrap();
    let mut max_rss = idle;
    for _ in 0..50 {
        tokio::time::sleep(Duration::from_millis(200)).await;
        max_rss = max_rss.max(p.rss_kib());
    }
    let mut bytes = Vec::new();
    tokio::time::timeout(Duration::from_secs(120), stream.read_to_end(&mut bytes))
        .await
        .expect("the stream ends")
        .unwrap();
    let peak = p.peak_kib().max(max_rss);
    figure("slow_reader_rss_growth_mib", format!("{:.1}", (max_rss.saturating_sub(idle)) as f64 / 1024.0));
    figure("slow_reader_peak_over_idle_mib", format!("{:.1}", (peak.saturating_sub(idle)) as f64 / 1024.0));
    let raw = parse_raw(&bytes);
    assert_eq!(raw.status, Some(200), "{}", raw.head);
    let split = bytes.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
    let text = String::from_utf8_lossy(&dechunk(&bytes[split..])).into_owned();
    let events = sse_events(&text);
    let (name, data) = events.last().expect("some event");
    assert_eq!(name, "result", "the stream ends with its result");
    let result: Value = serde_json::from_str(data).unwrap();
    figure("slow_reader_output_events", events.iter().filter(|(n, _)| n == "output").count());
    figure("slow_reader_stream_events_dropped", &result["stream_events_dropped"]);
    assert_eq!(result["status"], "ok", "{:.500}", data);
    assert!(peak.saturating_sub(idle) < 64 * 1024, "the service grew {} KiB for a slow reader", peak - idle);
    let r = p.client.delete(p.url(&format!("/v1/sessions/{id}"))).send().await.unwrap();
    assert_eq!(r.status(), 204);
    assert_process_clean(&p, &guard, dir.path()).await;
}

// 9.
#[tokio::test(flavor = "multi_thread")]
async fn four_huge_outputs_at_once_stay_within_the_memory_bound() {
    let (p, guard, dir) = service_process(&["--max-memory-mb", "4096"]).await;
    let mut ids = Vec::new();
    for _ in 0..4 {
        let (status, s) = p.post("/v1/sessions", json!({"language": "python", "memory_mb": 2500})).await;
        assert_eq!(status, 201, "{s}");
        ids.push(s["id"].as_str().unwrap().to_owned());
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let idle = p.rss_kib();
    p.reset_peak();
    let code = "import sys\nk = get_ipython().kernel\nk.session.send(k.iopub_socket, 'stream', {'name': 'stdout', 'text': 'x' * 600_000_000}, parent=k.get_parent('shell'))\nsys.stdout.write('x' * 150_000_000)\nsys.stdout.flush()";
    let runs: Vec<_> = ids
        .iter()
        .map(|id| {
            let (client, url) = (p.client.clone(), p.url(&format!("/v1/sessions/{id}/execute")));
            tokio::spawn(async move {
                let r = client.post(url).json(&json!({"code": code, "timeout_s": 600})).send().await.unwrap();
                let status = r.status().as_u16();
                let body = r.bytes().await.unwrap();
                (status, body.len(), serde_json::from_slice::<Value>(&body).unwrap_or(Value::Null))
            })
        })
        .collect();
    let mut max_rss = idle;
    let sampler = async {
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            max_rss = max_rss.max(p.rss_kib());
        }
    };
    let all = futures::future::join_all(runs);
    let results = tokio::select! {
        r = all => r,
        _ = sampler => unreachable!(),
    };
    for r in results {
        let (status, len, v) = r.unwrap();
        eprintln!("huge output: {status}, {len} bytes, status {} truncated {}", v["status"], v["truncated"]);
        assert_eq!(status, 200);
        assert!(len <= (1 << 20) + 64 * 1024, "response {len} bytes");
        assert_eq!(v["truncated"], true);
    }
    let peak = p.peak_kib().max(max_rss);
    tokio::time::sleep(Duration::from_secs(5)).await;
    let after = p.rss_kib();
    let mib = |kib: u64| kib as f64 / 1024.0;
    figure("idle_rss_mib", format!("{:.1}", mib(idle)));
    figure("peak_over_idle_mib", format!("{:.1}", mib(peak.saturating_sub(idle))));
    figure("after_over_idle_mib", format!("{:.1}", mib(after.saturating_sub(idle))));
    assert!(peak.saturating_sub(idle) < 256 * 1024, "peak over idle {} KiB", peak - idle);
    assert!(after.saturating_sub(idle) < 32 * 1024, "after over idle {} KiB", after - idle);
    for id in &ids {
        let r = p.client.delete(p.url(&format!("/v1/sessions/{id}"))).send().await.unwrap();
        assert_eq!(r.status(), 204);
    }
    assert_process_clean(&p, &guard, dir.path()).await;
}

// 10.
#[tokio::test(flavor = "multi_thread")]
async fn clear_output_wait_keeps_display_ids_working() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    let r = app
        .exec(
            &id,
            "from IPython.display import display, clear_output\nclear_output(wait=True)\nh = display('a', display_id=True)\nh.update('b')",
        )
        .await;
    let shown: Vec<&str> = r["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["output_type"] == "display_data")
        .filter_map(|o| o["data"]["text/plain"].as_str())
        .collect();
    assert_eq!(shown, vec!["'b'"], "{r}");
    assert_eq!(app.delete(&format!("/v1/sessions/{id}")).await, 204);
    assert_clean(&app, 0).await;
}
