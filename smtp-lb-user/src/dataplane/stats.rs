//! Reading the per-CPU counters from the pinned maps and summing them
//! across CPUs; a service's or backend's since its id's base
//! (`COUNTER_BASES`: what the id's previous owners counted).
use std::{borrow::Borrow, net::IpAddr, path::Path};

use aya::maps::{Array, HashMap, Map, MapData, MapError, PerCpuArray};
use serde::Serialize;
use smtp_lb_common::{
    BACKEND_VALID, Backend, Counters, GlobalStats, MAX_BACKENDS, Service, ServiceKey, maps,
};

use super::LoadError;
use crate::balance::plan::words_addr;

fn open(pin_dir: &Path, name: &'static str) -> Result<MapData, LoadError> {
    MapData::from_pin(pin_dir.join(name)).map_err(|source| LoadError::Map { name, source })
}

fn err(name: &'static str) -> impl Fn(MapError) -> LoadError {
    move |source| LoadError::Map { name, source }
}

/// Every counter of `COUNTERS`, summed over the CPUs.
pub(super) fn summed<T: Borrow<MapData>>(
    counters: &PerCpuArray<T, Counters>,
) -> Result<Counters, MapError> {
    let per_cpu = counters.get(&0, 0)?;
    Ok(per_cpu.iter().fold(Counters::default(), |mut sum, c| {
        sum.add(c);
        sum
    }))
}

/// The pinned counters under `pin_dir`, summed over every CPU.
fn read_counters(pin_dir: &Path) -> Result<Counters, LoadError> {
    let array: PerCpuArray<_, Counters> =
        PerCpuArray::try_from(Map::PerCpuArray(open(pin_dir, maps::COUNTERS)?))
            .map_err(err(maps::COUNTERS))?;
    summed(&array).map_err(err(maps::COUNTERS))
}

/// Sums the pinned global counters under `pin_dir` over every CPU.
pub fn read_global_stats(pin_dir: &Path) -> Result<GlobalStats, LoadError> {
    Ok(read_counters(pin_dir)?.global)
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
    let counters = read_counters(pin_dir)?;
    let bases: Array<_, Counters> =
        Array::try_from(Map::Array(open(pin_dir, maps::COUNTER_BASES)?))
            .map_err(err(maps::COUNTER_BASES))?;
    let bases = bases.get(&0, 0).map_err(err(maps::COUNTER_BASES))?;
    let global = counters.global.fields().into_iter().collect();
    let services: HashMap<_, ServiceKey, Service> =
        HashMap::try_from(Map::HashMap(open(pin_dir, maps::SERVICES)?))
            .map_err(err(maps::SERVICES))?;
    let mut rows = Vec::new();
    for item in &services {
        let (key, svc) = item.map_err(err(maps::SERVICES))?;
        let at = svc.id as usize;
        if key.port == 0 {
            continue;
        }
        let (Some(now), Some(base)) = (counters.services.get(at), bases.services.get(at)) else {
            continue;
        };
        let s = now.since(base);
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
    let mut brows = Vec::new();
    for id in 0..MAX_BACKENDS {
        let b = backends.get(&id, 0).map_err(err(maps::BACKENDS))?;
        if b.family == 0 {
            continue;
        }
        let at = id as usize;
        let s = counters.backends[at].since(&bases.backends[at]);
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
