//! Installing packages into sessions whose sandbox has no network (issue 11).
//!
//! The service fetches; the sandbox only installs what was fetched:
//! 1. [`spec`] checks every spec (pure functions) before anything runs: 422 otherwise.
//! 2. [`install::plan`] asks pip, inside the session, whether the shared wheel [`cache`] (mounted
//!    read-only at [`WHEELS_MOUNT`] in every python session) can satisfy the request. If it can, nothing
//!    is downloaded and no fetcher is started (`"cached": true`).
//! 3. Otherwise a [`fetcher`] container made from the session's own image, the only container with a
//!    network (with networks by name on, not even that: it goes through the egress proxy to the package
//!    indexes alone, [`fetch_egress`]), downloads binary wheels (dependencies included), and the service
//!    writes them into the cache itself. Concurrent installs needing the same download share one fetch (a bounded map of
//!    shared futures, keyed by image and specs).
//! 4. [`install::install`] installs the planned wheels into the session's packages directory (a tmpfs on
//!    the kernel's `PYTHONPATH`), as uid 1000, with no index.
//!
//! npm packages ([`npm`]) follow the same shape: the fetcher runs `deno cache npm:<spec>`, its Deno cache
//! comes back as one archive into the service's npm cache, and `tar` in the session unpacks it into the
//! kernel's `DENO_DIR`.
//!
//! Every install ends in one [`InstallReport`] ([`report`]): the packages installed, or for a failed
//! install each package with what kept it out.
//!
//! This module reaches Docker only through [`ContainerRuntime`] and never opens a path a container can
//! write: the cache is the service's own directory, read-only to every session, and absent from fetchers.

pub mod cache;
pub mod exec;
pub mod fetch_egress;
pub mod fetcher;
pub mod install;
pub mod npm;
pub mod report;
pub mod settings;
pub mod spec;

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::FutureExt;
use futures::future::{BoxFuture, Shared};

use crate::runtime::{ContainerRuntime, RuntimeError};

use self::cache::WheelCache;
use self::fetch_egress::FetchEgress;
use self::fetcher::{Fetched, LiveFetchers, Store};
use self::report::Draft;
pub use self::report::{InstallReport, PackageResult};
pub use self::settings::{MAX_FETCHES, PACKAGES_DIR, PYTHON, PackageConfig, SESSION_DENO_DIR, WHEELS_MOUNT};
use self::spec::{Ecosystem, Spec};

/// Why an install could not run (a failed install that ran is an [`InstallReport`] with `ok: false`).
#[derive(Debug, thiserror::Error)]
pub enum PackageError {
    #[error("{0}")]
    Invalid(String),
    #[error(
        "installing packages is not supported for {0} sessions (python, python_scientific, javascript and \
         typescript only)"
    )]
    Unsupported(String),
    #[error("a package install is already running on this session; retry when it finishes")]
    Busy,
    #[error("too many package downloads are under way (at most {MAX_FETCHES}); retry shortly")]
    TooManyFetches,
    #[error("the install took longer than its limit of {0} s; the session keeps what it had")]
    TimedOut(u64),
    #[error("the session's container is not running")]
    NotRunning,
    #[error("the package fetcher failed: {0}")]
    Fetcher(String),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    #[error("the package cache: {0}")]
    Io(#[from] std::io::Error),
}

/// The shared result of one fetch.
type SharedFetch = Shared<BoxFuture<'static, Result<Arc<Fetched>, Arc<String>>>>;

/// The package service: the cache, the fetches under way, and the install orchestration.
pub struct Packages {
    runtime: Arc<dyn ContainerRuntime>,
    config: PackageConfig,
    /// Names fetchers' containers (labels).
    instance: String,
    cache: Arc<WheelCache>,
    /// npm fetches' archives (`<state>/npm`), unpacked into sessions by their own `tar`.
    npm_cache: Arc<WheelCache>,
    /// Fetches under way, by image and specs: identical requests share one.
    inflight: Arc<Mutex<HashMap<String, SharedFetch>>>,
    /// Their fetch ids, for the orphan sweep.
    live: Arc<LiveFetchers>,
    /// Fetcher containers this service started (tests read it: a cached install starts none).
    fetchers_started: Arc<AtomicU64>,
    /// Wheels that installs under way need: eviction leaves them.
    in_use: Arc<Mutex<HashMap<String, usize>>>,
    /// Fetchers go through the egress proxy (networks by name on).
    egress: Option<Arc<FetchEgress>>,
}

