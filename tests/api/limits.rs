//! The limits a real deployment meets in its first week: one API key serving many users (exactly how the
//! session API and the `/jupyter` API are used) never meets a limit in ordinary use, because executes,
//! reads and lists are not rate-limited by default; what costs (session creates, upload bytes) is limited
//! per key, and a limit met is a 429 with `Retry-After` that names it, in each API's own shape; one key's
//! abandoned MCP sessions never take MCP away from another key, and a full table is a 429 or 503 with a
//! JSON-RPC error, never a 500.

use base64::Engine;
use futures::StreamExt;
use reqwest::Method;
use serde_json::{Value, json};

use crate::helpers::*;

const KEY: &str = "limits-key-a";
const OTHER_KEY: &str = "limits-key-b";

/// What came back: the status, the `Retry-After` header (seconds) if any, and the body as JSON.
struct Answer {
    status: u16,
    retry_after: Option<u64>,
    body: Value,
}

impl Answer {
    /// A 429 that says when to retry (within the minute the limits here refill over).
    fn assert_limited(&self, what: &str) {
        assert_eq!(self.status, 429, "{what}: {}", self.body);
        let wait = self.retry_after.unwrap_or_else(|| panic!("{what}: no Retry-After"));
        assert!((1..=60).contains(&wait), "{what}: Retry-After {wait}");
    }

    /// FastAPI's `{"detail": "..."}`, and nothing else.
    fn detail(&self) -> &str {
        let detail = self.body["detail"].as_str().unwrap_or_else(|| panic!("no detail: {}", self.body));
        assert_eq!(self.body.as_object().unwrap().len(), 1, "{}", self.body);
        detail
    }
}

async fn send(app: &TestApp, method: Method, path: &str, key: &str, body: Option<Value>) -> Answer {
    let mut request = app.client.request(method, app.url(path)).bearer_auth(key);
    if let Some(body) = body {
        request = request.json(&body);
    }
    answer(request.send().await.expect("request")).await
}

async fn answer(r: reqwest::Response) -> Answer {
    let status = r.status().as_u16();
    let retry_after = r.headers().get("retry-after").and_then(|v| v.to_str().ok()?.parse().ok());
    let text = r.text().await.unwrap_or_default();
    Answer { status, retry_after, body: serde_json::from_str(&text).unwrap_or(Value::String(text)) }
}

// ---------------------------------------------------------------- ordinary use: no limit is met

/// The backend: 8 users, each running 20 short cells one after another, all at once, through
/// the session API with one key and the default settings (the old default request limit answered 429
/// within a quarter of a second).
#[tokio::test(flavor = "multi_thread")]
async fn one_key_serving_8_users_running_20_cells_each_at_once_never_meets_a_limit() {
    let app = spawn_app_with(AppOptions {
        api_keys: vec![KEY.into()],
        limits: limits(&[]),
        http: http(&[]),
        ..Default::default()
    })
    .await;
    let users: Vec<_> = (0..8)
        .map(|user| {
            let app = &app;
            async move {
                let id = format!("user_{user}");
                let (status, v) =
                    crate::compat_session::post_form_with(app, "/start_session", &[("user_id", &id)], Some(KEY)).await;
                assert_eq!(status, 200, "{id} starts: {v}");
                for cell in 0..20 {
                    let code = format!("x = {user} * 100 + {cell}\nprint(x)");
                    let (status, v) = crate::compat_session::post_json_with(
                        app,
                        "/execute",
                        json!({"user_id": id, "code": code}),
                        Some(KEY),
                    )
                    .await;
                    assert_eq!(status, 200, "{id}, cell {cell}: {v}");
                    assert_eq!(v["output"], format!("{}\n", user * 100 + cell), "{id}, cell {cell}");
                }
            }
        })
        .collect();
    futures::future::join_all(users).await;
    assert_eq!(app.containers().await.len(), 8, "one session per user");
}

// ---------------------------------------------------------------- what costs is limited per key

