//! An in-memory data plane for unit tests of the control loop: it keeps
//! what the maps would hold and records every write, in order, so a test
//! states the exact writes a drain, a reload or a health flap must cause.
//! A fake for pure logic only: that the kernel does what the maps say is
//! shown by the privileged tests against the real program.
use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
};

use smtp_lb_common::{
    BACKEND_VALID, Backend, NO_BACKEND, SERVICE_STICKY, ServiceKey, flow_hash, ring_slot,
};

use super::{
    ApplyError, BackendRow, Dataplane, LoadError, MapWriter, MovedFlows, ServiceRow, Snapshot,
    Where,
};
use crate::balance::plan::{Existing, Plan, PlannedBackend, PlannedService, flow_key, words_addr};

/// One recorded write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Write {
    Node,
    Backend {
        id: u32,
        address: IpAddr,
    },
    /// A table installed: slots per backend id (the table itself is kept
    /// in [`Fake::ring`]).
    Service {
        vip: IpAddr,
        port: u16,
        id: u32,
        slots: BTreeMap<u32, usize>,
    },
    Vip(IpAddr),
    Port {
        port: u16,
        balanced: bool,
    },
    RemoveService {
        vip: IpAddr,
        port: u16,
    },
    RetireBackend {
        id: u32,
    },
}

/// Slots per backend id in `ring` (`NO_BACKEND` slots are not counted).
pub fn slots(ring: &[u32]) -> BTreeMap<u32, usize> {
    let mut out = BTreeMap::new();
    for id in ring.iter().filter(|&&id| id != NO_BACKEND) {
        *out.entry(*id).or_default() += 1;
    }
    out
}

/// The maps, in memory.
#[derive(Debug, Default)]
pub struct Fake {
    writes: Vec<Write>,
    backends: BTreeMap<u32, Backend>,
    services: BTreeMap<ServiceKey, PlannedService>,
    vips: BTreeSet<ServiceKey>,
    ports: BTreeSet<u16>,
    /// Each moved-flows walk, as the number of writes recorded (since the
    /// last [`Fake::take`]) when it ran: it must come after them all.
    walks: Vec<usize>,
    /// Writes that succeed before the next one fails, once (a map write
    /// refused by the kernel).
    pub fail_after: Option<usize>,
    /// Service id → refused (admission); not among the recorded writes.
    pub admission: BTreeMap<u32, bool>,
}

impl Fake {
    /// The writes since the last call, in order.
    pub fn take(&mut self) -> Vec<Write> {
        std::mem::take(&mut self.writes)
    }

    /// The moved-flows walks since the last call (see [`Fake::walks`]).
    pub fn take_walks(&mut self) -> Vec<usize> {
        std::mem::take(&mut self.walks)
    }

    /// The live table of `vip:port`.
    pub fn ring(&self, vip: IpAddr, port: u16) -> Option<&[u32]> {
        self.services
            .get(&crate::balance::plan::service_key(vip, port))
            .map(|s| s.ring.as_slice())
    }

    /// The backend entry with `id`.
    pub fn backend(&self, id: u32) -> Option<(IpAddr, bool)> {
        self.backends
            .get(&id)
            .map(|b| (words_addr(b.addr, b.family), b.flags & BACKEND_VALID != 0))
    }

    /// The id of the backend at `address`.
    pub fn id_of(&self, address: IpAddr) -> Option<u32> {
        self.backends
            .iter()
            .find(|(_, b)| words_addr(b.addr, b.family) == address)
            .map(|(id, _)| *id)
    }

    fn record(&mut self, w: Write) -> Result<(), ApplyError> {
        if let Some(n) = &mut self.fail_after {
            if *n == 0 {
                self.fail_after = None;
                return Err(ApplyError::TxPort {
                    iface: "fake".into(),
                    message: "injected failure".into(),
                });
            }
            *n -= 1;
        }
        self.writes.push(w);
        Ok(())
    }
}

fn vip_port(key: &ServiceKey) -> (IpAddr, u16) {
    (words_addr(key.addr, key.family), u16::from_be(key.port))
}

impl MapWriter for Fake {
    fn existing(&mut self) -> Result<Existing, ApplyError> {
        Ok(Existing {
            backends: self
                .backends
                .iter()
                .map(|(id, b)| (words_addr(b.addr, b.family), *id))
                .collect(),
            retired: self
                .backends
                .iter()
                .filter(|(_, b)| b.flags & BACKEND_VALID == 0)
                .map(|(id, _)| *id)
                .collect(),
            services: self.services.iter().map(|(k, s)| (*k, s.id)).collect(),
            vips: self.vips.clone(),
        })
    }

