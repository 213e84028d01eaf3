//! A session's network allow-list (issue 22): the names its code may reach through the egress proxy, as a
//! client writes them (`api.example.com`, `*.githubusercontent.com`, `pypi.org:443`), the operator's bounds
//! on them (the feature on or off, a longest list, names never allowed), and the match of a connection's
//! host and port against them. Pure: parsing, checks and matching; no I/O.
//!
//! Names, never addresses: an entry is a host name (ASCII; international names in their `xn--` form) with
//! an optional leading `*.` (every name under it, not the name itself) and an optional port (default: 80
//! and 443). An IP literal is not an entry: the operator opens address ranges, not sessions.

use std::fmt;

/// The ports an entry without one allows.
pub const DEFAULT_PORTS: [u16; 2] = [80, 443];
/// The longest entry echoed back in an error (an entry is a name: 253 bytes and a port at most).
const LONGEST_ENTRY: usize = 300;

/// A host name, or every name under one.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum HostPattern {
    /// Exactly this name (lowercase, no trailing dot).
    Exact(String),
    /// Every name that ends with `.` and this suffix (`*.example.com`: `a.example.com`, `a.b.example.com`,
    /// not `example.com`).
    Under(String),
}

impl HostPattern {
    /// Parses a name or `*.name` (no port).
    pub fn parse(text: &str) -> Result<HostPattern, &'static str> {
        if text == "*" {
            return Err("`*` alone would allow everything: name the hosts, or `*.example.com`");
        }
        match text.strip_prefix("*.") {
            Some(suffix) => {
                if !suffix.trim_end_matches('.').contains('.') {
                    return Err("a wildcard must keep at least two labels after it (`*.example.com`)");
                }
                Ok(HostPattern::Under(host_name(suffix)?))
            }
            None if text.contains('*') => Err("a wildcard may only be the whole first label (`*.example.com`)"),
            None => Ok(HostPattern::Exact(host_name(text)?)),
        }
    }

    /// Whether `host` (already normalized: [`normalize_host`]) is one of its names.
    pub fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(name) => host == name,
            HostPattern::Under(suffix) => {
                host.len() > suffix.len() + 1 && host.ends_with(suffix.as_str()) && {
                    let dot = host.len() - suffix.len() - 1;
                    host.as_bytes()[dot] == b'.'
                }
            }
        }
    }

    /// Whether some name is one of both patterns' names.
    pub fn overlaps(&self, other: &HostPattern) -> bool {
        match (self, other) {
            (HostPattern::Exact(a), _) => other.matches(a),
            (_, HostPattern::Exact(b)) => self.matches(b),
            (HostPattern::Under(a), HostPattern::Under(b)) => a == b || self.matches(b) || other.matches(a),
        }
    }
}

impl fmt::Display for HostPattern {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HostPattern::Exact(name) => f.write_str(name),
            HostPattern::Under(suffix) => write!(f, "*.{suffix}"),
        }
    }
}

/// One entry: a pattern and the port it allows (`None`: 80 and 443).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Rule {
    pub host: HostPattern,
    pub port: Option<u16>,
}

impl Rule {
    /// Parses `name`, `*.name`, `name:port` or `*.name:port`.
    pub fn parse(entry: &str) -> Result<Rule, &'static str> {
        if entry.is_empty() {
            return Err("an empty entry");
        }
        if entry.len() > LONGEST_ENTRY {
            return Err("too long for a host name");
        }
        if entry.contains("://") || entry.contains('/') || entry.contains('@') || entry.contains('?') {
            return Err("a host name, not a URL (`api.example.com`, not `https://api.example.com/`)");
        }
        if entry.starts_with('[') || entry.parse::<std::net::IpAddr>().is_ok() {
            return Err("an IP address, not a name: sessions name hosts; address ranges are the operator's");
        }
        let (host, port) = match entry.rsplit_once(':') {
            Some((host, port)) => {
                let port = port.parse::<u32>().map_err(|_| "the port is not a number")?;
                if !(1..=65535).contains(&port) {
                    return Err("the port is out of range (1 to 65535)");
                }
                (host, Some(port as u16))
            }
            None => (entry, None),
        };
        if host.parse::<std::net::Ipv4Addr>().is_ok() {
            return Err("an IP address, not a name: sessions name hosts; address ranges are the operator's");
        }
        Ok(Rule { host: HostPattern::parse(host)?, port })
    }

    pub fn allows(&self, host: &str, port: u16) -> bool {
        self.port.map_or(DEFAULT_PORTS.contains(&port), |p| p == port) && self.host.matches(host)
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.port {
            Some(port) => write!(f, "{}:{port}", self.host),
            None => write!(f, "{}", self.host),
        }
    }
}

