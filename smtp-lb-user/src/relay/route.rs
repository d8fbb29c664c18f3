//! Where a recipient domain's mail goes: a static route (like Postfix
//! `transport_maps`, with `"*"` as the default) or the domain's MX hosts
//! (RFC 5321 §5.1: preference order, implicit MX from A/AAAA, RFC 7505 null
//! MX). Answers are cached by the resolver for their TTL.
//!
//! A destination that leads back to this relay (an MX host or route at one
//! of its own listening addresses, or its VIP) is a loop: the hosts from
//! the first such one on are dropped (more preferred MX hosts are still
//! tried, as Postfix does when it is a backup MX), and a domain left with
//! none bounces with `5.4.6`.
use std::{
    collections::{HashMap, HashSet},
    net::{IpAddr, SocketAddr},
    time::Duration,
};

use anyhow::Context;
use hickory_resolver::{
    TokioResolver,
    config::{ConnectionConfig, NameServerConfig, ResolverConfig},
    net::runtime::TokioRuntimeProvider,
    proto::rr::{RData, RecordType},
};
use serde::{Deserialize, Serialize};

use crate::smtp::reply::Reply;

/// `[dns]` in the relay config: the resolver for MX lookups.
#[derive(Debug, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DnsConfig {
    /// Name servers as `ip` or `ip:port`; empty = the system resolver (`/etc/resolv.conf`).
    #[serde(default)]
    pub nameservers: Vec<String>,
    /// Entries in the resolver's cache; 0 = the resolver's default.
    #[serde(default)]
    pub cache_size: u64,
    /// Per-query timeout; none = the resolver's default.
    #[serde(default, with = "humantime_serde")]
    pub timeout: Option<Duration>,
}

/// One host to try, with its addresses in order.
#[derive(Clone, Debug)]
pub struct Host {
    pub name: String,
    pub addrs: Vec<SocketAddr>,
}

/// Why there is nowhere to deliver.
#[derive(Clone, Debug, thiserror::Error)]
pub enum RouteError {
    /// Try again later (DNS timeout, SERVFAIL).
    #[error("{0}")]
    Temporary(Reply),
    /// Bounce (no such domain, null MX).
    #[error("{0}")]
    Permanent(Reply),
}

impl RouteError {
    pub fn reply(&self) -> &Reply {
        match self {
            Self::Temporary(r) | Self::Permanent(r) => r,
        }
    }
}

/// A static next hop: `host:port`.
#[derive(Clone, Debug)]
struct NextHop {
    host: String,
    port: u16,
}

pub struct Router {
    routes: HashMap<String, NextHop>,
    default: Option<NextHop>,
    resolver: TokioResolver,
    mx_port: u16,
    myself: Myself,
}

/// The addresses at which this relay receives mail.
#[derive(Clone, Debug, Default)]
pub struct Myself {
    addrs: HashSet<SocketAddr>,
    /// Ports of listeners on the unspecified address: every local address
    /// on them is this relay.
    any_ports: HashSet<u16>,
}

impl Myself {
    /// `listeners`, and each of `extra` (a VIP, a NAT address) on every listener's port.
    pub fn new(listeners: impl IntoIterator<Item = SocketAddr>, extra: &[IpAddr]) -> Self {
        let mut me = Self::default();
        for l in listeners {
            if l.ip().is_unspecified() {
                me.any_ports.insert(l.port());
            } else {
                me.addrs.insert(l);
            }
            me.addrs
                .extend(extra.iter().map(|ip| SocketAddr::new(*ip, l.port())));
        }
        me
    }

    /// Whether mail sent to `addr` reaches this relay.
    pub fn is_me(&self, addr: SocketAddr) -> bool {
        let addr = SocketAddr::new(addr.ip().to_canonical(), addr.port());
        self.addrs.contains(&addr) || (self.any_ports.contains(&addr.port()) && is_local(addr.ip()))
    }
}

/// An address of this host: loopback, or one a socket can bind to (the
/// kernel refuses an address no interface has).
fn is_local(ip: IpAddr) -> bool {
    ip.is_loopback() || ip.is_unspecified() || std::net::UdpSocket::bind((ip, 0)).is_ok()
}

fn parse_hop(s: &str) -> anyhow::Result<NextHop> {
    let s = s.trim();
    let (host, port) = if let Some(rest) = s.strip_prefix('[') {
        let (h, p) = rest.split_once(']').context("unclosed [")?;
        (h, p.strip_prefix(':').unwrap_or("25"))
    } else {
        s.rsplit_once(':').unwrap_or((s, "25"))
    };
    Ok(NextHop {
        host: host.to_owned(),
        port: port.parse().context("bad port")?,
    })
}

