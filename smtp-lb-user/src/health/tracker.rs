//! Rise/fall hysteresis over probe results, and a short history of them.
use std::{
    collections::VecDeque,
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};

/// Probe results kept per relay for `ctl backends`.
const HISTORY: usize = 16;

/// Whether a relay may receive new connections.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Up,
    Down,
}

/// A change of [`Health`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transition {
    WentUp,
    WentDown,
}

/// One probe's result as kept in the history.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ProbeRecord {
    /// When the probe finished.
    #[serde(with = "unix_secs")]
    pub at: SystemTime,
    /// How long it took.
    pub took_ms: u64,
    /// `None` when the relay passed; else why not.
    pub error: Option<String>,
}

/// A relay's health state machine.
#[derive(Clone, Debug)]
pub struct Tracker {
    rise: u32,
    fall: u32,
    health: Health,
    /// Consecutive results that disagree with `health`.
    streak: u32,
    history: VecDeque<ProbeRecord>,
}

impl Tracker {
    /// Starts in `initial`: `Down` for a relay never seen before (it must
    /// pass `rise` probes), `Up` for one the previous daemon had up, so a
    /// daemon restart does not empty the tables.
    pub fn new(rise: u32, fall: u32, initial: Health) -> Self {
        Self {
            rise: rise.max(1),
            fall: fall.max(1),
            health: initial,
            streak: 0,
            history: VecDeque::new(),
        }
    }

    pub fn health(&self) -> Health {
        self.health
    }

    /// Newest first.
    pub fn history(&self) -> impl Iterator<Item = &ProbeRecord> {
        self.history.iter().rev()
    }

    /// Records one probe; returns the transition it caused, if any.
    pub fn record(&mut self, error: Option<String>, took: Duration) -> Option<Transition> {
        let ok = error.is_none();
        if self.history.len() == HISTORY {
            self.history.pop_front();
        }
        self.history.push_back(ProbeRecord {
            at: SystemTime::now(),
            took_ms: took.as_millis() as u64,
            error,
        });
        let agrees = ok == (self.health == Health::Up);
        if agrees {
            self.streak = 0;
            return None;
        }
        self.streak += 1;
        match self.health {
            Health::Down if self.streak >= self.rise => {
                self.health = Health::Up;
                self.streak = 0;
                Some(Transition::WentUp)
            }
            Health::Up if self.streak >= self.fall => {
                self.health = Health::Down;
                self.streak = 0;
                Some(Transition::WentDown)
            }
            _ => None,
        }
    }
}

mod unix_secs {
    use std::time::{SystemTime, UNIX_EPOCH};

    pub fn serialize<S: serde::Serializer>(t: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(t: &mut Tracker) -> Option<Transition> {
        t.record(None, Duration::from_millis(1))
    }
    fn fail(t: &mut Tracker) -> Option<Transition> {
        t.record(Some("refused".into()), Duration::from_millis(1))
    }

    #[test]
    fn a_new_relay_needs_rise_successes_to_come_up() {
        let mut t = Tracker::new(2, 3, Health::Down);
        assert_eq!(ok(&mut t), None);
        assert_eq!(ok(&mut t), Some(Transition::WentUp));
        assert_eq!(t.health(), Health::Up);
    }

    #[test]
    fn fall_consecutive_failures_take_it_down_and_a_success_resets_the_count() {
        let mut t = Tracker::new(2, 3, Health::Up);
        assert_eq!(fail(&mut t), None);
        assert_eq!(fail(&mut t), None);
        assert_eq!(ok(&mut t), None, "a success in between resets the streak");
        assert_eq!(fail(&mut t), None);
        assert_eq!(fail(&mut t), None);
        assert_eq!(fail(&mut t), Some(Transition::WentDown));
        assert_eq!(fail(&mut t), None, "already down");
    }

    #[test]
    fn history_keeps_the_newest_results_first() {
        let mut t = Tracker::new(1, 1, Health::Up);
        for i in 0..(HISTORY + 3) {
            t.record(Some(format!("e{i}")), Duration::ZERO);
        }
        let h: Vec<_> = t.history().map(|r| r.error.clone().unwrap()).collect();
        assert_eq!(h.len(), HISTORY);
        assert_eq!(h[0], format!("e{}", HISTORY + 2));
    }
}
