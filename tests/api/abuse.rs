//! A hostile client: other owners' ids, ids with path syntax, huge and malformed bodies, wrong content
//! types, slow-loris headers and bodies, request floods. Each gets a 4xx in the JSON error shape (or, for
//! the slow clients, a closed connection): never a 5xx, never a hang. Only the first test starts a kernel.

use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;

/// An app for tests that never start a kernel (no image build to wait for).
fn no_kernels() -> AppOptions {
    AppOptions { images: false, ..Default::default() }
}

const SOME_ID: &str = "0123456789abcdef01234567";

#[tokio::test(flavor = "multi_thread")]
async fn another_owners_session_is_not_found_whatever_the_verb() {
    let app = spawn_app_with(AppOptions {
        api_keys: vec!["key-a".into(), "key-b".into()],
        limits: limits(&["--max-sessions-per-owner", "1"]),
        ..Default::default()
    })
    .await;
    let id = app.start_as("key-a", "bash").await;

    let path = |tail: &str| app.url(&format!("/v1/sessions/{id}{tail}"));
    let as_b = [
        app.client.get(path("")),
        app.client.delete(path("")),
        app.client.post(path("/execute")).json(&json!({"code": "echo stolen"})),
        app.client.post(path("/interrupt")),
        app.client.post(path("/restart")),
    ];
    for request in as_b {
        let r = request.bearer_auth("key-b").send().await.unwrap();
        let status = r.status().as_u16();
        let body: Value = r.json().await.unwrap();
        assert_eq!(status, 404, "{body}");
        assert_error_shape(&body, "not_found");
    }
    let mine = app.client.get(path("")).bearer_auth("key-a").send().await.unwrap();
    assert_eq!(mine.status(), 200, "nothing key-b did touched the session");
    assert_eq!(app.client.delete(path("")).bearer_auth("key-a").send().await.unwrap().status(), 204);
}

