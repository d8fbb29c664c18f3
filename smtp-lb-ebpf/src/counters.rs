//! This CPU's counters: one [`COUNTERS`] value holds them all (global, per
//! service, per backend), found with the one lookup every packet makes.
//! A service's or a backend's counters are then an index into it, not a
//! lookup of their own (each lookup is a call the compiler must save
//! registers around: two of them cost a forwarded packet ≈ 3.5 ns).
use core::ops::{Deref, DerefMut};

use smtp_lb_common::{
    BackendStats, Counters, GlobalStats, MAX_BACKENDS, MAX_SERVICES, ServiceStats,
};

use crate::maps::COUNTERS;

// Ids are masked into the arrays: exact for every id user space hands out.
const _: () = assert!(MAX_SERVICES.is_power_of_two() && MAX_BACKENDS.is_power_of_two());

/// This CPU's [`Counters`]; dereferences to the global ones.
pub struct Stats(*mut Counters);

impl Stats {
    /// This CPU's block (`None` only without the map, which a loaded
    /// program always has).
    #[inline(always)]
    pub fn this_cpu() -> Option<Self> {
        COUNTERS.get_ptr_mut(0).map(Self)
    }

    /// The counters of service `id`.
    #[inline(always)]
    pub fn service(&mut self, id: u32) -> &mut ServiceStats {
        // SAFETY: this CPU's slot of a live map value; nothing else runs on
        // this CPU while we do.
        unsafe { &mut (*self.0).services[(id & (MAX_SERVICES - 1)) as usize] }
    }

    /// The counters of backend `id`.
    #[inline(always)]
    pub fn backend(&mut self, id: u32) -> &mut BackendStats {
        // SAFETY: as in `service`.
        unsafe { &mut (*self.0).backends[(id & (MAX_BACKENDS - 1)) as usize] }
    }
}

impl Deref for Stats {
    type Target = GlobalStats;

    #[inline(always)]
    fn deref(&self) -> &GlobalStats {
        // SAFETY: as in `service`.
        unsafe { &(*self.0).global }
    }
}

impl DerefMut for Stats {
    #[inline(always)]
    fn deref_mut(&mut self) -> &mut GlobalStats {
        // SAFETY: as in `service`.
        unsafe { &mut (*self.0).global }
    }
}
