//! Running code: outputs in Jupyter's shapes, state between calls, errors, streaming, the queue, the
//! output cap, timeouts and interrupts.

use std::time::Duration;

use futures::StreamExt;
use serde_json::json;

use crate::helpers::*;

#[tokio::test(flavor = "multi_thread")]
async fn python_outputs_keep_their_jupyter_shapes_and_state_persists() {
    let app = spawn_app().await;
    let id = app.start("python").await;

    let r = app.exec(&id, "print(6*7)").await;
    assert_eq!(r["status"], "ok");
    assert_eq!(r["stdout"], "42\n");
    assert_eq!(r["outputs"][0], json!({"output_type": "stream", "name": "stdout", "text": "42\n"}));
    assert!(r["duration_ms"].is_u64());

    app.exec(&id, "x = 41").await;
    let r = app.exec(&id, "x + 1").await;
    assert_eq!(result_text(&r).as_deref(), Some("42"), "state persists: {r}");
    assert_eq!(r["execution_count"], 3);

    let r = app.exec(&id, "import sys; print('warn', file=sys.stderr)").await;
    assert_eq!(r["stderr"], "warn\n");

    let r = app.exec(&id, "1/0").await;
    assert_eq!(r["status"], "error");
    assert_eq!(r["error"]["ename"], "ZeroDivisionError");
    assert!(r["error"]["traceback"].as_array().is_some_and(|t| !t.is_empty()));
    assert!(r["outputs"].as_array().unwrap().iter().any(|o| o["output_type"] == "error"));

    let r = app.exec(&id, "from IPython.display import HTML, display\ndisplay(HTML('<b>bold</b>'))").await;
    assert!(display_mimes(&r).contains(&"text/html".to_string()), "{r}");

    let r = app.exec(&id, "import matplotlib.pyplot as plt\nplt.plot([1, 2, 3])\nplt.show()").await;
    assert_eq!(r["status"], "ok", "{r}");
    assert!(display_mimes(&r).contains(&"image/png".to_string()), "a plot is an image/png display: {r}");

    let r = app.exec(&id, "import json\nfrom IPython.display import JSON\nJSON({'a': 1})").await;
    let data =
        r["outputs"].as_array().unwrap().iter().find(|o| o["output_type"] == "execute_result").unwrap()["data"].clone();
    assert_eq!(data["application/json"], json!({"a": 1}));
}