/// A create flood from one key meets the create limit: 429, `Retry-After` and the limit's name in each
/// API's shape (`/v1` and the gateway: `{"error"}`; the session and `/jupyter` APIs: `{"detail"}`; MCP: a
/// tool error). Nothing more boots; executes and lists of the sessions it has go on.
#[tokio::test(flavor = "multi_thread")]
async fn a_create_flood_meets_the_create_limit_in_every_apis_own_shape() {
    // Two creates at once, then one a minute: nothing refills during the test.
    let app = spawn_app_with(AppOptions {
        api_keys: vec![KEY.into(), OTHER_KEY.into()],
        limits: limits(&["--create-limit-per-minute", "1", "--create-limit-burst", "2"]),
        ..Default::default()
    })
    .await;
    let flood = (0..6).map(|_| send(&app, Method::POST, "/v1/sessions", KEY, Some(json!({"language": "python"}))));
    let answers = futures::future::join_all(flood).await;
    let created: Vec<String> =
        answers.iter().filter(|a| a.status == 201).map(|a| a.body["id"].as_str().unwrap().to_owned()).collect();
    assert_eq!(created.len(), 2, "the burst: {:?}", answers.iter().map(|a| a.status).collect::<Vec<_>>());
    for a in answers.iter().filter(|a| a.status != 201) {
        a.assert_limited("/v1 create");
        assert_error_shape(&a.body, "create_rate_limited");
        let message = a.body["error"]["message"].as_str().unwrap();
        assert!(message.contains("session creates") && message.contains("at most 1 a minute"), "{message}");
    }

    // The session API's start of a new user's session.
    let r = app
        .client
        .post(app.url("/start_session"))
        .bearer_auth(KEY)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("user_id=newcomer")
        .send()
        .await
        .unwrap();
    let a = answer(r).await;
    a.assert_limited("/start_session");
    assert!(a.detail().contains("too many session creates"), "{}", a.body);

    // `/jupyter/execute`: each execution is a fresh session.
    let a = send(&app, Method::POST, "/jupyter/execute", KEY, Some(json!({"code": "print(1)"}))).await;
    a.assert_limited("/jupyter/execute");
    assert!(a.detail().contains("too many session creates"), "{}", a.body);

    // The Jupyter gateway's kernel start.
    let a = send(&app, Method::POST, "/api/kernels", KEY, Some(json!({"name": "python"}))).await;
    a.assert_limited("POST /api/kernels");
    assert_error_shape(&a.body, "create_rate_limited");

    // MCP's start_session and run_code: a tool error that says which limit and when to retry.
    let mut mcp = Mcp::initialize(&app, KEY).await;
    for (tool, arguments) in [
        ("start_session", json!({"language": "python"})),
        ("run_code", json!({"language": "python", "code": "print(1)"})),
    ] {
        let result = mcp.call(tool, arguments).await;
        assert_eq!(result["isError"], true, "{tool}: {result}");
        let error = &result["structuredContent"]["error"];
        assert_eq!(error["code"], "create_rate_limited", "{tool}: {result}");
        assert!(error["retry_after_s"].as_u64().is_some_and(|s| (1..=60).contains(&s)), "{tool}: {result}");
        assert!(result["content"][0]["text"].as_str().unwrap().contains("session creates"), "{tool}: {result}");
    }

    // Another key has its own budget, and executes and lists were never limited.
    assert_eq!(
        send(&app, Method::POST, "/v1/sessions", OTHER_KEY, Some(json!({"language": "python"}))).await.status,
        201
    );
    for round in 0..30 {
        let a = send(
            &app,
            Method::POST,
            &format!("/v1/sessions/{}/execute", created[round % 2]),
            KEY,
            Some(json!({"code": "1+1"})),
        )
        .await;
        assert_eq!(a.status, 200, "execute {round}: {}", a.body);
        assert_eq!(send(&app, Method::GET, "/v1/sessions", KEY, None).await.status, 200);
    }
    assert_eq!(app.containers().await.len(), 3, "nothing refused was booted");
}

