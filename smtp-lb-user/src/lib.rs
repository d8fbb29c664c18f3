//! smtp-lb: SMTP load balancing for outbound email.
//!
//! # Layout
//! - [`dataplane`]: the only module that talks to the kernel (aya): load,
//!   attach, pin, read and write maps of the XDP balancer.
//! - [`balance`]: pure balancing logic: the Maglev table builder and the
//!   plan of what the data plane's maps hold for a config.
//! - [`health`]: SMTP-aware health checks of relays (probe + rise/fall).
//! - [`config`]: configuration files (`config::lb` for the balancer) and
//!   shared value types (durations).
//! - [`feedback`]: relay feedback: queue depth and deferral rate polled from
//!   the relays move their weights and close admission under back-pressure.
//! - [`lb`]: the balancer daemon's control loop (health, warmup, drain,
//!   reload) and its admin API.
//! - [`announce`]: the VIPs announced over BGP (a bird child) while the
//!   node is healthy, for ECMP routers in front of several LB nodes.
//! - [`admin`]: the small HTTP layer and Prometheus text both daemons serve.
//! - [`cli`]: the `smtp-lb` command line (subcommands and their options).
//! - [`relay`]: the delivery engine (SMTP ingress, spool, queues, delivery).
//! - [`smtp`]: the SMTP wire (grammar, the reply reader, the delivery
//!   client), shared by the relay and the balancer's health probe.
//! - [`systemd`]: readiness notifications for `Type=notify` units.
//!
//! The binary in `main.rs` only parses arguments, sets up tracing and calls
//! into this library.

pub mod admin;
pub mod announce;
pub mod balance;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod feedback;
pub mod health;
pub mod lb;
pub mod relay;
pub mod smtp;
pub mod systemd;
pub mod tls;
