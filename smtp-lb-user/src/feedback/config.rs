//! `[feedback]` of the balancer's config: how the relays' own view (queue
//! depth, deferral rate) moves their weights, and when new SYNs are refused.
//! Off by default.
use std::time::Duration;

use serde::Deserialize;

use crate::config::duration;

/// `[feedback]`.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct FeedbackConfig {
    /// Poll the relays and act on what they say.
    #[serde(default)]
    pub enabled: bool,
    /// Port of each relay's metrics listener (`metrics = "ADDR:PORT"` in its
    /// config), polled on the relay's own address: `GET /metrics`.
    #[serde(default = "FeedbackConfig::default_port")]
    pub port: u16,
    /// Between two polls of one relay.
    #[serde(default = "FeedbackConfig::default_interval", with = "duration")]
    pub interval: Duration,
    /// A whole poll (connect, request, answer); shorter than `interval`.
    #[serde(default = "FeedbackConfig::default_timeout", with = "duration")]
    pub timeout: Duration,
    /// Largest metrics page read; a longer answer is a failed poll.
    #[serde(default = "FeedbackConfig::default_max_page_bytes")]
    pub max_page_bytes: u64,
    /// Queue depth (messages) at which a relay's weight starts to fall.
    #[serde(default = "FeedbackConfig::default_queue_low")]
    pub queue_low: u64,
    /// Queue depth at which it reaches `floor_percent`.
    #[serde(default = "FeedbackConfig::default_queue_high")]
    pub queue_high: u64,
    /// Share of delivery outcomes deferred (percent) at which the weight
    /// starts to fall.
    #[serde(default = "FeedbackConfig::default_deferral_low_percent")]
    pub deferral_low_percent: u32,
    /// Deferred share at which it reaches `floor_percent`.
    #[serde(default = "FeedbackConfig::default_deferral_high_percent")]
    pub deferral_high_percent: u32,
    /// The deferral rate is taken over this window.
    #[serde(default = "FeedbackConfig::default_window", with = "duration")]
    pub window: Duration,
    /// Fewer outcomes than this in the window say nothing about deferrals.
    #[serde(default = "FeedbackConfig::default_min_outcomes")]
    pub min_outcomes: u64,
    /// Lowest share of its weight feedback leaves a relay (1–100): it keeps
    /// some traffic, so its recovery shows.
    #[serde(default = "FeedbackConfig::default_floor_percent")]
    pub floor_percent: u32,
    /// The share moves in steps of this many percent (each step rewrites
    /// the tables once).
    #[serde(default = "FeedbackConfig::default_step_percent")]
    pub step_percent: u32,
    /// Pressure (percent of the low→high range) must fall this far below
    /// the edge of a step before the share rises back through it.
    #[serde(default = "FeedbackConfig::default_hysteresis_percent")]
    pub hysteresis_percent: u32,
    /// Consecutive polls asking for more before the share rises (it falls
    /// at the first poll that asks for less).
    #[serde(default = "FeedbackConfig::default_rise")]
    pub rise: u32,
    /// Refuse new SYNs while every relay of a service is over its queue
    /// high-water mark (`[feedback.admission]`; absent = never).
    #[serde(default)]
    pub admission: Option<AdmissionConfig>,
}

/// `[feedback.admission]`.
#[derive(Clone, Copy, Debug, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct AdmissionConfig {
    /// Queue depth (messages) over which a relay counts as saturated; when
    /// every relay of a service is, new SYNs to it are dropped in XDP.
    pub high_water: u64,
    /// Admission returns once one of them is below this depth again.
    pub low_water: u64,
}

impl Default for FeedbackConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            port: Self::default_port(),
            interval: Self::default_interval(),
            timeout: Self::default_timeout(),
            max_page_bytes: Self::default_max_page_bytes(),
            queue_low: Self::default_queue_low(),
            queue_high: Self::default_queue_high(),
            deferral_low_percent: Self::default_deferral_low_percent(),
            deferral_high_percent: Self::default_deferral_high_percent(),
            window: Self::default_window(),
            min_outcomes: Self::default_min_outcomes(),
            floor_percent: Self::default_floor_percent(),
            step_percent: Self::default_step_percent(),
            hysteresis_percent: Self::default_hysteresis_percent(),
            rise: Self::default_rise(),
            admission: None,
        }
    }
}

