//! A hostile tenant: code inside a real session that attacks the host, the service and its neighbours.
//! Every test starts a neighbour session before the attack and checks afterwards that the service still
//! answers and the neighbour still computes `6*7`. Figures (latencies, memory) are printed as `FIGURE`
//! lines, never asserted as timings.

use std::collections::BTreeMap;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::helpers::*;
use crate::process::{ProcessOptions, ServiceProcess};

/// The OCI runtime the sessions of an attack run under: `None`, the service's default (runc);
/// `Some("runsc")`, gVisor (`runsc.rs` runs the attacks that apply again under it).
pub(crate) type Under = Option<&'static str>;

/// A client for either an in-process app or a service process.
#[derive(Clone)]
struct Api {
    client: reqwest::Client,
    base: String,
    /// Every session it starts asks for this runtime.
    runtime: Under,
}

impl Api {
    fn of(app: &TestApp) -> Api {
        Api { client: app.client.clone(), base: app.base.clone(), runtime: None }
    }

    fn of_process(p: &ServiceProcess) -> Api {
        Api { client: p.client.clone(), base: p.base.clone(), runtime: None }
    }

    /// Its sessions run under `runtime`.
    fn under(self, runtime: Under) -> Api {
        Api { runtime, ..self }
    }

    async fn post(&self, path: &str, body: Value) -> (u16, Value) {
        let r = self.client.post(format!("{}{path}", self.base)).json(&body).send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn post_raw(&self, path: &str, body: Value) -> (u16, String) {
        let r = self.client.post(format!("{}{path}", self.base)).json(&body).send().await.expect("request");
        let status = r.status().as_u16();
        (status, r.text().await.unwrap_or_default())
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let r = self.client.get(format!("{}{path}", self.base)).send().await.expect("request");
        let status = r.status().as_u16();
        let text = r.text().await.unwrap_or_default();
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    async fn delete(&self, id: &str) -> u16 {
        let url = format!("{}/v1/sessions/{id}", self.base);
        self.client.delete(url).send().await.expect("request").status().as_u16()
    }

    async fn start(&self, mut body: Value) -> String {
        if let Some(runtime) = self.runtime {
            body["runtime"] = json!(runtime);
        }
        let (status, v) = self.post("/v1/sessions", body).await;
        assert_eq!(status, 201, "start session: {v}");
        v["id"].as_str().unwrap().to_owned()
    }

    async fn exec(&self, id: &str, code: &str) -> Value {
        self.exec_t(id, code, 60).await
    }

    async fn exec_t(&self, id: &str, code: &str, timeout_s: u64) -> Value {
        let (status, v) =
            self.post(&format!("/v1/sessions/{id}/execute"), json!({"code": code, "timeout_s": timeout_s})).await;
        assert_eq!(status, 200, "execute: {v}");
        v
    }

    /// Runs probe code that prints one JSON document as its last line and returns it.
    async fn probe(&self, id: &str, code: &str) -> Value {
        let r = self.exec_t(id, code, 120).await;
        assert_eq!(r["status"], "ok", "the probe itself failed: {r}");
        let out = r["stdout"].as_str().unwrap_or_default();
        let last = out.lines().last().unwrap_or_default();
        serde_json::from_str(last).unwrap_or_else(|e| panic!("probe output is not JSON ({e}): {r}"))
    }

    /// The service answers and the neighbour still computes.
    async fn assert_alive(&self, neighbour: &str, when: &str) {
        let (status, v) = self.get("/readyz").await;
        assert_eq!(status, 200, "{when}: the service is not ready: {v}");
        let r = self.exec(neighbour, "print(6*7)").await;
        assert_eq!(r["status"], "ok", "{when}: the neighbour failed: {r}");
        assert_eq!(r["stdout"], "42\n", "{when}: the neighbour failed: {r}");
    }
}

fn scratch(prefix: &str) -> tempfile::TempDir {
    tempfile::Builder::new().prefix(prefix).tempdir_in("/tmp").expect("temp dir")
}

fn new_instance(tag: &str) -> String {
    format!("test-{tag}-{}", &uuid::Uuid::new_v4().simple().to_string()[..8])
}

async fn service_process(instance: &str, state: &Path, args: &[&str], env: &[(&str, String)]) -> ServiceProcess {
    let log = state.with_extension("log");
    ServiceProcess::start(ProcessOptions { instance, state_dir: state, args, env, log }).await
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}

// ---------------------------------------------------------------------------------------------------
// 1. The run directory: symlinks, FIFOs, directories and chmods planted at /kernel.

/// Tries to replace, remove or chmod everything under /kernel; prints {attempt: "ok" | errno name}.
const PLANT: &str = r#"
import os, json, errno
SENT = 'SENTINEL'
res = {}
def attempt(name, fn):
    try:
        fn()
        res[name] = 'ok'
    except OSError as e:
        res[name] = errno.errorcode.get(e.errno, str(e.errno))
names = ['connection.json', 'k-50001', 'k-50002', 'k-50003', 'k-50004']
for n in names:
    t = '/kernel/' + n
    attempt('unlink ' + n, lambda: os.unlink(t))
    attempt('rename ' + n, lambda: os.rename(t, '/kernel/old-' + n))
    attempt('rename-to-tmp ' + n, lambda: os.rename(t, '/tmp/' + n))
    attempt('symlink-sentinel ' + n, lambda: os.symlink(SENT, t))
    attempt('symlink-passwd ' + n, lambda: os.symlink('/etc/passwd', t))
    attempt('mkfifo ' + n, lambda: os.mkfifo(t))
    attempt('mkdir ' + n, lambda: os.mkdir(t))
    attempt('chmod ' + n, lambda: os.chmod(t, 0o777))
    attempt('chown ' + n, lambda: os.chown(t, 1000, 1000))
    attempt('utime ' + n, lambda: os.utime(t, (0, 0)))
    attempt('link ' + n, lambda: os.link('/tmp', t))
for n in ['connection.json.new', 'k-50005', 'evil']:
    t = '/kernel/' + n
    attempt('create ' + n, lambda: os.close(os.open(t, os.O_CREAT | os.O_WRONLY, 0o666)))
    attempt('symlink-new ' + n, lambda: os.symlink(SENT, t))
    attempt('mkfifo-new ' + n, lambda: os.mkfifo(t))
    attempt('mkdir-new ' + n, lambda: os.mkdir(t))
attempt('write connection.json', lambda: open('/kernel/connection.json', 'a').write('x'))
attempt('truncate connection.json', lambda: os.truncate('/kernel/connection.json', 0))
attempt('chmod /kernel', lambda: os.chmod('/kernel', 0o777))
attempt('rename /kernel', lambda: os.rename('/kernel', '/tmp/kernel'))
attempt('rmdir /kernel', lambda: os.rmdir('/kernel'))
print(json.dumps(res))
"#;

/// The mounts as the session sees them: /kernel's options and every writable mount.
const MOUNTS: &str = r#"
import json
kernel, writable = None, []
for line in open('/proc/self/mountinfo'):
    left, right = line.split(' - ', 1)
    f = left.split()
    fstype, source, super_opts = right.split()[:3]
    point, opts = f[4], f[5].split(',')
    if point == '/kernel':
        kernel = {'opts': opts, 'fstype': fstype, 'super': super_opts}
    if 'rw' in opts:
        writable.append({'point': point, 'fstype': fstype, 'source': source})
print(json.dumps({'kernel': kernel, 'writable': writable}))
"#;

/// What the sentinel is: its bytes and mode, read without following links.
fn snapshot(path: &Path) -> (Vec<u8>, u32, bool) {
    let meta = std::fs::symlink_metadata(path).expect("the sentinel exists");
    (std::fs::read(path).unwrap(), meta.permissions().mode(), meta.file_type().is_file())
}

/// The run directories of `session` on the host.
fn run_dirs(state_dir: &Path, session: &str) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(state_dir.join("sessions")) else {
        return vec![];
    };
    entries
        .map(|e| e.unwrap().path())
        .filter(|p| p.file_name().unwrap().to_string_lossy().starts_with(&format!("{session}-")))
        .collect()
}

/// The session's one run directory holds exactly the connection file and the four sockets, all the
/// service's.
fn assert_clean_run_dir(state_dir: &Path, session: &str, when: &str) {
    let dirs = run_dirs(state_dir, session);
    assert_eq!(dirs.len(), 1, "{when}: one run directory per live session: {dirs:?}");
    let dir = &dirs[0];
    let me = unsafe { libc::geteuid() };
    let dir_meta = std::fs::symlink_metadata(dir).unwrap();
    assert!(dir_meta.is_dir() && dir_meta.uid() == me, "{when}: {dir:?} is the service's directory");
    assert_eq!(dir_meta.permissions().mode() & 0o777, 0o755, "{when}: run dir mode");
    let entries: BTreeMap<String, std::fs::Metadata> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| {
            let e = e.unwrap();
            (e.file_name().to_string_lossy().into_owned(), std::fs::symlink_metadata(e.path()).unwrap())
        })
        .collect();
    let names: Vec<&str> = entries.keys().map(String::as_str).collect();
    assert_eq!(names, ["connection.json", "k-50001", "k-50002", "k-50003", "k-50004"], "{when}: {dir:?}");
    for (name, meta) in &entries {
        assert_eq!(meta.uid(), me, "{when}: {name} belongs to the service");
        if name == "connection.json" {
            assert!(meta.file_type().is_file(), "{when}: {name} is a regular file");
            assert_eq!(meta.permissions().mode() & 0o777, 0o644, "{when}: {name} mode");
        } else {
            assert!(meta.file_type().is_socket(), "{when}: {name} is a socket");
        }
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_planting_links_fifos_and_dirs_in_the_run_directory_fails_through_restart_adoption_and_delete() {
    planting_in_the_run_directory(None).await
}

pub(crate) async fn planting_in_the_run_directory(under: Under) {
    let dir = scratch("kbt");
    let instance = new_instance("plant");
    let _guard = InstanceGuard(instance.clone());
    let same_instance = || Some((instance.clone(), dir.path().to_path_buf()));
    let state_dir = dir.path().to_path_buf();

    let sentinel_dir = scratch("kbt-sentinel");
    let sentinel = sentinel_dir.path().join("sentinel");
    std::fs::write(&sentinel, b"host secret, do not touch\n").unwrap();
    std::fs::set_permissions(&sentinel, std::fs::Permissions::from_mode(0o600)).unwrap();
    let before = snapshot(&sentinel);
    let plant = PLANT.replace("SENTINEL", sentinel.to_str().unwrap());

    let mut first =
        spawn_app_with(AppOptions { keep_sessions: true, instance: same_instance(), ..options_under(under) }).await;
    let api = Api::of(&first).under(under);
    let neighbour = api.start(json!({"language": "python"})).await;
    api.assert_alive(&neighbour, "before").await;
    let attacker = api.start(json!({"language": "python"})).await;

    let attack = |api: Api, when: &'static str| {
        let (attacker, plant) = (attacker.clone(), plant.clone());
        async move {
            let res = api.probe(&attacker, &plant).await;
            let res = res.as_object().unwrap();
            assert!(res.len() > 60, "{when}: every attempt reported: {res:?}");
            let mut errnos: BTreeMap<&str, usize> = BTreeMap::new();
            for (what, outcome) in res {
                let outcome = outcome.as_str().unwrap();
                assert_ne!(outcome, "ok", "{when}: `{what}` succeeded inside the session");
                // Creating over an existing name may say EEXIST before EROFS; /kernel itself is a mount
                // point (EBUSY); everything else is the read-only mount or a permission check.
                assert!(
                    ["EROFS", "EACCES", "EPERM", "EEXIST", "EBUSY", "EXDEV"].contains(&outcome),
                    "{when}: `{what}` failed oddly: {outcome}"
                );
                *errnos.entry(outcome).or_default() += 1;
            }
            for removal in ["unlink", "rename", "chmod", "chown", "utime", "create", "truncate", "write"] {
                for (what, outcome) in res.iter().filter(|(w, _)| w.starts_with(removal)) {
                    assert!(
                        ["EROFS", "EACCES", "EPERM", "EXDEV"].contains(&outcome.as_str().unwrap()),
                        "{when}: `{what}` must fail on the read-only mount: {outcome}"
                    );
                }
            }
            eprintln!("FIGURE plant {when}: {} attempts, all failed: {errnos:?}", res.len());
        }
    };
    let check_host = |when: &str, live: bool| {
        assert_eq!(snapshot(&sentinel), before, "{when}: the sentinel changed");
        if live {
            assert_clean_run_dir(&state_dir, &attacker, when);
        } else {
            assert!(run_dirs(&state_dir, &attacker).is_empty(), "{when}: the run directory was removed");
        }
        assert_clean_run_dir(&state_dir, &neighbour, when);
    };

    let mounts = api.probe(&attacker, MOUNTS).await;
    eprintln!("mounts seen by the session: {mounts}");
    let kernel_opts = mounts["kernel"]["opts"].as_array().expect("/kernel is a mount");
    assert!(kernel_opts.contains(&json!("ro")), "/kernel is mounted read-only: {mounts}");
    for m in mounts["writable"].as_array().unwrap() {
        let (point, fstype) = (m["point"].as_str().unwrap(), m["fstype"].as_str().unwrap());
        assert!(
            ["tmpfs", "proc", "devpts", "mqueue"].contains(&fstype),
            "a writable mount that is not a private pseudo or tmpfs file system: {point} ({fstype}): {mounts}"
        );
    }

    attack(api.clone(), "first boot").await;
    check_host("first boot", true);
    api.assert_alive(&neighbour, "after the first attack").await;

    // (a) The kernel dies (and its container with it); a restart boots a fresh container.
    let r = api.exec(&attacker, "import os, signal; os.kill(os.getpid(), signal.SIGKILL)").await;
    assert_eq!(r["status"], "killed", "{r}");
    let (status, s) = api.post(&format!("/v1/sessions/{attacker}/restart"), json!({})).await;
    assert_eq!(status, 200, "restart after the kill: {s}");
    assert_eq!(api.exec(&attacker, "print(6*7)").await["stdout"], "42\n");
    check_host("after the kernel's kill and restart", true);
    attack(api.clone(), "after restart").await;
    check_host("after the attack on the restarted kernel", true);

    // (b) The service restarts and adopts the session, which keeps its state.
    api.exec(&attacker, "state = 'kept'").await;
    first.cleanup = false;
    first.stop().await;
    let second =
        spawn_app_with(AppOptions { keep_sessions: false, instance: same_instance(), ..options_under(under) }).await;
    let api = Api::of(&second).under(under);
    let r = api.exec(&attacker, "print(state)").await;
    assert_eq!(r["stdout"], "kept\n", "adopted with its state: {r}");
    check_host("after adoption", true);
    attack(api.clone(), "after adoption").await;
    check_host("after the attack on the adopted session", true);
    api.assert_alive(&neighbour, "after adoption").await;

    // (c) DELETE.
    assert_eq!(api.delete(&attacker).await, 204);
    check_host("after delete", false);
    api.assert_alive(&neighbour, "after delete").await;
}

// ---------------------------------------------------------------------------------------------------
// 2. Connections to the session's own kernel sockets.

/// Opens 500 connections to /kernel/k-5000x, sends garbage on each, keeps them open.
const SOCKET_FLOOD: &str = r#"
import socket, json, os, errno
held, res = globals().setdefault('held', []), {}
for i in range(500):
    path = '/kernel/k-5000%d' % (1 + i % 4)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect(path)
        s.send(os.urandom(64) + b'\xff\x00\x00\x00\x00\x00\x00\x01\x00\x7f' + b'garbage' * 100)
        held.append(s)
        res['connected'] = res.get('connected', 0) + 1
    except OSError as e:
        key = errno.errorcode.get(e.errno, str(e)) if e.errno else type(e).__name__
        res[key] = res.get(key, 0) + 1
        s.close()
print(json.dumps(res))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn hostile_five_hundred_garbage_connections_to_the_kernel_sockets() {
    garbage_connections(None).await
}

pub(crate) async fn garbage_connections(under: Under) {
    let dir = scratch("kbt");
    let instance = new_instance("conns");
    let _guard = InstanceGuard(instance.clone());
    let service = service_process(&instance, dir.path(), &args_under(under), &[]).await;
    let api = Api::of_process(&service).under(under);
    let neighbour = api.start(json!({"language": "python"})).await;
    api.assert_alive(&neighbour, "before").await;
    let attacker = api.start(json!({"language": "python"})).await;
    api.exec(&attacker, "x = 41").await;
    let rss_before = service.rss_kib();
    service.reset_peak();

    let res = api.probe(&attacker, SOCKET_FLOOD).await;
    eprintln!("FIGURE garbage connections: outcome of 500 connects to /kernel/k-5000x: {res}");
    // The connections stay open while the session and its neighbour work.
    let r = api.exec(&attacker, "print(x + 1)").await;
    assert_eq!(r["stdout"], "42\n", "the attacker's own kernel still works with 500 connections open: {r}");
    api.assert_alive(&neighbour, "with 500 garbage connections open").await;
    // Twice: what a second round does to connections already accepted or refused.
    let again = api.probe(&attacker, SOCKET_FLOOD).await;
    eprintln!("FIGURE garbage connections: a second round of 500: {again}");
    let r = api.exec(&attacker, "for s in held: s.close()\nprint(x + 1)").await;
    assert_eq!(r["stdout"], "42\n", "{r}");
    api.assert_alive(&neighbour, "after the garbage connections closed").await;
    let (status, _) = api.post(&format!("/v1/sessions/{attacker}/restart"), json!({})).await;
    assert_eq!(status, 200, "a restart after the flood");
    assert_eq!(api.exec(&attacker, "print(6*7)").await["stdout"], "42\n");

    let (rss_after, peak) = (service.rss_kib(), service.peak_kib());
    eprintln!(
        "FIGURE garbage connections: service RSS {:.1} MiB before, {:.1} MiB after, peak {:.1} MiB",
        mib(rss_before),
        mib(rss_after),
        mib(peak)
    );
    assert!(peak < rss_before + 64 * 1024, "the service's memory stays bounded: {peak} KiB peak from {rss_before} KiB");
}

// ---------------------------------------------------------------------------------------------------
// 3. Jupyter protocol abuse from inside the kernel.

const GARBAGE_FRAMES: &str = r#"
k = get_ipython().kernel
s = k.iopub_socket
s.send_multipart([b'garbage'])
s.send_multipart([b'', b'<IDS|MSG>', b'nosig', b'{', b'}', b'{}', b'{}'])
s.send_multipart([b'<IDS|MSG>', b'0' * 64, b'{}', b'{}', b'{}', b'{}'])
s.send_multipart([b'\xff' * 100000])
s.send_multipart([b'x'] * 5000)
s.send_multipart([b'<IDS|MSG>'] * 100)
print('after-garbage')
"#;

const BAD_SIGNATURE: &str = r#"
from jupyter_client.session import Session
k = get_ipython().kernel
bad = Session(key=b'not-the-key', username=k.session.username, session=k.session.session)
bad.send(k.iopub_socket, 'stream', {'name': 'stdout', 'text': 'BADSIG\n'}, parent=k.get_parent('shell'))
unsigned = Session(key=b'', username=k.session.username, session=k.session.session)
unsigned.send(k.iopub_socket, 'stream', {'name': 'stdout', 'text': 'UNSIGNED\n'}, parent=k.get_parent('shell'))
print('after-badsig')
"#;

const FORGED_PARENT: &str = r#"
k = get_ipython().kernel
hdr = dict(k.get_parent('shell')['header'])
hdr['msg_id'] = 'not-ours'
k.session.send(k.iopub_socket, 'stream', {'name': 'stdout', 'text': 'FORGED1\n'}, parent={'header': hdr})
fake = {'msg_id': 'not-ours-either', 'msg_type': 'execute_request', 'session': 'x', 'username': 'x',
        'date': '2020-01-01T00:00:00Z', 'version': '5.3'}
k.session.send(k.iopub_socket, 'stream', {'name': 'stdout', 'text': 'FORGED2\n'}, parent={'header': fake})
k.session.send(k.iopub_socket, 'status', {'execution_state': 'idle'}, parent={'header': fake})
k.session.send(k.iopub_socket, 'stream', {'name': 'stdout', 'text': 'FORGED3\n'}, parent={})
print('after-forged')
"#;

const FLOOD: &str = r#"
k = get_ipython().kernel
p = k.get_parent('shell')
for i in range(100000):
    k.session.send(k.iopub_socket, 'stream', {'name': 'stdout', 'text': 'y' * 100 + '\n'}, parent=p)
print('flood-done')
"#;

#[tokio::test(flavor = "multi_thread")]
async fn hostile_kernel_protocol_abuse_garbage_bad_signatures_forged_parents_flood_and_a_stopped_kernel() {
    kernel_protocol_abuse(None).await
}

pub(crate) async fn kernel_protocol_abuse(under: Under) {
    let app = spawn_app_with(options_under(under)).await;
    let api = Api::of(&app).under(under);
    let neighbour = api.start(json!({"language": "python"})).await;
    api.assert_alive(&neighbour, "before").await;
    let attacker = api.start(json!({"language": "python"})).await;

    // (a) Raw garbage frames on IOPub.
    let r = api.exec(&attacker, GARBAGE_FRAMES).await;
    eprintln!("garbage frames: {r}");
    assert_eq!(r["status"], "ok", "{r}");
    assert!(r["stdout"].as_str().unwrap().contains("after-garbage"), "{r}");
    assert_eq!(api.exec(&attacker, "print(6*7)").await["stdout"], "42\n", "the session works after garbage frames");
    api.assert_alive(&neighbour, "after garbage frames").await;

    // (b) Messages signed with the wrong key, or not at all.
    let r = api.exec(&attacker, BAD_SIGNATURE).await;
    eprintln!("bad signatures: {r}");
    assert_eq!(r["status"], "ok", "{r}");
    let out = r["stdout"].as_str().unwrap();
    assert!(out.contains("after-badsig"), "{r}");
    assert!(!r.to_string().contains("BADSIG"), "a message with a bad signature was accepted: {r}");
    assert!(!r.to_string().contains("UNSIGNED"), "an unsigned message was accepted: {r}");
    assert_eq!(api.exec(&attacker, "print(6*7)").await["stdout"], "42\n");

    // (c) Output for another execution's parent.
    let r = api.exec(&attacker, FORGED_PARENT).await;
    eprintln!("forged parents: {r}");
    assert_eq!(r["status"], "ok", "{r}");
    assert!(r["stdout"].as_str().unwrap().contains("after-forged"), "{r}");
    for forged in ["FORGED1", "FORGED2", "FORGED3"] {
        assert!(!r.to_string().contains(forged), "{forged}: output with a foreign parent was taken: {r}");
    }
    let r = api.exec(&attacker, "print(6*7)").await;
    assert_eq!(r["stdout"], "42\n", "nothing forged leaks into the next execution: {r}");
    api.assert_alive(&neighbour, "after forged messages").await;

    // (d) 100k small messages in one execution: the answer comes, capped. The kernel's own IOPub queue may
    // drop the final `status: idle` under this flood (ZeroMQ's high-water mark); the service then ends the
    // execution 2 s after the reply's last quiet moment, `ok` and truncated, instead of at its timeout.
    let started = Instant::now();
    let (status, body) =
        api.post_raw(&format!("/v1/sessions/{attacker}/execute"), json!({"code": FLOOD, "timeout_s": 180})).await;
    let r: Value = serde_json::from_str(&body).unwrap_or_default();
    eprintln!(
        "FIGURE iopub flood: 100k messages of 101 B answered in {:?}, {} B response, status {}, kernel_restarted {}, duration_ms {}",
        started.elapsed(),
        body.len(),
        r["status"],
        r["kernel_restarted"],
        r["duration_ms"]
    );
    assert_eq!(status, 200, "{}", &body[..body.len().min(2000)]);
    assert_eq!(r["status"], "ok", "not the timeout: {}", &body[..body.len().min(2000)]);
    assert_eq!(r["truncated"], true, "the flood was capped: {}", &body[..body.len().min(2000)]);
    assert!(body.len() <= 1_153_434, "the response stays within ~1.1 MiB: {} B", body.len());
    assert_eq!(api.exec(&attacker, "print(6*7)").await["stdout"], "42\n", "the session works after the flood");
    api.assert_alive(&neighbour, "after the flood").await;

    // (f) A kernel that never answers: SIGSTOP with a 2 s timeout.
    api.exec(&attacker, "lost = 'state before the stop'").await;
    let started = Instant::now();
    let r = api.exec_t(&attacker, "import os, signal; os.kill(os.getpid(), signal.SIGSTOP)", 2).await;
    eprintln!("FIGURE stopped kernel: the timeout result came after {:?}: {r}", started.elapsed());
    assert_eq!(r["status"], "timeout", "{r}");
    assert_eq!(r["kernel_restarted"], true, "a stopped kernel ignores the interrupt and is restarted: {r}");
    let r = api.exec(&attacker, "print(6*7)").await;
    assert_eq!(r["stdout"], "42\n", "the session works after the restart: {r}");
    assert_eq!(api.exec(&attacker, "'lost' in dir()").await["outputs"][0]["data"]["text/plain"], "False");
    api.assert_alive(&neighbour, "after the stopped kernel").await;
}

/// One 600 MB stream message (the content is packed by hand so that the kernel does not need three
/// copies of it): the service streams it through and keeps a capped prefix.
const HUGE_MESSAGE: &str = r#"
k = get_ipython().kernel
n = 600_000_000
body = bytearray(b'{"name": "stdout", "text": "')
body += b'x' * n
body += b'"}'
body = bytes(body)
k.session.send(k.iopub_socket, 'stream', content=body, parent=k.get_parent('shell'))
del body
print('huge-done')
"#;

#[tokio::test(flavor = "multi_thread")]
async fn hostile_one_600_mb_stream_message_is_capped_and_the_service_stays_small() {
    let dir = scratch("kbt");
    let instance = new_instance("huge");
    let _guard = InstanceGuard(instance.clone());
    let service = service_process(&instance, dir.path(), &[], &[]).await;
    let api = Api::of_process(&service);
    let neighbour = api.start(json!({"language": "python"})).await;
    api.assert_alive(&neighbour, "before").await;
    let attacker = api.start(json!({"language": "python", "memory_mb": 2048})).await;
    api.exec(&attacker, "print(1)").await;
    let rss_before = service.rss_kib();
    service.reset_peak();

    let started = Instant::now();
    let (status, body) = api
        .post_raw(&format!("/v1/sessions/{attacker}/execute"), json!({"code": HUGE_MESSAGE, "timeout_s": 600}))
        .await;
    let peak = service.peak_kib();
    eprintln!(
        "FIGURE 600 MB message: answered in {:?}, {} B response; service RSS {:.1} MiB before, peak {:.1} MiB (+{:.1} MiB)",
        started.elapsed(),
        body.len(),
        mib(rss_before),
        mib(peak),
        mib(peak.saturating_sub(rss_before))
    );
    assert_eq!(status, 200, "{}", &body[..body.len().min(2000)]);
    let r: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["status"], "ok", "{}", &body[..body.len().min(2000)]);
    assert_eq!(r["truncated"], true, "the message was capped");
    assert!(body.len() <= 1_153_434, "the response stays within ~1.1 MiB: {} B", body.len());
    assert!(
        peak < rss_before + 256 * 1024,
        "the service's peak RSS grew by < 256 MiB: {peak} KiB from {rss_before} KiB"
    );
    assert_eq!(api.exec(&attacker, "print(6*7)").await["stdout"], "42\n");
    api.assert_alive(&neighbour, "after the 600 MB message").await;
}

