//! Network by name (issue 22): a session reaches only the names on its allow-list, through the egress
//! proxy, and every refusal is reported to the caller. The session keeps no route anywhere (only `lo`);
//! its clients use the proxy variables kernelbox sets. All local: a lab of the test's own (a Docker network,
//! and on it an HTTP and HTTPS server with a certificate from a CA the test makes) and the proxy's test-only
//! names under `.test` (`allowed.test` and `other.test` → the lab's server; `rebind.test` → a private
//! address that is not opened).

use std::time::Duration;

use kernelbox::cluster::certs::Authority;
use rcgen::{ExtendedKeyUsagePurpose, SanType};
use serde_json::{Value, json};

use crate::helpers::*;

/// The lab's server: plain HTTP on 80, HTTPS on 443 (a certificate for allowed.test and other.test), a
/// one-package index under `/simple/` (`kbtest`, a wheel it makes), `/big/<n>` (n bytes), and otherwise
/// `hello <Host> via <scheme>`.
const SERVER: &str = r#"
import hashlib, http.server, io, os, socketserver, ssl, subprocess, threading, zipfile
open('/tmp/cert.pem', 'w').write(os.environ['CERT_PEM']); open('/tmp/key.pem', 'w').write(os.environ['KEY_PEM'])
# A git repository served over dumb HTTP at /repo.git/.
git = lambda *a, cwd='/tmp': subprocess.run(['git', '-c', 'user.name=lab', '-c', 'user.email=lab@lab.test'] + list(a), cwd=cwd, check=True, capture_output=True)
os.makedirs('/tmp/src'); git('init', '-q', '/tmp/src'); open('/tmp/src/hello.txt', 'w').write('hello from git\n')
git('add', 'hello.txt', cwd='/tmp/src'); git('commit', '-qm', 'one', cwd='/tmp/src')
git('clone', '-q', '--bare', '/tmp/src', '/tmp/repo.git'); git('update-server-info', cwd='/tmp/repo.git')
buf = io.BytesIO()
with zipfile.ZipFile(buf, 'w') as z:
    z.writestr('kbtest/__init__.py', 'VALUE = 42\n')
    z.writestr('kbtest-1.0.dist-info/METADATA', 'Metadata-Version: 2.1\nName: kbtest\nVersion: 1.0\n')
    z.writestr('kbtest-1.0.dist-info/WHEEL', 'Wheel-Version: 1.0\nGenerator: kernelbox-test\nRoot-Is-Purelib: true\nTag: py3-none-any\n')
    z.writestr('kbtest-1.0.dist-info/RECORD', '')
WHEEL = buf.getvalue(); SHA = hashlib.sha256(WHEEL).hexdigest()
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def do_GET(self):
        p, ct = self.path, 'text/plain'
        if p.startswith('/simple/kbtest'):
            body = ('<html><body><a href="/files/kbtest-1.0-py3-none-any.whl#sha256=%s">kbtest-1.0-py3-none-any.whl</a></body></html>' % SHA).encode(); ct = 'text/html'
        elif p.startswith('/simple'):
            body = b'<html><body><a href="/simple/kbtest/">kbtest</a></body></html>'; ct = 'text/html'
        elif p.startswith('/files/'):
            body, ct = WHEEL, 'application/octet-stream'
        elif p.startswith('/big/'):
            body = b'x' * int(p[5:])
        elif p.startswith('/repo.git/') and '..' not in p:
            path = '/tmp' + p.split('?')[0]
            if not os.path.isfile(path):
                self.send_response(404); self.send_header('Content-Length', '0'); self.end_headers(); return
            body = open(path, 'rb').read(); ct = 'application/octet-stream'
        else:
            scheme = 'https' if isinstance(self.connection, ssl.SSLSocket) else 'http'
            body = ('hello %s via %s' % (self.headers.get('Host'), scheme)).encode()
        self.send_response(200); self.send_header('Content-Type', ct); self.send_header('Content-Length', str(len(body)))
        self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
class S(socketserver.ThreadingMixIn, http.server.HTTPServer):
    daemon_threads = True; allow_reuse_address = True; request_queue_size = 512
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain('/tmp/cert.pem', '/tmp/key.pem')
class T(S):
    # The handshake in the connection's own thread: a client that never sends its hello holds no one up.
    def finish_request(self, request, client_address):
        try:
            request = ctx.wrap_socket(request, server_side=True)
        except (OSError, ssl.SSLError):
            return
        super().finish_request(request, client_address)
plain, tls = S(('0.0.0.0', 80), H), T(('0.0.0.0', 443), H)
threading.Thread(target=plain.serve_forever, daemon=True).start()
tls.serve_forever()
"#;

