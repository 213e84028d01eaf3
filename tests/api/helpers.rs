//! The harness: builds the kernel images once per test process (from nothing if need be), spawns the
//! service on a random loopback port with its own instance name and state directory, and removes every
//! container of that instance when the app is dropped, even when the test failed.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use kernelbox::config::{Cli, Command, EgressArgs, FileStoreArgs, HttpArgs, LimitArgs, PackageArgs, SignedUrlArgs};
use kernelbox::images::Catalog;
use kernelbox::images::builder::ImageBuilder;
use kernelbox::images::context::{self, HostSettings, Source};
use kernelbox::runtime::docker::DockerRuntime;
use kernelbox::runtime::{ContainerRuntime, labels};
use kernelbox::session::{ManagerConfig, SessionManager};
use kernelbox::{Application, Settings};
use serde_json::{Value, json};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;

pub const PREFIX: &str = "kernelbox/kernel-";

/// The kernel images' name prefix: [`PREFIX`], or `KERNELBOX_TEST_IMAGE_PREFIX`, so that a branch with
/// other build contexts can test against images of its own without rebuilding everyone else's.
pub fn image_prefix() -> &'static str {
    static PREFIX_IN_USE: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    PREFIX_IN_USE.get_or_init(|| std::env::var("KERNELBOX_TEST_IMAGE_PREFIX").unwrap_or_else(|_| PREFIX.to_owned()))
}

/// The Docker engine; the end-to-end tests are the point, so no engine is a loud failure, not a skip.
pub async fn docker() -> Arc<DockerRuntime> {
    let runtime = DockerRuntime::connect().expect("cannot reach the Docker engine: the end-to-end tests need Docker");
    runtime.ping().await.expect("cannot reach the Docker engine: the end-to-end tests need Docker");
    Arc::new(runtime)
}

pub fn image_builder(runtime: Arc<DockerRuntime>) -> ImageBuilder {
    ImageBuilder {
        runtime,
        catalog: Catalog::new(image_prefix()),
        source: Source::Embedded,
        settings: HostSettings {
            apt_mirror: std::env::var("KERNELBOX_APT_MIRROR").ok().or_else(context::detect_apt_mirror),
            pip_index_url: std::env::var("KERNELBOX_PIP_INDEX_URL").ok().or_else(context::detect_pip_index),
            extra_ca: context::detect_extra_ca(
                std::env::var_os("KERNELBOX_EXTRA_CA_BUNDLE").as_deref().map(std::path::Path::new),
            )
            .expect("reading the extra CA bundle"),
        },
        base_image: std::env::var("KERNELBOX_BASE_IMAGE").unwrap_or_else(|_| "debian:bookworm-slim".into()),
    }
}

/// Builds (or finds up to date) every kernel image, once per test process. Progress goes straight to
/// stderr so a first, slow build is visible.
pub async fn ensure_images() {
    static BUILT: OnceCell<()> = OnceCell::const_new();
    BUILT
        .get_or_init(|| async {
            let builder = image_builder(docker().await);
            let mut err = std::io::stderr();
            // KERNELBOX_TEST_LANGUAGES (comma-separated) builds only those, e.g. with a prefix of a branch's own.
            let languages: Vec<String> = std::env::var("KERNELBOX_TEST_LANGUAGES")
                .map(|l| l.split(',').map(|s| s.trim().to_owned()).filter(|s| !s.is_empty()).collect())
                .unwrap_or_default();
            builder.build(&languages, false, &mut err).await.expect("building the kernel images");
        })
        .await;
}

/// `kernelbox serve` with the given `--flag value` overrides.
fn serve_args(overrides: &[&str]) -> kernelbox::config::ServeArgs {
    let mut argv = vec!["kernelbox", "serve"];
    argv.extend_from_slice(overrides);
    match Cli::try_parse_from(argv).expect("test flags parse").command {
        Command::Serve(s) => *s,
        _ => unreachable!(),
    }
}

/// Default limits, with the given `--flag value` overrides.
pub fn limits(overrides: &[&str]) -> LimitArgs {
    serve_args(overrides).limits
}

/// Default package settings, with the given `--flag value` overrides.
pub fn packages(overrides: &[&str]) -> PackageArgs {
    serve_args(overrides).packages
}

/// Default HTTP settings (rate limit, slow-client timeouts), with the given `--flag value` overrides.
pub fn http(overrides: &[&str]) -> HttpArgs {
    serve_args(overrides).http
}