fn parse_nameserver(s: &str) -> anyhow::Result<(IpAddr, u16)> {
    if let Ok(sa) = s.parse::<SocketAddr>() {
        return Ok((sa.ip(), sa.port()));
    }
    Ok((s.parse().context("nameserver must be ip or ip:port")?, 53))
}

/// The DNS resolver of `[dns]`: the listed name servers (UDP, then TCP), or
/// the system's. Shared by routing and `relay check-identity`.
pub fn resolver(dns: &DnsConfig) -> anyhow::Result<TokioResolver> {
    let mut builder = if dns.nameservers.is_empty() {
        TokioResolver::builder_tokio().context("read the system resolver configuration")?
    } else {
        let mut servers = Vec::new();
        for ns in &dns.nameservers {
            let (ip, port) =
                parse_nameserver(ns).with_context(|| format!("dns.nameservers {ns:?}"))?;
            let mut udp = ConnectionConfig::udp();
            udp.port = port;
            let mut tcp = ConnectionConfig::tcp();
            tcp.port = port;
            servers.push(NameServerConfig::new(ip, true, vec![udp, tcp]));
        }
        let mut config = ResolverConfig::default();
        config.name_servers = servers;
        TokioResolver::builder_with_config(config, TokioRuntimeProvider::default())
    };
    let opts = builder.options_mut();
    if dns.cache_size > 0 {
        opts.cache_size = dns.cache_size;
    }
    if let Some(t) = dns.timeout {
        opts.timeout = t;
    }
    opts.attempts = 2;
    builder.build().context("build DNS resolver")
}

impl Router {
    pub fn new(
        routes: &HashMap<String, String>,
        dns: &DnsConfig,
        mx_port: u16,
        myself: Myself,
    ) -> anyhow::Result<Self> {
        let mut table = HashMap::new();
        let mut default = None;
        for (domain, hop) in routes {
            let hop = parse_hop(hop).with_context(|| format!("route {domain} = {hop:?}"))?;
            if domain == "*" {
                default = Some(hop);
            } else {
                table.insert(domain.to_ascii_lowercase(), hop);
            }
        }
        let resolver = resolver(dns)?;
        Ok(Self {
            routes: table,
            default,
            resolver,
            mx_port,
            myself,
        })
    }

    /// The hosts for `domain`, best first, without this relay itself (see
    /// the module docs).
    pub async fn resolve(&self, domain: &str) -> Result<Vec<Host>, RouteError> {
        let mut hosts = self.lookup(domain).await?;
        if let Some(at) = hosts
            .iter()
            .position(|h| h.addrs.iter().any(|a| self.myself.is_me(*a)))
        {
            hosts.truncate(at);
        }
        if hosts.is_empty() {
            return Err(RouteError::Permanent(Reply::local(
                554,
                "5.4.6",
                format!("mail for {domain} loops back to myself"),
            )));
        }
        Ok(hosts)
    }

    async fn lookup(&self, domain: &str) -> Result<Vec<Host>, RouteError> {
        if let Some(hop) = self.routes.get(domain).or(self.default.as_ref()) {
            let hop = hop.clone();
            let addrs = self.addresses(&hop.host, hop.port).await?;
            return Ok(vec![Host {
                name: hop.host,
                addrs,
            }]);
        }
        let fqdn = format!("{}.", domain.trim_end_matches('.'));
        match self.resolver.lookup(fqdn.as_str(), RecordType::MX).await {
            Ok(lookup) => {
                let mut mx: Vec<(u16, String)> = lookup
                    .answers()
                    .iter()
                    .filter_map(|r| match &r.data {
                        RData::MX(m) => Some((m.preference, m.exchange.to_ascii())),
                        _ => None,
                    })
                    .collect();
                if mx.is_empty() {
                    return self.implicit_mx(&fqdn, domain).await;
                }
                // RFC 7505: a single MX with exchange "." means "accepts no mail".
                if mx.len() == 1 && (mx[0].1 == "." || mx[0].1.is_empty()) {
                    return Err(RouteError::Permanent(Reply::local(
                        556,
                        "5.1.10",
                        format!(
                            "Recipient address rejected: domain {domain} does not accept mail (null MX)"
                        ),
                    )));
                }
                mx.sort_by_key(|(pref, _)| *pref);
                let mut hosts = Vec::new();
                let mut last_err = None;
                for (_, name) in mx {
                    if name == "." {
                        continue;
                    }
                    match self.addresses(&name, self.mx_port).await {
                        Ok(addrs) => hosts.push(Host {
                            name: name.trim_end_matches('.').to_owned(),
                            addrs,
                        }),
                        Err(e) => last_err = Some(e),
                    }
                }
                if hosts.is_empty() {
                    return Err(last_err.unwrap_or_else(|| {
                        RouteError::Temporary(Reply::local(
                            451,
                            "4.4.4",
                            format!("no usable MX host for {domain}"),
                        ))
                    }));
                }
                Ok(hosts)
            }
            Err(e) if e.is_nx_domain() => Err(RouteError::Permanent(Reply::local(
                550,
                "5.1.2",
                format!("Host or domain name not found: {domain} (NXDOMAIN)"),
            ))),
            Err(e) if e.is_no_records_found() => self.implicit_mx(&fqdn, domain).await,
            Err(e) => Err(RouteError::Temporary(Reply::local(
                451,
                "4.4.3",
                format!("DNS lookup of MX for {domain} failed: {e}"),
            ))),
        }
    }

