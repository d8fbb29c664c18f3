//! Types shared by the smtp-lb eBPF programs and user space.
//!
//! Every map key and value is `#[repr(C)]` with explicit padding and a size
//! assertion, so the kernel and user space agree on the layout without a
//! "must be kept in sync" comment. With the `user` feature each type also
//! implements `aya::Pod`.
//!
//! # Layout
//! - [`programs`], [`maps`]: object names user space looks up and pins.
//! - sizes ([`MAX_SERVICES`], [`MAX_BACKENDS`], [`MAX_RING_SIZE`], …), each with its rationale.
//! - map keys and values: [`ServiceKey`] → [`Service`], [`Backend`], [`FlowKey`] → [`Flow`],
//!   [`LbConfig`], and the counters: [`Counters`] ([`GlobalStats`], [`ServiceStats`],
//!   [`BackendStats`]).
//! - [`flow_hash`] and [`ring_slot`]: how the kernel picks a relay, so user
//!   space can answer "where does this flow go" with the very same functions.
#![no_std]
#![expect(
    clippy::inline_always,
    reason = "the hashes run in the eBPF program, where every call must be inlined"
)]
#![expect(
    clippy::pub_underscore_fields,
    reason = "explicit padding fields must be public to build the structs"
)]

/// Default bpffs directory under which the daemon pins its maps and program.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/smtp-lb";

/// Names of the programs in the eBPF object, as user space looks them up.
pub mod programs {
    /// The XDP balancer attached to the LB node's interface.
    pub const BALANCER: &str = "smtp_lb";
    /// An XDP program that only returns `XDP_PASS`: the floor every
    /// per-packet cost is measured against, and the pass-through program a
    /// veth peer needs so native `XDP_TX` frames are received.
    pub const PASS: &str = "smtp_lb_pass";
    /// The relay-side XDP program that strips IPIP / IP6IP6 outer headers
    /// (this kernel has no ipip/ip6tnl modules, and a relay should not need them).
    pub const DECAP: &str = "smtp_lb_decap";
}

/// Names of the maps in the eBPF object (also their pin file names).
/// BPF object names are limited to 15 characters (`BPF_OBJ_NAME_LEN`).
pub mod maps {
    /// `u32 (always 0)` → per-CPU [`crate::Counters`]: every counter of the
    /// balancer (global, per service id, per backend id) in one value.
    pub const COUNTERS: &str = "COUNTERS";
    /// `u32 (always 0)` → [`crate::Counters`], written by user space only:
    /// for each service and backend id, its counters (summed over CPUs)
    /// when its current owner took the id. A recycled id's figures are
    /// read from there, so a new relay does not start with the last one's.
    pub const COUNTER_BASES: &str = "COUNTER_BASES";
    /// Counter maps of builds before [`COUNTERS`] (one lookup each per
    /// packet): only named so a daemon adopting such a build's pins can
    /// unpin them.
    pub const OBSOLETE_COUNTERS: [&str; 3] = ["GLOBAL_STATS", "SERVICE_STATS", "BACKEND_STATS"];
    /// [`crate::ServiceKey`] → [`crate::Service`]: which (VIP, port, proto) are balanced.
    pub const SERVICES: &str = "SERVICES";
    /// slot → [`crate::ServiceSlot`]: the packet path's service table, a
    /// direct-mapped array (see [`crate::service_slot`]). An array lookup is
    /// inlined by the verifier; a hash lookup measured ~30 ns more per packet.
    pub const SERVICE_INDEX: &str = "SERVICE_INDEX";
    /// `u16 port` index → `u32` (1 = some service listens on this port): a
    /// cheap pre-filter so non-VIP traffic skips the hash lookup.
    pub const VIP_PORTS: &str = "VIP_PORTS";
    /// `u32` slot → `u32` backend id: every service's two Maglev tables.
    pub const RINGS: &str = "RINGS";
    /// `u32` backend id → [`crate::Backend`].
    pub const BACKENDS: &str = "BACKENDS";
    /// The connection table of builds before the flow table; only named so
    /// a daemon adopting an older one's pins can carry its flows over.
    pub const CONNTRACK: &str = "CONNTRACK";
    /// set → [`crate::FlowSet`]: the connection table, set-associative in an
    /// array (see [`crate::FlowSet`]).
    pub const FLOW_TABLE: &str = "FLOW_TABLE";
    /// `0` → `u32` seconds of the daemon's monotonic clock, written every
    /// second: the time [`crate::FlowEntry::stamp`] is measured in.
    pub const FLOW_CLOCK: &str = "FLOW_CLOCK";
    /// [`crate::FlowKey`] → [`crate::Flow`]: the tracked flows a table change
    /// moved (their backend is no longer the one the live table names),
    /// copied out of [`FLOW_TABLE`] by user space at each table change. The
    /// packet path never inserts here, so a flood cannot evict them.
    pub const MOVED_FLOWS: &str = "MOVED_FLOWS";
    /// `u32 (always 0)` → [`crate::LbConfig`]: node-wide settings.
    pub const LB_CONFIG: &str = "LB_CONFIG";
    /// `u32 ifindex` → `ifindex`: devmap for `XDP_REDIRECT` to other interfaces.
    pub const TX_PORTS: &str = "TX_PORTS";
    /// `u32 (always 0)` → per-CPU [`crate::DecapStats`] (relay side).
    pub const DECAP_STATS: &str = "DECAP_STATS";
    /// LPM trie of [`crate::DecapPrefix`] → `u32` (relay side): the outer
    /// sources (LB nodes) and inner destinations (VIPs) decap accepts.
    pub const DECAP_ALLOW: &str = "DECAP_ALLOW";
    /// `u32` service id → `u32` (1 = refuse new flows): admission under
    /// back-pressure, set while every relay of the service is over its
    /// queue high-water mark (the control plane's `feedback`).
    pub const ADMISSION: &str = "ADMISSION";
    /// `u32` backend id → per-CPU `i64`: live flows the SYN path counted
    /// onto the backend, less those it saw end (FIN/RST), on this CPU; the
    /// sum over CPUs is the backend's live flows (power of two choices).
    pub const FLOW_COUNTS: &str = "FLOW_COUNTS";

