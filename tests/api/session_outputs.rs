//! The session API's environment: its sessions run `python_scientific` (the original's data-science
//! packages), read the datasets folder at `/mnt/data`, and what their code writes to `/mnt/data/output/`
//! reaches the host in `<datasets>/output/<user_id>/`, copied by the service after each execution and when
//! the session ends (DELETE, the reaper, shutdown), also after adoption; a hostile session gets nothing
//! past the folder and its caps.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};

use kernelbox::session::outputs::tree;

use crate::compat_session::{post_form, post_json_with};
use crate::helpers::*;

/// A small Titanic-shaped table: sex and survival of 12 passengers.
const TITANIC: &str = "PassengerId,Survived,Pclass,Sex,Age\n1,0,3,male,22\n2,1,1,female,38\n3,1,3,female,26\n\
4,1,1,female,35\n5,0,3,male,35\n6,0,3,male,27\n7,0,1,male,54\n8,0,3,male,2\n9,1,3,female,27\n10,1,2,female,14\n\
11,1,3,female,4\n12,1,1,male,58\n";

async fn execute(app: &TestApp, user: &str, code: &str) -> (u16, Value) {
    post_json_with(app, "/execute", json!({"user_id": user, "code": code}), None).await
}

/// `/execute` that must answer 200; returns its `output`.
async fn output_of(app: &TestApp, user: &str, code: &str) -> String {
    let (status, v) = execute(app, user, code).await;
    assert_eq!(status, 200, "{code}: {v}");
    v["output"].as_str().unwrap_or_else(|| panic!("no output: {v}")).to_owned()
}

fn datasets_of(app: &TestApp) -> PathBuf {
    app.manager.datasets_dir().expect("a datasets folder").to_path_buf()
}

/// The CRC-32 of PNG chunks (ISO 3309).
fn crc32(bytes: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in bytes {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ 0xEDB8_8320 } else { crc >> 1 };
        }
    }
    !crc
}

/// A whole, valid PNG: the signature, then chunks whose CRCs match, IHDR first with a size, IEND last.
/// Returns (width, height).
fn assert_png(bytes: &[u8]) -> (u32, u32) {
    assert!(bytes.starts_with(b"\x89PNG\r\n\x1a\n"), "not a PNG signature");
    let (mut at, mut types, mut size) = (8, Vec::new(), (0, 0));
    while at < bytes.len() {
        let len = u32::from_be_bytes(bytes[at..at + 4].try_into().unwrap()) as usize;
        let kind = &bytes[at + 4..at + 8];
        let data = &bytes[at + 8..at + 8 + len];
        let crc = u32::from_be_bytes(bytes[at + 8 + len..at + 12 + len].try_into().unwrap());
        assert_eq!(crc, crc32(&bytes[at + 4..at + 8 + len]), "chunk {} has a bad CRC", String::from_utf8_lossy(kind));
        if kind == b"IHDR" {
            size = (
                u32::from_be_bytes(data[0..4].try_into().unwrap()),
                u32::from_be_bytes(data[4..8].try_into().unwrap()),
            );
        }
        types.push(String::from_utf8_lossy(kind).into_owned());
        at += 12 + len;
    }
    assert_eq!(at, bytes.len(), "the last chunk ends the file");
    assert_eq!(types.first().map(String::as_str), Some("IHDR"));
    assert_eq!(types.last().map(String::as_str), Some("IEND"));
    assert!(types.iter().any(|t| t == "IDAT"), "{types:?}");
    assert!(size.0 > 0 && size.1 > 0, "{size:?}");
    size
}

