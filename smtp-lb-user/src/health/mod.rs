//! SMTP-aware health checks of relays, the way a mail client sees them:
//! TCP connect → `220` greeting → `EHLO` → `250` → optional `STARTTLS`
//! handshake → `QUIT`, each phase with its own timeout ([`probe`]), and
//! `rise`/`fall` hysteresis over the results ([`Tracker`]).
//!
//! A relay that accepts TCP but greets with `421` is *full* (RFC 5321 §3.1:
//! "service not available", what a relay at its connection limit answers):
//! it is alive and keeps its sessions, but gets no new ones while another
//! relay has room. One that greets with `554` (refusing service) is down.

mod probe;
mod tracker;

use std::time::Duration;

pub use probe::{Phase, ProbeError, probe};
use serde::Deserialize;
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
    /// Also negotiate TLS (`STARTTLS`) and `EHLO` again over it; the
    /// certificate is not verified (a health check tests the handshake, not
    /// the relay's identity).
    #[serde(default)]
    pub starttls: bool,
    /// Name sent in `EHLO`.
    #[serde(default = "HealthCheckConfig::default_helo")]
    pub helo_name: String,
    /// TCP port probed on each relay (normally the port the service
    /// balances; one probe per relay covers all its ports).
    #[serde(default = "HealthCheckConfig::default_port")]
    pub port: u16,
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
    fn default_port() -> u16 {
        25
    }

    /// Longest a relay can stay in the table after it died: `fall` probes,
    /// `interval` apart, the last one taking up to its full timeout (a dead
    /// relay fails at connect, greeting or EHLO at the latest, or at
    /// STARTTLS when that is checked).
    pub fn detection_bound(&self) -> Duration {
        let t = &self.timeouts;
        let probe = t.connect
            + t.greeting
            + t.ehlo
            + if self.starttls {
                t.starttls
            } else {
                Duration::ZERO
            };
        self.interval * self.fall + probe
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
            port: Self::default_port(),
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
            quit: Duration::from_secs(1),
        }
    }
}

impl PhaseTimeouts {
    /// The longest one probe can take.
    pub fn total(&self) -> Duration {
        self.connect + self.greeting + self.ehlo + self.starttls + self.quit
    }
}
