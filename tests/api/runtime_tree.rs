//! The runtime tree against the real engine: a session reads its image's `/usr` and `/opt` from the tree
//! the service copied out once, read-only, byte for byte the image's; a planted link in the runtimes
//! folder is neither followed nor replaced; a tree that cannot be made leaves sessions on the image's own
//! files; the upkeep removes a tree nobody names.

use std::path::Path;

use kernelbox::config::StateFolder;
use kernelbox::runtime::ContainerRuntime;
use serde_json::Value;

use crate::helpers::*;

/// What a session sees of its `/usr` and `/opt` (the tree holds `/usr/bin`, `/usr/lib` and `/opt`): a
/// digest of every file's bytes, mode (less set-id bits and group or other write, which a tree drops) and
/// link target, the mounts there, and what a write gets.
const PROBE: &str = r#"
import errno, hashlib, json, os, stat
digest, files = hashlib.sha256(), 0
for top in ("/usr", "/opt"):
    for root, dirs, names in os.walk(top):
        dirs.sort()
        for name in sorted(names) + dirs:
            p = os.path.join(root, name)
            st = os.lstat(p)
            digest.update(p.encode() + b"\0" + oct(stat.S_IMODE(st.st_mode) & 0o755).encode())
            if stat.S_ISLNK(st.st_mode):
                digest.update(os.readlink(p).encode())
            elif stat.S_ISREG(st.st_mode):
                files += 1
                with open(p, "rb") as f:
                    for block in iter(lambda: f.read(1 << 20), b""):
                        digest.update(block)
mounts = {}
for line in open("/proc/self/mountinfo"):
    fields = line.split()
    mounts[fields[4]] = fields[5].split(",")
def write(path):
    try:
        open(path, "w").close()
        return "written"
    except OSError as e:
        return errno.errorcode[e.errno]
print(json.dumps({"digest": digest.hexdigest(), "files": files, "mounts": {p: mounts.get(p) for p in ("/usr/bin", "/usr/lib", "/opt")},
                  "write_usr": write("/usr/lib/kb-probe"), "write_opt": write("/opt/kernelbox/kb-probe")}))
"#;

async fn probe(app: &TestApp, id: &str) -> Value {
    let v = app.exec(id, PROBE).await;
    assert_eq!(v["status"], "ok", "{v}");
    serde_json::from_str(v["stdout"].as_str().unwrap()).unwrap_or_else(|e| panic!("{e}: {v}"))
}

async fn python_image_hex() -> String {
    let image = docker().await.image(&format!("{}python:latest", image_prefix())).await.unwrap().expect("built");
    image.id.strip_prefix("sha256:").expect("a sha256 id").to_owned()
}

fn app_options(runtimes: StateFolder) -> AppOptions {
    let mut options = AppOptions::default();
    options.storage.runtimes = runtimes;
    options
}

