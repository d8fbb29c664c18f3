//! Every map of the balancer and of the decap program, in one place. Names
//! are in `smtp_lb_common::maps`, sizes (with their rationale) in `smtp_lb_common`.
use aya_ebpf::{
    btf_maps::{Array, DevMapHash, HashMap, LpmTrie, LruHashMap, PerCpuArray},
    macros::btf_map,
};
use smtp_lb_common::{
    Backend, Counters, DecapPrefix, DecapStats, FLOW_SETS, Flow, FlowKey, FlowSet, LbConfig,
    MAX_BACKENDS, MAX_DECAP_PREFIXES, MAX_SERVICES, MAX_TX_PORTS, MOVED_FLOWS_SIZE, RING_SLOTS,
    SERVICE_INDEX_SLOTS, Service, ServiceKey, ServiceSlot,
};

/// `0` → per-CPU counters: global (one per pass/drop reason), per service
/// id and per backend id ([`crate::counters`]).
#[btf_map]
pub static COUNTERS: PerCpuArray<Counters, 1> = PerCpuArray::new();

/// `0` → the counters each id's current owner started from. Written and
/// read by user space only; here so it is made and pinned with the rest.
#[btf_map]
pub static COUNTER_BASES: Array<Counters, 1> = Array::new();

/// (VIP, port, proto) → service; `port == 0` entries mark VIP addresses.
#[btf_map]
pub static SERVICES: HashMap<ServiceKey, Service, { 2 * MAX_SERVICES as usize }> = HashMap::new();

/// slot → service with its key: the packet path's direct-mapped service table.
#[btf_map]
pub static SERVICE_INDEX: Array<ServiceSlot, { SERVICE_INDEX_SLOTS as usize }> = Array::new();

/// host-order port → 1 if any service uses it (pre-filter before `SERVICES`).
#[btf_map]
pub static VIP_PORTS: Array<u32, 65536> = Array::new();

/// slot → backend id; service `s` table `h` is `[(2s+h)·MAX_RING_SIZE, +ring_size)`.
#[btf_map]
pub static RINGS: Array<u32, { RING_SLOTS as usize }> = Array::new();

/// backend id → backend.
#[btf_map]
pub static BACKENDS: Array<Backend, { MAX_BACKENDS as usize }> = Array::new();

/// set → the ways of one set of tracked flows ([`crate::flows`]): an array,
/// so a lookup is inlined and an insert is a plain write.
#[btf_map]
pub static FLOW_TABLE: Array<FlowSet, { FLOW_SETS as usize }> = Array::new();

/// `0` → seconds, written by the daemon every second: the clock of
/// [`smtp_lb_common::FlowEntry::stamp`] (it stands still while no daemon runs,
/// and then nothing ages).
#[btf_map]
pub static FLOW_CLOCK: Array<u32, 1> = Array::new();

/// 5-tuple → backend, for the tracked flows a table change moved (user space
/// copies them out of `FLOW_TABLE` at each change). Only read here (and the
/// closing bit set): no packet can insert, so no flood can evict them.
#[btf_map]
pub static MOVED_FLOWS: LruHashMap<FlowKey, Flow, { MOVED_FLOWS_SIZE as usize }> =
    LruHashMap::new();

/// `0` → node-wide settings (encapsulation source addresses).
#[btf_map]
pub static LB_CONFIG: Array<LbConfig, 1> = Array::new();

/// ifindex → ifindex, for `XDP_REDIRECT` to L2 backends behind another interface.
#[btf_map]
pub static TX_PORTS: DevMapHash<{ MAX_TX_PORTS as usize }> = DevMapHash::new();

/// `0` → per-CPU decap counters (relay side).
#[btf_map]
pub static DECAP_STATS: PerCpuArray<DecapStats, 1> = PerCpuArray::new();

/// backend id → live flows counted on this CPU (+1 per SYN tracked to it,
/// −1 when its entry first sees FIN/RST; a flow may end on another CPU,
/// hence signed). User space resets it to the `FLOW_TABLE` count at each
/// walk, which takes back what flows that vanished without FIN/RST leaked.
#[btf_map]
pub static FLOW_COUNTS: PerCpuArray<i64, { MAX_BACKENDS as usize }> = PerCpuArray::new();

/// Relay side: the outer sources and inner destinations decap accepts.
#[btf_map]
pub static DECAP_ALLOW: LpmTrie<DecapPrefix, u32, { MAX_DECAP_PREFIXES as usize }> = LpmTrie::new();

/// service id → 1 while new flows are refused (every relay of the service
/// is over its queue high-water mark; written by user space's `feedback`).
#[btf_map]
pub static ADMISSION: Array<u32, { MAX_SERVICES as usize }> = Array::new();
