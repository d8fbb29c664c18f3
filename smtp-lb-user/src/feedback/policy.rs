//! The pure policy: what a relay's readings do to its share of weight, and
//! when a service stops admitting new connections. Time goes in (`now`), so
//! the tests drive it.
//!
//! **Share.** Each reading gives a *pressure* in thousandths: the larger of
//! the queue depth's place between `queue_low` and `queue_high` and the
//! deferral rate's place between its low and high percentages. The share
//! falls linearly with it, from full to `floor_percent`, in steps of
//! `step_percent` (each step is one table rewrite). It falls at the first
//! reading that asks for less; it rises only when the pressure, less
//! `hysteresis_percent`, asks for more for `rise` readings in a row — a
//! queue hovering at the edge of a step does not flap the tables.
//!
//! **Admission.** A service closes when every relay that may take its new
//! connections reports a queue at or over `high_water`, and opens again
//! when one is below `low_water` or cannot be read (fail open: a relay we
//! cannot read is not proof that mail must wait).
use std::{collections::VecDeque, time::Instant};

use super::config::{AdmissionConfig, FeedbackConfig};

/// Full share, in thousandths.
pub const FULL: u32 = 1000;

/// One poll of a relay's metrics page.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Reading {
    /// Messages in its queue.
    pub queue: u64,
    /// Recipient outcomes deferred since the relay started (a counter).
    pub deferred: u64,
    /// Every recipient outcome since it started (delivered, deferred,
    /// bounced, expired).
    pub outcomes: u64,
}

/// A change of a relay's share, with why.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Change {
    pub from: u32,
    pub to: u32,
    pub reason: String,
}

/// What the balancer knows of one relay from its feedback.
#[derive(Clone, Debug)]
pub struct RelayFeedback {
    /// Share of its weight feedback leaves it, in thousandths.
    pub share: u32,
    /// Pressure at the last reading, in thousandths.
    pub pressure: u32,
    /// The last good reading.
    pub last: Option<Reading>,
    /// Deferred share of outcomes over the window, in thousandths (`None`:
    /// too few outcomes to say).
    pub deferral: Option<u32>,
    /// Why the share was last changed.
    pub reason: Option<String>,
    /// Polls failed in a row, and the last error.
    pub failures: u32,
    pub error: Option<String>,
    /// Readings within the window (the oldest is the deferral rate's base).
    window: VecDeque<(Instant, Reading)>,
    last_ok: Option<Instant>,
    raise_streak: u32,
}

impl Default for RelayFeedback {
    fn default() -> Self {
        Self {
            share: FULL,
            pressure: 0,
            last: None,
            deferral: None,
            reason: None,
            failures: 0,
            error: None,
            window: VecDeque::new(),
            last_ok: None,
            raise_streak: 0,
        }
    }
}

/// Where `v` lies between `low` (0) and `high` (1000).
fn place(v: u64, low: u64, high: u64) -> u32 {
    if v <= low {
        0
    } else if v >= high {
        FULL
    } else {
        ((v - low) * u64::from(FULL) / (high - low)) as u32
    }
}

/// The share a pressure asks for: linear from full to the floor, rounded
/// down to a step below full.
pub fn share_for(cfg: &FeedbackConfig, pressure: u32) -> u32 {
    let floor = cfg.floor_percent * 10;
    let step = cfg.step_percent * 10;
    let raw = FULL - pressure.min(FULL) * (FULL - floor) / FULL;
    let steps = (FULL - raw).div_ceil(step);
    FULL.saturating_sub(steps * step).max(floor)
}

impl RelayFeedback {
    /// The queue depth to decide admission by: the last reading if the last
    /// poll succeeded, else unknown.
    pub fn queue_now(&self) -> Option<u64> {
        (self.failures == 0)
            .then_some(self.last.map(|r| r.queue))
            .flatten()
    }