    /// Every map of the balancer, so user space can pin (or re-open) each one by name.
    pub const ALL: &[&str] = &[
        COUNTERS,
        COUNTER_BASES,
        SERVICES,
        SERVICE_INDEX,
        VIP_PORTS,
        RINGS,
        BACKENDS,
        FLOW_TABLE,
        FLOW_CLOCK,
        MOVED_FLOWS,
        LB_CONFIG,
        TX_PORTS,
        ADMISSION,
        FLOW_COUNTS,
    ];
}

/// Services (one per VIP × port) a node balances. Each owns two Maglev
/// tables of [`MAX_RING_SIZE`] slots in [`maps::RINGS`]; 32 services is 10
/// VIPs × the three SMTP ports with room to spare, and costs 16.8 MiB.
pub const MAX_SERVICES: u32 = 32;
/// Backends (relays) over all services. A relay in several services is one
/// backend (its identity is its address), so 1024 is far more than a fleet.
pub const MAX_BACKENDS: u32 = 1024;
/// Largest Maglev table (M). 65537 is the paper's and Katran's default, a
/// prime, and keeps M > 100·N for up to 655 backends per service.
pub const MAX_RING_SIZE: u32 = 65537;
/// Slots in [`maps::RINGS`]: two tables per service (the live one and the one
/// being written), so a table update is one atomic switch of [`Service::active`].
pub const RING_SLOTS: u32 = MAX_SERVICES * 2 * MAX_RING_SIZE;
/// Tracked flows: [`FLOW_SETS`] × [`FLOW_WAYS`]. At 10k new SMTP sessions/s
/// and sessions of up to ~20 s this is 1.3× the live set; a flow that finds
/// no way is forwarded by the table (and counted), not lost. 16 MiB.
pub const CONNTRACK_SIZE: u32 = FLOW_SETS * FLOW_WAYS;
/// Sets of [`maps::FLOW_TABLE`] (a power of two: the set is the flow hash's low bits).
pub const FLOW_SETS: u32 = 65_536;
/// Ways per set: a flow may sit in any of them, its key compared in full.
pub const FLOW_WAYS: u32 = 4;
/// Seconds a confirmed flow may stay silent before a new flow may take its
/// way (only when its set has no free, unconfirmed or closing way): spoofed
/// handshakes and flows that died without FIN/RST stop holding ways. Longer
/// than any pause of a live SMTP client short of its own timeouts.
pub const FLOW_IDLE_SECS: u32 = 120;
/// Flows a table change moved ([`maps::MOVED_FLOWS`]). One change copies at
/// most the flows [`maps::FLOW_TABLE`] holds that the new table sends
/// elsewhere, so this many always fit the copies of one change; older copies
/// (and flows of backends that came back) age out of the LRU or are pruned.
pub const MOVED_FLOWS_SIZE: u32 = CONNTRACK_SIZE;
/// Interfaces in the redirect devmap.
pub const MAX_TX_PORTS: u32 = 64;

/// A ring slot value meaning "no backend": a service whose backends all have
/// weight 0 (or none is healthy) is filled with it, and its packets are dropped
/// (counted as `drop_no_backend`).
pub const NO_BACKEND: u32 = u32::MAX;

/// Address families as stored in keys and values (`AF_INET`, `AF_INET6`).
pub const AF_INET: u8 = 2;
pub const AF_INET6: u8 = 10;
/// `IPPROTO_TCP`.
pub const PROTO_TCP: u8 = 6;

/// Key of [`maps::SERVICES`]. Addresses and port in network byte order,
/// as they sit in the packet; an IPv4 address fills `addr[0]`, the rest is 0.
/// `port == 0` is the "this address is a VIP" marker the slow path (IPv4
/// options, fragments, IPv6 extension headers) uses to decide whether to drop.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(C)]
pub struct ServiceKey {
    pub addr: [u32; 4],
    /// Network byte order.
    pub port: u16,
    pub proto: u8,
    pub family: u8,
}
const _: () = assert!(size_of::<ServiceKey>() == 20);
// The packet path compares port, proto and family as one word at offset 16.
const _: () = assert!(core::mem::offset_of!(ServiceKey, port) == 16);

