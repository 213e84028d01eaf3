//! Sessions under gVisor (`runsc`): an OCI runtime the operator maps a language to (`--runtime`) or lets a
//! session ask for (`--session-runtimes`). The code talks to gVisor's kernel, not the host's; the sandbox
//! keeps its shape (limits, read-only mounts, the service-bound sockets, the seccomp filter); files,
//! packages, the pool, interrupts, out-of-memory kills and adoption work as under runc; a neighbour on runc
//! is unaffected; and the hostile attacks that apply (`hostile.rs`) fail under it as they do under runc.
//!
//! These tests need gVisor registered with the engine as the README says (`scripts/test` does it as root):
//! [`require_runsc`] fails with the reason otherwise, never skips.

use std::time::Duration;

use serde_json::{Value, json};

use crate::helpers::*;
use crate::hostile;
use crate::sandbox::sandbox_facts;

fn host_release() -> String {
    let out = std::process::Command::new("uname").arg("-r").output().expect("uname");
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// `docker inspect`'s view of a session's container: its runtime and its `kernelbox.runtime` label.
async fn container_runtime(app: &TestApp, session: &str) -> (String, String) {
    let container = app
        .containers()
        .await
        .into_iter()
        .find(|c| c.labels.get("kernelbox.session").map(String::as_str) == Some(session))
        .expect("the session's container");
    let out = std::process::Command::new("docker")
        .args(["inspect", "-f", "{{.HostConfig.Runtime}}", &container.id])
        .output()
        .expect("docker inspect");
    let label = container.labels.get("kernelbox.runtime").cloned().unwrap_or_default();
    (String::from_utf8_lossy(&out.stdout).trim().to_owned(), label)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_that_asks_for_gvisor_runs_on_its_kernel_beside_a_neighbour_on_runc() {
    require_runsc().await;
    let app = spawn_app_with(options_under(Some(RUNSC))).await;
    let (_, languages) = app.get("/v1/languages").await;
    let python = languages.as_array().unwrap().iter().find(|l| l["name"] == "python").unwrap();
    assert_eq!(python["runtime"], "runc", "{python}");
    assert_eq!(python["runtimes"], json!(["runc", "runsc"]), "{python}");

    let neighbour = app.start("python").await;
    let (status, gvisor) =
        app.post("/v1/sessions", json!({"language": "python", "runtime": "runsc", "env": {"GREETING": "hi"}})).await;
    assert_eq!(status, 201, "{gvisor}");
    assert_eq!(gvisor["runtime"], "runsc", "the session says its runtime: {gvisor}");
    let id = gvisor["id"].as_str().unwrap().to_owned();
    assert_eq!(app.get(&format!("/v1/sessions/{id}")).await.1["runtime"], "runsc");
    assert_eq!(app.get(&format!("/v1/sessions/{neighbour}")).await.1["runtime"], "runc");
    assert_eq!(container_runtime(&app, &id).await, ("runsc".to_owned(), "runsc".to_owned()));
    assert_eq!(container_runtime(&app, &neighbour).await, ("runc".to_owned(), "runc".to_owned()));

    let inside = sandbox_facts(&app, &id).await;
    eprintln!("FIGURE gVisor from inside: {inside}");
    assert!(inside["dmesg"].as_str().unwrap().contains("gVisor"), "gVisor's kernel log: {inside}");
    assert_ne!(inside["release"], host_release(), "not the host's kernel: {inside}");
    // The sandbox keeps its shape under gVisor.
    assert_eq!(inside["uid"], 1000, "{inside}");
    assert_eq!(inside["interfaces"], json!(["lo"]), "no network but loopback: {inside}");
    assert_eq!(inside["cap_eff"], "0000000000000000", "{inside}");
    assert_eq!(inside["root_writable"], false, "{inside}");
    assert_eq!(inside["tmp_mb"], 128, "a quarter of the default 512 MB: {inside}");
    assert_eq!(inside["cwd"], "/home/kernel");
    assert_eq!(inside["home_writable"], true);
    assert_eq!(inside["greeting"], "hi");

    let beside = sandbox_facts(&app, &neighbour).await;
    assert_eq!(beside["release"], host_release(), "the neighbour on runc talks to the host's kernel: {beside}");
    assert!(!beside["dmesg"].as_str().unwrap_or_default().contains("gVisor"), "{beside}");

    // Both at once, and the figures say which runs where.
    let (a, b) = tokio::join!(app.exec(&id, "print(6*7)"), app.exec(&neighbour, "print(6*7)"));
    assert_eq!((a["stdout"].as_str(), b["stdout"].as_str()), (Some("42\n"), Some("42\n")));
    let (_, metrics) = app.get("/metrics").await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert_eq!(sample(&metrics, r#"kernelbox_sessions_by_runtime{runtime="runsc"}"#), Some(1.0), "{metrics}");
    assert_eq!(sample(&metrics, r#"kernelbox_sessions_by_runtime{runtime="runc"}"#), Some(1.0));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_runtime_the_operator_does_not_offer_is_refused_naming_the_allowed_ones() {
    let app = spawn_app_with(AppOptions { images: false, ..AppOptions::default() }).await;
    let (status, v) = app.post("/v1/sessions", json!({"language": "python", "runtime": "runsc"})).await;
    assert_eq!(status, 422, "{v}");
    assert_error_shape(&v, "runtime_not_allowed");
    assert!(v["error"]["message"].as_str().unwrap().contains("allowed runtimes are runc"), "{v}");
    let (status, v) = app.post("/v1/sessions", json!({"language": "python", "runtime": 7})).await;
    assert!(status == 400 || status == 422, "{status} {v}");
    // The gateway's kernel start takes it from `env`, as Enterprise Gateway takes `KERNEL_*` settings.
    let (status, v) = app.post("/api/kernels", json!({"name": "python3", "env": {"KERNEL_RUNTIME": "runsc"}})).await;
    assert_eq!(status, 422, "{v}");
    assert!(v.to_string().contains("runtime `runsc`"), "{v}");
    assert_eq!(app.containers().await.len(), 0, "nothing was started");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_whose_runtime_the_engine_lacks_does_not_start_and_says_which() {
    let options =
        AppOptions { limits: limits(&["--runtime", "bash=nosuchruntime"]), images: false, ..Default::default() };
    let dir = tempfile::Builder::new().prefix("kbt").tempdir_in("/tmp").unwrap();
    let settings = settings(options, &format!("test-{}", &uuid_like()[..12]), dir.path());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let err = match kernelbox::Application::build(listener, settings, docker().await).await {
        Ok(_) => panic!("a service whose runtime is not registered started"),
        Err(e) => e.to_string(),
    };
    assert!(err.contains("no runtime `nosuchruntime`") && err.contains("runc"), "{err}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_operator_puts_a_language_under_gvisor_and_every_client_sees_it() {
    require_runsc().await;
    let options =
        AppOptions { limits: limits(&["--runtime", "bash=runsc", "--session-runtimes", "runc"]), ..Default::default() };
    let app = spawn_app_with(options).await;
    let (status, ready) = app.get("/readyz").await;
    assert_eq!(status, 200, "{ready}");
    assert_eq!(ready["runtime_problems"], json!([]));
    let bash = app.start("bash").await;
    let r = app.exec(&bash, "uname -r; echo $((6*7))").await;
    assert_eq!(r["status"], "ok", "{r}");
    let lines: Vec<&str> = r["stdout"].as_str().unwrap().lines().collect();
    assert_ne!(lines[0], host_release(), "bash runs on gVisor's kernel: {r}");
    assert_eq!(lines[1], "42");
    assert_eq!(app.get(&format!("/v1/sessions/{bash}")).await.1["runtime"], "runsc");
    // A bash session may still ask for runc, which the operator allows.
    let (status, plain) = app.post("/v1/sessions", json!({"language": "bash", "runtime": "runc"})).await;
    assert_eq!(status, 201, "{plain}");
    let r = app.exec(plain["id"].as_str().unwrap(), "uname -r").await;
    assert_eq!(r["stdout"].as_str().unwrap().trim(), host_release());

    // The gateway's kernelspecs say each language's runtime.
    let (_, specs) = app.get("/api/kernelspecs").await;
    assert_eq!(specs["kernelspecs"]["bash"]["spec"]["metadata"]["kernelbox"]["runtime"], "runsc", "{specs}");
    assert_eq!(specs["kernelspecs"]["bash"]["spec"]["metadata"]["kernelbox"]["runtimes"], json!(["runsc", "runc"]));
    assert_eq!(specs["kernelspecs"]["python3"]["spec"]["metadata"]["kernelbox"]["runtime"], "runc");
    // And a gateway kernel asks for one through `env`.
    let (status, kernel) = app.post("/api/kernels", json!({"name": "bash", "env": {"KERNEL_RUNTIME": "runc"}})).await;
    assert_eq!(status, 201, "{kernel}");
    let session = kernel["id"].as_str().unwrap().replace('-', "")[..24].to_owned();
    assert_eq!(app.get(&format!("/v1/sessions/{session}")).await.1["runtime"], "runc");
}

#[tokio::test(flavor = "multi_thread")]
async fn under_gvisor_a_memory_bomb_is_out_of_memory_an_interrupt_stops_code_and_files_and_packages_work() {
    require_runsc().await;
    let app = spawn_app_with(options_under(Some(RUNSC))).await;
    let body = |extra: Value| {
        let mut b = json!({"language": "python", "runtime": "runsc"});
        b.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        b
    };

    // Out of memory: the cgroup's limit holds under gVisor too, and the session says so.
    let bomb = app.start_with(body(json!({"memory_mb": 128, "auto_restart": false}))).await;
    let r = app.exec(&bomb, "x = bytearray(1024 * 1024 * 1024)").await;
    assert_eq!(r["status"], "killed", "{r}");
    assert_eq!(r["killed_reason"], "out_of_memory", "{r}");
    let (status, s) = app.post(&format!("/v1/sessions/{bomb}/restart"), json!({})).await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(app.exec(&bomb, "print(6*7)").await["stdout"], "42\n");

    // A timeout interrupts the kernel (SIGINT through the engine) and the state is kept.
    let id = app.start_with(body(json!({}))).await;
    app.exec(&id, "kept = 'yes'").await;
    let (_, r) = app
        .exec_with(&id, json!({"code": "import time\nprint('before', flush=True)\ntime.sleep(60)", "timeout_s": 2}))
        .await;
    assert_eq!(r["status"], "timeout", "{r}");
    assert_eq!(r["kernel_restarted"], false, "the interrupt reached the kernel: {r}");
    assert_eq!(result_text(&app.exec(&id, "kept").await).as_deref(), Some("'yes'"));

    // Files in and out (the file tool through the exec API).
    let url = app.url(&format!("/v1/sessions/{id}/files/data/in.txt"));
    let put = app.client.put(url).body("from the host\n").send().await.unwrap();
    assert!(put.status().is_success(), "{}", put.status());
    let r = app
        .exec(&id, "print(open('data/in.txt').read().upper(), end='')\nopen('out.txt', 'w').write('made inside')")
        .await;
    assert_eq!(r["stdout"], "FROM THE HOST\n", "{r}");
    let got = app.client.get(app.url(&format!("/v1/sessions/{id}/files/out.txt"))).send().await.unwrap();
    assert_eq!(got.text().await.unwrap(), "made inside");

    // A package, installed into the running kernel.
    let (status, report) = app.post(&format!("/v1/sessions/{id}/packages"), json!({"packages": ["six"]})).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["ok"], true, "{report}");
    let r = app.exec(&id, "import six; print(six.__name__)").await;
    assert_eq!(r["stdout"], "six\n", "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pool_of_gvisor_kernels_serves_the_sessions_that_ask_for_it() {
    require_runsc().await;
    let mut options = options_under(Some(RUNSC));
    options.pool = kernelbox::session::pool::PoolConfig::fixed([("python@runsc", 1)], 1);
    let app = spawn_app_with(options).await;
    let ready = eventually(Duration::from_secs(120), || async {
        let (_, metrics) = app.get("/metrics").await;
        sample(metrics.as_str().unwrap_or_default(), r#"kernelbox_pool_ready{language="python@runsc"}"#) == Some(1.0)
    })
    .await;
    assert!(ready, "the pool of gVisor kernels filled");
    let (status, s) = app.post("/v1/sessions", json!({"language": "python", "runtime": "runsc"})).await;
    assert_eq!(status, 201, "{s}");
    let id = s["id"].as_str().unwrap();
    let (_, metrics) = app.get("/metrics").await;
    let metrics = metrics.as_str().unwrap_or_default().to_owned();
    assert_eq!(sample(&metrics, r#"kernelbox_pool_hits_total{language="python@runsc"}"#), Some(1.0), "{metrics}");
    assert!(sandbox_facts(&app, id).await["dmesg"].as_str().unwrap().contains("gVisor"));
    // A python session on runc does not take a gVisor kernel.
    let plain = app.start("python").await;
    assert_eq!(app.get(&format!("/v1/sessions/{plain}")).await.1["runtime"], "runc");
    assert_eq!(sandbox_facts(&app, &plain).await["release"], host_release());
}

#[tokio::test(flavor = "multi_thread")]
async fn every_language_boots_and_runs_under_gvisor() {
    require_runsc().await;
    let app = spawn_app_with(options_under(Some(RUNSC))).await;
    for (language, code, expect) in [
        ("javascript", "console.log(6*7)", "42\n"),
        ("typescript", "const x: number = 6*7; console.log(x)", "42\n"),
        ("java", "System.out.println(6*7);", "42\n"),
        ("bash", "echo $((6*7))", "42\n"),
        ("python_scientific", "import numpy; print(int(numpy.int64(6)*7))", "42\n"),
    ] {
        let (status, s) = app.post("/v1/sessions", json!({"language": language, "runtime": "runsc"})).await;
        assert_eq!(status, 201, "{language}: {s}");
        let id = s["id"].as_str().unwrap();
        let r = app.exec(id, code).await;
        assert_eq!(r["stdout"], expect, "{language}: {r}");
        assert_eq!(app.delete(&format!("/v1/sessions/{id}")).await, 204);
    }
}

// The hostile attacks that apply, under gVisor (`hostile.rs` runs each under runc).

#[tokio::test(flavor = "multi_thread")]
async fn gvisor_hostile_planting_in_the_run_directory_fails_through_restart_adoption_and_delete() {
    require_runsc().await;
    hostile::planting_in_the_run_directory(Some(RUNSC)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn gvisor_hostile_garbage_connections_to_the_kernel_sockets() {
    require_runsc().await;
    hostile::garbage_connections(Some(RUNSC)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn gvisor_hostile_kernel_protocol_abuse() {
    require_runsc().await;
    hostile::kernel_protocol_abuse(Some(RUNSC)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn gvisor_hostile_fork_bomb_is_contained() {
    require_runsc().await;
    hostile::fork_bomb(Some(RUNSC)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn gvisor_hostile_filling_tmp_and_home_is_enospc_not_a_kill() {
    require_runsc().await;
    hostile::disk_fill(Some(RUNSC)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn gvisor_hostile_network_reaches_nothing_but_loopback() {
    require_runsc().await;
    hostile::network(Some(RUNSC)).await
}

#[tokio::test(flavor = "multi_thread")]
async fn gvisor_hostile_privileges_ptrace_mounts_and_the_neighbours_environment() {
    require_runsc().await;
    hostile::privileges(Some(RUNSC)).await
}