#[tokio::test(flavor = "multi_thread")]
async fn a_session_reads_its_images_files_from_the_shared_tree_read_only_byte_for_byte() {
    let app = spawn_app().await;
    let tree = app.manager.runtime_tree("python").await.expect("the python image's tree is made");
    assert_eq!(tree.hash, python_image_hex().await);
    let id = app.start("python").await;
    let shared = probe(&app, &id).await;
    for path in ["/usr/bin", "/usr/lib", "/opt"] {
        let options = shared["mounts"][path].as_array().unwrap_or_else(|| panic!("{path} is a mount: {shared}"));
        assert!(options.contains(&"ro".into()), "{path} is mounted read-only: {shared}");
    }
    assert_eq!((shared["write_usr"].as_str(), shared["write_opt"].as_str()), (Some("EROFS"), Some("EROFS")));
    let container = app.containers().await.into_iter().find(|c| c.labels["kernelbox.session"] == id).unwrap();
    assert_eq!(container.labels.get("kernelbox.runtime_tree"), Some(&tree.hash), "the container names its tree");

    // The same probe in a session that reads the image's own files.
    let plain = spawn_app_with(app_options(StateFolder::Off)).await;
    let plain_id = plain.start("python").await;
    let image = probe(&plain, &plain_id).await;
    assert_eq!(image["mounts"]["/usr/lib"], Value::Null, "no tree: /usr/lib is the image's");
    assert!(shared["files"].as_u64().unwrap() > 1000, "{shared}");
    assert_eq!((&shared["digest"], &shared["files"]), (&image["digest"], &image["files"]), "the image's files");
    plain.stop().await;
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_planted_link_in_the_runtimes_folder_is_neither_followed_nor_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let runtimes = tmp.path().join("runtimes");
    std::fs::create_dir(&runtimes).unwrap();
    let decoy = tmp.path().join("decoy");
    for dir in ["usr/bin", "opt"] {
        std::fs::create_dir_all(decoy.join(dir)).unwrap();
    }
    std::fs::write(decoy.join("usr/bin/python3"), "#!/bin/sh\necho decoy\n").unwrap();
    let hex = python_image_hex().await;
    let link = runtimes.join(&hex);
    std::os::unix::fs::symlink(&decoy, &link).unwrap();

    let app = spawn_app_with(app_options(StateFolder::At(runtimes.clone()))).await;
    let made = app.manager.runtime_tree("python").await;
    assert!(made.is_err(), "a link where the tree goes is not a tree: {made:?}");
    let id = app.start("python").await;
    let seen = probe(&app, &id).await;
    assert_eq!(seen["mounts"]["/usr/lib"], Value::Null, "the session reads the image's files: {seen}");
    assert_eq!(app.exec(&id, "print(6 * 7)").await["stdout"], "42\n");
    assert!(std::fs::symlink_metadata(&link).unwrap().file_type().is_symlink(), "the link is left as it was");
    assert_eq!(std::fs::read_link(&link).unwrap(), decoy);
    assert_eq!(entries(&decoy.join("usr")), ["bin"], "nothing written through the link");
    assert_eq!(entries(&runtimes).iter().filter(|e| !e.starts_with(".lock")).count(), 1, "{:?}", entries(&runtimes));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_tree_that_cannot_be_made_leaves_sessions_on_the_images_files() {
    let tmp = tempfile::tempdir().unwrap();
    let in_the_way = tmp.path().join("runtimes");
    std::fs::write(&in_the_way, "not a folder").unwrap();
    let app = spawn_app_with(app_options(StateFolder::At(in_the_way.clone()))).await;
    assert!(app.manager.runtime_tree("python").await.is_err());
    let id = app.start("python").await;
    let seen = probe(&app, &id).await;
    assert_eq!(seen["mounts"]["/usr/lib"], Value::Null, "{seen}");
    assert_eq!(app.exec(&id, "print(6 * 7)").await["stdout"], "42\n");
    assert_eq!(std::fs::read_to_string(&in_the_way).unwrap(), "not a folder", "left as it was");
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains("kernelbox_runtime_tree_failures_total{reason=\"in_the_way\"}"), "counted");
    assert!(metrics.contains("kernelbox_runtime_tree_boots_total{language=\"python\",files=\"image\"}"));
    app.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_upkeep_removes_a_tree_that_no_image_and_no_container_names() {
    let app = spawn_app().await;
    let current = app.manager.runtime_tree("python").await.expect("the python image's tree");
    let old = shared_runtimes_dir().join(format!("{}{}", uuid_like(), uuid_like()));
    for dir in ["usr/bin", "usr/lib", "opt"] {
        std::fs::create_dir_all(old.join(dir)).unwrap();
    }
    app.manager.tend_runtime_trees().await;
    assert!(!old.exists(), "an unused tree is removed");
    assert!(shared_runtimes_dir().join(&current.hash).join("usr/lib").is_dir(), "the current image's tree is kept");
    app.stop().await;
}

fn entries(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    names.sort();
    names
}
