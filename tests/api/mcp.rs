//! `/mcp`: the MCP server as agents meet it, through the reference Python client (PyPI `mcp`, its
//! streamable-HTTP client, run by `mcp_client.py`): tools listed with schemas, code run in every
//! language, a matplotlib plot as image content, progress while code runs, stdin, files, another key's
//! session refused, a package installed, a cancelled call that interrupts the kernel; and the execute round trip measured
//! against `/v1`'s.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::*;

const KEY: &str = "mcp-key-a";
const OTHER_KEY: &str = "mcp-key-b";

async fn app_with_keys() -> TestApp {
    spawn_app_with(AppOptions {
        api_keys: vec![KEY.into(), OTHER_KEY.into()],
        http: http(&["--rate-limit-per-minute", "0"]),
        ..Default::default()
    })
    .await
}

/// Runs a scenario of `mcp_client.py` with the reference client; returns its JSON report.
async fn reference_client(app: &TestApp, scenario: &str) -> Value {
    reference_client_at(&app.base, scenario, KEY, OTHER_KEY).await
}

/// The reference client against `base` (a single service, or a cluster's one address) with `key`, and
/// `other` for the scenarios that need a stranger.
pub(crate) async fn reference_client_at(base: &str, scenario: &str, key: &str, other: &str) -> Value {
    let python = tokio::task::spawn_blocking(|| tool_python("mcp-client", &["mcp==2.3.0"])).await.unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/api/mcp_client.py");
    let run =
        tokio::process::Command::new(python).args([script, scenario, base, key, other]).kill_on_drop(true).output();
    let out = tokio::time::timeout(Duration::from_secs(600), run).await.expect("the client finishes").unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "the MCP client failed:\n{stdout}\n{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_str(stdout.lines().last().unwrap_or("")).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

fn text(result: &Value) -> String {
    result["content"]
        .as_array()
        .map(|c| c.iter().filter_map(|c| c["text"].as_str()).collect::<Vec<_>>().join("\n"))
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_reference_client_runs_code_in_every_language_and_sees_only_its_own_sessions() {
    let app = app_with_keys().await;
    let r = reference_client(&app, "main").await;
    check_main_scenario(&r);
    assert!(
        eventually(Duration::from_secs(30), || async { app.containers().await.is_empty() }).await,
        "run_code and end_session leave no container"
    );
}

/// What the reference client's main scenario must have seen: every tool described, code run in every
/// language, a plot as an image, progress, stdin, errors, files, a package, a stranger refused, a
/// cancelled call that interrupted, a restart and an end.
pub(crate) fn check_main_scenario(r: &Value) {
    assert_eq!(r["server"]["name"], "kernelbox");
    let tools = r["tools"].as_object().unwrap();
    for name in [
        "list_languages",
        "start_session",
        "execute",
        "run_code",
        "upload_file",
        "download_file",
        "list_files",
        "install_packages",
        "restart",
        "set_network",
        "end_session",
    ] {
        let tool = &tools[name];
        assert!(tool["description"].as_str().is_some_and(|d| d.len() > 40), "{name} is described for a model");
        assert_eq!(tool["schema"]["type"], "object", "{name}");
    }
    assert!(tools["execute"]["schema"]["properties"]["stdin"].is_object());
    assert!(tools["execute"]["schema"]["required"].as_array().unwrap().contains(&json!("code")));
    assert!(text(&r["languages"]).contains("python_scientific"));

    for language in ["python", "python_scientific", "javascript", "typescript", "java", "bash"] {
        let ran = &r["run_code"][language];
        assert_eq!(ran["is_error"], false, "{language}: {ran}");
        let said = ran["text"].as_str().unwrap();
        assert!(said.contains(&format!("hello from {language}")) && said.contains("42"), "{language}: {said}");
    }

    assert_eq!(r["plot"]["status"], "ok", "{}", r["plot"]);
    let image = r["plot"]["content"].as_array().unwrap().iter().find(|c| c["type"] == "image").cloned();
    let image = image.unwrap_or_else(|| panic!("a plot comes back as image content: {}", r["plot"]));
    assert_eq!(image["mimeType"], "image/png");
    assert!(image["size"].as_u64().unwrap() > 1000);

    let ticks = r["progress"]["notifications"].as_array().unwrap();
    assert!(ticks.len() >= 3, "one progress notification per output: {}", r["progress"]);
    assert!(ticks[0]["message"].as_str().unwrap().contains("tick 0"));

    assert_eq!(r["stdin"]["is_error"], false);
    assert!(r["stdin"]["text"].as_str().unwrap().contains("42"), "{}", r["stdin"]);
    assert_eq!(r["stdin_missing"]["is_error"], true);
    assert!(r["stdin_missing"]["text"].as_str().unwrap().contains("InputRequired"), "{}", r["stdin_missing"]);

    assert_eq!(r["error"]["is_error"], true);
    assert!(r["error"]["text"].as_str().unwrap().contains("ZeroDivisionError"));

    assert!(text(&r["list"]).contains("in.txt"), "{}", r["list"]);
    assert_eq!(text(&r["download"]), "hello file");
    assert_eq!(r["install"]["is_error"], false, "{}", r["install"]);
    assert!(text(&r["install"]).contains("six 1.16.0"), "{}", r["install"]);
    assert_eq!(r["installed"]["text"], "six 1.16.0\n", "{}", r["installed"]);

    for refused in [&r["stranger"], &r["stranger_end"]] {
        assert_eq!(refused["is_error"], true, "{refused}");
        assert!(text(refused).contains("no session"), "{refused}");
    }

    assert_eq!(r["after_cancel"]["text"], "yes\n", "state kept: {}", r["after_cancel"]);
    assert!(r["after_cancel"]["seconds"].as_f64().unwrap() < 10.0, "the cancelled code was interrupted");
    assert!(tools["start_session"]["schema"]["properties"]["network_allow"].is_object());
    assert_eq!(r["set_network"]["is_error"], true, "{}", r["set_network"]);
    assert!(text(&r["set_network"]).contains("turned off"), "{}", r["set_network"]);
    assert_eq!(r["restart"]["is_error"], false, "{}", r["restart"]);
    assert_eq!(r["end"]["is_error"], false, "{}", r["end"]);
    assert_eq!(r["after_end"]["is_error"], true);
}

#[tokio::test(flavor = "multi_thread")]
async fn mcp_needs_an_api_key() {
    let app = app_with_keys().await;
    let initialize = json!({"jsonrpc": "2.0", "id": 1, "method": "initialize", "params": {
        "protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "t", "version": "0"}}});
    let response = app
        .client
        .post(app.url("/mcp"))
        .header("accept", "application/json, text/event-stream")
        .json(&initialize)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
}

/// A minimal MCP client over plain HTTP, so the round trip is measured the way `/v1`'s is.
struct RawMcp {
    client: reqwest::Client,
    url: String,
    session: Option<String>,
    next_id: u64,
}

impl RawMcp {
    async fn connect(app: &TestApp) -> RawMcp {
        let mut mcp = RawMcp { client: app.client.clone(), url: app.url("/mcp"), session: None, next_id: 1 };
        let params = json!({"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "bench", "version": "0"}});
        mcp.request("initialize", params).await;
        mcp.post(json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).await;
        mcp
    }

    async fn post(&mut self, body: Value) -> reqwest::Response {
        let mut request = self
            .client
            .post(&self.url)
            .bearer_auth(KEY)
            .header("accept", "application/json, text/event-stream")
            .header("mcp-protocol-version", "2025-06-18")
            .json(&body);
        if let Some(session) = &self.session {
            request = request.header("mcp-session-id", session);
        }
        let response = request.send().await.unwrap();
        assert!(response.status().is_success(), "{}: {}", body["method"], response.status());
        if let Some(id) = response.headers().get("mcp-session-id") {
            self.session = Some(id.to_str().unwrap().to_owned());
        }
        response
    }

    async fn request(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let body = self.post(json!({"jsonrpc": "2.0", "id": id, "method": method, "params": params})).await;
        let text = body.text().await.unwrap();
        let answer = text
            .lines()
            .map(|l| l.strip_prefix("data:").map(str::trim).unwrap_or(l))
            .filter_map(|l| serde_json::from_str::<Value>(l).ok())
            .find(|m| m["id"] == id);
        answer.unwrap_or_else(|| panic!("no answer to {method}: {text}"))
    }

    async fn call(&mut self, tool: &str, arguments: Value) -> Value {
        self.request("tools/call", json!({"name": tool, "arguments": arguments})).await["result"].clone()
    }
}

fn p50(mut times: Vec<f64>) -> f64 {
    times.sort_by(f64::total_cmp);
    times[times.len() / 2]
}

/// The execute round trip of a trivial statement, 100 sequential calls after 5 warm-up ones, through
/// `/v1` and through `/mcp` (our plain-HTTP client, and the reference Python client). Printed, never
/// asserted (speed is measured, not tested).
#[tokio::test(flavor = "multi_thread")]
async fn execute_round_trip_through_mcp_and_v1() {
    let app = app_with_keys().await;
    let (status, v) = {
        let r = app.client.post(app.url("/v1/sessions")).bearer_auth(KEY).json(&json!({"language": "python"})).send();
        let r = r.await.unwrap();
        (r.status().as_u16(), r.json::<Value>().await.unwrap())
    };
    assert_eq!(status, 201, "{v}");
    let id = v["id"].as_str().unwrap().to_owned();
    let v1 = |code: &'static str| {
        let request = app.client.post(app.url(&format!("/v1/sessions/{id}/execute"))).bearer_auth(KEY);
        async move { request.json(&json!({"code": code})).send().await.unwrap().json::<Value>().await.unwrap() }
    };
    let mut times = Vec::new();
    for round in 0..105 {
        let t = Instant::now();
        let r = v1("1").await;
        assert_eq!(r["status"], "ok");
        if round >= 5 {
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let v1_p50 = p50(times);

    let mut mcp = RawMcp::connect(&app).await;
    let mut times = Vec::new();
    for round in 0..105 {
        let t = Instant::now();
        let r = mcp.call("execute", json!({"session_id": id, "code": "1"})).await;
        assert_eq!(r["isError"], false, "{r}");
        if round >= 5 {
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    let mcp_p50 = p50(times);
    let python = reference_client(&app, "bench").await;
    eprintln!("FIGURE execute round trip p50 (python `1`, 100 runs): /v1 {v1_p50:.1} ms");
    eprintln!("FIGURE execute round trip p50 (python `1`, 100 runs): /mcp {mcp_p50:.1} ms (plain HTTP client)");
    eprintln!(
        "FIGURE execute round trip p50 (python `1`, 100 runs): /mcp {:.1} ms (reference Python client, p90 {:.1} ms)",
        python["p50_ms"].as_f64().unwrap(),
        python["p90_ms"].as_f64().unwrap()
    );
}
