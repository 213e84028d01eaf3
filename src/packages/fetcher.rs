//! The fetcher: a short-lived container, made from the session's own image (same Python, same platform),
//! that alone has a network. It downloads **binary wheels only** (`pip download --only-binary=:all:`,
//! dependencies included: no package's code runs, nothing is built) into its own tmpfs; the service then
//! reads them out through Docker's exec API (the images' file tool, `collect`), checks each name and
//! size, and writes them into its cache itself. The fetcher has no host mount at all; it is sealed like a
//! session (capabilities dropped, `no-new-privileges`, read-only root, uid 1000, memory and pids limits)
//! except for its network, and it is removed when the fetch ends, however it ends (labelled
//! `kernelbox.fetcher`: removed at start-up and by the reaper's orphan sweep when no fetch owns it).
//!
//! For npm packages the same container runs `deno cache npm:<spec>` from the javascript image.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;

use crate::images::{FILES_TOOL, HOME, START_KERNEL};
use crate::runtime::tool::{KeepStderr, ToolOutput, collect};
use crate::runtime::{ContainerRuntime, ContainerSpec, ExecRequest, labels};
use crate::text::strip_ansi;

use super::cache::WheelCache;
use super::exec;
use super::fetch_egress::{FetchEgress, FetchGate};
use super::settings::{PYTHON, PackageConfig};
use super::spec::{Ecosystem, is_wheel_filename};

/// Where the fetcher downloads to: its own tmpfs.
const FETCH_DIR: &str = "/tmp/fetch";
/// The most wheels one fetch may bring back.
const MAX_WHEELS: usize = 500;
/// The Deno binary of the javascript image.
const DENO: &str = "/opt/kernelbox/venv/bin/deno";

/// What a fetch brought back.
#[derive(Debug, Clone, Default)]
pub struct Fetched {
    /// The download ran and every wheel is in the cache.
    pub ok: bool,
    /// The wheels of this fetch (new in the cache or there already).
    pub wheels: Vec<String>,
    /// The fetcher's output (its end).
    pub log: String,
}

/// The fetches under way: their ids, so that the orphan sweep leaves their containers alone.
#[derive(Debug, Default)]
pub struct LiveFetchers(Mutex<HashSet<String>>);

impl LiveFetchers {
    pub fn contains(&self, id: &str) -> bool {
        self.0.lock().unwrap().contains(id)
    }
}

/// Removes the fetcher's container when dropped, if [`Fetcher::remove`] did not (a cancelled or failed
/// fetch), then forgets its id.
struct Fetcher {
    runtime: Arc<dyn ContainerRuntime>,
    live: Arc<LiveFetchers>,
    fetch_id: String,
    container: Option<String>,
}

impl Fetcher {
    async fn remove(mut self) {
        if let Some(id) = self.container.take()
            && let Err(e) = self.runtime.remove(&id).await
        {
            tracing::warn!(container = %id, error = %e, "could not remove a package fetcher; the sweep will");
        }
        self.live.0.lock().unwrap().remove(&self.fetch_id);
    }
}

impl Drop for Fetcher {
    fn drop(&mut self) {
        let live = self.live.clone();
        let fetch_id = self.fetch_id.clone();
        match self.container.take() {
            Some(id) => {
                let runtime = self.runtime.clone();
                // Drop cannot await: a task removes it (the orphan sweep would, otherwise).
                if let Ok(handle) = tokio::runtime::Handle::try_current() {
                    handle.spawn(async move {
                        let _ = runtime.remove(&id).await;
                        live.0.lock().unwrap().remove(&fetch_id);
                    });
                } else {
                    live.0.lock().unwrap().remove(&fetch_id);
                }
            }
            None => {
                live.0.lock().unwrap().remove(&fetch_id);
            }
        }
    }
}

