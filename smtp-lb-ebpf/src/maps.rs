//! Every map of the balancer, in one place. Names are in `smtp_lb_common::maps`.
use aya_ebpf::{btf_maps::PerCpuArray, macros::btf_map};
use smtp_lb_common::GlobalStats;

/// `0` → per-CPU global counters.
#[btf_map]
pub static GLOBAL_STATS: PerCpuArray<GlobalStats, 1> = PerCpuArray::new();
