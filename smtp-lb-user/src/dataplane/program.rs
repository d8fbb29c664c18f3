//! Writes a configuration into the balancer's maps, in an order that never
//! lets a packet see a slot pointing at an invalid backend:
//!
//! 1. node settings, then every backend entry (valid), with its redirect port;
//! 2. per service, the table that is *not* live is written in full, then the
//!    service entry is replaced with `active` pointing at it (one atomic map
//!    update: a packet sees the whole old table or the whole new one);
//! 3. services that are gone are removed (a recycled service id's new table
//!    went into the half its old owner did not read), their ports unfiltered;
//! 4. only then are removed backends marked invalid (no live table refers to
//!    them any more; their tracked flows re-hash);
//! 5. the tracked flows the new tables send elsewhere are copied into
//!    `MOVED_FLOWS`, which no packet can insert into, so losing their
//!    `FLOW_TABLE` way later (a full set, an LB restart) cannot move them
//!    (see [`MovedFlows`]).
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use aya::{
    Ebpf,
    maps::{Array, DevMapHash, HashMap, MapData, MapError, PerCpuArray, PerCpuValues},
};
use smtp_lb_common::{
    BACKEND_VALID, Backend, Counters, FLOW_CLOSING, Flow, FlowKey, LbConfig as LbConfigMap,
    MAX_BACKENDS, MOVED_FLOWS_SIZE, PROTO_TCP, SERVICE_INDEX_PROBES, SERVICE_INDEX_SLOTS,
    SERVICE_STICKY, SERVICE_VIP_MARKER, Service, ServiceKey, ServiceSlot, flow_hash, maps,
    ring_slot, service_slot,
};
use thiserror::Error;