/// Service flag: hash the client address only (a client always lands on the same relay).
pub const SERVICE_STICKY: u32 = 1;
/// Service flag: marker entry (`port == 0`), no table.
pub const SERVICE_VIP_MARKER: u32 = 2;
/// Service flag: power of two choices for new flows. A SYN goes to the one
/// of two table entries — Maglev's ([`flow_hash`]) and a second
/// ([`second_hash`]) — whose backend has fewer live flows
/// ([`maps::FLOW_COUNTS`]); a tie goes to Maglev's.
pub const SERVICE_P2C: u32 = 4;
/// CPUs whose [`maps::FLOW_COUNTS`] a SYN sums, at most (a bounded loop
/// for the verifier). On a larger machine the first 64 CPUs' counts are a
/// sample: RSS spreads flows over CPUs by hash, so relays keep their order.
pub const P2C_MAX_CPUS: u32 = 64;

/// Value of [`maps::SERVICES`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Service {
    /// Index into the per-service maps (stats, rings); `< MAX_SERVICES`.
    pub id: u32,
    /// M: the table size, a prime `<= MAX_RING_SIZE`.
    pub ring_size: u32,
    /// Which of the service's two tables is live (0 or 1).
    pub active: u32,
    /// [`SERVICE_STICKY`], [`SERVICE_VIP_MARKER`].
    pub flags: u32,
}
const _: () = assert!(size_of::<Service>() == 16);

impl Service {
    /// First slot in [`maps::RINGS`] of table `half` (0 or 1) of service `id`.
    pub const fn ring_base(id: u32, half: u32) -> u32 {
        (id * 2 + (half & 1)) * MAX_RING_SIZE
    }
}

/// Slots of [`maps::SERVICE_INDEX`] (a power of two): 32× [`MAX_SERVICES`]
/// keeps probe chains short. 40 KiB.
pub const SERVICE_INDEX_SLOTS: u32 = 1024;
/// A service sits within this many slots of [`service_slot`] (linear probing;
/// user space refuses a config that would need more).
pub const SERVICE_INDEX_PROBES: u32 = 4;

/// Value of [`maps::SERVICE_INDEX`]: a service with its key (an empty slot
/// has `key.family == 0`). Each of the two tables has its own size, so a
/// table switch changes only [`ServiceSlot::active`] — one aligned `u32`,
/// which a reader sees either old or new, never torn.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct ServiceSlot {
    pub key: ServiceKey,
    /// As [`Service::id`].
    pub id: u32,
    /// Which table is live (0 or 1).
    pub active: u32,
    /// As [`Service::flags`].
    pub flags: u32,
    /// M of table 0 and of table 1.
    pub ring_size: [u32; 2],
}
const _: () = assert!(size_of::<ServiceSlot>() == 40);

/// The first slot of [`maps::SERVICE_INDEX`] to probe for `key`.
#[inline(always)]
pub const fn service_slot(key: &ServiceKey) -> u32 {
    let a = key.addr;
    let h = mix(mix(mix(mix(0x7670_6f72, a[0]), a[1]), a[2]), a[3]);
    fmix32(mix(h, ((key.port as u32) << 16) | key.family as u32)) & (SERVICE_INDEX_SLOTS - 1)
}

/// Backend forwarding: rewrite MACs and send on the L2 segment.
pub const MODE_L2: u8 = 0;
/// Backend forwarding: IPIP (IPv4) / IP6IP6 (IPv6) encapsulation.
pub const MODE_IPIP: u8 = 1;
/// Backend flag: the entry may receive packets. Cleared when a backend is
/// removed, which makes its tracked flows re-hash.
pub const BACKEND_VALID: u32 = 1;

/// Value of [`maps::BACKENDS`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Backend {
    /// The relay's address, network byte order (IPv4 in `addr[0]`).
    pub addr: [u32; 4],
    /// L2: the relay's MAC (destination of the rewritten frame).
    pub mac: [u8; 6],
    /// Source MAC when redirecting out of another interface; zero = use the
    /// MAC the frame was addressed to (the LB's own, one-arm case).
    pub src_mac: [u8; 6],
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u8,
    /// [`MODE_L2`] or [`MODE_IPIP`].
    pub mode: u8,
    pub _pad: [u8; 2],
    /// [`BACKEND_VALID`].
    pub flags: u32,
    /// L2: egress interface when it is not the one the packet came in on
    /// (`XDP_REDIRECT` through [`maps::TX_PORTS`]); 0 = `XDP_TX`.
    pub ifindex: u32,
}
const _: () = assert!(size_of::<Backend>() == 40);