/// Default network-by-name settings (off), with the given `--flag value` overrides.
pub fn egress(overrides: &[&str]) -> EgressArgs {
    serve_args(overrides).egress
}

/// Default file store settings (the `/jupyter` API's), with the given `--flag value` overrides.
pub fn files_store(overrides: &[&str]) -> FileStoreArgs {
    serve_args(overrides).files
}

/// Default signed-URL settings, with the given `--flag value` overrides.
pub fn signed_urls(overrides: &[&str]) -> SignedUrlArgs {
    serve_args(overrides).links
}

pub struct AppOptions {
    pub limits: LimitArgs,
    pub packages: PackageArgs,
    pub http: HttpArgs,
    pub files: FileStoreArgs,
    /// Signed file links (secret, longest lifetime).
    pub links: SignedUrlArgs,
    pub api_keys: Vec<String>,
    pub keep_sessions: bool,
    /// Reuse an instance name and state directory (adoption tests).
    pub instance: Option<(String, std::path::PathBuf)>,
    /// Build the kernel images first (tests that never start a kernel can say no, and then do not wait
    /// for a build).
    pub images: bool,
    /// How long in-flight calls may finish after a stop before the sessions are closed under them.
    pub shutdown_grace: Duration,
    /// Notebooks, datasets.
    pub storage: kernelbox::session::Storage,
    /// The warm pool: none unless a test asks (each pooled kernel is a container on a 2-core machine).
    pub pool: kernelbox::session::pool::PoolConfig,
    /// Network by name (off unless a test asks: `egress.rs`).
    pub egress: EgressArgs,
}

impl Default for AppOptions {
    fn default() -> Self {
        AppOptions {
            limits: limits(&[]),
            packages: packages(&[]),
            // The default limits (what costs, per key) hold: ordinary use never meets them. The request
            // limit is off by default; it has its own tests.
            http: http(&[]),
            files: files_store(&[]),
            links: signed_urls(&[]),
            api_keys: vec![],
            keep_sessions: false,
            instance: None,
            images: true,
            shutdown_grace: Duration::from_secs(5),
            // One runtimes folder for every test service: each tree is copied once per image.
            storage: kernelbox::session::Storage {
                runtimes: kernelbox::config::StateFolder::At(shared_runtimes_dir()),
                ..Default::default()
            },
            pool: Default::default(),
            egress: egress(&[]),
        }
    }
}

/// gVisor's OCI runtime, as the test command registers it with the engine (`scripts/gvisor`).
pub const RUNSC: &str = "runsc";

/// An app whose sessions may ask for `runtime` (`None`: runc only, the default).
pub fn options_under(runtime: Option<&str>) -> AppOptions {
    match runtime {
        Some(runtime) => AppOptions { limits: limits(&["--session-runtimes", runtime]), ..AppOptions::default() },
        None => AppOptions::default(),
    }
}