    /// RFC 5321 §5.1: no MX records → the domain itself is the host.
    async fn implicit_mx(&self, fqdn: &str, domain: &str) -> Result<Vec<Host>, RouteError> {
        let addrs = self
            .addresses(fqdn, self.mx_port)
            .await
            .map_err(|e| match e {
                RouteError::Permanent(_) => RouteError::Permanent(Reply::local(
                    550,
                    "5.1.2",
                    format!("Host or domain name not found: {domain} has no MX and no address"),
                )),
                t @ RouteError::Temporary(_) => t,
            })?;
        Ok(vec![Host {
            name: domain.to_owned(),
            addrs,
        }])
    }

    async fn addresses(&self, host: &str, port: u16) -> Result<Vec<SocketAddr>, RouteError> {
        if let Ok(ip) = host.parse::<IpAddr>() {
            return Ok(vec![SocketAddr::new(ip, port)]);
        }
        match self.resolver.lookup_ip(host).await {
            Ok(ips) => {
                let addrs: Vec<_> = ips.iter().map(|ip| SocketAddr::new(ip, port)).collect();
                if addrs.is_empty() {
                    Err(RouteError::Permanent(Reply::local(
                        550,
                        "5.4.4",
                        format!("{host} has no address"),
                    )))
                } else {
                    Ok(addrs)
                }
            }
            Err(e) if e.is_nx_domain() || e.is_no_records_found() => Err(RouteError::Permanent(
                Reply::local(550, "5.4.4", format!("Host not found: {host}")),
            )),
            Err(e) => Err(RouteError::Temporary(Reply::local(
                451,
                "4.4.3",
                format!("DNS lookup of {host} failed: {e}"),
            ))),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn myself_is_each_listener_and_each_extra_address_on_listener_ports() {
        let me = Myself::new(
            [
                "127.0.0.1:2525".parse().unwrap(),
                "[::]:587".parse().unwrap(),
            ],
            &["203.0.113.10".parse().unwrap()],
        );
        assert!(me.is_me("127.0.0.1:2525".parse().unwrap()));
        assert!(!me.is_me("127.0.0.1:2526".parse().unwrap()));
        assert!(me.is_me("203.0.113.10:2525".parse().unwrap()));
        assert!(me.is_me("203.0.113.10:587".parse().unwrap()));
        // A wildcard listener: every local address on its port.
        assert!(me.is_me("127.0.0.7:587".parse().unwrap()));
        assert!(me.is_me("[::ffff:127.0.0.1]:2525".parse().unwrap()));
        assert!(!me.is_me("192.0.2.1:587".parse().unwrap()));
    }

    #[tokio::test]
    async fn a_route_to_myself_bounces_5_4_6_and_one_elsewhere_does_not() {
        let routes = HashMap::from([
            ("loop.test".to_owned(), "127.0.0.1:2525".to_owned()),
            ("ok.test".to_owned(), "127.0.0.1:2526".to_owned()),
        ]);
        let me = Myself::new(["127.0.0.1:2525".parse().unwrap()], &[]);
        let r = Router::new(&routes, &DnsConfig::default(), 25, me).unwrap();
        let err = r.resolve("loop.test").await.unwrap_err();
        assert!(matches!(err, RouteError::Permanent(_)));
        assert_eq!(
            err.reply().enhanced,
            crate::smtp::reply::EnhancedCode::parse("5.4.6")
        );
        assert_eq!(
            err.reply().text(),
            "mail for loop.test loops back to myself"
        );
        assert_eq!(r.resolve("ok.test").await.unwrap().len(), 1);
    }

    #[test]
    fn hops_parse() {
        let h = parse_hop("127.0.0.1:2525").unwrap();
        assert_eq!((h.host.as_str(), h.port), ("127.0.0.1", 2525));
        let h = parse_hop("[::1]:26").unwrap();
        assert_eq!((h.host.as_str(), h.port), ("::1", 26));
        let h = parse_hop("mx.example").unwrap();
        assert_eq!((h.host.as_str(), h.port), ("mx.example", 25));
    }
}