fn docker_cli(args: &[&str]) -> String {
    let out = std::process::Command::new("docker").args(args).output().expect("docker");
    assert!(out.status.success(), "docker {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The test's own network and server, removed when dropped (whatever the test did).
pub struct Lab {
    pub network: String,
    server: String,
    /// The server's address on the lab's network.
    pub ip: String,
    /// The CA the server's certificate is from (the session's clients are told to trust it).
    pub ca_pem: String,
}

impl Lab {
    pub async fn new() -> Lab {
        ensure_images().await;
        let tag = &uuid_like()[..10];
        let network = format!("kb-egress-lab-{tag}");
        docker_cli(&["network", "create", "--label", "kernelbox.test=egress", &network]);
        let ca = Authority::new(1).unwrap();
        let sans = ["allowed.test", "other.test"].map(|n| SanType::DnsName(n.try_into().unwrap())).to_vec();
        let leaf = ca.issue("allowed.test", sans, ExtendedKeyUsagePurpose::ServerAuth).unwrap();
        let server = format!("kb-egress-lab-{tag}");
        let mut lab = Lab { network, server: String::new(), ip: String::new(), ca_pem: ca.pair().cert_pem.clone() };
        // The bash image: git, and the system's Python (its standard library is all the server needs).
        let image = format!("{}bash:latest", image_prefix());
        let (cert, key) = (format!("CERT_PEM={}", leaf.cert_pem), format!("KEY_PEM={}", leaf.key_pem));
        #[rustfmt::skip]
        docker_cli(&[
            "run", "-d", "--name", &server, "--network", &lab.network, "--user", "0:0", "--label",
            "kernelbox.test=egress", "--read-only", "--tmpfs", "/tmp", "-e", "HOME=/tmp", "-e", &cert, "-e", &key,
            &image, "/usr/bin/python3", "-c", SERVER,
        ]);
        lab.server = server;
        let format = format!("{{{{(index .NetworkSettings.Networks \"{}\").IPAddress}}}}", lab.network);
        lab.ip = docker_cli(&["inspect", "-f", &format, &lab.server]);
        let addr = format!("{}:443", lab.ip);
        let up =
            eventually(Duration::from_secs(20), || async { tokio::net::TcpStream::connect(&addr).await.is_ok() }).await;
        assert!(up, "the lab's server did not start: {}", docker_cli(&["logs", &lab.server]));
        lab
    }

    /// The flags of a service whose sessions may have networks, reaching this lab.
    pub fn flags(&self, extra: &[&str]) -> kernelbox::config::EgressArgs {
        self.flags_opening(&[], extra)
    }

    /// [`Lab::flags`], with more address ranges opened.
    pub fn flags_opening(&self, cidrs: &[String], extra: &[&str]) -> kernelbox::config::EgressArgs {
        let names = format!("allowed.test={ip},other.test={ip},rebind.test=10.255.255.1", ip = self.ip);
        let cidr =
            std::iter::once(format!("{}/32", self.ip)).chain(cidrs.iter().cloned()).collect::<Vec<_>>().join(",");
        let mut flags = vec![
            "--egress",
            "--egress-network",
            &self.network,
            "--egress-test-names",
            &names,
            "--egress-allow-cidr",
            &cidr,
            "--egress-forbid",
            "*.forbidden.test",
            "--egress-proxy-binary",
            proxy_binary(),
        ];
        flags.extend_from_slice(extra);
        egress(&flags)
    }

    /// An app whose sessions may have networks reaching this lab.
    pub async fn app(&self, extra: &[&str]) -> TestApp {
        self.app_opening(&[], extra).await
    }

    /// [`Lab::app`], with more address ranges opened.
    pub async fn app_opening(&self, cidrs: &[String], extra: &[&str]) -> TestApp {
        let app =
            spawn_app_with(AppOptions { egress: self.flags_opening(cidrs, extra), ..AppOptions::default() }).await;
        wait_for_proxy(&app).await;
        app
    }

    /// The session code's prelude: the lab's CA in a file, and `get(url)`, which says what `requests` saw.
    pub fn prelude(&self) -> String {
        format!(
            r#"
import os, socket, ssl, subprocess, json
CA = '/tmp/lab-ca.pem'
open(CA, 'w').write({ca:?})
def get(url, **kw):
    import requests
    try:
        r = requests.get(url, verify=CA, timeout=15, **kw)
        return '%d %s' % (r.status_code, r.text)
    except Exception as e:
        return 'ERR %s' % type(e).__name__
"#,
            ca = self.ca_pem
        )
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::process::Command::new("docker").args(["rm", "-f", &self.server]).output();
        let _ = std::process::Command::new("docker").args(["network", "rm", &self.network]).output();
    }
}

/// The kernelbox binary the proxy's image holds: this build's, without its debug information (a tenth of
/// the size), made once per test process.
pub fn proxy_binary() -> &'static str {
    static STRIPPED: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    STRIPPED.get_or_init(|| {
        let out = target_dir().join("kernelbox-egress-proxy");
        let temporary = target_dir().join(format!(".kernelbox-egress-proxy.{}", uuid_like()));
        let stripped = std::process::Command::new("strip")
            .arg("-o")
            .arg(&temporary)
            .arg(env!("CARGO_BIN_EXE_kernelbox"))
            .status()
            .expect("strip (binutils)");
        assert!(stripped.success(), "strip failed");
        std::fs::rename(&temporary, &out).unwrap();
        out.display().to_string()
    })
}

/// Waits until the service says its proxy is up (it builds the proxy's image on a first start).
pub async fn wait_for_proxy(app: &TestApp) {
    let up = eventually(Duration::from_secs(180), || async {
        let (_, ready) = app.get("/readyz").await;
        ready["egress_proxy"] == "up"
    })
    .await;
    assert!(up, "the egress proxy did not come up: {}", app.get("/readyz").await.1);
}

/// Starts a python session with `allow` (`None`: no network field).
async fn session(app: &TestApp, allow: Option<&[&str]>) -> String {
    let mut body = json!({"language": "python"});
    if let Some(allow) = allow {
        body["network"] = json!({"allow": allow});
    }
    app.start_with(body).await
}

/// Runs `code`, and returns its stdout and the result's network report.
async fn run(app: &TestApp, id: &str, code: &str) -> (String, Value) {
    let result = app.exec(id, code).await;
    assert_ne!(result["status"], "killed", "{result}");
    (result["stdout"].as_str().unwrap_or_default().trim().to_owned(), result["network"].clone())
}

fn blocked(report: &Value, host: &str) -> Vec<String> {
    let entries = report["blocked"].as_array().cloned().unwrap_or_default();
    entries.iter().filter(|b| b["host"] == host).map(|b| b["reason"].as_str().unwrap_or_default().to_owned()).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn an_allowed_name_is_reached_over_https_and_http_with_requests_curl_and_pip() {
    let lab = Lab::new().await;
    let app = lab.app(&[]).await;
    let id = session(&app, Some(&["allowed.test"])).await;
    app.exec(&id, &lab.prelude()).await;

    let (out, report) = run(&app, &id, "print(get('https://allowed.test/hi'))").await;
    assert_eq!(out, "200 hello allowed.test via https", "{report}");
    assert!(report["blocked"].as_array().unwrap().is_empty(), "{report}");
    assert!(report["allowed_bytes"].as_u64().unwrap() > 0, "{report}");
    let (out, _) = run(&app, &id, "print(get('http://allowed.test/hi'))").await;
    assert_eq!(out, "200 hello allowed.test via http");

    let curl = "print(subprocess.run(['curl', '-sS', '--cacert', CA, 'https://allowed.test/c'], capture_output=True, text=True).stdout)";
    assert_eq!(run(&app, &id, curl).await.0, "hello allowed.test via https");
    let curl_http =
        "print(subprocess.run(['curl', '-sS', 'http://allowed.test/c'], capture_output=True, text=True).stdout)";
    assert_eq!(run(&app, &id, curl_http).await.0, "hello allowed.test via http");

    let pip = "r = subprocess.run(['pip', 'download', '--no-deps', '-d', '/tmp/wheels', '--index-url', 'https://allowed.test/simple', '--cert', CA, 'kbtest'], capture_output=True, text=True); print(r.returncode, sorted(os.listdir('/tmp/wheels')) if r.returncode == 0 else r.stderr[-800:])";
    assert_eq!(run(&app, &id, pip).await.0, "0 ['kbtest-1.0-py3-none-any.whl']");

    // urllib, from the standard library, reads the same variables.
    let urllib = "import urllib.request; print(urllib.request.urlopen('https://allowed.test/u', context=ssl.create_default_context(cafile=CA)).read().decode())";
    assert_eq!(run(&app, &id, urllib).await.0, "hello allowed.test via https");
}

#[tokio::test(flavor = "multi_thread")]
async fn what_the_list_does_not_allow_is_refused_and_reported_with_its_reason() {
    let lab = Lab::new().await;
    let app = lab.app(&[]).await;
    let id = session(&app, Some(&["allowed.test", "rebind.test"])).await;
    app.exec(&id, &lab.prelude()).await;

    let (out, report) = run(&app, &id, "print(get('https://other.test/'))").await;
    assert_eq!(out, "ERR ProxyError", "{report}");
    assert_eq!(blocked(&report, "other.test"), ["not_allowed"], "{report}");
    assert_eq!(report["blocked"][0]["port"], 443);

    let (out, report) = run(&app, &id, "print(get('https://93.184.216.34/'))").await;
    assert_eq!(out, "ERR ProxyError");
    assert_eq!(blocked(&report, "93.184.216.34"), ["ip_literal"], "{report}");

    let (_, report) = run(&app, &id, "print(get('https://rebind.test/'))").await;
    assert_eq!(blocked(&report, "rebind.test"), ["private_address"], "a name resolving inside is refused: {report}");

    // A CONNECT to an allowed name whose TLS hello names another: the tunnel is closed.
    let sni = r#"
s = socket.create_connection(('127.0.0.1', 3128), timeout=10)
s.sendall(b'CONNECT allowed.test:443 HTTP/1.1\r\nHost: allowed.test:443\r\n\r\n')
print(s.recv(200).split(b'\r\n')[0].decode())
ctx = ssl.create_default_context(cafile=CA); ctx.check_hostname = False
try:
    ctx.wrap_socket(s, server_hostname='other.test').sendall(b'GET / HTTP/1.0\r\n\r\n'); print('handshake')
except (OSError, ssl.SSLError) as e:
    print('closed')
"#;
    let (out, report) = run(&app, &id, sni).await;
    assert_eq!(out, "HTTP/1.1 200 Connection established\nclosed", "{report}");
    assert_eq!(blocked(&report, "allowed.test"), ["sni_mismatch"], "{report}");

    // The same refusals counted once per kind, each time the code tries.
    let (_, report) = run(&app, &id, "print(get('https://other.test/'), get('https://other.test/x'))").await;
    assert_eq!(report["blocked"][0]["count"], 2, "{report}");
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let refused = sample(&metrics, "kernelbox_egress_connections_total{outcome=\"blocked\",reason=\"not_allowed\"}");
    assert!(refused.unwrap_or(0.0) >= 3.0, "{metrics}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_session_has_no_route_and_no_dns_whatever_its_list() {
    let lab = Lab::new().await;
    let app = lab.app(&[]).await;
    let id = session(&app, Some(&["allowed.test"])).await;
    let code = format!(
        r#"
import socket, os
print(sorted(os.listdir('/sys/class/net')))
try:
    socket.create_connection(('{ip}', 443), timeout=3); print('connected')
except OSError as e:
    print('no route')
for name in ('allowed.test', 'localhost.localdomain', 'example.com'):
    try:
        socket.getaddrinfo(name, 443); print('resolved', name)
    except socket.gaierror:
        print('no dns')
"#,
        ip = lab.ip
    );
    let (out, _) = run(&app, &id, &code).await;
    assert_eq!(out, "['lo']\nno route\nno dns\nno dns\nno dns", "only the proxy port, which the service relays");
    // A neighbour without a list: the same sandbox, and its tries are refused (and reported to it alone).
    let neighbour = session(&app, None).await;
    let (out, _) = run(&app, &neighbour, &code).await;
    assert_eq!(out, "['lo']\nno route\nno dns\nno dns\nno dns");
    app.exec(&neighbour, &lab.prelude()).await;
    let (out, report) = run(&app, &neighbour, "print(get('https://allowed.test/'))").await;
    assert_eq!(out, "ERR ProxyError");
    assert_eq!(blocked(&report, "allowed.test"), ["not_allowed"], "{report}");
    let (_, theirs) = run(&app, &id, "1").await;
    assert!(theirs["blocked"].as_array().unwrap().is_empty(), "the neighbour's refusals are its own: {theirs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_list_replaced_while_the_session_runs_applies_to_the_next_connection() {
    let lab = Lab::new().await;
    let app = lab.app(&[]).await;
    let id = session(&app, Some(&["allowed.test"])).await;
    app.exec(&id, &lab.prelude()).await;
    let (status, view) = app.get(&format!("/v1/sessions/{id}/network")).await;
    assert_eq!((status, view["allow"].clone(), view["proxy_up"].clone()), (200, json!(["allowed.test"]), json!(true)));

    assert_eq!(run(&app, &id, "print(get('https://other.test/'))").await.0, "ERR ProxyError");
    let put = |allow: Value| {
        let app = &app;
        let id = id.clone();
        async move {
            let r =
                app.client.put(app.url(&format!("/v1/sessions/{id}/network"))).json(&json!({"allow": allow})).send();
            let r = r.await.unwrap();
            (r.status().as_u16(), r.json::<Value>().await.unwrap())
        }
    };
    let (status, view) = put(json!(["allowed.test", "other.test"])).await;
    assert_eq!(status, 200, "{view}");
    assert_eq!(run(&app, &id, "print(get('https://other.test/'))").await.0, "200 hello other.test via https");
    // A connection held open to a name the next list drops is closed.
    let hold = r#"
import requests, threading
held = requests.Session(); print(held.get('https://other.test/a', verify=CA).status_code)
"#;
    assert_eq!(run(&app, &id, hold).await.0, "200");
    let (status, _) = put(json!(["allowed.test"])).await;
    assert_eq!(status, 200);
    let (out, report) = run(&app, &id, "print(get('https://other.test/'), get('https://allowed.test/'))").await;
    assert_eq!(out, "ERR ProxyError 200 hello allowed.test via https", "{report}");
    assert_eq!(blocked(&report, "other.test"), ["not_allowed"]);
    assert_eq!(app.get(&format!("/v1/sessions/{id}/network")).await.1["open_connections"], 0, "the held one closed");

    // Bad lists: named, and nothing changes.
    for (allow, code) in [
        (json!(["*"]), "invalid_network"),
        (json!(["a.*.example"]), "invalid_network"),
        (json!(["https://allowed.test/x"]), "invalid_network"),
        (json!(["allowed.test:70000"]), "invalid_network"),
        (json!(["x.forbidden.test"]), "network_forbidden"),
    ] {
        let (status, body) = put(allow.clone()).await;
        assert_eq!(status, 422, "{allow}: {body}");
        assert_error_shape(&body, code);
    }
    let (status, body) = put(json!((0..65).map(|i| format!("h{i}.example")).collect::<Vec<_>>())).await;
    assert_eq!(status, 422, "{body}");
    assert_eq!(app.get(&format!("/v1/sessions/{id}/network")).await.1["allow"], json!(["allowed.test"]));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_streaming_client_hears_of_a_refusal_the_moment_it_happens() {
    let lab = Lab::new().await;
    let app = lab.app(&[]).await;
    let id = session(&app, Some(&["allowed.test"])).await;
    app.exec(&id, &lab.prelude()).await;
    let code = "print(get('https://other.test/')); import time; time.sleep(1); print('done')";
    let r = app
        .client
        .post(app.url(&format!("/v1/sessions/{id}/execute")))
        .header("accept", "text/event-stream")
        .json(&json!({"code": code}))
        .send()
        .await
        .unwrap();
    let text = r.text().await.unwrap();
    let blocked_at = text.find("event: network_blocked").expect(&text);
    let result_at = text.find("event: result").expect(&text);
    assert!(blocked_at < result_at, "{text}");
    assert!(text[blocked_at..].contains(r#""reason":"not_allowed""#), "{text}");
}

#[tokio::test(flavor = "multi_thread")]
async fn networks_are_the_operators_to_give() {
    // Off by default: no list is taken, and no session gets the proxy.
    let app = spawn_app().await;
    let (status, body) =
        app.post("/v1/sessions", json!({"language": "python", "network": {"allow": ["a.example"]}})).await;
    assert_eq!(status, 403, "{body}");
    assert_error_shape(&body, "network_off");
    assert!(app.get("/readyz").await.1.get("egress_proxy").is_none());
    drop(app);

    let lab = Lab::new().await;
    let app = lab.app(&["--egress-max-allow", "2"]).await;
    for (allow, code) in [
        (json!(["*"]), "invalid_network"),
        (json!(["a.example", "b.example", "c.example"]), "invalid_network"),
        (json!(["deep.x.forbidden.test"]), "network_forbidden"),
        (json!([" "]), "invalid_network"),
    ] {
        let (status, body) = app.post("/v1/sessions", json!({"language": "python", "network": {"allow": allow}})).await;
        assert_eq!(status, 422, "{allow}: {body}");
        assert_error_shape(&body, code);
        assert!(body["error"]["message"].as_str().unwrap().contains("network.allow"), "names the entry: {body}");
    }
    let (status, body) = app.post("/v1/sessions", json!({"language": "python", "network": {"allowed": []}})).await;
    assert_eq!(status, 400, "an unknown field, as anywhere in the API: {body}");
    assert_error_shape(&body, "invalid_json");
    assert!(app.containers().await.iter().all(|c| !c.labels.contains_key("kernelbox.session")), "nothing started");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_dead_proxy_refuses_everything_until_it_is_back() {
    let lab = Lab::new().await;
    let app = lab.app(&[]).await;
    let id = session(&app, Some(&["allowed.test"])).await;
    app.exec(&id, &lab.prelude()).await;
    assert_eq!(run(&app, &id, "print(get('https://allowed.test/'))").await.0, "200 hello allowed.test via https");
    let proxy = format!("kernelbox-egress-{}", app.instance);
    docker_cli(&["kill", &proxy]);
    let down =
        eventually(Duration::from_secs(10), || async { app.get("/readyz").await.1["egress_proxy"] == "down" }).await;
    let (out, report) = run(&app, &id, "print(get('https://allowed.test/'))").await;
    assert!(out.starts_with("ERR"), "refused, never open: {out}");
    assert!(
        down || blocked(&report, "*").contains(&"proxy_down".to_owned()),
        "the service knew the proxy was down: {report}"
    );
    wait_for_proxy(&app).await;
    assert_eq!(run(&app, &id, "print(get('https://allowed.test/'))").await.0, "200 hello allowed.test via https");
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(sample(&metrics, "kernelbox_egress_proxy_restarts_total").unwrap_or(0.0) >= 1.0);
    // The reaper's orphan sweep leaves the proxy alone (it is its keeper's).
    let before = docker_cli(&["inspect", "-f", "{{.Id}}", &proxy]);
    app.manager.reap_once(chrono::Utc::now()).await;
    assert_eq!(docker_cli(&["inspect", "-f", "{{.Id}}", &proxy]), before);
    assert_eq!(app.get("/readyz").await.1["egress_proxy"], "up");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_service_restart_keeps_each_sessions_list() {
    let lab = Lab::new().await;
    let shared = SharedInstance::new("egress");
    let options = || AppOptions {
        egress: lab.flags(&[]),
        keep_sessions: true,
        instance: shared.options(),
        ..AppOptions::default()
    };
    let app = spawn_app_with(options()).await;
    wait_for_proxy(&app).await;
    let id = session(&app, Some(&["allowed.test"])).await;
    let put = app.client.put(app.url(&format!("/v1/sessions/{id}/network"))).json(&json!({"allow": ["other.test"]}));
    assert_eq!(put.send().await.unwrap().status(), 200);
    let plain = session(&app, Some(&["allowed.test"])).await;
    let mut app = app;
    app.cleanup = false;
    app.stop().await;

    let app = spawn_app_with(options()).await;
    wait_for_proxy(&app).await;
    assert_eq!(app.get(&format!("/v1/sessions/{id}/network")).await.1["allow"], json!(["other.test"]));
    assert_eq!(app.get(&format!("/v1/sessions/{plain}/network")).await.1["allow"], json!(["allowed.test"]));
    app.exec(&id, &lab.prelude()).await;
    assert_eq!(run(&app, &id, "print(get('https://other.test/'))").await.0, "200 hello other.test via https");
    assert_eq!(run(&app, &id, "print(get('https://allowed.test/'))").await.0, "ERR ProxyError");
}

#[tokio::test(flavor = "multi_thread")]
async fn one_session_opening_two_hundred_connections_meets_its_limit_and_the_proxy_stays_small() {
    let lab = Lab::new().await;
    let app = lab.app(&["--egress-max-connections", "50"]).await;
    let id = session(&app, Some(&["allowed.test"])).await;
    let code = r#"
import socket, collections
held, answers = [], collections.Counter()
for i in range(200):
    s = socket.create_connection(('127.0.0.1', 3128), timeout=10)
    s.sendall(b'CONNECT allowed.test:443 HTTP/1.1\r\nHost: allowed.test:443\r\n\r\n')
    line = s.recv(100).split(b'\r\n')[0].decode()
    answers[line.split(' ')[1] if line else 'closed'] += 1
    held.append(s)
print(sorted(answers.items()))
"#;
    let (out, report) = run(&app, &id, code).await;
    assert_eq!(out, "[('200', 50), ('429', 150)]", "{report}");
    assert_eq!(blocked(&report, "*"), ["connection_limit"], "{report}");
    let proxy = format!("kernelbox-egress-{}", app.instance);
    let stats = docker_cli(&["stats", "--no-stream", "--format", "{{.MemUsage}}", &proxy]);
    eprintln!("FIGURE egress proxy memory with 50 tunnels open (200 tried): {stats}");
    let (status, view) = app.get(&format!("/v1/sessions/{id}/network")).await;
    assert_eq!((status, view["open_connections"].clone()), (200, json!(50)));
    // The session goes on: the held connections close with the cell's sockets.
    assert_eq!(run(&app, &id, "held.clear(); import gc; gc.collect(); print('ok')").await.0, "ok");
    let freed = eventually(Duration::from_secs(10), || async {
        app.get(&format!("/v1/sessions/{id}/network")).await.1["open_connections"] == 0
    })
    .await;
    assert!(freed, "closed connections are released");
}

/// The addresses the package index resolves to here that the proxy would refuse (a host whose TLS goes
/// through an intercepting proxy may resolve it to one): an operator there opens them.
fn index_addresses_to_open() -> Vec<String> {
    use std::net::ToSocketAddrs;
    let mut open = Vec::new();
    for host in ["pypi.org:443", "files.pythonhosted.org:443"] {
        for addr in host.to_socket_addrs().expect("the package index resolves on this host") {
            if kernelbox::egress::addr::refusal(addr.ip(), &[]).is_some() {
                open.push(format!("{}/32", addr.ip()));
            }
        }
    }
    open
}

#[tokio::test(flavor = "multi_thread")]
async fn a_package_fetcher_goes_through_the_proxy_to_the_index_alone() {
    let lab = Lab::new().await;
    let index = index_addresses_to_open();
    let app = lab.app_opening(&index, &[]).await;
    let id = session(&app, None).await;
    let (status, report) = app.post(&format!("/v1/sessions/{id}/packages"), json!({"packages": ["six"]})).await;
    assert_eq!((status, report["ok"].clone()), (200, json!(true)), "{report}");
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    let allowed = sample(&metrics, "kernelbox_egress_connections_total{outcome=\"allowed\"}").unwrap_or(0.0);
    assert!(allowed >= 1.0, "the download went through the proxy: {metrics}");
    assert_eq!(run(&app, &id, "import six; print(six.__name__)").await.0, "six");

    // With the files' host forbidden by the operator, the fetch fails and says why.
    let app = lab.app_opening(&index, &["--egress-forbid", "files.pythonhosted.org"]).await;
    let id = session(&app, None).await;
    let (status, report) = app.post(&format!("/v1/sessions/{id}/packages"), json!({"packages": ["six"]})).await;
    assert_eq!((status, report["ok"].clone()), (200, json!(false)), "{report}");
    let log = report["log"].as_str().unwrap_or_default();
    assert!(log.contains("files.pythonhosted.org:443 was refused (forbidden)"), "{report}");
}

/// Not an assertion: the proxy's added time per HTTPS request (a new connection each, so a CONNECT, a name
/// check and a TLS handshake through both relays), beside the same client on the lab's network directly.
#[tokio::test(flavor = "multi_thread")]
async fn figure_the_time_an_https_request_takes_through_the_proxy() {
    let lab = Lab::new().await;
    let app = lab.app(&[]).await;
    let id = session(&app, Some(&["allowed.test"])).await;
    app.exec(&id, &lab.prelude()).await;
    let timing = "import time, requests\nfor _ in range(5): requests.get('https://allowed.test/w', verify=CA)\nt = time.perf_counter()\nfor _ in range(50): requests.get('https://allowed.test/x', verify=CA)\nprint('%.2f' % ((time.perf_counter() - t) / 50 * 1000))";
    let proxied: f64 = run(&app, &id, timing).await.0.parse().unwrap();
    let direct_code = format!("CA = '/tmp/ca.pem'\nopen(CA, 'w').write({:?})\n{timing}", lab.ca_pem);
    let image = format!("{}python:latest", image_prefix());
    let host = format!("allowed.test:{}", lab.ip);
    let direct: f64 = docker_cli(&[
        "run",
        "--rm",
        "--network",
        &lab.network,
        "--add-host",
        &host,
        "--label",
        "kernelbox.test=egress",
        "--tmpfs",
        "/tmp",
        &image,
        "/opt/kernelbox/venv/bin/python",
        "-c",
        &direct_code,
    ])
    .parse()
    .unwrap();
    eprintln!(
        "FIGURE HTTPS request (new connection each, requests): {proxied:.2} ms through the proxy, {direct:.2} ms direct: +{:.2} ms",
        proxied - direct
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn git_deno_and_java_reach_an_allowed_name_through_the_proxy_variables() {
    let lab = Lab::new().await;
    let app = lab.app(&[]).await;
    let bash = session_in(&app, "bash", &["allowed.test"]).await;
    let clone = format!(
        "cat > /tmp/ca.pem <<'EOF'\n{}EOF\ngit -c http.sslCAInfo=/tmp/ca.pem clone -q https://allowed.test/repo.git /tmp/r 2>&1 && cat /tmp/r/hello.txt",
        lab.ca_pem
    );
    assert_eq!(run(&app, &bash, &clone).await.0, "hello from git");

    let deno = session_in(&app, "javascript", &["allowed.test"]).await;
    let fetch = "console.log(await (await fetch('http://allowed.test/deno')).text())";
    assert_eq!(run(&app, &deno, fetch).await.0, "hello allowed.test via http");
    // Plain HTTP through a proxy: the refusal is the proxy's answer, which says why.
    let refused =
        "const r = await fetch('http://other.test/'); console.log(r.status, r.headers.get('x-kernelbox-blocked'))";
    let (out, report) = run(&app, &deno, refused).await;
    assert_eq!(out, "403 not_allowed", "{report}");
    assert_eq!(blocked(&report, "other.test"), ["not_allowed"]);

    let java = session_in(&app, "java", &["allowed.test"]).await;
    let get = r#"
import java.net.URI;
import java.net.http.*;
var client = HttpClient.newHttpClient();
System.out.println(client.send(HttpRequest.newBuilder(URI.create("http://allowed.test/java")).build(), HttpResponse.BodyHandlers.ofString()).body());
"#;
    assert_eq!(run(&app, &java, get).await.0, "hello allowed.test via http");
}

async fn session_in(app: &TestApp, language: &str, allow: &[&str]) -> String {
    app.start_with(json!({"language": language, "network": {"allow": allow}})).await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_session_api_and_the_gateway_pass_an_allow_list_when_they_start_a_kernel() {
    let lab = Lab::new().await;
    let app = lab.app(&[]).await;
    let fields = [("user_id", "alice"), ("network_allow", "allowed.test")];
    let (status, body) = crate::compat_session::post_form(&app, "/start_session", &fields).await;
    assert_eq!(status, 200, "{body}");
    let kernel = app
        .client
        .post(app.url("/api/kernels"))
        .json(&json!({"name": "python3", "env": {"KERNEL_NETWORK_ALLOW": "allowed.test, other.test"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(kernel.status(), 201, "{}", kernel.text().await.unwrap());
    let bad = app.client.post(app.url("/api/kernels")).json(&json!({"env": {"KERNEL_NETWORK_ALLOW": "*"}})).send();
    assert_eq!(bad.await.unwrap().status(), 422);

    let (_, sessions) = app.get("/v1/sessions").await;
    let mut lists = Vec::new();
    for s in sessions.as_array().unwrap() {
        let id = s["id"].as_str().unwrap();
        lists.push(app.get(&format!("/v1/sessions/{id}/network")).await.1["allow"].clone());
    }
    lists.sort_by_key(|l| l.as_array().map_or(0, Vec::len));
    assert_eq!(lists, [json!(["allowed.test"]), json!(["allowed.test", "other.test"])]);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_proxy_gets_a_network_of_its_own_unless_the_operator_names_one() {
    let args = egress(&["--egress", "--egress-proxy-binary", proxy_binary()]);
    let app = spawn_app_with(AppOptions { egress: args, ..AppOptions::default() }).await;
    wait_for_proxy(&app).await;
    let network = format!("kernelbox-egress-{}", app.instance);
    let facts = docker_cli(&[
        "network",
        "inspect",
        "-f",
        r#"{{index .Options "com.docker.network.bridge.enable_icc"}} {{index .Labels "kernelbox.instance"}} {{len .Containers}}"#,
        &network,
    ]);
    assert_eq!(facts, format!("false {} 1", app.instance), "its own bridge, the proxy alone on it");
    let proxy = format!("kernelbox-egress-{}", app.instance);
    let on = docker_cli(&["inspect", "-f", "{{range $k, $v := .NetworkSettings.Networks}}{{$k}} {{end}}", &proxy]);
    assert_eq!(on.trim(), network);
    app.stop().await;
    let left = std::process::Command::new("docker").args(["network", "inspect", &network]).output().unwrap();
    assert!(!left.status.success(), "the network goes with the service");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_deleted_with_connections_open_leaves_no_network_behind() {
    let lab = Lab::new().await;
    let app = lab.app(&[]).await;
    let id = session(&app, Some(&["allowed.test"])).await;
    app.exec(&id, &lab.prelude()).await;
    let hold = "import requests\nheld = [requests.Session() for _ in range(3)]\nprint([s.get('https://allowed.test/h', verify=CA).status_code for s in held])";
    assert_eq!(run(&app, &id, hold).await.0, "[200, 200, 200]");
    let hub = app.manager.networks().expect("networks are on").hub.clone();
    let network = hub.get(&id).expect("the session's network");
    assert_eq!(network.open_connections(), 3, "kept alive by requests' sessions");
    assert_eq!(app.delete(&format!("/v1/sessions/{id}")).await, 204);
    assert!(hub.get(&id).is_none(), "the hub forgot it");
    let closed = eventually(Duration::from_secs(10), || async { network.open_connections() == 0 }).await;
    assert!(closed, "its connections were closed with it");
    assert!(!app.state_dir.join("network").join(format!("{id}.json")).exists());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_under_gvisor_reaches_an_allowed_name_the_same_way() {
    require_runsc().await;
    let lab = Lab::new().await;
    let app = spawn_app_with(AppOptions {
        egress: lab.flags(&[]),
        limits: limits(&["--session-runtimes", RUNSC]),
        ..AppOptions::default()
    })
    .await;
    wait_for_proxy(&app).await;
    let id =
        app.start_with(json!({"language": "python", "runtime": RUNSC, "network": {"allow": ["allowed.test"]}})).await;
    app.exec(&id, &lab.prelude()).await;
    assert_eq!(run(&app, &id, "print(get('https://allowed.test/g'))").await.0, "200 hello allowed.test via https");
    let (out, report) = run(&app, &id, "print(get('https://other.test/'))").await;
    assert_eq!(out, "ERR ProxyError");
    assert_eq!(blocked(&report, "other.test"), ["not_allowed"]);
    assert_eq!(run(&app, &id, "import os; print(sorted(os.listdir('/sys/class/net')))").await.0, "['lo']");
}
