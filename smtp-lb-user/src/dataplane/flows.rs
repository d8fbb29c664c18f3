//! The flow table (`FLOW_TABLE`) as user space sees one flow of it: which
//! set holds it, its entry, and writing one in. Whole-table reads are
//! [`super::walk::flow_table`]. The packet path's rules (which way a new
//! flow may take) are in `smtp-lb-ebpf/src/flows.rs`; user space only
//! writes flows while no program uses the table (carrying a previous
//! build's `CONNTRACK` over) or in fixtures.
use std::borrow::{Borrow, BorrowMut};

use aya::maps::{Array, MapData, MapError};
use smtp_lb_common::{
    FLOW_CLOSING, FLOW_CONFIRMED, Flow, FlowEntry, FlowKey, FlowSet, flow_seal, flow_set,
    table_hash,
};

/// The set of `FLOW_TABLE` that holds `key`.
pub fn set_of(key: &FlowKey) -> u32 {
    flow_set(table_hash(key))
}

/// The tracked flow of `key` in the table, if any.
pub fn find<T: Borrow<MapData>>(
    table: &Array<T, FlowSet>,
    key: &FlowKey,
) -> Result<Option<Flow>, MapError> {
    let set = table.get(&set_of(key), 0)?;
    Ok(set
        .ways
        .iter()
        .find(|w| w.key == *key)
        .and_then(FlowEntry::flow))
}

/// Writes `flow` for `key` into its own way, else the first empty one, else
/// the first one that is closing or unconfirmed; `false` when the set has
/// none (it keeps what it holds). The entry starts unconfirmed, as after a
/// SYN: its next packet confirms it. Rewrites the whole set, so only while
/// no program writes the table, or in fixtures.
pub fn insert<T: BorrowMut<MapData>>(
    table: &mut Array<T, FlowSet>,
    key: &FlowKey,
    flow: &Flow,
    stamp: u32,
) -> Result<bool, MapError> {
    let index = set_of(key);
    let mut set = table.get(&index, 0)?;
    let rank = |w: &FlowEntry| {
        if w.key == *key {
            0
        } else if w.key.family == 0 {
            1
        } else if w.flow().is_none() || w.flags & (FLOW_CLOSING | FLOW_CONFIRMED) != FLOW_CONFIRMED
        {
            2
        } else {
            3
        }
    };
    let Some(way) = set
        .ways
        .iter_mut()
        .filter(|w| rank(w) < 3)
        .min_by_key(|w| rank(w))
    else {
        return Ok(false);
    };
    *way = FlowEntry {
        key: *key,
        backend: flow.backend,
        service: flow.service,
        flags: flow.flags & FLOW_CLOSING,
        stamp,
        seal: flow_seal(table_hash(key), flow.backend),
        service_slot: 0,
    };
    table.set(index, set, 0)?;
    Ok(true)
}

/// Empties the way of `key`; `false` when it was not tracked. Fixtures and
/// the bench use it to stand for a way a flood took.
pub fn remove<T: BorrowMut<MapData>>(
    table: &mut Array<T, FlowSet>,
    key: &FlowKey,
) -> Result<bool, MapError> {
    let index = set_of(key);
    let mut set = table.get(&index, 0)?;
    let Some(way) = set.ways.iter_mut().find(|w| w.key == *key) else {
        return Ok(false);
    };
    *way = FlowEntry::default();
    table.set(index, set, 0)?;
    Ok(true)
}

/// Seconds of the system's monotonic clock, what `FLOW_CLOCK` holds: one
/// clock for every daemon since boot, so a restarted one goes on from where
/// the last stopped (the flows it left keep their age).
pub fn clock_now() -> u32 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid out-pointer; CLOCK_MONOTONIC always exists.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &raw mut ts) };
    u32::try_from(ts.tv_sec).unwrap_or(u32::MAX)
}