/// Where one install goes: a session's running container, its language and image, and when it began.
#[derive(Clone, Copy)]
struct Target<'a> {
    container: &'a str,
    language: &'a str,
    image: &'a str,
    started: Instant,
}

impl Packages {
    pub fn new(
        runtime: Arc<dyn ContainerRuntime>,
        config: PackageConfig,
        state_dir: PathBuf,
        instance: String,
    ) -> Self {
        let cache = Arc::new(WheelCache::new(state_dir.join("wheels"), config.cache_max_bytes));
        let npm_cache = Arc::new(WheelCache::new_npm(state_dir.join("npm"), config.cache_max_bytes));
        Packages {
            runtime,
            config,
            instance,
            cache,
            npm_cache,
            inflight: Arc::default(),
            live: Arc::default(),
            fetchers_started: Arc::default(),
            in_use: Arc::default(),
            egress: None,
        }
    }

    /// Fetchers go through the egress proxy to the package indexes alone.
    pub fn through_egress(mut self, egress: FetchEgress) -> Self {
        self.egress = Some(Arc::new(egress));
        self
    }

    /// Makes the cache directory (before any session mounts it).
    pub fn prepare(&self) -> std::io::Result<()> {
        self.cache.prepare()?;
        self.npm_cache.prepare()
    }

    /// The host directory mounted read-only at [`WHEELS_MOUNT`].
    pub fn cache_dir(&self) -> PathBuf {
        self.cache.dir().to_path_buf()
    }

    pub fn config(&self) -> &PackageConfig {
        &self.config
    }

    /// Whether a fetch with this id is under way (its container is not an orphan).
    pub fn is_live_fetcher(&self, fetch_id: &str) -> bool {
        self.live.contains(fetch_id)
    }

    /// How many fetcher containers this service has started.
    pub fn fetchers_started(&self) -> u64 {
        self.fetchers_started.load(Ordering::Relaxed)
    }

    /// Installs `specs` (already checked) into the running container `container` of a session in
    /// `language` made from `image`. Bounded by the configured time limit.
    pub async fn install(
        &self,
        container: &str,
        language: &str,
        image: &str,
        specs: &[Spec],
    ) -> Result<InstallReport, PackageError> {
        if container.is_empty() {
            return Err(PackageError::NotRunning);
        }
        let started = Instant::now();
        let target = Target { container, language, image, started };
        let limit = self.config.timeout;
        let work = async {
            match Ecosystem::of(language) {
                Some(Ecosystem::Python) => self.install_python(target, specs).await,
                Some(Ecosystem::Npm) => self.install_npm(target, specs).await,
                None => Err(PackageError::Unsupported(language.to_owned())),
            }
        };
        let report = tokio::time::timeout(limit, work).await.map_err(|_| PackageError::TimedOut(limit.as_secs()))??;
        let cached = if report.cached { "true" } else { "false" };
        let ok = if report.ok { "true" } else { "false" };
        metrics::counter!("kernelbox_package_installs_total", "ok" => ok, "cached" => cached).increment(1);
        tracing::info!(language, ok = report.ok, cached = report.cached, ms = report.duration_ms, "package install");
        Ok(report)
    }

