//! The relay's configuration file (TOML). Every field has a default except
//! `spool_dir` and at least one listener.
use std::{
    collections::HashMap,
    net::{IpAddr, SocketAddr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::Context;
use serde::{Deserialize, Serialize};

use super::{
    dkim::DkimConfig, egress::EgressConfig, policy::cluster::ClusterConfig, route::DnsConfig,
};

mod delivery;
mod ingress;

pub use delivery::DeliveryConfig;
pub use ingress::{IngressTimeouts, Limits, ListenerConfig, ListenerTls, TlsConfig, UserConfig};

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Name in the greeting, in `EHLO` to other servers, and in `Received:`.
    #[serde(default = "Config::default_hostname")]
    pub hostname: String,
    /// Directory of the durable spool (segments, `corrupt/`).
    pub spool_dir: PathBuf,
    /// Spool maintenance.
    #[serde(default)]
    pub spool: SpoolConfig,
    /// SMTP listeners.
    #[serde(rename = "listener")]
    pub listeners: Vec<ListenerConfig>,
    /// Client networks allowed to relay without authentication (CIDR).
    #[serde(default)]
    pub relay_networks: Vec<String>,
    /// Users for `AUTH PLAIN`/`LOGIN` on submission listeners.
    #[serde(default, rename = "user")]
    pub users: Vec<UserConfig>,
    /// Certificate and key for `STARTTLS`; without them STARTTLS is not offered.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub timeouts: IngressTimeouts,
    #[serde(default)]
    pub delivery: DeliveryConfig,
    #[serde(default)]
    pub retry: RetryConfig,
    #[serde(default)]
    pub dns: DnsConfig,
    /// Static routes, recipient domain → `host:port` (like Postfix
    /// `transport_maps`); the key `"*"` is the default for every other domain.
    /// A host given by name is resolved by A/AAAA, never MX.
    #[serde(default)]
    pub routes: HashMap<String, String>,
    /// JSON-lines delivery log; none by default.
    #[serde(default)]
    pub delivery_log: Option<PathBuf>,
    /// Shaping file (per-provider limits, see `relay::policy::shaping`); none = no limits.
    #[serde(default)]
    pub shaping: Option<PathBuf>,
    /// Limits shared by every relay through Redis (see `relay::policy::cluster`); none = local limits.
    #[serde(default)]
    pub cluster: Option<ClusterConfig>,
    /// DKIM signing keys, one per sending domain (see `relay::dkim`).
    #[serde(default)]
    pub dkim: Vec<DkimConfig>,
    /// Admin API (bearer token): the queue API used by `smtp-lb ctl relay`,
    /// `/metrics`, reload. Loopback only unless `admin_allow_remote`.
    #[serde(default)]
    pub admin: Option<SocketAddr>,
    /// File with the admin API's bearer token; created (random, mode 0600)
    /// when missing. Default: `<spool_dir>/admin.token`.
    #[serde(default)]
    pub admin_token_file: Option<PathBuf>,
    /// Allow `admin` on a non-loopback address (plain HTTP: the token
    /// crosses the network in clear).
    #[serde(default)]
    pub admin_allow_remote: bool,
    /// Metrics listener, no token: `/metrics`, `/healthz`, `/readyz`
    /// (docs/metrics.md). Any address; none = off.
    #[serde(default)]
    pub metrics: Option<SocketAddr>,
    /// Egress sources, pools and warmup (see `relay::egress`); none = one
    /// source from `delivery.source_ip` / `helo_name`.
    #[serde(default)]
    pub egress: Option<EgressConfig>,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct SpoolConfig {
    /// How often mostly finished segments (≥ 1 MiB, ≤ ¼ live) are
    /// compacted: their live messages are copied forward, durably, and the
    /// segment is removed, so one long-deferred message cannot pin a
    /// segment of finished mail.
    #[serde(
        default = "SpoolConfig::default_compact_interval",
        with = "humantime_serde"
    )]
    pub compact_interval: Duration,
}

impl SpoolConfig {
    fn default_compact_interval() -> Duration {
        Duration::from_mins(1)
    }
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            compact_interval: Self::default_compact_interval(),
        }
    }
}

/// Retry schedule for temporary failures: `min · 2^attempt`, capped at `max`,
/// with ±`jitter` spread; a message older than `max_age` is bounced.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RetryConfig {
    #[serde(default = "RetryConfig::default_min", with = "humantime_serde")]
    pub min: Duration,
    #[serde(default = "RetryConfig::default_max", with = "humantime_serde")]
    pub max: Duration,
    #[serde(default = "RetryConfig::default_max_age", with = "humantime_serde")]
    pub max_age: Duration,
    /// Fraction of the delay added or removed at random (0.0–1.0).
    #[serde(default = "RetryConfig::default_jitter")]
    pub jitter: f64,
}

