//! The SSRF guard: which addresses a webhook may be sent to.
//!
//! A webhook sender POSTs to URLs other people typed. Without a guard, an endpoint URL
//! naming `169.254.169.254` (cloud metadata), `127.0.0.1:5432` or an internal service
//! turns the dispatcher into a proxy into the private network. The check runs on the
//! addresses the name resolves to, inside the HTTP client's resolver, so the address
//! that is checked is the address that is connected to: DNS cannot answer a public
//! address for the check and a private one for the connection.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

/// Returned (inside the HTTP client's error chain) when every address of a target is
/// forbidden.
#[derive(Debug, thiserror::Error)]
#[error("target address {0} is not allowed (loopback, private, link-local or reserved)")]
pub struct ForbiddenTarget(pub IpAddr);

/// Whether an address must not be connected to while private targets are refused.
///
/// IPv4-mapped IPv6 addresses are judged as the IPv4 address they carry, so
/// `::ffff:127.0.0.1` is loopback too; so are the NAT64, 6to4 and Teredo forms. Any other
/// IPv6 address outside global unicast (`2000::/3`) is refused.
pub fn is_forbidden(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_forbidden_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_forbidden_v4(v4),
            None => is_forbidden_v6(v6),
        },
    }
}

fn is_forbidden_v4(ip: Ipv4Addr) -> bool {
    let [a, b, c, _] = ip.octets();
    ip.is_unspecified()           // 0.0.0.0
        || a == 0                 // 0/8 "this network": reaches the local host on Linux
        || ip.is_loopback()       // 127/8
        || ip.is_private()        // 10/8, 172.16/12, 192.168/16
        || ip.is_link_local()     // 169.254/16, cloud metadata services live here
        || (a == 100 && (64..128).contains(&b)) // 100.64/10 carrier-grade NAT
        || (a == 192 && b == 0 && c == 0)       // 192.0.0/24 protocol assignments
        || (a == 198 && (b & 0xfe) == 18)       // 198.18/15 benchmarking
        || ip.is_documentation()  // 192.0.2/24, 198.51.100/24, 203.0.113/24: never routed
        || ip.is_multicast()      // 224/4
        || a >= 240 // 240/4 reserved, and 255.255.255.255 broadcast
}

fn is_forbidden_v6(ip: Ipv6Addr) -> bool {
    let seg = ip.segments();
    // Prefixes that carry an IPv4 address a gateway forwards to: judge that address, so
    // a public IPv4 host stays reachable from an IPv6-only network and an internal one
    // does not become reachable through the gateway.
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // 64:ff9b::/96, the well-known NAT64 prefix (RFC 6052): the last 32 bits.
        return is_forbidden_v4(v4_from(seg[6], seg[7]));
    }
    if seg[0] == 0x2002 {
        // 2002::/16 6to4 (RFC 3056): the 32 bits after the prefix.
        return is_forbidden_v4(v4_from(seg[1], seg[2]));
    }
    if seg[..2] == [0x2001, 0] {
        // 2001::/32 Teredo (RFC 4380): the relay's address, then the client's with its
        // bits inverted; a packet may go to either.
        return is_forbidden_v4(v4_from(seg[2], seg[3]))
            || is_forbidden_v4(v4_from(!seg[6], !seg[7]));
    }
    // Global unicast space that is never routed on the internet: a target there is a
    // mistake, or a lab network behind the dispatcher.
    if seg[..2] == [0x2001, 0xdb8]              // 2001:db8::/32 documentation
        || seg[..3] == [0x2001, 2, 0]           // 2001:2::/48 benchmarking (like 198.18/15)
        || (seg[0] == 0x3fff && seg[1] < 0x1000)
    // 3fff::/20 documentation (RFC 9637)
    {
        return true;
    }
    // Everything outside 2000::/3, the only space allocated for global unicast, is
    // refused: it holds ::, ::1, IPv4-compatible ::a.b.c.d, IPv4-translated
    // ::ffff:0:a.b.c.d (SIIT, RFC 6145: a translator on the path would forward to the
    // IPv4 address), 64:ff9b:1::/48 local-use NAT64 (RFC 8215: operator-defined, the
    // IPv4 address may sit anywhere in it, and it translates into the local network),
    // 100::/64 discard, fc00::/7 unique local, fe80::/10 link local, fec0::/10 site
    // local, ff00::/8 multicast, and whatever is assigned there later.
    (seg[0] & 0xe000) != 0x2000
}

