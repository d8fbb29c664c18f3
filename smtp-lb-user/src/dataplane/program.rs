//! Writes a configuration into the balancer's maps, in an order that never
//! lets a packet see a slot pointing at an invalid backend:
//!
//! 1. node settings, redirect ports, then every backend entry (valid);
//! 2. per service, the table that is *not* live is written in full, then the
//!    service entry is replaced with `active` pointing at it (one atomic map
//!    update: a packet sees the whole old table or the whole new one);
//! 3. services that are gone are removed, their ports unfiltered;
//! 4. only then are removed backends marked invalid (no live table refers to
//!    them any more; their tracked flows re-hash);
//! 5. the tracked flows the new tables send elsewhere are copied into
//!    `MOVED_FLOWS`, which no packet can insert into, so a later flood that
//!    evicts them from `CONNTRACK` cannot move them (see [`MovedFlows`]).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::IpAddr,
};

use aya::{
    Ebpf,
    maps::{Array, DevMapHash, HashMap, MapData, MapError},
};
use smtp_lb_common::{
    BACKEND_VALID, Backend, CONNTRACK_SIZE, FLOW_CLOSING, Flow, FlowKey, LbConfig as LbConfigMap,
    MAX_BACKENDS, MOVED_FLOWS_SIZE, PROTO_TCP, SERVICE_INDEX_PROBES, SERVICE_INDEX_SLOTS,
    SERVICE_STICKY, SERVICE_VIP_MARKER, Service, ServiceKey, ServiceSlot, flow_hash, maps,
    service_slot,
};
use thiserror::Error;

use super::walk;
use crate::{
    balance::plan::{self, Existing, Plan, PlannedService, addr_words, words_addr},
    config::lb::LbConfig,
};

/// Why a configuration could not be written to the maps.
#[derive(Debug, Error)]
pub enum ApplyError {
    /// A map is missing from the object or a write failed.
    #[error("map `{name}`: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: MapError,
    },
    /// The devmap refused an interface.
    #[error("map `{}`: add interface `{iface}`: {message}", maps::TX_PORTS)]
    TxPort { iface: String, message: String },
    /// Too many services hash next to each other (practically impossible
    /// with at most `MAX_SERVICES` in `SERVICE_INDEX_SLOTS`).
    #[error(
        "service {vip}:{port}: no free slot in map `{}` within {} probes",
        maps::SERVICE_INDEX,
        SERVICE_INDEX_PROBES
    )]
    IndexFull { vip: IpAddr, port: u16 },
    /// A backend's `interface` does not exist.
    #[error("backend `{backend}`: interface `{iface}` does not exist")]
    NoInterface { backend: String, iface: String },
}

fn map_err(name: &'static str) -> impl Fn(MapError) -> ApplyError {
    move |source| ApplyError::Map { name, source }
}

fn map_ref<'a>(ebpf: &'a Ebpf, name: &'static str) -> Result<&'a aya::maps::Map, ApplyError> {
    ebpf.map(name).ok_or_else(|| missing_map(name))
}

fn map_mut<'a>(
    ebpf: &'a mut Ebpf,
    name: &'static str,
) -> Result<&'a mut aya::maps::Map, ApplyError> {
    ebpf.map_mut(name).ok_or_else(|| missing_map(name))
}

fn services_map(ebpf: &mut Ebpf) -> Result<HashMap<&mut MapData, ServiceKey, Service>, ApplyError> {
    HashMap::try_from(map_mut(ebpf, maps::SERVICES)?).map_err(map_err(maps::SERVICES))
}

fn backends_map(ebpf: &mut Ebpf) -> Result<Array<&mut MapData, Backend>, ApplyError> {
    Array::try_from(map_mut(ebpf, maps::BACKENDS)?).map_err(map_err(maps::BACKENDS))
}

/// What [`apply_config`] did.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Applied {
    /// The plan that was written (ids, tables).
    pub plan: Plan,
    /// Services removed because they left the config.
    pub removed_services: usize,
    /// Backends marked invalid because they left the config.
    pub removed_backends: usize,
    /// What the walk over the tracked flows did.
    pub moved: MovedFlows,
}

/// The walk that keeps moved flows safe from floods. A tracked flow only
/// needs its entry while the live table would send it elsewhere; every other
/// flow re-hashes to the same backend without one. So after each change the
/// flows the new tables moved are copied out of `CONNTRACK` (which every SYN
/// inserts into, and a flood churns) into `MOVED_FLOWS` (which the packet
/// path never inserts into), and copies the tables no longer move are pruned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MovedFlows {
    /// `CONNTRACK` entries looked at.
    pub scanned: u64,
    /// Tracked flows copied into `MOVED_FLOWS` (live, backend valid, the new
    /// table names another backend).
    pub copied: u64,
    /// Copies removed from `MOVED_FLOWS`: closed, backend removed, service
    /// gone, or the table names their backend again.
    pub pruned: u64,
}

