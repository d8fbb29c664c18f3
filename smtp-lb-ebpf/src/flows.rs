//! The flow table: tracked flows in a set-associative array
//! ([`FLOW_TABLE`]), as in a CPU cache. A flow lives in one set (the top
//! bits of its `table_hash`, a hash cheap enough for every packet), in any
//! of its [`FLOW_WAYS`] ways. An array lookup is inlined by the verifier and
//! an insert is a plain write: no kernel hash, no LRU lists, no locks.
//!
//! Who may take a way — a new flow's SYN, or a packet whose entry is gone:
//! the flow's own way; else an empty one; else one whose flow is closing
//! (FIN/RST seen) or unconfirmed (only its SYN seen); else one whose flow
//! has been silent [`FLOW_IDLE_SECS`]. Never a confirmed, active flow: a
//! flood of SYNs, lone ACKs or spoofed SYN+ACK pairs fills sets with its own
//! entries but cannot push an established flow out. When a set has nothing
//! to give, the new flow is forwarded by the table untracked
//! (`flow_table_full`).
//!
//! Every CPU writes ways without locks. A reader takes an entry only when
//! its whole key equals the packet's and its seal matches the backend it
//! read ([`flow_seal`]), so a way being rewritten, or two racing writes
//! mixed, reads as a miss (the packet then follows `MOVED_FLOWS` or the
//! table), never as another flow's backend.
use core::ptr::{read_volatile, write_volatile};

use smtp_lb_common::{
    FLOW_CLOSING, FLOW_CONFIRMED, FLOW_IDLE_SECS, FLOW_WAYS, FlowEntry, FlowKey, FlowSet,
    flow_seal, flow_set,
};

use crate::maps::{FLOW_CLOCK, FLOW_TABLE};

const WAYS: usize = FLOW_WAYS as usize;

/// A tracked flow, as a packet found it.
/// Only what every packet needs is read at once: the packet path holds it
/// across the service lookup, and each field more is a stack slot more in
/// a program whose stack is near the verifier's 512 bytes.
pub struct Tracked {
    entry: *mut FlowEntry,
    pub backend: u32,
    /// Where its service was in `SERVICE_INDEX` (a hint, not sealed).
    pub service_slot: u32,
}

impl Tracked {
    /// [`FLOW_CLOSING`], [`FLOW_CONFIRMED`], read now.
    #[inline(always)]
    pub fn flags(&self) -> u32 {
        // SAFETY: a way of a live map value.
        unsafe { read_volatile(&raw const (*self.entry).flags) }
    }
}

/// The key of a way, 5 eight-byte words, each read once (another CPU may
/// be writing them) and compared in place: no copy on the 512-byte stack.
/// Words, not the key's 10 `u32`s: half the loads and compares on every
/// packet (`FlowKey` is 8-aligned, and so is every way of an array value).
const KEY_WORDS: usize = size_of::<FlowKey>() / 8;

#[inline(always)]
fn key_is(e: *const FlowEntry, key: &FlowKey) -> bool {
    let way = e.cast::<u64>();
    let want = core::ptr::from_ref(key).cast::<u64>();
    let mut i = 0;
    while i < KEY_WORDS {
        // SAFETY: both point at a `FlowKey` (40 bytes, 8-aligned) and `i < 5`.
        if unsafe { read_volatile(way.add(i)) != *want.add(i) } {
            return false;
        }
        i += 1;
    }
    true
}

#[inline(always)]
fn write_key(e: *mut FlowEntry, key: &FlowKey) {
    let way = e.cast::<u64>();
    let from = core::ptr::from_ref(key).cast::<u64>();
    let mut i = 0;
    while i < KEY_WORDS {
        // SAFETY: both point at a `FlowKey` (40 bytes, 8-aligned) and `i < 5`.
        unsafe { write_volatile(way.add(i), *from.add(i)) };
        i += 1;
    }
}

/// Seconds of the daemon's clock.
#[inline(always)]
fn now() -> u32 {
    FLOW_CLOCK.get(0).copied().unwrap_or(0)
}

#[inline(always)]
fn set_of(hash: u64) -> Option<*mut FlowSet> {
    FLOW_TABLE.get_ptr_mut(flow_set(hash))
}

/// The way a set is probed from, for `key`'s `hash`: the rotation spreads
/// a flood's victims over the ways of a set, and [`find`] probes in the
/// same order as [`insert`] takes.
#[inline(always)]
fn first_way(hash: u64) -> usize {
    hash as usize >> 8
}