/// A flow's 5-tuple, addresses and ports in network byte order: the key of a
/// [`maps::FLOW_TABLE`] way, of [`maps::MOVED_FLOWS`] and of an older build's
/// [`maps::CONNTRACK`].
/// 8-aligned (the size is unchanged), so the packet path compares and copies
/// it in 8-byte words (the verifier refuses misaligned stack loads).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
#[repr(C, align(8))]
pub struct FlowKey {
    pub src: [u32; 4],
    pub dst: [u32; 4],
    pub sport: u16,
    pub dport: u16,
    pub proto: u8,
    pub family: u8,
    pub _pad: [u8; 2],
}
const _: () = assert!(size_of::<FlowKey>() == 40 && align_of::<FlowKey>() == 8);

/// Value of [`maps::MOVED_FLOWS`] (and of an older build's [`maps::CONNTRACK`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct Flow {
    /// The backend the flow started on.
    pub backend: u32,
    /// The service it belongs to (for stats).
    pub service: u32,
    /// [`FLOW_CLOSING`].
    pub flags: u32,
}
const _: () = assert!(size_of::<Flow>() == 12);

/// Flow flag: the client sent FIN or RST. The entry stays (the last ACKs
/// must still reach the relay) until a new flow takes its way, but the flow
/// no longer counts as live (`ctl backends`: a drained relay's live flows
/// fall to zero as its sessions end).
pub const FLOW_CLOSING: u32 = 1;
/// Flow flag ([`FlowEntry`] only): a packet other than a SYN followed the
/// entry (the client sent an ACK). A new flow never takes the way of a
/// confirmed one until it has been idle [`FLOW_IDLE_SECS`] or is closing, so
/// floods of SYNs (or of lone ACKs) cannot evict an established flow.
pub const FLOW_CONFIRMED: u32 = 2;

/// One way of a [`FlowSet`]: a tracked flow, 64 bytes (one cache line).
/// Empty while `key.family == 0`. Ways are written by any CPU without locks,
/// so a reader accepts an entry only when its whole key equals the packet's
/// and `seal` equals [`flow_seal`] of the packet's [`table_hash`] and the
/// `backend` it read: a torn or racing write reads as a miss (the packet
/// then follows `MOVED_FLOWS` or the table), never as another flow's relay.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct FlowEntry {
    pub key: FlowKey,
    /// The backend the flow started on.
    pub backend: u32,
    /// The service it belongs to.
    pub service: u32,
    /// [`FLOW_CLOSING`], [`FLOW_CONFIRMED`].
    pub flags: u32,
    /// [`maps::FLOW_CLOCK`] when a packet last followed the entry.
    pub stamp: u32,
    /// [`flow_seal`]`(table_hash(key), backend)`, written last.
    pub seal: u32,
    /// Where the flow's service sat in [`maps::SERVICE_INDEX`] when it was
    /// tracked: its later packets read that slot (key compared in full)
    /// instead of hashing their way to it. Only a hint: a slot that no
    /// longer holds the flow's (VIP, port) — 0 from user space, a service
    /// removed or moved — costs the full lookup.
    pub service_slot: u32,
}
const _: () = assert!(size_of::<FlowEntry>() == 64);

/// Value of [`maps::FLOW_TABLE`]: the [`FLOW_WAYS`] ways of one set. A flow
/// lives in set [`flow_set`]`(`[`table_hash`]`(key))`; an array lookup is
/// inlined by the verifier, where a hash-map lookup costs ~30–40 ns and an
/// insert ~120–190 ns.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct FlowSet {
    pub ways: [FlowEntry; FLOW_WAYS as usize],
}
const _: () = assert!(size_of::<FlowSet>() == 256);

/// The odd 64-bit multipliers of [`table_hash`], one per word of the key
/// (the first four are [`client_hash`]'s). Changing one moves every pinned
/// flow to another set: a hitless restart would lose the table.
const MULTIPLIERS: [u64; 10] = [
    0x9e37_79b9_7f4a_7c15,
    0xc2b2_ae3d_27d4_eb4f,
    0x1656_67b1_9e37_79f9,
    0x85eb_ca77_c2b2_ae63,
    0x27d4_eb2f_1656_67c5,
    0xff51_afd7_ed55_8ccd,
    0xc4ce_b9fe_1a85_ec53,
    0x8796_5a4b_3c2d_1e0f,
    0xd6e8_feb8_6659_fd93,
    0xa076_1d64_78bd_642f,
];

/// The hash that places a flow in [`maps::FLOW_TABLE`] and seals its entry,
/// and (its middle bits, [`flow_hash`]) picks a new flow's relay:
/// multilinear (each word of the key times its own odd 64-bit constant,
/// summed, the high bits taken). Its ten multiplies are independent, so the
/// CPU runs them side by side, where a chain of dependent mixes measured
/// ~12–25 ns per packet here. Its value is part of the pinned
/// `FLOW_TABLE`'s layout (the set a flow sits in): it must not change.
#[inline(always)]
pub const fn table_hash(key: &FlowKey) -> u64 {
    const K: [u64; 10] = MULTIPLIERS;
    let d = key.dst;
    let ports = ((key.sport as u64) << 16) | key.dport as u64;
    let kind = ((key.proto as u64) << 8) | key.family as u64;
    client_hash(&key.src)
        .wrapping_add((d[0] as u64).wrapping_mul(K[4]))
        .wrapping_add((d[1] as u64).wrapping_mul(K[5]))
        .wrapping_add((d[2] as u64).wrapping_mul(K[6]))
        .wrapping_add((d[3] as u64).wrapping_mul(K[7]))
        .wrapping_add(ports.wrapping_mul(K[8]))
        .wrapping_add(kind.wrapping_mul(K[9]))
}