/// The operator's bounds on allow-lists.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NetworkPolicy {
    /// Sessions may have a network at all (off by default).
    pub enabled: bool,
    /// The longest list a session may have.
    pub max_entries: usize,
    /// Names no session may reach, whatever its list says.
    pub forbidden: Vec<HostPattern>,
}

/// Why an allow-list is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ListRefused {
    #[error("networking is turned off on this server: sessions have no network")]
    Off,
    #[error("network.allow: at most {max} entries (got {got})")]
    TooMany { max: usize, got: usize },
    #[error("network.allow: `{entry}`: {why}")]
    Invalid { entry: String, why: &'static str },
    #[error("network.allow: `{entry}`: the operator does not allow `{forbidden}`")]
    Forbidden { entry: String, forbidden: String },
}

impl ListRefused {
    /// A client's mistake (422) rather than the operator's choice (403).
    pub fn is_invalid(&self) -> bool {
        matches!(self, ListRefused::Invalid { .. } | ListRefused::TooMany { .. })
    }
}

/// A checked allow-list: what a session's code may reach, in the order given, without repeats.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct AllowList {
    rules: Vec<Rule>,
}

impl AllowList {
    /// Checks a client's entries against the grammar and the operator's bounds.
    pub fn parse(entries: &[String], policy: &NetworkPolicy) -> Result<AllowList, ListRefused> {
        if !policy.enabled {
            return Err(ListRefused::Off);
        }
        if entries.len() > policy.max_entries {
            return Err(ListRefused::TooMany { max: policy.max_entries, got: entries.len() });
        }
        let mut rules: Vec<Rule> = Vec::with_capacity(entries.len());
        for entry in entries {
            let echo = || entry.chars().take(LONGEST_ENTRY).collect::<String>();
            let rule = Rule::parse(entry.trim()).map_err(|why| ListRefused::Invalid { entry: echo(), why })?;
            if let Some(forbidden) = policy.forbidden.iter().find(|f| f.overlaps(&rule.host)) {
                return Err(ListRefused::Forbidden { entry: echo(), forbidden: forbidden.to_string() });
            }
            if !rules.contains(&rule) {
                rules.push(rule);
            }
        }
        Ok(AllowList { rules })
    }

    /// Whether a connection to `host` (as the client named it) on `port` is allowed. A name the operator
    /// forbids never is, whatever the list says (checked again here: the operator's list may have grown
    /// since the session's was checked).
    pub fn allows(&self, host: &str, port: u16, policy: &NetworkPolicy) -> bool {
        let Some(host) = normalize_host(host) else { return false };
        !policy.forbidden.iter().any(|f| f.matches(&host)) && self.rules.iter().any(|r| r.allows(&host, port))
    }

    /// The entries as a client reads them back.
    pub fn entries(&self) -> Vec<String> {
        self.rules.iter().map(Rule::to_string).collect()
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty()
    }
}

/// A host name as a connection names it, lowercased and without a trailing dot; `None` when it is not a
/// host name (an address, a wildcard, anything else).
pub fn normalize_host(host: &str) -> Option<String> {
    if host.parse::<std::net::IpAddr>().is_ok() {
        return None;
    }
    host_name(host).ok()
}

