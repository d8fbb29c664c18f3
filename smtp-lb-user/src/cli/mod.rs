//! The `smtp-lb` command line: one module per subcommand.

pub mod check;
pub mod ctl;
pub mod decap;
pub mod identity;
pub mod lb;
pub mod relay;
mod table;
pub mod trace;

use clap::{Parser, Subcommand};

/// SMTP load balancing for outbound email: an XDP balancer for relays, its
/// control plane, and the relay (delivery engine) itself.
#[derive(Debug, Parser)]
#[command(name = "smtp-lb", version, propagate_version = true)]
pub struct Cli {
    /// Log lines on stderr: `text` for people, `json` (one object a line)
    /// for log shippers.
    #[arg(long, value_enum, global = true, default_value_t = LogFormat::Text)]
    pub log_format: LogFormat,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The balancer daemon: load, attach and pin the XDP program, own its maps.
    Lb(lb::Options),
    /// The delivery engine: SMTP ingress, durable spool, per-ISP queues, shaped delivery.
    Relay(relay::Options),
    /// On a relay: strip the balancer's IPIP / IP6IP6 headers (XDP).
    Decap(decap::Options),
    /// Operator's view of the running balancer and relay.
    Ctl(ctl::Options),
    /// Validate a configuration file without touching anything (like `haproxy -c`).
    CheckConfig(check::Options),
}

/// Arguments of a subcommand that is not implemented yet.
#[derive(Debug, clap::Args)]
pub struct Unimplemented {
    /// Ignored: this subcommand is not implemented yet.
    #[arg(trailing_var_arg = true, allow_hyphen_values = true, hide = true)]
    pub rest: Vec<String>,
}

/// The error every unimplemented subcommand returns.
#[derive(Debug, thiserror::Error)]
#[error("`smtp-lb {0}` is not implemented yet")]
pub struct NotImplemented(pub &'static str);
