//! Relay feedback: the balancer polls each relay's metrics listener for its
//! queue depth and deferral rate, lowers the relay's share of weight as
//! they rise and gives it back as they fall ([`policy`], with hysteresis),
//! and stops admitting new connections to a service while every one of its
//! relays is over its queue high-water mark (the XDP program drops the
//! SYNs; senders retry). Every change is logged with its reason.
//!
//! - [`config`]: `[feedback]` of lb.toml (off by default).
//! - [`policy`]: pure: readings → share changes; queue depths → admission.
//! - [`poll`]: one bounded `GET /metrics` of a relay, read into a reading.
//!
//! The share multiplies the relay's weight in `balance::weights`, so it
//! composes with warmup, drain and operator weights, and only the tables
//! whose weights changed are rewritten.

pub mod config;
pub mod policy;
pub mod poll;

pub use config::{AdmissionConfig, FeedbackConfig};
pub use policy::{Change, Gate, Reading, RelayFeedback};
