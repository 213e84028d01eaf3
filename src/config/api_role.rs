//! The flags of `kernelbox api`: where the agents are, the link's certificates, the cluster-wide limits,
//! and the HTTP settings it shares with `serve`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Args;

use super::{ConfigError, HttpArgs};

#[derive(Debug, Clone, Args)]
pub struct ApiArgs {
    /// Address to listen on.
    #[arg(long, env = "KERNELBOX_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// API keys (comma-separated). With none, the replica refuses to listen beyond loopback.
    #[arg(long = "api-key", env = "KERNELBOX_API_KEYS", value_delimiter = ',', hide_env_values = true)]
    pub api_keys: Vec<String>,
    /// Allow listening beyond loopback without API keys.
    #[arg(long, env = "KERNELBOX_INSECURE_NO_AUTH")]
    pub insecure_no_auth: bool,
    /// The agents' DNS name, resolved every 2 s (e.g. `tasks.kernelbox-agent`).
    #[arg(long, env = "KERNELBOX_AGENTS", conflicts_with = "agent_addrs")]
    pub agents: Option<String>,
    /// The agents' port (with --agents).
    #[arg(long, env = "KERNELBOX_AGENT_PORT", default_value_t = 7443)]
    pub agent_port: u16,
    /// A fixed list of agent addresses instead of a DNS name (comma-separated `host:port`).
    #[arg(long, env = "KERNELBOX_AGENT_ADDRS", value_delimiter = ',')]
    pub agent_addrs: Vec<SocketAddr>,
    /// The DNS name the agents' certificate carries.
    #[arg(long, env = "KERNELBOX_AGENT_SERVER_NAME", default_value = "kernelbox-agent")]
    pub agent_server_name: String,
    /// Seconds without an answer (and out of DNS) before a node is lost and its sessions answer 410;
    /// 0: never (503 while away).
    #[arg(long, env = "KERNELBOX_LOST_AFTER_S", default_value_t = 60)]
    pub lost_after_s: u64,
    /// The image content hash a node must have for a language, `lang=hash` (repeatable, or
    /// comma-separated); a language without one expects the hash most live agents report.
    #[arg(long, env = "KERNELBOX_EXPECTED_IMAGE", value_delimiter = ',')]
    pub expected_image: Vec<String>,
    /// The cluster CA certificate (PEM) the agents' certificates are checked against.
    #[arg(long, env = "KERNELBOX_CLUSTER_CA")]
    pub cluster_ca: Option<PathBuf>,
    /// This replica's client certificate (PEM, API role).
    #[arg(long, env = "KERNELBOX_CLUSTER_CERT")]
    pub cluster_cert: Option<PathBuf>,
    /// This replica's client key (PEM).
    #[arg(long, env = "KERNELBOX_CLUSTER_KEY", hide_env_values = true)]
    pub cluster_key: Option<PathBuf>,
    /// Sessions in the whole cluster (soft: checked from the agents' last reports); none: no cluster cap
    /// (each agent's own cap still holds).
    #[arg(long, env = "KERNELBOX_CLUSTER_MAX_SESSIONS")]
    pub max_sessions: Option<u32>,
    /// Sessions one API key may hold in the whole cluster (soft).
    #[arg(long, env = "KERNELBOX_MAX_SESSIONS_PER_OWNER", default_value_t = 20)]
    pub max_sessions_per_owner: u32,
    /// What a create that names no memory reserves, MiB (the agents' default), for placement.
    #[arg(long, env = "KERNELBOX_DEFAULT_MEMORY_MB", default_value_t = 512)]
    pub default_memory_mb: u64,
    /// What a create that names no CPUs reserves (the agents' default), for placement.
    #[arg(long, env = "KERNELBOX_DEFAULT_CPUS", default_value_t = 1.0)]
    pub default_cpus: f64,
    #[command(flatten)]
    pub http: HttpArgs,
}

/// Where the agents are, checked.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentSource {
    Dns { name: String, port: u16 },
    Static(Vec<SocketAddr>),
}