/// The fetcher's environment: where packages come from (the service's configuration, never the
/// repository), and the image's system CA bundle, which carries the extra CA the images were built with.
fn environment(config: &PackageConfig, ecosystem: Ecosystem) -> Vec<String> {
    let bundle = "/etc/ssl/certs/ca-certificates.crt";
    let mut env = vec![
        format!("HOME={HOME}"),
        "PIP_NO_CACHE_DIR=1".into(),
        "PIP_DISABLE_PIP_VERSION_CHECK=1".into(),
        "PIP_NO_INPUT=1".into(),
        format!("PIP_CERT={bundle}"),
        format!("SSL_CERT_FILE={bundle}"),
        format!("DENO_CERT={bundle}"),
        "DENO_DIR=/tmp/deno".into(),
        "DENO_NO_UPDATE_CHECK=1".into(),
        "DENO_NO_PROMPT=1".into(),
    ];
    if let Some(index) = &config.index_url
        && ecosystem == Ecosystem::Python
    {
        env.push(format!("PIP_INDEX_URL={index}"));
    }
    if let Some(registry) = &config.npm_registry
        && ecosystem == Ecosystem::Npm
    {
        env.push(format!("NPM_CONFIG_REGISTRY={registry}"));
    }
    if let Some(proxy) = &config.proxy {
        for var in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"] {
            env.push(format!("{var}={proxy}"));
        }
    }
    if let Some(no_proxy) = &config.no_proxy {
        env.push(format!("NO_PROXY={no_proxy}"));
        env.push(format!("no_proxy={no_proxy}"));
    }
    env
}

/// The fetcher's container: the sandbox, plus a network, minus any mount; or, through the egress proxy
/// (`gate`), the sandbox with no network at all and its gate's folder mounted read-only at `/kernel`.
fn container_spec(
    config: &PackageConfig,
    instance: &str,
    fetch_id: &str,
    image: &str,
    language: &str,
    gate: Option<&FetchGate>,
) -> ContainerSpec {
    let download_mb = config.max_download_bytes >> 20;
    let mut spec = ContainerSpec {
        name: format!("kernelbox-fetch-{fetch_id}"),
        image: image.to_owned(),
        // Idle until removed, and never longer than the fetch's limit (plus a margin) if the service dies.
        cmd: vec!["sleep".into(), (config.timeout.as_secs() + 60).to_string()],
        env: environment(config, Ecosystem::of(language).unwrap_or(Ecosystem::Python)),
        labels: HashMap::from([
            (labels::FETCHER.to_owned(), fetch_id.to_owned()),
            (labels::INSTANCE.to_owned(), instance.to_owned()),
            (labels::LANGUAGE.to_owned(), language.to_owned()),
            (labels::CREATED.to_owned(), Utc::now().to_rfc3339()),
        ]),
        // The download tmpfs counts against memory: room for it and for pip.
        memory_bytes: ((download_mb + 768) << 20) as i64,
        nano_cpus: 1_000_000_000,
        pids_limit: 128,
        tmpfs: HashMap::from([
            ("/tmp".to_owned(), format!("rw,nosuid,nodev,size={download_mb}m")),
            (HOME.to_owned(), "rw,nosuid,nodev,size=16m,uid=1000,gid=1000,mode=0700".to_owned()),
        ]),
        binds: Vec::new(),
        user: "1000:1000".into(),
        working_dir: "/tmp".into(),
        egress_network: Some(config.network.clone()),
        // The engine's default: a fetcher needs a network, which gVisor as sessions run it has not.
        oci_runtime: String::new(),
    };
    if let Some(gate) = gate {
        let seconds = (config.timeout.as_secs() + 60).to_string();
        spec.cmd = vec![START_KERNEL.to_owned(), "--proxy-only".into(), seconds];
        spec.egress_network = None;
        spec.binds = vec![format!("{}:{}:ro", gate.dir.display(), crate::kernel::connection::CONTAINER_DIR)];
        spec.env.extend(gate.environment());
    }
    spec
}