    /// Takes one poll's result at `now`; returns the change of share it
    /// makes, if any.
    pub fn update(
        &mut self,
        cfg: &FeedbackConfig,
        now: Instant,
        polled: Result<Reading, String>,
    ) -> Option<Change> {
        let reading = match polled {
            Ok(r) => r,
            Err(e) => return self.failed(cfg, now, &e),
        };
        self.failures = 0;
        self.error = None;
        self.last_ok = Some(now);
        // A counter that went back: the relay restarted; count from here.
        if self
            .window
            .back()
            .is_some_and(|(_, r)| r.outcomes > reading.outcomes || r.deferred > reading.deferred)
        {
            self.window.clear();
        }
        self.window.push_back((now, reading));
        // Keep one reading at or before the window's start as the base.
        while self.window.len() > 2
            && self
                .window
                .get(1)
                .is_some_and(|(t, _)| now.duration_since(*t) >= cfg.window)
        {
            self.window.pop_front();
        }
        self.last = Some(reading);
        let (t0, base) = self.window.front().copied().unwrap_or((now, reading));
        let outcomes = reading.outcomes - base.outcomes;
        let deferred = reading.deferred - base.deferred;
        self.deferral = (outcomes >= cfg.min_outcomes && outcomes > 0)
            .then(|| (deferred * u64::from(FULL) / outcomes) as u32);
        let queue_p = place(reading.queue, cfg.queue_low, cfg.queue_high);
        let deferral_p = self.deferral.map_or(0, |d| {
            place(
                u64::from(d),
                u64::from(cfg.deferral_low_percent) * 10,
                u64::from(cfg.deferral_high_percent) * 10,
            )
        });
        self.pressure = queue_p.max(deferral_p);
        let why = || {
            format!(
                "queue {} messages (low {}, high {}); {} (low {}%, high {}%)",
                reading.queue,
                cfg.queue_low,
                cfg.queue_high,
                self.deferral.map_or_else(
                    || format!(
                        "{outcomes} outcomes in {}s, too few for a deferral rate",
                        now.duration_since(t0).as_secs()
                    ),
                    |d| format!(
                        "{}.{}% of {outcomes} outcomes deferred in {}s",
                        d / 10,
                        d % 10,
                        now.duration_since(t0).as_secs()
                    )
                ),
                cfg.deferral_low_percent,
                cfg.deferral_high_percent,
            )
        };
        let down = share_for(cfg, self.pressure);
        if down < self.share {
            self.raise_streak = 0;
            return Some(self.set(down, why()));
        }
        // Rising, the pressure counts `hysteresis` more than it is: a
        // pressure at a step's edge lowers the share but does not raise it
        // back. No pressure at all is full share.
        let up = if self.pressure == 0 {
            FULL
        } else {
            share_for(cfg, self.pressure + cfg.hysteresis_percent * 10)
        };
        if up <= self.share {
            self.raise_streak = 0;
            return None;
        }
        self.raise_streak += 1;
        if self.raise_streak < cfg.rise {
            return None;
        }
        self.raise_streak = 0;
        Some(self.set(up, why()))
    }

    fn failed(&mut self, cfg: &FeedbackConfig, now: Instant, e: &str) -> Option<Change> {
        self.failures += 1;
        self.error = Some(e.to_owned());
        self.raise_streak = 0;
        // Silent for a whole window: what we knew is stale. Feedback cannot
        // tell, so it stops holding the relay back (its health checks judge it).
        let stale = self
            .last_ok
            .is_none_or(|t| now.duration_since(t) >= cfg.window);
        if stale && self.share < FULL {
            self.window.clear();
            self.last = None;
            self.deferral = None;
            self.pressure = 0;
            return Some(self.set(
                FULL,
                format!(
                    "no reading for {}s ({e}); full share until the relay answers",
                    cfg.window.as_secs()
                ),
            ));
        }
        None
    }

    fn set(&mut self, to: u32, reason: String) -> Change {
        let from = std::mem::replace(&mut self.share, to);
        self.reason = Some(reason.clone());
        Change { from, to, reason }
    }
}

/// A service's admission, with hysteresis.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Gate {
    /// New connections are refused.
    pub closed: bool,
}