impl ApiArgs {
    /// Refuses to listen beyond loopback without API keys.
    pub fn check_exposure(&self) -> Result<(), ConfigError> {
        super::check_exposure(self.listen, &self.api_keys, self.insecure_no_auth)
    }

    /// `--agents` or `--agent-addrs`, exactly one.
    pub fn agent_source(&self) -> Result<AgentSource, ConfigError> {
        match (&self.agents, self.agent_addrs.is_empty()) {
            (Some(name), true) if !name.trim().is_empty() => {
                Ok(AgentSource::Dns { name: name.trim().to_owned(), port: self.agent_port })
            }
            (None, false) => Ok(AgentSource::Static(self.agent_addrs.clone())),
            _ => Err(ConfigError("name the agents: --agents <dns name> or --agent-addrs host:port,...".into())),
        }
    }

    /// `--expected-image lang=hash` as a map.
    pub fn expected_images(&self) -> Result<BTreeMap<String, String>, ConfigError> {
        let mut map = BTreeMap::new();
        for entry in self.expected_image.iter().filter(|e| !e.trim().is_empty()) {
            let (lang, hash) = entry
                .split_once('=')
                .map(|(l, h)| (l.trim(), h.trim()))
                .filter(|(l, h)| !l.is_empty() && !h.is_empty())
                .ok_or_else(|| ConfigError(format!("--expected-image {entry:?}: write `language=hash`")))?;
            if map.insert(lang.to_owned(), hash.to_owned()).is_some() {
                return Err(ConfigError(format!("--expected-image names `{lang}` twice")));
            }
        }
        Ok(map)
    }

    pub fn lost_after(&self) -> Duration {
        Duration::from_secs(self.lost_after_s)
    }

    /// The placement defaults and quotas, checked.
    pub fn check_limits(&self) -> Result<(), ConfigError> {
        let ok = self.max_sessions != Some(0)
            && self.max_sessions_per_owner >= 1
            && self.default_memory_mb >= 1
            && self.default_cpus.is_finite()
            && self.default_cpus > 0.0;
        match ok {
            true => Ok(()),
            false => Err(ConfigError(
                "--max-sessions and --max-sessions-per-owner must be at least 1; the defaults positive".into(),
            )),
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::Parser;

    use super::*;
    use crate::config::{Cli, Command};

    fn api(args: &[&str]) -> ApiArgs {
        let cli = Cli::try_parse_from([&["kernelbox", "api"][..], args].concat()).unwrap();
        match cli.command {
            Command::Api(a) => *a,
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_agents_are_named_by_dns_or_by_a_list() {
        let a = api(&["--agents", "tasks.kernelbox-agent"]);
        assert_eq!(a.agent_source().unwrap(), AgentSource::Dns { name: "tasks.kernelbox-agent".into(), port: 7443 });
        let a = api(&["--agent-addrs", "10.0.0.1:7443,10.0.0.2:7443"]);
        assert!(matches!(a.agent_source().unwrap(), AgentSource::Static(v) if v.len() == 2));
        assert!(api(&[]).agent_source().is_err());
        assert!(Cli::try_parse_from(["kernelbox", "api", "--agents", "x", "--agent-addrs", "1.2.3.4:1"]).is_err());
        assert_eq!(api(&[]).lost_after(), Duration::from_secs(60));
        assert_eq!(api(&[]).agent_server_name, "kernelbox-agent");
    }

    #[test]
    fn expected_images_are_language_equals_hash() {
        let a = api(&["--expected-image", "python=abc", "--expected-image", "java=def"]);
        assert_eq!(a.expected_images().unwrap().len(), 2);
        assert!(api(&["--expected-image", "python"]).expected_images().is_err());
        assert!(api(&["--expected-image", "python=a,python=b"]).expected_images().is_err());
    }

    #[test]
    fn without_keys_only_loopback() {
        assert!(api(&["--listen", "0.0.0.0:8080"]).check_exposure().is_err());
        assert!(api(&["--listen", "0.0.0.0:8080", "--api-key", "k"]).check_exposure().is_ok());
        assert!(api(&[]).check_exposure().is_ok());
        assert!(api(&["--max-sessions", "0"]).check_limits().is_err());
    }
}
