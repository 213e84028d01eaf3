//! A package fetcher through the egress proxy (issue 22), when the operator offers networks by name: the
//! fetcher then has no network either (`--network none`), only the proxy port of its own `start-kernel
//! --proxy-only`, relayed to a gate the service binds in a folder of its own (`<state>/fetchers/<id>`,
//! mounted read-only at `/kernel`, as a session's run directory is), with an allow-list of the package
//! indexes alone: the configured index and registry (or pip's and Deno's defaults) and the names the
//! operator adds. A fetcher behind an upstream proxy of the operator's (`--package-proxy`) keeps its
//! network: the egress proxy does not chain to another.

use std::os::unix::fs::DirBuilderExt;
use std::path::PathBuf;
use std::sync::Arc;

use crate::egress::allow::{AllowList, NetworkPolicy};
use crate::egress::gate::{self, Gate};
use crate::egress::hub::EgressHub;
use crate::egress::session::{NetworkReport, SessionEgress};

use super::settings::PackageConfig;

/// Where fetchers' gates live, and the hub they go through.
pub struct FetchEgress {
    pub hub: Arc<EgressHub>,
    /// `<state>/fetchers` (0700; each fetch's folder 0755, the service's alone).
    pub dir: PathBuf,
    /// The package indexes' names.
    pub allow: AllowList,
}

/// The hosts fetchers need: the index's (else PyPI's two), the npm registry's (else npmjs's), the
/// operator's extra names.
pub fn index_hosts(config: &PackageConfig, extra: &[String]) -> Vec<String> {
    let host = |url: &str| {
        let rest = url.split_once("://").map_or(url, |(_, r)| r);
        let authority = rest.split(['/', '?', '#']).next().unwrap_or_default();
        let authority = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        authority.to_ascii_lowercase()
    };
    let mut hosts = match &config.index_url {
        Some(url) => vec![host(url)],
        None => vec!["pypi.org".to_owned(), "files.pythonhosted.org".to_owned()],
    };
    match &config.npm_registry {
        Some(url) => hosts.push(host(url)),
        None => hosts.push("registry.npmjs.org".to_owned()),
    }
    hosts.extend(extra.iter().cloned());
    hosts.dedup();
    hosts
}

impl FetchEgress {
    /// The fetchers' list, checked as a session's would be (a name the operator forbids is left out).
    /// Folders an earlier run left in `dir` are removed (no fetch outlives its service).
    pub fn new(hub: Arc<EgressHub>, dir: PathBuf, hosts: &[String]) -> FetchEgress {
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(dir = %dir.display(), error = %e, "could not clear the fetchers' gates of an earlier run");
        }
        let policy = NetworkPolicy { max_entries: usize::MAX, ..hub.policy().clone() };
        let allowed: Vec<String> =
            hosts.iter().filter(|h| AllowList::parse(std::slice::from_ref(*h), &policy).is_ok()).cloned().collect();
        let allow = AllowList::parse(&allowed, &policy).unwrap_or_default();
        FetchEgress { hub, dir, allow }
    }

    /// A fetch's gate: its folder with the socket, listening until dropped.
    pub fn open(&self, fetch_id: &str) -> std::io::Result<FetchGate> {
        std::fs::DirBuilder::new().recursive(true).mode(0o700).create(&self.dir)?;
        let dir = self.dir.join(fetch_id);
        std::fs::DirBuilder::new().mode(0o755).create(&dir)?;
        let key = format!("fetch-{fetch_id}");
        let session = self.hub.session(&key, || self.allow.clone());
        let gate = match Gate::open(&dir, session.clone(), self.hub.clone()) {
            Ok(gate) => gate,
            Err(e) => {
                let _ = std::fs::remove_dir_all(&dir);
                self.hub.forget(&key);
                return Err(e);
            }
        };
        Ok(FetchGate { dir, key, session, hub: self.hub.clone(), _gate: gate })
    }
}

/// One fetch's way out; its folder and its connections go when it is dropped.
pub struct FetchGate {
    pub dir: PathBuf,
    key: String,
    session: Arc<SessionEgress>,
    hub: Arc<EgressHub>,
    _gate: Gate,
}

impl FetchGate {
    /// The container's proxy variables.
    pub fn environment(&self) -> Vec<String> {
        gate::environment(crate::kernel::connection::CONTAINER_DIR)
    }

    /// What the fetch tried and was refused (for its log).
    pub fn report(&self) -> NetworkReport {
        self.session.report()
    }
}

impl Drop for FetchGate {
    fn drop(&mut self) {
        self.hub.forget(&self.key);
        // Written by the service only; never follows a link.
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fetchers_reach_the_indexes_and_nothing_else() {
        assert_eq!(
            index_hosts(&PackageConfig::default(), &[]),
            ["pypi.org", "files.pythonhosted.org", "registry.npmjs.org"]
        );
        let config = PackageConfig {
            index_url: Some("https://user:secret@Mirror.example:8443/simple/".into()),
            npm_registry: Some("https://npm.example/".into()),
            ..PackageConfig::default()
        };
        assert_eq!(
            index_hosts(&config, &["files.example".into()]),
            ["mirror.example:8443", "npm.example", "files.example"]
        );
    }
}
