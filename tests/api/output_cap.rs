//! The output cap counts printed text once: a print of 900 KiB comes back whole under the default 1 MiB
//! cap, and the whole response stays within the cap plus a small constant.

use serde_json::{Value, json};

use crate::helpers::*;

/// The default `--output-limit-bytes`.
const CAP: usize = 1 << 20;
/// What the response may carry beyond the cap: `CAP_SLACK` (2 KiB: markers and a brief error) and the
/// response's fixed fields (status, counts, flags), as README.md states it.
const BEYOND_THE_CAP: usize = 3 * 1024;

/// Runs `code`; the response as it came (its body's size is the point).
async fn execute_raw(app: &TestApp, id: &str, code: &str) -> reqwest::Response {
    let body = serde_json::to_vec(&json!({ "code": code })).unwrap();
    app.post_bytes(&format!("/v1/sessions/{id}/execute"), body).await.unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_print_of_900_kib_comes_back_whole_within_the_cap() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    let line = format!("{}\n", "x".repeat(1023));
    let code = "import sys\nsys.stdout.write(('x' * 1023 + '\\n') * 900)";
    let response = execute_raw(&app, &id, code).await;
    assert_eq!(response.status(), 200);
    let body = response.bytes().await.unwrap();
    let r: Value = serde_json::from_slice(&body).unwrap();
    let printed: String = r["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|o| o["output_type"] == "stream" && o["name"] == "stdout")
        .map(|o| o["text"].as_str().unwrap())
        .collect();
    assert_eq!(printed.len(), 900 * 1024, "every byte printed is in the outputs");
    assert!(printed == line.repeat(900), "and unchanged");
    assert_eq!((r["status"].as_str(), r["truncated"].as_bool()), (Some("ok"), Some(false)), "nothing was lost");
    // The text did not fit twice: `stdout` carries its beginning and its end and says where the rest is.
    let stdout = r["stdout"].as_str().unwrap();
    assert_eq!(r["streams_abridged"], true);
    assert!(stdout.starts_with(&line) && stdout.ends_with(&line), "{}", &stdout[..200]);
    assert!(stdout.contains("`outputs` has the whole text]\n"), "{}", &stdout[..200]);
    eprintln!("FIGURE output cap: a 900 KiB print, a response of {} bytes (cap {CAP})", body.len());
    assert!(body.len() <= CAP + BEYOND_THE_CAP, "the response is {} bytes", body.len());

    // Small output: `stdout` repeats it whole, as always.
    let r = app.exec(&id, "print('small')").await;
    assert_eq!((r["stdout"].as_str(), r.get("streams_abridged")), (Some("small\n"), None), "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_print_past_the_cap_is_cut_and_the_response_stays_within_it() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    let code = "import sys\nsys.stdout.write('y' * 3_000_000)\nsys.stderr.write('z' * 500_000)";
    let response = execute_raw(&app, &id, code).await;
    let body = response.bytes().await.unwrap();
    let r: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(r["truncated"], true, "{}", &String::from_utf8_lossy(&body)[..300]);
    eprintln!("FIGURE output cap: 3.5 MB printed, a response of {} bytes (cap {CAP})", body.len());
    assert!(body.len() <= CAP + BEYOND_THE_CAP, "the response is {} bytes", body.len());
}
