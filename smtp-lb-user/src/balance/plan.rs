//! Turns an [`LbConfig`] into what the data plane's maps must hold: backend
//! ids and entries, one service (and Maglev table) per VIP × port, the VIP
//! address markers and the port filter. Pure: the ids already in use (read
//! from the pinned maps by `dataplane`) go in, so a restarted or reloaded
//! balancer keeps every backend's id and its tracked flows stay put.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use smtp_lb_common::{
    AF_INET, AF_INET6, BACKEND_VALID, Backend, FlowKey, MAX_BACKENDS, MAX_SERVICES, MODE_IPIP,
    MODE_L2, PROTO_TCP, SERVICE_P2C, SERVICE_STICKY, ServiceKey,
};
use thiserror::Error;

use super::maglev;
use crate::config::lb::{Forwarding, LbConfig};

/// What the maps hold already (after a restart: what the pinned maps hold).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Existing {
    /// Backend address → id, valid or retired: a relay that comes back gets
    /// its old id, so flows still tracked on it find it again.
    pub backends: BTreeMap<IpAddr, u32>,
    /// Ids of retired backends (removed from the config): free for reuse.
    pub retired: BTreeSet<u32>,
    /// Service key → id.
    pub services: BTreeMap<ServiceKey, u32>,
    /// VIP marker keys (`port == 0`).
    pub vips: BTreeSet<ServiceKey>,
}

/// A configuration the data plane cannot hold. [`LbConfig::validate`]
/// refuses such a config first; this is the second line, so no input can
/// make the control loop panic.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PlanError {
    /// Every id is in use.
    #[error("{field}: no free {what} id; the data plane holds at most {max}")]
    NoFreeId {
        field: String,
        what: &'static str,
        max: u32,
    },
    /// A table size Maglev cannot use.
    #[error("{field}: {size} is not prime")]
    TableSize { field: String, size: u32 },
}

/// One backend entry to write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedBackend {
    pub id: u32,
    pub name: String,
    pub address: IpAddr,
    /// The entry; `ifindex`/`src_mac` are filled by the data plane from `interface`.
    pub value: Backend,
    pub interface: Option<String>,
}

/// One data-plane service (VIP × port) with its table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlannedService {
    pub key: ServiceKey,
    pub id: u32,
    pub label: String,
    pub vip: IpAddr,
    pub port: u16,
    pub ring_size: u32,
    pub flags: u32,
    /// The Maglev table: backend id per slot.
    pub ring: Vec<u32>,
}

/// Everything the maps must hold for a config.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    pub backends: Vec<PlannedBackend>,
    pub services: Vec<PlannedService>,
    /// `port == 0` marker keys, one per VIP address.
    pub vip_markers: Vec<ServiceKey>,
    /// Ports some service uses (host order).
    pub ports: BTreeSet<u16>,
    /// IPIP and IP6IP6 outer sources.
    pub encap: Option<(Ipv4Addr, Ipv6Addr)>,
}

/// Key of the service for `vip:port` (network byte order fields).
pub fn service_key(vip: IpAddr, port: u16) -> ServiceKey {
    let (addr, family) = addr_words(vip);
    ServiceKey {
        addr,
        port: port.to_be(),
        proto: PROTO_TCP,
        family,
    }
}

/// Key of the flow `client:cport` → `vip:port` (same family), as the data
/// plane's conntrack and flow hash see it.
pub fn flow_key(vip: IpAddr, port: u16, client: IpAddr, cport: u16) -> FlowKey {
    let ((dst, family), (src, _)) = (addr_words(vip), addr_words(client));
    FlowKey {
        src,
        dst,
        sport: cport.to_be(),
        dport: port.to_be(),
        proto: PROTO_TCP,
        family,
        _pad: [0; 2],
    }
}

/// An address as the data plane stores it: network-order words, IPv4 in word 0.
pub fn addr_words(ip: IpAddr) -> ([u32; 4], u8) {
    match ip {
        IpAddr::V4(v4) => ([u32::from_ne_bytes(v4.octets()), 0, 0, 0], AF_INET),
        IpAddr::V6(v6) => {
            let o = v6.octets();
            let w = |i: usize| u32::from_ne_bytes([o[i], o[i + 1], o[i + 2], o[i + 3]]);
            ([w(0), w(4), w(8), w(12)], AF_INET6)
        }
    }
}

