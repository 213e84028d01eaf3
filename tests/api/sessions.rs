//! Starting, listing, inspecting and ending sessions, and the server-wide maximums.

use serde_json::json;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread")]
async fn a_session_is_created_listed_inspected_and_deleted() {
    let app = spawn_app().await;
    let (status, s) = app
        .post("/v1/sessions", json!({"language": "python", "memory_mb": 256, "cpus": 0.5, "timeout_s": 30, "idle_timeout_s": 600, "metadata": {"user": "u1"}}))
        .await;
    assert_eq!(status, 201, "{s}");
    let id = s["id"].as_str().unwrap();
    assert_eq!(s["language"], "python");
    assert_eq!(s["status"], "idle");
    assert_eq!(s["limits"]["memory_mb"], 256);
    assert_eq!(s["limits"]["cpus"], 0.5);
    assert_eq!(s["limits"]["timeout_s"], 30);
    assert_eq!(s["limits"]["idle_timeout_s"], 600);
    assert_eq!(s["metadata"], json!({"user": "u1"}));
    assert!(s["created_at"].is_string() && s["last_used_at"].is_string());

    let (status, got) = app.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(status, 200);
    assert_eq!(got["id"], s["id"]);
    let (_, list) = app.get("/v1/sessions").await;
    assert_eq!(list.as_array().unwrap().len(), 1);
    assert_eq!(app.containers().await.len(), 1, "one container per session");

    assert_eq!(app.delete(&format!("/v1/sessions/{id}")).await, 204);
    assert_eq!(app.get(&format!("/v1/sessions/{id}")).await.0, 404);
    assert_eq!(app.delete(&format!("/v1/sessions/{id}")).await, 404);
    assert!(app.containers().await.is_empty(), "deleting a session removes its container");
    assert!(!app.state_dir.join("sessions").join(id).exists(), "and its socket directory");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_session_maximums_are_enforced_with_429() {
    let app = spawn_app_with(AppOptions {
        limits: limits(&["--max-sessions-per-owner", "1", "--max-sessions", "2"]),
        api_keys: vec!["a".into(), "b".into(), "c".into()],
        ..Default::default()
    })
    .await;
    let start = |key: &'static str| {
        let app = &app;
        async move {
            let r = app
                .client
                .post(app.url("/v1/sessions"))
                .bearer_auth(key)
                .json(&json!({"language": "bash"}))
                .send()
                .await
                .unwrap();
            (r.status().as_u16(), r.json::<serde_json::Value>().await.unwrap())
        }
    };
    assert_eq!(start("a").await.0, 201);
    let (status, v) = start("a").await;
    assert_eq!(status, 429, "per-owner maximum");
    assert_error_shape(&v, "too_many_sessions");
    assert_eq!(start("b").await.0, 201);
    let (status, v) = start("c").await;
    assert_eq!(status, 429, "server-wide maximum");
    assert!(v["error"]["message"].as_str().unwrap().contains("maximum"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_memory_and_cpus_all_sessions_hold_together_are_bounded_with_429() {
    let app = spawn_app_with(AppOptions {
        limits: limits(&["--max-memory-mb", "1024", "--max-total-memory-mb", "1536", "--max-total-cpus", "2"]),
        ..Default::default()
    })
    .await;
    let start = |memory_mb: u64, cpus: f64| {
        let app = &app;
        async move {
            let body = json!({"language": "bash", "memory_mb": memory_mb, "cpus": cpus});
            app.post("/v1/sessions", body).await
        }
    };
    let (status, first) = start(1024, 1.0).await;
    assert_eq!(status, 201, "{first}");
    let (status, v) = start(1024, 0.5).await;
    assert_eq!(status, 429, "1024 + 1024 MiB is past the 1536 the sessions may hold together: {v}");
    assert_error_shape(&v, "too_many_sessions");
    assert!(v["error"]["message"].as_str().unwrap().contains("MiB"), "{v}");
    let (status, v) = start(512, 1.5).await;
    assert_eq!(status, 429, "1 + 1.5 CPUs is past the 2 the sessions may hold together: {v}");
    assert!(v["error"]["message"].as_str().unwrap().contains("CPUs"), "{v}");
    let (status, v) = start(512, 1.0).await;
    assert_eq!(status, 201, "exactly full fits: {v}");
    // Room comes back when a session ends.
    assert_eq!(app.delete(&format!("/v1/sessions/{}", first["id"].as_str().unwrap())).await, 204);
    let (status, v) = start(1024, 1.0).await;
    assert_eq!(status, 201, "{v}");
}
