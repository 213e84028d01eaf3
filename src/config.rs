//! Command-line and environment configuration: every flag has a `KERNELBOX_*` twin and a default that
//! works on a developer's Docker host. Values are checked here, once, into typed settings.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, Parser, Subcommand, ValueEnum};

mod api_role;
pub mod egress;
mod error;
mod limits;
pub mod oci_runtimes;

pub use api_role::{AgentSource, ApiArgs};
pub use egress::{EgressArgs, EgressConfig};
pub use error::ConfigError;
use limits::rate_limit;
pub use limits::{CostLimits, LimitArgs, Limits};
pub use oci_runtimes::{OciRuntimes, RuntimeRefused};

pub use crate::rate::RateLimit;

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
    /// Serve the API as a cluster replica: no Docker socket; every request routed to the agent that owns
    /// it over mutual TLS.
    Api(Box<ApiArgs>),
    /// Serve one node of a cluster: everything `serve` does, for API replicas only (mutual TLS on
    /// `--cluster-listen`; `--listen` serves /healthz and /readyz only).
    Agent(Box<AgentArgs>),
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
    /// Cluster tools (certificates for the link between API replicas and agents).
    Cluster {
        #[command(subcommand)]
        command: ClusterCommand,
    },
}

#[derive(Debug, Subcommand)]
pub enum ClusterCommand {
    /// Make a cluster CA, the agents' server certificate and the API replicas' client certificate, with
    /// their keys, in a new folder (nothing there is ever overwritten).
    Certs {
        /// Where to write ca.pem, ca-key.pem, agent.pem, agent-key.pem, api.pem and api-key.pem.
        #[arg(long)]
        out: PathBuf,
        /// The agent service's DNS name, which API replicas check the agents' certificate for.
        #[arg(long, default_value = "kernelbox-agent")]
        agent_name: String,
        /// How long the certificates are valid, in days.
        #[arg(long, default_value_t = 365)]
        days: u32,
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

/// `kernelbox agent`: `serve`'s flags, and the cluster's.
#[derive(Debug, Clone, Args)]
pub struct AgentArgs {
    #[command(flatten)]
    pub serve: ServeArgs,
    /// Where API replicas reach this agent (mutual TLS only; never publish this port).
    #[arg(long, env = "KERNELBOX_CLUSTER_LISTEN", default_value = "0.0.0.0:7443")]
    pub cluster_listen: SocketAddr,
    /// The cluster CA's certificate (PEM): API replicas' client certificates must chain to it.
    #[arg(long, env = "KERNELBOX_CLUSTER_CA")]
    pub cluster_ca: Option<PathBuf>,
    /// This agent's server certificate (PEM).
    #[arg(long, env = "KERNELBOX_CLUSTER_CERT")]
    pub cluster_cert: Option<PathBuf>,
    /// This agent's private key (PEM).
    #[arg(long, env = "KERNELBOX_CLUSTER_KEY", hide_env_values = true)]
    pub cluster_key: Option<PathBuf>,
    /// After this long without a request from the API tier, the sessions held through the gap are removed
    /// and their ids answer `session_lost` (0: never). Must exceed Swarm's down detection (~15 s).
    #[arg(long, env = "KERNELBOX_LOST_AFTER_S", default_value_t = 60)]
    pub lost_after_s: u64,
    /// The node's name when the engine is not in a Swarm (tests; other engines). Default: the engine's
    /// Swarm node ID; without either the agent refuses to start.
    #[arg(long, env = "KERNELBOX_NODE_ID")]
    pub node_id: Option<String>,
}

impl AgentArgs {
    /// `--lost-after-s` as a duration (zero: fencing off).
    pub fn lost_after(&self) -> Duration {
        Duration::from_secs(self.lost_after_s)
    }
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
    /// The host folder of datasets, mounted read-only at /mnt/data in every session (default
    /// `<state-dir>/datasets`, made empty; `none`: no /mnt/data). The service makes `output/` in it: the
    /// session API's users' results, `output/<user_id>/`. With compose, the same path inside and outside
    /// the service container.
    #[arg(long, env = "KERNELBOX_DATASETS_DIR", value_parser = StateFolder::parse)]
    pub datasets_dir: Option<StateFolder>,
    /// Where the service keeps each kernel image's runtime tree (its `/usr` and `/opt`, copied out once
    /// and mounted read-only into every session of that image, so their pages are cached once for all;
    /// default `<state-dir>/runtimes`; `none`: sessions read the image's own files). With compose, the
    /// same path inside and outside the service container.
    #[arg(long, env = "KERNELBOX_RUNTIMES_DIR", value_parser = StateFolder::parse)]
    pub runtimes_dir: Option<StateFolder>,
    /// The most the session API's output folder keeps per user (`<datasets>/output/<user_id>/`), MiB;
    /// files past it are not copied out (the execution says so).
    #[arg(long, env = "KERNELBOX_USER_OUTPUT_MAX_MB", default_value_t = 256)]
    pub user_output_max_mb: u64,
    /// The most files the session API's output folder keeps per user.
    #[arg(long, env = "KERNELBOX_USER_OUTPUT_MAX_FILES", default_value_t = 1000)]
    pub user_output_max_files: u64,
    /// Kernels kept booted ahead of demand per language: `python=2` (always two), or `python=2..8`
    /// (at least two, more while creates come faster, back to two after a quiet spell); several with
    /// commas (`none`: no pool). A session whose request fits (no `env`; memory that keeps the same tmpfs
    /// size) starts from it. `python@runsc=1`: a pool of python kernels under another runtime than
    /// python's default, for the sessions that ask for it.
    #[arg(long, env = "KERNELBOX_POOL", default_value = "python=2..8")]
    pub pool: String,
    /// How many pooled kernels may boot at once (all languages together).
    #[arg(long, env = "KERNELBOX_POOL_MAX_BOOTS", default_value_t = 2)]
    pub pool_max_boots: usize,
    /// The memory all idle pooled kernels may take together, MiB (each counts --default-memory-mb): the
    /// floors must fit; what adapts shares the rest.
    #[arg(long, env = "KERNELBOX_POOL_MEMORY_MB", default_value_t = 4096)]
    pub pool_memory_mb: u64,
    /// How long a pool stays above its floor after its last burst of creates, seconds.
    #[arg(long, env = "KERNELBOX_POOL_QUIET_S", default_value_t = 120)]
    pub pool_quiet_s: u64,
    #[command(flatten)]
    pub limits: LimitArgs,
    #[command(flatten)]
    pub packages: PackageArgs,
    #[command(flatten)]
    pub http: HttpArgs,
    #[command(flatten)]
    pub files: FileStoreArgs,
    #[command(flatten)]
    pub links: SignedUrlArgs,
    #[command(flatten)]
    pub images: ImageArgs,
    #[command(flatten)]
    pub egress: EgressArgs,
}

/// A folder the service keeps (the datasets folder, the runtime trees): `<state-dir>/<name>` unless the
/// operator names one, or none at all.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum StateFolder {
    /// `<state-dir>/<name>`, made (empty) at start-up.
    #[default]
    InStateDir,
    /// No such folder: the feature it serves is off.
    Off,
    /// The operator's folder (absolute).
    At(PathBuf),
}

impl StateFolder {
    /// `none`, or an absolute path.
    pub fn parse(raw: &str) -> Result<StateFolder, String> {
        match raw.trim() {
            "none" => Ok(StateFolder::Off),
            "" => Err("an empty path: name a folder, or `none`".into()),
            path if path.starts_with('/') => Ok(StateFolder::At(PathBuf::from(path))),
            _ => Err("an absolute path, or `none`".into()),
        }
    }