/// Output floods a user can make with ordinary code, each in a python session with the default memory. What
/// users get: the response arrives, within the cap, marked `truncated`, with the kernel's marker where it
/// cut; the kernel survives with its state.
const OUTPUT_FLOODS: &[(&str, &str)] = &[
    ("200 MB in 1 MB writes, never flushed", "import sys\nfor _ in range(200):\n    sys.stdout.write('x' * 1_000_000)"),
    ("one print of 200 MB", "print('x' * 200_000_000)"),
    (
        "a 100 MB base64 PNG displayed raw",
        "import base64, os\nfrom IPython.display import display\ndisplay({'image/png': base64.b64encode(os.urandom(75_000_000)).decode()}, raw=True)",
    ),
    (
        "an IPython Image of 100 MB",
        "import os\nfrom IPython.display import Image, display\ndisplay(Image(data=b'\\x89PNG\\r\\n\\x1a\\n' + os.urandom(100_000_000), format='png'))",
    ),
    ("a 200 MB str as the cell's result", "'x' * 200_000_000"),
    ("a 200 MB bytes as the cell's result", "b'x' * 200_000_000"),
];

#[tokio::test(flavor = "multi_thread")]
async fn hostile_output_floods_huge_prints_images_and_results_are_capped_and_the_kernel_lives() {
    let dir = scratch("kbt");
    let instance = new_instance("floods");
    let _guard = InstanceGuard(instance.clone());
    let service = service_process(&instance, dir.path(), &[], &[]).await;
    let api = Api::of_process(&service);
    let neighbour = api.start(json!({"language": "python"})).await;
    api.assert_alive(&neighbour, "before").await;
    let attacker = api.start(json!({"language": "python"})).await; // the default memory (512 MB)
    api.exec(&attacker, "kept = 'state before the floods'").await;
    let rss_before = service.rss_kib();
    for (name, code) in OUTPUT_FLOODS {
        service.reset_peak();
        let started = Instant::now();
        let (status, body) =
            api.post_raw(&format!("/v1/sessions/{attacker}/execute"), json!({"code": code, "timeout_s": 300})).await;
        let peak = service.peak_kib();
        let r: Value = serde_json::from_str(&body).unwrap_or_default();
        let kinds: Vec<String> = r["outputs"]
            .as_array()
            .map(|o| o.iter().map(|o| o["output_type"].as_str().unwrap_or("?").to_owned()).collect())
            .unwrap_or_default();
        let text = r["outputs"].to_string();
        let marker = text.find("[kernelbox:").map(|i| text[i..].chars().take(120).collect::<String>());
        eprintln!(
            "FIGURE output flood ({name}): answered in {:?}, status {}, {} B response, truncated {}, outputs {kinds:?}, marker {marker:?}; service RSS peak {:.1} MiB (+{:.1} MiB)",
            started.elapsed(),
            r["status"],
            body.len(),
            r["truncated"],
            mib(peak),
            mib(peak.saturating_sub(rss_before))
        );
        assert_eq!(status, 200, "{name}: {}", &body[..body.len().min(2000)]);
        assert_eq!(r["status"], "ok", "{name}: {}", &body[..body.len().min(2000)]);
        assert_eq!(r["truncated"], true, "{name}: {}", &body[..body.len().min(2000)]);
        assert!(body.len() <= 1_153_434, "{name}: the response stays within ~1.1 MiB: {} B", body.len());
        assert!(marker.is_some(), "{name}: the user is told what was cut: {}", &body[..body.len().min(2000)]);
        assert!(
            peak < rss_before + 256 * 1024,
            "{name}: the service's peak RSS grew by < 256 MiB: {peak} KiB from {rss_before} KiB"
        );
        let r = api.exec(&attacker, "print(kept)").await;
        assert_eq!(r["stdout"], "state before the floods\n", "{name}: the kernel lived, with its state: {r}");
    }
    let (_, info) = api.get(&format!("/v1/sessions/{attacker}")).await;
    eprintln!("FIGURE output floods: the session afterwards: {info}");
    api.assert_alive(&neighbour, "after the output floods").await;
}

