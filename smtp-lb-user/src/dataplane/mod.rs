//! The kernel side as user space sees it: the embedded eBPF object, loading,
//! attaching and pinning it, and reading its maps. The only module that
//! imports `aya`.

mod decap;
mod loader;
mod lookup;
mod pins;
mod program;
mod stats;
mod walk;

pub use decap::{Decap, DecapAllow, write_decap_allow};
pub use loader::{AttachMode, Dataplane, LoadError, LoadOptions, check_interface};
pub use lookup::{Where, tracked_flows, where_to};
pub use pins::ensure_bpffs;
pub use program::{Applied, ApplyError, MovedFlows, apply_config, read_existing};
pub use stats::{BackendRow, ServiceRow, Snapshot, read_global_stats, read_stats};

/// The eBPF object built by `cargo xtask build` (empty when built without it).
pub static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/smtp-lb.bpf.o"));