/// Upload bytes are limited per key: an upload that moved nothing (no such session) costs nothing, the
/// budget's bytes pass, the next upload is a 429 in `/v1`'s shape and the `/jupyter` store's; downloads
/// are not limited.
#[tokio::test(flavor = "multi_thread")]
async fn uploads_past_the_byte_budget_are_429_in_each_apis_shape_and_downloads_go_on() {
    let app = spawn_app_with(AppOptions {
        api_keys: vec![KEY.into()],
        limits: limits(&["--max-upload-mb", "1", "--upload-limit-mb-per-minute", "1", "--upload-limit-mb-burst", "2"]),
        ..Default::default()
    })
    .await;
    let id = app.start_as(KEY, "python").await;
    let mib = vec![7u8; 1 << 20];
    let put = |path: String| {
        let request = app.client.put(app.url(&path)).bearer_auth(KEY).body(mib.clone());
        async move { answer(request.send().await.expect("upload")).await }
    };
    let nowhere = put("/v1/sessions/0123456789abcdef01234567/files/lost.bin".into()).await;
    assert_eq!(nowhere.status, 404, "{}", nowhere.body);
    for name in ["a.bin", "b.bin"] {
        let a = put(format!("/v1/sessions/{id}/files/{name}")).await;
        assert_eq!(a.status, 201, "{name}, within the 2 MiB budget: {}", a.body);
    }
    let a = put(format!("/v1/sessions/{id}/files/c.bin")).await;
    a.assert_limited("the third MiB");
    assert_error_shape(&a.body, "upload_rate_limited");
    assert!(a.body["error"]["message"].as_str().unwrap().contains("upload bytes"), "{}", a.body);

    // Half a MiB: the budget refills at 1 MiB a minute, so half a minute away.
    let content = base64::engine::general_purpose::STANDARD.encode(vec![1u8; 512 << 10]);
    let stored = send(
        &app,
        Method::PUT,
        "/jupyter/files",
        KEY,
        Some(json!({"filename": "f", "extension": "bin", "content": content})),
    )
    .await;
    stored.assert_limited("/jupyter/files");
    assert!(stored.detail().contains("too many upload bytes"), "{}", stored.body);

    let r = app.client.get(app.url(&format!("/v1/sessions/{id}/files/a.bin"))).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.bytes().await.unwrap().len(), 1 << 20);
}

// ---------------------------------------------------------------- MCP sessions, bounded per key

/// A plain-HTTP MCP client: `initialize` (a session), then requests on it.
struct Mcp<'a> {
    app: &'a TestApp,
    key: &'a str,
    session: String,
}

const ACCEPT: &str = "application/json, text/event-stream";

fn initialize_body(id: u64) -> Value {
    json!({"jsonrpc": "2.0", "id": id, "method": "initialize",
        "params": {"protocolVersion": "2025-06-18", "capabilities": {}, "clientInfo": {"name": "careless", "version": "0"}}})
}

/// One `initialize`, never closed: the answer, and the session id it gave.
async fn initialize(app: &TestApp, key: &str, id: u64) -> (Answer, Option<String>) {
    let r = app
        .client
        .post(app.url("/mcp"))
        .bearer_auth(key)
        .header("accept", ACCEPT)
        .json(&initialize_body(id))
        .send()
        .await
        .expect("initialize");
    let session = r.headers().get("mcp-session-id").map(|v| v.to_str().unwrap().to_owned());
    (answer(r).await, session)
}

impl<'a> Mcp<'a> {
    async fn initialize(app: &'a TestApp, key: &'a str) -> Mcp<'a> {
        let (a, session) = initialize(app, key, 0).await;
        assert_eq!(a.status, 200, "initialize: {}", a.body);
        let mcp = Mcp { app, key, session: session.expect("a session id") };
        let r = mcp.post(json!({"jsonrpc": "2.0", "method": "notifications/initialized"})).send().await.unwrap();
        assert_eq!(r.status(), 202);
        mcp
    }

    fn post(&self, body: Value) -> reqwest::RequestBuilder {
        self.app
            .client
            .post(self.app.url("/mcp"))
            .bearer_auth(self.key)
            .header("accept", ACCEPT)
            .header("mcp-session-id", &self.session)
            .header("mcp-protocol-version", "2025-06-18")
            .json(&body)
    }

    /// A tool call's result (the answer arrives as server-sent events).
    async fn call(&mut self, tool: &str, arguments: Value) -> Value {
        let request = json!({"jsonrpc": "2.0", "id": 1, "method": "tools/call", "params": {"name": tool, "arguments": arguments}});
        let text = self.post(request).send().await.unwrap().text().await.unwrap();
        text.lines()
            .filter_map(|l| l.strip_prefix("data:"))
            .filter_map(|l| serde_json::from_str::<Value>(l.trim()).ok())
            .find(|m| m["id"] == 1)
            .unwrap_or_else(|| panic!("no answer to {tool}: {text}"))["result"]
            .clone()
    }

    /// Opens the session's stream of server messages (`GET /mcp`) and keeps it open: the session is in use.
    async fn listen(&self) -> reqwest::Response {
        let r = self
            .app
            .client
            .get(self.app.url("/mcp"))
            .bearer_auth(self.key)
            .header("accept", "text/event-stream")
            .header("mcp-session-id", &self.session)
            .header("mcp-protocol-version", "2025-06-18")
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 200);
        r
    }
}

