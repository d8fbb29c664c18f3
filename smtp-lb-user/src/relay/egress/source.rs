//! One egress source: a local address and its HELO name.
use std::{
    net::IpAddr,
    sync::Mutex,
    time::{Instant, SystemTime},
};

/// Index of a source in [`Egress`].
pub type SourceId = usize;

/// One egress source.
#[derive(Debug)]
pub struct Source {
    pub name: String,
    /// `None`: the kernel picks (implicit pool without `delivery.source_ip`).
    pub address: Option<IpAddr>,
    pub helo: String,
    pub(super) warmup_start: Option<SystemTime>,
    pub(super) unplumbed_until: Mutex<Option<Instant>>,
}
