//! Health, readiness, docs, metrics, and the error shape for every kind of client mistake.

use serde_json::json;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread")]
async fn health_readiness_docs_and_metrics_answer() {
    let app = spawn_app().await;
    assert_eq!(app.get("/healthz").await, (200, json!({"status": "ok"})));
    let (status, ready) = app.get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["ready"], true);

    let (status, spec) = app.get("/openapi.json").await;
    assert_eq!(status, 200);
    for path in ["/v1/sessions", "/v1/sessions/{id}/execute", "/v1/sessions/{id}/restart", "/v1/languages"] {
        assert!(spec["paths"][path].is_object(), "the OpenAPI document describes {path}");
    }
    let docs = app.client.get(app.url("/docs/")).send().await.unwrap();
    assert_eq!(docs.status(), 200);
    assert!(docs.text().await.unwrap().contains("swagger"), "the docs page is served from the binary");

    let id = app.start("python").await;
    app.exec(&id, "1+1").await;
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("kernelbox_executions_total"), "{metrics}");
    assert!(metrics.contains("kernelbox_sessions{"), "{metrics}");
    assert!(metrics.contains("kernelbox_container_starts_total"), "{metrics}");
    assert_eq!(app.delete(&format!("/v1/sessions/{id}")).await, 204);
}

#[tokio::test(flavor = "multi_thread")]
async fn client_mistakes_get_a_4xx_with_a_json_error() {
    let app = spawn_app().await;
    let (status, v) = app.post("/v1/sessions", json!({"language": "cobol"})).await;
    assert_eq!(status, 422);
    assert_error_shape(&v, "unknown_language");

    let (status, v) = app.post("/v1/sessions", json!({"language": "python", "memory_mb": 1_000_000})).await;
    assert_eq!(status, 422, "more memory than the operator allows is refused, not lowered");
    assert_error_shape(&v, "invalid_request");
    let (status, v) = app.post("/v1/sessions", json!({"language": "python", "cpus": 64})).await;
    assert_eq!(status, 422);
    assert_error_shape(&v, "invalid_request");
    let (status, v) = app.post("/v1/sessions", json!({"language": "python", "env": {"1BAD": "x"}})).await;
    assert_eq!(status, 422);
    assert_error_shape(&v, "invalid_request");

    let (status, v) = app.post("/v1/sessions", json!({"lang": "python"})).await;
    assert_eq!(status, 400);
    assert_error_shape(&v, "invalid_json");
    let r = app
        .client
        .post(app.url("/v1/sessions"))
        .header("content-type", "application/json")
        .body("{not json")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 400);
    assert_error_shape(&r.json().await.unwrap(), "invalid_json");
    let r = app.client.post(app.url("/v1/sessions")).body("language=python").send().await.unwrap();
    assert_eq!(r.status(), 415);
    assert_error_shape(&r.json().await.unwrap(), "unsupported_media_type");

    for path in ["/v1/sessions/nope", "/v1/sessions/0123456789abcdef01234567", "/v1/nothing-here"] {
        let (status, v) = app.get(path).await;
        assert_eq!(status, 404, "{path}");
        assert_error_shape(&v, "not_found");
    }
    let (status, v) = app.post("/v1/sessions/0123456789abcdef01234567/execute", json!({"code": "1"})).await;
    assert_eq!(status, 404);
    assert_error_shape(&v, "not_found");
    let r = app.client.put(app.url("/v1/sessions")).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_error_shape(&r.json().await.unwrap(), "method_not_allowed");
}

