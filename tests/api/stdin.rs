//! stdin: `input()` and its kin in real kernels, answered from the request's `stdin` list, or asked of a
//! streaming caller (`input_request` event, `POST /v1/sessions/{id}/input`), or refused at once with a
//! clear error when nobody can answer.

use std::time::Duration;

use futures::StreamExt;
use serde_json::{Value, json};

use crate::helpers::*;

/// A streamed execution read event by event.
pub struct EventStream {
    body: futures::stream::BoxStream<'static, reqwest::Result<bytes::Bytes>>,
    buffer: String,
}

impl EventStream {
    pub async fn open(app: &TestApp, id: &str, body: Value) -> EventStream {
        let response = app
            .client
            .post(app.url(&format!("/v1/sessions/{id}/execute")))
            .header("accept", "text/event-stream")
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 200);
        EventStream { body: response.bytes_stream().boxed(), buffer: String::new() }
    }

    /// The next event's name and data.
    pub async fn next(&mut self) -> (String, Value) {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let name = block.lines().find_map(|l| l.strip_prefix("event: ")).unwrap_or("").to_owned();
                let data = block.lines().find_map(|l| l.strip_prefix("data: ")).unwrap_or("null");
                if name.is_empty() {
                    continue; // a keep-alive comment
                }
                return (name, serde_json::from_str(data).unwrap_or(Value::Null));
            }
            let chunk = tokio::time::timeout(Duration::from_secs(60), self.body.next())
                .await
                .expect("an event within a minute")
                .expect("the stream goes on until its result")
                .unwrap();
            self.buffer.push_str(&String::from_utf8_lossy(&chunk));
        }
    }

    /// Reads until an event named `name`, returning its data.
    pub async fn until(&mut self, name: &str) -> Value {
        loop {
            let (event, data) = self.next().await;
            if event == name {
                return data;
            }
            assert_ne!(event, "result", "the execution ended before `{name}`: {data}");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn python_input_and_getpass_take_the_requests_stdin_in_order() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    let code = "import getpass\nname = input('name? ')\npw = getpass.getpass('pw: ')\nprint(f'{name}:{len(pw)}')";
    let (status, r) = app.exec_with(&id, json!({"code": code, "stdin": ["Ada", "secret"]})).await;
    assert_eq!(status, 200, "{r}");
    assert_eq!(r["status"], "ok", "{r}");
    assert!(r["stdout"].as_str().unwrap().ends_with("Ada:6\n"), "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_blocking_call_without_answers_gets_a_clear_error_at_once_and_the_session_goes_on() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    app.exec(&id, "kept = 'yes'").await;
    let started = std::time::Instant::now();
    let r = app.exec(&id, "x = input('your name? ')").await;
    assert!(started.elapsed() < Duration::from_secs(15), "refused at once, not at the timeout");
    assert_eq!(r["status"], "error", "{r}");
    assert_eq!(r["error"]["ename"], "InputRequired");
    let message = r["error"]["evalue"].as_str().unwrap();
    assert!(message.contains("your name? ") && message.contains("stdin") && message.contains("/input"), "{message}");
    assert_eq!(result_text(&app.exec(&id, "kept").await).as_deref(), Some("'yes'"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streaming_caller_answers_the_input_request_event() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    let (status, v) = app.post(&format!("/v1/sessions/{id}/input"), json!({"value": "early"})).await;
    assert_eq!(status, 409, "nothing waits yet: {v}");
    assert_error_shape(&v, "no_input_waiting");
    let code = "import getpass\na = input('first? ')\nb = getpass.getpass('second? ')\nprint(a, b)";
    let mut events = EventStream::open(&app, &id, json!({"code": code, "stdin": ["one"]})).await;
    let asked = events.until("input_request").await;
    assert_eq!(asked, json!({"prompt": "second? ", "password": true}), "the first came from `stdin`");
    let (status, _) = app.post(&format!("/v1/sessions/{id}/input"), json!({"value": "two"})).await;
    assert_eq!(status, 204);
    let result = events.until("result").await;
    assert_eq!(result["status"], "ok", "{result}");
    assert!(result["stdout"].as_str().unwrap().ends_with("one two\n"), "{result}");
    let (status, _) = app.post("/v1/sessions/000000000000000000000000/input", json!({"value": "x"})).await;
    assert_eq!(status, 404);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_prompt_nobody_answers_ends_with_the_executions_timeout() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    let mut events = EventStream::open(&app, &id, json!({"code": "input('? ')", "timeout_s": 2})).await;
    events.until("input_request").await;
    let result = events.until("result").await;
    assert_eq!(result["status"], "timeout", "{result}");
    let (status, _) = app.post(&format!("/v1/sessions/{id}/input"), json!({"value": "late"})).await;
    assert_eq!(status, 409);
    assert_eq!(result_text(&app.exec(&id, "1 + 1").await).as_deref(), Some("2"));
}

/// Deno's `prompt()` and Java's `System.in` ask through Jupyter's stdin channel, like Python's `input()`.
#[tokio::test(flavor = "multi_thread")]
async fn javascript_prompt_and_java_system_in_take_the_requests_stdin() {
    let app = spawn_app().await;
    let cases = [
        ("javascript", "const who = prompt('name?');\nconsole.log(`hi ${who}`);"),
        ("java", "var in = new java.util.Scanner(System.in);\nSystem.out.println(\"hi \" + in.nextLine());"),
    ];
    for (language, code) in cases {
        let id = app.start(language).await;
        let (status, r) = app.exec_with(&id, json!({"code": code, "stdin": ["Ada"], "timeout_s": 30})).await;
        assert_eq!(status, 200, "{language}: {r}");
        assert_eq!(r["status"], "ok", "{language}: {r}");
        assert!(r["stdout"].as_str().unwrap().contains("hi Ada"), "{language}: {r}");
    }
}

/// bash_kernel drives bash through a terminal and has no stdin channel: `read` waits on that terminal, so
/// it is never asked for, and ends at the execution's timeout (interrupted, the session kept). A
/// here-string gives `read` its input instead.
#[tokio::test(flavor = "multi_thread")]
async fn bash_read_has_no_stdin_channel_and_ends_at_the_timeout() {
    let app = spawn_app().await;
    let id = app.start("bash").await;
    let (_, r) = app.exec_with(&id, json!({"code": "read -p 'name? ' who", "stdin": ["Ada"], "timeout_s": 3})).await;
    assert_eq!(r["status"], "timeout", "{r}");
    let r = app.exec(&id, "read who <<< 'Ada'\necho \"hi $who\"").await;
    assert_eq!(r["status"], "ok", "{r}");
    assert!(r["stdout"].as_str().unwrap().contains("hi Ada"), "{r}");
}
