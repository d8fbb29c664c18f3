//! Questions answered from the pinned maps: where would a new connection
//! go, is a flow tracked, how many flows does each backend hold. Uses the
//! same hash and slot as the XDP program (`smtp_lb_common::flow_hash`,
//! `ring_slot`), so the answer
//! is the program's, not an approximation.
use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    path::Path,
};

use aya::maps::{Array, HashMap, Map, MapData};
use serde::Serialize;
use smtp_lb_common::{
    BACKEND_VALID, Backend, FLOW_CLOSING, Flow, FlowKey, FlowSet, MOVED_FLOWS_SIZE, NO_BACKEND,
    PROTO_TCP, SERVICE_STICKY, Service, ServiceKey, flow_hash, maps, ring_slot,
};

use super::{LoadError, flows, walk};
use crate::balance::plan::{addr_words, flow_key, words_addr};

fn open(pin_dir: &Path, name: &'static str) -> Result<MapData, LoadError> {
    MapData::from_pin(pin_dir.join(name)).map_err(|source| LoadError::Map { name, source })
}

fn err(name: &'static str) -> impl Fn(aya::maps::MapError) -> LoadError {
    move |source| LoadError::Map { name, source }
}

/// The answer to "where does this connection go".
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Where {
    /// Backend id and address a new SYN would be sent to (`None`: no backend
    /// can take new flows, the SYN is dropped).
    pub new_flow: Option<(u32, IpAddr)>,
    /// The backend a tracked flow with this 5-tuple is pinned to.
    pub tracked: Option<(u32, IpAddr)>,
    /// The flow hash and the slot it selects.
    pub hash: u32,
    pub slot: u32,
    /// The `FLOW_TABLE` set that tracks this connection (`bpftool map
    /// lookup pinned $P/FLOW_TABLE key` with its four bytes, little-endian).
    pub flow_set: u32,
}

/// Where a connection from `client:cport` to `vip:port` goes. `None` when
/// `vip:port` is not a service.
pub fn where_to(
    pin_dir: &Path,
    vip: IpAddr,
    port: u16,
    client: IpAddr,
    cport: u16,
) -> Result<Option<Where>, LoadError> {
    let (dst, family) = addr_words(vip);
    let (_, cfamily) = addr_words(client);
    if family != cfamily {
        return Ok(None);
    }
    let services: HashMap<_, ServiceKey, Service> =
        HashMap::try_from(Map::HashMap(open(pin_dir, maps::SERVICES)?))
            .map_err(err(maps::SERVICES))?;
    let skey = ServiceKey {
        addr: dst,
        port: port.to_be(),
        proto: PROTO_TCP,
        family,
    };
    let Ok(svc) = services.get(&skey, 0) else {
        return Ok(None);
    };
    let key = flow_key(vip, port, client, cport);
    let hash = flow_hash(&key, svc.flags & SERVICE_STICKY != 0);
    let slot = ring_slot(hash, svc.ring_size);
    let rings: Array<_, u32> =
        Array::try_from(Map::Array(open(pin_dir, maps::RINGS)?)).map_err(err(maps::RINGS))?;
    let backends: Array<_, Backend> =
        Array::try_from(Map::Array(open(pin_dir, maps::BACKENDS)?)).map_err(err(maps::BACKENDS))?;
    let valid = |id: u32| -> Result<Option<(u32, IpAddr)>, LoadError> {
        if id == NO_BACKEND {
            return Ok(None);
        }
        let b = backends.get(&id, 0).map_err(err(maps::BACKENDS))?;
        Ok((b.flags & BACKEND_VALID != 0).then(|| (id, words_addr(b.addr, b.family))))
    };
    let new_flow = if svc.ring_size == 0 {
        None
    } else {
        let id = rings
            .get(&(Service::ring_base(svc.id, svc.active) + slot), 0)
            .map_err(err(maps::RINGS))?;
        valid(id)?
    };
    let table: Array<_, FlowSet> = Array::try_from(Map::Array(open(pin_dir, maps::FLOW_TABLE)?))
        .map_err(err(maps::FLOW_TABLE))?;
    let moved: HashMap<_, FlowKey, Flow> =
        HashMap::try_from(Map::LruHashMap(open(pin_dir, maps::MOVED_FLOWS)?))
            .map_err(err(maps::MOVED_FLOWS))?;
    // As the packet path: `FLOW_TABLE`, then the copy a table change made.
    let flow = match flows::find(&table, &key).map_err(err(maps::FLOW_TABLE))? {
        Some(flow) => Some(flow),
        None => moved.get(&key, 0).ok(),
    };
    let tracked = match flow {
        Some(flow) => valid(flow.backend)?,
        None => None,
    };
    Ok(Some(Where {
        new_flow,
        tracked,
        hash,
        slot,
        flow_set: flows::set_of(&key),
    }))
}