#[tokio::test(flavor = "multi_thread")]
async fn ids_with_path_syntax_or_odd_bytes_are_404s_not_files() {
    let app = spawn_app_with(no_kernels()).await;
    let long = "a".repeat(10_000);
    let ids = [
        "..",
        "%2e%2e",
        "..%2F..%2F..%2Fetc%2Fpasswd",
        "%2F",
        "a%2Fb",
        "%00",
        "a%0d%0aX-Injected:%20yes",
        "%20",
        "0123456789ABCDEF01234567",
        "0123456789abcdef0123456",
        "0123456789abcdef012345678",
        "%C3%A9",
        long.as_str(),
    ];
    for id in ids {
        for (method, tail, body) in [
            ("GET", "", ""),
            ("DELETE", "", ""),
            ("POST", "/execute", r#"{"code": "1"}"#),
            ("POST", "/interrupt", ""),
            ("POST", "/restart", ""),
        ] {
            let request = format!(
                "{method} /v1/sessions/{id}{tail} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\
                 Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
                body.len()
            );
            let r = app.raw(request.as_bytes()).await;
            let what = format!("{method} /v1/sessions/{}{tail}", &id[..id.len().min(40)]);
            assert_eq!(r.status, Some(404), "{what}: {}", r.head);
            assert_error_shape(&r.body, "not_found");
        }
    }
    // Escapes that do not decode to UTF-8 cannot be an id at all: a 400, still in the JSON shape.
    for id in ["%FF", "%C3", "%ff%fe%fd"] {
        let r =
            app.raw(format!("GET /v1/sessions/{id} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await;
        assert_eq!(r.status, Some(400), "{id}: {}", r.head);
        assert_client_error(400, &r.body, id);
    }
    // Paths that walk out of /v1/sessions are no route: the JSON 404 (or 405), never a file.
    for path in [
        "/v1/sessions/../../etc/passwd",
        "/v1/sessions/./",
        "/v1/sessions//execute",
        "/v1/sessions/x/execute/..",
        "/v1/../healthz/..",
        "//v1/sessions",
        "/docs/../../etc/passwd",
        "/docs/no-such-file.js",
    ] {
        let r = app.raw(format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await;
        let status = r.status.unwrap_or_else(|| panic!("{path}: no answer"));
        assert_client_error(status, &r.body, path);
        assert!(!r.head.contains("X-Injected") && !r.head.contains("x-injected"), "{}", r.head);
    }
    // An id longer than a URI may be (64 KiB) is refused by the HTTP layer itself: a bare 4xx, no 5xx.
    let huge = "a".repeat(100_000);
    let r =
        app.raw(format!("GET /v1/sessions/{huge} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes()).await;
    if let Some(status) = r.status {
        assert!((400..500).contains(&status), "{}", r.head);
    }
    // A method the route does not have: the JSON 405.
    let r = app.client.patch(app.url(&format!("/v1/sessions/{SOME_ID}"))).send().await.unwrap();
    assert_eq!(r.status(), 405);
    assert_error_shape(&r.json().await.unwrap(), "method_not_allowed");
    assert_eq!(app.get("/healthz").await.0, 200, "the service is unharmed");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_20_mb_body_is_a_413_in_json() {
    let app = spawn_app_with(no_kernels()).await;
    let code = "x".repeat(20 * 1024 * 1024);
    let body = serde_json::to_vec(&json!({"code": code})).unwrap();
    for path in ["/v1/sessions".to_owned(), format!("/v1/sessions/{SOME_ID}/execute")] {
        // With a Content-Length: refused before a byte of the body is read.
        let r = app
            .post_bytes(&path, body.clone())
            .await
            .unwrap_or_else(|e| panic!("{path}: no answer to a 20 MB body: {e:?}"));
        assert_eq!(r.status(), 413, "{path}");
        assert_error_shape(&r.json().await.unwrap(), "payload_too_large");

        // Chunked, with no length announced: refused once 16 MiB have arrived.
        let chunks: Vec<Result<Vec<u8>, std::io::Error>> = body.chunks(1 << 20).map(|c| Ok(c.to_vec())).collect();
        let r = app
            .client
            .post(app.url(&path))
            .header("content-type", "application/json")
            .body(reqwest::Body::wrap_stream(futures::stream::iter(chunks)))
            .send()
            .await;
        // The server answers before the client has sent everything, and reads the rest so that the
        // client, still writing, is not reset before it sees the answer.
        let r = r.unwrap_or_else(|e| panic!("{path}: no answer to a chunked 20 MB body: {e:?}"));
        assert_eq!(r.status(), 413, "{path}");
        assert_error_shape(&r.json().await.unwrap(), "payload_too_large");
    }
    // Just under the limit is read (and then refused for what it says, not for its size).
    let r = app.post(&format!("/v1/sessions/{SOME_ID}/execute"), json!({"code": "x".repeat(15 << 20)})).await;
    assert_eq!(r.0, 404, "{}", r.1);
    assert_eq!(app.get("/healthz").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn malformed_json_is_a_400_in_json() {
    let app = spawn_app_with(no_kernels()).await;
    let deep = "[".repeat(100_000);
    let bodies: Vec<(&str, Vec<u8>)> = vec![
        ("empty", vec![]),
        ("truncated", br#"{"language": "pyth"#.to_vec()),
        ("not json", b"language=python".to_vec()),
        ("an array", b"[]".to_vec()),
        ("null", b"null".to_vec()),
        ("a string", br#""python""#.to_vec()),
        ("trailing garbage", br#"{"language": "python"} {}"#.to_vec()),
        ("wrong type", br#"{"language": 5}"#.to_vec()),
        ("unknown field", br#"{"language": "python", "privileged": true}"#.to_vec()),
        ("negative memory", br#"{"language": "python", "memory_mb": -1}"#.to_vec()),
        ("huge number", br#"{"language": "python", "memory_mb": 1e400}"#.to_vec()),
        ("NaN", br#"{"language": "python", "cpus": NaN}"#.to_vec()),
        ("invalid UTF-8", b"{\"language\": \"\xff\xfe\"}".to_vec()),
        ("a lone surrogate", br#"{"language": "\ud800"}"#.to_vec()),
        ("deep nesting", deep.into_bytes()),
    ];
    for (what, body) in bodies {
        for path in ["/v1/sessions".to_owned(), format!("/v1/sessions/{SOME_ID}/execute")] {
            let r = app.post_bytes(&path, body.clone()).await.unwrap();
            let status = r.status().as_u16();
            let v: Value = r.json().await.unwrap_or(Value::Null);
            assert_client_error(status, &v, &format!("{what} to {path}"));
        }
    }
    // Valid JSON that is not a session request is a 4xx too, before any container is made.
    for body in
        [json!({"language": ""}), json!({"language": "../../python"}), json!({"language": "python", "env": {"": "x"}})]
    {
        let (status, v) = app.post("/v1/sessions", body.clone()).await;
        assert_client_error(status, &v, &body.to_string());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_wrong_content_type_is_a_415_in_json() {
    let app = spawn_app_with(no_kernels()).await;
    let body = r#"{"language": "python"}"#;
    for content_type in [
        None,
        Some("text/plain"),
        Some("application/x-www-form-urlencoded"),
        Some("multipart/form-data; boundary=x"),
        Some("application/xml"),
        Some("application/jsonx"),
        Some("json"),
        Some(""),
    ] {
        let mut request =
            format!("POST /v1/sessions HTTP/1.1\r\nHost: x\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
        if let Some(ct) = content_type {
            request.push_str(&format!("Content-Type: {ct}\r\n"));
        }
        request.push_str("\r\n");
        request.push_str(body);
        let r = app.raw(request.as_bytes()).await;
        let status = r.status.unwrap_or_else(|| panic!("{content_type:?}: no answer: {}", r.head));
        assert!(status == 415 || status == 400, "{content_type:?}: {}", r.head);
        assert_client_error(status, &r.body, &format!("{content_type:?}"));
    }
    // A header value with a control byte is refused by the HTTP layer before the API sees it: a bare 400.
    let r = app.raw(b"POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\x7f\r\n\r\n").await;
    assert_eq!(r.status, Some(400), "{}", r.head);
}

/// Writes `bytes` one per `every`, until the server closes the connection (then returns how long that
/// took) or everything is sent (then panics: the server waited for a slow-loris client).
async fn dribble(addr: &str, head: &[u8], bytes: &[u8], every: Duration) -> (Duration, Vec<u8>) {
    let stream = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (mut reader, mut writer) = stream.into_split();
    let started = Instant::now();
    let read = tokio::spawn(async move {
        let mut got = Vec::new();
        let _ = reader.read_to_end(&mut got).await;
        got
    });
    writer.write_all(head).await.unwrap();
    for b in bytes {
        if read.is_finished() || writer.write_all(&[*b]).await.is_err() {
            break;
        }
        tokio::time::sleep(every).await;
    }
    let got = tokio::time::timeout(Duration::from_secs(5), read)
        .await
        .expect("the server kept a slow-loris connection open")
        .unwrap();
    (started.elapsed(), got)
}

#[tokio::test(flavor = "multi_thread")]
async fn slow_loris_headers_are_cut_off_and_idle_connections_closed() {
    let app = spawn_app_with(AppOptions { http: http(&["--header-read-timeout-s", "2"]), ..no_kernels() }).await;
    // 40 bytes of headers at one a second would take 40 s; the server gives up after 2.
    let headers = b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: 1234567890\r\n\r\n";
    let (took, got) = dribble(&app.addr(), b"", headers, Duration::from_secs(1)).await;
    assert!(took < Duration::from_secs(15), "closed after {took:?}");
    let r = parse_raw(&got);
    assert!(r.status.is_none() || r.status == Some(408), "a closed connection or a 408: {}", r.head);

    // A connection that never says anything is closed too.
    let mut silent = tokio::net::TcpStream::connect(app.addr()).await.unwrap();
    let mut buf = [0u8; 64];
    let n = tokio::time::timeout(Duration::from_secs(15), silent.read(&mut buf)).await;
    assert!(matches!(n, Ok(Ok(0)) | Ok(Err(_))), "a silent connection was kept: {n:?}");

    // The same for a keep-alive connection left idle after a request.
    let mut idle = tokio::net::TcpStream::connect(app.addr()).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let n = idle.read(&mut buf).await.unwrap();
    assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"));
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(15), idle.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "an idle keep-alive connection was kept");

    assert_eq!(app.get("/healthz").await.0, 200, "prompt clients are served as before");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_slow_loris_body_is_a_408_or_a_closed_connection() {
    let app = spawn_app_with(AppOptions { http: http(&["--body-read-timeout-s", "2"]), ..no_kernels() }).await;
    let body = br#"{"language": "python", "metadata": {"a": "bcdefghijklmnopqrstuvwxyz"}}"#;
    let head = format!(
        "POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    let (took, got) = dribble(&app.addr(), head.as_bytes(), body, Duration::from_secs(1)).await;
    assert!(took < Duration::from_secs(15), "answered after {took:?}");
    let r = parse_raw(&got);
    if r.status.is_some() {
        assert_eq!(r.status, Some(408), "{}", r.head);
        assert_error_shape(&r.body, "request_timeout");
    }

    // Chunked: each chunk on time, the whole too slow.
    let head =
        "POST /v1/sessions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    let chunks: Vec<u8> = body.iter().flat_map(|b| [b"1\r\n".as_slice(), &[*b], b"\r\n"].concat()).collect();
    let (took, got) = dribble(&app.addr(), head.as_bytes(), &chunks, Duration::from_millis(300)).await;
    assert!(took < Duration::from_secs(15), "answered after {took:?}");
    let r = parse_raw(&got);
    if r.status.is_some() {
        assert_eq!(r.status, Some(408), "{}", r.head);
        assert_error_shape(&r.body, "request_timeout");
    }
    // A body that is merely not instant is fine.
    let (status, v) = app.post(&format!("/v1/sessions/{SOME_ID}/execute"), json!({"code": "1"})).await;
    assert_eq!(status, 404, "{v}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_stop_closes_idle_connections_at_once_and_cuts_a_slow_loris_client() {
    let app = spawn_app_with(AppOptions { http: http(&["--header-read-timeout-s", "60"]), ..no_kernels() }).await;
    let mut slow = tokio::net::TcpStream::connect(app.addr()).await.unwrap();
    slow.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slo").await.unwrap();
    let mut idle = tokio::net::TcpStream::connect(app.addr()).await.unwrap();
    idle.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n").await.unwrap();
    let mut buf = [0u8; 256];
    assert!(idle.read(&mut buf).await.unwrap() > 0);

    let stopping = tokio::spawn(app.stop());
    let mut rest = Vec::new();
    let closed = tokio::time::timeout(Duration::from_secs(3), idle.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "an idle keep-alive connection is closed when the stop begins");
    // The half-sent request is waited for (the grace period, then the 10 s the cut sessions get), not
    // for its 60 s header timeout.
    tokio::time::timeout(Duration::from_secs(30), stopping).await.expect("the service stopped").unwrap();
    let closed = tokio::time::timeout(Duration::from_secs(5), slow.read_to_end(&mut rest)).await;
    assert!(closed.is_ok(), "the slow-loris connection is cut when the service stops");
}

async fn get_as(app: &TestApp, key: Option<&str>) -> reqwest::Response {
    let mut r = app.client.get(app.url("/v1/sessions"));
    if let Some(key) = key {
        r = r.bearer_auth(key);
    }
    r.send().await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_rate_limit_is_per_key_and_strangers_spend_nothing() {
    // One token a minute after a burst of 5: nothing refills during the test.
    let app = spawn_app_with(AppOptions {
        api_keys: vec!["key-a".into(), "key-b".into()],
        http: http(&["--rate-limit-per-minute", "1", "--rate-limit-burst", "5"]),
        ..no_kernels()
    })
    .await;
    for _ in 0..20 {
        assert_eq!(get_as(&app, None).await.status(), 401);
        assert_eq!(get_as(&app, Some("key-c")).await.status(), 401);
    }
    for i in 0..5 {
        assert_eq!(get_as(&app, Some("key-a")).await.status(), 200, "request {i} of the burst");
    }
    let limited = get_as(&app, Some("key-a")).await;
    assert_eq!(limited.status(), 429);
    let retry_after: u64 = limited.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=60).contains(&retry_after), "Retry-After: {retry_after}");
    assert_error_shape(&limited.json().await.unwrap(), "rate_limited");
    // Every /v1 route shares the key's bucket; the limit answers before the body is even read.
    let r = app.client.post(app.url("/v1/sessions")).bearer_auth("key-a").body("{not json").send().await.unwrap();
    assert_eq!(r.status(), 429);

    for i in 0..5 {
        assert_eq!(get_as(&app, Some("key-b")).await.status(), 200, "key-b's request {i}: its own full budget");
    }
    assert_eq!(get_as(&app, Some("key-b")).await.status(), 429);
    assert_eq!(app.get("/healthz").await.0, 200, "health checks are not limited");
    assert_eq!(app.get("/openapi.json").await.0, 200);
}

#[tokio::test(flavor = "multi_thread")]
async fn without_keys_the_rate_limit_is_per_client_address() {
    let app = spawn_app_with(AppOptions {
        http: http(&["--rate-limit-per-minute", "1", "--rate-limit-burst", "3"]),
        ..no_kernels()
    })
    .await;
    for _ in 0..3 {
        assert_eq!(get_as(&app, None).await.status(), 200);
    }
    let limited = get_as(&app, None).await;
    assert_eq!(limited.status(), 429);
    assert!(limited.headers().contains_key("retry-after"));
    // Another loopback address (all of 127/8 is this host) is another client.
    let other =
        reqwest::Client::builder().local_address("127.0.0.2".parse::<std::net::IpAddr>().unwrap()).build().unwrap();
    let r = other.get(app.url("/v1/sessions")).send().await.unwrap();
    assert_eq!(r.status(), 200, "another address has its own bucket");
}