/// Ids in use, read back from the maps (after a restart they are the pinned ones).
pub fn read_existing(ebpf: &mut Ebpf) -> Result<Existing, ApplyError> {
    let mut existing = Existing::default();
    let services = services_map(ebpf)?;
    for item in &services {
        let (key, svc) = item.map_err(map_err(maps::SERVICES))?;
        if key.port != 0 {
            existing.services.insert(key, svc.id);
        }
    }
    let backends = backends_map(ebpf)?;
    for id in 0..MAX_BACKENDS {
        let b = backends.get(&id, 0).map_err(map_err(maps::BACKENDS))?;
        if b.family != 0 {
            existing.backends.insert(words_addr(b.addr, b.family), id);
        }
    }
    Ok(existing)
}

/// Writes `cfg` (validated) into the maps of `ebpf`, see the module docs for the order.
pub fn apply_config(ebpf: &mut Ebpf, cfg: &LbConfig) -> Result<Applied, ApplyError> {
    let existing = read_existing(ebpf)?;
    let mut plan = plan::plan(cfg, &existing);

    // 1. Node settings, redirect ports, backends.
    let (v4, _) = addr_words(IpAddr::V4(cfg.encap_source_v4));
    let (v6, _) = addr_words(IpAddr::V6(cfg.encap_source_v6));
    let mut lb_config: Array<&mut MapData, LbConfigMap> =
        Array::try_from(map_mut(ebpf, maps::LB_CONFIG)?).map_err(map_err(maps::LB_CONFIG))?;
    lb_config
        .set(
            0,
            LbConfigMap {
                encap_src_v4: v4[0],
                encap_src_v6: v6,
            },
            0,
        )
        .map_err(map_err(maps::LB_CONFIG))?;
    for b in &mut plan.backends {
        if let Some(iface) = &b.interface {
            let (ifindex, mac) = interface(iface).ok_or_else(|| ApplyError::NoInterface {
                backend: b.name.clone(),
                iface: iface.clone(),
            })?;
            b.value.ifindex = ifindex;
            b.value.src_mac = mac;
            let mut ports: DevMapHash<&mut MapData> =
                DevMapHash::try_from(map_mut(ebpf, maps::TX_PORTS)?)
                    .map_err(map_err(maps::TX_PORTS))?;
            ports
                .insert(ifindex, ifindex, None, 0)
                .map_err(|e| ApplyError::TxPort {
                    iface: iface.clone(),
                    message: e.to_string(),
                })?;
        }
    }
    let mut backends = backends_map(ebpf)?;
    for b in &plan.backends {
        backends
            .set(b.id, b.value, 0)
            .map_err(map_err(maps::BACKENDS))?;
    }

    // 2. Tables: write the standby half, then switch the service to it.
    let current: BTreeMap<ServiceKey, Service> = {
        let services = services_map(ebpf)?;
        services
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(maps::SERVICES))?
    };
    let mut index = ServiceIndex::read(ebpf)?;
    for svc in &plan.services {
        let half = match current.get(&svc.key) {
            Some(live) if live.id == svc.id => 1 - (live.active & 1),
            _ => 0,
        };
        let base = Service::ring_base(svc.id, half);
        let mut rings: Array<&mut MapData, u32> =
            Array::try_from(map_mut(ebpf, maps::RINGS)?).map_err(map_err(maps::RINGS))?;
        for (i, id) in svc.ring.iter().enumerate() {
            rings
                .set(base + i as u32, id, 0)
                .map_err(map_err(maps::RINGS))?;
        }
        // The packet path's slot: first the standby table's size (unused
        // while the other table is live), then the switch itself.
        let at = index.place(&svc.key)?;
        let mut slot = match index.slots[at as usize] {
            s if s.key == svc.key && s.id == svc.id => s,
            _ => ServiceSlot {
                key: svc.key,
                id: svc.id,
                active: half,
                ..ServiceSlot::default()
            },
        };
        slot.ring_size[half as usize] = svc.ring_size;
        slot.flags = svc.flags;
        index.write(ebpf, at, slot)?;
        slot.active = half;
        index.write(ebpf, at, slot)?;
        services_map(ebpf)?
            .insert(
                svc.key,
                Service {
                    id: svc.id,
                    ring_size: svc.ring_size,
                    active: half,
                    flags: svc.flags,
                },
                0,
            )
            .map_err(map_err(maps::SERVICES))?;
    }
    let mut services = services_map(ebpf)?;
    for key in &plan.vip_markers {
        services
            .insert(
                key,
                Service {
                    flags: SERVICE_VIP_MARKER,
                    ..Service::default()
                },
                0,
            )
            .map_err(map_err(maps::SERVICES))?;
    }
    let mut vip_ports: Array<&mut MapData, u32> =
        Array::try_from(map_mut(ebpf, maps::VIP_PORTS)?).map_err(map_err(maps::VIP_PORTS))?;
    for port in &plan.ports {
        vip_ports
            .set(u32::from(*port), 1, 0)
            .map_err(map_err(maps::VIP_PORTS))?;
    }

    // 3. Services that left the config.
    let keep: BTreeSet<ServiceKey> = plan
        .services
        .iter()
        .map(|s| s.key)
        .chain(plan.vip_markers.iter().copied())
        .collect();
    let mut removed_services = 0;
    for key in current.keys().filter(|k| !keep.contains(k)) {
        if let Some(at) = index.find(key) {
            index.write(ebpf, at, ServiceSlot::default())?;
        }
        let mut services = services_map(ebpf)?;
        services.remove(key).map_err(map_err(maps::SERVICES))?;
        if key.port != 0 {
            removed_services += 1;
        }
    }
    let old_ports: BTreeSet<u16> = current
        .keys()
        .filter(|k| k.port != 0)
        .map(|k| u16::from_be(k.port))
        .collect();
    let mut vip_ports: Array<&mut MapData, u32> =
        Array::try_from(map_mut(ebpf, maps::VIP_PORTS)?).map_err(map_err(maps::VIP_PORTS))?;
    for port in old_ports.difference(&plan.ports) {
        vip_ports
            .set(u32::from(*port), 0, 0)
            .map_err(map_err(maps::VIP_PORTS))?;
    }

    // 4. Backends that left the config: invalid from now on (their flows re-hash).
    let planned: BTreeSet<u32> = plan.backends.iter().map(|b| b.id).collect();
    let mut removed_backends = 0;
    let mut backends = backends_map(ebpf)?;
    for (addr, id) in &existing.backends {
        if planned.contains(id) {
            continue;
        }
        let mut b = backends.get(id, 0).map_err(map_err(maps::BACKENDS))?;
        if b.flags & BACKEND_VALID != 0 {
            b.flags &= !BACKEND_VALID;
            backends.set(*id, b, 0).map_err(map_err(maps::BACKENDS))?;
            removed_backends += 1;
            tracing::info!(backend = %addr, id, "backend removed; its flows re-hash");
        }
    }
    // 5. Flows the new tables moved.
    let moved = protect_moved_flows(ebpf, &plan)?;
    if moved.copied + moved.pruned > 0 {
        tracing::info!(
            scanned = moved.scanned,
            copied = moved.copied,
            pruned = moved.pruned,
            "tracked flows the table change moved kept in {}",
            maps::MOVED_FLOWS
        );
    }
    Ok(Applied {
        plan,
        removed_services,
        removed_backends,
        moved,
    })
}

