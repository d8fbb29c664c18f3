//! Rates and the GCRA throttle (generic cell rate algorithm): each event
//! reserves the next theoretical arrival time under a lock and then waits
//! for it outside the lock, so any number of connections share one rate and
//! no rate forces concurrency 1. The leaf of the policy layer: shaping,
//! rules and limiters all speak in [`Rate`]s.
use std::{
    str::FromStr,
    sync::Mutex,
    time::{Duration, Instant},
};

use serde::Deserialize;

/// `N/unit`: `"600/min"`, `"10/s"`, `"5000/h"`, `"100000/d"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

impl Rate {
    /// The spacing between two events at this rate.
    pub fn interval(self) -> Duration {
        self.per / self.count
    }
}

impl FromStr for Rate {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || {
            format!("bad rate {s:?}: expected N/unit with unit s, min, h or d, e.g. \"600/min\"")
        };
        let (n, unit) = s.trim().split_once('/').ok_or_else(bad)?;
        let count: u32 = n.trim().parse().map_err(|_| bad())?;
        if count == 0 {
            return Err(format!("bad rate {s:?}: the count must be at least 1"));
        }
        let per = match unit.trim() {
            "s" | "sec" | "second" => Duration::from_secs(1),
            "m" | "min" | "minute" => Duration::from_mins(1),
            "h" | "hour" => Duration::from_hours(1),
            "d" | "day" => Duration::from_hours(24),
            _ => return Err(bad()),
        };
        Ok(Self { count, per })
    }
}

impl<'de> Deserialize<'de> for Rate {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

#[derive(Debug)]
pub struct Gcra {
    interval: Duration,
    /// Theoretical arrival time of the next event.
    tat: Mutex<Option<Instant>>,
}

impl Gcra {
    pub fn new(rate: Rate) -> Self {
        Self {
            interval: rate.interval(),
            tat: Mutex::new(None),
        }
    }

    /// Reserves the next slot at `now` and returns how long to wait for it.
    pub fn reserve_at(&self, now: Instant) -> Duration {
        let mut tat = self.tat.lock().expect("gcra lock");
        let slot = tat.map_or(now, |t| t.max(now));
        *tat = Some(slot + self.interval);
        slot - now
    }

    /// Waits for a slot.
    pub async fn acquire(&self) {
        let wait = self.reserve_at(Instant::now());
        if !wait.is_zero() {
            tokio::time::sleep(wait).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rates_parse_in_every_unit_and_bad_ones_are_refused() {
        assert_eq!(
            "600/min".parse::<Rate>().unwrap(),
            Rate {
                count: 600,
                per: Duration::from_mins(1)
            }
        );
        assert_eq!(
            "10/s".parse::<Rate>().unwrap().interval(),
            Duration::from_millis(100)
        );
        assert_eq!(
            "3600/h".parse::<Rate>().unwrap().interval(),
            Duration::from_secs(1)
        );
        assert_eq!("1/d".parse::<Rate>().unwrap().per, Duration::from_hours(24));
        for bad in ["600", "x/min", "0/s", "10/fortnight", "-1/s", "/s", ""] {
            assert!(bad.parse::<Rate>().is_err(), "{bad}");
        }
    }

    #[test]
    fn gcra_spaces_reservations_by_the_interval_from_many_callers() {
        let g = Gcra::new("10/s".parse().unwrap());
        let t0 = Instant::now();
        // Five callers at once get slots 0, 100, …, 400 ms out.
        let waits: Vec<_> = (0..5).map(|_| g.reserve_at(t0)).collect();
        assert_eq!(
            waits,
            (0..5)
                .map(|i| Duration::from_millis(100 * i))
                .collect::<Vec<_>>()
        );
        // After an idle gap there is no burst credit: the next slot is now.
        let later = t0 + Duration::from_secs(10);
        assert_eq!(g.reserve_at(later), Duration::ZERO);
        assert_eq!(g.reserve_at(later), Duration::from_millis(100));
    }
}
