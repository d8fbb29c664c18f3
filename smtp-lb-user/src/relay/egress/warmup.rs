//! IP warmup: volume caps per (source, provider) by warmup day and hour.
use std::{
    collections::{BTreeMap, HashMap},
    sync::Mutex,
    time::{Duration, SystemTime, UNIX_EPOCH},
};

use serde::Serialize;

use super::super::policy::provider;
use super::{
    config::{Overflow, WarmupSchedule},
    source::{Source, SourceId},
};

/// `YYYY-MM-DD` as midnight UTC.
pub(super) fn parse_date(s: &str) -> Result<SystemTime, String> {
    let bad = || format!("bad date {s:?}: expected YYYY-MM-DD or \"now\"");
    let mut it = s.trim().splitn(3, '-');
    let mut num = || {
        it.next()
            .and_then(|p| p.parse::<i64>().ok())
            .ok_or_else(bad)
    };
    let (y, m, d) = (num()?, num()?, num()?);
    if !(1..=12).contains(&m) || !(1..=31).contains(&d) || y < 1970 {
        return Err(bad());
    }
    // Days from civil (H. Hinnant's algorithm), proleptic Gregorian.
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    let secs = u64::try_from(days * 86_400).map_err(|_| bad())?;
    Ok(UNIX_EPOCH + Duration::from_secs(secs))
}

/// The caps of warmup day `day`: (daily, hourly); `None` when warm.
pub fn caps_on(schedule: &WarmupSchedule, day: u64) -> Option<(u64, Option<u64>)> {
    let k = usize::try_from(day).ok()?;
    let daily = *schedule.daily.get(k)?;
    Some((daily, schedule.hourly.get(k).copied()))
}

/// Counts of one (source, provider) in its current windows.
#[derive(Clone, Copy, Debug, Default)]
struct Window {
    day: u64,
    hour: u64,
    sent_day: u64,
    sent_hour: u64,
}

/// Warmup progress of one (source, provider), for ctl and metrics.
#[derive(Debug, Serialize)]
pub struct WarmupProgress {
    pub source: String,
    pub provider: String,
    pub day: u64,
    pub sent_day: u64,
    pub daily_cap: u64,
    pub sent_hour: u64,
    pub hourly_cap: Option<u64>,
}

/// Volume caps for cold sources, counted per (source, provider) in day and
/// hour windows measured from the source's `warmup_start`.
#[derive(Debug)]
pub struct Warmup {
    day: Duration,
    schedules: BTreeMap<String, WarmupSchedule>,
    windows: Mutex<HashMap<(SourceId, String), Window>>,
}

impl Warmup {
    pub(super) fn new(day: Duration, schedules: BTreeMap<String, WarmupSchedule>) -> Self {
        Self {
            day,
            schedules,
            windows: Mutex::new(HashMap::new()),
        }
    }

    fn schedule(&self, provider: &str) -> Option<&WarmupSchedule> {
        self.schedules
            .get(provider)
            .or_else(|| self.schedules.get(provider::DEFAULT))
    }

    pub(super) fn overflow(&self, provider: &str) -> Overflow {
        self.schedule(provider)
            .map_or(Overflow::Spill, |s| s.overflow)
    }

    /// Which (day, hour) windows `elapsed` since the start falls in, and
    /// how long until the next hour window.
    fn windows_at(&self, elapsed: Duration) -> (u64, u64, Duration) {
        let hour = self.day / 24;
        let h = elapsed.as_nanos() / hour.as_nanos().max(1);
        let next_hour = hour * u32::try_from(h + 1).unwrap_or(u32::MAX);
        let h = u64::try_from(h).unwrap_or(u64::MAX);
        (h / 24, h, next_hour.saturating_sub(elapsed))
    }

