//! From a checked destination to a connected upstream socket: names resolved (the system resolver, or
//! the `.test` names tests give), every address checked (`addr::refusal`: this is what stops an allowed
//! name that resolves inside, DNS rebinding among them), the first that answers connected. Every wait is
//! bounded by the connect timeout, and dropping the future cancels it.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use ipnet::IpNet;
use tokio::net::TcpStream;

use super::check::Destination;
use super::config::TEST_TLD;
use crate::egress::addr;
use crate::egress::link::Reason;

/// The most addresses of one name tried.
const MAX_ADDRESSES: usize = 8;
/// System lookups under way at once. Each holds a blocking thread until the system resolver answers,
/// which a timeout does not cut short: the permit goes with the thread, so a name whose servers never
/// answer can hold at most these, and the proxy's threads stay within its pids limit.
const MAX_LOOKUPS: usize = 32;

/// Resolves and connects, within the operator's bounds.
#[derive(Debug, Clone)]
pub struct Resolver {
    /// Permits for system lookups ([`MAX_LOOKUPS`]).
    lookups: std::sync::Arc<tokio::sync::Semaphore>,
    /// `.test` names (tests only).
    test_names: BTreeMap<String, IpAddr>,
    /// The ranges the operator opens.
    opened: Vec<IpNet>,
    /// Resolving, then connecting, each within this.
    timeout: Duration,
}

impl Resolver {
    pub fn new(test_names: BTreeMap<String, IpAddr>, opened: Vec<IpNet>, timeout: Duration) -> Resolver {
        Resolver { lookups: std::sync::Arc::new(tokio::sync::Semaphore::new(MAX_LOOKUPS)), test_names, opened, timeout }
    }

    /// Connects to the destination: `Unresolved`, `PrivateAddress` or `Unreachable` when it cannot.
    pub async fn connect(&self, destination: &Destination, port: u16) -> Result<TcpStream, Reason> {
        let addresses = match destination {
            Destination::Opened(ip) => vec![SocketAddr::new(*ip, port)],
            Destination::Name(name) => reachable(self.resolve(name, port).await?, &self.opened)?,
        };
        let attempts = async {
            for address in addresses {
                match TcpStream::connect(address).await {
                    Ok(stream) => {
                        crate::egress::link::bound_buffers(&stream);
                        return Ok(stream);
                    }
                    Err(e) => tracing::debug!(%address, error = %e, "egress upstream did not answer"),
                }
            }
            Err(Reason::Unreachable)
        };
        tokio::time::timeout(self.timeout, attempts).await.unwrap_or(Err(Reason::Unreachable))
    }

    /// A name's addresses, unchecked. A `.test` name is never asked of the system resolver.
    async fn resolve(&self, name: &str, port: u16) -> Result<Vec<SocketAddr>, Reason> {
        if name.ends_with(TEST_TLD) {
            return self.test_names.get(name).map(|ip| vec![SocketAddr::new(*ip, port)]).ok_or(Reason::Unresolved);
        }
        let lookup = async {
            let permit = self.lookups.clone().acquire_owned().await.map_err(|_| Reason::Unresolved)?;
            // Fully qualified: the resolver's search domains are never tried.
            let fqdn = format!("{name}.");
            let found = tokio::task::spawn_blocking(move || {
                let found = std::net::ToSocketAddrs::to_socket_addrs(&(fqdn.as_str(), port));
                drop(permit);
                found.map(|addrs| addrs.take(MAX_ADDRESSES * 4).collect::<Vec<_>>())
            });
            match found.await {
                Ok(Ok(found)) => Ok(found),
                Ok(Err(e)) => {
                    tracing::debug!(name, error = %e, "egress name did not resolve");
                    Err(Reason::Unresolved)
                }
                Err(_) => Err(Reason::Unresolved),
            }
        };
        tokio::time::timeout(self.timeout, lookup).await.unwrap_or(Err(Reason::Unresolved))
    }
}

/// The addresses the proxy may connect to, in the resolver's order, without repeats: none at all is
/// `Unresolved`, none left is `PrivateAddress`.
pub fn reachable(found: Vec<SocketAddr>, opened: &[IpNet]) -> Result<Vec<SocketAddr>, Reason> {
    if found.is_empty() {
        return Err(Reason::Unresolved);
    }
    let mut kept: Vec<SocketAddr> = Vec::new();
    for address in found {
        if addr::refusal(address.ip(), opened).is_none() && !kept.contains(&address) {
            kept.push(address);
        }
    }
    kept.truncate(MAX_ADDRESSES);
    if kept.is_empty() { Err(Reason::PrivateAddress) } else { Ok(kept) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(ips: &[&str]) -> Vec<SocketAddr> {
        ips.iter().map(|ip| SocketAddr::new(ip.parse().unwrap(), 443)).collect()
    }

    #[test]
    fn only_outside_addresses_are_kept() {
        let opened: Vec<IpNet> = vec!["10.1.0.0/16".parse().unwrap()];
        assert_eq!(
            reachable(at(&["127.0.0.1", "1.1.1.1", "1.1.1.1", "10.1.0.5"]), &opened),
            Ok(at(&["1.1.1.1", "10.1.0.5"]))
        );
        assert_eq!(reachable(at(&["127.0.0.1", "169.254.169.254", "::1"]), &opened), Err(Reason::PrivateAddress));
        assert_eq!(reachable(vec![], &opened), Err(Reason::Unresolved));
    }

    #[tokio::test]
    async fn test_names_never_reach_the_system_resolver_and_are_checked_too() {
        let names = BTreeMap::from([("rebind.test".to_owned(), "10.255.255.1".parse().unwrap())]);
        let resolver = Resolver::new(names, vec![], Duration::from_secs(1));
        let name = |n: &str| Destination::Name(n.into());
        assert_eq!(resolver.connect(&name("rebind.test"), 443).await.unwrap_err(), Reason::PrivateAddress);
        assert_eq!(resolver.connect(&name("missing.test"), 443).await.unwrap_err(), Reason::Unresolved);
    }
}
