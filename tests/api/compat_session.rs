//! The session API (paths at the root), driven as its README does: forms where it sends forms (`curl -F`,
//! so multipart/form-data), JSON where it sends JSON; exact response shapes; errors as `{"detail": ...}`.

use serde_json::{Value, json};

use crate::helpers::*;

/// A form as `curl -F "user_id=..."` sends it: multipart/form-data, curl's boundary style.
pub async fn post_form(app: &TestApp, path: &str, fields: &[(&str, &str)]) -> (u16, Value) {
    post_form_with(app, path, fields, None).await
}

pub async fn post_form_with(app: &TestApp, path: &str, fields: &[(&str, &str)], key: Option<&str>) -> (u16, Value) {
    let boundary = "------------------------d74496d66958873e";
    let mut body = String::new();
    for (name, value) in fields {
        body.push_str(&format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"));
    }
    body.push_str(&format!("--{boundary}--\r\n"));
    let mut request = app
        .client
        .post(app.url(path))
        .header("content-type", format!("multipart/form-data; boundary={boundary}"))
        .body(body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    json_of(request.send().await.expect("request")).await
}

/// `-H "Content-Type: application/json" -d '...'`.
pub async fn post_json_with(app: &TestApp, path: &str, body: Value, key: Option<&str>) -> (u16, Value) {
    let mut request = app.client.post(app.url(path)).json(&body);
    if let Some(key) = key {
        request = request.header("x-api-key", key);
    }
    json_of(request.send().await.expect("request")).await
}

async fn json_of(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
}

async fn execute(app: &TestApp, user: &str, code: &str) -> (u16, Value) {
    post_json_with(app, "/execute", json!({"user_id": user, "code": code}), None).await
}

/// `{"detail": "<non-empty text>"}` and nothing else.
pub fn assert_detail(status: u16, v: &Value, expected_status: u16) -> String {
    assert_eq!(status, expected_status, "{v}");
    let detail = v["detail"].as_str().unwrap_or_else(|| panic!("no detail string: {v}"));
    assert!(!detail.is_empty() && v.as_object().unwrap().len() == 1, "{v}");
    detail.to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn compat_session_api_as_its_readme_shows() {
    let app = spawn_app_with(AppOptions { limits: limits(&["--default-timeout-s", "10"]), ..Default::default() }).await;

    // 1. Start a session.
    let (status, v) = post_form(&app, "/start_session", &[("user_id", "user_test")]).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(
        v,
        json!({"message": "Session started successfully",
            "notebook_path": "/mnt/jupyter_sessions/user_test/notebook_user_test.ipynb"})
    );
    let containers = app.containers().await;
    assert_eq!(containers.len(), 1);
    let container = containers[0].id.clone();

    // 2. Execute code: the README's example, then state kept across calls.
    let r = app
        .client
        .post(app.url("/execute"))
        .header("Content-Type", "application/json")
        .body("{\n        \"user_id\": \"user_test\",\n        \"code\": \"print(\\\"Hello, World!\\\")\"\n    }")
        .send()
        .await
        .unwrap();
    let (status, v) = json_of(r).await;
    assert_eq!((status, v), (200, json!({"output": "Hello, World!\n"})));
    // The service keeps the user's notebook where `notebook_path` says, under its notebooks folder.
    let notebook = app.manager.notebooks_dir().join("user_test/notebook_user_test.ipynb");
    let has_cell = || async {
        std::fs::read_to_string(&notebook).is_ok_and(|n| n.contains("Hello, World!") && n.contains("nbformat"))
    };
    assert!(eventually(std::time::Duration::from_secs(10), has_cell).await, "{}", notebook.display());
    assert_eq!(execute(&app, "user_test", "x = 41").await, (200, json!({"output": ""})));
    assert_eq!(execute(&app, "user_test", "print('a'); x + 1").await, (200, json!({"output": "a\n42\n"})));

    // Starting again keeps the same session, container and state.
    let (status, again) = post_form(&app, "/start_session", &[("user_id", "user_test")]).await;
    assert_eq!((status, &again), (200, &v_start()));
    let now = app.containers().await;
    assert_eq!(now.len(), 1);
    assert_eq!(now[0].id, container, "the same container");
    assert_eq!(execute(&app, "user_test", "x").await, (200, json!({"output": "41\n"})));

    // An error in the code: 400 with the traceback (no terminal colours); a timeout: 408, state kept.
    let (status, v) = execute(&app, "user_test", "1/0").await;
    let detail = assert_detail(status, &v, 400);
    assert!(detail.contains("ZeroDivisionError") && !detail.contains('\u{1b}'), "{detail}");
    let (status, v) = execute(&app, "user_test", "import time\ntime.sleep(30)").await;
    let detail = assert_detail(status, &v, 408);
    assert!(detail.contains("timed out"), "{detail}");
    assert_eq!(execute(&app, "user_test", "x").await, (200, json!({"output": "41\n"})), "the session survives");

    // 3. Install a package (fetched by the service; the session has no network) and import it.
    let (status, v) =
        post_json_with(&app, "/install_package", json!({"user_id": "user_test", "package_name": "requests"}), None)
            .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v["message"], "Successfully installed and imported requests", "{v}");
    assert_eq!(execute(&app, "user_test", "import requests\nprint(requests.__name__)").await.1["output"], "requests\n");
    let (status, v) =
        post_json_with(&app, "/install_package", json!({"user_id": "user_test", "package_name": "--pre"}), None).await;
    assert_detail(status, &v, 422);

    // 4. Reset: state gone, session and container kept (an urlencoded form works too).
    let r = app
        .client
        .post(app.url("/reset"))
        .header("content-type", "application/x-www-form-urlencoded")
        .body("user_id=user_test")
        .send()
        .await
        .unwrap();
    assert_eq!(json_of(r).await, (200, json!({"message": "Kernel reset successful"})));
    let (status, v) = execute(&app, "user_test", "x").await;
    assert!(assert_detail(status, &v, 400).contains("NameError"), "{v}");
    assert_eq!(app.containers().await[0].id, container);

    // 5. End the session: its container goes; the user has no session any more.
    let (status, v) = post_form(&app, "/end_session", &[("user_id", "user_test")]).await;
    assert_eq!((status, v), (200, json!({"message": "Session ended successfully"})));
    assert!(eventually(std::time::Duration::from_secs(30), || async { app.containers().await.is_empty() }).await);
    let (status, v) = execute(&app, "user_test", "1").await;
    assert!(assert_detail(status, &v, 404).contains("start_session"), "{v}");
    let (status, v) = post_form(&app, "/end_session", &[("user_id", "user_test")]).await;
    assert_detail(status, &v, 404);
    let (status, v) = post_form(&app, "/reset", &[("user_id", "user_test")]).await;
    assert_detail(status, &v, 404);
}

fn v_start() -> Value {
    json!({"message": "Session started successfully",
        "notebook_path": "/mnt/jupyter_sessions/user_test/notebook_user_test.ipynb"})
}

#[tokio::test(flavor = "multi_thread")]
async fn compat_session_user_ids_are_checked_and_every_error_has_the_detail_shape() {
    let app = spawn_app_with(AppOptions { api_keys: vec!["k1".into()], images: false, ..Default::default() }).await;
    let long = "x".repeat(65);
    for bad in ["", ".hidden", "..", "../etc", "a/b", "a b", "été", long.as_str()] {
        let (status, v) = post_form_with(&app, "/start_session", &[("user_id", bad)], Some("k1")).await;
        assert!(assert_detail(status, &v, 422).contains("user_id"), "{bad:?}: {v}");
        let (status, v) = post_json_with(&app, "/execute", json!({"user_id": bad, "code": "1"}), Some("k1")).await;
        assert_detail(status, &v, 422);
    }
    // A form larger than a user id needs (64 KiB) is refused before it is parsed.
    let big = "x".repeat(100 * 1024);
    let (status, v) = post_form_with(&app, "/start_session", &[("user_id", big.as_str())], Some("k1")).await;
    assert_detail(status, &v, 413);
    // A missing field, a body that is not a form, JSON that is not the operation's.
    let (status, v) = post_form_with(&app, "/start_session", &[("user", "u")], Some("k1")).await;
    assert!(assert_detail(status, &v, 422).contains("user_id"), "{v}");
    let (status, v) = post_json_with(&app, "/start_session", json!({"user_id": "u"}), Some("k1")).await;
    assert_detail(status, &v, 415);
    let (status, v) = post_json_with(&app, "/execute", json!({"user_id": "u"}), Some("k1")).await;
    assert_detail(status, &v, 422);
    // No session yet: 404 for each operation on one.
    let (status, v) = post_json_with(&app, "/execute", json!({"user_id": "u", "code": "1"}), Some("k1")).await;
    assert_detail(status, &v, 404);
    let (status, v) =
        post_json_with(&app, "/install_package", json!({"user_id": "u", "package_name": "x"}), Some("k1")).await;
    assert_detail(status, &v, 404);
    // Without the key: 401, in the same shape; a wrong method too.
    let (status, v) = post_form(&app, "/start_session", &[("user_id", "u")]).await;
    assert_detail(status, &v, 401);
    let r = app.client.get(app.url("/execute")).send().await.unwrap();
    let (status, v) = json_of(r).await;
    assert_eq!(status, 405, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn compat_session_one_per_user_and_key_found_again_after_a_restart_with_adoption() {
    let shared = SharedInstance::new("compat");
    let keys = || vec!["alpha".to_owned(), "beta".to_owned()];

    let mut first = spawn_app_with(AppOptions {
        keep_sessions: true,
        instance: shared.options(),
        api_keys: keys(),
        ..Default::default()
    })
    .await;
    let (alpha, beta) = (Some("alpha"), Some("beta"));
    // Two starts at once for one user and key end with one session.
    let (a, b) = tokio::join!(
        post_form_with(&first, "/start_session", &[("user_id", "shared")], alpha),
        post_form_with(&first, "/start_session", &[("user_id", "shared")], alpha),
    );
    assert_eq!((a.0, b.0), (200, 200), "{a:?} {b:?}");
    assert_eq!(post_form_with(&first, "/start_session", &[("user_id", "shared")], beta).await.0, 200);
    assert!(
        eventually(std::time::Duration::from_secs(30), || async { first.containers().await.len() == 2 }).await,
        "one session per user id and API key"
    );
    let run = |app: &TestApp, key: Option<&'static str>, code: &'static str| {
        let app_url = app.url("/execute");
        let client = app.client.clone();
        async move {
            let r = client
                .post(app_url)
                .header("x-api-key", key.unwrap())
                .json(&json!({"user_id": "shared", "code": code}))
                .send()
                .await
                .unwrap();
            json_of(r).await
        }
    };
    assert_eq!(run(&first, alpha, "secret = 'alpha'").await.0, 200);
    let (status, v) = run(&first, beta, "secret").await;
    assert!(assert_detail(status, &v, 400).contains("NameError"), "another key's session is another session");

    first.cleanup = false;
    first.stop().await;
    let second =
        spawn_app_with(AppOptions { instance: shared.options(), api_keys: keys(), ..Default::default() }).await;
    let before: Vec<String> = instance_containers(&shared.name).await.into_iter().map(|c| c.id).collect();
    assert_eq!(post_form_with(&second, "/start_session", &[("user_id", "shared")], alpha).await.0, 200);
    assert_eq!(run(&second, alpha, "secret").await, (200, json!({"output": "'alpha'\n"})), "found after adoption");
    let after: Vec<String> = instance_containers(&shared.name).await.into_iter().map(|c| c.id).collect();
    assert_eq!(before.len(), 2);
    assert_eq!(after, before, "no new container");
}
