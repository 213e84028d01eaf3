//! The per-session limits and the operator's maximums (`LimitArgs` → `Limits`), and the per-key limits on
//! what costs (`CostLimits`): the flags a session's resources, queues, lifetimes and restarts come from.

use std::time::Duration;

use clap::Args;

use super::error::ConfigError;
use super::oci_runtimes::OciRuntimes;
use crate::rate::RateLimit;

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
    /// The most memory all sessions together may be given, MiB (each session's `memory_mb` counts; 0: no
    /// limit beyond --max-sessions × --max-memory-mb). A create past it is 429. On a cluster's agent, this
    /// is the node's capacity that placement weighs.
    #[arg(long, env = "KERNELBOX_MAX_TOTAL_MEMORY_MB", default_value_t = 0)]
    pub max_total_memory_mb: u64,
    /// The most CPUs all sessions together may be given (0: no limit beyond --max-sessions × --max-cpus).
    #[arg(long, env = "KERNELBOX_MAX_TOTAL_CPUS", default_value_t = 0.0)]
    pub max_total_cpus: f64,
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
    /// Sessions one API key may create per minute (every API's creates, `/jupyter/execute`'s included);
    /// 0 turns the limit off.
    #[arg(long, env = "KERNELBOX_CREATE_LIMIT_PER_MINUTE", default_value_t = 120)]
    pub create_limit_per_minute: u64,
    /// Creates one API key may make at once, above its per-minute rate.
    #[arg(long, env = "KERNELBOX_CREATE_LIMIT_BURST", default_value_t = 60)]
    pub create_limit_burst: u64,
    /// Package installs one API key may run per minute; 0 turns the limit off.
    #[arg(long, env = "KERNELBOX_INSTALL_LIMIT_PER_MINUTE", default_value_t = 120)]
    pub install_limit_per_minute: u64,
    /// Installs one API key may run at once, above its per-minute rate.
    #[arg(long, env = "KERNELBOX_INSTALL_LIMIT_BURST", default_value_t = 60)]
    pub install_limit_burst: u64,
    /// MiB one API key may upload per minute (into sessions and the `/jupyter` file store); 0 turns the
    /// limit off.
    #[arg(long, env = "KERNELBOX_UPLOAD_LIMIT_MB_PER_MINUTE", default_value_t = 1024)]
    pub upload_limit_mb_per_minute: u64,
    /// MiB one API key may upload at once, above its per-minute rate (never less than --max-upload-mb).
    #[arg(long, env = "KERNELBOX_UPLOAD_LIMIT_MB_BURST", default_value_t = 1024)]
    pub upload_limit_mb_burst: u64,
    /// Automatic restarts of a kernel that died on its own, at most this many within
    /// --auto-restart-window-s (then the session stays dead); 0 turns them off for every session.
    #[arg(long, env = "KERNELBOX_AUTO_RESTART_LIMIT", default_value_t = 5)]
    pub auto_restart_limit: usize,
    /// The window of --auto-restart-limit, seconds.
    #[arg(long, env = "KERNELBOX_AUTO_RESTART_WINDOW_S", default_value_t = 300)]
    pub auto_restart_window_s: u64,
    /// The OCI runtime each language's sessions run under, as registered with the Docker engine:
    /// `python=runsc,*=runc` (`*`: every language not named). Default: `runc` for all. gVisor (`runsc`)
    /// must be registered with `--network=none` and `--fsgofer-host-uds` (README).
    #[arg(long = "runtime", env = "KERNELBOX_RUNTIME", default_value = "")]
    pub runtime: String,
    /// Runtimes a session may ask for by name (`"runtime"` at create), beyond its language's default:
    /// e.g. `runsc`. Default: none.
    #[arg(long, env = "KERNELBOX_SESSION_RUNTIMES", default_value = "")]
    pub session_runtimes: String,
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
    /// What all sessions together may be given: memory (MiB) and CPUs.
    pub max_total_memory_mb: u64,
    pub max_total_cpus: f64,
    pub queue_depth: usize,
    pub output_limit_bytes: usize,
    pub max_upload_bytes: u64,
    pub interrupt_grace: Duration,
    pub start_timeout: Duration,
    pub reap_interval: Duration,
    /// Per-key limits on what costs: creates, installs, upload bytes.
    pub costs: CostLimits,
    /// Automatic restarts of a kernel that died: at most this many within `auto_restart_window`.
    pub auto_restart_limit: usize,
    pub auto_restart_window: Duration,
    /// The OCI runtime each session runs under, and those a session may ask for.
    pub runtimes: OciRuntimes,
}

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
        check(
            self.max_total_memory_mb == 0 || self.max_total_memory_mb >= self.max_memory_mb,
            "--max-total-memory-mb must be 0 (no limit) or at least --max-memory-mb",
        )?;
        check(
            self.max_total_cpus == 0.0 || (self.max_total_cpus.is_finite() && self.max_total_cpus >= self.max_cpus),
            "--max-total-cpus must be 0 (no limit) or at least --max-cpus",
        )?;
        check(self.queue_depth >= 1, "--queue-depth must be at least 1")?;
        check(self.output_limit_bytes >= 1024, "--output-limit-bytes must be at least 1024")?;
        check(self.max_upload_mb >= 1, "--max-upload-mb must be at least 1")?;
        check(self.reap_interval_s >= 1, "--reap-interval-s must be at least 1")?;
        let costs = CostLimits {
            creates: rate_limit("--create-limit", self.create_limit_per_minute, self.create_limit_burst)?,
            installs: rate_limit("--install-limit", self.install_limit_per_minute, self.install_limit_burst)?,
            upload_bytes: rate_limit(
                "--upload-limit-mb",
                self.upload_limit_mb_per_minute.saturating_mul(1 << 20),
                // An upload of the largest size always fits in a full bucket.
                self.upload_limit_mb_burst.max(self.max_upload_mb).saturating_mul(1 << 20),
            )?,
        };
        check(self.auto_restart_window_s >= 1, "--auto-restart-window-s must be at least 1")?;
        let languages: Vec<&str> = crate::images::catalog::LANGUAGES.iter().map(|(name, _)| *name).collect();
        let runtimes = OciRuntimes::parse(&self.runtime, &self.session_runtimes, &languages)?;
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
            max_total_memory_mb: match self.max_total_memory_mb {
                0 => self.max_memory_mb.saturating_mul(self.max_sessions as u64),
                n => n,
            },
            max_total_cpus: if self.max_total_cpus == 0.0 {
                self.max_cpus * self.max_sessions as f64
            } else {
                self.max_total_cpus
            },
            queue_depth: self.queue_depth,
            output_limit_bytes: self.output_limit_bytes,
            max_upload_bytes: self.max_upload_mb << 20,
            interrupt_grace: s(self.interrupt_grace_s),
            start_timeout: s(self.start_timeout_s),
            reap_interval: s(self.reap_interval_s),
            costs,
            auto_restart_limit: self.auto_restart_limit,
            auto_restart_window: s(self.auto_restart_window_s),
            runtimes,
        })
    }
}

/// The per-key limits on what costs (`None`: that limit is off); upload amounts in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CostLimits {
    pub creates: Option<RateLimit>,
    pub installs: Option<RateLimit>,
    pub upload_bytes: Option<RateLimit>,
}

/// A token bucket from its two flags (`<flag>-per-minute`, `<flag>-burst`): `None` when the rate is 0.
pub(super) fn rate_limit(flag: &str, per_minute: u64, burst: u64) -> Result<Option<RateLimit>, ConfigError> {
    match (per_minute, burst) {
        (0, _) => Ok(None),
        (_, 0) => Err(ConfigError(format!("{flag}-burst must be at least 1 when {flag}-per-minute is set"))),
        (per_minute, burst) => Ok(Some(RateLimit { per_minute, burst })),
    }
}
