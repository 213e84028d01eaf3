//! Installing into a python session, inside its container (Docker's exec API, uid 1000), from the wheel
//! cache mounted read-only at [`WHEELS_MOUNT`], with no index: the sandbox keeps no network.
//!
//! Two steps. **Plan**: `pip install --dry-run --report - --no-index --find-links /mnt/wheels <specs>`
//! resolves against the cache and against what the session already has (the image's venv and earlier
//! installs), so a dependency the image carries is not installed again. It fails with "no matching
//! distribution" when the cache lacks something: that is how the service knows it must fetch.
//! **Install**: `pip install --no-deps --target /opt/kernelbox/packages --upgrade <the planned wheels>`.
//! That directory is a tmpfs of the session on the kernel's `PYTHONPATH` from its start (so importlib
//! caches a finder for it, and new packages import without a restart); pip installs into a temporary
//! directory first and moves the result in only when it succeeded, so a failed install leaves the
//! session as it was.
//!
//! What pip prints here is attacker input (the session's code can shadow pip on its own `PYTHONPATH`):
//! it is bounded, parsed, and every wheel path must name a wheel in the mount; at worst a session
//! misleads its own install.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Deserialize;

use crate::runtime::{ContainerRuntime, RuntimeError};

use super::exec::{self, Finished};
use super::settings::{PACKAGES_DIR, PYTHON, WHEELS_MOUNT};
use super::spec::{Spec, is_wheel_filename, normalize_python_name};

/// The largest plan (pip's JSON report) read back.
const MAX_REPORT: usize = 4 << 20;

fn pip_env() -> Vec<String> {
    vec!["PIP_NO_CACHE_DIR=1".into(), "PIP_DISABLE_PIP_VERSION_CHECK=1".into(), "PIP_NO_INPUT=1".into()]
}

/// A wheel the plan installs.
#[derive(Debug, Clone, PartialEq)]
pub struct Planned {
    /// The file name in the cache.
    pub wheel: String,
    /// The normalised project name and its version.
    pub name: String,
    pub version: String,
}

/// What the plan step found.
#[derive(Debug)]
pub enum Plan {
    /// The cache can satisfy every spec: these wheels are to be installed (none: all there already).
    Ready(Vec<Planned>),
    /// Something is not in the cache (pip's output says what).
    Missing(String),
    /// Another failure (a conflict, the session's disk, ...).
    Failed(String),
    /// pip was killed at the install's time limit.
    TimedOut,
}

/// What the install step came to.
pub enum Installed {
    /// pip's output.
    Done(String),
    /// pip's output and why it failed.
    Failed(String),
    /// pip was killed at the install's time limit.
    TimedOut,
}

#[derive(Deserialize)]
struct Report {
    #[serde(default)]
    install: Vec<ReportItem>,
}

#[derive(Deserialize)]
struct ReportItem {
    download_info: DownloadInfo,
    metadata: Metadata,
}

#[derive(Deserialize)]
struct DownloadInfo {
    url: String,
}

#[derive(Deserialize)]
struct Metadata {
    name: String,
    version: String,
}

/// The wheel's file name when `url` is a wheel in the mount, else `None`.
fn wheel_in_mount(url: &str) -> Option<String> {
    let name = url.strip_prefix("file://")?.strip_prefix(WHEELS_MOUNT)?.strip_prefix('/')?;
    is_wheel_filename(name).then(|| name.to_owned())
}

/// Reads pip's `--report` JSON into the plan.
pub fn parse_report(json: &[u8]) -> Result<Vec<Planned>, String> {
    let report: Report = serde_json::from_slice(json).map_err(|e| format!("pip's install report: {e}"))?;
    report
        .install
        .into_iter()
        .map(|item| {
            let wheel = wheel_in_mount(&item.download_info.url).ok_or_else(|| {
                format!("pip planned {:?}, which is not a wheel of the cache", item.download_info.url)
            })?;
            Ok(Planned { wheel, name: normalize_python_name(&item.metadata.name), version: item.metadata.version })
        })
        .collect()
}

/// Whether pip's output says a requirement is not available (here: not in the cache).
pub fn says_missing(log: &str) -> bool {
    log.contains("No matching distribution found for") || log.contains("Could not find a version that satisfies")
}

/// The requirements pip could not find, from its "No matching distribution found for X" lines.
pub fn missing_requirements(log: &str) -> Vec<String> {
    log.lines()
        .filter_map(|l| l.split("No matching distribution found for ").nth(1))
        .map(|r| r.trim().to_owned())
        .collect()
}

/// The plan step.
pub async fn plan(
    runtime: &dyn ContainerRuntime,
    container: &str,
    specs: &[Spec],
    limit: Duration,
) -> Result<Plan, RuntimeError> {
    let mut cmd = vec![
        PYTHON,
        "-m",
        "pip",
        "install",
        "--dry-run",
        "--quiet",
        "--report",
        "-",
        "--no-index",
        "--find-links",
        WHEELS_MOUNT,
        "--",
    ];
    cmd.extend(specs.iter().map(|s| s.text.as_str()));
    let done = exec::run(runtime, container, exec::time_limited(limit, &cmd), pip_env(), MAX_REPORT).await?;
    let log = done.stderr_text();
    if done.killed_at_limit() {
        return Ok(Plan::TimedOut);
    }
    if !done.ok() {
        return Ok(if says_missing(&log) { Plan::Missing(log) } else { Plan::Failed(failure(&done, limit)) });
    }
    if done.stdout_truncated {
        return Ok(Plan::Failed("pip's install plan is larger than 4 MiB".into()));
    }
    Ok(match parse_report(&done.stdout) {
        Ok(planned) => Plan::Ready(planned),
        Err(e) => Plan::Failed(e),
    })
}