/// Where a fetch puts what it downloaded: wheels into the wheel cache; an npm fetch's Deno cache, as one
/// tar archive, into the npm cache under the given name.
pub enum Store<'a> {
    Wheels(&'a WheelCache),
    Npm(&'a WheelCache, &'a str),
}

/// Starts a fetcher and runs the download in it; what it downloaded lands in `store`. Errors are the engine's or
/// the file tool's; a download that fails (no such package, no wheel) is `Fetched { ok: false }`.
#[allow(clippy::too_many_arguments)]
pub async fn fetch(
    runtime: Arc<dyn ContainerRuntime>,
    config: &PackageConfig,
    live: Arc<LiveFetchers>,
    store: Store<'_>,
    instance: &str,
    image: &str,
    language: &str,
    specs: &[String],
    egress: Option<&FetchEgress>,
) -> Result<Fetched, String> {
    let fetch_id = hex::encode(&uuid::Uuid::new_v4().as_bytes()[..8]);
    // Through the egress proxy when there is one (and no upstream proxy of the operator's to go through).
    let gate = match egress {
        Some(egress) if config.proxy.is_none() => {
            Some(egress.open(&fetch_id).map_err(|e| format!("could not open the fetcher's gate: {e}"))?)
        }
        _ => None,
    };
    live.0.lock().unwrap().insert(fetch_id.clone());
    let mut fetcher = Fetcher { runtime: runtime.clone(), live, fetch_id: fetch_id.clone(), container: None };
    let spec = container_spec(config, instance, &fetch_id, image, language, gate.as_ref());
    let id = runtime.create_and_start(&spec).await.map_err(|e| format!("could not start a fetcher: {e}"))?;
    fetcher.container = Some(id.clone());
    metrics::counter!("kernelbox_package_fetchers_started_total").increment(1);
    tracing::info!(fetch_id, language, packages = ?specs, "package fetcher started");
    let outcome = match store {
        Store::Npm(cache, archive) => download_npm(runtime.as_ref(), &id, config, cache, archive, specs).await,
        Store::Wheels(cache) => download_wheels(runtime.as_ref(), &id, config, cache, specs).await,
    };
    fetcher.remove().await;
    // What the proxy refused, for the install's log.
    let refused = gate.as_ref().map(|g| g.report().blocked).unwrap_or_default();
    outcome.map(|mut fetched| {
        for b in refused {
            fetched.log.push_str(&format!(
                "\nkernelbox: the fetcher's connection to {}:{} was refused ({})",
                b.host, b.port, b.reason
            ));
        }
        fetched
    })
}

async fn download_wheels(
    runtime: &dyn ContainerRuntime,
    container: &str,
    config: &PackageConfig,
    cache: &WheelCache,
    specs: &[String],
) -> Result<Fetched, String> {
    let mut cmd = vec![
        PYTHON,
        "-m",
        "pip",
        "download",
        "--only-binary=:all:",
        "--progress-bar",
        "off",
        "--dest",
        FETCH_DIR,
        "--",
    ];
    cmd.extend(specs.iter().map(String::as_str));
    let argv = exec::time_limited(config.timeout, &cmd);
    let done = exec::run(runtime, container, argv, Vec::new(), 256 << 10).await.map_err(|e| e.to_string())?;
    let mut log = done.stdout_text();
    log.push_str(&done.stderr_text());
    if !done.ok() {
        let why = match done.exit {
            Some(exec::KILLED_AT_LIMIT) => format!("(killed at the time limit of {} s)\n", config.timeout.as_secs()),
            _ => String::new(),
        };
        return Ok(Fetched { ok: false, wheels: Vec::new(), log: format!("{log}{why}") });
    }
    let wheels = pull_wheels(runtime, container, config, cache).await?;
    Ok(Fetched { ok: true, wheels, log })
}

