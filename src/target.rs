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
/// IPv4-mapped and IPv4-compatible IPv6 addresses are judged as the IPv4 address they
/// carry, so `::ffff:127.0.0.1` is loopback too.
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
        || ip.is_multicast()      // 224/4
        || a >= 240 // 240/4 reserved, and 255.255.255.255 broadcast
}

fn is_forbidden_v6(ip: Ipv6Addr) -> bool {
    let seg = ip.segments();
    ip.is_unspecified()                          // ::
        || ip.is_loopback()                      // ::1
        || (seg[0] & 0xfe00) == 0xfc00           // fc00::/7 unique local
        || (seg[0] & 0xffc0) == 0xfe80           // fe80::/10 link local
        || (seg[0] & 0xffc0) == 0xfec0           // fec0::/10 deprecated site local
        || (seg[0] & 0xff00) == 0xff00           // ff00::/8 multicast
        // 64:ff9b::/96 NAT64 embeds an IPv4 address: judge that instead
        || (seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] && is_forbidden_v4(embedded_v4(seg)))
        // 2002::/16 6to4 embeds an IPv4 address in the next 32 bits
        || (seg[0] == 0x2002 && is_forbidden_v4(Ipv4Addr::new(
            (seg[1] >> 8) as u8, seg[1] as u8, (seg[2] >> 8) as u8, seg[2] as u8)))
        // ::a.b.c.d (deprecated IPv4-compatible): judge the IPv4 address
        || (seg[..6] == [0; 6] && is_forbidden_v4(embedded_v4(seg)))
}

fn embedded_v4(seg: [u16; 8]) -> Ipv4Addr {
    Ipv4Addr::new(
        (seg[6] >> 8) as u8,
        seg[6] as u8,
        (seg[7] >> 8) as u8,
        seg[7] as u8,
    )
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
        ] {
            assert!(!forbidden(ip), "{ip} should be allowed");
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