/// The value of the gauge `name` in `/metrics`.
async fn gauge(app: &TestApp, name: &str) -> f64 {
    let text = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    sample(&text, name).unwrap_or_else(|| panic!("no {name} in:\n{text}"))
}

/// The careless client: 3,000 `initialize` calls of one key that never close their session. Each
/// is answered (its own oldest idle sessions make room), none is a 500, and another key's `initialize`
/// is answered 200; `/metrics` counts the sessions held, at most the key's share.
#[tokio::test(flavor = "multi_thread")]
async fn three_thousand_abandoned_mcp_sessions_of_one_key_leave_another_key_its_initialize() {
    let app = spawn_app_with(AppOptions {
        api_keys: vec![KEY.into(), OTHER_KEY.into()],
        images: false,
        ..Default::default()
    })
    .await;
    let statuses: Vec<u16> = futures::stream::iter(0..3000u64)
        .map(|i| {
            let app = &app;
            async move { initialize(app, KEY, i).await.0.status }
        })
        .buffer_unordered(8)
        .collect()
        .await;
    let mut counts = std::collections::BTreeMap::new();
    for s in statuses {
        *counts.entry(s).or_insert(0) += 1;
    }
    assert_eq!(counts, [(200, 3000)].into(), "every initialize of the careless key is answered");
    let (a, session) = initialize(&app, OTHER_KEY, 1).await;
    assert_eq!(a.status, 200, "another key's initialize: {}", a.body);
    assert!(session.is_some());
    eprintln!("FIGURE mcp sessions held after 3,000 abandoned + 1: {}", gauge(&app, "kernelbox_mcp_sessions").await);
    assert_eq!(gauge(&app, "kernelbox_mcp_sessions").await, 257.0, "the careless key's 256 and the other's one");
}

/// When nothing can make room, because every session that would have to go is in use (its stream is
/// open), `initialize` is a 429 for the key's share or a 503 for the server's, with `Retry-After` and a
/// JSON-RPC error that names the limit and answers the request's id. A session in use is never closed.
#[tokio::test(flavor = "multi_thread")]
async fn a_full_mcp_table_is_a_429_or_503_with_retry_after_and_a_json_rpc_error_never_a_500() {
    let app = spawn_app_with(AppOptions {
        api_keys: vec![KEY.into(), OTHER_KEY.into(), "limits-key-c".into()],
        http: http(&["--max-mcp-sessions", "3", "--max-mcp-sessions-per-key", "2"]),
        images: false,
        ..Default::default()
    })
    .await;
    let a1 = Mcp::initialize(&app, KEY).await;
    let a2 = Mcp::initialize(&app, KEY).await;
    let _streams = (a1.listen().await, a2.listen().await);
    let (refused, session) = initialize(&app, KEY, 41).await;
    refused.assert_limited("the key's share, all in use");
    assert!(session.is_none());
    assert_eq!(refused.body["jsonrpc"], "2.0");
    assert_eq!(refused.body["id"], 41, "{}", refused.body);
    assert_eq!(refused.body["error"]["data"]["limit"], "mcp_sessions_per_key", "{}", refused.body);
    assert!(refused.body["error"]["message"].as_str().unwrap().contains("at most 2"), "{}", refused.body);

    let b = Mcp::initialize(&app, OTHER_KEY).await;
    let _b_stream = b.listen().await;
    let (full, _) = initialize(&app, "limits-key-c", 42).await;
    assert_eq!(full.status, 503, "{}", full.body);
    assert!(full.retry_after.is_some_and(|s| (1..=60).contains(&s)));
    assert_eq!(full.body["id"], 42);
    assert_eq!(full.body["error"]["data"]["limit"], "mcp_sessions", "{}", full.body);
    assert_eq!(gauge(&app, "kernelbox_mcp_sessions").await, 3.0);

    // The sessions in use were not touched: each still answers.
    let mut a1 = a1;
    let listed = a1.call("list_languages", json!({})).await;
    assert_eq!(listed["isError"], false, "{listed}");
    // A stream that ends makes its session idle again (once the server notices the client left): then an
    // initialize closes it to make room.
    drop(_b_stream);
    let room = eventually(std::time::Duration::from_secs(60), || async {
        let (a, _) = initialize(&app, "limits-key-c", 43).await;
        assert!(a.status == 200 || a.status == 503, "{} {}", a.status, a.body);
        a.status == 200
    })
    .await;
    assert!(room, "the ended stream's session never made room");
    assert_eq!(gauge(&app, "kernelbox_mcp_sessions").await, 3.0);
}
