//! The API fuzzed from its own OpenAPI document (`/openapi.json`) with schemathesis: every operation,
//! valid and invalid inputs, then stateful sequences through the links it infers (create a session, then
//! use its id). The check is that nothing is ever a 5xx.
//!
//! schemathesis comes from PyPI into a cached virtualenv under `<target>/tools/`, with the machine's own
//! pip settings (index, CA bundle); a failed install fails the test, with pip's words. The service runs
//! with low limits (2 sessions, 1 per key), so the sessions the fuzzer creates are few and the rest get
//! 429; the app is stopped at the end and no container of its instance may be left.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::Duration;

use crate::helpers::*;

/// Pinned, and checked to work here: the CLI's flags change between major versions.
const SCHEMATHESIS_VERSION: &str = "4.32.5";
/// Test cases per operation and phase.
const MAX_EXAMPLES: &str = "30";
/// The whole run, installation excluded.
const RUN_LIMIT: Duration = Duration::from_secs(20 * 60);
/// A fixed seed, so a failure can be replayed; `KERNELBOX_FUZZ_SEED` picks another.
const DEFAULT_SEED: &str = "20261201";
const KEY: &str = "fuzz-key";

/// `target/` of this build: the test binary is `target/<profile>/deps/api-<hash>`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.ancestors().nth(3).expect("the test binary lives in target/<profile>/deps").to_path_buf()
}

fn run(cmd: &mut Command, what: &str) -> Output {
    let output = cmd.stdin(Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: could not run: {e}"));
    assert!(
        output.status.success(),
        "{what} failed ({}):\n{}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    output
}

/// The `schemathesis` executable, installed on first use.
fn schemathesis() -> PathBuf {
    let venv = target_dir().join("tools").join(format!("schemathesis-venv-{SCHEMATHESIS_VERSION}"));
    let bin = venv.join("bin").join("schemathesis");
    let installed = |bin: &Path| {
        Command::new(bin)
            .arg("--version")
            .output()
            .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains(SCHEMATHESIS_VERSION))
    };
    if installed(&bin) {
        return bin;
    }
    eprintln!("installing schemathesis {SCHEMATHESIS_VERSION} into {} (once)", venv.display());
    run(
        Command::new("python3").args(["-m", "venv", "--clear"]).arg(&venv),
        "creating a Python virtualenv for schemathesis (python3 with the venv module is needed)",
    );
    run(
        Command::new(venv.join("bin").join("pip")).args([
            "install",
            "--quiet",
            &format!("schemathesis=={SCHEMATHESIS_VERSION}"),
        ]),
        "pip install schemathesis (uses this machine's pip configuration)",
    );
    assert!(installed(&bin), "schemathesis {SCHEMATHESIS_VERSION} was installed but does not run");
    bin
}

#[tokio::test(flavor = "multi_thread")]
async fn schemathesis_finds_no_server_error() {
    let schemathesis = tokio::task::spawn_blocking(schemathesis).await.unwrap();
    let app = spawn_app_with(AppOptions {
        api_keys: vec![KEY.into()],
        limits: limits(&[
            "--max-sessions",
            "2",
            "--max-sessions-per-owner",
            "1",
            "--max-timeout-s",
            "30",
            "--default-timeout-s",
            "10",
        ]),
        // The fuzzer's speed is not the abuse under test here; 429s would only hide operations from it.
        http: http(&["--rate-limit-per-minute", "0"]),
        ..Default::default()
    })
    .await;
    let instance = app.instance.clone();
    let _guard = InstanceGuard(instance.clone());
    let seed = std::env::var("KERNELBOX_FUZZ_SEED").unwrap_or_else(|_| DEFAULT_SEED.into());
    let workdir = tempfile::tempdir().unwrap();
    let mut cmd = tokio::process::Command::new(&schemathesis);
    cmd.arg("run")
        .arg(app.url("/openapi.json"))
        .args(["--checks", "not_a_server_error"])
        .args(["--max-examples", MAX_EXAMPLES])
        .args(["--seed", &seed])
        .args(["--workers", "2"])
        .args(["--request-timeout", "120"])
        .args(["--header", &format!("Authorization: Bearer {KEY}")])
        .args(["--generation-with-security-parameters", "false"])
        .args(["--generation-database", "none"])
        .arg("--no-color")
        .current_dir(workdir.path())
        .env("NO_COLOR", "1")
        .stdin(Stdio::null())
        .kill_on_drop(true);
    let output = tokio::time::timeout(RUN_LIMIT, cmd.output())
        .await
        .unwrap_or_else(|_| panic!("schemathesis did not finish within {RUN_LIMIT:?}"))
        .expect("running schemathesis");
    let stdout = String::from_utf8_lossy(&output.stdout);
    // Shown with --nocapture (and in full on failure below).
    eprintln!("schemathesis {SCHEMATHESIS_VERSION}, seed {seed}:\n{stdout}");

    app.stop().await;
    assert!(
        output.status.success(),
        "schemathesis found failures (exit {}):\n{stdout}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("generated"), "schemathesis ran no test cases:\n{stdout}");
    assert!(instance_containers(&instance).await.is_empty(), "the fuzzer's sessions were removed with the app");
}