/// The address back from its stored words.
pub fn words_addr(addr: [u32; 4], family: u8) -> IpAddr {
    if family == AF_INET {
        IpAddr::from(addr[0].to_ne_bytes())
    } else {
        let mut o = [0u8; 16];
        for (i, w) in addr.iter().enumerate() {
            o[i * 4..i * 4 + 4].copy_from_slice(&w.to_ne_bytes());
        }
        IpAddr::from(o)
    }
}

/// Hands out ids below `max`: never-used ids first, then recycled ones
/// (a recycled id's old owner is gone from every table; taking fresh ids
/// first keeps whatever might still refer to it untouched the longest).
struct Ids {
    taken: BTreeSet<u32>,
    recyclable: BTreeSet<u32>,
    max: u32,
}

impl Ids {
    fn take(&mut self, id: u32) {
        self.taken.insert(id);
        self.recyclable.remove(&id);
    }

    fn next(&mut self) -> Option<u32> {
        let id = (0..self.max)
            .find(|i| !self.taken.contains(i) && !self.recyclable.contains(i))
            .or_else(|| self.recyclable.first().copied())?;
        self.take(id);
        Some(id)
    }
}

/// Builds the plan. Ids stay with their address (backends) or key
/// (services); new ones get free ids, and ids of backends and services that
/// left the configuration are recycled, so any number of adds and removes
/// over time fits. Fails only for a config [`LbConfig::validate`] refuses.
pub fn plan(cfg: &LbConfig, existing: &Existing) -> Result<Plan, PlanError> {
    let mut out = Plan {
        encap: Some((cfg.encap_source_v4, cfg.encap_source_v6)),
        ..Plan::default()
    };
    let wanted: BTreeSet<IpAddr> = cfg
        .services
        .iter()
        .flat_map(|s| &s.backends)
        .map(|b| b.address)
        .collect();
    // Backends: one per distinct address. An address keeps its id; the ids
    // of addresses that left (or had left) the config can be reused.
    let mut backend_ids = Ids {
        taken: BTreeSet::new(),
        recyclable: BTreeSet::new(),
        max: MAX_BACKENDS,
    };
    for (addr, id) in &existing.backends {
        if wanted.contains(addr) {
            backend_ids.take(*id);
        } else {
            backend_ids.recyclable.insert(*id);
        }
    }
    let mut ids: BTreeMap<IpAddr, u32> = BTreeMap::new();
    for (i, svc) in cfg.services.iter().enumerate() {
        for (j, b) in svc.backends.iter().enumerate() {
            if ids.contains_key(&b.address) {
                continue;
            }
            let id = match existing.backends.get(&b.address) {
                Some(id) => *id,
                None => backend_ids.next().ok_or_else(|| PlanError::NoFreeId {
                    field: format!("services[{i}] ({}).backends[{j}] ({})", svc.label(), b.name),
                    what: "backend",
                    max: MAX_BACKENDS,
                })?,
            };
            ids.insert(b.address, id);
            let (addr, family) = addr_words(b.address);
            out.backends.push(PlannedBackend {
                id,
                name: b.name.clone(),
                address: b.address,
                value: Backend {
                    addr,
                    mac: b.mac.map_or([0; 6], |m| m.0),
                    src_mac: [0; 6],
                    family,
                    mode: match b.forwarding {
                        Forwarding::L2 => MODE_L2,
                        Forwarding::Ipip => MODE_IPIP,
                    },
                    _pad: [0; 2],
                    flags: BACKEND_VALID,
                    ifindex: 0,
                },
                interface: b.interface.clone(),
            });
        }
    }
    // Services: one per VIP × port, keeping existing ids; the ids of
    // services that leave are reused (the data plane writes a reused id's
    // table where its old owner does not read).
    let keys: BTreeSet<ServiceKey> = cfg
        .services
        .iter()
        .flat_map(|s| s.ports.iter().map(|p| service_key(s.vip, *p)))
        .collect();
    let mut service_ids = Ids {
        taken: BTreeSet::new(),
        recyclable: BTreeSet::new(),
        max: MAX_SERVICES,
    };
    for (key, id) in &existing.services {
        if keys.contains(key) {
            service_ids.take(*id);
        } else {
            service_ids.recyclable.insert(*id);
        }
    }
    let mut markers = BTreeSet::new();
    for (i, svc) in cfg.services.iter().enumerate() {
        if !maglev::is_prime(svc.table_size) {
            return Err(PlanError::TableSize {
                field: format!("services[{i}] ({}).table_size", svc.label()),
                size: svc.table_size,
            });
        }
        let entries: Vec<maglev::Entry<'_>> = svc
            .backends
            .iter()
            .filter_map(|b| {
                ids.get(&b.address).map(|&id| maglev::Entry {
                    name: &b.name,
                    weight: b.weight,
                    id,
                })
            })
            .collect();
        let ring = maglev::build(&entries, svc.table_size);
        markers.insert(service_key(svc.vip, 0));
        for &port in &svc.ports {
            let key = service_key(svc.vip, port);
            let id = match existing.services.get(&key) {
                Some(id) => *id,
                None => service_ids.next().ok_or_else(|| PlanError::NoFreeId {
                    field: format!("services[{i}] ({}).ports", svc.label()),
                    what: "service",
                    max: MAX_SERVICES,
                })?,
            };
            out.ports.insert(port);
            out.services.push(PlannedService {
                key,
                id,
                label: svc.label(),
                vip: svc.vip,
                port,
                ring_size: svc.table_size,
                flags: if svc.sticky { SERVICE_STICKY } else { 0 }
                    | if svc.p2c { SERVICE_P2C } else { 0 },
                ring: ring.clone(),
            });
        }
    }
    out.vip_markers = markers.into_iter().collect();
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    const CFG: &str = r#"
        [[services]]
        vip = "203.0.113.10"
        ports = [25, 587]
        table_size = 1009
        [[services.backends]]
        name = "a"
        address = "198.51.100.3"
        mac = "02:00:00:00:00:03"
        [[services.backends]]
        name = "b"
        address = "198.51.100.4"
        mac = "02:00:00:00:00:04"
        [[services]]
        vip = "203.0.113.11"
        ports = [25]
        table_size = 1009
        [[services.backends]]
        name = "b"
        address = "198.51.100.4"
        mac = "02:00:00:00:00:04"
    "#;

    #[test]
    fn each_port_is_a_service_and_shared_relays_are_one_backend() {
        let cfg = LbConfig::parse(CFG).unwrap();
        let p = plan(&cfg, &Existing::default()).unwrap();
        assert_eq!(p.services.len(), 3);
        assert_eq!(p.backends.len(), 2);
        assert_eq!(p.vip_markers.len(), 2);
        assert_eq!(p.ports, BTreeSet::from([25, 587]));
        let ids: BTreeSet<u32> = p.services.iter().map(|s| s.id).collect();
        assert_eq!(ids.len(), 3);
        assert!(p.services[2].ring.iter().all(|&id| id == p.backends[1].id));
    }

    #[test]
    fn existing_ids_are_kept() {
        let cfg = LbConfig::parse(CFG).unwrap();
        let mut existing = Existing::default();
        existing.backends.insert("198.51.100.4".parse().unwrap(), 7);
        existing
            .services
            .insert(service_key("203.0.113.10".parse().unwrap(), 587), 5);
        let p = plan(&cfg, &existing).unwrap();
        assert_eq!(p.backends[1].id, 7);
        assert_eq!(p.backends[0].id, 0);
        assert_eq!(p.services[1].id, 5);
    }

    #[test]
    fn addresses_round_trip_through_words() {
        for a in ["203.0.113.10", "2001:db8::10"] {
            let ip: IpAddr = a.parse().unwrap();
            let (w, f) = addr_words(ip);
            assert_eq!(words_addr(w, f), ip);
        }
        let (w, _) = addr_words("1.2.3.4".parse().unwrap());
        assert_eq!(
            w[0].to_ne_bytes(),
            [1, 2, 3, 4],
            "network byte order in memory"
        );
    }
}
