//! Command-line and environment configuration: every flag has a `KERNELBOX_*` twin and a default that
//! works on a developer's Docker host. Values are checked here, once, into typed settings.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

#[derive(Debug, Parser)]
#[command(
    name = "kernelbox",
    version,
    about = "Run untrusted code in stateful Jupyter kernels, one sealed container per session"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
    /// Log format.
    #[arg(long, global = true, env = "KERNELBOX_LOG_FORMAT", value_enum, default_value_t = LogFormat::Json)]
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Serve the HTTP API (builds any missing kernel image first).
    Serve(Box<ServeArgs>),
    /// Exit 0 when a kernelbox server answers on /healthz (the container health check).
    Health {
        #[arg(long, env = "KERNELBOX_HEALTH_ADDR", default_value = "127.0.0.1:8080")]
        addr: SocketAddr,
    },
    /// Build or list the kernel images.
    Images {
        #[command(subcommand)]
        command: ImagesCommand,
        #[command(flatten)]
        images: ImageArgs,
    },
}

#[derive(Debug, Subcommand)]
pub enum ImagesCommand {
    /// Build kernel images whose build context changed (all languages unless named).
    Build {
        /// Languages to build (python, python_scientific, javascript, java, bash).
        languages: Vec<String>,
        /// Rebuild from scratch, ignoring Docker's layer cache and the content hash.
        #[arg(long)]
        no_cache: bool,
    },
    /// List the kernel images and whether they are up to date.
    List,
}

/// Where kernel images come from.
#[derive(Debug, Clone, Args)]
pub struct ImageArgs {
    /// Base image for the kernel images; made with debootstrap when it can be neither found nor pulled.
    #[arg(long, env = "KERNELBOX_BASE_IMAGE", default_value = "debian:bookworm-slim")]
    pub base_image: String,
    /// Prefix of the kernel image names (`<prefix><language>:latest`).
    #[arg(long, env = "KERNELBOX_IMAGE_PREFIX", default_value = "kernelbox/kernel-")]
    pub image_prefix: String,
    /// Build contexts from this directory instead of the ones built into the binary.
    #[arg(long, env = "KERNELBOX_IMAGES_DIR")]
    pub images_dir: Option<PathBuf>,
    /// Debian mirror for image builds (default: the host's configured Debian mirror, if any).
    #[arg(long, env = "KERNELBOX_APT_MIRROR")]
    pub apt_mirror: Option<String>,
    /// Python package index for image builds (default: the host's pip setting, if any).
    #[arg(long, env = "KERNELBOX_PIP_INDEX_URL")]
    pub pip_index_url: Option<String>,
    /// An extra CA bundle to trust during image builds, e.g. a TLS-intercepting proxy's
    /// (default: the file named by PIP_CERT or SSL_CERT_FILE, if set).
    #[arg(long, env = "KERNELBOX_EXTRA_CA_BUNDLE")]
    pub extra_ca_bundle: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// Address to listen on.
    #[arg(long, env = "KERNELBOX_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// API keys (comma-separated). With none, the server refuses to listen beyond loopback.
    #[arg(long = "api-key", env = "KERNELBOX_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// Allow listening beyond loopback without API keys (only behind something that restricts access,
    /// e.g. a container port published on the host's loopback).
    #[arg(long, env = "KERNELBOX_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// State directory: session sockets and connection files. Must be the same path for the service and
    /// the Docker engine (bind-mounted at the same path when the service runs in a container).
    #[arg(long, env = "KERNELBOX_STATE_DIR", default_value = "/var/lib/kernelbox")]
    pub state_dir: PathBuf,
    /// Name of this service instance; containers carry it, so two services can share one engine.
    #[arg(long, env = "KERNELBOX_INSTANCE", default_value = "default")]
    pub instance: String,
    /// Do not build missing kernel images at start-up (languages without an image are then unavailable).
    #[arg(long, env = "KERNELBOX_NO_BUILD")]
    pub no_build: bool,
    /// Keep session containers when the service stops, to adopt them at the next start.
    #[arg(long, env = "KERNELBOX_KEEP_SESSIONS")]
    pub keep_sessions: bool,
    /// Where the service writes each session's notebook (default: `<state-dir>/notebooks`). Sessions
    /// never see it.
    #[arg(long, env = "KERNELBOX_NOTEBOOKS_DIR")]
    pub notebooks_dir: Option<PathBuf>,
    /// How users of this deployment reach the notebooks folder (the session API's `notebook_path`).
    #[arg(long, env = "KERNELBOX_NOTEBOOKS_PUBLIC_PATH", default_value = "/mnt/jupyter_sessions")]
    pub notebooks_public_path: String,
    /// A host folder of datasets, mounted read-only at /mnt/data in every session. With compose, the
    /// same path inside and outside the service container.
    #[arg(long, env = "KERNELBOX_DATASETS_DIR")]
    pub datasets_dir: Option<PathBuf>,
    /// Kernels kept booted ahead of demand per language, e.g. `python=2,javascript=1` (`none`: no pool).
    /// A session whose request fits (no `env`; memory that keeps the same tmpfs size) starts from it.
    #[arg(long, env = "KERNELBOX_POOL", default_value = "python=2")]
    pub pool: String,
    /// How many pooled kernels may boot at once (all languages together).
    #[arg(long, env = "KERNELBOX_POOL_MAX_BOOTS", default_value_t = 2)]
    pub pool_max_boots: usize,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub packages: PackageArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub files: FileStoreArgs,
    #[command(flatten)]
    pub images: ImageArgs,
}