    /// The folder, for a state directory `state_dir` where it is `<state_dir>/<name>` by default.
    pub fn resolve(&self, state_dir: &std::path::Path, name: &str) -> Option<PathBuf> {
        match self {
            StateFolder::InStateDir => Some(state_dir.join(name)),
            StateFolder::Off => None,
            StateFolder::At(dir) => Some(dir.clone()),
        }
    }
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
    /// Requests of any kind per minute per API key (per client IP when no keys are configured); 0, the
    /// default, turns this limit off (what costs has limits of its own: --create-limit-per-minute, ...).
    #[arg(long, env = "KERNELBOX_RATE_LIMIT_PER_MINUTE", default_value_t = 0)]
    pub rate_limit_per_minute: u64,
    /// Requests a key may make at once, above its per-minute rate, before it is slowed down.
    #[arg(long, env = "KERNELBOX_RATE_LIMIT_BURST", default_value_t = 60)]
    pub rate_limit_burst: u64,
    /// MCP sessions held at once, all keys together (an idle one is closed after 10 minutes).
    #[arg(long, env = "KERNELBOX_MAX_MCP_SESSIONS", default_value_t = 1024)]
    pub max_mcp_sessions: usize,
    /// MCP sessions one API key may hold; past it, its least recently used idle one is closed.
    #[arg(long, env = "KERNELBOX_MAX_MCP_SESSIONS_PER_KEY", default_value_t = 256)]
    pub max_mcp_sessions_per_key: usize,
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

/// Signed file URLs: the links `/jupyter` and `/v1` return for files, which open without the API key until
/// they expire (see `links.rs`).
#[derive(Debug, Clone, Args)]
pub struct SignedUrlArgs {
    /// The secret file links are signed with (at least 32 bytes; several replicas behind one address
    /// share it). Default: one made once and kept in `<state-dir>/url-signing-secret`.
    #[arg(long, env = "KERNELBOX_SIGNED_URL_SECRET", hide_env_values = true)]
    pub signed_url_secret: Option<String>,
    /// The longest a signed file link lives, seconds (never longer than its file or session); 0: links
    /// are not signed and every download needs the key.
    #[arg(long, env = "KERNELBOX_SIGNED_URL_MAX_S", default_value_t = 2 * 24 * 3600)]
    pub signed_url_max_s: u64,
}

/// A secret that never shows in logs or `Debug` output.
#[derive(Clone)]
pub struct Secret(pub String);

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// The checked signed-URL settings.
#[derive(Debug, Clone)]
pub struct SignedUrlSettings {
    /// `None`: the secret kept in the state directory.
    pub secret: Option<Secret>,
    /// `None`: links are not signed.
    pub max_lifetime: Option<Duration>,
}

impl SignedUrlArgs {
    pub fn validate(&self) -> Result<SignedUrlSettings, ConfigError> {
        let secret = self.signed_url_secret.clone().filter(|s| !s.is_empty());
        if secret.as_ref().is_some_and(|s| s.trim().len() < 32) {
            return Err(ConfigError(
                "--signed-url-secret must be at least 32 bytes (e.g. `openssl rand -hex 32`)".into(),
            ));
        }
        Ok(SignedUrlSettings {
            secret: secret.map(Secret),
            max_lifetime: (self.signed_url_max_s > 0).then(|| Duration::from_secs(self.signed_url_max_s)),
        })
    }
}

/// The checked HTTP settings.
#[derive(Debug, Clone)]
pub struct HttpLimits {
    /// The request limit; `None`: off.
    pub rate_limit: Option<RateLimit>,
    pub mcp_sessions: McpSessionLimits,
    pub header_read_timeout: Duration,
    pub body_read_timeout: Duration,
}

/// How many MCP sessions are held at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct McpSessionLimits {
    pub total: usize,
    pub per_key: usize,
}

impl ServeArgs {
    /// The checked pool settings.
    pub fn pool_config(&self) -> Result<PoolConfig, ConfigError> {
        let bounds = PoolConfig::parse_bounds(&self.pool).map_err(|e| ConfigError(format!("--pool: {e}")))?;
        // `language@runtime`: a pool of kernels under another runtime than the language's default, which
        // sessions of the language must be allowed to ask for.
        let runtimes = self.limits.validate()?.runtimes;
        for pool in bounds.keys() {
            let (language, Some(runtime)) = PoolConfig::split_pool(pool) else { continue };
            if runtimes.default_for(language) == runtime {
                return Err(ConfigError(format!(
                    "--pool: `{pool}`: `{runtime}` is {language}'s own runtime; its pool is `{language}`"
                )));
            }
            if !runtimes.allowed_for(language).iter().any(|r| r == runtime) {
                return Err(ConfigError(format!(
                    "--pool: `{pool}`: {language} sessions may not run under `{runtime}` (see --runtime and \
                     --session-runtimes)"
                )));
            }
        }
        if self.pool_max_boots == 0 {
            return Err(ConfigError("--pool-max-boots must be at least 1".into()));
        }
        if self.pool_quiet_s == 0 {
            return Err(ConfigError("--pool-quiet-s must be at least 1".into()));
        }
        let floors: u64 = bounds.values().map(|b| b.floor as u64).sum();
        let floors_mb = floors.saturating_mul(self.limits.default_memory_mb);
        if floors_mb > self.pool_memory_mb {
            return Err(ConfigError(format!(
                "--pool: the floors ({floors} kernels of --default-memory-mb {} MiB) need {floors_mb} MiB, more than \
                 --pool-memory-mb {}",
                self.limits.default_memory_mb, self.pool_memory_mb
            )));
        }
        Ok(PoolConfig {
            bounds,
            max_boots: self.pool_max_boots,
            memory_mb: self.pool_memory_mb,
            quiet: Duration::from_secs(self.pool_quiet_s),
        })
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
        if self.max_mcp_sessions == 0 || self.max_mcp_sessions_per_key == 0 {
            return Err(ConfigError("--max-mcp-sessions and --max-mcp-sessions-per-key must be at least 1".into()));
        }
        Ok(HttpLimits {
            rate_limit: rate_limit("--rate-limit", self.rate_limit_per_minute, self.rate_limit_burst)?,
            mcp_sessions: McpSessionLimits {
                total: self.max_mcp_sessions,
                per_key: self.max_mcp_sessions_per_key.min(self.max_mcp_sessions),
            },
            header_read_timeout: Duration::from_secs(self.header_read_timeout_s),
            body_read_timeout: Duration::from_secs(self.body_read_timeout_s),
        })
    }
}

impl ServeArgs {
    /// Refuses to listen beyond loopback without API keys.
    pub fn check_exposure(&self) -> Result<(), ConfigError> {
        check_exposure(self.listen, &self.api_keys, self.insecure_no_auth)
    }
}

/// Refuses to listen beyond loopback without API keys, unless told it is safe (`--insecure-no-auth`):
/// the rule of every role that takes API keys (`serve`, `api`).
fn check_exposure(listen: SocketAddr, api_keys: &[String], insecure_no_auth: bool) -> Result<(), ConfigError> {
    if api_keys.iter().all(|k| k.trim().is_empty()) && !listen.ip().is_loopback() && !insecure_no_auth {
        return Err(ConfigError(format!(
            "refusing to listen on {listen} without API keys: set --api-key/KERNELBOX_API_KEYS, or listen on 127.0.0.1"
        )));
    }
    Ok(())
}

/// How many kernels to keep ready per language, and how many may boot at once.
#[derive(Debug, Clone, PartialEq)]
pub struct PoolConfig {
    /// Per language: the floor and ceiling of its pool's target.
    pub bounds: BTreeMap<String, PoolBounds>,
    pub max_boots: usize,
    /// The memory all idle pooled kernels may take together, MiB.
    pub memory_mb: u64,
    /// How long a target stays up after the creates that raised it.
    pub quiet: Duration,
}

/// One language's pool: `floor` kernels kept ready always, up to `ceiling` while creates come fast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolBounds {
    pub floor: usize,
    pub ceiling: usize,
}