/// A service process's flags for sessions that may ask for `runtime`.
pub fn args_under(runtime: Option<&'static str>) -> Vec<&'static str> {
    match runtime {
        Some(runtime) => vec!["--session-runtimes", runtime],
        None => vec![],
    }
}

/// Fails, saying why and what to do, unless the engine has gVisor registered as sessions need it (the
/// test command installs and registers it when it runs as root; never a silent skip).
pub async fn require_runsc() {
    let runtimes = kernelbox::runtime::ContainerRuntime::oci_runtimes(&*docker().await).await.expect("docker info");
    let choice = kernelbox::config::OciRuntimes::parse("", RUNSC, &[]).unwrap();
    let problems = kernelbox::session::oci::problems(&choice, &runtimes);
    assert!(
        problems.is_empty(),
        "gVisor is not usable here, so the runsc tests cannot run: {}. `scripts/test` installs runsc (Debian's \
         package) and registers it with the engine when run as root (`scripts/gvisor`); elsewhere, do the two \
         steps of the README's \"Sessions under gVisor\"",
        problems.join("; ")
    );
}

/// The runtimes folder the test services share (kept across runs: trees are named by image content).
pub fn shared_runtimes_dir() -> std::path::PathBuf {
    target_dir().join("kernelbox-test-runtimes")
}

/// A warm pool of `n` python kernels, booted one at a time.
pub fn python_pool(n: usize) -> kernelbox::session::pool::PoolConfig {
    kernelbox::session::pool::PoolConfig::fixed([("python", n)], 1)
}

pub struct TestApp {
    pub base: String,
    pub client: reqwest::Client,
    pub manager: Arc<SessionManager>,
    /// The `/jupyter` API's file store (tests drive its sweep).
    pub store: Arc<kernelbox::store::FileStore>,
    pub instance: String,
    pub state_dir: std::path::PathBuf,
    shutdown: CancellationToken,
    server: Option<tokio::task::JoinHandle<()>>,
    /// Owned temp dir, removed with the app (None when the caller passed its own).
    _tmp: Option<tempfile::TempDir>,
    /// Remove this instance's containers on drop (off while an adoption test hands them on).
    pub cleanup: bool,
}

pub async fn spawn_app() -> TestApp {
    spawn_app_with(AppOptions::default()).await
}

pub async fn spawn_app_with(mut options: AppOptions) -> TestApp {
    if options.images {
        ensure_images().await;
    }
    let runtime = docker().await;
    let (instance, state_dir, tmp) = match options.instance.take() {
        Some((instance, dir)) => (instance, dir, None),
        None => {
            let tmp = tempfile::Builder::new().prefix("kbt").tempdir_in("/tmp").expect("temp dir");
            let instance = format!("test-{}", &uuid_like()[..12]);
            (instance, tmp.path().to_path_buf(), Some(tmp))
        }
    };
    let settings = settings(options, &instance, &state_dir);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let app = Application::build(listener, settings, runtime).await.expect("the app builds");
    let addr = app.local_addr().unwrap();
    let manager = app.manager();
    let store = app.store();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let server = tokio::spawn(async move {
        app.run_until_stopped(token).await.expect("the app runs");
    });
    TestApp {
        base: format!("http://{addr}"),
        // Idle connections are dropped well before the service closes them (`--header-read-timeout-s`,
        // 15 s): a request sent on one the service is closing at that moment fails with no answer at all.
        client: reqwest::Client::builder().pool_idle_timeout(Duration::from_secs(5)).build().expect("a client"),
        manager,
        store,
        instance,
        state_dir,
        shutdown,
        server: Some(server),
        _tmp: tmp,
        cleanup: true,
    }
}

/// The service's settings for `options`, with its own instance name and state directory.
pub fn settings(options: AppOptions, instance: &str, state_dir: &std::path::Path) -> Settings {
    Settings {
        manager: ManagerConfig {
            limits: options.limits.validate().expect("valid test limits"),
            state_dir: state_dir.to_path_buf(),
            instance: instance.to_owned(),
            catalog: Catalog::new(image_prefix()),
            keep_sessions: options.keep_sessions,
            packages: options
                .packages
                .validate(std::env::var("KERNELBOX_PIP_INDEX_URL").ok().or_else(context::detect_pip_index))
                .expect("valid test package settings"),
            storage: options.storage,
            pool: options.pool,
            node: None,
            fencing: None,
            egress: options.egress.validate().expect("valid test egress settings"),
        },
        api_keys: options.api_keys,
        http: options.http.validate().expect("valid test HTTP settings"),
        files: options.files.validate().expect("valid test file store settings"),
        links: options.links.validate().expect("valid test signed-URL settings"),
        shutdown_grace: options.shutdown_grace,
    }
}

/// The value of one series in a `/metrics` text: the metric's name with its labels as the exporter writes
/// them (in the order the code gives them), e.g. `kernelbox_pool_hits_total{language="python"}`.
pub fn sample(metrics: &str, series: &str) -> Option<f64> {
    metrics.lines().find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')).and_then(|v| v.trim().parse().ok())
}

pub fn uuid_like() -> String {
    uuid::Uuid::new_v4().simple().to_string()
}

impl TestApp {
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self.client.post(self.url(path)).json(&body).send().await.expect("request");
        status_json(r).await
    }

    pub async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(self.url(path)).send().await.expect("request");
        status_json(r).await
    }

    pub async fn delete(&self, path: &str) -> u16 {
        self.client.delete(self.url(path)).send().await.expect("request").status().as_u16()
    }

    /// Starts a session and returns its id (panics with the server's answer otherwise).
    pub async fn start(&self, language: &str) -> String {
        self.start_with(json!({"language": language})).await
    }

    pub async fn start_with(&self, body: Value) -> String {
        let (status, v) = self.post("/v1/sessions", body).await;
        assert_eq!(status, 201, "start session: {v}");
        v["id"].as_str().unwrap().to_owned()
    }

    /// Starts a session with API key `key` and returns its id.
    pub async fn start_as(&self, key: &str, language: &str) -> String {
        let r = self
            .client
            .post(self.url("/v1/sessions"))
            .bearer_auth(key)
            .json(&json!({"language": language}))
            .send()
            .await
            .expect("request");
        assert_eq!(r.status(), 201, "start a session as {key}");
        r.json::<Value>().await.unwrap()["id"].as_str().unwrap().to_owned()
    }

    pub async fn exec(&self, id: &str, code: &str) -> Value {
        let (status, v) = self.post(&format!("/v1/sessions/{id}/execute"), json!({"code": code})).await;
        assert_eq!(status, 200, "execute: {v}");
        v
    }

    pub async fn exec_with(&self, id: &str, body: Value) -> (u16, Value) {
        self.post(&format!("/v1/sessions/{id}/execute"), body).await
    }

    /// This instance's containers, as Docker lists them.
    pub async fn containers(&self) -> Vec<kernelbox::runtime::ContainerSummary> {
        instance_containers(&self.instance).await
    }

    /// Stops the service as SIGTERM would, and waits for it.
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(server) = self.server.take() {
            server.await.expect("the app stopped cleanly");
        }
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if self.cleanup {
            // A boot under way (a pool refill) would be cut off by the end of the test's runtime after
            // Docker made its container: shut the manager down first, which waits for boots and removes
            // what they made, then sweep whatever is left of the instance.
            if let Ok(handle) = tokio::runtime::Handle::try_current()
                && handle.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread
            {
                let manager = self.manager.clone();
                tokio::task::block_in_place(|| {
                    handle.block_on(async {
                        let _ = tokio::time::timeout(Duration::from_secs(30), manager.shutdown()).await;
                    })
                });
            }
            remove_instance(&self.instance);
        }
    }
}