fn failure(done: &Finished, limit: Duration) -> String {
    let mut log = format!("{}{}", done.stdout_text(), done.stderr_text());
    match done.exit {
        Some(exec::KILLED_AT_LIMIT) => log.push_str(&format!("(killed at the time limit of {} s)\n", limit.as_secs())),
        Some(code) => log.push_str(&format!("(pip exited with status {code})\n")),
        None => log.push_str("(pip did not finish)\n"),
    }
    log
}

/// The install step. Returns pip's output and whether it succeeded.
pub async fn install(
    runtime: &dyn ContainerRuntime,
    container: &str,
    planned: &[Planned],
    limit: Duration,
) -> Result<Installed, RuntimeError> {
    if planned.is_empty() {
        return Ok(Installed::Done(String::new()));
    }
    let paths: Vec<String> = planned.iter().map(|p| format!("{WHEELS_MOUNT}/{}", p.wheel)).collect();
    let mut cmd = vec![
        PYTHON,
        "-m",
        "pip",
        "install",
        "--no-index",
        "--no-deps",
        "--upgrade",
        // No .pyc at install time: the install answers sooner, and Python writes the caches of the
        // modules actually imported, at their first import (the directory is the session's).
        "--no-compile",
        "--progress-bar",
        "off",
        "--target",
        PACKAGES_DIR,
        "--",
    ];
    cmd.extend(paths.iter().map(String::as_str));
    let done = exec::run(runtime, container, exec::time_limited(limit, &cmd), pip_env(), 256 << 10).await?;
    Ok(if done.ok() {
        Installed::Done(format!("{}{}", done.stdout_text(), done.stderr_text()))
    } else if done.killed_at_limit() {
        Installed::TimedOut
    } else {
        Installed::Failed(failure(&done, limit))
    })
}

const VERSIONS: &str = "import json, sys\nfrom importlib import metadata\nr = {}\nfor n in sys.argv[1:]:\n    try:\n        r[n] = metadata.version(n)\n    except Exception:\n        r[n] = None\nprint(json.dumps(r))\n";

/// The versions the session now sees for `names` (`None`: not installed).
pub async fn versions(
    runtime: &dyn ContainerRuntime,
    container: &str,
    names: &[String],
) -> Result<BTreeMap<String, Option<String>>, RuntimeError> {
    let mut cmd = vec![PYTHON, "-c", VERSIONS];
    cmd.extend(names.iter().map(String::as_str));
    let done =
        exec::run(runtime, container, exec::time_limited(Duration::from_secs(30), &cmd), Vec::new(), 64 << 10).await?;
    let found: BTreeMap<String, Option<String>> = serde_json::from_slice(&done.stdout).unwrap_or_default();
    Ok(found.into_iter().filter(|(name, v)| names.contains(name) && v.as_ref().is_none_or(|v| v.len() < 100)).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_names_only_wheels_of_the_mount() {
        let report = br#"{"version": "1", "install": [
            {"download_info": {"url": "file:///mnt/wheels/six-1.17.0-py2.py3-none-any.whl"},
             "metadata": {"name": "six", "version": "1.17.0"}, "requested": true},
            {"download_info": {"url": "file:///mnt/wheels/Typing_Extensions-4.0-py3-none-any.whl"},
             "metadata": {"name": "Typing_Extensions", "version": "4.0"}}]}"#;
        let planned = parse_report(report).unwrap();
        assert_eq!(planned[0].wheel, "six-1.17.0-py2.py3-none-any.whl");
        assert_eq!((planned[1].name.as_str(), planned[1].version.as_str()), ("typing-extensions", "4.0"));
        for url in [
            "file:///etc/passwd",
            "file:///mnt/wheels/../etc/x-1.0-py3-none-any.whl",
            "https://evil.example/x-1.0-py3-none-any.whl",
            "file:///mnt/wheelsx/x-1.0-py3-none-any.whl",
        ] {
            let report = format!(
                r#"{{"install": [{{"download_info": {{"url": "{url}"}}, "metadata": {{"name": "x", "version": "1"}}}}]}}"#
            );
            assert!(parse_report(report.as_bytes()).is_err(), "{url}");
        }
        assert_eq!(parse_report(br#"{"install": []}"#).unwrap(), vec![]);
    }

    #[test]
    fn missing_requirements_are_read_from_pips_output() {
        let log = "Looking in links: /mnt/wheels\nERROR: Could not find a version that satisfies the requirement \
                   nosuchpkg==1.0 (from versions: none)\nERROR: No matching distribution found for nosuchpkg==1.0\n";
        assert!(says_missing(log));
        assert_eq!(missing_requirements(log), vec!["nosuchpkg==1.0"]);
        assert!(!says_missing("ERROR: ResolutionImpossible"));
    }
}
