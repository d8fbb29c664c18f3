//! The balancer's configuration (`smtp-lb lb --config lb.toml`): what the
//! XDP data plane needs — services (VIP × ports), their backends (relays) with
//! weights and forwarding mode, table size, stickiness — and node settings.
//!
//! ```toml
//! # Optional: where maps are pinned (the --pin-dir flag wins).
//! pin_dir = "/sys/fs/bpf/smtp-lb"
//!
//! [health]
//! panic_threshold = 0          # % of a service's weight that must be alive, else keep the last good table
//!
//! [[services]]
//! name = "mx"                  # label for logs and stats
//! vip = "203.0.113.10"         # IPv4 or IPv6
//! ports = [25, 587, 465]       # one table per port
//! table_size = 65537           # Maglev M: prime, > 100 × backends (default 65537)
//! sticky = false               # true: hash the client address only
//! p2c = false                  # true: a SYN goes to the less loaded of two table entries
//!
//! [services.checks.587]        # how relays are checked on one balanced port
//! tls = "starttls"             # "none", "starttls" or "implicit" (default: implicit on 465)
//!
//! [[services.backends]]
//! name = "relay1"              # stable name: orders the table
//! address = "198.51.100.3"
//! weight = 1                   # 0 = no new flows, existing ones stay
//! forwarding = "l2"            # "l2" (MAC rewrite) or "ipip" (IPIP / IP6IP6)
//! mac = "02:00:00:00:00:03"    # l2: the relay's MAC on the shared segment
//! ```
use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
};

use serde::Deserialize;
use smtp_lb_common::{MAX_BACKENDS, MAX_RING_SIZE, MAX_SERVICES};
use thiserror::Error;

use crate::{
    balance::{maglev::is_prime, warmup::WarmupConfig},
    health::{Check, HealthCheckConfig, Tls},
};

/// Largest configured weight: × 1000 (warmup's resolution) still fits a u32.
pub const MAX_WEIGHT: u32 = 1_000_000;

/// Default Maglev table size (the paper's and Katran's).
pub const DEFAULT_TABLE_SIZE: u32 = 65537;

/// Why a configuration was refused. Messages name the file or the field.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Not valid TOML, or a field of the wrong type, or an unknown field.
    #[error("{}: {message}", path.display())]
    Parse { path: PathBuf, message: String },
    /// A value that parses but is not acceptable.
    #[error("{field}: {problem}")]
    Invalid {
        /// Path of the field, like `services[0].table_size`.
        field: String,
        problem: String,
    },
    /// [`ConfigError::Invalid`] in a file, with the line of the field when
    /// it is written there (absent fields have defaults and no line).
    #[error("{}{}: {field}: {problem}", path.display(), line.map(|l| format!(":{l}")).unwrap_or_default())]
    InvalidAt {
        path: PathBuf,
        line: Option<usize>,
        field: String,
        problem: String,
    },
}

/// The 1-based line where `field` (a path like `services[1] (mx6).backends[0]
/// (relay1).mac`, as validation names it) is written in `text`.
pub fn locate(text: &str, field: &str) -> Option<usize> {
    let lines: Vec<&str> = text.lines().collect();
    let mut from = 0;
    let mut table = String::new();
    // Drop the " (label)" parts first: labels may contain dots (addresses).
    let mut bare = String::with_capacity(field.len());
    let mut depth = 0;
    for c in field.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            ' ' if depth == 0 => {}
            _ if depth == 0 => bare.push(c),
            _ => {}
        }
    }
    let segs: Vec<&str> = bare.split('.').collect();
    for (n, seg) in segs.iter().enumerate() {
        let seg = *seg;
        // "services[1]" → key "services", index 1; "health" → no index.
        let (key, index) = match seg.split_once('[') {
            Some((k, i)) => (k, i.trim_end_matches(']').parse::<usize>().ok()),
            None => (seg, None),
        };
        let key = key.split('/').next().unwrap_or(key);
        let name = if table.is_empty() {
            key.to_owned()
        } else {
            format!("{table}.{key}")
        };
        if let Some(i) = index {
            let header = format!("[[{name}]]");
            from = lines
                .iter()
                .enumerate()
                .skip(from)
                .filter(|(_, l)| l.trim() == header)
                .nth(i)?
                .0;
            table = name;
        } else if let Some((at, _)) = lines
            .iter()
            .enumerate()
            .skip(from)
            .find(|(_, l)| l.trim() == format!("[{name}]"))
        {
            from = at;
            table = name;
        } else if n + 1 < segs.len()
            && lines
                .iter()
                .skip(from)
                .any(|l| l.trim().starts_with(&format!("[{name}.")))
        {
            // Only a prefix of a dotted header (`[services.checks.465]`).
            table = name;
        } else {
            // A key of the current table: between its header and the next one.
            let start = if table.is_empty() { 0 } else { from + 1 };
            let found = lines[start..]
                .iter()
                .take_while(|l| !l.trim_start().starts_with('['))
                .position(|l| {
                    l.trim_start()
                        .strip_prefix(key)
                        .is_some_and(|r| r.trim_start().starts_with('='))
                });
            return Some(found.map_or(from, |i| start + i) + 1);
        }
    }
    Some(from + 1)
}