/// Reads the fetcher's wheels out through the file tool and writes them into the cache. Everything the
/// fetcher sends is checked: names are wheel file names (never paths), the total is bounded.
async fn pull_wheels(
    runtime: &dyn ContainerRuntime,
    container: &str,
    config: &PackageConfig,
    cache: &WheelCache,
) -> Result<Vec<String>, String> {
    let max = config.max_download_bytes;
    let cmd = vec![
        FILES_TOOL.to_owned(),
        "collect".into(),
        FETCH_DIR.into(),
        MAX_WHEELS.to_string(),
        max.to_string(),
        "0".into(),
    ];
    let request = ExecRequest { cmd, user: "1000:1000".into(), working_dir: "/tmp".into(), env: Vec::new() };
    let exec = runtime.exec(container, &request).await.map_err(|e| e.to_string())?;
    let _stdin = exec.stdin;
    let mut out = ToolOutput::new(exec.output, Duration::from_secs(60), KeepStderr::End);
    let mut wheels = Vec::new();
    let mut total: u64 = 0;
    loop {
        let line = out.line(4096).await.map_err(|e| e.to_string())?;
        let item: collect::Item = serde_json::from_slice(&line).map_err(|e| format!("the file tool's answer: {e}"))?;
        if let Some(message) = item.message {
            return Err(format!("the file tool refused: {message}"));
        }
        if item.end == Some(true) {
            if item.skipped.unwrap_or(0) > 0 {
                return Err(format!("the download is larger than the limit of {} MiB", max >> 20));
            }
            return Ok(wheels);
        }
        let (Some(name), Some(size)) = (item.path, item.size) else {
            return Err("the file tool sent an entry without a path or size".into());
        };
        if !is_wheel_filename(&name) {
            return Err(format!("the fetcher produced {name:?}, which is not a wheel file name"));
        }
        total += size;
        if total > max || wheels.len() >= MAX_WHEELS {
            return Err(format!("the download is larger than the limit of {} MiB", max >> 20));
        }
        let mut writer = cache.create(&name).map_err(|e| format!("the package cache: {e}"))?;
        let mut left = size;
        while let Some(chunk) = out.body_chunk(&mut left).await.map_err(|e| e.to_string())? {
            // Already cached (no writer): read past it.
            if let Some(w) = writer.as_mut() {
                w.write(&chunk).map_err(|e| format!("the package cache: {e}"))?;
            }
        }
        if let Some(w) = writer {
            w.commit().map_err(|e| format!("the package cache: {e}"))?;
        }
        wheels.push(name);
    }
}