/// The IPv4 address in two segments of an IPv6 address.
fn v4_from(high: u16, low: u16) -> Ipv4Addr {
    let [a, b] = high.to_be_bytes();
    let [c, d] = low.to_be_bytes();
    Ipv4Addr::new(a, b, c, d)
}

/// A resolver for the HTTP client that drops forbidden addresses, and fails with
/// [`ForbiddenTarget`] when none remain.
#[derive(Debug, Clone, Default)]
pub struct GuardedResolver;

impl GuardedResolver {
    /// The resolver as the HTTP client takes it.
    pub fn shared() -> Arc<Self> {
        Arc::new(Self)
    }
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let resolved: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = resolved
                .iter()
                .copied()
                .filter(|addr| !is_forbidden(addr.ip()))
                .collect();
            match (allowed.is_empty(), resolved.first()) {
                (true, Some(first)) => Err(Box::new(ForbiddenTarget(first.ip())) as _),
                _ => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forbidden(s: &str) -> bool {
        is_forbidden(s.parse().unwrap())
    }

    #[test]
    fn refuses_internal_ranges() {
        for ip in [
            "0.0.0.0",
            "0.1.2.3",
            "127.0.0.1",
            "127.255.255.254",
            "10.0.0.1",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "192.0.0.8",
            "198.18.0.1",
            "198.19.255.255",
            "224.0.0.1",
            "239.255.255.250",
            "240.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "fec0::1",
            "ff02::1",
            "64:ff9b::a00:1",
            "64:ff9b::7f00:1",
            "2002:a00:1::",
            "2002:7f00:1::",
            "192.0.2.1",
            "198.51.100.7",
            "203.0.113.255",
            // Local-use NAT64 translates into the operator's network, wherever the IPv4
            // address sits in it, public or not.
            "64:ff9b:1::a00:1",
            "64:ff9b:1::808:808",
            "64:ff9b:1:808:808::",
            "64:ff9b:1:ffff:ffff:ffff:ffff:ffff",
            // IPv4-translated (SIIT), loopback or public inside.
            "::ffff:0:7f00:1",
            "::ffff:0:a9fe:a9fe",
            "::ffff:0:808:808",
            // IPv4-compatible, public inside: deprecated, never routed.
            "::8.8.8.8",
            "100::1",
            "2001:db8::1",
            "2001:2::1",
            "3fff::1",
            "3fff:fff::1",
            "5f00::1",
            "4000::1",
            "e000::1",
            // Teredo with a loopback relay, or a loopback client (inverted bits).
            "2001:0:7f00:1::808:808",
            "2001:0:808:808::80ff:fffe",
        ] {
            assert!(forbidden(ip), "{ip} should be refused");
        }
    }

    #[test]
    fn allows_public_addresses() {
        for ip in [
            "1.1.1.1",
            "8.8.8.8",
            "93.184.216.34",
            "100.63.255.255",
            "100.128.0.0",
            "172.15.255.255",
            "172.32.0.0",
            "192.0.1.1",
            "198.17.255.255",
            "198.20.0.0",
            "223.255.255.255",
            "2606:4700:4700::1111",
            "2001:4860:4860::8888",
            "::ffff:8.8.8.8",
            "64:ff9b::808:808",
            "2002:808:808::",
            "2001:0:808:808::f7f7:f7f7",
            "2001:1::1",
            "2001:db9::1",
            "2001:3::1",
            "3fff:1000::1",
            "2a00:1450:4001::200e",
            "3ffe::1",
            "192.0.3.1",
            "198.51.101.1",
            "203.0.114.1",
        ] {
            assert!(!forbidden(ip), "{ip} should be allowed");
        }
    }

    /// A deterministic spread of IPv4 addresses: every /8 and /16 edge, plus pseudo-random
    /// ones (xorshift), so each embedding is checked across the whole space.
    fn sample_v4() -> Vec<Ipv4Addr> {
        let mut out = Vec::new();
        for a in 0..=255u32 {
            for b in [
                0u32, 1, 15, 16, 31, 32, 63, 64, 127, 128, 167, 168, 254, 255,
            ] {
                out.push(Ipv4Addr::from((a << 24) | (b << 16) | 1));
                out.push(Ipv4Addr::from((a << 24) | (b << 16) | 0xffff));
            }
        }
        let mut x: u32 = 0x9e37_79b9;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            out.push(Ipv4Addr::from(x));
        }
        out
    }