/// A valid host name, lowercased, without a trailing dot: labels of 1–63 letters, digits and `-` (not at
/// either end), at most 253 bytes.
fn host_name(text: &str) -> Result<String, &'static str> {
    let name = text.strip_suffix('.').unwrap_or(text).to_ascii_lowercase();
    if name.is_empty() || name.len() > 253 {
        return Err("not a host name (1 to 253 characters)");
    }
    if !name.is_ascii() {
        return Err("not an ASCII host name: write an international name in its `xn--` form");
    }
    for label in name.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-');
        if !ok {
            return Err("not a host name (labels of letters, digits and `-`, 1 to 63 each)");
        }
    }
    if !name.contains('.') {
        return Err("not a fully qualified name (`api.example.com`)");
    }
    if name.rsplit('.').next().is_some_and(|tld| tld.bytes().all(|b| b.is_ascii_digit())) {
        return Err("not a host name: the last label is a number");
    }
    Ok(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> NetworkPolicy {
        NetworkPolicy {
            enabled: true,
            max_entries: 4,
            forbidden: vec![
                HostPattern::parse("*.internal.example").unwrap(),
                HostPattern::parse("metadata.google.internal").unwrap(),
            ],
        }
    }

    fn list(entries: &[&str]) -> Result<AllowList, ListRefused> {
        AllowList::parse(&entries.iter().map(|e| e.to_string()).collect::<Vec<_>>(), &policy())
    }

    #[test]
    fn names_wildcards_and_ports_match_as_written() {
        let l = list(&["API.Example.com.", "*.githubusercontent.com", "pypi.org:8443"]).unwrap();
        assert_eq!(l.entries(), vec!["api.example.com", "*.githubusercontent.com", "pypi.org:8443"]);
        let p = policy();
        assert!(l.allows("api.example.com", 443, &p) && l.allows("API.EXAMPLE.COM.", 80, &p));
        assert!(!l.allows("api.example.com", 22, &p), "default ports are 80 and 443");
        assert!(!l.allows("x.api.example.com", 443, &p), "an exact name allows no subdomain");
        assert!(l.allows("raw.githubusercontent.com", 443, &p) && l.allows("a.b.githubusercontent.com", 443, &p));
        assert!(!l.allows("githubusercontent.com", 443, &p), "a wildcard is the names under it, not the name");
        assert!(!l.allows("evilgithubusercontent.com", 443, &p), "a label boundary, not a suffix of text");
        assert!(l.allows("pypi.org", 8443, &p) && !l.allows("pypi.org", 443, &p), "a port given is the only port");
        assert!(!l.allows("93.184.216.34", 443, &p), "an address is never a name on the list");
    }

    #[test]
    fn bad_entries_are_refused_naming_the_entry() {
        for (entry, says) in [
            ("*", "`*` alone"),
            ("a.*.com", "whole first label"),
            ("*example.com", "whole first label"),
            ("*.com", "at least two labels"),
            ("https://api.example.com/", "not a URL"),
            ("api.example.com/path", "not a URL"),
            ("api.example.com:0", "out of range"),
            ("api.example.com:65536", "out of range"),
            ("api.example.com:http", "not a number"),
            ("10.0.0.1", "an IP address"),
            ("10.0.0.1:443", "an IP address"),
            ("[::1]:443", "an IP address"),
            ("localhost", "fully qualified"),
            ("-bad.example.com", "labels"),
            ("bad..example.com", "labels"),
            ("bücher.example", "xn--"),
            ("", "empty"),
        ] {
            let err = list(&[entry]).unwrap_err();
            assert!(err.is_invalid(), "{entry}: {err}");
            assert!(err.to_string().contains(says), "{entry}: {err}");
            if !entry.is_empty() {
                assert!(err.to_string().contains(&format!("`{entry}`")), "names the entry: {err}");
            }
        }
        let err =
            list(&["a.example.com", "b.example.com", "c.example.com", "d.example.com", "e.example.com"]).unwrap_err();
        assert_eq!(err, ListRefused::TooMany { max: 4, got: 5 });
        let long = format!("{}.example.com", "a".repeat(5000));
        let err = list(&[&long]).unwrap_err().to_string();
        assert!(err.len() < 500, "a long entry is not echoed whole: {} bytes", err.len());
    }

    #[test]
    fn what_the_operator_forbids_is_refused_and_never_reached() {
        for entry in ["db.internal.example", "*.internal.example", "*.x.internal.example", "metadata.google.internal"] {
            let err = list(&[entry]).unwrap_err();
            assert!(matches!(err, ListRefused::Forbidden { .. }), "{entry}: {err}");
            assert!(!err.is_invalid());
        }
        // A wildcard over a forbidden name is refused too: it would reach it.
        let p = NetworkPolicy { forbidden: vec![HostPattern::parse("secret.example.com").unwrap()], ..policy() };
        let err = AllowList::parse(&["*.example.com".to_owned()], &p).unwrap_err();
        assert!(err.to_string().contains("does not allow `secret.example.com`"), "{err}");
        // A name forbidden after the list was checked is still never reached.
        let l = list(&["*.example.org"]).unwrap();
        let later = NetworkPolicy { forbidden: vec![HostPattern::parse("bad.example.org").unwrap()], ..policy() };
        assert!(l.allows("good.example.org", 443, &later) && !l.allows("bad.example.org", 443, &later));
        let off = NetworkPolicy { enabled: false, ..policy() };
        assert_eq!(AllowList::parse(&[], &off).unwrap_err(), ListRefused::Off);
    }

    #[test]
    fn repeats_are_kept_once() {
        let l = list(&["a.example.com", "A.example.com.", "a.example.com:443"]).unwrap();
        assert_eq!(l.entries(), vec!["a.example.com", "a.example.com:443"]);
    }
}
