//! The compose deployment, smoke-tested: build the service image, `compose up` under its own project
//! name, wait for the health check, run one execute through the API, `compose down`, and check that no
//! container is left.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use serde_json::json;

use crate::helpers::*;

/// `docker compose` (v2) where it exists, else `docker-compose` (v1).
fn compose_command() -> Vec<String> {
    let v2 = Command::new("docker").args(["compose", "version"]).output().is_ok_and(|o| o.status.success());
    if v2 { vec!["docker".into(), "compose".into()] } else { vec!["docker-compose".into()] }
}

struct Project {
    name: String,
    env: Vec<(String, String)>,
    instance: String,
}

impl Project {
    fn run(&self, args: &[&str]) -> Output {
        let cmd = compose_command();
        let root = env!("CARGO_MANIFEST_DIR");
        Command::new(&cmd[0])
            .args(&cmd[1..])
            .args(["-p", &self.name, "-f", &format!("{root}/compose.yaml")])
            .args(args)
            .current_dir(root)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .output()
            .expect("running compose")
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        // Whatever happened, the project and its sessions go.
        let _ = self.run(&["down", "--timeout", "30"]);
        let _ = InstanceGuard(self.instance.clone());
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn image_exists(reference: &str) -> bool {
    Command::new("docker").args(["image", "inspect", reference]).output().is_ok_and(|o| o.status.success())
}

fn check(output: Output, what: &str) {
    assert!(
        output.status.success(),
        "{what} failed:\n{}\n{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn compose_up_serves_the_api_and_down_leaves_nothing() {
    ensure_images().await;
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    // The binary cargo built for these tests, packaged by the Dockerfile's `prebuilt` stage (no Rust
    // image can be pulled on a host without a registry).
    let binary = Path::new(env!("CARGO_BIN_EXE_kernelbox"));
    let binary = binary.strip_prefix(root).expect("the binary is inside the repository").display().to_string();
    let base =
        if image_exists("debian:bookworm-slim") { "debian:bookworm-slim" } else { "kernelbox/debian-rootfs:bookworm" };
    let suffix = &uuid::Uuid::new_v4().simple().to_string()[..8];
    let state = tempfile::Builder::new().prefix("kbc").tempdir_in("/tmp").unwrap();
    let port = free_port();
    let instance = format!("compose-test-{suffix}");
    let env = [
        ("KERNELBOX_BUILD_TARGET", "prebuilt".to_owned()),
        ("KERNELBOX_BINARY", binary),
        ("KERNELBOX_BASE_IMAGE", base.to_owned()),
        ("KERNELBOX_SERVICE_IMAGE", "kernelbox/service:compose-test".to_owned()),
        ("KERNELBOX_PORT", port.to_string()),
        ("KERNELBOX_STATE_DIR", state.path().display().to_string()),
        ("KERNELBOX_DATA_DIR", state.path().join("datasets").display().to_string()),
        ("KERNELBOX_NOTEBOOKS_DIR", state.path().join("notebooks").display().to_string()),
        ("KERNELBOX_INSTANCE", instance.clone()),
    ];
    let project = Project {
        name: format!("kbsmoke{suffix}"),
        env: env.iter().map(|(k, v)| (k.to_string(), v.clone())).collect(),
        instance: instance.clone(),
    };
    check(project.run(&["build"]), "compose build");
    check(project.run(&["up", "-d"]), "compose up");

    // Healthy by its own health check (which needs the API up).
    let container = String::from_utf8(project.run(&["ps", "-q"]).stdout).unwrap().trim().to_owned();
    assert!(!container.is_empty(), "the service container exists");
    let mut health = String::new();
    for _ in 0..120 {
        let out =
            Command::new("docker").args(["inspect", "-f", "{{.State.Health.Status}}", &container]).output().unwrap();
        health = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        if health == "healthy" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    if health != "healthy" {
        let logs = project.run(&["logs", "--tail", "50"]);
        panic!("the service did not become healthy ({health}):\n{}", String::from_utf8_lossy(&logs.stdout));
    }

    let http = reqwest::Client::new();
    let base_url = format!("http://127.0.0.1:{port}");
    // A new python session (with `body`'s settings) runs `code`; its execute result.
    let run_in_new_session = |body: serde_json::Value, code: &'static str| {
        let (http, base_url) = (http.clone(), base_url.clone());
        async move {
            let created = http.post(format!("{base_url}/v1/sessions")).json(&body).send().await.unwrap();
            assert_eq!(created.status(), 201);
            let id = created.json::<serde_json::Value>().await.unwrap()["id"].as_str().unwrap().to_owned();
            let execute = http.post(format!("{base_url}/v1/sessions/{id}/execute")).json(&json!({"code": code}));
            execute.send().await.unwrap().json::<serde_json::Value>().await.unwrap()
        }
    };
    let r = run_in_new_session(json!({"language": "python"}), "print(6*7)").await;
    assert_eq!(r["stdout"], "42\n", "{r}");

    // The runtime trees work the same under compose (the state directory bound at the same path): the
    // first boot started python's copy; once it is ready, a session booted cold (settings the warm pool,
    // booted before the tree, does not hold) runs over it, read-only.
    let mut ready = false;
    for _ in 0..360 {
        let text = http.get(format!("{base_url}/metrics")).send().await.unwrap().text().await.unwrap();
        if sample(&text, "kernelbox_runtime_tree_ready{image=\"kernelbox/kernel-python:latest\"}") == Some(1.0) {
            ready = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    assert!(ready, "python's runtime tree is made under compose");
    let probe = "print(any(l.split()[4] == '/usr/lib' and 'ro' in l.split()[5].split(',') \
                 for l in open('/proc/self/mountinfo')))";
    let r = run_in_new_session(json!({"language": "python", "memory_mb": 384}), probe).await;
    assert_eq!(r["stdout"], "True\n", "/usr/lib is the tree, mounted read-only: {r}");
    let text = http.get(format!("{base_url}/metrics")).send().await.unwrap().text().await.unwrap();
    let over_tree = sample(&text, "kernelbox_runtime_tree_boots_total{language=\"python\",files=\"tree\"}");
    assert!(over_tree.is_some_and(|n| n >= 1.0), "a python session booted over the tree under compose");

    check(project.run(&["down", "--timeout", "30"]), "compose down");
    let left = instance_containers(&instance).await;
    assert!(left.is_empty(), "compose down left session containers: {left:?}");
    let service_left = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label=com.docker.compose.project={}", project.name)])
        .output()
        .unwrap();
    assert!(String::from_utf8_lossy(&service_left.stdout).trim().is_empty(), "compose down left the service container");
}
