//! `[announce]`: announcing the VIPs to ECMP routers over BGP (docs/lb.md).
//!
//! ```toml
//! [announce]
//! enabled = true
//! local_as = 64513
//! router_id = "198.51.100.2"     # default: bird picks an IPv4 address of the node
//! hold_time = "3s"               # BGP hold time (3s..=65535s); keepalive below it
//! keepalive = "1s"
//! bird = "/usr/sbin/bird"
//!
//! [[announce.peers]]
//! address = "198.51.100.254"
//! as = 64512
//! ```
use std::{
    net::{IpAddr, Ipv4Addr},
    path::PathBuf,
    time::Duration,
};

use serde::Deserialize;

/// `[announce]`. Off by default: a node without it announces nothing.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AnnounceConfig {
    /// Run `bird` and announce the VIPs while the node is healthy.
    #[serde(default)]
    pub enabled: bool,
    /// This node's AS number.
    #[serde(default)]
    pub local_as: u32,
    /// BGP router id; bird picks one of the node's IPv4 addresses when unset.
    #[serde(default)]
    pub router_id: Option<Ipv4Addr>,
    /// BGP hold time: how long a router keeps the route of a node that went
    /// silent without closing its session (a crashed machine, a cut link).
    #[serde(
        default = "AnnounceConfig::default_hold_time",
        with = "crate::config::duration"
    )]
    pub hold_time: Duration,
    /// BGP keepalive interval, at most half the hold time.
    #[serde(
        default = "AnnounceConfig::default_keepalive",
        with = "crate::config::duration"
    )]
    pub keepalive: Duration,
    /// The bird 2 daemon (Debian package `bird2`).
    #[serde(default = "AnnounceConfig::default_bird")]
    pub bird: PathBuf,
    /// The routers to announce to.
    #[serde(default)]
    pub peers: Vec<Peer>,
}

/// One BGP neighbour (an ECMP router).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct Peer {
    pub address: IpAddr,
    /// Its AS number.
    #[serde(rename = "as")]
    pub asn: u32,
}

impl Default for AnnounceConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            local_as: 0,
            router_id: None,
            hold_time: Self::default_hold_time(),
            keepalive: Self::default_keepalive(),
            bird: Self::default_bird(),
            peers: Vec::new(),
        }
    }
}

impl AnnounceConfig {
    fn default_hold_time() -> Duration {
        Duration::from_secs(3)
    }

    fn default_keepalive() -> Duration {
        Duration::from_secs(1)
    }

    fn default_bird() -> PathBuf {
        PathBuf::from("/usr/sbin/bird")
    }

