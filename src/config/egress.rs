//! The operator's flags for network by name (issue 22): whether sessions may have a network at all (off by
//! default), the names none may reach, how long a list may be, the address ranges the proxy may reach
//! after all, the per-session and per-connection bounds, and the proxy container's own limits
//! (`EgressArgs` → `EgressConfig`).

use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::error::ConfigError;
use crate::egress::addr;
use crate::egress::allow::{HostPattern, NetworkPolicy};
use crate::egress::proxy::config::parse_test_names;
pub use crate::egress::settings::EgressConfig;

/// Network by name: an egress proxy that lets a session reach only the names on its allow-list.
#[derive(Debug, Clone, Args)]
pub struct EgressArgs {
    /// Let sessions ask for a network by name (`"network": {"allow": [...]}`). Off: every session has
    /// no network at all, and asking for one is refused (403).
    #[arg(long = "egress", env = "KERNELBOX_EGRESS")]
    pub enabled: bool,
    /// Names no session may reach, whatever its list says (`example.com`, `*.example.com`; commas).
    #[arg(long = "egress-forbid", env = "KERNELBOX_EGRESS_FORBID", value_delimiter = ',')]
    pub forbid: Vec<String>,
    /// The longest allow-list a session may have.
    #[arg(long = "egress-max-allow", env = "KERNELBOX_EGRESS_MAX_ALLOW", default_value_t = 64)]
    pub max_allow: usize,
    /// Address ranges the proxy may connect to although they are private, loopback or link-local, and
    /// that sessions may name as addresses (`10.1.2.0/24`; commas). None by default.
    #[arg(long = "egress-allow-cidr", env = "KERNELBOX_EGRESS_ALLOW_CIDR", default_value = "")]
    pub allow_cidr: String,
    /// Connections one session may have open at once.
    #[arg(long = "egress-max-connections", env = "KERNELBOX_EGRESS_MAX_CONNECTIONS", default_value_t = 64)]
    pub max_connections: usize,
    /// Bytes one session may move through the proxy in all (both ways), MiB.
    #[arg(long = "egress-max-mb", env = "KERNELBOX_EGRESS_MAX_MB", default_value_t = 4096)]
    pub max_mb: u64,
    /// Bytes one connection may move (both ways), MiB.
    #[arg(long = "egress-max-connection-mb", env = "KERNELBOX_EGRESS_MAX_CONNECTION_MB", default_value_t = 1024)]
    pub max_connection_mb: u64,
    /// A connection with no byte either way for this long is closed, seconds.
    #[arg(long = "egress-idle-timeout-s", env = "KERNELBOX_EGRESS_IDLE_TIMEOUT_S", default_value_t = 120)]
    pub idle_timeout_s: u64,
    /// The Docker network the proxy container joins (its only way out), which the service connects to
    /// it on. Default: one of its own, `kernelbox-egress-<instance>` (a bridge on which containers cannot
    /// reach each other), made at start and removed at stop. With compose, a network the service's
    /// container is on.
    #[arg(long = "egress-network", env = "KERNELBOX_EGRESS_NETWORK", default_value = "")]
    pub network: String,
    /// The proxy container's memory limit, MiB.
    #[arg(long = "egress-proxy-memory-mb", env = "KERNELBOX_EGRESS_PROXY_MEMORY_MB", default_value_t = 256)]
    pub proxy_memory_mb: u64,
    /// For tests only: names under the reserved `.test` domain (which no real name can be) that the
    /// proxy resolves to the given addresses (`allowed.test=172.20.0.5`; commas). Any other name is
    /// refused at start. The address checks still apply.
    #[arg(long = "egress-test-names", env = "KERNELBOX_EGRESS_TEST_NAMES", default_value = "", hide = true)]
    pub test_names: String,
    /// Names package fetchers may reach besides the package index and npm registry (or, without them,
    /// pypi.org, files.pythonhosted.org and registry.npmjs.org), e.g. where a mirror's files are.
    #[arg(long = "egress-package-hosts", env = "KERNELBOX_EGRESS_PACKAGE_HOSTS", value_delimiter = ',')]
    pub package_hosts: Vec<String>,
    /// The kernelbox binary the proxy's image holds (default: this one).
    #[arg(long = "egress-proxy-binary", env = "KERNELBOX_EGRESS_PROXY_BINARY", hide = true)]
    pub proxy_binary: Option<PathBuf>,
}