impl RetryConfig {
    fn default_min() -> Duration {
        Duration::from_mins(5)
    }
    fn default_max() -> Duration {
        Duration::from_secs(4000)
    }
    fn default_max_age() -> Duration {
        Duration::from_hours(5 * 24)
    }
    fn default_jitter() -> f64 {
        0.2
    }
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            min: Self::default_min(),
            max: Self::default_max(),
            max_age: Self::default_max_age(),
            jitter: Self::default_jitter(),
        }
    }
}

impl Config {
    /// The name said in `EHLO` to other servers: `delivery.helo_name`, else `hostname`.
    pub fn default_helo(&self) -> &str {
        self.delivery.helo_name.as_deref().unwrap_or(&self.hostname)
    }

    fn default_hostname() -> String {
        std::fs::read_to_string("/etc/hostname")
            .map_or_else(|_| "localhost".to_owned(), |s| s.trim().to_owned())
    }

    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("read relay config {}", path.display()))?;
        let cfg: Self = toml::from_str(&text)
            .with_context(|| format!("parse relay config {}", path.display()))?;
        anyhow::ensure!(
            !cfg.listeners.is_empty(),
            "relay config {}: no [[listener]]",
            path.display()
        );
        for n in &cfg.relay_networks {
            Cidr::parse(n).with_context(|| format!("relay_networks entry {n:?}"))?;
        }
        cfg.delivery
            .check()
            .with_context(|| format!("relay config {}: [delivery]", path.display()))?;
        if let Some(a) = cfg.admin
            && !a.ip().is_loopback()
            && !cfg.admin_allow_remote
        {
            anyhow::bail!(
                "relay config {}: admin: {a} is not a loopback address; set admin_allow_remote = true to serve the admin API beyond this host",
                path.display()
            );
        }
        if let Some(l) = cfg
            .listeners
            .iter()
            .find(|l| l.tls == ListenerTls::Implicit && cfg.tls.is_none())
        {
            anyhow::bail!(
                "relay config {}: listener {}: tls = \"implicit\" needs a [tls] certificate and key",
                path.display(),
                l.address
            );
        }
        Ok(cfg)
    }

    /// The admin API's token file.
    pub fn admin_token_file(&self) -> PathBuf {
        self.admin_token_file
            .clone()
            .unwrap_or_else(|| self.spool_dir.join("admin.token"))
    }
}

/// An IPv4 or IPv6 network in CIDR notation.
#[derive(Clone, Copy, Debug)]
pub struct Cidr {
    addr: IpAddr,
    prefix: u8,
}

impl Cidr {
    pub fn parse(s: &str) -> anyhow::Result<Self> {
        let (a, p) = s.split_once('/').unwrap_or((s, ""));
        let addr: IpAddr = a.parse().context("bad address")?;
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = if p.is_empty() {
            max
        } else {
            p.parse().context("bad prefix")?
        };
        anyhow::ensure!(prefix <= max, "prefix /{prefix} too long");
        Ok(Self { addr, prefix })
    }

    /// The network address as written.
    pub fn addr(&self) -> IpAddr {
        self.addr
    }

