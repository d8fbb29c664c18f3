//! SMTP-aware health checks of relays, the way a mail client sees them:
//! TCP connect → `220` greeting → `EHLO` → `250` → optional `STARTTLS`
//! handshake → `QUIT`, each phase with its own timeout ([`probe`]), and
//! `rise`/`fall` hysteresis over the results ([`Tracker`]). Port 465 speaks
//! implicit TLS (RFC 8314 §3.3): the handshake comes first, then the same
//! dialogue inside it.
//!
//! Each balanced port is its own [`Check`]: a relay is probed on every port
//! it serves, in that port's dialect, and can be up on one and down on
//! another (its 465 TLS broken while 25 works).
//!
//! A relay that accepts TCP but greets with `421` is *full* (RFC 5321 §3.1:
//! "service not available", what a relay at its connection limit answers):
//! it is alive and keeps its sessions, but gets no new ones while another
//! relay has room. One that greets with `554` (refusing service) is down.

mod probe;
mod tracker;

use std::{fmt, str::FromStr, time::Duration};

pub use probe::{Phase, ProbeError, probe};
use serde::{Deserialize, Serialize};
pub use tracker::{Health, Outcome, ProbeRecord, Tracker, Transition};

use crate::config::duration;

/// `[health]` of the balancer's config: how relays are checked.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct HealthCheckConfig {
    /// Time between two probes of the same relay.
    #[serde(default = "HealthCheckConfig::default_interval", with = "duration")]
    pub interval: Duration,
    /// Consecutive successes that bring a down relay up.
    #[serde(default = "HealthCheckConfig::default_rise")]
    pub rise: u32,
    /// Consecutive failures that take an up relay down.
    #[serde(default = "HealthCheckConfig::default_fall")]
    pub fall: u32,
    /// Per-phase timeouts.
    #[serde(default)]
    pub timeouts: PhaseTimeouts,
    /// On ports that speak plain SMTP first (all but 465), also negotiate
    /// `STARTTLS` and `EHLO` again over it, unless a service's
    /// `checks.<port>.tls` says otherwise; the certificate is not verified
    /// (a health check tests the handshake, not the relay's identity).
    #[serde(default)]
    pub starttls: bool,
    /// Name sent in `EHLO`.
    #[serde(default = "HealthCheckConfig::default_helo")]
    pub helo_name: String,
    /// Panic threshold, in percent of a service's weight (0–100): when the
    /// relays that are alive (up or full) hold less than this share, or
    /// none is alive, the service keeps sending new connections by its
    /// last good table instead of following the checks. Like Envoy's
    /// `healthy_panic_threshold`; the default 0 panics only when no relay
    /// is alive, because a full relay already says so itself (`421`).
    #[serde(default)]
    pub panic_threshold: u32,
}

impl HealthCheckConfig {
    fn default_interval() -> Duration {
        Duration::from_secs(2)
    }
    fn default_rise() -> u32 {
        2
    }
    fn default_fall() -> u32 {
        3
    }
    fn default_helo() -> String {
        "smtp-lb-healthcheck.invalid".to_owned()
    }

    /// Longest a relay can stay in a table after it died, for a check in
    /// dialect `tls`: `fall` probes, `interval` apart, the last one taking
    /// up to its full timeout (a dead relay fails at connect, the TLS
    /// handshake, greeting or EHLO at the latest, or at STARTTLS when that
    /// is checked).
    pub fn detection_bound(&self, tls: Tls) -> Duration {
        let t = &self.timeouts;
        let dialect = match tls {
            Tls::None => Duration::ZERO,
            Tls::Starttls => t.starttls,
            Tls::Implicit => t.handshake,
        };
        self.interval * self.fall + t.connect + t.greeting + t.ehlo + dialect
    }
}

impl Default for HealthCheckConfig {
    fn default() -> Self {
        Self {
            interval: Self::default_interval(),
            rise: Self::default_rise(),
            fall: Self::default_fall(),
            timeouts: PhaseTimeouts::default(),
            starttls: false,
            helo_name: Self::default_helo(),
            panic_threshold: 0,
        }
    }
}