impl EgressArgs {
    /// The settings when the feature is on; `None` when it is off (every list is then refused: see
    /// [`EgressConfig::policy_of`]).
    pub fn validate(&self) -> Result<Option<EgressConfig>, ConfigError> {
        let invalid = |flag: &str, why: String| ConfigError(format!("--{flag}: {why}"));
        let forbidden = self
            .forbid
            .iter()
            .map(|f| f.trim())
            .filter(|f| !f.is_empty())
            .map(|f| HostPattern::parse(f).map_err(|why| invalid("egress-forbid", format!("`{f}`: {why}"))))
            .collect::<Result<Vec<_>, _>>()?;
        if !(1..=1000).contains(&self.max_allow) {
            return Err(invalid("egress-max-allow", "between 1 and 1000".into()));
        }
        let policy = NetworkPolicy { enabled: self.enabled, max_entries: self.max_allow, forbidden };
        let allow_cidrs = addr::parse_cidrs(&self.allow_cidr).map_err(|why| invalid("egress-allow-cidr", why))?;
        let test_names = parse_test_names(&self.test_names).map_err(|e| invalid("egress-test-names", e.to_string()))?;
        if !self.enabled {
            return Ok(None);
        }
        if self.max_connections == 0 || self.max_connections > 4096 {
            return Err(invalid("egress-max-connections", "between 1 and 4096".into()));
        }
        if self.max_mb == 0 || self.max_connection_mb == 0 {
            return Err(invalid("egress-max-mb", "byte limits must be above 0".into()));
        }
        if self.idle_timeout_s == 0 {
            return Err(invalid("egress-idle-timeout-s", "above 0".into()));
        }
        if self.network == "none" || self.network == "host" {
            return Err(invalid("egress-network", "a Docker bridge network (not none, not host)".into()));
        }
        if self.proxy_memory_mb < 32 {
            return Err(invalid("egress-proxy-memory-mb", "at least 32".into()));
        }
        let config = EgressConfig {
            policy: policy.clone(),
            allow_cidrs,
            max_connections: self.max_connections,
            max_bytes: self.max_mb.saturating_mul(1 << 20),
            max_connection_bytes: self.max_connection_mb.saturating_mul(1 << 20),
            idle_timeout: Duration::from_secs(self.idle_timeout_s),
            network: self.network.trim().to_owned(),
            proxy_memory_mb: self.proxy_memory_mb,
            test_names,
            proxy_binary: self.proxy_binary.clone().unwrap_or_else(|| PathBuf::from("/proc/self/exe")),
            package_hosts: self.package_hosts.iter().map(|h| h.trim().to_owned()).filter(|h| !h.is_empty()).collect(),
        };
        Ok(Some(config))
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        egress: EgressArgs,
    }

    fn parse(args: &[&str]) -> Result<Option<EgressConfig>, ConfigError> {
        Cli::try_parse_from(std::iter::once("kb").chain(args.iter().copied())).unwrap().egress.validate()
    }

    #[test]
    fn networking_is_off_unless_the_operator_turns_it_on() {
        let config = parse(&[]).unwrap();
        assert!(config.is_none() && !EgressConfig::policy_of(config.as_ref()).enabled);
        let config = parse(&["--egress", "--egress-forbid", "*.internal.example,evil.example"]).unwrap().unwrap();
        assert!(config.policy.enabled);
        assert_eq!(config.policy.forbidden.len(), 2);
        assert_eq!(config.max_connections, 64);
    }

    #[test]
    fn bad_operator_settings_stop_the_start() {
        for bad in [
            &["--egress", "--egress-forbid", "*"][..],
            &["--egress", "--egress-allow-cidr", "10.0.0.0/33"],
            &["--egress", "--egress-max-allow", "0"],
            &["--egress", "--egress-network", "host"],
            &["--egress", "--egress-test-names", "pypi.org=10.0.0.1"],
            &["--egress", "--egress-test-names", "allowed.test=nowhere"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn only_names_under_test_can_be_overridden() {
        let config = parse(&["--egress", "--egress-test-names", "allowed.test=172.20.0.5, rebind.test=10.0.0.1"]);
        let names = config.unwrap().unwrap().test_names;
        assert_eq!(names.get("allowed.test"), Some(&"172.20.0.5".parse().unwrap()));
        for bad in ["test=1.2.3.4", "x.test.example=1.2.3.4"] {
            assert!(parse(&["--egress", "--egress-test-names", bad]).is_err(), "{bad}");
        }
    }
}