/// Step 5 of [`apply_config`], see [`MovedFlows`].
fn protect_moved_flows(ebpf: &mut Ebpf, plan: &Plan) -> Result<MovedFlows, ApplyError> {
    let services: BTreeMap<u32, &PlannedService> =
        plan.services.iter().map(|s| (s.id, s)).collect();
    let valid: BTreeSet<u32> = plan.backends.iter().map(|b| b.id).collect();
    // Whether the flow needs its entry: live, its backend still there, and
    // the new table of its service sends it elsewhere.
    let moved = |key: &FlowKey, flow: &Flow| {
        let Some(svc) = services.get(&flow.service) else {
            return false;
        };
        let skey = ServiceKey {
            addr: key.dst,
            port: key.dport,
            proto: PROTO_TCP,
            family: key.family,
        };
        if svc.key != skey || flow.flags & FLOW_CLOSING != 0 || !valid.contains(&flow.backend) {
            return false;
        }
        let hash = flow_hash(key, svc.flags & SERVICE_STICKY != 0);
        svc.ring.get((hash % svc.ring_size.max(1)) as usize) != Some(&flow.backend)
    };
    let mut out = MovedFlows::default();
    // Bounded, in case the fallback iteration restarts (an entry evicted under its cursor).
    let tracked: Vec<(FlowKey, Flow)> =
        walk::entries(map_ref(ebpf, maps::CONNTRACK)?, 2 * CONNTRACK_SIZE as usize)
            .map_err(map_err(maps::CONNTRACK))?;
    out.scanned = tracked.len() as u64;
    let copies: Vec<_> = tracked.into_iter().filter(|(k, f)| moved(k, f)).collect();
    let stale: Vec<FlowKey> = walk::entries::<FlowKey, Flow>(
        map_ref(ebpf, maps::MOVED_FLOWS)?,
        2 * MOVED_FLOWS_SIZE as usize,
    )
    .map_err(map_err(maps::MOVED_FLOWS))?
    .into_iter()
    .filter(|(key, flow)| !moved(key, flow))
    .map(|(key, _)| key)
    .collect();
    let mut moved_map: HashMap<&mut MapData, FlowKey, Flow> =
        HashMap::try_from(map_mut(ebpf, maps::MOVED_FLOWS)?).map_err(map_err(maps::MOVED_FLOWS))?;
    for key in &stale {
        match moved_map.remove(key) {
            Ok(()) => out.pruned += 1,
            Err(MapError::KeyNotFound) => {}
            Err(e) => return Err(map_err(maps::MOVED_FLOWS)(e)),
        }
    }
    for (key, flow) in &copies {
        moved_map
            .insert(key, flow, 0)
            .map_err(map_err(maps::MOVED_FLOWS))?;
        out.copied += 1;
    }
    Ok(out)
}