fn invalid(field: impl Into<String>, problem: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        field: field.into(),
        problem: problem.into(),
    }
}

/// The balancer's configuration file.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct LbConfig {
    /// bpffs directory for pinned maps; the `--pin-dir` flag overrides it.
    #[serde(default)]
    pub pin_dir: Option<PathBuf>,
    /// Outer IPv4 source for IPIP; its low 16 bits carry a hash of the flow (RSS
    /// entropy at the relays). Pick a /16 the relays' network accepts.
    #[serde(default = "LbConfig::default_encap_source_v4")]
    pub encap_source_v4: Ipv4Addr,
    /// Outer IPv6 source for IP6IP6; its low 32 bits carry a hash of the flow.
    #[serde(default = "LbConfig::default_encap_source_v6")]
    pub encap_source_v6: Ipv6Addr,
    /// The balanced services.
    #[serde(default)]
    pub services: Vec<ServiceConfig>,
    /// How relays are health-checked (`[health]`).
    #[serde(default)]
    pub health: HealthCheckConfig,
    /// How new and recovering relays ramp up (`[warmup]`).
    #[serde(default)]
    pub warmup: WarmupConfig,
    /// The admin API (`[admin]`).
    #[serde(default)]
    pub admin: AdminConfig,
    /// The metrics listener (`[metrics]`).
    #[serde(default)]
    pub metrics: MetricsConfig,
    /// The dashboard on the metrics listener (`[dashboard]`).
    #[serde(default)]
    pub dashboard: DashboardConfig,
    /// Relay feedback into weights, and admission (`[feedback]`).
    #[serde(default)]
    pub feedback: crate::feedback::FeedbackConfig,
    /// Directory for what must survive restarts: warmup start times, drains,
    /// operator weights, the admin token.
    #[serde(default = "LbConfig::default_state_dir")]
    pub state_dir: PathBuf,
    /// The VIPs announced over BGP to ECMP routers (`[announce]`; off by default).
    #[serde(default)]
    pub announce: crate::announce::AnnounceConfig,
}

/// `[admin]`: the HTTP admin API and metrics endpoint.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AdminConfig {
    /// Loopback address and port to listen on.
    #[serde(default = "AdminConfig::default_listen")]
    pub listen: std::net::SocketAddr,
    /// File holding the bearer token; created with a random token (mode
    /// 0600) when missing. Default: `<state_dir>/admin.token`.
    #[serde(default)]
    pub token_file: Option<PathBuf>,
}

impl AdminConfig {
    fn default_listen() -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], 9700))
    }
}

impl Default for AdminConfig {
    fn default() -> Self {
        Self {
            listen: Self::default_listen(),
            token_file: None,
        }
    }
}

/// `[metrics]`: the listener Prometheus scrapes, without a token:
/// `/metrics`, `/healthz`, `/readyz` (see docs/metrics.md).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct MetricsConfig {
    /// Address and port; any address (`0.0.0.0:9701` for a Prometheus server elsewhere).
    #[serde(default = "MetricsConfig::default_listen")]
    pub listen: std::net::SocketAddr,
}