impl FeedbackConfig {
    fn default_port() -> u16 {
        9702
    }
    fn default_interval() -> Duration {
        Duration::from_secs(2)
    }
    fn default_timeout() -> Duration {
        Duration::from_secs(1)
    }
    fn default_max_page_bytes() -> u64 {
        4 * 1024 * 1024
    }
    fn default_queue_low() -> u64 {
        1000
    }
    fn default_queue_high() -> u64 {
        10_000
    }
    fn default_deferral_low_percent() -> u32 {
        10
    }
    fn default_deferral_high_percent() -> u32 {
        50
    }
    fn default_window() -> Duration {
        Duration::from_secs(30)
    }
    fn default_min_outcomes() -> u64 {
        20
    }
    fn default_floor_percent() -> u32 {
        20
    }
    fn default_step_percent() -> u32 {
        10
    }
    fn default_hysteresis_percent() -> u32 {
        10
    }
    fn default_rise() -> u32 {
        3
    }

    /// Refuses values that cannot form a policy; the message names the field.
    pub fn validate(&self) -> Result<(), (String, String)> {
        let bad = |f: &str, p: String| Err((format!("feedback.{f}"), p));
        let percent = |v: u32| (0..=100).contains(&v);
        if self.port == 0 {
            return bad("port", "port 0 is not a TCP port".into());
        }
        if self.interval.is_zero() {
            return bad("interval", "must be longer than 0s".into());
        }
        if self.timeout.is_zero() || self.timeout >= self.interval {
            return bad(
                "timeout",
                format!(
                    "{:?} must be above 0s and shorter than interval ({:?}): one poll at a time",
                    self.timeout, self.interval
                ),
            );
        }
        if self.max_page_bytes < 1024 {
            return bad("max_page_bytes", "at least 1024".into());
        }
        if self.queue_low >= self.queue_high {
            return bad(
                "queue_high",
                format!(
                    "{} must be above queue_low ({})",
                    self.queue_high, self.queue_low
                ),
            );
        }
        if !percent(self.deferral_high_percent) {
            return bad(
                "deferral_high_percent",
                format!("{} is not a percentage", self.deferral_high_percent),
            );
        }
        if self.deferral_low_percent >= self.deferral_high_percent {
            return bad(
                "deferral_high_percent",
                format!(
                    "{} must be above deferral_low_percent ({})",
                    self.deferral_high_percent, self.deferral_low_percent
                ),
            );
        }
        if self.window < self.interval {
            return bad(
                "window",
                format!(
                    "{:?} must be at least interval ({:?})",
                    self.window, self.interval
                ),
            );
        }
        if !(1..=100).contains(&self.floor_percent) {
            return bad(
                "floor_percent",
                format!(
                    "{} is not in 1..=100 (a relay keeps some traffic, so its recovery shows)",
                    self.floor_percent
                ),
            );
        }
        if !(1..=100).contains(&self.step_percent) {
            return bad(
                "step_percent",
                format!("{} is not in 1..=100", self.step_percent),
            );
        }
        if self.hysteresis_percent > 50 {
            return bad(
                "hysteresis_percent",
                format!("{} is not in 0..=50", self.hysteresis_percent),
            );
        }
        if self.rise == 0 {
            return bad("rise", "must be at least 1".into());
        }
        if let Some(a) = self.admission {
            if a.high_water == 0 {
                return bad("admission.high_water", "must be above 0".into());
            }
            if a.low_water >= a.high_water {
                return bad(
                    "admission.low_water",
                    format!(
                        "{} must be below high_water ({}): admission returns only once a queue has drained below it",
                        a.low_water, a.high_water
                    ),
                );
            }
        }
        Ok(())
    }
}