/// The entry of `key` (`hash`: its `table_hash`), if tracked and sealed.
#[inline(always)]
pub fn find(key: &FlowKey, hash: u64) -> Option<Tracked> {
    let set = set_of(hash)?;
    // In `insert`'s order: a flow that found its set with a free way sits
    // in the first way probed.
    let start = first_way(hash);
    let mut i = 0;
    while i < WAYS {
        // SAFETY: a way of a live map value. Other CPUs may be writing it:
        // each field is read once, and the seal decides whether they belong
        // together.
        unsafe {
            let e = &raw mut (*set).ways[(start + i) & (WAYS - 1)];
            if key_is(e, key) {
                let backend = read_volatile(&raw const (*e).backend);
                if read_volatile(&raw const (*e).seal) != flow_seal(hash, backend) {
                    return None;
                }
                return Some(Tracked {
                    entry: e,
                    backend,
                    service_slot: read_volatile(&raw const (*e).service_slot),
                });
            }
        }
        i += 1;
    }
    None
}

/// Records a packet (not a SYN) of `t`'s flow: confirmed, closing on
/// FIN/RST, seen now. Writes only what changed, so an established flow's
/// packets are reads. Returns whether the flow has just started closing.
#[inline(always)]
pub fn touch(t: &Tracked, closing: bool) -> bool {
    let was = t.flags();
    let flags = was | FLOW_CONFIRMED | if closing { FLOW_CLOSING } else { 0 };
    let now = now();
    // SAFETY: a way of a live map value. A way another CPU has just given to
    // a new flow gets this one's flags or stamp: at worst that flow is kept
    // a little longer, or counted closed early.
    unsafe {
        if flags != was {
            write_volatile(&raw mut (*t.entry).flags, flags);
        }
        if now != read_volatile(&raw const (*t.entry).stamp) {
            write_volatile(&raw mut (*t.entry).stamp, now);
        }
    }
    closing && was & FLOW_CLOSING == 0
}

/// What [`insert`] did.
pub enum Inserted {
    /// Tracked; `Some(backend)` when the way held a live flow (not closing)
    /// of that backend, which is no longer tracked.
    Took(Option<u32>),
    /// Every way holds a confirmed, active flow: not tracked.
    Full,
}

/// Tracks `key` (`hash`: its `table_hash`) on `backend`, in the best way
/// its set can give (see the module docs), for `service` (its id and
/// `SERVICE_INDEX` slot); `flags` is [`FLOW_CLOSING`] or 0.
#[inline(always)]
pub fn insert(key: &FlowKey, hash: u64, backend: u32, service: (u32, u32), flags: u32) -> Inserted {
    let Some(set) = set_of(hash) else {
        return Inserted::Full;
    };
    let now = now();
    let start = first_way(hash);
    let mut best = WAYS;
    let mut best_rank = 4;
    let mut i = 0;
    while i < WAYS {
        let w = (start + i) & (WAYS - 1);
        // SAFETY: a way of a live map value; fields read once each.
        let rank = unsafe {
            let e = &raw const (*set).ways[w];
            let f = read_volatile(&raw const (*e).flags);
            if key_is(e, key) {
                0
            } else if read_volatile(&raw const (*e).key.family) == 0 {
                1
            } else if f & FLOW_CLOSING != 0 || f & FLOW_CONFIRMED == 0 {
                2
            } else if now.wrapping_sub(read_volatile(&raw const (*e).stamp)) > FLOW_IDLE_SECS {
                3
            } else {
                4
            }
        };
        if rank < best_rank {
            best = w;
            best_rank = rank;
            if rank == 0 {
                break;
            }
        }
        i += 1;
    }
    if best >= WAYS {
        return Inserted::Full;
    }
    // SAFETY: a way of a live map value. The seal is zeroed first and
    // written last: a reader that sees the new key sees 0 (no seal is 0) or
    // the new seal, never the old one.
    unsafe {
        let e = &raw mut (*set).ways[best];
        let live = read_volatile(&raw const (*e).key.family) != 0
            && read_volatile(&raw const (*e).flags) & FLOW_CLOSING == 0;
        let displaced = live.then(|| read_volatile(&raw const (*e).backend));
        write_volatile(&raw mut (*e).seal, 0);
        write_key(e, key);
        write_volatile(&raw mut (*e).backend, backend);
        write_volatile(&raw mut (*e).service, service.0);
        write_volatile(&raw mut (*e).service_slot, service.1);
        write_volatile(&raw mut (*e).flags, flags);
        write_volatile(&raw mut (*e).stamp, now);
        write_volatile(&raw mut (*e).seal, flow_seal(hash, backend));
        Inserted::Took(displaced)
    }
}
