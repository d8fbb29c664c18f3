//! Cost probes for `bench xdp` (feature `probes`, never in the shipped
//! object): each program does one thing the balancer does, on a key read
//! from the packet, so the bench can say where the nanoseconds go.
use aya_ebpf::{
    bindings::xdp_action,
    btf_maps::{HashMap, LruHashMap, PerCpuHashMap},
    macros::{btf_map, xdp},
    programs::XdpContext,
};
use smtp_lb_common::{
    CONNTRACK_SIZE, Flow, FlowKey, ServiceKey, flow_hash, ring_slot, service_slot, table_hash,
};

use crate::{
    counters::Stats,
    flows,
    maps::MOVED_FLOWS,
    parse::{ETH_HLEN, read},
};

/// The LRU hash the balancer tracked flows in before [`flows`] (`CONNTRACK`).
#[btf_map]
static PROBE_CT: LruHashMap<FlowKey, Flow, { CONNTRACK_SIZE as usize }> = LruHashMap::new();

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
    if let Some(mut s) = Stats::this_cpu() {
        s.tx += 1;
    }
    xdp_action::XDP_PASS
}

/// The old `CONNTRACK` lookup (a hit once `probe_ct_update` ran on the same packet).
#[xdp]
pub fn probe_ct_lookup(ctx: XdpContext) -> u32 {
    let Some(k) = key40(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    verdict(PROBE_CT.get_ptr(&k).is_some())
}

/// The old `CONNTRACK` update of an existing key (a new flow costs the same: a free
/// node popped, linked, the old one unlinked and pushed back).
#[xdp]
pub fn probe_ct_update(ctx: XdpContext) -> u32 {
    let Some(k) = key40(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    verdict(PROBE_CT.insert(&k, FLOW, 0).is_ok())
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

/// Flow table hit, as an established packet takes it: the table hash, the
/// set, the ways' keys compared, the seal checked, confirmed and stamped
/// (a write only the first time). The first run, a miss, inserts the key.
#[xdp]
pub fn probe_table_lookup(ctx: XdpContext) -> u32 {
    let Some(k) = key40(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    let hash = table_hash(&k);
    let Some(t) = flows::find(&k, hash) else {
        let _ = flows::insert(&k, hash, FLOW.backend, (0, 0), 0);
        return xdp_action::XDP_PASS;
    };
    verdict(!flows::touch(&t, false) && t.backend == FLOW.backend)
}

/// Flow table insert as a SYN does it, of a new flow each run (the key's
/// last word is this CPU's run count, so each run hashes to another set of
/// the 16 MiB table, as new flows do): the ways ranked, one written. Once
/// the sets are full it takes unconfirmed ways, as under a SYN flood.
#[xdp]
pub fn probe_table_insert(ctx: XdpContext) -> u32 {
    let Some(mut k) = key40(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    let Some(mut s) = Stats::this_cpu() else {
        return xdp_action::XDP_PASS;
    };
    s.tx += 1;
    let n = s.tx;
    k.dst[3] ^= n as u32;
    let hash = table_hash(&k);
    let took = matches!(
        flows::insert(&k, hash, FLOW.backend, (0, 0), 0),
        flows::Inserted::Took(_)
    );
    verdict(took)
}

/// The Maglev flow hash (`flow_hash`: `table_hash`'s middle bits) of the key.
#[xdp]
pub fn probe_flow_hash(ctx: XdpContext) -> u32 {
    let Some(k) = key40(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    verdict(flow_hash(&k, false) == 1)
}

/// A new flow's Maglev slot: `flow_hash`, then `ring_slot` over a table
/// size the compiler cannot know (read from the packet).
#[xdp]
pub fn probe_maglev_slot(ctx: XdpContext) -> u32 {
    let Some(k) = key40(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    verdict(ring_slot(flow_hash(&k, false), u32::from(k.dport) | 1) == 1)
}

/// The flow table's hash (`table_hash`, independent multiplies) of the key.
#[xdp]
pub fn probe_table_hash(ctx: XdpContext) -> u32 {
    let Some(k) = key40(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    verdict(table_hash(&k) == 1)
}

/// The service table's slot hash (`service_slot`, the same kind of chain as
/// `flow_hash`) of the key's destination.
#[xdp]
pub fn probe_service_slot(ctx: XdpContext) -> u32 {
    let Some(k) = key40(&ctx) else {
        return xdp_action::XDP_PASS;
    };
    let skey = ServiceKey {
        addr: k.dst,
        port: k.dport,
        proto: k.proto,
        family: k.family,
    };
    verdict(service_slot(&skey) == 1)
}

/// `probe_l2_dsr`: entry `i` is relay `i`'s MAC (bytes 0..6); entry
/// [`DSR_RELAYS`] is the LB node's own. Written by `bench lb`.
#[btf_map]
static PROBE_DSR_MACS: aya_ebpf::btf_maps::Array<[u8; 8], { DSR_RELAYS as usize + 1 }> =
    aya_ebpf::btf_maps::Array::new();
const DSR_RELAYS: u32 = 3;

/// The least an L2 DSR balancer can do (`bench lb`'s floor for the
/// path): IPv4 TCP to port 25 goes back out (`XDP_TX`) to one of three
/// relays by the client's source port, no state, no counters; everything
/// else passes. Stateless, so it is only right while the relays stay put.
#[xdp]
pub fn probe_l2_dsr(ctx: XdpContext) -> u32 {
    use crate::parse::{IPPROTO_TCP, IPV4_HLEN, Ipv4Hdr, TcpHdr, ptr_at_mut};
    let Some(ethertype) = read::<u16>(&ctx, 12) else {
        return xdp_action::XDP_PASS;
    };
    if ethertype != 0x0800u16.to_be() {
        return xdp_action::XDP_PASS;
    }
    let Some(ip) = read::<Ipv4Hdr>(&ctx, ETH_HLEN) else {
        return xdp_action::XDP_PASS;
    };
    if ip.ver_ihl != 0x45 || ip.proto != IPPROTO_TCP {
        return xdp_action::XDP_PASS;
    }
    let Some(tcp) = read::<TcpHdr>(&ctx, ETH_HLEN + IPV4_HLEN) else {
        return xdp_action::XDP_PASS;
    };
    if tcp.dport != 25u16.to_be() {
        return xdp_action::XDP_PASS;
    }
    let relay = u32::from(u16::from_be(tcp.sport)) % DSR_RELAYS;
    let (Some(dst), Some(src), Some(eth)) = (
        PROBE_DSR_MACS.get(relay),
        PROBE_DSR_MACS.get(DSR_RELAYS),
        ptr_at_mut::<[u8; 12]>(&ctx, 0),
    ) else {
        return xdp_action::XDP_PASS;
    };
    let mut macs = [0u8; 12];
    macs[..6].copy_from_slice(&dst[..6]);
    macs[6..].copy_from_slice(&src[..6]);
    // SAFETY: bounds checked by ptr_at_mut.
    unsafe { eth.write(macs) };
    xdp_action::XDP_TX
}