    async fn install_python(&self, target: Target<'_>, specs: &[Spec]) -> Result<InstallReport, PackageError> {
        let Target { container, language, image, started } = target;
        let rt = self.runtime.as_ref();
        let left = || self.config.timeout.saturating_sub(started.elapsed()).max(Duration::from_secs(1));
        let mut draft = Draft::new(language, started);
        let mut plan = install::plan(rt, container, specs, left()).await?;
        if let install::Plan::Missing(out) = &plan {
            draft.log.push_str(out);
            draft.cached = false;
            let texts: Vec<String> = specs.iter().map(|s| s.text.clone()).collect();
            let fetched = self.fetch_shared(image, language, texts, None).await?;
            draft.log.push_str("--- fetcher ---\n");
            draft.log.push_str(&fetched.log);
            if !fetched.ok {
                return Ok(draft.failed(specs, &self.explain(&fetched.log)));
            }
            draft.downloaded = fetched.wheels.clone();
            let _held = self.hold(&draft.downloaded);
            self.cache.evict(&self.held());
            draft.log.push_str("--- install ---\n");
            plan = install::plan(rt, container, specs, left()).await?;
        }
        let timed_out = || PackageError::TimedOut(self.config.timeout.as_secs());
        let planned = match plan {
            install::Plan::Ready(planned) => planned,
            install::Plan::Missing(out) | install::Plan::Failed(out) => {
                draft.log.push_str(&out);
                return Ok(draft.failed(specs, &out));
            }
            install::Plan::TimedOut => return Err(timed_out()),
        };
        let wheels: Vec<String> = planned.iter().map(|p| p.wheel.clone()).collect();
        let _held = self.hold(&wheels);
        let (ok, out) = match install::install(rt, container, &planned, left()).await? {
            install::Installed::Done(out) => (true, out),
            install::Installed::Failed(out) => (false, out),
            install::Installed::TimedOut => return Err(timed_out()),
        };
        draft.log.push_str(&out);
        if !ok {
            let why = match out.contains("No space left on device") {
                true => format!(
                    "{out}\nERROR: the session's packages directory is full (its size follows the session's memory)"
                ),
                false => out,
            };
            return Ok(draft.failed(specs, &why));
        }
        self.cache.touch(wheels.iter().map(String::as_str));
        let names: Vec<String> = specs.iter().map(|s| s.name.clone()).collect();
        let versions = install::versions(rt, container, &names).await?;
        let packages: Vec<PackageResult> = specs
            .iter()
            .map(|s| {
                let version = versions
                    .get(&s.name)
                    .cloned()
                    .flatten()
                    .or_else(|| planned.iter().find(|p| p.name == s.name).map(|p| p.version.clone()));
                let error = version.is_none().then(|| "installed, but the session does not see it".to_owned());
                PackageResult { spec: s.text.clone(), name: s.name.clone(), version, error }
            })
            .collect();
        Ok(draft.report(packages, wheels))
    }

    /// npm packages: the fetcher's Deno cache, archived in the service's npm cache (keyed by image,
    /// registry and specs: the same request from another session downloads nothing), unpacked by `tar` in
    /// the session into the kernel's `DENO_DIR`, where `import ... from "npm:<spec>"` finds it with no
    /// network. Sessions and fetchers use the same registry setting, so Deno looks in the same folder.
    async fn install_npm(&self, target: Target<'_>, specs: &[Spec]) -> Result<InstallReport, PackageError> {
        let Target { container, language, image, started } = target;
        let texts: Vec<String> = specs.iter().map(|s| s.text.clone()).collect();
        let registry = self.config.npm_registry.clone().unwrap_or_default();
        let archive = cache::npm_archive_name(&format!("{image}\n{registry}\n{}", texts.join("\n")));
        let mut draft = Draft::new(language, started);
        let _held = self.hold(std::slice::from_ref(&archive));
        if !self.npm_cache.contains(&archive) {
            draft.cached = false;
            let fetched = self.fetch_shared(image, language, texts.clone(), Some(archive.clone())).await?;
            draft.log.push_str("--- fetcher ---\n");
            draft.log.push_str(&fetched.log);
            if !fetched.ok {
                return Ok(draft.failed(specs, &self.explain(&fetched.log)));
            }
            draft.downloaded = texts.iter().map(|t| format!("npm:{t}")).collect();
            self.npm_cache.evict(&self.held());
        }
        // Two opens: a cloned descriptor would share the offset that reading the versions moves.
        let versions = npm::versions(cache::open_file(&self.npm_cache, &archive)?, specs);
        let file = cache::open_file(&self.npm_cache, &archive)?;
        let (ok, out) = npm::unpack(self.runtime.as_ref(), container, file, self.config.timeout).await?;
        draft.log.push_str("--- install ---\n");
        draft.log.push_str(&out);
        if !ok {
            return Ok(draft.failed(specs, &out));
        }
        self.npm_cache.touch([archive.as_str()]);
        let packages: Vec<PackageResult> = specs
            .iter()
            .map(|s| {
                let version = versions.get(&s.name).cloned();
                let error = version.is_none().then(|| "not found in what the fetcher downloaded".to_owned());
                PackageResult { spec: s.text.clone(), name: s.name.clone(), version, error }
            })
            .collect();
        Ok(draft.report(packages, vec![format!("npm archive {archive}")]))
    }

