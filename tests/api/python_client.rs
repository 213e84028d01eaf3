//! The Python client (`clients/python`, package `kernelbox`) as its users get it: built as a wheel, checked
//! with `mypy --strict`, installed from that wheel (with the dependencies it declares) into a venv, and its
//! own pytest suite (`clients/python/tests`) run against two real services spawned here: one with a
//! small per-key session limit and a queue of one, and one with a small rate limit for the 429 tests. A
//! pytest failure fails this test with pytest's output; the services' containers go with them either way.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::helpers::*;

const KEY: &str = "python-client-key-a";
const OTHER_KEY: &str = "python-client-key-b";
/// The main service's `--max-sessions-per-owner` and `--queue-depth`, small so the client's
/// `TooManySessions` and `QueueFull` can be reached; the Python tests read them from the environment.
const SESSIONS_PER_KEY: &str = "2";
const QUEUE_DEPTH: &str = "1";

/// The test tools, and the client's dependencies pinned to one version each so a type check is repeatable
/// (the client itself declares compatible ranges, and installing its wheel checks they are met).
const TOOLS: &[&str] = &["pytest==9.2.0", "mypy==2.4.1", "hatchling==1.33.0", "httpx==0.29.0", "httpx-sse==0.4.3"];

fn client_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("clients/python")
}

/// Runs `python args...` in `dir` with `env`, bounded by `limit`; panics with its output unless it succeeds.
async fn python_step(
    python: &Path,
    dir: &Path,
    args: &[&str],
    env: &[(&str, String)],
    limit: Duration,
    what: &str,
) -> String {
    let mut command = tokio::process::Command::new(python);
    command.args(args).current_dir(dir).stdin(std::process::Stdio::null()).kill_on_drop(true);
    // Loopback is never proxied, whatever this machine's proxy settings are.
    let no_proxy =
        std::env::var("NO_PROXY").map(|v| format!("{v},127.0.0.1,localhost")).unwrap_or("127.0.0.1,localhost".into());
    command.env("NO_PROXY", &no_proxy).env("no_proxy", &no_proxy);
    // The source tree stays as checked out (no __pycache__ next to the tests).
    command.env("PYTHONDONTWRITEBYTECODE", "1");
    for (name, value) in env {
        command.env(name, value);
    }
    let out = tokio::time::timeout(limit, command.output())
        .await
        .unwrap_or_else(|_| panic!("{what} did not finish within {limit:?}"))
        .unwrap_or_else(|e| panic!("{what}: {e}"));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{what} failed ({}):\n{stdout}\n{stderr}", out.status);
    stdout
}

#[tokio::test(flavor = "multi_thread")]
async fn the_python_client_builds_type_checks_and_passes_its_own_tests_against_the_real_service() {
    let python = tokio::task::spawn_blocking(|| tool_python("python-client", TOOLS)).await.unwrap();
    let dir = client_dir();
    let work = tempfile::tempdir().unwrap();
    let wheels = work.path().join("wheels");
    let minute = Duration::from_secs(60);

    // The wheel, built from the source tree as `pip wheel ./clients/python` would (the build backend is
    // in the venv, so nothing is fetched), with the marker that tells type checkers it is typed.
    let wheels_arg = wheels.to_str().unwrap();
    python_step(
        &python,
        &dir,
        &["-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--wheel-dir", wheels_arg, "."],
        &[],
        5 * minute,
        "building the wheel",
    )
    .await;
    let wheel = std::fs::read_dir(&wheels)
        .unwrap()
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|x| x == "whl"))
        .expect("pip wheel made a .whl");
    let wheel_arg = wheel.to_str().unwrap();
    let listed = python_step(
        &python,
        &dir,
        &["-c", "import sys, zipfile; print('\\n'.join(zipfile.ZipFile(sys.argv[1]).namelist()))", wheel_arg],
        &[],
        minute,
        "listing the wheel",
    )
    .await;
    for file in ["kernelbox/__init__.py", "kernelbox/py.typed", "kernelbox/_async.py", "kernelbox/errors.py"] {
        assert!(listed.lines().any(|l| l == file), "the wheel has {file}:\n{listed}");
    }

    let cache = work.path().join("mypy-cache");
    python_step(
        &python,
        &dir,
        &["-m", "mypy", "--strict", "--cache-dir", cache.to_str().unwrap()],
        &[],
        10 * minute,
        "mypy --strict (src, tests, examples)",
    )
    .await;

    // Installed from the wheel, not the source tree, with the dependencies it declares.
    python_step(
        &python,
        &dir,
        &["-m", "pip", "uninstall", "--yes", "--quiet", "kernelbox"],
        &[],
        5 * minute,
        "pip uninstall",
    )
    .await;
    python_step(
        &python,
        &dir,
        &["-m", "pip", "install", "--quiet", wheel_arg],
        &[],
        5 * minute,
        "installing the wheel",
    )
    .await;
    python_step(&python, &dir, &["-m", "pip", "check"], &[], minute, "pip check (the declared dependencies are met)")
        .await;

    let app = spawn_app_with(AppOptions {
        api_keys: vec![KEY.into(), OTHER_KEY.into()],
        limits: limits(&["--max-sessions-per-owner", SESSIONS_PER_KEY, "--queue-depth", QUEUE_DEPTH]),
        ..Default::default()
    })
    .await;
    // A burst of two, then one request a second: the client's 429 retries meet a real Retry-After.
    let limited = spawn_app_with(AppOptions {
        api_keys: vec![KEY.into()],
        http: http(&["--rate-limit-per-minute", "60", "--rate-limit-burst", "2"]),
        ..Default::default()
    })
    .await;

    let env = [
        ("KERNELBOX_URL", app.base.clone()),
        ("KERNELBOX_API_KEY", KEY.to_owned()),
        ("KERNELBOX_TEST_OTHER_KEY", OTHER_KEY.to_owned()),
        ("KERNELBOX_TEST_LIMITED_URL", limited.base.clone()),
        ("KERNELBOX_TEST_SESSIONS_PER_KEY", SESSIONS_PER_KEY.to_owned()),
        ("KERNELBOX_TEST_QUEUE_DEPTH", QUEUE_DEPTH.to_owned()),
        ("KERNELBOX_TEST_OPENAPI", concat!(env!("CARGO_MANIFEST_DIR"), "/docs/openapi.json").to_owned()),
    ];
    let report = python_step(
        &python,
        &dir,
        &["-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfE", "tests"],
        &env,
        30 * minute,
        "the client's pytest suite",
    )
    .await;
    eprintln!("{report}");
    assert!(report.lines().last().is_some_and(|l| l.contains(" passed")), "pytest ran tests:\n{report}");

    for (name, service) in [("the service", &app), ("the rate-limited service", &limited)] {
        assert!(
            eventually(Duration::from_secs(30), || async { service.containers().await.is_empty() }).await,
            "the client deleted every session it started on {name}"
        );
    }
}