use super::{MapWriter, walk};
use crate::{
    balance::plan::{
        self, Existing, Plan, PlanError, PlannedBackend, PlannedService, addr_words, words_addr,
    },
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
    /// The configuration does not fit the data plane.
    #[error(transparent)]
    Plan(#[from] PlanError),
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

/// What [`apply`] did.
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
/// flows the new tables moved are copied out of `FLOW_TABLE` (which every SYN
/// writes into, and a flood churns where it can) into `MOVED_FLOWS` (which
/// the packet path never inserts into), and copies the tables no longer move
/// are pruned.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MovedFlows {
    /// `FLOW_TABLE` entries (tracked flows) looked at.
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
    ebpf.existing()
}

/// Writes `cfg` (validated) in full; see [`apply`].
pub fn apply_config<D: MapWriter + ?Sized>(
    dp: &mut D,
    cfg: &LbConfig,
) -> Result<Applied, ApplyError> {
    apply(dp, cfg, None)
}

/// Writes `cfg` (validated) into the data plane, see the module docs for
/// the order. With `previous` (the plan the maps hold, as last applied),
/// backends and tables that did not change are not written again: a weight
/// change rewrites one table, not all of them.
pub fn apply<D: MapWriter + ?Sized>(
    dp: &mut D,
    cfg: &LbConfig,
    previous: Option<&Plan>,
) -> Result<Applied, ApplyError> {
    let existing = dp.existing()?;
    let plan = plan::plan(cfg, &existing)?;
    let unchanged_backend = |b: &PlannedBackend| {
        !existing.retired.contains(&b.id)
            && previous.is_some_and(|p| p.backends.iter().any(|o| o == b))
    };
    let unchanged_service = |s: &PlannedService| {
        existing.services.get(&s.key) == Some(&s.id)
            && previous.is_some_and(|p| p.services.iter().any(|o| o == s))
    };

    // 1. Node settings, then every backend (valid).
    if previous.is_none_or(|p| p.encap != plan.encap) {
        dp.set_node(cfg.encap_source_v4, cfg.encap_source_v6)?;
    }
    for b in plan.backends.iter().filter(|b| !unchanged_backend(b)) {
        dp.set_backend(b)?;
    }
    // 2. Tables (each switched atomically), VIP markers, the port filter.
    let mut written_tables = 0;
    for s in plan.services.iter().filter(|s| !unchanged_service(s)) {
        dp.set_service(s)?;
        written_tables += 1;
    }
    for key in plan
        .vip_markers
        .iter()
        .filter(|k| !existing.vips.contains(k))
    {
        dp.set_vip(key)?;
    }
    let old_ports: BTreeSet<u16> = existing
        .services
        .keys()
        .map(|k| u16::from_be(k.port))
        .collect();
    for port in plan.ports.difference(&old_ports) {
        dp.set_port(*port, true)?;
    }

    // 3. Services and VIPs that left the config, then their ports.
    let keep: BTreeSet<ServiceKey> = plan
        .services
        .iter()
        .map(|s| s.key)
        .chain(plan.vip_markers.iter().copied())
        .collect();
    let mut removed_services = 0;
    for key in existing.services.keys().chain(&existing.vips) {
        if !keep.contains(key) {
            dp.remove_service(key)?;
            removed_services += usize::from(key.port != 0);
        }
    }
    for port in old_ports.difference(&plan.ports) {
        dp.set_port(*port, false)?;
    }

    // 4. Backends that left the config: invalid from now on (their flows
    // re-hash), and their ids free for reuse.
    let planned: BTreeSet<u32> = plan.backends.iter().map(|b| b.id).collect();
    let mut removed_backends = 0;
    for (addr, id) in &existing.backends {
        if planned.contains(id) || existing.retired.contains(id) {
            continue;
        }
        dp.retire_backend(*id)?;
        removed_backends += 1;
        tracing::info!(backend = %addr, id, "backend removed; its flows re-hash");
    }

    // 5. Flows the change moved; nothing moved when no table changed, no
    // service left and no backend was retired.
    let changed = written_tables + removed_services + removed_backends > 0;
    let moved = if changed {
        dp.keep_moved_flows(&plan)?
    } else {
        MovedFlows::default()
    };
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

/// The kernel's maps, written through aya.
impl MapWriter for Ebpf {
    fn existing(&mut self) -> Result<Existing, ApplyError> {
        let mut existing = Existing::default();
        let services = services_map(self)?;
        for item in &services {
            let (key, svc) = item.map_err(map_err(maps::SERVICES))?;
            if key.port == 0 {
                existing.vips.insert(key);
            } else {
                existing.services.insert(key, svc.id);
            }
        }
        let backends = backends_map(self)?;
        for id in 0..MAX_BACKENDS {
            let b = backends.get(&id, 0).map_err(map_err(maps::BACKENDS))?;
            if b.family != 0 {
                existing.backends.insert(words_addr(b.addr, b.family), id);
                if b.flags & BACKEND_VALID == 0 {
                    existing.retired.insert(id);
                }
            }
        }
        Ok(existing)
    }

    fn set_node(&mut self, encap_v4: Ipv4Addr, encap_v6: Ipv6Addr) -> Result<(), ApplyError> {
        let (v4, _) = addr_words(IpAddr::V4(encap_v4));
        let (v6, _) = addr_words(IpAddr::V6(encap_v6));
        let mut lb_config: Array<&mut MapData, LbConfigMap> =
            Array::try_from(map_mut(self, maps::LB_CONFIG)?).map_err(map_err(maps::LB_CONFIG))?;
        lb_config
            .set(
                0,
                LbConfigMap {
                    encap_src_v4: v4[0],
                    encap_src_v6: v6,
                },
                0,
            )
            .map_err(map_err(maps::LB_CONFIG))
    }

    fn set_backend(&mut self, planned: &PlannedBackend) -> Result<(), ApplyError> {
        let mut value = planned.value;
        if let Some(iface) = &planned.interface {
            let (ifindex, mac) = interface(iface).ok_or_else(|| ApplyError::NoInterface {
                backend: planned.name.clone(),
                iface: iface.clone(),
            })?;
            value.ifindex = ifindex;
            value.src_mac = mac;
            let mut ports: DevMapHash<&mut MapData> =
                DevMapHash::try_from(map_mut(self, maps::TX_PORTS)?)
                    .map_err(map_err(maps::TX_PORTS))?;
            ports
                .insert(ifindex, ifindex, None, 0)
                .map_err(|e| ApplyError::TxPort {
                    iface: iface.clone(),
                    message: e.to_string(),
                })?;
        }
        let old = backends_map(self)?
            .get(&planned.id, 0)
            .map_err(map_err(maps::BACKENDS))?;
        if old.family != 0 && (old.addr, old.family) != (value.addr, value.family) {
            // A recycled id: its counters belonged to the previous relay
            // (rebased first, so no reader sees this relay with them).
            rebase(self, Owner::Backend(planned.id))?;
            set_per_cpu(self, maps::FLOW_COUNTS, planned.id, 0i64)?;
        }
        backends_map(self)?
            .set(planned.id, value, 0)
            .map_err(map_err(maps::BACKENDS))
    }

    fn set_service(&mut self, svc: &PlannedService) -> Result<(), ApplyError> {
        let current: BTreeMap<ServiceKey, Service> = services_map(self)?
            .iter()
            .collect::<Result<_, _>>()
            .map_err(map_err(maps::SERVICES))?;
        // Write the table no packet reads: the standby half of this id,
        // whichever service (this one, or one leaving whose id is recycled)
        // holds the id now.
        let live = current
            .get(&svc.key)
            .filter(|l| l.id == svc.id)
            .or_else(|| {
                current
                    .iter()
                    .find(|(k, l)| k.port != 0 && l.id == svc.id)
                    .map(|(_, l)| l)
            });
        let half = live.map_or(0, |l| 1 - (l.active & 1));
        if current.get(&svc.key).is_none_or(|l| l.id != svc.id) {
            rebase(self, Owner::Service(svc.id))?;
        }
        let base = Service::ring_base(svc.id, half);
        let mut rings: Array<&mut MapData, u32> =
            Array::try_from(map_mut(self, maps::RINGS)?).map_err(map_err(maps::RINGS))?;
        for (i, id) in svc.ring.iter().enumerate() {
            rings
                .set(base + i as u32, id, 0)
                .map_err(map_err(maps::RINGS))?;
        }
        // The packet path's slot: first the standby table's size (unused
        // while the other table is live), then the switch itself.
        let mut index = ServiceIndex::read(self, &svc.key)?;
        let at = index.place(&svc.key)?;
        let mut slot = match index.slot(at) {
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
        index.write(self, at, slot)?;
        slot.active = half;
        index.write(self, at, slot)?;
        // The port's guess for a new flow: this slot (one service per port,
        // the common case, is then found without hashing).
        write_port(self, u16::from_be(svc.key.port), at + 1)?;
        services_map(self)?
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
            .map_err(map_err(maps::SERVICES))
    }

    fn set_vip(&mut self, marker: &ServiceKey) -> Result<(), ApplyError> {
        services_map(self)?
            .insert(
                marker,
                Service {
                    flags: SERVICE_VIP_MARKER,
                    ..Service::default()
                },
                0,
            )
            .map_err(map_err(maps::SERVICES))
    }

    fn set_port(&mut self, port: u16, balanced: bool) -> Result<(), ApplyError> {
        // A used port keeps the slot its service wrote (`set_service`).
        if balanced && read_port(self, port)? != 0 {
            return Ok(());
        }
        write_port(self, port, u32::from(balanced))
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), ApplyError> {
        let mut index = ServiceIndex::read(self, key)?;
        if let Some(at) = index.find(key) {
            index.write(self, at, ServiceSlot::default())?;
            // The port stays used while another service has it (`set_port`
            // says when not): only its guess goes.
            let port = u16::from_be(key.port);
            if key.port != 0 && read_port(self, port)? == at + 1 {
                write_port(self, port, 1)?;
            }
        }
        services_map(self)?
            .remove(key)
            .map_err(map_err(maps::SERVICES))
    }

    fn retire_backend(&mut self, id: u32) -> Result<(), ApplyError> {
        let mut backends = backends_map(self)?;
        let mut b = backends.get(&id, 0).map_err(map_err(maps::BACKENDS))?;
        b.flags &= !BACKEND_VALID;
        backends.set(id, b, 0).map_err(map_err(maps::BACKENDS))
    }

    fn set_clock(&mut self, secs: u32) -> Result<(), ApplyError> {
        let mut clock: Array<&mut MapData, u32> =
            Array::try_from(map_mut(self, maps::FLOW_CLOCK)?).map_err(map_err(maps::FLOW_CLOCK))?;
        clock.set(0, secs, 0).map_err(map_err(maps::FLOW_CLOCK))
    }

    fn set_admission(&mut self, id: u32, refuse: bool) -> Result<(), ApplyError> {
        let mut admission: Array<&mut MapData, u32> =
            Array::try_from(map_mut(self, maps::ADMISSION)?).map_err(map_err(maps::ADMISSION))?;
        admission
            .set(id, u32::from(refuse), 0)
            .map_err(map_err(maps::ADMISSION))
    }

    fn keep_moved_flows(&mut self, plan: &Plan) -> Result<MovedFlows, ApplyError> {
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
            svc.ring.get(ring_slot(hash, svc.ring_size) as usize) != Some(&flow.backend)
        };
        let mut out = MovedFlows::default();
        let tracked: Vec<(FlowKey, Flow)> = walk::flow_table(map_ref(self, maps::FLOW_TABLE)?)
            .map_err(map_err(maps::FLOW_TABLE))?;
        out.scanned = tracked.len() as u64;
        set_flow_counts(self, &valid, &tracked)?;
        let copies: Vec<_> = tracked.into_iter().filter(|(k, f)| moved(k, f)).collect();
        let stale: Vec<FlowKey> = walk::entries::<FlowKey, Flow>(
            map_ref(self, maps::MOVED_FLOWS)?,
            2 * MOVED_FLOWS_SIZE as usize,
        )
        .map_err(map_err(maps::MOVED_FLOWS))?
        .into_iter()
        .filter(|(key, flow)| !moved(key, flow))
        .map(|(key, _)| key)
        .collect();
        let mut moved_map: HashMap<&mut MapData, FlowKey, Flow> =
            HashMap::try_from(map_mut(self, maps::MOVED_FLOWS)?)
                .map_err(map_err(maps::MOVED_FLOWS))?;
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
}

fn missing_map(name: &'static str) -> ApplyError {
    ApplyError::Map {
        name,
        source: MapError::InvalidName {
            name: name.to_owned(),
        },
    }
}

/// Resets `FLOW_COUNTS` of every backend in `valid` to its live flows in
/// `tracked` (a `FLOW_TABLE` walk): CPU 0 gets the count, the others 0.
/// This takes back what the packet path cannot see end (a client that
/// vanished without FIN, racing writes to one way); a SYN or FIN
/// counted between the walk and this write is lost, an error of the few
/// flows of those milliseconds until the next walk.
fn set_flow_counts(
    ebpf: &mut Ebpf,
    valid: &BTreeSet<u32>,
    tracked: &[(FlowKey, Flow)],
) -> Result<(), ApplyError> {
    let name = maps::FLOW_COUNTS;
    let mut live: BTreeMap<u32, i64> = valid.iter().map(|id| (*id, 0)).collect();
    for (_, flow) in tracked {
        if flow.flags & FLOW_CLOSING == 0
            && let Some(n) = live.get_mut(&flow.backend)
        {
            *n += 1;
        }
    }
    for (id, n) in live {
        set_per_cpu(ebpf, name, id, n)?;
    }
    Ok(())
}

/// An id whose counters [`rebase`] restarts.
#[derive(Clone, Copy)]
enum Owner {
    Service(u32),
    Backend(u32),
}

/// Every counter of the loaded balancer, summed over the CPUs.
pub fn counters(ebpf: &Ebpf) -> Result<Counters, ApplyError> {
    let counters: PerCpuArray<&MapData, Counters> =
        PerCpuArray::try_from(map_ref(ebpf, maps::COUNTERS)?).map_err(map_err(maps::COUNTERS))?;
    super::stats::summed(&counters).map_err(map_err(maps::COUNTERS))
}

/// Records what `owner`'s id has counted so far (summed over CPUs) as its
/// base in `COUNTER_BASES`: the id's new owner is read from there. The
/// packet path's counters are never written here: that would replace each
/// CPU's whole block and lose what other packets counted meanwhile.
fn rebase(ebpf: &mut Ebpf, owner: Owner) -> Result<(), ApplyError> {
    let now = counters(ebpf)?;
    let mut bases: Array<&mut MapData, Counters> =
        Array::try_from(map_mut(ebpf, maps::COUNTER_BASES)?)
            .map_err(map_err(maps::COUNTER_BASES))?;
    let mut base = bases.get(&0, 0).map_err(map_err(maps::COUNTER_BASES))?;
    match owner {
        Owner::Service(id) => take(&mut base.services, &now.services, id),
        Owner::Backend(id) => take(&mut base.backends, &now.backends, id),
    }
    bases.set(0, base, 0).map_err(map_err(maps::COUNTER_BASES))
}

/// `base[id] = now[id]`, for an id in range.
fn take<T: Copy>(base: &mut [T], now: &[T], id: u32) {
    if let (Some(b), Some(n)) = (base.get_mut(id as usize), now.get(id as usize)) {
        *b = *n;
    }
}

/// Sets entry `id` of a per-CPU map: `first` on CPU 0, the default on the
/// others (so its sum over CPUs is `first`).
fn set_per_cpu<T: aya::Pod + Default>(
    ebpf: &mut Ebpf,
    name: &'static str,
    id: u32,
    first: T,
) -> Result<(), ApplyError> {
    let cpus = aya::util::nr_cpus().map_err(|(_, e)| ApplyError::Map {
        name,
        source: MapError::IoError(e),
    })?;
    let mut map: PerCpuArray<&mut MapData, T> =
        PerCpuArray::try_from(map_mut(ebpf, name)?).map_err(map_err(name))?;
    let mut values = vec![T::default(); cpus];
    values[0] = first;
    let values = PerCpuValues::try_from(values).map_err(|e| ApplyError::Map {
        name,
        source: MapError::IoError(e),
    })?;
    map.set(id, values, 0).map_err(map_err(name))
}

/// The slots of the packet path's direct-mapped service table that a
/// key's probe chain covers, as last written.
struct ServiceIndex {
    /// `(slot index, value)` along the probe chain.
    chain: Vec<(u32, ServiceSlot)>,
}

/// `VIP_PORTS[port]`: 0 unused, else 1 + the `SERVICE_INDEX` slot of one of
/// its services (`1`: used, no guess; what builds before the guess wrote).
fn read_port(ebpf: &mut Ebpf, port: u16) -> Result<u32, ApplyError> {
    let map: Array<&mut MapData, u32> =
        Array::try_from(map_mut(ebpf, maps::VIP_PORTS)?).map_err(map_err(maps::VIP_PORTS))?;
    map.get(&u32::from(port), 0)
        .map_err(map_err(maps::VIP_PORTS))
}

fn write_port(ebpf: &mut Ebpf, port: u16, value: u32) -> Result<(), ApplyError> {
    let mut map: Array<&mut MapData, u32> =
        Array::try_from(map_mut(ebpf, maps::VIP_PORTS)?).map_err(map_err(maps::VIP_PORTS))?;
    map.set(u32::from(port), value, 0)
        .map_err(map_err(maps::VIP_PORTS))
}

impl ServiceIndex {
    fn read(ebpf: &mut Ebpf, key: &ServiceKey) -> Result<Self, ApplyError> {
        let map: Array<&mut MapData, ServiceSlot> =
            Array::try_from(map_mut(ebpf, maps::SERVICE_INDEX)?)
                .map_err(map_err(maps::SERVICE_INDEX))?;
        let first = service_slot(key);
        let chain = (0..SERVICE_INDEX_PROBES)
            .map(|i| (first + i) & (SERVICE_INDEX_SLOTS - 1))
            .map(|at| map.get(&at, 0).map(|s| (at, s)))
            .collect::<Result<_, _>>()
            .map_err(map_err(maps::SERVICE_INDEX))?;
        Ok(Self { chain })
    }

    fn slot(&self, at: u32) -> ServiceSlot {
        self.chain
            .iter()
            .find(|(i, _)| *i == at)
            .map(|(_, s)| *s)
            .unwrap_or_default()
    }

    /// Where `key` is.
    fn find(&self, key: &ServiceKey) -> Option<u32> {
        self.chain
            .iter()
            .find(|(_, s)| s.key == *key)
            .map(|(at, _)| *at)
    }

    /// Where `key` is, else a free slot the packet path will probe.
    fn place(&self, key: &ServiceKey) -> Result<u32, ApplyError> {
        self.find(key)
            .or_else(|| {
                self.chain
                    .iter()
                    .find(|(_, s)| s.key.family == 0)
                    .map(|(at, _)| *at)
            })
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
        if let Some(entry) = self.chain.iter_mut().find(|(i, _)| *i == at) {
            entry.1 = slot;
        }
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