    /// The prefix length in bits.
    pub fn prefix(&self) -> u8 {
        self.prefix
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(IpAddr::V6(v6), IpAddr::V4),
            v4 @ IpAddr::V4(_) => v4,
        };
        match (self.addr, ip) {
            (IpAddr::V4(n), IpAddr::V4(a)) => {
                let mask = u32::MAX
                    .checked_shl(32 - u32::from(self.prefix))
                    .unwrap_or(0);
                u32::from(n) & mask == u32::from(a) & mask
            }
            (IpAddr::V6(n), IpAddr::V6(a)) => {
                let mask = u128::MAX
                    .checked_shl(128 - u32::from(self.prefix))
                    .unwrap_or(0);
                u128::from(n) & mask == u128::from(a) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cidr_contains() {
        let n = Cidr::parse("127.0.0.0/8").unwrap();
        assert!(n.contains("127.1.2.3".parse().unwrap()));
        assert!(n.contains("::ffff:127.0.0.1".parse().unwrap()));
        assert!(!n.contains("10.0.0.1".parse().unwrap()));
        assert!(
            Cidr::parse("0.0.0.0/0")
                .unwrap()
                .contains("8.8.8.8".parse().unwrap())
        );
        assert!(
            Cidr::parse("2001:db8::/32")
                .unwrap()
                .contains("2001:db8::1".parse().unwrap())
        );
    }

    #[test]
    fn delivery_limits_that_stop_all_mail_are_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("smtp-lb-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("relay.toml");
        let base = "spool_dir = \"/tmp/s\"\n[[listener]]\naddress = \"127.0.0.1:25\"\n[delivery]\n";
        for (field, expect) in [
            ("hop_limit = 0", "hop_limit = 0"),
            ("connections_per_queue = 0", "connections_per_queue"),
            ("require_tls = [\".\"]", "require_tls entry"),
            ("hop_limt = 5", "unknown field `hop_limt`"),
        ] {
            std::fs::write(&path, format!("{base}{field}\n")).unwrap();
            let err = format!("{:#}", Config::load(&path).unwrap_err());
            assert!(err.contains(expect), "{field}: {err}");
        }
        std::fs::write(
            &path,
            format!("{base}hop_limit = 30\nown_addresses = [\"203.0.113.10\"]\n"),
        )
        .unwrap();
        let cfg = Config::load(&path).unwrap();
        assert_eq!(cfg.delivery.hop_limit, 30);
        assert_eq!(cfg.delivery.timeouts.connect, Duration::from_secs(10));
        assert_eq!(cfg.delivery.timeouts.data_block, Duration::from_mins(3));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_non_loopback_admin_needs_admin_allow_remote() {
        let dir = std::env::temp_dir().join(format!("relay-config-admin-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let load = |extra: &str| {
            let path = dir.join("relay.toml");
            std::fs::write(
                &path,
                format!(
                    "spool_dir = \"/tmp/x\"\n{extra}\n[[listener]]\naddress = \"127.0.0.1:2525\"\n"
                ),
            )
            .unwrap();
            Config::load(&path).map_err(|e| format!("{e:#}"))
        };
        let e = load("admin = \"192.0.2.1:8025\"").unwrap_err();
        assert!(
            e.contains("admin: 192.0.2.1:8025") && e.contains("admin_allow_remote"),
            "{e}"
        );
        let cfg = load("admin = \"192.0.2.1:8025\"\nadmin_allow_remote = true").unwrap();
        assert_eq!(cfg.admin, Some("192.0.2.1:8025".parse().unwrap()));
        let cfg = load("admin = \"[::1]:8025\"").unwrap();
        assert_eq!(cfg.admin_token_file(), Path::new("/tmp/x/admin.token"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_implicit_tls_listener_needs_a_certificate() {
        let dir = std::env::temp_dir().join(format!("relay-config-465-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("relay.toml");
        let listener = "[[listener]]\naddress = \"127.0.0.1:465\"\ntls = \"implicit\"\n";
        std::fs::write(&path, format!("spool_dir = \"/tmp/x\"\n{listener}")).unwrap();
        let e = format!("{:#}", Config::load(&path).unwrap_err());
        assert!(
            e.contains("listener 127.0.0.1:465") && e.contains("[tls]"),
            "{e}"
        );
        std::fs::write(
            &path,
            format!("spool_dir = \"/tmp/x\"\n[tls]\ncert = \"c\"\nkey = \"k\"\n{listener}"),
        )
        .unwrap();
        let cfg = Config::load(&path).unwrap();
        assert_eq!(cfg.listeners[0].tls, ListenerTls::Implicit);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// What the test harness relies on: a config written by serialising
    /// this type reads back as the same config.
    #[test]
    fn a_serialised_config_reads_back_the_same() {
        let text = r#"
            hostname = "relay.test"
            spool_dir = "/var/spool/smtp-lb"
            relay_networks = ["127.0.0.0/8"]
            admin = "127.0.0.1:8025"
            admin_token_file = "/etc/smtp-lb/relay.token"
            admin_allow_remote = true
            metrics = "0.0.0.0:9101"
            [[listener]]
            address = "127.0.0.1:25"
            [[listener]]
            address = "127.0.0.1:587"
            submission = true
            [[user]]
            name = "app"
            password = "secret"
            [timeouts]
            command = "1s"
            [delivery]
            port = 2525
            source_ip = "198.51.100.21"
            [delivery.timeouts]
            connect = "2s"
            [retry]
            min = "200ms"
            max_age = "1h"
            [dns]
            nameservers = ["127.0.0.1:5353"]
            timeout = "2s"
            [routes]
            "*" = "127.0.0.1:2526"
            [cluster]
            redis = "redis://127.0.0.1:6379"
            [[dkim]]
            domain = "example.com"
            selector = "s1"
            key = "/etc/smtp-lb/dkim.pem"
            [egress]
            default_pool = "main"
            [[egress.source]]
            name = "ip1"
            address = "198.51.100.21"
            warmup_start = "now"
            [[egress.pool]]
            name = "main"
            sources = [{ name = "ip1", weight = 2 }]
            [egress.warmup.google]
            daily = [50, 100]
            overflow = "wait"
        "#;
        let cfg: Config = toml::from_str(text).unwrap();
        let written = toml::to_string(&cfg).unwrap();
        let again: Config = toml::from_str(&written).unwrap_or_else(|e| panic!("{e}\n{written}"));
        assert_eq!(format!("{again:?}"), format!("{cfg:?}"));
    }
}