impl MetricsConfig {
    fn default_listen() -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], 9701))
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        Self {
            listen: Self::default_listen(),
        }
    }
}

/// `[dashboard]`: the live page at `/dashboard` on the metrics listener.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct DashboardConfig {
    /// Relays' metrics listeners (`metrics` in their config): the page adds
    /// delivery and deferral rates per recipient domain from them. Empty:
    /// the balancer's own view only.
    #[serde(default)]
    pub relay_metrics: Vec<std::net::SocketAddr>,
}

impl LbConfig {
    fn default_state_dir() -> PathBuf {
        PathBuf::from("/var/lib/smtp-lb")
    }

    /// Every VIP of the services, once each, in order.
    pub fn vips(&self) -> Vec<IpAddr> {
        let mut vips: Vec<IpAddr> = self.services.iter().map(|s| s.vip).collect();
        vips.sort();
        vips.dedup();
        vips
    }

    /// The admin token file.
    pub fn token_file(&self) -> PathBuf {
        self.admin
            .token_file
            .clone()
            .unwrap_or_else(|| self.state_dir.join("admin.token"))
    }

    fn default_encap_source_v4() -> Ipv4Addr {
        Ipv4Addr::new(172, 16, 0, 0)
    }

    fn default_encap_source_v6() -> Ipv6Addr {
        Ipv6Addr::new(0xfd00, 0x736d, 0x7470, 0, 0, 0, 0, 0)
    }
}

/// One VIP with its ports and relays. Each port becomes one data-plane
/// service with its own Maglev table. The same VIP may appear in several
/// entries with different ports and relays (25 → relay1-2, 587 → relay3).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct ServiceConfig {
    /// Label for logs and stats (defaults to the VIP).
    #[serde(default)]
    pub name: Option<String>,
    /// The virtual address clients connect to (the relays hold it on `lo`).
    pub vip: IpAddr,
    /// TCP ports balanced on this VIP (25, 587, 465…).
    pub ports: Vec<u16>,
    /// Maglev table size M: a prime above 100 × the number of backends, at most 65537.
    #[serde(default = "ServiceConfig::default_table_size")]
    pub table_size: u32,
    /// Hash the client address only, so a client always reaches the same relay.
    #[serde(default)]
    pub sticky: bool,
    /// Power of two choices for new flows: a SYN goes to whichever of two
    /// table entries (Maglev's and one at a second hash of the flow) has
    /// fewer live flows. Least-connections behaviour for bursty load, at
    /// the cost of two per-CPU sums per SYN; tracked flows never move.
    #[serde(default)]
    pub p2c: bool,
    /// Per balanced port, how its relays are checked there
    /// (`[services.checks.465]`). A port not listed gets the default for
    /// its number: implicit TLS on 465, else plain SMTP, with `STARTTLS`
    /// when `health.starttls` is set.
    #[serde(default)]
    pub checks: BTreeMap<String, PortCheckConfig>,
    /// The relays behind the VIP.
    #[serde(default)]
    pub backends: Vec<BackendConfig>,
}

/// `[services.checks.<port>]`: how relays are checked on one balanced port.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct PortCheckConfig {
    /// `"none"` (plain SMTP), `"starttls"` (plain, then `STARTTLS` and
    /// `EHLO` again over TLS) or `"implicit"` (TLS first, as on 465).
    #[serde(default)]
    pub tls: Option<Tls>,
    /// The port probed on each relay's own address, when the relay serves
    /// this balanced port elsewhere too (default: the balanced port).
    #[serde(default)]
    pub port: Option<u16>,
}

impl ServiceConfig {
    fn default_table_size() -> u32 {
        DEFAULT_TABLE_SIZE
    }

    /// How this service's relays are checked for balanced `port`.
    pub fn check(&self, port: u16, health: &HealthCheckConfig) -> Check {
        let set = self.checks.get(&port.to_string());
        let default = Check::default_for(port, health.starttls);
        Check {
            port: set.and_then(|c| c.port).unwrap_or(port),
            tls: set.and_then(|c| c.tls).unwrap_or(default.tls),
        }
    }