/// The client-address part of [`table_hash`]: what a sticky service
/// ([`SERVICE_STICKY`]) hashes, multilinear like the rest.
#[inline(always)]
pub const fn client_hash(src: &[u32; 4]) -> u64 {
    const K: [u64; 10] = MULTIPLIERS;
    (src[0] as u64)
        .wrapping_mul(K[0])
        .wrapping_add((src[1] as u64).wrapping_mul(K[1]))
        .wrapping_add((src[2] as u64).wrapping_mul(K[2]))
        .wrapping_add((src[3] as u64).wrapping_mul(K[3]))
}

/// The set of [`maps::FLOW_TABLE`] for [`table_hash`] `hash`: its top bits.
#[inline(always)]
pub const fn flow_set(hash: u64) -> u32 {
    (hash >> (64 - FLOW_SETS.trailing_zeros())) as u32
}

/// The check word of a [`FlowEntry`]: 32 bits of [`table_hash`] folded so
/// they do not repeat the set's, mixed with the backend (injective in it for
/// a given hash), bit 0 always set. A writer first zeroes it, then writes
/// key, backend and service, then the seal, so a reader (key first, seal
/// last) that sees the new key sees 0 or the new seal; an entry whose key,
/// backend and seal come from two racing writes fails it (but for a 2⁻³¹
/// chance).
#[inline(always)]
pub const fn flow_seal(hash: u64, backend: u32) -> u32 {
    ((hash ^ (hash >> 32)) as u32 ^ backend.wrapping_mul(0x9e37_79b1)) | 1
}

impl FlowEntry {
    /// The flow this way holds, if any: not empty and sealed (user-space
    /// readers; the packet path compares the packet's own key).
    pub fn flow(&self) -> Option<Flow> {
        let sealed = self.seal == flow_seal(table_hash(&self.key), self.backend);
        (self.key.family != 0 && sealed).then_some(Flow {
            backend: self.backend,
            service: self.service,
            flags: self.flags & FLOW_CLOSING,
        })
    }
}

/// Value of [`maps::LB_CONFIG`]: node-wide settings the data plane needs.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct LbConfig {
    /// Outer IPv4 source for IPIP, network byte order; its low 16 bits are
    /// replaced by [`encap_hash`] so relays' NICs spread flows over queues (RSS).
    pub encap_src_v4: u32,
    /// Outer IPv6 source for IP6IP6, network byte order; the low 32 bits
    /// carry [`encap_hash`] (and the flow label its low 20).
    pub encap_src_v6: [u32; 4],
}
const _: () = assert!(size_of::<LbConfig>() == 20);