/// The containers of service instance `instance`, as Docker lists them.
/// The containers of a service instance: its sessions (pooled kernels included) and package fetchers. Not
/// the short-lived containers a runtime tree is copied out of (`kernelbox.export`), never started, which
/// come and go with the first boots of a language; the suite's end checks that none is left either.
pub async fn instance_containers(instance: &str) -> Vec<kernelbox::runtime::ContainerSummary> {
    let all = docker().await.list(labels::INSTANCE, Some(instance)).await.unwrap();
    all.into_iter().filter(|c| !c.labels.contains_key(labels::EXPORT)).collect()
}

/// Polls `check` every 100 ms until it holds or `limit` has passed; says whether it held. For things
/// that happen in the background (the reaper, the container watcher), never for timing assertions.
pub async fn eventually<F, Fut>(limit: std::time::Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Removes an instance's containers when dropped, whatever the test did.
/// An instance name and state directory that several runs of the service share (adoption tests); the
/// instance's containers are removed when it drops.
pub struct SharedInstance {
    _guard: InstanceGuard,
    pub dir: tempfile::TempDir,
    pub name: String,
}

impl SharedInstance {
    pub fn new(prefix: &str) -> Self {
        let dir = tempfile::Builder::new().prefix("kbt").tempdir_in("/tmp").expect("temp dir");
        let name = format!("test-{prefix}-{}", &uuid_like()[..8]);
        SharedInstance { _guard: InstanceGuard(name.clone()), dir, name }
    }

    /// For `AppOptions::instance`.
    pub fn options(&self) -> Option<(String, std::path::PathBuf)> {
        Some((self.name.clone(), self.dir.path().to_path_buf()))
    }
}

pub struct InstanceGuard(pub String);

impl Drop for InstanceGuard {
    fn drop(&mut self) {
        remove_instance(&self.0);
    }
}

/// Drop cannot await, so a thread with its own runtime does the removal.
fn remove_instance(instance: &str) {
    let instance = instance.to_owned();
    let _ = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let Ok(runtime) = DockerRuntime::connect() else {
                return;
            };
            if let Ok(list) = runtime.list(labels::INSTANCE, Some(&instance)).await {
                for c in list {
                    let _ = runtime.remove(&c.id).await;
                }
            }
        });
    })
    .join();
}

async fn status_json(r: reqwest::Response) -> (u16, Value) {
    let status = r.status().as_u16();
    let text = r.text().await.unwrap_or_default();
    let v = serde_json::from_str(&text).unwrap_or(Value::String(text));
    (status, v)
}

/// The text/plain of the first execute_result, if any.
pub fn result_text(v: &Value) -> Option<String> {
    v["outputs"]
        .as_array()?
        .iter()
        .find(|o| o["output_type"] == "execute_result")
        .and_then(|o| o["data"]["text/plain"].as_str().map(str::to_owned))
}