    /// The label: `name`, else the VIP.
    pub fn label(&self) -> String {
        self.name.clone().unwrap_or_else(|| self.vip.to_string())
    }
}

/// How packets reach a backend (both are direct server return).
#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum Forwarding {
    /// Same L2 segment: rewrite the destination MAC to the relay's.
    #[default]
    L2,
    /// Across L3: IPIP (IPv4) or IP6IP6 (IPv6) to the relay's address; the
    /// relay runs `smtp-lb decap`.
    Ipip,
}

/// One relay behind a service.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct BackendConfig {
    /// Stable name (unique within the service): it orders the Maglev table,
    /// so every LB node with this config builds the same one.
    pub name: String,
    /// The relay's own address (not the VIP). Also its identity across services.
    pub address: IpAddr,
    /// Relative weight; 0 takes no new flows but keeps existing ones.
    #[serde(default = "BackendConfig::default_weight")]
    pub weight: u32,
    /// `l2` or `ipip`.
    #[serde(default)]
    pub forwarding: Forwarding,
    /// The relay's MAC (`l2`; required there, ignored for `ipip`, whose next
    /// hop comes from the kernel's FIB).
    #[serde(default)]
    pub mac: Option<Mac>,
    /// `l2`: the LB interface the relay sits behind, when it is not the one
    /// the VIP traffic arrives on (`XDP_REDIRECT` through a devmap).
    #[serde(default)]
    pub interface: Option<String>,
}

impl BackendConfig {
    fn default_weight() -> u32 {
        1
    }
}

/// A MAC address, written `02:00:00:00:00:03`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Deserialize)]
#[serde(try_from = "String")]
pub struct Mac(pub [u8; 6]);

impl TryFrom<String> for Mac {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

impl std::str::FromStr for Mac {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let mut mac = [0u8; 6];
        let parts: Vec<&str> = s.split(':').collect();
        if parts.len() != 6 {
            return Err(format!("`{s}` is not a MAC address like 02:00:00:00:00:03"));
        }
        for (m, p) in mac.iter_mut().zip(parts) {
            *m = u8::from_str_radix(p, 16)
                .map_err(|_| format!("`{s}` is not a MAC address like 02:00:00:00:00:03"))?;
        }
        Ok(Self(mac))
    }
}

