//! `[delivery]`: how the relay talks to MX hosts (ports, timeouts, TLS,
//! concurrency per destination, loop protection).
use std::{net::IpAddr, time::Duration};

use serde::{Deserialize, Serialize};

use crate::smtp::client::ClientTimeouts;

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
    /// How long a connection with nothing more to send stays open for the
    /// next message to its domain (Postfix `smtp_connection_cache_time_limit`):
    /// mail that trickles in then reuses connections instead of opening
    /// one per message. It holds its destination's connection slot while it
    /// waits, but gives way at once when the queue needs the worker for
    /// another destination. `0s` closes it at once.
    #[serde(
        default = "DeliveryConfig::default_connection_idle",
        with = "humantime_serde"
    )]
    pub connection_idle: Duration,
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
    pub(super) fn check(&self) -> anyhow::Result<()> {
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
    fn default_connection_idle() -> Duration {
        Duration::from_secs(2)
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
            connection_idle: Self::default_connection_idle(),
            starttls: Self::default_starttls(),
            plaintext_fallback: Self::default_plaintext_fallback(),
            require_tls: Vec::new(),
            hop_limit: Self::default_hop_limit(),
            own_addresses: Vec::new(),
            timeouts: ClientTimeouts::default(),
        }
    }
}