/// npm packages through Deno: `deno cache npm:<spec>` into the fetcher's own `DENO_DIR`, whose `npm`
/// folder (the packages and their registry documents) the service then reads out as one tar archive
/// (`tar -c` in the fetcher, streamed through the exec API, bounded) into its npm cache. The service never
/// unpacks it: it is unpacked inside the session, as the session's user.
async fn download_npm(
    runtime: &dyn ContainerRuntime,
    container: &str,
    config: &PackageConfig,
    cache: &WheelCache,
    archive: &str,
    specs: &[String],
) -> Result<Fetched, String> {
    let npm: Vec<String> = specs.iter().map(|s| format!("npm:{s}")).collect();
    // No `--`: Deno takes what follows it as script arguments and caches nothing. Every argument starts
    // with `npm:`, so none can be an option.
    let mut cmd = vec![DENO, "cache"];
    cmd.extend(npm.iter().map(String::as_str));
    let argv = exec::time_limited(config.timeout, &cmd);
    let done = exec::run(runtime, container, argv, Vec::new(), 256 << 10).await.map_err(|e| e.to_string())?;
    // Deno colours its errors even without a terminal.
    let log = format!("{}{}", done.stdout_text(), strip_ansi(&done.stderr_text()));
    if !done.ok() {
        return Ok(Fetched { ok: false, wheels: Vec::new(), log });
    }
    let cmd = vec!["tar".to_owned(), "-C".into(), "/tmp/deno".into(), "-cf".into(), "-".into(), "npm".into()];
    let request = ExecRequest { cmd, user: "1000:1000".into(), working_dir: "/tmp".into(), env: Vec::new() };
    let exec = runtime.exec(container, &request).await.map_err(|e| e.to_string())?;
    let _stdin = exec.stdin;
    let mut out = ToolOutput::new(exec.output, Duration::from_secs(60), KeepStderr::End);
    let Some(mut writer) = cache.create(archive).map_err(|e| format!("the npm cache: {e}"))? else {
        return Ok(Fetched { ok: true, wheels: vec![archive.to_owned()], log });
    };
    let max = config.max_download_bytes;
    while let Some(chunk) = out.next().await.map_err(|e| e.to_string())? {
        if writer.written() + chunk.len() as u64 > max {
            return Err(format!("the download is larger than the limit of {} MiB", max >> 20));
        }
        writer.write(&chunk).map_err(|e| format!("the npm cache: {e}"))?;
    }
    match exec::exit_code(runtime, &exec.id).await.map_err(|e| e.to_string())? {
        Some(0) => {}
        other => {
            return Err(format!("tar in the fetcher failed ({other:?}): {}", String::from_utf8_lossy(out.stderr())));
        }
    }
    writer.commit().map_err(|e| format!("the npm cache: {e}"))?;
    Ok(Fetched { ok: true, wheels: vec![archive.to_owned()], log })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fetcher_is_sealed_but_for_its_network_and_has_no_mount() {
        let config = PackageConfig { proxy: Some("http://proxy.internal:3128".into()), ..PackageConfig::default() };
        let spec = container_spec(&config, "inst", "abc", "kb/kernel-python:latest", "python", None);
        assert_eq!(spec.egress_network.as_deref(), Some("bridge"));
        assert!(spec.binds.is_empty(), "no host mount at all");
        assert_eq!(spec.user, "1000:1000");
        assert_eq!(spec.labels[labels::FETCHER], "abc");
        assert_eq!(spec.labels[labels::INSTANCE], "inst");
        assert!(!spec.labels.contains_key(labels::SESSION));
        assert!(spec.env.contains(&"HTTPS_PROXY=http://proxy.internal:3128".to_owned()));
        assert!(!spec.env.iter().any(|e| e.starts_with("PIP_INDEX_URL")), "pip's default unless configured");
    }

    #[tokio::test]
    async fn a_fetcher_through_the_egress_proxy_has_no_network_and_only_its_gate_mounted() {
        use clap::Parser;
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            egress: crate::config::EgressArgs,
        }
        let args = Cli::try_parse_from(["kb", "--egress"]).unwrap().egress;
        let hub = crate::egress::hub::EgressHub::new(args.validate().unwrap().unwrap());
        let state = tempfile::tempdir().unwrap();
        let config = PackageConfig::default();
        let hosts = super::super::fetch_egress::index_hosts(&config, &[]);
        let egress = FetchEgress::new(hub.clone(), state.path().join("fetchers"), &hosts);
        assert_eq!(egress.allow.entries(), ["pypi.org", "files.pythonhosted.org", "registry.npmjs.org"]);
        let gate = egress.open("abc").unwrap();
        let spec = container_spec(&config, "inst", "abc", "kb/kernel-python:latest", "python", Some(&gate));
        assert_eq!(spec.egress_network, None, "no network: --network none");
        assert_eq!(spec.binds, [format!("{}:/kernel:ro", gate.dir.display())]);
        assert!(gate.dir.join("egress").exists(), "the gate listens in the fetch's own folder");
        assert_eq!(spec.cmd[..2], [START_KERNEL.to_owned(), "--proxy-only".to_owned()]);
        assert!(spec.env.contains(&"HTTPS_PROXY=http://127.0.0.1:3128".to_owned()));
        assert!(hub.get("fetch-abc").is_some());
        let dir = gate.dir.clone();
        drop(gate);
        assert!(!dir.exists() && hub.get("fetch-abc").is_none(), "the folder and the network go with the fetch");
    }
}