#[tokio::test(flavor = "multi_thread")]
async fn outputs_stream_as_server_sent_events_while_code_runs() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    let response = app
        .client
        .post(app.url(&format!("/v1/sessions/{id}/execute")))
        .header("accept", "text/event-stream")
        .json(
            &json!({"code": "import time\nfor i in range(3):\n    print(i, flush=True)\n    time.sleep(0.3)\n'done'"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert!(response.headers()["content-type"].to_str().unwrap().starts_with("text/event-stream"));
    let mut body = response.bytes_stream();
    let mut text = String::new();
    let mut outputs_before_result = 0;
    while let Some(chunk) = body.next().await {
        text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        if !text.contains("event: result") {
            outputs_before_result = text.matches("event: output").count();
        }
        if text.contains("event: result") && text.ends_with("\n\n") {
            break;
        }
    }
    assert!(outputs_before_result >= 3, "each print arrived as its own event before the result: {text}");
    let result_line = text.lines().skip_while(|l| *l != "event: result").nth(1).unwrap();
    let result: serde_json::Value = serde_json::from_str(result_line.strip_prefix("data: ").unwrap()).unwrap();
    assert_eq!(result["status"], "ok");
    assert_eq!(result["stdout"], "0\n1\n2\n");
    assert_eq!(result_text(&result).as_deref(), Some("'done'"));
}

#[tokio::test(flavor = "multi_thread")]
async fn executions_run_one_at_a_time_in_order_and_a_full_queue_is_429() {
    let app = spawn_app_with(AppOptions { limits: limits(&["--queue-depth", "2"]), ..Default::default() }).await;
    let id = app.start("python").await;
    app.exec(&id, "log = []").await;
    let mut calls = Vec::new();
    for i in 0..3 {
        // The first blocks the kernel; two more fill the queue of two.
        let code = format!("import time\nlog.append({i})\ntime.sleep({})", if i == 0 { 1.5 } else { 0.1 });
        let (client, url) = (app.client.clone(), app.url(&format!("/v1/sessions/{id}/execute")));
        calls.push(tokio::spawn(async move {
            client.post(url).json(&json!({"code": code})).send().await.unwrap().status().as_u16()
        }));
        tokio::time::sleep(Duration::from_millis(150)).await;
    }
    let (status, v) = app.exec_with(&id, json!({"code": "log.append(99)"})).await;
    assert_eq!(status, 429, "{v}");
    assert_error_shape(&v, "queue_full");
    for call in calls {
        assert_eq!(call.await.unwrap(), 200);
    }
    let r = app.exec(&id, "log").await;
    assert_eq!(result_text(&r).as_deref(), Some("[0, 1, 2]"), "in arrival order, the refused one never ran");
}

#[tokio::test(flavor = "multi_thread")]
async fn output_past_the_cap_is_cut_with_a_marker() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    let r = app.exec(&id, "for _ in range(40):\n    print('x' * 100_000)").await;
    assert_eq!(r["status"], "ok");
    assert_eq!(r["truncated"], true);
    let stdout = r["stdout"].as_str().unwrap();
    assert!(stdout.len() < (1 << 20) + 200, "about the 1 MiB cap: {}", stdout.len());
    assert!(stdout.contains("[kernelbox: output truncated"));
    let r = app.exec(&id, "import numpy\n'still fine'").await;
    assert_eq!(r["truncated"], false, "the cap is per execution");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_timeout_interrupts_the_kernel_and_the_session_keeps_its_state() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    app.exec(&id, "kept = 'yes'").await;
    let (status, r) = app
        .exec_with(&id, json!({"code": "import time\nprint('before', flush=True)\ntime.sleep(60)", "timeout_s": 2}))
        .await;
    assert_eq!(status, 200);
    assert_eq!(r["status"], "timeout", "{r}");
    assert_eq!(r["stdout"], "before\n", "the output so far is returned");
    assert_eq!(r["kernel_restarted"], false);
    assert!(r["duration_ms"].as_u64().unwrap() < 10_000);
    let r = app.exec(&id, "kept").await;
    assert_eq!(result_text(&r).as_deref(), Some("'yes'"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kernel_that_ignores_the_interrupt_is_restarted_and_the_response_says_so() {
    let app = spawn_app_with(AppOptions { limits: limits(&["--interrupt-grace-s", "2"]), ..Default::default() }).await;
    let id = app.start("python").await;
    app.exec(&id, "lost = 1").await;
    let stubborn =
        "import time\nwhile True:\n    try:\n        time.sleep(0.1)\n    except KeyboardInterrupt:\n        pass";
    let (_, r) = app.exec_with(&id, json!({"code": stubborn, "timeout_s": 1})).await;
    assert_eq!(r["status"], "timeout", "{r}");
    assert_eq!(r["kernel_restarted"], true);
    let r = app.exec(&id, "lost").await;
    assert_eq!(r["status"], "error");
    assert_eq!(r["error"]["ename"], "NameError", "a restarted kernel has fresh state");
}

#[tokio::test(flavor = "multi_thread")]
async fn interrupt_stops_the_running_code() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    let (client, url) = (app.client.clone(), app.url(&format!("/v1/sessions/{id}/execute")));
    let running = tokio::spawn(async move {
        client
            .post(url)
            .json(&json!({"code": "import time\ntime.sleep(60)"}))
            .send()
            .await
            .unwrap()
            .json::<serde_json::Value>()
            .await
            .unwrap()
    });
    tokio::time::sleep(Duration::from_secs(1)).await;
    let (status, _) = app.post(&format!("/v1/sessions/{id}/interrupt"), json!({})).await;
    assert_eq!(status, 202);
    let r = tokio::time::timeout(Duration::from_secs(20), running).await.expect("interrupted promptly").unwrap();
    assert_eq!(r["status"], "error", "{r}");
    assert_eq!(r["error"]["ename"], "KeyboardInterrupt");
    assert_eq!(result_text(&app.exec(&id, "2*21").await).as_deref(), Some("42"));
}

#[tokio::test(flavor = "multi_thread")]
async fn an_exception_with_a_huge_message_keeps_its_name_and_a_cut_value() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    let v = app.exec(&id, "raise ValueError('x' * 20_000_000)").await;
    assert_eq!(v["status"], "error", "{}", &v.to_string()[..500.min(v.to_string().len())]);
    assert_eq!(v["error"]["ename"], "ValueError");
    let evalue = v["error"]["evalue"].as_str().unwrap();
    assert!(
        evalue.starts_with("xxxx") && evalue.ends_with("[kernelbox: message cut]"),
        "{}",
        &evalue[evalue.len() - 60..]
    );
    assert!(v.to_string().len() <= 1 << 20, "within the output cap");
    assert_eq!(app.exec(&id, "print('alive')").await["stdout"], "alive\n");
}
