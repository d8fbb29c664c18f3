//! The kernel side as user space sees it: the embedded eBPF object, loading,
//! attaching and pinning it, and reading its maps. The only module that
//! imports `aya`.
//!
//! The control loop talks to the data plane through two traits, after
//! Katran's `BaseBpfAdapter` (and its `testing` flag): [`MapWriter`], every
//! map write the balancer makes, in the order [`apply_config`] chooses, and
//! [`Dataplane`], that plus the reads the admin API answers from.
//! [`XdpDataplane`] is the kernel; [`fake::Fake`] keeps the maps in memory
//! and records each write, so the control loop is unit-tested without root.

mod decap;
#[cfg(test)]
pub mod fake;
pub mod flows;
mod loader;
mod lookup;
mod pins;
mod program;
mod stats;
mod walk;

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

pub use decap::{Decap, DecapAllow, write_decap_allow};
pub use loader::{AttachMode, Dataplane as XdpDataplane, LoadError, LoadOptions, check_interface};
pub use lookup::{ClientFlow, Where, client_flows, tracked_flows, where_to};
pub use pins::ensure_bpffs;
pub use program::{Applied, ApplyError, MovedFlows, apply, apply_config, counters, read_existing};
use smtp_lb_common::ServiceKey;
pub use stats::{BackendRow, ServiceRow, Snapshot, read_global_stats, read_stats};

use crate::balance::plan::{Existing, Plan, PlannedBackend, PlannedService};

/// The eBPF object built by `cargo xtask build` (empty when built without it).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/smtp-lb.bpf.o"));

/// Every write the control plane makes to the data plane's maps. Each call
/// leaves the maps consistent for a packet that reads them at any moment;
/// [`apply_config`] orders the calls so no live table ever names a backend
/// that is not valid.
pub trait MapWriter {
    /// Ids the maps hold already (a restarted daemon finds the pinned ones).
    fn existing(&mut self) -> Result<Existing, ApplyError>;
    /// Node-wide settings: the IPIP / IP6IP6 outer source addresses.
    fn set_node(&mut self, encap_v4: Ipv4Addr, encap_v6: Ipv6Addr) -> Result<(), ApplyError>;
    /// Writes a backend entry, valid. A recycled id starts with zero counters.
    fn set_backend(&mut self, backend: &PlannedBackend) -> Result<(), ApplyError>;
    /// Installs a service and its Maglev table: the table is written where
    /// no packet reads it, then switched to in one atomic update.
    fn set_service(&mut self, service: &PlannedService) -> Result<(), ApplyError>;
    /// Marks an address as a VIP (`port == 0` key, for the slow path).
    fn set_vip(&mut self, marker: &ServiceKey) -> Result<(), ApplyError>;
    /// Whether some service balances `port` (the packet path's pre-filter).
    fn set_port(&mut self, port: u16, balanced: bool) -> Result<(), ApplyError>;
    /// Removes a service or a VIP marker.
    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), ApplyError>;
    /// Marks a backend invalid: flows tracked on it re-hash; its id may be
    /// recycled later.
    fn retire_backend(&mut self, id: u32) -> Result<(), ApplyError>;
    /// After a change, with `plan` what the maps now hold: copies the
    /// tracked flows its tables send elsewhere into `MOVED_FLOWS` (where no
    /// flood can evict them) and prunes copies no longer needed. From the
    /// same walk, resets each backend's `FLOW_COUNTS` to its live flows.
    fn keep_moved_flows(&mut self, plan: &Plan) -> Result<MovedFlows, ApplyError>;
    /// Sets the flow table's clock (`FLOW_CLOCK`, seconds): a confirmed flow
    /// silent for `FLOW_IDLE_SECS` of it may give its way to a new one.
    fn set_clock(&mut self, secs: u32) -> Result<(), ApplyError>;
    /// Refuses (`true`) or admits new connections to service `id`
    /// (admission under back-pressure; established flows are untouched).
    fn set_admission(&mut self, id: u32, refuse: bool) -> Result<(), ApplyError>;
}

/// The data plane as the control loop sees it: the writes, and the counters
/// and lookups the admin API shows.
pub trait Dataplane: MapWriter {
    /// Every counter, summed over CPUs.
    fn stats(&self) -> Result<Snapshot, LoadError>;
    /// Tracked flows per backend id: `(live, tracked)`.
    fn flows(&self) -> Result<BTreeMap<u32, (u64, u64)>, LoadError>;
    /// Where a connection from `client:cport` to `vip:port` goes; `None`
    /// when `vip:port` is not a service.
    fn where_to(
        &self,
        vip: IpAddr,
        port: u16,
        client: IpAddr,
        cport: u16,
    ) -> Result<Option<Where>, LoadError>;
}