fn missing_map(name: &'static str) -> ApplyError {
    ApplyError::Map {
        name,
        source: MapError::InvalidName {
            name: name.to_owned(),
        },
    }
}

/// The packet path's direct-mapped service table, as last written.
struct ServiceIndex {
    slots: Vec<ServiceSlot>,
}

impl ServiceIndex {
    fn read(ebpf: &mut Ebpf) -> Result<Self, ApplyError> {
        let map: Array<&mut MapData, ServiceSlot> =
            Array::try_from(map_mut(ebpf, maps::SERVICE_INDEX)?)
                .map_err(map_err(maps::SERVICE_INDEX))?;
        let slots = (0..SERVICE_INDEX_SLOTS)
            .map(|i| map.get(&i, 0))
            .collect::<Result<_, _>>()
            .map_err(map_err(maps::SERVICE_INDEX))?;
        Ok(Self { slots })
    }

    fn probe(key: &ServiceKey) -> impl Iterator<Item = u32> {
        let first = service_slot(key);
        (0..SERVICE_INDEX_PROBES).map(move |i| (first + i) & (SERVICE_INDEX_SLOTS - 1))
    }

    /// Where `key` is.
    fn find(&self, key: &ServiceKey) -> Option<u32> {
        Self::probe(key).find(|&i| self.slots[i as usize].key == *key)
    }

    /// Where `key` is, else a free slot the packet path will probe.
    fn place(&self, key: &ServiceKey) -> Result<u32, ApplyError> {
        self.find(key)
            .or_else(|| Self::probe(key).find(|&i| self.slots[i as usize].key.family == 0))
            .ok_or(ApplyError::IndexFull {
                vip: words_addr(key.addr, key.family),
                port: u16::from_be(key.port),
            })
    }

    fn write(&mut self, ebpf: &mut Ebpf, at: u32, slot: ServiceSlot) -> Result<(), ApplyError> {
        let mut map: Array<&mut MapData, ServiceSlot> =
            Array::try_from(map_mut(ebpf, maps::SERVICE_INDEX)?)
                .map_err(map_err(maps::SERVICE_INDEX))?;
        map.set(at, slot, 0).map_err(map_err(maps::SERVICE_INDEX))?;
        self.slots[at as usize] = slot;
        Ok(())
    }
}

/// ifindex and MAC of `iface`, asked of the kernel through a socket of this
/// process's network namespace (`/sys/class/net` would show the namespace
/// sysfs was mounted in, which under `nsenter --net` is the host's).
fn interface(iface: &str) -> Option<(u32, [u8; 6])> {
    let c = std::ffi::CString::new(iface).ok()?;
    // SAFETY: valid C string.
    let idx = unsafe { libc::if_nametoindex(c.as_ptr()) };
    if idx == 0 || iface.len() >= libc::IFNAMSIZ {
        return None;
    }
    // SAFETY: plain socket(2); closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return None;
    }
    // SAFETY: all-zero ifreq is valid; the name fits (checked above).
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(iface.as_bytes()) {
        *d = libc::c_char::from_ne_bytes([*s]);
    }
    // SAFETY: SIOCGIFHWADDR fills ifr_hwaddr of a valid ifreq.
    let rc = unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &raw mut req) };
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if rc != 0 {
        return None;
    }
    // SAFETY: the ioctl succeeded, so the union holds ifru_hwaddr.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (m, b) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *m = b.to_ne_bytes()[0];
    }
    Some((idx, mac))
}
