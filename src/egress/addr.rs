//! Which addresses the egress proxy may connect to once a name is resolved (issue 22): never loopback,
//! link-local (the cloud metadata service at 169.254.169.254 among them), private, shared (CGNAT),
//! unspecified, multicast or reserved ranges, in IPv4, IPv6 and IPv4 carried in IPv6 (mapped, NAT64,
//! 6to4), unless the operator opens a range (`--egress-allow-cidr`). This is what stops DNS rebinding (an
//! allowed name that resolves to an inside address) and reaching the host, the Docker bridges and other
//! containers through the proxy. Pure.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ipnet::IpNet;

/// Why an address is refused: a word for the session's `network.blocked` and the metrics.
pub fn refusal(ip: IpAddr, opened: &[IpNet]) -> Option<&'static str> {
    if opened.iter().any(|net| net.contains(&ip)) {
        return None;
    }
    match ip {
        IpAddr::V4(v4) => v4_refusal(v4),
        IpAddr::V6(v6) => match embedded_v4(v6) {
            Some(v4) => v4_refusal(v4),
            None => v6_refusal(v6),
        },
    }
}

fn v4_refusal(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(if ip.is_loopback() {
        "loopback"
    } else if ip.is_link_local() {
        "link_local"
    } else if ip.is_private() {
        "private"
    } else if a == 100 && (64..128).contains(&b) {
        "shared_address_space"
    } else if ip.is_unspecified() || a == 0 {
        "unspecified"
    } else if ip.is_multicast() || ip.is_broadcast() || a >= 240 {
        "reserved"
    } else if (a == 192 && b == 0 && c == 0) || (a == 198 && (18..20).contains(&b)) {
        // IETF protocol assignments, benchmarking.
        "reserved"
    } else if (a == 192 && b == 0 && c == 2) || (a == 198 && b == 51 && c == 100) || (a == 203 && b == 0 && c == 113) {
        "documentation"
    } else if ip == Ipv4Addr::new(168, 63, 129, 16) {
        // Azure's host endpoint (WireServer), reachable from a VM's guests like the metadata service.
        "link_local"
    } else {
        return None;
    })
}

fn v6_refusal(ip: Ipv6Addr) -> Option<&'static str> {
    let first = ip.segments()[0];
    Some(if ip.is_loopback() {
        "loopback"
    } else if ip.is_unspecified() {
        "unspecified"
    } else if first & 0xffc0 == 0xfe80 {
        "link_local"
    } else if first & 0xfe00 == 0xfc00 || first & 0xffc0 == 0xfec0 {
        // Unique local; the deprecated site-local.
        "private"
    } else if ip.is_multicast() {
        "reserved"
    } else if first == 0x2001 && ip.segments()[1] == 0x0db8 {
        "documentation"
    } else if first == 0x0100 && ip.segments()[1..4] == [0, 0, 0] {
        // The discard prefix.
        "reserved"
    } else if first == 0x0064 && ip.segments()[1] == 0xff9b && ip.segments()[2] == 1 {
        // Local-use NAT64 (`64:ff9b:1::/48`): its translator's IPv4 side is the operator's network.
        "private"
    } else {
        return None;
    })
}

/// The IPv4 address an IPv6 address carries, where one reaches it: IPv4-mapped (`::ffff:a.b.c.d`),
/// IPv4-compatible (`::a.b.c.d`), NAT64 (`64:ff9b::/96`), 6to4 (`2002:aabb:ccdd::/48`).
fn embedded_v4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let s = ip.segments();
    let tail = || Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
    if let Some(v4) = ip.to_ipv4_mapped() {
        return Some(v4);
    }
    if s[..6] == [0, 0, 0, 0, 0, 0] && !ip.is_loopback() && !ip.is_unspecified() {
        return Some(tail());
    }
    if s[0] == 0x0064 && s[1] == 0xff9b && s[2..6] == [0, 0, 0, 0] {
        return Some(tail());
    }
    // SIIT's IPv4-translated addresses (`::ffff:0:a.b.c.d`).
    if s[..4] == [0, 0, 0, 0] && s[4] == 0xffff && s[5] == 0 {
        return Some(tail());
    }
    if s[0] == 0x2002 {
        return Some(Ipv4Addr::new((s[1] >> 8) as u8, s[1] as u8, (s[2] >> 8) as u8, s[2] as u8));
    }
    None
}

/// Parses the operator's opened ranges (`10.1.2.0/24,fd00::/64`); a bare address is one host.
pub fn parse_cidrs(text: &str) -> Result<Vec<IpNet>, String> {
    text.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            p.parse::<IpNet>()
                .or_else(|_| p.parse::<IpAddr>().map(IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| format!("`{p}` is not an address range (`10.1.2.0/24`)"))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(ip: &str) -> Option<&'static str> {
        refusal(ip.parse().unwrap(), &[])
    }

    #[test]
    fn inside_addresses_are_refused_by_kind() {
        for (ip, kind) in [
            ("127.0.0.1", "loopback"),
            ("127.255.0.9", "loopback"),
            ("::1", "loopback"),
            ("169.254.169.254", "link_local"),
            ("::ffff:0:a00:1", "private"),
            ("64:ff9b:1::a00:1", "private"),
            ("168.63.129.16", "link_local"),
            ("fe80::1", "link_local"),
            ("10.0.0.1", "private"),
            ("172.17.0.1", "private"),
            ("172.31.255.255", "private"),
            ("192.168.1.1", "private"),
            ("fd00::1", "private"),
            ("100.64.0.1", "shared_address_space"),
            ("0.0.0.0", "unspecified"),
            ("0.1.2.3", "unspecified"),
            ("::", "unspecified"),
            ("224.0.0.1", "reserved"),
            ("255.255.255.255", "reserved"),
            ("240.0.0.1", "reserved"),
            ("ff02::1", "reserved"),
            ("192.0.2.1", "documentation"),
            ("2001:db8::1", "documentation"),
            // IPv4 inside IPv6 is judged as the IPv4 it reaches.
            ("::ffff:127.0.0.1", "loopback"),
            ("::ffff:169.254.169.254", "link_local"),
            ("::10.0.0.1", "private"),
            ("64:ff9b::a9fe:a9fe", "link_local"),
            ("2002:0a00:0001::1", "private"),
        ] {
            assert_eq!(refused(ip), Some(kind), "{ip}");
        }
    }

    #[test]
    fn public_addresses_pass() {
        for ip in ["93.184.216.34", "1.1.1.1", "172.32.0.1", "100.128.0.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert_eq!(refused(ip), None, "{ip}");
        }
    }

    #[test]
    fn the_operator_opens_ranges_and_nothing_else() {
        let opened = parse_cidrs("10.1.2.0/24, fd00::/64,192.168.7.7").unwrap();
        assert_eq!(refusal("10.1.2.9".parse().unwrap(), &opened), None);
        assert_eq!(refusal("10.1.3.9".parse().unwrap(), &opened), Some("private"));
        assert_eq!(refusal("fd00::5".parse().unwrap(), &opened), None);
        assert_eq!(refusal("192.168.7.7".parse().unwrap(), &opened), None);
        assert_eq!(refusal("192.168.7.8".parse().unwrap(), &opened), Some("private"));
        assert!(parse_cidrs("10.1.2.0/33").unwrap_err().contains("10.1.2.0/33"));
        assert!(parse_cidrs("example.com").is_err());
        assert_eq!(parse_cidrs("").unwrap(), vec![]);
    }
}