impl fmt::Display for Mac {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

impl LbConfig {
    /// Reads and validates `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|e| match e {
            ConfigError::Parse { message, .. } => ConfigError::Parse {
                path: path.to_owned(),
                message,
            },
            ConfigError::Invalid { field, problem } => ConfigError::InvalidAt {
                path: path.to_owned(),
                line: locate(&text, &field),
                field,
                problem,
            },
            other => other,
        })
    }

    /// Parses and validates TOML text.
    pub fn parse(text: &str) -> Result<Self, ConfigError> {
        let cfg: Self = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: PathBuf::from("<config>"),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        cfg.validate()?;
        Ok(cfg)
    }

    /// Checks everything serde cannot: table sizes, duplicates, empty
    /// services, missing MACs, families, limits. The first problem wins.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.warmup
            .validate()
            .map_err(|(field, problem)| invalid(field, problem))?;
        self.feedback
            .validate()
            .map_err(|(field, problem)| invalid(field, problem))?;
        if self.health.rise == 0 || self.health.fall == 0 {
            return Err(invalid("health.rise/fall", "must be at least 1"));
        }
        if self.health.interval.is_zero() {
            return Err(invalid("health.interval", "must be longer than 0s"));
        }
        if self.health.panic_threshold > 100 {
            return Err(invalid(
                "health.panic_threshold",
                format!(
                    "{} is not a percentage in 0..=100",
                    self.health.panic_threshold
                ),
            ));
        }
        if !self.admin.listen.ip().is_loopback() {
            return Err(invalid(
                "admin.listen",
                format!(
                    "{} is not a loopback address; the admin API only listens on loopback",
                    self.admin.listen
                ),
            ));
        }
        let vips: Vec<IpAddr> = self.vips();
        self.announce
            .validate(&vips)
            .map_err(|(field, problem)| invalid(field, problem))?;
        let mut seen_services = BTreeSet::new();
        let mut backends_by_addr: BTreeMap<IpAddr, (String, &BackendConfig)> = BTreeMap::new();
        let mut count = 0u32;
        for (i, svc) in self.services.iter().enumerate() {
            let at = format!("services[{i}] ({})", svc.label());
            if svc.ports.is_empty() {
                return Err(invalid(
                    format!("{at}.ports"),
                    "no ports; list at least one, like [25]",
                ));
            }
            for port in &svc.ports {
                if *port == 0 {
                    return Err(invalid(format!("{at}.ports"), "port 0 is not a TCP port"));
                }
                if !seen_services.insert((svc.vip, *port)) {
                    return Err(invalid(
                        format!("{at}.ports"),
                        format!("{}:{port} is configured twice", svc.vip),
                    ));
                }
                count += 1;
                if count > MAX_SERVICES {
                    return Err(invalid(
                        format!("{at}.ports"),
                        format!(
                            "{}:{port} is VIP × port service number {count}; the data plane holds at most {MAX_SERVICES}",
                            svc.vip
                        ),
                    ));
                }
            }
            if svc.p2c && svc.sticky {
                return Err(invalid(
                    format!("{at}.p2c"),
                    "cannot be combined with sticky = true: a sticky client must always reach the same relay",
                ));
            }
            for (key, check) in &svc.checks {
                let field = format!("{at}.checks.{key}");
                if !key.parse::<u16>().is_ok_and(|p| svc.ports.contains(&p)) {
                    return Err(invalid(
                        field,
                        format!("`{key}` is not one of this service's ports {:?}", svc.ports),
                    ));
                }
                if check.port == Some(0) {
                    return Err(invalid(format!("{field}.port"), "port 0 is not a TCP port"));
                }
            }
            if svc.backends.is_empty() {
                return Err(invalid(
                    format!("{at}.backends"),
                    format!("VIP {} has no backends", svc.vip),
                ));
            }
            let n = svc.backends.len() as u64;
            let m = svc.table_size;
            if !is_prime(m) {
                return Err(invalid(
                    format!("{at}.table_size"),
                    format!("{m} is not prime"),
                ));
            }
            if u64::from(m) <= 100 * n {
                return Err(invalid(
                    format!("{at}.table_size"),
                    format!(
                        "{m} is too small for {n} backends: Maglev needs a prime above 100 × {n} = {}",
                        100 * n
                    ),
                ));
            }
            if m > MAX_RING_SIZE {
                return Err(invalid(
                    format!("{at}.table_size"),
                    format!("{m} is larger than the data plane's maximum {MAX_RING_SIZE}"),
                ));
            }
            let mut names = BTreeSet::new();
            let mut addrs = BTreeSet::new();
            for (j, b) in svc.backends.iter().enumerate() {
                let bat = format!("{at}.backends[{j}] ({})", b.name);
                if b.name.is_empty() {
                    return Err(invalid(format!("{bat}.name"), "empty name"));
                }
                if !names.insert(b.name.as_str()) {
                    return Err(invalid(
                        format!("{bat}.name"),
                        format!("duplicate backend `{}`", b.name),
                    ));
                }
                if !addrs.insert(b.address) {
                    return Err(invalid(
                        format!("{bat}.address"),
                        format!("duplicate backend address {}", b.address),
                    ));
                }
                match b.forwarding {
                    Forwarding::L2 if b.mac.is_none() => {
                        return Err(invalid(
                            format!("{bat}.mac"),
                            "forwarding \"l2\" needs the relay's MAC address",
                        ));
                    }
                    // A frame to these never reaches one relay.
                    Forwarding::L2 if b.mac.is_some_and(|m| m.0 == [0; 6] || m.0[0] & 1 == 1) => {
                        return Err(invalid(
                            format!("{bat}.mac"),
                            format!(
                                "{} is not a unicast MAC address; no single relay answers it",
                                b.mac.unwrap()
                            ),
                        ));
                    }
                    Forwarding::Ipip if b.address.is_ipv4() != svc.vip.is_ipv4() => {
                        return Err(invalid(
                            format!("{bat}.address"),
                            format!(
                                "ipip to {} cannot carry VIP {} (IPIP is IPv4 in IPv4, IP6IP6 IPv6 in IPv6)",
                                b.address, svc.vip
                            ),
                        ));
                    }
                    _ => {}
                }
                if b.weight > MAX_WEIGHT {
                    return Err(invalid(
                        format!("{bat}.weight"),
                        format!("at most {MAX_WEIGHT}"),
                    ));
                }
                if let Some((other_at, other)) = backends_by_addr.get(&b.address) {
                    if other.forwarding != b.forwarding
                        || other.mac != b.mac
                        || other.interface != b.interface
                    {
                        return Err(invalid(
                            bat,
                            format!(
                                "same address as {other_at} but a different forwarding, mac or interface"
                            ),
                        ));
                    }
                } else {
                    backends_by_addr.insert(b.address, (format!("{at}.backends[{j}]"), b));
                    if backends_by_addr.len() > MAX_BACKENDS as usize {
                        return Err(invalid(
                            format!("{bat}.address"),
                            format!(
                                "{} is distinct backend address number {}; the data plane holds at most {MAX_BACKENDS}",
                                b.address,
                                backends_by_addr.len()
                            ),
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_broadcast_and_multicast_macs_are_refused() {
        for mac in [
            "00:00:00:00:00:00",
            "ff:ff:ff:ff:ff:ff",
            "01:00:5e:00:00:01",
        ] {
            let text = format!(
                "[[services]]\nvip = \"203.0.113.10\"\nports = [25]\n[[services.backends]]\nname = \"a\"\naddress = \"198.51.100.3\"\nmac = \"{mac}\"\n"
            );
            let err = LbConfig::parse(&text).unwrap_err().to_string();
            assert!(
                err.contains(".mac") && err.contains("not a unicast"),
                "{mac}: {err}"
            );
        }
    }

    #[test]
    fn invalid_fields_are_located_by_line() {
        let text = "state_dir = \"/tmp\"\n[warmup]\nstart_percent = 0\n\n[[services]]\nvip = \"203.0.113.10\"\nports = [25]\n[[services.backends]]\nname = \"a\"\naddress = \"198.51.100.3\"\n[[services.backends]]\nname = \"a\"\naddress = \"198.51.100.4\"\n";
        assert_eq!(locate(text, "warmup.start_percent"), Some(3));
        assert_eq!(locate(text, "services[0] (203.0.113.10).ports"), Some(7));
        assert_eq!(
            locate(text, "services[0] (203.0.113.10).backends[1] (a).name"),
            Some(12)
        );
        assert_eq!(
            locate(text, "services[0] (203.0.113.10).backends[1] (a).mac"),
            Some(11),
            "absent key: its table"
        );
        assert_eq!(locate(text, "services[3].ports"), None);
    }

    const GOOD: &str = r#"
        [[services]]
        name = "mx"
        vip = "203.0.113.10"
        ports = [25, 587]
        table_size = 1009

        [[services.backends]]
        name = "relay1"
        address = "198.51.100.3"
        mac = "02:00:00:00:00:03"

        [[services.backends]]
        name = "relay2"
        address = "198.51.100.4"
        mac = "02:00:00:00:00:04"
        weight = 2

        [[services]]
        vip = "2001:db8::10"
        ports = [25]
        [[services.backends]]
        name = "relay1-v6"
        address = "2001:db8::3"
        forwarding = "ipip"
    "#;

    fn err(text: &str) -> String {
        LbConfig::parse(text).unwrap_err().to_string()
    }

    #[test]
    fn a_good_config_parses_with_defaults() {
        let cfg = LbConfig::parse(GOOD).unwrap();
        assert_eq!(cfg.services.len(), 2);
        assert_eq!(cfg.services[0].backends[0].weight, 1);
        assert_eq!(cfg.services[0].backends[1].weight, 2);
        assert_eq!(cfg.services[1].table_size, 65537);
        assert_eq!(cfg.services[1].backends[0].forwarding, Forwarding::Ipip);
        assert_eq!(
            cfg.services[0].backends[0].mac.unwrap().to_string(),
            "02:00:00:00:00:03"
        );
    }

    #[test]
    fn p2c_is_off_by_default_and_refused_with_sticky() {
        let cfg = LbConfig::parse(GOOD).unwrap();
        assert!(cfg.services.iter().all(|s| !s.p2c));
        let on = GOOD.replacen("ports = [25]", "ports = [25]\np2c = true", 1);
        assert!(LbConfig::parse(&on).unwrap().services.iter().any(|s| s.p2c));
        let e = err(&on.replacen("p2c = true", "p2c = true\nsticky = true", 1));
        assert!(
            e.contains(".p2c") && e.contains("sticky"),
            "p2c with sticky is refused by field: {e}"
        );
    }

    #[test]
    fn non_prime_table_size_is_refused_by_name() {
        let e = err(&GOOD.replace("1009", "1000"));
        assert!(
            e.contains("services[0] (mx).table_size") && e.contains("not prime"),
            "{e}"
        );
    }

    #[test]
    fn too_small_table_is_refused_by_name() {
        let e = err(&GOOD.replace("1009", "199"));
        assert!(
            e.contains("services[0] (mx).table_size") && e.contains("too small"),
            "{e}"
        );
    }

    #[test]
    fn duplicate_backend_is_refused_by_name() {
        let e = err(&GOOD.replace("name = \"relay2\"", "name = \"relay1\""));
        assert!(
            e.contains("backends[1] (relay1).name") && e.contains("duplicate"),
            "{e}"
        );
        let e = err(&GOOD.replace("198.51.100.4", "198.51.100.3"));
        assert!(
            e.contains("backends[1] (relay2).address") && e.contains("duplicate"),
            "{e}"
        );
    }

    #[test]
    fn vip_without_backends_is_refused_by_name() {
        let e = err(r#"
            [[services]]
            vip = "203.0.113.10"
            ports = [25]
        "#);
        assert!(
            e.contains("services[0] (203.0.113.10).backends") && e.contains("no backends"),
            "{e}"
        );
    }

    #[test]
    fn l2_backend_without_mac_is_refused() {
        let e = err(&GOOD.replace("mac = \"02:00:00:00:00:04\"", ""));
        assert!(e.contains("backends[1] (relay2).mac"), "{e}");
    }

    #[test]
    fn unknown_fields_and_bad_macs_are_refused() {
        let e = err(&GOOD
            .replace("sticky", "stiky")
            .replace("table_size = 1009", "table_size = 1009\nstiky = true"));
        assert!(e.contains("unknown field `stiky`"), "{e}");
        let e = err(&GOOD.replace("02:00:00:00:00:03", "02:00:00:00:03"));
        assert!(e.contains("not a MAC address"), "{e}");
    }

    #[test]
    fn ipip_across_families_is_refused() {
        let e = err(&GOOD.replace("2001:db8::3", "198.51.100.9"));
        assert!(e.contains("backends[0] (relay1-v6).address"), "{e}");
    }

    #[test]
    fn same_port_twice_is_refused() {
        let e = err(&GOOD.replace("[25, 587]", "[25, 25]"));
        assert!(e.contains("configured twice"), "{e}");
    }

    #[test]
    fn checks_default_by_port_and_follow_the_service() {
        let cfg = LbConfig::parse(&GOOD.replace(
            "table_size = 1009",
            "table_size = 1009\nchecks.587 = { tls = \"starttls\", port = 10587 }",
        ))
        .unwrap();
        let svc = &cfg.services[0];
        assert_eq!(svc.check(25, &cfg.health).to_string(), "25/none");
        assert_eq!(svc.check(587, &cfg.health).to_string(), "10587/starttls");
        assert_eq!(svc.check(465, &cfg.health).to_string(), "465/implicit");
        let mut tls = cfg.health.clone();
        tls.starttls = true;
        assert_eq!(svc.check(25, &tls).to_string(), "25/starttls");
        assert_eq!(svc.check(465, &tls).to_string(), "465/implicit");
    }

    #[test]
    fn bad_checks_are_refused_naming_line_and_field() {
        let text = GOOD.replace(
            "        [[services.backends]]\n        name = \"relay1\"",
            "        [services.checks.465]\n        tls = \"implicit\"\n\n        [[services.backends]]\n        name = \"relay1\"",
        );
        let dir = std::env::temp_dir().join(format!("slb-cfg-checks-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("lb.toml");
        let line_of =
            |text: &str, needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
        // A port the service does not balance.
        std::fs::write(&path, &text).unwrap();
        let e = LbConfig::load(&path).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}:{}: services[0] (mx).checks.465: `465` is not one of this service's ports [25, 587]",
                path.display(),
                line_of(&text, "[services.checks.465]")
            )
        );
        // Port 0.
        let zero = text.replace(
            "[services.checks.465]\n        tls = \"implicit\"",
            "[services.checks.587]\n        port = 0",
        );
        std::fs::write(&path, &zero).unwrap();
        let e = LbConfig::load(&path).unwrap_err().to_string();
        assert_eq!(
            e,
            format!(
                "{}:{}: services[0] (mx).checks.587.port: port 0 is not a TCP port",
                path.display(),
                line_of(&zero, "port = 0")
            )
        );
        // A dialect that does not exist: serde names it, with its line.
        let bad = text.replace(
            "[services.checks.465]\n        tls = \"implicit\"",
            "[services.checks.587]\n        tls = \"ssl\"",
        );
        std::fs::write(&path, &bad).unwrap();
        let e = LbConfig::load(&path).unwrap_err().to_string();
        assert!(
            e.contains(&format!("line {}", line_of(&bad, "\"ssl\"")))
                && e.contains("unknown variant `ssl`")
                && e.contains("`none`, `starttls`, `implicit`"),
            "{e}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn durations_read_the_relays_grammar_and_errors_name_the_field() {
        let cfg = LbConfig::parse("[warmup]\nduration = \"1w\"\nrejoin = \"1h 30m\"\n").unwrap();
        assert_eq!(cfg.warmup.duration, std::time::Duration::from_hours(168));
        assert_eq!(cfg.warmup.rejoin, std::time::Duration::from_mins(90));
        let e = LbConfig::parse("[health]\ninterval = \"3x\"\n")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("interval") && e.contains("`3x` is not a duration"),
            "{e}"
        );
    }

    #[test]
    fn more_backends_or_services_than_the_data_plane_holds_are_refused_by_field() {
        // Two services of 520 relays each: 1040 distinct addresses > 1024.
        let mut text = String::new();
        for svc in 0..2u32 {
            text += &format!(
                "[[services]]\nname = \"s{svc}\"\nvip = \"203.0.113.{}\"\nports = [25]\n",
                10 + svc
            );
            for j in 0..520u32 {
                let n = svc * 520 + j;
                text += &format!(
                    "[[services.backends]]\nname = \"r{n}\"\naddress = \"198.18.{}.{}\"\nmac = \"02:00:00:00:00:01\"\n",
                    n / 250,
                    n % 250 + 1
                );
            }
        }
        let e = err(&text);
        assert!(
            e.contains("services[1] (s1).backends[504] (r1024).address")
                && e.contains("at most 1024"),
            "{e}"
        );
        let ports: Vec<String> = (1..=33).map(|p| p.to_string()).collect();
        let e = err(&format!(
            "[[services]]\nname = \"many\"\nvip = \"203.0.113.10\"\nports = [{}]\n[[services.backends]]\nname = \"a\"\naddress = \"198.51.100.3\"\nmac = \"02:00:00:00:00:03\"\n",
            ports.join(", ")
        ));
        assert!(
            e.contains("services[0] (many).ports") && e.contains("at most 32"),
            "{e}"
        );
        let e = err(&GOOD.replacen(
            "[[services]]",
            "[health]\npanic_threshold = 101\n[[services]]",
            1,
        ));
        assert!(e.contains("health.panic_threshold"), "{e}");
    }
}
