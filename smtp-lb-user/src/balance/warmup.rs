//! Warmup: a relay (or relay IP) new to the pool starts at a small share of
//! its weight and ramps to the full weight on a schedule, so receivers see
//! its volume grow gradually and its reputation builds. Pure: the age goes
//! in, a share in parts per thousand comes out.
//!
//! Two schedules: `duration` for a relay added to the configuration (days:
//! reputation), and `rejoin` for one coming back after a health failure
//! (minutes: a cold relay is not slammed, but its IPs are known already).
//! The ramp is stepped by default so each step moves a bounded number of
//! Maglev slots, and a table rebuild happens only when the step changes.
use std::time::Duration;

use serde::Deserialize;

use crate::config::duration;

/// Full weight, in the unit [`share_permille`] returns.
pub const FULL: u32 = 1000;

/// `[warmup]` of the balancer's config.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct WarmupConfig {
    /// Ramp for a relay new to the configuration; `0s` disables warmup.
    #[serde(default = "WarmupConfig::default_duration", with = "duration")]
    pub duration: Duration,
    /// Ramp for a relay that comes back after failing its health checks.
    #[serde(default = "WarmupConfig::default_rejoin", with = "duration")]
    pub rejoin: Duration,
    /// Share of the full weight at the start, in percent (1–100).
    #[serde(default = "WarmupConfig::default_start_percent")]
    pub start_percent: u32,
    /// Number of equal steps from the start share to full weight; `0`
    /// ramps linearly (in 0.1 % increments).
    #[serde(default = "WarmupConfig::default_steps")]
    pub steps: u32,
}

impl WarmupConfig {
    fn default_duration() -> Duration {
        Duration::from_hours(7 * 24)
    }
    fn default_rejoin() -> Duration {
        Duration::from_mins(10)
    }
    fn default_start_percent() -> u32 {
        5
    }
    fn default_steps() -> u32 {
        10
    }

    /// Refuses values that cannot form a ramp; the message names the field.
    pub fn validate(&self) -> Result<(), (&'static str, String)> {
        if !(1..=100).contains(&self.start_percent) {
            return Err((
                "warmup.start_percent",
                format!("{} is not a percentage in 1..=100", self.start_percent),
            ));
        }
        if self.steps > FULL {
            return Err((
                "warmup.steps",
                format!(
                    "{} steps is finer than the 0.1 % the table can express",
                    self.steps
                ),
            ));
        }
        Ok(())
    }
}

impl Default for WarmupConfig {
    fn default() -> Self {
        Self {
            duration: Self::default_duration(),
            rejoin: Self::default_rejoin(),
            start_percent: Self::default_start_percent(),
            steps: Self::default_steps(),
        }
    }
}

/// The share of full weight (in thousandths) for a relay `age` into a ramp
/// of length `ramp`. `FULL` once the ramp is over (or when it is zero).
pub fn share_permille(age: Duration, ramp: Duration, cfg: &WarmupConfig) -> u32 {
    if ramp.is_zero() || age >= ramp {
        return FULL;
    }
    let start = cfg.start_percent.min(100) * 10;
    let progress = age.as_secs_f64() / ramp.as_secs_f64(); // in [0, 1)
    let progress = if cfg.steps == 0 {
        progress
    } else {
        // Step k of `steps` is reached at k/steps of the ramp.
        (progress * f64::from(cfg.steps)).floor() / f64::from(cfg.steps)
    };
    #[expect(
        clippy::cast_sign_loss,
        reason = "progress is in [0, 1), the product is positive"
    )]
    let gained = (f64::from(FULL - start) * progress) as u32;
    start + gained
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(steps: u32) -> WarmupConfig {
        WarmupConfig {
            duration: Duration::from_hours(100),
            rejoin: Duration::from_mins(10),
            start_percent: 10,
            steps,
        }
    }

    #[test]
    fn starts_at_the_start_share_and_ends_at_full_weight() {
        let c = cfg(10);
        assert_eq!(share_permille(Duration::ZERO, c.duration, &c), 100);
        assert_eq!(
            share_permille(Duration::from_hours(100), c.duration, &c),
            FULL
        );
        assert_eq!(
            share_permille(Duration::from_hours(1000), c.duration, &c),
            FULL
        );
    }

    #[test]
    fn stepped_ramp_holds_each_step_until_the_next() {
        let c = cfg(10);
        // Steps of 90 ‰ every 10 hours.
        assert_eq!(share_permille(Duration::from_hours(9), c.duration, &c), 100);
        assert_eq!(
            share_permille(Duration::from_hours(10), c.duration, &c),
            190
        );
        assert_eq!(
            share_permille(Duration::from_hours(55), c.duration, &c),
            550
        );
        assert_eq!(
            share_permille(Duration::from_hours(99), c.duration, &c),
            910
        );
    }

    #[test]
    fn linear_ramp_grows_with_age() {
        let c = cfg(0);
        assert_eq!(
            share_permille(Duration::from_hours(50), c.duration, &c),
            550
        );
        let a = share_permille(Duration::from_hours(20), c.duration, &c);
        let b = share_permille(Duration::from_hours(21), c.duration, &c);
        assert!(b > a);
    }

    #[test]
    fn a_zero_ramp_means_no_warmup() {
        let c = cfg(10);
        assert_eq!(share_permille(Duration::ZERO, Duration::ZERO, &c), FULL);
    }

    #[test]
    fn share_never_decreases_along_the_ramp() {
        for steps in [0, 1, 3, 10, 100] {
            let c = cfg(steps);
            let mut last = 0;
            for minutes in (0..=6000).step_by(7) {
                let s = share_permille(Duration::from_mins(minutes), c.duration, &c);
                assert!(s >= last, "steps {steps}: share fell at {minutes} min");
                last = s;
            }
        }
    }

    #[test]
    fn bad_start_share_is_refused_by_field() {
        let mut c = cfg(10);
        c.start_percent = 0;
        assert_eq!(c.validate().unwrap_err().0, "warmup.start_percent");
    }
}