// ---------------------------------------------------------------------------------------------------
// 4. Fork bomb and CPU hog.

/// Every process forks until a deadline, then exits; the kernel counts its successes and failures, keeps
/// the highest pids.current it saw, and reaps its children.
const FORK_BOMB: &str = r#"
import os, time, json, errno
deadline = time.time() + 10
forks, errs, peak = 0, {}, 0
me = os.getpid()
def cg(name):
    for p in ['/sys/fs/cgroup/' + name, '/sys/fs/cgroup/pids/' + name]:
        try:
            return open(p).read().strip()
        except OSError:
            pass
def pids_now():
    try:
        return int(cg('pids.current'))
    except (TypeError, ValueError):
        return -1
while time.time() < deadline:
    try:
        pid = os.fork()
    except OSError as e:
        n = errno.errorcode.get(e.errno, str(e.errno))
        errs[n] = errs.get(n, 0) + 1
        peak = max(peak, pids_now())
        time.sleep(0.01)
        continue
    if pid == 0:
        # In a child (never the kernel itself): keep forking until the deadline, then leave quietly.
        while time.time() < deadline:
            try:
                os.fork()
            except OSError:
                time.sleep(0.01)
        os._exit(0)
    forks += 1
    peak = max(peak, pids_now())
assert os.getpid() == me
time.sleep(1)
while True:
    try:
        os.waitpid(-1, 0)
    except ChildProcessError:
        break
