//! Which backend a packet goes to: the service lookup, connection tracking,
//! and the Maglev table (built by user space, `balance::maglev`).
use aya_ebpf::helpers::generated::bpf_map_lookup_percpu_elem;
use smtp_lb_common::{
    AF_INET, BACKEND_VALID, Backend, FLOW_CLOSING, Flow, FlowKey, NO_BACKEND, P2C_MAX_CPUS,
    PROTO_TCP, SERVICE_INDEX_PROBES, SERVICE_INDEX_SLOTS, SERVICE_P2C, SERVICE_STICKY, Service,
    ServiceKey, ServiceSlot, flow_hash_of, ring_slot, second_hash, service_slot, table_hash,
};

use crate::{
    counters::Stats,
    flows::{self, Inserted, Tracked},
    maps::{BACKENDS, FLOW_COUNTS, MOVED_FLOWS, RINGS, SERVICE_INDEX, SERVICES, VIP_PORTS},
};

/// The port filter: `None` when no service uses destination port `dport`
/// (network order), which ends the path for most traffic at the cost of an
/// inlined array read; else the `SERVICE_INDEX` slot user space names for
/// the port (its value is that slot + 1), [`service`]'s first guess for a
/// packet whose flow entry names none, such as a SYN.
#[inline(always)]
pub fn vip_port(dport: u16) -> Option<u32> {
    let v = *VIP_PORTS.get(u32::from(u16::from_be(dport)))?;
    v.checked_sub(1)
}

/// The service for (dst address, dst port) of `key` and its slot in
/// `SERVICE_INDEX` ([`vip_port`] has already said the port is used).
/// `hint`: the slot to read first, the one the flow's entry remembers, else
/// the port's ([`vip_port`]). A right guess finds the service without
/// [`service_slot`]'s chain of multiplies; a wrong one (several services on
/// the port, or a value written by an older build, `1`) costs one compare.
#[inline(always)]
pub fn service(key: &FlowKey, hint: u32) -> Option<(ServiceRef, u32)> {
    let skey = ServiceKey {
        addr: key.dst,
        port: key.dport,
        proto: PROTO_TCP,
        family: key.family,
    };
    if let Some(svc) = service_in(hint, &skey) {
        return Some((svc, hint));
    }
    let first = service_slot(&skey);
    let mut i = 0;
    while i < SERVICE_INDEX_PROBES {
        let at = (first + i) & (SERVICE_INDEX_SLOTS - 1);
        if let Some(svc) = service_in(at, &skey) {
            return Some((svc, at));
        }
        i += 1;
    }
    None
}

/// A service as a packet found it in `SERVICE_INDEX`: its id and flags,
/// read at once, and its slot, from which [`ServiceRef::live_table`] reads
/// the live Maglev table for a packet that hashes. An established packet
/// never does, and so skips those loads.
pub struct ServiceRef {
    pub id: u32,
    pub flags: u32,
    slot: *const ServiceSlot,
}

impl ServiceRef {
    /// The live table: where it starts in `RINGS`, and its size (0: no
    /// backend). `active` is read once: user space flips it alone, after
    /// the table it names is complete.
    #[inline(always)]
    fn live_table(&self) -> (u32, u32) {
        // SAFETY: a live map value (array values live as long as the map).
        unsafe {
            let active = core::ptr::read_volatile(&raw const (*self.slot).active) & 1;
            let size = (*self.slot).ring_size[active as usize];
            (Service::ring_base(self.id, active), size)
        }
    }
}

/// The service in slot `at` of `SERVICE_INDEX`, if its key is `skey`. User
/// space keeps each key in one slot, so a match is the service.
#[inline(always)]
fn service_in(at: u32, skey: &ServiceKey) -> Option<ServiceRef> {
    let slot = SERVICE_INDEX.get_ptr(at & (SERVICE_INDEX_SLOTS - 1))?;
    // SAFETY: a valid map value; the key, id and flags change only while
    // the slot is not used.
    unsafe {
        if !key_is(&raw const (*slot).key, skey) {
            return None;
        }
        Some(ServiceRef {
            id: (*slot).id,
            flags: (*slot).flags,
            slot,
        })
    }
}

/// Whether the key at `at` (a `SERVICE_INDEX` slot's) is `skey`, in the
/// fewest loads: the first address word, then port, protocol and family as
/// one word, then (IPv6 only) the other three address words. An IPv4 key's
/// words 1-3 are zero wherever keys are made (here and in user space), and
/// the family compare keeps an IPv4 key from matching an IPv6 one: the
/// derived `==` read and compared all seven fields (≈ 2 ns a packet).
#[inline(always)]
fn key_is(at: *const ServiceKey, skey: &ServiceKey) -> bool {
    let [p0, p1] = skey.port.to_ne_bytes();
    let tail = u32::from_ne_bytes([p0, p1, skey.proto, skey.family]);
    let words = at.cast::<u32>();
    // SAFETY: `at` points at a `ServiceKey` (20 bytes, 4-aligned): words 0-4.
    unsafe {
        if *words != skey.addr[0] || *words.add(4) != tail {
            return false;
        }
        skey.family == AF_INET
            || (*words.add(1) == skey.addr[1]
                && *words.add(2) == skey.addr[2]
                && *words.add(3) == skey.addr[3])
    }
}