impl PoolBounds {
    /// A pool of exactly `n`.
    pub fn fixed(n: usize) -> Self {
        PoolBounds { floor: n, ceiling: n }
    }
}

impl Default for PoolConfig {
    /// No pool.
    fn default() -> Self {
        PoolConfig { bounds: BTreeMap::new(), max_boots: 2, memory_mb: 4096, quiet: Duration::from_secs(120) }
    }
}

impl PoolConfig {
    /// A pool of exactly `n` kernels of each of `languages` (tests, and `--pool lang=n`).
    pub fn fixed<'a>(languages: impl IntoIterator<Item = (&'a str, usize)>, max_boots: usize) -> Self {
        let bounds = languages.into_iter().map(|(l, n)| (l.to_owned(), PoolBounds::fixed(n))).collect();
        PoolConfig { bounds, max_boots, ..PoolConfig::default() }
    }

    /// A pool's name as its language and, for `language@runtime`, the runtime (`None`: the language's own).
    pub fn split_pool(pool: &str) -> (&str, Option<&str>) {
        match pool.split_once('@') {
            Some((language, runtime)) => (language, Some(runtime)),
            None => (pool, None),
        }
    }

    /// Parses `python=2,javascript=0..3,python@runsc=1` (`none` or an empty string: no pool). A pool is a
    /// language (under its default runtime) or `language@runtime`.
    pub fn parse_bounds(spec: &str) -> Result<BTreeMap<String, PoolBounds>, String> {
        let mut bounds = BTreeMap::new();
        if spec.trim() == "none" {
            return Ok(bounds);
        }
        for part in spec.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (language, n) = part
                .split_once('=')
                .ok_or_else(|| format!("`{part}`: expected language=count or language=min..max"))?;
            let count = |n: &str| -> Result<usize, String> {
                let n: usize = n.trim().parse().map_err(|_| format!("`{part}`: the count is not a number"))?;
                if n > 64 { Err(format!("`{part}`: at most 64 pooled kernels per language")) } else { Ok(n) }
            };
            let b = match n.split_once("..") {
                Some((floor, ceiling)) => PoolBounds { floor: count(floor)?, ceiling: count(ceiling)? },
                None => PoolBounds::fixed(count(n)?),
            };
            if b.floor > b.ceiling {
                return Err(format!("`{part}`: the floor is above the ceiling"));
            }
            bounds.insert(language.trim().to_owned(), b);
        }
        Ok(bounds)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pool_bounds_parse_from_a_short_list() {
        assert_eq!(PoolConfig::parse_bounds("").unwrap(), BTreeMap::new());
        assert_eq!(PoolConfig::parse_bounds("none").unwrap(), BTreeMap::new());
        let t = PoolConfig::parse_bounds("python=2, javascript=0, java=1..4").unwrap();
        assert_eq!(t.get("python"), Some(&PoolBounds::fixed(2)));
        assert_eq!(t.get("javascript"), Some(&PoolBounds::fixed(0)));
        assert_eq!(t.get("java"), Some(&PoolBounds { floor: 1, ceiling: 4 }));
        for bad in ["python", "python=x", "python=65", "python=3..2", "python=1..65", "python=..2"] {
            assert!(PoolConfig::parse_bounds(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn the_pools_floors_must_fit_their_memory_budget() {
        let ok = serve(&["--pool", "python=2..8", "--pool-memory-mb", "1024"]).pool_config().unwrap();
        assert_eq!(ok.bounds["python"], PoolBounds { floor: 2, ceiling: 8 });
        assert_eq!(ok.memory_mb, 1024);
        let err = serve(&["--pool", "python=3..8", "--pool-memory-mb", "1024"]).pool_config().unwrap_err();
        assert!(err.0.contains("1536 MiB"), "{err}");
    }

    #[test]
    fn a_pool_under_another_runtime_needs_sessions_allowed_to_ask_for_it() {
        let ok = serve(&["--pool", "python=1,python@runsc=1", "--session-runtimes", "runsc"]).pool_config().unwrap();
        assert_eq!(ok.bounds["python@runsc"], PoolBounds::fixed(1));
        let err = serve(&["--pool", "python@runsc=1"]).pool_config().unwrap_err();
        assert!(err.0.contains("may not run under `runsc`"), "{err}");
        let err = serve(&["--pool", "python@runc=1"]).pool_config().unwrap_err();
        assert!(err.0.contains("its pool is `python`"), "{err}");
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
    fn cluster_certs_needs_a_folder_and_defaults_the_rest() {
        let parse = |args: &[&str]| Cli::try_parse_from([&["kernelbox", "cluster", "certs"], args].concat());
        assert!(parse(&[]).is_err(), "--out is required");
        let Command::Cluster { command: ClusterCommand::Certs { out, agent_name, days } } =
            parse(&["--out", "/tmp/c"]).unwrap().command
        else {
            unreachable!()
        };
        assert_eq!((out, agent_name.as_str(), days), (PathBuf::from("/tmp/c"), "kernelbox-agent", 365));
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
    fn what_costs_is_limited_by_default_every_request_only_when_asked_and_zero_turns_a_limit_off() {
        let http = serve(&[]).http.validate().unwrap();
        assert_eq!(http.rate_limit, None, "executes, reads and lists are not rate-limited by default");
        assert_eq!(http.mcp_sessions, McpSessionLimits { total: 1024, per_key: 256 });
        let asked = serve(&["--rate-limit-per-minute", "600"]).http.validate().unwrap();
        assert_eq!(asked.rate_limit, Some(RateLimit { per_minute: 600, burst: 60 }));
        assert!(serve(&["--rate-limit-per-minute", "600", "--rate-limit-burst", "0"]).http.validate().is_err());
        assert!(serve(&["--header-read-timeout-s", "0"]).http.validate().is_err());
        assert!(serve(&["--max-mcp-sessions-per-key", "0"]).http.validate().is_err());

        let costs = serve(&[]).limits.validate().unwrap().costs;
        assert_eq!(costs.creates, Some(RateLimit { per_minute: 120, burst: 60 }));
        assert_eq!(costs.installs, Some(RateLimit { per_minute: 120, burst: 60 }));
        assert_eq!(costs.upload_bytes, Some(RateLimit { per_minute: 1 << 30, burst: 1 << 30 }));
        let off = serve(&[
            "--create-limit-per-minute",
            "0",
            "--install-limit-per-minute",
            "0",
            "--upload-limit-mb-per-minute",
            "0",
        ]);
        assert_eq!(
            off.limits.validate().unwrap().costs,
            CostLimits { creates: None, installs: None, upload_bytes: None }
        );
        let e = serve(&["--create-limit-burst", "0"]).limits.validate().unwrap_err();
        assert!(e.to_string().contains("--create-limit-burst"), "{e}");
        let small = serve(&["--upload-limit-mb-burst", "50", "--max-upload-mb", "200"]).limits.validate().unwrap();
        assert_eq!(small.costs.upload_bytes.unwrap().burst, 200 << 20, "the largest upload always fits");
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
    fn signed_urls_are_on_by_default_and_their_secret_is_checked() {
        let links = serve(&[]).links.validate().unwrap();
        assert_eq!(links.max_lifetime, Some(Duration::from_secs(2 * 86400)));
        assert!(links.secret.is_none(), "made and kept in the state directory");
        assert_eq!(serve(&["--signed-url-max-s", "0"]).links.validate().unwrap().max_lifetime, None);
        assert!(serve(&["--signed-url-secret", "too short"]).links.validate().is_err());
        let secret = "s".repeat(32);
        let links = serve(&["--signed-url-secret", &secret]).links.validate().unwrap();
        assert!(!format!("{links:?}").contains(&secret), "the secret never shows in Debug output");
    }

    #[test]
    fn the_datasets_folder_is_in_the_state_dir_unless_named_or_off() {
        let state = std::path::Path::new("/var/lib/kernelbox");
        let dir = |args: &[&str]| serve(args).datasets_dir.unwrap_or_default().resolve(state, "datasets");
        assert_eq!(dir(&[]), Some(PathBuf::from("/var/lib/kernelbox/datasets")));
        assert_eq!(dir(&["--datasets-dir", "none"]), None);
        assert_eq!(dir(&["--datasets-dir", "/srv/data"]), Some(PathBuf::from("/srv/data")));
        for bad in ["", "relative/data"] {
            let argv = ["kernelbox", "serve", "--datasets-dir", bad];
            assert!(Cli::try_parse_from(argv).is_err(), "{bad:?}");
        }
        let s = serve(&[]);
        assert_eq!((s.user_output_max_mb, s.user_output_max_files), (256, 1000));
    }

    #[test]
    fn contradictory_limits_are_refused() {
        let s = serve(&["--default-memory-mb", "8192", "--max-memory-mb", "1024"]);
        assert!(s.limits.validate().unwrap_err().to_string().contains("--max-memory-mb"));
    }
}
