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
use crate::smtp::client::ClientTimeouts;

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

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    pub address: SocketAddr,
    /// A submission listener (587, or 465 with `tls = "implicit"`): offers
    /// AUTH over TLS and relays only for authenticated users.
    #[serde(default)]
    pub submission: bool,
    /// `"starttls"` (default): plaintext, `STARTTLS` offered when `[tls]` is
    /// set. `"implicit"`: TLS from the first byte (port 465, RFC 8314 §3.3);
    /// needs `[tls]`.
    #[serde(default)]
    pub tls: ListenerTls,
}

/// How a listener starts TLS.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum ListenerTls {
    #[default]
    Starttls,
    Implicit,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct UserConfig {
    pub name: String,
    pub password: String,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct TlsConfig {
    /// PEM certificate chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Largest message accepted (advertised in `SIZE`), bytes.
    #[serde(default = "Limits::default_max_message_size")]
    pub max_message_size: u64,
    /// Recipients per transaction (RFC 5321 §4.5.3.1.8 asks for at least 100).
    #[serde(default = "Limits::default_max_recipients")]
    pub max_recipients: usize,
    /// Concurrent ingress connections, all listeners together.
    #[serde(default = "Limits::default_max_connections")]
    pub max_connections: usize,
    /// Concurrent ingress connections from one client address (like Postfix
    /// `smtpd_client_connection_count_limit`), so one client cannot take
    /// every slot; 0 = no limit.
    #[serde(default = "Limits::default_max_connections_per_client")]
    pub max_connections_per_client: usize,
    /// Protocol errors before the session is closed.
    #[serde(default = "Limits::default_max_errors")]
    pub max_errors: u32,
}

impl Limits {
    fn default_max_message_size() -> u64 {
        50 * 1024 * 1024
    }
    fn default_max_recipients() -> usize {
        1000
    }
    fn default_max_connections() -> usize {
        1000
    }
    fn default_max_connections_per_client() -> usize {
        50
    }
    fn default_max_errors() -> u32 {
        20
    }
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_message_size: Self::default_max_message_size(),
            max_recipients: Self::default_max_recipients(),
            max_connections: Self::default_max_connections(),
            max_connections_per_client: Self::default_max_connections_per_client(),
            max_errors: Self::default_max_errors(),
        }
    }
}

/// Ingress timeouts, one per phase (RFC 5321 §4.5.3.2 gives the server 5 minutes).
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct IngressTimeouts {
    /// Waiting for a command line.
    #[serde(default = "IngressTimeouts::default_command", with = "humantime_serde")]
    pub command: Duration,
    /// Waiting for the next chunk of message data.
    #[serde(default = "IngressTimeouts::default_data", with = "humantime_serde")]
    pub data: Duration,
    /// Writing a reply (a client that never reads).
    #[serde(default = "IngressTimeouts::default_write", with = "humantime_serde")]
    pub write: Duration,
    /// The TLS handshake (after `STARTTLS`, or at connect on an implicit-TLS listener).
    #[serde(default = "IngressTimeouts::default_tls", with = "humantime_serde")]
    pub tls_handshake: Duration,
    /// Longest a session may last, however busy: at the next command or
    /// data read after it, the client gets `421 4.4.2` and is disconnected
    /// (a transaction already answered is never cut off).
    #[serde(default = "IngressTimeouts::default_session", with = "humantime_serde")]
    pub session: Duration,
    /// On shutdown, how long a session in the middle of a transaction may take to finish.
    #[serde(
        default = "IngressTimeouts::default_shutdown_grace",
        with = "humantime_serde"
    )]
    pub shutdown_grace: Duration,
}

impl IngressTimeouts {
    fn default_command() -> Duration {
        Duration::from_mins(5)
    }
    fn default_data() -> Duration {
        Duration::from_mins(3)
    }
    fn default_write() -> Duration {
        Duration::from_mins(1)
    }
    fn default_tls() -> Duration {
        Duration::from_secs(30)
    }
    fn default_session() -> Duration {
        Duration::from_hours(1)
    }
    fn default_shutdown_grace() -> Duration {
        Duration::from_secs(30)
    }
}

impl Default for IngressTimeouts {
    fn default() -> Self {
        Self {
            command: Self::default_command(),
            data: Self::default_data(),
            write: Self::default_write(),
            tls_handshake: Self::default_tls(),
            session: Self::default_session(),
            shutdown_grace: Self::default_shutdown_grace(),
        }
    }
}