/// The key of `dst`'s VIP marker in `SERVICES` (`port == 0`).
#[inline(always)]
pub fn vip_marker(dst: [u32; 4], family: u8) -> ServiceKey {
    ServiceKey {
        addr: dst,
        port: 0,
        proto: PROTO_TCP,
        family,
    }
}

/// Whether `marker` ([`vip_marker`]) exists: its address is a VIP. Only
/// the slow path (options, fragments, extension headers) asks. Out of line
/// with no stack of its own (the caller's frame holds the key): the
/// verifier counts every frame of a call chain against its 512 bytes.
#[inline(never)]
pub fn is_vip_addr(marker: &ServiceKey) -> bool {
    SERVICES.get_ptr(marker).is_some()
}

/// A usable backend: present and not removed.
#[inline(always)]
fn backend(id: u32) -> Option<&'static Backend> {
    // Array values live as long as the map: no copy of the 40 bytes.
    let b = BACKENDS.get(id)?;
    (b.flags & BACKEND_VALID != 0).then_some(b)
}

/// The backend chosen.
pub struct Choice {
    pub id: u32,
    pub backend: &'static Backend,
}

/// A packet's flow-table lookup, made before its service is known: the
/// entry names the service's slot ([`service`]).
pub struct Lookup {
    /// Its entry; always `None` for a SYN, which starts a flow on the table.
    pub found: Option<Tracked>,
}

impl Lookup {
    #[inline(always)]
    pub fn new(key: &FlowKey, syn: bool) -> Self {
        let found = if syn {
            None
        } else {
            flows::find(key, table_hash(key))
        };
        Self { found }
    }

    /// The `SERVICE_INDEX` slot the entry remembers.
    #[inline(always)]
    pub fn service_slot(&self) -> Option<u32> {
        self.found.as_ref().map(|t| t.service_slot)
    }
}

/// The tracked flow of `key`: its [`flows`] entry `found`, else (its way
/// taken, e.g. under a flood) the copy user space made in `MOVED_FLOWS`
/// when a table change sent it elsewhere. `seen` is a packet of the flow
/// (`Some(closing)`: it confirms the entry, a FIN/RST marks it closing);
/// `None` looks without changing anything (ICMP errors).
#[inline(always)]
fn tracked(
    key: &FlowKey,
    found: Option<Tracked>,
    seen: Option<bool>,
    stats: &mut Stats,
) -> Option<u32> {
    if let Some(t) = found {
        if let Some(closing) = seen
            && flows::touch(&t, closing)
        {
            count_flow(t.backend, -1);
        }
        return Some(t.backend);
    }
    // The helpers get a copy's address, never the packet's key: once that
    // reaches a call, LLVM keeps the key on the stack and reloads it after
    // every call, and an IPv4 key's zero words stop folding out of the
    // hash and the way compares (≈ 170 more instructions in the program).
    let key = *key;
    // SAFETY: read once, copied.
    let flow = unsafe { MOVED_FLOWS.get(&key) }.copied()?;
    stats.moved_hit += 1;
    if seen == Some(true) && flow.flags & FLOW_CLOSING == 0 {
        mark_closing(MOVED_FLOWS.get_ptr_mut(&key));
        count_flow(flow.backend, -1);
    }
    Some(flow.backend)
}

#[inline(always)]
fn mark_closing(entry: Option<*mut Flow>) {
    if let Some(p) = entry {
        // SAFETY: a live entry; a racing writer sets the same bit.
        unsafe { (*p).flags |= FLOW_CLOSING };
    }
}

/// Adds `delta` to this CPU's live-flow count of backend `id`.
#[inline(always)]
fn count_flow(id: u32, delta: i64) {
    if let Some(c) = FLOW_COUNTS.get_ptr_mut(id) {
        // SAFETY: this CPU's slot.
        unsafe { *c = (*c).wrapping_add(delta) };
    }
}

/// Live flows of backend `id`: its count summed over the CPUs (at most
/// [`P2C_MAX_CPUS`]; the lookup fails past the last possible CPU).
#[inline(always)]
fn live_flows(id: u32) -> i64 {
    let map = core::ptr::from_ref(&FLOW_COUNTS).cast_mut().cast();
    let mut sum = 0i64;
    let mut cpu = 0;
    while cpu < P2C_MAX_CPUS {
        // SAFETY: the map and a key on the stack; the value is an i64.
        let p = unsafe { bpf_map_lookup_percpu_elem(map, (&raw const id).cast(), cpu) };
        if p.is_null() {
            break;
        }
        // SAFETY: non-null: CPU `cpu`'s slot of a live map value.
        sum = sum.wrapping_add(unsafe { *p.cast::<i64>() });
        cpu += 1;
    }
    sum
}

