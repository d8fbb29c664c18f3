//! Which backend a packet goes to: the service lookup, connection tracking,
//! and the Maglev table (built by user space, `balance::maglev`).
use smtp_lb_common::{
    BACKEND_VALID, Backend, FLOW_CLOSING, Flow, FlowKey, GlobalStats, NO_BACKEND, PROTO_TCP,
    SERVICE_INDEX_PROBES, SERVICE_INDEX_SLOTS, SERVICE_STICKY, Service, ServiceKey, flow_hash,
    service_slot,
};

use crate::maps::{BACKENDS, CONNTRACK, RINGS, SERVICE_INDEX, SERVICES, VIP_PORTS};

/// Whether some service uses destination port `dport` (network order): an
/// inlined array access, checked before anything else is built, so traffic
/// to other ports costs next to nothing.
#[inline(always)]
pub fn vip_port(dport: u16) -> bool {
    VIP_PORTS
        .get(u32::from(u16::from_be(dport)))
        .is_some_and(|v| *v != 0)
}

/// The service for (dst address, dst port) of `key`, if there is one
/// ([`vip_port`] has already said the port is used).
#[inline(always)]
pub fn service(key: &FlowKey) -> Option<Service> {
    let skey = ServiceKey {
        addr: key.dst,
        port: key.dport,
        proto: PROTO_TCP,
        family: key.family,
    };
    let first = service_slot(&skey);
    let mut i = 0;
    while i < SERVICE_INDEX_PROBES {
        let Some(slot) = SERVICE_INDEX.get_ptr((first + i) & (SERVICE_INDEX_SLOTS - 1)) else {
            return None;
        };
        // SAFETY: a valid map value; `active` is read once (user space
        // flips it alone), the rest may change only while it is not used.
        unsafe {
            if (*slot).key == skey {
                let active = core::ptr::read_volatile(&raw const (*slot).active) & 1;
                return Some(Service {
                    id: (*slot).id,
                    ring_size: (*slot).ring_size[active as usize],
                    active,
                    flags: (*slot).flags,
                });
            }
        }
        i += 1;
    }
    None
}

/// Whether `dst` is a VIP address at all (its `port == 0` marker exists).
/// Only the slow path (options, fragments, extension headers) asks.
#[inline(never)]
pub fn is_vip_addr(dst: &[u32; 4], family: u8) -> bool {
    let skey = ServiceKey {
        addr: *dst,
        port: 0,
        proto: PROTO_TCP,
        family,
    };
    SERVICES.get_ptr(&skey).is_some()
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

/// Picks the backend for a packet of service `svc`. A SYN is always hashed
/// through the live table (a new flow); any other packet follows its
/// conntrack entry while that backend exists, else is hashed (and counted:
/// `lru_miss` for no entry, `rehash` for a removed backend). Either way the
/// entry is (re)written, so later packets of the flow stick.
#[inline(always)]
pub fn choose(
    key: &FlowKey,
    svc: &Service,
    syn: bool,
    closing: bool,
    stats: &mut GlobalStats,
) -> Option<Choice> {
    if !syn {
        // SAFETY: read once, copied.
        match unsafe { CONNTRACK.get(key) } {
            Some(flow) => {
                let id = flow.backend;
                // Only FIN/RST segments write: the common path stays a read.
                if closing && flow.flags & FLOW_CLOSING == 0 {
                    if let Some(p) = CONNTRACK.get_ptr_mut(key) {
                        // SAFETY: a live entry; a racing writer sets the same bit.
                        unsafe { (*p).flags |= FLOW_CLOSING };
                    }
                }
                if let Some(backend) = backend(id) {
                    return Some(Choice { id, backend });
                }
                stats.rehash += 1;
            }
            None => stats.lru_miss += 1,
        }
    }
    if svc.ring_size == 0 {
        return None;
    }
    let hash = flow_hash(key, svc.flags & SERVICE_STICKY != 0);
    let slot = Service::ring_base(svc.id, svc.active) + hash % svc.ring_size;
    let id = RINGS.get(slot).copied().unwrap_or(NO_BACKEND);
    if id == NO_BACKEND {
        return None;
    }
    let backend = backend(id)?;
    let flow = Flow {
        backend: id,
        service: svc.id,
        flags: if closing { FLOW_CLOSING } else { 0 },
    };
    // A full LRU evicts; an insert can only fail on memory pressure, and the
    // packet is still forwarded correctly (the next one re-hashes the same way).
    let _ = CONNTRACK.insert(key, flow, 0);
    Some(Choice { id, backend })
}