/// Package installs into sessions (`POST /v1/sessions/{id}/packages`): the fetchers, the wheel cache and
/// their limits. Where packages come from (index, registry, proxy) is the operator's: nothing host-specific
/// is built in.
#[derive(Debug, Clone, Args)]
pub struct PackageArgs {
    /// Size cap of the shared wheel cache (`<state-dir>/wheels`), MiB; least recently used wheels go first.
    #[arg(long, env = "KERNELBOX_PACKAGE_CACHE_MB", default_value_t = 2048)]
    pub package_cache_mb: u64,
    /// The most one install may download, MiB (the fetcher's disk; a larger download fails).
    #[arg(long, env = "KERNELBOX_PACKAGE_MAX_DOWNLOAD_MB", default_value_t = 512)]
    pub package_max_download_mb: u64,
    /// Time limit of one install, download included, seconds.
    #[arg(long, env = "KERNELBOX_PACKAGE_TIMEOUT_S", default_value_t = 300)]
    pub package_timeout_s: u64,
    /// The Docker network package fetchers use: the only containers that get a network.
    #[arg(long, env = "KERNELBOX_FETCHER_NETWORK", default_value = "bridge")]
    pub fetcher_network: String,
    /// Python package index for fetchers (default: the image-build setting --pip-index-url, else the
    /// host's pip configuration, else pip's own default).
    #[arg(long, env = "KERNELBOX_PACKAGE_INDEX_URL")]
    pub package_index_url: Option<String>,
    /// npm registry for fetchers (default: Deno's).
    #[arg(long, env = "KERNELBOX_NPM_REGISTRY")]
    pub npm_registry: Option<String>,
    /// HTTP(S) proxy for fetchers (default: the service's own HTTPS_PROXY, if set).
    #[arg(long, env = "KERNELBOX_FETCHER_PROXY")]
    pub fetcher_proxy: Option<String>,
    /// Hosts fetchers reach without the proxy (default: the service's own NO_PROXY, if set).
    #[arg(long, env = "KERNELBOX_FETCHER_NO_PROXY")]
    pub fetcher_no_proxy: Option<String>,
}

impl PackageArgs {
    /// Checked settings; `index_url` and the proxy fall back to `default_index` and the environment.
    pub fn validate(&self, default_index: Option<String>) -> Result<crate::packages::PackageConfig, ConfigError> {
        if self.package_max_download_mb < 16 || self.package_timeout_s < 10 {
            return Err(ConfigError(
                "--package-max-download-mb must be at least 16 and --package-timeout-s at least 10".into(),
            ));
        }
        if self.fetcher_network.is_empty() || self.fetcher_network == "none" || self.fetcher_network == "host" {
            return Err(ConfigError("--fetcher-network must name a Docker network other than none and host".into()));
        }
        let env = |names: &[&str]| names.iter().find_map(|n| std::env::var(n).ok().filter(|v| !v.trim().is_empty()));
        Ok(crate::packages::PackageConfig {
            cache_max_bytes: self.package_cache_mb << 20,
            max_download_bytes: self.package_max_download_mb << 20,
            timeout: Duration::from_secs(self.package_timeout_s),
            network: self.fetcher_network.clone(),
            index_url: self.package_index_url.clone().or(default_index),
            npm_registry: self.npm_registry.clone(),
            proxy: self.fetcher_proxy.clone().or_else(|| env(&["HTTPS_PROXY", "https_proxy"])),
            no_proxy: self.fetcher_no_proxy.clone().or_else(|| env(&["NO_PROXY", "no_proxy"])),
        })
    }
}