macro_rules! counters {
    ($(#[$meta:meta])* $name:ident { $($(#[$fmeta:meta])* $field:ident),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
        #[repr(C)]
        pub struct $name {
            $($(#[$fmeta])* pub $field: u64,)*
        }

        impl $name {
            /// Field names, in declaration order.
            pub const NAMES: &'static [&'static str] = &[$(stringify!($field)),*];

            /// Every counter with its name, in declaration order.
            pub fn fields(&self) -> [(&'static str, u64); { [$(stringify!($field)),*].len() }] {
                [$((stringify!($field), self.$field)),*]
            }

            /// Adds `other` field by field (to sum per-CPU values).
            pub fn add(&mut self, other: &Self) {
                $(self.$field += other.$field;)*
            }

            /// What was counted since `base`, field by field (0 where
            /// `base` is ahead: a base from counters since replaced).
            #[must_use]
            pub fn since(&self, base: &Self) -> Self {
                Self { $($field: self.$field.saturating_sub(base.$field),)* }
            }
        }

        #[cfg(feature = "user")]
        // SAFETY: `repr(C)`, only `u64` fields, no padding.
        unsafe impl aya::Pod for $name {}
    };
}

counters! {
    /// Global per-CPU counters. Every packet ends in exactly one `pass_*`,
    /// `drop_*`, `tx` or `redirect` counter, so their sum is the packet count;
    /// the rest are events along the way. `bpftool map dump` prints them by name.
    GlobalStats {
        /// Forwarded with `XDP_TX` (L2 DSR one-arm, or IPIP out the same interface).
        tx,
        /// Forwarded with `XDP_REDIRECT` to another interface.
        redirect,
        /// Passed: not IPv4/IPv6 (ARP, LLDP, …).
        pass_non_ip,
        /// Passed: IP but not to a service (other address, port, protocol).
        pass_non_vip,
        /// Passed: too short for a header it claims, before the service is known.
        pass_truncated,
        /// Passed: IPIP packet whose next hop has no neighbour entry yet; the
        /// stack resolves it (and forwards if the node routes).
        pass_no_neigh,
        /// Dropped: VIP traffic with IPv4 options.
        drop_ipv4_options,
        /// Dropped: VIP traffic that is an IPv4 fragment (MF set or offset ≠ 0).
        drop_fragment,
        /// Dropped: VIP traffic with an IPv6 extension header.
        drop_ipv6_ext,
        /// Dropped: VIP traffic with a bogus header (version, ihl, total/payload length, data offset).
        drop_malformed,
        /// Dropped: the service has no backend able to take a new flow.
        drop_no_backend,
        /// Dropped: no route to an IPIP backend, or encapsulation failed.
        drop_encap,
        /// Answered: an IPIP / IP6IP6 packet the path to the relay cannot
        /// carry (over the route's MTU once encapsulated) went back to the
        /// client as ICMP "fragmentation needed" (IPv4 with DF) or `ICMPv6`
        /// "packet too big", with the MTU left inside the tunnel (`XDP_TX`).
        tx_too_big,
        /// Dropped: over the path MTU once encapsulated and no ICMP may answer
        /// it: IPv4 without DF (XDP cannot fragment, and RFC 1191 sends
        /// "fragmentation needed" only for DF), an ICMP error itself (RFC 1122),
        /// or a route MTU below the family's minimum once the tunnel header is taken.
        drop_too_big,
        /// Event: a non-SYN packet of a VIP flow in neither `FLOW_TABLE` nor
        /// `MOVED_FLOWS` (its way taken, or the LB restarted): hashed through
        /// the table (and tracked again, unconfirmed, if a way is free).
        lru_miss,
        /// Event: a tracked flow whose backend was removed, re-hashed.
        rehash,
        /// Event: a non-SYN packet with no `FLOW_TABLE` entry (its way
        /// taken, e.g. under a flood) found in `MOVED_FLOWS`: sent to the backend it started
        /// on although the live table names another.
        moved_hit,
        /// Event: an ICMP destination unreachable / `ICMPv6` packet too big or
        /// unreachable quoting a packet of a balanced flow (VIP:port →
        /// client), sent to the relay that owns the flow.
        icmp_to_flow,
        /// Dropped: a SYN to a service whose admission is closed (every
        /// relay over its queue high-water mark): the client retries it.
        drop_admission,
        /// Event: a new flow found every way of its `FLOW_TABLE` set held by
        /// a confirmed, recently active flow: forwarded by the table,
        /// untracked (a later table change moves it).
        flow_table_full,
    }
}
const _: () = assert!(size_of::<GlobalStats>() == 20 * 8);

counters! {
    /// Per-service, per-CPU counters.
    ServiceStats {
        /// Packets forwarded for this service.
        packets,
        /// Their bytes (frames as received).
        bytes,
        /// New flows (SYNs) balanced.
        new_flows,
        /// Packets dropped because no backend could take them.
        no_backend,
    }
}
const _: () = assert!(size_of::<ServiceStats>() == 32);

counters! {
    /// Per-backend, per-CPU counters.
    BackendStats {
        /// Packets forwarded to this backend.
        packets,
        /// Their bytes (frames as received).
        bytes,
        /// New flows (SYNs) sent to it.
        new_flows,
    }
}
const _: () = assert!(size_of::<BackendStats>() == 24);

/// Every counter of the balancer on one CPU: the value of
/// [`maps::COUNTERS`]. The packet path finds this CPU's block with the one
/// lookup it makes for every packet and reaches the service's and the
/// backend's counters by index: a map per kind cost a forwarded packet two
/// lookups more (≈ 3.5 ns, and the registers they clobber).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Counters {
    pub global: GlobalStats,
    /// By service id.
    pub services: [ServiceStats; MAX_SERVICES as usize],
    /// By backend id.
    pub backends: [BackendStats; MAX_BACKENDS as usize],
}
// The kernel refuses per-CPU values over 32 KiB (`PCPU_MIN_UNIT_SIZE`):
// more services, backends or counters need another split.
const _: () = assert!(size_of::<Counters>() <= 32 * 1024);

impl Default for Counters {
    #[expect(
        clippy::large_stack_arrays,
        reason = "the map's value is one block by design; user space makes a few a second"
    )]
    fn default() -> Self {
        Self {
            global: GlobalStats::default(),
            services: [ServiceStats::default(); MAX_SERVICES as usize],
            backends: [BackendStats::default(); MAX_BACKENDS as usize],
        }
    }
}

impl Counters {
    /// Adds `other` counter by counter (to sum per-CPU values).
    pub fn add(&mut self, other: &Self) {
        self.global.add(&other.global);
        for (s, o) in self.services.iter_mut().zip(&other.services) {
            s.add(o);
        }
        for (b, o) in self.backends.iter_mut().zip(&other.backends) {
            b.add(o);
        }
    }
}

counters! {
    /// Relay-side decap counters.
    DecapStats {
        /// IPIP / IP6IP6 packets whose outer header was stripped.
        decapsulated,
        /// Everything else, passed untouched.
        passed,
        /// Encapsulated but malformed (truncated, options): dropped.
        dropped,
        /// Encapsulated by a source not on the allow-list: dropped.
        dropped_source,
        /// Encapsulated to an inner destination that is not an allowed VIP: dropped.
        dropped_vip,
    }
}