    /// A fetcher's output, with a last line that says what went wrong where pip's own does not.
    fn explain(&self, log: &str) -> String {
        if log.contains("No space left on device") {
            let mib = self.config.max_download_bytes >> 20;
            return format!("{log}\nERROR: the download is larger than the limit of {mib} MiB per install");
        }
        log.to_owned()
    }

    /// Runs a fetch, or joins the identical one under way. The fetch is a task of its own: it finishes
    /// (and removes its container) even if every caller leaves, and its wheels serve the next install.
    async fn fetch_shared(
        &self,
        image: &str,
        language: &str,
        specs: Vec<String>,
        archive: Option<String>,
    ) -> Result<Arc<Fetched>, PackageError> {
        let key = format!("{image}\n{}", specs.join("\n"));
        let shared = {
            let mut inflight = self.inflight.lock().unwrap();
            match inflight.get(&key) {
                Some(shared) => shared.clone(),
                None => {
                    if inflight.len() >= MAX_FETCHES {
                        return Err(PackageError::TooManyFetches);
                    }
                    let shared = self.spawn_fetch(key.clone(), image.to_owned(), language.to_owned(), specs, archive);
                    inflight.insert(key, shared.clone());
                    shared
                }
            }
        };
        shared.await.map_err(|e| PackageError::Fetcher(e.to_string()))
    }

    fn spawn_fetch(
        &self,
        key: String,
        image: String,
        language: String,
        specs: Vec<String>,
        archive: Option<String>,
    ) -> SharedFetch {
        let runtime = self.runtime.clone();
        let config = self.config.clone();
        let live = self.live.clone();
        let cache = self.cache.clone();
        let npm_cache = self.npm_cache.clone();
        let instance = self.instance.clone();
        let inflight = self.inflight.clone();
        let started = self.fetchers_started.clone();
        let egress = self.egress.clone();
        let task = tokio::spawn(async move {
            started.fetch_add(1, Ordering::Relaxed);
            let limit = config.timeout;
            let store = match &archive {
                Some(name) => Store::Npm(&npm_cache, name),
                None => Store::Wheels(&cache),
            };
            let run =
                fetcher::fetch(runtime, &config, live, store, &instance, &image, &language, &specs, egress.as_deref());
            let outcome = match tokio::time::timeout(limit, run).await {
                Ok(Ok(fetched)) => Ok(Arc::new(fetched)),
                Ok(Err(e)) => Err(Arc::new(e)),
                Err(_) => Err(Arc::new(format!("the download took longer than {} s", limit.as_secs()))),
            };
            inflight.lock().unwrap().remove(&key);
            outcome
        });
        async move { task.await.unwrap_or_else(|e| Err(Arc::new(format!("the fetch task failed: {e}")))) }
            .boxed()
            .shared()
    }

    /// Marks wheels as needed by an install under way until the guard drops.
    fn hold(&self, wheels: &[String]) -> Held {
        let mut in_use = self.in_use.lock().unwrap();
        for w in wheels {
            *in_use.entry(w.clone()).or_insert(0) += 1;
        }
        Held { in_use: self.in_use.clone(), wheels: wheels.to_vec() }
    }

    fn held(&self) -> HashSet<String> {
        self.in_use.lock().unwrap().keys().cloned().collect()
    }
}

/// Wheels an install under way needs (see [`Packages::hold`]).
struct Held {
    in_use: Arc<Mutex<HashMap<String, usize>>>,
    wheels: Vec<String>,
}

impl Drop for Held {
    fn drop(&mut self) {
        let mut in_use = self.in_use.lock().unwrap();
        for w in &self.wheels {
            if let Some(n) = in_use.get_mut(w) {
                *n -= 1;
                if *n == 0 {
                    in_use.remove(w);
                }
            }
        }
    }
}