#[tokio::test(flavor = "multi_thread")]
async fn session_outputs_the_original_test_script_flow_works_and_its_plot_reaches_the_host() {
    // A default install: the datasets folder is <state>/datasets.
    let app = spawn_app().await;
    let datasets = datasets_of(&app);
    assert_eq!(datasets, app.state_dir.join("datasets"));
    std::fs::write(datasets.join("titanic.csv"), TITANIC).unwrap();

    let python =
        tokio::task::spawn_blocking(|| tool_python("session-api-client", &["requests==2.34.2"])).await.unwrap();
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/api/session_api_client.py");
    let run = tokio::process::Command::new(&python)
        .args([script, app.base.as_str(), "user_test"])
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(600), run).await.expect("the client finishes").unwrap();
    assert!(out.status.success(), "the client failed:\n{}", String::from_utf8_lossy(&out.stderr));
    let r: Value =
        serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&out.stdout)));

    assert_eq!(
        r["start"],
        json!([200, {"message": "Session started successfully",
            "notebook_path": "/mnt/jupyter_sessions/user_test/notebook_user_test.ipynb"}])
    );
    assert_eq!(r["simple"], json!([200, {"output": "Simple test\n"}]));
    assert_eq!(r["function"], json!([200, {"output": "Hello, World!\n"}]));
    assert_eq!(r["set"], json!([200, {"output": ""}]));
    assert_eq!(r["get"], json!([200, {"output": "The value of x is 42\n"}]));
    assert_eq!(r["titanic"][0], 200, "{}", r["titanic"]);
    let titanic = r["titanic"][1]["output"].as_str().unwrap();
    assert!(titanic.starts_with("Data loaded successfully.\n"), "{titanic}");
    assert!(titanic.contains("female") && titanic.contains("Plot saved at: /mnt/data/output/output.png"), "{titanic}");
    assert!(!titanic.contains("kernelbox:"), "nothing was left uncopied: {titanic}");
    assert_eq!(r["formats"][0], 200, "{}", r["formats"]);
    let formats = r["formats"][1]["output"].as_str().unwrap();
    assert!(formats.starts_with("12 12 26.0.1 2.0.2\n"), "{formats}");
    assert!(formats.contains("| female"), "a Markdown table through tabulate: {formats}");

    // The plot is on the host, in the user's output folder, whole; so are the other files, folders kept.
    let user = datasets.join("output/user_test");
    let (width, height) = assert_png(&std::fs::read(user.join("output.png")).unwrap());
    eprintln!("FIGURE output.png on the host: {width}x{height}");
    assert_eq!(tree(&user), ["output.png", "tables/", "tables/titanic.xlsx", "titanic.parquet"]);
    let parquet = std::fs::read(user.join("titanic.parquet")).unwrap();
    assert!(parquet.starts_with(b"PAR1") && parquet.ends_with(b"PAR1"));
    assert!(std::fs::read(user.join("tables/titanic.xlsx")).unwrap().starts_with(b"PK\x03\x04"));
    // The datasets stay read-only in the session; the host folder has nothing else new.
    let refused = output_of(
        &app,
        "user_test",
        "try:\n    open('/mnt/data/new.csv', 'w')\nexcept OSError as e:\n    print(e.errno)",
    )
    .await;
    assert_eq!(refused, "30\n", "EROFS");
    assert_eq!(
        tree(&datasets),
        [
            "output/",
            "output/user_test/",
            "output/user_test/output.png",
            "output/user_test/tables/",
            "output/user_test/tables/titanic.xlsx",
            "output/user_test/titanic.parquet",
            "titanic.csv"
        ]
    );

    // What a user's session writes stays theirs: another user's session (and a /v1 one) sees its own
    // /mnt/data/output, empty.
    assert_eq!(post_form(&app, "/start_session", &[("user_id", "another")]).await.0, 200);
    assert_eq!(output_of(&app, "another", "import os\nprint(os.listdir('/mnt/data/output'))").await, "[]\n");
    let id = app.start("python").await;
    let v = app.exec(&id, "import os\nprint(sorted(os.listdir('/mnt/data')), os.listdir('/mnt/data/output'))\ntry:\n    open('/mnt/data/output/x', 'w')\nexcept OSError as e:\n    print(e.errno)").await;
    assert_eq!(v["stdout"], "['output', 'titanic.csv'] []\n30\n", "{v}");
}

/// Code that writes `name` into /mnt/data/output from a thread, `after` seconds after the execution ends:
/// only a copy made later (at the session's end) can take it.
fn late_write(name: &str, after: f64) -> String {
    format!(
        "import threading, time\ndef _late():\n    time.sleep({after})\n    open('/mnt/data/output/{name}', 'w').write('late {name}')\nthreading.Thread(target=_late, daemon=True).start()"
    )
}

