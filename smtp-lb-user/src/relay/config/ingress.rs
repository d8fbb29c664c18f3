//! `[[listener]]`, `[[user]]`, `[tls]`, `[limits]` and `[timeouts]`: what
//! the relay accepts mail on, from whom, and how much of it.
use std::{net::SocketAddr, path::PathBuf, time::Duration};

use serde::{Deserialize, Serialize};

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