/// Picks the backend for a packet of service `svc`. A SYN is always hashed
/// through the live table (a new flow); any other packet follows its tracked
/// entry ([`tracked`]) while that backend exists, else is hashed (and
/// counted: `lru_miss` for no entry, `rehash` for a removed backend). Either
/// way the flow is then (re)tracked in [`flows`] if its set has a way to
/// give, so later packets of the flow stick.
#[inline(always)]
pub fn choose(
    key: &FlowKey,
    lookup: Lookup,
    (svc, slot): (&ServiceRef, u32),
    syn: bool,
    closing: bool,
    stats: &mut Stats,
) -> Option<Choice> {
    if !syn {
        match tracked(key, lookup.found, Some(closing), stats) {
            Some(id) => {
                if let Some(backend) = backend(id) {
                    return Some(Choice { id, backend });
                }
                stats.rehash += 1;
            }
            None => stats.lru_miss += 1,
        }
    }
    // Computed here rather than kept from the lookup: one stack slot less
    // across the service lookup, and the established path never needs it.
    // The Maglev flow hash is made of it too (`flow_hash_of`).
    let hash = table_hash(key);
    let (id, backend) = if syn && svc.flags & SERVICE_P2C != 0 {
        two_choices(key, hash, svc)?
    } else {
        table(key, hash, svc)?
    };
    let flags = if closing { FLOW_CLOSING } else { 0 };
    // The live-flow counts follow the table's live entries: +1 for one
    // tracked, −1 for a live one whose way was taken.
    match flows::insert(key, hash, id, (svc.id, slot), flags) {
        Inserted::Took(displaced) => {
            if let Some(old) = displaced {
                count_flow(old, -1);
            }
            if !closing {
                count_flow(id, 1);
            }
        }
        Inserted::Full => stats.flow_table_full += 1,
    }
    Some(Choice { id, backend })
}

/// The backend that owns the flow of `key` without creating state: its
/// tracked entry, else the live table. For ICMP errors quoting the flow
/// (anyone can send those, so they must not insert).
#[inline(always)]
pub fn owner(key: &FlowKey, svc: &ServiceRef, stats: &mut Stats) -> Option<Choice> {
    let hash = table_hash(key);
    let found = flows::find(key, hash);
    if let Some(id) = tracked(key, found, None, stats) {
        if let Some(backend) = backend(id) {
            return Some(Choice { id, backend });
        }
    }
    let (id, backend) = table(key, hash, svc)?;
    Some(Choice { id, backend })
}

/// Whether `key` is tracked and not closing (a retransmitted SYN of a flow
/// admitted before admission closed).
#[inline(always)]
pub fn live(key: &FlowKey) -> bool {
    flows::find(key, table_hash(key)).is_some_and(|t| t.flags() & FLOW_CLOSING == 0)
}

/// The backend the live Maglev table names for `key` (`hash`: its `table_hash`).
#[inline(always)]
fn table(key: &FlowKey, hash: u64, svc: &ServiceRef) -> Option<(u32, &'static Backend)> {
    let (base, size) = svc.live_table();
    if size == 0 {
        return None;
    }
    let hash = flow_hash_of(key, hash, svc.flags & SERVICE_STICKY != 0);
    let id = RINGS
        .get(base + ring_slot(hash, size))
        .copied()
        .unwrap_or(NO_BACKEND);
    if id == NO_BACKEND {
        return None;
    }
    Some((id, backend(id)?))
}

/// Power of two choices ([`SERVICE_P2C`]): of the backends at the flow's
/// slot and at its second slot ([`second_hash`]) in the live table, the one
/// with fewer live flows; a tie, the same backend twice or an unusable
/// second one gives Maglev's. Both draws come from the weighted table, so a
/// backend's share is at most twice its table share (a warming relay with
/// no flows yet gets no more than that).
#[inline(always)]
fn two_choices(key: &FlowKey, hash: u64, svc: &ServiceRef) -> Option<(u32, &'static Backend)> {
    let (base, size) = svc.live_table();
    if size == 0 {
        return None;
    }
    let hash = flow_hash_of(key, hash, false);
    let first = RINGS.get(base + ring_slot(hash, size)).copied()?;
    if first == NO_BACKEND {
        return None;
    }
    let maglev = backend(first)?;
    let second = RINGS
        .get(base + ring_slot(second_hash(hash), size))
        .copied()
        .unwrap_or(NO_BACKEND);
    if second == first || second == NO_BACKEND {
        return Some((first, maglev));
    }
    if let Some(other) = backend(second)
        && live_flows(second) < live_flows(first)
    {
        return Some((second, other));
    }
    Some((first, maglev))
}