/// How the HTTP API defends itself against abusive clients.
#[derive(Debug, Clone, Args)]
pub struct HttpArgs {
    /// Requests per minute per API key (per client IP when no keys are configured); 0 disables the limit.
    #[arg(long, env = "KERNELBOX_RATE_LIMIT_PER_MINUTE", default_value_t = 600)]
    pub rate_limit_per_minute: u32,
    /// Requests a key may make at once, above its per-minute rate, before it is slowed down.
    #[arg(long, env = "KERNELBOX_RATE_LIMIT_BURST", default_value_t = 60)]
    pub rate_limit_burst: u32,
    /// Seconds a client has to send a request's headers; idle keep-alive connections close after it too.
    #[arg(long, env = "KERNELBOX_HEADER_READ_TIMEOUT_S", default_value_t = 15)]
    pub header_read_timeout_s: u64,
    /// Seconds a client has to send a whole request body (then 408).
    #[arg(long, env = "KERNELBOX_BODY_READ_TIMEOUT_S", default_value_t = 60)]
    pub body_read_timeout_s: u64,
}

/// The `/jupyter` API's file store: uploaded files and files executions return, each with a lifetime.
#[derive(Debug, Clone, Args)]
pub struct FileStoreArgs {
    /// Where the file store keeps its files (default `<state-dir>/files`). Like the state directory, the
    /// same path for the service and the Docker engine: sessions mount their owner's folder read-only.
    #[arg(long, env = "KERNELBOX_FILES_DIR")]
    pub files_dir: Option<PathBuf>,
    /// The disk all stored files may use together, MiB (then 507).
    #[arg(long, env = "KERNELBOX_FILES_MAX_MB", default_value_t = 1024)]
    pub files_max_mb: u64,
    /// How many files may be stored at once, all owners together (then 507).
    #[arg(long, env = "KERNELBOX_FILES_MAX_COUNT", default_value_t = 10_000)]
    pub files_max_count: u64,
}

/// The checked file store settings.
#[derive(Debug, Clone)]
pub struct FileStoreSettings {
    /// `None`: `<state-dir>/files`.
    pub dir: Option<PathBuf>,
    pub max_bytes: u64,
    pub max_files: u64,
}

impl FileStoreArgs {
    pub fn validate(&self) -> Result<FileStoreSettings, ConfigError> {
        if self.files_max_mb == 0 || self.files_max_count == 0 {
            return Err(ConfigError("--files-max-mb and --files-max-count must be at least 1".into()));
        }
        Ok(FileStoreSettings {
            dir: self.files_dir.clone(),
            max_bytes: self.files_max_mb << 20,
            max_files: self.files_max_count,
        })
    }
}

/// The checked HTTP settings.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// `None`: no rate limit.
    pub rate_limit: Option<RateLimit>,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
}

/// A token bucket: `burst` requests at once, refilled at `per_minute`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    pub per_minute: u32,
    pub burst: u32,
}

impl ServeArgs {
    /// The checked pool settings.
    pub fn pool_config(&self) -> Result<PoolConfig, ConfigError> {
        let targets = PoolConfig::parse_targets(&self.pool).map_err(|e| ConfigError(format!("--pool: {e}")))?;
        if self.pool_max_boots == 0 {
            return Err(ConfigError("--pool-max-boots must be at least 1".into()));
        }
        Ok(PoolConfig { targets, max_boots: self.pool_max_boots })
    }
}

impl HttpArgs {
    pub fn validate(&self) -> Result<HttpLimits, ConfigError> {
        if self.header_read_timeout_s == 0 || self.body_read_timeout_s == 0 {
            return Err(ConfigError(
                "--header-read-timeout-s and --body-read-timeout-s must be at least 1 (slow clients would hold \
                 connections forever)"
                    .into(),
            ));
        }
        if self.rate_limit_per_minute > 0 && self.rate_limit_burst == 0 {
            return Err(ConfigError("--rate-limit-burst must be at least 1 when a rate limit is set".into()));
        }
        Ok(HttpLimits {
            rate_limit: (self.rate_limit_per_minute > 0)
                .then_some(RateLimit { per_minute: self.rate_limit_per_minute, burst: self.rate_limit_burst }),
            header_read_timeout: Duration::from_secs(self.header_read_timeout_s),
            body_read_timeout: Duration::from_secs(self.body_read_timeout_s),
        })
    }
}