/// `FLOW_TABLE` entries per backend id: `(live, tracked)`. Tracked entries
/// stay after FIN until a new flow takes their way; live ones are those
/// whose client has not sent FIN or RST yet ([`smtp_lb_common::FLOW_CLOSING`]).
pub fn tracked_flows(pin_dir: &Path) -> Result<BTreeMap<u32, (u64, u64)>, LoadError> {
    let table = Map::Array(open(pin_dir, maps::FLOW_TABLE)?);
    let mut counts = BTreeMap::new();
    for (_, flow) in walk::flow_table(&table).map_err(err(maps::FLOW_TABLE))? {
        let c = counts.entry(flow.backend).or_insert((0, 0));
        c.0 += u64::from(flow.flags & FLOW_CLOSING == 0);
        c.1 += 1;
    }
    Ok(counts)
}

/// A tracked flow of one client connection (`ctl trace`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ClientFlow {
    /// The VIP and port it was sent to.
    pub vip: SocketAddr,
    /// The backend it is pinned to, and its address.
    pub backend: u32,
    pub address: IpAddr,
    /// The backend is still configured.
    pub valid: bool,
    /// The client sent FIN or RST.
    pub closing: bool,
    /// Found only in `MOVED_FLOWS` (its `FLOW_TABLE` way was taken).
    pub moved: bool,
}

/// The tracked flows from `client` (address and port) to any VIP: its
/// `FLOW_TABLE` entries, and the `MOVED_FLOWS` copies of those whose way was
/// taken. One walk of each map (the kernel has no lookup by part of a key).
pub fn client_flows(pin_dir: &Path, client: SocketAddr) -> Result<Vec<ClientFlow>, LoadError> {
    let (src, family) = addr_words(client.ip());
    let sport = client.port().to_be();
    let backends: Array<_, Backend> =
        Array::try_from(Map::Array(open(pin_dir, maps::BACKENDS)?)).map_err(err(maps::BACKENDS))?;
    let mut out: Vec<ClientFlow> = Vec::new();
    let table = Map::Array(open(pin_dir, maps::FLOW_TABLE)?);
    let copies = Map::LruHashMap(open(pin_dir, maps::MOVED_FLOWS)?);
    for (name, moved) in [(maps::FLOW_TABLE, false), (maps::MOVED_FLOWS, true)] {
        let entries: Vec<(FlowKey, Flow)> = if moved {
            walk::entries(&copies, 2 * MOVED_FLOWS_SIZE as usize)
        } else {
            walk::flow_table(&table)
        }
        .map_err(err(name))?;
        for (key, flow) in entries {
            if key.src != src || key.sport != sport || key.family != family {
                continue;
            }
            let vip = SocketAddr::new(words_addr(key.dst, key.family), u16::from_be(key.dport));
            if out.iter().any(|f| f.vip == vip) {
                continue;
            }
            let b = backends
                .get(&flow.backend, 0)
                .map_err(err(maps::BACKENDS))?;
            out.push(ClientFlow {
                vip,
                backend: flow.backend,
                address: words_addr(b.addr, b.family),
                valid: b.flags & BACKEND_VALID != 0,
                closing: flow.flags & FLOW_CLOSING != 0,
                moved,
            });
        }
    }
    Ok(out)
}
