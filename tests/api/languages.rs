//! Every language: its image answers over ZeroMQ in a sealed container, and a session starts, runs
//! "print 6*7" and ends. And a second image build rebuilds nothing.

use serde_json::json;

use crate::helpers::*;

/// Starts a session, checks the language its kernel reports over ZeroMQ (`kernel_info`), runs the
/// language's "print 6*7" and checks for 42, then ends the session.
async fn check(app: &TestApp, language: &str, kernel_language: &str, code: &str) {
    let (status, s) = app.post("/v1/sessions", json!({"language": language})).await;
    assert_eq!(status, 201, "{language}: {s}");
    assert_eq!(
        s["kernel"]["language"].as_str().map(str::to_lowercase).as_deref(),
        Some(kernel_language),
        "{language}: {s}"
    );
    let id = s["id"].as_str().unwrap();
    let r = app.exec(id, code).await;
    assert_eq!(r["status"], "ok", "{language}: {r}");
    let shown = format!("{}{}", r["stdout"].as_str().unwrap_or(""), result_text(&r).unwrap_or_default());
    assert!(shown.contains("42"), "{language} printed 42: {r}");
    let r2 = app.exec(id, code).await;
    assert!(
        r2["execution_count"].as_u64() > r["execution_count"].as_u64() || r2["execution_count"].is_null(),
        "{language}: {r2}"
    );
    assert_eq!(app.delete(&format!("/v1/sessions/{id}")).await, 204, "{language}");
}

#[tokio::test(flavor = "multi_thread")]
async fn every_language_starts_runs_and_ends() {
    let app = spawn_app().await;
    let scientific =
        "import numpy as np, pandas as pd, scipy, sklearn, sympy, seaborn, statsmodels\nprint(int(np.int64(6) * 7))";
    check(&app, "python", "python", "print(6*7)").await;
    check(&app, "python_scientific", "python", scientific).await;
    check(&app, "javascript", "typescript", "console.log(6*7)").await;
    check(&app, "typescript", "typescript", "const n: number = 6 * 7;\nconsole.log(n)").await;
    check(&app, "java", "java", "System.out.println(6*7);").await;
    check(&app, "bash", "bash", "echo $((6*7))").await;
    assert!(app.containers().await.is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn every_language_is_listed_with_its_image() {
    let app = spawn_app().await;
    let (status, langs) = app.get("/v1/languages").await;
    assert_eq!(status, 200);
    let names: Vec<&str> = langs.as_array().unwrap().iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["python", "python_scientific", "javascript", "typescript", "java", "bash"]);
    for l in langs.as_array().unwrap() {
        assert_eq!(l["available"], true, "{l}");
        assert!(l["language_version"].is_string(), "{l}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_second_image_build_with_nothing_changed_rebuilds_nothing() {
    ensure_images().await;
    let builder = image_builder(docker().await);
    let mut sink = Vec::new();
    let summaries = builder.build(&[], false, &mut sink).await.unwrap();
    assert_eq!(summaries.len(), 8, "base, supervisor, python_core and five language images");
    for s in &summaries {
        assert_eq!(s.outcome, kernelbox::images::builder::Outcome::UpToDate, "{} was rebuilt", s.image);
    }
    let rows = builder.status().await.unwrap();
    assert!(rows.iter().all(|r| r.state == "up to date"), "{rows:?}");
}