    fn v6(high: [u16; 6], v4: Ipv4Addr) -> IpAddr {
        let [a, b, c, d] = v4.octets();
        let [s0, s1, s2, s3, s4, s5] = high;
        IpAddr::V6(Ipv6Addr::new(
            s0,
            s1,
            s2,
            s3,
            s4,
            s5,
            u16::from_be_bytes([a, b]),
            u16::from_be_bytes([c, d]),
        ))
    }

    #[test]
    fn forms_that_reach_an_ipv4_address_are_judged_by_it() {
        for ip in sample_v4() {
            let expected = is_forbidden(IpAddr::V4(ip));
            let [a, b, c, d] = ip.octets();
            let six_to_four = Ipv6Addr::new(
                0x2002,
                u16::from_be_bytes([a, b]),
                u16::from_be_bytes([c, d]),
                0,
                0,
                0,
                0,
                1,
            );
            for (form, judged) in [
                ("mapped", IpAddr::V6(ip.to_ipv6_mapped())),
                ("NAT64", v6([0x64, 0xff9b, 0, 0, 0, 0], ip)),
                ("6to4", IpAddr::V6(six_to_four)),
                // Teredo with a public relay: the client (inverted) decides.
                ("Teredo", v6([0x2001, 0, 0x0808, 0x0808, 0, 0], !ip)),
            ] {
                assert_eq!(is_forbidden(judged), expected, "{ip} as {form}: {judged}");
            }
        }
    }

    #[test]
    fn ipv6_forms_that_lead_into_local_networks_are_always_refused() {
        for ip in sample_v4() {
            for (form, addr) in [
                ("IPv4-translated", v6([0, 0, 0, 0, 0xffff, 0], ip)),
                ("IPv4-compatible", v6([0; 6], ip)),
                ("local-use NAT64", v6([0x64, 0xff9b, 1, 0, 0, 0], ip)),
                (
                    "local-use NAT64 /48",
                    v6([0x64, 0xff9b, 1, 0x0808, 0x0808, 0], ip),
                ),
            ] {
                assert!(is_forbidden(addr), "{ip} as {form}: {addr}");
            }
        }
    }

    #[test]
    fn only_global_unicast_ipv6_is_allowed() {
        let mut x: u128 = 0x2545_f491_4f6c_dd1d_9e37_79b9_7f4a_7c15;
        for _ in 0..200_000 {
            x ^= x << 23;
            x ^= x >> 17;
            x ^= x << 41;
            let ip = Ipv6Addr::from(x);
            let seg = ip.segments();
            let global = (seg[0] & 0xe000) == 0x2000;
            if !global {
                assert!(is_forbidden(IpAddr::V6(ip)), "{ip} is outside 2000::/3");
            } else if !matches!(seg[0], 0x2001 | 0x2002 | 0x3fff) {
                // No special prefix inside 2000::/3 starts elsewhere.
                assert!(!is_forbidden(IpAddr::V6(ip)), "{ip} is global unicast");
            }
        }
    }

    #[tokio::test]
    async fn resolver_refuses_names_that_resolve_to_loopback() {
        use reqwest::dns::Resolve as _;
        let name: reqwest::dns::Name = "localhost".parse().unwrap();
        let err = match GuardedResolver.resolve(name).await {
            Ok(_) => panic!("localhost must be refused"),
            Err(e) => e,
        };
        assert!(err.downcast_ref::<ForbiddenTarget>().is_some(), "{err}");
    }
}