#[tokio::test(flavor = "multi_thread")]
async fn session_outputs_are_copied_when_the_session_ends_however_it_ends() {
    // The state folder is the test's: it outlives the service's stop.
    let shared = SharedInstance::new("ends");
    let app = spawn_app_with(AppOptions { instance: shared.options(), ..Default::default() }).await;
    let out = datasets_of(&app).join("output");
    // Each user's code writes a file now (copied after the execution) and one from a thread once the
    // execution is over (only the copy at the session's end can take it).
    let write_both = |user: &'static str| {
        let app = &app;
        let out = out.clone();
        async move {
            assert_eq!(post_form(app, "/start_session", &[("user_id", user)]).await.0, 200);
            assert_eq!(output_of(app, user, "open('/mnt/data/output/early.txt', 'w').write('early')").await, "5\n");
            assert_eq!(std::fs::read_to_string(out.join(user).join("early.txt")).unwrap(), "early");
            assert_eq!(output_of(app, user, &late_write("late.txt", 1.0)).await, "");
            tokio::time::sleep(Duration::from_secs(2)).await;
            assert!(!out.join(user).join("late.txt").exists(), "{user}: nothing copied it yet");
        }
    };

    // /end_session.
    write_both("ended").await;
    let (status, v) = post_form(&app, "/end_session", &[("user_id", "ended")]).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(std::fs::read_to_string(out.join("ended/late.txt")).unwrap(), "late late.txt");

    // The idle reaper (a pass as if the idle timeout had passed).
    write_both("reaped").await;
    let report = app.manager.reap_once(chrono::Utc::now() + chrono::Duration::hours(2)).await;
    assert_eq!(report.removed.iter().map(|r| r.1).collect::<Vec<_>>(), ["idle"], "{report:?}");
    assert_eq!(std::fs::read_to_string(out.join("reaped/late.txt")).unwrap(), "late late.txt");

    // The service's shutdown.
    write_both("stopped").await;
    app.stop().await;
    assert_eq!(std::fs::read_to_string(out.join("stopped/late.txt")).unwrap(), "late late.txt");
    for user in ["ended", "reaped", "stopped"] {
        assert_eq!(tree(&out.join(user)), ["early.txt", "late.txt"]);
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn session_outputs_an_adopted_session_keeps_copying() {
    let shared = SharedInstance::new("outputs");
    let mut first =
        spawn_app_with(AppOptions { keep_sessions: true, instance: shared.options(), ..Default::default() }).await;
    let out = datasets_of(&first).join("output/adopted");
    assert_eq!(post_form(&first, "/start_session", &[("user_id", "adopted")]).await.0, 200);
    assert_eq!(output_of(&first, "adopted", "open('/mnt/data/output/before.txt', 'w').write('1')").await, "1\n");
    assert!(out.join("before.txt").is_file());
    first.cleanup = false;
    first.stop().await;

    let second = spawn_app_with(AppOptions { instance: shared.options(), ..Default::default() }).await;
    assert_eq!(instance_containers(&shared.name).await.len(), 1, "adopted, not replaced");
    assert_eq!(output_of(&second, "adopted", "open('/mnt/data/output/after.txt', 'w').write('2')").await, "1\n");
    assert_eq!(std::fs::read_to_string(out.join("after.txt")).unwrap(), "2");
    assert_eq!(tree(&out), ["after.txt", "before.txt"]);
}

/// A thread in the session's kernel that writes forged `collect` entries into the stdout of every file
/// tool process it finds (a process of the same uid can open `/proc/<pid>/fd/1`): names that climb out
/// of the folder, absolute ones, another user's file, a hidden one, a control character, and one that
/// announces more bytes than the caps. `_hits[0]` counts the writes that landed.
const INJECTOR: &str = r#"
import os, threading, time, json
_hits = [0]
def _forged(sentinel):
    entries = [("../escape.txt", b"PWND"), ("../../escape.txt", b"PWND"), ("../other_user/keep.txt", b"PWND"),
               (sentinel, b"PWND"), (".hidden", b"PWND"), ("a\nb.txt", b"PWND"), ("ok/../../escape.txt", b"PWND")]
    out = b""
    for name, body in entries:
        out += json.dumps({"path": name, "size": len(body)}).encode() + b"\n" + body
    return out + json.dumps({"path": "huge.bin", "size": 1 << 30}).encode() + b"\n" + b"x" * 65536
def _inject(sentinel, seconds):
    forged, end, me = _forged(sentinel), time.time() + seconds, str(os.getpid())
    while time.time() < end:
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or pid == me:
                continue
            try:
                if b"collect" not in open(f"/proc/{pid}/cmdline", "rb").read():
                    continue
                fd = os.open(f"/proc/{pid}/fd/1", os.O_WRONLY | os.O_NONBLOCK)
                try:
                    os.write(fd, forged)
                    _hits[0] += 1
                finally:
                    os.close(fd)
            except OSError:
                pass
        time.sleep(0.001)
"#;

#[tokio::test(flavor = "multi_thread")]
async fn session_outputs_a_hostile_session_leaves_the_host_untouched_but_within_the_caps() {
    let mut options = AppOptions::default();
    options.storage.user_output = kernelbox::session::OutputCaps { max_bytes: 1 << 20, max_files: 5 };
    let app = spawn_app_with(options).await;
    let datasets = datasets_of(&app);
    let out = datasets.join("output");
    // Host files a copy must never touch: one outside everything, a dataset, another user's result.
    let outside = tempfile::Builder::new().prefix("kboutside").tempdir_in("/tmp").unwrap();
    let sentinel = outside.path().join("sentinel.txt");
    std::fs::write(&sentinel, "keep").unwrap();
    std::fs::write(datasets.join("data.csv"), "a,b\n1,2\n").unwrap();
    std::fs::create_dir_all(out.join("other_user")).unwrap();
    std::fs::write(out.join("other_user/keep.txt"), "theirs").unwrap();
    let names = |dir: &Path| {
        let mut names: Vec<String> =
            std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
        names.sort();
        names
    };
    let untouched = || {
        assert_eq!(std::fs::read_to_string(&sentinel).unwrap(), "keep");
        assert_eq!(tree(outside.path()), ["sentinel.txt"]);
        assert_eq!(names(&datasets), ["data.csv", "output"], "nothing new beside the datasets");
        assert_eq!(std::fs::read_to_string(datasets.join("data.csv")).unwrap(), "a,b\n1,2\n");
        assert_eq!(names(&out), ["mallory", "other_user"], "nothing new beside the users' folders");
        assert_eq!(tree(&out.join("other_user")), ["keep.txt"]);
        assert_eq!(std::fs::read_to_string(out.join("other_user/keep.txt")).unwrap(), "theirs");
    };
    assert_eq!(post_form(&app, "/start_session", &[("user_id", "mallory")]).await.0, 200);
    let user = out.join("mallory");

    // Links to host paths and out of the folder: there in the session, never followed nor copied.
    let sentinel_path = sentinel.display().to_string();
    let links = format!(
        "import os\no = '/mnt/data/output/'\nos.symlink({sentinel_path:?}, o + 'evil.txt')\nos.symlink('/', o + 'root')\n\
         os.symlink('../other_user', o + 'other')\nos.symlink('/mnt/data', o + 'data')\nos.mkdir(o + 'd')\n\
         os.symlink('/etc/passwd', o + 'd/passwd')\nopen(o + 'plain.txt', 'w').write('mine')\nprint(sorted(os.listdir(o)))"
    );
    assert_eq!(output_of(&app, "mallory", &links).await, "['d', 'data', 'evil.txt', 'other', 'plain.txt', 'root']\n");
    assert_eq!(tree(&user), ["plain.txt"], "only the regular file");
    untouched();

    // Names the host does not take: a control character; hidden files the tool leaves out itself.
    let code = "o = '/mnt/data/output/'\nopen(o + 'bad\\nname.txt', 'w').write('x')\nopen(o + '.hidden', 'w').write('x')\n\
                import os\nos.mkdir(o + '.git')\nopen(o + '.git/config', 'w').write('x')";
    let said = output_of(&app, "mallory", code).await;
    assert!(said.ends_with("[kernelbox: /mnt/data/output: 1 file(s) not copied: \"bad\\nname.txt\" (not a relative path the folder takes)]\n"), "{said}");
    assert_eq!(tree(&user), ["plain.txt"]);

    // A file bigger than the cap (1 MiB): not copied, and said; the execution is fine.
    let said = output_of(&app, "mallory", "open('/mnt/data/output/big.bin', 'wb').write(b'x' * (2 << 20))").await;
    assert_eq!(
        said,
        "2097152\n[kernelbox: /mnt/data/output: 1 file(s) not copied: the output folder keeps at most 5 files and 1 MiB per user]\n"
    );
    assert_eq!(tree(&user), ["plain.txt"]);

    // Too many files: the folder keeps 5 (plain.txt is one of them), the rest are said to be left out.
    let many = "import os\nos.remove('/mnt/data/output/big.bin')\nfor i in range(12):\n    open(f'/mnt/data/output/many{i:02}.txt', 'w').write('x' * 100)";
    let said = output_of(&app, "mallory", many).await;
    assert_eq!(
        said,
        "[kernelbox: /mnt/data/output: 8 file(s) not copied: the output folder keeps at most 5 files and 1 MiB per user]\n"
    );
    assert_eq!(tree(&user), ["many00.txt", "many01.txt", "many02.txt", "many03.txt", "plain.txt"]);
    untouched();

    // Forged entries written into the tool's own stdout while it copies: `..`, absolute names, another
    // user's file, more bytes than the caps. The host takes none of them; executions answer as ever.
    let setup =
        format!("{INJECTOR}\nthreading.Thread(target=_inject, args=({sentinel_path:?}, 15), daemon=True).start()");
    // (Its own copy may already be disturbed.)
    output_of(&app, "mallory", &setup).await;
    let mut notes = 0;
    for i in 0..8 {
        let said = output_of(&app, "mallory", &format!("open('/mnt/data/output/many00.txt', 'w').write('{i}')")).await;
        assert!(said.starts_with("1\n"), "{said}");
        notes += usize::from(said.contains("[kernelbox:"));
        untouched();
    }
    let said = output_of(&app, "mallory", "print(_hits[0])").await;
    let hits: u64 = said.lines().next().and_then(|l| l.parse().ok()).unwrap_or_else(|| panic!("{said}"));
    eprintln!("FIGURE forged collect writes that landed: {hits}; executions whose copy was disturbed: {notes} of 8");
    assert!(hits > 0, "the forged entries reached the tool's stdout (else this test proves nothing)");
    for entry in tree(&user) {
        let meta = std::fs::symlink_metadata(user.join(&entry)).unwrap();
        assert!(meta.is_file() && meta.len() <= 100, "{entry}: only files of the session's, within the caps");
    }
    assert_eq!(tree(&user), ["many00.txt", "many01.txt", "many02.txt", "many03.txt", "plain.txt"]);
    untouched();

    // Once the injector is done, copies go on as before.
    tokio::time::sleep(Duration::from_secs(15)).await;
    assert_eq!(output_of(&app, "mallory", "open('/mnt/data/output/many01.txt', 'w').write('after')").await, "5\n");
    assert_eq!(std::fs::read_to_string(user.join("many01.txt")).unwrap(), "after");
    assert_eq!(std::fs::read_to_string(user.join("many00.txt")).unwrap(), "7", "the last write of the injector's time");
    untouched();
}

#[tokio::test(flavor = "multi_thread")]
async fn session_outputs_without_a_datasets_folder_there_is_no_mnt_data() {
    let mut options = AppOptions::default();
    options.storage.datasets = kernelbox::config::StateFolder::Off;
    let app = spawn_app_with(options).await;
    assert!(app.manager.datasets_dir().is_none());
    assert_eq!(post_form(&app, "/start_session", &[("user_id", "u")]).await.0, 200);
    let said = output_of(&app, "u", "import os\nprint(os.path.exists('/mnt/data'))").await;
    assert_eq!(said, "False\n", "no datasets folder: no /mnt/data, nothing to copy");
    assert!(!app.state_dir.join("datasets").exists());
}
