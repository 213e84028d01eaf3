//! Whether a session may reach the host a request names, before anything is resolved: a name on its
//! list and not forbidden, or an address in a range the operator opened. Names, never addresses: an
//! address a session writes is refused unless the operator opened its range. Pure.

use std::net::IpAddr;

use ipnet::IpNet;

use super::head::Authority;
use crate::egress::allow::{AllowList, NetworkPolicy, normalize_host};
use crate::egress::link::Reason;

/// The longest host an event carries.
pub const MAX_EVENT_HOST: usize = 255;

/// Where a request may go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Destination {
    /// A name on the session's list (normalized): resolved, and its addresses checked.
    Name(String),
    /// An address in a range the operator opened: reached as it is, with no list and no server name.
    Opened(IpAddr),
}

/// The rules, in order: an address must be in an opened range, and the session must have a network at all
/// (a list), and the port must be one of the default ports (else `IpLiteral`: an opened range is the
/// operator's mirror or service, not every port of it, and not for sessions that asked for nothing); a name
/// the operator forbids is `Forbidden` (before the list: the operator's word is the reason); a name not on
/// the list for that port, or no name at all, is `NotAllowed`.
pub fn destination(
    target: &Authority,
    list: &AllowList,
    policy: &NetworkPolicy,
    opened: &[IpNet],
) -> Result<Destination, Reason> {
    if let Some(ip) = target.ip() {
        let default_port = crate::egress::allow::DEFAULT_PORTS.contains(&target.port);
        return match opened.iter().any(|net| net.contains(&ip)) && !list.is_empty() && default_port {
            true => Ok(Destination::Opened(ip)),
            false => Err(Reason::IpLiteral),
        };
    }
    let name = normalize_host(&target.host).ok_or(Reason::NotAllowed)?;
    if policy.forbidden.iter().any(|f| f.matches(&name)) {
        return Err(Reason::Forbidden);
    }
    if !list.allows(&name, target.port, policy) {
        return Err(Reason::NotAllowed);
    }
    Ok(Destination::Name(name))
}

/// The host an event names: a name lowercased, anything else as written; at most [`MAX_EVENT_HOST`]
/// characters.
pub fn event_host(target: &Authority) -> String {
    let host = match target.ip() {
        Some(_) => target.host.clone(),
        None => normalize_host(&target.host).unwrap_or_else(|| target.host.clone()),
    };
    host.chars().take(MAX_EVENT_HOST).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::egress::allow::HostPattern;

    fn check(host: &str, port: u16) -> Result<Destination, Reason> {
        let mut policy = NetworkPolicy { enabled: true, max_entries: 8, forbidden: vec![] };
        let list = AllowList::parse(&["*.example.com".to_owned(), "pypi.org".to_owned()], &policy).unwrap();
        // Forbidden since the list was checked (the operator's list grew): never reached all the same.
        policy.forbidden.push(HostPattern::parse("secret.example.com").unwrap());
        let opened = vec!["10.1.0.0/16".parse().unwrap(), "fd00::/64".parse().unwrap()];
        destination(&Authority { host: host.into(), port }, &list, &policy, &opened)
    }

    #[test]
    fn names_on_the_list_pass_and_everything_else_says_why_not() {
        assert_eq!(check("PyPI.org.", 443), Ok(Destination::Name("pypi.org".into())));
        assert_eq!(check("a.example.com", 80), Ok(Destination::Name("a.example.com".into())));
        assert_eq!(check("pypi.org", 22), Err(Reason::NotAllowed));
        assert_eq!(check("other.org", 443), Err(Reason::NotAllowed));
        assert_eq!(check("localhost", 443), Err(Reason::NotAllowed), "not a name the list could hold");
        assert_eq!(check("127.1", 443), Err(Reason::NotAllowed), "a short address is no name, never resolved");
        assert_eq!(check("secret.example.com", 443), Err(Reason::Forbidden), "forbidden, though on the list");
        assert_eq!(check("10.1.2.3", 443), Ok(Destination::Opened("10.1.2.3".parse().unwrap())));
        assert_eq!(check("10.1.2.3", 5432), Err(Reason::IpLiteral), "an opened range on its web ports only");
        assert_eq!(check("[fd00::7]", 443), Ok(Destination::Opened("fd00::7".parse().unwrap())));
        assert_eq!(check("10.2.0.1", 443), Err(Reason::IpLiteral));
        assert_eq!(check("93.184.216.34", 443), Err(Reason::IpLiteral));
        assert_eq!(check("[::ffff:10.1.2.3]", 443), Err(Reason::IpLiteral), "not the opened IPv4 range");
    }

    #[test]
    fn an_opened_range_is_not_for_a_session_without_a_list() {
        let policy = NetworkPolicy { enabled: true, max_entries: 8, forbidden: vec![] };
        let opened = vec!["10.1.0.0/16".parse().unwrap()];
        let target = Authority { host: "10.1.2.3".into(), port: 443 };
        assert_eq!(destination(&target, &AllowList::default(), &policy, &opened), Err(Reason::IpLiteral));
    }

    #[test]
    fn an_event_names_the_host_lowercased_and_bounded() {
        assert_eq!(event_host(&Authority { host: "PyPI.org.".into(), port: 1 }), "pypi.org");
        assert_eq!(event_host(&Authority { host: "[FD00::7]".into(), port: 1 }), "[FD00::7]");
        assert_eq!(event_host(&Authority { host: "x".repeat(1000), port: 1 }).len(), MAX_EVENT_HOST);
    }
}