#[tokio::test(flavor = "multi_thread")]
async fn api_keys_guard_the_api_and_sessions_belong_to_their_key() {
    let app = spawn_app_with(AppOptions { api_keys: vec!["key-a".into(), "key-b".into()], ..Default::default() }).await;
    let (status, v) = app.get("/v1/sessions").await;
    assert_eq!(status, 401);
    assert_error_shape(&v, "unauthorized");
    let wrong = app.client.get(app.url("/v1/sessions")).bearer_auth("key-c").send().await.unwrap();
    assert_eq!(wrong.status(), 401);
    assert_eq!(app.get("/healthz").await.0, 200, "health needs no key");

    let id = app.start_as("key-a", "python").await;

    let mine =
        app.client.get(app.url(&format!("/v1/sessions/{id}"))).header("x-api-key", "key-a").send().await.unwrap();
    assert_eq!(mine.status(), 200);
    let theirs = app.client.get(app.url(&format!("/v1/sessions/{id}"))).bearer_auth("key-b").send().await.unwrap();
    assert_eq!(theirs.status(), 404, "another key's session does not exist for you");
    let run = app
        .client
        .post(app.url(&format!("/v1/sessions/{id}/execute")))
        .bearer_auth("key-b")
        .json(&json!({"code": "1"}))
        .send()
        .await
        .unwrap();
    assert_eq!(run.status(), 404);
    let list_b: serde_json::Value =
        app.client.get(app.url("/v1/sessions")).bearer_auth("key-b").send().await.unwrap().json().await.unwrap();
    assert_eq!(list_b, json!([]));
    let del = app.client.delete(app.url(&format!("/v1/sessions/{id}"))).bearer_auth("key-a").send().await.unwrap();
    assert_eq!(del.status(), 204);
}

/// Docker going away mid-run is a 503 that says so, not a 500 or a hang. (An in-memory runtime stands in
/// for the engine here: stopping the real one would take every other test down with it.)
#[tokio::test(flavor = "multi_thread")]
async fn docker_unreachable_is_a_503_that_says_so() {
    use kernelbox::runtime::fake::FakeRuntime;
    use std::sync::Arc;
    let runtime = Arc::new(FakeRuntime::new());
    let tmp = tempfile::Builder::new().prefix("kbf").tempdir_in("/tmp").unwrap();
    let settings = kernelbox::Settings {
        manager: kernelbox::session::ManagerConfig {
            limits: limits(&[]).validate().unwrap(),
            state_dir: tmp.path().to_path_buf(),
            instance: "fake".into(),
            catalog: kernelbox::images::Catalog::new(PREFIX),
            keep_sessions: false,
            packages: kernelbox::packages::PackageConfig::default(),
            storage: Default::default(),
            pool: Default::default(),
            node: None,
            fencing: None,
            egress: None,
        },
        api_keys: vec![],
        http: http(&[]).validate().unwrap(),
        files: files_store(&[]).validate().unwrap(),
        links: signed_urls(&[]).validate().unwrap(),
        shutdown_grace: std::time::Duration::from_secs(1),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = kernelbox::Application::build(listener, settings, runtime.clone()).await.unwrap();
    let base = format!("http://{}", app.local_addr().unwrap());
    let stop = tokio_util::sync::CancellationToken::new();
    let server = tokio::spawn(app.run_until_stopped(stop.clone()));
    let http = reqwest::Client::new();

    runtime.set_down(true);
    let r = http.post(format!("{base}/v1/sessions")).json(&json!({"language": "python"})).send().await.unwrap();
    assert_eq!(r.status(), 503);
    let body: serde_json::Value = r.json().await.unwrap();
    assert_error_shape(&body, "docker_unavailable");
    assert!(body["error"]["message"].as_str().unwrap().contains("Docker"), "{body}");
    let ready = http.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(ready.status(), 503);
    assert_eq!(ready.json::<serde_json::Value>().await.unwrap()["docker"], false);
    assert_eq!(http.get(format!("{base}/healthz")).send().await.unwrap().status(), 200, "the process is alive");

    runtime.set_down(false);
    let r = http.post(format!("{base}/v1/sessions")).json(&json!({"language": "python"})).send().await.unwrap();
    assert_eq!(r.status(), 503, "no image built in this runtime");
    assert_error_shape(&r.json().await.unwrap(), "image_missing");
    stop.cancel();
    server.await.unwrap().unwrap();
}