/// Per-session defaults and the operator's maximums.
#[derive(Debug, Clone, Args)]
pub struct LimitArgs {
    #[arg(long, env = "KERNELBOX_DEFAULT_MEMORY_MB", default_value_t = 512)]
    pub default_memory_mb: u64,
    #[arg(long, env = "KERNELBOX_MAX_MEMORY_MB", default_value_t = 4096)]
    pub max_memory_mb: u64,
    #[arg(long, env = "KERNELBOX_DEFAULT_CPUS", default_value_t = 1.0)]
    pub default_cpus: f64,
    #[arg(long, env = "KERNELBOX_MAX_CPUS", default_value_t = 2.0)]
    pub max_cpus: f64,
    /// Processes and threads per session.
    #[arg(long, env = "KERNELBOX_PIDS_LIMIT", default_value_t = 256)]
    pub pids_limit: i64,
    /// Largest size of each session's /tmp and of its working directory (both tmpfs, counted in its
    /// memory): each gets at most a quarter of the session's memory, so a full disk is ENOSPC, not an
    /// out-of-memory kill.
    #[arg(long, env = "KERNELBOX_TMPFS_MB", default_value_t = 256)]
    pub tmpfs_mb: u64,
    /// Default execution timeout, seconds.
    #[arg(long, env = "KERNELBOX_DEFAULT_TIMEOUT_S", default_value_t = 60)]
    pub default_timeout_s: u64,
    #[arg(long, env = "KERNELBOX_MAX_TIMEOUT_S", default_value_t = 3600)]
    pub max_timeout_s: u64,
    /// Sessions with no execution for this long are removed.
    #[arg(long, env = "KERNELBOX_DEFAULT_IDLE_TIMEOUT_S", default_value_t = 3600)]
    pub default_idle_timeout_s: u64,
    #[arg(long, env = "KERNELBOX_MAX_IDLE_TIMEOUT_S", default_value_t = 86400)]
    pub max_idle_timeout_s: u64,
    /// Sessions older than this are removed, busy or not.
    #[arg(long, env = "KERNELBOX_MAX_LIFETIME_S", default_value_t = 86400)]
    pub max_lifetime_s: u64,
    #[arg(long, env = "KERNELBOX_MAX_SESSIONS", default_value_t = 100)]
    pub max_sessions: usize,
    #[arg(long, env = "KERNELBOX_MAX_SESSIONS_PER_OWNER", default_value_t = 20)]
    pub max_sessions_per_owner: usize,
    /// Executions waiting per session before 429.
    #[arg(long, env = "KERNELBOX_QUEUE_DEPTH", default_value_t = 8)]
    pub queue_depth: usize,
    /// Output kept per execution, bytes.
    #[arg(long, env = "KERNELBOX_OUTPUT_LIMIT_BYTES", default_value_t = 1 << 20)]
    pub output_limit_bytes: usize,
    /// Largest file a client may upload into a session, MiB (then 413). The session's disk limit holds too.
    #[arg(long, env = "KERNELBOX_MAX_UPLOAD_MB", default_value_t = 100)]
    pub max_upload_mb: u64,
    /// How long an interrupted kernel gets before it is restarted, seconds.
    #[arg(long, env = "KERNELBOX_INTERRUPT_GRACE_S", default_value_t = 5)]
    pub interrupt_grace_s: u64,
    /// How long a kernel may take to boot, seconds.
    #[arg(long, env = "KERNELBOX_START_TIMEOUT_S", default_value_t = 90)]
    pub start_timeout_s: u64,
    /// How often the idle reaper runs, seconds.
    #[arg(long, env = "KERNELBOX_REAP_INTERVAL_S", default_value_t = 30)]
    pub reap_interval_s: u64,
    /// Automatic restarts of a kernel that died on its own, at most this many within
    /// --auto-restart-window-s (then the session stays dead); 0 turns them off for every session.
    #[arg(long, env = "KERNELBOX_AUTO_RESTART_LIMIT", default_value_t = 5)]
    pub auto_restart_limit: usize,
    /// The window of --auto-restart-limit, seconds.
    #[arg(long, env = "KERNELBOX_AUTO_RESTART_WINDOW_S", default_value_t = 300)]
    pub auto_restart_window_s: u64,
}