/// The MIME types of every display_data output.
pub fn display_mimes(v: &Value) -> Vec<String> {
    v["outputs"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|o| o["output_type"] == "display_data")
                .flat_map(|o| o["data"].as_object().map(|m| m.keys().cloned().collect::<Vec<_>>()).unwrap_or_default())
                .collect()
        })
        .unwrap_or_default()
}

pub fn assert_error_shape(v: &Value, code: &str) {
    assert_eq!(v["error"]["code"], code, "{v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "{v}");
}

/// What came back on a raw connection: the status (None if the server closed without answering), the
/// head, and the body as JSON (or a string).
#[derive(Debug)]
pub struct RawResponse {
    pub status: Option<u16>,
    pub head: String,
    pub body: Value,
}

impl TestApp {
    /// POSTs `body` as it is, labelled `application/json`.
    pub async fn post_bytes(&self, path: &str, body: Vec<u8>) -> reqwest::Result<reqwest::Response> {
        self.client.post(self.url(path)).header("content-type", "application/json").body(body).send().await
    }

    /// The service's `host:port`.
    pub fn addr(&self) -> String {
        self.base.trim_start_matches("http://").to_owned()
    }

    /// Sends `request` byte for byte (no client-side normalisation of `..` or percent-escapes) on a
    /// fresh connection and reads until the server closes it or 30 s pass.
    pub async fn raw(&self, request: &[u8]) -> RawResponse {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.addr()).await.expect("connect");
        // The server may answer and close before it has read everything (e.g. a 414): not an error.
        let _ = stream.write_all(request).await;
        let mut bytes = Vec::new();
        let read = tokio::time::timeout(Duration::from_secs(30), async {
            let mut buf = [0u8; 8192];
            loop {
                match stream.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(n) => bytes.extend_from_slice(&buf[..n]),
                }
            }
        })
        .await;
        assert!(read.is_ok(), "the server neither answered nor closed within 30 s");
        parse_raw(&bytes)
    }
}

/// Splits an HTTP/1.1 response into status, head and body (the body is all that follows the head: these
/// connections carry one request).
pub fn parse_raw(bytes: &[u8]) -> RawResponse {
    let text = String::from_utf8_lossy(bytes);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head.strip_prefix("HTTP/1.1 ").and_then(|rest| rest.get(..3)).and_then(|s| s.parse().ok());
    let body = serde_json::from_str(body).unwrap_or_else(|_| Value::String(body.to_owned()));
    RawResponse { status, head: head.to_owned(), body }
}

/// Asserts a client's mistake: a 4xx, never a 5xx, in the JSON error shape.
pub fn assert_client_error(status: u16, body: &Value, what: &str) {
    assert!((400..500).contains(&status), "{what}: expected a 4xx, got {status}: {body}");
    assert!(
        body["error"]["code"].as_str().is_some_and(|c| !c.is_empty())
            && body["error"]["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{what}: {status} without the JSON error shape: {body}"
    );
}

/// `target/` of this build: the test binary is `target/<profile>/deps/api-<hash>`.
pub fn target_dir() -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("the test binary's path");
    exe.ancestors().nth(3).expect("the test binary lives in target/<profile>/deps").to_path_buf()
}

/// A Python virtualenv under `<target>/tools/<name>` with `requirements` installed from PyPI (with this
/// machine's pip settings), made once and reused; returns its `python`. A failed install fails the test
/// with pip's words.
pub fn tool_python(name: &str, requirements: &[&str]) -> std::path::PathBuf {
    static INSTALLING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_at_a_time = INSTALLING.lock().unwrap_or_else(|p| p.into_inner());
    let venv = target_dir().join("tools").join(name);
    let python = venv.join("bin").join("python");
    let marker = venv.join(".kernelbox-installed");
    let wanted = requirements.join("\n");
    if std::fs::read_to_string(&marker).is_ok_and(|m| m == wanted) {
        return python;
    }
    eprintln!("installing {requirements:?} into {} (once)", venv.display());
    let run = |cmd: &mut std::process::Command, what: &str| {
        let out = cmd.stdin(std::process::Stdio::null()).output().unwrap_or_else(|e| panic!("{what}: {e}"));
        assert!(
            out.status.success(),
            "{what} failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    };
    run(std::process::Command::new("python3").args(["-m", "venv", "--clear"]).arg(&venv), "python3 -m venv");
    run(
        std::process::Command::new(&python).args(["-m", "pip", "install", "--quiet"]).args(requirements),
        "pip install (with this machine's pip configuration)",
    );
    std::fs::write(&marker, wanted).expect("writing the venv marker");
    python
}