    /// Counts one message for (source, provider) if it is under the caps of
    /// the current windows; otherwise returns how long until a window with room.
    pub(super) fn take(
        &self,
        source: SourceId,
        start: Option<SystemTime>,
        provider: &str,
        now: SystemTime,
    ) -> Result<(), Duration> {
        let (Some(start), Some(schedule)) = (start, self.schedule(provider)) else {
            return Ok(());
        };
        let elapsed = now.duration_since(start).unwrap_or(Duration::ZERO);
        let (day, hour, to_next_hour) = self.windows_at(elapsed);
        let Some((daily, hourly)) = caps_on(schedule, day) else {
            return Ok(());
        };
        let mut windows = self.windows.lock().expect("warmup lock");
        let w = windows.entry((source, provider.to_owned())).or_default();
        if w.day != day {
            (w.day, w.sent_day) = (day, 0);
        }
        if w.hour != hour {
            (w.hour, w.sent_hour) = (hour, 0);
        }
        if w.sent_day >= daily {
            let hours_left = u32::try_from(23 - hour % 24).unwrap_or(0);
            return Err(to_next_hour + self.day / 24 * hours_left);
        }
        if hourly.is_some_and(|c| w.sent_hour >= c) {
            return Err(to_next_hour);
        }
        w.sent_day += 1;
        w.sent_hour += 1;
        Ok(())
    }

    /// Progress of every (source, provider) that has counted a message and is still cold.
    pub fn progress(&self, sources: &[Source], now: SystemTime) -> Vec<WarmupProgress> {
        let windows = self.windows.lock().expect("warmup lock");
        let mut out: Vec<WarmupProgress> = windows
            .iter()
            .filter_map(|((s, provider), w)| {
                let src = &sources[*s];
                let elapsed = now.duration_since(src.warmup_start?).unwrap_or_default();
                let (day, hour, _) = self.windows_at(elapsed);
                let (daily_cap, hourly_cap) = caps_on(self.schedule(provider)?, day)?;
                Some(WarmupProgress {
                    source: src.name.clone(),
                    provider: provider.clone(),
                    day,
                    sent_day: if w.day == day { w.sent_day } else { 0 },
                    daily_cap,
                    sent_hour: if w.hour == hour { w.sent_hour } else { 0 },
                    hourly_cap,
                })
            })
            .collect();
        out.sort_by(|a, b| (&a.source, &a.provider).cmp(&(&b.source, &b.provider)));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_midnight_utc() {
        let t = parse_date("2026-11-01").unwrap();
        assert_eq!(
            t.duration_since(UNIX_EPOCH).unwrap().as_secs(),
            1_793_491_200
        );
        assert_eq!(parse_date("1970-01-01").unwrap(), UNIX_EPOCH);
        assert!(parse_date("2026-02").is_err());
    }

    #[test]
    fn warmup_caps_ramp_by_day_and_reset_each_window() {
        let day = Duration::from_secs(24);
        let sched = WarmupSchedule {
            daily: vec![3, 10],
            hourly: vec![2],
            overflow: Overflow::Spill,
        };
        assert_eq!(caps_on(&sched, 0), Some((3, Some(2))));
        assert_eq!(caps_on(&sched, 1), Some((10, None)));
        assert_eq!(caps_on(&sched, 2), None);
        let w = Warmup::new(day, BTreeMap::from([("google".to_owned(), sched)]));
        let t0 = UNIX_EPOCH + Duration::from_secs(1000);
        let at = |s: f64| t0 + Duration::from_secs_f64(s);
        // Hour 0 (1 s long): two, then wait for hour 1.
        assert_eq!(w.take(0, Some(t0), "google", at(0.1)), Ok(()));
        assert_eq!(w.take(0, Some(t0), "google", at(0.2)), Ok(()));
        let e = w.take(0, Some(t0), "google", at(0.25)).unwrap_err();
        assert!((e.as_secs_f64() - 0.75).abs() < 1e-6, "{e:?}");
        // Hour 1: one more reaches the daily 3; then wait for day 1 (at 24 s).
        assert_eq!(w.take(0, Some(t0), "google", at(1.5)), Ok(()));
        let e = w.take(0, Some(t0), "google", at(1.5)).unwrap_err();
        assert!((e.as_secs_f64() - 22.5).abs() < 1e-6, "{e:?}");
        // Other providers and warm sources are not capped.
        assert_eq!(w.take(0, Some(t0), "yahoo", at(1.5)), Ok(()));
        assert_eq!(w.take(1, None, "google", at(1.5)), Ok(()));
        // Day 1: 10 a day, no hourly cap.
        for _ in 0..10 {
            assert_eq!(w.take(0, Some(t0), "google", at(25.0)), Ok(()));
        }
        assert!(w.take(0, Some(t0), "google", at(25.0)).is_err());
        // Day 2: warm.
        assert_eq!(w.take(0, Some(t0), "google", at(49.0)), Ok(()));
    }
}