impl Gate {
    /// Takes the queue depths of the relays that may take the service's new
    /// connections (`None`: not known now); returns the new state when it
    /// changes.
    pub fn update(&mut self, cfg: &AdmissionConfig, depths: &[Option<u64>]) -> Option<bool> {
        let closed = if self.closed {
            !depths.is_empty() && depths.iter().all(|d| d.is_some_and(|d| d >= cfg.low_water))
        } else {
            !depths.is_empty()
                && depths
                    .iter()
                    .all(|d| d.is_some_and(|d| d >= cfg.high_water))
        };
        (closed != self.closed).then(|| {
            self.closed = closed;
            closed
        })
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    fn cfg() -> FeedbackConfig {
        FeedbackConfig {
            enabled: true,
            queue_low: 100,
            queue_high: 1100,
            deferral_low_percent: 10,
            deferral_high_percent: 50,
            min_outcomes: 10,
            floor_percent: 20,
            step_percent: 10,
            hysteresis_percent: 10,
            rise: 3,
            window: Duration::from_secs(10),
            interval: Duration::from_secs(1),
            ..FeedbackConfig::default()
        }
    }

    #[expect(
        clippy::unnecessary_wraps,
        reason = "a poll's result, as `update` takes it"
    )]
    fn queue(q: u64) -> Result<Reading, String> {
        Ok(Reading {
            queue: q,
            deferred: 0,
            outcomes: 0,
        })
    }

    #[expect(
        clippy::unnecessary_wraps,
        reason = "a poll's result, as `update` takes it"
    )]
    fn read(deferred: u64, outcomes: u64) -> Result<Reading, String> {
        Ok(Reading {
            queue: 0,
            deferred,
            outcomes,
        })
    }

    #[test]
    fn the_share_falls_linearly_to_the_floor_in_steps() {
        let c = cfg();
        assert_eq!(share_for(&c, 0), FULL);
        assert_eq!(
            share_for(&c, 10),
            900,
            "a little pressure takes a whole step"
        );
        assert_eq!(share_for(&c, 500), 600);
        assert_eq!(share_for(&c, 1000), 200);
        assert_eq!(share_for(&c, 5000), 200, "never below the floor");
        let c = FeedbackConfig {
            floor_percent: 25,
            step_percent: 20,
            ..cfg()
        };
        assert_eq!(share_for(&c, 1000), 250, "the floor, not the step below it");
    }

    #[test]
    fn a_growing_queue_lowers_the_share_at_once_and_a_drained_one_raises_it_after_rise_readings() {
        let c = cfg();
        let t = Instant::now();
        let s = |i: u64| t + Duration::from_secs(i);
        let mut r = RelayFeedback::default();
        assert_eq!(r.update(&c, s(0), queue(50)), None);
        let ch = r.update(&c, s(1), queue(600)).expect("lowered at once");
        assert_eq!((ch.from, ch.to), (FULL, 600));
        assert!(ch.reason.contains("queue 600 messages"), "{}", ch.reason);
        assert_eq!(r.update(&c, s(2), queue(1100)).map(|c| c.to), Some(200));
        // Drained: full again only after `rise` readings asking for it.
        assert_eq!(r.update(&c, s(3), queue(0)), None);
        assert_eq!(r.update(&c, s(4), queue(0)), None);
        assert_eq!(r.update(&c, s(5), queue(0)).map(|c| c.to), Some(FULL));
    }

    #[test]
    fn a_queue_hovering_at_a_step_edge_does_not_flap() {
        let c = cfg();
        let t = Instant::now();
        let mut r = RelayFeedback::default();
        // 600 messages is the edge between shares 600 and 500; ±20 messages
        // around it (±2 % of the range) stay inside the 10 % hysteresis.
        let mut changes = Vec::new();
        for i in 0..60u64 {
            let q = if i % 2 == 0 { 580 } else { 620 };
            if let Some(ch) = r.update(&c, t + Duration::from_secs(i), queue(q)) {
                changes.push((i, ch.to));
            }
        }
        assert_eq!(
            changes,
            [(0, 600), (1, 500)],
            "down to the edge's lower step, then steady"
        );
        // Without hysteresis the same queue flaps the tables.
        let c = FeedbackConfig {
            hysteresis_percent: 0,
            rise: 1,
            ..cfg()
        };
        let mut r = RelayFeedback::default();
        let flaps = (0..60u64)
            .filter(|i| {
                let q = if i % 2 == 0 { 580 } else { 620 };
                r.update(&c, t + Duration::from_secs(*i), queue(q))
                    .is_some()
            })
            .count();
        assert!(flaps > 50, "{flaps}");
    }

    #[test]
    fn deferrals_over_the_window_lower_the_share_and_too_few_outcomes_say_nothing() {
        let c = cfg();
        let t = Instant::now();
        let mut r = RelayFeedback::default();
        assert_eq!(r.update(&c, t, read(0, 0)), None);
        // 5 outcomes, all deferred: below min_outcomes, no rate.
        assert_eq!(r.update(&c, t + Duration::from_secs(1), read(5, 5)), None);
        assert_eq!(r.deferral, None);
        // 40 of 40 deferred: the rate is 100 % → the floor.
        let ch = r
            .update(&c, t + Duration::from_secs(2), read(40, 40))
            .unwrap();
        assert_eq!(ch.to, 200);
        assert!(
            ch.reason.contains("100.0% of 40 outcomes deferred"),
            "{}",
            ch.reason
        );
        // Then only deliveries: after the window the old deferrals are out
        // of it and the share comes back (after `rise` readings).
        let mut last = None;
        for i in 3..30u64 {
            if let Some(ch) = r.update(&c, t + Duration::from_secs(i), read(40, 40 + 10 * i)) {
                last = Some((i, ch.to));
            }
        }
        assert_eq!(r.share, FULL, "{last:?}");
        assert!(
            last.unwrap().0 >= 12,
            "not before the deferrals left the window: {last:?}"
        );
    }

    #[test]
    fn a_relay_that_stops_answering_gets_its_full_share_back_after_a_window() {
        let c = cfg();
        let t = Instant::now();
        let mut r = RelayFeedback::default();
        r.update(&c, t, queue(5000));
        assert_eq!(r.share, 200);
        assert_eq!(r.queue_now(), Some(5000));
        assert_eq!(
            r.update(&c, t + Duration::from_secs(1), Err("timed out".into())),
            None
        );
        assert_eq!(r.queue_now(), None, "unknown while the poll fails");
        assert_eq!(r.share, 200, "held within the window");
        let ch = r
            .update(&c, t + Duration::from_secs(10), Err("timed out".into()))
            .unwrap();
        assert_eq!(ch.to, FULL);
        assert!(ch.reason.contains("timed out"), "{}", ch.reason);
    }

    #[test]
    fn a_restarted_relay_counts_its_outcomes_from_zero_again() {
        let c = cfg();
        let t = Instant::now();
        let mut r = RelayFeedback::default();
        r.update(&c, t, read(500, 1000));
        // Counters back near zero: not a negative rate, no panic.
        assert_eq!(r.update(&c, t + Duration::from_secs(1), read(0, 3)), None);
        assert_eq!(r.deferral, None);
    }

    #[test]
    fn admission_closes_when_every_relay_is_over_high_water_and_opens_below_low_water() {
        let a = AdmissionConfig {
            high_water: 100,
            low_water: 50,
        };
        let mut g = Gate::default();
        assert_eq!(g.update(&a, &[Some(150), Some(99)]), None, "one has room");
        assert_eq!(g.update(&a, &[Some(150), Some(100)]), Some(true));
        assert_eq!(
            g.update(&a, &[Some(80), Some(60)]),
            None,
            "hysteresis: still closed"
        );
        assert_eq!(g.update(&a, &[Some(80), Some(49)]), Some(false));
        assert_eq!(
            g.update(&a, &[Some(150), None]),
            None,
            "unknown is not full"
        );
        g.update(&a, &[Some(150), Some(150)]);
        assert!(g.closed);
        assert_eq!(g.update(&a, &[Some(150), None]), Some(false), "fail open");
        assert_eq!(g.update(&a, &[]), None, "no relay: nothing to protect");
    }
}