/// [`DecapPrefix::list`]: outer source addresses allowed to tunnel to this
/// relay (the LB nodes' encapsulation sources).
pub const DECAP_LIST_SOURCE: u8 = 1;
/// [`DecapPrefix::list`]: inner destinations decap delivers (the VIPs).
pub const DECAP_LIST_VIP: u8 = 2;
/// Prefixes in [`maps::DECAP_ALLOW`], both lists together.
pub const MAX_DECAP_PREFIXES: u32 = 256;
/// Bits of [`DecapPrefix`] before the address: `list`, `family` and the
/// padding always match in full, so a key's prefix length is this plus the
/// address prefix.
pub const DECAP_PREFIX_HEADER_BITS: u32 = 32;

/// Data of a [`maps::DECAP_ALLOW`] key (after the LPM trie's prefix length).
/// An IPv4 address fills the first 4 bytes of `addr`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[repr(C)]
pub struct DecapPrefix {
    /// [`DECAP_LIST_SOURCE`] or [`DECAP_LIST_VIP`].
    pub list: u8,
    /// [`AF_INET`] or [`AF_INET6`].
    pub family: u8,
    pub _pad: [u8; 2],
    /// Network byte order.
    pub addr: [u8; 16],
}
const _: () = assert!(size_of::<DecapPrefix>() == 20);

#[cfg(feature = "user")]
mod pod {
    // SAFETY (all): `repr(C)` with explicit padding fields, size asserted above.
    unsafe impl aya::Pod for super::ServiceKey {}
    unsafe impl aya::Pod for super::Service {}
    unsafe impl aya::Pod for super::ServiceSlot {}
    unsafe impl aya::Pod for super::Backend {}
    unsafe impl aya::Pod for super::FlowKey {}
    unsafe impl aya::Pod for super::Flow {}
    unsafe impl aya::Pod for super::FlowEntry {}
    unsafe impl aya::Pod for super::FlowSet {}
    unsafe impl aya::Pod for super::LbConfig {}
    unsafe impl aya::Pod for super::DecapPrefix {}
    // SAFETY: `repr(C)`, only `u64` counters, no padding.
    unsafe impl aya::Pod for super::Counters {}
}

/// TCP ports that carry SMTP: relay (25), submission (587), submissions (465).
pub const SMTP_PORTS: [u16; 3] = [25, 587, 465];

