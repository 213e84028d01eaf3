//! The egress settings the service runs with (`EgressConfig`), checked from the operator's flags by
//! `config/egress.rs`: the bounds of sessions' lists, the proxy's ranges and limits, the per-session and
//! per-connection bounds of the gates. Here, below `config`, so that the hub and the keeper can hold them.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

use super::allow::NetworkPolicy;

/// The checked egress settings; `None` in the manager's config when the feature is off.
#[derive(Debug, Clone, PartialEq)]
pub struct EgressConfig {
    pub policy: NetworkPolicy,
    /// The operator's ranges (`--egress-allow-cidr`).
    pub allow_cidrs: Vec<IpNet>,
    pub max_connections: usize,
    pub max_bytes: u64,
    pub max_connection_bytes: u64,
    pub idle_timeout: Duration,
    /// The proxy's network; empty: one of its own (`keeper.rs`).
    pub network: String,
    pub proxy_memory_mb: u64,
    /// `.test` names and their addresses (tests only).
    pub test_names: BTreeMap<String, IpAddr>,
    /// The kernelbox binary the proxy runs.
    pub proxy_binary: PathBuf,
    /// Extra names package fetchers may reach.
    pub package_hosts: Vec<String>,
}

impl EgressConfig {
    /// The bounds allow-lists are checked against: with the feature off, `enabled: false`.
    pub fn policy_of(config: Option<&EgressConfig>) -> NetworkPolicy {
        config.map(|c| c.policy.clone()).unwrap_or_default()
    }
}