/// The checked session limits the service runs with.
#[derive(Debug, Clone)]
pub struct Limits {
    pub default_memory_mb: u64,
    pub max_memory_mb: u64,
    pub default_cpus: f64,
    pub max_cpus: f64,
    pub pids_limit: i64,
    pub tmpfs_mb: u64,
    pub default_timeout: Duration,
    pub max_timeout: Duration,
    pub default_idle_timeout: Duration,
    pub max_idle_timeout: Duration,
    pub max_lifetime: Duration,
    pub max_sessions: usize,
    pub max_sessions_per_owner: usize,
    pub queue_depth: usize,
    pub output_limit_bytes: usize,
    pub max_upload_bytes: u64,
    pub interrupt_grace: Duration,
    pub start_timeout: Duration,
    pub reap_interval: Duration,
    /// Automatic restarts of a kernel that died: at most this many within `auto_restart_window`.
    pub auto_restart_limit: usize,
    pub auto_restart_window: Duration,
}

/// A configuration value that cannot work.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration: {0}")]
pub struct ConfigError(pub String);

impl LimitArgs {
    pub fn validate(&self) -> Result<Limits, ConfigError> {
        let check = |ok: bool, what: &str| {
            if ok { Ok(()) } else { Err(ConfigError(what.to_owned())) }
        };
        check(self.default_memory_mb >= 64, "--default-memory-mb must be at least 64")?;
        check(self.default_memory_mb <= self.max_memory_mb, "--default-memory-mb is above --max-memory-mb")?;
        check(
            self.default_cpus > 0.0 && self.default_cpus <= self.max_cpus,
            "--default-cpus must be in (0, --max-cpus]",
        )?;
        check(self.pids_limit >= 16, "--pids-limit must be at least 16")?;
        check(
            self.default_timeout_s >= 1 && self.default_timeout_s <= self.max_timeout_s,
            "--default-timeout-s must be in [1, --max-timeout-s]",
        )?;
        check(
            self.default_idle_timeout_s >= 1 && self.default_idle_timeout_s <= self.max_idle_timeout_s,
            "--default-idle-timeout-s must be in [1, --max-idle-timeout-s]",
        )?;
        check(self.max_sessions >= 1 && self.max_sessions_per_owner >= 1, "session maximums must be at least 1")?;
        check(self.queue_depth >= 1, "--queue-depth must be at least 1")?;
        check(self.output_limit_bytes >= 1024, "--output-limit-bytes must be at least 1024")?;
        check(self.max_upload_mb >= 1, "--max-upload-mb must be at least 1")?;
        check(self.reap_interval_s >= 1, "--reap-interval-s must be at least 1")?;
        check(self.auto_restart_window_s >= 1, "--auto-restart-window-s must be at least 1")?;
        let s = Duration::from_secs;
        Ok(Limits {
            default_memory_mb: self.default_memory_mb,
            max_memory_mb: self.max_memory_mb,
            default_cpus: self.default_cpus,
            max_cpus: self.max_cpus,
            pids_limit: self.pids_limit,
            tmpfs_mb: self.tmpfs_mb,
            default_timeout: s(self.default_timeout_s),
            max_timeout: s(self.max_timeout_s),
            default_idle_timeout: s(self.default_idle_timeout_s),
            max_idle_timeout: s(self.max_idle_timeout_s),
            max_lifetime: s(self.max_lifetime_s),
            max_sessions: self.max_sessions,
            max_sessions_per_owner: self.max_sessions_per_owner,
            queue_depth: self.queue_depth,
            output_limit_bytes: self.output_limit_bytes,
            max_upload_bytes: self.max_upload_mb << 20,
            interrupt_grace: s(self.interrupt_grace_s),
            start_timeout: s(self.start_timeout_s),
            reap_interval: s(self.reap_interval_s),
            auto_restart_limit: self.auto_restart_limit,
            auto_restart_window: s(self.auto_restart_window_s),
        })
    }
}

impl ServeArgs {
    /// Refuses to listen beyond loopback without API keys.
    pub fn check_exposure(&self) -> Result<(), ConfigError> {
        if self.api_keys.iter().all(|k| k.trim().is_empty())
            && !self.listen.ip().is_loopback()
            && !self.insecure_no_auth
        {
            return Err(ConfigError(format!(
                "refusing to listen on {} without API keys: set --api-key/KERNELBOX_API_KEYS, or listen on 127.0.0.1",
                self.listen
            )));
        }
        Ok(())
    }
}