/// murmur3's finalizer: every input bit flips each output bit with p ≈ ½.
#[inline(always)]
pub const fn fmix32(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

#[inline(always)]
const fn mix(h: u32, w: u32) -> u32 {
    (h ^ w).wrapping_mul(0x9e37_79b1).rotate_left(13)
}

/// The hash that picks a SYN's second candidate slot under
/// [`SERVICE_P2C`]: the flow hash, mixed again (independent of the first
/// slot for any table size).
#[inline(always)]
pub const fn second_hash(flow_hash: u32) -> u32 {
    fmix32(flow_hash ^ 0x7032_6332)
}

/// The flow hash that picks a new flow's Maglev slot ([`ring_slot`]): the
/// client address and port, the VIP address and port (all as stored in
/// [`FlowKey`], network byte order). `sticky` hashes the client address
/// only. Deterministic across nodes, so every LB node with the same config
/// sends a flow to the same relay, and user space (`ctl where`) computes
/// what the program does.
///
/// Bits 16..47 of [`table_hash`] ([`client_hash`] when sticky), which a
/// SYN computes for the flow table anyway ([`flow_hash_of`]). Why those
/// bits: in a sum of products mod 2⁶⁴, bit `k` depends only on bits `0..=k`
/// of each product, so the low bits are weak and the high ones strong.
/// [`ring_slot`] reads the top bits of this `u32` — bits ≈ 31..47 of the
/// sum for a table of ≈ 2¹⁶ slots, where every bit of each 32-bit key word
/// counts: multiply-shift hashing mod 2⁴⁸, a universal family
/// (Dietzfelbinger et al., 1997). And they are not the top 16 bits, which
/// pick the flow's set ([`flow_set`]): flows that share a set spread over
/// the table like any others. The low bits stay weak: pick with
/// [`ring_slot`] (never `% n`), or mix first ([`second_hash`],
/// [`encap_hash`]).
#[inline(always)]
pub const fn flow_hash(key: &FlowKey, sticky: bool) -> u32 {
    flow_hash_of(key, table_hash(key), sticky)
}

/// [`flow_hash`] of `key`, given its [`table_hash`] `hash`.
#[inline(always)]
pub const fn flow_hash_of(key: &FlowKey, hash: u64, sticky: bool) -> u32 {
    let h = if sticky { client_hash(&key.src) } else { hash };
    (h >> 16) as u32
}

/// The slot of a table of `ring_size` slots that `hash` picks:
/// `⌊hash · ring_size / 2³²⌋`, Lemire's multiply-shift range reduction
/// ("Fast Random Integer Generation in an Interval", 2019). A multiply and
/// a shift where `hash % ring_size` is a division (tens of cycles), and it
/// reads the hash's high bits, the good ones of [`flow_hash`]. Each slot
/// gets ⌊2³²/M⌋ or ⌈2³²/M⌉ hash values, as with `%`. The one definition of
/// a slot: the XDP program, `ctl where`, user space's moved-flow walk and
/// the tests all pick with it.
#[inline(always)]
pub const fn ring_slot(hash: u32, ring_size: u32) -> u32 {
    ((hash as u64 * ring_size as u64) >> 32) as u32
}

/// The entropy an IPIP / IP6IP6 outer header carries (the outer source's
/// low bits, the flow label), so a relay's NIC spreads flows over its
/// queues (RSS): the flow hash mixed, so its low bits are as good as its
/// high ones (those of [`flow_hash`] are not).
#[inline(always)]
pub const fn encap_hash(flow_hash: u32) -> u32 {
    fmix32(flow_hash)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(port: u16) -> FlowKey {
        FlowKey {
            src: [0x0164_33c6, 0, 0, 0],
            dst: [0x0a71_00cb, 0, 0, 0],
            sport: port.to_be(),
            dport: 25u16.to_be(),
            proto: PROTO_TCP,
            family: AF_INET,
            _pad: [0; 2],
        }
    }

    fn entry(key: FlowKey, backend: u32) -> FlowEntry {
        FlowEntry {
            key,
            backend,
            service: 0,
            flags: FLOW_CONFIRMED,
            stamp: 0,
            seal: flow_seal(table_hash(&key), backend),
            service_slot: 0,
        }
    }

    #[test]
    fn a_sealed_entry_is_a_flow_and_any_mix_of_two_writes_is_not() {
        let (a, b) = (entry(key(40000), 1), entry(key(40001), 2));
        assert_eq!(a.flow().map(|f| f.backend), Some(1));
        // Key of one, backend or seal of the other, as racing writers leave a way.
        for torn in [
            FlowEntry { backend: 2, ..a },
            FlowEntry { seal: b.seal, ..a },
            FlowEntry {
                backend: 2,
                seal: b.seal,
                ..a
            },
            FlowEntry { seal: 0, ..a },
            FlowEntry::default(),
        ] {
            assert_eq!(torn.flow(), None, "{torn:?}");
        }
    }

    #[test]
    fn table_hash_keeps_its_values_across_builds() {
        // The pinned FLOW_TABLE keeps a flow in set `flow_set(table_hash)`:
        // a new value would strand every tracked flow at a hitless restart.
        assert_eq!(table_hash(&key(40000)), 0x070d_4dc8_7f2c_add3);
        let mut v6 = key(40000);
        v6.src[1..].copy_from_slice(&[0x11, 0x22, 0x33]);
        v6.dst[1..].copy_from_slice(&[0x44, 0x55, 0x66]);
        v6.family = AF_INET6;
        assert_eq!(table_hash(&v6), 0xce4d_5722_8a5d_3852);
    }

    #[test]
    fn the_flow_hash_is_the_middle_of_table_hash_and_sticky_ignores_all_but_the_client() {
        let k = key(40000);
        assert_eq!(flow_hash(&k, false), (table_hash(&k) >> 16) as u32);
        let other = FlowKey {
            sport: 1234u16.to_be(),
            dst: [0x0b71_00cb, 0, 0, 0],
            ..k
        };
        assert_ne!(flow_hash(&other, false), flow_hash(&k, false));
        assert_eq!(flow_hash(&other, true), flow_hash(&k, true));
        let client = FlowKey {
            src: [0x0264_33c6, 0, 0, 0],
            ..k
        };
        assert_ne!(flow_hash(&client, true), flow_hash(&k, true));
    }

    #[test]
    fn ring_slot_maps_the_hash_range_onto_the_table_in_order() {
        for m in [1, 2, 251, 65521, MAX_RING_SIZE] {
            assert_eq!(ring_slot(0, m), 0);
            assert_eq!(ring_slot(u32::MAX, m), m - 1);
            // Slot s starts at the first hash h with h·m ≥ s·2³².
            for s in [1, m / 2, m - 1].into_iter().filter(|s| *s < m) {
                let first = ((u64::from(s) << 32).div_ceil(u64::from(m))) as u32;
                assert_eq!(ring_slot(first, m), s, "m {m} slot {s}");
                if s > 0 {
                    assert_eq!(ring_slot(first - 1, m), s - 1, "m {m} slot {s}");
                }
            }
        }
    }

    #[test]
    fn no_seal_is_zero_and_ports_spread_over_the_sets() {
        let mut sets = [0u32; 64];
        for port in 0..=u16::MAX {
            let h = table_hash(&key(port));
            assert_ne!(flow_seal(h, 3), 0);
            sets[(flow_set(h) % 64) as usize] += 1;
        }
        // 65,536 flows over 64 buckets: 1024 each, give or take.
        assert!(sets.iter().all(|n| (850..1200).contains(n)), "{sets:?}");
    }
}
