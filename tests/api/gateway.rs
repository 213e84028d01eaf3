//! The Jupyter Kernel Gateway's REST API as a Jupyter server calls it (`Authorization: token <key>`):
//! kernelspecs, start, list, get, interrupt, restart, delete; a kernel is a session of its key; `python3`,
//! Jupyter's own name for Python, is the python language under that name.

use serde_json::{Value, json};

use crate::helpers::*;

async fn call(app: &TestApp, method: reqwest::Method, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    let mut request = app.client.request(method, app.url(path)).header("authorization", format!("token {key}"));
    if let Some(body) = body {
        request = request.json(&body);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    (status, response.json().await.unwrap_or(Value::Null))
}

#[tokio::test(flavor = "multi_thread")]
async fn a_jupyter_server_lists_specs_and_starts_interrupts_restarts_and_ends_a_kernel() {
    let app = spawn_app_with(AppOptions { api_keys: vec!["gw-a".into(), "gw-b".into()], ..Default::default() }).await;
    use reqwest::Method as M;
    let (status, v) = call(&app, M::GET, "/api", "gw-a", None).await;
    assert_eq!((status, v["version"].is_string()), (200, true), "{v}");
    let (status, _) = call(&app, M::GET, "/api/kernels", "nobody", None).await;
    assert_eq!(status, 401);

    let (_, specs) = call(&app, M::GET, "/api/kernelspecs", "gw-a", None).await;
    assert_eq!(specs["default"], "python3", "Jupyter's own default name");
    let specs = specs["kernelspecs"].as_object().unwrap();
    for name in ["python3", "python", "python_scientific", "javascript", "typescript", "java", "bash"] {
        assert_eq!(specs[name]["name"], name);
        assert!(specs[name]["spec"]["display_name"].is_string(), "{name}");
        assert!(specs[name]["spec"]["language"].is_string(), "{name}");
    }
    assert_eq!(specs["python3"]["spec"]["language"], "python");

    let (status, kernel) =
        call(&app, M::POST, "/api/kernels", "gw-a", Some(json!({"name": "python", "env": {"KERNEL_USERNAME": "me"}})))
            .await;
    assert_eq!(status, 201, "{kernel}");
    let id = kernel["id"].as_str().unwrap().to_owned();
    assert_eq!(id.split('-').map(str::len).collect::<Vec<_>>(), [8, 4, 4, 4, 12], "UUID-shaped: {id}");
    assert_eq!(kernel["name"], "python");
    assert_eq!(kernel["execution_state"], "idle");

    let (_, kernels) = call(&app, M::GET, "/api/kernels", "gw-a", None).await;
    assert!(kernels.as_array().unwrap().iter().any(|k| k["id"] == id.as_str()));
    let (_, theirs) = call(&app, M::GET, "/api/kernels", "gw-b", None).await;
    assert_eq!(theirs, json!([]), "another key sees none of them");
    let (status, _) = call(&app, M::GET, &format!("/api/kernels/{id}"), "gw-b", None).await;
    assert_eq!(status, 404);
    let (status, _) = call(&app, M::DELETE, &format!("/api/kernels/{id}"), "gw-b", None).await;
    assert_eq!(status, 404);

    let (status, _) = call(&app, M::POST, &format!("/api/kernels/{id}/interrupt"), "gw-a", None).await;
    assert_eq!(status, 204);
    let (status, restarted) = call(&app, M::POST, &format!("/api/kernels/{id}/restart"), "gw-a", None).await;
    assert_eq!((status, restarted["id"].as_str()), (200, Some(id.as_str())), "{restarted}");
    let (status, _) = call(&app, M::DELETE, &format!("/api/kernels/{id}"), "gw-a", None).await;
    assert_eq!(status, 204);
    let (status, _) = call(&app, M::GET, &format!("/api/kernels/{id}"), "gw-a", None).await;
    assert_eq!(status, 404);
    assert!(app.containers().await.is_empty(), "its container is gone");
}

#[tokio::test(flavor = "multi_thread")]
async fn python3_starts_a_python_kernel_reported_as_python3() {
    let app = spawn_app_with(AppOptions { api_keys: vec!["gw-py3".into()], ..Default::default() }).await;
    use reqwest::Method as M;
    let (status, kernel) = call(&app, M::POST, "/api/kernels", "gw-py3", Some(json!({"name": "python3"}))).await;
    assert_eq!(status, 201, "{kernel}");
    assert_eq!(kernel["name"], "python3");
    let id = kernel["id"].as_str().unwrap().to_owned();
    let (_, got) = call(&app, M::GET, &format!("/api/kernels/{id}"), "gw-py3", None).await;
    assert_eq!(got["name"], "python3", "{got}");
    let (_, listed) = call(&app, M::GET, "/api/kernels", "gw-py3", None).await;
    assert_eq!(listed.as_array().unwrap().iter().find(|k| k["id"] == id.as_str()).unwrap()["name"], "python3");

    // It is the python language: its session says so, and it runs Python 3.
    let session = id.replace('-', "")[..24].to_owned();
    let r = app.client.get(app.url(&format!("/v1/sessions/{session}"))).bearer_auth("gw-py3").send().await.unwrap();
    let info: Value = r.json().await.unwrap();
    assert_eq!(info["language"], "python", "{info}");
    assert_eq!(info["kernel"]["language"], "python", "{info}");
    let r = app
        .client
        .post(app.url(&format!("/v1/sessions/{session}/execute")))
        .bearer_auth("gw-py3")
        .json(&json!({"code": "import sys\nprint(sys.version_info[0], 6 * 7)"}))
        .send()
        .await
        .unwrap();
    let v: Value = r.json().await.unwrap();
    assert_eq!(v["stdout"], "3 42\n", "{v}");
    // A restart keeps the name.
    let (status, restarted) = call(&app, M::POST, &format!("/api/kernels/{id}/restart"), "gw-py3", None).await;
    assert_eq!((status, &restarted["name"]), (200, &json!("python3")), "{restarted}");
    let (status, _) = call(&app, M::DELETE, &format!("/api/kernels/{id}"), "gw-py3", None).await;
    assert_eq!(status, 204);
    assert!(app.containers().await.is_empty(), "its container is gone");
}