time.sleep(1)
print(json.dumps({'forks': forks, 'errors': errs, 'peak_pids': peak, 'pids_max': cg('pids.max'), 'pids_after': pids_now()}))
"#;

async fn p50_latency(api: &Api, id: &str, runs: usize) -> Duration {
    let mut times = Vec::with_capacity(runs);
    for _ in 0..runs {
        let started = Instant::now();
        let r = api.exec(id, "print(6*7)").await;
        times.push(started.elapsed());
        assert_eq!(r["stdout"], "42\n", "{r}");
    }
    times.sort();
    times[runs / 2]
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_fork_bomb_is_contained_by_the_pids_limit() {
    fork_bomb(None).await
}

pub(crate) async fn fork_bomb(under: Under) {
    let app = spawn_app_with(options_under(under)).await;
    let api = Api::of(&app).under(under);
    let neighbour = api.start(json!({"language": "python"})).await;
    api.assert_alive(&neighbour, "before").await;
    let attacker = api.start(json!({"language": "python"})).await;

    let bomb = {
        let (api, attacker) = (api.clone(), attacker.clone());
        tokio::spawn(async move { api.exec_t(&attacker, FORK_BOMB, 120).await })
    };
    tokio::time::sleep(Duration::from_secs(4)).await;
    // During the bomb.
    let started = Instant::now();
    api.assert_alive(&neighbour, "during the fork bomb").await;
    eprintln!("FIGURE fork bomb: the neighbour answered in {:?} during the bomb", started.elapsed());
    let r = bomb.await.unwrap();
    eprintln!("fork bomb: {r}");
    match r["status"].as_str().unwrap() {
        "ok" => {
            let facts: Value =
                serde_json::from_str(r["stdout"].as_str().unwrap().trim().lines().last().unwrap()).unwrap();
            eprintln!("FIGURE fork bomb: {facts}");
            assert_eq!(facts["pids_max"], "256", "{facts}");
            assert!(facts["peak_pids"].as_i64().unwrap() <= 256, "{facts}");
            // Contained: the bomb ran into the limit (its forks got EAGAIN, or its threads and children
            // filled the cgroup to exactly the limit) and never past it.
            let hit = facts["errors"]["EAGAIN"].as_u64().unwrap_or(0) > 0 || facts["peak_pids"].as_i64() == Some(256);
            assert!(hit, "the pids limit stopped the bomb: {facts}");
            assert_eq!(api.exec(&attacker, "print(6*7)").await["stdout"], "42\n", "the bombed session survives");
        }
        "killed" | "timeout" => {
            eprintln!("FIGURE fork bomb: the attacker's kernel did not survive: {}", r["status"]);
            let (status, s) = api.post(&format!("/v1/sessions/{attacker}/restart"), json!({})).await;
            assert_eq!(status, 200, "the session restarts cleanly: {s}");
            assert_eq!(api.exec(&attacker, "print(6*7)").await["stdout"], "42\n");
        }
        other => panic!("unexpected status {other}: {r}"),
    }
    api.assert_alive(&neighbour, "after the fork bomb").await;
    assert_eq!(app.containers().await.len(), 2);
}

const CPU_HOG: &str = r#"
import subprocess, sys
hogs = [subprocess.Popen([sys.executable, '-c', 'import time\nt = time.time() + 300\nwhile time.time() < t: pass']) for _ in range(4)]
print(len(hogs))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn hostile_cpu_hog_next_to_a_neighbour_figures_only() {
    let app = spawn_app().await;
    let api = Api::of(&app);
    let neighbour = api.start(json!({"language": "python"})).await;
    api.assert_alive(&neighbour, "before").await;
    let attacker = api.start(json!({"language": "python"})).await;
    let quiet = p50_latency(&api, &neighbour, 20).await;
    let r = api.exec(&attacker, CPU_HOG).await;
    assert_eq!(r["stdout"], "4\n", "{r}");
    tokio::time::sleep(Duration::from_secs(2)).await;
    let busy = p50_latency(&api, &neighbour, 20).await;
    let attacker_busy = p50_latency(&api, &attacker, 5).await;
    eprintln!(
        "FIGURE cpu hog: neighbour execute p50 {quiet:?} quiet, {busy:?} with 4 busy processes in another session (cpus 1.0); the hog's own session p50 {attacker_busy:?}"
    );
    let r = api.exec(&attacker, "for h in hogs: h.kill()\nfor h in hogs: h.wait()\nprint(6*7)").await;
    assert_eq!(r["stdout"], "42\n", "{r}");
    api.assert_alive(&neighbour, "after the cpu hog").await;
}

// ---------------------------------------------------------------------------------------------------
// 5. Disk fill.

const DISK_FILL: &str = r#"
import os, json
res = {}
for d in ['/tmp', '/home/kernel']:
    st = os.statvfs(d)
    size = st.f_blocks * st.f_frsize
    written, err = 0, None
    chunk = b'\0' * (1 << 20)
    try:
        with open(os.path.join(d, 'fill'), 'wb', buffering=0) as f:
            while True:
                written += f.write(chunk)
    except OSError as e:
        err = e.errno
    res[d] = {'size': size, 'written': written, 'errno': err}
print(json.dumps(res))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn hostile_filling_tmp_and_home_is_enospc_not_a_kill() {
    disk_fill(None).await
}

pub(crate) async fn disk_fill(under: Under) {
    let app = spawn_app_with(options_under(under)).await;
    let api = Api::of(&app).under(under);
    let neighbour = api.start(json!({"language": "python"})).await;
    api.assert_alive(&neighbour, "before").await;
    for memory_mb in [512u64, 256] {
        let attacker = api.start(json!({"language": "python", "memory_mb": memory_mb})).await;
        api.exec(&attacker, "state = 'alive'").await;
        let r = api.exec_t(&attacker, DISK_FILL, 120).await;
        assert_eq!(r["status"], "ok", "filling the disks is not a kill: {r}");
        let facts: Value = serde_json::from_str(r["stdout"].as_str().unwrap().trim()).unwrap();
        eprintln!("FIGURE disk fill with memory_mb {memory_mb}: {facts}");
        for d in ["/tmp", "/home/kernel"] {
            let f = &facts[d];
            assert_eq!(f["errno"], 28, "{d}: ENOSPC: {facts}");
            let size = f["size"].as_u64().unwrap();
            assert!(size <= memory_mb / 4 * 1024 * 1024, "{d}: at most a quarter of memory_mb: {facts}");
            assert!(f["written"].as_u64().unwrap() >= size / 2, "{d}: it filled up: {facts}");
        }
        let r = api.exec(&attacker, "print(state)").await;
        // (IPython may add that its history database could not be written: the disk is full.)
        assert!(r["stdout"].as_str().unwrap().contains("alive"), "the session is alive with full disks: {r}");
        let r =
            api.exec(&attacker, "import os\nos.remove('/tmp/fill'); os.remove('/home/kernel/fill')\nprint(6*7)").await;
        assert_eq!(r["status"], "ok", "{r}");
        assert!(r["stdout"].as_str().unwrap().contains("42\n"), "{r}");
        api.assert_alive(&neighbour, "after the disk fill").await;
    }
}

// ---------------------------------------------------------------------------------------------------
// 6. Network.

const NETWORK: &str = r#"
import socket, json, os, stat
res = {'interfaces': [n for _, n in socket.if_nameindex()], 'attempts': {}}
def attempt(name, fn):
    try:
        fn()
        res['attempts'][name] = 'ok'
    except OSError as e:
        res['attempts'][name] = repr(e)
def tcp(addr):
    return lambda: socket.create_connection(addr, timeout=3).close()
def unix(path):
    def go():
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(3)
        s.connect(path)
        s.close()
    return go
def udp(addr):
    def go():
        s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        s.sendto(b'x', addr)
    return go
attempt('tcp 1.1.1.1:53', tcp(('1.1.1.1', 53)))
attempt('udp 1.1.1.1:53', udp(('1.1.1.1', 53)))
attempt('tcp gateway:80', tcp(('GATEWAY', 80)))
attempt('tcp gateway:PORT', tcp(('GATEWAY', PORT)))
attempt('tcp gateway:2375', tcp(('GATEWAY', 2375)))
attempt('tcp 127.0.0.1:PORT', tcp(('127.0.0.1', PORT)))
attempt('tcp localhost:PORT', tcp(('localhost', PORT)))
attempt('dns', lambda: socket.getaddrinfo('example.com', 80))
for p in ['/var/run/docker.sock', '/run/docker.sock', '/run/containerd/containerd.sock']:
    attempt('unix ' + p, unix(p))
res['root'] = sorted(os.listdir('/'))
res['kernel'] = sorted(os.listdir('/kernel'))
found = []
for top in ['/']:
    for dirpath, dirnames, filenames in os.walk(top):
        if dirpath in ('/proc', '/sys', '/dev'):
            dirnames[:] = []
            continue
        for n in filenames:
            p = os.path.join(dirpath, n)
            try:
                if stat.S_ISSOCK(os.lstat(p).st_mode):
                    found.append(p)
            except OSError:
                pass
res['sockets'] = sorted(found)
for p in found:
    # /kernel is the session's own run directory, /tmp its private tmpfs (start-kernel's own sockets).
    if not p.startswith('/kernel/') and not p.startswith('/tmp/'):
        attempt('unix ' + p, unix(p))
print(json.dumps(res))
"#;

fn docker_gateway() -> String {
    let out = std::process::Command::new("ip").args(["-4", "addr", "show", "docker0"]).output().expect("ip");
    let text = String::from_utf8_lossy(&out.stdout);
    text.split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .and_then(|a| a.split('/').next())
        .map(str::to_owned)
        .unwrap_or_else(|| "172.17.0.1".to_owned())
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_network_reaches_nothing_but_loopback() {
    network(None).await
}

pub(crate) async fn network(under: Under) {
    let app = spawn_app_with(options_under(under)).await;
    let api = Api::of(&app).under(under);
    let neighbour = api.start(json!({"language": "python"})).await;
    api.assert_alive(&neighbour, "before").await;
    let attacker = api.start(json!({"language": "python"})).await;
    let gateway = docker_gateway();
    let port = app.addr().rsplit(':').next().unwrap().to_owned();
    let code = NETWORK.replace("GATEWAY", &gateway).replace("PORT", &port);
    let facts = api.probe(&attacker, &code).await;
    eprintln!("FIGURE network from inside (gateway {gateway}, service port {port}): {facts}");
    assert_eq!(facts["interfaces"], json!(["lo"]), "{facts}");
    for (what, outcome) in facts["attempts"].as_object().unwrap() {
        assert_ne!(outcome, "ok", "{what} succeeded from inside the session");
    }
    assert_eq!(
        facts["kernel"],
        json!(["connection.json", "k-50001", "k-50002", "k-50003", "k-50004"]),
        "the session sees only its own run directory"
    );
    let sockets: Vec<&str> = facts["sockets"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
    assert!(
        sockets.iter().all(|s| s.starts_with("/kernel/") || s.starts_with("/tmp/")),
        "no unix socket of the host or the neighbour is visible: {sockets:?}"
    );
    api.assert_alive(&neighbour, "after the network probes").await;
}

// ---------------------------------------------------------------------------------------------------
// 7. Privileges.

const PRIVILEGES: &str = r#"
import os, json, ctypes, subprocess, glob, errno
SECRET = 'NEIGHBOUR_SECRET'
status = dict(l.split(':\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\t' in l)
# gVisor's /proc/<pid>/status has no CapAmb, NoNewPrivs or Seccomp lines: missing ones are ''.
res = {k: status.get(k, '').strip() for k in ['CapInh', 'CapPrm', 'CapEff', 'CapBnd', 'CapAmb', 'NoNewPrivs', 'Seccomp']}
res['uid'], res['euid'], res['gid'], res['groups'] = os.getuid(), os.geteuid(), os.getgid(), os.getgroups()
libc0 = ctypes.CDLL(None, use_errno=True)
res['no_new_privs_prctl'] = libc0.prctl(39, 0, 0, 0, 0)  # PR_GET_NO_NEW_PRIVS
m = subprocess.run(['mount', '-t', 'tmpfs', 'none', '/mnt'], capture_output=True, text=True)
res['mount_cli'] = [m.returncode, m.stderr.strip()]
libc = ctypes.CDLL(None, use_errno=True)
r = libc.mount(b'none', b'/mnt', b'tmpfs', 0, None)
res['mount_syscall'] = [r, errno.errorcode.get(ctypes.get_errno())]
libc.ptrace.restype = ctypes.c_long
def ptrace(request, pid):
    ctypes.set_errno(0)
    r = libc.ptrace(request, pid, None, None)
    e = ctypes.get_errno()
    if r == 0 and request == 16:
        os.waitpid(pid, os.__dict__.get('WALL', 0x40000000))
        libc.ptrace(17, pid, None, None)  # PTRACE_DETACH
    return [r, errno.errorcode.get(e)]
def read_mem(pid):
    try:
        with open('/proc/%d/maps' % pid) as f:
            start = int(f.readline().split('-')[0], 16)
        with open('/proc/%d/mem' % pid, 'rb', buffering=0) as f:
            f.seek(start)
            return ['ok', len(f.read(16))]
    except OSError as e:
        return ['error', errno.errorcode.get(e.errno)]
# A process the session starts itself (a child of the kernel), and below a child that looks at the kernel.
child = subprocess.Popen(['sleep', '60'])
res['ptrace_pid1'] = ptrace(16, 1)  # PTRACE_ATTACH
res['ptrace_parent'] = ptrace(16, os.getppid())
res['ptrace_child'] = ptrace(16, child.pid)
res['ptrace_traceme_in_child'] = subprocess.run(
    ['python3', '-c', 'import ctypes, errno; l = ctypes.CDLL(None, use_errno=True); r = l.ptrace(0, 0, None, None); print(r, errno.errorcode.get(ctypes.get_errno()))'],
    capture_output=True, text=True).stdout.split()
iov = (ctypes.c_void_p * 2)(ctypes.cast(ctypes.create_string_buffer(16), ctypes.c_void_p), 16)
libc.process_vm_readv.restype = ctypes.c_ssize_t
ctypes.set_errno(0)
r = libc.process_vm_readv(child.pid, iov, 1, iov, 1, 0)
res['process_vm_readv_child'] = [r, errno.errorcode.get(ctypes.get_errno())]
res['mem_parent_start_kernel'] = read_mem(os.getppid())
res['mem_pid1_init'] = read_mem(1)
res['mem_own_child'] = read_mem(child.pid)
res['mem_kernel_from_its_child'] = subprocess.run(
    ['python3', '-c', "import os\ntry:\n    open('/proc/%d/mem' % os.getppid(), 'rb'); print('ok')\nexcept OSError as e:\n    print(e.errno)"],
    capture_output=True, text=True).stdout.strip()
child.kill()
child.wait()
status = dict(l.split(':\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\t' in l)
res['Seccomp_filters'] = status.get('Seccomp_filters', '').strip()
try:
    res['ptrace_scope'] = open('/proc/sys/kernel/yama/ptrace_scope').read().strip()
except OSError as e:
    res['ptrace_scope'] = repr(e)
pids = sorted(int(p) for p in os.listdir('/proc') if p.isdigit())
res['processes'] = {}
hits = []
for p in pids:
    try:
        res['processes'][p] = open('/proc/%d/cmdline' % p, 'rb').read().replace(b'\0', b' ').decode()[:80]
    except OSError:
        pass
    for f in ['environ', 'cmdline']:
        try:
            if SECRET.encode() in open('/proc/%d/%s' % (p, f), 'rb').read():
                hits.append('/proc/%d/%s' % (p, f))
        except OSError:
            pass
try:
    res['pid1_environ'] = len(open('/proc/1/environ', 'rb').read())
except OSError as e:
    res['pid1_environ'] = repr(e)
g = subprocess.run(['grep', '-rlsI', '-D', 'skip', '--', SECRET, '/etc', '/kernel', '/tmp', '/home/kernel', '/opt', '/run', '/var'],
                   capture_output=True, text=True, timeout=60)
hits += [l for l in g.stdout.splitlines() if l]
res['secret_hits'] = hits
res['secret_in_env'] = any(SECRET in v for v in os.environ.values())
print(json.dumps(res))
"#;

#[tokio::test(flavor = "multi_thread")]
async fn hostile_privileges_ptrace_mounts_and_the_neighbours_environment() {
    privileges(None).await
}

pub(crate) async fn privileges(under: Under) {
    let app = spawn_app_with(options_under(under)).await;
    let api = Api::of(&app).under(under);
    let secret = format!("xyz-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
    let neighbour = api.start(json!({"language": "python", "env": {"SECRET": secret}})).await;
    api.assert_alive(&neighbour, "before").await;
    assert_eq!(api.exec(&neighbour, "import os; print(os.environ['SECRET'])").await["stdout"], format!("{secret}\n"));
    let attacker = api.start(json!({"language": "python"})).await;
    let facts = api.probe(&attacker, &PRIVILEGES.replace("NEIGHBOUR_SECRET", &secret)).await;
    eprintln!("FIGURE privileges from inside: {facts}");
    assert_eq!(facts["uid"], 1000);
    assert_eq!(facts["euid"], 1000);
    for cap in ["CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"] {
        // gVisor does not report the ambient set (its kernel has none to give).
        let missing_under_gvisor = under.is_some() && cap == "CapAmb" && facts[cap] == "";
        assert!(facts[cap] == "0000000000000000" || missing_under_gvisor, "{cap}: {facts}");
    }
    assert_eq!(facts["no_new_privs_prctl"], 1, "no-new-privileges: {facts}");
    // ptrace and its relatives: refused to every process of the session by start-kernel's seccomp filter
    // (stacked on Docker's profile, which allows them). gVisor's /proc does not show the filters; the
    // refusals below are the proof there.
    if under.is_none() {
        assert_eq!(facts["NoNewPrivs"], "1");
        assert_eq!(facts["Seccomp"], "2", "{facts}");
        assert_eq!(facts["Seccomp_filters"], "2", "Docker's profile and start-kernel's filter: {facts}");
    }
    for probe in ["ptrace_pid1", "ptrace_parent", "ptrace_child", "process_vm_readv_child"] {
        assert_eq!(facts[probe], json!([-1, "EPERM"]), "{probe}: {facts}");
    }
    assert_eq!(facts["ptrace_traceme_in_child"], json!(["-1", "EPERM"]), "{facts}");
    // /proc/<pid>/mem: start-kernel and the python kernel are non-dumpable, so no other process of the
    // session can open theirs. (Processes the session starts itself stay readable by their own uid's other
    // processes: the host kernel has no Yama; see docs/security.md.)
    assert_eq!(facts["mem_parent_start_kernel"], json!(["error", "EACCES"]), "{facts}");
    assert_eq!(facts["mem_kernel_from_its_child"], "13", "EACCES: {facts}");
    assert_ne!(facts["mount_cli"][0], 0, "mount -t tmpfs failed: {facts}");
    assert_eq!(facts["mount_syscall"][0], -1, "mount(2) failed: {facts}");
    assert_eq!(facts["mount_syscall"][1], "EPERM", "{facts}");
    // PID 1 is Docker's init of this container, not the host's: the process list is the session's own.
    let processes = facts["processes"].as_object().unwrap();
    assert!(processes["1"].as_str().unwrap().contains("init"), "{facts}");
    assert!(
        processes.values().all(|c| {
            let c = c.as_str().unwrap();
            c.is_empty()
                || c.contains("init")
                || c.contains("python")
                || c.contains("start-kernel")
                || c.contains("grep")
        }),
        "only the session's own processes are visible: {facts}"
    );
    assert_eq!(facts["secret_hits"], json!([]), "the neighbour's secret is visible inside: {facts}");
    assert_eq!(facts["secret_in_env"], false);
    api.assert_alive(&neighbour, "after the privilege probes").await;
}

// ---------------------------------------------------------------------------------------------------
// 8. Churn.

#[tokio::test(flavor = "multi_thread")]
/// KERNELBOX_CHURN_N sessions, 1,000 by default as the issue asks (976 s on the 2-core development machine
/// while other builds ran, CPU-bound on container create/start/remove); `KERNELBOX_CHURN_N=200` for a
/// quicker local run. Its figures are in docs/security.md.
async fn hostile_churn_of_sessions_leaves_nothing_behind() {
    let n: usize = std::env::var("KERNELBOX_CHURN_N").ok().and_then(|v| v.parse().ok()).unwrap_or(1000);
    let dir = scratch("kbt");
    let instance = new_instance("churn");
    let _guard = InstanceGuard(instance.clone());
    // Churn is the point here, not the per-key create limit (2 a second by default).
    let args = ["--max-sessions", "200", "--create-limit-per-minute", "0"];
    let mut service = service_process(&instance, dir.path(), &args, &[]).await;
    let api = Api::of_process(&service);
    let neighbour = api.start(json!({"language": "python"})).await;
    api.assert_alive(&neighbour, "before").await;

    let rss_0 = service.rss_kib();
    let started = Instant::now();
    let gate = std::sync::Arc::new(tokio::sync::Semaphore::new(4));
    let mut rss_half = 0;
    let mut tasks = Vec::new();
    for i in 0..n {
        let permit = gate.clone().acquire_owned().await.unwrap();
        if i == n / 2 {
            rss_half = service.rss_kib();
        }
        let api = api.clone();
        let language = if i % 2 == 0 { "bash" } else { "python" };
        tasks.push(tokio::spawn(async move {
            let _permit = permit;
            let id = api.start(json!({"language": language})).await;
            if i % 10 == 0 {
                let code = if language == "bash" { "echo 42" } else { "print(42)" };
                assert_eq!(api.exec(&id, code).await["stdout"], "42\n");
            }
            assert_eq!(api.delete(&id).await, 204);
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let elapsed = started.elapsed();
    let rss_n = service.rss_kib();
    eprintln!(
        "FIGURE churn: {n} sessions created and deleted (4 at a time) in {elapsed:?}; service RSS {:.1} MiB at 0, {:.1} MiB at {}, {:.1} MiB at {n}",
        mib(rss_0),
        mib(rss_half),
        n / 2,
        mib(rss_n)
    );
    api.assert_alive(&neighbour, "after the churn").await;
    api.delete(&neighbour).await;
    let containers = instance_containers(&instance).await;
    assert!(containers.is_empty(), "no container of the instance is left: {}", containers.len());
    let left: Vec<_> =
        std::fs::read_dir(dir.path().join("sessions")).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "no run directory is left: {left:?}");
    let stopped = service.terminate(Duration::from_secs(30));
    eprintln!("FIGURE churn: SIGTERM to exit with no session: {stopped:?}");
    assert!(
        rss_n < 2 * rss_0 + 64 * 1024,
        "sanity: the service's memory did not run away: {rss_n} KiB from {rss_0} KiB"
    );
}

// ---------------------------------------------------------------------------------------------------
// 9. SIGKILL of the service mid-execution.

#[tokio::test(flavor = "multi_thread")]
async fn hostile_service_killed_mid_execution_leaves_no_orphan() {
    let dir = scratch("kbt");
    let instance = new_instance("kill9");
    let _guard = InstanceGuard(instance.clone());
    let mut first = service_process(&instance, dir.path(), &[], &[]).await;
    let api = Api::of_process(&first);
    let neighbour = api.start(json!({"language": "python"})).await;
    api.assert_alive(&neighbour, "before").await;
    api.exec(&neighbour, "kept = 'neighbour state'").await;
    let busy = api.start(json!({"language": "python"})).await;
    api.exec(&busy, "kept = 'busy state'").await;
    let running = {
        let api = api.clone();
        let busy = busy.clone();
        tokio::spawn(async move {
            api.client
                .post(format!("{}/v1/sessions/{busy}/execute", api.base))
                .json(&json!({"code": "import time; time.sleep(30); print('slept')"}))
                .send()
                .await
        })
    };
    tokio::time::sleep(Duration::from_secs(2)).await;
    first.kill9();
    assert!(running.await.unwrap().is_err(), "the running call was cut with the service");
    assert_eq!(instance_containers(&instance).await.len(), 2, "SIGKILL cleaned nothing up");

    let second = service_process(&instance, dir.path(), &[], &[]).await;
    let api = Api::of_process(&second);
    let (_, listed) = api.get("/v1/sessions").await;
    let listed: Vec<String> = listed.as_array().unwrap().iter().map(|s| s["id"].as_str().unwrap().to_owned()).collect();
    eprintln!("FIGURE kill -9 mid-execution: the new service lists {listed:?} (neighbour {neighbour}, busy {busy})");
    let r = api.exec(&neighbour, "print(kept)").await;
    assert_eq!(r["stdout"], "neighbour state\n", "the idle neighbour was adopted with its state: {r}");
    if listed.contains(&busy) {
        let r = api.exec_t(&busy, "print(kept)", 60).await;
        eprintln!("FIGURE kill -9 mid-execution: the busy session was adopted; next execute: {r}");
        assert_eq!(r["stdout"], "busy state\n", "adopted with its state: {r}");
    } else {
        eprintln!("FIGURE kill -9 mid-execution: the busy session was cleaned up, not adopted");
        assert_eq!(api.get(&format!("/v1/sessions/{busy}")).await.0, 404);
    }
    // Every container of the instance belongs to a session the new service lists (the reaper's orphan
    // sweep may still be removing a dead one: give it one pass).
    let owned = eventually(Duration::from_secs(60), || async {
        instance_containers(&instance).await.iter().all(|c| listed.contains(&c.labels["kernelbox.session"]))
    })
    .await;
    assert!(owned, "an orphaned container: {:?}", instance_containers(&instance).await);
    let mut dirs: Vec<String> = std::fs::read_dir(dir.path().join("sessions"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().split('-').next().unwrap().to_owned())
        .collect();
    dirs.sort();
    let mut expected = listed.clone();
    expected.sort();
    assert_eq!(dirs, expected, "one run directory per listed session, none stale");
    api.assert_alive(&neighbour, "after the kill -9").await;
}

// ---------------------------------------------------------------------------------------------------
// 10. Docker unreachable.

/// A unix-socket proxy to the Docker engine that can be cut (no socket, live connections dropped) and
/// restored.
struct DockerProxy {
    path: PathBuf,
    cut: tokio_util::sync::CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl DockerProxy {
    fn start(path: &Path) -> DockerProxy {
        let mut p = DockerProxy { path: path.to_owned(), cut: Default::default(), task: None };
        p.restore();
        p
    }

    fn restore(&mut self) {
        let _ = std::fs::remove_file(&self.path);
        let listener = tokio::net::UnixListener::bind(&self.path).expect("proxy socket");
        let cut = tokio_util::sync::CancellationToken::new();
        self.cut = cut.clone();
        self.task = Some(tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    _ = cut.cancelled() => return,
                    a = listener.accept() => a,
                };
                let Ok((mut client, _)) = accepted else { continue };
                let cut = cut.clone();
                tokio::spawn(async move {
                    let Ok(mut upstream) = tokio::net::UnixStream::connect("/var/run/docker.sock").await else {
                        return;
                    };
                    tokio::select! {
                        _ = cut.cancelled() => {}
                        _ = tokio::io::copy_bidirectional(&mut client, &mut upstream) => {}
                    }
                });
            }
        }));
    }

    async fn cut(&mut self) {
        self.cut.cancel();
        if let Some(task) = self.task.take() {
            let _ = task.await;
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn hostile_docker_unreachable_is_503_and_recovers_by_itself() {
    let dir = scratch("kbt");
    let instance = new_instance("nodocker");
    let _guard = InstanceGuard(instance.clone());
    let proxy_dir = scratch("kbt-proxy");
    let mut proxy = DockerProxy::start(&proxy_dir.path().join("docker.sock"));
    let docker_host = format!("unix://{}", proxy.path.display());
    let service = service_process(&instance, dir.path(), &[], &[("DOCKER_HOST", docker_host)]).await;
    let api = Api::of_process(&service);
    // Without automatic restarts, so that its death at the end shows as `dead`.
    let neighbour = api.start(json!({"language": "python", "auto_restart": false})).await;
    api.assert_alive(&neighbour, "before").await;

    proxy.cut().await;
    let (status, v) = service.post("/v1/sessions", json!({"language": "python"})).await;
    eprintln!("FIGURE docker cut: POST /v1/sessions -> {status} {v}");
    assert_eq!(status, 503, "{v}");
    assert!(v["error"]["code"].as_str().is_some_and(|c| !c.is_empty()), "a JSON error: {v}");
    assert!(v["error"]["message"].as_str().is_some_and(|m| !m.is_empty()), "a JSON error: {v}");
    let (status, v) = service.get("/readyz").await;
    assert_ne!(status, 200, "not ready without Docker: {v}");
    let r = api.exec(&neighbour, "print(6*7)").await;
    eprintln!("FIGURE docker cut: the neighbour's execute during the outage: {r}");
    let (_, s) = api.get(&format!("/v1/sessions/{neighbour}")).await;
    eprintln!("FIGURE docker cut: the neighbour's status during the outage: {}", s["status"]);

    proxy.restore();
    let started = Instant::now();
    let ready = eventually(Duration::from_secs(60), || async { api.get("/readyz").await.0 == 200 }).await;
    eprintln!("FIGURE docker restored: ready again after {:?}", started.elapsed());
    assert!(ready, "/readyz is 200 again by itself");
    let id = api.start(json!({"language": "python"})).await;
    assert_eq!(api.exec(&id, "print(6*7)").await["stdout"], "42\n");
    api.assert_alive(&neighbour, "after the Docker outage").await;

    // The outage cut the neighbour's container watch (a live connection to the engine): the service must
    // still notice when the container dies.
    let container = instance_containers(&instance)
        .await
        .into_iter()
        .find(|c| c.labels["kernelbox.session"] == neighbour)
        .expect("the neighbour's container")
        .id;
    let killed = std::process::Command::new("docker").args(["kill", &container]).output().unwrap();
    assert!(killed.status.success());
    let started = Instant::now();
    let noticed = eventually(Duration::from_secs(30), || async {
        api.get(&format!("/v1/sessions/{neighbour}")).await.1["status"] == "dead"
    })
    .await;
    eprintln!(
        "FIGURE docker restored: a container killed after the outage noticed: {noticed} after {:?}",
        started.elapsed()
    );
    assert!(noticed, "the death of a container whose watch was cut by the outage is noticed");
}

/// A process outside the kernel's process group (so a restart does not kill it) that queues 100
/// connections with garbage on each of /kernel/k-5000x and holds them.
const SQUATTER: &str = r#"
import subprocess, sys
squat = subprocess.Popen([sys.executable, '-c', '''
import socket, time, os
GARBAGE = PAYLOAD
held = []
for i in range(400):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(1)
    try:
        s.connect('/kernel/k-5000%d' % (1 + i % 4))
        if GARBAGE:
            s.send(b'\\xff' + os.urandom(200))
        held.append(s)
    except OSError:
        s.close()
print(len(held), flush=True)
time.sleep(600)
'''], start_new_session=True, stdout=subprocess.PIPE, text=True)
print(squat.stdout.readline().strip())
"#;

#[tokio::test(flavor = "multi_thread")]
async fn hostile_garbage_connections_queued_before_a_restart() {
    squatted_restart(true, true).await;
}

/// What holds today: 100 silent connections per channel queued ahead of the relay make the restart fail
/// (each accepted connection gets `HANDSHAKE_TIMEOUT`, 5 s, one after the other: ~18 exhaust the 90 s
/// start timeout), but only for the attacker's own session; the neighbour is untouched and the broken
/// session is deleted cleanly.
#[tokio::test(flavor = "multi_thread")]
async fn hostile_silent_connections_queued_before_a_restart_hurt_only_their_own_session() {
    squatted_restart(false, false).await;
}

/// The same, and the restart succeeds, as it does with garbage connections: accepted connections'
/// handshakes run side by side (bounded), so silent peers queued ahead of start-kernel's relay cannot
/// starve it (they once did, 5 s each, until the 90 s start timeout).
#[tokio::test(flavor = "multi_thread")]
async fn hostile_silent_connections_queued_before_a_restart() {
    squatted_restart(false, true).await;
}

async fn squatted_restart(garbage: bool, strict: bool) {
    let app = spawn_app().await;
    let api = Api::of(&app);
    let neighbour = api.start(json!({"language": "python"})).await;
    api.assert_alive(&neighbour, "before").await;
    let attacker = api.start(json!({"language": "python"})).await;
    let r = api.exec(&attacker, &SQUATTER.replace("PAYLOAD", if garbage { "True" } else { "False" })).await;
    eprintln!(
        "FIGURE squatter (garbage {garbage}): connections queued and held by a process that survives restarts: {}",
        r["stdout"]
    );
    assert_eq!(r["status"], "ok", "{r}");
    let held: u64 = r["stdout"].as_str().unwrap().trim().parse().unwrap_or(0);
    assert!(held > 0, "the squatter holds connections: {r}");
    // The restart accepts four new connections: the squatter's are first in the queue.
    let started = Instant::now();
    let (status, s) = api.post(&format!("/v1/sessions/{attacker}/restart"), json!({})).await;
    eprintln!(
        "FIGURE squatter (garbage {garbage}): restart with 400 connections queued -> {status} after {:?}: {s}",
        started.elapsed()
    );
    api.assert_alive(&neighbour, "after the squatted restart").await;
    if status == 200 {
        let r = api.exec_t(&attacker, "print(6*7)", 30).await;
        assert_eq!(r["stdout"], "42\n", "the restarted kernel answers: {r}");
    } else {
        // A failed restart must leave a session that can be deleted cleanly.
        eprintln!("FIGURE squatter (garbage {garbage}): the restart failed: {status} {s}");
        assert_eq!(api.delete(&attacker).await, 204);
        let gone = eventually(Duration::from_secs(30), || async { app.containers().await.len() == 1 }).await;
        assert!(gone, "the attacker's container is removed");
        assert!(status >= 500 && s["error"]["code"].as_str().is_some(), "a failed restart is a JSON 5xx: {status} {s}");
        api.assert_alive(&neighbour, "after the attacker was deleted").await;
        assert!(!strict, "queued connections (garbage {garbage}) break the session's restart: {status} {s}");
    }
}