    fn set_node(&mut self, _: Ipv4Addr, _: Ipv6Addr) -> Result<(), ApplyError> {
        self.record(Write::Node)
    }

    fn set_backend(&mut self, b: &PlannedBackend) -> Result<(), ApplyError> {
        self.record(Write::Backend {
            id: b.id,
            address: b.address,
        })?;
        self.backends.insert(b.id, b.value);
        Ok(())
    }

    fn set_service(&mut self, s: &PlannedService) -> Result<(), ApplyError> {
        self.record(Write::Service {
            vip: s.vip,
            port: s.port,
            id: s.id,
            slots: slots(&s.ring),
        })?;
        self.services.insert(s.key, s.clone());
        Ok(())
    }

    fn set_vip(&mut self, marker: &ServiceKey) -> Result<(), ApplyError> {
        self.record(Write::Vip(vip_port(marker).0))?;
        self.vips.insert(*marker);
        Ok(())
    }

    fn set_port(&mut self, port: u16, balanced: bool) -> Result<(), ApplyError> {
        self.record(Write::Port { port, balanced })?;
        if balanced {
            self.ports.insert(port);
        } else {
            self.ports.remove(&port);
        }
        Ok(())
    }

    fn remove_service(&mut self, key: &ServiceKey) -> Result<(), ApplyError> {
        let (vip, port) = vip_port(key);
        self.record(Write::RemoveService { vip, port })?;
        self.services.remove(key);
        self.vips.remove(key);
        Ok(())
    }

    fn retire_backend(&mut self, id: u32) -> Result<(), ApplyError> {
        self.record(Write::RetireBackend { id })?;
        if let Some(b) = self.backends.get_mut(&id) {
            b.flags &= !BACKEND_VALID;
        }
        Ok(())
    }

    fn set_admission(&mut self, id: u32, refuse: bool) -> Result<(), ApplyError> {
        self.admission.insert(id, refuse);
        Ok(())
    }

    /// The fake tracks no flows, so nothing ages.
    fn set_clock(&mut self, _: u32) -> Result<(), ApplyError> {
        Ok(())
    }

    /// The fake tracks no flows: the walk is recorded, nothing is copied.
    fn keep_moved_flows(&mut self, _: &Plan) -> Result<MovedFlows, ApplyError> {
        self.walks.push(self.writes.len());
        Ok(MovedFlows::default())
    }
}

impl Dataplane for Fake {
    /// Entries with zero counters: the fake forwards no packets.
    fn stats(&self) -> Result<Snapshot, LoadError> {
        Ok(Snapshot {
            global: BTreeMap::new(),
            services: self
                .services
                .values()
                .map(|s| ServiceRow {
                    id: s.id,
                    vip: s.vip,
                    port: s.port,
                    packets: 0,
                    bytes: 0,
                    new_flows: 0,
                    no_backend: 0,
                })
                .collect(),
            backends: self
                .backends
                .iter()
                .map(|(id, b)| BackendRow {
                    id: *id,
                    address: words_addr(b.addr, b.family),
                    valid: b.flags & BACKEND_VALID != 0,
                    packets: 0,
                    bytes: 0,
                    new_flows: 0,
                })
                .collect(),
        })
    }

    fn flows(&self) -> Result<BTreeMap<u32, (u64, u64)>, LoadError> {
        Ok(BTreeMap::new())
    }

    fn where_to(
        &self,
        vip: IpAddr,
        port: u16,
        client: IpAddr,
        cport: u16,
    ) -> Result<Option<Where>, LoadError> {
        let Some(s) = self
            .services
            .get(&crate::balance::plan::service_key(vip, port))
        else {
            return Ok(None);
        };
        let key = flow_key(vip, port, client, cport);
        let hash = flow_hash(&key, s.flags & SERVICE_STICKY != 0);
        let slot = ring_slot(hash, s.ring_size);
        let new_flow = s.ring.get(slot as usize).and_then(|id| {
            self.backend(*id)
                .filter(|(_, valid)| *valid)
                .map(|(a, _)| (*id, a))
        });
        Ok(Some(Where {
            new_flow,
            tracked: None,
            hash,
            slot,
            flow_set: super::flows::set_of(&key),
        }))
    }
}