#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeliveryConfig {
    /// TCP port for MX delivery (25; other values are for tests and labs).
    #[serde(default = "DeliveryConfig::default_port")]
    pub port: u16,
    /// Source address to bind before connecting (the egress source); none = the kernel's choice.
    #[serde(default)]
    pub source_ip: Option<IpAddr>,
    /// `EHLO` name; defaults to `hostname`.
    #[serde(default)]
    pub helo_name: Option<String>,
    /// Concurrent connections per destination (the MX host set of a
    /// domain, or its static route) within each ready queue (egress source,
    /// provider): one slow or dead destination holds at most this many
    /// (Postfix `default_destination_concurrency_limit`).
    #[serde(default = "DeliveryConfig::default_connections")]
    pub connections_per_destination: usize,
    /// Concurrent connections per ready queue (egress source, provider),
    /// all its destinations together (Postfix `default_process_limit`). A
    /// shaping file's `connection_limit` caps a provider further.
    #[serde(default = "DeliveryConfig::default_connections_per_queue")]
    pub connections_per_queue: usize,
    /// Messages sent over one connection before it is closed.
    #[serde(default = "DeliveryConfig::default_messages_per_connection")]
    pub messages_per_connection: usize,
    /// Use STARTTLS when the server offers it (opportunistic: the certificate is not verified).
    #[serde(default = "DeliveryConfig::default_starttls")]
    pub starttls: bool,
    /// After a failed TLS handshake with a host, deliver to it in plain
    /// text for this long before trying TLS again (Postfix at level `may`
    /// falls back the same way); logged and counted.
    #[serde(
        default = "DeliveryConfig::default_plaintext_fallback",
        with = "humantime_serde"
    )]
    pub plaintext_fallback: Duration,
    /// MX hosts that get mail only over TLS (no fallback; a host without
    /// `STARTTLS` defers): a name, or a suffix starting with `.`.
    #[serde(default)]
    pub require_tls: Vec<String>,
    /// Most `Received:` headers a message may carry; one with more bounces
    /// with `5.4.6` (a mail loop; Postfix `hopcount_limit`).
    #[serde(default = "DeliveryConfig::default_hop_limit")]
    pub hop_limit: usize,
    /// Addresses that reach this relay besides its listeners (the
    /// balancer's VIP, a NAT address): an MX host or route at one of them,
    /// on a listener's port, is a loop and bounces with `5.4.6`.
    #[serde(default)]
    pub own_addresses: Vec<IpAddr>,
    #[serde(default)]
    pub timeouts: ClientTimeouts,
}

impl DeliveryConfig {
    /// What serde cannot say: limits that would stop all delivery.
    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.hop_limit >= 1,
            "hop_limit = 0 would bounce every message (the relay's own Received: header counts)"
        );
        anyhow::ensure!(
            self.connections_per_destination >= 1 && self.connections_per_queue >= 1,
            "connections_per_destination and connections_per_queue must be at least 1"
        );
        if let Some(bad) = self
            .require_tls
            .iter()
            .find(|h| h.trim_start_matches('.').is_empty())
        {
            anyhow::bail!("require_tls entry {bad:?} names no host");
        }
        Ok(())
    }

    fn default_port() -> u16 {
        25
    }
    fn default_connections() -> usize {
        20
    }
    fn default_connections_per_queue() -> usize {
        100
    }
    fn default_plaintext_fallback() -> Duration {
        Duration::from_hours(1)
    }
    fn default_hop_limit() -> usize {
        50
    }
    fn default_messages_per_connection() -> usize {
        1000
    }
    fn default_starttls() -> bool {
        true
    }
}

impl Default for DeliveryConfig {
    fn default() -> Self {
        Self {
            port: Self::default_port(),
            source_ip: None,
            helo_name: None,
            connections_per_destination: Self::default_connections(),
            connections_per_queue: Self::default_connections_per_queue(),
            messages_per_connection: Self::default_messages_per_connection(),
            starttls: Self::default_starttls(),
            plaintext_fallback: Self::default_plaintext_fallback(),
            require_tls: Vec::new(),
            hop_limit: Self::default_hop_limit(),
            own_addresses: Vec::new(),
            timeouts: ClientTimeouts::default(),
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
