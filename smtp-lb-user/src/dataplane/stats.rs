//! Reading the per-CPU counters from the pinned maps and summing them across CPUs.
use std::{net::IpAddr, path::Path};

use aya::maps::{Array, HashMap, Map, MapData, PerCpuArray};
use serde::Serialize;
use smtp_lb_common::{
    BACKEND_VALID, Backend, BackendStats, GlobalStats, MAX_BACKENDS, Service, ServiceKey,
    ServiceStats, maps,
};

use super::LoadError;
use crate::balance::plan::words_addr;

fn open(pin_dir: &Path, name: &'static str) -> Result<MapData, LoadError> {
    MapData::from_pin(pin_dir.join(name)).map_err(|source| LoadError::Map { name, source })
}

fn err(name: &'static str) -> impl Fn(aya::maps::MapError) -> LoadError {
    move |source| LoadError::Map { name, source }
}

/// Sums the pinned global counters under `pin_dir` over every CPU.
pub fn read_global_stats(pin_dir: &Path) -> Result<GlobalStats, LoadError> {
    let array: PerCpuArray<_, GlobalStats> =
        PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, maps::GLOBAL_STATS)?))
            .map_err(err(maps::GLOBAL_STATS))?;
    let per_cpu = array.get(&0, 0).map_err(err(maps::GLOBAL_STATS))?;
    Ok(per_cpu.iter().fold(GlobalStats::default(), |mut sum, s| {
        sum.add(s);
        sum
    }))
}

/// One service's counters.
#[derive(Clone, Debug, Serialize)]
pub struct ServiceRow {
    pub id: u32,
    pub vip: IpAddr,
    pub port: u16,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
    pub no_backend: u64,
}

/// One backend's counters.
#[derive(Clone, Debug, Serialize)]
pub struct BackendRow {
    pub id: u32,
    pub address: IpAddr,
    /// False once removed from the config (its flows re-hash).
    pub valid: bool,
    pub packets: u64,
    pub bytes: u64,
    pub new_flows: u64,
}

/// Everything `ctl stats` shows.
#[derive(Clone, Debug, Serialize)]
pub struct Snapshot {
    pub global: std::collections::BTreeMap<&'static str, u64>,
    pub services: Vec<ServiceRow>,
    pub backends: Vec<BackendRow>,
}

/// Reads every counter under `pin_dir`, summed over CPUs.
pub fn read_stats(pin_dir: &Path) -> Result<Snapshot, LoadError> {
    let global = read_global_stats(pin_dir)?.fields().into_iter().collect();
    let services: HashMap<_, ServiceKey, Service> =
        HashMap::try_from(Map::HashMap(open(pin_dir, maps::SERVICES)?))
            .map_err(err(maps::SERVICES))?;
    let svc_stats: PerCpuArray<_, ServiceStats> =
        PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, maps::SERVICE_STATS)?))
            .map_err(err(maps::SERVICE_STATS))?;
    let mut rows = Vec::new();
    for item in &services {
        let (key, svc) = item.map_err(err(maps::SERVICES))?;
        if key.port == 0 {
            continue;
        }
        let mut s = ServiceStats::default();
        for v in svc_stats
            .get(&svc.id, 0)
            .map_err(err(maps::SERVICE_STATS))?
            .iter()
        {
            s.add(v);
        }
        rows.push(ServiceRow {
            id: svc.id,
            vip: words_addr(key.addr, key.family),
            port: u16::from_be(key.port),
            packets: s.packets,
            bytes: s.bytes,
            new_flows: s.new_flows,
            no_backend: s.no_backend,
        });
    }
    rows.sort_by_key(|r| r.id);
    let backends: Array<_, Backend> =
        Array::try_from(Map::Array(open(pin_dir, maps::BACKENDS)?)).map_err(err(maps::BACKENDS))?;
    let be_stats: PerCpuArray<_, BackendStats> =
        PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, maps::BACKEND_STATS)?))
            .map_err(err(maps::BACKEND_STATS))?;
    let mut brows = Vec::new();
    for id in 0..MAX_BACKENDS {
        let b = backends.get(&id, 0).map_err(err(maps::BACKENDS))?;
        if b.family == 0 {
            continue;
        }
        let mut s = BackendStats::default();
        for v in be_stats
            .get(&id, 0)
            .map_err(err(maps::BACKEND_STATS))?
            .iter()
        {
            s.add(v);
        }
        brows.push(BackendRow {
            id,
            address: words_addr(b.addr, b.family),
            valid: b.flags & BACKEND_VALID != 0,
            packets: s.packets,
            bytes: s.bytes,
            new_flows: s.new_flows,
        });
    }
    Ok(Snapshot {
        global,
        services: rows,
        backends: brows,
    })
}
