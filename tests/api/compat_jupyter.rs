//! The `/jupyter` API, driven as its README does (JSON bodies, `requests.post(..., json=...)`): kernel
//! specs, one-shot executions in every language it offers, files written and images displayed coming back
//! as files, uploaded files with their lifetimes and owners, the health checks; exact response shapes.

use std::time::Duration;

use base64::Engine;
use serde_json::{Value, json};

use crate::compat_session::{assert_detail, post_json_with};
use crate::helpers::*;

async fn put_json(app: &TestApp, path: &str, body: Value, key: Option<&str>) -> (u16, Value) {
    let mut request = app.client.put(app.url(path)).json(&body);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let r = request.send().await.expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

async fn get_url(app: &TestApp, url: &str, key: Option<&str>) -> reqwest::Response {
    let mut request = app.client.get(url);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    request.send().await.expect("request")
}

async fn execute(app: &TestApp, body: Value, key: Option<&str>) -> Value {
    let (status, v) = post_json_with(app, "/jupyter/execute", body, key).await;
    assert_eq!(status, 200, "{v}");
    let keys: Vec<&String> = v.as_object().unwrap().keys().collect();
    assert_eq!(keys, ["error", "files", "output", "stacktrace", "timedout"], "the original's shape: {v}");
    v
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(bytes)
}

/// The stored file's name: the last part of its URL.
fn name_of(url: &str) -> &str {
    url.rsplit('/').next().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn compat_jupyter_kernel_specs_and_health() {
    let app = spawn_app_with(AppOptions { api_keys: vec!["k1".into()], ..Default::default() }).await;
    let (status, specs) = app.get("/jupyter/list_kernel_specs").await;
    assert_detail(status, &specs, 401);
    let r = get_url(&app, &app.url("/jupyter/list_kernel_specs"), Some("k1")).await;
    assert_eq!(r.status(), 200);
    let specs: Value = r.json().await.unwrap();
    let names: Vec<&String> = specs.as_object().unwrap().keys().collect();
    assert_eq!(names, ["bash", "java", "javascript", "python", "python_scientific", "typescript"], "{specs}");
    for (name, entry) in specs.as_object().unwrap() {
        assert_eq!(entry["name"], name.as_str());
        assert!(entry["resource_dir"].is_string(), "{entry}");
        let spec = &entry["spec"];
        assert!(spec["display_name"].as_str().is_some_and(|d| !d.is_empty()), "{entry}");
        assert!(spec["argv"].is_array() && spec["env"].is_object() && spec["metadata"].is_object(), "{entry}");
    }
    assert_eq!(specs["python"]["spec"]["language"], "python");
    assert_eq!(specs["typescript"]["spec"]["language"], "typescript");
    assert_eq!(specs["bash"]["spec"]["language"], "bash");
    // The health checks need no key.
    for path in ["/health", "/jupyter/health"] {
        assert_eq!(app.get(path).await, (200, json!({"status": "ok"})), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn compat_jupyter_execute_in_every_language_it_offers() {
    let app = spawn_app().await;
    // The README's Quick Start, verbatim.
    let v = execute(
        &app,
        json!({"code": "print('Hello, World!')", "execution_environment": "python", "timeout": 10}),
        None,
    )
    .await;
    assert_eq!(
        v,
        json!({"output": "Hello, World!\n", "error": null, "timedout": false, "files": null, "stacktrace": null})
    );
    let hello = [
        ("python_scientific", "import numpy as np\nprint('Hello, World!')"),
        ("javascript", "console.log('Hello, World!')"),
        ("typescript", "const greeting: string = 'Hello, World!';\nconsole.log(greeting)"),
        ("java", "System.out.println(\"Hello, World!\");"),
        ("bash", "echo 'Hello, World!'"),
    ];
    for (language, code) in hello {
        let v = execute(&app, json!({"code": code, "execution_environment": language, "timeout": 60}), None).await;
        assert_eq!(v["output"], "Hello, World!\n", "{language}: {v}");
        assert_eq!(
            (&v["error"], &v["timedout"], &v["files"]),
            (&Value::Null, &json!(false), &Value::Null),
            "{language}"
        );
    }
    // The README's scientific example: code indented as a whole runs as meant; `packages` are installed
    // first (numpy is in the image already: nothing to fetch), and an uninstallable one is the `error`.
    let readme = "\n    import numpy as np\n    arr = np.array([1, 2, 3])\n    print(arr.mean())\n    ";
    let v = execute(
        &app,
        json!({"code": readme, "execution_environment": "python_scientific", "packages": ["numpy"], "timeout": 30}),
        None,
    )
    .await;
    assert_eq!((&v["output"], &v["error"]), (&json!("2.0\n"), &Value::Null), "{v}");
    let v = execute(
        &app,
        json!({"code": readme, "execution_environment": "python", "packages": ["--index-url=http://x"], "timeout": 30}),
        None,
    )
    .await;
    assert!(v["error"].as_str().is_some_and(|e| e.contains("--index-url")), "{v}");
    let v =
        execute(&app, json!({"code": readme, "execution_environment": "python_scientific", "timeout": 30}), None).await;
    assert_eq!(v["output"], "2.0\n", "{v}");

    // An error in the code, and a timeout.
    let v =
        execute(&app, json!({"code": "print('before')\n1/0", "execution_environment": "python", "timeout": 10}), None)
            .await;
    assert_eq!(v["output"], "before\n");
    assert_eq!(v["error"], "ZeroDivisionError: division by zero");
    let stack = v["stacktrace"].as_str().unwrap();
    assert!(stack.contains("ZeroDivisionError") && !stack.contains('\u{1b}'), "{stack}");
    let v = execute(
        &app,
        json!({"code": "import time\ntime.sleep(30)", "execution_environment": "python", "timeout": 2}),
        None,
    )
    .await;
    assert_eq!(v["timedout"], true, "{v}");
    // An unknown environment.
    let (status, v) =
        post_json_with(&app, "/jupyter/execute", json!({"code": "1", "execution_environment": "cobol"}), None).await;
    assert_detail(status, &v, 422);

    // Every request's session is gone afterwards.
    assert!(eventually(Duration::from_secs(30), || async { app.containers().await.is_empty() }).await);
    assert!(app.manager.list(&kernelbox::session::Owner("anonymous".into())).is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn compat_jupyter_written_files_and_displayed_images_come_back_as_files() {
    let app = spawn_app().await;
    let code = r#"
        import matplotlib.pyplot as plt
        import os
        plt.plot([1, 2, 3], [1, 4, 9])
        plt.show()
        open('out.csv', 'w').write('a,b\n1,2\n')
        os.makedirs('sub', exist_ok=True)
        open('sub/notes.txt', 'w').write('notes')
        print('written')
    "#;
    let v = execute(&app, json!({"code": code, "execution_environment": "python", "timeout": 60}), None).await;
    assert_eq!(v["error"], Value::Null, "{v}");
    assert_eq!(v["output"], "written\n", "no stand-in text for the figure: {v}");
    let files = v["files"].as_array().unwrap_or_else(|| panic!("files: {v}"));
    let mut names: Vec<&str> = files.iter().map(|f| f["filename"].as_str().unwrap()).collect();
    names.sort();
    assert_eq!(names, ["image_1.png", "out.csv", "sub/notes.txt"], "{v}");
    for file in files {
        assert_eq!(file.as_object().unwrap().len(), 2, "{file}");
        let url = file["url"].as_str().unwrap();
        assert!(url.starts_with(&format!("{}/jupyter/files/", app.base)), "{url}");
        let r = get_url(&app, url, None).await;
        assert_eq!(r.status(), 200, "{url}");
        assert_eq!(r.headers()["x-content-type-options"], "nosniff");
        assert!(r.headers()["content-security-policy"].to_str().unwrap().contains("sandbox"));
        let ctype = r.headers()["content-type"].to_str().unwrap().to_owned();
        let bytes = r.bytes().await.unwrap();
        match file["filename"].as_str().unwrap() {
            "image_1.png" => {
                assert_eq!(ctype, "image/png");
                assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "a PNG");
            }
            "out.csv" => assert_eq!((ctype.as_str(), &bytes[..]), ("text/csv; charset=utf-8", &b"a,b\n1,2\n"[..])),
            _ => assert_eq!(&bytes[..], b"notes"),
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn compat_jupyter_uploads_live_their_lifetime_and_are_read_by_their_key_only() {
    let app = spawn_app_with(AppOptions { api_keys: vec!["alpha".into(), "beta".into()], ..Default::default() }).await;
    let (alpha, beta) = (Some("alpha"), Some("beta"));
    let before = chrono::Utc::now().timestamp();
    // The README's upload, verbatim.
    let file_request = json!({"filename": "data", "extension": "csv", "content": b64(b"1,2,3\n4,5,6")});
    let (status, v) = put_json(&app, "/jupyter/files", file_request.clone(), alpha).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v.as_object().unwrap().len(), 1, "{v}");
    let url = v["url"].as_str().unwrap().to_owned();
    let name = name_of(&url).to_owned();
    assert!(name.starts_with("data-") && name.ends_with(".csv"), "{name}");
    let (_, again) = put_json(&app, "/jupyter/files", file_request, alpha).await;
    assert_ne!(again["url"], v["url"], "names are unique");
    let (status, long) = put_json(
        &app,
        "/jupyter/files/long-lifetime",
        json!({"filename": "../../etc/passwd", "extension": "txt", "content": b64(b"kept")}),
        alpha,
    )
    .await;
    assert_eq!(status, 200, "{long}");
    let long_url = long["url"].as_str().unwrap().to_owned();
    assert!(!name_of(&long_url).contains(".."), "{long_url}");

    // Served to its key, with safe headers; another key, or none, does not find it.
    let r = get_url(&app, &url, alpha).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/csv; charset=utf-8");
    assert_eq!(r.headers()["x-content-type-options"], "nosniff");
    assert_eq!(r.bytes().await.unwrap(), "1,2,3\n4,5,6");
    let r = get_url(&app, &url, beta).await;
    assert_eq!(r.status(), 404);
    let (status, v) = (r.status().as_u16(), r.json::<Value>().await.unwrap());
    assert_detail(status, &v, 404);
    // Without a key the URL opens as the signed link it is (see `signed_urls.rs`); the plain one needs the key.
    assert_eq!(get_url(&app, &url, None).await.status(), 200);
    assert_eq!(get_url(&app, &app.url(&format!("/jupyter/files/{name}")), None).await.status(), 401);

    // Later code of the same key reads it at /mnt/files, read-only; another key's code does not see it.
    let read = format!("print(open('/mnt/files/{name}').read())");
    let v = execute(&app, json!({"code": read, "execution_environment": "python", "timeout": 30}), alpha).await;
    assert_eq!(v["output"], "1,2,3\n4,5,6\n", "{v}");
    let write = format!("open('/mnt/files/{name}', 'a').write('x')");
    let v = execute(&app, json!({"code": write, "execution_environment": "python", "timeout": 30}), alpha).await;
    assert!(v["error"].as_str().is_some_and(|e| e.contains("PermissionError") || e.contains("Read-only")), "{v}");
    let mount = "print([l.split()[3].split(',')[0] for l in open('/proc/mounts') if l.split()[1] == '/mnt/files'])";
    let v = execute(&app, json!({"code": mount, "execution_environment": "python", "timeout": 30}), alpha).await;
    assert_eq!(v["output"], "['ro']\n", "mounted read-only: {v}");
    let v = execute(&app, json!({"code": read, "execution_environment": "python", "timeout": 30}), beta).await;
    assert!(v["error"].as_str().is_some_and(|e| e.contains("FileNotFoundError")), "{v}");

    // Expiry: 20 minutes for one, 2 days for the other; the sweep removes what expired.
    let now = chrono::Utc::now().timestamp();
    let expiry =
        |url: &str| name_of(url).split('.').next().unwrap().rsplit('-').next().unwrap().parse::<i64>().unwrap();
    assert!((before + 1200..=now + 1200).contains(&expiry(&url)), "{url}");
    assert!((before + 2 * 86400..=now + 2 * 86400).contains(&expiry(&long_url)), "{long_url}");
    let report = app.store.sweep(now + 1201);
    assert_eq!(report.removed, 2, "both 20-minute files");
    assert_eq!(get_url(&app, &url, alpha).await.status(), 404);
    assert_eq!(get_url(&app, &long_url, alpha).await.status(), 200);
    assert_eq!(app.store.sweep(now + 2 * 86400 + 1).removed, 1);
    assert_eq!(get_url(&app, &long_url, alpha).await.status(), 404);

    // Not base64, a missing field: 422 in the detail shape.
    let (status, v) =
        put_json(&app, "/jupyter/files", json!({"filename": "a", "extension": "b", "content": "%%%"}), alpha).await;
    assert_detail(status, &v, 422);
    let (status, v) = put_json(&app, "/jupyter/files", json!({"filename": "a"}), alpha).await;
    assert_detail(status, &v, 422);
}

#[tokio::test(flavor = "multi_thread")]
async fn compat_jupyter_the_store_is_capped() {
    let app = spawn_app_with(AppOptions {
        files: files_store(&["--files-max-mb", "1"]),
        images: false,
        ..Default::default()
    })
    .await;
    let big = json!({"filename": "big", "extension": "bin", "content": b64(&vec![7u8; (1 << 20) + 1])});
    let (status, v) = put_json(&app, "/jupyter/files", big, None).await;
    assert_detail(status, &v, 413);
    let part = json!({"filename": "part", "extension": "bin", "content": b64(&vec![7u8; 600 << 10])});
    assert_eq!(put_json(&app, "/jupyter/files", part.clone(), None).await.0, 200);
    let (status, v) = put_json(&app, "/jupyter/files", part, None).await;
    assert!(assert_detail(status, &v, 507).contains("full"), "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn compat_jupyter_a_client_that_leaves_leaves_no_session() {
    let app = spawn_app().await;
    let request = app
        .client
        .post(app.url("/jupyter/execute"))
        .timeout(Duration::from_secs(15))
        .json(&json!({"code": "import time\ntime.sleep(120)", "execution_environment": "python", "timeout": 120}))
        .send()
        .await;
    assert!(request.is_err(), "the client gave up first");
    assert!(
        eventually(Duration::from_secs(40), || async { app.containers().await.is_empty() }).await,
        "the session of a request whose client left is removed"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn compat_pooled_kernels_serve_the_jupyter_api_not_the_session_apis_sessions() {
    let app = spawn_app_with(AppOptions { pool: crate::helpers::python_pool(1), ..Default::default() }).await;
    let pooled = || async {
        app.containers()
            .await
            .into_iter()
            .filter(|c| c.labels.contains_key("kernelbox.pool"))
            .map(|c| c.id)
            .collect::<Vec<_>>()
    };
    let one_pooled = || async {
        let (_, languages) = app.get("/v1/languages").await;
        let ready = languages.as_array().unwrap().iter().any(|l| l["name"] == "python" && l["pool"]["ready"] == 1);
        ready && pooled().await.len() == 1
    };
    assert!(eventually(Duration::from_secs(120), one_pooled).await, "the pool fills");

    // A /jupyter execution of a key without stored files takes the pooled kernel (and removes it after).
    let first = pooled().await.remove(0);
    let v =
        execute(&app, json!({"code": "print('pooled')", "execution_environment": "python", "timeout": 30}), None).await;
    assert_eq!(v["output"], "pooled\n", "{v}");
    let gone = || async { app.containers().await.iter().all(|c| c.id != first) };
    assert!(eventually(Duration::from_secs(30), gone).await, "the pooled kernel served the request and went with it");

    // The session API's sessions run python_scientific with an output folder of their own (fixed when the
    // container is made): they boot cold, found again by their user, and the pooled kernel stays ready.
    assert!(eventually(Duration::from_secs(120), one_pooled).await, "the pool refills");
    let second = pooled().await.remove(0);
    let (status, _) = crate::compat_session::post_form(&app, "/start_session", &[("user_id", "pooled_user")]).await;
    assert_eq!(status, 200);
    let run = json!({"user_id": "pooled_user", "code": "y = 7"});
    assert_eq!(post_json_with(&app, "/execute", run, None).await.0, 200);
    let (status, _) = crate::compat_session::post_form(&app, "/start_session", &[("user_id", "pooled_user")]).await;
    assert_eq!(status, 200);
    let read = json!({"user_id": "pooled_user", "code": "y"});
    assert_eq!(post_json_with(&app, "/execute", read, None).await, (200, json!({"output": "7\n"})));
    let sessions = app.manager.list(&kernelbox::session::Owner("anonymous".into()));
    assert_eq!(sessions.len(), 1, "one session for the user");
    let containers = app.containers().await;
    let theirs = containers.iter().find(|c| c.labels["kernelbox.session"] == sessions[0].id.as_str()).unwrap();
    assert_ne!(theirs.id, second, "not the pooled kernel");
    assert_eq!(theirs.labels["kernelbox.language"], "python_scientific");
    assert_eq!(pooled().await, [second], "the pooled kernel is still the pool's");
}
