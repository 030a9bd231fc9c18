//! The client behind a request, worked out once per connection and once
//! per request, and read from here by every later step (rate-limit keys,
//! `hash_ip`, `X-Forwarded-For`, the access log). Hot path. Leaf: imports
//! nothing of the proxy.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use http::header::{self, HeaderMap, HeaderName, HeaderValue};

use crate::config::Cidr;

/// What is known of a connection's peer, resolved when it is accepted.
#[derive(Debug)]
pub struct Peer {
    /// The socket address of the peer.
    pub addr: SocketAddr,
    /// Its IP as a header value (the hop `X-Forwarded-For` appends),
    /// formatted once per connection.
    pub header: HeaderValue,
    /// The SNI name the client sent.
    pub sni: Option<Arc<str>>,
}

impl Peer {
    /// The peer of a connection from `addr`.
    pub fn new(addr: SocketAddr, sni: Option<Arc<str>>) -> Peer {
        let header = HeaderValue::try_from(addr.ip().to_string())
            .unwrap_or_else(|_| HeaderValue::from_static("unknown"));
        Peer { addr, header, sni }
    }
}

/// The client of one request: the peer, or the address a trusted proxy
/// in front of it names ([`client_ip`]).
#[derive(Debug, Clone, Copy)]
pub struct Client {
    /// The client's address.
    pub ip: IpAddr,
}

impl Client {
    /// Resolves the client of a request from `peer` with `headers`.
    #[inline]
    pub fn resolve(peer: &Peer, headers: &HeaderMap, trusted: &[Cidr]) -> Client {
        Client {
            ip: client_ip(peer.addr.ip(), headers, trusted),
        }
    }
}

/// The client address: the socket peer, unless the peer is a trusted proxy;
/// then the right-most address of `X-Forwarded-For` (or `Forwarded: for=`)
/// that is not itself trusted.
///
/// The chain is read from the right, hop by hop, and only as far as the
/// first untrusted address: everything to its left was written by the
/// client and is never looked at, so a client behind a trusted proxy cannot
/// change its key by prepending addresses or garbage. A hop that does not
/// parse before an untrusted one is found ends the walk at the nearest
/// address known so far (the peer or a trusted proxy).
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[Cidr]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|c| c.contains(ip));
    if trusted.is_empty() || !is_trusted(peer) {
        return peer;
    }
    // Steps one hop left; `Err` ends the walk with the address to use.
    let step = |client: &mut IpAddr, hop: &str| -> Result<(), IpAddr> {
        let ip = parse_hop(hop).ok_or(*client)?;
        *client = ip;
        if is_trusted(ip) {
            Ok(())
        } else {
            Err(ip)
        }
    };
    let mut client = peer;
    let xff = headers.get_all(HeaderName::from_static("x-forwarded-for"));
    if xff.iter().next().is_some() {
        for v in xff.iter().rev() {
            let Ok(v) = v.to_str() else { return client };
            for hop in v.rsplit(',') {
                if let Err(ip) = step(&mut client, hop) {
                    return ip;
                }
            }
        }
        return client;
    }
    for v in headers.get_all(header::FORWARDED).iter().rev() {
        let Ok(v) = v.to_str() else { return client };
        for elem in v.rsplit(',') {
            let hop = elem.split(';').find_map(|pair| {
                let (k, val) = pair.split_once('=')?;
                k.trim().eq_ignore_ascii_case("for").then_some(val)
            });
            if let Some(hop) = hop {
                if let Err(ip) = step(&mut client, hop) {
                    return ip;
                }
            }
        }
    }
    client
}

/// One hop: `192.0.2.1`, `"[2001:db8::1]:4711"`, `192.0.2.1:80`.
fn parse_hop(s: &str) -> Option<IpAddr> {
    let s = s.trim().trim_matches('"');
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split(']').next()?.parse().ok();
    }
    let (host, _port) = s.rsplit_once(':')?;
    host.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn client_ip_honours_only_trusted_proxies() {
        let trusted = vec![Cidr::parse("10.0.0.0/8").unwrap()];
        let mut h = HeaderMap::new();
        h.insert(
            "x-forwarded-for",
            HeaderValue::from_static("203.0.113.9, 198.51.100.7, 10.1.1.1"),
        );
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        let stranger: IpAddr = "192.0.2.50".parse().unwrap();
        // Right-most untrusted hop.
        assert_eq!(
            client_ip(proxy, &h, &trusted),
            "198.51.100.7".parse::<IpAddr>().unwrap()
        );
        // A spoofing client's header is ignored.
        assert_eq!(client_ip(stranger, &h, &trusted), stranger);
        // Forwarded header.
        let mut f = HeaderMap::new();
        f.insert(
            header::FORWARDED,
            HeaderValue::from_static("for=\"[2001:db8::1]:4711\";proto=https"),
        );
        assert_eq!(
            client_ip(proxy, &f, &trusted),
            "2001:db8::1".parse::<IpAddr>().unwrap()
        );
        // Garbage in the chain: fall back to the peer.
        let mut g = HeaderMap::new();
        g.insert("x-forwarded-for", HeaderValue::from_static("nonsense"));
        assert_eq!(client_ip(proxy, &g, &trusted), proxy);
    }

    #[test]
    fn client_ip_ignores_what_the_client_wrote_left_of_its_address() {
        let trusted = vec![Cidr::parse("10.0.0.0/8").unwrap()];
        let proxy: IpAddr = "10.0.0.2".parse().unwrap();
        let client: IpAddr = "198.51.100.7".parse().unwrap();
        let xff = |v: &'static str| {
            let mut h = HeaderMap::new();
            h.insert("x-forwarded-for", HeaderValue::from_static(v));
            h
        };
        // The proxy appended the real address; anything the client put
        // before it (garbage, other addresses, ports) does not change it.
        for spoof in [
            "nonsense, 198.51.100.7",
            "203.0.113.1, 198.51.100.7",
            "unknown,198.51.100.7, 10.9.9.9",
            ", 198.51.100.7",
        ] {
            assert_eq!(client_ip(proxy, &xff(spoof), &trusted), client, "{spoof}");
        }
        // Repeated header lines read as one list, right-most line last.
        let mut h = HeaderMap::new();
        h.append("x-forwarded-for", HeaderValue::from_static("garbage"));
        h.append("x-forwarded-for", HeaderValue::from_static("198.51.100.7"));
        assert_eq!(client_ip(proxy, &h, &trusted), client);
        // Garbage before any untrusted hop: the nearest known address.
        assert_eq!(
            client_ip(proxy, &xff("198.51.100.7, nonsense, 10.1.1.1"), &trusted),
            "10.1.1.1".parse::<IpAddr>().unwrap()
        );
        // Every hop trusted: the left-most one.
        assert_eq!(
            client_ip(proxy, &xff("10.3.3.3, 10.1.1.1"), &trusted),
            "10.3.3.3".parse::<IpAddr>().unwrap()
        );
        // Forwarded, several elements: right-most untrusted `for=`.
        let mut f = HeaderMap::new();
        f.insert(
            header::FORWARDED,
            HeaderValue::from_static("for=unknown, for=198.51.100.7;proto=https, for=10.1.1.1"),
        );
        assert_eq!(client_ip(proxy, &f, &trusted), client);
    }
}