/// One timeout per SMTP phase of a probe.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct PhaseTimeouts {
    #[serde(with = "duration")]
    pub connect: Duration,
    #[serde(with = "duration")]
    pub greeting: Duration,
    #[serde(with = "duration")]
    pub ehlo: Duration,
    /// `STARTTLS`, the handshake and the `EHLO` after it.
    #[serde(with = "duration")]
    pub starttls: Duration,
    /// Implicit TLS (465): the handshake before the greeting.
    #[serde(with = "duration")]
    pub handshake: Duration,
    #[serde(with = "duration")]
    pub quit: Duration,
}

impl Default for PhaseTimeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_secs(1),
            greeting: Duration::from_secs(3),
            ehlo: Duration::from_secs(2),
            starttls: Duration::from_secs(3),
            handshake: Duration::from_secs(3),
            quit: Duration::from_secs(1),
        }
    }
}

/// How a relay's port speaks TLS.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Tls {
    /// Plain SMTP; TLS not checked.
    None,
    /// Plain SMTP, then `STARTTLS` (RFC 3207), handshake, `EHLO` again.
    Starttls,
    /// TLS from the first byte (submissions on 465, RFC 8314 §3.3).
    Implicit,
}

impl Tls {
    fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Starttls => "starttls",
            Self::Implicit => "implicit",
        }
    }
}

impl fmt::Display for Tls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One way a relay is checked: the port probed on its own address and the
/// dialect spoken there. Written `465/implicit` (the state file and the
/// admin API key checks by it).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct Check {
    pub port: u16,
    pub tls: Tls,
}

impl Check {
    /// The check a balanced `port` gets when its service says nothing:
    /// implicit TLS on 465, else plain SMTP with `STARTTLS` when `starttls`.
    pub fn default_for(port: u16, starttls: bool) -> Self {
        let tls = match port {
            465 => Tls::Implicit,
            _ if starttls => Tls::Starttls,
            _ => Tls::None,
        };
        Self { port, tls }
    }
}

impl fmt::Display for Check {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.port, self.tls)
    }
}

impl FromStr for Check {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("`{s}` is not a check like 465/implicit");
        let (port, tls) = s.split_once('/').ok_or_else(bad)?;
        let port = port.parse().map_err(|_| bad())?;
        let tls = [Tls::None, Tls::Starttls, Tls::Implicit]
            .into_iter()
            .find(|t| t.as_str() == tls)
            .ok_or_else(bad)?;
        Ok(Self { port, tls })
    }
}

impl From<Check> for String {
    fn from(c: Check) -> Self {
        c.to_string()
    }
}

impl TryFrom<String> for Check {
    type Error = String;

    fn try_from(s: String) -> Result<Self, String> {
        s.parse()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn port_465_defaults_to_implicit_tls_and_others_to_the_starttls_setting() {
        assert_eq!(Check::default_for(465, false).tls, Tls::Implicit);
        assert_eq!(Check::default_for(465, true).tls, Tls::Implicit);
        assert_eq!(Check::default_for(25, false).tls, Tls::None);
        assert_eq!(Check::default_for(587, true).tls, Tls::Starttls);
    }

    #[test]
    fn checks_round_trip_through_their_written_form() {
        for c in ["25/none", "587/starttls", "465/implicit"] {
            assert_eq!(c.parse::<Check>().unwrap().to_string(), c);
        }
        for bad in ["25", "25/tls", "x/none", "70000/none"] {
            assert!(bad.parse::<Check>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_detection_bound_counts_the_dialects_own_phase() {
        let cfg = HealthCheckConfig::default();
        let plain = cfg.detection_bound(Tls::None);
        assert_eq!(plain, Duration::from_secs(2 * 3 + 1 + 3 + 2));
        assert_eq!(
            cfg.detection_bound(Tls::Implicit),
            plain + cfg.timeouts.handshake
        );
        assert_eq!(
            cfg.detection_bound(Tls::Starttls),
            plain + cfg.timeouts.starttls
        );
    }
}
