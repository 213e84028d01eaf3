//! The operator's OCI runtimes (`config/oci_runtimes.rs`) against the engine's: every runtime a session
//! may run under must be registered with the Docker engine, and gVisor's the way a session needs it: no
//! network of its own (`--network=none`: a session has none, and runsc refuses to start a container
//! without a network namespace otherwise) and the kernel's connects to the service's unix sockets in the
//! read-only run directory allowed through its gofer (`--fsgofer-host-uds`, `--host-uds=open` in newer
//! releases). Checked when the service starts (a problem stops the start) and on every `/readyz`.

use crate::config::OciRuntimes;
use crate::runtime::OciRuntimeInfo;

/// What is wrong with the engine's runtimes for `choice`, one sentence each; empty when all is well.
pub fn problems(choice: &OciRuntimes, engine: &[OciRuntimeInfo]) -> Vec<String> {
    let registered: Vec<&str> = engine.iter().map(|r| r.name.as_str()).collect();
    let mut problems = Vec::new();
    for name in choice.named() {
        let Some(runtime) = engine.iter().find(|r| r.name == name) else {
            problems.push(format!(
                "the Docker engine has no runtime `{name}` (it has {}): register it in the engine's daemon.json \
                 under \"runtimes\" and reload the engine (README, \"Sessions under gVisor\")",
                registered.join(", ")
            ));
            continue;
        };
        if is_gvisor(runtime) {
            if !has_no_network(&runtime.args) {
                problems.push(format!(
                    "runtime `{name}` (gVisor) must be registered with \"--network=none\" in its runtimeArgs: a session \
                     has no network, and without it runsc refuses to start such a container"
                ));
            }
            if !allows_host_sockets(&runtime.args) {
                problems.push(format!(
                    "runtime `{name}` (gVisor) must be registered with \"--fsgofer-host-uds\" (\"--host-uds=open\" in \
                     newer releases) in its runtimeArgs: a session's kernel connects to the service's unix sockets"
                ));
            }
        }
    }
    problems
}

/// gVisor's runtime, whatever the operator named it.
fn is_gvisor(runtime: &OciRuntimeInfo) -> bool {
    runtime.name == "runsc" || std::path::Path::new(&runtime.path).file_name().is_some_and(|f| f == "runsc")
}

fn has_no_network(args: &[String]) -> bool {
    args.iter().any(|a| a == "--network=none") || args.windows(2).any(|w| w[0] == "--network" && w[1] == "none")
}

fn allows_host_sockets(args: &[String]) -> bool {
    args.iter().any(|a| {
        a == "--fsgofer-host-uds"
            || a == "--fsgofer-host-uds=true"
            || a.strip_prefix("--host-uds=").is_some_and(|v| matches!(v, "open" | "all"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runtime(name: &str, path: &str, args: &[&str]) -> OciRuntimeInfo {
        OciRuntimeInfo { name: name.into(), path: path.into(), args: args.iter().map(|a| a.to_string()).collect() }
    }

    fn choice(mapping: &str, selectable: &str) -> OciRuntimes {
        OciRuntimes::parse(mapping, selectable, &["python", "bash"]).unwrap()
    }

    #[test]
    fn runc_alone_needs_nothing_registered_beyond_docker_s_own() {
        assert!(problems(&choice("", ""), &[runtime("runc", "runc", &[])]).is_empty());
    }

    #[test]
    fn a_runtime_the_engine_lacks_is_named_with_what_it_has() {
        let p = problems(&choice("python=runsc", ""), &[runtime("runc", "runc", &[])]);
        assert_eq!(p.len(), 1);
        assert!(p[0].contains("no runtime `runsc` (it has runc)"), "{p:?}");
    }

    #[test]
    fn gvisor_must_have_no_network_and_allow_host_sockets_under_any_name() {
        let good = runtime("runsc", "/usr/bin/runsc", &["--platform=ptrace", "--network=none", "--fsgofer-host-uds"]);
        assert!(problems(&choice("", "runsc"), &[runtime("runc", "runc", &[]), good]).is_empty());
        let newer = runtime("gvisor", "/usr/local/bin/runsc", &["--network", "none", "--host-uds=open"]);
        assert!(problems(&choice("", "gvisor"), &[runtime("runc", "runc", &[]), newer]).is_empty());
        let bare = runtime("gvisor", "/usr/local/bin/runsc", &[]);
        let p = problems(&choice("bash=gvisor", ""), &[runtime("runc", "runc", &[]), bare]);
        assert_eq!(p.len(), 2, "{p:?}");
        assert!(p[0].contains("--network=none") && p[1].contains("--fsgofer-host-uds"), "{p:?}");
    }
}