/// How many kernels to keep ready per language, and how many may boot at once.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    pub targets: BTreeMap<String, usize>,
    pub max_boots: usize,
}

impl Default for PoolConfig {
    /// No pool.
    fn default() -> Self {
        PoolConfig { targets: BTreeMap::new(), max_boots: 2 }
    }
}

impl PoolConfig {
    /// Parses `python=2,javascript=1` (`none` or an empty string: no pool).
    pub fn parse_targets(spec: &str) -> Result<BTreeMap<String, usize>, String> {
        let mut targets = BTreeMap::new();
        if spec.trim() == "none" {
            return Ok(targets);
        }
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (language, n) = part.split_once('=').ok_or_else(|| format!("`{part}`: expected language=count"))?;
            let n: usize = n.trim().parse().map_err(|_| format!("`{part}`: the count is not a number"))?;
            if n > 64 {
                return Err(format!("`{part}`: at most 64 pooled kernels per language"));
            }
            targets.insert(language.trim().to_owned(), n);
        }
        Ok(targets)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_parse_from_a_short_list() {
        assert_eq!(PoolConfig::parse_targets("").unwrap(), BTreeMap::new());
        assert_eq!(PoolConfig::parse_targets("none").unwrap(), BTreeMap::new());
        let t = PoolConfig::parse_targets("python=2, javascript=0").unwrap();
        assert_eq!(t.get("python"), Some(&2));
        assert_eq!(t.get("javascript"), Some(&0));
        assert!(PoolConfig::parse_targets("python").is_err());
        assert!(PoolConfig::parse_targets("python=x").is_err());
        assert!(PoolConfig::parse_targets("python=65").is_err());
    }

    fn serve(args: &[&str]) -> ServeArgs {
        let mut argv = vec!["kernelbox", "serve"];
        argv.extend_from_slice(args);
        match Cli::try_parse_from(argv).unwrap().command {
            Command::Serve(s) => *s,
            _ => unreachable!(),
        }
    }

    #[test]
    fn defaults_work_with_no_flags() {
        let s = serve(&[]);
        assert!(s.listen.ip().is_loopback());
        assert!(s.check_exposure().is_ok());
        let l = s.limits.validate().unwrap();
        assert_eq!(l.default_idle_timeout, Duration::from_secs(3600));
        assert_eq!(l.output_limit_bytes, 1 << 20);
    }

    #[test]
    fn listening_beyond_loopback_needs_a_key() {
        assert!(serve(&["--listen", "0.0.0.0:8080"]).check_exposure().is_err());
        assert!(serve(&["--listen", "0.0.0.0:8080", "--api-key", "k1,k2"]).check_exposure().is_ok());
        assert_eq!(serve(&["--api-key", "k1,k2"]).api_keys, vec!["k1", "k2"]);
        assert!(serve(&["--listen", "0.0.0.0:8080", "--insecure-no-auth"]).check_exposure().is_ok());
    }

    #[test]
    fn the_rate_limit_is_on_by_default_and_zero_turns_it_off() {
        let http = serve(&[]).http.validate().unwrap();
        assert_eq!(http.rate_limit, Some(RateLimit { per_minute: 600, burst: 60 }));
        assert_eq!(serve(&["--rate-limit-per-minute", "0"]).http.validate().unwrap().rate_limit, None);
        assert!(serve(&["--rate-limit-burst", "0"]).http.validate().is_err());
        assert!(serve(&["--header-read-timeout-s", "0"]).http.validate().is_err());
    }

    #[test]
    fn package_settings_are_checked() {
        let p = serve(&[]).packages.validate(Some("http://index.internal/simple".into())).unwrap();
        assert_eq!(p.network, "bridge");
        assert_eq!(p.index_url.as_deref(), Some("http://index.internal/simple"));
        assert_eq!(p.max_download_bytes, 512 << 20);
        assert!(serve(&["--fetcher-network", "host"]).packages.validate(None).is_err());
        assert!(serve(&["--package-timeout-s", "1"]).packages.validate(None).is_err());
    }

    #[test]
    fn contradictory_limits_are_refused() {
        let s = serve(&["--default-memory-mb", "8192", "--max-memory-mb", "1024"]);
        assert!(s.limits.validate().unwrap_err().to_string().contains("--max-memory-mb"));
    }
}
