//! Cost probes for `bench xdp` (feature `probes`, never in the shipped
//! object): each program does one thing the balancer does, on a key read
//! from the packet, so the bench can say where the nanoseconds go.
use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{HashMap, LruHashMap, PerCpuHashMap},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use smtp_lb_common::{CONNTRACK_SIZE, Flow, FlowKey};

use crate::{
    maps::{CONNTRACK, GLOBAL_STATS, MOVED_FLOWS},
    parse::{ETH_HLEN, read},
};

/// An IPv4-only flow key: (src, dst, sport, dport), 12 bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct Key12 {
    addrs: [u32; 2],
    ports: u32,
}

#[btf_map]
static PROBE_LRU12: LruHashMap<Key12, Flow, { CONNTRACK_SIZE as usize }> = LruHashMap::new();
#[btf_map]
static PROBE_HASH40: HashMap<FlowKey, Flow, { CONNTRACK_SIZE as usize }> = HashMap::new();
/// `BPF_F_NO_COMMON_LRU`: per-CPU LRU lists.
#[btf_map]
static PROBE_LRU_PCPU_LISTS: LruHashMap<FlowKey, Flow, { CONNTRACK_SIZE as usize }, 2> =
    LruHashMap::new();
#[btf_map]
static PROBE_PCPU_HASH40: PerCpuHashMap<FlowKey, Flow, 1024> = PerCpuHashMap::new();

const FLOW: Flow = Flow {
    backend: 1,
    service: 0,
    flags: 0,
};

#[inline(always)]
fn key40(ctx: &XdpContext) -> Option<FlowKey> {
    read::<FlowKey>(ctx, ETH_HLEN)
}

#[inline(always)]
fn key12(ctx: &XdpContext) -> Option<Key12> {
    read::<Key12>(ctx, ETH_HLEN + 12)
}

#[inline(always)]
fn verdict(found: bool) -> u32 {
    if found {
        xdp_action::XDP_TX
    } else {
        xdp_action::XDP_PASS
    }
}

/// Reads the 40-byte key and nothing else: the base of the map probes.
#[xdp]
pub fn probe_key40(ctx: XdpContext) -> u32 {
    verdict(key40(&ctx).is_some_and(|k| k.sport == 1))
}

/// One per-CPU counter increment.
#[xdp]
pub fn probe_stats(_ctx: XdpContext) -> u32 {
    if let Some(s) = GLOBAL_STATS.get_ptr_mut(0) {
        // SAFETY: this CPU's slot.
        unsafe { (*s).tx += 1 };
    }
    xdp_action::XDP_PASS
}

/// `CONNTRACK` lookup (a hit once `probe_ct_update` ran on the same packet).
#[xdp]
pub fn probe_ct_lookup(ctx: XdpContext) -> u32 {
    let Some(k) = key40(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    verdict(CONNTRACK.get_ptr(&k).is_some())
}

/// `CONNTRACK` update of an existing key (a new flow costs the same: a free
/// node popped, linked, the old one unlinked and pushed back).
#[xdp]
pub fn probe_ct_update(ctx: XdpContext) -> u32 {
    let Some(k) = key40(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    verdict(CONNTRACK.insert(&k, FLOW, 0).is_ok())
}

/// `MOVED_FLOWS` lookup of an absent key (what every conntrack miss adds).
#[xdp]
pub fn probe_moved_miss(ctx: XdpContext) -> u32 {
    let Some(k) = key40(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    verdict(MOVED_FLOWS.get_ptr(&k).is_some())
}

/// LRU lookup with a 12-byte key.
#[xdp]
pub fn probe_lru12_lookup(ctx: XdpContext) -> u32 {
    let Some(k) = key12(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    verdict(PROBE_LRU12.get_ptr(&k).is_some())
}

/// LRU update with a 12-byte key.
#[xdp]
pub fn probe_lru12_update(ctx: XdpContext) -> u32 {
    let Some(k) = key12(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    verdict(PROBE_LRU12.insert(&k, FLOW, 0).is_ok())
}

/// Plain (preallocated, non-LRU) hash update with the 40-byte key.
#[xdp]
pub fn probe_hash40_update(ctx: XdpContext) -> u32 {
    let Some(k) = key40(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    verdict(PROBE_HASH40.insert(&k, FLOW, 0).is_ok())
}

/// Plain hash lookup with the 40-byte key.
#[xdp]
pub fn probe_hash40_lookup(ctx: XdpContext) -> u32 {
    let Some(k) = key40(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    verdict(PROBE_HASH40.get_ptr(&k).is_some())
}

/// Per-CPU hash update with the 40-byte key.
#[xdp]
pub fn probe_pcpu_update(ctx: XdpContext) -> u32 {
    let Some(k) = key40(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    verdict(PROBE_PCPU_HASH40.insert(&k, FLOW, 0).is_ok())
}

/// LRU update with per-CPU LRU lists (`BPF_F_NO_COMMON_LRU`).
#[xdp]
pub fn probe_lru_pcpu_lists_update(ctx: XdpContext) -> u32 {
    let Some(k) = key40(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    verdict(PROBE_LRU_PCPU_LISTS.insert(&k, FLOW, 0).is_ok())
}
