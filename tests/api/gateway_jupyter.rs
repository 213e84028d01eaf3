//! kernelbox as the gateway of a real Jupyter server (PyPI `jupyter_server`, started with `--gateway-url`):
//! through that server, `gateway_client.py` plays a front end: it starts a kernel, runs cells over the
//! server's WebSocket, gets a matplotlib image, interrupts a long cell, restarts and ends the kernel, for
//! python_scientific and bash; it opens a notebook saved elsewhere, whose kernelspec is Jupyter's own
//! `python3`, and runs its cell; a session that names no kernel gets `python3` too. Every kernel was a
//! kernelbox session, and none is left.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;

const KEY: &str = "jupyter-server-key";
const JUPYTER_SERVER: &str = "jupyter_server==2.17.0";

/// A Jupyter server in gateway mode, killed with the test.
struct JupyterServer {
    base: String,
    token: String,
    _process: tokio::process::Child,
    _home: tempfile::TempDir,
}

async fn jupyter_server(gateway: &str, key: &str) -> JupyterServer {
    let python = tokio::task::spawn_blocking(|| tool_python("jupyter-server", &[JUPYTER_SERVER])).await.unwrap();
    let home = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let token = uuid::Uuid::new_v4().simple().to_string();
    let dir = |name: &str| {
        let d = home.path().join(name);
        std::fs::create_dir_all(&d).unwrap();
        d
    };
    let process = tokio::process::Command::new(python)
        .args([
            "-m",
            "jupyter_server",
            "--ServerApp.ip=127.0.0.1",
            "--ServerApp.port_retries=0",
            "--no-browser",
            "--allow-root",
        ])
        .arg(format!("--ServerApp.port={port}"))
        .arg(format!("--IdentityProvider.token={token}"))
        .arg(format!("--ServerApp.root_dir={}", dir("notebooks").display()))
        .arg(format!("--gateway-url={gateway}"))
        .arg(format!("--GatewayClient.auth_token={key}"))
        .args(["--GatewayClient.request_timeout=180", "--GatewayClient.connect_timeout=60"])
        .env("HOME", home.path())
        .env("JUPYTER_CONFIG_DIR", dir("config"))
        .env("JUPYTER_DATA_DIR", dir("data"))
        .env("JUPYTER_RUNTIME_DIR", dir("runtime"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(home.path().join("server.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .expect("jupyter_server starts");
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    let up = eventually(Duration::from_secs(90), || async {
        let r = client
            .get(format!("{base}/api/kernelspecs"))
            .header("authorization", format!("token {token}"))
            .send()
            .await;
        r.is_ok_and(|r| r.status() == 200)
    })
    .await;
    let log = || std::fs::read_to_string(home.path().join("server.log")).unwrap_or_default();
    assert!(up, "the Jupyter server came up with kernelbox as its gateway:\n{}", log());
    JupyterServer { base, token, _process: process, _home: home }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_real_jupyter_server_runs_its_kernels_on_kernelbox() {
    let app = spawn_app_with(AppOptions { api_keys: vec![KEY.into()], ..Default::default() }).await;
    let r = front_end_through(&app.base, KEY).await;
    check_front_end(&r);
    assert!(
        eventually(Duration::from_secs(10), || async { app.containers().await.is_empty() }).await,
        "every kernel the server ended is gone from Docker"
    );
}

/// Runs `gateway_client.py` through a Jupyter server whose gateway is kernelbox at `gateway` (a single
/// service, or a cluster's one address) with `key`; returns what the front end saw.
pub(crate) async fn front_end_through(gateway: &str, key: &str) -> Value {
    let server = jupyter_server(gateway, key).await;
    let python = tokio::task::spawn_blocking(|| tool_python("jupyter-server", &[JUPYTER_SERVER])).await.unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/api/gateway_client.py");
    let run =
        tokio::process::Command::new(python).args([script, &server.base, &server.token]).kill_on_drop(true).output();
    let out = tokio::time::timeout(Duration::from_secs(600), run).await.expect("the front end finishes").unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let log = std::fs::read_to_string(server._home.path().join("server.log")).unwrap_or_default();
    assert!(
        out.status.success(),
        "the front end failed:\n{stdout}\n{}\n--- jupyter server log ---\n{log}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value =
        serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {stdout}"));
    eprintln!("what the front end saw through jupyter_server: {r}");
    r
}

/// What the front end must have seen: kernelbox's kernel specs, cells run with every message kind, a
/// plot, an interrupt that keeps state, a restart that does not, bash, a notebook of Jupyter's own
/// `python3`, and every kernel ended.
pub(crate) fn check_front_end(r: &Value) {
    let specs = r["kernelspecs"].as_array().unwrap();
    for name in ["python3", "python", "python_scientific", "javascript", "typescript", "java", "bash"] {
        assert!(specs.iter().any(|s| s == name), "the server lists kernelbox's {name}: {specs:?}");
    }
    assert_eq!(r["default_kernelspec"], "python3", "{r}");
    assert_eq!(r["start_status"], 201, "{r}");
    assert_eq!(r["listed"], true);
    assert_eq!(r["model"]["name"], "python_scientific");
    assert_eq!(r["language"], "python");

    assert_eq!(r["hello"]["status"], "ok", "{r}");
    assert_eq!(r["hello"]["text"], "hello through jupyter_server\n42");
    for kind in ["iopub:status", "iopub:execute_input", "iopub:stream", "iopub:execute_result", "shell:execute_reply"] {
        assert!(r["hello"]["seen"].as_array().unwrap().iter().any(|s| s == kind), "{kind}: {}", r["hello"]["seen"]);
    }

    assert_eq!(r["plot"]["status"], "ok", "{r}");
    assert_eq!(r["plot"]["pngs"], 1);
    assert_eq!(r["plot"]["png_magic"], "iVBORw0K", "base64 of the PNG signature");
    assert!(r["plot"]["png_bytes"].as_u64().unwrap() > 5_000);

    assert_eq!(r["interrupt"]["status"], 204, "{r}");
    assert_eq!(r["interrupt"]["reply"], "error");
    assert_eq!(r["interrupt"]["ename"], "KeyboardInterrupt");
    assert!(r["interrupt"]["seconds"].as_f64().unwrap() < 30.0, "the 60 s sleep was cut short: {r}");
    assert_eq!(r["interrupt"]["state_kept"], "42", "an interrupt keeps the kernel's state");

    assert_eq!(r["restart_status"], 200);
    assert_eq!(r["after_restart"], "False", "a restart starts afresh");
    assert_eq!(r["delete_status"], 204);
    assert_eq!(r["after_delete_status"], 404);

    assert_eq!(r["bash"]["start_status"], 201, "{r}");
    assert_eq!(r["bash"]["status"], "ok");
    assert_eq!(r["bash"]["text"], "hello from bash\n42\n");
    assert_eq!(r["bash"]["delete_status"], 204);

    let nb = &r["notebook"];
    assert_eq!(nb["upload_status"], 201, "{r}");
    assert_eq!(nb["session_status"], 201, "a python3 notebook opens (no \"kernel not found\"): {r}");
    assert_eq!(nb["kernel_name"], "python3");
    assert_eq!(nb["language"], "python");
    assert_eq!(nb["status"], "ok", "{r}");
    assert_eq!(nb["text"], "3 42\n");
    assert_eq!(nb["delete_status"], 204);
    assert_eq!((&nb["default_status"], &nb["default_kernel_name"]), (&json!(201), &json!("python3")), "{r}");
    assert_eq!(nb["default_delete_status"], 204);
}