    /// Checks what serde cannot, given the VIPs to announce. Errors are
    /// `(field, problem)`, the field named as the file writes it.
    pub fn validate(&self, vips: &[IpAddr]) -> Result<(), (String, String)> {
        if !self.enabled {
            return Ok(());
        }
        let bad = |field: &str, problem: String| Err((format!("announce.{field}"), problem));
        if self.local_as == 0 {
            return bad(
                "local_as",
                "missing or 0; give this node's AS number".into(),
            );
        }
        let hold = self.hold_time;
        if hold.subsec_nanos() != 0 || !(3..=65535).contains(&hold.as_secs()) {
            return bad(
                "hold_time",
                format!("{hold:?} is not whole seconds in 3s..=65535s (BGP, RFC 4271 4.2)"),
            );
        }
        let keep = self.keepalive;
        if keep.subsec_nanos() != 0 || keep.is_zero() || keep * 2 > hold {
            return bad(
                "keepalive",
                format!(
                    "{keep:?} is not whole seconds, at least 1s and at most half the hold_time ({hold:?})"
                ),
            );
        }
        if self.peers.is_empty() {
            return bad(
                "peers",
                "none; add [[announce.peers]] with address and as".into(),
            );
        }
        for (i, p) in self.peers.iter().enumerate() {
            if p.asn == 0 {
                return bad(&format!("peers[{i}].as"), "missing or 0".into());
            }
            if p.address.is_unspecified() || p.address.is_multicast() {
                return bad(
                    &format!("peers[{i}].address"),
                    format!("{} is not a router's address", p.address),
                );
            }
            if self.peers[..i].iter().any(|o| o.address == p.address) {
                return bad(
                    &format!("peers[{i}].address"),
                    format!("{} is listed twice", p.address),
                );
            }
        }
        for family_v4 in [true, false] {
            let vip = vips.iter().find(|v| v.is_ipv4() == family_v4);
            if let Some(vip) = vip
                && !self.peers.iter().any(|p| p.address.is_ipv4() == family_v4)
            {
                return bad(
                    "peers",
                    format!("no peer of the VIP {vip}'s address family to announce it to"),
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> AnnounceConfig {
        AnnounceConfig {
            enabled: true,
            local_as: 64513,
            peers: vec![Peer {
                address: "198.51.100.254".parse().unwrap(),
                asn: 64512,
            }],
            ..AnnounceConfig::default()
        }
    }

    fn err(c: &AnnounceConfig) -> String {
        let vips = ["203.0.113.10".parse().unwrap()];
        let (field, problem) = c.validate(&vips).unwrap_err();
        format!("{field}: {problem}")
    }

    #[test]
    fn off_by_default_and_a_good_section_passes() {
        assert!(!AnnounceConfig::default().enabled);
        assert_eq!(AnnounceConfig::default().validate(&[]), Ok(()));
        assert_eq!(cfg().validate(&["203.0.113.10".parse().unwrap()]), Ok(()));
    }

    #[test]
    fn a_bad_section_in_lb_toml_is_refused_with_its_line() {
        use crate::config::lb::{ConfigError, LbConfig, locate};
        let text = "[announce]\nenabled = true\nlocal_as = 64513\n\n\
                    [[announce.peers]]\naddress = \"198.51.100.254\"\nas = 64512\n\n\
                    [[announce.peers]]\naddress = \"198.51.100.254\"\nas = 64512\n\n\
                    [[services]]\nvip = \"203.0.113.10\"\nports = [25]\n\
                    [[services.backends]]\nname = \"r1\"\naddress = \"198.51.100.11\"\nforwarding = \"ipip\"\n";
        let Err(ConfigError::Invalid { field, problem }) = LbConfig::parse(text) else {
            panic!("accepted a peer listed twice");
        };
        assert_eq!(field, "announce.peers[1].address", "{problem}");
        assert_eq!(locate(text, &field), Some(10));
        let unknown = LbConfig::parse("[announce]\nenable = true\n").unwrap_err();
        assert!(
            unknown.to_string().contains("unknown field `enable`"),
            "{unknown}"
        );
    }

    #[test]
    fn bad_sections_name_the_field() {
        let mut c = cfg();
        c.local_as = 0;
        assert!(err(&c).starts_with("announce.local_as: "), "{}", err(&c));
        let mut c = cfg();
        c.hold_time = Duration::from_secs(2);
        assert!(err(&c).starts_with("announce.hold_time: "), "{}", err(&c));
        let mut c = cfg();
        c.keepalive = Duration::from_secs(2);
        assert!(err(&c).starts_with("announce.keepalive: "), "{}", err(&c));
        let mut c = cfg();
        c.peers.push(c.peers[0].clone());
        assert!(
            err(&c).starts_with("announce.peers[1].address: "),
            "{}",
            err(&c)
        );
        let mut c = cfg();
        c.peers[0].address = "2001:db8::1".parse().unwrap();
        assert!(
            err(&c).contains("no peer of the VIP 203.0.113.10"),
            "{}",
            err(&c)
        );
        let mut c = cfg();
        c.peers.clear();
        assert!(err(&c).starts_with("announce.peers: "), "{}", err(&c));
    }
}
