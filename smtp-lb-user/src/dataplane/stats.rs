//! Reading the per-CPU counters and summing them across CPUs.
use std::path::Path;

use aya::maps::{MapData, PerCpuArray};
use smtp_lb_common::{GlobalStats, maps};

use super::LoadError;

/// Sums the pinned global counters under `pin_dir` over every CPU.
pub fn read_global_stats(pin_dir: &Path) -> Result<GlobalStats, LoadError> {
    let path = pin_dir.join(maps::GLOBAL_STATS);
    let data = MapData::from_pin(&path).map_err(|source| LoadError::Map {
        name: maps::GLOBAL_STATS,
        source,
    })?;
    let array: PerCpuArray<_, GlobalStats> =
        PerCpuArray::try_from(aya::maps::Map::PerCpuArray(data)).map_err(|source| {
            LoadError::Map {
                name: maps::GLOBAL_STATS,
                source,
            }
        })?;
    let per_cpu = array.get(&0, 0).map_err(|source| LoadError::Map {
        name: maps::GLOBAL_STATS,
        source,
    })?;
    Ok(per_cpu.iter().fold(GlobalStats::default(), |mut sum, s| {
        sum.add(s);
        sum
    }))
}
