//! The sandbox seen from inside a session, and kernels that die.

use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

/// What the sandbox looks like from inside a session, as one JSON document: the kernel the code talks to
/// (`release`, its log), uid, interfaces, capabilities, no-new-privs (gVisor's `/proc` has no such line:
/// empty there), the root's and the home's writability, a connect out, the cgroup limits (none visible
/// under gVisor), `/tmp`'s size, the working directory and `GREETING` from the environment.
pub(crate) const SANDBOX_FACTS: &str = r#"
import os, socket, json, ctypes
def cg(*paths):
    for p in paths:
        try:
            return open(p).read().strip()
        except OSError:
            pass
libc = ctypes.CDLL(None, use_errno=True)
log = ctypes.create_string_buffer(1 << 16)
log_len = libc.klogctl(3, log, len(log))  # SYSLOG_ACTION_READ_ALL: gVisor's boot lines, EPERM on the host
status = dict(l.split(':\t', 1) for l in open('/proc/self/status').read().splitlines() if ':\t' in l)
try:
    open('/usr/evil', 'w'); root_writable = True
except OSError:
    root_writable = False
try:
    socket.create_connection(('1.1.1.1', 53), timeout=2); network = True
except OSError:
    network = False
st = os.statvfs('/tmp')
print(json.dumps({
    'release': os.uname().release, 'dmesg': log.raw[:max(log_len, 0)].decode(errors='replace'),
    'tmp_mb': st.f_blocks * st.f_frsize // (1 << 20),
    'uid': os.getuid(), 'interfaces': [n for _, n in socket.if_nameindex()],
    'cap_eff': status['CapEff'].strip(), 'no_new_privs': status.get('NoNewPrivs', '').strip(),
    'root_writable': root_writable, 'network': network,
    'memory': cg('/sys/fs/cgroup/memory.max', '/sys/fs/cgroup/memory/memory.limit_in_bytes'),
    'pids': cg('/sys/fs/cgroup/pids.max', '/sys/fs/cgroup/pids/pids.max'),
    'cwd': os.getcwd(), 'home_writable': os.access(os.getcwd(), os.W_OK), 'greeting': os.environ.get('GREETING'),
}))
"#;

/// Runs [`SANDBOX_FACTS`] in session `id`.
pub(crate) async fn sandbox_facts(app: &TestApp, id: &str) -> serde_json::Value {
    let r = app.exec(id, SANDBOX_FACTS).await;
    assert_eq!(r["status"], "ok", "{r}");
    serde_json::from_str(r["stdout"].as_str().unwrap().trim()).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_has_no_network_no_privileges_and_its_limits() {
    let app = spawn_app().await;
    let id = app.start_with(json!({"language": "python", "memory_mb": 300, "env": {"GREETING": "hi"}})).await;
    let facts = sandbox_facts(&app, &id).await;
    assert_eq!(facts["uid"], 1000, "non-root");
    assert_eq!(facts["interfaces"], json!(["lo"]), "no network interface but loopback");
    assert_eq!(facts["network"], false);
    assert_eq!(facts["cap_eff"], "0000000000000000", "no capabilities");
    assert_eq!(facts["no_new_privs"], "1");
    assert_eq!(facts["root_writable"], false, "read-only root");
    assert_eq!(facts["memory"], (300u64 * 1024 * 1024).to_string());
    assert_eq!(facts["pids"], "256");
    assert_eq!(facts["cwd"], "/home/kernel");
    assert_eq!(facts["home_writable"], true);
    assert_eq!(facts["greeting"], "hi");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_memory_bomb_is_killed_as_out_of_memory_and_the_session_can_restart() {
    let app = spawn_app().await;
    // Without automatic restarts (see `auto_restart.rs` for them): dead until restarted.
    let id = app.start_with(json!({"language": "python", "memory_mb": 128, "auto_restart": false})).await;
    let r = app.exec(&id, "x = bytearray(1024 * 1024 * 1024)").await;
    assert_eq!(r["status"], "killed", "{r}");
    assert_eq!(r["killed_reason"], "out_of_memory");
    let (_, s) = app.get(&format!("/v1/sessions/{id}")).await;
    assert_eq!(s["status"], "dead");
    let r = app.exec(&id, "1").await;
    assert_eq!(r["status"], "killed", "a dead kernel answers at once");

    let (status, s) = app.post(&format!("/v1/sessions/{id}/restart"), json!({})).await;
    assert_eq!(status, 200, "{s}");
    assert_eq!(s["status"], "idle");
    assert_eq!(result_text(&app.exec(&id, "6*7").await).as_deref(), Some("42"));
    assert_eq!(app.containers().await.len(), 1, "the dead container was replaced, not kept");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_container_killed_from_outside_is_noticed_at_once() {
    let app = spawn_app().await;
    let id = app.start_with(json!({"language": "python", "auto_restart": false})).await;
    let container = app.containers().await.pop().unwrap().id;
    let status = std::process::Command::new("docker").args(["kill", &container]).output().unwrap();
    assert!(status.status.success());
    // Noticed by the container watcher, not at the next timeout.
    let dead = eventually(Duration::from_secs(5), || async {
        app.get(&format!("/v1/sessions/{id}")).await.1["status"] == "dead"
    })
    .await;
    assert!(dead, "the session is marked dead within 5 s");
    let r = app.exec(&id, "1").await;
    assert_eq!(r["status"], "killed");
    assert!(r["killed_reason"].as_str().unwrap().contains("exited"), "{r}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_kernel_that_dies_mid_execution_returns_killed() {
    let app = spawn_app().await;
    let id = app.start("python").await;
    let r = app.exec(&id, "import os, signal\nprint('bye', flush=True)\nos.kill(os.getpid(), signal.SIGKILL)").await;
    assert_eq!(r["status"], "killed", "{r}");
    assert!(r["duration_ms"].as_u64().unwrap() < 10_000, "detected at once, not after the timeout");
}
